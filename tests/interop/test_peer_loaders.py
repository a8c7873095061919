"""quantkern's checkpoints loaded by other engines (transformers, GPTQModel) give quantkern's logits.

Run with `make test-interop`: it makes the peers' own environment (.venv-peers: GPTQModel, optimum,
transformers; never dependencies of quantkern) and runs `pytest -m interop`. The peers run in a subprocess
of that environment (peer_logits.py) and hand back logits; everything else runs here.

Tolerances (relative max error, max|peer - quantkern| / max|quantkern|): 1e-2 for GPTQModel's torch
kernel (fp16), 3e-2 for the kernels chosen automatically on CPU (bf16). A real convention error moves logits
by 0.1-1.2 (shared/notes/peers.md) and a head left random by ~1, so both tolerances catch them.
"""
from __future__ import annotations

import json
import os
import shutil
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

# name -> (family, tied embeddings, spec, lm_head); "8bit-packed" = an 8-bit RTN head stored packed with a
# GPTQModel `dynamic` override (quantkern's rounded heads are stored in float; other tools write these)
CASES = {
    "default-tied": ("llama", True, QuantSpec(bits=4, group_size=128), "auto"),
    "default-untied": ("llama", False, QuantSpec(bits=4, group_size=64), "auto"),
    "head-same": ("llama", True, QuantSpec(bits=4, group_size=128), "same"),
    "head-8bit-dynamic": ("llama", False, QuantSpec(bits=4, group_size=64), "8bit-packed"),
    "asym4": ("llama", True, QuantSpec(bits=4, group_size=64, sym=False), "auto"),
    "asym3-act-order": ("llama", False, QuantSpec(bits=3, group_size=128, sym=False, act_order=True), "auto"),
    "sym8": ("llama", True, QuantSpec(bits=8, group_size=128), "fp"),
    "sym2-act-order": ("llama", False, QuantSpec(bits=2, group_size=32, act_order=True), "auto"),
    "w4-g32-static-groups": ("llama", True, QuantSpec(bits=4, group_size=32, act_order=True, static_groups=True),
                             "auto"),
    "w4-g-1": ("llama", True, QuantSpec(bits=4, group_size=-1), "auto"),
    "qwen2-biases": ("qwen2", False, QuantSpec(bits=4, group_size=64, act_order=True), "auto"),
    "qwen2-asym3": ("qwen2", True, QuantSpec(bits=3, group_size=32, sym=False), "fp"),
    "sharded": ("llama", False, QuantSpec(bits=4, group_size=64), "auto"),  # saved in ~200 kB shards + index
    # mixture of experts: quantkern writes one packed linear per expert projection (mlp.experts.{e}.gate_proj...)
    **{f"moe-{f}": (f, False, QuantSpec(bits=4, group_size=64), "auto") for f in
       ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")},
}
# per family: what makes a small MoE (4 experts, top 2; DeepSeek: latent attention, a dense first block)
FAMILY_KW = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=256),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128),
    "deepseek_v3": dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
                        first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4, q_lora_rank=64,
                        kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, head_dim=16,
                        rope_scaling=None),
}
# a copy of default-tied whose configs say gptq_v2 while its zeros are v1: every zero off by one
OFF_BY_ONE = ("zero-off-by-one", "default-tied")
# (loader, case) -> why the peer must NOT reproduce quantkern's logits; everything else must
MISLOADS = {("transformers", "head-same"): "transformers' GPTQ path ignores lm_head/dynamic: random head",
            ("transformers", "head-8bit-dynamic"): "transformers' GPTQ path ignores lm_head/dynamic: random head",
            **{(loader, OFF_BY_ONE[0]): "a one-step zero-point offset" for loader in
               ("transformers", "gptqmodel-torch", "gptqmodel-auto")}}


# (loader, case) -> why the peer refuses to load it (asserted: a refusal, not garbage)
REFUSES = {(loader, "w4-g-1"): "torch's int4pack CPU kernel (chosen for 4-bit) takes groups of 32-256 only"
           for loader in ("transformers", "gptqmodel-auto")}
# (loader, case) -> why the peer either fails or gives garbage (asserted: one of the two, never quantkern's logits)
FAILS = {("transformers", "moe-qwen2_moe"): "it packs every block linear, ignoring dynamic '-:' rules: the float "
         "shared_expert_gate (out 1) does not load"}
# (loader, case) -> its own tolerance: transformers on Mixtral measured 3.1e-2, uniform over positions (median
# 2.4e-2: the bf16 path everywhere, no routing flip) where a misload gives ~1
TOL_CASE = {("transformers", "moe-mixtral"): 5e-2}


