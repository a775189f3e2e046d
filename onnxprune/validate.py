"""Run the dense and the pruned model in ONNX Runtime on identical inputs and compare them honestly.

Same inputs, same providers, same session options for both; the providers reported are the ones the session
says it runs (``get_providers()``), never what is merely installed. TF32 is off on CUDA so dense and pruned are
compared like for like.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import InputError, RequestError

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


def make_session(path: str, device: str = "auto", quiet: bool = True, threads: int = 0, spin: bool = True):
    """An InferenceSession opened by path (so external data resolves next to the model). ``spin=False`` stops
    idle worker threads from spinning (used where two sessions are timed side by side)."""
    import onnxruntime as ort
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    providers = _provider_list(device, ort.get_available_providers())
    try:
        with quiet_native_stderr(quiet):
            sess = ort.InferenceSession(path, so, providers=providers)
    except Exception as exc:
        raise InputError(f"ONNX Runtime cannot load {os.path.basename(path)}: {str(exc).strip().splitlines()[0][:300]}") from exc
    used = sess.get_providers()
    wanted = {"cuda": CUDA, "tensorrt": TRT}.get(device)
    if wanted and wanted not in used:
        raise RequestError(f"--device {device} asked for, but ONNX Runtime runs on {', '.join(used)} "
                           f"(is onnxruntime-gpu installed with its CUDA/cuDNN libraries?)")
    return sess


@dataclass
class OutputStats:
    name: str
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    cosine: float = 1.0
    nonfinite_dense: int = 0
    nonfinite_pruned: int = 0


@dataclass
class Validation:
    device: str
    providers: list
    data: str
    samples: int
    batches: int
    batch_size: int
    metric: str  # "top1_accuracy" (labels) or "top1_agreement" (no labels)
    dense: float
    pruned: float
    drop: float
    top5_dense: float | None = None
    top5_pruned: float | None = None
    agreement: float | None = None
    outputs: list = field(default_factory=list)
    latency_ms_dense: float | None = None  # median per batch, timed side by side (None: not measured)
    latency_ms_pruned: float | None = None
    max_drop: float | None = None
    passed: bool | None = None
    sparsity: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _classes_axis(out: np.ndarray):
    return 1 if out.ndim >= 2 and out.shape[1] >= 2 else None


def _run_all(sess, batches, progress=None, label=""):
    """Outputs of every batch and the mean latency per batch (after one warm-up run)."""
    if batches:
        sess.run(None, batches[0])
    outs, times = [], []
    for i, feed in enumerate(batches):
        t = time.perf_counter()
        outs.append(sess.run(None, feed))
        times.append(time.perf_counter() - t)
        if progress:
            progress(label, i + 1, len(batches))
    return outs, 1000.0 * float(np.mean(times)) if times else 0.0


def _side_by_side(sess_a, sess_b, batches, rounds: int = 2):
    """Median milliseconds per batch of two sessions timed alternately on the same batches (whichever goes first
    changes every batch), so background noise and the other session's worker threads hit both alike."""
    if not batches:
        return 0.0, 0.0
    sess_a.run(None, batches[0])
    sess_b.run(None, batches[0])
    ta, tb = [], []
    for r in range(rounds):
        for i, feed in enumerate(batches):
            order = ((sess_a, ta), (sess_b, tb)) if (i + r) % 2 == 0 else ((sess_b, tb), (sess_a, ta))
            for sess, acc in order:
                t = time.perf_counter()
                sess.run(None, feed)
                acc.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(ta)), 1000.0 * float(np.median(tb))


