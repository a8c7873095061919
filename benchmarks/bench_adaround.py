"""AdaRound per-iteration cost: closed-form gradient (quantkern) vs autograd through the loss (the
previous implementation, kept as the reference in tests/test_adaround.py), side by side in one process.

    flock /work/cpu.lock python benchmarks/bench_adaround.py --quiet --json benchmarks/results/adaround_speed.json

For each SmolLM2-sized shape m x n (W [m, n], H [n, n], 2-bit group-64 RTN grid) both run the full
solver at `lo` and `hi` iterations; the per-iteration time is the slope (t_hi - t_lo) / (hi - lo), so
set-up and the final loss evaluations cancel. `matmul_s` is one [m, n] @ [n, n] matmul, the floor of
an iteration of the closed-form version (its only matmul). Best of `repeat` runs each.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from machine import machine_info  # noqa: E402
from quantkern import grid  # noqa: E402
from quantkern.solvers.adaround import adaround  # noqa: E402
from quantkern.spec import QuantSpec  # noqa: E402


def reference():
    spec = importlib.util.spec_from_file_location("test_adaround", HERE.parent / "tests" / "test_adaround.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.adaround_autograd


def best(fn, repeat):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1536x576,576x1536,576x576")
    p.add_argument("--lo", type=int, default=5)
    p.add_argument("--hi", type=int, default=25)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--quiet", action="store_true", help="the run holds the CPU to itself (recorded as contended=false)")
    a = p.parse_args(argv)
    old = reference()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in a.shapes.split(","):
        m, n = map(int, shape.split("x"))
        W = torch.randn(m, n, generator=gen)
        X = torch.randn(n, 4 * n, generator=gen)
        H = 2 * X @ X.t() / X.shape[1]
        spec = QuantSpec(bits=2, group_size=64)
        _, scales, zeros, g_idx = grid.rtn(W, spec)
        S, Z = scales[g_idx.long()].t().contiguous(), zeros[g_idx.long()].t().contiguous()
        with torch.no_grad():
            adaround(W, H, S, Z, spec.maxq, iters=2)  # warm-up (thread pool, allocator)
            new_s = {k: best(lambda: adaround(W, H, S, Z, spec.maxq, iters=k), a.repeat) for k in (a.lo, a.hi)}
        old_s = {k: best(lambda: old(W, H, S, Z, spec.maxq, iters=k), a.repeat) for k in (a.lo, a.hi)}
        D = torch.randn(m, n, generator=gen)
        mm = best(lambda: D @ H, 5 * a.repeat)
        it_new = (new_s[a.hi] - new_s[a.lo]) / (a.hi - a.lo)
        it_old = (old_s[a.hi] - old_s[a.lo]) / (a.hi - a.lo)
        row = {"m": m, "n": n, "iter_s_closed_form": it_new, "iter_s_autograd": it_old, "speedup": it_old / it_new,
               "matmul_s": mm, "closed_form_over_matmul": it_new / mm}
        rows.append(row)
        print(f"{m}x{n}: closed form {1e3 * it_new:.1f} ms/iter, autograd {1e3 * it_old:.1f} ms/iter, "
              f"speed-up {it_old / it_new:.2f}x; one matmul {1e3 * mm:.1f} ms", flush=True)
    if a.json:
        info = machine_info(contended=not a.quiet)
        kernels = {"closed_form": "torch: quantkern.solvers.adaround (closed-form gradient)",
                   "autograd": "torch: tests/test_adaround.py adaround_autograd"}
        Path(a.json).write_text(json.dumps({"machine": info, "kernels": kernels, "lo": a.lo, "hi": a.hi, "rows": rows},
                                           indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
