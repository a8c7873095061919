// AVX2+FMA qgemm kernels (the baseline): a 16-row tile is two 8-lane halves. No ATen here.
// Compiled only where the baseline flags include AVX2 + FMA + F16C (see QK_AVX2 in cpu_features.h);
// elsewhere qgemm_generic.cpp's scalar kernels stand in.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#include "qgemm_kernels.h"

namespace qk::cpu::qgemm {
namespace {

// 8 fp16 values (scales, zero points) as floats (F16C)
inline __m256 load_half(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Code p (0..31) of one half-tile k-block as floats; w = that half's words.
template <int BITS>
inline __m256 code_at(const __m256i* w, int p) {
  if constexpr (BITS == 2 || BITS == 3) {  // bit planes: bit i of code p is bit p of word i
    const __m256i one = _mm256_set1_epi32(1);
    __m256i v = _mm256_and_si256(_mm256_srli_epi32(w[0], p), one);
    const __m256i b1 = p >= 1 ? _mm256_srli_epi32(w[1], p - 1) : _mm256_slli_epi32(w[1], 1);
    v = _mm256_or_si256(v, _mm256_and_si256(b1, _mm256_set1_epi32(2)));
    if constexpr (BITS == 3) {
      const __m256i b2 = p >= 2 ? _mm256_srli_epi32(w[2], p - 2) : _mm256_slli_epi32(w[2], 2 - p);
      v = _mm256_or_si256(v, _mm256_and_si256(b2, _mm256_set1_epi32(4)));
    }
    return _mm256_cvtepi32_ps(v);
  } else {
    constexpr int per_word = 32 / BITS;
    const int shift = BITS * (p % per_word);
    const __m256i v = _mm256_srli_epi32(w[p / per_word], shift);
    if (shift + BITS == 32) return _mm256_cvtepi32_ps(v);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32((1 << BITS) - 1)));
  }
}

template <int BITS, int B>
void gemv_tiles(const Layout& L, const float* x, int64_t ldx, const float* xsum, const float* bias, float* out,
                int64_t ldo, int64_t t0, int64_t t1) {
  constexpr int NA = B == 1 ? 2 : 1;  // FMA chains per token and half (two halves already interleave)
  for (int64_t tile = t0; tile < t1; ++tile) {
    __m256 y[B][2];
    for (int b = 0; b < B; ++b) y[b][0] = y[b][1] = _mm256_setzero_ps();
    const int32_t* wtile = L.qw + tile * L.KB * BITS * kTileRows;
    const uint16_t* sc = L.sc + tile * L.G * 2 * kTileRows;
    for (int64_t g = 0; g < L.G; ++g) {
      const int k0 = L.kb_start[g], k1 = L.kb_start[g + 1];
      if (k0 == k1) continue;
      __m256 acc[B][2][NA];
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < 2; ++h)
          for (int a = 0; a < NA; ++a) acc[b][h][a] = _mm256_setzero_ps();
      for (int kb = k0; kb < k1; ++kb) {
        __m256i w[2][BITS];
        const int32_t* wp = wtile + static_cast<int64_t>(kb) * BITS * kTileRows;
        for (int i = 0; i < BITS; ++i) _mm_prefetch(reinterpret_cast<const char*>(wp + 1024 + i * kTileRows), _MM_HINT_T0);
        for (int i = 0; i < BITS; ++i) {
          w[0][i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + i * kTileRows));
          w[1][i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + i * kTileRows + 8));
        }
        const float* xk = x + static_cast<int64_t>(kb) * kBlock;
#pragma GCC unroll 32
        for (int p = 0; p < kBlock; ++p) {
          const __m256 f0 = code_at<BITS>(w[0], p), f1 = code_at<BITS>(w[1], p);
#pragma GCC unroll 8
          for (int b = 0; b < B; ++b) {
            const __m256 xv = _mm256_set1_ps(xk[b * ldx + p]);
            acc[b][0][p % NA] = _mm256_fmadd_ps(f0, xv, acc[b][0][p % NA]);
            acc[b][1][p % NA] = _mm256_fmadd_ps(f1, xv, acc[b][1][p % NA]);
          }
        }
      }
      for (int h = 0; h < 2; ++h) {
        const __m256 s = load_half(sc + g * 2 * kTileRows + h * 8);
        const __m256 sz = _mm256_mul_ps(s, load_half(sc + g * 2 * kTileRows + kTileRows + h * 8));
        for (int b = 0; b < B; ++b) {
          __m256 a = acc[b][h][0];
          for (int i = 1; i < NA; ++i) a = _mm256_add_ps(a, acc[b][h][i]);
          y[b][h] = _mm256_fmadd_ps(s, a, y[b][h]);
          y[b][h] = _mm256_fnmadd_ps(sz, _mm256_set1_ps(xsum[b * L.G + g]), y[b][h]);
        }
      }
    }
    const int64_t r0 = tile * kTileRows;
    const int64_t valid = L.m - r0 < kTileRows ? L.m - r0 : kTileRows;
    for (int b = 0; b < B; ++b) {
      alignas(32) float buf[kTileRows];
      _mm256_store_ps(buf, y[b][0]);
      _mm256_store_ps(buf + 8, y[b][1]);
      float* dst = out + b * ldo + r0;
      for (int64_t i = 0; i < valid; ++i) dst[i] = buf[i] + (bias ? bias[r0 + i] : 0.0f);
    }
  }
}

