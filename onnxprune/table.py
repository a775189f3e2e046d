"""Rich rendering of a Report for humans (used by the CLI only)."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def print_report(report, stderr: bool = False) -> None:
    console = Console(stderr=stderr, highlight=False)
    title = f"onnxprune {report.method}" + (f" (allocation {report.allocation})" if report.method == "random" else "")
    title += f" → {report.target_sparsity:.2%}" + ("  (dry run: nothing written)" if report.dry_run else "")
    table = Table(title=escape(title), show_lines=False)
    for col, justify in (("layer", "left"), ("op", "left"), ("shape", "left"), ("params", "right"),
                         ("before", "right"), ("after", "right"), ("effective", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for l in report.layers:
        after = "excluded" if l.excluded else _pct(l.sparsity_after)
        eff = "" if l.effective_sparsity is None else _pct(l.effective_sparsity)
        shape = "×".join(map(str, l.shape)) + ("" if l.dtype == "float32" else f" {l.dtype}")
        table.add_row(escape(l.name), l.op, shape, f"{l.params:,}", _pct(l.sparsity_before), after, eff)
    t = report.totals()
    table.add_section()
    table.add_row("total", "", "", f"{t['params']:,}", _pct(t["sparsity_before"]), _pct(t["sparsity_after"]),
                  "" if t["effective_sparsity"] is None else _pct(t["effective_sparsity"]))
    console.print(table)
    c = report.connectivity
    if c:
        line = f"effective sparsity: {c['mode']}-level ({c['note']})"
        if c.get("removal"):
            r = c["removal"]
            line += (f"; detached units removed: {r['zeroed_dead_outputs']:,} weights reaching no output zeroed, "
                     f"{r['folded_constant_inputs']:,} constant-input weights folded into biases, "
                     f"{r['left_in_place']:,} left in place")
        console.print(escape(line))
        if c["unknown_ops"]:
            console.print(escape(f"ops treated as all-to-all (not understood): {', '.join(c['unknown_ops'])}"))
    if report.validation:
        _print_validation(console, report.validation)
    if report.search:
        t = Table(title=f"sparsity search (max drop {report.search['max_drop']})")
        for col in ("sparsity", "metric", "value", "drop", "within budget"):
            t.add_column(col, justify="right")
        for c in report.search["curve"]:
            t.add_row(f"{c['sparsity']:.3f}", c["metric"], f"{c['value']:.4f}", f"{c['drop']:+.4f}",
                      "yes" if c["passed"] else "no")
        console.print(t)
        console.print(f"chosen sparsity: {report.search['chosen']:.3f}")
    if report.sensitivity:
        t = Table(title=f"per-layer sensitivity (one layer at {report.target_sparsity:.2%})")
        for col, j in (("layer", "left"), ("metric", "left"), ("value", "right"), ("drop", "right")):
            t.add_column(col, justify=j)
        for r in report.sensitivity:
            t.add_row(escape(r["layer"]), r["metric"], f"{r['value']:.4f}", f"{r['drop']:+.4f}")
        console.print(t)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")
    if report.output:
        console.print(f"wrote {escape(report.output)}")


def _print_validation(console, v: dict) -> None:
    t = Table(title=f"validation on {escape(', '.join(v['providers']))} — {v['samples']} samples, "
                    f"{v['batches']} batches ({escape(str(v['data']))})")
    for col in ("", "dense", "pruned", "drop"):
        t.add_column(col, justify="right")
    t.add_row(v["metric"], f"{v['dense']:.4f}", f"{v['pruned']:.4f}", f"{v['drop']:+.4f}")
    if v.get("top5_dense") is not None:
        t.add_row("top5_accuracy", f"{v['top5_dense']:.4f}", f"{v['top5_pruned']:.4f}",
                  f"{v['top5_dense'] - v['top5_pruned']:+.4f}")
    if v.get("agreement") is not None and v["metric"] != "top1_agreement":
        t.add_row("top1_agreement", "1.0000", f"{v['agreement']:.4f}", f"{1 - v['agreement']:+.4f}")
    if v.get("latency_ms_dense") is not None:
        t.add_row("latency ms/batch", f"{v['latency_ms_dense']:.3f}", f"{v['latency_ms_pruned']:.3f}", "")
    console.print(t)
    for o in v["outputs"]:
        console.print(f"  output {escape(o['name'])}: max |err| {o['max_abs_error']:.4g}, max rel err "
                      f"{o['max_rel_error']:.4g}, cosine {o['cosine']:.6f}"
                      + (f", non-finite {o['nonfinite_pruned']}" if o["nonfinite_pruned"] else ""))
    if v.get("passed") is not None:
        verdict = "[green]passed[/green]" if v["passed"] else "[red]FAILED[/red]"
        console.print(f"accuracy gate (max drop {v['max_drop']}): {verdict}")
