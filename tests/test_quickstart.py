"""First contact (issue 21): the README's quickstart on a model directory built here, run exactly as written,
and what each long command prints: a summary with its fields by default, per-module rows only with
--verbose, only the result with --quiet, and no control characters when the output is not a terminal."""
import json
import re

import pytest

from driver_tiny import tiny_hf_tokenizer, tiny_llama

from quantkern import cli

ROW = re.compile(r"^\s+layer\s+(\d+|-)\s+\S+\s+loss", re.M)  # a per-module row (models/driver.py _Run.record)
SUMMARY_FIELDS = ("model", "settings", "calibration", "time", "peak memory", "size", "safety net", "loads in",
                  "module log")


@pytest.fixture(scope="module")
def my_model(tmp_path_factory):
    """'./my-model': a transformers directory (config, safetensors, tokenizer) with 128-wide inputs so the
    quickstart's default group size (128) fits."""
    d = tmp_path_factory.mktemp("quickstart") / "my-model"
    tiny_llama(hidden=128, inter=256).save_pretrained(d)
    tiny_hf_tokenizer().save_pretrained(d)
    return d


def _clean(text: str) -> None:
    assert "\r" not in text and "\x1b" not in text, "control characters in non-terminal output"


def _summary(out: str) -> dict:
    lines = out[out.index("\nquantized\n") + len("\nquantized\n"):].splitlines()
    return {ln.strip().split("  ")[0]: ln.strip().split("  ", 1)[1].strip() for ln in lines if ln.strip()}


def test_readme_quickstart(my_model, capsys):
    """quantize (the README's exact arguments) -> eval --fp -> generate."""
    q4 = my_model.parent / "my-model-q4"
    assert cli.main(["quantize", "--model", str(my_model), "--bits", "4", "--output", str(q4)]) == 0
    out, err = capsys.readouterr()
    _clean(out + err)
    s = _summary(out)
    assert tuple(s) == SUMMARY_FIELDS
    assert s["model"] == f"{my_model} -> {q4}"
    assert s["settings"].startswith("gptq, 4-bit, group 128, sym; lm_head 8-bit RTN g128")
    assert s["calibration"] == "32 x 512 tokens (shakespeare)"
    assert re.fullmatch(r"\d+(\.\d+)? MiB -> \d+(\.\d+)? MiB \(\d+\.\dx smaller\)", s["size"])
    assert s["safety net"].startswith("kept RTN for ") and s["safety net"].endswith(" of 15 modules")
    assert s["loads in"].startswith("quantkern yes, GPTQModel yes, transformers yes, vLLM yes")
    assert s["module log"].startswith(f"{q4 / 'quant_log.jsonl'} (15 rows")
    assert not ROW.search(out), "per-module rows without --verbose"
    assert len((q4 / "quant_log.jsonl").read_text().splitlines()) == 15  # the rows are in the log
    assert json.loads((q4 / "quantize_config.json").read_text())["meta"]["source"] == str(my_model.resolve())

    assert cli.main(["eval", "--model", str(q4), "--fp", "--max-tokens", "2048", "--seqlen", "256"]) == 0
    out, err = capsys.readouterr()
    _clean(out + err)
    lines = out.splitlines()
    assert lines[0].startswith(f"{q4}: perplexity ") and lines[1].startswith(f"{my_model.resolve()}: perplexity ")
    ppl_q, ppl_fp = (float(ln.split("perplexity ")[1].split()[0]) for ln in lines[:2])
    assert re.fullmatch(rf"quantized vs fp: {ppl_q:.3f} vs {ppl_fp:.3f} \([+-]\d+\.\d%\)", lines[2])

    assert cli.main(["generate", "--model", str(q4), "--prompt", "What is the capital of France?",
                     "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_quickstart_in_python(my_model, tmp_path):
    """The README's Python lines (calibration shortened), then generate on the loaded packed model."""
    import torch

    import quantkern
    from quantkern.models.zoo import load_fp

    model, tok = load_fp(str(my_model))
    report = quantkern.quantize(model, quantkern.GPTQ(bits=4, group_size=128), tokenizer=tok, nsamples=4, seqlen=64,
                                progress=False)
    quantkern.save_quantized(model, tmp_path / "q4", tokenizer=tok)
    qmodel = quantkern.load(tmp_path / "q4")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(qmodel.generate(ids, max_new_tokens=3, do_sample=False)[0, :3], ids[0])
    assert len(report.modules) == 15


def test_verbose_rows_and_quiet_path(my_model, tmp_path, capsys):
    common = ["quantize", "--model", str(my_model), "--bits", "4", "--nsamples", "4", "--seqlen", "64"]
    assert cli.main([*common, "--output", str(tmp_path / "v"), "--verbose"]) == 0
    out, err = capsys.readouterr()
    _clean(out + err)
    assert len(ROW.findall(out)) == 15 and "\nquantized\n" in out
    assert cli.main([*common, "--output", str(tmp_path / "q"), "-q"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / 'q'}\n"


def test_quiet_and_verbose_together_is_an_error(my_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--model", str(my_model), "--output", str(tmp_path / "o"), "-q", "-v"])
    assert "not allowed with" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_export_and_eval_quiet(my_model, tmp_path, capsys):
    """export prints its one-line summary (only the path with -q); eval -q prints only the perplexity line."""
    q = tmp_path / "g32"
    assert cli.main(["quantize", "--model", str(my_model), "--gguf-type", "Q4_0", "--nsamples", "4", "--seqlen", "64",
                     "--output", str(q), "-q"]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--gguf", str(tmp_path / "m.gguf"), str(q), "--tokenizer-pre", "llama-bpe"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'm.gguf'}  (") and "tensors" in out
    assert cli.main(["export", "--gguf", str(tmp_path / "n.gguf"), str(q), "--tokenizer-pre", "llama-bpe", "-q"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'n.gguf'}\n"
    assert cli.main(["eval", "--model", str(q), "--max-tokens", "1024", "--seqlen", "256", "-q"]) == 0
    out, err = capsys.readouterr()
    _clean(out + err)
    assert len(out.splitlines()) == 1 and out.startswith(f"{q}: perplexity ")


@pytest.mark.slow
def test_demo_output_is_short_and_complete(capsys):
    """`quantkern demo` (calibration and evaluation shortened): at most ~25 lines, the table's rows, both answers,
    what the perplexity gap means, and no per-module rows or control characters when not on a terminal."""
    assert cli.main(["demo", "--nsamples", "2", "--seqlen", "64", "--eval-tokens", "1024"]) == 0
    out, err = capsys.readouterr()
    _clean(out + err)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) <= 25, out
    assert not ROW.search(out)
    for field in ("perplexity (held out)", "checkpoint size", "decode tokens/s (batch 1)", "quantization",
                  "peak memory", "Q: What is the capital of France?", "Perplexity +"):
        assert field in out, field
    q = next(i for i, ln in enumerate(lines) if "Q: What is the capital of France?" in ln)
    fp_answer, q_answer = (ln.split() for ln in lines[q + 1:q + 3])
    assert fp_answer[0] == "fp32" and q_answer[0] == "quantized" and len(fp_answer) > 1 and len(q_answer) > 1
