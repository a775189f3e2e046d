"""onnxprune: prune any ONNX model to an exact global sparsity (LAMP and baselines), framework-free."""
__version__ = "0.1.0"

from .errors import AccuracyGateError, InputError, OnnxPruneError, OutputError, RequestError  # noqa: E402
from .pipeline import METHODS, PruneConfig, prune, prune_loaded  # noqa: E402
from .report import LayerReport, Report  # noqa: E402

__all__ = [
    "__version__", "prune", "prune_loaded", "PruneConfig", "METHODS", "Report", "LayerReport",
    "OnnxPruneError", "InputError", "RequestError", "OutputError", "AccuracyGateError",
]
