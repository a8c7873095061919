"""The GPU kernel layout (Triton and CUDA qgemm), derived from GPTQ v1 tensors at load time.

What changes from the on-disk layout, and why:
- act-order: input channels are permuted once so that groups are contiguous (stable sort of g_idx);
  the activation columns are gathered with the same permutation at run time (`perm`).
- zeros are unpacked to uint8 true zero points [G, m] (no bit extraction of qzeros in the kernels).
- qweight keeps the GPTQ bit stream (3-bit straddling words included) but in the permuted channel
  order: the kernels read straddling codes directly (csrc/common/qgemm_layout.h).
- `group_size` is the uniform group length in kernel order when g[k] == k // group_size holds for all
  k (a ragged last group is fine), else -1 and the kernels read `g_idx` per channel.
"""
from __future__ import annotations

import dataclasses

import torch

from . import gptq
from ..ops import pack as _pack_ops


@dataclasses.dataclass
class GpuQWeight:
    qweight: torch.Tensor  # int32 [packed_rows(n, bits), m], channels in kernel order
    scales: torch.Tensor  # fp16 [G, m]
    zeros: torch.Tensor  # uint8 [G, m], true zero points
    g_idx: torch.Tensor  # int32 [n], group of kernel channel k (nondecreasing)
    perm: torch.Tensor | None  # int64 [n]: kernel channel k is original channel perm[k]; None = identity
    group_size: int  # uniform group length in kernel order, or -1 (use g_idx)
    bits: int
    m: int
    n: int

    def to(self, device) -> "GpuQWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self, qweight=mv(self.qweight), scales=mv(self.scales), zeros=mv(self.zeros),
            g_idx=mv(self.g_idx), perm=mv(self.perm),
        )


def uniform_group_size(g_sorted: torch.Tensor, n: int) -> int:
    """The group length gs with g[k] == k // gs for every k, or -1.

    One group -> a multiple of 1024 >= n, so that every kernel tile (32..1024 channels) lies in it."""
    if n == 0:
        return -1
    G = int(g_sorted[-1].item()) + 1
    if G == 1 and int(g_sorted[0].item()) == 0:
        return -(-n // 1024) * 1024
    gs = int((g_sorted == 0).sum().item())
    if gs == 0:
        return -1
    want = torch.arange(n, device=g_sorted.device) // gs
    return gs if torch.equal(g_sorted.to(torch.int64), want) else -1


def prepare(t: dict, bits: int, device=None) -> GpuQWeight:
    """GPTQ v1 tensors -> GpuQWeight on `device` (default: the device of t['qweight'])."""
    m, n, G = gptq.check_tensors(t, bits)
    device = t["qweight"].device if device is None else torch.device(device)
    codes, scales, zeros, g_idx = gptq.unpack({k: t[k].cpu() for k in gptq.TENSOR_NAMES}, bits)
    g = g_idx.to(torch.int64)
    perm = None
    if n > 1 and bool((g[1:] < g[:-1]).any()):
        perm = torch.sort(g, stable=True).indices
        codes = codes[:, perm]
        g = g[perm]
    qweight = _pack_ops.pack_dim0(codes.t().contiguous().to(torch.int32), bits)
    return GpuQWeight(
        qweight=qweight.to(device),
        scales=scales.to(torch.float16).contiguous().to(device),
        zeros=zeros.to(torch.uint8).contiguous().to(device),
        g_idx=g.to(torch.int32).contiguous().to(device),
        perm=None if perm is None else perm.to(device),
        group_size=uniform_group_size(g, n),
        bits=bits,
        m=m,
        n=n,
    )


def dequantize(p: GpuQWeight) -> torch.Tensor:
    """fp32 [m, n] in ORIGINAL channel order, on p's device (torch ops; checks the layout in tests and
    serves as the CUDA backend's fallback for shapes its kernels refuse)."""
    codes = _pack_ops.unpack_dim0(p.qweight, p.bits, p.n).t().float()  # [m, n] kernel order
    gi = p.g_idx.long()
    w = (codes - p.zeros[gi].t().float()) * p.scales[gi].t().float()
    if p.perm is not None:
        out = torch.empty_like(w)
        out[:, p.perm] = w
        w = out
    return w


def gather_input(x2d: torch.Tensor, p: GpuQWeight) -> torch.Tensor:
    """Activation columns in kernel order (act-order gather), contiguous."""
    if p.perm is not None:
        x2d = x2d.index_select(1, p.perm)
    return x2d.contiguous()
