"""Checkpoint format: GPTQ keys and config, manifest, atomic save, corruption refused (tiny random Llama)."""
import json
import re

import pytest
import torch

from driver_tiny import tiny_llama, tiny_tokens

import quantkern
from quantkern.formats import gptq
from quantkern.models import checkpoint as ckpt
from quantkern.nn import QuantLinear
from quantkern.spec import QuantSpec

GPTQ_KEYS = {"bits", "group_size", "desc_act", "sym", "static_groups", "damp_percent", "true_sequential",
             "quant_method", "checkpoint_format", "pack_dtype", "meta"}


@pytest.fixture(scope="module")
def quantized():
    model = tiny_llama()
    spec = QuantSpec(bits=4, group_size=32)
    model, report = quantkern.quantize_model(model, None, spec, method="gptq", calib=tiny_tokens(), progress=False,
                                             lm_head=None)  # float, tied head: the tie must survive save/load
    return model, report


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_quantized_modules_replaced(quantized):
    model, report = quantized
    q = ckpt.quant_modules(model)
    assert len(q) == 2 * 7 and all(isinstance(m, QuantLinear) for m in q.values())
    assert len(report.modules) == 14 and all(r["damp"] > 0 for r in report.modules)
    assert "lm_head" not in q


def test_config_keys_and_manifest(quantized, tmp_path):
    model, _ = quantized
    out = quantkern.save_quantized(model, tmp_path / "ck")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert GPTQ_KEYS <= set(qc)
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["quant_method"], qc["checkpoint_format"], qc["pack_dtype"]) == (
        4, 32, True, "gptq", "gptq", "int32")
    assert qc["desc_act"] is False
    meta = qc["meta"]
    assert meta["quantizer"] == "quantkern" and meta["quantizer_version"] == quantkern.__version__
    assert meta["method"] == "gptq" and meta["zero_point_convention"] == "v1 (stored zero-1)"
    assert len(meta["modules"]) == 14 and all("damp" in v and "fallback" in v for v in meta["modules"].values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 4 and cfg["quantization_config"]["quant_method"] == "gptq"
    man = json.loads((out / ckpt.MANIFEST).read_text())
    assert set(man["files"]) == {p.name for p in out.iterdir()} - {ckpt.MANIFEST}
    from safetensors.torch import load_file

    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    assert sd[name + ".qweight"].dtype == torch.int32 and sd[name + ".qweight"].shape == (64 * 4 // 32, 64)
    assert sd[name + ".qzeros"].shape == (2, 64 * 4 // 32) and sd[name + ".scales"].dtype == torch.float16
    assert sd[name + ".g_idx"].dtype == torch.int32 and name + ".weight" not in sd
    assert "model.embed_tokens.weight" in sd and "lm_head.weight" not in sd  # tied: stored once
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_roundtrip_logits_equal(quantized, tmp_path):
    model, _ = quantized
    out = quantkern.save_quantized(model, tmp_path / "ck")
    loaded = quantkern.load(out)
    assert len(ckpt.quant_modules(loaded)) == 14
    ids = tiny_tokens(2, 24, seed=5)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_corrupted_file_refused(quantized, tmp_path):
    model, _ = quantized
    out = quantkern.save_quantized(model, tmp_path / "ck")
    w = out / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors.*sha256"):
        quantkern.load(out)
    w.write_bytes(bytes(data[:-10]))
    with pytest.raises(ckpt.CheckpointError, match="bytes"):
        quantkern.load(out)


def test_interrupted_save_keeps_old(quantized, tmp_path, monkeypatch):
    model, _ = quantized
    out = quantkern.save_quantized(model, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = ckpt._write_weights

    def half_then_fail(tmp, tensors, metadata, max_shard_size):
        real(tmp, tensors, metadata, max_shard_size)
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(ckpt, "_write_weights", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        quantkern.save_quantized(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp dirs left behind
    quantkern.load(out)  # still loads and verifies


def test_unquantized_model_refused(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="quantize_model"):
        quantkern.save_quantized(tiny_llama(), tmp_path / "x")


GPTQ_BASE = {"bits": 4, "group_size": 128}


@pytest.mark.parametrize("extra,field", [
    ({"quant_method": "awq"}, "quant_method='awq'"),
    ({"method": "awq"}, "method='awq'"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
    ({"format": "gptq_p"}, "format='gptq_p'"),
    ({"is_marlin_format": True}, "is_marlin_format=true"),
    ({"pack_dtype": "int16"}, "pack_dtype='int16'"),
    ({"bits": 5}, "bits=5"),
    ({"bits": "4"}, "bits='4'"),
    ({"group_size": 0}, "group_size=0"),
    ({"group_size": None}, "group_size=None"),
])
def test_config_quantkern_cannot_read_is_refused_by_field(extra, field):
    with pytest.raises(ckpt.CheckpointError, match=re.escape(field)):
        ckpt.spec_from_config({**GPTQ_BASE, **extra})


@pytest.mark.parametrize("qcfg,fmt", [
    ({}, "gptq"),  # old AutoGPTQ: no quant_method, no checkpoint_format
    ({"quant_method": "gptq", "checkpoint_format": "gptq"}, "gptq"),  # AutoGPTQ / transformers
    ({"method": "gptq", "format": "gptq_v2", "pack_dtype": "int32"}, "gptq_v2"),  # GPTQModel's own keys
    ({"quant_method": "gptq", "checkpoint_format": "gptq_v2", "sym": False, "desc_act": True}, "gptq_v2"),
    ({"quant_method": "gptq", "pack_dtype": "torch.int32", "is_marlin_format": False}, "gptq"),
])
def test_config_variants_in_use_are_read(qcfg, fmt):
    from quantkern.formats.gptq_config import checkpoint_format

    qcfg = {**GPTQ_BASE, **qcfg}
    assert checkpoint_format(qcfg) == fmt
    spec = ckpt.spec_from_config(qcfg)
    assert (spec.bits, spec.group_size, spec.sym, spec.act_order) == (4, 128, qcfg.get("sym", True),
                                                                      qcfg.get("desc_act", False))


@pytest.mark.parametrize("bits,act_order", [(4, False), (3, True)])
def test_asymmetric_checkpoint_is_gptq_v2_and_exact(tmp_path, bits, act_order):
    """Asymmetric checkpoints are written as gptq_v2 (GPTQModel refuses asymmetric v1 from other writers);
    the stored zeros are the true zero points and the reload is exact."""
    from safetensors.torch import load_file

    from quantkern.formats import bitstream

    model, _ = quantkern.quantize_model(tiny_llama(), None, QuantSpec(bits=bits, group_size=32, sym=False,
                                                                      act_order=act_order),
                                        method="gptq", calib=tiny_tokens(), progress=False)
    out = quantkern.save_quantized(model, tmp_path / "ck")
    qc = ckpt.read_quantize_config(out)
    assert qc["checkpoint_format"] == "gptq_v2" and qc["meta"]["zero_point_convention"] == "v2 (stored zero)"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    sd = load_file(str(out / "model.safetensors"))
    q = model.model.layers[1].mlp.down_proj
    _, _, zeros, _ = gptq.unpack({t: getattr(q, t) for t in gptq.TENSOR_NAMES}, bits)
    stored = bitstream.unpack_dim0(sd["model.layers.1.mlp.down_proj.qzeros"].t().contiguous(), bits, q.out_features)
    assert torch.equal(stored.t().to(torch.int32), zeros) and not torch.equal(
        sd["model.layers.1.mlp.down_proj.qzeros"], q.qzeros)  # v2 on disk, v1 in memory
    loaded = quantkern.load(out)
    for t in gptq.TENSOR_NAMES:
        assert torch.equal(getattr(loaded.model.layers[1].mlp.down_proj, t), getattr(q, t)), t
    ids = tiny_tokens(2, 16, seed=3)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)


def test_foreign_v2_zero_point_zero_refused(tmp_path):
    """A GPTQModel v2 checkpoint may hold a zero point of 0, which quantkern's v1 kernels cannot: a clear
    error naming the module, not wrong weights."""
    from safetensors.torch import load_file, save_file

    from quantkern.formats import bitstream

    model, _ = quantkern.quantize_model(tiny_llama(), None, QuantSpec(bits=4, group_size=32, sym=False),
                                        method="rtn", progress=False, lm_head=None)
    out = quantkern.save_quantized(model, tmp_path / "ck")
    sd = load_file(str(out / "model.safetensors"))
    key = "model.layers.0.self_attn.o_proj.qzeros"
    z = bitstream.unpack_dim0(sd[key].t().contiguous(), 4, 64)
    z[3, 0] = 0
    sd[key] = bitstream.pack_dim0(z, 4).t().contiguous()
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match=r"o_proj: a zero point of 0 cannot be stored as 'gptq'"):
        quantkern.load(out, check=False)


def test_inspect_counts_modules_in_the_files(quantized, tmp_path):
    """inspect counts what the files hold, also for a checkpoint without quantkern's meta (another writer)."""
    from quantkern import cli

    model, _ = quantized
    out = quantkern.save_quantized(model, tmp_path / "ck")
    for name in ("quantize_config.json", "config.json"):
        cfg = json.loads((out / name).read_text())
        qc = cfg if name == "quantize_config.json" else cfg["quantization_config"]
        qc["meta"] = {"quantizer": ["gptqmodel:7.6.0"]}
        (out / name).write_text(json.dumps(cfg))
    info = cli.inspect_checkpoint(out)
    assert info["quantized_modules"] == 14 and info["lm_head"] == "float (not quantized)"
    assert info["loads_in (tests/interop)"]["GPTQModel"].startswith("yes")


def test_sharded_checkpoint_roundtrip_and_missing_shard(quantized, tmp_path):
    """Shards with transformers' index: every tensor in exactly one shard, a reload equal to the model, and a
    missing shard refused by name (with and without the manifest check)."""
    model, _ = quantized
    out = quantkern.save_quantized(model, tmp_path / "ck", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert sorted(ckpt.checkpoint_tensor_names(out)) == sorted(index["weight_map"])
    ids = tiny_tokens(2, 16, seed=4)
    torch.testing.assert_close(_logits(quantkern.load(out), ids), _logits(model, ids), rtol=0, atol=0)
    (out / shards[1]).unlink()
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"shard {shards[1]} named in")):
        quantkern.load(out, check=False)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{shards[1]} listed in the manifest is missing")):
        quantkern.load(out)
