"""Run inside the peers' environment (.venv-peers, made by `make peers`): load GPTQ checkpoints with another
engine and write their logits, so the interop tests can compare them with quantkern's.

    python peer_logits.py LOADER IDS.pt OUT_DIR CKPT [CKPT ...]

LOADER: transformers (AutoModelForCausalLM, GPTQ through optimum + GPTQModel), gptqmodel-torch
(GPTQModel.load with its reference torch kernel, fp16) or gptqmodel-auto (GPTQModel's automatic CPU
kernel choice). For each checkpoint OUT_DIR/<name>.pt holds {"logits": fp32 tensor} or {"error": text}:
a refusal is a result the test reads, not a crash of the whole batch. Imports nothing from quantkern.
"""
from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path

import torch


def _transformers(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32)


def _gptqmodel(backend_name):
    def load(path):
        from gptqmodel import BACKEND, GPTQModel

        kw = {"dtype": torch.float16} if backend_name == "TORCH" else {}
        return GPTQModel.load(str(path), device="cpu", backend=getattr(BACKEND, backend_name), **kw)

    return load


LOADERS = {"transformers": _transformers, "gptqmodel-torch": _gptqmodel("TORCH"),
           "gptqmodel-auto": _gptqmodel("AUTO")}


def main(argv) -> int:
    loader, ids_path, out_dir, *ckpts = argv
    ids = torch.load(ids_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    for ck in ckpts:
        try:
            model = LOADERS[loader](ck)
            with torch.no_grad():
                logits = model(input_ids=ids).logits.float()
            result = {"logits": logits}
        except Exception as e:  # a refusal to load is the finding, recorded for the test
            result = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"}
        torch.save(result, out / f"{Path(ck).name}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
