// CUDA segmented-K GEMM for squared per-sample gradients, and the CUDA registrations of the linear
// and conv2d ops (the device-generic wrappers of sq_grad_common.cpp with this kernel).
//
// For one group k and one output tile F[rows of d_out, cols of d_in], a thread block loops over the
// samples of group k (plan positions seg_start[k] .. seg_start[k+1]) and for each sample b computes
//     A = G_b^T X_b   (sum over the sample's T tokens, in chunks of BK tokens staged in shared memory)
//     F += w_b * A * A   (elementwise, in registers)
// then adds F into out3[k] once. Every block owns its tile of out3[k], so there are no atomics and
// the [B, d_out, d_in] per-sample gradients never exist.
//
// Two kernels share that structure:
//  * sq_grad_segmented_wmma_kernel (bfloat16, float16): tensor cores through nvcuda::wmma
//    m16n16k16 with float32 accumulation. Accumulator fragments of one shape share one register
//    layout, so F.x[e] += w * A.x[e] * A.x[e] is the elementwise square.
//  * sq_grad_segmented_simt_kernel (float32, float64): a register-tiled FMA kernel, exact IEEE
//    arithmetic in the input precision (no TF32).
// Inputs have arbitrary strides (conv passes transposed im2col views whose token dimension is the
// contiguous one), so tiles are gathered by a TileLoader: a 16-byte vector path when the feature
// dimension of both inputs is contiguous and aligned, else scalar loads whose thread mapping follows
// whichever of the token/feature dimensions is more contiguous (coalescing). Ragged T, d_in and
// d_out are zero-padded in shared memory; the next chunk is loaded into registers while the current
// one is multiplied (register double buffering).
// CUDA headers: c10/cuda only (at::cuda::getCurrentCUDAStream comes from c10/cuda/CUDAStream.h);
// ATen/cuda/CUDAContext.h would also pull in the cuBLAS/cuSPARSE/cuSOLVER headers, which a bare
// nvcc toolkit (the compile check of .ci/check_cuda.sh) lacks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "unlearn_ext/checks.h"
#include "unlearn_ext/sq_grad.h"

namespace unlearn_ext {
namespace {

// gridDim.y (and z) is limited to 65535: groups beyond that go to further launches.
constexpr int64_t kMaxGridY = 65535;

// Everything a segmented kernel reads. E: the element type as stored (uint16_t bits for bf16/fp16),
// S: the accumulator type (float, or double for float64 inputs).
template <typename E, typename S>
struct SegmentedParams {
  const E* x;                 // [B, T, d_in], strides sxb, sxt, sxi
  const E* g;                 // [B, T, d_out], strides sgb, sgt, sgo
  S* out;                     // [K, d_out, d_in], strides sfk, sfo, 1
  const int64_t* order;       // [S] sample index of each plan position, grouped by group
  const S* weight;            // [S] weight of each plan position
  const int64_t* seg_start;   // [K + 1] group k owns plan positions [seg_start[k], seg_start[k + 1])
  int64_t k_offset;           // group of blockIdx.y == 0 (launches are split every 65535 groups)
  int64_t T, d_in, d_out;
  int64_t sxb, sxt, sxi, sgb, sgt, sgo, sfk, sfo;
  int tiles_in;               // number of d_in tiles: blockIdx.x = tile_out * tiles_in + tile_in
  bool x_t_fast, g_t_fast;    // scalar loads: consecutive threads walk tokens (true) or features
};

// Gathers a ROWS x COLS tile (rows: tokens t0.., columns: features c0..) of one sample's [T, d]
// matrix into registers (`load`), then into shared memory as tile[r * LD + c] (`store`); entries
// outside [T) x [d) are zero. Each thread moves kLoads elements (or 16-byte vectors) that lie on one
// line of the tile: load i is at (r0 + i * dr, c0 + i * dc), so its address is p0 + i * step and
// the per-load cost is one add and two compares. The mapping (`Lane`) is one of:
//  * VEC: the feature stride is 1, rows start 16-byte aligned and d is a multiple of the vector
//    width (checked on the host): consecutive threads take consecutive vectors of a row, so a
//    vector is entirely inside or entirely outside [0, d);
//  * scalar, t_fast: consecutive threads take consecutive tokens of a column (conv's transposed
//    im2col views, whose token stride is 1);
//  * scalar, otherwise: consecutive threads take consecutive features of a row.
template <typename E, int ROWS, int COLS, int THREADS, bool VEC>
struct TileLoader {
  static constexpr int kVec = VEC ? static_cast<int>(16 / sizeof(E)) : 1;  // elements per load
  static constexpr int kLoads = ROWS * COLS / (THREADS * kVec);            // loads per thread
  static_assert(ROWS * COLS % (THREADS * kVec) == 0, "the tile must split evenly over the threads");
  static_assert(THREADS % ROWS == 0 && THREADS % (COLS / kVec) == 0, "a thread's loads must share a line");
  using Chunk = std::conditional_t<VEC, uint4, E>;

