"""Shape arithmetic folded to constants: ONNX shape inference stops at a Reshape whose target comes from
Shape -> Slice/Gather -> Concat when the slice bounds are Constant nodes (Paddle's attention exports). Those small
integer values are computed here from the dims already known, so that a second inference pass sees through them."""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

MAX_VALUES = 64  # only small integer tensors (shapes, axes, indices) are ever folded


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


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
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return np.array(d, dtype=np.int64)[start:end]
    if op == "Constant":
        t = _attr(node, "value")
        if t is not None:
            return numpy_helper.to_array(t)
        for key in ("value_ints", "value_int"):
            v = _attr(node, key)
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
        return np.take(ins[0], ins[1], axis=_attr(node, "axis", 0))
    if op == "Concat":
        if any(v is None for v in ins):
            return None
        return np.concatenate([np.atleast_1d(v) for v in ins], axis=_attr(node, "axis", 0))
    if op in ("Unsqueeze", "Squeeze"):
        axes = _attr(node, "axes")
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
        to = np.dtype(helper.tensor_dtype_to_np_dtype(_attr(node, "to")))
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
