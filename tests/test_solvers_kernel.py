"""The core ops (csrc/common/solver.h): C++ CPU kernels against the pure-torch references."""
import itertools

import pytest
import torch

from quantkern import QuantSpec, _ext, grid
from quantkern.ops import solver as S

from solver_problems import correlated, factor

needs_ext = pytest.mark.skipif(not _ext.has_cpu(), reason="extension not built")

CASES = [  # m, n, group_size, blocksize, bits, sym
    (37, 70, 16, 32, 3, True),
    (50, 100, -1, 32, 4, False),
    (40, 130, 48, 64, 2, False),   # groups straddle block boundaries, ragged last group
    (17, 129, 128, 128, 4, True),  # ragged last block and group
    (64, 96, 20, 128, 2, True),
    (9, 41, 7, 16, 8, False),
    (130, 75, 16, 32, 4, False),   # full 64-row tiles + a ragged one; a last block of 11 columns (8 + 3)
]


def _params(W, bits, G, sym):
    n = W.shape[1]
    gidx = (torch.arange(n) // (G if G > 0 else n)).to(torch.int32)
    spec = QuantSpec(bits=bits, group_size=G, sym=sym)
    scales, zeros = grid.group_params(W, spec, gidx)
    return gidx, scales, zeros


def _compare(ref, out, what):
    codes_r, codes_c = ref[0], out[0]
    mism = (codes_r != codes_c).float().mean().item()
    assert mism < 1e-3, f"{what}: code mismatch rate {mism:.2e}"
    lr, lc = ref[-1].sum().item(), out[-1].sum().item()
    assert abs(lr - lc) <= 1e-4 * abs(lr) + 1e-9, f"{what}: loss {lc} vs reference {lr}"
    return mism


@needs_ext
@pytest.mark.parametrize("m,n,G,B,bits,sym", CASES)
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("with_p", [False, True])
def test_block_solve_cpu_matches_reference(m, n, G, B, bits, sym, dynamic, with_p):
    W, H, D = correlated(m, n, seed=m * n + bits)
    Hd, U = factor(H)
    gidx, scales, zeros = _params(W, bits, G, sym)
    P = 0.25 * torch.triu(D @ U.t(), 1) @ U if with_p else None
    args = (W, U, P, gidx, scales, zeros, bits, sym, dynamic, B)
    ref = S.gptq_block_solve(*args, backend="reference")
    out = S.gptq_block_solve(*args, backend="cpu")
    _compare(ref, out, "gptq_block_solve")
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)  # group params: same rule, same bits
    torch.testing.assert_close(out[2], ref[2], rtol=0, atol=0)
    assert int(out[0].max()) <= (1 << bits) - 1
    if not dynamic:
        assert torch.equal(out[1], scales) and torch.equal(out[2], zeros)


@needs_ext
@pytest.mark.parametrize("m,n,G,B,bits,sym", [CASES[0], CASES[2], CASES[4]])
@pytest.mark.parametrize("K", [1, 4])
def test_ksnrq_cpu_matches_reference(m, n, G, B, bits, sym, K):
    W, H, _ = correlated(m, n, seed=7 * m + n + K)
    Hd, U = factor(H)
    gidx, scales, zeros = _params(W, bits, G, sym)
    ref = S.ksnrq_solve(W, U, gidx, scales, zeros, bits, K, B, backend="reference")
    out = S.ksnrq_solve(W, U, gidx, scales, zeros, bits, K, B, backend="cpu")
    _compare(ref, out, f"ksnrq K={K}")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("bits,G", [(2, 16), (3, -1), (4, 24)])
