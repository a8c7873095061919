"""Triton gptq_block_solve (contract: csrc/common/solver.h, reference: quantkern/ops/solver.py).

One launch per block of B columns; each program owns a tile of rows and keeps the block's working
copy W1 [rows, B] in registers, walking the B columns in order (quantize, error, rank-1 update of the
columns to its right). The once-per-block tail update of the remaining columns is one torch GEMM
between launches (TF32 off). Divisions are correctly rounded (div_rn), rounding is half-to-even
through the 1.5 * 2^23 trick (exact for |x| < 2^22; larger values are clamped to [0, maxq] anyway),
and scales are rounded to fp16 with an RNE conversion, so codes match the reference except at
floating-point ties (solver.h: mismatch rate < 0.1 %, loss to 1e-4).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..ops.solver import group_runs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23


@triton.jit
def _div(a, b):
    return tl.math.div_rn(a, b)


@triton.jit
def _rint(x):
    return (x + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def _grid_params(vmin, vmax, MAXQ: tl.constexpr, SYM: tl.constexpr):
    """qk::grid_params / grid.find_params on per-row min and max."""
    maxq = MAXQ * 1.0
    xmin = tl.minimum(vmin, 0.0)
    xmax = tl.maximum(vmax, 0.0)
    if SYM:
        xmax = tl.maximum(-xmin, xmax)
        xmin = -xmax
    dead = (xmin == 0.0) & (xmax == 0.0)
    xmin = tl.where(dead, -1.0, xmin)
    xmax = tl.where(dead, 1.0, xmax)
    s = _div(xmax - xmin, maxq + tl.zeros_like(xmax))
    if SYM:
        z = tl.zeros_like(s) + (MAXQ + 1) // 2
    else:
        z = _rint(_div(-xmin, s))
        at_zero = z < 1.0
        s = tl.where(at_zero, _div(xmax, maxq - 1.0 + tl.zeros_like(xmax)), s)
        z = tl.minimum(tl.maximum(tl.where(at_zero, 1.0, z), 1.0), maxq)
    s = s.to(tl.float16).to(tl.float32)
    s = tl.where(s > 0.0, s, 6.103515625e-05)
    return s, z


@triton.jit
def _block_kernel(
    Wc, U, P, gidx, run_end, scales, zeros, codes, Err, Qb, loss,
    m, n, i1, i2,
    BITS: tl.constexpr, SYM: tl.constexpr, DYNAMIC: tl.constexpr, HAS_P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):
    MAXQ: tl.constexpr = (1 << BITS) - 1
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < m
    jj = tl.arange(0, BLOCK_B)
    cols = i1 + jj
    cmask = cols < i2
    W1 = tl.load(Wc + rows[:, None] * n + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    errs = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    qs = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    lsum = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for ii in range(0, i2 - i1):
        i = i1 + ii
        sel = jj == ii
        w = tl.sum(tl.where(sel[None, :], W1, 0.0), axis=1)
        g = tl.load(gidx + i)
        if DYNAMIC:
            e = tl.load(run_end + i)
            if e > 0:  # first column of its group's run: params from the block-start values Wc[:, i:e]
                vmin = tl.full((BLOCK_R,), float("inf"), tl.float32)
                vmax = tl.full((BLOCK_R,), float("-inf"), tl.float32)
                for c0 in range(i, e, BLOCK_B):
                    cc = c0 + jj
                    mk = rmask[:, None] & (cc < e)[None, :]
                    v = tl.load(Wc + rows[:, None] * n + cc[None, :], mask=mk, other=0.0)
                    vmin = tl.minimum(vmin, tl.min(tl.where(mk, v, float("inf")), axis=1))
                    vmax = tl.maximum(vmax, tl.max(tl.where(mk, v, float("-inf")), axis=1))
                s_new, z_new = _grid_params(vmin, vmax, MAXQ, SYM)
                tl.store(scales + g * m + rows, s_new, mask=rmask)
                tl.store(zeros + g * m + rows, z_new, mask=rmask)
                tl.debug_barrier()
        s = tl.load(scales + g * m + rows, mask=rmask, other=1.0)
        z = tl.load(zeros + g * m + rows, mask=rmask, other=0.0)
        c = tl.minimum(tl.maximum(_rint(_div(w, s)) + z, 0.0), MAXQ * 1.0)
        q = s * (c - z)
        d = tl.load(U + i * n + i)
        err = _div(w - q, d + tl.zeros_like(w))
        lsum += err.to(tl.float64) * err.to(tl.float64)
        right = cmask & (cols > i)
        urow = tl.load(U + i * n + cols, mask=right, other=0.0)
        upd = err[:, None] * urow[None, :]
        if HAS_P:
            prow = tl.load(P + i * n + cols, mask=right, other=0.0)
            upd = upd - w[:, None] * prow[None, :]
        W1 = W1 - upd
        errs = tl.where(sel[None, :], err[:, None], errs)
        qs = tl.where(sel[None, :], q[:, None], qs)
        tl.store(codes + rows * n + i, c.to(tl.uint8), mask=rmask)
    omask = rmask[:, None] & cmask[None, :]
    tl.store(Err + rows[:, None] * BLOCK_B + jj[None, :], errs, mask=omask)
    if HAS_P:
        tl.store(Qb + rows[:, None] * BLOCK_B + jj[None, :], qs, mask=omask)
    old = tl.load(loss + rows, mask=rmask, other=0.0)
    tl.store(loss + rows, old + lsum, mask=rmask)


def gptq_block_solve(W, U, P, gidx, scales, zeros, bits, sym, dynamic_groups, blocksize=128, block_rows=None):
    """Same signature and results as quantkern.ops.solver.gptq_block_solve_reference."""
    m, n = W.shape
    dev = W.device
    Wc = W.contiguous().clone()
    U = U.contiguous()
    P = None if P is None else P.contiguous()
    scales = scales.contiguous().clone().float()
    zeros = zeros.contiguous().clone().float()
    gidx = gidx.to(torch.int32).contiguous()
    codes = torch.empty(m, n, dtype=torch.uint8, device=dev)
    loss = torch.zeros(m, dtype=torch.float64, device=dev)
    if m == 0 or n == 0:
        return codes, scales, zeros, loss
    run_end = torch.zeros(n, dtype=torch.int32)
    if dynamic_groups:
        for _, s, e in group_runs(gidx.cpu()):
            run_end[s] = e
    run_end = run_end.to(dev)
    BB = triton.next_power_of_2(blocksize)
    BR = block_rows or (16 if INTERPRET else 32)
    Err = torch.empty(m, BB, device=dev)
    Qb = torch.empty(m, BB, device=dev) if P is not None else Err
    grid = (triton.cdiv(m, BR),)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for i1 in range(0, n, blocksize):
            i2 = min(i1 + blocksize, n)
            _block_kernel[grid](
                Wc, U, P if P is not None else U, gidx, run_end, scales, zeros, codes, Err, Qb, loss,
                m, n, i1, i2,
                BITS=bits, SYM=bool(sym), DYNAMIC=bool(dynamic_groups), HAS_P=P is not None,
                BLOCK_R=BR, BLOCK_B=BB,
            )
            if i2 < n:
                b = i2 - i1
                Wc[:, i2:] -= Err[:, :b] @ U[i1:i2, i2:]
                if P is not None:
                    Wc[:, i2:] += Qb[:, :b] @ P[i1:i2, i2:]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return codes, scales, zeros, loss
