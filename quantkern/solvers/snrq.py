"""SNRQ / CoreQ greedy successive rounding, SNRQ-S (sampled alpha) and K-SNRQ (bounded K-best search).

Objective (algorithms.md 1.1): ||W X_t(alpha) - Q X_q||^2, X_t = X_q + alpha dX, which up to a
constant is tr((W_ref - Q) H (W_ref - Q)^T) with the shifted target
    W_ref = W (H + alpha D) H^-1 = W + alpha (W D) H^-1       (H damped; computed as (W D) U^T U).
The decode is the core loop on W_ref, act-order always on, group params computed ONCE from W_ref
(groups contiguous in processing order -> g_idx). LDLQ's reverse decode with the Cholesky of H is the
same algorithm (algorithms.md 1.2, verified bit-identical there).

alpha:
  float in [0, 1]  fixed: M = H + alpha D.
  "sample"         D was accumulated with a per-sequence alpha_s (AsymAccumulator(alpha_mode=
                   "sample")), so M = H + D (alpha = 1 on the pre-scaled D).
  "optimize"       closed form alpha* = clamp(<Q - W, W D> / ||(W D) U^T||_F^2, 0, 1) from a solve:
                   with alpha_prev given (the one-layer lag of the authors' drivers: the previous
                   layer's alpha* for this module type) that alpha is used for this solve and
                   alpha* is reported as log["alpha_next"]; without it a first pass uses
                   alpha_init (0.25), alpha* is computed from its Q and the layer is re-solved
                   with alpha* (log["alpha_first"], log["alpha"]).
K > 1: the K-best beam search per row (ksnrq_solve); K = 1 is exactly the greedy decode.
cd_passes: optional coordinate-descent passes on tr((W_ref - Q) H_d (W_ref - Q)^T) afterwards.
grid (group params; all static in the sense that the decode uses them as given, except "dynamic"):
  "minmax"   GPTQ's min/max params of W_ref, before any feedback (default, the paper's).
  "mse"      clipped scales searched per group for the least diag(H)-weighted rounding error of W_ref.
  "dynamic"  params taken at each group's first column from the error-updated target (the core's
             dynamic groups, block size = a divisor of the group size): the grid follows the feedback.
  "union"    min/max widened to cover the dynamic grid's range too (only groups whose feedback
             reached beyond the static range change).
  "select"   decode on each of minmax, dynamic, union, mse and keep the least objective after
             feedback (res.log["grid_losses"], ["grid"]).
  "guard"    the same candidates, but keep minmax unless another grid's objective is below
             CLIFF_RATIO (1/4) of minmax's. At 2-3 bits a module whose input carries massive
             activations can feed errors of outlier channels into later columns that fall outside a
             static grid (a "clamp cliff", docs/solvers.md): its min/max objective is 10-30x the
             other grids'. Elsewhere the MSE grid's 30-40% lower objective did not carry over to
             perplexity on SmolLM2 at 2 bits (docs/methods_beyond_proxy.md), hence the margin.
res.loss: tr((W_ref - Q) H_d (W_ref - Q)^T) of the returned codes (the loop's sum of err^2).
"""
from __future__ import annotations

import math

import torch

from .. import grid
from . import core
from .gptaq import check_alpha, check_D
from ..methods import KSNRQ, SNRQ, SNRQ_GRIDS as GRIDS
from .registry import register_solver


def _alpha_star(Wp, WDp, Qp, U) -> float:
    num = float(((Qp - Wp).double() * WDp.double()).sum())
    den = float(((WDp.double() @ U.double().t()) ** 2).sum())
    if not (den > 0):
        return 0.0
    return min(max(num / den, 0.0), 1.0)


SELECT_RULES = ("select", "guard")
SELECT_CANDIDATES = ("minmax", "dynamic", "union", "mse")
CLIFF_RATIO = 0.25  # "guard": leave min/max only where another grid lowers the objective >= 4x


def choose_grid(losses: dict, rule: str) -> str:
    """The kept grid among candidate objectives {kind: loss} (insertion order breaks ties).
    "select": the least. "guard": "minmax" unless the least is below CLIFF_RATIO x minmax's objective
    (min/max fell off a clamp cliff), then the least."""
    best = min(losses, key=losses.get)
    if rule == "guard" and not losses[best] < CLIFF_RATIO * losses["minmax"]:
        return "minmax"
    return best


def check_grid(kind):
    if kind not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {kind!r}")
    return kind


