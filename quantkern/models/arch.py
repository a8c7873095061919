"""Where the decoder blocks and their linears are, per architecture.

Each entry names the block list (attribute path from the CausalLM) and the true-sequential order of
the linears inside one block: linears in the same group read the same input (so share statistics),
and each group is quantized before the next one's inputs are collected. Architectures not in the
table are handled generically: the block list is the largest ModuleList of identical modules that
contain nn.Linear, and the groups are found by tracing one block forward (linears that read the
very same input tensor form a group, in call order).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn

_LLAMA = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_PHI3 = (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))


@dataclasses.dataclass(frozen=True)
class Arch:
    blocks: str  # attribute path of the nn.ModuleList of decoder blocks
    sequential: tuple | None  # groups of linear names relative to a block, or None = trace
    final_norm: str = "model.norm"  # the norm between the last block and lm_head (its output feeds lm_head)


ARCHS = {
    "llama": Arch("model.layers", _LLAMA),
    "mistral": Arch("model.layers", _LLAMA),
    "qwen2": Arch("model.layers", _LLAMA),
    "qwen3": Arch("model.layers", _LLAMA),
    "gemma": Arch("model.layers", _LLAMA),
    "gemma2": Arch("model.layers", _LLAMA),
    "granite": Arch("model.layers", _LLAMA),
    "olmo2": Arch("model.layers", _LLAMA),
    "phi3": Arch("model.layers", _PHI3),
}


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(attribute path, ModuleList) of the decoder blocks."""
    arch = ARCHS.get(getattr(getattr(model, "config", None), "model_type", None))
    if arch is not None:
        try:
            return arch.blocks, _getattr_path(model, arch.blocks)
        except AttributeError:
            pass
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(b) for b in mod}
            has_linear = any(isinstance(x, nn.Linear) for x in mod[0].modules())
            if len(kinds) == 1 and has_linear and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList of "
                         "identical blocks with nn.Linear layers; add an entry to quantkern.models.arch.ARCHS")
    return best


def linear_groups(model: nn.Module, block: nn.Module, trace: Callable[[], None]) -> list[tuple[str, ...]]:
    """True-sequential groups of linear names in `block`. `trace()` runs the block forward once."""
    arch = ARCHS.get(getattr(getattr(model, "config", None), "model_type", None))
    linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    if arch is not None and arch.sequential is not None and {n for g in arch.sequential for n in g} == linears:
        return [tuple(g) for g in arch.sequential]
    # keep the input tensors themselves (not their id()s): a freed input's id is reused by the next
    # allocation, which made o_proj and gate/up look like they shared an input
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, inp, out, name=n: calls.append((name, inp[0])))
               for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    try:
        trace()
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen, last_input = set(), None
    for name, inp in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and inp is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = inp
    return [tuple(g) for g in groups]


_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_norm", "ln_f", "norm_f")


def find_final_norm(model: nn.Module) -> nn.Module:
    """The module whose output is lm_head's input (the final norm after the decoder blocks)."""
    arch = ARCHS.get(getattr(getattr(model, "config", None), "model_type", None))
    if arch is not None:
        try:
            return _getattr_path(model, arch.final_norm)
        except AttributeError:
            pass
    block_path, _ = find_blocks(model)
    parent = _getattr_path(model, block_path.rpartition(".")[0]) if "." in block_path else model
    for name in _FINAL_NORM_NAMES:
        mod = getattr(parent, name, None)
        if isinstance(mod, nn.Module):
            return mod
    raise ValueError(f"cannot find the final norm of {type(model).__name__} (looked for {_FINAL_NORM_NAMES} next to "
                     f"{block_path}); add final_norm to its entry in quantkern.models.arch.ARCHS")
