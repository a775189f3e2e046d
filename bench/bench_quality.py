"""Benchmark: test accuracy of every allocation with and without calibrated reconstruction (issue 9).

Sample MLP and sample CNN (and the torch-exported CNN), sparsity 80/90/95/98 %; calibration = the first 128
samples of the test .npz, evaluation = the remaining samples (disjoint). Also the reconstruction time as a ratio to
the plain prune of the same model in the same run (in-process, median of --repeat), and optionally (--big) the
30 M-weight model of bench_prune.py with 128 random calibration samples: plain prune and prune + reconstruction
(max_rows 2048 and the default) alternating in fresh processes, median of --repeat, time and peak RSS as ratios.

    python bench/bench_quality.py [--repeat 3] [--big] [--ablation] [--peers] [--skip-quality] [--heldout]

--heldout: only issue 14's protocol (LAMP at 90/95/98 %, class-balanced calibration of 13 per class, every other
sample evaluating), printed as one table row per sample model.

--peers: onnxsim 0.8.1's calibrated pruners (`sparsegpt`, `wanda` per layer and with global_sparsity) at equal
sparsity on the sample MLP and CNN, same calibration (first 128 samples) and evaluation (the rest); skipped with a
message when onnxsim is not installed (`pip install onnxsim==0.8.1`, part of the `bench` extra).
"""
import argparse
import logging
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from onnxprune import prune  # noqa: E402

MODELS = {"mlp_gemm": ("mlp_gemm.onnx", "digits_mlp_test.npz"), "cnn": ("cnn.onnx", "digits_cnn_test.npz"),
          "cnn_torch": ("cnn_torch.onnx", "digits_cnn_test.npz")}
METHODS = ["lamp", "global", "global-mt", "uniform", "uniform+", "erk", "igq"]
SPARSITIES = [0.8, 0.9, 0.95, 0.98]
CAL = 128


def accuracy(model, x, y):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = sess.run(None, {name: x})[0]
    del sess
    return float(np.mean(out.argmax(axis=1) == y))


def quality(repeat):
    lines = []
    ratios = []
    for key, (mfile, dfile) in MODELS.items():
        model = onnx.load(os.path.join(ROOT, "sample_models", mfile))
        data = np.load(os.path.join(ROOT, "sample_models", dfile))
        x, y = data["x"], data["y"]
        cal = [{"x": x[i:min(i + 32, CAL)]} for i in range(0, CAL, 32)]
        xe, ye = x[CAL:], y[CAL:]
        dense = accuracy(model, xe, ye)
        lines += [f"**{mfile}** ({sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) > 1)} "
                  f"weights), dense accuracy on the {len(ye)} evaluation samples: **{dense:.3f}**", "",
                  "| method | " + " | ".join(f"{int(s * 100)} % plain → reconstructed" for s in SPARSITIES) + " |",
                  "|---|" + "---|" * len(SPARSITIES)]
        for method in METHODS:
            cells = []
            for s in SPARSITIES:
                try:
                    plain, _ = prune(model, s, method)
                    rec, rep = prune(model, s, method, reconstruct=True, calibration=cal)
                except Exception as exc:  # e.g. uniform+ is for conv nets only
                    cells.append(f"n/a ({type(exc).__name__})")
                    continue
                a, b = accuracy(plain, xe, ye), accuracy(rec, xe, ye)
                cells.append(f"{a:.3f} → **{b:.3f}**")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
        lines.append("")
        # speed: plain prune vs prune + reconstruction, same model, same process, median of `repeat`
        tp, tr = [], []
        for _ in range(repeat):
            t = time.perf_counter()
            prune(model, 0.95, "lamp")
            tp.append(time.perf_counter() - t)
            t = time.perf_counter()
            prune(model, 0.95, "lamp", reconstruct=True, calibration=cal)
            tr.append(time.perf_counter() - t)
        ratios.append((mfile, statistics.median(tp), statistics.median(tr)))
    lines += [f"Time at 95 % LAMP, in-process, median of {repeat} (plain prune vs prune + reconstruction, "
              "128 samples):",
              "", "| model | plain s | reconstructed s | ratio |", "|---|---|---|---|"]
    lines += [f"| {m} | {a:.3f} | {b:.3f} | {b / a:.0f}x |" for m, a, b in ratios]
    return lines


HELDOUT_SPARSITIES = [0.9, 0.95, 0.98]


def balanced_split(y, per_class):
    """Indices of a class-balanced calibration set (the first ``per_class`` samples of each class, in file order)
    and of every other sample (the evaluation set): disjoint."""
    cal = np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y)]))
    rest = np.setdiff1d(np.arange(len(y)), cal)
    return cal, rest


