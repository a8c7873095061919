"""Issue 24: never worse than round-to-nearest. The driver's safety net (models/safety.py), shrinkage of
few-token statistics (calibration/shrinkage.py) and the calibration-size preflight, on a tiny random Llama."""
import copy
import dataclasses
import json
import warnings

import pytest
import torch

from driver_tiny import tiny_llama, tiny_tokens

import quantkern
import quantkern.models.grad_methods  # noqa: F401  (registers oac / yaqa / adaround)
from quantkern import cli, methods
from quantkern.calibration.fisher import GradStats
from quantkern.calibration.shrinkage import effective_samples, oas_intensity, shrink_to_diagonal
from quantkern.calibration.stats import HessianAccumulator
from quantkern.models import checkpoint, driver, safety
from quantkern.nn import QuantLinear
from quantkern.solvers.core import proxy_loss
from quantkern.spec import QuantSpec

SPEC2 = QuantSpec(bits=2, group_size=32)


def _degenerate_problem(seed=0):
    """W [32, 64] and H from 6 tokens (rank 6) with one outlier input column (30x the others)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(32, 64, generator=g)
    X = torch.randn(6, 64, generator=g)
    X[:, 5] *= 30
    return W, 2 * X.t() @ X, X


# --------------------------------------------------------------------------- shrinkage

def test_shrinkage_grows_as_tokens_per_feature_fall():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(48, 48, generator=g) / 7
    C = A @ A.t() + torch.eye(48)  # a correlated population
    L = torch.linalg.cholesky(C)
    rhos = []
    for N in (4, 48, 480, 48000):
        X = torch.randn(N, 48, generator=g) @ L.t()
        H = X.t() @ X / N
        rhos.append(oas_intensity(H, N))
    assert rhos[0] >= 1 - 4 / 48 - 1e-9 and rhos[0] > 0.9  # rank 4 of 48: nearly the diagonal
    assert all(a > b for a, b in zip(rhos, rhos[1:])), rhos
    assert rhos[-1] < 0.01  # plenty of samples: (almost) untouched
    Hs, rho = shrink_to_diagonal(H, 48000)
    torch.testing.assert_close(torch.diagonal(Hs), torch.diagonal(H))  # channel scales kept
    off = ~torch.eye(48, dtype=torch.bool)
    torch.testing.assert_close(Hs[off], H[off] * (1 - rho))
    assert oas_intensity(torch.diag(torch.rand(8) + 1), 3) == 0.0  # nothing to shrink
    assert effective_samples(4.0, 4.0) == 4.0 and effective_samples(2.0, 4.0) == 1.0  # 4 x w=1; one w=2


def test_token_counts_and_kish_effective_samples():
    acc = HessianAccumulator(8)
    acc.add_batch(torch.randn(3, 5, 8))
    assert acc.ntokens == 15 and acc.nsamples == 3
    st = GradStats(n=4, m=3, kind="yaqa")
    x, gr = torch.ones(1, 4, 4), torch.zeros(1, 4, 3)
    gr[0, 0] = 1.0  # one token carries all the gradient: one effective sample out of four
    st.add(x, gr)
    assert st.n_eff == pytest.approx(1.0)
    gr = torch.ones(1, 4, 3)
    st2 = GradStats(n=4, m=3, kind="oac")
    st2.add(x, gr)
    assert st2.n_eff == pytest.approx(4.0)


# --------------------------------------------------------------------------- the net itself

def test_degenerate_statistics_fall_back_to_rtn():
    W, H, _ = _degenerate_problem()
    res = quantkern.solve(W, H, SPEC2, method="gptq")  # GPTQ on the raw rank-6 H overfits it
    kept, info = safety.check(W, res, H, 6, SPEC2)
    rtn = quantkern.solve(W, None, SPEC2, method="rtn")
    assert info["kept"] == "rtn" and info["method_loss"] > info["rtn_loss"] > 0
    assert torch.equal(kept.codes, rtn.codes) and torch.equal(kept.dequantized, rtn.dequantized)
    assert kept.log["safety"] is info and kept.loss == info["rtn_loss"]
    # the population (isotropic + the outlier) agrees with the net's verdict
    Hpop = torch.eye(64)
    Hpop[5, 5] = 900.0
    assert proxy_loss(W, rtn.dequantized, Hpop) < proxy_loss(W, res.dequantized, Hpop)


def test_non_finite_result_falls_back():
    W, H, _ = _degenerate_problem()
    res = quantkern.solve(W, H, SPEC2, method="gptq")
    res.dequantized = res.dequantized.clone()
    res.dequantized[0, 0] = float("nan")
    kept, info = safety.check(W, res, H, 6, SPEC2)
    assert info["kept"] == "rtn" and info["method_loss"] is None and torch.isfinite(kept.dequantized).all()
    assert driver._ratio(info) == "method result not finite"


def test_winner_is_returned_untouched():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 64, generator=g)
    X = torch.randn(4096, 64, generator=g) @ (torch.eye(64) + 0.5 * torch.randn(64, 64, generator=g))  # correlated
    H = 2 * X.t() @ X / 4096
    res = quantkern.solve(W, H, SPEC2, method="gptq")
    kept, info = safety.check(W, res, H, 4096, SPEC2)
    assert kept is res and info["kept"] == "method" and info["method_loss"] < info["rtn_loss"]


# --------------------------------------------------------------------------- in the driver

class Overfit(driver.Plugin):
    """GPTQ on degenerate statistics: the collector's H with an outlier column and rank 2 kept."""

    def solve(self, name, weight, collector):
        H = collector.H
        ev, V = torch.linalg.eigh(H)
        H2 = (V[:, -2:] * ev[-2:]) @ V[:, -2:].t()
        H2[3, 3] += 1e3 * float(H.diagonal().mean())
        return quantkern.solve(weight, H2, self.spec, method="gptq")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OverfitConfig(methods.MethodConfig):
    """GPTQ's grid, solved by the Overfit plug-in."""


