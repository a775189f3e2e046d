"""What a person sees on the terminal (used by the CLI only): the per-layer table, validation per output, the
closing summary line, and progress for long stages (on a TTY only; nothing on a pipe)."""
from __future__ import annotations

import contextlib


ASCII = False  # set by the CLI when stdout/stderr cannot encode the symbols below
COMPACT_ABOVE = 25  # layers; above this the table shows the largest ones and the totals
COMPACT_ROWS = 12
NAME_WIDTH = 26
_SYMBOLS = {"→": "->", "×": "x", "—": "-", "…": "...", "≥": ">=", "·": "|"}


def _t(text: str) -> str:
    if ASCII:
        for k, v in _SYMBOLS.items():
            text = text.replace(k, v)
    return text


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def shorten(name: str, width: int = NAME_WIDTH) -> str:
    """Cut a long name in the middle, keeping both ends (the distinctive parts of exported names)."""
    if len(name) <= width:
        return name
    dots = _t("…")
    keep = width - len(dots)
    return name[: keep // 2] + dots + name[len(name) - (keep - keep // 2):]


def _common_prefix(names: list) -> str:
    """The longest prefix every name shares, cut after a separator ('.', '/', ':' or '_')."""
    if len(names) < 2:
        return ""
    first, last = min(names), max(names)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    cut = max(first.rfind(sep, 0, n) for sep in "./:_") + 1
    return first[:cut]


def short_names(names: list, width: int = NAME_WIDTH) -> dict:
    """name -> display name of at most ``width`` characters that tells the names apart where it can: the prefix
    all long names share is dropped, then path segments (split at '/') that half the names or more share are
    elided from every name at once, most shared first, as long as the names stay distinct (the last segment
    always stays),
    then the rest is cut: in the middle, or keeping the tail or the head, whichever stays distinct (exported
    names often differ only in an index deep inside: encoder.0 vs encoder.1)."""
    long = [n for n in names if len(n) > width]
    prefix = _common_prefix(long)
    dots = _t("…")
    out = {n: n for n in names if len(n) <= width}
    segs = {}
    for n in long:
        rest = n[len(prefix):] if len(prefix) > len(dots) + 2 and n.startswith(prefix) else n
        segs[n] = ([dots] if rest is not n else []) + rest.split("/")
    counts = {}
    for parts in segs.values():
        for seg in set(parts[:-1]):
            counts[seg] = counts.get(seg, 0) + 1
    gone = set()

    def render(parts):
        shown, prev = [], False
        for i, seg in enumerate(parts):
            if seg in gone and i < len(parts) - 1:
                if not prev:
                    shown.append(dots)
                prev = True
            else:
                shown.append(seg)
                prev = seg == dots
        return "/".join(shown)

    common = max(2, -(-len(long) // 2))  # a segment half the names share says little about any one of them
    for seg in sorted((k for k, c in counts.items() if c >= common and k != dots),
                      key=lambda k: (-counts[k], -len(k), k)):
        if all(len(render(p)) <= width for p in segs.values()):
            break
        gone.add(seg)
        shown = [render(p) for p in segs.values()]
        if len(set(shown)) < len(shown):
            gone.discard(seg)
    taken = set(out.values())
    for n in long:
        text = render(segs[n])
        for cand in (shorten(text, width), _cut(text, width, 0), _cut(text, width, 8), _cut(text, width, 4)):
            if cand not in taken:
                break
        else:
            cand = shorten(text, width)
        out[n] = cand
        taken.add(cand)
    return out


def _cut(text: str, width: int, head: int) -> str:
    """``text`` in ``width`` characters: its first ``head`` characters, '…', and as much of its end as fits."""
    if len(text) <= width:
        return text
    dots = _t("…")
    tail = width - head - len(dots)
    return text[:head] + dots + text[len(text) - tail:]


def _size(n) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# rich is imported on first use: a quiet run (-q, --json) never pays for it

def _console(stderr: bool = False):
    from rich.console import Console
    return Console(stderr=stderr, highlight=False)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape
    return rich_escape(text)


def _new_table(title: str, **kw):
    from rich import box
    from rich.table import Table
    return Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, show_edge=False, **kw)


def print_report(report, mode: str = "auto") -> None:
    console = _console()
    if mode != "none":
        _layer_table(console, report, full=mode == "full")
        c = report.connectivity
        if c:
            line = f"effective sparsity: {c['mode']}-level ({c['note']})"
            if c.get("removal"):
                r = c["removal"]
                line += (f"; detached units removed: {r['zeroed_dead_outputs']:,} weights reaching no output zeroed, "
                         f"{r['folded_constant_inputs']:,} constant-input weights folded into biases, "
                         f"{r['left_in_place']:,} left in place")
            console.print(escape(_t(line)))
            if c["unknown_ops"]:
                console.print(escape(f"ops treated as all-to-all (not understood): {', '.join(c['unknown_ops'])}"))
        if getattr(report, "compaction", None):
            _print_compaction(console, report.compaction)
        if getattr(report, "figures", None):
            _print_figures(console, report.figures)
        if getattr(report, "reconstruction", None):
            _print_reconstruction(console, report.reconstruction)
        if report.validation and report.validation.get("status") != "skipped":
            _print_validation(console, report.validation,
                              bool((getattr(report, "compaction", None) or {}).get("applied")
                                   and report.compaction.get("channels_removed")))
        if report.search:
            _print_search(console, report.search)
        if report.sensitivity:
            _print_sensitivity(console, report)
    if report.warnings:  # warnings go to stderr: stdout is the tables and the summary
        err = _console(stderr=True)
        for w in report.warnings:
            err.print(f"[yellow]warning:[/yellow] {escape(_t(w))}")
    console.print(escape(_t(summary_line(report))))


def _layer_table(console, report, full: bool) -> None:
    title = f"onnxprune {report.method}" + (f" (allocation {report.allocation})" if report.method == "random" else "")
    title += f" → {report.target_sparsity:.2%}" + ("  (dry run: nothing written)" if report.dry_run else "")
    table = _new_table(escape(_t(title)))
    show_before = any(l.zeros_before for l in report.layers)
    cols = [("layer", "left"), ("op", "left"), ("shape", "left"), ("params", "right")]
    cols += [("before", "right")] if show_before else []
    cols += [("after", "right"), ("effective", "right")]
    for col, justify in cols:
        table.add_column(col, justify=justify, no_wrap=True, overflow="ellipsis")
    rows = list(report.layers)
    hidden = []
    if not full and len(rows) > COMPACT_ABOVE:
        keep = set(sorted(range(len(rows)), key=lambda i: (-rows[i].params, i))[:COMPACT_ROWS])
        hidden = [l for i, l in enumerate(rows) if i not in keep]
        rows = [l for i, l in enumerate(rows) if i in keep]
    display = short_names([l.name for l in rows])
    for l in rows:
        after = "excluded" if l.excluded else _pct(l.sparsity_after)
        eff = "" if l.effective_sparsity is None else _pct(l.effective_sparsity)
        shape = _t("×").join(map(str, l.shape)) + ("" if l.dtype == "float32" else f" {l.dtype}")
        cells = [escape(display[l.name]), l.op, shape, f"{l.params:,}"]
        cells += [_pct(l.sparsity_before)] if show_before else []
        table.add_row(*cells, after, eff)
    if hidden:
        n = sum(l.params for l in hidden)
        z = sum(l.zeros_after for l in hidden if not l.excluded)
        cells = [f"… {len(hidden)} smaller layers", "", "", f"{n:,}"] + ([""] if show_before else [])
        table.add_row(_t(cells[0]), *cells[1:], _pct(z / n) if n else "", "")
    t = report.totals()
    table.add_section()
    cells = ["total", "", "", f"{t['params']:,}"] + ([_pct(t["sparsity_before"])] if show_before else [])
    table.add_row(*cells, _pct(t["sparsity_after"]),
                  "" if t["effective_sparsity"] is None else _pct(t["effective_sparsity"]))
    console.print(table)
    if hidden:
        console.print(f"({len(hidden)} layers folded into one row; --table full lists every layer)")


def _fmt(x, digits=4) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}f}"


