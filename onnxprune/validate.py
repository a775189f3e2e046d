"""Run the dense and the pruned model in ONNX Runtime on identical inputs and compare them honestly.

Same inputs, same providers, same session options for both; the providers reported are the ones the session
says it runs (``get_providers()``), never what is merely installed. TF32 is off on CUDA so dense and pruned are
compared like for like.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ConfigError, InputError, RequestError, raise_if_interrupted
from .io.staging import deferred_signals
from .compare import class_stats, float_stats, sample_axis
from .metrics import Bounds, OutputStats, classify_outputs, judge, labels_for, plan_gate, severity

log = logging.getLogger("onnxprune")

DEVICES = ("auto", "cuda", "tensorrt", "cpu")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"


@contextlib.contextmanager
def quiet_native_stderr(enabled: bool = True):
    """Silence ONNX Runtime's native stderr (e.g. missing CUDA libraries) while sessions are created."""
    if not enabled:
        yield
        return
    try:
        fd = os.dup(2)
    except OSError:  # no real fd 2 (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
        os.close(devnull)


def _provider_list(device: str, available: list) -> list:
    cuda = (CUDA, {"use_tf32": "0"})
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        return [cuda, CPU]
    if device == "tensorrt":
        return [(TRT, {}), cuda, CPU]
    return [cuda, CPU] if CUDA in available else [CPU]  # auto


def import_ort():
    """onnxruntime, or RequestError (exit 4) explaining a broken install: the CPU and GPU packages installed
    together overwrite each other's files."""
    try:
        from importlib import metadata
        have = {d for d in ("onnxruntime", "onnxruntime-gpu") if _installed(metadata, d)}
    except Exception:  # pragma: no cover - metadata unavailable
        have = set()
    fix = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu (or onnxruntime)"
    if len(have) == 2:
        raise RequestError(f"both onnxruntime and onnxruntime-gpu are installed; they overwrite each other's "
                           f"files. Fix: {fix}")
    try:
        with deferred_signals():  # an interrupt inside the extension's initialisation would look like a broken
            import onnxruntime as ort  # install (ImportError: initialization failed): it is delivered after
        ort.InferenceSession  # noqa: B018 - a half-overwritten install imports but lacks this
    except Exception as exc:
        raise_if_interrupted(exc)
        raise RequestError(f"ONNX Runtime is not usable ({type(exc).__name__}: {str(exc)[:200]}). Fix: {fix}") \
            from None
    return ort


