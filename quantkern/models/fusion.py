"""Which quantized linears run as one kernel call: those the architecture table says read the same input
(q/k/v, gate/up), handed to quantkern.nn's FusedGroup."""
from __future__ import annotations

import torch.nn as nn

from ..nn.fused import FusedGroup, fuse_groups
from .arch import find_blocks, table_groups


def fuse_quant_groups(model: nn.Module) -> list[FusedGroup]:
    """Fuse every group of QuantLinears that read the same input, per block (members that cannot be fused keep
    running on their own). Returns the groups made; a model without recognised blocks gets none."""
    try:
        _, blocks = find_blocks(model)
    except ValueError:
        return []
    candidates = []
    for block in blocks:
        for names in table_groups(model, block) or ():
            try:
                candidates.append([block.get_submodule(n) for n in names])
            except AttributeError:
                continue
    return fuse_groups(candidates)
