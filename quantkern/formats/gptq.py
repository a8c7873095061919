"""The GPTQ on-disk layout (GPTQ-for-LLaMa / AutoGPTQ / GPTQModel "gptq" checkpoint format, v1).

    qweight int32 [ceil(n/32)*bits, m]  codes packed along the input dim (see bitstream.py)
    qzeros  int32 [G, ceil(m/32)*bits]  (zero - 1) packed along the output dim, same bit stream rule
                                        (GPTQModel's "gptq_v2" stores the zero itself: see CHECKPOINT_FORMATS)
    scales  fp16  [G, m]
    g_idx   int32 [n]                   group of each input channel (original channel order)

Codes are [m, n] (out x in) in the Python API, like nn.Linear.weight. n and m that are not multiples
of 32 are padded with zero codes inside the packed words; g_idx and scales keep the true n and m.
"""
from __future__ import annotations

import torch

from ..spec import SUPPORTED_BITS
from ..ops import pack as _pack_ops
from . import bitstream

TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")

# checkpoint_format -> what is subtracted from the zero point before it is stored. v1 ("gptq") cannot hold a
# zero point of 0, and GPTQModel trusts an asymmetric v1 checkpoint only from its own writer; v2 has neither
# problem. Everything in memory (QuantLinear, the kernels) is v1: the v2 offset is applied at save and load.
CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def _as_int_codes(name: str, t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.is_floating_point():
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN/Inf")
        if not torch.equal(t, torch.round(t)):
            raise ValueError(f"{name} must hold integers; got non-integer values (e.g. {t[t != t.round()][0].item()})")
    t = t.to(torch.int64)
    if t.numel() and (t.min() < lo or t.max() > hi):
        raise ValueError(f"{name} out of range [{lo}, {hi}]: min {t.min().item()}, max {t.max().item()}")
    return t


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int) -> dict:
    """Pack codes [m, n], scales/zeros [G, m] (zeros as true integer zero points), g_idx [n]."""
    bits = _check_bits(bits)
    maxq = (1 << bits) - 1
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    m, n = codes.shape
    codes = _as_int_codes("codes", codes, 0, maxq)
    if scales.dim() != 2 or scales.shape[1] != m:
        raise ValueError(f"scales must be [G, {m}], got {tuple(scales.shape)}")
    if zeros.shape != scales.shape:
        raise ValueError(f"zeros must match scales {tuple(scales.shape)}, got {tuple(zeros.shape)}")
    if not scales.is_floating_point() or not torch.isfinite(scales).all() or (scales <= 0).any():
        raise ValueError("scales must be finite positive floats")
    G = scales.shape[0]
    zeros = _as_int_codes("zeros", zeros, 0, maxq)
    if (zeros == 0).any():
        raise ValueError("zero point 0 cannot be stored in GPTQ v1 (it stores zero - 1); use zeros in [1, maxq]")
    if g_idx.dim() != 1 or g_idx.shape[0] != n:
        raise ValueError(f"g_idx must be [n={n}], got {tuple(g_idx.shape)}")
    g_idx = _as_int_codes("g_idx", g_idx, 0, G - 1)
    return {
        "qweight": _pack_ops.pack_dim0(codes.t().contiguous(), bits),
        "qzeros": _pack_ops.pack_dim0((zeros - 1).t().contiguous(), bits).t().contiguous(),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def check_tensors(t: dict, bits: int, m: int | None = None, n: int | None = None) -> tuple[int, int, int]:
    """Validate a qweight/qzeros/scales/g_idx dict; return (m, n, G). Names the first mismatch."""
    bits = _check_bits(bits)
    missing = [k for k in TENSOR_NAMES if k not in t]
    if missing:
        raise ValueError(f"GPTQ tensors missing {missing}")
    qweight, qzeros, scales, g_idx = (t[k] for k in TENSOR_NAMES)
    for k, want in (("qweight", torch.int32), ("qzeros", torch.int32), ("g_idx", torch.int32)):
        if t[k].dtype != want:
            raise ValueError(f"{k} must be {want}, got {t[k].dtype}")
    if not scales.is_floating_point():
        raise ValueError(f"scales must be floating point, got {scales.dtype}")
    if scales.dim() != 2 or qweight.dim() != 2 or qzeros.dim() != 2 or g_idx.dim() != 1:
        raise ValueError("expected qweight/qzeros/scales 2-D and g_idx 1-D")
    G, m_s = scales.shape
    n_g = g_idx.shape[0]
    if m is not None and m != m_s:
        raise ValueError(f"scales say {m_s} output features, expected {m}")
    if n is not None and n != n_g:
        raise ValueError(f"g_idx says {n_g} input features, expected {n}")
    if qweight.shape != (bitstream.packed_rows(n_g, bits), m_s):
        raise ValueError(
            f"qweight shape {tuple(qweight.shape)} does not match {bits}-bit n={n_g}, m={m_s} "
            f"(expected {(bitstream.packed_rows(n_g, bits), m_s)}): wrong bits or a mismatched checkpoint?"
        )
    if qzeros.shape != (G, bitstream.packed_rows(m_s, bits)):
        raise ValueError(f"qzeros shape {tuple(qzeros.shape)} does not match G={G}, m={m_s} at {bits} bits")
    if n_g and (g_idx.min() < 0 or g_idx.max() >= G):
        raise ValueError(f"g_idx values must lie in [0, {G}), got [{g_idx.min().item()}, {g_idx.max().item()}]")
    return m_s, n_g, G


def unpack(t: dict, bits: int):
    """Inverse of pack: (codes uint8 [m, n], scales fp16 [G, m], zeros int32 [G, m], g_idx int32 [n])."""
    m, n, G = check_tensors(t, bits)
    codes = _pack_ops.unpack_dim0(t["qweight"], bits, n).t().contiguous()
    zeros = _pack_ops.unpack_dim0(t["qzeros"].t().contiguous(), bits, m).t().to(torch.int32) + 1
    return codes, t["scales"], zeros.contiguous(), t["g_idx"]


def dequantize(t: dict, bits: int) -> torch.Tensor:
    """Dense fp32 weight [m, n] of a packed dict (the reference every kernel is checked against)."""
    from ..grid import dequantize_groups

    codes, scales, zeros, g_idx = unpack(t, bits)
    return dequantize_groups(codes, scales.float(), zeros.float(), g_idx)


def _stored_zeros(t: dict, bits: int) -> torch.Tensor:
    """qzeros unpacked: the stored values [G, m] as int64 (zero - 1 in v1, the zero in v2)."""
    m, _, _ = check_tensors(t, bits)
    return _pack_ops.unpack_dim0(t["qzeros"].t().contiguous(), bits, m).t().to(torch.int64)


def _store_zeros(t: dict, zeros: torch.Tensor, bits: int, dst: str) -> dict:
    """t with qzeros re-packed from zero points [G, m] in format `dst`; ValueError where one cannot be stored."""
    stored = zeros - CHECKPOINT_FORMATS[dst]
    bad = (stored < 0) | (stored > (1 << bits) - 1)
    if bad.any():
        raise ValueError(f"a zero point of {int(zeros[bad][0])} cannot be stored as {dst!r} at {bits} bits (it stores "
                         f"zero - {CHECKPOINT_FORMATS[dst]} in [0, {(1 << bits) - 1}])")
    return {**t, "qzeros": _pack_ops.pack_dim0(stored.t().contiguous(), bits).t().contiguous()}


def _check_format(*formats) -> None:
    for f in formats:
        if f not in CHECKPOINT_FORMATS:
            raise ValueError(f"unknown GPTQ checkpoint_format {f!r}; known: {sorted(CHECKPOINT_FORMATS)}")


def _check_v1_asym(stored: torch.Tensor, bits: int) -> None:
    if (stored == (1 << bits) - 1).any():
        raise ValueError(f"a zero point of 0 wrapped around in an asymmetric v1 checkpoint (stored {(1 << bits) - 1}); "
                         "v1 cannot hold it, and quantkern's kernels need zero points >= 1")


def _check_sym(zeros: torch.Tensor, bits: int) -> None:
    bad = zeros != (1 << (bits - 1))
    if bad.any():
        raise ValueError(f"the config says sym=true but a zero point is {int(zeros[bad][0])}, not {1 << (bits - 1)}: "
                         "a wrong sym or checkpoint_format (v1 stores zero - 1, gptq_v2 the zero itself)")


def convert_qzeros(t: dict, bits: int, src: str, dst: str) -> dict:
    """The same tensors with qzeros re-stored from checkpoint_format `src` to `dst` (e.g. "gptq" -> "gptq_v2").
    Raises ValueError when a zero point cannot be stored in `dst` (0 in v1)."""
    _check_format(src, dst)
    if CHECKPOINT_FORMATS[src] == CHECKPOINT_FORMATS[dst]:
        return t
    return _store_zeros(t, _stored_zeros(t, bits) + CHECKPOINT_FORMATS[src], bits, dst)


def check_v1_asym_zeros(t: dict, bits: int) -> None:
    """An asymmetric v1 checkpoint storing maxq holds a zero point of 0 wrapped around (0 - 1), not maxq + 1,
    which no min/max grid produces: writers that subtract 1 word-wise (GPTQModel's v2 -> v1) then also
    borrow from the neighbouring zero. Raise ValueError rather than read either one wrong."""
    _check_v1_asym(_stored_zeros(t, bits), bits)


def check_sym_zeros(t: dict, bits: int) -> None:
    """v1 tensors of a symmetric grid hold the zero point 2^(bits-1) everywhere; anything else means the
    config lies (sym, or a v1/v2 checkpoint_format off by one), so raise ValueError naming it."""
    _check_sym(_stored_zeros(t, bits) + CHECKPOINT_FORMATS["gptq"], bits)


def read_qzeros(t: dict, bits: int, fmt: str, sym: bool) -> dict:
    """A checkpoint module's tensors with qzeros as quantkern keeps them in memory (v1, the kernels'
    convention), checked as check_v1_asym_zeros / check_sym_zeros do, from one unpack of qzeros."""
    _check_format(fmt)
    stored = _stored_zeros(t, bits)
    if fmt == "gptq" and not sym:
        _check_v1_asym(stored, bits)
    zeros = stored + CHECKPOINT_FORMATS[fmt]
    if sym:
        _check_sym(zeros, bits)
    return t if fmt == "gptq" else _store_zeros(t, zeros, bits, "gptq")
