"""Graph structure: names defined once and before use (no cycles, nothing dangling), consistent value_info, the
attributes and channel counts of the convolutions onnxprune analyses."""
from __future__ import annotations

import onnx
from onnx import AttributeProto

from .tensors import DEFAULT_DOMAINS, MAX_DEPTH

_CONV_OPS = ("Conv", "ConvTranspose")
_POOL_ATTRS = ("kernel_shape", "strides", "dilations", "pads", "output_padding")
_WINDOW_OPS = _CONV_OPS + ("MaxPool", "AveragePool", "LpPool", "ConvInteger", "QLinearConv", "DeformConv")


def _ints(node, name):
    for a in node.attribute:
        if a.name == name:
            if a.type == AttributeProto.INTS:
                return list(a.ints)
            if a.type == AttributeProto.INT:
                return a.i
            return "bad"
    return None


class _Scope:
    """Names (and constant tensors' dims) visible in one graph, chained to the enclosing graph's scope."""

    def __init__(self, parent=None):
        self.parent, self.names, self.consts = parent, set(), {}

    def has(self, name) -> bool:
        s = self
        while s is not None:
            if name in s.names:
                return True
            s = s.parent
        return False

    def const(self, name):
        s = self
        while s is not None:
            if name in s.consts:
                return s.consts[name]
            if name in s.names:
                return None  # shadowed by a non-constant
            s = s.parent
        return None


def check_graphs(model, where, error) -> list:
    """Names, order and the attributes of the ops onnxprune reads. Returns the convolutions to check against the
    inferred input shapes: (node, weight dims, path)."""
    convs = []
    stack = [(model.graph, "graph", 0, None)]
    stack += [(f, f"function {f.domain}:{f.name}", 0, None) for f in model.functions]
    for k, ti in enumerate(model.training_info):
        for part in ("initialization", "algorithm"):
            if ti.HasField(part):
                stack.append((getattr(ti, part), f"training_info[{k}].{part}", 0, None))
    while stack:
        graph, path, depth, parent = stack.pop()
        if depth > MAX_DEPTH:
            raise error(f"{where}: subgraphs nested deeper than {MAX_DEPTH} levels ({path})")
        scope = _Scope(parent)
        is_graph = isinstance(graph, onnx.GraphProto)
        if is_graph:
            for t in graph.initializer:
                if t.name in scope.names:
                    raise error(f"{where}: duplicate initializer name '{t.name}' ({path})")
                scope.names.add(t.name)
                scope.consts[t.name] = list(t.dims)
            scope.names.update(vi.name for vi in graph.input)
        else:
            scope.names.update(graph.input)
        first_output = {}
        for idx, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    first_output.setdefault(out, idx)
        for idx, node in enumerate(graph.node):
            label = f"{node.op_type} '{node.name or '#' + str(idx)}' ({path})"
            default = node.domain in DEFAULT_DOMAINS
            for inp in node.input:
                if inp and not scope.has(inp):
                    if inp in first_output:
                        raise error(f"{where}: input '{inp}' of {label} is produced by a later node "
                                    f"(a cycle, or nodes not in topological order)")
                    raise error(f"{where}: input '{inp}' of {label} is not produced by any node, input or "
                                f"initializer (dangling)")
            if default and node.op_type == "Constant":
                outs = [o for o in node.output if o]
                values = [a for a in node.attribute if a.name.startswith("value") or a.name == "sparse_value"]
                if len(node.output) != 1 or not outs:
                    raise error(f"{where}: {label} must have exactly one output, has {len(outs)}")
                if len(values) != 1:
                    raise error(f"{where}: {label} must have exactly one value attribute, has {len(values)}")
                if values[0].name == "value" and values[0].type == AttributeProto.TENSOR:
                    scope.consts[outs[0]] = list(values[0].t.dims)
            if default and node.op_type in ("Identity", "Cast") and node.input and node.output and node.output[0]:
                dims = scope.const(node.input[0])
                if dims is not None:
                    scope.consts[node.output[0]] = dims
            if default:
                w = _check_conv_attrs(node, label, scope, where, error)
                if w is not None:
                    convs.append((node, w, path))
            for out in node.output:
                if not out:
                    continue
                if out in scope.names:
                    raise error(f"{where}: '{out}' is produced twice ({label} and an earlier definition)")
                scope.names.add(out)
            for attr in node.attribute:
                label_a = f"{path}/{node.name or node.op_type + '#' + str(idx)}.{attr.name}"
                if attr.HasField("g"):
                    stack.append((attr.g, label_a, depth + 1, scope))
                for k, sub in enumerate(attr.graphs):
                    stack.append((sub, f"{label_a}[{k}]", depth + 1, scope))
        if is_graph:
            _check_value_info(graph, path, where, error)
            for o in graph.output:
                if o.name and not scope.has(o.name):
                    raise error(f"{where}: graph output '{o.name}' is not produced by any node, input or "
                                f"initializer ({path})")
    return convs


