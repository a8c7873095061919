// CPU qgemm: y = x @ dequant(W)^T (+ bias) on the kernel-native layout from repack.cpp.
// Decode (<= 8 tokens): fused dequant + fp32 FMA GEMV, threaded over 16-row tiles.
// Prefill: dequantize panels of rows to fp32 W^T (cache-sized) and multiply with at::mm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "cpu_features.h"
#include "qgemm_kernels.h"

// (here, not in qgemm_amx.cpp: that file's AVX-512/AMX target must not compile cpu_features.h's inlines)
bool qk::cpu::qgemm::amx_available() {
  return amx_detected() && !qk::cpu::env_switch_on("QUANTKERN_NO_AMX");
}

namespace {

namespace qg = qk::cpu::qgemm;

// Threads only pay off above this many weights per chunk (small layers run inline: no fork/join).
constexpr int64_t kMinWeightsPerTask = 1 << 18;

// Prefill blocking: each thread owns column panels of kPanelTiles * 16 outputs and walks K in chunks of
// kPanelBlocks k-blocks: dequantize a [kPanelBlocks * 32, kPanelTiles * 16] fp32 W^T panel (1 MiB, stays in
// L2) and accumulate x[:, chunk] @ panel into its output columns with a single-threaded BLAS call.
constexpr int64_t kPanelTiles = 16;
constexpr int64_t kPanelBlocks = 32;

// Like at::parallel_for, but threads take chunks from a shared counter: when a thread is descheduled
// (a busy or shared machine), the others take over its work instead of waiting for it. Chunks shrink
// as the work runs out (guided: a quarter of the remaining share per thread, at least `grain`, a
// multiple of `align`), so the threads finish together; each chunk is a contiguous range (one linear
// stream through the packed weights).
template <typename F>
void dynamic_for(int64_t n, int64_t grain, const F& fn, int64_t align = 4) {
  const int64_t T = at::get_num_threads();
  if (n <= grain || T == 1 || at::in_parallel_region()) {
    if (n > 0) fn(0, n);
    return;
  }
  // at most an even share per thread (a 36-tile decode GEMV split 28 + 8 runs at the speed of the 28)
  grain = std::min<int64_t>(std::max<int64_t>(grain, 1), (n + T - 1) / T);
  grain = (grain + align - 1) / align * align;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, T, 1, [&](int64_t, int64_t) {
    int64_t a = next.load(std::memory_order_relaxed);
    while (a < n) {
      const int64_t want = std::max(grain, ((n - a) / (4 * T) + align - 1) / align * align);
      const int64_t b = std::min(n, a + want);
      if (next.compare_exchange_weak(a, b, std::memory_order_relaxed)) {
        fn(a, b);
        a = next.load(std::memory_order_relaxed);
      }
    }
  });
}

template <typename T>
void gather_x(const at::Tensor& x, const int32_t* xi, int64_t Kpad, float* xn) {
  const int64_t B = x.size(0), n = x.size(1);
  const T* src = x.data_ptr<T>();
  at::parallel_for(0, B, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(Kpad, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t p = 0; p < Kpad; ++p) xn[b * Kpad + p] = xi[p] < 0 ? 0.0f : static_cast<float>(src[b * n + xi[p]]);
  });
}

