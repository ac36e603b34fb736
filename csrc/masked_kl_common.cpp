// fused_linear_masked_kl, device-generic part (DESIGN.md 4.2): validation, token chunks, and the
// GEMMs of both LM heads and of the gradients, all with ATen ops (MKL/oneDNN on the CPU, cuBLAS on
// GPUs). Each device supplies the row kernel that turns a chunk's logits into KL_n, CE_n and
// dLoss/dz (csrc/cpu/masked_kl.cpp, csrc/cuda/masked_kl.cu).
//
// Tokens are processed in chunks of about 32 MiB of logits per model. For one chunk:
//   1. Z = h W^T + b and R = h_ref W_ref^T + b_ref ([rows, V] each, reused buffers);
//   2. the device row kernel: KL_n, CE_n and, when gradients are wanted, dLoss/dZ over Z in place;
//   3. grad_hidden[chunk] = G W and grad_weight += G^T h, grad_bias += colsum(G), each only when wanted
//      (a frozen head computes no grad_weight).
// So the forward computes the gradients too (the autograd backward only scales them), and the extra
// memory is the two chunk buffers. Tokens in neither the KL nor the CE are skipped (gathered out).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "unlearn_ext/checks.h"
#include "unlearn_ext/linear_head.h"
#include "unlearn_ext/masked_kl.h"

namespace unlearn_ext {
namespace {

constexpr const char* kChunkRowsEnv = "UNLEARN_EXT_KL_CHUNK_ROWS";

// Tokens per chunk: about 32 MiB of logits per model, or UNLEARN_EXT_KL_CHUNK_ROWS.
int64_t tokens_per_chunk(int64_t V, size_t elem_size) { return head_tokens_per_chunk(V, elem_size, kChunkRowsEnv); }

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

struct Problem {
  at::Tensor hidden, weight, bias;              // current side, contiguous (bias undefined if absent)
  at::Tensor ref_hidden, ref_weight, ref_bias;  // reference side
  at::Tensor token_mask, vocab_mask, target;    // bool [N], bool [V], int64 [N] (undefined if absent)
  int64_t N = 0, H = 0, Hr = 0, V = 0;
  double temperature = 1.0;
  int64_t ignore_index = -100;
  bool renormalize = false;
};

Problem make_problem(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& ref_hidden, const at::Tensor& ref_weight,
                     const c10::optional<at::Tensor>& ref_bias, const c10::optional<at::Tensor>& token_mask,
                     const c10::optional<at::Tensor>& vocab_mask, const c10::optional<at::Tensor>& target,
                     double temperature, int64_t ignore_index, bool renormalize, bool half_ok) {
  check_dim(hidden, 2, "hidden", "[N, H]");
  check_dim(weight, 2, "weight", "[V, H]");
  check_dim(ref_hidden, 2, "ref_hidden", "[N, H_ref]");
  check_dim(ref_weight, 2, "ref_weight", "[V, H_ref]");
  const auto dev = hidden.device();
  check_same_device(weight, "weight", hidden, "hidden");
  check_same_device(ref_hidden, "ref_hidden", hidden, "hidden");
  check_same_device(ref_weight, "ref_weight", hidden, "hidden");
  const auto dt = hidden.scalar_type();
  if (half_ok) {
    check_float_dtype(hidden, "hidden");
  } else {
    TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble,
                      "fused_linear_masked_kl on the CPU takes float32 or float64, got hidden of ", dt);
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{weight, "weight"},
                                {ref_hidden, "ref_hidden"},
                                {ref_weight, "ref_weight"}}) {
    TORCH_CHECK_VALUE(t.scalar_type() == dt, name, " must have hidden's dtype ", dt, ", got ", t.scalar_type());
  }
  Problem p;
  p.N = hidden.size(0);
  p.H = hidden.size(1);
  p.V = weight.size(0);
  p.Hr = ref_hidden.size(1);
  TORCH_CHECK_VALUE(weight.size(1) == p.H, "weight must be [V, H] with H = hidden.size(1) = ", p.H, ", got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(ref_hidden.size(0) == p.N, "ref_hidden must have hidden's ", p.N, " rows, got ",
                    ref_hidden.sizes());
  TORCH_CHECK_VALUE(ref_weight.size(0) == p.V && ref_weight.size(1) == p.Hr, "ref_weight must be [", p.V, ", ",
                    p.Hr, "] (weight's vocabulary, ref_hidden's width), got ", ref_weight.sizes());
  TORCH_CHECK_VALUE(p.V >= 1, "weight must have at least one vocabulary row");
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be a positive finite number, got ",
                    temperature);
  p.hidden = hidden.contiguous();
  p.weight = weight.contiguous();
  p.ref_hidden = ref_hidden.contiguous();
  p.ref_weight = ref_weight.contiguous();
  for (const auto& [b, name, out] :
       {std::tuple<const c10::optional<at::Tensor>&, const char*, at::Tensor*>{bias, "bias", &p.bias},
        {ref_bias, "ref_bias", &p.ref_bias}}) {
    if (!b.has_value()) continue;
    check_vector(*b, p.V, name, "one entry per vocabulary row", dev);
    TORCH_CHECK_VALUE(b->scalar_type() == dt, name, " must have hidden's dtype ", dt, ", got ", b->scalar_type());
    *out = b->contiguous();
  }
  if (token_mask.has_value()) {
    check_vector(*token_mask, p.N, "token_mask", "one flag per token", dev);
    TORCH_CHECK_VALUE(token_mask->scalar_type() == at::kBool, "token_mask must be a bool tensor, got ",
                      token_mask->scalar_type());
    p.token_mask = token_mask->contiguous();
  }
  if (vocab_mask.has_value()) {
    check_vector(*vocab_mask, p.V, "vocab_mask", "one flag per vocabulary entry", dev);
    TORCH_CHECK_VALUE(vocab_mask->scalar_type() == at::kBool, "vocab_mask must be a bool tensor, got ",
                      vocab_mask->scalar_type());
    p.vocab_mask = vocab_mask->contiguous();
  }
  if (target.has_value()) {
    check_vector(*target, p.N, "target", "one class id per token", dev);
    TORCH_CHECK_VALUE(!at::isFloatingType(target->scalar_type()) && target->scalar_type() != at::kBool,
                      "target must be an integer tensor, got ", target->scalar_type());
    p.target = target->to(at::kLong).contiguous();
    if (p.N > 0) {
      const auto valid = p.target.ne(ignore_index);
      if (valid.any().item<bool>()) {
        const auto kept = p.target.masked_select(valid);
        const int64_t lo = kept.min().item<int64_t>(), hi = kept.max().item<int64_t>();
        TORCH_CHECK_VALUE(lo >= 0 && hi < p.V, "target ids must be in [0, ", p.V, ") or ignore_index (", ignore_index,
                          "), got ", lo < 0 ? lo : hi);
      }
    }
  }
  // Logits from non-finite inputs would be silently wrong (the row sweeps clamp): refuse them.
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{p.hidden, "hidden"},
                                {p.weight, "weight"},
                                {p.ref_hidden, "ref_hidden"},
                                {p.ref_weight, "ref_weight"}}) {
    TORCH_CHECK_VALUE(all_finite(t), name, " contains NaN or inf");
  }
  if (p.bias.defined()) TORCH_CHECK_VALUE(all_finite(p.bias), "bias contains NaN or inf");
  if (p.ref_bias.defined()) TORCH_CHECK_VALUE(all_finite(p.ref_bias), "ref_bias contains NaN or inf");
  p.temperature = temperature;
  p.ignore_index = ignore_index;
  p.renormalize = renormalize;
  return p;
}

