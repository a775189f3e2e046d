"""Click CLI: options, progress, tables, exit codes. The only module that prints or exits."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import sys
import time
import traceback

import click

from . import __version__
from .allocation import ALLOCATIONS
from .errors import (AccuracyGateError, ConfigError, InputError, Interrupted, OnnxPruneError, OutputError,
                     RequestError)
from .inputs import MAX_BATCH_SIZE, MAX_BATCHES
from .methods import METHODS
from .report import Report

DEVICES = ("auto", "cuda", "tensorrt", "cpu")  # validate.DEVICES, without importing ONNX Runtime at start-up
GATE_METRICS = ("auto", "accuracy", "agreement", "nonblank-agreement", "sequence-match", "rel-error", "cosine", "snr")

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
            hint = f"; did you mean {v / 100:g}?" if 1.0 <= v < 100.0 else ""
            self.fail(f"{value!r} is not a finite number in [0, 1){hint}", param, ctx)
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


class BoundType(click.ParamType):
    """A finite float within [lo, hi]."""
    name = "FLOAT"

    def __init__(self, lo=-math.inf, hi=math.inf):
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v) or not self.lo <= v <= self.hi:
            self.fail(f"{value!r} is not a finite number in [{self.lo}, {self.hi}]", param, ctx)
        return v


class SizeType(click.ParamType):
    """A byte count with an optional K/M/G/T suffix (powers of 1024), or 'never' (None)."""
    name = "SIZE"
    UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        if text == "NEVER":
            return None
        unit = text[-1:] if text[-1:] in self.UNITS else ""
        try:
            number = float(text[: len(text) - len(unit)])
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < 0 or number * self.UNITS[unit] > 1 << 62:
            self.fail(f"{value!r} is not a size (e.g. 0, 512M, 2G) or 'never'", param, ctx)
        return int(number * self.UNITS[unit])


class JsonAwareCommand(click.Command):
    """With --json, a usage error still prints one JSON document on stdout (and Click's message on stderr)."""

    def main(self, args=None, *a, **kw):
        argv = list(sys.argv[1:] if args is None else args)
        try:
            return super().main(argv, *a, standalone_mode=False, **{k: v for k, v in kw.items()
                                                                     if k != "standalone_mode"})
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("onnxprune: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            message = _usage_message(exc)
            if "--json" in argv:  # the same document as every other run, with what is known
                report = Report(version=__version__, method="", allocation="", score="", target_sparsity=None,
                                input=next((a for a in argv if not a.startswith("-")), None))
                report.status, report.exit_code, report.error = "error", exc.exit_code, message
                click.echo(report_json(report))
            click.echo(f"onnxprune: error: {message}", err=True)
            sys.exit(exc.exit_code)


def _usage_message(exc: click.ClickException) -> str:
    """A usage error on one line, like every other error, with a hint for the habits of similar tools."""
    text = " ".join(exc.format_message().split())
    m = re.match(r"Got unexpected extra arguments? \((.*)\)", text)
    if m:
        extra = m.group(1).split()
        text = (f"unexpected argument {' '.join(extra)!r}: onnxprune takes one MODEL; to name the output file, "
                f"use -o {extra[0]}")
    if isinstance(exc, click.UsageError) and not isinstance(exc, click.NoSuchOption):
        text += " (onnxprune --help lists the options)"
    return text


def default_output(model_path: str) -> str:
    root, ext = os.path.splitext(model_path)
    return f"{root}_pruned{ext or '.onnx'}"


@click.command(cls=JsonAwareCommand,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 80})
@click.argument("model", type=str)
@click.option("--sparsity", "-s", type=SparsityType(), required=True,
              help="Fraction of prunable weights to zero, in [0, 1) (exact: round(S*N)); 'auto' with a gate "
                   "bound searches the highest sparsity that passes it.")
@click.option("--method", "-m", type=click.Choice(list(METHODS)), default="lamp", show_default=True,
              help="lamp | global | global-mt | uniform | uniform+ | erk | igq | random | lap (lookahead).")
@click.option("--allocation", type=click.Choice(list(ALLOCATIONS)), default=None,
              help="Per-layer counts for --method random (default igq) and lap (default uniform).")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Leave layers whose weight or node name matches GLOB dense. Repeatable; a GLOB matching "
                   "no layer is an error.")
