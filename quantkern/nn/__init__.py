"""Modules that run quantized weights."""
from .quant_linear import QuantLinear  # noqa: F401

__all__ = ["QuantLinear"]
