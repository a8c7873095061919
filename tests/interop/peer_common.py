"""What both peer scripts do per case: build a model (load or quantize), run it on the test's ids, and save
its logits, or the error as text when the peer refuses (a refusal is a finding for the test to read)."""
from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import torch


def record_each(ids_path, out_dir, jobs) -> None:
    """jobs: (name, make_model) pairs; writes OUT_DIR/<name>.pt = {"logits": fp32} or {"error": text}."""
    ids = torch.load(ids_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    for name, make_model in jobs:
        try:
            model = make_model()
            with torch.no_grad():
                result = {"logits": model(input_ids=ids).logits.float()}
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"}
        torch.save(result, out / f"{name}.pt")
