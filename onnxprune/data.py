"""Validation data: real inputs from an .npz or a directory of .npy files (checked), or synthetic batches.

Arrays are laid out like the model's inputs, samples stacked on each input's batch axis (axis 0 for most; the
axis of the shared batch ``dim_param`` otherwise, e.g. axis 1 of a recurrent state ``[2, B, 128]``). An input
without a batch axis (a scalar such as a sample rate, a fixed state) is given once and fed to every batch.
"""
from __future__ import annotations

import glob
import hashlib
import os
import stat
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError, InputError
from .inputs import (MAX_BATCH_SIZE, InputSpec, input_specs, parse_input_shapes, repeated_dims,  # noqa: F401
                     resolve_shapes, synthetic_batches)

LABEL_KEYS = ("y", "labels")


@dataclass
class Dataset:
    batches: list  # list of {input name: array}
    labels: np.ndarray | None
    source: str
    batch_size: int
    samples: int = 0
    notes: list = field(default_factory=list)
    batch_sizes: list = field(default_factory=list)  # samples in each batch
    sha256: str | None = None  # of the data file or directory's .npy files (None: synthetic)
    batch_axes: dict = field(default_factory=dict)  # input name -> batch axis (None: fed whole to every batch)


def synthesize(specs, batch_size: int, batches: int, seed: int, shapes: dict, model=None,
               dist=("normal", 0.0, 1.0)) -> Dataset:
    """Seeded synthetic batches; raises ConfigError when a dynamic dimension stays unresolved."""
    from .inputs import unresolved_message
    if any(s.shape is None for s in specs):  # a caller that resolved them (evaluation) is not redone
        resolve_shapes(model if model is not None else _EmptyModel(), specs, batch_size, shapes)
    if any(s.missing for s in specs):
        raise ConfigError(unresolved_message(specs))
    feeds = synthetic_batches(model if model is not None else _EmptyModel(), specs, batches, seed, dist)
    per = next((s.shape[s.batch_axis] for s in specs if s.batch_axis is not None), 1)
    fills = "; ".join(f"{s.name}: {s.fill}" for s in specs)
    return Dataset(feeds, None, f"synthetic (seed {seed}; {fills})", per, samples=batches * per,
                   batch_sizes=[per] * batches, batch_axes={s.name: s.batch_axis for s in specs})


class _EmptyModel:
    """Stands in for a model without metadata or graph (inputs given as specs only)."""

    class _G:
        node = ()
        initializer = ()

    metadata_props = ()
    graph = _G()


