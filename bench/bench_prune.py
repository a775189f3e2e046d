"""Benchmark: onnxprune --method lamp end to end vs the load+save floor and onnxsim's global magnitude pruning.

Builds (and caches under bench/cache/) a ~30 M-weight fp32 model mixing Conv, Gemm and MatMul, then times each
contender in its own fresh process (median of --repeat runs) and reads each process's peak RSS from wait4().
Writes the figures as ratios to the floor measured in the same run.

    python bench/bench_prune.py [--repeat 3] [--write-results]
Needs: pip install '.[bench]'  (onnxsim)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "cache")
MODEL = os.path.join(CACHE, "bench30m.onnx")
SPARSITY = 0.95


def build_model(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def w(name, shape, scale):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name
    prev = "x"
    convs = [(256, 256)] * 4 + [(512, 256)] + [(512, 512)] * 2
    for i, (o, c) in enumerate(convs):
        nodes.append(helper.make_node("Conv", [prev, w(f"conv{i}.w", (o, c, 3, 3), 1 / np.sqrt(9 * c))], [f"c{i}"],
                                      name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev = f"r{i}"
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"]), helper.make_node("Flatten", ["gap"], ["f"])]
    prev = "f"
    dense = [("Gemm", (2048, 512))] + [("Gemm", (2048, 2048))] * 3 + [("MatMul", (2048, 2048))] * 2 + [("Gemm", (10, 2048))]
    for i, (op, shape) in enumerate(dense):
        if op == "Gemm":
            nodes.append(helper.make_node("Gemm", [prev, w(f"fc{i}.w", shape, 1 / np.sqrt(shape[1]))], [f"g{i}"],
                                          name=f"fc{i}", transB=1))
        else:
            nodes.append(helper.make_node("MatMul", [prev, w(f"mm{i}.w", shape, 1 / np.sqrt(shape[0]))], [f"g{i}"],
                                          name=f"mm{i}"))
        prev = f"g{i}"
    g = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256, 8, 8])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    os.makedirs(os.path.dirname(path), exist_ok=True)
    onnx.save(m, path)
    return sum(int(np.prod(t.dims)) for t in inits)


FLOOR = "import onnx,sys; m=onnx.load(sys.argv[1]); onnx.save(m, sys.argv[2])"
ONNXSIM = ("import onnx,sys; from onnxsim.pruning import apply_magnitude_pruning as p; m=onnx.load(sys.argv[1]); "
           f"m=p(m, sparsity={SPARSITY}, global_sparsity=True); onnx.save(m, sys.argv[2])")


def measure(cmd):
    """(wall seconds, peak RSS MiB) of one fresh process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd} failed: {err[-2000:]}")
    return wall, usage.ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-onnxsim", action="store_true")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    # Build and count in child processes: a fork of a parent holding the model would inflate every child's
    # peak RSS (ru_maxrss counts the pages a child inherits before exec).
    here = f"import sys; sys.path.insert(0, {HERE!r}); import bench_prune as b"
    if not os.path.exists(MODEL):
        print(f"building {MODEL} ...", flush=True)
        subprocess.run([sys.executable, "-c", f"{here}; b.build_model(b.MODEL)"], check=True)
    n = int(subprocess.run([sys.executable, "-c", "import onnx, numpy as np, sys; m = onnx.load(sys.argv[1]); "
                            "print(sum(int(np.prod(t.dims)) for t in m.graph.initializer))", MODEL],
                           check=True, capture_output=True, text=True).stdout)
    out_dir = tempfile.mkdtemp(prefix="onnxprune-bench-")
    out = os.path.join(out_dir, "out.onnx")
    py = sys.executable
    # An installed wheel ships bytecode (pip compiles it, as it did onnx's); an editable checkout run with
    # PYTHONDONTWRITEBYTECODE=1 would otherwise recompile onnxprune's sources in every process (~0.08 s here).
    subprocess.run([py, "-m", "compileall", "-q", os.path.join(os.path.dirname(HERE), "onnxprune")], check=True,
                   stdout=subprocess.DEVNULL)
    contenders = {
        "floor (onnx load + save)": [py, "-c", FLOOR, MODEL, out],
        # pruning speed: validation (ONNX Runtime inference) is timed separately in bench_validate.py
        "onnxprune --method lamp": [py, "-m", "onnxprune.cli", MODEL, "--sparsity", str(SPARSITY), "--method", "lamp",
                                    "-o", out, "-q", "--no-validate"],
        "onnxprune --method lamp --compact": [py, "-m", "onnxprune.cli", MODEL, "--sparsity", str(SPARSITY),
                                              "--method", "lamp", "--compact", "-o", out, "-q", "--no-validate"],
        "onnxprune --method global": [py, "-m", "onnxprune.cli", MODEL, "--sparsity", str(SPARSITY), "--method",
                                      "global", "-o", out, "-q", "--no-validate"],
    }
    if not args.skip_onnxsim:
        contenders["onnxsim global magnitude"] = [py, "-c", ONNXSIM, MODEL, out]
    # rounds: every contender once per round, so the floor and the others share the machine's moments
    runs = {name: [] for name in contenders}
    for r in range(args.repeat):
        for name, cmd in contenders.items():
            if "onnxsim" not in name or r == 0:
                runs[name].append(measure(cmd))
    results = {}
    for name, rs in runs.items():
        results[name] = (statistics.median(x[0] for x in rs), statistics.median(x[1] for x in rs))
        print(f"{name:36s} {results[name][0]:8.2f} s  {results[name][1]:8.0f} MiB", flush=True)
    floor_t, floor_m = results["floor (onnx load + save)"]
    lines = [f"Model: {n / 1e6:.1f} M fp32 weights (Conv, Gemm, MatMul), sparsity {SPARSITY}, "
             f"median of {args.repeat} fresh processes in interleaved rounds (onnxsim: 1 run), {os.cpu_count()} CPUs.", "",
             "| contender | time s | time / floor | peak RSS MiB | RSS / floor |", "|---|---|---|---|---|"]
    for name, (t, m) in results.items():
        lines.append(f"| {name} | {t:.2f} | {t / floor_t:.2f}x | {m:.0f} | {m / floor_m:.2f}x |")
    if "onnxsim global magnitude" in results:
        lamp_t = results["onnxprune --method lamp"][0]
        lines += ["", f"onnxsim time / onnxprune lamp time: {results['onnxsim global magnitude'][0] / lamp_t:.1f}x"]
    lines += ["", "Connectivity (effective-sparsity analysis + detached-unit removal) against pruning, from the "
              "report's timings (median of the runs). Pruning = analyse + allocate + apply + write of a run with "
              "--no-effective, minus its analysis; overhead = a default run's total minus that.", "",
              "| sparsity | pruning s | connectivity overhead s | ratio | effective sparsity |", "|---|---|---|---|---|"]

    def stage_times(s, *flags):
        doc = json.loads(subprocess.run([py, "-m", "onnxprune.cli", MODEL, "--sparsity", str(s), "-o", out,
                                         "--no-validate", "--json", "-q", *flags], check=True, capture_output=True,
                                        text=True).stdout)
        t = doc["timings_s"]
        return sum(t[k] for k in ("analyse", "allocate", "apply", "connectivity", "write")), t["connectivity"], \
            doc["totals"]["effective_sparsity"]
    for s in (SPARSITY, 0.999):
        prune_only, overhead, eff = [], [], None
        for _ in range(args.repeat):
            ta, ca, _ = stage_times(s, "--no-effective")
            tb, _, eff = stage_times(s)
            prune_only.append(ta - ca)
            overhead.append(tb - (ta - ca))
        p, o = statistics.median(prune_only), statistics.median(overhead)
        lines.append(f"| {s} | {p:.3f} | {o:.3f} | {o / p:.2f}x | {eff:.5f} |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.write_results:
        with open(os.path.join(HERE, "RESULTS_latest.md"), "w") as fh:  # raw table; RESULTS.md is curated
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
