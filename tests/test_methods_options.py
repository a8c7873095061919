"""quantkern's own options for OAC / YAQA (not the papers'): the Fisher/activation blend (h_mix),
the SNRQ core / grid under them (core="snrq", grid_from="snrq"), output damping and per-token
Fisher statistics. Each reduces exactly to the plain method it extends at its neutral setting."""
import pytest
import torch

import quantkern
from quantkern.calibration.fisher import collect_grad_stats
from quantkern.solvers.hessian import HessianError, blend
from quantkern.spec import QuantSpec

from _twolayer import TwoLayer


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(7)


def spd(k, gen):
    X = torch.randn(k, 3 * k, generator=gen) * torch.rand(k, 1, generator=gen) * 2
    return X @ X.t() / k + 0.01 * torch.eye(k)


def problem(rng, m=40, n=96):
    W = torch.randn(m, n, generator=rng)
    H, F = spd(n, rng), spd(n, rng)
    D = 0.1 * torch.randn(n, n, generator=rng) @ H / n**0.5
    return W, H, F, D


def test_blend():
    g = torch.Generator().manual_seed(0)
    H, F = spd(12, g), 5.0 * spd(12, g)
    assert blend(H, F, 0.0) is H and blend(H, None, 0.0) is H
    B1 = blend(H, F, 1.0)
    torch.testing.assert_close(torch.trace(B1), torch.trace(H))
    torch.testing.assert_close(B1, F * (torch.trace(H) / torch.trace(F)))
    torch.testing.assert_close(blend(H, F, 0.25), 0.75 * H + 0.25 * B1)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="blend weight"):
            blend(H, F, bad)
    with pytest.raises(ValueError, match="needs the Fisher"):
        blend(H, None, 0.5)
    with pytest.raises(HessianError):
        blend(H, torch.zeros(12, 12), 0.5)


@pytest.mark.parametrize("gs", [32, -1])
def test_oac_snrq_core_neutral_settings_reproduce_snrq(rng, gs):
    W, H, F, D = problem(rng)
    spec = QuantSpec(bits=2, group_size=gs)
    ref = quantkern.solve(W, H, spec, method="snrq", D=D, alpha=0.25)
    # h_mix = 0: the Fisher is ignored, exactly SNRQ
    o = quantkern.solve(W, H, spec, method="oac", H_oac=F, core="snrq", h_mix=0.0, D=D, alpha=0.25)
    assert torch.equal(o.codes, ref.codes) and torch.equal(o.scales, ref.scales) and torch.equal(o.g_idx, ref.g_idx)
    assert o.method == "oac" and o.params["core"] == "snrq"
    # H_OAC equal to the activation Hessian at full weight: SNRQ on H with the target pulled to W (alpha 0)
    ref0 = quantkern.solve(W, H, spec, method="snrq", alpha=0.0)
    o1 = quantkern.solve(W, H, spec, method="oac", H_oac=H.clone(), core="snrq", h_mix=1.0, D=D, alpha=0.25)
    assert torch.equal(o1.codes, ref0.codes)


def test_oac_blend_zero_is_gptq_and_blend_changes_codes(rng):
    W, H, F, _ = problem(rng)
    spec = QuantSpec(bits=2, group_size=32)
    g = quantkern.solve(W, H, spec, method="gptq")
    assert torch.equal(quantkern.solve(W, H, spec, method="oac", H_oac=F, h_mix=0.0).codes, g.codes)
    mid = quantkern.solve(W, H, spec, method="oac", H_oac=F, h_mix=0.5)
    assert not torch.equal(mid.codes, g.codes)


