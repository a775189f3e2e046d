"""The unit graph over the real ONNX graph: reachability from the inputs and to the outputs, effective masks.

Units are the output channels / neurons of every prunable layer. Forward reachability starts at the graph
inputs, backward reachability at the graph outputs; a weight is effective when it is non-zero, its input unit
is reached from an input and its output unit reaches an output (ALGORITHMS.md 5.2(a); biases ignored). Exact
for MLPs, a lower bound on effective sparsity for CNNs (kernel taps that only read padding are not seen at
channel level). Anything not understood is mixed all-to-all, so a unit is never called dead when it may live.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph import _implicit_inputs, node_reads, other_readers, reader_map  # noqa: F401 - also imported from here
from .layout import node_attr
from .shapes import infer_shapes  # noqa: F401 - also imported from here
from .unitops import BINARY, HANDLED, UNARY, Mode, Shapes, Units, backward, flatten_back, forward
from .unitops import _mix as mix

BOOL = Mode(True)


# ---------------------------------------------------------------- shapes

# ---------------------------------------------------------------- one prunable node as a block matrix

class Coo:
    """The non-zero (in unit, out unit) pairs of a sparse 2-D layer: every reachability step is O(non-zeros)."""
    DENSITY = 0.02  # below this a 2-D layer's flags are kept as pairs instead of a boolean matrix

    def __init__(self, flags: np.ndarray):
        self.c_in, self.c_out = flags.shape
        # np.nonzero in row-major order, through the flat index of the array's own memory layout (2-D
        # np.nonzero is ~10x slower on a sparse 2048 x 2048 matrix)
        if flags.flags.c_contiguous or not flags.T.flags.c_contiguous:
            self.rows, self.cols = np.divmod(np.flatnonzero(flags), self.c_out)
        else:
            cols, rows = np.divmod(np.flatnonzero(flags.T), self.c_in)
            order = np.lexsort((cols, rows))
            self.rows, self.cols = rows[order], cols[order]

    def nnz(self) -> int:
        return int(self.rows.size)

    def forward(self, x):
        out = np.zeros(self.c_out, dtype=bool)
        out[self.cols[x[self.rows]]] = True
        return out

    def backward(self, y):
        out = np.zeros(self.c_in, dtype=bool)
        out[self.rows[y[self.cols]]] = True
        return out

    def count(self, x, y) -> int:
        return int(np.count_nonzero(x[self.rows] & y[self.cols]))

    def per_out(self, rows_mask=None) -> np.ndarray:
        """Non-zeros feeding each output unit (only from input units in ``rows_mask`` if given)."""
        cols = self.cols if rows_mask is None else self.cols[rows_mask[self.rows]]
        return np.bincount(cols, minlength=self.c_out)


def per_out_counts(cnt, k: int, rows_mask=None) -> np.ndarray:
    """Non-zeros feeding each output unit of group ``k`` (from the input units in ``rows_mask`` if given)."""
    if isinstance(cnt, Coo):
        return cnt.per_out(rows_mask)
    block = cnt[k] if rows_mask is None else cnt[k][rows_mask]
    return block.sum(axis=0, dtype=np.int64)


def _block_counts(lop, flags) -> object:
    """The analysis' blocks of one node: a Coo for sparse 2-D layers, else counts per (group, in, out)."""
    cnt = lop.blocks(flags, None)
    if cnt.dtype == bool and cnt.shape[0] == 1 and cnt.size > 4096:
        nnz = int(np.count_nonzero(cnt))
        if nnz < Coo.DENSITY * cnt.size:
            return Coo(cnt[0])
    return cnt

