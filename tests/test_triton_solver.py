"""Triton gptq_block_solve vs the pure-torch reference (csrc/common/solver.h contract).

Runs under TRITON_INTERPRET=1 on CPU (small shapes: the interpreter walks every column of every row
tile in Python) or on a CUDA device. Codes may differ from the reference only at floating-point ties
(solver.h): mismatch rate < 0.1 %, total loss to 1e-4 relative; group params must be bit-identical.
"""
from __future__ import annotations

import os

import pytest
import torch

from quantkern import QuantSpec, grid
from quantkern.ops import solver as S
from solver_problems import correlated, factor

pytest.importorskip("triton", reason="triton is not installed")

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
        reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1",
    ),
]
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

CASES = [  # m, n, group_size, blocksize, bits, sym
    (13, 40, 8, 16, 3, True),      # several blocks, groups inside blocks
    (16, 37, -1, 16, 4, False),    # one group, ragged last block
    (9, 45, 12, 16, 2, False),     # groups straddle block boundaries, ragged last group
]


def _problem(m, n, G, bits, sym, seed):
    W, H, D = correlated(m, n, seed=seed)
    _, U = factor(H)
    gidx = (torch.arange(n) // (G if G > 0 else n)).to(torch.int32)
    scales, zeros = grid.group_params(W, QuantSpec(bits=bits, group_size=G, sym=sym), gidx)
    P = 0.25 * torch.triu(D @ U.t(), 1) @ U
    return W, U, P, gidx, scales, zeros


@pytest.mark.parametrize("m,n,G,B,bits,sym", CASES)
@pytest.mark.parametrize("dynamic,with_p", [(False, False), (True, False), (True, True)])
def test_triton_block_solve_matches_reference(m, n, G, B, bits, sym, dynamic, with_p):
    from quantkern.triton import solver as TS

    W, U, P, gidx, scales, zeros = _problem(m, n, G, bits, sym, seed=m * n + bits)
    P = P if with_p else None
    ref = S.gptq_block_solve(W, U, P, gidx, scales, zeros, bits, sym, dynamic, B, backend="reference")
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = TS.gptq_block_solve(to(W), to(U), to(P), to(gidx), to(scales), to(zeros), bits, sym, dynamic, B)
    codes, sc, ze, loss = (t.cpu() for t in out)
    assert codes.shape == (m, n) and int(codes.max()) <= (1 << bits) - 1
    assert (codes != ref[0]).float().mean().item() < 1e-3
    assert abs(loss.sum().item() - ref[3].sum().item()) <= 1e-4 * abs(ref[3].sum().item())
    assert torch.equal(sc, ref[1]) and torch.equal(ze, ref[2])
    assert torch.isfinite(loss).all()


def test_triton_block_solve_registered_and_inputs_untouched():
    W, U, P, gidx, scales, zeros = _problem(8, 24, 8, 4, True, seed=3)
    before = [t.clone() for t in (W, U, P, scales, zeros)]
    from quantkern.ops import registry

    fn = registry.implementation("gptq_block_solve", "triton")
    to = lambda t: t.to(DEVICE)  # noqa: E731
    fn(to(W), to(U), to(P), to(gidx), to(scales), to(zeros), 4, True, True, 16)
    for a, b in zip(before, (W, U, P, scales, zeros)):
        assert torch.equal(a, b)
