"""qgemm: every backend against the reference (dequantize + fp32 F.linear), layouts, kernels, ISAs, bad input."""
from __future__ import annotations

import pytest
import torch

from quantkern import _ext, kernels
from quantkern.formats import gptq, native
from quantkern.ops import qgemm as Q
from quantkern.ops import registry
from quantkern.spec import QuantSpec

from qgemm_cases import random_layer, rel_err

needs_cpu = pytest.mark.skipif(not _ext.has_cpu(), reason=f"extension not built: {_ext.LOAD_ERROR}")
GROUPS = [-1, 32, 64, 128, 48]  # 48 leaves a ragged last group for n = 300
BATCHES = [1, 3, 17, 128]
M, N = 100, 300  # neither a multiple of 64 (nor of the 16-row tile)


def reference(x, t, bits, bias=None):
    return Q.qgemm(x, t, bits, bias=bias, backend="reference")


def exact_kernels(bits):
    """Every CPU qgemm kernel this build and CPU run at `bits`, but the approximate opt-in one."""
    return [k for k in kernels.runnable("qgemm", bits) if k != "qgemm_int8_avx512vnni"]


def test_reference_is_dequantize_then_linear():
    t = random_layer(20, 70, QuantSpec(bits=3, group_size=32, sym=False), seed=1)
    x = torch.randn(4, 70, dtype=torch.float64).float()
    W = gptq.dequantize(t, 3)
    torch.testing.assert_close(reference(x, t, 3), x @ W.T, rtol=1e-6, atol=1e-6)


@needs_cpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("sym,act_order", [(True, False), (False, False), (False, True), (True, True)])
def test_cpu_matches_reference_fp32(bits, group_size, sym, act_order, isa):
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order)
    t = random_layer(M, N, spec, seed=bits * 100 + group_size)
    prep = Q.prepare(t, bits, "cpu")
    W = gptq.dequantize(t, bits)
    gen = torch.Generator().manual_seed(7)
    for B in BATCHES:
        x = torch.randn(B, N, generator=gen) + 0.5  # non-zero mean exercises the folded zero-point term
        ref = x @ W.T
        # every exact kernel this CPU runs at these bits (FMA GEMVs, panels, LUT, 3-digit VNNI, AMX, the
        # portable scalar ones) for every batch size, whatever the selector would pick
        for name in exact_kernels(bits):
            out = torch.full((B, M), float("nan"))  # poisoned: every element must be written
            torch.ops.quantkern.qgemm_cpu_out(
                x, prep.layout.qw, prep.layout.sc, prep.layout.kb_start, prep.layout.x_index, bits, M, None, name, out
            )
            assert not out.isnan().any(), f"unwritten outputs (B={B}, kernel={name})"
            assert rel_err(out, ref) < 1e-5, (B, name, rel_err(out, ref))
        y = Q.qgemm(x, None, bits, prepared=prep)  # default path choice
        assert rel_err(y, ref) < 1e-5


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cpu_half_activations(dtype, bits, isa):
    spec = QuantSpec(bits=bits, group_size=64, sym=False, act_order=True)
    t = random_layer(M, N, spec, seed=3)
    bias = torch.randn(M).to(dtype)
    for B in (1, 17):
        x = torch.randn(2, B, N).to(dtype)
        y = Q.qgemm(x, t, bits, bias=bias, backend="cpu")
        ref = reference(x, t, bits, bias)
        assert y.dtype == dtype and y.shape == (2, B, M)
        assert rel_err(y, ref) < 1e-2


@needs_cpu
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cpu_bias_and_leading_dims(bits):
    t = random_layer(M, N, QuantSpec(bits=bits, group_size=128), seed=5)
    bias = torch.randn(M)
    for shape in [(N,), (2, 3, N), (0, N)]:
        x = torch.randn(*shape)
        y = Q.qgemm(x, t, bits, bias=bias, backend="cpu")
        ref = reference(x, t, bits, bias)
        assert y.shape == (*shape[:-1], M)
        if x.numel():
            assert rel_err(y, ref) < 1e-5


