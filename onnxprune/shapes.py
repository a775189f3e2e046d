"""Dims of every main-graph tensor: ONNX shape inference on a copy without weight payloads, helped through shape
arithmetic. Inference stops at a Reshape whose target comes from Shape -> Slice/Gather -> Concat when the slice
bounds are Constant nodes (Paddle's attention exports); those small integer values are computed here from the dims
already known (``fold``) and given to a second inference pass as constants."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .layout import node_attr
from .unitops import Shapes

MAX_VALUES = 64  # only small integer tensors (shapes, axes, indices) are ever folded


def _ints(values):
    return values is not None and values.dtype.kind in "iu" and values.size <= MAX_VALUES


def _small(values):
    """A small numeric array (Paddle writes shape pieces as float Constants cast to int64)."""
    return values is not None and values.dtype.kind in "iuf" and values.size <= MAX_VALUES


def _slice(data, starts, ends, axes, steps):
    index = [slice(None)] * data.ndim
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[int(a)] = slice(int(s), int(e), int(st))
    return data[tuple(index)]


def _eval(node, get, dims):
    """The node's single output value, or None where it cannot be computed from what is known."""
    op = node.op_type
    ins = [get(i) if i else None for i in node.input]
    if op == "Shape":
        d = dims.get(node.input[0])
        if d is None or not all(isinstance(x, int) for x in d):
            return None
        start, end = node_attr(node, "start", 0), node_attr(node, "end", None)
        return np.array(d, dtype=np.int64)[start:end]
    if op == "Constant":
        t = node_attr(node, "value")
        if t is not None:
            return numpy_helper.to_array(t)
        for key in ("value_ints", "value_int"):
            v = node_attr(node, key)
            if v is not None:
                return np.array(v, dtype=np.int64)
        return None
    if op == "Identity":
        return ins[0]
    if not ins or ins[0] is None:
        return None
    if op == "Slice":
        if len(ins) < 3 or ins[1] is None or ins[2] is None:
            return None
        axes = ins[3] if len(ins) > 3 else None
        steps = ins[4] if len(ins) > 4 else None
        if (len(node.input) > 3 and node.input[3] and axes is None) or \
                (len(node.input) > 4 and node.input[4] and steps is None):
            return None
        return _slice(ins[0], ins[1], ins[2], axes, steps)
    if op == "Gather":
        if len(ins) < 2 or ins[1] is None:
            return None
        return np.take(ins[0], ins[1], axis=node_attr(node, "axis", 0))
    if op == "Concat":
        if any(v is None for v in ins):
            return None
        return np.concatenate([np.atleast_1d(v) for v in ins], axis=node_attr(node, "axis", 0))
    if op in ("Unsqueeze", "Squeeze"):
        axes = node_attr(node, "axes")
        if axes is None and len(ins) > 1:
            if ins[1] is None:
                return None
            axes = [int(a) for a in ins[1].reshape(-1)]
        data = ins[0]
        if op == "Squeeze":
            return np.squeeze(data, axis=tuple(axes) if axes is not None else None)
        rank = data.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            data = np.expand_dims(data, a)
        return data
    if op == "Cast":
        to = np.dtype(helper.tensor_dtype_to_np_dtype(node_attr(node, "to")))
        if to.kind not in "iuf" or (to.kind in "iu" and not np.all(np.isfinite(ins[0]))):
            return None
        return ins[0].astype(to)
    if op in ("Add", "Sub", "Mul", "Div"):
        if len(ins) < 2 or ins[1] is None:
            return None
        a, b = ins
        if op == "Div":
            if np.any(b == 0) or np.any(a < 0) or np.any(b < 0):
                return None  # ONNX truncates toward zero; only the unambiguous case is folded
            return a // b
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](a, b)
    return None


def fold(nodes, dims: dict, consts: dict) -> dict:
    """{tensor name: small integer array} for every output of ``nodes`` (main graph, in order) that shape
    arithmetic on ``dims`` (fully known dims only) and ``consts`` determines (small float values are carried
    through the arithmetic, never returned)."""
    known = {k: v for k, v in consts.items() if isinstance(v, np.ndarray) and _small(v)}
    out = {}
    for node in nodes:
        if len(node.output) != 1 or not node.output[0]:
            continue
        try:
            with np.errstate(all="ignore"):
                v = _eval(node, known.get, dims)
        except (ValueError, IndexError, TypeError, KeyError):
            v = None
        if v is not None and _small(np.asarray(v)):
            v = np.asarray(v)
            known[node.output[0]] = v
            if node.op_type != "Constant" and _ints(v):
                out[node.output[0]] = v
    return out


# ---------------------------------------------------------------- inference

def infer_shapes(model: onnx.ModelProto) -> Shapes:
    """Dims of every main-graph tensor, by ONNX shape inference on a copy without large weight payloads."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    g.node.extend(model.graph.node)
    consts = {}
    declared = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        small = _numel(t.dims) <= 64 or t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
        if small:
            g.initializer.append(t)
            try:
                consts[t.name] = numpy_helper.to_array(t)
            except Exception:
                pass
        elif t.name not in declared:  # shape inference needs its shape, not its payload: declare it as an input
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and _numel(a.t.dims) <= 64:
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name == "value_ints":
                    consts[n.output[0]] = np.array(a.ints)
    dims, types = _inferred(light)
    injected, values = set(), dict(consts)
    for _ in range(FOLD_ROUNDS):  # shape arithmetic inference could not see through, folded and inferred again
        missing = _unknown(light, dims)
        folded = {k: v for k, v in fold(light.graph.node, dims, values).items() if k not in injected}
        if not missing or not folded:
            break
        renamed = {k: f"{k}::folded" for k in folded}
        for node in light.graph.node:
            for j, name in enumerate(node.input):
                if name in renamed:
                    node.input[j] = renamed[name]
        g.initializer.extend(numpy_helper.from_array(v, renamed[k]) for k, v in folded.items())
        values.update((renamed[k], v) for k, v in folded.items())
        injected |= set(folded)
        again, again_types = _inferred(light)
        if len(_unknown(light, again)) >= len(missing):
            break
        dims, types = again, again_types
    dims = {k: v for k, v in dims.items() if not k.endswith("::folded")}
    for t in model.graph.initializer:
        dims[t.name] = [int(d) for d in t.dims]
    return Shapes(dims, consts, types)


FOLD_ROUNDS = 4  # passes of shape folding + inference (each uncovers the Reshapes the previous one fed)


def _inferred(light):
    """(dims, elem types) of every tensor ONNX shape inference gives for ``light``."""
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:
        inferred = light
    dims, types = {}, {}
    for vi in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims[vi.name] = [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None)
                             for d in vi.type.tensor_type.shape.dim]
    return dims, types


def _unknown(light, dims) -> list:
    """Node outputs whose dims are not all known numbers."""
    return [o for n in light.graph.node for o in n.output
            if o and not (o in dims and all(isinstance(d, int) for d in dims[o]))]


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n
