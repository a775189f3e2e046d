"""The model's inputs for validation: which axis is the batch, what every dynamic dimension resolves to, and
realistic synthetic values (token ids in the embedding's range, masks of ones, zero recurrent states)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    import onnx

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
# ops whose output (from input 0) holds the same values as integer ids, rearranged
_PASS_THROUGH_OPS = {"Cast", "CastLike", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand",
                     "Transpose", "Tile", "Slice", "Split"}


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
    given: bool = False  # the shape came from --input-shape

    @property
    def rank(self) -> int:
        return len(self.dims)


def _dims(vi) -> list:
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:  # a dim_param that names nothing ('?', '-1': Paddle writes one for every dynamic dim) is unnamed
            dims.append(d.dim_param if _named(d.dim_param) else None)
    return dims


def _named(d) -> bool:
    return isinstance(d, str) and re.search(r"[A-Za-z_]", d) is not None


def _batch_like(d) -> bool:
    return isinstance(d, str) and d.lower() in _BATCH_NAMES


def repeated_dims(dims) -> set:
    """dim_params that name several axes of one input (Paddle's 'H?' for both H and W): not one size."""
    names = [d for d in dims if isinstance(d, str)]
    return {d for d in names if names.count(d) > 1}


def _is_state(s) -> bool:
    return np.issubdtype(s.dtype, np.floating) and any(w in s.name.lower() for w in _STATE_WORDS)


def input_specs(model: onnx.ModelProto) -> list:
    """The model's fed inputs (initializers also listed as inputs are not fed), with their batch axes.

    The batch dimension is a ``dim_param`` named like one (batch, N, B, batch_size...) wherever it sits (a recurrent
    state ``[2, batch, 128]`` has it on axis 1, a time-major ``[time, batch, C]`` input too); otherwise the dynamic
    leading dimension of the first non-scalar input, and then every input with a dynamic leading dimension is
    batched on axis 0 (exporters that name each input's axes apart). A static model batches on axis 0 of inputs
    sharing the first non-scalar input's leading size, and so does a model with a fixed batch of 1 with dynamic
    axes after it (``[1, seq]``). An input holding a batched input's batch ``dim_param`` on another axis is
    batched there (``[2, unk_0, 128]`` next to ``[unk_0, T]``), and a recurrent state (a float
    input named like state/hidden/h0/c0/past/cache/memory) whose only dynamic dimension is unnamed or named apart
    (``[2, ?, 128]``, ``[2, M, 128]``) is batched on that axis when the other inputs have a dynamic batch. Other
    inputs (scalars, fixed states) have no batch axis and are fed whole to every batch.
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
                and (lead == 1 or not any(not isinstance(d, int) for d in s.dims)):
            s.batch_axis = 0  # a fixed batch of 1 with dynamic axes after it ([1, 'seq']) too
    generic = set().union(*(repeated_dims(s.dims) for s in shaped))
    batch_params = {s.dims[s.batch_axis] for s in shaped if s.batch_axis is not None
                    and isinstance(s.dims[s.batch_axis], str)} - generic
    dynamic_batch = any(s.batch_axis is not None and not isinstance(s.dims[s.batch_axis], int) for s in shaped)
    for s in shaped:
        if s.batch_axis is not None:
            continue
        hits = [i for i, d in enumerate(s.dims) if d in batch_params]
        dynamic = [i for i, d in enumerate(s.dims) if not isinstance(d, int)]
        if len(hits) == 1:  # the batch dim_param of another input, on another axis
            s.batch_axis = hits[0]
        elif dynamic_batch and _is_state(s) and s.rank >= 2 and len(dynamic) == 1 \
                and not any(d in batch_params or d in generic for d in s.dims if isinstance(d, str)):
            s.batch_axis = dynamic[0]  # a recurrent state's one dynamic dimension is its batch
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
    params, user, loose = dict(named), {}, {}
    for s in specs:  # user shapes first: they also define the sizes of shared dim_params
        if s.name in given:
            shape = given[s.name]
            if len(shape) != s.rank:
                raise ConfigError(f"--input-shape {s.name}: {len(shape)} dims given, the model has {s.rank} "
                                  f"({_fmt_dims(s.dims)})")
            repeated = repeated_dims(s.dims)
            for i, (d, g) in enumerate(zip(s.dims, shape)):
                if isinstance(d, int) and d != g:
                    raise ConfigError(f"--input-shape {s.name}: dimension {i} is fixed at {d} in the model, "
                                      f"{g} given")
                if d in repeated:
                    # one name on several axes of this input (Paddle's 'H?' for H and W): the shape given wins,
                    # and only a size it gives every such axis sizes other inputs (never checked against them)
                    loose.setdefault(d, set()).add(g)
                    continue
                if isinstance(d, str) and d:
                    if d in user and user[d] != g:
                        raise ConfigError(f"--input-shape: dimension '{d}' is {user[d]} in one input and {g} in "
                                          f"'{s.name}'; inputs sharing a dimension must agree")
                    params[d] = user[d] = g
    for d, sizes in loose.items():
        if len(sizes) == 1 and d not in user:
            params[d] = next(iter(sizes))
    # a batch size given for one input holds for every batched input (exporters may name their axes apart)
    batch_size = next((given[s.name][s.batch_axis] for s in specs if s.name in given and s.batch_axis is not None),
                      batch_size)
    for s in specs:
        if s.name in given:
            s.shape, s.missing, s.given = list(given[s.name]), [], True
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
    """A pasteable --input-shape for every unresolved input, consistent across inputs: every batch axis gets one
    size (1 when a batched input is listed, since a size given for one holds for all, unless an --input-shape
    already set it; else the batch size in use), a dim_param one size wherever it appears; other unknown sides
    640 on an image's spatial axes, 512 samples for a frame of a model with a sample-rate input (32 ms at
    16 kHz), 128 otherwise. Known sizes are copied, never taken from another dimension."""
    listed = [s for s in specs if s.missing]
    sized = [s for s in specs if s.batch_axis is not None and s.shape and s.shape[s.batch_axis] is not None]
    in_use = next((s.shape[s.batch_axis] for s in sized), 1)
    explicit = any(s.given for s in sized)  # an --input-shape already set the batch: keep it
    batch = 1 if not explicit and any(s.batch_axis is not None for s in listed) else in_use
    audio = any(s.rank == 0 and s.name.lower() in _RATE_NAMES for s in specs)
    chosen, parts = {}, []
    for s in listed:
        dims = []
        for i, d in enumerate(s.shape):
            name = s.dims[i] if isinstance(s.dims[i], str) else None
            if i == s.batch_axis:
                dims.append(batch)
            elif d is not None:
                dims.append(d)
            elif name in chosen:
                dims.append(chosen[name])
            else:
                if s.rank == 4 and i >= 2:
                    size = 640
                elif audio and s.rank == 2 and i == 1 and np.issubdtype(s.dtype, np.floating):
                    size = 512
                else:
                    size = 128
                dims.append(size)
                if name:
                    chosen[name] = size
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
    """Rows of the smallest lookup ``name``'s values index (see ``_lookup``), or None."""
    return _lookup(model, name)[0]


