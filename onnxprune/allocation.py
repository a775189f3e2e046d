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
from .threshold import global_counts, global_prune_counts  # noqa: F401  (global_counts: the reference route)


@dataclass
class LayerInfo:
    size: int
    zeros: int
    shape: tuple
    is_conv: bool
    values: np.ndarray = field(default=None, repr=False)  # the weight (flat or shaped), any float dtype; or
    # None when the Context's ``values`` holds them


@dataclass
class Context:
    layers: list
    prune_total: int  # P = round(S * N), already >= sum(zeros)
    min_keep: int = 0  # global-mt floor, a count
    buffer: S.MagnitudeBuffer = field(default_factory=S.MagnitudeBuffer, repr=False)
    # optional per-layer magnitude thresholds that make the final selection cheaper (see select.prune_mask)
    hints: list = field(default_factory=list, repr=False)
    # the layers' weights in order when not in ``LayerInfo.values``: a sequence read one layer at a time
    # (``io.mapped.Values``: mapped weights stay resident one at a time)
    values: object = field(default=None, repr=False)

    @property
    def weights(self):
        return self.values if self.values is not None else [l.values for l in self.layers]

    @property
    def sizes(self):
        return np.array([l.size for l in self.layers], dtype=np.int64)

    @property
    def zeros(self):
        return np.array([l.zeros for l in self.layers], dtype=np.int64)


# ---------------------------------------------------------------- quotas -> exact integer counts

def solve_increasing(fn, target: float, start: float, ceiling: float) -> float:
    """Smallest x (to float precision, by bracketing then 200 bisections) with fn(x) >= target, fn non-decreasing
    on [0, ceiling]."""
    lo, hi = 0.0, start
    while fn(hi) < target and hi < ceiling:
        hi *= 4.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if fn(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi

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
    c_hi = solve_increasing(f, total, 1.0, 1e300)
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
    counts, ctx.hints = global_prune_counts(ctx.weights, "magnitude", ctx.prune_total, ctx.buffer)
    return counts


def alloc_lamp(ctx: Context) -> np.ndarray:
    """LAMP: one threshold on layer-normalised scores (section 2)."""
    counts, ctx.hints = global_prune_counts(ctx.weights, "lamp", ctx.prune_total, ctx.buffer)
    return counts


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
    f = solve_increasing(pruned, prune_total, 1e-12, 1e20)
    return f * n / (1 + f * n)


def alloc_igq(ctx: Context) -> np.ndarray:
    sizes = ctx.sizes
    return fit_counts(igq_sparsities(sizes, ctx.prune_total) * sizes, ctx.zeros, sizes, ctx.prune_total, "igq")


def alloc_global_mt(ctx: Context) -> np.ndarray:
    """Global magnitude with a minimum keep count per layer (section 4.2, closed form)."""
    gmp = alloc_global(ctx)
    ctx.hints = []  # they describe the global-magnitude counts, not these
    return min_keep_counts(gmp, ctx.sizes, ctx.zeros, ctx.min_keep, ctx.prune_total)


def min_keep_counts(gmp_prune, sizes, zeros, min_keep: int, total: int) -> np.ndarray:
    """Rescale a global-magnitude profile so every layer keeps >= min_keep (layers smaller than it stay dense)."""
    sizes, zeros = np.asarray(sizes, dtype=np.int64), np.asarray(zeros, dtype=np.int64)
    hi = np.where(sizes < min_keep, zeros, np.maximum(zeros, sizes - min_keep))
    return fit_counts(np.asarray(gmp_prune, dtype=np.float64), zeros, hi, total, "global-mt")


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
