"""Allocation + selection for a given direct count, and the effective-target bisection built on it."""
from __future__ import annotations

import numpy as np

from .allocation import ALLOCATIONS, Context
from .scores import SCORES, MagnitudeBuffer
from .select import BLOCK, apply_mask, layout_perm, magnitude_mask, prune_mask


class Selector:
    """Allocation + selection for a given direct count: the one path every run and every probe takes."""

    def __init__(self, model, layers, values, idx, infos, alloc_name, score_name, config, report, buffer=None):
        self.model, self.layers, self.values, self.idx, self.infos = model, layers, values, idx, infos
        self.alloc_name, self.score_name, self.config, self.report = alloc_name, score_name, config, report
        self.buffer = buffer or MagnitudeBuffer()
        self.zeros = np.array([i.zeros for i in infos], dtype=np.int64)
        self.shapes = None
        self._lap = None

    def allocate(self, target: int):
        if not self.idx:
            return np.zeros(0, dtype=np.int64), []
        if self.zeros.sum() >= target:
            return self.zeros.copy(), []
        ctx = Context(layers=self.infos, prune_total=target, min_keep=self.report.options["min_keep_count"],
                      buffer=self.buffer, values=self.values.subset(self.idx))
        counts = ALLOCATIONS[self.alloc_name](ctx)
        assert int(counts.sum()) == target, (counts.sum(), target)
        return counts, ctx.hints

    def masks(self, counts, hints):
        """Yield (position, layer index, flat pruned mask) for every layer that gains zeros (the mask lives in a
        reused buffer: valid until the next item)."""
        score_fn = SCORES[self.score_name] if self.score_name != "lap" else None
        for k, i in enumerate(self.idx):
            n_prune = int(counts[k])
            if n_prune == self.infos[k].zeros:
                continue  # nothing new: leave the tensor's bytes untouched
            w = self.values[i]
            layout = self.layers[i].layout
            perm = layout_perm(w.shape, layout.out_axis, layout.in_axis)
            hint = hints[k] if self.score_name == "magnitude" and k < len(hints) else None
            if hint is not None and w.size > BLOCK:  # a large layer: block by block, no magnitude array
                pruned = magnitude_mask(w, n_prune, w.shape, perm, hint, out=self.buffer.bools(w.size))
                if pruned is not None:
                    yield k, i, pruned
                    continue
            if self.score_name == "lap":
                scores = self.lap_scores(i)
            else:
                mag = self.buffer.of(w) if self.score_name == "magnitude" else None
                scores = score_fn(w, self.config.seed, k, perm, mag=mag)
            yield k, i, prune_mask(scores, n_prune, w.shape, perm, hint=hint, out=self.buffer.bools(w.size))

    def lap_scores(self, i):
        from .lookahead import lap_scores, lookahead_factors
        if self._lap is None:
            self._lap = lookahead_factors(self.model, self.layers, self.values, self._shapes())
        return lap_scores(self.values[i], self.layers[i], self._lap)

    def _shapes(self):
        if self.shapes is None:
            from .shapes import infer_shapes
            self.shapes = infer_shapes(self.model)
        return self.shapes

    def effective_zeros(self, target: int) -> int:
        from .connectivity import effective_counts
        counts, hints = self.allocate(target)
        weights = {l.name: self.values[i] for i, l in enumerate(self.layers)}
        for k, i, pruned in self.masks(counts, hints):
            weights[self.layers[i].name] = apply_mask(self.values[i], pruned)
        counts = None
        if self.config.effective_mode == "exact":
            counts, _ = exact_counts(self.model, self.layers, weights, self._shapes(), self.config.input_shapes)
        if counts is None:
            counts = effective_counts(self.model, self.layers, weights, self._shapes()).effective_count
        return sum(self.infos[k].size - counts[self.layers[i].name] for k, i in enumerate(self.idx))

    def effective_target(self, wanted: int, zeros: int) -> int:
        """Largest direct count whose effective zeros stay <= ``wanted`` (bisection; masks are nested)."""
        total = sum(i.size for i in self.infos)
        lo, hi = zeros, total
        probes = []
        e_lo = self.effective_zeros(lo)
        probes.append((lo, e_lo))
        if e_lo > wanted:
            hi = lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            e = self.effective_zeros(mid)
            probes.append((mid, e))
            if e <= wanted:
                lo = mid
            else:
                hi = mid
        achieved = dict(probes).get(lo, e_lo)
        self.report.options["effective_target"] = {"wanted_zeros": wanted, "direct_count": lo,
                                                   "effective_zeros": int(achieved), "probes": len(probes)}
        return lo


def exact_counts(model, layers, weights, shapes, input_shapes=None):
    from .exact import Unsupported, effective_exact
    try:
        return effective_exact(model, layers, weights, shapes, input_shapes), None
    except Unsupported as exc:
        return None, str(exc)
