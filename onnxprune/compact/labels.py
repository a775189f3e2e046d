"""Channel labels: which producer unit each channel of each tensor carries, tied groups, fixed channels, readers."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..shapes import infer_shapes
from ..layout import node_attr
from ..connectivity import node_reads
from ..layout import unpadded
from .index import Index, has_subgraph


@dataclass
class Chan:
    """The channel axis of one tensor: a label and a constant value (nan: varies) per index along ``axis``."""
    axis: int
    rank: int
    lab: np.ndarray
    val: np.ndarray


@dataclass
class Producer:
    """A prunable node whose output units are new labels (kind "dw": a depthwise conv that passes labels on)."""
    idx: int
    layer: object
    kind: str  # conv | convT | gemm | matmul | dw
    w_axis: int  # weight axis of the output units
    out: str  # output tensor name
    bias_slot: int | None  # Conv/ConvTranspose input 2 or Gemm C when it holds one value per unit


@dataclass
class Reader:
    """A prunable node whose input channels (on weight axis ``w_axis``) can be removed."""
    idx: int
    layer: object
    kind: str
    w_axis: int
    data: str
    fold: str | None  # where a dropped channel's constant goes: "conv" | "gemm" | "add" | None (cannot fold)


@dataclass
class Rewrite:
    kind: str  # param | split | slice | reshape
    idx: int
    slot: int = -1
    axis: int = -1  # axis of the constant to slice (param), of the tensor (split/slice/reshape)
    tensor: str = ""  # the tensor whose channels decide the rewrite


@dataclass
class Graph:
    index: Index
    shapes: object
    chans: dict = field(default_factory=dict)  # tensor name -> Chan
    parent: list = field(default_factory=list)
    fixed: list = field(default_factory=list)
    owner: list = field(default_factory=list)  # label -> producer position (or -1)
    unit: list = field(default_factory=list)  # label -> unit index in its producer
    producers: list = field(default_factory=list)
    readers: list = field(default_factory=list)
    rewrites: list = field(default_factory=list)
    kept_why: dict = field(default_factory=dict)  # op type -> channels it kept (fixed)

    def new(self, n: int, fixed: bool = False, owner: int = -1) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.fixed.extend([fixed] * n)
        self.owner.extend([owner] * n)
        self.unit.extend(range(n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                lo, hi = min(rx, ry), max(rx, ry)
                self.parent[hi] = lo
                self.fixed[lo] = self.fixed[lo] or self.fixed[hi]

    def fix(self, lab: np.ndarray, why: str = "") -> None:
        for x in lab.tolist():
            self.fixed[self.find(x)] = True
        if why and lab.size:
            self.kept_why[why] = self.kept_why.get(why, 0) + int(lab.size)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)

    def fixed_roots(self) -> np.ndarray:
        r = self.roots()
        out = np.zeros(len(self.parent), dtype=bool)
        out[r[np.array(self.fixed, dtype=bool)]] = True
        return out


def build(model, layers, pending: dict | None = None) -> Graph:
    """Propagate channel labels over the main graph in node order (``pending``: see ``Index``)."""
    from .ops import propagate
    ix = Index(model, pending)
    g = Graph(index=ix, shapes=infer_shapes(model))
    by_node = {}
    for layer in layers:
        if layer.graph == "" and len(layer.consumers) == 1 and layer.consumers[0].graph == "" \
                and not layer.graph_input and ix.uses.get(layer.tensor.name or "", 1) <= 1:
            by_node[layer.consumers[0].index] = layer
    for idx, node in enumerate(ix.nodes):
        ins = [g.chans.get(n) if n else None for n in node.input]
        layer = by_node.get(idx)
        if layer is not None and _prunable(g, idx, node, layer, ins):
            continue
        if has_subgraph(node):
            for n in node_reads(node):
                if n in g.chans:
                    g.fix(g.chans[n].lab, node.op_type)
            continue
        if not any(c is not None for c in ins):
            continue
        if node.domain not in ("", "ai.onnx") or not propagate(g, idx, node, ins):
            for c in ins:
                if c is not None:
                    g.fix(c.lab, node.op_type)
    for name in ix.outputs:
        if name in g.chans:
            g.fix(g.chans[name].lab, "graph output")
    return g


def _rank(g, name):
    return g.shapes.rank(name)


def _out_chan(g, name, axis, lab, val):
    r = _rank(g, name)
    if r is None:
        g.fix(lab, "unknown shape")
        return
    g.chans[name] = Chan(axis, r, lab, val)


def _prunable(g: Graph, idx, node, layer, ins) -> bool:
    """Handle a prunable node; False when it is not understood (the caller then keeps its input channels)."""
    ix = g.index
    op, slot = node.op_type, layer.consumers[0].slot
    w = layer.tensor
    shape = [int(d) for d in w.dims]
    data = node.input[0] if slot == 1 else None
    if data is None:
        return False
    chan = ins[0]
    out = node.output[0]
    pos = len(g.producers)
    if op in ("Conv", "ConvTranspose"):
        group = node_attr(node, "group", 1)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        bvals = ix.const(bias) if bias else None
        if bias and (bvals is None or bvals.size != (shape[0] if op == "Conv" else shape[1] * group)):
            return False
        if op == "Conv" and group > 1 and shape[1] == 1 and chan is not None and chan.axis == 1 \
                and chan.lab.size == group:
            m = shape[0] // group
            zero = ~_any_rows(g, layer, 0)
            val = np.where(zero, bvals.astype(np.float64) if bvals is not None else 0.0, np.nan)
            g.producers.append(Producer(idx, layer, "dw", 0, out, 2 if bias else None))
            _out_chan(g, out, 1, np.repeat(chan.lab, m), val)
            return True
        if group != 1:
            return False
        kind = "conv" if op == "Conv" else "convT"
        w_out, w_in = (0, 1) if op == "Conv" else (1, 0)
        if chan is not None:
            if chan.axis != 1:
                return False
            fold = "conv" if op == "Conv" and unpadded(node) else None
            g.readers.append(Reader(idx, layer, kind, w_in, data, fold))
        n_out = shape[w_out]
        zero = ~_any_rows(g, layer, w_out)
        val = np.where(zero, bvals.astype(np.float64) if bvals is not None else 0.0, np.nan)
        g.producers.append(Producer(idx, layer, kind, w_out, out, 2 if bias else None))
        _out_chan(g, out, 1, g.new(n_out, owner=pos), val)
        return True
    if op == "Gemm":
        if node_attr(node, "transA", 0) or len(shape) != 2:
            return False
        w_out, w_in = (0, 1) if node_attr(node, "transB", 0) else (1, 0)
        n_out = shape[w_out]
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        cvals = ix.const(c) if c else None
        beta = float(node_attr(node, "beta", 1.0))
        bias_slot = None
        if c:
            if cvals is None:
                return False
            if cvals.size == n_out and cvals.ndim >= 1 and cvals.shape[-1] == n_out:
                bias_slot = 2
            elif cvals.size != 1:
                return False
        if chan is not None:
            if chan.axis != 1:
                return False
            g.readers.append(Reader(idx, layer, "gemm", w_in, data, "gemm"))
        zero = ~_any_rows(g, layer, w_out)
        b = np.zeros(n_out) if cvals is None else np.broadcast_to(beta * cvals.astype(np.float64).reshape(-1), n_out)
        g.producers.append(Producer(idx, layer, "gemm", w_out, out, bias_slot))
        _out_chan(g, out, 1, g.new(n_out, owner=pos), np.where(zero, b, np.nan))
        return True
    if op == "MatMul":
        r = _rank(g, data)
        if len(shape) != 2 or r is None or r < 2:
            return False
        if chan is not None:
            if chan.axis != r - 1:
                return False
            g.readers.append(Reader(idx, layer, "matmul", 0, data, _matmul_fold(g, node)))
        zero = ~_any_rows(g, layer, 1)
        g.producers.append(Producer(idx, layer, "matmul", 1, out, None))
        _out_chan(g, out, r - 1, g.new(shape[1], owner=pos), np.where(zero, 0.0, np.nan))
        return True
    return False


def _matmul_fold(g, node):
    """'add' when the MatMul's only reader is an Add with a constant bias of one value per output unit (the
    constant goes there), else 'insert' (an Add with a new bias is inserted after the MatMul)."""
    ix = g.index
    out = node.output[0]
    rd = ix.readers.get(out, [])
    if len(rd) != 1 or ix.uses.get(out) != 1:
        return "insert"
    add = ix.nodes[rd[0]]
    if add.op_type != "Add" or len(add.input) != 2 or add.input[0] == add.input[1]:
        return "insert"
    other = add.input[1] if add.input[0] == out else add.input[0]
    b = ix.const(other)
    ok = b is not None and b.ndim >= 1 and all(d == 1 for d in b.shape[:-1]) and np.issubdtype(b.dtype, np.floating)
    return "add" if ok else "insert"


def _any_rows(g, layer, axis):
    """Whether each index along weight axis 0 or 1 has a non-zero weight."""
    return g.index.blocks(layer).any(axis=1 - axis)


