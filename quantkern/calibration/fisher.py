"""Output-gradient statistics for OAC and YAQA (algorithms.md 5.2 and 6).

For a linear y = W x inside a model with loss l, and a calibration sequence s with tokens t:
    x_{s,t} [n]  the linear's input,   g_{s,t} = dl_s/dy_{s,t} [m]  the loss gradient at its output,
    G_s = dl_s/dW = sum_t g_{s,t} x_{s,t}^T   [m, n]  the per-sequence weight gradient.
Statistics (averaged over sequences, fp32 or fp64 sums):
    "oac":  H_OAC = E_s[G_s^T G_s]  [n, n]   (OAC's row-wise aggregated Fisher: sum over rows i of
            E_s[G_s[i]^T G_s[i]], our INFERRED reconstruction of arXiv 2405.15025, see the notes)
    "yaqa": H_I = E_s[G_s^T G_s] [n, n] and H_O = E_s[G_s G_s^T] [m, m]  (YAQA sketch B: one step of
            the nearest-Kronecker power iteration on the per-sequence Fisher)
Note H_OAC and YAQA's H_I are the same quantity; kind="both" collects both sides once.
Token-level variants (tokens treated as independent samples, collected in the same pass; less noisy
than sequence sums when there are few calibration sequences):
    F_tok_in  = E_s[sum_t |g_{s,t}|^2 x_{s,t} x_{s,t}^T]  [n, n]   (row-aggregated per-token Fisher)
    F_tok_out = E_s[sum_t g_{s,t} g_{s,t}^T]              [m, m]   (YAQA sketch A's H_O, first step)
With row_groups = k > 1, F_tok_in is [k, n, n]: one per contiguous block of output rows (row_chunks),
F_tok_in[j] = E_s[sum_t |g_{s,t}[rows j]|^2 x x^T], i.e. OAC's per-row Hessians (cross-row
independence) aggregated only within each block instead of over all rows (summing the k blocks gives
the k = 1 statistic).

The loss l_s is the sequence's summed next-token cross-entropy. labels="data" uses the calibration
text's next tokens (the empirical Fisher, what OAC calibrates on); labels="sample" draws the targets
from the model's own softmax (the true Fisher of KL(model || quantized), what YAQA uses).

Memory: inputs are only referenced while autograd keeps them anyway; each backward hook forms the
batch's G_s ([B, m, n]), folds it into the [n, n] / [m, m] sums and drops it. No per-token gradient
is stored. Model parameters get no .grad (requires_grad is switched off during collection, the
gradient flows from the input embeddings).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from .shrinkage import effective_samples

KINDS = ("oac", "yaqa", "both")


@dataclasses.dataclass
class GradStats:
    """Per-linear output-gradient statistics (sums; the properties give the averages)."""

    n: int
    m: int
    kind: str
    dtype: torch.dtype = torch.float32
    nsamples: int = 0
    sum_in: torch.Tensor | None = None  # sum_s G_s^T G_s [n, n]
    sum_out: torch.Tensor | None = None  # sum_s G_s G_s^T [m, m]
    sum_tok_in: torch.Tensor | None = None  # sum_{s,t} |g_st|^2 x_st x_st^T [n, n]
    sum_tok_out: torch.Tensor | None = None  # sum_{s,t} g_st g_st^T [m, m]
    row_groups: int = 1
    sum_w: float = 0.0  # sum_t w_t, w_t = |g_t|^2 |x_t|^2 (a token's weight in the Fisher's trace)
    sum_w2: float = 0.0  # sum_t w_t^2: with sum_w, Kish's effective token count (n_eff)

    def __post_init__(self):
        if not (isinstance(self.row_groups, int) and 1 <= self.row_groups <= self.m):
            raise ValueError(f"row_groups must be an integer in [1, m={self.m}], got {self.row_groups!r}")
        self.sum_in = torch.zeros(self.n, self.n, dtype=self.dtype)
        k = self.row_groups
        self.sum_tok_in = torch.zeros(self.n, self.n, dtype=self.dtype) if k == 1 else \
            torch.zeros(k, self.n, self.n, dtype=self.dtype)
        if self.kind in ("yaqa", "both"):
            self.sum_out = torch.zeros(self.m, self.m, dtype=self.dtype)
            self.sum_tok_out = torch.zeros(self.m, self.m, dtype=self.dtype)

    def add(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """x [B, T, n] inputs, g [B, T, m] output gradients of B sequences."""
        if x.shape[:-1] != g.shape[:-1] or x.shape[-1] != self.n or g.shape[-1] != self.m:
            raise ValueError(f"GradStats.add: x {tuple(x.shape)} and g {tuple(g.shape)} do not match a "
                             f"linear [{self.m}, {self.n}]")
        x = x.reshape(-1, x.shape[-2], self.n).to(self.dtype)
        g = g.reshape(-1, g.shape[-2], self.m).to(self.dtype)
        G = torch.bmm(g.transpose(1, 2), x)  # [B, m, n] per-sequence weight gradients
        Gf = G.reshape(-1, self.n)  # rows of every G_s stacked: sum_s G_s^T G_s = Gf^T Gf
        self.sum_in.addmm_(Gf.t(), Gf)
        if self.sum_out is not None:
            self.sum_out.add_(torch.bmm(G, G.transpose(1, 2)).sum(0))
        gt = g.reshape(-1, self.m)
        xt = x.reshape(-1, self.n)
        if self.row_groups == 1:
            xw = xt * gt.norm(dim=1, keepdim=True)  # sqrt(|g_t|^2) x_t
            self.sum_tok_in.addmm_(xw.t(), xw)
        else:
            for j, (r0, r1) in enumerate(row_chunks(self.m, self.row_groups)):
                xw = xt * gt[:, r0:r1].norm(dim=1, keepdim=True)
                self.sum_tok_in[j].addmm_(xw.t(), xw)
        if self.sum_tok_out is not None:
            self.sum_tok_out.addmm_(gt.t(), gt)
        w = gt.double().pow(2).sum(1) * xt.double().pow(2).sum(1)
        self.sum_w += float(w.sum())
        self.sum_w2 += float(w.pow(2).sum())
        self.nsamples += G.shape[0]

    @property
    def n_eff(self) -> float | None:
        """Effective number of tokens behind the Fisher (Kish): a few tokens with huge gradients count as
        few samples. None for statistics saved before it was tracked."""
        if not getattr(self, "sum_w2", 0.0):
            return None
        return effective_samples(self.sum_w, self.sum_w2)

    def _avg(self, t):
        if self.nsamples == 0:
            raise RuntimeError("GradStats: no samples were added")
        return (t / self.nsamples).float()

    @property
    def H_in(self) -> torch.Tensor:
        return self._avg(self.sum_in)

    @property
    def H_out(self) -> torch.Tensor:
        if self.sum_out is None:
            raise RuntimeError(f"GradStats(kind={self.kind!r}) has no output-side statistics")
        return self._avg(self.sum_out)

    @property
    def F_tok_in(self) -> torch.Tensor:
        return self._avg(self.sum_tok_in)

    @property
    def F_tok_out(self) -> torch.Tensor:
        if self.sum_tok_out is None:
            raise RuntimeError(f"GradStats(kind={self.kind!r}) has no output-side statistics")
        return self._avg(self.sum_tok_out)

    def input_side(self, fisher: str = "sequence") -> torch.Tensor:
        """[n, n] input-side Fisher: "sequence" (H_in, the papers' per-sequence G_s) or "token"."""
        return {"sequence": lambda: self.H_in, "token": lambda: self.F_tok_in}[_check_fisher(fisher)]()

    def output_side(self, fisher: str = "sequence") -> torch.Tensor:
        """[m, m] output-side Fisher: "sequence" (H_out, YAQA sketch B) or "token"."""
        return {"sequence": lambda: self.H_out, "token": lambda: self.F_tok_out}[_check_fisher(fisher)]()


FISHER_KINDS = ("sequence", "token")


def row_chunks(m: int, k: int) -> list[tuple[int, int]]:
    """k contiguous blocks of m rows, sizes differing by at most one (torch.tensor_split's rule)."""
    sizes = [len(c) for c in torch.tensor_split(torch.arange(m), k)]
    bounds, start = [], 0
    for sz in sizes:
        bounds.append((start, start + sz))
        start += sz
    return bounds


def _check_fisher(fisher: str) -> str:
    if fisher not in FISHER_KINDS:
        raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}")
    return fisher


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def _forward_logits(model, ids):
    out = model(input_ids=ids, use_cache=False) if _input_embeddings(model) is not None else model(ids)
    return out.logits if hasattr(out, "logits") else out


