"""Detached-unit removal: zero what cannot matter, fold what is constant, leave the rest.

* Output units that reach no graph output: their weights and bias entries are zeroed (exact: nothing reads them).
* Input units that no graph input reaches carry a constant. Where that is exact (Gemm, MatMul + Add bias, and
  1x1 or unpadded convolutions with a bias), the constant's contribution moves into the consumer's bias and the
  weights are zeroed. The constants are read by running the masked model once in ONNX Runtime and are checked to
  be constant across samples and positions; anything else stays in place.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from .connectivity import Analysis, _in_axis, analyse, node_reads, per_out_counts, unit_flags
from .graph import _resolve, _Scope
from .errors import raise_if_interrupted
from .io import read_tensor, write_tensor
from .layout import node_attr, unpadded

log = logging.getLogger("onnxprune")


@dataclass
class Removal:
    zeroed_dead_out: int = 0
    folded_const_in: int = 0
    left_in_place: int = 0
    biases_changed: list = field(default_factory=list)
    rewritten: dict = field(default_factory=dict)  # layer name -> weights it zeroed
    notes: list = field(default_factory=list)
    changed: bool = False  # a weight or a bias changed (one pass)
    passes: int = 0  # analysis + removal passes run to reach the fixed point
    converged: bool = False  # the last pass changed nothing: removal run again would change nothing


def _uses(model) -> dict:
    """Readers of each main-graph name: node inputs, names If/Loop/Scan bodies read from the outer graph, outputs."""
    uses = {}
    for n in model.graph.node:
        for i in node_reads(n):
            uses[i] = uses.get(i, 0) + 1
    for o in model.graph.output:
        uses[o.name] = uses.get(o.name, 0) + 1
    return uses


def _bias(model, node, lop, scope, uses, consumers):
    """(TensorProto, scale) holding the per-output-unit bias of ``node``, if it is exclusively ours."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose") and len(node.input) > 2 and node.input[2]:
        name, scale = node.input[2], 1.0
    elif op == "Gemm" and len(node.input) > 2 and node.input[2]:
        name, scale = node.input[2], float(node_attr(node, "beta", 1.0))
    elif op == "MatMul" and lop.data_slot == 0:
        out = node.output[0]
        nxt = consumers.get(out, [])
        if len(nxt) != 1 or uses.get(out, 0) != 1 or nxt[0].op_type != "Add":
            return None
        add = nxt[0]
        name, scale = (add.input[1] if add.input[0] == out else add.input[0]), 1.0
    else:
        return None
    if scale == 0 or uses.get(name, 0) != 1:
        return None
    hit = _resolve(name, scope)
    if hit is None:
        return None
    tensor = hit[2]
    if hit[3] == "initializer" and any(i.name == hit[1] for i in model.graph.input):
        return None
    dims = [int(d) for d in tensor.dims]
    if int(np.prod(dims)) != lop.c_out or any(d != 1 for d in dims[:-1]):
        return None
    return tensor, scale


PROBE_MAX_BYTES = 1 << 30  # the probe runs a copy of the model: above this, constants stay in place


def _probe(model, names, shapes, seed=0, pending=None):
    """Values of the named tensors on two synthetic samples (None where shapes or types are unknown). ``pending``:
    main-graph weights held outside the protobuf (``io.LoadedModel.pending``); the probe's copy gets them."""
    if not names:
        return {}
    pending = pending or {}
    if model.ByteSize() + sum(a.nbytes for a in pending.values()) > PROBE_MAX_BYTES:
        log.info("constant probe skipped: model over %d bytes", PROBE_MAX_BYTES)
        return {}
    try:
        from .data import input_specs, synthesize
        from .validate import import_ort, quiet_native_stderr, session_options
        ort = import_ort()
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for t in m.graph.initializer:
            if t.name in pending:
                write_tensor(t, pending[t.name])
        types = shapes.types
        for n in names:
            if n not in types:
                return {}
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, types[n], None))
        ds = synthesize(input_specs(model), 2, 1, seed, {})
        # ONNX Runtime's native log lines reach stderr only with -v (as in validate.make_session)
        quiet = not log.isEnabledFor(logging.DEBUG)
        with quiet_native_stderr(quiet):
            sess = ort.InferenceSession(m.SerializeToString(), session_options(quiet, spin=False),
                                        providers=["CPUExecutionProvider"])
            vals = sess.run(list(names), ds.batches[0])
        return dict(zip(names, vals))
    except Exception as exc:  # no probe, no folding: everything stays in place
        raise_if_interrupted(exc)
        log.info("constant probe skipped: %s", exc)
        return {}


