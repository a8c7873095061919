// CUDA qgemm kernels over the GPU layout (csrc/common/qgemm_layout.h). No torch headers: this file
// compiles with plain nvcc in seconds (tools/check_cuda.sh); qgemm_launch.cpp binds it to torch.
//
// gemv: small batch, memory bound. A block = 8 warps x 32 lanes; lane l owns 4 adjacent output
// columns and reads their packed words with one 16-byte load per word row (a warp reads 512
// contiguous bytes); warp w takes chunks w, w+8, ... of the block's split-K range. Activations of
// that range are staged once in shared memory as fp32 (zero-padded past n). Codes become exact
// floats with the 2^23 trick and are accumulated per chunk, then scaled once per chunk (one group
// per chunk) or dequantized per code (any other grouping). Warps reduce through shared memory and
// each split writes fp32 partial sums; the launcher sums the splits.
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

template <typename T, int BITS, int BATCH, bool PER_CODE>
__global__ void __launch_bounds__(kGemvWarps * 32)
gemv_kernel(const T* __restrict__ x, int64_t batch, QWeightView w, int64_t chunks_per_split, float* __restrict__ ws) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t chunks = num_chunks(w.n);
  const int64_t c_begin = blockIdx.y * chunks_per_split;
  const int64_t c_end = c_begin + chunks_per_split < chunks ? c_begin + chunks_per_split : chunks;
  const int64_t k_begin = c_begin * kCodesPerChunk;
  const int64_t kr = (c_end - c_begin) * kCodesPerChunk;

  for (int64_t i = threadIdx.x; i < BATCH * kr; i += blockDim.x) {
    const int64_t b = i / kr, k = k_begin + i % kr;
    smem[i] = (b < batch && k < w.n) ? to_float(x[b * w.n + k]) : 0.f;
  }
  __syncthreads();

  float acc[BATCH][4];
#pragma unroll
  for (int b = 0; b < BATCH; ++b)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[b][c] = 0.f;

  const int64_t col = (static_cast<int64_t>(blockIdx.x) * 32 + lane) * 4;
  if (col < w.m) {
    for (int64_t ch = c_begin + warp; ch < c_end; ch += kGemvWarps) {
      uint4 v[BITS];
#pragma unroll
      for (int i = 0; i < BITS; ++i)
        v[i] = __ldg(reinterpret_cast<const uint4*>(w.qweight + word_row(ch, i, BITS) * w.m + col));
      const float* xs = smem + (ch - c_begin) * kCodesPerChunk;
      if constexpr (!PER_CODE) {
        float s[4], z[4];
        load_group4(w, ch * kCodesPerChunk / w.group_size, col, s, z);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          uint32_t words[BITS];
#pragma unroll
          for (int i = 0; i < BITS; ++i) words[i] = lane_word(v[i], c);
          float part[BATCH];
#pragma unroll
          for (int b = 0; b < BATCH; ++b) part[b] = 0.f;
          chunk_dot<BITS, BATCH>(words, xs, kr, z[c], part);
#pragma unroll
          for (int b = 0; b < BATCH; ++b) acc[b][c] = fmaf(s[c], part[b], acc[b][c]);
        }
      } else {
        const int64_t k0 = ch * kCodesPerChunk;
        const int jn = w.n - k0 < kCodesPerChunk ? static_cast<int>(w.n - k0) : kCodesPerChunk;
        for (int j = 0; j < jn; ++j) {
          float s[4], z[4];
          load_group4(w, group_of(k0 + j, w.group_size, w.g_idx), col, s, z);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            uint32_t words[BITS];
#pragma unroll
            for (int i = 0; i < BITS; ++i) words[i] = lane_word(v[i], c);
            const float wv = dequant_code(get_code(words, 1, j, BITS), s[c], z[c]);
#pragma unroll
            for (int b = 0; b < BATCH; ++b) acc[b][c] = fmaf(wv, xs[b * kr + j], acc[b][c]);
          }
        }
      }
    }
  }

  __syncthreads();  // the x slice is dead: reuse shared memory for the cross-warp reduction
  float* red = smem;
#pragma unroll
  for (int b = 0; b < BATCH; ++b)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[(warp * BATCH + b) * kGemvCols + lane * 4 + c] = acc[b][c];
  __syncthreads();
  for (int i = threadIdx.x; i < BATCH * kGemvCols; i += blockDim.x) {
    const int b = i / kGemvCols, cc = i % kGemvCols;
    const int64_t oc = static_cast<int64_t>(blockIdx.x) * kGemvCols + cc;
    if (b >= batch || oc >= w.m) continue;
    float sum = 0.f;
#pragma unroll
    for (int wi = 0; wi < kGemvWarps; ++wi) sum += red[(wi * BATCH + b) * kGemvCols + cc];
    ws[(static_cast<int64_t>(blockIdx.y) * batch + b) * w.m + oc] = sum;
  }
}

