"""How units (channels/features) flow through non-prunable ONNX ops, forward and backward.

A tensor's units are ``Units(axis, vec)``: ``vec`` holds one value per index of ``axis`` (its channel axis), or
``axis is None`` and ``vec`` has one value for the whole tensor (aggregated). Values are booleans (reachability,
combined with OR) or floats (lookahead norms, combined with +). An op this module does not understand mixes
everything: the result is aggregated, which never claims a unit dead that might be alive.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layout import node_attr


@dataclass
class Units:
    axis: int | None
    vec: np.ndarray

    @staticmethod
    def agg(value) -> "Units":
        return Units(None, np.array([value]))

    def on(self, axis: int, size: int, mode) -> np.ndarray:
        """A vector of ``size`` values along ``axis`` (aggregated or mismatched axes are spread)."""
        if self.axis == axis and self.vec.size == size:
            return self.vec
        return np.full(size, self.vec.any() if mode.boolean else mode.spread(self), dtype=mode.dtype)


class Mode:
    """Boolean reachability (OR) or float norms (sum)."""

    def __init__(self, boolean: bool, scale=None):
        self.boolean = boolean
        self.dtype = bool if boolean else np.float64
        self.scale = scale  # float mode: node -> per-channel multiplier (BatchNormalization) or None

    def combine(self, a, b):
        return (a | b) if self.boolean else (a + b)

    def spread(self, u: Units):
        # for norms an aggregated value stands for each unit; a vector on another axis averages out
        return float(u.vec.mean()) if u.axis is not None else float(u.vec[0])

    def zero(self):
        return False if self.boolean else 0.0


UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
    "Softsign", "Gelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
    "Sin", "Cos", "Clip", "Identity", "Dropout", "Cast", "CastLike", "BatchNormalization", "InstanceNormalization",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Pad", "Resize",
    "Upsample", "Mish", "ThresholdedRelu", "Shrink", "IsNaN", "IsInf", "Not", "Pow",
}
BINARY = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Where", "Equal", "Less", "Greater", "And", "Or"}
# inputs after the first that are parameters, not data, for the ops that have them
DATA_INPUTS = {"BatchNormalization": 1, "InstanceNormalization": 1, "Clip": 1, "Pad": 1, "Resize": 1,
               "Upsample": 1, "Dropout": 1, "PRelu": 1, "LayerNormalization": 1, "Pow": 1, "CastLike": 1}
HANDLED = UNARY | BINARY | {"MatMul", "Concat", "Split", "Slice", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                            "Softmax", "LogSoftmax", "LayerNormalization", "ReduceMean", "ReduceSum", "ReduceMax",
                            "ReduceMin", "ReduceL2", "ReduceProd"}


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


class Shapes:
    """Ranks and dims of every tensor, from ONNX shape inference."""

    def __init__(self, dims: dict, consts: dict, types: dict | None = None):
        self.dims, self.consts, self.types = dims, consts, types or {}

    def rank(self, name):
        d = self.dims.get(name)
        return None if d is None else len(d)

    def dim(self, name, axis):
        d = self.dims.get(name)
        if d is None or axis is None or axis >= len(d):
            return None
        return d[axis]


def forward(node, ins: list, shapes: Shapes, mode: Mode):
    """Units of each output of ``node`` from the Units of its inputs (None for an absent input)."""
    op = node.op_type
    data = [u for u in ins[: DATA_INPUTS.get(op, len(ins))] if u is not None]
    out_names = [o for o in node.output]
    if op in UNARY and data:
        return [_scaled(node, data[0], mode)] + [Units.agg(mode.zero()) for _ in out_names[1:]]
    if op in BINARY:
        return [_broadcast_merge(node, ins, shapes, mode)]
    handler = _FORWARD.get(op)
    if handler is not None:
        res = handler(node, ins, shapes, mode)
        if res is not None:
            return res
    return [_mix(ins, mode)] * len(out_names)


def backward(node, ins: list, outs: list, shapes: Shapes, mode: Mode):
    """Units flowing back to each input of ``node`` from the Units at its outputs (None: output unused)."""
    op = node.op_type
    outs_present = [u for u in outs if u is not None]
    if not outs_present:
        return [None] * len(node.input)
    if op in UNARY:
        res = [_scaled(node, outs[0], mode) if outs[0] is not None else _mix(outs_present, mode)]
        return res + [_mix(outs_present, mode)] * (len(node.input) - 1)
    if op in BINARY:
        return _broadcast_back(node, outs[0], shapes, mode)
    handler = _BACKWARD.get(op)
    if handler is not None:
        res = handler(node, outs, shapes, mode)
        if res is not None:
            return res + [_mix(outs_present, mode)] * (len(node.input) - len(res))
    return [_mix(outs_present, mode)] * len(node.input)


def _scaled(node, u: Units, mode):
    """Float mode: BatchNormalization multiplies a channel's factor by its squared scale."""
    if mode.boolean or mode.scale is None or node.op_type != "BatchNormalization":
        return u
    s = mode.scale(node)
    if s is None:
        return u
    if u.axis == 1 and u.vec.size == s.size:
        return Units(1, u.vec * s)
    return Units(1, np.full(s.size, mode.spread(u)) * s) if u.axis is None else u


