// CPU kernels of the core solver ops (contract: csrc/common/solver.h).
//
// gptq_block_solve: rows are independent inside a block given U, so each thread takes tiles of
// kRT rows and keeps the block transposed ([column][row], kRT floats per column) in L1: the
// quantize step and every rank-1 update are then plain vector loops over the tile's rows. The
// tail update is one GEMM per block (at::addmm_, the same call as the reference, so results match
// bit for bit unless BLAS itself differs).
//
// ksnrq_solve: per row, K beams; in-block states are double-buffered, parents/codes are recorded
// per column and resolved at block end (so whole suffixes are never copied per step); the tail
// update is one GEMM over all m*K beam rows, after gathering each beam's block-start ancestor.
//
// Named kernels (quantkern/kernels.py picks one and passes its name): gptq_block_{avx512,avx2,generic}
// and ksnrq_{avx512,avx2,generic}. All give bit-identical results (the same IEEE operations in the same
// order, no fma contraction); the generic ones are plain loops, for CPUs and builds without AVX2.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu_features.h"
#include "kernel_table.h"
#include "parallel.h"

#if QK_AVX2
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "../common/solver.h"
#include "cpu_features.h"

// Keep a*b - c as two roundings (like the reference's separate torch ops): no fma contraction.
#pragma GCC optimize("fp-contract=off")

namespace {

constexpr int kRT = 64;  // rows per tile: 8 AVX2 / 4 AVX-512 vectors per tile column
// One tile column (kRT rows) as a GCC vector: the rank-1 updates are then exactly one vector
// multiply and one subtract per column, whatever the auto-vectorizer would have chosen.
typedef float vrow __attribute__((vector_size(kRT * sizeof(float)), aligned(64)));
static_assert(sizeof(vrow) == kRT * sizeof(float), "tile column size");

constexpr int kSB = 16;  // columns per sub-block of the two-level in-block update

#if QK_AVX2
// Rank-1 update of one tile's block columns j in [jb, je): col_j -= e * u_j (- w * p_j), written
// with intrinsics so each column is loaded, updated and stored exactly once (no spills).
__attribute__((target("avx512f"))) static void update_avx512(float* w1, const float* e, const float* w,
                                                          const float* urow, const float* prow, int64_t jb,
                                                          int64_t je, int64_t i1) {
  constexpr int V = kRT / 16;
  __m512 ev[V], wv[V];
  for (int k = 0; k < V; ++k) {
    ev[k] = _mm512_loadu_ps(e + 16 * k);
    wv[k] = _mm512_loadu_ps(w + 16 * k);
  }
  if (prow == nullptr) {
    for (int64_t j = jb; j < je; ++j) {
      float* cj = w1 + (j - i1) * kRT;
      const __m512 uj = _mm512_set1_ps(urow[j]);
      for (int k = 0; k < V; ++k)
        _mm512_store_ps(cj + 16 * k, _mm512_sub_ps(_mm512_load_ps(cj + 16 * k), _mm512_mul_ps(ev[k], uj)));
    }
  } else {
    for (int64_t j = jb; j < je; ++j) {
      float* cj = w1 + (j - i1) * kRT;
      const __m512 uj = _mm512_set1_ps(urow[j]), pj = _mm512_set1_ps(prow[j]);
      for (int k = 0; k < V; ++k)
        _mm512_store_ps(cj + 16 * k, _mm512_sub_ps(_mm512_load_ps(cj + 16 * k),
                                                   _mm512_sub_ps(_mm512_mul_ps(ev[k], uj), _mm512_mul_ps(wv[k], pj))));
    }
  }
}

static inline __attribute__((always_inline)) void update_avx2(float* w1, const float* e, const float* w,
                                                              const float* urow, const float* prow, int64_t jb,
                                                              int64_t je, int64_t i1) {
  __m256 ev[kRT / 8], wv[kRT / 8];
  for (int k = 0; k < kRT / 8; ++k) {
    ev[k] = _mm256_loadu_ps(e + 8 * k);
    wv[k] = _mm256_loadu_ps(w + 8 * k);
  }
  for (int64_t j = jb; j < je; ++j) {
    float* cj = w1 + (j - i1) * kRT;
    const __m256 uj = _mm256_set1_ps(urow[j]);
    if (prow == nullptr) {
      for (int k = 0; k < kRT / 8; ++k)
        _mm256_store_ps(cj + 8 * k, _mm256_sub_ps(_mm256_load_ps(cj + 8 * k), _mm256_mul_ps(ev[k], uj)));
    } else {
      const __m256 pj = _mm256_set1_ps(prow[j]);
      for (int k = 0; k < kRT / 8; ++k)
        _mm256_store_ps(cj + 8 * k, _mm256_sub_ps(_mm256_load_ps(cj + 8 * k),
                                                  _mm256_sub_ps(_mm256_mul_ps(ev[k], uj), _mm256_mul_ps(wv[k], pj))));
    }
  }
}

// *lo / *hi = min / max of row[0 .. len) (len >= 1), for a group's parameters. The order of the
// comparisons is free: grid_params only looks at min(lo, 0) and max(hi, 0).
__attribute__((target("avx512f"))) static void minmax_row_avx512(const float* row, int64_t len, float* lo,
                                                              float* hi) {
  const __m512 first = _mm512_set1_ps(row[0]);
  __m512 l = first, h = first;
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    const __m512 x = _mm512_loadu_ps(row + j);
    l = _mm512_min_ps(x, l);
    h = _mm512_max_ps(x, h);
  }
  if (j < len) {
    const __m512 x = _mm512_mask_loadu_ps(first, static_cast<__mmask16>((1u << (len - j)) - 1u), row + j);
    l = _mm512_min_ps(x, l);
    h = _mm512_max_ps(x, h);
  }
  *lo = _mm512_reduce_min_ps(l);
  *hi = _mm512_reduce_max_ps(h);
}

static inline void minmax_row_avx2(const float* row, int64_t len, float* lo, float* hi) {
  __m256 l = _mm256_set1_ps(row[0]), h = l;
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const __m256 x = _mm256_loadu_ps(row + j);
    l = _mm256_min_ps(x, l);
    h = _mm256_max_ps(x, h);
  }
  alignas(32) float lv[8], hv[8];
  _mm256_store_ps(lv, l);
  _mm256_store_ps(hv, h);
  float a = lv[0], b = hv[0];
  for (int k = 1; k < 8; ++k) {
    a = std::min(a, lv[k]);
    b = std::max(b, hv[k]);
  }
  for (; j < len; ++j) {
    a = std::min(a, row[j]);
    b = std::max(b, row[j]);
  }
  *lo = a;
  *hi = b;
}

