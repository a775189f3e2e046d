"""The model's inputs for validation: which axis is the batch, what every dynamic dimension resolves to, and
realistic synthetic values (token ids in the embedding's range, masks of ones, zero recurrent states)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError

# Bounds on what validation may allocate (documented in the README; exit 2 naming the option)
MAX_BATCH_SIZE = 4096
MAX_BATCHES = 1000
MAX_DIM = 1 << 20
MAX_SYNTHETIC_BATCH_BYTES = 256 << 20  # one synthetic batch, all inputs together
MAX_SYNTHETIC_TOTAL_BYTES = 1 << 30  # every synthetic batch together

_BATCH_NAMES = {"n", "b", "batch", "batch_size", "batchsize", "bs", "batch_dim", "nbatch"}
_IMAGE_SIZE_KEYS = ("imgsz", "img_size", "image_size", "input_size")
_STATE_WORDS = ("state", "hidden", "h0", "c0", "past", "cache", "memory")
_RATE_NAMES = {"sr", "sample_rate", "sampling_rate", "samplerate", "rate"}
_PASS_THROUGH_OPS = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand"}


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    dims: list  # int, or str/None for a dynamic dimension
    batch_axis: int | None = None  # the axis samples are stacked on (None: the same value is fed to every batch)
    shape: list | None = None  # resolved shape of one batch (None: unresolved)
    missing: list = field(default_factory=list)  # dynamic axes nothing resolved
    fill: str = ""  # how synthetic values are drawn (for the report)
    id_range: int | None = None  # integer ids index an embedding table of this many rows

    @property
    def rank(self) -> int:
        return len(self.dims)


def _dims(vi) -> list:
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        dims.append(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None))
    return dims


def _batch_like(d) -> bool:
    return isinstance(d, str) and d.lower() in _BATCH_NAMES


def input_specs(model: onnx.ModelProto) -> list:
    """The model's fed inputs (initializers also listed as inputs are not fed), with their batch axes.

    The batch dimension is a ``dim_param`` named like one (batch, N, B, batch_size...) wherever it sits (a recurrent
    state ``[2, batch, 128]`` has it on axis 1, a time-major ``[time, batch, C]`` input too); otherwise the dynamic
    leading dimension of the first non-scalar input, and then every input with a dynamic leading dimension is
    batched on axis 0 (exporters that name each input's axes apart). A static model batches on axis 0 of inputs
    sharing the first non-scalar input's leading size. Other inputs (scalars, fixed states) have no batch axis
    and are fed whole to every batch.
    """
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.elem_type:
            raise ConfigError(f"input '{vi.name}' is not a plain tensor (sequence/map/optional); "
                              f"validation cannot feed it: use --no-validate")
        try:
            from onnx import helper
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        except Exception:
            raise ConfigError(f"input '{vi.name}' has element type {vi.type.tensor_type.elem_type}, which "
                              f"validation cannot feed: use --no-validate") from None
        specs.append(InputSpec(vi.name, dtype, _dims(vi) if vi.type.tensor_type.HasField("shape") else []))
    shaped = [s for s in specs if s.dims]
    if not shaped:
        return specs
    named = next((d for s in shaped for d in s.dims if _batch_like(d)), None)
    lead = shaped[0].dims[0]
    for s in shaped:
        if named is not None and named in s.dims:
            s.batch_axis = s.dims.index(named)
        elif named is None and not isinstance(lead, int) and not isinstance(s.dims[0], int):
            s.batch_axis = 0
        elif named is None and isinstance(lead, int) and s.dims[0] == lead and (s is shaped[0] or s.rank >= 2) \
                and not any(not isinstance(d, int) for d in s.dims):
            s.batch_axis = 0
    return specs


def parse_input_shapes(items) -> dict:
    """['x:1,3,224,224', 'sr:'] -> {'x': [1, 3, 224, 224], 'sr': []} (an empty list is a scalar)."""
    shapes = {}
    for item in items or ():
        name, sep, dims = str(item).rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            parts = [d.strip() for d in dims.split(",")] if dims.strip() else []
            if any(not re.fullmatch(r"\d{1,12}", p) for p in parts):
                raise ValueError
            shapes[name] = [int(p) for p in parts]
            if any(d <= 0 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise ConfigError(f"--input-shape expects NAME:D1,D2,... with positive integers (NAME: for a "
                              f"scalar), got {item!r}") from None
        if any(d > MAX_DIM for d in shapes[name]):
            raise ConfigError(f"--input-shape {item!r}: a dimension above {MAX_DIM:,} is not supported")
    return shapes


def _metadata_sizes(model) -> tuple[dict, list | None]:
    """Sizes recorded in metadata_props: a key named after a dim_param ('height': '640'), or an image size
    ('imgsz': '[640, 640]', as detector exports write) for the spatial axes of a 4-D input."""
    named, image = {}, None
    for p in model.metadata_props:
        nums = [int(x) for x in re.findall(r"\d+", p.value or "")][:3]
        if p.key in _IMAGE_SIZE_KEYS and nums:
            image = nums if len(nums) >= 2 else nums * 2
        elif re.fullmatch(r"\s*\d{1,8}\s*", p.value or ""):
            named[p.key] = int(p.value)
    return named, image


def resolve_shapes(model, specs: list, batch_size: int, given: dict) -> list:
    """Fill ``spec.shape`` for every input: --input-shape first, then dim_params shared with a resolved input,
    sizes in the model's metadata, and --batch-size on the batch axis. What stays unknown goes to
    ``spec.missing`` (validation is then skipped, or refused when a gate needs it)."""
    unknown = set(given) - {s.name for s in specs}
    if unknown:
        raise ConfigError(f"--input-shape names unknown input(s): {', '.join(sorted(unknown))}; "
                          f"inputs are {', '.join(s.name for s in specs)}")
    named, image = _metadata_sizes(model)
    params, user = dict(named), {}
    for s in specs:  # user shapes first: they also define the sizes of shared dim_params
        if s.name in given:
            shape = given[s.name]
            if len(shape) != s.rank:
                raise ConfigError(f"--input-shape {s.name}: {len(shape)} dims given, the model has {s.rank} "
                                  f"({_fmt_dims(s.dims)})")
            for i, (d, g) in enumerate(zip(s.dims, shape)):
                if isinstance(d, int) and d != g:
                    raise ConfigError(f"--input-shape {s.name}: dimension {i} is fixed at {d} in the model, "
                                      f"{g} given")
                if isinstance(d, str) and d:
                    if d in user and user[d] != g:
                        raise ConfigError(f"--input-shape: dimension '{d}' is {user[d]} in one input and {g} in "
                                          f"'{s.name}'; inputs sharing a dimension must agree")
                    params[d] = user[d] = g
    # a batch size given for one input holds for every batched input (exporters may name their axes apart)
    batch_size = next((given[s.name][s.batch_axis] for s in specs if s.name in given and s.batch_axis is not None),
                      batch_size)
    for s in specs:
        if s.name in given:
            s.shape = list(given[s.name])
            continue
        shape, missing = [], []
        for i, d in enumerate(s.dims):
            if isinstance(d, int):
                shape.append(d)
            elif i == s.batch_axis:  # --batch-size, unless --input-shape sized this dim_param
                shape.append(user.get(d, batch_size) if d else batch_size)
            elif d and d in params:
                shape.append(params[d])
            elif image and s.rank == 4 and i in (2, 3):
                shape.append(image[i - 2])
            else:
                shape.append(None)
                missing.append(i)
        s.shape, s.missing = shape, missing
    sizes = {s.name: s.shape[s.batch_axis] for s in specs if s.batch_axis is not None and s.shape
             and s.shape[s.batch_axis] is not None}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"inputs disagree on the batch size: {', '.join(f'{k} {v}' for k, v in sizes.items())}; "
                          f"give every batched input the same leading size")
    return specs


def shape_hint(specs: list) -> str:
    """A pasteable --input-shape for every unresolved input (batch 1; 640 for image sides, 128 otherwise)."""
    parts = []
    for s in specs:
        if not s.missing:
            continue
        dims = []
        for i, d in enumerate(s.shape):
            if d is not None:
                dims.append(1 if i == s.batch_axis else d)
            else:
                dims.append(640 if s.rank == 4 and i >= 2 else 128)
        parts.append(f"--input-shape {s.name}:{','.join(map(str, dims))}")
    return " ".join(parts)


def _fmt_dims(dims) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"


def unresolved_message(specs: list) -> str:
    names = [f"'{s.name}' {_fmt_dims(s.dims)} (dimension{'s' if len(s.missing) > 1 else ''} "
             f"{', '.join(map(str, s.missing))})" for s in specs if s.missing]
    return (f"input {', '.join(names)} has dynamic dimensions nothing in the model resolves; give the shape, e.g. "
            f"{shape_hint(specs)}, or real inputs with --data")


# ---- synthetic values -----------------------------------------------------------------------------------------

def parse_synthetic(text: str) -> tuple[str, float, float]:
    """'normal' | 'normal:MEAN,STD' | 'uniform' | 'uniform:LO,HI' -> (kind, a, b)."""
    kind, _, rest = str(text).strip().partition(":")
    kind = kind.lower()
    defaults = {"normal": (0.0, 1.0), "uniform": (0.0, 1.0)}
    if kind not in defaults:
        raise ConfigError(f"--synthetic must be normal[:MEAN,STD] or uniform[:LO,HI], got {text!r}")
    if not rest:
        return (kind, *defaults[kind])
    try:
        a, b = (float(x) for x in rest.split(","))
    except ValueError:
        raise ConfigError(f"--synthetic {text!r}: give two numbers, e.g. uniform:0,1 or normal:0,1") from None
    if not (math.isfinite(a) and math.isfinite(b)) or (kind == "normal" and b < 0) or (kind == "uniform" and b < a):
        raise ConfigError(f"--synthetic {text!r}: need finite numbers, STD >= 0, LO <= HI")
    return kind, a, b


def _embedding_rows(model, name: str) -> int | None:
    """Rows of the smallest constant table a Gather reads with ``name`` (through Cast/Unsqueeze/Reshape...)."""
    consts = {t.name: list(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and n.output:
                    consts[n.output[0]] = list(a.t.dims)
    users = {}
    for n in model.graph.node:
        for i, x in enumerate(n.input):
            users.setdefault(x, []).append((n, i))
    rows, seen, todo = [], {name}, [name]
    while todo:
        cur = todo.pop()
        for n, i in users.get(cur, ()):
            if n.op_type == "Gather" and i == 1 and n.input[0] in consts and consts[n.input[0]]:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                dims = consts[n.input[0]]
                if -len(dims) <= axis < len(dims):
                    rows.append(int(dims[axis]))
            elif n.op_type in _PASS_THROUGH_OPS and i == 0:
                for o in n.output:
                    if o not in seen:
                        seen.add(o)
                        todo.append(o)
    return min(rows) if rows else None


def plan_fill(model, specs: list, dist: tuple) -> None:
    """Decide, per input, how synthetic values are drawn (documented in the README's validation section)."""
    kind, a, b = dist
    for s in specs:
        low = s.name.lower()
        if s.dtype == np.bool_:
            s.fill = "zeros (False: nothing padded)" if "pad" in low else "ones (True)"
        elif np.issubdtype(s.dtype, np.integer):
            s.id_range = _embedding_rows(model, s.name)
            if "mask" in low:
                s.fill = "zeros (nothing padded)" if "pad" in low else "ones (mask)"
            elif "token_type" in low or "segment" in low:
                s.fill = "zeros (token types)"
            elif "position" in low:
                s.fill = "arange (positions)"
            elif s.rank == 0 and low in _RATE_NAMES:
                s.fill = "16000 (sample rate)"
            elif s.id_range:
                s.fill = f"uniform ids in [0, {s.id_range}) (embedding rows)"
            elif s.rank == 0:
                s.fill = "1 (scalar)"
            else:
                s.fill = "uniform integers in [0, 2)"
        elif np.issubdtype(s.dtype, np.floating):
            floats = [x for x in specs if np.issubdtype(x.dtype, np.floating) and x.rank]
            if s.rank == 0:
                s.fill = "16000.0 (sample rate)" if low in _RATE_NAMES else "1.0 (scalar)"
            elif "mask" in low:
                s.fill = "zeros (nothing padded)" if "pad" in low else "ones (mask)"
            elif any(w in low for w in _STATE_WORDS) and len(floats) > 1:
                s.fill = "zeros (recurrent state)"
            else:
                s.fill = f"{kind}({a:g}, {b:g})"
        else:
            raise ConfigError(f"input '{s.name}' has dtype {s.dtype}, which synthetic inputs do not cover; "
                              f"pass real inputs with --data")


def _draw(s: InputSpec, shape, rng, dist) -> np.ndarray:
    kind, a, b = dist
    f = s.fill
    if f.startswith("ones"):
        return np.ones(shape, dtype=s.dtype)
    if f.startswith("zeros"):
        return np.zeros(shape, dtype=s.dtype)
    if f.startswith("arange"):
        last = shape[-1] if shape else 1
        return np.broadcast_to(np.arange(last), shape).astype(s.dtype) if shape else np.zeros((), s.dtype)
    if f.startswith("16000"):
        return np.full(shape, 16000, dtype=s.dtype)
    if f.startswith("1"):
        return np.ones(shape, dtype=s.dtype)
    if np.issubdtype(s.dtype, np.integer):
        return rng.integers(0, s.id_range or 2, size=shape).astype(s.dtype)
    if kind == "uniform":
        return rng.uniform(a, b, size=shape).astype(s.dtype)
    return (a + b * rng.standard_normal(shape)).astype(s.dtype)


def synthetic_batches(model, specs: list, batches: int, seed: int, dist: tuple) -> list:
    """``batches`` feeds drawn with ``spec.fill`` (seeded). Bounded: one batch at most 256 MiB, all 1 GiB."""
    plan_fill(model, specs, dist)
    per_batch = sum(int(np.prod(s.shape, dtype=np.float64)) * s.dtype.itemsize for s in specs)
    if per_batch > MAX_SYNTHETIC_BATCH_BYTES:
        big = max(specs, key=lambda s: float(np.prod(s.shape, dtype=np.float64)) * s.dtype.itemsize)
        raise ConfigError(f"synthetic inputs of {per_batch / 2**20:,.0f} MiB per batch (input '{big.name}' "
                          f"{big.shape}) exceed the {MAX_SYNTHETIC_BATCH_BYTES >> 20} MiB limit: lower "
                          f"--batch-size or --input-shape, or pass --data")
    if per_batch * batches > MAX_SYNTHETIC_TOTAL_BYTES:
        raise ConfigError(f"{batches} synthetic batches of {per_batch / 2**20:,.1f} MiB exceed the "
                          f"{MAX_SYNTHETIC_TOTAL_BYTES >> 30} GiB limit: lower --batches or --batch-size")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        out.append({s.name: _draw(s, s.shape, rng, dist) for s in specs})
    return out
