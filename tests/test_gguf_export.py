"""GGUF export (quantkern.export.gguf): read the file back with gguf's own reader and dequantizer and
compare with quantkern's dequantized weights. Tiny random Llama, CPU, seconds."""
import os

import gguf
import numpy as np
import pytest
import torch

from driver_tiny import tiny_hf_tokenizer, tiny_llama, tiny_tokens

import quantkern
from quantkern.export import ggml_blocks
from quantkern.export.gguf import ExportError, export_gguf, module_grid
from quantkern.export.gguf_vocab import BpeVocab
from quantkern.nn import QuantLinear
from quantkern.spec import QuantSpec

T = gguf.GGMLQuantizationType
CASES = {  # name: (spec, method, lm_head, GGUF type of the body linears)
    "q4_0": (QuantSpec(bits=4, group_size=32), "gptq", "auto", T.Q4_0),
    "q4_0_g64": (QuantSpec(bits=4, group_size=64), "rtn", "auto", T.Q4_0),
    "q4_0_static_actorder": (QuantSpec(bits=4, group_size=32, act_order=True, static_groups=True), "gptq", "auto",
                             T.Q4_0),
    "q8_0": (QuantSpec(bits=8, group_size=32), "rtn", None, T.Q8_0),
    "q4_1": (QuantSpec(bits=4, group_size=32, sym=False), "gptq", "auto", T.Q4_1),
}


def _checkpoint(tmp_path_factory, name, spec, method, lm_head):
    model = tiny_llama(seed=1)
    model, _ = quantkern.quantize_model(model, None, spec, method=method, calib=tiny_tokens(), progress=False,
                                        lm_head=lm_head)
    return quantkern.save_quantized(model, tmp_path_factory.mktemp(name) / "ck", tokenizer=tiny_hf_tokenizer())


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    spec, method, lm_head, qtype = CASES[request.param]
    ck = _checkpoint(tmp_path_factory, request.param, spec, method, lm_head)
    out = ck.parent / "model.gguf"
    report = export_gguf(ck, out, tokenizer_pre="default")
    return ck, out, report, qtype


def _converter_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf row order for q/k, written as its reshape/swap (independent of ours)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read(out):
    r = gguf.GGUFReader(out)
    return r, {t.name: t for t in r.tensors}


def _gguf_name(name):
    from quantkern.export.gguf_llama import tensor_name

    return tensor_name(name + ".weight", 2)


def test_linears_dequantize_exactly(exported):
    ck, out, report, qtype = exported
    _, tensors = _read(out)
    model = quantkern.load(ck, fuse=False)
    cfg = model.config
    seen = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        t = tensors[_gguf_name(name)]
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        want = mod.dequantized_weight()
        if name.endswith("q_proj"):
            want = _converter_permute(want, cfg.num_attention_heads)
        elif name.endswith("k_proj"):
            want = _converter_permute(want, cfg.num_key_value_heads)
        assert got.shape == want.shape, name
        if name == "lm_head":  # the default head: 8-bit RTN, symmetric, group 128 -> Q8_0
            assert t.tensor_type == T.Q8_0
            assert torch.equal(got, want), name
        elif t.tensor_type in (T.Q4_0, T.Q8_0):
            assert t.tensor_type == qtype, name
            assert torch.equal(got, want), name  # bit for bit
        else:
            assert t.tensor_type == T.Q4_1 == qtype, name
            _, scales, zeros, g_idx = (x.cpu() for x in module_grid(mod))
            bound = ggml_blocks.q4_1_bound(scales[g_idx.long()].t(), zeros[g_idx.long()].t())
            if name.endswith(("q_proj", "k_proj")):
                bound = _converter_permute(bound, cfg.num_attention_heads if name.endswith("q_proj")
                                           else cfg.num_key_value_heads)
            err = (got - want).abs()
            assert (err <= bound).all(), (name, (err - bound).max().item())
            step = scales[g_idx.long()].t().float()
            assert (err / step).max() < 15 / 2048 + 1e-5  # under 0.74% of one quantization step
        seen += 1
    assert seen == 14 + (model.get_output_embeddings().__class__ is QuantLinear)
    assert report["not_bit_exact"] == ([n for n in tensors if n.startswith("blk.") and tensors[n].tensor_type == T.Q4_1])


