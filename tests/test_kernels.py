"""The kernel table (quantkern/kernels.py): it names what the build has, the selector's choice is the
kernel that runs (quantkern.explain), the switches steer it, and the portable scalar kernels are exact."""
from __future__ import annotations

import pytest
import torch

import quantkern
from quantkern import _ext, kernels, switches
from quantkern.formats import gptq
from quantkern.nn import QuantLinear
from quantkern.ops import qgemm as Q
from quantkern.ops import solver as S
from quantkern.spec import QuantSpec

from qgemm_cases import random_layer, rel_err

needs_cpu = pytest.mark.skipif(not _ext.has_cpu(), reason=f"extension not built: {_ext.LOAD_ERROR}")
CPU_SWITCHES = ("QUANTKERN_NO_AVX2", "QUANTKERN_NO_AVX512", "QUANTKERN_NO_AMX", "QUANTKERN_CPU_INT8_ACT",
                "QUANTKERN_BACKEND")


@pytest.fixture
def clean_env(monkeypatch):
    for name in CPU_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@needs_cpu
def test_table_names_exactly_the_compiled_cpu_kernels():
    """Every CPU row of the table is a kernel this build compiled (on x86 with AVX2: all of them), and every
    compiled kernel has a row: the two lists cannot drift apart."""
    info = _ext.build_info()
    compiled = info["cpu_kernels"]
    rows = {k.name: k.isa for k in kernels.TABLE if k.backend == "cpu"}
    assert compiled.items() <= rows.items()
    if info["cpu_avx2"]:  # an x86 build with the AVX2 baseline: every kernel
        assert compiled == rows
    else:  # a build without AVX2: only the AVX2 kernels (and the x86-only ones off x86) are left out
        assert {rows[k] for k in rows.keys() - compiled.keys()} <= {"avx2", "avx512", "avx512vnni", "amx"}
        assert all(k in compiled for k in rows if rows[k] == "generic")
    assert kernels.BY_NAME["qgemm_gemv_generic"].isa == "generic"


def _layer(m, n, bits, gs, act, seed):
    spec = QuantSpec(bits=bits, group_size=gs, sym=False, act_order=act)
    return QuantLinear.from_gptq(random_layer(m, n, spec, seed=seed), spec, bias=torch.randn(m))


def _forced(layer, x, name):
    prep = layer.prepared("cpu")
    return Q.get_backend("cpu").run(x, prep.layout, layer.bias, name)


@needs_cpu
@pytest.mark.parametrize("env", [{}, {"QUANTKERN_NO_AVX512": "1"}, {"QUANTKERN_NO_AVX2": "1"}])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_explain_names_the_kernel_that_ran(clean_env, env, bits):
    """For several shapes and batches: the kernel quantkern.explain names gives the forward pass's output
    bit for bit, and some other runnable candidate gives different bits (the kernels round differently,
    so the comparison can tell them apart: the proof test_qgemm's AMX test uses)."""
    for k, v in env.items():
        clean_env.setenv(k, v)
    for (m, n), gs, act in [((100, 300), 64, True), ((37, 1000), -1, False), ((16, 32), 32, False)]:
        layer = _layer(m, n, bits, gs, act, seed=bits * 31 + n)
        for B in (1, 2, 5, 8, 9, 33):
            x = torch.randn(B, n) + 0.25
            (row,) = quantkern.explain(layer, x, quiet=True)
            if "QUANTKERN_NO_AVX2" in env:
                assert row.kernel.endswith("_generic"), row.kernel
            y = layer(x)  # the model's path: QuantLinear -> qgemm -> CpuBackend -> the selector
            assert torch.equal(y, _forced(layer, x, row.kernel)), (m, n, B, row.kernel)
            others = [k for k in kernels.runnable("qgemm", bits) if k != row.kernel]
            assert any(not torch.equal(y, _forced(layer, x, k)) for k in others), (m, n, B, row.kernel)
            assert rel_err(y, x @ layer.dequantized_weight().T + layer.bias) < 1e-5


