"""Weight discovery: which node inputs are prunable weights, resolved to the tensor that holds them.

Handles initializers, Constant(value=...) nodes (Paddle exports), chains of Identity/Cast in front of a weight,
tied weights (one tensor, several consumers: one Layer), initializers that are also graph inputs, and weights
inside If/Loop/Scan bodies (including outer-scope names captured by a body); what reads a name, and what reads a
weight besides its layers.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

from .errors import ConfigError, RequestError
from .io import FLOAT_TYPES
from .layout import PRUNABLE_OPS, Layout, layout_for, node_attr, weight_slots

log = logging.getLogger("onnxprune")

# Ops whose presence means the weights are quantized: zeroing q would not give a zero weight (zero_point!).
QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger", "MatMulNBits", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "QAttention", "QLinearAdd", "QLinearMul", "MatMulBnb4", "GatherBlockQuantized",
}
PASS_THROUGH = {"Identity", "Cast"}
MAX_SUBGRAPH_DEPTH = 64
MAX_CHAIN = 16


@dataclass
class Consumer:
    node: str  # the node's name (may be empty: many exports leave nodes unnamed)
    op: str
    slot: int
    graph: str
    layout: Layout
    index: int = -1  # the node's position in its graph: the identity the analyses use
    perms: tuple = ()  # the Transposes between the node and the stored tensor, node side first (perm or None)


@dataclass
class Layer:
    """One prunable tensor. Tied weights are one Layer with several consumers."""
    name: str
    tensor: TensorProto = field(repr=False)
    kind: str  # "initializer" | "constant"
    graph: str  # "" for the main graph, else a path to the subgraph
    order: int  # position of the first consumer in the main graph's node list
    consumers: list = field(default_factory=list)
    graph_input: bool = False
    excluded: bool = False

    @property
    def main_initializer(self) -> bool:
        """An initializer of the main graph: the only weights ``io.LoadedModel.pending`` may hold (by name)."""
        return self.kind == "initializer" and not self.graph

    @property
    def op(self) -> str:
        return "+".join(sorted({c.op for c in self.consumers}))

    @property
    def shape(self) -> tuple:
        return tuple(int(d) for d in self.tensor.dims)

    @property
    def size(self) -> int:
        n = 1
        for d in self.tensor.dims:
            n *= int(d)
        return n

    @property
    def dtype(self) -> str:
        return FLOAT_TYPES.get(self.tensor.data_type, str(self.tensor.data_type))

    @property
    def layout(self) -> Layout:
        return self.consumers[0].layout


class _Scope:
    """Names visible in one graph: initializers, Constant outputs, pass-through producers, graph inputs."""

    def __init__(self, graph: onnx.GraphProto, path: str, parent: "_Scope | None"):
        self.path, self.parent = path, parent
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.constants = {}
        self.producers = {}
        for idx, node in enumerate(graph.node):
            for out in node.output:
                self.producers[out] = (idx, node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.constants[node.output[0]] = (idx, node, a.t)

    def lookup(self, name: str):
        scope = self
        while scope is not None:
            if name in scope.initializers or name in scope.constants or name in scope.producers or name in scope.inputs:
                return scope
            scope = scope.parent
        return None


def _resolve(name: str, scope: _Scope, perms: list | None = None):
    """Follow Identity/Cast (and, when ``perms`` is a list, Transpose) back to a constant tensor.

    Returns (key, display name, tensor, kind, scope) or None. The Transposes passed, from the consumer towards
    the source, are appended to ``perms`` (their perm, or None for the default reversal); PyTorch's dynamo exports
    feed MatMul with Transpose(weight).
    """
    for _ in range(MAX_CHAIN):
        owner = scope.lookup(name)
        if owner is None:
            return None
        if name in owner.initializers:
            return (f"{owner.path}:init:{name}", name, owner.initializers[name], "initializer", owner)
        if name in owner.constants:
            idx, node, tensor = owner.constants[name]
            return (f"{owner.path}:const:{idx}", name, tensor, "constant", owner)
        if name in owner.producers:
            _, node = owner.producers[name]
            if node.domain in ("", "ai.onnx") and node.input:
                if node.op_type in PASS_THROUGH or (node.op_type == "Transpose" and perms is not None):
                    if node.op_type == "Transpose":
                        perms.append(node_attr(node, "perm"))
                    name, scope = node.input[0], owner
                    continue
        return None
    return None


def _source_axes(perms: list, rank: int):
    """Consumer axis a is source axis axes[a] after the Transposes in ``perms``; None if they do not fit."""
    axes = list(range(rank))
    for p in perms:
        p = p if p is not None else list(range(rank))[::-1]
        if sorted(p) != list(range(rank)):
            return None
        axes = [p[a] for a in axes]
    return axes


def find_quantized_ops(model: onnx.ModelProto) -> list:
    found = set()
    for graph, _, _ in _walk(model.graph, "", None, 0):
        for node in graph.node:
            if node.op_type in QUANTIZED_OPS:
                found.add(node.op_type)
    return sorted(found)


def _walk(graph, path, parent, order, depth=0):
    if depth > MAX_SUBGRAPH_DEPTH:
        raise RequestError(f"subgraphs nested deeper than {MAX_SUBGRAPH_DEPTH} levels")
    scope = _Scope(graph, path, parent)
    yield graph, scope, order
    for idx, node in enumerate(graph.node):
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for k, sub in enumerate(subs):
                name = node.name or f"#{idx}"
                sub_path = f"{path}/{name}.{attr.name}" + (f"[{k}]" if attr.type != onnx.AttributeProto.GRAPH else "")
                yield from _walk(sub, sub_path, scope, order if depth else idx, depth + 1)


def find_layers(model: onnx.ModelProto, exclude=(), only=None) -> tuple[list, list]:
    """All prunable tensors of ``model`` in graph order, and a list of warnings.

    ``exclude``: globs on weight or node names; ``only``: exact weight names to keep prunable (all others are
    marked excluded), used by the per-layer sensitivity analysis.
    """
    if isinstance(exclude, str):  # exclude="conv1" is one pattern, not five one-letter ones
        exclude = (exclude,)
    exclude = tuple(exclude or ())
    layers: dict[str, Layer] = {}
    warnings = []
    main_inputs = {i.name for i in model.graph.input}
    for graph, scope, order in _walk(model.graph, "", None, 0):
        for idx, node in enumerate(graph.node):
            if node.op_type not in PRUNABLE_OPS or node.domain not in ("", "ai.onnx"):
                continue
            hit = None
            for slot in weight_slots(node):
                if slot < len(node.input) and node.input[slot]:
                    perms = []
                    hit = _resolve(node.input[slot], scope, perms)
                    if hit is not None:
                        axes = _source_axes(perms, len(hit[2].dims))
                        hit = hit if axes is not None else None
                    if hit is not None:
                        break
            if hit is None:
                continue  # e.g. MatMul of two activations: never pruned
            key, name, tensor, kind, owner = hit
            if tensor.data_type not in FLOAT_TYPES:
                # an unknown data_type never gets here: checks.check_tensor refuses it on load
                warnings.append(f"{name}: {onnx.TensorProto.DataType.Name(tensor.data_type)} weight of "
                                f"{node.op_type} '{node.name}' is not a float tensor; left as is")
                continue
            node_order = idx if graph is model.graph else order
            layer = layers.get(key)
            if layer is None:
                layer = Layer(name=name, tensor=tensor, kind=kind, graph=owner.path, order=node_order)
                layer.graph_input = owner.path == "" and kind == "initializer" and name in main_inputs
                layers[key] = layer
            view = layout_for(node, slot, len(tensor.dims))  # axes of the tensor the node reads
            if axes != list(range(len(tensor.dims))):  # reached through Transpose: name the source's axes
                view = Layout(out_axis=None if view.out_axis is None else axes[view.out_axis % len(axes)],
                              in_axis=None if view.in_axis is None else axes[view.in_axis % len(axes)],
                              group=view.group)
            layer.consumers.append(Consumer(node.name, node.op_type, slot, scope.path, view, idx, tuple(perms)))
    result = sorted(layers.values(), key=lambda l: (l.order, l.graph, l.name))
    matched = set()
    for layer in result:
        if layer.graph_input:
            warnings.append(f"{layer.name}: initializer is also a graph input; callers can override it at run "
                            f"time, so the pruned values only hold when it is not fed")
        patterns = [layer.name] + [c.node for c in layer.consumers if c.node]
        hits = {g for g in exclude if any(fnmatch.fnmatchcase(p, g) for p in patterns)}
        if hits:
            layer.excluded = True
            matched |= hits
        if only is not None and layer.name not in only:
            layer.excluded = True
    unmatched = [g for g in exclude if g not in matched]
    if unmatched:  # a typo must not silently prune the layer the user meant to keep
        names = [l.name for l in result[:6]] + (["..."] if len(result) > 6 else [])
        raise ConfigError(f"--exclude {', '.join(repr(g) for g in unmatched)} matches no prunable layer "
                          f"(weight or node names, glob syntax); layers are: {', '.join(names) or 'none'}")
    return result, warnings


def _implicit_inputs(node) -> list:
    """Outer-scope names a node's subgraphs read (If/Loop/Scan bodies)."""
    names = []
    for a in node.attribute:
        subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in subs:
            defined = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                defined.update(n.output)
            for n in g.node:
                for i in node_reads(n):
                    if i not in defined and i not in names:
                        names.append(i)
    return names


