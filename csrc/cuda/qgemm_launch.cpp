// CUDA implementations of quantkern::gpu_qgemm_gemv / gpu_qgemm_dequant_t / gpu_qgemm_mma (schemas in
// csrc/cpu/common_selftest.cpp). Checks tensors, picks the stream, calls the pure-CUDA kernels.
// c10/cuda/CUDAStream.h, not ATen/cuda/CUDAContext.h (which needs cuBLAS headers this toolkit lacks).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <utility>

#include "../common/qgemm_layout.h"
#include "qgemm.h"

namespace {

qk::cuda::DType dtype_of(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kHalf: return qk::cuda::DType::F16;
    case at::kBFloat16: return qk::cuda::DType::BF16;
    case at::kFloat: return qk::cuda::DType::F32;
    default: TORCH_CHECK(false, op, ": dtype must be float16, bfloat16 or float32, got ", t);
  }
}

qk::cuda::QWeightView view_of(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& zeros, const at::Tensor& g_idx, int64_t bits, int64_t group_size) {
  TORCH_CHECK(qk::supported_bits(bits), op, ": bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(qweight.is_cuda(), op, ": expected CUDA tensors, got ", qweight.device());
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt, op, ": qweight must be 2-D int32");
  TORCH_CHECK(g_idx.dim() == 1 && g_idx.scalar_type() == at::kInt, op, ": g_idx must be 1-D int32");
  const int64_t n = g_idx.size(0), m = qweight.size(1);
  TORCH_CHECK(qweight.size(0) == qk::packed_rows(n, bits), op, ": qweight has ", qweight.size(0),
              " rows, expected ", qk::packed_rows(n, bits), " for n=", n, " at ", bits, " bits");
  TORCH_CHECK(m % 4 == 0, op, ": the CUDA kernels need out_features % 4 == 0, got ", m);
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) == m && scales.scalar_type() == at::kHalf, op,
              ": scales must be fp16 [G, ", m, "]");
  TORCH_CHECK(zeros.sizes() == scales.sizes() && zeros.scalar_type() == at::kByte, op,
              ": zeros must be uint8 shaped like scales");
  TORCH_CHECK(group_size == -1 || group_size > 0, op, ": group_size must be -1 or > 0");
  for (const auto* t : {&qweight, &scales, &zeros, &g_idx})
    TORCH_CHECK(t->device() == qweight.device() && t->is_contiguous(), op,
                ": all tensors must be contiguous and on one device");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0, op, ": qweight must be 16-byte aligned");
  return qk::cuda::QWeightView{reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>()),
                               reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                               zeros.data_ptr<uint8_t>(),
                               g_idx.data_ptr<int32_t>(),
                               m,
                               n,
                               group_size,
                               static_cast<int>(bits)};
}

// The optional bias, checked against the output width and x's device, in x's dtype and contiguous;
// an undefined tensor when there is none.
at::Tensor checked_bias(const std::optional<at::Tensor>& bias, int64_t m, const at::Tensor& x, const char* op) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == m, op, ": bias must be [", m, "], got ", bias->sizes());
  TORCH_CHECK(bias->device() == x.device(), op, ": bias on ", bias->device(), ", x on ", x.device());
  return bias->to(x.scalar_type()).contiguous();
}

// The activation checks both kernels share: x is [batch, n] on the weight's device.
void check_x(const char* op, const at::Tensor& x, const qk::cuda::QWeightView& w, const at::Tensor& qweight) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.n, op, ": x must be [batch, ", w.n, "], got ", x.sizes());
  TORCH_CHECK(x.device() == qweight.device(), op, ": x on ", x.device(), ", weight on ", qweight.device());
}

// y [batch, m] and the checked bias; `done` when no kernel needs to run: an empty batch or m, or n == 0
// (y is then the bias broadcast over the batch, or zeros).
struct Output {
  at::Tensor y, bias;
  bool done;
};

Output make_output(const char* op, const at::Tensor& x, const qk::cuda::QWeightView& w,
                   const std::optional<at::Tensor>& bias) {
  Output o{at::empty({x.size(0), w.m}, x.options()), checked_bias(bias, w.m, x, op), false};
  if (x.size(0) == 0 || w.m == 0) {
    o.done = true;
  } else if (w.n == 0) {
    o.y = o.bias.defined() ? o.bias.unsqueeze(0).expand({x.size(0), w.m}).contiguous() : o.y.zero_();
    o.done = true;
  }
  return o;
}

// Split-K arrival counters, zero between calls (each call re-arms them). One set per device and
// stream, so launches on different streams never share them. Grown on demand, never freed.
unsigned int* gemv_counters(const at::Device& dev, cudaStream_t stream, int64_t need) {
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, at::Tensor> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& t = cache[{dev.index(), stream}];
  if (!t.defined() || t.numel() < need)
    t = at::zeros({std::max<int64_t>(need, 1024)}, at::TensorOptions().device(dev).dtype(at::kInt));
  return reinterpret_cast<unsigned int*>(t.data_ptr<int32_t>());
}