@needs_cpu
def test_explain_report_and_skip_reasons(clean_env, capsys):
    layer = _layer(100, 300, 3, 64, True, seed=1)
    rows = quantkern.explain(layer, 1)
    text = capsys.readouterr().out
    assert rows[0].kernel in text and "backend cpu" in text
    skipped = dict((k.name, why) for k, why in rows[0].selection.skipped)
    assert skipped["qgemm_digits_avx512vnni"] == "reads 4-bit weights, not 3-bit"
    assert skipped["qgemm_panel_generic"].startswith("applies, but")  # ranked below the choice
    rows = quantkern.explain(layer, 17, quiet=True)
    assert rows[0].kernel.startswith("qgemm_panel_")
    assert dict((k.name, w) for k, w in rows[0].selection.skipped)["qgemm_gemv_generic"] == "batch 17 outside 1..8"
    clean_env.setenv("QUANTKERN_NO_AVX2", "1")
    rows = quantkern.explain(layer, torch.randn(2, 3, 300), quiet=True)  # leading dims: 6 tokens
    assert rows[0].selection.query.batch == 6 and rows[0].kernel == "qgemm_gemv_generic"
    why = dict((k.name, w) for k, w in rows[0].selection.skipped)["qgemm_gemv_avx2"]
    compiled = "qgemm_gemv_avx2" in _ext.build_info()["cpu_kernels"]
    assert why == ("turned off by QUANTKERN_NO_AVX2=1" if compiled else "not compiled into this build of the extension")
    clean_env.setenv("QUANTKERN_BACKEND", "reference")
    assert quantkern.explain(layer, 1, quiet=True)[0].kernel == "reference_qgemm"
    with pytest.raises(ValueError, match="give this layer's input"):
        quantkern.explain(layer, torch.randn(2, 299))
    with pytest.raises(TypeError, match="token count"):
        quantkern.explain(layer, "7")


@needs_cpu
def test_explain_model_groups_layers_and_fused_groups(clean_env, capsys):
    from driver_tiny import tiny_llama, tiny_tokens

    from quantkern.models.fusion import fuse_quant_groups

    q, _ = quantkern.quantize_model(tiny_llama(), None, QuantSpec(bits=4, group_size=32), method="rtn",
                                    progress=False, fuse=False)
    ids = tiny_tokens(1, 5, seed=1)
    rows = quantkern.explain(q, ids)
    out = capsys.readouterr().out
    assert len(rows) == sum(isinstance(m, QuantLinear) for m in q.modules())
    assert all(r.selection.query.batch == 5 for r in rows) and "layers)" in out  # printed once per choice
    fuse_quant_groups(q)
    qkv = [r for r in quantkern.explain(q, 1, quiet=True) if r.name.endswith("q_proj")][0]
    g = qkv.layer._group.group
    assert qkv.selection.query.out_features == g.bounds[-1]  # the concatenated weight is what runs


@needs_cpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_generic_kernels_match_reference(clean_env, bits):
    """The portable scalar kernels (forced by QUANTKERN_NO_AVX2=1, as on a CPU without AVX2) against the
    dequantize + fp32 reference: ragged m and n, act-order, ragged groups, decode and prefill batches."""
    clean_env.setenv("QUANTKERN_NO_AVX2", "1")
    for (m, n), gs, act in [((100, 300), 48, True), ((37, 1000), -1, False), ((16, 32), 32, True),
                            ((1, 70), 64, False), ((130, 129), 128, True)]:
        spec = QuantSpec(bits=bits, group_size=gs, sym=False, act_order=act)
        t = random_layer(m, n, spec, seed=bits + n)
        prep = Q.prepare(t, bits, "cpu")
        W = gptq.dequantize(t, bits).double()
        bias = torch.randn(m)
        for B in (1, 3, 8, 9, 40):
            x = torch.randn(B, n) + 0.5
            ref = x.double() @ W.T + bias.double()
            chosen = kernels.cpu_qgemm(bits, B, prep.layout.x_index.shape[0])
            assert chosen == ("qgemm_gemv_generic" if B <= 8 else "qgemm_panel_generic")
            y = Q.qgemm(x, None, bits, bias=bias, prepared=prep)
            assert torch.equal(y, Q.get_backend("cpu").run(x, prep.layout, bias, chosen))
            assert rel_err(y, ref) < 1e-5, (m, n, B, rel_err(y, ref))
            for name in ("qgemm_gemv_generic", "qgemm_panel_generic"):  # both at every batch
                assert rel_err(Q.get_backend("cpu").run(x, prep.layout, bias, name), ref) < 1e-5, name


