// fused_linear_masked_kl (DESIGN.md 4.2): the pieces shared by the CPU and CUDA builds.
//
// The device-generic driver (csrc/masked_kl_common.cpp: validation, token chunks, the GEMMs of both
// LM heads and of the gradients, all with ATen ops) calls one device `MaskedKLRowKernel` per chunk:
// for every row of the chunk's logits it computes KL_n and CE_n and, when gradients are wanted,
// overwrites the row with dLoss/dz (see csrc/cpu/masked_kl.cpp for the formulas).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>

namespace unlearn_ext {

struct MaskedKLChunk {
  at::Tensor z;        // [m, V], the input dtype, contiguous: current logits in, dLoss/dz out (when grad)
  at::Tensor r;        // [m, V] reference logits, or undefined when no row of the chunk is in the KL
  at::Tensor vmask;    // [V] accumulation dtype (1 kept, 0 not), or undefined (every entry kept)
  at::Tensor target;   // int64 [m]: class id, or -1 for no CE on the row
  at::Tensor kl_row;   // uint8 [m]: 1 when the row is in the KL
  at::Tensor kl_coef;  // accumulation dtype [m]: dLoss/dKL_n (grad only, else undefined)
  at::Tensor ce_coef;  // accumulation dtype [m]: dLoss/dCE_n (grad only, else undefined)
  at::Tensor kl_out;   // accumulation dtype [m]
  at::Tensor ce_out;   // accumulation dtype [m]
  bool any_kept = true;  // vmask has a kept entry (or is absent)
  double inv_t = 1.0;    // 1 / temperature
  bool renorm = false;   // softmaxes of the KL over the kept entries only (only with a vmask)
  bool grad = false;
};

using MaskedKLRowKernel = void (*)(const MaskedKLChunk& chunk);

// The forward op for a device: (loss, grad_hidden, grad_weight, grad_bias), the gradients grad_mask
// (hidden, weight, bias) asks for; see csrc/registration.cpp.
// `half_ok`: the device kernel takes bfloat16/float16 inputs (the CPU kernel takes float32/float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_kl_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& ref_hidden, const at::Tensor& ref_weight, const c10::optional<at::Tensor>& ref_bias,
    const c10::optional<at::Tensor>& token_mask, const c10::optional<at::Tensor>& vocab_mask,
    const c10::optional<at::Tensor>& target, double kl_weight, double ce_weight, double temperature,
    int64_t ignore_index, bool renormalize, c10::string_view reduction, std::array<bool, 3> grad_mask,
    MaskedKLRowKernel rows, bool half_ok);

// The backward op for a device: (grad_hidden, grad_weight, grad_bias), empty where output_mask says no.
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_kl_backward(
    const at::Tensor& grad_kl, const at::Tensor& grad_ce, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& ref_hidden, const at::Tensor& ref_weight,
    const c10::optional<at::Tensor>& ref_bias, const c10::optional<at::Tensor>& token_mask,
    const c10::optional<at::Tensor>& vocab_mask, const c10::optional<at::Tensor>& target, double temperature,
    int64_t ignore_index, bool renormalize, std::array<bool, 3> output_mask, MaskedKLRowKernel rows, bool half_ok);

}  // namespace unlearn_ext
