"""The core solver ops and their pure-torch references (the contract is csrc/common/solver.h).

Registry op names (backends register under these; every backend must match the reference):
  "gptq_block_solve": (W, U, P, gidx, scales, zeros, bits, sym, dynamic_groups, blocksize=128)
                      -> (codes uint8 [m,n], scales [G,m], zeros [G,m], loss float64 [m])
  "ksnrq_solve":      (W, U, gidx, scales, zeros, bits, K, blocksize=128)
                      -> (codes uint8 [m,n], loss float64 [m])
Everything is in processing order (already permuted); see solver.h for the exact algorithm,
the dynamic group-parameter rule, the GPTAQ P-term and tie handling.
"""
from __future__ import annotations

import torch

from .. import grid, kernels
from . import registry

register = registry.register


def group_runs(gidx: torch.Tensor) -> list[tuple[int, int, int]]:
    """(group, start, end) of each run of equal gidx in processing order."""
    g = gidx.tolist()
    runs, s = [], 0
    for i in range(1, len(g) + 1):
        if i == len(g) or g[i] != g[i - 1]:
            runs.append((g[s], s, i))
            s = i
    return runs


def check_solve_args(op, W, U, P, gidx, scales, zeros, bits, blocksize, dynamic_groups=False):
    """Validation shared by every backend wrapper (clear errors, no silent garbage)."""
    if W.dim() != 2 or W.dtype != torch.float32:
        raise ValueError(f"{op}: W must be 2-D fp32 [m, n], got {tuple(W.shape)} {W.dtype}")
    m, n = W.shape
    if U.shape != (n, n) or U.dtype != torch.float32:
        raise ValueError(f"{op}: U must be fp32 [{n}, {n}], got {tuple(U.shape)} {U.dtype}")
    if P is not None and (P.shape != (n, n) or P.dtype != torch.float32):
        raise ValueError(f"{op}: P must be fp32 [{n}, {n}] or None, got {tuple(P.shape)} {P.dtype}")
    if gidx.shape != (n,):
        raise ValueError(f"{op}: gidx must be [{n}], got {tuple(gidx.shape)}")
    if scales.dim() != 2 or scales.shape[1] != m or zeros.shape != scales.shape:
        raise ValueError(f"{op}: scales/zeros must be [G, {m}], got {tuple(scales.shape)} / {tuple(zeros.shape)}")
    G = scales.shape[0]
    if n and (int(gidx.min()) < 0 or int(gidx.max()) >= G):
        raise ValueError(f"{op}: gidx values must lie in [0, {G})")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"{op}: bits must be 2, 3, 4 or 8, got {bits}")
    if blocksize <= 0:
        raise ValueError(f"{op}: blocksize must be > 0, got {blocksize}")
    if dynamic_groups:
        seen = [r[0] for r in group_runs(gidx)]
        if len(seen) != len(set(seen)):
            raise ValueError(f"{op}: dynamic group params need every group to be one contiguous run of gidx")


@register("gptq_block_solve", "reference")
def gptq_block_solve_reference(W, U, P, gidx, scales, zeros, bits, sym, dynamic_groups, blocksize=128):
    m, n = W.shape
    maxq = (1 << bits) - 1
    Wc = W.clone()
    scales = scales.clone()
    zeros = zeros.clone()
    codes = torch.empty(m, n, dtype=torch.uint8, device=W.device)
    loss = torch.zeros(m, dtype=torch.float64, device=W.device)
    run_end = {}
    for _, s, e in group_runs(gidx):
        run_end[s] = e
    gl = gidx.tolist()
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = Wc[:, i1:i2].clone()
        Err = torch.zeros(m, i2 - i1, device=W.device)
        Qb = torch.zeros(m, i2 - i1, device=W.device)
        for i in range(i1, i2):
            g = gl[i]
            if dynamic_groups and i in run_end:  # block-start values Wc, see solver.h
                scales[g], zeros[g] = grid.find_params(Wc[:, i : run_end[i]], bits, sym)
            s, z = scales[g], zeros[g]
            w = W1[:, i - i1].clone()
            c = grid.quantize(w, s, z, maxq)
            q = grid.dequantize(c, s, z)
            err = (w - q) / U[i, i]
            loss += err.double() * err.double()
            if i + 1 < i2:
                upd = err[:, None] * U[i, i + 1 : i2][None, :]
                if P is not None:
                    upd = upd - w[:, None] * P[i, i + 1 : i2][None, :]
                W1[:, i - i1 + 1 :] -= upd
            Err[:, i - i1] = err
            Qb[:, i - i1] = q
            codes[:, i] = c.to(torch.uint8)
        if i2 < n:
            Wc[:, i2:] -= Err @ U[i1:i2, i2:]
            if P is not None:
                Wc[:, i2:] += Qb @ P[i1:i2, i2:]
    return codes, scales, zeros, loss


