// CUDA block kernel of gptq_block_solve (contract and reference: csrc/common/solver.h,
// quantkern/ops/solver.py). No torch headers. One warp per row: the block's working copy of the row
// lives in registers, CPL columns per lane; column i's value is broadcast from its lane with a shuffle,
// every lane quantizes it (identical maths, no divergence), and each lane applies the rank-1 update to
// its own columns right of i. Dynamic group params: the warp reduces min/max of the run's block-start
// values Wc[row, i:e] and every lane evaluates qk::grid_params. Divisions are IEEE (qk::div_rn), so
// codes match the reference except at floating-point ties. The tail GEMM stays in torch (launcher).
#include <cuda_runtime.h>

#include <cfloat>

#include "../common/solver.h"
#include "solver.h"

namespace qk {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // warps per CTA
constexpr unsigned kFull = 0xffffffffu;

template <int CPL>
__global__ void __launch_bounds__(kRowsPerBlock * 32) block_solve_kernel(BlockSolveArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= a.m) return;  // the whole warp leaves together
  const int bw = static_cast<int>(a.i2 - a.i1);
  const float* wrow = a.Wc + row * a.n;
  float w1[CPL], errs[CPL], qs[CPL];
#pragma unroll
  for (int t = 0; t < CPL; ++t) {
    const int jl = lane * CPL + t;
    w1[t] = jl < bw ? wrow[a.i1 + jl] : 0.f;
    errs[t] = 0.f;
    qs[t] = 0.f;
  }
  const float maxq = static_cast<float>((1 << a.bits) - 1);
  double lsum = 0.0;
  float s = 0.f, z = 0.f;
  int gprev = -1;
  for (int il = 0; il < bw; ++il) {
    const int64_t i = a.i1 + il;
    const int owner = il / CPL, slot = il % CPL;
    float mine = 0.f;
#pragma unroll
    for (int t = 0; t < CPL; ++t) mine = t == slot ? w1[t] : mine;
    const float w = __shfl_sync(kFull, mine, owner);
    const int g = a.gidx[i];
    const int64_t e = a.dynamic ? a.run_end[i] : 0;
    if (e > 0) {  // first column of its group's run: params from the block-start values
      float vmin = FLT_MAX, vmax = -FLT_MAX;  // neutral for lanes without a column of the run
      for (int64_t c = i + lane; c < e; c += 32) {
        vmin = fminf(vmin, wrow[c]);
        vmax = fmaxf(vmax, wrow[c]);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        vmin = fminf(vmin, __shfl_xor_sync(kFull, vmin, off));
        vmax = fmaxf(vmax, __shfl_xor_sync(kFull, vmax, off));
      }
      qk::grid_params(vmin, vmax, a.bits, a.sym, &s, &z);
      if (lane == 0) {
        a.scales[static_cast<int64_t>(g) * a.m + row] = s;
        a.zeros[static_cast<int64_t>(g) * a.m + row] = z;
      }
      gprev = g;
    } else if (g != gprev) {  // params given (static) or computed by an earlier launch
      s = a.scales[static_cast<int64_t>(g) * a.m + row];
      z = a.zeros[static_cast<int64_t>(g) * a.m + row];
      gprev = g;
    }
    const float c = qk::quant_code(w, s, z, maxq);
    const float q = qk::dequant(c, s, z);
    const float err = qk::div_rn(w - q, a.U[i * a.n + i]);
    lsum += static_cast<double>(err) * static_cast<double>(err);
    const float* urow = a.U + i * a.n + a.i1;
    const float* prow = a.P != nullptr ? a.P + i * a.n + a.i1 : nullptr;
#pragma unroll
    for (int t = 0; t < CPL; ++t) {
      const int jl = lane * CPL + t;
      if (jl > il && jl < bw) {
        float upd = err * urow[jl];
        if (prow != nullptr) upd -= w * prow[jl];
        w1[t] -= upd;
      }
      if (lane == owner && t == slot) {
        errs[t] = err;
        qs[t] = q;
      }
    }
    if (lane == 0) a.codes[row * a.n + i] = static_cast<uint8_t>(c);
  }
#pragma unroll
  for (int t = 0; t < CPL; ++t) {
    const int jl = lane * CPL + t;
    if (jl < bw) {
      a.Err[row * a.ld + jl] = errs[t];
      if (a.P != nullptr) a.Qb[row * a.ld + jl] = qs[t];
    }
  }
  if (lane == 0) a.loss[row] += lsum;
}

}  // namespace

int block_solve(const BlockSolveArgs& a, void* stream) {
  const int64_t bw = a.i2 - a.i1;
  if (bw <= 0 || bw > kMaxSolveBlock || a.m <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>((a.m + kRowsPerBlock - 1) / kRowsPerBlock));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (bw <= 64)
    block_solve_kernel<2><<<grid, kRowsPerBlock * 32, 0, st>>>(a);
  else if (bw <= 128)
    block_solve_kernel<4><<<grid, kRowsPerBlock * 32, 0, st>>>(a);
  else
    block_solve_kernel<8><<<grid, kRowsPerBlock * 32, 0, st>>>(a);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace qk
