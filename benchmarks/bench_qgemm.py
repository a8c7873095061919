"""qgemm on the CPU against torch's own kernels, side by side in one process.

Cases (weight [out, in]): 4096x14336 and 14336x4096, batch 1, 8 and 128:
  torch fp32 F.linear, torch bf16 F.linear, torch int4 (_weight_int4pack_mm_for_cpu, group 128, bf16
  activations: its fast path), quantkern cpu at 4, 3 and 2 bits (group 128, fp32 activations, exact
  fp32 paths; 2/3-bit decode on the AMX GEMV where the CPU has AMX), the same 2/3-bit weights on the
  AVX-512 LUT/FMA GEMVs without AMX (qk3_avx512, qk2_avx512: the side-by-side comparison), and quantkern
  4-bit with the opt-in int8-activation decode path (qk4_int8x, approximate).
Every case rotates over enough distinct weights that each call reads its weight from DRAM, not from
the last-level cache: --rotate-mb per case, by default twice the LLC size the OS reports (sysfs), at
least 256 MB. The DRAM read bandwidth reference is one more case in the same rounds, timed by the same
code: `dram_read`, quantkern's streaming read loop (torch.ops.quantkern.read_bandwidth_probe: AVX-512
loads into independent accumulators, one contiguous range per thread read as 8 side-by-side streams, a
checksum so it cannot be skipped) over distinct fp32 tensors of 32 MiB each (the same rotation size).
On the 2-core test VM it reads ~31 GB/s, like MKL's fp32 GEMV; torch.sum and a one-stream loop ~25-27. Each case's "% BW" is its effective GB/s over the median GB/s of dram_read
in the same shape and batch. Effective GB/s = GPTQ weight bytes (packed codes + fp16 scales + packed
zeros) / time. Timings interleave the candidates round by round so background load hits all alike.

Script:  python benchmarks/bench_qgemm.py [--quick] [--json PATH] [--png PATH] [--threads N]
         [--shapes 4096x14336 ...] [--batches 1 8 ...] [--merge]   (--merge keeps the rows of other shapes and
         batches already in --json,
         so a full run can be split over several shorter runs)
pytest:  pytest benchmarks/bench_qgemm.py --benchmark-only   (one group per shape and batch)
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import quantkern
from quantkern.formats import bitstream
from quantkern.ops import qgemm as Q

SHAPES = [(4096, 14336), (14336, 4096)]  # (out m, in n)
BATCHES = [1, 8, 128]
GROUP = 128
QK_BITS = [4, 3, 2]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Targets from issue 4 (time ratios; None = not a target)
TARGETS_B1 = {"qk4": ("torch_int4", 0.9), "qk3": ("torch_int4", 0.75), "qk2": ("torch_int4", 0.55)}
TARGET_B128 = ("fp32", 1.1)


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


class Case:
    """One implementation at one shape: a list of distinct weights and a call on one of them."""

    def __init__(self, name: str, label: str, bytes_per_weight: int, build, run, x_dtype, shares=None):
        self.name, self.label, self.bytes_per_weight = name, label, bytes_per_weight
        self.build, self.run, self.x_dtype = build, run, x_dtype
        self.shares = shares  # name of a case whose weights this one runs on (same bytes, less memory)
        self.weights: list = []

    def setup(self, rotate_bytes: int, gen, others=()):
        src = next((c for c in others if c.name == self.shares and c.weights), None)
        if src is not None:
            self.weights = src.weights
            return
        count = max(2, math.ceil(rotate_bytes / self.bytes_per_weight))
        self.weights = [self.build(gen) for _ in range(count)]

    def sweep(self, x) -> tuple[float, float]:
        """(wall, process CPU) seconds per call, one call on each distinct weight. CPU time counts only
        while this process runs, so at --threads 1 it is a contention-robust view of the work."""
        c0, t0 = time.process_time(), time.perf_counter()
        for w in self.weights:
            self.run(x, w)
        return (time.perf_counter() - t0) / len(self.weights), (time.process_time() - c0) / len(self.weights)


READ_CHUNK = 32 * 2**20  # bytes per dram_read call (about one 4-bit 4096x14336 weight)


def _named(x, kernel: str, max_batch: int):
    """`kernel` (quantkern/kernels.py) for up to max_batch tokens where this CPU runs it, else the selector's."""
    ok = x.shape[0] <= max_batch and kernel in quantkern.kernels.runnable("qgemm", 4 if "int8" in kernel else 2)
    return kernel if ok else None


