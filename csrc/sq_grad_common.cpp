// Device-generic parts of the squared per-sample gradient ops (see include/unlearn_ext/sq_grad.h).
// Everything here is written with ATen ops, so it runs on CPU and CUDA alike; the device-specific
// segmented kernel is passed in through SqGradBackend.
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "unlearn_ext/checks.h"
#include "unlearn_ext/sq_grad.h"

namespace unlearn_ext {
namespace {

// Bytes of temporary operands one chunk of the Hadamard / per-sample / conv algorithms may hold.
constexpr int64_t kChunkBytes = int64_t{4} << 20;

at::Tensor as_3d(const at::Tensor& t) { return t.dim() == 2 ? t.unsqueeze(1) : t; }

void check_linear_args(const at::Tensor& x, const at::Tensor& grad_out) {
  check_float_dtype(x, "x");
  check_float_dtype(grad_out, "grad_out");
  TORCH_CHECK_VALUE(x.scalar_type() == grad_out.scalar_type(), "x (", x.scalar_type(), ") and grad_out (",
                    grad_out.scalar_type(), ") must have the same dtype");
  check_same_device(x, "x", grad_out, "grad_out");
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "x must be [B, d_in] or [B, T, d_in], got shape ", x.sizes());
  TORCH_CHECK_VALUE(grad_out.dim() == x.dim(), "grad_out must have the same rank as x (", x.dim(),
                    "), got shape ", grad_out.sizes());
  TORCH_CHECK_VALUE(grad_out.size(0) == x.size(0), "grad_out has batch size ", grad_out.size(0), " but x has ",
                    x.size(0));
  if (x.dim() == 3) {
    TORCH_CHECK_VALUE(grad_out.size(1) == x.size(1), "grad_out has sequence length ", grad_out.size(1),
                      " but x has ", x.size(1));
  }
}

void check_algorithm(const std::string& algorithm) {
  TORCH_CHECK_VALUE(algorithm == "auto" || algorithm == "segmented" || algorithm == "hadamard" ||
                        algorithm == "per_sample",
                    "algorithm must be one of 'auto', 'segmented', 'hadamard', 'per_sample', got '", algorithm, "'");
}

std::string resolve_algorithm(const std::string& algorithm, int64_t tokens, const SqGradBackend& backend) {
  if (algorithm != "auto") return algorithm;
  if (tokens <= backend.hadamard_max_tokens) return "hadamard";
  if (tokens <= backend.segmented_max_tokens) return "segmented";
  return "per_sample";
}

// The samples of plan positions [begin, end) as a plan of their own (positions renumbered from 0).
SamplePlan slice_plan(const SamplePlan& plan, int64_t begin, int64_t end) {
  SamplePlan sub;
  sub.order = plan.order.slice(0, begin, end);
  sub.weight = plan.weight.slice(0, begin, end);
  sub.group = plan.group.slice(0, begin, end);
  sub.seg_start_cpu = (plan.seg_start_cpu - begin).clamp(0, end - begin);
  sub.seg_start = sub.seg_start_cpu.to(plan.seg_start.device());
  sub.unit_weight = plan.unit_weight;
  return sub;
}

// Hadamard expansion: (G_b^T X_b)**2 = sum_{t<=s} c_ts (g_t*g_s)^T (x_t*x_s) with c_tt = 1, c_ts = 2,
// i.e. one GEMM with K = T(T+1)/2 per sample; T = 1 is the single GEMM (G*G)^T (X*X).
void hadamard_accumulate(const at::Tensor& x3, const at::Tensor& g3, const SamplePlan& plan, at::Tensor& out3) {
  const int64_t T = x3.size(1), d_in = x3.size(2), d_out = g3.size(2);
  const auto acc = out3.scalar_type();
  const auto dev = x3.device();
  std::vector<int64_t> tt, ss;
  std::vector<double> coef;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t s = t; s < T; ++s) {
      tt.push_back(t);
      ss.push_back(s);
      coef.push_back(s == t ? 1.0 : 2.0);
    }
  }
  const int64_t P = static_cast<int64_t>(tt.size());
  auto t_idx = at::tensor(tt, at::kLong).to(dev);
  auto s_idx = at::tensor(ss, at::kLong).to(dev);
  auto c = at::tensor(coef, at::TensorOptions().dtype(acc)).to(dev);
  const int64_t elem = acc == at::kDouble ? 8 : 4;
  const int64_t per_sample = P * (d_in + d_out) * elem * 2 + T * (d_in + d_out) * elem;
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(per_sample, 1));
  const auto seg = plan.seg_start_cpu.accessor<int64_t, 1>();
  for (int64_t k = 0; k + 1 < seg.size(0); ++k) {
    auto out_k = out3.select(0, k);
    for (int64_t j0 = seg[k]; j0 < seg[k + 1]; j0 += chunk) {
      const int64_t j1 = std::min(seg[k + 1], j0 + chunk);
      auto idx = plan.order.slice(0, j0, j1);
      auto w = plan.weight.slice(0, j0, j1);
      auto xs = x3.index_select(0, idx).to(acc);  // [c, T, d_in]
      auto gs = g3.index_select(0, idx).to(acc);  // [c, T, d_out]
      at::Tensor a, b;
      if (T == 1) {
        a = gs.squeeze(1).square().mul_(w.unsqueeze(1));
        b = xs.squeeze(1).square();
      } else {
        a = gs.index_select(1, t_idx).mul_(gs.index_select(1, s_idx));
        a.mul_(c.view({1, P, 1})).mul_(w.view({-1, 1, 1}));
        b = xs.index_select(1, t_idx).mul_(xs.index_select(1, s_idx));
        a = a.reshape({-1, d_out});
        b = b.reshape({-1, d_in});
      }
      out_k.addmm_(a.t(), b);
    }
  }
}

