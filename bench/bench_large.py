"""Benchmark: models larger than memory (external data), pruned and reconstructed in bounded memory (issue 18).

Generates under bench/.real/large/ (kept between runs; --regenerate rebuilds; --quick uses bench/.real/large/quick/),
never holding more than one block of one weight in memory:
  big.onnx    x [N, W] -> MatMul W x W -> Relu -> ... -> y (--layers, default 5; W = --width, default 11000: 5 x 484 MB
              = 2.42 GB of float32 in one external data file, offsets aligned to 4096), weights N(0, 1/W), seeded
  huge.onnx   one MatMul whose single weight is --huge x --huge float32 (default 23200: 2.15 GB > 2^31 bytes)
  calib.npz   32 calibration samples for x, [32, W] float32
Each measurement runs in a fresh process under /usr/bin/time (wall seconds, peak RSS; os.wait4 where that is
missing) after the files were read once, so every run sees the same warm page cache (dropping it needs root).
The floor (onnx.load + onnx.save with external data: the least any tool that rewrites the model does) runs
interleaved with the streamed prune, --repeat times, medians reported; the other runs once:
  floor       python -c "onnx.save(onnx.load(big.onnx), ..., save_as_external_data=True)"
  streamed    onnxprune big.onnx -s 0.9 --no-validate              (default: external data >= 256M streams)
  in-memory   onnxprune big.onnx -s 0.9 --no-validate --stream-above never   (its output compared byte for byte)
  validated   onnxprune big.onnx -s 0.9                              (ONNX Runtime runs both models, synthetic x)
  reconstruct onnxprune big.onnx -s 0.9 --no-validate --reconstruct --calibration calib.npz  (--reconstruct-timeout)
  huge-floor  the floor on huge.onnx, and huge: onnxprune huge.onnx -s 0.9 --no-validate
Checks: zeros counted block by block from each output data file = round(0.9 x weights) exactly (and the report's
count); the streamed and in-memory outputs identical (model and data file, sha256); the inputs' sha256 unchanged
after all runs. Targets (issue 18): streamed --no-validate peak <= 1.5 GB and <= 0.5x the floor's, time <= 1.5x.

    python bench/bench_large.py [--width 11000] [--layers 5] [--huge 23200] [--repeat 3] [--quick]
                                [--skip-reconstruct] [--reconstruct-timeout 1800] [--markdown] [--json FILE]
    python bench/bench_large.py --from-json FILE [--markdown]      # print an earlier run's report again
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
TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
SPARSITY = 0.9
GENERATED = ("big.onnx", "big.onnx.data", "huge.onnx", "huge.onnx.data", "calib.npz", "meta.json")
TARGET_PEAK, TARGET_PEAK_RATIO, TARGET_TIME_RATIO = 1.5e9, 0.5, 1.5


def _external(name, dims, location, offset):
    t = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims))
    t.data_location = TensorProto.EXTERNAL
    length = int(np.prod(dims)) * 4
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t, length


def write_chain(path, width, layers, seed=0):
    """MatMul chain with every weight written straight into one data file, a block of rows at a time."""
    location = os.path.basename(path) + ".data"
    inits, nodes, prev, offset = [], [], "x", 0
    with open(os.path.join(os.path.dirname(path), location), "wb") as fh:
        for k in range(layers):
            rng = np.random.default_rng(seed + k)
            for r in range(0, width, 1024):  # row blocks: memory stays a few tens of MB whatever the width
                rows = min(1024, width - r)
                block = rng.standard_normal((rows, width), dtype=np.float32) * np.float32(1 / np.sqrt(width))
                fh.write(block.tobytes())
                del block
            t, length = _external(f"w{k}", (width, width), location, offset)
            offset += length
            pad = (-offset) % 4096
            fh.write(b"\0" * pad)
            offset += pad
            inits.append(t)
            out = f"h{k}" if k < layers - 1 else "y"
            nodes.append(helper.make_node("MatMul", [prev, f"w{k}"], [out], name=f"mm{k}"))
            if k < layers - 1:
                nodes.append(helper.make_node("Relu", [out], [f"r{k}"], name=f"relu{k}"))
                prev = f"r{k}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    with open(path, "wb") as fh:
        fh.write(m.SerializeToString())


def generate(d, width, layers, huge, regenerate):
    """The inputs under ``d``: reused when meta.json matches the sizes, else (or with --regenerate) rebuilt."""
    os.makedirs(d, exist_ok=True)
    big, hg, cal = os.path.join(d, "big.onnx"), os.path.join(d, "huge.onnx"), os.path.join(d, "calib.npz")
    meta = os.path.join(d, "meta.json")
    want = {"width": width, "layers": layers, "huge": huge}
    have = json.load(open(meta)) if os.path.exists(meta) else None
    if regenerate or have != want:
        for p in GENERATED:  # only what this script writes (a log or results beside it stay)
            if os.path.isfile(os.path.join(d, p)):
                os.remove(os.path.join(d, p))
        t = time.perf_counter()
        write_chain(big, width, layers)
        if huge:
            write_chain(hg, huge, 1, seed=100)
        np.savez(cal, x=np.random.default_rng(7).standard_normal((32, width)).astype(np.float32))
        json.dump(want, open(meta, "w"))
        print(f"generated {d} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return big, (hg if huge else None), cal


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def model_files(model):
    d = os.path.dirname(model)
    return [os.path.join(d, p) for p in sorted(os.listdir(d))
            if p.startswith(os.path.basename(model)) and os.path.isfile(os.path.join(d, p))]


def inputs_digest(model):
    return {os.path.basename(p): sha(p) for p in model_files(model)}


def warm(model):
    """Read the model and its data once: every timed run then starts from the same warm page cache."""
    for p in model_files(model):
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def timed(cmd, timeout):
    """(rc, wall s, peak RSS bytes, stderr tail) of ``cmd`` in a fresh process (rc None: timed out)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    t = time.perf_counter()
    if TIME:
        try:
            p = subprocess.run([TIME, "-f", "BENCH %e %M"] + cmd, capture_output=True, text=True, timeout=timeout,
                               cwd=ROOT, env=env)
        except subprocess.TimeoutExpired:
            return None, time.perf_counter() - t, None, f"timed out after {timeout} s"
        lines = p.stderr.strip().splitlines()
        stat = [ln for ln in lines if ln.startswith("BENCH ")]
        wall, rss = (float(stat[-1].split()[1]), int(stat[-1].split()[2]) * 1024) if stat else (None, None)
        rest = [ln for ln in lines if not ln.startswith("BENCH ") and not ln.startswith("Command ")]
        return p.returncode, wall, rss, " | ".join(rest[-3:])
    # no /usr/bin/time: the child's own rusage from wait4 (ru_maxrss in KiB on Linux)
    err_path = os.path.join(ROOT, "bench", ".real", f".stderr-{os.getpid()}")
    with open(err_path, "w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env)
        deadline = t + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                return None, time.perf_counter() - t, None, f"timed out after {timeout} s"
            time.sleep(0.05)
        wall = time.perf_counter() - t
        err.seek(0)
        lines = err.read().strip().splitlines()
    os.remove(err_path)
    return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss * 1024, " | ".join(lines[-3:])


def floor_cmd(model, out):
    code = ("import onnx,sys; m=onnx.load(sys.argv[1]); "
            "onnx.save(m, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True, "
            "location='floor.onnx.data', size_threshold=1024)")
    return [PY, "-c", code, model, out]


def prune_cmd(model, out, *flags, report=None):
    cmd = ONNXPRUNE + [model, "-s", str(SPARSITY), *flags, "-q", "-o", out]
    return cmd + (["--report", report] if report else [])


def fresh(d):
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def count_zeros(model_path):
    """(zeros, values) over the model's float initializers (all prunable here), read from its external data
    2^24 values at a time (64 MB), so that counting never holds a whole tensor."""
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
    ap.add_argument("--width", type=int, default=11000, help="W of big.onnx's W x W weights")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--huge", type=int, default=23200, help="width of the single-tensor model (0: skip)")
    ap.add_argument("--repeat", type=int, default=3, help="floor/streamed pairs (the other runs: once)")
    ap.add_argument("--quick", action="store_true",
                    help="width 2000, 3 layers, no huge tensor, 1 repeat, --stream-above 0, in DIR/quick")
    ap.add_argument("--skip-reconstruct", action="store_true")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds for each run but the reconstruction")
    ap.add_argument("--reconstruct-timeout", type=int, default=1800)
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--dir", default=os.path.join(HERE, ".real", "large"))
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", help="write the raw figures here")
    ap.add_argument("--from-json", metavar="FILE", help="only print the report of an earlier --json FILE")
    a = ap.parse_args()
    if a.from_json:
        print(report(json.load(open(a.from_json)), a.markdown))
        return
    if a.quick:  # small (seconds), and streamed whatever its size
        a.width, a.layers, a.huge, a.repeat = 2000, 3, 0, 1
        a.dir = os.path.join(a.dir, "quick")
        ONNXPRUNE.extend(["--stream-above", "0"])
    big, huge, cal = generate(a.dir, a.width, a.layers, a.huge, a.regenerate)
    work = os.path.join(a.dir, "out")
    shutil.rmtree(work, ignore_errors=True)
    before = {"big": inputs_digest(big), **({"huge": inputs_digest(huge)} if huge else {})}
    res = {"width": a.width, "layers": a.layers, "sparsity": SPARSITY, "model_bytes": os.path.getsize(big + ".data"),
           "cpus": os.cpu_count(), "timer": TIME or "os.wait4", "quick": a.quick, "runs": {}}
    runs = res["runs"]

    def record(name, rc, wall, rss, err):
        runs.setdefault(name, []).append({"rc": rc, "wall_s": wall, "peak_bytes": rss, "stderr": err})
        print(f"{name:12s} rc={rc} {wall if wall is None else round(wall, 2)} s "
              f"{'-' if rss is None else round(rss / 1e9, 3)} GB {err[:300]}", file=sys.stderr, flush=True)

    warm(big)
    streamed = os.path.join(work, "streamed")
    for i in range(a.repeat):  # interleaved pairs, the order alternating: floor/streamed, streamed/floor, ...
        pair = [("floor", lambda: floor_cmd(big, os.path.join(fresh(os.path.join(work, "floor")), "floor.onnx"))),
                ("streamed", lambda: prune_cmd(big, os.path.join(fresh(streamed), "m.onnx"), "--no-validate",
                                               report=os.path.join(work, "streamed.json")))]
        for name, cmd in pair[::-1] if i % 2 else pair:
            record(name, *timed(cmd(), a.timeout))
            shutil.rmtree(os.path.join(work, "floor"), ignore_errors=True)
    ok = runs["streamed"][-1]["rc"] == 0
    if ok:
        zeros, total = count_zeros(os.path.join(streamed, "m.onnx"))
        res["zeros"], res["weights"], res["zeros_expected"] = zeros, total, int(round(SPARSITY * total))
        rep = json.load(open(os.path.join(work, "streamed.json")))
        res["streamed_report"] = rep["options"].get("streamed")
        res["report_zeros"] = rep["totals"]["zeros_after"]
        res["report_params"] = rep["totals"].get("params")
        res["report_timings"] = rep.get("timings_s")
    mem = fresh(os.path.join(work, "memory"))
    record("in-memory", *timed(ONNXPRUNE[:1] + [big, "-s", str(SPARSITY), "--no-validate", "-q", "--stream-above",
                                               "never", "-o", os.path.join(mem, "m.onnx")], a.timeout))
    if ok and runs["in-memory"][-1]["rc"] == 0:
        a_tree, b_tree = tree(streamed), tree(mem)
        res["identical"] = a_tree == b_tree
        res["output_files"] = {"streamed": a_tree, "in-memory": b_tree}
    shutil.rmtree(mem, ignore_errors=True)
    shutil.rmtree(streamed, ignore_errors=True)
    out = fresh(os.path.join(work, "validated"))
    record("validated", *timed(prune_cmd(big, os.path.join(out, "m.onnx"),
                                         report=os.path.join(work, "validated.json")), a.timeout))
    if runs["validated"][-1]["rc"] == 0 and os.path.exists(os.path.join(work, "validated.json")):
        v = json.load(open(os.path.join(work, "validated.json")))
        res["validated_outputs"] = v.get("validation", {}).get("outputs")
        res["validated_providers"] = v.get("validation", {}).get("providers")
        res["validated_zeros"] = count_zeros(os.path.join(out, "m.onnx"))[0]
    shutil.rmtree(out, ignore_errors=True)
    if not a.skip_reconstruct:
        out = fresh(os.path.join(work, "reconstruct"))
        record("reconstruct", *timed(prune_cmd(big, os.path.join(out, "m.onnx"), "--no-validate", "--reconstruct",
                                               "--calibration", cal, report=os.path.join(work, "reconstruct.json")),
                                     a.reconstruct_timeout))
        if runs["reconstruct"][-1]["rc"] == 0:
            r = json.load(open(os.path.join(work, "reconstruct.json")))["reconstruction"]
            res["reconstruction"] = {"time_s": r.get("time_s"), "peak_rss_bytes": r.get("peak_rss_bytes"),
                                     "layers": [{k: l.get(k) for k in ("name", "method", "rows", "row_blocks",
                                                                       "moments_bytes", "rel_error_before",
                                                                       "rel_error_after", "time_s", "fallback")}
                                                for l in r.get("layers", [])],
                                     "other": {k: v for k, v in r.items() if k not in ("layers",)
                                               and not isinstance(v, (list, dict))}}
            res["reconstruct_zeros"] = count_zeros(os.path.join(out, "m.onnx"))[0]
        shutil.rmtree(out, ignore_errors=True)
    if huge:
        warm(huge)
        out = fresh(os.path.join(work, "floor"))
        record("huge-floor", *timed(floor_cmd(huge, os.path.join(out, "floor.onnx")), a.timeout))
        shutil.rmtree(out, ignore_errors=True)
        out = fresh(os.path.join(work, "huge"))
        record("huge", *timed(prune_cmd(huge, os.path.join(out, "m.onnx"), "--no-validate"), a.timeout))
        if runs["huge"][-1]["rc"] == 0:
            z, n = count_zeros(os.path.join(out, "m.onnx"))
            res["huge_zeros"], res["huge_weights"], res["huge_expected"] = z, n, int(round(SPARSITY * n))
        res["huge_bytes"] = os.path.getsize(huge + ".data")
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    after = {"big": inputs_digest(big), **({"huge": inputs_digest(huge)} if huge else {})}
    res["inputs_unchanged"] = before == after
    res["input_sha256"] = after

    def med(name, key):
        vals = [r[key] for r in runs.get(name, []) if r[key] is not None and r["rc"] == 0]
        return statistics.median(vals) if vals else None
    res["median"] = {n: {"wall_s": med(n, "wall_s"), "peak_bytes": med(n, "peak_bytes")} for n in runs}
    fl, st = res["median"].get("floor", {}), res["median"].get("streamed", {})
    if fl.get("wall_s") and st.get("wall_s") and fl.get("peak_bytes") and st.get("peak_bytes"):
        res["targets"] = {"peak_abs": st["peak_bytes"] <= TARGET_PEAK,
                          "peak_ratio": st["peak_bytes"] / fl["peak_bytes"] <= TARGET_PEAK_RATIO,
                          "time_ratio": st["wall_s"] / fl["wall_s"] <= TARGET_TIME_RATIO}
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    print(report(res, a.markdown))


LABELS = {"floor": "floor: `onnx.load` + `onnx.save(..., save_as_external_data=True)`",
          "streamed": "`-s 0.9 --no-validate` (streamed: default `--stream-above 256M`)",
          "in-memory": "`-s 0.9 --no-validate --stream-above never` (in-memory path)",
          "validated": "`-s 0.9` (validated, synthetic inputs)",
          "reconstruct": "`-s 0.9 --no-validate --reconstruct --calibration calib.npz`",
          "huge-floor": "huge tensor: floor (load + save)",
          "huge": "huge tensor: `-s 0.9 --no-validate`"}


def yes(b):
    return "n/a" if b is None else ("yes" if b else "NO")


def report(res, markdown):
    m = res["median"]
    rows = []
    for name in LABELS:
        if name not in m:
            continue
        rcs = sorted({r["rc"] for r in res["runs"][name]}, key=str)
        base = m.get("huge-floor" if name.startswith("huge") else "floor", {})
        w, p = m[name]["wall_s"], m[name]["peak_bytes"]
        tw = f"{w / base['wall_s']:.2f}x" if w and base.get("wall_s") else "-"
        tp = f"{p / base['peak_bytes']:.2f}x" if p and base.get("peak_bytes") else "-"
        rows.append((LABELS[name] if markdown else name, ",".join(map(str, rcs)), len(res["runs"][name]),
                     "-" if w is None else f"{w:.1f}", tw, "-" if p is None else f"{p / 1e9:.2f}", tp))
    head = ("run", "exit", "n", "wall s", "time / floor", "peak GB", "peak / floor")
    lines = []
    if markdown:
        lines += [f"## Models larger than memory (issue 18; `python bench/bench_large.py --markdown"
                  f"{' --quick' if res.get('quick') else ''}`, {res['cpus']} CPUs)", "",
                  f"Model: x [N, {res['width']}] -> {res['layers']} x MatMul {res['width']} x {res['width']} float32 "
                  f"(Relu between), {res['model_bytes'] / 1e9:.2f} GB in one external data file; sparsity "
                  f"{res['sparsity']}. Fresh process per run ({res['timer']}: wall, peak RSS), files read once "
                  f"beforehand (warm page cache alike); floor and streamed interleaved, medians of n; "
                  f"ratios to the floor of the same model.", ""]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    else:
        lines.append(f"{head[0]:12s}" + "".join(f"{h:>14s}" for h in head[1:]))
        lines += [f"{r[0]:12s}" + "".join(f"{str(c):>14s}" for c in r[1:]) for r in rows]
    lines.append("")
    b = "- " if markdown else ""
    fl, st = m.get("floor", {}), m.get("streamed", {})
    t = res.get("targets")
    if t:
        lines.append(f"{b}Targets (streamed `--no-validate`): peak <= {TARGET_PEAK / 1e9:.1f} GB: "
                     f"{st['peak_bytes'] / 1e9:.2f} GB ({yes(t['peak_abs'])}); peak <= {TARGET_PEAK_RATIO}x floor: "
                     f"{st['peak_bytes'] / fl['peak_bytes']:.2f}x ({yes(t['peak_ratio'])}); time <= "
                     f"{TARGET_TIME_RATIO}x floor: {st['wall_s'] / fl['wall_s']:.2f}x ({yes(t['time_ratio'])})")
    exact = res.get("zeros") == res.get("zeros_expected") == res.get("report_zeros") if "zeros" in res else None
    lines.append(f"{b}Checks: streamed == in-memory output (sha256 of model and data file): "
                 f"{yes(res.get('identical'))}; zero counts exact: {yes(exact)}; inputs unchanged: "
                 f"{yes(res['inputs_unchanged'])}")
    if "zeros" in res:
        lines.append(f"{b}Streamed: zeros {res['zeros']:,} of {res['weights']:,} counted block by block from the output "
                     f"data file (expected round({res['sparsity']} N) = {res['zeros_expected']:,}; report "
                     f"{res['report_zeros']:,}); report `options.streamed`: {json.dumps(res.get('streamed_report'))}")
    if res.get("report_timings"):
        tm = {k: round(v, 2) if isinstance(v, float) else v for k, v in res["report_timings"].items()}
        lines.append(f"{b}Streamed run's own timings (report, last run): {json.dumps(tm)}")
    if "validated_outputs" in res:
        outs = "; ".join(f"{o.get('name')}: {o.get('metric')} {o.get('value')} (dense {o.get('dense_value')}), "
                         f"max rel. error {o.get('max_rel_error', float('nan')):.3g}, gate {o.get('passed')}"
                         for o in res["validated_outputs"] or [])
        lines.append(f"{b}Validated: providers {res.get('validated_providers')}, zeros {res.get('validated_zeros'):,} "
                     f"({'exact' if res.get('validated_zeros') == res.get('zeros_expected') else 'MISMATCH'}); {outs} "
                     f"(no bound given: random weights at 90 % change the outputs, only the run's cost is measured)")
    if "reconstruction" in res:
        r = res["reconstruction"]
        lines.append(f"{b}Reconstruct: {r['time_s'] or 0:.1f} s in reconstruction, report `peak_rss_bytes` "
                     f"{gb(r['peak_rss_bytes']) or 0:.2f} GB, zeros {res.get('reconstruct_zeros'):,} "
                     f"({'exact' if res.get('reconstruct_zeros') == res.get('zeros_expected') else 'MISMATCH'})")
        for l in r["layers"]:
            lines.append(f"{'  - ' if markdown else '  '}{l['name']}: {l['method']}, rows {l['rows']}, blocks "
                         f"{l['row_blocks']}, moments {gb(l['moments_bytes']) if l['moments_bytes'] else 0:.2f} GB, "
                         f"rel. error {l['rel_error_before']:.3g} -> {l['rel_error_after']:.3g}, {l['time_s']:.1f} s"
                         + (f" (fallback: {l['fallback']})" if l.get("fallback") else ""))
    if "huge_bytes" in res:
        lines.append(f"{b}Huge: one tensor of {res['huge_bytes'] / 2 ** 30:.3f} GiB ({res['huge_bytes']:,} bytes); "
                     f"zeros {res.get('huge_zeros', 0):,} of {res.get('huge_weights', 0):,} (expected round({res['sparsity']} N) = "
                     f"{res.get('huge_expected', 0):,}: "
                     f"{'exact' if res.get('huge_zeros') == res.get('huge_expected') else 'MISMATCH'})")
    for name, rs in res["runs"].items():
        for r in rs:
            if r["rc"] != 0:
                lines.append(f"{b}{name} exit {r['rc']}: {r['stderr'][:500]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
