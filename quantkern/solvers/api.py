"""quantkern.solve: validate, dispatch to a registered method, and fall back loudly when needed."""
from __future__ import annotations

import time
import warnings

import torch

from ..methods import MethodConfig
from ..spec import QuantSpec
from .hessian import HessianError, check_hessian
from .registry import get_solver
from .result import SolveResult
from .rtn import rtn_result


def solve(W: torch.Tensor, H: torch.Tensor | None, spec: QuantSpec | MethodConfig | None = None,
          method: str | None = None, **params) -> SolveResult:
    """Quantize one weight W [m, n] (out x in) given its Hessian H [n, n] = (2/N) sum X X^T.

    spec: a QuantSpec (the grid; then `method` names the method, default "gptq", and params are its options)
        or a method config (quantkern.methods, e.g. SNRQ(bits=2, alpha=0.5): its grid, method and options).
    method: a name in quantkern.methods.METHODS (e.g. "gptq", "snrq").
    params: method options and per-layer inputs, e.g. D=..., alpha=0.25 | "sample" | "optimize", K=4.
    An all-zero H (no calibration signal) or a Hessian nothing can factorise falls back to RTN for
    this layer with a warning and log["fallback"] = "rtn". Bad input raises ValueError.
    """
    spec = QuantSpec() if spec is None else spec
    if isinstance(spec, MethodConfig):
        if method not in (None, spec.name):
            raise ValueError(f"solve got a {type(spec).__name__} config and method={method!r}; pass one of them")
        method, params, spec = spec.name, {**spec.solver_options(), **params}, spec.spec
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec or a method config, got {type(spec).__name__}")
    method = method or "gptq"
    fn = get_solver(method)
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"W must be a 2-D [out, in] tensor, got {tuple(W.shape) if isinstance(W, torch.Tensor) else W!r}")
    if not W.is_floating_point():
        raise ValueError(f"W must be floating point, got {W.dtype}")
    if not torch.isfinite(W).all():
        raise ValueError(f"W has {(~torch.isfinite(W)).sum().item()} non-finite (NaN/Inf) values; refusing to quantize")
    W = W.detach().float()
    m, n = W.shape
    if m == 0 or n == 0:
        raise ValueError(f"W is empty: {tuple(W.shape)}")
    if method != "rtn" or H is not None:
        if H is None:
            raise ValueError(f"method {method!r} needs H")
        check_hessian(H, n)
        H = H.detach().to(W.device).float()
        H = 0.5 * (H + H.t())  # accumulated H is symmetric up to rounding; make it exact
    for key in ("D",):
        if isinstance(params.get(key), torch.Tensor):
            params[key] = params[key].detach().to(W.device)
    log: dict = {"method": method, "fallback": None}
    t0 = time.perf_counter()
    if method != "rtn" and not (torch.diagonal(H) > 0).any():
        res = _fallback(W, H, spec, log, method, params, "H is all zero (no calibration signal)")
    else:
        try:
            res = fn(W, H, spec, log, **params)
        except HessianError as exc:
            res = _fallback(W, H, spec, log, method, params, str(exc))
    res.log["time_s"] = time.perf_counter() - t0
    if not torch.isfinite(res.dequantized).all():  # never hand out NaN codes
        res = _fallback(W, H, spec, log, method, params, "solver produced non-finite values")
    return res


def _fallback(W, H, spec, log, method, params, why):
    warnings.warn(f"quantkern.solve({method}): {why}; falling back to RTN for this layer", RuntimeWarning,
                  stacklevel=3)
    log["fallback"] = "rtn"
    log["fallback_reason"] = why
    keep = {k: v for k, v in params.items() if not isinstance(v, torch.Tensor)}
    return rtn_result(W, H, spec, log, method=method, params=keep)