// ---------------------------------------------------------------------------------------------
// The chunked driver
// ---------------------------------------------------------------------------------------------

struct Result {
  at::Tensor kl, ce;      // [N], accumulation dtype
  at::Tensor gh, gw, gb;  // [N, H], [V, H], [V] (undefined when not computed / no bias)
};

// `want`: the gradients to compute (none: the loss only); kl_coef / ce_coef: per-token gradient
// coefficients ([N], accumulation dtype) when any is wanted.
Result run(const Problem& p, bool want_kl, bool want_ce, const HeadGradMask& want, const at::Tensor& kl_coef,
           const at::Tensor& ce_coef, MaskedKLRowKernel row_kernel) {
  const auto opts = p.hidden.options();
  const auto acc_opts = opts.dtype(accum_dtype(p.hidden.scalar_type()));
  const bool grad = want.any();
  Result res;
  res.kl = at::zeros({p.N}, acc_opts);
  res.ce = at::zeros({p.N}, acc_opts);
  auto zero_grads = [&] {
    if (want.hidden) res.gh = at::zeros({p.N, p.H}, opts);
    if (want.weight) res.gw = at::zeros({p.V, p.H}, opts);
    if (want.bias) res.gb = at::zeros({p.V}, opts);
  };
  if (p.N == 0 || (!want_kl && !want_ce)) {
    zero_grads();
    return res;
  }

  // Per-token flags; only rows in the KL or the CE are computed (gathered when some are not).
  at::Tensor kl_row = want_kl ? (p.token_mask.defined() ? p.token_mask : at::ones({p.N}, opts.dtype(at::kBool)))
                              : at::zeros({p.N}, opts.dtype(at::kBool));
  at::Tensor tgt = at::full({p.N}, -1, opts.dtype(at::kLong));
  if (want_ce) tgt = at::where(p.target.ne(p.ignore_index), p.target, tgt);
  if (grad) {  // a row whose coefficients are both zero contributes nothing to the gradient
    kl_row = kl_row.logical_and(kl_coef.ne(0));
    tgt = at::where(ce_coef.ne(0), tgt, at::full_like(tgt, -1));
  }
  const at::Tensor active = kl_row.logical_or(tgt.ge(0));
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
  const at::Tensor kl_row_a = take(kl_row).to(at::kByte).contiguous();
  const bool any_kl_row = kl_row_a.any().item<bool>();
  const at::Tensor hr = any_kl_row ? take(p.ref_hidden) : at::Tensor();
  const at::Tensor tgt_a = take(tgt).contiguous();
  const at::Tensor klc_a = grad ? take(kl_coef).to(acc_opts.dtype()).contiguous() : at::Tensor();
  const at::Tensor cec_a = grad ? take(ce_coef).to(acc_opts.dtype()).contiguous() : at::Tensor();
  at::Tensor kl_a = at::zeros({n_act}, acc_opts), ce_a = at::zeros({n_act}, acc_opts);
  at::Tensor gh_a = want.hidden ? (gather ? at::empty({n_act, p.H}, opts) : res.gh) : at::Tensor();

  const int64_t rows = head_rows_for_grad(tokens_per_chunk(p.V, p.hidden.element_size()), n_act, p.H,
                                          p.hidden.scalar_type(), want.weight, kChunkRowsEnv, p.hidden.is_cuda());
  // The first chunk's GEMMs initialise grad_weight / grad_bias (no zero fill).
  std::optional<HeadGradSums> sums;
  if (want.weight || want.bias) sums.emplace(p.V, p.H, want.weight, want.bias, opts, (n_act + rows - 1) / rows);
  at::Tensor zbuf = at::empty({rows, p.V}, opts);
  at::Tensor rbuf = any_kl_row ? at::empty({rows, p.V}, opts) : at::Tensor();

  MaskedKLChunk chunk;
  if (p.vocab_mask.defined()) {
    chunk.vmask = p.vocab_mask.to(acc_opts.dtype()).contiguous();
    chunk.any_kept = p.vocab_mask.any().item<bool>();
  }
  chunk.inv_t = 1.0 / p.temperature;
  chunk.renorm = p.renormalize && p.vocab_mask.defined();
  chunk.grad = grad;

  Float16Overflow overflow(p.hidden);
  for (int64_t n0 = 0; n0 < n_act; n0 += rows) {
    const int64_t m = std::min(rows, n_act - n0);
    at::Tensor z = zbuf.narrow(0, 0, m);
    const at::Tensor hc = h.narrow(0, n0, m);
    head_logits_into(z, hc, p.weight, p.bias);
    overflow.add(z);
    chunk.r = at::Tensor();
    if (any_kl_row) {
      chunk.r = rbuf.narrow(0, 0, m);
      const at::Tensor hrc = hr.narrow(0, n0, m);
      head_logits_into(chunk.r, hrc, p.ref_weight, p.ref_bias);
      overflow.add(chunk.r);
    }
    chunk.z = z;
    chunk.target = tgt_a.narrow(0, n0, m);
    chunk.kl_row = kl_row_a.narrow(0, n0, m);
    chunk.kl_coef = grad ? klc_a.narrow(0, n0, m) : at::Tensor();
    chunk.ce_coef = grad ? cec_a.narrow(0, n0, m) : at::Tensor();
    chunk.kl_out = kl_a.narrow(0, n0, m);
    chunk.ce_out = ce_a.narrow(0, n0, m);
    row_kernel(chunk);
    if (grad) accumulate_head_grads(z, hc, p.weight, want.hidden ? gh_a.narrow(0, n0, m) : at::Tensor(), sums);
  }
  overflow.check();
  if (sums.has_value()) {
    zbuf = rbuf = chunk.z = chunk.r = at::Tensor();  // freed before the sums are rounded
    res.gw = sums->weight();
    res.gb = sums->bias();
  }
  if (gather) {
    res.kl.index_copy_(0, idx, kl_a);
    res.ce.index_copy_(0, idx, ce_a);
    if (want.hidden) res.gh.index_copy_(0, idx, gh_a);
  } else {
    res.kl = kl_a;
    res.ce = ce_a;
  }
  return res;
}

