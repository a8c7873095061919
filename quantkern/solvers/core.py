"""The shared pipeline around the core kernel: mask dead columns, order, damp + factorise, lay out
groups, run `gptq_block_solve` / `ksnrq_solve` (ops/solver.py), and map results back to the
original column order with a GPTQ-compatible g_idx.

Group layouts (n columns, group size G, processing order p = perm):
  "processing": groups are contiguous runs in PROCESSING order: column p[k] is in group k // G
                (GPTQ act-order with dynamic params, SNRQ, LDLQ). Exported g_idx[p[k]] = k // G.
  "natural":    groups follow the ORIGINAL order, g_idx[j] = j // G (no act-order, or
                GPTQ static_groups, where the params come from the original weights).
"""
from __future__ import annotations

import time

import torch

from .. import grid
from ..ops import solver as solver_ops
from ..spec import QuantSpec
from .hessian import inverse_cholesky, mask_dead

BLOCKSIZE = 128


class LayerProblem:
    """One layer's solve in processing order: W (dead columns zeroed), H (masked), Hd (damped), U, perm.
    (Not ops.qgemm.Prepared, a packed weight laid out for a kernel, nor adaround.Problem.)"""

    def __init__(self, W, H, spec: QuantSpec, act_order: bool, log: dict, perm: torch.Tensor | None = None):
        """perm: a fixed processing order (act_order only) instead of descending diag(H), so that
        several solves of one weight's row blocks share column order and groups (oac row_groups)."""
        self.m, self.n = W.shape
        H, dead = mask_dead(H)
        W = W.float().clone()
        W[:, dead] = 0
        self.dead = dead
        log["dead_columns"] = int(dead.sum())
        if act_order and perm is not None:
            if perm.shape != (self.n,) or not torch.equal(torch.sort(perm.long()).values,
                                                          torch.arange(self.n, device=perm.device)):
                raise ValueError(f"perm must be a permutation of range({self.n})")
            self.perm = perm.long().to(W.device)
            self.invperm = torch.argsort(self.perm)
        elif act_order:
            self.perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
            self.invperm = torch.argsort(self.perm)
        else:
            self.perm = self.invperm = None
        self.W = self.permute_cols(W)
        self.H = self.permute_sym(H)
        self.U, self.Hd, _ = inverse_cholesky(self.H, spec.damp, log=log)
        self.spec = spec

    def permute_cols(self, A):
        return A if self.perm is None else A[:, self.perm].contiguous()

    def permute_sym(self, A):
        return A if self.perm is None else A[self.perm][:, self.perm].contiguous()

    def unpermute_cols(self, A):
        return A if self.perm is None else A[:, self.invperm].contiguous()

    # -- group layouts --------------------------------------------------------------------------
    def processing_groups(self) -> torch.Tensor:
        """gidx in processing order for groups contiguous in processing order."""
        return grid.group_index(self.n, self.spec, self.W.device)

    def natural_groups_in_processing_order(self) -> torch.Tensor:
        g = grid.group_index(self.n, self.spec, self.W.device)
        return g if self.perm is None else g[self.perm].contiguous()

    def export_g_idx(self, gidx_p: torch.Tensor) -> torch.Tensor:
        """g_idx of original columns from the processing-order gidx."""
        return (gidx_p if self.perm is None else gidx_p[self.invperm]).to(torch.int32).contiguous()

    def static_params_processing(self, T: torch.Tensor, kind: str = "minmax"):
        """Params of every contiguous processing-order group of the (processing-order) target T;
        kind "mse" searches clipped scales weighted by the damped diag(H) (grid.search_params)."""
        weight = torch.diagonal(self.Hd) if kind == "mse" else None
        return grid.group_params(T, self.spec, self.processing_groups(), kind=kind, weight=weight)


def run_block_solve(target, U, P, gidx_p, scales, zeros, spec, dynamic, log, backend=None, blocksize=BLOCKSIZE):
    t0 = time.perf_counter()
    codes, scales, zeros, loss = solver_ops.gptq_block_solve(
        target, U, P, gidx_p.to(torch.int32), scales, zeros, spec.bits, spec.sym, dynamic, blocksize, backend=backend
    )
    log["kernel_time_s"] = log.get("kernel_time_s", 0.0) + time.perf_counter() - t0
    return codes, scales, zeros, loss


def run_ksnrq(target, U, gidx_p, scales, zeros, spec, K, log, backend=None):
    t0 = time.perf_counter()
    codes, loss = solver_ops.ksnrq_solve(target, U, gidx_p.to(torch.int32), scales, zeros, spec.bits, K, BLOCKSIZE,
                                         backend=backend)
    log["kernel_time_s"] = log.get("kernel_time_s", 0.0) + time.perf_counter() - t0
    return codes, loss


def proxy_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """Method-independent proxy tr((W - Q) H (W - Q)^T) (pass the H you care about, damped or not)."""
    E = (W.float() - Q.float()).double()
    return float(((E @ H.double()) * E).sum())


def asym_objective(W, Q, H, D, alpha) -> float:
    """||W X_t - Q X_q||^2 (scaled like H) up to a Q-independent constant, X_t = X_q + alpha dX:
    tr(E H E^T) + 2 alpha tr(E D^T W^T), E = W - Q. The objective of SNRQ, K-SNRQ and GPTAQ."""
    E = (W.float() - Q.float()).double()
    return float(((E @ H.double()) * E).sum() + 2.0 * alpha * (E * (W.double() @ D.double())).sum())


def coordinate_descent(Qc, T, Hd, scales, zeros, gidx_p, spec, passes, log):
    """Greedy coordinate-descent passes (QuIP's LDLQ-RG / SNRQ --cd_passes) on codes Qc [m, n]
    (processing order) for tr((T - Q) Hd (T - Q)^T): each column moves to the grid point nearest
    its exact 1-D minimiser, so the objective never increases. Stops early at a fixed point."""
    maxq = spec.maxq
    gi = gidx_p.long()
    S = scales[gi].t().contiguous()
    Z = zeros[gi].t().contiguous()
    codes = Qc.float()
    Q = grid.dequantize(codes, S, Z)
    R = Q - T  # residual
    RH = R @ Hd
    changed_total = 0
    for p in range(passes):
        changed = 0
        for i in range(T.shape[1]):
            hii = Hd[i, i]
            target = Q[:, i] - RH[:, i] / hii
            c = grid.quantize(target, S[:, i], Z[:, i], maxq)
            moved = c != codes[:, i]
            if moved.any():
                q = grid.dequantize(c, S[:, i], Z[:, i])
                delta = q - Q[:, i]
                RH += delta[:, None] * Hd[i][None, :]
                Q[:, i] = q
                codes[:, i] = c
                changed += int(moved.sum())
        changed_total += changed
        if changed == 0:
            break
    log["cd_passes_run"] = p + 1 if passes else 0
    log["cd_changed"] = changed_total
    return codes.to(torch.uint8)


def make_result(prep: LayerProblem, codes_p, scales, zeros, gidx_p, loss_rows, log, method, params):
    from .result import SolveResult

    codes = prep.unpermute_cols(codes_p)
    g_idx = prep.export_g_idx(gidx_p)
    deq = grid.dequantize_groups(codes, scales, zeros, g_idx)
    return SolveResult(
        codes=codes, scales=scales.float().contiguous(), zeros=zeros.float().contiguous(), g_idx=g_idx,
        dequantized=deq, loss=float(loss_rows.sum()), log=log, spec=prep.spec, method=method,
        params=dict(params), perm=prep.perm,
    )
