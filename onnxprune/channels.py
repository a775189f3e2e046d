"""Channel-level pruning: whole output channels/neurons, coupled across residual Adds and Concats, so that
compaction can remove them (every runtime then gets faster)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .compact.labels import build

CHANNEL_ALLOCATIONS = ("lamp", "global", "uniform", "erk")


@dataclass
class ChannelPlan:
    """Masks (True: pruned) per layer name, and what they amount to."""
    masks: dict = field(repr=False)  # layer name -> bool array of the weight's shape (only layers that change)
    channels: dict = field(default_factory=dict)  # producer layer -> [channels before, channels removed]
    groups_removed: int = 0  # coupled channel groups removed (a residual stream channel is one group)
    total: int = 0  # prunable weights (active layers)
    target_zeros: int = 0  # round(sparsity * total)
    zeros: int = 0  # zeros after the masks (existing zeros count, as in unstructured pruning)
    zeros_before: int = 0  # zeros the weights already had
    candidates: int = 0  # channel groups that could be removed at all (not tied to a graph output, ...)
    kept_by: dict = field(default_factory=dict)  # what keeps the other channels: op type / "graph output" -> count
    allocation: str = "lamp"
    align: int = 1

    def why_short(self) -> str:
        """Why fewer channels went than the target asked for (for messages)."""
        kept = ", ".join(f"{k} ({v})" for k, v in sorted(self.kept_by.items(), key=lambda kv: -kv[1])[:4])
        if not self.candidates:
            why = ("no layer's output channels can be removed: compaction keeps channels that reach a graph "
                   "output and those of layers whose use it does not follow (e.g. a bias computed at run time)")
        else:
            why = (f"only {self.candidates} channel group(s) can be removed, and no layer may lose every channel"
                   + (f" or leave a count that is not a multiple of --align {self.align}" if self.align > 1 else ""))
        return why + (f"; channels kept by: {kept}" if kept else "")

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"allocation": self.allocation, "align": self.align, "groups_removed": self.groups_removed,
                "candidate_groups": self.candidates, "kept_by": dict(sorted(self.kept_by.items())),
                "target_zeros": self.target_zeros, "zeros": self.zeros, "total": self.total,
                "achieved_sparsity": self.sparsity,
                "channels": {k: {"before": v[0], "removed": v[1]} for k, v in self.channels.items()}}


def channel_plan(model, layers, values, sparsity: float, allocation: str = "lamp", align: int = 1) -> ChannelPlan:
    """Choose whole channels to prune so that about ``sparsity`` of the prunable weights become zero.

    ``layers``: from ``graph.find_layers(model)`` (excluded layers are never touched: a channel group that
    involves one is not a candidate); ``values``: their weights (a list aligned with ``layers`` or a dict by
    name). A channel's score is the L2 norm of its weights; ``lamp`` normalises it over each layer's sorted
    unit norms (norm^2 / sum of the norm^2 not smaller), ``global`` uses the raw norm, ``uniform`` the channel's
    rank within its layer divided by the layer's width (so every layer loses about the same fraction), ``erk``
    that relative rank divided by the layer's ERK pruning fraction at ``sparsity`` (layers lose channels in
    ERK's proportions; a layer ERK keeps dense loses none).
    Channels tied by residual Adds, element-wise ops and Concats (one unit-graph label group) are scored by
    their most important member and removed together. Removing a channel zeroes its producer's weights and the
    weights that read it in every consumer (Conv input channels, the H*W feature group of a flattened channel
    in a Gemm): exactly what compaction then deletes. Groups are removed in increasing score (ties: graph
    order) until the zeros reach ``round(sparsity * total)``; the last group may overshoot, so the result is
    approximate by at most one group and ``zeros`` reports it exactly. No layer loses every channel, and with
    ``align`` > 1 each layer's remaining channel count stays a multiple of ``align`` (or unchanged), which may
    leave the result below the target. Deterministic.
    """
    if allocation not in CHANNEL_ALLOCATIONS:
        raise ValueError(f"channel granularity supports the allocations {', '.join(CHANNEL_ALLOCATIONS)}; "
                         f"got {allocation!r}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if align < 1:
        raise ValueError(f"align must be a positive integer, got {align!r}")
    if not isinstance(values, dict):
        values = {l.name: v for l, v in zip(layers, values)}
    g = build(model, layers)
    roots = g.roots()
    fixed = g.fixed_roots()
    active = [l for l in layers if not l.excluded]
    plan = ChannelPlan(masks={}, allocation=allocation, align=align)
    plan.total = sum(int(values[l.name].size) for l in active)
    plan.target_zeros = int(round(sparsity * plan.total))
    nonzero = {l.name: values[l.name] != 0 for l in active}
    plan.zeros = plan.zeros_before = plan.total - sum(int(np.count_nonzero(v)) for v in nonzero.values())
    plan.kept_by = dict(g.kept_why)
    excluded = {l.name for l in layers if l.excluded}
    # every place a label's channel lives in a weight: (layer name, weight axis, index)
    touches = {}
    width = {}
    for p in g.producers:
        chan = g.chans.get(p.out)
        if chan is None:
            continue
        if p.kind != "dw":
            width[p.layer.name] = chan.lab.size
        for k, lab in enumerate(chan.lab.tolist()):
            touches.setdefault(roots[lab], []).append((p.layer.name, p.w_axis, k))
    for r in g.readers:
        chan = g.chans.get(r.data)
        if chan is None:
            continue
        for k, lab in enumerate(chan.lab.tolist()):
            touches.setdefault(roots[lab], []).append((r.layer.name, r.w_axis, k))
    scores = _scores(g, values, allocation, sparsity)
    cand = []
    for root, where in touches.items():
        if fixed[root] or any(name in excluded or name not in nonzero for name, _, _ in where):
            continue
        members = np.flatnonzero(roots == root)
        own = [m for m in members.tolist() if g.owner[m] >= 0]
        if not own:
            continue
        cand.append((max(scores[m] for m in own), int(members[0]), root, own))
    cand.sort(key=lambda c: (c[0], c[1]))
    plan.candidates = len(cand)
    kept = dict(width)
    floor = max(1, align)
    masks = {}
    removed = []
    for block in _blocks(g, cand, align):
        if plan.zeros >= plan.target_zeros:
            break
        hit = _hits(g, [m for *_, own in block for m in own])
        if any(kept[n] - c < floor for n, c in hit.items()):
            continue
        for n, c in hit.items():
            kept[n] -= c
        for score, _, root, own in block:
            plan.zeros += _mark(masks, nonzero, touches[root])
            removed.append((score, root, own, _hits(g, own)))
    if align > 1:
        removed = _align(removed, kept, width, align, masks, nonzero, touches, plan)
    plan.groups_removed = len(removed)
    plan.masks = {n: m for n, m in masks.items() if m.any()}
    plan.channels = {n: [width[n], width[n] - kept[n]] for n in width if kept[n] != width[n]}
    return plan


def _hits(g, own) -> dict:
    hit = {}
    for m in own:
        name = g.producers[g.owner[m]].layer.name
        hit[name] = hit.get(name, 0) + 1
    return hit


def _blocks(g, cand, align) -> list:
    """Candidates in removal order, ``align`` at a time among groups that hit the same layers (so that each
    removal keeps channel counts aligned); a block is scored by its highest member, ties by graph order."""
    if align == 1:
        return [[c] for c in cand]
    by_sig = {}
    for c in cand:
        sig = tuple(sorted(_hits(g, c[3]).items()))
        by_sig.setdefault(sig, []).append(c)
    blocks = []
    for k, (sig, items) in enumerate(by_sig.items()):
        for j in range(0, len(items) - align + 1, align):
            chunk = items[j:j + align]
            blocks.append(((chunk[-1][0], chunk[0][1], j), chunk))
    blocks.sort(key=lambda b: b[0])
    return [b for _, b in blocks]


def _mark(masks, nonzero, where) -> int:
    """Set the mask over every weight of the channel; return how many non-zero weights became zero."""
    new = 0
    for name, axis, k in where:
        nz = nonzero[name]
        if name not in masks:
            masks[name] = np.zeros(nz.shape, dtype=bool)
        idx = [slice(None)] * nz.ndim
        idx[axis] = k
        idx = tuple(idx)
        fresh = nz[idx] & ~masks[name][idx]
        new += int(np.count_nonzero(fresh))
        masks[name][idx] = True
    return new


def _align(removed, kept, width, align, masks, nonzero, touches, plan):
    """Give back the highest-scoring removed groups of each layer until its channel count is aligned."""
    while True:
        bad = [n for n in sorted(kept) if kept[n] != width[n] and kept[n] % align]
        if not bad:
            break
        n = bad[0]
        pick = max((r for r in removed if n in r[3]), key=lambda r: (r[0], -r[1]))
        removed.remove(pick)
        for ln, c in pick[3].items():
            kept[ln] += c
    # rebuild the masks from what stays removed
    masks.clear()
    plan.zeros = plan.zeros_before
    for _, root, _, _ in removed:
        plan.zeros += _mark(masks, nonzero, touches[root])
    return removed


def _erk_fractions(g, values, sparsity) -> dict:
    """Producer layer -> ERK pruning fraction at ``sparsity`` (over the producer layers)."""
    from .allocation import erk_keep_fraction
    names = []
    for p in g.producers:
        if p.kind != "dw" and p.layer.name in values and p.layer.name not in names:
            names.append(p.layer.name)
    if not names:
        return {}
    shapes = [np.shape(values[n]) or (1,) for n in names]
    sizes = np.array([np.size(values[n]) for n in names], dtype=np.float64)
    keep = erk_keep_fraction(shapes, sizes, float((1.0 - sparsity) * sizes.sum()))
    return dict(zip(names, 1.0 - keep))


def _scores(g, values, allocation, sparsity=0.0) -> np.ndarray:
    """Per label: its channel's score in its producer layer (0 for labels no producer made)."""
    out = np.zeros(len(g.parent))
    erk = _erk_fractions(g, values, sparsity) if allocation == "erk" else {}
    for p in g.producers:
        chan = g.chans.get(p.out)
        if chan is None or p.kind == "dw" or p.layer.name not in values:
            continue
        w = np.asarray(values[p.layer.name], dtype=np.float64)
        sq = np.square(np.moveaxis(w, p.w_axis, 0).reshape(w.shape[p.w_axis], -1)).sum(axis=1)
        order = np.argsort(sq, kind="stable")
        if allocation == "global":
            s = np.sqrt(sq)
        elif allocation in ("uniform", "erk"):
            s = np.empty(sq.size)
            s[order] = (np.arange(sq.size) + 1.0) / sq.size
            if allocation == "erk":
                frac = erk.get(p.layer.name, 0.0)
                s = s / frac if frac > 0 else np.full(sq.size, np.inf)
        else:  # LAMP: norm^2 over the sum of the norm^2 ranked at or above it
            tail = np.cumsum(sq[order][::-1])[::-1]
            s = np.empty(sq.size)
            with np.errstate(invalid="ignore", divide="ignore"):
                s[order] = np.where(tail > 0, sq[order] / tail, 0.0)
        out[chan.lab] = s
    return out
