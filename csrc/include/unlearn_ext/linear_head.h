// What the fused LM-head losses share (fused_linear_masked_kl, fused_linear_ce_norm): the size of a
// chunk of tokens and the check of a per-token or per-vocabulary vector argument.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace unlearn_ext {

// Bytes of logits per chunk of tokens (per model), unless the op passes a smaller budget.
constexpr int64_t kHeadChunkBytes = 32 << 20;

// Tokens per chunk: about `budget_bytes` of logits, or the value of the environment variable
// `env_name` (tests use it to run many chunks on small shapes).
inline int64_t head_tokens_per_chunk(int64_t V, size_t elem_size, const char* env_name,
                                     int64_t budget_bytes = kHeadChunkBytes) {
  const char* env = std::getenv(env_name);
  if (env != nullptr && env[0] != '\0') {
    char* end = nullptr;
    const long long rows = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && rows >= 1, env_name, " must be a positive integer, got '", env,
                      "'");
    return rows;
  }
  return std::max<int64_t>(1, budget_bytes / (V * static_cast<int64_t>(elem_size)));
}

// `t` is a 1-D tensor of `n` entries on `device`.
inline void check_vector(const at::Tensor& t, int64_t n, const char* name, const char* what,
                         const at::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "] (", what, "), got ", t.sizes());
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but hidden is on ", device);
}

enum class Reduction { kNone, kMean, kSum };

inline Reduction parse_reduction(c10::string_view reduction) {
  const std::string r(reduction);
  if (r == "none") return Reduction::kNone;
  if (r == "mean") return Reduction::kMean;
  if (r == "sum") return Reduction::kSum;
  TORCH_CHECK_VALUE(false, "reduction must be 'mean', 'sum' or 'none', got '", r, "'");
}

// z = h W^T + b into the chunk buffer `z` ([m, V]); `bias` undefined for none.
inline void head_logits_into(at::Tensor& z, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias) {
  if (bias.defined()) {
    at::addmm_out(z, bias, h, weight.t());
  } else {
    at::mm_out(z, h, weight.t());
  }
}

// From a chunk's g = dLoss/dz ([m, V]): gh = g W (the chunk's rows of grad_hidden); grad_weight
// (and grad_bias when defined) set by the first chunk, accumulated by the others.
inline void accumulate_head_grads(const at::Tensor& g, const at::Tensor& h, const at::Tensor& weight, at::Tensor gh,
                                  at::Tensor& gw, at::Tensor& gb, bool first) {
  at::mm_out(gh, g, weight);
  if (first) {
    at::mm_out(gw, g.t(), h);
    if (gb.defined()) at::sum_out(gb, g, 0);
  } else {
    gw.addmm_(g.t(), h);
    if (gb.defined()) gb.add_(g.sum(0));
  }
}

}  // namespace unlearn_ext
