"""llama.cpp's K-quant grids (Q4_K, Q3_K, Q2_K) and Q4_0 as fixed quantkern grids: scales chosen first,
then stored exactly as the type stores them, so a solver can choose the codes against exactly those values.

A K-quant super-block is 256 consecutive input channels of one output row, split into sub-blocks:

    Q4_K  8 x 32   value = d*sc * q - dmin*m,  q in [0, 15], sc, m 6-bit, d, dmin fp16
    Q3_K  16 x 16  value = d*l  * (q - 4),     q in [0, 7],  l in [-32, 31] (stored l + 32, 6-bit), d fp16
    Q2_K  16 x 16  value = d*sc * q - dmin*m,  q in [0, 3],  sc, m 4-bit, d, dmin fp16
    Q4_0  1 x 32   value = d * (q - 8),        q in [0, 15], d fp16 (any sign)
    Q4_1  1 x 32   value = d * q + m,          q in [0, 15], d, m fp16 (stored here as O = dmin = -m)

Every value is what ggml computes in fp32: the sub-block scale S = fp32(d) * sc and offset O = fp32(dmin) * m
are exact products (11-bit times <= 6-bit), S * (q - z) is exact, and S * q - O rounds once. `values`
computes them the same way, so `gguf.quants.dequantize` of the bytes `encode` writes is bit for bit equal.

The scales are chosen per sub-block by a weighted search (the weights are diag(H), llama.cpp's importance
matrix): for every candidate step the nearest codes, then the weighted least-squares scale (and min) for
those codes, keeping the best; then the sub-block scales are quantized to the type's integers under an
fp16 super-scale. A sub-block scale is never 0, so every code stays a distinct value a solver can divide by.
The codes returned here are round-to-nearest on the final grid (the RTN baseline); a solver replaces them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

QK_K = 256


@dataclass(frozen=True)
class Layout:
    qtype: T
    block: int      # channels per (super-)block
    sub: int        # channels per sub-block (one scale)
    bits: int       # code bits
    zero: int       # integer zero point of the symmetric types (value = S * (q - zero)); 0 with mins
    mins: bool      # value = S * q - O with a quantized min per sub-block
    scale_bits: int  # bits of the quantized sub-block scale (and min); 0: the fp16 d is the scale


LAYOUTS = {
    "Q4_K": Layout(T.Q4_K, QK_K, 32, 4, 0, True, 6),
    "Q3_K": Layout(T.Q3_K, QK_K, 16, 3, 4, False, 6),
    "Q2_K": Layout(T.Q2_K, QK_K, 16, 2, 0, True, 4),
    "Q4_0": Layout(T.Q4_0, 32, 32, 4, 8, False, 0),
    "Q4_1": Layout(T.Q4_1, 32, 32, 4, 0, True, 0),
}
K_TYPES = ("Q4_K", "Q3_K", "Q2_K")
# what llama-quantize writes when a row is not a multiple of 256 (tensor_type_fallback in llama-quant.cpp of the
# llama.cpp that llama-cpp-python 0.3.36 vendors), and what quantkern writes: Q4_0 (the same as llama.cpp for
# Q2_K / Q3_K; for Q4_K quantkern's Q4_0 is 0.5 bpw smaller than llama.cpp's Q5_0)
LLAMA_FALLBACK = {"Q4_K": "Q5_0", "Q3_K": "Q4_0", "Q2_K": "Q4_0"}
FALLBACK = "Q4_0"


@dataclass
class Grid:
    """One weight [m, n] on a fixed grid: codes uint8 [m, n]; d (and dmin) fp16 [m, nblocks];
    sc (and mn) int16 [m, nsub] (Q3_K: signed l). S / O: fp32 [m, nsub] sub-block scale / offset."""

    kind: str
    codes: torch.Tensor
    d: torch.Tensor
    sc: torch.Tensor
    dmin: torch.Tensor | None = None
    mn: torch.Tensor | None = None

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.kind]

    def scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.layout
        per = L.block // L.sub
        d = self.d.float().repeat_interleave(per, dim=1)
        if L.scale_bits == 0:
            S = d
        else:
            S = d * self.sc.float()
        if L.mins and L.scale_bits == 0:  # Q4_1: the fp16 offset itself
            O = self.dmin.float().repeat_interleave(per, dim=1)
        elif L.mins:
            O = self.dmin.float().repeat_interleave(per, dim=1) * self.mn.float()
        else:
            O = torch.zeros_like(S)
        return S, O

    def values(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        """The fp32 weight ggml decodes (bit for bit), for `codes` (default: self.codes)."""
        return values(self.kind, self.codes if codes is None else codes, *self.scale_offset())


def values(kind: str, codes: torch.Tensor, S: torch.Tensor, O: torch.Tensor) -> torch.Tensor:
    L = LAYOUTS[kind]
    Se = S.repeat_interleave(L.sub, dim=1)
    q = codes.float()
    if L.mins:
        return Se * q - O.repeat_interleave(L.sub, dim=1)
    return Se * (q - L.zero)


class KQuantShapeError(ValueError):
    pass


def check_shape(kind: str, n: int) -> None:
    L = LAYOUTS[kind]
    if n % L.block:
        fb = f"; llama.cpp writes {LLAMA_FALLBACK[kind]} for such a tensor, quantkern {FALLBACK}" if kind in LLAMA_FALLBACK else ""
        raise KQuantShapeError(f"{kind} needs rows (input channels) that are a multiple of {L.block}, got {n}{fb}")


# ---------------------------------------------------------------------------------------- scale choice

def _sym_search(x: torch.Tensor, wt: torch.Tensor, bits: int, zero: int, steps=(-0.1, 0.1, 21)):
    """Per row of x [R, L]: the step s (any sign) of the grid s * (q - zero), q in [0, 2^bits - 1], with
    the least weighted error after a least-squares refit; starts from llama.cpp's s = signed max / -zero."""
    maxq = (1 << bits) - 1
    amax_i = x.abs().argmax(dim=1, keepdim=True)
    xe = x.gather(1, amax_i).squeeze(1)
    s0 = xe / -zero
    s0 = torch.where(s0 == 0, torch.ones_like(s0), s0)
    best_s, best_e = s0.clone(), torch.full_like(s0, float("inf"))
    for f in torch.linspace(1 + steps[0], 1 + steps[1], steps[2]).tolist():
        s = s0 * f
        l = torch.clamp(torch.round(x / s[:, None]) + zero, 0, maxq) - zero
        # least-squares step for these codes
        num = (wt * l * x).sum(1)
        den = (wt * l * l).sum(1)
        s_ls = torch.where(den > 0, num / den.clamp_min(1e-30), s)
        s_ls = torch.where(s_ls == 0, s, s_ls)
        for cand in (s, s_ls):
            lc = torch.clamp(torch.round(x / cand[:, None]) + zero, 0, maxq) - zero
            e = (wt * (x - cand[:, None] * lc) ** 2).sum(1)
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_s = torch.where(better, cand, best_s)
    return best_s