def heldout():
    """Issue 14's protocol: LAMP at 90/95/98 %, calibration = a class-balanced 128 (13 per class of 10, minus the
    remainder: the first 13 of each class, so 130), evaluation = every other sample of the test file."""
    lines = ["", "Held-out protocol (LAMP; calibration: the first 13 samples of each class, 130 in all, in batches of "
             "32; evaluation: the other samples; accuracy):", "",
             "| model | dense | " + " | ".join(f"{int(s * 100)} % plain → reconstructed (gap to dense)"
                                              for s in HELDOUT_SPARSITIES) + " |",
             "|---|---|" + "---|" * len(HELDOUT_SPARSITIES)]
    for key, (mfile, dfile) in MODELS.items():
        model = onnx.load(os.path.join(ROOT, "sample_models", mfile))
        data = np.load(os.path.join(ROOT, "sample_models", dfile))
        x, y = data["x"], data["y"]
        ci, ei = balanced_split(y, 13)
        xc, xe, ye = x[ci], x[ei], y[ei]
        cal = [{"x": xc[i:i + 32]} for i in range(0, len(xc), 32)]
        dense = accuracy(model, xe, ye)
        cells = []
        for s in HELDOUT_SPARSITIES:
            a = accuracy(prune(model, s, "lamp")[0], xe, ye)
            b = accuracy(prune(model, s, "lamp", reconstruct=True, calibration=cal)[0], xe, ye)
            cells.append(f"{a:.3f} → **{b:.3f}** ({b - dense:+.3f})")
        lines.append(f"| {mfile} | {dense:.3f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


VARIANTS = {"ADMM mask + refit + mean/var (default)": {}, "ADMM mask + refit, no correction": {"correction": "none"},
            "one-shot OBS mask + refit + mean/var": {"reconstruct_mask": "obs"},
            "LAMP's own mask + refit + mean/var": {"reconstruct_mask": "plain"},
            "damping 0.01": {"damping": 0.01}, "damping 0.1": {"damping": 0.1}}


def ablation():
    lines = ["", "Ablation, LAMP allocation (accuracy on the evaluation samples):", "",
             "| model | variant | " + " | ".join(f"{int(s * 100)} %" for s in SPARSITIES) + " |",
             "|---|---|" + "---|" * len(SPARSITIES)]
    for key in ("mlp_gemm", "cnn"):
        mfile, dfile = MODELS[key]
        model = onnx.load(os.path.join(ROOT, "sample_models", mfile))
        data = np.load(os.path.join(ROOT, "sample_models", dfile))
        x, y = data["x"], data["y"]
        cal = [{"x": x[i:min(i + 32, CAL)]} for i in range(0, CAL, 32)]
        for name, kw in VARIANTS.items():
            accs = [accuracy(prune(model, s, "lamp", reconstruct=True, calibration=cal, **kw)[0], x[CAL:], y[CAL:])
                    for s in SPARSITIES]
            lines.append(f"| {mfile} | {name} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
            print(lines[-1], flush=True)
    return lines


BIG = """
import sys, time, numpy as np, onnx, resource
sys.path.insert(0, {root!r})
from onnxprune import prune
m = onnx.load({path!r})
rng = np.random.default_rng(0)
cal = [{{"x": rng.standard_normal((1, 256, 8, 8)).astype(np.float32)}} for _ in range(128)]
t = time.perf_counter()
kw = dict(reconstruct=True, calibration=cal, reconstruct_max_rows={rows}) if {rec} else dict()
out, rep = prune(m, 0.95, "lamp", **kw)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
"""
BIG_ROWS = 2048  # sample rows per layer: every 4th conv output position of the 128 calibration inputs


def big_run(rec, rows=BIG_ROWS, root=ROOT):
    """(prune seconds without the load, peak RSS MiB) of one fresh process."""
    sys.path.insert(0, HERE)
    import bench_prune
    code = BIG.format(root=root, path=bench_prune.MODEL, rec=rec, rows=rows)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return [float(v) for v in out.split()[-2:]]


def big(repeat):
    """The 30 M-weight model: plain prune and prune + reconstruction alternating in fresh processes, medians."""
    sys.path.insert(0, HERE)
    import bench_prune
    if not os.path.exists(bench_prune.MODEL):
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import bench_prune as b; "
                        "b.build_model(b.MODEL)"], check=True)
    runs = {"plain prune": [], f"prune + reconstruction (max_rows {BIG_ROWS})": [],
            "prune + reconstruction (default max_rows 32768)": []}
    for _ in range(repeat):
        runs["plain prune"].append(big_run(False))
        runs[f"prune + reconstruction (max_rows {BIG_ROWS})"].append(big_run(True))
        runs["prune + reconstruction (default max_rows 32768)"].append(big_run(True, 32768))
        print({k: v[-1] for k, v in runs.items()}, flush=True)
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
    tp, mp = med["plain prune"]
    lines = ["", f"30 M-weight model of bench_prune.py, 95 % LAMP, 128 random calibration samples (batch 1), fresh "
             f"processes alternating, median of {repeat}, in-process prune time (load excluded):", "",
             "| run | time s | time / plain | peak RSS MiB | RSS / plain |", "|---|---|---|---|---|"]
    for k, (t, mem) in med.items():
        lines.append(f"| {k} | {t:.2f} | {t / tp:.0f}x | {mem:.0f} | {mem / mp:.2f}x |")
    return lines


