"""Model sanity checks, run before any work on an input and on every output before it is written.

``check_model`` refuses (with the error class it is given, InputError by default) a model that the rest of
onnxprune could misread or crash on, naming the problem:

* not an ONNX model (no ir_version, graph or opset_import);
* sparse tensors anywhere (sparse initializers in any graph, ``Constant(sparse_value=...)``, sparse attributes):
  onnx does not validate their external data;
* tensors whose stored data disagrees with their dims and dtype (short, long or odd-length raw data, typed
  fields of the wrong length or kind), negative or overflowing dims, unknown ``data_type`` enums, two data fields,
  segments, external data that was not loaded (validated) by ``io.load_model``;
* duplicate initializer names, a name produced twice, a node input that nothing produces (dangling) or that is
  produced only later (a cycle or an unsorted graph);
* malformed attributes of the ops onnxprune analyses: a Constant without exactly one output and one value,
  Conv/ConvTranspose ``group`` < 1 or not dividing the channels, weights of rank < 3, negative pads, strides or
  dilations < 1, kernel shapes that disagree with the weight;
* whatever the ONNX checker (``check_model`` plus strict shape inference, i.e. ``full_check=True``) rejects.

The ONNX checker runs on a *skeleton* of the model: large float initializers (and main-graph ``Constant`` nodes
holding them) become graph inputs of the same type and shape, so the checker sees the same graph, types and
shapes without copying and re-parsing every weight (on a 30 M-weight model the full checker costs ~15 % of a
run, the skeleton ~1 %). Those tensors' own checks (data length, fields, dtype, dims) are done here, more
strictly than the checker does them (it only catches raw data that is too short).
"""
from __future__ import annotations

import logging

import onnx
from onnx import AttributeProto, TensorProto

from .errors import InputError, first_line

log = logging.getLogger("onnxprune")

MAX_DEPTH = 64  # subgraph nesting; protobuf's own parser stops near 32 levels of If
MAX_ELEMENTS = 1 << 62  # a dims product above this is an overflow, whatever the data says
SKELETON_MIN_BYTES = 1024  # float tensors at least this large are replaced by graph inputs in the checker's copy
MAXIMUM_PROTOBUF = 2147483647
DEFAULT_DOMAINS = ("", "ai.onnx")

_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def _bits(dt: int) -> int | None:
    """Bits per element in raw_data (None for STRING, which has no raw form)."""
    if dt == TensorProto.STRING:
        return None
    name = TensorProto.DataType.Name(dt)
    if name in ("INT4", "UINT4", "FLOAT4E2M1"):
        return 4
    if name in ("INT2", "UINT2"):
        return 2
    if name in ("FLOAT6E2M3", "FLOAT6E3M2"):
        return 6
    return onnx.helper.tensor_dtype_to_np_dtype(dt).itemsize * 8


KNOWN_TYPES = {v for v in TensorProto.DataType.values() if v != TensorProto.UNDEFINED}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _typed_field(dt: int) -> str:
    return onnx.helper.tensor_dtype_to_field(dt)