def _mix(units, mode):
    units = [u for u in units if u is not None]
    if not units:
        return Units.agg(mode.zero())
    if mode.boolean:
        return Units.agg(any(bool(u.vec.any()) for u in units))
    return Units.agg(float(sum(mode.spread(u) for u in units)))


def _out_axis(name_in, u: Units, shapes, name_out):
    """Where the channel axis of input ``name_in`` lands in the broadcast output."""
    if u.axis is None:
        return None
    r_in, r_out = shapes.rank(name_in), shapes.rank(name_out)
    if r_in is None or r_out is None:
        return None
    a = u.axis + (r_out - r_in)
    d = shapes.dim(name_in, u.axis)
    return a if d == u.vec.size and d != 1 else None


def _broadcast_merge(node, ins, shapes, mode):
    out = node.output[0]
    vecs, scal = [], []
    for name, u in zip(node.input, ins):
        if u is None:
            continue
        a = _out_axis(name, u, shapes, out)
        if a is None:
            scal.append(u)
        else:
            vecs.append((a, u.vec))
    if not vecs:
        return _mix(scal, mode)
    axis, size = vecs[0][0], vecs[0][1].size
    if any(a != axis or v.size != size for a, v in vecs):
        return _mix(ins, mode)
    acc = np.full(size, mode.zero(), dtype=mode.dtype)
    for _, v in vecs:
        acc = mode.combine(acc, v)
    for u in scal:
        acc = mode.combine(acc, np.full(size, u.vec.any() if mode.boolean else mode.spread(u), dtype=mode.dtype))
    return Units(axis, acc)


def _broadcast_back(node, out_u, shapes, mode):
    out = node.output[0]
    res = []
    for name in node.input:
        r_in, r_out = shapes.rank(name), shapes.rank(out)
        if out_u is None:
            res.append(None)
            continue
        if out_u.axis is not None and r_in is not None and r_out is not None:
            a = out_u.axis - (r_out - r_in)
            if a >= 0 and shapes.dim(name, a) == out_u.vec.size:
                res.append(Units(a, out_u.vec))
                continue
        res.append(_mix([out_u], mode))
    return res


# ---------------------------------------------------------------- shape-moving ops

def _pieces(vec, ax, sizes):
    """Cut a unit vector along ``ax`` into consecutive pieces (Concat backward, Split forward)."""
    offs = np.cumsum([0] + list(sizes))
    return [Units(ax, vec[offs[i]:offs[i + 1]]) for i in range(len(sizes))]


