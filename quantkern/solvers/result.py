"""SolveResult: what every solver method returns."""
from __future__ import annotations

import dataclasses

import torch

from ..spec import QuantSpec


@dataclasses.dataclass
class SolveResult:
    """codes uint8 [m, n] (original column order), scales/zeros fp32 [G, m] (zeros integer-valued),
    g_idx int32 [n] (group of each original column, GPTQ convention), dequantized fp32 [m, n].

    loss: the method's objective in GPTQ's convention, sum over rows and columns of
          (w_hat_i - q_i)^2 / U_ii^2 as accumulated by the core loop (= tr((T - Q) H_d (T - Q)^T) for
          target T = W (GPTQ, LDLQ) or W_ref (SNRQ, K-SNRQ), H_d the damped Hessian); RTN reports
          the same proxy for its codes. Use quantkern.solvers.proxy_loss for a method-independent one.
    log:  damp used, retries, min eigenvalue estimate, fallback (None / "diag" / "rtn"), timings, ...
    perm: processing order (act-order) or None.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    dequantized: torch.Tensor
    loss: float
    log: dict
    spec: QuantSpec
    method: str
    params: dict = dataclasses.field(default_factory=dict)
    perm: torch.Tensor | None = None

    def to_gptq(self) -> dict:
        from ..formats import gptq

        return gptq.pack(self.codes, self.scales, self.zeros, self.g_idx, self.spec.bits)

    def meta(self) -> dict:
        """JSON-able summary for checkpoint metadata."""
        keep = {k: v for k, v in self.log.items() if isinstance(v, (int, float, str, bool, type(None)))}
        return {"method": self.method, "params": dict(self.params), "loss": self.loss, "log": keep}
