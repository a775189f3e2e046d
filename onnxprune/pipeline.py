"""prune(model, config) -> (model, report): the stages in order. No printing, no exit codes."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from . import __version__
from .allocation import ALLOCATIONS, LayerInfo
from .effective import Dense, Weights, connectivity_stage
from .errors import ConfigError, InputError, RequestError
from .graph import find_layers, find_quantized_ops
from .io import LoadedModel, hold, load_model, read_tensor, write_tensor
from .io.mapped import Streamed, Values
from .io.model import STREAM_ABOVE
from .report import LayerReport, Report
from .scores import MagnitudeBuffer
from .selection import Selector

log = logging.getLogger("onnxprune")

from .methods import METHODS  # noqa: E402,F401  (re-exported: the public registry)


@dataclass
class PruneConfig:
    sparsity: float
    method: str = "lamp"
    allocation: str | None = None
    exclude: tuple = ()
    min_keep: str = "0.05%"
    seed: int = 0
    dry_run: bool = False
    only: tuple | None = None  # exact weight names that may be pruned (sensitivity analysis)
    effective: bool = True  # remove detached units after pruning
    target: str = "direct"  # "effective": --sparsity is an effective-sparsity target; "macs": a fraction of the
    # prunable layers' multiply-accumulates per sample (--granularity channel only)
    macs_shapes: dict | None = None  # {input name: [dims]} of the validation batch (the CLI's figures shape)
    channel_floor: float = 0.25  # --channel-floor: every layer keeps at least this fraction of its output channels
    effective_mode: str = "channel"  # "exact": per-position analysis for convolutions
    input_shapes: dict = field(default_factory=dict)  # {input name: [dims]} (--input-shape): sizes exact mode needs
    extra: dict = field(default_factory=dict)
    # Calibrated reconstruction (issue 9): OBS mask under each layer's allocated count, least-squares refit of the
    # kept weights (inputs from the pruned prefix, targets from the dense model), mean/variance correction.
    granularity: str = "weight"  # "channel": whole output channels/neurons (then compacted)
    compact: bool | None = None  # physically delete dead units (None: only with channel granularity)
    align: int = 1  # compacted channel counts stay multiples of this
    reconstruct: bool = False
    calibration: list | None = None  # feed dicts {input name: batched array}; never the evaluation data
    calibration_info: dict = field(default_factory=dict)  # path / samples / sha256, copied into the report
    calibration_labels: object = None  # optional labels of the calibration samples: checked for class balance
    damping: float = 0.03  # lambda = damping * mean(diag H)
    correction: str = "meanvar"  # "meanvar" | "none"
    reconstruct_mask: str = "admm"  # "admm" | "obs" | "plain" (refit the allocation's own selection)
    reconstruct_max_rows: int = 32768  # cap on sample rows per layer (evenly strided; 0: all)
    reconstruct_cache_bytes: int = 1 << 25  # captured values held in memory; the rest wait in temporary files
    progress: object = None  # reconstruction: called with (layer position, layers, name, elapsed s, ETA s or None)
    stream_above: int | None = STREAM_ABOVE  # loading by path: external data of at least this many bytes keeps
    # its prunable weights in the file (io.load_model); None: never

    def resolve(self) -> tuple:
        """(allocation, score) names, checking the combination."""
        if self.reconstruct:
            if not self.calibration:
                raise ConfigError("reconstruction needs calibration data (--calibration, or --data to split)")
            if not all(isinstance(b, dict) and b for b in self.calibration):
                raise ConfigError("calibration must be a list of feed dicts {input name: array}")
            self.reconstruct_options().check()
        if self.granularity not in ("weight", "channel"):
            raise ValueError(f"granularity must be 'weight' or 'channel', got {self.granularity!r}")
        if not isinstance(self.align, int) or not 1 <= self.align <= 1024:
            raise ValueError(f"align must be an integer in [1, 1024], got {self.align!r}")
        if self.granularity == "channel" and self.target == "effective":
            raise ValueError("--granularity channel works with --target direct or macs")
        if self.target == "macs" and self.granularity != "channel":
            raise ValueError("--target macs needs --granularity channel: zeroed weights remove no multiply-accumulates")
        if isinstance(self.channel_floor, bool) or not isinstance(self.channel_floor, (int, float)) \
                or not 0 <= self.channel_floor <= 1:
            raise ValueError(f"channel floor must be a fraction in [0, 1], got {self.channel_floor!r}")
        if not isinstance(self.sparsity, (int, float)) or not math.isfinite(self.sparsity) or not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be a finite number in [0, 1), got {self.sparsity!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        alloc, score, default = METHODS[self.method]
        if self.allocation is not None:
            if alloc is not None:
                raise ValueError(f"--allocation applies to methods that leave it open (random, lap), not {self.method!r}")
            if self.allocation not in ALLOCATIONS:
                raise ValueError(f"unknown allocation {self.allocation!r}; choose from {', '.join(ALLOCATIONS)}")
            alloc = self.allocation
        return alloc or default, score

    def reconstruct_options(self):
        from .reconstruct import ReconstructOptions
        return ReconstructOptions(damping=self.damping, correction=self.correction, mask=self.reconstruct_mask,
                                  max_rows=self.reconstruct_max_rows, cache_bytes=self.reconstruct_cache_bytes)


def parse_min_keep(text, total: int) -> int:
    """'0.05%' -> that percent of all prunable weights (int, as the reference does); '715' -> 715."""
    s = str(text).strip()
    try:
        if s.endswith("%"):
            pct = float(s[:-1])
            if not math.isfinite(pct) or not 0 <= pct <= 100:
                raise ValueError
            return int(total * pct / 100.0)
        if len(s) > 19:  # more than any model's weight count; keeps int64 arithmetic exact
            raise ValueError
        value = int(s)
        if value < 0:
            raise ValueError
        return value
    except ValueError:
        raise ValueError(f"--min-keep must be a count (e.g. 715) or a percent in [0, 100] of all prunable weights "
                         f"(e.g. 0.05%), "
                         f"got {text!r}") from None


def prune(model_or_path, sparsity: float, method: str = "lamp", **options):
    """Prune a model to an exact global sparsity.

    ``model_or_path`` is a path or an ``onnx.ModelProto`` (copied, never modified). Options: allocation, exclude,
    min_keep, seed, dry_run, and for calibrated reconstruction ``reconstruct=True`` with ``calibration`` (a list of
    feed dicts {input name: batched array}, disjoint from any evaluation data), optionally ``calibration_info``,
    ``calibration_labels``, ``damping``, ``correction``, ``reconstruct_mask``, ``reconstruct_max_rows``,
    ``reconstruct_cache_bytes``, ``progress``.
    Returns ``(pruned ModelProto, Report)``.
    """
    config = PruneConfig(sparsity=sparsity, method=method, **options)
    if isinstance(model_or_path, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model_or_path)
        loaded = LoadedModel(model=copy)
        from .io import check_structure
        check_structure(copy)
    else:
        loaded = load_model(str(model_or_path), config.stream_above)
    report = prune_loaded(loaded, config)
    return loaded.model, report


def prune_loaded(loaded: LoadedModel, config: PruneConfig, defer_writes: bool = False) -> Report:
    """Prune ``loaded.model`` in place according to ``config`` and describe what was done.

    ``defer_writes``: large pruned weights stay in ``loaded.pending`` (``io.stage_model`` writes them straight
    into the file) instead of being copied into the protobuf; ``loaded.materialize()`` puts them there."""
    report, layers = _prune(loaded, config)
    _compact(loaded, layers, config, report)  # after _prune's arrays are freed: it reads the stored weights
    if not defer_writes:
        loaded.materialize()
    return report


def _prune(loaded: LoadedModel, config: PruneConfig):
    t0 = time.perf_counter()
    alloc_name, score_name = config.resolve()
    model = loaded.model
    report = Report(version=__version__, method=config.method, allocation=alloc_name, score=score_name,
                    target_sparsity=float(config.sparsity), dry_run=config.dry_run, input=loaded.path,
                    options={"exclude": list(config.exclude), "min_keep": config.min_keep, "seed": config.seed,
                             **config.extra})
    quantized = find_quantized_ops(model)
    if quantized:
        raise RequestError(f"quantized model ({', '.join(quantized)}): pruning quantized weights is not supported "
                           f"yet; prune the float model before quantizing it")
    layers, warnings = find_layers(model, config.exclude, config.only)
    report.warnings.extend(warnings)
    for w in warnings:
        log.warning(w)
    active = [l for l in layers if not l.excluded]
    if not active and config.sparsity > 0:
        what = "every prunable layer is excluded" if layers else "no prunable weights (Conv, ConvTranspose, Gemm, MatMul with a constant operand)"
        raise RequestError(f"nothing to prune: {what}")

    # mapped weights (a streamed model) are read through it one layer at a time
    values, rows = Values(residency=loaded.mapper.residency if loaded.mapper is not None else None), []
    scratch = MagnitudeBuffer()  # reused buffers for every pass over a layer (no fresh pages per layer)
    raw, loaded.raw = loaded.raw, {}  # the bytes the load checks read: stale once anything is written
    for layer in layers:
        held = loaded.pending.get(layer.tensor.name) if layer.main_initializer else None
        if isinstance(held, Streamed) and held.kept is None:
            values.append(held.source)
            w = held.source.view()
        else:
            w = read_tensor(layer.tensor, raw.pop(layer.tensor.name, None) if layer.main_initializer else None)
            values.append(w)
        if not _all_finite(w):
            bad = int(w.size - np.count_nonzero(np.isfinite(w)))
            raise InputError(f"tensor '{layer.name}' holds {bad} NaN/Inf value(s); refusing to prune it")
        zeros = int(np.count_nonzero(np.equal(w, 0, out=scratch.bools(w.size).reshape(w.shape))))
        rows.append(LayerReport(name=layer.name, op=layer.op, shape=list(layer.shape), dtype=layer.dtype,
                                kind=layer.kind, graph=layer.graph, consumers=[c.node for c in layer.consumers],
                                params=int(w.size), zeros_before=zeros, zeros_after=zeros, excluded=layer.excluded))
    report.layers = rows
    if loaded.mapper is not None:
        report.options["streamed"] = {"tensors": loaded.mapper.tensors, "bytes": loaded.mapper.bytes,
                                      "stream_above": config.stream_above}
    t1 = time.perf_counter()

    idx = [i for i, l in enumerate(layers) if not l.excluded]
    total = sum(rows[i].params for i in idx)
    zeros = sum(rows[i].zeros_before for i in idx)
    report.options["min_keep_count"] = parse_min_keep(config.min_keep, total)
    report.options["target"] = config.target
    infos = [LayerInfo(size=rows[i].params, zeros=rows[i].zeros_before, shape=tuple(layers[i].shape),
                       is_conv=any(c.op in ("Conv", "ConvTranspose") for c in layers[i].consumers)) for i in idx]
    sel = Selector(model, layers, values, idx, infos, alloc_name, score_name, config, report, scratch)
    target = int(round(config.sparsity * total))
    if config.target == "effective" and idx:
        target = sel.effective_target(target, zeros)
    report.target_pruned = target
    if idx and zeros > target and config.target != "macs":  # MACs count dense: existing zeros remove none
        report.already_sparser = True
        msg = (f"model is already {zeros / total:.4%} sparse, above the {config.sparsity:.4%} asked for; "
               f"nothing more pruned")
        report.warnings.append(msg)
        log.warning(msg)
    kept = {}  # layer index -> packed non-zero flags after selection (the tensor is written once, after removal)
    if config.granularity == "channel":
        counts = None
        t2 = time.perf_counter()
        _channel_masks(model, layers, values, idx, rows, kept, alloc_name, config, report, loaded.pending)
    else:
        counts, hints = sel.allocate(target)
        t2 = time.perf_counter()
        for k, i, pruned in sel.masks(counts, hints):
            rows[i].zeros_after = int(counts[k])
            keep = np.logical_not(pruned, out=pruned)
            if not (score_name == "magnitude" and counts[k] >= rows[i].zeros_before):
                # zeros score lowest under magnitude, so pruning at least as many covers them all; other scores
                # may tie a zero with a live weight: keep only the non-zeros
                np.logical_and(keep, np.not_equal(values[i], 0).reshape(-1), out=keep)
            kept[i] = np.packbits(keep)
    t3 = time.perf_counter()
    report.timings.update({"analyse": t1 - t0, "allocate": t2 - t1, "apply": t3 - t2})
    dense = Dense(layers, values)  # the weights before pruning: which outputs depended on the inputs (A)
    if config.reconstruct and idx:
        for i in idx:  # refit layers get new values: keep where the dense ones were non-zero (a bit each)
            dense.before[i] = np.packbits(np.not_equal(values[i], 0).reshape(-1)) if rows[i].zeros_before else None
        if counts is None:  # whole channels: the plan's zeros stay where they are, the rest is refit around them
            counts = [rows[i].zeros_after for i in idx]
        _reconstruct(model, layers, values, idx, counts, kept, config, report)
        t3 = time.perf_counter()
        report.timings["reconstruct"] = report.reconstruction["time_s"]
    weights = Weights(layers, values, kept, sel.buffer)
    written = set()

    def store(layer, w, owned=False):
        """A layer's new values: held in ``loaded.pending`` where possible, else written into the protobuf."""
        if not (layer.main_initializer and hold(loaded.pending, layer.tensor, w, owned)):
            write_tensor(layer.tensor, w)

    def flush():
        """Store every pruned layer not stored yet (a mapped one as its source and keep flags: saving writes it
        block by block)."""
        for i in kept:
            if i not in written and not config.dry_run:
                source = values.source(i)
                if source is not None:
                    loaded.pending[layers[i].tensor.name] = Streamed(source, kept[i])
                else:
                    store(layers[i], weights.masked(i, fresh=True), owned=True)
                written.add(i)

    position = {id(l): i for i, l in enumerate(layers)}

    def write_removed(layer, w):
        """Removal's new values of a layer: stored, and never overwritten by ``flush`` (a later removal pass may
        flush before its probe). Removal only zeroes weights, so a mapped layer keeps its source with the flags
        of what is left."""
        i = position[id(layer)]
        source = values.source(i)
        if source is not None:
            loaded.pending[layer.tensor.name] = Streamed(source, np.packbits(np.not_equal(w, 0).reshape(-1)))
        else:
            store(layer, w, owned=True)
        written.add(i)

    connectivity_stage(model, layers, rows, weights, config, report, sel.shapes, flush, write_removed, loaded.pending,
                  dense)
    t4 = time.perf_counter()
    flush()
    report.timings["connectivity"] = t4 - t3
    report.timings["write"] = time.perf_counter() - t4
    return report, layers


