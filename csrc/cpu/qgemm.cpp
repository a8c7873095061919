// CPU qgemm: y = x @ dequant(W)^T (+ bias) on the kernel-native layout from repack.cpp.
//
// One function per named kernel (the table at the bottom). Which kernel runs is decided in Python
// (quantkern/kernels.py: what each kernel supports, the QUANTKERN_* switches, the batch); the op gets
// the kernel's name and refuses one this CPU or layout cannot run, so the kernel named is the kernel
// that ran. Decode kernels (GEMV: fused dequant + dot products, threaded over 16-row tiles) loop over
// the batch in passes of the tokens they hold; panel kernels (prefill) dequantize cache-sized panels of
// W^T to fp32 and multiply with at::mm.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "kernel_table.h"
#include "parallel.h"
#include "qgemm_kernels.h"

#if !QK_X86
bool qk::cpu::qgemm::amx_detected() { return false; }  // qgemm_amx.cpp is x86-only
#endif

namespace {

namespace qg = qk::cpu::qgemm;
using qk::cpu::dynamic_for;
using qk::cpu::Need;

// Threads only pay off above this many weights per chunk (small layers run inline: no fork/join).
constexpr int64_t kMinWeightsPerTask = 1 << 18;

// Prefill blocking: each thread owns column panels of kPanelTiles * 16 outputs and walks K in chunks of
// kPanelBlocks k-blocks: dequantize a [kPanelBlocks * 32, kPanelTiles * 16] fp32 W^T panel (1 MiB, stays in
// L2) and accumulate x[:, chunk] @ panel into its output columns with a single-threaded BLAS call.
constexpr int64_t kPanelTiles = 16;
constexpr int64_t kPanelBlocks = 32;

template <typename T>
void gather_x(const at::Tensor& x, const int32_t* xi, int64_t Kpad, float* xn) {
  const int64_t B = x.size(0), n = x.size(1);
  const T* src = x.data_ptr<T>();
  at::parallel_for(0, B, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(Kpad, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t p = 0; p < Kpad; ++p) xn[b * Kpad + p] = xi[p] < 0 ? 0.0f : static_cast<float>(src[b * n + xi[p]]);
  });
}

// One validated call: the layout, x gathered into native channel order (fp32), the output.
struct Call {
  qg::Layout L;
  int64_t B, Kpad;
  const int32_t* kbs;
  const int32_t* kb_group;
  const at::Tensor& xn;  // [B, Kpad] fp32
  const float* xnp;
  const at::Tensor& bias_f;  // fp32 [m] or undefined
  const float* bias;
  at::Tensor& out;  // [B, m] fp32
  float* y;
  int64_t gemv_grain() const { return std::max<int64_t>(1, kMinWeightsPerTask / (Kpad * qg::kTileRows)); }
};

// Per token and group: the sum of x over the group's channels (the zero-point fold of the fp32 GEMVs).
std::vector<float> group_sums(const Call& c) {
  const int64_t G = c.L.G;
  std::vector<float> xsum(c.B * G);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t g = 0; g < G; ++g) {
      double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent chains (k-blocks are whole multiples of 8)
      for (int64_t p = c.kbs[g] * qg::kBlock; p < c.kbs[g + 1] * qg::kBlock; p += 8)
        for (int i = 0; i < 8; ++i) part[i] += c.xnp[b * c.Kpad + p + i];
      xsum[b * G + g] = static_cast<float>(((part[0] + part[1]) + (part[2] + part[3])) +
                                           ((part[4] + part[5]) + (part[6] + part[7])));
    }
  return xsum;
}

using GemvFn = void (*)(const qg::Layout&, int, const float*, int64_t, const float*, const float*, float*, int64_t,
                        int64_t, int64_t);
using DequantFn = void (*)(const qg::Layout&, int64_t, int64_t, int64_t, int64_t, float*, int64_t);

// fp32 FMA GEMV: codes -> floats, one multiply-add per code and token, passes of kMaxGemvBatch tokens.
void fma_gemv(Call& c, GemvFn gemv) {
  const std::vector<float> xsum = group_sums(c);
  for (int64_t b0 = 0; b0 < c.B; b0 += qg::kMaxGemvBatch) {
    const int nb = static_cast<int>(std::min<int64_t>(qg::kMaxGemvBatch, c.B - b0));
    dynamic_for(c.L.Mt, c.gemv_grain(), [&](int64_t t0, int64_t t1) {
      gemv(c.L, nb, c.xnp + b0 * c.Kpad, c.Kpad, xsum.data() + b0 * c.L.G, c.bias, c.y + b0 * c.L.m, c.L.m, t0, t1);
    });
  }
}

