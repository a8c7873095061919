"""The output projection (lm_head): which grid it gets, and how a checkpoint stores it.

Two kinds of quantized head:
- rounded to nearest (the default, 8-bit RTN g128, or any bit width asked for): deterministic, so the
  checkpoint stores the head in FLOAT (still tied to the input embedding where the model ties them) and
  quantkern rounds it again at load, to the same codes. Every GPTQ reader then loads a correct head:
  transformers' GPTQ path (optimum) replaces only the linears inside the decoder blocks and ignores both
  `lm_head: true` and `dynamic` overrides, so a packed head would load as a freshly initialised one.
- solved with the body's method ("same", GPTQModel's lm_head=True): stored packed; GPTQModel and
  quantkern load it, transformers does not (see quantkern.models.readers).

A head rounded at load keeps a reference to its float source (`float_source`: the weight Parameter, shared
with the embedding when tied, and the bias) so that saving writes it back: no extra copy is held.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nn import QuantLinear
from ..solvers import solve
from ..spec import QuantSpec

LM_HEAD_AUTO_SPEC = QuantSpec(bits=8, group_size=128, sym=True)


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def output_linear(model) -> tuple[str, nn.Module]:
    """(name, module) of the output projection; it must be an nn.Linear or a QuantLinear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, (nn.Linear, QuantLinear)):
        raise ValueError(f"lm_head: {type(model).__name__} has no nn.Linear output projection "
                         f"(get_output_embeddings() is {type(head).__name__})")
    name = next(n for n, m in model.named_modules() if m is head)
    return name, head


def resolve_lm_head(lm_head, spec: QuantSpec, model=None) -> tuple[str, QuantSpec | None]:
    """quantize_model's `lm_head` argument -> (mode, head spec): mode "fp" (keep float), "same" (the body's
    spec and method, calibrated) or "rtn" (the returned spec, rounded to nearest)."""
    if lm_head is None or lm_head is False or lm_head == "fp":
        return "fp", None
    if lm_head is True or lm_head == "same":
        return "same", spec
    if lm_head == "auto":
        head = model.get_output_embeddings() if model is not None and hasattr(model, "get_output_embeddings") else None
        return ("rtn", LM_HEAD_AUTO_SPEC) if isinstance(head, nn.Linear) else ("fp", None)
    if isinstance(lm_head, QuantSpec):
        return "rtn", lm_head
    if isinstance(lm_head, int):
        return "rtn", QuantSpec(bits=lm_head, group_size=128, sym=True)  # QuantSpec checks the bits
    raise ValueError(f"lm_head must be 'auto', 'fp'/None/False, 'same'/True, a bit width or a QuantSpec; "
                     f"got {lm_head!r}")


def untie_lm_head(model) -> str:
    """Give the output projection its own weight (a copy) and mark the config untied, so that quantizing it
    with a solver leaves the input embedding's float table alone and save/load keep the two apart."""
    name, head = output_linear(model)
    new = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                    device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(head.weight)
        if head.bias is not None:
            new.bias.copy_(head.bias)
    set_module(model, name, new)
    for cfg in {id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: None)())
                if c is not None}.values():
        cfg.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}
    return name


def round_head(model, spec: QuantSpec):
    """Swap the float output projection for a QuantLinear rounded to nearest on `spec`, keeping the float
    weight (untouched, tied or not) as its `float_source`. Returns (name, SolveResult)."""
    name, head = output_linear(model)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"lm_head {name} is already quantized; round_head needs its float weight")
    with torch.no_grad():
        res = solve(head.weight.detach().float(), None, spec, method="rtn")
        q = QuantLinear.from_linear(head, res)
    q.float_source = (head.weight, head.bias)
    set_module(model, name, q)
    return name, res


def rounded_at_load(module) -> bool:
    """Whether a checkpoint stores this module in float, for quantkern to round again at load."""
    return isinstance(module, QuantLinear) and getattr(module, "float_source", None) is not None