@dataclass
class LayerOp:
    """A prunable node seen as g block matrices Z[g, ci, co] over (input unit, output unit)."""
    node: onnx.NodeProto
    layer: object  # graph.Layer
    consumer: object  # the graph.Consumer entry of this node
    data_slot: int
    in_axis_from_end: int | None  # channel axis of the data input counted from the end (MatMul), or None
    in_axis: int | None  # fixed channel axis (Conv, Gemm)
    groups: int
    c_in: int
    c_out: int
    out_axis: int | None = None
    out_axis_from_end: int | None = None

    def blocks(self, w: np.ndarray, mode: Mode | None) -> np.ndarray:
        """Z[g, ci, co] over the kernel taps: the count of non-zeros (mode None), or the sum of squares."""
        g, ci, co = self.groups, self.c_in // self.groups, self.c_out // self.groups
        if mode is None:
            val = w if w.dtype == bool else (w != 0)
            red = (lambda x, ax: np.count_nonzero(x, axis=ax))
        else:
            val = np.square(w.astype(np.float64))
            red = (lambda x, ax: x.sum(axis=ax))
        op = self.node.op_type
        if op == "Conv":
            z = red(val.reshape(g, co, ci, -1), 3)  # [g, co, ci]
            return np.swapaxes(z, 1, 2)
        if op == "ConvTranspose":
            return red(val.reshape(g, ci, co, -1), 3)
        return self._dense_matrix(val)[None]  # counts of a 2-D weight are its non-zero flags

    def _dense_matrix(self, val):
        """[K, N] orientation of a 2-D Gemm/MatMul weight."""
        return val if self._layout().in_axis % 2 == 0 else val.T

    def forward(self, z, in_vec, mode):
        if isinstance(z, Coo):
            return z.forward(in_vec)
        g = self.groups
        x = in_vec.reshape(g, -1)
        if mode.boolean:
            if x.all():  # the common case: no temporary the size of the weight
                return z.any(axis=1).reshape(-1)
            if g == 1:
                return z[0][x[0]].any(axis=0)
            return (z & x[:, :, None]).any(axis=1).reshape(-1)
        return np.einsum("gio,gi->go", z, x).reshape(-1)

    def backward(self, z, out_vec, mode):
        if isinstance(z, Coo):
            return z.backward(out_vec)
        g = self.groups
        y = out_vec.reshape(g, -1)
        if mode.boolean:
            if y.all():
                return z.any(axis=2).reshape(-1)
            if g == 1:
                return z[0][:, y[0]].any(axis=1)
            return (z & y[:, None, :]).any(axis=2).reshape(-1)
        return np.einsum("gio,go->gi", z, y).reshape(-1)

    def element_mask(self, w, in_vec, out_vec):
        """Per weight element: its input unit's and output unit's flags (or factors, multiplied), in the weight's
        own layout."""
        g, ci, co = self.groups, self.c_in // self.groups, self.c_out // self.groups
        op = self.node.op_type
        extra = (1,) * (w.ndim - 2)
        if op == "Conv":
            ins = in_vec.reshape(g, ci)[np.arange(self.c_out) // co]  # [O, ci]
            return ins.reshape(ins.shape + extra) * out_vec.reshape((-1, 1) + extra)
        if op == "ConvTranspose":
            outs = out_vec.reshape(g, co)[np.arange(self.c_in) // ci]  # [C_in, co]
            return in_vec.reshape((-1, 1) + extra) * outs.reshape(outs.shape + extra)
        m = in_vec[:, None] * out_vec[None, :]  # [K, N]
        return m if self._layout().in_axis % 2 == 0 else m.T

    def out_index(self, u: int):
        """Index (into the weight) of every weight of output unit ``u``."""
        op = self.node.op_type
        if op == "Conv":
            return (u,)
        if op == "ConvTranspose":
            ci, co = self.c_in // self.groups, self.c_out // self.groups
            g = u // co
            return (slice(g * ci, (g + 1) * ci), u % co)
        return (slice(None), u) if self._layout().in_axis % 2 == 0 else (u,)

    def out_broadcast(self, flags: np.ndarray):
        """Per-output-unit flags shaped to broadcast over the weight (None for ConvTranspose)."""
        op = self.node.op_type
        rank = len(self.layer.shape)
        if op == "Conv":
            return flags.reshape((-1,) + (1,) * (rank - 1))
        if op == "ConvTranspose":
            return None
        return flags.reshape(1, -1) if self._layout().in_axis % 2 == 0 else flags.reshape(-1, 1)

    def in_index(self, i: int):
        """(index of every weight reading input unit ``i``, the output units those weights feed)."""
        op = self.node.op_type
        ci, co = self.c_in // self.groups, self.c_out // self.groups
        g = i // ci
        if op == "Conv":
            return (slice(g * co, (g + 1) * co), i % ci), np.arange(g * co, (g + 1) * co)
        if op == "ConvTranspose":
            return (i,), np.arange(g * co, (g + 1) * co)
        if self._layout().in_axis % 2 == 0:
            return (i,), np.arange(self.c_out)
        return (slice(None), i), np.arange(self.c_out)

    def _layout(self):
        return self.consumer.layout


def layer_op(node, layer, consumer, shapes: Shapes):
    """A LayerOp for a main-graph prunable node whose layout the unit graph understands, else None."""
    w_shape = layer.shape
    op = node.op_type
    slot = consumer.slot
    if op == "Conv":
        g = node_attr(node, "group", 1)
        return LayerOp(node, layer, consumer, 0, None, 1, g, w_shape[1] * g, w_shape[0], out_axis=1)
    if op == "ConvTranspose":
        g = node_attr(node, "group", 1)
        return LayerOp(node, layer, consumer, 0, None, 1, g, w_shape[0], w_shape[1] * g, out_axis=1)
    if len(w_shape) != 2:
        return None
    lay = consumer.layout  # in the stored tensor's axes (a Transpose in between is already accounted for)
    k, n = w_shape[lay.in_axis], w_shape[lay.out_axis] if lay.out_axis is not None else 1
    if op == "Gemm":
        if slot != 1 or node_attr(node, "transA", 0):
            return None
        return LayerOp(node, layer, consumer, 0, None, 1, 1, k, n, out_axis=1)
    if op == "MatMul":
        if slot == 1:
            return LayerOp(node, layer, consumer, 0, 1, None, 1, k, n, out_axis_from_end=1)
        return LayerOp(node, layer, consumer, 1, 2, None, 1, k, n, out_axis_from_end=2)
    return None


# ---------------------------------------------------------------- the analysis

@dataclass
class Analysis:
    mode: str = "channel"
    fwd: dict = field(default_factory=dict)
    bwd: dict = field(default_factory=dict)
    ops: dict = field(default_factory=dict)  # node index -> LayerOp
    unknown_ops: list = field(default_factory=list)
    effective: dict = field(default_factory=dict)  # layer name -> bool mask (weight shape)
    shapes: Shapes | None = None
    blocks: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)  # node index -> non-zero counts per (group, in unit, out unit)
    nonzero: dict = field(default_factory=dict)  # layer name -> non-zero weights
    effective_count: dict = field(default_factory=dict)  # layer name -> effective weights
    exact_layers: set = field(default_factory=set)  # layers the unit graph analysed (others: effective = direct)


def analyse(model: onnx.ModelProto, layers: list, weights: dict, shapes: Shapes | None = None,
            mode: Mode = BOOL, layer_fwd=None, layer_bwd=None) -> Analysis:
    """Forward/backward unit propagation over the main graph.

    ``weights``: layer name -> current (masked) weight array. ``layer_fwd``/``layer_bwd`` override what a
    prunable node emits (used by lookahead scoring); by default they propagate through the weights' blocks.
    """
    shapes = shapes or infer_shapes(model)
    graph = model.graph
    res = Analysis(shapes=shapes)
    by_node = {}
    for layer in layers:
        if layer.graph != "":
            continue
        for c in layer.consumers:
            if c.graph == "":
                by_node[c.index] = (layer, c)
    blocks = res.blocks
    inits = {t.name for t in graph.initializer}
    fwd = res.fwd
    for vi in graph.input:
        if vi.name not in inits:
            fwd[vi.name] = Units.agg(True if mode.boolean else 1.0)
    for name in inits:
        fwd[name] = Units.agg(mode.zero())
    unknown = set()
    nodes = list(graph.node)
    implicit = {i: _implicit_inputs(n) for i, n in enumerate(nodes) if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)}
    for idx, node in enumerate(nodes):
        if node.op_type == "Constant":
            fwd[node.output[0]] = Units.agg(mode.zero())
            continue
        layer, consumer = by_node.get(idx, (None, None))
        lop = layer_op(node, layer, consumer, shapes) if layer is not None else None
        ins = [fwd.get(n, Units.agg(True if mode.boolean else 1.0)) if n else None for n in node.input]
        if lop is not None:
            res.ops[idx] = lop
            if mode.boolean:
                flags = weights.nonzero(layer.name) if hasattr(weights, "nonzero") else weights[layer.name]
                res.counts[idx] = cnt = _block_counts(lop, flags)
                if isinstance(cnt, Coo):
                    res.nonzero[layer.name] = cnt.nnz()
                    z = blocks[idx] = cnt
                else:
                    res.nonzero[layer.name] = int(np.count_nonzero(cnt) if cnt.dtype == bool else cnt.sum())
                    z = blocks[idx] = cnt if cnt.dtype == bool else cnt > 0
            else:
                z = blocks[idx] = lop.blocks(weights[layer.name], mode)
            in_vec = _in_vec(lop, node, ins[lop.data_slot], shapes, mode)
            out = layer_fwd(lop, z, in_vec) if layer_fwd else lop.forward(z, in_vec, mode)
            fwd[node.output[0]] = Units(_out_axis(lop, node, shapes), out)
            continue
        if idx in implicit:
            ins = ins + [fwd.get(n, Units.agg(True if mode.boolean else 1.0)) for n in implicit[idx]]
        if node.op_type not in HANDLED or idx in implicit:
            unknown.add(node.op_type)
        outs = forward(node, ins, shapes, mode) if idx not in implicit else \
            [mix(ins, mode)] * len(node.output)
        for o, u in zip(node.output, outs):
            if o:
                fwd[o] = u if u is not None else Units.agg(mode.zero())
    bwd = res.bwd
    for vi in graph.output:
        _acc(bwd, vi.name, Units.agg(True if mode.boolean else 1.0), mode)
    for idx in range(len(nodes) - 1, -1, -1):
        node = nodes[idx]
        outs = [bwd.get(o) for o in node.output]
        if all(u is None for u in outs):
            continue
        lop = res.ops.get(idx)
        if lop is not None:
            out_vec = outs[0].on(_out_axis(lop, node, shapes), lop.c_out, mode)
            back = layer_bwd(lop, blocks[idx], out_vec) if layer_bwd else lop.backward(blocks[idx], out_vec, mode)
            in_axis = _in_axis(lop, node.input[lop.data_slot], shapes)
            _acc(bwd, node.input[lop.data_slot], Units(in_axis, back), mode)
            continue
        if node.op_type in ("Flatten", "Reshape"):
            in_u = fwd.get(node.input[0])
            back = [flatten_back(node, outs[0], in_u.axis if in_u is not None else None, shapes, mode)]
            back += [mix(outs, mode)] * (len(node.input) - 1)
        elif idx in implicit:
            back = [mix(outs, mode)] * (len(node.input) + len(implicit[idx]))
        else:
            back = backward(node, None, outs, shapes, mode)
        names = list(node.input) + implicit.get(idx, [])
        for name, u in zip(names, back):
            if name and u is not None:
                _acc(bwd, name, u, mode)
    res.unknown_ops = sorted(unknown - UNARY - BINARY)
    return res


