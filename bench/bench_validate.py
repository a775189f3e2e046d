"""Benchmark: onnxprune's evaluation loop vs a bare ONNX Runtime loop over the same batches, and the time of a
--sparsity auto search on the sample CNN.

    python bench/bench_validate.py [--repeat 5]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from onnxprune import prune_loaded, PruneConfig  # noqa: E402
from onnxprune.data import Dataset  # noqa: E402
from onnxprune.io import load_model, save_model  # noqa: E402
from onnxprune.validate import Validator, _run_all, make_session  # noqa: E402

CNN = os.path.join(ROOT, "sample_models", "cnn.onnx")
DATA = os.path.join(ROOT, "sample_models", "digits_cnn_test.npz")


def compare_loops(model, ds, validator, repeat):
    """Median seconds of (bare ORT loop, onnxprune's loop, its metrics) over the dataset's batches."""
    import onnxruntime as ort
    batches = ds.batches
    bare, loop, metrics = [], [], []

    def run_bare():  # ORT with its default session options, nothing else
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        sess.run(None, batches[0])
        t = time.perf_counter()
        for feed in batches:
            sess.run(None, feed)
        bare.append(time.perf_counter() - t)
        del sess

    def run_ours():  # what Validator.compare does once its session exists: run, release the session, metrics
        sess = make_session(model, "cpu")
        t = time.perf_counter()
        outs, _ = _run_all(sess, batches)  # includes one warm-up run
        loop.append(time.perf_counter() - t)
        del sess
        t = time.perf_counter()
        validator._metrics(outs)
        metrics.append(time.perf_counter() - t)
    for k in range(repeat):  # alternate which goes first so machine noise and order effects hit both alike
        for fn in ((run_bare, run_ours) if k % 2 == 0 else (run_ours, run_bare)):
            fn()
    return statistics.median(bare), statistics.median(loop), statistics.median(metrics)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    z = np.load(DATA)
    x = np.concatenate([z["x"]] * 8)  # 4000 samples
    y = np.concatenate([z["y"]] * 8)
    batches = [{"x": x[i:i + 32]} for i in range(0, len(x), 32)]
    ds = Dataset(batches, y[: len(batches) * 32], "digits x8", 32, len(x))
    tmp = tempfile.mkdtemp()
    pruned = os.path.join(tmp, "p.onnx")
    loaded = load_model(CNN)
    prune_loaded(loaded, PruneConfig(sparsity=0.8))
    save_model(loaded, pruned)

    b, lp, m = compare_loops(pruned, ds, Validator(CNN, ds, "cpu"), args.repeat)
    print(f"evaluation of {len(x)} samples in {len(batches)} batches (CPU, median of {args.repeat}):")
    print(f"  bare ORT loop            {b * 1000:8.1f} ms  ({len(x) / b:,.0f} samples/s)")
    print(f"  onnxprune loop           {lp * 1000:8.1f} ms  + metrics {m * 1000:.1f} ms  "
          f"= {len(x) / (lp + m):,.0f} samples/s, ratio {(lp + m) / b:.3f}x")

    big = os.path.join(HERE, "cache", "bench30m.onnx")  # made by bench_prune.py
    if os.path.exists(big):
        rng = np.random.default_rng(0)
        bb = [{"x": rng.standard_normal((1, 256, 8, 8)).astype(np.float32)} for _ in range(40)]
        bds = Dataset(bb, None, "synthetic", 1, 40)
        b, lp, m = compare_loops(big, bds, Validator(big, bds, "cpu"), 5)
        print(f"30 M-weight benchmark model, 40 batches of 1: bare {b * 1000:.1f} ms, onnxprune "
              f"{(lp + m) * 1000:.1f} ms, ratio {(lp + m) / b:.3f}x")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxprune.cli", CNN, "--sparsity", "auto", "--data", DATA,
                    "--max-drop", "0.01", "-o", os.path.join(tmp, "s.onnx"), "-q"], check=True)
    print(f"--sparsity auto search on the sample CNN (end to end, one process): {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
