"""OAC: output-adaptive calibration (Edalati et al., arXiv 2405.15025; algorithms.md 6).

The error-feedback core run with the output-adaptive Hessian in place of X X^T:
    H_OAC = E_s[G_s^T G_s],   G_s = dl_s/dW = sum_t g_{s,t} x_{s,t}^T   (per calibration sequence s)
where l_s is the model's cross-entropy on sequence s and g_{s,t} the loss gradient at the linear's
output (quantkern.calibration.fisher.collect_grad_stats, kind="oac"). This is OAC's Fisher
approximation with cross-layer independence (gradients of the full-precision model), cross-row
independence and row-wise aggregation (sum over rows i of E_s[G_s[i]^T G_s[i]]): our INFERRED
reconstruction from the abstract, the full paper was not available. OAC applies it inside SpQR /
BiLLM; quantkern applies it inside its own cores. OAC's salient-weight detection (outliers kept in
higher precision) is NOT implemented: the GPTQ v1 format has no place for them.

Options (core="gptq", h_mix=1 is the paper's recipe; the rest is OUR design, not the paper's):
  core="gptq"  the GPTQ core (grid, groups, act-order, damping, Cholesky fallbacks of method="gptq").
  core="snrq"  SNRQ's core: regularised target W_ref = W (H_e + alpha D_e) H_e^-1, act-order,
               static group params from W_ref, successive rounding (method="snrq"; K, cd_passes and
               grid="mse", the clipped-scale search, pass through). Needs D, the activation-mismatch matrix, when alpha > 0 and h_mix < 1.
  h_mix        weight of the Fisher in the input-side Hessian, H_e = (1 - h_mix) H + h_mix (trH/trF) F
               (solvers.hessian.blend), H the activation Hessian of the (partially quantized) stream.
               The summed objective (1 - h_mix) ||W X_t - Q X_q||^2 + h_mix tr((W - Q) F (W - Q)^T) is
               exactly tr((T - Q) H_e (T - Q)^T) + const with the SNRQ form above and D_e =
               (1 - h_mix) D (trace scaling of H carried along): the Fisher part pulls towards W.
               h_mix = 0 is plain SNRQ / GPTQ on H.
"""
from __future__ import annotations

import torch

from .hessian import blend
from .registry import get_method, register_method

CORES = ("gptq", "snrq")


@register_method("oac")
def solve_oac(W, H, spec, log, H_oac=None, core: str = "gptq", h_mix: float = 1.0, D=None, alpha=0.25,
              **core_params):
    """quantkern.solve(W, H, spec, method="oac"): pass the OAC Hessian as H, or as H_oac (then H is the
    activation Hessian, used only where h_mix < 1)."""
    if core not in CORES:
        raise ValueError(f"oac: core must be one of {CORES}, got {core!r}")
    if H_oac is None:
        if float(h_mix) != 1.0:
            raise ValueError("oac: h_mix < 1 needs both the activation Hessian (H) and the OAC Hessian (H_oac)")
        H_oac = H
    if H_oac.shape != H.shape:
        raise ValueError(f"oac: H_oac {tuple(H_oac.shape)} must match H {tuple(H.shape)}")
    if not torch.isfinite(H_oac).all():
        raise ValueError("oac: H_oac has non-finite (NaN/Inf) values")
    H_oac = H_oac.detach().to(W.device).float()
    H_oac = 0.5 * (H_oac + H_oac.t())
    He = blend(H, H_oac, h_mix)
    if core == "gptq":
        if D is not None or alpha != 0.25:
            raise ValueError("oac: D / alpha belong to core='snrq'")
        res = get_method("gptq")(W, He, spec, log, **core_params)
    else:
        n = W.shape[1]
        De = torch.zeros(n, n, device=W.device) if D is None else (1.0 - float(h_mix)) * D.detach().to(W.device).float()
        if float(h_mix) == 0.0 and D is not None:
            De = D.detach().to(W.device).float()  # exactly SNRQ's inputs
        res = get_method("snrq")(W, He, spec, log, D=De, alpha=alpha, **core_params)
    res.method = "oac"
    res.params = {**res.params, "hessian": "oac", "core": core, "h_mix": float(h_mix)}
    return res
