"""What kind each output is, the metrics that fit it, which bounds gate which outputs, and the verdict (the worst
gated output decides). The figures themselves are computed in compare.py."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, InputError

# metric -> (option bounding it, higher is better, kinds it applies to)
METRICS = {
    "top1_accuracy": ("--max-drop", True, ("classification", "sequence")),
    "top1_agreement": ("--max-drop", True, ("classification", "sequence")),
    "nonblank_agreement": ("--max-drop", True, ("sequence",)),
    "sequence_match": ("--max-drop", True, ("sequence",)),
    "rel_error": ("--max-rel-error", False, ("classification", "sequence", "dense")),
    "cosine": ("--min-cosine", True, ("classification", "sequence", "dense")),
    "snr_db": ("--min-snr", True, ("classification", "sequence", "dense")),
}
METRIC_ALIASES = {"accuracy": "top1_accuracy", "agreement": "top1_agreement", "rel-error": "rel_error",
                  "cosine": "cosine", "snr": "snr_db", "nonblank-agreement": "nonblank_agreement",
                  "sequence-match": "sequence_match"}
DROP_METRICS = ("top1_accuracy", "top1_agreement", "nonblank_agreement", "sequence_match")  # bounded by --max-drop
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
    metric: str | None = None  # None: each bound gates the outputs its metric applies to
    outputs: tuple = ()  # names to gate (empty: every float output that pruning can change)
    blank: int | None = None  # the blank class of per-position outputs (None: the one the dense model predicts most)

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


def _probabilities(a: np.ndarray) -> bool:
    """Rows (last axis) that are probabilities (non-negative, summing to 1) or log-probabilities: what a softmax
    gives, however it was written (Exp/ReduceSum/Div)."""
    if a.size == 0 or not np.all(np.isfinite(a)):
        return False
    x = np.asarray(a, dtype=np.float64)
    if x.min() >= -1e-6:
        return bool(np.all(np.abs(x.sum(axis=-1) - 1) <= 1e-3))
    if x.max() <= 1e-6:
        return bool(np.all(np.abs(np.exp(x).sum(axis=-1) - 1) <= 1e-3))
    return False


def classify_outputs(model, weight_names, dense: dict, rows: int | None = None, axes: dict | None = None) -> dict:
    """name -> (kind, why). ``dense``: name -> first-batch array of the dense model; ``weight_names`` None:
    every output may depend on the weights; ``axes``: name -> the sample axis found over every batch (a
    per-position output with the samples on axis 1 is time-first [T, N, C])."""
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
            continue
        if o.name not in depends:
            kinds[o.name] = ("passthrough", "no prunable weight reaches it (e.g. an input passed through): "
                                            "never gated")
            continue
        sax = (axes or {}).get(o.name)
        fits = rows is None or (a.ndim >= 1 and a.shape[0] == rows)
        probs = a.ndim in (2, 3) and a.shape[-1] >= 2 and _probabilities(a)
        src = "rows are probabilities" if probs and op not in _SOFTMAX else (f"from {op}" if op else "")
        if a.ndim == 2 and a.shape[1] >= 2 and fits and (
                op in _SOFTMAX or probs or (op not in _NOT_SCORES and not _DENSE_NAME.search(o.name)
                                            and (_SCORE_NAME.search(o.name) or (a.shape[1] >= 10 and op in _LINEAR)))):
            kinds[o.name] = ("classification", f"[N, C] scores (C={a.shape[1]}" + (f", {src})" if src else ")"))
        elif a.ndim == 3 and a.shape[2] >= 2 and (fits or sax == 1) and (
                op in _SOFTMAX or probs or (not _DENSE_NAME.search(o.name) and op not in _NOT_SCORES and (
                    _SEQ_NAME.search(o.name) or (a.shape[2] >= 10 and op in _LINEAR and sax == 1)))):
            layout = "[T, N, C]" if sax == 1 else "[N, T, C]"
            kinds[o.name] = ("sequence", f"{layout} per-position scores (C={a.shape[2]}" +
                             (f", {src})" if src else ")"))
        else:
            kinds[o.name] = ("dense", f"{a.ndim}-D float output (detection head, embedding, map, regression; "
                                      f"classification needs Softmax/LogSoftmax, probability rows, a score-like "
                                      f"name or >= 10 linear outputs)")
    return kinds


@dataclass
class OutputStats:
    name: str
    kind: str = "dense"
    why: str = ""
    gated: bool = False
    metric: str | None = None  # the metric the gate reads for this output (the worst, when several bounds apply)
    bound: float | None = None
    value: float | None = None  # that metric, pruned model
    dense_value: float | None = None  # that metric, dense model (1 for agreement, 0 for rel_error...)
    drop: float | None = None  # how much worse than dense (badness: drop, rel_error, 1 - cosine, -snr)
    passed: bool | None = None
    gates: list | None = None  # every (metric, bound, value, passed) when several bounds gate this output
    shape: list | None = None
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    rel_error: float = 0.0  # ||p - d|| / ||d|| over the whole output (the worst part's, with parts)
    cosine: float = 1.0  # mean per-sample cosine similarity (the worst part's, with parts)
    cosine_min: float = 1.0
    cosine_over: str = "sample"  # "batch": one value per sample, so the cosine is taken over the batch
    snr_db: float | None = None  # 10 log10(||d||² / ||p - d||²); None when identical
    parts: list | None = None  # per channel group when the channels differ in scale (boxes vs class scores)
    part: str | None = None  # the part with the largest relative error
    whole: dict | None = None  # rel_error / cosine / snr_db over the whole output, when there are parts
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
    layout: str | None = None  # per-position outputs: "NTC" or "TNC"
    blank: int | None = None  # per-position outputs: the blank class
    blank_fraction: float | None = None  # of the dense model's positions
    nonblank_positions: int | None = None  # positions where either model is off the blank
    nonblank_agreement: float | None = None  # top-1 agreement on those
    sequences: int | None = None
    sequence_match: float | None = None  # greedy CTC-decoded sequences equal to the dense model's


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


def plan_gate(kinds: dict, labelled: dict, bounds: Bounds, scalars=frozenset()) -> dict:
    """output name -> [gate metrics], for the outputs the gate reads; ConfigError when an option cannot apply.

    With --metric, every gated output reads that metric (and only its bound may be given). Without, each bound
    gates the outputs its metric applies to: --max-drop the classification (accuracy with labels, else
    agreement) and per-position outputs (agreement off the blank), --max-rel-error / --min-cosine / --min-snr
    every float output (cosine not the ``scalars``: one value per sample, where a cosine ignores scale); an
    output several bounds apply to must pass each. Only a bound that applies to no output is an error. With no
    bound at all, each output gets its default metric (reported, not gated)."""
    names = list(kinds)
    for n in bounds.outputs:
        if n not in kinds:
            raise ConfigError(f"--gate-output {n!r}: no such output; outputs are {', '.join(names)}")
        if kinds[n][0] in ("integer", "passthrough"):
            raise ConfigError(f"--gate-output {n!r} is a {kinds[n][0]} output ({kinds[n][1]}); it cannot be gated")
    chosen = list(bounds.outputs) or [n for n in names if kinds[n][0] not in ("integer", "passthrough")]

    def drop_metric(n):
        kind = kinds[n][0]
        if n in labelled:
            return "top1_accuracy"
        return "nonblank_agreement" if kind == "sequence" else "top1_agreement"

    plan = {}
    if bounds.metric is not None:
        metric = bounds.metric
        for n in chosen:
            kind = kinds[n][0]
            if kind not in METRICS[metric][2]:
                raise ConfigError(f"--metric {metric} does not fit output '{n}' ({kind}); use rel-error, cosine or "
                                  f"snr, or choose outputs with --gate-output")
            if metric == "top1_accuracy" and n not in labelled:
                raise ConfigError(f"--metric accuracy needs labels for output '{n}' (y or labels in --data)")
            if metric == "cosine" and n in scalars:
                if bounds.outputs:
                    raise ConfigError(f"--metric cosine on output '{n}': it holds one value per sample, and a "
                                      f"cosine over the batch ignores scale (a 200x error can read 0.9999); gate it "
                                      f"with --metric rel-error or snr")
                continue
            plan[n] = [metric]
        if bounds.active():
            opt = METRICS[metric][0]
            for other, value in bounds.by_option().items():
                if value is not None and other != opt:
                    raise ConfigError(f"{other} is given, but --metric {bounds.metric} makes every gated output "
                                      f"read {bounds.metric} (bounded by {opt}); drop one of them")
            if bounds.bound(metric) is None:
                raise ConfigError(f"--metric {metric} is bounded by {opt}: give it")
    elif bounds.active():
        used = set()
        for n in chosen:
            kind, ms = kinds[n][0], []
            if bounds.max_drop is not None and kind in ("classification", "sequence"):
                ms.append(drop_metric(n))
            if bounds.max_rel_error is not None:
                ms.append("rel_error")
            if bounds.min_cosine is not None and n not in scalars:
                ms.append("cosine")
            if bounds.min_snr is not None:
                ms.append("snr_db")
            if not ms and bounds.outputs:
                given = ", ".join(o for o, v in bounds.by_option().items() if v is not None)
                raise ConfigError(f"--gate-output {n!r} ({kind}{', one value per sample' if n in scalars else ''}):"
                                  f" no bound given applies to it ({given}); --max-drop applies to classification "
                                  f"and per-position outputs, --max-rel-error/--min-snr to every float output")
            if ms:
                plan[n] = ms
                used.update(METRICS[m][0] for m in ms)
        for opt, value in bounds.by_option().items():
            if value is not None and opt not in used:
                what = ("classification and per-position outputs" if opt == "--max-drop" else
                        "float outputs with more than one value per sample" if opt == "--min-cosine" else
                        "float outputs")
                outs = ", ".join(f"'{n}' ({kinds[n][0]})" for n in chosen) or "none"
                raise ConfigError(f"{opt} applies to {what}, and no gated output is one (outputs: {outs}); see "
                                  f"--gate-output and --metric")
    else:
        for n in chosen:
            kind = kinds[n][0]
            plan[n] = [drop_metric(n) if kind in ("classification", "sequence") else "rel_error"]
    if not plan and bounds.active():
        raise ConfigError("no output can be gated (every output is integer or unaffected by pruning)")
    return plan


def gate_value(st: OutputStats, metric: str) -> tuple[float, float, float]:
    """(dense value, pruned value, badness) of ``metric`` on one output (badness inf when it was not computed,
    e.g. a shape change)."""
    if metric in DROP_METRICS and st.top1_agreement is None:
        return None, None, float("inf")
    if metric == "top1_accuracy":
        return st.top1_accuracy_dense, st.top1_accuracy_pruned, st.top1_accuracy_dense - st.top1_accuracy_pruned
    if metric in ("top1_agreement", "nonblank_agreement", "sequence_match"):
        v = getattr(st, metric)
        return (None, None, float("inf")) if v is None else (1.0, v, 1.0 - v)
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


def judge(st: OutputStats, bounds: Bounds, metrics=None) -> None:
    """Fill the gate fields of one gated output from each of its ``metrics`` (default: ``st.metric``): it passes
    when within every bound and not collapsed or unreliable; the headline fields are the worst metric's."""
    results = []
    for m in metrics or [st.metric]:
        dense, value, drop = gate_value(st, m)
        bound = bounds.bound(m) if bounds.active() else None
        passed = None
        if bound is not None:
            if value is None:
                passed = False
            else:
                higher = METRICS[m][1]
                if m in DROP_METRICS:
                    ok = drop <= bound + 1e-12
                else:
                    ok = value >= bound - 1e-12 if higher else value <= bound + 1e-12
                passed = bool(ok) and st.collapsed is None and st.unreliable is None
        results.append({"metric": m, "bound": bound, "dense_value": dense, "value": value, "drop": drop,
                        "passed": passed})
    worst = max(results, key=lambda r: _severity(r["metric"], r["value"], r["drop"], r["bound"], st))
    st.metric, st.bound, st.dense_value, st.value, st.drop = (worst["metric"], worst["bound"], worst["dense_value"],
                                                              worst["value"], worst["drop"])
    st.passed = None if worst["bound"] is None else all(r["passed"] for r in results)
    st.gates = results if len(results) > 1 else None


def severity(st: OutputStats) -> float:
    """How close a gated output is to (or past) its bound, comparable across metrics (>1: failed)."""
    return _severity(st.metric, st.value, st.drop, st.bound, st)


def _severity(metric, value, drop, bound, st) -> float:
    if st.collapsed or st.unreliable or value is None:
        return float("inf")
    if bound is None:
        return drop if drop is not None else 0.0
    if metric in DROP_METRICS:
        return drop / bound if bound > 0 else (0.0 if drop <= 0 else float("inf"))
    if metric == "rel_error":
        return value / bound if bound > 0 else (0.0 if value <= 0 else float("inf"))
    if metric == "cosine":
        return (1 - value) / (1 - bound) if bound < 1 else (0.0 if value >= 1 else float("inf"))
    return bound / value if value > 0 else float("inf")
