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
import dataclasses
import json
import sys
from pathlib import Path

from . import console
from .methods import METHODS, MethodConfig, MethodOptionError, make_config
from .models.recipes import RECIPES
from .models.zoo import is_builtin
from .spec import QuantSpec

_DEFAULT = QuantSpec()  # the CLI's grid defaults are QuantSpec's


def method_options() -> dict[str, dict]:
    """Every method option over the registry: name -> {"help": ..., "defaults": {method: default}}."""
    out: dict[str, dict] = {}
    for method, cls in command_line_methods().items():
        for f in dataclasses.fields(cls):
            if f.name in cls.option_names():
                row = out.setdefault(f.name, {"help": f.metadata.get("help", ""), "defaults": {}})
                row["defaults"][method] = f.default
    return out


def command_line_methods() -> dict[str, type[MethodConfig]]:
    """The methods `--method` offers (a config may be reached another way, e.g. gguf_grid via --gguf-type)."""
    return {name: cls for name, cls in METHODS.items() if cls.on_command_line}


def _flag(option: str) -> str:
    return "--" + option.lower().replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantkern", description="Post-training weight quantization of LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    talk = argparse.ArgumentParser(add_help=False)  # the long commands' output level (quantkern.console)
    level = talk.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", action="store_true", help="print only errors, warnings and the final result")
    level.add_argument("-v", "--verbose", action="store_true",
                      help="also print one row per quantized module (always in the checkpoint's quant_log.jsonl)")

    q = sub.add_parser("quantize", parents=[talk], help="quantize a model layer by layer and save a GPTQ checkpoint")
    q.add_argument("--model", default="default", help="a local transformers model dir, or 'default' (SmolLM2-135M)")
    q.add_argument("--method", default="gptq", choices=list(command_line_methods()),
                   help="quantization method (quantkern.methods; its options below)")
    q.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="a named method + options (quantkern.models.recipes; overrides --method), e.g. yaqa-guard: "
                        "the best 2-bit result on SmolLM2")
    q.add_argument("--bits", type=int, default=_DEFAULT.bits, choices=(2, 3, 4, 8))
    q.add_argument("--group-size", type=int, default=_DEFAULT.group_size, help="-1 = one group per output row")
    opts = q.add_argument_group(
        "method options", "each method's own options, from its config in quantkern.methods [method: default]; "
        "VALUE is read as JSON (numbers, true/false, null), else as a string. An option the chosen method does not "
        "have is an error, before any work.")
    for name, row in method_options().items():
        defaults = ", ".join(f"{m}: {d!r}" for m, d in row["defaults"].items())
        opts.add_argument(_flag(name), dest=f"opt_{name}", type=option_value, default=argparse.SUPPRESS,
                          metavar="VALUE", help=f"{row['help']} [{defaults}]".replace("%", "%%"))
    opts.add_argument("--alpha-mode", choices=("fixed", "sample", "optimize"), default=None,
                      help="SNRQ alpha: fixed (--alpha), sampled per sequence (SNRQ-S) or closed-form optimum "
                           "(the older spelling of --alpha sample / --alpha optimize)")
    opts.add_argument("--option", type=method_option, action="append", default=[], metavar="KEY=VALUE",
                      help="any option by its config field name (repeatable), e.g. --method yaqa --option "
                           "grid_from=snrq --option grid=guard (docs/methods_beyond_proxy.md)")
    q.add_argument("--nsamples", type=int, default=32)
    q.add_argument("--seqlen", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--calib", nargs="+", default=None,
                   help="calibration text files/dirs, or a built-in corpus: shakespeare (default), python-docs")
    q.add_argument("--act-order", action="store_true", help="GPTQ act-order (desc_act)")
    q.add_argument("--static-groups", action="store_true")
    q.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric)")
    q.add_argument("--damp", type=float, default=_DEFAULT.damp)
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

    e = sub.add_parser("eval", parents=[talk], help="perplexity on held-out text")
    e.add_argument("--model", default="default", help="quantized checkpoint, fp model dir, or 'default'")
    e.add_argument("--text", nargs="+", default=None, help="text files (default: held-out Hamlet + Macbeth)")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=8192)
    e.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every window with the BOS token (default: as the tokenizer does)")
    e.add_argument("--fp", action="store_true", help="also evaluate the fp model the checkpoint was quantized from (meta.source; SmolLM2 if not recorded)")

    g = sub.add_parser("generate", help="generate text")
    g.add_argument("--model", default="default")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--raw", action="store_true", help="no chat template")

    i = sub.add_parser("inspect", help="describe a quantized checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.add_argument("--kernels", action="store_true",
                   help="load the model; print which kernel each layer runs at 1, 8 and 128 tokens, and why not the others")

    b = sub.add_parser("bench", parents=[talk], help="decode tokens/s at batch 1: packed weights vs the fp32 model")
    b.add_argument("--model", default=None, help="quantized checkpoint (default: RTN 4-bit g64 of SmolLM2, in memory)")
    b.add_argument("--fp-model", default="default")
    b.add_argument("--tokens", type=int, default=32)
    b.add_argument("--lm-head", type=lm_head_arg, default="auto", metavar="{auto,fp,same,BITS}",
                   help="in-memory RTN model's output projection (as for quantize; default 8-bit)")
    b.add_argument("--quantize-lm-head", dest="lm_head", action="store_const", const="same",
                   help="same as --lm-head same (4-bit lm_head: faster, costs perplexity, see README)")

    x = sub.add_parser("export", parents=[talk], help="write a checkpoint as one GGUF file (llama.cpp / Ollama / LM Studio), exactly")
    x.add_argument("checkpoint")
    x.add_argument("--gguf", required=True, metavar="OUT.gguf", help="output file (written atomically)")
    x.add_argument("--embed-type", default="auto", choices=("auto", "f32", "f16", "q8_0"),
                   help="token embedding: auto = its own precision (exact), or f32 / f16 / q8_0")
    x.add_argument("--head-type", default="auto", choices=("auto", "f32", "f16", "q8_0"),
                   help="output head: auto = exact (its quantized grid, or tied to / like the embedding), or f32 / f16 / q8_0")
    x.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                   help="llama.cpp pre-tokenizer name, for a tokenizer it does not recognise (e.g. llama-bpe, smollm)")

    d = sub.add_parser("demo", parents=[talk], help="quantize SmolLM2 with SNRQ 4-bit g64 and report the story")
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