// cols[j] for j in [jb, je) (block-relative) -= e[t] * u[t*ldu + j] (- w[t] * p[t*ldu + j]) for
// t = 0 .. ns-1 in ascending order, with the reference's roundings (a product, then a subtraction);
// u/p point at row sb, column i1 of U/P. NC columns at a time (2*NC or 4*NC independent
// dependency chains), accumulators in registers, each column loaded and stored once.
template <bool HasP>
__attribute__((target("avx512f"))) static void lazy_avx512(float* cols, const float* e, const float* w,
                                                        const float* u, const float* p, int64_t ldu, int64_t ns,
                                                        int64_t jb, int64_t je) {
  constexpr int NC = 4, V = kRT / 16;
  int64_t j = jb;
  for (; j + NC <= je; j += NC) {
    __m512 acc[NC][V];
    for (int c = 0; c < NC; ++c)
      for (int k = 0; k < V; ++k) acc[c][k] = _mm512_load_ps(cols + (j + c) * kRT + 16 * k);
    for (int64_t t = 0; t < ns; ++t) {
      const float* ur = u + t * ldu + j;
      __m512 ev[V];
      for (int k = 0; k < V; ++k) ev[k] = _mm512_load_ps(e + t * kRT + 16 * k);
      if constexpr (HasP) {
        __m512 wv[V];
        for (int k = 0; k < V; ++k) wv[k] = _mm512_load_ps(w + t * kRT + 16 * k);
        const float* pr = p + t * ldu + j;
        for (int c = 0; c < NC; ++c) {
          const __m512 uc = _mm512_set1_ps(ur[c]), pc = _mm512_set1_ps(pr[c]);
          for (int k = 0; k < V; ++k)
            acc[c][k] = _mm512_sub_ps(acc[c][k], _mm512_sub_ps(_mm512_mul_ps(ev[k], uc), _mm512_mul_ps(wv[k], pc)));
        }
      } else {
        for (int c = 0; c < NC; ++c) {
          const __m512 uc = _mm512_set1_ps(ur[c]);
          for (int k = 0; k < V; ++k) acc[c][k] = _mm512_sub_ps(acc[c][k], _mm512_mul_ps(ev[k], uc));
        }
      }
    }
    for (int c = 0; c < NC; ++c)
      for (int k = 0; k < V; ++k) _mm512_store_ps(cols + (j + c) * kRT + 16 * k, acc[c][k]);
  }
  for (; j < je; ++j) {
    __m512 acc[V];
    for (int k = 0; k < V; ++k) acc[k] = _mm512_load_ps(cols + j * kRT + 16 * k);
    for (int64_t t = 0; t < ns; ++t) {
      const __m512 uc = _mm512_set1_ps(u[t * ldu + j]);
      for (int k = 0; k < V; ++k) {
        __m512 d = _mm512_mul_ps(_mm512_load_ps(e + t * kRT + 16 * k), uc);
        if constexpr (HasP) d = _mm512_sub_ps(d, _mm512_mul_ps(_mm512_load_ps(w + t * kRT + 16 * k), _mm512_set1_ps(p[t * ldu + j])));
        acc[k] = _mm512_sub_ps(acc[k], d);
      }
    }
    for (int k = 0; k < V; ++k) _mm512_store_ps(cols + j * kRT + 16 * k, acc[k]);
  }
}

template <bool HasP>
static inline __attribute__((always_inline)) void lazy_avx2(float* cols, const float* e, const float* w,
                                                            const float* u, const float* p, int64_t ldu, int64_t ns,
                                                            int64_t jb, int64_t je) {
  constexpr int NC = 2, V = kRT / 8;
  int64_t j = jb;
  for (; j + NC <= je; j += NC) {
    __m256 acc[NC][V];
    for (int c = 0; c < NC; ++c)
      for (int k = 0; k < V; ++k) acc[c][k] = _mm256_load_ps(cols + (j + c) * kRT + 8 * k);
    for (int64_t t = 0; t < ns; ++t) {
      const float* ur = u + t * ldu + j;
      for (int c = 0; c < NC; ++c) {
        const __m256 uc = _mm256_set1_ps(ur[c]);
        for (int k = 0; k < V; ++k) {
          __m256 d = _mm256_mul_ps(_mm256_load_ps(e + t * kRT + 8 * k), uc);
          if constexpr (HasP)
            d = _mm256_sub_ps(d, _mm256_mul_ps(_mm256_load_ps(w + t * kRT + 8 * k), _mm256_set1_ps(p[t * ldu + j + c])));
          acc[c][k] = _mm256_sub_ps(acc[c][k], d);
        }
      }
    }
    for (int c = 0; c < NC; ++c)
      for (int k = 0; k < V; ++k) _mm256_store_ps(cols + (j + c) * kRT + 8 * k, acc[c][k]);
  }
  for (; j < je; ++j) {
    __m256 acc[V];
    for (int k = 0; k < V; ++k) acc[k] = _mm256_load_ps(cols + j * kRT + 8 * k);
    for (int64_t t = 0; t < ns; ++t) {
      const __m256 uc = _mm256_set1_ps(u[t * ldu + j]);
      for (int k = 0; k < V; ++k) {
        __m256 d = _mm256_mul_ps(_mm256_load_ps(e + t * kRT + 8 * k), uc);
        if constexpr (HasP)
          d = _mm256_sub_ps(d, _mm256_mul_ps(_mm256_load_ps(w + t * kRT + 8 * k), _mm256_set1_ps(p[t * ldu + j])));
        acc[k] = _mm256_sub_ps(acc[k], d);
      }
    }
    for (int k = 0; k < V; ++k) _mm256_store_ps(cols + j * kRT + 8 * k, acc[k]);
  }
}

// 8x8 float transpose: dst[c * ldd + r] = src[r * lds + c] for r, c < 8 (AVX2, used by both ISAs:
// the tile loads are a small part of the block's work).
static inline __attribute__((always_inline)) void transpose8x8(const float* src, int64_t lds, float* dst,
                                                               int64_t ldd) {
  __m256 r[8], t[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + k * lds);
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    r[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
    r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
    r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(dst + k * ldd, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
    _mm256_storeu_ps(dst + (k + 4) * ldd, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
  }
}

// 8x8 byte transpose for the codes: dst[c * ldd + r] = src[r * lds + c] for r, c < 8 (SSE2 unpacks).
static inline __attribute__((always_inline)) void transpose8x8_bytes(const uint8_t* src, int64_t lds, uint8_t* dst,
                                                                     int64_t ldd) {
  __m128i a[8];
  for (int k = 0; k < 8; ++k) a[k] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k * lds));
  const __m128i t0 = _mm_unpacklo_epi8(a[0], a[1]), t1 = _mm_unpacklo_epi8(a[2], a[3]);
  const __m128i t2 = _mm_unpacklo_epi8(a[4], a[5]), t3 = _mm_unpacklo_epi8(a[6], a[7]);
  const __m128i u0 = _mm_unpacklo_epi16(t0, t1), u1 = _mm_unpackhi_epi16(t0, t1);
  const __m128i u2 = _mm_unpacklo_epi16(t2, t3), u3 = _mm_unpackhi_epi16(t2, t3);
  const __m128i v[4] = {_mm_unpacklo_epi32(u0, u2), _mm_unpackhi_epi32(u0, u2), _mm_unpacklo_epi32(u1, u3),
                        _mm_unpackhi_epi32(u1, u3)};
  for (int k = 0; k < 4; ++k) {  // v[k] holds output rows 2k and 2k + 1
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (2 * k) * ldd), v[k]);
    _mm_storeh_pd(reinterpret_cast<double*>(dst + (2 * k + 1) * ldd), _mm_castsi128_pd(v[k]));
  }
}

