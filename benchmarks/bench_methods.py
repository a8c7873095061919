"""SmolLM2-135M perplexity and quantization time for variants of the methods beyond the layer-wise
proxy (OAC, YAQA, AdaRound) next to GPTQ and SNRQ. Same driver, data split and defaults as
benchmarks/bench_e2e.py (symmetric, group 64, 32 x 512 calibration tokens of the comedies/histories,
perplexity over 8192 held-out Hamlet + Macbeth tokens in 512-token windows), but every run is a
free-form variant, so option sweeps can be recorded next to each other:

    python benchmarks/bench_methods.py --bits 2 --runs snrq:alpha=0.25 \\
        "oac:core=snrq,h_mix=0.5,fisher=token,grad_stats_path=/tmp/g.pt" --layers 6 --eval-tokens 4096

A run is METHOD[:KEY=VALUE,...] (values parsed as int, float, bool or string). One JSON line per run
is appended to benchmarks/results/methods_smollm2.jsonl (settings, options, perplexity, times).
Gradient statistics (OAC/YAQA) cost one forward + backward per calibration sequence; pass
grad_stats_path to compute them once and reuse them (their time is logged as grad_stats_s).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantkern  # noqa: E402
from machine import machine_info  # noqa: E402
from quantkern.calibration.data import calibration_samples, evaluation_tokens  # noqa: E402
from quantkern.eval.perplexity import perplexity  # noqa: E402
from quantkern.models import quantize_model  # noqa: E402
from quantkern.models.zoo import load_fp  # noqa: E402
from quantkern.spec import QuantSpec  # noqa: E402

OUT = Path(__file__).parent / "results" / "methods_smollm2.jsonl"


def parse_value(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def parse_run(text: str) -> tuple[str, dict]:
    method, _, rest = text.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise SystemExit(f"bad option {item!r} in run {text!r} (want KEY=VALUE)")
        kw[k] = parse_value(v)
    return method, kw


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="METHOD[:K=V,...]")
    p.add_argument("--bits", nargs="+", type=int, default=[2])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--layers", type=int, default=None, help="quantize only the first N blocks")
    p.add_argument("--fp", action="store_true", help="also measure the full-precision model")
    p.add_argument("--tag", default="", help="free text stored with every row")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--quiet", action="store_true", help="the run holds the CPU to itself (recorded as contended=false)")
    args = p.parse_args(argv)
    runs = [parse_run(r) for r in args.runs]
    fp, tok = load_fp("default")
    calib = calibration_samples(tok, "shakespeare", args.nsamples, args.seqlen, seed=0)
    docs = evaluation_tokens(tok, "shakespeare", args.eval_tokens)
    info = machine_info(contended=not args.quiet)
    base = dict(machine=platform.machine(), threads=torch.get_num_threads(), quantkern=quantkern.__version__,
                cpu=info["cpu"], isa_flags=info["isa_flags"], read_GBps=info["read_bandwidth"]["GBps"],
                contended=info["contended"],
                note="2-core CPU shared with other work; run under the shared CPU lock (quiet) unless noted",
                nsamples=args.nsamples, seqlen=args.seqlen, eval_tokens=args.eval_tokens, eval_seqlen=args.eval_seqlen,
                layers=args.layers or "all", group_size=args.group_size, sym=True, tag=args.tag)

    def emit(row):
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    if args.fp:
        emit({**base, "method": "fp32", "bits": 32, "ppl": perplexity(fp, docs, args.eval_seqlen)["ppl"], "quant_s": 0.0})
    for bits in args.bits:
        for method, kw in runs:
            fp, tok = load_fp("default")  # fresh: the driver swaps QuantLinear modules in place
            spec = QuantSpec(bits=bits, group_size=args.group_size)
            t0 = time.perf_counter()
            model, rep = quantize_model(fp, tok, spec, method=method, calib=calib, layers=args.layers, progress=False,
                                        **kw)
            qs = time.perf_counter() - t0
            ppl = perplexity(model, docs, args.eval_seqlen)["ppl"]
            emit({**base, "method": method, "options": kw, "bits": bits, "ppl": ppl, "quant_s": round(qs, 1),
                  "solve_s": round(rep.solve_s, 1), "forward_s": round(rep.forward_s, 1),
                  "fallback_modules": sum(1 for m in rep.modules if m["fallback"]), "meta": rep.method_meta})


if __name__ == "__main__":
    main()
