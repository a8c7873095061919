"""Decode-speed features: QuantLinear's lean path, fused q/k/v + gate/up groups, quantized lm_head
(quantize -> save -> load -> same logits; statistics from the final norm). Tiny random Llama, offline."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from driver_tiny import tiny_llama, tiny_tokens

import quantkern
from quantkern import grid
from quantkern.formats import gptq
from quantkern.models import checkpoint as ckpt
from quantkern.models.head import LM_HEAD_AUTO_SPEC
from quantkern.models.fusion import fuse_quant_groups
from quantkern.nn import FusedGroup, QuantLinear, unfuse_quant_groups
from quantkern.nn.fused import concat_outputs
from quantkern.spec import QuantSpec


def _layer(m, n, spec, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g)
    t = gptq.pack(*grid.rtn(w, spec), spec.bits)
    return QuantLinear.from_gptq(t, spec, bias=torch.randn(m, generator=g) if bias else None)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_concat_outputs_dequantizes_to_stacked_weights(bits):
    spec = QuantSpec(bits=bits, group_size=32)
    layers = [_layer(m, 96, spec, seed=m) for m in (40, 16, 33)]  # ragged m: qzeros words straddle members
    ts = [{k: getattr(q, k) for k in gptq.TENSOR_NAMES} for q in layers]
    cat = concat_outputs(ts, bits)
    torch.testing.assert_close(gptq.dequantize(cat, bits), torch.cat([q.dequantized_weight() for q in layers]),
                               rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_group_equals_separate_calls(bias):
    spec = QuantSpec(bits=4, group_size=32)
    layers = [_layer(m, 64, spec, seed=i, bias=bias and i != 1) for i, m in enumerate((48, 16, 16))]
    for shape in ((1, 1, 64), (3, 5, 64)):
        x = torch.randn(*shape)
        want = [q(x) for q in layers]
        g = FusedGroup(layers)
        for _ in range(2):  # first call validates and builds, second takes the lean path
            got = [q(x) for q in layers]
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert g._x is None  # every member took its slice: the cached input/output are released
        # out-of-order and repeated calls still give each member its own output
        assert torch.allclose(layers[2](x), want[2], atol=1e-6) and torch.allclose(layers[2](x), want[2], atol=1e-6)
        # a new input with the same values but modified in place is recomputed
        x2 = x.clone()
        layers[0](x2)
        x2.mul_(2)
        ref = x2 @ layers[1].dequantized_weight().T + (0 if layers[1].bias is None else layers[1].bias.float())
        torch.testing.assert_close(layers[1](x2), ref, rtol=1e-5, atol=1e-4)
        g.detach()
        assert all(q._group is None for q in layers)


def test_fused_group_sees_weight_changes_and_falls_back_on_different_g_idx():
    spec = QuantSpec(bits=4, group_size=32)
    a, b = _layer(32, 64, spec, 0), _layer(32, 64, spec, 1)
    x = torch.randn(2, 64)
    FusedGroup([a, b])
    a(x), b(x)
    c = _layer(32, 64, spec, 2)
    a.load_state_dict(c.state_dict())  # in-place copies: version counters change
    torch.testing.assert_close(a(x), x @ c.dequantized_weight().T, rtol=1e-5, atol=1e-4)
    b(x)
    perm = torch.randperm(64)
    a.g_idx = a.g_idx[perm].contiguous()  # replaced buffer: the group cannot share an input order any more
    want = gptq.dequantize({k: getattr(a, k) for k in gptq.TENSOR_NAMES}, 4)
    torch.testing.assert_close(a(x), x @ want.T, rtol=1e-5, atol=1e-4)
    assert a._group is None and b._group is None


def test_lean_path_rechecks_what_can_change(monkeypatch):
    spec = QuantSpec(bits=3, group_size=32)
    q = _layer(48, 64, spec, 0, bias=True)
    x = torch.randn(2, 64)
    y = q(x)
    assert q._fast is not None
    torch.testing.assert_close(q(x), y)  # lean path
    with torch.no_grad():
        q.bias.add_(1.0)  # bias is read per call
    torch.testing.assert_close(q(x), x @ q.dequantized_weight().T + q.bias.float(), rtol=1e-5, atol=1e-4)
    assert (q(x) - y).mean() > 0.99
    src = _layer(48, 64, spec, 5, bias=True)
    q.load_state_dict(src.state_dict())
    torch.testing.assert_close(q(x), src(x))
    q.scales = src.scales * 2  # replacing a buffer disarms the lean path
    assert q._fast is None
    with pytest.raises(ValueError, match="in_features=64"):
        q(torch.randn(2, 63))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        q(torch.randn(2, 64).double())
    monkeypatch.setenv("QUANTKERN_BACKEND", "reference")
    q(x)
    assert q.last_backend == "reference"


def test_fuse_quant_groups_on_model_keeps_logits():
    model = tiny_llama()
    q, _ = quantkern.quantize_model(model, None, QuantSpec(bits=4, group_size=32), method="gptq",
                                    calib=tiny_tokens(), progress=False, fuse=False)
    ids = tiny_tokens(2, 12, seed=3)
    want = _logits(q, ids)
    groups = fuse_quant_groups(q)
    assert len(groups) == 2 * 2  # per block: q/k/v and gate/up
    torch.testing.assert_close(_logits(q, ids), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # decode with the KV cache, greedy: same tokens fused or not
        fused_out = q.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        unfuse_quant_groups(q)
        plain_out = q.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fused_out, plain_out)


@pytest.fixture(scope="module")
def head_quantized():
    fp = tiny_llama(tie=True)
    model, report = quantkern.quantize_model(copy.deepcopy(fp), None, QuantSpec(bits=4, group_size=32),
                                             method="snrq", calib=tiny_tokens(), progress=False, quantize_lm_head=True)
    return fp, model, report


def test_lm_head_quantized_and_untied(head_quantized):
    fp, model, report = head_quantized
    assert isinstance(model.lm_head, QuantLinear) and model.config.tie_word_embeddings is False
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb, fp.get_input_embeddings().weight, rtol=0, atol=0)  # table kept in float
    assert report.modules[-1]["module"] == "lm_head" and report.modules[-1]["layer"] is None
    assert "lm_head" in model.quantkern_info["modules"]
    ids = tiny_tokens(2, 16, seed=4)
    assert torch.isfinite(_logits(model, ids)).all()


def test_lm_head_statistics_come_from_final_norm(head_quantized, monkeypatch):
    """The collector fed to lm_head's solve sees exactly norm(last block output) of the quantized stream."""
    fp = tiny_llama(tie=True)
    seen = {}
    from quantkern.models import driver

    orig = driver._quantize_lm_head

    def spy(model, name, run, inps, fp_inps):
        seen["x"] = [model.model.norm(x) for x in inps]
        seen["fp"] = fp_inps
        return orig(model, name, run, inps, fp_inps)

    monkeypatch.setattr(driver, "_quantize_lm_head", spy)
    calib = tiny_tokens()
    q, _ = quantkern.quantize_model(copy.deepcopy(fp), None, QuantSpec(bits=4, group_size=32), method="gptq",
                                    calib=calib, progress=False, quantize_lm_head=True)
    assert seen["fp"] is None and len(seen["x"]) == calib.shape[0]
    # the captured inputs are what the quantized model's final norm emits before lm_head
    captured = []
    h = q.lm_head.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        q(input_ids=calib[:1], use_cache=False)
    h.remove()
    torch.testing.assert_close(captured[0], seen["x"][0], rtol=1e-4, atol=1e-4)


