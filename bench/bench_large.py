"""Benchmark: models larger than memory (external data), pruned and reconstructed in bounded memory.

Generates under bench/.real/large/ (kept between runs; --regenerate rebuilds), never holding more than one weight:
  big.onnx    x [N, W] -> MatMul W x W -> Relu -> ... (--layers, default 5; W = --width, default 11000: 5 x 484 MB
              = 2.42 GB of float32 in one external data file), weights N(0, 1/W), seeded
  huge.onnx   one MatMul whose single weight is --huge x --huge float32 (default 23200: 2.15 GB > 2^31 bytes)
  calib.npz   32 calibration samples x [32, W]
Each measurement runs in a fresh process under /usr/bin/time (wall seconds, peak RSS) after the files were read
once (warm page cache for every run alike); the floor (onnx.load + onnx.save with external data, the least any
tool that rewrites the model does) runs paired with the streamed prune, --repeat times, medians reported:
  floor       python -c "onnx.load(big.onnx); onnx.save(..., save_as_external_data=True)"
  streamed    onnxprune big.onnx -s 0.9 --no-validate              (default: external data >= 256M streams)
  in-memory   onnxprune big.onnx -s 0.9 --no-validate --stream-above never   (once: outputs compared byte for byte)
  validated   onnxprune big.onnx -s 0.9                              (ONNX Runtime loads the pruned model)
  reconstruct onnxprune big.onnx -s 0.9 --no-validate --calibration calib.npz
  huge        onnxprune huge.onnx -s 0.9 --no-validate
Checks: zeros counted block by block from each output data file = round(0.9 x weights) exactly; the streamed and
in-memory outputs identical (model and data file); the inputs' sha256 unchanged after all runs.

    python bench/bench_large.py [--width 11000] [--layers 5] [--huge 23200] [--repeat 3] [--quick]
                                [--skip-reconstruct] [--markdown] [--json FILE]
"""
import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
ONNXPRUNE = [os.path.join(os.path.dirname(PY), "onnxprune")]  # the installed console script
TIME = "/usr/bin/time"


def _external(name, dims, location, offset):
    t = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims))
    t.data_location = TensorProto.EXTERNAL
    length = int(np.prod(dims)) * 4
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t, length


def write_chain(path, width, layers, seed=0):
    """MatMul chain with every weight written straight into one data file (one weight in memory at a time)."""
    location = os.path.basename(path) + ".data"
    inits, nodes, prev, offset = [], [], "x", 0
    with open(os.path.join(os.path.dirname(path), location), "wb") as fh:
        for k in range(layers):
            rng = np.random.default_rng(seed + k)
            for r in range(0, width, 1024):  # row blocks: memory stays a few MB whatever the width
                rows = min(1024, width - r)
                block = rng.standard_normal((rows, width), dtype=np.float32) * np.float32(1 / np.sqrt(width))
                fh.write(block.tobytes())
            t, length = _external(f"w{k}", (width, width), location, offset)
            offset += length
            pad = (-offset) % 4096
            fh.write(b"\0" * pad)
            offset += pad
            inits.append(t)
            out = f"h{k}" if k < layers - 1 else "y"
            nodes.append(helper.make_node("MatMul", [prev, f"w{k}"], [out]))
            if k < layers - 1:
                nodes.append(helper.make_node("Relu", [out], [f"r{k}"]))
                prev = f"r{k}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    with open(path, "wb") as fh:
        fh.write(m.SerializeToString())


def generate(d, width, layers, huge, regenerate):
    os.makedirs(d, exist_ok=True)
    big, hg, cal = os.path.join(d, "big.onnx"), os.path.join(d, "huge.onnx"), os.path.join(d, "calib.npz")
    meta = os.path.join(d, "meta.json")
    want = {"width": width, "layers": layers, "huge": huge}
    have = json.load(open(meta)) if os.path.exists(meta) else None
    if regenerate or have != want:
        for p in os.listdir(d):
            os.remove(os.path.join(d, p)) if os.path.isfile(os.path.join(d, p)) else shutil.rmtree(os.path.join(d, p))
        write_chain(big, width, layers)
        if huge:
            write_chain(hg, huge, 1, seed=100)
        np.savez(cal, x=np.random.default_rng(7).standard_normal((32, width)).astype(np.float32))
        json.dump(want, open(meta, "w"))
    return big, (hg if huge else None), cal


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def inputs_digest(model):
    d = os.path.dirname(model)
    return {p: sha(os.path.join(d, p)) for p in sorted(os.listdir(d))
            if p.startswith(os.path.basename(model)) and os.path.isfile(os.path.join(d, p))}


