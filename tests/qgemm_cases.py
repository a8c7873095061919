"""Random packed GPTQ layers for the qgemm and QuantLinear tests (random codes, scales, zeros, g_idx)."""
from __future__ import annotations

import torch

from quantkern.formats import gptq
from quantkern.spec import QuantSpec


def act_order_g_idx(n: int, group_size: int, gen: torch.Generator) -> torch.Tensor:
    """GPTQ act-order without static groups: channels taken in a random order, grouped in that order."""
    perm = torch.randperm(n, generator=gen)
    g_idx = torch.empty(n, dtype=torch.int32)
    g_idx[perm] = (torch.arange(n) // group_size).to(torch.int32)
    return g_idx


def random_layer(m: int, n: int, spec: QuantSpec, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    gs = spec.group_len(n)
    G = spec.num_groups(n)
    maxq = spec.maxq
    codes = torch.randint(0, maxq + 1, (m, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(G, m, generator=gen) * 0.02 + 0.001).half().float()
    if spec.sym:
        zeros = torch.full((G, m), float((maxq + 1) // 2))
    else:
        zeros = torch.randint(1, maxq + 1, (G, m), generator=gen).float()
    if spec.act_order:
        g_idx = act_order_g_idx(n, gs, gen)
    else:
        g_idx = (torch.arange(n) // gs).to(torch.int32)
    return gptq.pack(codes, scales, zeros, g_idx, spec.bits)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