def option_value(text: str):
    """A method option's VALUE: JSON (numbers, true/false, null) if it parses, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def method_option(text: str) -> tuple[str, object]:
    """--option KEY=VALUE: (key, value), value as option_value reads it."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a keyword name, got {text!r}")
    return key, option_value(raw)


def spec_from_args(args) -> QuantSpec:
    spec = QuantSpec(bits=args.bits, group_size=args.group_size, sym=not args.asym, act_order=args.act_order,
                     static_groups=args.static_groups, damp=args.damp)
    if getattr(args, "gguf_type", None):
        from .export.gguf_presets import apply_preset

        spec = apply_preset(spec, args.gguf_type, _DEFAULT)  # the defaults tell it what was not asked for
    return spec


def config_from_args(args) -> MethodConfig:
    """The method config: --recipe's (if any) or --method's, on the grid flags, with the given options on top.
    MethodOptionError for an option the method does not have, ValueError for a value it does not allow."""
    given = method_kwargs_from_args(args)
    if args.recipe:
        base = RECIPES[args.recipe]
        return make_config(base.name, spec_from_args(args), **{**base.options(), **given})
    return make_config(args.method, spec_from_args(args), **given)


def method_kwargs_from_args(args) -> dict:
    """The method options given on the command line (option flags, --alpha-mode, --option)."""
    kw = {k[len("opt_"):]: v for k, v in vars(args).items() if k.startswith("opt_")}
    if args.alpha_mode is not None:
        kw["alpha_mode"] = args.alpha_mode
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

    if not is_builtin(name) and is_quantized_dir(name):
        return load(name), AutoTokenizer.from_pretrained(name)
    return load_fp(name)


def cmd_quantize(args) -> int:
    from .models import quantize, save_quantized
    from .models.zoo import load_fp

    try:  # bad options fail here, before the model loads
        config = config_from_args(args)
        if args.gguf_type:  # K-quants: the type's own fixed grid, solved by GPTQ (export/gguf_solve.py)
            from .export.gguf_presets import grid_method

            config = grid_method(args.gguf_type, config)
    except ValueError as e:  # a value the option does not allow: one line, as for an unknown option
        raise MethodOptionError(str(e)) from None
    if args.gguf_type:
        from .export.gguf_presets import reorders_groups

        why = reorders_groups(config.name, config.options())
        if why:
            raise SystemExit(f"quantkern quantize: --gguf-type {args.gguf_type} needs groups in channel order, but "
                             f"{why}; use --method gptq, gptaq, ldlq or rtn")
    level = console.level_from(args.quiet, args.verbose)
    model, tok = load_fp(args.model)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f".{out.name}.quant_log.jsonl"
    log.unlink(missing_ok=True)
    fixed_grid = config.name == "gguf_grid"  # K-quant grids: no RTN fallback on them, no fused packing
    report = quantize(model, config, tokenizer=tok, calib=args.calib or "shakespeare", nsamples=args.nsamples,
                      seqlen=args.seqlen, seed=args.seed, layers=args.layers, log_path=log,
                      progress=level >= console.NORMAL, verbose=level >= console.VERBOSE, lm_head=args.lm_head,
                      safety_net=args.safety_net and not fixed_grid, shrink=args.shrink, bos=args.bos,
                      fuse=not fixed_grid)
    kblocks = None
    if fixed_grid:
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
    model.quantkern_info["source"] = _source_name(args.model)
    save_quantized(model, out, tokenizer=tok, log_path=log, max_shard_size=args.max_shard_size)
    if kblocks:
        from .export.gguf_sidecar import save_sidecar

        save_sidecar(out, kblocks)
    log.unlink(missing_ok=True)
    readers = _readers(out)
    if level >= console.NORMAL:
        print(quantize_summary(args, config.spec, config.name, report, out, readers))
    else:
        print(out)
    return 0