at::Tensor gemv_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                     const at::Tensor& g_idx, int64_t bits, int64_t group_size, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "quantkern::gpu_qgemm_gemv";
  const c10::cuda::CUDAGuard guard(qweight.device());
  const auto w = view_of(op, qweight, scales, zeros, g_idx, bits, group_size);
  check_x(op, x, w, qweight);
  const auto xt = dtype_of(x.scalar_type(), op);
  const auto xc = x.contiguous();
  auto [y, bc, done] = make_output(op, x, w, bias);
  if (done) return y;
  const bool has_bias = bc.defined();
  const int64_t batch = x.size(0);
  static const int sms = std::max(qk::cuda::sm_count(), 1);
  const int64_t target_blocks = 4 * sms;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(qweight.device().index()).stream();
  const int64_t esize = xc.element_size();
  for (int64_t b0 = 0; b0 < batch; b0 += 8) {  // batch tiles of up to 8 rows, each re-reads the weight
    const int64_t nb = std::min<int64_t>(8, batch - b0);
    const int tile = nb == 1 ? 1 : nb == 2 ? 2 : nb <= 4 ? 4 : 8;
    const auto plan = qk::plan_gemv(w.m, w.n, tile, target_blocks);
    at::Tensor ws;
    if (plan.splits > 1) ws = at::empty({plan.splits, nb, w.m}, x.options().dtype(at::kFloat));
    const int err = qk::cuda::gemv(static_cast<const char*>(xc.data_ptr()) + b0 * w.n * esize, xt, nb, tile, w,
                                   has_bias ? bc.data_ptr() : nullptr,
                                   static_cast<char*>(y.data_ptr()) + b0 * w.m * esize,
                                   plan.splits > 1 ? ws.data_ptr<float>() : nullptr,
                                   gemv_counters(x.device(), stream, plan.col_blocks), target_blocks, stream);
    TORCH_CHECK(err == 0, op, ": kernel launch failed with CUDA error ", err);
  }
  return y;
}

at::Tensor dequant_t_cuda(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                          const at::Tensor& g_idx, int64_t bits, int64_t group_size, at::ScalarType dtype) {
  constexpr const char* op = "quantkern::gpu_qgemm_dequant_t";
  const c10::cuda::CUDAGuard guard(qweight.device());
  const auto w = view_of(op, qweight, scales, zeros, g_idx, bits, group_size);
  const auto ot = dtype_of(dtype, op);
  auto out = at::empty({w.n, w.m}, qweight.options().dtype(dtype));
  auto stream = c10::cuda::getCurrentCUDAStream(qweight.device().index());
  const int err = qk::cuda::dequant_t(w, out.data_ptr(), ot, stream.stream());
  TORCH_CHECK(err == 0, op, ": kernel launch failed with CUDA error ", err);
  return out;
}

// Split-K target: CTAs per SM (default 2, what the register budget lets reside). Read per call so that
// benchmarks can sweep it (QUANTKERN_CUDA_MMA_BLOCKS_PER_SM).
int64_t mma_blocks_per_sm() {
  const char* v = std::getenv("QUANTKERN_CUDA_MMA_BLOCKS_PER_SM");
  const int64_t b = v != nullptr ? std::atoll(v) : 2;
  return b >= 1 ? b : 2;
}

at::Tensor mma_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                    const at::Tensor& g_idx, int64_t bits, int64_t group_size, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "quantkern::gpu_qgemm_mma";
  const c10::cuda::CUDAGuard guard(qweight.device());
  const auto w = view_of(op, qweight, scales, zeros, g_idx, bits, group_size);
  TORCH_CHECK(bits >= 2 && bits <= 4, op, ": the tensor-core kernel supports bits 2, 3 and 4, got ", bits);
  check_x(op, x, w, qweight);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": x must be float16 or bfloat16 (fp32 activations take gpu_qgemm_dequant_t + matmul), got ",
              x.scalar_type());
  const int major = qk::cuda::mma_arch_major();
  TORCH_CHECK(major >= 8, op, ": needs a GPU of compute capability 8.0 or newer (mma.sync, cp.async), got ", major);
  auto [y, bc, done] = make_output(op, x, w, bias);
  if (done) return y;
  const bool has_bias = bc.defined();
  const int64_t batch = x.size(0);
  // 16-byte activation copies need rows of a multiple of 8 elements at a 16-byte aligned base:
  // otherwise stage a zero-padded copy (one chunk multiple wide).
  at::Tensor xc = x.contiguous();
  int64_t ldx = w.n;
  if (w.n % 8 != 0 || reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16 != 0) {
    ldx = qk::num_chunks(w.n) * qk::kCodesPerChunk;
    auto xp = at::zeros({batch, ldx}, x.options());
    xp.narrow(1, 0, w.n).copy_(xc);
    xc = xp;
  }
  static const int sms = std::max(qk::cuda::sm_count(), 1);
  const auto plan = qk::plan_gemm(batch, w.m, w.n, qk::gemm_mtiles(batch), mma_blocks_per_sm() * static_cast<int64_t>(sms));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(qweight.device().index()).stream();
  at::Tensor ws;
  if (plan.splits > 1) ws = at::empty({plan.splits, batch, w.m}, x.options().dtype(at::kFloat));
  const int err = qk::cuda::mma_gemm(xc.data_ptr(), dtype_of(x.scalar_type(), op), batch, ldx, ldx, w,
                                     has_bias ? bc.data_ptr() : nullptr, y.data_ptr(),
                                     plan.splits > 1 ? ws.data_ptr<float>() : nullptr,
                                     gemv_counters(x.device(), stream, plan.col_blocks * plan.row_blocks), plan, stream);
  TORCH_CHECK(err == 0, op, ": kernel launch failed with CUDA error ", err);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) {
  m.impl("gpu_qgemm_gemv", &gemv_cuda);
  m.impl("gpu_qgemm_dequant_t", &dequant_t_cuda);
  m.impl("gpu_qgemm_mma", &mma_cuda);
}
