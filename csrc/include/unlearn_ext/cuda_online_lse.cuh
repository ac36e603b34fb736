// Device helpers the CUDA row kernels of the fused LM-head losses share (csrc/cuda/masked_kl.cu,
// csrc/cuda/ce_norm.cu): -inf of the accumulation type and the relative exponential of an online
// log-sum-exp state. Include only from .cu files (it uses __device__).
#pragma once

#include <limits>

namespace unlearn_ext {

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// e^(a - m) where m is the (finite or -inf) maximum the sum is kept relative to; 0 when a = -inf.
template <typename acc_t>
__device__ __forceinline__ acc_t rel_exp(acc_t a, acc_t m) {
  return a == neg_inf<acc_t>() ? acc_t(0) : exp(a - m);
}

}  // namespace unlearn_ext