def test_lm_head_checkpoint_roundtrip(head_quantized, tmp_path):
    _, model, _ = head_quantized
    out = quantkern.save_quantized(model, tmp_path / "ck")
    qc = ckpt.read_quantize_config(out)
    assert qc["lm_head"] is True and "lm_head" in qc["meta"]["quantized_modules"]
    from safetensors.torch import load_file

    sd = load_file(str(out / "model.safetensors"))
    assert "lm_head.qweight" in sd and "model.embed_tokens.weight" in sd and "lm_head.weight" not in sd
    loaded = quantkern.load(out)
    assert isinstance(loaded.lm_head, QuantLinear)
    assert loaded.lm_head is not loaded.get_input_embeddings()
    ids = tiny_tokens(2, 16, seed=5)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    size = ckpt.checkpoint_size(out)
    head_bytes = sum(sd[f"lm_head.{k}"].numel() * sd[f"lm_head.{k}"].element_size() for k in gptq.TENSOR_NAMES)
    assert size["packed_linears"] >= head_bytes and size["other_tensors"] >= emb_bytes(sd)


def emb_bytes(sd):
    t = sd["model.embed_tokens.weight"]
    return t.numel() * t.element_size()


def test_lm_head_rtn_and_untied_model():
    fp = tiny_llama(tie=False)
    q, _ = quantkern.quantize_model(copy.deepcopy(fp), None, QuantSpec(bits=3, group_size=32), method="rtn",
                                    progress=False, quantize_lm_head=True)
    assert isinstance(q.lm_head, QuantLinear)
    w = q.lm_head.dequantized_weight()
    assert (w - fp.lm_head.weight).abs().max() < fp.lm_head.weight.abs().max()  # close, but quantized
    assert not torch.equal(w, fp.lm_head.weight)