void qgemm_cpu_out(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& kb_start,
                   const at::Tensor& x_index, int64_t bits, int64_t m, const c10::optional<at::Tensor>& bias,
                   int64_t path, at::Tensor& out) {
  const char* op = "quantkern::qgemm_cpu";
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &qw, &sc, &kb_start, &x_index, &out})
    TORCH_CHECK(t->device().is_cpu(), op, ": expected CPU tensors, got one on ", t->device(),
                " (use the cuda/triton backend for GPU tensors)");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, op, ": bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, in_features], got ", x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", xt);
  TORCH_CHECK(qw.dim() == 4 && qw.scalar_type() == at::kInt && qw.size(2) == bits && qw.size(3) == qg::kTileRows &&
                  qw.is_contiguous(),
              op, ": native qweight must be contiguous int32 [tiles, kblocks, bits=", bits, ", 16], got ",
              qw.sizes(), " ", qw.scalar_type());
  const int64_t Mt = qw.size(0), KB = qw.size(1), Kpad = KB * qg::kBlock;
  TORCH_CHECK(m > (Mt - 1) * qg::kTileRows && m <= Mt * qg::kTileRows, op, ": m=", m, " does not match ", Mt,
              " row tiles");
  TORCH_CHECK(sc.dim() == 4 && sc.scalar_type() == at::kHalf && sc.size(0) == Mt && sc.size(2) == 2 &&
                  sc.size(3) == qg::kTileRows && sc.is_contiguous(),
              op, ": native scales must be contiguous float16 [", Mt, ", G, 2, 16], got ", sc.sizes(), " ",
              sc.scalar_type());
  const int64_t G = sc.size(1);
  TORCH_CHECK(kb_start.dim() == 1 && kb_start.scalar_type() == at::kInt && kb_start.size(0) == G + 1, op,
              ": kb_start must be int32 [G+1=", G + 1, "]");
  TORCH_CHECK(x_index.dim() == 1 && x_index.scalar_type() == at::kInt && x_index.size(0) == Kpad, op,
              ": x_index must be int32 [", Kpad, "]");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == m &&
                  out.is_contiguous(),
              op, ": out must be contiguous float32 [", x.size(0), ", ", m, "], got ", out.sizes(), " ",
              out.scalar_type());
  const int32_t* kbs = kb_start.data_ptr<int32_t>();
  TORCH_CHECK(kbs[0] == 0 && kbs[G] == KB, op, ": kb_start does not cover the ", KB, " k-blocks");
  const int32_t* xi = x_index.data_ptr<int32_t>();
  const int64_t n = x.size(1);
  const int32_t max_index = Kpad ? *std::max_element(xi, xi + Kpad) : -1;
  TORCH_CHECK(max_index < n, op, ": the layout reads input channel ", max_index, " but x has only ", n,
              " (x.shape[-1] does not match the weight)");
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == m, op, ": bias must be a CPU [", m,
                "] tensor, got ", bias->sizes(), " on ", bias->device());
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const int64_t B = x.size(0);
  if (B == 0 || m == 0) return;

  std::vector<int32_t> kb_group(KB);
  for (int64_t g = 0; g < G; ++g)
    for (int32_t k = kbs[g]; k < kbs[g + 1]; ++k) kb_group[k] = static_cast<int32_t>(g);
  const qg::Layout L{qw.data_ptr<int32_t>(), reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()), kbs, kb_group.data(), G, KB, Mt, m,
                     static_cast<int>(bits)};
  const bool avx512 = qk::cpu::use_avx512();
  const float* bptr = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  float* y = out.data_ptr<float>();

  // x in native channel order (act-order gather + group padding), fp32.
  const auto xc = x.contiguous();
  auto xn = at::empty({B, Kpad}, x.options().dtype(at::kFloat));
  float* xnp = xn.data_ptr<float>();
  if (xt == at::kFloat) gather_x<float>(xc, xi, Kpad, xnp);
  else if (xt == at::kBFloat16) gather_x<at::BFloat16>(xc, xi, Kpad, xnp);
  else gather_x<at::Half>(xc, xi, Kpad, xnp);

  if (path == 1 || path == 3 || path == 4 || path == 5 || path == 6 || (path == 0 && B <= qg::kMaxGemvBatch)) {
    std::vector<float> xsum(B * G);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < G; ++g) {
        double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent chains (k-blocks are whole multiples of 8)
        for (int64_t p = kbs[g] * qg::kBlock; p < kbs[g + 1] * qg::kBlock; p += 8)
          for (int i = 0; i < 8; ++i) part[i] += xnp[b * Kpad + p + i];
        xsum[b * G + g] = static_cast<float>(((part[0] + part[1]) + (part[2] + part[3])) +
                                             ((part[4] + part[5]) + (part[6] + part[7])));
      }
    const int64_t grain = std::max<int64_t>(1, kMinWeightsPerTask / (Kpad * qg::kTileRows));
    // vpdpbusd paths (4-bit, AVX-512 VNNI): path 4 = x rounded to int8 (opt-in), path 5 = x as 3 digit
    // planes (22-bit fixed point; the default for 4-bit decode: a third of the FMA path's instructions)
    const bool vnni = bits == 4 && avx512 && qk::cpu::isa().avx512vnni;
    const int limbs = path == 4 ? 1 : 3;
    if (vnni && (path == 4 || path == 5 || (path == 0 && B <= qg::kMaxLimbBatch))) {
      // the zero-point fold uses the sums of the represented x, so only its rounding differs from exact
      std::vector<int8_t> xq(B * limbs * Kpad);
      std::vector<float> dx(B * KB), xsq(B * G, 0.0f);
      std::vector<int32_t> isum(KB);
      for (int64_t b = 0; b < B; ++b) {
        qg::quantize_x_avx512(xnp + b * Kpad, KB, limbs, xq.data() + b * limbs * Kpad, Kpad, dx.data() + b * KB,
                              isum.data());
        for (int64_t kb = 0; kb < KB; ++kb) xsq[b * G + kb_group[kb]] += dx[b * KB + kb] * static_cast<float>(isum[kb]);
      }
      const int64_t step = limbs == 1 ? qg::kMaxGemvBatch : qg::kMaxLimbBatch;
      for (int64_t b0 = 0; b0 < B; b0 += step) {
        const int nb = static_cast<int>(std::min<int64_t>(step, B - b0));
        dynamic_for(Mt, grain, [&](int64_t t0, int64_t t1) {
          qg::gemv_int8_avx512(L, nb, limbs, xq.data() + b0 * limbs * Kpad, Kpad, dx.data() + b0 * KB, KB,
                               xsq.data() + b0 * G, bptr, y + b0 * m, m, t0, t1);
        });
      }
      return;
    }
    // AMX for 2/3-bit decode: path 0 takes it for 2-8 tokens, and for 1 token on rows of <= kAmxMaxK1
    // channels (at 1 token on long rows the 4-stream LUT GEMV measured a few % faster)
    const bool amx = avx512 && (bits == 2 || bits == 3) && qg::amx_available() &&
                     (path == 6 || (path == 0 && (B > 1 || Kpad <= qg::kAmxMaxK1)));
    if (amx) {
      // runs: each group's k-blocks in pieces of <= kAmxRunBlocks (one x step each)
      std::vector<int32_t> group_run(G + 1), run_kb;
      for (int64_t g = 0; g < G; ++g) {
        group_run[g] = static_cast<int32_t>(run_kb.size());
        for (int32_t k = kbs[g]; k < kbs[g + 1]; k += qg::kAmxRunBlocks) run_kb.push_back(k);
      }
      group_run[G] = static_cast<int32_t>(run_kb.size());
      const int64_t runs = static_cast<int64_t>(run_kb.size());
      run_kb.push_back(static_cast<int32_t>(KB));
      // a run ends at its group's end or after kAmxRunBlocks: run r = [run_kb[r], run_kb[r + 1])
      std::vector<int32_t> chunk_kb, chunk_run;
      for (int64_t r = 0; r < runs; ++r)
        for (int32_t k = run_kb[r]; k < run_kb[r + 1]; k += 2) {
          chunk_kb.push_back(k);
          chunk_run.push_back(static_cast<int32_t>(r));
        }
      const int64_t chunks = static_cast<int64_t>(chunk_kb.size());
      const qg::AmxRuns R{G, runs, chunks, group_run.data(), run_kb.data(), chunk_kb.data(), chunk_run.data()};
      thread_local std::vector<int8_t> xq;  // reused per calling thread (no page faults per call)
      if (xq.size() < static_cast<size_t>(B * 3 * chunks * 64)) xq.resize(B * 3 * chunks * 64);
      int8_t* xqp = xq.data();
      std::vector<float> dx(B * runs), xsq(B * G);
      // passes of <= kMaxAmxBatch tokens; within a pass the digits are chunk-major (see gemv_amx)
      for (int64_t b = 0; b < B; ++b) {
        const int64_t b0 = b / qg::kMaxAmxBatch * qg::kMaxAmxBatch;
        const int64_t nb = std::min<int64_t>(qg::kMaxAmxBatch, B - b0);
        qg::quantize_x_amx(xnp + b * Kpad, R, xqp + b0 * 3 * chunks * 64 + (b - b0) * 3 * 64, nb * 3 * 64,
                           dx.data() + b * runs, xsq.data() + b * G);
      }
      for (int64_t b0 = 0; b0 < B; b0 += qg::kMaxAmxBatch) {
        const int nb = static_cast<int>(std::min<int64_t>(qg::kMaxAmxBatch, B - b0));
        dynamic_for(Mt, grain, [&](int64_t t0, int64_t t1) {
          qg::gemv_amx(L, R, nb, xqp + b0 * 3 * chunks * 64, dx.data() + b0 * runs, xsq.data() + b0 * G, bptr,
                       y + b0 * m, m, t0, t1);
        }, /*align=*/qg::kAmxTiles);
      }
      return;
    }
    const bool lut = avx512 && (bits == 2 || bits == 3) && (path == 3 || (path == 0 && B <= qg::kMaxLutBatch));
    if (lut) {
      // per token and 4 channels: the 16 subset sums of x
      const int64_t chunks = Kpad / 4;
      // 64 B per 4 channels (229 KB for 14336 channels): reuse one buffer per calling thread instead of a
      // fresh zeroed (page-faulting) allocation per call; build_lut writes every entry
      thread_local std::vector<float> tab;
      if (tab.size() < static_cast<size_t>(B * chunks * 16)) tab.resize(B * chunks * 16);
      float* tabp = tab.data();  // (the lambdas below run on other threads: no thread_local names there)
      for (int64_t b = 0; b < B; ++b) qg::build_lut_avx512(xnp + b * Kpad, chunks, tabp + b * chunks * 16);
      for (int64_t b0 = 0; b0 < B; b0 += qg::kMaxLutBatch) {
        const int nb = static_cast<int>(std::min<int64_t>(qg::kMaxLutBatch, B - b0));
        dynamic_for(Mt, grain, [&](int64_t t0, int64_t t1) {
          qg::gemv_lut_avx512(L, nb, tabp + b0 * chunks * 16, chunks * 16, xsum.data() + b0 * G, bptr,
                              y + b0 * m, m, t0, t1);
        });
      }
      return;
    }
    for (int64_t b0 = 0; b0 < B; b0 += qg::kMaxGemvBatch) {
      const int nb = static_cast<int>(std::min<int64_t>(qg::kMaxGemvBatch, B - b0));
      dynamic_for(Mt, grain, [&](int64_t t0, int64_t t1) {
        (avx512 ? qg::gemv_avx512 : qg::gemv_avx2)(L, nb, xnp + b0 * Kpad, Kpad, xsum.data() + b0 * G, bptr,
                                                   y + b0 * m, m, t0, t1);
      });
    }
    return;
  }

  // Prefill: see kPanelTiles. Threads split the output columns, so no two write the same element.
  const int64_t panels = (Mt + kPanelTiles - 1) / kPanelTiles;
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerTask / (Kpad * kPanelTiles * qg::kTileRows));
  dynamic_for(panels, grain, [&](int64_t pa, int64_t pb) {
    auto buf = at::empty({kPanelBlocks * qg::kBlock, kPanelTiles * qg::kTileRows}, xn.options());
    float* bp = buf.data_ptr<float>();
    for (int64_t pi = pa; pi < pb; ++pi) {
      const int64_t t0 = pi * kPanelTiles, t1 = std::min(Mt, t0 + kPanelTiles);
      const int64_t r0 = t0 * qg::kTileRows, valid = std::min(m, t1 * qg::kTileRows) - r0;
      auto yv = out.narrow(1, r0, valid);
      for (int64_t kb0 = 0; kb0 < KB; kb0 += kPanelBlocks) {
        const int64_t kb1 = std::min(KB, kb0 + kPanelBlocks), rows = (kb1 - kb0) * qg::kBlock;
        (avx512 ? qg::dequant_avx512 : qg::dequant_avx2)(L, t0, t1, kb0, kb1, bp, buf.size(1));
        auto panel = buf.narrow(0, 0, rows).narrow(1, 0, valid);
        yv.addmm_(xn.narrow(1, kb0 * qg::kBlock, rows), panel, /*beta=*/kb0 == 0 ? 0 : 1);
      }
      if (bias_f.defined()) yv.add_(bias_f.narrow(0, r0, valid));
    }
  }, /*align=*/1);
}

