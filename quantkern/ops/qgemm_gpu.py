"""The qgemm backends for CUDA tensors: "triton" (fused unpack + tl.dot) and "cuda" (compiled kernels).

Both use the GPU layout of quantkern/formats/gpu_native.py, built once in prepare() on the tensors'
device. The CUDA backend runs its GEMV kernel for up to `QUANTKERN_CUDA_GEMV_MAX_BATCH` activation rows
(default 8) and above that dequantizes W^T to the activation dtype with a CUDA kernel and lets torch's
matmul do the GEMM (exllama's pragmatic switch: at large batch the GEMM is compute bound and a dense
tensor-core GEMM wins over a fused dequant kernel that re-reads the packed weight per row tile).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..formats import gpu_native
from .qgemm import register_qgemm_backend


def gemv_max_batch() -> int:
    return int(os.environ.get("QUANTKERN_CUDA_GEMV_MAX_BATCH", "8"))


class TritonQGemm:
    def prepare(self, t: dict, bits: int) -> gpu_native.GpuQWeight:
        return gpu_native.prepare(t, bits)

    def run(self, x: torch.Tensor, prepared: gpu_native.GpuQWeight, bias: torch.Tensor | None) -> torch.Tensor:
        from ..triton import qgemm as triton_qgemm  # lazy: triton is optional

        return triton_qgemm.qgemm(x, prepared, bias)


class CudaQGemm:
    def prepare(self, t: dict, bits: int) -> gpu_native.GpuQWeight:
        return gpu_native.prepare(t, bits)

    def run(self, x: torch.Tensor, prepared: gpu_native.GpuQWeight, bias: torch.Tensor | None) -> torch.Tensor:
        p = prepared
        if p.m % 4 != 0:  # the kernels read 4 output columns per 16-byte load
            w = gpu_native.dequantize(p).to(x.dtype)
            return F.linear(x, w, None if bias is None else bias.to(x.dtype))
        lead = x.shape[:-1]
        x2 = gpu_native.gather_input(x.reshape(-1, p.n), p)
        args = (p.qweight, p.scales, p.zeros, p.g_idx, p.bits, p.group_size)
        if x2.shape[0] <= gemv_max_batch():
            y = torch.ops.quantkern.gpu_qgemm_gemv(x2, *args, bias)
        else:
            wt = torch.ops.quantkern.gpu_qgemm_dequant_t(*args, x.dtype)
            y = x2 @ wt if bias is None else torch.addmm(bias.to(x.dtype), x2, wt)
        return y.reshape(*lead, p.m)


register_qgemm_backend("triton", TritonQGemm())
register_qgemm_backend("cuda", CudaQGemm())
