// Index and bit logic of the GPU qgemm layout (quantkern/formats/gpu_native.py), shared by the CUDA
// kernels (csrc/cuda/qgemm.cu) and a CPU op (csrc/cpu/common_selftest.cpp) that the Python tests
// compare with the reference. No torch headers.
//
// Layout: qweight uint32 [ceil(n/32)*BITS, m] in the GPTQ bit stream (bitpack.h), input channels in
// kernel order; scales fp16 [G, m]; zeros uint8 [G, m] (true zero points); g_idx int32 [n] (kernel
// order, nondecreasing); group_size > 0 when g_idx[k] == k / group_size for every k, else -1.
#pragma once
#include <cmath>
#include <cstring>

#include "bitpack.h"
#include "macros.h"

namespace qk {

// ---- exact code - zero as a float without an int->float conversion ----------------------------
// The float with bit pattern 0x4B000000 | c is 2^23 + c exactly (c < 2^23); subtracting 2^23 + zero
// gives code - zero exactly. Full-rate float ops instead of quarter-rate I2F on GPUs.
QK_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
constexpr float kMagic = 8388608.0f;  // 2^23
QK_HD float magic_code(uint32_t code) { return bits_as_float(0x4B000000u | code); }
QK_HD float magic_zero(float zero) { return kMagic + zero; }
// The dequantized weight, bit-identical with the reference scale * (code - zero) in fp32.
QK_HD float dequant_code(uint32_t code, float scale, float zero) { return (magic_code(code) - magic_zero(zero)) * scale; }

// ---- groups ------------------------------------------------------------------------------------
QK_HD int64_t group_of(int64_t k, int64_t group_size, const int32_t* g_idx) {
  return group_size > 0 ? k / group_size : static_cast<int64_t>(g_idx[k]);
}
// All 32 codes of every chunk share one group: one scale/zero per chunk and column.
QK_HD bool chunk_uniform_groups(int64_t group_size) { return group_size > 0 && group_size % kCodesPerChunk == 0; }
QK_HD int64_t num_chunks(int64_t n) { return (n + kCodesPerChunk - 1) / kCodesPerChunk; }
// Word row of word i (0..BITS-1) of chunk c in qweight.
QK_HD int64_t word_row(int64_t chunk, int i, int bits) { return chunk * bits + i; }

// ---- one chunk of 4 adjacent columns: acc[c][b] += sum_j dequant(code_cj) * x[b][j] -------------
// w[c]: the BITS words of column c's chunk (stride 1); one group per chunk (scale[c], zero[c]); x: row
// b at x + b * x_stride, 16-byte aligned with x_stride % 4 == 0 on the GPU (float4 loads; each x value
// feeds 4 columns); codes past n must meet x == 0 (the caller zero-pads x). The weights are exactly
// the reference's fp32 scale * (code - zero), so only the summation order differs from it.
template <int BITS, int BATCH>
QK_HD void chunk_dot4(const uint32_t (*w)[BITS], const float* x, int64_t x_stride, const float* scale,
                      const float* zero, float (*acc)[BATCH]) {
  float mz[4];
  for (int c = 0; c < 4; ++c) mz[c] = magic_zero(zero[c]);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j0 = 0; j0 < kCodesPerChunk; j0 += 4) {
    float xv[BATCH][4];
#if defined(__CUDA_ARCH__)
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const float4 q = *reinterpret_cast<const float4*>(x + b * x_stride + j0);
      xv[b][0] = q.x; xv[b][1] = q.y; xv[b][2] = q.z; xv[b][3] = q.w;
    }
#pragma unroll
#else
    for (int b = 0; b < BATCH; ++b)
      for (int jj = 0; jj < 4; ++jj) xv[b][jj] = x[b * x_stride + j0 + jj];
#endif
    for (int jj = 0; jj < 4; ++jj) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int c = 0; c < 4; ++c) {
        const float v = (magic_code(get_code(w[c], 1, j0 + jj, BITS)) - mz[c]) * scale[c];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int b = 0; b < BATCH; ++b) acc[c][b] = fmaf(v, xv[b][jj], acc[c][b]);
      }
    }
  }
}

