// AMX-INT8 GEMV for 2- and 3-bit weights (decode, few tokens), on the unchanged bit-plane layout.
//
// x is written as 3 signed base-128 digit planes per run of <= 4 k-blocks (22-bit fixed point, as the
// 4-bit VNNI path does per k-block), so tdpbsud's int32 dot products are exact and the only rounding
// is x's (<= 2^-22 of the run's max |x|). A tile rows = digit planes x tokens, B tile = unsigned
// codes of 16 rows x 64 channels, C = int32 [planes x tokens][16 rows].
//
// Why: the fp32 LUT GEMV costs a shift + vpermps + add per 4 bits of weights and 16 rows, so it is
// compute-bound at 2/3 bits, and per token. Here the vector units only turn planes into code bytes
// (planes 0 and 1 merged per nibble, then one GF2P8AFFINEQB per B-tile row yields bits 0-1 of 64
// codes; 3-bit adds one affine + OR for plane 2; a store writes the row) and the tile unit does the
// multiply-adds for up to 5 tokens at once. Measured (docs/cpu_qgemm.md): 1.5-2.7x the LUT/FMA GEMVs
// at 2-8 tokens; at 1 token about the LUT GEMV's speed (both wait on DRAM), ahead on short rows.
//
// Channel order: a plane word holds native position p = 8 * byte + t at bit t of byte `byte`. B-tile row
// t of a k-block takes bit t of every byte, so byte j of a row's dword is position 8j + t; the A tile's
// k index 4t + j must therefore hold x at native position 8j + t (the digit writer transposes each
// k-block's 4 x 8 positions).
// GCC 12 flags the deliberately undefined upper lanes inside <avx512fintrin.h> (_mm512_undefined_*) a few
// hundred times per build: a false positive in the compiler's own header.
#if defined(__x86_64__) || defined(__i386__)  // (elsewhere: compiled out, see cpu_features.h)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,gfni,amx-tile,amx-int8")
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "qgemm_avx512_common.h"
#include "qgemm_kernels.h"

