"""Driver plug-ins for the methods beyond the layer-wise proxy: OAC, YAQA (need model-loss gradients)
and AdaRound (needs only H). Registered with the layer-by-layer driver under "oac", "yaqa", "adaround".

OAC / YAQA: `before_layers` runs once before the layer loop on the still full-precision model (cross-layer
independence, as both papers do): a forward + backward of the summed next-token cross-entropy per
calibration sequence, with hooks on every linear of the blocks to be quantized
(quantkern.calibration.fisher). Then, per linear:
    oac:  quantkern.solve(W, H_OAC, method="oac")                      (H_OAC = E_s[G_s^T G_s])
    yaqa: quantkern.solve(W, H_I, method="yaqa", H_out=H_O)           (sketch B)
          h_in="act" uses the driver's activation Hessian of the partially quantized model as H_I
          instead (a hybrid that keeps GPTQ's sequential input statistics; not the paper's).
Options: labels ("data": calibration next tokens, OAC's default; "sample": targets drawn from the
model, YAQA's default), grad_nsamples (sequences used for gradients; default all), grad_batch,
grad_stats_path (a file: loaded if it exists and matches labels/samples, else computed and saved
there; the statistics do not depend on bits or group size, so 4/3/2-bit runs can share them;
grad_kind="both" collects OAC's and YAQA's statistics in one pass so both methods can share a file).
OUR additions beyond the papers (defaults reproduce the paper recipes above):
    fisher="token"   per-token Fisher statistics instead of per-sequence ones (calibration.fisher).
    row_groups=k     (oac, fisher="token") one Fisher per block of k contiguous output-row blocks
                     (OAC's per-row Hessians aggregated within blocks only; solvers/oac.py).
    h_mix=w          input-side Hessian (1 - w) H_act + w F (trace-normalised; solvers.hessian.blend),
                     H_act the driver's activation Hessian of the partially quantized stream. Default
                     1 (pure Fisher, the papers); h_in="act" is the old spelling of h_mix=0 for yaqa.
    core="snrq"      (oac) SNRQ's regularised target + successive rounding instead of GPTQ's core;
    grid_from="snrq" (yaqa) SNRQ's target and grid under the two-sided rounding. Both use the
                     driver's fp + quantized activation streams (D) with alpha (default 0.25).
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from ..calibration.fisher import collect_grad_stats
from ..calibration.stats import AsymAccumulator, HessianAccumulator
from ..solvers import solve
from .arch import find_blocks
from ..methods import OAC, YAQA, AdaRound
from .driver import Plugin, register_plugin


class GradientPlugin(Plugin):
    """OAC / YAQA: gradient statistics once before the layer loop, then one solve per linear (options: the
    config's, quantkern.methods.OAC / YAQA)."""

    def __init__(self, config, seed=0):
        super().__init__(config, seed)
        c = config
        self.labels, self.grad_nsamples, self.grad_batch = c.labels, c.grad_nsamples, c.grad_batch
        self.h_mix, self.fisher, self.grad_kind = c.h_mix, c.fisher, c.grad_kind
        self.row_groups = getattr(c, "row_groups", 1)
        self.grad_stats_path = c.grad_stats_path
        self._stats: dict[int, object] = {}
        self.prepare_s = 0.0
        self.needs_fp_inputs = c.uses_snrq() and c.h_mix < 1.0  # D: the mismatch of the fp and quantized streams
        # the sequence Fisher sums one outer product per sequence: fewer than ~32 is a noisy estimate
        self.min_sequences = 32 if c.fisher == "sequence" and c.h_mix > 0 else 0

    def before_layers(self, model: nn.Module, samples: torch.Tensor) -> None:
        t0 = time.perf_counter()
        block_path, blocks = find_blocks(model)
        names, ptrs = [], []
        for bi, block in enumerate(blocks):
            for nm, mod in block.named_modules():
                if isinstance(mod, nn.Linear):
                    names.append(f"{block_path}.{bi}.{nm}")
                    ptrs.append(mod.weight.data_ptr())
        use = samples if self.grad_nsamples is None else samples[: self.grad_nsamples]
        key = {"kind": self.grad_kind, "labels": self.labels, "seed": self.seed, "names": names,
               "samples_sum": int(use.sum()), "samples_shape": list(use.shape)}
        if self.row_groups > 1:
            key["row_groups"] = self.row_groups
        stats = self._load(key)
        if stats is None:
            stats = collect_grad_stats(model, use, names, kind=self.grad_kind, labels=self.labels,
                                       batch_size=self.grad_batch, seed=self.seed, progress=self.progress,
                                       row_groups=self.row_groups)
            if self.grad_stats_path:
                torch.save({"key": key, "stats": stats}, self.grad_stats_path)
        self._stats = {p: stats[nm] for p, nm in zip(ptrs, names)}
        self.prepare_s = time.perf_counter() - t0

    def _load(self, key):
        import os

        if not (self.grad_stats_path and os.path.exists(self.grad_stats_path)):
            return None
        blob = torch.load(self.grad_stats_path, weights_only=False)
        old = dict(blob.get("key", {}))
        usable = old.get("kind") in (key["kind"], "both") and {**old, "kind": key["kind"]} == key
        st = blob.get("stats", {})
        if usable and self.fisher == "token" and any(getattr(v, "sum_tok_in", None) is None for v in st.values()):
            usable = False
        if not usable:
            raise ValueError(f"{self.name}: {self.grad_stats_path} holds statistics for other settings "
                             "(labels, kind, seed, calibration samples, modules or no per-token sums); "
                             "delete it or pass another path")
        return st

    def collector(self, n: int):
        if self.needs_fp_inputs:
            return AsymAccumulator(n)
        return HessianAccumulator(n) if self.h_mix < 1.0 else None

    def add(self, collector, x_q, x_f):
        if isinstance(collector, AsymAccumulator):
            collector.add_batch(x_q, x_f)
        elif collector is not None:
            collector.add_batch(x_q)

    def stats_for(self, name, weight):
        st = self._stats.get(weight.data_ptr())
        if st is None:
            raise RuntimeError(f"{self.name}: no gradient statistics for {name!r} (before_layers() not run, or the driver "
                               "passed a copy of the weight: gradient methods need an fp32 model)")
        return st

    def solve(self, name, weight, collector):
        st = self.stats_for(name, weight)
        n_eff = st.n_eff  # Kish's effective token count of the gradients (calibration.shrinkage)
        F = st.input_side(self.fisher)
        if self.h_mix > 0.0:
            F = self.shrunk("F", F, n_eff)
        kw = {}
        if self.needs_fp_inputs:
            kw["D"] = collector.D
        if self.name == "oac":
            if self.h_mix == 1.0:
                return solve(weight, F, self.config, **kw)
            return solve(weight, self.hessian(collector), self.config, H_oac=F, h_mix=self.h_mix, **kw)
        H_out = self.shrunk("H_out", st.output_side(self.fisher), n_eff)
        if self.h_mix == 1.0:
            return solve(weight, F, self.config, H_out=H_out, **kw)
        if self.h_mix > 0.0:
            kw.update(H_fisher=F, h_mix=self.h_mix)
        return solve(weight, self.hessian(collector), self.config, H_out=H_out, **kw)

    def net_alpha(self, res):
        # the snrq core / grid aims at the fp stream with (1 - h_mix) alpha (oac.py, yaqa.py)
        return super().net_alpha(res) * (1.0 - self.h_mix) if self.needs_fp_inputs else 0.0

    def meta(self):
        return {**super().meta(), "labels": self.labels, "grad_nsamples": self.grad_nsamples, "h_mix": self.h_mix,
                "fisher": self.fisher, "row_groups": self.row_groups, "grad_stats_s": round(self.prepare_s, 2)}


register_plugin(OAC, GradientPlugin)
register_plugin(YAQA, GradientPlugin)
register_plugin(AdaRound, Plugin)  # layer-wise: H from the driver's activations, learned rounding
