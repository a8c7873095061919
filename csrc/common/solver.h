// The core solver contract: shared by the CPU kernel (csrc/cpu/solver.cpp), the pure-torch
// reference (quantkern/ops/solver.py) and the GPU kernels (Triton / CUDA). No torch headers here.
//
// =====================================================================================================
// OP 1: quantkern::gptq_block_solve  (GPTQ = LDLQ, GPTAQ, SNRQ greedy: the blocked error-feedback loop)
// =====================================================================================================
// gptq_block_solve(Tensor W, Tensor U, Tensor? P, Tensor gidx, Tensor scales, Tensor zeros,
//                  int bits, bool sym, bool dynamic_groups, int blocksize)
//     -> (Tensor codes, Tensor scales, Tensor zeros, Tensor loss)
//
// Everything is in PROCESSING ORDER: the caller (quantkern/solvers/core.py) has already permuted
// columns (act-order), zeroed dead columns, damped H and factorised it. The op never permutes.
//   W       fp32 [m, n]  contiguous. The target (GPTQ/GPTAQ: the weight; SNRQ: W_ref). Not modified.
//   U       fp32 [n, n]  contiguous, upper triangular, U^T U = H^-1 (H damped, permuted). Only the
//                        upper triangle incl. the diagonal is read; diag(U) > 0.
//   P       fp32 [n, n]  or None. GPTAQ's asymmetric term, strictly upper triangular, alpha already
//                        folded in: P = alpha * triu(D_p U^T, 1) U. None (GPTQ/SNRQ) == all zeros.
//   gidx    int32 [n]    group of each processing-order column, values in [0, G).
//   scales  fp32 [G, m], zeros fp32 [G, m] (zeros integer-valued).
//                        dynamic_groups = false: read-only inputs (static params).
//                        dynamic_groups = true:  contents ignored; every group must be ONE contiguous
//                        run of equal gidx in processing order (checked), and its params are computed
//                        in the loop (rule below) and returned.
//   bits    2, 3, 4 or 8 (maxq = 2^bits - 1); sym selects the symmetric grid in qk::grid_params.
//   blocksize B > 0 (128 in every method). Results depend on B only through the rule for dynamic
//                        group params and GPTAQ's lazy P update (both below).
// Outputs (fresh tensors):
//   codes   uint8 [m, n] in processing order, every element written, in [0, maxq].
//   scales, zeros [G, m]  (static: copies of the inputs; dynamic: computed).
//   loss    float64 [m]  per row sum over columns of err_i^2 (err_i below); accumulated in >= fp32.
//           For GPTQ/SNRQ this equals tr((T - Q) H (T - Q)^T) row by row (T = target, H damped).
//
// Algorithm (rows are independent; every row runs this, r omitted):
//   Wc = copy of W                      // the "global" working copy, updated only once per block
//   for each block [i1, i2) = [0, B), [B, 2B), ... (last one ragged):
//     W1[i1:i2] = Wc[i1:i2]             // in-block working copy
//     for i = i1 .. i2-1:
//       g = gidx[i]
//       if dynamic_groups and (i == 0 or gidx[i-1] != g):        // first column of group g's run
//         [i, e) = the run of g (e = first column after it; may lie beyond i2)
//         (scales[g], zeros[g]) = qk::grid_params(min(Wc[i:e]), max(Wc[i:e]), bits, sym)
//            ** "error-updated" means the BLOCK-START values Wc: all feedback from earlier blocks is
//            ** applied, feedback from earlier columns of the current block is NOT (W1 is not used).
//            ** This is exactly the IST-DASLab / GPTQ-for-LLaMa behaviour (find_params on W[:, i:i+G]
//            ** of the global W) and coincides with the fully updated weights whenever groups start
//            ** at block starts (group_size a multiple of B, or -1).
//       w    = W1[i]                                              // value before this column's update
//       c    = qk::quant_code(w, scales[g], zeros[g], maxq)      // round half to even, clamp
//       q    = qk::dequant(c, scales[g], zeros[g])
//       err  = (w - q) / U[i,i]                                   // IEEE division
//       loss += err * err
//       for j = i+1 .. i2-1:  W1[j] -= err * U[i,j] - w * P[i,j]   // P part only when P given
//       Err[i] = err ; Qb[i] = q ; codes[i] = c
//     for j = i2 .. n-1:                                           // one GEMM per block
//       Wc[j] -= sum_{i in [i1,i2)} Err[i] * U[i,j]  -  sum_{i in [i1,i2)} Qb[i] * P[i,j]
//   (GPTAQ quirk kept from the authors' code: the lazy tail P term uses the QUANTIZED values Qb,
//    the in-block term the pre-quantization w. We use the exact q, not W1's w - err*d.)
//
// Floating point: the order of the rank-1 updates and the GEMM's summation order are free (fma
// allowed). The division w / scale and err = (w - q) / d must be correctly rounded IEEE divisions
// (nvcc --use_fast_math turns '/' into an approximation: use __fdiv_rn / __frcp_rn-free code).
// Ties: a backend may differ from the reference only where w/scale lands within a few ulp of a
// half-integer (the round flips, and the error feedback then differs for the rest of that row).
// Tests measure the mismatch rate (< 0.1 %) and require loss to agree to 1e-4 relative.
//
// =====================================================================================================
// OP 2: quantkern::ksnrq_solve  (K-SNRQ / K-CoreQ: K-best beam search per row over the same decode)
// =====================================================================================================
// ksnrq_solve(Tensor W, Tensor U, Tensor gidx, Tensor scales, Tensor zeros, int bits, int K,
//             int blocksize) -> (Tensor codes, Tensor loss)
//   Same inputs as OP 1 with P = None and STATIC params only (SNRQ: params from W_ref). K >= 1.
//   Per row, K beams. Beam b has a working copy of the row (same updates as OP 1: in-block rank-1
//   updates, one tail GEMM per block over all m*K beam rows), a score S_b (float64) and codes.
//   Start: beam 0 alive with S = 0, all other beams dead (S = +inf; their state is a copy of beam 0).
//   At column i, for every beam b (dead ones included, they stay at +inf) with value w_b:
//     c0   = qk::quant_code(w_b, s, z, maxq)                     // the greedy choice
//     e_c  = (w_b - qk::dequant(c, s, z)) / U[i,i]   (fp32), for every level c in [0, maxq]
//     inc_c = (double)e_c^2, and for c != c0: inc_c = max(inc_c, inc_c0)   // c0 is always a best
//                                                    // child: makes K = 1 reproduce OP 1 exactly
//     candidate (b, c) has score S_b + inc_c
//   Keep the K smallest candidates; ties broken by (parent b ascending, then c0 first, then c
//   ascending). Candidate t becomes new beam t (t = 0..K-1, in that sorted order); it copies its
//   parent's state, sets code c, err = e_c, and applies the in-block update with err (as OP 1).
//   Tail GEMM at block end per beam as OP 1.  At the end: best = argmin_b S_b (lowest b on ties);
//   codes = that beam's codes (uint8 [m, n], processing order), loss = S_best (float64 [m]).
//   With K = 1 codes and loss are identical to OP 1 (P = None, static params).
//   With K >= (maxq+1)^n nothing is pruned: the result is the exact minimiser of
//   sum_i err_i^2 = tr((W - Q) H (W - Q)^T) over the grid (brute-force tested).
//
// =====================================================================================================
// Shared inline helpers (host and device). They must stay bit-identical to quantkern/grid.py.
// =====================================================================================================
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace qk {

// fp32 -> nearest fp16 (round half to even, subnormals, overflow to inf) -> fp32; what
// torch's tensor.half().float() does. Pure integer code so it is identical on host and device.
QK_HD float round_to_half(float x) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(x);
#else
  std::memcpy(&u, &x, 4);
#endif
  const uint32_t sign = u & 0x80000000u;
  uint32_t a = u & 0x7fffffffu;
  uint32_t out;
  if (a >= 0x7f800000u) {                       // inf / nan
    out = u;
  } else if (a >= 0x477ff000u) {                // >= 65520: rounds to inf in fp16
    out = sign | 0x7f800000u;
  } else if (a >= 0x38800000u) {                // normal fp16 range (>= 2^-14)
    // keep 10 mantissa bits: round to nearest even at bit 13
    const uint32_t lsb = (a >> 13) & 1u;
    a += 0x0fffu + lsb;
    a &= ~0x1fffu;
    out = sign | a;
  } else if (a >= 0x33000000u) {                // subnormal fp16 range [2^-25, 2^-14)
    // fp16 subnormal step is 2^-24: value = k * 2^-24, k = round_half_even(x / 2^-24)
    const int e = static_cast<int>(a >> 23);    // biased exponent, 102..112
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;  // 24-bit significand, value = mant * 2^(e-150)
    const int shift = 126 - e;                  // k = mant * 2^(e-150+24) = mant >> (126 - e)
    uint32_t k = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (k & 1u))) ++k;
    // back to fp32: k * 2^-24 (exact)
    const float f = static_cast<float>(k) * 5.9604644775390625e-08f;
    uint32_t fu;
