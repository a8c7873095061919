"""`quantkern` command line: quantize / eval / generate / inspect / bench / demo.

    quantkern quantize --model default --method snrq --bits 4 --group-size 64 --output out/smol-snrq4
    quantkern eval --model out/smol-snrq4            # perplexity on held-out Hamlet + Macbeth
    quantkern generate --model out/smol-snrq4 --prompt "What is the capital of France?"
    quantkern inspect out/smol-snrq4
    quantkern bench --model out/smol-snrq4           # decode tokens/s, packed vs the fp32 model
    quantkern demo                                   # the whole story on SmolLM2, a few minutes
    quantkern export --gguf smol.gguf out/smol-g32    # one GGUF for llama.cpp / Ollama, bit-exact

`--model default` is the built-in SmolLM2-135M-Instruct (see quantkern.models.zoo).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .models.recipes import RECIPES, recipe

METHOD_CHOICES = ("rtn", "gptq", "gptaq", "snrq", "ksnrq", "adaround", "oac", "yaqa")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantkern", description="Post-training weight quantization of LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model layer by layer and save a GPTQ v1 checkpoint")
    q.add_argument("--model", default="default", help="a local transformers model dir, or 'default' (SmolLM2-135M)")
    q.add_argument("--method", default="gptq", choices=METHOD_CHOICES)
    q.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="a named method + options (quantkern.models.recipes; overrides --method), e.g. yaqa-guard: "
                        "the best 2-bit result on SmolLM2")
    q.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    q.add_argument("--group-size", type=int, default=128, help="-1 = one group per output row")
    q.add_argument("--alpha", type=float, default=None, help="GPTAQ/SNRQ alpha (default 0.25)")
    q.add_argument("--alpha-mode", choices=("fixed", "sample", "optimize"), default=None,
                   help="SNRQ alpha: fixed (--alpha), sampled per sequence (SNRQ-S) or closed-form optimum")
    q.add_argument("--k", type=int, default=None, help="K-SNRQ beam width (K=1 is SNRQ; ksnrq defaults to 4)")
    q.add_argument("--option", type=method_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any other keyword of the method (repeatable; VALUE parsed as JSON, else a string), e.g. "
                        "--method yaqa --option grid_from=snrq --option grid=guard (docs/methods_beyond_proxy.md)")
    q.add_argument("--nsamples", type=int, default=32)
    q.add_argument("--seqlen", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--calib", nargs="+", default=None,
                   help="calibration text files/dirs, or a built-in corpus: shakespeare (default), python-docs")
    q.add_argument("--act-order", action="store_true", help="GPTQ act-order (desc_act)")
    q.add_argument("--static-groups", action="store_true")
    q.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric)")
    q.add_argument("--damp", type=float, default=0.01)
    q.add_argument("--layers", type=int, default=None, help="quantize only the first N blocks (debugging)")
    q.add_argument("--lm-head", type=lm_head_arg, default="auto", metavar="{auto,fp,same,BITS}",
                   help="output projection: auto = 8-bit RTN g128 (default; ppl unchanged, faster decode), fp = keep "
                        "float, same = the body's method and bits (GPTQModel lm_head=True), BITS = RTN at that width")
    q.add_argument("--quantize-lm-head", dest="lm_head", action="store_const", const="same",
                   help="same as --lm-head same")
    q.add_argument("--no-safety-net", dest="safety_net", action="store_false",
                   help="keep every method result even where it is worse than RTN on the layer's statistics (research)")
    q.add_argument("--no-shrink", dest="shrink", action="store_false",
                   help="use the raw calibration statistics (no shrinkage towards the diagonal for few tokens)")
    q.add_argument("--gguf-type", choices=("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q3_K", "Q2_K"), default=None,
                   help="preset the grid to the one `quantkern export --gguf` writes exactly as this llama.cpp type: "
                        "Q4_0 / Q8_0 = 4 / 8-bit symmetric, Q4_1 = 4-bit asymmetric, group 32; Q4_K / Q3_K / Q2_K = "
                        "the K-quant super-blocks, scales chosen first, codes by GPTQ (docs/gguf.md)")
    q.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every calibration sample with the BOS token (default: as the tokenizer does)")
    q.add_argument("--output", required=True, help="checkpoint directory (written atomically)")
    q.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="split the weights into safetensors shards of at most SIZE (e.g. 2GB, 500MB) with "
                        "transformers' index file (default %(default)s)")
    q.add_argument("--quiet", action="store_true")

    e = sub.add_parser("eval", help="perplexity on held-out text")
    e.add_argument("--model", default="default", help="quantized checkpoint, fp model dir, or 'default'")
    e.add_argument("--text", nargs="+", default=None, help="text files (default: held-out Hamlet + Macbeth)")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=8192)
    e.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every window with the BOS token (default: as the tokenizer does)")
    e.add_argument("--fp", action="store_true", help="also evaluate the fp model named by the checkpoint's source (default SmolLM2)")

    g = sub.add_parser("generate", help="generate text")
    g.add_argument("--model", default="default")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--raw", action="store_true", help="no chat template")

    i = sub.add_parser("inspect", help="describe a quantized checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="decode tokens/s at batch 1: packed weights vs the fp32 model")
    b.add_argument("--model", default=None, help="quantized checkpoint (default: RTN 4-bit g64 of SmolLM2, in memory)")
    b.add_argument("--fp-model", default="default")
    b.add_argument("--tokens", type=int, default=32)
    b.add_argument("--lm-head", type=lm_head_arg, default="auto", metavar="{auto,fp,same,BITS}",
                   help="in-memory RTN model's output projection (as for quantize; default 8-bit)")
    b.add_argument("--quantize-lm-head", dest="lm_head", action="store_const", const="same",
                   help="same as --lm-head same (4-bit lm_head: faster, costs perplexity, see README)")

    x = sub.add_parser("export", help="write a checkpoint as one GGUF file (llama.cpp / Ollama / LM Studio), exactly")
    x.add_argument("checkpoint")
    x.add_argument("--gguf", required=True, metavar="OUT.gguf", help="output file (written atomically)")
    x.add_argument("--embed-type", default="auto", choices=("auto", "f32", "f16", "q8_0"),
                   help="token embedding: auto = its own precision (exact), or f32 / f16 / q8_0")
    x.add_argument("--head-type", default="auto", choices=("auto", "f32", "f16", "q8_0"),
                   help="output head: auto = exact (its quantized grid, or tied to / like the embedding), or f32 / f16 / q8_0")
    x.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                   help="llama.cpp pre-tokenizer name, for a tokenizer it does not recognise (e.g. llama-bpe, smollm)")

    d = sub.add_parser("demo", help="quantize SmolLM2 with SNRQ 4-bit g64 and report the story")
    d.add_argument("--nsamples", type=int, default=None)
    d.add_argument("--seqlen", type=int, default=None)
    d.add_argument("--eval-tokens", type=int, default=None)
    d.add_argument("--output", default=None)
    return p


def lm_head_arg(text: str):
    """--lm-head value: auto | fp | same | a bit width."""
    if text in ("auto", "fp", "same"):
        return text
    try:
        bits = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, fp, same or a bit width (2, 3, 4, 8), got {text!r}") from None
    if bits not in (2, 3, 4, 8):
        raise argparse.ArgumentTypeError(f"lm_head bits must be 2, 3, 4 or 8, got {bits}")
    return bits


def method_option(text: str) -> tuple[str, object]:
    """--option KEY=VALUE: (key, value), value parsed as JSON (numbers, true/false, null) else kept a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a keyword name, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def spec_from_args(args):
    from .spec import QuantSpec

    spec = QuantSpec(bits=args.bits, group_size=args.group_size, sym=not args.asym, act_order=args.act_order,
                     static_groups=args.static_groups, damp=args.damp)
    if getattr(args, "gguf_type", None):
        from .export.gguf_presets import apply_preset

        p = build_parser().parse_args(["quantize", "--output", "o"])  # the defaults, to tell what was asked
        try:
            spec = apply_preset(spec, args.gguf_type, QuantSpec(bits=p.bits, group_size=p.group_size))
        except ValueError as e:
            raise SystemExit(f"quantkern quantize: {e}") from None
    return spec


