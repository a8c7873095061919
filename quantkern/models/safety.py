"""The driver's per-module safety net: never hand out a module worse than round-to-nearest.

After a method solves a linear, its result and RTN's (same bits / group / sym, quantkern.solve
method="rtn") are scored on the layer's own activation statistics:
    loss(Q) = tr((W - Q) H_e (W - Q)^T) [+ 2 alpha tr((W - Q) D^T W^T) when the method aims at the
              full-precision stream's output with weight alpha, i.e. ||W X_t - Q X_q||^2 up to a constant],
    H_e     = H shrunk towards its diagonal by how many tokens estimated it (calibration.shrinkage)
              plus the solvers' damping spec.damp * mean(diag H):
the best estimate of the held-out layer error the driver has. Methods that optimise another matrix
(OAC's Fisher, YAQA's Kronecker factors) or a noisy H can lose to RTN there; the net then keeps
RTN's codes and says so. When the method wins, its result is returned untouched (bit-identical codes).
"""
from __future__ import annotations

import math

import torch

from ..calibration.shrinkage import shrink_to_diagonal
from ..solvers import solve


def evaluation_hessian(H: torch.Tensor, ntokens: float, damp: float) -> torch.Tensor:
    Hs, _ = shrink_to_diagonal(H, ntokens)
    Hs = Hs.float().clone()
    Hs.diagonal().add_(damp * float(torch.diagonal(H).double().mean()))
    return Hs


def layer_loss(W, Q, He, D=None, alpha: float = 0.0) -> float:
    """solvers.core.proxy_loss / asym_objective with fp32 products (the net scores every linear twice;
    fp64 GEMMs would cost more than many solves) and an fp64 sum."""
    E = W.float() - Q.float()
    loss = ((E @ He) * E).sum(dtype=torch.float64)
    if D is not None and alpha:
        loss = loss + 2.0 * float(alpha) * (E * (W.float() @ D.float())).sum(dtype=torch.float64)
    return float(loss)


def check(W: torch.Tensor, res, H: torch.Tensor, ntokens: float, spec, D=None, alpha: float = 0.0):
    """(result to keep, info dict). info: kept ("method" or "rtn"), method_loss (None if not finite), rtn_loss."""
    He = evaluation_hessian(H.float(), ntokens, spec.damp)
    finite = bool(torch.isfinite(res.dequantized).all())
    ml = layer_loss(W, res.dequantized, He, D, alpha) if finite else float("nan")
    rtn = solve(W, None, spec, method="rtn")
    rl = layer_loss(W, rtn.dequantized, He, D, alpha)
    info = {"kept": "method", "method_loss": ml if math.isfinite(ml) else None, "rtn_loss": rl}  # (JSON: no NaN)
    if alpha and D is not None:
        info["alpha"] = float(alpha)
    if math.isfinite(ml) and ml <= rl:
        return res, info
    info["kept"] = "rtn"
    rtn.log = {**res.log, "safety": info}  # the method's damp/retries stay visible in the row
    rtn.loss = rl
    rtn.params = {"safety_from": res.method}
    return rtn, info
