"""How channel labels and constant channel values pass through the non-prunable ops (element-wise, BN, pools,
Concat/Split/Slice, Flatten/Reshape, Transpose, reductions, attention MatMul)."""
from __future__ import annotations

import math

import numpy as np

from ..layout import node_attr, unpadded
from ..unitops import _axis_map, norm_axis
from .labels import Graph, Rewrite, _out_chan, _rank
from .reshape import reshape

# ---------------------------------------------------------------- constant values through element-wise ops

def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x) if x.size else x


UNARY_VAL = {
    "Relu": lambda x, n: np.maximum(x, 0.0),
    "LeakyRelu": lambda x, n: np.where(x >= 0, x, x * node_attr(n, "alpha", 0.01)),
    "Sigmoid": lambda x, n: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": lambda x, n: np.tanh(x),
    "Identity": lambda x, n: x, "Dropout": lambda x, n: x,
    "Elu": lambda x, n: np.where(x >= 0, x, node_attr(n, "alpha", 1.0) * np.expm1(np.minimum(x, 0))),
    "HardSigmoid": lambda x, n: np.clip(node_attr(n, "alpha", 0.2) * x + node_attr(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda x, n: x * np.clip(x / 6.0 + 0.5, 0, 1),
    "Softplus": lambda x, n: np.logaddexp(0.0, x),
    "Exp": lambda x, n: np.exp(x), "Neg": lambda x, n: -x, "Abs": lambda x, n: np.abs(x),
    "Erf": lambda x, n: _erf(x),
    "Gelu": lambda x, n: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))) if node_attr(n, "approximate", "none") == "none"
    else np.full_like(x, np.nan),
}
ELEMENTWISE = set(UNARY_VAL) | {"Selu", "Celu", "Softsign", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round",
                                "Sign", "Sin", "Cos", "Mish", "ThresholdedRelu", "Shrink", "Cast", "CastLike",
                                "Clip", "PRelu", "BatchNormalization", "InstanceNormalization", "Pad", "Resize",
                                "Upsample"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
BINARY_VAL = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Max": np.maximum,
              "Min": np.minimum, "Sum": np.add, "Mean": None}
FLOAT_CAST = {1, 10, 11, 16}


def channel_values(arr: np.ndarray, axis: int, size: int) -> np.ndarray:
    """One value per channel of a constant laid along ``axis`` (size 1 or ``size``); nan where it varies."""
    arr = np.asarray(arr, dtype=np.float64)
    if arr.shape[axis] == 1:
        flat = arr.reshape(-1)
        return np.full(size, flat[0] if flat.size and np.all(flat == flat[0]) else np.nan)
    rows = np.moveaxis(arr, axis, 0).reshape(size, -1)
    same = np.all(rows == rows[:, :1], axis=1) if rows.shape[1] else np.ones(size, dtype=bool)
    return np.where(same, rows[:, 0] if rows.shape[1] else np.nan, np.nan)


# ---------------------------------------------------------------- non-prunable ops

