"""AdaRound (Nagel et al. 2020, algorithms.md 7): learned up/down rounding on a fixed grid.

W~ = s * (clip(floor(W/s) + z + h(V), 0, maxq) - z),  h(V) = clip(sigmoid(V)(zeta - gamma) + gamma, 0, 1)
loss = rec(V) + lambda * sum_ij (1 - |2 h(V_ij) - 1|^beta)

The reconstruction term is the layer MSE. For calibration inputs X, ||W X - W~ X||_F^2 =
tr((W - W~) X X^T (W - W~)^T), i.e. tr((W - W~) H (W - W~)^T) up to the constant factor of the
H convention (H = (2/N) sum X X^T), so it is computed from H alone, no activations. Rows are
independent in this objective, so we divide each row's term by mean_j(s_rj^2) * mean(diag H): a
positive per-row constant, which leaves each row's optimum unchanged and makes lambda mean the same
thing for every layer (an RTN rounding costs about 1/12 per entry in these units).

Defaults follow BRECQ/AdaRound: zeta=1.1, gamma=-0.1, beta annealed 20 -> 2 after a 20% warm-up
without the regulariser, Adam on V, V initialised so h(V) = frac(W/s) (soft start). Two deliberate
departures, both measured on synthetic layers (64x128, 300 iterations):
- lambda: the paper's 0.01 weighs the regulariser against an MSE in absolute weight units, where an
  entry's rounding error is ~s^2/12 (small). In our scale-free units that error is ~1/12, so the same
  balance needs a larger weight: lam=1.0 (default) ends with ~95% of h(V) binary and 45% lower loss
  than RTN; lam=0.01 left half the entries undecided and gained only ~12%.
- lr: Adam moves V by at most ~lr per step and the paper budgets lr * iters = 1e-3 * 10^4; for the
  few hundred iterations a CPU affords, lr defaults to 1e-3 * 10^4 / iters (capped at 0.05), the same
  total budget. Pass lr=1e-3 with iters=10000 for the paper's schedule.
The grid (scales, zeros, g_idx) is taken from a previous solve (GPTQ-style pass or RTN): only the
up/down decision of every weight is learned. The result is the hard rounding floor + 1[h(V) >= 0.5].
"""
from __future__ import annotations

import contextlib
import math

import torch

from .kron_ldlq import _single_thread
from ..methods import AdaRound
from .registry import get_solver, register_solver

ZETA, GAMMA = 1.1, -0.1


