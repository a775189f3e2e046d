"""Within-layer scores: pure NumPy, weights in, scores out. Higher score = more worth keeping.

Already-zero weights score -inf so every selection prunes them first and never revives them.
"""
from __future__ import annotations

import numpy as np


def magnitude(w: np.ndarray) -> np.ndarray:
    """|w|, flattened. fp16/bf16 widen to float32 (exact); float64 stays float64. The ranking is exact."""
    w = np.asarray(w).ravel()
    dtype = np.float64 if w.dtype == np.float64 else np.float32
    return np.abs(w.astype(dtype, copy=False))


class MagnitudeBuffer:
    """|w| computed into one reused buffer per float width: no fresh pages per layer on large models.

    The array returned by ``of`` is only valid until the next call.
    """

    def __init__(self):
        self._bufs = {}

    def bools(self, n: int, slot: int = 0) -> np.ndarray:
        """A reused boolean scratch array of length ``n`` (one per slot)."""
        key = ("bool", slot)
        buf = self._bufs.get(key)
        if buf is None or buf.size < n:
            buf = self._bufs[key] = np.empty(n, dtype=bool)
        return buf[:n]

    def like(self, w: np.ndarray) -> np.ndarray:
        """A scratch array with ``w``'s dtype and shape (valid until the next call for that dtype)."""
        w = np.asarray(w)
        key = ("like", w.dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.size < w.size:
            buf = self._bufs[key] = np.empty(w.size, dtype=w.dtype)
        return buf[: w.size].reshape(w.shape)

    def of(self, w: np.ndarray) -> np.ndarray:
        flat = np.asarray(w).reshape(-1)
        if flat.dtype not in (np.float32, np.float64):
            return magnitude(flat)
        buf = self._bufs.get(flat.dtype)
        if buf is None or buf.size < flat.size:
            buf = self._bufs[flat.dtype] = np.empty(flat.size, dtype=flat.dtype)
        return np.abs(flat, out=buf[: flat.size])


def sorted_magnitude(w: np.ndarray) -> np.ndarray:
    """|w| ascending in float64, existing zeros as -inf: the global-magnitude allocation's input."""
    a = np.sort(magnitude(w)).astype(np.float64)
    a[a == 0] = -np.inf
    return a


def lamp_sorted(w: np.ndarray) -> np.ndarray:
    """LAMP scores in ascending-|w| order (ties by flat index): w_u^2 / sum_{v>=u} w_v^2.

    Float64 with a reversed cumulative sum (no total-minus-prefix cancellation). The result is non-decreasing,
    so a layer's keep set for any threshold is a suffix of its magnitude order. Zeros score -inf; an all-zero
    layer gives all -inf, never NaN.
    """
    sq = np.sort(magnitude(w)).astype(np.float64)
    zeros = int(np.searchsorted(sq, 0.0, side="right"))
    np.square(sq, out=sq)
    suffix = np.cumsum(sq[::-1])[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(sq, suffix, out=sq)
    sq[:zeros] = -np.inf
    return sq


def lamp(w: np.ndarray) -> np.ndarray:
    """LAMP scores in the weight's own positions and shape (for inspection and tests)."""
    w = np.asarray(w)
    order = np.argsort(magnitude(w), kind="stable")
    out = np.empty(w.size, dtype=np.float64)
    out[order] = lamp_sorted(w)
    return out.reshape(w.shape)


def random_scores(w: np.ndarray, seed: int, layer_index: int, perm: tuple | None = None, mag=None) -> np.ndarray:
    """Uniform random scores, reproducible per (seed, layer position); zeros -inf.

    Drawn in the canonical (out, in, kernel...) order given by ``perm`` so that the same weights stored in
    another layout get the same scores.
    """
    w = np.asarray(w)
    rng = np.random.default_rng([int(seed), int(layer_index)])
    if perm is not None and w.ndim:
        s = rng.random(tuple(w.shape[a] for a in perm)).transpose(np.argsort(perm)).ravel()
    else:
        s = rng.random(w.size)
    s[w.ravel() == 0] = -np.inf
    return s


def magnitude_scores(w: np.ndarray, seed: int = 0, layer_index: int = 0, perm: tuple | None = None,
                     mag=None) -> np.ndarray:
    return magnitude(w) if mag is None else mag


# Within-layer scores by name (the "which" half of a method).
SCORES = {
    "magnitude": magnitude_scores,
    "random": random_scores,
}
