"""Quantize straight onto a llama.cpp grid with fixed, exactly stored scales (`quantize --gguf-type Q4_K|Q3_K|Q2_K`).

For each linear: the scales (and mins) are chosen first, weighted by diag(H) (kquants.choose), stored as the
GGUF type stores them; then GPTQ's error-feedback loop (the unchanged core kernel, static groups) picks the
codes against exactly those values. A grid with mins, value = S*q - O, is solved as the target W + O on
the zero-offset grid S*q: the error (W + O) - S*q is W - (S*q - O), so the feedback is the same.

Linears whose input size is not a multiple of 256 cannot be K-quants; they go onto Q4_0 with the same
scale-first solve (llama.cpp falls back to Q4_0 there for Q2_K / Q3_K, to Q5_0 for Q4_K).

Checkpoint: no GPTQ tensor holds these grids. A K-quant's sub-block scale d*sc is not an fp16 number and its
zero O/S is not an integer; this Q4_0's d takes either sign (llama.cpp's d = signed max / -8 puts the
extreme on level -8), and GPTQ scales must be positive. So every linear is stored as a float nn.Linear holding
exactly the values ggml decodes (a `kept_float` module: quantkern and GPTQModel load it as float), and
its GGUF block bytes go into `gguf_blocks.npz` next to the weights, which `quantkern export --gguf`
writes as they are (after checking that they decode bit for bit to that weight).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .. import grid
from ..methods import MethodConfig, _frozen, one_of, option, register
from ..models.driver import Plugin, register_plugin
from ..solvers import core
from ..solvers.result import SolveResult
from ..spec import QuantSpec
from . import kquants
from .gguf_sidecar import SIDECAR, load_sidecar, save_sidecar  # noqa: F401 (re-exported)

METHOD = "gguf_grid"


def solve_fixed(W: torch.Tensor, H: torch.Tensor, g: kquants.Grid, damp: float = 0.01, act_order: bool = True,
                log: dict | None = None, backend=None) -> kquants.Grid:
    """g with its codes chosen by GPTQ (error feedback through H) against g's fixed scales and offsets.
    act_order: process channels by descending diag(H); groups stay the natural sub-blocks (static)."""
    log = {} if log is None else log
    L = g.layout
    spec = QuantSpec(bits=L.bits, group_size=L.sub, sym=not L.mins, damp=damp)
    prep = core.LayerProblem(W.float(), H.float(), spec, act_order, log)
    S, O = g.scale_offset()
    target = prep.W
    if L.mins:
        target = target + prep.permute_cols(O.repeat_interleave(L.sub, 1).to(target.device))
    gidx_p = prep.natural_groups_in_processing_order()
    scales = S.t().contiguous().to(target.device)
    zeros = torch.full_like(scales, float(L.zero))
    codes_p, _, _, loss = core.run_block_solve(target, prep.U, None, gidx_p, scales, zeros, spec, False, log, backend)
    log["loss"] = float(loss.sum())
    return kquants.Grid(g.kind, prep.unpermute_cols(codes_p).cpu(), g.d, g.sc, g.dmin, g.mn)


def placeholder_result(g: kquants.Grid, loss: float, log: dict, method: str) -> SolveResult:
    """What the driver packs for a K-quant linear until `finish` puts the exact float values back: 8-bit RTN
    of those values (the driver's stream already ran on the exact values: res.dequantized)."""
    spec = QuantSpec(bits=8, group_size=-1, sym=True)
    vals = g.values()
    codes, scales, zeros, g_idx = grid.rtn(vals, spec)
    return SolveResult(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, dequantized=vals, loss=loss, log=log,
                       spec=spec, method=method)


@register(METHOD)
@_frozen
class GGUFGrid(MethodConfig):
    """A llama.cpp type's own fixed grid (scales chosen first, stored as the type stores them), codes by GPTQ's
    error feedback in act-order (groups stay the natural sub-blocks, so the GGUF stays exact). What
    `quantize --gguf-type Q4_K|Q3_K|Q2_K` runs; the grid fields other than damp and act_order are the type's."""
    on_command_line = False  # `quantize --gguf-type` builds it (export/gguf_presets.grid_method)
    gguf_type: str = option("Q3_K", "the llama.cpp type (Q4_0 where rows are not a multiple of 256)",
                            one_of(*kquants.LAYOUTS))


class GGUFGridPlugin(Plugin):
    """Driver plug-in of GGUFGrid: keeps each linear's grid for `finish`."""

    def __init__(self, config, seed=0):
        super().__init__(config, seed)
        self.grids: dict[str, kquants.Grid] = {}
        self._names: dict[int, str] = {}

    def before_layers(self, model, samples):
        model.__dict__["_gguf_grid"] = self  # for finish(model) (not a submodule: no state dict entry)
        self._names = {m.weight.data_ptr(): n for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def solve(self, name, weight, collector):
        H = self.hessian(collector)
        full = self._names.get(weight.data_ptr())
        if full is None:
            raise RuntimeError(f"gguf_grid: cannot tell which module {name} is (the driver handed a copy of its "
                               "weight); quantize the model in fp32")
        kind = self.config.gguf_type
        if weight.shape[1] % kquants.LAYOUTS[kind].block:
            kind = kquants.FALLBACK
        log = {"method": METHOD, "fallback": None, "gguf_type": kind}
        g0 = kquants.choose(kind, weight, torch.diagonal(H))
        g = solve_fixed(weight, H, g0, self.spec.damp, self.spec.act_order, log)
        self.grids[full] = g
        return placeholder_result(g, log["loss"], log, METHOD)

    def meta(self):
        return {"method": METHOD, "gguf_type": self.config.gguf_type, "act_order": self.spec.act_order,
                "core": "gptq", "scales": "diag(H)-weighted search, then quantized as the type stores them"}


register_plugin(GGUFGrid, GGUFGridPlugin)


def finish(model: nn.Module) -> dict:
    """After quantize_model(method="gguf_grid", fuse=False): put each K-quant linear back as a float nn.Linear holding exactly its decoded values, record it as
    kept in float, and return {module name: (kind, block bytes)} for `save_sidecar`."""
    from ..models.head import set_module

    plugin = model.__dict__.pop("_gguf_grid")
    info = model.quantkern_info
    kept = info.setdefault("kept_float", {})
    kept_lin = info.setdefault("kept_float_linears", [])
    blocks = {}
    for name, g in plugin.grids.items():
        old = model.get_submodule(name)
        lin = nn.Linear(old.in_features, old.out_features, bias=getattr(old, "bias", None) is not None)
        lin.weight.data = g.values().to(lin.weight.dtype)
        if lin.bias is not None:
            lin.bias.data = old.bias.detach().float().clone()
        set_module(model, name, lin)
        kept[name] = f"GGUF {g.kind}: exact K-quant values (block bytes in {SIDECAR})"
        if name not in kept_lin:
            kept_lin.append(name)
        blocks[name] = (g.kind, kquants.encode(g))
    return blocks


def quantize_gguf(model: nn.Module, tokenizer, gguf_type: str, act_order: bool = True, **kwargs):
    """quantize_model onto `gguf_type`'s fixed grids (K-quants; Q4_0 where the rows are not a multiple of 256)
    -> (model, report, blocks for save_sidecar). kwargs go to quantize_model (calib, nsamples, lm_head, ...)."""
    from ..models.driver import quantize

    config = GGUFGrid(bits=4, group_size=32, sym=True, static_groups=True, act_order=act_order,
                      damp=kwargs.pop("damp", 0.01), gguf_type=gguf_type)
    kwargs.setdefault("safety_net", False)
    if kwargs["safety_net"]:
        raise ValueError("quantize_gguf: the safety net would swap in RTN on the GPTQ grid, which is not the GGUF "
                         "type's grid; leave safety_net=False")
    report = quantize(model, config, tokenizer=tokenizer, fuse=False, **kwargs)
    blocks = finish(model)
    model.quantkern_info["gguf_type"] = gguf_type
    return model, report, blocks


def save_gguf_checkpoint(model: nn.Module, path, blocks: dict, **kwargs) -> Path:
    """save_quantized plus the K-quant sidecar."""
    from ..models.checkpoint import save_quantized

    path = save_quantized(model, path, **kwargs)
    if blocks:
        save_sidecar(path, blocks)
    return path
