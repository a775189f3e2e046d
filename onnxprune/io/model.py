"""The model in memory: loading with every check first, tensor reads and writes, weights held outside protobuf."""
from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from .. import checks, wire
from ..errors import InputError, first_line

FLOAT_TYPES = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64",
}


@dataclass
class ExternalInfo:
    """Where an externally stored tensor's bytes came from, kept so the output stays external."""
    location: str
    keys: list = field(default_factory=list)


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: str | None = None
    # position in ``checks.all_tensors`` order -> ExternalInfo, for every tensor whose data lived outside the file
    # (protobuf wrapper ids are not stable, positions are; compaction, which adds and removes tensors, re-keys it)
    external: dict = field(default_factory=dict)
    external_files: list = field(default_factory=list)
    # main-graph initializer name -> its raw_data bytes as read by the load checks: the first prune reads the
    # weights from here instead of copying them out of the protobuf again; cleared there (stale after any write)
    raw: dict = field(default_factory=dict, repr=False)
    # main-graph initializer name -> its new values, not copied into the protobuf (whose raw_data is left empty;
    # ``hold`` puts them here): saving splices them into the file (``wire``); ``materialize`` writes them into it
    pending: dict = field(default_factory=dict, repr=False)
    # the mapped tensors (``mapped.Mapper``) when the model streams: weights left in their data file, held in
    # ``pending`` as ``mapped.Streamed`` (see ``load_model``'s ``stream_above``); None when everything is in memory
    mapper: object = field(default=None, repr=False)

    def materialize(self, only=None) -> None:
        """Write the pending arrays (those named in ``only``; default: all, after which the protobuf alone holds the
        model) into their tensors; the others stay held."""
        names = set(self.pending) if only is None else set(only) & set(self.pending)
        if not names:
            return
        for t in self.model.graph.initializer:
            if t.name in names:
                write_tensor(t, self.pending.pop(t.name))
        lost = sorted(names & set(self.pending))
        if lost:
            raise RuntimeError(f"pending values for tensors the graph no longer has: {lost[:5]}")


# --- loading ---------------------------------------------------------------------------------------------------

