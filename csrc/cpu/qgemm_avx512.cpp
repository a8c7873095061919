// AVX-512 qgemm kernels (chosen at run time). No ATen here: see qgemm_kernels.h.
// Codes become floats through vpermps with a 16-entry table: it reads only the low 4 bits of each
// lane, so a right shift alone extracts a code (no mask, no int->float convert).
// GCC 12 flags the deliberately undefined upper lanes inside <avx512fintrin.h> (_mm512_undefined_*) a few
// hundred times per build: a false positive in the compiler's own header.
#if defined(__x86_64__) || defined(__i386__)  // (elsewhere: compiled out, see cpu_features.h)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")
#include <immintrin.h>

#include "qgemm_avx512_common.h"
#include "qgemm_kernels.h"

namespace qk::cpu::qgemm {
namespace {

// Software prefetch distances in int32 words (measured on the 2-core test VM, 4096x14336 and 14336x4096,
// batch 1, weights streamed from DRAM): the single-stream GEMVs are fastest at 2 KiB ahead (4 KiB was
// 10-15% slower, 0.5 KiB 5-10% slower); the LUT GEMV runs 4 tile streams at once, 1 KiB ahead each.
constexpr int64_t kPrefetch = 512;
constexpr int64_t kPrefetchLut = 256;

template <int BITS>
inline __m512 code_table() {
  const int mask = BITS == 4 ? 15 : (1 << BITS) - 1;
  alignas(64) float t[16];
  for (int i = 0; i < 16; ++i) t[i] = static_cast<float>(i & mask);
  return _mm512_load_ps(t);
}

// Code p (0..31) of a k-block as floats, 16 rows; w = the block's words.
template <int BITS>
inline __m512 code_at(const __m512i* w, int p, __m512 table) {
  if constexpr (BITS == 4) {
    return _mm512_permutexvar_ps(_mm512_srli_epi32(w[p >> 3], 4 * (p & 7)), table);
  } else if constexpr (BITS == 8) {
    const __m512i v = _mm512_srli_epi32(w[p >> 2], 8 * (p & 3));
    return _mm512_cvtepi32_ps((p & 3) == 3 ? v : _mm512_and_si512(v, _mm512_set1_epi32(0xFF)));
  } else {  // planes: bit i of code p is bit p of word i; merge bit i into place i, vpermps masks the rest
    const __m512i b1 = p >= 1 ? _mm512_srli_epi32(w[1], p - 1) : _mm512_slli_epi32(w[1], 1);
    __m512i idx = _mm512_ternarylogic_epi32(_mm512_srli_epi32(w[0], p), b1, _mm512_set1_epi32(1), 0xE4);
    if constexpr (BITS == 3) {
      const __m512i b2 = p >= 2 ? _mm512_srli_epi32(w[2], p - 2) : _mm512_slli_epi32(w[2], 2 - p);
      idx = _mm512_ternarylogic_epi32(idx, b2, _mm512_set1_epi32(3), 0xE4);  // bits 0-1 from idx
    }
    return _mm512_permutexvar_ps(idx, table);
  }
}

// LUT GEMV on bit planes: for each 4 channels c, lut[c][s] = sum of x over the subset s; plane i of
// 16 rows gives 16 nibbles = 16 table indices (vpermps reads the low 4 bits of each lane).
// NT adjacent tiles run together: each table line loaded (from L2: the tables are 4x the size of x)
// feeds NT tiles, and each tile is its own linear stream through the packed weights.
template <int BITS, int B, int NT>
void gemv_lut_group(const Layout& L, const float* lut, int64_t ldl, const float* xsum, const float* bias,
                    float* out, int64_t ldo, int64_t tile0) {
  const int64_t tstride = L.KB * BITS * kTileRows;  // int32 words per tile
  const int32_t* wt0 = L.qw + tile0 * tstride;
  const uint16_t* sc0 = L.sc + tile0 * L.G * 2 * kTileRows;
  __m512 y[NT][B];
  for (int t = 0; t < NT; ++t)
    for (int b = 0; b < B; ++b) y[t][b] = _mm512_setzero_ps();
  for (int t = 0; t < NT; ++t)
    for (int k = 0; k < kScaleAhead && k < L.G; ++k)
      _mm_prefetch(reinterpret_cast<const char*>(sc0 + (t * L.G + k) * 2 * kTileRows), _MM_HINT_T0);
  for (int64_t g = 0; g < L.G; ++g) {
    const int k0 = L.kb_start[g], k1 = L.kb_start[g + 1];
    if (k0 == k1) continue;
    __m512 acc[NT][B][BITS];
    for (int t = 0; t < NT; ++t)
      for (int b = 0; b < B; ++b)
        for (int i = 0; i < BITS; ++i) acc[t][b][i] = _mm512_setzero_ps();
    for (int kb = k0; kb < k1; ++kb) {
      __m512i w[NT][BITS];
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) {
        const int32_t* wp = wt0 + t * tstride + static_cast<int64_t>(kb) * BITS * kTileRows;
#pragma GCC unroll 3
        for (int i = 0; i < BITS; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetchLut + i * kTileRows), _MM_HINT_T0);
          w[t][i] = _mm512_loadu_si512(wp + i * kTileRows);
        }
      }
      const float* lk = lut + static_cast<int64_t>(kb) * (kBlock / 4) * 16;
#pragma GCC unroll 8
      for (int c = 0; c < kBlock / 4; ++c) {
        __m512 lv[B];
#pragma GCC unroll 2
        for (int b = 0; b < B; ++b) lv[b] = _mm512_loadu_ps(lk + b * ldl + c * 16);
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t)
#pragma GCC unroll 3
          for (int i = 0; i < BITS; ++i) {
            const __m512i idx = c ? _mm512_srli_epi32(w[t][i], 4 * c) : w[t][i];
#pragma GCC unroll 2
            for (int b = 0; b < B; ++b) acc[t][b][i] = _mm512_add_ps(acc[t][b][i], _mm512_permutexvar_ps(idx, lv[b]));
          }
      }
    }
    for (int t = 0; t < NT; ++t) {
      const uint16_t* sc = sc0 + (t * L.G + g) * 2 * kTileRows;
      // each tile's scales are their own short stream (one line per group): fetch them ahead
      _mm_prefetch(reinterpret_cast<const char*>(sc + kScaleAhead * 2 * kTileRows), _MM_HINT_T0);
      const __m512 s = load_half(sc);
      const __m512 sz = _mm512_mul_ps(s, load_half(sc + kTileRows));
      for (int b = 0; b < B; ++b) {
        __m512 a = acc[t][b][BITS - 1];  // sum_i 2^i plane_i, Horner
        for (int i = BITS - 2; i >= 0; --i) a = _mm512_add_ps(_mm512_add_ps(a, a), acc[t][b][i]);
        y[t][b] = _mm512_fmadd_ps(s, a, y[t][b]);
        y[t][b] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(xsum[b * L.G + g]), y[t][b]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) store_tile(L, tile0 + t, B, y[t], bias, out, ldo);
}

