"""quantkern.explain: which kernel each QuantLinear runs for an input, and why the others were skipped.

The answer comes from the same selector the forward pass calls (quantkern.kernels.select), with the
same inputs: the backend registry.choose picks for the layer's device (QUANTKERN_BACKEND), the layer's
kernel-native layout, the token count and dtype of x, and the switches as set now. Layers run by a
FusedGroup are explained as the group's concatenated weight, which is what runs.
"""
from __future__ import annotations

import dataclasses
import sys

import torch
from torch import nn

from .. import kernels
from ..ops import qgemm as _qgemm
from ..ops import registry
from .quant_linear import QuantLinear


@dataclasses.dataclass(frozen=True)
class LayerKernel:
    name: str  # module name ("" for a lone layer)
    layer: QuantLinear
    backend: str
    selection: kernels.Selection

    @property
    def kernel(self) -> str:
        return self.selection.kernel.name


def _tokens_and_dtype(obj: nn.Module, layer: QuantLinear, x) -> tuple[int, torch.dtype]:
    if isinstance(x, bool) or not isinstance(x, (int, torch.Tensor)):
        raise TypeError(f"explain: x must be an input tensor or a token count, got {type(x).__name__}")
    if isinstance(x, int):
        if x < 0:
            raise ValueError(f"explain: the token count must be >= 0, got {x}")
        return x, _model_dtype(obj, layer)
    if x.is_floating_point() and x.dim() >= 1 and x.shape[-1] == layer.in_features:
        return x.numel() // layer.in_features, x.dtype  # activations of this layer
    if not x.is_floating_point():  # token ids for a model: every linear sees one row per token
        return x.numel(), _model_dtype(obj, layer)
    raise ValueError(f"explain: x has shape {tuple(x.shape)} and {x.dtype}; give this layer's input "
                     f"[..., {layer.in_features}], token ids for a model, or a token count")


def _model_dtype(obj: nn.Module, layer: QuantLinear) -> torch.dtype:
    """The activations' dtype in a model: its floating parameters' (QuantLinear holds only buffers)."""
    for p in obj.parameters():
        if p.is_floating_point():
            return p.dtype
    return layer.scales.dtype


def explain_layer(layer: QuantLinear, tokens: int, dtype: torch.dtype, name: str = "") -> LayerKernel:
    device = layer.qweight.device
    backend = _qgemm.choose_backend(device)
    slot = layer._group
    if slot is not None:  # the group's concatenated weight runs; its layout shares this layer's input side
        m = slot.group.bounds[-1]
    else:
        m = layer.out_features
    prep = layer.prepared(backend)
    q = _qgemm.query(prep, max(tokens, 0), dtype, device)
    q = dataclasses.replace(q, out_features=m)
    return LayerKernel(name, layer, backend, kernels.select(q))


def explain(layer_or_model: nn.Module, x, *, file=None, quiet: bool = False) -> list[LayerKernel]:
    """Print (unless quiet) and return, for every QuantLinear in layer_or_model, the kernel that runs for
    input x (this layer's input tensor, a model's token ids, or a token count) and why each other
    candidate of its backend was skipped. Layers with the same choice are printed once."""
    if not isinstance(layer_or_model, nn.Module):
        raise TypeError(f"explain: expected a QuantLinear or a model, got {type(layer_or_model).__name__}")
    if isinstance(layer_or_model, QuantLinear):
        layers = [("", layer_or_model)]
    else:
        layers = [(n, m) for n, m in layer_or_model.named_modules() if isinstance(m, QuantLinear)]
        if not layers:
            raise ValueError("explain: the model has no QuantLinear layers (quantize or load it with quantkern first)")
    out = []
    for name, layer in layers:
        tokens, dtype = _tokens_and_dtype(layer_or_model, layer, x)
        out.append(explain_layer(layer, tokens, dtype, name))
    if not quiet:
        print(format_report(out), file=file or sys.stdout)
    return out


def format_report(rows: list[LayerKernel]) -> str:
    backends = registry.backends()
    groups: dict[tuple, list[LayerKernel]] = {}
    for r in rows:
        s = r.layer.spec
        key = (r.backend, s.bits, s.group_size, r.selection.query, tuple(r.selection.lines()))
        groups.setdefault(key, []).append(r)
    lines = []
    for (backend, bits, gs, q, sel_lines), rs in groups.items():
        names = [r.name or "(layer)" for r in rs]
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} layers)" if len(names) > 3 else "")
        lines.append(f"{shown}: {bits}-bit g{gs}, in {rs[0].layer.in_features} -> out {q.out_features}, "
                     f"{q.batch} token(s) {str(q.dtype).replace('torch.', '')} on {q.device}")
        lines.append(f"  backend {backend}: {backends[backend]['reason']}")
        lines.extend("  " + s for s in sel_lines)
    return "\n".join(lines)
