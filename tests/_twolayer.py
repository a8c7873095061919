"""A small random two-layer network whose end-to-end error can be computed exactly (tests only)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantkern.calibration.fisher import collect_grad_stats


class TwoLayer(nn.Module):
    def __init__(self, d0=64, d1=96, V=32):
        super().__init__()
        self.l1 = nn.Linear(d0, d1, bias=False)
        self.l2 = nn.Linear(d1, V, bias=False)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def sampled_ce(logits, batch, gen):
    """Summed CE against targets drawn from the model's own softmax (the Fisher of the model's KL)."""
    V = logits.shape[-1]
    with torch.no_grad():
        tgt = torch.multinomial(torch.softmax(logits.reshape(-1, V), -1), 1, generator=gen).flatten()
    return F.cross_entropy(logits.reshape(-1, V), tgt, reduction="sum")


def problem(seed, S=64, T=16, d0=64, d1=96, V=32):
    """(net, X [S, T, d0], activation Hessians, gradient statistics) for one seed."""
    torch.manual_seed(seed)
    net = TwoLayer(d0, d1, V)
    with torch.no_grad():
        net.l2.weight.mul_(3.0)
    X = torch.randn(S, T, d0) * torch.exp(torch.randn(S, T, 1))  # token scales vary
    with torch.no_grad():
        h = torch.tanh(net.l1(X))
    Hx = 2 * torch.einsum("stn,stk->nk", X, X) / S
    Hh = 2 * torch.einsum("stn,stk->nk", h, h) / S
    stats = collect_grad_stats(net, X, ["l1", "l2"], kind="both", loss_fn=sampled_ce, batch_size=8, seed=seed)
    return net, X, {"l1": Hx, "l2": Hh}, stats


def output_kl(net, X, W1, W2) -> float:
    """Mean KL(p_fp || p_q) over all tokens: the network-output error, exactly."""
    with torch.no_grad():
        ref = F.log_softmax(net(X), -1)
        q = F.log_softmax(F.linear(torch.tanh(F.linear(X, W1)), W2), -1)
        V = ref.shape[-1]
        return F.kl_div(q.reshape(-1, V), ref.reshape(-1, V), log_target=True, reduction="batchmean").item()