MAX_PASSES = 8  # removal repeats until a pass changes nothing (two passes and a check on every model seen)


class _Current:
    """The weights as removal left them: the arrays it wrote, else the caller's (masked) values."""

    def __init__(self, base):
        self.base, self.new = base, {}

    def __getitem__(self, name):
        return self.new[name] if name in self.new else self.base[name]

    def own(self, name):
        return np.array(self.new[name]) if name in self.new else self.base.own(name)

    def nonzero(self, name):
        if name in self.new:
            return self.new[name] != 0
        if hasattr(self.base, "nonzero"):
            return self.base.nonzero(name)
        return self.base[name] != 0


def remove_detached(model, res: Analysis, layers, weights, before_probe=None, write=None,
                    pending=None) -> Removal:
    """Apply removal in place on ``model``, to its fixed point, on the layers ``res`` (``effective_counts``'s
    analysis) analysed exactly. ``weights.own(name)`` gives a new array of a
    layer's current (masked) values; only layers that lose weights are read again and rewritten, by
    ``write(layer, values)`` (which keeps the array) when given, else into the layer's tensor. ``before_probe``
    stores every pruned weight (in the model or in ``pending``) before the constant probe runs the pruned model.

    One pass is not always a fixed point: a constant input folded into its consumer's bias leaves the unit that
    produced it reaching nothing, so the next analysis finds its bias entry (and its weights) dead. Passes repeat,
    each on a fresh analysis of what the previous one left, until one changes no weight and no bias (at most
    ``MAX_PASSES``): running removal again on the result then changes nothing. Counts add up over the passes;
    ``left_in_place`` is the last pass's (what stays)."""
    out = Removal()
    current = _Current(weights)
    unfoldable = {}  # layer name -> unreached input flags the probe could not fold (not probed again for those)
    # only the layers ``effective_counts`` analysed exactly: a weight also read besides its layers (a tied
    # embedding's Gather, a graph output) is left as selected, as a unit dead for its layer may live for that reader
    exact = set(res.exact_layers)
    for k in range(MAX_PASSES):
        if k:
            res = analyse(model, layers, current, res.shapes)
        step = _remove_once(model, res, current, before_probe, write, pending, unfoldable, exact)
        out.passes = k + 1
        out.zeroed_dead_out += step.zeroed_dead_out
        out.folded_const_in += step.folded_const_in
        out.left_in_place = step.left_in_place
        for name in step.biases_changed:
            if name not in out.biases_changed:
                out.biases_changed.append(name)
        for name, n in step.rewritten.items():
            out.rewritten[name] = out.rewritten.get(name, 0) + n
        if not step.changed:
            out.converged = True
            break
    else:
        out.notes.append(f"removal still changed the model after {MAX_PASSES} passes; stopped there")
        log.info(out.notes[-1])
    return out


