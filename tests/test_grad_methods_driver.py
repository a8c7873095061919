"""OAC / YAQA / AdaRound through the layer-by-layer driver and the checkpoint (tiny random Llama)."""
import copy
import json

import pytest
import torch

from quantkern.models import driver  # noqa: E402

import quantkern  # noqa: E402
from quantkern.models import grad_methods  # noqa: E402,F401  (registers oac, yaqa, adaround)
from quantkern.spec import QuantSpec  # noqa: E402

from driver_tiny import tiny_llama, tiny_tokens  # noqa: E402

SPEC = QuantSpec(bits=2, group_size=32)


def _quantize(method, **kw):
    model = tiny_llama(layers=2)
    q, rep = quantkern.quantize_model(model, None, SPEC, method=method, calib=tiny_tokens(6, 32), progress=False, **kw)
    return q, rep


@pytest.mark.parametrize("method,kw", [("oac", {}), ("yaqa", {}), ("yaqa", {"h_in": "act"}),
                                       ("adaround", {"iters": 50})])
def test_methods_run_through_driver_and_checkpoint(tmp_path, method, kw):
    from quantkern.models import checkpoint, save_quantized

    q, rep = _quantize(method, **kw)
    assert len(rep.modules) == 14 and all(r["fallback"] is None for r in rep.modules)
    assert isinstance(driver.make_method(method, SPEC), grad_methods.__dict__.get(
        {"oac": "OAC", "yaqa": "YAQA", "adaround": "AdaRound"}[method]))
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


def test_bad_options():
    with pytest.raises(ValueError, match="h_in"):
        driver.make_method("yaqa", SPEC, h_in="nope")
    with pytest.raises(ValueError, match="oac"):
        driver.make_method("oac", SPEC, h_in="act")
    m = driver.make_method("oac", SPEC)
    with pytest.raises(RuntimeError, match="no gradient statistics"):
        m.solve("x", torch.randn(4, 8), None)