def _joined(units, ax, sizes, mode):
    """Join per-piece units along ``ax`` (Concat forward, Split backward); missing pieces are zero."""
    return Units(ax, np.concatenate([u.on(ax, s, mode) if u is not None else np.full(s, mode.zero(), dtype=mode.dtype)
                                     for u, s in zip(units, sizes)]))


def _join(node, units, whole, pieces, shapes, mode):
    """Units of ``whole`` from the units of its ``pieces`` along the op's axis: Concat forward, Split backward.
    Pieces with their channels on another (common) axis are combined instead."""
    r = shapes.rank(whole)
    if r is None:
        return None
    ax = norm_axis(node_attr(node, "axis", 0), r)
    sizes = [shapes.dim(n, ax) for n in pieces]
    axes = {u.axis for u in units if u is not None and u.axis is not None}
    if axes == {ax} and all(isinstance(s, int) for s in sizes):
        return _joined(units, ax, sizes, mode)
    if len(axes) == 1 and ax not in axes:
        (axis,) = axes
        size = next(u.vec.size for u in units if u is not None and u.axis == axis)
        if all(u is None or u.axis is None or u.vec.size == size for u in units):
            acc = np.full(size, mode.zero(), dtype=mode.dtype)
            for u in units:
                if u is not None:
                    acc = mode.combine(acc, u.on(axis, size, mode))
            return Units(axis, acc)
    return None


def _concat_fwd(node, ins, shapes, mode):
    res = _join(node, ins, node.output[0], list(node.input), shapes, mode)
    return None if res is None else [res]


def _cut(node, u, whole, pieces, shapes):
    """Units of ``whole`` cut into ``pieces`` along the op's axis: Concat backward and Split forward."""
    r = shapes.rank(whole)
    if u is None or r is None:
        return None
    ax = norm_axis(node_attr(node, "axis", 0), r)
    if u.axis != ax:
        return [u] * len(pieces)  # cutting along another axis leaves every channel where it was
    sizes = [shapes.dim(n, ax) for n in pieces]
    if all(isinstance(s, int) for s in sizes) and sum(sizes) == u.vec.size:
        return _pieces(u.vec, ax, sizes)
    return None


def _concat_bwd(node, outs, shapes, mode):
    return _cut(node, outs[0], node.output[0], list(node.input), shapes)


def _split_fwd(node, ins, shapes, mode):
    return _cut(node, ins[0], node.input[0], list(node.output), shapes)


def _split_bwd(node, outs, shapes, mode):
    res = _join(node, outs, node.input[0], list(node.output), shapes, mode)
    return None if res is None else [res]


def _slice_params(node, shapes):
    consts = shapes.consts
    vals = [consts.get(n) if n else None for n in node.input[1:5]]
    if vals[0] is None or vals[1] is None:
        return None
    starts, ends = list(vals[0]), list(vals[1])
    r = shapes.rank(node.input[0])
    axes = list(vals[2]) if len(vals) > 2 and vals[2] is not None else list(range(len(starts)))
    steps = list(vals[3]) if len(vals) > 3 and vals[3] is not None else [1] * len(starts)
    return [(norm_axis(int(a), r), int(s), int(e), int(st)) for a, s, e, st in zip(axes, starts, ends, steps)]


def _slice_fwd(node, ins, shapes, mode):
    u = ins[0]
    if u is None or u.axis is None:
        return [u] if u is not None else None
    params = _slice_params(node, shapes)
    if params is None:
        return None
    for a, s, e, st in params:
        if a == u.axis:
            return [Units(a, u.vec[slice(s, e, st)])]
    return [u]


def _slice_bwd(node, outs, shapes, mode):
    out_u = outs[0]
    if out_u is None or out_u.axis is None:
        return None
    params = _slice_params(node, shapes)
    size = shapes.dim(node.input[0], out_u.axis)
    if params is None or not isinstance(size, int):
        return None
    for a, s, e, st in params:
        if a == out_u.axis:
            vec = np.full(size, mode.zero(), dtype=mode.dtype)
            idx = np.arange(size)[slice(s, e, st)]
            if idx.size != out_u.vec.size:
                return None
            vec[idx] = out_u.vec
            return [Units(a, vec)]
    return [out_u]


