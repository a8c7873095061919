"""OAC / YAQA / AdaRound through the layer-by-layer driver and the checkpoint (tiny random Llama)."""
import copy
import json

import pytest
import torch

from quantkern.models import driver  # noqa: E402

import quantkern  # noqa: E402
from quantkern import methods  # noqa: E402
from quantkern.models import grad_methods  # noqa: E402,F401  (registers oac, yaqa, adaround)
from quantkern.spec import QuantSpec  # noqa: E402

from driver_tiny import tiny_llama, tiny_tokens  # noqa: E402

SPEC = QuantSpec(bits=2, group_size=32)


def _quantize(method, **kw):
    model = tiny_llama(layers=2)
    q, rep = quantkern.quantize_model(model, None, SPEC, method=method, calib=tiny_tokens(6, 32), progress=False, **kw)
    return q, rep


@pytest.mark.parametrize("method,kw", [("oac", {}), ("yaqa", {}), ("yaqa", {"h_in": "act"}),
                                       ("oac", {"core": "snrq", "h_mix": 0.5, "fisher": "token"}),
                                       ("yaqa", {"grid_from": "snrq", "h_mix": 0.25, "out_damp": 0.1}),
                                       ("adaround", {"iters": 50})])
def test_methods_run_through_driver_and_checkpoint(tmp_path, method, kw):
    from quantkern.models import checkpoint, save_quantized

    q, rep = _quantize(method, **kw)
    assert len(rep.modules) == 15 and all(r["fallback"] is None for r in rep.modules)
    assert rep.modules[-1]["module"] == "lm_head"  # the default 8-bit RTN head
    plugin = driver.make_plugin(methods.make_config(method, SPEC))
    assert type(plugin) is (driver.Plugin if method == "adaround" else grad_methods.GradientPlugin)
    save_quantized(q, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "quantize_config.json").read_text())
    assert cfg["meta"]["method"] == method and cfg["bits"] == 2
    if method in ("oac", "yaqa"):
        opts = cfg["meta"]["method_options"]
        assert opts["labels"] == ("data" if method == "oac" else "sample") and "grad_stats_s" in opts
    back = quantkern.load(tmp_path / "ck")
    ids = tiny_tokens(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, q(input_ids=ids).logits, rtol=1e-3, atol=1e-3)


def test_oac_uses_gradient_statistics_not_activations():
    """OAC's codes differ from GPTQ's on the same model (its Hessian is not X X^T)."""
    qo, _ = _quantize("oac")
    qg, _ = _quantize("gptq")
    a = qo.model.layers[0].mlp.down_proj
    b = qg.model.layers[0].mlp.down_proj
    assert not torch.equal(a.qweight, b.qweight)


@pytest.mark.parametrize("method,kw", [("oac", {"core": "snrq"}), ("yaqa", {"grid_from": "snrq", "out_damp": 1e8})])
def test_snrq_variants_at_zero_fisher_weight_are_snrq(method, kw):
    """h_mix=0 through the driver (same fp + quantized streams, same D) gives SNRQ's model (for yaqa
    with H_O damped to ~identity)."""
    qs, _ = _quantize("snrq", alpha=0.25)
    qm, rep = _quantize(method, h_mix=0.0, alpha=0.25, **kw)
    assert rep.method_meta["h_mix"] == 0.0
    for blk_s, blk_m in zip(qs.model.layers, qm.model.layers):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            a, b = blk_s.get_submodule(name), blk_m.get_submodule(name)
            same = (a.qweight == b.qweight).float().mean().item()
            assert same > 0.99 and torch.equal(a.scales, b.scales), (name, same)


def test_grad_stats_cache_is_shared_between_methods(tmp_path):
    path = tmp_path / "g.pt"
    _quantize("oac", labels="data", grad_kind="both", grad_stats_path=str(path))
    _, rep = _quantize("yaqa", labels="data", grad_stats_path=str(path), fisher="token")  # reuses kind "both"
    assert rep.method_meta["fisher"] == "token"
    with pytest.raises(ValueError, match="other settings"):
        _quantize("yaqa", labels="sample", grad_stats_path=str(path))


@pytest.mark.parametrize("name,kw,match", [
    ("yaqa", {"h_in": "nope"}, "h_in"), ("oac", {"h_in": "act"}, "oac"), ("oac", {"h_mix": 2.0}, "h_mix"),
    ("yaqa", {"fisher": "nope"}, "fisher"), ("oac", {"grad_kind": "yaqa"}, "grad_kind"),
    ("oac", {"row_groups": 2}, "row_groups > 1 needs fisher='token'"), ("oac", {"grid": "guard"}, "core='snrq'"),
    ("yaqa", {"alpha": 0.5}, "grid_from='snrq'")])
def test_bad_option_values(name, kw, match):
    with pytest.raises(ValueError, match=match):
        methods.make_config(name, SPEC, **kw)


def test_bad_options():
    make = methods.make_config
    # keywords the method does not take fail at construction, naming its options
    for name, kw in (("yaqa", {"gird": "mse"}), ("snrq", {"Kk": 2}), ("gptq", {"alpha": 0.3}), ("rtn", {"K": 2})):
        with pytest.raises(methods.MethodOptionError, match=rf"has no option\(s\) \['{next(iter(kw))}'\]"):
            make(name, SPEC, **kw)
    assert make("yaqa", SPEC, h_in="act").h_mix == 0.0 and make("yaqa", SPEC, h_in="fisher").h_mix == 1.0
    make("yaqa", SPEC, grid_from="snrq", grid="guard", labels="data", out_damp=1.0)  # all known
    m = driver.make_plugin(make("oac", SPEC))
    with pytest.raises(RuntimeError, match="no gradient statistics"):
        m.solve("x", torch.randn(4, 8), None)