def test_oac_snrq_core_blend_minimises_the_summed_objective(rng):
    """h_mix in (0, 1) minimises (1 - w)||W X_t - Q X_q||^2 + w tr((W-Q) F~ (W-Q)^T) better (on average)
    than either pure method, since it is that objective's own successive rounding."""
    spec = QuantSpec(bits=2, group_size=32)
    wins = 0
    for _ in range(4):
        W, H, F, D = problem(rng)
        w, a = 0.5, 0.25
        Fs = F * (torch.trace(H) / torch.trace(F))

        def objective(Q):
            E = (W - Q).double()
            act = ((E @ H.double()) * E).sum() + 2 * a * (E * (W.double() @ D.double())).sum()
            return float((1 - w) * act + w * ((E @ Fs.double()) * E).sum())

        mix = objective(quantkern.solve(W, H, spec, method="oac", H_oac=F, core="snrq", h_mix=w, D=D,
                                        alpha=a).dequantized)
        pure_s = objective(quantkern.solve(W, H, spec, method="snrq", D=D, alpha=a).dequantized)
        pure_f = objective(quantkern.solve(W, H, spec, method="oac", H_oac=F, core="snrq", h_mix=1.0).dequantized)
        wins += mix < min(pure_s, pure_f)
    assert wins >= 3


@pytest.mark.parametrize("gs", [32, -1])
def test_yaqa_snrq_grid_with_identity_output_is_snrq(rng, gs):
    W, H, F, D = problem(rng, m=37, n=80)
    spec = QuantSpec(bits=2, group_size=gs)
    ref = quantkern.solve(W, H, spec, method="snrq", D=D, alpha=0.25)
    for kw in ({}, {"H_fisher": F, "h_mix": 0.0}, {"out_damp": 0.5}):
        y = quantkern.solve(W, H, spec, method="yaqa", H_out=torch.eye(37), grid_from="snrq", D=D, alpha=0.25, **kw)
        assert torch.equal(y.scales, ref.scales) and torch.equal(y.g_idx, ref.g_idx)
        mismatch = (y.codes != ref.codes).float().mean().item()  # floating-point ties only (see test_yaqa)
        assert mismatch < 1e-3, f"{mismatch:.2%} of codes differ from SNRQ"


def test_yaqa_out_damp_moves_towards_identity(rng):
    """A huge out_damp makes H_O ~ c I: the codes approach the H_O = I codes."""
    W, H, _, D = problem(rng, m=32, n=64)
    Ho = spd(32, rng)
    spec = QuantSpec(bits=2, group_size=32)
    eye = quantkern.solve(W, H, spec, method="yaqa", H_out=torch.eye(32), grid_from="snrq", D=D)
    low = quantkern.solve(W, H, spec, method="yaqa", H_out=Ho, grid_from="snrq", D=D, out_damp=0.01)
    high = quantkern.solve(W, H, spec, method="yaqa", H_out=Ho, grid_from="snrq", D=D, out_damp=1e6)
    assert (high.codes != eye.codes).float().mean() < 1e-3 < (low.codes != eye.codes).float().mean()


def test_option_errors(rng):
    W, H, F, D = problem(rng, m=8, n=16)
    spec = QuantSpec(bits=2, group_size=8)
    with pytest.raises(ValueError, match="core"):
        quantkern.solve(W, H, spec, method="oac", core="nope")
    with pytest.raises(ValueError, match="h_mix"):
        quantkern.solve(W, H, spec, method="oac", h_mix=0.5)  # no separate H_oac
    with pytest.raises(ValueError, match="core='snrq'"):
        quantkern.solve(W, H, spec, method="oac", D=D)
    with pytest.raises(ValueError, match="grid_from='snrq'"):
        quantkern.solve(W, H, spec, method="yaqa", H_out=torch.eye(8), D=D)
    with pytest.raises(ValueError, match="out_damp"):
        quantkern.solve(W, H, spec, method="yaqa", H_out=torch.eye(8), out_damp=-1.0)


