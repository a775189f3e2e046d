"""Click CLI: options, progress, tables, exit codes. The only module that prints or exits."""
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
from .errors import AccuracyGateError, ConfigError, InputError, OnnxPruneError, OutputError, RequestError
from .io import check_output_path, load_model, stage_model
from .pipeline import METHODS, PruneConfig, parse_min_keep, prune_loaded
from .report import Report
from .validate import DEVICES

# Exit codes, defined once (README "Exit codes").
EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INPUT, EXIT_REQUEST, EXIT_OUTPUT, EXIT_INTERNAL = 0, 1, 2, 3, 4, 5, 70
EXIT_CODES = {AccuracyGateError: EXIT_GATE, ConfigError: EXIT_USAGE, InputError: EXIT_INPUT,
              RequestError: EXIT_REQUEST, OutputError: EXIT_OUTPUT}


class SparsityType(click.ParamType):
    """A finite float in [0, 1), or 'auto'. (click.FloatRange lets 'nan' through.)"""
    name = "FLOAT|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number (or 'auto')", param, ctx)
        if not math.isfinite(v) or not 0.0 <= v < 1.0:
            self.fail(f"{value!r} is not a finite number in [0, 1)", param, ctx)
        return v


class FractionType(click.ParamType):
    name = "FRACTION"

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v) or not 0.0 <= v <= 1.0:
            self.fail(f"{value!r} is not a finite number in [0, 1]", param, ctx)
        return v


class JsonAwareCommand(click.Command):
    """With --json, a usage error still prints one JSON document on stdout (and Click's message on stderr)."""

    def main(self, args=None, *a, **kw):
        argv = list(sys.argv[1:] if args is None else args)
        try:
            return super().main(argv, *a, standalone_mode=False, **{k: v for k, v in kw.items()
                                                                     if k != "standalone_mode"})
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            if "--json" in argv:
                click.echo(json.dumps({"schema_version": 1, "status": "error", "exit_code": exc.exit_code,
                                       "error": exc.format_message(), "onnxprune_version": __version__}, indent=2))
            exc.show()
            sys.exit(exc.exit_code)


def default_output(model_path: str) -> str:
    root, ext = os.path.splitext(model_path)
    return f"{root}_pruned{ext or '.onnx'}"


@click.command(cls=JsonAwareCommand,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--sparsity", "-s", type=SparsityType(), required=True,
              help="Fraction of prunable weights to zero, in [0, 1) (exact: round(S*N)); 'auto' with --max-drop "
                   "searches the highest sparsity within the accuracy budget.")
@click.option("--method", "-m", type=click.Choice(list(METHODS)), default="lamp", show_default=True,
              help="lamp | global | global-mt | uniform | uniform+ | erk | igq | random | lap (lookahead).")
@click.option("--allocation", type=click.Choice(list(ALLOCATIONS)), default=None,
              help="Per-layer counts for --method random (default igq) and lap (default uniform).")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Leave layers whose weight or node name matches GLOB dense. Repeatable.")
@click.option("--min-keep", default="0.05%", show_default=True,
              help="global-mt: weights every layer keeps, a count (715) or a percent of all prunable weights.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --method random and synthetic inputs.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Output path (default: MODEL_pruned.onnx beside the input). Never the input itself.")
@click.option("--effective/--no-effective", default=True, show_default=True,
              help="Remove detached units after pruning (zero weights that reach no output; fold constant inputs "
                   "into biases where exact). Effective sparsity is reported either way.")
@click.option("--target", type=click.Choice(["direct", "effective"]), default="direct", show_default=True,
              help="What --sparsity means: the fraction of weights zeroed (direct) or of weights on no "
                   "input-to-output path (effective).")
@click.option("--effective-mode", type=click.Choice(["channel", "exact"]), default="channel", show_default=True,
              help="channel: unit-level reachability (exact for MLPs, a lower bound for CNNs); exact: per "
                   "(channel, position), also catching kernel taps that only read padding (slower).")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Run dense and pruned model in ONNX Runtime on the same inputs and compare.")
@click.option("--data", type=click.Path(exists=False, path_type=str), default=None,
              help=".npz with arrays named after the inputs (+ labels in 'y' or 'labels'), or a directory of .npy.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Batch size for a dynamic leading dimension.")
@click.option("--batches", type=click.IntRange(min=1), default=4, show_default=True,
              help="Number of synthetic batches when no --data is given.")
