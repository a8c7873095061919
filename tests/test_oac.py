"""OAC: output-gradient statistics (calibration/fisher.py) and the method="oac" solver."""
import pytest
import torch
import torch.nn as nn

import quantkern
import quantkern.solvers.oac  # noqa: F401  (registers method="oac")
from quantkern.calibration.fisher import GradStats, collect_grad_stats
from quantkern.spec import QuantSpec

from _twolayer import TwoLayer, output_kl, problem


def per_sequence_grads(model, samples, name, loss_fn):
    """Brute force: dl_s/dW for every sequence s, by autograd on the weight itself."""
    W = model.get_submodule(name).weight
    out = []
    for s in range(len(samples)):
        model.zero_grad()
        loss_fn(model(samples[s : s + 1]), samples[s : s + 1], None).backward()
        out.append(W.grad.detach().clone())
    model.zero_grad()
    return torch.stack(out)


def quad_loss(logits, batch, gen):
    return 0.5 * (logits**2).sum() + logits.sum()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_stats_match_per_sequence_gradients(batch_size):
    torch.manual_seed(0)
    net = TwoLayer(12, 20, 7)
    X = torch.randn(5, 6, 12)
    st = collect_grad_stats(net, X, ["l1", "l2"], kind="both", loss_fn=quad_loss, batch_size=batch_size)
    for name in ("l1", "l2"):
        G = per_sequence_grads(net, X, name, quad_loss)  # [S, m, n]
        H_in = torch.einsum("smn,smk->nk", G, G) / len(X)
        H_out = torch.einsum("smn,skn->mk", G, G) / len(X)
        assert st[name].nsamples == 5
        assert torch.allclose(st[name].H_in, H_in, rtol=1e-4, atol=1e-5 * float(H_in.abs().max()))
        assert torch.allclose(st[name].H_out, H_out, rtol=1e-4, atol=1e-5 * float(H_out.abs().max()))
    assert all(p.grad is None for p in net.parameters()) and all(p.requires_grad for p in net.parameters())


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("labels", ["data", "sample"])
def test_causal_lm_statistics(labels):
    """Default path (HF causal LM, gradient entering at the input embeddings): every listed linear
    gets statistics, and one of them matches brute-force per-sequence weight gradients."""
    model = tiny_llama()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    names = [n for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]
    names = [f"model.layers.{n}" for n in names]
    st = collect_grad_stats(model, ids, names, kind="both", labels=labels, seed=3)
    assert set(st) == set(names)
    for nm in names:
        lin = model.get_submodule(nm)
        assert st[nm].H_in.shape == (lin.in_features,) * 2 and st[nm].H_out.shape == (lin.out_features,) * 2
        assert float(st[nm].H_in.diagonal().sum()) > 0
    if labels == "data":
        from quantkern.calibration.fisher import sequence_loss

        nm = "model.layers.1.mlp.down_proj"
        W = model.get_submodule(nm).weight
        Gs = []
        for s in range(3):
            model.zero_grad()
            sequence_loss(model(input_ids=ids[s : s + 1]).logits, ids[s : s + 1], "data", None).backward()
            Gs.append(W.grad.detach().clone())
        model.zero_grad()
        G = torch.stack(Gs)
        H_in = torch.einsum("smn,smk->nk", G, G) / 3
        assert torch.allclose(st[nm].H_in, H_in, rtol=1e-3, atol=1e-4 * float(H_in.abs().max()))


def test_unit_output_gradient_gives_activation_hessian_and_gptq_codes():
    """With one-token sequences and loss u . y for a fixed unit vector u, g = u and G_s = u x_s^T, so
    H_OAC = mean_s x_s x_s^T = H / 2: OAC must then reproduce GPTQ's codes exactly."""
    torch.manual_seed(4)
    n, m, S = 64, 24, 256
    lin = nn.Linear(n, m, bias=False)
    u = torch.randn(m)
    u /= u.norm()
    X = torch.randn(S, 1, n) * torch.rand(n)
    holder = nn.Module()
    holder.lin = lin
    st = collect_grad_stats(holder, X, ["lin"], kind="oac", forward=lambda mdl, b: mdl.lin(b),
                            loss_fn=lambda y, b, g: (y @ u).sum())
    H = 2 * X[:, 0].t() @ X[:, 0] / S
    assert torch.allclose(st["lin"].H_in * 2, H, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="output-side"):
        st["lin"].H_out
    for spec in (QuantSpec(bits=2, group_size=16), QuantSpec(bits=3, group_size=-1, act_order=True)):
        g = quantkern.solve(lin.weight.data, H, spec, method="gptq")
        o = quantkern.solve(lin.weight.data, st["lin"].H_in, spec, method="oac")
        o2 = quantkern.solve(lin.weight.data, H * 7.0, spec, method="oac", H_oac=st["lin"].H_in)
        assert torch.equal(o.codes, g.codes) and torch.equal(o2.codes, g.codes)
        assert o.method == "oac"


def test_two_layer_network_output_error_vs_gptq():
    """At 2 bits on a two-layer net, GPTQ with the output-adaptive Hessian lowers the exact output KL
    against GPTQ with activation Hessians, averaged over seeds."""
    spec = QuantSpec(bits=2, group_size=32)
    kl_g, kl_o = [], []
    for seed in range(5):
        net, X, Hact, st = problem(seed)
        W1, W2 = net.l1.weight.data, net.l2.weight.data
        g = [quantkern.solve(W, Hact[k], spec, method="gptq").dequantized for k, W in (("l1", W1), ("l2", W2))]
        o = [quantkern.solve(W, st[k].H_in, spec, method="oac").dequantized for k, W in (("l1", W1), ("l2", W2))]
        kl_g.append(output_kl(net, X, *g))
        kl_o.append(output_kl(net, X, *o))
    assert sum(kl_o) < sum(kl_g), (kl_o, kl_g)


def test_bad_input():
    with pytest.raises(ValueError, match="kind"):
        collect_grad_stats(TwoLayer(), torch.randn(2, 3, 64), ["l1"], kind="nope")
    with pytest.raises(TypeError, match="nn.Linear"):
        collect_grad_stats(nn.Sequential(nn.ReLU()), torch.randn(2, 3, 64), ["0"])
    st = GradStats(4, 3, "yaqa")
    with pytest.raises(ValueError, match="do not match"):
        st.add(torch.randn(1, 2, 5), torch.randn(1, 2, 3))
    with pytest.raises(RuntimeError, match="no samples"):
        st.H_in
