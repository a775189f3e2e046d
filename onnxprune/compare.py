"""Comparing one output of the dense and the pruned model: errors, cosine, SNR and collapse (per channel group when
the channels carry quantities of different scales), top-k agreement and accuracy, and for per-position outputs
the agreement off the blank class and the greedy-decoded sequences."""
from __future__ import annotations

import numpy as np

PART_RATIO = 30.0  # adjacent channels whose dense RMS differ this much start a new part (boxes vs class scores)
MAX_PARTS = 4
MAX_CHANNELS = 1024  # a channel axis is at most this long (and shorter than another non-sample axis)
CONSTANT_SPREAD = 1e-3  # a dense output whose values lie within this (times max(1, |median|)) is constant ...
NEAR_ALL = 0.999  # ... counting this fraction of them (from 1000 values on; all of them below)


def sample_axis(batches, sizes) -> int | None:
    """The output axis that holds the samples: the first whose length is every batch's sample count."""
    if not batches or not sizes or len(sizes) != len(batches):
        return None
    for axis in range(min(b.ndim for b in batches)):
        if all(b.shape[axis] == n for b, n in zip(batches, sizes)) and \
                len({b.shape[:axis] + b.shape[axis + 1:] for b in batches}) == 1:
            return axis
    return None


def _rows(batches, sizes=None) -> np.ndarray:
    """One output's batches as float64 rows: one per sample (on its sample axis), else one per batch, else one."""
    if not batches:
        return np.zeros((0, 0))
    axis = sample_axis(batches, sizes) if sizes else (0 if all(b.ndim for b in batches) and
                                                      len({b.shape[1:] for b in batches}) == 1 else None)
    if axis is not None:
        return np.concatenate([np.moveaxis(np.asarray(b, dtype=np.float64), axis, 0).reshape(b.shape[axis], -1)
                               for b in batches])
    if len({b.size for b in batches}) == 1:
        return np.stack([np.asarray(b, dtype=np.float64).reshape(-1) for b in batches])
    return np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1) for b in batches])[None, :]