def shifted_target(prep, WDp, alpha, grid_kind="minmax"):
    """(W_ref, gidx_p, scales, zeros) in processing order: SNRQ's target W + alpha (W D) H_d^-1 and its
    static group params (groups contiguous in processing order). Shared with yaqa(grid_from="snrq").
    grid_kind None: no params (scales, zeros None), for the feedback-following kinds (candidate_grids)."""
    U = prep.U
    Wref = prep.W + alpha * ((WDp @ U.t()) @ U) if alpha != 0 else prep.W
    gidx_p = prep.processing_groups()
    if grid_kind is None:
        return Wref, gidx_p, None, None
    scales, zeros = prep.static_params_processing(Wref, grid_kind)
    return Wref, gidx_p, scales, zeros


def group_start_blocksize(spec) -> int:
    """A kernel block size at which every processing-order group starts a block, so that the core's
    dynamic params (block-start values) are those of the fully error-updated target."""
    return math.gcd(spec.group_size, core.BLOCKSIZE) if spec.group_size > 0 else core.BLOCKSIZE


def dynamic_solve(prep, Wref, gidx_p, log, backend):
    """Greedy decode with group params taken at each group's first column from the error-updated
    target ("feedback-following" grid): (codes_p, scales, zeros, loss_rows)."""
    G = int(gidx_p.max()) + 1
    ones = torch.ones(G, prep.m, device=Wref.device)
    return core.run_block_solve(Wref, prep.U, None, gidx_p, ones, ones.clone(), prep.spec, True, log, backend,
                                blocksize=group_start_blocksize(prep.spec))


def union_params(s1, z1, s2, z2, spec):
    """The min/max grid covering both grids' ranges [-z s, (maxq - z) s] (per group and row): the
    static grid widened only where the feedback-following one reached further."""
    if spec.sym:  # zero is fixed; the wider scale covers both
        return torch.maximum(s1, s2), z1.clone()
    maxq = spec.maxq
    lo = torch.minimum(-z1 * s1, -z2 * s2)
    hi = torch.maximum((maxq - z1) * s1, (maxq - z2) * s2)
    s, z = grid.find_params(torch.stack([lo.flatten(), hi.flatten()], dim=1), spec.bits, False)
    return s.view_as(s1), z.view_as(z1)


def candidate_grids(prep, Wref, gidx_p, kinds, log, backend):
    """{kind: (scales, zeros, greedy)} for grid kinds in processing order. "minmax"/"mse": static params
    of W_ref; "dynamic": the params a greedy dynamic_solve chose (greedy = its (codes, loss) result,
    reusable when the method's own decode is that greedy one); "union": union_params of minmax and
    dynamic."""
    out = {}
    for kind in kinds:
        if kind in grid.GRID_KINDS:
            out[kind] = (*prep.static_params_processing(Wref, kind), None)
        elif kind == "dynamic" or kind == "union":
            if "dynamic" not in out:
                codes_p, sc, zr, loss = dynamic_solve(prep, Wref, gidx_p, {}, backend)
                out["dynamic"] = (sc, zr, (codes_p, loss))
            if kind == "union":
                if "minmax" not in out:
                    out["minmax"] = (*prep.static_params_processing(Wref, "minmax"), None)
                out["union"] = (*union_params(*out["minmax"][:2], *out["dynamic"][:2], prep.spec), None)
        else:
            raise ValueError(f"unknown grid kind {kind!r}")
    return {k: out[k] for k in kinds}


def permuted_mismatch_product(prep, D):
    """W D in processing order (dead columns of D zeroed), for shifted_target."""
    Dp = D.clone()
    Dp[:, prep.dead] = 0
    return prep.W @ prep.permute_sym(Dp)


def _decode(prep, Wref, gidx_p, scales, zeros, greedy, K, cd_passes, log, backend):
    spec = prep.spec
    if K == 1 and greedy is not None:
        codes_p, loss = greedy
    elif K == 1:
        codes_p, _, _, loss = core.run_block_solve(Wref, prep.U, None, gidx_p, scales, zeros, spec, False, log, backend)
    else:
        codes_p, loss = core.run_ksnrq(Wref, prep.U, gidx_p, scales, zeros, spec, K, log, backend)
    if cd_passes:
        codes_p = core.coordinate_descent(codes_p, Wref, prep.Hd, scales, zeros, gidx_p, spec, cd_passes, log)
        Q = grid.dequantize_groups(codes_p, scales, zeros, gidx_p)
        E = (Wref - Q).double()
        loss = ((E @ prep.Hd.double()) * E).sum(dim=1)
    return codes_p, loss


