"""qgemm on a CUDA GPU: torch fp16 F.linear vs quantkern CUDA (GEMV / tensor-core GEMM / dequant+matmul)
and Triton.

Weights [out, in] = 4096 x 14336 and 14336 x 4096, batch 1 / 8 / 9 / 16 / 32 / 128 / 300, 4/3/2 bits
with group 128. Each case is timed side by side in one process with CUDA events, rotating enough weight
copies (> 256 MB of weights touched per round) that the 50 MB L2 cannot hold them. Effective GB/s
counts the bytes a kernel must read (packed weight + scales + zeros, or the fp16 weight) plus
activations/outputs. Rows: "cuda" (the backend's choice, `path` says which kernel), "cuda_mma" (the
tensor-core GEMM forced), "cuda_gemv_forced", "cuda_dequant_matmul" (the pre-mma large-batch path).

    python benchmarks/bench_qgemm_cuda.py --json benchmarks/results/qgemm_cuda.json [--no-triton]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import machine_info, read_bandwidth_gbs  # noqa: E402

from quantkern import _ext  # noqa: E402
from quantkern.formats import gptq, gpu_native  # noqa: E402
from quantkern.ops import qgemm_gpu  # noqa: E402

SHAPES = ((4096, 14336), (14336, 4096))  # (out m, in n)
BATCHES = (1, 8, 9, 16, 32, 128, 300)
BITS = (4, 3, 2)
GROUP = 128
ROTATE_BYTES = 256 << 20


def random_packed(m: int, n: int, bits: int, gen: torch.Generator) -> dict:
    maxq = (1 << bits) - 1
    G = -(-n // GROUP)
    codes = torch.randint(0, maxq + 1, (m, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(G, m, generator=gen) * 0.01 + 0.001).half().float()
    zeros = torch.randint(1, maxq + 1, (G, m), generator=gen)
    g_idx = (torch.arange(n) // GROUP).to(torch.int32)
    return gptq.pack(codes, scales, zeros, g_idx, bits)


def time_rotating(fn, args_list, iters: int) -> float:
    """Mean ms per call, cycling through args_list (warm-up included, then timed)."""
    for a in args_list:
        fn(*a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        fn(*args_list[i % len(args_list)])
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--bits", type=int, nargs="+", default=list(BITS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_qgemm_cuda: no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    has_cuda = _ext.has_cuda_kernels()
    if not has_cuda:
        print(f"bench_qgemm_cuda: extension has no CUDA kernels ({_ext.build_info() or _ext.LOAD_ERROR}); Triton only")
    use_triton = not args.no_triton
    if use_triton:
        from quantkern.triton import qgemm as triton_qgemm
    cuda_backend = qgemm_gpu.CudaQGemm()
    gen = torch.Generator().manual_seed(0)
    dev = torch.device("cuda")
    results = []

    def record(**kw):
        results.append(kw)
        print(json.dumps(kw), flush=True)

    def cuda_path(batch: int, bits: int) -> str:
        if batch <= qgemm_gpu.gemv_max_batch():
            return "gemv"
        return "mma" if qgemm_gpu.use_mma(torch.empty(1, device=dev, dtype=torch.float16), bits) else "dequant_matmul"

    def dequant_matmul(x_, p_):
        return x_ @ torch.ops.quantkern.gpu_qgemm_dequant_t(
            p_.qweight, p_.scales, p_.zeros, p_.g_idx, p_.bits, p_.group_size, x_.dtype)

    def mma(x_, p_):
        return torch.ops.quantkern.gpu_qgemm_mma(x_, p_.qweight, p_.scales, p_.zeros, p_.g_idx, p_.bits, p_.group_size)

    def gemv(x_, p_):
        return torch.ops.quantkern.gpu_qgemm_gemv(x_, p_.qweight, p_.scales, p_.zeros, p_.g_idx, p_.bits, p_.group_size)

    for m, n in SHAPES:
        w16_bytes = m * n * 2
        ncopy16 = max(2, -(-ROTATE_BYTES // w16_bytes))
        w16 = [torch.randn(m, n, device=dev, dtype=torch.float16) * 0.02 for _ in range(ncopy16)]
        xs = {b: torch.randn(b, n, device=dev, dtype=torch.float16) for b in args.batches}
        base = {}
        for batch in args.batches:
            ms = time_rotating(F.linear, [(xs[batch], w) for w in w16], args.iters)
            base[batch] = ms
            record(shape=[m, n], batch=batch, bits=16, impl="torch_fp16_linear", ms=ms,
                   gbps=(w16_bytes + batch * (n + m) * 2) / ms / 1e6, speedup_vs_fp16=1.0)
        del w16
        torch.cuda.empty_cache()
        for bits in args.bits:
            t = random_packed(m, n, bits, gen)
            p0 = gpu_native.prepare(t, bits, device=dev)
            qbytes = p0.qweight.numel() * 4 + p0.scales.numel() * 2 + p0.zeros.numel()
            ncopy = max(2, -(-ROTATE_BYTES // qbytes))
            ps = [p0] + [gpu_native.GpuQWeight(**{**p0.__dict__, "qweight": p0.qweight.clone()})
                         for _ in range(ncopy - 1)]
            for batch in args.batches:
                x = xs[batch]
                io_bytes = batch * (n + m) * 2
                impls = []
                if has_cuda:
                    impls.append(("cuda", lambda x_, p_: cuda_backend.run(x_, p_, None)))
                    if batch > 1:
                        impls.append(("cuda_mma", mma))
                    impls.append(("cuda_dequant_matmul", dequant_matmul))
                    if 8 < batch <= 32:
                        impls.append(("cuda_gemv_forced", gemv))
                    if batch in (16, 128):  # split-K target sweep (default 2 CTAs per SM), read per call
                        for bpsm in (1, 4):
                            impls.append((f"cuda_mma_bpsm{bpsm}", mma, {"QUANTKERN_CUDA_MMA_BLOCKS_PER_SM": str(bpsm)}))
                if use_triton:
                    impls.append(("triton", lambda x_, p_: triton_qgemm.qgemm(x_, p_, None)))
                for name, fn, *env in impls:
                    t0 = time.time()
                    saved = {k: os.environ.get(k) for k in (env[0] if env else {})}
                    os.environ.update(env[0] if env else {})
                    try:
                        ms = time_rotating(fn, [(x, p) for p in ps], args.iters)
                    except Exception as exc:  # report, keep going
                        record(shape=[m, n], batch=batch, bits=bits, impl=name, error=f"{type(exc).__name__}: {exc}")
                        continue
                    finally:
                        for k, v in saved.items():
                            if v is None:
                                os.environ.pop(k, None)
                            else:
                                os.environ[k] = v
                    extra = {"path": cuda_path(batch, bits)} if name == "cuda" else {}
                    record(shape=[m, n], batch=batch, bits=bits, impl=name, ms=ms,
                           gbps=(qbytes + io_bytes) / ms / 1e6, speedup_vs_fp16=base[batch] / ms,
                           wall_s=round(time.time() - t0, 1), **extra)
            del ps, p0
            torch.cuda.empty_cache()
        del xs

    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "build_info": _ext.build_info(),
        "iters": args.iters,
        "rotate_bytes": ROTATE_BYTES,
        "group_size": GROUP,
        "batches": args.batches,
        "note": "fp16 activations; CUDA events; weights rotated to defeat L2",
        "machine": machine_info(contended=False),  # the host; a borrowed GPU runs alone
        "gpu_read_bandwidth": read_bandwidth_gbs(device="cuda"),
    }
    print("shape        batch bits impl                  us    x_fp16 path")
    for r in results:
        if "ms" in r:
            print(f"{r['shape'][0]}x{r['shape'][1]:<6} {r['batch']:>4} {r['bits']:>4} {r['impl']:<20} {r['ms'] * 1e3:7.1f} "
                  f"{r['speedup_vs_fp16']:6.2f} {r.get('path', '')}")
        else:
            print(f"{r['shape'][0]}x{r['shape'][1]:<6} {r['batch']:>4} {r['bits']:>4} {r['impl']:<20} ERROR {r['error'][:80]}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
