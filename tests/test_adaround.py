"""AdaRound: learned up/down rounding from H alone (solvers/adaround.py)."""
import pytest
import torch

import quantkern
import quantkern.solvers.adaround  # noqa: F401  (registers method="adaround")
from quantkern import grid
from quantkern.spec import QuantSpec
from quantkern.solvers.adaround import adaround, beta_at, init_v, rect_sigmoid


def layer(gen, m=48, n=96, T=512):
    W = torch.randn(m, n, generator=gen)
    mix = torch.randn(n, n, generator=gen) * 0.3 + torch.eye(n)
    X = mix @ torch.randn(n, T, generator=gen) * (torch.rand(n, 1, generator=gen) * 2)
    return W, X, 2 * X @ X.t() / T


def test_soft_start_and_schedule(rng):
    f = torch.rand(1000, generator=rng) * 0.98 + 0.01
    assert torch.allclose(rect_sigmoid(init_v(f)), f, atol=1e-5)
    assert beta_at(0, 100, 0.2, 20, 2) is None and beta_at(19, 100, 0.2, 20, 2) is None
    assert beta_at(20, 100, 0.2, 20, 2) == 20
    assert abs(beta_at(99, 100, 0.2, 20, 2) - 2.225) < 1e-9
    assert rect_sigmoid(torch.tensor([-50.0, 50.0])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_learned_rounding_lowers_layer_mse_and_ends_binary(rng, bits):
    W, X, H = layer(rng)
    m, n = W.shape
    s, z = grid.find_params(W, bits, sym=True)
    S, Z = s[:, None].expand(m, n).contiguous(), z[:, None].expand(m, n).contiguous()
    codes, log = adaround(W, H, S, Z, (1 << bits) - 1, iters=300)
    rtn = grid.quantize(W, S, Z, (1 << bits) - 1)
    floor = torch.floor(W / S) + Z
    # up/down only: every code is floor or floor + 1 (clamped to the grid)
    assert bool((((codes - floor) == 0) | ((codes - floor) == 1) | (codes == 0) | (codes == (1 << bits) - 1)).all())
    mse = lambda c: float(((W - grid.dequantize(c, S, Z)) @ X).pow(2).sum())  # the layer MSE itself, from X
    assert mse(codes) < 0.8 * mse(rtn)
    assert log["undecided_frac"] < 0.1  # h(V) ended (almost) binary
    assert log["rec_final"] < log["rec_rtn"]


def test_solve_method_on_rtn_and_gptq_grids(rng):
    W, X, H = layer(rng, m=32, n=80)
    spec = QuantSpec(bits=2, group_size=32)
    r = quantkern.solve(W, H, spec, method="rtn")
    a = quantkern.solve(W, H, spec, method="adaround", iters=200)
    assert torch.equal(a.scales, r.scales) and torch.equal(a.zeros, r.zeros) and torch.equal(a.g_idx, r.g_idx)
    assert a.codes.dtype == torch.uint8 and a.method == "adaround" and a.params["iters"] == 200
    assert torch.allclose(a.dequantized, grid.dequantize_groups(a.codes, a.scales, a.zeros, a.g_idx))
    mse = lambda Q: float(((W - Q) @ X).pow(2).sum())
    assert mse(a.dequantized) < mse(r.dequantized)
    g = quantkern.solve(W, H, spec.replace(act_order=True), method="gptq")
    ag = quantkern.solve(W, H, spec.replace(act_order=True), method="adaround", base="gptq", iters=200)
    assert torch.equal(ag.scales, g.scales) and torch.equal(ag.g_idx, g.g_idx)  # GPTQ's grid, act-order g_idx
    with pytest.raises(TypeError):
        quantkern.solve(W, H, spec, method="adaround", bogus=1)
