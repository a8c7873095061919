"""quantkern's checkpoints loaded by other engines (transformers, GPTQModel) give quantkern's logits.

Run with `make test-interop`: it makes the peers' own environment (.venv-peers: GPTQModel, optimum,
transformers; never dependencies of quantkern) and runs `pytest -m interop`. The peers run in a subprocess
of that environment (peer_logits.py) and hand back logits; everything else runs here.

Tolerances (relative max error, max|peer - quantkern| / max|quantkern|): 1e-2 for GPTQModel's torch
kernel (fp16), 3e-2 for the kernels chosen automatically on CPU (bf16). A real convention error moves logits
by 0.1-1.2 (shared/notes/peers.md) and a head left random by ~1, so both tolerances catch them.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from driver_tiny import tiny_hf_tokenizer, tiny_tokens  # noqa: E402

import quantkern  # noqa: E402
from quantkern.spec import QuantSpec  # noqa: E402

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
PEERS_PYTHON = Path(os.environ.get("QUANTKERN_PEERS_PYTHON", ROOT / ".venv-peers" / "bin" / "python"))
TOL = {"transformers": 3e-2, "gptqmodel-torch": 1e-2, "gptqmodel-auto": 3e-2}

# name -> (tied embeddings, spec, lm_head)
CASES = {
    "default-tied": (True, QuantSpec(bits=4, group_size=128), "auto"),
    "default-untied": (False, QuantSpec(bits=4, group_size=64), "auto"),
    "head-same": (True, QuantSpec(bits=4, group_size=128), "same"),
    "asym4": (True, QuantSpec(bits=4, group_size=64, sym=False), "auto"),
    "asym3-act-order": (False, QuantSpec(bits=3, group_size=128, sym=False, act_order=True), "auto"),
    "sym8": (True, QuantSpec(bits=8, group_size=128), "fp"),
    "sym2-act-order": (False, QuantSpec(bits=2, group_size=32, act_order=True), "auto"),
}
# (loader, case) -> why the peer must NOT reproduce quantkern's logits; everything else must
MISLOADS = {("transformers", "head-same"): "transformers' GPTQ path ignores lm_head/dynamic: random head"}


def tiny_model(tie: bool, seed: int = 0):
    """hidden 256, 2 blocks, vocab 1024 (GPTQModel's automatic 4-bit CPU kernel needs outputs % 16 == 0);
    weights at std 1/sqrt(fan-in) so activations neither vanish nor explode (a bf16 kernel's error then stays
    at the level a trained model shows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(1))
    torch.save(ids, root / "ids.pt")
    out = {}
    for name, (tie, spec, head) in CASES.items():
        model, _ = quantkern.quantize_model(tiny_model(tie), None, spec, method="gptq",
                                            calib=tiny_tokens(8, 64), progress=False, lm_head=head)
        path = quantkern.save_quantized(model, root / name, tokenizer=tiny_hf_tokenizer())
        with torch.no_grad():
            out[name] = quantkern.load(path)(input_ids=ids).logits.float()
    return root, out


@pytest.fixture(scope="module")
def peer_results(checkpoints):
    if not PEERS_PYTHON.exists():
        pytest.fail(f"no peers environment at {PEERS_PYTHON}: run `make test-interop` (it makes .venv-peers)")
    root, _ = checkpoints
    results = {}
    for loader in TOL:
        subprocess.run([str(PEERS_PYTHON), str(Path(__file__).with_name("peer_logits.py")), loader,
                        str(root / "ids.pt"), str(root / loader), *(str(root / n) for n in CASES)],
                       check=True, capture_output=True, timeout=900)
        results[loader] = {n: torch.load(root / loader / f"{n}.pt") for n in CASES}
    return results


def rel_max_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("loader", list(TOL))
def test_peer_reproduces_quantkern_logits(checkpoints, peer_results, loader, case):
    _, ours = checkpoints
    got = peer_results[loader][case]
    assert "error" not in got, f"{loader} refused {case}: {got.get('error')}"
    err = rel_max_err(got["logits"], ours[case])
    if (loader, case) in MISLOADS:
        # the tolerance is tight enough to catch it: this is the silent garbage readers.py warns about
        assert err > 10 * TOL[loader], f"{loader} now loads {case} correctly ({err:.3g}): update readers.py"
    else:
        assert err <= TOL[loader], f"{loader} on {case}: relative max error {err:.3g} > {TOL[loader]}"


def test_readers_table_matches_what_was_measured(checkpoints):
    """quantkern.models.readers says 'misloads' exactly where this suite measured a misload."""
    from quantkern.models.checkpoint import read_quantize_config
    from quantkern.models.readers import reader_support

    root, _ = checkpoints
    for case in CASES:
        table = reader_support(read_quantize_config(root / case))
        for loader in TOL:
            reader = "transformers" if loader == "transformers" else "GPTQModel"
            assert table[reader].ok == ((loader, case) not in MISLOADS), (case, reader, table[reader])
