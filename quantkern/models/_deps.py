"""What the driver uses from the rest of quantkern, in one place (method plug-ins import it too)."""
from __future__ import annotations

from ..calibration.stats import AsymAccumulator, HessianAccumulator
from ..nn import QuantLinear
from ..solvers import solve

__all__ = ["solve", "HessianAccumulator", "AsymAccumulator", "QuantLinear"]
