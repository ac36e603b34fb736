// What the fused LM-head losses share (fused_linear_masked_kl, fused_linear_ce_norm): the size of a
// chunk of tokens, the check of a per-token or per-vocabulary vector argument, and the sums of the
// head's weight and bias gradients over chunks.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "unlearn_ext/checks.h"

namespace unlearn_ext {

// Bytes of logits per chunk of tokens (per model), unless the op passes a smaller budget.
constexpr int64_t kHeadChunkBytes = 32 << 20;

// The environment variable `env_name` set to a row count (tests use it to run many chunks on small
// shapes); 0 when unset.
inline int64_t head_rows_from_env(const char* env_name) {
  const char* env = std::getenv(env_name);
  if (env == nullptr || env[0] == '\0') return 0;
  char* end = nullptr;
  const long long rows = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && rows >= 1, env_name, " must be a positive integer, got '", env,
                    "'");
  return rows;
}

// Tokens per chunk: about `budget_bytes` of logits, or the value of the environment variable
// `env_name`.
inline int64_t head_tokens_per_chunk(int64_t V, size_t elem_size, const char* env_name,
                                     int64_t budget_bytes = kHeadChunkBytes) {
  const int64_t forced = head_rows_from_env(env_name);
  if (forced > 0) return forced;
  return std::max<int64_t>(1, budget_bytes / (V * static_cast<int64_t>(elem_size)));
}

// Chunks over which a bfloat16/float16 weight gradient is summed in its own dtype. Each chunk's GEMM
// rounds the whole partial sum once more, and when the hidden states share a direction (LM hidden
// states do) the error grows with the number of chunks: against one GEMM's, up to 1.8x at 2 chunks,
// 2.1x at 3, 2.6x at 4 and 4.1x at 8 (bfloat16, 6 seeds, tests/ops/test_head_grad_sums.py). DESIGN.md 6
// allows 2x, so past 2 chunks the sums are kept in float32 and rounded once at the end.
constexpr int64_t kMaxLowPrecisionChunks = 2;

inline bool is_low_precision(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// On a GPU a chunk has at least this many tokens: each head GEMM of a chunk reads the whole [V, H]
// weight, and with M rows it does about M flops per byte read (bfloat16), so below a few hundred rows
// it is bound by memory, not by the tensor cores (an H100 needs about 300). 32 MiB of bfloat16 logits
// at V = 128256 would be 130 rows. The cost is memory: two 512-row buffers of logits are 263 MB at
// that V. (Reasoned from the GEMM shapes, not measured: no GPU has run this yet.)
constexpr int64_t kMinGpuChunkRows = 512;

// Tokens per chunk for `n` tokens of a [V, H] head, from `rows` (head_tokens_per_chunk). When a
// bfloat16/float16 weight gradient is computed, a chunk may hold up to a quarter of the weight's size
// in logits (the weight gradient, not the chunk, is then the working set): fewer chunks mean fewer
// passes over the float32 sums, and up to 2H/4 tokens need no float32 sums at all. On a GPU (`gpu`)
// a chunk has at least kMinGpuChunkRows tokens. A row count set in `env_name` is kept.
inline int64_t head_rows_for_grad(int64_t rows, int64_t n, int64_t H, at::ScalarType dtype, bool weight_grad,
                                  const char* env_name, bool gpu = false) {
  if (head_rows_from_env(env_name) == 0) {
    if (weight_grad && is_low_precision(dtype)) rows = std::max<int64_t>(rows, H / 4);
    if (gpu) rows = std::max<int64_t>(rows, kMinGpuChunkRows);
  }
  return std::max<int64_t>(1, std::min(rows, n));
}

// `t` is a 1-D tensor of `n` entries on `device`.
inline void check_vector(const at::Tensor& t, int64_t n, const char* name, const char* what,
                         const at::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "] (", what, "), got ", t.sizes());
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but hidden is on ", device);
}

// Which gradients of a head's loss are computed: grad_hidden, grad_weight, grad_bias (the ops' `bool[3]`
// grad_mask / output_mask). A frozen head (LoRA on the layers below, a linear probe's features) needs no
// [V, H] weight gradient, the largest buffer of the ops.
struct HeadGradMask {
  bool hidden = false, weight = false, bias = false;
  bool any() const { return hidden || weight || bias; }
};

// The mask for a head with or without a bias (a bias gradient is only computed when there is a bias).
inline HeadGradMask head_grad_mask(const std::array<bool, 3>& mask, bool has_bias) {
  return HeadGradMask{mask[0], mask[1], mask[2] && has_bias};
}

// (grad_hidden, grad_weight, grad_bias) as op outputs: each gradient, or (undefined: not computed) a
// distinct empty tensor, as outputs must not alias each other.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> grads_or_empty(const at::Tensor& gh, const at::Tensor& gw,
                                                                      const at::Tensor& gb,
                                                                      const at::TensorOptions& opts) {
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, opts); };
  return {or_empty(gh), or_empty(gw), or_empty(gb)};
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