@needs_cpu
@pytest.mark.parametrize("with_p,dynamic", [(False, False), (True, True)])
def test_generic_solver_kernels_are_bit_identical(clean_env, with_p, dynamic):
    """gptq_block_generic / ksnrq_generic do the SIMD kernels' IEEE operations in the same order: codes,
    group params and losses equal bit for bit (ragged tiles, blocks and groups)."""
    from solver_problems import correlated, factor

    from quantkern import grid

    for m, n, gs, B, bits in [(130, 75, 16, 32, 4), (37, 70, 48, 64, 3), (9, 41, 7, 16, 2)]:
        W, H, D = correlated(m, n, seed=m + n)
        _, U = factor(H)
        gidx = (torch.arange(n) // gs).to(torch.int32)
        scales, zeros = grid.group_params(W, QuantSpec(bits=bits, group_size=gs, sym=False), gidx)
        P = 0.25 * torch.triu(D @ U.t(), 1) @ U if with_p else None
        args = (W, U, P, gidx, scales, zeros, bits, False, dynamic, B)
        simd = S.gptq_block_solve(*args, backend="cpu")
        ks = S.ksnrq_solve(W, U, gidx, scales, zeros, bits, 4, B, backend="cpu")
        clean_env.setenv("QUANTKERN_NO_AVX2", "1")
        assert kernels.cpu_solver("gptq_block_solve") == "gptq_block_generic"
        gen = S.gptq_block_solve(*args, backend="cpu")
        ks_gen = S.ksnrq_solve(W, U, gidx, scales, zeros, bits, 4, B, backend="cpu")
        clean_env.delenv("QUANTKERN_NO_AVX2")
        for a, b in zip(simd + ks, gen + ks_gen):
            assert torch.equal(a, b)
        ref = S.gptq_block_solve(*args, backend="reference")
        assert (gen[0] != ref[0]).float().mean() < 1e-3


@needs_cpu
def test_solver_refuses_unknown_or_unrunnable_kernels():
    W = torch.randn(4, 8)
    U = torch.eye(8)
    g = torch.zeros(8, dtype=torch.int32)
    s, z = torch.ones(1, 4), torch.zeros(1, 4)
    with pytest.raises(RuntimeError, match="no kernel named 'fast'.*gptq_block_generic"):
        torch.ops.quantkern.gptq_block_solve(W, U, None, g, s, z, 4, True, False, 8, "fast")
    info = _ext.build_info()
    if "ksnrq_avx512" not in info["cpu_kernels"]:  # a build without AVX2
        with pytest.raises(RuntimeError, match="no kernel named 'ksnrq_avx512'"):
            torch.ops.quantkern.ksnrq_solve(W, U, g, s, z, 4, 2, 8, "ksnrq_avx512")
    elif not info["cpu_avx512"]:
        with pytest.raises(RuntimeError, match="needs avx512, which this CPU lacks"):
            torch.ops.quantkern.ksnrq_solve(W, U, g, s, z, 4, 2, 8, "ksnrq_avx512")


def test_switches_parse_and_fail_clearly(monkeypatch):
    monkeypatch.setenv("QUANTKERN_NO_AMX", "0")
    assert switches.flag("QUANTKERN_NO_AMX") is False
    monkeypatch.setenv("QUANTKERN_NO_AMX", "yes")
    assert switches.flag("QUANTKERN_NO_AMX") is True
    monkeypatch.setenv("QUANTKERN_CUDA_MMA", "0")
    assert switches.flag("QUANTKERN_CUDA_MMA") is False
    monkeypatch.delenv("QUANTKERN_CUDA_MMA")
    assert switches.flag("QUANTKERN_CUDA_MMA") is True  # default on
    monkeypatch.setenv("QUANTKERN_CUDA_GEMV_MAX_BATCH", "many")
    with pytest.raises(ValueError, match="QUANTKERN_CUDA_GEMV_MAX_BATCH='many' is not an integer"):
        kernels.BY_NAME["cuda_gemv"].max_batch()
    with pytest.raises(KeyError, match="not a declared quantkern switch"):
        switches.raw("QUANTKERN_NOPE")


def test_cuda_rows_follow_their_switches(monkeypatch):
    """The CUDA rows are selected like the CPU ones (no GPU needed to walk the table)."""
    q = kernels.Query("qgemm", "cuda", 4, 16, torch.float16, 256, 256, torch.device("cpu"))
    assert kernels.select(q).kernel.name == "cuda_mma"
    assert kernels.select(kernels.Query("qgemm", "cuda", 4, 4, torch.float16, 256, 256)).kernel.name == "cuda_gemv"
    assert kernels.select(kernels.Query("qgemm", "cuda", 4, 16, torch.float32, 256, 256)).kernel.name \
        == "cuda_dequant_matmul"
    assert kernels.select(kernels.Query("qgemm", "cuda", 4, 4, torch.float16, 256, 250)).kernel.name \
        == "cuda_dequant_linear"
    monkeypatch.setenv("QUANTKERN_CUDA_MMA", "0")
    sel = kernels.select(q)
    assert sel.kernel.name == "cuda_dequant_matmul"
    assert dict((k.name, w) for k, w in sel.skipped)["cuda_mma"] == "turned off by QUANTKERN_CUDA_MMA='0'"
    monkeypatch.setenv("QUANTKERN_CUDA_GEMV_MAX_BATCH", "32")
    assert kernels.select(q).kernel.name == "cuda_gemv"


@needs_cpu
def test_inspect_kernels_cli(tmp_path, capsys, clean_env):
    from driver_tiny import tiny_llama

    from quantkern import cli

    q, _ = quantkern.quantize_model(tiny_llama(), None, QuantSpec(bits=3, group_size=32), method="rtn",
                                    progress=False)
    out = quantkern.save_quantized(q, tmp_path / "ck")
    clean_env.setenv("QUANTKERN_NO_AVX2", "1")
    assert cli.main(["inspect", "--kernels", str(out)]) == 0
    text = capsys.readouterr().out
    assert "== 1 token(s) ==" in text and "== 128 token(s) ==" in text
    assert "qgemm on cpu: qgemm_gemv_generic" in text and "qgemm on cpu: qgemm_panel_generic" in text
    assert "turned off by QUANTKERN_NO_AVX2=1" in text


def _old_path0(bits, B, kpad, hw):
    """The choice csrc/cpu/qgemm.cpp made before the table (path 0, no switches), transcribed."""
    avx512 = hw["avx512"]
    if B <= 8:
        if bits == 4 and avx512 and hw["avx512vnni"] and B <= 4:
            return "qgemm_digits_avx512vnni"
        if avx512 and bits in (2, 3) and hw["amx"] and (B > 1 or kpad <= 8192):
            return "qgemm_amx"
        if avx512 and bits in (2, 3) and B <= 2:
            return "qgemm_lut_avx512"
        return "qgemm_gemv_avx512" if avx512 else "qgemm_gemv_avx2"
    return "qgemm_panel_avx512" if avx512 else "qgemm_panel_avx2"


@pytest.mark.parametrize("cpu", ["avx2", "avx512", "avx512vnni", "amx"])
def test_selector_makes_the_old_choices_on_every_isa(clean_env, monkeypatch, cpu):
    """On CPUs this VM does not have (hardware flags simulated): the table picks what the C++ path-0 rule
    picked, for every bit width, batch 1-12 and row width around the AMX bound."""
    levels = ["avx2", "avx512", "avx512vnni", "amx"]
    hw = {"generic": True, **{lv: levels.index(lv) <= levels.index(cpu) for lv in levels}}
    compiled = {k.name: k.isa for k in kernels.TABLE if k.backend == "cpu"}
    monkeypatch.setattr(kernels, "_cpu_hw", lambda: (hw, compiled))
    monkeypatch.setattr(kernels, "_cpu_memo", {})
    for bits in (2, 3, 4, 8):
        for B in range(1, 13):
            for kpad in (320, 8192, 8224):
                assert kernels.cpu_qgemm(bits, B, kpad) == _old_path0(bits, B, kpad, hw), (cpu, bits, B, kpad)
    if cpu in ("avx512vnni", "amx"):
        monkeypatch.setenv("QUANTKERN_CPU_INT8_ACT", "1")
        assert kernels.cpu_qgemm(4, 8, 320) == "qgemm_int8_avx512vnni"
        assert kernels.cpu_qgemm(4, 9, 320) == "qgemm_panel_avx512"
    monkeypatch.setenv("QUANTKERN_NO_AVX512", "1")
    assert kernels.cpu_qgemm(3, 2, 320) == "qgemm_gemv_avx2"
    assert kernels.cpu_solver("gptq_block_solve") == "gptq_block_avx2"


def test_docs_show_every_kernel_and_switch():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "kernels.md").read_text()
    missing = [k.name for k in kernels.TABLE if f"`{k.name}`" not in doc]
    missing += [s for s in switches.SWITCHES if f"`{s}`" not in doc]
    assert not missing, f"docs/kernels.md lacks {missing}"
