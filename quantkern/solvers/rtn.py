"""Round-to-nearest (no calibration data needed; also the logged fallback of every method)."""
from __future__ import annotations

import torch

from .. import grid
from ..methods import RTN
from .registry import register_solver
from .result import SolveResult


def rtn_result(W, H, spec, log, method="rtn", params=None) -> SolveResult:
    codes, scales, zeros, g_idx = grid.rtn(W, spec)
    deq = grid.dequantize_groups(codes, scales, zeros, g_idx)
    loss = float("nan")
    if H is not None and torch.isfinite(H).all():
        n = H.shape[0]
        md = float(torch.diagonal(H).mean())
        Hd = H.double() + spec.damp * md * torch.eye(n, dtype=torch.float64, device=H.device)
        E = (W.float() - deq).double()
        loss = float(((E @ Hd) * E).sum())  # the same damped-H proxy the other methods report
    return SolveResult(codes, scales, zeros, g_idx, deq, loss, log, spec, method, dict(params or {}), None)


@register_solver(RTN)
def rtn(W, H, spec, log):
    return rtn_result(W, H, spec, log)