def tiny_model(tie: bool, seed: int = 0, family: str = "llama"):
    """hidden 256, 2 blocks, vocab 1024 (GPTQModel's automatic 4-bit CPU kernel needs outputs % 16 == 0);
    weights at std 1/sqrt(fan-in) so activations neither vanish nor explode (a bf16 kernel's error then stays
    at the level a trained model shows)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
    cfg = AutoConfig.for_model(family, **{**kw, **FAMILY_KW.get(family, {})})
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
            elif name.endswith(".bias"):  # Qwen2's q/k/v biases: nonzero, so a dropped bias shows
                p.normal_(0, 0.1)
    return model


def quantize_case(family, tie, spec, head):
    """quantkern's model for one case; "8bit-packed" packs an 8-bit RTN head beside a 4-bit body."""
    from quantkern.nn import QuantLinear

    model, _ = quantkern.quantize_model(tiny_model(tie, family=family), None, spec, method="gptq",
                                        calib=tiny_tokens(8, 64), progress=False,
                                        lm_head=None if head == "8bit-packed" else head)
    if head == "8bit-packed":
        head_spec = QuantSpec(bits=8, group_size=128)
        res = quantkern.solve(model.lm_head.weight.detach(), None, head_spec, method="rtn")
        model.lm_head = QuantLinear.from_linear(model.lm_head, res)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(1))
    torch.save(ids, root / "ids.pt")
    out = {}
    for name, case in CASES.items():
        model = quantize_case(*case)
        shard = {"max_shard_size": 200_000} if name == "sharded" else {}
        path = quantkern.save_quantized(model, root / name, tokenizer=tiny_hf_tokenizer(), **shard)
        assert (path / "model.safetensors.index.json").exists() == bool(shard)
        with torch.no_grad():
            out[name] = quantkern.load(path)(input_ids=ids).logits.float()
    bad, src = OFF_BY_ONE
    shutil.copytree(root / src, root / bad)
    for f in ("quantize_config.json", "config.json"):
        cfg = json.loads((root / bad / f).read_text())
        (cfg if f == "quantize_config.json" else cfg["quantization_config"])["checkpoint_format"] = "gptq_v2"
        (root / bad / f).write_text(json.dumps(cfg))
    out[bad] = out[src]
    return root, out


ALL_CASES = [*CASES, OFF_BY_ONE[0]]


@pytest.fixture(scope="module")
def peer_results(checkpoints):
    if not PEERS_PYTHON.exists():
        pytest.fail(f"no peers environment at {PEERS_PYTHON}: run `make test-interop` (it makes .venv-peers)")
    root, _ = checkpoints
    results = {}
    for loader in TOL:
        subprocess.run([str(PEERS_PYTHON), str(Path(__file__).with_name("peer_logits.py")), loader,
                        str(root / "ids.pt"), str(root / loader), *(str(root / n) for n in ALL_CASES)],
                       check=True, capture_output=True, timeout=900)
        results[loader] = {n: torch.load(root / loader / f"{n}.pt") for n in ALL_CASES}
    return results


def rel_max_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", ALL_CASES)
@pytest.mark.parametrize("loader", list(TOL))
def test_peer_reproduces_quantkern_logits(checkpoints, peer_results, loader, case):
    _, ours = checkpoints
    got = peer_results[loader][case]
    if (loader, case) in FAILS:
        assert "error" in got or rel_max_err(got["logits"], ours[case]) > 3 * TOL[loader], \
            f"{loader} now reproduces {case}: update FAILS, readers.py and the README"
        return
    if (loader, case) in REFUSES:
        assert "error" in got, f"{loader} now loads {case}: check its logits and update REFUSES and the README"
        return
    assert "error" not in got, f"{loader} refused {case}: {got.get('error')}"
    err = rel_max_err(got["logits"], ours[case])
    if (loader, case) in MISLOADS:
        # the tolerance catches it by a wide margin: the silent garbage readers.py warns about, and a zero
        # point off by one step
        assert err > 3 * TOL[loader], f"{loader} reproduces {case} ({err:.3g}), expected: {MISLOADS[loader, case]}"
    else:
        tol = TOL_CASE.get((loader, case), TOL[loader])
        assert err <= tol, f"{loader} on {case}: relative max error {err:.3g} > {tol}"


def test_readers_table_matches_what_was_measured(checkpoints):
    """quantkern.models.readers says 'misloads' exactly where this suite measured a misload."""
    from quantkern.models.checkpoint import read_quantize_config
    from quantkern.models.readers import reader_support

    root, _ = checkpoints
    for case in CASES:
        table = reader_support(read_quantize_config(root / case))
        for loader in TOL:
            reader = "transformers" if loader == "transformers" else "GPTQModel"
            if loader == "gptqmodel-auto" and (loader, case) in REFUSES:
                continue  # GPTQModel has another kernel (backend=TORCH) that loads it; its verdict says so
            bad = (loader, case) in MISLOADS or (loader, case) in FAILS or (loader, case) in REFUSES
            assert table[reader].ok == (not bad), (case, reader, table[reader])
