"""Streaming accumulators for H = (2/N) sum_s X_s^T X_s and D = (2/N) sum_s a_s (X_f,s - X_q,s)^T X_q,s.

One sequence x_s [T, n] is one sample (GPTQ convention: N counts sequences, not tokens). Sums are
kept in the accumulator dtype (fp32 default, fp64 optional) and divided by N only when H / D are
read, so batching does not change the result. Activations are never stored.

On CPU the symmetric X^T X goes through the threaded C++ syrk (upper tiles only); elsewhere, or
without the extension, through torch.addmm (the reference). D is not symmetric: one GEMM.

SNRQ-S ("sample" alpha mode): every sequence gets its own a ~ Beta(c, c), alpha_s = min(a, 1 - a),
drawn from one generator seeded once at construction (the authors' code re-seeded per batch by
mistake, which made every alpha equal); D then already includes alpha_s and the solver uses M = H + D.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _ext


def _as_sequences(x: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """[..., T, n] or [T, n] -> [S, T, n] (leading dims are sequences)."""
    if x.dim() < 2 or x.shape[-1] != n:
        raise ValueError(f"{name}: expected [..., T, {n}] activations, got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-2], n)


def syrk_accumulate_(acc: torch.Tensor, x: torch.Tensor, alpha: float, backend: str | None = None) -> None:
    """acc += alpha * x^T x (x [T, n]); the C++ syrk on CPU, torch.addmm otherwise or when asked."""
    use_cpp = backend != "reference" and acc.device.type == "cpu" and _ext.has_cpu() and hasattr(
        torch.ops.quantkern, "syrk_accumulate_"
    )
    if use_cpp:
        torch.ops.quantkern.syrk_accumulate_(acc, x, float(alpha))
    else:
        xs = x.to(acc.dtype)
        acc.addmm_(xs.t(), xs, beta=1.0, alpha=alpha)


def sample_alphas(count: int, rng: np.random.Generator, mixup: float) -> np.ndarray:
    a = rng.beta(mixup, mixup, size=count)
    return np.minimum(a, 1.0 - a)


class HessianAccumulator:
    """H = (2/N) sum over sequences of X^T X, streamed batch by batch."""

    def __init__(self, n: int, device="cpu", dtype=torch.float32, backend: str | None = None):
        if n <= 0:
            raise ValueError(f"HessianAccumulator: n must be > 0, got {n}")
        self.n = n
        self.backend = backend
        self._sum = torch.zeros(n, n, device=device, dtype=dtype)
        self.nsamples = 0
        self.ntokens = 0  # rows of X seen: how well H is estimated (calibration.shrinkage)

    def add_batch(self, x: torch.Tensor) -> None:
        xs = _as_sequences(x.detach(), self.n, "HessianAccumulator.add_batch")
        if xs.shape[0] == 0:
            return
        syrk_accumulate_(self._sum, xs.reshape(-1, self.n).to(self._sum.device), 1.0, self.backend)
        self.nsamples += xs.shape[0]
        self.ntokens += xs.shape[0] * xs.shape[1]

    @property
    def H(self) -> torch.Tensor:
        if self.nsamples == 0:
            return torch.zeros_like(self._sum, dtype=torch.float32)
        return (self._sum * (2.0 / self.nsamples)).float()


class AsymAccumulator(HessianAccumulator):
    """H from the quantized-stream inputs x_q and D = (2/N) sum alpha_s (x_f - x_q)^T x_q.

    alpha_mode "fixed": alpha_s = 1 (the solver applies its alpha); "sample": alpha_s = min(a, 1-a),
    a ~ Beta(mixup, mixup) per sequence, generator seeded once with `seed`.
    """

    def __init__(self, n: int, alpha_mode: str = "fixed", mixup: float = 5.0, seed: int = 0, device="cpu",
                 dtype=torch.float32, backend: str | None = None):
        super().__init__(n, device=device, dtype=dtype, backend=backend)
        if alpha_mode not in ("fixed", "sample"):
            raise ValueError(f"AsymAccumulator: alpha_mode must be 'fixed' or 'sample', got {alpha_mode!r}")
        if not (mixup > 0):
            raise ValueError(f"AsymAccumulator: mixup (Beta parameter) must be > 0, got {mixup}")
        self.alpha_mode = alpha_mode
        self.mixup = float(mixup)
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._dsum = torch.zeros(n, n, device=device, dtype=dtype)
        self.alphas: list[float] = []  # alpha_s of every sequence seen (for logs / checkpoint meta)

    def add_batch(self, x_q: torch.Tensor, x_f: torch.Tensor) -> None:
        if x_q.shape != x_f.shape:
            raise ValueError(f"AsymAccumulator.add_batch: x_q {tuple(x_q.shape)} and x_f {tuple(x_f.shape)} differ")
        xq = _as_sequences(x_q.detach(), self.n, "AsymAccumulator.add_batch").to(self._sum.device, self._sum.dtype)
        xf = _as_sequences(x_f.detach(), self.n, "AsymAccumulator.add_batch").to(self._sum.device, self._sum.dtype)
        S = xq.shape[0]
        if S == 0:
            return
        dx = xf - xq
        if self.alpha_mode == "sample":
            a = sample_alphas(S, self._rng, self.mixup)
            self.alphas.extend(float(v) for v in a)
            dx = dx * torch.as_tensor(a, dtype=dx.dtype, device=dx.device)[:, None, None]
        syrk_accumulate_(self._sum, xq.reshape(-1, self.n), 1.0, self.backend)
        self._dsum.addmm_(dx.reshape(-1, self.n).t(), xq.reshape(-1, self.n))
        self.nsamples += S
        self.ntokens += S * xq.shape[1]

    @property
    def D(self) -> torch.Tensor:
        if self.nsamples == 0:
            return torch.zeros_like(self._dsum, dtype=torch.float32)
        return (self._dsum * (2.0 / self.nsamples)).float()
