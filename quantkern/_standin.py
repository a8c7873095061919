"""TEMPORARY stand-ins for pieces other helpers are building (solver, QuantLinear).

The driver imports these only through quantkern/models/_deps.py, which prefers the real
implementations (quantkern.solve, quantkern.nn.QuantLinear) as soon as
they exist. Delete this file (and the fallbacks in _deps.py) once they are merged.
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import grid
from .formats import gptq as gptq_format
from .spec import QuantSpec


@dataclasses.dataclass
class SolveResult:
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    dequantized: torch.Tensor
    loss: float
    log: dict
    spec: QuantSpec
    method: str

    def to_gptq(self) -> dict:
        return gptq_format.pack(self.codes, self.scales, self.zeros, self.g_idx, self.spec.bits)


def _gptq_loop(W, U, spec, params):
    """Error-feedback loop on W [m, n] (already permuted) with U = chol(H^-1) upper.
    params(i, W1cols) -> (scale[m], zero[m]) for column i, called at group starts."""
    m, n = W.shape
    W = W.clone()
    codes = torch.zeros(m, n)
    Q = torch.zeros(m, n)
    loss = 0.0
    B = 128
    scale = zero = None
    found = []
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            new = params(i1 + i, torch.cat([W1[:, i:], W[:, i2:]], 1))
            if new is not None:
                scale, zero = new
                found.append(new)
            w = W1[:, i]
            d = U1[i, i]
            c = grid.quantize(w, scale, zero, spec.maxq)
            q = grid.dequantize(c, scale, zero)
            codes[:, i1 + i], Q[:, i1 + i] = c, q
            loss += float(((w - q) ** 2).sum() / d**2) / 2
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes, Q, loss, found


def solve(W, H=None, spec: QuantSpec = QuantSpec(), method="gptq", D=None, alpha=0.25, K=1, **_):
    t0 = time.perf_counter()
    W = W.float()
    m, n = W.shape
    if method == "rtn" or H is None:
        codes, scales, zeros, g_idx = grid.rtn(W, spec)
        deq = grid.dequantize_groups(codes, scales, zeros, g_idx)
        return SolveResult(codes, scales, zeros, g_idx, deq, float(((W - deq) ** 2).sum()),
                           {"damp": 0.0, "retries": 0, "fallback": None, "time": time.perf_counter() - t0}, spec, method)
    if method == "ksnrq":
        method = "snrq"
    alpha = 1.0 if alpha == "sample" else alpha
    if method not in ("gptq", "snrq"):
        raise NotImplementedError(f"stand-in solver supports rtn/gptq/snrq, not {method!r}")
    H = H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W = W.clone()
    W[:, dead] = 0
    act = spec.act_order or method == "snrq"
    perm = torch.argsort(torch.diag(H), descending=True) if act else torch.arange(n)
    damp = spec.damp * torch.mean(torch.diag(H))
    Hd = H + damp * torch.eye(n)
    if method == "snrq":
        M = Hd + alpha * D.float() if D is not None else Hd
        W = W @ M @ torch.cholesky_inverse(torch.linalg.cholesky(Hd))  # W_ref = W (H + a D) H^-1
    Wp, Hp = W[:, perm], Hd[perm][:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)
    gl = spec.group_len(n)
    G = spec.num_groups(n)
    if method == "snrq":  # group params fixed up front from the target, in permuted order
        static = [grid.find_params(Wp[:, g * gl:(g + 1) * gl], spec.bits, spec.sym) for g in range(G)]
        params = lambda i, cols: static[i // gl] if i % gl == 0 else None  # noqa: E731
    else:
        params = lambda i, cols: grid.find_params(cols[:, :gl], spec.bits, spec.sym) if i % gl == 0 else None  # noqa: E731
    codes_p, _, loss, found = _gptq_loop(Wp, U, spec, params)
    scales = torch.stack([p[0] for p in found])
    zeros = torch.stack([p[1] for p in found])
    g_idx = torch.empty(n, dtype=torch.int32)
    g_idx[perm] = (torch.arange(n) // gl).to(torch.int32)
    codes = torch.empty(m, n, dtype=torch.uint8)
    codes[:, perm] = codes_p.to(torch.uint8)
    deq = grid.dequantize_groups(codes, scales, zeros, g_idx)
    return SolveResult(codes, scales, zeros, g_idx, deq, loss,
                       {"damp": float(damp), "retries": 0, "fallback": None, "time": time.perf_counter() - t0},
                       spec, method)


class QuantLinear(nn.Module):
    def __init__(self, in_features, out_features, spec: QuantSpec, bias=False):
        super().__init__()
        from .formats import bitstream

        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        G = spec.num_groups(in_features)
        self.register_buffer("qweight", torch.zeros(bitstream.packed_rows(in_features, spec.bits), out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(G, bitstream.packed_rows(out_features, spec.bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        if bias is not None and bias is not False:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None
        self._w = None

    @classmethod
    def from_gptq(cls, tensors, spec, bias=None):
        m, n, _ = gptq_format.check_tensors(tensors, spec.bits)
        q = cls(n, m, spec, bias=bias is not None)
        for k in gptq_format.TENSOR_NAMES:
            getattr(q, k).copy_(tensors[k])
        if bias is not None:
            q.bias.copy_(bias)
        return q

    @classmethod
    def from_linear(cls, linear, result):
        return cls.from_gptq(result.to_gptq(), result.spec, None if linear.bias is None else linear.bias.data)

    def _load_from_state_dict(self, *args, **kwargs):
        self._w = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x):
        if self._w is None:
            t = {k: getattr(self, k) for k in gptq_format.TENSOR_NAMES}
            self._w = gptq_format.dequantize(t, self.spec.bits)
        return F.linear(x, self._w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