@click.option("--input-shape", multiple=True, metavar="NAME:D1,D2,...",
              help="Shape of a synthetic input with dynamic dimensions, e.g. images:1,3,224,224. Repeatable.")
@click.option("--device", type=click.Choice(list(DEVICES)), default="auto", show_default=True,
              help="ONNX Runtime device: auto uses CUDA when a session really runs on it, else the CPU.")
@click.option("--max-drop", type=FractionType(), default=None,
              help="Accuracy gate: fail (exit 1, nothing written) when the drop exceeds this fraction "
                   "(0.01 = one point of accuracy with labels, of top-1 agreement without).")
@click.option("--keep-failed", is_flag=True, help="Write the output even when the gate fails (still exit 1).")
@click.option("--sensitivity", is_flag=True, help="Also prune one layer at a time to the target and report drops.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="With --sparsity auto: draw the search curve to this PNG (needs matplotlib).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write the JSON report to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout (also on failure).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing (and validate nothing).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.option("-v", "--verbose", is_flag=True, help="More logging; tracebacks on errors; ONNX Runtime's own messages.")
@click.version_option(__version__, prog_name="onnxprune")
def main(model, sparsity, method, allocation, exclude, min_keep, seed, output, effective, target, effective_mode,
         validate, data,
         batch_size, batches,
         input_shape, device, max_drop, keep_failed, sensitivity, plot, report_path, as_json, dry_run, quiet,
         verbose):
    """Prune MODEL (an .onnx file) to an exact global SPARSITY, validate it, write MODEL_pruned.onnx.

    \b
    Examples:
      onnxprune model.onnx --sparsity 0.95                      # LAMP, writes model_pruned.onnx
      onnxprune model.onnx -s 0.9 --method global-mt --min-keep 0.1%
      onnxprune model.onnx -s 0.8 --method random --allocation erk --seed 3
      onnxprune model.onnx -s 0.9 --method lap --allocation lamp
      onnxprune model.onnx -s 0.99 --target effective          # 99 % of weights on no input-output path
      onnxprune model.onnx -s 0.9 --exclude 'classifier*' --report report.json
      onnxprune model.onnx -s 0.9 --data test.npz --max-drop 0.01      # CI gate: exit 1 if accuracy drops > 1 pt
      onnxprune model.onnx -s auto --data test.npz --max-drop 0.01 --plot curve.png
      onnxprune model.onnx -s 0.9 --dry-run --json

    \b
    Exit codes: 0 done, 1 accuracy gate failed, 2 usage, 3 input rejected,
    4 request cannot be met, 5 output error, 70 internal error.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING,
                        format="onnxprune: %(levelname)s: %(message)s", stream=sys.stderr)
    search = sparsity == "auto"
    config = PruneConfig(sparsity=0.0 if search else sparsity, method=method, allocation=allocation,
                         exclude=tuple(exclude), min_keep=min_keep, seed=seed, dry_run=dry_run, effective=effective,
                         target=target, effective_mode=effective_mode)
    try:
        config.resolve()
        parse_min_keep(min_keep, 1)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if search and (max_drop is None or not validate or dry_run):
        raise click.UsageError("--sparsity auto needs --max-drop and validation (not --no-validate/--dry-run)")
    if plot and not search:
        raise click.UsageError("--plot draws the --sparsity auto search curve")
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.UsageError("--plot needs matplotlib: pip install 'onnxprune[plot]'") from None
    if (max_drop is not None or sensitivity) and (not validate or dry_run):
        raise click.UsageError("--max-drop and --sensitivity need validation (drop --no-validate/--dry-run)")

    run = Run(model, output or default_output(model), config, locals(), quiet or as_json, verbose)
    code = run.execute()
    if report_path and not dry_run:
        _write_report(report_path, run.report, model)
    if as_json:
        click.echo(json.dumps(run.report.to_dict(), indent=2))
    if code in (EXIT_OK, EXIT_GATE) and not quiet:
        from .table import print_report
        print_report(run.report, stderr=as_json)
    sys.exit(code)


class Run:
    """One CLI invocation: load, prune (or search), validate, gate, commit; maps errors to exit codes."""

    def __init__(self, model, out_path, config, opts, quiet, verbose):
        self.model, self.out_path, self.config, self.o = model, out_path, config, opts
        self.quiet, self.verbose = quiet, verbose
        self.report = Report(version=__version__, method=config.method, allocation=config.allocation or "",
                             score="", target_sparsity=config.sparsity, input=model, dry_run=config.dry_run)

    def execute(self) -> int:
        try:
            self._execute()
            return EXIT_OK
        except AccuracyGateError as exc:
            return self._fail(EXIT_GATE, str(exc))
        except OnnxPruneError as exc:
            code = next((c for t, c in EXIT_CODES.items() if isinstance(exc, t)), EXIT_INTERNAL)
            return self._fail(code, str(exc))
        except Exception as exc:  # a bug: say so plainly
            return self._fail(EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {exc} "
                                              f"(please report it; -v shows a traceback)")

    def _execute(self):
        o, config = self.o, self.config
        t0 = time.perf_counter()
        loaded = load_model(self.model)
        if not config.dry_run:
            check_output_path(self.out_path, loaded)  # fail before any work
        t_load = time.perf_counter() - t0
        validator = self._validator(loaded) if o["validate"] and not config.dry_run else None
        curve = None
        if o["sparsity"] == "auto":
            from .search import plot_curve, search_sparsity
            with self._progress("search") as cb:
                # each probe prunes its own fresh load; ``loaded`` stays dense for the final run
                best, curve, _ = search_sparsity(self.model, config, validator, self.out_path, o["max_drop"],
                                                 progress=cb and (lambda s, v: cb(f"sparsity {s:.3f}", 0, 0)))
            config.sparsity = best
        self.report = report = prune_loaded(loaded, config)
        report.timings["load"] = t_load
        if curve is not None:
            report.search = {"max_drop": o["max_drop"], "resolution": 0.005, "chosen": config.sparsity, "curve": curve}
            if o["plot"]:
                plot_curve(curve, o["plot"], o["max_drop"], config.sparsity)
        if config.dry_run:
            report.timings["total"] = time.perf_counter() - t0
            return
        t1 = time.perf_counter()
        with stage_model(loaded, self.out_path, digest=bool(o["report_path"] or o["as_json"])) as staged:
            report.timings["save"] = time.perf_counter() - t1
            gate_error = None
            if validator is not None:
                t2 = time.perf_counter()
                v = validator.compare(staged.model_path, o["max_drop"])
                v.sparsity = config.sparsity
                report.validation = v.to_dict()
                report.timings["validate"] = time.perf_counter() - t2
                if v.passed is False:
                    gate_error = (f"accuracy gate failed: {v.metric} drop {v.drop:.4f} > max {o['max_drop']:.4f}"
                                  + (" (non-finite outputs)" if v.drop <= o["max_drop"] else ""))
            if o["sensitivity"]:
                from .search import sensitivity
                names = [l.name for l in report.layers if not l.excluded]
                report.sensitivity = sensitivity(self.model, config, validator, self.out_path, names)
            if gate_error and not o["keep_failed"]:
                report.timings["total"] = time.perf_counter() - t0
                raise AccuracyGateError(gate_error + "; nothing written (--keep-failed writes it anyway)")
            report.written = staged.commit()
            report.output = self.out_path
            report.timings["total"] = time.perf_counter() - t0
            if gate_error:
                report.warnings.append(f"{gate_error}; written anyway because of --keep-failed")
                raise AccuracyGateError(gate_error + "; written anyway (--keep-failed)")

    def _validator(self, loaded):
        from .data import input_specs, load_data, parse_input_shapes, synthesize
        from .validate import Validator
        o = self.o
        specs = input_specs(loaded.model)
        if o["data"]:
            dataset = load_data(o["data"], specs, o["batch_size"])
        else:
            dataset = synthesize(specs, o["batch_size"], o["batches"], o["seed"], parse_input_shapes(o["input_shape"]))
        dense_path = self.model
        with self._progress("validate") as cb:
            return Validator(dense_path, dataset, o["device"], quiet=not self.verbose, progress=cb)

    def _progress(self, what):
        from contextlib import contextmanager

        @contextmanager
        def bar():
            if self.quiet:
                yield None
                return
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          console=Console(stderr=True), transient=True) as progress:
                tasks = {}

                def cb(label, done, total):
                    if label not in tasks:
                        tasks[label] = progress.add_task(f"{what} {label}", total=total or None)
                    progress.update(tasks[label], completed=done)
                yield cb
        return bar()

    def _fail(self, code: int, message: str) -> int:
        r = self.report
        r.status, r.exit_code, r.error = ("failed" if code == EXIT_GATE else "error"), code, \
            (message.splitlines()[0] if message else "")
        if self.verbose and code != EXIT_GATE:
            traceback.print_exc()
        click.echo(f"onnxprune: error: {r.error}", err=True)
        return code


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
