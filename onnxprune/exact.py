"""Per-position effective sparsity (ALGORITHMS.md 5.2(b)): binary forward and backward passes over
(channel, position) units, which also catch kernel taps that only ever read padding or cut-off positions.

Forward: a_out = [conv(a_in, mask) > 0] (max-pool treated as average-pool: every window position is a path);
backward: b_in = [conv_transpose(b_out, mask) > 0]; a weight tap is effective iff its mask is set and some
output position pairs a reached input position with an output position that reaches an output. Supports the
ops of typical CNNs and MLPs (Conv 1-D/2-D with groups, strides, dilations and pads, Gemm/MatMul, pools,
Flatten/Reshape to features, Add/Mul/Div/Concat/Split, element-wise ops; Shape/Size and whatever is computed from
constants alone carry no input values). Dynamic inputs are sized by ``input_shapes`` (--input-shape). Anything
else raises ``Unsupported`` naming the node that stops the analysis, and the caller falls back to the
channel-level analysis.
"""
from __future__ import annotations

import numpy as np
import onnx

from .layout import node_attr
from .unitops import UNARY

PASS = (UNARY - {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
                 "Pad", "Resize", "Upsample"}) | {"Identity", "Dropout"}


class Unsupported(Exception):
    pass


def _conv_geometry(node, w_shape, in_spatial):
    k = list(w_shape[2:])
    nd = len(k)
    if node_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise Unsupported("Conv auto_pad SAME_*")
    strides = node_attr(node, "strides", [1] * nd)
    dil = node_attr(node, "dilations", [1] * nd)
    pads = node_attr(node, "pads", [0] * (2 * nd))
    out = [(in_spatial[d] + pads[d] + pads[d + nd] - dil[d] * (k[d] - 1) - 1) // strides[d] + 1 for d in range(nd)]
    return k, strides, dil, pads[:nd], out


def _tap_slices(tap, strides, dil, pads, out, in_shape):
    """(input slices, output slices) pairing, along every spatial axis, the output positions o whose tap ``tap``
    reads input position o*s + t*d - p inside the input; None when the tap never lands inside."""
    src, dst = [slice(None)], [slice(None)]
    for d in range(len(out)):
        idx = tap[d] * dil[d] - pads[d] + strides[d] * np.arange(out[d])
        ok = (idx >= 0) & (idx < in_shape[d])
        if not ok.any():
            return None
        lo, hi = np.flatnonzero(ok)[[0, -1]]
        src.append(slice(idx[lo], idx[hi] + 1, strides[d]))
        dst.append(slice(lo, hi + 1))
    return tuple(src), tuple(dst)


def _tap_view(a, tap, strides, dil, pads, out):
    """a[:, o*s + t*d - p] for every output position o (False outside the input): shape [C, *out]."""
    res = np.zeros((a.shape[0],) + tuple(out), dtype=bool)
    sl = _tap_slices(tap, strides, dil, pads, out, a.shape[1:])
    if sl is not None:
        res[sl[1]] = a[sl[0]]
    return res


def _scatter_tap(b, tap, strides, dil, pads, in_shape):
    """The transpose of _tap_view: the input positions tap ``tap`` reads from the output positions in b."""
    res = np.zeros((b.shape[0],) + tuple(in_shape), dtype=bool)
    sl = _tap_slices(tap, strides, dil, pads, b.shape[1:], in_shape)
    if sl is not None:
        res[sl[0]] = b[sl[1]]
    return res


class _Conv:
    def __init__(self, node, w, in_shape):
        self.node, self.nz = node, (w != 0)
        self.g = node_attr(node, "group", 1)
        self.k, self.s, self.d, self.p, self.out = _conv_geometry(node, w.shape, in_shape[1:])
        self.in_shape = in_shape

    def taps(self):
        return list(np.ndindex(*self.k))

    def forward(self, a):
        o, ci = self.nz.shape[0], self.nz.shape[1]
        co = o // self.g
        res = np.zeros((o,) + tuple(self.out), dtype=bool)
        for tap in self.taps():
            v = _tap_view(a, tap, self.s, self.d, self.p, self.out).reshape(a.shape[0], -1).astype(np.float32)
            m = self.nz[(slice(None), slice(None)) + tap].astype(np.float32)  # [O, ci]
            for g in range(self.g):
                res[g * co:(g + 1) * co] |= (m[g * co:(g + 1) * co] @ v[g * ci:(g + 1) * ci] > 0).reshape(
                    (co,) + tuple(self.out))
        return res

    def backward(self, b):
        o, ci = self.nz.shape[0], self.nz.shape[1]
        co = o // self.g
        res = np.zeros(self.in_shape, dtype=bool)
        flat = b.reshape(o, -1).astype(np.float32)
        for tap in self.taps():
            m = self.nz[(slice(None), slice(None)) + tap].astype(np.float32)
            per = np.zeros((ci * self.g, flat.shape[1]), dtype=bool)
            for g in range(self.g):
                per[g * ci:(g + 1) * ci] = m[g * co:(g + 1) * co].T @ flat[g * co:(g + 1) * co] > 0
            res |= _scatter_tap(per.reshape((ci * self.g,) + tuple(self.out)), tap, self.s, self.d, self.p,
                                self.in_shape[1:])
        return res

    def effective(self, a, b):
        o, ci = self.nz.shape[0], self.nz.shape[1]
        co = o // self.g
        eff = np.zeros(self.nz.shape, dtype=bool)
        bf = b.reshape(o, -1).astype(np.float32)
        for tap in self.taps():
            v = _tap_view(a, tap, self.s, self.d, self.p, self.out).reshape(a.shape[0], -1).astype(np.float32)
            for g in range(self.g):
                pair = bf[g * co:(g + 1) * co] @ v[g * ci:(g + 1) * ci].T > 0  # [co, ci]
                eff[(slice(g * co, (g + 1) * co), slice(None)) + tap] = pair
        return eff & self.nz


def _pool(node, a, backward_b=None):
    """Max/average pooling as 'any in the window' (forward) or its transpose (backward)."""
    op = node.op_type
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        if backward_b is None:
            return a.reshape(a.shape[0], -1).any(axis=1).reshape((a.shape[0],) + (1,) * (a.ndim - 1))
        return np.broadcast_to(backward_b.reshape((a.shape[0],) + (1,) * (a.ndim - 1)), a.shape).copy()
    if node_attr(node, "ceil_mode", 0):
        raise Unsupported("pooling with ceil_mode")
    k, strides, dil, pads, out = _conv_geometry(node, (1, 1) + tuple(node_attr(node, "kernel_shape", [])), a.shape[1:])
    if backward_b is None:
        res = np.zeros((a.shape[0],) + tuple(out), dtype=bool)
        for tap in np.ndindex(*k):
            res |= _tap_view(a, tap, strides, dil, pads, out)
        return res
    res = np.zeros(a.shape, dtype=bool)
    for tap in np.ndindex(*k):
        res |= _scatter_tap(backward_b, tap, strides, dil, pads, a.shape[1:])
    return res


def shapes_with_inputs(model: onnx.ModelProto, input_shapes: dict):
    """Shape inference with the graph inputs named in ``input_shapes`` ({name: [dims]}, as --input-shape gives
    them) fixed at those sizes: a CNN exported with dynamic H/W gets static shapes everywhere. Declared shapes
    of outputs and value_info are dropped (an export may have written them at another size); their types stay."""
    from types import SimpleNamespace

    from onnx import helper

    from .shapes import infer_shapes

    def typed(vi):
        if not vi.type.HasField("tensor_type"):
            return vi
        return helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, None)

    inputs = []
    for vi in model.graph.input:
        if vi.name in input_shapes and vi.type.HasField("tensor_type"):
            vi = helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type,
                                               [int(d) for d in input_shapes[vi.name]])
        inputs.append(vi)
    graph = SimpleNamespace(input=inputs, output=[typed(v) for v in model.graph.output],
                            value_info=[typed(v) for v in model.graph.value_info], node=model.graph.node,
                            initializer=model.graph.initializer)
    return infer_shapes(SimpleNamespace(ir_version=model.ir_version, opset_import=model.opset_import, graph=graph))


