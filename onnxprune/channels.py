"""Channel-level pruning: whole output channels/neurons, coupled across residual Adds and Concats, so that
compaction can remove them (every runtime then gets faster)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .compact.labels import build

CHANNEL_ALLOCATIONS = ("lamp", "global", "uniform", "erk")
CHANNEL_TARGETS = ("params", "macs")  # what the sparsity is a fraction of: prunable weights, or their MACs
# Every layer keeps at least this fraction of its output channels (rounded up, and at least --align). Removal
# order follows scores that compare layers only roughly (a norm, a rank, a calibrated share); left unchecked, the
# cheapest-looking layers go first and a stem of few parameters but most of the compute is emptied (a CRNN kept
# 0.13 % of its MACs at -s 0.3). A quarter keeps every stage able to carry its signal, leaves the other layers room
# to reach usual targets, and a layer at the floor still runs 4x cheaper.
DEFAULT_FLOOR = 0.25


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
    target: str = "params"  # "params": the sparsity is a fraction of the prunable weights; "macs": of their MACs
    floor: float = DEFAULT_FLOOR  # every layer keeps at least max(1, align, ceil(floor * width)) output channels
    floored: list = field(default_factory=list)  # layers whose floor stopped a removal the target still wanted
    min_keep: dict = field(default_factory=dict)  # producer layer -> the fewest output channels it may keep
    selection: str = "norm"  # "norm": the allocation's weight scores; "calibrated": scores given by label_scores
    macs_total: int | None = None  # MACs per sample of the prunable layers (dense); None where shapes are unknown
    macs_removed: int | None = None  # MACs per sample of the weights the masks remove (what compaction deletes)
    target_macs: int | None = None  # round(sparsity * macs_total)
    macs_per_layer: dict = field(default_factory=dict, repr=False)  # layer -> MACs per sample (dense)
    macs_excluded: list = field(default_factory=list)  # layers in If/Loop/Scan bodies: not in the MACs figures

    def why_short(self) -> str:
        """Why fewer channels went than the target asked for (for messages)."""
        kept = ", ".join(f"{k} ({v})" for k, v in sorted(self.kept_by.items(), key=lambda kv: -kv[1])[:4])
        if not self.candidates:
            why = ("no layer's output channels can be removed: compaction keeps channels that reach a graph "
                   "output and those of layers whose use it does not follow (e.g. a bias computed at run time)")
        else:
            why = (f"only {self.candidates} channel group(s) can be removed, and no layer may lose every channel"
                   + (f" or keep fewer than {self.floor:.0%} of them" if self.floor > 0 else "")
                   + (f" or leave a count that is not a multiple of --align {self.align}" if self.align > 1 else ""))
            if self.floored:
                names = ", ".join(self.floored[:4]) + (f" and {len(self.floored) - 4} more" if len(self.floored) > 4
                                                       else "")
                why += f"; at their floor: {names}"
        return why + (f"; channels kept by: {kept}" if kept else "")

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    @property
    def params_removed_fraction(self) -> float:
        """Zeros over the prunable weights (existing zeros count, as the params target counts them)."""
        return self.sparsity

    @property
    def macs_removed_fraction(self) -> float | None:
        """MACs of the removed channels' weights over the prunable layers' MACs (dense counts); None if unknown."""
        if self.macs_total is None or self.macs_removed is None:
            return None
        return self.macs_removed / self.macs_total if self.macs_total else 0.0

    @property
    def achieved(self) -> float:
        """The fraction the target is measured in: ``sparsity`` (params) or ``macs_removed_fraction`` (macs)."""
        return (self.macs_removed_fraction or 0.0) if self.target == "macs" else self.sparsity

    def to_dict(self) -> dict:
        return {"allocation": self.allocation, "align": self.align, "groups_removed": self.groups_removed,
                "candidate_groups": self.candidates, "kept_by": dict(sorted(self.kept_by.items())),
                "target_zeros": self.target_zeros, "zeros": self.zeros, "total": self.total,
                "achieved_sparsity": self.sparsity,
                "channels": {k: {"before": v[0], "removed": v[1]} for k, v in self.channels.items()},
                "target": self.target, "selection": self.selection, "floor": self.floor,
                "floored": list(self.floored),
                "params_removed_fraction": self.params_removed_fraction,
                "macs_total": self.macs_total, "macs_removed": self.macs_removed, "target_macs": self.target_macs,
                "macs_removed_fraction": self.macs_removed_fraction, "macs_excluded": list(self.macs_excluded)}


def channel_plan(model, layers, values, sparsity: float, allocation: str = "lamp", align: int = 1, *,
                 floor: float = DEFAULT_FLOOR, target: str = "params", input_shapes: dict | None = None,
                 label_scores=None, pending: dict | None = None) -> ChannelPlan:
    """Choose whole channels to prune so that about ``sparsity`` of the prunable weights (``target="params"``) or
    of their multiply-accumulates (``target="macs"``) go.

    ``layers``: from ``graph.find_layers(model)`` (excluded layers are never touched: a channel group that
    involves one is not a candidate); ``values``: their weights (a list aligned with ``layers`` or a dict by
    name). A channel's score is the L2 norm of its weights; ``lamp`` normalises it over each layer's sorted
    unit norms (norm^2 / sum of the norm^2 not smaller), ``global`` uses the raw norm, ``uniform`` the channel's
    rank within its layer divided by the layer's width (so every layer loses about the same fraction), ``erk``
    that relative rank divided by the layer's ERK pruning fraction at ``sparsity`` (layers lose channels in
    ERK's proportions; a layer ERK keeps dense loses none). ``label_scores``: a callable taking the label graph
    (``compact.labels.build``) and returning one score per label (lower: removed first), used instead (e.g.
    calibrated scores, ``channel_scores.calibrated_label_scores``).
    Channels tied by residual Adds, element-wise ops and Concats (one unit-graph label group) are scored by
    their most important member and removed together. Removing a channel zeroes its producer's weights and the
    weights that read it in every consumer (Conv input channels, the H*W feature group of a flattened channel
    in a Gemm): exactly what compaction then deletes. Groups are removed in increasing score (ties: graph
    order) until the zeros reach ``round(sparsity * total)`` (params) or the removed MACs reach
    ``round(sparsity * macs_total)`` (macs); the last group may overshoot, so the result is approximate by at
    most one group and ``zeros`` / ``macs_removed`` report it exactly. No layer keeps fewer than
    ``max(1, align, ceil(floor * width))`` of its output channels (``floored`` names the layers that stopped a
    removal there), and with ``align`` > 1 each layer's remaining channel count stays a multiple of ``align`` (or
    unchanged); both may leave the result below the target. Deterministic.

    MACs are per sample, dense (zeros count), of the active layers at ``input_shapes`` ({input name: [dims]}); an
    input not named keeps its declared shape, a symbolic first dim taken as a batch of 1. A weight's MACs are its
    layer's MACs over the layer's weight count (every weight of a Conv, depthwise Conv, ConvTranspose, Gemm or
    MatMul is used equally often), so a removed channel's MACs are exact: its producer's output slice and every
    consumer's input slice (a depthwise conv's channel is one row of it). The MACs figures are reported whatever
    the target (None where a shape is unknown); with ``target="macs"`` an unknown one raises ValueError.
    """
    if allocation not in CHANNEL_ALLOCATIONS:
        raise ValueError(f"channel granularity supports the allocations {', '.join(CHANNEL_ALLOCATIONS)}; "
                         f"got {allocation!r}")
    if target not in CHANNEL_TARGETS:
        raise ValueError(f"channel target must be one of {', '.join(CHANNEL_TARGETS)}, got {target!r}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if align < 1:
        raise ValueError(f"align must be a positive integer, got {align!r}")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
        raise ValueError(f"floor must be a fraction in [0, 1], got {floor!r}")
    if not isinstance(values, dict):
        values = {l.name: v for l, v in zip(layers, values)}
    g = build(model, layers, pending)  # pending: weights held outside the protobuf (mapped ones included)
    roots = g.roots()
    fixed = g.fixed_roots()
    active = [l for l in layers if not l.excluded]
    plan = ChannelPlan(masks={}, allocation=allocation, align=align, target=target, floor=float(floor),
                       selection="norm" if label_scores is None else "calibrated")
    plan.total = sum(int(values[l.name].size) for l in active)
    plan.target_zeros = int(round(sparsity * plan.total))
    nonzero = {l.name: values[l.name] != 0 for l in active}
    plan.zeros = plan.zeros_before = plan.total - sum(int(np.count_nonzero(v)) for v in nonzero.values())
    plan.kept_by = dict(g.kept_why)
    cost = _macs(model, active, input_shapes, plan, target)  # layer -> (MACs per sample, weight count)
    if cost is not None:
        plan.target_macs = int(round(sparsity * plan.macs_total))
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
    if label_scores is None:
        scores = _scores(g, values, allocation, sparsity)
    else:
        scores = np.asarray(label_scores(g), dtype=np.float64)
        if scores.shape != (len(g.parent),) or np.isnan(scores).any():
            raise ValueError(f"label_scores must return one score per label ({len(g.parent)}, no NaN), got an "
                             f"array of shape {scores.shape}")
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
    least = {n: _least(w, floor, align) for n, w in width.items()}
    plan.min_keep = dict(least)
    masks = {}
    masked = {}  # layer -> weights the masks cover (MACs follow them)
    removed = []
    floored = set()
    macs = 0
    for block in _blocks(g, cand, align):
        if (macs >= plan.target_macs) if target == "macs" else (plan.zeros >= plan.target_zeros):
            break
        hit = _hits(g, [m for *_, own in block for m in own])
        low = [n for n, c in hit.items() if kept[n] - c < least[n]]
        if low:
            floored.update(low)
            continue
        for n, c in hit.items():
            kept[n] -= c
        for score, _, root, own in block:
            before = {n: masked.get(n, 0) for n, _, _ in touches[root]}
            plan.zeros += _mark(masks, nonzero, touches[root], masked)
            if cost is not None:
                macs += sum(_layer_share(cost[n], masked[n]) - _layer_share(cost[n], b) for n, b in before.items())
            removed.append((score, root, own, _hits(g, own)))
    if align > 1:
        removed = _align(removed, kept, width, align, masks, nonzero, touches, plan)
    plan.groups_removed = len(removed)
    plan.masks = {n: m for n, m in masks.items() if m.any()}
    plan.channels = {n: [width[n], width[n] - kept[n]] for n in width if kept[n] != width[n]}
    plan.floored = [n for n in width if n in floored]  # graph order
    if cost is not None:
        plan.macs_removed = sum(_layer_share(cost[n], int(np.count_nonzero(m))) for n, m in plan.masks.items())
    return plan


def _least(width: int, floor: float, align: int) -> int:
    """The fewest output channels a layer of ``width`` may keep: max(1, align, ceil(floor * width))."""
    return max(1, align, math.ceil(round(floor * width, 9)))


def _layer_share(cost, count: int) -> int:
    """MACs per sample of ``count`` weights of a layer with (MACs, weights) ``cost``."""
    total, size = cost
    return total * count // size if size else 0


def _macs(model, active, input_shapes, plan, target):
    """Fill the plan's MACs figures; return {layer: (MACs per sample, weights)} or None where some are unknown
    (ValueError then if the target is MACs)."""
    from .figures import layer_macs
    per = layer_macs(model, active, input_shapes, batch_one=True)
    # a layer read inside an If/Loop/Scan body runs as often as its branch or loop does (data-dependent, no MACs
    # per sample): it is left out of the MACs figures, named in the plan, rather than blocking the target
    conditional = {l.name for l in active if per[l.name] is None
                   and (l.graph or any(c.graph != "" for c in l.consumers))}
    unknown = [n for n, v in per.items() if v is None and n not in conditional]
    if unknown:
        if target == "macs":
            named = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            raise ValueError(f"a MACs target needs every prunable layer's MACs per sample, and the shapes of "
                             f"{named} are not known at the model's declared input shapes"
                             + (f" and {input_shapes}" if input_shapes else "")
                             + ": give the dynamic inputs' shapes with --input-shape NAME:D1,D2,...")
        return None
    plan.macs_excluded = sorted(conditional)
    plan.macs_per_layer = {n: v for n, v in per.items() if n not in conditional}
    plan.macs_total = int(sum(plan.macs_per_layer.values()))
    plan.macs_removed = 0
    return {l.name: ((0, int(l.size)) if l.name in conditional else (int(per[l.name]), int(l.size)))
            for l in active}


def _hits(g, own) -> dict:
    hit = {}
    for m in own:
        name = g.producers[g.owner[m]].layer.name
        hit[name] = hit.get(name, 0) + 1
    return hit


def _blocks(g, cand, align) -> list:
    """Candidates in removal order, blocked among groups that hit the same layers so that each removal keeps
    channel counts aligned (``align`` single channels at a time, or as many multi-channel groups such as
    attention heads as make a multiple of ``align``); a block is scored by its highest member, ties by graph
    order."""
    if align == 1:
        return [[c] for c in cand]
    by_sig = {}
    for c in cand:
        sig = tuple(sorted(_hits(g, c[3]).items()))
        by_sig.setdefault(sig, []).append(c)
    blocks = []
    for k, (sig, items) in enumerate(by_sig.items()):
        # groups per block: the fewest whose channels are a multiple of align in every layer they hit (align
        # single channels; fewer attention heads of several channels each)
        per = 1
        for _, c in sig:
            need = align // math.gcd(align, c)
            per = per * need // math.gcd(per, need)
        for j in range(0, len(items) - per + 1, per):
            chunk = items[j:j + per]
            blocks.append(((chunk[-1][0], chunk[0][1], j), chunk))
    blocks.sort(key=lambda b: b[0])
    return [b for _, b in blocks]


def _mark(masks, nonzero, where, masked: dict | None = None) -> int:
    """Set the mask over every weight of the channel; return how many non-zero weights became zero (``masked``:
    layer -> weights under its mask, updated)."""
    new = 0
    for name, axis, k in where:
        nz = nonzero[name]
        if name not in masks:
            masks[name] = np.zeros(nz.shape, dtype=bool)
        idx = [slice(None)] * nz.ndim
        idx[axis] = k
        idx = tuple(idx)
        free = ~masks[name][idx]
        if masked is not None:
            masked[name] = masked.get(name, 0) + int(np.count_nonzero(free))
        new += int(np.count_nonzero(nz[idx] & free))
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
