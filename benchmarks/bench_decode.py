"""Decode tokens/s at batch 1 on SmolLM2-135M: fp32 vs packed (4/3/2 bits), with a per-part profile.

    python benchmarks/bench_decode.py                  # bits 4 3 2, group 64, RTN weights (speed does not
                                                       # depend on how the codes were chosen)
    python benchmarks/bench_decode.py --profile        # + where one decode step's time goes

Per bit width, side by side in one process: the fp32 model and the packed model with each lm_head choice
of quantize_model: "fp" (fp32, tied to the embedding), "auto" (the default: 8-bit RTN, group 128) and
"same" (the body's bits and group, GPTQModel's lm_head=True). All packed models run the lean QuantLinear path and fused q/k/v and gate/up
groups unless --no-fuse. quantkern.eval.speed.decode_tokens_per_s is the measure (HF generate, greedy,
KV cache, prefill excluded). Results: benchmarks/results/bench_decode.json with machine info.

It is also a pytest-benchmark suite (`make bench` runs it with the others; docs/benchmarks.md):

    python -m pytest benchmarks/bench_decode.py --benchmark-only [--bench-quick]

one group per bit width (4, 3, 2; quick: 4): the packed model as quantize_model builds it by default
(RTN codes, group 64, 8-bit lm_head, fused groups) generating --tokens greedy tokens after the prompt
(prefill included), timed interleaved with the fp32 model doing the same. Every call reads each model's
weights once per token (both far larger than the LLC), so no input rotation is needed.
"""
from __future__ import annotations

import argparse
import collections
import copy
import functools
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import quantkern  # noqa: E402
from machine import decode_kernels, machine_info  # noqa: E402
from sidebyside import Case  # noqa: E402
from quantkern.eval.speed import decode_tokens_per_s  # noqa: E402
from quantkern.models.zoo import load_fp  # noqa: E402
from quantkern.nn import QuantLinear  # noqa: E402