def _all_finite(w: np.ndarray) -> bool:
    """No NaN/Inf in ``w``: one summing pass (NaN and Inf survive a sum); only a sum that overflows (or a real
    NaN/Inf) pays for the element-wise test."""
    with np.errstate(over="ignore", invalid="ignore"):
        if w.size == 0 or np.isfinite(np.add.reduce(w.reshape(-1))):
            return True
    return bool(np.isfinite(w).all())


CHANNEL_TOLERANCE = 0.02  # channel pruning lands within this of the asked sparsity, else it says so


def _channel_masks(model, layers, values, idx, rows, kept, alloc_name, config, report, loaded_pending=None):
    """Whole output channels, removed with every weight that reads them: chosen by what their consumers lose on
    the calibration data with --reconstruct (which then refits the consumers), else by their weights' norms."""
    from .channels import channel_plan
    if alloc_name not in ("lamp", "global", "uniform", "erk"):
        raise ConfigError(f"--granularity channel allocates with lamp, global, uniform or erk, not {alloc_name!r}")
    active = [layers[i] for i in idx]
    label_scores = None
    if config.reconstruct:  # channels chosen by what their consumers lose on the calibration data
        from functools import partial
        from .channel_scores import calibrated_label_scores
        from .io.mapped import Streamed
        fed = {n: v.source.view for n, v in (loaded_pending or {}).items() if isinstance(v, Streamed)}
        label_scores = partial(calibrated_label_scores, model, values={layers[i].name: values[i] for i in idx},
                               calibration=config.calibration, fed=fed)
    try:
        plan = channel_plan(model, active, [values[i] for i in idx], config.sparsity, alloc_name, config.align,
                            floor=config.channel_floor, target="macs" if config.target == "macs" else "params",
                            input_shapes={**(config.macs_shapes or {}), **config.input_shapes} or None,
                            label_scores=label_scores, pending=loaded_pending)
    except ValueError as exc:  # --target macs at shapes it cannot size
        raise ConfigError(str(exc)) from None
    report.options["channel_plan"] = plan.to_dict()
    wanted = plan.target_macs if plan.target == "macs" else plan.target_zeros - plan.zeros_before
    if wanted > 0 and not plan.groups_removed:
        raise RequestError(f"--granularity channel cannot remove any channel of this model: {plan.why_short()}; "
                           f"--granularity weight prunes these layers weight by weight")
    what = "of the MACs removed" if plan.target == "macs" else "sparsity"
    if abs(plan.achieved - config.sparsity) > CHANNEL_TOLERANCE:
        if plan.achieved < config.sparsity:
            msg = (f"--granularity channel reached {plan.achieved:.2%} {what}, short of the {config.sparsity:.2%} "
                   f"asked for: {plan.why_short()}")
        else:
            msg = (f"--granularity channel reached {plan.achieved:.2%} {what}, above the {config.sparsity:.2%} "
                   f"asked for: channels go whole" + (f", in aligned blocks of {config.align}" if config.align > 1
                                                        else "") + ", and the last removed overshoots")
        report.warnings.append(msg)
        log.warning(msg)
    elif plan.floored:  # on target, but some layers would have lost more: say which the floor kept
        names = ", ".join(plan.floored[:4]) + (f" and {len(plan.floored) - 4} more" if len(plan.floored) > 4 else "")
        log.info(f"channel floor ({plan.floor:.0%} of each layer's channels) kept: {names}")
    macs = plan.macs_removed_fraction
    if plan.target == "params" and macs is not None and macs > config.sparsity + 0.25:
        msg = (f"--granularity channel removed {macs:.2%} of the prunable layers' MACs for {plan.sparsity:.2%} of "
               f"their weights (cheap-looking channels carry much of the compute); --target macs sizes the "
               f"pruning by compute")
        report.warnings.append(msg)
        log.warning(msg)
    for i in idx:
        m = plan.masks.get(layers[i].name)
        if m is not None:
            nz = values[i] != 0
            rows[i].zeros_after = int(np.count_nonzero(~nz | m))
            kept[i] = np.packbits((nz & ~m).reshape(-1))


