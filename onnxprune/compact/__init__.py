"""Compaction: physically remove dead channels/neurons so that shapes shrink (exact, ONNX in, ONNX out)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..graph import find_layers
from .decide import decide
from .labels import build
from .rewrite import apply

__all__ = ["compact", "compact_loaded", "CompactResult", "LayerCompaction"]


@dataclass
class LayerCompaction:
    name: str
    op: str
    channels_before: int  # output channels/neurons (input channels for a layer that only reads compacted ones)
    channels_after: int
    params_before: int
    params_after: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CompactResult:
    model: onnx.ModelProto = field(repr=False)
    layers: list = field(default_factory=list)  # LayerCompaction for every prunable layer whose shape changed
    channels_removed: int = 0  # output channels/neurons removed over all prunable layers
    params_before: int = 0  # all prunable layers
    params_after: int = 0
    kept_by: dict = field(default_factory=dict)  # op (or "graph output") -> channel references it kept
    folded_into: list = field(default_factory=list)  # layers whose bias took a removed channel's constant
    applied: bool = True
    align: int = 1

    def to_dict(self) -> dict:
        return {"applied": self.applied, "align": self.align, "channels_removed": self.channels_removed,
                "params_before": self.params_before, "params_after": self.params_after,
                "params_removed": self.params_before - self.params_after,
                "layers": [l.to_dict() for l in self.layers], "kept_by": dict(sorted(self.kept_by.items())),
                "folded_into": list(self.folded_into)}


def compact(model: onnx.ModelProto, layers=None, align: int = 1, inplace: bool = False,
            apply_changes: bool = True, pending: dict | None = None) -> CompactResult:
    """Remove the dead output channels/neurons of every prunable layer, and everything that only they feed.

    A channel goes when every layer that reads it reads it with all-zero weights (after the removals decided
    in the same pass), or when it carries a constant (its producer's weights are all zero: bias, then BN and
    activations, computed exactly) that each reader can take into its bias: Gemm, MatMul followed by an Add
    bias, unpadded Conv; a zero constant needs no bias. Channels tied by residual Adds (or any element-wise op)
    go only together; channels that reach a graph output or an op this module does not understand stay.
    ``align`` > 1 keeps each layer's output channel count a multiple of ``align`` (or unchanged) by keeping its
    highest-norm dead channels; no tensor loses all its channels. ``apply_changes=False`` reports what would
    go without touching the model. The model is copied unless ``inplace``. ``pending``: weights held outside the
    protobuf (``io.LoadedModel.pending``), read and rewritten there (in place only).
    """
    if align < 1:
        raise ValueError(f"align must be a positive integer, got {align!r}")
    if pending and apply_changes and not inplace:
        raise ValueError("pending weights are compacted in place only")
    if not inplace and apply_changes:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model, layers = copy, None
    if layers is None:
        layers, _ = find_layers(model)
    g = build(model, layers, pending)
    gone = decide(g, align)
    before = {l.name: (l.size, _channels(l)) for l in layers}
    res = CompactResult(model=model, applied=apply_changes, align=align, kept_by=dict(g.kept_why))
    res.params_before = sum(s for s, _ in before.values())
    after_ch = {}
    for p in g.producers:
        chan = g.chans.get(p.out)
        if chan is not None:
            after_ch[p.layer.name] = int((~gone[chan.lab]).sum())
    sizes = _sizes_after(g, gone, layers)
    if apply_changes:
        info = apply(g, gone)
        res.folded_into = info["folded"]
    for l in layers:
        p_before, c_before = before[l.name]
        p_after = sizes.get(l.name, p_before)
        c_after = after_ch.get(l.name, c_before)
        res.params_after += p_after
        res.channels_removed += c_before - c_after
        if p_after != p_before:
            res.layers.append(LayerCompaction(l.name, l.op, c_before, c_after, p_before, p_after))
    return res


def compact_loaded(loaded, layers=None, align: int = 1) -> CompactResult:
    """``compact`` in place on an ``io.LoadedModel``, keeping its record of externally stored tensors right.

    ``loaded.external`` is keyed by position in ``checks.all_tensors`` order, and compaction adds (new biases) and
    removes (constants it replaced) tensors: the record is re-keyed by tensor name, so the tensors that were
    external stay external when the model is saved.
    """
    from ..checks import all_tensors
    model = loaded.model
    before = [t.name for t, _ in all_tensors(model)] if loaded.external else None
    res = compact(model, layers=layers, align=align, inplace=True, pending=loaded.pending)
    if before is not None:
        by_name = {before[i]: info for i, info in loaded.external.items() if i < len(before) and before[i]}
        loaded.external = {i: by_name[t.name] for i, (t, _) in enumerate(all_tensors(model)) if t.name in by_name}
    return res


def _channels(layer) -> int:
    shape = [int(d) for d in layer.tensor.dims]
    ax = layer.consumers[0].layout.out_axis
    return shape[ax] if ax is not None and shape else 1


def _sizes_after(g, gone, layers) -> dict:
    """Weight count of each layer after removal, from its kept output and input channels."""
    out = {}
    shapes = {l.name: [int(d) for d in l.tensor.dims] for l in layers}
    for p in g.producers:
        chan = g.chans.get(p.out)
        if chan is not None:
            shapes[p.layer.name][p.w_axis] = int((~gone[chan.lab]).sum())
    for r in g.readers:
        chan = g.chans.get(r.data)
        if chan is not None:
            shapes[r.layer.name][r.w_axis] = int((~gone[chan.lab]).sum())
    for l in layers:
        out[l.name] = int(np.prod(shapes[l.name])) if shapes[l.name] else 1
    return out
