// CPU kernel of sq_grad_embedding: F[k, v] += w_b * (sum of grad_out rows of sample b whose id is v)**2.
// Tokens are ordered once by (output row k * V + v, sample) (sq_grad_common.cpp); each run of equal
// (sample, id) is summed, squared, weighted and added to its row. Threads own whole output rows, so no
// two threads write the same element and no atomics are needed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "unlearn_ext/checks.h"
#include "unlearn_ext/sq_grad.h"

namespace unlearn_ext {
namespace {

// Returns false when an updated entry is not finite.
template <typename S, typename In>
bool embedding_impl(const at::Tensor& grad_out, const EmbeddingPlan& ep, at::Tensor& out) {
  const int64_t M = ep.token_order.numel();
  if (M == 0) return true;
  const int64_t T = grad_out.size(1), d = grad_out.size(2);
  const int64_t V = out.size(1);
  const In* g = grad_out.data_ptr<In>();
  const int64_t gs0 = grad_out.stride(0), gs1 = grad_out.stride(1), gs2 = grad_out.stride(2);
  const int64_t* tok = ep.token_order.data_ptr<int64_t>();
  const int64_t* ids = ep.sorted_ids.data_ptr<int64_t>();
  const int64_t* pos = ep.token_sample.data_ptr<int64_t>();
  auto w_cpu = ep.samples.weight.to(at::kDouble).contiguous();
  auto grp_cpu = ep.samples.group.contiguous();
  const double* w = w_cpu.data_ptr<double>();
  const int64_t* grp = grp_cpu.data_ptr<int64_t>();
  S* F = out.data_ptr<S>();
  // Runs (one sample's occurrences of one id) and, over them, row segments (all runs of one output row).
  std::vector<int64_t> run_start, seg_start;
  run_start.reserve(M + 1);
  for (int64_t m = 0; m < M; ++m) {
    if (m == 0 || ids[m] != ids[m - 1] || pos[m] != pos[m - 1]) {
      const bool new_row = m == 0 || ids[m] != ids[m - 1] || grp[pos[m]] != grp[pos[m - 1]];
      if (new_row) seg_start.push_back(static_cast<int64_t>(run_start.size()));
      run_start.push_back(m);
    }
  }
  run_start.push_back(M);
  seg_start.push_back(static_cast<int64_t>(run_start.size()) - 1);
  const int64_t n_seg = static_cast<int64_t>(seg_start.size()) - 1;
  std::atomic<bool> finite{true};
  // Threads own whole output rows (row segments), so no two threads write the same element.
  at::parallel_for(0, n_seg, 16, [&](int64_t begin, int64_t end) {
    std::vector<S> acc(d);
    bool ok = true;
    for (int64_t sg = begin; sg < end; ++sg) {
      S* frow = nullptr;
      for (int64_t r = seg_start[sg]; r < seg_start[sg + 1]; ++r) {
        const int64_t m0 = run_start[r], m1 = run_start[r + 1];
        std::fill(acc.begin(), acc.end(), S(0));
        for (int64_t m = m0; m < m1; ++m) {
          const In* row = g + (tok[m] / T) * gs0 + (tok[m] % T) * gs1;
          if (gs2 == 1) {
            for (int64_t c = 0; c < d; ++c) acc[c] += static_cast<S>(row[c]);
          } else {
            for (int64_t c = 0; c < d; ++c) acc[c] += static_cast<S>(row[c * gs2]);
          }
        }
        const S wt = static_cast<S>(w[pos[m0]]);
        frow = F + (grp[pos[m0]] * V + ids[m0]) * d;
        for (int64_t c = 0; c < d; ++c) frow[c] += wt * acc[c] * acc[c];
      }
      S check = S(0);
      for (int64_t c = 0; c < d; ++c) check += frow[c] * S(0);  // 0 when finite; NaN once any entry is NaN/inf
      ok = ok && std::isfinite(check);
    }
    if (!ok) finite.store(false);
  });
  return finite.load();
}

void sq_grad_embedding_accumulate_cpu(const at::Tensor& ids, const at::Tensor& grad_out, int64_t num_embeddings,
                                      c10::optional<int64_t> padding_idx, const c10::optional<at::Tensor>& group,
                                      int64_t num_groups, const c10::optional<at::Tensor>& sample_weight,
                                      at::Tensor out) {
  check_embedding_args(ids, grad_out, num_embeddings, padding_idx, group, num_groups, sample_weight);
  const auto acc = accum_dtype(grad_out.scalar_type());
  check_accumulator(out, {num_groups, num_embeddings, grad_out.size(2)}, acc, grad_out.device(), "out");
  auto ep = make_embedding_plan(ids, num_embeddings, padding_idx, group, num_groups, sample_weight, acc);
  bool finite = true;
  switch (grad_out.scalar_type()) {
    case at::kDouble:
      finite = embedding_impl<double, double>(grad_out, ep, out);
      break;
    case at::kFloat:
      finite = embedding_impl<float, float>(grad_out, ep, out);
      break;
    case at::kBFloat16:
      finite = embedding_impl<float, c10::BFloat16>(grad_out, ep, out);
      break;
    case at::kHalf:
      finite = embedding_impl<float, c10::Half>(grad_out, ep, out);
      break;
    default:
      TORCH_CHECK_VALUE(false, "grad_out must be floating point, got ", grad_out.scalar_type());
  }
  // Only the rows this call updated are checked (a previous call checked the others).
  {
    TORCH_CHECK_VALUE(finite,
                      "out has non-finite values after accumulation: grad_out (or a previous `out`) contains NaN or "
                      "inf, or the squared gradients overflow");
  }
}

at::Tensor sq_grad_embedding_cpu(const at::Tensor& ids, const at::Tensor& grad_out, int64_t num_embeddings,
                                 c10::optional<int64_t> padding_idx, const c10::optional<at::Tensor>& group,
                                 int64_t num_groups, const c10::optional<at::Tensor>& sample_weight) {
  auto out = embedding_output(grad_out, num_embeddings, num_groups);
  sq_grad_embedding_accumulate_cpu(ids, grad_out, num_embeddings, padding_idx, group, num_groups, sample_weight, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("sq_grad_embedding", &sq_grad_embedding_cpu);
  m.impl("sq_grad_embedding_", &sq_grad_embedding_accumulate_cpu);
}

}  // namespace unlearn_ext
