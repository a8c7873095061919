"""qgemm on the CPU beside torch's own kernels: a pytest-benchmark suite, one group per shape and batch.

    pytest benchmarks/bench_qgemm.py --benchmark-only [--bench-quick] [--bench-threads N]
    python benchmarks/bench_qgemm.py [--quick] [--threads N] [--json PATH] [--png PATH] [--quiet] [-k EXPR]

Groups: weight [out, in] 4096x14336 and 14336x4096, batch 1, 8 and 128 (--bench-quick: the first shape,
batch 1 and 128). In each group every quantkern case (4, 3 and 2 bits, group 128, fp32 activations,
the default kernel choice: `kernel` in the results says which one ran) is timed interleaved with:
  read_ref    quantkern's streaming read loop over 32 MiB fp32 tensors: the read-bandwidth reference of
              that group ("% read ref" = the case's GB/s over it)
  fp32, bf16  torch F.linear with an fp32 / bf16 weight
  torch_int4  torch's int4 CPU kernel (_weight_int4pack_mm_for_cpu, group 128, bf16 activations: its
              fast path), where this torch has it
Every case rotates through distinct weights (2x the LLC, >= 256 MiB), so each call reads its weight
from DRAM. GB/s = GPTQ weight bytes (packed codes + fp16 scales + packed zeros) / median time.
"""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from machine import kernel
from sidebyside import Case, script_main

from quantkern.formats import bitstream  # noqa: E402
from quantkern.ops import qgemm as Q  # noqa: E402

SUITE = "qgemm_cpu"
SHAPES = [(4096, 14336), (14336, 4096)]  # (out m, in n)
BATCHES = [1, 8, 128]
GROUP = 128
QK_BITS = [4, 3, 2]
READ_CHUNK = 32 * 2**20  # bytes per read_ref call (about one 4-bit 4096x14336 weight)


def random_gptq(m: int, n: int, bits: int, gen: torch.Generator) -> dict:
    """Random packed GPTQ v1 tensors (timing does not depend on the values)."""
    G = -(-n // GROUP)
    full = (-(2**31), 2**31 - 1)
    return {
        "qweight": torch.randint(*full, (bitstream.packed_rows(n, bits), m), dtype=torch.int32, generator=gen),
        "qzeros": torch.randint(*full, (G, bitstream.packed_rows(m, bits)), dtype=torch.int32, generator=gen),
        "scales": (torch.rand(G, m, generator=gen) * 0.01 + 1e-3).half(),
        "g_idx": (torch.arange(n) // GROUP).to(torch.int32),
    }


def gptq_bytes(m: int, n: int, bits: int) -> int:
    """qweight + fp16 scales + qzeros of one layer."""
    G = -(-n // GROUP)
    return bitstream.packed_rows(n, bits) * m * 4 + G * m * 2 + G * bitstream.packed_rows(m, bits) * 4


@functools.lru_cache(maxsize=1)
def torch_int4_available() -> bool:
    try:
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(32, 128, dtype=torch.int32), 2)
        sz = torch.zeros(1, 32, 2, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, 128, dtype=torch.bfloat16), w, GROUP, sz)
        return True
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=1)
def cases_for_shape(m: int, n: int) -> dict:
    """Every case of one weight shape, weights built on first use and kept for all its batches (one shape
    in memory at a time: the cache holds one entry). Calls take (x, weight) through `bind_x` below."""
    G = -(-n // GROUP)
    cases = {
        "read_ref": Case("read_ref", "read reference: streaming read loop, 32 MiB fp32 tensors",
                         lambda w: torch.ops.quantkern.read_bandwidth_probe(w),
                         lambda g: torch.rand(READ_CHUNK // 4, generator=g), READ_CHUNK,
                         kernel="cpu:read_bandwidth_probe", reference=True),
        "fp32": Case("fp32", "torch fp32 F.linear", None, lambda g: torch.randn(m, n, generator=g), m * n * 4,
                     kernel="torch:F.linear fp32"),
        "bf16": Case("bf16", "torch bf16 F.linear", None, lambda g: torch.randn(m, n, generator=g).bfloat16(),
                     m * n * 2, kernel="torch:F.linear bf16"),
    }
    if torch_int4_available():
        def int4_build(g):
            codes = torch.randint(0, 16, (m, n), dtype=torch.int32, generator=g)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            sz = torch.stack([torch.rand(G, m, generator=g) * 0.01, torch.randn(G, m, generator=g) * 0.01], -1)
            return packed, sz.bfloat16().contiguous()

        cases["torch_int4"] = Case("torch_int4", "torch int4 (_weight_int4pack_mm_for_cpu, bf16 x)", None, int4_build,
                                   m * n // 2 + G * m * 4, kernel="torch:_weight_int4pack_mm_for_cpu")
    for bits in QK_BITS:
        cases[f"qk{bits}"] = Case(f"qk{bits}", f"quantkern {bits}-bit g{GROUP} (fp32 x)", None,
                                  lambda g, b=bits: Q.prepare(random_gptq(m, n, b, g), b, "cpu"),
                                  gptq_bytes(m, n, bits))
    return cases


def bind_x(c: Case, x: torch.Tensor, bits: int | None = None) -> Case:
    """The case's call with this group's activations (the weights stay shared across batches)."""
    if c.name == "read_ref":
        return c
    if c.name in ("fp32", "bf16"):
        c.fn = lambda w: F.linear(x, w)
    elif c.name == "torch_int4":
        c.fn = lambda w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[0], GROUP, w[1])
    else:
        c.fn = lambda p: Q.qgemm(x, None, bits, prepared=p)
        c.kernel = kernel("qgemm", bits=bits, batch=x.shape[0], in_features=x.shape[1])
    return c


def pytest_generate_tests(metafunc):
    if "qgemm_group" in metafunc.fixturenames:
        quick = metafunc.config.getoption("bench_quick")
        shapes, batches = (SHAPES[:1], [1, 128]) if quick else (SHAPES, BATCHES)
        params = [(s, b, bits) for s in shapes for b in batches for bits in QK_BITS]
        metafunc.parametrize("qgemm_group", params, ids=[f"{s[0]}x{s[1]}-b{b}-w{bits}" for s, b, bits in params])


@pytest.mark.skipif(not hasattr(torch.ops.quantkern, "qgemm_cpu"), reason="quantkern extension not built")
def test_qgemm_cpu(side_by_side, qgemm_group):
    (m, n), batch, bits = qgemm_group
    cases = cases_for_shape(m, n)
    gen = torch.Generator().manual_seed(batch)
    x32 = torch.randn(batch, n, generator=gen)
    xb = x32.bfloat16()
    base = [bind_x(cases["read_ref"], x32), bind_x(cases["fp32"], x32), bind_x(cases["bf16"], xb)]
    if "torch_int4" in cases:
        base.append(bind_x(cases["torch_int4"], xb))
    case = bind_x(cases[f"qk{bits}"], x32, bits)
    side_by_side(SUITE, f"qgemm {m}x{n} batch {batch}", case, base,
                 params={"shape": [m, n], "batch": batch, "bits": bits, "group_size": GROUP}, read_ref="read_ref")


if __name__ == "__main__":
    sys.exit(script_main(os.path.abspath(__file__)))