class Validator:
    """Runs the dense model once; ``compare(pruned_path)`` runs a pruned model and returns a Validation."""

    LATENCY_BATCHES = 16  # batches timed side by side (dense, pruned alternately) for the latency figures

    def __init__(self, dense_path: str, dataset, device: str = "auto", quiet: bool = True, progress=None):
        self.dataset, self.device, self.quiet, self.progress = dataset, device, quiet, progress
        self.dense_path = dense_path
        sess = make_session(dense_path, device, quiet)
        self.providers = sess.get_providers()
        self.output_names = [o.name for o in sess.get_outputs()]
        self.dense_outs, _ = _run_all(sess, dataset.batches, progress, "dense")
        del sess
        # the dense side of every metric, computed once (a search compares many pruned models with it)
        self._dense_flat = [_flat64([b[k] for b in self.dense_outs]) for k in range(len(self.output_names))]
        self._dense_first = np.concatenate([b[0] for b in self.dense_outs]) if self.dense_outs else np.zeros((0,))
        axis = _classes_axis(self._dense_first)
        self._dense_top1 = np.argmax(self._dense_first, axis=axis) if axis is not None else None
        self._dense_top5 = None
        if axis is not None and dataset.labels is not None and self._dense_first.ndim == 2 \
                and self._dense_first.shape[1] >= 5:
            self._dense_top5 = _top5(self._dense_first, dataset.labels.reshape(self._dense_top1.shape))

    def compare(self, pruned_path: str, max_drop: float | None = None, latency: bool = True) -> Validation:
        """Run the pruned model on the same batches and compare; ``latency=False`` skips the side-by-side
        timing (search and sensitivity probes)."""
        sess = make_session(pruned_path, self.device, self.quiet)
        used = sess.get_providers()
        if used != self.providers:  # never compare across providers
            raise RequestError(f"dense ran on {self.providers} but pruned on {used}")
        pruned_outs, _ = _run_all(sess, self.dataset.batches, self.progress, "pruned")
        del sess
        lat_dense = lat_pruned = None
        if latency:
            # both models side by side in sessions whose idle threads do not spin, or the one timed second pays
            # for the other's spinning threads (±25 % between identical models on 2 cores)
            dense_sess = make_session(self.dense_path, self.device, self.quiet, spin=False)
            pruned_sess = make_session(pruned_path, self.device, self.quiet, spin=False)
            lat_dense, lat_pruned = _side_by_side(dense_sess, pruned_sess, self.dataset.batches[: self.LATENCY_BATCHES],
                                                  rounds=2)
            del dense_sess, pruned_sess
        v = self._metrics(pruned_outs)
        v.latency_ms_dense, v.latency_ms_pruned = lat_dense, lat_pruned
        if max_drop is not None:
            v.max_drop = max_drop
            v.passed = bool(v.drop <= max_drop + 1e-12) and not any(
                o.nonfinite_pruned > o.nonfinite_dense for o in v.outputs)
        return v

    def _metrics(self, pruned_outs) -> Validation:
        ds = self.dataset
        pruned = np.concatenate([b[0] for b in pruned_outs]) if pruned_outs else np.zeros((0,))
        flats = [pruned.reshape(-1).astype(np.float64)] + [_flat64([b[k] for b in pruned_outs])
                                                             for k in range(1, len(self.output_names))]
        stats = [_output_stats(name, self._dense_flat[k], flats[k]) for k, name in enumerate(self.output_names)]
        dense = self._dense_first
        if stats and stats[0].nonfinite_pruned:
            pruned = np.nan_to_num(pruned, nan=-np.inf)
        axis = _classes_axis(dense)
        common = dict(device=self.device, providers=self.providers, data=ds.source, samples=len(dense),
                      batches=len(ds.batches), batch_size=ds.batch_size, outputs=stats)
        if axis is None:  # a regression-style output: agreement is not defined, judge by cosine
            cos = stats[0].cosine if stats else 1.0
            return Validation(metric="output_cosine", dense=1.0, pruned=cos, drop=1.0 - cos, **common)
        top_d = self._dense_top1
        top_p = np.argmax(pruned, axis=axis)
        agreement = float(np.mean(top_d == top_p)) if top_d.size else 1.0
        if ds.labels is not None:
            y = ds.labels.reshape(top_d.shape)
            acc_d, acc_p = float(np.mean(top_d == y)), float(np.mean(top_p == y))
            v = Validation(metric="top1_accuracy", dense=acc_d, pruned=acc_p, drop=acc_d - acc_p,
                           agreement=agreement, **common)
            if self._dense_top5 is not None:
                v.top5_dense, v.top5_pruned = self._dense_top5, _top5(pruned, y)
            return v
        return Validation(metric="top1_agreement", dense=1.0, pruned=agreement, drop=1.0 - agreement,
                          agreement=agreement, **common)


def _flat64(batches) -> np.ndarray:
    """All batches of one output, flattened into one float64 vector."""
    if not batches:
        return np.zeros(0)
    return np.concatenate([np.asarray(b).reshape(-1) for b in batches]).astype(np.float64)


def _output_stats(name, d: np.ndarray, p: np.ndarray) -> OutputStats:
    """Errors and cosine of one output (dense d and pruned p, flat float64), vectorised over the whole output."""
    st = OutputStats(name)
    # a finite sum proves every element finite: the common case costs one reduction, not a boolean pass
    fin_d = np.isfinite(d) if not np.isfinite(d.sum()) else None
    fin_p = np.isfinite(p) if not np.isfinite(p.sum()) else None
    st.nonfinite_dense = 0 if fin_d is None else int(d.size - np.count_nonzero(fin_d))
    st.nonfinite_pruned = 0 if fin_p is None else int(p.size - np.count_nonzero(fin_p))
    if d.size == 0:
        return st
    if st.nonfinite_dense or st.nonfinite_pruned:
        both = (np.isfinite(d) if fin_d is None else fin_d) & (np.isfinite(p) if fin_p is None else fin_p)
        st.max_abs_error = st.max_rel_error = float("inf") if st.nonfinite_pruned > st.nonfinite_dense else 0.0
        st.cosine = 0.0 if st.nonfinite_pruned > st.nonfinite_dense else 1.0
        d, p = d[both], p[both]
        if d.size == 0:
            return st
    diff = np.abs(d - p)
    st.max_abs_error = max(st.max_abs_error, float(diff.max()))
    st.max_rel_error = max(st.max_rel_error, float((diff / (np.abs(d) + 1e-12)).max()))
    nd, npp = float(np.dot(d, d)), float(np.dot(p, p))
    if not (st.nonfinite_pruned > st.nonfinite_dense):
        st.cosine = float(np.dot(d, p) / np.sqrt(nd * npp)) if nd > 0 and npp > 0 else (1.0 if nd == npp else 0.0)
    return st


def _top5(logits: np.ndarray, y: np.ndarray) -> float:
    """Fraction of samples whose label is among the 5 highest logits (fewer than 5 classes score higher)."""
    true = logits[np.arange(len(y)), y]
    return float(np.mean((logits > true[:, None]).sum(axis=1) < 5))
