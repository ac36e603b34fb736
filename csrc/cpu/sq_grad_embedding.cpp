// CPU kernel of sq_grad_embedding: F[k, v] += w_b * (sum of grad_out rows of sample b whose id is v)**2.
// Tokens are ordered by (sample, id) once (sq_grad_common.cpp); each run of equal (sample, id) is
// summed in a register-sized strip, squared and added to its row. Threads own column strips of F, so
// no two threads write the same element and no atomics are needed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "unlearn_ext/checks.h"
#include "unlearn_ext/sq_grad.h"

namespace unlearn_ext {
namespace {

template <typename S, typename In>
void embedding_impl(const at::Tensor& grad_out, const EmbeddingPlan& ep, at::Tensor& out) {
  const int64_t M = ep.token_order.numel();
  if (M == 0) return;
  const int64_t T = grad_out.size(1), d = grad_out.size(2);
  const int64_t V = out.size(1);
  const In* g = grad_out.template data_ptr<In>();
  const int64_t gs0 = grad_out.stride(0), gs1 = grad_out.stride(1), gs2 = grad_out.stride(2);
  const int64_t* tok = ep.token_order.data_ptr<int64_t>();
  const int64_t* ids = ep.sorted_ids.data_ptr<int64_t>();
  const int64_t* pos = ep.token_sample.data_ptr<int64_t>();
  auto w_cpu = ep.samples.weight.to(at::kDouble).contiguous();
  auto grp_cpu = ep.samples.group.contiguous();
  const double* w = w_cpu.data_ptr<double>();
  const int64_t* grp = grp_cpu.data_ptr<int64_t>();
  S* F = out.template data_ptr<S>();
  // Run starts: token m starts a run when (sample, id) differs from token m - 1.
  std::vector<int64_t> starts;
  starts.reserve(M + 1);
  for (int64_t m = 0; m < M; ++m) {
    if (m == 0 || ids[m] != ids[m - 1] || pos[m] != pos[m - 1]) starts.push_back(m);
  }
  starts.push_back(M);
  constexpr int64_t kStrip = 64;
  at::parallel_for(0, (d + kStrip - 1) / kStrip, 1, [&](int64_t begin, int64_t end) {
    S acc[kStrip];
    for (int64_t strip = begin; strip < end; ++strip) {
      const int64_t c0 = strip * kStrip, nc = std::min(kStrip, d - c0);
      for (size_t r = 0; r + 1 < starts.size(); ++r) {
        const int64_t m0 = starts[r], m1 = starts[r + 1];
        std::fill(acc, acc + nc, S(0));
        for (int64_t m = m0; m < m1; ++m) {
          const int64_t b = tok[m] / T, t = tok[m] % T;
          const In* row = g + b * gs0 + t * gs1 + c0 * gs2;
          for (int64_t c = 0; c < nc; ++c) acc[c] += static_cast<S>(row[c * gs2]);
        }
        const S wt = static_cast<S>(w[pos[m0]]);
        S* frow = F + (grp[pos[m0]] * V + ids[m0]) * d + c0;
        for (int64_t c = 0; c < nc; ++c) frow[c] += wt * acc[c] * acc[c];
      }
    }
  });
}

void sq_grad_embedding_accumulate_cpu(const at::Tensor& ids, const at::Tensor& grad_out, int64_t num_embeddings,
                                      c10::optional<int64_t> padding_idx, const c10::optional<at::Tensor>& group,
                                      int64_t num_groups, const c10::optional<at::Tensor>& sample_weight,
                                      at::Tensor out) {
  check_embedding_args(ids, grad_out, num_embeddings, padding_idx, group, num_groups, sample_weight);
  const auto acc = accum_dtype(grad_out.scalar_type());
  check_accumulator(out, {num_groups, num_embeddings, grad_out.size(2)}, acc, grad_out.device(), "out");
  auto ep = make_embedding_plan(ids, num_embeddings, padding_idx, group, num_groups, sample_weight, acc);
  switch (grad_out.scalar_type()) {
    case at::kDouble:
      embedding_impl<double, double>(grad_out, ep, out);
      break;
    case at::kFloat:
      embedding_impl<float, float>(grad_out, ep, out);
      break;
    case at::kBFloat16:
      embedding_impl<float, c10::BFloat16>(grad_out, ep, out);
      break;
    case at::kHalf:
      embedding_impl<float, c10::Half>(grad_out, ep, out);
      break;
    default:
      TORCH_CHECK_VALUE(false, "grad_out must be floating point, got ", grad_out.scalar_type());
  }
  if (out.numel() > 0) {
    TORCH_CHECK_VALUE(at::isfinite(out.sum(at::kDouble)).item<bool>(),
                      "out has non-finite values after accumulation: grad_out (or a previous `out`) contains NaN or "
                      "inf, or the squared gradients overflow");
  }
}

at::Tensor sq_grad_embedding_cpu(const at::Tensor& ids, const at::Tensor& grad_out, int64_t num_embeddings,
                                 c10::optional<int64_t> padding_idx, const c10::optional<at::Tensor>& group,
                                 int64_t num_groups, const c10::optional<at::Tensor>& sample_weight) {
  check_float_dtype(grad_out, "grad_out");
  TORCH_CHECK_VALUE(num_groups >= 1, "num_groups must be at least 1, got ", num_groups);
  check_dim(grad_out, 3, "grad_out", "[B, T, d]");
  auto out = at::zeros({num_groups, num_embeddings, grad_out.size(2)},
                       grad_out.options().dtype(accum_dtype(grad_out.scalar_type())));
  sq_grad_embedding_accumulate_cpu(ids, grad_out, num_embeddings, padding_idx, group, num_groups, sample_weight, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("sq_grad_embedding", &sq_grad_embedding_cpu);
  m.impl("sq_grad_embedding_", &sq_grad_embedding_accumulate_cpu);
}

}  // namespace unlearn_ext
