"""The reconstruction loop: layers in graph order, each solved on inputs captured from the partly reconstructed
model (targets from the dense one), written back before the next layer's inputs are captured."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..connectivity import node_reads
from ..errors import InputError, first_line
from ..io.mapped import Source, spill
from ..select import layout_perm, prune_mask
from .activations import Capture, Frontier
from .moments import Moments, accumulate, dense_output, row_moments
from .problems import Graph, Unsupported, build_sites, cast_finite, other_readers, stored_finite
from .solver import Group, admm_support
from .wide import LayerRows, by_blocks, solve_wide

log = logging.getLogger("onnxprune")

CORRECTIONS = ("meanvar", "none")
MASKS = ("admm", "obs", "plain")
HOLDOUT_DAMPING = (1, 10, 100)  # damping factors a layer with few sample rows tries on held-out rows (moments)
HOLDOUT_FOLDS = 4  # ... by cross-validation over this many folds of its rows


@dataclass
class ReconstructOptions:
    damping: float = 0.03  # lambda = damping * mean(diag H)
    correction: str = "meanvar"  # "meanvar": mean and variance together | "none"
    mask: str = "admm"  # "admm": ALPS-like ADMM support | "obs": one-shot OBS saliency layer-wide |
    #                     "plain": keep the allocation's selection
    max_inputs: int = 16384  # layers with more inputs per output row fall back to plain selection
    admm_cost: float = 5e8  # ADMM where groups * out * d^2 stays below this, the one-shot OBS mask above
    admm_max_inputs: int = 1024  # ... and where d stays below this (its eigendecomposition is O(d^3))
    admm_fast_cost: float = 5e7  # above this cost ADMM's penalty grows faster (MiniLM -18 % time, same error;
    #                               small layers keep the slower schedule, which is cheap and a little better there)
    max_rows: int = 32768  # cap on sample rows per layer, evenly strided (0: all; Conv rows are N * positions)
    rows_per_input: int = 16  # ... and per input of a group: at most max(min_rows / groups, 16 p) rows for p
    min_rows: int = 16384  #     inputs (depthwise layers of real exports had 32768 rows for 26 inputs; 0: no cap)
    wide_inputs: int = 2048  # layers over admm_max_inputs and up to this wide get at least 4 p rows, wider ones 2 p
    wide_max_rows: int = 2048  # the cap for layers wider than admm_max_inputs, whose p x p solves dominate (the
    #                            30 M benchmark model: 36 s with 8192 rows, 28-31 s with 4096, 20-24 s with 2048,
    #                            where the Woodbury route applies from 4096 inputs; damping keeps H solvable)
    threads: int = 0  # ONNX Runtime intra-op threads (0: its default)
    cache_bytes: int = 1 << 25  # captured values held in memory (both frontiers together); the rest wait in files

    def check(self):
        from ..errors import ConfigError
        if not (isinstance(self.damping, (int, float)) and np.isfinite(self.damping) and self.damping > 0):
            raise ConfigError(f"damping must be a positive number, got {self.damping!r}")
        if self.correction not in CORRECTIONS:
            raise ConfigError(f"correction must be one of {', '.join(CORRECTIONS)}, got {self.correction!r}")
        if self.mask not in MASKS:
            raise ConfigError(f"reconstruction mask must be one of {', '.join(MASKS)}, got {self.mask!r}")


@dataclass
class Outcome:
    values: dict = field(default_factory=dict)  # layer index -> refit weights (storage dtype, zeros where pruned)
    biases: dict = field(default_factory=dict)  # tensor name -> new stored values (bias, Add constant, BN mean)
    info: dict = field(default_factory=dict)  # the report's "reconstruction" block
    warnings: list = field(default_factory=list)


def _trim_heap() -> None:
    """Hand freed heap back to the OS after each layer (its temporaries would otherwise add up)."""
    from ..io import trim_heap
    trim_heap()


def _rows_of(out, bias, sites, R) -> np.ndarray:
    """A solved layer (storage weights, stored bias or None) as rows [g, og, d + 1] [W | b] of the problem."""
    site = sites[0]
    g, og, d = site.index.shape
    rows = np.zeros((g, og, d + 1))
    rows[:, :, :d] = out.reshape(-1).astype(np.float64)[site.index] * site.scale
    if site.bias is not None:
        rows[:, :, d] = (site.bias.output(bias) if bias is not None else site.bias.dense).reshape(g, og)
    return rows


def _held_out_error(mom: Moments, rows: np.ndarray) -> float:
    """E||W~ x~_d - W^ x~_p||^2 summed over groups and outputs, on the moments ``mom``."""
    quad = float(np.sum((rows @ mom.H) * rows))  # a matrix product: a three-operand einsum loops in C, unblocked
    e = np.sum(mom.ysq) - 2 * np.einsum("gpo,gop->", mom.GW, rows) + quad
    return max(float(e), 0.0)


def _holdout(layer, w, sites, mom, R, Wt, n_prune, plain_pruned, options):
    """A layer (up to moments.HOLDOUT_MAX_INPUTS wide) with fewer sample rows than moments.HOLDOUT_BELOW x inputs
    can fit its calibration rows better than it predicts new ones. It picks plain selection or a refit at damping
    x1, x10, x100 by HOLDOUT_FOLDS-fold cross-validation: each fold of rows (every HOLDOUT_FOLDS-th) is predicted
    by a fit on the others, and the candidates are scored on all rows so predicted. (One split was a coin toss:
    magika's last Dense, 64 rows for 513 inputs, chose plain selection on 16 held-out rows, 0.118 against x100's
    0.121, where on 1,000 new files x100 gives a model error of 0.343 against plain's 0.365; four folds choose
    x100, 0.163 against 0.173.) Returns (damping factor or None for plain selection, report fields)."""
    xd, xp = mom.held
    m = xd.shape[1]
    plain = _rows_of(np.where(plain_pruned.reshape(w.shape), 0, w), None, sites, R)
    errors = dict.fromkeys(["plain"] + [f"x{f}" for f in HOLDOUT_DAMPING], 0.0)
    energy = 0.0
    for fold in range(HOLDOUT_FOLDS):
        val = np.arange(m) % HOLDOUT_FOLDS == fold
        fit, test = row_moments(xd[:, ~val], xp[:, ~val], Wt), row_moments(xd[:, val], xp[:, val], Wt)
        n = int(val.sum())  # the moments are averages over the fold's rows: weigh each fold by its rows
        energy += float(np.sum(test.ysq)) * n
        errors["plain"] += _held_out_error(test, plain) * n
        for factor in HOLDOUT_DAMPING:
            trial = Moments(fit.H.copy(), fit.GW, fit.ymean, fit.ysq, fit.rows,  # a Group damps H and centres X
                            None if fit.X is None else [x.copy() for x in fit.X])  # in place: each trial its own
            out, bias, _ = _solve(layer, w, sites, trial, R, n_prune, plain_pruned,
                                  replace(options, damping=options.damping * factor))
            errors[f"x{factor}"] += _held_out_error(test, _rows_of(out, bias, sites, R)) * n
    scores = {k: v / max(energy, 1e-300) for k, v in errors.items()}
    best = min(scores, key=scores.get)
    fields = {"held_out": {"rows": m, "folds": HOLDOUT_FOLDS, "rel_error": scores, "chosen": best}}
    return (None if best == "plain" else int(best[1:])), fields


def reconstruct(model, layers, values, idx, counts, kept, calibration, options: ReconstructOptions,
                progress=None) -> Outcome:
    """Reconstruct the active layers ``idx`` (positions into ``layers``/``values``) of ``model``.

    ``counts[k]``: zeros layer ``idx[k]`` ends with (the allocation's count, existing zeros included); ``kept``:
    layer index -> packed non-zero flags of the plain selection (layers absent gained no zeros). ``model`` is
    only read: the partly reconstructed model is a private copy. Returns the refit weights and biases to write.
    ``progress(k, n, name, elapsed_s, eta_s)``: called before each layer solved (ETA None for the first 2 s and
    5 % of the expected work).
    """
    options.check()
    t0 = time.perf_counter()
    res = Outcome()
    # The partly reconstructed model is ``model`` with these tensors replaced (values in the storage dtype): the
    # prefixes handed to ONNX Runtime substitute them, so no second copy of the model is ever made.
    graph = Graph(model)
    # Captures chain: each model (dense, partly reconstructed) keeps a frontier of the values its nodes already
    # computed that nodes still to run read; each layer's prefix starts there and advances it, so over the whole
    # reconstruction every node runs about once per calibration batch and no session ever holds the whole model.
    readers = {}
    for j, node in enumerate(model.graph.node):
        for name in node_reads(node):
            readers.setdefault(name, set()).add(j)
    dense_front = Frontier(readers, options.cache_bytes // 2)
    front = Frontier(readers, options.cache_bytes // 2)
    try:
        return _reconstruct(model, layers, values, idx, counts, kept, calibration, options, graph, dense_front,
                            front, res, t0, progress)
    finally:
        try:
            dense_front.close()
        finally:
            front.close()


def _peak_rss() -> int | None:
    """The process's peak resident memory so far (ONNX Runtime's sessions included), or None where unknown."""
    try:
        import resource
        import sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if sys.platform == "darwin" else 1024)
    except (ImportError, OSError, ValueError):
        return None


def _work(layer) -> float:
    """A layer's expected share of the time (outputs x inputs^2: its moments and its refit), for the ETA."""
    shape = layer.shape
    axis = layer.layout.out_axis
    # a 1-D weight (x @ v with v[K]) has no output axis: it is one output row of K inputs
    out = max(int(shape[axis]) if shape and axis is not None else 1, 1)
    return float(layer.size) * (layer.size / out)