def _installed(metadata, dist: str) -> bool:
    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def ort_cause(exc) -> str:
    """The part of an ONNX Runtime error that says why, in full: its source-location prefix dropped."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    text = re.sub(r"[\w./\\-]+\.(?:cc|h|cpp):\d+\s+(?:[\w:~<>]+\([^()]*\)\s*(?:const\s*)?)?", "", text)
    return text[:1000] or type(exc).__name__


def session_options(quiet: bool = True, threads: int = 0, spin: bool = True):
    """SessionOptions for every session onnxprune opens: ONNX Runtime's own log lines only when not ``quiet``
    (our errors say it all), ``threads`` intra-op threads (0: its default), ``spin=False`` for idle worker threads
    that sleep (where NumPy work or a second session shares the cores)."""
    ort = import_ort()
    so = ort.SessionOptions()
    so.log_severity_level = 4 if quiet else 2
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    return so


def make_session(path: str, device: str = "auto", quiet: bool = True, threads: int = 0, spin: bool = True):
    """An InferenceSession opened by path (so external data resolves next to the model). ``spin=False`` stops
    idle worker threads from spinning (used where two sessions are timed side by side)."""
    ort = import_ort()
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}")
    so = session_options(quiet, threads, spin)
    providers = _provider_list(device, ort.get_available_providers())
    try:
        with quiet_native_stderr(quiet):
            sess = ort.InferenceSession(path, so, providers=providers)
    except Exception as exc:
        raise InputError(f"ONNX Runtime cannot load {os.path.basename(path)}: {ort_cause(exc)} "
                         f"(--no-validate prunes without running it)") from None
    used = sess.get_providers()
    wanted = {"cuda": CUDA, "tensorrt": TRT}.get(device)
    if wanted and wanted not in used:
        raise RequestError(f"--device {device} asked for, but ONNX Runtime runs on {', '.join(used)} "
                           f"(is onnxruntime-gpu installed with its CUDA/cuDNN libraries?)")
    return sess


@dataclass
class Validation:
    device: str
    providers: list
    data: str
    samples: int
    batches: int
    batch_size: int
    metric: str  # the headline: the gated output closest to (or past) its bound
    dense: float
    pruned: float
    drop: float  # how much worse than dense: accuracy/agreement drop, rel_error, 1 - cosine, -snr
    output: str | None = None  # the headline output
    status: str = "ok"
    top5_dense: float | None = None
    top5_pruned: float | None = None
    agreement: float | None = None
    outputs: list = field(default_factory=list)
    collapsed: list = field(default_factory=list)  # names of outputs that collapsed
    gate: dict | None = None  # the bounds set (None: no gate)
    latency_ms_dense: float | None = None  # median per batch, timed side by side (None: not measured)
    latency_ms_pruned: float | None = None
    latency_runs: int | None = None  # batches each model was timed on (the timing has a time budget)
    max_drop: float | None = None
    passed: bool | None = None
    sparsity: float | None = None
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)  # non-finite figures are made JSON-safe once, in Report.to_dict

    def failure(self) -> str:
        """One line naming what failed the gate."""
        bad = [o for o in self.outputs if o.gated and o.passed is False]
        parts = []
        for o in bad:
            if o.collapsed:
                parts.append(f"output '{o.name}' collapsed ({o.collapsed})")
            elif o.unreliable:
                parts.append(f"output '{o.name}': {o.unreliable}")
            else:
                where = f" ({o.part})" if o.part and o.metric in ("rel_error", "cosine", "snr_db") else ""
                parts.append(f"output '{o.name}'{where} {o.metric} {_fmt(o.value)} (dense {_fmt(o.dense_value)}) "
                             f"beyond the bound {o.bound}")
        return "; ".join(parts) or "gate failed"


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason, "passed": None}


def _run_all(sess, batches, progress=None, label=""):
    """Outputs of every batch (after one warm-up run); a run ONNX Runtime refuses is an InputError."""
    try:
        if batches:
            sess.run(None, batches[0])
        outs = []
        for i, feed in enumerate(batches):
            outs.append(sess.run(None, feed))
            if progress:
                progress(label, i + 1, len(batches))
    except Exception as exc:
        raise InputError(f"ONNX Runtime cannot run the {label} model on these inputs: {ort_cause(exc)} "
                         f"(check --data / --input-shape, or --no-validate)") from None
    return outs


LATENCY_BUDGET_S = 5.0  # the side-by-side timing stops after this long (it took 40 s of a 73 s run on YOLOv8n)
LATENCY_MIN_RUNS = 3  # ... but not before each model ran this many times


def _side_by_side(sess_a, sess_b, batches, rounds: int = 2, budget_s: float = LATENCY_BUDGET_S, progress=None):
    """Median milliseconds per batch of two sessions timed alternately on the same batches (whichever goes first
    changes every batch), so background noise and the other session's worker threads hit both alike; at most
    ``budget_s`` seconds once each ran LATENCY_MIN_RUNS times. Returns (dense ms, pruned ms, runs each)."""
    if not batches:
        return 0.0, 0.0, 0
    start = time.perf_counter()
    sess_a.run(None, batches[0])
    sess_b.run(None, batches[0])
    ta, tb = [], []
    total = rounds * len(batches)
    for r in range(rounds):
        for i, feed in enumerate(batches):
            if len(ta) >= LATENCY_MIN_RUNS and time.perf_counter() - start > budget_s:
                break
            order = ((sess_a, ta), (sess_b, tb)) if (i + r) % 2 == 0 else ((sess_b, tb), (sess_a, ta))
            for sess, acc in order:
                t = time.perf_counter()
                sess.run(None, feed)
                acc.append(time.perf_counter() - t)
            if progress:
                progress("latency", len(ta), total)
    return 1000.0 * float(np.median(ta)), 1000.0 * float(np.median(tb)), len(ta)


def _one_at_a_time(make_a, make_b, batches, rounds: int = 2, budget_s: float = LATENCY_BUDGET_S, progress=None):
    """``_side_by_side`` for models too large to hold twice: each session built, timed (half the budget) and
    released before the other. Returns (dense ms, pruned ms, runs of the one that ran fewer times)."""
    if not batches:
        return 0.0, 0.0, 0
    med, runs = [], []
    total = rounds * len(batches)
    for make in (make_a, make_b):
        sess = make()
        start = time.perf_counter()
        sess.run(None, batches[0])
        times = []
        for r in range(rounds):
            for feed in batches:
                if len(times) >= LATENCY_MIN_RUNS and time.perf_counter() - start > budget_s / 2:
                    break
                t = time.perf_counter()
                sess.run(None, feed)
                times.append(time.perf_counter() - t)
                if progress:
                    progress("latency", len(times), total)
        del sess
        med.append(1000.0 * float(np.median(times)))
        runs.append(len(times))
    return med[0], med[1], min(runs)


def _weight_bytes(model) -> int:
    """Bytes of the main graph's initializers, from their dims (external data never read)."""
    from onnx import helper
    total = 0
    for t in model.graph.initializer:
        try:
            item = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except Exception:  # strings and unknown types: count them as 4 bytes a value
            item = 4
        total += int(np.prod(list(t.dims), dtype=np.int64)) * item
    return total


