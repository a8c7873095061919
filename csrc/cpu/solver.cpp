// CPU kernels of the core solver ops (contract: csrc/common/solver.h).
//
// gptq_block_solve: rows are independent inside a block given U, so each thread takes tiles of
// kRT rows and keeps the block transposed ([column][row], kRT floats per column) in L1: the
// quantize step and every rank-1 update are then plain vector loops over the tile's rows. The
// tail update is one GEMM per block (at::addmm_, the same call as the reference, so results match
// bit for bit unless BLAS itself differs).
//
// ksnrq_solve: per row, K beams; in-block states are double-buffered, parents/codes are recorded
// per column and resolved at block end (so whole suffixes are never copied per step); the tail
// update is one GEMM over all m*K beam rows, after gathering each beam's block-start ancestor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "../common/solver.h"

// Keep a*b - c as two roundings (like the reference's separate torch ops): no fma contraction.
#pragma GCC optimize("fp-contract=off")

namespace {

constexpr int kRT = 16;  // rows per tile: 2 AVX2 / 1 AVX-512 vector

struct Groups {
  std::vector<int32_t> g, run_end;  // group of column i; end of the run if i starts one, else -1
};

Groups group_runs(const at::Tensor& gidx, int64_t G, bool check_unique, const char* op) {
  Groups r;
  const int64_t n = gidx.size(0);
  const int32_t* gp = gidx.data_ptr<int32_t>();
  r.g.assign(gp, gp + n);
  r.run_end.assign(n, -1);
  std::vector<char> seen(G, 0);
  for (int64_t s = 0; s < n;) {
    int64_t e = s + 1;
    while (e < n && r.g[e] == r.g[s]) ++e;
    TORCH_CHECK(r.g[s] >= 0 && r.g[s] < G, op, ": gidx value ", r.g[s], " outside [0, ", G, ")");
    if (check_unique) {
      TORCH_CHECK(!seen[r.g[s]], op, ": dynamic group params need every group to be one contiguous run of gidx "
                  "(group ", r.g[s], " appears twice)");
      seen[r.g[s]] = 1;
    }
    r.run_end[s] = static_cast<int32_t>(e);
    s = e;
  }
  return r;
}

void check_common(const char* op, const at::Tensor& W, const at::Tensor& U, const at::Tensor& gidx,
                  const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t blocksize) {
  TORCH_CHECK(W.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kFloat, op, ": W must be 2-D fp32, got ", W.sizes(), " ",
              W.scalar_type());
  const int64_t m = W.size(0), n = W.size(1);
  TORCH_CHECK(U.dim() == 2 && U.size(0) == n && U.size(1) == n && U.scalar_type() == at::kFloat, op,
              ": U must be fp32 [n, n] with n = ", n, ", got ", U.sizes());
  TORCH_CHECK(gidx.dim() == 1 && gidx.size(0) == n && gidx.scalar_type() == at::kInt, op,
              ": gidx must be int32 [", n, "], got ", gidx.sizes(), " ", gidx.scalar_type());
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) == m && scales.scalar_type() == at::kFloat &&
                  zeros.sizes() == scales.sizes() && zeros.scalar_type() == at::kFloat,
              op, ": scales/zeros must be fp32 [G, ", m, "], got ", scales.sizes(), " / ", zeros.sizes());
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, op, ": bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be > 0, got ", blocksize);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gptq_block_solve(
    const at::Tensor& W_in, const at::Tensor& U_in, const std::optional<at::Tensor>& P_in, const at::Tensor& gidx_in,
    const at::Tensor& scales_in, const at::Tensor& zeros_in, int64_t bits, bool sym, bool dynamic_groups,
    int64_t blocksize) {
  const char* op = "quantkern::gptq_block_solve";
  check_common(op, W_in, U_in, gidx_in, scales_in, zeros_in, bits, blocksize);
  const int64_t m = W_in.size(0), n = W_in.size(1), G = scales_in.size(0);
  const bool has_p = P_in.has_value() && P_in->defined();
  if (has_p)
    TORCH_CHECK(P_in->dim() == 2 && P_in->size(0) == n && P_in->size(1) == n && P_in->scalar_type() == at::kFloat,
                op, ": P must be fp32 [n, n] or None, got ", P_in->sizes());
  const at::Tensor U = U_in.contiguous(), gidx = gidx_in.contiguous();
  const at::Tensor P = has_p ? P_in->contiguous() : at::Tensor();
  at::Tensor Wc = W_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor scales = scales_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor zeros = zeros_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor codes = at::empty({m, n}, W_in.options().dtype(at::kByte));
  at::Tensor loss = at::zeros({m}, W_in.options().dtype(at::kDouble));
  if (m == 0 || n == 0) return {codes, scales, zeros, loss};
  const Groups gr = group_runs(gidx, G, dynamic_groups, op);

  const int64_t B = std::min<int64_t>(blocksize, n);
  at::Tensor Err = at::empty({m, B}, W_in.options());
  at::Tensor Qb = has_p ? at::empty({m, B}, W_in.options()) : at::Tensor();
  float* wc = Wc.data_ptr<float>();
  const float* u = U.data_ptr<float>();
  const float* p = has_p ? P.data_ptr<float>() : nullptr;
  float* sc = scales.data_ptr<float>();
  float* zr = zeros.data_ptr<float>();
  uint8_t* cd = codes.data_ptr<uint8_t>();
  double* ls = loss.data_ptr<double>();
  const float maxq = static_cast<float>((1 << bits) - 1);
  const int64_t ntiles = (m + kRT - 1) / kRT;

  for (int64_t i1 = 0; i1 < n; i1 += B) {
    const int64_t i2 = std::min(i1 + B, n), nb = i2 - i1;
    float* err_out = Err.data_ptr<float>();
    float* q_out = has_p ? Qb.data_ptr<float>() : nullptr;
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> w1(static_cast<size_t>(nb) * kRT);
      alignas(64) float w[kRT], s[kRT], z[kRT], c[kRT], q[kRT], e[kRT];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * kRT, nr = std::min<int64_t>(kRT, m - r0);
        for (int64_t j = 0; j < nb; ++j)
          for (int r = 0; r < kRT; ++r) w1[j * kRT + r] = r < nr ? wc[(r0 + r) * n + i1 + j] : 0.f;
        double lsum[kRT] = {};
        for (int r = 0; r < nr; ++r) lsum[r] = ls[r0 + r];
        for (int64_t i = i1; i < i2; ++i) {
          const int32_t g = gr.g[i];
          if (dynamic_groups && gr.run_end[i] >= 0) {  // block-start values Wc (solver.h)
            const int64_t e_end = gr.run_end[i];
            for (int r = 0; r < nr; ++r) {
              const float* row = wc + (r0 + r) * n;
              float lo = row[i], hi = row[i];
              for (int64_t j = i + 1; j < e_end; ++j) {
                lo = std::min(lo, row[j]);
                hi = std::max(hi, row[j]);
              }
              qk::grid_params(lo, hi, static_cast<int>(bits), sym, &sc[g * m + r0 + r], &zr[g * m + r0 + r]);
            }
          }
          for (int r = 0; r < kRT; ++r) {
            s[r] = r < nr ? sc[g * m + r0 + r] : 1.f;
            z[r] = r < nr ? zr[g * m + r0 + r] : 0.f;
          }
          const float d = u[i * n + i];
          float* col = &w1[(i - i1) * kRT];
          for (int r = 0; r < kRT; ++r) {
            w[r] = col[r];
            c[r] = qk::quant_code(w[r], s[r], z[r], maxq);
            q[r] = qk::dequant(c[r], s[r], z[r]);
            e[r] = (w[r] - q[r]) / d;
          }
          for (int r = 0; r < kRT; ++r) lsum[r] += static_cast<double>(e[r]) * static_cast<double>(e[r]);
          for (int r = 0; r < nr; ++r) {
            cd[(r0 + r) * n + i] = static_cast<uint8_t>(c[r]);
            err_out[(r0 + r) * B + (i - i1)] = e[r];
            if (has_p) q_out[(r0 + r) * B + (i - i1)] = q[r];
          }
          const float* urow = u + i * n;
          if (has_p) {
            const float* prow = p + i * n;
            for (int64_t j = i + 1; j < i2; ++j) {
              float* cj = &w1[(j - i1) * kRT];
              const float uj = urow[j], pj = prow[j];
              for (int r = 0; r < kRT; ++r) cj[r] -= e[r] * uj - w[r] * pj;
            }
          } else {
            for (int64_t j = i + 1; j < i2; ++j) {
              float* cj = &w1[(j - i1) * kRT];
              const float uj = urow[j];
              for (int r = 0; r < kRT; ++r) cj[r] -= e[r] * uj;
            }
          }
        }
        for (int r = 0; r < nr; ++r) ls[r0 + r] = lsum[r];
      }
    });
    if (i2 < n) {
      at::Tensor tail = Wc.slice(1, i2, n);
      const at::Tensor eb = nb == B ? Err : Err.slice(1, 0, nb);
      tail.addmm_(eb, U.slice(0, i1, i2).slice(1, i2, n), 1.0, -1.0);
      if (has_p) tail.addmm_(nb == B ? Qb : Qb.slice(1, 0, nb), P.slice(0, i1, i2).slice(1, i2, n), 1.0, 1.0);
    }
  }
  return {codes, scales, zeros, loss};
}