def _print_validation(console, v: dict, compacted: bool = False) -> None:
    t = _new_table(escape(_t(f"validation on {', '.join(v['providers'])} — {v['samples']} samples, "
                             f"{v['batches']} batches")))
    for col, j in (("output", "left"), ("kind", "left"), ("metric", "left"), ("dense", "right"),
                   ("pruned", "right"), ("cosine", "right"), ("rel err", "right"), ("gate", "left")):
        # numbers and the verdict never shrink; only the name may
        t.add_column(col, justify=j, no_wrap=True, overflow="ellipsis", min_width=0 if col == "output" else None)
    display = short_names([o["name"] for o in v["outputs"]], 16)
    for o in v["outputs"]:
        name = escape(display[o["name"]])
        kind = _KIND_SHORT.get(o["kind"], o["kind"])
        if o["kind"] in ("integer", "passthrough"):
            t.add_row(name, kind, "", "", "", "", "", "no")
            continue
        metric = o["metric"] or ("top1_agreement" if o["kind"] in ("classification", "sequence") else "rel_error")
        dense, pruned = (o["dense_value"], o["value"]) if o["metric"] else \
            ((1.0, o["top1_agreement"]) if metric == "top1_agreement" else (0.0, o["rel_error"]))
        gate = "collapsed" if o["collapsed"] else "unreliable" if o.get("unreliable") else \
            ("-" if o["passed"] is None else "pass" if o["passed"] else "FAIL")
        t.add_row(name, kind, _METRIC_SHORT.get(metric, metric), _fmt(dense), _fmt(pruned),
                  _fmt(o["cosine"]), _fmt(o["rel_error"]), gate if o["gated"] else "no")
    console.print(t)
    console.print("kinds: class = classification [N, C], seq = per-position [N, T, C]; metrics: acc/agree = top-1 "
                  "accuracy/agreement, rel_err = relative L2 error", style="dim")
    console.print(escape(f"data: {v['data']}"))
    if v.get("top5_dense") is not None:
        console.print(f"top-5 accuracy: {v['top5_dense']:.4f} → {v['top5_pruned']:.4f}")
    if v.get("latency_ms_dense") is not None:
        console.print(_t(f"latency per batch: {v['latency_ms_dense']:.3f} ms dense, {v['latency_ms_pruned']:.3f} "
                         f"ms pruned" + ("" if compacted else " (zeros alone do not make ONNX Runtime faster; "
                                                              "--granularity channel and --compact shrink shapes)")))
    if v.get("passed") is not None:
        verdict = "[green]passed[/green]" if v["passed"] else "[red]FAILED[/red]"
        console.print(f"gate ({escape(_gate_text(v['gate']))}): {verdict}")