@click.option("--min-keep", default="0.05%", show_default=True,
              help="global-mt: weights every layer keeps, a count (715) or a percent of all prunable weights.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed for --method random and synthetic inputs.")
@click.option("-o", "--output", type=str, default=None,
              help="Output path (default: MODEL_pruned.onnx beside the input). Never the input itself.")
@click.option("--effective/--no-effective", default=True, show_default=True,
              help="Remove detached units after pruning (zero weights that reach no output; fold constant inputs "
                   "into biases where exact). Effective sparsity is reported either way.")
@click.option("--target", type=click.Choice(["direct", "effective", "macs"]), default="direct", show_default=True,
              help="What --sparsity means: the fraction of weights zeroed (direct), of weights on no "
                   "input-to-output path (effective), or of the prunable layers' multiply-accumulates per sample "
                   "removed (macs: --granularity channel; dynamic inputs sized by --input-shape).")
@click.option("--effective-mode", type=click.Choice(["channel", "exact"]), default="channel", show_default=True,
              help="channel: unit-level reachability (exact for MLPs, a lower bound for CNNs); exact: per "
                   "(channel, position), also catching kernel taps that only read padding (slower).")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Run dense and pruned model in ONNX Runtime on the same inputs and compare every output.")
@click.option("--data", type=str, default=None,
              help=".npz with arrays named after the inputs (+ labels in 'y' or 'labels'), or a directory of .npy; "
                   "samples on each input's batch axis, inputs without one (scalars) given once.")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=32, show_default=True,
              help="Batch size for a dynamic batch dimension.")
@click.option("--batches", type=click.IntRange(1, MAX_BATCHES), default=4, show_default=True,
              help="Number of synthetic batches when no --data is given.")
@click.option("--input-shape", multiple=True, metavar="NAME:D1,D2,...",
              help="Shape of a synthetic input with dynamic dimensions, e.g. images:1,3,640,640 (NAME: for a "
                   "scalar). Repeatable.")
@click.option("--synthetic", default="normal", show_default=True, metavar="normal[:M,S]|uniform[:LO,HI]",
              help="Distribution of synthetic float inputs, e.g. uniform:0,1 for image models that expect [0, 1].")
@click.option("--granularity", type=click.Choice(["weight", "channel"]), default="weight", show_default=True,
              help="weight: unstructured zeros; channel: whole output channels/neurons (then --compact), what "
                   "makes any runtime faster.")
@click.option("--compact/--no-compact", default=None,
              help="Physically delete dead units so shapes shrink (default: on with --granularity channel; "
                   "otherwise the report says what it would remove).")
@click.option("--channel-floor", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="--granularity channel: every layer keeps at least this fraction of its output channels, so "
                   "that no layer or backbone stage is emptied (0: only never every channel).")