@needs_cpu
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cpu_long_rows_precision(bits, isa):
    """One group over 4096 channels, activations with a large mean: the zero-point fold must stay exact."""
    t = random_layer(40, 4096, QuantSpec(bits=bits, group_size=-1, sym=False), seed=9)
    x = torch.randn(3, 4096) * 0.5 + 2.0
    for name in exact_kernels(bits):
        y = Q.get_backend("cpu").run(x, Q.prepare(t, bits, "cpu").layout, None, name)
        assert rel_err(y, reference(x, t, bits)) < 1e-5, name


@needs_cpu
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cpu_threaded_sizes(bits, isa):
    """Big enough that GEMV, LUT and panel dequant split rows over threads (small layers run inline)."""
    m, n = 600, 1000
    t = random_layer(m, n, QuantSpec(bits=bits, group_size=128, sym=False, act_order=True), seed=bits)
    L = Q.prepare(t, bits, "cpu").layout
    W = gptq.dequantize(t, bits)
    for B in (1, 2, 9):
        x = torch.randn(B, n)
        for name in exact_kernels(bits):
            y = Q.get_backend("cpu").run(x, L, None, name)
            assert rel_err(y, x @ W.T) < 1e-5, (B, name)


@needs_cpu
@pytest.mark.parametrize("group_size", [-1, 32, 128, 48])
def test_cpu_vnni_digit_path_wide_range(group_size):
    """4-bit default decode path (x as 3 base-128 digits per 32 channels): outliers next to tiny values,
    all-zero blocks, negative and exact-max values keep the fp32 accuracy; every output written."""
    spec = QuantSpec(bits=4, group_size=group_size, sym=False, act_order=True)
    t = random_layer(M, N, spec, seed=21)
    prep = Q.prepare(t, 4, "cpu")
    W = gptq.dequantize(t, 4)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, N, generator=gen) * torch.logspace(-4, 3, N)[torch.randperm(N, generator=gen)]
    x[0, :64] = 0.0  # zero k-blocks (step 0)
    x[1, 5] = -1e4  # an outlier that sets its block's step
    x[2] = x[2].abs().max()  # every value at the block maximum
    ref = x.double() @ W.double().T
    kernel = next(iter(k for k in ("qgemm_digits_avx512vnni", "qgemm_gemv_avx2", "qgemm_gemv_generic")
                       if k in exact_kernels(4)))
    for B in (1, 2, 3, 4):
        out = torch.full((B, M), float("nan"))
        L = prep.layout
        torch.ops.quantkern.qgemm_cpu_out(x[:B], L.qw, L.sc, L.kb_start, L.x_index, 4, M, None, kernel, out)
        assert not out.isnan().any()
        assert rel_err(out, ref[:B]) < 1e-5, (B, rel_err(out, ref[:B]))
        for b in range(B):  # per token too: a large token must not hide a small one's error
            assert rel_err(out[b], ref[b]) < 1e-5, (B, b)