// One GEMM per sample on row tiles of the output: P = G_b^T X_b, out += w * P * P.
void per_sample_accumulate(const at::Tensor& x3, const at::Tensor& g3, const SamplePlan& plan, at::Tensor& out3) {
  const int64_t d_in = x3.size(2), d_out = g3.size(2);
  const auto acc = out3.scalar_type();
  const int64_t elem = acc == at::kDouble ? 8 : 4;
  const int64_t rows = std::clamp<int64_t>(kChunkBytes / std::max<int64_t>(d_in * elem, 1), 1, d_out);
  auto tile = at::empty({rows, d_in}, out3.options());
  const auto seg = plan.seg_start_cpu.accessor<int64_t, 1>();
  const auto order = plan.order.to(at::kCPU);
  const auto weight = plan.weight.to(at::kCPU).to(at::kDouble);
  const auto order_a = order.accessor<int64_t, 1>();
  const auto weight_a = weight.accessor<double, 1>();
  for (int64_t k = 0; k + 1 < seg.size(0); ++k) {
    auto out_k = out3.select(0, k);
    for (int64_t j = seg[k]; j < seg[k + 1]; ++j) {
      auto xs = x3.select(0, order_a[j]).to(acc);  // [T, d_in]
      auto gs = g3.select(0, order_a[j]).to(acc);  // [T, d_out]
      for (int64_t r0 = 0; r0 < d_out; r0 += rows) {
        const int64_t r1 = std::min(d_out, r0 + rows);
        auto p = tile.narrow(0, 0, r1 - r0);
        at::mm_out(p, gs.narrow(1, r0, r1 - r0).t(), xs);
        out_k.narrow(0, r0, r1 - r0).addcmul_(p, p, weight_a[j]);
      }
    }
  }
}

void accumulate_with_plan(const at::Tensor& x3, const at::Tensor& g3, const SamplePlan& plan, at::Tensor& out3,
                          const std::string& algorithm, const SqGradBackend& backend) {
  if (plan.order.numel() == 0 || x3.size(1) == 0 || x3.size(2) == 0 || g3.size(2) == 0) return;
  const auto algo = resolve_algorithm(algorithm, x3.size(1), backend);
  if (algo == "hadamard") {
    hadamard_accumulate(x3, g3, plan, out3);
  } else if (algo == "segmented") {
    backend.segmented(x3, g3, plan, out3);
  } else {
    per_sample_accumulate(x3, g3, plan, out3);
  }
}

// bias_out[group[b]] += w_b * (sum_t g[b, t])**2
void bias_accumulate(const at::Tensor& g3, const SamplePlan& plan, at::Tensor& bias_out) {
  if (plan.order.numel() == 0) return;
  const auto acc = bias_out.scalar_type();
  auto gs = g3.index_select(0, plan.order).sum(1, /*keepdim=*/false, acc);  // [S, d_out]
  gs.square_().mul_(plan.weight.unsqueeze(1));
  bias_out.index_add_(0, plan.group, gs);
}

