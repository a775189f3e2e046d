"""The one place that turns scores and per-layer counts into masks.

Rule: a layer prunes exactly ``n_prune`` entries, the lowest by (score, flat index). Existing zeros score -inf,
so they are always among them and never revived.
"""
from __future__ import annotations

import numpy as np


def prune_mask(scores: np.ndarray, n_prune: int) -> np.ndarray:
    """Boolean array (flat), True where the weight is pruned: the ``n_prune`` lowest (score, index)."""
    scores = np.asarray(scores).ravel()
    n = scores.size
    if n_prune <= 0:
        return np.zeros(n, dtype=bool)
    if n_prune >= n:
        return np.ones(n, dtype=bool)
    t = np.partition(scores, n_prune - 1)[n_prune - 1]
    pruned = scores < t
    short = n_prune - int(np.count_nonzero(pruned))
    if short:
        ties = np.flatnonzero(scores == t)
        pruned[ties[:short]] = True
    return pruned


def apply_mask(w: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """A copy of ``w`` with the pruned entries set to zero, same dtype and shape."""
    out = np.array(w, copy=True)
    out.reshape(-1)[pruned] = 0
    return out