@torch.no_grad()
def profile_step(model, ids, new_tokens=32) -> dict:
    """ms per decode token spent in each kind of module (forward only, timers around module.forward)."""
    acc = collections.defaultdict(float)
    undo = []

    def wrap(mod, key):
        f = mod.forward

        def timed(*a, **k):
            t0 = time.perf_counter()
            r = f(*a, **k)
            acc[key] += time.perf_counter() - t0
            return r

        mod.forward = timed
        undo.append(mod)

    head = model.get_output_embeddings()
    for name, m in model.named_modules():
        if m is head:
            wrap(m, "lm_head")
        elif isinstance(m, (QuantLinear, torch.nn.Linear)):
            wrap(m, "decoder linears")
        elif name.endswith("norm") or name.endswith("layernorm"):
            wrap(m, "norms")
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)

    def run(n):
        acc.clear()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t0, dict(acc)

    t1, a1 = run(1)
    tn, an = run(new_tokens)
    out = {k: (an[k] - a1.get(k, 0.0)) / (new_tokens - 1) * 1e3 for k in an}
    out["total"] = (tn - t1) / (new_tokens - 1) * 1e3
    out["rest (attention maths, residuals, HF generate)"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    for m in undo:
        del m.forward
    return out


HEADS = {"fp": "packed, fp32 lm_head", "auto": "packed, 8-bit lm_head (default)",
         "same": "packed, lm_head at body bits"}


def measure_bits(fp, tok, ids, spec, heads=HEADS, tokens=32, repeats=3, fuse=True, profile=False) -> dict:
    """One bit width side by side: fp32, the packed model for each lm_head choice in `heads` (RTN codes:
    speed depends on the format, not on how the codes were chosen), fp32 again (drift check)."""

    def tps(model):
        return decode_tokens_per_s(model, ids, tokens, repeats=repeats)

    row = {"fp32": tps(fp)}
    for head, key in heads.items():
        q, _ = quantkern.quantize_model(copy.deepcopy(fp), tok, spec, method="rtn", progress=False,
                                        lm_head=head, fuse=fuse)
        row[key] = tps(q)
        row[key + " speedup"] = row[key] / row["fp32"]
        if profile:
            row[key + " profile_ms"] = profile_step(q, ids, tokens)
        del q
    if profile:
        row["fp32 profile_ms"] = profile_step(fp, ids, tokens)
    row["fp32 again"] = tps(fp)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--no-fuse", action="store_true")
    p.add_argument("--quiet", action="store_true", help="the run holds the CPU to itself (recorded as contended=false)")
    p.add_argument("--out", default=str(HERE / "results" / "bench_decode.json"))
    a = p.parse_args(argv)
    fp, tok = load_fp("default")
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    res = {"settings": vars(a), "machine": machine_info(contended=not a.quiet), "runs": {}}

    for bits in a.bits:
        spec = quantkern.QuantSpec(bits=bits, group_size=a.group_size)
        row = measure_bits(fp, tok, ids, spec, HEADS, a.tokens, a.repeats, fuse=not a.no_fuse, profile=a.profile)
        row["kernels"] = decode_kernels(fp, bits)
        res["runs"][f"w{bits}g{a.group_size}"] = row
        print(f"w{bits}: fp32 {row['fp32']:.1f} ({row['fp32 again']:.1f} after) tok/s | " + " | ".join(
            f"{k} {row[k]:.1f} ({row[k + ' speedup']:.2f}x)" for k in HEADS.values()), flush=True)
        if a.profile:
            for k in ("fp32", *HEADS.values()):
                prof = row[k + " profile_ms"]
                print(f"   {k:<15} " + ", ".join(f"{n} {v:.2f}" for n, v in prof.items()) + " (ms/token)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"results: {a.out}")
    return 0


# ---- pytest-benchmark suite -------------------------------------------------------------------------
SUITE = "decode"
PROMPT = "To be, or not to be, that is the question:"
GROUP = 64


@functools.lru_cache(maxsize=1)
def _fp_model():
    fp, tok = load_fp("default")
    return fp, tok, tok(PROMPT, return_tensors="pt").input_ids


def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def pytest_generate_tests(metafunc):
    if "decode_bits" in metafunc.fixturenames:
        bits = [4] if metafunc.config.getoption("bench_quick") else [4, 3, 2]
        metafunc.parametrize("decode_bits", bits, ids=[f"w{b}" for b in bits])


def test_decode(side_by_side, decode_bits):
    fp, tok, ids = _fp_model()
    tokens = 16 if side_by_side.quick else 32
    q, _ = quantkern.quantize_model(copy.deepcopy(fp), tok, quantkern.QuantSpec(bits=decode_bits, group_size=GROUP),
                                    method="rtn", progress=False)
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, use_cache=True, pad_token_id=0)
    kernels = decode_kernels(fp, decode_bits)  # (q's linears are QuantLinear now: read the widths from fp)
    case = Case("packed", f"packed w{decode_bits} g{GROUP}, 8-bit lm_head (quantize_model's default)",
                lambda _: q.generate(ids, **kw), None, _model_bytes(q), kernel=", ".join(sorted(set(kernels.values()))),
                work_bytes=0)
    base = Case("fp32", "the fp32 model", lambda _: fp.generate(ids, **kw), None, _model_bytes(fp),
                kernel="torch:F.linear fp32", work_bytes=0)
    row = side_by_side(SUITE, f"decode SmolLM2-135M w{decode_bits}", case, [base],
                       params={"bits": decode_bits, "group_size": GROUP, "new_tokens": tokens,
                               "prompt_tokens": ids.shape[1], "kernels_by_in_features": kernels,
                               "model_bytes": {"packed": case.input_bytes, "fp32": base.input_bytes}})
    if row is not None:
        row["speedup_vs_fp32"] = 1 / row["ratio_vs"]["fp32"]


if __name__ == "__main__":
    sys.exit(main())
