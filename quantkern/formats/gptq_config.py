"""quantize_config.json as GPTQ writers spell it, read into quantkern's terms (or refused by field).

Writers disagree on names: AutoGPTQ and transformers write `checkpoint_format`, GPTQModel also `format`
and `method` (beside `quant_method`), old AutoGPTQ files have neither, and Marlin-packed AutoGPTQ files say
`is_marlin_format: true`. Everything quantkern cannot read correctly is refused here, naming the field and
the value, so nothing loads wrong: other packings (GPTQModel's planar `gptq_p`, Marlin, BitBLAS), other
methods (AWQ, ...), and pack dtypes other than int32.
"""
from __future__ import annotations

from ..spec import SUPPORTED_BITS, QuantSpec
from .gptq import CHECKPOINT_FORMATS


class GPTQConfigError(ValueError):
    pass


def _first(qcfg: dict, *keys, default=None):
    for k in keys:
        if qcfg.get(k) is not None:
            return k, qcfg[k]
    return keys[0], default


def checkpoint_format(qcfg: dict) -> str:
    """"gptq" (v1) or "gptq_v2"; raises GPTQConfigError for anything else, naming the field."""
    key, method = _first(qcfg, "quant_method", "method", default="gptq")
    if str(method).lower() != "gptq":
        raise GPTQConfigError(f"{key}={method!r}: quantkern reads GPTQ checkpoints only")
    if qcfg.get("is_marlin_format"):
        raise GPTQConfigError("is_marlin_format=true: Marlin-packed weights are not GPTQ's layout; "
                              "save the model in the gptq format with the tool that wrote it")
    key, fmt = _first(qcfg, "checkpoint_format", "format", default="gptq")
    if str(fmt).lower() not in CHECKPOINT_FORMATS:
        raise GPTQConfigError(f"{key}={fmt!r}: quantkern reads {' and '.join(map(repr, CHECKPOINT_FORMATS))} "
                              "(gptq_p, marlin, bitblas, ... pack the codes differently); re-save the model as "
                              "gptq or gptq_v2 with the tool that wrote it")
    pack_dtype = str(qcfg.get("pack_dtype", "int32")).replace("torch.", "")
    if pack_dtype != "int32":
        raise GPTQConfigError(f"pack_dtype={qcfg['pack_dtype']!r}: quantkern reads int32-packed GPTQ tensors only")
    return str(fmt).lower()


def spec_from_config(qcfg: dict) -> QuantSpec:
    """The checkpoint-wide QuantSpec of a quantize_config (checkpoint_format is checked too)."""
    checkpoint_format(qcfg)
    for field in ("bits", "group_size"):
        if field not in qcfg:
            raise GPTQConfigError(f"quantize_config has no {field!r}")
    bits, group_size = qcfg["bits"], qcfg["group_size"]
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise GPTQConfigError(f"bits={bits!r}: GPTQ checkpoints hold {', '.join(map(str, SUPPORTED_BITS))}-bit codes")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise GPTQConfigError(f"group_size={group_size!r}: must be a positive integer or -1 (one group per row)")
    try:
        return QuantSpec(bits=bits, group_size=group_size, sym=bool(qcfg.get("sym", True)),
                         act_order=bool(qcfg.get("desc_act", False)),
                         static_groups=bool(qcfg.get("static_groups", False)),
                         damp=float(qcfg.get("damp_percent", 0.01)))
    except (TypeError, ValueError) as e:
        raise GPTQConfigError(f"quantize_config: {e}") from e
