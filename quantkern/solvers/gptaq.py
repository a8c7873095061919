"""GPTAQ / GPTQv2 (Li et al. 2025): GPTQ plus the asymmetric term P inside the loop.

P = alpha * triu(D_p U^T, 1) U (D = (2/N) sum (X_f - X_q) X_q^T permuted like H), alpha = 0.25 by
default as in the authors' code. The in-block update uses the pre-quantization value, the lazy
tail update the quantized one (the authors' behaviour; csrc/common/solver.h). Groups as GPTQ.
res.loss is GPTQ's convention (sum of err^2 from the loop); the objective GPTAQ targets is
quantkern.solvers.asym_objective(W, Q, H, D, alpha).
"""
from __future__ import annotations

import torch

from .. import grid
from . import core
from ..methods import GPTAQ
from .registry import register_solver


def check_D(D, n):
    if D is None:
        raise ValueError("this method needs D (the asymmetric cross term from AsymAccumulator)")
    if not isinstance(D, torch.Tensor) or D.shape != (n, n):
        raise ValueError(f"D must be [{n}, {n}], got {tuple(D.shape) if isinstance(D, torch.Tensor) else D!r}")
    if not torch.isfinite(D).all():
        raise ValueError(f"D has {(~torch.isfinite(D)).sum().item()} non-finite (NaN/Inf) values; refusing to solve")
    return D.float()


def check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], 'sample' or 'optimize', got {alpha!r}")
    return float(alpha)


@register_solver(GPTAQ)
def gptaq(W, H, spec, log, D=None, alpha=0.25, backend=None):
    n = W.shape[1]
    D = check_D(D, n)
    alpha = check_alpha(alpha)
    prep = core.LayerProblem(W, H, spec, spec.act_order, log)
    Dp = D.clone()
    Dp[:, prep.dead] = 0
    Dp = prep.permute_sym(Dp)
    U = prep.U
    P = alpha * (torch.triu(Dp @ U.t(), diagonal=1) @ U)
    if spec.static_groups:
        scales, zeros = grid.group_params(prep.unpermute_cols(prep.W), spec)
        gidx_p = prep.natural_groups_in_processing_order()
        dynamic = False
    else:
        gidx_p = prep.processing_groups()
        G = spec.num_groups(n)
        scales, zeros = W.new_zeros(G, prep.m), W.new_zeros(G, prep.m)
        dynamic = True
    codes_p, scales, zeros, loss = core.run_block_solve(prep.W, U, P.contiguous(), gidx_p, scales, zeros, spec,
                                                        dynamic, log, backend)
    log["alpha"] = alpha
    return core.make_result(prep, codes_p, scales, zeros, gidx_p, loss, log, "gptaq", {"alpha": alpha})
