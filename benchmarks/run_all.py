"""`make bench`: run every CPU benchmark side by side with its baseline, then write
benchmarks/results/SUMMARY.md (machine + one table per benchmark) next to each script's JSON/PNG.

    python benchmarks/run_all.py            # full: qgemm, solver, end-to-end (SmolLM2, resumable)
    python benchmarks/run_all.py --quick    # minutes: reduced shapes / first blocks only
The CUDA benchmark (bench_qgemm_cuda.py) needs a GPU and is run separately there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def jobs(quick: bool) -> list[tuple[str, list[str], str]]:
    """(name, argv, json path) of each benchmark."""
    q = ["--quick"] if quick else []
    e2e = os.path.join(RESULTS, "bench_e2e_quick.json" if quick else "bench_e2e.json")
    return [
        ("qgemm (CPU)", ["bench_qgemm.py", *q, "--json", os.path.join(RESULTS, "qgemm_cpu.json"),
                         "--png", os.path.join(RESULTS, "qgemm_cpu.png")], os.path.join(RESULTS, "qgemm_cpu.json")),
        ("solver (CPU)", ["bench_solver.py", "--json", os.path.join(RESULTS, "solver.json")]
         + (["--shapes", "1024x1024"] if quick else ["--shapes", "1024x1024,4096x4096"]),
         os.path.join(RESULTS, "solver.json")),
        ("end to end (SmolLM2)", ["bench_e2e.py", *q], e2e),
    ]


def table(rows: list[dict], limit: int = 60) -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows[:limit]]
    if len(rows) > limit:
        out.append(f"| ... {len(rows) - limit} more rows in the JSON |")
    return "\n".join(out) + "\n"


def rows_of(data) -> list[dict]:
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    for key in ("results", "runs", "rows", "cases"):
        if isinstance(data.get(key), list):
            return [r for r in data[key] if isinstance(r, dict)]
        if isinstance(data.get(key), dict):
            return [dict(name=k, **v) for k, v in data[key].items() if isinstance(v, dict)]
    return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", help="substrings of benchmark names to run")
    args = ap.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    info = machine()
    sections, failed = [], []
    for name, argv, path in jobs(args.quick):
        if args.only and not any(s in name for s in args.only):
            continue
        print(f"\n=== {name}: {' '.join(argv)}", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]], cwd=os.path.dirname(HERE))
        took = time.time() - t0
        if rc != 0:
            failed.append(name)
        body = f"command `python benchmarks/{' '.join(argv[0:])}` exit {rc}, {took:.0f} s\n\n"
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            body += table(rows_of(data))
        sections.append(f"## {name}\n\n{body}")
    with open(os.path.join(RESULTS, "SUMMARY.md"), "w") as f:
        f.write("# quantkern benchmark summary\n\n")
        f.write("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + "\n\n")
        f.write("\n".join(sections))
    print(f"\nwrote {os.path.join(RESULTS, 'SUMMARY.md')}")
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
