"""The method registry (quantkern.methods): every method and every recipe quantizes a tiny model through
quantkern.quantize, saves, loads, and its checkpoint meta rebuilds the very config; options are validated
in one place; the config path gives the keyword path's codes bit for bit."""
import dataclasses
import json

import pytest
import torch

from driver_tiny import tiny_llama, tiny_tokens

import quantkern
from quantkern import cli, methods
from quantkern.methods import METHODS, config_from_dict, make_config, with_grid
from quantkern.models import checkpoint
from quantkern.models.recipes import RECIPES, recipe
from quantkern.nn import QuantLinear
from quantkern.spec import QuantSpec

GRID = QuantSpec(bits=3, group_size=32)
FAST = {"adaround": {"iters": 20}}  # AdaRound's 500 default steps per linear: slow for a registry sweep
CALIB = tiny_tokens(4, 16)  # one block, 64 tokens: every method runs, in seconds


def _tiny():
    return tiny_llama(layers=1)


def _config(case):
    if case in RECIPES:
        return with_grid(RECIPES[case], GRID)
    return make_config(case, GRID, **FAST.get(case, {}))


def _codes(model):
    return {n: (m.qweight, m.qzeros, m.scales, m.g_idx) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("case", [*cli.command_line_methods(), *RECIPES])
def test_every_method_and_recipe_quantizes_saves_loads_and_round_trips(tmp_path, case):
    config = _config(case)
    model = _tiny()
    report = quantkern.quantize(model, config, calib=CALIB, progress=False)
    assert report.method == config.name and len(report.modules) == 8 and report.config == config.to_dict()
    quantkern.save_quantized(model, tmp_path / "ck")
    qc = json.loads((tmp_path / "ck" / "quantize_config.json").read_text())
    assert qc["meta"]["method"] == config.name and qc["meta"]["config"]["version"] == methods.CONFIG_VERSION
    assert config_from_dict(qc["meta"]["config"]) == config  # the checkpoint rebuilds the very config
    back = quantkern.load(tmp_path / "ck")
    assert config_from_dict(back.quantkern_info["config"]) == config
    ids = tiny_tokens(1, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-3, atol=1e-3)
    assert cli.config_line(cli.inspect_checkpoint(tmp_path / "ck")["config"]) == repr(config)


@pytest.mark.parametrize("method,kw", [("gptq", {}), ("snrq", {"alpha": "optimize"}), ("ksnrq", {"alpha": 0.5}),
                                       ("yaqa-snrq", None)])
def test_config_path_gives_the_keyword_paths_codes(method, kw):
    """quantize(model, Config(...)) and quantize_model(..., method=name, **kw) (recipes: recipe(name)) pack the
    same codes, scales, zeros and g_idx."""
    if kw is None:
        config = with_grid(RECIPES[method], GRID)
        method, kw = recipe(method)
    else:
        config = METHODS[method](**GRID.to_dict(), **kw)
    a = _tiny()
    quantkern.quantize(a, config, calib=CALIB, progress=False)
    b, _ = quantkern.quantize_model(_tiny(), None, GRID, method=method, calib=CALIB, progress=False, **kw)
    ca, cb = _codes(a), _codes(b)
    assert ca.keys() == cb.keys() and len(ca) == 8
    for name in ca:
        assert all(torch.equal(x, y) for x, y in zip(ca[name], cb[name])), name


def test_one_list_of_method_names():
    """The solver, the driver plug-in and the CLI all read METHODS; every method has a solver and a plug-in."""
    from quantkern.models import driver
    from quantkern.solvers import registry

    methods = cli.command_line_methods()
    assert list(methods) == ["rtn", "gptq", "ldlq", "gptaq", "snrq", "ksnrq", "adaround", "oac", "yaqa"]
    assert set(METHODS) - set(methods) <= {"gguf_grid"}  # registered by quantkern.export (quantize --gguf-type)
    assert driver.METHODS is METHODS and registry.METHODS is METHODS
    parser = cli.build_parser()
    q = next(a for a in parser._subparsers._group_actions[0].choices["quantize"]._actions if a.dest == "method")
    assert list(q.choices) == list(methods)
    for name, cls in methods.items():
        assert callable(registry.get_solver(name)) and issubclass(cls.plugin, driver.Plugin), name
        assert cls.name == name and isinstance(cls(), QuantSpec)


def test_options_are_validated_in_one_place():
    with pytest.raises(ValueError, match=r"SNRQ: alpha must be a number >= 0 and <= 1 or 'sample' or 'optimize', got 2"):
        quantkern.SNRQ(alpha=2)
    with pytest.raises(ValueError, match=r"KSNRQ: K must be an integer >= 1, got 0"):
        quantkern.KSNRQ(K=0)
    with pytest.raises(ValueError, match=r"GPTAQ: alpha must be a number >= 0 and <= 1, got 'sample'"):
        quantkern.GPTAQ(alpha="sample")
    with pytest.raises(ValueError, match=r"AdaRound: base must be one of \('rtn', 'gptq', 'ldlq'\), got 'snrq'"):
        quantkern.AdaRound(base="snrq")
    with pytest.raises(ValueError, match=r"YAQA: out_order must be true or false, got 1"):
        quantkern.YAQA(out_order=1)
    with pytest.raises(ValueError, match=r"SNRQ: bits must be one of"):
        quantkern.SNRQ(bits=5)
    with pytest.raises(TypeError):  # options are keyword-only: positional arguments are the grid's
        quantkern.SNRQ(4, 64, True, False, False, 0.01, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        quantkern.SNRQ().alpha = 0.5
    c = quantkern.SNRQ(bits=2, group_size=64, alpha=0.5)
    assert c.spec == QuantSpec(bits=2, group_size=64) and type(c.spec) is QuantSpec
    assert c.replace(bits=4) == quantkern.SNRQ(bits=4, group_size=64, alpha=0.5)
    assert json.loads(json.dumps(c.to_dict())) == c.to_dict()
    with pytest.raises(ValueError, match="version"):
        config_from_dict({**c.to_dict(), "version": methods.CONFIG_VERSION + 1})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        config_from_dict({**c.to_dict(), "method": "nope"})
    assert config_from_dict(None) is None


def test_quantize_model_takes_a_config_as_spec():
    config = quantkern.SNRQ(bits=3, group_size=32, alpha=0.5)
    a, ra = quantkern.quantize_model(_tiny(), None, config, calib=CALIB, progress=False)
    b, rb = quantkern.quantize_model(_tiny(), None, GRID, method="snrq", alpha=0.5, calib=CALIB, progress=False)
    assert ra.config == rb.config == config.to_dict()
    assert all(torch.equal(x, y) for x, y in zip(_codes(a)["model.layers.0.mlp.down_proj"],
                                                 _codes(b)["model.layers.0.mlp.down_proj"]))
    _, rc = quantkern.quantize_model(_tiny(), None, config, K=2, calib=CALIB, progress=False)
    assert rc.config == dataclasses.replace(config, K=2).to_dict()


def test_checkpoint_without_a_config_still_loads_and_inspects(tmp_path):
    """A checkpoint written before meta.config existed: load and inspect work; inspect says it is not recorded."""
    model = _tiny()
    quantkern.quantize(model, quantkern.RTN(bits=4, group_size=32), progress=False)
    out = tmp_path / "ck"
    quantkern.save_quantized(model, out)
    for name, key in (("quantize_config.json", None), ("config.json", "quantization_config")):
        d = json.loads((out / name).read_text())
        (d[key] if key else d)["meta"].pop("config")
        (out / name).write_text(json.dumps(d))
    back = quantkern.load(out, check=False)
    assert back.quantkern_info["config"] is None
    info = cli.inspect_checkpoint(out)
    assert info["config"] == cli.NO_CONFIG and info["method"] == "rtn"
    assert checkpoint.checkpoint_size(out)["packed_linears"] > 0
