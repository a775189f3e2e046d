"""Benchmark: channel pruning + compaction pays off in ONNX Runtime (latency, size) and costs little time.

Models: the sample CNN (batch 64, so that compute dominates its 8x8 inputs) and a ResNet-18-shaped model built
on the fly (Conv+BN, residual Adds, 1x1 downsample, GAP, FC 1000; random weights, BN statistics random too),
input 1x3xSxS (--size, default 224). For each channel sparsity: channel plan (LAMP), masks written, the pipeline's
removal (onnxprune.prune at 0 on the masked model), then compaction. Reports, as ratios pruned/dense:
ONNX Runtime CPU latency (sessions with spinning off, alternating dense/pruned runs, median of --runs each),
the ideal ratio (remaining MACs / dense MACs of the prunable layers), file size and gzip size, and the
compaction time as a fraction of the pruning time (channel plan + pipeline) and of a plain unstructured
`onnxprune.prune(model, s)` of the dense model (in-process, median of 3 each).

    python bench/bench_compact.py [--size 224] [--runs 30] [--align 1 8] [--markdown]
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import onnxprune  # noqa: E402
from onnxprune.channels import channel_plan  # noqa: E402
from onnxprune.compact import compact  # noqa: E402
from onnxprune.figures import figures  # noqa: E402
from onnxprune.graph import find_layers  # noqa: E402
from onnxprune.io import write_tensor  # noqa: E402

SPARSITIES = (0.5, 0.75, 0.9)


def resnet18(size=224, classes=1000, seed=0):
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    count = [0]

    def conv_bn(x, c_in, c_out, k, stride, relu=True):
        i = count[0]
        count[0] += 1
        w = (rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"conv{i}.w"))
        for n, v in (("s", rng.uniform(0.5, 1.5, c_out)), ("b", rng.standard_normal(c_out) * 0.1),
                     ("m", rng.standard_normal(c_out) * 0.1), ("v", rng.uniform(0.5, 1.5, c_out))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"bn{i}.{n}"))
        p = k // 2
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.w"], [f"c{i}"], name=f"conv{i}", pads=[p] * 4,
                                      strides=[stride, stride], kernel_shape=[k, k]))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}"] + [f"bn{i}.{n}" for n in "sbmv"], [f"b{i}"],
                                      name=f"bn{i}"))
        if not relu:
            return f"b{i}"
        nodes.append(helper.make_node("Relu", [f"b{i}"], [f"r{i}"]))
        return f"r{i}"

    x = conv_bn("x", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, c = "pool", 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage and not block else 1
            h = conv_bn(x, c, width, 3, stride)
            h = conv_bn(h, width, width, 3, 1, relu=False)
            short = conv_bn(x, c, width, 1, stride, relu=False) if stride != 1 or c != width else x
            name = f"s{stage}b{block}"
            nodes += [helper.make_node("Add", [h, short], [name + ".sum"]),
                      helper.make_node("Relu", [name + ".sum"], [name])]
            x, c = name, width
    inits += [numpy_helper.from_array((rng.standard_normal((classes, 512)) / np.sqrt(512)).astype(np.float32), "fc.w"),
              numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "resnet18", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m


def session(model):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def latency(dense, pruned, feeds, runs):
    """Median seconds per run of each model, runs alternating (dense, pruned), after 3 warm-up runs each."""
    a, b = session(dense), session(pruned)
    for _ in range(3):
        a.run(None, feeds)
        b.run(None, feeds)
    ta, tb = [], []
    for i in range(runs):
        for sess, out in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t = time.perf_counter()
            sess.run(None, feeds)
            out.append(time.perf_counter() - t)
    del a, b
    return statistics.median(ta), statistics.median(tb)


def channel_prune(dense, sparsity, align=1):
    """Channel plan + masks + the pipeline's removal: the pruned (not yet compacted) model and the seconds."""
    t0 = time.perf_counter()
    model = onnx.ModelProto()
    model.CopyFrom(dense)
    layers, _ = find_layers(model)
    values = [numpy_helper.to_array(l.tensor) for l in layers]
    plan = channel_plan(model, layers, values, sparsity, "lamp", align)
    for l, v in zip(layers, values):
        if l.name in plan.masks:
            write_tensor(l.tensor, np.where(plan.masks[l.name], 0, v))
    pruned, _ = onnxprune.prune(model, 0.0)
    return pruned, plan, time.perf_counter() - t0


def bench(name, dense, shapes, runs, align=1, repeat=3):
    rows = []
    x = {k: np.random.default_rng(1).standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    fd = figures(dense, shapes)
    for s in SPARSITIES:
        plain, prune_t, compact_t = [], [], []
        for _ in range(repeat):  # timings: median of ``repeat`` runs each
            t = time.perf_counter()
            onnxprune.prune(dense, s, method="lamp")
            plain.append(time.perf_counter() - t)
            pruned, plan, t_prune = channel_prune(dense, s, align)
            prune_t.append(t_prune)
            t = time.perf_counter()
            res = compact(pruned, inplace=True, align=align)
            compact_t.append(time.perf_counter() - t)
        t_plain, t_prune, t_compact = (statistics.median(v) for v in (plain, prune_t, compact_t))
        fp = figures(res.model, shapes)
        ld, lp = latency(dense, res.model, x, runs)
        ideal = fp["macs"] / fd["macs"]
        rows.append({"model": name, "align": align, "sparsity": s, "achieved": round(plan.sparsity, 4),
                     "latency_ratio": lp / ld, "ideal_ratio": ideal, "latency_over_ideal": (lp / ld) / ideal,
                     "file_ratio": fp["file_bytes"] / fd["file_bytes"], "gzip_ratio": fp["gzip_bytes"] / fd["gzip_bytes"],
                     "params_ratio": fp["params_prunable"] / fd["params_prunable"],
                     "compact_over_prune": t_compact / t_prune, "compact_over_plain_prune": t_compact / t_plain,
                     "dense_ms": ld * 1e3, "pruned_ms": lp * 1e3, "prune_s": t_prune, "compact_s": t_compact,
                     "plain_prune_s": t_plain})
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}), flush=True)
    return rows


def markdown(rows, size, runs):
    out = [f"| model | align | sparsity (achieved) | latency ratio | ideal (MACs) | latency / ideal | file | gzip | "
           f"compaction / prune | compaction / plain prune |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['align']} | {r['sparsity']:.0%} ({r['achieved']:.1%}) | {r['latency_ratio']:.3f} | "
                   f"{r['ideal_ratio']:.3f} | {r['latency_over_ideal']:.2f}x | {r['file_ratio']:.3f} | "
                   f"{r['gzip_ratio']:.3f} | {r['compact_over_prune']:.1%} | {r['compact_over_plain_prune']:.1%} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--align", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    cnn = onnx.load(os.path.join(os.path.dirname(HERE), "sample_models", "cnn.onnx"))
    resnet = resnet18(a.size)
    rows = []
    for align in a.align:
        rows += bench("sample cnn (batch 64)", cnn, {"x": [64, 1, 8, 8]}, a.runs, align)
        rows += bench(f"ResNet-18 shape ({a.size}x{a.size})", resnet, {"x": [1, 3, a.size, a.size]}, a.runs, align)
    if a.markdown:
        print(markdown(rows, a.size, a.runs))


if __name__ == "__main__":
    main()