def warm(model):
    d = os.path.dirname(model)
    for p in os.listdir(d):
        if p.startswith(os.path.basename(model)):
            with open(os.path.join(d, p), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def timed(cmd, timeout):
    """(rc, wall s, peak RSS bytes, stderr tail) of ``cmd`` in a fresh process."""
    t = time.perf_counter()
    try:
        p = subprocess.run([TIME, "-f", "BENCH %e %M"] + cmd, capture_output=True, text=True, timeout=timeout,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t, None, f"timed out after {timeout} s"
    lines = p.stderr.strip().splitlines()
    stat = [ln for ln in lines if ln.startswith("BENCH ")]
    wall, rss = (float(stat[-1].split()[1]), int(stat[-1].split()[2]) * 1024) if stat else (None, None)
    rest = [ln for ln in lines if not ln.startswith("BENCH ")]
    return p.returncode, wall, rss, " | ".join(rest[-3:])


def floor_cmd(model, out):
    code = ("import onnx,sys; m=onnx.load(sys.argv[1]); "
            "onnx.save(m, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True, "
            "location='floor.onnx.data', size_threshold=1024)")
    return [PY, "-c", code, model, out]


def fresh(d):
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def count_zeros(model_path):
    """(zeros, values) over the model's float initializers, read from its external data a block at a time."""
    m = onnx.load(model_path, load_external_data=False)
    base = os.path.dirname(model_path)
    zeros = total = 0
    for t in m.graph.initializer:
        if t.data_type != TensorProto.FLOAT:
            continue
        n = int(np.prod(t.dims))
        total += n
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            with open(os.path.join(base, info["location"]), "rb") as fh:
                fh.seek(int(info.get("offset", 0)))
                left = n
                while left:
                    k = min(left, 1 << 24)
                    zeros += int(np.count_nonzero(np.frombuffer(fh.read(4 * k), dtype=np.float32) == 0))
                    left -= k
        else:
            zeros += int(np.count_nonzero(onnx.numpy_helper.to_array(t) == 0))
    return zeros, total


def tree(d):
    return {p: sha(os.path.join(d, p)) for p in sorted(os.listdir(d)) if os.path.isfile(os.path.join(d, p))}


def gb(x):
    return None if x is None else x / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=11000)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--huge", type=int, default=23200, help="width of the single-tensor model (0: skip)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="width 2000, 3 layers, huge 3000, 1 repeat")
    ap.add_argument("--skip-reconstruct", action="store_true")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--dir", default=os.path.join(HERE, ".real", "large"))
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", help="write the raw figures here")
    a = ap.parse_args()
    if a.quick:  # small, and streamed whatever its size
        a.width, a.layers, a.huge, a.repeat = 2000, 3, 3000, 1
        ONNXPRUNE.extend(["--stream-above", "0"])
    big, huge, cal = generate(a.dir, a.width, a.layers, a.huge, a.regenerate)
    work = os.path.join(a.dir, "out")
    before = {"big": inputs_digest(big), **({"huge": inputs_digest(huge)} if huge else {})}
    res = {"width": a.width, "layers": a.layers, "model_bytes": os.path.getsize(big + ".data"), "runs": {}}
    runs = res["runs"]

    def record(name, rc, wall, rss, err):
        runs.setdefault(name, []).append({"rc": rc, "wall_s": wall, "peak_bytes": rss, "stderr": err})
        print(f"{name:12s} rc={rc} {wall if wall is None else round(wall, 2)} s "
              f"{'-' if rss is None else round(rss / 1e9, 3)} GB {err[:200]}", file=sys.stderr)

    warm(big)
    for _ in range(a.repeat):  # paired: floor, then the streamed prune
        out = fresh(os.path.join(work, "floor"))
        record("floor", *timed(floor_cmd(big, os.path.join(out, "floor.onnx")), a.timeout))
        out = fresh(os.path.join(work, "streamed"))
        record("streamed", *timed(ONNXPRUNE + [big, "-s", "0.9", "--no-validate", "-q", "-o",
                                               os.path.join(out, "m.onnx"), "--report",
                                               os.path.join(work, "streamed.json")], a.timeout))
    shutil.rmtree(os.path.join(work, "floor"), ignore_errors=True)
    zeros, total = count_zeros(os.path.join(work, "streamed", "m.onnx"))
    res["zeros"], res["weights"], res["zeros_expected"] = zeros, total, int(round(0.9 * total))
    rep = json.load(open(os.path.join(work, "streamed.json")))
    res["streamed_report"] = rep["options"].get("streamed")
    res["report_zeros"] = rep["totals"]["zeros_after"]
    mem = fresh(os.path.join(work, "memory"))
    record("in-memory", *timed(ONNXPRUNE[:1] + [big, "-s", "0.9", "--no-validate", "-q", "--stream-above", "never",
                                            "-o", os.path.join(mem, "m.onnx")], a.timeout))
    res["identical"] = tree(os.path.join(work, "streamed")) == tree(mem)
    shutil.rmtree(mem, ignore_errors=True)
    shutil.rmtree(os.path.join(work, "streamed"), ignore_errors=True)
    out = fresh(os.path.join(work, "validated"))
    record("validated", *timed(ONNXPRUNE + [big, "-s", "0.9", "-q", "-o", os.path.join(out, "m.onnx"), "--report",
                                            os.path.join(work, "validated.json")], a.timeout))
    if os.path.exists(os.path.join(work, "validated.json")):
        v = json.load(open(os.path.join(work, "validated.json")))
        res["validated_outputs"] = v.get("validation", {}).get("outputs")
        res["validated_providers"] = v.get("validation", {}).get("providers")
    shutil.rmtree(out, ignore_errors=True)
    if not a.skip_reconstruct:
        out = fresh(os.path.join(work, "reconstruct"))
        record("reconstruct", *timed(ONNXPRUNE + [big, "-s", "0.9", "--no-validate", "-q", "--calibration", cal,
                                                  "-o", os.path.join(out, "m.onnx"), "--report",
                                                  os.path.join(work, "reconstruct.json")], a.timeout))
        if runs["reconstruct"][-1]["rc"] == 0:
            r = json.load(open(os.path.join(work, "reconstruct.json")))["reconstruction"]
            res["reconstruction"] = {"time_s": r["time_s"], "peak_rss_bytes": r.get("peak_rss_bytes"),
                                     "layers": [{k: l.get(k) for k in ("name", "method", "rows", "row_blocks",
                                                                       "moments_bytes", "rel_error_before",
                                                                       "rel_error_after", "time_s", "fallback")}
                                                for l in r["layers"]]}
            res["reconstruct_zeros"] = count_zeros(os.path.join(out, "m.onnx"))[0]
        shutil.rmtree(out, ignore_errors=True)
    if huge:
        warm(huge)
        out = fresh(os.path.join(work, "floor"))
        record("huge-floor", *timed(floor_cmd(huge, os.path.join(out, "floor.onnx")), a.timeout))
        out = fresh(os.path.join(work, "huge"))
        record("huge", *timed(ONNXPRUNE + [huge, "-s", "0.9", "--no-validate", "-q", "-o",
                                           os.path.join(out, "m.onnx")], a.timeout))
        if runs["huge"][-1]["rc"] == 0:
            z, n = count_zeros(os.path.join(out, "m.onnx"))
            res["huge_zeros"], res["huge_weights"], res["huge_expected"] = z, n, int(round(0.9 * n))
        res["huge_bytes"] = os.path.getsize(huge + ".data")
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    after = {"big": inputs_digest(big), **({"huge": inputs_digest(huge)} if huge else {})}
    res["inputs_unchanged"] = before == after

    def med(name, key):
        vals = [r[key] for r in runs.get(name, []) if r[key] is not None and r["rc"] == 0]
        return statistics.median(vals) if vals else None
    res["median"] = {n: {"wall_s": med(n, "wall_s"), "peak_bytes": med(n, "peak_bytes")} for n in runs}
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    print(report(res, a.markdown))