// ---------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------

}  // namespace

// Returns (loss, grad_hidden, grad_weight, grad_bias). loss is a scalar for mean/sum and [N] for none
// (kl_weight * KL_n * token_mask_n + ce_weight * CE_n). The gradients of the loss that grad_mask
// (hidden, weight, bias; mean/sum only) asks for are returned, the others as empty tensors.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_kl_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& ref_hidden, const at::Tensor& ref_weight, const c10::optional<at::Tensor>& ref_bias,
    const c10::optional<at::Tensor>& token_mask, const c10::optional<at::Tensor>& vocab_mask,
    const c10::optional<at::Tensor>& target, double kl_weight, double ce_weight, double temperature,
    int64_t ignore_index, bool renormalize, c10::string_view reduction, std::array<bool, 3> grad_mask,
    MaskedKLRowKernel rows, bool half_ok) {
  const Problem p = make_problem(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask,
                                 target, temperature, ignore_index, renormalize, half_ok);
  const Reduction red = parse_reduction(reduction);
  TORCH_CHECK_VALUE(std::isfinite(kl_weight) && std::isfinite(ce_weight), "kl_weight and ce_weight must be finite");
  TORCH_CHECK_VALUE(ce_weight == 0.0 || p.target.defined(), "ce_weight=", ce_weight, " needs target");
  const HeadGradMask want = head_grad_mask(grad_mask, p.bias.defined());
  const bool compute_grad = want.any();
  TORCH_CHECK_VALUE(!compute_grad || red != Reduction::kNone,
                    "grad_mask is for reduction 'mean' or 'sum'; 'none' computes gradients in backward");
  const bool want_kl = kl_weight != 0.0;
  const bool want_ce = ce_weight != 0.0;
  const auto opts = p.hidden.options();
  const auto acc_opts = opts.dtype(accum_dtype(p.hidden.scalar_type()));

  // Per-token coefficients of the reduced loss: kl_weight / n_kl on KL tokens, ce_weight / n_ce on CE tokens.
  at::Tensor kl_tok = p.token_mask.defined() ? p.token_mask.to(acc_opts.dtype()) : at::ones({p.N}, acc_opts);
  at::Tensor ce_tok =
      p.target.defined() ? p.target.ne(ignore_index).to(acc_opts.dtype()) : at::zeros({p.N}, acc_opts);
  double kl_div = 1.0, ce_div = 1.0;
  if (red == Reduction::kMean) {
    kl_div = std::max(1.0, kl_tok.sum().item<double>());
    ce_div = std::max(1.0, ce_tok.sum().item<double>());
  }
  at::Tensor kl_coef, ce_coef;
  if (compute_grad) {
    kl_coef = kl_tok * (kl_weight / kl_div);
    ce_coef = ce_tok * (ce_weight / ce_div);
  }
  Result res = run(p, want_kl, want_ce, want, kl_coef, ce_coef, rows);
  at::Tensor per_token = res.kl * kl_weight + res.ce * ce_weight;  // KL_n is 0 off the token mask
  at::Tensor loss;
  if (red == Reduction::kNone) {
    loss = per_token;
  } else {
    loss = res.kl.sum() * (kl_weight / kl_div) + res.ce.sum() * (ce_weight / ce_div);
  }
  const auto [gh, gw, gb] = grads_or_empty(res.gh, res.gw, res.gb, opts);
  return {loss, gh, gw, gb};
}

