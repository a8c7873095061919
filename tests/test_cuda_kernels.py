"""CUDA and Triton qgemm on CUDA tensors vs the reference (gptq.dequantize + F.linear in fp32).

Skipped without a CUDA device. Covers bits 2/3/4 (+8 for CUDA), groups per-channel/32/128/ragged/
act-order/uneven, sym/asym, batch 1/3/17/128 (GEMV, tensor-core GEMM for fp16/bf16 at batch > 8,
dequant+matmul for fp32 and 8 bits), fp16/bf16/fp32; the tensor-core GEMM alone at batch 9/17/128/300.
Tolerances (relative Frobenius error): fp32 1e-5 (fp32 GEMV; torch matmul with TF32 off), fp16 1e-2,
bf16 2e-2 (activation rounding to bf16 alone costs ~4e-3).
Run on a GPU machine:  python -m pytest tests/test_cuda_kernels.py -q
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from quantkern import _ext
from quantkern.formats import gptq, gpu_native
from quantkern.ops import qgemm as qgemm_op
from quantkern.ops import qgemm_gpu
from gpu_cases import GROUPINGS, make_packed, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible (these tests need a GPU)")

# fixed Triton tiles: autotuning every constexpr combination would take minutes of compiles
os.environ.setdefault("QUANTKERN_TRITON_AUTOTUNE", "0")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BATCHES = (1, 3, 17, 128)


def _need_cuda_kernels():
    if not _ext.has_cuda_kernels():
        pytest.skip(f"extension has no CUDA kernels (build info: {_ext.build_info() or _ext.LOAD_ERROR})")


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except Exception:
        return False


def _case(bits, grouping, sym, m=256, n=576, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = make_packed(m, n, bits, grouping, sym, gen)
    W = gptq.dequantize(t, bits).cuda()
    return {k: v.cuda() for k, v in t.items()}, W, gen


def _check(backend, t, W, bits, gen, batches=BATCHES, dtypes=DTYPES):
    torch.backends.cuda.matmul.allow_tf32 = False
    p = qgemm_op.prepare(t, bits, backend=backend)
    m, n = W.shape
    for batch in batches:
        x = torch.randn(batch, n, generator=gen).cuda()
        bias = torch.randn(m, generator=gen).cuda()
        for dt in dtypes:
            xd, bd = x.to(dt), bias.to(dt)
            ref = F.linear(xd.float(), W, bd.float())
            y = qgemm_op.qgemm(xd, None, bits, bias=bd, prepared=p)
            torch.cuda.synchronize()
            assert y.dtype == dt and y.shape == (batch, m)
            assert torch.isfinite(y).all(), (backend, batch, dt)
            err = rel_err(y, ref)
            assert err < TOL[dt], (backend, bits, batch, dt, err)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("sym", [True, False])
def test_cuda_qgemm(bits, grouping, sym):
    _need_cuda_kernels()
    t, W, gen = _case(bits, grouping, sym, seed=bits * 100 + GROUPINGS.index(grouping) * 2 + sym)
    _check("cuda", t, W, bits, gen)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("sym", [True, False])
def test_triton_qgemm_cuda(bits, grouping, sym):
    if not _triton_ok():
        pytest.skip("triton not importable")
    t, W, gen = _case(bits, grouping, sym, seed=7 + bits * 100 + GROUPINGS.index(grouping) * 2 + sym)
    _check("triton", t, W, bits, gen)


def test_cuda_ops_direct_bit_exact_dequant():
    """gpu_qgemm_dequant_t on CUDA == the CPU implementation of the same header logic == the reference."""
    _need_cuda_kernels()
    gen = torch.Generator().manual_seed(11)
    for bits in (2, 3, 4, 8):
        for grouping in GROUPINGS:
            t = make_packed(64, 300, bits, grouping, False, gen)
            p = gpu_native.prepare(t, bits)
            W = gptq.dequantize(t, bits)
            Wk = W if p.perm is None else W[:, p.perm]
            pc = p.to("cuda")
            got = torch.ops.quantkern.gpu_qgemm_dequant_t(
                pc.qweight, pc.scales, pc.zeros, pc.g_idx, bits, pc.group_size, torch.float32
            ).cpu()
            assert torch.equal(got, Wk.t()), (bits, grouping)


def test_cuda_gemv_large_shape_split_k():
    """A real-size layer: many split-K blocks (last-block reduction), batch tiles of 8, repeated calls
    (the arrival counters must re-arm), bias, and bit-identical results from call to call."""
    _need_cuda_kernels()
    gen = torch.Generator().manual_seed(12)
    t = make_packed(4096, 2048, 4, "g128", True, gen)
    p = gpu_native.prepare(t, 4, device="cuda")
    W = gptq.dequantize(t, 4).cuda()
    bias = torch.randn(4096, generator=gen).cuda()
    for batch in (1, 2, 5, 8, 13):
        x = torch.randn(batch, 2048, generator=gen).cuda()
        y = torch.ops.quantkern.gpu_qgemm_gemv(x, p.qweight, p.scales, p.zeros, p.g_idx, 4, p.group_size, bias)
        y2 = torch.ops.quantkern.gpu_qgemm_gemv(x, p.qweight, p.scales, p.zeros, p.g_idx, 4, p.group_size, bias)
        assert torch.isfinite(y).all()
        assert torch.equal(y, y2)
        assert rel_err(y, F.linear(x, W, bias)) < 1e-5


_BAD_INPUT_SCRIPT = r"""
import torch, quantkern
from quantkern.formats import gpu_native
import sys; sys.path.insert(0, "tests")
from gpu_cases import make_packed
p = gpu_native.prepare(make_packed(64, 64, 4, "g32", True, torch.Generator().manual_seed(13)), 4, device="cuda")
args = (p.qweight, p.scales, p.zeros, p.g_idx)
ops = torch.ops.quantkern
cases = ((ops.gpu_qgemm_gemv, torch.randn(2, 63, device="cuda"), 4, "x must be"),
         (ops.gpu_qgemm_gemv, torch.randn(2, 64, device="cuda"), 5, "bits must be"),
         (ops.gpu_qgemm_mma, torch.randn(9, 64, device="cuda"), 4, "float16 or bfloat16"),
         (ops.gpu_qgemm_mma, torch.randn(9, 64, device="cuda").half(), 8, "rows, expected"),
         (ops.gpu_qgemm_mma, torch.randn(9, 60, device="cuda").half(), 4, "x must be"))
