"""`make bench` / `make bench-quick`: the pytest-benchmark suites, then the end-to-end run, all writing
under benchmarks/results/<machine>/ (the machine's CPU model and thread count): per suite a JSON (rows +
CPU model, ISA flags, the read bandwidth measured in the run, the kernel of every case), a Markdown table
and a PNG; SUMMARY[_quick].md with every table; pytest-benchmark's own JSON beside them.

    python benchmarks/run_all.py                 # suites (qgemm, solver, decode) + end to end on SmolLM2 (hours,
                                                 # resumable)
    python benchmarks/run_all.py --quick         # qgemm and solver on fewer shapes and calls (minutes); no decode
                                                 # suite (--decode), no end-to-end run (--e2e)
    python benchmarks/run_all.py --quick --e2e   # ... plus bench_e2e.py --quick
    python benchmarks/run_all.py --quiet         # the run holds the CPU (recorded as contended=false)
The CUDA benchmark (bench_qgemm_cuda.py) needs a GPU and is run separately there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import machine as M  # noqa: E402
from sidebyside import RESULTS  # noqa: E402

SUITES = ["bench_qgemm.py", "bench_solver.py", "bench_decode.py"]
QUICK_SUITES = ["bench_qgemm.py", "bench_solver.py"]  # bench_decode loads and quantizes SmolLM2: not minutes


def e2e_table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    out = ["| run | ppl | reference ppl | quantize s | decode x fp32 |", "|---|---|---|---|---|"]
    for key, r in data.get("runs", {}).items():
        out.append(f"| {key} | {r['ppl']:.2f} | {r.get('reference_ppl') or ''} | {r['quant_wall_s']:.0f} | "
                   f"{r['decode_speedup']:.2f} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--e2e", action="store_true", help="with --quick: also the end-to-end run (bench_e2e.py --quick)")
    ap.add_argument("--decode", action="store_true", help="with --quick: also the decode suite (bench_decode.py)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end run")
    ap.add_argument("--quiet", action="store_true", help="the run holds the CPU to itself")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<machine>)")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression over the suites' cases")
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    out = a.out or os.path.join(RESULTS, M.slug(M.machine_info(bandwidth=False)))
    os.makedirs(out, exist_ok=True)
    tail = "_quick" if a.quick else ""
    suites = QUICK_SUITES if a.quick and not a.decode else SUITES
    cmd = [sys.executable, "-m", "pytest", *(os.path.join(HERE, s) for s in suites), "--benchmark-only", "-q",
           "-p", "no:cacheprovider", "--bench-out", out,
           f"--benchmark-json={os.path.join(out, f'pytest_benchmark{tail}.json')}"]
    cmd += ["--bench-quick"] * a.quick + ["--bench-quiet"] * a.quiet
    cmd += ["--bench-threads", str(a.threads)] if a.threads else []
    cmd += ["-k", a.keyword] if a.keyword else []
    print("===", " ".join(cmd), flush=True)
    failed = []
    if subprocess.call(cmd, cwd=os.path.dirname(HERE)) != 0:
        failed.append("suites")
    if not a.no_e2e and (not a.quick or a.e2e):
        e2e = os.path.join(out, f"bench_e2e{tail}.json")
        cmd = [sys.executable, os.path.join(HERE, "bench_e2e.py"), "--out", e2e] + ["--quick"] * a.quick
        cmd += ["--quiet"] * a.quiet
        print("===", " ".join(cmd), flush=True)
        if subprocess.call(cmd, cwd=os.path.dirname(HERE)) != 0:
            failed.append("end to end")
        if os.path.exists(e2e):
            with open(os.path.join(out, f"SUMMARY{tail}.md"), "a") as f:
                f.write(f"\n## end to end (SmolLM2-135M, {os.path.basename(e2e)})\n\n{e2e_table(e2e)}")
    print(f"\nresults in {out}")
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
