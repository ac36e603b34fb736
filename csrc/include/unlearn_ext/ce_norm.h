// fused_linear_ce_norm (DESIGN.md 4.3): the pieces shared by the CPU and CUDA builds.
//
// The device-generic driver (csrc/ce_norm_common.cpp: validation, token chunks, the GEMMs of the
// head and of the gradients, all with ATen ops) calls one device `CENormRowKernel` per chunk: for every
// row of the chunk's logits z it computes the row's value (cross-entropy `logsumexp(z) - z_target` on
// a retained row; `||z||^2`, or `||z||` when not squared, on a forgotten row) and, when gradients are
// wanted, overwrites the row with `coef * d value / dz`.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>

namespace unlearn_ext {

struct CENormChunk {
  at::Tensor z;       // [m, V], the input dtype, contiguous: logits in, dLoss/dz out (when grad)
  at::Tensor target;  // int64 [m]: the class id of a retained row (unused on forgotten rows)
  at::Tensor forget;  // uint8 [m]: 1 for a forgotten row (norm penalty), 0 for a retained row (CE)
  at::Tensor coef;    // accumulation dtype [m]: dLoss/d value_n (grad only, else undefined)
  at::Tensor out;     // accumulation dtype [m]: value_n
  bool squared = true;
  bool grad = false;
};

using CENormRowKernel = void (*)(const CENormChunk& chunk);

// The forward op for a device: (loss, grad_hidden, grad_weight, grad_bias), the gradients grad_mask
// (hidden, weight, bias) asks for; see csrc/registration.cpp.
// `half_ok`: the device kernel takes bfloat16/float16 inputs (the CPU kernel takes float32/float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_norm_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& forget_mask, double norm_weight, bool squared,
    int64_t ignore_index, c10::string_view reduction, std::array<bool, 3> grad_mask, CENormRowKernel rows,
    bool half_ok);

// The backward op for a device: (grad_hidden, grad_weight, grad_bias), empty where output_mask says no.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_norm_backward(
    const at::Tensor& grad_rows, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& target, const c10::optional<at::Tensor>& forget_mask,
    double norm_weight, bool squared, int64_t ignore_index, std::array<bool, 3> output_mask, CENormRowKernel rows,
    bool half_ok);

}  // namespace unlearn_ext
