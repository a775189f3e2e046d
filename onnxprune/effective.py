"""The effective-sparsity stage: views of the weights before and after selection, effective counts, detached-unit
removal and collapsed outputs for the report."""
from __future__ import annotations

import logging

import numpy as np

from .io.mapped import mask_values
from .selection import exact_counts

log = logging.getLogger("onnxprune")


class Weights:
    """layer name -> values after selection, rebuilt from the original values and the kept flags on each access
    (no second copy of the model is held; the array may live in a reused buffer)."""

    def __init__(self, layers, values, kept, buffer):
        self.index = {l.name: i for i, l in enumerate(layers)}
        self.values, self.kept, self.buffer = values, kept, buffer

    def _flags(self, i):
        w = self.values[i]
        return np.unpackbits(self.kept[i], count=w.size).view(bool).reshape(w.shape)

    def masked(self, i, fresh: bool = False):
        """The layer's values after selection: in the reused scratch buffer, or a new array when ``fresh``."""
        w = self.values[i]
        if i not in self.kept:
            return w
        out = np.empty_like(w) if fresh else self.buffer.like(w)
        return mask_values(w, self._flags(i), out)

    def __getitem__(self, name):
        return self.masked(self.index[name])

    def own(self, name):
        """A new, writable array of the layer's values after selection (the caller may keep it)."""
        i = self.index[name]
        return self.masked(i, fresh=True) if i in self.kept else np.array(self.values[i])

    def nonzero(self, name):
        """Boolean non-zero flags after selection (what the unit graph needs), without rebuilding the values."""
        i = self.index[name]
        return self._flags(i) if i in self.kept else (self.values[i] != 0)


class Dense:
    """layer name -> non-zero flags of the weights before pruning (``before``: packed flags of the layers that
    reconstruction refit, None where every weight was non-zero)."""

    def __init__(self, layers, values):
        self.index = {l.name: i for i, l in enumerate(layers)}
        self.layers, self.values, self.before = layers, values, {}

    def nonzero(self, name):
        i = self.index[name]
        w = self.values[i]
        if i not in self.before:
            return w != 0
        if self.before[i] is None:
            return np.ones(w.shape, dtype=bool)
        return np.unpackbits(self.before[i], count=w.size).view(bool).reshape(w.shape)

    def __getitem__(self, name):
        return self.nonzero(name)


def connectivity_stage(model, layers, rows, weights, config, report, shapes=None, flush=None, write=None,
                  pending=None, dense=None) -> None:
    """Effective sparsity for the report; detached-unit removal unless switched off (or a dry run), its new
    values stored through ``write``; outputs the pruning cut off from the inputs (``dense``: the weights before
    pruning)."""
    from .collapse import collapsed_outputs
    from .connectivity import effective_counts
    from .removal import remove_detached
    res = effective_counts(model, layers, weights, shapes)
    info = {"mode": "channel", "note": "exact for MLPs; a lower bound on effective sparsity for CNNs",
            "unknown_ops": res.unknown_ops, "layers_not_analysed": [l.name for l in layers
                                                                     if l.name not in res.exact_layers]}
    counts = res.effective_count
    if config.effective_mode == "exact":
        exact, why = exact_counts(model, layers, weights, res.shapes, config.input_shapes)
        if exact is not None:
            counts = exact
            info.update(mode="exact", note="per (channel, position): also catches taps that only read padding")
        else:
            info["note"] += f"; exact mode not possible here ({why}), channel-level used"
            report.warnings.append(f"--effective-mode exact: {why}; channel-level analysis used instead")
    for row in rows:
        row.effective_zeros = row.params - counts[row.name]
    if config.effective and not config.dry_run:
        removal = remove_detached(model, res, layers, weights, before_probe=flush, write=write, pending=pending)
        for row, layer in zip(rows, layers):
            row.zeros_after_selection = row.zeros_after
            row.zeros_after += removal.rewritten.get(layer.name, 0)
        info["removal"] = {"zeroed_dead_outputs": removal.zeroed_dead_out,
                           "folded_constant_inputs": removal.folded_const_in,
                           "left_in_place": removal.left_in_place, "biases_changed": removal.biases_changed,
                           "passes": removal.passes, "fixed_point": removal.converged}
        for note in removal.notes:
            report.warnings.append(note)
    report.connectivity = info
    if dense is not None:
        # from the weights as selected: removal changes no output's reach (it zeroes only weights of units that
        # reach no output or that no input reaches), but it may empty the layers around the one pruning emptied
        collapse = collapsed_outputs(model, layers, res, dense)
        report.collapsed_outputs = collapse.outputs
        for msg in collapse.warnings():
            report.warnings.append(msg)
            log.warning(msg)
