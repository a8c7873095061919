"""The architecture matrix: a tiny random model of each common architecture (transformers config, 2 blocks, no
download) quantized with GPTQ and SNRQ at 4 bits g32, saved and loaded; checks coverage, logits, generate,
true-sequential groups and the MoE statistics bookkeeping."""
import warnings

import pytest
import torch
import torch.nn as nn

from arch_tiny import ARCHS, MOE_ARCHS, tiny_model

import quantkern
from quantkern.calibration.stats import HessianAccumulator
from quantkern.models import arch, driver, moe
from quantkern.models.errors import UnsupportedModelError
from quantkern.models.readers import reader_support
from quantkern.nn import QuantLinear
from quantkern.spec import QuantSpec

SPEC = QuantSpec(bits=4, group_size=32)
CALIB = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))  # 32 > sliding window 8
PROBE = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matmuls: a second OpenMP thread only adds synchronisation (and stalls on a busy machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quantize(name, method, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # calibration advice: 128 tokens is little, on purpose (speed)
        return quantkern.quantize_model(tiny_model(name), None, SPEC, method=method, calib=CALIB, progress=False,
                                        **kw)


def _block_linears(model):
    _, blocks = arch.find_blocks(model)
    return [(li, n, m) for li, b in enumerate(blocks) for n, m in b.named_modules()
            if isinstance(m, (nn.Linear, QuantLinear))]


@pytest.mark.parametrize("method", ["gptq", "snrq"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_quantize_save_load_generate(name, method, tmp_path):
    q, rep = _quantize(name, method)
    info = q.quantkern_info
    floats = {f"model.layers.{li}.{n}" for li, n, m in _block_linears(q) if not isinstance(m, QuantLinear)}
    # (a) every linear of every block is packed, except routers / gates, which the meta lists with a reason
    assert floats <= set(info["kept_float"]), floats - set(info["kept_float"])
    assert all(k.rpartition(".")[2] in arch.FLOAT_LINEARS for k in info["kept_float"])
    assert bool(info["kept_float"]) == (name in MOE_ARCHS)
    assert not [n for n, p in q.named_parameters() if p.dim() == 3]  # no fused expert tensor left
    npacked = sum(isinstance(m, QuantLinear) for _, _, m in _block_linears(q))
    assert npacked == len(rep.modules) - 1  # every solved module but the 8-bit head lives in a block
    quantkern.save_quantized(q, tmp_path / "ck")
    loaded = quantkern.load(tmp_path / "ck")
    qcfg = loaded.quantkern_info["quantize_config"]
    assert qcfg["meta"]["kept_float"] == info["kept_float"]
    assert all(qcfg["dynamic"][f"-:^{n.replace('.', chr(92) + '.')}$"] == {} for n in info["kept_float"])
    verdicts = reader_support(qcfg)  # "-:" float rules are no other grid
    # measured in tests/interop: transformers reads per-expert checkpoints but packs Qwen2-MoE's float gate
    assert verdicts["transformers"].ok is (name != "qwen2_moe")
    assert qcfg["meta"]["kept_float_linears"] == [n for n in info["kept_float"] if n.endswith("shared_expert_gate")]
    assert bool(qcfg["meta"].get("experts")) == (name in MOE_ARCHS)
    assert sorted(n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)) == \
        sorted(n for n, m in q.named_modules() if isinstance(m, QuantLinear))
    # (b) the loaded checkpoint computes what the in-memory quantized model computes
    with torch.no_grad():
        a, b = q(input_ids=PROBE).logits, loaded(input_ids=PROBE).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # (c) generate with packed weights (greedy, with the KV cache)
    out = loaded.generate(PROBE[:1, :8], max_new_tokens=4, do_sample=False)
    assert 8 < out.shape[1] <= 12
    with torch.no_grad():  # each cached greedy step is the argmax of a full forward over its prefix (up to a tie)
        for t in range(8, out.shape[1]):
            lg = loaded(input_ids=out[:, :t]).logits[0, -1]
            assert float(lg.max() - lg[out[0, t]]) <= 1e-4, (t, int(lg.argmax()), int(out[0, t]))
    if name in MOE_ARCHS:
        from quantkern.cli import inspect_checkpoint

        line = inspect_checkpoint(tmp_path / "ck")["experts"]
        assert line.startswith(f"{len(info['experts'])} over all blocks"), line


@pytest.mark.parametrize("name", list(ARCHS))
def test_sequential_groups_table_and_trace_agree(name):
    model = tiny_model(name)
    moe.unfuse_experts(model)
    _, blocks = arch.find_blocks(model)
    inps, _ = driver._capture_first_block(model, blocks[0], CALIB[:1])
    kws = driver._block_kwargs(model, blocks, CALIB[0])
    x = inps[0]
    with torch.no_grad():
        for li, block in enumerate(blocks):
            table = arch.table_groups(model, block)
            traced = arch.traced_groups(block, lambda: block(x, **kws[li]))
            assert table == traced, (li, table, traced)
            assert arch.linear_groups(model, block, lambda: None) == table
            assert {n for g in table for n in g} == set(arch.quantizable_linears(block))
            for g in table:  # a group reads one input: one width
                assert len({block.get_submodule(n).in_features for n in g}) == 1
            x = driver._block_out(block(x, **kws[li]))


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text", "mistral"])
def test_each_block_gets_its_own_kwargs(name):
    # sliding-window (8) and global layers alternate; calibration is 32 tokens: a block run with another
    # block's mask / rotary embeddings would leave the model's own hidden states
    model = tiny_model(name)
    _, blocks = arch.find_blocks(model)
    inps, _ = driver._capture_first_block(model, blocks[0], CALIB[:1])
    kws = driver._block_kwargs(model, blocks, CALIB[0])
    with torch.no_grad():
        ref = model(input_ids=CALIB[:1], output_hidden_states=True).hidden_states
        out = driver._block_out(blocks[0](inps[0], **kws[0]))
        torch.testing.assert_close(out, ref[1])
        out = driver._block_out(blocks[1](out, **kws[1]))
        if name == "gemma3_text":  # the global layer's rotary embeddings differ from the local ones
            wrong = driver._block_out(blocks[1](ref[1], **kws[0]))
            assert (wrong - out).abs().max() > 1e-3
    # the last entry is after the final norm: compare through it
    torch.testing.assert_close(model.model.norm(out), ref[2])


def test_unfused_experts_compute_the_fused_forward():
    for name in MOE_ARCHS:
        model = tiny_model(name)
        with torch.no_grad():
            ref = model(input_ids=PROBE).logits
            assert moe.unfuse_experts(model)
            torch.testing.assert_close(model(input_ids=PROBE).logits, ref, rtol=1e-5, atol=1e-5)
            assert moe.unfuse_experts(model) == []  # idempotent


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral"])
def test_expert_statistics_routed_or_side_pass(name):
    model = tiny_model(name)
    moe.unfuse_experts(model)
    n_tokens = CALIB.numel()
    _, routed_rep = _quantize(name, "gptq", moe_min_tokens=0)
    experts = routed_rep.experts
    k = model.config.num_experts_per_tok
    for li in range(2):
        rows = [v for key, v in experts.items() if key.startswith(f"{li}.")]
        assert len(rows) == 4 and not any(r["side_pass"] for r in rows)
        assert sum(r["tokens"] for r in rows) == k * n_tokens  # every token reaches top-k experts
    _, side_rep = _quantize(name, "gptq", moe_min_tokens=n_tokens + 1)
    assert all(r["side_pass"] and r["side_pass_linears"] == ["gate_proj", "up_proj", "down_proj"]
               for r in side_rep.experts.values())
    assert {k: v["tokens"] for k, v in side_rep.experts.items()}.keys() == experts.keys()
    # the default threshold is each linear's input size: gate/up read 64 features, down 32 (qwen2_moe) / 96
    _, default_rep = _quantize(name, "gptq")
    for r in default_rep.experts.values():
        assert ("gate_proj" in r["side_pass_linears"]) == (r["tokens"] < 64)


def test_expert_statistics_are_the_routed_tokens():
    # GPTQ on an expert's gate_proj equals a solve with H from exactly the tokens the router sent it on the
    # quantized stream (attention already quantized: the quantized model's own routing, read back after)
    name = "qwen3_moe"
    model = tiny_model(name)
    moe.unfuse_experts(model)
    fp_w = model.model.layers[0].mlp.experts[0].gate_proj.weight.detach().clone()
    q, rep = _quantize(name, "gptq", moe_min_tokens=0, safety_net=False, shrink=False, lm_head="fp", fuse=False)
    got = q.model.layers[0].mlp.experts[0].gate_proj
    routed = []
    h = got.register_forward_pre_hook(lambda m, i: routed.append(i[0].detach()))
    with torch.no_grad():
        for s in CALIB:
            q(input_ids=s[None])
    h.remove()
    H = HessianAccumulator(64)
    for x in routed:
        H.add_batch(x[None])
    assert rep.experts["0.mlp.experts.0"]["tokens"] == sum(x.shape[0] for x in routed) > 0
    want = quantkern.solve(fp_w, H.H, SPEC, method="gptq").dequantized
    torch.testing.assert_close(got.dequantized_weight(), want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------- refusals, before calibration

def _no_calibration(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("calibration started")
    monkeypatch.setattr(driver, "calibration_samples", boom)
    monkeypatch.setattr(driver, "_layer_loop", boom)


def test_blocks_or_linears_not_found_refused_before_calibration(monkeypatch):
    _no_calibration(monkeypatch)

    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

    with pytest.raises(UnsupportedModelError, match="cannot find the decoder blocks of NoBlocks"):
        quantkern.quantize_model(NoBlocks(), None, SPEC, calib=["text"])

    class ConvBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(8, 8, 1)

    class NoLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([ConvBlock(), ConvBlock()])
            self.lm_head = nn.Linear(8, 8)

    with pytest.raises(ValueError, match="cannot find the decoder blocks"):
        quantkern.quantize_model(NoLinears(), None, SPEC, calib=["text"])
    model = tiny_model("llama")
    for blk in model.model.layers:
        blk.self_attn, blk.mlp = nn.Identity(), nn.Identity()
    with pytest.raises(UnsupportedModelError, match=r"^block 0 \(LlamaDecoderLayer\) has no nn.Linear to quantize"):
        quantkern.quantize_model(model, None, SPEC, calib=["text"])


def test_unknown_fused_expert_layout_refused(monkeypatch):
    _no_calibration(monkeypatch)
    model = tiny_model("mixtral")
    ex = model.model.layers[0].mlp.experts
    ex.gate_up_proj_bias = nn.Parameter(torch.zeros(4, 192))
    with pytest.raises(UnsupportedModelError, match=r"model.layers.0.mlp.experts: fused experts MixtralExperts .*gate_up_proj_bias"):
        quantkern.quantize_model(model, None, SPEC, calib=["text"])


def test_ragged_group_warns_once_with_the_readers_that_refuse(monkeypatch):
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match=r"group_size 64 does not divide the input size of 1 linear\(s\) "
                                         r"\(mlp.down_proj: 96\).*some peer kernels refuse it") as rec:
        driver.check_linears(arch.find_blocks(model)[1], [0, 1], QuantSpec(bits=4, group_size=64))
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        driver.check_linears(arch.find_blocks(model)[1], [0, 1], QuantSpec(bits=4, group_size=32))


def test_model_dir_refusals(tmp_path, capsys):
    import json

    from quantkern.cli import main as cli_main
    from quantkern.models.zoo import check_model_dir, load_fp

    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "ok")
    check_model_dir(tmp_path / "ok")  # a plain safetensors directory passes
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match=r"no \.safetensors weights \(found pytorch_model.bin\)"):
        load_fp(d)
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    with pytest.raises(UnsupportedModelError, match="remote-code model"):
        load_fp(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, "model_type": "my_own_llm"}))
    with pytest.raises(UnsupportedModelError, match="'my_own_llm' is not built into this transformers"):
        load_fp(tmp_path / "ok")
    # the CLI says it in one line and exits 2, before loading anything
    err = capsys.readouterr()
    assert cli_main(["quantize", "--model", str(d), "--output", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("quantkern quantize: error: ") and "no .safetensors" in err


def test_expert_groups_solved_stage_by_stage_in_bounded_passes(monkeypatch):
    model = tiny_model("qwen2_moe")
    moe.unfuse_experts(model)
    block = model.model.layers[0]
    groups = arch.table_groups(model, block)
    names = [[groups[i] for i in u] for u in driver._solve_units(groups, block)]
    assert [len(u) for u in names] == [1, 1, 1, 1, 4, 4]  # q/k/v, o, shared gate/up, shared down, experts x2
    assert [g[0] for g in names[4]] == [f"mlp.experts.{e}.gate_proj" for e in range(4)]
    assert [g[0] for g in names[5]] == [f"mlp.experts.{e}.down_proj" for e in range(4)]
    monkeypatch.setattr(driver, "EXPERT_STATS_BYTES", 3 * 4 * 64 * 64 * 2)  # two 64-wide experts per pass
    assert [len(u) for u in driver._solve_units(groups, block)] == [1, 1, 1, 1, 2, 2, 4]  # down is 32 wide
    # smaller passes give the same statistics, hence the same codes
    a, _ = _quantize("qwen2_moe", "gptq")
    monkeypatch.setattr(driver, "EXPERT_STATS_BYTES", 1)
    b, _ = _quantize("qwen2_moe", "gptq")
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=PROBE).logits, b(input_ids=PROBE).logits, rtol=0, atol=1e-6)