@register("ksnrq_solve", "reference")
def ksnrq_solve_reference(W, U, gidx, scales, zeros, bits, K, blocksize=128):
    """K-best beam search per row (readable and slow: copies whole beam states every column)."""
    m, n = W.shape
    dev = W.device
    maxq = (1 << bits) - 1
    L = maxq + 1
    levels = torch.arange(L, device=dev, dtype=torch.float32)
    Wk = W[:, None, :].repeat(1, K, 1).contiguous()  # [m, K, n] working copy per beam
    S = torch.full((m, K), float("inf"), dtype=torch.float64, device=dev)
    S[:, 0] = 0
    C = torch.zeros(m, K, n, dtype=torch.uint8, device=dev)
    ar = torch.arange(m, device=dev)[:, None]
    gl = gidx.tolist()
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        Err = torch.zeros(m, K, i2 - i1, device=dev)
        for i in range(i1, i2):
            g = gl[i]
            s, z = scales[g][:, None], zeros[g][:, None]  # [m, 1]
            w = Wk[:, :, i]  # [m, K]
            c0 = grid.quantize(w, s, z, maxq)  # [m, K]
            # level order per beam: c0 first, then the others ascending (the tie rule)
            k = levels[1:]  # rank k >= 1 is the (k-1)-th level other than c0, ascending
            others = torch.where(k - 1 < c0[..., None], k - 1, k)
            order = torch.cat([c0[..., None], others], dim=2)  # [m, K, L]
            e = (w[..., None] - grid.dequantize(order, s[..., None], z[..., None])) / U[i, i]
            inc = e.double() * e.double()
            inc[..., 1:] = torch.maximum(inc[..., 1:], inc[..., :1])
            cand = (S[..., None] + inc).reshape(m, K * L)
            # stable sort: equal scores keep (parent, rank) order
            sc, idx = torch.sort(cand, dim=1, stable=True)
            idx = idx[:, :K]
            S = sc[:, :K].contiguous()
            parent, rank = idx // L, idx % L
            code = order.reshape(m, K * L).gather(1, idx)
            err = e.reshape(m, K * L).gather(1, idx)
            Wk = Wk[ar, parent]
            C = C[ar, parent]
            Err = Err[ar, parent]
            C[:, :, i] = code.to(torch.uint8)
            Err[:, :, i - i1] = err
            if i + 1 < i2:
                Wk[:, :, i + 1 : i2] -= err[..., None] * U[i, i + 1 : i2]
        if i2 < n:
            Wk[:, :, i2:] -= (Err.reshape(m * K, -1) @ U[i1:i2, i2:]).view(m, K, -1)
    best = torch.argmin(S, dim=1)  # first minimum on ties
    return C[ar[:, 0], best], S[ar[:, 0], best]


@register("gptq_block_solve", "cpu")
def gptq_block_solve_cpu(W, U, P, gidx, scales, zeros, bits, sym, dynamic_groups, blocksize=128):
    return torch.ops.quantkern.gptq_block_solve(
        W.contiguous(), U.contiguous(), None if P is None else P.contiguous(), gidx.to(torch.int32).contiguous(),
        scales.contiguous(), zeros.contiguous(), bits, sym, dynamic_groups, blocksize,
        kernels.cpu_solver("gptq_block_solve"),
    )


@register("ksnrq_solve", "cpu")
def ksnrq_solve_cpu(W, U, gidx, scales, zeros, bits, K, blocksize=128):
    return torch.ops.quantkern.ksnrq_solve(
        W.contiguous(), U.contiguous(), gidx.to(torch.int32).contiguous(), scales.contiguous(),
        zeros.contiguous(), bits, K, blocksize, kernels.cpu_solver("ksnrq_solve"),
    )


def gptq_block_solve(W, U, P, gidx, scales, zeros, bits, sym, dynamic_groups, blocksize=128, backend=None):
    """Dispatching entry point (validates, then runs the chosen backend)."""
    check_solve_args("gptq_block_solve", W, U, P, gidx, scales, zeros, bits, blocksize, dynamic_groups)
    fn = registry.implementation("gptq_block_solve", backend) if backend else None
    args = (W, U, P, gidx, scales, zeros, bits, sym, dynamic_groups, blocksize)
    return fn(*args) if fn else registry.call("gptq_block_solve", W.device, *args)


def ksnrq_solve(W, U, gidx, scales, zeros, bits, K, blocksize=128, backend=None):
    check_solve_args("ksnrq_solve", W, U, None, gidx, scales, zeros, bits, blocksize)
    if K < 1:
        raise ValueError(f"ksnrq_solve: K must be >= 1, got {K}")
    fn = registry.implementation("ksnrq_solve", backend) if backend else None
    args = (W, U, gidx, scales, zeros, bits, K, blocksize)
    return fn(*args) if fn else registry.call("ksnrq_solve", W.device, *args)
