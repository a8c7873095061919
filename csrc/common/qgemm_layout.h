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

}  // namespace qk
