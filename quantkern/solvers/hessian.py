"""Robust Hessian preparation: dead-column masking, damping, and an inverse Cholesky that never
returns garbage silently.

Ladder (every rung is recorded in the log dict that ends up in SolveResult.log):
  1. fp32: Cholesky of H + lambda*mean(diag H)*I, then the upper Cholesky factor U of its inverse.
  2. on failure or non-finite output: lambda *= 10 and retry (up to `retries` times).
  3. the same ladder's last damp in fp64.
  4. a diagonal floor: H replaced by diag(max(diag H, floor)) (no cross-column feedback at all;
     the solve degenerates to RTN with the method's own group params), logged as fallback "diag".
If even that is impossible (all-zero / unusable H) the caller falls back to plain RTN for the layer,
with a warning (fallback "rtn").
"""
from __future__ import annotations

import time
import warnings

import torch


class HessianError(ValueError):
    pass


def check_hessian(H: torch.Tensor, n: int) -> None:
    if not isinstance(H, torch.Tensor) or H.dim() != 2 or H.shape[0] != H.shape[1]:
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ValueError(f"H must be a square [n, n] matrix, got {shape}")
    if H.shape[0] != n:
        raise ValueError(f"H is [{H.shape[0]}, {H.shape[1]}] but W has n = {n} input columns")
    if not torch.isfinite(H).all():
        raise ValueError(f"H has {(~torch.isfinite(H)).sum().item()} non-finite (NaN/Inf) values; refusing to solve")


def mask_dead(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H with dead diagonal entries set to 1, dead mask). A dead column saw only zero inputs."""
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    return H, dead


def _min_eig_estimate(U: torch.Tensor, iters: int = 12) -> float:
    """lambda_min(H_damped) ~ 1 / lambda_max(H^-1) = 1 / ||U||_2^2, by power iteration (O(n^2) each)."""
    n = U.shape[0]
    v = torch.ones(n, dtype=U.dtype, device=U.device) / n**0.5
    lam = 0.0
    for _ in range(iters):
        w = U.t() @ (U @ v)
        lam = float(w.norm())
        if lam == 0 or not torch.isfinite(w).all():
            return float("nan")
        v = w / lam
    return 1.0 / lam if lam > 0 else float("nan")


def _damped(H: torch.Tensor, lam: float) -> torch.Tensor:
    Hd = H.clone()
    Hd.diagonal().add_(lam)
    return Hd


def _try_factor(Hd: torch.Tensor) -> torch.Tensor | None:
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0 or not torch.isfinite(L).all():
        return None
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0 or not torch.isfinite(U).all() or not (torch.diagonal(U) > 0).all():
        return None
    return U


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01, retries: int = 4, log: dict | None = None):
    """(U fp32 upper with U^T U = (H + lam I)^-1, H_damped fp32, log). H already dead-masked."""
    t0 = time.perf_counter()
    log = {} if log is None else log
    n = H.shape[0]
    mean_diag = float(torch.diagonal(H).mean()) if n else 0.0
    if not (mean_diag > 0):
        raise HessianError("H has no positive diagonal mass (all-zero or negative): no calibration signal")
    rel = damp if damp > 0 else 0.0
    steps = []
    U = None
    Hd = None
    for attempt in range(retries + 1):
        Hd = _damped(H, rel * mean_diag)
        U = _try_factor(Hd)
        steps.append({"dtype": "fp32", "damp": rel, "ok": U is not None})
        if U is not None:
            break
        rel = max(rel * 10.0, 1e-4) if attempt < retries else rel
    fallback = None
    if U is None:
        H64 = _damped(H.double(), rel * mean_diag)
        U64 = _try_factor(H64)
        steps.append({"dtype": "fp64", "damp": rel, "ok": U64 is not None})
        if U64 is not None and torch.isfinite(U64.float()).all():
            U = U64.float()
            Hd = H64.float()
    if U is None:
        floor = max(mean_diag * max(rel, 1e-2), torch.finfo(torch.float32).tiny)
        dg = torch.clamp(torch.diagonal(H).double(), min=floor) + rel * mean_diag
        Hd = torch.diag(dg).float()
        U = torch.diag(dg.rsqrt()).float()
        fallback = "diag"
        steps.append({"dtype": "diag", "damp": rel, "floor": floor, "ok": True})
        warnings.warn(f"quantkern: Cholesky failed up to damp={rel:g} (fp32 and fp64); using a diagonal "
                      "Hessian floor (no error feedback) for this layer", RuntimeWarning, stacklevel=3)
    log.update(
        damp=rel,
        damp_requested=damp,
        retries=len([s for s in steps if not s["ok"]]),
        steps=steps,
        fallback=fallback,
        min_eig_est=_min_eig_estimate(U),
        factor_time_s=time.perf_counter() - t0,
    )
    return U, Hd, log


def blend(H: torch.Tensor, F: torch.Tensor | None, weight: float) -> torch.Tensor:
    """(1 - weight) H + weight (tr H / tr F) F: an input-side Hessian that mixes the activation
    Hessian H with an output-adaptive (Fisher) one F, F rescaled to H's trace so `weight` is a
    fraction of the curvature, whatever the units of F. weight 0 returns H itself, weight 1 F at H's
    scale (or F itself if H carries no signal)."""
    w = float(weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"blend weight must lie in [0, 1], got {weight!r}")
    if w == 0.0:
        return H
    if F is None:
        raise ValueError("blend: weight > 0 needs the Fisher Hessian F")
    if F.shape != H.shape:
        raise ValueError(f"blend: F {tuple(F.shape)} and H {tuple(H.shape)} differ")
    tf, th = float(torch.diagonal(F).sum()), float(torch.diagonal(H).sum())
    if not tf > 0:
        raise HessianError("the Fisher Hessian has no positive diagonal mass (no gradient signal)")
    Fs = F.float() * (th / tf) if th > 0 else F.float()
    return Fs if w == 1.0 else (1.0 - w) * H.float() + w * Fs
