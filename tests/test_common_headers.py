"""The GPU kernels' bit/index logic (csrc/common/qgemm_layout.h) run on CPU through the
quantkern::gpu_qgemm_* CPU ops, compared with the pure-torch reference (gptq.dequantize + F.linear)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantkern import _ext
from quantkern.formats import gptq, gpu_native
from gpu_cases import GROUPINGS, make_packed, rel_err

pytestmark = pytest.mark.skipif(not _ext.has_cpu(), reason=f"extension not built ({_ext.LOAD_ERROR})")


def _ops():
    return torch.ops.quantkern


def _args(p):
    return (p.qweight, p.scales, p.zeros, p.g_idx, p.bits, p.group_size)


def _kernel_order(W: torch.Tensor, p) -> torch.Tensor:
    return W if p.perm is None else W[:, p.perm]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_dequant_t_bit_exact(bits, grouping):
    gen = torch.Generator().manual_seed(17 * bits + GROUPINGS.index(grouping))
    for m, n in ((8, 32), (12, 200), (4, 1)):
        t = make_packed(m, n, bits, grouping, sym=False, gen=gen)
        p = gpu_native.prepare(t, bits)
        W = gptq.dequantize(t, bits)
        Wt = _ops().gpu_qgemm_dequant_t(*_args(p), torch.float32)
        assert Wt.shape == (n, m)
        assert torch.equal(Wt, _kernel_order(W, p).t()), (bits, grouping, m, n)  # the magic-number trick is exact
        assert torch.equal(_ops().gpu_qgemm_dequant_t(*_args(p), torch.float16), Wt.half())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("sym", [True, False])
def test_gemv_matches_reference(bits, grouping, sym):
    gen = torch.Generator().manual_seed(31 * bits + 3 * GROUPINGS.index(grouping) + sym)
    m, n = 20, 300  # n ragged: 300 % 32 != 0, % 128 != 0
    t = make_packed(m, n, bits, grouping, sym, gen)
    p = gpu_native.prepare(t, bits)
    W = gptq.dequantize(t, bits)
    x = torch.randn(3, n, generator=gen)
    y = _ops().gpu_qgemm_gemv(gpu_native.gather_input(x, p), *_args(p))
    assert y.dtype == torch.float32 and y.shape == (3, m)
    assert rel_err(y, F.linear(x, W)) < 1e-5
    bias = torch.randn(m, generator=gen)
    yb = _ops().gpu_qgemm_gemv(gpu_native.gather_input(x.half(), p), *_args(p), bias.half())
    assert yb.dtype == torch.float16
    assert rel_err(yb, F.linear(x.half().float(), W, bias.half().float())) < 1e-2


def test_chunk_uniform_and_per_code_paths_agree():
    """group 32 in the chunk-uniform path vs the same weight through the per-code path (group_size=-1)."""
    gen = torch.Generator().manual_seed(5)
    t = make_packed(16, 96, 3, "g32", False, gen)
    p = gpu_native.prepare(t, 3)
    assert p.group_size == 32
    x = torch.randn(2, 96, generator=gen)
    a = _ops().gpu_qgemm_gemv(x, *_args(p))
    b = _ops().gpu_qgemm_gemv(x, p.qweight, p.scales, p.zeros, p.g_idx, 3, -1)
    assert rel_err(a, b) < 1e-6


def test_layout_ops_reject_bad_input():
    gen = torch.Generator().manual_seed(9)
    p = gpu_native.prepare(make_packed(8, 64, 4, "g32", True, gen), 4)
    with pytest.raises(RuntimeError, match="bits must be"):
        _ops().gpu_qgemm_dequant_t(p.qweight, p.scales, p.zeros, p.g_idx, 5, 32, torch.float32)
    with pytest.raises(RuntimeError, match="rows, expected"):
        _ops().gpu_qgemm_dequant_t(p.qweight, p.scales, p.zeros, p.g_idx, 3, 32, torch.float32)
    with pytest.raises(RuntimeError, match="zeros must be uint8"):
        _ops().gpu_qgemm_dequant_t(p.qweight, p.scales, p.zeros.int(), p.g_idx, 4, 32, torch.float32)
    with pytest.raises(RuntimeError, match="x must be"):
        _ops().gpu_qgemm_gemv(torch.randn(2, 63), *_args(p))


MMA_GROUPINGS = GROUPINGS + ("g64",)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("grouping", MMA_GROUPINGS)
def test_mma_fragment_emulation_matches_reference(bits, grouping):
    """The CPU impl of gpu_qgemm_mma runs the tensor-core kernel's lane/fragment index maps
    (qk::lane_codes8, mma_a_chan / mma_b_chan, the PTX A/B/C layouts): equal to x @ W^T with W rounded
    to x's dtype up to fp32 summation order; ragged m (36: a partial n8 tile), batch (20: a partial
    m16 tile), n (300: partial chunk; 328: partial chunk whose high words do not exist at 3/4 bits)."""
    gen = torch.Generator().manual_seed(101 * bits + MMA_GROUPINGS.index(grouping))
    for n in (300, 328):
        t = make_packed(36, n, bits, grouping, sym=bool(n % 3), gen=gen)
        p = gpu_native.prepare(t, bits)
        W = gptq.dequantize(t, bits)
        x = torch.randn(20, n, generator=gen)
        bias = torch.randn(36, generator=gen)
        for dt in (torch.float16, torch.bfloat16):
            xd, bd = x.to(dt), bias.to(dt)
            y = _ops().gpu_qgemm_mma(gpu_native.gather_input(xd, p), *_args(p), bd)
            assert y.dtype == dt and y.shape == (20, 36)
            exact = F.linear(xd.float(), W.to(dt).float(), bd.float())  # the kernel's operands, fp32 sums
            # only the fp32 summation order and the output rounding (bf16: 8 significant bits) differ
            assert rel_err(y, exact) < (4e-3 if dt == torch.bfloat16 else 1e-3), (bits, grouping, n, dt)
            assert rel_err(y.float() - bd.float(), F.linear(xd.float(), W.to(dt).float())) < 1e-2


def test_mma_rejects_bad_input():
    gen = torch.Generator().manual_seed(21)
    p8 = gpu_native.prepare(make_packed(8, 64, 8, "g32", True, gen), 8)
    with pytest.raises(RuntimeError, match="supports bits 2, 3 and 4"):
        _ops().gpu_qgemm_mma(torch.randn(9, 64).half(), *_args(p8))
    p = gpu_native.prepare(make_packed(8, 64, 4, "g32", True, gen), 4)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        _ops().gpu_qgemm_mma(torch.randn(9, 64), *_args(p))
    with pytest.raises(RuntimeError, match="x must be"):
        _ops().gpu_qgemm_mma(torch.randn(9, 63).half(), *_args(p))
