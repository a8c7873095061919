"""pytest-benchmark glue for the suites in this folder (never collected by the default `pytest` run:
pyproject's testpaths is tests/).

    pytest benchmarks/bench_qgemm.py benchmarks/bench_solver.py --benchmark-only [--bench-quick]

Each suite test calls the `side_by_side` fixture with its group, its quantkern case and the baselines
(sidebyside.py times them interleaved). At the end of the session every suite that ran writes
<suite>[_quick].json / .md / .png under --bench-out (default benchmarks/results/<machine>/, the
machine's CPU model and threads), plus SUMMARY.md there; the machine record (CPU model string, ISA
flags, read bandwidth measured at the start and end of this run) goes into each JSON and into
pytest-benchmark's own --benchmark-json.
"""
from __future__ import annotations

import os

import pytest
import torch

import machine as M
import sidebyside as S

SUITES: dict[str, list[dict]] = {}  # suite -> rows, in run order
_STATE: dict = {}


def pytest_addoption(parser):
    g = parser.getgroup("quantkern benchmarks")
    g.addoption("--bench-quick", action="store_true", help="fewer shapes, batches and calls (minutes)")
    g.addoption("--bench-rounds", type=int, default=None, help="timed calls per case, at least (default 5, quick 3)")
    g.addoption("--bench-budget-s", type=float, default=None,
                help="seconds per test beyond which no more distinct inputs are timed (default 20, quick 8)")
    g.addoption("--bench-out", default=None, help="results folder (default benchmarks/results/<machine>)")
    g.addoption("--bench-json", default=None, help="JSON path when one suite runs (its .md/.png go beside it)")
    g.addoption("--bench-png", default=None, help="plot path when one suite runs")
    g.addoption("--bench-threads", type=int, default=None, help="torch threads (default: torch's)")
    g.addoption("--bench-quiet", action="store_true",
                help="the run holds the CPU to itself: recorded as contended=false (default: contended)")


def pytest_configure(config):
    if config.getoption("bench_threads", None):
        torch.set_num_threads(config.getoption("bench_threads"))


def machine(config) -> dict:
    """Measured once per session, at the first benchmark (not at collection)."""
    if "machine" not in _STATE:
        _STATE["machine"] = M.machine_info(contended=not config.getoption("bench_quiet"))
    return _STATE["machine"]


def settings(config) -> dict:
    quick = config.getoption("bench_quick")
    return {"quick": quick, "rounds": config.getoption("bench_rounds") or (3 if quick else 5),
            "budget_s": config.getoption("bench_budget_s") or (8.0 if quick else 20.0),
            "rotate_bytes": M.rotate_bytes()}


@pytest.fixture
def side_by_side(benchmark, request):
    """run(suite, group, case, baselines, params={}, read_ref=None): times case beside its baselines and
    records the row. read_ref names the baseline whose GB/s is the read reference of this group."""
    config = request.config

    def run(suite: str, group: str, case: S.Case, baselines: list[S.Case], params: dict | None = None,
            read_ref: str | None = None):
        info, st = machine(config), settings(config)
        benchmark.group = group
        gen = torch.Generator().manual_seed(0)
        rotate = 0 if benchmark.disabled else st["rotate_bytes"]  # --benchmark-disable: a smoke run, 2 inputs
        for c in (case, *baselines):
            c.setup(rotate, gen)
        row = S.run_side_by_side(benchmark, case, baselines, st["rounds"], st["budget_s"])
        if row is None:
            return None
        row = {"suite": suite, "group": group, "case": case.name, **(params or {}), **row}
        if read_ref and "GBps" in row and read_ref in row["baselines"]:
            row["frac_of_read_ref"] = row["GBps"] / row["baselines"][read_ref]["GBps"]
        row["read_GBps_run"] = info["read_bandwidth"]["GBps"]
        benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("suite", "group", "case")})
        benchmark.extra_info.update(cpu=info["cpu"], isa_flags=info["isa_flags"], contended=info["contended"])
        SUITES.setdefault(suite, []).append(row)
        return row

    run.quick = config.getoption("bench_quick")
    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    if "machine" in _STATE:
        machine_info["quantkern_machine"] = _STATE["machine"]


def pytest_sessionfinish(session):
    if not SUITES:
        return
    config = session.config
    info = machine(config)
    info["read_bandwidth_at_end"] = M.read_bandwidth_gbs()
    info["loadavg_at_end"] = list(os.getloadavg())
    st = settings(config)
    out = config.getoption("bench_out") or os.path.join(S.RESULTS, M.slug(info))
    tail = "_quick" if st["quick"] else ""
    summary = [f"# quantkern benchmarks\n\n{S.machine_line(info)}\n"]
    for suite, rows in SUITES.items():
        path = config.getoption("bench_json") if len(SUITES) == 1 and config.getoption("bench_json") else None
        path = path or os.path.join(out, f"{suite}{tail}.json")
        stem = os.path.splitext(path)[0]
        png = config.getoption("bench_png") if len(SUITES) == 1 and config.getoption("bench_png") else stem + ".png"
        S.write_suite(suite, rows, info, st, path, stem + ".md", png)
        summary.append(f"## {suite}\n\n{S.table(rows)}")
        print(f"\nwrote {path} (+ .md, {png})")
    if not config.getoption("bench_json"):
        with open(os.path.join(out, f"SUMMARY{tail}.md"), "w") as f:
            f.write("\n".join(summary))
