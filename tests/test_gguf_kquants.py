"""GGUF-grid quantization (quantkern.export.kquants / gguf_solve): K-quant and Q4_0 block bytes decode (with gguf's
own dequantizer) bit for bit to the grid values the solver used; the fixed-grid GPTQ solve matches an independent
pure-torch loop; quantize -> checkpoint -> export keeps every tensor exact. CPU, seconds."""
import json

import gguf
import numpy as np
import pytest
import torch

from driver_tiny import tiny_hf_tokenizer, tiny_llama, tiny_tokens

import quantkern
from quantkern.export import gguf_solve, kquants
from quantkern.export.gguf import ExportError, export_gguf
from quantkern.export.gguf_sidecar import SIDECAR, load_sidecar, save_sidecar

T = gguf.GGMLQuantizationType
KINDS = ("Q4_K", "Q3_K", "Q2_K", "Q4_0", "Q4_1")
SHAPES = ((1, 256), (5, 512), (17, 768), (3, 1280))


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.astype(np.float32).view(np.uint32), b.astype(np.float32).view(np.uint32))


def _weight(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) * 0.05
    W[0, :7] *= 12  # outliers
    W[-1, 40:72] = 0  # an all-zero sub-block
    W[:, 100] = -W[:, 100].abs() * 5  # a one-signed column
    return W


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_blocks_decode_to_grid_values(kind, shape):
    m, n = shape
    W = _weight(m, n, seed=n + m)
    g = kquants.choose(kind, W, torch.rand(n) + 0.05)
    for codes in (g.codes, torch.randint(0, 1 << g.layout.bits, (m, n), dtype=torch.uint8)):  # every code, not just RTN's
        g.codes = codes
        got = gguf.quants.dequantize(kquants.encode(g), g.layout.qtype)
        assert _bits_equal(got, g.values().numpy()), kind
    S, _ = g.scale_offset()
    assert (S != 0).all()  # the solver divides by every sub-block scale


@pytest.mark.parametrize("kind", KINDS)
def test_scale_choice_error(kind):
    """The weighted search is at least as good as the plain start point on every sub-block's weighted error on
    average, and the RTN relative error is in the range the type's bits allow (a broken scale quantizer fails)."""
    W = _weight(8, 512, seed=3)
    wt = torch.rand(512) + 0.05
    g = kquants.choose(kind, W, wt)
    rel = float(((g.values() - W) ** 2 * wt).sum() / ((W ** 2) * wt).sum())
    bound = {"Q4_K": 0.012, "Q4_0": 0.02, "Q4_1": 0.015, "Q3_K": 0.04, "Q2_K": 0.12}[kind]
    assert 0 < rel < bound, rel
    assert torch.equal(g.codes, kquants.rtn_codes(g, W))


def test_row_not_multiple_of_256_refused_with_fallback():
    with pytest.raises(kquants.KQuantShapeError, match=r"multiple of 256, got 576.*llama.cpp writes Q4_0.*quantkern Q4_0"):
        kquants.choose("Q3_K", torch.randn(4, 576))
    with pytest.raises(kquants.KQuantShapeError, match="Q5_0"):
        kquants.choose("Q4_K", torch.randn(4, 320))
    with pytest.raises(kquants.KQuantShapeError, match="multiple of 32"):
        kquants.choose("Q4_0", torch.randn(4, 48))


def _reference_fixed_gptq(W, H, S, O, zero, maxq, sub, damp, perm):
    """GPTQ column by column in float64 (Hinv via Cholesky), nearest value of the fixed grid S*(q-zero)-O."""
    W = W.double().clone()
    n = W.shape[1]
    H = H.double().clone()
    H += damp * torch.diagonal(H).mean() * torch.eye(n, dtype=torch.float64)
    Hp = H[perm][:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)
    Wp = W[:, perm].clone()
    codes = torch.zeros(W.shape, dtype=torch.long)
    for k in range(n):
        j = int(perm[k])
        s, o = S[:, j // sub].double(), O[:, j // sub].double()
        q = torch.clamp(torch.round((Wp[:, k] + o) / s) + zero, 0, maxq)
        val = s * (q - zero) - o
        err = (Wp[:, k] - val) / U[k, k]
        Wp[:, k + 1:] -= err[:, None] * U[k, k + 1:][None, :]
        codes[:, j] = q.long()
    return codes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act_order", (False, True))
def test_fixed_grid_solve_matches_reference(kind, act_order):
    m, n = 6, 512
    W = _weight(m, n, seed=7)
    g = torch.Generator().manual_seed(8)
    X = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g) / n ** 0.5)
    X[:, :64] *= 3  # uneven diag(H), so act-order is a real permutation
    H = X.t() @ X / X.shape[0]
    g0 = kquants.choose(kind, W, torch.diagonal(H))
    res = gguf_solve.solve_fixed(W, H, g0, damp=0.01, act_order=act_order)
    L = g0.layout
    S, O = g0.scale_offset()
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(n)
    ref = _reference_fixed_gptq(W, H, S, O, L.zero, (1 << L.bits) - 1, L.sub, 0.01, perm)
    same = (res.codes.long() == ref).float().mean().item()
    assert same > 0.995, same  # fp32 kernel vs float64 loop: a few near-ties may round differently
    # error feedback beats round-to-nearest on the same fixed grid (the objective it minimises)
    def loss(c):
        E = (W - g0.values(c)).double()
        return float(((E @ H.double()) * E).sum())
    assert loss(res.codes) < 0.9 * loss(g0.codes)


