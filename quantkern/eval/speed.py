"""Decode speed: greedy tokens per second at batch 1 with the KV cache (prefill excluded)."""
from __future__ import annotations

import time

import torch


@torch.no_grad()
def decode_tokens_per_s(model, input_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 2) -> float:
    """Best of `repeats`: (new_tokens - 1) / (time(generate new_tokens) - time(generate 1 token))."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0)

    def run(n):
        t0 = time.perf_counter()
        model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t0

    run(2)  # warm-up: first-call allocations, lazy kernel setup
    best = 0.0
    for _ in range(repeats):
        t1 = run(1)
        tn = run(new_tokens)
        best = max(best, (new_tokens - 1) / max(tn - t1, 1e-9))
    return best
