"""The qgemm backends for CUDA tensors: "triton" (fused unpack + tl.dot) and "cuda" (compiled kernels).

Both use the GPU layout of quantkern/formats/gpu_native.py, built once in prepare() on the tensors'
device. The CUDA backend runs, per call, the kernel quantkern.kernels selects (its table, in order):
- cuda_gemv: up to `QUANTKERN_CUDA_GEMV_MAX_BATCH` activation rows (default 8): the fp32-FMA GEMV;
- cuda_mma: up to `QUANTKERN_CUDA_MMA_MAX_BATCH` rows (default 128), fp16/bf16 activations, bits 2/3/4,
  a GPU of compute capability >= 8.0, unless QUANTKERN_CUDA_MMA=0: the fused tensor-core dequant GEMM
  (`gpu_qgemm_mma`: cp.async-staged packed tiles, mma.sync m16n8k16);
- cuda_dequant_matmul otherwise: W^T dequantized to the activation dtype by a CUDA kernel and torch's
  matmul (fp32 keeps fp32 accuracy). The fused kernel dequantizes W once per row tile of at most 64
  activation rows, so its cost grows with the batch; on an H100 it ties dequant + matmul at batch 128
  and loses at 300 (docs/gpu.md);
- cuda_dequant_linear where out_features is not a multiple of 4 (the kernels read 4 output columns per
  16-byte load): dequantize in torch and F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..formats import gpu_native
from .qgemm import register_qgemm_backend


def gemv_max_batch() -> int:
    return kernels.BY_NAME["cuda_gemv"].max_batch()


def mma_max_batch() -> int:
    return kernels.BY_NAME["cuda_mma"].max_batch()


def use_mma(x: torch.Tensor, bits: int) -> bool:
    """The tensor-core GEMM's row of the table applies to x (rows, dtype, bits, GPU, QUANTKERN_CUDA_MMA)."""
    q = kernels.Query("qgemm", "cuda", bits, x.shape[0], x.dtype, x.shape[-1], 0, x.device)
    return kernels.why_not(kernels.BY_NAME["cuda_mma"], q) is None


class TritonQGemm:
    def prepare(self, t: dict, bits: int) -> gpu_native.GpuQWeight:
        return gpu_native.prepare(t, bits)

    def run(self, x: torch.Tensor, prepared: gpu_native.GpuQWeight, bias: torch.Tensor | None) -> torch.Tensor:
        from ..triton import qgemm as triton_qgemm  # lazy: triton is optional

        return triton_qgemm.qgemm(x, prepared, bias)


class CudaQGemm:
    def prepare(self, t: dict, bits: int) -> gpu_native.GpuQWeight:
        return gpu_native.prepare(t, bits)

    def query(self, layout: gpu_native.GpuQWeight, batch: int, dtype: torch.dtype, device) -> kernels.Query:
        p = layout
        return kernels.Query("qgemm", "cuda", p.bits, batch, dtype, p.n, p.m, device)

    def run(self, x: torch.Tensor, prepared: gpu_native.GpuQWeight, bias: torch.Tensor | None) -> torch.Tensor:
        p = prepared
        name = kernels.select(self.query(p, x.numel() // max(p.n, 1), x.dtype, x.device)).kernel.name
        if name == "cuda_dequant_linear":
            w = gpu_native.dequantize(p).to(x.dtype)
            return F.linear(x, w, None if bias is None else bias.to(x.dtype))
        lead = x.shape[:-1]
        x2 = gpu_native.gather_input(x.reshape(-1, p.n), p)
        args = (p.qweight, p.scales, p.zeros, p.g_idx, p.bits, p.group_size)
        if name == "cuda_gemv":
            y = torch.ops.quantkern.gpu_qgemm_gemv(x2, *args, bias)
        elif name == "cuda_mma":
            y = torch.ops.quantkern.gpu_qgemm_mma(x2, *args, bias)
        else:  # cuda_dequant_matmul
            wt = torch.ops.quantkern.gpu_qgemm_dequant_t(*args, x.dtype)
            y = x2 @ wt if bias is None else torch.addmm(bias.to(x.dtype), x2, wt)
        return y.reshape(*lead, p.m)


register_qgemm_backend("triton", TritonQGemm())
register_qgemm_backend("cuda", CudaQGemm())
