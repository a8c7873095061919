"""Tiny random-weight models of common architectures, built from their transformers configs (no download)."""
from __future__ import annotations

import torch

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

# per architecture: config overrides on top of COMMON (what makes it itself: biases, sandwich norms, sliding
# windows shorter than the calibration sequences, fused projections, untied heads, experts)
ARCHS = {
    "llama": dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "mistral": dict(sliding_window=8, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),  # q/k/v biases are built in
    "qwen3": dict(tie_word_embeddings=False),
    "gemma2": dict(sliding_window=8, query_pre_attn_scalar=16),
    "gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                        query_pre_attn_scalar=16),
    "phi3": dict(tie_word_embeddings=False),
    "olmo2": dict(),
    "granite": dict(embedding_multiplier=2.0, logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.25),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": dict(num_experts=4, shared_expert_intermediate_size=64, **MOE),
    "qwen3_moe": dict(num_experts=4, **MOE),
    "deepseek_v3": dict(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4,
                        q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                        rope_scaling=None, **MOE),
}
ARCHS["deepseek_v2"] = dict(ARCHS["deepseek_v3"], q_lora_rank=None, topk_method="greedy")  # V2-Lite: one q_proj
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v2")


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, **{**COMMON, **ARCHS[arch]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random init is tiny (std 0.02): widen it so quantization error is visible
        for n, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in n:
                p.normal_(0, 0.2)
    return model