#endif  // QK_AVX2

// The portable versions of the helpers above (same operations, same order, so the same bits).
static inline void update_generic(float* w1, const float* e, const float* w, const float* urow, const float* prow,
                                  int64_t jb, int64_t je, int64_t i1) {
  for (int64_t j = jb; j < je; ++j) {
    float* cj = w1 + (j - i1) * kRT;
    if (prow == nullptr) {
      for (int r = 0; r < kRT; ++r) cj[r] = cj[r] - e[r] * urow[j];
    } else {
      for (int r = 0; r < kRT; ++r) cj[r] = cj[r] - (e[r] * urow[j] - w[r] * prow[j]);
    }
  }
}

static inline void minmax_row_generic(const float* row, int64_t len, float* lo, float* hi) {
  float a = row[0], b = row[0];
  for (int64_t j = 1; j < len; ++j) {
    a = std::min(a, row[j]);
    b = std::max(b, row[j]);
  }
  *lo = a;
  *hi = b;
}

template <bool HasP>
static inline void lazy_generic(float* cols, const float* e, const float* w, const float* u, const float* p,
                                int64_t ldu, int64_t ns, int64_t jb, int64_t je) {
  for (int64_t j = jb; j < je; ++j) {
    float* cj = cols + j * kRT;
    for (int64_t t = 0; t < ns; ++t) {
      const float uc = u[t * ldu + j];
      for (int r = 0; r < kRT; ++r) {
        float d = e[t * kRT + r] * uc;
        if constexpr (HasP) d = d - w[t * kRT + r] * p[t * ldu + j];
        cj[r] = cj[r] - d;
      }
    }
  }
}

enum class Simd { generic, avx2, avx512 };

// Everything one row tile needs for one block. The chunk's working copy stays ROW-MAJOR ([mc, n],
// row stride n) so neither W nor the codes are ever transposed as a whole: each tile transposes
// its kRT x B slice into the block buffer ([column][row], kRT floats per column) on load, and its
// codes back on store, in 8x8 register transposes. Errors / q go to errT / qT [B, mc] for the tail
// GEMM (which takes errT transposed).
struct TileArgs {
  const float* src;     // block-start values of the chunk's rows (W for the first block, then Wc), stride n
  const float* u;
  const float* p;
  float* sc;
  float* zr;
  uint8_t* codes;       // the chunk's rows of the row-major codes, stride n
  double* ls;
  float* errT;
  float* qT;
  uint8_t* cbuf;        // the tile's codes of the block, [column][row] like the block buffer
  const int32_t* g;
  const int32_t* run_end;
  int64_t n, m, mc, c0;
  int bits;
  bool sym, dynamic_groups;
  float maxq;
};

