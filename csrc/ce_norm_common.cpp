// fused_linear_ce_norm, device-generic part (DESIGN.md 4.3): validation, token chunks, and the GEMMs
// of the head and of the gradients, all with ATen ops (MKL/oneDNN on the CPU, cuBLAS on GPUs). Each
// device supplies the row kernel (csrc/cpu/ce_norm.cpp, csrc/cuda/ce_norm.cu).
//
// Row n: z_n = h_n W^T + b. A retained row (forget_mask false) contributes CE_n = logsumexp(z_n) -
// z_n[target_n]; a forgotten row contributes norm_weight * ||z_n||^2 (or ||z_n|| when not squared);
// a row whose target is ignore_index contributes nothing. "mean" divides each term by its own row
// count (an empty term is 0).
//
// Rows are processed in chunks of about 32 MiB of logits: Z = h W^T + b into a reused buffer, the row
// kernel (values and, when gradients are wanted, dLoss/dZ over Z in place), then grad_hidden[chunk] =
// G W, grad_weight += G^T h, grad_bias += colsum(G). So the forward computes the gradients too (the
// autograd backward only scales them); ignored rows are gathered out.
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "unlearn_ext/ce_norm.h"
#include "unlearn_ext/checks.h"
#include "unlearn_ext/linear_head.h"

namespace unlearn_ext {
namespace {

struct Problem {
  at::Tensor hidden, weight, bias;  // contiguous (bias undefined if absent)
  at::Tensor target;                // int64 [N]
  at::Tensor forget;                // bool [N] (all false when no mask was given)
  int64_t N = 0, H = 0, V = 0;
  int64_t ignore_index = -100;
};

Problem make_problem(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& target, const c10::optional<at::Tensor>& forget_mask, int64_t ignore_index,
                     bool half_ok) {
  check_dim(hidden, 2, "hidden", "[N, H]");
  check_dim(weight, 2, "weight", "[V, H]");
  const auto dev = hidden.device();
  check_same_device(weight, "weight", hidden, "hidden");
  const auto dt = hidden.scalar_type();
  if (half_ok) {
    check_float_dtype(hidden, "hidden");
  } else {
    TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble,
                      "fused_linear_ce_norm on the CPU takes float32 or float64, got hidden of ", dt);
  }
  TORCH_CHECK_VALUE(weight.scalar_type() == dt, "weight must have hidden's dtype ", dt, ", got ",
                    weight.scalar_type());
  Problem p;
  p.N = hidden.size(0);
  p.H = hidden.size(1);
  p.V = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == p.H, "weight must be [V, H] with H = hidden.size(1) = ", p.H, ", got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(p.V >= 1, "weight must have at least one row (class)");
  p.hidden = hidden.contiguous();
  p.weight = weight.contiguous();
  if (bias.has_value()) {
    check_vector(*bias, p.V, "bias", "one entry per row of weight", dev);
    TORCH_CHECK_VALUE(bias->scalar_type() == dt, "bias must have hidden's dtype ", dt, ", got ", bias->scalar_type());
    p.bias = bias->contiguous();
  }
  check_vector(target, p.N, "target", "one class id per row", dev);
  TORCH_CHECK_VALUE(!at::isFloatingType(target.scalar_type()) && target.scalar_type() != at::kBool,
                    "target must be an integer tensor, got ", target.scalar_type());
  p.target = target.to(at::kLong).contiguous();
  if (forget_mask.has_value()) {
    check_vector(*forget_mask, p.N, "forget_mask", "one flag per row", dev);
    TORCH_CHECK_VALUE(forget_mask->scalar_type() == at::kBool, "forget_mask must be a bool tensor, got ",
                      forget_mask->scalar_type());
    p.forget = forget_mask->contiguous();
  } else {
    p.forget = at::zeros({p.N}, p.target.options().dtype(at::kBool));
  }
  if (p.N > 0) {  // class ids of retained rows must be in range (a forgotten row's id is not used)
    const auto ce_rows = p.target.ne(ignore_index).logical_and(p.forget.logical_not());
    if (ce_rows.any().item<bool>()) {
      const auto kept = p.target.masked_select(ce_rows);
      const int64_t lo = kept.min().item<int64_t>(), hi = kept.max().item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0 && hi < p.V, "target ids of retained rows must be in [0, ", p.V,
                        ") or ignore_index (", ignore_index, "), got ", lo < 0 ? lo : hi);
    }
  }
  // Logits from non-finite inputs would be silently wrong (the row sweeps clamp): refuse them.
  TORCH_CHECK_VALUE(all_finite(p.hidden), "hidden contains NaN or inf");
  TORCH_CHECK_VALUE(all_finite(p.weight), "weight contains NaN or inf");
  if (p.bias.defined()) TORCH_CHECK_VALUE(all_finite(p.bias), "bias contains NaN or inf");
  p.ignore_index = ignore_index;
  return p;
}