def report(res, markdown):
    m = res["median"]
    fl = m.get("floor", {})
    rows = []
    for name in ("floor", "streamed", "in-memory", "validated", "reconstruct", "huge-floor", "huge"):
        if name not in m:
            continue
        rcs = sorted({r["rc"] for r in res["runs"][name]}, key=str)
        base = m.get("huge-floor" if name.startswith("huge") else "floor", {})
        w, p = m[name]["wall_s"], m[name]["peak_bytes"]
        tw = f"{w / base['wall_s']:.2f}x" if w and base.get("wall_s") else "-"
        tp = f"{p / base['peak_bytes']:.2f}x" if p and base.get("peak_bytes") else "-"
        rows.append((name, ",".join(map(str, rcs)), len(res["runs"][name]), "-" if w is None else f"{w:.1f}", tw,
                     "-" if p is None else f"{p / 1e9:.2f}", tp))
    head = ("run", "exit", "n", "wall s", "/ floor", "peak GB", "/ floor")
    lines = []
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    else:
        lines.append("  ".join(f"{h:>11s}" for h in head))
        lines += ["  ".join(f"{str(c):>11s}" for c in r) for r in rows]
    lines.append("")
    lines.append(f"model: {res['layers']} x MatMul {res['width']}^2 float32, {res['model_bytes'] / 1e9:.2f} GB external "
                 f"data; streamed: {res.get('streamed_report')}")
    lines.append(f"zeros {res['zeros']} of {res['weights']} (expected round(0.9 N) = {res['zeros_expected']}: "
                 f"{'exact' if res['zeros'] == res['zeros_expected'] else 'MISMATCH'}; report {res['report_zeros']}); "
                 f"streamed == in-memory output: {res['identical']}; inputs unchanged: {res['inputs_unchanged']}")
    if "validated_outputs" in res:
        lines.append(f"validated: providers {res.get('validated_providers')}, outputs "
                     f"{json.dumps(res['validated_outputs'])[:300]}")
    if "reconstruction" in res:
        r = res["reconstruction"]
        lines.append(f"reconstruct: {r['time_s']:.1f} s in reconstruction, peak RSS (report) "
                     f"{gb(r['peak_rss_bytes']):.2f} GB, zeros {res.get('reconstruct_zeros')} "
                     f"({'exact' if res.get('reconstruct_zeros') == res['zeros_expected'] else 'MISMATCH'})")
        for l in r["layers"]:
            lines.append(f"  {l['name']}: {l['method']}, rows {l['rows']}, blocks {l['row_blocks']}, moments "
                         f"{gb(l['moments_bytes']) if l['moments_bytes'] else 0:.2f} GB, rel. error "
                         f"{l['rel_error_before']:.3g} -> {l['rel_error_after']:.3g}, {l['time_s']:.1f} s"
                         + (f" (fallback: {l['fallback']})" if l.get("fallback") else ""))
    if "huge_bytes" in res:
        lines.append(f"huge: one tensor of {res['huge_bytes'] / 2 ** 30:.3f} GiB; zeros {res.get('huge_zeros')} of "
                     f"{res.get('huge_weights')} (expected {res.get('huge_expected')}: "
                     f"{'exact' if res.get('huge_zeros') == res.get('huge_expected') else 'MISMATCH'})")
    for name, rs in res["runs"].items():
        for r in rs:
            if r["rc"] != 0 and r["stderr"]:
                lines.append(f"{name} exit {r['rc']}: {r['stderr'][:300]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