@pytest.fixture
def overfit():
    """The method "test-overfit", registered for one test (the registry is global)."""
    methods.register("test-overfit")(OverfitConfig)
    driver.register_plugin(OverfitConfig, Overfit)
    yield
    del methods.METHODS["test-overfit"]


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_driver_logs_fallbacks_in_rows_report_jsonl_and_meta(tmp_path, overfit):
    log = tmp_path / "log.jsonl"
    with pytest.warns(RuntimeWarning, match="safety net: .* kept RTN"):
        model, rep = quantkern.quantize_model(tiny_llama(), None, SPEC2, method="test-overfit",
                                              calib=tiny_tokens(4, 32), progress=False, log_path=log, lm_head="fp")
    fell = [r for r in rep.modules if r["safety"]["kept"] == "rtn"]
    assert fell and rep.safety_fallbacks == len(fell)
    assert all(r["safety"]["method_loss"] > r["safety"]["rtn_loss"] for r in fell)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert sum(x["safety"]["kept"] == "rtn" for x in lines) == len(fell)
    r = fell[0]
    name = f"model.layers.{r['layer']}.{r['module']}"
    meta = checkpoint.quantize_config(model)["meta"]["modules"][name]
    assert meta["safety"]["kept"] == "rtn" and meta["safety"]["rtn_loss"] == pytest.approx(r["safety"]["rtn_loss"])
    # the kept weights are exactly RTN's codes of the original weight
    fp = tiny_llama()
    rtn = quantkern.solve(fp.get_submodule(name).weight.data, None, SPEC2, method="rtn")
    q = _linears(model)[name]
    torch.testing.assert_close(_dequant(q), rtn.dequantized)


def _dequant(q: QuantLinear) -> torch.Tensor:
    from quantkern.formats import gptq
    from quantkern import grid

    codes, scales, zeros, g_idx = gptq.unpack({k: getattr(q, k) for k in gptq.TENSOR_NAMES}, q.spec.bits)
    return grid.dequantize_groups(codes, scales.float(), zeros.float(), g_idx)


