// CUDA qgemm kernels over the GPU layout (csrc/common/qgemm_layout.h). No torch headers: this file
// compiles with plain nvcc in seconds (tools/check_cuda.sh); qgemm_launch.cpp binds it to torch.
//
// gemv: small batch, memory bound. A block = 8 warps x 32 lanes; lane l owns 4 adjacent output
// columns and reads their packed words with one 16-byte load per word row (a warp reads 512
// contiguous bytes); warp w takes chunks w, w+8, ... of the block's split-K range. Activations of
// that range are staged once in shared memory as fp32 (zero-padded past n). Codes become exact
// floats with the 2^23 trick, are dequantized exactly as the reference (scale * (code - zero)) and
// accumulated in fp32; the next chunk's words are loaded while the current one is computed. Warps reduce through shared memory and
// with several splits the last block to finish a column range sums their fp32 partials (fixed
// order), adds the bias and writes y in the activation dtype: one launch per call.
// dequant_t: W^T [n, m] in fp16/bf16/fp32 for the large-batch path (dequantize, then torch matmul).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/qgemm_layout.h"
#include "qgemm.h"

namespace qk {
namespace cuda {
namespace {

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }

__device__ __forceinline__ uint32_t lane_word(const uint4& v, int c) {
  return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w;
}

// 4 fp16 scales and 4 uint8 zeros of columns col..col+3 in group g.
__device__ __forceinline__ void load_group4(const QWeightView& w, int64_t g, int64_t col, float s[4], float z[4]) {
  const uint2 sv = __ldg(reinterpret_cast<const uint2*>(w.scales + g * w.m + col));
  const __half2 s01 = *reinterpret_cast<const __half2*>(&sv.x);
  const __half2 s23 = *reinterpret_cast<const __half2*>(&sv.y);
  s[0] = __low2float(s01); s[1] = __high2float(s01);
  s[2] = __low2float(s23); s[3] = __high2float(s23);
  const uint32_t zv = __ldg(reinterpret_cast<const unsigned int*>(w.zeros + g * w.m + col));
#pragma unroll
  for (int c = 0; c < 4; ++c) z[c] = static_cast<float>((zv >> (8 * c)) & 0xFFu);
}

// The BITS words of chunk ch for columns col..col+3: one 16-byte load per word row.
template <int BITS>
__device__ __forceinline__ void load_words4(const QWeightView& w, int64_t ch, int64_t col, uint32_t (*words)[BITS]) {
#pragma unroll
  for (int i = 0; i < BITS; ++i) {
    // with n % 32 != 0 the last chunk's high word rows do not exist (qweight has packed_rows(n) rows)
    const uint4 v = word_row_exists(ch, i, BITS, w.n)
                        ? __ldg(reinterpret_cast<const uint4*>(w.qweight + word_row(ch, i, BITS) * w.m + col))
                        : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int c = 0; c < 4; ++c) words[c][i] = lane_word(v, c);
  }
}

template <typename T, int BITS, int BATCH, bool PER_CODE>
__global__ void __launch_bounds__(kGemvWarps * 32)
gemv_kernel(const T* __restrict__ x, int64_t batch, QWeightView w, int64_t chunks_per_split, int splits,
            const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws, unsigned int* __restrict__ counters) {
  extern __shared__ float4 smem4[];  // float4: 16-byte aligned for the float4 reads of chunk_dot4
  float* smem = reinterpret_cast<float*>(smem4);
  __shared__ bool is_last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t chunks = num_chunks(w.n);
  const int64_t c_begin = blockIdx.y * chunks_per_split;
  const int64_t c_end = c_begin + chunks_per_split < chunks ? c_begin + chunks_per_split : chunks;
  const int64_t k_begin = c_begin * kCodesPerChunk;
  const int64_t kr = (c_end - c_begin) * kCodesPerChunk;

#pragma unroll
  for (int b = 0; b < BATCH; ++b)
    for (int64_t kk = threadIdx.x; kk < kr; kk += blockDim.x) {
      const int64_t k = k_begin + kk;
      smem[b * kr + kk] = (b < batch && k < w.n) ? to_float(x[b * w.n + k]) : 0.f;
    }
  __syncthreads();

  float acc[4][BATCH];
#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int b = 0; b < BATCH; ++b) acc[c][b] = 0.f;

  const int64_t col = (static_cast<int64_t>(blockIdx.x) * 32 + lane) * 4;
  if (col < w.m) {
    // software pipeline: the next chunk's packed words are in flight while this one is computed
    uint32_t words[4][BITS], next[4][BITS];
    int64_t ch = c_begin + warp;
    if (ch < c_end) load_words4<BITS>(w, ch, col, words);
    for (; ch < c_end; ch += kGemvWarps) {
      if (ch + kGemvWarps < c_end) load_words4<BITS>(w, ch + kGemvWarps, col, next);
      const float* xs = smem + (ch - c_begin) * kCodesPerChunk;
      if constexpr (!PER_CODE) {
        float s[4], z[4];
        load_group4(w, ch * kCodesPerChunk / w.group_size, col, s, z);
        chunk_dot4<BITS, BATCH>(words, xs, kr, s, z, acc);
      } else {
        const int64_t k0 = ch * kCodesPerChunk;
#pragma unroll
        for (int j = 0; j < kCodesPerChunk; ++j) {
          if (k0 + j >= w.n) break;
          float s[4], z[4], xv[BATCH];
          load_group4(w, group_of(k0 + j, w.group_size, w.g_idx), col, s, z);
#pragma unroll
          for (int b = 0; b < BATCH; ++b) xv[b] = xs[b * kr + j];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const float wv = dequant_code(get_code(words[c], 1, j, BITS), s[c], z[c]);
#pragma unroll
            for (int b = 0; b < BATCH; ++b) acc[c][b] = fmaf(wv, xv[b], acc[c][b]);
          }
        }
      }
#pragma unroll
      for (int c = 0; c < 4; ++c)
#pragma unroll
        for (int i = 0; i < BITS; ++i) words[c][i] = next[c][i];
    }
  }

