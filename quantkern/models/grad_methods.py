"""Driver plug-ins for the methods beyond the layer-wise proxy: OAC, YAQA (need model-loss gradients)
and AdaRound (needs only H). Registered with the layer-by-layer driver under "oac", "yaqa", "adaround".

OAC / YAQA: `prepare` runs once before the layer loop on the still full-precision model (cross-layer
independence, as both papers do): a forward + backward of the summed next-token cross-entropy per
calibration sequence, with hooks on every linear of the blocks to be quantized
(quantkern.calibration.fisher). Then, per linear:
    oac:  quantkern.solve(W, H_OAC, method="oac")                      (H_OAC = E_s[G_s^T G_s])
    yaqa: quantkern.solve(W, H_I, method="yaqa", H_out=H_O)           (sketch B)
          h_in="act" uses the driver's activation Hessian of the partially quantized model as H_I
          instead (a hybrid that keeps GPTQ's sequential input statistics; not the paper's).
Options: labels ("data": calibration next tokens, OAC's default; "sample": targets drawn from the
model, YAQA's default), grad_nsamples (sequences used for gradients; default all), grad_batch,
grad_stats_path (a file: loaded if it exists and matches labels/samples/kind, else computed and
saved there; the statistics do not depend on bits or group size, so 4/3/2-bit runs can share them).
Statistics are matched to the driver's `solve` calls by the weight's storage (the driver hands the
fp32 weight itself); a model in another dtype gets a clear error.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from ..calibration.fisher import collect_grad_stats
from ..calibration.stats import HessianAccumulator
from ..solvers import solve
from .arch import find_blocks
from .driver import Method, register_method


class GradientMethod(Method):
    kind = "oac"
    default_labels = "data"

    def __init__(self, name, spec, seed=0, labels=None, grad_nsamples=None, grad_batch=1, h_in="fisher",
                 grad_stats_path=None, **kwargs):
        if h_in not in ("fisher", "act"):
            raise ValueError(f"h_in must be 'fisher' or 'act', got {h_in!r}")
        if name == "oac" and h_in != "fisher":
            raise ValueError("oac uses the output-adaptive Hessian; h_in='act' would be plain GPTQ")
        super().__init__(name, spec, seed, **kwargs)
        self.labels = labels or self.default_labels
        self.grad_nsamples, self.grad_batch, self.h_in = grad_nsamples, grad_batch, h_in
        self.grad_stats_path = grad_stats_path
        self._stats: dict[int, object] = {}
        self.prepare_s = 0.0

    def prepare(self, model: nn.Module, samples: torch.Tensor) -> None:
        t0 = time.perf_counter()
        block_path, blocks = find_blocks(model)
        names, ptrs = [], []
        for bi, block in enumerate(blocks):
            for nm, mod in block.named_modules():
                if isinstance(mod, nn.Linear):
                    names.append(f"{block_path}.{bi}.{nm}")
                    ptrs.append(mod.weight.data_ptr())
        use = samples if self.grad_nsamples is None else samples[: self.grad_nsamples]
        key = {"kind": self.kind, "labels": self.labels, "seed": self.seed, "names": names,
               "samples_sum": int(use.sum()), "samples_shape": list(use.shape)}
        stats = self._load(key)
        if stats is None:
            stats = collect_grad_stats(model, use, names, kind=self.kind, labels=self.labels,
                                       batch_size=self.grad_batch, seed=self.seed, progress=True)
            if self.grad_stats_path:
                torch.save({"key": key, "stats": stats}, self.grad_stats_path)
        self._stats = {p: stats[nm] for p, nm in zip(ptrs, names)}
        self.prepare_s = time.perf_counter() - t0

    def _load(self, key):
        import os

        if not (self.grad_stats_path and os.path.exists(self.grad_stats_path)):
            return None
        blob = torch.load(self.grad_stats_path, weights_only=False)
        if blob.get("key") != key:
            raise ValueError(f"{self.name}: {self.grad_stats_path} holds statistics for other settings "
                             "(labels, kind, seed, calibration samples or modules differ); delete it or pass another path")
        return blob["stats"]

    def collector(self, n: int):
        return HessianAccumulator(n) if self.h_in == "act" else None

    def add(self, collector, x_q, x_f):
        if collector is not None:
            collector.add_batch(x_q)

    def stats_for(self, name, weight):
        st = self._stats.get(weight.data_ptr())
        if st is None:
            raise RuntimeError(f"{self.name}: no gradient statistics for {name!r} (prepare() not run, or the driver "
                               "passed a copy of the weight: gradient methods need an fp32 model)")
        return st

    def solve(self, name, weight, collector):
        st = self.stats_for(name, weight)
        if self.name == "oac":
            return solve(weight, st.H_in, self.spec, method="oac", **self.kwargs)
        H = collector.H if self.h_in == "act" else st.H_in
        return solve(weight, H, self.spec, method="yaqa", H_out=st.H_out, **self.kwargs)

    def meta(self):
        return {**super().meta(), "labels": self.labels, "grad_nsamples": self.grad_nsamples, "h_in": self.h_in,
                "grad_stats_s": round(self.prepare_s, 2)}


class OAC(GradientMethod):
    kind = "oac"
    default_labels = "data"


class YAQA(GradientMethod):
    kind = "yaqa"
    default_labels = "sample"


class AdaRound(Method):
    """Layer-wise: H from the driver's activations, learned rounding (quantkern.solve method="adaround")."""


register_method("oac", OAC)
register_method("yaqa", YAQA)
register_method("adaround", AdaRound)
