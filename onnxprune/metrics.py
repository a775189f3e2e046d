"""Per-output comparison of dense and pruned results: what kind each output is, the metrics that fit it, collapse
detection, and the gate over the gated outputs (worst one decides)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, InputError

# metric -> (option bounding it, higher is better, kinds it applies to)
METRICS = {
    "top1_accuracy": ("--max-drop", True, ("classification", "sequence")),
    "top1_agreement": ("--max-drop", True, ("classification", "sequence")),
    "rel_error": ("--max-rel-error", False, ("classification", "sequence", "dense")),
    "cosine": ("--min-cosine", True, ("classification", "sequence", "dense")),
    "snr_db": ("--min-snr", True, ("classification", "sequence", "dense")),
}
METRIC_ALIASES = {"accuracy": "top1_accuracy", "agreement": "top1_agreement", "rel-error": "rel_error",
                  "cosine": "cosine", "snr": "snr_db"}
_SHAPE_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast"}
_SOFTMAX = {"Softmax", "LogSoftmax"}
_LINEAR = {"Gemm", "MatMul", "Add"}  # a linear head: classification only with >= 10 classes or a score-like name
_NOT_SCORES = {"LpNormalization", "LayerNormalization", "Tanh", "ReduceMean", "ReduceL2", "Div", "Sigmoid", "Concat",
               "Sqrt", "Mul", "Resize", "Conv", "ConvTranspose"}
_DENSE_NAME = re.compile(r"emb|hidden|feat|pool|vec|sentence|last_hidden|encod|box|bbox|coord|depth|map|mask|seg|"
                         r"reg|heat|dist|state", re.I)
_SEQ_NAME = re.compile(r"logit|prob|score|ctc|pred|char|class|softmax", re.I)


@dataclass
class Bounds:
    max_drop: float | None = None
    max_rel_error: float | None = None
    min_cosine: float | None = None
    min_snr: float | None = None
    metric: str | None = None  # None: each output's default
    outputs: tuple = ()  # names to gate (empty: every float output that pruning can change)

    def active(self) -> bool:
        return any(x is not None for x in (self.max_drop, self.max_rel_error, self.min_cosine, self.min_snr))

    def by_option(self) -> dict:
        """Each bound under the option that sets it."""
        return {"--max-drop": self.max_drop, "--max-rel-error": self.max_rel_error, "--min-cosine": self.min_cosine,
                "--min-snr": self.min_snr}

    def bound(self, metric: str):
        return self.by_option()[METRICS[metric][0]]


def _depends_on(model, names: set, producer) -> set:
    """Graph outputs that some tensor in ``names`` (the prunable weights) can reach."""
    out = set()
    for o in model.graph.output:
        seen, todo, hit = set(), [o.name], False
        while todo and not hit:
            cur = todo.pop()
            if cur in names:
                hit = True
                break
            n = producer.get(cur)
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            if any(a.type in (5, 10) for a in n.attribute):  # GRAPH / GRAPHS: a subgraph may read any weight
                hit = True
                break
            todo.extend(x for x in n.input if x)
        if hit:
            out.add(o.name)
    return out


def _producer_op(name: str, producer) -> str:
    n = producer.get(name)
    for _ in range(16):
        if n is None or n.op_type not in _SHAPE_OPS or not n.input:
            break
        n = producer.get(n.input[0])
    return n.op_type if n is not None else ""


_SCORE_NAME = re.compile(r"logit|prob|score|cls|class|pred|softmax|output_label", re.I)


def classify_outputs(model, weight_names, dense: dict, rows: int | None = None) -> dict:
    """name -> (kind, why). ``dense``: name -> first-batch array of the dense model; ``weight_names`` None:
    every output may depend on the weights."""
    producer = {o: n for n in model.graph.node for o in n.output}
    depends = _depends_on(model, set(weight_names), producer) if weight_names is not None else \
        {o.name for o in model.graph.output}
    kinds = {}
    for o in model.graph.output:
        a = dense.get(o.name)
        op = _producer_op(o.name, producer)
        if a is None:
            continue
        if not np.issubdtype(a.dtype, np.floating):
            kinds[o.name] = ("integer", f"{a.dtype} output: reported, never gated")
        elif o.name not in depends:
            kinds[o.name] = ("passthrough", "no prunable weight reaches it (e.g. an input passed through): "
                                            "never gated")
        elif a.ndim == 2 and a.shape[1] >= 2 and (rows is None or a.shape[0] == rows) and (
                op in _SOFTMAX or (op not in _NOT_SCORES and not _DENSE_NAME.search(o.name)
                                   and (_SCORE_NAME.search(o.name) or (a.shape[1] >= 10 and op in _LINEAR)))):
            kinds[o.name] = ("classification", f"[N, C] scores (C={a.shape[1]}" + (f", from {op})" if op else ")"))
        elif a.ndim == 3 and a.shape[2] >= 2 and (rows is None or a.shape[0] == rows) and (
                op in _SOFTMAX or (_SEQ_NAME.search(o.name) and not _DENSE_NAME.search(o.name))):
            kinds[o.name] = ("sequence", f"[N, T, C] per-position scores (C={a.shape[2]}"
                             + (f", from {op})" if op else ")"))
        else:
            kinds[o.name] = ("dense", f"{a.ndim}-D float output (detection head, embedding, map, regression; "
                                      f"classification needs Softmax/LogSoftmax, a score-like name or >= 10 linear "
                                      f"outputs)")
    return kinds


@dataclass
class OutputStats:
    name: str
    kind: str = "dense"
    why: str = ""
    gated: bool = False
    metric: str | None = None  # the metric the gate reads for this output
    bound: float | None = None
    value: float | None = None  # that metric, pruned model
    dense_value: float | None = None  # that metric, dense model (1 for agreement, 0 for rel_error...)
    drop: float | None = None  # how much worse than dense (badness: drop, rel_error, 1 - cosine, -snr)
    passed: bool | None = None
    shape: list | None = None
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    rel_error: float = 0.0  # ||p - d|| / ||d|| over the whole output
    cosine: float = 1.0  # mean per-sample cosine similarity
    cosine_min: float = 1.0
    snr_db: float | None = None  # 10 log10(||d||² / ||p - d||²); None when identical
    nonfinite_dense: int = 0
    nonfinite_pruned: int = 0
    pearson: float | None = None  # correlation of the mean-removed values (offsets such as sigmoid's 0.5 removed)
    collapsed: str | None = None
    unreliable: str | None = None  # why this comparison cannot be trusted (then a gate on it fails)
    dense_classes: int | None = None  # distinct top-1 classes the dense model predicts on this data
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    top1_accuracy_dense: float | None = None
    top1_accuracy_pruned: float | None = None
    top5_accuracy_dense: float | None = None
    top5_accuracy_pruned: float | None = None
    labels: bool = False


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


def float_stats(st: OutputStats, dense_batches, pruned_batches, sizes=None) -> None:
    """Errors, cosine, SNR and collapse of one float output (vectorised; non-finite values counted apart)."""
    if [b.shape for b in dense_batches] != [b.shape for b in pruned_batches]:
        st.collapsed = "shape changed"
        st.rel_error = st.max_abs_error = st.max_rel_error = float("inf")
        st.cosine = st.cosine_min = 0.0
        return
    d, p = _rows(dense_batches, sizes), _rows(pruned_batches, sizes)
    fin_d, fin_p = np.isfinite(d), np.isfinite(p)
    st.nonfinite_dense = int(d.size - np.count_nonzero(fin_d))
    st.nonfinite_pruned = int(p.size - np.count_nonzero(fin_p))
    both = fin_d & fin_p
    if st.nonfinite_dense or st.nonfinite_pruned:
        d, p = np.where(both, d, 0.0), np.where(both, p, 0.0)
    diff = np.abs(d - p)
    if d.size:
        st.max_abs_error = float(diff.max())
        st.max_rel_error = float((diff / (np.abs(d) + 1e-12)).max())
    nd, ne = float(np.sum(d * d)), float(np.sum(diff * diff))
    st.rel_error = float(np.sqrt(ne / nd)) if nd > 0 else (0.0 if ne == 0 else float("inf"))
    st.snr_db = None if ne == 0 else (float(10 * np.log10(nd / ne)) if nd > 0 else float("-inf"))
    if d.shape[1] < 2:  # one value per sample: a per-sample cosine is only its sign; compare the whole output
        d, p = d.reshape(1, -1), p.reshape(1, -1)
    dc, pc = d - d.mean(), p - p.mean()
    den = float(np.sqrt(np.sum(dc * dc) * np.sum(pc * pc)))
    st.pearson = float(np.sum(dc * pc) / den) if den > 0 else (1.0 if not np.any(dc) and not np.any(pc) else 0.0)
    dn, pn = np.sqrt(np.sum(d * d, axis=1)), np.sqrt(np.sum(p * p, axis=1))
    dot = np.sum(d * p, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((dn > 0) & (pn > 0), dot / (dn * pn), np.where(dn == pn, 1.0, 0.0))
    if cos.size:
        st.cosine, st.cosine_min = float(np.mean(cos)), float(np.min(cos))
    if st.nonfinite_dense:
        st.unreliable = (f"the dense model itself gives {st.nonfinite_dense} non-finite values on these inputs: give "
                         f"realistic inputs (--data, --synthetic)")
    if st.nonfinite_pruned > st.nonfinite_dense:
        st.collapsed = f"{st.nonfinite_pruned - st.nonfinite_dense} non-finite values"
        st.rel_error, st.cosine, st.cosine_min = float("inf"), 0.0, 0.0
    elif not np.any(p) and np.any(d):
        st.collapsed = "all zeros"
    elif len(p) >= 2 and not np.any(p != p[0]) and np.any(d != d[0]):
        st.collapsed = "constant across samples"


def _topk_hit(scores: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """Whether ``target`` is among the k highest scores of each row (fewer than k rows score higher)."""
    true = np.take_along_axis(scores, target[:, None], axis=1)
    return (scores > true).sum(axis=1) < k


def class_stats(st: OutputStats, dense_batches, pruned_batches, labels) -> None:
    """Top-1/top-5 agreement with the dense model, and accuracy with labels, per sample or per position."""
    c = dense_batches[0].shape[-1]
    d = np.concatenate([b.reshape(-1, c) for b in dense_batches]).astype(np.float64)
    p = np.concatenate([b.reshape(-1, c) for b in pruned_batches]).astype(np.float64)
    p = np.nan_to_num(p, nan=-np.inf)
    top_d, top_p = np.argmax(d, axis=1), np.argmax(p, axis=1)
    st.top1_agreement = float(np.mean(top_d == top_p)) if len(d) else 1.0
    st.dense_classes = int(len(np.unique(top_d)))
    if st.dense_classes == 1 and len(d) >= 2 and labels is None and st.metric in (None, "top1_agreement"):
        st.unreliable = (f"the dense model predicts class {int(top_d[0])} for all {len(d)} "
                         f"{'positions' if st.kind == 'sequence' else 'samples'}: top-1 agreement cannot tell "
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


def labels_for(kinds: dict, dense: dict, labels, source: str, chosen=()) -> dict:
    """The output the labels score: [N] class ids for an [N, C] output, [N, T] for [N, T, C]; among ``chosen``
    (--gate-output) when given, else the first that fits. Checked against its number of classes (InputError:
    out of range or one-hot)."""
    if labels is None:
        return {}
    fit = {}
    for name, (kind, _) in kinds.items():
        if chosen and name not in chosen:
            continue
        a = dense[name]
        if kind == "classification" and labels.ndim == 1:
            fit[name] = a.shape[1]
        elif kind == "sequence" and labels.ndim == 2 and labels.shape[1] == a.shape[1]:
            fit[name] = a.shape[2]
    if not fit:
        if labels.ndim == 2 and set(np.unique(labels).tolist()) <= {0, 1} and np.all(labels.sum(axis=1) == 1):
            raise InputError(f"{source}: labels look one-hot {list(labels.shape)}; give class ids "
                             f"(labels.argmax(1))")
        shapes = {n: list(dense[n].shape) for n in kinds}
        raise InputError(f"{source}: labels of shape {list(labels.shape)} fit no classification [N, C] or sequence "
                         f"[N, T, C] output (outputs: {shapes})")
    name, classes = next(iter(fit.items()))  # one output gets the labels; --gate-output chooses another
    if labels.size and labels.max() >= classes:
        raise InputError(f"{source}: label {int(labels.max())} is out of range for output '{name}' with "
                         f"{classes} classes" + (" (--gate-output scores another output)" if len(fit) > 1 else ""))
    return {name: classes}


def plan_gate(kinds: dict, labelled: dict, bounds: Bounds) -> dict:
    """output name -> gate metric, for the outputs the gate reads; ConfigError when an option cannot apply."""
    names = list(kinds)
    for n in bounds.outputs:
        if n not in kinds:
            raise ConfigError(f"--gate-output {n!r}: no such output; outputs are {', '.join(names)}")
        if kinds[n][0] in ("integer", "passthrough"):
            raise ConfigError(f"--gate-output {n!r} is a {kinds[n][0]} output ({kinds[n][1]}); it cannot be gated")
    chosen = list(bounds.outputs) or [n for n in names if kinds[n][0] not in ("integer", "passthrough")]
    plan = {}
    for n in chosen:
        kind = kinds[n][0]
        metric = bounds.metric
        if metric is None:
            metric = ("top1_accuracy" if n in labelled else "top1_agreement") if kind in ("classification",
                                                                                      "sequence") else "rel_error"
        if kind not in METRICS[metric][2]:
            raise ConfigError(f"--metric {metric} does not fit output '{n}' ({kind}); use rel-error, cosine or snr, "
                              f"or choose outputs with --gate-output")
        if metric == "top1_accuracy" and n not in labelled:
            raise ConfigError(f"--metric accuracy needs labels for output '{n}' (y or labels in --data)")
        plan[n] = metric
    if bounds.active():
        used = {METRICS[m][0] for m in plan.values()}
        for opt, value in bounds.by_option().items():
            if value is not None and opt not in used:
                gated = ", ".join(f"'{n}' ({kinds[n][0]}: {m})" for n, m in plan.items()) or "none"
                what = ("accuracy/agreement of classification and sequence outputs" if opt == "--max-drop" else
                        f"outputs gated by {next(m for m in METRICS if METRICS[m][0] == opt)}")
                why = (f"--metric {bounds.metric} makes every gated output read {bounds.metric}" if bounds.metric
                       else "no gated output reads it")
                raise ConfigError(f"{opt} bounds {what}, but {why} (gated: {gated}); see --metric and --gate-output")
        for n, metric in plan.items():
            if bounds.bound(metric) is None:
                raise ConfigError(f"output '{n}' ({kinds[n][0]}) is gated by {metric}, bounded by "
                                  f"{METRICS[metric][0]}: give it, or choose outputs with --gate-output or a metric "
                                  f"with --metric")
    if not plan and bounds.active():
        raise ConfigError("no output can be gated (every output is integer or unaffected by pruning)")
    return plan


def gate_value(st: OutputStats, metric: str) -> tuple[float, float, float]:
    """(dense value, pruned value, badness) of ``metric`` on one output (badness inf when it was not computed,
    e.g. a shape change)."""
    if metric in ("top1_accuracy", "top1_agreement") and st.top1_agreement is None:
        return None, None, float("inf")
    if metric == "top1_accuracy":
        return st.top1_accuracy_dense, st.top1_accuracy_pruned, st.top1_accuracy_dense - st.top1_accuracy_pruned
    if metric == "top1_agreement":
        return 1.0, st.top1_agreement, 1.0 - st.top1_agreement
    if metric == "rel_error":
        return 0.0, st.rel_error, st.rel_error
    if metric == "cosine":
        return 1.0, st.cosine, 1.0 - st.cosine
    snr = float("inf") if st.snr_db is None else st.snr_db
    return float("inf"), snr, -snr


def bound_badness(metric: str, bounds: Bounds):
    """The bound of ``metric`` on gate_value's badness scale (what a search curve plots), or None."""
    b = bounds.bound(metric) if metric in METRICS else None
    if b is None:
        return None
    return {"cosine": 1 - b, "snr_db": -b}.get(metric, b)


