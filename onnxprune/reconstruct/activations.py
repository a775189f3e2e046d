"""Capture layer inputs with ONNX Runtime: a prefix model per request (nodes the tensors depend on, extra graph
outputs), streamed batch by batch over the calibration feeds, starting from a frontier of values already computed."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import numpy as np
import onnx
from onnx import helper

from ..connectivity import node_reads
from ..errors import InputError, OutputError, RequestError, first_line
from ..validate import import_ort, quiet_native_stderr, session_options
from .problems import Unsupported


CARRIED_TYPES = {f"tensor({t})" for t in ("float", "float16", "double", "int8", "int16", "int32", "int64", "uint8",
                                          "uint16", "uint32", "uint64", "bool")}


def _replaced(tensor, values):
    from ..io import write_tensor
    out = onnx.TensorProto()
    out.CopyFrom(tensor)
    write_tensor(out, values)
    return out


def prefix_model(model: onnx.ModelProto, names: list, cut: dict | None = None, overrides: dict | None = None,
                 carry=None, fed=()) -> tuple:
    """(serialised model computing ``names``, the inputs it must be fed, the node positions it runs, the extra
    outputs it computes, the initializers handed to the session: name -> a function giving the values).

    The walk back from ``names`` stops at graph inputs and at the tensors in ``cut`` (name -> an example array),
    which become inputs of the prefix: values already captured need not be recomputed. ``overrides``: constant
    tensor (initializer or Constant node output) name -> the values the prefix uses instead of the stored ones.
    ``carry(name, nodes) -> bool``: which other values the prefix's nodes produce it also returns (those later
    prefixes will start from). ``fed``: initializer name -> a function giving its values, for weights held outside
    the protobuf (a streamed model's mapped weights). Those, and every initializer or override of at least
    ``HANDED`` bytes, are declared as external initializers without values and returned as name -> a function
    giving the array the session is handed (``SessionOptions.add_external_initializers``): large weights are never
    copied into the prefix's protobuf, which then stays far under protobuf's 2 GiB whatever the model's size, and
    the numerics stay those of an initializer (a graph input would be optimised differently)."""
    overrides = overrides or {}
    fed = dict(fed or {})
    cut = cut or {}
    g = model.graph
    producer = {}
    for i, node in enumerate(g.node):
        for o in node.output:
            producer[o] = i
    inits = {t.name for t in g.initializer}
    needed_nodes, stack, seen, cut_used = set(), list(names), set(), []
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in cut and name not in names and name in producer:
            cut_used.append(name)
            continue
        i = producer.get(name)
        if i is None or i in needed_nodes:
            continue
        needed_nodes.add(i)
        stack.extend(node_reads(g.node[i]))
    # a cut value whose producer the prefix runs anyway (another output of a Split, say, is needed) is computed,
    # not fed: a value is defined once
    cut_used = sorted(n for n in cut_used if producer[n] not in needed_nodes)
    used = set(seen)
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.graph.name = g.name
    extra = []
    for i in sorted(needed_nodes):
        node = g.node[i]
        if carry is not None:
            extra.extend(o for o in node.output if o and o not in names and carry(o, needed_nodes))
        if node.op_type == "Constant" and len(node.output) == 1 and node.output[0] in overrides:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            for a in copy.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    a.t.CopyFrom(_replaced(a.t, overrides[node.output[0]]))
            node = copy
        out.graph.node.append(node)
    handed = {}
    for t in g.initializer:
        if t.name not in used or t.name in handed:
            continue
        getter = fed.get(t.name) or _handed(t, overrides.get(t.name))
        if getter is not None:
            out.graph.initializer.append(_placeholder(t))
            handed[t.name] = getter
        else:
            out.graph.initializer.append(_replaced(t, overrides[t.name]) if t.name in overrides else t)
    feeds = [i for i in g.input if i.name in used and i.name not in inits]
    out.graph.input.extend(feeds)
    for n in cut_used:
        arr = cut[n]
        # each dim unnamed: a symbolic name shared between two fed values would tell ONNX Runtime their sizes
        # are equal (it then reuses a buffer of the wrong size: "Shape mismatch attempting to re-use buffer")
        out.graph.input.append(helper.make_tensor_value_info(
            n, helper.np_dtype_to_tensor_dtype(arr.dtype), [None] * arr.ndim))
    out.graph.input.extend(i for i in g.input if i.name in used and i.name in inits)
    out.graph.value_info.extend(v for v in g.value_info if v.name in used and v.name not in cut_used)
    for n in list(names) + extra:
        out.graph.output.append(onnx.ValueInfoProto(name=n))
    return out.SerializeToString(), [i.name for i in feeds] + cut_used, needed_nodes, extra, handed


HANDED = 1 << 24  # initializers from this size on are handed to the prefix sessions, not serialised
_HANDED_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def _handed(tensor, override):
    """A function giving the values of a large float initializer (its override's, cast as ``_replaced`` casts
    them), or None for one the prefix holds itself."""
    if tensor.data_type not in _HANDED_TYPES or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    dims = tuple(int(d) for d in tensor.dims)
    if override is not None:
        if np.size(override) * dtype.itemsize < HANDED:
            return None

        def cast(values=override):
            with np.errstate(over="ignore", invalid="ignore"):
                return np.ascontiguousarray(values, dtype=dtype).reshape(dims)
        return cast
    if not tensor.HasField("raw_data") or len(tensor.raw_data) < HANDED \
            or len(tensor.raw_data) != int(np.prod(dims, dtype=np.int64)) * dtype.itemsize:
        return None
    return lambda: np.frombuffer(tensor.raw_data, dtype=dtype.newbyteorder("<")).reshape(dims)


def _placeholder(tensor) -> onnx.TensorProto:
    """``tensor``'s name, type and shape marked as external data the session is handed from memory."""
    out = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=list(tensor.dims))
    out.data_location = onnx.TensorProto.EXTERNAL
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    size = int(np.prod(list(tensor.dims), dtype=np.int64)) * itemsize
    for key, value in (("location", "onnxprune-fed-by-session"), ("offset", "0"), ("length", str(size))):
        entry = out.external_data.add()
        entry.key, entry.value = key, value
    return out


