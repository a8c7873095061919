"""SmolLM2-135M perplexity and quantization time for the methods beyond the layer-wise proxy
(OAC, YAQA, AdaRound) next to GPTQ and SNRQ, at 4/3/2 bits (group 64 by default).

A separate, reduced companion of the driver's benchmarks/bench_e2e.py (same driver, same data
split: calibration on the comedies/histories, perplexity on held-out Hamlet + Macbeth), sized for a
shared 2-core CPU: fewer/shorter calibration sequences and a capped evaluation text by default.

    python benchmarks/bench_methods.py --bits 2 --methods gptq snrq oac yaqa --nsamples 16 --seqlen 256
Results (one JSON line per run, appended) go to benchmarks/results/methods_smollm2.jsonl.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from quantkern.calibration.data import evaluation_tokens
from quantkern.eval.perplexity import perplexity
from quantkern.models import quantize_model
from quantkern.models.zoo import load_fp
from quantkern.spec import QuantSpec

OUT = Path(__file__).parent / "results" / "methods_smollm2.jsonl"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", default=["gptq", "snrq", "oac", "yaqa", "adaround"])
    p.add_argument("--bits", nargs="+", type=int, default=[2])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--layers", type=int, default=None, help="quantize only the first N blocks")
    p.add_argument("--adaround-iters", type=int, default=100)
    p.add_argument("--opt", nargs="*", default=[], metavar="METHOD:KEY=VALUE",
                   help="extra method options, e.g. yaqa:grid_from=rtn yaqa:h_in=act")
    p.add_argument("--fp", action="store_true", help="also measure the full-precision model")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_fp("default")
    docs = evaluation_tokens(tok, "shakespeare", max_tokens=args.eval_tokens)
    base = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                note="measured on a 2-core CPU shared with other work", nsamples=args.nsamples, seqlen=args.seqlen,
                eval_tokens=args.eval_tokens, layers=args.layers, group_size=args.group_size)
    rows = []
    if args.fp:
        rows.append({**base, "method": "fp32", "bits": 32, "ppl": perplexity(model, docs)["ppl"], "quant_s": 0.0})
        print(rows[-1], flush=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for bits in args.bits:
        for method in args.methods:
            model, _ = load_fp("default")
            kw = {"iters": args.adaround_iters} if method == "adaround" else {}
            for o in args.opt:
                meth, _, kv = o.partition(":")
                key, _, val = kv.partition("=")
                if meth == method:
                    kw[key] = int(val) if val.lstrip("-").isdigit() else val
            spec = QuantSpec(bits=bits, group_size=args.group_size)
            t0 = time.perf_counter()
            model, rep = quantize_model(model, tok, spec, method=method, nsamples=args.nsamples, seqlen=args.seqlen,
                                        layers=args.layers, progress=False, **kw)
            qs = time.perf_counter() - t0
            ppl = perplexity(model, docs)["ppl"]
            rows.append({**base, "method": method, "options": {k: v for k, v in kw.items()}, "bits": bits, "ppl": ppl, "quant_s": round(qs, 1),
                         "solve_s": round(rep.solve_s, 1), "meta": rep.method_meta})
            print(json.dumps(rows[-1]), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    del state


if __name__ == "__main__":
    main()
