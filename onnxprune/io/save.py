"""Saving a model: checked, staged (held weights spliced in, external data kept external), published atomically."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import sys

import numpy as np
import onnx
from onnx import TensorProto
from onnx.external_data_helper import uses_external_data

from .. import checks, wire
from ..errors import OutputError, first_line
from . import staging
from .mapped import Streamed
from .model import LoadedModel
from .staging import (DATA_SUFFIX, _HEX, _data_pattern, _existing_mode, _fsync_dir, _remove, _same_file,
                      check_output_path, check_write_target, clean_stale_staging, deferred_signals)

log = logging.getLogger("onnxprune")


# --- models ----------------------------------------------------------------------------------------------------

class Staged:
    """A model written into a staging directory beside its destination; ``commit`` publishes it."""

    def __init__(self, out_path: str, tmp: str, model_path: str, data_tmp: str | None, data_dest: str | None,
                 written: dict, reads=()):
        self.out_path, self.tmp, self.model_path = out_path, tmp, model_path
        self.data_tmp, self.data_dest, self.written = data_tmp, data_dest, written
        self.reads = list(reads)

    def commit(self, extra=()) -> dict:
        """Publish: the data file (a new, content-addressed name) first, then the model, then the ``extra``
        staged files (``staging.StagedFile``: the report, a plot), then remove the data file the replaced model
        referenced. On failure or interrupt before the model's rename the previous output stays as it was; an
        extra file that cannot be renamed after it is an OutputError saying what was written."""
        published = None
        model_id = None
        try:
            for f in extra:
                check_write_target(f.path, f.label)
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
                done = [self.out_path]
                for f in extra:
                    try:
                        f.publish()
                    except OSError as exc:
                        left = [g.label for g in extra if g.tmp is not None or g is f]
                        raise OutputError(f"{f.path}: cannot write ({exc.strerror or exc}); written: "
                                          f"{', '.join(done)}; not written: {', '.join(left)}") from exc
                    done.append(f.path)
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
                for f in extra:
                    f.discard()
        return self.written

    def files(self) -> list:
        """The staged model and data file (their sizes are the published ones')."""
        return [self.model_path] + ([self.data_tmp] if self.data_tmp else [])

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


def stage_model(loaded: LoadedModel, out_path: str, digest: bool = True, check: bool = True,
                progress=None) -> Staged:
    """Write the model into a fresh staging directory next to ``out_path`` (nothing at the destination yet).

    Refuses (OutputError) a destination that is not a regular file or that is the input or its data. With
    ``check`` (default) the model first passes ``checks.check_model`` (the ONNX checker included): a failure is an
    OutputError (nothing is staged). Tensors that were external stay external, in ``<out>.<hash>.data``. The staged
    file can be opened by path (ONNX Runtime, the checker) before it is committed; leaving the ``with`` block or
    an exception (interrupts included) removes the staging directory. ``progress(k, n, name)``: called as each
    streamed weight is written.
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
        tmp = staging.make_staging_dir(out_dir)
        written = {}
        data_tmp = data_dest = None
        inline = loaded.pending
        if loaded.external:
            data_tmp = os.path.join(tmp, base + DATA_SUFFIX)
            data_sha = _externalize(model, loaded.external, data_tmp, loaded.pending, stashed, progress)
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
        trim_heap()  # the prune's freed arrays go back to the OS before serialising (a full copy unless spliced)
        parts = None
        if inline:
            try:
                parts = wire.chunks(model, inline)
            except ValueError as exc:
                log.info("writing pending weights into the protobuf: %s", exc)
                loaded.materialize(only=inline)  # the ones the data file took stay pending
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
        raise OutputError(f"{out_path}: cannot serialise ({first_line(exc)})") from exc
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


def _externalize(model, external: dict, data_path: str, pending: dict, stashed: list, progress=None) -> str:
    """Move the tensors that were external into one data file (64-byte aligned); returns the file's sha256.
    Each tensor moved is appended to ``stashed`` as it goes, (tensor, raw bytes, or None for a pending tensor whose
    array was written), so that the caller can restore every one even when this fails part-way. Locations are
    set by the caller once the name (its hash) is known. ``progress(k, n, name)`` is called before each of the n
    streamed tensors (``mapped.Streamed``) is written."""
    offset = done = 0
    streamed = sum(isinstance(v, Streamed) for v in pending.values())
    h = hashlib.sha256()
    with open(data_path, "wb") as fh:
        for index, (tensor, _, main) in enumerate(checks.tensor_places(model)):
            if index not in external:
                continue
            held = pending.get(tensor.name) if main else None
            pad = (-offset) % 64
            if pad:
                fh.write(b"\0" * pad)
                h.update(b"\0" * pad)
                offset += pad
            if isinstance(held, Streamed):  # block by block from its data file, pruned on the way
                if progress is not None:
                    progress(done := done + 1, streamed, tensor.name)
                length = 0
                for block in held.blocks():
                    part = memoryview(block.reshape(-1).view(np.uint8))
                    fh.write(part)
                    h.update(part)
                    length += len(part)
                stashed.append((tensor, None))
            else:
                raw = wire.payload(held) if held is not None else tensor.raw_data
                fh.write(raw)
                h.update(raw)
                length = len(raw)
                stashed.append((tensor, None if held is not None else raw))
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", ""), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = TensorProto.EXTERNAL
            offset += length
        fh.flush()
        os.fsync(fh.fileno())
    return h.hexdigest()


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