def _typed_count(dt: int, n: int) -> int | None:
    """Entries a typed field must hold for ``n`` elements (None: not checked, for 6-bit types)."""
    bits = _bits(dt)
    if dt in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        return 2 * n
    if bits in (2, 4):
        return -(-n // (8 // bits))
    if bits == 6:
        return None
    return n


def tensor_elements(tensor: TensorProto, what: str, error=InputError) -> int:
    """The element count its dims declare; refuses negative or overflowing dims."""
    n = 1
    for d in tensor.dims:
        if d < 0:
            raise error(f"{what}: negative dimension {d} in dims {list(tensor.dims)[:8]}")
        n *= d
        if n > MAX_ELEMENTS:
            raise error(f"{what}: dims {list(tensor.dims)[:8]} overflow (more than 2^62 elements)")
    return n


def check_tensor(tensor: TensorProto, what: str, error=InputError, external_ok: bool = False, raw=None):
    """Refuse a tensor whose stored data cannot be what its dims and dtype declare. Returns the ``raw_data`` bytes
    it read (None for other storage). ``raw``: the tensor's raw_data as the caller already holds it (protobuf
    copies it on every access)."""
    dt = tensor.data_type
    if dt not in KNOWN_TYPES:
        raise error(f"{what}: unknown data_type {dt}")
    if tensor.HasField("segment"):
        raise error(f"{what}: segmented tensors are not supported")
    n = tensor_elements(tensor, what, error)
    fields = [f for f in _TYPED_FIELDS if len(getattr(tensor, f))]
    if tensor.HasField("raw_data"):
        fields.append("raw_data")
    external = tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL
    if external:
        fields.append("external_data")
    elif len(tensor.external_data):
        raise error(f"{what}: has external_data entries but data_location is not EXTERNAL")
    if len(fields) > 1:
        raise error(f"{what}: holds two data fields ({' and '.join(fields)})")
    if not fields:
        if n:
            raise error(f"{what}: holds no data for its {n} element(s)")
        return
    field = fields[0]
    if field == "external_data":
        if not external_ok:
            raise error(f"{what}: external data that was not loaded and validated (load the model by path)")
        if dt == TensorProto.STRING:
            raise error(f"{what}: STRING tensors cannot be stored as external data")
        return
    if field == "raw_data":
        bits = _bits(dt)
        if bits is None:
            raise error(f"{what}: STRING tensors cannot use raw_data")
        want = -(-n * bits // 8)
        if raw is None:
            raw = tensor.raw_data
        if len(raw) != want:
            raise error(f"{what}: raw_data holds {len(raw)} bytes, but dims {list(tensor.dims)} of "
                        f"{TensorProto.DataType.Name(dt)} need {want}")
        return raw
    expected_field = _typed_field(dt)
    if field != expected_field:
        raise error(f"{what}: {TensorProto.DataType.Name(dt)} data stored in {field} (expected {expected_field})")
    want = _typed_count(dt, n)
    got = len(getattr(tensor, field))
    if want is not None and got != want:
        raise error(f"{what}: {field} holds {got} value(s), but dims {list(tensor.dims)} need {want}")


def _check_pending(tensor: TensorProto, arr, what: str, error) -> None:
    """A tensor whose data is held aside: an empty raw_data placeholder, no other data, an array that fits."""
    n = tensor_elements(tensor, what, error)
    others = [f for f in _TYPED_FIELDS if len(getattr(tensor, f))]
    if others or not tensor.HasField("raw_data") or len(tensor.external_data) or tensor.HasField("segment") \
            or len(tensor.raw_data) or tensor.data_type not in _FLOATS:
        raise error(f"{what}: pending data but the tensor is not an empty raw_data placeholder")
    want = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if arr.dtype != want or arr.size != n or not arr.flags.c_contiguous:
        raise error(f"{what}: pending array {arr.dtype} x {arr.size} does not fit {want} dims {list(tensor.dims)}")


def check_header(model: onnx.ModelProto, where: str = "model", error=InputError) -> None:
    if model.ir_version <= 0 or not model.HasField("graph") or len(model.opset_import) == 0:
        raise error(f"{where}: not an ONNX model (no ir_version, graph or opset_import)")


def iter_graphs(model: onnx.ModelProto, where: str = "model", error=InputError):
    """Every graph and function body of the model: (container, path, outer names or None for a function).

    Covers the main graph, subgraphs of any depth (If/Loop/Scan and any other GRAPH/GRAPHS attribute), function
    bodies and training_info graphs. Iterative, with a depth bound."""
    stack = [(model.graph, "graph", 0)]
    for k, f in enumerate(model.functions):
        stack.append((f, f"function {f.domain}:{f.name}", 0))
    for k, ti in enumerate(model.training_info):
        if ti.HasField("initialization"):
            stack.append((ti.initialization, f"training_info[{k}].initialization", 0))
        if ti.HasField("algorithm"):
            stack.append((ti.algorithm, f"training_info[{k}].algorithm", 0))
    while stack:
        graph, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise error(f"{where}: subgraphs nested deeper than {MAX_DEPTH} levels ({path})")
        yield graph, path, depth
        for idx, node in enumerate(graph.node):
            for attr in node.attribute:
                label = f"{path}/{node.name or node.op_type + '#' + str(idx)}.{attr.name}"
                if attr.HasField("g"):
                    stack.append((attr.g, label, depth + 1))
                for k, sub in enumerate(attr.graphs):
                    stack.append((sub, f"{label}[{k}]", depth + 1))


def all_tensors(model: onnx.ModelProto, main_initializers: bool = True):
    """(tensor, description) for every TensorProto in the model (initializers and attribute tensors of every
    graph, function and training_info graph); sparse tensors are not included (they are refused).
    ``main_initializers=False`` leaves out the main graph's initializers. The order is fixed by the model's
    structure: positions in it name tensors (``io.LoadedModel.external``)."""
    for tensor, what, _ in tensor_places(model, main_initializers):
        yield tensor, what


def tensor_places(model: onnx.ModelProto, main_initializers: bool = True):
    """``all_tensors`` with a third value: whether the tensor is an initializer of the main graph."""
    for graph, path, _ in iter_graphs(model):
        main = path == "graph"
        if isinstance(graph, onnx.GraphProto) and (main_initializers or not main):
            for t in graph.initializer:
                yield t, f"initializer '{t.name}' ({path})", main
        for idx, node in enumerate(graph.node):
            for attr in node.attribute:
                who = f"attribute '{attr.name}' of {node.op_type} '{node.name or '#' + str(idx)}' ({path})"
                if attr.HasField("t"):
                    yield attr.t, who, False
                for t in attr.tensors:
                    yield t, who, False


def check_sparse(model: onnx.ModelProto, where: str = "model", error=InputError) -> None:
    """Refuse sparse tensors anywhere (their external data is not validated by onnx)."""
    for graph, path, _ in iter_graphs(model, where, error):
        if isinstance(graph, onnx.GraphProto) and len(graph.sparse_initializer):
            raise error(f"{where}: sparse initializer in {path}: sparse tensors are not supported")
        for idx, node in enumerate(graph.node):
            for attr in node.attribute:
                if attr.type in (AttributeProto.SPARSE_TENSOR, AttributeProto.SPARSE_TENSORS) \
                        or attr.HasField("sparse_tensor") or len(attr.sparse_tensors):
                    raise error(f"{where}: sparse tensor in attribute '{attr.name}' of {node.op_type} "
                                f"'{node.name or '#' + str(idx)}' ({path}): sparse tensors are not supported")


def check_external_entries(model: onnx.ModelProto, where: str = "model", error=InputError) -> None:
    """Before external data is loaded: an external tensor has a location, only known keys and no inline data
    (loading would silently replace it)."""
    allowed = {"location", "offset", "length", "checksum", "basepath"}
    for tensor, what in all_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL:
            keys = [e.key for e in tensor.external_data]
            unknown = sorted(set(keys) - allowed)
            if unknown:
                raise error(f"{where}: {what}: unknown external data key(s) {unknown[:5]}")
            if len(set(keys)) != len(keys):
                raise error(f"{where}: {what}: repeated external data keys")
            if "location" not in keys:
                raise error(f"{where}: {what}: external data without a location")
            inline = [f for f in _TYPED_FIELDS if len(getattr(tensor, f))]
            if tensor.HasField("raw_data"):
                inline.append("raw_data")
            if inline:
                raise error(f"{where}: {what}: holds two data fields (external_data and {', '.join(inline)})")


def check_strings(model: onnx.ModelProto, where: str = "model", error=InputError) -> None:
    """Every string field of every message must be valid UTF-8 (protobuf decodes them on first access, so a bad
    one would raise UnicodeDecodeError wherever it is first read). Bytes fields (raw data) are not touched."""
    stack = [(model, "model")]
    while stack:
        msg, path = stack.pop()
        for fd in msg.DESCRIPTOR.fields:
            if fd.type == fd.TYPE_STRING:
                try:  # upb hands back bytes for a string that is not UTF-8 (other runtimes raise)
                    if _repeated(fd):
                        bad = any(isinstance(v, bytes) for v in getattr(msg, fd.name))
                    else:
                        bad = msg.HasField(fd.name) and isinstance(getattr(msg, fd.name), bytes)
                except UnicodeDecodeError:
                    bad = True
                if bad:
                    raise error(f"{where}: invalid UTF-8 in field '{fd.name}' of {path}")
            elif fd.type == fd.TYPE_MESSAGE:
                if _repeated(fd):
                    stack.extend((m, f"{path}.{fd.name}") for m in getattr(msg, fd.name))
                elif msg.HasField(fd.name):
                    stack.append((getattr(msg, fd.name), f"{path}.{fd.name}"))


def check_model(model: onnx.ModelProto, where: str = "model", error=InputError, keep: dict | None = None,
                pending: dict | None = None) -> None:
    """Every check in this module, in order; the first problem found is raised as ``error``.

    ``keep``: a dict that receives, for every main-graph initializer stored in ``raw_data``, name -> the bytes the
    check read (protobuf copies ``raw_data`` on every access: a caller that reads the weights next uses these);
    entries it already holds are taken as those tensors' raw_data (``wire.initializer_data`` of the file read).
    ``pending``: main-graph initializer name -> the array that replaces its (empty) raw_data when it is saved
    (``io.LoadedModel.pending``); checked against the tensor's dims and type instead."""
    check_header(model, where, error)
    check_strings(model, where, error)
    try:
        _check_model(model, where, error, keep, pending or {})
    except UnicodeDecodeError as exc:  # check_strings covers every field; this is a second net
        raise error(f"{where}: invalid UTF-8 in a string field ({exc.reason})") from None


def _check_model(model, where, error, keep, pending) -> None:
    check_sparse(model, where, error)
    own = keep is not None or pending
    if own:
        for tensor in model.graph.initializer:
            what = f"{where}: initializer '{tensor.name}' (graph)"
            if tensor.name in pending:
                _check_pending(tensor, pending[tensor.name], what, error)
                continue
            raw = check_tensor(tensor, what, error, raw=keep.get(tensor.name) if keep is not None else None)
            if keep is not None:
                if raw is not None:
                    keep[tensor.name] = raw
                else:
                    keep.pop(tensor.name, None)
    for tensor, what in all_tensors(model, main_initializers=not own):
        check_tensor(tensor, f"{where}: {what}", error)
    convs = _check_graphs(model, where, error)
    shapes = run_onnx_checker(model, where, error)
    _check_conv_channels(convs, shapes, where, error)


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


def _check_graphs(model, where, error) -> list:
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


def _check_conv_channels(convs, shapes, where, error) -> None:
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

def _copy_fields(dst, src, skip=()):
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        target = getattr(dst, fd.name)
        if fd.type == fd.TYPE_MESSAGE:
            if _repeated(fd):
                target.extend(value)
            else:
                target.CopyFrom(value)
        elif _repeated(fd):
            target.extend(value)
        else:
            setattr(dst, fd.name, value)


def _repeated(fd) -> bool:
    flag = getattr(fd, "is_repeated", None)
    if flag is not None:
        return flag() if callable(flag) else bool(flag)
    return fd.label == fd.LABEL_REPEATED


def _big_float(t: TensorProto) -> bool:
    if t.data_type not in _FLOATS:
        return False
    n = 1
    for d in t.dims:
        n *= max(int(d), 0)
    return n * 2 >= SKELETON_MIN_BYTES


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without the payload of its large float tensors in the main graph: each becomes a
    graph input of the same name, type and shape (so names, types and shapes are what the checker sees)."""
    sk = onnx.ModelProto()
    _copy_fields(sk, model, skip=("graph",))
    src, g = model.graph, sk.graph
    _copy_fields(g, src, skip=("initializer", "node", "input"))
    g.input.extend(src.input)
    declared = {i.name for i in src.input}
    for t in src.initializer:
        if _big_float(t):
            if t.name not in declared:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
                declared.add(t.name)
        else:
            g.initializer.add().CopyFrom(t)
    for node in src.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.output) == 1 \
                and len(node.attribute) == 1 and node.attribute[0].name == "value" \
                and node.attribute[0].type == AttributeProto.TENSOR and _big_float(node.attribute[0].t) \
                and node.output[0] and node.output[0] not in declared:
            t = node.attribute[0].t
            g.input.append(onnx.helper.make_tensor_value_info(node.output[0], t.data_type, list(t.dims)))
            declared.add(node.output[0])
            continue
        g.node.add().CopyFrom(node)
    return sk


def run_onnx_checker(model: onnx.ModelProto, where: str = "model", error=InputError) -> dict:
    """What ``onnx.checker.check_model(full_check=True)`` runs (the checker, then strict type-checking shape
    inference), on the skeleton. Returns name -> inferred shape (ints or None per axis) of the main graph's values.

    One tolerance: a graph output declared without a shape (ONNX Runtime accepts it, the checker does not) is
    left out of the checker's copy; shape inference still sees it."""
    sk = skeleton(model)
    if sk.ByteSize() > MAXIMUM_PROTOBUF:
        log.warning("%s: ONNX checker skipped: the model's structure alone is over 2 GiB", where)
        return {}
    full = sk.SerializeToString()
    shapeless = [vi for vi in sk.graph.output if vi.type.HasField("tensor_type")
                 and not vi.type.tensor_type.HasField("shape")]
    if shapeless:
        kept = [onnx.ValueInfoProto.FromString(vi.SerializeToString()) for vi in sk.graph.output
                if not (vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape"))]
        del sk.graph.output[:]
        sk.graph.output.extend(kept)
    try:
        onnx.checker.check_model(sk.SerializeToString() if shapeless else full)
    except Exception as exc:
        raise error(f"{where}: fails the ONNX checker: {_one_line(exc)}") from exc
    try:
        inferred = onnx.shape_inference.infer_shapes(full, check_type=True, strict_mode=True)
    except Exception as exc:
        raise error(f"{where}: fails the ONNX checker (strict shape inference): {_one_line(exc)}") from exc
    shapes = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape"):
            continue
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return shapes


def _one_line(exc) -> str:
    return first_line(exc, join=True, limit=500)  # the checker spreads one error over several lines
