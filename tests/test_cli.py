"""CLI: argument parsing, and quantize -> inspect -> eval -> generate on a tiny random Llama directory."""
import dataclasses
import json

import pytest

from driver_tiny import tiny_model_dir

import quantkern
from quantkern import cli
from quantkern.models.recipes import RECIPES

TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog, again and again." for i in range(300))


def test_quantize_arguments():
    a = cli.build_parser().parse_args(
        "quantize --model default --method snrq --bits 3 --group-size 64 --alpha 0.5 --k 4 --nsamples 8 "
        "--seqlen 128 --calib a.txt b.txt --act-order --asym --output out".split())
    assert (a.command, a.model, a.method, a.bits, a.group_size, a.nsamples, a.seqlen) == (
        "quantize", "default", "snrq", 3, 64, 8, 128)
    assert a.calib == ["a.txt", "b.txt"] and a.output == "out"
    spec = cli.spec_from_args(a)
    assert (spec.bits, spec.group_size, spec.sym, spec.act_order) == (3, 64, False, True)
    assert cli.method_kwargs_from_args(a) == {"alpha": 0.5, "K": 4}
    assert cli.config_from_args(a) == quantkern.SNRQ(bits=3, group_size=64, sym=False, act_order=True, alpha=0.5, K=4)


def test_method_options():
    parse = cli.build_parser().parse_args
    a = parse("quantize --method yaqa --option grid_from=snrq --option grid=guard --option out_damp=1.0 "
              "--option out_order=true --option grad_nsamples=null --output o".split())
    assert cli.method_kwargs_from_args(a) == {"grid_from": "snrq", "grid": "guard", "out_damp": 1.0,
                                             "out_order": True, "grad_nsamples": None}
    for bad in ("grid", "=3", "not-a-name=1"):
        with pytest.raises(SystemExit):
            parse(["quantize", "--option", bad, "--output", "o"])
    r = parse("quantize --recipe yaqa-guard --option out_damp=2 --bits 2 --output o".split())
    config = cli.config_from_args(r)
    assert config == dataclasses.replace(RECIPES["yaqa-guard"], bits=2, out_damp=2)
    assert config.grid == "guard" and config.grid_from == "snrq" and config.out_damp == 2
    assert cli.config_from_args(parse("quantize --method snrq --k 2 --output o".split())) == quantkern.SNRQ(K=2)
    assert cli.config_from_args(parse("quantize --method ldlq --output o".split())) == quantkern.LDLQ()
    assert cli.config_from_args(parse("quantize --method snrq --alpha-mode sample --output o".split())).alpha == "sample"
    with pytest.raises(SystemExit):
        parse("quantize --recipe nope --output o".split())
    with pytest.raises(SystemExit, match="alpha"):
        cli.method_kwargs_from_args(parse("quantize --alpha 0.5 --option alpha=0.3 --output o".split()))


def test_help_lists_every_method_and_option(capsys):
    """--help shows every registered method and, for each option of each method, its flag and default."""
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name, cls in cli.command_line_methods().items():
        assert name in out
        for opt in cls.option_names():
            assert cli._flag(opt) + " VALUE" in out and f"{name}: {getattr(cls(), opt)!r}" in out, (name, opt)
    assert "--k VALUE" in out and "ksnrq: 4" in out


