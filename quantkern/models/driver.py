"""Layer-by-layer quantization of a transformers causal LM.

    report = quantize(model, SNRQ(bits=4, group_size=64, alpha=0.25), tokenizer=tok)   # quantkern.quantize
    model, report = quantize_model(model, tok, QuantSpec(bits=4, group_size=64), method="snrq")  # keyword form

Flow (one block's activations in memory at a time):
1. Cut calibration samples (quantkern.calibration.data) and capture the inputs of the first block,
   with the keyword arguments the block needs (attention mask, position ids/embeddings, ...).
2. For each block: if the method wants the full-precision stream (GPTAQ/SNRQ), run the still
   unquantized block on the fp inputs and keep the input of each linear group (X_f). Then for each
   group in true-sequential order (q/k/v, o, gate/up, down): run the block on the quantized stream
   up to that group (a hook stops the forward there), feed (X_q, X_f) to the group's statistics
   collector, solve each linear of the group and put its dequantized weight in place. Finally run
   the quantized block to get the next block's inputs and swap its linears for QuantLinear.

Methods are configs (quantkern.methods); each runs through a `Plugin` (see `register_plugin`): it says
whether the method needs the fp stream, makes a per-group statistics collector, and turns (weight,
collector) into a SolveResult. `Plugin.before_layers(model, samples)` runs once before the layer loop with gradients enabled: the hook
point for methods that need model-loss gradients w.r.t. each linear's output (OAC, YAQA), e.g. a
full-model backward with hooks on the linears, storing per-linear statistics for `solve` to use.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from typing import Iterable

import torch
import torch.nn as nn

from .. import console
from ..calibration.data import calibration_samples, resolve_bos
from ..calibration.shrinkage import shrink_to_diagonal
from .. import methods
from ..methods import METHODS, MethodConfig, make_config
from ..spec import QuantSpec
from ..calibration.stats import AsymAccumulator, HessianAccumulator
from ..nn import QuantLinear
from ..solvers import solve
from . import safety
from .arch import find_blocks, kept_float, linear_groups, quantizable_linears
from .errors import UnsupportedModelError
from .moe import expert_of, unfuse_experts
from .head import resolve_lm_head, round_head, set_module, untie_lm_head


class _StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of a block's forward."""


# ----------------------------------------------------------------------------------- plug-ins

class Plugin:
    """A method as the driver sees it: how its statistics are collected and its solver called. The default
    plug-in (activation H only, `quantkern.solve` with the config) serves GPTQ, LDLQ, AdaRound and any method
    registered without one; subclass and `register_plugin(Config, cls)` for others.

    needs_fp_inputs: the collector also receives X_f, the input the full-precision model sees.
    shrink: statistics are shrunk towards their diagonal by how many tokens estimated them
    (calibration.shrinkage; quantize(shrink=False) turns it off); `shrink_log` gets the rho of
    each one the last solve used.
    """

    needs_fp_inputs = False
    needs_activations = True  # False: no calibration forwards at all (RTN)
    shrink = True
    min_sequences = 0  # the preflight asks for at least this many calibration sequences
    progress = True  # before_layers may draw its own bar (quantize(progress=...) sets it)

    def __init__(self, config: MethodConfig, seed: int = 0):
        self.config, self.spec, self.name, self.seed = config, config.spec, config.name, seed
        self.shrink_log: dict[str, float] = {}

    def shrunk(self, key: str, H: torch.Tensor, nsamples: float | None) -> torch.Tensor:
        """H shrunk towards its diagonal as `nsamples` samples warrant (unchanged with shrink off or no count)."""
        if not self.shrink or nsamples is None:
            return H
        Hs, rho = shrink_to_diagonal(H, nsamples)
        self.shrink_log[key] = rho
        return Hs

    def hessian(self, collector) -> torch.Tensor:
        """The collector's activation Hessian, shrunk by its token count."""
        return self.shrunk("H", collector.H, collector.ntokens)

    def net_alpha(self, res) -> float:
        """Weight of the fp-stream term in the safety net's layer loss: the alpha the solve aimed with."""
        a = res.log.get("alpha")
        return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else 0.0

    def before_layers(self, model: nn.Module, samples: torch.Tensor) -> None:
        """Once, before the layer loop (gradients enabled). Default: nothing."""

    def collector(self, n: int):
        return HessianAccumulator(n)

    def add(self, collector, x_q: torch.Tensor, x_f: torch.Tensor | None) -> None:
        collector.add_batch(x_q)

    def solve(self, name: str, weight: torch.Tensor, collector):
        return solve(weight, self.hessian(collector), self.config)

    def meta(self) -> dict:
        """What the checkpoint records about the run (JSON-serialisable): the method, its scalar options, and
        what the plug-in learned (subclasses add)."""
        return {"method": self.name,
                **{k: v for k, v in self.config.options().items() if isinstance(v, (int, float, str, bool))}}