// ------------------------------------------------------------------------------------------------
struct Cand {
  double score;
  int64_t key;  // parent * L + rank (rank 0 = the greedy code): the tie order of solver.h
  bool operator<(const Cand& o) const { return score < o.score || (score == o.score && key < o.key); }
};

std::tuple<at::Tensor, at::Tensor> ksnrq_solve(const at::Tensor& W_in, const at::Tensor& U_in,
                                               const at::Tensor& gidx_in, const at::Tensor& scales_in,
                                               const at::Tensor& zeros_in, int64_t bits, int64_t K,
                                               int64_t blocksize) {
  const char* op = "quantkern::ksnrq_solve";
  check_common(op, W_in, U_in, gidx_in, scales_in, zeros_in, bits, blocksize);
  TORCH_CHECK(K >= 1, op, ": K must be >= 1, got ", K);
  const int64_t m = W_in.size(0), n = W_in.size(1), G = scales_in.size(0);
  const at::Tensor U = U_in.contiguous(), gidx = gidx_in.contiguous();
  const at::Tensor scales = scales_in.contiguous(), zeros = zeros_in.contiguous();
  at::Tensor codes = at::empty({m, n}, W_in.options().dtype(at::kByte));
  at::Tensor loss = at::zeros({m}, W_in.options().dtype(at::kDouble));
  if (m == 0 || n == 0) return {codes, loss};
  const Groups gr = group_runs(gidx, G, false, op);
  const int L = 1 << bits;
  const float maxq = static_cast<float>(L - 1);
  const int64_t B = std::min<int64_t>(blocksize, n), nblk = (n + B - 1) / B;

  // beam b of row r is row r*K + b of Wk; only columns >= the current block start are live
  at::Tensor Wk = W_in.unsqueeze(1).expand({m, K, n}).clone(at::MemoryFormat::Contiguous).view({m * K, n});  // never alias W (K = 1)
  at::Tensor Err = at::zeros({m * K, B}, W_in.options());
  at::Tensor S = at::zeros({m, K}, W_in.options().dtype(at::kDouble));
  // codes of the final beam b of each block (in-block slice) and its block-start ancestor
  std::vector<uint8_t> bcodes(static_cast<size_t>(m) * K * n);
  std::vector<int32_t> banc(static_cast<size_t>(m) * nblk * K);
  float* wk = Wk.data_ptr<float>();
  const float* u = U.data_ptr<float>();
  const float* sc = scales.data_ptr<float>();
  const float* zr = zeros.data_ptr<float>();
  double* Sp = S.data_ptr<double>();
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 1; b < K; ++b) Sp[r * K + b] = inf;

  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t i1 = blk * B, i2 = std::min(i1 + B, n), nb = i2 - i1;
    float* err = Err.data_ptr<float>();
    at::parallel_for(0, m, 1, [&](int64_t ra, int64_t rb) {
      std::vector<float> cur(static_cast<size_t>(K) * nb), nxt(static_cast<size_t>(K) * nb);
      std::vector<float> ecur(static_cast<size_t>(K) * nb), enxt(static_cast<size_t>(K) * nb);
      std::vector<double> score(K), nscore(K), inc(L);
      std::vector<float> ev(L);
      std::vector<uint8_t> order(L);
      std::vector<Cand> cand(static_cast<size_t>(K) * L);
      std::vector<int32_t> par(static_cast<size_t>(nb) * K);
      std::vector<uint8_t> chosen(static_cast<size_t>(nb) * K);
      std::vector<float> tmp;
      for (int64_t r = ra; r < rb; ++r) {
        for (int64_t b = 0; b < K; ++b) {
          std::copy_n(wk + (r * K + b) * n + i1, nb, &cur[b * nb]);
          score[b] = Sp[r * K + b];
        }
        for (int64_t i = i1; i < i2; ++i) {
          const int64_t ii = i - i1;
          const int32_t g = gr.g[i];
          const float s = sc[g * m + r], z = zr[g * m + r], d = u[i * n + i];
          int64_t nc = 0;
          for (int64_t b = 0; b < K; ++b) {
            const float w = cur[b * nb + ii];
            const float c0 = qk::quant_code(w, s, z, maxq);
            order[0] = static_cast<uint8_t>(c0);
            for (int c = 0, k = 1; c < L; ++c)
              if (c != static_cast<int>(c0)) order[k++] = static_cast<uint8_t>(c);
            for (int k = 0; k < L; ++k) {
              ev[k] = (w - qk::dequant(static_cast<float>(order[k]), s, z)) / d;
              inc[k] = static_cast<double>(ev[k]) * static_cast<double>(ev[k]);
              if (k > 0) inc[k] = std::max(inc[k], inc[0]);
              cand[nc++] = Cand{score[b] + inc[k], b * L + k};
            }
          }
          std::partial_sort(cand.begin(), cand.begin() + K, cand.begin() + nc);
          for (int64_t t = 0; t < K; ++t) {
            const int64_t pb = cand[t].key / L, k = cand[t].key % L;
            // recompute the chosen level's code and error exactly as above
            const float w = cur[pb * nb + ii];
            const float c0 = qk::quant_code(w, s, z, maxq);
            const int code = k == 0 ? static_cast<int>(c0) : (k <= static_cast<int>(c0) ? k - 1 : k);
            const float e = (w - qk::dequant(static_cast<float>(code), s, z)) / d;
            nscore[t] = cand[t].score;
            par[ii * K + t] = static_cast<int32_t>(pb);
            chosen[ii * K + t] = static_cast<uint8_t>(code);
            const float* src = &cur[pb * nb];
            float* dst = &nxt[t * nb];
            const float* urow = u + i * n;
            for (int64_t j = ii + 1; j < nb; ++j) dst[j] = src[j] - e * urow[i1 + j];
            // error history of this block follows the beam (needed for the tail GEMM)
            std::copy_n(&ecur[pb * nb], ii, &enxt[t * nb]);
            enxt[t * nb + ii] = e;
          }
          std::swap(cur, nxt);
          std::swap(ecur, enxt);
          std::swap(score, nscore);
        }
        // resolve the block: codes of every final beam, and its block-start ancestor
        for (int64_t b = 0; b < K; ++b) {
          int64_t slot = b;
          uint8_t* dst = &bcodes[(r * K + b) * n + i1];
          for (int64_t ii = nb - 1; ii >= 0; --ii) {
            dst[ii] = chosen[ii * K + slot];
            slot = par[ii * K + slot];
          }
          banc[(r * nblk + blk) * K + b] = static_cast<int32_t>(slot);
          Sp[r * K + b] = score[b];
          std::copy_n(&ecur[b * nb], nb, err + (r * K + b) * B);
        }
        // beams' tails (and earlier block codes) follow their ancestors
        bool identity = true;
        for (int64_t b = 0; b < K; ++b) identity &= banc[(r * nblk + blk) * K + b] == b;
        if (!identity && i2 < n) {
          tmp.resize(static_cast<size_t>(K) * (n - i2));
          for (int64_t b = 0; b < K; ++b) std::copy_n(wk + (r * K + b) * n + i2, n - i2, &tmp[b * (n - i2)]);
          for (int64_t b = 0; b < K; ++b) {
            const int64_t a = banc[(r * nblk + blk) * K + b];
            std::copy_n(&tmp[a * (n - i2)], n - i2, wk + (r * K + b) * n + i2);
          }
        }
      }
    });
    if (i2 < n) {
      at::Tensor tail = Wk.slice(1, i2, n);
      tail.addmm_(nb == B ? Err : Err.slice(1, 0, nb), U.slice(0, i1, i2).slice(1, i2, n), 1.0, -1.0);
    }
  }
  // best beam, then follow ancestors back block by block
  uint8_t* cd = codes.data_ptr<uint8_t>();
  double* lp = loss.data_ptr<double>();
  at::parallel_for(0, m, 16, [&](int64_t ra, int64_t rb) {
    for (int64_t r = ra; r < rb; ++r) {
      int64_t best = 0;
      for (int64_t b = 1; b < K; ++b)
        if (Sp[r * K + b] < Sp[r * K + best]) best = b;
      lp[r] = Sp[r * K + best];
      int64_t slot = best;
      for (int64_t blk = nblk - 1; blk >= 0; --blk) {
        const int64_t i1 = blk * B, i2 = std::min(i1 + B, n);
        std::copy_n(&bcodes[(r * K + slot) * n + i1], i2 - i1, cd + r * n + i1);
        slot = banc[(r * nblk + blk) * K + slot];
      }
    }
  });
  return {codes, loss};
}

