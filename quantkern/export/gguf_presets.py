"""`quantkern quantize --gguf-type Q4_0|Q4_1|Q8_0`: the grid whose llama.cpp twin is exact, as a preset.

Q4_0 = 4-bit symmetric, Q4_1 = 4-bit asymmetric, Q8_0 = 8-bit symmetric, all group 32 (a group size that
is a multiple of 32 is exact too and kept when asked for), groups in channel order. The checkpoint's meta
records the type only once every quantized linear is verified to have its exact twin.
"""
from __future__ import annotations

import dataclasses

from ..nn import QuantLinear
from ..spec import QuantSpec
from . import ggml_blocks
from .gguf import module_grid

PRESETS = {"Q4_0": (4, True), "Q4_1": (4, False), "Q8_0": (8, True)}  # type: (bits, sym)
GROUP = ggml_blocks.QK


def apply_preset(spec: QuantSpec, gguf_type: str, default: QuantSpec) -> QuantSpec:
    """`spec` with the preset's bits / sym / group; a value that differs from both the preset and the
    command line's default (`default`) was asked for explicitly and conflicts: ValueError names it."""
    if gguf_type in GRID_TYPES:  # fixed K-quant grids; the checkpoint's GPTQ body is the Q4_0 fallback grid
        if spec.bits != default.bits or spec.group_size != default.group_size or not spec.sym or spec.act_order:
            raise ValueError(f"--gguf-type {gguf_type} sets its own grid (and act-order on natural groups); drop "
                             "--bits / --group-size / --asym / --act-order")
        return spec.replace(bits=4, group_size=GROUP, sym=True, static_groups=True)
    bits, sym = PRESETS[gguf_type]
    if spec.bits not in (bits, default.bits):
        raise ValueError(f"--gguf-type {gguf_type} is {bits}-bit; drop --bits {spec.bits}")
    if sym and not spec.sym:
        raise ValueError(f"--gguf-type {gguf_type} is symmetric; drop --asym (Q4_1 is the asymmetric 4-bit type)")
    group = spec.group_size
    if group == default.group_size:
        group = GROUP
    elif group != -1 and group % GROUP:
        raise ValueError(f"--gguf-type {gguf_type} needs a group size that is a multiple of {GROUP} "
                         f"(32 by default), got --group-size {group}")
    if spec.act_order and not spec.static_groups:
        raise ValueError(f"--gguf-type {gguf_type} needs groups in channel order: drop --act-order, or add "
                         "--static-groups (gptq)")
    return spec.replace(bits=bits, sym=sym, group_size=group)


def reorders_groups(method: str, options: dict) -> str | None:
    """Why `method` with `options` would scatter groups over channels (None if it keeps channel order)."""
    if method in ("snrq", "ksnrq"):
        return f"{method} always quantizes in act-order with groups in that order"
    if method == "oac" and options.get("core") == "snrq":
        return "oac with core=snrq reorders groups like snrq"
    if method == "yaqa" and options.get("grid_from") == "snrq":
        return "yaqa with grid_from=snrq reorders groups like snrq"
    return None


def check_model(model) -> list[str]:
    """Every quantized linear that has no exact llama.cpp twin, with the reason (empty: all exact)."""
    bad = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            _, scales, zeros, g_idx = module_grid(mod)
            try:
                _, zero = ggml_blocks.block_params(scales.cpu(), zeros.cpu(), g_idx.cpu())
                ggml_blocks.exact_type(mod.spec.bits, zero)
            except ggml_blocks.NotExact as e:
                bad.append(f"{name}: {e.reason}")
    return bad


GRID_TYPES = ("Q4_K", "Q3_K", "Q2_K")  # scale-first fixed grids (export/gguf_solve.py); Q4_0 linears as fallback


def grid_method(gguf_type: str, config):
    """The method config for --gguf-type: the K-quants run gguf_grid (GPTQ's core, act-order, on the type's fixed
    scales, export/gguf_solve.py); the other types keep `config`. Refuses a method or options it cannot honour."""
    if gguf_type not in GRID_TYPES:
        return config
    defaults = type(config)().options()
    given = {k: v for k, v in config.options().items() if v != defaults[k]}
    if config.name != "gptq" or given:
        raise ValueError(f"--gguf-type {gguf_type} solves with GPTQ against the type's own fixed scales "
                         f"(export/gguf_solve.py); drop --method {config.name}" + (f" and {sorted(given)}" if given else ""))
    from ..methods import make_config
    from . import gguf_solve  # registers the gguf_grid method and its driver plug-in

    return make_config(gguf_solve.METHOD, dataclasses.replace(config.spec, act_order=True), gguf_type=gguf_type)
