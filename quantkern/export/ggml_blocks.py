"""GPTQ grids that are exactly a llama.cpp block type, and the block bytes that hold them.

A llama.cpp block is 32 consecutive input channels of one output row with one fp16 scale d:

    Q4_0  w = d * (q - 8),  q in [0, 15]   == 4-bit sym:  quantkern's zero 2^(4-1) = 8, so q = code
    Q8_0  w = d * q,        q int8         == 8-bit sym:  zero 128, so q = code - 128 (in [-128, 127])
    Q4_1  w = d * q + m,    q in [0, 15]   == 4-bit asym: q = code, m = fp16(-d * zero)

Q4_0 and Q8_0 dequantize bit for bit to quantkern's fp32 weight: both compute the fp32 product of the
same fp16 scale and the same small integer. Q4_1 differs only by m's rounding to fp16: d * zero is exact
in fp32 (11-bit scale times a 4-bit integer), so |m + d * zero| <= 2^-11 |d * zero| <= 15/2048 d, under
0.74% of one quantization step, plus the fp32 rounding of llama.cpp's d * q + m (Q4_1_BOUND).

A block is exact only if its 32 channels share one group: any group size that is a multiple of 32 (or
-1) in natural channel order. Act-order checkpoints whose g_idx scatters groups across channels are not.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

QK = 32  # channels per block of Q4_0 / Q4_1 / Q8_0
EXACT_TYPES = (T.Q4_0, T.Q4_1, T.Q8_0)


def q4_1_bound(d: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Largest |Q4_1 - quantkern| per block: fp16 rounding of m plus fp32 rounding of d*q + m."""
    dz = d.float() * zero.float()
    return dz.abs() * 2.0 ** -11 + (d.float() * 15 + dz.abs()) * 2.0 ** -22


class NotExact(ValueError):
    """A grid with no exact llama.cpp twin; `fix` names the quantkern setting that has one."""

    def __init__(self, reason: str, fix: str):
        super().__init__(f"{reason}; {fix}")
        self.reason, self.fix = reason, fix


FIX_Q4_0 = "quantize with --gguf-type Q4_0 (--bits 4 --group-size 32, symmetric, no --act-order)"
FIX_ANY = ("quantize with --gguf-type Q4_0, Q4_1 or Q8_0 (--bits 4 --group-size 32 symmetric, --bits 4 --asym, "
           "or --bits 8; any group size that is a multiple of 32 is exact too)")


def block_params(scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor):
    """Per-block (d fp16 [m, nb], zero int [m, nb]) from per-group params [G, m] and g_idx [n];
    NotExact when a block of 32 channels spans two groups."""
    n = g_idx.numel()
    if n % QK:
        raise NotExact(f"{n} input channels is not a multiple of llama.cpp's block of {QK}",
                       "no GGUF block type holds this shape exactly")
    gb = g_idx.reshape(n // QK, QK).long()
    if not bool((gb == gb[:, :1]).all()):
        if not _monotone(g_idx):
            raise NotExact("act-order g_idx puts the channels of one block of 32 in different groups",
                           "quantize without --act-order (or --method gptq --act-order --static-groups, which "
                           "keeps groups in channel order; snrq always reorders them), group size 32")
        raise NotExact(f"groups do not align with llama.cpp's blocks of {QK} channels",
                       "quantize with --group-size 32 (or a multiple of 32, or -1)")
    g = gb[:, 0]
    return scales[g].t().contiguous(), zeros[g].t().contiguous()


def _monotone(g_idx: torch.Tensor) -> bool:
    return bool((g_idx[1:] >= g_idx[:-1]).all()) if g_idx.numel() > 1 else True


def exact_type(bits: int, zero: torch.Tensor) -> T:
    """The block type that holds a `bits`-bit grid with per-block zero points `zero` exactly."""
    if bits == 4:
        return T.Q4_0 if bool((zero == 8).all()) else T.Q4_1
    if bits == 8:
        if bool((zero == 128).all()):
            return T.Q8_0
        raise NotExact("an asymmetric 8-bit grid has no llama.cpp twin (Q8_0 is symmetric)",
                       "quantize with --bits 8 --group-size 32 (no --asym), i.e. --gguf-type Q8_0")
    raise NotExact(f"a {bits}-bit GPTQ grid has no llama.cpp twin (its 2/3-bit K-quants store 4/6-bit "
                   "quantized scales in 256-channel super-blocks)", FIX_ANY)


def encode(codes: torch.Tensor, d: torch.Tensor, zero: torch.Tensor, qtype: T) -> np.ndarray:
    """Block bytes uint8 [m, nb * type_size] of codes [m, n] with per-block d fp16 / zero [m, nb]."""
    m, n = codes.shape
    nb = n // QK
    c = codes.to(torch.int16).reshape(m, nb, QK)
    dd = d.to(torch.float16).reshape(m, nb, 1).numpy().view(np.uint8)  # [m, nb, 2], little-endian fp16
    if qtype == T.Q8_0:
        qs = (c - 128).to(torch.int8).numpy().view(np.uint8)
        parts = [dd, qs]
    else:
        # nibble j of a block holds channel j (low) and channel j + 16 (high)
        u = c.to(torch.uint8)
        qs = (u[..., : QK // 2] | (u[..., QK // 2:] << 4)).numpy()
        parts = [dd, qs]
        if qtype == T.Q4_1:
            mm = offset(d, zero)
            if not bool(torch.isfinite(mm).all()):
                raise NotExact("a Q4_1 offset -d*zero overflows fp16", FIX_Q4_0)
            parts = [dd, mm.reshape(m, nb, 1).numpy().view(np.uint8), qs]
        elif qtype != T.Q4_0:
            raise ValueError(f"encode: {qtype.name} is not an exact type ({[t.name for t in EXACT_TYPES]})")
    out = np.concatenate(parts, axis=-1).reshape(m, -1)
    assert out.shape[1] == nb * GGML_QUANT_SIZES[qtype][1]
    return np.ascontiguousarray(out)


def offset(d: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Q4_1's m = fp16(-d * zero): d * zero is exact in fp32, the fp16 rounding is the only error."""
    return (-(d.float() * zero.float())).to(torch.float16)