def test_snrq_expert_inputs_pair_fp_and_quantized_by_token(monkeypatch):
    # gate/up: X_f is the fp model's input of the experts module at the very tokens the quantized stream routed;
    # down: X_f = X_q (D = 0)
    name = "qwen3_moe"
    fp = tiny_model(name)
    moe.unfuse_experts(fp)
    fp_rows = []
    hs = [b.mlp.experts.register_forward_pre_hook(lambda m, a: fp_rows.append(a[0].detach())) for b in fp.model.layers]
    with torch.no_grad():
        for s in CALIB:
            fp(input_ids=s[None])
    for h in hs:
        h.remove()
    fp_rows = torch.cat(fp_rows)
    pairs = []
    real = driver.AsymmetricPlugin.add
    monkeypatch.setattr(driver.AsymmetricPlugin, "add", lambda self, c, xq, xf: (pairs.append((xq, xf)), real(self, c, xq, xf)))
    _quantize(name, "snrq", moe_min_tokens=0)
    routed_in = [(q, f) for q, f in pairs if q.shape[-1] == 64 and q.shape[-2] != CALIB.shape[1]]
    down = [(q, f) for q, f in pairs if q.shape[-1] == 32]
    assert routed_in and down
    same = rows = 0
    for q, f in routed_in:
        f = f.reshape(-1, 64)
        d = torch.cdist(f, fp_rows, compute_mode="donot_use_mm_for_euclid_dist")
        assert d.min(dim=1).values.max() < 1e-4  # every X_f row is an fp token's input
        # ... of the same token as the X_q row beside it: the quantized stream's row is nearest to its own
        # token's fp row (4-bit drift is mostly smaller than the distance between tokens; a misaligned pairing
        # would agree on almost none)
        dq = torch.cdist(q.reshape(-1, 64), fp_rows, compute_mode="donot_use_mm_for_euclid_dist")
        same += int((dq.argmin(dim=1) == d.argmin(dim=1)).sum())
        rows += f.shape[0]
    assert same >= 0.9 * rows, (same, rows)
    assert any(not torch.equal(q, f) for q, f in routed_in)  # and differs from X_q (attention is quantized)
    assert all(torch.equal(q, f) for q, f in down)