template <int BITS>
void gemv_bits(const Layout& L, int B, const float* x, int64_t ldx, const float* xsum, const float* bias,
               float* out, int64_t ldo, int64_t t0, int64_t t1) {
  with_batch(B, [&](auto b) { gemv_tiles<BITS, decltype(b)::value>(L, x, ldx, xsum, bias, out, ldo, t0, t1); });
}

template <int BITS>
void dequant_tiles(const Layout& L, int64_t t0, int64_t t1, int64_t kb0, int64_t kb1, float* wt,
                    int64_t ldw) {
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int32_t* wtile = L.qw + tile * L.KB * BITS * kTileRows;
    const uint16_t* sc = L.sc + tile * L.G * 2 * kTileRows;
    for (int h = 0; h < 2; ++h) {
      float* dst = wt + (tile - t0) * kTileRows + h * 8;
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int64_t g = L.kb_group[kb];
        const __m256 s = load_half(sc + g * 2 * kTileRows + h * 8);
        const __m256 z = load_half(sc + g * 2 * kTileRows + kTileRows + h * 8);
        __m256i w[BITS];
        for (int i = 0; i < BITS; ++i)
          w[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wtile + (kb * BITS + i) * kTileRows + h * 8));
#pragma GCC unroll 32
        for (int p = 0; p < kBlock; ++p)
          _mm256_storeu_ps(dst + ((kb - kb0) * kBlock + p) * ldw, _mm256_mul_ps(_mm256_sub_ps(code_at<BITS>(w, p), z), s));
      }
    }
  }
}

}  // namespace

void gemv_avx2(const Layout& L, int B, const float* x, int64_t ldx, const float* xsum, const float* bias,
               float* out, int64_t ldo, int64_t t0, int64_t t1) {
  with_bits(L.bits, [&](auto bits) { gemv_bits<decltype(bits)::value>(L, B, x, ldx, xsum, bias, out, ldo, t0, t1); });
}

void dequant_avx2(const Layout& L, int64_t t0, int64_t t1, int64_t kb0, int64_t kb1, float* wt,
                    int64_t ldw) {
  with_bits(L.bits, [&](auto bits) { dequant_tiles<decltype(bits)::value>(L, t0, t1, kb0, kb1, wt, ldw); });
}

}  // namespace qk::cpu::qgemm
#endif  // AVX2
