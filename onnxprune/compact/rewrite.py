"""Apply a removal decision: fold constants into biases, slice weights, parameters, split sizes, slice offsets,
reshape targets and value_info."""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from ..layout import node_attr, set_attr
from .index import drop_orphans
from .labels import Graph
from .ops import slice_params
from .reshape import set_target


class _Weights:
    """Current values of the weights being rewritten; written back once."""

    def __init__(self, index):
        self.arrays, self.index = {}, index

    def get(self, layer):
        key = id(layer.tensor)
        if key not in self.arrays:
            self.arrays[key] = (layer, self.index.weight(layer))
        return self.arrays[key][1]

    def put(self, layer, arr):
        self.arrays[id(layer.tensor)] = (layer, arr)

    def write(self):
        for layer, arr in self.arrays.values():
            self.index.store(layer, arr)


def apply(g: Graph, gone: np.ndarray) -> dict:
    """Rewrite ``g.index.model`` in place removing every channel whose label is ``gone``. Returns details."""
    ix = g.index
    keep = {name: ~gone[c.lab] for name, c in g.chans.items()}
    ws = _Weights(ix)
    inserts = []
    folded = _fold(g, keep, ws, inserts)
    changed_w = set()
    for p in g.producers:
        k = keep.get(p.out)
        if k is None or k.all():
            continue
        node = ix.nodes[p.idx]
        w = ws.get(p.layer)
        idx = np.flatnonzero(k)
        ws.put(p.layer, np.take(w, idx, axis=p.w_axis))
        changed_w.add(p.layer.name)
        if len(node.input) > 2 and node.input[2]:
            b = ix.const(node.input[2])
            if b is not None and b.ndim >= 1 and b.shape[-1] == k.size and b.size == k.size:
                ix.set_input(p.idx, 2, np.take(b, idx, axis=b.ndim - 1))
        if p.kind == "dw":
            set_attr(node, "group", int(keep[node.input[0]].sum()))
    for r in g.readers:
        k = keep.get(r.data)
        if k is None or k.all():
            continue
        ws.put(r.layer, np.take(ws.get(r.layer), np.flatnonzero(k), axis=r.w_axis))
        changed_w.add(r.layer.name)
    for rw in g.rewrites:
        _rewrite(g, rw, keep)
    ws.write()
    _value_info(g, keep, changed_w)
    drop_orphans(ix)
    _insert_adds(ix, inserts)
    return {"folded": folded, "weights_changed": sorted(changed_w)}


def _fold(g, keep, ws, inserts) -> list:
    """Move the contribution of removed channels that carry a non-zero constant into the reader's bias
    (``inserts`` collects (MatMul node, bias) pairs that need a new Add)."""
    ix = g.index
    out = []
    for r in g.readers:
        chan = g.chans.get(r.data)
        k = keep.get(r.data)
        if chan is None or k.all():
            continue
        sel = ~k & np.isfinite(chan.val) & (chan.val != 0)
        if not sel.any() or r.fold is None:  # decide() drops such a channel only where its weights are zero
            continue
        w = ws.get(r.layer)
        vals = chan.val[sel]
        cols = np.take(w, np.flatnonzero(sel), axis=r.w_axis).astype(np.float64)
        if r.kind == "conv":
            contrib = (cols.reshape(cols.shape[0], int(sel.sum()), -1).sum(axis=2) * vals).sum(axis=1)
        else:
            contrib = vals @ (cols if r.w_axis == 0 else cols.T)
        node = ix.nodes[r.idx]
        k_out = keep.get(node.output[0])
        if k_out is not None and k_out.size == contrib.size:
            contrib = np.where(k_out, contrib, 0.0)  # removed output units need nothing
        if not np.any(contrib):
            continue
        if r.fold == "conv":
            b = ix.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            base = np.zeros(contrib.size) if b is None else b.astype(np.float64)
            ix.set_input(r.idx, 2, base + contrib, dtype=w.dtype if b is None else b.dtype)
        elif r.fold == "gemm":
            alpha, beta = float(node_attr(node, "alpha", 1.0)), float(node_attr(node, "beta", 1.0))
            c = ix.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if beta == 0.0:
                c, beta = None, 1.0
                set_attr(node, "beta", 1.0)
            if c is None:
                new, dtype = alpha * contrib / beta, w.dtype
            else:
                shape = c.shape if c.size == contrib.size else (contrib.size,)
                new = (np.broadcast_to(c.astype(np.float64).reshape(-1), contrib.shape) + alpha * contrib / beta)
                new, dtype = new.reshape(shape), c.dtype
            ix.set_input(r.idx, 2, new, dtype=dtype)
        elif r.fold == "insert":  # added after the MatMul's own output units are removed: only the kept ones
            keep_out = k_out if k_out is not None and k_out.size == contrib.size else slice(None)
            inserts.append((node, contrib[keep_out].astype(w.dtype)))
        elif r.fold == "add":
            o = node.output[0]
            add_idx = ix.readers[o][0]
            add = ix.nodes[add_idx]
            slot = 1 if add.input[0] == o else 0
            b = ix.const(add.input[slot])
            new = np.broadcast_to(b.astype(np.float64), b.shape[:-1] + (contrib.size,)) + contrib
            ix.set_input(add_idx, slot, new, dtype=b.dtype)
        else:  # pragma: no cover - decide() never removes such a channel
            raise AssertionError(f"cannot fold into {node.op_type} '{node.name}'")
        out.append(node.name or r.layer.name)
    return out