def _asym_search(x: torch.Tensor, wt: torch.Tensor, bits: int, nstep: int = 20, rmin: float = -1.0,
                 rdelta: float = 0.1):
    """Per row of x [R, L]: step s > 0 and min o >= 0 of the grid s * q - o, q in [0, 2^bits - 1] (the
    range always holds 0, as K-quant mins are unsigned), by llama.cpp's make_qkx idea: for each of nstep+1
    candidate inverse steps, the nearest codes and the weighted least-squares (s, o) for them."""
    maxq = (1 << bits) - 1
    lo = torch.clamp(x.amin(1), max=0.0)
    hi = x.amax(1)
    span = (hi - lo)
    flat = span <= 0
    span = torch.where(flat, torch.ones_like(span), span)
    best_s = span / maxq
    best_o = -lo
    q = torch.clamp(torch.round((x - lo[:, None]) / best_s[:, None]), 0, maxq)
    best_e = (wt * (x - (best_s[:, None] * q + lo[:, None])) ** 2).sum(1)
    sw = wt.sum(1)
    swx = (wt * x).sum(1)
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + maxq) / span
        q = torch.clamp(torch.round(iscale[:, None] * (x - lo[:, None])), 0, maxq)
        sl = (wt * q).sum(1)
        sl2 = (wt * q * q).sum(1)
        slx = (wt * q * x).sum(1)
        D = sw * sl2 - sl * sl
        ok = D > 0
        Dn = torch.where(ok, D, torch.ones_like(D))
        s = (sw * slx - swx * sl) / Dn
        mnv = (sl2 * swx - sl * slx) / Dn  # value = s * q + mnv
        pos = mnv > 0  # the grid must hold 0 and below: min clamped at 0, refit the scale alone
        s = torch.where(pos, slx / sl2.clamp_min(1e-30), s)
        mnv = torch.where(pos, torch.zeros_like(mnv), mnv)
        ok = ok & (s > 0)
        e = (wt * (x - (s[:, None] * q + mnv[:, None])) ** 2).sum(1)
        better = ok & (e < best_e)
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, s, best_s)
        best_o = torch.where(better, -mnv, best_o)
    best_s = torch.where(flat, torch.ones_like(best_s) * x.abs().amax(1).clamp_min(1e-8), best_s)
    return best_s, best_o.clamp_min(0)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16)


