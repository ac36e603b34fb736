// CUDA row kernel of fused_linear_masked_kl (DESIGN.md 4.2). The chunk driver (cuBLAS GEMMs of both
// LM heads and of the gradients, through ATen) is csrc/masked_kl_common.cpp; the formulas are those
// of csrc/cpu/masked_kl.cpp.
//
// One block per token row. Sweep 1: each thread walks the row with a stride of the block size and
// keeps an online (running-max) state for both models at once: the current logits' softmax sum, the
// reference's softmax sum with its masked sum and masked sum of e^(t - m_t)(t - s) (all three rescaled
// together when the reference maximum moves), the temperature-1 softmax sum and target logit of the
// cross-entropy. The states are combined across the warp with shuffles and across warps in shared
// memory. Sweep 2 (gradients wanted) writes dLoss/dz over the logits in place, in the input dtype.
// Arithmetic is in float for bf16/fp16/float32 and in double for float64.
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

#include "unlearn_ext/cuda_online_lse.cuh"
#include "unlearn_ext/masked_kl.h"

namespace unlearn_ext {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <typename acc_t>
struct RowState {
  acc_t ms, ss;          // current model: running max of s = z / T, sum of e^(s - ms)
  acc_t mt, st, sm, sx;  // reference: running max of t, sum of e^(t - mt), masked sum, masked sum * (t - s)
  acc_t mc, sc;          // cross-entropy: running max of z, sum of e^(z - mc)
  acc_t zt;              // the target's logit
};

template <typename acc_t>
__device__ __forceinline__ void combine(RowState<acc_t>& a, const RowState<acc_t>& b) {
  {
    const acc_t m = a.ms > b.ms ? a.ms : b.ms;
    a.ss = a.ss * rel_exp(a.ms, m) + b.ss * rel_exp(b.ms, m);
    a.ms = m;
  }
  {
    const acc_t m = a.mt > b.mt ? a.mt : b.mt;
    const acc_t fa = rel_exp(a.mt, m), fb = rel_exp(b.mt, m);
    a.st = a.st * fa + b.st * fb;
    a.sm = a.sm * fa + b.sm * fb;
    a.sx = a.sx * fa + b.sx * fb;
    a.mt = m;
  }
  {
    const acc_t m = a.mc > b.mc ? a.mc : b.mc;
    a.sc = a.sc * rel_exp(a.mc, m) + b.sc * rel_exp(b.mc, m);
    a.mc = m;
  }
  a.zt += b.zt;
}

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> shfl_down(const RowState<acc_t>& s, int offset) {
  RowState<acc_t> o;
  o.ms = __shfl_down_sync(0xffffffffu, s.ms, offset);
  o.ss = __shfl_down_sync(0xffffffffu, s.ss, offset);
  o.mt = __shfl_down_sync(0xffffffffu, s.mt, offset);
  o.st = __shfl_down_sync(0xffffffffu, s.st, offset);
  o.sm = __shfl_down_sync(0xffffffffu, s.sm, offset);
  o.sx = __shfl_down_sync(0xffffffffu, s.sx, offset);
  o.mc = __shfl_down_sync(0xffffffffu, s.mc, offset);
  o.sc = __shfl_down_sync(0xffffffffu, s.sc, offset);
  o.zt = __shfl_down_sync(0xffffffffu, s.zt, offset);
  return o;
}

// Add x to a running (max m, sum s of e^(x - m)) pair: the current model's softmax and the CE's.
template <typename acc_t>
__device__ __forceinline__ void add_online(acc_t& m, acc_t& s, acc_t x) {
  if (x > m) {
    s = s * rel_exp(m, x) + acc_t(1);
    m = x;
  } else {
    s += exp(x - m);
  }
}

template <typename acc_t>
__device__ __forceinline__ void add_reference(RowState<acc_t>& st, acc_t t, acc_t k, acc_t t_minus_s) {
  if (t > st.mt) {
    const acc_t f = rel_exp(st.mt, t);
    st.st = st.st * f + acc_t(1);
    st.sm = st.sm * f + k;
    st.sx = st.sx * f + k * t_minus_s;
    st.mt = t;
  } else {
    const acc_t e = exp(t - st.mt);
    st.st += e;
    st.sm += k * e;
    st.sx += k * e * t_minus_s;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t coef_at(const acc_t* p, int64_t row) {
  return p != nullptr ? p[row] : acc_t(0);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    masked_kl_rows_kernel(scalar_t* __restrict__ z_all, const scalar_t* __restrict__ r_all,
                          const acc_t* __restrict__ vmask, const int64_t* __restrict__ target,
                          const uint8_t* __restrict__ kl_row, const acc_t* __restrict__ kl_coef,
                          const acc_t* __restrict__ ce_coef, acc_t* __restrict__ kl_out, acc_t* __restrict__ ce_out,
                          int64_t V, acc_t inv_t, bool any_kept, bool renorm, bool grad) {
  const int64_t row = blockIdx.x;
  scalar_t* z = z_all + row * V;
  const scalar_t* r = r_all != nullptr ? r_all + row * V : nullptr;
  const int64_t tgt = target[row];
  const bool want_kl = r != nullptr && kl_row[row] != 0 && any_kept;
  const bool want_ce = tgt >= 0;
  const bool renorm_kl = renorm && vmask != nullptr;

  RowState<acc_t> st{neg_inf<acc_t>(), 0, neg_inf<acc_t>(), 0, 0, 0, neg_inf<acc_t>(), 0, 0};
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const acc_t zv = static_cast<acc_t>(z[v]);
    if (want_kl) {
      const acc_t k = vmask != nullptr ? vmask[v] : acc_t(1);
      if (!renorm_kl || k != acc_t(0)) {
        const acc_t s = zv * inv_t, t = static_cast<acc_t>(r[v]) * inv_t;
        add_online(st.ms, st.ss, s);
        add_reference(st, t, k, t - s);
      }
    }
    if (want_ce) {
      add_online(st.mc, st.sc, zv);
      if (v == tgt) st.zt = zv;
    }
  }
  // Block reduction: warp shuffles, then one state per warp through shared memory.
  for (int offset = 16; offset > 0; offset >>= 1) combine(st, shfl_down(st, offset));
  __shared__ RowState<acc_t> warp_states[kWarps];
  __shared__ acc_t shared_out[6];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    RowState<acc_t> total = warp_states[0];
    for (int w = 1; w < kWarps; ++w) combine(total, warp_states[w]);
    const bool kl_ok = want_kl && total.st > acc_t(0);
    acc_t kl = 0, ce = 0, lse_s = 0, lse_t = 0, pm = 0, lse_c = 0;
    if (kl_ok) {
      lse_s = total.ms + log(total.ss);
      lse_t = total.mt + log(total.st);
      pm = total.sm / total.st;
      kl = total.sx / total.st - (lse_t - lse_s) * pm;
    }
    if (want_ce) {
      lse_c = total.mc + log(total.sc);
      ce = lse_c - total.zt;
    }
    kl_out[row] = kl;
    ce_out[row] = ce;
    shared_out[0] = kl_ok ? coef_at(kl_coef, row) * inv_t : acc_t(0);
    shared_out[1] = want_ce ? coef_at(ce_coef, row) : acc_t(0);
    shared_out[2] = lse_s;
    shared_out[3] = lse_t;
    shared_out[4] = pm;
    shared_out[5] = lse_c;
  }
  if (!grad) return;
  __syncthreads();
  const acc_t a = shared_out[0], c = shared_out[1];
  const acc_t lse_s = shared_out[2], lse_t = shared_out[3], pm = shared_out[4], lse_c = shared_out[5];
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const acc_t zv = static_cast<acc_t>(z[v]);
    acc_t g = 0;
    if (a != acc_t(0)) {
      const acc_t k = vmask != nullptr ? vmask[v] : acc_t(1);
      const acc_t q = exp(min(zv * inv_t - lse_s, acc_t(0)));
      const acc_t p = exp(min(static_cast<acc_t>(r[v]) * inv_t - lse_t, acc_t(0)));
      g = renorm_kl ? a * k * (q - p) : a * (pm * q - k * p);
    }
    if (c != acc_t(0)) g += c * (exp(min(zv - lse_c, acc_t(0))) - (v == tgt ? acc_t(1) : acc_t(0)));
    z[v] = static_cast<scalar_t>(g);
  }
}

void cuda_rows(const MaskedKLChunk& c) {
  const int64_t rows = c.z.size(0), V = c.z.size(1);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(c.z.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.z.scalar_type(), "masked_kl_rows_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    masked_kl_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        c.z.data_ptr<scalar_t>(), c.r.defined() ? c.r.data_ptr<scalar_t>() : nullptr,
        c.vmask.defined() ? c.vmask.data_ptr<acc_t>() : nullptr, c.target.data_ptr<int64_t>(),
        c.kl_row.data_ptr<uint8_t>(), c.grad ? c.kl_coef.data_ptr<acc_t>() : nullptr,
        c.grad ? c.ce_coef.data_ptr<acc_t>() : nullptr, c.kl_out.data_ptr<acc_t>(), c.ce_out.data_ptr<acc_t>(), V,
        static_cast<acc_t>(c.inv_t), c.any_kept, c.renorm, c.grad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_masked_kl_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& ref_hidden, const at::Tensor& ref_weight, const c10::optional<at::Tensor>& ref_bias,
    const c10::optional<at::Tensor>& token_mask, const c10::optional<at::Tensor>& vocab_mask,
    const c10::optional<at::Tensor>& target, double kl_weight, double ce_weight, double temperature,
    int64_t ignore_index, bool renormalize, c10::string_view reduction, std::array<bool, 3> grad_mask) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return masked_kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask, target,
                           kl_weight, ce_weight, temperature, ignore_index, renormalize, reduction, grad_mask,
                           &cuda_rows, /*half_ok=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_masked_kl_backward_cuda(
    const at::Tensor& grad_kl, const at::Tensor& grad_ce, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& ref_hidden, const at::Tensor& ref_weight,
    const c10::optional<at::Tensor>& ref_bias, const c10::optional<at::Tensor>& token_mask,
    const c10::optional<at::Tensor>& vocab_mask, const c10::optional<at::Tensor>& target, double temperature,
    int64_t ignore_index, bool renormalize, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return masked_kl_backward(grad_kl, grad_ce, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask,
                            vocab_mask, target, temperature, ignore_index, renormalize, output_mask, &cuda_rows,
                            /*half_ok=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) {
  m.impl("fused_linear_masked_kl", &fused_linear_masked_kl_cuda);
  m.impl("fused_linear_masked_kl_backward", &fused_linear_masked_kl_backward_cuda);
}

}  // namespace unlearn_ext