struct Result {
  at::Tensor values;      // [N] accumulation dtype: CE_n or ||z_n||^(2) (0 on ignored rows)
  at::Tensor gh, gw, gb;  // [N, H], [V, H], [V] (undefined when not computed / no bias)
};

// `want`: the gradients to compute (none: the values only); coef: dLoss/d value_n ([N], accumulation
// dtype, norm_weight folded in) when any is wanted.
Result run(const Problem& p, bool squared, const HeadGradMask& want, const at::Tensor& coef,
           CENormRowKernel row_kernel) {
  const auto opts = p.hidden.options();
  const auto acc_opts = opts.dtype(accum_dtype(p.hidden.scalar_type()));
  const bool grad = want.any();
  Result res;
  res.values = at::zeros({p.N}, acc_opts);
  auto zero_grads = [&] {
    if (want.hidden) res.gh = at::zeros({p.N, p.H}, opts);
    if (want.weight) res.gw = at::zeros({p.V, p.H}, opts);
    if (want.bias) res.gb = at::zeros({p.V}, opts);
  };
  at::Tensor active = p.target.ne(p.ignore_index);
  if (grad) active = active.logical_and(coef.ne(0));  // a zero coefficient contributes nothing
  const at::Tensor idx = active.nonzero().flatten();
  const int64_t n_act = idx.numel();
  if (n_act == 0) {
    zero_grads();
    return res;
  }
  const bool gather = n_act < p.N;
  if (want.hidden) res.gh = gather ? at::zeros({p.N, p.H}, opts) : at::empty({p.N, p.H}, opts);
  auto take = [&](const at::Tensor& t) { return gather ? t.index_select(0, idx).contiguous() : t; };
  const at::Tensor h = take(p.hidden);
  const at::Tensor tgt_a = take(p.target).contiguous();
  const at::Tensor forget_a = take(p.forget).to(at::kByte).contiguous();
  const at::Tensor coef_a = grad ? take(coef).to(acc_opts.dtype()).contiguous() : at::Tensor();
  at::Tensor val_a = at::zeros({n_act}, acc_opts);
  at::Tensor gh_a = want.hidden ? (gather ? at::empty({n_act, p.H}, opts) : res.gh) : at::Tensor();

  // On the CPU the weight gradient and one logits chunk are the whole working set: the chunk is kept
  // at most a quarter of the weight's size, so the peak stays near 1.25 |W| + |grad_hidden|. Smaller
  // chunks cost speed (each re-reads and re-writes all of grad_weight in its K = rows GEMM): see the
  // chunk sweep in benchmarks/results/ce_norm_cpu_chunk*.json and the README.
  const int64_t elem = static_cast<int64_t>(p.hidden.element_size());
  const int64_t budget = p.hidden.is_cpu() ? std::clamp<int64_t>(p.V * p.H * elem / 4, 1 << 20, kHeadChunkBytes)
                                           : kHeadChunkBytes;
  const char* env = "UNLEARN_EXT_CE_CHUNK_ROWS";
  const int64_t rows = head_rows_for_grad(head_tokens_per_chunk(p.V, elem, env, budget), n_act, p.H,
                                          p.hidden.scalar_type(), want.weight, env, p.hidden.is_cuda());
  // The first chunk's GEMMs initialise grad_weight / grad_bias (no zero fill).
  std::optional<HeadGradSums> sums;
  if (want.weight || want.bias) sums.emplace(p.V, p.H, want.weight, want.bias, opts, (n_act + rows - 1) / rows);
  at::Tensor zbuf = at::empty({rows, p.V}, opts);
  CENormChunk chunk;
  chunk.squared = squared;
  chunk.grad = grad;
  Float16Overflow overflow(p.hidden);
  for (int64_t n0 = 0; n0 < n_act; n0 += rows) {
    const int64_t m = std::min(rows, n_act - n0);
    at::Tensor z = zbuf.narrow(0, 0, m);
    const at::Tensor hc = h.narrow(0, n0, m);
    head_logits_into(z, hc, p.weight, p.bias);
    overflow.add(z);
    chunk.z = z;
    chunk.target = tgt_a.narrow(0, n0, m);
    chunk.forget = forget_a.narrow(0, n0, m);
    chunk.coef = grad ? coef_a.narrow(0, n0, m) : at::Tensor();
    chunk.out = val_a.narrow(0, n0, m);
    row_kernel(chunk);
    if (grad) accumulate_head_grads(z, hc, p.weight, want.hidden ? gh_a.narrow(0, n0, m) : at::Tensor(), sums);
  }
  overflow.check();
  if (sums.has_value()) {
    zbuf = chunk.z = at::Tensor();  // freed before the sums are rounded
    res.gw = sums->weight();
    res.gb = sums->bias();
  }
  if (gather) {
    res.values.index_copy_(0, idx, val_a);
    if (want.hidden) res.gh.index_copy_(0, idx, gh_a);
  } else {
    res.values = val_a;
  }
  return res;
}

}  // namespace

