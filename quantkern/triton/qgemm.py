"""Triton qgemm: y = x @ dequant(W)^T (+ bias), fused unpack + tl.dot over the GpuQWeight layout.

Imported lazily (only when the Triton backend is used), so a missing triton never breaks quantkern.
Layout (quantkern/formats/gpu_native.py): channels in kernel order (act-order permutation applied once
in prepare, activations gathered per call), GPTQ bit stream per column (3-bit codes that straddle two
words are read from both), uint8 zero points, fp16 scales.

Two ways to apply the group parameters, chosen at compile time:
- tile-uniform (group_size % BLOCK_K == 0): the K tile lies in one group, so the integer tile (code - zero)
  goes into tl.dot exactly and the scale multiplies the partial product per output column;
- per-channel (any other group layout, ragged or act-order leftovers): the scale/zero of each channel is
  gathered through g_idx and the dequantized tile goes into tl.dot.
fp32 operands use input_precision="ieee" (no TF32), so fp32 results match the reference to ~1e-6.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import switches
from ..formats import gpu_native

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _qgemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, M_BUCKET,
    BITS: tl.constexpr, GS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    MAXQ: tl.constexpr = (1 << BITS) - 1
    TILE_UNIFORM: tl.constexpr = GS > 0 and GS % BLOCK_K == 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # code k of a column: bits [j*BITS, (j+1)*BITS) of chunk k // 32 (BITS words per chunk)
        pos = (offs_k % 32) * BITS
        word_row = (offs_k // 32) * BITS + pos // 32
        shift = (pos % 32).to(tl.uint32)
        wmask = mask_k[:, None] & mask_n[None, :]
        lo = tl.load(qw_ptr + word_row[:, None] * N + offs_n[None, :], mask=wmask, other=0)
        v = lo.to(tl.uint32, bitcast=True) >> shift[:, None]
        if BITS == 3:  # codes 10 and 21 of a chunk take their high bits from the next word
            straddle = (pos % 32) + BITS > 32
            hi = tl.load(qw_ptr + (word_row + 1)[:, None] * N + offs_n[None, :],
                         mask=wmask & straddle[:, None], other=0)
            v = v | (hi.to(tl.uint32, bitcast=True) << ((32 - shift) % 32)[:, None])
        code = (v & MAXQ).to(tl.float32)
        if TILE_UNIFORM:
            g = k0 // GS
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
            w = code - z[None, :]  # exact small integers: exact in fp16 too
            if DOT_FP32:
                part = tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                part = tl.dot(x, w.to(x.dtype))
            acc += part * s[None, :]
        else:
            g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
            gp = g[:, None] * N + offs_n[None, :]
            s = tl.load(s_ptr + gp, mask=wmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + gp, mask=wmask, other=0).to(tl.float32)
            w = (code - z) * s
            if DOT_FP32:
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# Interpreter: one fixed config with large tiles (the interpreter's cost is per program and per op).
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)


def _gpu_configs():
    cfgs = []
    for bm, bn, bk, w, s in (
        (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 256, 64, 8, 3), (32, 64, 128, 4, 4),
        (32, 128, 64, 4, 4), (64, 128, 64, 4, 3), (64, 256, 64, 8, 3), (128, 128, 64, 8, 3),
        (128, 256, 32, 8, 3),
    ):
        cfgs.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s))
    return cfgs


def _fixed_gpu_config(M: int) -> dict:
    """A sensible default without autotuning (QUANTKERN_TRITON_AUTOTUNE=0, e.g. in tests)."""
    return dict(BLOCK_M=16 if M <= 16 else 64, BLOCK_N=128, BLOCK_K=64)


_autotuned = None


def _kernel_for_gpu():
    global _autotuned
    if _autotuned is None:
        _autotuned = triton.autotune(configs=_gpu_configs(), key=["M_BUCKET", "N", "K", "BITS", "GS"])(_qgemm_kernel)
    return _autotuned


def _m_bucket(M: int) -> int:
    return min(1 << max(M - 1, 0).bit_length(), 256)


def qgemm(x: torch.Tensor, p: gpu_native.GpuQWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., n] (fp16 / bf16 / fp32) -> y [..., m] in x's dtype."""
    if x.shape[-1] != p.n:
        raise ValueError(f"triton qgemm: x has {x.shape[-1]} input features, the weight expects {p.n}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton qgemm: x must be fp16, bf16 or fp32, got {x.dtype}")
    if x.device != p.qweight.device:
        raise ValueError(f"triton qgemm: x on {x.device}, weight on {p.qweight.device}")
    if bias is not None and bias.shape != (p.m,):
        raise ValueError(f"triton qgemm: bias must be [{p.m}], got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    x2 = gpu_native.gather_input(x.reshape(-1, p.n), p)
    M = x2.shape[0]
    y = torch.empty(M, p.m, device=x.device, dtype=x.dtype)
    if M == 0 or p.m == 0:
        return y.reshape(*lead, p.m)
    if p.n == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(y.dtype)
        return y.reshape(*lead, p.m)
    b = bias.contiguous() if bias is not None else y  # dummy pointer when there is no bias
    # GS as a compile-time constant: 0 means "per-channel groups through g_idx"
    gs = p.group_size if p.group_size > 0 else 0
    args = (x2, p.qweight, p.scales, p.zeros, p.g_idx, b, y, M, p.m, p.n, x2.stride(0), y.stride(0), _m_bucket(M))
    meta = dict(BITS=p.bits, GS=gs, HAS_BIAS=bias is not None, DOT_FP32=x.dtype == torch.float32)
    if INTERPRET or x.device.type != "cuda" or not switches.flag("QUANTKERN_TRITON_AUTOTUNE"):
        cfg = INTERPRET_CONFIG if INTERPRET else _fixed_gpu_config(M)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(p.m, cfg["BLOCK_N"]))
        _qgemm_kernel[grid](*args, **meta, **cfg)
    else:
        grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(p.m, c["BLOCK_N"]))  # noqa: E731
        _kernel_for_gpu()[grid](*args, **meta)
    return y.reshape(*lead, p.m)
