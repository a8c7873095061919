"""Where the decoder blocks and their linears are, per architecture.

Each entry names the block list (attribute path from the CausalLM) and the true-sequential order of
the linears inside one block: linears in the same group read the same input (so share statistics),
and each group is quantized before the next one's inputs are collected. Architectures not in the
table are handled generically: the block list is the largest ModuleList of identical modules that
contain nn.Linear, and the groups are found by tracing one block forward (linears that read the
very same input tensor form a group, ordered by their first call).

Mixture-of-experts blocks: table entries may hold `{e}`, expanded over the experts of the block's
RoutedExperts (models/moe.py); groups naming linears a block lacks are dropped (DeepSeek's first blocks
are dense). Routers and gates (`FLOAT_LINEARS`) are never quantized: they pick experts, a rounding error
there moves tokens to other experts, and they are tiny.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn

from .errors import UnsupportedModelError

_LLAMA = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_EXPERTS = (("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"), ("mlp.experts.{e}.down_proj",))
_QWEN2_MOE = _LLAMA[:2] + (("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                          ("mlp.shared_expert.down_proj",)) + _EXPERTS
_DEEPSEEK = (  # multi-head latent attention: q through a low-rank pair (V3) or one q_proj (V2-Lite)
    ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_b_proj",),
    ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.kv_b_proj",),
    ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",),  # dense blocks
) + _EXPERTS + (("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"), ("mlp.shared_experts.down_proj",))
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
    "gemma3_text": Arch("model.layers", _LLAMA),
    "mixtral": Arch("model.layers", _LLAMA[:2] + _EXPERTS),
    "qwen2_moe": Arch("model.layers", _QWEN2_MOE),
    "qwen3_moe": Arch("model.layers", _LLAMA[:2] + _EXPERTS),
    "deepseek_v2": Arch("model.layers", _DEEPSEEK),
    "deepseek_v3": Arch("model.layers", _DEEPSEEK),
}

# leaf names of linears kept in float, with the reason the checkpoint records
FLOAT_LINEARS = {"gate": "MoE router (expert choice)", "router": "MoE router (expert choice)",
                 "shared_expert_gate": "shared-expert gate (one output: scales the shared expert)"}


def kept_float(block: nn.Module) -> dict[str, str]:
    """{linear name: why} for the linears of `block` that stay in float."""
    # transformers 5 routers are often not nn.Linear (a module with a 2-D weight): listed all the same
    return {n: FLOAT_LINEARS[n.rpartition(".")[2]] for n, m in block.named_modules()
            if n.rpartition(".")[2] in FLOAT_LINEARS
            and (isinstance(m, nn.Linear) or getattr(getattr(m, "weight", None), "dim", lambda: 0)() == 2)}


def quantizable_linears(block: nn.Module) -> list[str]:
    """Names of the nn.Linear modules of `block` to quantize (all but routers and gates), in module order."""
    skip = kept_float(block)
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and n not in skip]


def table_groups(model: nn.Module, block: nn.Module) -> list[tuple[str, ...]] | None:
    """The architecture table's groups for `block`, `{e}` expanded over its experts and groups it lacks
    dropped; None when the model has no table entry."""
    arch = ARCHS.get(getattr(getattr(model, "config", None), "model_type", None))
    if arch is None or arch.sequential is None:
        return None
    names = dict(block.named_modules())  # nn.Linear before quantization, QuantLinear after
    out, seq = [], list(arch.sequential)
    while seq:
        if "{e}" not in seq[0][0]:
            out.append(tuple(seq.pop(0)))
            continue
        run = []  # consecutive expert templates expand expert by expert: e0 gate/up, e0 down, e1 ...
        while seq and "{e}" in seq[0][0]:
            run.append(seq.pop(0))
        try:
            count = len(_getattr_path(block, run[0][0].split(".{e}")[0]))
        except (AttributeError, TypeError):
            continue
        out += [tuple(n.format(e=e) for n in g) for e in range(count) for g in run]
    return [g for g in out if all(n in names for n in g)]


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
            nested = best is not None and name.startswith(best[0] + ".")
            if len(kinds) == 1 and has_linear and not nested and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        raise UnsupportedModelError(f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList of "
                         "identical blocks with nn.Linear layers; add an entry to quantkern.models.arch.ARCHS")
    return best


def linear_groups(model: nn.Module, block: nn.Module, trace: Callable[[], None]) -> list[tuple[str, ...]]:
    """True-sequential groups of the quantizable linear names in `block` (the architecture table when it
    names exactly those linears, else a trace). `trace()` runs the block forward once."""
    linears = set(quantizable_linears(block))
    table = table_groups(model, block)
    if table is not None and {n for g in table for n in g} == linears:
        return table
    return traced_groups(block, trace)


def traced_groups(block: nn.Module, trace: Callable[[], None]) -> list[tuple[str, ...]]:
    """Groups from one forward: linears that read the very same input tensor, ordered by first call (every
    expert runs on all tokens during the trace, so none is missed)."""
    from .moe import RoutedExperts

    linears = set(quantizable_linears(block))
    # keep the input tensors themselves (not their id()s): a freed input's id is reused by the next
    # allocation, which made o_proj and gate/up look like they shared an input
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, inp, out, name=n: calls.append((name, inp[0])))
               for n, m in block.named_modules() if n in linears]
    experts = [m for m in block.modules() if isinstance(m, RoutedExperts)]
    for m in experts:
        m.trace_all = True
    try:
        trace()
    finally:
        for h in handles:
            h.remove()
        for m in experts:
            m.trace_all = False
    groups: list[tuple[torch.Tensor, list[str]]] = []
    seen = set()
    for name, inp in calls:
        if name in seen:
            continue
        seen.add(name)
        # any earlier group reading this very tensor (MLA's q_a/kv_a are called with others in between)
        hit = next((g for x, g in groups if x is inp), None)
        if hit is not None:
            hit.append(name)
        else:
            groups.append((inp, [name]))
    missing = linears - seen
    if missing:
        raise UnsupportedModelError(f"tracing {type(block).__name__} never called {sorted(missing)}; add the architecture to "
                         "quantkern.models.arch.ARCHS")
    return [tuple(g) for _, g in groups]


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