// The in-block loop of OP 1 (solver.h) for rows [r0, r0 + nr) (global ids), block columns [i1, i2).
template <bool HasP, Simd S>
static inline __attribute__((always_inline)) void tile_block(const TileArgs& a, int64_t r0, int64_t nr, int64_t i1,
                                                             int64_t i2, vrow* w1v) {
  const int64_t n = a.n, m = a.m, mc = a.mc, nb = i2 - i1, rl0 = r0 - a.c0;
  float* w1 = reinterpret_cast<float*>(w1v);
  const float* tsrc = a.src + rl0 * n;  // the tile's first row
  alignas(64) float w[kRT], s[kRT], z[kRT], c[kRT], q[kRT], e[kRT];
  // columns loaded/stored by 8x8 transposes (the generic kernel loads and stores element by element)
  const int64_t nb8 = S != Simd::generic && nr == kRT ? nb & ~int64_t{7} : 0;
#if QK_AVX2
  for (int64_t j = 0; j < nb8; j += 8)
    for (int r = 0; r < kRT; r += 8) transpose8x8(tsrc + r * n + i1 + j, n, w1 + j * kRT + r, kRT);
#endif
  for (int64_t j = nb8; j < nb; ++j)
    for (int r = 0; r < kRT; ++r) w1[j * kRT + r] = r < nr ? tsrc[r * n + i1 + j] : 0.f;
  double lsum[kRT] = {};
  for (int r = 0; r < nr; ++r) lsum[r] = a.ls[r0 + r];
  // Two-level lazy update: columns are decided in sub-blocks of kSB; inside a sub-block the
  // rank-1 updates touch only the sub-block, and the rest of the block gets the sub-block's kSB
  // updates in one register-blocked pass (each column loaded and stored once). Every element still
  // receives its updates one at a time in ascending i with the reference's two roundings, so the
  // result is bit-identical to the plain rank-1 order.
  alignas(64) float ev[kSB * kRT], wv[kSB * kRT];
  int32_t gcur = -1;
  // Software prefetch, spread over the block's columns: the next tile's block of W (its rows are n
  // floats apart, which the hardware prefetcher follows poorly) and this tile's codes lines (stored
  // at the end), row by row, lpr lines per row.
  const int64_t lpr_w = (nb * 4 + 63) / 64, lpr_c = (nb + 63) / 64;
  const int64_t nr_next = std::min<int64_t>(kRT, mc - rl0 - kRT);  // <= 0: last tile of the chunk
  const int64_t nl_w = nr_next > 0 ? nr_next * lpr_w : 0, nl_c = nr * lpr_c;
  const int64_t step_w = (nl_w + nb - 1) / nb, step_c = (nl_c + nb - 1) / nb;
  const char* pf_w = reinterpret_cast<const char*>(tsrc + kRT * n + i1);
  char* pf_c = reinterpret_cast<char*>(a.codes + rl0 * n + i1);
  int64_t kw = 0, kc = 0, lw = 0, lc = 0;  // lines issued; line within the current row
  for (int64_t sb = i1; sb < i2; sb += kSB) {
    const int64_t se = std::min(sb + kSB, i2);
    for (int64_t i = sb; i < se; ++i) {
      for (int64_t t = 0; t < step_w && kw < nl_w; ++t, ++kw) {  // (counters, not kw / lpr: no divisions)
        __builtin_prefetch(pf_w + lw * 64, 0, 2);
        if (++lw == lpr_w) {
          lw = 0;
          pf_w += n * 4;
        }
      }
      for (int64_t t = 0; t < step_c && kc < nl_c; ++t, ++kc) {
        __builtin_prefetch(pf_c + lc * 64, 1, 3);
        if (++lc == lpr_c) {
          lc = 0;
          pf_c += n;
        }
      }
      const int32_t g = a.g[i];
      if (a.dynamic_groups && a.run_end[i] >= 0) {  // block-start values (src), see solver.h
        const int64_t len = a.run_end[i] - i;
        for (int r = 0; r < nr; ++r) {
          const float* row = tsrc + r * n + i;
          float lo, hi;
#if QK_AVX2
          if constexpr (S == Simd::avx512) minmax_row_avx512(row, len, &lo, &hi);
          if constexpr (S == Simd::avx2) minmax_row_avx2(row, len, &lo, &hi);
#endif
          if constexpr (S == Simd::generic) minmax_row_generic(row, len, &lo, &hi);
          qk::grid_params(lo, hi, a.bits, a.sym, &a.sc[g * m + r0 + r], &a.zr[g * m + r0 + r]);
        }
      }
      if (g != gcur) {  // a new group: its params for the tile's rows
        gcur = g;
        const float* sg = a.sc + g * m + r0;
        const float* zg = a.zr + g * m + r0;
        if (nr == kRT) {
          for (int r = 0; r < kRT; ++r) {
            s[r] = sg[r];
            z[r] = zg[r];
          }
        } else {
          for (int r = 0; r < kRT; ++r) {
            s[r] = r < nr ? sg[r] : 1.f;
            z[r] = r < nr ? zg[r] : 0.f;
          }
        }
      }
      const float d = a.u[i * a.n + i];
      const float* col = &w1[(i - i1) * kRT];
      uint8_t* cb = a.cbuf + (i - i1) * kRT;
      for (int r = 0; r < kRT; ++r) {
        w[r] = col[r];
        c[r] = qk::quant_code(w[r], s[r], z[r], a.maxq);
        q[r] = qk::dequant(c[r], s[r], z[r]);
        e[r] = (w[r] - q[r]) / d;
        cb[r] = static_cast<uint8_t>(c[r]);  // integer-valued, in [0, maxq]
      }
      for (int r = 0; r < kRT; ++r) lsum[r] += static_cast<double>(e[r]) * static_cast<double>(e[r]);
      float* edst = a.errT + (i - i1) * mc + rl0;
      if (nr == kRT) {
        for (int r = 0; r < kRT; ++r) edst[r] = e[r];
      } else {
        for (int r = 0; r < nr; ++r) edst[r] = e[r];
      }
      if (HasP) {
        float* qdst = a.qT + (i - i1) * mc + rl0;
        for (int r = 0; r < nr; ++r) qdst[r] = q[r];
      }
      std::memcpy(&ev[(i - sb) * kRT], e, sizeof(e));
      if (HasP) std::memcpy(&wv[(i - sb) * kRT], w, sizeof(w));
      const float* urow = a.u + i * a.n;
      const float* prow = HasP ? a.p + i * a.n : nullptr;
#if QK_AVX2
      if constexpr (S == Simd::avx512) update_avx512(w1, e, w, urow, prow, i + 1, se, i1);
      if constexpr (S == Simd::avx2) update_avx2(w1, e, w, urow, prow, i + 1, se, i1);
#endif
      if constexpr (S == Simd::generic) update_generic(w1, e, w, urow, prow, i + 1, se, i1);
    }
    const float* ub = a.u + sb * a.n + i1;
    const float* pb = HasP ? a.p + sb * a.n + i1 : nullptr;
#if QK_AVX2
    if constexpr (S == Simd::avx512) lazy_avx512<HasP>(w1, ev, wv, ub, pb, a.n, se - sb, se - i1, i2 - i1);
    if constexpr (S == Simd::avx2) lazy_avx2<HasP>(w1, ev, wv, ub, pb, a.n, se - sb, se - i1, i2 - i1);
#endif
    if constexpr (S == Simd::generic) lazy_generic<HasP>(w1, ev, wv, ub, pb, a.n, se - sb, se - i1, i2 - i1);
  }
  for (int r = 0; r < nr; ++r) a.ls[r0 + r] = lsum[r];
  uint8_t* tcodes = a.codes + rl0 * n + i1;
#if QK_AVX2
  for (int64_t j = 0; j < nb8; j += 8)
    for (int r = 0; r < kRT; r += 8) transpose8x8_bytes(a.cbuf + j * kRT + r, kRT, tcodes + r * n + j, n);
#endif
  for (int64_t j = nb8; j < nb; ++j)
    for (int r = 0; r < nr; ++r) tcodes[r * n + j] = a.cbuf[j * kRT + r];
}

// The gptq_block_solve kernels: one row tile, one block.
using TileFn = void (*)(const TileArgs&, int64_t, int64_t, int64_t, int64_t, vrow*);

template <bool HasP>
void gptq_block_generic(const TileArgs& a, int64_t r0, int64_t nr, int64_t i1, int64_t i2, vrow* w1v) {
  tile_block<HasP, Simd::generic>(a, r0, nr, i1, i2, w1v);
}

#if QK_AVX2
template <bool HasP>
void gptq_block_avx2(const TileArgs& a, int64_t r0, int64_t nr, int64_t i1, int64_t i2, vrow* w1v) {
  tile_block<HasP, Simd::avx2>(a, r0, nr, i1, i2, w1v);
}

template <bool HasP>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void gptq_block_avx512(const TileArgs& a, int64_t r0,
                                                                                     int64_t nr, int64_t i1,
                                                                                     int64_t i2, vrow* w1v) {
  tile_block<HasP, Simd::avx512>(a, r0, nr, i1, i2, w1v);
}
#endif

// The once-per-block GEMM in the transposed layout: WT[i2:, :] += alpha * F[i1:i2, i2:]^T @ XT[:nb, :]
// (F = U with the errors, or P with the quantized values). Shared by both ops.
void tail_update(at::Tensor& WT, const at::Tensor& F, const at::Tensor& XT, int64_t i1, int64_t i2, int64_t n,
                 double alpha) {
  at::Tensor tail = WT.slice(0, i2, n);
  tail.addmm_(F.slice(0, i1, i2).slice(1, i2, n).t(), XT.slice(0, 0, i2 - i1), 1.0, alpha);
}