template <int BITS, int B>
void gemv_lut_tiles(const Layout& L, const float* lut, int64_t ldl, const float* xsum, const float* bias,
                    float* out, int64_t ldo, int64_t t0, int64_t t1) {
  constexpr int NT = B == 1 ? 4 : 2;  // accumulators + weights fit the 32 registers
  int64_t tile = t0;
  for (; tile + NT <= t1; tile += NT) gemv_lut_group<BITS, B, NT>(L, lut, ldl, xsum, bias, out, ldo, tile);
  for (; tile < t1; ++tile) gemv_lut_group<BITS, B, 1>(L, lut, ldl, xsum, bias, out, ldo, tile);
}

template <int BITS, int B>
void gemv_tiles(const Layout& L, const float* x, int64_t ldx, const float* xsum, const float* bias, float* out,
                int64_t ldo, int64_t t0, int64_t t1) {
  constexpr int NA = B == 1 ? 4 : (B == 2 ? 2 : 1);  // independent FMA chains per token
  const __m512 table = code_table<BITS>();
  for (int64_t tile = t0; tile < t1; ++tile) {
    __m512 y[B];
    for (int b = 0; b < B; ++b) y[b] = _mm512_setzero_ps();
    const int32_t* wtile = L.qw + tile * L.KB * BITS * kTileRows;
    const uint16_t* sc = L.sc + tile * L.G * 2 * kTileRows;
    for (int64_t g = 0; g < L.G; ++g) {
      const int k0 = L.kb_start[g], k1 = L.kb_start[g + 1];
      if (k0 == k1) continue;
      __m512 acc[B][NA];
      for (int b = 0; b < B; ++b)
        for (int a = 0; a < NA; ++a) acc[b][a] = _mm512_setzero_ps();
      for (int kb = k0; kb < k1; ++kb) {
        __m512i w[BITS];
        const int32_t* wp = wtile + static_cast<int64_t>(kb) * BITS * kTileRows;
        // stream ahead (the next tiles follow this one in memory): the hardware prefetcher alone
        // leaves the decode GEMV waiting on DRAM
#pragma GCC unroll 8
        for (int i = 0; i < BITS; ++i) _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetch + i * kTileRows), _MM_HINT_T0);
#pragma GCC unroll 8
        for (int i = 0; i < BITS; ++i) w[i] = _mm512_loadu_si512(wp + i * kTileRows);
        const float* xk = x + static_cast<int64_t>(kb) * kBlock;
#pragma GCC unroll 32
        for (int p = 0; p < kBlock; ++p) {
          const __m512 f = code_at<BITS>(w, p, table);
#pragma GCC unroll 8
          for (int b = 0; b < B; ++b)
            acc[b][p % NA] = _mm512_fmadd_ps(f, _mm512_set1_ps(xk[b * ldx + p]), acc[b][p % NA]);
        }
      }
      const __m512 s = load_half(sc + g * 2 * kTileRows);
      const __m512 sz = _mm512_mul_ps(s, load_half(sc + g * 2 * kTileRows + kTileRows));
      for (int b = 0; b < B; ++b) {
        __m512 a = acc[b][0];
        for (int i = 1; i < NA; ++i) a = _mm512_add_ps(a, acc[b][i]);
        y[b] = _mm512_fmadd_ps(s, a, y[b]);
        y[b] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(xsum[b * L.G + g]), y[b]);
      }
    }
    store_tile(L, tile, B, y, bias, out, ldo);
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
  const __m512 table = code_table<BITS>();
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int32_t* wtile = L.qw + tile * L.KB * BITS * kTileRows;
    const uint16_t* sc = L.sc + tile * L.G * 2 * kTileRows;
    float* dst = wt + (tile - t0) * kTileRows;
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      const int64_t g = L.kb_group[kb];
      const __m512 s = load_half(sc + g * 2 * kTileRows);
      const __m512 z = load_half(sc + g * 2 * kTileRows + kTileRows);
      __m512i w[BITS];
      for (int i = 0; i < BITS; ++i) w[i] = _mm512_loadu_si512(wtile + (kb * BITS + i) * kTileRows);
