"""Greedy text generation for a prompt (the chat template where the tokenizer has one): the CLI's `generate`
and the demo's answer."""
from __future__ import annotations

import torch


def prompt_ids(tok, prompt: str, raw: bool = False) -> torch.Tensor:
    if not raw and getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]
    return tok(prompt, return_tensors="pt").input_ids


def generate_text(model, tok, prompt: str, max_new_tokens: int = 48, raw: bool = False) -> str:
    ids = prompt_ids(tok, prompt, raw)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