// Rows per independent chunk (K beams per row count as K rows). The same rule for both ops, so
// ksnrq with K = 1 runs exactly the GEMM shapes of gptq_block_solve (bit-identical results).
int64_t chunk_rows(int64_t m, int64_t K) {
  const int64_t beam_rows = 512;
  return std::max<int64_t>(1, std::min<int64_t>(m, beam_rows / K));
}

struct Groups {
  std::vector<int32_t> g, run_end;  // group of column i; end of the run if i starts one, else -1
};

Groups group_runs(const at::Tensor& gidx, int64_t G, bool check_unique, const char* op) {
  Groups r;
  const int64_t n = gidx.size(0);
  const int32_t* gp = gidx.data_ptr<int32_t>();
  r.g.assign(gp, gp + n);
  r.run_end.assign(n, -1);
  std::vector<char> seen(G, 0);
  for (int64_t s = 0; s < n;) {
    int64_t e = s + 1;
    while (e < n && r.g[e] == r.g[s]) ++e;
    TORCH_CHECK(r.g[s] >= 0 && r.g[s] < G, op, ": gidx value ", r.g[s], " outside [0, ", G, ")");
    if (check_unique) {
      TORCH_CHECK(!seen[r.g[s]], op, ": dynamic group params need every group to be one contiguous run of gidx "
                  "(group ", r.g[s], " appears twice)");
      seen[r.g[s]] = 1;
    }
    r.run_end[s] = static_cast<int32_t>(e);
    s = e;
  }
  return r;
}

void check_common(const char* op, const at::Tensor& W, const at::Tensor& U, const at::Tensor& gidx,
                  const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t blocksize) {
  TORCH_CHECK(W.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kFloat, op, ": W must be 2-D fp32, got ", W.sizes(), " ",
              W.scalar_type());
  const int64_t m = W.size(0), n = W.size(1);
  TORCH_CHECK(U.dim() == 2 && U.size(0) == n && U.size(1) == n && U.scalar_type() == at::kFloat, op,
              ": U must be fp32 [n, n] with n = ", n, ", got ", U.sizes());
  TORCH_CHECK(gidx.dim() == 1 && gidx.size(0) == n && gidx.scalar_type() == at::kInt, op,
              ": gidx must be int32 [", n, "], got ", gidx.sizes(), " ", gidx.scalar_type());
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) == m && scales.scalar_type() == at::kFloat &&
                  zeros.sizes() == scales.sizes() && zeros.scalar_type() == at::kFloat,
              op, ": scales/zeros must be fp32 [G, ", m, "], got ", scales.sizes(), " / ", zeros.sizes());
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, op, ": bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be > 0, got ", blocksize);
}

#if QK_AVX2
// In-place permutation of one tail row's beams, row[q] = row[gather[q]], where every beam's source
// lies in its own row's K-group and K divides 16: one vpermps per 16 floats, idx precomputed.
__attribute__((target("avx512f"))) static void permute_row_avx512(float* row, const int32_t* idx, int64_t ld) {
  for (int64_t q = 0; q < ld; q += 16) {
    const __m512i iv = _mm512_loadu_si512(idx + q);
    if (q + 16 <= ld) {
      _mm512_storeu_ps(row + q, _mm512_permutexvar_ps(iv, _mm512_loadu_ps(row + q)));
    } else {
      const __mmask16 k = static_cast<__mmask16>((1u << (ld - q)) - 1u);
      _mm512_mask_storeu_ps(row + q, k, _mm512_permutexvar_ps(iv, _mm512_maskz_loadu_ps(k, row + q)));
    }
  }
}

// Greedy child of every beam of one column at once (AVX2, 8 beams a vector): the code, its error
// and inc0 = e^2 as float64. Same IEEE ops as qk::quant_code / qk::dequant (bit-identical), but the
// K division chains overlap instead of running one beam after another.
static void greedy_children(const float* w, int64_t K, float s, float z, float d, float maxq, int32_t* cg, float* e0,
                            double* inc0) {
  int64_t b = 0;
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), vd = _mm256_set1_ps(d);
  const __m256 vmax = _mm256_set1_ps(maxq), zero = _mm256_setzero_ps();
  for (; b + 8 <= K; b += 8) {
    const __m256 vw = _mm256_loadu_ps(w + b);
    __m256 c = _mm256_add_ps(_mm256_round_ps(_mm256_div_ps(vw, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
    c = _mm256_min_ps(_mm256_max_ps(c, zero), vmax);
    const __m256 e = _mm256_div_ps(_mm256_sub_ps(vw, _mm256_mul_ps(vs, _mm256_sub_ps(c, vz))), vd);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cg + b), _mm256_cvttps_epi32(c));
    _mm256_storeu_ps(e0 + b, e);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(e)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1));
    _mm256_storeu_pd(inc0 + b, _mm256_mul_pd(lo, lo));
    _mm256_storeu_pd(inc0 + b + 4, _mm256_mul_pd(hi, hi));
  }
  for (; b < K; ++b) {
    const float c = qk::quant_code(w[b], s, z, maxq);
    cg[b] = static_cast<int32_t>(c);
    e0[b] = (w[b] - qk::dequant(c, s, z)) / d;
    inc0[b] = static_cast<double>(e0[b]) * static_cast<double>(e0[b]);
  }
}
#endif  // QK_AVX2

// The same greedy children one beam at a time (the AVX2 loop's scalar tail).
static void greedy_children_generic(const float* w, int64_t K, float s, float z, float d, float maxq, int32_t* cg,
                                    float* e0, double* inc0) {
  for (int64_t b = 0; b < K; ++b) {
    const float c = qk::quant_code(w[b], s, z, maxq);
    cg[b] = static_cast<int32_t>(c);
    e0[b] = (w[b] - qk::dequant(c, s, z)) / d;
    inc0[b] = static_cast<double>(e0[b]) * static_cast<double>(e0[b]);
  }
}

// ---- the named kernels (quantkern/kernels.py): name, what it needs from the CPU, its parts ----------
struct GptqKernel {
  const char* name;
  qk::cpu::Need need;
  TileFn with_p, without_p;
};
const GptqKernel kGptqKernels[] = {
#if QK_AVX2
    {"gptq_block_avx512", qk::cpu::Need::avx512, gptq_block_avx512<true>, gptq_block_avx512<false>},
    {"gptq_block_avx2", qk::cpu::Need::avx2, gptq_block_avx2<true>, gptq_block_avx2<false>},
#endif
    {"gptq_block_generic", qk::cpu::Need::generic, gptq_block_generic<true>, gptq_block_generic<false>},
};

