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
  H_oac [k, n, n]  per-row-block Fisher Hessians (calibration.fisher row_groups=k, blocks of output
               rows from fisher.row_chunks): OAC's per-row Hessians before its row-wise aggregation,
               aggregated only within each block (GuidedQuant-style). Each block is solved with its
               own blended Hessian; all blocks share the column order (act-order of the blend with the
               summed Fisher) and hence the groups and g_idx, so the result is one GPTQ checkpoint
               tensor. core="gptq" needs act_order=False here.
"""
from __future__ import annotations

import torch

from .hessian import blend
from ..methods import OAC
from .registry import get_solver, register_solver

CORES = ("gptq", "snrq")


@register_solver(OAC)
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
    if H_oac.shape[-2:] != H.shape or H_oac.dim() not in (2, 3):
        raise ValueError(f"oac: H_oac {tuple(H_oac.shape)} must be [n, n] or [k, n, n] with H {tuple(H.shape)}")
    if not torch.isfinite(H_oac).all():
        raise ValueError("oac: H_oac has non-finite (NaN/Inf) values")
    if core == "gptq" and (D is not None or alpha != 0.25):
        raise ValueError("oac: D / alpha belong to core='snrq'")
    H_oac = H_oac.detach().to(W.device).float()
    H_oac = 0.5 * (H_oac + H_oac.transpose(-1, -2))
    if H_oac.dim() == 3 and H_oac.shape[0] == 1:
        H_oac = H_oac[0]
    if H_oac.dim() == 2:
        res = _solve(W, blend(H, H_oac, h_mix), spec, log, core, h_mix, D, alpha, core_params)
    else:
        res = _solve_row_blocks(W, H, H_oac, spec, log, core, h_mix, D, alpha, core_params)
    res.method = "oac"
    res.params = {**res.params, "hessian": "oac", "core": core, "h_mix": float(h_mix),
                  "row_groups": 1 if H_oac.dim() == 2 else int(H_oac.shape[0])}
    res.params.pop("perm", None)
    return res


def _solve(W, He, spec, log, core, h_mix, D, alpha, core_params):
    if core == "gptq":
        return get_solver("gptq")(W, He, spec, log, **core_params)
    n = W.shape[1]
    if D is None:
        De = torch.zeros(n, n, device=W.device)
    elif float(h_mix) == 0.0:
        De = D.detach().to(W.device).float()  # exactly SNRQ's inputs
    else:
        De = (1.0 - float(h_mix)) * D.detach().to(W.device).float()
    return get_solver("snrq")(W, He, spec, log, D=De, alpha=alpha, **core_params)


def _solve_row_blocks(W, H, F, spec, log, core, h_mix, D, alpha, core_params):
    from ..calibration.fisher import row_chunks
    from .hessian import mask_dead
    from .result import SolveResult

    m = W.shape[0]
    k = F.shape[0]
    if k > m:
        raise ValueError(f"oac: {k} row blocks for {m} rows")
    params = dict(core_params)
    if core == "snrq":
        Hm, _ = mask_dead(blend(H, F.sum(0), h_mix))
        params["perm"] = torch.argsort(torch.diagonal(Hm), descending=True, stable=True)
    elif spec.act_order:
        raise ValueError("oac: row blocks with core='gptq' need act_order=False (one g_idx for all blocks)")
    parts, logs = [], []
    for j, (r0, r1) in enumerate(row_chunks(m, k)):
        logs.append(log if j == 0 else {})
        parts.append(_solve(W[r0:r1], blend(H, F[j], h_mix), spec, logs[-1], core, h_mix, D, alpha, params))
    if "grid" in log:  # grid select/guard: each row block chose its own grid; report all of them
        log["grid"] = "/".join(lg["grid"] for lg in logs)
        log["grid_losses"] = {g: sum(lg["grid_losses"][g] for lg in logs) for g in logs[0]["grid_losses"]}
    g_idx = parts[0].g_idx
    if any(not torch.equal(p.g_idx, g_idx) for p in parts):
        raise RuntimeError("oac: row blocks ended with different g_idx")  # cannot happen with a shared order
    log["row_block_losses"] = [float(p.loss) for p in parts]
    return SolveResult(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts], 1),
                       torch.cat([p.zeros for p in parts], 1), g_idx, torch.cat([p.dequantized for p in parts]),
                       float(sum(p.loss for p in parts)), log, parts[0].spec, parts[0].method, dict(parts[0].params),
                       parts[0].perm)
