"""The reconstruction loop: layers in graph order, each solved on inputs captured from the partly reconstructed
model (targets from the dense one), written back before the next layer's inputs are captured."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..select import layout_perm, prune_mask
from .activations import Capture, CutStore, DenseCache
from .problems import Graph, Unsupported, build_sites
from .solver import Group, admm_support

log = logging.getLogger("onnxprune")

CORRECTIONS = ("meanvar", "none")
MASKS = ("admm", "obs", "plain")
ACC_BYTES = 1 << 26  # rows of augmented samples handled per accumulation step


@dataclass
class ReconstructOptions:
    damping: float = 0.03  # lambda = damping * mean(diag H)
    correction: str = "meanvar"  # "meanvar": mean and variance together | "none"
    mask: str = "admm"  # "admm": ALPS-like ADMM support | "obs": one-shot OBS saliency layer-wide |
    #                     "plain": keep the allocation's selection
    max_inputs: int = 16384  # layers with more inputs per output row fall back to plain selection
    admm_cost: float = 5e8  # ADMM where groups * out * d^2 stays below this, the one-shot OBS mask above
    max_rows: int = 32768  # cap on sample rows per layer, evenly strided (0: all; Conv rows are N * positions)
    threads: int = 0  # ONNX Runtime intra-op threads (0: its default)
    cache_bytes: int = 1 << 30  # keep every layer's dense inputs when they fit (one dense pass), else recompute

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


def _tensors(model: onnx.ModelProto) -> dict:
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = a.t
    return out


def _write(tensor, values):
    from ..io import write_tensor
    write_tensor(tensor, values)


def _accumulate(sites, feeds, dense: Capture, current: Capture | None, max_rows: int, keep: list | None = None):
    """Float64 H, G, Hdd [groups, p, p] averaged over every sample row, and the row count.

    Sample rows are buffered across batches up to ACC_BYTES, so that small batches (batch-1 models) still give
    large matrix products instead of many rank-few updates. ``keep``: a list that receives the (single) site's
    pruned-prefix activation of every batch."""
    g, _, d = sites[0].index.shape
    p = d + 1
    same = current is None
    H = np.zeros((g, p, p))
    G = None if same else np.zeros((g, p, p))
    Hdd = None if same else np.zeros((g, p, p))
    chunk = max(256, ACC_BYTES // (8 * p * g))
    buf_d, buf_p, buffered, rows = [], [], 0, 0
    stride = None

    def flush():
        xd = np.concatenate(buf_d, axis=1) if len(buf_d) > 1 else buf_d[0]
        ones = np.ones((g, xd.shape[1], 1))
        pd = np.concatenate([xd, ones], axis=2)
        if same:
            H[...] += pd.transpose(0, 2, 1) @ pd
            return
        xp = np.concatenate(buf_p, axis=1) if len(buf_p) > 1 else buf_p[0]
        pp = np.concatenate([xp, ones], axis=2)
        ppT = pp.transpose(0, 2, 1)
        H[...] += ppT @ pp
        G[...] += ppT @ pd
        Hdd[...] += pd.transpose(0, 2, 1) @ pd

    for j, feed in enumerate(feeds):
        od = dense.run(feed, j)
        oc = od if same else current.run(feed, j)
        if keep is not None:
            keep.append(oc[sites[0].act])
        for site in sites:
            xd = site.samples(od[site.act])
            xp = xd if same else site.samples(oc[site.act])
            if xd.shape != xp.shape:
                raise Unsupported("dense and pruned activations differ in shape")
            if xd.shape[2] != d or xd.shape[0] != g:
                raise Unsupported(f"activation gives {xd.shape[0]}x{xd.shape[2]} inputs per group, the weight "
                                  f"{g}x{d}")
            if max_rows:
                if stride is None:  # fixed from the first batch: deterministic, evenly spread rows
                    stride = max(1, -(-xd.shape[1] * len(feeds) * len(sites) // max_rows))
                if stride > 1:
                    xd, xp = xd[:, ::stride], xp[:, ::stride]
            for a in range(0, xd.shape[1], chunk):
                buf_d.append(xd[:, a:a + chunk])
                buf_p.append(xp[:, a:a + chunk])
                buffered += buf_d[-1].shape[1]
                rows += buf_d[-1].shape[1]
                if buffered >= chunk:
                    flush()
                    buf_d, buf_p, buffered = [], [], 0
        del od, oc
    if buffered:
        flush()
    if rows == 0:
        raise Unsupported("no calibration rows reached this layer")
    H /= rows
    if same:  # nothing upstream changed: the pruned prefix is the dense one
        return H, H, H, rows
    G /= rows
    Hdd /= rows
    return H, G, Hdd, rows


def reconstruct(model, layers, values, idx, counts, kept, calibration, options: ReconstructOptions) -> Outcome:
    """Reconstruct the active layers ``idx`` (positions into ``layers``/``values``) of ``model``.

    ``counts[k]``: zeros layer ``idx[k]`` ends with (the allocation's count, existing zeros included); ``kept``:
    layer index -> packed non-zero flags of the plain selection (layers absent gained no zeros). ``model`` is
    only read: the partly reconstructed model is a private copy. Returns the refit weights and biases to write.
    """
    options.check()
    t0 = time.perf_counter()
    res = Outcome()
    work = onnx.ModelProto()
    work.CopyFrom(model)
    work_tensors = _tensors(work)
    graph = Graph(model)
    changed = False
    records = []
    samples = 0
    for feed in calibration:
        first = next(iter(feed.values()), None)
        samples += int(first.shape[0]) if first is not None and getattr(first, "ndim", 0) else 1
    underdetermined = []
    wanted = []
    for i in idx:
        try:
            wanted += [s.act for s in build_sites(graph, layers[i], tuple(values[i].shape))]
        except Unsupported:
            pass
    cache = DenseCache(model, list(dict.fromkeys(wanted)), calibration, options.cache_bytes, options.threads)
    # Inputs captured from the partly reconstructed model depend only on layers already final (graph order), so
    # later prefixes start from them: each layer's capture runs only the nodes since the previous layers.
    cuts = CutStore(options.cache_bytes)
    for k, i in enumerate(idx):
        layer = layers[i]
        w = values[i]
        n_prune = int(counts[k])
        zeros_before = int(w.size - np.count_nonzero(w))
        gains = n_prune > zeros_before
        if not gains and not changed:
            continue
        t = time.perf_counter()
        flat_w = w.reshape(-1)
        if i in kept:
            plain_pruned = ~np.unpackbits(kept[i], count=w.size).view(bool)
        else:
            plain_pruned = flat_w == 0
        rec = {"name": layer.name, "op": layer.op, "params": int(w.size), "pruned": n_prune}
        try:
            if w.dtype.kind != "f" or w.dtype.itemsize < 2 or str(w.dtype) == "bfloat16":
                raise Unsupported(f"{w.dtype} weights are not reconstructed")
            sites = build_sites(graph, layer, tuple(w.shape))
            index = sites[0].index
            g, og, d = index.shape
            if d > options.max_inputs:
                raise Unsupported(f"{d} inputs per output row > {options.max_inputs}: H would not fit")
            names = [s.act for s in sites]
            dense = cache if cache.covers(names) else Capture(model, names, calibration, options.threads)
            current = Capture(work, names, calibration, options.threads, cuts) if changed else None
            acts = [] if len(sites) == 1 else None  # a tied weight's later inputs depend on itself: not kept
            try:
                H, G, Hdd, m = _accumulate(sites, calibration, dense, current, options.max_rows, acts)
            finally:
                if dense is not cache:
                    dense.close()
                if current is not None:
                    current.close()
            if acts is not None and sites[0].act in graph.producer:
                cuts.add(sites[0].act, acts)
            del acts
            t_gram = time.perf_counter()
            moments = [H, G, Hdd]
            del H, G, Hdd  # _solve releases G and Hdd once the targets are formed
            solved = _solve(layer, w, sites, moments, n_prune, plain_pruned, options)
            rec["time_capture_s"] = t_gram - t
            out, bias, fields = solved
            res.values[i] = out
            _write(work_tensors[layer.name], out)
            if bias is not None:
                res.biases[sites[0].bias.tensor] = bias
                _write(work_tensors[sites[0].bias.tensor], bias)
            rec.update(fields, rows=int(m))
            if sites[0].kind != "conv" and m < fields["inputs"] + 1:
                underdetermined.append(layer.name)
            changed = True
        except Unsupported as exc:
            reason = str(exc)
            rec.update(method="plain", fallback=reason)
            msg = f"{layer.name}: not reconstructed ({reason}); plain selection used"
            res.warnings.append(msg)
            log.warning(msg)
            if gains:  # the next layers must see this layer pruned
                masked = np.where(plain_pruned.reshape(w.shape), np.zeros((), w.dtype), w)
                if layer.name in work_tensors:
                    _write(work_tensors[layer.name], masked)
                changed = True
        rec["time_s"] = time.perf_counter() - t
        records.append(rec)
    if underdetermined:
        msg = (f"{len(underdetermined)} dense layer(s) saw fewer calibration samples than inputs "
               f"({', '.join(underdetermined[:5])}{', ...' if len(underdetermined) > 5 else ''}); damping keeps "
               f"them solvable, more calibration samples help")
        res.warnings.append(msg)
        log.warning(msg)
    res.info = {"samples": samples, "batches": len(calibration), "damping": float(options.damping),
                "correction": options.correction, "mask": options.mask, "max_rows": options.max_rows,
                "dense_inputs_cached": cache.store is not None, "time_s": time.perf_counter() - t0,
                "layers": records}
    return res


def _solve(layer, w, sites, moments, n_prune, plain_pruned, options):
    """One layer: support under the exact count, refit, correction, guard against plain selection.

    Returns (new weights in the storage dtype, new stored bias or None, report fields)."""
    index = sites[0].index
    g, og, d = index.shape
    H, G, Hdd = moments
    moments.clear()
    scale = sites[0].scale
    sink = sites[0].bias
    flat_w = w.reshape(-1)
    R = flat_w.astype(np.float64)[index] * scale
    groups = [Group(R[gi], sink.dense[gi * og:(gi + 1) * og] if sink is not None else None, H[gi], G[gi], Hdd[gi],
                    options.damping) for gi in range(g)]
    del G, Hdd, R
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

    mask_used = options.mask
    if mask_used == "admm" and g * og * d * d > options.admm_cost:
        mask_used = "obs"  # ADMM's O(T * out * d^2) iterations would dominate: one-shot OBS mask
    if mask_used == "admm":
        pruned = storage(admm_support(groups, select))
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
        if not np.all(np.isfinite(b)):
            raise Unsupported("the refit produced a non-finite bias")
        bias = sink.stored(b)
    if not np.all(np.isfinite(new)):
        raise Unsupported("the refit produced non-finite weights")
    out = new.astype(w.dtype)
    lost = np.flatnonzero((out == 0) & ~msk)
    if lost.size:  # a kept weight that rounds to zero would change the count: keep it a tiny non-zero
        out[lost] = np.copysign(np.finfo(w.dtype).smallest_subnormal, new[lost]).astype(w.dtype)
    fields = {"method": method, "mask": mask_used if msk is pruned else "plain", "groups": g, "inputs": d,
              "outputs": g * og, "bias": None if sink is None else sink.kind,
              "lambda": float(np.mean([grp.lam for grp in groups])), "rel_error_before": err_plain / energy,
              "rel_error_masked": None if err_masked is None else err_masked / energy,
              "rel_error_after": err_after / energy}
    return out.reshape(w.shape), bias, fields
