"""Bit packing along dim 0 (the GPTQ word layout): C++ (threaded) or the pure-torch reference."""
from __future__ import annotations

import torch

from ..formats import bitstream
from . import registry

register = registry.register
register("pack_dim0", "reference")(bitstream.pack_dim0)
register("unpack_dim0", "reference")(bitstream.unpack_dim0)


@register("pack_dim0", "cpu")
def _pack_cpu(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.ops.quantkern.pack_dim0(codes.to(torch.int32).contiguous(), bits)


@register("unpack_dim0", "cpu")
def _unpack_cpu(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return torch.ops.quantkern.unpack_dim0(packed.contiguous(), bits, n)


def pack_dim0(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return registry.call("pack_dim0", codes.device, codes, bits)


def unpack_dim0(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return registry.call("unpack_dim0", packed.device, packed, bits, n)
