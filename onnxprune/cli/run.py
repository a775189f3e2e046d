"""One CLI invocation: load, prune (or search), validate, gate, commit; progress lines; errors to exit codes."""
from __future__ import annotations

import json
import logging
import signal
import time
import traceback

import click

from .. import __version__
from ..errors import (AccuracyGateError, ConfigError, InputError, Interrupted, OnnxPruneError, OutputError,
                      RequestError)
from ..report import Report

# Exit codes, defined once (README "Exit codes").
EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INPUT, EXIT_REQUEST, EXIT_OUTPUT, EXIT_INTERNAL = 0, 1, 2, 3, 4, 5, 70
EXIT_CODES = {AccuracyGateError: EXIT_GATE, ConfigError: EXIT_USAGE, InputError: EXIT_INPUT,
              RequestError: EXIT_REQUEST, OutputError: EXIT_OUTPUT}


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def report_json(report) -> str:
    return json.dumps(report.to_dict(), indent=2, default=_json_default, allow_nan=False)


class Run:
    """One CLI invocation: load, prune (or search), validate, gate, commit; maps errors to exit codes."""

    def __init__(self, model, out_path, config, opts, quiet, verbose):
        self.model, self.out_path, self.config, self.o = model, out_path, config, opts
        self.quiet, self.verbose = quiet, verbose
        self.report = Report(version=__version__, method=config.method, allocation=config.allocation or "",
                             score="", target_sparsity=config.sparsity, input=model, dry_run=config.dry_run)
        self.t0 = time.perf_counter()
        from ..table import Feedback
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
        from .. import io as pio
        o = self.o
        writes = {"--report": o["report_path"], "--plot": o["plot"]}
        if not self.config.dry_run:
            writes["-o"] = self.out_path
        writes = {k: v for k, v in writes.items() if v}
        reads = [self.model] + list(loaded.external_files if loaded else [])
        reads += [p for p in (o["data"], o["calibration"]) if p]
        pio.check_write_targets(writes, reads, loaded)

    def _execute(self):
        from ..io import load_model, stage_model
        from ..io.staging import stage_bytes
        from ..pipeline import prune_loaded
        o, config, fb = self.o, self.config, self.feedback
        with fb.stage("loading model"):
            loaded = load_model(self.model, config.stream_above)
        self._write_targets(loaded)  # fail before any work
        self.report.timings["load"] = t_load = time.perf_counter() - self.t0
        from ..figures import disk_bytes
        self.size_before = disk_bytes([self.model, *loaded.external_files])
        from ..inputs import parse_input_shapes
        config.input_shapes = parse_input_shapes(o["input_shape"])  # exact mode sizes dynamic inputs with them
        evaluation = self._datasets(loaded)
        validator = self._validator(loaded, evaluation) if o["validate"] and not config.dry_run else None
        self.dense_figures = None if config.dry_run else self._figures_before(loaded, validator)
        if getattr(self, "shapes", None):
            config.macs_shapes = dict(self.shapes)  # --target macs counts at the validated shape, as the figures do
        curve = None
        if o["sparsity"] == "auto":
            from ..search import search_sparsity
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
                from ..search import plot_curve
                from ..metrics import bound_badness
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
                from ..search import sensitivity
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
        from ..evaluation import prepare_data
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
        from ..evaluation import build_validator
        from ..metrics import METRIC_ALIASES, Bounds
        from ..validate import skipped
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
        from ..figures import figures
        shapes = None
        if validator is not None and validator.dataset.batches:
            shapes = {k: list(v.shape) for k, v in validator.dataset.batches[0].items()}
        self.shapes = shapes
        # the non-zero count comes from the report after pruning (zeros_before), not from a second read
        return figures(loaded.model, shapes, files=[self.model] + list(loaded.external_files), nonzero=-1)

    def _figures(self, loaded, report, files) -> dict:
        """Before → after: file and gzip size (of the staged ``files``), parameters, MACs per sample at the
        validated input shape, latency."""
        from ..figures import ratios, figures
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
        from .. import io as pio
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