  struct Lane {
    int r0, c0;  // tile coordinates of load 0
    int dr, dc;  // tile step between loads
  };

  __device__ __forceinline__ static Lane lane(int tid, bool t_fast) {
    if constexpr (VEC) {
      constexpr int kPerRow = COLS / kVec;
      return {tid / kPerRow, (tid % kPerRow) * kVec, THREADS / kPerRow, 0};
    } else {
      if (t_fast) return {tid % ROWS, tid / ROWS, 0, THREADS / ROWS};
      return {tid / COLS, tid % COLS, THREADS / COLS, 0};
    }
  }

  Chunk reg[kLoads];

  // base: the sample's [T, d] matrix; st, sf: its token and feature strides; the tile starts at
  // token t0 and feature f0.
  __device__ __forceinline__ void load(const E* __restrict__ base, int64_t st, int64_t sf, int64_t t0, int64_t f0,
                                       int64_t T, int64_t d, bool t_fast, int tid) {
    const Lane ln = lane(tid, t_fast);
    const int64_t t_left = T - t0 - ln.r0;  // load i is in range iff i * dr < t_left and i * dc < f_left
    const int64_t f_left = d - f0 - ln.c0;
    const E* p0 = base + (t0 + ln.r0) * st + (f0 + ln.c0) * sf;
    const int64_t step = ln.dr * st + ln.dc * sf;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const bool in = i * ln.dr < t_left && i * ln.dc < f_left;
      if constexpr (VEC) {
        reg[i] = in ? *reinterpret_cast<const uint4*>(p0 + i * step) : make_uint4(0, 0, 0, 0);
      } else {
        reg[i] = in ? p0[i * step] : E(0);
      }
    }
  }

  template <int LD>
  __device__ __forceinline__ void store(E* __restrict__ tile, bool t_fast, int tid) const {
    static_assert(!VEC || (LD * sizeof(E)) % 16 == 0, "vector stores need 16-byte aligned tile rows");
    const Lane ln = lane(tid, t_fast);
    E* q0 = tile + ln.r0 * LD + ln.c0;
    const int qstep = ln.dr * LD + ln.dc;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      if constexpr (VEC) {
        *reinterpret_cast<uint4*>(q0 + i * qstep) = reg[i];
      } else {
        q0[i * qstep] = reg[i];
      }
    }
  }
};

