"""LDLQ with a Kronecker-factored Hessian (YAQA's rounding, algorithms.md 5.3), on a fixed scalar grid.

Objective: f(Q) = tr(E H_I E^T H_O), E = W - Q, W [m, n], H_I [n, n] (inputs), H_O [m, m] (outputs).

Derivation (our own; the order below is exact, not an approximation):
  Write H_I = A D_I A^T and H_O = B D_O B^T with A, B unit UPPER triangular and D_* diagonal. With
  U = chol(H^-1) (upper, GPTQ's factor) this is A = U^-1 diag(U), D = diag(U)^-2. Then
      f(Q) = sum_{r,c} D_O[r] D_I[c] R_rc^2,   R = B^T E A,
      R_rc = sum_{r'<=r, c'<=c} B[r', r] E[r', c'] A[c', c].
  Each term R_rc depends on E only at entries (r', c') <= (r, c) in both coordinates, and its own
  entry enters with coefficient B_rr A_cc = 1. Deciding the entries in any order that respects this
  partial order and choosing each Q_rc to make |R_rc| smallest gives
      Q_rc = nearest grid point to  W_rc + sum_{(r',c') <= (r,c), != (r,c)} B[r', r] E[r', c'] A[c', c],
  i.e. LDLQ's rule with feedback from the rows above (through B, "L_out") and the columns to the
  left (through A, "L_in") including the cross term. Because every target depends only on entries
  that are already decided in ANY valid order, all valid orders give the same codes. So:
  - H_O = I (B = I) gives GPTQ/LDLQ row by row: with the same grid the codes are GPTQ's.
  - Column-major order = GPTQ over columns where each column is itself rounded by LDLQ over rows
    with H_O (a derivation check used in the tests).
  - The implementation below uses the fast order: square tiles of `tile` x `tile` entries processed
    in anti-diagonal wavefronts of tiles (tiles on one wavefront are independent and batched), and
    inside the tiles anti-diagonal wavefronts of entries. The feedback from finished tiles is kept as
    P = E_done A (updated by one batched GEMM per wavefront) and applied as B^T P per tile.
  Cost: O(min(m, n) (m + n)^2) flops and 2 (m + n) small sequential steps.

YAQA's reference code rounds 16x16 tiles jointly with a trellis codebook and zeroes the in-tile
feedback (block LDL); quantkern's grid is the scalar GPTQ grid, so it keeps the exact per-entry
feedback instead.
"""
from __future__ import annotations

import contextlib

import torch

from .. import grid