def _source_name(model: str) -> str:
    """How a checkpoint names the fp model it came from: 'default' or the absolute directory."""
    return "default" if is_builtin(model) else str(Path(model).resolve())


def quantize_summary(args, spec, method, report, out, readers) -> str:
    """The closing table of `quantkern quantize`: settings, time, memory, sizes, who loads it, where it is."""
    from .models.checkpoint import checkpoint_size
    from .models.zoo import resolve_model_dir

    before = checkpoint_size(resolve_model_dir(args.model))["total"]
    after = checkpoint_size(out)["total"]
    head = {"auto": "8-bit RTN g128", "fp": "float", "same": f"as the body ({method})"}.get(
        args.lm_head, f"{args.lm_head}-bit RTN")
    settings = (f"{args.recipe or method}, {spec.bits}-bit, group {spec.group_size}, {'sym' if spec.sym else 'asym'}"
                f"{', act-order' if spec.act_order else ''}; lm_head {head}"
                f"{'; GGUF grid ' + args.gguf_type if args.gguf_type else ''}")
    calib = (f"{report.nsamples} x {report.seqlen} tokens ({' '.join(args.calib or ['shakespeare'])})"
             if report.nsamples else "none (round to nearest)")
    net = (f"kept RTN for {report.safety_fallbacks} of {len(report.modules)} modules" if report.safety_net
           else "off (--no-safety-net)")
    rows = [
        ("model", f"{args.model} -> {out}"),
        ("settings", settings),
        ("calibration", calib),
        ("time", f"{console.seconds(report.total_s)} (block forwards {console.seconds(report.forward_s)}, "
                 f"solving {console.seconds(report.solve_s)})"),
        ("peak memory", console.size(console.peak_memory_bytes())),
        ("size", f"{console.size(before)} -> {console.size(after)} ({before / max(after, 1):.1f}x smaller)"),
        ("safety net", net),
        ("loads in", ", ".join(f"{k} {v.word}" for k, v in readers.items())),
        ("module log", f"{out / 'quant_log.jsonl'} ({len(report.modules)} rows; --verbose prints them)"),
    ]
    return "\nquantized\n" + console.table(rows)


def _readers(path) -> dict:
    """Which engines load the checkpoint; a reader that would misload it is always named (on stderr)."""
    from .models.checkpoint import read_quantize_config
    from .models.readers import reader_support

    table = reader_support(read_quantize_config(path))
    for reader, v in table.items():
        if v.ok is False:
            print(f"warning: {reader}: {v}", file=sys.stderr)
    return table


def cmd_eval(args) -> int:
    from .calibration.data import evaluation_tokens, resolve_bos
    from .eval.perplexity import perplexity

    rows = []
    names = [args.model] + ([_fp_source(args.model)] if args.fp else [])
    for name in names:
        model, tok = load_any(name)
        docs = evaluation_tokens(tok, args.text or "shakespeare", args.max_tokens)
        r = perplexity(model, docs, args.seqlen, progress=not args.quiet, bos_id=resolve_bos(tok, args.bos),
                       desc=f"perplexity {name}")
        rows.append((name, r))
        print(f"{name}: perplexity {r['ppl']:.3f} over {r['tokens']} tokens ({r['windows']} windows of {r['seqlen']}, "
              f"{r['seconds']:.0f} s)")
        del model
    if len(rows) == 2 and not args.quiet:
        (_, q), (_, f) = rows
        print(f"quantized vs fp: {q['ppl']:.3f} vs {f['ppl']:.3f} ({q['ppl'] / f['ppl'] - 1:+.1%})")
    return 0


