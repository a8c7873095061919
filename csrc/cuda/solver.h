// C++ interface of the CUDA gptq_block_solve block kernel (csrc/cuda/solver.cu). No torch headers.
#pragma once
#include <cstdint>

namespace qk {
namespace cuda {

// One block [i1, i2) of the error-feedback loop of csrc/common/solver.h for every row: reads the
// block-start working copy Wc [m, n], writes codes[:, i1:i2], Err/Qb [m, ld] (columns 0..i2-i1-1),
// adds the block's squared errors to loss [m] (fp64), and in dynamic mode writes the params of groups
// whose run starts in the block. run_end[i] = end of the group run starting at i, else 0 (dynamic).
struct BlockSolveArgs {
  const float* Wc;
  const float* U;
  const float* P;  // nullptr: no GPTAQ term
  const int32_t* gidx;
  const int32_t* run_end;
  float* scales;
  float* zeros;
  uint8_t* codes;
  float* Err;
  float* Qb;  // only written when P != nullptr
  double* loss;
  int64_t m, n, i1, i2, ld;
  int bits;
  bool sym, dynamic;
};

// Largest block the kernel holds in registers (columns per row).
constexpr int kMaxSolveBlock = 256;

// Returns a cudaError_t as int (0 = success).
int block_solve(const BlockSolveArgs& a, void* stream);

}  // namespace cuda
}  // namespace qk
