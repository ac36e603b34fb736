// Squared per-sample gradients (diagonal Fisher): the pieces shared by the CPU and CUDA builds.
//
// The device-generic parts (validation, sample ordering, the Hadamard and per-sample algorithms,
// bias terms, the conv2d lowering) live in csrc/sq_grad_common.cpp and are written with ATen ops.
// Each device provides one `SegmentedKernel`: the segmented-K GEMM that, per output tile, loops
// over samples, reduces each sample's T rows into an accumulator, squares it and adds it in.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace unlearn_ext {

// Samples sorted by group (stable), with zero-weight samples dropped.
struct SamplePlan {
  at::Tensor order;           // int64 [S] sample indices into the batch, grouped by group id
  at::Tensor weight;          // accumulator dtype [S], the sample weights in `order`'s order
  at::Tensor group;           // int64 [S], the group id of each sample in `order`'s order (non-decreasing)
  at::Tensor seg_start;       // int64 [K + 1] on the inputs' device: group k owns order[seg_start[k]:seg_start[k+1]]
  at::Tensor seg_start_cpu;   // the same on the CPU
  bool unit_weight = true;    // every weight is exactly 1
};

SamplePlan make_sample_plan(int64_t batch, const c10::optional<at::Tensor>& group, int64_t num_groups,
                            const c10::optional<at::Tensor>& sample_weight, const at::TensorOptions& index_options,
                            at::ScalarType acc_dtype);

// out[k] += sum over s in group k of plan.weight[s] * (g3[order[s]]^T x3[order[s]])**2, elementwise.
// x3 [B, T, d_in] and g3 [B, T, d_out] may have any strides; out3 [K, d_out, d_in] has unit stride in
// its last dimension (any stride in the first two). Every sample in `plan` is processed.
using SegmentedKernel = void (*)(const at::Tensor& x3, const at::Tensor& g3, const SamplePlan& plan,
                                 at::Tensor& out3);

// What a device offers: its segmented kernel and the shape policy of algorithm="auto"
// (T <= hadamard_max_tokens: Hadamard expansion; else T <= segmented_max_tokens: segmented;
// else one GEMM per sample).
// Conv2d with algorithm="auto" runs one weight-gradient convolution per sample (oneDNN / cuDNN
// implicit GEMM, no im2col) when H_out * W_out >= conv_per_sample_min_tokens.
struct SqGradBackend {
  SegmentedKernel segmented;
  int64_t hadamard_max_tokens;
  int64_t segmented_max_tokens;
  int64_t conv_per_sample_min_tokens;
};

// The full linear accumulation, with algorithm choice ("auto" | "segmented" | "hadamard" | "per_sample").
void sq_grad_linear_accumulate(const at::Tensor& x, const at::Tensor& grad_out, const c10::optional<at::Tensor>& group,
                               int64_t num_groups, const c10::optional<at::Tensor>& sample_weight, at::Tensor& out,
                               const c10::optional<at::Tensor>& bias_out, const std::string& algorithm,
                               const SqGradBackend& backend);

std::tuple<at::Tensor, at::Tensor> sq_grad_linear_functional(const at::Tensor& x, const at::Tensor& grad_out,
                                                             const c10::optional<at::Tensor>& group, int64_t num_groups,
                                                             const c10::optional<at::Tensor>& sample_weight,
                                                             bool with_bias, const std::string& algorithm,
                                                             const SqGradBackend& backend);

void sq_grad_conv2d_accumulate(const at::Tensor& x, const at::Tensor& grad_out, at::IntArrayRef weight_shape,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               const c10::optional<at::Tensor>& group, int64_t num_groups,
                               const c10::optional<at::Tensor>& sample_weight, at::Tensor& out,
                               const c10::optional<at::Tensor>& bias_out, const std::string& algorithm,
                               const SqGradBackend& backend);

std::tuple<at::Tensor, at::Tensor> sq_grad_conv2d_functional(
    const at::Tensor& x, const at::Tensor& grad_out, at::IntArrayRef weight_shape, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const c10::optional<at::Tensor>& group,
    int64_t num_groups, const c10::optional<at::Tensor>& sample_weight, bool with_bias, const std::string& algorithm,
    const SqGradBackend& backend);

// Embedding: validation and the (sample, id) ordering shared by the CPU and CUDA kernels.
struct EmbeddingPlan {
  at::Tensor token_order;  // int64 [M]: flat token indices (b * T + t) sorted by (group * V + id, plan
                           // position); padding dropped
  at::Tensor sorted_ids;   // int64 [M]: ids in that order
  at::Tensor token_sample; // int64 [M]: position in SamplePlan::order of each token's sample
  SamplePlan samples;
};

void check_embedding_args(const at::Tensor& ids, const at::Tensor& grad_out, int64_t num_embeddings,
                          const c10::optional<int64_t>& padding_idx, const c10::optional<at::Tensor>& group,
                          int64_t num_groups, const c10::optional<at::Tensor>& sample_weight);

// The zero-initialised output of the functional embedding op ([K, num_embeddings, d], accumulator dtype).
at::Tensor embedding_output(const at::Tensor& grad_out, int64_t num_embeddings, int64_t num_groups);

EmbeddingPlan make_embedding_plan(const at::Tensor& ids, int64_t num_embeddings, const c10::optional<int64_t>& padding_idx,
                                  const c10::optional<at::Tensor>& group, int64_t num_groups,
                                  const c10::optional<at::Tensor>& sample_weight, at::ScalarType acc_dtype);

}  // namespace unlearn_ext
