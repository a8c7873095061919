// GPTQ v1 tensors -> the CPU qgemm kernel-native layout (described in qgemm_kernels.h), once at load.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common/bitpack.h"
#include "qgemm_kernels.h"

namespace {

using qk::cpu::qgemm::kBlock;
using qk::cpu::qgemm::kTileRows;

// Position p (0..31) of a native k-block: OR code q into the lane's words w[0..bits) (stride 16).
inline void put_native(uint32_t* w, int bits, int p, uint32_t q) {
  switch (bits) {
    case 4: w[(p >> 3) * kTileRows] |= q << (4 * (p & 7)); break;
    case 8: w[(p >> 2) * kTileRows] |= q << (8 * (p & 3)); break;
    default:  // 2, 3: bit planes, word i holds bit i of the 32 codes
      for (int i = 0; i < bits; ++i) w[i * kTileRows] |= ((q >> i) & 1u) << p;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qgemm_repack(const at::Tensor& qweight,
                                                                       const at::Tensor& qzeros,
                                                                       const at::Tensor& scales,
                                                                       const at::Tensor& g_idx, int64_t bits) {
  const char* op = "quantkern::qgemm_repack";
  TORCH_CHECK(qk::supported_bits(bits), op, ": bits must be 2, 3, 4 or 8, got ", bits);
  for (const at::Tensor* t : {&qweight, &qzeros, &scales, &g_idx})
    TORCH_CHECK(t->device().is_cpu(), op, ": expected CPU tensors, got one on ", t->device());
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt, op, ": qweight must be 2-D int32");
  TORCH_CHECK(qzeros.dim() == 2 && qzeros.scalar_type() == at::kInt, op, ": qzeros must be 2-D int32");
  TORCH_CHECK(g_idx.dim() == 1 && g_idx.scalar_type() == at::kInt, op, ": g_idx must be 1-D int32");
  TORCH_CHECK(scales.dim() == 2 && scales.is_floating_point(), op, ": scales must be 2-D floating point");
  const int64_t G = scales.size(0), m = scales.size(1), n = g_idx.size(0);
  TORCH_CHECK(qweight.size(0) == qk::packed_rows(n, bits) && qweight.size(1) == m, op, ": qweight ",
              qweight.sizes(), " does not match n=", n, ", m=", m, " at ", bits, " bits");
  TORCH_CHECK(qzeros.size(0) == G && qzeros.size(1) == qk::packed_rows(m, bits), op, ": qzeros ", qzeros.sizes(),
              " does not match G=", G, ", m=", m, " at ", bits, " bits");

  const auto qw_c = qweight.contiguous(), qz_c = qzeros.contiguous(), gi_c = g_idx.contiguous();
  const auto sc_c = scales.to(at::kFloat).contiguous();
  // the native layout keeps scales in fp16 (the GPTQ format's dtype): other dtypes must be fp16-exact
  TORCH_CHECK(scales.scalar_type() == at::kHalf || sc_c.to(at::kHalf).to(at::kFloat).equal(sc_c), op,
              ": scales must be float16 or exactly representable in float16 (the GPTQ v1 format), got ",
              scales.scalar_type(), " values that are not");
  const int32_t* gi = gi_c.data_ptr<int32_t>();

  // Stable counting sort of input channels by group: groups become contiguous, each padded to k-blocks.
  std::vector<int64_t> count(G, 0);
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(gi[j] >= 0 && gi[j] < G, op, ": g_idx[", j, "] = ", gi[j], " is outside [0, ", G, ")");
    ++count[gi[j]];
  }
  auto kb_start = at::empty({G + 1}, at::kInt);
  int32_t* kbs = kb_start.data_ptr<int32_t>();
  kbs[0] = 0;
  for (int64_t g = 0; g < G; ++g) kbs[g + 1] = kbs[g] + static_cast<int32_t>((count[g] + kBlock - 1) / kBlock);
  const int64_t KB = kbs[G], Kpad = KB * kBlock, Mt = (m + kTileRows - 1) / kTileRows;
  auto x_index = at::full({Kpad}, -1, at::kInt);
  int32_t* xi = x_index.data_ptr<int32_t>();
  std::vector<int64_t> fill(G, 0);
  for (int64_t j = 0; j < n; ++j) xi[kbs[gi[j]] * kBlock + fill[gi[j]]++] = static_cast<int32_t>(j);

  auto qw = at::zeros({Mt, KB, bits, kTileRows}, at::kInt);
  auto sc = at::zeros({Mt, G, 2, kTileRows}, at::kHalf);
  const uint32_t* src = reinterpret_cast<const uint32_t*>(qw_c.data_ptr<int32_t>());
  const uint32_t* zsrc = reinterpret_cast<const uint32_t*>(qz_c.data_ptr<int32_t>());
  const float* ssrc = sc_c.data_ptr<float>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(qw.data_ptr<int32_t>());
  at::Half* sdst = sc.data_ptr<at::Half>();
  const int64_t zrow = qz_c.size(1);
  const int b = static_cast<int>(bits);
  at::parallel_for(0, Mt, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(Kpad * kTileRows, 1)), [&](int64_t t0, int64_t t1) {
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t r0 = tile * kTileRows, rows = std::min<int64_t>(kTileRows, m - r0);
      for (int64_t p = 0; p < Kpad; ++p) {
        const int32_t j = xi[p];
        if (j < 0) continue;
        const uint32_t* chunk = src + (j / 32) * bits * m + r0;  // column r0's words for channel j
        uint32_t* w = dst + (tile * KB + p / kBlock) * bits * kTileRows;
        for (int64_t l = 0; l < rows; ++l)
          put_native(w + l, b, static_cast<int>(p % kBlock), qk::get_code(chunk + l, m, j % 32, b));
      }
      for (int64_t g = 0; g < G; ++g) {
        at::Half* s = sdst + (tile * G + g) * 2 * kTileRows;
        for (int64_t l = 0; l < rows; ++l) {
          const int64_t r = r0 + l;
          s[l] = ssrc[g * m + r];
          s[kTileRows + l] = static_cast<float>(qk::v1_zero(qk::get_code(zsrc + g * zrow + (r / 32) * bits, 1,
                                                                           static_cast<int>(r % 32), b)));
        }
      }
    }
  });
  return {qw, sc, kb_start, x_index};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantkern, m) {
  m.def("qgemm_repack(Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, int bits)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(quantkern, CPU, m) { m.impl("qgemm_repack", &qgemm_repack); }
