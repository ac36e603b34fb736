// CUDA kernel of sq_grad_embedding: F[k, v] += w_b * (sum of grad_out rows of sample b whose id is v)**2.
// Tokens are ordered by (sample, id) once (sq_grad_common.cpp, with ATen ops on the device); runs of
// equal (sample, id) are found with ATen ops too, and one kernel sums each run's gradient rows,
// squares them, weights them and adds them atomically to the run's row of F (runs of different
// samples of one group can share an id, hence the atomics).
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

#include <algorithm>
#include <cstdint>
#include <limits>

#include "unlearn_ext/checks.h"
#include "unlearn_ext/sq_grad.h"

namespace unlearn_ext {
namespace {

constexpr int kEmbeddingThreads = 256;

// Block: blockDim.x threads along the columns (a power of two from 32 to 256, the smallest that
// covers d, so narrow tables waste few threads) times blockDim.y = 256 / blockDim.x runs.
// Thread (x, y) of block (bx, by) handles run r = bx * blockDim.y + y and column c = by * blockDim.x + x:
//     acc = sum over m in [run_start[r], run_start[r + 1]) of grad_out[b_m, t_m, c]
//     (b_m, t_m) = divmod(token_order[m], T)
//     atomicAdd(out[group[s], sorted_ids[m0], c], weight[s] * acc * acc),  s = token_sample[m0]
// in acc_t (float for bf16/fp16/float32, double for float64). Consecutive threads read consecutive
// columns of one gradient row (coalesced when grad_out's last stride is 1) and add to consecutive
// columns of one row of out. No shared memory.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kEmbeddingThreads)
    sq_grad_embedding_kernel(const scalar_t* __restrict__ grad_out, acc_t* __restrict__ out,
                             const int64_t* __restrict__ token_order, const int64_t* __restrict__ sorted_ids,
                             const int64_t* __restrict__ token_sample, const int64_t* __restrict__ run_start,
                             const acc_t* __restrict__ weight, const int64_t* __restrict__ group, int64_t num_runs,
                             int64_t T, int64_t d, int64_t V, int64_t gs0, int64_t gs1, int64_t gs2) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (r >= num_runs || c >= d) return;
  const int64_t m0 = run_start[r], m1 = run_start[r + 1];
  acc_t acc = acc_t(0);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t tok = token_order[m];
    const int64_t b = tok / T, t = tok - b * T;
    acc += static_cast<acc_t>(grad_out[b * gs0 + t * gs1 + c * gs2]);
  }
  const int64_t s = token_sample[m0];
  atomicAdd(out + (group[s] * V + sorted_ids[m0]) * d + c, weight[s] * acc * acc);
}

void sq_grad_embedding_accumulate_cuda(const at::Tensor& ids, const at::Tensor& grad_out, int64_t num_embeddings,
                                       c10::optional<int64_t> padding_idx, const c10::optional<at::Tensor>& group,
                                       int64_t num_groups, const c10::optional<at::Tensor>& sample_weight,
                                       at::Tensor out) {
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  check_embedding_args(ids, grad_out, num_embeddings, padding_idx, group, num_groups, sample_weight);
  const auto acc = accum_dtype(grad_out.scalar_type());
  check_accumulator(out, {num_groups, num_embeddings, grad_out.size(2)}, acc, grad_out.device(), "out");
  auto ep = make_embedding_plan(ids, num_embeddings, padding_idx, group, num_groups, sample_weight, acc);
  const int64_t M = ep.token_order.numel();
  const int64_t T = grad_out.size(1), d = grad_out.size(2);
  if (M > 0 && d > 0) {
    const auto token_order = ep.token_order.contiguous();
    const auto sorted_ids = ep.sorted_ids.contiguous();
    const auto token_sample = ep.token_sample.contiguous();
    const auto weight = ep.samples.weight.to(acc).contiguous();
    const auto sample_group = ep.samples.group.contiguous();
    // Run starts: token m starts a run when (sample, id) differs from token m - 1.
    auto new_run = at::ones({M}, token_order.options().dtype(at::kBool));
    if (M > 1) {
      auto id_change = sorted_ids.narrow(0, 1, M - 1).ne(sorted_ids.narrow(0, 0, M - 1));
      auto sample_change = token_sample.narrow(0, 1, M - 1).ne(token_sample.narrow(0, 0, M - 1));
      new_run.narrow(0, 1, M - 1).copy_(id_change.logical_or_(sample_change));
    }
    const auto starts = at::nonzero(new_run).flatten();
    const auto run_start = at::cat({starts, at::full({1}, M, starts.options())}).contiguous();
    const int64_t num_runs = starts.numel();

    int cols = 32;
    while (cols < kEmbeddingThreads && cols < d) cols *= 2;
    const int rows = kEmbeddingThreads / cols;
    const int64_t col_blocks = (d + cols - 1) / cols;
    const int64_t run_blocks = (num_runs + rows - 1) / rows;
    TORCH_CHECK(col_blocks <= 65535, "sq_grad_embedding: d=", d, " is too wide for one launch");
    TORCH_CHECK(run_blocks <= std::numeric_limits<int32_t>::max(), "sq_grad_embedding: too many (sample, id) runs");
    const dim3 grid(static_cast<unsigned>(run_blocks), static_cast<unsigned>(col_blocks));
    const dim3 block(static_cast<unsigned>(cols), static_cast<unsigned>(rows));
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "sq_grad_embedding_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      sq_grad_embedding_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), out.data_ptr<acc_t>(), token_order.const_data_ptr<int64_t>(),
          sorted_ids.const_data_ptr<int64_t>(), token_sample.const_data_ptr<int64_t>(),
          run_start.const_data_ptr<int64_t>(), weight.const_data_ptr<acc_t>(), sample_group.const_data_ptr<int64_t>(),
          num_runs, T, d, num_embeddings, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (out.numel() > 0) {
    TORCH_CHECK_VALUE(all_finite(out),
                      "out has non-finite values after accumulation: grad_out (or a previous `out`) contains NaN or "
                      "inf, or the squared gradients overflow");
  }
}

at::Tensor sq_grad_embedding_cuda(const at::Tensor& ids, const at::Tensor& grad_out, int64_t num_embeddings,
                                  c10::optional<int64_t> padding_idx, const c10::optional<at::Tensor>& group,
                                  int64_t num_groups, const c10::optional<at::Tensor>& sample_weight) {
  auto out = embedding_output(grad_out, num_embeddings, num_groups);
  sq_grad_embedding_accumulate_cuda(ids, grad_out, num_embeddings, padding_idx, group, num_groups, sample_weight, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) {
  m.impl("sq_grad_embedding", &sq_grad_embedding_cuda);
  m.impl("sq_grad_embedding_", &sq_grad_embedding_accumulate_cuda);
}

}  // namespace unlearn_ext
