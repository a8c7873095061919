// Schemas of the GPU qgemm layout ops (compiled in every build, so CPU-only builds know them) and
// CPU implementations that run the csrc/common/qgemm_layout.h functions the CUDA kernels use: the
// Python tests compare these with the reference, so the GPU bit/index logic is exercised on CPU.
// Plain scalar loops: correctness, not speed (the fast CPU qgemm lives elsewhere).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../common/qgemm_layout.h"

namespace {

struct Layout {
  const uint32_t* qw;
  const at::Half* scales;
  const uint8_t* zeros;
  const int32_t* g_idx;
  int64_t m, n, group_size;
  int bits;
};

// Validates the GpuQWeight tensors (quantkern/formats/gpu_native.py); shared by CPU and CUDA impls.
void check_layout(const char* op, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                  const at::Tensor& g_idx, int64_t bits, int64_t group_size) {
  TORCH_CHECK(qk::supported_bits(bits), op, ": bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt, op, ": qweight must be 2-D int32, got ",
              qweight.sizes(), " ", qweight.scalar_type());
  TORCH_CHECK(g_idx.dim() == 1 && g_idx.scalar_type() == at::kInt, op, ": g_idx must be 1-D int32");
  const int64_t n = g_idx.size(0), m = qweight.size(1);
  TORCH_CHECK(qweight.size(0) == qk::packed_rows(n, bits), op, ": qweight has ", qweight.size(0), " rows, expected ",
              qk::packed_rows(n, bits), " for n=", n, " at ", bits, " bits");
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) == m && scales.scalar_type() == at::kHalf, op,
              ": scales must be fp16 [G, ", m, "], got ", scales.sizes(), " ", scales.scalar_type());
  TORCH_CHECK(zeros.sizes() == scales.sizes() && zeros.scalar_type() == at::kByte, op,
              ": zeros must be uint8 with the shape of scales ", scales.sizes(), ", got ", zeros.sizes(), " ",
              zeros.scalar_type());
  TORCH_CHECK(group_size == -1 || group_size > 0, op, ": group_size must be -1 or > 0, got ", group_size);
  for (const auto* t : {&qweight, &scales, &zeros, &g_idx})
    TORCH_CHECK(t->device() == qweight.device() && t->is_contiguous(), op,
                ": all tensors must be contiguous and on one device");
}

Layout view(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& g_idx,
            int64_t bits, int64_t group_size) {
  return Layout{reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>()), scales.data_ptr<at::Half>(),
                zeros.data_ptr<uint8_t>(), g_idx.data_ptr<int32_t>(), qweight.size(1), g_idx.size(0),
                group_size, static_cast<int>(bits)};
}

float scale_at(const Layout& w, int64_t g, int64_t col) { return static_cast<float>(w.scales[g * w.m + col]); }
float zero_at(const Layout& w, int64_t g, int64_t col) { return static_cast<float>(w.zeros[g * w.m + col]); }

// The BITS words of chunk ch of column col, gathered to stride 1 (as the CUDA kernels hold them);
// words past the last packed row (ragged n) read as zero.
void chunk_words(const Layout& w, int64_t ch, int64_t col, uint32_t* words) {
  for (int i = 0; i < w.bits; ++i)
    words[i] = qk::word_row_exists(ch, i, w.bits, w.n) ? w.qw[qk::word_row(ch, i, w.bits) * w.m + col] : 0u;
}

at::Tensor dequant_t_cpu(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                         const at::Tensor& g_idx, int64_t bits, int64_t group_size, at::ScalarType dtype) {
  check_layout("quantkern::gpu_qgemm_dequant_t", qweight, scales, zeros, g_idx, bits, group_size);
  const Layout w = view(qweight, scales, zeros, g_idx, bits, group_size);
  auto out = at::empty({w.n, w.m}, qweight.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, qk::num_chunks(w.n), 1, [&](int64_t c0, int64_t c1) {
    uint32_t words[8];
    for (int64_t ch = c0; ch < c1; ++ch)
      for (int64_t col = 0; col < w.m; ++col) {
        chunk_words(w, ch, col, words);
        for (int j = 0; j < qk::kCodesPerChunk && ch * 32 + j < w.n; ++j) {
          const int64_t k = ch * 32 + j, g = qk::group_of(k, w.group_size, w.g_idx);
          o[k * w.m + col] = qk::dequant_code(qk::get_code(words, 1, j, w.bits), scale_at(w, g, col), zero_at(w, g, col));
        }
      }
  });
  return dtype == at::kFloat ? out : out.to(dtype);
}

