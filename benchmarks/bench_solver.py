"""The fused C++ solver beside the pure-torch loop and the GEMM floor: a pytest-benchmark suite, one group
per shape.

    pytest benchmarks/bench_solver.py --benchmark-only [--bench-quick] [--bench-threads N]
    python benchmarks/bench_solver.py [--quick] [--threads N] [--json PATH] [--quiet] [-k EXPR]

Shapes m x n (m output rows, n input columns = the size of H): 1024x1024 and 4096x4096 (--bench-quick:
1024x1024). 4-bit, group 128, a random well-conditioned upper-triangular U (only speed is measured).
Cases and the baselines timed interleaved with each:
  gptq_block_solve  quantkern's fused CPU kernel (dynamic group params), beside
      torch_loop    the pure-torch reference op (same algorithm: per-column torch ops, one GEMM per block)
      gemm_floor    one torch.matmul [m, n] @ [n, k] with the flops of the blocked algorithm (tail GEMMs
                    sum 2 m B (n - i2) + in-block rank-1 updates m n (B - 1)): a perfect fused kernel
                    runs every flop at the rate of one big matmul, so gptq_block_solve / gemm_floor >= ~1
  ksnrq4            the K-SNRQ beam kernel (K = 4, static group params), beside
      snrq_greedy   the greedy kernel on the same kind of problem (the cost of the beam)
All run at the run's thread count (--bench-threads; torch's default otherwise) except torch_loop, which
runs at one thread (its per-op threading collapses on a shared CPU: 6.3 s instead of ~0.3 s at 1024^2
on 2 contended threads). Each case rotates
through distinct problems (2x the LLC, >= 256 MiB of W and U).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from machine import kernel
from sidebyside import Case, script_main

from quantkern import QuantSpec, _ext, grid  # noqa: E402
from quantkern.ops import solver as S  # noqa: E402

SUITE = "solver"
SHAPES = [(1024, 1024), (4096, 4096)]
BLOCK = 128
BITS = 4
GROUP = 128


def problem(m: int, n: int, gen: torch.Generator):
    A = torch.randn(n, n, generator=gen) / n**0.5
    U = torch.triu(A * 0.05) + torch.eye(n)  # stands in for chol(H^-1): only speed is measured here
    W = torch.randn(m, n, generator=gen)
    gidx = (torch.arange(n) // GROUP).to(torch.int32)
    G = (n + GROUP - 1) // GROUP
    return W, U, gidx, torch.zeros(G, m), torch.zeros(G, m)


def static_problem(m: int, n: int, gen: torch.Generator):
    """The same with the group params fixed up front (what K-SNRQ and the greedy SNRQ kernel take)."""
    W, U, gidx, _, _ = problem(m, n, gen)
    s, z = grid.group_params(W, QuantSpec(bits=BITS, group_size=GROUP), gidx)
    return W, U, gidx, s, z


def blocked_flops(m: int, n: int, B: int = BLOCK) -> float:
    tail = sum(2.0 * m * B * (n - min(i1 + B, n)) for i1 in range(0, n, B))
    inblock = sum(1.0 * m * (min(i1 + B, n) - i1) * (min(i1 + B, n) - i1 - 1) for i1 in range(0, n, B))
    return tail + inblock


def cases(m: int, n: int) -> dict:
    nbytes = (m * n + n * n) * 4
    k = max(int(blocked_flops(m, n) / (2.0 * m * n)), 1)
    dyn = dict(make=lambda g: problem(m, n, g), input_bytes=nbytes)
    static = dict(make=lambda g: static_problem(m, n, g), input_bytes=nbytes)
    return {
        "gptq_block_solve": Case("gptq_block_solve", "quantkern fused CPU solver (dynamic groups)",
                                 lambda p: S.gptq_block_solve_cpu(p[0], p[1], None, *p[2:], BITS, True, True, BLOCK),
                                 kernel=kernel("gptq_block_solve"), work_bytes=0, **dyn),
        "torch_loop": Case("torch_loop", "pure-torch reference solver (blocked loop)",
                           lambda p: S.gptq_block_solve_reference(p[0], p[1], None, *p[2:], BITS, True, True, BLOCK),
                           kernel="torch:gptq_block_solve_reference", work_bytes=0, threads=1, **dyn),
        "gemm_floor": Case("gemm_floor", f"torch.matmul [{m}, {n}] @ [{n}, {k}] (the blocked algorithm's flops)",
                           lambda ab: torch.matmul(*ab), lambda g: (torch.randn(m, n, generator=g),
                                                                    torch.randn(n, k, generator=g)),
                           (m * n + n * k) * 4, kernel="torch:matmul fp32", work_bytes=0),
        "ksnrq4": Case("ksnrq4", "quantkern K-SNRQ beam kernel, K = 4",
                       lambda p: S.ksnrq_solve_cpu(*p, BITS, 4, BLOCK), kernel=kernel("ksnrq_solve"), work_bytes=0,
                       **static),
        "snrq_greedy": Case("snrq_greedy", "quantkern greedy kernel, static groups (SNRQ's)",
                            lambda p: S.gptq_block_solve_cpu(p[0], p[1], None, *p[2:], BITS, True, False, BLOCK),
                            kernel=kernel("gptq_block_solve"), work_bytes=0, **static),
    }


PAIRS = {"gptq_block_solve": ["torch_loop", "gemm_floor"], "ksnrq4": ["snrq_greedy"]}


def pytest_generate_tests(metafunc):
    if "solver_group" in metafunc.fixturenames:
        shapes = SHAPES[:1] if metafunc.config.getoption("bench_quick") else SHAPES
        params = [(s, c) for s in shapes for c in PAIRS]
        metafunc.parametrize("solver_group", params, ids=[f"{s[0]}x{s[1]}-{c}" for s, c in params])


@pytest.mark.skipif(not _ext.has_cpu(), reason="quantkern extension not built")
def test_solver(side_by_side, solver_group):
    (m, n), name = solver_group
    cs = cases(m, n)
    side_by_side(SUITE, f"solver {m}x{n}", cs[name], [cs[b] for b in PAIRS[name]],
                 params={"shape": [m, n], "bits": BITS, "group_size": GROUP, "blocksize": BLOCK,
                         "blocked_gflop": blocked_flops(m, n) / 1e9})


if __name__ == "__main__":
    sys.exit(script_main(os.path.abspath(__file__)))
