// Every op schema of unlearn_ext, in one place, plus the (tiny) Python module init of `_C`.
// Kernels live in cpu/*.cpp and cuda/*.cu and register per dispatch key; fake kernels and
// autograd formulas are registered from Python (unlearn_ext/ops/*.py).
#include <Python.h>
#include <torch/library.h>

#include <exception>

TORCH_LIBRARY(unlearn_ext, m) {
  // ---- squared per-sample gradients (diagonal Fisher), DESIGN.md 4.1 ----
  // x [B, T, d_in], grad_out [B, T, d_out] (any strides). Returns (F [K, d_out, d_in],
  // F_bias [K, d_out] or [K, 0] when with_bias is false); float64 for float64 inputs, else float32.
  // algorithm: "auto" | "segmented" | "hadamard" | "per_sample".
  m.def(
      "sq_grad_linear(Tensor x, Tensor grad_out, Tensor? group, int num_groups, Tensor? sample_weight, "
      "bool with_bias, str algorithm=\"auto\") -> (Tensor, Tensor)");
  m.def(
      "sq_grad_linear_(Tensor x, Tensor grad_out, Tensor? group, int num_groups, Tensor? sample_weight, "
      "Tensor(a!) out, Tensor(b!)? bias_out, str algorithm=\"auto\") -> ()");
  // x [B, C_in, H, W], grad_out [B, C_out, H_out, W_out]; F [K, C_out, C_in/groups, kh, kw].
  m.def(
      "sq_grad_conv2d(Tensor x, Tensor grad_out, int[] weight_shape, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, Tensor? group, int num_groups, Tensor? sample_weight, bool with_bias, "
      "str algorithm=\"auto\") -> (Tensor, Tensor)");
  m.def(
      "sq_grad_conv2d_(Tensor x, Tensor grad_out, int[] weight_shape, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, Tensor? group, int num_groups, Tensor? sample_weight, Tensor(a!) out, "
      "Tensor(b!)? bias_out, str algorithm=\"auto\") -> ()");
  // ids [B, T] (int32/int64), grad_out [B, T, d]; F [K, num_embeddings, d]. Gradient rows of an id
  // repeated inside a sample are summed before squaring; tokens equal to padding_idx are skipped.
  m.def(
      "sq_grad_embedding(Tensor ids, Tensor grad_out, int num_embeddings, int? padding_idx, Tensor? group, "
      "int num_groups, Tensor? sample_weight) -> Tensor");
  m.def(
      "sq_grad_embedding_(Tensor ids, Tensor grad_out, int num_embeddings, int? padding_idx, Tensor? group, "
      "int num_groups, Tensor? sample_weight, Tensor(a!) out) -> ()");

  // ---- masked KL fused with the LM heads (SIU's loss), DESIGN.md 4.2 ----
  // hidden [N, H], weight [V, H], ref_hidden [N, H_ref], ref_weight [V, H_ref]; token_mask bool [N],
  // vocab_mask bool [V], target int [N]. Returns (loss: [] for mean/sum, [N] for none; grad_hidden,
  // grad_weight, grad_bias: the loss's gradients that grad_mask (hidden, weight, bias) asks for, computed
  // in the forward (mean/sum only), the others empty; a frozen head needs no [V, H] weight gradient).
  m.def(
      "fused_linear_masked_kl(Tensor hidden, Tensor weight, Tensor? bias, Tensor ref_hidden, Tensor ref_weight, "
      "Tensor? ref_bias, Tensor? token_mask, Tensor? vocab_mask, Tensor? target, float kl_weight, float ce_weight, "
      "float temperature, int ignore_index, bool renormalize, str reduction, bool[3] grad_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // grad_kl [N] = dLoss/dKL_n, grad_ce [N] = dLoss/dCE_n; returns (grad_hidden, grad_weight, grad_bias), each
  // empty where output_mask says no (grad_bias also without a bias).
  m.def(
      "fused_linear_masked_kl_backward(Tensor grad_kl, Tensor grad_ce, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor ref_hidden, Tensor ref_weight, Tensor? ref_bias, Tensor? token_mask, Tensor? vocab_mask, "
      "Tensor? target, float temperature, int ignore_index, bool renormalize, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");

  // ---- cross-entropy fused with a norm penalty and the head (OPC's loss), DESIGN.md 4.3 ----
  // hidden [N, H], weight [V, H], bias [V], target int [N], forget_mask bool [N]. Returns (loss: [] for
  // mean/sum, [N] for none; grad_hidden, grad_weight, grad_bias: the loss's gradients that grad_mask
  // (hidden, weight, bias) asks for, computed in the forward (mean/sum only), the others empty).
  m.def(
      "fused_linear_ce_norm(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? forget_mask, "
      "float norm_weight, bool squared, int ignore_index, str reduction, bool[3] grad_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // grad_rows [N] = dLoss/d loss_n (the per-row losses of reduction 'none'); returns (grad_hidden,
  // grad_weight, grad_bias), each empty where output_mask says no.
  m.def(
      "fused_linear_ce_norm_backward(Tensor grad_rows, Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor? forget_mask, float norm_weight, bool squared, int ignore_index, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}

// ---- `unlearn_ext._C`: build information only (ops are reached through torch.ops) ----
namespace unlearn_ext {
const char* cpu_kernel_isa();  // csrc/cpu/sq_grad_segmented.cpp
}

namespace {
PyObject* build_info(PyObject*, PyObject*) {
#ifdef UNLEARN_EXT_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
#if defined(__AVX512F__)
  const char* compiled_isa = "avx512";
#elif defined(__AVX2__)
  const char* compiled_isa = "avx2";
#else
  const char* compiled_isa = "baseline";
#endif
  const char* cpu_isa = "unavailable";
  try {
    cpu_isa = unlearn_ext::cpu_kernel_isa();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  return Py_BuildValue("{s:O,s:s,s:s,s:s}", "with_cuda", with_cuda ? Py_True : Py_False, "compiled_isa",
                       compiled_isa, "cpu_kernel_isa", cpu_isa, "compiler", __VERSION__);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "Compile-time facts about this build of unlearn_ext._C."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "unlearn_ext compiled kernels (registered in torch.ops)",
                          -1, methods};
}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