#if defined(__CUDA_ARCH__)
    fu = __float_as_uint(f);
#else
    std::memcpy(&fu, &f, 4);
#endif
    out = sign | fu;
  } else {                                      // < 2^-25 (half the smallest subnormal): 0
    out = sign;
  }
  float r;
#if defined(__CUDA_ARCH__)
  r = __uint_as_float(out);
#else
  std::memcpy(&r, &out, 4);
#endif
  return r;
}

// Correctly rounded fp32 division on host and device: nvcc --use_fast_math (setup.py) would turn '/'
// into an approximation in device code, and the contract needs IEEE divisions.
QK_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Grid parameters of one group from the min and max of its values (grid.find_params, exactly):
//   xmin = min(min, 0), xmax = max(max, 0); sym: xmax = max(|xmin|, xmax), xmin = -xmax;
//   all-zero group -> range [-1, 1]; scale = (xmax - xmin) / maxq;
//   sym: zero = (maxq + 1) / 2;  asym: zero = round(-xmin / scale), and if zero < 1 (min == 0):
//   scale = xmax / (maxq - 1), zero = 1; zero clamped to [1, maxq];
//   scale rounded to fp16; a scale that is not > 0 after rounding becomes 2^-14 (fp16 tiny).
QK_HD void grid_params(float vmin, float vmax, int bits, bool sym, float* scale, float* zero) {
  const float maxq = static_cast<float>((1 << bits) - 1);
  float xmin = vmin < 0.f ? vmin : 0.f;
  float xmax = vmax > 0.f ? vmax : 0.f;
  if (sym) {
    const float ax = xmin < 0.f ? -xmin : xmin;
    xmax = ax > xmax ? ax : xmax;
    xmin = -xmax;
  }
  if (xmin == 0.f && xmax == 0.f) { xmin = -1.f; xmax = 1.f; }
  float s = div_rn(xmax - xmin, maxq), z;
  if (sym) {
    z = (maxq + 1.f) * 0.5f;  // integer for every supported bits
  } else {
    z = rintf(div_rn(-xmin, s));
    if (z < 1.f) { s = div_rn(xmax, maxq - 1.f); z = 1.f; }
    z = z < 1.f ? 1.f : (z > maxq ? maxq : z);
  }
  s = round_to_half(s);
  if (!(s > 0.f)) s = 6.103515625e-05f;
  *scale = s;
  *zero = z;
}

// Nearest code (float, integer-valued): clamp(round_half_even(w / scale) + zero, 0, maxq).
QK_HD float quant_code(float w, float scale, float zero, float maxq) {
  float c = rintf(div_rn(w, scale)) + zero;
  c = c < 0.f ? 0.f : c;
  return c > maxq ? maxq : c;
}

QK_HD float dequant(float code, float scale, float zero) { return scale * (code - zero); }

}  // namespace qk
