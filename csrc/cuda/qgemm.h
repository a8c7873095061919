// C++ interface of the CUDA qgemm kernels (csrc/cuda/qgemm.cu). No torch and no CUDA headers here,
// so the torch-side launcher (qgemm_launch.cpp) and the pure-CUDA file share it.
#pragma once
#include <cstdint>

#include "../common/qgemm_layout.h"

namespace qk {
namespace cuda {

enum class DType : int { F16 = 0, BF16 = 1, F32 = 2 };

struct QWeightView {
  const uint32_t* qweight;  // [ceil(n/32)*bits, m], 16-byte aligned, m % 4 == 0
  const uint16_t* scales;   // fp16 bits [G, m]
  const uint8_t* zeros;     // [G, m]
  const int32_t* g_idx;     // [n], kernel order
  int64_t m, n, group_size;
  int bits;
};

// y [batch, m] (dtype xt) = x [batch, n] (kernel order, contiguous, dtype xt) @ dequant(W)^T (+ bias [m],
// dtype xt, or nullptr). batch_tile in {1, 2, 4, 8}, 1 <= batch <= batch_tile, m, n > 0.
// ws: fp32 scratch of plan.splits * batch * m floats (qk::plan_gemv); counters: plan.col_blocks
// unsigned ints, zero before the first call and left zero by every call (one set per stream).
// Returns a cudaError_t as int (0 = success).
int gemv(const void* x, DType xt, int64_t batch, int batch_tile, const QWeightView& w, const void* bias, void* y,
         float* ws, unsigned int* counters, int64_t target_blocks, void* stream);

// out [n, m] (W^T in kernel order) in dtype ot. Returns a cudaError_t as int.
int dequant_t(const QWeightView& w, void* out, DType ot, void* stream);

// Tensor-core dequant GEMM (sm_80+, bits 2/3/4, x fp16/bf16): y [batch, m] = x [batch, n] (kernel order,
// row stride ldx, 16-byte aligned, ldx % 8 == 0) @ dequant(W)^T (+ bias [m] in xt, or nullptr).
// Activation columns [n, kx) must be readable and zero (kx % 8 == 0, kx >= n); past kx nothing is read.
// plan = qk::plan_gemm(batch, m, n, qk::gemm_mtiles(batch), target); ws: fp32 scratch of
// plan.splits * batch * m floats when plan.splits > 1; counters: plan.col_blocks * plan.row_blocks
// unsigned ints, zero before and after every call (one set per stream). Returns a cudaError_t as int.
int mma_gemm(const void* x, DType xt, int64_t batch, int64_t ldx, int64_t kx, const QWeightView& w, const void* bias,
             void* y, float* ws, unsigned int* counters, const GemmPlan& plan, void* stream);

// Compute capability major of the current device (0 on error); mma_gemm needs >= 8.
int mma_arch_major();

// Number of SMs of the current device (0 on error).
int sm_count();

}  // namespace cuda
}  // namespace qk
