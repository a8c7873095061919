"""The reverse direction: checkpoints written by GPTQModel (on CPU, in the peers' environment) load in
quantkern.load with GPTQModel's own logits (its fp16 torch kernel reloading the same files).

GPTQModel 7.6 writes `checkpoint_format: "gptq"` (v1) for every grid, converting its internal v2 zeros
word by word; an asymmetric group whose zero point is 0 then wraps, which quantkern refuses by name rather
than reading wrong (formats/gptq.py check_v1_asym_zeros); the random weights here never give such a group.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_peer_loaders import PEERS_PYTHON, rel_max_err, tiny_model  # noqa: E402

import quantkern  # noqa: E402

pytestmark = pytest.mark.interop

# GPTQModel's reference logits come from its fp16 kernel (activations in fp16 too): at 2 bits they sit
# 1.06e-2 from quantkern's fp32 ones; a zero point off by one or an ignored g_idx moves logits by 0.1-1.2
TOL = 2e-2
# name -> (bits, group_size, desc_act, sym)
CASES = {"w4-g32-act-order": (4, 32, True, True), "w3-g64": (3, 64, False, True),
         "w2-g128-act-order": (2, 128, True, True), "w8-g-1": (8, -1, False, True),
         "w4-g64-asym": (4, 64, False, False)}


@pytest.fixture(scope="module")
def gptqmodel_checkpoints(tmp_path_factory):
    if not PEERS_PYTHON.exists():
        pytest.fail(f"no peers environment at {PEERS_PYTHON}: run `make test-interop` (it makes .venv-peers)")
    from driver_tiny import tiny_hf_tokenizer

    root = tmp_path_factory.mktemp("writers")
    tiny_model(tie=False).save_pretrained(root / "src")
    tiny_hf_tokenizer().save_pretrained(root / "src")
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(2))
    torch.save(ids, root / "ids.pt")
    args = [str(a) for name, (b, g, act, sym) in CASES.items() for a in (name, b, g, int(act), int(sym))]
    subprocess.run([str(PEERS_PYTHON), str(Path(__file__).with_name("peer_quantize.py")), str(root / "src"),
                    str(root / "ids.pt"), str(root / "out"), *args], check=True, capture_output=True, timeout=1800)
    return root, ids


@pytest.mark.parametrize("case", list(CASES))
def test_quantkern_reads_gptqmodel_checkpoint(gptqmodel_checkpoints, case):
    root, ids = gptqmodel_checkpoints
    theirs = torch.load(root / "out" / f"{case}.pt")
    assert "error" not in theirs, f"GPTQModel could not write {case}: {theirs.get('error')}"
    with pytest.warns(UserWarning, match="no quantkern_manifest.json"):
        model = quantkern.load(root / "out" / case)
    bits, group, _, sym = CASES[case]
    q = model.model.layers[0].mlp.down_proj
    assert (q.spec.bits, q.spec.group_size, q.spec.sym) == (bits, group, sym)
    with torch.no_grad():
        ours = model(input_ids=ids).logits.float()
    err = rel_max_err(ours, theirs["logits"])
    assert err <= TOL, f"{case}: quantkern vs GPTQModel relative max error {err:.3g}"