def _flatten_layout(node, shapes, axis_in):
    """For Flatten/Reshape that merges dims [k:] of the input into axis 1: (k, dims[k:])."""
    name, out = node.input[0], node.output[0]
    din, dout = shapes.dims.get(name), shapes.dims.get(out)
    if din is None or dout is None or axis_in is None:
        return None
    if node.op_type == "Flatten":
        k = norm_axis(node_attr(node, "axis", 1), len(din))
    else:
        if len(dout) != 2 or not all(isinstance(d, int) for d in din[1:]):
            return None
        k = 1
        if dout[1] != int(np.prod(din[1:])):
            return None
    rest = din[k:]
    if not all(isinstance(d, int) for d in rest) or axis_in < k:
        return None
    return k, rest


def _same_axis_reshape(node, u, shapes):
    """A Reshape that keeps the channel axis and everything before it, e.g. [N,C,H,W] -> [N,C,H*W]."""
    din, dout = shapes.dims.get(node.input[0]), shapes.dims.get(node.output[0])
    if din is None or dout is None or u.axis is None:
        return False
    a = u.axis
    return len(dout) > a and din[: a + 1] == dout[: a + 1] and all(isinstance(d, int) for d in din[: a + 1])


def _flatten_fwd(node, ins, shapes, mode):
    u = ins[0]
    if u is None:
        return None
    if u.axis is None:
        return [u]
    if node.op_type == "Reshape" and _same_axis_reshape(node, u, shapes):
        return [u]
    lay = _flatten_layout(node, shapes, u.axis)
    if lay is None:
        return None
    k, rest = lay
    c = u.axis - k
    shape = [1] * len(rest)
    shape[c] = rest[c]
    full = np.broadcast_to(u.vec.reshape(shape), rest).reshape(-1)
    return [Units(1, np.ascontiguousarray(full))]


def flatten_back(node, out_u: Units, in_axis: int | None, shapes, mode):
    """Backward through Flatten/Reshape given the channel axis the forward pass used at the input."""
    if out_u is None:
        return None
    if in_axis is None:
        return _mix([out_u], mode)
    if node.op_type == "Reshape" and _same_axis_reshape(node, Units(in_axis, np.zeros(1)), shapes) \
            and out_u.axis == in_axis:
        return out_u
    lay = _flatten_layout(node, shapes, in_axis)
    if lay is None or out_u.axis != 1:
        return _mix([out_u], mode)
    k, rest = lay
    if out_u.vec.size != int(np.prod(rest)):
        return _mix([out_u], mode)
    c = in_axis - k
    grid = out_u.vec.reshape(rest)
    other = tuple(i for i in range(len(rest)) if i != c)
    vec = grid.any(axis=other) if mode.boolean else grid.sum(axis=other)
    return Units(in_axis, np.asarray(vec).reshape(-1))


def _axes_of(node, shapes, rank):
    axes = node_attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        c = shapes.consts.get(node.input[1])
        axes = None if c is None else [int(a) for a in c]
    return None if axes is None else [norm_axis(a, rank) for a in axes]


def _axis_map(node, shapes):
    """Input axis -> output axis for ops that only move or add/drop unit axes (Transpose, Unsqueeze, Squeeze)."""
    op = node.op_type
    if op == "Transpose":
        r = shapes.rank(node.input[0])
        perm = node_attr(node, "perm") or (list(range(r))[::-1] if r is not None else None)
        return None if perm is None else {p: i for i, p in enumerate(perm)}
    if op == "Unsqueeze":
        r_out = shapes.rank(node.output[0])
        axes = _axes_of(node, shapes, r_out) if r_out is not None else None
        return None if axes is None else dict(enumerate(i for i in range(r_out) if i not in axes))
    r_in = shapes.rank(node.input[0])  # Squeeze
    if r_in is None:
        return None
    axes = _axes_of(node, shapes, r_in)
    if axes is None:
        din = shapes.dims.get(node.input[0])
        axes = [i for i, d in enumerate(din) if d == 1]
    return {a: j for j, a in enumerate(i for i in range(r_in) if i not in axes)}