// Gradients for per-token coefficients grad_kl [N] (dLoss/dKL_n) and grad_ce [N] (dLoss/dCE_n):
// returns (grad_hidden [N, H], grad_weight [V, H], grad_bias [V]), each an empty tensor where
// output_mask says no (grad_bias also without a bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_kl_backward(
    const at::Tensor& grad_kl, const at::Tensor& grad_ce, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& ref_hidden, const at::Tensor& ref_weight,
    const c10::optional<at::Tensor>& ref_bias, const c10::optional<at::Tensor>& token_mask,
    const c10::optional<at::Tensor>& vocab_mask, const c10::optional<at::Tensor>& target, double temperature,
    int64_t ignore_index, bool renormalize, std::array<bool, 3> output_mask, MaskedKLRowKernel rows, bool half_ok) {
  const Problem p = make_problem(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask,
                                 target, temperature, ignore_index, renormalize, half_ok);
  const auto dev = p.hidden.device();
  check_vector(grad_kl, p.N, "grad_kl", "one coefficient per token", dev);
  check_vector(grad_ce, p.N, "grad_ce", "one coefficient per token", dev);
  const auto opts = p.hidden.options();
  const auto acc = accum_dtype(p.hidden.scalar_type());
  const at::Tensor klc = grad_kl.to(acc).contiguous();
  const at::Tensor cec = grad_ce.to(acc).contiguous();
  const bool want_ce = p.target.defined() && cec.ne(0).any().item<bool>();
  const bool want_kl = klc.ne(0).any().item<bool>();
  TORCH_CHECK_VALUE(all_finite(klc) && all_finite(cec), "the incoming gradient contains NaN or inf");
  const HeadGradMask want = head_grad_mask(output_mask, p.bias.defined());
  const Result res = want.any() ? run(p, want_kl, want_ce, want, klc, cec, rows) : Result{};
  return grads_or_empty(res.gh, res.gw, res.gb, opts);
}

}  // namespace unlearn_ext