def _sparsity(model):
    """Achieved sparsity over every weight of rank >= 2 (the tensors both tools prune)."""
    from onnx import numpy_helper
    n = z = 0
    for t in model.graph.initializer:
        if len(t.dims) > 1:
            a = numpy_helper.to_array(t)
            n += a.size
            z += a.size - np.count_nonzero(a)
    return z / max(n, 1)


PEER_MODELS = ("mlp_gemm", "cnn")


def peers():
    """onnxprune (LAMP + reconstruction) against onnxsim's sparsegpt / wanda at equal sparsity."""
    try:
        import onnxsim
        from onnxsim import pruning as osp
    except ImportError:
        msg = "onnxsim not installed: peer comparison skipped (pip install onnxsim==0.8.1)"
        print(msg)
        return ["", msg]
    version = getattr(onnxsim, "__version__", "?")
    contenders = {
        "onnxsim sparsegpt": lambda m, s, cal: osp.apply_sparsegpt_pruning(m, calibration_data=cal, sparsity=s),
        "onnxsim wanda": lambda m, s, cal: osp.apply_wanda_pruning(m, calibration_data=cal, sparsity=s),
        "onnxsim wanda (global)": lambda m, s, cal: osp.apply_wanda_pruning(m, calibration_data=cal, sparsity=s,
                                                                            global_sparsity=True),
        "onnxprune lamp, one-shot": lambda m, s, cal: prune(m, s, "lamp")[0],
        "onnxprune lamp + reconstruction": lambda m, s, cal: prune(m, s, "lamp", reconstruct=True,
                                                                   calibration=cal)[0],
    }
    lines = ["", f"Peers: onnxsim {version} at equal sparsity, calibration = first {CAL} samples, evaluation = the "
             "rest (accuracy; achieved sparsity over all rank >= 2 weights in parentheses):", "",
             "| model | contender | " + " | ".join(f"{int(s * 100)} %" for s in SPARSITIES) + " |",
             "|---|---|" + "---|" * len(SPARSITIES)]
    for key in PEER_MODELS:
        mfile, dfile = MODELS[key]
        path = os.path.join(ROOT, "sample_models", mfile)
        data = np.load(os.path.join(ROOT, "sample_models", dfile))
        x, y = data["x"], data["y"]
        cal = [{"x": x[i:min(i + 32, CAL)]} for i in range(0, CAL, 32)]
        xe, ye = x[CAL:], y[CAL:]
        best = {}
        for name, fn in contenders.items():
            cells = []
            for s in SPARSITIES:
                try:
                    out = fn(onnx.load(path), s, [dict(b) for b in cal])
                    a, sp = accuracy(out, xe, ye), _sparsity(out)
                    cells.append(f"{a:.3f} ({sp * 100:.1f} %)")
                    if name.startswith("onnxsim"):
                        best[s] = max(best.get(s, 0.0), a)
                    elif "reconstruction" in name:
                        best[("ours", s)] = a
                except Exception as exc:  # noqa: BLE001 - a peer failing is a result too
                    cells.append(f"failed ({type(exc).__name__}: {str(exc)[:60]})")
            lines.append(f"| {mfile} | {name} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
        margin = [f"{int(s * 100)} %: {best.get(('ours', s), float('nan')) - best.get(s, float('nan')):+.3f}"
                  for s in SPARSITIES]
        lines.append(f"| {mfile} | margin over onnxsim's best | " + " | ".join(m.split(': ')[1] for m in margin)
                     + " |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--peers", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--heldout", action="store_true", help="only the held-out protocol (issue 14)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    if args.heldout:
        print("\n".join(heldout()))
        return
    lines = [] if args.skip_quality else quality(args.repeat)
    if args.peers:
        lines += peers()
    if args.ablation:
        lines += ablation()
    if args.big:
        lines += big(args.repeat)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
