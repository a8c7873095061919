"""Save / load quantized models as GPTQ v1-compatible directories.

Directory layout:
    model.safetensors        <module>.qweight/.qzeros/.scales/.g_idx(/.bias) for quantized linears, every
                             other tensor of the model as is (tied copies stored once); a head rounded
                             to nearest is stored in float and rounded again at load (models/head.py)
    quantize_config.json     GPTQ keys + a `meta` object (quantizer, method, alpha, K, the method config
                             (`config`: quantkern.methods MethodConfig.to_dict(), versioned), zero-point
                             convention, the head's load-time grid, per-module damp/fallback log);
                             mirrored into config.json as `quantization_config`

checkpoint_format is "gptq" (v1: qzeros store zero - 1) when every packed module is symmetric, the form
every GPTQ reader knows; "gptq_v2" (qzeros store the zero) as soon as one is asymmetric, because GPTQModel
refuses asymmetric v1 checkpoints from any writer but itself (transformers reads v2 through GPTQModel too).
    config.json, generation_config.json, tokenizer files
    quantkern_manifest.json  sha256 + size of every other file, checked by `load`

Saving is atomic: everything is written into a temporary sibling directory and renamed into place;
an existing checkpoint is moved aside only after the new one is complete, then removed. A save
that fails part way leaves the previous checkpoint untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .. import __version__
from ..formats import gptq, gptq_config
from ..spec import QuantSpec
from ..nn import QuantLinear
from .head import round_head, rounded_at_load
from .moe import unfuse_experts

MANIFEST = "quantkern_manifest.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # transformers' name for a sharded checkpoint's tensor -> file map
DEFAULT_MAX_SHARD_SIZE = "5GB"
ZERO_POINT_CONVENTIONS = {"gptq": "v1 (stored zero-1)", "gptq_v2": "v2 (stored zero)"}


class CheckpointError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------- helpers

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def packed_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """The QuantLinear modules a checkpoint stores packed (all but a head rounded again at load)."""
    return {n: m for n, m in quant_modules(model).items() if not rounded_at_load(m)}


def checkpoint_format_for(modules) -> str:
    return "gptq" if all(m.spec.sym for m in modules) else "gptq_v2"


def _natural_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    n = g_idx.numel()
    nat = torch.zeros(n, dtype=torch.int32) if group_size == -1 else (torch.arange(n) // group_size).to(torch.int32)
    return torch.equal(g_idx.cpu().to(torch.int32), nat)


def quantize_config(model: nn.Module) -> dict:
    """The quantize_config.json dict for a model returned by quantize_model (or load)."""
    info = getattr(model, "quantkern_info", None)
    if not info:
        raise CheckpointError("model carries no quantkern_info: quantize it with quantkern.quantize_model first")
    spec = QuantSpec(**info["spec"])
    qmods = packed_modules(model)
    if not qmods and not info.get("gguf_type"):  # a GGUF-grid model may hold only exact float linears (export/gguf_solve)
        raise CheckpointError("model has no QuantLinear modules to save")
    fmt = checkpoint_format_for(qmods.values())
    # each module's grid as stored; desc_act is what its g_idx says, not what was asked (SNRQ always permutes)
    body = {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym}
    grids = {name: {"bits": m.spec.bits, "group_size": m.spec.group_size, "sym": m.spec.sym,
                    "desc_act": not _natural_g_idx(m.g_idx, m.spec.group_size)} for name, m in sorted(qmods.items())}
    own_grid = {name for name, g in grids.items() if any(g[k] != v for k, v in body.items())}
    desc_act = any(g["desc_act"] for name, g in grids.items() if name not in own_grid)
    # a module on its own grid (e.g. the 8-bit lm_head) gets a GPTQModel `dynamic` override
    dynamic = {f"+:^{re.escape(name)}$": grids[name] for name in sorted(own_grid)}
    method = dict(info["method"])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {
        "bits": spec.bits, "group_size": spec.group_size, "desc_act": desc_act, "sym": spec.sym,
        # GPTQModel's key: the output projection is stored packed too
        "lm_head": isinstance(head, QuantLinear) and not rounded_at_load(head),
        "static_groups": spec.static_groups, "damp_percent": spec.damp,
        "true_sequential": True,  # GPTQ's key: quantkern's driver always solves a block's groups in order
        "quant_method": "gptq", "checkpoint_format": fmt, "pack_dtype": "int32",
        "meta": {
            "quantizer": "quantkern", "quantizer_version": __version__,
            "method": method.pop("method", None), "alpha": method.pop("alpha", None), "K": method.pop("K", None),
            "method_options": method, "config": info.get("config"),  # MethodConfig.to_dict(), versioned
            "zero_point_convention": ZERO_POINT_CONVENTIONS[fmt],
            "quantized_modules": sorted(qmods), "modules": info.get("modules", {}),
            # linears inside the blocks left in float (routers, gates) and why
            "kept_float": info.get("kept_float", {}),
            "kept_float_linears": info.get("kept_float_linears", []),
        },
    }
    if info.get("calibration"):  # whether calibration samples started with BOS (the tokenizer's convention)
        out["meta"]["calibration"] = info["calibration"]
    if info.get("experts"):  # per MoE expert: routed calibration tokens, whether the side pass was used
        out["meta"]["experts"] = info["experts"]
    for name in sorted(info.get("kept_float", {})):  # GPTQModel's "leave this module in float"
        dynamic[f"-:^{re.escape(name)}$"] = {}
    if rounded_at_load(head):  # stored in float; quantkern rounds it to this grid at load
        out["meta"]["lm_head_at_load"] = {"method": "rtn", **head.spec.to_dict()}
    if info.get("source"):  # the fp model quantized ("default" or a directory): `quantkern eval --fp` compares with it
        out["meta"]["source"] = info["source"]
    if info.get("gguf_type"):  # quantize --gguf-type: every linear verified to have this exact llama.cpp twin
        out["meta"]["gguf_type"] = info["gguf_type"]
    if dynamic:  # GPTQModel's per-module overrides: regex on the module name -> its own bits/group/sym/desc_act
        out["dynamic"] = dynamic
    return out


_DYNAMIC_FIELDS = {"bits": "bits", "group_size": "group_size", "sym": "sym", "desc_act": "act_order"}


def module_spec(spec: QuantSpec, qcfg: dict, name: str) -> QuantSpec | None:
    """The spec of module `name` under quantize_config's GPTQModel-style `dynamic` overrides: the first rule
    whose regex matches the name (re.match; "+:" or no prefix = override, "-:" = module left unquantized,
    returned as None) wins; fields it does not name keep the checkpoint-wide values."""
    for pattern, override in (qcfg.get("dynamic") or {}).items():
        sign, rx = (pattern[0], pattern[2:]) if pattern[:2] in ("+:", "-:") else ("+", pattern)
        try:
            hit = re.match(rx, name)
        except re.error as e:
            raise CheckpointError(f"quantize_config dynamic: bad regex {pattern!r}: {e}") from e
        if not hit:
            continue
        if sign == "-":
            return None
        if not isinstance(override, dict):
            raise CheckpointError(f"quantize_config dynamic: {pattern!r} must map to an object, got {override!r}")
        changes = {_DYNAMIC_FIELDS[k]: v for k, v in override.items() if k in _DYNAMIC_FIELDS}
        try:
            return spec.replace(**changes)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"quantize_config dynamic: {pattern!r} -> {override}: {e}") from e
    return spec


def _checkpoint_tensors(model: nn.Module, fmt: str) -> dict:
    """The model's state dict as the checkpoint stores it: packed qzeros in `fmt`'s zero convention, and a
    head rounded at load as its float source (the embedding's own Parameter when tied)."""
    sd = model.state_dict()
    for name, m in quant_modules(model).items():
        if rounded_at_load(m):
            for t in (*gptq.TENSOR_NAMES, "bias"):
                sd.pop(f"{name}.{t}", None)
            weight, bias = m.float_source
            sd[f"{name}.weight"] = weight.detach()
            if bias is not None:
                sd[f"{name}.bias"] = bias.detach()
        else:
            t = gptq.convert_qzeros({t: sd[f"{name}.{t}"] for t in gptq.TENSOR_NAMES}, m.spec.bits, "gptq", fmt)
            sd[f"{name}.qzeros"] = t["qzeros"]
    return sd


def _state_dict_dedup(state_dict: dict) -> tuple[dict, dict]:
    """State dict with each shared tensor stored once; aliases maps dropped key -> kept key."""
    out, aliases, seen = {}, {}, {}
    for k, v in state_dict.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = v.detach().cpu().contiguous()
    return out, aliases


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _write_weights(tmp: Path, tensors: dict, metadata: dict, max_shard_size) -> None:
    """One model.safetensors, or shards of at most max_shard_size with transformers' index file (the split
    is huggingface_hub's, so every HF-style reader finds the tensors)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in names}, str(tmp / filename), metadata=metadata)
    if split.is_sharded:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(tmp / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename})


def _write_manifest(tmp: Path) -> None:
    files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()}
    _write_json(tmp / MANIFEST, {"format": 1, "algorithm": "sha256", "files": files})


def _replace_dir(tmp: Path, path: Path) -> None:
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------- save / load

def save_quantized(model: nn.Module, path, tokenizer=None, log_path=None,
                   max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write `model` (from quantize_model) as a GPTQ directory at `path`, atomically; weights in shards of at
    most `max_shard_size` (bytes or "5GB") with model.safetensors.index.json when they do not fit in one."""
    path = Path(path)
    qcfg = quantize_config(model)
    tensors, aliases = _state_dict_dedup(_checkpoint_tensors(model, qcfg["checkpoint_format"]))
    qcfg["meta"]["tied"] = aliases
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_weights(tmp, tensors, {"format": "pt", "quantizer": "quantkern"}, max_shard_size)
        _write_json(tmp / "quantize_config.json", qcfg)
        cfg = model.config.to_dict()
        cfg["quantization_config"] = {k: v for k, v in qcfg.items()}
        _write_json(tmp / "config.json", cfg)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if log_path is not None and Path(log_path).exists():
            shutil.copyfile(log_path, tmp / "quant_log.jsonl")
        _write_manifest(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def verify(path) -> dict:
    """Check every file in the manifest (size + sha256); raise CheckpointError naming the bad file."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.exists():
        raise CheckpointError(f"{path}: no {MANIFEST}; not a quantkern checkpoint (or an incomplete copy)")
    manifest = json.loads(mf.read_text())
    for name, want in manifest["files"].items():
        p = path / name
        if not p.exists():
            raise CheckpointError(f"{path}: {name} listed in the manifest is missing")
        if p.stat().st_size != want["bytes"]:
            raise CheckpointError(f"{path}: {name} is {p.stat().st_size} bytes, manifest says {want['bytes']}: "
                                  "the checkpoint is corrupted or truncated")
        if _sha256(p) != want["sha256"]:
            raise CheckpointError(f"{path}: {name} fails its sha256 check: the checkpoint is corrupted")
    return manifest


def spec_from_config(qcfg: dict) -> QuantSpec:
    """The checkpoint-wide spec; CheckpointError naming the field for anything quantkern cannot read."""
    try:
        return gptq_config.spec_from_config(qcfg)
    except gptq_config.GPTQConfigError as e:
        raise CheckpointError(f"unsupported quantization: {e}") from e


def read_quantize_config(path) -> dict:
    path = Path(path)
    if (path / "quantize_config.json").exists():
        return json.loads((path / "quantize_config.json").read_text())
    cfg = json.loads((path / "config.json").read_text())
    if "quantization_config" not in cfg:
        raise CheckpointError(f"{path} has no quantize_config.json and no quantization_config in config.json")
    return cfg["quantization_config"]


def load(path, device="cpu", check: bool = True, fuse: bool = True) -> nn.Module:
    """Load a checkpoint written by save_quantized (or another GPTQ v1 checkpoint) with packed weights.

    Returns the model in eval mode; its quantized linears are QuantLinear (a quantized lm_head included:
    its config says the embeddings are untied). With `check`, every file is verified against the manifest
    first (a missing manifest only warns, for foreign checkpoints). `fuse` runs linears that read the same
    input as one kernel call (quantkern.nn.fused; outputs unchanged).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json; not a model directory")
    if check:
        if (path / MANIFEST).exists():
            verify(path)
        else:
            warnings.warn(f"{path}: no {MANIFEST}; loading without integrity checks", stacklevel=2)
    qcfg = read_quantize_config(path)
    spec = spec_from_config(qcfg)
    fmt = gptq_config.checkpoint_format(qcfg)
    cfg = AutoConfig.from_pretrained(path)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")  # the model is built plain, then given QuantLinear modules
    files = weight_files(path)
    try:
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
    except Exception as e:  # a truncated/garbled file when not checked
        raise CheckpointError(f"{path}: cannot read weights: {e}") from e
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(cfg, "dtype", None) or torch.float32)
    unfuse_experts(model)  # quantize_model saved one linear per expert projection (models/moe.py)
    for key in [k for k in sd if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"{path}: {key} names a module the model does not have") from e
        mspec = module_spec(spec, qcfg, name)
        if mspec is None:
            raise CheckpointError(f"{path}: {name} has packed weights but quantize_config's dynamic rules "
                                  "exclude it from quantization")
        missing_t = [t for t in gptq.TENSOR_NAMES if f"{name}.{t}" not in sd]
        if missing_t:
            raise CheckpointError(f"{path}: {name} lacks {missing_t}")
        packed = {t: sd[f"{name}.{t}"] for t in gptq.TENSOR_NAMES}
        try:
            m, n, G = gptq.check_tensors(packed, mspec.bits)
        except ValueError as e:
            raise CheckpointError(f"{path}: {name}'s packed tensors do not match its quantize_config "
                                  f"({mspec.bits}-bit, group {mspec.group_size}): {e}") from e
        if isinstance(old, nn.Linear) and (old.in_features, old.out_features) != (n, m):
            raise CheckpointError(f"{path}: {name} is {old.out_features}x{old.in_features} in the config, "
                                  f"{m}x{n} in the weights")
        if G != mspec.num_groups(n):
            raise CheckpointError(f"{path}: {name}'s scales hold {G} groups, but group_size {mspec.group_size} "
                                  f"over {n} inputs means {mspec.num_groups(n)}: config and tensors disagree")
        try:  # in memory everything is v1 (the kernels' convention)
            packed = gptq.read_qzeros(packed, mspec.bits, fmt, mspec.sym)
        except ValueError as e:
            raise CheckpointError(f"{path}: {name}: {e}") from e
        sd[f"{name}.qzeros"] = packed["qzeros"]
        q = QuantLinear(n, m, mspec, bias=(name + ".bias") in sd)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    aliases = qcfg.get("meta", {}).get("tied", {})
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a float tensor of the wrong shape: torch names it
        raise CheckpointError(f"{path}: weights do not match the model: {e}") from e
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    with torch.no_grad():
        live = model.state_dict(keep_vars=True)
        for k, src in aliases.items():  # anything tie_weights did not re-tie gets its stored copy
            if live[k].data_ptr() != live[src].data_ptr():
                live[k].data.copy_(sd[src])
    head_at_load = qcfg.get("meta", {}).get("lm_head_at_load")
    if head_at_load:
        try:
            head_spec = QuantSpec(**{k: v for k, v in head_at_load.items() if k != "method"})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: meta.lm_head_at_load {head_at_load}: {e}") from e
        round_head(model, head_spec)
    model.quantkern_info = {"spec": spec.to_dict(), "method": {"method": qcfg.get("meta", {}).get("method")},
                            "config": qcfg.get("meta", {}).get("config"),  # absent before quantkern recorded it
                            "modules": qcfg.get("meta", {}).get("modules", {}), "quantize_config": qcfg,
                            "kept_float": qcfg.get("meta", {}).get("kept_float", {})}
    if qcfg.get("meta", {}).get("experts"):
        model.quantkern_info["experts"] = qcfg["meta"]["experts"]
    model = model.to(device).eval()
    if fuse:
        from .fusion import fuse_quant_groups

        fuse_quant_groups(model)
    return model


def weight_files(path) -> list[Path]:
    """The checkpoint's safetensors files: those its index names (each must exist), else every one there."""
    path = Path(path)
    index = path / WEIGHTS_INDEX
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard {missing[0]} named in {WEIGHTS_INDEX} is missing"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors weights")
    return files


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1}


def checkpoint_tensors(path) -> dict[str, int]:
    """Every tensor in the checkpoint's weight files (weight_files: the index's shards) -> its bytes, from the
    safetensors headers only (nothing is loaded)."""
    from safetensors import safe_open

    out = {}
    for f in weight_files(path):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                t = sf.get_slice(k)
                nbytes = _DTYPE_BYTES.get(t.get_dtype(), 4)
                for d in t.get_shape():
                    nbytes *= d
                out[k] = nbytes
    return out


def checkpoint_tensor_names(path) -> list[str]:
    """Every tensor name in the checkpoint's safetensors files (headers only: nothing is loaded)."""
    return list(checkpoint_tensors(path))


def checkpoint_size(path, tensors: dict[str, int] | None = None) -> dict:
    """Bytes on disk: total, and the packed tensors vs everything else in the weights (`tensors`: the
    checkpoint_tensors of `path`, if already read)."""
    path = Path(path)
    tensors = checkpoint_tensors(path) if tensors is None else tensors
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    packed = sum(b for k, b in tensors.items() if k.rsplit(".", 1)[-1] in gptq.TENSOR_NAMES)
    return {"total": total, "packed_linears": packed, "other_tensors": sum(tensors.values()) - packed}