#pragma GCC unroll 32
      for (int p = 0; p < kBlock; ++p)
        _mm512_storeu_ps(dst + ((kb - kb0) * kBlock + p) * ldw,
                         _mm512_mul_ps(_mm512_sub_ps(code_at<BITS>(w, p, table), z), s));
    }
  }
}

// vpdpbusd GEMV for 4-bit: x as LIMBS signed 7-bit digits per k-block (LIMBS = 1: int8 rounding;
// LIMBS = 3: 22-bit fixed point, see quantize_x_avx512), each digit plane dotted with the nibbles
// (split into even/odd bytes) in exact int32 arithmetic; the planes are merged per k-block
// (sum_l acc_l * 128^(LIMBS-1-l) < 2^31: |acc_l| <= 32 * 15 * 128) and scaled by the block's step.
template <int B, int LIMBS>
void gemv_int8_tiles(const Layout& L, const int8_t* xq, int64_t ldq, const float* dx, int64_t ldd, const float* xsq,
                     const float* bias, float* out, int64_t ldo, int64_t t0, int64_t t1) {
  constexpr int NA = B == 1 ? 2 : 1;  // independent dpbusd chains per token and digit plane
  const __m512i lo4 = _mm512_set1_epi32(0x0F0F0F0F);
  for (int64_t tile = t0; tile < t1; ++tile) {
    __m512 y[B];
    for (int b = 0; b < B; ++b) y[b] = _mm512_setzero_ps();
    const int32_t* wtile = L.qw + tile * L.KB * 4 * kTileRows;
    const uint16_t* sc = L.sc + tile * L.G * 2 * kTileRows;
    for (int64_t g = 0; g < L.G; ++g) {
      const int k0 = L.kb_start[g], k1 = L.kb_start[g + 1];
      if (k0 == k1) continue;
      __m512 facc[B];
      for (int b = 0; b < B; ++b) facc[b] = _mm512_setzero_ps();
      for (int kb = k0; kb < k1; ++kb) {
        const int32_t* wp = wtile + static_cast<int64_t>(kb) * 4 * kTileRows;
        for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetch + i * kTileRows), _MM_HINT_T0);
        __m512i ia[B][LIMBS][NA];
        for (int b = 0; b < B; ++b)
          for (int l = 0; l < LIMBS; ++l)
            for (int a = 0; a < NA; ++a) ia[b][l][a] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const __m512i w = _mm512_loadu_si512(wp + i * kTileRows);
          const __m512i even = _mm512_and_si512(w, lo4), odd = _mm512_and_si512(_mm512_srli_epi32(w, 4), lo4);
#pragma GCC unroll 4
          for (int b = 0; b < B; ++b)
#pragma GCC unroll 3
            for (int l = 0; l < LIMBS; ++l) {
              const int32_t* q =
                  reinterpret_cast<const int32_t*>(xq + (b * LIMBS + l) * ldq + static_cast<int64_t>(kb) * kBlock);
              ia[b][l][0] = _mm512_dpbusd_epi32(ia[b][l][0], even, _mm512_set1_epi32(q[i]));
              ia[b][l][NA - 1] = _mm512_dpbusd_epi32(ia[b][l][NA - 1], odd, _mm512_set1_epi32(q[4 + i]));
            }
        }
        for (int b = 0; b < B; ++b) {
          __m512i t = ia[b][0][0];
          if (NA == 2) t = _mm512_add_epi32(t, ia[b][0][NA - 1]);
          for (int l = 1; l < LIMBS; ++l) {
            __m512i u = ia[b][l][0];
            if (NA == 2) u = _mm512_add_epi32(u, ia[b][l][NA - 1]);
            t = _mm512_add_epi32(_mm512_slli_epi32(t, 7), u);
          }
          facc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(dx[b * ldd + kb]), facc[b]);
        }
      }
      const __m512 s = load_half(sc + g * 2 * kTileRows);
      const __m512 sz = _mm512_mul_ps(s, load_half(sc + g * 2 * kTileRows + kTileRows));
      for (int b = 0; b < B; ++b) {
        y[b] = _mm512_fmadd_ps(s, facc[b], y[b]);
        y[b] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(xsq[b * L.G + g]), y[b]);
      }
    }
    store_tile(L, tile, B, y, bias, out, ldo);
  }
}