def _insert_adds(ix, inserts):
    """MatMul -> MatMul + Add(new bias), the Add taking over the MatMul's output name (done last: it moves
    node positions)."""
    graph = ix.model.graph
    for node, bias in inserts:
        out = node.output[0]
        mid = ix.unique(out + "_matmul")
        bname = ix.unique((node.name or out) + "_bias")
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(bias), bname))
        pos = next(k for k, n in enumerate(graph.node) if len(n.output) and n.output[0] == out)
        graph.node[pos].output[0] = mid
        add = helper.make_node("Add", [mid, bname], [out], name=ix.unique((node.name or out) + "_add"))
        graph.node.insert(pos + 1, add)


def _rewrite(g, rw, keep):
    ix = g.index
    node = ix.nodes[rw.idx]
    k = keep.get(rw.tensor)
    if k is None or k.all():
        return
    if rw.kind == "param":
        arr = ix.const(node.input[rw.slot])
        if arr is not None and arr.shape[rw.axis] == k.size:
            ix.set_input(rw.idx, rw.slot, np.take(arr, np.flatnonzero(k), axis=rw.axis))
    elif rw.kind == "split":
        sizes = [int(keep[o].sum()) for o in node.output]
        if len(node.input) > 1 and node.input[1] or ix.opset >= 13:
            ix.set_input(rw.idx, 1, np.array(sizes, dtype=np.int64), dtype=np.int64)
            for a in list(node.attribute):
                if a.name == "num_outputs":
                    node.attribute.remove(a)
        else:
            set_attr(node, "split", [int(v) for v in sizes])
    elif rw.kind == "slice":
        chan = g.chans[rw.tensor]
        params = slice_params(ix, node, chan.rank)
        for j, (a, s, e, _) in enumerate(params):
            if a == rw.axis:
                lo, hi, _ = slice(s, e, 1).indices(k.size)
                hi = max(hi, lo)
                starts = ix.const(node.input[1]).reshape(-1).copy()
                ends = ix.const(node.input[2]).reshape(-1).copy()
                starts[j], ends[j] = int(k[:lo].sum()), int(k[:hi].sum())
                ix.set_input(rw.idx, 1, starts)
                ix.set_input(rw.idx, 2, ends)
                break
    elif rw.kind == "reshape":
        set_target(ix, g.shapes, rw.idx, rw.axis, int(k.sum()))


def _value_info(g, keep, changed_w):
    """Shrink the channel dim of every value_info entry of a compacted tensor; drop what cannot be stated."""
    graph = g.index.model.graph
    weight_chain = set()
    for p in list(g.producers) + list(g.readers):
        if p.layer.name in changed_w:
            node = g.index.nodes[p.idx]
            name = node.input[1] if node.op_type != "MatMul" or p.layer.consumers[0].slot == 1 else node.input[0]
            while name in g.index.producer and name not in g.index.inits:
                weight_chain.add(name)
                n = g.index.nodes[g.index.producer[name]]
                if n.op_type not in ("Identity", "Cast", "Transpose") or not n.input:
                    break
                name = n.input[0]
    entries = list(graph.value_info)
    kept = []
    inits = {t.name: t for t in graph.initializer}
    for vi in entries:
        k = keep.get(vi.name)
        if vi.name in weight_chain:
            continue
        t = inits.get(vi.name)
        if t is not None:  # a rewritten constant: state its own dims
            tt = vi.type.tensor_type
            if tt.HasField("shape") and [d.dim_value for d in tt.shape.dim] != list(t.dims):
                tt.ClearField("shape")
                tt.shape.SetInParent()  # a scalar keeps a shape of rank 0
                for d in t.dims:
                    tt.shape.dim.add().dim_value = int(d)
        if k is not None and not k.all():
            chan = g.chans[vi.name]
            tt = vi.type.tensor_type
            if not tt.HasField("shape") or len(tt.shape.dim) != chan.rank:
                continue
            d = tt.shape.dim[chan.axis]
            if d.HasField("dim_value"):
                d.dim_value = int(k.sum())
            else:
                continue
        kept.append(vi)
    kept_ids = {id(vi) for vi in kept}
    for k in range(len(entries) - 1, -1, -1):
        if id(entries[k]) not in kept_ids:
            del graph.value_info[k]
