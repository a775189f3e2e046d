"""Calibrated channel scores for --granularity channel: the share of each consumer's output a channel carries on
the calibration data, summed over the consumers that read it (what removing it costs them before the refit)."""
from __future__ import annotations

import numpy as np


def calibrated_label_scores(model, g, values: dict, calibration: list, threads: int = 0,
                            fed: dict | None = None) -> np.ndarray:
    """One score per label of the unit graph ``g`` (compact.labels.build): a channel group removed first is the
    one whose consumers lose least.

    For every consumer (a prunable node reading whole channels: Conv, Gemm, MatMul) and every index k of its
    input-channel axis, the energy it passes on is E[x_k^2] * ||W_k||^2 (x_k: the consumer's input along that
    axis over the calibration batches, W_k: the weights reading it), exact for Gemm, MatMul and 1x1 Conv, the
    diagonal of the k x k taps' Gram for larger kernels. Each consumer's energies are divided by their sum (the
    share of that consumer's output, so that consumers of different scales compare), summed per coupled
    channel group (a residual stream's channel is read by every block) and given to each of its labels.
    ``fed``: initializer name -> a function giving its values, for weights held outside the protobuf (mapped)."""
    from .reconstruct.activations import Capture
    roots = g.roots()
    readers = [r for r in g.readers if g.chans.get(r.data) is not None and r.layer.name in values]
    names = sorted({r.data for r in readers})
    square = {n: None for n in names}
    count = {n: 0 for n in names}
    if names:
        cap = Capture(model, names, calibration, threads, fed=fed)
        try:
            for j, feed in enumerate(calibration):
                out = cap.run(feed, j)
                for n in names:
                    chan = g.chans[n]
                    x = np.moveaxis(np.asarray(out[n], dtype=np.float64), chan.axis, 0)
                    x = x.reshape(x.shape[0], -1)
                    x = np.where(np.isfinite(x), x, 0.0)
                    s = np.einsum("kn,kn->k", x, x)
                    square[n] = s if square[n] is None else square[n] + s
                    count[n] += x.shape[1]
        finally:
            cap.close()
    group = np.zeros(len(g.parent))
    for r in readers:
        chan = g.chans[r.data]
        ms = square[r.data] / max(count[r.data], 1) if square[r.data] is not None else None
        w = np.asarray(values[r.layer.name], dtype=np.float64)
        cols = np.square(np.moveaxis(w, r.w_axis, 0).reshape(w.shape[r.w_axis], -1)).sum(axis=1)
        if ms is None or ms.size != cols.size or cols.size != chan.lab.size:
            continue
        energy = ms * cols
        total = energy.sum()
        if total <= 0:
            continue
        np.add.at(group, roots[chan.lab], energy / total)
    return group[roots]
