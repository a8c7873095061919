"""YAQA: Kronecker-factored Hessian rounding (Tseng, Sun, De Sa 2025, arXiv 2505.22988; algorithms.md 5).

Objective per linear: tr((W - Q) H_I (W - Q)^T H_O), the second-order expansion of the model's KL
to the original with the Hessian approximated as H_O (x) H_I. The statistics come from
quantkern.calibration.fisher (sketch B: H_I = E_s[G_s^T G_s], H_O = E_s[G_s G_s^T] over sequences s).

Rounding: two-sided LDLQ (kron_ldlq.py) on a scalar grid fixed beforehand: by default the group
params of a GPTQ pass on H_I (grid="gptq"; "rtn" for min/max params of W). grid_from="snrq" (OUR
design, not the paper's) also takes SNRQ's regularised target: with D (the activation-mismatch matrix
of the driver's two streams) and alpha it rounds W_ref = W (H_I + alpha D) H_I^-1 on the static
min/max grid of W_ref, act-order on, i.e. it minimises tr((W_ref - Q) H_I (W_ref - Q)^T H_O), which
equals H_O-weighted ||W X_t - Q X_q||^2 up to a constant (H_O multiplies on the other side); with
H_O = I the codes are SNRQ's. Optional grid="mse" searches clipped group scales (grid.search_params) there. Optional
H_fisher + h_mix blend a Fisher input factor into H (as
oac's h_mix, solvers.hessian.blend; D is scaled by 1 - h_mix). out_damp: relative damping of H_O
(default spec.damp); a larger value trusts a noisy H_O less (out_damp -> inf is H_O = I).
out_order=True decides rows in descending diag(H_O) (act-order on the output side; our option). Both Hessians are
damped and factorised by the same robust ladder as every other method (solvers/hessian.py); the
input side also supplies act-order and dead-column masking (core.LayerProblem). With H_O = I the codes
are GPTQ's (same grid, same order of decisions), which the tests check.

Differences from the paper's code, on purpose: no random Hadamard transforms and no trellis
codebook (quantkern writes plain GPTQ checkpoints), exact per-entry feedback inside tiles instead of
16x16 vector rounding.
"""
from __future__ import annotations

import torch

from .. import grid as gridmath
from . import core
from .gptaq import check_alpha, check_D
from .hessian import HessianError, blend, check_hessian, inverse_cholesky, mask_dead
from .kron_ldlq import kron_ldlq, objective, unit_upper_factor
from ..methods import YAQA
from .registry import get_solver, register_solver
from .snrq import GRIDS as SNRQ_GRIDS, SELECT_CANDIDATES, SELECT_RULES, _decode, candidate_grids, choose_grid, \
    permuted_mismatch_product, shifted_target