_KIND_SHORT = {"classification": "class", "sequence": "seq", "passthrough": "pass", "integer": "int"}
_METRIC_SHORT = {"top1_accuracy": "acc", "top1_agreement": "agree", "rel_error": "rel_err", "snr_db": "snr",
                 "cosine": "cos"}


def _gate_text(g: dict) -> str:
    names = {"max_drop": "max drop", "max_rel_error": "max rel error", "min_cosine": "min cosine",
             "min_snr_db": "min SNR dB"}
    return ", ".join(f"{names[k]} {g[k]}" for k in names if g.get(k) is not None)


def _print_compaction(console, c: dict) -> None:
    if not c.get("channels_removed"):
        if c.get("applied"):
            console.print("compaction: no dead channel to remove")
        return
    what = "removed" if c["applied"] else "--compact would remove"
    line = (f"compaction: {what} {c['channels_removed']:,} dead channels/neurons, prunable parameters "
            f"{c['params_before']:,} → {c['params_after']:,}" + (f" (align {c['align']})" if c.get("align", 1) > 1
                                                                 else ""))
    console.print(escape(_t(line)))


def _print_figures(console, f: dict) -> None:
    b, a = f["before"], f["after"]
    t = _new_table("payoff (before → after)")
    for col, j in (("", "left"), ("dense", "right"), ("pruned", "right"), ("ratio", "right")):
        t.add_column(col, justify=j, no_wrap=True)
    rows = [("file size", _size(b.get("file_bytes")), _size(a.get("file_bytes")), "file_bytes"),
            ("gzip size", _size(b.get("gzip_bytes")) if b.get("gzip_bytes") else "> 16 MB: not computed",
             _size(a.get("gzip_bytes")) if a.get("gzip_bytes") else "-", "gzip_bytes"),
            ("parameters", f"{b.get('params_total', 0):,}", f"{a.get('params_total', 0):,}", "params_total"),
            ("non-zero prunable", f"{b.get('nonzero_prunable', 0):,}", f"{a.get('nonzero_prunable', 0):,}",
             "nonzero_prunable")]
    if b.get("macs") is not None:
        rows.append(("MACs per sample" + ("" if b.get("macs_complete") else " (known layers)"), f"{b['macs']:,}",
                     f"{a.get('macs') or 0:,}", "macs"))
    if b.get("latency_ms"):
        rows.append(("latency ms/batch", f"{b['latency_ms']:.3f}", f"{a['latency_ms']:.3f}", "latency_ms"))
    for label, x, y, key in rows:
        r = f["ratio"].get(key)
        t.add_row(label, x, y, "" if r is None else f"{r:.3f}")
    console.print(t)


def _print_reconstruction(console, r: dict) -> None:
    layers = r.get("layers") or []
    refit = [l for l in layers if l.get("rel_error_after") is not None]
    cal = r.get("calibration") or {}
    line = (f"reconstruction: {len(refit)} of {len(layers)} layers refit on {r.get('samples')} calibration samples "
            f"({cal.get('path')}{', split from --data' if cal.get('split_from_data') else ''}), "
            f"damping {r.get('damping')}, {r.get('time_s', 0):.1f} s")
    if refit:
        worst = max(refit, key=lambda l: l["rel_error_after"])
        line += (f"; layer output error vs dense, worst layer {shorten(worst['name'], 20)}: "
                 f"{worst.get('rel_error_before', float('nan')):.3f} one-shot → {worst['rel_error_after']:.3f}")
    console.print(escape(_t(line)))