void check_finite_result(const at::Tensor& out, const char* name) {
  if (out.numel() == 0) return;
  TORCH_CHECK_VALUE(all_finite(out), name,
                    " has non-finite values after accumulation: an input (x, grad_out or a previous `out`) contains "
                    "NaN or inf, or the squared gradients overflow ", out.scalar_type(),
                    "; an `out` passed in now holds those values");
}

}  // namespace

SamplePlan make_sample_plan(int64_t batch, const c10::optional<at::Tensor>& group, int64_t num_groups,
                            const c10::optional<at::Tensor>& sample_weight, const at::TensorOptions& index_options,
                            at::ScalarType acc_dtype) {
  SamplePlan plan;
  const auto dev = index_options.device();
  at::Tensor gid = group.has_value() ? group->to(at::kLong) : at::zeros({batch}, index_options.dtype(at::kLong));
  at::Tensor order = group.has_value() ? std::get<1>(at::sort(gid, /*stable=*/true, /*dim=*/0, /*descending=*/false))
                                       : at::arange(batch, index_options.dtype(at::kLong));
  at::Tensor w = sample_weight.has_value() ? sample_weight->to(dev, acc_dtype)
                                           : at::ones({batch}, index_options.dtype(acc_dtype));
  if (sample_weight.has_value()) {
    auto keep = w.index_select(0, order).ne(0);
    order = order.masked_select(keep);
    plan.unit_weight = batch == 0 || at::all(w.eq(1)).item<bool>();
  }
  plan.order = order;
  plan.weight = w.index_select(0, order).contiguous();
  plan.group = gid.index_select(0, order).contiguous();
  auto counts = at::bincount(plan.group, /*weights=*/{}, /*minlength=*/num_groups);
  auto seg = at::zeros({num_groups + 1}, index_options.dtype(at::kLong));
  if (counts.numel() > 0) seg.narrow(0, 1, num_groups).copy_(counts.narrow(0, 0, num_groups).cumsum(0));
  plan.seg_start = seg;
  plan.seg_start_cpu = seg.to(at::kCPU);
  return plan;
}

void sq_grad_linear_accumulate(const at::Tensor& x, const at::Tensor& grad_out, const c10::optional<at::Tensor>& group,
                               int64_t num_groups, const c10::optional<at::Tensor>& sample_weight, at::Tensor& out,
                               const c10::optional<at::Tensor>& bias_out, const std::string& algorithm,
                               const SqGradBackend& backend) {
  check_linear_args(x, grad_out);
  check_algorithm(algorithm);
  const auto x3 = as_3d(x), g3 = as_3d(grad_out);
  const int64_t B = x3.size(0), d_in = x3.size(2), d_out = g3.size(2);
  const auto acc = accum_dtype(x.scalar_type());
  check_group_and_weight(group, num_groups, sample_weight, B, x.device());
  check_accumulator(out, {num_groups, d_out, d_in}, acc, x.device(), "out");
  if (bias_out.has_value()) check_accumulator(*bias_out, {num_groups, d_out}, acc, x.device(), "bias_out");
  auto plan = make_sample_plan(B, group, num_groups, sample_weight, x.options(), acc);
  accumulate_with_plan(x3, g3, plan, out, algorithm, backend);
  check_finite_result(out, "out");
  if (bias_out.has_value()) {
    auto b = *bias_out;
    bias_accumulate(g3, plan, b);
    check_finite_result(b, "bias_out");
  }
}

std::tuple<at::Tensor, at::Tensor> sq_grad_linear_functional(const at::Tensor& x, const at::Tensor& grad_out,
                                                             const c10::optional<at::Tensor>& group, int64_t num_groups,
                                                             const c10::optional<at::Tensor>& sample_weight,
                                                             bool with_bias, const std::string& algorithm,
                                                             const SqGradBackend& backend) {
  check_linear_args(x, grad_out);
  TORCH_CHECK_VALUE(num_groups >= 1, "num_groups must be at least 1, got ", num_groups);
  const auto opts = x.options().dtype(accum_dtype(x.scalar_type()));
  const int64_t d_in = x.size(-1), d_out = grad_out.size(-1);
  auto out = at::zeros({num_groups, d_out, d_in}, opts);
  auto bias = at::zeros({num_groups, with_bias ? d_out : 0}, opts);
  sq_grad_linear_accumulate(x, grad_out, group, num_groups, sample_weight, out,
                            with_bias ? c10::optional<at::Tensor>(bias) : c10::nullopt, algorithm, backend);
  return {out, bias};
}