def _quantize_scales(v: torch.Tensor, nbits: int, per: int, signed: bool):
    """Sub-block values v [m, nsub] -> (fp16 super-scale [m, nblocks], integers [m, nsub]) with
    v ~= d * l, l in [0, 2^nbits - 1] (or [-2^(nbits-1), 2^(nbits-1) - 1] signed, llama.cpp's d = signed
    max / -32); d is rounded to fp16 before the integers are chosen against it."""
    m, nsub = v.shape
    vb = v.reshape(m, nsub // per, per)
    if signed:
        lim = 1 << (nbits - 1)
        i = vb.abs().argmax(dim=2, keepdim=True)
        ext = vb.gather(2, i).squeeze(2)
        d = _fp16(ext / -lim).float()
        lo, hi = -lim, lim - 1
    else:
        hi = (1 << nbits) - 1
        d = _fp16(vb.amax(2) / hi).float()
        lo = 0
    d = torch.where(d == 0, torch.full_like(d, 2.0 ** -24), d)  # smallest fp16 subnormal, never 0
    dh = _fp16(d)
    l = torch.clamp(torch.round(vb / dh.float()[..., None]), lo, hi)
    return dh, l.reshape(m, nsub).to(torch.int16)


def choose(kind: str, W: torch.Tensor, weight: torch.Tensor | None = None) -> Grid:
    """The `kind` grid of W [m, n] (fp32) with scales chosen by the weighted search (weight: [n] importance
    per input channel, e.g. diag(H); default 1) and RTN codes on it."""
    L = LAYOUTS[kind]
    check_shape(kind, W.shape[1])
    W = W.float()
    m, n = W.shape
    wt = torch.ones(n, device=W.device) if weight is None else weight.float().to(W.device).clamp_min(0)
    wt = wt / wt.mean().clamp_min(1e-30)
    wt = wt + 1e-6  # never a weightless sub-block (its scale would be arbitrary)
    nsub = n // L.sub
    x = W.reshape(m * nsub, L.sub)
    xw = wt.reshape(1, nsub, L.sub).expand(m, nsub, L.sub).reshape(m * nsub, L.sub)
    per = L.block // L.sub
    if L.scale_bits == 0 and L.mins:  # Q4_1: fp16 step d and fp16 offset m = -O
        s, o = _asym_search(x, xw, L.bits)
        d = _fp16(s).reshape(m, nsub)
        d = torch.where(d == 0, torch.full_like(d, 2.0 ** -24), d)
        g = Grid(kind, None, d, torch.ones(m, nsub, dtype=torch.int16, device=W.device), _fp16(o).reshape(m, nsub))
    elif L.scale_bits == 0:  # Q4_0: the step itself is the fp16 d
        s = _sym_search(x, xw, L.bits, L.zero)
        d = _fp16(s).reshape(m, nsub)
        d = torch.where(d == 0, torch.full_like(d, 2.0 ** -24), d)
        g = Grid(kind, None, d, torch.ones(m, nsub, dtype=torch.int16, device=W.device))
    elif not L.mins:  # Q3_K: signed 6-bit scales
        s = _sym_search(x, xw, L.bits, L.zero).reshape(m, nsub)
        d, l = _quantize_scales(s, L.scale_bits, per, signed=True)
        l = torch.where(l == 0, torch.where(s >= 0, 1, -1).to(l.dtype), l)
        g = Grid(kind, None, d, l)
    else:  # Q4_K / Q2_K: unsigned scales and mins
        s, o = _asym_search(x, xw, L.bits)
        d, sc = _quantize_scales(s.reshape(m, nsub), L.scale_bits, per, signed=False)
        dmin, mn = _quantize_scales(o.reshape(m, nsub), L.scale_bits, per, signed=False)
        sc = sc.clamp_min(1)
        g = Grid(kind, None, d, sc, dmin, mn)
    g.codes = rtn_codes(g, W)
    return g


def rtn_codes(g: Grid, W: torch.Tensor) -> torch.Tensor:
    """Nearest codes of W on g's fixed values (what llama.cpp does after fixing its scales)."""
    L = g.layout
    S, O = g.scale_offset()
    Se, Oe = S.repeat_interleave(L.sub, 1), O.repeat_interleave(L.sub, 1)
    maxq = (1 << L.bits) - 1
    if L.mins:
        c = torch.round((W.float() + Oe) / Se)
    else:
        c = torch.round(W.float() / Se) + L.zero
    return torch.clamp(c, 0, maxq).to(torch.uint8)


# ---------------------------------------------------------------------------------------- block bytes

def _u8(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.uint8).cpu().numpy()


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).cpu().contiguous().numpy().view(np.uint8).reshape(*t.shape, 2)


