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
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(w.qweight + word_row(ch, i, BITS) * w.m + col));
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
#pragma unroll
  for (int i = 0; i < BITS; ++i) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(w.qweight + word_row(ch, i, BITS) * w.m + col));
#pragma unroll
    for (int c = 0; c < 4; ++c) words[c][i] = lane_word(v, c);
  }
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

int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
  return n;
}

}  // namespace cuda
}  // namespace qk
