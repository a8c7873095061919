"""Shared test inputs for the GPU qgemm kernels (Triton interpreter tests and CUDA tests)."""
from __future__ import annotations

import torch

from quantkern.formats import gptq

# (name, n, group_size, act_order, uniform) ; act_order -> g_idx is a permutation of the natural groups;
# "uneven" -> groups of unequal sizes in scrambled order (the kernels' per-channel g_idx path)
GROUPINGS = ("perchannel", "g32", "g128", "ragged", "actorder", "uneven")


def make_g_idx(n: int, grouping: str, gen: torch.Generator) -> torch.Tensor:
    if grouping == "perchannel":
        return torch.zeros(n, dtype=torch.int32)
    if grouping == "g32":
        return (torch.arange(n) // 32).to(torch.int32)
    if grouping == "g64":
        return (torch.arange(n) // 64).to(torch.int32)
    if grouping == "g128":
        return (torch.arange(n) // 128).to(torch.int32)
    if grouping == "ragged":  # group 40: n not a multiple of it, nor of the kernel tiles
        return (torch.arange(n) // 40).to(torch.int32)
    if grouping == "actorder":  # GPTQ desc_act: group of channel j = position of j in the order // gs
        order = torch.randperm(n, generator=gen)
        g = torch.empty(n, dtype=torch.int32)
        g[order] = (torch.arange(n) // 32).to(torch.int32)
        return g
    if grouping == "uneven":
        G = max(1, n // 24)
        g = torch.randint(0, G, (n,), generator=gen).to(torch.int32)
        g[:G] = torch.arange(G, dtype=torch.int32)  # every group used
        return g[torch.randperm(n, generator=gen)]
    raise ValueError(grouping)


def make_packed(m: int, n: int, bits: int, grouping: str, sym: bool, gen: torch.Generator) -> dict:
    """Random codes / fp16-representable scales / zero points in a GPTQ v1 dict (CPU)."""
    maxq = (1 << bits) - 1
    g_idx = make_g_idx(n, grouping, gen)
    G = int(g_idx.max()) + 1
    codes = torch.randint(0, maxq + 1, (m, n), generator=gen)
    scales = (torch.rand(G, m, generator=gen) * 0.02 + 0.001).half().float()
    if sym:
        zeros = torch.full((G, m), (maxq + 1) // 2)
    else:
        zeros = torch.randint(1, maxq + 1, (G, m), generator=gen)
    return gptq.pack(codes, scales, zeros, g_idx, bits)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