// Prefill: see kPanelTiles. Threads split the output columns, so no two write the same element.
void panels(Call& c, DequantFn dequant) {
  const qg::Layout& L = c.L;
  const int64_t Mt = L.Mt, KB = L.KB, m = L.m;
  const int64_t npanels = (Mt + kPanelTiles - 1) / kPanelTiles;
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerTask / (c.Kpad * kPanelTiles * qg::kTileRows));
  dynamic_for(npanels, grain, [&](int64_t pa, int64_t pb) {
    auto buf = at::empty({kPanelBlocks * qg::kBlock, kPanelTiles * qg::kTileRows}, c.xn.options());
    float* bp = buf.data_ptr<float>();
    for (int64_t pi = pa; pi < pb; ++pi) {
      const int64_t t0 = pi * kPanelTiles, t1 = std::min(Mt, t0 + kPanelTiles);
      const int64_t r0 = t0 * qg::kTileRows, valid = std::min(m, t1 * qg::kTileRows) - r0;
      auto yv = c.out.narrow(1, r0, valid);
      for (int64_t kb0 = 0; kb0 < KB; kb0 += kPanelBlocks) {
        const int64_t kb1 = std::min(KB, kb0 + kPanelBlocks), rows = (kb1 - kb0) * qg::kBlock;
        dequant(L, t0, t1, kb0, kb1, bp, buf.size(1));
        auto panel = buf.narrow(0, 0, rows).narrow(1, 0, valid);
        yv.addmm_(c.xn.narrow(1, kb0 * qg::kBlock, rows), panel, /*beta=*/kb0 == 0 ? 0 : 1);
      }
      if (c.bias_f.defined()) yv.add_(c.bias_f.narrow(0, r0, valid));
    }
  }, /*align=*/1);
}

// ---- the named kernels -------------------------------------------------------------------------
void qgemm_gemv_generic(Call& c) { fma_gemv(c, qg::gemv_generic); }
void qgemm_panel_generic(Call& c) { panels(c, qg::dequant_generic); }

#if QK_AVX2
void qgemm_gemv_avx2(Call& c) { fma_gemv(c, qg::gemv_avx2); }
void qgemm_panel_avx2(Call& c) { panels(c, qg::dequant_avx2); }
#endif

#if QK_X86
void qgemm_gemv_avx512(Call& c) { fma_gemv(c, qg::gemv_avx512); }
void qgemm_panel_avx512(Call& c) { panels(c, qg::dequant_avx512); }

// vpdpbusd GEMV for 4-bit (AVX-512 VNNI): x as `limbs` int8 digit planes per k-block (see
// qgemm_kernels.h); the zero-point fold uses the sums of the represented x, so only x's rounding
// differs from exact.
void vnni_gemv(Call& c, int limbs) {
  const qg::Layout& L = c.L;
  const int64_t B = c.B, Kpad = c.Kpad, KB = L.KB, G = L.G;
  std::vector<int8_t> xq(B * limbs * Kpad);
  std::vector<float> dx(B * KB), xsq(B * G, 0.0f);
  std::vector<int32_t> isum(KB);
  for (int64_t b = 0; b < B; ++b) {
    qg::quantize_x_avx512(c.xnp + b * Kpad, KB, limbs, xq.data() + b * limbs * Kpad, Kpad, dx.data() + b * KB,
                          isum.data());
    for (int64_t kb = 0; kb < KB; ++kb) xsq[b * G + c.kb_group[kb]] += dx[b * KB + kb] * static_cast<float>(isum[kb]);
  }
  const int64_t step = limbs == 1 ? qg::kMaxGemvBatch : qg::kMaxLimbBatch;
  for (int64_t b0 = 0; b0 < B; b0 += step) {
    const int nb = static_cast<int>(std::min<int64_t>(step, B - b0));
    dynamic_for(L.Mt, c.gemv_grain(), [&](int64_t t0, int64_t t1) {
      qg::gemv_int8_avx512(L, nb, limbs, xq.data() + b0 * limbs * Kpad, Kpad, dx.data() + b0 * KB, KB,
                           xsq.data() + b0 * G, c.bias, c.y + b0 * L.m, L.m, t0, t1);
    });
  }
}

