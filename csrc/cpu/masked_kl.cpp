// CPU row kernel of fused_linear_masked_kl (DESIGN.md 4.2); the chunk driver with the GEMMs is
// csrc/masked_kl_common.cpp.
//
// Per token n with s = z / T, t = r / T, p = softmax(t), q = softmax(s), m the vocabulary mask:
//   KL_n = sum_v m_v p_v (log p_v - log q_v) = X / S_r - (lse_t - lse_s) * P_m,
//   X = sum_v m_v e^(t_v - c_t) (t_v - s_v),   S_r = sum_v e^(t_v - c_t),   P_m = sum_v m_v p_v,
//   dKL_n / dz_v = (P_m q_v - m_v p_v) / T.
// With renormalize, both softmaxes run over the kept entries only (P_m = 1, gradient zero elsewhere).
// CE_n = logsumexp(z) - z_target at temperature 1.
//
// Each row takes three sweeps (maxima; the softmax and KL sums; the gradient, written over the
// logits), all on one row that stays in L2. They are `omp simd` loops with a polynomial expf,
// compiled for AVX-512, AVX2+FMA and the baseline with target attributes and chosen at run time
// (UNLEARN_EXT_CPU_ISA); rows are split over threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "unlearn_ext/cpu_vexp.h"
#include "unlearn_ext/masked_kl.h"

