"""Weights left in their external data file: memory-mapped read-only, touched one tensor at a time, written block
by block (models larger than memory).

A mapped tensor's pages count in the process's resident size while they stay mapped, so ``Residency`` drops the
pages of every other mapped tensor (``madvise(MADV_DONTNEED)``: the mapping stays valid and refaults from the page
cache) whenever one is touched: at most one mapped tensor is resident at a time, whatever order the stages read
them in. ``Streamed`` is what ``LoadedModel.pending`` holds for such a tensor: its source and, once pruned, the
packed keep flags; saving writes it in bounded blocks (``blocks``), never whole.
"""
from __future__ import annotations

import mmap

import numpy as np

BLOCK_ELEMENTS = 1 << 22  # values per written block (16 MiB of float32); a multiple of 8 (packed flags)
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def mask_values(w: np.ndarray, keep: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``w`` with the entries where ``keep`` is False set to +0.0, into ``out`` (same shape and dtype). The one
    rule every writer of pruned values follows, so that the in-memory and the streamed paths give the same
    bytes."""
    if w.dtype in (np.float32, np.float64, np.float16):
        np.multiply(w, keep, out=out)  # pruned entries become ±0.0 ...
        np.add(out, 0.0, out=out)  # ... and +0.0 (x + 0.0 == x for every kept x)
    else:  # bfloat16 and friends: no ufunc loops with bool
        out.fill(0)
        np.copyto(out, w, where=keep)
    return out


class Residency:
    """The mapped tensors whose pages may be resident; touching one drops the pages of the others."""

    def __init__(self):
        self.live = []

    def touch(self, source: "Source") -> None:
        for other in self.live:
            if other is not source:
                other.drop()
        self.live = [source]

    def drop_all(self) -> None:
        for other in self.live:
            other.drop()
        self.live = []


class Source:
    """One tensor's bytes in an external data file, mapped read-only (``array`` stays valid while this lives)."""

    def __init__(self, fd: int, offset: int, dtype: np.dtype, shape: tuple, residency: Residency):
        self.dtype, self.shape = np.dtype(dtype), tuple(int(d) for d in shape)
        self.size = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        self.nbytes = self.size * self.dtype.itemsize
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        self._delta = offset - start
        self._mm = mmap.mmap(fd, self._delta + self.nbytes, access=mmap.ACCESS_READ, offset=start)
        self._array = np.frombuffer(self._mm, dtype=self.dtype, count=self.size, offset=self._delta) \
            .reshape(self.shape)
        self.residency = residency

    def view(self) -> np.ndarray:
        """The values (read-only), after dropping the pages of every other mapped tensor."""
        self.residency.touch(self)
        return self._array

    def drop(self) -> None:
        """Give this tensor's resident pages back (the page cache keeps them; a later read refaults)."""
        if _DONTNEED is not None:
            try:
                self._mm.madvise(_DONTNEED)
            except (OSError, ValueError):  # closed, or a platform without it: residency is then the OS's call
                pass


class Streamed:
    """A weight held outside the protobuf as its mapped ``source`` and, once pruned, the packed flags of the
    values it keeps (``kept``; None: all). Looks enough like an array for the checks (dtype, size, shape);
    ``np.asarray`` builds the values in memory (compaction and small probes do), ``blocks`` never does."""

    def __init__(self, source: Source, kept: np.ndarray | None = None):
        self.source, self.kept = source, kept
        self.dtype, self.shape, self.size, self.nbytes = source.dtype, source.shape, source.size, source.nbytes
        self.ndim = len(self.shape)

    def __array__(self, dtype=None, copy=None):
        w = self.source.view()
        if self.kept is None:
            out = np.array(w)
        else:
            keep = np.unpackbits(self.kept, count=w.size).view(bool).reshape(w.shape)
            out = mask_values(w, keep, np.empty_like(w))
        return out if dtype is None else out.astype(dtype, copy=False)

    def nonzero(self) -> np.ndarray:
        """Boolean flags of the non-zero values (one byte per value, not the values)."""
        w = self.source.view()
        nz = np.not_equal(w, 0)
        if self.kept is not None:
            nz &= np.unpackbits(self.kept, count=w.size).view(bool).reshape(w.shape)
        return nz

    def blocks(self, elements: int | None = None):
        """The values, little-endian, in consecutive flat blocks of at most ``elements`` (a multiple of 8;
        default ``BLOCK_ELEMENTS``); each block's pages are given back before the next is read."""
        elements = elements or BLOCK_ELEMENTS
        flat = self.source.view().reshape(-1)
        little = flat.dtype.newbyteorder("<")
        out = np.empty(min(elements, flat.size), dtype=flat.dtype)
        for start in range(0, flat.size, elements):
            stop = min(start + elements, flat.size)
            src = flat[start:stop]
            if self.kept is None:
                block = out[: stop - start]
                np.copyto(block, src)
            else:
                keep = np.unpackbits(self.kept[start // 8: -(-stop // 8)], count=stop - start).view(bool)
                block = mask_values(src, keep, out[: stop - start])
            yield block if block.dtype == little else block.astype(little)
            self.source.drop()


def spill(values: np.ndarray, residency: Residency) -> Source:
    """``values`` moved into an unnamed temporary file and mapped back (a streamed model's refit weights: memory
    stays near one tensor). The file has no name from the start, so nothing is left behind on any exit path."""
    import tempfile
    arr = np.ascontiguousarray(values)
    with tempfile.TemporaryFile() as fh:
        if arr.nbytes:
            fh.write(memoryview(arr.reshape(-1).view(np.uint8)))
            fh.flush()
            return Source(fh.fileno(), 0, arr.dtype, arr.shape, residency)
    raise ValueError("an empty array is never spilled")


class Mapper:
    """Maps the tensors of one model and owns their residency."""

    def __init__(self):
        self.residency = Residency()
        self.tensors = 0
        self.bytes = 0

    def map(self, fd: int, offset: int, dtype, shape) -> Source:
        """Map ``shape`` values of ``dtype`` at ``offset`` of the open file ``fd`` (the mapping keeps its own
        reference to the file: ``fd`` may be closed afterwards)."""
        source = Source(fd, offset, dtype, shape, self.residency)
        self.tensors += 1
        self.bytes += source.nbytes
        return source


class Values:
    """The layers' weight values by position: arrays in memory, or mapped tensors (``Source``) whose ``view``
    is taken on every access, so that reading layer after layer keeps one mapped tensor resident. Iterating goes
    through ``__getitem__`` too."""

    def __init__(self, items=(), residency: Residency | None = None):
        self._items = list(items)
        self.residency = residency  # where spilled arrays join (a streamed model's); None: nothing is mapped

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        item = self._items[i]
        return item.view() if isinstance(item, Source) else item

    def __setitem__(self, i, value):
        self._items[i] = value

    def __iter__(self):
        for i in range(len(self._items)):
            yield self[i]

    def append(self, item) -> None:
        self._items.append(item)

    def source(self, i) -> Source | None:
        """The mapped source of position ``i``, None when its values are in memory."""
        item = self._items[i]
        return item if isinstance(item, Source) else None

    def subset(self, idx) -> "Values":
        """The values at positions ``idx``, sharing the same arrays and mapped sources."""
        return Values((self._items[i] for i in idx), self.residency)