struct KsnrqKernel {
  const char* name;
  qk::cpu::Need need;
  void (*greedy)(const float*, int64_t, float, float, float, float, int32_t*, float*, double*);
  void (*permute)(float*, const int32_t*, int64_t);  // null: the scalar gather
};
const KsnrqKernel kKsnrqKernels[] = {
#if QK_AVX2
    {"ksnrq_avx512", qk::cpu::Need::avx512, greedy_children, permute_row_avx512},
    {"ksnrq_avx2", qk::cpu::Need::avx2, greedy_children, nullptr},
#endif
    {"ksnrq_generic", qk::cpu::Need::generic, greedy_children_generic, nullptr},
};


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gptq_block_solve(
    const at::Tensor& W_in, const at::Tensor& U_in, const std::optional<at::Tensor>& P_in, const at::Tensor& gidx_in,
    const at::Tensor& scales_in, const at::Tensor& zeros_in, int64_t bits, bool sym, bool dynamic_groups,
    int64_t blocksize, c10::string_view kernel) {
  const char* op = "quantkern::gptq_block_solve";
  check_common(op, W_in, U_in, gidx_in, scales_in, zeros_in, bits, blocksize);
  const GptqKernel& kern = qk::cpu::find_kernel(kGptqKernels, kernel, op);
  const int64_t m = W_in.size(0), n = W_in.size(1), G = scales_in.size(0);
  const bool has_p = P_in.has_value() && P_in->defined();
  if (has_p)
    TORCH_CHECK(P_in->dim() == 2 && P_in->size(0) == n && P_in->size(1) == n && P_in->scalar_type() == at::kFloat,
                op, ": P must be fp32 [n, n] or None, got ", P_in->sizes());
  const at::Tensor W = W_in.contiguous(), U = U_in.contiguous(), gidx = gidx_in.contiguous();  // row stride n below
  const at::Tensor P = has_p ? P_in->contiguous() : at::Tensor();
  at::Tensor scales = scales_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor zeros = zeros_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor codes = at::empty({m, n}, W_in.options().dtype(at::kByte));
  at::Tensor loss = at::zeros({m}, W_in.options().dtype(at::kDouble));
  if (m == 0 || n == 0) return {codes, scales, zeros, loss};
  const Groups gr = group_runs(gidx, G, dynamic_groups, op);

  const int64_t B = std::min<int64_t>(blocksize, n);
  const float* u = U.data_ptr<float>();
  const float* p = has_p ? P.data_ptr<float>() : nullptr;
  float* sc = scales.data_ptr<float>();
  float* zr = zeros.data_ptr<float>();
  double* ls = loss.data_ptr<double>();
  const float maxq = static_cast<float>((1 << bits) - 1);

  // Rows never interact, so every chunk of rows runs the WHOLE blocked algorithm on its own,
  // tail GEMMs included: no barrier per block (robust when the CPU is shared), chunks handed out
  // dynamically.
  const int64_t rows = chunk_rows(m, 1);
  const TileFn tile_fn = has_p ? kern.with_p : kern.without_p;
  qk::cpu::dynamic_each((m + rows - 1) / rows, [&](int64_t chunk) {
    const int64_t c0 = chunk * rows, c1 = std::min(m, c0 + rows), mc = c1 - c0;
    const at::Tensor Wchunk = W.slice(0, c0, c1);                      // [mc, n], row stride n
    at::Tensor Wc = n > B ? at::empty({mc, n}, W_in.options()) : Wchunk;  // working copy, columns >= B used
    at::Tensor ErrT = at::empty({B, mc}, W_in.options());
    at::Tensor QT = has_p ? at::empty({B, mc}, W_in.options()) : at::Tensor();
    // the tile block and the tile's codes, aligned by hand (std::vector does not promise over-aligned storage)
    std::vector<char> w1buf(static_cast<size_t>(B) * (sizeof(vrow) + kRT) + 128);
    vrow* w1v = reinterpret_cast<vrow*>((reinterpret_cast<uintptr_t>(w1buf.data()) + 127) & ~uintptr_t(127));
    TileArgs ta{Wchunk.data_ptr<float>(), u, p, sc, zr, codes.data_ptr<uint8_t>() + c0 * n, ls,
                ErrT.data_ptr<float>(), has_p ? QT.data_ptr<float>() : nullptr, reinterpret_cast<uint8_t*>(w1v + B),
                gr.g.data(), gr.run_end.data(), n, m, mc, c0, static_cast<int>(bits), sym, dynamic_groups, maxq};
    for (int64_t i1 = 0; i1 < n; i1 += B) {
      const int64_t i2 = std::min(i1 + B, n);
      for (int64_t r0 = c0; r0 < c1; r0 += kRT) tile_fn(ta, r0, std::min<int64_t>(kRT, c1 - r0), i1, i2, w1v);
      if (i2 < n) {
        at::Tensor tail = Wc.slice(1, i2, n);
        if (i1 == 0) {  // the first block read W itself; the working copy starts here (plain row memcpys)
          const float* wsrc = Wchunk.data_ptr<float>();
          float* wdst = Wc.data_ptr<float>();
          for (int64_t r = 0; r < mc; ++r) std::memcpy(wdst + r * n + i2, wsrc + r * n + i2, (n - i2) * sizeof(float));
          ta.src = wdst;
        }
        tail.addmm_(ErrT.slice(0, 0, i2 - i1).t(), U.slice(0, i1, i2).slice(1, i2, n), 1.0, -1.0);
        if (has_p) tail.addmm_(QT.slice(0, 0, i2 - i1).t(), P.slice(0, i1, i2).slice(1, i2, n), 1.0, 1.0);
      }
    }
  });
  return {codes, scales, zeros, loss};
}

// ------------------------------------------------------------------------------------------------
struct Cand {
  double score;
  int64_t key;   // (parent << bits) + rank (rank 0 = the greedy code): the tie order of solver.h
  float err;     // e_c as scored (kept so the winners need no second division)
  int32_t code;
  bool operator<(const Cand& o) const { return score < o.score || (score == o.score && key < o.key); }
};