// ---- Conv2d: chunked im2col (never the whole batch), then the linear kernels per conv group ----

namespace {

void check_conv_args(const at::Tensor& x, const at::Tensor& grad_out, at::IntArrayRef weight_shape,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_float_dtype(x, "x");
  check_float_dtype(grad_out, "grad_out");
  TORCH_CHECK_VALUE(x.scalar_type() == grad_out.scalar_type(), "x (", x.scalar_type(), ") and grad_out (",
                    grad_out.scalar_type(), ") must have the same dtype");
  check_same_device(x, "x", grad_out, "grad_out");
  check_dim(x, 4, "x", "[B, C_in, H, W]");
  check_dim(grad_out, 4, "grad_out", "[B, C_out, H_out, W_out]");
  TORCH_CHECK_VALUE(weight_shape.size() == 4, "weight_shape must be [C_out, C_in/groups, kh, kw], got ",
                    weight_shape);
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "stride, padding and dilation must each have 2 entries");
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0, "stride must be positive, got ", stride);
  TORCH_CHECK_VALUE(dilation[0] > 0 && dilation[1] > 0, "dilation must be positive, got ", dilation);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, "padding must be non-negative, got ", padding);
  TORCH_CHECK_VALUE(groups >= 1, "groups must be at least 1, got ", groups);
  const int64_t c_out = weight_shape[0], c_in_g = weight_shape[1], kh = weight_shape[2], kw = weight_shape[3];
  TORCH_CHECK_VALUE(c_out > 0 && c_in_g > 0 && kh > 0 && kw > 0, "weight_shape entries must be positive, got ",
                    weight_shape);
  TORCH_CHECK_VALUE(x.size(1) == c_in_g * groups, "x has ", x.size(1), " channels but weight_shape ", weight_shape,
                    " with groups=", groups, " expects ", c_in_g * groups);
  TORCH_CHECK_VALUE(c_out % groups == 0, "weight_shape[0] (C_out=", c_out, ") must be divisible by groups=", groups);
  TORCH_CHECK_VALUE(grad_out.size(0) == x.size(0), "grad_out has batch size ", grad_out.size(0), " but x has ",
                    x.size(0));
  TORCH_CHECK_VALUE(grad_out.size(1) == c_out, "grad_out has ", grad_out.size(1), " channels but weight_shape has C_out=",
                    c_out);
  const int64_t h_out = (x.size(2) + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t w_out = (x.size(3) + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK_VALUE(h_out > 0 && w_out > 0, "the (dilated) kernel [", kh, ", ", kw, "] is larger than the padded input [",
                    x.size(2), ", ", x.size(3), "]: the convolution has no output");
  TORCH_CHECK_VALUE(grad_out.size(2) == h_out && grad_out.size(3) == w_out, "grad_out must have spatial size [",
                    h_out, ", ", w_out, "] for this input, kernel, stride, padding and dilation, got [",
                    grad_out.size(2), ", ", grad_out.size(3), "]");
}

}  // namespace