def method_from_args(args) -> tuple[str, dict]:
    """(driver method, its kwargs): the --recipe's (if any), then --alpha/--alpha-mode/--k/--option on top."""
    method, kw = recipe(args.recipe) if args.recipe else (args.method, {})
    return method, {**kw, **method_kwargs_from_args(args)}


def method_kwargs_from_args(args) -> dict:
    kw = {}
    if args.alpha is not None:
        kw["alpha"] = args.alpha
    if args.alpha_mode is not None:
        kw["alpha_mode"] = args.alpha_mode
    if args.k is not None:
        kw["K"] = args.k
    for key, value in args.option:
        if key in kw:
            raise SystemExit(f"quantkern: --option {key}= repeats a setting already given ({key}={kw[key]!r})")
        kw[key] = value
    return kw


def is_quantized_dir(path) -> bool:
    p = Path(path)
    if (p / "quantize_config.json").exists():
        return True
    cfg = p / "config.json"
    return cfg.exists() and "quantization_config" in json.loads(cfg.read_text())


def load_any(name):
    """(model, tokenizer): a quantized checkpoint via quantkern.load, else a full-precision model."""
    from transformers import AutoTokenizer

    from .models import load
    from .models.zoo import load_fp

    if name not in (None, "default", "smollm2") and is_quantized_dir(name):
        return load(name), AutoTokenizer.from_pretrained(name)
    return load_fp(name)