// One thread = one chunk x 4 columns; writes out[k, col..col+3] for the chunk's 32 channels.
template <typename T, int BITS>
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
  const int jn = w.n - k0 < kCodesPerChunk ? static_cast<int>(w.n - k0) : kCodesPerChunk;
  const bool uniform = chunk_uniform_groups(w.group_size);
  float s[4], z[4];
  if (uniform) load_group4(w, k0 / w.group_size, col, s, z);
#pragma unroll 4
  for (int j = 0; j < jn; ++j) {
    if (!uniform) load_group4(w, group_of(k0 + j, w.group_size, w.g_idx), col, s, z);
    T vals[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) vals[c] = from_float<T>(dequant_code(get_code(words[c], 1, j, BITS), s[c], z[c]));
    T* dst = out + (k0 + j) * w.m + col;
#pragma unroll
    for (int c = 0; c < 4; ++c) dst[c] = vals[c];
  }
}

template <typename T, int BITS, int BATCH>
int launch_gemv_t(const void* x, int64_t batch, const QWeightView& w, float* ws, int64_t target_blocks, cudaStream_t st) {
  const GemvPlan p = plan_gemv(w.m, w.n, BATCH, target_blocks);
  const dim3 grid(static_cast<unsigned>(p.col_blocks), static_cast<unsigned>(p.splits));
  const size_t smem = gemv_smem_floats(BATCH, p.chunks_per_split) * sizeof(float);
  const T* xt = static_cast<const T*>(x);
  if (chunk_uniform_groups(w.group_size))
    gemv_kernel<T, BITS, BATCH, false><<<grid, kGemvWarps * 32, smem, st>>>(xt, batch, w, p.chunks_per_split, ws);
  else
    gemv_kernel<T, BITS, BATCH, true><<<grid, kGemvWarps * 32, smem, st>>>(xt, batch, w, p.chunks_per_split, ws);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int BITS>
int gemv_batch(const void* x, int64_t batch, int batch_tile, const QWeightView& w, float* ws, int64_t tb, cudaStream_t st) {
  switch (batch_tile) {
    case 1: return launch_gemv_t<T, BITS, 1>(x, batch, w, ws, tb, st);
    case 2: return launch_gemv_t<T, BITS, 2>(x, batch, w, ws, tb, st);
    case 4: return launch_gemv_t<T, BITS, 4>(x, batch, w, ws, tb, st);
    case 8: return launch_gemv_t<T, BITS, 8>(x, batch, w, ws, tb, st);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

template <typename T>
int gemv_bits(const void* x, int64_t batch, int batch_tile, const QWeightView& w, float* ws, int64_t tb, cudaStream_t st) {
  switch (w.bits) {
    case 2: return gemv_batch<T, 2>(x, batch, batch_tile, w, ws, tb, st);
    case 3: return gemv_batch<T, 3>(x, batch, batch_tile, w, ws, tb, st);
    case 4: return gemv_batch<T, 4>(x, batch, batch_tile, w, ws, tb, st);
    case 8: return gemv_batch<T, 8>(x, batch, batch_tile, w, ws, tb, st);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

template <typename T>
int dequant_bits(const QWeightView& w, void* out, cudaStream_t st) {
  const int threads = 128;
  const dim3 grid(static_cast<unsigned>((w.m / 4 + threads - 1) / threads), static_cast<unsigned>(num_chunks(w.n)));
  T* o = static_cast<T*>(out);
  switch (w.bits) {
    case 2: dequant_t_kernel<T, 2><<<grid, threads, 0, st>>>(w, o); break;
    case 3: dequant_t_kernel<T, 3><<<grid, threads, 0, st>>>(w, o); break;
    case 4: dequant_t_kernel<T, 4><<<grid, threads, 0, st>>>(w, o); break;
    case 8: dequant_t_kernel<T, 8><<<grid, threads, 0, st>>>(w, o); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int gemv(const void* x, DType xt, int64_t batch, int batch_tile, const QWeightView& w, float* ws,
         int64_t target_blocks, void* stream) {
  if (batch < 1 || batch > batch_tile || w.m % 4 != 0) return static_cast<int>(cudaErrorInvalidValue);
  if (w.m == 0 || w.n == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (xt) {
    case DType::F16: return gemv_bits<__half>(x, batch, batch_tile, w, ws, target_blocks, st);
    case DType::BF16: return gemv_bits<__nv_bfloat16>(x, batch, batch_tile, w, ws, target_blocks, st);
    case DType::F32: return gemv_bits<float>(x, batch, batch_tile, w, ws, target_blocks, st);
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
