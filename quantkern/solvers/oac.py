"""OAC: output-adaptive calibration (Edalati et al., arXiv 2405.15025; algorithms.md 6).

The GPTQ error-feedback core run with the output-adaptive Hessian in place of X X^T:
    H_OAC = E_s[G_s^T G_s],   G_s = dl_s/dW = sum_t g_{s,t} x_{s,t}^T   (per calibration sequence s)
where l_s is the model's cross-entropy on sequence s and g_{s,t} the loss gradient at the linear's
output (quantkern.calibration.fisher.collect_grad_stats, kind="oac"). This is OAC's Fisher
approximation with cross-layer independence (gradients of the full-precision model), cross-row
independence and row-wise aggregation (sum over rows i of E_s[G_s[i]^T G_s[i]]): our INFERRED
reconstruction from the abstract, the full paper was not available. OAC applies it inside SpQR /
BiLLM; quantkern applies it inside its own GPTQ core (same grid, groups, act-order, damping and
Cholesky fallbacks as method="gptq"). OAC's salient-weight detection (outliers kept in higher
precision) is NOT implemented: the GPTQ v1 format has no place for them.
"""
from __future__ import annotations

from .registry import get_method, register_method


@register_method("oac")
def solve_oac(W, H, spec, log, H_oac=None, **gptq_params):
    """quantkern.solve(W, H, spec, method="oac"): GPTQ with H_OAC. Pass the OAC Hessian as H, or as
    H_oac (then H, e.g. the activation Hessian the driver collected, is ignored)."""
    Hh = H if H_oac is None else H_oac
    res = get_method("gptq")(W, Hh, spec, log, **gptq_params)
    res.method = "oac"
    res.params = {**res.params, "hessian": "oac"}
    return res