// Walks the (sample, token chunk) steps of one group in order: sample j = j0.., chunk t0 = 0, BK, ...
struct StepCursor {
  int64_t j;   // plan position
  int64_t t0;  // first token of the chunk
  __device__ __forceinline__ bool last_chunk(int64_t T, int bk) const { return t0 + bk >= T; }
  __device__ __forceinline__ void advance(int64_t T, int bk) {
    t0 += bk;
    if (t0 >= T) {
      t0 = 0;
      ++j;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// bfloat16 / float16: tensor cores (WMMA m16n16k16, float32 accumulation)
// ---------------------------------------------------------------------------------------------
//
// Block: 128 threads = 4 warps in a 2 x 2 arrangement; block tile 64 (d_out) x 64 (d_in); each warp
// owns a 32 x 32 sub-tile = 2 x 2 fragments of 16 x 16, holding the per-sample accumulator A and the
// running sum F (8 float accumulator fragments, 64 registers per thread).
// Token chunk BK = 32 (two k-steps of 16). Shared memory (static, 17 KiB):
//   gs[BK][kWmmaLd] = g[b, t0 + r, o0 + c]   the A operand G^T (64 x 32), read as col_major
//   xs[BK][kWmmaLd] = x[b, t0 + r, i0 + c]   the B operand X   (32 x 64), read as row_major
//   both as raw 16-bit patterns, rows padded to 72 elements (144 bytes: WMMA needs ldm % 8 == 0
//   and 32-byte aligned fragment pointers, which 16-row steps of 144 bytes and 16-column steps of
//   32 bytes keep); after the loop the same memory holds the float tile cs[64][68] of F for the
//   read-modify-write of out3 (coalesced along d_in).
constexpr int kWmmaThreads = 128;
constexpr int kWmmaBM = 64;  // d_out per block
constexpr int kWmmaBN = 64;  // d_in per block
constexpr int kWmmaBK = 32;  // tokens per chunk
constexpr int kWmmaLd = 72;  // padded row length of the staged 16-bit tiles (elements)
constexpr int kWmmaLdC = kWmmaBN + 4;  // padded row length of the float output tile
constexpr int kWmmaStageBytes = 2 * kWmmaBK * kWmmaLd * 2;
constexpr int kWmmaOutBytes = kWmmaBM * kWmmaLdC * 4;
constexpr int kWmmaSmemBytes = kWmmaStageBytes > kWmmaOutBytes ? kWmmaStageBytes : kWmmaOutBytes;

template <typename WT, bool VEC>
__global__ void __launch_bounds__(kWmmaThreads)
    sq_grad_segmented_wmma_kernel(const SegmentedParams<uint16_t, float> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // Not reached: the host sends bf16/fp16 to the float32 kernel below compute capability 8.0.
  __trap();
#else
  namespace wmma = nvcuda::wmma;
  using GLoader = TileLoader<uint16_t, kWmmaBK, kWmmaBM, kWmmaThreads, VEC>;
  using XLoader = TileLoader<uint16_t, kWmmaBK, kWmmaBN, kWmmaThreads, VEC>;
  using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  __shared__ __align__(128) unsigned char smem[kWmmaSmemBytes];
  uint16_t* gs = reinterpret_cast<uint16_t*>(smem);
  uint16_t* xs = gs + kWmmaBK * kWmmaLd;
  float* cs = reinterpret_cast<float*>(smem);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;  // warp's 32 x 32 sub-tile: rows wm * 32, columns wn * 32
  const int64_t k = p.k_offset + blockIdx.y;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x / p.tiles_in) * kWmmaBM;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x % p.tiles_in) * kWmmaBN;
  const int64_t j0 = p.seg_start[k], j1 = p.seg_start[k + 1];
  if (j0 >= j1) return;  // empty group: nothing to add (uniform over the block)

  AccFrag acc[2][2], fsum[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      wmma::fill_fragment(acc[a][b], 0.0f);
      wmma::fill_fragment(fsum[a][b], 0.0f);
    }
  }

  GLoader gl;
  XLoader xl;
  auto fetch = [&](const StepCursor& s) {
    const int64_t b = p.order[s.j];
    gl.load(p.g + b * p.sgb, p.sgt, p.sgo, s.t0, o0, p.T, p.d_out, p.g_t_fast, tid);
    xl.load(p.x + b * p.sxb, p.sxt, p.sxi, s.t0, i0, p.T, p.d_in, p.x_t_fast, tid);
  };

  StepCursor cur{j0, 0}, next{j0, 0};
  fetch(next);
  next.advance(p.T, kWmmaBK);
  while (cur.j < j1) {
    gl.template store<kWmmaLd>(gs, p.g_t_fast, tid);
    xl.template store<kWmmaLd>(xs, p.x_t_fast, tid);
    __syncthreads();
    if (next.j < j1) {  // the next chunk's global loads overlap this chunk's MMAs
      fetch(next);
      next.advance(p.T, kWmmaBK);
    }
    const WT* ga = reinterpret_cast<const WT*>(gs);
    const WT* xb = reinterpret_cast<const WT*>(xs);
#pragma unroll
    for (int kk = 0; kk < kWmmaBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::row_major> fb[2];
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        // A[m][t] = gs[t][m]: column-major with leading dimension kWmmaLd.
        wmma::load_matrix_sync(fa[a], ga + kk * kWmmaLd + wm * 32 + a * 16, kWmmaLd);
      }
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        wmma::load_matrix_sync(fb[b], xb + kk * kWmmaLd + wn * 32 + b * 16, kWmmaLd);
      }
#pragma unroll
      for (int a = 0; a < 2; ++a) {
#pragma unroll
        for (int b = 0; b < 2; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
      }
    }
    __syncthreads();  // the tiles are overwritten by the next iteration's stores
    if (cur.last_chunk(p.T, kWmmaBK)) {
      const float w = p.weight[cur.j];
#pragma unroll
      for (int a = 0; a < 2; ++a) {
#pragma unroll
        for (int b = 0; b < 2; ++b) {
#pragma unroll
          for (int e = 0; e < AccFrag::num_elements; ++e) {
            const float v = acc[a][b].x[e];
            fsum[a][b].x[e] += w * v * v;
          }
          wmma::fill_fragment(acc[a][b], 0.0f);
        }
      }
    }
    cur.advance(p.T, kWmmaBK);
  }

  // F -> shared memory (the staging tiles are free: the loop ended with a barrier) -> out3[k].
