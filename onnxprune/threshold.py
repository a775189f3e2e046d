"""Exact global selection for global magnitude and LAMP without sorting every layer.

The reference route (``global_counts`` below, over fully sorted per-layer scores) costs a float64 sort of
every weight. This one finds the same per-layer counts in a few linear passes:

1. a strided sample of each layer's magnitudes estimates each layer's score curve and the global threshold;
2. per layer, a magnitude bracket [m_lo, m_hi) around the estimated cut is scored exactly (in float64: LAMP's
   suffix sums are the bracket's reversed cumulative sum plus the exact float64 sum of squares above it);
3. the exact selection runs on the union of the brackets (same ordering rule as ``global_counts``) and is
   accepted only if bounds prove that everything above a bracket is kept and everything below is pruned;
   otherwise the brackets widen, ending at whole layers (which is the reference computation).
"""
from __future__ import annotations

import numpy as np

from .scores import MagnitudeBuffer, magnitude


def _key(x: np.ndarray) -> np.ndarray:
    """Order-preserving map float64 -> int64 (an involution)."""
    u = np.asarray(x, dtype=np.float64).view(np.int64)
    return u ^ ((u >> 63) & np.int64(0x7FFFFFFFFFFFFFFF))


def _unkey(k) -> float:
    u = np.array([k], dtype=np.int64)
    return float((u ^ ((u >> 63) & np.int64(0x7FFFFFFFFFFFFFFF))).view(np.float64)[0])


def global_counts(sorted_scores: list, prune_total: int) -> np.ndarray:
    """Prune the ``prune_total`` lowest scores over all layers (each given ascending).

    Ties at the threshold are pruned from earlier layers first, then by position inside a layer: the whole
    order is (score, layer index, position), so the result is deterministic.
    """
    n_layers = len(sorted_scores)
    counts = np.zeros(n_layers, dtype=np.int64)
    if prune_total <= 0:
        return counts
    total = sum(a.size for a in sorted_scores)
    if prune_total >= total:
        return np.array([a.size for a in sorted_scores], dtype=np.int64)
    lo = min(int(_key(a[:1])[0]) for a in sorted_scores if a.size)
    hi = max(int(_key(a[-1:])[0]) for a in sorted_scores if a.size)
    # smallest key t with #(score <= t) >= prune_total
    while lo < hi:
        mid = (lo + hi) // 2
        v = _unkey(mid)
        if sum(int(np.searchsorted(a, v, side="right")) for a in sorted_scores) >= prune_total:
            hi = mid
        else:
            lo = mid + 1
    tau = _unkey(lo)
    below = np.array([np.searchsorted(a, tau, side="left") for a in sorted_scores], dtype=np.int64)
    equal = np.array([np.searchsorted(a, tau, side="right") for a in sorted_scores], dtype=np.int64) - below
    need = prune_total - int(below.sum())
    counts[:] = below
    for i in range(n_layers):
        take = min(int(equal[i]), need)
        counts[i] += take
        need -= take
    return counts


SAMPLE_STRIDE = 64
MIN_BRACKET = 256  # sample points on each side of the estimated cut, first attempt