std::tuple<at::Tensor, at::Tensor> ksnrq_solve(const at::Tensor& W_in, const at::Tensor& U_in,
                                               const at::Tensor& gidx_in, const at::Tensor& scales_in,
                                               const at::Tensor& zeros_in, int64_t bits, int64_t K,
                                               int64_t blocksize, c10::string_view kernel) {
  const char* op = "quantkern::ksnrq_solve";
  check_common(op, W_in, U_in, gidx_in, scales_in, zeros_in, bits, blocksize);
  const KsnrqKernel& kern = qk::cpu::find_kernel(kKsnrqKernels, kernel, op);
  TORCH_CHECK(K >= 1, op, ": K must be >= 1, got ", K);
  const int64_t m = W_in.size(0), n = W_in.size(1), G = scales_in.size(0);
  const at::Tensor U = U_in.contiguous(), gidx = gidx_in.contiguous();
  const at::Tensor scales = scales_in.contiguous(), zeros = zeros_in.contiguous();
  at::Tensor codes = at::empty({m, n}, W_in.options().dtype(at::kByte));
  at::Tensor loss = at::zeros({m}, W_in.options().dtype(at::kDouble));
  if (m == 0 || n == 0) return {codes, loss};
  const Groups gr = group_runs(gidx, G, false, op);
  const int L = 1 << bits;
  const float maxq = static_cast<float>(L - 1);
  const int64_t B = std::min<int64_t>(blocksize, n), nblk = (n + B - 1) / B;

  uint8_t* cd = codes.data_ptr<uint8_t>();
  double* lp = loss.data_ptr<double>();
  const float* u = U.data_ptr<float>();
  const float* sc = scales.data_ptr<float>();
  const float* zr = zeros.data_ptr<float>();
  const double inf = std::numeric_limits<double>::infinity();

  // As gptq_block_solve: every chunk of rows runs the whole search, its tail GEMMs included, in
  // the same transposed layout (so K = 1 runs exactly the greedy kernel's GEMMs).
  const int64_t rows = chunk_rows(m, K);
  const bool vec_perm = kern.permute != nullptr && 16 % K == 0;  // a row's K beams never straddle a 16-float vector
  qk::cpu::dynamic_each((m + rows - 1) / rows, [&](int64_t chunk) {
    const int64_t c0 = chunk * rows, c1 = std::min(m, c0 + rows), mc = c1 - c0, ld = mc * K;
    // column (r - c0) * K + b of WkT [n, ld] is beam b of row r; only columns >= the block are live
    at::Tensor WkT = W_in.slice(0, c0, c1).unsqueeze(1).expand({mc, K, n}).reshape({ld, n}).t().contiguous();
    at::Tensor ErrT = at::zeros({B, ld}, W_in.options());
    float* wk = WkT.data_ptr<float>();
    std::vector<double> Sp(static_cast<size_t>(ld), inf);
    for (int64_t r = 0; r < mc; ++r) Sp[r * K] = 0.0;
    // codes of the final beam b of each block (in-block slice) and its block-start ancestor
    std::vector<uint8_t> bcodes(static_cast<size_t>(ld) * n);
    std::vector<int32_t> banc(static_cast<size_t>(mc) * nblk * K);
    const int64_t Bp = (B + 7) & ~int64_t{7};  // block row stride, a whole number of 8-float vectors
    std::vector<float> cur(static_cast<size_t>(K) * Bp, 0.f), nxt(static_cast<size_t>(K) * Bp, 0.f);
    std::vector<float> ublk(static_cast<size_t>(B) * Bp, 0.f);  // U's block, strict upper part, padded
    std::vector<double> score(K), nscore(K);
    std::vector<Cand> cand(static_cast<size_t>(K));
    std::vector<float> wcol(static_cast<size_t>(K)), e0v(static_cast<size_t>(K));
    std::vector<int32_t> cgv(static_cast<size_t>(K));
    std::vector<double> inc0v(static_cast<size_t>(K));
    std::vector<int64_t> slots(static_cast<size_t>(K));
    std::vector<int32_t> par(static_cast<size_t>(B) * K);
    std::vector<uint8_t> chosen(static_cast<size_t>(B) * K);
    std::vector<float> cerr(static_cast<size_t>(B) * K);
    std::vector<int32_t> gather(static_cast<size_t>(ld));
    std::vector<float> tmp(static_cast<size_t>(ld));
    std::vector<int32_t> pidx(static_cast<size_t>(ld + 16), 0);
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t i1 = blk * B, i2 = std::min(i1 + B, n), nb = i2 - i1, nbp = (nb + 7) & ~int64_t{7};
      float* err = ErrT.data_ptr<float>();
      std::fill(ublk.begin(), ublk.end(), 0.f);
      for (int64_t a = 0; a < nb; ++a)
        for (int64_t j = a + 1; j < nb; ++j) ublk[a * Bp + j] = u[(i1 + a) * n + i1 + j];
      bool reorder = false;
      for (int64_t rl = 0; rl < mc; ++rl) {
        const int64_t r = c0 + rl;
        for (int64_t b = 0; b < K; ++b) {
          for (int64_t j = 0; j < nb; ++j) cur[b * Bp + j] = wk[(i1 + j) * ld + rl * K + b];
          score[b] = Sp[rl * K + b];
        }
        for (int64_t i = i1; i < i2; ++i) {
          const int64_t ii = i - i1;
          const int32_t g = gr.g[i];
          const float s = sc[g * m + r], z = zr[g * m + r], d = u[i * n + i];
          // Only the K best children of a beam can survive: c0 and the K-1 nearest levels on each
          // side. Every child of beam b scores >= S_b + inc0 (the max rule) and scores grow
          // monotonically away from c0 on each side (monotone float ops), so a beam or a side stops
          // as soon as it cannot beat the current K-th candidate. Same survivors and order as
          // scoring every level (solver.h); kept sorted by (score, key) with insertion.
          int64_t nc = 0;
          auto offer = [&](double sc_, int64_t key, float e, int code) {
            const Cand cn{sc_, key, e, code};
            if (nc == K && !(cn < cand[K - 1])) return false;
            int64_t pos = nc < K ? nc++ : K - 1;
            while (pos > 0 && cn < cand[pos - 1]) {
              cand[pos] = cand[pos - 1];
              --pos;
            }
            cand[pos] = cn;
            return true;
          };
          for (int64_t b = 0; b < K; ++b) wcol[b] = cur[b * Bp + ii];
          kern.greedy(wcol.data(), K, s, z, d, maxq, cgv.data(), e0v.data(), inc0v.data());
          for (int64_t b = 0; b < K; ++b) {
            if (score[b] == inf) continue;  // dead beam: all its children are +inf
            const float w = wcol[b];
            const int cg = cgv[b];
            const float e0 = e0v[b];
            const double inc0 = inc0v[b];
            const int64_t kb = b << bits;
            if (!offer(score[b] + inc0, kb, e0, cg)) continue;
            const int reach = static_cast<int>(std::min<int64_t>(K - 1, L - 1));
            for (int c = cg + 1; c <= std::min(L - 1, cg + reach); ++c) {
              const float e = (w - qk::dequant(static_cast<float>(c), s, z)) / d;
              const double inc = std::max(static_cast<double>(e) * static_cast<double>(e), inc0);
              if (nc == K && score[b] + inc > cand[K - 1].score) break;
              offer(score[b] + inc, kb + c, e, c);
            }
            for (int c = cg - 1; c >= std::max(0, cg - reach); --c) {
              const float e = (w - qk::dequant(static_cast<float>(c), s, z)) / d;
              const double inc = std::max(static_cast<double>(e) * static_cast<double>(e), inc0);
              if (nc == K && score[b] + inc > cand[K - 1].score) break;
              offer(score[b] + inc, kb + c + 1, e, c);
            }
          }
          while (nc < K) {  // fewer live candidates than beams (start of the search): dead beams
            cand[nc] = Cand{inf, (K << bits) + nc, 0.f, 0};
            ++nc;
          }
          for (int64_t t = 0; t < K; ++t) {
            if (cand[t].score == inf) {  // dead beam: keep a finite copy of beam 0, score +inf
              nscore[t] = inf;
              par[ii * K + t] = 0;
              chosen[ii * K + t] = 0;
              cerr[ii * K + t] = 0.f;
              std::copy_n(&cur[0], Bp, &nxt[t * Bp]);
              continue;
            }
            const int64_t pb = cand[t].key >> bits;
            const int code = cand[t].code;
            const float e = cand[t].err;
            nscore[t] = cand[t].score;
            par[ii * K + t] = static_cast<int32_t>(pb);
            chosen[ii * K + t] = static_cast<uint8_t>(code);
            cerr[ii * K + t] = e;
            const float* src = &cur[pb * Bp];
            float* dst = &nxt[t * Bp];
            // whole 8-float vectors from the one holding column ii + 1 on: entries <= ii are never
            // read again and the padding of ublk is zero, so the extra lanes are harmless
            const float* ur = &ublk[ii * Bp];
            for (int64_t j = (ii + 1) & ~int64_t{7}; j < nbp; j += 8)
              for (int v = 0; v < 8; ++v) dst[j + v] = src[j + v] - e * ur[j + v];
          }
          std::swap(cur, nxt);
          std::swap(score, nscore);
        }
        // resolve the block by traceback: codes and errors of every final beam, block-start ancestor
        int32_t* anc = &banc[(rl * nblk + blk) * K];
        // (column-outer so the K pointer chains overlap)
        for (int64_t b = 0; b < K; ++b) slots[b] = b;
        for (int64_t ii = nb - 1; ii >= 0; --ii) {
          float* erow = err + ii * ld + rl * K;
          for (int64_t b = 0; b < K; ++b) {
            const int64_t slot = slots[b];
            bcodes[(rl * K + b) * n + i1 + ii] = chosen[ii * K + slot];
            erow[b] = cerr[ii * K + slot];
            slots[b] = par[ii * K + slot];
          }
        }
        for (int64_t b = 0; b < K; ++b) {
          const int64_t slot = slots[b];
          anc[b] = static_cast<int32_t>(slot);
          gather[rl * K + b] = static_cast<int32_t>(rl * K + slot);
          reorder |= slot != b;
          Sp[rl * K + b] = score[b];
        }
      }
      if (i2 < n) {
        if (reorder) {  // beams' tails follow their block-start ancestors (one pass over the tail)
          if (vec_perm) {
            for (int64_t q = 0; q < ld; ++q) pidx[q] = gather[q] - (q & ~int64_t{15});
            for (int64_t j = i2; j < n; ++j) kern.permute(wk + j * ld, pidx.data(), ld);
          } else {
            for (int64_t j = i2; j < n; ++j) {
              float* row = wk + j * ld;
              std::copy_n(row, ld, tmp.data());
              for (int64_t q = 0; q < ld; ++q) row[q] = tmp[gather[q]];
            }
          }
        }
        tail_update(WkT, U, ErrT, i1, i2, n, -1.0);
      }
    }
    // best beam, then follow ancestors back block by block
    for (int64_t rl = 0; rl < mc; ++rl) {
      int64_t best = 0;
      for (int64_t b = 1; b < K; ++b)
        if (Sp[rl * K + b] < Sp[rl * K + best]) best = b;
      lp[c0 + rl] = Sp[rl * K + best];
      int64_t slot = best;
      for (int64_t blk = nblk - 1; blk >= 0; --blk) {
        const int64_t i1 = blk * B, i2 = std::min(i1 + B, n);
        std::copy_n(&bcodes[(rl * K + slot) * n + i1], i2 - i1, cd + (c0 + rl) * n + i1);
        slot = banc[(rl * nblk + blk) * K + slot];
      }
    }
  });
  return {codes, loss};
}

