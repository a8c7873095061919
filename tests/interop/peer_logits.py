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
from pathlib import Path

import torch
from peer_common import record_each


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
    record_each(ids_path, out_dir, [(Path(ck).name, lambda ck=ck: LOADERS[loader](ck)) for ck in ckpts])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
