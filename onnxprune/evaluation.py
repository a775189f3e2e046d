"""The data a run evaluates and calibrates on (read, split, synthesized) and the Validator with its gate.

Used by the CLI; no printing. Calibration data is never evaluation data: --data alone is split (the first N
samples calibrate, the rest evaluate), and --calibration equal to --data is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError

CALIBRATION_BATCH = 8  # samples per calibration batch (PP-OCRv4 rec, 64 lines: 16.6 s / 558 MB against 26 s /
#                        925 MB in batches of 32)

@dataclass
class RunData:
    evaluation: object | None = None  # Dataset, or None: synthetic inputs
    calibration: object | None = None  # Dataset of the calibration samples
    calibration_info: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)


def _fixed_batch(model) -> bool:
    from .inputs import input_specs
    return any(s.batch_axis is not None and isinstance(s.dims[s.batch_axis], int) for s in input_specs(model))


def prepare_data(model, data: str | None, calibration: str | None, samples: int, batch_size: int,
                 evaluate: bool, reconstruct: bool) -> RunData:
    """Read --data (evaluation) and --calibration, splitting --data when it must serve both."""
    from .data import data_digest, load_data, rebatch, take
    from .inputs import input_specs
    out = RunData()
    if data and (evaluate or (reconstruct and not calibration)):
        out.evaluation = load_data(data, input_specs(model), batch_size)
    if not reconstruct:
        return out
    if calibration:
        calib = load_data(calibration, input_specs(model), batch_size)
        data_sha = out.evaluation.sha256 if out.evaluation is not None else (data_digest(data) if data else None)
        if calib.sha256 and calib.sha256 == data_sha:  # also when --data is not read (--no-validate, --dry-run)
            raise ConfigError("--calibration and --data are the same data: the gate would measure the calibration "
                              "set; give --data alone to split it")
        split = False
    else:
        calib, split = out.evaluation, True
    fixed = calib.batch_size if _fixed_batch(model) else 1
    n = max(fixed, samples - samples % fixed)  # whole batches when the model's batch is fixed
    if split and calib.samples <= n:
        raise ConfigError(f"--data holds {calib.samples} samples: with --reconstruct and no --calibration the first "
                          f"{n} calibrate and the rest evaluate, so nothing would be left to evaluate; give "
                          f"--calibration, or lower --calibration-samples")
    out.calibration = take(calib, 0, min(n, calib.samples), calib.source)
    if fixed == 1:  # captures run in small batches: a prefix's buffers stay small and hot (a fixed batch stays)
        out.calibration = rebatch(out.calibration, CALIBRATION_BATCH)
    out.calibration_info = {"path": calib.source, "sha256": calib.sha256, "samples": out.calibration.samples,
                            "split_from_data": split}
    if split:
        used = out.calibration.samples
        out.evaluation = take(calib, used, None, f"{calib.source} [samples {used}:]")
        out.calibration_info["evaluation_samples"] = out.evaluation.samples
        out.warnings.append(f"--data split: samples 0-{used - 1} calibrate, the other {out.evaluation.samples} "
                            f"evaluate")
    return out


def build_validator(model_path: str, model, evaluation, bounds, *, batch_size: int, batches: int, seed: int,
                    synthetic: str, input_shape, device: str, exclude, gate_needed: bool, verbose: bool,
                    progress=None):
    """(Validator or None, why validation is skipped or None, warnings). Unresolved dynamic dimensions skip
    validation, unless a gate needs it (ConfigError, exit 2)."""
    from .data import synthesize
    from .graph import find_layers
    from .inputs import input_specs, parse_input_shapes, parse_synthetic, resolve_shapes, unresolved_message
    from .validate import Validator
    dist = parse_synthetic(synthetic)
    shapes = parse_input_shapes(input_shape)
    if evaluation is not None:
        dataset = evaluation
    else:
        specs = input_specs(model)
        resolve_shapes(model, specs, batch_size, shapes)
        if any(s.missing for s in specs):
            why = unresolved_message(specs)
            if gate_needed:
                raise ConfigError(f"cannot evaluate the gate: {why}")
            return None, why, [f"validation skipped: {why}"]
        dataset = synthesize(specs, batch_size, batches, seed, shapes, model, dist)
    layers, _ = find_layers(model, exclude)
    validator = Validator(model_path, dataset, device, quiet=not verbose, progress=progress, model=model,
                          weight_names=[l.name for l in layers if not l.excluded], bounds=bounds)
    validator.progress = None
    return validator, None, [f"validation: {n}" for n in list(dataset.notes) + list(validator.notes)]