def _compact(loaded, layers, config, report):
    """Delete dead units (--compact or channel granularity); otherwise report what that would remove."""
    from .compact import compact, compact_loaded
    t = time.perf_counter()
    do = config.compact if config.compact is not None else config.granularity == "channel"
    if do and not config.dry_run:
        result = compact_loaded(loaded, layers, config.align)
        report.compaction = {"applied": True, **result.to_dict()}
    else:
        result = compact(loaded.model, layers, config.align, apply_changes=False, pending=loaded.pending)
        report.compaction = {"applied": False, **result.to_dict()}
    report.timings["compact"] = time.perf_counter() - t


def _reconstruct(model, layers, values, idx, counts, kept, config, report):
    """Calibrated reconstruction of every active layer; replaces ``values`` / ``kept`` of the layers it refits and
    writes the biases it changed (unless a dry run)."""
    from .reconstruct import reconstruct
    options = config.reconstruct_options()
    if config.granularity == "channel":
        options = replace(options, mask="plain")  # the channel plan's zeros, not a new support
    out = reconstruct(model, layers, values, idx, counts, kept, config.calibration, options, config.progress)
    for i, new in out.values.items():
        values[i] = new  # an array, or for a streamed model a mapped Source (refit weights moved to a file)
        kept[i] = np.packbits(np.not_equal(values[i], 0).reshape(-1))
    if not config.dry_run:
        from .reconstruct.problems import Graph
        graph = Graph(model)
        for name, stored in out.biases.items():
            write_tensor(graph.stored(name), stored)
    report.warnings.extend(out.warnings)
    balance = _label_balance(config.calibration_labels)
    if balance:
        report.warnings.append(balance)
        log.warning(balance)
    # the sample count is the data reader's (it knows each input's batch axis); for API callers without it, the
    # leading dimension of each batch's first input
    samples = config.calibration_info.get("samples")
    if samples is None:
        firsts = [next(iter(feed.values()), None) for feed in config.calibration]
        samples = sum(int(f.shape[0]) if getattr(f, "ndim", 0) else 1 for f in firsts)
    report.reconstruction = {"calibration": dict(config.calibration_info), "samples": samples, **out.info,
                             "biases_changed": sorted(out.biases)}
    report.options["reconstruct"] = True


def _label_balance(labels) -> str | None:
    """A warning when the calibration labels look unbalanced (the calibration set matters as much as the solver)."""
    if labels is None:
        return None
    y = np.asarray(labels).reshape(-1)
    if y.size == 0:
        return None
    _, counts = np.unique(y, return_counts=True)
    if len(counts) == 1:
        return f"calibration samples all have one label ({y[0]!r}); use samples from every class"
    if counts.max() > 3 * counts.min() or counts.max() > 2 * y.size / len(counts):
        return (f"calibration labels look unbalanced ({len(counts)} classes, {counts.min()} to {counts.max()} "
                f"samples each); a class-balanced calibration set reconstructs better")
    return None
