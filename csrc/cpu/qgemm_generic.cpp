// Portable scalar qgemm kernels (ggml's `_generic` idea): the FMA GEMV and the panel dequantizer of
// qgemm_avx2.cpp written as plain loops over the layout of qgemm_kernels.h. They let the extension
// build and run where AVX2 is missing, and QUANTKERN_NO_AVX2=1 runs them anywhere (tests compare them
// with the reference). Same sums in the same grouping as the SIMD kernels (fp32 accumulation per group,
// then s * acc - s * z * xsum), so they agree with them to fp32 rounding, not bit for bit.
#include <c10/util/Half.h>

#include <cstdint>

#include "qgemm_kernels.h"

namespace qk::cpu::qgemm {
namespace {

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

// Code p (0..31) of row `lane` in one tile k-block; w = the block's words ([bits][16]).
template <int BITS>
inline int code_at(const int32_t* w, int lane, int p) {
  if constexpr (BITS == 2 || BITS == 3) {  // bit planes: bit i of code p is bit p of word i
    int c = 0;
    for (int i = 0; i < BITS; ++i) c |= ((static_cast<uint32_t>(w[i * kTileRows + lane]) >> p) & 1u) << i;
    return c;
  } else {
    constexpr int per_word = 32 / BITS;
    const uint32_t word = static_cast<uint32_t>(w[(p / per_word) * kTileRows + lane]);
    return static_cast<int>((word >> (BITS * (p % per_word))) & ((1u << BITS) - 1u));
  }
}

template <int BITS>
void gemv_tiles(const Layout& L, int B, const float* x, int64_t ldx, const float* xsum, const float* bias, float* out,
                int64_t ldo, int64_t t0, int64_t t1) {
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int32_t* wtile = L.qw + tile * L.KB * BITS * kTileRows;
    const uint16_t* sc = L.sc + tile * L.G * 2 * kTileRows;
    const int64_t r0 = tile * kTileRows;
    const int valid = static_cast<int>(L.m - r0 < kTileRows ? L.m - r0 : kTileRows);
    for (int b = 0; b < B; ++b) {
      const float* xb = x + b * ldx;
      for (int lane = 0; lane < valid; ++lane) {
        float y = 0.0f;
        for (int64_t g = 0; g < L.G; ++g) {
          const int k0 = L.kb_start[g], k1 = L.kb_start[g + 1];
          if (k0 == k1) continue;
          float acc = 0.0f;
          for (int kb = k0; kb < k1; ++kb) {
            const int32_t* w = wtile + static_cast<int64_t>(kb) * BITS * kTileRows;
            const float* xk = xb + static_cast<int64_t>(kb) * kBlock;
            for (int p = 0; p < kBlock; ++p) acc += static_cast<float>(code_at<BITS>(w, lane, p)) * xk[p];
          }
          const float s = half_to_float(sc[g * 2 * kTileRows + lane]);
          const float z = half_to_float(sc[g * 2 * kTileRows + kTileRows + lane]);
          y += s * acc;
          y -= s * z * xsum[b * L.G + g];
        }
        out[b * ldo + r0 + lane] = y + (bias ? bias[r0 + lane] : 0.0f);
      }
    }
  }
}

template <int BITS>
void dequant_tiles(const Layout& L, int64_t t0, int64_t t1, int64_t kb0, int64_t kb1, float* wt, int64_t ldw) {
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int32_t* wtile = L.qw + tile * L.KB * BITS * kTileRows;
    const uint16_t* sc = L.sc + tile * L.G * 2 * kTileRows;
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      const int64_t g = L.kb_group[kb];
      const int32_t* w = wtile + kb * BITS * kTileRows;
      for (int lane = 0; lane < kTileRows; ++lane) {
        const float s = half_to_float(sc[g * 2 * kTileRows + lane]);
        const float z = half_to_float(sc[g * 2 * kTileRows + kTileRows + lane]);
        float* dst = wt + (tile - t0) * kTileRows + lane;
        for (int p = 0; p < kBlock; ++p)
          dst[((kb - kb0) * kBlock + p) * ldw] = (static_cast<float>(code_at<BITS>(w, lane, p)) - z) * s;
      }
    }
  }
}

}  // namespace

void gemv_generic(const Layout& L, int B, const float* x, int64_t ldx, const float* xsum, const float* bias,
                  float* out, int64_t ldo, int64_t t0, int64_t t1) {
  with_bits(L.bits, [&](auto bits) { gemv_tiles<decltype(bits)::value>(L, B, x, ldx, xsum, bias, out, ldo, t0, t1); });
}

void dequant_generic(const Layout& L, int64_t t0, int64_t t1, int64_t kb0, int64_t kb1, float* wt, int64_t ldw) {
  with_bits(L.bits, [&](auto bits) { dequant_tiles<decltype(bits)::value>(L, t0, t1, kb0, kb1, wt, ldw); });
}

}  // namespace qk::cpu::qgemm