// Columns col0..col0+3 (missing ones past m read as zero words and are dropped), exactly as one GPU
// lane computes them: chunk_dot4 per chunk in the one-group-per-chunk case, dequant_code per code else.
template <int BITS>
void gemv_columns4(const Layout& w, const float* xpad, int64_t kpad, int64_t batch, int64_t col0, float* y) {
  uint32_t words[4][BITS];
  float zero[4], scale[4];
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = xpad + b * kpad;
    float acc[4][1] = {{0.f}, {0.f}, {0.f}, {0.f}};
    for (int64_t ch = 0; ch < qk::num_chunks(w.n); ++ch) {
      for (int c = 0; c < 4; ++c) {
        if (col0 + c < w.m) chunk_words(w, ch, col0 + c, words[c]);
        else for (int i = 0; i < BITS; ++i) words[c][i] = 0;
      }
      if (qk::chunk_uniform_groups(w.group_size)) {  // the CUDA kernel's one-group-per-chunk path
        const int64_t g = ch * 32 / w.group_size;
        for (int c = 0; c < 4; ++c) {
          const int64_t cc = std::min(col0 + c, w.m - 1);
          zero[c] = zero_at(w, g, cc);
          scale[c] = scale_at(w, g, cc);
        }
        qk::chunk_dot4<BITS, 1>(words, xb + ch * 32, kpad, scale, zero, acc);
      } else {  // the per-code path
        for (int j = 0; j < qk::kCodesPerChunk && ch * 32 + j < w.n; ++j) {
          const int64_t g = qk::group_of(ch * 32 + j, w.group_size, w.g_idx);
          for (int c = 0; c < 4; ++c) {
            const int64_t cc = std::min(col0 + c, w.m - 1);
            acc[c][0] = fmaf(qk::dequant_code(qk::get_code(words[c], 1, j, BITS), scale_at(w, g, cc), zero_at(w, g, cc)),
                             xb[ch * 32 + j], acc[c][0]);
          }
        }
      }
    }
    for (int c = 0; c < 4 && col0 + c < w.m; ++c) y[b * w.m + col0 + c] = acc[c][0];
  }
}

at::Tensor gemv_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                    const at::Tensor& g_idx, int64_t bits, int64_t group_size, const std::optional<at::Tensor>& bias) {
  check_layout("quantkern::gpu_qgemm_gemv", qweight, scales, zeros, g_idx, bits, group_size);
  const Layout w = view(qweight, scales, zeros, g_idx, bits, group_size);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.n, "quantkern::gpu_qgemm_gemv: x must be [batch, ", w.n, "], got ",
              x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "quantkern::gpu_qgemm_gemv: expected CPU tensors");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.m, "quantkern::gpu_qgemm_gemv: bias must be [", w.m,
                "], got ", bias->sizes());
  const int64_t batch = x.size(0), kpad = qk::num_chunks(w.n) * 32;
  auto xpad = at::zeros({batch, kpad}, x.options().dtype(at::kFloat));  // zero past n, as the kernel stages it
  xpad.narrow(1, 0, w.n).copy_(x);
  auto y = at::empty({batch, w.m}, x.options().dtype(at::kFloat));
  const float* xp = xpad.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (w.m + 3) / 4, 4, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) switch (w.bits) {
        case 2: gemv_columns4<2>(w, xp, kpad, batch, q * 4, yp); break;
        case 3: gemv_columns4<3>(w, xp, kpad, batch, q * 4, yp); break;
        case 4: gemv_columns4<4>(w, xp, kpad, batch, q * 4, yp); break;
        default: gemv_columns4<8>(w, xp, kpad, batch, q * 4, yp); break;
      }
  });
  if (has_bias) y += bias->to(x.scalar_type()).to(at::kFloat);  // bias rounded to x's dtype, as on the GPU
  return y.to(x.scalar_type());
}