@click.option("--align", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Keep compacted channel counts at multiples of N (8 recommended for CPU runtimes).")
@click.option("--reconstruct/--no-reconstruct", default=None,
              help="Calibrated reconstruction: choose each layer's kept weights with second-order information and "
                   "refit them to reproduce the dense layer (needs --calibration, or --data to split). On by "
                   "default when --calibration is given.")
@click.option("--calibration", type=str, default=None,
              help="Calibration inputs for --reconstruct (same formats as --data; never the evaluation data).")
@click.option("--calibration-samples", type=click.IntRange(1, 1 << 20), default=128, show_default=True,
              help="Use the first N calibration samples (with --data alone: the first N calibrate, the rest "
                   "evaluate).")
@click.option("--stream-above", type=SizeType(), default="256M", show_default=True, metavar="SIZE|never",
              help="A model with at least this much external data keeps its weights in the data file and "
                   "writes them block by block (memory stays near one tensor); same output either way.")
@click.option("--device", type=click.Choice(list(DEVICES)), default="auto", show_default=True,
              help="ONNX Runtime device: auto uses CUDA when a session really runs on it, else the CPU.")
@click.option("--max-drop", type=FractionType(), default=None,
              help="Gate for classification/sequence outputs: fail (exit 1, nothing written) when top-1 accuracy "
                   "(with labels) or agreement drops by more than this fraction (0.01 = one point).")
@click.option("--max-rel-error", type=BoundType(0.0), default=None,
              help="Gate for other float outputs (detection heads, embeddings, maps): fail when the relative L2 "
                   "error ||pruned - dense|| / ||dense|| exceeds this, e.g. 0.05.")
@click.option("--min-cosine", type=BoundType(-1.0, 1.0), default=None,
              help="Gate: fail when the mean per-sample cosine similarity falls below this, e.g. 0.99 "
                   "(with --metric cosine, or for outputs gated by cosine).")
@click.option("--min-snr", type=BoundType(), default=None,
              help="Gate: fail when the signal-to-noise ratio in dB falls below this, e.g. 20 (with --metric snr).")
@click.option("--metric", "gate_metric", type=click.Choice(GATE_METRICS), default="auto", show_default=True,
              metavar="NAME",
              help="What every gated output is read by: accuracy | agreement | nonblank-agreement | "
                   "sequence-match | rel-error | cosine | snr; auto: each bound gates the outputs its metric "
                   "applies to.")
@click.option("--blank", type=click.IntRange(0), default=None,
              help="Blank class of per-position [N, T, C] outputs (CTC); default: the class the dense model "
                   "predicts most.")
@click.option("--gate-output", multiple=True, metavar="NAME",
              help="Gate these outputs only (repeatable; default: every float output pruning can change).")
@click.option("--keep-failed", is_flag=True, help="Write the output even when the gate fails (still exit 1).")
@click.option("--sensitivity", is_flag=True, help="Also prune one layer at a time to the target and report drops.")
@click.option("--plot", type=str, default=None,
              help="With --sparsity auto: draw the search curve to this PNG (needs matplotlib).")
@click.option("--report", "report_path", type=str, default=None,
              help="Write the JSON report to this file (also with --dry-run).")
@click.option("--table", "table_mode", type=click.Choice(["auto", "full", "none"]), default="auto",
              show_default=True,
              help="Per-layer table: auto is compact (largest layers + totals) above 25 layers; none: summary only.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout and nothing else.")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing but --report (and validate nothing).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.option("-v", "--verbose", is_flag=True, help="More logging; tracebacks on errors; ONNX Runtime's own messages.")
@click.version_option(__version__, prog_name="onnxprune")
def main(model, sparsity, method, allocation, exclude, min_keep, seed, output, effective, target, effective_mode,
         validate, data, batch_size, batches, input_shape, synthetic, granularity, compact, align, reconstruct,
         calibration, channel_floor, calibration_samples, stream_above,
         device, max_drop, max_rel_error, min_cosine,
         min_snr, gate_metric, blank, gate_output, keep_failed, sensitivity, plot, report_path, table_mode, as_json,
         dry_run, quiet, verbose):
    """Prune MODEL (an .onnx file) to an exact global SPARSITY, validate it, write MODEL_pruned.onnx.

    \b
    Examples:
      onnxprune model.onnx --sparsity 0.95           # LAMP -> model_pruned.onnx
      onnxprune model.onnx -s 0.9 --method global-mt --min-keep 0.1%
      onnxprune model.onnx -s 0.9 --method lap --allocation lamp
      onnxprune model.onnx -s 0.99 --target effective
      onnxprune model.onnx -s 0.9 --exclude 'classifier*' --report r.json
      onnxprune model.onnx -s 0.9 --data test.npz --max-drop 0.01
      onnxprune yolo.onnx -s 0.5 --input-shape images:1,3,640,640 \\
          --synthetic uniform:0,1 --max-rel-error 0.1
      onnxprune encoder.onnx -s 0.5 --input-shape input_ids:8,128 \\
          --min-cosine 0.99
      onnxprune vad.onnx -s 0.8 --data chunks.npz --gate-output output \\
          --metric snr --min-snr 20
      onnxprune ocr_rec.onnx -s 0.5 --data lines.npz --max-drop 0.02
      onnxprune model.onnx -s 0.95 --data test.npz --reconstruct
      onnxprune model.onnx -s 0.9 --calibration calib.npz --data test.npz
      onnxprune model.onnx -s auto --data test.npz --max-drop 0.01
      onnxprune model.onnx -s 0.5 --granularity channel --align 8
      onnxprune model.onnx -s 0.9 --dry-run --json

    \b
    Exit codes: 0 done, 1 gate failed, 2 usage, 3 input rejected,
    4 request cannot be met, 5 output error, 70 internal error (a bug),
    130/143/129 interrupted by SIGINT/SIGTERM/SIGHUP.
    """
    _ascii_fallback()
    for label, path in (("MODEL", model), ("-o", output), ("--report", report_path), ("--plot", plot),
                        ("--data", data), ("--calibration", calibration)):
        if path == "-":  # the usual spelling of standard input/output, which onnxprune neither reads nor writes
            hint = " (--json prints the report on standard output)" if label == "--report" else ""
            raise click.UsageError(f"{label} '-': onnxprune does not read standard input or write standard output "
                                   f"for files{hint}; for a file named '-' write ./-")
    # warnings reach the user once, through the report (table, JSON); logging shows them too only with -v
    logging.basicConfig(level=logging.DEBUG if verbose else logging.ERROR,
                        format="onnxprune: %(levelname)s: %(message)s", stream=sys.stderr)
    from .pipeline import PruneConfig, parse_min_keep
    search = sparsity == "auto"
    config = PruneConfig(sparsity=0.0 if search else sparsity, method=method, allocation=allocation,
                         exclude=tuple(exclude), min_keep=min_keep, seed=seed, dry_run=dry_run, effective=effective,
                         target=target, effective_mode=effective_mode, granularity=granularity, compact=compact,
                         align=align, channel_floor=channel_floor, stream_above=stream_above)
    try:
        config.resolve()
        parse_min_keep(min_keep, 1)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    gated = _bounded(locals())
    if search and (not gated or not validate or dry_run):
        raise click.UsageError("--sparsity auto needs a gate bound (--max-drop, --max-rel-error, --min-cosine or "
                               "--min-snr) and validation (not --no-validate/--dry-run)")
    if plot and not search:
        raise click.UsageError("--plot draws the --sparsity auto search curve")
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.UsageError("--plot needs matplotlib: pip install 'onnxprune[plot]'") from None
    if (gated or sensitivity) and (not validate or dry_run):
        raise click.UsageError("gate bounds and --sensitivity need validation (drop --no-validate/--dry-run)")
    if (gate_metric != "auto" or gate_output) and not gated:
        raise click.UsageError("--metric and --gate-output choose what a gate bound reads: give one "
                               "(--max-drop, --max-rel-error, --min-cosine or --min-snr)")

    if reconstruct is None:
        reconstruct = calibration is not None
    if reconstruct and not (calibration or data):
        raise click.UsageError("--reconstruct needs calibration data: --calibration PATH (or --data PATH, whose "
                               "first --calibration-samples samples then calibrate and the rest evaluate)")
    if calibration and not reconstruct:
        raise click.UsageError("--calibration is only read by --reconstruct")
    config.reconstruct = reconstruct  # after resolve() above: the calibration data is read later
    run = Run(model, output or default_output(model), config, locals(), quiet or as_json, verbose)
    with _signals_raise() as signals:
        run.hold_signals = signals.hold
        with _stdout_to_stderr():  # what a library prints (a native error text) never mixes into stdout
            code = run.execute()
            if code in (EXIT_OK, EXIT_GATE) and report_path:
                code = run.write_report(report_path) or code
        signals.hold()  # what is left is printing: it finishes
        if as_json:
            click.echo(report_json(run.report))
        elif code in (EXIT_OK, EXIT_GATE) and not quiet:
            from .table import print_report
            print_report(run.report, mode=table_mode)
        if signals.received:
            name = signal.Signals(signals.received[0]).name
            when = (f"after the outputs were published ({', '.join(run.committed)})" if run.committed
                    else "after the run's work was done")
            click.echo(f"onnxprune: {name} arrived {when}; the run finished", err=True)
    sys.exit(code)


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def report_json(report) -> str:
    return json.dumps(report.to_dict(), indent=2, default=_json_default, allow_nan=False)


class _signals_raise:
    """SIGTERM / SIGHUP / SIGINT raise Interrupted, so every ``with`` unwinds and removes its staging files; after
    ``hold()`` (the outputs are being published) they are only recorded in ``received``: the run finishes."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, n))

    def __enter__(self):
        self.old = {}
        self.held = False
        self.received = []
        for sig in self.SIGNALS:
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main thread (embedded use)
                pass
        return self

    def hold(self):
        self.held = True

    def _handle(self, signum, frame):
        if self.held:
            self.received.append(signum)
            return
        raise Interrupted(signum)

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


class _stdout_to_stderr:
    """File descriptor 1 points at stderr inside the block (LAPACK's and ONNX Runtime's native messages go
    there), and so does ``sys.stdout``; a no-op where stdout is not a real file (an embedding, a test runner)."""

    def __enter__(self):
        self.saved = None
        try:
            if sys.stdout.fileno() != 1 or sys.stderr.fileno() != 2:
                return self
            sys.stdout.flush()
            self.saved = os.dup(1)
            os.dup2(2, 1)
        except (AttributeError, OSError, ValueError):  # no real descriptors: nothing native can print there
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            try:
                sys.stdout.flush()
            except (OSError, ValueError):
                pass
            os.dup2(self.saved, 1)
            os.close(self.saved)


def _ascii_fallback() -> None:
    """On a stream that cannot encode '→' (cp1252 when redirected on Windows), print replacements, not crash."""
    from . import table
    for stream in (sys.stdout, sys.stderr):
        enc = getattr(stream, "encoding", None) or "ascii"
        try:
            "→×—…≥".encode(enc)
        except (UnicodeEncodeError, LookupError):
            table.ASCII = True
            try:
                stream.reconfigure(errors="replace")
            except (AttributeError, ValueError):
                pass


class Run:
    """One CLI invocation: load, prune (or search), validate, gate, commit; maps errors to exit codes."""

    def __init__(self, model, out_path, config, opts, quiet, verbose):
        self.model, self.out_path, self.config, self.o = model, out_path, config, opts
        self.quiet, self.verbose = quiet, verbose
        self.report = Report(version=__version__, method=config.method, allocation=config.allocation or "",
                             score="", target_sparsity=config.sparsity, input=model, dry_run=config.dry_run)
        self.t0 = time.perf_counter()
        from .table import Feedback
        self.feedback = Feedback(enabled=not quiet)
        self.extra = []  # staged --report/--plot files, published with the model
        self.committed = []  # what was published
        self.hold_signals = lambda: None  # main() makes this hold SIGINT/SIGTERM/SIGHUP once outputs go out

    def execute(self) -> int:
        try:
            return self._outcome()
        finally:
            for f in self.extra:
                f.discard()

    def _outcome(self) -> int:
        try:
            with self.feedback:
                self._execute()
            return EXIT_OK
        except AccuracyGateError as exc:
            return self._fail(EXIT_GATE, str(exc))
        except Interrupted as exc:
            return self._fail(128 + exc.signum, f"interrupted by {signal.Signals(exc.signum).name}; nothing "
                                                f"left behind")
        except KeyboardInterrupt:
            return self._fail(130, "interrupted by SIGINT; nothing left behind")
        except OnnxPruneError as exc:
            code = next((c for t, c in EXIT_CODES.items() if isinstance(exc, t)), EXIT_INTERNAL)
            return self._fail(code, str(exc))
        except MemoryError:
            return self._fail(EXIT_REQUEST, "out of memory (the model or the validation data is too large for "
                                            "this machine; try --no-validate or a smaller --batch-size)")
        except Exception as exc:  # a bug: say so plainly
            return self._fail(EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {exc} "
                                              f"(please report it; -v shows a traceback)")

    def _write_targets(self, loaded):
        from . import io as pio
        o = self.o
        writes = {"--report": o["report_path"], "--plot": o["plot"]}
        if not self.config.dry_run:
            writes["-o"] = self.out_path
        writes = {k: v for k, v in writes.items() if v}
        reads = [self.model] + list(loaded.external_files if loaded else [])
        reads += [p for p in (o["data"], o["calibration"]) if p]
        pio.check_write_targets(writes, reads, loaded)

    def _execute(self):
        from .io import load_model, stage_model
        from .io.staging import stage_bytes
        from .pipeline import prune_loaded
        o, config, fb = self.o, self.config, self.feedback
        with fb.stage("loading model"):
            loaded = load_model(self.model, config.stream_above)
        self._write_targets(loaded)  # fail before any work
        self.report.timings["load"] = t_load = time.perf_counter() - self.t0
        from .figures import disk_bytes
        self.size_before = disk_bytes([self.model, *loaded.external_files])
        from .inputs import parse_input_shapes
        config.input_shapes = parse_input_shapes(o["input_shape"])  # exact mode sizes dynamic inputs with them
        evaluation = self._datasets(loaded)
        validator = self._validator(loaded, evaluation) if o["validate"] and not config.dry_run else None
        self.dense_figures = None if config.dry_run else self._figures_before(loaded, validator)
        if getattr(self, "shapes", None):
            config.macs_shapes = dict(self.shapes)  # --target macs counts at the validated shape, as the figures do
        curve = None
        if o["sparsity"] == "auto":
            from .search import search_sparsity
            with fb.stage("searching") as st:
                def probe(s, v):
                    st(f"searching: sparsity {s:.3f} → {v.metric} {_num(v.pruned)} "
                       f"({'passes' if v.passed else 'fails'})")
                # each probe prunes its own fresh load; ``loaded`` stays dense for the final run
                best, curve, _ = search_sparsity(self.model, config, validator, self.out_path, progress=probe)
            if best == 0:
                self.report.search = {"chosen": 0.0, "curve": curve}
                raise AccuracyGateError(f"no sparsity on the grid passes the gate (the lowest probe, "
                                        f"{curve[0]['sparsity']:.3f}, fails: {curve[0]['metric']} "
                                        f"{_num(curve[0]['value'])}); nothing written")
            config.sparsity = best
        with fb.stage("pruning") as st:
            if config.reconstruct:
                def layer_progress(k, n, name, elapsed, eta):
                    left = f", about {_duration(eta)} left" if eta is not None else ""
                    st(f"reconstructing: layer {k} of {n} ({name}), {_duration(elapsed)} elapsed{left}")
                config.progress = layer_progress
            report = prune_loaded(loaded, config, defer_writes=True)  # saving writes the weights
        report.timings["load"] = t_load
        report.validation = self.report.validation  # a skip decided before pruning
        report.warnings[:0] = [w for w in self.report.warnings if w not in report.warnings]
        self.report = report
        report.sizes = {"before": self.size_before}
        if report.collapsed_outputs and _bounded(o):  # a gate cannot pass an output no input reaches any more
            names = ", ".join(f"'{n}' ({', '.join(layers)})" for n, layers in report.collapsed_outputs.items())
            raise RequestError(f"pruning to {config.sparsity:.4g} cuts output(s) {names} off from the inputs (an "
                               f"emptied layer on every path); nothing written: lower --sparsity or --exclude "
                               f"those layers")
        if curve is not None:
            report.search = {"gate": validator.bounds.__dict__ | {"outputs": list(validator.plan)},
                             "max_drop": o["max_drop"], "resolution": 0.005, "chosen": config.sparsity,
                             "curve": curve}
            if o["plot"]:
                from .search import plot_curve
                from .metrics import bound_badness
                plot_curve(curve, o["plot"], bound_badness(curve[-1]["metric"], validator.bounds), config.sparsity,
                           write=lambda path, data: self.extra.append(stage_bytes(path, data, label="--plot")))
        if config.dry_run:
            report.timings["total"] = time.perf_counter() - self.t0
            return
        t1 = time.perf_counter()
        with fb.stage("writing") as st, stage_model(
                loaded, self.out_path, digest=bool(o["report_path"] or o["as_json"]),
                progress=lambda k, n, name: st(f"writing: tensor {k} of {n} ({name}) from its data file")) \
                as staged:
            report.timings["save"] = time.perf_counter() - t1
            gate_error = None
            if validator is not None:
                t2 = time.perf_counter()
                with fb.progress("validating") as cb:
                    validator.progress = cb
                    v = validator.compare(staged.model_path)
                    validator.progress = None
                v.sparsity = config.sparsity
                report.validation = v.to_dict()
                report.timings["validate"] = time.perf_counter() - t2
                collapsed = [s for s in v.outputs if s.collapsed]
                for s in collapsed:
                    msg = (f"output '{s.name}' collapsed after pruning ({s.collapsed})"
                           + ("" if s.gated else "; it is not gated"))
                    report.warnings.append(msg)
                    logging.getLogger("onnxprune").warning(msg)
                if v.passed is False:
                    gate_error = f"gate failed: {v.failure()}"
                elif collapsed:  # a collapsed output fails the run with or without a gate
                    gate_error = "pruning collapsed " + ", ".join(f"output '{s.name}' ({s.collapsed})"
                                                                  for s in collapsed)
            if o["sensitivity"]:
                from .search import sensitivity
                names = [l.name for l in report.layers if not l.excluded]
                with fb.stage("sensitivity") as st:
                    report.sensitivity = sensitivity(
                        self.model, config, validator, self.out_path, names,
                        progress=lambda name, v: st(f"sensitivity: {name} → {v.metric} {_num(v.pruned)}"))
            if gate_error and not o["keep_failed"]:
                report.timings["total"] = time.perf_counter() - self.t0
                raise AccuracyGateError(gate_error + "; nothing written (--keep-failed writes it anyway)")
            # every output is staged before any is published: the figures come from the staged files, the report
            # is final before the model is renamed, and they are published together
            report.written = dict(staged.written)
            report.output = self.out_path
            with fb.stage("measuring"):
                report.figures = self._figures(loaded, report, staged.files())
            report.sizes["after"] = report.figures["after"]["file_bytes"]
            report.timings["total"] = time.perf_counter() - self.t0
            if gate_error:
                report.warnings.append(f"{gate_error}; written anyway because of --keep-failed")
                self._mark(EXIT_GATE, gate_error + "; written anyway (--keep-failed)")
            if o["report_path"]:
                self.extra.append(stage_bytes(o["report_path"], (report_json(report) + "\n").encode(),
                                              label="--report"))
            self.hold_signals()  # from here the run finishes: an interrupt is noted, not obeyed
            staged.commit(self.extra)
            self.committed = [self.out_path] + [f.path for f in self.extra]
            if gate_error:
                raise AccuracyGateError(gate_error + "; written anyway (--keep-failed)")

    def _datasets(self, loaded):
        """The evaluation Dataset (or None: synthetic); sets ``config.calibration`` for --reconstruct."""
        from .evaluation import prepare_data
        o, config = self.o, self.config
        d = prepare_data(loaded.model, o["data"], o["calibration"], o["calibration_samples"], o["batch_size"],
                         evaluate=o["validate"] and not config.dry_run, reconstruct=config.reconstruct)
        if d.calibration is not None:
            config.calibration, config.calibration_info = d.calibration.batches, d.calibration_info
            config.calibration_labels = d.calibration.labels
        self.report.warnings.extend(d.warnings)
        return d.evaluation

    def _validator(self, loaded, evaluation):
        """The Validator, or None with ``report.validation`` saying why validation is skipped."""
        from .evaluation import build_validator
        from .metrics import METRIC_ALIASES, Bounds
        from .validate import skipped
        o = self.o
        gate_needed = o["sparsity"] == "auto" or o["sensitivity"] or _bounded(o)
        bounds = Bounds(max_drop=o["max_drop"], max_rel_error=o["max_rel_error"], min_cosine=o["min_cosine"],
                        min_snr=o["min_snr"], outputs=tuple(o["gate_output"]), blank=o["blank"],
                        metric=None if o["gate_metric"] == "auto" else METRIC_ALIASES[o["gate_metric"]])
        with self.feedback.progress("validating") as cb:
            validator, why, warnings = build_validator(
                self.model, loaded.model, evaluation, bounds, batch_size=o["batch_size"], batches=o["batches"],
                seed=o["seed"], synthetic=o["synthetic"], input_shape=o["input_shape"], device=o["device"],
                exclude=self.config.exclude, gate_needed=gate_needed, verbose=self.verbose, progress=cb)
        if why:
            self.report.validation = skipped(why)
        self.report.warnings.extend(warnings)
        return validator

    def _figures_before(self, loaded, validator):
        """The dense side of the payoff figures, from the model in memory before it is pruned."""
        from .figures import figures
        shapes = None
        if validator is not None and validator.dataset.batches:
            shapes = {k: list(v.shape) for k, v in validator.dataset.batches[0].items()}
        self.shapes = shapes
        # the non-zero count comes from the report after pruning (zeros_before), not from a second read
        return figures(loaded.model, shapes, files=[self.model] + list(loaded.external_files), nonzero=-1)

    def _figures(self, loaded, report, files) -> dict:
        """Before → after: file and gzip size (of the staged ``files``), parameters, MACs per sample at the
        validated input shape, latency."""
        from .figures import ratios, figures
        dense = self.dense_figures
        rows = report.layers  # every weight compaction removes is a zero: the report's counts still hold
        dense["nonzero_prunable"] = sum(r.params - r.zeros_before for r in rows)
        pruned = figures(loaded.model, self.shapes, files=files,
                         nonzero=sum(r.params - r.zeros_after for r in rows))
        v = report.validation or {}
        if v.get("latency_ms_dense"):
            dense["latency_ms"], pruned["latency_ms"] = v["latency_ms_dense"], v["latency_ms_pruned"]
        ratio = ratios(dense, pruned)
        if dense.get("latency_ms"):
            ratio["latency_ms"] = pruned["latency_ms"] / dense["latency_ms"]
        return {"input_shapes": self.shapes, "before": dense, "after": pruned, "ratio": ratio}

    def write_report(self, path: str) -> int:
        """--report for a run that published no model (--dry-run, a failed gate); a published model's report
        went out with it."""
        from . import io as pio
        if path in [f.path for f in self.extra]:
            return 0
        try:
            pio.atomic_write_bytes(path, (report_json(self.report) + "\n").encode(), label="--report")
            return 0
        except OnnxPruneError as exc:
            return self._fail(EXIT_OUTPUT, f"{exc} (the report was not written)")
        except Interrupted as exc:
            return self._fail(128 + exc.signum, f"interrupted by {signal.Signals(exc.signum).name}; the report "
                                                f"was not written")

    def _mark(self, code: int, message: str) -> None:
        r = self.report
        r.status = "failed" if code == EXIT_GATE else "interrupted" if code >= 128 else "error"
        r.exit_code, r.error = code, (message.splitlines()[0] if message else "")
        r.timings.setdefault("total", time.perf_counter() - self.t0)

    def _fail(self, code: int, message: str) -> int:
        r = self.report
        self._mark(code, message)
        if self.verbose and code not in (EXIT_GATE,) and code < 128:
            traceback.print_exc()
        click.echo(f"onnxprune: error: {r.error}", err=True)
        return code


def _bounded(o: dict) -> bool:
    """Whether the run's options set a gate bound."""
    return any(o[k] is not None for k in ("max_drop", "max_rel_error", "min_cosine", "min_snr"))


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else str(x)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"


def ignore_late_signals() -> None:
    """The process is exiting with its outcome decided and its files in place: a signal during the interpreter's
    teardown is ignored rather than killing it with another status."""
    for sig in _signals_raise.SIGNALS:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):
            pass


if __name__ == "__main__":  # pragma: no cover
    try:
        main()
    finally:
        ignore_late_signals()