def propagate(g: Graph, idx, node, ins) -> bool:
    """Labels of a non-prunable node's outputs; False when it is not understood (its inputs' channels stay)."""
    op = node.op_type
    ix = g.index
    out = node.output[0] if node.output else ""
    chan = ins[0]
    extra_out = [o for o in node.output[1:] if o and ix.uses.get(o)]
    if op in ELEMENTWISE or op in POOLS:
        if chan is None or extra_out:
            return False
        if op in POOLS and chan.axis != 1:
            return False
        val = _unary_val(g, node, chan)
        if val is None:
            return False
        if op in ("BatchNormalization", "InstanceNormalization"):
            if chan.axis != 1 or any(c is not None for c in ins[1:]):
                return False
            n_par = 4 if op == "BatchNormalization" else 2
            pars = [ix.const(n) for n in node.input[1:1 + n_par]]
            if any(p is None or p.ndim != 1 or p.size != chan.lab.size for p in pars):
                return False
            for s in range(1, 1 + n_par):
                g.rewrites.append(Rewrite("param", idx, s, 0, out))
        elif op in ("PRelu", "Clip"):
            for s in range(1, len(node.input)):
                if not node.input[s]:
                    continue
                if ins[s] is not None or not _param(g, idx, node, s, chan, chan.rank, chan.axis):
                    return False
        elif op in ("Pad", "Resize", "Upsample"):
            if not _resize_ok(g, node, chan):
                return False
            val = _spatial_val(g, node, val)
        elif any(c is not None for c in ins[1:]):
            return False
        _out_chan(g, out, chan.axis, chan.lab, val)
        return True
    if op in BINARY_VAL:
        return _binary(g, idx, node, ins)
    if op == "Concat":
        return _concat(g, idx, node, ins)
    if op == "Split":
        return _split(g, idx, node, chan) if chan is not None and all(c is None for c in ins[1:]) else False
    if op == "Slice":
        return _slice(g, idx, node, chan) if chan is not None and all(c is None for c in ins[1:]) else False
    if op in ("Flatten", "Reshape"):
        return reshape(g, idx, node, chan) if chan is not None and all(c is None for c in ins[1:]) else False
    if op in ("Transpose", "Squeeze", "Unsqueeze"):
        if chan is None or any(c is not None for c in ins[1:]):
            return False
        m = _axis_map(node, g.shapes)
        if m is None or chan.axis not in m:
            return False
        _out_chan(g, out, m[chan.axis], chan.lab, chan.val)
        return True
    if op in ("Softmax", "LogSoftmax", "LayerNormalization", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum",
              "ReduceL2", "ReduceProd"):
        return _along(g, idx, node, ins)
    if op == "MatMul":
        return _matmul(g, node, ins)
    if op == "Shape":
        r = chan.rank
        start = min(max(norm_axis(node_attr(node, "start", 0), r), 0), r)  # ONNX clamps both to [0, rank]
        end = node_attr(node, "end", None)
        end = r if end is None else min(max(norm_axis(end, r), 0), r)
        return not (start <= chan.axis < end) or _dims_read(g, out, chan.axis - start, end - start)
    return False


def _unary_val(g, node, chan):
    op = node.op_type
    v = chan.val
    with np.errstate(all="ignore"):
        if op in UNARY_VAL:
            return UNARY_VAL[op](v, node)
        if op == "Cast":
            return v if node_attr(node, "to") in FLOAT_CAST else np.full_like(v, np.nan)
        if op == "BatchNormalization":
            p = [g.index.const(n) for n in node.input[1:5]]
            if any(x is None for x in p):
                return None
            s, b, m, var = (x.astype(np.float64).reshape(-1) for x in p)
            if s.size != v.size:
                return None
            return (v - m) / np.sqrt(var + node_attr(node, "epsilon", 1e-5)) * s + b
        if op == "Clip":
            lo = g.index.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            hi = g.index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if lo is not None and lo.size != 1 or hi is not None and hi.size != 1:
                return np.full_like(v, np.nan)
            return np.clip(v, -np.inf if lo is None else float(lo.reshape(-1)[0]),
                           np.inf if hi is None else float(hi.reshape(-1)[0]))
        if op in ("MaxPool", "GlobalAveragePool", "GlobalMaxPool", "Resize", "Upsample"):
            return v
        if op == "AveragePool":
            padded = not unpadded(node)
            return np.full_like(v, np.nan) if padded and node_attr(node, "count_include_pad", 0) else v
    return np.full_like(v, np.nan)