  __syncthreads();  // the x slice is dead: reuse shared memory for the cross-warp reduction
  float* red = smem;
#pragma unroll
  for (int b = 0; b < BATCH; ++b)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[(warp * BATCH + b) * kGemvCols + lane * 4 + c] = acc[c][b];
  __syncthreads();
  for (int i = threadIdx.x; i < BATCH * kGemvCols; i += blockDim.x) {
    const int b = i / kGemvCols, cc = i % kGemvCols;
    const int64_t oc = static_cast<int64_t>(blockIdx.x) * kGemvCols + cc;
    if (b >= batch || oc >= w.m) continue;
    float sum = 0.f;
#pragma unroll
    for (int wi = 0; wi < kGemvWarps; ++wi) sum += red[(wi * BATCH + b) * kGemvCols + cc];
    if (splits == 1) {
      if (bias != nullptr) sum += to_float(bias[oc]);
      y[b * w.m + oc] = from_float<T>(sum);
    } else {
      ws[(static_cast<int64_t>(blockIdx.y) * batch + b) * w.m + oc] = sum;
    }
  }
  if (splits == 1) return;
  // Split-K: the last block of this column range to finish sums the splits in a fixed order
  // (deterministic), adds the bias, writes y, and re-arms the counter for the next launch.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&counters[blockIdx.x], 1u) == static_cast<unsigned>(splits - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < BATCH * kGemvCols; i += blockDim.x) {
    const int b = i / kGemvCols, cc = i % kGemvCols;
    const int64_t oc = static_cast<int64_t>(blockIdx.x) * kGemvCols + cc;
    if (b >= batch || oc >= w.m) continue;
    float sum = 0.f;
    for (int sp = 0; sp < splits; ++sp) sum += __ldcg(ws + (static_cast<int64_t>(sp) * batch + b) * w.m + oc);
    if (bias != nullptr) sum += to_float(bias[oc]);
    y[b * w.m + oc] = from_float<T>(sum);
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0u;
}

// One thread = one chunk x 4 columns; writes out[k, col..col+3] for the chunk's 32 channels (a warp
// writes 32 x 4 contiguous values per channel). j is unrolled so every shift is a constant.
template <typename T, int BITS, bool PER_CODE>
__global__ void dequant_t_kernel(QWeightView w, T* __restrict__ out) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  const int64_t ch = blockIdx.y;
  if (col >= w.m) return;
  uint32_t words[4][BITS];
  load_words4<BITS>(w, ch, col, words);
  const int64_t k0 = ch * kCodesPerChunk;
  float s[4], z[4];
  if constexpr (!PER_CODE) load_group4(w, k0 / w.group_size, col, s, z);