#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      wmma::store_matrix_sync(cs + (wm * 32 + a * 16) * kWmmaLdC + wn * 32 + b * 16, fsum[a][b], kWmmaLdC,
                              wmma::mem_row_major);
    }
  }
  __syncthreads();
  float* out_k = p.out + k * p.sfk;
#pragma unroll 4
  for (int e = tid; e < kWmmaBM * kWmmaBN; e += kWmmaThreads) {
    const int r = e / kWmmaBN, c = e % kWmmaBN;
    const int64_t o = o0 + r, i = i0 + c;
    if (o < p.d_out && i < p.d_in) out_k[o * p.sfo + i] += cs[r * kWmmaLdC + c];
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// float32 / float64: register-tiled FMA (SIMT)
// ---------------------------------------------------------------------------------------------
//
// Block: 256 threads as 16 x 16 (tx along d_in, ty along d_out); block tile 64 (d_out) x 64 (d_in);
// thread (ty, tx) owns the 4 x 4 outputs at rows ty + 16 a and columns tx + 16 b (a, b < 4), with
// the per-sample accumulator A and the running sum F in 32 registers of S. Token chunk BK = 16.
// Shared memory (static): gs[BK][64 + pad] and xs[BK][64 + pad], pad = one 16-byte vector (rows stay
// 16-byte aligned for the vector stores; the pad also spreads the column-wise stores of the
// token-major scalar path over the banks): 8.5 KiB for float32, 16.5 KiB for float64.
// In the inner loop a warp reads 2 distinct gs words (broadcast) and 16 consecutive xs words.
constexpr int kSimtThreads = 256;
constexpr int kSimtBM = 64;
constexpr int kSimtBN = 64;
constexpr int kSimtBK = 16;
constexpr int kSimtTM = 4;  // rows of d_out per thread
constexpr int kSimtTN = 4;  // columns of d_in per thread

template <typename S, bool VEC>
__global__ void __launch_bounds__(kSimtThreads) sq_grad_segmented_simt_kernel(const SegmentedParams<S, S> p) {
  constexpr int kLd = kSimtBM + static_cast<int>(16 / sizeof(S));
  static_assert(kSimtBM == kSimtBN, "gs and xs share one row length");
  using GLoader = TileLoader<S, kSimtBK, kSimtBM, kSimtThreads, VEC>;
  using XLoader = TileLoader<S, kSimtBK, kSimtBN, kSimtThreads, VEC>;

  __shared__ __align__(16) S gs[kSimtBK * kLd];
  __shared__ __align__(16) S xs[kSimtBK * kLd];

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t k = p.k_offset + blockIdx.y;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x / p.tiles_in) * kSimtBM;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x % p.tiles_in) * kSimtBN;
  const int64_t j0 = p.seg_start[k], j1 = p.seg_start[k + 1];
  if (j0 >= j1) return;  // empty group (uniform over the block)

  S acc[kSimtTM][kSimtTN], fsum[kSimtTM][kSimtTN];
