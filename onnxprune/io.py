"""Safe loading (every check before any work), tensor read/write in place, and publishing files safely.

Loading: the file must be a regular file; the model is parsed, checked (``checks.check_model``: structure,
tensors, attributes, the ONNX checker) and its external data loaded through onnx's validated reader (relative,
no '..', no symlink or hardlink, inside the model's directory, in bounds), training_info tensors included.

Writing: every file is staged next to its destination under a recognisable name
(``.onnxprune-staging-<pid>-<host>-<random>``), fsynced, then renamed into place; staging is removed on every
exit path (``Interrupted``/``KeyboardInterrupt`` included), and stale staging of dead runs on this host is
removed by the next run into that directory. External data is written under a content-addressed name
(``<output>.<16 hex of its sha256>.data``), published before the model that references it, and the previous
output's data file is removed only after the model is replaced (and only if it matched that naming and was
referenced by the replaced model). A replaced file keeps its mode; new files follow the umask.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from . import checks, wire
from .errors import InputError, OutputError

log = logging.getLogger("onnxprune")

FLOAT_TYPES = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64",
}

STAGING_PREFIX = ".onnxprune-staging-"
DATA_SUFFIX = ".data"
_HEX = 16  # hex digits of the data file's sha256 in its name


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
    # main-graph initializer name -> its new values, not copied into the protobuf (whose raw_data is left empty):
    # saving splices them into the file (``wire``); ``materialize`` writes them into the protobuf
    pending: dict = field(default_factory=dict, repr=False)

    def defer(self, tensor: TensorProto, values: np.ndarray, owned: bool = False) -> bool:
        """Hold ``values`` as the new data of ``tensor`` (a main-graph initializer) in ``pending`` instead of
        writing them into the protobuf, where ``hold`` allows it; else False and nothing changes."""
        return hold(self.pending, tensor, values, owned)

    def materialize(self) -> None:
        """Write every pending array into its tensor (after this the protobuf alone holds the model)."""
        if not self.pending:
            return
        for t in self.model.graph.initializer:
            arr = self.pending.pop(t.name, None)
            if arr is not None:
                write_tensor(t, arr)
        if self.pending:
            raise RuntimeError(f"pending values for tensors the graph no longer has: {sorted(self.pending)[:5]}")


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


def load_model(path: str) -> LoadedModel:
    """Load ``path`` and every external tensor, refusing anything unsafe or malformed (InputError), before any
    work: see ``checks.check_model`` for what is refused."""
    payload = _read_regular(path)
    try:
        model = onnx.load_model_from_string(payload)
    except Exception as exc:  # DecodeError and friends: protobuf raises several types
        raise InputError(f"{path}: not a valid ONNX protobuf ({type(exc).__name__}: {_first_line(exc)})") from exc
    # the weights as views of the file's bytes (protobuf would copy each on access): these keep the payload
    views = wire.initializer_data(payload)
    del payload
    checks.check_header(model, path)
    checks.check_strings(model, path)
    checks.check_sparse(model, path)
    checks.check_external_entries(model, path)
    loaded = LoadedModel(model=model, path=path, raw=views)
    base_dir = os.path.dirname(os.path.abspath(path))
    files = set()
    # onnx validates every location (relative, no '..', no symlink or hardlink, inside base_dir, in bounds);
    # training_info tensors (which onnx's own traversal skips) go through the same reader and stay external
    for index, (tensor, what) in enumerate(checks.all_tensors(model)):
        if uses_external_data(tensor):
            views.pop(tensor.name, None)  # its data comes from the data file
            info = {e.key: e.value for e in tensor.external_data}
            loaded.external[index] = ExternalInfo(info.get("location", ""), [e.key for e in tensor.external_data])
            location = info.get("location", "")
            try:
                load_external_data_for_tensor(tensor, base_dir)
            except Exception as exc:
                raise InputError(f"{path}: external data of {what} rejected ({_first_line(exc)})") from exc
            files.add(location)
    loaded.external_files = sorted(os.path.realpath(os.path.join(base_dir, f)) for f in files)
    check_structure(model, path, keep=loaded.raw)
    return loaded


def check_structure(model: onnx.ModelProto, where: str = "model", keep: dict | None = None) -> None:
    """Every input check (``checks.check_model``, the ONNX checker included) on an in-memory model; InputError.
    Tensors must hold their data (external data must have been loaded). ``keep``: see ``checks.check_model``."""
    checks.check_model(model, where, InputError, keep)


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


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
            or not checks._big_float(tensor):
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


# --- signals and staging names ---------------------------------------------------------------------------------

_DEFERRED = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)


@contextlib.contextmanager
def deferred_signals():
    """Hold SIGINT/SIGTERM/SIGHUP (delivered when the block ends) around a short critical section: creating a
    staging entry and recording it, renaming into place, cleaning up. Only this thread's mask changes: in a
    process with other threads (ONNX Runtime, BLAS) the kernel may hand the signal to one of them and Python runs
    the handler in the main thread at the next bytecode, inside the block. Code inside must therefore still be
    safe against an exception at any point; this only narrows the windows."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or not _DEFERRED:
        yield
        return
    try:
        old = mask(signal.SIG_BLOCK, _DEFERRED)
    except (OSError, ValueError, RuntimeError):  # not the main thread on some platforms
        yield
        return
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


