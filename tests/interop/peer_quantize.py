"""Run inside the peers' environment: quantize a model directory with GPTQModel on CPU, save its checkpoint,
and write GPTQModel's own logits of the saved checkpoint (reloaded with its fp16 torch kernel), so the
interop tests can load the same files with quantkern and compare.

    python peer_quantize.py SRC_DIR IDS.pt OUT_DIR NAME BITS GROUP_SIZE DESC_ACT(0|1) SYM(0|1) [...]

Each NAME ... group of five writes OUT_DIR/NAME/ (the checkpoint) and OUT_DIR/NAME.pt ({"logits"} or
{"error"}). Imports nothing from quantkern.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # on 2 cores its default pool refuses to start

import torch  # noqa: E402
from peer_common import record_each  # noqa: E402


def quantize_one(src, out, bits, group_size, desc_act, sym):
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 256, (64,), generator=g).tolist()} for _ in range(16)]
    # act_group_aware (its default) needs groups; off for one group per row
    qc = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym,
                        **({"act_group_aware": False} if group_size == -1 else {}))
    model = GPTQModel.load(str(src), qc, device="cpu")
    model.quantize(calib, batch_size=1)
    model.save(str(out))
    return GPTQModel.load(str(out), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)


def main(argv) -> int:
    src, ids_path, out_dir, *cases = argv
    jobs = []
    for i in range(0, len(cases), 5):
        name, bits, group_size, desc_act, sym = cases[i:i + 5]
        jobs.append((name, lambda name=name, b=int(bits), g=int(group_size), act=desc_act == "1", s=sym == "1":
                     quantize_one(src, Path(out_dir) / name, b, g, act, s)))
    record_each(ids_path, out_dir, jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
