"""The report: what was pruned, per layer and in total. Plain data and its JSON; no printing."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SCHEMA_VERSION = 1


@dataclass
class LayerReport:
    name: str
    op: str
    shape: list
    dtype: str
    kind: str
    graph: str
    consumers: list
    params: int
    zeros_before: int
    zeros_after: int
    excluded: bool = False
    effective_zeros: int | None = None  # zeros of the effective mask (pruned + detached), None if not analysed
    zeros_after_selection: int | None = None  # direct zeros before detached-unit removal

    @property
    def sparsity_before(self) -> float:
        return self.zeros_before / self.params if self.params else 0.0

    @property
    def sparsity_after(self) -> float:
        return self.zeros_after / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sparsity_before"] = self.sparsity_before
        d["sparsity_after"] = self.sparsity_after
        d["effective_sparsity"] = self.effective_sparsity
        return d

    @property
    def effective_sparsity(self):
        if self.effective_zeros is None:
            return None
        return self.effective_zeros / self.params if self.params else 0.0


@dataclass
class Report:
    version: str
    method: str
    allocation: str
    score: str
    target_sparsity: float
    options: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    target_pruned: int = 0  # round(S * N) over the layers that may be pruned
    already_sparser: bool = False
    dry_run: bool = False
    input: str | None = None
    output: str | None = None
    written: dict = field(default_factory=dict)
    connectivity: dict | None = None
    validation: dict | None = None
    search: dict | None = None
    sensitivity: list | None = None
    sizes: dict = field(default_factory=dict)  # bytes on disk: before (input + its data), after (files written)
    compaction: dict | None = None  # dead units physically deleted (applied) or what --compact would delete
    figures: dict | None = None  # before/after: file and gzip size, parameters, MACs per sample, latency
    reconstruction: dict | None = None  # calibrated reconstruction: calibration set, lambda, per-layer errors
    # graph outputs the pruning cut off from every graph input (constant whatever the input) -> the emptied layers
    # on their paths; empty when every output that depended on the inputs still does
    collapsed_outputs: dict = field(default_factory=dict)
    status: str = "ok"
    exit_code: int = 0
    error: str | None = None

    def totals(self, include_excluded: bool = False) -> dict:
        rows = [l for l in self.layers if include_excluded or not l.excluded]
        n = sum(l.params for l in rows)
        before = sum(l.zeros_before for l in rows)
        after = sum(l.zeros_after for l in rows)
        eff = None
        if rows and all(l.effective_zeros is not None for l in rows):
            eff = sum(l.effective_zeros for l in rows)
        return {
            "layers": len(rows),
            "params": n,
            "zeros_before": before,
            "zeros_after": after,
            "sparsity_before": before / n if n else 0.0,
            "sparsity_after": after / n if n else 0.0,
            "effective_zeros": eff,
            "effective_sparsity": (eff / n if n else 0.0) if eff is not None else None,
        }

    def _totals_json(self, include_excluded: bool = False) -> dict:
        """totals(), with the sparsities null (not 0) when no layer was analysed (an error before the model was
        read)."""
        t = self.totals(include_excluded)
        if not self.layers:
            t.update(sparsity_before=None, sparsity_after=None)
        return t

    def to_dict(self) -> dict:
        """The report as JSON-safe data: inf/NaN (which strict parsers reject) become "inf"/"-inf"/null."""
        return _finite({
            "schema_version": SCHEMA_VERSION,
            "status": self.status,
            "exit_code": self.exit_code,
            "error": self.error,
            "onnxprune_version": self.version,
            "input": self.input,
            "output": self.output,
            "written": self.written,
            "dry_run": self.dry_run,
            "method": self.method,
            "allocation": self.allocation,
            "score": self.score,
            "target_sparsity": self.target_sparsity,
            "target_pruned": self.target_pruned,
            "already_sparser": self.already_sparser,
            "options": self.options,
            "seed": self.options.get("seed"),
            "totals": self._totals_json(),
            "totals_including_excluded": self._totals_json(include_excluded=True),
            "layers": [l.to_dict() for l in self.layers],
            "connectivity": self.connectivity,
            "validation": self.validation,
            "search": self.search,
            "sensitivity": self.sensitivity,
            "reconstruction": self.reconstruction,
            "compaction": self.compaction,
            "figures": self.figures,
            "collapsed_outputs": self.collapsed_outputs,
            "warnings": self.warnings,
            "timings_s": self.timings,
            "sizes_bytes": self.sizes,
        })


def _finite(obj):
    if type(obj).__module__ == "numpy" and hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
