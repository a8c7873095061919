// The CPU qgemm kernel-native layout and the per-ISA kernels that read it (see formats/native.py).
//
// Rows (output features) come in tiles of 16 (one AVX-512 vector, two AVX2 vectors; m padded with
// zero-scale rows). Input channels are reordered once at load so each group is contiguous (act-order
// handled here, never in the inner loop) and each group is padded to whole k-blocks of 32 channels;
// x is gathered into the same order (padding reads 0) on every call.
//
//   qw  int32 [Mt][KB][bits][16]  one k-block of one tile = `bits` words per row, lane = row:
//         4-bit: word p/8, bits 4*(p%8)      8-bit: word p/4, bits 8*(p%4)
//         2- and 3-bit: bit planes, word i = bit i of the 32 codes (bit p = channel p); no code
//         straddles a word, and 4 channels of one plane form a 4-bit index for the LUT kernel
//   sc  fp16  [Mt][G][2][16]     per group and row: scale s, zero point z (so W = (q - z) * s); GPTQ
//                                scales are fp16 and zero points small integers, so fp16 is exact and
//                                one 64-byte line per tile and group (half the bytes of fp32)
//   kb_start int32 [G+1]         group g owns k-blocks [kb_start[g], kb_start[g+1])
//
// GEMV: y = sum_g s_g * (sum_{k in g} q_k x_k - z_g * sum_{k in g} x_k), in fp32 (no int8 rounding):
//   FMA kernel: codes -> floats (shift + vpermps table), one FMA per code and token;
//   LUT kernel (2/3-bit, AVX-512, few tokens): per 4 channels a 16-entry table of the subset sums of x,
//   sum_k q_k x_k = sum_i 2^i * sum_chunks T[plane-i nibble]: one shift, vpermps and add per
//   4 codes and plane instead of per code.
// This header is included by the AVX-512 file too, so it must not include ATen (ODR: its inline
// functions would get compiled with AVX-512 instructions).
#pragma once
#include <cstdint>
#include <type_traits>

