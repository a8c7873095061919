"""Calibration: statistics (Hessians and the asymmetric cross term, stats.py) and text data (data.py)."""
from .stats import AsymAccumulator, HessianAccumulator, sample_alphas  # noqa: F401
