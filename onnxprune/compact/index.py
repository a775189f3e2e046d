"""Constant lookup, use counts and constant rewriting over a model's main graph (the compaction's model access)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..connectivity import node_reads
from ..io import hold, write_tensor
from ..io.mapped import Streamed

PACKED_BLOCKS = 1 << 24  # non-zero flag matrices above this many values are cached as packed bits


class Index:
    """Where each main-graph name comes from and who reads it; reads and rewrites constant inputs."""

    def __init__(self, model: onnx.ModelProto, pending: dict | None = None):
        self.model = model
        # main-graph initializer name -> values held outside the protobuf (io.LoadedModel.pending): read and
        # written here instead of the tensor's (empty) raw_data
        self.pending = pending if pending is not None else {}
        g = model.graph
        self.nodes = list(g.node)
        self.inputs = {i.name for i in g.input}
        self.outputs = {o.name for o in g.output}
        self.inits = {t.name: t for t in g.initializer}
        self.const_nodes = {}
        self.producer = {}
        for idx, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = idx
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1:
                self.const_nodes[n.output[0]] = n
        self.uses = {}
        self.readers = {}
        for idx, n in enumerate(self.nodes):
            for i in node_reads(n):
                self.uses[i] = self.uses.get(i, 0) + 1
                self.readers.setdefault(i, []).append(idx)
        for o in g.output:
            self.uses[o.name] = self.uses.get(o.name, 0) + 1
        self._names = set(self.producer) | set(self.inits) | self.inputs
        self._cache = {}
        self._weights = {}
        self._blocks = {}
        self.orphans = []  # names whose readers this rewrite took away
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)

    def const(self, name: str):
        """The value of a constant (initializer that is not a graph input, or Constant node), else None."""
        if not name:
            return None
        if name in self._cache:
            return self._cache[name]
        val = None
        src = self.producer.get(name)
        if src is not None and self.nodes[src].op_type == "Identity" and self.nodes[src].input:
            val = self.const(self.nodes[src].input[0])  # Identity chains in front of constants
        elif name in self.inits and name not in self.inputs:
            val = self._stored(self.inits[name])
        elif name in self.const_nodes:
            n = self.const_nodes[name]
            for a in n.attribute:
                if a.name == "value":
                    val = numpy_helper.to_array(a.t)
                elif a.name in ("value_float", "value_int"):
                    val = np.array(onnx.helper.get_attribute_value(a),
                                   dtype=np.float32 if a.name == "value_float" else np.int64)
                elif a.name in ("value_floats", "value_ints"):
                    val = np.array(list(onnx.helper.get_attribute_value(a)),
                                   dtype=np.float32 if a.name == "value_floats" else np.int64)
        self._cache[name] = val
        return val

    def weight(self, layer) -> np.ndarray:
        """A layer's weight values, read once."""
        key = id(layer.tensor)
        if key not in self._weights:
            if self._streamed(layer) is not None:  # a mapped weight: built on each read, never kept (memory)
                return self._stored(layer.tensor)
            self._weights[key] = self._stored(layer.tensor) if layer.main_initializer \
                else numpy_helper.to_array(layer.tensor)
        return self._weights[key]

    def _streamed(self, layer):
        held = self.pending.get(layer.tensor.name) if layer.main_initializer else None
        return held if isinstance(held, Streamed) else None

    def _stored(self, tensor) -> np.ndarray:
        """A main-graph initializer's values (pending or in the protobuf)."""
        arr = self.pending.get(tensor.name)  # an io.mapped.Streamed (mapped weight) is read into memory here
        return np.asarray(arr) if arr is not None else numpy_helper.to_array(tensor)

    def store(self, layer, values: np.ndarray) -> None:
        """Replace a weight's values (and dims): held aside again when they were pending (only a main-graph
        initializer can be: pending is keyed by their names, which a Constant's tensor may share), else written."""
        tensor = layer.tensor
        arr = np.ascontiguousarray(values)
        del tensor.dims[:]
        tensor.dims.extend(arr.shape)
        was_held = layer.main_initializer and self.pending.pop(tensor.name, None) is not None
        if was_held and hold(self.pending, tensor, arr, owned=True):
            return
        write_tensor(tensor, arr)  # in its own storage field; name, doc_string and metadata stay

    def blocks(self, layer) -> np.ndarray:
        """Non-zero flags of a layer's weight per (axis 0, axis 1) pair, any over the kernel: one pass over the
        weight serves both its output rows and its (input channel, output unit) reader matrix."""
        key = id(layer.tensor)
        if key not in self._blocks:
            streamed = self._streamed(layer)
            nz = streamed.nonzero() if streamed is not None else self.weight(layer) != 0
            nz = nz.reshape(nz.shape[0], nz.shape[1], -1).any(axis=2) if nz.ndim > 2 else nz
            # a large one is kept as packed bits (an LLM's every MatMul would otherwise stay here byte per value)
            self._blocks[key] = (np.packbits(nz.reshape(-1)), nz.shape) if nz.size > PACKED_BLOCKS else nz
        held = self._blocks[key]
        if isinstance(held, tuple):
            bits, shape = held
            return np.unpackbits(bits, count=int(np.prod(shape))).view(bool).reshape(shape)
        return held

    def unique(self, base: str) -> str:
        name, k = f"{base}_compact", 1
        while name in self._names:
            k += 1
            name = f"{base}_compact{k}"
        self._names.add(name)
        return name

    def set_input(self, idx: int, slot: int, value: np.ndarray, dtype=None) -> None:
        """Make input ``slot`` of node ``idx`` the constant ``value``: the initializer is rewritten in place when
        this node is its only reader, otherwise a new initializer is added and wired in."""
        node = self.nodes[idx]
        old = node.input[slot] if slot < len(node.input) else ""
        if dtype is None:
            prev = self.const(old)
            dtype = prev.dtype if prev is not None else value.dtype
        arr = np.ascontiguousarray(np.asarray(value).astype(dtype, copy=False))
        if old and old in self.inits and old not in self.inputs and self.uses.get(old, 0) == 1:
            self.pending.pop(old, None)
            t = self.inits[old]
            del t.dims[:]
            t.dims.extend(arr.shape)
            write_tensor(t, arr)
            self._cache[old] = arr
            return
        name = self.unique(old or f"{node.name or node.op_type}_in{slot}")
        t = numpy_helper.from_array(arr, name)
        self.model.graph.initializer.append(t)
        self.inits[name] = self.model.graph.initializer[-1]
        self._cache[name] = arr
        while len(node.input) <= slot:
            node.input.append("")
        if old:
            self.uses[old] -= 1
            self.orphans.append(old)
        node.input[slot] = name
        self.uses[name] = 1


def drop_orphans(ix: Index) -> None:
    """Remove the initializers, Constant and Identity nodes that only fed inputs a rewrite replaced."""
    graph = ix.model.graph
    dead_nodes, dead_inits = set(), set()
    todo = list(ix.orphans)
    while todo:
        name = todo.pop()
        if ix.uses.get(name, 0) > 0 or name in ix.outputs:
            continue
        if name in ix.inits and name not in ix.inputs:
            dead_inits.add(name)
        elif name in ix.producer:
            idx = ix.producer[name]
            node = ix.nodes[idx]
            if idx in dead_nodes or node.op_type not in ("Constant", "Identity"):
                continue
            if any(ix.uses.get(o, 0) > 0 for o in node.output):
                continue
            dead_nodes.add(idx)
            for i in node.input:
                if i:
                    ix.uses[i] -= 1
                    todo.append(i)
    for k in sorted(dead_nodes, reverse=True):
        del graph.node[k]
    if dead_inits:
        for name in dead_inits:
            ix.pending.pop(name, None)
        for k in range(len(graph.initializer) - 1, -1, -1):
            if graph.initializer[k].name in dead_inits:
                del graph.initializer[k]


def has_subgraph(node) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