// Test hook: qk::grid_params on per-row min/max (must equal quantkern.grid.find_params).
std::tuple<at::Tensor, at::Tensor> grid_params_op(const at::Tensor& vmin, const at::Tensor& vmax, int64_t bits,
                                                  bool sym) {
  TORCH_CHECK(vmin.scalar_type() == at::kFloat && vmax.sizes() == vmin.sizes() && vmax.scalar_type() == at::kFloat,
              "quantkern::grid_params: vmin/vmax must be fp32 of one shape");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "quantkern::grid_params: bad bits ", bits);
  const at::Tensor a = vmin.contiguous(), b = vmax.contiguous();
  at::Tensor s = at::empty_like(a), z = at::empty_like(a);
  for (int64_t i = 0; i < a.numel(); ++i)
    qk::grid_params(a.data_ptr<float>()[i], b.data_ptr<float>()[i], static_cast<int>(bits), sym,
                    s.data_ptr<float>() + i, z.data_ptr<float>() + i);
  return {s, z};
}

at::Tensor round_to_half_op(const at::Tensor& x) {
  const at::Tensor a = x.contiguous().to(at::kFloat);
  at::Tensor out = at::empty_like(a);
  for (int64_t i = 0; i < a.numel(); ++i) out.data_ptr<float>()[i] = qk::round_to_half(a.data_ptr<float>()[i]);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantkern, m) {
  m.def("gptq_block_solve(Tensor W, Tensor U, Tensor? P, Tensor gidx, Tensor scales, Tensor zeros, int bits, "
        "bool sym, bool dynamic_groups, int blocksize) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ksnrq_solve(Tensor W, Tensor U, Tensor gidx, Tensor scales, Tensor zeros, int bits, int K, "
        "int blocksize) -> (Tensor, Tensor)");
  m.def("grid_params(Tensor vmin, Tensor vmax, int bits, bool sym) -> (Tensor, Tensor)");
  m.def("round_to_half(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantkern, CPU, m) {
  m.impl("gptq_block_solve", &gptq_block_solve);
  m.impl("ksnrq_solve", &ksnrq_solve);
  m.impl("grid_params", &grid_params_op);
  m.impl("round_to_half", &round_to_half_op);
}