@pytest.mark.parametrize("argv,bad", [
    (["--method", "gptq", "--alpha", "0.3"], "alpha"),  # another method's option
    (["--method", "rtn", "--grid", "guard"], "grid"),
    (["--method", "snrq", "--option", "alhpa=0.3"], "alhpa"),  # misspelt
])
def test_option_the_method_lacks_fails_before_work(tmp_path, capsys, argv, bad):
    out = tmp_path / "q"
    rc = cli.main(["quantize", "--model", str(tmp_path / "no-such-model"), *argv, "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"no option(s) ['{bad}']" in err and not out.exists()


def test_misspelt_flag_and_bad_value_fail_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse: unrecognized arguments
        cli.main(["quantize", "--method", "snrq", "--alhpa", "0.3", "--output", str(tmp_path / "q")])
    assert "--alhpa" in capsys.readouterr().err
    rc = cli.main(["quantize", "--model", str(tmp_path / "no-such-model"), "--method", "snrq", "--grid", "nope",
                   "--output", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert rc == 2 and "SNRQ: grid must be one of" in err and "'nope'" in err and not (tmp_path / "q").exists()


def test_defaults_and_errors(capsys):
    a = cli.build_parser().parse_args(["quantize", "--output", "o"])
    assert (a.model, a.method, a.bits, a.group_size, a.asym, a.act_order) == ("default", "gptq", 4, 128, False, False)
    assert cli.method_kwargs_from_args(a) == {}
    for bad in (["quantize", "--bits", "5", "--output", "o"], ["quantize", "--method", "nope", "--output", "o"],
                ["quantize"], ["frobnicate"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(bad)
    e = cli.build_parser().parse_args(["eval", "--model", "m", "--text", "x.txt"])
    assert e.text == ["x.txt"] and e.seqlen == 512
    g = cli.build_parser().parse_args(["generate", "--model", "m", "--prompt", "hi there"])
    assert g.prompt == "hi there"
    assert cli.build_parser().parse_args(["inspect", "d"]).path == "d"
    assert cli.build_parser().parse_args(["bench"]).model is None
    assert a.lm_head == "auto"
    for flag, want in ((["--lm-head", "fp"], "fp"), (["--lm-head", "8"], 8), (["--quantize-lm-head"], "same")):
        assert cli.build_parser().parse_args(["quantize", "--output", "o", *flag]).lm_head == want
    for bad in ("5", "bf16"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["quantize", "--output", "o", "--lm-head", bad])


def test_missing_model_dir_is_a_clean_error(tmp_path, capsys):
    rc = cli.main(["eval", "--model", str(tmp_path / "nothing")])
    assert rc == 2 and "no config.json" in capsys.readouterr().err


def test_quantize_inspect_eval_generate(tmp_path, capsys):
    src = tiny_model_dir(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(TEXT)
    (tmp_path / "eval.txt").write_text(TEXT[::-1])
    out = tmp_path / "q"
    rc = cli.main(["quantize", "--model", str(src), "--method", "gptq", "--bits", "4", "--group-size", "32",
                   "--act-order", "--nsamples", "4", "--seqlen", "32", "--calib", str(tmp_path / "calib.txt"),
                   "--output", str(out), "--quiet"])
    assert rc == 0 and (out / "quantize_config.json").exists() and (out / "quant_log.jsonl").exists()
    rows = [json.loads(line) for line in (out / "quant_log.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and {"layer", "module", "loss", "damp", "time_s"} <= set(rows[0])
    capsys.readouterr()
    assert cli.main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["bits"], info["group_size"], info["act_order (desc_act)"], info["method"]) == (4, 32, True, "gptq")
    assert info["config"] == {"version": 1, "method": "gptq", "bits": 4, "group_size": 32, "sym": True,
                              "act_order": True, "static_groups": False, "damp": 0.01, "options": {}}
    assert cli.main(["inspect", str(out)]) == 0
    assert "config: GPTQ(bits=4, group_size=32, sym=True, act_order=True, static_groups=False, damp=0.01)" in (
        capsys.readouterr().out)
    assert info["zero_point_convention"] == "v1 (stored zero-1)" and info["checkpoint_format"] == "gptq"
    assert info["quantized_modules"] == 14  # counted in the files: the default head is stored in float
    assert info["lm_head"] == "float in the files; quantkern rounds it to 8-bit RTN, group 128 at load"
    assert info["per-module overrides (dynamic)"] == {}
    assert info["loads_in (tests/interop)"]["transformers"].startswith("yes")
    assert info["size_bytes"]["packed_linears"] > 0
    assert cli.main(["eval", "--model", str(out), "--text", str(tmp_path / "eval.txt"), "--seqlen", "64",
                     "--max-tokens", "256"]) == 0
    o = capsys.readouterr().out
    assert "perplexity" in o and "256" not in o.split("over")[0]
    assert cli.main(["generate", "--model", str(out), "--prompt", "Line 1", "--max-new-tokens", "5", "--raw"]) == 0


def test_quantize_with_a_recipe(tmp_path):
    """--recipe yaqa-guard reaches the driver as yaqa with the recipe's options (saved in the checkpoint's meta)."""
    src = tiny_model_dir(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(TEXT)
    out = tmp_path / "q"
    rc = cli.main(["quantize", "--model", str(src), "--recipe", "yaqa-guard", "--bits", "2", "--group-size", "32",
                   "--nsamples", "4", "--seqlen", "32", "--calib", str(tmp_path / "calib.txt"), "--output", str(out),
                   "--quiet"])
    assert rc == 0
    meta = json.loads((out / "quantize_config.json").read_text())["meta"]
    opts = meta["method_options"]
    assert meta["method"] == "yaqa" and opts["grid"] == "guard" and opts["grid_from"] == "snrq"
    rows = [json.loads(line) for line in (out / "quant_log.jsonl").read_text().splitlines()]
    body = [r for r in rows if r["module"] != "lm_head"]  # the head: 8-bit RTN by default, no grid choice
    assert len(body) == 14 and all(r["grid"] in ("minmax", "dynamic", "union", "mse") for r in body)


def test_unknown_method_option_fails_before_calibration(tmp_path, capsys):
    """A misspelt --option names the method's real options and fails before any model work (no output)."""
    out = tmp_path / "q"
    for extra, bad in ((["--recipe", "yaqa-guard", "--option", "gird=mse"], "gird"),
                       (["--method", "snrq", "--option", "frobnicate=1"], "frobnicate"),
                       (["--method", "rtn", "--option", "grid=guard"], "grid")):
        rc = cli.main(["quantize", "--model", str(tmp_path / "no-such-model"), *extra, "--output", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and f"no option(s) ['{bad}']" in err and not out.exists()


def test_quantize_names_readers_that_would_misload(tmp_path, capsys):
    """A packed head (--lm-head same) is misloaded by transformers: quantize says so on stderr, even with
    --quiet, and inspect's table agrees; the default head draws no warning."""
    src = tiny_model_dir(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(TEXT)
    common = ["quantize", "--model", str(src), "--method", "rtn", "--bits", "4", "--group-size", "32",
              "--calib", str(tmp_path / "calib.txt")]
    assert cli.main([*common, "--output", str(tmp_path / "same"), "--lm-head", "same", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: transformers: NO (MISLOADS: ignores the packed lm_head" in err
    assert cli.main(["inspect", str(tmp_path / "same"), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["loads_in (tests/interop)"]
    assert table["transformers"].startswith("NO") and table["GPTQModel"].startswith("yes")
    assert cli.main([*common, "--output", str(tmp_path / "auto")]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err
    assert "loads in     quantkern yes, GPTQModel yes, transformers yes, vLLM yes (by its source)" in out


def test_every_method_and_recipe_reachable_from_the_command_line():
    from quantkern.methods import with_grid

    parse = cli.build_parser().parse_args
    for name, cls in cli.command_line_methods().items():
        assert cli.config_from_args(parse(["quantize", "--method", name, "--bits", "2", "--output", "o"])) == cls(bits=2)
    for name, config in RECIPES.items():
        got = cli.config_from_args(parse(["quantize", "--recipe", name, "--bits", "2", "--output", "o"]))
        assert got == with_grid(config, quantkern.QuantSpec(bits=2))
