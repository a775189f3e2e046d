"""Click CLI: options, tables, exit codes. The only module that prints or exits."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback

import click

from . import __version__
from .allocation import ALLOCATIONS
from .errors import AccuracyGateError, InputError, OnnxPruneError, OutputError, RequestError
from .io import check_output_path, load_model, save_model
from .pipeline import METHODS, PruneConfig, parse_min_keep, prune_loaded
from .report import Report

# Exit codes, defined once (see README "Exit codes").
EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INPUT, EXIT_REQUEST, EXIT_OUTPUT, EXIT_INTERNAL = 0, 1, 2, 3, 4, 5, 70
EXIT_CODES = {AccuracyGateError: EXIT_GATE, InputError: EXIT_INPUT, RequestError: EXIT_REQUEST,
              OutputError: EXIT_OUTPUT}


class SparsityType(click.ParamType):
    """A finite float in [0, 1). (click.FloatRange lets 'nan' through.)"""
    name = "FLOAT"

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v) or not 0.0 <= v < 1.0:
            self.fail(f"{value!r} is not a finite number in [0, 1)", param, ctx)
        return v


def default_output(model_path: str) -> str:
    root, ext = os.path.splitext(model_path)
    return f"{root}_pruned{ext or '.onnx'}"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--sparsity", "-s", type=SparsityType(), required=True,
              help="Fraction of prunable weights to zero, in [0, 1). Exact: round(S*N) weights end up zero.")
@click.option("--method", "-m", type=click.Choice(list(METHODS)), default="lamp", show_default=True,
              help="lamp | global | global-mt | uniform | uniform+ | erk | igq | random.")
@click.option("--allocation", type=click.Choice(list(ALLOCATIONS)), default=None,
              help="Per-layer counts for --method random (default igq).")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Leave layers whose weight or node name matches GLOB dense. Repeatable.")
@click.option("--min-keep", default="0.05%", show_default=True,
              help="global-mt: weights every layer keeps, a count (715) or a percent of all prunable weights.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --method random.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Output path (default: MODEL_pruned.onnx beside the input). Never the input itself.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write the JSON report to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout (also on failure).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.option("-v", "--verbose", is_flag=True, help="More logging; tracebacks on errors.")
@click.version_option(__version__, prog_name="onnxprune")
def main(model, sparsity, method, allocation, exclude, min_keep, seed, output, report_path, as_json, dry_run,
         quiet, verbose):
    """Prune MODEL (an .onnx file) to an exact global SPARSITY and write MODEL_pruned.onnx.

    \b
    Examples:
      onnxprune model.onnx --sparsity 0.95                      # LAMP, writes model_pruned.onnx
      onnxprune model.onnx -s 0.9 --method global-mt --min-keep 0.1%
      onnxprune model.onnx -s 0.8 --method random --allocation erk --seed 3
      onnxprune model.onnx -s 0.9 --exclude 'classifier*' --report report.json
      onnxprune model.onnx -s 0.9 --dry-run --json

    \b
    Exit codes: 0 done, 1 accuracy gate failed, 2 usage, 3 input rejected,
    4 request cannot be met, 5 output error, 70 internal error.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING,
                        format="onnxprune: %(levelname)s: %(message)s", stream=sys.stderr)
    out_path = output or default_output(model)
    config = PruneConfig(sparsity=sparsity, method=method, allocation=allocation, exclude=tuple(exclude),
                         min_keep=min_keep, seed=seed, dry_run=dry_run)
    try:
        config.resolve()
        parse_min_keep(min_keep, 1)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    report = Report(version=__version__, method=method, allocation=allocation or "", score="",
                    target_sparsity=sparsity, input=model, dry_run=dry_run)
    code = EXIT_OK
    try:
        t0 = time.perf_counter()
        loaded = load_model(model)
        if not dry_run:
            check_output_path(out_path, loaded)  # fail before any work
        t_load = time.perf_counter() - t0
        report = prune_loaded(loaded, config)
        report.timings["load"] = t_load
        if not dry_run:
            t1 = time.perf_counter()
            report.written = save_model(loaded, out_path, digest=bool(report_path or as_json))
            report.output = out_path
            report.timings["save"] = time.perf_counter() - t1
        report.timings["total"] = time.perf_counter() - t0
    except OnnxPruneError as exc:
        code = next(c for t, c in EXIT_CODES.items() if isinstance(exc, t)) if type(exc) is not OnnxPruneError else EXIT_INTERNAL
        _fail(report, code, str(exc), verbose)
    except Exception as exc:  # a bug: say so plainly
        code = EXIT_INTERNAL
        _fail(report, code, f"internal error: {type(exc).__name__}: {exc} (please report; -v for a traceback)",
              verbose)
    if report_path and not dry_run:
        _write_report(report_path, report, model)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=False))
    if code == EXIT_OK and not quiet:
        from .table import print_report
        print_report(report, stderr=as_json)
    sys.exit(code)


def _fail(report: Report, code: int, message: str, verbose: bool) -> None:
    report.status, report.exit_code, report.error = "error", code, message.splitlines()[0] if message else ""
    if verbose:
        traceback.print_exc()
    click.echo(f"onnxprune: error: {report.error}", err=True)


def _write_report(path: str, report: Report, model: str) -> None:
    try:
        if os.path.exists(model) and os.path.samefile(path, model):
            click.echo("onnxprune: error: --report would overwrite the input model; not written", err=True)
            return
    except OSError:
        pass
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".onnxprune-report-")
        with os.fdopen(fd, "w") as fh:
            json.dump(report.to_dict(), fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        click.echo(f"onnxprune: error: cannot write report {path}: {exc.strerror or exc}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
