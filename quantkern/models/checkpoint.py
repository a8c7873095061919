"""Save / load quantized models as GPTQ v1-compatible directories.

Directory layout:
    model.safetensors        <module>.qweight/.qzeros/.scales/.g_idx(/.bias) for quantized linears, every
                             other tensor of the model as is (tied copies stored once)
    quantize_config.json     GPTQ keys + a `meta` object (quantizer, method, alpha, K, zero-point
                             convention, per-module damp/fallback log); mirrored into config.json
                             as `quantization_config`
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
from ..formats import gptq
from ..spec import QuantSpec
from ..nn import QuantLinear

MANIFEST = "quantkern_manifest.json"
WEIGHTS = "model.safetensors"
ZERO_POINT_CONVENTION = "v1 (stored zero-1)"


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
    qmods = quant_modules(model)
    if not qmods:
        raise CheckpointError("model has no QuantLinear modules to save")
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
        "lm_head": isinstance(head, QuantLinear),  # GPTQModel's key: the output projection is quantized too
        "static_groups": spec.static_groups, "damp_percent": spec.damp, "true_sequential": spec.true_sequential,
        "quant_method": "gptq", "checkpoint_format": "gptq", "pack_dtype": "int32",
        "meta": {
            "quantizer": "quantkern", "quantizer_version": __version__,
            "method": method.pop("method", None), "alpha": method.pop("alpha", None), "K": method.pop("K", None),
            "method_options": method, "zero_point_convention": ZERO_POINT_CONVENTION,
            "quantized_modules": sorted(qmods), "modules": info.get("modules", {}),
        },
    }
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


def _state_dict_dedup(model: nn.Module) -> tuple[dict, dict]:
    """State dict with each shared tensor stored once; aliases maps dropped key -> kept key."""
    out, aliases, seen = {}, {}, {}
    for k, v in model.state_dict().items():
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


def _write_weights(tmp: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp / WEIGHTS), metadata=metadata)


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

def save_quantized(model: nn.Module, path, tokenizer=None, log_path=None) -> Path:
    """Write `model` (from quantize_model) as a GPTQ v1 directory at `path`, atomically."""
    path = Path(path)
    qcfg = quantize_config(model)
    tensors, aliases = _state_dict_dedup(model)
    qcfg["meta"]["tied"] = aliases
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_weights(tmp, tensors, {"format": "pt", "quantizer": "quantkern"})
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
    if qcfg.get("quant_method") != "gptq" or qcfg.get("checkpoint_format", "gptq") != "gptq":
        raise CheckpointError(f"unsupported quantization: quant_method={qcfg.get('quant_method')!r}, "
                              f"checkpoint_format={qcfg.get('checkpoint_format')!r} (need gptq v1)")
    return QuantSpec(bits=int(qcfg["bits"]), group_size=int(qcfg["group_size"]), sym=bool(qcfg.get("sym", True)),
                     act_order=bool(qcfg.get("desc_act", False)), static_groups=bool(qcfg.get("static_groups", False)),
                     damp=float(qcfg.get("damp_percent", 0.01)), true_sequential=bool(qcfg.get("true_sequential", True)))


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
    cfg = AutoConfig.from_pretrained(path)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")  # the model is built plain, then given QuantLinear modules
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors weights")
    try:
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
    except Exception as e:  # a truncated/garbled file when not checked
        raise CheckpointError(f"{path}: cannot read weights: {e}") from e
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(cfg, "dtype", None) or torch.float32)
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
        n, m = sd[name + ".g_idx"].shape[0], sd[name + ".scales"].shape[1]
        if isinstance(old, nn.Linear) and (old.in_features, old.out_features) != (n, m):
            raise CheckpointError(f"{path}: {name} is {old.out_features}x{old.in_features} in the config, "
                                  f"{m}x{n} in the weights")
        try:
            gptq.check_tensors({t: sd[f"{name}.{t}"] for t in gptq.TENSOR_NAMES}, mspec.bits, m, n)
        except ValueError as e:
            raise CheckpointError(f"{path}: {name}'s packed tensors do not match its quantize_config "
                                  f"({mspec.bits}-bit, group {mspec.group_size}): {e}") from e
        q = QuantLinear(n, m, mspec, bias=(name + ".bias") in sd)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    aliases = qcfg.get("meta", {}).get("tied", {})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    with torch.no_grad():
        live = model.state_dict(keep_vars=True)
        for k, src in aliases.items():  # anything tie_weights did not re-tie gets its stored copy
            if live[k].data_ptr() != live[src].data_ptr():
                live[k].data.copy_(sd[src])
    model.quantkern_info = {"spec": spec.to_dict(), "method": {"method": qcfg.get("meta", {}).get("method")},
                            "modules": qcfg.get("meta", {}).get("modules", {}), "quantize_config": qcfg}
    model = model.to(device).eval()
    if fuse:
        from ..nn import fuse_quant_groups

        fuse_quant_groups(model)
    return model


def checkpoint_size(path) -> dict:
    """Bytes on disk: total, and the packed tensors vs everything else in the weights."""
    from safetensors import safe_open

    path = Path(path)
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    packed = other = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                t = sf.get_slice(k)
                nbytes = 1
                for d in t.get_shape():
                    nbytes *= d
                nbytes *= {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1}.get(t.get_dtype(), 4)
                if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
                    packed += nbytes
                else:
                    other += nbytes
    return {"total": total, "packed_linears": packed, "other_tensors": other}