# ------------------------------------------------------------------ default lm_head: 8-bit RTN on its own grid

@pytest.fixture(scope="module")
def default_head():
    fp = tiny_llama(tie=True)
    model, report = quantkern.quantize_model(copy.deepcopy(fp), None, QuantSpec(bits=4, group_size=32),
                                             method="gptq", calib=tiny_tokens(), progress=False)
    return fp, model, report


def test_default_lm_head_is_8bit_rtn(default_head):
    fp, model, report = default_head
    head = model.lm_head
    assert isinstance(head, QuantLinear) and (head.spec.bits, head.spec.group_size, head.spec.sym) == (8, 128, True)
    assert model.get_input_embeddings().weight.data_ptr() != fp.lm_head.weight.data_ptr()
    torch.testing.assert_close(model.get_input_embeddings().weight, fp.get_input_embeddings().weight, rtol=0, atol=0)
    # exactly RTN of the fp head on the 8-bit grid: the same codes quantkern.solve gives, error <= half a step
    ref = quantkern.solve(fp.lm_head.weight.data, None, head.spec, method="rtn")
    torch.testing.assert_close(head.dequantized_weight(), ref.dequantized, rtol=0, atol=0)
    step = head.scales.float().t().repeat_interleave(head.in_features, dim=1)[:, :head.in_features]  # one group
    w = fp.lm_head.weight.detach()  # scales are fp16-rounded: allow their rounding on top of half a step
    assert ((head.dequantized_weight() - w).abs() <= 0.5 * step + 1e-3 * w.abs().amax(1, keepdim=True)).all()
    assert report.modules[-1]["module"] == "lm_head" and model.quantkern_info["lm_head"]["mode"] == "rtn"
    assert all(r["module"] != "lm_head" for r in report.modules[:-1])


def test_default_lm_head_stored_float_and_rounded_at_load(default_head, tmp_path):
    """The rounded head goes to disk as the float (still tied) embedding, so every GPTQ reader loads a real
    head; quantkern rounds it again at load to the very same codes."""
    from safetensors.torch import load_file

    _, model, _ = default_head
    assert model.lm_head.float_source[0] is model.get_input_embeddings().weight  # no copy held
    out = quantkern.save_quantized(model, tmp_path / "ck")
    qc = ckpt.read_quantize_config(out)
    assert (qc["bits"], qc["group_size"], qc["lm_head"], qc["checkpoint_format"]) == (4, 32, False, "gptq")
    assert "dynamic" not in qc and "lm_head" not in qc["meta"]["quantized_modules"]
    assert qc["meta"]["lm_head_at_load"] == {"method": "rtn", **LM_HEAD_AUTO_SPEC.to_dict()}
    sd = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("lm_head.") for k in sd)  # tied: stored once, as the embedding
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    loaded = quantkern.load(out)
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.lm_head.spec == LM_HEAD_AUTO_SPEC
    assert loaded.model.layers[0].mlp.down_proj.spec.bits == 4
    for t in gptq.TENSOR_NAMES:
        assert torch.equal(getattr(loaded.lm_head, t), getattr(model.lm_head, t)), t
    ids = tiny_tokens(2, 16, seed=6)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    again = quantkern.save_quantized(loaded, tmp_path / "again")  # a loaded model saves the same files
    assert load_file(str(again / "model.safetensors")).keys() == sd.keys()