#pragma unroll
  for (int j = 0; j < kCodesPerChunk; ++j) {
    if (k0 + j >= w.n) break;
    if constexpr (PER_CODE) load_group4(w, group_of(k0 + j, w.group_size, w.g_idx), col, s, z);
    T vals[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) vals[c] = from_float<T>(dequant_code(get_code(words[c], 1, j, BITS), s[c], z[c]));
    T* dst = out + (k0 + j) * w.m + col;
#pragma unroll
    for (int c = 0; c < 4; ++c) dst[c] = vals[c];
  }
}

struct GemvCall {
  const void* x;
  int64_t batch;
  const QWeightView* w;
  const void* bias;
  void* y;
  float* ws;
  unsigned int* counters;
  int64_t target_blocks;
  cudaStream_t st;
};

template <typename T, int BITS, int BATCH>
int launch_gemv_t(const GemvCall& a) {
  const QWeightView& w = *a.w;
  const GemvPlan p = plan_gemv(w.m, w.n, BATCH, a.target_blocks);
  const dim3 grid(static_cast<unsigned>(p.col_blocks), static_cast<unsigned>(p.splits));
  const size_t smem = gemv_smem_floats(BATCH, p.chunks_per_split) * sizeof(float);
  const T* xt = static_cast<const T*>(a.x);
  const T* bt = static_cast<const T*>(a.bias);
  T* yt = static_cast<T*>(a.y);
  const int splits = static_cast<int>(p.splits);
  if (chunk_uniform_groups(w.group_size))
    gemv_kernel<T, BITS, BATCH, false><<<grid, kGemvWarps * 32, smem, a.st>>>(
        xt, a.batch, w, p.chunks_per_split, splits, bt, yt, a.ws, a.counters);
  else
    gemv_kernel<T, BITS, BATCH, true><<<grid, kGemvWarps * 32, smem, a.st>>>(
        xt, a.batch, w, p.chunks_per_split, splits, bt, yt, a.ws, a.counters);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int BITS>
int gemv_batch(const GemvCall& a, int batch_tile) {
  switch (batch_tile) {
    case 1: return launch_gemv_t<T, BITS, 1>(a);
    case 2: return launch_gemv_t<T, BITS, 2>(a);
    case 4: return launch_gemv_t<T, BITS, 4>(a);
    case 8: return launch_gemv_t<T, BITS, 8>(a);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

template <typename T>
int gemv_bits(const GemvCall& a, int batch_tile) {
  switch (a.w->bits) {
    case 2: return gemv_batch<T, 2>(a, batch_tile);
    case 3: return gemv_batch<T, 3>(a, batch_tile);
    case 4: return gemv_batch<T, 4>(a, batch_tile);
    case 8: return gemv_batch<T, 8>(a, batch_tile);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

template <typename T, int BITS>
void launch_dequant(const QWeightView& w, T* o, cudaStream_t st) {
  const int threads = 128;
  const dim3 grid(static_cast<unsigned>((w.m / 4 + threads - 1) / threads), static_cast<unsigned>(num_chunks(w.n)));
  if (chunk_uniform_groups(w.group_size))
    dequant_t_kernel<T, BITS, false><<<grid, threads, 0, st>>>(w, o);
  else
    dequant_t_kernel<T, BITS, true><<<grid, threads, 0, st>>>(w, o);
}

template <typename T>
int dequant_bits(const QWeightView& w, void* out, cudaStream_t st) {
  T* o = static_cast<T*>(out);
  switch (w.bits) {
    case 2: launch_dequant<T, 2>(w, o, st); break;
    case 3: launch_dequant<T, 3>(w, o, st); break;
    case 4: launch_dequant<T, 4>(w, o, st); break;
    case 8: launch_dequant<T, 8>(w, o, st); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

// ---- tensor-core dequant GEMM (sm_80+) -------------------------------------------------------------
// mma_kernel: y [batch, m] = x [batch, n] (fp16/bf16) @ dequant(W)^T (+ bias), batch >= 9. A CTA of 8
// warps owns kGemmCols output columns x 16*MT rows x one split-K chunk range. Each stage (2 chunks
// = 64 channels) of packed words, activations, and (one group per chunk) scales/zeros is copied to
// shared memory with cp.async (16-byte copies for words and x; zero-filled past m, n, batch, the
// split and the packed rows) into a 4-deep ring. Warp w dequantizes its 16 columns: lane (g, t)
// extracts codes 8t..8t+7 of its column's chunk (qk::lane_codes8) into the B fragments of both k16
// steps (the qk::lane_k0 channel map), exactly the reference's value rounded once to fp16/bf16,
// and runs MT x 2 mma.sync.m16n8k16 per step with fp32 accumulators. With one split the
// accumulators (+ bias) are written in x's dtype; with several, fp32 partials go to ws and the last
// CTA of a tile sums them in split order (deterministic) as in the GEMV.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// cp.async with zero fill: copies `bytes` from src when ok, else writes zeros (src is not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src, bool ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 8 : 0));
#endif
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 4 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

template <typename T>
struct MmaOps;
template <>
struct MmaOps<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
  static __device__ __forceinline__ void store2(__half* p, float lo, float hi) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(lo, hi);
  }
};
template <>
struct MmaOps<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
  static __device__ __forceinline__ void store2(__nv_bfloat16* p, float lo, float hi) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(lo, hi);
  }
};

// Two codes (field positions e, e+1) with one scale/zero -> a packed pair in T: the reference's fp32
// scale * (code - zero) rounded once. bf16: that fp32 formula. fp16: 1024 + code as fp16 bits
// (0x6400 | code), minus 1024 + zero (exact: integers below 2048), times the fp16 scale: the product
// of an exact small integer and an fp16 value rounded once to fp16, the same value in half the work.
template <typename T, int BITS>
struct GroupDequant {
  float s, mz;
  __device__ __forceinline__ GroupDequant(float scale, float zero) : s(scale), mz(magic_zero(zero)) {}
  __device__ __forceinline__ uint32_t pair(uint32_t field, int e) const {
    return MmaOps<T>::pack((magic_code(field_code(field, e, BITS)) - mz) * s,
                           (magic_code(field_code(field, e + 1, BITS)) - mz) * s);
  }
};
template <int BITS>
struct GroupDequant<__half, BITS> {
  __half2 s2, z2;
  __device__ __forceinline__ GroupDequant(float scale, float zero)
      : s2(__float2half2_rn(scale)), z2(__float2half2_rn(1024.f + zero)) {}
  __device__ __forceinline__ uint32_t pair(uint32_t field, int e) const {
    uint32_t u = 0x64006400u | field_code(field, e, BITS) | (field_code(field, e + 1, BITS) << 16);
    const __half2 h = __hmul2(__hsub2(*reinterpret_cast<const __half2*>(&u), z2), s2);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

template <typename T, int BITS, int MT, bool PER_CODE>
__global__ void __launch_bounds__(kGemmWarps * 32, 2)
mma_kernel(const T* __restrict__ x, int64_t batch, int64_t ldx, int64_t kx, QWeightView w, int64_t chunks_per_split,
           int splits, const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws,
           unsigned int* __restrict__ counters) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BM = 16 * MT, BN = kGemmCols, KC = kGemmStageChunks, KS = kGemmStages, NT = kGemmWarps * 32;
  constexpr int X_STAGE = BM * kGemmXRow;  // 16-bit elements
  constexpr int W_STAGE = KC * BITS * kGemmWRow;  // words
  constexpr int S_STAGE = KC * BN;         // scales (fp16 bits) and zeros (bytes)
  extern __shared__ uint4 smem_u4[];
  T* xsm = reinterpret_cast<T*>(smem_u4);
  uint32_t* wsm = reinterpret_cast<uint32_t*>(xsm + KS * X_STAGE);
  uint16_t* ssm = reinterpret_cast<uint16_t*>(wsm + KS * W_STAGE);
  uint8_t* zsm = reinterpret_cast<uint8_t*>(ssm + KS * S_STAGE);
  __shared__ bool is_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN, r0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t chunks = num_chunks(w.n);
  const int64_t c_begin = static_cast<int64_t>(blockIdx.z) * chunks_per_split;
  const int64_t c_end = c_begin + chunks_per_split < chunks ? c_begin + chunks_per_split : chunks;
  const int nst = static_cast<int>((c_end - c_begin + KC - 1) / KC);

  auto load_stage = [&](int slot, int st) {
    const int64_t cb = c_begin + static_cast<int64_t>(st) * KC;
    for (int i = tid; i < KC * BITS * (BN / 4); i += NT) {
      const int r = i / (BN / 4), cq = i % (BN / 4), q = r / BITS, wi = r % BITS;
      const int64_t c = cb + q, col = n0 + 4 * cq;
      const bool ok = c < c_end && col < w.m && word_row_exists(c, wi, BITS, w.n);
      cp_async16(wsm + slot * W_STAGE + r * kGemmWRow + 4 * cq, ok ? w.qweight + word_row(c, wi, BITS) * w.m + col : w.qweight,
                 ok);
    }
    for (int i = tid; i < BM * KC * 4; i += NT) {  // 8 channels per copy
      const int r = i / (KC * 4), p = i % (KC * 4);
      const int64_t row = r0 + r, k = cb * kCodesPerChunk + 8 * p;
      const bool ok = row < batch && k < c_end * kCodesPerChunk && k < kx;
      cp_async16(xsm + slot * X_STAGE + r * kGemmXRow + 8 * p, ok ? x + row * ldx + k : x, ok);
    }
    if constexpr (!PER_CODE) {
      for (int i = tid; i < KC * (BN / 4); i += NT) {
        const int q = i / (BN / 4), cq = i % (BN / 4);
        const int64_t c = cb + q, col = n0 + 4 * cq;
        const bool ok = c < c_end && col < w.m;
        const int64_t gi = ok ? c * kCodesPerChunk / w.group_size : 0;
        cp_async8(ssm + slot * S_STAGE + q * BN + 4 * cq, ok ? w.scales + gi * w.m + col : w.scales, ok);
        cp_async4(zsm + slot * S_STAGE + q * BN + 4 * cq, ok ? w.zeros + gi * w.m + col : w.zeros, ok);
      }
    }
  };

  float acc[MT][2][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][j][i] = 0.f;

  auto compute_stage = [&](int slot, int st) {
    const int64_t cb = c_begin + static_cast<int64_t>(st) * KC;
#pragma unroll
    for (int q = 0; q < KC; ++q) {
      // activations of channels 8t..8t+7 (both k16 steps) of rows g and g + 8 of each m16 tile
      uint4 xlo[MT], xhi[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const T* base = xsm + slot * X_STAGE + (16 * mt + g) * kGemmXRow + q * kCodesPerChunk + lane_k0(t, 0);
        xlo[mt] = *reinterpret_cast<const uint4*>(base);
        xhi[mt] = *reinterpret_cast<const uint4*>(base + 8 * kGemmXRow);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int cl = 16 * warp + 8 * j + g;  // this lane's B column (output column n0 + cl)
        const uint32_t field = lane_codes8(wsm + slot * W_STAGE + q * BITS * kGemmWRow + cl, kGemmWRow, t, BITS);
        uint32_t b[2][2];  // [k16 step s][reg r]: channels lane_k0(t, s) + 2r + {0, 1}
        if constexpr (!PER_CODE) {
          const GroupDequant<T, BITS> dq(__half2float(__ushort_as_half(ssm[slot * S_STAGE + q * BN + cl])),
                                         static_cast<float>(zsm[slot * S_STAGE + q * BN + cl]));
#pragma unroll
          for (int s = 0; s < 2; ++s)
#pragma unroll
            for (int r = 0; r < 2; ++r) b[s][r] = dq.pair(field, mma_b_chan(t, s, r, 0) - lane_k0(t, 0));  // 4s + 2r
        } else {
          const int64_t col = n0 + cl, k0 = (cb + q) * kCodesPerChunk + lane_k0(t, 0);
          float v[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            v[e] = 0.f;
            if (col < w.m && k0 + e < w.n) {
              const int64_t gi = group_of(k0 + e, w.group_size, w.g_idx);
              v[e] = dequant_code(field_code(field, e, BITS), __half2float(__ushort_as_half(__ldg(w.scales + gi * w.m + col))),
                                  static_cast<float>(__ldg(w.zeros + gi * w.m + col)));
            }
          }
#pragma unroll
          for (int s = 0; s < 2; ++s)
#pragma unroll
            for (int r = 0; r < 2; ++r) b[s][r] = MmaOps<T>::pack(v[4 * s + 2 * r], v[4 * s + 2 * r + 1]);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          // A regs: r = 0 (row g) / 1 (row g + 8) hold channels lane_k0(t, s) + {0, 1}; r = 2 / 3: + {2, 3}
          const uint32_t a0[4] = {xlo[mt].x, xhi[mt].x, xlo[mt].y, xhi[mt].y};
          const uint32_t a1[4] = {xlo[mt].z, xhi[mt].z, xlo[mt].w, xhi[mt].w};
          MmaOps<T>::mma(acc[mt][j], a0, b[0]);
          MmaOps<T>::mma(acc[mt][j], a1, b[1]);
        }
      }
    }
  };

  // cp.async ring: stage st lives in slot st % KS; one commit group per stage (empty ones too, so
  // that wait_group<KS - 2> always means "stage st has landed").
#pragma unroll
  for (int st = 0; st < KS - 1; ++st) {
    if (st < nst) load_stage(st, st);
    cp_async_commit();
  }
  for (int st = 0; st < nst; ++st) {
    cp_async_wait<KS - 2>();
    __syncthreads();  // stage st visible to all; every warp is done with stage st - 1 (its slot is reused next)
    if (st + KS - 1 < nst) load_stage((st + KS - 1) % KS, st + KS - 1);
    cp_async_commit();
    compute_stage(st % KS, st);
  }
  cp_async_wait<0>();

  const int64_t cbase = n0 + 16 * warp + 2 * t;
  if (splits == 1) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t row = r0 + 16 * mt + mma_c_row(g, 2 * h), col = cbase + 8 * j;
          if (row >= batch || col >= w.m) continue;
          float v0 = acc[mt][j][2 * h], v1 = acc[mt][j][2 * h + 1];
          if (bias != nullptr) {
            v0 += to_float(bias[col]);
            v1 += to_float(bias[col + 1]);
          }
          MmaOps<T>::store2(y + row * w.m + col, v0, v1);
        }
    return;
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = r0 + 16 * mt + mma_c_row(g, 2 * h), col = cbase + 8 * j;
        if (row >= batch || col >= w.m) continue;
        *reinterpret_cast<float2*>(ws + (static_cast<int64_t>(blockIdx.z) * batch + row) * w.m + col) =
            make_float2(acc[mt][j][2 * h], acc[mt][j][2 * h + 1]);
      }
  // Split-K: the last CTA of this output tile sums the partials in split order, adds the bias, writes
  // y, and re-arms the tile's counter.
  const unsigned tile = blockIdx.y * gridDim.x + blockIdx.x;
  __threadfence();
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(&counters[tile], 1u) == static_cast<unsigned>(splits - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int i = tid; i < BM * (BN / 2); i += NT) {
    const int64_t row = r0 + i / (BN / 2), col = n0 + 2 * (i % (BN / 2));
    if (row >= batch || col >= w.m) continue;
    float v0 = 0.f, v1 = 0.f;
    for (int sp = 0; sp < splits; ++sp) {
      const float2 p = __ldcg(reinterpret_cast<const float2*>(ws + (static_cast<int64_t>(sp) * batch + row) * w.m + col));
      v0 += p.x;
      v1 += p.y;
    }
    if (bias != nullptr) {
      v0 += to_float(bias[col]);
      v1 += to_float(bias[col + 1]);
    }
    MmaOps<T>::store2(y + row * w.m + col, v0, v1);
  }
  if (tid == 0) counters[tile] = 0u;
#endif
}

struct MmaCall {
  const void* x;
  int64_t batch, ldx, kx;
  const QWeightView* w;
  const void* bias;
  void* y;
  float* ws;
  unsigned int* counters;
  GemmPlan plan;
  cudaStream_t st;
};

template <typename T, int BITS, int MT, bool PER_CODE>
int launch_mma_t(const MmaCall& a) {
  auto kernel = mma_kernel<T, BITS, MT, PER_CODE>;
  const int smem = static_cast<int>(gemm_smem_bytes(MT, BITS));
  static unsigned attr_set = 0;  // per device (bit); a race only sets the same attribute twice
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return static_cast<int>(cudaErrorInvalidDevice);
  if (dev >= 32 || !((attr_set >> dev) & 1u)) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return static_cast<int>(e);
    if (dev < 32) attr_set |= 1u << dev;
  }
  const dim3 grid(static_cast<unsigned>(a.plan.col_blocks), static_cast<unsigned>(a.plan.row_blocks),
                  static_cast<unsigned>(a.plan.splits));
  kernel<<<grid, kGemmWarps * 32, smem, a.st>>>(static_cast<const T*>(a.x), a.batch, a.ldx, a.kx, *a.w,
                                                a.plan.chunks_per_split, static_cast<int>(a.plan.splits),
                                                static_cast<const T*>(a.bias), static_cast<T*>(a.y), a.ws, a.counters);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int BITS, int MT>
int mma_groups(const MmaCall& a) {
  return chunk_uniform_groups(a.w->group_size) ? launch_mma_t<T, BITS, MT, false>(a) : launch_mma_t<T, BITS, MT, true>(a);
}

template <typename T, int BITS>
int mma_mtiles(const MmaCall& a, int mtiles) {
  switch (mtiles) {
    case 1: return mma_groups<T, BITS, 1>(a);
    case 2: return mma_groups<T, BITS, 2>(a);
    case 4: return mma_groups<T, BITS, 4>(a);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

template <typename T>
int mma_bits(const MmaCall& a, int mtiles) {
  switch (a.w->bits) {
    case 2: return mma_mtiles<T, 2>(a, mtiles);
    case 3: return mma_mtiles<T, 3>(a, mtiles);
    case 4: return mma_mtiles<T, 4>(a, mtiles);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int gemv(const void* x, DType xt, int64_t batch, int batch_tile, const QWeightView& w, const void* bias, void* y,
         float* ws, unsigned int* counters, int64_t target_blocks, void* stream) {
  if (batch < 1 || batch > batch_tile || w.m % 4 != 0) return static_cast<int>(cudaErrorInvalidValue);
  if (w.m == 0 || w.n == 0) return static_cast<int>(cudaErrorInvalidValue);
  const GemvCall a{x, batch, &w, bias, y, ws, counters, target_blocks, static_cast<cudaStream_t>(stream)};
  switch (xt) {
    case DType::F16: return gemv_bits<__half>(a, batch_tile);
    case DType::BF16: return gemv_bits<__nv_bfloat16>(a, batch_tile);
    case DType::F32: return gemv_bits<float>(a, batch_tile);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int dequant_t(const QWeightView& w, void* out, DType ot, void* stream) {
  if (w.m % 4 != 0) return static_cast<int>(cudaErrorInvalidValue);
  if (w.m == 0 || w.n == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (ot) {
    case DType::F16: return dequant_bits<__half>(w, out, st);
    case DType::BF16: return dequant_bits<__nv_bfloat16>(w, out, st);
    case DType::F32: return dequant_bits<float>(w, out, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int mma_gemm(const void* x, DType xt, int64_t batch, int64_t ldx, int64_t kx, const QWeightView& w, const void* bias,
             void* y, float* ws, unsigned int* counters, const GemmPlan& plan, void* stream) {
  if (batch < 1 || w.m == 0 || w.n == 0 || w.m % 4 != 0 || ldx % 8 != 0 || kx % 8 != 0 || kx < w.n)
    return static_cast<int>(cudaErrorInvalidValue);
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || mma_arch_major() < 8) return static_cast<int>(cudaErrorInvalidValue);
  const MmaCall a{x, batch, ldx, kx, &w, bias, y, ws, counters, plan, static_cast<cudaStream_t>(stream)};
  const int mtiles = gemm_mtiles(batch);
  switch (xt) {
    case DType::F16: return mma_bits<__half>(a, mtiles);
    case DType::BF16: return mma_bits<__nv_bfloat16>(a, mtiles);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

int mma_arch_major() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return 0;
  return major;
}

int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
  return n;
}

}  // namespace cuda
}  // namespace qk