// ---- split-K plan of the GEMV kernel -----------------------------------------------------------
// Blocks cover kGemvCols output columns (32 lanes x 4) and a range of chunks; the x slice of that
// range (BATCH rows, fp32) and the cross-warp reduction share kGemvSmemFloats of shared memory.
constexpr int kGemvWarps = 8;
constexpr int kGemvCols = 128;
constexpr int kGemvSmemFloats = 12288;  // 48 KiB: no opt-in attribute needed

struct GemvPlan {
  int64_t col_blocks, splits, chunks_per_split;
};

QK_HD GemvPlan plan_gemv(int64_t m, int64_t n, int batch_tile, int64_t target_blocks) {
  GemvPlan p;
  p.col_blocks = (m + kGemvCols - 1) / kGemvCols;
  const int64_t chunks = num_chunks(n);
  const int64_t max_cps = kGemvSmemFloats / (batch_tile * kCodesPerChunk);
  int64_t want_splits = (target_blocks + p.col_blocks - 1) / p.col_blocks;
  if (want_splits < 1) want_splits = 1;
  int64_t cps = (chunks + want_splits - 1) / want_splits;
  cps = (cps + kGemvWarps - 1) / kGemvWarps * kGemvWarps;  // every warp gets the same work
  if (cps > max_cps) cps = max_cps;
  if (cps < 1) cps = 1;
  p.chunks_per_split = cps;
  p.splits = chunks > 0 ? (chunks + cps - 1) / cps : 1;
  return p;
}

QK_HD int64_t gemv_smem_floats(int batch_tile, int64_t chunks_per_split) {
  const int64_t xs = batch_tile * chunks_per_split * kCodesPerChunk;
  const int64_t red = static_cast<int64_t>(kGemvWarps) * batch_tile * kGemvCols;
  return xs > red ? xs : red;
}

// ---- tensor-core GEMM (mma.sync.m16n8k16, csrc/cuda/qgemm.cu mma_kernel) ---------------------------
// PTX fragment layouts of mma.m16n8k16 (f16/bf16 in, f32 accumulate) for lane = 4 * g + t:
//   A (16x16, row-major) reg r (0..3), half h (0..1): row g + 8 * (r & 1), col 2t + h + 8 * (r >> 1)
//   B (16x8, "col")      reg r (0..1), half h:        row 2t + h + 8 * r,    col g
//   C (16x8, f32)        element i (0..3):            row g + 8 * (i >> 1),  col 2t + (i & 1)
// The low half of a 32-bit register holds the h = 0 element.
QK_HD int mma_a_row(int g, int r) { return g + 8 * (r & 1); }
QK_HD int mma_a_col(int t, int r, int h) { return 2 * t + h + 8 * (r >> 1); }
QK_HD int mma_b_row(int t, int r, int h) { return 2 * t + h + 8 * r; }
QK_HD int mma_c_row(int g, int i) { return g + 8 * (i >> 1); }
QK_HD int mma_c_col(int t, int i) { return 2 * t + (i & 1); }

// The reduction index of an MMA may be permuted freely as long as A and B agree. The kernel maps
// the 32 channels of a chunk onto its two k16 steps s so that lane t owns channels 8t..8t+7: in
// step s its B rows 2t, 2t+1, 2t+8, 2t+9 (and A columns) are channels lane_k0(t, s) + 0..3, i.e.
// (reg r, half h) <-> channel lane_k0(t, s) + 2r + h for B and lane_k0(t, s) + 2 * (r >> 1) + h for A.
// Then a lane reads its 8 codes from one 8*bits-bit field (lane_codes8) and its activations of both
// steps with one 16-byte shared-memory load.
QK_HD int lane_k0(int t, int s) { return 8 * t + 4 * s; }
QK_HD int mma_b_chan(int t, int s, int r, int h) { return lane_k0(t, s) + 2 * r + h; }
QK_HD int mma_a_chan(int t, int s, int r, int h) { return lane_k0(t, s) + 2 * (r >> 1) + h; }