def rect_sigmoid(V: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(frac: torch.Tensor) -> torch.Tensor:
    """V with rect_sigmoid(V) = frac (frac in [0, 1), kept off the clip edges)."""
    f = frac.clamp(0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (f - GAMMA) - 1.0)


def beta_at(it: int, iters: int, warmup: float, b_start: float, b_end: float) -> float | None:
    """Annealed beta (None during the warm-up, when the regulariser is off)."""
    w = int(warmup * iters)
    if it < w:
        return None
    frac = (it - w) / max(1, iters - w)
    return b_end + (b_start - b_end) * max(0.0, 1.0 - frac)


def reconstruction(W, H, Wq, inv_norm) -> torch.Tensor:
    """The normalised layer MSE sum_r inv_norm_r (D H D^T)_rr with D = W - Wq."""
    D = W - Wq
    return ((D @ H) * D * inv_norm).sum()


class Problem:
    """One AdaRound problem: loss(V) = rec(scale_e * clip(base + h(V), lo, hi)) + lam * sum(1 - |2h - 1|^beta)
    with rec the row-normalised layer MSE (H symmetric), and its gradient in closed form.

    d rec / d D = 2 (D H) * inv_norm (H symmetric, inv_norm constant per row), D = W - scale_e * clip(...),
    so d rec / d h = (D H) * coef with coef = -2 inv_norm scale_e, zero where base + h is clipped;
    d h / d V = (zeta - gamma) sig (1 - sig), zero where the rectified sigmoid is clipped. Clip
    boundaries count as inside, as torch.clamp's backward does. One [m, n] x [n, n] matmul per call."""

    def __init__(self, W, H, scale_e, zero_e, maxq):
        self.W, self.H, self.scale_e = W, H, scale_e
        self.base = torch.floor(W / scale_e)
        self.lo = -zero_e  # clip bounds in the shifted integer domain: base + h in [-zero, maxq - zero]
        self.hi = maxq - zero_e
        row_norm = (scale_e.pow(2).mean(dim=1) * torch.diagonal(H).mean().clamp_min(1e-30)).clamp_min(1e-30)
        self.inv_norm = (1.0 / row_norm)[:, None]
        self.coef = -2.0 * (ZETA - GAMMA) * self.inv_norm * scale_e  # (zeta - gamma) folded in
        # entries where base + h (h in [0, 1]) can leave [lo, hi]: the only ones that need the clip
        edge = (self.base < self.lo) | (self.base + 1 > self.hi)
        self.edge = edge.flatten().nonzero().squeeze(1)
        self.edge_lo, self.edge_hi = self.lo.flatten()[self.edge], self.hi.flatten()[self.edge]

    def rec(self, Wq) -> torch.Tensor:
        return reconstruction(self.W, self.H, Wq, self.inv_norm)

    def grad(self, V, lam: float, beta: float | None) -> torch.Tensor:
        """d loss / d V (regulariser off when beta is None)."""
        sig = torch.sigmoid(V)
        pre = sig.mul(ZETA - GAMMA).add_(GAMMA)
        h = pre.clamp(0.0, 1.0)
        q = self.base + h
        D = torch.addcmul(self.W, self.scale_e, q, value=-1.0)  # W - scale_e * (base + h), clip below
        e = self.edge
        if e.numel():
            qe = q.view(-1)[e]
            qc = torch.minimum(torch.maximum(qe, self.edge_lo), self.edge_hi)
            D.view(-1)[e] = self.W.view(-1)[e] - self.scale_e.view(-1)[e] * qc
        g = (D @ self.H).mul_(self.coef)
        if e.numel():
            g.view(-1)[e] *= qc == qe
        if beta is not None:
            t = h.mul(2.0).sub_(1.0)
            # d/dh lam (1 - |t|^beta) = -2 lam beta |t|^(beta - 1) sign(t) = -2 lam beta t |t|^(beta - 2)
            if beta >= 2.0:
                g.addcmul_(t, t.abs().pow_(beta - 2.0), value=-2.0 * lam * beta * (ZETA - GAMMA))
            else:
                g.add_(t.abs().pow_(beta - 1.0).mul_(torch.sign(t)), alpha=-2.0 * lam * beta * (ZETA - GAMMA))
        ds = torch.addcmul(sig, sig, sig, value=-1.0).masked_fill_(h != pre, 0.0)  # sig (1 - sig), 0 if clipped
        return g.mul_(ds)


def adaround(
    W: torch.Tensor,
    H: torch.Tensor,
    scale_e: torch.Tensor,
    zero_e: torch.Tensor,
    maxq: int,
    iters: int = 500,
    lr: float | None = None,
    lam: float = 1.0,
    b_start: float = 20.0,
    b_end: float = 2.0,
    warmup: float = 0.2,
    seed: int | None = 0,
    progress: bool = False,
):
    """Learned rounding of W [m, n] on the per-entry grid (scale_e, zero_e [m, n]) for the
    objective tr((W - W~) H (W - W~)^T) (H symmetric). Returns (float codes [m, n], log dict).

    Adam on V with the gradient in closed form (Problem.grad: one m x n x n matmul per iteration;
    autograd through the loss cost three). The loss itself is evaluated only for the log (RTN and final)."""
    if seed is not None:
        torch.manual_seed(seed)
    W = W.float()
    H = H.float()
    m, n = W.shape
    P = Problem(W, H, scale_e, zero_e, maxq)
    V = init_v(W / scale_e - P.base)
    if lr is None:
        lr = min(0.05, 1e-3 * 1e4 / max(1, iters))
    # fused: one pass per step (the default multi-op Adam cost more than the matmul on these sizes)
    opt = torch.optim.Adam([V], lr=lr, fused=V.device.type in ("cpu", "cuda"))

    rtn_codes = torch.clamp(torch.round(W / scale_e) + zero_e, 0, maxq)
    rec_rtn = float(P.rec(scale_e * (rtn_codes - zero_e)))
    it_range = range(iters)
    if progress:
        from tqdm import tqdm

        it_range = tqdm(it_range, desc="adaround", leave=False)
    small = m * n * n < (1 << 24)  # tiny ops: OpenMP barriers cost more than they save on a busy CPU
    threads = _single_thread() if small and W.device.type == "cpu" else contextlib.nullcontext()
    with torch.no_grad(), threads:
        for it in it_range:
            V.grad = P.grad(V, lam, beta_at(it, iters, warmup, b_start, b_end))
            opt.step()
        h = rect_sigmoid(V)
        hard = (h >= 0.5).float()
        codes = torch.clamp(P.base + hard + zero_e, 0, maxq)
        rec_final = float(P.rec(scale_e * (codes - zero_e)))
        soft = float(((h > 0.01) & (h < 0.99)).float().mean())
    log = {
        "iters": iters, "lr": lr, "lambda": lam, "beta": [b_start, b_end], "warmup": warmup,
        "rec_rtn": rec_rtn, "rec_final": rec_final, "undecided_frac": soft,
        "flipped_vs_rtn": int((codes != rtn_codes).sum()),
    }
    if not math.isfinite(rec_final):
        raise FloatingPointError("adaround: non-finite reconstruction loss")
    return codes, log


# ------------------------------------------------------------------------ quantkern.solve method

@register_solver(AdaRound)
def solve_adaround(W, H, spec, log, base: str = "rtn", iters: int = 500, lr: float | None = None,
                   lam: float = 1.0, b_start: float = 20.0, b_end: float = 2.0, warmup: float = 0.2,
                   seed: int = 0, progress: bool = False, **base_params):
    """quantkern.solve(..., method="adaround"): learned rounding on the grid of `base` ("rtn" or any
    registered grid method such as "gptq"; base_params go to it). H is the layer Hessian X X^T."""
    from .. import grid as grid_mod
    from .core import proxy_loss
    from .hessian import mask_dead
    from .result import SolveResult

    if base == "rtn":
        if base_params:
            raise TypeError(f"adaround: unexpected arguments {sorted(base_params)} for base='rtn'")
        _, scales, zeros, g_idx = grid_mod.rtn(W, spec)
    else:
        if base == "adaround":
            raise ValueError("adaround: base must be a different method")
        ref = get_solver(base)(W, H, spec, {}, **base_params)
        scales, zeros, g_idx = ref.scales, ref.zeros, ref.g_idx
    gi = g_idx.long()
    S = scales[gi].t().contiguous()
    Z = zeros[gi].t().contiguous()
    Hm, dead = mask_dead(H)
    Wm = W.float().clone()
    Wm[:, dead] = 0
    codes, alog = adaround(Wm, Hm, S, Z, spec.maxq, iters=iters, lr=lr, lam=lam, b_start=b_start, b_end=b_end,
                           warmup=warmup, seed=seed, progress=progress)
    codes = codes.to(torch.uint8)
    deq = grid_mod.dequantize_groups(codes, scales, zeros, g_idx)
    log.update({f"adaround_{k}": v for k, v in alog.items() if not isinstance(v, list)})
    log["base"] = base
    params = {"base": base, "iters": iters, "lr": alog["lr"], "lambda": lam, "b_start": b_start, "b_end": b_end,
              "warmup": warmup, "seed": seed}
    return SolveResult(codes, scales, zeros, g_idx.to(torch.int32), deq, proxy_loss(W, deq, Hm), log, spec,
                       "adaround", params)