// x rounded to int8 per k-block (opt-in, approximate)
void qgemm_int8_avx512vnni(Call& c) { vnni_gemv(c, 1); }
// x as 3 digit planes (22-bit fixed point): a third of the FMA GEMV's instructions at fp32 accuracy
void qgemm_digits_avx512vnni(Call& c) { vnni_gemv(c, 3); }

// LUT GEMV for 2/3-bit: per token and 4 channels the 16 subset sums of x, one shift + vpermps + add
// per 4 codes and bit plane.
void qgemm_lut_avx512(Call& c) {
  const int64_t B = c.B, chunks = c.Kpad / 4;
  const std::vector<float> xsum = group_sums(c);
  // 64 B per 4 channels (229 KB for 14336 channels): reuse one buffer per calling thread instead of a
  // fresh zeroed (page-faulting) allocation per call; build_lut writes every entry
  thread_local std::vector<float> tab;
  if (tab.size() < static_cast<size_t>(B * chunks * 16)) tab.resize(B * chunks * 16);
  float* tabp = tab.data();  // (the lambdas below run on other threads: no thread_local names there)
  for (int64_t b = 0; b < B; ++b) qg::build_lut_avx512(c.xnp + b * c.Kpad, chunks, tabp + b * chunks * 16);
  for (int64_t b0 = 0; b0 < B; b0 += qg::kMaxLutBatch) {
    const int nb = static_cast<int>(std::min<int64_t>(qg::kMaxLutBatch, B - b0));
    dynamic_for(c.L.Mt, c.gemv_grain(), [&](int64_t t0, int64_t t1) {
      qg::gemv_lut_avx512(c.L, nb, tabp + b0 * chunks * 16, chunks * 16, xsum.data() + b0 * c.L.G, c.bias,
                          c.y + b0 * c.L.m, c.L.m, t0, t1);
    });
  }
}

// AMX-INT8 GEMV for 2/3-bit (qgemm_amx.cpp): x as 3 digit planes per run of <= kAmxRunBlocks k-blocks.
void qgemm_amx(Call& c) {
  const qg::Layout& L = c.L;
  const int64_t B = c.B, G = L.G, KB = L.KB;
  // runs: each group's k-blocks in pieces of <= kAmxRunBlocks (one x step each)
  std::vector<int32_t> group_run(G + 1), run_kb;
  for (int64_t g = 0; g < G; ++g) {
    group_run[g] = static_cast<int32_t>(run_kb.size());
    for (int32_t k = c.kbs[g]; k < c.kbs[g + 1]; k += qg::kAmxRunBlocks) run_kb.push_back(k);
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
    qg::quantize_x_amx(c.xnp + b * c.Kpad, R, xqp + b0 * 3 * chunks * 64 + (b - b0) * 3 * 64, nb * 3 * 64,
                       dx.data() + b * runs, xsq.data() + b * G);
  }
  for (int64_t b0 = 0; b0 < B; b0 += qg::kMaxAmxBatch) {
    const int nb = static_cast<int>(std::min<int64_t>(qg::kMaxAmxBatch, B - b0));
    dynamic_for(L.Mt, c.gemv_grain(), [&](int64_t t0, int64_t t1) {
      qg::gemv_amx(L, R, nb, xqp + b0 * 3 * chunks * 64, dx.data() + b0 * runs, xsq.data() + b0 * G, c.bias,
                   c.y + b0 * L.m, L.m, t0, t1);
    }, /*align=*/qg::kAmxTiles);
  }
}
#endif  // QK_X86

// The compiled kernels: name (as in quantkern/kernels.py), what it needs from the CPU, the bit widths
// it reads (bit b set = b-bit), the function. Guarded entries vanish from builds without that ISA.
struct Kernel {
  const char* name;
  Need need;
  unsigned bits;
  void (*run)(Call&);
};
constexpr unsigned kAllBits = (1u << 2) | (1u << 3) | (1u << 4) | (1u << 8);
constexpr unsigned kBits23 = (1u << 2) | (1u << 3), kBits4 = 1u << 4;
const Kernel kKernels[] = {
#if QK_X86
    {"qgemm_int8_avx512vnni", Need::avx512vnni, kBits4, qgemm_int8_avx512vnni},
    {"qgemm_digits_avx512vnni", Need::avx512vnni, kBits4, qgemm_digits_avx512vnni},
    {"qgemm_amx", Need::amx, kBits23, qgemm_amx},
    {"qgemm_lut_avx512", Need::avx512, kBits23, qgemm_lut_avx512},
    {"qgemm_gemv_avx512", Need::avx512, kAllBits, qgemm_gemv_avx512},
#endif
#if QK_AVX2
    {"qgemm_gemv_avx2", Need::avx2, kAllBits, qgemm_gemv_avx2},
#endif
    {"qgemm_gemv_generic", Need::generic, kAllBits, qgemm_gemv_generic},
#if QK_X86
    {"qgemm_panel_avx512", Need::avx512, kAllBits, qgemm_panel_avx512},
#endif
#if QK_AVX2
    {"qgemm_panel_avx2", Need::avx2, kAllBits, qgemm_panel_avx2},
#endif
    {"qgemm_panel_generic", Need::generic, kAllBits, qgemm_panel_generic},
};