def output_factor(H_out: torch.Tensor, damp: float, log: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B unit upper [m, m], H_O damped) of the output Hessian; identity (logged) if it has no signal."""
    m = H_out.shape[0]
    Hm, dead = mask_dead(H_out)
    olog: dict = {}
    try:
        U, Hd, _ = inverse_cholesky(Hm, damp, log=olog)
    except HessianError as exc:
        log["out_fallback"] = f"identity ({exc})"
        eye = torch.eye(m, device=H_out.device)
        return eye, eye
    log["out_damp"] = olog.get("damp")
    log["out_retries"] = olog.get("retries")
    log["out_fallback"] = olog.get("fallback")
    log["out_dead_rows"] = int(dead.sum())
    return unit_upper_factor(U), Hd


GRIDS = ("gptq", "rtn", "snrq")


@register_solver(YAQA)
def solve_yaqa(W, H, spec, log, H_out=None, grid_from: str = "gptq", tile: int = 32, D=None, alpha=0.25,
               H_fisher=None, h_mix: float = 0.0, out_damp: float | None = None, grid: str = "minmax",
               out_order: bool = False, backend=None):
    """quantkern.solve(W, H, spec, method="yaqa", H_out=...): H is the input-side factor H_I [n, n]
    (the Fisher sketch by default in the driver), H_out the output-side factor H_O [m, m]."""
    m, n = W.shape
    if H_out is None:
        raise ValueError("yaqa needs H_out, the [m, m] output-side Kronecker factor (quantkern.calibration.fisher)")
    check_hessian(H_out, m)
    if grid_from not in GRIDS:
        raise ValueError(f"yaqa: grid_from must be one of {GRIDS}, got {grid_from!r}")
    if grid_from != "snrq" and (D is not None or alpha != 0.25 or grid != "minmax"):
        raise ValueError("yaqa: D / alpha / grid belong to grid_from='snrq'")
    if grid not in SNRQ_GRIDS:
        raise ValueError(f"yaqa: grid must be one of {SNRQ_GRIDS}, got {grid!r}")
    if out_damp is not None and not (float(out_damp) >= 0):
        raise ValueError(f"yaqa: out_damp must be >= 0, got {out_damp!r}")
    if H_fisher is not None:
        check_hessian(H_fisher, n)
        H_fisher = H_fisher.detach().to(W.device).float()
    H = blend(H, H_fisher, h_mix)
    if grid_from == "snrq":
        spec = spec.replace(act_order=True)
    prep = core.LayerProblem(W, H, spec, spec.act_order, log)
    target = prep.W
    if grid_from == "snrq":
        Dm = torch.zeros(n, n, device=W.device) if D is None else D.detach().to(W.device).float()
        if float(h_mix) != 0.0:
            Dm = (1.0 - float(h_mix)) * Dm
        a = check_alpha(alpha)
        log["alpha"] = a  # (the driver's safety net scores against the same fp-stream target)
        target, gidx_p, _, _ = shifted_target(prep, permuted_mismatch_product(prep, check_D(Dm, n)), a, None)
        kinds = SELECT_CANDIDATES if grid in SELECT_RULES else (grid,)
        cands = candidate_grids(prep, target, gidx_p, kinds, log, backend)
        if grid == "guard":  # screen with SNRQ's greedy objective (cheap); round twice only on a cliff
            screen = {k: float(_decode(prep, target, gidx_p, sc, zr, gr, 1, 0, {}, backend)[1].sum())
                      for k, (sc, zr, gr) in cands.items()}
            log["grid_screen"] = screen
            cands = {k: cands[k] for k in dict.fromkeys(("minmax", choose_grid(screen, "guard")))}
        grids = {k: v[:2] for k, v in cands.items()}
    else:
        if grid_from == "gptq":
            base = get_solver("gptq")(W, H, spec, {}, backend=backend)
            scales, zeros, g_idx = base.scales, base.zeros, base.g_idx
            log["gptq_loss"] = base.loss
        else:
            _, scales, zeros, g_idx = gridmath.rtn(W, spec)
        gidx_p = g_idx if prep.perm is None else g_idx[prep.perm]
        grids = {grid_from: (scales, zeros)}
    gi = gidx_p.long()
    A = unit_upper_factor(prep.U)
    Ho = H_out.float()
    rperm = torch.argsort(torch.diagonal(Ho), descending=True, stable=True) if out_order else None
    Tr = target
    if rperm is not None:  # rows with the most output curvature decided first (act-order for rows)
        Ho, Tr = Ho[rperm][:, rperm], target[rperm]
    B, Hod = output_factor(Ho, spec.damp if out_damp is None else float(out_damp), log)
    rule = grid if grid_from == "snrq" and grid in SELECT_RULES else None
    losses, solved = {}, {}
    for kind, (scales, zeros) in grids.items():
        S = scales[gi].t().contiguous()
        Z = zeros[gi].t().contiguous()
        if rperm is not None:
            S, Z = S[rperm], Z[rperm]
        codes_r = kron_ldlq(Tr, A, B, S, Z, spec.maxq, tile=tile)
        solved[kind] = (codes_r, scales, zeros)
        if rule:  # the objective the rounding minimises (damped factors), in its own order
            losses[kind] = objective(Tr - gridmath.dequantize(codes_r, S, Z), prep.Hd, Hod)
    kind = choose_grid(losses, rule) if rule else next(iter(grids))
    codes_p, scales, zeros = solved[kind]
    if rule:
        log["grid_losses"], log["grid"] = losses, kind
    if rperm is not None:
        codes_p = codes_p[torch.argsort(rperm)]
    g_idx = prep.export_g_idx(gidx_p)
    codes = prep.unpermute_cols(codes_p).to(torch.uint8)
    deq = gridmath.dequantize_groups(codes, scales, zeros, g_idx)
    Hd = prep.Hd if prep.perm is None else prep.Hd[prep.invperm][:, prep.invperm]
    Tm = prep.unpermute_cols(target)
    loss = objective(Tm - deq, Hd, H_out)
    log["proxy_in"] = core.proxy_loss(Tm, deq, Hd)
    from .result import SolveResult

    params = {"grid": grid_from, "tile": tile, "h_mix": float(h_mix) if H_fisher is not None else None,
              "out_damp": out_damp, "out_order": bool(out_order)}
    if grid_from == "snrq":
        params.update(alpha=alpha, grid_kind=grid)
        if rule:
            params["grid_chosen"] = kind
    return SolveResult(codes, scales.float().contiguous(), zeros.float().contiguous(), g_idx.to(torch.int32), deq,
                       loss, log, spec, "yaqa", params, prep.perm)