def _amx_cpu() -> bool:
    """The CPU flags the AMX GEMV needs (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"amx_tile", "amx_int8", "gfni", "avx512bw"} <= set(flags)


def _run(x, L, bits, m, kernel=None):
    """One call of the named kernel (None: the one quantkern.kernels selects) into a poisoned output."""
    kernel = kernel or kernels.cpu_qgemm(bits, x.shape[0], L.x_index.shape[0])
    out = torch.full((x.shape[0], m), float("nan"))  # poisoned: every element must be written
    torch.ops.quantkern.qgemm_cpu_out(x, L.qw, L.sc, L.kb_start, L.x_index, bits, m, None, kernel, out)
    return out


@needs_cpu
def test_amx_detection_and_override(monkeypatch):
    """The AMX GEMV is on where the CPU has AMX-INT8 + GFNI (and Linux grants the tile state);
    QUANTKERN_NO_AMX=1 and QUANTKERN_NO_AVX512=1 turn it off at the next call."""
    monkeypatch.delenv("QUANTKERN_NO_AMX", raising=False)
    monkeypatch.delenv("QUANTKERN_NO_AVX512", raising=False)
    assert _ext.build_info()["amx_kernels"] == _amx_cpu()
    monkeypatch.setenv("QUANTKERN_NO_AMX", "1")
    assert _ext.build_info()["amx_kernels"] is False
    monkeypatch.delenv("QUANTKERN_NO_AMX")
    monkeypatch.setenv("QUANTKERN_NO_AVX512", "1")
    assert _ext.build_info()["amx_kernels"] is False


needs_amx = pytest.mark.skipif(not (_ext.has_cpu() and _ext.build_info().get("amx_kernels")),
                               reason="no AMX-INT8 + GFNI (or the kernel refused the tile state)")


@needs_amx
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("group_size", [-1, 32, 128, 48, 160])
def test_cpu_amx_path(bits, group_size, monkeypatch):
    """AMX GEMV: ragged m/n, act-order, groups of 1-5 k-blocks and longer (-1, 160: several x steps per
    group), batches that take one, two and four passes of <= 5 tokens. It must be the AMX kernel that
    ran (its rounding differs from the FMA GEMV's), and the default for few tokens."""
    monkeypatch.delenv("QUANTKERN_NO_AMX", raising=False)
    monkeypatch.delenv("QUANTKERN_NO_AVX512", raising=False)
    for (m, n), sym, act in [((100, 300), False, True), ((37, 1000), True, False), ((16, 32), False, False)]:
        spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act)
        t = random_layer(m, n, spec, seed=bits * 7 + group_size)
        L = Q.prepare(t, bits, "cpu").layout
        W = gptq.dequantize(t, bits).double()
        gen = torch.Generator().manual_seed(n)
        for B in (1, 2, 5, 6, 17):
            x = torch.randn(B, n, generator=gen) + 0.5
            ref = x.double() @ W.T
            out = _run(x, L, bits, m, "qgemm_amx")
            assert not out.isnan().any(), (m, n, B)
            assert rel_err(out, ref) < 1e-5, (m, n, B, rel_err(out, ref))
            if B <= 8:  # the selector picks the AMX GEMV for decode batches: the same bits
                assert torch.equal(_run(x, L, bits, m), out)
        assert not torch.equal(out, _run(x, L, bits, m, "qgemm_gemv_avx512")), "qgemm_amx ran the FMA GEMV"
    monkeypatch.setenv("QUANTKERN_NO_AMX", "1")  # the selector's next choice (LUT or FMA GEMV) stays exact
    assert kernels.cpu_qgemm(bits, 2, L.x_index.shape[0]) != "qgemm_amx"
    assert rel_err(_run(x[:2], L, bits, m), ref[:2]) < 1e-5


@needs_cpu
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("group_size", [-1, 32, 128, 48])
def test_cpu_amx_digit_path_wide_range(bits, group_size):
    """x as 3 base-128 digits per run of <= 128 channels (22-bit fixed point): outliers next to tiny
    values, all-zero runs, negative and exact-max values keep the fp32 accuracy per token. Runs the
    FMA GEMV where the CPU has no AMX."""
    kernel = "qgemm_amx" if "qgemm_amx" in exact_kernels(bits) else None
    spec = QuantSpec(bits=bits, group_size=group_size, sym=False, act_order=True)
    t = random_layer(M, N, spec, seed=31)
    L = Q.prepare(t, bits, "cpu").layout
    W = gptq.dequantize(t, bits)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, N, generator=gen) * torch.logspace(-4, 3, N)[torch.randperm(N, generator=gen)]
    x[0, :150] = 0.0  # zero runs (step 0)
    x[1, 5] = -1e4  # an outlier that sets its run's step
    x[2] = x[2].abs().max()  # every value at the run maximum
    x[3] = torch.randn(N, generator=gen) * 1e-30  # tiny (fp32 normals) everywhere
    ref = x.double() @ W.double().T
    for B in (1, 2, 5):
        out = _run(x[:B], L, bits, M, kernel)
        assert not out.isnan().any()
        for b in range(B):  # per token: a large token must not hide a small one's error
            assert rel_err(out[b], ref[b]) < 1e-5, (B, b, rel_err(out[b], ref[b]))