namespace qk::cpu::qgemm {
namespace {

struct TileConfig {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Weight prefetch distance per row-tile stream, in int32 words (2 KiB; 1, 4 and 8 KiB and an extra
// L2 prefetch 16 KiB ahead measured the same or worse within the noise on the test VM).
constexpr int64_t kPrefetchAmx = 512;
constexpr int kUnpackAhead = 2;  // chunks unpacked ahead of the one multiplying (see gemv_amx_group)

bool detect_amx() {
#if defined(__linux__) && (defined(__x86_64__) || defined(__i386__))
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1, int8 = (d >> 25) & 1, gfni = (c >> 8) & 1;
  if (!(tile && int8 && gfni)) return false;
  // the kernel must enable XTILEDATA (state component 18) for this process; refused on old kernels
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
  return false;
#endif
}

// GF(2) affine matrices (out bit i = parity(row i & byte); row i is byte 7 - i of the qword).
// Planes 0 and 1 are first merged per byte into lo = [p0 bits 0-3 | p1 bits 0-3 << 4] and
// hi = [p0 bits 4-7 | p1 bits 4-7 << 4] (one shift and one bit-select each), so one affine per B-tile
// row yields bits 0-1 of every code: merged[u] moves byte bits u and u + 4 to bits 0 and 1.
// plane2[t] moves bit t of a plane-2 byte to bit 2.
struct Movers {
  __m512i merged[4], plane2[8];
};

inline Movers make_movers() {
  Movers mv;
  for (int u = 0; u < 4; ++u)
    mv.merged[u] = _mm512_set1_epi64(static_cast<long long>(((uint64_t{1} << u) << 56) | ((uint64_t{1} << (u + 4)) << 48)));
  for (int t = 0; t < 8; ++t) mv.plane2[t] = _mm512_set1_epi64(static_cast<long long>((uint64_t{1} << t) << 40));
  return mv;
}

// Unpacks one k-block of one row tile (BITS plane words at w, stride 16) into 8 B-tile rows at dst:
// row t = bit t of every plane byte, i.e. byte j of a row's dword is native position 8j + t.
template <int BITS>
inline void unpack_kblock(const int32_t* w, const Movers& mv, uint8_t* dst) {
  const __m512i p0 = _mm512_loadu_si512(w), p1 = _mm512_loadu_si512(w + kTileRows);
  const __m512i nib = _mm512_set1_epi32(0x0F0F0F0F);
  // a ? b : c per bit = 0xCA
  const __m512i lo = _mm512_ternarylogic_epi32(nib, p0, _mm512_slli_epi32(p1, 4), 0xCA);
  const __m512i hi = _mm512_ternarylogic_epi32(nib, _mm512_srli_epi32(p0, 4), p1, 0xCA);
  __m512i p2 = _mm512_setzero_si512();
  if constexpr (BITS == 3) p2 = _mm512_loadu_si512(w + 2 * kTileRows);
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t) {
    __m512i v = _mm512_gf2p8affine_epi64_epi8(t < 4 ? lo : hi, mv.merged[t & 3], 0);
    if constexpr (BITS == 3) v = _mm512_or_si512(v, _mm512_gf2p8affine_epi64_epi8(p2, mv.plane2[t], 0));
    _mm512_store_si512(dst + t * 64, v);
  }
}

// Tile register numbers must be literals (GCC's _tile_* macros paste them into the asm). Tile registers
// are not renamed: a tile load waits until the multiplies that read the register's old contents are
// done, and a multiply waits for its loads. With one A and one B register per row tile every chunk
// waited for the last chunk's multiply and then for its own loads (~190 cycles per chunk); so even
// and odd chunks use their own A and B registers and the loads of one overlap the multiplies of the
// other. Even chunk: A = tmm0, B = tmm1 (row tile 0), tmm2 (row tile 1); odd chunk: A = tmm7, B = tmm3,
// tmm5; C = tmm4 (row tile 0), tmm6 (row tile 1): all 8 registers, 2 row tiles in flight.
template <int NT, int P>
inline void multiply_chunk(const int8_t* xq, int64_t lda, uint8_t (*bbuf)[16 * 64]) {
  if constexpr (P == 0) {
    _tile_loadd(0, xq, lda);
    _tile_loadd(1, bbuf[0], 64);
    _tile_dpbsud(4, 0, 1);
    if constexpr (NT > 1) {
      _tile_loadd(2, bbuf[1], 64);
      _tile_dpbsud(6, 0, 2);
    }
  } else {
    _tile_loadd(7, xq, lda);
    _tile_loadd(3, bbuf[0], 64);
    _tile_dpbsud(4, 7, 3);
    if constexpr (NT > 1) {
      _tile_loadd(5, bbuf[1], 64);
      _tile_dpbsud(6, 7, 5);
    }
  }
}

template <int T>
inline void store_c(int32_t* buf) {
  if constexpr (T == 0) { _tile_stored(4, buf, 64); _tile_zero(4); }
  if constexpr (T == 1) { _tile_stored(6, buf, 64); _tile_zero(6); }
}

template <int BITS, int NT>
void gemv_amx_group(const Layout& L, const AmxRuns& R, int B, const int8_t* xq,
                    const float* dx, const float* xsq, const float* bias, float* out, int64_t ldo, int64_t tile0,
                    const Movers& mv) {
  const int64_t tstride = L.KB * BITS * kTileRows;  // int32 words per row tile
  const int32_t* wt0 = L.qw + tile0 * tstride;
  const uint16_t* sc0 = L.sc + tile0 * L.G * 2 * kTileRows;
  const int64_t ldc = 3 * B * 64;  // bytes per chunk of A: [token][digit plane][64 channels], rows 64 apart
  // B tiles in a ring: chunk c + kUnpackAhead is unpacked while chunk c multiplies. The stores only
  // reach L1 after they retire, behind the (long) tile multiplies before them, and a tile load waits
  // for them: unpacking one chunk ahead left each chunk's multiplies waiting for the last chunk's.
  alignas(64) uint8_t bbuf[kUnpackAhead + 1][NT][16 * 64];
  alignas(64) int32_t cbuf[NT][16 * 16];
  __m512 y[NT][kMaxAmxBatch], facc[NT][kMaxAmxBatch];
  for (int t = 0; t < NT; ++t)
    for (int b = 0; b < B; ++b) y[t][b] = facc[t][b] = _mm512_setzero_ps();
  _tile_zero(4);
  if constexpr (NT > 1) _tile_zero(6);
  const int64_t nch = R.chunks;
  auto unpack = [&](int64_t c) {
    const int kb = R.chunk_kb[c], nk = R.run_kb[R.chunk_run[c] + 1] - kb < 2 ? 1 : 2;
#pragma GCC unroll 2
    for (int t = 0; t < NT; ++t) {
      const int32_t* wp = wt0 + t * tstride + static_cast<int64_t>(kb) * BITS * kTileRows;
      // past this tile's end, prefetch the start of the same stream in the next group of NT tiles
      // (tile t + NT; it follows in memory) instead of tile t + 1, which another stream reads now
      const int64_t ahead = static_cast<int64_t>(kb) * BITS * kTileRows + kPrefetchAmx;
      const int32_t* pf = wp + kPrefetchAmx + (ahead >= tstride ? (NT - 1) * tstride : 0);
      for (int i = 0; i < nk * BITS; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * kTileRows), _MM_HINT_T0);
      for (int h = 0; h < nk; ++h) unpack_kblock<BITS>(wp + h * BITS * kTileRows, mv, bbuf[c % (kUnpackAhead + 1)][t] + h * 8 * 64);
    }
  };
  int64_t r = 0, g = 0;  // current run and group
  while (g < L.G && R.group_run[g + 1] == 0) ++g;  // leading empty groups (no k-blocks)
  for (int t = 0; t < NT; ++t)
    for (int k = 0; k < kScaleAhead && k < L.G; ++k)
      _mm_prefetch(reinterpret_cast<const char*>(sc0 + (t * L.G + k) * 2 * kTileRows), _MM_HINT_T0);
  for (int64_t c = 0; c < kUnpackAhead && c < nch; ++c) unpack(c);
  for (int64_t c = 0; c < nch; ++c) {
    if (c + kUnpackAhead < nch) unpack(c + kUnpackAhead);
    if (c & 1) multiply_chunk<NT, 1>(xq + c * ldc, 64, bbuf[c % (kUnpackAhead + 1)]);
    else multiply_chunk<NT, 0>(xq + c * ldc, 64, bbuf[c % (kUnpackAhead + 1)]);
    if (R.chunk_kb[c] + 2 < R.run_kb[R.chunk_run[c] + 1]) continue;  // not the run's last chunk
    store_c<0>(cbuf[0]);
    if constexpr (NT > 1) store_c<1>(cbuf[1]);
    for (int t = 0; t < NT; ++t)
      for (int b = 0; b < B; ++b) {
        // a * 2^14 + b * 2^7 + c: |sum| <= 128 channels * 7 * 127 * 2^14 < 2^31
        const int32_t* cp = cbuf[t] + 3 * b * 16;
        __m512i v = _mm512_load_si512(cp);
        v = _mm512_add_epi32(_mm512_slli_epi32(v, 7), _mm512_load_si512(cp + 16));
        v = _mm512_add_epi32(_mm512_slli_epi32(v, 7), _mm512_load_si512(cp + 32));
        facc[t][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(dx[b * R.runs + r]), facc[t][b]);
      }
    if (++r < R.group_run[g + 1]) continue;
    for (int t = 0; t < NT; ++t) {  // group g done: y += s * acc - s * z * sum(x)
      const uint16_t* sc = sc0 + (t * L.G + g) * 2 * kTileRows;
      // each tile's scales are their own short stream (one line per group): fetch them ahead
      _mm_prefetch(reinterpret_cast<const char*>(sc + kScaleAhead * 2 * kTileRows), _MM_HINT_T0);
      const __m512 s = load_half(sc);
      const __m512 sz = _mm512_mul_ps(s, load_half(sc + kTileRows));
      for (int b = 0; b < B; ++b) {
        y[t][b] = _mm512_fmadd_ps(s, facc[t][b], y[t][b]);
        y[t][b] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(xsq[b * L.G + g]), y[t][b]);
        facc[t][b] = _mm512_setzero_ps();
      }
    }
    ++g;
    while (g < L.G && R.group_run[g + 1] == r) ++g;  // empty groups
  }
  for (int t = 0; t < NT; ++t) store_tile(L, tile0 + t, B, y[t], bias, out, ldo);
}

template <int BITS>
void gemv_amx_bits(const Layout& L, const AmxRuns& R, int B, const int8_t* xq, const float* dx, const float* xsq,
                   const float* bias, float* out, int64_t ldo, int64_t t0, int64_t t1) {
  const Movers mv = make_movers();
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  const int M = 3 * B;
  const int ac[4] = {0, 7, 4, 6}, bt[4] = {1, 2, 3, 5};
  for (int r : ac) {  // A and C: digit planes x tokens rows
    cfg.rows[r] = static_cast<uint8_t>(M);
    cfg.colsb[r] = 64;
  }
  for (int r : bt) {  // B: 16 rows of 4 k x 16 output rows
    cfg.rows[r] = 16;
    cfg.colsb[r] = 64;
  }
  _tile_loadconfig(&cfg);
  int64_t tile = t0;
  for (; tile + kAmxTiles <= t1; tile += kAmxTiles)
    gemv_amx_group<BITS, kAmxTiles>(L, R, B, xq, dx, xsq, bias, out, ldo, tile, mv);
  for (; tile < t1; ++tile) gemv_amx_group<BITS, 1>(L, R, B, xq, dx, xsq, bias, out, ldo, tile, mv);
  _tile_release();
}

}  // namespace