@contextlib.contextmanager
def _single_thread():
    """The loop is thousands of tiny ops: one thread avoids OpenMP barriers that cost milliseconds per op
    on a busy machine (measured 20x faster on a shared 2-core CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def unit_upper_factor(U: torch.Tensor) -> torch.Tensor:
    """A unit upper triangular with H = A diag(U)^-2 A^T, from U = chol(H^-1) upper (GPTQ's factor)."""
    d = torch.diagonal(U)
    eye = torch.diag(d)
    return torch.linalg.solve_triangular(U, eye, upper=True)


def objective(E: torch.Tensor, H_in: torch.Tensor, H_out: torch.Tensor) -> float:
    """tr(E H_I E^T H_O) in float64."""
    E = E.double()
    return float(torch.trace(E @ H_in.double() @ E.t() @ H_out.double()))


def _pad_unit(A: torch.Tensor, size: int) -> torch.Tensor:
    """A padded to [size, size] with an identity block: padded entries neither give nor take feedback."""
    k = A.shape[0]
    if k == size:
        return A
    out = torch.eye(size, dtype=A.dtype, device=A.device)
    out[:k, :k] = A
    return out


def kron_ldlq(W, A, B, scale_e, zero_e, maxq: int, tile: int = 32):
    """Round W [m, n] on the per-entry grid (scale_e, zero_e [m, n]) with two-sided feedback.

    A [n, n], B [m, m]: unit upper factors of H_I and H_O (see module doc). Returns float codes [m, n].
    """
    if W.device.type == "cpu":
        with _single_thread():
            return _kron_ldlq(W, A, B, scale_e, zero_e, maxq, tile)
    return _kron_ldlq(W, A, B, scale_e, zero_e, maxq, tile)


def _kron_ldlq(W, A, B, scale_e, zero_e, maxq, tile):
    m, n = W.shape
    b = int(tile)
    Mb, Nb = -(-m // b), -(-n // b)
    mp, np_ = Mb * b, Nb * b
    dev = W.device
    Wp = torch.zeros(mp, np_, device=dev)
    Wp[:m, :n] = W
    Sp = torch.ones(mp, np_, device=dev)
    Sp[:m, :n] = scale_e
    Zp = torch.zeros(mp, np_, device=dev)
    Zp[:m, :n] = zero_e
    real = torch.zeros(mp, np_, dtype=torch.bool, device=dev)
    real[:m, :n] = True
    Ap = _pad_unit(A.float(), np_)
    Bp = _pad_unit(B.float(), mp)

    codes = torch.zeros(mp, np_, device=dev)
    E = torch.zeros(mp, np_, device=dev)
    P = torch.zeros(mp, np_, device=dev)  # E_done @ A, rows grouped by row tile
    # entry wavefronts inside one tile
    diag_idx = []
    for s in range(2 * b - 1):
        ii = torch.arange(max(0, s - b + 1), min(s, b - 1) + 1, device=dev)
        diag_idx.append((ii, s - ii))
    Bt = Bp.t().contiguous()

    def tiles(x, R, C):  # [K, b, b] gather of tiles (R[k], C[k])
        return x.view(Mb, b, Nb, b)[R, :, C, :]

    for t in range(Mb + Nb - 1):
        R = torch.arange(max(0, t - Nb + 1), min(t, Mb - 1) + 1, device=dev)
        C = t - R
        K = R.numel()
        cols = (C[:, None] * b + torch.arange(b, device=dev))  # [K, b]
        # feedback from finished tiles: (B^T P)[tile rows, tile cols]
        Bcol = Bt.view(Mb, b, mp)[R]  # [K, b, mp] = B[:, rows]^T
        Pcol = P[:, cols.reshape(-1)].view(mp, K, b).permute(1, 0, 2)  # [K, mp, b]
        T0 = tiles(Wp, R, C) + torch.bmm(Bcol, Pcol)
        Sk, Zk = tiles(Sp, R, C), tiles(Zp, R, C)
        Wk, realk = tiles(Wp, R, C), tiles(real, R, C)
        Bkk = Bp.view(Mb, b, Mb, b)[R, :, R, :]  # [K, b, b] B[rows, rows]
        Akk = Ap.view(Nb, b, Nb, b)[C, :, C, :]
        BkkT = Bkk.transpose(1, 2)
        Ek = torch.zeros(K, b, b, device=dev)
        Qk = torch.zeros(K, b, b, device=dev)
        for ii, jj in diag_idx:
            corr = torch.bmm(torch.bmm(BkkT[:, ii, :], Ek), Akk[:, :, jj])  # [K, d, d]
            target = T0[:, ii, jj] + torch.diagonal(corr, dim1=1, dim2=2)
            s, z = Sk[:, ii, jj], Zk[:, ii, jj]
            q = grid.quantize(target, s, z, maxq)
            Qk[:, ii, jj] = q
            e = Wk[:, ii, jj] - grid.dequantize(q, s, z)
            Ek[:, ii, jj] = torch.where(realk[:, ii, jj], e, torch.zeros_like(e))
        # write back and fold this wavefront's errors into P
        Rv, Cv = R[:, None, None], C[:, None, None]
        bi = torch.arange(b, device=dev)
        rr = (Rv * b + bi[None, :, None]).expand(K, b, b)
        cc = (Cv * b + bi[None, None, :]).expand(K, b, b)
        codes[rr, cc] = Qk
        E[rr, cc] = Ek
        Arow = Ap.view(Nb, b, np_)[C]  # [K, b, np]
        P.view(Mb, b, np_)[R] += torch.bmm(Ek, Arow)
    return codes[:m, :n]