def node_reads(node) -> list:
    """Every outer-scope name a node reads: its inputs, then what its subgraphs read from outside them."""
    return [i for i in list(node.input) + _implicit_inputs(node) if i]


VALUE_FREE = {"Shape", "Size"}  # readers that see a weight's shape, never its values


def reader_map(graph) -> dict:
    """name -> the main-graph nodes that read it (their inputs, and what their bodies read from outside)."""
    uses = {}
    for node in graph.node:
        for name in node_reads(node):
            uses.setdefault(name, []).append(node)
    return uses


def other_readers(layer, nodes, uses: dict, outputs) -> list:
    """What reads ``layer``'s weight besides its Conv/Gemm/MatMul consumers (through Identity, Cast and
    Transpose): a Gather of a tied embedding, a graph output, a Mul, an If reading it in a branch. Units dead for
    the consumers may live for these, and a refit for the consumers would change what these compute. [] for a
    weight read inside a subgraph (never analysed as a unit graph: the callers leave it alone)."""
    if layer.graph or any(c.graph for c in layer.consumers):
        return []
    mine = {}  # a consumer node -> the input slots it reads the weight on as a layer (MatMul(W, W): one of two)
    for c in layer.consumers:
        if 0 <= c.index < len(nodes):
            mine.setdefault(id(nodes[c.index]), set()).add(c.slot)
    found, stack, seen = [], [layer.name], set()  # the value's name (a Constant's tensor may be named otherwise)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in outputs:
            found.append(f"graph output {name}")
        for node in uses.get(name, []):
            if id(node) in mine:
                if any(i == name and j not in mine[id(node)] for j, i in enumerate(node.input)):
                    found.append(f"{node.op_type} {node.name}".strip())  # also read on another input slot
                continue
            if node.op_type in VALUE_FREE:
                continue
            if node.op_type in ("Identity", "Cast", "Transpose"):
                stack.extend(o for o in node.output if o)
            else:
                found.append(f"{node.op_type} {node.name}".strip())
    return sorted(set(found))
