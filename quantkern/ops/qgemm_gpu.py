"""The qgemm backends for CUDA tensors: "triton" (fused unpack + tl.dot) and "cuda" (compiled kernels).

Both use the GPU layout of quantkern/formats/gpu_native.py, built once in prepare() on the tensors'
device. The CUDA backend picks, per call:
- up to `QUANTKERN_CUDA_GEMV_MAX_BATCH` activation rows (default 8): the fp32-FMA GEMV kernel;
- above that, up to `QUANTKERN_CUDA_MMA_MAX_BATCH` rows (default 128), fp16/bf16 activations, bits 2/3/4,
  a GPU of compute capability >= 8.0: the fused tensor-core dequant GEMM (`gpu_qgemm_mma`: cp.async-
  staged packed tiles, mma.sync m16n8k16);
- otherwise (larger batches, fp32 activations, 8 bits, pre-sm_80 GPUs, or QUANTKERN_CUDA_MMA=0): W^T
  dequantized to the activation dtype by a CUDA kernel and torch's matmul (fp32 keeps fp32 accuracy).
  The fused kernel dequantizes W once per row tile of at most 64 activation rows, so its cost grows with
  the batch; on an H100 it ties dequant + matmul at batch 128 and loses at 300 (docs/gpu.md).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ..formats import gpu_native
from .qgemm import register_qgemm_backend


def gemv_max_batch() -> int:
    return int(os.environ.get("QUANTKERN_CUDA_GEMV_MAX_BATCH", "8"))


def mma_enabled() -> bool:
    return os.environ.get("QUANTKERN_CUDA_MMA", "1") not in ("0", "")


def mma_max_batch() -> int:
    return int(os.environ.get("QUANTKERN_CUDA_MMA_MAX_BATCH", "128"))


def use_mma(x: torch.Tensor, bits: int) -> bool:
    """The tensor-core GEMM applies: at most mma_max_batch() rows, fp16/bf16 activations, bits 2/3/4,
    compute capability >= 8.0."""
    return (
        mma_enabled()
        and x.shape[0] <= mma_max_batch()
        and x.dtype in (torch.float16, torch.bfloat16)
        and bits in (2, 3, 4)
        and _cc_major(x.device.index) >= 8
    )


@functools.lru_cache(maxsize=None)
def _cc_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


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
        elif use_mma(x2, p.bits):
            y = torch.ops.quantkern.gpu_qgemm_mma(x2, *args, bias)
        else:
            wt = torch.ops.quantkern.gpu_qgemm_dequant_t(*args, x.dtype)
            y = x2 @ wt if bias is None else torch.addmm(bias.to(x.dtype), x2, wt)
        return y.reshape(*lead, p.m)


register_qgemm_backend("triton", TritonQGemm())
register_qgemm_backend("cuda", CudaQGemm())
