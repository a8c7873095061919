"""`make demo` / `quantkern demo` / `python -m quantkern.demo`: the whole story on SmolLM2-135M.

Quantize SmolLM2-135M-Instruct with SNRQ (4 bits, group 64, alpha 0.25) on Shakespeare comedies and
histories, then report fp vs quantized perplexity on held-out Hamlet + Macbeth, size on disk,
decode tokens/s with packed weights vs the fp32 model, and a short generated answer.
Sized to finish in a few minutes on a 2-core CPU; the settings are printed.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

DEMO = dict(method="snrq", bits=4, group_size=64, alpha=0.25, nsamples=16, seqlen=256, eval_tokens=4096,
            eval_seqlen=512, decode_tokens=32, prompt="What is the capital of France?")


def _mib(b):
    return f"{b / 2**20:.1f} MiB"


def run_demo(nsamples=DEMO["nsamples"], seqlen=DEMO["seqlen"], eval_tokens=DEMO["eval_tokens"], output=None):
    import torch

    import quantkern
    from quantkern.calibration.data import evaluation_tokens, resolve_bos
    from quantkern.eval.generate import generate_text
    from quantkern.eval.perplexity import perplexity
    from quantkern.eval.speed import decode_tokens_per_s
    from quantkern.models.checkpoint import checkpoint_size
    from quantkern.models.zoo import default_model_dir, load_fp

    t_all = time.perf_counter()
    spec = quantkern.QuantSpec(bits=DEMO["bits"], group_size=DEMO["group_size"])
    print(f"quantkern demo: SmolLM2-135M-Instruct, {DEMO['method'].upper()} {spec.bits}-bit group {spec.group_size} "
          f"(alpha {DEMO['alpha']}), torch threads {torch.get_num_threads()}")
    print(f"  calibration: {nsamples} x {seqlen} tokens from Shakespeare comedies + histories; "
          "lm_head: the default 8-bit RTN g128")
    print(f"  evaluation:  {eval_tokens} tokens of Hamlet + Macbeth in {DEMO['eval_seqlen']}-token windows")
    fp, tok = load_fp("default")
    docs = evaluation_tokens(tok, "shakespeare", eval_tokens)
    bos_id = resolve_bos(tok, None)  # SmolLM2 adds none: windows are plain text
    ppl_fp = perplexity(fp, docs, DEMO["eval_seqlen"], progress=True, desc="ppl fp32", bos_id=bos_id)

    qmodel, report = quantkern.quantize_model(copy.deepcopy(fp), tok, spec, method=DEMO["method"],
                                              nsamples=nsamples, seqlen=seqlen, alpha=DEMO["alpha"])
    tmp = None
    if output is None:
        tmp = tempfile.TemporaryDirectory(prefix="quantkern-demo-")
        output = Path(tmp.name) / "smollm2-snrq-w4g64"
    quantkern.save_quantized(qmodel, output, tokenizer=tok)
    loaded = quantkern.load(output)  # everything below runs on the packed checkpoint as loaded from disk
    ppl_q = perplexity(loaded, docs, DEMO["eval_seqlen"], progress=True, desc="ppl quantized", bos_id=bos_id)
    size_q = checkpoint_size(output)
    size_fp = checkpoint_size(default_model_dir())
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    tps_fp = decode_tokens_per_s(fp, ids, DEMO["decode_tokens"])
    tps_q = decode_tokens_per_s(loaded, ids, DEMO["decode_tokens"])
    answer_fp = generate_text(fp, tok, DEMO["prompt"], max_new_tokens=24)
    answer_q = generate_text(loaded, tok, DEMO["prompt"], max_new_tokens=24)

    rows = [
        ("", "fp32", f"{DEMO['method']} w{spec.bits} g{spec.group_size}"),
        ("perplexity (held out)", f"{ppl_fp['ppl']:.2f}", f"{ppl_q['ppl']:.2f}"),
        ("checkpoint size", _mib(size_fp["total"]), _mib(size_q["total"])),
        ("  of which decoder linears", _mib(size_fp["total"] - _embed_bytes(fp)),
         _mib(size_q["packed_linears"])),
        ("  lm_head", "tied to the embedding", _head_desc(loaded)),
        ("decode tokens/s (batch 1)", f"{tps_fp:.1f}", f"{tps_q:.1f} ({tps_q / tps_fp:.2f}x)"),
        ("quantization time", "-", f"{report.total_s:.0f} s (forward {report.forward_s:.0f} s, solve {report.solve_s:.0f} s)"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print()
    for r in rows:
        print(f"  {r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]}")
    print(f"\n  Q: {DEMO['prompt']}\n  fp32:      {answer_fp.strip()!r}\n  quantized: {answer_q.strip()!r}")
    print(f"\n  total {time.perf_counter() - t_all:.0f} s (CPU may be shared with other work)")
    if tmp is not None:
        tmp.cleanup()
    return {"ppl_fp": ppl_fp["ppl"], "ppl_q": ppl_q["ppl"], "tps_fp": tps_fp, "tps_q": tps_q, "size_q": size_q}


def _head_desc(model) -> str:
    from quantkern.models.head import rounded_at_load

    head = model.get_output_embeddings()
    if not rounded_at_load(head):
        return "float" if not hasattr(head, "spec") else f"{head.spec.bits}-bit, packed"
    s = head.spec
    return f"tied in the file; {s.bits}-bit RTN g{s.group_size} once loaded (rounded at load)"


def _embed_bytes(model):
    """Bytes of every non-decoder-linear tensor (embeddings, norms), so 'linears' compares like with like."""
    import torch.nn as nn

    from quantkern.models.arch import find_blocks

    _, blocks = find_blocks(model)
    lin = sum(m.weight.numel() * m.weight.element_size() for b in blocks for m in b.modules() if isinstance(m, nn.Linear))
    total = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in model.state_dict().values()}.values())
    return total - lin


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m quantkern.demo")
    p.add_argument("--nsamples", type=int, default=DEMO["nsamples"])
    p.add_argument("--seqlen", type=int, default=DEMO["seqlen"])
    p.add_argument("--eval-tokens", type=int, default=DEMO["eval_tokens"])
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    run_demo(a.nsamples, a.seqlen, a.eval_tokens, a.output)


if __name__ == "__main__":
    main()
