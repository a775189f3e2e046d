"""Validation inputs: from an .npz / a directory of .npy files, or synthesized from the model's input shapes."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from .errors import ConfigError, InputError

LABEL_KEYS = ("y", "labels")


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    dims: list  # int, or str/None for a dynamic dimension


@dataclass
class Dataset:
    batches: list  # list of {input name: array}
    labels: np.ndarray | None
    source: str
    batch_size: int
    samples: int = 0
    notes: list = field(default_factory=list)


def input_specs(model: onnx.ModelProto) -> list:
    """The model's real inputs (initializers that are also listed as inputs are not fed)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise InputError(f"input '{vi.name}' is not a tensor; only tensor inputs can be validated")
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        dims = []
        for d in tt.shape.dim:
            dims.append(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None))
        specs.append(InputSpec(vi.name, np.dtype(dtype), dims))
    return specs


def parse_input_shapes(items) -> dict:
    """['x:1,3,224,224', ...] -> {'x': [1, 3, 224, 224]}."""
    shapes = {}
    for item in items or ():
        name, sep, dims = str(item).rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",") if d.strip()]
            if not shapes[name] or min(shapes[name]) <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--input-shape expects NAME:D1,D2,... with positive integers, got {item!r}") from None
    return shapes


def synthesize(specs, batch_size: int, batches: int, seed: int, shapes: dict) -> Dataset:
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise ConfigError(f"--input-shape names unknown input(s): {', '.join(sorted(unknown))}; "
                          f"inputs are {', '.join(s.name for s in specs)}")
    rng = np.random.default_rng(seed)
    resolved = {}
    for s in specs:
        if s.name in shapes:
            if len(shapes[s.name]) != len(s.dims):
                raise ConfigError(f"--input-shape {s.name}: {len(shapes[s.name])} dims given, the model has "
                                  f"{len(s.dims)}")
            resolved[s.name] = shapes[s.name]
            continue
        dims = []
        for i, d in enumerate(s.dims):
            if isinstance(d, int):
                dims.append(d)
            elif i == 0:
                dims.append(batch_size)
            else:
                raise ConfigError(f"input '{s.name}' has a dynamic dimension {i} ('{d or '?'}'); give its shape "
                                  f"with --input-shape {s.name}:{','.join(str(x) if isinstance(x, int) else 'N' for x in s.dims)}")
        resolved[s.name] = dims
    out = []
    for _ in range(batches):
        feed = {}
        for s in specs:
            shape = resolved[s.name]
            if np.issubdtype(s.dtype, np.floating):
                feed[s.name] = rng.standard_normal(shape).astype(s.dtype)
            elif s.dtype == np.bool_:
                feed[s.name] = rng.random(shape) < 0.5
            elif np.issubdtype(s.dtype, np.integer):
                feed[s.name] = rng.integers(0, 2, size=shape).astype(s.dtype)
            else:
                raise ConfigError(f"input '{s.name}' has dtype {s.dtype}; pass real data with --data")
        out.append(feed)
    first = resolved[specs[0].name] if specs else [0]
    return Dataset(out, None, f"synthetic (seed {seed}, standard normal)", first[0] if first else 1,
                   samples=batches * (first[0] if first else 1))


def load_data(path: str, specs, batch_size: int) -> Dataset:
    arrays = _read_arrays(path)
    labels = None
    for key in LABEL_KEYS:
        if key in arrays:
            labels = np.asarray(arrays.pop(key))
            break
    names = [s.name for s in specs]
    feeds = {}
    if all(n in arrays for n in names):
        feeds = {n: arrays[n] for n in names}
    elif len(specs) == 1 and len(arrays) == 1:
        feeds = {names[0]: next(iter(arrays.values()))}
    else:
        raise InputError(f"{path}: arrays {sorted(arrays)} do not name the model's inputs {names} "
                         f"(labels go in 'y' or 'labels')")
    n = None
    for s in specs:
        a = feeds[s.name]
        if a.ndim != len(s.dims):
            raise InputError(f"{path}: '{s.name}' has {a.ndim} dims, the model expects {len(s.dims)}")
        for i, d in enumerate(s.dims):
            if isinstance(d, int) and i > 0 and a.shape[i] != d:
                raise InputError(f"{path}: '{s.name}' has shape {list(a.shape)}, the model expects {s.dims}")
        feeds[s.name] = a.astype(s.dtype, copy=False)
        if n is not None and a.shape[0] != n:
            raise InputError(f"{path}: inputs disagree on the number of samples")
        n = a.shape[0]
    if labels is not None and len(labels) != n:
        raise InputError(f"{path}: {len(labels)} labels for {n} samples")
    fixed = specs[0].dims[0] if specs and isinstance(specs[0].dims[0], int) else None
    bs = fixed or batch_size
    batches = [{k: v[i:i + bs] for k, v in feeds.items()} for i in range(0, n, bs)]
    if fixed and n % fixed:
        batches = batches[:-1]  # a fixed batch dimension cannot take the short tail
    return Dataset(batches, labels[: len(batches) * bs] if labels is not None else None, path, bs,
                   samples=min(n, len(batches) * bs))


def _read_arrays(path: str) -> dict:
    try:
        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(path, "*.npy")))
            if not files:
                raise InputError(f"{path}: no .npy files")
            return {os.path.splitext(os.path.basename(f))[0]: np.load(f, allow_pickle=False) for f in files}
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read data ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
