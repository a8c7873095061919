"""Kernel-native weight layouts, built once at load from the GPTQ v1 tensors (never stored on disk).

CPU layout (csrc/cpu/qgemm_kernels.h has the bit-level description; csrc/cpu/repack.cpp builds it):
  * rows in tiles of 16 (one AVX-512 vector), each row a lane, so one load feeds 16 output rows;
  * input channels sorted by group once (act-order costs a gather of x per call, never a g_idx lookup
    in the inner loop) and each group padded to k-blocks of 32 channels;
  * 3-bit stored planar (2 + 1 bits) so no code straddles a word;
  * per group and row a scale and zero point in fp16 (exact: GPTQ scales are fp16, zeros small integers).
"""
from __future__ import annotations

import dataclasses

import torch

from . import gptq


@dataclasses.dataclass(frozen=True)
class CpuLayout:
    bits: int
    m: int  # out features
    n: int  # in features
    qw: torch.Tensor  # int32 [tiles, kblocks, bits, 16]
    sc: torch.Tensor  # fp16 [tiles, G, 2, 16]: scale, zero point
    kb_start: torch.Tensor  # int32 [G + 1]
    x_index: torch.Tensor  # int32 [kblocks * 32]: input channel of each native position, -1 = padding

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qw, self.sc, self.kb_start, self.x_index))


def cpu_layout(t: dict, bits: int) -> CpuLayout:
    """Repack GPTQ v1 tensors (on the CPU) into the CPU kernels' layout (threaded C++)."""
    m, n, _ = gptq.check_tensors(t, bits)
    for k in gptq.TENSOR_NAMES:
        if t[k].device.type != "cpu":
            raise ValueError(f"cpu_layout: {k} is on {t[k].device}; the CPU layout needs CPU tensors")
    qw, sc, kb_start, x_index = torch.ops.quantkern.qgemm_repack(
        t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits
    )
    return CpuLayout(bits, m, n, qw, sc, kb_start, x_index)
