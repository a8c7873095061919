"""The Llama family (Llama 2/3, SmolLM/SmolLM2, ...) as llama.cpp's converter (convert_hf_to_gguf.py,
LlamaModel) lays it out: hyperparameter keys, tensor names, and the row order of q_proj / k_proj.

Rotary layout: Hugging Face checkpoints rotate the two halves of each head (rotate_half); llama.cpp's
llama architecture rotates adjacent pairs, so the converter reorders the output rows of q_proj and k_proj
within each head: rows (half, i) -> (i, half). Rows move with their scales and zero points; groups run
along the input channels and are untouched.
"""
from __future__ import annotations

import math

import gguf
import torch

ARCH = "llama"
MODEL_TYPES = ("llama",)


class ArchError(ValueError):
    pass


def _rope(config) -> tuple[float, dict]:
    """(rope theta, scaling dict) from a transformers 4 (rope_theta / rope_scaling) or 5 (rope_parameters) config."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ArchError("config has no rope_theta")
    return float(theta), params


def check_config(config) -> None:
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        raise ArchError(f"GGUF export supports the Llama family (model_type {MODEL_TYPES}); this model is "
                        f"{getattr(config, 'model_type', None)!r}")
    kind = _rope(config)[1].get("rope_type", _rope(config)[1].get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ArchError(f"rope scaling {kind!r} is not exported (default, linear and llama3 are)")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hparams(writer: gguf.GGUFWriter, config) -> None:
    """The keys LlamaModel.set_gguf_parameters writes."""
    theta, rope = _rope(config)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def extra_tensors(config) -> dict[str, torch.Tensor]:
    """llama3 rope scaling travels as a tensor of per-frequency divisors, `rope_freqs.weight` (f32)."""
    theta, rope = _rope(config)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return {}
    dim = head_dim(config)
    # frequencies in f32 as the converter computes them (the factors it writes depend on their rounding)
    freqs = (1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)).double()
    factor, lo, hi = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - lo) / (hi - lo)
    div = torch.where(wavelen < old / hi, torch.ones_like(freqs),
                      torch.where(wavelen > old / lo, torch.full_like(freqs, factor), 1 / ((1 - smooth) / factor + smooth)))
    return {"rope_freqs.weight": div.float()}


def tensor_name(hf_name: str, n_blocks: int) -> str:
    """llama.cpp's name of a transformers parameter (e.g. model.layers.0.self_attn.q_proj.weight -> blk.0.attn_q.weight)."""
    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ArchError(f"{hf_name}: no llama.cpp tensor of the llama architecture corresponds to it")
    return name


def row_order(module_name: str, config) -> torch.Tensor | None:
    """New row r of q_proj / k_proj is old row order[r] (None: rows keep their order)."""
    leaf = module_name.rsplit(".", 1)[-1]
    if leaf == "q_proj":
        heads = config.num_attention_heads
    elif leaf == "k_proj":
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    else:
        return None
    hd = head_dim(config)
    return torch.arange(heads * hd).reshape(heads, 2, hd // 2).transpose(1, 2).reshape(-1)
