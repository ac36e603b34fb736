// Shared input validation. Every message names the argument; shape/dtype/value problems raise
// ValueError in Python (TORCH_CHECK_VALUE), device problems RuntimeError (TORCH_CHECK).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace unlearn_ext {

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, name,
                    " must be a floating-point tensor (float32, float64, bfloat16 or float16), got ", dt);
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " is on ", a.device(), " but ", b_name, " is on ", b.device(),
              "; move them to the same device");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dimensions ", layout, ", got shape ", t.sizes());
}

// True when no element is NaN or +-inf: one min/max reduction (NaN propagates), no temporary the
// size of `t` (so it is cheap enough to run on every accumulator after every call).
inline bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  auto mm = at::aminmax(t);
  return at::isfinite(std::get<0>(mm)).item<bool>() && at::isfinite(std::get<1>(mm)).item<bool>();
}

// The accumulator dtype for an input dtype: float64 stays float64, everything else sums in float32.
inline at::ScalarType accum_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// `out` must be a contiguous accumulator of the expected shape and dtype on the inputs' device.
inline void check_accumulator(const at::Tensor& out, at::IntArrayRef shape, at::ScalarType dtype,
                              const at::Device& device, const char* name) {
  TORCH_CHECK_VALUE(out.sizes() == shape, name, " must have shape ", shape, ", got ", out.sizes());
  TORCH_CHECK_VALUE(out.scalar_type() == dtype, name, " must be ", dtype, " (the accumulator dtype), got ",
                    out.scalar_type());
  TORCH_CHECK(out.device() == device, name, " is on ", out.device(), " but the inputs are on ", device);
  TORCH_CHECK_VALUE(out.is_contiguous(), name, " must be contiguous");
}

// group: int [B] with values in [0, num_groups); sample_weight: float [B], finite.
inline void check_group_and_weight(const c10::optional<at::Tensor>& group, int64_t num_groups,
                                   const c10::optional<at::Tensor>& sample_weight, int64_t batch,
                                   const at::Device& device) {
  TORCH_CHECK_VALUE(num_groups >= 1, "num_groups must be at least 1, got ", num_groups);
  if (group.has_value()) {
    const auto& g = *group;
    TORCH_CHECK_VALUE(g.dim() == 1 && g.size(0) == batch, "group must have shape [", batch,
                      "] (one id per sample), got ", g.sizes());
    TORCH_CHECK_VALUE(!at::isFloatingType(g.scalar_type()) && g.scalar_type() != at::kBool,
                      "group must be an integer tensor, got ", g.scalar_type());
    TORCH_CHECK(g.device() == device, "group is on ", g.device(), " but the inputs are on ", device);
    if (batch > 0) {
      const auto lo = g.min().item<int64_t>();
      const auto hi = g.max().item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0, "group ids must be >= 0, got ", lo);
      TORCH_CHECK_VALUE(hi < num_groups, "group id ", hi, " is out of range for num_groups=", num_groups,
                        " (num_groups must exceed every group id)");
    }
  }
  if (sample_weight.has_value()) {
    const auto& w = *sample_weight;
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == batch, "sample_weight must have shape [", batch, "], got ",
                      w.sizes());
    TORCH_CHECK_VALUE(at::isFloatingType(w.scalar_type()), "sample_weight must be a floating-point tensor, got ",
                      w.scalar_type());
    TORCH_CHECK(w.device() == device, "sample_weight is on ", w.device(), " but the inputs are on ", device);
    if (batch > 0) {
      TORCH_CHECK_VALUE(at::isfinite(w).all().item<bool>(), "sample_weight contains NaN or inf");
    }
  }
}

}  // namespace unlearn_ext