class RTNPlugin(Plugin):
    needs_activations = False

    def collector(self, n: int):
        return None

    def add(self, collector, x_q, x_f):
        pass

    def solve(self, name, weight, collector):
        return solve(weight, None, self.config)


class AsymmetricPlugin(Plugin):
    """GPTAQ / SNRQ / K-SNRQ: H = (2/N) sum Xq Xq^T and D = (2/N) sum (Xf - Xq) Xq^T.

    alpha="sample" (SNRQ-S): each sequence's D term is scaled by min(a, 1-a), a ~ Beta(mixup, mixup), inside
    the accumulator. alpha="optimize": closed-form alpha* with the authors' one-layer lag: each module uses the
    alpha* its namesake in the previous block reported.
    """

    needs_fp_inputs = True

    def __init__(self, config, seed=0):
        super().__init__(config, seed)
        self._alpha_lag: dict[str, float] = {}

    def collector(self, n):
        if self.config.alpha == "sample":
            return AsymAccumulator(n, alpha_mode="sample", mixup=self.config.mixup, seed=self.seed)
        return AsymAccumulator(n, alpha_mode="fixed", seed=self.seed)

    def add(self, collector, x_q, x_f):
        collector.add_batch(x_q, x_f)

    def solve(self, name, weight, collector):
        lag = {}
        if self.config.alpha == "optimize" and name in self._alpha_lag:
            lag["alpha_prev"] = self._alpha_lag[name]
        res = solve(weight, self.hessian(collector), self.config, D=collector.D, **lag)
        if self.config.alpha == "optimize":
            nxt = res.log.get("alpha_next", res.log.get("alpha"))
            if nxt is not None:
                self._alpha_lag[name] = float(nxt)
        return res


def register_plugin(config: type[MethodConfig], plugin: type[Plugin]) -> None:
    """Make the driver run method `config` (a registered MethodConfig subclass) with `plugin`."""
    if not (isinstance(plugin, type) and issubclass(plugin, Plugin)):
        raise TypeError("register_plugin needs a quantkern.models.driver.Plugin subclass")
    if not (isinstance(config, type) and issubclass(config, MethodConfig) and METHODS.get(config.name) is config):
        raise TypeError(f"register_plugin needs a config class registered in quantkern.methods, got {config!r}")
    config.plugin = plugin


for _config, _plugin in ((methods.RTN, RTNPlugin), (methods.GPTQ, Plugin), (methods.LDLQ, Plugin),
                         (methods.GPTAQ, AsymmetricPlugin), (methods.SNRQ, AsymmetricPlugin),
                         (methods.KSNRQ, AsymmetricPlugin)):
    register_plugin(_config, _plugin)


def make_plugin(config: MethodConfig, seed: int = 0) -> Plugin:
    if not isinstance(config, MethodConfig):
        raise TypeError(f"expected a method config (quantkern.methods, e.g. SNRQ(bits=4)), got {type(config).__name__}")
    return (type(config).plugin or Plugin)(config, seed=seed)


# ----------------------------------------------------------------------------------- report

@dataclasses.dataclass
class QuantReport:
    method: str
    spec: dict
    method_meta: dict
    nsamples: int
    seqlen: int
    layers: list
    modules: list = dataclasses.field(default_factory=list)  # one dict per quantized linear
    capture_s: float = 0.0
    forward_s: float = 0.0  # block forwards (incl. statistics collection in hooks)
    solve_s: float = 0.0
    total_s: float = 0.0
    safety_net: bool = True
    safety_fallbacks: int = 0  # modules whose method lost to RTN on their own statistics (RTN kept)
    experts: dict = dataclasses.field(default_factory=dict)  # "layer.container.e" -> routed tokens, side pass
    config: dict | None = None  # the method config, MethodConfig.to_dict() (versioned)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class _Timer:
    def __init__(self):
        self.t = 0.0

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.t += time.perf_counter() - self.t0


