// CPU row kernel of fused_linear_ce_norm (DESIGN.md 4.3); the chunk driver with the GEMMs is
// csrc/ce_norm_common.cpp.
//
// Retained row (CE): lse = logsumexp(z); value = lse - z_t; dvalue/dz = softmax(z) - onehot(t).
//   Three sweeps over the row: maximum, sum of exponentials, gradient (written over the logits).
// Forgotten row (norm): s = sum_v z_v^2; value = s (squared) or sqrt(s);
//   dvalue/dz = 2 z (squared) or z / sqrt(s), taken as 0 at z = 0 (the subgradient torch uses).
//   Two sweeps: sum of squares, scaling in place.
// The sweeps are `omp simd` loops with a polynomial expf, compiled for AVX-512, AVX2+FMA and the
// baseline with target attributes and chosen at run time (UNLEARN_EXT_CPU_ISA); rows are split over
// threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>

#include "unlearn_ext/ce_norm.h"
#include "unlearn_ext/cpu_vexp.h"

namespace unlearn_ext {

const char* cpu_kernel_isa();  // csrc/cpu/sq_grad_segmented.cpp

namespace {

template <typename S>
struct RowsArgs {
  S* z;                   // [rows, V]: logits in, dLoss/dz out (when grad)
  const int64_t* target;  // [rows]
  const uint8_t* forget;  // [rows]
  const S* coef;          // [rows] or nullptr (no gradient)
  S* out;                 // [rows]
  int64_t V;
  bool squared;
};

// One row: returns value_n; writes coef * dvalue/dz over z when `coef` is given.
template <typename S>
UNLEARN_CPU_INLINE S row_kernel(S* z, int64_t target, bool forget, const S* coef, int64_t V, bool squared) {
  if (forget) {
    S ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t v = 0; v < V; ++v) ss += z[v] * z[v];
    const S norm = std::sqrt(ss);
    const S value = squared ? ss : norm;
    if (coef != nullptr) {
      const S scale = squared ? S(2) * *coef : (norm > S(0) ? *coef / norm : S(0));
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) z[v] *= scale;
    }
    return value;
  }
  const ExpRange er = exp_range();
  S mx = -std::numeric_limits<S>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t v = 0; v < V; ++v) mx = z[v] > mx ? z[v] : mx;
  S se = 0;
#pragma omp simd reduction(+ : se)
  for (int64_t v = 0; v < V; ++v) se += vexp(z[v] - mx, er);
  const S lse = mx + std::log(se);
  const S value = lse - z[target];
  if (coef != nullptr) {
    const S c = *coef;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) z[v] = c * vexp(z[v] - lse, er);
    z[target] -= c;
  }
  return value;
}

template <typename S>
UNLEARN_CPU_INLINE void rows_body(const RowsArgs<S>& a, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    a.out[i] = row_kernel<S>(a.z + i * a.V, a.target[i], a.forget[i] != 0, a.coef ? a.coef + i : nullptr, a.V,
                             a.squared);
  }
}

#if UNLEARN_CPU_X86
UNLEARN_CPU_TARGET("avx512f,avx512dq")
void rows_avx512(const RowsArgs<float>& a, int64_t begin, int64_t end) { rows_body<float>(a, begin, end); }
UNLEARN_CPU_TARGET("avx2,fma")
void rows_avx2(const RowsArgs<float>& a, int64_t begin, int64_t end) { rows_body<float>(a, begin, end); }
#endif
void rows_baseline(const RowsArgs<float>& a, int64_t begin, int64_t end) { rows_body<float>(a, begin, end); }
void rows_double(const RowsArgs<double>& a, int64_t begin, int64_t end) { rows_body<double>(a, begin, end); }

using FloatRowsFn = void (*)(const RowsArgs<float>&, int64_t, int64_t);

FloatRowsFn pick_float_rows() {
  const std::string isa = cpu_kernel_isa();
#if UNLEARN_CPU_X86
  if (isa == "avx512") return &rows_avx512;
  if (isa == "avx2") return &rows_avx2;
#endif
  return &rows_baseline;
}

template <typename S>
void cpu_rows_typed(const CENormChunk& c) {
  RowsArgs<S> args{c.z.data_ptr<S>(),
                   c.target.data_ptr<int64_t>(),
                   c.forget.data_ptr<uint8_t>(),
                   c.grad ? c.coef.data_ptr<S>() : nullptr,
                   c.out.data_ptr<S>(),
                   c.z.size(1),
                   c.squared};
  if constexpr (std::is_same_v<S, float>) {
    const FloatRowsFn rows = pick_float_rows();
    at::parallel_for(0, c.z.size(0), 1, [&](int64_t b, int64_t e) { rows(args, b, e); });
  } else {
    at::parallel_for(0, c.z.size(0), 1, [&](int64_t b, int64_t e) { rows_double(args, b, e); });
  }
}

void cpu_rows(const CENormChunk& c) {
  if (c.z.scalar_type() == at::kDouble) {
    cpu_rows_typed<double>(c);
  } else {
    cpu_rows_typed<float>(c);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_ce_norm_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& forget_mask, double norm_weight, bool squared,
    int64_t ignore_index, c10::string_view reduction, std::array<bool, 3> grad_mask) {
  return ce_norm_forward(hidden, weight, bias, target, forget_mask, norm_weight, squared, ignore_index, reduction,
                         grad_mask, &cpu_rows, /*half_ok=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_ce_norm_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& target, const c10::optional<at::Tensor>& forget_mask,
    double norm_weight, bool squared, int64_t ignore_index, std::array<bool, 3> output_mask) {
  return ce_norm_backward(grad_rows, hidden, weight, bias, target, forget_mask, norm_weight, squared, ignore_index,
                          output_mask, &cpu_rows, /*half_ok=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("fused_linear_ce_norm", &fused_linear_ce_norm_cpu);
  m.impl("fused_linear_ce_norm_backward", &fused_linear_ce_norm_backward_cpu);
}

}  // namespace unlearn_ext
