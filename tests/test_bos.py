"""BOS follows the tokenizer: calibration samples and evaluation windows start with BOS where the tokenizer
prepends it by default, and nothing changes where it does not; --bos/--no-bos override; recorded in the meta."""
import warnings

import pytest
import torch

from driver_tiny import tiny_hf_tokenizer, tiny_llama

import quantkern
from quantkern import cli
from quantkern.calibration.data import _encode, calibration_samples, resolve_bos, tokenizer_adds_bos
from quantkern.eval.perplexity import perplexity, windows
from quantkern.models import driver
from quantkern.spec import QuantSpec

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 20


def bos_tokenizer():
    """The byte-level tokenizer with a <s> token its post-processor prepends (as Llama's does)."""
    from tokenizers import processors

    tok = tiny_hf_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tok


def test_tokenizer_convention_detected():
    tok, plain = bos_tokenizer(), tiny_hf_tokenizer()
    assert tok("x").input_ids[0] == tok.bos_token_id == 256  # the first id after the 256 byte symbols
    assert tokenizer_adds_bos(tok) and not tokenizer_adds_bos(plain)
    assert resolve_bos(tok, None) == 256 and resolve_bos(plain, None) is None
    assert resolve_bos(tok, False) is None
    with pytest.raises(ValueError, match="no bos_token_id"):
        resolve_bos(plain, True)


def test_calibration_samples_start_with_bos_only_where_the_tokenizer_does():
    tok = bos_tokenizer()
    text_ids = _encode(tok, TEXT)
    assert 256 not in text_ids
    s = calibration_samples(tok, [TEXT], nsamples=4, seqlen=24, seed=3)
    assert s.shape == (4, 24) and (s[:, 0] == 256).all() and not (s[:, 1:] == 256).any()
    joined = " ".join(map(str, text_ids))
    for row in s[:, 1:].tolist():  # the other 23 tokens are one contiguous stretch of the text
        assert " ".join(map(str, row)) in joined
    # without BOS the very same sampler gives the same text windows, one token longer
    plain = calibration_samples(tok, [TEXT], nsamples=4, seqlen=23, seed=3, bos=False)
    assert torch.equal(s[:, 1:], plain)
    s_plain_tok = calibration_samples(tiny_hf_tokenizer(), [TEXT], nsamples=4, seqlen=24, seed=3)
    assert torch.equal(s_plain_tok, calibration_samples(tiny_hf_tokenizer(), [TEXT], 4, 24, 3, bos=None))
    assert not (s_plain_tok == 256).any()


def test_evaluation_windows_start_with_bos():
    doc = torch.arange(3, 103)  # 100 text tokens
    w = windows([doc], 16, bos_id=256)
    assert len(w) == 100 // 15 and all(x.numel() == 16 and int(x[0]) == 256 for x in w)
    assert torch.equal(torch.cat([x[1:] for x in w]), doc[:len(w) * 15])  # no text skipped, none repeated
    assert torch.equal(torch.cat(windows([doc], 16)), doc[:96])  # no BOS: unchanged protocol
    model = tiny_llama()
    model.resize_token_embeddings(257)
    r = perplexity(model, [doc], 16, bos_id=256)
    assert r["bos"] and r["tokens"] == len(w) * 15  # BOS is context, never a scored target


def test_quantize_records_bos_and_uses_it(tmp_path, monkeypatch):
    tok = bos_tokenizer()
    model = tiny_llama()
    model.resize_token_embeddings(257)
    seen = []
    real = driver._layer_loop

    def spy(model, blocks, chosen, samples, run, through_all=False):
        seen.append(samples.clone())
        return real(model, blocks, chosen, samples, run, through_all)

    monkeypatch.setattr(driver, "_layer_loop", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, _ = quantkern.quantize_model(model, tok, QuantSpec(bits=4, group_size=32), method="gptq", calib=[TEXT],
                                        nsamples=3, seqlen=20, progress=False)
    assert (seen[0][:, 0] == 256).all()
    quantkern.save_quantized(q, tmp_path / "ck", tokenizer=tok)
    meta = quantkern.load(tmp_path / "ck").quantkern_info["quantize_config"]["meta"]
    assert meta["calibration"] == {"bos": True, "bos_token_id": 256, "tokens": "text"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q2, _ = quantkern.quantize_model(tiny_llama(), tiny_hf_tokenizer(), QuantSpec(bits=4, group_size=32),
                                         method="gptq", calib=[TEXT], nsamples=3, seqlen=20, progress=False)
    assert not (seen[1] == 256).any() and q2.quantkern_info["calibration"]["bos"] is False


def test_cli_bos_flags():
    p = cli.build_parser()
    base = ["quantize", "--model", "m", "--output", "o"]
    assert p.parse_args(base).bos is None
    assert p.parse_args(base + ["--bos"]).bos is True
    assert p.parse_args(base + ["--no-bos"]).bos is False
    assert p.parse_args(["eval", "--no-bos"]).bos is False
