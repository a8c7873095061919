"""Shrinkage of second-moment statistics estimated from few samples (docs/driver.md, "Few calibration tokens").

A Hessian H = E[x x^T] over n features estimated from N samples has rank <= N; when N is not much
larger than n its small eigenvalues are badly underestimated and an error-feedback solver (GPTQ, OAC,
YAQA's LDLQ) pushes rounding error into directions the sample never saw. We shrink towards the
diagonal of H (keep every channel's scale, damp the correlations):

    H_s = (1 - rho) H + rho diag(H),

rho from the Oracle Approximating Shrinkage formula (Chen, Wiesel, Eldar, Hero 2010, for Gaussian
samples; Ledoit & Wolf 2004 is the distribution-free version of the same idea) applied to the
correlation matrix R = diag(H)^-1/2 H diag(H)^-1/2 (Schaefer & Strimmer 2005's "diagonal,
unequal variance" target): with p live features,

    rho = min(1, ((1 - 2/p) tr(R^2) + p^2) / ((N + 1 - 2/p) (tr(R^2) - p))).

rho -> 1 as N / p -> 0 (and rho >= 1 - N / p, our floor for N < p: a rank-deficient H becomes nearly
its diagonal, and every solver then rounds nearly to nearest on its grid), rho ~ (1 + 1/c) / N when tr(R^2) = c p^2 and N >> p (32 x 512 tokens: ~1e-4, noise).
N is the number of (effective) samples: tokens for activation Hessians, Kish's effective sample size
of the gradient weights for Fisher statistics (a few tokens with huge gradients are few samples).
"""
from __future__ import annotations

import torch


def oas_intensity(H: torch.Tensor, nsamples: float) -> float:
    """rho in [0, 1] for H [p, p] estimated from `nsamples` samples (1 when nothing can be estimated)."""
    d = torch.diagonal(H).double()
    live = d > 0
    p = int(live.sum())
    if p < 2 or not nsamples > 0:
        return 1.0 if p >= 2 else 0.0  # a single live feature has no correlations to shrink
    s = d[live].rsqrt()
    R = H.double()[live][:, live] * s[:, None] * s[None, :]
    tr2 = float((R * R).sum())
    excess = tr2 - p  # sum of squared correlations off the diagonal
    if not excess > 1e-12 * p:
        return 0.0  # already diagonal
    rho = ((1.0 - 2.0 / p) * tr2 + p * p) / ((float(nsamples) + 1.0 - 2.0 / p) * excess)
    # OUR floor: N < p samples say nothing about p - N directions, however correlated the sample looks
    # (OAS reads a rank-1 sample of near +-1 correlations as real structure and shrinks it little)
    rho = max(rho, 1.0 - float(nsamples) / p)
    return float(min(1.0, max(0.0, rho)))


def shrink_to_diagonal(H: torch.Tensor, nsamples: float) -> tuple[torch.Tensor, float]:
    """(H_s, rho): H's off-diagonal entries scaled by 1 - rho; [k, p, p] stacks are shrunk one by one
    with the largest rho of the stack (one rule for the blocks of one weight)."""
    if H.dim() == 3:
        rho = max(oas_intensity(h, nsamples) for h in H)
    else:
        rho = oas_intensity(H, nsamples)
    if rho == 0.0:
        return H, 0.0
    Hs = H.float() * (1.0 - rho)
    Hs.diagonal(dim1=-2, dim2=-1).copy_(torch.diagonal(H, dim1=-2, dim2=-1))
    return Hs, rho


def effective_samples(sum_w: float, sum_w2: float) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2 of samples with weights w."""
    return float(sum_w) ** 2 / float(sum_w2) if sum_w2 > 0 else 0.0
