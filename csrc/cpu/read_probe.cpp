// Benchmark support: a streaming read of a float32 tensor, the DRAM read-bandwidth reference for the
// qgemm benchmark. torch.sum understates what a read-only loop reaches (its reduction does more work
// per byte), so the benchmark needs a loop that does nothing but load: wide loads into several
// independent accumulators (no add-latency chain), each thread one contiguous range read as 8 streams. The result is the
// sum of the elements (a checksum the compiler cannot drop; it matches torch.sum, which the tests check).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu_features.h"

#if QK_AVX2
#include <immintrin.h>
#endif

namespace {

// Floats per block: each block's fp32 partials go into one double, so the checksum stays accurate for
// any length; the block order is fixed, so the result does not depend on the thread count.
constexpr int64_t kBlockFloats = 1 << 14;  // 64 KiB

// kStreams consecutive blocks read side by side, one cache line of each in turn (2 accumulators per
// block: independent add chains). Several concurrent streams per core read faster than one (measured
// here: 1 stream 27, 2: 29, 4: 31, 8: 31 GB/s on 2 threads; MKL's fp32 GEMV, which also reads rows side
// by side, reaches 30-31), so one stream would understate the bandwidth a kernel can get.
constexpr int kStreams = 8;

#if QK_AVX2
__attribute__((target("avx512f"))) void blocks_sum_avx512(const float* p, double* out) {
  constexpr int S = kStreams;
  constexpr int64_t n = kBlockFloats, stride = kBlockFloats;
  __m512 a[S][2];
  for (int s = 0; s < S; ++s) a[s][0] = a[s][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 32)
    for (int s = 0; s < S; ++s) {
      a[s][0] = _mm512_add_ps(a[s][0], _mm512_loadu_ps(p + s * stride + k));
      a[s][1] = _mm512_add_ps(a[s][1], _mm512_loadu_ps(p + s * stride + k + 16));
    }
  for (int s = 0; s < S; ++s) out[s] = static_cast<double>(_mm512_reduce_add_ps(_mm512_add_ps(a[s][0], a[s][1])));
}

// Sum of p[0, n), n a multiple of 64 (AVX2; with AVX-512: the ragged last blocks): 8 accumulators.
double block_sum_avx2(const float* p, int64_t n) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 64)
    for (int i = 0; i < 8; ++i) a[i] = _mm256_add_ps(a[i], _mm256_loadu_ps(p + k + 8 * i));
  __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])),
                           _mm256_add_ps(_mm256_add_ps(a[4], a[5]), _mm256_add_ps(a[6], a[7])));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  double out = 0;
  for (float v : lanes) out += v;
  return out;
}
#else
double block_sum_avx2(const float* p, int64_t n) {  // (no AVX2 in this build: a plain loop)
  double out = 0;
  for (int64_t k = 0; k < n; ++k) out += p[k];
  return out;
}
#endif

at::Tensor read_bandwidth_probe(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "quantkern::read_bandwidth_probe: expected a CPU tensor, got one on ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "quantkern::read_bandwidth_probe: expected float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "quantkern::read_bandwidth_probe: expected a contiguous tensor (it streams memory)");
  const float* p = t.data_ptr<float>();
  const int64_t n = t.numel();
  const int64_t nblocks = (n + kBlockFloats - 1) / kBlockFloats;
  const bool avx512 = QK_AVX2 && qk::cpu::cpu_has(qk::cpu::Need::avx512);  // the hardware's widest loads
  std::vector<double> part(nblocks, 0.0);
  // one contiguous range of blocks per thread (at::parallel_for splits [0, nblocks) evenly)
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    int64_t b = b0;
#if QK_AVX2
    if (avx512)  // whole groups of kStreams full blocks
      for (; b + kStreams <= b1 && (b + kStreams) * kBlockFloats <= n; b += kStreams)
        blocks_sum_avx512(p + b * kBlockFloats, &part[b]);
#endif
    for (; b < b1; ++b) {
      const int64_t s = b * kBlockFloats, e = std::min(n, s + kBlockFloats);
      const int64_t body = (e - s) / 64 * 64;
      double acc = block_sum_avx2(p + s, body);
      for (int64_t k = s + body; k < e; ++k) acc += p[k];  // ragged tail
      part[b] = acc;
    }
  });
  double total = 0;
  for (double v : part) total += v;
  return at::scalar_tensor(total, t.options().dtype(at::kDouble));
}

}  // namespace

// Internal benchmark support (not part of the public API): the streaming read reference.
TORCH_LIBRARY_FRAGMENT(quantkern, m) { m.def("read_bandwidth_probe(Tensor t) -> Tensor"); }

TORCH_LIBRARY_IMPL(quantkern, CPU, m) { m.impl("read_bandwidth_probe", &read_bandwidth_probe); }
