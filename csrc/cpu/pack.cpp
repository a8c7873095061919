// Threaded bit packing along dim 0 (GPTQ qweight/qzeros layout), bit-exact with bitstream.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "../common/bitpack.h"

namespace {

at::Tensor pack_dim0(const at::Tensor& codes, int64_t bits) {
  TORCH_CHECK(codes.device().is_cpu(), "quantkern::pack_dim0: expected CPU tensor, got ", codes.device());
  TORCH_CHECK(qk::supported_bits(bits), "quantkern::pack_dim0: bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(codes.dim() == 2, "quantkern::pack_dim0: codes must be 2-D [n, m], got ", codes.sizes());
  TORCH_CHECK(codes.scalar_type() == at::kInt, "quantkern::pack_dim0: codes must be int32, got ", codes.scalar_type());
  const auto c = codes.contiguous();
  const int64_t n = c.size(0), m = c.size(1), chunks = (n + 31) / 32;
  // only words that hold a code are touched, so the last chunk may be partial
  auto out = at::zeros({qk::packed_rows(n, bits), m}, c.options().dtype(at::kInt));
  const int32_t* src = c.data_ptr<int32_t>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const int32_t maxq = (1 << bits) - 1;
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint32_t* words = dst + t * bits * m;
      for (int j = 0; j < 32 && t * 32 + j < n; ++j) {
        const int32_t* row = src + (t * 32 + j) * m;
        for (int64_t col = 0; col < m; ++col) {
          const int32_t v = row[col];
          if (v < 0 || v > maxq) { out_of_range = true; continue; }
          qk::put_code(words + col, m, j, static_cast<int>(bits), static_cast<uint32_t>(v));
        }
      }
    }
  });
  TORCH_CHECK(!out_of_range.load(), "quantkern::pack_dim0: codes out of range [0, ", maxq, "] for ", bits, " bits");
  return out;
}

at::Tensor unpack_dim0(const at::Tensor& packed, int64_t bits, int64_t n) {
  TORCH_CHECK(packed.device().is_cpu(), "quantkern::unpack_dim0: expected CPU tensor, got ", packed.device());
  TORCH_CHECK(qk::supported_bits(bits), "quantkern::unpack_dim0: bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kInt,
              "quantkern::unpack_dim0: packed must be 2-D int32, got ", packed.sizes(), " ", packed.scalar_type());
  TORCH_CHECK(packed.size(0) == qk::packed_rows(n, bits), "quantkern::unpack_dim0: packed has ", packed.size(0),
              " rows, expected ", qk::packed_rows(n, bits), " for n=", n, " at ", bits, " bits");
  const auto p = packed.contiguous();
  const int64_t m = p.size(1), chunks = (n + 31) / 32;
  auto out = at::empty({n, m}, p.options().dtype(at::kByte));
  const uint32_t* src = reinterpret_cast<const uint32_t*>(p.data_ptr<int32_t>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint32_t* words = src + t * bits * m;
      for (int j = 0; j < 32 && t * 32 + j < n; ++j) {
        uint8_t* row = dst + (t * 32 + j) * m;
        for (int64_t col = 0; col < m; ++col)
          row[col] = static_cast<uint8_t>(qk::get_code(words + col, m, j, static_cast<int>(bits)));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantkern, m) {
  m.def("pack_dim0(Tensor codes, int bits) -> Tensor");
  m.def("unpack_dim0(Tensor packed, int bits, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantkern, CPU, m) {
  m.impl("pack_dim0", &pack_dim0);
  m.impl("unpack_dim0", &unpack_dim0);
}
