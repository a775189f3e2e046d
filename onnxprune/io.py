"""Safe loading (external data validated up front), tensor read/write in place, atomic saving."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import _get_all_tensors, uses_external_data, load_external_data_for_model

from .errors import InputError, OutputError

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
    # position in onnx's tensor traversal order -> ExternalInfo, for every tensor whose data lived outside the file
    # (protobuf wrapper ids are not stable, positions are: pruning never adds or removes tensors)
    external: dict = field(default_factory=dict)
    external_files: list = field(default_factory=list)


def load_model(path: str) -> LoadedModel:
    """Load ``path`` and every external tensor, refusing anything unsafe or malformed (InputError)."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not an ONNX file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(path, load_external_data=False)
    except PermissionError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
    except Exception as exc:  # DecodeError and friends: protobuf raises several types
        raise InputError(f"{path}: not a valid ONNX protobuf ({type(exc).__name__}: {_first_line(exc)})") from exc
    check_structure(model, path)
    loaded = LoadedModel(model=model, path=path)
    base_dir = os.path.dirname(os.path.abspath(path))
    for index, tensor in enumerate(_get_all_tensors(model)):
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            loaded.external[index] = ExternalInfo(info.get("location", ""), [e.key for e in tensor.external_data])
    if loaded.external:
        # onnx validates every location (relative, no '..', no symlink or hardlink, inside base_dir, in bounds).
        files = {i.location for i in loaded.external.values()}
        try:
            load_external_data_for_model(model, base_dir)
        except Exception as exc:
            raise InputError(f"{path}: external data rejected ({_first_line(exc)})") from exc
        loaded.external_files = sorted(os.path.realpath(os.path.join(base_dir, f)) for f in files)
    return loaded


def check_structure(model: onnx.ModelProto, where: str = "model") -> None:
    if model.ir_version <= 0 or not model.HasField("graph") or len(model.opset_import) == 0:
        raise InputError(f"{where}: not an ONNX model (no ir_version, graph or opset_import)")
    if len(model.graph.sparse_initializer):
        raise InputError(f"{where}: sparse_initializer is not supported (its external data is not validated by onnx)")


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def read_tensor(tensor: TensorProto) -> np.ndarray:
    """The tensor's values as a NumPy array in its own dtype (bf16 via ml_dtypes)."""
    return numpy_helper.to_array(tensor)


def write_tensor(tensor: TensorProto, values: np.ndarray) -> None:
    """Replace the tensor's values in place, keeping its storage field, name, dims and every other field."""
    dtype = numpy_helper.helper.tensor_dtype_to_np_dtype(tensor.data_type)
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


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(out_path: str, loaded: LoadedModel | None) -> None:
    """Refuse an output that would overwrite the input model or one of its data files (OutputError)."""
    if loaded is not None and loaded.path is not None:
        if _same_file(out_path, loaded.path):
            raise OutputError(f"{out_path}: output is the input model; refusing to overwrite it (choose another -o)")
        data_path = out_path + ".data"
        for f in loaded.external_files:
            if _same_file(data_path, f) or _same_file(out_path, f):
                raise OutputError(f"{out_path}: output would overwrite the input's external data file {f}")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise OutputError(f"{out_path}: directory {out_dir} does not exist")
    if os.path.isdir(out_path):
        raise OutputError(f"{out_path}: is a directory")
    if not os.access(out_dir, os.W_OK):
        raise OutputError(f"{out_path}: directory {out_dir} is not writable")


class Staged:
    """A model written into a temporary directory beside its destination; ``commit`` renames it into place."""

    def __init__(self, out_path: str, tmp: str, model_path: str, data_tmp: str | None, data_dest: str | None,
                 written: dict):
        self.out_path, self.tmp, self.model_path = out_path, tmp, model_path
        self.data_tmp, self.data_dest, self.written = data_tmp, data_dest, written

    def commit(self) -> dict:
        try:
            if self.data_tmp:
                os.replace(self.data_tmp, self.data_dest)
            os.replace(self.model_path, self.out_path)
        except OSError as exc:
            raise OutputError(f"{self.out_path}: cannot write ({exc.strerror or exc})") from exc
        finally:
            self.discard()
        return self.written

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()


def stage_model(loaded: LoadedModel, out_path: str, digest: bool = True) -> Staged:
    """Write the model into a fresh temporary directory next to ``out_path`` (nothing at the destination yet).

    Tensors that were external stay external, in ``<out>.data``. The staged file can be opened by path (ONNX
    Runtime, the checker) before it is committed.
    """
    check_output_path(out_path, loaded)
    model = loaded.model
    out_dir = os.path.dirname(os.path.abspath(out_path))
    data_name = os.path.basename(out_path) + ".data"
    try:
        tmp = tempfile.mkdtemp(dir=out_dir, prefix=".onnxprune-")
    except OSError as exc:
        raise OutputError(f"{out_path}: cannot write in {out_dir} ({exc.strerror or exc})") from exc
    stashed = []
    try:
        written = {}
        tmp_data = os.path.join(tmp, data_name)
        if loaded.external:
            stashed = _externalize(model, loaded.external, tmp_data, data_name)
            written[os.path.join(out_dir, data_name)] = _sha256(tmp_data) if digest else None
        tmp_model = os.path.join(tmp, os.path.basename(out_path))
        payload = model.SerializeToString(deterministic=True)
        _write_synced(tmp_model, payload)
        written[os.path.abspath(out_path)] = hashlib.sha256(payload).hexdigest() if digest else None
        del payload
        return Staged(out_path, tmp, tmp_model, tmp_data if loaded.external else None,
                      os.path.join(out_dir, data_name), written)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{out_path}: cannot write ({exc.strerror or exc})") from exc
    except ValueError as exc:  # protobuf refuses > 2 GiB
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{out_path}: cannot serialise ({_first_line(exc)})") from exc
    finally:
        for tensor, raw in stashed:  # give the in-memory model its data back
            tensor.raw_data = raw
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]


def save_model(loaded: LoadedModel, out_path: str, digest: bool = True) -> dict:
    """Write the model atomically (stage, then rename). Returns {path: sha256 or None} of the files written.

    On any failure nothing at the destination changes.
    """
    return stage_model(loaded, out_path, digest).commit()


def _externalize(model, external: dict, data_path: str, location: str):
    stashed = []
    offset = 0
    with open(data_path, "wb") as fh:
        for index, tensor in enumerate(_get_all_tensors(model)):
            if index not in external:
                continue
            raw = tensor.raw_data
            pad = (-offset) % 64
            if pad:
                fh.write(b"\0" * pad)
                offset += pad
            fh.write(raw)
            stashed.append((tensor, raw))
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = TensorProto.EXTERNAL
            offset += len(raw)
        fh.flush()
        os.fsync(fh.fileno())
    return stashed


def _write_synced(path: str, payload: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