def _fp_source(name) -> str:
    """The fp model a checkpoint was quantized from (its meta.source), 'default' when not recorded."""
    if is_builtin(name) or not is_quantized_dir(name):
        raise SystemExit(f"quantkern eval: --fp compares a quantized checkpoint with its source; {name} is not one")
    from .models.checkpoint import read_quantize_config

    return (read_quantize_config(name).get("meta") or {}).get("source") or "default"


def cmd_generate(args) -> int:
    from .eval.generate import generate_text

    model, tok = load_any(args.model)
    print(generate_text(model, tok, args.prompt, args.max_new_tokens, args.raw))
    return 0


def inspect_checkpoint(path) -> dict:
    from .formats.gptq_config import checkpoint_format
    from .models.checkpoint import (ZERO_POINT_CONVENTIONS, checkpoint_size, checkpoint_tensors, read_quantize_config,
                                    spec_from_config)
    from .models.readers import reader_support
    from .ops import qgemm, registry

    qc = read_quantize_config(path)
    spec = spec_from_config(qc)
    meta = qc.get("meta", {})
    tensors = checkpoint_tensors(path)  # one pass over the safetensors headers

    def has_qgemm(backend):
        try:
            return registry.implementation(qgemm.OP, backend) is not None
        except KeyError:
            return False

    quantkern_backends = {}
    for b, st in registry.backends().items():
        has = has_qgemm(b)
        quantkern_backends[b] = ("yes" if st["available"] and has else "no") + f" ({st['reason']})" + (
            "" if has else " [no qgemm kernel registered]")
    dynamic = qc.get("dynamic") or {}
    fmt = checkpoint_format(qc)
    return {
        "path": str(path), "bits": spec.bits, "group_size": spec.group_size, "act_order (desc_act)": spec.act_order,
        "sym": spec.sym, "static_groups": spec.static_groups,
        "checkpoint_format": fmt, "zero_point_convention": ZERO_POINT_CONVENTIONS.get(fmt, "?"),
        "method": meta.get("method"), "alpha": meta.get("alpha"), "K": meta.get("K"),
        "config": meta.get("config") or NO_CONFIG,
        "quantizer": f"{meta.get('quantizer', '?')} {meta.get('quantizer_version', '')}".strip(),
        "quantized_modules": sum(1 for k in tensors if k.endswith(".qweight")),  # what the files hold
        "lm_head": _lm_head_line(qc, spec),
        "per-module overrides (dynamic)": {k: ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in dynamic.items()},
        "fallbacks": sum(1 for v in meta.get("modules", {}).values() if v.get("fallback")),
        "kept in float": {k: v for k, v in (meta.get("kept_float") or {}).items()},
        "experts": _experts_line(meta.get("experts") or {}),
        "calibration BOS": (meta.get("calibration") or {}).get("bos", "not recorded"),
        "size_bytes": checkpoint_size(path, tensors), "quantkern_backends_here": quantkern_backends,
        "loads_in (tests/interop)": {k: str(v) for k, v in reader_support(qc).items()},
    }


NO_CONFIG = "not recorded (written before quantkern recorded method configs)"


def config_line(config) -> str:
    """The checkpoint's method config as the constructor call that rebuilds it (quantkern.methods)."""
    from .methods import config_from_dict

    if not isinstance(config, dict):
        return str(config)
    try:
        return repr(config_from_dict(config))
    except (TypeError, ValueError) as e:
        return f"{json.dumps(config)} (not readable here: {e})"


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
    if args.kernels:
        from . import explain, load

        model = load(args.path)
        for tokens in (1, 8, 128):
            print(f"== {tokens} token(s) ==")
            explain(model, tokens)
        return 0
    info = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k == "config":
            print(f"config: {config_line(v)}")
        elif isinstance(v, dict):
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
    print(r["path"] if args.quiet else
          f"wrote {r['path']}  ({r['file_type']}; tensors {r['tensors']}; pre-tokenizer {r['tokenizer_pre']})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    kw = {k: v for k, v in (("nsamples", args.nsamples), ("seqlen", args.seqlen), ("eval_tokens", args.eval_tokens),
                            ("output", args.output)) if v is not None}
    run_demo(level=console.level_from(args.quiet, args.verbose), **kw)
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate, "inspect": cmd_inspect,
            "bench": cmd_bench, "demo": cmd_demo, "export": cmd_export}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .calibration.data import MissingDataError
    from .models.checkpoint import CheckpointError
    from .models.errors import UnsupportedModelError

    console.quiet_libraries()
    try:
        with console.one_line_warnings():
            return COMMANDS[args.command](args)
    except (MissingDataError, CheckpointError, FileNotFoundError, MethodOptionError, UnsupportedModelError) as e:
        print(f"quantkern {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
