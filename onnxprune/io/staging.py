"""Staging files beside their destination: names, signal deferral, stale cleanup, write targets, atomic writes."""
from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
from typing import TYPE_CHECKING

from ..errors import OutputError

if TYPE_CHECKING:
    from .model import LoadedModel

STAGING_PREFIX = ".onnxprune-staging-"
DATA_SUFFIX = ".data"
_HEX = 16  # hex digits of the data file's sha256 in its name


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


def _parent(path: str) -> str:
    """The directory ``path`` lands in, resolved like the kernel does (symlinks first, then '..')."""
    return os.path.realpath(os.path.dirname(path) or ".")


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
    if path.endswith(("/", os.sep)) or os.path.basename(path) in ("", ".", ".."):
        raise OutputError(f"{path}: {label} is not a file name (it ends in a directory)")
    # the directory as the kernel will resolve it (a symlink followed by '..' is not what abspath says)
    out_dir = _parent(path)
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


DATA_DIR_SUFFIX = ".npy"  # the files a --data/--calibration directory is read from


def _listdir(path: str) -> list:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


MODEL_LABELS = ("-o", "--output", "output", "model")


def check_write_targets(writes: dict, reads=(), loaded: LoadedModel | None = None) -> None:
    """Before any work: every path onnxprune will write against every path it reads and against each other.

    ``writes``: label -> path, e.g. {"-o": out, "--report": report, "--plot": plot}; None values are skipped
    ("-" is a file name here: the CLI refuses it as standard output before). The entry labelled "-o"/"--output"/"output"/"model" is the model: its data files
    (``<model>.<hash>.data``) are covered too. ``reads``: the input model, its external data files,
    --data/--calibration files or directories (None entries skipped; a directory stands for its .npy files, and a
    write of a new .npy file into it is refused too); ``loaded`` adds its path and external data files.
    Refuses with OutputError: a destination that is not a regular file (device, FIFO, socket, directory, a
    symlink to one), a missing or read-only directory, two writes that are the same file, a write that is a read
    (same path, symlink, hardlink, realpath), and a read or another write named like one of the model's data
    files (publishing the model would replace or remove it)."""
    items = [(label, p) for label, p in writes.items() if p not in (None, "")]
    reads = [r for r in reads if r]
    if loaded is not None:
        reads += [p for p in [loaded.path, *loaded.external_files] if p]
    folders = [r for r in reads if os.path.isdir(r)]
    reads += [os.path.join(d, n) for d in folders for n in _listdir(d) if n.endswith(DATA_DIR_SUFFIX)]
    for label, p in items:
        check_write_target(p, label)
    for i, (label, p) in enumerate(items):
        for r in reads:
            if _same_file(p, r):
                raise OutputError(f"{p}: {label} is the same file as the input {r}; refusing to overwrite it")
        for d in folders:
            if p.endswith(DATA_DIR_SUFFIX) and _same_file(_parent(p), d):
                raise OutputError(f"{p}: {label} would add a {DATA_DIR_SUFFIX} file to the data directory {d}, "
                                  f"which is read as input; write it elsewhere")
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


class StagedFile:
    """Bytes written and fsynced into a staging file beside ``path``; ``publish`` renames it into place,
    ``discard`` removes it (both idempotent)."""

    def __init__(self, path: str, tmp: str, label: str, sha256: str):
        self.path, self.tmp, self.label, self.sha256 = path, tmp, label, sha256

    def publish(self) -> None:
        """Rename into place (signals held around the rename) and fsync the directory. OSError on failure (the
        staging file is then removed)."""
        if self.tmp is None:
            return
        try:
            with deferred_signals():
                check_write_target(self.path, self.label)
                os.replace(self.tmp, self.path)
                _LIVE.pop(self.tmp, None)
                self.tmp = None
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        finally:
            self.discard()

    def discard(self) -> None:
        if self.tmp is not None:
            _remove(self.tmp)
            self.tmp = None


def stage_bytes(path: str, data: bytes, label: str = "output") -> StagedFile:
    """Write ``data`` into a fsynced staging file beside ``path`` (nothing at ``path`` yet). Same refusals as
    ``check_write_target`` (OutputError, also for a full disk); a replaced file will keep its mode, a new one
    follows the umask; the staging file is removed on every failure path (interrupts included)."""
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
        staged = StagedFile(path, tmp, label, hashlib.sha256(data).hexdigest())
        tmp = None
        return staged
    except OSError as exc:
        raise OutputError(f"{path}: cannot write {label} ({exc.strerror or exc})") from exc
    finally:
        if tmp is not None:
            _remove(tmp)


def atomic_write_bytes(path: str, data: bytes, label: str = "output") -> str:
    """Write ``data`` to ``path`` atomically: a staging file beside it, fsync, rename, fsync the directory.

    Same refusals as ``check_write_target`` (OutputError); a replaced file keeps its mode, a new one follows the
    umask; the staging file is removed on every exit path (interrupts included). Returns the sha256 (hex)."""
    staged = stage_bytes(path, data, label)
    try:
        staged.publish()
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        staged.discard()
    return staged.sha256


def _new_staging(directory: str, make):
    """(path, what ``make(path)`` returned) for a new staging entry beside the destination. The name is registered
    before the entry exists, and an interrupt (or error) while making it removes it, so nothing can be orphaned;
    FileExistsError picks another name."""
    prefix = _staging_prefix()
    for _ in range(100):
        path = os.path.join(directory, prefix + secrets.token_hex(4))
        _track(path)
        try:
            return path, make(path)
        except FileExistsError:
            _LIVE.pop(path, None)
        except BaseException:
            _remove(path)
            raise
    raise OSError(errno.EEXIST, "no free staging name")


def _create_staging_file(directory: str):
    """(path, fd) of a new staging file (mode 0666 minus the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    return _new_staging(directory, lambda path: os.open(path, flags, 0o666))


def make_staging_dir(directory: str) -> str:
    """A new staging directory (mode 0700) beside the destination."""
    with deferred_signals():
        return _new_staging(directory, lambda path: _make_staging_dir(path))[0]


def _make_staging_dir(path: str) -> None:
    os.mkdir(path, 0o700)
