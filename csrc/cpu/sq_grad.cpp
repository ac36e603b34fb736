// CPU registrations of the squared per-sample gradient ops (linear, conv2d): the device-generic
// wrappers of sq_grad_common.cpp with the CPU segmented kernel of sq_grad_segmented.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "unlearn_ext/sq_grad.h"

namespace unlearn_ext {

void segmented_cpu(const at::Tensor& x3, const at::Tensor& g3, const SamplePlan& plan, at::Tensor& out3);

namespace {

// algorithm="auto" on the CPU: the packed segmented microkernel up to T = 512 tokens per sample
// (at T = 1 it runs the single GEMM (G*G)^T (X*X) on squared operands); longer samples use one
// BLAS GEMM per sample, which is as fast there and needs no packing of a whole sample.
// Measured at d_in=512, d_out=1024, 8192 tokens, 2 threads (benchmarks/bench_fisher.py).
// Conv2d: one oneDNN weight-gradient convolution per sample from 32 output positions up (at
// H_out*W_out = 16 the im2col + segmented path is faster; at 64 and more the per-sample convolution).
const SqGradBackend kCpuBackend{&segmented_cpu, /*hadamard_max_tokens=*/0, /*segmented_max_tokens=*/512,
                                /*conv_per_sample_min_tokens=*/32};

std::tuple<at::Tensor, at::Tensor> sq_grad_linear_cpu(const at::Tensor& x, const at::Tensor& grad_out,
                                                      const c10::optional<at::Tensor>& group, int64_t num_groups,
                                                      const c10::optional<at::Tensor>& sample_weight, bool with_bias,
                                                      c10::string_view algorithm) {
  return sq_grad_linear_functional(x, grad_out, group, num_groups, sample_weight, with_bias, std::string(algorithm),
                                   kCpuBackend);
}

void sq_grad_linear_accumulate_cpu(const at::Tensor& x, const at::Tensor& grad_out,
                                   const c10::optional<at::Tensor>& group, int64_t num_groups,
                                   const c10::optional<at::Tensor>& sample_weight, at::Tensor out,
                                   const c10::optional<at::Tensor>& bias_out, c10::string_view algorithm) {
  sq_grad_linear_accumulate(x, grad_out, group, num_groups, sample_weight, out, bias_out, std::string(algorithm),
                            kCpuBackend);
}

std::tuple<at::Tensor, at::Tensor> sq_grad_conv2d_cpu(const at::Tensor& x, const at::Tensor& grad_out,
                                                      at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                      const c10::optional<at::Tensor>& group, int64_t num_groups,
                                                      const c10::optional<at::Tensor>& sample_weight, bool with_bias,
                                                      c10::string_view algorithm) {
  return sq_grad_conv2d_functional(x, grad_out, weight_shape, stride, padding, dilation, groups, group, num_groups,
                                   sample_weight, with_bias, std::string(algorithm), kCpuBackend);
}

void sq_grad_conv2d_accumulate_cpu(const at::Tensor& x, const at::Tensor& grad_out, at::IntArrayRef weight_shape,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, const c10::optional<at::Tensor>& group, int64_t num_groups,
                                   const c10::optional<at::Tensor>& sample_weight, at::Tensor out,
                                   const c10::optional<at::Tensor>& bias_out, c10::string_view algorithm) {
  sq_grad_conv2d_accumulate(x, grad_out, weight_shape, stride, padding, dilation, groups, group, num_groups,
                            sample_weight, out, bias_out, std::string(algorithm), kCpuBackend);
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("sq_grad_linear", &sq_grad_linear_cpu);
  m.impl("sq_grad_linear_", &sq_grad_linear_accumulate_cpu);
  m.impl("sq_grad_conv2d", &sq_grad_conv2d_cpu);
  m.impl("sq_grad_conv2d_", &sq_grad_conv2d_accumulate_cpu);
}

}  // namespace unlearn_ext
