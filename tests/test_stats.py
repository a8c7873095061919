"""Streaming calibration statistics against direct torch formulas."""
import numpy as np
import pytest
import torch

from quantkern import _ext
from quantkern.calibration import AsymAccumulator, HessianAccumulator, sample_alphas
from quantkern.calibration.stats import syrk_accumulate_

needs_ext = pytest.mark.skipif(not _ext.has_cpu(), reason="extension not built")


@needs_ext
@pytest.mark.parametrize("T,n", [(7, 5), (64, 300), (33, 513), (200, 256)])
def test_syrk_matches_gemm(T, n):
    g = torch.Generator().manual_seed(T * n)
    x = torch.randn(T, n, generator=g)
    acc = torch.randn(n, n, generator=g)
    acc = acc + acc.t()
    ref = acc.clone().addmm_(x.t(), x, alpha=0.7)
    syrk_accumulate_(acc, x, 0.7)
    torch.testing.assert_close(acc, ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(acc, acc.t())


@needs_ext
def test_syrk_fp64_and_bad_shapes():
    x = torch.randn(10, 6, dtype=torch.float64)
    acc = torch.zeros(6, 6, dtype=torch.float64)
    torch.ops.quantkern.syrk_accumulate_(acc, x, 1.0)
    torch.testing.assert_close(acc, x.t() @ x)
    with pytest.raises(RuntimeError, match="acc must be contiguous"):
        torch.ops.quantkern.syrk_accumulate_(torch.zeros(5, 5), torch.randn(3, 6), 1.0)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_hessian_streaming_equals_direct(backend):
    g = torch.Generator().manual_seed(1)
    n, T = 48, 16
    seqs = torch.randn(10, T, n, generator=g)
    acc = HessianAccumulator(n, backend=backend)
    acc.add_batch(seqs[:3])          # [B, T, n]
    acc.add_batch(seqs[3])           # [T, n]: one sequence
    acc.add_batch(seqs[4:10].view(2, 3, T, n))  # extra leading dims are sequences too
    assert acc.nsamples == 10
    direct = sum(s.t() @ s for s in seqs) * (2.0 / 10)
    torch.testing.assert_close(acc.H, direct, rtol=1e-5, atol=1e-4)


def test_hessian_errors_and_empty():
    acc = HessianAccumulator(8)
    assert torch.equal(acc.H, torch.zeros(8, 8))
    with pytest.raises(ValueError, match="expected"):
        acc.add_batch(torch.randn(4, 7))
    with pytest.raises(ValueError, match="n must be"):
        HessianAccumulator(0)


def test_asym_fixed_mode():
    g = torch.Generator().manual_seed(2)
    n, T = 32, 12
    xq = torch.randn(5, T, n, generator=g)
    xf = xq + 0.3 * torch.randn(5, T, n, generator=g)
    acc = AsymAccumulator(n, alpha_mode="fixed")
    acc.add_batch(xq[:2], xf[:2])
    acc.add_batch(xq[2:], xf[2:])
    D = sum((f - q).t() @ q for q, f in zip(xq, xf)) * (2.0 / 5)
    H = sum(q.t() @ q for q in xq) * (2.0 / 5)
    torch.testing.assert_close(acc.D, D, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acc.H, H, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="differ"):
        acc.add_batch(xq[:1], xf[:2])


def test_asym_sample_mode_per_sequence_alpha_seeded_once():
    g = torch.Generator().manual_seed(3)
    n, T, S = 16, 8, 7
    xq = torch.randn(S, T, n, generator=g)
    xf = xq + torch.randn(S, T, n, generator=g)
    acc = AsymAccumulator(n, alpha_mode="sample", mixup=5.0, seed=11)
    acc.add_batch(xq[:3], xf[:3])
    acc.add_batch(xq[3:], xf[3:])
    a = sample_alphas(S, np.random.default_rng(11), 5.0)  # one stream, seeded once
    assert np.allclose(acc.alphas, a)
    assert len(set(np.round(a, 12))) == S and (a >= 0).all() and (a <= 0.5).all()
    D = sum(float(al) * (f - q).t() @ q for al, q, f in zip(a, xq, xf)) * (2.0 / S)
    torch.testing.assert_close(acc.D, D, rtol=1e-5, atol=1e-4)
    # same seed, different batching -> same D
    acc2 = AsymAccumulator(n, alpha_mode="sample", mixup=5.0, seed=11)
    for s in range(S):
        acc2.add_batch(xq[s], xf[s])
    torch.testing.assert_close(acc2.D, acc.D, rtol=1e-5, atol=1e-5)


def test_sampled_alpha_mean_matches_beta55():
    a = sample_alphas(20000, np.random.default_rng(0), 5.0)
    assert abs(a.mean() - 0.377) < 0.01


def test_asym_bad_mode():
    with pytest.raises(ValueError, match="alpha_mode"):
        AsymAccumulator(4, alpha_mode="optimize")