def test_ksnrq_k1_is_greedy_exactly(backend, bits, G):
    W, H, _ = correlated(30, 80, seed=bits)
    Hd, U = factor(H)
    gidx, scales, zeros = _params(W, bits, G, True)
    c1, l1 = S.ksnrq_solve(W, U, gidx, scales, zeros, bits, 1, 32, backend=backend)
    c0, _, _, l0 = S.gptq_block_solve(W, U, None, gidx, scales, zeros, bits, True, False, 32, backend=backend)
    assert torch.equal(c1, c0)
    assert torch.equal(l1, l0)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_loss_is_the_quadratic_form(backend):
    """sum err^2 == tr((W - Q) Hd (W - Q)^T) per row (the GPTQ loss convention)."""
    W, H, _ = correlated(12, 50, seed=3)
    Hd, U = factor(H)
    gidx, scales, zeros = _params(W, 3, 16, False)
    codes, sc, zr, loss = S.gptq_block_solve(W, U, None, gidx, scales, zeros, 3, False, True, 16, backend=backend)
    E = (W - grid.dequantize_groups(codes, sc, zr, gidx)).double()
    torch.testing.assert_close(loss, ((E @ Hd.double()) * E).sum(1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("n", [5, 7])
def test_ksnrq_exhaustive_k_finds_brute_force_optimum(backend, n):
    """K >= grid^n prunes nothing: the beam search is exhaustive and must hit the exact optimum."""
    bits, m = 2, 3
    W, H, _ = correlated(m, n, seed=n, T=40)
    Hd, U = factor(H)
    gidx, scales, zeros = _params(W, bits, -1, False)
    K = 4**n
    codes, loss = S.ksnrq_solve(W, U, gidx, scales, zeros, bits, K, 4, backend=backend)
    allc = torch.tensor(list(itertools.product(range(4), repeat=n)), dtype=torch.float32)  # [4^n, n]
    for r in range(m):
        Q = scales[0, r] * (allc - zeros[0, r])
        E = (W[r] - Q).double()
        obj = ((E @ Hd.double()) * E).sum(1)
        best = obj.min().item()
        assert abs(loss[r].item() - best) <= 1e-6 * best + 1e-9
        e = (W[r] - scales[0, r] * (codes[r].float() - zeros[0, r])).double()
        assert abs((e @ Hd.double() @ e).item() - best) <= 1e-5 * best + 1e-9
        greedy = S.ksnrq_solve(W[r : r + 1], U, gidx, scales[:, r : r + 1], zeros[:, r : r + 1], bits, 1, 4,
                               backend=backend)[1]
        assert best <= greedy.item() * (1 + 1e-6) + 1e-9


@needs_ext
def test_grid_params_helper_matches_torch():
    g = torch.Generator().manual_seed(0)
    vals = torch.cat([
        torch.randn(2000, generator=g) * 10 ** torch.randint(-8, 5, (2000,), generator=g).float(),
        torch.tensor([0.0, 1e-30, -1e-30, 65504.0, 7e4, 3e-8, -6e-5, 1.0]),
    ])
    w = vals.view(-1, 2)
    lo, hi = w.amin(1), w.amax(1)
    for bits, sym in itertools.product((2, 3, 4, 8), (True, False)):
        s_ref, z_ref = grid.find_params(w, bits, sym)
        s, z = torch.ops.quantkern.grid_params(lo.contiguous(), hi.contiguous(), bits, sym)
        assert torch.equal(s, s_ref), (bits, sym)
        assert torch.equal(z, z_ref), (bits, sym)


@needs_ext
def test_round_to_half_matches_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200000, generator=g) * 2.0 ** torch.randint(-30, 18, (200000,), generator=g).float()
    edge = torch.tensor([65504.0, 65519.99, 65520.0, 2.0**-14, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-26, 0.0,
                         -0.0, float("inf"), -float("inf")])
    x = torch.cat([x, edge, -edge])
    torch.testing.assert_close(torch.ops.quantkern.round_to_half(x), x.half().float(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_op_validation(backend):
    W, H, _ = correlated(4, 10, seed=0)
    Hd, U = factor(H)
    gidx, scales, zeros = _params(W, 4, 5, True)
    with pytest.raises(ValueError, match="U must be"):
        S.gptq_block_solve(W, U[:9, :9], None, gidx, scales, zeros, 4, True, True, 4, backend=backend)
    with pytest.raises(ValueError, match="contiguous run"):
        S.gptq_block_solve(W, U, None, torch.tensor([0, 1] * 5, dtype=torch.int32), scales, zeros, 4, True, True,
                           4, backend=backend)
    with pytest.raises(ValueError, match="K must be"):
        S.ksnrq_solve(W, U, gidx, scales, zeros, 4, 0, 4, backend=backend)
    with pytest.raises(ValueError, match="bits"):
        S.gptq_block_solve(W, U, None, gidx, scales, zeros, 5, True, True, 4, backend=backend)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("K", [1, 3])
def test_inputs_are_not_modified(backend, K):
    W, H, D = correlated(20, 40, seed=5)
    Hd, U = factor(H)
    gidx, scales, zeros = _params(W, 3, 16, True)
    P = torch.triu(D @ U.t(), 1) @ U
    before = [t.clone() for t in (W, U, P, gidx, scales, zeros)]
    S.gptq_block_solve(W, U, P, gidx, scales, zeros, 3, True, True, 16, backend=backend)
    S.ksnrq_solve(W, U, gidx, scales, zeros, 3, K, 16, backend=backend)
    for a, b in zip(before, (W, U, P, gidx, scales, zeros)):
        assert torch.equal(a, b)