#pragma unroll
  for (int a = 0; a < kSimtTM; ++a) {
#pragma unroll
    for (int b = 0; b < kSimtTN; ++b) {
      acc[a][b] = S(0);
      fsum[a][b] = S(0);
    }
  }

  GLoader gl;
  XLoader xl;
  auto fetch = [&](const StepCursor& s) {
    const int64_t b = p.order[s.j];
    gl.load(p.g + b * p.sgb, p.sgt, p.sgo, s.t0, o0, p.T, p.d_out, p.g_t_fast, tid);
    xl.load(p.x + b * p.sxb, p.sxt, p.sxi, s.t0, i0, p.T, p.d_in, p.x_t_fast, tid);
  };

  StepCursor cur{j0, 0}, next{j0, 0};
  fetch(next);
  next.advance(p.T, kSimtBK);
  while (cur.j < j1) {
    gl.template store<kLd>(gs, p.g_t_fast, tid);
    xl.template store<kLd>(xs, p.x_t_fast, tid);
    __syncthreads();
    if (next.j < j1) {  // the next chunk's global loads overlap this chunk's FMAs
      fetch(next);
      next.advance(p.T, kSimtBK);
    }
#pragma unroll
    for (int kk = 0; kk < kSimtBK; ++kk) {
      S ga[kSimtTM], xb[kSimtTN];
#pragma unroll
      for (int a = 0; a < kSimtTM; ++a) ga[a] = gs[kk * kLd + ty + 16 * a];
#pragma unroll
      for (int b = 0; b < kSimtTN; ++b) xb[b] = xs[kk * kLd + tx + 16 * b];
#pragma unroll
      for (int a = 0; a < kSimtTM; ++a) {
#pragma unroll
        for (int b = 0; b < kSimtTN; ++b) acc[a][b] = fma(ga[a], xb[b], acc[a][b]);
      }
    }
    __syncthreads();  // the tiles are overwritten by the next iteration's stores
    if (cur.last_chunk(p.T, kSimtBK)) {
      const S w = p.weight[cur.j];
#pragma unroll
      for (int a = 0; a < kSimtTM; ++a) {
#pragma unroll
        for (int b = 0; b < kSimtTN; ++b) {
          fsum[a][b] += w * acc[a][b] * acc[a][b];
          acc[a][b] = S(0);
        }
      }
    }
    cur.advance(p.T, kSimtBK);
  }

  S* out_k = p.out + k * p.sfk;