// Test hook: qk::grid_params on per-row min/max (must equal quantkern.grid.find_params).
std::tuple<at::Tensor, at::Tensor> grid_params_op(const at::Tensor& vmin, const at::Tensor& vmax, int64_t bits,
                                                  bool sym) {
  TORCH_CHECK(vmin.scalar_type() == at::kFloat && vmax.sizes() == vmin.sizes() && vmax.scalar_type() == at::kFloat,
              "quantkern::grid_params: vmin/vmax must be fp32 of one shape");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "quantkern::grid_params: bad bits ", bits);
  const at::Tensor a = vmin.contiguous(), b = vmax.contiguous();
  at::Tensor s = at::empty_like(a), z = at::empty_like(a);
  for (int64_t i = 0; i < a.numel(); ++i)
    qk::grid_params(a.data_ptr<float>()[i], b.data_ptr<float>()[i], static_cast<int>(bits), sym,
                    s.data_ptr<float>() + i, z.data_ptr<float>() + i);
  return {s, z};
}

at::Tensor round_to_half_op(const at::Tensor& x) {
  const at::Tensor a = x.contiguous().to(at::kFloat);
  at::Tensor out = at::empty_like(a);
  for (int64_t i = 0; i < a.numel(); ++i) out.data_ptr<float>()[i] = qk::round_to_half(a.data_ptr<float>()[i]);
  return out;
}

}  // namespace

std::vector<std::pair<std::string, std::string>> qk::cpu::solver_kernels() {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& k : kGptqKernels) out.emplace_back(k.name, need_name(k.need));
  for (const auto& k : kKsnrqKernels) out.emplace_back(k.name, need_name(k.need));
  return out;
}

TORCH_LIBRARY_FRAGMENT(quantkern, m) {
  // kernel: a name from kGptqKernels / kKsnrqKernels on CPU tensors, "gptq_cuda" on CUDA tensors
  m.def("gptq_block_solve(Tensor W, Tensor U, Tensor? P, Tensor gidx, Tensor scales, Tensor zeros, int bits, "
        "bool sym, bool dynamic_groups, int blocksize, str kernel) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ksnrq_solve(Tensor W, Tensor U, Tensor gidx, Tensor scales, Tensor zeros, int bits, int K, "
        "int blocksize, str kernel) -> (Tensor, Tensor)");
  m.def("grid_params(Tensor vmin, Tensor vmax, int bits, bool sym) -> (Tensor, Tensor)");
  m.def("round_to_half(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantkern, CPU, m) {
  m.impl("gptq_block_solve", &gptq_block_solve);
  m.impl("ksnrq_solve", &ksnrq_solve);
  m.impl("grid_params", &grid_params_op);
  m.impl("round_to_half", &round_to_half_op);
}