template <int LIMBS>
void gemv_int8_limbs(const Layout& L, int B, const int8_t* xq, int64_t ldq, const float* dx, int64_t ldd,
                     const float* xsq, const float* bias, float* out, int64_t ldo, int64_t t0, int64_t t1) {
  with_batch(B, [&](auto b) {
    gemv_int8_tiles<decltype(b)::value, LIMBS>(L, xq, ldq, dx, ldd, xsq, bias, out, ldo, t0, t1);
  });
}

}  // namespace

void gemv_int8_avx512(const Layout& L, int B, int limbs, const int8_t* xq, int64_t ldq, const float* dx,
                      int64_t ldd, const float* xsq, const float* bias, float* out, int64_t ldo, int64_t t0,
                      int64_t t1) {
  if (limbs == 1) return gemv_int8_limbs<1>(L, B, xq, ldq, dx, ldd, xsq, bias, out, ldo, t0, t1);
  return gemv_int8_limbs<3>(L, B, xq, ldq, dx, ldd, xsq, bias, out, ldo, t0, t1);
}

void gemv_avx512(const Layout& L, int B, const float* x, int64_t ldx, const float* xsum, const float* bias,
                 float* out, int64_t ldo, int64_t t0, int64_t t1) {
  with_bits(L.bits, [&](auto bits) { gemv_bits<decltype(bits)::value>(L, B, x, ldx, xsum, bias, out, ldo, t0, t1); });
}