def cmd_quantize(args) -> int:
    from .models import quantize_model, save_quantized
    from .models.driver import make_method
    from .models.zoo import load_fp

    spec = spec_from_args(args)
    method, method_kwargs = method_from_args(args)
    if args.gguf_type:  # K-quants: the type's own fixed grid, solved by GPTQ (export/gguf_solve.py)
        from .export.gguf_presets import grid_method

        try:
            method, method_kwargs = grid_method(args.gguf_type, method, method_kwargs)
        except ValueError as e:
            raise SystemExit(f"quantkern quantize: {e}") from None
    make_method(method, spec, seed=args.seed, **method_kwargs)  # bad options fail here, before the model loads
    if args.gguf_type:
        from .export.gguf_presets import reorders_groups

        why = reorders_groups(method, method_kwargs)
        if why:
            raise SystemExit(f"quantkern quantize: --gguf-type {args.gguf_type} needs groups in channel order, but "
                             f"{why}; use --method gptq, gptaq, ldlq or rtn")
    model, tok = load_fp(args.model)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f".{out.name}.quant_log.jsonl"
    log.unlink(missing_ok=True)
    _, report = quantize_model(model, tok, spec, method=method, calib=args.calib or "shakespeare",
                               nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, layers=args.layers,
                               log_path=log, progress=not args.quiet, lm_head=args.lm_head,
                               safety_net=args.safety_net and method != "gguf_grid", shrink=args.shrink, bos=args.bos,
                               fuse=method != "gguf_grid", **method_kwargs)
    kblocks = None
    if method == "gguf_grid":
        from .export.gguf_solve import finish

        kblocks = finish(model)
    if args.gguf_type:
        from .export.gguf_presets import check_model

        bad = check_model(model)
        if bad:
            print(f"warning: not every linear has an exact {args.gguf_type} twin; saved without the gguf_type tag: "
                  + "; ".join(bad[:3]), file=sys.stderr)
        else:
            model.quantkern_info["gguf_type"] = args.gguf_type
    save_quantized(model, out, tokenizer=tok, log_path=log, max_shard_size=args.max_shard_size)
    if kblocks:
        from .export.gguf_sidecar import save_sidecar

        save_sidecar(out, kblocks)
    log.unlink(missing_ok=True)
    net = f", safety net kept RTN for {report.safety_fallbacks}" if report.safety_net else ", safety net off"
    print(f"saved {out}  ({len(report.modules)} linears, {report.total_s:.0f} s: forward {report.forward_s:.0f} s, "
          f"solve {report.solve_s:.0f} s{net})")
    _print_readers(out, warn_only=args.quiet)
    return 0