def _read_regular(path: str) -> bytes:
    """The bytes of ``path``, which must be a regular file (a FIFO, device, socket or directory is refused
    without ever blocking on it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a directory, not an ONNX file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file (a FIFO, device or socket is never read)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between stat and open
            raise InputError(f"{path}: not a regular file")
        if st.st_size == 0:
            raise InputError(f"{path}: empty file, not an ONNX model")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


STREAM_ABOVE = 256 << 20  # external data at least this large: its prunable weights stay in the file (mapped)


def load_model(path: str, stream_above: int | None = STREAM_ABOVE) -> LoadedModel:
    """Load ``path`` and every external tensor, refusing anything unsafe or malformed (InputError), before any
    work: see ``checks.check_model`` for what is refused.

    ``stream_above``: when the model's external data holds at least this many bytes, the prunable weights stored
    there (main-graph float initializers of Conv/ConvTranspose/Gemm/MatMul) are not read into memory but mapped
    from their file (``mapped.Streamed`` in ``LoadedModel.pending``), checked for location and bounds the same
    way; None never streams. Everything downstream gives the same bytes either way."""
    payload = _read_regular(path)
    try:
        model = onnx.load_model_from_string(payload)
    except Exception as exc:  # DecodeError and friends: protobuf raises several types
        raise InputError(f"{path}: not a valid ONNX protobuf ({type(exc).__name__}: {first_line(exc)})") from exc
    # the weights as views of the file's bytes (protobuf would copy each on access): these keep the payload
    views = wire.initializer_data(payload)
    del payload
    checks.check_fields(model, path)  # before external data is read; check_data follows once it is loaded
    checks.check_external_entries(model, path)
    loaded = LoadedModel(model=model, path=path, raw=views)
    base_dir = os.path.dirname(os.path.abspath(path))
    files = set()
    streamed = _streamed_names(model, stream_above)
    # onnx validates every location (relative, no '..', no symlink or hardlink, inside base_dir, in bounds);
    # training_info tensors (which onnx's own traversal skips) go through the same reader and stay external
    for index, (tensor, what) in enumerate(checks.all_tensors(model)):
        if uses_external_data(tensor):
            views.pop(tensor.name, None)  # its data comes from the data file
            info = {e.key: e.value for e in tensor.external_data}
            loaded.external[index] = ExternalInfo(info.get("location", ""), [e.key for e in tensor.external_data])
            location = info.get("location", "")
            try:
                if index in streamed:
                    _map_external(loaded, tensor, base_dir)
                else:
                    load_external_data_for_tensor(tensor, base_dir)
            except InputError as exc:
                raise InputError(f"{path}: external data of {what} rejected ({exc})") from None
            except Exception as exc:
                raise InputError(f"{path}: external data of {what} rejected ({first_line(exc)})") from exc
            files.add(location)
    loaded.external_files = sorted(os.path.realpath(os.path.join(base_dir, f)) for f in files)
    checks.check_data(model, path, InputError, keep=loaded.raw, pending=loaded.pending)
    return loaded


def _streamed_names(model: onnx.ModelProto, stream_above: int | None) -> set:
    """Positions (``checks.all_tensors`` order) of the external tensors to map instead of loading: the prunable
    weights among the main graph's float initializers, when the external data totals ``stream_above`` bytes or
    more. Other tensors (biases, scales, tables) are read by the analyses and always load."""
    if stream_above is None or sys.byteorder != "little" or _open_external is None:
        return set()
    external, total = [], 0
    for index, (tensor, _, main) in enumerate(checks.tensor_places(model)):
        if uses_external_data(tensor):
            n = checks.tensor_elements(tensor, tensor.name)
            bits = 16 if tensor.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16) else 64 \
                if tensor.data_type == TensorProto.DOUBLE else 32
            total += n * bits // 8
            if main and tensor.data_type in _PLAIN and checks.big_float(tensor):
                external.append((index, tensor.name))
    if not external or total < stream_above:
        return set()
    try:
        from ..graph import find_layers
        layers, _ = find_layers(model)
    except Exception:  # a malformed graph: the checks that follow say what is wrong with it
        return set()
    weights = {l.tensor.name for l in layers if l.main_initializer}
    return {index for index, name in external if name in weights}


try:  # onnx's validated opener (relative, no '..', no symlink or hardlink, inside the model's directory)
    from onnx.external_data_helper import _open_external_data_fd as _open_external
except ImportError:  # pragma: no cover - another onnx: every tensor loads
    _open_external = None


def _map_external(loaded: LoadedModel, tensor: TensorProto, base_dir: str) -> None:
    """Map the tensor's external bytes (opened and bounds-checked as onnx's loader does; the length must be
    exactly what the dims need) and leave the tensor an empty raw_data placeholder, its data in ``pending``."""
    from .mapped import Mapper, Streamed
    info = {e.key: e.value for e in tensor.external_data}
    dtype = numpy_helper.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    want = checks.tensor_elements(tensor, tensor.name) * dtype.itemsize
    try:
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") not in (None, "") else None
    except ValueError:
        raise InputError(f"offset/length {info.get('offset')!r}/{info.get('length')!r} are not integers") from None
    if offset < 0 or (length is not None and length < 0):
        raise InputError(f"negative offset or length ({offset}, {length})")
    fd = _open_external(base_dir, info.get("location", ""), tensor.name, True)
    try:
        size = os.fstat(fd).st_size
        available = size - offset
        if offset > size or (length is not None and length > available):
            raise InputError(f"offset {offset} + length {length} beyond the file's {size} bytes")
        got = length if length is not None else available
        if got != want:
            raise InputError(f"{got} bytes, but dims {list(tensor.dims)} of "
                             f"{TensorProto.DataType.Name(tensor.data_type)} need {want}")
        if loaded.mapper is None:
            loaded.mapper = Mapper()
        source = loaded.mapper.map(fd, offset, dtype, tuple(int(d) for d in tensor.dims))
    finally:
        os.close(fd)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT
    tensor.raw_data = b""
    loaded.pending[tensor.name] = Streamed(source)


def check_structure(model: onnx.ModelProto, where: str = "model") -> None:
    """Every input check (``checks.check_model``, the ONNX checker included) on an in-memory model; InputError.
    Tensors must hold their data (external data must have been loaded)."""
    checks.check_model(model, where, InputError)


# --- tensors ---------------------------------------------------------------------------------------------------

_PLAIN = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


def read_tensor(tensor: TensorProto, raw: bytes | None = None) -> np.ndarray:
    """The tensor's values as a NumPy array in its own dtype (bf16 via ml_dtypes), read-only. ``raw``: the
    tensor's ``raw_data`` bytes when the caller already holds them (saves a copy)."""
    if raw is not None and tensor.data_type in _PLAIN and sys.byteorder == "little":
        dtype = numpy_helper.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def write_tensor(tensor: TensorProto, values: np.ndarray) -> None:
    """Replace the tensor's values in place, keeping its storage field, name, dims and every other field."""
    dtype = numpy_helper.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    with np.errstate(over="ignore", invalid="ignore"):  # float64 -> float16 of a huge bias saturates to inf
        values = np.ascontiguousarray(values, dtype=dtype)
    if tensor.HasField("raw_data") or tensor.data_location == TensorProto.EXTERNAL:
        tensor.raw_data = values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
    elif tensor.data_type == TensorProto.FLOAT:
        del tensor.float_data[:]
        tensor.float_data.extend(values.ravel().tolist())
    elif tensor.data_type == TensorProto.DOUBLE:
        del tensor.double_data[:]
        tensor.double_data.extend(values.ravel().tolist())
    elif tensor.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
        del tensor.int32_data[:]
        tensor.int32_data.extend(values.view(np.uint16).ravel().astype(np.int32).tolist())
    else:  # pragma: no cover - only float weights are ever pruned
        raise TypeError(f"cannot write tensor of type {tensor.data_type}")


def hold(pending: dict, tensor: TensorProto, values: np.ndarray, owned: bool = False) -> bool:
    """Put ``values`` in ``pending`` under the tensor's name and leave the tensor an empty raw_data placeholder
    (any read of it then fails loudly instead of seeing the old data), for a large float tensor stored in
    raw_data; else False and nothing changes. ``owned``: the caller hands the array over (no copy)."""
    if not tensor.name or tensor.data_type not in _PLAIN or not tensor.HasField("raw_data") \
            or not checks.big_float(tensor):
        return False
    dtype = numpy_helper.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    dims = tuple(int(d) for d in tensor.dims)
    if values.size != checks.tensor_elements(tensor, tensor.name):
        raise ValueError(f"{tensor.name}: {values.size} values for dims {list(dims)}")
    if owned and values.dtype == dtype and values.flags.c_contiguous:
        arr = values.reshape(dims)
    else:
        arr = np.array(values, dtype=dtype, order="C").reshape(dims)
    pending[tensor.name] = arr
    tensor.raw_data = b""
    return True