def test_token_fisher_matches_brute_force():
    """F_tok_in = E_s[sum_t |g_t|^2 x_t x_t^T], F_tok_out = E_s[sum_t g_t g_t^T] for the last layer,
    whose output gradient is known in closed form for the loss 0.5 |y|^2 + sum(y): g = y + 1."""
    torch.manual_seed(0)
    net = TwoLayer(10, 14, 6)
    X = torch.randn(4, 5, 10)

    def quad_loss(logits, batch, gen):
        return 0.5 * (logits**2).sum() + logits.sum()

    st = collect_grad_stats(net, X, ["l1", "l2"], kind="yaqa", loss_fn=quad_loss, batch_size=3)["l2"]
    with torch.no_grad():
        x = torch.tanh(net.l1(X)).reshape(-1, 14)
        g = (net(X) + 1).reshape(-1, 6)
    F_in = (x * (g**2).sum(1, keepdim=True)).t() @ x / 4
    F_out = g.t() @ g / 4
    torch.testing.assert_close(st.F_tok_in, F_in, rtol=1e-4, atol=1e-4 * float(F_in.abs().max()))
    torch.testing.assert_close(st.F_tok_out, F_out, rtol=1e-4, atol=1e-4 * float(F_out.abs().max()))
    torch.testing.assert_close(st.input_side("token"), st.F_tok_in)
    torch.testing.assert_close(st.output_side("sequence"), st.H_out)
    with pytest.raises(ValueError, match="fisher"):
        st.input_side("nope")


