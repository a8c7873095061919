"""quantkern: post-training weight quantization for LLMs with fused solvers and packed-int kernels.

    report = quantkern.quantize(model, quantkern.SNRQ(bits=4, group_size=64, alpha=0.25), tokenizer=tok)
    quantkern.save_quantized(model, "out/smol-snrq4", tokenizer=tok)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .spec import QuantSpec  # noqa: E402
from .methods import (AdaRound, GPTAQ, GPTQ, KSNRQ, LDLQ, METHODS, OAC, RTN, SNRQ, YAQA,  # noqa: E402
                      MethodConfig)
from . import ops  # noqa: E402
from .ops.registry import backends  # noqa: E402
from .solvers import SolveResult, solve  # noqa: E402
from . import nn  # noqa: E402
from .nn import QuantLinear  # noqa: E402
from .nn.explain import explain  # noqa: E402
from .models import load, quantize, quantize_model, save_quantized  # noqa: E402
from .models.recipes import RECIPES  # noqa: E402

__all__ = [
    "QuantSpec", "MethodConfig", "METHODS", "RECIPES", "RTN", "GPTQ", "LDLQ", "GPTAQ", "SNRQ", "KSNRQ", "AdaRound",
    "OAC", "YAQA", "QuantLinear", "SolveResult", "backends", "explain", "load", "quantize", "quantize_model",
    "save_quantized",
    "solve", "__version__",
]