// The tensor-core kernel (csrc/cuda/qgemm.cu mma_kernel) emulated at fragment level: for each m16 x n8
// output tile, chunk and k16 step, every lane builds its A and B registers exactly as a CUDA lane
// does (activation channels mma_a_chan, codes from lane_codes8 at mma_b_chan, values rounded to x's
// dtype), the registers are placed into the 16x16 / 16x8 matrices by the PTX fragment layouts
// (mma_a_row/col, mma_b_row) and multiplied in fp32, and C is read back by mma_c_row/col. A mismatch
// between the kernel's channel map for A and for B, or a wrong code extraction, fails the comparison
// with the reference.
template <typename T>
at::Tensor mma_emulate(const Layout& w, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  const int64_t batch = x.size(0), kpad = qk::num_chunks(w.n) * qk::kCodesPerChunk;
  auto xpad = at::zeros({batch, kpad}, x.options().dtype(at::kFloat));  // values of x's dtype, zero past n
  xpad.narrow(1, 0, w.n).copy_(x);
  auto y = at::empty({batch, w.m}, x.options().dtype(at::kFloat));
  const float* xp = xpad.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool uniform = qk::chunk_uniform_groups(w.group_size);
  const int64_t row_tiles = (batch + 15) / 16, col_tiles = (w.m + 7) / 8;
  at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t tile = i0; tile < i1; ++tile) {
      const int64_t r0 = tile / col_tiles * 16, n0 = tile % col_tiles * 8;
      float acc[32][4] = {};
      uint32_t words[8][8];
      for (int64_t ch = 0; ch < qk::num_chunks(w.n); ++ch) {
        for (int g = 0; g < 8; ++g) {
          if (n0 + g < w.m) chunk_words(w, ch, n0 + g, words[g]);
          else for (int i = 0; i < w.bits; ++i) words[g][i] = 0u;
        }
        for (int s = 0; s < 2; ++s) {
          float A[16][16], B[16][8];
          for (int lane = 0; lane < 32; ++lane) {
            const int g = lane >> 2, t = lane & 3;
            for (int r = 0; r < 4; ++r)
              for (int h = 0; h < 2; ++h) {
                const int64_t row = r0 + qk::mma_a_row(g, r), k = ch * 32 + qk::mma_a_chan(t, s, r, h);
                A[qk::mma_a_row(g, r)][qk::mma_a_col(t, r, h)] = row < batch ? xp[row * kpad + k] : 0.f;
              }
            const int64_t col = n0 + g;
            const uint32_t field = qk::lane_codes8(words[g], 1, t, w.bits);
            for (int r = 0; r < 2; ++r)
              for (int h = 0; h < 2; ++h) {
                const int c = qk::mma_b_chan(t, s, r, h);
                const int64_t k = ch * 32 + c;
                float v = 0.f;
                if (col < w.m && (uniform || k < w.n)) {
                  const int64_t gi = uniform ? ch * 32 / w.group_size : qk::group_of(k, w.group_size, w.g_idx);
                  v = qk::dequant_code(qk::field_code(field, c - qk::lane_k0(t, 0), w.bits), scale_at(w, gi, col),
                                       zero_at(w, gi, col));
                }
                B[qk::mma_b_row(t, r, h)][g] = static_cast<float>(static_cast<T>(v));
              }
          }
          for (int lane = 0; lane < 32; ++lane)
            for (int i = 0; i < 4; ++i) {
              const int row = qk::mma_c_row(lane >> 2, i), cc = qk::mma_c_col(lane & 3, i);
              float sum = 0.f;
              for (int kk = 0; kk < 16; ++kk) sum += A[row][kk] * B[kk][cc];
              acc[lane][i] += sum;
            }
        }
      }
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < 4; ++i) {
          const int64_t row = r0 + qk::mma_c_row(lane >> 2, i), col = n0 + qk::mma_c_col(lane & 3, i);
          if (row < batch && col < w.m) yp[row * w.m + col] = acc[lane][i];
        }
    }
  });
  if (bias.has_value() && bias->defined()) y += bias->to(x.scalar_type()).to(at::kFloat);
  return y.to(x.scalar_type());
}

at::Tensor mma_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                   const at::Tensor& g_idx, int64_t bits, int64_t group_size, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "quantkern::gpu_qgemm_mma";
  check_layout(op, qweight, scales, zeros, g_idx, bits, group_size);
  TORCH_CHECK(bits >= 2 && bits <= 4, op, ": the tensor-core kernel supports bits 2, 3 and 4, got ", bits);
  const Layout w = view(qweight, scales, zeros, g_idx, bits, group_size);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.n, op, ": x must be [batch, ", w.n, "], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": x must be float16 or bfloat16 (fp32 activations take gpu_qgemm_dequant_t + matmul), got ",
              x.scalar_type());
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.m, op, ": bias must be [", w.m, "], got ", bias->sizes());
  return x.scalar_type() == at::kHalf ? mma_emulate<at::Half>(w, x, bias) : mma_emulate<at::BFloat16>(w, x, bias);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantkern, m) {
  // W^T [n, m] of the GPU layout in kernel channel order, in `dtype`.
  m.def("gpu_qgemm_dequant_t(Tensor qweight, Tensor scales, Tensor zeros, Tensor g_idx, int bits, int group_size, "
        "ScalarType dtype) -> Tensor");
  // y [batch, m] in x's dtype = x [batch, n] (kernel order) @ dequant(W)^T (+ bias); fp32 accumulation.
  // The CUDA impl is the small-batch GEMV (batch tiles of 8).
  m.def("gpu_qgemm_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor g_idx, int bits, "
        "int group_size, Tensor? bias=None) -> Tensor");
  // Same contract for x fp16/bf16 and bits 2/3/4; the CUDA impl is the tensor-core dequant GEMM (sm_80+),
  // the CPU impl emulates it at MMA-fragment level.
  m.def("gpu_qgemm_mma(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor g_idx, int bits, "
        "int group_size, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantkern, CPU, m) {
  m.impl("gpu_qgemm_dequant_t", &dequant_t_cpu);
  m.impl("gpu_qgemm_gemv", &gemv_cpu);
  m.impl("gpu_qgemm_mma", &mma_cpu);
}