def encode(g: Grid) -> np.ndarray:
    """ggml block bytes uint8 [m, nblocks * type_size] of g (rows = output channels)."""
    L = g.layout
    m, n = g.codes.shape
    nb = n // L.block
    q = g.codes.to(torch.int32).cpu().reshape(m, nb, L.block)
    d = _f16_bytes(g.d.reshape(m, nb))
    if g.kind == "Q4_0":
        qs = q[..., :16] | (q[..., 16:] << 4)
        out = np.concatenate([d, _u8(qs)], axis=-1)
    elif g.kind == "Q4_1":
        qs = q[..., :16] | (q[..., 16:] << 4)
        out = np.concatenate([d, _f16_bytes(-g.dmin.reshape(m, nb).float()), _u8(qs)], axis=-1)
    elif g.kind == "Q4_K":
        sc = g.sc.to(torch.int32).cpu().reshape(m, nb, 8)
        mn = g.mn.to(torch.int32).cpu().reshape(m, nb, 8)
        s = torch.zeros(m, nb, 12, dtype=torch.int32)
        s[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
        s[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
        s[..., 8:12] = (sc[..., 4:8] & 15) | ((mn[..., 4:8] & 15) << 4)
        qc = q.reshape(m, nb, 4, 2, 32)  # 4 chunks of 64: low nibbles the first 32, high the next 32
        qs = (qc[..., 0, :] | (qc[..., 1, :] << 4)).reshape(m, nb, 128)
        out = np.concatenate([d, _f16_bytes(g.dmin.reshape(m, nb)), _u8(s), _u8(qs)], axis=-1)
    elif g.kind == "Q2_K":
        sc = (g.sc.to(torch.int32) | (g.mn.to(torch.int32) << 4)).cpu().reshape(m, nb, 16)
        qc = q.reshape(m, nb, 2, 4, 32)  # 2 chunks of 128: 4 shifts of 32 consecutive channels
        qs = (qc[:, :, :, 0] | (qc[:, :, :, 1] << 2) | (qc[:, :, :, 2] << 4) | (qc[:, :, :, 3] << 6)).reshape(m, nb, 64)
        out = np.concatenate([_u8(sc), _u8(qs), d, _f16_bytes(g.dmin.reshape(m, nb))], axis=-1)
    elif g.kind == "Q3_K":
        l = (g.sc.to(torch.int32) + 32).cpu().reshape(m, nb, 16)
        s = torch.zeros(m, nb, 12, dtype=torch.int32)
        s[..., 0:8] = (l[..., 0:8] & 15) | ((l[..., 8:16] & 15) << 4)
        hi = (l >> 4) & 3
        s[..., 8:12] = hi[..., 0:4] | (hi[..., 4:8] << 2) | (hi[..., 8:12] << 4) | (hi[..., 12:16] << 6)
        qc = q.reshape(m, nb, 2, 4, 32)  # channel c*128 + j*32 + i: low bits in qs[c*32+i] >> 2j, high bit in hmask[i] bit 4c+j
        low = qc & 3
        qs = (low[:, :, :, 0] | (low[:, :, :, 1] << 2) | (low[:, :, :, 2] << 4) | (low[:, :, :, 3] << 6)).reshape(m, nb, 64)
        hb = (qc >> 2) & 1  # [m, nb, 2, 4, 32]
        hm = torch.zeros(m, nb, 32, dtype=torch.int32)
        for c in range(2):
            for j in range(4):
                hm |= hb[:, :, c, j] << (4 * c + j)
        out = np.concatenate([_u8(hm), _u8(qs), _u8(s), d], axis=-1)
    else:
        raise ValueError(f"encode: unknown kind {g.kind!r}")
    out = out.reshape(m, -1)
    assert out.shape[1] == nb * GGML_QUANT_SIZES[L.qtype][1], (g.kind, out.shape)
    return np.ascontiguousarray(out)
