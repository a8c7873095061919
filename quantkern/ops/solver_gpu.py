"""GPU backends of the core solver ops (contract: csrc/common/solver.h; reference: ops/solver.py)."""
from __future__ import annotations

from .registry import register


@register("gptq_block_solve", "triton")
def gptq_block_solve_triton(W, U, P, gidx, scales, zeros, bits, sym, dynamic_groups, blocksize=128):
    from ..triton import solver as triton_solver  # lazy: triton is optional

    return triton_solver.gptq_block_solve(W, U, P, gidx, scales, zeros, bits, sym, dynamic_groups, blocksize)


@register("gptq_block_solve", "cuda")
def gptq_block_solve_cuda(W, U, P, gidx, scales, zeros, bits, sym, dynamic_groups, blocksize=128):
    import torch

    return torch.ops.quantkern.gptq_block_solve(
        W.contiguous(), U.contiguous(), None if P is None else P.contiguous(), gidx.to(torch.int32).contiguous(),
        scales.contiguous(), zeros.contiguous(), bits, sym, dynamic_groups, blocksize, "gptq_cuda",
    )