TOGETHER_BYTES = 1 << 30  # models with more weights than this are timed one session at a time (``_one_at_a_time``)


class Validator:
    """Runs the dense model once; ``compare(pruned_path)`` runs a pruned model and compares every output."""

    LATENCY_BATCHES = 16  # batches timed side by side (dense, pruned alternately) for the latency figures

    def __init__(self, dense_path: str, dataset, device: str = "auto", quiet: bool = True, progress=None,
                 model=None, weight_names=None, bounds: Bounds | None = None):
        """``model`` (the dense ModelProto) and ``weight_names`` (its prunable tensors) let outputs no weight
        reaches be told apart; ``bounds`` is the gate (checked against the outputs here: ConfigError)."""
        if not dataset.batches or not dataset.samples:
            raise InputError(f"{dataset.source}: no samples to validate on")
        self.dataset, self.device, self.quiet, self.progress = dataset, device, quiet, progress
        self.dense_path, self.bounds = dense_path, bounds or Bounds()
        # a large model is never held twice: timed one session at a time (ONNX Runtime holds one copy at once)
        self.one_at_a_time = model is not None and _weight_bytes(model) > TOGETHER_BYTES
        sess = make_session(dense_path, device, quiet)
        self.providers = sess.get_providers()
        self.output_names = [o.name for o in sess.get_outputs()]
        self.dense_outs = _run_all(sess, dataset.batches, progress, "dense")
        del sess
        first = {n: np.asarray(self.dense_outs[0][k]) for k, n in enumerate(self.output_names)}
        rows = dataset.batch_sizes[0] if dataset.batch_sizes else None
        self.axes, scalars = {}, set()
        for k, n in enumerate(self.output_names):
            arrays = [np.asarray(b[k]) for b in self.dense_outs]
            self.axes[n] = ax = sample_axis(arrays, dataset.batch_sizes)
            a = arrays[0]
            if a.size <= 1 or (ax is not None and a.shape[ax] and a.size // a.shape[ax] <= 1):
                scalars.add(n)  # one value per sample
        graph = model if model is not None else _outputs_only(self.output_names)
        self.kinds = classify_outputs(graph, (weight_names or ()) if model is not None else None, first, rows,
                                      self.axes)
        blank = self.bounds.blank
        for n, (kind, _) in self.kinds.items():
            if kind == "sequence" and blank is not None and not 0 <= blank < first[n].shape[-1]:
                raise ConfigError(f"--blank {blank} is not a class of output '{n}' ({first[n].shape[-1]} classes)")
        self.labelled = labels_for(self.kinds, self._sample_first(first), dataset.labels, dataset.source,
                                   self.bounds.outputs)
        self.plan = plan_gate(self.kinds, self.labelled, self.bounds, scalars)
        # what the dense outputs alone say about this data: a comparison on them may mean nothing
        unreliable = [st for st in self._metrics(self.dense_outs).outputs if st.unreliable]
        self.notes = [f"output '{st.name}': {st.unreliable}" for st in unreliable]
        bad = [st for st in unreliable if st.name in self.plan]
        if self.bounds.active() and bad:
            raise ConfigError(f"the gate cannot be evaluated on these inputs: output '{bad[0].name}': "
                              f"{bad[0].unreliable}")

    def compare(self, pruned_path: str, latency: bool = True) -> Validation:
        """Run the pruned model on the same batches and compare; ``latency=False`` skips the side-by-side
        timing (search and sensitivity probes)."""
        sess = make_session(pruned_path, self.device, self.quiet)
        used = sess.get_providers()
        if used != self.providers:  # never compare across providers
            raise RequestError(f"dense ran on {self.providers} but pruned on {used}")
        pruned_outs = _run_all(sess, self.dataset.batches, self.progress, "pruned")
        del sess
        lat_dense = lat_pruned = None
        if latency:
            # both models side by side in sessions whose idle threads do not spin, or the one timed second pays
            # for the other's spinning threads (±25 % between identical models on 2 cores)
            batches = self.dataset.batches[: self.LATENCY_BATCHES]
            if self.one_at_a_time:
                lat_dense, lat_pruned, runs = _one_at_a_time(
                    lambda: make_session(self.dense_path, self.device, self.quiet, spin=False),
                    lambda: make_session(pruned_path, self.device, self.quiet, spin=False), batches,
                    progress=self.progress)
            else:
                dense_sess = make_session(self.dense_path, self.device, self.quiet, spin=False)
                pruned_sess = make_session(pruned_path, self.device, self.quiet, spin=False)
                lat_dense, lat_pruned, runs = _side_by_side(dense_sess, pruned_sess, batches, rounds=2,
                                                            progress=self.progress)
                del dense_sess, pruned_sess
        v = self._metrics(pruned_outs)
        v.latency_ms_dense, v.latency_ms_pruned = lat_dense, lat_pruned
        if latency:
            v.latency_runs = runs
        return v

    def _sample_first(self, outs: dict) -> dict:
        """Per-position outputs laid out time-first [T, N, C] turned sample-first [N, T, C]."""
        return {n: np.moveaxis(a, 1, 0) if self.kinds.get(n, ("",))[0] == "sequence" and self.axes.get(n) == 1
                else a for n, a in outs.items()}

    def _metrics(self, pruned_outs) -> Validation:
        ds, stats = self.dataset, []
        for k, name in enumerate(self.output_names):
            kind, why = self.kinds.get(name, ("dense", ""))
            metrics = self.plan.get(name)
            st = OutputStats(name, kind=kind, why=why, gated=name in self.plan,
                             metric=metrics[0] if metrics else None)
            d = [np.asarray(b[k]) for b in self.dense_outs]
            p = [np.asarray(b[k]) for b in pruned_outs]
            st.shape = list(d[0].shape) if d else None
            if kind in ("classification", "sequence", "dense"):
                float_stats(st, d, p, ds.batch_sizes)
                if kind != "dense" and st.collapsed != "shape changed":
                    if kind == "sequence":
                        st.layout = "TNC" if self.axes.get(name) == 1 else "NTC"
                        if st.layout == "TNC":
                            d, p = [np.moveaxis(x, 1, 0) for x in d], [np.moveaxis(x, 1, 0) for x in p]
                    class_stats(st, d, p, ds.labels if name in self.labelled else None, self.bounds.blank)
            elif [x.shape for x in d] != [x.shape for x in p] or any(not np.array_equal(a, b) for a, b in zip(d, p)):
                st.max_abs_error = float("nan")  # an integer output changed: reported, not gated
                st.collapsed = None
                st.why += "; values changed"
            if st.gated:
                judge(st, self.bounds, metrics)
            stats.append(st)
        gated = [s for s in stats if s.gated]
        head = max(gated, key=severity) if gated else None  # the worst gated output speaks for the model
        v = Validation(device=self.device, providers=self.providers, data=ds.source, samples=ds.samples,
                       batches=len(ds.batches), batch_size=ds.batch_size, outputs=stats,
                       metric=head.metric if head else "none", dense=head.dense_value if head else 0.0,
                       pruned=head.value if head else 0.0, drop=head.drop if head else 0.0,
                       output=head.name if head else None, notes=list(ds.notes) + list(getattr(self, "notes", ())),
                       collapsed=[s.name for s in stats if s.collapsed])
        if head is not None and head.kind in ("classification", "sequence"):
            v.agreement = head.top1_agreement
            v.top5_dense, v.top5_pruned = head.top5_accuracy_dense, head.top5_accuracy_pruned
        if self.bounds.active():
            b = self.bounds
            v.gate = {"max_drop": b.max_drop, "max_rel_error": b.max_rel_error, "min_cosine": b.min_cosine,
                      "min_snr_db": b.min_snr, "metric": b.metric, "outputs": list(self.plan)}
            v.max_drop = b.max_drop
            v.passed = all(s.passed for s in gated)
        return v


class _outputs_only:
    """A stand-in model that names outputs only (no graph to trace): every float output may depend on weights."""

    def __init__(self, names):
        from types import SimpleNamespace
        self.graph = SimpleNamespace(node=[], output=[SimpleNamespace(name=n) for n in names])