def _estimate(layers, kind, keep_total):
    """Per layer: sorted strided sample (float64) and the sample index of the estimated cut."""
    samples, weights, curves = [], [], []
    for layer in layers:
        flat = np.asarray(layer).reshape(-1)
        step = max(1, min(SAMPLE_STRIDE, flat.size // 1024))
        s = np.sort(magnitude(flat[::step])).astype(np.float64)
        w = flat.size / max(1, s.size)  # elements each sample point stands for
        if kind == "lamp":
            sq = s * s
            suffix = np.cumsum(sq[::-1])[::-1]
            with np.errstate(invalid="ignore", divide="ignore"):
                curve = np.where(suffix > 0, sq / suffix, -np.inf)
        else:
            curve = s.copy()
        curve[s == 0] = -np.inf
        samples.append(s)
        weights.append(w)
        curves.append(np.maximum.accumulate(curve))  # LAMP's curve is monotone; sampling noise must not break it
    # estimated threshold: the smallest tau (bisection over the float order) whose weighted kept count
    # sum_l w_l * #(curve_l >= tau) stays <= keep_total; each curve is sorted, so a count is one searchsorted
    def kept(key):
        tau = _unkey(key)
        return sum(w * (c.size - int(np.searchsorted(c, tau, side="left"))) for c, w in zip(curves, weights))
    finite = [c for c in curves if c.size]
    lo = min(int(_key(c[:1])[0]) for c in finite)
    hi = max(int(_key(c[-1:])[0]) for c in finite)
    while lo < hi:
        mid = (lo + hi) // 2
        if kept(mid) <= keep_total:
            hi = mid
        else:
            lo = mid + 1
    tau = _unkey(lo)
    cuts = [int(np.searchsorted(c, tau, side="left")) for c in curves]
    return samples, cuts


def global_prune_counts(layers: list, kind: str, prune_total: int, buffer: MagnitudeBuffer | None = None):
    """Per-layer prune counts equal to ``global_counts`` over fully sorted scores ('magnitude' or 'lamp').

    ``layers`` are the weights (any float dtype and shape), zeros included. Returns (counts, hints): hints[l] is
    a magnitude t with #(|w| < t) <= counts[l] <= #(|w| <= t), which lets ``select.prune_mask`` skip a partition.
    """
    buffer = buffer or MagnitudeBuffer()
    sizes = [int(np.asarray(w).size) for w in layers]
    total = sum(sizes)
    if prune_total <= 0:
        return np.zeros(len(layers), dtype=np.int64), [None] * len(layers)
    if prune_total >= total:
        return np.array(sizes, dtype=np.int64), [None] * len(layers)
    samples, cuts = _estimate(layers, kind, total - prune_total)
    half = MIN_BRACKET
    while True:
        whole = half >= max(s.size for s in samples)
        result = _try(layers, buffer, kind, prune_total, samples, cuts, None if whole else half)
        if result is not None:
            return result
        half *= 8


BLOCK = 1 << 20  # values per block of a pass over a layer: the scratch stays small whatever the layer's size


def _at_least(w, m_lo, buffer):
    """(|w| values >= m_lo in flat order, as float32 or float64 like ``scores.magnitude``; the layer's size),
    computed block by block."""
    flat = np.asarray(w).reshape(-1)
    if flat.size <= BLOCK:
        a = buffer.of(flat)
        return a[np.greater_equal(a, m_lo, out=buffer.bools(a.size, 0))], flat.size
    parts = []
    for start in range(0, flat.size, BLOCK):
        a = buffer.of(flat[start:start + BLOCK])
        parts.append(a[np.greater_equal(a, m_lo, out=buffer.bools(a.size, 0))])
    return np.concatenate(parts), flat.size


def _bracket_scores(br, kind, s_above):
    if kind == "lamp":
        sq = br * br
        suffix = np.cumsum(sq[::-1])[::-1] + s_above
        with np.errstate(invalid="ignore", divide="ignore"):
            sc = np.where(suffix > 0, sq / suffix, -np.inf)
    else:
        sc = br.copy()
    sc[br == 0] = -np.inf
    return sc


def _try(layers, buffer, kind, prune_total, samples, cuts, half):
    below, above, brackets, lo_bound, hi_bound, sorted_mags, m_los = [], [], [], [], [], [], []
    for w, s, c in zip(layers, samples, cuts):
        if half is None:
            m_lo, m_hi = -np.inf, np.inf
        else:
            m_lo = s[c - half] if c - half > 0 else -np.inf
            m_hi = s[c + half] if c + half < s.size else np.inf
        # one pass over the layer, block by block (abs, compare, compress); the rest works on the small part at or
        # above m_lo
        upper, size = _at_least(w, m_lo, buffer)
        n_below = size - upper.size
        top_mask = upper >= m_hi
        n_above = int(np.count_nonzero(top_mask))
        br = np.sort(upper[~top_mask]).astype(np.float64)
        s_above = 0.0
        if kind == "lamp" and n_above:
            top = upper[top_mask].astype(np.float64)
            s_above = float(np.dot(top, top))
        sc = _bracket_scores(br, kind, s_above)
        # bounds: every element below the bracket scores <= lo_bound, every element above scores >= hi_bound
        if kind == "lamp":
            m2 = float(m_lo) ** 2 if n_below else 0.0
            rest = float(np.dot(br, br)) + s_above
            lo_bound.append((m2 / (m2 + rest) if m2 + rest > 0 else -np.inf) if n_below else None)
            hi_bound.append(float(m_hi) ** 2 / s_above if n_above else None)
        else:
            lo_bound.append(float(m_lo) if n_below else None)
            hi_bound.append(float(m_hi) if n_above else None)
        below.append(n_below)
        above.append(n_above)
        brackets.append(sc)
        sorted_mags.append(br)
        m_los.append(m_lo)
    need = prune_total - sum(below)
    room = sum(b.size for b in brackets)
    if need < 0 or need > room:
        return None
    inner = global_counts(brackets, need)
    pruned_max = max((b[k - 1] for b, k in zip(brackets, inner) if k > 0), default=-np.inf)
    kept_min = min((b[k] for b, k in zip(brackets, inner) if k < b.size), default=np.inf)
    for lo, hi in zip(lo_bound, hi_bound):
        if lo is not None and not lo < kept_min:
            return None
        if hi is not None and not hi > pruned_max:
            return None
    hints = [br[k - 1] if k > 0 else (m_lo if np.isfinite(m_lo) else None)
             for br, k, m_lo in zip(sorted_mags, inner, m_los)]
    return np.array(below, dtype=np.int64) + inner, hints