// Returns (loss, grad_hidden, grad_weight, grad_bias). loss is a scalar for mean/sum and [N] for none
// (CE_n on retained rows, norm_weight * norm_n on forgotten rows, 0 on ignored rows). The gradients
// of the loss that grad_mask (hidden, weight, bias; mean/sum only) asks for are returned, the others
// as empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_norm_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& forget_mask, double norm_weight, bool squared,
    int64_t ignore_index, c10::string_view reduction, std::array<bool, 3> grad_mask, CENormRowKernel rows,
    bool half_ok) {
  const Problem p = make_problem(hidden, weight, bias, target, forget_mask, ignore_index, half_ok);
  const Reduction red = parse_reduction(reduction);
  TORCH_CHECK_VALUE(std::isfinite(norm_weight), "norm_weight must be finite, got ", norm_weight);
  const HeadGradMask want = head_grad_mask(grad_mask, p.bias.defined());
  const bool compute_grad = want.any();
  TORCH_CHECK_VALUE(!compute_grad || red != Reduction::kNone,
                    "grad_mask is for reduction 'mean' or 'sum'; 'none' computes gradients in backward");
  const auto opts = p.hidden.options();
  const auto acc = accum_dtype(p.hidden.scalar_type());
  const at::Tensor valid = p.target.ne(ignore_index);
  const at::Tensor f_rows = valid.logical_and(p.forget).to(acc);
  const at::Tensor c_rows = valid.logical_and(p.forget.logical_not()).to(acc);
  double f_div = 1.0, c_div = 1.0;
  if (red == Reduction::kMean) {
    f_div = std::max(1.0, f_rows.sum().item<double>());
    c_div = std::max(1.0, c_rows.sum().item<double>());
  }
  // Per-row weight of value_n in the loss: 1 / n_ce on retained rows, norm_weight / n_f on forgotten rows.
  const at::Tensor row_w = red == Reduction::kNone ? c_rows + f_rows * norm_weight
                                                   : c_rows * (1.0 / c_div) + f_rows * (norm_weight / f_div);
  Result res = run(p, squared, want, compute_grad ? row_w : at::Tensor(), rows);
  at::Tensor per_row = res.values * (c_rows + f_rows * norm_weight);
  at::Tensor loss = red == Reduction::kNone ? per_row : (res.values * row_w).sum();
  const auto [gh, gw, gb] = grads_or_empty(res.gh, res.gw, res.gb, opts);
  return {loss, gh, gw, gb};
}

// Gradients for grad_rows [N] = dLoss/d loss_n (loss_n: the per-row losses of reduction "none"):
// returns (grad_hidden [N, H], grad_weight [V, H], grad_bias [V]), each an empty tensor where
// output_mask says no (grad_bias also without a bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_norm_backward(
    const at::Tensor& grad_rows, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& target, const c10::optional<at::Tensor>& forget_mask,
    double norm_weight, bool squared, int64_t ignore_index, std::array<bool, 3> output_mask, CENormRowKernel rows,
    bool half_ok) {
  const Problem p = make_problem(hidden, weight, bias, target, forget_mask, ignore_index, half_ok);
  check_vector(grad_rows, p.N, "grad_rows", "one coefficient per row", p.hidden.device());
  TORCH_CHECK_VALUE(std::isfinite(norm_weight), "norm_weight must be finite, got ", norm_weight);
  const auto acc = accum_dtype(p.hidden.scalar_type());
  const at::Tensor g = grad_rows.to(acc).contiguous();
  TORCH_CHECK_VALUE(all_finite(g), "the incoming gradient contains NaN or inf");
  const at::Tensor scale = at::where(p.forget, at::full({}, norm_weight, g.options()), at::ones({}, g.options()));
  const HeadGradMask want = head_grad_mask(output_mask, p.bias.defined());
  const Result res = want.any() ? run(p, squared, want, g * scale, rows) : Result{};
  return grads_or_empty(res.gh, res.gw, res.gb, p.hidden.options());
}

}  // namespace unlearn_ext