def test_fixed_grid_solve_diagonal_h_is_rtn():
    """No correlation, no feedback: the solve lands on the nearest grid value (checks the offset trick)."""
    W = _weight(5, 512, seed=11)
    H = torch.diag(torch.rand(512) + 0.5)
    for kind in KINDS:
        g0 = kquants.choose(kind, W, torch.diagonal(H))
        assert torch.equal(gguf_solve.solve_fixed(W, H, g0, act_order=False).codes, g0.codes), kind


def _converter_permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("kind,hidden,inter", [("Q3_K", 96, 256), ("Q2_K", 256, 512), ("Q4_K", 64, 256)])
def test_quantize_save_export_exact(tmp_path, kind, hidden, inter):
    model = tiny_llama(seed=1, hidden=hidden, inter=inter)
    model, report, blocks = gguf_solve.quantize_gguf(model, None, kind, calib=tiny_tokens(nsamples=8), progress=False)
    assert not report.safety_net
    want_kind = {n: (kind if mod.in_features % 256 == 0 else "Q4_0") for n, mod in model.named_modules()
                 if n.startswith("model.layers.") and isinstance(mod, torch.nn.Linear)}
    assert {n: k for n, (k, _) in blocks.items()} == want_kind
    ck = gguf_solve.save_gguf_checkpoint(model, tmp_path / "ck", blocks, tokenizer=tiny_hf_tokenizer())
    qc = json.loads((ck / "quantize_config.json").read_text())
    assert qc["meta"]["gguf_type"] == kind and sorted(qc["meta"]["kept_float_linears"]) == sorted(want_kind)
    loaded = quantkern.load(ck, fuse=False)
    side = load_sidecar(ck)
    for name, k in want_kind.items():  # the checkpoint's float weight is exactly the decoded blocks
        w = loaded.get_submodule(name).weight.detach()
        assert torch.equal(w, model.get_submodule(name).weight.detach()), name
        assert _bits_equal(gguf.quants.dequantize(side[name][1], kquants.LAYOUTS[k].qtype), w.numpy()), name
    out = tmp_path / "m.gguf"
    r = export_gguf(ck, out, tokenizer_pre="default")
    assert r["not_bit_exact"] == []
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    cfg = loaded.config
    for name, k in want_kind.items():
        li, leaf = int(name.split(".")[2]), name.split(".", 3)[3]
        gname = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}[leaf]
        t = tensors[f"blk.{li}.{gname}.weight"]
        assert t.tensor_type == kquants.LAYOUTS[k].qtype, name
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        want = loaded.get_submodule(name).weight.detach()
        if leaf == "self_attn.q_proj":
            want = _converter_permute(want, cfg.num_attention_heads)
        elif leaf == "self_attn.k_proj":
            want = _converter_permute(want, cfg.num_key_value_heads)
        assert _bits_equal(got, want.numpy()), name
    assert tensors["output.weight"].tensor_type == T.Q8_0  # the default 8-bit head
    # a sidecar that does not decode to the checkpoint's weight is refused, nothing written
    name = next(n for n, k in want_kind.items() if k == kind)
    bad = dict(side)
    b = bad[name][1].copy()
    b[0, -1] ^= 0x11  # flip code bits
    bad[name] = (bad[name][0], b)
    save_sidecar(ck, bad)
    with pytest.raises(ExportError, match="do not decode"):
        export_gguf(ck, tmp_path / "bad.gguf", tokenizer_pre="default")
    assert not (tmp_path / "bad.gguf").exists()


def test_cli_gguf_type_kquant(tmp_path, capsys):
    from quantkern import cli

    src = tmp_path / "tiny"
    model = tiny_llama(hidden=64, inter=256)
    model.save_pretrained(src)
    tiny_hf_tokenizer().save_pretrained(src)
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    common = ["--model", str(src), "--nsamples", "2", "--seqlen", "32", "--calib", str(tmp_path / "calib.txt"),
              "--quiet"]
    for bad, why in ((["--bits", "3"], "drop --bits"), (["--method", "snrq"], "drop --method snrq")):
        assert cli.main(["quantize", "--gguf-type", "Q2_K", "--output", str(tmp_path / "x"), *common, *bad]) == 2
        assert why in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "q"
    assert cli.main(["quantize", "--gguf-type", "Q2_K", "--output", str(out), *common]) == 0
    assert (out / SIDECAR).exists()
    assert json.loads((out / "quantize_config.json").read_text())["meta"]["gguf_type"] == "Q2_K"
    assert cli.main(["export", "--gguf", str(tmp_path / "m.gguf"), str(out), "--tokenizer-pre", "default"]) == 0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == T.Q2_K and types["blk.1.attn_q.weight"] == T.Q4_0