def _capture_first_block(model, block0, samples) -> tuple[list[torch.Tensor], dict]:
    inps, kwargs = [], {}

    def hook(mod, args, kw):
        kw = dict(kw)
        x = args[0] if args else kw.pop("hidden_states")
        inps.append(x.detach())
        if not kwargs:
            kwargs.update(kw)
        raise _StopForward

    h = block0.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for s in samples:
            try:
                model(input_ids=s[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        h.remove()
    return inps, _clean_kwargs(kwargs)


def _clean_kwargs(kw: dict) -> dict:
    kw = dict(kw)
    kw.pop("past_key_values", None)
    kw.pop("past_key_value", None)
    kw["use_cache"] = False
    return kw


def _block_kwargs(model, blocks, sample) -> list[dict]:
    """The keyword arguments each block is called with (one forward of `sample`): they differ per block where
    layers differ (Gemma 2/3 sliding-window vs global layers: masks, Gemma 3's local rotary embeddings)."""
    kws: list[dict | None] = [None] * len(blocks)

    def hook(mod, args, kw, li):
        kw = dict(kw)
        kw.pop("hidden_states", None)
        kws[li] = _clean_kwargs(kw)
        if li == len(blocks) - 1:
            raise _StopForward

    handles = [b.register_forward_pre_hook(lambda m, a, k, li=li: hook(m, a, k, li), with_kwargs=True)
               for li, b in enumerate(blocks)]
    try:
        model(input_ids=sample[None].to(next(model.parameters()).device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return kws


def _resolve_layers(layers, nblocks: int) -> list[int]:
    if layers is None:
        return list(range(nblocks))
    if isinstance(layers, int):
        return list(range(min(layers, nblocks)))
    out = sorted(set(int(i) for i in layers))
    if out and (out[0] < 0 or out[-1] >= nblocks):
        raise ValueError(f"layers must lie in [0, {nblocks}), got {out}")
    return out


def check_linears(blocks, chosen, spec: QuantSpec) -> None:
    """Every chosen block must have linears to quantize (ValueError otherwise). A group size that does not divide
    a linear's input size is legal here (ragged last group) but some peer kernels refuse it: one warning."""
    for li in chosen:
        if not quantizable_linears(blocks[li]):
            raise UnsupportedModelError(f"block {li} ({type(blocks[li]).__name__}) has no nn.Linear to quantize (other layer types, "
                             "e.g. GPT-2's Conv1D, are not supported); add the architecture to quantkern.models.arch")
    if spec.group_size > 0:
        odd = sorted({(n, blocks[li].get_submodule(n).in_features) for li in chosen for n in quantizable_linears(blocks[li])
                      if blocks[li].get_submodule(n).in_features % spec.group_size})
        if odd:
            warnings.warn(f"group_size {spec.group_size} does not divide the input size of {len(odd)} linear(s) "
                          f"({', '.join(f'{n}: {k}' for n, k in odd[:3])}): quantkern reads the ragged last group, some peer "
                          "kernels refuse it (measured: the int4pack CPU kernel transformers picks)", UserWarning,
                          stacklevel=3)


def quantize_model(model: nn.Module, tokenizer=None, spec: QuantSpec | MethodConfig | dict | None = None,
                   method: str | None = None, calib="shakespeare", nsamples: int = 32, seqlen: int = 512,
                   seed: int = 0, layers: int | Iterable[int] | None = None, log_path=None, progress: bool = True,
                   verbose: bool = False,
                   lm_head="auto", fuse: bool = True, quantize_lm_head: bool | None = None, safety_net: bool = True,
                   shrink: bool = True, moe_min_tokens: int | None = None, bos: bool | None = None,
                   **method_kwargs):
    """The keyword form of `quantize`, kept for existing callers: returns (model, QuantReport).

    The config is `make_config(method, spec, **method_kwargs)` (method default "gptq"; a config as `spec`
    is used as given, `method_kwargs` on top); quantize_lm_head is the older spelling of lm_head=True (True) /
    lm_head=None (False). Everything else as `quantize`.
    """
    if isinstance(spec, MethodConfig):
        name = method or spec.name
        config = spec if name == spec.name and not method_kwargs else make_config(
            name, spec, **({**spec.options(), **method_kwargs} if name == spec.name else method_kwargs))
    else:
        config = make_config(method or "gptq", QuantSpec(**spec) if isinstance(spec, dict) else spec, **method_kwargs)
    if quantize_lm_head is not None:
        lm_head = True if quantize_lm_head else None
    report = quantize(model, config, tokenizer=tokenizer, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                      layers=layers, log_path=log_path, progress=progress, verbose=verbose, lm_head=lm_head, fuse=fuse,
                      safety_net=safety_net, shrink=shrink, moe_min_tokens=moe_min_tokens, bos=bos)
    return model, report


def quantize(model: nn.Module, config: MethodConfig, *, tokenizer=None, calib="shakespeare", nsamples: int = 32,
             seqlen: int = 512, seed: int = 0, layers: int | Iterable[int] | None = None, log_path=None,
             progress: bool = True, verbose: bool = False, lm_head="auto", fuse: bool = True, safety_net: bool = True,
             shrink: bool = True, moe_min_tokens: int | None = None, bos: bool | None = None) -> "QuantReport":
    """Quantize the decoder blocks of `model` in place with `config` (a method config from quantkern.methods,
    e.g. SNRQ(bits=4, group_size=64, alpha=0.25): the grid, the method and its options); returns the QuantReport.

    calib: a built-in corpus name, paths, strings (need `tokenizer`) or a token tensor [N, T].
    layers: quantize only these block indices (an int N = the first N blocks); others stay fp.
    progress: one progress bar (on a terminal) and one-line notes; verbose: also one row per module on
        stdout (the rows always go to `log_path` as JSON lines, and into the report).
    lm_head: what happens to the output projection (see `resolve_lm_head`):
        "auto" (default): 8-bit RTN, group 128 (as llama.cpp keeps output.weight at 6-8 bits): it is the
            largest single matrix of a small model and the last fp32 read of every decoded token; at 8
            bits perplexity does not move (SmolLM2: 35.54 -> 35.47) and decode gets ~20% faster. Models
            without an nn.Linear output projection keep theirs, and so does a run over a subset of `layers`.
        None / False / "fp": keep it in float.
        True / "same": the body's spec and method (GPTQModel's lm_head=True); its calibration input is the
            final norm's output on the quantized (and, for GPTAQ/SNRQ, the full-precision) stream.
        an int (bits) or a QuantSpec: that grid, rounded with RTN (no calibration).
        A rounded head is saved in float (tied where the model ties it) and rounded again at load, so every
        GPTQ reader loads it (quantkern.models.head). A "same" head is untied first (the input embedding
        keeps its float table) and saved packed: GPTQModel and quantkern load it, transformers does not.
    fuse: run linears that read the same input (q/k/v, gate/up) as one kernel call (quantkern.nn.fused).
    safety_net: after each solve, score the result and RTN's on the layer's own activation statistics
        and keep RTN's codes where the method lost or is not finite (models/safety.py); logged per module
        ("safety") and counted in report.safety_fallbacks. False (research) keeps every method result.
    shrink: shrink H, the Fisher and the Kronecker factors towards their diagonals by how many tokens
        estimated them (calibration.shrinkage); False uses the raw statistics.
    moe_min_tokens: an expert whose routed calibration tokens are fewer than this (default: the input size
        of each of its linears) gets its statistics from every calibration token instead (a side pass
        through that expert alone; the block's output still follows the router). Recorded per expert.
    bos: calibration samples start with the BOS token (True), never (False), or as the tokenizer does by
        default (None: calibration.data.resolve_bos); a token-tensor `calib` is used as given. Recorded.
    """
    t_start = time.perf_counter()
    plugin = make_plugin(config, seed=seed)
    spec = config.spec
    plugin.shrink = bool(shrink)
    model.eval()
    # everything that can refuse the model does so here, before any calibration work
    unfuse_experts(model)  # fused 3-D expert weights -> one nn.Linear per expert projection (models/moe.py)
    block_path, blocks = find_blocks(model)
    chosen = _resolve_layers(layers, len(blocks))
    check_linears(blocks, chosen, spec)
    bos_id = None  # a token tensor is used as given
    if not plugin.needs_activations:
        samples = torch.zeros(0, 0, dtype=torch.long)
    elif isinstance(calib, torch.Tensor) and calib.dim() == 2:
        samples = calib.long()
    else:
        if tokenizer is None:
            raise ValueError("quantize_model needs a tokenizer to cut calibration text (or pass calib as a token tensor)")
        bos_id = resolve_bos(tokenizer, bos)
        samples = calibration_samples(tokenizer, calib, nsamples, seqlen, seed, bos=bos_id is not None)
    if lm_head == "auto" and len(chosen) < len(blocks):
        lm_head = None  # a partial run (debugging, experiments) changes only the blocks it was asked to
    head_mode, head_spec = resolve_lm_head(lm_head, spec, model)
    # a solved head needs its own weight (the solver writes into it); a rounded one keeps the float (tied) one
    head_name = untie_lm_head(model) if head_mode == "same" else None
    calibrated_head = head_mode == "same"
    report = QuantReport(config.name, spec.to_dict(), plugin.meta(), samples.shape[0], samples.shape[1], chosen,
                         safety_net=bool(safety_net), config=config.to_dict())
    if plugin.needs_activations and (chosen or calibrated_head):
        advice = calibration_advice(plugin, _widest_input(blocks, chosen, model, head_name if calibrated_head else None),
                                    samples.shape[0], samples.shape[1])
        if advice:
            warnings.warn(advice, UserWarning, stacklevel=2)
    if chosen or head_mode != "fp":
        run = _Run(plugin, report, log_path, console.VERBOSE if progress and verbose else
                   console.NORMAL if progress else console.QUIET, safety_net)
        run.moe_min_tokens = moe_min_tokens
        try:
            plugin.progress = progress  # gradient statistics (OAC / YAQA) draw their own bar
            with torch.enable_grad():
                plugin.before_layers(model, samples)
            with torch.no_grad():
                if plugin.needs_activations and (chosen or calibrated_head):
                    inps, fp_inps = _layer_loop(model, blocks, chosen, samples, run, through_all=calibrated_head)
                    if calibrated_head:
                        _quantize_lm_head(model, head_name, run, inps, fp_inps)
                else:
                    for li in chosen:
                        block = blocks[li]
                        names = quantizable_linears(block)
                        results = {n: run.solve(li, n, block.get_submodule(n), None) for n in names}
                        _swap_in_quantized(block, results)
                    if calibrated_head:
                        _quantize_lm_head(model, head_name, run, None, None)
                if head_mode == "rtn":
                    with run.slv:
                        t0 = time.perf_counter()
                        name, res = round_head(model, head_spec)
                    run.record(None, name, model.get_submodule(name), res, time.perf_counter() - t0)
        finally:
            run.close()
        report.forward_s, report.solve_s = run.fwd.t, run.slv.t
    report.method_meta = plugin.meta()  # after the run: plug-ins may add what they learned (timings, alphas)
    report.total_s = time.perf_counter() - t_start
    _summarise_safety(report, progress)
    model.quantkern_info = {
        "spec": spec.to_dict(), "method": report.method_meta, "config": report.config, "block_path": block_path,
        "lm_head": {"mode": head_mode, "spec": head_spec.to_dict() if head_spec is not None else None},
        "modules": {(r["module"] if r["layer"] is None else f"{block_path}.{r['layer']}.{r['module']}"):
                    {k: r[k] for k in ("damp", "retries", "fallback", "loss", "safety", "shrink") if k in r}
                    for r in report.modules},
        "safety_net": {"on": report.safety_net, "fallbacks": report.safety_fallbacks},
        "calibration": {"bos": bos_id is not None, "bos_token_id": bos_id,
                        "tokens": "as given" if isinstance(calib, torch.Tensor) else "text"},
        "kept_float": {f"{block_path}.{li}.{n}": why for li in chosen for n, why in kept_float(blocks[li]).items()},
    }
    # those that are nn.Linear: a reader that ignores GPTQModel's "-:" rules would try to load them packed
    model.quantkern_info["kept_float_linears"] = [n for n in model.quantkern_info["kept_float"]
                                                  if isinstance(model.get_submodule(n), nn.Linear)]
    if report.experts:
        model.quantkern_info["experts"] = {f"{block_path}.{k}": v for k, v in report.experts.items()}
    if fuse:
        from .fusion import fuse_quant_groups

        fuse_quant_groups(model)
    return report


class _Run:
    """Per-run state: timers, the JSONL log, progress rows, and the solve call with its bookkeeping."""

    def __init__(self, plugin, report, log_path, level=console.NORMAL, safety_net=True):
        self.plugin, self.report, self.level, self.safety_net = plugin, report, level, safety_net
        self.log = open(log_path, "a") if log_path else None
        self.fwd, self.slv = _Timer(), _Timer()
        self.moe_min_tokens = None

    def solve(self, li, name, lin, collector, solver=None, net_stats=None):
        """Solve one linear (with the method's plug-in, or `solver(weight)`), keep RTN's result instead where
        the safety net says so, put the dequantized weight in place, and log the row. net_stats: the
        activation statistics the net scores on (default: the collector, if it has H)."""
        if net_stats is None and hasattr(collector, "H"):
            net_stats = collector
        check = self.safety_net and solver is None and net_stats is not None and net_stats.nsamples > 0
        with self.slv:
            t0 = time.perf_counter()
            w = lin.weight.data.float()
            self.plugin.shrink_log = {}
            res = solver(w) if solver is not None else self.plugin.solve(name, w, collector)
            net = None
            if check:
                a = self.plugin.net_alpha(res)
                res, net = safety.check(w, res, net_stats.H, net_stats.ntokens, self.plugin.spec,
                                        D=getattr(net_stats, "D", None) if a else None, alpha=a)
            dt = time.perf_counter() - t0
        lin.weight.data.copy_(res.dequantized.to(lin.weight.dtype))
        self.record(li, name, lin, res, dt, net, getattr(self.plugin, "shrink_log", None))
        return res

    def record(self, li, name, lin, res, dt, net=None, shrink_log=None):
        """The module's row: in the report, the JSONL log and (verbose) the terminal."""
        row = {"layer": li, "module": name, "out": lin.out_features, "in": lin.in_features,
               "loss": float(res.loss), "damp": float(res.log.get("damp", float("nan"))),
               "retries": int(res.log.get("retries", 0) or 0), "fallback": res.log.get("fallback"),
               "time_s": round(dt, 4)}
        if "grid_losses" in res.log:  # grid="select" / "guard": every candidate's objective and the one kept
            row["grid"], row["grid_losses"] = res.log["grid"], res.log["grid_losses"]
        if shrink_log:
            row["shrink"] = {k: round(v, 6) for k, v in shrink_log.items()}
        if net is not None:
            row["safety"] = net
        self.report.modules.append(row)
        if self.log:
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()
        if self.level >= console.VERBOSE:
            loss = f"{row['loss']:>10.4g}" if row["loss"] == row["loss"] else f"{'-':>10}"  # RTN: no H, no loss
            damp = f"{row['damp']:.3g}" if row["damp"] == row["damp"] else "-"
            kept_rtn = net is not None and net["kept"] == "rtn"
            console.write(f"  layer {'-' if li is None else li:>3}  {name:<18} loss {loss}  damp {damp}"
                       f"{'  FALLBACK ' + str(row['fallback']) if row['fallback'] else ''}  {dt:6.2f}s"
                       f"{'  grid ' + row['grid'] if 'grid' in row else ''}"
                       f"{'  SAFETY: kept RTN (' + _ratio(net) + ')' if kept_rtn else ''}", self.level)

    def close(self):
        if self.log:
            self.log.close()


def _ratio(net) -> str:
    ml, rl = net["method_loss"], net["rtn_loss"]
    if ml is None:
        return "method result not finite"
    if rl > 0 and ml > 0:
        return f"method {ml / rl:.3f}x RTN's loss"
    return f"method loss {ml:.4g} vs RTN {rl:.4g}"


def _summarise_safety(report, progress) -> None:
    rows = [r for r in report.modules if "safety" in r]
    fell = [r for r in rows if r["safety"]["kept"] == "rtn"]
    report.safety_fallbacks = len(fell)
    if not report.safety_net:
        return
    if fell:
        warnings.warn(f"quantkern safety net: {len(fell)} of {len(rows)} checked modules kept RTN ({report.method} "
                      f"was worse on their own calibration statistics): "
                      f"{', '.join(str(r['layer']) + '.' + r['module'] for r in fell[:6])}{' ...' if len(fell) > 6 else ''}",
                      RuntimeWarning, stacklevel=3)
    if rows:
        console.write(f"safety net: {len(fell)} of {len(rows)} modules kept RTN", console.NORMAL if progress else console.QUIET)


def _swap_in_quantized(block, results):
    for name, res in results.items():
        set_module(block, name, QuantLinear.from_linear(block.get_submodule(name), res))


def _layer_loop(model, blocks, chosen, samples, run, through_all=False):
    """Quantize the chosen blocks; returns the (quantized, fp) streams after the last block run (all
    blocks with `through_all`, for lm_head's statistics; fp is None unless the method needs it)."""
    plugin, spec, fwd = run.plugin, run.plugin.spec, run.fwd
    t0 = time.perf_counter()
    inps, _ = _capture_first_block(model, blocks[0], samples)
    kws = _block_kwargs(model, blocks, samples[0])
    run.report.capture_s = time.perf_counter() - t0
    fp_inps = [x.clone() for x in inps] if plugin.needs_fp_inputs else None
    console.write(_preflight(model, blocks, chosen, inps, kws[0], plugin), run.level)

    last = len(blocks) - 1 if through_all else chosen[-1]
    bar = console.bar(range(last + 1), run.level, desc=f"{plugin.name} {spec.bits}-bit g{spec.group_size}", unit="block")
    for li in bar:
        stage = _Stage(bar)
        block, kw = blocks[li], kws[li]
        if li not in chosen:
            stage("forward")
            with fwd:
                inps = [_block_out(block(x, **kw)) for x in inps]
                if fp_inps is not None:
                    fp_inps = [_block_out(block(x, **kw)) for x in fp_inps]
            continue
        groups = linear_groups(model, block, lambda: block(inps[0], **kw))
        fp_group_inputs, fp_expert_inputs = None, {}
        if fp_inps is not None:
            stage("fp stream")
            with fwd:
                (fp_group_inputs, fp_expert_inputs), fp_inps = _run_fp_stream(block, groups, fp_inps, kw)
        results = {}
        for unit in _solve_units(groups, block):
            stats = []
            for gi in unit:
                collector = plugin.collector(block.get_submodule(groups[gi][0]).in_features)
                # methods without an activation H (OAC, YAQA on the Fisher) get one for the safety net
                net = (HessianAccumulator(block.get_submodule(groups[gi][0]).in_features)
                       if run.safety_net and not hasattr(collector, "H") else None)
                stats.append((collector, net))
            if any(c is not None or n is not None for c, n in stats):
                stage("statistics")
                with fwd:
                    if expert_of(groups[unit[0]][0]):
                        stats = _collect_experts(block, [groups[gi] for gi in unit], inps, kw, plugin, stats,
                                                 run.moe_min_tokens, run.report.experts, li,
                                                 fp_expert_inputs.get(expert_of(groups[unit[0]][0])[0]))
                    else:
                        gi = unit[0]
                        _collect(block, block.get_submodule(groups[gi][0]), inps, kw, plugin, stats[0][0],
                                 None if fp_group_inputs is None else fp_group_inputs[gi], stats[0][1])
            stage("solve")
            for gi, (collector, net) in zip(unit, stats):
                for name in groups[gi]:
                    results[name] = run.solve(li, name, block.get_submodule(name), collector, net_stats=net)
            del stats, collector, net
        stage("forward")
        with fwd:
            inps = [_block_out(block(x, **kw)) for x in inps]
        _swap_in_quantized(block, results)
        del results, fp_group_inputs
    return inps, fp_inps


class _Stage:
    """The bar's postfix: what the current block is doing and the process's peak memory so far."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, name: str) -> None:
        if not self.bar.disable:
            self.bar.set_postfix_str(f"{name}, peak {console.size(console.peak_memory_bytes())}")


def _quantize_lm_head(model, name, run, inps, fp_inps):
    """Statistics of lm_head from the final norm's output on both streams, then solve and swap in."""
    from .arch import find_final_norm

    plugin, head = run.plugin, model.get_submodule(name)
    collector = None
    if inps is not None:
        norm = find_final_norm(model)
        collector = plugin.collector(head.in_features)
        if collector is not None:
            with run.fwd:
                for i, x in enumerate(inps):
                    plugin.add(collector, norm(x), None if fp_inps is None else norm(fp_inps[i]))
    res = run.solve(None, name, head, collector)
    set_module(model, name, QuantLinear.from_linear(head, res))


def _collect(block, first, inps, kw, plugin, collector, fp_inputs, net=None):
    """Run the quantized stream up to `first` (a hook stops the forward there) and feed the collector
    (and `net`, the safety net's own H accumulator, if any)."""
    sample = [0]

    def hook(mod, inp):
        if collector is not None:
            plugin.add(collector, inp[0].detach(), None if fp_inputs is None else fp_inputs[sample[0]])
        if net is not None:
            net.add_batch(inp[0].detach())
        raise _StopForward

    h = first.register_forward_pre_hook(hook)
    try:
        for s, x in enumerate(inps):
            sample[0] = s
            try:
                block(x, **kw)
            except _StopForward:
                pass
    finally:
        h.remove()


# memory for one pass's expert statistics (H, and D for GPTAQ/SNRQ, per expert): bounds the experts per pass
EXPERT_STATS_BYTES = 2 << 30


def _solve_units(groups, block) -> list[list[int]]:
    """Group indices in solve order, one unit per statistics pass. A run of expert groups of one experts module
    is solved stage by stage (every expert's gate/up, then every expert's down: each down needs only its own
    expert's gate/up), as many experts per pass as EXPERT_STATS_BYTES allows, so one routed forward feeds many
    experts instead of one."""
    units, i = [], 0
    while i < len(groups):
        ex = expert_of(groups[i][0])
        if ex is None:
            units.append([i])
            i += 1
            continue
        per_expert: dict[int, list[int]] = {}
        while i < len(groups) and (expert_of(groups[i][0]) or ("",))[0] == ex[0]:
            per_expert.setdefault(expert_of(groups[i][0])[1], []).append(i)
            i += 1
        for depth in range(max(len(v) for v in per_expert.values())):
            stage = [v[depth] for v in per_expert.values() if len(v) > depth]
            n = block.get_submodule(groups[stage[0]][0]).in_features
            per = max(1, EXPERT_STATS_BYTES // (n * n * 4 * 3))
            units += [stage[c:c + per] for c in range(0, len(stage), per)]
    return units


def _collect_experts(block, groups, inps, kw, plugin, stats, min_tokens, log, li, fp_all=None):
    """Statistics of expert groups (one stage of one experts module) from the tokens the router sends each
    expert in the normal routed forward; an expert's group with fewer than `min_tokens` (default: its input size)
    routed tokens gets them from every calibration token instead, by running that expert alone on all of them
    (the block's output still follows the router). Returns the [(collector, net)] to solve with.
    X_f (GPTAQ/SNRQ, `fp_all`: the fp stream's input of the experts module per sample, every token): for gate/up,
    the fp input at the very tokens the quantized stream routed (or every token, side pass); for down, X_q
    (D = 0): its fp input would need the expert's fp gate/up outputs, which are not kept."""
    container_path = expert_of(groups[0][0])[0]
    container = block.get_submodule(container_path)
    everything, routing, routed = [], [], [0] * len(groups)

    def feed(x, coll, nt, x_f=None):
        x = x.detach().reshape(1, -1, x.shape[-1])  # one sequence per calibration sample
        if coll is not None:
            plugin.add(coll, x, x if x_f is None else x_f.reshape(x.shape).to(x.dtype))
        if nt is not None:
            nt.add_batch(x)

    def reads_module_input(g):  # ExpertMLP's gate/up read what the experts module was given
        return g[0].rpartition(".")[2] in ("gate_proj", "up_proj")

    def on_first(k, e, g):
        def hook(mod, inp):
            routed[k] += inp[0].reshape(-1, inp[0].shape[-1]).shape[0]
            x_f = None
            if fp_all is not None and reads_module_input(g):  # the order RoutedExperts picks tokens in
                token_idx = torch.where(routing[-1] == e)[0]
                x_f = fp_all[len(routing) - 1].reshape(-1, inp[0].shape[-1])[token_idx]
            feed(inp[0], *stats[k], x_f=x_f)
        return hook

    def on_container(mod, args):
        everything.append(args[0].detach())
        routing.append(args[1].detach())  # top_k_index

    def stop(mod, args, out):
        raise _StopForward

    handles = [container.register_forward_pre_hook(on_container), container.register_forward_hook(stop)]
    handles += [block.get_submodule(g[0]).register_forward_pre_hook(on_first(k, expert_of(g[0])[1], g))
                for k, g in enumerate(groups)]
    try:
        for x in inps:
            try:
                block(x, **kw)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    out = []
    for k, g in enumerate(groups):
        e, first = expert_of(g[0])[1], block.get_submodule(g[0])
        collector, net = stats[k]
        side = routed[k] < (first.in_features if min_tokens is None else int(min_tokens))
        if side:
            collector = plugin.collector(first.in_features) if collector is not None else None
            net = type(net)(first.in_features) if net is not None else None

            sample = [0]

            def on_first_all(mod, inp, c=collector, n=net, g=g):
                use_fp = fp_all is not None and reads_module_input(g)
                feed(inp[0], c, n, x_f=fp_all[sample[0]] if use_fp else None)
                raise _StopForward

            h = first.register_forward_pre_hook(on_first_all)
            try:
                for sample[0], x in enumerate(everything):
                    try:
                        container[e](x)
                    except _StopForward:
                        pass
            finally:
                h.remove()
        row = log.setdefault(f"{li}.{container_path}.{e}", {"tokens": routed[k], "side_pass": False,
                                                            "side_pass_linears": []})
        if side:
            row["side_pass"] = True
            row["side_pass_linears"] += [n.rpartition(".")[2] for n in g]
        out.append((collector, net))
    return out


def _run_fp_stream(block, groups, fp_inps, kw):
    """Run the unquantized block on the fp stream; keep each group's input per sample. Expert groups keep
    nothing (the two streams route different tokens to an expert): the input of each experts module, every
    token, is kept instead under the module's path, for the experts' X_f (_collect_experts)."""
    cache = [[] for _ in groups]
    handles = [block.get_submodule(g[0]).register_forward_pre_hook(
        lambda mod, inp, i=i: cache[i].append(inp[0].detach())) for i, g in enumerate(groups) if not expert_of(g[0])]
    containers = sorted({expert_of(g[0])[0] for g in groups if expert_of(g[0])})
    expert_inputs = {c: [] for c in containers}
    handles += [block.get_submodule(c).register_forward_pre_hook(
        lambda mod, args, c=c: expert_inputs[c].append(args[0].detach())) for c in containers]
    try:
        outs = [_block_out(block(x, **kw)) for x in fp_inps]
    finally:
        for h in handles:
            h.remove()
    return (cache, expert_inputs), outs


def _preflight(model, blocks, chosen, inps, kw, plugin) -> str:
    """One line: activation memory and a forward-time estimate, from timing block 0 once."""
    t0 = time.perf_counter()
    blocks[0](inps[0], **kw)
    tb = time.perf_counter() - t0
    n = len(inps)
    act = sum(x.numel() * x.element_size() for x in inps)
    streams = 2 if plugin.needs_fp_inputs else 1
    mem = act * 2 * streams + (act * 4 if plugin.needs_fp_inputs else 0)  # in+out per stream, + fp group inputs
    last = chosen[-1]
    nq = len(chosen)
    passes = nq * (1 + 2 + (1 if plugin.needs_fp_inputs else 0)) + (last + 1 - nq) * streams  # groups stop early: ~2
    est = passes * n * tb
    nlin = sum(len(quantizable_linears(blocks[i])) for i in chosen)
    msg = (f"preflight: {len(blocks)} blocks, quantizing {nq} (up to block {last}), {n} x {inps[0].shape[-2]} tokens, "
           f"method {plugin.name}; activations ~{mem / 2**20:.0f} MiB; block forwards ~{est:.0f} s "
           f"({tb * 1e3:.0f} ms each) + solving {nlin} linears")
    return msg


# Calibration tokens per input feature: below MIN_TOKENS_PER_INPUT the widest H is poorly estimated (its
# rank is at most the token count; GPTQ's recipe has ~24 per feature: 128 x 2048 tokens for n <= 11008).
MIN_TOKENS_PER_INPUT = 4
RECOMMENDED_TOKENS_PER_INPUT = 8


def _widest_input(blocks, chosen, model, head_name=None) -> int:
    ns = [blocks[i].get_submodule(n).in_features for i in chosen for n in quantizable_linears(blocks[i])]
    if head_name:
        ns.append(model.get_submodule(head_name).in_features)
    return max(ns, default=0)


def calibration_advice(plugin, n_max: int, nsamples: int, seqlen: int) -> str | None:
    """One line recommending more calibration data when nsamples x seqlen tokens are few for inputs n_max
    wide (or for the method's own needs, `Plugin.min_sequences`); None when the amount is fine."""
    tokens = nsamples * seqlen
    need_seq = int(getattr(plugin, "min_sequences", 0) or 0)
    if n_max <= 0 or (tokens >= MIN_TOKENS_PER_INPUT * n_max and nsamples >= need_seq):
        return None
    want = RECOMMENDED_TOKENS_PER_INPUT * n_max
    rec_n = max(-(-want // max(seqlen, 1)), need_seq)
    why = f"{tokens / n_max:.2g} tokens per input feature"
    if nsamples < need_seq:
        why += f", {plugin.name} wants >= {need_seq} sequences"
    return (f"quantkern: calibration {nsamples} x {seqlen} = {tokens} tokens is little for inputs up to {n_max} wide "
            f"({why}); recommended >= {max(want, rec_n * seqlen)} tokens, e.g. nsamples={rec_n} at seqlen={seqlen} "
            f"(the safety net and shrinkage keep the result no worse than RTN meanwhile)")
