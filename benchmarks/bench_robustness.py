"""Robustness to calibration size on SmolLM2-135M: every method and named recipe x bits x calibration
amount -> perplexity and time, with round-to-nearest as the floor (issue 24: never worse than RTN).

    python benchmarks/bench_robustness.py                       # the full grid (hours on 2 cores)
    python benchmarks/bench_robustness.py --methods rtn gptq snrq oac yaqa --bits 2 --calib 16x256 \\
        --eval-tokens 4096                                      # the subset measured in the repo
    python benchmarks/bench_robustness.py --methods oac yaqa --bits 2 --calib 16x256 --no-safety-net

Full grid: methods = every driver method + every recipe (quantkern.models.recipes), bits 2/3/4,
calibration 8x128, 16x256, 32x512, 128x512 (nsamples x seqlen, Shakespeare comedies/histories),
group 64 symmetric, perplexity on held-out Hamlet + Macbeth in 512-token windows (--eval-tokens,
default 8192; the demo's 4096 for quick checks). Every run records the safety net's verdict (modules
that kept RTN) and, with --no-safety-net, runs with the net off (keyed separately), so the two can be
compared. Results are merged into benchmarks/results/robustness_smollm2.json after every run (a rerun
skips finished keys unless --fresh) and plotted to the .png beside it (perplexity vs calibration tokens
per bit width, RTN dashed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from machine import machine_info  # noqa: E402
from quantkern.calibration.data import calibration_samples, evaluation_tokens  # noqa: E402
from quantkern.eval.perplexity import perplexity  # noqa: E402
from quantkern.models import quantize_model  # noqa: E402
from quantkern.models.driver import METHODS as DRIVER_METHODS  # noqa: E402
from quantkern.models.recipes import RECIPES, recipe  # noqa: E402
from quantkern.models.zoo import load_fp  # noqa: E402
from quantkern.spec import QuantSpec  # noqa: E402

import quantkern.models.grad_methods  # noqa: E402,F401  (registers oac / yaqa / adaround with the driver)

ALL_METHODS = sorted(DRIVER_METHODS) + sorted(RECIPES)
ALL_CALIB = ("8x128", "16x256", "32x512", "128x512")
OUT = HERE / "results" / "robustness_smollm2.json"


def method_of(name: str) -> tuple[str, dict]:
    return recipe(name) if name in RECIPES else (name, {})


def parse_calib(text: str) -> tuple[int, int]:
    n, _, t = text.lower().partition("x")
    return int(n), int(t)


def shrink_summary(rows) -> dict:
    """Median and max shrinkage intensity per statistic (H, F, H_out) over the modules of a run."""
    import statistics

    out = {}
    for stat in sorted({k for r in rows for k in r.get("shrink", {})}):
        v = [r["shrink"][stat] for r in rows if stat in r.get("shrink", {})]
        out[stat] = {"median": statistics.median(v), "max": max(v)}
    return out


def key(name, bits, calib, net) -> str:
    return f"{name}/w{bits}/{calib}{'' if net else '/no-net'}"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results["runs"].values())
    bits_all = sorted({r["bits"] for r in runs})
    if not bits_all:
        return
    fig, axes = plt.subplots(1, len(bits_all), figsize=(5.5 * len(bits_all), 4.5), squeeze=False)
    for ax, bits in zip(axes[0], bits_all):
        for (name, net) in sorted({(r["name"], r["safety_net"]) for r in runs if r["bits"] == bits}):
            pts = sorted((r["tokens"], r["ppl"]) for r in runs
                         if r["bits"] == bits and r["name"] == name and r["safety_net"] == net)
            style = dict(color="k", ls="--", lw=2) if name == "rtn" else dict(marker="o")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name + ("" if net else " (no net)"), **style)
        if "fp" in results:
            ax.axhline(results["fp"]["ppl"], color="grey", ls=":", lw=1, label=f"fp32 ({results['fp']['ppl']:.1f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("calibration tokens (nsamples x seqlen)")
        ax.set_ylabel("perplexity (Hamlet + Macbeth, held out)")
        ax.set_title(f"SmolLM2-135M, {bits}-bit g{results['settings']['group_size']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, help=f"driver methods or recipes ({ALL_METHODS})")
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--calib", nargs="+", default=list(ALL_CALIB), help="NSAMPLESxSEQLEN, e.g. 16x256")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--no-safety-net", dest="safety_net", action="store_false",
                   help="run with the driver's safety net off (research; keyed '/no-net')")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--fresh", action="store_true", help="rerun keys already in the results file")
    a = p.parse_args(argv)
    unknown = [m for m in a.methods if m not in ALL_METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {ALL_METHODS}")
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    settings = {"group_size": a.group_size, "sym": True, "eval_tokens": a.eval_tokens, "eval_seqlen": a.eval_seqlen,
                "calib": "shakespeare comedies + histories, seed 0", "lm_head": "auto (8-bit RTN g128)"}
    if results and results.get("settings") != settings:
        raise SystemExit(f"{out} holds results for other settings {results.get('settings')}; pass another --out")
    results.update(settings=settings, machine=machine_info())
    results.setdefault("runs", {})
    fp, tok = load_fp("default")
    docs = evaluation_tokens(tok, "shakespeare", a.eval_tokens)
    if "fp" not in results:
        results["fp"] = {"ppl": perplexity(fp, docs, a.eval_seqlen)["ppl"]}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        plot(results, out.with_suffix(".png"))

    for calib in a.calib:
        nsamples, seqlen = parse_calib(calib)
        samples = calibration_samples(tok, "shakespeare", nsamples, seqlen, seed=0)
        for bits in a.bits:
            for name in a.methods:
                k = key(name, bits, calib, a.safety_net)
                if k in results["runs"] and not a.fresh:
                    continue
                method, kw = method_of(name)
                model, _ = load_fp("default")  # fresh: the driver swaps QuantLinear modules in place
                t0 = time.perf_counter()
                model, rep = quantize_model(model, tok, QuantSpec(bits=bits, group_size=a.group_size), method=method,
                                            calib=samples, progress=False, safety_net=a.safety_net, **kw)
                qs = time.perf_counter() - t0
                ppl = perplexity(model, docs, a.eval_seqlen)["ppl"]
                checked = [r for r in rep.modules if "safety" in r]
                results["runs"][k] = {
                    "name": name, "method": method, "options": kw, "bits": bits, "calib": calib, "tokens": nsamples * seqlen,
                    "safety_net": a.safety_net, "ppl": ppl, "quant_s": round(qs, 1), "solve_s": round(rep.solve_s, 1),
                    "forward_s": round(rep.forward_s, 1), "modules": len(rep.modules), "checked": len(checked),
                    "kept_rtn": rep.safety_fallbacks,
                    "kept_rtn_modules": [f"{r['layer']}.{r['module']}" for r in checked if r["safety"]["kept"] == "rtn"],
                    "shrink": shrink_summary(rep.modules),
                }
                print(k, json.dumps({f: results["runs"][k][f] for f in ("ppl", "quant_s", "kept_rtn", "checked")}),
                      flush=True)
                save()
                del model
    save()
    print(f"results: {out} (+ .png)")


if __name__ == "__main__":
    main()
