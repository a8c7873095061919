"""quantkern: post-training weight quantization for LLMs with fused solvers and packed-int kernels."""
from __future__ import annotations

__version__ = "0.1.0"

from .spec import QuantSpec  # noqa: E402
from . import ops  # noqa: E402
from .ops.registry import backends  # noqa: E402
from .solvers import SolveResult, solve  # noqa: E402
from . import nn  # noqa: E402
from .nn import QuantLinear  # noqa: E402
from .nn.explain import explain  # noqa: E402
from .models import load, quantize_model, save_quantized  # noqa: E402

__all__ = [
    "QuantSpec", "QuantLinear", "SolveResult", "backends", "explain", "load", "quantize_model", "save_quantized",
    "solve", "__version__",
]
