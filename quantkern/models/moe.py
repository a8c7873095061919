"""Mixture-of-experts blocks: fused 3-D expert weights -> one nn.Linear per expert projection.

transformers 5 stores the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V2/V3 as one module
with two 3-D Parameters, `gate_up_proj` [E, 2I, H] (gate rows first, then up) and `down_proj` [E, H, I],
called as experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]). The solvers and the GPTQ format
work on 2-D linears, and GPTQModel / vLLM expect per-expert modules (`experts.{e}.gate_proj/up_proj/
down_proj`), so quantization first splits the fused module into `RoutedExperts`: a ModuleList of `ExpertMLP`
with the same routed forward. Anything else with 3-D weights (biases, interleaved gate/up, other
activations layouts) is refused by name rather than guessed at.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from .errors import UnsupportedModelError

EXPERT_RE = re.compile(r"^(?P<container>.*\.experts)\.(?P<index>\d+)\.")


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, act_fn, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj, self.up_proj = nn.Linear(hidden, inter, **kw), nn.Linear(hidden, inter, **kw)
        self.down_proj = nn.Linear(inter, hidden, **kw)
        self.act_fn = act_fn

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RoutedExperts(nn.ModuleList):
    """experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H], one ExpertMLP per expert;
    each expert sees only the tokens routed to it, its output scaled by the routing weight (as the fused
    module computes it). `trace_all`: every expert runs on every token (to discover each expert's linears)."""

    trace_all = False

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            if self.trace_all:
                expert(hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device)])
                continue
            token_idx, pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def is_fused_experts(mod: nn.Module) -> bool:
    gu, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3


def _split(mod: nn.Module, name: str) -> RoutedExperts:
    gu, down = mod.gate_up_proj, mod.down_proj
    E, two_i, H = gu.shape
    extra = sorted(n for n, _ in mod.named_parameters() if n not in ("gate_up_proj", "down_proj"))
    layout = (getattr(mod, "is_concatenated", True), getattr(mod, "is_transposed", False))
    if extra or layout != (True, False) or down.shape != (E, H, two_i // 2) or not hasattr(mod, "act_fn"):
        raise UnsupportedModelError(
            f"{name}: fused experts {type(mod).__name__} (gate_up_proj {tuple(gu.shape)}, down_proj "
            f"{tuple(down.shape)}, other parameters {extra}) are not the [gate; up] / down layout quantkern splits "
            "into per-expert linears; add support in quantkern.models.moe")
    out = RoutedExperts()
    for e in range(E):
        x = ExpertMLP(H, two_i // 2, mod.act_fn, dtype=gu.dtype, device=gu.device)
        with torch.no_grad():
            x.gate_proj.weight.copy_(gu[e, : two_i // 2])
            x.up_proj.weight.copy_(gu[e, two_i // 2:])
            x.down_proj.weight.copy_(down[e])
        out.append(x)
    return out


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module by RoutedExperts (same outputs, per-expert nn.Linear); returns
    their paths. Idempotent."""
    found = [(n, m) for n, m in model.named_modules() if is_fused_experts(m)]
    for name, mod in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _split(mod, name))
    return [n for n, _ in found]


def expert_of(name: str) -> tuple[str, int] | None:
    """(container path, expert index) for a linear inside RoutedExperts (`...experts.{e}.x_proj`), else None."""
    m = EXPERT_RE.match(name)
    return (m["container"], int(m["index"])) if m else None
