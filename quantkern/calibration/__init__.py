"""Calibration statistics (Hessians and the asymmetric cross term)."""
from .stats import AsymAccumulator, HessianAccumulator, sample_alphas  # noqa: F401