void gemv_lut_avx512(const Layout& L, int B, const float* lut, int64_t ldl, const float* xsum, const float* bias,
                     float* out, int64_t ldo, int64_t t0, int64_t t1) {
  if (L.bits == 2) {
    if (B == 1) return gemv_lut_tiles<2, 1>(L, lut, ldl, xsum, bias, out, ldo, t0, t1);
    return gemv_lut_tiles<2, 2>(L, lut, ldl, xsum, bias, out, ldo, t0, t1);
  }
  if (B == 1) return gemv_lut_tiles<3, 1>(L, lut, ldl, xsum, bias, out, ldo, t0, t1);
  return gemv_lut_tiles<3, 2>(L, lut, ldl, xsum, bias, out, ldo, t0, t1);
}

void build_lut_avx512(const float* x, int64_t chunks, float* lut) {
  // entry s of a chunk = sum_i bit_i(s) * x_i; multiplying by exact 0/1 masks keeps plain fp32 sums
  alignas(64) float mk[4][16];
  for (int i = 0; i < 4; ++i)
    for (int s = 0; s < 16; ++s) mk[i][s] = static_cast<float>((s >> i) & 1);
  const __m512 m0 = _mm512_load_ps(mk[0]), m1 = _mm512_load_ps(mk[1]), m2 = _mm512_load_ps(mk[2]),
               m3 = _mm512_load_ps(mk[3]);
  for (int64_t c = 0; c < chunks; ++c) {
    const float* xc = x + c * 4;
    __m512 t = _mm512_mul_ps(m0, _mm512_set1_ps(xc[0]));
    t = _mm512_fmadd_ps(m1, _mm512_set1_ps(xc[1]), t);
    t = _mm512_fmadd_ps(m2, _mm512_set1_ps(xc[2]), t);
    t = _mm512_fmadd_ps(m3, _mm512_set1_ps(xc[3]), t);
    _mm512_storeu_ps(lut + c * 16, t);
  }
}

void quantize_x_avx512(const float* x, int64_t KB, int limbs, int8_t* q, int64_t ldq, float* d, int32_t* isum) {
  // output byte o of a k-block takes channel src[o]: evens of word o/4 first, then the odds
  alignas(64) int32_t src[32];
  for (int o = 0; o < 32; ++o) src[o] = 8 * ((o % 16) / 4) + 2 * (o % 4) + (o >= 16);
  const __m512i i_lo = _mm512_load_si512(src), i_hi = _mm512_load_si512(src + 16);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  // limbs = 3: x = d * (a * 2^14 + b * 2^7 + c), |x| <= amax = d * 127 * 2^14, b and c in [-64, 63]
  const float top = limbs == 1 ? 127.0f : 127.0f * 16384.0f;
  for (int64_t kb = 0; kb < KB; ++kb) {
    const __m512 a = _mm512_loadu_ps(x + kb * 32), b = _mm512_loadu_ps(x + kb * 32 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, a), _mm512_andnot_ps(sign, b)));
    // vmaxps drops NaNs: a NaN/Inf x makes (a + b) * 0 NaN; its block's step is then NaN, so the token's
    // outputs are NaN as on the fp32 paths
    const bool finite = !__builtin_isnan(_mm512_reduce_add_ps(_mm512_mul_ps(_mm512_add_ps(a, b), _mm512_setzero_ps())));
    const __m512 inv = _mm512_set1_ps(finite && amax > 0 ? top / amax : 0.0f);
    __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    d[kb] = finite ? amax / top : __builtin_nanf("");
    isum[kb] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    for (int l = limbs - 1; l >= 0; --l) {  // lowest digit first: balanced base-128 digits
      const __m512i da = l > 0 ? pop_digit(qa) : qa, db = l > 0 ? pop_digit(qb) : qb;
      int8_t* ql = q + l * ldq + kb * 32;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(ql), _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(da, i_lo, db)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(ql + 16),
                       _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(da, i_hi, db)));
    }
  }
}

void dequant_avx512(const Layout& L, int64_t t0, int64_t t1, int64_t kb0, int64_t kb1, float* wt,
                    int64_t ldw) {
  with_bits(L.bits, [&](auto bits) { dequant_tiles<decltype(bits)::value>(L, t0, t1, kb0, kb1, wt, ldw); });
}

}  // namespace qk::cpu::qgemm
#endif  // x86
