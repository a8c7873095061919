"""Random least-squares problems for the solver tests (shared helpers, not a test module)."""
import torch


def correlated(m, n, seed, T=None, noise=0.3, rank_drop=0):
    """W [m, n], H = 2 X^T X / T and D = 2 dX^T X / T from correlated inputs (X [T, n])."""
    g = torch.Generator().manual_seed(seed)
    T = T or max(4 * n, 64)
    mix = torch.randn(n, n, generator=g) * 0.4 + torch.eye(n)
    X = torch.randn(T, n, generator=g) @ mix
    if rank_drop:
        X[:, :rank_drop] = 0  # dead columns
    Xf = X + noise * torch.randn(T, n, generator=g)
    W = torch.randn(m, n, generator=g)
    return W, 2 * X.t() @ X / T, 2 * (Xf - X).t() @ X / T


def factor(H, damp=0.01):
    n = H.shape[0]
    Hd = H + damp * H.diagonal().mean() * torch.eye(n)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    return Hd, U
