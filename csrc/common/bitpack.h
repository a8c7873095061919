// The GPTQ word layout for every bit width (see quantkern/formats/bitstream.py, the reference).
// A packed column is a little-endian bit stream: code j sits at bits [j*bits, (j+1)*bits), split
// into 32-bit words; 32 codes make one chunk of `bits` words. At 3 bits codes 10 and 21 straddle
// words, exactly as GPTQ-for-LLaMa's 3-word layout. A column of n codes takes ceil(n*bits/32) words. `stride` is the distance between consecutive
// words of one column (the number of columns m for qweight [rows, m]).
#pragma once
#include "macros.h"

namespace qk {

QK_HD bool supported_bits(int64_t bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

constexpr int kCodesPerChunk = 32;

QK_HD int64_t packed_rows(int64_t n, int64_t bits) { return (n * bits + 31) / 32; }

// Code j (0..31) of one chunk whose words are words[0], words[stride], ...
QK_HD uint32_t get_code(const uint32_t* words, int64_t stride, int j, int bits) {
  const int pos = j * bits, w = pos >> 5, off = pos & 31;
  uint32_t v = words[w * stride] >> off;
  if (off + bits > 32) v |= words[(w + 1) * stride] << (32 - off);
  return v & ((1u << bits) - 1u);
}

// OR code v (already < 2^bits) into position j of a zero-initialised chunk.
QK_HD void put_code(uint32_t* words, int64_t stride, int j, int bits, uint32_t v) {
  const int pos = j * bits, w = pos >> 5, off = pos & 31;
  words[w * stride] |= v << off;
  if (off + bits > 32) words[(w + 1) * stride] |= v >> (32 - off);
}

// Zero point stored in a GPTQ v1 qzeros word stream (zero - 1) -> true zero point.
QK_HD int32_t v1_zero(uint32_t stored) { return static_cast<int32_t>(stored) + 1; }

}  // namespace qk
