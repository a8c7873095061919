"""The reference grid maths: per-group scale/zero (GPTQ's min/max quantizer), quantize, dequantize.

Conventions (shared by every solver, kernel and the on-disk format):
- codes are integers in [0, maxq]; w ~= scale * (code - zero).
- sym:  scale = max(|min|, |max|) * 2 / maxq, zero = 2^(bits-1)   (GPTQ's (maxq+1)/2).
- asym: the range always contains 0; scale = (max - min) / maxq, zero = round(-min / scale).
  The zero point is kept in [1, maxq]: GPTQ v1 stores `zero - 1`, which cannot hold 0. A group whose
  minimum is exactly 0 therefore gets its range widened by one step (scale = max / (maxq - 1)).
- scales are rounded to fp16 here, before any code is chosen, so the solver quantizes onto exactly
  the grid that the fp16 checkpoint reproduces.
"""
from __future__ import annotations

import torch

from .spec import QuantSpec


def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w`` [rows, k] (fp32 [rows] each)."""
    maxq = (1 << bits) - 1
    w = w.float()
    zero_t = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.amin(dim=1), zero_t)
    xmax = torch.maximum(w.amax(dim=1), zero_t)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -1.0, xmin)
    xmax = torch.where(dead, 1.0, xmax)
    if sym:
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / scale)
        at_zero = zero < 1  # min == 0: shift the grid by one step so zero - 1 >= 0
        scale = torch.where(at_zero, xmax / (maxq - 1), scale)
        zero = torch.clamp(torch.where(at_zero, 1.0, zero), 1, maxq)
    scale = scale.half().float()
    # fp16 rounding can flush a tiny scale to 0 or overflow a huge one: refuse rather than emit NaN
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(torch.float16).tiny))
    return scale, zero


SHRINKS = tuple(round(0.30 + 0.025 * i, 3) for i in range(49))  # 0.30 ... 1.50 x the min/max scale


def search_params(w: torch.Tensor, bits: int, sym: bool, weight: torch.Tensor | None = None,
                  shrinks=SHRINKS) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped scale per row of w [rows, k]: among min/max scales times each factor in `shrinks`
    (range shrunk or widened about its zero point), the one with the least weighted squared rounding
    error sum_j weight_j (w_j - deq(q(w_j)))^2 (weight [k] or [rows, k], e.g. diag(H); default 1). At 2 bits the
    min/max grid wastes levels on one outlier; this is GPTQ's `mse` quantizer option with a wider
    search. Returns (scale, zero) like find_params, scales fp16-representable."""
    maxq = (1 << bits) - 1
    w = w.float()
    rows, k = w.shape
    wt = torch.ones(k, device=w.device) if weight is None else weight.float().to(w.device)
    if wt.shape not in ((k,), (rows, k)):
        raise ValueError(f"search_params: weight must be [{k}] or [{rows}, {k}], got {tuple(wt.shape)}")
    best_s, best_z = find_params(w, bits, sym)
    best_err = torch.full((rows,), float("inf"), device=w.device)
    zero_t = torch.zeros(rows, device=w.device)
    lo = torch.minimum(w.amin(dim=1), zero_t)
    hi = torch.maximum(w.amax(dim=1), zero_t)
    for f in shrinks:
        s, z = find_params(torch.stack([lo * f, hi * f], dim=1), bits, sym)
        err = (((w - dequantize(quantize(w, s[:, None], z[:, None], maxq), s[:, None], z[:, None])) ** 2) * wt).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest grid code (float, integer-valued) of w; scale/zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes.float() - zero)


def group_index(n: int, spec: QuantSpec, device=None) -> torch.Tensor:
    """g_idx for channels in their natural order: j // group_size (int32 [n])."""
    if spec.group_size == -1:
        return torch.zeros(n, dtype=torch.int32, device=device)
    return (torch.arange(n, device=device) // spec.group_size).to(torch.int32)


GRID_KINDS = ("minmax", "mse")


def group_params(w: torch.Tensor, spec: QuantSpec, g_idx: torch.Tensor | None = None, kind: str = "minmax",
                 weight: torch.Tensor | None = None):
    """Scales and zeros [G, m] of every group of w [m, n] (g_idx defaults to natural order).
    kind "minmax": GPTQ's quantizer (find_params); "mse": search_params with column weights `weight` [n]."""
    if kind not in GRID_KINDS:
        raise ValueError(f"grid kind must be one of {GRID_KINDS}, got {kind!r}")
    m, n = w.shape
    g_idx = group_index(n, spec, w.device) if g_idx is None else g_idx
    G = int(g_idx.max().item()) + 1 if n else 0
    scales = torch.empty(G, m, device=w.device)
    zeros = torch.empty(G, m, device=w.device)
    gs = spec.group_size
    start = 0
    if kind == "mse" and gs > 0 and n >= gs and torch.equal(g_idx.long(), torch.arange(n, device=w.device) // gs):
        # contiguous equal groups: one batched search over all full groups (thousands of tiny ops
        # per group otherwise, slow on a busy CPU)
        Gf = n // gs
        wf = w[:, : Gf * gs].reshape(m, Gf, gs).transpose(0, 1).reshape(Gf * m, gs)
        wt = None if weight is None else weight[: Gf * gs].reshape(Gf, 1, gs).expand(Gf, m, gs).reshape(Gf * m, gs)
        s, z = search_params(wf, spec.bits, spec.sym, wt)
        scales[:Gf], zeros[:Gf] = s.view(Gf, m), z.view(Gf, m)
        start = Gf
    for g in range(start, G):
        cols = (g_idx == g).nonzero().flatten()
        if kind == "mse":
            scales[g], zeros[g] = search_params(w[:, cols], spec.bits, spec.sym, None if weight is None else weight[cols])
        else:
            scales[g], zeros[g] = find_params(w[:, cols], spec.bits, spec.sym)
    return scales, zeros


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{name} has {bad} non-finite (NaN/Inf) values; refusing to quantize")


def rtn(w: torch.Tensor, spec: QuantSpec):
    """Round-to-nearest: (codes uint8 [m, n], scales [G, m], zeros [G, m], g_idx int32 [n])."""
    if w.dim() != 2:
        raise ValueError(f"rtn: weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    check_finite("weight", w)
    w = w.float()
    g_idx = group_index(w.shape[1], spec, w.device)
    scales, zeros = group_params(w, spec, g_idx)
    gi = g_idx.long()
    codes = quantize(w, scales[gi].t(), zeros[gi].t(), spec.maxq)
    return codes.to(torch.uint8), scales, zeros, g_idx


def dequantize_groups(codes, scales, zeros, g_idx) -> torch.Tensor:
    """W [m, n] from codes [m, n] and per-group params [G, m] selected by g_idx [n]."""
    gi = g_idx.long()
    return dequantize(codes, scales[gi].t().float(), zeros[gi].t().float())
