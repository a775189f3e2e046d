"""The one place that turns scores and per-layer counts into masks.

Rule: a layer prunes exactly ``n_prune`` entries, the lowest by (score, flat index). Existing zeros score -inf,
so they are always among them and never revived.
"""
from __future__ import annotations

import numpy as np


def canonical_index(flat_idx: np.ndarray, shape: tuple, perm: tuple | None) -> np.ndarray:
    """Flat index in the canonical layout (out, in, kernel...) so that tie-breaks do not depend on how a
    framework stored the weight (Gemm [out, in] and MatMul [in, out] give the same masks)."""
    if perm is None or list(perm) == list(range(len(shape))):
        return flat_idx
    coords = np.unravel_index(flat_idx, shape)
    return np.ravel_multi_index(tuple(coords[a] for a in perm), tuple(shape[a] for a in perm))


def layout_perm(shape: tuple, out_axis, in_axis) -> tuple:
    """Axis order (out, in, the rest) for a weight of ``shape``."""
    rank = len(shape)
    first = [a % rank for a in (out_axis, in_axis) if a is not None and rank]
    return tuple(first + [a for a in range(rank) if a not in first])


def prune_mask(scores: np.ndarray, n_prune: int, shape: tuple | None = None, perm: tuple | None = None,
               hint: float | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Boolean array (flat), True where the weight is pruned: the ``n_prune`` lowest by (score, canonical index).

    ``hint`` may name a score t with #(score < t) <= n_prune <= #(score <= t) (the allocation often knows one);
    it is checked, and any t that passes gives exactly the same mask, so a wrong hint only costs a partition.
    ``out``: a boolean scratch array of the scores' size to write the mask into.
    """
    scores = np.asarray(scores).ravel()
    n = scores.size
    if n_prune <= 0:
        return np.zeros(n, dtype=bool)
    if n_prune >= n:
        return np.ones(n, dtype=bool)
    pruned = None
    if hint is not None:
        t = scores.dtype.type(hint)
        pruned = np.less(scores, t, out=out) if out is not None else scores < t
        short = n_prune - int(np.count_nonzero(pruned))
        if short < 0 or (short and short > int(np.count_nonzero(scores == t))):
            pruned = None
    if pruned is None:
        t = np.partition(scores, n_prune - 1)[n_prune - 1]
        pruned = np.less(scores, t, out=out) if out is not None else scores < t
        short = n_prune - int(np.count_nonzero(pruned))
    if short:
        ties = np.flatnonzero(scores == t)
        if shape is not None:
            ties = ties[np.argsort(canonical_index(ties, shape, perm), kind="stable")]
        pruned[ties[:short]] = True
    return pruned


BLOCK = 1 << 20  # values per block of ``magnitude_mask``'s passes


def magnitude_mask(w: np.ndarray, n_prune: int, shape: tuple, perm: tuple | None, hint: float,
                   out: np.ndarray) -> np.ndarray | None:
    """``prune_mask(magnitude(w), n_prune, shape, perm, hint, out)`` computed block by block (no array of
    magnitudes as large as the layer), or None when ``hint`` is not a valid threshold (the caller then takes the
    full route)."""
    from .scores import magnitude
    flat = np.asarray(w).reshape(-1)
    n = flat.size
    if n_prune <= 0 or n_prune >= n:
        return None  # the full route's trivial cases
    t = None
    count = ties = 0
    for start in range(0, n, BLOCK):
        a = magnitude(flat[start:start + BLOCK])
        if t is None:
            t = a.dtype.type(hint)
        part = np.less(a, t, out=out[start:start + a.size])
        count += int(np.count_nonzero(part))
        ties += int(np.count_nonzero(a == t))
    short = n_prune - count
    if short < 0 or short > ties:
        return None
    if short:
        found = [np.flatnonzero(magnitude(flat[start:start + BLOCK]) == t) + start for start in range(0, n, BLOCK)]
        at = np.concatenate(found)
        at = at[np.argsort(canonical_index(at, shape, perm), kind="stable")]
        out[at[:short]] = True
    return out


def apply_mask(w: np.ndarray, pruned: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``w`` with the pruned entries set to +0.0, same dtype and shape, written into ``out`` if given
    (a reused buffer avoids fresh pages on large models, which cost more than the copy itself)."""
    w = np.asarray(w)
    if out is None:
        out = np.empty(w.shape, dtype=w.dtype)
    np.copyto(out, w)
    np.copyto(out.reshape(-1), 0, where=pruned)
    return out