def _remove_once(model, res: Analysis, weights, before_probe, write, pending, unfoldable, exact) -> Removal:
    """One removal pass on the analysis ``res`` of the current weights; ``changed`` says whether it changed a
    weight or a bias (writes go through ``weights.new`` too, so the next pass sees them)."""
    out = Removal()
    nodes = list(model.graph.node)
    scope = _Scope(model.graph, "", None)
    uses = _uses(model)
    consumers = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    per_layer = {}
    for idx, lop in res.ops.items():
        per_layer.setdefault(lop.layer.name, []).append(idx)
    plans, need_probe = [], []
    for name, idxs in per_layer.items():
        if len(idxs) != 1 or len(res.ops[idxs[0]].layer.consumers) != 1 or name not in exact:
            continue  # a tied weight, or one read besides its layer: what is dead for one use may live for another
        idx = idxs[0]
        node, lop = nodes[idx], res.ops[idx]
        in_vec, out_vec = unit_flags(res, idx, node)
        if in_vec.all() and out_vec.all():
            continue  # every unit lives: nothing to remove
        # counts come from the analysis' per-(group, in, out) non-zero blocks: no pass over the weight
        cnt, g = res.counts[idx], lop.groups
        outs, unreached_in = out_vec.reshape(g, -1), ~in_vec.reshape(g, -1)
        dead_out = alive_const_in = 0
        for k in range(g):
            dead_out += int(per_out_counts(cnt, k)[~outs[k]].sum())
            alive_const_in += int(per_out_counts(cnt, k, unreached_in[k])[outs[k]].sum())
        bias = _bias(model, node, lop, scope, uses, consumers)
        fold = bool(alive_const_in) and bias is not None and _foldable_conv(node, lop) \
            and unfoldable.get(name) != in_vec.tobytes()
        plans.append((name, idx, node, lop, in_vec, out_vec, bias, dead_out, alive_const_in, fold))
        if fold:
            need_probe.append(node.input[lop.data_slot])
    if need_probe and before_probe is not None:
        before_probe()  # the model must hold the pruned weights when it is run
    values = _probe(model, sorted(set(need_probe)), res.shapes, pending=pending) if need_probe else {}
    for name, idx, node, lop, in_vec, out_vec, bias, dead_out, alive_const_in, fold in plans:
        b_stored = read_tensor(bias[0]) if bias is not None else None  # decoded once: values and dtype
        b_arr = b_stored.astype(np.float64).reshape(-1) if bias is not None else None
        if b_arr is not None and not out_vec.all():
            b_arr[~out_vec] = 0.0
        zeroed = dead_out
        unreached = np.flatnonzero(~in_vec)
        consts = _constants(values.get(node.input[lop.data_slot]), lop, node, res, ~in_vec) if fold else None
        w = weights.own(name) if dead_out or consts is not None else None  # a new array: handed to ``write``
        if dead_out:
            dead = np.flatnonzero(~out_vec)
            where = lop.out_broadcast(~out_vec)
            if where is not None:  # one contiguous pass instead of a strided scatter
                np.copyto(w, 0, where=where)
            else:
                for u in dead:
                    w[lop.out_index(int(u))] = 0
            out.zeroed_dead_out += dead_out
        if alive_const_in:
            folded = None
            if consts is not None:
                with np.errstate(all="ignore"):
                    contrib = np.zeros(lop.c_out)
                    for i in unreached:
                        sl, targets = lop.in_index(int(i))
                        part = w[sl].astype(np.float64)
                        contrib[targets] += consts[i] * part.reshape(len(targets), -1).sum(axis=1)
                    folded = b_arr + contrib / bias[1]
                    # the new bias must be representable in the bias' own dtype (fp16 saturates at 65504)
                    if not np.isfinite(folded.astype(b_stored.dtype)).all():
                        folded = None
            if folded is None:
                out.left_in_place += alive_const_in
                if fold:
                    unfoldable[name] = in_vec.tobytes()
            else:
                for i in unreached:
                    w[lop.in_index(int(i))[0]] = 0
                b_arr = folded
                out.folded_const_in += alive_const_in
                zeroed += alive_const_in
        if zeroed:
            if write is not None:
                write(lop.layer, w)
            else:
                write_tensor(lop.layer.tensor, w)
            weights.new[name] = w
            out.rewritten[name] = zeroed
            out.changed = True
        if b_arr is not None:
            new = b_arr.astype(b_stored.dtype).reshape([int(d) for d in bias[0].dims])
            if new.tobytes() != np.ascontiguousarray(b_stored).tobytes():
                write_tensor(bias[0], new)
                out.biases_changed.append(bias[0].name or node.name)
                out.changed = True
    return out


def _foldable_conv(node, lop) -> bool:
    if node.op_type not in ("Conv", "ConvTranspose"):
        return True
    if node.op_type == "ConvTranspose":
        return False
    return unpadded(node)  # every output position must see the whole kernel over the constant input


def _constants(x, lop, node, res, unreached):
    """Per input unit: its constant value where every sample and position agrees (None if any does not)."""
    if x is None:
        return None
    axis = _in_axis(lop, node.input[lop.data_slot], res.shapes)
    if axis is None or x.shape[axis] != lop.c_in:
        return None
    moved = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0).reshape(lop.c_in, -1)
    consts = np.zeros(lop.c_in)
    for i in np.flatnonzero(unreached):
        row = moved[i]
        if row.size == 0 or not np.isfinite(row[0]) or not np.all(row == row[0]):
            return None
        consts[i] = row[0]
    return consts