namespace qk::cpu::qgemm {

constexpr int kTileRows = 16;
constexpr int kBlock = 32;  // input channels per k-block
constexpr int kMaxGemvBatch = 8;

// Calls f(std::integral_constant<int, b>{}) for the run-time token count B (1..kMaxGemvBatch), so each
// ISA file instantiates its kernels once per batch size (the lambda type is per file: no ODR clash).
template <class F>
inline void with_batch(int B, F&& f) {
  switch (B) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// Calls f(std::integral_constant<int, bits>{}) for a layout's bit width (2, 3, 4 or 8).
template <class F>
inline void with_bits(int bits, F&& f) {
  switch (bits) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

struct Layout {
  const int32_t* qw;
  const uint16_t* sc;  // fp16 bits
  const int32_t* kb_start;  // [G + 1]
  const int32_t* kb_group;  // [KB] group of each k-block
  int64_t G, KB, Mt, m;
  int bits;
};

// out[b * ldo + r] = y for tiles [t0, t1) and B <= kMaxGemvBatch tokens; x [B][ldx] in native order,
// xsum [B][G] per-group sums of x; bias fp32 [m] or null. Writes exactly the rows < m.
void gemv_avx512(const Layout& L, int B, const float* x, int64_t ldx, const float* xsum, const float* bias,
                 float* out, int64_t ldo, int64_t t0, int64_t t1);
void gemv_avx2(const Layout& L, int B, const float* x, int64_t ldx, const float* xsum, const float* bias,
               float* out, int64_t ldo, int64_t t0, int64_t t1);

// LUT kernel (AVX-512, bits 2/3, B <= kMaxLutBatch): lut [B][Kpad/4][16] subset sums of x per 4 channels.
constexpr int kMaxLutBatch = 2;
void build_lut_avx512(const float* x, int64_t chunks, float* lut);  // x [chunks * 4] -> lut [chunks][16]
void gemv_lut_avx512(const Layout& L, int B, const float* lut, int64_t ldl, const float* xsum, const float* bias,
                     float* out, int64_t ldo, int64_t t0, int64_t t1);

// vpdpbusd GEMV for 4-bit (AVX-512 VNNI). x is written per k-block as `limbs` planes of signed 7-bit
// digits: limbs = 1 rounds x to int8 (opt-in, approximate, rel. err ~5e-3); limbs = 3 holds x as 22-bit
// fixed point per k-block, x = d * (a * 2^14 + b * 2^7 + c) (error <= 2^-22 of the block's max |x|;
// the dot products are exact int32), the default 4-bit decode path.
// xq: per token, limb plane l at xq + (b * limbs + l) * ldq; per k-block 32 bytes ordered [even
// channels of word 0..3 | odd channels of word 0..3], 4 bytes each (the byte order vpdpbusd needs against
// nibbles split into low/high bytes); dx [B][KB] per-k-block steps d; xsq [B][G] per-group sums of the
// represented x (d * integer), so the zero-point fold matches the dot products.
constexpr int kMaxLimbBatch = 4;
void quantize_x_avx512(const float* x, int64_t KB, int limbs, int8_t* q, int64_t ldq, float* d,
                       int32_t* isum);  // one token
void gemv_int8_avx512(const Layout& L, int B, int limbs, const int8_t* xq, int64_t ldq, const float* dx, int64_t ldd,
                      const float* xsq, const float* bias, float* out, int64_t ldo, int64_t t0, int64_t t1);

// AMX-INT8 GEMV for 2/3-bit (csrc/cpu/qgemm_amx.cpp). x is quantized per run of <= kAmxRunBlocks k-blocks
// of one group (step d per run and token, 3 signed base-128 digit planes, 22-bit fixed point); each run
// is ceil(k-blocks / 2) chunks of 64 channels (one tile multiply). amx_detected(): the CPU has AMX-INT8
// and GFNI and the kernel granted the tile state.
constexpr int kAmxRunBlocks = 4;  // 128 channels: the int32 merge of the digit sums stays < 2^31 at 3 bits
constexpr int kMaxAmxBatch = 5;   // 3 digit planes per token, 16 A-tile rows
constexpr int kAmxTiles = 2;      // row tiles in flight (tile registers: 2 A + 2 * 2 B + 2 C of the 8)
struct AmxRuns {
  int64_t G, runs, chunks;
  const int32_t* group_run;  // [G + 1]: group g owns runs [group_run[g], group_run[g + 1])
  const int32_t* run_kb;     // [runs + 1]: run r = k-blocks [run_kb[r], run_kb[r + 1])
  const int32_t* chunk_kb;   // [chunks]: first k-block of each chunk (2 k-blocks, or 1 at a run's odd end)
  const int32_t* chunk_run;  // [chunks]: the run of each chunk
};
bool amx_detected();  // probed once (qgemm_amx.cpp; false where the file is compiled out)
// one token: x [Kpad] native order -> digits, chunk c plane l (top digit first) at q + c * ldc + l * 64;
// d [runs] steps; xsq [G] per-group sums of the represented x
void quantize_x_amx(const float* x, const AmxRuns& R, int8_t* q, int64_t ldc, float* d, float* xsq);
// B <= kMaxAmxBatch tokens: A digits chunk-major, token b plane l of chunk c at xq + ((c * B + b) * 3 + l) * 64
// (one A tile = 3B consecutive 64-byte rows); dx [B][runs]; xsq [B][G]
void gemv_amx(const Layout& L, const AmxRuns& R, int B, const int8_t* xq, const float* dx, const float* xsq,
              const float* bias, float* out, int64_t ldo, int64_t t0, int64_t t1);

// Dense W^T of tiles [t0, t1) x k-blocks [kb0, kb1):
// wt[(p - 32 * kb0) * ldw + (tile - t0) * 16 + lane] = (q - z) * s for native position p.
void dequant_avx512(const Layout& L, int64_t t0, int64_t t1, int64_t kb0, int64_t kb1, float* wt,
                    int64_t ldw);
void dequant_avx2(const Layout& L, int64_t t0, int64_t t1, int64_t kb0, int64_t kb1, float* wt,
                    int64_t ldw);

// Portable scalar kernels (qgemm_generic.cpp): the same contracts as gemv_avx2 / dequant_avx2, for CPUs
// (or builds) without AVX2, and as a readable statement of what the SIMD kernels compute.
void gemv_generic(const Layout& L, int B, const float* x, int64_t ldx, const float* xsum, const float* bias,
                  float* out, int64_t ldo, int64_t t0, int64_t t1);
void dequant_generic(const Layout& L, int64_t t0, int64_t t1, int64_t kb0, int64_t kb1, float* wt, int64_t ldw);

}  // namespace qk::cpu::qgemm