def _solve_once(prep, WDp, alpha, K, cd_passes, log, backend, grid_kind="minmax"):
    """grid_kind "select" / "guard": decode on every SELECT_CANDIDATES grid and keep one by choose_grid
    on the solve's own objective tr((W_ref - Q) H_d (W_ref - Q)^T) after feedback;
    log["grid_losses"], log["grid"]."""
    Wref, gidx_p, _, _ = shifted_target(prep, WDp, alpha, None)
    kinds = SELECT_CANDIDATES if grid_kind in SELECT_RULES else (grid_kind,)
    solved, losses = {}, {}
    for kind, (scales, zeros, greedy) in candidate_grids(prep, Wref, gidx_p, kinds, log, backend).items():
        codes_p, loss = _decode(prep, Wref, gidx_p, scales, zeros, greedy, K, cd_passes, log, backend)
        losses[kind] = float(loss.sum())
        solved[kind] = (codes_p, scales, zeros, loss)
    kind = choose_grid(losses, grid_kind) if grid_kind in SELECT_RULES else grid_kind
    codes_p, scales, zeros, loss = solved[kind]
    if grid_kind in SELECT_RULES:
        log["grid_losses"] = losses
        log["grid"] = kind
    return codes_p, scales, zeros, gidx_p, loss, Wref


def _snrq(W, H, spec, log, D, alpha, K, cd_passes, alpha_prev, alpha_init, backend, method, grid_kind="minmax",
          perm=None):
    n = W.shape[1]
    check_grid(grid_kind)
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be an integer >= 1, got {K!r}")
    if isinstance(cd_passes, bool) or not isinstance(cd_passes, int) or cd_passes < 0:
        raise ValueError(f"cd_passes must be an integer >= 0, got {cd_passes!r}")
    if alpha == 0 and D is None:
        D = torch.zeros(n, n, dtype=torch.float32, device=W.device)
    D = check_D(D, n)
    spec = spec.replace(act_order=True)
    prep = core.LayerProblem(W, H, spec, True, log, perm=perm)
    WDp = permuted_mismatch_product(prep, D)
    params = {"alpha": alpha, "K": K, "cd_passes": cd_passes}
    if grid_kind != "minmax":
        params["grid"] = grid_kind
    if alpha == "sample":
        a = 1.0
    elif alpha == "optimize":
        a = check_alpha(alpha_prev if alpha_prev is not None else alpha_init)
    else:
        a = check_alpha(alpha)
    codes_p, scales, zeros, gidx_p, loss, Wref = _solve_once(prep, WDp, a, K, cd_passes, log, backend, grid_kind)
    if alpha == "optimize":
        Qp = grid.dequantize_groups(codes_p, scales, zeros, gidx_p)
        a_star = _alpha_star(prep.W, WDp, Qp, prep.U)
        if alpha_prev is not None:
            log["alpha_next"] = a_star
            params["alpha_prev"] = a
        else:
            log["alpha_first"] = a
            a = a_star
            codes_p, scales, zeros, gidx_p, loss, Wref = _solve_once(prep, WDp, a, K, cd_passes, log, backend, grid_kind)
            Qp = grid.dequantize_groups(codes_p, scales, zeros, gidx_p)
            log["alpha_next"] = _alpha_star(prep.W, WDp, Qp, prep.U)
    log["alpha"] = a
    params["alpha_used"] = a
    if grid_kind in SELECT_RULES:
        params["grid_chosen"] = log["grid"]
    return core.make_result(prep, codes_p, scales, zeros, gidx_p, loss, log, method, params)


@register_solver(SNRQ)
def snrq(W, H, spec, log, D=None, alpha=0.25, K=1, cd_passes=0, alpha_prev=None, alpha_init=0.25, backend=None,
         grid="minmax", perm=None):
    return _snrq(W, H, spec, log, D, alpha, K, cd_passes, alpha_prev, alpha_init, backend,
                 "snrq" if K == 1 else "ksnrq", grid, perm)


@register_solver(KSNRQ)
def ksnrq(W, H, spec, log, D=None, alpha=0.25, K=4, cd_passes=0, alpha_prev=None, alpha_init=0.25, backend=None,
          grid="minmax", perm=None):
    return _snrq(W, H, spec, log, D, alpha, K, cd_passes, alpha_prev, alpha_init, backend, "ksnrq", grid, perm)