_LIVE: dict = {}  # staging path -> pid that created it (a forked child must not remove its parent's)


def _track(path: str) -> None:
    _LIVE[path] = os.getpid()


def remove_live_staging() -> list:
    """Remove every staging entry this process created and has not removed yet (registered with atexit, so a
    run that unwinds by an unexpected route, e.g. an interrupt landing between ``stage_model`` returning and
    its ``with`` block starting, still leaves nothing behind). Returns the paths removed."""
    gone = []
    for path, pid in list(_LIVE.items()):
        if pid == os.getpid():
            _remove(path)
            gone.append(path)
    return gone


atexit.register(remove_live_staging)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _staging_prefix() -> str:
    return f"{STAGING_PREFIX}{os.getpid()}-{_host_tag()}-"


_STAGING_RE = re.compile(r"^" + re.escape(STAGING_PREFIX) + r"(\d+)-([0-9a-f]{8})-[A-Za-z0-9_]+$")


def is_staging_name(name: str) -> bool:
    """Whether a directory entry's name is one of onnxprune's staging files or directories."""
    return _STAGING_RE.match(name) is not None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def clean_stale_staging(directory: str) -> list:
    """Remove staging entries in ``directory`` left by onnxprune runs on this host whose process is gone (a
    SIGKILL, a power cut). Touches nothing else: only names matching the staging pattern, with this host's tag, a
    dead pid and this user's ownership, that are plain directories or files (never a symlink). Returns the removed
    paths; errors are ignored (cleanup is best effort)."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    tag, uid = _host_tag(), os.getuid() if hasattr(os, "getuid") else None
    for name in names:
        m = _STAGING_RE.match(name)
        if not m or m.group(2) != tag or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if uid is not None and st.st_uid != uid:
            continue
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            continue
        _remove(path)
        removed.append(path)
    return removed


def _remove(path: str | None) -> None:
    """Remove a staging file or directory, even when an interrupt arrives while doing so (then re-raised)."""
    if not path:
        return
    pending = None
    for _ in range(4):
        try:
            with deferred_signals():
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
            if not os.path.lexists(path):
                _LIVE.pop(path, None)
                break
        except OSError:
            break
        except BaseException as exc:  # Interrupted / KeyboardInterrupt inside the cleanup: finish it, then raise
            pending = pending or exc
    if pending is not None:
        raise pending


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- where we may write ----------------------------------------------------------------------------------------

def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def check_write_target(path: str, label: str = "output") -> None:
    """Refuse (OutputError) a destination that is not a regular file when it exists (device, FIFO, socket,
    directory, or a symlink to one), whose directory is missing, or which cannot be written."""
    try:
        st = os.stat(path)  # follows a symlink: what a rename would hide is what it points at
    except FileNotFoundError:
        st = None  # absent, or a dangling symlink: the rename replaces the link itself
    except OSError as exc:
        raise OutputError(f"{path}: cannot use as {label} ({exc.strerror or exc})") from None
    for special in ("/dev", "/proc", "/sys"):
        for p in (os.path.abspath(path), os.path.realpath(path)):
            if p.startswith("/dev/shm/"):
                continue  # a tmpfs: an ordinary place for files
            if p == special or p.startswith(special + os.sep):
                raise OutputError(f"{path}: {label} is under {special}; refusing to replace anything there")
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (device, FIFO or socket)"
        raise OutputError(f"{path}: {label} is {kind}; refusing to replace it")
    try:
        lst = os.lstat(path)
    except OSError:
        lst = None
    if lst is not None and not stat.S_ISREG(lst.st_mode) and not stat.S_ISLNK(lst.st_mode):
        raise OutputError(f"{path}: {label} is not a regular file; refusing to replace it")
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise OutputError(f"{path}: directory {out_dir} does not exist")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: directory {out_dir} is not writable")


def _data_pattern(out_path: str):
    base = re.escape(os.path.basename(out_path))
    return re.compile(r"^" + base + r"\.[0-9a-f]{" + str(_HEX) + r"}" + re.escape(DATA_SUFFIX) + r"$")


def _is_data_of(out_path: str, candidate: str) -> bool:
    """``candidate`` is (or resolves to) a data file name onnxprune uses for ``out_path``."""
    out_dir = os.path.realpath(os.path.dirname(os.path.abspath(out_path)))
    for c in {os.path.abspath(candidate), os.path.realpath(candidate)}:
        if os.path.realpath(os.path.dirname(c)) == out_dir and _data_pattern(out_path).match(os.path.basename(c)):
            return True
    return False


MODEL_LABELS = ("-o", "--output", "output", "model")


def check_write_targets(writes: dict, reads=(), loaded: LoadedModel | None = None) -> None:
    """Before any work: every path onnxprune will write against every path it reads and against each other.

    ``writes``: label -> path, e.g. {"-o": out, "--report": report, "--plot": plot}; None or "-" values are
    skipped. The entry labelled "-o"/"--output"/"output"/"model" is the model: its data files
    (``<model>.<hash>.data``) are covered too. ``reads``: the input model, its external data files,
    --data/--calibration files (None entries skipped); ``loaded`` adds its path and external data files.
    Refuses with OutputError: a destination that is not a regular file (device, FIFO, socket, directory, a
    symlink to one), a missing or read-only directory, two writes that are the same file, a write that is a read
    (same path, symlink, hardlink, realpath), and a read or another write named like one of the model's data
    files (publishing the model would replace or remove it)."""
    items = [(label, p) for label, p in writes.items() if p not in (None, "", "-")]
    reads = [r for r in reads if r]
    if loaded is not None:
        reads += [p for p in [loaded.path, *loaded.external_files] if p]
    for label, p in items:
        check_write_target(p, label)
    for i, (label, p) in enumerate(items):
        for r in reads:
            if _same_file(p, r):
                raise OutputError(f"{p}: {label} is the same file as the input {r}; refusing to overwrite it")
        for label2, p2 in items[:i]:
            if _same_file(p, p2):
                raise OutputError(f"{p}: {label} and {label2} are the same file")
    model = next(((label, p) for label, p in items if label in MODEL_LABELS), None)
    if model is not None:
        label, model_out = model
        for r in reads:
            if _is_data_of(model_out, r):
                raise OutputError(f"{model_out}: the input's data file {r} has the name of this output's data "
                                  f"files and would be replaced or removed; choose another {label}")
        for label2, p2 in items:
            if label2 != label and _is_data_of(model_out, p2):
                raise OutputError(f"{p2}: {label2} has the name of a data file of {model_out}")


def check_output_path(out_path: str, loaded: LoadedModel | None) -> None:
    """Refuse an output that would overwrite the input model or one of its data files, or that is not a regular
    file (OutputError). ``check_write_targets`` is the general form."""
    reads = []
    if loaded is not None:
        reads = [loaded.path] + list(loaded.external_files)
    check_write_targets({"output": out_path}, reads)


def _existing_mode(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None


def atomic_write_bytes(path: str, data: bytes, label: str = "output") -> str:
    """Write ``data`` to ``path`` atomically: a staging file beside it, fsync, rename, fsync the directory.

    Same refusals as ``check_write_target`` (OutputError); a replaced file keeps its mode, a new one follows the
    umask; the staging file is removed on every exit path (interrupts included). Returns the sha256 (hex)."""
    check_write_target(path, label)
    out_dir = os.path.dirname(os.path.abspath(path))
    clean_stale_staging(out_dir)
    mode = _existing_mode(path)
    tmp = None
    try:
        with deferred_signals():
            tmp, fd = _create_staging_file(out_dir)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        with deferred_signals():
            check_write_target(path, label)
            os.replace(tmp, path)
            _LIVE.pop(tmp, None)
            tmp = None
        _fsync_dir(out_dir)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        if tmp is not None:
            _remove(tmp)
    return hashlib.sha256(data).hexdigest()


def _create_staging_file(directory: str):
    """(path, fd) of a new staging file (mode 0666 minus the umask). The name is registered before the file
    exists, so an interrupt landing anywhere here still has it removed (``remove_live_staging``)."""
    prefix = _staging_prefix()
    for _ in range(100):
        path = os.path.join(directory, prefix + secrets.token_hex(4))
        _track(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            _LIVE.pop(path, None)
            continue
        return path, fd
    raise OSError(errno.EEXIST, "no free staging name")


def _staging_dir_name(directory: str) -> str:
    """A registered, not yet created staging directory name (see ``_create_staging_file``)."""
    path = os.path.join(directory, _staging_prefix() + secrets.token_hex(4))
    _track(path)
    return path


def _make_staging_dir(path: str) -> None:
    os.mkdir(path, 0o700)


# --- models ----------------------------------------------------------------------------------------------------

class Staged:
    """A model written into a staging directory beside its destination; ``commit`` publishes it."""

    def __init__(self, out_path: str, tmp: str, model_path: str, data_tmp: str | None, data_dest: str | None,
                 written: dict, reads=()):
        self.out_path, self.tmp, self.model_path = out_path, tmp, model_path
        self.data_tmp, self.data_dest, self.written = data_tmp, data_dest, written
        self.reads = list(reads)

    def commit(self) -> dict:
        """Publish: the data file (a new, content-addressed name) first, then the model, then remove the data
        file the replaced model referenced. On failure or interrupt the previous output stays as it was."""
        published = None
        model_id = None
        try:
            # reading the old output (which data file it references) stays outside the critical section
            check_write_target(self.out_path)
            stale = self._previous_data_files()
            st = os.stat(self.model_path)
            model_id = (st.st_dev, st.st_ino)
            with deferred_signals():
                if self.data_tmp:
                    existed = os.path.lexists(self.data_dest)
                    published = None if existed else self.data_dest
                    os.replace(self.data_tmp, self.data_dest)
                os.replace(self.model_path, self.out_path)
                published = None
                out_dir = os.path.dirname(os.path.abspath(self.out_path))
                _fsync_dir(out_dir)
                for f in stale:
                    with contextlib.suppress(OSError):
                        os.unlink(f)
        except OSError as exc:
            raise OutputError(f"{self.out_path}: cannot write ({exc.strerror or exc})") from exc
        finally:
            try:
                # the data went out but the model did not (an error or an interrupt between the two renames):
                # take it back, unless the new model did get renamed (then it needs its data)
                if published is not None and not self._model_published(model_id):
                    with contextlib.suppress(OSError):
                        os.unlink(published)
            finally:
                self.discard()
        return self.written

    def _model_published(self, model_id) -> bool:
        try:
            st = os.stat(self.out_path)
        except OSError:
            return False
        return model_id is not None and (st.st_dev, st.st_ino) == model_id

    def _previous_data_files(self) -> list:
        """Data files of the output being replaced that are ours to remove: named like ours, referenced by the
        replaced model, not the new one, not read by this run."""
        out_dir = os.path.dirname(os.path.abspath(self.out_path))
        pattern = _data_pattern(self.out_path)
        new = os.path.basename(self.data_dest) if self.data_dest else None
        try:
            candidates = [n for n in os.listdir(out_dir) if pattern.match(n) and n != new]
        except OSError:
            return []
        if not candidates or _existing_mode(self.out_path) is None:
            return []
        try:
            if os.path.getsize(self.out_path) > (64 << 20):  # an external-data model is small
                return []
            old = onnx.load(self.out_path, load_external_data=False)
            refs = {e.value for t, _ in checks.all_tensors(old) if uses_external_data(t)
                    for e in t.external_data if e.key == "location"}
        except Exception:  # not a model we can read: leave everything as it is
            return []
        out = []
        for n in candidates:
            if n not in refs:
                continue
            path = os.path.join(out_dir, n)
            if any(_same_file(path, r) for r in self.reads):
                continue
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
            except OSError:
                continue
            out.append(path)
        return out

    def discard(self) -> None:
        _remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()


def stage_model(loaded: LoadedModel, out_path: str, digest: bool = True, check: bool = True) -> Staged:
    """Write the model into a fresh staging directory next to ``out_path`` (nothing at the destination yet).

    Refuses (OutputError) a destination that is not a regular file or that is the input or its data. With
    ``check`` (default) the model first passes ``checks.check_model`` (the ONNX checker included): a failure is an
    OutputError (nothing is staged). Tensors that were external stay external, in ``<out>.<hash>.data``. The staged
    file can be opened by path (ONNX Runtime, the checker) before it is committed; leaving the ``with`` block or
    an exception (interrupts included) removes the staging directory.
    """
    check_output_path(out_path, loaded)
    model = loaded.model
    if check:
        try:
            checks.check_model(model, "pruned model", OutputError, pending=loaded.pending)
        except OutputError as exc:
            raise OutputError(f"{out_path}: not written: {exc} (a bug in onnxprune: please report it)") from None
    out_dir = os.path.dirname(os.path.abspath(out_path))
    clean_stale_staging(out_dir)
    mode = _existing_mode(out_path)
    base = os.path.basename(out_path)
    tmp = None
    stashed = []
    try:
        for attempt in range(100):
            with deferred_signals():
                tmp = _staging_dir_name(out_dir)  # registered first: an interrupt after mkdir still removes it
                try:
                    _make_staging_dir(tmp)
                    break
                except FileExistsError:
                    _LIVE.pop(tmp, None)
                    tmp = None
        else:
            raise OSError(errno.EEXIST, "no free staging name")
        written = {}
        data_tmp = data_dest = None
        inline = loaded.pending
        if loaded.external:
            data_tmp = os.path.join(tmp, base + DATA_SUFFIX)
            stashed, data_sha = _externalize(model, loaded.external, data_tmp, loaded.pending)
            moved = {t.name for t, raw in stashed if raw is None}
            inline = {k: v for k, v in loaded.pending.items() if k not in moved}
            data_name = f"{base}.{data_sha[:_HEX]}{DATA_SUFFIX}"
            for tensor, _ in stashed:
                for e in tensor.external_data:
                    if e.key == "location":
                        e.value = data_name
            staged_data = os.path.join(tmp, data_name)  # the staged model must open by path with its data
            os.replace(data_tmp, staged_data)
            data_tmp = staged_data
            data_dest = os.path.join(out_dir, data_name)
            written[data_dest] = data_sha
            if mode is not None:
                os.chmod(data_tmp, mode)
        tmp_model = os.path.join(tmp, base)
        trim_heap()  # the prune's freed arrays go back to the OS before the payload doubles the model
        parts = None
        if inline:
            try:
                parts = wire.chunks(model, inline)
            except ValueError as exc:
                log.info("writing pending weights into the protobuf: %s", exc)
                for t in model.graph.initializer:  # the ones the data file took stay pending
                    if t.name in inline:
                        write_tensor(t, loaded.pending.pop(t.name))
        if parts is None:
            parts = [model.SerializeToString(deterministic=True)]
        sha = _write_synced(tmp_model, parts, digest)
        del parts
        if mode is not None:
            os.chmod(tmp_model, mode)
        written[os.path.abspath(out_path)] = sha
        _restore(stashed)  # before the hand-over: nothing slow may run after ``tmp`` changes owner
        stashed = []
        reads = [loaded.path] + list(loaded.external_files) if loaded.path else list(loaded.external_files)
        staged = Staged(out_path, tmp, tmp_model, data_tmp, data_dest, written, reads)
        tmp = None  # the Staged object owns it now (and remove_live_staging still knows it)
        return staged
    except OSError as exc:
        raise OutputError(f"{out_path}: cannot write ({exc.strerror or exc})") from exc
    except ValueError as exc:  # protobuf refuses > 2 GiB
        raise OutputError(f"{out_path}: cannot serialise ({_first_line(exc)})") from exc
    finally:
        try:
            if tmp is not None:
                _remove(tmp)
        finally:
            _restore(stashed)


def _restore(stashed) -> None:
    """Give the in-memory model its external tensors' data back after staging (a pending tensor, stashed with
    None, gets its empty placeholder back: its data stays in ``pending``)."""
    for tensor, raw in stashed:
        tensor.raw_data = raw if raw is not None else b""
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]


def save_model(loaded: LoadedModel, out_path: str, digest: bool = True, check: bool = True) -> dict:
    """Write the model atomically (stage, then publish). Returns {path: sha256 or None} of the files written.

    On any failure nothing at the destination changes.
    """
    with stage_model(loaded, out_path, digest, check) as staged:
        return staged.commit()


def _externalize(model, external: dict, data_path: str, pending: dict | None = None):
    """Move the tensors that were external into one data file (64-byte aligned); returns the stashed
    (tensor, raw bytes, or None for a pending tensor whose array was written) to restore and the file's sha256.
    Locations are set by the caller once the name (its hash) is known."""
    stashed = []
    offset = 0
    h = hashlib.sha256()
    pending = pending or {}
    with open(data_path, "wb") as fh:
        for index, (tensor, _, main) in enumerate(checks.tensor_places(model)):
            if index not in external:
                continue
            held = pending.get(tensor.name) if main else None
            raw = wire.payload(held) if held is not None else tensor.raw_data
            pad = (-offset) % 64
            if pad:
                fh.write(b"\0" * pad)
                h.update(b"\0" * pad)
                offset += pad
            fh.write(raw)
            h.update(raw)
            stashed.append((tensor, None if held is not None else raw))
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", ""), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = TensorProto.EXTERNAL
            offset += len(raw)
        fh.flush()
        os.fsync(fh.fileno())
    return stashed, h.hexdigest()


def _write_synced(path: str, parts: list, digest: bool = False) -> str | None:
    """Write ``parts`` (bytes-like) to ``path`` and fsync it; their sha256 when ``digest``."""
    h = hashlib.sha256() if digest else None
    with open(path, "wb") as fh:
        for part in parts:
            fh.write(part)
            if h is not None:
                h.update(part)
        fh.flush()
        os.fsync(fh.fileno())
    return h.hexdigest() if h is not None else None



_MALLOC_TRIM = None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed mid-sized blocks, so temporaries would otherwise
    add up in the resident size). A no-op where malloc_trim does not exist."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        try:
            import ctypes
            import ctypes.util
            if sys.platform.startswith("linux"):
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _MALLOC_TRIM = libc.malloc_trim
                _MALLOC_TRIM.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)
