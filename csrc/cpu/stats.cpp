// Calibration statistics: acc += alpha * x^T x for the Hessian H = (2/N) sum X X^T.
// syrk-style: only the upper-triangular tile pairs are multiplied (half the flops of a full GEMM),
// each by one BLAS call on strided views, threaded over tile pairs; the lower triangle is mirrored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <utility>
#include <vector>

namespace {

void syrk_upper_(at::Tensor acc, const at::Tensor& x, double alpha) {
  TORCH_CHECK(acc.device().is_cpu() && x.device().is_cpu(), "quantkern::syrk_accumulate_: expected CPU tensors");
  TORCH_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble,
              "quantkern::syrk_accumulate_: acc must be fp32 or fp64, got ", acc.scalar_type());
  TORCH_CHECK(x.dim() == 2, "quantkern::syrk_accumulate_: x must be 2-D [T, n], got ", x.sizes());
  const int64_t n = x.size(1);
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == n && acc.size(1) == n && acc.is_contiguous(),
              "quantkern::syrk_accumulate_: acc must be contiguous [", n, ", ", n, "], got ", acc.sizes());
  if (n == 0 || x.size(0) == 0) return;
  const at::Tensor xs = x.to(acc.scalar_type()).contiguous();
  const int64_t tile = n <= 256 ? n : 256;
  const int64_t nt = (n + tile - 1) / tile;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t a = 0; a < nt; ++a)
    for (int64_t b = a; b < nt; ++b) pairs.emplace_back(a, b);
  // upper tiles (diagonal tiles are computed whole; their lower half is overwritten by the mirror)
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t a0 = pairs[p].first * tile, a1 = std::min(n, a0 + tile);
      const int64_t b0 = pairs[p].second * tile, b1 = std::min(n, b0 + tile);
      at::Tensor dst = acc.slice(0, a0, a1).slice(1, b0, b1);
      dst.addmm_(xs.slice(1, a0, a1).t(), xs.slice(1, b0, b1), 1.0, alpha);
    }
  });
  AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "syrk_mirror", [&] {
    scalar_t* A = acc.data_ptr<scalar_t>();
    at::parallel_for(1, n, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < r; ++c) A[r * n + c] = A[c * n + r];
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantkern, m) { m.def("syrk_accumulate_(Tensor(a!) acc, Tensor x, float alpha) -> ()"); }

TORCH_LIBRARY_IMPL(quantkern, CPU, m) { m.impl("syrk_accumulate_", &syrk_upper_); }