#pragma unroll
  for (int a = 0; a < kSimtTM; ++a) {
    const int64_t o = o0 + ty + 16 * a;
    if (o >= p.d_out) continue;
#pragma unroll
    for (int b = 0; b < kSimtTN; ++b) {
      const int64_t i = i0 + tx + 16 * b;
      if (i < p.d_in) out_k[o * p.sfo + i] += fsum[a][b];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// Whether a [B, T, d] operand can be read in 16-byte vectors along d (see TileLoader).
bool vector_loadable(const at::Tensor& t) {
  const int64_t vec = 16 / static_cast<int64_t>(t.element_size());
  return t.stride(2) == 1 && t.size(2) % vec == 0 && t.stride(0) % vec == 0 && t.stride(1) % vec == 0 &&
         reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Scalar loads walk the tokens when they are the more contiguous dimension (conv's im2col views).
bool tokens_fastest(const at::Tensor& t) {
  if (t.size(1) <= 1) return false;
  if (t.size(2) <= 1) return true;
  return t.stride(1) < t.stride(2);
}

template <typename E, typename S>
SegmentedParams<E, S> make_params(const at::Tensor& x3, const at::Tensor& g3, const at::Tensor& order,
                                  const at::Tensor& weight, const at::Tensor& seg, at::Tensor& out3, int tiles_in) {
  SegmentedParams<E, S> p;
  p.x = reinterpret_cast<const E*>(x3.data_ptr());
  p.g = reinterpret_cast<const E*>(g3.data_ptr());
  p.out = out3.data_ptr<S>();
  p.order = order.data_ptr<int64_t>();
  p.weight = weight.data_ptr<S>();
  p.seg_start = seg.data_ptr<int64_t>();
  p.k_offset = 0;
  p.T = x3.size(1);
  p.d_in = x3.size(2);
  p.d_out = g3.size(2);
  p.sxb = x3.stride(0);
  p.sxt = x3.stride(1);
  p.sxi = x3.stride(2);
  p.sgb = g3.stride(0);
  p.sgt = g3.stride(1);
  p.sgo = g3.stride(2);
  p.sfk = out3.stride(0);
  p.sfo = out3.stride(1);
  p.tiles_in = tiles_in;
  p.x_t_fast = tokens_fastest(x3);
  p.g_t_fast = tokens_fastest(g3);
  return p;
}

// Launches `kernel` over (d_out tiles * d_in tiles, groups), in slices of at most 65535 groups.
template <typename Params, typename Kernel>
void launch_over_groups(Kernel kernel, Params p, int64_t tiles, int64_t num_groups, int threads,
                        cudaStream_t stream) {
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(), "sq_grad: too many output tiles (", tiles, ")");
  for (int64_t k0 = 0; k0 < num_groups; k0 += kMaxGridY) {
    p.k_offset = k0;
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min(kMaxGridY, num_groups - k0)));
    kernel<<<grid, threads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename S>
void launch_simt(const at::Tensor& x3, const at::Tensor& g3, const at::Tensor& order, const at::Tensor& weight,
                 const at::Tensor& seg, at::Tensor& out3, cudaStream_t stream) {
  const int64_t tiles_in = (x3.size(2) + kSimtBN - 1) / kSimtBN;
  const int64_t tiles_out = (g3.size(2) + kSimtBM - 1) / kSimtBM;
  auto p = make_params<S, S>(x3, g3, order, weight, seg, out3, static_cast<int>(tiles_in));
  if (vector_loadable(x3) && vector_loadable(g3)) {
    launch_over_groups(sq_grad_segmented_simt_kernel<S, true>, p, tiles_in * tiles_out, out3.size(0), kSimtThreads,
                       stream);
  } else {
    launch_over_groups(sq_grad_segmented_simt_kernel<S, false>, p, tiles_in * tiles_out, out3.size(0), kSimtThreads,
                       stream);
  }
}

template <typename WT>
void launch_wmma(const at::Tensor& x3, const at::Tensor& g3, const at::Tensor& order, const at::Tensor& weight,
                 const at::Tensor& seg, at::Tensor& out3, cudaStream_t stream) {
  const int64_t tiles_in = (x3.size(2) + kWmmaBN - 1) / kWmmaBN;
  const int64_t tiles_out = (g3.size(2) + kWmmaBM - 1) / kWmmaBM;
  auto p = make_params<uint16_t, float>(x3, g3, order, weight, seg, out3, static_cast<int>(tiles_in));
  if (vector_loadable(x3) && vector_loadable(g3)) {
    launch_over_groups(sq_grad_segmented_wmma_kernel<WT, true>, p, tiles_in * tiles_out, out3.size(0), kWmmaThreads,
                       stream);
  } else {
    launch_over_groups(sq_grad_segmented_wmma_kernel<WT, false>, p, tiles_in * tiles_out, out3.size(0), kWmmaThreads,
                       stream);
  }
}

}  // namespace

// The CUDA SegmentedKernel (sq_grad.h).
void segmented_cuda(const at::Tensor& x3, const at::Tensor& g3, const SamplePlan& plan, at::Tensor& out3) {
  TORCH_CHECK(x3.dim() == 3 && g3.dim() == 3 && out3.dim() == 3, "segmented_cuda expects x3 [B, T, d_in], ",
              "g3 [B, T, d_out] and out3 [K, d_out, d_in], got ", x3.sizes(), ", ", g3.sizes(), ", ", out3.sizes());
  const int64_t T = x3.size(1), d_in = x3.size(2), d_out = g3.size(2), K = out3.size(0);
  if (plan.order.numel() == 0 || T == 0 || d_in == 0 || d_out == 0 || K == 0) return;
  TORCH_CHECK(x3.is_cuda() && g3.is_cuda() && out3.is_cuda(), "segmented_cuda expects CUDA tensors");
  TORCH_CHECK(x3.scalar_type() == g3.scalar_type(), "x and grad_out must have the same dtype");
  const auto acc = accum_dtype(x3.scalar_type());
  TORCH_CHECK(out3.scalar_type() == acc, "out must be ", acc, ", got ", out3.scalar_type());
  TORCH_CHECK(out3.size(1) == d_out && out3.size(2) == d_in && out3.stride(2) == 1,
              "out must be [K, d_out, d_in] with unit last stride, got shape ", out3.sizes(), " and strides ",
              out3.strides());
  TORCH_CHECK(plan.seg_start.numel() == K + 1, "the sample plan has ", plan.seg_start.numel() - 1,
              " groups but out has ", K);

  const c10::cuda::CUDAGuard device_guard(x3.device());
  const auto device = x3.device();
  const auto order = plan.order.to(device, at::kLong).contiguous();
  const auto weight = plan.weight.to(device, acc).contiguous();
  const auto seg = plan.seg_start.to(device, at::kLong).contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  switch (x3.scalar_type()) {
    case at::kFloat:
      launch_simt<float>(x3, g3, order, weight, seg, out3, stream);
      break;
    case at::kDouble:
      launch_simt<double>(x3, g3, order, weight, seg, out3, stream);
      break;
    case at::kHalf:
    case at::kBFloat16: {
      int cc_major = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, device.index()));
      const bool bf16 = x3.scalar_type() == at::kBFloat16;
      if (cc_major < 8) {
        // The WMMA kernel is built for sm_80 and newer only (bf16 tensor cores start there): upcast
        // and run the exact float32 kernel instead.
        segmented_cuda(x3.to(at::kFloat), g3.to(at::kFloat), plan, out3);
      } else if (bf16) {
        launch_wmma<__nv_bfloat16>(x3, g3, order, weight, seg, out3, stream);
      } else {
        launch_wmma<__half>(x3, g3, order, weight, seg, out3, stream);
      }
      break;
    }
    default:
      TORCH_CHECK_VALUE(false, "x must be float32, float64, bfloat16 or float16, got ", x3.scalar_type());
  }
}