@needs_cpu
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cpu_non_finite_x_gives_nan_on_every_path(bits, isa):
    """A NaN or Inf in a token's x makes that token's outputs NaN on the GEMV kernels (not silently dropped
    by the int8 digit kernels), non-finite on the panel kernels, and leaves the other tokens finite."""
    t = random_layer(M, N, QuantSpec(bits=bits, group_size=64, sym=False), seed=8)
    L = Q.prepare(t, bits, "cpu").layout
    for bad in (float("nan"), float("inf")):
        x = torch.randn(3, N)
        x[1, 7] = bad
        for name in [None] + kernels.runnable("qgemm", bits):
            out = _run(x, L, bits, M, name)
            if name and "panel" in name:  # BLAS on the dequantized panel: an Inf may stay +-Inf
                assert not out[1].isfinite().any(), (bad, name)
            else:
                assert out[1].isnan().all(), (bad, name)
            assert out[0].isfinite().all() and out[2].isfinite().all(), (bad, name)


@needs_cpu
def test_native_scales_must_be_fp16_exact():
    """The CPU layout stores scales in fp16: fp32 scales holding fp16 values work, others are refused."""
    t = random_layer(M, N, QuantSpec(bits=4, group_size=64), seed=2)
    x = torch.randn(2, N)
    ok = dict(t, scales=t["scales"].float())
    assert rel_err(Q.qgemm(x, ok, 4, backend="cpu"), reference(x, t, 4)) < 1e-5
    bad = dict(t, scales=t["scales"].float() * (1 + 2**-20))
    with pytest.raises(RuntimeError, match="float16"):
        Q.prepare(bad, 4, "cpu")


@needs_cpu
def test_cpu_int8_activation_path_is_close(monkeypatch):
    """Opt-in approximate path (4-bit, VNNI): error of int8 activation rounding only; exact path otherwise.
    Without VNNI the switch changes nothing: the selector says why."""
    t = random_layer(M, N, QuantSpec(bits=4, group_size=64, sym=False, act_order=True), seed=12)
    prep = Q.prepare(t, 4, "cpu")
    x = torch.randn(5, N) + 0.3
    ref = reference(x, t, 4)
    int8 = "qgemm_int8_avx512vnni"
    monkeypatch.setenv("QUANTKERN_CPU_INT8_ACT", "1")
    chosen = kernels.cpu_qgemm(4, 5, prep.layout.x_index.shape[0])
    if int8 in kernels.runnable("qgemm", 4):
        y = Q.get_backend("cpu").run(x, prep.layout, None, int8)
        assert not y.isnan().any() and rel_err(y, ref) < 2e-2
        assert chosen == int8
    else:
        sel = kernels.select(Q.query(prep, 5, torch.float32, torch.device("cpu")))
        assert dict((k.name, why) for k, why in sel.skipped)[int8].startswith("needs AVX-512 VNNI")
        assert chosen != int8
    assert rel_err(Q.qgemm(x, None, 4, prepared=prep), ref) < 2e-2
    monkeypatch.delenv("QUANTKERN_CPU_INT8_ACT")
    assert rel_err(Q.qgemm(x, None, 4, prepared=prep), ref) < 1e-5