_ARENA = []  # [whether the process-wide CPU arena for capture sessions is registered], once per process


def _shared_arena(ort) -> bool:
    """Register (once per process) the CPU arena allocator that capture sessions share: grown by what is asked
    (not by powers of two), shrinkable after a run. False where ONNX Runtime refuses (one registered already by
    the host application, an older build): each session then keeps its own arena."""
    if not _ARENA:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            # max_mem 0: unbounded; extend strategy 1: kSameAsRequested; the other two: ORT's defaults
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
            _ARENA.append(True)
        except Exception:  # noqa: BLE001 - any refusal leaves the per-session arenas, which work as well
            _ARENA.append(False)
    return _ARENA[0]


class Capture:
    """A prefix of ``model`` in ONNX Runtime: ``run(feed, j)`` gives {name: array} for calibration batch ``j``
    (graph inputs asked for are passed through; ``frontier`` values stand in for the nodes that computed them).

    With ``advance``, every value the prefix computes that a node not yet run still reads goes to the frontier's
    next state (``Frontier.commit`` makes it current once every batch has run)."""

    def __init__(self, model: onnx.ModelProto, names: list, feeds: list, threads: int = 0,
                 frontier: "Frontier | None" = None, overrides: dict | None = None, advance: bool = False,
                 fed: dict | None = None):
        self.names = list(dict.fromkeys(names))
        self._nfeeds = len(feeds)
        self._shared = False
        graph_inputs = {i.name for i in model.graph.input}
        # a graph input no node produces (checks refuse a value produced twice)
        self.direct = [n for n in self.names if n in graph_inputs]
        # values the frontier holds already are read from it
        self.stored = [n for n in self.names if n not in graph_inputs and frontier is not None and n in frontier]
        self.computed = [n for n in self.names if n not in self.direct and n not in self.stored]
        self.session = None
        self.inputs = []
        self.frontier = frontier
        self.carried = []
        self.kept = []  # the asked-for values the frontier also keeps (a node not yet run reads them)
        self.nodes = set()
        self.advance = bool(advance and frontier is not None)
        self._model, self._fed = model, fed  # (for telling a failed batch's cause: the data's or the cut's)
        fed = fed or {}  # initializer name -> a function giving its values (handed to the session once)
        self._held = []  # the OrtValues the session reads the fed initializers from: alive as long as it is
        if self.computed:
            ort = import_ort()
            carry = frontier.wanted if self.advance else None
            try:
                payload, self.inputs, self.nodes, self.carried, handed = prefix_model(
                    model, self.computed, frontier.examples() if frontier is not None else None, overrides, carry,
                    fed)
            except ValueError as exc:  # protobuf refuses to serialise more than 2 GiB (of tensors under HANDED)
                raise RequestError(f"reconstruction cannot hand this model's prefix to ONNX Runtime "
                                   f"({first_line(exc)}): over 2 GiB of tensors under 16 MB each") from exc
            so = session_options(threads=threads, spin=False)
            # ORT's arena reuses one batch's buffers for the next: without it malloc fragments (a 10 MB model's
            # capture grew 200+ MB in eight batches); the planned block of memory patterns would hold every
            # intermediate of the prefix at once, so that stays off. The dense and the reconstructed model's
            # prefixes run in turn, so they share one arena (magika: 288 -> 253 MiB peak), shrunk after each
            # layer's last batch (a never-shrunk shared arena kept PP-OCRv4 rec's largest prefix: 425 -> 535 MiB)
            so.enable_cpu_mem_arena = True
            so.enable_mem_pattern = False
            self._shared = _shared_arena(ort)
            if self._shared:
                so.add_session_config_entry("session.use_env_allocators", "1")
            if handed:
                arrays = [np.ascontiguousarray(get()) for get in handed.values()]
                self._held = [arrays, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]]
                so.add_external_initializers(list(handed), self._held[1])
            try:
                with quiet_native_stderr():
                    self.session = ort.InferenceSession(payload, so, providers=["CPUExecutionProvider"])
            except Exception as exc:  # that layer keeps plain selection (said per layer); the run goes on
                raise Unsupported(f"ONNX Runtime cannot run the model's prefix up to "
                                  f"{', '.join(self.computed[:3])}: {first_line(exc)}") from exc
            if self.carried:  # sequences, maps, bfloat16/float8 and strings are recomputed, never carried
                kinds = {o.name: o.type for o in self.session.get_outputs()}
                self.carried = [n for n in self.carried if kinds.get(n) in CARRIED_TYPES]
            if self.advance:
                self.kept = [n for n in self.computed if frontier.wanted(n, self.nodes)]
                frontier.begin(self.nodes)
        else:
            self.advance = False

    def run(self, feed: dict, j: int = -1) -> dict:
        cut = self.frontier.batch(j, self.inputs + self.stored) if self.frontier is not None else {}
        missing = [n for n in self.direct + self.inputs if n not in feed and n not in cut]
        if missing:
            raise InputError(f"calibration data has no array for input(s) {', '.join(missing)}")
        out = {n: feed[n] for n in self.direct}
        out.update((n, cut[n]) for n in self.stored)
        if self.session is not None:
            try:
                ro = None
                if self._shared and j == self._nfeeds - 1:  # the layer's last batch: hand the arena's free
                    ro = import_ort().RunOptions()  # chunks back (the next layer's prefixes differ in size)
                    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
                res = self.session.run(self.computed + self.carried,
                                       {k: cut[k] if k in cut else feed[k] for k in self.inputs}, ro)
            except Exception as exc:
                if cut and _runs_from_inputs(self._model, self.computed, feed, self._fed):
                    # the model runs this batch from its inputs: what failed is the prefix we cut (ours, not the
                    # user's); that layer keeps plain selection, said in the report
                    raise Unsupported(f"ONNX Runtime failed running the model's prefix on calibration batch "
                                      f"{j + 1} from captured values (the model runs it from its inputs): "
                                      f"{first_line(exc)}") from exc
                raise InputError(f"reconstruction: ONNX Runtime failed on calibration batch {j + 1}: "
                                 f"{first_line(exc)}") from exc
            k = len(self.computed)
            out.update(zip(self.computed, res[:k]))
            if self.advance:
                values = dict(zip(self.carried, res[k:]))
                values.update((n, out[n]) for n in self.kept)
                self.frontier.put(j, values)
        return out

    def close(self):
        self.session = None
        self._held = []


