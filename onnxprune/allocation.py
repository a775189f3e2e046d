"""How many weights each layer prunes (the "how many" half of a method), as exact integer counts.

Every allocation returns an int64 array ``prune`` with ``prune.sum() == P`` exactly and
``zeros[l] <= prune[l] <= size[l]`` (existing zeros always count as pruned). Definitions follow
../shared/docs/ALGORITHMS.md sections 2.5, 4 and 5.5.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import scores as S
from .errors import RequestError


@dataclass
class LayerInfo:
    size: int
    zeros: int
    shape: tuple
    is_conv: bool
    values: np.ndarray = field(repr=False)  # the weight (flat or shaped), any float dtype


@dataclass
class Context:
    layers: list
    prune_total: int  # P = round(S * N), already >= sum(zeros)
    min_keep: int = 0  # global-mt floor, a count

    @property
    def sizes(self):
        return np.array([l.size for l in self.layers], dtype=np.int64)

    @property
    def zeros(self):
        return np.array([l.zeros for l in self.layers], dtype=np.int64)


# ---------------------------------------------------------------- exact global selection over sorted scores

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


# ---------------------------------------------------------------- quotas -> exact integer counts

def fit_counts(desired: np.ndarray, lo: np.ndarray, hi: np.ndarray, total: int, what: str) -> np.ndarray:
    """Integer counts within [lo, hi] summing to ``total``, proportional to ``desired``.

    Solves sum(clip(c * desired, lo, hi)) = total for the scalar c (keeps the quota's relative profile, as the
    minimum-threshold paper's rescaling does), then rounds by largest remainder (ties to the earlier layer).
    """
    desired = np.asarray(desired, dtype=np.float64)
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.maximum(np.asarray(hi, dtype=np.int64), lo)
    if total < lo.sum():
        raise RequestError(f"{what}: the layers already hold more zeros than the target")  # pragma: no cover
    if total > hi.sum():
        raise RequestError(f"{what}: target needs {total} pruned weights but at most {int(hi.sum())} can be "
                           f"pruned under its per-layer limits")
    def f(c):
        return np.clip(c * desired, lo, hi).sum()
    c_lo, c_hi = 0.0, 1.0
    while f(c_hi) < total and c_hi < 1e300:
        c_hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (c_lo + c_hi)
        if f(mid) < total:
            c_lo = mid
        else:
            c_hi = mid
    y = np.clip(c_hi * desired, lo, hi)
    if f(c_hi) < total:  # desired is zero where room is left: spread the rest by room
        y = y + (hi - y) * ((total - y.sum()) / max(1e-300, (hi - y).sum()))
    base = np.clip(np.floor(y + 1e-9), lo, hi).astype(np.int64)
    rest = total - int(base.sum())
    frac = y - base
    while rest != 0:
        step = 1 if rest > 0 else -1
        room = (base < hi) if step > 0 else (base > lo)
        cand = np.flatnonzero(room)
        order = cand[np.lexsort((cand, -frac[cand] * step))]
        for i in order[: abs(rest)]:
            base[i] += step
        rest = total - int(base.sum())
    return base


# ---------------------------------------------------------------- the allocations

def alloc_global(ctx: Context) -> np.ndarray:
    """Global magnitude: one threshold on |w| over all layers."""
    return global_counts([S.sorted_magnitude(l.values) for l in ctx.layers], ctx.prune_total)


def alloc_lamp(ctx: Context) -> np.ndarray:
    """LAMP: one threshold on layer-normalised scores (section 2)."""
    return global_counts([S.lamp_sorted(l.values) for l in ctx.layers], ctx.prune_total)


def alloc_uniform(ctx: Context) -> np.ndarray:
    """Every layer pruned by the same fraction (first and last included)."""
    sizes = ctx.sizes
    return fit_counts(sizes, ctx.zeros, sizes, ctx.prune_total, "uniform")


def alloc_uniform_plus(ctx: Context) -> np.ndarray:
    """Uniform, but a first conv stays dense and the last layer keeps at least 20 % of its weights."""
    sizes, zeros = ctx.sizes, ctx.zeros
    hi = sizes.copy()
    if ctx.layers[0].is_conv:
        hi[0] = zeros[0]
    last = len(sizes) - 1
    hi[last] = min(hi[last], max(zeros[last], sizes[last] - int(round(0.2 * sizes[last]))))
    return fit_counts(sizes, zeros, hi, ctx.prune_total, "uniform+")


def erk_keep_fraction(shapes, sizes, keep_total: float) -> np.ndarray:
    """ERK densities with RigL capping: density_l = eps * sum(dims)/prod(dims), layers above 1 made dense."""
    sizes = np.asarray(sizes, dtype=np.float64)
    raw = np.array([float(sum(s)) for s in shapes]) / sizes
    dense = np.zeros(len(sizes), dtype=bool)
    while True:
        free = ~dense
        budget = keep_total - sizes[dense].sum()
        eps = budget / (raw[free] * sizes[free]).sum() if free.any() else 0.0
        density = np.where(dense, 1.0, eps * raw)
        over = free & (density > 1.0)
        if not over.any():
            return np.clip(density, 0.0, 1.0)
        dense |= free & (raw >= raw[over].max())  # all layers tied at the largest raw density


def alloc_erk(ctx: Context) -> np.ndarray:
    sizes = ctx.sizes
    keep = erk_keep_fraction([l.shape or (l.size,) for l in ctx.layers], sizes, float(sizes.sum() - ctx.prune_total))
    return fit_counts((1.0 - keep) * sizes, ctx.zeros, sizes, ctx.prune_total, "erk")


def igq_sparsities(sizes, prune_total: int) -> np.ndarray:
    """IGQ: s_l = F n_l / (1 + F n_l), F >= 0 by bisection so that sum s_l n_l = P."""
    n = np.asarray(sizes, dtype=np.float64)

    def pruned(f):
        return (f * n / (1 + f * n) * n).sum()
    f_lo, f_hi = 0.0, 1e-12
    while pruned(f_hi) < prune_total and f_hi < 1e20:
        f_hi *= 4.0
    for _ in range(200):
        mid = 0.5 * (f_lo + f_hi)
        if pruned(mid) < prune_total:
            f_lo = mid
        else:
            f_hi = mid
    return f_hi * n / (1 + f_hi * n)


def alloc_igq(ctx: Context) -> np.ndarray:
    sizes = ctx.sizes
    return fit_counts(igq_sparsities(sizes, ctx.prune_total) * sizes, ctx.zeros, sizes, ctx.prune_total, "igq")


def alloc_global_mt(ctx: Context) -> np.ndarray:
    """Global magnitude with a minimum keep count per layer (section 4.2, closed form)."""
    sizes, zeros = ctx.sizes, ctx.zeros
    gmp = alloc_global(ctx).astype(np.float64)
    m = ctx.min_keep
    hi = np.where(sizes < m, zeros, np.maximum(zeros, sizes - m))
    return fit_counts(gmp, zeros, hi, ctx.prune_total, "global-mt")


# Per-layer counts by name (the "how many" half of a method). The CLI's choices derive from these keys.
ALLOCATIONS = {
    "lamp": alloc_lamp,
    "global": alloc_global,
    "global-mt": alloc_global_mt,
    "uniform": alloc_uniform,
    "uniform+": alloc_uniform_plus,
    "erk": alloc_erk,
    "igq": alloc_igq,
}
