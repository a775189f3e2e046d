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
from onnx import numpy_helper

from .connectivity import Analysis, unit_flags, _in_axis
from .graph import _resolve, _Scope
from .io import read_tensor, write_tensor

log = logging.getLogger("onnxprune")


@dataclass
class Removal:
    zeroed_dead_out: int = 0
    folded_const_in: int = 0
    left_in_place: int = 0
    biases_changed: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == a.FLOAT else a.i if a.type == a.INT else list(a.ints)
    return default


def _uses(model) -> dict:
    uses = {}
    for n in model.graph.node:
        for i in n.input:
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
        name, scale = node.input[2], float(_attr(node, "beta", 1.0))
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


def _probe(model, names, shapes, seed=0):
    """Values of the named tensors on two synthetic samples (None where shapes or types are unknown)."""
    if not names:
        return {}
    try:
        import onnxruntime as ort
        from .data import input_specs, synthesize
        from .validate import quiet_native_stderr
        m = onnx.ModelProto()
        m.CopyFrom(model)
        types = getattr(shapes, "types", {})
        for n in names:
            if n not in types:
                return {}
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, types[n], None))
        ds = synthesize(input_specs(model), 2, 1, seed, {})
        so = ort.SessionOptions()
        so.log_severity_level = 3
        with quiet_native_stderr():
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        vals = sess.run(list(names), ds.batches[0])
        return dict(zip(names, vals))
    except Exception as exc:  # no probe, no folding: everything stays in place
        log.info("constant probe skipped: %s", exc)
        return {}


def remove_detached(model, res: Analysis, layers, weights: dict) -> Removal:
    """Apply removal in place on ``model`` (and ``weights``: layer name -> masked array); returns counts."""
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
    single = {name: idxs[0] for name, idxs in per_layer.items()
              if len(idxs) == 1 and len(res.ops[idxs[0]].layer.consumers) == 1}
    plans = []
    need_probe = []
    for name, idx in single.items():
        node, lop = nodes[idx], res.ops[idx]
        in_vec, out_vec = unit_flags(res, idx, node)
        w = weights[name]
        nz = w != 0
        dead_out = nz & ~lop.element_mask(w, np.ones_like(in_vec), out_vec)
        const_in = nz & ~dead_out & ~lop.element_mask(w, in_vec, np.ones_like(out_vec))
        if not dead_out.any() and not const_in.any():
            continue
        bias = _bias(model, node, lop, scope, uses, consumers)
        plans.append((name, idx, node, lop, in_vec, out_vec, dead_out, const_in, bias))
        if const_in.any() and bias is not None and _foldable_conv(node, lop):
            need_probe.append(node.input[lop.data_slot])
    values = _probe(model, sorted(set(need_probe)), res.shapes)
    for name, idx, node, lop, in_vec, out_vec, dead_out, const_in, bias in plans:
        w = np.array(weights[name])
        changed_bias = None
        if bias is not None:
            b_arr = read_tensor(bias[0]).astype(np.float64).reshape(-1)
        if dead_out.any():
            w[dead_out] = 0
            out.zeroed_dead_out += int(dead_out.sum())
            if bias is not None:
                b_arr[~out_vec] = 0.0
                changed_bias = b_arr
        if const_in.any():
            consts = _constants(values.get(node.input[lop.data_slot]), lop, node, res, ~in_vec)
            if consts is None or bias is None:
                out.left_in_place += int(const_in.sum())
            else:
                contrib = _contribution(w, const_in, consts, lop)
                b_arr = b_arr + contrib / bias[1]
                changed_bias = b_arr
                w[const_in] = 0
                out.folded_const_in += int(const_in.sum())
        weights[name] = w
        write_tensor(lop.layer.tensor, w)
        if changed_bias is not None:
            tensor = bias[0]
            write_tensor(tensor, changed_bias.astype(read_tensor(tensor).dtype).reshape([int(d) for d in tensor.dims]))
            out.biases_changed.append(tensor.name or node.name)
    return out


def _foldable_conv(node, lop) -> bool:
    if node.op_type not in ("Conv", "ConvTranspose"):
        return True
    if node.op_type == "ConvTranspose":
        return False
    pads = _attr(node, "pads", None)
    auto = None
    for a in node.attribute:
        if a.name == "auto_pad":
            auto = a.s.decode()
    # every output position must see the whole kernel over the constant input: no padding at all
    return (not pads or not any(pads)) and auto in (None, "NOTSET", "VALID")


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
        if row.size == 0 or not np.all(row == row[0]):
            return None
        consts[i] = row[0]
    return consts


def _contribution(w, const_in, consts, lop) -> np.ndarray:
    """Per output unit: sum over the folded weights of weight * constant input (float64)."""
    w64 = np.where(const_in, w.astype(np.float64), 0.0)
    op = lop.node.op_type
    if op == "Conv":
        g, ci = lop.groups, lop.c_in // lop.groups
        co = lop.c_out // g
        per = w64.reshape(lop.c_out, ci, -1).sum(axis=2)  # [O, ci]
        c = consts.reshape(g, ci)[np.arange(lop.c_out) // co]  # [O, ci]
        return (per * c).sum(axis=1)
    kn = w64 if lop._layout().in_axis % 2 == 0 else w64.T  # [K, N]
    return consts @ kn