def _acc(table, name, u, mode):
    prev = table.get(name)
    if prev is None:
        table[name] = u
    elif prev.axis == u.axis and prev.vec.size == u.vec.size:
        table[name] = Units(u.axis, mode.combine(prev.vec, u.vec))
    else:
        table[name] = mix([prev, u], mode)


def _in_axis(lop, name, shapes):
    if lop.in_axis is not None:
        return lop.in_axis
    r = shapes.rank(name)
    return None if r is None else r - lop.in_axis_from_end


def _out_axis(lop, node, shapes):
    if lop.out_axis is not None:
        return lop.out_axis
    r = shapes.rank(node.output[0])
    return None if r is None else r - lop.out_axis_from_end


def _in_vec(lop, node, u, shapes, mode):
    axis = _in_axis(lop, node.input[lop.data_slot], shapes)
    if u is None:
        return np.full(lop.c_in, mode.zero(), dtype=mode.dtype)
    if axis is None:
        return np.full(lop.c_in, u.vec.any() if mode.boolean else mode.spread(u), dtype=mode.dtype)
    return u.on(axis, lop.c_in, mode)


def unit_flags(res: Analysis, idx: int, node) -> tuple:
    """(input units reached from an input, output units reaching an output) of analysed node ``idx``."""
    lop, sh = res.ops[idx], res.shapes
    in_vec = _in_vec(lop, node, res.fwd.get(node.input[lop.data_slot]), sh, BOOL)
    out_u = res.bwd.get(node.output[0])
    out_vec = out_u.on(_out_axis(lop, node, sh), lop.c_out, BOOL) if out_u is not None else \
        np.zeros(lop.c_out, dtype=bool)
    return in_vec, out_vec