def _moved_fwd(node, ins, shapes, mode):
    u = ins[0]
    if u is None or u.axis is None:
        return [u] if u is not None else None
    m = _axis_map(node, shapes)
    return None if m is None or u.axis not in m else [Units(m[u.axis], u.vec)]


def _moved_bwd(node, outs, shapes, mode):
    u = outs[0]
    if u is None or u.axis is None:
        return None
    m = _axis_map(node, shapes)
    back = {} if m is None else {v: k for k, v in m.items()}
    return [Units(back[u.axis], u.vec)] if u.axis in back else None


def _along_axis_fwd(node, ins, shapes, mode):
    """Softmax/LogSoftmax/LayerNorm/Reduce*: mixing along the channel axis aggregates; elsewhere units pass."""
    u = ins[0]
    if u is None:
        return None
    r = shapes.rank(node.input[0])
    if r is None:
        return None
    op = node.op_type
    if op in ("Softmax", "LogSoftmax"):
        mixed = [norm_axis(node_attr(node, "axis", -1), r)]
    elif op == "LayerNormalization":
        mixed = list(range(norm_axis(node_attr(node, "axis", -1), r), r))
    else:
        mixed = _axes_of(node, shapes, r)
        if mixed is None:
            mixed = list(range(r))
    if u.axis is None or u.axis in mixed:
        return [_mix([u], mode)] + [Units.agg(mode.zero())] * (len(node.output) - 1)
    axis = u.axis
    if op.startswith("Reduce") and not node_attr(node, "keepdims", 1):
        axis -= sum(1 for a in mixed if a < u.axis)
    return [Units(axis, u.vec)] + [Units.agg(mode.zero())] * (len(node.output) - 1)


def _matmul_fwd(node, ins, shapes, mode):
    """A @ B of two activations (attention): output feature j follows B's feature j (B's units on its last
    axis, e.g. attn @ V) and everything in A; anything else mixes."""
    a, b = ins[0], ins[1]
    rb, ro = shapes.rank(node.input[1]), shapes.rank(node.output[0])
    if a is None or b is None or rb is None or ro is None or rb < 2 or b.axis != rb - 1:
        return None
    if mode.boolean:
        return [Units(ro - 1, b.vec & bool(a.vec.any()))]
    return [Units(ro - 1, b.vec * mode.spread(a))]


def _matmul_bwd(node, outs, shapes, mode):
    u = outs[0]
    rb, ro = shapes.rank(node.input[1]), shapes.rank(node.output[0])
    if u is None or rb is None or ro is None or rb < 2 or u.axis != ro - 1:
        return None
    return [_mix([u], mode), Units(rb - 1, u.vec)]


_FORWARD = {"MatMul": _matmul_fwd, "Concat": _concat_fwd, "Split": _split_fwd, "Slice": _slice_fwd, "Flatten": _flatten_fwd,
            "Reshape": _flatten_fwd, "Transpose": _moved_fwd, "Unsqueeze": _moved_fwd,
            "Squeeze": _moved_fwd, "Softmax": _along_axis_fwd, "LogSoftmax": _along_axis_fwd,
            "LayerNormalization": _along_axis_fwd, "ReduceMean": _along_axis_fwd, "ReduceSum": _along_axis_fwd,
            "ReduceMax": _along_axis_fwd, "ReduceMin": _along_axis_fwd, "ReduceL2": _along_axis_fwd,
            "ReduceProd": _along_axis_fwd}
_BACKWARD = {"MatMul": _matmul_bwd, "Concat": _concat_bwd, "Split": _split_bwd, "Slice": _slice_bwd, "Transpose": _moved_bwd,
             "Unsqueeze": _moved_bwd, "Squeeze": _moved_bwd}