namespace {

// algorithm="auto" on CUDA: T = 1 goes to the Hadamard path ((G*G)^T (X*X): one cuBLAS GEMM on squared
// operands per chunk of samples); every longer sequence to the segmented kernel above.
// (Conv2d always goes through the segmented kernel here: one cuDNN call per sample launches too little
// work per call. To be revisited with GPU measurements.)
const SqGradBackend kCudaBackend{&segmented_cuda, /*hadamard_max_tokens=*/1, /*segmented_max_tokens=*/int64_t{1} << 40,
                                 /*conv_per_sample_min_tokens=*/int64_t{1} << 40};

std::tuple<at::Tensor, at::Tensor> sq_grad_linear_cuda(const at::Tensor& x, const at::Tensor& grad_out,
                                                       const c10::optional<at::Tensor>& group, int64_t num_groups,
                                                       const c10::optional<at::Tensor>& sample_weight, bool with_bias,
                                                       c10::string_view algorithm) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  return sq_grad_linear_functional(x, grad_out, group, num_groups, sample_weight, with_bias, std::string(algorithm),
                                   kCudaBackend);
}

void sq_grad_linear_accumulate_cuda(const at::Tensor& x, const at::Tensor& grad_out,
                                    const c10::optional<at::Tensor>& group, int64_t num_groups,
                                    const c10::optional<at::Tensor>& sample_weight, at::Tensor out,
                                    const c10::optional<at::Tensor>& bias_out, c10::string_view algorithm) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  sq_grad_linear_accumulate(x, grad_out, group, num_groups, sample_weight, out, bias_out, std::string(algorithm),
                            kCudaBackend);
}

std::tuple<at::Tensor, at::Tensor> sq_grad_conv2d_cuda(const at::Tensor& x, const at::Tensor& grad_out,
                                                       at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                                       at::IntArrayRef padding, at::IntArrayRef dilation,
                                                       int64_t groups, const c10::optional<at::Tensor>& group,
                                                       int64_t num_groups,
                                                       const c10::optional<at::Tensor>& sample_weight, bool with_bias,
                                                       c10::string_view algorithm) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  return sq_grad_conv2d_functional(x, grad_out, weight_shape, stride, padding, dilation, groups, group, num_groups,
                                   sample_weight, with_bias, std::string(algorithm), kCudaBackend);
}

void sq_grad_conv2d_accumulate_cuda(const at::Tensor& x, const at::Tensor& grad_out, at::IntArrayRef weight_shape,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, const c10::optional<at::Tensor>& group, int64_t num_groups,
                                    const c10::optional<at::Tensor>& sample_weight, at::Tensor out,
                                    const c10::optional<at::Tensor>& bias_out, c10::string_view algorithm) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  sq_grad_conv2d_accumulate(x, grad_out, weight_shape, stride, padding, dilation, groups, group, num_groups,
                            sample_weight, out, bias_out, std::string(algorithm), kCudaBackend);
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) {
  m.impl("sq_grad_linear", &sq_grad_linear_cuda);
  m.impl("sq_grad_linear_", &sq_grad_linear_accumulate_cuda);
  m.impl("sq_grad_conv2d", &sq_grad_conv2d_cuda);
  m.impl("sq_grad_conv2d_", &sq_grad_conv2d_accumulate_cuda);
}

}  // namespace unlearn_ext
