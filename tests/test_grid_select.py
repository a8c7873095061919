"""SNRQ's feedback-aware grid options (grid="dynamic" / "union" / "select") and their use under YAQA.

Problems carry a few outlier input channels (massive activations), the case where the error fed back
from those channels pushes later weights outside a static group grid."""
import pytest
import torch

import quantkern
from quantkern import grid
from quantkern.solvers import core, proxy_loss
from quantkern.solvers.kron_ldlq import objective
from quantkern.solvers.snrq import SELECT_CANDIDATES, permuted_mismatch_product, shifted_target, union_params
from quantkern.spec import QuantSpec


def outlier_problem(seed, m=24, n=96, outliers=2, scale=40.0, uniform=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(6 * n, n, generator=g)
    X[:, :outliers] *= scale
    Xq = X + 0.05 * torch.randn(X.shape, generator=g)
    W = 0.1 * (2 * torch.rand(m, n, generator=g) - 1) if uniform else 0.05 * torch.randn(m, n, generator=g)
    H = 2.0 * X.t() @ X / X.shape[0]
    D = 2.0 * Xq.t() @ (X - Xq) / X.shape[0]
    return W, H, D


def target_in_processing_order(W, H, D, spec, alpha=0.25):
    """SNRQ's W_ref, the damped H and the order, in processing order (from the solver's own pipeline)."""
    prep = core.LayerProblem(W, H, spec.replace(act_order=True), True, {})
    Wref, _, _, _ = shifted_target(prep, permuted_mismatch_product(prep, D), alpha, None)
    return Wref, prep.Hd, prep.perm


def gptq_loop_dynamic(T, Hd, spec):
    """Independent column-by-column decode in processing order: group params from the fully
    error-updated target at each group's first column (the intent of grid="dynamic")."""
    n = T.shape[1]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd.double())), upper=True)
    Wc = T.double().clone()
    codes = torch.empty(T.shape, dtype=torch.float64)
    G = spec.group_size if spec.group_size > 0 else n
    for j in range(n):
        if j % G == 0:
            s, z = grid.find_params(Wc[:, j: j + G].float(), spec.bits, spec.sym)
            s, z = s.double(), z.double()
        c = torch.clamp(torch.round(Wc[:, j] / s) + z, 0, spec.maxq)
        q = s * (c - z)
        err = (Wc[:, j] - q) / U[j, j]
        Wc[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
        codes[:, j] = c
    return codes


@pytest.mark.parametrize("bits,gs,sym,n", [(2, 32, True, 96), (3, 32, False, 80), (2, 64, True, 150)])
def test_dynamic_grid_follows_the_feedback(bits, gs, sym, n):
    W, H, D = outlier_problem(1, n=n)
    spec = QuantSpec(bits=bits, group_size=gs, sym=sym)
    res = quantkern.solve(W, H, spec, method="snrq", D=D, grid="dynamic")
    ref = quantkern.solve(W, H, spec, method="snrq", D=D, alpha=0.25)  # same target and order, static grid
    Wref_p, Hd_p, perm = target_in_processing_order(W, H, D, spec)
    assert torch.equal(perm, res.perm)
    codes_p = gptq_loop_dynamic(Wref_p, Hd_p, spec)
    got = res.codes[:, perm].double()
    assert (got != codes_p).float().mean() < 2e-3
    assert torch.allclose(res.dequantized, grid.dequantize_groups(res.codes, res.scales, res.zeros, res.g_idx))
    assert torch.equal(res.g_idx, ref.g_idx)
    assert not torch.equal(res.scales, ref.scales)  # the outlier feedback did move some group's range


@pytest.mark.parametrize("sym", [True, False])
def test_union_params_cover_both_ranges(sym):
    g = torch.Generator().manual_seed(3)
    spec = QuantSpec(bits=3, group_size=16, sym=sym)
    a, b = torch.randn(5, 8, generator=g), 3 * torch.randn(5, 8, generator=g)
    s1, z1 = grid.find_params(a.reshape(-1, 1).repeat(1, 4) * torch.tensor([1.0, -1.0, 0.5, 0.2]), 3, sym)
    s2, z2 = grid.find_params(b.reshape(-1, 1).repeat(1, 4) * torch.tensor([0.3, -1.0, 0.5, 1.0]), 3, sym)
    s, z = union_params(s1, z1, s2, z2, spec)
    lo = lambda s, z: -z * s  # noqa: E731
    hi = lambda s, z: (spec.maxq - z) * s  # noqa: E731
    tol = 1e-3 * torch.maximum(s1, s2)
    assert (lo(s, z) <= torch.minimum(lo(s1, z1), lo(s2, z2)) + tol + s).all()  # zero rounding moves <= 1 step
    assert (hi(s, z) >= torch.maximum(hi(s1, z1), hi(s2, z2)) - tol - s).all()
    if sym:
        assert torch.equal(s, torch.maximum(s1, s2)) and torch.equal(z, z1)
    # a grid united with itself is unchanged
    s0, z0 = union_params(s1, z1, s1, z1, spec)
    torch.testing.assert_close(s0, s1, rtol=1e-3, atol=0)
    assert torch.equal(z0, z1)


@pytest.mark.parametrize("bits,gs,sym,K", [(2, 32, True, 1), (3, 32, False, 1), (2, -1, True, 1), (2, 32, True, 3)])
def test_select_keeps_the_least_objective(bits, gs, sym, K):
    for seed in range(3):
        W, H, D = outlier_problem(seed, n=96)
        spec = QuantSpec(bits=bits, group_size=gs, sym=sym)
        sel = quantkern.solve(W, H, spec, method="snrq", D=D, grid="select", K=K)
        each = {k: quantkern.solve(W, H, spec, method="snrq", D=D, grid=k, K=K) for k in SELECT_CANDIDATES}
        assert set(sel.log["grid_losses"]) == set(SELECT_CANDIDATES)
        for k, r in each.items():
            assert sel.loss <= r.loss * (1 + 1e-6), (k, sel.loss, r.loss)
            assert sel.log["grid_losses"][k] == pytest.approx(r.loss, rel=1e-6)
        kept = each[sel.log["grid"]]
        assert torch.equal(sel.codes, kept.codes) and torch.equal(sel.scales, kept.scales)
        assert sel.params["grid_chosen"] == sel.log["grid"]
        # res.loss is the objective of the returned codes
        Wref_p, Hd_p, perm = target_in_processing_order(W, H, D, spec)
        assert sel.loss == pytest.approx(proxy_loss(Wref_p, sel.dequantized[:, perm], Hd_p), rel=1e-4)
        assert torch.allclose(sel.dequantized, grid.dequantize_groups(sel.codes, sel.scales, sel.zeros, sel.g_idx))


def test_select_lowers_the_objective_on_outlier_problems():
    """select is never worse than min/max, and on these Gaussian-weight outlier problems another grid
    (mostly the MSE one) is clearly better on average at 2 bits."""
    ratio = []
    for seed in range(4):
        W, H, D = outlier_problem(seed, n=128, outliers=3)
        spec = QuantSpec(bits=2, group_size=32)
        sel = quantkern.solve(W, H, spec, method="snrq", D=D, grid="select")
        ratio.append(sel.loss / sel.log["grid_losses"]["minmax"])
    assert max(ratio) <= 1.0 and sum(ratio) / len(ratio) < 0.9


def test_yaqa_select_with_identity_output_is_snrq_select():
    W, H, D = outlier_problem(5, m=20, n=64)
    spec = QuantSpec(bits=2, group_size=32)
    s = quantkern.solve(W, H, spec, method="snrq", D=D, grid="select")
    y = quantkern.solve(W, H, spec, method="yaqa", H_out=torch.eye(20), grid_from="snrq", D=D, grid="select")
    assert y.log["grid"] == s.log["grid"] and y.params["grid_chosen"] == s.log["grid"]
    assert torch.equal(y.scales, s.scales) and (y.codes != s.codes).float().mean() < 2e-3


def test_yaqa_select_keeps_the_least_two_sided_objective():
    g = torch.Generator().manual_seed(11)
    W, H, D = outlier_problem(6, m=20, n=64)
    Ho = torch.randn(20, 40, generator=g)
    Ho = Ho @ Ho.t() / 40
    spec = QuantSpec(bits=2, group_size=32)
    kw = dict(H_out=Ho, grid_from="snrq", D=D, out_damp=0.5)
    sel = quantkern.solve(W, H, spec, method="yaqa", grid="select", **kw)
    Wref_p, Hd_p, perm = target_in_processing_order(W, H, D, spec)
    Ho_d = Ho + 0.5 * torch.diagonal(Ho).mean() * torch.eye(20)  # the rounding's damped output factor
    for k in SELECT_CANDIDATES:
        r = quantkern.solve(W, H, spec, method="yaqa", grid=k, **kw)
        assert sel.log["grid_losses"][k] == pytest.approx(objective(Wref_p - r.dequantized[:, perm], Hd_p, Ho_d),
                                                          rel=1e-5)
    assert sel.log["grid"] == min(sel.log["grid_losses"], key=sel.log["grid_losses"].get)
    kept = quantkern.solve(W, H, spec, method="yaqa", grid=sel.log["grid"], **kw)
    assert torch.equal(kept.codes, sel.codes) and sel.loss == pytest.approx(kept.loss, rel=1e-9)


def test_select_passes_through_oac_and_rejects_unknown_grids():
    W, H, D = outlier_problem(2, m=16, n=64)
    spec = QuantSpec(bits=2, group_size=32)
    s = quantkern.solve(W, H, spec, method="snrq", D=D, grid="select")
    o = quantkern.solve(W, H, spec, method="oac", H_oac=H, core="snrq", h_mix=0.0, D=D, grid="select")
    assert torch.equal(o.codes, s.codes)
    for method, kw in (("snrq", {}), ("yaqa", {"H_out": torch.eye(16), "grid_from": "snrq"})):
        with pytest.raises(ValueError, match="grid"):
            quantkern.solve(W, H, spec, method=method, D=D, grid="nope", **kw)


@pytest.mark.parametrize("n,gs,sym", [(128, 32, True), (100, 32, False), (64, 64, True)])
def test_batched_mse_group_params_equal_the_per_group_search(n, gs, sym):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(12, n, generator=g) * torch.rand(12, 1, generator=g)
    wt = torch.rand(n, generator=g) + 0.1
    spec = QuantSpec(bits=2, group_size=gs, sym=sym)
    s, z = grid.group_params(w, spec, kind="mse", weight=wt)
    for k in range((n + gs - 1) // gs):
        cols = slice(k * gs, min(n, (k + 1) * gs))
        s1, z1 = grid.search_params(w[:, cols], 2, sym, wt[cols])
        assert torch.equal(s[k], s1) and torch.equal(z[k], z1)


def test_choose_grid_rules():
    from quantkern.solvers.snrq import CLIFF_RATIO, choose_grid
    off_cliff = {"minmax": 10.0, "dynamic": 11.0, "union": 12.0, "mse": 6.0}
    assert choose_grid(off_cliff, "select") == "mse" and choose_grid(off_cliff, "guard") == "minmax"
    cliff = {"minmax": 100.0, "dynamic": 40.0, "union": 41.0, "mse": 100.0 * CLIFF_RATIO * 0.99}
    assert choose_grid(cliff, "select") == "mse" and choose_grid(cliff, "guard") == "mse"
    assert choose_grid({"minmax": 1.0, "mse": 1.0}, "select") == "minmax"  # ties keep the first


@pytest.mark.parametrize("bits", [2, 3])
def test_guard_is_minmax_off_the_cliff_and_the_least_on_it(bits):
    """Uniform weights (min/max is near the best static grid): without outlier channels guard keeps
    min/max; with one 300x channel the feedback clamps and another grid is >= 4x better."""
    from quantkern.solvers.snrq import CLIFF_RATIO
    spec = QuantSpec(bits=bits, group_size=32)
    for seed in range(3):
        for outliers, scale, want_minmax in ((0, 1.0, True), (1, 300.0, False)):
            W, H, D = outlier_problem(seed, outliers=outliers, scale=scale, uniform=True)
            g = quantkern.solve(W, H, spec, method="snrq", D=D, grid="guard")
            ref = quantkern.solve(W, H, spec, method="snrq", D=D, grid=g.log["grid"])
            losses = g.log["grid_losses"]
            assert torch.equal(g.codes, ref.codes) and g.loss == pytest.approx(ref.loss, rel=1e-9)
            assert (g.log["grid"] == "minmax") == want_minmax, losses
            if want_minmax:
                assert min(losses.values()) >= CLIFF_RATIO * losses["minmax"]
            else:
                assert g.loss == min(losses.values()) < CLIFF_RATIO * losses["minmax"]


def test_yaqa_guard_with_identity_output_is_snrq_guard():
    spec = QuantSpec(bits=2, group_size=32)
    for seed in range(3):
        W, H, D = outlier_problem(seed, m=20, n=64, outliers=seed % 2, scale=300.0, uniform=True)
        s = quantkern.solve(W, H, spec, method="snrq", D=D, grid="guard")
        y = quantkern.solve(W, H, spec, method="yaqa", H_out=torch.eye(20), grid_from="snrq", D=D, grid="guard")
        assert y.log["grid"] == s.log["grid"] and set(y.log["grid_screen"]) == set(SELECT_CANDIDATES)
        assert torch.equal(y.scales, s.scales) and (y.codes != s.codes).float().mean() < 2e-3


def test_oac_row_blocks_report_each_blocks_grid():
    W, H, D = outlier_problem(1, m=32, n=64, outliers=1, scale=300.0, uniform=True)
    F = torch.stack([H, 1.1 * H, 0.9 * H, H])
    spec = QuantSpec(bits=2, group_size=32)
    r = quantkern.solve(W, H, spec, method="oac", H_oac=F, core="snrq", h_mix=0.25, D=D, grid="guard")
    blocks = r.log["grid"].split("/")
    assert len(blocks) == 4 and set(r.log["grid_losses"]) == set(SELECT_CANDIDATES)
    assert r.loss <= r.log["grid_losses"]["minmax"] * (1 + 1e-9)
    assert r.loss == pytest.approx(sum(r.log["row_block_losses"]), rel=1e-9)