def _describe(node) -> str:
    return f"{node.op_type} node '{node.name or (node.output[0] if node.output else '?')}'"


ELEMENTWISE = {"Add", "Sum", "Sub", "Mul", "Div", "Max", "Min", "Mean"}  # broadcasting: reached if any operand is
NO_VALUES = {"Shape", "Size"}  # outputs that carry no input values (only sizes): nothing reaches through them


def effective_exact(model: onnx.ModelProto, layers, weights, shapes, input_shapes: dict | None = None) -> dict:
    """layer name -> number of effective weights, per position. ``input_shapes`` ({input name: [dims]}, the
    user's --input-shape) fixes the sizes of dynamic inputs first. Raises Unsupported, naming the node that
    stops the analysis (op type and name), for graphs it cannot follow, and never another exception (but
    MemoryError): the caller then falls back to the channel-level analysis."""
    if input_shapes:
        shapes = shapes_with_inputs(model, input_shapes)
    at = [None]  # the node being followed
    try:
        return _effective_exact(model, layers, weights, shapes, at)
    except MemoryError:
        raise
    except Exception as exc:
        reason = str(exc) if isinstance(exc, Unsupported) else f"{type(exc).__name__}: {exc}"
        if at[0] is not None:
            reason = f"cannot follow {_describe(at[0])}: {reason}"
        raise Unsupported(reason) from (None if isinstance(exc, Unsupported) else exc)