// float16 logits overflow past 65504 even from finite inputs, and the row kernels would then return a
// wrong loss (a KL of 0 with NaN gradients). Each chunk's logits add their min and max (one reduction,
// NaN propagates) to a float32 scalar, which a finite chunk cannot overflow; check() syncs once.
class Float16Overflow {
 public:
  explicit Float16Overflow(const at::Tensor& like) : on_(like.scalar_type() == at::kHalf) {
    if (on_) acc_ = at::zeros({}, like.options().dtype(at::kFloat));
  }
  void add(const at::Tensor& z) {
    if (!on_ || z.numel() == 0) return;
    const auto mm = at::aminmax(z);
    acc_.add_(std::get<0>(mm).to(at::kFloat)).add_(std::get<1>(mm).to(at::kFloat));
  }
  void check() const {
    TORCH_CHECK_VALUE(!on_ || all_finite(acc_),
                      "the float16 logits overflowed (|hidden @ weight.T + bias| > 65504) although the inputs are "
                      "finite: use bfloat16 or float32");
  }

 private:
  bool on_;
  at::Tensor acc_;
};

// The weight and bias gradients of a head, summed over chunks of tokens: in place in their own dtype
// (float32/float64, or bfloat16/float16 over at most kMaxLowPrecisionChunks chunks), else in float32
// and rounded once by weight(). A bfloat16/float16 bias gradient is always summed in float32.
class HeadGradSums {
 public:
  // A [V, H] weight gradient when `weight` and a [V] bias gradient when `bias`, over `chunks` chunks of
  // tokens (nothing is allocated for a gradient that is not wanted).
  HeadGradSums(int64_t V, int64_t H, bool weight, bool bias, const at::TensorOptions& opts, int64_t chunks)
      : dtype_(opts.dtype().toScalarType()), weight_(weight), bias_(bias) {
    const bool low = is_low_precision(dtype_);
    if (weight) gw_ = at::empty({V, H}, (low && chunks > kMaxLowPrecisionChunks) ? opts.dtype(at::kFloat) : opts);
    if (bias) gb_ = at::empty({V}, low ? opts.dtype(at::kFloat) : opts);
  }

  // Adds one chunk: g = dLoss/dz [m, V] and the chunk's hidden states h [m, H] (the first call sets).
  void add(const at::Tensor& g, const at::Tensor& h) {
    const bool first = !started_;
    started_ = true;
    if (weight_ && gw_.scalar_type() == g.scalar_type()) {
      if (first) {
        at::mm_out(gw_, g.t(), h);
      } else {
        gw_.addmm_(g.t(), h);
      }
    } else if (weight_) {
      add_in_float32(g, h, first);
    }
    if (bias_) {
      if (first) {
        at::sum_out(gb_, g, 0, false, gb_.scalar_type());
      } else {
        gb_.add_(at::sum(g, 0, false, gb_.scalar_type()));
      }
    }
  }

  // The sums in the head's dtype (zeros when no chunk was added); undefined when not wanted.
  at::Tensor weight() const {
    if (!weight_) return at::Tensor();
    return started_ ? gw_.to(dtype_) : at::zeros(gw_.sizes(), gw_.options().dtype(dtype_));
  }
  at::Tensor bias() const {
    if (!bias_) return at::Tensor();
    return started_ ? gb_.to(dtype_) : at::zeros(gb_.sizes(), gb_.options().dtype(dtype_));
  }

 private:
  // gw_ (float32) += g^T h for bfloat16/float16 g and h: on CUDA, GEMMs with float32 output (ATen's
  // mm.dtype_out, torch >= 2.8) over slabs of vocabulary rows, so the temporary stays about
  // kHeadChunkBytes. (addmm.dtype_out would add in place, but some torch versions require its `self`
  // in the inputs' dtype.)
  void add_in_float32(const at::Tensor& g, const at::Tensor& h, bool first) {
    const int64_t V = gw_.size(0), H = gw_.size(1);
    if (!g.is_cuda()) {  // ATen has no float32-output GEMM for low-precision CPU tensors: upcast
      if (first) {
        at::mm_out(gw_, g.t().to(at::kFloat), h.to(at::kFloat));
      } else {
        gw_.addmm_(g.t().to(at::kFloat), h.to(at::kFloat));
      }
      return;
    }
    const int64_t slab = std::max<int64_t>(1, std::min<int64_t>(V, kHeadChunkBytes / (H * 4)));
    if (!first && !tmp_.defined()) tmp_ = at::empty({slab, H}, gw_.options());
    for (int64_t v0 = 0; v0 < V; v0 += slab) {
      const int64_t s = std::min(slab, V - v0);
      at::Tensor dst = gw_.narrow(0, v0, s);
      const at::Tensor gs = g.narrow(1, v0, s).t();
      if (first) {
        at::mm_out(dst, gs, h, at::kFloat);
      } else {
        at::Tensor t = tmp_.narrow(0, 0, s);
        at::mm_out(t, gs, h, at::kFloat);
        dst.add_(t);
      }
    }
  }

  at::ScalarType dtype_;
  bool weight_, bias_;
  bool started_ = false;
  at::Tensor gw_, gb_, tmp_;
};

// From a chunk's g = dLoss/dz ([m, V]): gh = g W (the chunk's rows of grad_hidden; skipped when `gh` is
// undefined), and the chunk added to the weight / bias gradient sums (when `sums` holds any).
inline void accumulate_head_grads(const at::Tensor& g, const at::Tensor& h, const at::Tensor& weight, at::Tensor gh,
                                  std::optional<HeadGradSums>& sums) {
  if (gh.defined()) at::mm_out(gh, g, weight);
  if (sums.has_value()) sums->add(g, h);
}

}  // namespace unlearn_ext
