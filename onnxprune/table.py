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
    for col, justify in (("layer", "left"), ("op", "left"), ("shape", "left"), ("dtype", "left"),
                         ("params", "right"), ("sparsity before → after", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for l in report.layers:
        after = "excluded" if l.excluded else _pct(l.sparsity_after)
        table.add_row(escape(l.name), l.op, "×".join(map(str, l.shape)), l.dtype, f"{l.params:,}",
                      f"{_pct(l.sparsity_before)} → {after}")
    t = report.totals()
    table.add_section()
    table.add_row("total", "", "", "", f"{t['params']:,}",
                  f"{_pct(t['sparsity_before'])} → {_pct(t['sparsity_after'])}")
    console.print(table)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")
    if report.output:
        console.print(f"wrote {escape(report.output)}")