def _reconstruct(model, layers, values, idx, counts, kept, calibration, options, graph, dense_front, front, res,
                 t0, progress):
    overrides = {}
    # a streamed model (io.mapped): its mapped weights and every refit weight are fed to the prefixes as inputs
    # (never copied into a protobuf), and refit weights go to unnamed temporary files (memory stays near a layer)
    sources = {layers[i].tensor.name: values.source(i) for i in range(len(layers))
               if getattr(values, "source", None) and values.source(i) is not None and layers[i].main_initializer}
    residency = getattr(values, "residency", None) if sources else None

    def dense_fed():
        return {n: src.view for n, src in sources.items()}

    def current_fed():
        fed = dense_fed()
        fed.update((n, v.view if isinstance(v, Source) else (lambda v=v: v))
                   for n, v in overrides.items() if n in sources)
        return fed

    def held(i, arr):
        """What the reconstructed model keeps of layer ``i``'s new values: mapped from a file when streamed."""
        if residency is not None and layers[i].tensor.name in sources:
            return spill(arr, residency)
        return arr

    changed = False
    seeded = False  # the reconstructed model's frontier taken over from the dense one at the first change
    records = []
    underdetermined = []
    zeros = [int(values[i].size - np.count_nonzero(values[i])) for i in idx]
    first = next((k for k in range(len(idx)) if int(counts[k]) > zeros[k]), len(idx))
    # from the first layer that gains zeros on, every layer is solved
    work = {k: _work(layers[idx[k]]) for k in range(first, len(idx))}
    total_work, done_work = sum(work.values()) or 1.0, 0.0
    def plain_mask(i):
        if i in kept:
            return ~np.unpackbits(kept[i], count=values[i].size).view(bool)
        return values[i].reshape(-1) == 0

    # a weight also read outside its layer (a tied embedding's Gather), or read inside an If/Loop/Scan body, keeps
    # plain selection, and every capture sees it pruned from the start: the layers before its own position fit
    # the values the pruned model's Gather (or branch) gives
    shared, preset = {}, set()
    for k, i in enumerate(idx):
        layer = layers[i]
        if layer.graph:
            continue
        others = other_readers(graph, layer)
        if others:
            shared[i] = others
        if (others or any(c.graph for c in layer.consumers)) and int(counts[k]) > zeros[k] \
                and graph.stored(layer.name) is not None:
            w = values[i]
            overrides[layer.name] = held(i, np.where(plain_mask(i).reshape(w.shape), np.zeros((), w.dtype), w))
            preset.add(i)
            changed = True
    if changed:  # from the first layer on, inputs differ from the dense model's: every layer is solved
        first = 0
        work = {k: _work(layers[idx[k]]) for k in range(len(idx))}
        total_work = sum(work.values()) or 1.0
    for k, i in enumerate(idx):
        layer = layers[i]
        w = values[i]
        n_prune = int(counts[k])
        zeros_before = zeros[k]
        gains = n_prune > zeros_before
        if not gains and not changed:
            continue
        if changed and not seeded:
            # until the first change the two models computed the same values: the reconstructed model starts
            # from the dense frontier (not from the graph inputs), less what read a weight changed since
            front.adopt(dense_front)
            front.invalidate(list(overrides))
            seeded = True
        t = time.perf_counter()
        if progress is not None:
            elapsed = t - t0
            # an estimate once there is something to extrapolate from (early layers are mostly session starts)
            eta = elapsed * (total_work - done_work) / done_work \
                if elapsed >= 2 and done_work >= 0.05 * total_work else None
            progress(k - first + 1, len(idx) - first, layer.name, elapsed, eta)
        done_work += work.get(k, 0.0)
        plain_pruned = plain_mask(i)
        rec = {"name": layer.name, "op": layer.op, "params": int(w.size), "pruned": n_prune}
        try:
            if w.dtype.kind != "f" or w.dtype.itemsize < 2 or str(w.dtype) == "bfloat16":
                raise Unsupported(f"{w.dtype} weights are not reconstructed")
            if i in shared:
                raise Unsupported(f"also read by {', '.join(shared[i][:3])}: a refit for its {layer.op} reader(s) "
                                  f"would change, unseen, what that reader gives")
            sites = build_sites(graph, layer, tuple(w.shape))
            index = sites[0].index
            g, og, d = index.shape
            if d > options.max_inputs:
                raise Unsupported(f"{d} inputs per output row > {options.max_inputs}: H would not fit")
            names = [s.act for s in sites]
            mask_used = _mask_for(options, g, og, d)
            blocks = by_blocks(g, og, d, sites, mask_used)  # rows built a block at a time, never [out, p] at once
            # the dense outputs read from the model (no dense im2col) once the pruned prefix differs
            output = dense_output(sites[0], blocks) if changed and len(sites) == 1 else None
            dense = Capture(model, names + ([output[0]] if output else []), calibration, options.threads,
                            dense_front, advance=True, fed=dense_fed())
            # a tied weight's later inputs depend on itself: the reconstructed model's frontier waits
            current = Capture(model, names, calibration, options.threads, front, overrides,
                              advance=len(sites) == 1, fed=current_fed()) if changed else None
            scale = sites[0].scale
            sink = sites[0].bias
            if blocks:
                R, Wt = None, LayerRows(w, index[0], scale, sink.dense if sink is not None else None)
            else:
                R = w.reshape(-1).astype(np.float64)[index] * scale  # [g, og, d]
                Wt = np.concatenate([R, (sink.dense.reshape(g, og, 1) if sink is not None
                                         else np.zeros((g, og, 1)))], axis=2)
            try:
                # wide layers: at least 2 p rows (then at least p after the stride's rounding; fewer rows than
                # inputs would take the held-out choice, 13 solves), so the Gram costs what H's inverse costs;
                # up to wide_inputs, 4 p: with 2 p magika's 1280-input Conv fitted its calibration files and
                # predicted others no better than plain selection (error ratio 1.02; 0.74-0.78 from 4 p to 13 p)
                wide = max(options.wide_max_rows, (4 if d <= options.wide_inputs else 2) * (d + 1))
                rows = options.max_rows if d <= options.admm_max_inputs else min(options.max_rows or wide, wide)
                if rows and options.rows_per_input:  # H of p inputs is well estimated from some multiple of p rows
                    rows = min(rows, max(-(-options.min_rows // g), options.rows_per_input * (d + 1)))
                mom = accumulate(sites, calibration, dense, current, rows, Wt, output)
            except InputError as exc:
                raise InputError(f"{layer.name}: {exc}") from None
            finally:
                dense.close()
                if current is not None:
                    current.close()
            dense_front.commit(len(calibration))
            front.commit(len(calibration))
            t_gram = time.perf_counter()
            m = mom.rows
            rec["time_capture_s"] = t_gram - t
            layer_options = options
            try:
                if R is None:  # (no held-out choice: its 13 whole-layer solves are what a wide layer avoids)
                    solved = solve_wide(layer, w, sites[0], mom, Wt, n_prune, plain_pruned, options, mask_used)
                elif mom.held is not None:
                    factor, held_fields = _holdout(layer, w, sites, mom, R, Wt, n_prune, plain_pruned, options)
                    rec.update(held_fields)
                    if factor is None:
                        raise Unsupported(f"{m} sample rows for {d + 1} inputs: on held-out rows the refit "
                                          f"predicts worse than plain selection")
                    layer_options = replace(options, damping=options.damping * factor)
                if R is not None:
                    solved = _solve(layer, w, sites, mom, R, n_prune, plain_pruned, layer_options)
            except np.linalg.LinAlgError as exc:  # moments too ill-conditioned for the factorisations
                raise Unsupported(f"the solver failed on these moments ({first_line(exc)})") from None
            moments_bytes = int(mom.H.nbytes + mom.GW.nbytes)  # what the layer holds besides a row block
            del mom, R, Wt
            out, bias, fields = solved
            out = held(i, out)
            res.values[i] = out
            overrides[layer.name] = out
            if bias is not None:
                res.biases[sites[0].bias.tensor] = bias
                overrides[sites[0].bias.tensor] = bias
            front.invalidate([layer.name] + ([sites[0].bias.tensor] if bias is not None else []))
            rec.update(fields, rows=int(m), moments_bytes=moments_bytes)
            if sites[0].kind != "conv" and m < fields["inputs"] + 1:
                underdetermined.append(layer.name)
            changed = True
        except Unsupported as exc:
            reason = str(exc)
            rec.update(method="plain", fallback=reason)
            msg = f"{layer.name}: not reconstructed ({reason}); plain selection used"
            res.warnings.append(msg)
            log.warning(msg)
            if gains and i not in preset:  # the next layers must see this layer pruned
                masked = np.where(plain_pruned.reshape(w.shape), np.zeros((), w.dtype), w)
                if graph.stored(layer.name) is not None:
                    overrides[layer.name] = held(i, masked)
                    front.invalidate([layer.name])
                changed = True
        _trim_heap()
        rec["time_s"] = time.perf_counter() - t
        records.append(rec)
    if underdetermined:
        msg = (f"{len(underdetermined)} dense layer(s) saw fewer calibration samples than inputs "
               f"({', '.join(underdetermined[:5])}{', ...' if len(underdetermined) > 5 else ''}); damping keeps "
               f"them solvable, more calibration samples help")
        res.warnings.append(msg)
        log.warning(msg)
    res.info = {"batches": len(calibration), "damping": float(options.damping),
                "correction": options.correction, "mask": options.mask, "max_rows": options.max_rows,
                "time_s": time.perf_counter() - t0, "peak_rss_bytes": _peak_rss(),
                "layers": records}
    return res


def _mask_for(options, g: int, og: int, d: int) -> str:
    if options.mask == "admm" and (g * og * d * d > options.admm_cost or d > options.admm_max_inputs):
        return "obs"  # ADMM's O(T * out * d^2) iterations would dominate: one-shot OBS mask
    return options.mask


def _solve(layer, w, sites, mom, R, n_prune, plain_pruned, options):
    """One layer: support under the exact count, refit, correction, guard against plain selection.

    Returns (new weights in the storage dtype, new stored bias or None, report fields)."""
    index = sites[0].index
    g, og, d = index.shape
    scale = sites[0].scale
    sink = sites[0].bias
    flat_w = w.reshape(-1)
    groups = [Group(R[gi], sink.dense[gi * og:(gi + 1) * og] if sink is not None else None, mom.H[gi], mom.GW[gi],
                    mom.ymean[gi], mom.ysq[gi], options.damping, None if mom.X is None else mom.X[gi])
              for gi in range(g)]
    perm = layout_perm(w.shape, layer.layout.out_axis, layer.layout.in_axis)
    zero = flat_w == 0

    def select(scores):
        """[g, og, d] scores -> [g, og, d] pruned: exactly n_prune, existing zeros first, deterministic ties."""
        flat = np.empty(w.size)
        flat[index.reshape(-1)] = scores.reshape(-1)
        flat[zero] = -np.inf
        return prune_mask(flat, n_prune, w.shape, perm)[index]

    def storage(rows_mask):
        out = np.empty(w.size, dtype=bool)
        out[index.reshape(-1)] = rows_mask.reshape(-1)
        return out

    mask_used = _mask_for(options, g, og, d)
    if mask_used == "admm":
        pruned = storage(admm_support(groups, select, fast=g * og * d * d > options.admm_fast_cost))
    elif mask_used == "obs":
        pruned = storage(select(np.stack([grp.saliency() for grp in groups])))
    else:
        pruned = plain_pruned
    keep, keep_plain = ~pruned[index], ~plain_pruned[index]

    def error(rows):
        return sum(grp.error(rows[gi]) for gi, grp in enumerate(groups))
    energy = max(sum(grp.energy() for grp in groups), 1e-300)
    err_plain = error([grp.masked(keep_plain[gi]) for gi, grp in enumerate(groups)])
    err_masked = error([grp.masked(keep[gi]) for gi, grp in enumerate(groups)]) if g * og * d * d <= 2e8 else None
    refit = [grp.refit(keep[gi]) for gi, grp in enumerate(groups)]
    cands = []
    if options.correction == "meanvar":
        cands.append(("refit+meanvar", [grp.correct(refit[gi]) for gi, grp in enumerate(groups)], pruned))
    cands.append(("refit", refit, pruned))
    chosen = None
    for name, rows, msk in cands:
        e = error(rows)
        if e <= err_plain * (1 + 1e-9) + 1e-300:
            chosen = (name, rows, msk, e)
            break
    if chosen is None:  # guard: never worse than plain selection on the calibration data
        rows = [grp.refit(keep_plain[gi]) for gi, grp in enumerate(groups)]
        e = error(rows)
        if e <= err_plain:
            chosen = ("plain-mask refit", rows, plain_pruned, e)
        else:
            chosen = ("plain", [grp.masked(keep_plain[gi]) for gi, grp in enumerate(groups)], plain_pruned,
                      err_plain)
    method, rows, msk, err_after = chosen
    rows = np.stack([r.w for r in rows])  # [g, og, d + 1]
    new = np.empty(w.size)
    new[index.reshape(-1)] = (rows[:, :, :d] / scale).reshape(-1)
    new[msk] = 0.0
    bias = None
    if sink is not None and method != "plain":
        b = rows[:, :, d].reshape(-1)
        bias = stored_finite(sink, b)
    out = cast_finite(new, w.dtype)
    lost = np.flatnonzero((out == 0) & ~msk)
    if lost.size:  # a kept weight that rounds to zero would change the count: keep it a tiny non-zero
        out[lost] = np.copysign(np.finfo(w.dtype).smallest_subnormal, new[lost]).astype(w.dtype)
    fields = {"method": method, "mask": mask_used if msk is pruned else "plain", "groups": g, "inputs": d,
              "outputs": g * og, "bias": None if sink is None else sink.kind,
              "lambda": float(np.mean([grp.lam for grp in groups])), "rel_error_before": err_plain / energy,
              "rel_error_masked": None if err_masked is None else err_masked / energy,
              "rel_error_after": err_after / energy}
    return out.reshape(w.shape), bias, fields
