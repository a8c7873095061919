// CUDA implementation of quantkern::gptq_block_solve (schema: csrc/cpu/solver.cpp; contract:
// csrc/common/solver.h). Per block of columns: the CUDA block kernel (csrc/cuda/solver.cu), then the
// tail update of the remaining columns as torch GEMMs (fp32, TF32 off for the duration).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "solver.h"

namespace {

// run_end[i] = end of the run of equal gidx starting at i (0 elsewhere); every group one run (dynamic).
at::Tensor run_ends(const at::Tensor& gidx_cpu, bool dynamic, const char* op) {
  const int64_t n = gidx_cpu.size(0);
  auto out = at::zeros({n}, gidx_cpu.options());
  if (!dynamic) return out;
  const int32_t* g = gidx_cpu.data_ptr<int32_t>();
  int32_t* r = out.data_ptr<int32_t>();
  std::set<int32_t> seen;
  for (int64_t s = 0; s < n;) {
    int64_t e = s + 1;
    while (e < n && g[e] == g[s]) ++e;
    TORCH_CHECK(seen.insert(g[s]).second, op,
                ": dynamic group params need every group to be one contiguous run of gidx (group ", g[s],
                " appears twice)");
    r[s] = static_cast<int32_t>(e);
    s = e;
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gptq_block_solve_cuda(
    const at::Tensor& W_in, const at::Tensor& U_in, const std::optional<at::Tensor>& P_in, const at::Tensor& gidx_in,
    const at::Tensor& scales_in, const at::Tensor& zeros_in, int64_t bits, bool sym, bool dynamic_groups,
    int64_t blocksize, c10::string_view kernel) {
  constexpr const char* op = "quantkern::gptq_block_solve (CUDA)";
  TORCH_CHECK(W_in.is_cuda(), op, ": expected CUDA tensors");
  TORCH_CHECK(kernel == "gptq_cuda", op, ": the CUDA tensors' kernel is gptq_cuda, got '", std::string(kernel), "'");
  const c10::cuda::CUDAGuard guard(W_in.device());
  TORCH_CHECK(W_in.dim() == 2 && W_in.scalar_type() == at::kFloat, op, ": W must be 2-D fp32, got ", W_in.sizes());
  const int64_t m = W_in.size(0), n = W_in.size(1);
  TORCH_CHECK(U_in.dim() == 2 && U_in.size(0) == n && U_in.size(1) == n && U_in.scalar_type() == at::kFloat, op,
              ": U must be fp32 [", n, ", ", n, "], got ", U_in.sizes());
  TORCH_CHECK(gidx_in.dim() == 1 && gidx_in.size(0) == n && gidx_in.scalar_type() == at::kInt, op,
              ": gidx must be int32 [", n, "]");
  TORCH_CHECK(scales_in.dim() == 2 && scales_in.size(1) == m && scales_in.scalar_type() == at::kFloat &&
                  zeros_in.sizes() == scales_in.sizes() && zeros_in.scalar_type() == at::kFloat,
              op, ": scales/zeros must be fp32 [G, ", m, "]");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, op, ": bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be > 0, got ", blocksize);
  const bool has_p = P_in.has_value() && P_in->defined();
  if (has_p)
    TORCH_CHECK(P_in->dim() == 2 && P_in->size(0) == n && P_in->size(1) == n && P_in->scalar_type() == at::kFloat,
                op, ": P must be fp32 [n, n] or None");
  for (const at::Tensor* t : {&U_in, &gidx_in, &scales_in, &zeros_in})
    TORCH_CHECK(t->device() == W_in.device(), op, ": all tensors must be on ", W_in.device());
  if (has_p) TORCH_CHECK(P_in->device() == W_in.device(), op, ": P must be on ", W_in.device());

  const int64_t G = scales_in.size(0);
  const at::Tensor gidx_cpu = gidx_in.to(at::kCPU).contiguous();
  if (n > 0) {
    const auto mn = gidx_cpu.min().item<int32_t>(), mx = gidx_cpu.max().item<int32_t>();
    TORCH_CHECK(mn >= 0 && mx < G, op, ": gidx values must lie in [0, ", G, ")");
  }
  const at::Tensor run_end = run_ends(gidx_cpu, dynamic_groups, op).to(W_in.device());
  const at::Tensor U = U_in.contiguous(), gidx = gidx_in.contiguous();
  const at::Tensor P = has_p ? P_in->contiguous() : at::Tensor();
  at::Tensor Wc = W_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor scales = scales_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor zeros = zeros_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor codes = at::empty({m, n}, W_in.options().dtype(at::kByte));
  at::Tensor loss = at::zeros({m}, W_in.options().dtype(at::kDouble));
  if (m == 0 || n == 0) return {codes, scales, zeros, loss};
  const int64_t B = std::min<int64_t>(blocksize, n);
  TORCH_CHECK(B <= qk::cuda::kMaxSolveBlock, op, ": the CUDA kernel handles blocksize <= ", qk::cuda::kMaxSolveBlock,
              ", got ", blocksize, " (use the cpu or triton backend)");
  at::Tensor Err = at::empty({m, B}, W_in.options());
  at::Tensor Qb = has_p ? at::empty({m, B}, W_in.options()) : Err;

  auto& ctx = at::globalContext();
  const bool tf32 = ctx.allowTF32CuBLAS();
  ctx.setAllowTF32CuBLAS(false);  // the tail update is part of the solver's fp32 maths
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(W_in.device().index()).stream();
  try {
    for (int64_t i1 = 0; i1 < n; i1 += B) {
      const int64_t i2 = std::min(i1 + B, n), b = i2 - i1;
      qk::cuda::BlockSolveArgs a{Wc.data_ptr<float>(), U.data_ptr<float>(), has_p ? P.data_ptr<float>() : nullptr,
                                 gidx.data_ptr<int32_t>(), run_end.data_ptr<int32_t>(), scales.data_ptr<float>(),
                                 zeros.data_ptr<float>(), codes.data_ptr<uint8_t>(), Err.data_ptr<float>(),
                                 Qb.data_ptr<float>(), loss.data_ptr<double>(), m, n, i1, i2, B,
                                 static_cast<int>(bits), sym, dynamic_groups};
      const int err = qk::cuda::block_solve(a, stream);
      TORCH_CHECK(err == 0, op, ": kernel launch failed with CUDA error ", err);
      if (i2 < n) {
        auto tail = Wc.narrow(1, i2, n - i2);
        tail.sub_(at::mm(Err.narrow(1, 0, b), U.narrow(0, i1, b).narrow(1, i2, n - i2)));
        if (has_p) tail.add_(at::mm(Qb.narrow(1, 0, b), P.narrow(0, i1, b).narrow(1, i2, n - i2)));
      }
    }
  } catch (...) {
    ctx.setAllowTF32CuBLAS(tf32);
    throw;
  }
  ctx.setAllowTF32CuBLAS(tf32);
  return {codes, scales, zeros, loss};
}

}  // namespace

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) { m.impl("gptq_block_solve", &gptq_block_solve_cuda); }
