"""Shared helpers for the driver tests: a tiny random-weight Llama and a byte-level tokenizer (offline)."""
from __future__ import annotations

import torch


class ByteTokenizer:
    """Tokens are UTF-8 bytes (vocab 256); enough for the data/driver code paths."""

    vocab_size = 256

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, **_):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tiny_llama(layers: int = 2, hidden: int = 64, inter: int = 96, seed: int = 0, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).float().eval()
    # random init is tiny (std 0.02): widen it so quantization error is visible and not all-zero groups
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def tiny_tokens(nsamples=4, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nsamples, seqlen), generator=g)


def tiny_hf_tokenizer():
    """A real (fast) transformers tokenizer over the 256 byte-level symbols, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=alphabet[0], pad_token=alphabet[0])


def tiny_model_dir(path, layers: int = 2):
    """Save a tiny random Llama + tokenizer as a transformers directory (for CLI tests)."""
    model = tiny_llama(layers=layers)
    model.save_pretrained(path)
    tiny_hf_tokenizer().save_pretrained(path)
    return path