namespace unlearn_ext {

const char* cpu_kernel_isa();  // csrc/cpu/sq_grad_segmented.cpp

namespace {

// What one row needs. `z` holds the current logits on entry and dLoss/dz on exit (when `grad`).
template <typename S>
struct Row {
  S* z;
  const S* r;       // reference logits (nullptr when the row takes no KL)
  int64_t target;   // class id, or -1 for no CE on this row
  bool kl;          // the row is in the KL (token mask and kl_weight != 0)
  S kl_coef;        // dLoss/dKL_n (gradient mode)
  S ce_coef;        // dLoss/dCE_n (gradient mode)
};

struct RowConfig {
  const void* vmask;     // [V] of S (1 kept, 0 not; float, so the loops stay in one width), or nullptr
  bool any_kept;         // vmask has at least one true entry (or is absent)
  int64_t V;
  double inv_t;
  bool renorm;  // softmaxes over kept entries only (only with a vmask)
  bool grad;
};

// One row: returns (KL_n, CE_n); writes dLoss/dz over row.z when cfg.grad.
template <typename S, bool kMask>
UNLEARN_CPU_INLINE std::pair<S, S> row_kernel(const Row<S>& row, const RowConfig& cfg) {
  constexpr S kNegInf = -std::numeric_limits<S>::infinity();
  constexpr S kFar = S(-200);  // exp(kFar) is ~0: the argument for excluded entries
  const int64_t V = cfg.V;
  const S inv_t = static_cast<S>(cfg.inv_t);
  const S* vm = static_cast<const S*>(cfg.vmask);
  S* z = row.z;
  const S* r = row.r;
  const bool renorm = kMask && cfg.renorm;
  const bool want_kl = row.kl && cfg.any_kept;
  const bool want_ce = row.target >= 0;
  const ExpRange er = exp_range();

  // ---- pass 1: maxima (over the KL domain; over all entries for CE) ----
  // (Written as ternaries: GCC vectorises `omp simd reduction(max)` of std::max ten times worse.)
  S mz = kNegInf, mzk = kNegInf, mr = kNegInf;
  if (renorm) {
    if (want_kl) {
#pragma omp simd reduction(max : mzk, mr)
      for (int64_t v = 0; v < V; ++v) {
        const bool k = vm[v] != 0;
        const S zk = k ? z[v] : kNegInf, rk = k ? r[v] : kNegInf;
        mzk = zk > mzk ? zk : mzk;
        mr = rk > mr ? rk : mr;
      }
    }
    if (want_ce) {
#pragma omp simd reduction(max : mz)
      for (int64_t v = 0; v < V; ++v) mz = z[v] > mz ? z[v] : mz;
    }
  } else {
#pragma omp simd reduction(max : mz)
    for (int64_t v = 0; v < V; ++v) mz = z[v] > mz ? z[v] : mz;
    if (want_kl) {
#pragma omp simd reduction(max : mr)
      for (int64_t v = 0; v < V; ++v) mr = r[v] > mr ? r[v] : mr;
    }
    mzk = mz;
  }

  // ---- pass 2: sums ----
  S kl = 0, ce = 0, lse_s = 0, lse_t = 0, pm = 0, lse_ce = 0;
  if (want_kl) {
    const S cs = mzk * inv_t, ct = mr * inv_t;
    S sz = 0, sr = 0, sm = 0, x = 0;
    if (renorm) {
#pragma omp simd reduction(+ : sz, sr, x)
      for (int64_t v = 0; v < V; ++v) {
        const bool k = vm[v] != 0;
        const S s = z[v] * inv_t, t = r[v] * inv_t;
        const S es = vexp(k ? s - cs : kFar, er), et = vexp(k ? t - ct : kFar, er);
        const S kf = k ? S(1) : S(0);
        sz += kf * es;
        sr += kf * et;
        x += kf * et * (t - s);
      }
      sm = sr;
    } else if (kMask) {
#pragma omp simd reduction(+ : sz, sr, sm, x)
      for (int64_t v = 0; v < V; ++v) {
        const S kf = vm[v];
        const S s = z[v] * inv_t, t = r[v] * inv_t;
        const S es = vexp(s - cs, er), et = vexp(t - ct, er);
        sz += es;
        sr += et;
        sm += kf * et;
        x += kf * et * (t - s);
      }
    } else {
#pragma omp simd reduction(+ : sz, sr, x)
      for (int64_t v = 0; v < V; ++v) {
        const S s = z[v] * inv_t, t = r[v] * inv_t;
        const S es = vexp(s - cs, er), et = vexp(t - ct, er);
        sz += es;
        sr += et;
        x += et * (t - s);
      }
      sm = sr;
    }
    lse_s = cs + std::log(sz);
    lse_t = ct + std::log(sr);
    pm = sm / sr;
    kl = x / sr - (lse_t - lse_s) * pm;
  }
  // CE shares the sums of the KL when they cover all entries at temperature 1.
  const bool ce_shares = want_kl && !renorm && inv_t == S(1);
  if (want_ce) {
    if (ce_shares) {
      lse_ce = lse_s;
    } else {
      S sce = 0;
#pragma omp simd reduction(+ : sce)
      for (int64_t v = 0; v < V; ++v) sce += vexp(z[v] - mz, er);
      lse_ce = mz + std::log(sce);
    }
    ce = lse_ce - z[row.target];
  }
  if (!cfg.grad) return {kl, ce};

  // ---- pass 3: dLoss/dz, in place ----
  const S a = want_kl ? row.kl_coef * inv_t : S(0);  // coefficient of the KL gradient
  const S c = want_ce ? row.ce_coef : S(0);
  if (a == S(0) && c == S(0)) {
    std::fill(z, z + V, S(0));
    return {kl, ce};
  }
  if (a == S(0)) {  // CE only
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) z[v] = c * vexp(z[v] - lse_ce, er);
  } else if (renorm) {
    const bool ce_too = c != S(0);
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const bool k = vm[v] != 0;
      const S s = z[v] * inv_t, t = r[v] * inv_t;
      const S q = vexp(k ? s - lse_s : kFar, er), p = vexp(k ? t - lse_t : kFar, er);
      const S g = k ? a * (q - p) : S(0);
      z[v] = g + (ce_too ? c * vexp(z[v] - lse_ce, er) : S(0));
    }
  } else if (ce_shares) {  // q is also CE's softmax
    const S apm = a * pm;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const S kf = kMask ? vm[v] : S(1);
      const S q = vexp(z[v] * inv_t - lse_s, er), p = vexp(r[v] * inv_t - lse_t, er);
      z[v] = (apm + c) * q - a * kf * p;
    }
  } else {
    const S apm = a * pm;
    const bool ce_too = c != S(0);
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const S kf = kMask ? vm[v] : S(1);
      const S q = vexp(z[v] * inv_t - lse_s, er), p = vexp(r[v] * inv_t - lse_t, er);
      z[v] = apm * q - a * kf * p + (ce_too ? c * vexp(z[v] - lse_ce, er) : S(0));
    }
  }
  if (want_ce) z[row.target] -= c;
  return {kl, ce};
}

// Rows [begin, end) of a chunk; the ISA variants below inline this body with their own target.
template <typename S>
struct ChunkArgs {
  S* z;              // [rows, V]
  const S* r;        // [rows, V] or nullptr
  const int64_t* target;  // [rows], -1 for no CE
  const uint8_t* kl_row;  // [rows], 1 when the row is in the KL
  const S* kl_coef;       // [rows] or nullptr
  const S* ce_coef;       // [rows] or nullptr
  S* kl_out;              // [rows]
  S* ce_out;              // [rows]
};

template <typename S>
UNLEARN_CPU_INLINE void chunk_rows(const ChunkArgs<S>& a, const RowConfig& cfg, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    Row<S> row{a.z + i * cfg.V,
               a.r ? a.r + i * cfg.V : nullptr,
               a.target[i],
               a.kl_row[i] != 0,
               a.kl_coef ? a.kl_coef[i] : S(0),
               a.ce_coef ? a.ce_coef[i] : S(0)};
    const auto res = cfg.vmask ? row_kernel<S, true>(row, cfg) : row_kernel<S, false>(row, cfg);
    a.kl_out[i] = res.first;
    a.ce_out[i] = res.second;
  }
}