def _print_readers(path, warn_only=False) -> None:
    """Which engines load the checkpoint; a reader that would misload it is always named (on stderr)."""
    from .models.checkpoint import read_quantize_config
    from .models.readers import reader_support

    table = reader_support(read_quantize_config(path))
    if not warn_only:
        print("loads in: " + ", ".join(f"{k} {str(v).split(' (')[0]}" for k, v in table.items()))
    for reader, v in table.items():
        if v.ok is False:
            print(f"warning: {reader}: {v}", file=sys.stderr)


def cmd_eval(args) -> int:
    from .calibration.data import evaluation_tokens, resolve_bos
    from .eval.perplexity import perplexity

    rows = []
    names = [args.model] + (["default"] if args.fp else [])
    for name in names:
        model, tok = load_any(name)
        docs = evaluation_tokens(tok, args.text or "shakespeare", args.max_tokens)
        r = perplexity(model, docs, args.seqlen, progress=True, bos_id=resolve_bos(tok, args.bos))
        rows.append((name, r))
        print(f"{name}: perplexity {r['ppl']:.3f} over {r['tokens']} tokens ({r['windows']} windows of {r['seqlen']})")
    return 0


def _prompt_ids(tok, prompt, raw):
    if not raw and getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]
    return tok(prompt, return_tensors="pt").input_ids


def generate_text(model, tok, prompt, max_new_tokens=48, raw=False) -> str:
    import torch

    ids = _prompt_ids(tok, prompt, raw)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def cmd_generate(args) -> int:
    model, tok = load_any(args.model)
    print(generate_text(model, tok, args.prompt, args.max_new_tokens, args.raw))
    return 0


def inspect_checkpoint(path) -> dict:
    from .models.checkpoint import (ZERO_POINT_CONVENTIONS, checkpoint_size, checkpoint_tensor_names,
                                    read_quantize_config, spec_from_config)
    from .formats.gptq_config import checkpoint_format
    from .models.readers import reader_support
    from .ops import registry

    qc = read_quantize_config(path)
    spec = spec_from_config(qc)
    meta = qc.get("meta", {})
    here = registry.backends()
    tensors = checkpoint_tensor_names(path)
    gemm_ops = [op for op in registry._IMPLS if "gemm" in op]
    quantkern_backends = {}
    for b, st in here.items():
        has = any(b in registry._IMPLS[op] for op in gemm_ops) if gemm_ops else b == "reference"
        quantkern_backends[b] = ("yes" if st["available"] and has else "no") + f" ({st['reason']})" + (
            "" if has else " [no qgemm kernel registered]")
    dynamic = qc.get("dynamic") or {}
    fmt = checkpoint_format(qc)
    return {
        "path": str(path), "bits": spec.bits, "group_size": spec.group_size, "act_order (desc_act)": spec.act_order,
        "sym": spec.sym, "static_groups": spec.static_groups,
        "checkpoint_format": fmt, "zero_point_convention": ZERO_POINT_CONVENTIONS.get(fmt, "?"),
        "method": meta.get("method"), "alpha": meta.get("alpha"), "K": meta.get("K"),
        "quantizer": f"{meta.get('quantizer', '?')} {meta.get('quantizer_version', '')}".strip(),
        "quantized_modules": sum(1 for k in tensors if k.endswith(".qweight")),  # what the files hold
        "lm_head": _lm_head_line(qc, spec),
        "per-module overrides (dynamic)": {k: ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in dynamic.items()},
        "fallbacks": sum(1 for v in meta.get("modules", {}).values() if v.get("fallback")),
        "kept in float": {k: v for k, v in (meta.get("kept_float") or {}).items()},
        "experts": _experts_line(meta.get("experts") or {}),
        "calibration BOS": (meta.get("calibration") or {}).get("bos", "not recorded"),
        "size_bytes": checkpoint_size(path), "quantkern_backends_here": quantkern_backends,
        "loads_in (tests/interop)": {k: str(v) for k, v in reader_support(qc).items()},
    }


