"""Bad input: clear errors or the logged fallback, never NaN codes."""
import warnings

import pytest
import torch

from quantkern import QuantSpec, grid, solve
from quantkern.solvers.hessian import inverse_cholesky

from solver_problems import correlated

SPEC = QuantSpec(bits=4, group_size=16)


@pytest.fixture
def prob():
    return correlated(8, 32, seed=0)


def test_h_shape_errors(prob):
    W, H, D = prob
    with pytest.raises(ValueError, match="square"):
        solve(W, H[:, :31], SPEC, "gptq")
    with pytest.raises(ValueError, match="n = 32"):
        solve(W, H[:31, :31], SPEC, "gptq")
    with pytest.raises(ValueError, match="needs H"):
        solve(W, None, SPEC, "gptq")
    with pytest.raises(ValueError, match="2-D"):
        solve(W[0], H, SPEC, "gptq")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(prob, bad):
    W, H, D = prob
    W2 = W.clone()
    W2[1, 3] = bad
    with pytest.raises(ValueError, match="W has 1 non-finite"):
        solve(W2, H, SPEC, "gptq")
    H2 = H.clone()
    H2[2, 2] = bad
    with pytest.raises(ValueError, match="H has 1 non-finite"):
        solve(W, H2, SPEC, "gptq")
    D2 = D.clone()
    D2[0, 1] = bad
    with pytest.raises(ValueError, match="D has 1 non-finite"):
        solve(W, H, SPEC, "snrq", D=D2)


def test_unsupported_bits_and_method(prob):
    W, H, D = prob
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=5)
    with pytest.raises(ValueError, match="unknown method"):
        solve(W, H, SPEC, "gptq2")
    with pytest.raises(TypeError):
        solve(W, H, SPEC, "gptq", alpah=0.3)
    with pytest.raises(TypeError, match="QuantSpec"):
        solve(W, H, {"bits": 4}, "gptq")


@pytest.mark.parametrize("K", [0, -1, 1.5, True])
def test_bad_k(prob, K):
    W, H, D = prob
    with pytest.raises(ValueError, match="K must be"):
        solve(W, H, SPEC, "ksnrq", D=D, K=K)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "bogus", float("nan")])
@pytest.mark.parametrize("method", ["snrq", "gptaq"])
def test_bad_alpha(prob, alpha, method):
    W, H, D = prob
    with pytest.raises(ValueError, match="alpha must be"):
        solve(W, H, SPEC, method, D=D, alpha=alpha)


def test_missing_or_wrong_d(prob):
    W, H, D = prob
    with pytest.raises(ValueError, match="needs D"):
        solve(W, H, SPEC, "gptaq")
    with pytest.raises(ValueError, match="D must be"):
        solve(W, H, SPEC, "snrq", D=D[:5])


@pytest.mark.parametrize("method", ["gptq", "gptaq", "snrq", "ksnrq"])
def test_all_zero_h_falls_back_to_rtn_loudly(prob, method):
    W, H, D = prob
    with pytest.warns(RuntimeWarning, match="falling back to RTN"):
        res = solve(W, torch.zeros(32, 32), SPEC, method, **({} if method == "gptq" else {"D": D}))
    assert res.log["fallback"] == "rtn" and "all zero" in res.log["fallback_reason"]
    codes, *_ = grid.rtn(W, SPEC)
    assert torch.equal(res.codes, codes)
    assert torch.isfinite(res.dequantized).all()


def test_indefinite_h_retries_with_more_damping():
    W = torch.randn(6, 2)
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3, -1
    res = solve(W, H, QuantSpec(bits=4, group_size=-1), "gptq")
    assert res.log["retries"] >= 1 and res.log["damp"] > 0.01 and res.log["fallback"] is None
    assert [s["ok"] for s in res.log["steps"]][-1] is True
    assert torch.isfinite(res.dequantized).all()


def test_diagonal_floor_when_nothing_factorises():
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    with pytest.warns(RuntimeWarning, match="diagonal"):
        U, Hd, log = inverse_cholesky(H, damp=0.01, retries=0)
    assert log["fallback"] == "diag" and [s["dtype"] for s in log["steps"]] == ["fp32", "fp64", "diag"]
    assert torch.isfinite(U).all() and torch.count_nonzero(U - torch.diag(torch.diagonal(U))) == 0


def test_dead_columns_give_finite_codes():
    W, H, D = correlated(8, 40, seed=1, rank_drop=5)
    for method in ("gptq", "gptaq", "snrq", "ksnrq"):
        res = solve(W, H, SPEC.replace(act_order=True), method, **({} if method == "gptq" else {"D": D}))
        assert res.log["dead_columns"] == 5
        assert torch.isfinite(res.dequantized).all()
        assert "min_eig_est" in res.log and res.log["min_eig_est"] > 0


def test_log_records_the_inverse():
    W, H, D = correlated(8, 40, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = solve(W, H, SPEC, "snrq", D=D)
    for key in ("damp", "retries", "fallback", "min_eig_est", "time_s", "kernel_time_s"):
        assert key in res.log
    assert res.log["retries"] == 0 and res.log["fallback"] is None