@needs_cpu
def test_native_layout_shapes():
    spec = QuantSpec(bits=3, group_size=48, act_order=True)
    t = random_layer(M, N, spec, seed=2)
    L = native.cpu_layout(t, 3)
    G = spec.num_groups(N)
    assert L.qw.shape[0] == -(-M // 16) and L.qw.shape[2:] == (3, 16)
    assert L.sc.shape == (L.qw.shape[0], G, 2, 16) and L.kb_start.shape == (G + 1,)
    idx = L.x_index[L.x_index >= 0].long()
    assert sorted(idx.tolist()) == list(range(N))  # every input channel exactly once
    g_of = t["g_idx"].long()[idx]
    assert torch.equal(g_of, g_of.sort().values)  # groups contiguous in native order


def _usable_backends(device):
    return [b for b in Q._BACKENDS if b != "reference" and registry._usable(b, torch.device(device))]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_backend_matches_reference(device, bits):
    """Covers backends registered by other modules (triton, cuda) on the devices present."""
    backends = _usable_backends(device)
    if not backends:
        pytest.skip(f"no compiled qgemm backend on {device}")
    for gs, sym, act in [(-1, True, False), (32, False, True), (48, False, False), (128, True, True)]:
        t = {k: v.to(device) for k, v in random_layer(M, N, QuantSpec(bits=bits, group_size=gs, sym=sym,
                                                                         act_order=act), seed=gs + 11).items()}
        for b in backends:
            prep = Q.prepare(t, bits, b)
            interpreted = b == "triton" and device == "cpu"  # TRITON_INTERPRET: slow, fewer batches
            for B in ([1, 17] if interpreted else BATCHES):
                x = torch.randn(B, N, device=device)
                assert rel_err(Q.qgemm(x, None, bits, prepared=prep), reference(x, t, bits)) < 1e-5, (b, gs, B)


# ---- bad input ------------------------------------------------------------------------------------
@needs_cpu
def test_bad_inputs():
    bits = 4
    t = random_layer(M, N, QuantSpec(bits=bits, group_size=64), seed=4)
    prep = Q.prepare(t, bits, "cpu")
    with pytest.raises(ValueError, match="in_features=300"):
        Q.qgemm(torch.randn(2, N + 1), None, bits, prepared=prep)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        Q.qgemm(torch.ones(2, N, dtype=torch.int32), None, bits, prepared=prep)
    with pytest.raises(ValueError, match="bias has shape"):
        Q.qgemm(torch.randn(2, N), None, bits, bias=torch.randn(M + 1), prepared=prep)
    with pytest.raises(ValueError, match="prepared layout is 4-bit"):
        Q.qgemm(torch.randn(2, N), None, 3, prepared=prep)
    with pytest.raises(ValueError, match="qweight shape"):  # packed tensors that are not 3-bit
        Q.qgemm(torch.randn(2, N), t, 3, backend="cpu")
    with pytest.raises(ValueError, match="x is on meta"):  # a tensor from another device
        Q.qgemm(torch.randn(2, N, device="meta"), None, bits, prepared=prep)
    with pytest.raises(RuntimeError, match="cpu cannot run|cannot run on meta"):
        Q.prepare({k: v.to("meta") for k, v in t.items()}, bits, "cpu")
    bad = dict(t, qzeros=t["qzeros"].float())
    with pytest.raises(ValueError, match="qzeros must be torch.int32"):
        Q.qgemm(torch.randn(2, N), bad, bits, backend="cpu")
    with pytest.raises(RuntimeError, match="expected CPU tensors|out must be"):
        torch.ops.quantkern.qgemm_cpu_out(torch.randn(2, N), prep.layout.qw, prep.layout.sc, prep.layout.kb_start,
                                          prep.layout.x_index, bits, M, None, "qgemm_gemv_generic",
                                          torch.empty(2, M, dtype=torch.float64))
    L = prep.layout
    with pytest.raises(RuntimeError, match="no kernel named 'gemv'.*qgemm_gemv_generic"):
        torch.ops.quantkern.qgemm_cpu(torch.randn(2, N), L.qw, L.sc, L.kb_start, L.x_index, bits, M, None, "gemv")
    # a kernel the CPU lacks, or one that does not read these bits: refused, never a silent substitute
    why = "does not read 4-bit" if _ext.build_info()["cpu_avx512"] else "needs avx512, which this CPU lacks"
    with pytest.raises(RuntimeError, match=why):
        torch.ops.quantkern.qgemm_cpu(torch.randn(2, N), L.qw, L.sc, L.kb_start, L.x_index, bits, M, None,
                                      "qgemm_lut_avx512")


@needs_cpu
def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    L = Q.prepare(random_layer(M, N, QuantSpec(bits=3, group_size=64), seed=1), 3, "cpu").layout
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(5, N).bfloat16())
        y = torch.ops.quantkern.qgemm_cpu(x, L.qw, L.sc, L.kb_start, L.x_index, 3, M, None, "qgemm_gemv_generic")
    assert y.shape == (5, M) and y.dtype == torch.bfloat16


def test_register_rejects_non_backend():
    with pytest.raises(TypeError, match="prepare"):
        Q.register_qgemm_backend("cuda", object())
    with pytest.raises(ValueError, match="unknown backend"):
        Q.register_qgemm_backend("tpu", Q.ReferenceBackend())