// Codes 8t..8t+7 of a chunk (bits <= 4) as one field: code 8t + e at bits [e*bits, (e+1)*bits).
// words[i * stride] is word i of the chunk. At 3 bits lanes 1 and 2 straddle two words.
QK_HD uint32_t lane_codes8(const uint32_t* words, int64_t stride, int t, int bits) {
  const int pos = 8 * bits * t, w = pos >> 5, off = pos & 31;
  uint32_t v = words[w * stride] >> off;
  if (off != 0 && off + 8 * bits > 32) v |= words[(w + 1) * stride] << (32 - off);
  return v;
}
QK_HD uint32_t field_code(uint32_t field, int e, int bits) { return (field >> (e * bits)) & ((1u << bits) - 1u); }

// qweight has packed_rows(n, bits) rows: with n % 32 != 0 the last chunk's high words may not exist.
QK_HD bool word_row_exists(int64_t chunk, int i, int bits, int64_t n) {
  return word_row(chunk, i, bits) < packed_rows(n, bits);
}

// Tiles: a CTA of kGemmWarps warps covers kGemmCols output columns (16 per warp: two n8 MMA tiles)
// and 16 * mtiles activation rows, and one split-K range of chunks, staged kGemmStageChunks chunks
// at a time through a kGemmStages-deep cp.async ring.
constexpr int kGemmWarps = 8;
constexpr int kGemmCols = 16 * kGemmWarps;
constexpr int kGemmStageChunks = 2;
constexpr int kGemmStages = 4;
constexpr int kGemmMinChunksPerSplit = 8;  // at least 256 channels (4 stages) per split
// Shared-memory row of a stage's activations, in 16-bit elements: 64 channels + 32 padding, so that
// the lanes' 16-byte loads (rows g, channels 8t..) hit distinct banks per quarter warp.
constexpr int kGemmXRow = 32 * kGemmStageChunks + 32;
// Shared-memory row of a stage's packed words, in words: kGemmCols + 8, so that lanes t = 0..3 of a
// column group (word rows t at 4 bits) fall in different banks.
constexpr int kGemmWRow = kGemmCols + 8;

QK_HD int gemm_mtiles(int64_t batch) { return batch <= 16 ? 1 : batch <= 32 ? 2 : 4; }

QK_HD int64_t gemm_smem_bytes(int mtiles, int bits) {
  const int64_t x = 16 * mtiles * kGemmXRow * 2;
  const int64_t w = static_cast<int64_t>(kGemmStageChunks) * bits * kGemmWRow * 4;
  const int64_t sz = static_cast<int64_t>(kGemmStageChunks) * kGemmCols * 3;  // fp16 scales + uint8 zeros
  return kGemmStages * (x + w + sz);
}

struct GemmPlan {
  int64_t col_blocks, row_blocks, splits, chunks_per_split;
};

QK_HD GemmPlan plan_gemm(int64_t batch, int64_t m, int64_t n, int mtiles, int64_t target_blocks) {
  GemmPlan p;
  p.col_blocks = (m + kGemmCols - 1) / kGemmCols;
  p.row_blocks = (batch + 16 * mtiles - 1) / (16 * mtiles);
  const int64_t chunks = num_chunks(n), tiles = p.col_blocks * p.row_blocks;
  int64_t want = target_blocks / tiles;  // round down: a partial second wave would double the time
  if (want < 1) want = 1;
  int64_t cps = (chunks + want - 1) / want;
  if (cps < kGemmMinChunksPerSplit) cps = kGemmMinChunksPerSplit;
  cps = (cps + kGemmStageChunks - 1) / kGemmStageChunks * kGemmStageChunks;
  p.chunks_per_split = cps;
  p.splits = chunks > 0 ? (chunks + cps - 1) / cps : 1;
  return p;
}

}  // namespace qk
