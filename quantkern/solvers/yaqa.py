"""YAQA: Kronecker-factored Hessian rounding (Tseng, Sun, De Sa 2025, arXiv 2505.22988; algorithms.md 5).

Objective per linear: tr((W - Q) H_I (W - Q)^T H_O), the second-order expansion of the model's KL
to the original with the Hessian approximated as H_O (x) H_I. The statistics come from
quantkern.calibration.fisher (sketch B: H_I = E_s[G_s^T G_s], H_O = E_s[G_s G_s^T] over sequences s).

Rounding: two-sided LDLQ (kron_ldlq.py) on a scalar grid fixed beforehand: by default the group
params of a GPTQ pass on H_I (grid="gptq"; "rtn" for min/max params of W). Both Hessians are
damped and factorised by the same robust ladder as every other method (solvers/hessian.py); the
input side also supplies act-order and dead-column masking (core.Prepared). With H_O = I the codes
are GPTQ's (same grid, same order of decisions), which the tests check.

Differences from the paper's code, on purpose: no random Hadamard transforms and no trellis
codebook (quantkern writes plain GPTQ checkpoints), exact per-entry feedback inside tiles instead of
16x16 vector rounding.
"""
from __future__ import annotations

import torch

from .. import grid
from . import core
from .hessian import HessianError, check_hessian, inverse_cholesky, mask_dead
from .kron_ldlq import kron_ldlq, objective, unit_upper_factor
from .registry import get_method, register_method


def output_factor(H_out: torch.Tensor, damp: float, log: dict) -> torch.Tensor:
    """B (unit upper, [m, m]) of the damped output Hessian; identity (logged) if it has no signal."""
    m = H_out.shape[0]
    Hm, dead = mask_dead(H_out)
    olog: dict = {}
    try:
        U, _, _ = inverse_cholesky(Hm, damp, log=olog)
    except HessianError as exc:
        log["out_fallback"] = f"identity ({exc})"
        return torch.eye(m, device=H_out.device)
    log["out_damp"] = olog.get("damp")
    log["out_retries"] = olog.get("retries")
    log["out_fallback"] = olog.get("fallback")
    log["out_dead_rows"] = int(dead.sum())
    return unit_upper_factor(U)


@register_method("yaqa")
def solve_yaqa(W, H, spec, log, H_out=None, grid_from: str = "gptq", tile: int = 32, backend=None):
    """quantkern.solve(W, H, spec, method="yaqa", H_out=...): H is the input-side factor H_I [n, n]
    (the Fisher sketch by default in the driver), H_out the output-side factor H_O [m, m]."""
    m, n = W.shape
    if H_out is None:
        raise ValueError("yaqa needs H_out, the [m, m] output-side Kronecker factor (quantkern.calibration.fisher)")
    check_hessian(H_out, m)
    if grid_from not in ("gptq", "rtn"):
        raise ValueError(f"yaqa: grid_from must be 'gptq' or 'rtn', got {grid_from!r}")
    prep = core.Prepared(W, H, spec, spec.act_order, log)
    if grid_from == "gptq":
        base = get_method("gptq")(W, H, spec, {}, backend=backend)
        scales, zeros, g_idx = base.scales, base.zeros, base.g_idx
        log["gptq_loss"] = base.loss
    else:
        _, scales, zeros, g_idx = grid.rtn(W, spec)
    gidx_p = g_idx if prep.perm is None else g_idx[prep.perm]
    gi = gidx_p.long()
    S = scales[gi].t().contiguous()
    Z = zeros[gi].t().contiguous()
    A = unit_upper_factor(prep.U)
    B = output_factor(H_out.float(), spec.damp, log)
    codes_p = kron_ldlq(prep.W, A, B, S, Z, spec.maxq, tile=tile)
    codes = prep.unpermute_cols(codes_p).to(torch.uint8)
    deq = grid.dequantize_groups(codes, scales, zeros, g_idx)
    Hd = prep.Hd if prep.perm is None else prep.Hd[prep.invperm][:, prep.invperm]
    Wm = prep.unpermute_cols(prep.W)
    loss = objective(Wm - deq, Hd, H_out)
    log["proxy_in"] = core.proxy_loss(Wm, deq, Hd)
    from .result import SolveResult

    params = {"grid": grid_from, "tile": tile}
    return SolveResult(codes, scales.float().contiguous(), zeros.float().contiguous(), g_idx.to(torch.int32), deq,
                       loss, log, spec, "yaqa", params, prep.perm)