def _runs_from_inputs(model, names: list, feed: dict, fed) -> bool:
    """Whether the dense model computes ``names`` on ``feed`` from its graph inputs alone (no captured values)."""
    ort = import_ort()
    try:
        payload, inputs, _, _, handed = prefix_model(model, names, None, None, None, fed)
        so = session_options(threads=1, spin=False)
        arrays = [np.ascontiguousarray(get()) for get in handed.values()]
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        if handed:
            so.add_external_initializers(list(handed), values)
        with quiet_native_stderr():
            session = ort.InferenceSession(payload, so, providers=["CPUExecutionProvider"])
            session.run(names, {k: feed[k] for k in inputs})
        return True
    except Exception:  # noqa: BLE001 - any failure: the model itself does not run this batch
        return False


def _write_error(path: str, exc: OSError) -> OutputError:
    return OutputError(f"reconstruction cannot write its temporary file {path}: {first_line(exc)} (set TMPDIR to a "
                       f"place with room for the captured activations)")


class Frontier:
    """The computed values of one model (dense, or partly reconstructed) that a node not yet run still reads, per
    calibration batch: later prefixes start from them, so every node runs once per batch over the whole
    reconstruction. Kept in memory up to ``budget`` bytes, the rest in files of a private temporary directory
    (removed by ``close``), so memory stays bounded whatever the calibration set's size.

    ``readers``: value name -> positions of the main-graph nodes that read it (subgraph outer reads included)."""

    def __init__(self, readers: dict, budget: int):
        self.readers = readers
        self.budget = budget
        self.used = 0
        self.done = set()  # node positions whose outputs are in the frontier (or no longer needed)
        self.values = {}  # name -> [array, or path of its .npy file, per batch]
        self.meta = {}  # name -> an array of its dtype and rank
        self._next = None
        self._nodes = None
        self._dir = None
        self._files = 0

    def wanted(self, name: str, nodes: set) -> bool:
        """A value produced by ``nodes`` (a prefix about to run) that some node outside them and not yet run reads."""
        return any(r not in self.done and r not in nodes for r in self.readers.get(name, ()))

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def examples(self) -> dict:
        return dict(self.meta)

    def batch(self, j: int, names) -> dict:
        out = {}
        for n in names:
            v = self.values.get(n)
            if v is not None:
                a = v[j]
                out[n] = np.load(a) if isinstance(a, str) else a
        return out

    def begin(self, nodes: set) -> None:
        self._discard()
        self._next, self._nodes = {}, set(nodes)

    def _discard(self) -> None:
        """Forget what an advancing prefix computed that was never committed (its layer fell back mid-way)."""
        for per in (self._next or {}).values():
            for a, _, _ in per.values():
                self._free(a)
        self._next = self._nodes = None

    def put(self, j: int, values: dict) -> None:
        for name, arr in values.items():
            arr = np.asarray(arr)
            if self.used + arr.nbytes <= self.budget:
                self.used += arr.nbytes
                keep = arr
            else:
                keep = self._spill(arr)
            self._next.setdefault(name, {})[j] = (keep, arr.dtype, arr.ndim)

    def commit(self, batches: int) -> None:
        """Make what the last advancing prefix computed current, and drop what no node still to run reads."""
        if self._next is None:
            return
        self.done |= self._nodes
        for name, per in self._next.items():
            if len(per) == batches:
                self._drop(name)
                self.values[name] = [per[j][0] for j in range(batches)]
                _, dtype, ndim = per[0]
                self.meta[name] = np.empty((0,) * ndim, dtype)  # what a prefix's input declaration needs
            else:
                for a, _, _ in per.values():
                    self._free(a)
        self._next = self._nodes = None
        for name in [n for n in self.values
                     if all(r in self.done for r in self.readers.get(n, ()))]:
            self._drop(name)

    def invalidate(self, names) -> None:
        """Tensors ``names`` (weights, biases) just changed: when a held value or a node already run read one of
        them (a Gather or an If body reading a weight before its first consumer; a Constant-node weight carried
        as a value), start over from the graph inputs (the next prefix recomputes what it needs)."""
        if any(n in self.values or self.readers.get(n, set()) & self.done for n in names):
            self._discard()
            for name in list(self.values):
                self._drop(name)
            self.done = set()

    def adopt(self, other: "Frontier") -> None:
        """Start from ``other``'s state (an empty frontier of a model that has computed the same values so far):
        its arrays shared, its files hard-linked (copied where linking fails) into this frontier's directory."""
        self.close()
        self.done = set(other.done)
        for name, per in other.values.items():
            kept = []
            for a in per:
                if isinstance(a, str):
                    path = self._new_path()
                    try:
                        os.link(a, path)
                    except OSError:
                        try:
                            shutil.copyfile(a, path)
                        except OSError as exc:
                            raise _write_error(path, exc) from exc
                    kept.append(path)
                else:
                    self.used += a.nbytes
                    kept.append(a)
            self.values[name] = kept
            self.meta[name] = other.meta[name]

    def _new_path(self) -> str:
        if self._dir is None:  # a staging directory: named for this process, removed at exit, and a SIGKILLed
            from ..io import staging  # run's is removed by the next run that spills
            tmp = tempfile.gettempdir()
            staging.clean_stale_staging(tmp)
            try:
                self._dir = staging.make_staging_dir(tmp)
            except OSError as exc:
                raise OutputError(f"reconstruction cannot make its temporary directory in {tmp}: "
                                  f"{first_line(exc)} (set TMPDIR to a writable place)") from exc
        path = os.path.join(self._dir, f"{self._files}.npy")
        self._files += 1
        return path

    def _spill(self, arr: np.ndarray) -> str:
        path = self._new_path()
        try:
            np.save(path, arr, allow_pickle=False)
        except OSError as exc:
            raise _write_error(path, exc) from exc
        return path

    def _free(self, a) -> None:
        if isinstance(a, str):
            with contextlib.suppress(OSError):
                os.unlink(a)
        else:
            self.used -= a.nbytes

    def _drop(self, name: str) -> None:
        for a in self.values.pop(name, ()):
            self._free(a)
        self.meta.pop(name, None)

    def close(self) -> None:
        self._discard()
        self.values.clear()
        self.meta.clear()
        self.used = 0
        if self._dir is not None:
            from ..io import staging
            staging._remove(self._dir)
            self._dir = None