def judge(st: OutputStats, bounds: Bounds) -> None:
    """Fill the gate fields of one gated output: pass when within its bound and not collapsed."""
    st.dense_value, st.value, st.drop = gate_value(st, st.metric)
    st.bound = bounds.bound(st.metric) if bounds.active() else None
    if st.bound is None:
        return
    if st.value is None:
        st.passed = False
        return
    higher = METRICS[st.metric][1]
    if st.metric in ("top1_accuracy", "top1_agreement"):
        ok = st.drop <= st.bound + 1e-12
    else:
        ok = st.value >= st.bound - 1e-12 if higher else st.value <= st.bound + 1e-12
    st.passed = bool(ok) and st.collapsed is None and st.unreliable is None


def severity(st: OutputStats) -> float:
    """How close a gated output is to (or past) its bound, comparable across metrics (>1: failed)."""
    if st.collapsed or st.unreliable or st.value is None:
        return float("inf")
    if st.bound is None:
        return st.drop if st.drop is not None else 0.0
    if st.metric in ("top1_accuracy", "top1_agreement"):
        return st.drop / st.bound if st.bound > 0 else (0.0 if st.drop <= 0 else float("inf"))
    if st.metric == "rel_error":
        return st.value / st.bound if st.bound > 0 else (0.0 if st.value <= 0 else float("inf"))
    if st.metric == "cosine":
        return (1 - st.value) / (1 - st.bound) if st.bound < 1 else (0.0 if st.value >= 1 else float("inf"))
    return st.bound / st.value if st.value > 0 else float("inf")
