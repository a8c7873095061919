"""Decode speed: greedy tokens per second at batch 1 with the KV cache (prefill excluded)."""
from __future__ import annotations

import time

import torch


@torch.no_grad()
def decode_tokens_per_s(model, input_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 2) -> float:
    """(new_tokens - 1) / (min time(generate new_tokens) - min time(generate 1 token)) over `repeats`.

    Minimum of each timing separately (the least disturbed run of each), so a run slowed down by other
    work on the machine cannot make the difference negative or absurdly small.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0)

    def run(n):
        t0 = time.perf_counter()
        model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t0

    run(2)  # warm-up: first-call allocations, lazy kernel setup
    t1 = min(run(1) for _ in range(repeats))
    tn = min(run(new_tokens) for _ in range(repeats))
    if tn <= t1:
        raise RuntimeError(f"decode timing is inconsistent: {new_tokens} tokens took {tn:.4f} s, 1 token {t1:.4f} s")
    return (new_tokens - 1) / (tn - t1)