def test_rounded_head_of_an_untied_model_stored_float(tmp_path):
    from safetensors.torch import load_file

    fp = tiny_llama(tie=False)
    model, _ = quantkern.quantize_model(copy.deepcopy(fp), None, QuantSpec(bits=3, group_size=32), method="rtn",
                                        progress=False, lm_head=4)
    out = quantkern.save_quantized(model, tmp_path / "ck")
    sd = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(sd["lm_head.weight"], fp.lm_head.weight.detach(), rtol=0, atol=0)
    assert "lm_head.qweight" not in sd
    loaded = quantkern.load(out)
    assert loaded.lm_head.spec.bits == 4 and isinstance(loaded.lm_head, QuantLinear)
    ids = tiny_tokens(2, 16, seed=7)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)


def test_dynamic_override_that_contradicts_the_tensors_is_refused(head_quantized, tmp_path):
    _, model, _ = head_quantized
    out = quantkern.save_quantized(model, tmp_path / "ck")
    for name in ("quantize_config.json", "config.json"):
        cfg = json.loads((out / name).read_text())
        qc = cfg if name == "quantize_config.json" else cfg["quantization_config"]
        qc["dynamic"] = {r"+:^lm_head$": {"bits": 8}}  # the stored head is 4-bit
        (out / name).write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match="lm_head's packed tensors do not match"):
        quantkern.load(out, check=False)
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):  # and with checks on, the edit is caught first
        quantkern.load(out)


def test_module_spec_rules():
    body = QuantSpec(bits=4, group_size=64)
    qc = {"dynamic": {r"-:.*\.down_proj$": {}, r"+:.*\.layers\.1\..*": {"bits": 3, "desc_act": True},
                      r".*gate.*": {"bits": 8, "group_size": 128, "mse": 2.0}}}
    assert ckpt.module_spec(body, qc, "model.layers.0.mlp.down_proj") is None  # "-:" = not quantized
    assert ckpt.module_spec(body, qc, "model.layers.1.mlp.gate_proj") == body.replace(bits=3, act_order=True)  # first wins
    assert ckpt.module_spec(body, qc, "model.layers.0.mlp.gate_proj") == body.replace(bits=8, group_size=128)
    assert ckpt.module_spec(body, qc, "model.layers.0.self_attn.q_proj") == body
    assert ckpt.module_spec(body, {}, "anything") == body
    with pytest.raises(ckpt.CheckpointError, match="bad regex"):
        ckpt.module_spec(body, {"dynamic": {"+:([": {"bits": 8}}}, "x")
    with pytest.raises(ckpt.CheckpointError, match="dynamic"):
        ckpt.module_spec(body, {"dynamic": {"x": {"bits": 5}}}, "x")


def test_resolve_lm_head_choices():
    from quantkern.models.head import resolve_lm_head

    body = QuantSpec(bits=3, group_size=32)
    model = tiny_llama()
    assert resolve_lm_head("auto", body, model) == ("rtn", LM_HEAD_AUTO_SPEC)
    for fp in (None, False, "fp"):
        assert resolve_lm_head(fp, body, model) == ("fp", None)
    assert resolve_lm_head(True, body, model) == resolve_lm_head("same", body, model) == ("same", body)
    assert resolve_lm_head(4, body, model) == ("rtn", QuantSpec(bits=4, group_size=128))
    assert resolve_lm_head(body.replace(bits=2), body, model) == ("rtn", body.replace(bits=2))

    class NoLinearHead(nn.Module):
        def get_output_embeddings(self):
            return None

    assert resolve_lm_head("auto", body, NoLinearHead()) == ("fp", None)
    with pytest.raises(ValueError, match="lm_head"):
        resolve_lm_head("bf16", body, model)
    with pytest.raises(ValueError):
        resolve_lm_head(5, body, model)