#if UNLEARN_CPU_X86
UNLEARN_CPU_TARGET("avx512f,avx512dq")
void chunk_rows_avx512(const ChunkArgs<float>& a, const RowConfig& cfg, int64_t begin, int64_t end) {
  chunk_rows<float>(a, cfg, begin, end);
}
UNLEARN_CPU_TARGET("avx2,fma")
void chunk_rows_avx2(const ChunkArgs<float>& a, const RowConfig& cfg, int64_t begin, int64_t end) {
  chunk_rows<float>(a, cfg, begin, end);
}
#endif
void chunk_rows_baseline(const ChunkArgs<float>& a, const RowConfig& cfg, int64_t begin, int64_t end) {
  chunk_rows<float>(a, cfg, begin, end);
}
void chunk_rows_double(const ChunkArgs<double>& a, const RowConfig& cfg, int64_t begin, int64_t end) {
  chunk_rows<double>(a, cfg, begin, end);
}

using FloatRowsFn = void (*)(const ChunkArgs<float>&, const RowConfig&, int64_t, int64_t);

FloatRowsFn pick_float_rows() {
  const std::string isa = cpu_kernel_isa();
#if UNLEARN_CPU_X86
  if (isa == "avx512") return &chunk_rows_avx512;
  if (isa == "avx2") return &chunk_rows_avx2;
#endif
  return &chunk_rows_baseline;
}

template <typename S>
void cpu_rows_typed(const MaskedKLChunk& c) {
  RowConfig cfg{};
  cfg.vmask = c.vmask.defined() ? c.vmask.data_ptr<S>() : nullptr;
  cfg.any_kept = c.any_kept;
  cfg.V = c.z.size(1);
  cfg.inv_t = c.inv_t;
  cfg.renorm = c.renorm;
  cfg.grad = c.grad;
  ChunkArgs<S> args{c.z.data_ptr<S>(),
                    c.r.defined() ? c.r.data_ptr<S>() : nullptr,
                    c.target.data_ptr<int64_t>(),
                    c.kl_row.data_ptr<uint8_t>(),
                    c.grad ? c.kl_coef.data_ptr<S>() : nullptr,
                    c.grad ? c.ce_coef.data_ptr<S>() : nullptr,
                    c.kl_out.data_ptr<S>(),
                    c.ce_out.data_ptr<S>()};
  if constexpr (std::is_same_v<S, float>) {
    const FloatRowsFn rows = pick_float_rows();
    at::parallel_for(0, c.z.size(0), 1, [&](int64_t b, int64_t e) { rows(args, cfg, b, e); });
  } else {
    at::parallel_for(0, c.z.size(0), 1, [&](int64_t b, int64_t e) { chunk_rows_double(args, cfg, b, e); });
  }
}

void cpu_rows(const MaskedKLChunk& c) {
  if (c.z.scalar_type() == at::kDouble) {
    cpu_rows_typed<double>(c);
  } else {
    cpu_rows_typed<float>(c);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_masked_kl_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& ref_hidden, const at::Tensor& ref_weight, const c10::optional<at::Tensor>& ref_bias,
    const c10::optional<at::Tensor>& token_mask, const c10::optional<at::Tensor>& vocab_mask,
    const c10::optional<at::Tensor>& target, double kl_weight, double ce_weight, double temperature,
    int64_t ignore_index, bool renormalize, c10::string_view reduction, std::array<bool, 3> grad_mask) {
  return masked_kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask, target,
                           kl_weight, ce_weight, temperature, ignore_index, renormalize, reduction, grad_mask,
                           &cpu_rows, /*half_ok=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_masked_kl_backward_cpu(
    const at::Tensor& grad_kl, const at::Tensor& grad_ce, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& ref_hidden, const at::Tensor& ref_weight,
    const c10::optional<at::Tensor>& ref_bias, const c10::optional<at::Tensor>& token_mask,
    const c10::optional<at::Tensor>& vocab_mask, const c10::optional<at::Tensor>& target, double temperature,
    int64_t ignore_index, bool renormalize, std::array<bool, 3> output_mask) {
  return masked_kl_backward(grad_kl, grad_ce, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask,
                            vocab_mask, target, temperature, ignore_index, renormalize, output_mask, &cpu_rows,
                            /*half_ok=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("fused_linear_masked_kl", &fused_linear_masked_kl_cpu);
  m.impl("fused_linear_masked_kl_backward", &fused_linear_masked_kl_backward_cpu);
}

}  // namespace unlearn_ext