def _effective_exact(model, layers, weights, shapes, at) -> dict:
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    consts = {n.output[0] for n in graph.node if n.op_type == "Constant"}
    graph_inputs = {vi.name: vi for vi in graph.input if vi.name not in inits}
    producer = {o: n for n in graph.node for o in n.output if o}
    by_node = {}
    for layer in layers:
        if layer.graph != "" or len(layer.consumers) != 1:
            raise Unsupported("weights in subgraphs or tied weights")
        by_node[layer.consumers[0].index] = layer

    def shape_of(name):
        d = shapes.dims.get(name)
        if d is None or not all(isinstance(x, int) for x in d[1:]):
            shown = " [" + ", ".join("?" if x is None else str(x) for x in d) + "]" if d is not None else ""
            if name in graph_inputs:
                raise Unsupported(f"unknown static shape of input '{name}'{shown}; give it with --input-shape "
                                  f"{name}:D1,D2,...")
            where = f" (output of {_describe(producer[name])})" if name in producer and producer[name] is not at[0] \
                else ""
            raise Unsupported(f"unknown static shape of '{name}'{shown}{where}")
        return tuple(d[1:])  # drop the batch dimension

    fwd, ops, splits = {}, {}, {}
    for name in graph_inputs:
        fwd[name] = np.ones(shape_of(name), dtype=bool)
    nodes = list(graph.node)
    for idx, node in enumerate(nodes):
        op = node.op_type
        at[0] = node
        if op == "Constant":
            continue
        ins = [fwd.get(n) if n and n not in inits and n not in consts else None for n in node.input]
        layer = by_node.get(idx)
        if layer is not None:
            w = np.asarray(weights[layer.name])
            x = ins[0]
            if x is None:
                raise Unsupported("its data input is a constant (no graph input reaches it)")
            if op == "Conv":
                if w.ndim != x.ndim + 1:
                    raise Unsupported(f"weight of rank {w.ndim} on an input of rank {x.ndim + 1}")
                ops[idx] = _Conv(node, w, x.shape)
                out = ops[idx].forward(x)
            elif ((op == "Gemm" and not node_attr(node, "transA", 0)) or (op == "MatMul" and w.ndim == 2)) \
                    and layer.consumers[0].slot == 1 and x.ndim == 1:
                lay = layer.consumers[0].layout  # in the stored tensor's axes
                nz = (w != 0) if lay.out_axis % 2 == 0 else (w != 0).T  # [N, K]
                ops[idx] = ("dense", nz)
                out = (nz.astype(np.float32) @ x.astype(np.float32)) > 0
            else:
                raise Unsupported("this layer form (only Conv, Gemm and 2-D MatMul on [batch, features] are "
                                  "followed per position)")
            fwd[node.output[0]] = out
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise Unsupported("control flow (its body may read any tensor)")
        data = [a for a in ins if a is not None]
        if op in NO_VALUES or not data:
            continue  # sizes, or values computed from constants only: no input reaches them
        if op in PASS:
            if ins[0] is not None:  # a constant (also behind Identity/Cast) carries no reachability
                fwd[node.output[0]] = ins[0]
        elif op in ELEMENTWISE:
            target = shape_of(node.output[0])
            acc = np.zeros(target, dtype=bool)
            for a in data:
                acc |= np.broadcast_to(a, target)
            fwd[node.output[0]] = acc
        elif op == "Concat":
            ax = _concat_axis(node, data)
            if ax <= 0:
                raise Unsupported("Concat along the batch axis")
            parts = [a if a is not None else np.zeros(shape_of(n), dtype=bool) for a, n in zip(ins, node.input)]
            fwd[node.output[0]] = np.concatenate(parts, axis=ax - 1)
        elif op == "Split":
            if ins[0] is None:
                continue
            ax = _split_axis(node, ins[0])
            sizes = [shape_of(o)[ax] for o in node.output]
            if sum(sizes) != ins[0].shape[ax]:
                raise Unsupported("Split sizes that do not add up")
            splits[idx] = (ax, sizes)
            for o, part in zip(node.output, np.split(ins[0], np.cumsum(sizes)[:-1], axis=ax)):
                if o:
                    fwd[o] = part
        elif op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"):
            if ins[0] is not None:
                fwd[node.output[0]] = _pool(node, ins[0])
        elif op in ("Flatten", "Reshape"):
            if ins[0] is None:
                continue  # a constant reshaped by a computed shape
            target = shape_of(node.output[0])
            if int(np.prod(target)) != ins[0].size:
                raise Unsupported(f"{op} that changes the per-sample size")
            fwd[node.output[0]] = ins[0].reshape(target)
        else:
            raise Unsupported("op not supported per position")
    at[0] = None
    bwd = {}
    for vi in graph.output:
        if vi.name in fwd:  # (an output no input reaches, e.g. a shape, reads nothing back)
            bwd[vi.name] = np.ones(fwd[vi.name].shape, dtype=bool)
    counts = {}
    for idx in range(len(nodes) - 1, -1, -1):
        node = nodes[idx]
        at[0] = node
        op = node.op_type
        if idx in splits:
            (ax, sizes), off = splits[idx], 0
            for o, size in zip(node.output, sizes):
                if o in bwd:
                    back = np.zeros(fwd[node.input[0]].shape, dtype=bool)
                    back[(slice(None),) * ax + (slice(off, off + size),)] = bwd[o]
                    _acc(bwd, node.input[0], back)
                off += size
            continue
        b = bwd.get(node.output[0]) if node.output else None
        if op == "Constant" or b is None:
            if idx in ops:
                counts[by_node[idx].name] = 0
            continue
        x_name = node.input[0]
        if idx in ops:
            layer = by_node[idx]
            o = ops[idx]
            if isinstance(o, _Conv):
                counts[layer.name] = int(o.effective(fwd[x_name], b).sum())
                back = o.backward(b)
            else:
                nz = o[1]
                counts[layer.name] = int((nz & b[:, None] & fwd[x_name][None, :]).sum())
                back = (nz.T.astype(np.float32) @ b.astype(np.float32)) > 0
            _acc(bwd, x_name, back)
            continue
        if op in PASS:
            _acc(bwd, x_name, b)
        elif op in ELEMENTWISE:
            for n in node.input:
                if n in fwd:
                    _acc(bwd, n, _unbroadcast(b, fwd[n].shape))
        elif op == "Concat":
            ax = _concat_axis(node, [fwd[n] for n in node.input if n in fwd]) - 1
            off = 0
            for n in node.input:
                size = fwd[n].shape[ax] if n in fwd else shape_of(n)[ax]
                if n in fwd:
                    _acc(bwd, n, np.take(b, np.arange(off, off + size), axis=ax))
                off += size
        elif op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"):
            _acc(bwd, x_name, _pool(node, fwd[x_name], b))
        elif op in ("Flatten", "Reshape"):
            _acc(bwd, x_name, b.reshape(fwd[x_name].shape))
    at[0] = None
    for layer in layers:
        counts.setdefault(layer.name, 0)
    return counts


def _split_axis(node, x) -> int:
    """Split's axis in ``x`` (per sample: the batch axis dropped)."""
    ax = node_attr(node, "axis", 0)
    ax = ax + x.ndim + 1 if ax < 0 else ax
    if ax <= 0:
        raise Unsupported("Split along the batch axis")
    return ax - 1


def _concat_axis(node, data) -> int:
    """Concat's axis in the batched tensor's axes (a negative one counted from the end)."""
    ax = node_attr(node, "axis", 1)
    return ax + data[0].ndim + 1 if ax < 0 and data else ax


def _unbroadcast(b, shape):
    if b.shape == shape:
        return b
    extra = b.ndim - len(shape)
    r = b.any(axis=tuple(range(extra))) if extra > 0 else b
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and r.shape[i] != 1)
    return r.any(axis=axes, keepdims=True) if axes else r


def _acc(table, name, arr):
    prev = table.get(name)
    table[name] = arr if prev is None else (prev | arr)