bool amx_detected() {
  static const bool ok = detect_amx();
  return ok;
}

void quantize_x_amx(const float* x, const AmxRuns& R, int8_t* q, int64_t ldc, float* d, float* xsq_group) {
  // byte o of a k-block's 32 takes native position src[o] = 8 * (o % 4) + o / 4 (see the header comment)
  alignas(64) int32_t src[32];
  for (int o = 0; o < 32; ++o) src[o] = 8 * (o % 4) + o / 4;
  const __m512i i_lo = _mm512_load_si512(src), i_hi = _mm512_load_si512(src + 16);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const float top = 127.0f * 16384.0f;  // x = d * (a * 2^14 + b * 2^7 + c), |a| <= 127, b, c in [-64, 63]
  int64_t chunk = 0;
  for (int64_t g = 0; g < R.G; ++g) {
    double gsum = 0.0;
    for (int64_t r = R.group_run[g]; r < R.group_run[g + 1]; ++r) {
      const int k0 = R.run_kb[r], k1 = R.run_kb[r + 1];
      __m512 mx = _mm512_setzero_ps(), fin = _mm512_setzero_ps();
      for (int kb = k0; kb < k1; ++kb) {
        const __m512 a = _mm512_loadu_ps(x + kb * 32), b = _mm512_loadu_ps(x + kb * 32 + 16);
        mx = _mm512_max_ps(mx, _mm512_max_ps(_mm512_andnot_ps(sign, a), _mm512_andnot_ps(sign, b)));
        fin = _mm512_add_ps(fin, _mm512_mul_ps(_mm512_add_ps(a, b), _mm512_setzero_ps()));  // NaN if any x is
      }
      const float amax = _mm512_reduce_max_ps(mx);  // (vmaxps drops NaNs: `fin` catches them)
      const bool finite = !__builtin_isnan(_mm512_reduce_add_ps(fin)) && __builtin_isfinite(amax);
      const __m512 inv = _mm512_set1_ps(finite && amax > 0 ? top / amax : 0.0f);
      // a NaN/Inf in the run: its step is NaN, so the token's outputs are NaN as on the fp32 paths
      d[r] = finite ? amax / top : __builtin_nanf("");
      __m512i isum = _mm512_setzero_si512();
      for (int kb = k0; kb < k1; ++kb) {
        const int64_t c = chunk + (kb - k0) / 2, half = (kb - k0) % 2;
        const __m512 a = _mm512_loadu_ps(x + kb * 32), b = _mm512_loadu_ps(x + kb * 32 + 16);
        __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
        isum = _mm512_add_epi32(isum, _mm512_add_epi32(qa, qb));
        // reorder to tile order first (digits are per element, so either order works)
        __m512i lo = _mm512_permutex2var_epi32(qa, i_lo, qb), hi = _mm512_permutex2var_epi32(qa, i_hi, qb);
        for (int l = 2; l >= 0; --l) {  // lowest digit first: balanced base-128 digits
          const __m512i dl = l > 0 ? pop_digit(lo) : lo, dh = l > 0 ? pop_digit(hi) : hi;
          int8_t* ql = q + c * ldc + l * 64 + half * 32;
          _mm_storeu_si128(reinterpret_cast<__m128i*>(ql), _mm512_cvtsepi32_epi8(dl));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(ql + 16), _mm512_cvtsepi32_epi8(dh));
        }
      }
      if ((k1 - k0) % 2)  // the lone k-block's partner half of the chunk reads digit 0
        for (int l = 0; l < 3; ++l) std::memset(q + (chunk + (k1 - k0) / 2) * ldc + l * 64 + 32, 0, 32);
      chunk += (k1 - k0 + 1) / 2;
      gsum += static_cast<double>(d[r]) * static_cast<double>(_mm512_reduce_add_epi32(isum));
    }
    xsq_group[g] = static_cast<float>(gsum);
  }
}

void gemv_amx(const Layout& L, const AmxRuns& R, int B, const int8_t* xq, const float* dx, const float* xsq,
              const float* bias, float* out, int64_t ldo, int64_t t0, int64_t t1) {
  if (L.bits == 2) return gemv_amx_bits<2>(L, R, B, xq, dx, xsq, bias, out, ldo, t0, t1);
  return gemv_amx_bits<3>(L, R, B, xq, dx, xsq, bias, out, ldo, t0, t1);
}

}  // namespace qk::cpu::qgemm
#endif  // x86
