// Helpers shared by the AVX-512 qgemm files (qgemm_avx512.cpp, qgemm_amx.cpp). Include it after the
// file's `#pragma GCC target(...)`, which must enable at least avx512f/bw/vl/dq: the helpers compile
// under the including file's ISA and have internal linkage there.
#pragma once
#include <immintrin.h>

#include "qgemm_kernels.h"

namespace qk::cpu::qgemm {
namespace {

// y[b] (+ bias) -> out rows of one tile; rows >= m (padding) are not written.
inline void store_tile(const Layout& L, int64_t tile, int B, const __m512* y, const float* bias, float* out,
                       int64_t ldo) {
  const int64_t r0 = tile * kTileRows;
  const int64_t valid = L.m - r0 < kTileRows ? L.m - r0 : kTileRows;
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + r0) : _mm512_setzero_ps();
  for (int b = 0; b < B; ++b) _mm512_mask_storeu_ps(out + b * ldo + r0, mask, _mm512_add_ps(y[b], bv));
}

// 16 fp16 values (scales, zero points) as floats
inline __m512 load_half(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Groups whose scale lines (one 64-byte line per tile and group, a short stream of its own per tile)
// are prefetched ahead: on 14336x4096 (32 groups per tile) this took the AMX GEMV from 63% to 70% of
// the read reference at 2 bits (the LUT GEMV from 59% to 63-66%).
constexpr int kScaleAhead = 4;

// x as balanced base-128 digits (the int8 x of the VNNI and AMX paths): returns v's lowest digit, in
// [-64, 63], and leaves (v - digit) / 128 in v.
inline __m512i pop_digit(__m512i& v) {
  const __m512i half = _mm512_set1_epi32(64), low7 = _mm512_set1_epi32(127);
  const __m512i d = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, half), low7), half);
  v = _mm512_srai_epi32(_mm512_sub_epi32(v, d), 7);
  return d;
}

}  // namespace
}  // namespace qk::cpu::qgemm