at::Tensor qgemm_cpu(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& kb_start,
                     const at::Tensor& x_index, int64_t bits, int64_t m, const c10::optional<at::Tensor>& bias,
                     int64_t path) {
  TORCH_CHECK(x.dim() == 2, "quantkern::qgemm_cpu: x must be 2-D [tokens, in_features], got ", x.sizes());
  auto out = at::empty({x.size(0), m}, x.options().dtype(at::kFloat));
  qgemm_cpu_out(x, qw, sc, kb_start, x_index, bits, m, bias, path, out);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

void qgemm_cpu_out_op(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& kb_start,
                      const at::Tensor& x_index, int64_t bits, int64_t m, const c10::optional<at::Tensor>& bias,
                      int64_t path, at::Tensor out) {
  qgemm_cpu_out(x, qw, sc, kb_start, x_index, bits, m, bias, path, out);
}

}  // namespace

// path: 0 = choose (LUT GEMV for 2/3-bit <= 2 tokens on AVX-512, FMA GEMV for <= 8 tokens, else panels +
// at::mm); 1 = FMA GEMV, 2 = panels + at::mm, 3 = LUT GEMV where available (else FMA GEMV). 1-3 for tests.
// 4 = int8-activation VNNI GEMV for 4-bit (opt-in, approximate; else the FMA GEMV). 5 = 3-digit VNNI
// GEMV for 4-bit (else the FMA GEMV); path 0 takes it for <= kMaxLimbBatch tokens where VNNI exists.
// 6 = AMX GEMV for 2/3-bit (else the FMA GEMV); path 0 takes it for 2..kMaxGemvBatch tokens where AMX works,
// and for 1 token on rows of <= kAmxMaxK1 channels.
TORCH_LIBRARY_FRAGMENT(quantkern, m) {
  m.def("qgemm_cpu(Tensor x, Tensor qw, Tensor sc, Tensor kb_start, Tensor x_index, int bits, int m,"
        " Tensor? bias, int path=0) -> Tensor");
  m.def("qgemm_cpu_out(Tensor x, Tensor qw, Tensor sc, Tensor kb_start, Tensor x_index, int bits, int m,"
        " Tensor? bias, int path, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(quantkern, CPU, m) {
  m.impl("qgemm_cpu", &qgemm_cpu);
  m.impl("qgemm_cpu_out", &qgemm_cpu_out_op);
}
