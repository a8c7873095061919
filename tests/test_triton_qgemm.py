"""Triton qgemm vs the reference (gptq.dequantize + F.linear), on CPU under TRITON_INTERPRET=1.

fp32 operands go through tl.dot with input_precision="ieee": expected rel err ~3e-7 (we assert 1e-5).
fp16 operands: the activation is fp16 and the (code - zero) tile is exact in fp16; rel err ~3e-4 (assert 1e-2).
bf16 is not tested here: bf16 tl.dot is broken in the Triton interpreter (see notes/environment.md).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from quantkern.formats import gptq, gpu_native
from gpu_cases import GROUPINGS, make_packed, rel_err

triton = pytest.importorskip("triton", reason="triton is not installed")

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
        reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1 (run: TRITON_INTERPRET=1 pytest ...)",
    ),
]

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def _tq():
    from quantkern.triton import qgemm as tq

    return tq


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("sym", [True, False])
def test_qgemm_matches_reference(bits, grouping, sym):
    gen = torch.Generator().manual_seed(1000 * bits + 10 * GROUPINGS.index(grouping) + sym)
    m, n = 80, 200  # ragged in every sense: m % 64 != 0, n % 32 != 0, n % 128 != 0
    t = make_packed(m, n, bits, grouping, sym, gen)
    W = gptq.dequantize(t, bits)
    p = gpu_native.prepare(t, bits, device=DEVICE)
    assert (p.perm is not None) == (grouping in ("actorder", "uneven"))
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(3, n, generator=gen).to(dtype)
        bias = torch.randn(m, generator=gen).to(dtype)
        ref = F.linear(x.float(), W, bias.float())
        y = _tq().qgemm(x.to(DEVICE), p, bias.to(DEVICE)).cpu()
        assert y.dtype == dtype and y.shape == (3, m)
        assert torch.isfinite(y).all()
        assert rel_err(y, ref) < TOL[dtype], (dtype, rel_err(y, ref))


def test_layout_roundtrip_every_grouping():
    """The GPU layout (permuted, repacked) dequantizes back to exactly the reference weight."""
    gen = torch.Generator().manual_seed(7)
    for bits in (2, 3, 4, 8):
        for grouping in GROUPINGS:
            t = make_packed(24, 100, bits, grouping, False, gen)
            p = gpu_native.prepare(t, bits)
            assert torch.equal(gpu_native.dequantize(p), gptq.dequantize(t, bits)), (bits, grouping)
            want_uniform = grouping not in ("uneven",)
            assert (p.group_size > 0) == want_uniform, (grouping, p.group_size)


@pytest.mark.parametrize("batch", [1, 17])
def test_qgemm_batch_shapes_and_no_bias(batch):
    gen = torch.Generator().manual_seed(batch)
    m, n, bits = 64, 256, 4  # group 128 on a tile boundary: the tile-uniform path
    t = make_packed(m, n, bits, "g128", True, gen)
    p = gpu_native.prepare(t, bits, device=DEVICE)
    assert p.group_size == 128
    x = torch.randn(2, batch, n, generator=gen)  # leading dims are kept
    y = _tq().qgemm(x.to(DEVICE), p).cpu()
    assert y.shape == (2, batch, m)
    ref = F.linear(x, gptq.dequantize(t, bits))
    assert rel_err(y, ref) < 1e-5


def test_qgemm_bad_input():
    gen = torch.Generator().manual_seed(3)
    t = make_packed(32, 64, 4, "g32", True, gen)
    p = gpu_native.prepare(t, 4, device=DEVICE)
    with pytest.raises(ValueError, match="input features"):
        _tq().qgemm(torch.randn(2, 63, device=DEVICE), p)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        _tq().qgemm(torch.ones(2, 64, dtype=torch.int32, device=DEVICE), p)
    with pytest.raises(ValueError, match="bias"):
        _tq().qgemm(torch.randn(2, 64, device=DEVICE), p, torch.randn(31, device=DEVICE))
