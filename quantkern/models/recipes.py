"""Named recipes: a method config with the options quantkern found best on SmolLM2 (benchmarks/bench_e2e.py,
docs/methods_beyond_proxy.md). The grid (bits, group size, ...) is the caller's: `with_grid(RECIPES[name], spec)`.

    quantkern.quantize(model, with_grid(RECIPES["yaqa-guard"], QuantSpec(bits=2, group_size=64)), tokenizer=tok)
    quantkern quantize --recipe yaqa-guard --bits 2 --group-size 64 ...
    method, kw = recipe(name); quantize_model(model, tok, spec, method=method, **kw)   # the keyword form

The plain method names (`--method oac`, `--method yaqa`) keep the papers' recipes; these are OUR variants:
    oac-snrq    OAC's per-token Fisher (4 row blocks) blended 1:3 with the activation Hessian, SNRQ's core.
    yaqa-snrq   YAQA's two-sided rounding with a sequence-level output Hessian (out_damp 1.0) on SNRQ's
                target and min/max grid, activation Hessian on the input side.
    snrq-guard  SNRQ (alpha 0.25) whose min/max grid gives way to another candidate grid only on a clamp
                cliff (grid="guard": another grid's post-feedback objective below 1/4 of min/max's).
    oac-guard, yaqa-guard   the two above with grid="guard". yaqa-guard: 2-bit g64 perplexity 161.1 against
                SNRQ's 253.3 (mean of 3 calibration seeds), the best 2-bit result on this model.
"""
from __future__ import annotations

import dataclasses

from ..methods import OAC, SNRQ, YAQA, MethodConfig

_OAC = OAC(core="snrq", fisher="token", row_groups=4, h_mix=0.25, labels="data")
_YAQA = YAQA(grid_from="snrq", h_mix=0.0, fisher="sequence", out_damp=1.0, labels="data", grad_kind="both")
RECIPES: dict[str, MethodConfig] = {
    "oac-snrq": _OAC,
    "yaqa-snrq": _YAQA,
    "snrq-guard": SNRQ(alpha=0.25, grid="guard"),
    "oac-guard": dataclasses.replace(_OAC, grid="guard"),
    "yaqa-guard": dataclasses.replace(_YAQA, grid="guard"),
}


def recipe(name: str) -> tuple[str, dict]:
    """(method name, its options) of recipe `name`: the keyword form, for quantize_model(..., method=, **kw)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    config = RECIPES[name]
    return config.name, config.options()