def make_cases(m: int, n: int, names=None) -> list[Case]:
    G = -(-n // GROUP)
    cases = [
        Case("dram_read", "read-only reference: streaming read loop over 32 MiB fp32 tensors (same rotation)",
             READ_CHUNK, lambda g: torch.rand(READ_CHUNK // 4, generator=g), lambda x, w: read_probe(w),
             torch.float32),
        Case("fp32", "torch fp32 F.linear", m * n * 4, lambda g: torch.randn(m, n, generator=g),
             lambda x, w: F.linear(x, w), torch.float32),
        Case("bf16", "torch bf16 F.linear", m * n * 2, lambda g: torch.randn(m, n, generator=g).bfloat16(),
             lambda x, w: F.linear(x, w), torch.bfloat16),
    ]

    def int4_build(g):
        codes = torch.randint(0, 16, (m, n), dtype=torch.int32, generator=g)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        sz = torch.stack([torch.rand(G, m, generator=g) * 0.01, torch.randn(G, m, generator=g) * 0.01], -1)
        return packed, sz.bfloat16().contiguous()

    cases.append(Case("torch_int4", "torch int4 (_weight_int4pack_mm_for_cpu, bf16 x)", m * n // 2 + G * m * 4,
                      int4_build, lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[0], GROUP, w[1]),
                      torch.bfloat16))

    def packed_bytes(bits):  # qweight + fp16 scales + qzeros of one layer
        return bitstream.packed_rows(n, bits) * m * 4 + G * m * 2 + G * bitstream.packed_rows(m, bits) * 4

    def packed_build(bits):
        return lambda g: Q.prepare(random_gptq(m, n, bits, g), bits, "cpu")

    for bits in QK_BITS:
        cases.append(Case(f"qk{bits}", f"quantkern {bits}-bit g{GROUP} (fp32 x)", packed_bytes(bits), packed_build(bits),
                          lambda x, p, b=bits: Q.qgemm(x, None, b, prepared=p), torch.float32))
    # the same 2/3-bit weights on the AVX-512 paths that were the default before the AMX GEMV (LUT GEMV
    # <= 2 tokens, FMA GEMV <= 8, panels above): AMX against them, side by side. Same as qk{bits} where
    # the CPU has no AMX.
    cpu = Q.get_backend("cpu")
    for bits in (3, 2):
        cases.append(Case(f"qk{bits}_avx512", f"quantkern {bits}-bit g{GROUP}, AVX-512 LUT/FMA GEMV (no AMX)",
                          packed_bytes(bits), packed_build(bits),
                          lambda x, p: cpu.run(x, p.layout, None, _named(x, "qgemm_lut_avx512" if x.shape[0] <= 2
                                                                          else "qgemm_gemv_avx512", 8)),
                          torch.float32, shares=f"qk{bits}"))
    # opt-in int8-activation 4-bit decode path (approximate: QUANTKERN_CPU_INT8_ACT=1); exact path above 8 tokens
    cases.append(Case("qk4_int8x", "quantkern 4-bit, int8 activations (opt-in, approximate)", packed_bytes(4),
                      packed_build(4),
                      lambda x, p: cpu.run(x, p.layout, None, _named(x, "qgemm_int8_avx512vnni", 8)), torch.float32))
    return [c for c in cases if names is None or c.name in names]


def llc_bytes() -> int:
    """Size of the largest cache the OS reports for cpu0 (0 if unknown)."""
    base, best = "/sys/devices/system/cpu/cpu0/cache", 0
    try:
        for d in os.listdir(base):
            if not d.startswith("index"):
                continue
            with open(os.path.join(base, d, "size")) as f:
                txt = f.read().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1:], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best


