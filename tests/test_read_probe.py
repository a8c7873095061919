"""The benchmark's DRAM read reference (quantkern::read_bandwidth_probe): its checksum is the sum."""
from __future__ import annotations

import pytest
import torch

from quantkern import _ext

pytestmark = pytest.mark.skipif(not _ext.has_cpu(), reason=f"extension not built: {_ext.LOAD_ERROR}")


# ragged around the 64-float vector steps, the 16384-float blocks and the 8-block stream groups; more
# than 16 blocks is split over threads (grain 16 blocks), leaving a group and some single blocks each
SIZES = [0, 1, 63, 127, 129, 16383, 16384, 16385, 100_003, 8 * 16384 + 1, 16 * 16384 * 2 + 77, 25 * 16384 + 5]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("threads", [1, 2])
def test_checksum_is_the_sum(n, threads, isa, rng):
    t = torch.randn(n, generator=rng) + 0.25  # a mean away from 0, so a dropped block changes the sum
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.quantkern.read_bandwidth_probe(t)
    finally:
        torch.set_num_threads(old)
    assert got.dtype == torch.float64 and got.dim() == 0
    want = t.double().sum()
    # fp32 partial sums per 64 KiB block: error well under 1e-5 of sum |x|; one lost or doubled
    # element (|x| ~ 1) is far above it for these sizes
    tol = 1e-6 * t.double().abs().sum().item() + 1e-6
    assert abs(got.item() - want.item()) <= tol, (got.item(), want.item(), tol)


def test_checksum_on_a_view_of_a_bigger_buffer(rng):
    base = torch.randn(3 * 16384 + 5, generator=rng)
    view = base[7:7 + 2 * 16384 + 3]  # contiguous, unaligned start
    got = torch.ops.quantkern.read_bandwidth_probe(view).item()
    assert abs(got - view.double().sum().item()) <= 1e-6 * view.abs().sum().item()


def test_bad_inputs():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.quantkern.read_bandwidth_probe(torch.zeros(10, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.quantkern.read_bandwidth_probe(torch.zeros(10, 4).t())