@pytest.mark.parametrize("bits,sym", [(2, True), (3, True), (2, False), (4, False)])
def test_search_params_never_worse_than_minmax(bits, sym):
    from quantkern import grid

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(50, 64, generator=g) * torch.exp(torch.randn(50, 1, generator=g))
    w[:, 3] *= 6  # an outlier column: min/max wastes levels on it
    wt = torch.rand(64, generator=g) + 0.1
    maxq = (1 << bits) - 1

    def err(s, z):
        q = grid.dequantize(grid.quantize(w, s[:, None], z[:, None], maxq), s[:, None], z[:, None])
        return (((w - q) ** 2) * wt).sum(1)

    s0, z0 = grid.find_params(w, bits, sym)
    s1, z1 = grid.search_params(w, bits, sym, wt)
    e0, e1 = err(s0, z0), err(s1, z1)
    assert (e1 <= e0 * (1 + 1e-6)).all() and e1.sum() < 0.95 * e0.sum()
    assert torch.equal(s1, s1.half().float()) and (s1 > 0).all()
    if sym:
        assert (z1 == (maxq + 1) // 2).all()


def test_snrq_mse_grid_option(rng):
    W, H, _, D = problem(rng, m=24, n=64)
    spec = QuantSpec(bits=2, group_size=32)
    a = quantkern.solve(W, H, spec, method="snrq", D=D)
    b = quantkern.solve(W, H, spec, method="snrq", D=D, grid="mse")
    assert b.params["grid"] == "mse" and not torch.equal(a.scales, b.scales)
    y = quantkern.solve(W, H, spec, method="yaqa", H_out=torch.eye(24), grid_from="snrq", D=D, grid="mse")
    assert torch.equal(y.scales, b.scales) and (y.codes != b.codes).float().mean() < 1e-3
    o = quantkern.solve(W, H, spec, method="oac", H_oac=H, core="snrq", h_mix=0.0, D=D, grid="mse")
    assert torch.equal(o.codes, b.codes)
    with pytest.raises(ValueError, match="grid"):
        quantkern.solve(W, H, spec, method="snrq", D=D, grid="nope")


def test_row_blocks_one_block_and_equal_blocks(rng):
    """[1, n, n] is the plain [n, n] path; k identical blocks (each the full Fisher) give the k = 1 codes
    (same blended Hessian per block, same shared order)."""
    W, H, F, D = problem(rng, m=30, n=64)
    spec = QuantSpec(bits=2, group_size=32)
    ref = quantkern.solve(W, H, spec, method="oac", H_oac=F, core="snrq", h_mix=0.5, D=D)
    one = quantkern.solve(W, H, spec, method="oac", H_oac=F[None], core="snrq", h_mix=0.5, D=D)
    assert torch.equal(one.codes, ref.codes)
    same = quantkern.solve(W, H, spec, method="oac", H_oac=F.expand(3, 64, 64) / 3, core="snrq", h_mix=0.5, D=D)
    assert same.params["row_groups"] == 3 and torch.equal(same.g_idx, ref.g_idx)
    assert (same.codes != ref.codes).float().mean() < 1e-3
    torch.testing.assert_close(same.scales, ref.scales)


def test_row_blocks_use_their_own_hessian(rng):
    """Each block is solved with its own Fisher: block j's codes equal a plain solve of its rows with
    F[j] under the shared column order; g_idx is one for the whole weight."""
    from quantkern.calibration.fisher import row_chunks

    W, H, _, D = problem(rng, m=30, n=64)
    Fs = torch.stack([spd(64, rng) for _ in range(3)])
    spec = QuantSpec(bits=2, group_size=32)
    res = quantkern.solve(W, H, spec, method="oac", H_oac=Fs, core="snrq", h_mix=0.7, D=D, grid="mse")
    perm = torch.argsort(torch.diagonal(blend(H, Fs.sum(0), 0.7)), descending=True, stable=True)
    for j, (r0, r1) in enumerate(row_chunks(30, 3)):
        part = quantkern.solve(W[r0:r1], blend(H, Fs[j], 0.7), spec, method="snrq", D=0.3 * D, grid="mse", perm=perm)
        assert torch.equal(res.codes[r0:r1], part.codes) and torch.equal(res.g_idx, part.g_idx)
    assert torch.allclose(res.dequantized, quantkern.grid.dequantize_groups(res.codes, res.scales, res.zeros, res.g_idx))
    with pytest.raises(ValueError, match="act_order"):
        quantkern.solve(W, H, spec.replace(act_order=True), method="oac", H_oac=Fs, h_mix=0.5)


def test_row_group_statistics_sum_to_the_aggregate():
    torch.manual_seed(1)
    net = TwoLayer(10, 14, 6)
    X = torch.randn(4, 5, 10)

    def quad_loss(logits, batch, gen):
        return 0.5 * (logits**2).sum() + logits.sum()

    one = collect_grad_stats(net, X, ["l1"], kind="oac", loss_fn=quad_loss)["l1"]
    four = collect_grad_stats(net, X, ["l1"], kind="oac", loss_fn=quad_loss, row_groups=4)["l1"]
    assert four.F_tok_in.shape == (4, 10, 10)
    torch.testing.assert_close(four.F_tok_in.sum(0), one.F_tok_in, rtol=1e-4, atol=1e-5)


def test_yaqa_out_order(rng):
    """Row order is a permutation of the same problem: with H_O = I it changes nothing; with a real H_O
    the codes are those of the row-permuted problem, mapped back."""
    W, H, _, D = problem(rng, m=24, n=64)
    spec = QuantSpec(bits=2, group_size=32)
    kw = dict(grid_from="snrq", D=D, grid="mse")
    a = quantkern.solve(W, H, spec, method="yaqa", H_out=torch.eye(24), **kw)
    b = quantkern.solve(W, H, spec, method="yaqa", H_out=torch.eye(24), out_order=True, **kw)
    assert (a.codes != b.codes).float().mean() < 1e-3
    Ho = spd(24, rng)
    r = torch.argsort(torch.diagonal(Ho), descending=True, stable=True)
    c = quantkern.solve(W, H, spec, method="yaqa", H_out=Ho, out_order=True, **kw)
    d = quantkern.solve(W[r], H, spec, method="yaqa", H_out=Ho[r][:, r], **kw)
    assert (c.codes[r] != d.codes).float().mean() < 1e-3 and torch.equal(c.scales[:, r], d.scales)