def _lookup(model, name: str) -> tuple[int | None, str]:
    """(n, what): the values of input ``name`` index a lookup of n entries, the smallest of: the rows of a
    constant table a Gather reads with them (also behind Cast/Identity/DequantizeLinear, and an
    EmbedLayerNormalization's word/segment table), the depth of a OneHot, the 0..n-1 a one-hot compares them
    with (Equal with a constant arange: jax's one_hot, as magika writes it). The values are followed through
    Cast/Identity/Unsqueeze/Squeeze/Reshape/Flatten/Expand/Transpose/Tile/Slice/Split/Concat and a Gather taking
    them as data. (None, '') when they index nothing."""
    graph = model.graph
    tensors, values = {}, {}
    for t in graph.initializer:
        tensors[t.name] = t
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    tensors[n.output[0]] = a.t
                elif a.name == "value_int":
                    values[n.output[0]] = np.array(a.i, dtype=np.int64)
                elif a.name == "value_ints":
                    values[n.output[0]] = np.array(list(a.ints), dtype=np.int64)
    producers = {o: n for n in graph.node for o in n.output if o}

    def table_rows(x, axis):
        for _ in range(16):  # a table cast, dequantized or renamed keeps its rows
            if x in tensors:
                dims = list(tensors[x].dims)
                return int(dims[axis]) if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0 else None
            p = producers.get(x)
            if p is None or p.op_type not in ("Cast", "CastLike", "Identity", "DequantizeLinear") or not p.input:
                return None
            x = p.input[0]
        return None

    def const_value(x, depth=0):
        """The values of a small constant (through shape-only ops, and a Range of constants), or None."""
        if depth > 16:
            return None
        if x in values:
            return values[x]
        if x in tensors:
            t = tensors[x]
            if int(np.prod(list(t.dims), dtype=np.float64)) > (1 << 16) or t.data_location == 1:
                return None
            try:
                from onnx import numpy_helper
                return numpy_helper.to_array(t)
            except Exception:
                return None
        p = producers.get(x)
        if p is None or not p.input:
            return None
        if p.op_type in ("Cast", "CastLike", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand"):
            return const_value(p.input[0], depth + 1)
        if p.op_type == "Range" and len(p.input) == 3:
            args = [const_value(i, depth + 1) for i in p.input]
            if all(a is not None and a.size == 1 for a in args) and args[2].reshape(-1)[0] != 0:
                start, limit, delta = (a.reshape(-1)[0] for a in args)
                if abs((limit - start) / delta) <= (1 << 16):
                    return np.arange(start, limit, delta)
        return None

    users = {}
    for n in graph.node:
        for i, x in enumerate(n.input):
            if x:
                users.setdefault(x, []).append((n, i))
    found, seen, todo = [], {name}, [name]
    while todo:
        cur = todo.pop()
        for n, i in users.get(cur, ()):
            op = n.op_type
            if op == "Gather" and i == 1 and len(n.input) > 1:
                rows = table_rows(n.input[0], next((a.i for a in n.attribute if a.name == "axis"), 0))
                if rows:
                    found.append((rows, "embedding rows"))
            elif op == "EmbedLayerNormalization" and i in (0, 1) and len(n.input) > (2 if i == 0 else 4):
                rows = table_rows(n.input[2 if i == 0 else 4], 0)
                if rows:
                    found.append((rows, "embedding rows"))
            elif op == "OneHot" and i == 0 and len(n.input) > 1:
                depth = const_value(n.input[1])
                if depth is not None and depth.size == 1 and np.issubdtype(depth.dtype, np.number) \
                        and 0 < float(depth.reshape(-1)[0]) <= (1 << 31):
                    found.append((int(depth.reshape(-1)[0]), "one-hot depth"))
            elif op == "Equal" and len(n.input) == 2:
                other = const_value(n.input[1 - i])
                if other is not None and other.dtype.kind in "iu" and other.size >= 2:
                    levels = np.unique(other)
                    if np.array_equal(levels, np.arange(levels.size)):
                        found.append((int(levels.size), "one-hot depth"))
            elif (op in _PASS_THROUGH_OPS and i == 0) or op == "Concat" or (op == "Gather" and i == 0):
                for o in n.output:
                    if o and o not in seen:
                        seen.add(o)
                        todo.append(o)
    return min(found) if found else (None, "")


def plan_fill(model, specs: list, dist: tuple) -> None:
    """Decide, per input, how synthetic values are drawn (documented in the README's validation section)."""
    kind, a, b = dist
    for s in specs:
        low = s.name.lower()
        if s.dtype == np.bool_:
            s.fill = "zeros (False: nothing padded)" if "pad" in low else "ones (True)"
        elif np.issubdtype(s.dtype, np.integer):
            s.id_range, what = _lookup(model, s.name)
            if "mask" in low:
                s.fill = "zeros (nothing padded)" if "pad" in low else "ones (mask)"
            elif "token_type" in low or "segment" in low:
                s.fill = "zeros (token types)"
            elif "position" in low:
                s.fill = "arange (positions)"
            elif s.rank == 0 and low in _RATE_NAMES:
                s.fill = "16000 (sample rate)"
            elif s.id_range:
                s.fill = f"uniform ids in [0, {s.id_range}) ({what})"
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