def _type_key(vi):
    """(elem_type, dims or None) of a tensor ValueInfo; None for other types or no type."""
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] if tt.HasField("shape") else None
    return tt.elem_type, dims


def _conflict(a, b) -> bool:
    if a is None or b is None:
        return False
    if a[0] and b[0] and a[0] != b[0]:
        return True
    if a[1] is None or b[1] is None:
        return False
    return len(a[1]) != len(b[1]) or any(x is not None and y is not None and x != y for x, y in zip(a[1], b[1]))


def _check_value_info(graph, path, where, error) -> None:
    """value_info must agree with itself, with the graph's inputs and outputs and with initializers: the analyses
    read shapes from all of them (the checker does not compare them)."""
    declared = {}
    for vi in list(graph.input) + list(graph.output):
        declared.setdefault(vi.name, _type_key(vi))
    for t in graph.initializer:
        key = (t.data_type, list(t.dims))
        if _conflict(declared.get(t.name), key):
            raise error(f"{where}: graph input '{t.name}' ({path}) is declared with a type or shape that differs "
                        f"from its initializer's")
        declared.setdefault(t.name, key)
    for vi in graph.value_info:
        key = _type_key(vi)
        if vi.name in declared and _conflict(declared[vi.name], key):
            raise error(f"{where}: value_info for '{vi.name}' ({path}) disagrees with its other declaration "
                        f"(type or shape)")
        declared.setdefault(vi.name, key)


def _check_conv_attrs(node, label, scope, where, error):
    """Attribute sanity of convolutions and pools; returns a Conv/ConvTranspose weight's dims when known."""
    op = node.op_type
    if op not in _WINDOW_OPS:
        return None
    for name in _POOL_ATTRS:
        v = _ints(node, name)
        if v is None:
            continue
        if v == "bad" or not isinstance(v, list):
            raise error(f"{where}: {label}: attribute '{name}' must be a list of ints")
        low = 0 if name in ("pads", "output_padding") else 1
        if any(x < low for x in v):
            raise error(f"{where}: {label}: attribute '{name}' = {v[:8]} has values below {low}")
    if op not in _CONV_OPS:
        return None
    group = _ints(node, "group")
    if group is None:
        group = 1
    if not isinstance(group, int) or isinstance(group, bool):
        raise error(f"{where}: {label}: attribute 'group' must be an int")
    if group < 1:
        raise error(f"{where}: {label}: group = {group}, must be >= 1")
    if len(node.input) < 2 or not node.input[1]:
        raise error(f"{where}: {label}: has no weight input")
    w = scope.const(node.input[1])
    if w is None:
        return None
    if len(w) < 3:
        raise error(f"{where}: {label}: weight '{node.input[1]}' has rank {len(w)}, a convolution needs >= 3")
    spatial = len(w) - 2
    if w[0] % group:
        what = "output" if op == "Conv" else "input"
        raise error(f"{where}: {label}: group = {group} does not divide the {w[0]} {what} channels of "
                    f"weight '{node.input[1]}'")
    ks = _ints(node, "kernel_shape")
    if isinstance(ks, list) and ks != w[2:]:
        raise error(f"{where}: {label}: kernel_shape {ks} differs from the weight's {w[2:]}")
    for name, n in (("strides", spatial), ("dilations", spatial), ("pads", 2 * spatial),
                    ("output_padding", spatial)):
        v = _ints(node, name)
        if isinstance(v, list) and len(v) != n:
            raise error(f"{where}: {label}: attribute '{name}' has {len(v)} values, the weight has {spatial} "
                        f"spatial axes")
    b = scope.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if b is not None:
        want = w[0] if op == "Conv" else w[1] * group
        if len(b) != 1 or b[0] != want:
            raise error(f"{where}: {label}: bias '{node.input[2]}' has dims {b}, expected [{want}]")
    return w


def check_conv_channels(convs, shapes, where, error) -> None:
    """Input channels of each convolution against its weight, where shape inference knows them."""
    for node, w, path in convs:
        x = shapes.get(node.input[0])
        if not x or len(x) < 2 or not isinstance(x[1], int):
            continue
        group = _ints(node, "group") or 1
        want = w[1] * group if node.op_type == "Conv" else w[0]
        if x[1] != want:
            raise error(f"{where}: {node.op_type} '{node.name}' ({path}): input has {x[1]} channels, weight "
                        f"{list(w)} with group {group} needs {want}")


# --- the ONNX checker on a skeleton ----------------------------------------------------------------------------