const Kernel& kernel_for(c10::string_view name, int64_t bits) {
  const Kernel& k = qk::cpu::find_kernel(kKernels, name, "quantkern::qgemm_cpu");
  TORCH_CHECK((k.bits >> bits) & 1u, "quantkern::qgemm_cpu: kernel ", k.name, " does not read ", bits, "-bit weights");
  return k;
}

void qgemm_cpu_out(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& kb_start,
                   const at::Tensor& x_index, int64_t bits, int64_t m, const c10::optional<at::Tensor>& bias,
                   c10::string_view kernel, at::Tensor& out) {
  const char* op = "quantkern::qgemm_cpu";
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &qw, &sc, &kb_start, &x_index, &out})
    TORCH_CHECK(t->device().is_cpu(), op, ": expected CPU tensors, got one on ", t->device(),
                " (use the cuda/triton backend for GPU tensors)");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, op, ": bits must be 2, 3, 4 or 8, got ", bits);
  const Kernel& K = kernel_for(kernel, bits);
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
  // x in native channel order (act-order gather + group padding), fp32.
  const auto xc = x.contiguous();
  auto xn = at::empty({B, Kpad}, x.options().dtype(at::kFloat));
  float* xnp = xn.data_ptr<float>();
  if (xt == at::kFloat) gather_x<float>(xc, xi, Kpad, xnp);
  else if (xt == at::kBFloat16) gather_x<at::BFloat16>(xc, xi, Kpad, xnp);
  else gather_x<at::Half>(xc, xi, Kpad, xnp);

  Call c{qg::Layout{qw.data_ptr<int32_t>(), reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()), kbs,
                    kb_group.data(), G, KB, Mt, m, static_cast<int>(bits)},
         B, Kpad, kbs, kb_group.data(), xn, xnp, bias_f, bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, out,
         out.data_ptr<float>()};
  K.run(c);
}

at::Tensor qgemm_cpu(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& kb_start,
                     const at::Tensor& x_index, int64_t bits, int64_t m, const c10::optional<at::Tensor>& bias,
                     c10::string_view kernel) {
  TORCH_CHECK(x.dim() == 2, "quantkern::qgemm_cpu: x must be 2-D [tokens, in_features], got ", x.sizes());
  auto out = at::empty({x.size(0), m}, x.options().dtype(at::kFloat));
  qgemm_cpu_out(x, qw, sc, kb_start, x_index, bits, m, bias, kernel, out);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

void qgemm_cpu_out_op(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& kb_start,
                      const at::Tensor& x_index, int64_t bits, int64_t m, const c10::optional<at::Tensor>& bias,
                      c10::string_view kernel, at::Tensor out) {
  qgemm_cpu_out(x, qw, sc, kb_start, x_index, bits, m, bias, kernel, out);
}

}  // namespace

std::vector<std::pair<std::string, std::string>> qk::cpu::qgemm_kernels() {
  std::vector<std::pair<std::string, std::string>> out;
  for (const Kernel& k : kKernels) out.emplace_back(k.name, need_name(k.need));
  return out;
}

// kernel: a name from the table above (quantkern/kernels.py chooses it).
TORCH_LIBRARY_FRAGMENT(quantkern, m) {
  m.def("qgemm_cpu(Tensor x, Tensor qw, Tensor sc, Tensor kb_start, Tensor x_index, int bits, int m,"
        " Tensor? bias, str kernel) -> Tensor");
  m.def("qgemm_cpu_out(Tensor x, Tensor qw, Tensor sc, Tensor kb_start, Tensor x_index, int bits, int m,"
        " Tensor? bias, str kernel, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(quantkern, CPU, m) {
  m.impl("qgemm_cpu", &qgemm_cpu);
  m.impl("qgemm_cpu_out", &qgemm_cpu_out_op);
}
