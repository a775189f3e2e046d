"""Tensors and model-wide fields: data that fits its dims and type, header, strings, sparse and external entries,
and the model's traversal (every graph and tensor)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto

from ..errors import InputError

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


def _repeated(fd) -> bool:
    flag = getattr(fd, "is_repeated", None)
    if flag is not None:
        return flag() if callable(flag) else bool(flag)
    return fd.label == fd.LABEL_REPEATED


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


def check_pending(tensor: TensorProto, arr, what: str, error) -> None:
    """A tensor whose data is held aside: an empty raw_data placeholder, no other data, an array that fits."""
    n = tensor_elements(tensor, what, error)
    others = [f for f in _TYPED_FIELDS if len(getattr(tensor, f))]
    if others or not tensor.HasField("raw_data") or len(tensor.external_data) or tensor.HasField("segment") \
            or len(tensor.raw_data) or tensor.data_type not in _FLOATS:
        raise error(f"{what}: pending data but the tensor is not an empty raw_data placeholder")
    want = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    contiguous = arr.flags.c_contiguous if isinstance(arr, np.ndarray) else True  # io.mapped.Streamed: blocks
    if arr.dtype != want or arr.size != n or not contiguous:
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
