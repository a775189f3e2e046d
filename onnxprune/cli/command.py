"""The click command: options, their cross-checks, and the process's exit."""
from __future__ import annotations

import logging
import os
import re
import signal
import sys

import click

from .. import __version__
from ..allocation import ALLOCATIONS
from ..inputs import MAX_BATCH_SIZE, MAX_BATCHES
from ..methods import METHODS
from ..report import Report
from .params import BoundType, FractionType, SizeType, SparsityType
from .process import _ascii_fallback, _signals_raise, _stdout_to_stderr
from .run import EXIT_GATE, EXIT_OK, Run, _bounded, report_json

DEVICES = ("auto", "cuda", "tensorrt", "cpu")  # validate.DEVICES, without importing ONNX Runtime at start-up
GATE_METRICS = ("auto", "accuracy", "agreement", "nonblank-agreement", "sequence-match", "rel-error", "cosine", "snr")


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
    from ..pipeline import PruneConfig, parse_min_keep
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
            from ..table import print_report
            print_report(run.report, mode=table_mode)
        if signals.received:
            name = signal.Signals(signals.received[0]).name
            when = (f"after the outputs were published ({', '.join(run.committed)})" if run.committed
                    else "after the run's work was done")
            click.echo(f"onnxprune: {name} arrived {when}; the run finished", err=True)
    sys.exit(code)