void sq_grad_conv2d_accumulate(const at::Tensor& x, const at::Tensor& grad_out, at::IntArrayRef weight_shape,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               const c10::optional<at::Tensor>& group, int64_t num_groups,
                               const c10::optional<at::Tensor>& sample_weight, at::Tensor& out,
                               const c10::optional<at::Tensor>& bias_out, const std::string& algorithm,
                               const SqGradBackend& backend) {
  check_conv_args(x, grad_out, weight_shape, stride, padding, dilation, groups);
  check_algorithm(algorithm);
  const int64_t B = x.size(0), c_out = weight_shape[0], c_in_g = weight_shape[1];
  const int64_t kh = weight_shape[2], kw = weight_shape[3];
  const int64_t L = grad_out.size(2) * grad_out.size(3), D = c_in_g * kh * kw, co_g = c_out / groups;
  const auto acc = accum_dtype(x.scalar_type());
  check_group_and_weight(group, num_groups, sample_weight, B, x.device());
  check_accumulator(out, {num_groups, c_out, c_in_g, kh, kw}, acc, x.device(), "out");
  if (bias_out.has_value()) check_accumulator(*bias_out, {num_groups, c_out}, acc, x.device(), "bias_out");
  auto plan = make_sample_plan(B, group, num_groups, sample_weight, x.options(), acc);
  const int64_t S = plan.order.numel();
  auto out3 = out.view({num_groups, c_out, D});
  auto g_flat = grad_out.reshape({B, c_out, L});
  const auto algo = algorithm == "auto" && L >= backend.conv_per_sample_min_tokens
                        ? std::string("per_sample")
                        : resolve_algorithm(algorithm, L, backend);
  if (S > 0 && L > 0 && algo == "per_sample") {
    // One weight-gradient convolution per sample (oneDNN / cuDNN implicit GEMM: no im2col at all).
    auto order = plan.order.to(at::kCPU);
    auto weight = plan.weight.to(at::kCPU).to(at::kDouble);
    const auto order_a = order.accessor<int64_t, 1>();
    const auto weight_a = weight.accessor<double, 1>();
    const auto seg = plan.seg_start_cpu.accessor<int64_t, 1>();
    auto w_proto = at::empty(weight_shape, x.options().dtype(acc));
    for (int64_t k = 0; k + 1 < seg.size(0); ++k) {
      auto out_k = out.select(0, k);
      for (int64_t j = seg[k]; j < seg[k + 1]; ++j) {
        auto xs = x.narrow(0, order_a[j], 1).to(acc);
        auto gs = grad_out.narrow(0, order_a[j], 1).to(acc);
        auto grads = at::convolution_backward(gs, xs, w_proto, c10::nullopt, stride, padding, dilation,
                                              /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
                                              {false, true, false});
        const auto& p = std::get<1>(grads);
        out_k.addcmul_(p, p, weight_a[j]);
      }
    }
  } else if (S > 0 && L > 0) {
    const int64_t elem = x.element_size();
    const int64_t per_sample = (groups * D * L + x.size(1) * x.size(2) * x.size(3)) * elem;
    const int64_t chunk = std::max<int64_t>(1, kChunkBytes * 2 / std::max<int64_t>(per_sample, 1));
    for (int64_t j0 = 0; j0 < S; j0 += chunk) {
      const int64_t j1 = std::min(S, j0 + chunk);
      auto sub = slice_plan(plan, j0, j1);
      auto xs = x.index_select(0, sub.order);
      auto cols = at::im2col(xs, {kh, kw}, dilation, padding, stride);  // [c, C_in*kh*kw, L]
      auto gs = g_flat.index_select(0, sub.order);                     // [c, C_out, L]
      sub.order = at::arange(j1 - j0, sub.order.options());
      for (int64_t gi = 0; gi < groups; ++gi) {
        auto x3 = cols.narrow(1, gi * D, D).transpose(1, 2);  // [c, L, D]
        auto g3 = gs.narrow(1, gi * co_g, co_g).transpose(1, 2);  // [c, L, C_out/groups]
        auto o3 = out3.narrow(1, gi * co_g, co_g);
        accumulate_with_plan(x3, g3, sub, o3, algo, backend);
      }
    }
  }
  check_finite_result(out, "out");
  if (bias_out.has_value()) {
    auto b = *bias_out;
    bias_accumulate(g_flat.transpose(1, 2), plan, b);
    check_finite_result(b, "bias_out");
  }
}

std::tuple<at::Tensor, at::Tensor> sq_grad_conv2d_functional(
    const at::Tensor& x, const at::Tensor& grad_out, at::IntArrayRef weight_shape, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const c10::optional<at::Tensor>& group,
    int64_t num_groups, const c10::optional<at::Tensor>& sample_weight, bool with_bias, const std::string& algorithm,
    const SqGradBackend& backend) {
  check_float_dtype(x, "x");
  TORCH_CHECK_VALUE(num_groups >= 1, "num_groups must be at least 1, got ", num_groups);
  TORCH_CHECK_VALUE(weight_shape.size() == 4, "weight_shape must be [C_out, C_in/groups, kh, kw], got ",
                    weight_shape);
  const auto opts = x.options().dtype(accum_dtype(x.scalar_type()));
  std::vector<int64_t> shape{num_groups};
  shape.insert(shape.end(), weight_shape.begin(), weight_shape.end());
  auto out = at::zeros(shape, opts);
  auto bias = at::zeros({num_groups, with_bias ? weight_shape[0] : 0}, opts);
  sq_grad_conv2d_accumulate(x, grad_out, weight_shape, stride, padding, dilation, groups, group, num_groups,
                            sample_weight, out, with_bias ? c10::optional<at::Tensor>(bias) : c10::nullopt, algorithm,
                            backend);
  return {out, bias};
}