def default_rotate_mb() -> int:
    """Distinct weight bytes per case: twice the reported LLC (a VM may see the whole host's L3), >= 256 MB."""
    return max(256, 2 * llc_bytes() // 2**20)


def read_probe(t: torch.Tensor) -> torch.Tensor:
    """Streams t once (all threads); returns its sum as a checksum."""
    return torch.ops.quantkern.read_bandwidth_probe(t)


def dram_read_gbs(mb: int = 1024, repeats: int = 5) -> float:
    """Best-of read bandwidth of one large tensor (threads as set); informational, see dram_read."""
    t = torch.ones(mb * 2**20 // 4)
    read_probe(t)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        read_probe(t)
        best = min(best, time.perf_counter() - t0)
    return t.numel() * 4 / best / 1e9


def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "quantkern": quantkern.__version__,
        "quantkern_build": quantkern._ext.build_info(),
        "loadavg_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
    }


def run(quick: bool, rounds: int, rotate_mb: int, only=None, shapes=None, batches=None) -> dict:
    gen = torch.Generator().manual_seed(0)
    bw1 = dram_read_gbs(max(1024, rotate_mb))
    print(f"DRAM read, one {max(1024, rotate_mb)} MB tensor, streaming read loop ({torch.get_num_threads()} threads): {bw1:.1f} GB/s;"
          f" rotating {rotate_mb} MB per case (LLC reported: {llc_bytes() / 2**20:.0f} MiB)")
    shapes = shapes or (SHAPES[:1] if quick else SHAPES)
    batches = batches or ([1, 128] if quick else BATCHES)
    rows = []
    for m, n in shapes:
        cases = make_cases(m, n, None if only is None else ["dram_read", *only])  # the reference always runs
        for c in cases:
            c.setup(rotate_mb * 2**20, gen, cases)
        for B in batches:
            xs = {dt: torch.randn(B, n, generator=gen).to(dt) for dt in {c.x_dtype for c in cases}}
            for c in cases:  # warm up (first-call allocation, page faults)
                c.run(xs[c.x_dtype], c.weights[0])
            times = {c.name: [] for c in cases}
            cpu = {c.name: [] for c in cases}
            for _ in range(rounds):
                for c in cases:
                    wall, proc = c.sweep(xs[c.x_dtype])
                    times[c.name].append(wall)
                    cpu[c.name].append(proc)
            bw = READ_CHUNK / statistics.median(times["dram_read"]) / 1e9  # this shape and batch's reference
            for c in cases:
                med, best = statistics.median(times[c.name]), min(times[c.name])
                rows.append({
                    "shape": [m, n], "batch": B, "impl": c.name, "label": c.label,
                    "distinct_weights": len(c.weights), "weight_bytes": c.bytes_per_weight,
                    "ms_median": med * 1e3, "ms_min": best * 1e3,
                    "cpu_ms_median": statistics.median(cpu[c.name]) * 1e3,
                    "weight_GBps": c.bytes_per_weight / med / 1e9,
                    "dram_read_GBps": bw,
                    "frac_of_dram_bw": c.bytes_per_weight / med / 1e9 / bw,
                })
            by = {r["impl"]: r for r in rows if r["shape"] == [m, n] and r["batch"] == B}
            for r in by.values():
                for ref in ("fp32", "torch_int4"):
                    if ref in by:
                        r[f"ratio_vs_{ref}"] = r["ms_median"] / by[ref]["ms_median"]
                        r[f"cpu_ratio_vs_{ref}"] = r["cpu_ms_median"] / by[ref]["cpu_ms_median"]
            print_table(m, n, B, by)
    return {"dram_read_GBps_single_sum": bw1, "rotate_mb": rotate_mb, "llc_bytes": llc_bytes(), "rows": rows}


def print_table(m, n, B, by):
    print(f"\nW {m}x{n}, batch {B} (DRAM read reference in these rounds: {by['dram_read']['weight_GBps']:.1f} GB/s)")
    print(f"  {'impl':<12}{'ms (median)':>12}{'ms (min)':>10}{'cpu ms':>9}{'GB/s':>8}{'% BW':>7}{'/fp32':>8}"
          f"{'/int4':>8}{'cpu/int4':>9}")
    for name, r in by.items():
        print(f"  {name:<12}{r['ms_median']:>12.3f}{r['ms_min']:>10.3f}{r['cpu_ms_median']:>9.3f}"
              f"{r['weight_GBps']:>8.1f}{100 * r['frac_of_dram_bw']:>6.0f}%"
              f"{r.get('ratio_vs_fp32', float('nan')):>8.3f}{r.get('ratio_vs_torch_int4', float('nan')):>8.3f}"
              f"{r.get('cpu_ratio_vs_torch_int4', float('nan')):>9.3f}")


def check_targets(rows) -> list[dict]:
    out = []
    for r in rows:
        if r["batch"] == 1 and r["impl"] in TARGETS_B1:
            ref, lim = TARGETS_B1[r["impl"]]
            ratio = r.get(f"ratio_vs_{ref}")
            out.append({"shape": r["shape"], "batch": 1, "impl": r["impl"], "target": f"<= {lim}x {ref}",
                         "ratio": ratio, "met": ratio is not None and ratio <= lim,
                         "cpu_time_ratio": r.get(f"cpu_ratio_vs_{ref}"),
                         "bw_target": ">= 70% DRAM read bandwidth", "frac_bw": r["frac_of_dram_bw"],
                         "bw_met": r["frac_of_dram_bw"] >= 0.7})
        if r["batch"] == 128 and r["impl"].startswith("qk"):
            ref, lim = TARGET_B128
            ratio = r.get(f"ratio_vs_{ref}")
            out.append({"shape": r["shape"], "batch": 128, "impl": r["impl"], "target": f"<= {lim}x {ref}",
                        "ratio": ratio, "met": ratio is not None and ratio <= lim})
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    groups = sorted({(tuple(r["shape"]), r["batch"]) for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = []
        for g in groups:
            r = next((r for r in rows if (tuple(r["shape"]), r["batch"]) == g and r["impl"] == impl), None)
            vals.append(r["ms_median"] if r else float("nan"))
        ax.bar([k + i * width for k in range(len(groups))], vals, width, label=impl)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(groups))])
    ax.set_xticklabels([f"{s[0]}x{s[1]}\nbatch {b}" for s, b in groups])
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (median, log scale)")
    bws = [r["dram_read_GBps"] for r in rows if r["batch"] == 1]
    ax.set_title(f"qgemm on CPU ({result['machine']['torch_threads']} threads; "
                 f"{'CONTENDED machine' if result['contended'] else 'quiet machine'}; "
                 f"DRAM read {min(bws):.1f}-{max(bws):.1f} GB/s at batch 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, batch 1 and 128, fewer rounds")
    ap.add_argument("--json", default=os.path.join(RESULTS, "qgemm_cpu.json"))
    ap.add_argument("--png", default=os.path.join(RESULTS, "qgemm_cpu.png"))
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--rotate-mb", type=int, default=None,
                    help="distinct weight bytes per case (default: 2x the reported LLC, >= 256)")
    ap.add_argument("--shapes", nargs="*", help="weights to run, as OUTxIN (default: both, or the first with --quick)")
    ap.add_argument("--batches", nargs="*", type=int, help="batch sizes (default: 1 8 128, or 1 128 with --quick)")
    ap.add_argument("--merge", action="store_true",
                    help="keep rows of other (shape, batch) cases already in --json")
    ap.add_argument("--quiet-machine", action="store_true", help="record contended=false in the JSON")
    ap.add_argument("--only", nargs="*", help="implementations to run (fp32 bf16 torch_int4 qk4 qk3 qk2 qk3_avx512 qk2_avx512 qk4_int8x;"
                    " dram_read always runs)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 7)
    result = {
        "benchmark": "qgemm_cpu",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "contended": not args.quiet_machine,
        "note": "measured while other work shared the CPU" if not args.quiet_machine else "quiet machine",
        "machine": machine_info(),
        "group_size": GROUP,
        "rounds": rounds,
    }
    shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes] if args.shapes else None
    result.update(run(args.quick, rounds, args.rotate_mb or default_rotate_mb(), args.only, shapes, args.batches))
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    if args.merge and os.path.exists(args.json):
        with open(args.json) as f:
            old = json.load(f)
        ran = {(tuple(r["shape"]), r["batch"]) for r in result["rows"]}
        kept = [r for r in old.get("rows", [])
                if (tuple(r["shape"]), r["batch"]) not in ran and "dram_read_GBps" in r]
        result["rows"] = kept + result["rows"]
        result["merged_from"] = old.get("merged_from", []) + [{"date_utc": old.get("date_utc"),
                                                               "cases": sorted({(tuple(r["shape"]), r["batch"])
                                                                                for r in kept}),
                                                               "machine": old.get("machine")}]
    result["targets"] = check_targets(result["rows"])
    print("\nTargets:")
    for t in result["targets"]:
        extra = f", {100 * t['frac_bw']:.0f}% BW ({'met' if t['bw_met'] else 'NOT met'})" if "frac_bw" in t else ""
        ratio = "n/a" if t["ratio"] is None else f"{t['ratio']:.3f}"
        print(f"  {t['shape'][0]}x{t['shape'][1]} b{t['batch']} {t['impl']}: {ratio} ({t['target']}: "
              f"{'met' if t['met'] else 'NOT met'}){extra}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    if args.png:
        plot(result, args.png)
    print(f"\nwrote {args.json}" + (f" and {args.png}" if args.png else ""))


# ---- pytest-benchmark: one group per shape x batch, baselines beside quantkern ----------------------
try:
    import pytest
except ImportError:  # script mode without pytest
    pytest = None

if pytest is not None:
    _CACHE: dict = {}

    def _case(m, n, impl) -> Case:
        if (m, n, impl) not in _CACHE:
            if any(k[:2] != (m, n) for k in _CACHE):
                _CACHE.clear()  # keep one shape's weights in memory at a time
            (c,) = make_cases(m, n, [impl])
            c.setup(default_rotate_mb() * 2**20, torch.Generator().manual_seed(0))
            _CACHE[(m, n, impl)] = c
        return _CACHE[(m, n, impl)]

    @pytest.mark.parametrize("impl", ["dram_read", "fp32", "bf16", "torch_int4", "qk4", "qk3", "qk2", "qk3_avx512",
                                      "qk2_avx512", "qk4_int8x"])
    @pytest.mark.parametrize("batch", BATCHES)
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
    def test_qgemm_cpu(benchmark, shape, batch, impl):
        c = _case(*shape, impl)
        x = torch.randn(batch, shape[1]).to(c.x_dtype)
        benchmark.group = f"qgemm {shape[0]}x{shape[1]} batch {batch} (per {len(c.weights)} distinct weights)"
        benchmark.extra_info.update(contended=True, weight_bytes=c.bytes_per_weight * len(c.weights))
        benchmark(lambda: c.sweep(x))


if __name__ == "__main__":
    main()