def _spatial_val(g, node, val):
    """A constant channel stays constant through Pad/Resize unless they bring in other values: Pad's constant
    fill (where it differs), Resize's extrapolation in tf_crop_and_resize mode."""
    ix = g.index
    if node.op_type == "Pad":
        mode = node_attr(node, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant":
            return val
        pads = ix.const(node.input[1]) if len(node.input) > 1 else None
        if pads is None or not np.any(pads):
            return val
        fill = ix.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        v = 0.0 if fill is None or fill.size == 0 else float(fill.reshape(-1)[0])
        return np.where(val == v, val, np.nan)
    if node.op_type == "Resize":
        mode = node_attr(node, "coordinate_transformation_mode", b"half_pixel")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "tf_crop_and_resize":
            v = float(node_attr(node, "extrapolation_value", 0.0))
            return np.where(val == v, val, np.nan)
    return val


def _resize_ok(g, node, chan):
    """Pad, Resize and Upsample keep channels when they leave the channel axis alone."""
    ix = g.index
    r = chan.rank
    if node.op_type == "Pad":
        pads = ix.const(node.input[1]) if len(node.input) > 1 else None
        axes = ix.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if pads is None:
            return False
        pads = pads.reshape(-1).tolist()
        axes = list(range(r)) if axes is None else [norm_axis(int(a), r) for a in axes.reshape(-1)]
        k = len(axes)
        return all(not (a == chan.axis and (pads[i] or pads[i + k])) for i, a in enumerate(axes))
    if node.op_type == "Upsample":
        sc = ix.const(node.input[1]) if len(node.input) > 1 else None
        return sc is not None and sc.size == r and float(sc.reshape(-1)[chan.axis]) == 1.0
    if len(node.input) > 3 and node.input[3]:
        return False  # sizes given: they name the channel count
    sc = ix.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    axes = node_attr(node, "axes")
    if sc is None or axes is not None or sc.size != r:
        return False
    return float(sc.reshape(-1)[chan.axis]) == 1.0


def _param(g, idx, node, slot, chan, r_out, a_out) -> bool:
    """A constant input broadcast against a channel tensor: fine if it is uniform along the channel axis, sliced
    when it holds one value per channel."""
    arr = g.index.const(node.input[slot])
    if arr is None or arr.ndim > r_out:
        return False
    shape = (1,) * (r_out - arr.ndim) + tuple(arr.shape)
    d = shape[a_out]
    if d == 1:
        return True
    if d != chan.lab.size:
        return False
    g.rewrites.append(Rewrite("param", idx, slot, a_out - (r_out - arr.ndim), node.output[0]))
    return True


def _binary(g, idx, node, ins) -> bool:
    ix = g.index
    out = node.output[0]
    r_out = _rank(g, out)
    if r_out is None:
        return False
    ref = None
    for name, c in zip(node.input, ins):
        if c is not None:
            a = c.axis + r_out - c.rank
            if ref is None:
                ref = (a, c.lab.size)
            elif ref != (a, c.lab.size):
                return False
    a_out, size = ref
    vals = []
    for s, (name, c) in enumerate(zip(node.input, ins)):
        if c is not None:
            vals.append(c.val)
            continue
        arr = ix.const(name)
        if arr is not None:
            if arr.ndim > r_out or not np.issubdtype(arr.dtype, np.floating):
                return False
            shape = (1,) * (r_out - arr.ndim) + tuple(arr.shape)
            if shape[a_out] not in (1, size):
                return False
            if shape[a_out] == size and not _param(g, idx, node, s, ins[0] or next(x for x in ins if x), r_out, a_out):
                return False
            vals.append(channel_values(arr.reshape(shape), a_out, size))
            continue
        dims = g.shapes.dims.get(name)
        if dims is None or len(dims) > r_out:
            return False
        full = [1] * (r_out - len(dims)) + list(dims)
        if full[a_out] != 1:
            return False
        vals.append(np.full(size, np.nan))
    labs = [c.lab for c in ins if c is not None]
    for other in labs[1:]:
        g.union(labs[0], other)
    fn = BINARY_VAL[node.op_type]
    with np.errstate(all="ignore"):
        if fn is None:
            val = sum(vals) / len(vals)
        else:
            val = vals[0]
            for v in vals[1:]:
                val = fn(val, v)
    _out_chan(g, out, a_out, labs[0], val)
    return True


def _concat(g, idx, node, ins) -> bool:
    out = node.output[0]
    r = _rank(g, out)
    if r is None:
        return False
    ax = norm_axis(node_attr(node, "axis", 0), r)
    labeled = [c for c in ins if c is not None]
    if any(c.axis != ax or c.rank != r for c in labeled):
        if any(c is None for c in ins) or len({(c.axis, c.lab.size) for c in labeled}) != 1:
            return False
        for c in labeled[1:]:
            g.union(labeled[0].lab, c.lab)
        _out_chan(g, out, labeled[0].axis, labeled[0].lab, np.full(labeled[0].lab.size, np.nan))
        return True
    labs, vals = [], []
    for name, c in zip(node.input, ins):
        if c is None:
            d = g.shapes.dim(name, ax)
            if not isinstance(d, int):
                return False
            labs.append(g.new(d, fixed=True))
            vals.append(np.full(d, np.nan))
        else:
            labs.append(c.lab)
            vals.append(c.val)
    _out_chan(g, out, ax, np.concatenate(labs), np.concatenate(vals))
    return True


def _split(g, idx, node, chan) -> bool:
    ix = g.index
    ax = norm_axis(node_attr(node, "axis", 0), chan.rank)
    outs = list(node.output)
    if ax != chan.axis:
        for o in outs:
            if o:
                _out_chan(g, o, chan.axis, chan.lab, chan.val)
        return True
    c = chan.lab.size
    if len(node.input) > 1 and node.input[1]:
        sizes = ix.const(node.input[1])
        sizes = None if sizes is None else [int(s) for s in sizes.reshape(-1)]
    elif node_attr(node, "split") is not None:
        sizes = [int(s) for s in node_attr(node, "split")]
    else:
        n = len(outs)
        sizes = [c // n] * n if c % n == 0 else None
    if sizes is None or sum(sizes) != c or len(sizes) != len(outs):
        return False
    offs = np.cumsum([0] + sizes)
    for k, o in enumerate(outs):
        if o:
            _out_chan(g, o, ax, chan.lab[offs[k]:offs[k + 1]], chan.val[offs[k]:offs[k + 1]])
    g.rewrites.append(Rewrite("split", idx, axis=ax, tensor=node.input[0]))
    return True


def slice_params(ix, node, rank):
    vals = [ix.const(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input))]
    if vals[0] is None or vals[1] is None or (len(node.input) > 3 and node.input[3] and vals[2] is None) \
            or (len(node.input) > 4 and node.input[4] and vals[3] is None):
        return None
    starts, ends = vals[0].reshape(-1).tolist(), vals[1].reshape(-1).tolist()
    axes = list(range(len(starts))) if vals[2] is None else vals[2].reshape(-1).tolist()
    steps = [1] * len(starts) if vals[3] is None else vals[3].reshape(-1).tolist()
    return [(norm_axis(int(a), rank), int(s), int(e), int(st)) for a, s, e, st in zip(axes, starts, ends, steps)]


def _slice(g, idx, node, chan) -> bool:
    params = slice_params(g.index, node, chan.rank)
    if params is None:
        return False
    hit = [p for p in params if p[0] == chan.axis]
    if not hit:
        _out_chan(g, node.output[0], chan.axis, chan.lab, chan.val)
        return True
    _, s, e, st = hit[0]
    if st != 1 or len(hit) > 1:
        return False
    lo, hi, _ = slice(s, e, 1).indices(chan.lab.size)
    hi = max(hi, lo)
    _out_chan(g, node.output[0], chan.axis, chan.lab[lo:hi], chan.val[lo:hi])
    g.rewrites.append(Rewrite("slice", idx, axis=chan.axis, tensor=node.input[0]))
    return True


def _dims_read(g, shape_out, pos, n) -> bool:
    """Every reader of a Shape output (``n`` dims) takes single dims by constant Gather indices other than ``pos``
    (the channel axis): the channel count is never read (an export's Reshape targets read batch and sequence)."""
    ix = g.index
    readers = ix.readers.get(shape_out, [])
    if not readers or shape_out in ix.outputs or ix.uses.get(shape_out, 0) != len(readers):
        return False
    for k in readers:
        rd = ix.nodes[k]
        if rd.op_type != "Gather" or rd.input[0] != shape_out or len(rd.input) < 2 or node_attr(rd, "axis", 0) != 0:
            return False
        idx = ix.const(rd.input[1])
        if idx is None or idx.dtype.kind not in "iu" or idx.size == 0:
            return False
        if any(not -n <= v < n or v % n == pos for v in idx.reshape(-1).tolist()):
            return False
    return True


def _matmul(g, node, ins) -> bool:
    """MatMul of two activations. Attention heads: labels on a batch axis (scores = Q @ K^T, context = P @ V) are
    tied between the inputs and carried to the output on that axis; an unlabelled input must broadcast there.
    Otherwise B's features (its last axis, V in P @ V) pass on, and A's channels, contracted away, stay."""
    out = node.output[0]
    ranks = [_rank(g, n) for n in node.input[:2]]
    ro = _rank(g, out)
    if ro is None or len(ranks) != 2 or any(r is None or r < 2 for r in ranks):
        return False
    labelled = [(c, c.axis + ro - r) for c, r in zip(ins[:2], ranks) if c is not None]
    batch = [x for c, x in labelled if x < ro - 2]
    if batch:
        if len(batch) != len(labelled) or len(set(batch)) != 1 or len({c.lab.size for c, _ in labelled}) != 1:
            return False
        ax = batch[0]
        for name, c, r in zip(node.input[:2], ins[:2], ranks):
            pos = ax - (ro - r)
            if c is None and pos >= 0:
                dims = g.shapes.dims.get(name)
                if dims is None or dims[pos] != 1:
                    return False
        if len(labelled) == 2:
            g.union(labelled[0][0].lab, labelled[1][0].lab)
        lab = labelled[0][0].lab
        _out_chan(g, out, ax, lab, np.full(lab.size, np.nan))
        return True
    b = ins[1]
    if b is None or b.axis != ranks[1] - 1:
        return False
    if ins[0] is not None:
        g.fix(ins[0].lab, "MatMul")
    _out_chan(g, out, ro - 1, b.lab, np.full(b.lab.size, np.nan))
    return True


def _along(g, idx, node, ins) -> bool:
    chan = ins[0]
    if chan is None or any(c is not None for c in ins[1:]):
        return False
    r, op = chan.rank, node.op_type
    if op in ("Softmax", "LogSoftmax"):
        mixed = [norm_axis(node_attr(node, "axis", -1), r)]
    elif op == "LayerNormalization":
        mixed = list(range(norm_axis(node_attr(node, "axis", -1), r), r))
    else:
        axes = node_attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            c = g.index.const(node.input[1])
            if c is None:
                return False
            axes = c.reshape(-1).tolist()
        if axes is None:
            if node_attr(node, "noop_with_empty_axes", 0):
                return False
            axes = list(range(r))
        mixed = [norm_axis(int(x), r) for x in axes]
    if chan.axis in mixed or [o for o in node.output[1:] if o and g.index.uses.get(o)]:
        return False
    axis = chan.axis
    if op.startswith("Reduce") and not node_attr(node, "keepdims", 1):
        axis -= sum(1 for x in mixed if x < chan.axis)
    keep_val = op in ("ReduceMean", "ReduceMax", "ReduceMin")
    _out_chan(g, node.output[0], axis, chan.lab, chan.val if keep_val else np.full(chan.lab.size, np.nan))
    return True