def _experts_line(experts: dict) -> str:
    if not experts:
        return "none"
    side = [k for k, v in experts.items() if v.get("side_pass")]
    tokens = [v.get("tokens", 0) for v in experts.values()]
    return (f"{len(experts)} over all blocks (one packed linear per projection), routed calibration tokens {min(tokens)}-{max(tokens)}; "
            f"{len(side)} used the all-token side pass")


def _lm_head_line(qc, spec) -> str:
    from .models.checkpoint import module_spec

    at_load = qc.get("meta", {}).get("lm_head_at_load")
    if at_load:
        return (f"float in the files; quantkern rounds it to {at_load['bits']}-bit "
                f"{at_load.get('method', 'rtn').upper()}, group {at_load['group_size']} at load")
    if not qc.get("lm_head"):
        return "float (not quantized)"
    head = module_spec(spec, qc, "lm_head")
    return "quantized" if head is None else f"{head.bits}-bit, group {head.group_size}, {'sym' if head.sym else 'asym'}"


def cmd_inspect(args) -> int:
    info = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"  {kk}: {vv:,}" if isinstance(vv, int) else f"  {kk}: {vv}")
        else:
            print(f"{k}: {v}")
    return 0


def cmd_bench(args) -> int:
    import copy

    from .eval.speed import decode_tokens_per_s
    from .models.zoo import load_fp

    fp, tok = load_fp(args.fp_model)
    if args.model:
        qmodel, _ = load_any(args.model)
    else:
        from .models import quantize_model
        from .spec import QuantSpec

        qmodel, _ = quantize_model(copy.deepcopy(fp), tok, QuantSpec(bits=4, group_size=64), method="rtn",
                                   nsamples=1, seqlen=16, progress=False, lm_head=args.lm_head)
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    t_fp = decode_tokens_per_s(fp, ids, args.tokens)
    t_q = decode_tokens_per_s(qmodel, ids, args.tokens)
    print(f"decode tokens/s at batch 1 ({args.tokens} tokens): fp32 {t_fp:.1f}, packed {t_q:.1f}, "
          f"ratio {t_q / t_fp:.2f}x")
    return 0


def cmd_export(args) -> int:
    from .export.gguf import ExportError, export_gguf

    try:
        r = export_gguf(args.checkpoint, args.gguf, embed_type=args.embed_type, head_type=args.head_type,
                        tokenizer_pre=args.tokenizer_pre)
    except ExportError as e:
        print(f"quantkern export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {r['path']}  ({r['file_type']}; tensors {r['tensors']}; pre-tokenizer {r['tokenizer_pre']})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    kw = {k: v for k, v in (("nsamples", args.nsamples), ("seqlen", args.seqlen), ("eval_tokens", args.eval_tokens),
                            ("output", args.output)) if v is not None}
    run_demo(**kw)
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate, "inspect": cmd_inspect,
            "bench": cmd_bench, "demo": cmd_demo, "export": cmd_export}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .calibration.data import MissingDataError
    from .models.checkpoint import CheckpointError
    from .models.errors import UnsupportedModelError
    from .solvers.registry import MethodOptionError

    try:
        return COMMANDS[args.command](args)
    except (MissingDataError, CheckpointError, FileNotFoundError, MethodOptionError, UnsupportedModelError) as e:
        print(f"quantkern {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