def test_float_tensors_and_tie(exported):
    ck, out, _, _ = exported
    _, tensors = _read(out)
    model = quantkern.load(ck, fuse=False)
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == T.F32
    assert torch.equal(torch.from_numpy(np.array(emb.data)).reshape(256, 64), model.model.embed_tokens.weight)
    for i, layer in enumerate(model.model.layers):
        assert torch.equal(torch.from_numpy(np.array(tensors[f"blk.{i}.attn_norm.weight"].data)),
                           layer.input_layernorm.weight.detach())
        assert torch.equal(torch.from_numpy(np.array(tensors[f"blk.{i}.ffn_norm.weight"].data)),
                           layer.post_attention_layernorm.weight.detach())
    assert torch.equal(torch.from_numpy(np.array(tensors["output_norm.weight"].data)), model.model.norm.weight.detach())
    # a float head tied to the embedding is left out (llama.cpp reads token_embd), as the converter does
    assert ("output.weight" in tensors) == isinstance(model.lm_head, QuantLinear)
    assert len(tensors) == 2 * 9 + 2 + ("output.weight" in tensors)


def test_metadata_llama_cpp_needs(exported):
    _, out, report, qtype = exported
    r, _ = _read(out)
    f = {k: v.contents() for k, v in r.fields.items()}
    want = {"general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 256,
            "llama.embedding_length": 64, "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 10000.0, "llama.rope.dimension_count": 16,
            "llama.vocab_size": 256, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
            "general.quantization_version": 2, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 0,
            "tokenizer.ggml.add_bos_token": False}  # as the HF tokenizer: it prepends no BOS
    assert {k: f.get(k) for k in want} == want
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    ftype = {T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
             T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    assert f["general.file_type"] == ftype and report["file_type"] == ftype.name
    tok = tiny_hf_tokenizer()
    vocab = tok.get_vocab()
    assert f["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert len(f["tokenizer.ggml.token_type"]) == 256


@pytest.fixture(scope="module")
def refused_cases(tmp_path_factory):
    return {
        "3bit": (_checkpoint(tmp_path_factory, "r3", QuantSpec(bits=3, group_size=32), "rtn", None), "--bits 4"),
        "8bit_asym": (_checkpoint(tmp_path_factory, "r8a", QuantSpec(bits=8, group_size=32, sym=False), "rtn", None),
                      "--bits 8 --group-size 32 (no --asym)"),
        "act_order": (_checkpoint(tmp_path_factory, "rao", QuantSpec(bits=4, group_size=32, act_order=True), "gptq",
                                  None), "without --act-order"),
        "group16": (_checkpoint(tmp_path_factory, "r16", QuantSpec(bits=4, group_size=16), "rtn", None),
                    "--group-size 32"),
    }


@pytest.mark.parametrize("case", ["3bit", "8bit_asym", "act_order", "group16"])
def test_refused_before_writing(refused_cases, case):
    ck, fix = refused_cases[case]
    out = ck.parent / f"{case}.gguf"
    before = set(os.listdir(ck.parent))
    with pytest.raises(ExportError) as e:
        export_gguf(ck, out, tokenizer_pre="default")
    assert fix in str(e.value) and "model.layers.0" in str(e.value)
    assert set(os.listdir(ck.parent)) == before  # no file, no temp file


def test_refusal_leaves_good_file(refused_cases):
    ck, _ = refused_cases["3bit"]
    out = ck.parent / "good.gguf"
    out.write_bytes(b"a good file")
    with pytest.raises(ExportError):
        export_gguf(ck, out, tokenizer_pre="default")
    assert out.read_bytes() == b"a good file"


def test_interrupted_write_leaves_no_partial_file(exported, monkeypatch):
    ck, _, _, _ = exported
    out = ck.parent / "interrupted.gguf"
    out.write_bytes(b"previous export")

    def half_then_interrupt(self, *a, **k):
        self.fout[0].write(b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half_then_interrupt)
    before = set(os.listdir(ck.parent))
    with pytest.raises(KeyboardInterrupt):
        export_gguf(ck, out, tokenizer_pre="default")
    assert out.read_bytes() == b"previous export"
    assert set(os.listdir(ck.parent)) == before


def test_head_and_embedding_types(tmp_path):
    ck = quantkern.save_quantized(
        quantkern.quantize_model(tiny_llama(seed=2), None, QuantSpec(bits=4, group_size=32), method="rtn",
                                 calib=tiny_tokens(), progress=False, lm_head=None)[0],
        tmp_path / "ck", tokenizer=tiny_hf_tokenizer())
    out = tmp_path / "m.gguf"
    export_gguf(ck, out, embed_type="q8_0", head_type="f16", tokenizer_pre="default")
    _, tensors = _read(out)
    assert tensors["token_embd.weight"].tensor_type == T.Q8_0
    assert tensors["output.weight"].tensor_type == T.F16  # asked for: written although tied
    model = quantkern.load(ck, fuse=False)
    emb = model.model.embed_tokens.weight.detach().numpy()
    t = tensors["token_embd.weight"]
    assert np.array_equal(gguf.quants.dequantize(t.data, T.Q8_0),
                          gguf.quants.dequantize(gguf.quants.quantize(emb, T.Q8_0), T.Q8_0))


def test_quantized_head_no_twin_names_head_type(tmp_path):
    model, _ = quantkern.quantize_model(tiny_llama(seed=3), None, QuantSpec(bits=4, group_size=32), method="rtn",
                                        calib=tiny_tokens(), progress=False, lm_head=3)
    ck = quantkern.save_quantized(model, tmp_path / "ck", tokenizer=tiny_hf_tokenizer())
    with pytest.raises(ExportError, match="--head-type f32"):
        export_gguf(ck, tmp_path / "m.gguf", tokenizer_pre="default")
    export_gguf(ck, tmp_path / "m.gguf", head_type="f32", tokenizer_pre="default")
    _, tensors = _read(tmp_path / "m.gguf")
    head = quantkern.load(ck, fuse=False).lm_head
    got = torch.from_numpy(np.array(tensors["output.weight"].data)).reshape(256, 64)
    assert torch.equal(got, head.dequantized_weight())


def test_unknown_pre_tokenizer_refused(exported):
    ck = exported[0]
    with pytest.raises(ValueError, match="--tokenizer-pre"):
        BpeVocab(ck, 256)


def test_llama3_rope_freqs_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from quantkern.export.gguf_llama import extra_tensors

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      num_hidden_layers=1, vocab_size=32, max_position_embeddings=131072, rope_parameters=rope)
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    got = extra_tensors(cfg)["rope_freqs.weight"].double()
    torch.testing.assert_close(got, base / inv.double(), rtol=1e-5, atol=0)


def test_cli_export(exported, capsys):
    from quantkern.cli import main

    ck, _, _, _ = exported
    out = ck.parent / "cli.gguf"
    assert main(["export", "--gguf", str(out), str(ck), "--tokenizer-pre", "default"]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out
    assert main(["export", "--gguf", str(ck.parent / "x.gguf"), str(ck)]) == 2
    assert "--tokenizer-pre" in capsys.readouterr().err and not (ck.parent / "x.gguf").exists()


def test_transformers_reads_the_gguf_back(exported):
    """An independent reader: transformers' GGUF loader (its own names, dequantizer and q/k un-permutation)
    rebuilds the model; its weights equal quantkern's dequantized weights and its logits match."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ck, out, _, qtype = exported
    cfg = AutoConfig.from_pretrained(out.parent, gguf_file=out.name)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (2, 64, 2)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    sd = load_gguf_checkpoint(str(out), return_tensors=True, model_to_load=meta, torch_dtype=torch.float32)["tensors"]
    ref = quantkern.load(ck, fuse=False)
    for name, mod in ref.named_modules():
        if isinstance(mod, QuantLinear):
            got, want = torch.as_tensor(sd[name + ".weight"]).float(), mod.dequantized_weight()
            if qtype == T.Q4_1:  # exact up to m = fp16(-d*zero): 2^-11 |d*zero| <= 15/2048 d, plus fp32 rounding
                bound = 16 / 2048 * mod.scales.float().max()
                assert (got - want).abs().max() <= bound, name
            else:
                assert torch.equal(got, want), name
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    res = hf.load_state_dict({k: torch.as_tensor(v).float() for k, v in sd.items()}, strict=False)
    assert set(res.missing_keys) <= {"lm_head.weight"} and not res.unexpected_keys
    hf.tie_weights()
    ids = tiny_tokens(2, 16, seed=7)
    with torch.no_grad():
        a = hf(input_ids=ids).logits
        b = ref(input_ids=ids).logits
    if qtype == T.Q4_1:  # weights move by up to 15/2048 of a step: logits by a few 1e-3 of their range
        assert float((a - b).abs().max() / b.abs().max()) <= 5e-3
    else:
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_smollm2_vocab_matches_llama_cpp_converter(tmp_path):
    """The shipped SmolLM2 GGUF was written by llama.cpp's converter: our tokenizer.ggml.* from the same
    tokenizer (round-tripped through transformers) must equal it, the pre-tokenizer found by its hash."""
    from transformers import AutoTokenizer

    from quantkern.models.zoo import _gguf_path

    ref_path = _gguf_path()  # the built-in model's file; a clear MissingDataError if not installed
    AutoTokenizer.from_pretrained(ref_path.parent, gguf_file=ref_path.name).save_pretrained(tmp_path)
    ref = {k: v.contents() for k, v in gguf.GGUFReader(ref_path).fields.items() if k.startswith("tokenizer.")}
    w = gguf.GGUFWriter(None, "llama")
    BpeVocab(tmp_path, 49152).add_to(w)
    ours = {k: v.value for k, v in w.kv_data[0].items() if k.startswith("tokenizer.")}
    ours["tokenizer.ggml.token_type"] = [int(t) for t in ours["tokenizer.ggml.token_type"]]
    assert ours["tokenizer.ggml.pre"] == "smollm"
    for k in sorted(set(ref) - {"tokenizer.ggml.add_space_prefix"}):
        assert ours.get(k) == ref[k], k


def _qargs(*extra):
    from quantkern import cli

    return cli.spec_from_args(cli.build_parser().parse_args(["quantize", "--output", "o", *extra]))


def test_gguf_type_presets():
    assert _qargs("--gguf-type", "Q4_0") == QuantSpec(bits=4, group_size=32, sym=True)
    assert _qargs("--gguf-type", "Q4_1") == QuantSpec(bits=4, group_size=32, sym=False)
    assert _qargs("--gguf-type", "Q8_0") == QuantSpec(bits=8, group_size=32, sym=True)
    assert _qargs("--gguf-type", "Q4_0", "--group-size", "64").group_size == 64  # a multiple of 32 is exact too
    spec = _qargs("--gguf-type", "Q4_0", "--act-order", "--static-groups")
    assert spec.act_order and spec.static_groups and spec.group_size == 32
    for bad, why in ((["--bits", "3"], "drop --bits 3"), (["--asym"], "drop --asym"),
                     (["--group-size", "48"], "multiple of 32"), (["--act-order"], "--static-groups")):
        with pytest.raises(ValueError, match=why):  # quantize turns it into a one-line error before any work
            _qargs("--gguf-type", "Q4_0", *bad)
    from quantkern.export.gguf_presets import reorders_groups

    assert reorders_groups("snrq", {}) and reorders_groups("yaqa", {"grid_from": "snrq"})
    assert reorders_groups("gptq", {}) is None and reorders_groups("yaqa", {}) is None


def test_quantize_gguf_type_then_export(tmp_path, capsys):
    import json

    from driver_tiny import tiny_model_dir

    from quantkern import cli

    src = tiny_model_dir(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    common = ["--model", str(src), "--nsamples", "2", "--seqlen", "32", "--calib", str(tmp_path / "calib.txt"),
              "--quiet"]
    with pytest.raises(SystemExit, match="--method gptq"):
        cli.main(["quantize", "--method", "snrq", "--gguf-type", "Q4_0", "--output", str(tmp_path / "x"), *common])
    assert not (tmp_path / "x").exists()
    out = tmp_path / "q"
    assert cli.main(["quantize", "--method", "gptq", "--gguf-type", "Q4_1", "--output", str(out), *common]) == 0
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["meta"]["gguf_type"]) == (4, 32, False, "Q4_1")
    assert cli.main(["export", "--gguf", str(tmp_path / "m.gguf"), str(out), "--tokenizer-pre", "default"]) == 0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert {types[n] for n in types if n.startswith("blk.") and "norm" not in n} == {T.Q4_1}
    assert types["output.weight"] == T.Q8_0