for fn, x, bits, want in cases:
    try:
        fn(x, *args, bits, 32)
    except RuntimeError as e:
        assert want in str(e), str(e)
    else:
        raise AssertionError("no error for " + want)
print("OK")
"""


def test_cuda_rejects_bad_input():
    """Run in a subprocess: on a machine whose toolchain breaks C++ exceptions thrown from the extension
    (seen on the borrowed H100 image: any TORCH_CHECK failure, CPU ops included, segfaulted), this test
    fails with that diagnosis instead of killing the whole pytest session."""
    _need_cuda_kernels()
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _BAD_INPUT_SCRIPT], cwd=root, capture_output=True, text=True, timeout=300)
    if r.returncode < 0:
        pytest.fail(f"the process died with signal {-r.returncode} while the extension raised a C++ error "
                    "(TORCH_CHECK); exceptions thrown from this build crash: check the compiler/libstdc++ "
                    "the extension was built with")
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


# ---- the tensor-core dequant GEMM (gpu_qgemm_mma, sm_80+) ---------------------------------------
MMA_GROUPINGS = GROUPINGS + ("g64",)
MMA_BATCHES = (9, 17, 128, 300)  # 1, 2 and 4 m16 tiles per CTA; 300: several row tiles, a partial one


def _need_mma():
    _need_cuda_kernels()
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tensor-core kernel needs compute capability >= 8.0")


def _poisoned_call(fn, nbytes):
    """Run fn right after freeing a NaN-filled block of nbytes, which the caching allocator hands to
    fn's output: an output element the kernel forgets to write stays NaN."""
    junk = torch.full((nbytes // 4 + 1,), float("nan"), device="cuda")
    del junk
    return fn()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("grouping", MMA_GROUPINGS)
def test_cuda_mma_vs_reference(bits, grouping):
    """Ragged m (200: a partial 128-column tile), n (200/328: aligned rows with a partial last chunk whose
    high words do not exist; 300: unaligned rows, staged padded copy), every batch tile size, fp16 and
    bf16, bias, poisoned outputs; relative error vs the fp32 reference < 1e-2 (bf16: 2e-2, the activation
    rounding alone costs ~4e-3), and vs the same operands rounded to x's dtype < 1e-3 (bf16: 4e-3)."""
    _need_mma()
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(300 + 10 * bits + MMA_GROUPINGS.index(grouping))
    for n in (200, 300, 328):  # 200: one split-K range (direct epilogue); 300/328: two (workspace reduction)
        t = make_packed(200, n, bits, grouping, sym=bool(n % 3), gen=gen)
        W = gptq.dequantize(t, bits).cuda()
        pq = qgemm_op.prepare({k: v.cuda() for k, v in t.items()}, bits, backend="cuda")
        p = pq.layout  # the GpuQWeight
        for batch in MMA_BATCHES:
            x = torch.randn(batch, n, generator=gen).cuda()
            bias = torch.randn(200, generator=gen).cuda()
            for dt in (torch.float16, torch.bfloat16):
                xd, bd = x.to(dt), bias.to(dt)
                xk = gpu_native.gather_input(xd, p)
                y = _poisoned_call(lambda: torch.ops.quantkern.gpu_qgemm_mma(
                    xk, p.qweight, p.scales, p.zeros, p.g_idx, bits, p.group_size, bd), batch * 200 * 2)
                torch.cuda.synchronize()
                assert y.dtype == dt and y.shape == (batch, 200)
                assert torch.isfinite(y).all(), (bits, grouping, n, batch, dt, "unwritten or non-finite outputs")
                err = rel_err(y, F.linear(xd.float(), W, bd.float()))
                assert err < TOL[dt], (bits, grouping, n, batch, dt, err)
                exact = F.linear(xd.float(), W.to(dt).float(), bd.float())
                tol_exact = 4e-3 if dt == torch.bfloat16 else 1e-3  # fp32 sums, one output rounding
                assert rel_err(y, exact) < tol_exact, (bits, grouping, n, batch, dt, rel_err(y, exact))
                # the backend's dispatch runs the same kernel between the GEMV and the MMA batch limits
                y2 = qgemm_op.qgemm(xd, None, bits, bias=bd, prepared=pq)
                if batch <= qgemm_gpu.mma_max_batch():
                    assert torch.equal(y2, y), (bits, grouping, n, batch, dt)
                else:  # dequant + torch matmul
                    assert rel_err(y2, F.linear(xd.float(), W, bd.float())) < TOL[dt], (bits, grouping, n, batch, dt)


def test_cuda_mma_matches_cpu_emulation():
    """The CUDA kernel vs its fragment-level CPU emulation (same op, CPU key): same operands, only the
    fp32 summation order differs."""
    _need_mma()
    gen = torch.Generator().manual_seed(77)
    for bits, grouping in ((3, "actorder"), (4, "g128"), (2, "uneven")):
        t = make_packed(72, 200, bits, grouping, True, gen)
        p = gpu_native.prepare(t, bits)
        x = torch.randn(33, 200, generator=gen).half()
        xk = gpu_native.gather_input(x, p)
        cpu = torch.ops.quantkern.gpu_qgemm_mma(xk, p.qweight, p.scales, p.zeros, p.g_idx, bits, p.group_size)
        pc = p.to("cuda")
        gpu = torch.ops.quantkern.gpu_qgemm_mma(xk.cuda(), pc.qweight, pc.scales, pc.zeros, pc.g_idx, bits, pc.group_size)
        assert rel_err(gpu.cpu(), cpu) < 2e-3, (bits, grouping)


def test_cuda_mma_large_shape_split_k():
    """Real-size layers: several split-K CTAs per tile (last-CTA reduction), repeated calls (the arrival
    counters must re-arm; bit-identical results), interleaved with GEMV calls sharing the counters."""
    _need_mma()
    gen = torch.Generator().manual_seed(78)
    for m, n, bits in ((4096, 2048, 4), (1024, 4096, 3)):
        t = make_packed(m, n, bits, "g128", False, gen)
        p = gpu_native.prepare(t, bits, device="cuda")
        W = gptq.dequantize(t, bits).cuda()
        args = (p.qweight, p.scales, p.zeros, p.g_idx, bits, p.group_size)
        bias = torch.randn(m, generator=gen).cuda().half()
        for batch in (9, 16, 40, 128, 300):
            x = torch.randn(batch, n, generator=gen).cuda().half()
            y = _poisoned_call(lambda: torch.ops.quantkern.gpu_qgemm_mma(x, *args, bias), batch * m * 2)
            torch.ops.quantkern.gpu_qgemm_gemv(x[:3], *args, bias)
            y2 = torch.ops.quantkern.gpu_qgemm_mma(x, *args, bias)
            assert torch.isfinite(y).all()
            assert torch.equal(y, y2), (m, n, batch)
            assert rel_err(y, F.linear(x.float(), W, bias.float())) < 1e-2, (m, n, batch)


def test_cuda_mma_dispatch():
    """Backend choice: GEMV up to QUANTKERN_CUDA_GEMV_MAX_BATCH, the tensor-core kernel above for
    fp16/bf16 and bits 2-4, dequant + matmul for fp32 and 8 bits (fp32 keeps fp32 accuracy)."""
    _need_mma()
    from quantkern.ops import qgemm_gpu

    t, W, gen = _case(4, "g32", True, m=64, n=128, seed=80)
    pq = qgemm_op.prepare(t, 4, backend="cuda")
    p = pq.layout
    x = torch.randn(12, 128, generator=gen).cuda()
    args = (p.qweight, p.scales, p.zeros, p.g_idx, 4, p.group_size)
    assert qgemm_gpu.use_mma(x.half(), 4) and not qgemm_gpu.use_mma(x, 4) and not qgemm_gpu.use_mma(x.half(), 8)
    big = torch.randn(qgemm_gpu.mma_max_batch() + 1, 128, generator=gen).cuda().half()
    assert not qgemm_gpu.use_mma(big, 4)  # large batches: dequant + torch matmul
    assert rel_err(qgemm_op.qgemm(big, None, 4, prepared=pq).float(), F.linear(big.float(), W)) < 1e-2
    assert torch.equal(qgemm_op.qgemm(x.half(), None, 4, prepared=pq), torch.ops.quantkern.gpu_qgemm_mma(x.half(), *args))
    y32 = qgemm_op.qgemm(x, None, 4, prepared=pq)
    assert rel_err(y32, F.linear(x, W)) < 1e-5


def test_cuda_odd_out_features_fall_back():
    """m % 4 != 0: the CUDA backend falls back to a dense dequantize (still correct)."""
    _need_cuda_kernels()
    t, W, gen = _case(4, "g32", True, m=30, n=64, seed=14)
    _check("cuda", t, W, 4, gen, batches=(1, 9), dtypes=(torch.float32,))


# ---- gptq_block_solve on CUDA (CUDA kernel and Triton) vs the reference on CPU --------------------
SOLVE_CASES = [  # m, n, group_size, blocksize, bits, sym
    (37, 70, 16, 32, 3, True),
    (50, 100, -1, 32, 4, False),
    (40, 130, 48, 64, 2, False),
    (17, 129, 128, 128, 4, True),
    (96, 300, 128, 128, 3, False),
    (9, 41, 7, 16, 8, False),
]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("m,n,G,B,bits,sym", SOLVE_CASES)
@pytest.mark.parametrize("dynamic,with_p", [(False, False), (True, False), (True, True)])
def test_block_solve_on_cuda(backend, m, n, G, B, bits, sym, dynamic, with_p):
    from quantkern import QuantSpec, grid
    from quantkern.ops import solver as S
    from solver_problems import correlated, factor

    if backend == "cuda":
        _need_cuda_kernels()
    elif not _triton_ok():
        pytest.skip("triton not importable")
    W, H, D = correlated(m, n, seed=m * n + bits)
    _, U = factor(H)
    gidx = (torch.arange(n) // (G if G > 0 else n)).to(torch.int32)
    scales, zeros = grid.group_params(W, QuantSpec(bits=bits, group_size=G, sym=sym), gidx)
    P = 0.25 * torch.triu(D @ U.t(), 1) @ U if with_p else None
    ref = S.gptq_block_solve(W, U, P, gidx, scales, zeros, bits, sym, dynamic, B, backend="reference")
    c = lambda t: None if t is None else t.cuda()  # noqa: E731
    out = S.gptq_block_solve(c(W), c(U), c(P), c(gidx), c(scales), c(zeros), bits, sym, dynamic, B, backend=backend)
    codes, sc, ze, loss = (t.cpu() for t in out)
    assert (codes != ref[0]).float().mean().item() < 1e-3
    assert abs(loss.sum().item() - ref[3].sum().item()) <= 1e-4 * abs(ref[3].sum().item()) + 1e-9
    assert torch.equal(sc, ref[1]) and torch.equal(ze, ref[2])
    assert int(codes.max()) <= (1 << bits) - 1
