// CUDA row kernel of fused_linear_ce_norm (DESIGN.md 4.3). The chunk driver (cuBLAS GEMMs of the head
// and of the gradients, through ATen) is csrc/ce_norm_common.cpp; the formulas are those of
// csrc/cpu/ce_norm.cpp.
//
// One block per row. Sweep 1: each thread walks the row with a stride of the block size and keeps
// either an online log-sum-exp state (running max, sum of e^(z - max), the target's logit) for a
// retained row or a sum of squares for a forgotten row; the states are combined across the warp with
// shuffles and across warps in shared memory. Sweep 2 (gradients wanted) writes coef * dvalue/dz over
// the logits in place, in the input dtype. Arithmetic is in float for bf16/fp16/float32 and in double
// for float64.
//
// CUDA headers: c10/cuda only, as in sq_grad.cu (ATen/cuda/CUDAContext.h needs the cuBLAS/cuSPARSE
// headers, which the compile check's bare nvcc toolkit lacks).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <limits>
#include <tuple>

#include "unlearn_ext/ce_norm.h"
#include "unlearn_ext/cuda_online_lse.cuh"

namespace unlearn_ext {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <typename acc_t>
struct RowState {
  acc_t m, s;  // running max of z, sum of e^(z - m) (retained row)
  acc_t zt;    // the target's logit (retained row)
  acc_t ss;    // sum of z^2 (forgotten row)
};

template <typename acc_t>
__device__ __forceinline__ void combine(RowState<acc_t>& a, const RowState<acc_t>& b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  a.s = a.s * rel_exp(a.m, m) + b.s * rel_exp(b.m, m);
  a.m = m;
  a.zt += b.zt;
  a.ss += b.ss;
}

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> shfl_down(const RowState<acc_t>& s, int offset) {
  RowState<acc_t> o;
  o.m = __shfl_down_sync(0xffffffffu, s.m, offset);
  o.s = __shfl_down_sync(0xffffffffu, s.s, offset);
  o.zt = __shfl_down_sync(0xffffffffu, s.zt, offset);
  o.ss = __shfl_down_sync(0xffffffffu, s.ss, offset);
  return o;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ce_norm_rows_kernel(scalar_t* __restrict__ z_all, const int64_t* __restrict__ target,
                        const uint8_t* __restrict__ forget_rows, const acc_t* __restrict__ coef,
                        acc_t* __restrict__ out, int64_t V, bool squared) {
  const int64_t row = blockIdx.x;
  scalar_t* z = z_all + row * V;
  const int64_t tgt = target[row];
  const bool forget = forget_rows[row] != 0;

  RowState<acc_t> st{neg_inf<acc_t>(), 0, 0, 0};
  if (forget) {
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      const acc_t zv = static_cast<acc_t>(z[v]);
      st.ss += zv * zv;
    }
  } else {
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      const acc_t zv = static_cast<acc_t>(z[v]);
      if (zv > st.m) {
        st.s = st.s * rel_exp(st.m, zv) + acc_t(1);
        st.m = zv;
      } else {
        st.s += exp(zv - st.m);
      }
      if (v == tgt) st.zt = zv;
    }
  }
  // Block reduction: warp shuffles, then one state per warp through shared memory.
  for (int offset = 16; offset > 0; offset >>= 1) combine(st, shfl_down(st, offset));
  __shared__ RowState<acc_t> warp_states[kWarps];
  __shared__ acc_t shared_out[2];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    RowState<acc_t> total = warp_states[0];
    for (int w = 1; w < kWarps; ++w) combine(total, warp_states[w]);
    acc_t value, scale = 0, lse = 0;
    const acc_t c = coef != nullptr ? coef[row] : acc_t(0);
    if (forget) {
      const acc_t norm = sqrt(total.ss);
      value = squared ? total.ss : norm;
      scale = squared ? acc_t(2) * c : (norm > acc_t(0) ? c / norm : acc_t(0));
    } else {
      lse = total.m + log(total.s);
      value = lse - total.zt;
      scale = c;
    }
    out[row] = value;
    shared_out[0] = scale;
    shared_out[1] = lse;
  }
  if (coef == nullptr) return;
  __syncthreads();
  const acc_t scale = shared_out[0], lse = shared_out[1];
  if (forget) {
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      z[v] = static_cast<scalar_t>(scale * static_cast<acc_t>(z[v]));
    }
  } else {
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      const acc_t zv = static_cast<acc_t>(z[v]);
      z[v] = static_cast<scalar_t>(scale * (exp(min(zv - lse, acc_t(0))) - (v == tgt ? acc_t(1) : acc_t(0))));
    }
  }
}

void cuda_rows(const CENormChunk& c) {
  const int64_t rows = c.z.size(0), V = c.z.size(1);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(c.z.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.z.scalar_type(), "ce_norm_rows_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ce_norm_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        c.z.data_ptr<scalar_t>(), c.target.data_ptr<int64_t>(), c.forget.data_ptr<uint8_t>(),
        c.grad ? c.coef.data_ptr<acc_t>() : nullptr, c.out.data_ptr<acc_t>(), V, c.squared);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_ce_norm_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& forget_mask, double norm_weight, bool squared,
    int64_t ignore_index, c10::string_view reduction, std::array<bool, 3> grad_mask) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return ce_norm_forward(hidden, weight, bias, target, forget_mask, norm_weight, squared, ignore_index, reduction,
                         grad_mask, &cuda_rows, /*half_ok=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_ce_norm_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& target, const c10::optional<at::Tensor>& forget_mask,
    double norm_weight, bool squared, int64_t ignore_index, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return ce_norm_backward(grad_rows, hidden, weight, bias, target, forget_mask, norm_weight, squared, ignore_index,
                          output_mask, &cuda_rows, /*half_ok=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) {
  m.impl("fused_linear_ce_norm", &fused_linear_ce_norm_cuda);
  m.impl("fused_linear_ce_norm_backward", &fused_linear_ce_norm_backward_cuda);
}

}  // namespace unlearn_ext
