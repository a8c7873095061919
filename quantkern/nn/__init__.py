"""Modules that run quantized weights."""
from .quant_linear import QuantLinear  # noqa: F401
from .fused import FusedGroup, fuse_groups, unfuse_quant_groups  # noqa: F401

__all__ = ["QuantLinear", "FusedGroup", "fuse_groups", "unfuse_quant_groups"]