def _print_search(console, s: dict) -> None:
    t = _new_table("sparsity search")
    for col in ("sparsity", "metric", "output", "value", "passes"):
        t.add_column(col, justify="right", no_wrap=True, overflow="ellipsis")
    for c in s["curve"]:
        t.add_row(f"{c['sparsity']:.3f}", c["metric"], escape(shorten(str(c.get("output")), 20)), _fmt(c["value"]),
                  "yes" if c["passed"] else "no" + (" (collapsed)" if c.get("collapsed") else ""))
    console.print(t)
    console.print(f"chosen sparsity: {s['chosen']:.3f}")


def _print_sensitivity(console, report) -> None:
    t = _new_table(f"per-layer sensitivity (one layer at {report.target_sparsity:.2%})")
    for col, j in (("layer", "left"), ("metric", "left"), ("value", "right"), ("drop", "right")):
        t.add_column(col, justify=j, no_wrap=True, overflow="ellipsis")
    for r in report.sensitivity:
        t.add_row(escape(shorten(r["layer"])), _METRIC_SHORT.get(r["metric"], r["metric"]), _fmt(r["value"]),
                  f"{r['drop']:+.4f}" if isinstance(r["drop"], float) else str(r["drop"]))
    console.print(t)


FAR_COSINE = 0.5  # an output whose cosine to the dense one falls below this has moved far


def damage(v: dict) -> str | None:
    """Words for a validated model whose outputs moved far from the dense ones (collapsed, or cosine under
    FAR_COSINE), whatever the gate says; None when none did."""
    bad = []
    for o in v.get("outputs") or []:
        if o["kind"] in ("integer", "passthrough") or o.get("unreliable"):
            continue
        if o.get("collapsed"):
            bad.append(f"output '{shorten(o['name'], 24)}' collapsed ({o['collapsed']})")
        elif o.get("cosine") is not None and o["cosine"] < FAR_COSINE:
            bad.append(f"output '{shorten(o['name'], 24)}' moved far from the dense one (cosine {o['cosine']:.3f})")
    return "; ".join(bad) or None


def summary_line(report) -> str:
    """One closing line: sizes before → after, time, direct and effective sparsity, the gated metric."""
    t = report.totals()
    parts = []
    sizes = getattr(report, "sizes", {}) or {}
    fig = getattr(report, "figures", None) or {}
    if report.output:
        size = f"{_size(sizes.get('before'))} → {_size(sizes.get('after'))}"
        if fig.get("before", {}).get("gzip_bytes"):
            size += f" (gzip {_size(fig['before']['gzip_bytes'])} → {_size(fig['after']['gzip_bytes'])})"
        parts.append(size)
    elif report.dry_run:
        parts.append("dry run, nothing written")
    total = report.timings.get("total")
    if total is not None:
        parts.append(f"{total:.1f} s")
    eff = t["effective_sparsity"]
    parts.append(f"sparsity {_pct(t['sparsity_after'])} direct" + (f", {_pct(eff)} effective" if eff is not None
                                                                    else ""))
    v = report.validation
    if v and v.get("status") == "skipped":
        parts.append("validation skipped")
    elif v:
        head = f"{v['metric']} {_fmt(v['dense'])} → {_fmt(v['pruned'])}"
        if v.get("output"):
            head += f" on '{shorten(v['output'], 20)}'"
        if v.get("passed") is not None:
            head += " (gate passed)" if v["passed"] else " (gate FAILED)"
        parts.append(head)
        harm = damage(v)
        if harm:
            parts.append(f"DAMAGED: {harm}")
    if report.output:
        parts.append(f"wrote {report.output}")
    return " · ".join(parts)


class Feedback:
    """Progress for stages that can take more than a second: spinners and bars on a TTY, nothing on a pipe."""

    def __init__(self, enabled: bool = True):
        self.console = _console(stderr=True) if enabled else None
        self.enabled = enabled and self.console.is_terminal
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), console=self.console, transient=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    @contextlib.contextmanager
    def stage(self, description: str):
        """A spinner while the stage runs; yields a function that rewrites its description."""
        if self._progress is None:
            yield lambda text: None
            return
        task = self._progress.add_task(_t(description), total=None)
        try:
            yield lambda text: self._progress.update(task, description=escape(_t(text)))
        finally:
            self._progress.remove_task(task)

    @contextlib.contextmanager
    def progress(self, description: str):
        """A bar per label: yields cb(label, done, total), or None when there is nothing to show."""
        if self._progress is None:
            yield None
            return
        tasks = {}

        def cb(label, done, total):
            if label not in tasks:
                tasks[label] = self._progress.add_task(_t(f"{description} {label}"), total=total or None)
            self._progress.update(tasks[label], completed=done)
        try:
            yield cb
        finally:
            for task in tasks.values():
                self._progress.remove_task(task)
