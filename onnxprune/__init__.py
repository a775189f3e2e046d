"""onnxprune: prune any ONNX model to an exact global sparsity (LAMP and baselines), framework-free."""
__version__ = "0.1.0"

from .errors import AccuracyGateError, InputError, OnnxPruneError, OutputError, RequestError  # noqa: E402
from .methods import METHODS  # noqa: E402
from .report import LayerReport, Report  # noqa: E402

__all__ = [
    "__version__", "prune", "prune_loaded", "PruneConfig", "METHODS", "Report", "LayerReport",
    "OnnxPruneError", "InputError", "RequestError", "OutputError", "AccuracyGateError",
]


def __getattr__(name):
    """The pruning API is imported on first use, so that `onnxprune --help` starts without onnx."""
    if name in ("prune", "prune_loaded", "PruneConfig"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")
