"""Accuracy-driven loops over pruned-and-validated models: the sparsity search and per-layer sensitivity."""
from __future__ import annotations

import dataclasses
import io
import logging

from .io import load_model, stage_model
from .metrics import severity
from .pipeline import PruneConfig, prune_loaded

log = logging.getLogger("onnxprune")


def evaluate(model_path: str, config: PruneConfig, validator, out_path: str):
    """Prune a fresh copy of the model with ``config``, validate it from a staged file, discard the file."""
    loaded = load_model(model_path, config.stream_above)
    report = prune_loaded(loaded, config, defer_writes=True)
    with stage_model(loaded, out_path, digest=False) as staged:
        v = validator.compare(staged.model_path, latency=False)
    v.sparsity = config.sparsity
    return report, v


def search_sparsity(model_path: str, config: PruneConfig, validator, out_path: str,
                    resolution: float = 0.005, max_sparsity: float = 0.995, progress=None):
    """Highest sparsity on the grid k*resolution (<= max_sparsity) that passes the validator's gate (the same
    metrics, outputs and bounds as the final check).

    Bisection over the grid index, assuming the metric worsens with sparsity (probes are reported, so a user can
    see when it does not). Sparsity 0 is the dense model and always passes. Returns (sparsity, curve, best
    Validation or None).
    """
    top = int(round(max_sparsity / resolution))
    tried = {}

    def probe(k):
        s = round(k * resolution, 10)
        _, v = evaluate(model_path, dataclasses.replace(config, sparsity=s), validator, out_path)
        tried[k] = v
        log.info("search: sparsity %.4f -> %s %.4f (drop %.4f) %s", s, v.metric, v.pruned, v.drop,
                 "ok" if v.passed else "over budget")
        if progress:
            progress(s, v)
        return v.passed

    lo, hi = 0, top + 1  # lo passes (dense), hi fails (sentinel)
    if probe(top):
        lo = top
    else:
        hi = top
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if probe(mid):
                lo = mid
            else:
                hi = mid
    curve = [{"sparsity": round(k * resolution, 10), "metric": v.metric, "output": v.output, "value": v.pruned,
              "drop": v.drop, "passed": v.passed, "collapsed": v.collapsed,
              "outputs": {o.name: {"metric": o.metric, "value": o.value, "passed": o.passed}
                          for o in v.outputs if o.gated}} for k, v in sorted(tried.items())]
    return round(lo * resolution, 10), curve, tried.get(lo)


def sensitivity(model_path: str, config: PruneConfig, validator, out_path: str, layer_names, progress=None):
    """Prune one layer at a time to the target and measure the drop: sorted, most sensitive first."""
    rows = []
    for name in layer_names:
        cfg = dataclasses.replace(config, only=(name,), exclude=())
        _, v = evaluate(model_path, cfg, validator, out_path)
        head = next((o for o in v.outputs if o.name == v.output), None)
        rows.append({"layer": name, "sparsity": config.sparsity, "metric": v.metric, "output": v.output,
                     "value": v.pruned, "drop": v.drop, "collapsed": v.collapsed,
                     "severity": severity(head) if head is not None else 0.0})
        if progress:
            progress(name, v)
    # most sensitive first, comparable across outputs and metrics (bounded: the fraction of its bound used)
    rows.sort(key=lambda r: (-r["severity"], r["layer"]))
    return rows


def plot_curve(curve, path: str, bound: float, chosen: float, write=None) -> None:
    """Draw the search curve (needs matplotlib: pip install 'onnxprune[plot]'); ``write(path, bytes)`` publishes
    the PNG (atomically, by default)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = [c["sparsity"] for c in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [c["drop"] for c in curve], "o-", label="drop")
    if bound is not None:
        ax.axhline(bound, color="r", ls="--", label=f"bound {bound}")
    ax.axvline(chosen, color="g", ls=":", label=f"chosen {chosen:.3f}")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"badness of {curve[0]['metric'] if curve else 'metric'} (drop, rel. error, 1-cosine)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    if write is None:
        from .io import atomic_write_bytes as write
    write(path, buf.getvalue())