def effective_counts(model, layers, weights, shapes=None) -> Analysis:
    """Channel-level effective weight counts for every layer, without materialising masks.

    A layer with a use the unit graph cannot see (a subgraph, a batched weight, a reader besides its layers such
    as a tied embedding's Gather) counts every non-zero as effective: never claimed dead, never in ``exact_layers``
    (what removal may change). A tied weight takes the union over its consumers.
    """
    res = analyse(model, layers, weights, shapes)
    nodes = list(model.graph.node)
    per_layer = {}
    for idx, lop in res.ops.items():
        per_layer.setdefault(lop.layer.name, []).append(idx)
    uses, outputs = reader_map(model.graph), {o.name for o in model.graph.output}
    for layer in layers:
        idxs = per_layer.get(layer.name, [])
        if len(idxs) < len(layer.consumers) or other_readers(layer, nodes, uses, outputs):
            res.effective_count[layer.name] = int(np.count_nonzero(weights[layer.name]))
            continue
        res.exact_layers.add(layer.name)
        if len(idxs) == 1:
            in_vec, out_vec = unit_flags(res, idxs[0], nodes[idxs[0]])
            lop = res.ops[idxs[0]]
            g = lop.groups
            cnt = res.counts[idxs[0]]
            if in_vec.all() and out_vec.all():
                res.effective_count[layer.name] = res.nonzero[layer.name]
            elif isinstance(cnt, Coo):
                res.effective_count[layer.name] = cnt.count(in_vec, out_vec)
            elif cnt.dtype == bool:
                res.effective_count[layer.name] = int(np.count_nonzero(cnt[0][in_vec][:, out_vec]))
            else:
                res.effective_count[layer.name] = int(np.einsum(
                    "gio,gi,go->", cnt, in_vec.reshape(g, -1).astype(np.int64), out_vec.reshape(g, -1).astype(np.int64)))
        else:
            res.effective_count[layer.name] = int(np.count_nonzero(_union_mask(res, idxs, nodes, weights[layer.name])))
    return res


def _union_mask(res, idxs, nodes, w):
    eff = np.zeros(w.shape, dtype=bool)
    for idx in idxs:
        in_vec, out_vec = unit_flags(res, idx, nodes[idx])
        eff |= (w != 0) & res.ops[idx].element_mask(w, in_vec, out_vec)
    return eff


def effective_masks(model, layers, weights, shapes=None) -> dict:
    """layer name -> boolean effective mask (for tests and small models; the pipeline counts instead)."""
    res = analyse(model, layers, weights, shapes)
    nodes = list(model.graph.node)
    per_layer = {}
    for idx, lop in res.ops.items():
        per_layer.setdefault(lop.layer.name, []).append(idx)
    out = {}
    for layer in layers:
        w = weights[layer.name]
        idxs = per_layer.get(layer.name, [])
        out[layer.name] = _union_mask(res, idxs, nodes, w) if len(idxs) == len(layer.consumers) else (w != 0)
    return out
