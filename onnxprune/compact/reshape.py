"""The channel axis through Reshape/Flatten (kept, merged with the axes after it, split into attention heads) and
Reshape targets that are constants or built by a Concat of constant and run-time pieces (torch/HF exports)."""
from __future__ import annotations

import numpy as np

from ..layout import node_attr
from ..unitops import norm_axis
from .labels import Graph, Rewrite, _out_chan


def target(ix, shapes, node):
    """A Reshape's target, one (value, where) per output axis: value is the int in the target (None where it is
    computed at run time) and where is (node index, input slot, offset) of the constant that holds it (None for a
    run-time piece). The target is a constant, or a Concat (axis 0) of 1-D pieces used by this Reshape only.
    None when neither."""
    name = node.input[1] if len(node.input) > 1 else ""
    if not name:
        return None
    me = ix.producer.get(node.output[0]) if node.output else None
    arr = ix.const(name)
    if arr is not None:
        return [(int(v), (me, 1, k)) for k, v in enumerate(arr.reshape(-1).tolist())]
    src = ix.producer.get(name)
    if src is None or ix.uses.get(name, 0) != 1:
        return None
    cat = ix.nodes[src]
    if cat.op_type != "Concat" or cat.domain not in ("", "ai.onnx") or norm_axis(node_attr(cat, "axis", 0), 1) != 0:
        return None
    out = []
    for slot, piece in enumerate(cat.input):
        if not piece:
            return None
        val = ix.const(piece)
        if val is not None:
            if val.ndim > 1 or val.dtype.kind not in "iu":
                return None
            out.extend((int(v), (src, slot, k)) for k, v in enumerate(val.reshape(-1).tolist()))
            continue
        dims = shapes.dims.get(piece)
        if dims is None or len(dims) != 1 or not isinstance(dims[0], int):
            return None
        out.extend([(None, None)] * dims[0])
    return out


def set_target(ix, shapes, idx, pos, value) -> None:
    """Write ``value`` at output axis ``pos`` of the target of Reshape node ``idx`` (located by ``target``)."""
    tgt = target(ix, shapes, ix.nodes[idx])
    where = tgt[pos][1]
    node_idx, slot, off = where
    node = ix.nodes[node_idx]
    arr = ix.const(node.input[slot])
    new = arr.reshape(-1).copy()
    new[off] = value
    ix.set_input(node_idx, slot, new.reshape(arr.shape))


def _same(t, j, din, dout) -> bool:
    """Target axis ``j`` keeps input dim ``j``: 0 (copy), -1 or the dim itself, or a run-time piece where shape
    inference found the same dim (a symbolic dim copied through Shape -> Gather -> Concat)."""
    v = t[j][0]
    if v is None:
        return dout[j] == din[j] and dout[j] is not None
    return v in (0, -1, din[j])


def _keeps_axis(din, dout, a) -> bool:
    """Axis ``a`` holds the same channels before and after: its dim is unchanged and so is the product of the
    dims after it (every element then keeps its channel index), or, with symbolic dims there, the dims before
    it are the same ones (as inferred)."""
    if len(dout) <= a or not isinstance(din[a], int) or dout[a] != din[a]:
        return False
    rin, rout = din[a + 1:], dout[a + 1:]
    if all(isinstance(x, int) for x in list(rin) + list(rout)):
        return int(np.prod(rin)) == int(np.prod(rout))
    return all(d is not None for d in din[:a]) and list(din[:a]) == list(dout[:a])


def reshape(g: Graph, idx, node, chan) -> bool:
    din, dout = g.shapes.dims.get(node.input[0]), g.shapes.dims.get(node.output[0])
    if din is None or dout is None:
        return False
    a = chan.axis
    t = None
    if node.op_type == "Reshape":
        t = target(g.index, g.shapes, node)
        if t is None or len(t) != len(dout):
            return False
    out = node.output[0]
    # the channel axis stays, what comes after it is regrouped: [N, C, H, W] -> [N, C, H*W]
    if _keeps_axis(din, dout, a):
        if t is not None and t[a][0] not in (0, -1, din[a]):
            return False  # a run-time channel count would not follow the removal
        _out_chan(g, out, a, chan.lab, chan.val)
        if t is not None and t[a][0] > 0:
            g.rewrites.append(Rewrite("reshape", idx, axis=a, tensor=out))
        return True
    if t is not None and _split_heads(g, idx, node, chan, din, dout, t):
        return True
    # dims [k:] merged into one axis k: each channel becomes a group of features
    if node.op_type == "Flatten":
        k = norm_axis(node_attr(node, "axis", 1), len(din))
    else:
        k = len(dout) - 1
        if k > len(din) or not all(_same(t, j, din, dout) for j in range(k)):
            return False
        if t[k][0] is None or (t[k][0] == -1 and any(v == -1 for v, _ in t[:k])):
            return False
    rest = din[k:]
    if a < k or len(dout) != k + 1 or not all(isinstance(d, int) for d in rest):
        return False
    if isinstance(dout[k], int) and dout[k] != int(np.prod(rest)):
        return False
    if t is not None and t[k][0] not in (-1, int(np.prod(rest))):
        return False
    c = a - k
    grid = [1] * len(rest)
    grid[c] = rest[c]
    lab = np.broadcast_to(chan.lab.reshape(grid), rest).reshape(-1)
    val = np.broadcast_to(chan.val.reshape(grid), rest).reshape(-1)
    _out_chan(g, out, k, lab, val)
    if t is not None and t[k][0] > 0:
        g.rewrites.append(Rewrite("reshape", idx, axis=k, tensor=out))
    return True


def _split_heads(g, idx, node, chan, din, dout, t) -> bool:
    """[.., C, ..] -> [.., H, C/H, ..]: the channel axis split into H heads of C/H channels (multi-head
    attention). Each head's channels become one unit (they are removed together: the whole head), carried on
    the head axis; the target's H is rewritten to the heads kept."""
    a = chan.axis
    if len(dout) != len(din) + 1 or len(dout) < a + 2 or list(dout[a + 2:]) != list(din[a + 1:]):
        return False
    if not all(_same(t, j, din, dout) for j in range(a)):
        return False
    h, d = dout[a], dout[a + 1]
    if not isinstance(h, int) or not isinstance(d, int) or h < 2 or h * d != chan.lab.size:
        return False
    hv, dv = t[a][0], t[a + 1][0]
    if hv not in (-1, h) or dv not in (-1, d) or hv == dv == -1:
        return False
    heads = chan.lab.reshape(h, d)
    for j in range(1, d):
        g.union(heads[:, 0], heads[:, j])
    out = node.output[0]
    _out_chan(g, out, a, heads[:, 0].copy(), np.full(h, np.nan))
    if hv == h:
        g.rewrites.append(Rewrite("reshape", idx, axis=a, tensor=out))
    return True
