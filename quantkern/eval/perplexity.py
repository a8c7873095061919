"""Perplexity over held-out text (GPTQ protocol: non-overlapping windows of `seqlen` tokens).

Each document (e.g. Hamlet, Macbeth) is cut into full windows of `seqlen` tokens, windows never span
two documents and a short tail is dropped. With `bos_id` (the tokenizer prepends BOS by default:
calibration.data.resolve_bos) every window is BOS + seqlen - 1 text tokens; BOS itself is never scored. Every window is scored on its own (no carried context);
perplexity = exp(mean next-token cross-entropy over all scored tokens).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


def windows(docs, seqlen: int, bos_id: int | None = None) -> list[torch.Tensor]:
    out = []
    span = seqlen - (bos_id is not None)  # text tokens per window
    for ids in docs:
        ids = ids.reshape(-1)
        cut = [ids[i:i + span] for i in range(0, ids.numel() - span + 1, span)]
        out += cut if bos_id is None else [torch.cat([ids.new_tensor([bos_id]), w]) for w in cut]
    if not out:
        raise ValueError(f"evaluation text has no full window of {seqlen} tokens")
    return out


@torch.no_grad()
def perplexity(model, docs, seqlen: int = 512, progress: bool = False, desc: str = "ppl",
               bos_id: int | None = None) -> dict:
    """{'ppl', 'nll', 'tokens', 'windows', 'seqlen', 'seconds', 'bos'} for `model` on token tensors `docs`."""
    from tqdm.auto import tqdm

    if isinstance(docs, torch.Tensor):
        docs = [docs]
    device = next(model.parameters()).device
    wins = windows(docs, seqlen, bos_id)
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for w in tqdm(wins, desc=desc, disable=None if progress else True, leave=False):  # None: terminals only
        logits = model(input_ids=w[None].to(device), use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, w[1:].to(device), reduction="sum").item()
        count += w.numel() - 1
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": len(wins), "seqlen": seqlen,
            "seconds": time.perf_counter() - t0, "bos": bos_id is not None}