def test_switch_off_keeps_the_method_result(overfit):
    fp = tiny_llama()
    calib = tiny_tokens(4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no safety-net warning when it is off
        off, rep = quantkern.quantize_model(copy.deepcopy(fp), None, SPEC2, method="test-overfit", calib=calib,
                                            progress=False, lm_head="fp", safety_net=False)
    assert not rep.safety_net and rep.safety_fallbacks == 0 and all("safety" not in r for r in rep.modules)
    on, rep_on = quantkern.quantize_model(copy.deepcopy(fp), None, SPEC2, method="test-overfit", calib=calib,
                                          progress=False, lm_head="fp")
    assert rep_on.safety_fallbacks > 0
    # block 0's q_proj sees the same input either way: off = the overfit GPTQ codes, on = RTN's where it fell back
    r = next(r for r in rep_on.modules if r["layer"] == 0 and r["module"] == "self_attn.q_proj")
    name = "model.layers.0.self_attn.q_proj"
    q_off, q_on = _linears(off)[name], _linears(on)[name]
    if r["safety"]["kept"] == "rtn":
        assert not torch.equal(q_off.qweight, q_on.qweight)
    args = cli.build_parser().parse_args(["quantize", "--output", "x", "--no-safety-net", "--no-shrink"])
    assert args.safety_net is False and args.shrink is False
    args = cli.build_parser().parse_args(["quantize", "--output", "x"])
    assert args.safety_net is True and args.shrink is True


def test_codes_unchanged_when_the_net_does_not_trigger():
    fp = tiny_llama()
    calib = tiny_tokens(8, 32)
    a, ra = quantkern.quantize_model(copy.deepcopy(fp), None, SPEC2, method="gptq", calib=calib, progress=False)
    b, rb = quantkern.quantize_model(copy.deepcopy(fp), None, SPEC2, method="gptq", calib=calib, progress=False,
                                     safety_net=False)
    assert ra.safety_fallbacks == 0 and all(r["safety"]["kept"] == "method" for r in ra.modules if "safety" in r)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _first_qkv_hessian(model, calib):
    """H of block 0's q/k/v input (the same on the fp and the quantized stream)."""
    acc = HessianAccumulator(model.config.hidden_size)
    h = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, i: acc.add_batch(i[0]))
    with torch.no_grad():
        for s in calib:
            model(input_ids=s[None])
    h.remove()
    return acc


@pytest.mark.parametrize("method,kw", [("gptq", {}), ("gptaq", {}), ("snrq", {}), ("ksnrq", {}),
                                       ("adaround", {"iters": 30}), ("oac", {}), ("yaqa", {}),
                                       ("yaqa", {"grid_from": "snrq", "h_mix": 0.0, "out_damp": 1.0})])
def test_every_method_with_4_tokens_is_finite_and_no_worse_than_rtn(method, kw):
    fp = tiny_llama()
    calib = tiny_tokens(1, 4)
    with pytest.warns(UserWarning, match="recommended >= "):  # the preflight's one line
        q, rep = quantkern.quantize_model(copy.deepcopy(fp), None, SPEC2, method=method, calib=calib,
                                          progress=False, **kw)
    checked = [r for r in rep.modules if "safety" in r]
    assert len(checked) == 14  # every block linear (2 blocks x 7); the 8-bit RTN lm_head is not checked
    for r in checked:
        s = r["safety"]
        kept = s["rtn_loss"] if s["kept"] == "rtn" else s["method_loss"]
        assert kept is not None and kept <= s["rtn_loss"] * (1 + 1e-6)
    with torch.no_grad():
        assert torch.isfinite(q(input_ids=calib).logits).all()
    # independently: block 0's q/k/v on their own statistics, against RTN of the original weights
    acc = _first_qkv_hessian(fp, calib)
    He = safety.evaluation_hessian(acc.H, acc.ntokens, SPEC2.damp)
    lin = _linears(q)
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}"
        W = fp.get_submodule(name).weight.data
        rtn = quantkern.solve(W, None, SPEC2, method="rtn").dequantized
        mine = safety.layer_loss(W, _dequant(lin[name]), He)
        assert mine <= safety.layer_loss(W, rtn, He) * (1 + 1e-5), (method, proj)


def test_preflight_recommends_more_calibration():
    spec = QuantSpec(bits=4)
    gptq = driver.make_plugin(methods.GPTQ(**spec.to_dict()))
    line = driver.calibration_advice(gptq, 1536, 16, 256)
    assert line and "16 x 256 = 4096 tokens" in line and "1536" in line and "\n" not in line
    assert "nsamples=48 at seqlen=256" in line  # 8 tokens per feature
    assert driver.calibration_advice(gptq, 1536, 32, 512) is None
    oac = driver.make_plugin(methods.OAC(**spec.to_dict()))
    assert "wants >= 32 sequences" in driver.calibration_advice(oac, 64, 8, 2048)
    assert driver.calibration_advice(oac, 1536, 32, 512) is None
