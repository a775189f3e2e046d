"""Calibrated reconstruction: ADMM/OBS mask under the allocated count, least-squares refit, mean/var correction."""
from .driver import ReconstructOptions, reconstruct

__all__ = ["ReconstructOptions", "reconstruct"]
