"""The one place where the driver finds the solver, statistics and QuantLinear.

Prefers the real implementations; falls back to quantkern/_standin.py until they are merged.
TODO(driver): drop the fallbacks and _standin.py once quantkern.solve / quantkern.nn land on main.
"""
from __future__ import annotations

try:
    from ..solvers import solve  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on merge state
    from .._standin import solve

from ..calibration.stats import AsymAccumulator, HessianAccumulator

try:
    from ..nn import QuantLinear
except ImportError:  # pragma: no cover
    from .._standin import QuantLinear

__all__ = ["solve", "HessianAccumulator", "AsymAccumulator", "QuantLinear"]
