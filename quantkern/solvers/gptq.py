"""GPTQ (Frantar et al. 2022) and LDLQ (QuIP): the core loop on the weights themselves.

GPTQ: act-order optional (descending diag H), group params dynamic (from the block-start
error-updated weights at each group's first column, see csrc/common/solver.h) or static
(`spec.static_groups`: from the original weights, original-order groups, so g_idx stays natural).
LDLQ: the same decode with static params computed once from W (groups contiguous in processing
order), i.e. QuIP's round_ldl with GPTQ's quantizer (LDLQ == OPTQ up to that choice).
"""
from __future__ import annotations

from .. import grid
from . import core
from ..methods import GPTQ, LDLQ
from .registry import register_solver


@register_solver(GPTQ)
def gptq(W, H, spec, log, backend=None):
    prep = core.LayerProblem(W, H, spec, spec.act_order, log)
    if spec.static_groups:
        scales, zeros = grid.group_params(prep.unpermute_cols(prep.W), spec)  # original order
        gidx_p = prep.natural_groups_in_processing_order()
        dynamic = False
    else:
        gidx_p = prep.processing_groups()
        G = spec.num_groups(prep.n)
        scales = W.new_zeros(G, prep.m)
        zeros = W.new_zeros(G, prep.m)
        dynamic = True
    codes_p, scales, zeros, loss = core.run_block_solve(prep.W, prep.U, None, gidx_p, scales, zeros, spec, dynamic,
                                                        log, backend)
    return core.make_result(prep, codes_p, scales, zeros, gidx_p, loss, log, "gptq", {})


@register_solver(LDLQ)
def ldlq(W, H, spec, log, backend=None):
    prep = core.LayerProblem(W, H, spec, spec.act_order, log)
    gidx_p = prep.processing_groups()
    scales, zeros = prep.static_params_processing(prep.W)
    codes_p, scales, zeros, loss = core.run_block_solve(prep.W, prep.U, None, gidx_p, scales, zeros, spec, False,
                                                        log, backend)
    return core.make_result(prep, codes_p, scales, zeros, gidx_p, loss, log, "ldlq", {})