def _errors(d: np.ndarray, p: np.ndarray) -> dict:
    """rel_error, snr_db, cosine (mean and min over rows; over the whole output for one value per row) of finite
    rows ``d``, ``p`` (float64, same shape)."""
    diff = d - p
    nd, ne = float(np.sum(d * d)), float(np.sum(diff * diff))
    out = {"rel_error": float(np.sqrt(ne / nd)) if nd > 0 else (0.0 if ne == 0 else float("inf")),
           "snr_db": None if ne == 0 else (float(10 * np.log10(nd / ne)) if nd > 0 else float("-inf")),
           "cosine_over": "sample"}
    if d.ndim == 2 and d.shape[1] < 2:  # one value per sample: a per-sample cosine is only its sign
        d, p = d.reshape(1, -1), p.reshape(1, -1)
        out["cosine_over"] = "batch"
    dn, pn = np.sqrt(np.sum(d * d, axis=1)), np.sqrt(np.sum(p * p, axis=1))
    dot = np.sum(d * p, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((dn > 0) & (pn > 0), dot / (dn * pn), np.where(dn == pn, 1.0, 0.0))
    out["cosine"], out["cosine_min"] = (float(np.mean(cos)), float(np.min(cos))) if cos.size else (1.0, 1.0)
    return out


def float_stats(st, dense_batches, pruned_batches, sizes=None) -> None:
    """Errors, cosine, SNR, collapse and reliability of one float output (vectorised; non-finite values counted
    apart). An output whose channels differ in scale by PART_RATIO or more (a detector's box coordinates next to
    its class scores) is compared per part: the figures are the worst part's, ``st.parts`` holds each part's and
    ``st.whole`` the whole output's."""
    if [b.shape for b in dense_batches] != [b.shape for b in pruned_batches]:
        st.collapsed = "shape changed"
        st.rel_error = st.max_abs_error = st.max_rel_error = float("inf")
        st.cosine = st.cosine_min = 0.0
        return
    d, p = _rows(dense_batches, sizes), _rows(pruned_batches, sizes)
    fin_d, fin_p = np.isfinite(d), np.isfinite(p)
    st.nonfinite_dense = int(d.size - np.count_nonzero(fin_d))
    st.nonfinite_pruned = int(p.size - np.count_nonzero(fin_p))
    if st.nonfinite_dense or st.nonfinite_pruned:
        both = fin_d & fin_p
        d, p = np.where(both, d, 0.0), np.where(both, p, 0.0)
    diff = np.abs(d - p)
    if d.size:
        st.max_abs_error = float(diff.max())
        st.max_rel_error = float((diff / (np.abs(d) + 1e-12)).max())
    e = _errors(d, p)
    st.rel_error, st.snr_db, st.cosine, st.cosine_min, st.cosine_over = (e["rel_error"], e["snr_db"], e["cosine"],
                                                                         e["cosine_min"], e["cosine_over"])
    dv, pv = (d.reshape(1, -1), p.reshape(1, -1)) if d.shape[1] < 2 else (d, p)
    dc, pc = dv - dv.mean(), pv - pv.mean()
    den = float(np.sqrt(np.sum(dc * dc) * np.sum(pc * pc)))
    st.pearson = float(np.sum(dc * pc) / den) if den > 0 else (1.0 if not np.any(dc) and not np.any(pc) else 0.0)
    split = channel_parts(dense_batches, sizes)
    if split is not None:
        _part_stats(st, split, dense_batches, pruned_batches, sizes)
    if st.nonfinite_dense:
        st.unreliable = (f"the dense model itself gives {st.nonfinite_dense} non-finite values on these inputs: give "
                         f"realistic inputs (--data, --synthetic)")
    elif d.size >= 2 and st.kind == "dense":  # scores have their own test (one class for every sample)
        # nearly constant: all but a handful of values (NEAR_ALL) within CONSTANT_SPREAD of the median (a text
        # detector's map on noise: zeros but for a few specks)
        med = float(np.median(d))
        spread = float(np.quantile(np.abs(d - med), NEAR_ALL)) if d.size >= 1000 else float(d.max() - d.min())
        if spread <= CONSTANT_SPREAD * max(1.0, abs(med)):
            st.unreliable = (f"the dense output is (nearly) constant on these inputs ({NEAR_ALL:.1%} of its values "
                             f"within {spread:.2g} of {med:.3g}): a comparison on it means nothing; give real "
                             f"inputs with --data" if d.size >= 1000 else
                             f"the dense output is (nearly) constant on these inputs (every value within "
                             f"{spread:.2g} of the others): a comparison on it means nothing; give real inputs "
                             f"with --data")
    if st.nonfinite_pruned > st.nonfinite_dense:
        st.collapsed = f"{st.nonfinite_pruned - st.nonfinite_dense} non-finite values"
        st.rel_error, st.cosine, st.cosine_min = float("inf"), 0.0, 0.0
    elif not np.any(p) and np.any(d):
        st.collapsed = "all zeros"
    elif len(p) >= 2 and not np.any(p != p[0]) and np.any(d != d[0]):
        st.collapsed = "constant across samples"


def channel_parts(batches, sizes) -> tuple | None:
    """(channel axis, [(first, last + 1), ...]) when the output has a channel axis (the shortest non-sample axis,
    2..MAX_CHANNELS long, shorter than another) along which the dense RMS jumps by PART_RATIO or more between
    neighbours: up to MAX_PARTS contiguous parts, cut at the largest jumps. None otherwise."""
    a0 = batches[0]
    if any(b.ndim != a0.ndim for b in batches):
        return None
    sax = sample_axis(batches, sizes)
    other = [ax for ax in range(a0.ndim) if ax != sax]
    # a channel axis has one length in every batch (a flattened [batch x seq, C] output's first axis does not)
    fixed = [ax for ax in other if all(b.shape[ax] == a0.shape[ax] for b in batches)]
    if len(other) < 2 or not fixed:
        return None
    c, cax = min((a0.shape[ax], ax) for ax in fixed)
    if not 2 <= c <= MAX_CHANNELS or c >= max(a0.shape[ax] for ax in other):
        return None
    sq = np.zeros(c)
    count = 0
    for b in batches:
        x = np.moveaxis(np.asarray(b, dtype=np.float64), cax, 0).reshape(c, -1)
        x = np.where(np.isfinite(x), x, 0.0)
        sq += np.sum(x * x, axis=1)
        count += x.shape[1]
    rms = np.sqrt(sq / max(count, 1))
    live = np.flatnonzero(rms > 0)
    if live.size < 2:
        return None
    logs = np.log10(rms[live])
    jumps = np.abs(np.diff(logs))
    big = np.flatnonzero(jumps >= np.log10(PART_RATIO))
    if big.size == 0:
        return None
    big = np.sort(big[np.argsort(-jumps[big], kind="stable")][:MAX_PARTS - 1])
    cuts = [0] + [int(live[i + 1]) for i in big] + [c]  # a zero channel joins the part before it
    return cax, [(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)]


def _part_stats(st, split, dense_batches, pruned_batches, sizes) -> None:
    cax, parts = split
    st.whole = {"rel_error": st.rel_error, "cosine": st.cosine, "snr_db": st.snr_db}
    st.parts = []
    for lo, hi in parts:
        d = _rows([np.take(b, range(lo, hi), axis=cax) for b in dense_batches], sizes)
        p = _rows([np.take(b, range(lo, hi), axis=cax) for b in pruned_batches], sizes)
        ok = np.isfinite(d) & np.isfinite(p)
        e = _errors(np.where(ok, d, 0.0), np.where(ok, p, 0.0))
        st.parts.append({"axis": cax, "channels": [lo, hi - 1], "rel_error": e["rel_error"], "cosine": e["cosine"],
                         "snr_db": e["snr_db"]})
    worst = max(st.parts, key=lambda q: q["rel_error"])
    st.part = f"channels {worst['channels'][0]}-{worst['channels'][1]} of axis {cax}"
    st.rel_error = worst["rel_error"]
    st.cosine = min(q["cosine"] for q in st.parts)
    snrs = [q["snr_db"] for q in st.parts if q["snr_db"] is not None]
    st.snr_db = min(snrs) if snrs else None


def _topk_hit(scores: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """Whether ``target`` is among the k highest scores of each row (fewer than k rows score higher)."""
    true = np.take_along_axis(scores, target[:, None], axis=1)
    return (scores > true).sum(axis=1) < k


def class_stats(st, dense_batches, pruned_batches, labels, blank=None) -> None:
    """Top-1/top-5 agreement with the dense model, and accuracy with labels, per sample or per position; for a
    per-position output [N, T, C] (batches already sample-first) also the agreement on positions where either
    model is off the blank class, and the greedy-decoded sequences' exact-match rate."""
    c = dense_batches[0].shape[-1]
    d = np.concatenate([b.reshape(-1, c) for b in dense_batches]).astype(np.float64)
    p = np.concatenate([b.reshape(-1, c) for b in pruned_batches]).astype(np.float64)
    p = np.nan_to_num(p, nan=-np.inf)
    top_d, top_p = np.argmax(d, axis=1), np.argmax(p, axis=1)
    st.top1_agreement = float(np.mean(top_d == top_p)) if len(d) else 1.0
    st.dense_classes = int(len(np.unique(top_d)))
    if st.kind == "sequence" and len(d):
        _sequence_stats(st, dense_batches, top_d, top_p, blank)
    if st.dense_classes == 1 and len(d) >= 2 and labels is None and st.metric in (None, "top1_agreement",
                                                                                   "nonblank_agreement",
                                                                                   "sequence_match"):
        st.unreliable = (f"the dense model predicts class {int(top_d[0])} for all {len(d)} "
                         f"{'positions' if st.kind == 'sequence' else 'samples'}: agreement cannot tell "
                         f"pruned from dense; give real inputs with --data, or --metric rel-error")
    if c >= 5 and len(d):
        st.top5_agreement = float(np.mean(_topk_hit(p, top_d, 5)))
    if labels is not None:
        y = labels.reshape(-1)
        st.labels = True
        st.top1_accuracy_dense, st.top1_accuracy_pruned = float(np.mean(top_d == y)), float(np.mean(top_p == y))
        if c >= 5:
            st.top5_accuracy_dense = float(np.mean(_topk_hit(d, y, 5)))
            st.top5_accuracy_pruned = float(np.mean(_topk_hit(p, y, 5)))


def _sequence_stats(st, dense_batches, top_d, top_p, blank) -> None:
    counts = np.bincount(top_d)
    st.blank = int(np.argmax(counts)) if blank is None else int(blank)
    st.blank_fraction = float(np.mean(top_d == st.blank))
    off = (top_d != st.blank) | (top_p != st.blank)
    st.nonblank_positions = int(np.count_nonzero(off))
    st.nonblank_agreement = float(np.mean(top_d[off] == top_p[off])) if st.nonblank_positions else 1.0
    t = dense_batches[0].shape[1]
    seq_d, seq_p = top_d.reshape(-1, t), top_p.reshape(-1, t)
    same = [ctc_greedy(a, st.blank) == ctc_greedy(b, st.blank) for a, b in zip(seq_d, seq_p)]
    st.sequences = len(same)
    st.sequence_match = float(np.mean(same)) if same else 1.0


def ctc_greedy(tokens: np.ndarray, blank: int) -> tuple:
    """Greedy CTC decoding of one row of per-position classes: repeats collapsed, blanks dropped."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return ()
    keep = np.ones(tokens.size, dtype=bool)
    keep[1:] = tokens[1:] != tokens[:-1]
    keep &= tokens != blank
    return tuple(int(x) for x in tokens[keep])
