"""Side-by-side timing for the pytest-benchmark suites (benchmarks/bench_*.py), and what they write.

A suite test times one quantkern case with pytest-benchmark and its baselines in the same rounds:
before each timed call of the case, every baseline makes one call (timed here), so background load
hits all of them alike. Every case rotates through distinct inputs (machine.rotate_bytes() of them:
twice the LLC, >= 256 MiB) so each call reads its operands from DRAM, not from the last call's cache.
Speed is reported as ratios of medians: case / baseline, both measured in that interleaved run.

Results (conftest.py collects them): per suite a JSON (rows + the machine: CPU model, ISA flags, read
bandwidth measured in the run), a Markdown table and a PNG, under benchmarks/results/<machine>/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


@dataclass
class Case:
    """One implementation: `fn(input)` runs one call; `make(gen)` builds one distinct input of
    `input_bytes` bytes (what a call reads), or make=None for a case with one fixed input (a whole model,
    far larger than the LLC, that each call reads anyway); `kernel` names what runs (machine.kernel)."""

    name: str
    label: str
    fn: Callable[[Any], Any]
    make: Callable[[torch.Generator], Any] | None
    input_bytes: int
    kernel: str = ""
    work_bytes: int | None = None  # bytes a call must read, for GB/s (default input_bytes)
    min_inputs: int = 2
    reference: bool = False  # a yardstick (e.g. the read loop), not a competitor: no time ratio against it
    threads: int | None = None  # run at this many torch threads (a baseline's best setting), else the run's
    inputs: list = field(default_factory=list, repr=False)
    _next: int = 0

    def setup(self, rotate: int, gen: torch.Generator) -> "Case":
        if not self.inputs and self.make is None:
            self.inputs = [None]
        if not self.inputs:
            count = max(self.min_inputs, math.ceil(rotate / max(self.input_bytes, 1)))
            self.inputs = [self.make(gen) for _ in range(count)]
        return self

    def __post_init__(self):
        if self.threads is not None:
            fn, k = self.fn, self.threads

            def at_threads(inp):
                full = torch.get_num_threads()
                torch.set_num_threads(k)
                try:
                    return fn(inp)
                finally:
                    torch.set_num_threads(full)

            self.fn = at_threads

    def next_input(self):
        inp = self.inputs[self._next % len(self.inputs)]
        self._next += 1
        return inp

    def timed_call(self) -> tuple[float, float]:
        """(wall, process CPU) seconds of one call on the next input."""
        inp = self.next_input()
        c0, t0 = time.process_time(), time.perf_counter()
        self.fn(inp)
        return time.perf_counter() - t0, time.process_time() - c0


def calls_for(case: Case, baselines: list[Case], rounds: int, budget_s: float) -> int:
    """Timed calls of the case: at least `rounds`, up to `rounds` sweeps over its distinct inputs where
    that fits `budget_s` (estimated from one untimed warm-up round of everything, which also takes the
    first-call costs)."""
    t0 = time.perf_counter()
    case.fn(case.next_input())
    for b in baselines:
        b.fn(b.next_input())
    per_round = max(time.perf_counter() - t0, 1e-6)
    return max(rounds, min(rounds * len(case.inputs), int(budget_s / per_round)))


def run_side_by_side(benchmark, case: Case, baselines: list[Case], rounds: int, budget_s: float) -> dict | None:
    """Times `case` with pytest-benchmark, each call preceded by one timed call of every baseline.
    Returns the row (None when pytest-benchmark is disabled: then everything runs once, untimed)."""
    if benchmark.disabled:  # one untimed call of everything, through the fixture (it marks itself used)
        def once():
            for c in baselines:
                c.fn(c.next_input())
            return (case.next_input(),), {}

        benchmark.pedantic(case.fn, setup=once)
        return None
    calls = calls_for(case, baselines, rounds, budget_s)
    base_t = {b.name: ([], []) for b in baselines}
    case_cpu: list[float] = []
    order = list(baselines)

    def setup():
        for b in order:
            wall, cpu = b.timed_call()
            base_t[b.name][0].append(wall)
            base_t[b.name][1].append(cpu)
        if order:  # rotate which baseline runs right before the case
            order.append(order.pop(0))
        return (case.next_input(),), {}

    def target(inp):
        c0 = time.process_time()
        case.fn(inp)
        case_cpu.append(time.process_time() - c0)

    benchmark.pedantic(target, setup=setup, rounds=calls, iterations=1)
    st = benchmark.stats.stats
    row = _timing(case, st.median, st.min, statistics.median(case_cpu), calls)
    row["baselines"] = {b.name: _timing(b, statistics.median(base_t[b.name][0]), min(base_t[b.name][0]),
                                        statistics.median(base_t[b.name][1]), calls) for b in baselines}
    rivals = {b.name for b in baselines if not b.reference}
    row["ratio_vs"] = {k: row["ms_median"] / v["ms_median"] for k, v in row["baselines"].items() if k in rivals}
    row["cpu_ratio_vs"] = {k: row["cpu_ms_median"] / v["cpu_ms_median"] for k, v in row["baselines"].items()
                           if k in rivals and v["cpu_ms_median"] > 0}
    return row


def _timing(c: Case, med: float, best: float, cpu: float, calls: int) -> dict:
    out = {"label": c.label, "kernel": c.kernel, "threads": c.threads or torch.get_num_threads(),
           "ms_median": med * 1e3, "ms_min": best * 1e3, "cpu_ms_median": cpu * 1e3, "calls": calls,
           "distinct_inputs": len(c.inputs)}
    nbytes = c.work_bytes if c.work_bytes is not None else c.input_bytes
    if nbytes:
        out["bytes_per_call"] = nbytes
        out["GBps"] = nbytes / med / 1e9
    return out


# ---- what a run writes ---------------------------------------------------------------------------

def write_suite(suite: str, rows: list[dict], machine: dict, settings: dict, json_path: str,
                md_path: str | None, png_path: str | None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    data = {"benchmark": suite, "contended": machine.get("contended", True), "machine": machine,
            "settings": settings, "rows": rows}
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
    if md_path:
        with open(md_path, "w") as f:
            f.write(f"# {suite}\n\n{machine_line(machine)}\n\n{table(rows)}")
    if png_path:
        plot(suite, rows, machine, png_path)


def machine_line(m: dict) -> str:
    bw = m.get("read_bandwidth", {})
    end = m.get("read_bandwidth_at_end", {})
    return (f"{m['cpu']} ({', '.join(m['isa_flags']) or 'no ISA flags reported'}; quantkern kernels: "
            f"{', '.join(m.get('quantkern_build', {}).get('cpu_isa', [])) or '?'}), {m['torch_threads']} threads, "
            f"read bandwidth {bw.get('GBps', float('nan')):.1f} GB/s at start"
            + (f", {end['GBps']:.1f} at end" if end else "")
            + f"; torch {m['torch']}; {m['date_utc']}; "
            + ("**contended** (shared CPU: compare the ratios, not the times)" if m.get("contended", True)
               else "quiet machine"))


def table(rows: list[dict]) -> str:
    """One line per quantkern case: its time, GB/s, share of the read reference, ratio to each baseline."""
    if not rows:
        return "(no rows)\n"
    bases = list(dict.fromkeys(k for r in rows for k in r["ratio_vs"]))
    out = ["| group | case | kernel | ms (median) | GB/s | % read ref | "
           + " | ".join(f"/{b}" for b in bases) + " | baselines ms |",
           "|" + "---|" * (7 + len(bases))]
    for r in rows:
        gbs = f"{r['GBps']:.3g}" if "GBps" in r else ""
        frac = f"{100 * r['frac_of_read_ref']:.0f}%" if "frac_of_read_ref" in r else ""
        ratios = [f"{r['ratio_vs'][b]:.3g}" if b in r["ratio_vs"] else "" for b in bases]
        bms = ", ".join(f"{k} {v['ms_median']:.3g}" for k, v in r["baselines"].items())
        out.append(f"| {r['group']} | {r['case']} | {r['kernel']} | {r['ms_median']:.4g} | {gbs} | {frac} | "
                   + " | ".join(ratios) + f" | {bms} |")
    return "\n".join(out) + "\n"


def plot(suite: str, rows: list[dict], machine: dict, path: str) -> None:
    """ms per call (log) per group: each quantkern case and its baselines (median over the rows of the group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["group"] for r in rows))
    impls = list(dict.fromkeys([r["case"] for r in rows] + [b for r in rows for b in r["baselines"]]))
    val = {}
    for g in groups:
        for r in (r for r in rows if r["group"] == g):
            val.setdefault((g, r["case"]), []).append(r["ms_median"])
            for b, v in r["baselines"].items():
                val.setdefault((g, b), []).append(v["ms_median"])
    fig, ax = plt.subplots(figsize=(max(7, 1.7 * len(groups)), 4.8))
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        ys = [statistics.median(val[(g, impl)]) if (g, impl) in val else float("nan") for g in groups]
        ax.bar([k + i * width for k in range(len(groups))], ys, width, label=impl)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(groups))])
    ax.set_xticklabels([g.replace(" batch", "\nbatch") for g in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (median, log)")
    bw = machine.get("read_bandwidth", {}).get("GBps", float("nan"))
    ax.set_title(f"{suite}: {machine['cpu']}, {machine['torch_threads']} threads, read {bw:.1f} GB/s, "
                 f"{'CONTENDED' if machine.get('contended', True) else 'quiet'}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the scripts' command line: each suite file runs as `python benchmarks/bench_X.py [...]` -------

def script_main(path: str, argv=None) -> int:
    """Runs one suite file through pytest-benchmark with the flags its script form always had."""
    import pytest

    ap = argparse.ArgumentParser(description=f"pytest-benchmark suite {os.path.basename(path)} "
                                 "(same as: pytest FILE --benchmark-only --bench-...)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=None,
                    help="interleaved calls per case, at least")
    ap.add_argument("--json", default=None, help="this suite's results JSON (default results/<machine>/)")
    ap.add_argument("--png", default=None, help="its plot (default beside the JSON)")
    ap.add_argument("--quiet", "--quiet-machine", dest="quiet", action="store_true",
                    help="the run holds the CPU to itself (recorded as contended=false)")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression over the cases")
    a, rest = ap.parse_known_args(argv)
    args = [path, "--benchmark-only", "-q", "-p", "no:cacheprovider"]
    for flag, v in (("--bench-threads", a.threads), ("--bench-rounds", a.rounds), ("--bench-json", a.json),
                    ("--bench-png", a.png), ("-k", a.keyword)):
        if v is not None:
            args += [flag, str(v)]
    args += ["--bench-quick"] * a.quick + ["--bench-quiet"] * a.quiet + rest
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit("run a suite: python benchmarks/bench_qgemm.py (or make bench)")
