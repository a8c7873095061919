"""Reference bit packing along dim 0, shared by every bit width.

Each column of a packed int32 tensor is a little-endian bit stream: code j of the column sits at bits
[j*bits, (j+1)*bits) of the stream, split into 32-bit words. For 2/4/8 bits no code straddles a word;
for 3 bits this is exactly GPTQ's 3-words-per-32-codes layout (codes 10 and 21 straddle). n is padded
with zero codes to a multiple of 32, so a column of n codes takes ceil(n/32)*bits words.
This file is the ground truth; csrc/common/bitpack.h implements the same rule for C++/CUDA.
"""
from __future__ import annotations

import torch

CODES_PER_CHUNK = 32  # one chunk = 32 codes = `bits` words, for every bit width


def packed_rows(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def pack_dim0(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes int [n, m] with values in [0, 2^bits) -> int32 [packed_rows(n, bits), m]."""
    n, m = codes.shape
    chunks = -(-n // CODES_PER_CHUNK)
    c = torch.zeros(chunks * CODES_PER_CHUNK, m, dtype=torch.int64, device=codes.device)
    c[:n] = codes.to(torch.int64)
    c = c.view(chunks, CODES_PER_CHUNK, m)
    words = torch.zeros(chunks, bits, m, dtype=torch.int64, device=codes.device)
    for j in range(CODES_PER_CHUNK):
        word, off = divmod(j * bits, 32)
        words[:, word] |= (c[:, j] << off) & 0xFFFFFFFF
        if off + bits > 32:  # the code straddles into the next word
            words[:, word + 1] |= c[:, j] >> (32 - off)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.view(chunks * bits, m)[: packed_rows(n, bits)].to(torch.int32)


def unpack_dim0(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 [packed_rows(n, bits), m] -> codes uint8 [n, m]."""
    rows, m = packed.shape
    if rows != packed_rows(n, bits):
        raise ValueError(f"packed tensor has {rows} rows, expected {packed_rows(n, bits)} for n={n} at {bits} bits")
    chunks = -(-n // CODES_PER_CHUNK)
    words = torch.zeros(chunks * bits, m, dtype=torch.int64, device=packed.device)
    words[:rows] = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.view(chunks, bits, m)
    mask = (1 << bits) - 1
    out = torch.empty(chunks, CODES_PER_CHUNK, m, dtype=torch.int64, device=packed.device)
    for j in range(CODES_PER_CHUNK):
        word, off = divmod(j * bits, 32)
        v = words[:, word] >> off
        if off + bits > 32:
            v = v | (words[:, word + 1] << (32 - off))
        out[:, j] = v & mask
    return out.view(chunks * CODES_PER_CHUNK, m)[:n].to(torch.uint8)