def _regular(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read data ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file (a FIFO, device or socket is never read)")


def _file_digest(path: str) -> str:
    with open(path, "rb") as fh:
        digest = hashlib.sha256()
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _npy_files(path: str) -> list:
    """The .npy files a data directory is read from, in order (each checked to be a regular file)."""
    files = sorted(glob.glob(os.path.join(path, "*.npy")))
    for f in files:
        _regular(f)
    return files


def _dir_digest(files: list) -> str:
    """sha256 over the files' names and contents: the same data under another path is the same data."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(os.path.basename(f).encode("utf-8", "surrogateescape") + b"\0")
        digest.update(_file_digest(f).encode())
    return digest.hexdigest()


def data_digest(path: str) -> str | None:
    """The sha256 that ``load_data`` records for ``path`` (a file, or a directory's .npy names and contents),
    without reading any array; None when it cannot be read (loading it then says why)."""
    try:
        if os.path.isdir(path):
            return _dir_digest(_npy_files(path))
        _regular(path)
        return _file_digest(path)
    except (OSError, InputError):
        return None


def _read_arrays(path: str) -> tuple[dict, str | None]:
    """name -> array, and the sha256 of the file (of a directory: over its .npy files' names and digests). Never
    unpickles, never blocks."""
    try:
        if os.path.isdir(path):
            files = _npy_files(path)
            if not files:
                raise InputError(f"{path}: no .npy files")
            arrays = {os.path.splitext(os.path.basename(f))[0]: np.load(f, allow_pickle=False) for f in files}
            return arrays, _dir_digest(files)
        _regular(path)
        digest = _file_digest(path)
        if path.endswith(".npy"):
            return {"": np.load(path, allow_pickle=False)}, digest
        with np.load(path, allow_pickle=False) as z:
            arrays = {}
            for k in z.files:
                a = z[k]
                if not isinstance(a, np.ndarray):  # a member not saved by NumPy (no .npy suffix): its raw bytes
                    raise InputError(f"{path}: member '{k}' is not a NumPy array (.npy) file; save the data with "
                                     f"numpy.savez")
                arrays[k] = a
            return arrays, digest
    except InputError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise InputError(f"{path}: cannot read data ({type(exc).__name__}: "
                         f"{(text[0] if text else '')[:200]})") from None


def _check_labels(labels: np.ndarray, n: int, path: str) -> np.ndarray:
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{path}: labels have dtype {labels.dtype}; give integer class ids (for one-hot or "
                         f"probability rows use labels.argmax(-1))")
    if labels.ndim == 0 or len(labels) != n:
        raise InputError(f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {n} samples")
    if labels.size and labels.min() < 0:
        raise InputError(f"{path}: labels hold negative values (min {int(labels.min())}); class ids start at 0")
    return labels.astype(np.int64, copy=False)


def load_data(path: str, specs, batch_size: int) -> Dataset:
    """Read ``path`` and cut it into batches along each input's batch axis, checking every array against the
    model (rank, fixed dimensions, one sample count) and the labels (integer class ids, one per sample)."""
    arrays, digest = _read_arrays(path)
    labels = None
    for key in LABEL_KEYS:
        if key in arrays:
            labels = np.asarray(arrays.pop(key))
            break
    names = [s.name for s in specs]
    notes = []
    if all(n in arrays for n in names):
        feeds = {n: arrays[n] for n in names}
        unused = sorted(set(arrays) - set(names))
        if unused:
            notes.append(f"arrays {unused} in {path} are not used (inputs are {names}; labels go in 'y' or "
                         f"'labels')")
    elif len(specs) == 1 and len(arrays) == 1:
        feeds = {names[0]: next(iter(arrays.values()))}
    else:
        missing = [n for n in names if n not in arrays]
        raise InputError(f"{path}: no array for input(s) {missing} (arrays: {sorted(arrays)}; name them after "
                         f"the inputs, labels in 'y' or 'labels')")
    n = None
    for s in specs:
        a = feeds[s.name]
        if a.dtype == object or a.dtype.kind in "USV":
            raise InputError(f"{path}: '{s.name}' has dtype {a.dtype}; numeric arrays only")
        if a.ndim != s.rank:
            raise InputError(f"{path}: '{s.name}' has {a.ndim} dims {list(a.shape)}, the model's input has "
                             f"{s.rank} {s.dims}")
        for i, d in enumerate(s.dims):
            if isinstance(d, int) and i != s.batch_axis and a.shape[i] != d:
                raise InputError(f"{path}: '{s.name}' has shape {list(a.shape)}, the model expects {s.dims}")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise InputError(f"{path}: '{s.name}' has dtype {a.dtype}; numeric arrays only")
        if s.batch_axis is not None:
            count = a.shape[s.batch_axis]
            if n is not None and count != n:
                raise InputError(f"{path}: inputs disagree on the number of samples ({n} vs {count} in "
                                 f"'{s.name}', batch axis {s.batch_axis})")
            n = count
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise InputError(f"{path}: '{s.name}' holds {int(a.size - np.count_nonzero(np.isfinite(a)))} NaN/Inf "
                             f"value(s); validation data must be finite")
        with np.errstate(over="ignore", invalid="ignore"):
            cast = a.astype(s.dtype, copy=False)
        if cast.dtype.kind in "fc" and cast is not a and not np.isfinite(cast).all():  # finite, then out of range
            bad = int(cast.size - np.count_nonzero(np.isfinite(cast)))
            raise InputError(f"{path}: '{s.name}' holds {bad} value(s) beyond the range of the model's "
                             f"{np.dtype(s.dtype).name} input (largest magnitude {float(np.abs(a).max()):.3g})")
        feeds[s.name] = cast
    _check_shared_dims(specs, feeds, path)
    if n is None:  # no input has a batch axis: the arrays are one feed
        n = 1
    if n == 0:
        raise InputError(f"{path}: no samples (0 along the batch axis)")
    if labels is not None:
        labels = _check_labels(labels, n, path)
    fixed = next((s.dims[s.batch_axis] for s in specs if s.batch_axis is not None
                  and isinstance(s.dims[s.batch_axis], int)), None)
    bs = fixed or min(batch_size, MAX_BATCH_SIZE)
    if fixed and n < fixed:
        raise InputError(f"{path}: {n} samples, fewer than one batch (the model's batch dimension is fixed at "
                         f"{fixed})")
    usable = (n // fixed) * fixed if fixed else n
    if usable < n:
        notes.append(f"{n - usable} trailing samples dropped (batch fixed at {fixed})")
    batches, sizes = [], []
    for i in range(0, usable, bs):
        batches.append({s.name: np.ascontiguousarray(_along(feeds[s.name], s.batch_axis, i, i + bs))
                        for s in specs})
        sizes.append(min(bs, usable - i))
    for s in specs:  # the resolved shape of a batch, for the report
        s.shape = list(batches[0][s.name].shape)
    return Dataset(batches, labels[:usable] if labels is not None else None, path, bs, samples=usable,
                   notes=notes, batch_sizes=sizes, sha256=digest,
                   batch_axes={s.name: s.batch_axis for s in specs})


def _check_shared_dims(specs, feeds, path) -> None:
    """Inputs naming a dimension alike (ids and mask [batch, 'seq']) must give it one size: a mask [N, 1] next to
    ids [N, 6] would broadcast inside the model and be validated on data the model's shapes rule out. Names an
    input repeats on several of its axes (Paddle's 'H?' for H and W) say nothing of one size and are not held."""
    generic = set().union(*(repeated_dims(s.dims) for s in specs))
    seen = {}
    for s in specs:
        for axis, d in enumerate(s.dims):
            if not isinstance(d, str) or axis == s.batch_axis or d in generic:
                continue
            size = int(feeds[s.name].shape[axis])
            first = seen.setdefault(d, (s.name, axis, size))
            if first[2] != size:
                raise InputError(f"{path}: '{s.name}' has {size} on axis {axis} ('{d}'), '{first[0]}' has "
                                 f"{first[2]} on axis {first[1]}: inputs naming a dimension alike must agree")


def take(dataset: Dataset, start: int, stop: int | None, source: str) -> Dataset:
    """The samples [start, stop) of a dataset as a new one (rebatched views; used to split calibration data
    from evaluation data)."""
    feeds, sizes, seen = [], [], 0
    for feed, size in zip(dataset.batches, dataset.batch_sizes):
        lo, hi = max(start - seen, 0), size if stop is None else min(stop - seen, size)
        if hi > lo:
            feeds.append((feed, lo, hi))
            sizes.append(hi - lo)
        seen += size
    if not feeds:
        raise ConfigError(f"{source}: no samples left after the split")
    return Dataset([_slice_feed(f, lo, hi, dataset) for f, lo, hi in feeds],
                   None if dataset.labels is None else dataset.labels[start:stop], source, dataset.batch_size,
                   samples=sum(sizes), notes=list(dataset.notes), batch_sizes=sizes, sha256=dataset.sha256,
                   batch_axes=dict(dataset.batch_axes))


def rebatch(dataset: Dataset, size: int) -> Dataset:
    """The same samples in batches of at most ``size`` (views; inputs without a batch axis go whole to each)."""
    if all(n <= size for n in dataset.batch_sizes):
        return dataset
    feeds, sizes = [], []
    for feed, n in zip(dataset.batches, dataset.batch_sizes):
        for lo in range(0, n, size):
            hi = min(n, lo + size)
            feeds.append(_slice_feed(feed, lo, hi, dataset))
            sizes.append(hi - lo)
    return Dataset(feeds, dataset.labels, dataset.source, min(size, dataset.batch_size), samples=dataset.samples,
                   notes=list(dataset.notes), batch_sizes=sizes, sha256=dataset.sha256,
                   batch_axes=dict(dataset.batch_axes))


def _slice_feed(feed, lo, hi, dataset):
    return {name: _along(a, dataset.batch_axes.get(name, 0), lo, hi) for name, a in feed.items()}


def _along(a: np.ndarray, axis: int | None, lo: int, hi: int) -> np.ndarray:
    """Samples [lo, hi) of an array on its batch axis (a view); the whole array when it has none."""
    if axis is None:
        return a
    index = [slice(None)] * a.ndim
    index[axis] = slice(lo, hi)
    return a[tuple(index)]