// ---- Embedding: shared validation and ordering ----

void check_embedding_args(const at::Tensor& ids, const at::Tensor& grad_out, int64_t num_embeddings,
                          const c10::optional<int64_t>& padding_idx, const c10::optional<at::Tensor>& group,
                          int64_t num_groups, const c10::optional<at::Tensor>& sample_weight) {
  TORCH_CHECK_VALUE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                    "ids must be an int64 or int32 tensor, got ", ids.scalar_type());
  check_float_dtype(grad_out, "grad_out");
  check_same_device(ids, "ids", grad_out, "grad_out");
  check_dim(ids, 2, "ids", "[B, T]");
  check_dim(grad_out, 3, "grad_out", "[B, T, d]");
  TORCH_CHECK_VALUE(grad_out.size(0) == ids.size(0) && grad_out.size(1) == ids.size(1), "grad_out has shape ",
                    grad_out.sizes(), " but ids has shape ", ids.sizes(), " (expected [B, T, d] matching ids [B, T])");
  TORCH_CHECK_VALUE(num_embeddings > 0, "num_embeddings must be positive, got ", num_embeddings);
  if (padding_idx.has_value()) {
    TORCH_CHECK_VALUE(*padding_idx >= 0 && *padding_idx < num_embeddings, "padding_idx must be in [0, ",
                      num_embeddings, "), got ", *padding_idx);
  }
  if (ids.numel() > 0) {
    const auto lo = ids.min().item<int64_t>();
    const auto hi = ids.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < num_embeddings, "ids must be in [0, num_embeddings=", num_embeddings,
                      "), got values in [", lo, ", ", hi, "]");
  }
  check_group_and_weight(group, num_groups, sample_weight, ids.size(0), ids.device());
}

at::Tensor embedding_output(const at::Tensor& grad_out, int64_t num_embeddings, int64_t num_groups) {
  check_float_dtype(grad_out, "grad_out");
  TORCH_CHECK_VALUE(num_groups >= 1, "num_groups must be at least 1, got ", num_groups);
  check_dim(grad_out, 3, "grad_out", "[B, T, d]");
  TORCH_CHECK_VALUE(num_embeddings > 0, "num_embeddings must be positive, got ", num_embeddings);
  return at::zeros({num_groups, num_embeddings, grad_out.size(2)},
                   grad_out.options().dtype(accum_dtype(grad_out.scalar_type())));
}

EmbeddingPlan make_embedding_plan(const at::Tensor& ids, int64_t num_embeddings, const c10::optional<int64_t>& padding_idx,
                                  const c10::optional<at::Tensor>& group, int64_t num_groups,
                                  const c10::optional<at::Tensor>& sample_weight, at::ScalarType acc_dtype) {
  EmbeddingPlan ep;
  const int64_t B = ids.size(0), T = ids.size(1);
  ep.samples = make_sample_plan(B, group, num_groups, sample_weight, ids.options(), acc_dtype);
  const auto& order = ep.samples.order;
  const int64_t S = order.numel();
  auto ids64 = ids.to(at::kLong).index_select(0, order);  // [S, T]
  auto pos = at::arange(S, ids64.options()).unsqueeze(1).expand({S, T});
  auto tok = (order.unsqueeze(1) * T + at::arange(T, ids64.options()).unsqueeze(0));  // flat token index
  auto flat_ids = ids64.reshape({-1});
  auto flat_pos = pos.reshape({-1});
  auto flat_tok = tok.reshape({-1});
  if (padding_idx.has_value()) {
    auto keep = flat_ids.ne(*padding_idx);
    flat_ids = flat_ids.masked_select(keep);
    flat_pos = flat_pos.masked_select(keep);
    flat_tok = flat_tok.masked_select(keep);
  }
  // Sort by (output row = group * V + id, sample position): runs of equal keys are one sample's
  // occurrences of one id, and all runs that update one output row are adjacent.
  auto row = ep.samples.group.index_select(0, flat_pos) * num_embeddings + flat_ids;
  auto key = row * std::max<int64_t>(S, 1) + flat_pos;
  auto perm = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  ep.token_order = flat_tok.index_select(0, perm);
  ep.sorted_ids = flat_ids.index_select(0, perm);
  ep.token_sample = flat_pos.index_select(0, perm);
  return ep;
}

}  // namespace unlearn_ext