def sequence_loss(logits: torch.Tensor, ids: torch.Tensor | None, labels: str, gen: torch.Generator | None):
    """Summed next-token CE per batch (sum over sequences and tokens; sequences stay independent)."""
    V = logits.shape[-1]
    if labels == "data":
        if ids is None or ids.dim() != 2:
            raise ValueError("labels='data' needs token ids [B, T]")
        return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1), reduction="sum")
    if labels == "sample":
        with torch.no_grad():
            p = torch.softmax(logits.float().reshape(-1, V), -1)
            tgt = torch.multinomial(p, 1, generator=gen).flatten()
        return F.cross_entropy(logits.reshape(-1, V).float(), tgt, reduction="sum")
    raise ValueError(f"labels must be 'data' or 'sample', got {labels!r}")


def collect_grad_stats(model: nn.Module, samples, names: list[str], kind: str = "both", labels: str = "data",
                       batch_size: int = 1, dtype=torch.float32, seed: int = 0, forward=None,
                       loss_fn=None, progress: bool = False, row_groups: int = 1) -> dict[str, GradStats]:
    """Per-linear output-gradient statistics over calibration `samples`.

    model:   a module; `forward(model, batch) -> logits [B, T, V]` (default: HF causal LM on token ids).
    samples: token ids [N, T] (or, with a custom `forward`, anything indexable by batch slices).
    names:   the nn.Linear modules (model.get_submodule names) to collect for.
    loss_fn: `loss_fn(logits, batch, generator) -> scalar` summed over sequences (default: the
             next-token CE of `labels`); it must not mix sequences of a batch.
    Memory: each listed linear's input is referenced from its forward to its backward, i.e. about one
    batch's activations of those linears; the statistics themselves are [n, n] (+ [m, m]) per linear.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not names:
        return {}
    mods = {}
    for nm in names:
        mod = model.get_submodule(nm)
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"collect_grad_stats: {nm!r} is {type(mod).__name__}, not nn.Linear")
        mods[nm] = mod
    stats = {nm: GradStats(mod.in_features, mod.out_features, kind, dtype, row_groups=min(row_groups, mod.out_features))
             for nm, mod in mods.items()}
    fwd = forward or (lambda mdl, b: _forward_logits(mdl, b))
    gen = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(nm):
        def hook(mod, inp, out):
            x = inp[0]
            inputs[nm] = x.detach()

            def on_grad(g, nm=nm):
                stats[nm].add(inputs.pop(nm), g.detach())

            if out.requires_grad:
                out.register_hook(on_grad)
        return hook

    emb = _input_embeddings(model)
    if emb is not None:
        handles.append(emb.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True)))
    for nm, mod in mods.items():
        handles.append(mod.register_forward_hook(make_hook(nm)))
    req = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    N = len(samples)
    it = range(0, N, batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"grad stats ({kind}, {labels})", leave=False, disable=None)  # None: terminals only
    try:
        for p in model.parameters():
            p.requires_grad_(emb is None)  # without an embedding hook, let params carry the graph
        with torch.enable_grad():
            for i in it:
                batch = samples[i : i + batch_size]
                logits = fwd(model, batch)
                if loss_fn is not None:
                    loss = loss_fn(logits, batch, gen)
                else:
                    ids = batch if isinstance(batch, torch.Tensor) and batch.dtype in (torch.long, torch.int) else None
                    loss = sequence_loss(logits, ids, labels, gen)
                loss.backward()
                inputs.clear()
    finally:
        for h in handles:
            h.remove()
        for p, r in req.items():
            p.requires_grad_(r)
            p.grad = None
        model.train(was_training)
    missing = [nm for nm, s in stats.items() if s.nsamples == 0]
    if missing:
        raise RuntimeError(f"collect_grad_stats: no gradient reached {missing[:4]}{'...' if len(missing) > 4 else ''}")
    return stats
