// CPU segmented-K GEMM for squared per-sample gradients.
//
// For one output microtile F[MR rows of d_out, NR cols of d_in] the microkernel keeps F and a
// per-sample accumulator A in vector registers, and for each sample b:
//     A = sum_t g[b, t, rows] (outer) x[b, t, cols]      (T rank-1 updates, fused multiply-adds)
//     F += w_b * A * A
// so the [B, d_out, d_in] per-sample gradients never exist, and F is loaded and stored once per run of
// same-group samples and sub-chunk of ~256 tokens (the sub-chunk's x strip of a tile stays in L1).
// Operands are packed per super-chunk of samples into BLIS-style panels (g as [tokens][MR], x as
// [tokens][NR]) in fp32/fp64, converting bf16/fp16 and gathering strided layouts (transposed conv
// columns) on the way; reading rows in place is slower, because rows a power-of-two apart map to the
// same L1 sets. The panels are the only temporaries (about 1.5 MiB per worker).
// Threads split the samples (private accumulators, added at the end) when that fits a small memory
// budget, and otherwise split the output tiles, so threads never write the same element.
//
// The microkernel is written with intrinsics (AVX-512, AVX2+FMA) and GCC/Clang vector extensions (a
// 16-byte baseline), compiled side by side with target attributes and chosen at run time from the
// CPU's features (UNLEARN_EXT_CPU_ISA overrides). T = 1 packs squared, weighted operands and runs a
// plain GEMM microkernel (F += A) with a 12-row tile.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "unlearn_ext/sq_grad.h"

namespace unlearn_ext {
namespace {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define UNLEARN_EXT_X86 1
#define UNLEARN_EXT_TARGET(isa) __attribute__((target(isa)))
#else
#define UNLEARN_EXT_X86 0
#define UNLEARN_EXT_TARGET(isa)
#endif

// Vector traits per (ISA, scalar): load, store, broadcast, fused multiply-add (c + a * b) and
// fused negative multiply-add (c - a * b). Written with intrinsics so that the accumulators stay
// in registers and every update is one FMA instruction.
#if UNLEARN_EXT_X86
#include <immintrin.h>

struct Avx512F {
  using V = __m512;
  using S = float;
  static constexpr int L = 16;
  UNLEARN_EXT_TARGET("avx512f") static inline V zero() { return _mm512_setzero_ps(); }
  UNLEARN_EXT_TARGET("avx512f") static inline V load(const S* p) { return _mm512_loadu_ps(p); }
  UNLEARN_EXT_TARGET("avx512f") static inline void store(S* p, V v) { _mm512_storeu_ps(p, v); }
  UNLEARN_EXT_TARGET("avx512f") static inline V set1(S x) { return _mm512_set1_ps(x); }
  UNLEARN_EXT_TARGET("avx512f") static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  UNLEARN_EXT_TARGET("avx512f") static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
};
struct Avx512D {
  using V = __m512d;
  using S = double;
  static constexpr int L = 8;
  UNLEARN_EXT_TARGET("avx512f") static inline V zero() { return _mm512_setzero_pd(); }
  UNLEARN_EXT_TARGET("avx512f") static inline V load(const S* p) { return _mm512_loadu_pd(p); }
  UNLEARN_EXT_TARGET("avx512f") static inline void store(S* p, V v) { _mm512_storeu_pd(p, v); }
  UNLEARN_EXT_TARGET("avx512f") static inline V set1(S x) { return _mm512_set1_pd(x); }
  UNLEARN_EXT_TARGET("avx512f") static inline V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  UNLEARN_EXT_TARGET("avx512f") static inline V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
};
struct Avx2F {
  using V = __m256;
  using S = float;
  static constexpr int L = 8;
  UNLEARN_EXT_TARGET("avx2,fma") static inline V zero() { return _mm256_setzero_ps(); }
  UNLEARN_EXT_TARGET("avx2,fma") static inline V load(const S* p) { return _mm256_loadu_ps(p); }
  UNLEARN_EXT_TARGET("avx2,fma") static inline void store(S* p, V v) { _mm256_storeu_ps(p, v); }
  UNLEARN_EXT_TARGET("avx2,fma") static inline V set1(S x) { return _mm256_set1_ps(x); }
  UNLEARN_EXT_TARGET("avx2,fma") static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  UNLEARN_EXT_TARGET("avx2,fma") static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};
struct Avx2D {
  using V = __m256d;
  using S = double;
  static constexpr int L = 4;
  UNLEARN_EXT_TARGET("avx2,fma") static inline V zero() { return _mm256_setzero_pd(); }
  UNLEARN_EXT_TARGET("avx2,fma") static inline V load(const S* p) { return _mm256_loadu_pd(p); }
  UNLEARN_EXT_TARGET("avx2,fma") static inline void store(S* p, V v) { _mm256_storeu_pd(p, v); }
  UNLEARN_EXT_TARGET("avx2,fma") static inline V set1(S x) { return _mm256_set1_pd(x); }
  UNLEARN_EXT_TARGET("avx2,fma") static inline V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  UNLEARN_EXT_TARGET("avx2,fma") static inline V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
};
#endif

// Portable fallback: GCC/Clang vector extensions (16 bytes: SSE2 on x86-64, NEON on arm64).
template <typename Scalar>
struct Generic {
  typedef Scalar V __attribute__((vector_size(16), aligned(16)));
  typedef Scalar Vu __attribute__((vector_size(16), aligned(alignof(Scalar))));
  using S = Scalar;
  static constexpr int L = 16 / static_cast<int>(sizeof(Scalar));
  static inline V zero() { return V{}; }
  static inline V load(const S* p) { return *reinterpret_cast<const Vu*>(p); }
  static inline void store(S* p, V v) { *reinterpret_cast<Vu*>(p) = v; }
  static inline V set1(S x) { return V{} + x; }
  static inline V mul(V a, V b) { return a * b; }
  static inline V fma(V a, V b, V c) { return c + a * b; }
};

// Arguments of one microkernel call: a run of `ns` same-group samples on one MR x NR tile.
template <typename S>
struct MicroArgs {
  const S* const* gbase;  // [ns] first token of each sample's g rows (column offset goff added)
  const S* const* xbase;  // [ns] first token of each sample's x rows (column offset xoff added)
  int64_t goff, xoff;     // column offsets of this tile inside the rows
  int64_t ldg, ldx;       // elements between consecutive tokens
  int64_t T, ns;
  const S* w;             // [ns] sample weights (ignored by the unit-weight variant)
  S* F;                   // the output tile, ldf elements between rows
  int64_t ldf;
};

#define UNLEARN_EXT_DEFINE_MICROKERNEL(NAME, ATTR)                                                         \
  template <typename Tr, int MR, int NV, bool UNIT, bool SQUARE>                                           \
  ATTR                                                                                                     \
  void NAME(const MicroArgs<typename Tr::S>& m) {                                                          \
    using S = typename Tr::S;                                                                              \
    using V = typename Tr::V;                                                                              \
    constexpr int L = Tr::L;                                                                               \
    S* F = m.F;                                                                                            \
    int64_t ldf = m.ldf;                                                                                   \
    const int64_t T = m.T, ldg = m.ldg, ldx = m.ldx;                                                       \
    V f[MR][NV];                                                                                           \
    _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r)                                                  \
      _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) f[r][v] = Tr::load(F + r * ldf + v * L);       \
    /* re-derive the row addresses at the end instead of keeping MR of them live through the loop */      \
    __asm__ volatile("" : "+r"(F), "+r"(ldf));                                                             \
    for (int64_t s = 0; s < m.ns; ++s) {                                                                   \
      const S* __restrict gp = m.gbase[s] + m.goff;                                                        \
      const S* __restrict xp = m.xbase[s] + m.xoff;                                                        \
      V a[MR][NV];                                                                                         \
      _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r)                                                \
        _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) a[r][v] = SQUARE ? Tr::zero() : f[r][v];     \
      for (int64_t t = 0; t < T; ++t) {                                                                    \
        V xv[NV];                                                                                          \
        _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) xv[v] = Tr::load(xp + v * L);                \
        _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) {                                            \
          const V gr = Tr::set1(gp[r]);                                                                    \
          _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) a[r][v] = Tr::fma(gr, xv[v], a[r][v]);     \
        }                                                                                                  \
        gp += ldg;                                                                                         \
        xp += ldx;                                                                                         \
      }                                                                                                    \
      if (!SQUARE) {                                                                                       \
        _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r)                                              \
          _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) f[r][v] = a[r][v];                         \
      } else if (UNIT) {                                                                                   \
        _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r)                                              \
          _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) f[r][v] = Tr::fma(a[r][v], a[r][v], f[r][v]); \
      } else {                                                                                             \
        const V ws = Tr::set1(m.w[s]);                                                                     \
        _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r)                                              \
          _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v)                                            \
            f[r][v] = Tr::fma(Tr::mul(a[r][v], ws), a[r][v], f[r][v]);                                     \
      }                                                                                                    \
    }                                                                                                      \
    __asm__ volatile("" : "+r"(F), "+r"(ldf));                                                             \
    _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r)                                                  \
      _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) Tr::store(F + r * ldf + v * L, f[r][v]);       \
  }

#if UNLEARN_EXT_X86
UNLEARN_EXT_DEFINE_MICROKERNEL(microkernel_avx512, UNLEARN_EXT_TARGET("avx512f"))
UNLEARN_EXT_DEFINE_MICROKERNEL(microkernel_avx2, UNLEARN_EXT_TARGET("avx2,fma"))
#endif
UNLEARN_EXT_DEFINE_MICROKERNEL(microkernel_base, )

template <typename S>
using MicroFn = void (*)(const MicroArgs<S>&);

template <typename S>
struct Engine {
  MicroFn<S> unit;      // all weights 1
  MicroFn<S> weighted;  // F += w * A * A
  MicroFn<S> linear;    // F += A (a plain GEMM; T = 1 packs squared, weighted operands), linear_mr rows
  int linear_mr;
  int mr, nr;
  const char* isa;
};


template <typename S>
struct IsaTraits;
#if UNLEARN_EXT_X86
template <>
struct IsaTraits<float> {
  using Avx512 = Avx512F;
  using Avx2 = Avx2F;
};
template <>
struct IsaTraits<double> {
  using Avx512 = Avx512D;
  using Avx2 = Avx2D;
};
#endif

// The widest instruction set this CPU supports, or the one named by UNLEARN_EXT_CPU_ISA
// (avx512 | avx2 | baseline; tests use it to exercise every variant on one machine).
inline const char* chosen_isa() {
  static const char* isa = [] {
    const char* env = std::getenv("UNLEARN_EXT_CPU_ISA");
    bool avx512 = false, avx2 = false;
#if UNLEARN_EXT_X86
    __builtin_cpu_init();
    avx512 = __builtin_cpu_supports("avx512f");
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    if (env != nullptr && env[0] != '\0') {
      const std::string want(env);
      TORCH_CHECK_VALUE(want == "avx512" || want == "avx2" || want == "baseline",
                        "UNLEARN_EXT_CPU_ISA must be avx512, avx2 or baseline, got '", want, "'");
      TORCH_CHECK_VALUE(want != "avx512" || avx512, "UNLEARN_EXT_CPU_ISA=avx512 but this CPU has no AVX-512");
      TORCH_CHECK_VALUE(want != "avx2" || avx2, "UNLEARN_EXT_CPU_ISA=avx2 but this CPU has no AVX2+FMA");
      return want == "avx512" ? "avx512" : want == "avx2" ? "avx2" : "baseline";
    }
    return avx512 ? "avx512" : avx2 ? "avx2" : "baseline";
  }();
  return isa;
}

template <typename S>
Engine<S> pick_engine() {
  const std::string isa = chosen_isa();
#if UNLEARN_EXT_X86
  if (isa == "avx512") {
    using Tr = typename IsaTraits<S>::Avx512;
    return {&microkernel_avx512<Tr, 6, 2, true, true>, &microkernel_avx512<Tr, 6, 2, false, true>,
            &microkernel_avx512<Tr, 12, 2, true, false>, 12, 6, 2 * Tr::L, "avx512"};
  }
  if (isa == "avx2") {
    using Tr = typename IsaTraits<S>::Avx2;
    return {&microkernel_avx2<Tr, 3, 2, true, true>, &microkernel_avx2<Tr, 3, 2, false, true>,
            &microkernel_avx2<Tr, 6, 2, true, false>, 6, 3, 2 * Tr::L, "avx2"};
  }
#endif
  using Tr = Generic<S>;
  return {&microkernel_base<Tr, 3, 2, true, true>, &microkernel_base<Tr, 3, 2, false, true>,
          &microkernel_base<Tr, 6, 2, true, false>, 6, 3, 2 * Tr::L, "baseline"};
}

// Pack the token rows [tok0, tok1) into panels of width W:
//   dst[p * panel_stride + tok * W + c] = f(rows[tok][(p * W + c) * stride]), zero past d,
// with f(v) = v, or v * v * scale[tok] when `square` (the T = 1 GEMM (G*G)^T (X*X) packs squared,
// weighted operands). Tokens are handled in small blocks so each source row is read sequentially
// while the writes of one panel stay contiguous. W is a template parameter so the copies compile to
// register moves; like the microkernel, packing is compiled once per ISA.
struct PackOp {
  bool square;
  const void* scale;  // S[tokens] or nullptr
};

#define UNLEARN_EXT_DEFINE_PACK(NAME, ATTR)                                                                \
  template <int W, typename S, typename In>                                                                \
  ATTR void NAME(const In* const* __restrict rows, int64_t tok0, int64_t tok1, int64_t stride, int64_t d,  \
                 int64_t panel_stride, S* __restrict dst, PackOp op) {                                     \
    const S* scale = static_cast<const S*>(op.scale);                                                      \
    const int64_t n_panels = (d + W - 1) / W;                                                              \
    bool consecutive = stride != 1;                                                                        \
    for (int64_t t = tok0 + 1; consecutive && t < tok1; ++t) consecutive = rows[t] == rows[t - 1] + 1;      \
    if (consecutive) {                                                                                     \
      /* token-contiguous rows (conv's im2col columns): walk each feature along the tokens */              \
      const In* __restrict base = rows[tok0];                                                              \
      for (int64_t p = 0; p < n_panels; ++p) {                                                             \
        const int64_t n = std::min<int64_t>(W, d - p * W);                                                 \
        S* __restrict panel = dst + p * panel_stride + tok0 * W;                                           \
        for (int64_t c = 0; c < W; ++c) {                                                                  \
          const In* __restrict col = base + (p * W + c) * stride;                                          \
          for (int64_t t = 0; t < tok1 - tok0; ++t) {                                                      \
            const S v = c < n ? static_cast<S>(col[t]) : S(0);                                             \
            panel[t * W + c] = op.square ? v * v * (scale != nullptr ? scale[tok0 + t] : S(1)) : v;        \
          }                                                                                                \
        }                                                                                                  \
      }                                                                                                    \
      return;                                                                                              \
    }                                                                                                      \
    for (int64_t p = 0; p < n_panels; ++p) {                                                               \
      const int64_t n = std::min<int64_t>(W, d - p * W);                                                   \
      S* __restrict panel = dst + p * panel_stride;                                                        \
      for (int64_t tok = tok0; tok < tok1; ++tok) {                                                        \
        const In* __restrict src = rows[tok] + p * W * stride;                                             \
        S* __restrict out = panel + tok * W;                                                               \
        if (n == W && stride == 1 && !op.square) {                                                         \
          S tmp[W];                                                                                        \
          _Pragma("GCC unroll 32") for (int c = 0; c < W; ++c) tmp[c] = static_cast<S>(src[c]);            \
          _Pragma("GCC unroll 32") for (int c = 0; c < W; ++c) out[c] = tmp[c];                            \
        } else {                                                                                           \
          const S sc = scale != nullptr ? scale[tok] : S(1);                                               \
          for (int64_t c = 0; c < n; ++c) {                                                                \
            const S v = static_cast<S>(src[c * stride]);                                                   \
            out[c] = op.square ? v * v * sc : v;                                                           \
          }                                                                                                \
          for (int64_t c = n; c < W; ++c) out[c] = S(0);                                                   \
        }                                                                                                  \
      }                                                                                                    \
    }                                                                                                      \
  }

#if UNLEARN_EXT_X86
UNLEARN_EXT_DEFINE_PACK(pack_avx512, UNLEARN_EXT_TARGET("avx512f,avx512bw,avx512vl,f16c"))
UNLEARN_EXT_DEFINE_PACK(pack_avx2, UNLEARN_EXT_TARGET("avx2,fma,f16c"))
#endif
UNLEARN_EXT_DEFINE_PACK(pack_base, )

#if UNLEARN_EXT_X86
// AVX-512 fast path for same-dtype, unit-stride rows: each (token, panel) is one masked load and one
// masked store per vector of W elements.
template <bool SQUARE>
UNLEARN_EXT_TARGET("avx512f")
inline void copy_masked(const float* src, float* dst, int n, float sc) {
  for (int c = 0; c < n; c += 16) {
    const __mmask16 k = static_cast<__mmask16>(n - c >= 16 ? 0xFFFF : (1u << (n - c)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(k, src + c);
    if (SQUARE) v = _mm512_mul_ps(_mm512_mul_ps(v, v), _mm512_set1_ps(sc));
    _mm512_mask_storeu_ps(dst + c, k, v);
  }
}
template <bool SQUARE>
UNLEARN_EXT_TARGET("avx512f")
inline void copy_masked(const double* src, double* dst, int n, double sc) {
  for (int c = 0; c < n; c += 8) {
    const __mmask8 k = static_cast<__mmask8>(n - c >= 8 ? 0xFF : (1u << (n - c)) - 1);
    __m512d v = _mm512_maskz_loadu_pd(k, src + c);
    if (SQUARE) v = _mm512_mul_pd(_mm512_mul_pd(v, v), _mm512_set1_pd(sc));
    _mm512_mask_storeu_pd(dst + c, k, v);
  }
}

template <int W, bool SQUARE, typename S>
UNLEARN_EXT_TARGET("avx512f")
void pack_same_avx512_op(const S* const* __restrict rows, int64_t tok0, int64_t tok1, int64_t d, int64_t panel_stride,
                         S* __restrict dst, const S* scale) {
  const int64_t full = d / W;
  for (int64_t p = 0; p < full; ++p) {
    S* __restrict panel = dst + p * panel_stride;
    for (int64_t tok = tok0; tok < tok1; ++tok) {
      copy_masked<SQUARE>(rows[tok] + p * W, panel + tok * W, W, SQUARE ? scale[tok] : S(1));
    }
  }
  const int n = static_cast<int>(d - full * W);
  if (n > 0) {
    S* __restrict panel = dst + full * panel_stride;
    for (int64_t tok = tok0; tok < tok1; ++tok) {
      S* out = panel + tok * W;
      for (int c = n; c < W; ++c) out[c] = S(0);
      copy_masked<SQUARE>(rows[tok] + full * W, out, n, SQUARE ? scale[tok] : S(1));
    }
  }
}

template <int W, typename S>
void pack_same_avx512(const S* const* rows, int64_t tok0, int64_t tok1, int64_t d, int64_t panel_stride, S* dst,
                      PackOp op) {
  const S* scale = static_cast<const S*>(op.scale);
  if (!op.square) return pack_same_avx512_op<W, false>(rows, tok0, tok1, d, panel_stride, dst, scale);
  TORCH_CHECK(scale != nullptr, "internal: squared packing needs a scale");
  pack_same_avx512_op<W, true>(rows, tok0, tok1, d, panel_stride, dst, scale);
}
#endif

template <int W, typename S, typename In>
void pack_rows_w(const char* isa, const In* const* rows, int64_t tok0, int64_t tok1, int64_t stride, int64_t d,
                 int64_t panel_stride, S* dst, PackOp op) {
#if UNLEARN_EXT_X86
  if constexpr (std::is_same<S, In>::value) {
    if (stride == 1 && isa[0] == 'a' && isa[3] == '5') {
      return pack_same_avx512<W, S>(rows, tok0, tok1, d, panel_stride, dst, op);
    }
  }
  if (isa[0] == 'a' && isa[3] == '5') return pack_avx512<W>(rows, tok0, tok1, stride, d, panel_stride, dst, op);
  if (isa[0] == 'a') return pack_avx2<W>(rows, tok0, tok1, stride, d, panel_stride, dst, op);
#endif
  pack_base<W>(rows, tok0, tok1, stride, d, panel_stride, dst, op);
}

template <typename S, typename In>
void pack_rows(const char* isa, const In* const* rows, int64_t tok0, int64_t tok1, int64_t stride, int64_t d, int W,
               int64_t panel_stride, S* dst, PackOp op) {
  switch (W) {
    case 3: return pack_rows_w<3>(isa, rows, tok0, tok1, stride, d, panel_stride, dst, op);
    case 4: return pack_rows_w<4>(isa, rows, tok0, tok1, stride, d, panel_stride, dst, op);
    case 6: return pack_rows_w<6>(isa, rows, tok0, tok1, stride, d, panel_stride, dst, op);
    case 8: return pack_rows_w<8>(isa, rows, tok0, tok1, stride, d, panel_stride, dst, op);
    case 12: return pack_rows_w<12>(isa, rows, tok0, tok1, stride, d, panel_stride, dst, op);
    case 16: return pack_rows_w<16>(isa, rows, tok0, tok1, stride, d, panel_stride, dst, op);
    case 32: return pack_rows_w<32>(isa, rows, tok0, tok1, stride, d, panel_stride, dst, op);
    default: TORCH_CHECK(false, "internal: no packing routine for panel width ", W);
  }
}

inline void prefetch_l1(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 1, 3);
#endif
}

// A run of same-group samples: plan positions [s0, s1), all in group k.
struct Run {
  int64_t s0, s1, k;
};

// Tuning (measured on a 2-core Sapphire Rapids VM, see benchmarks/bench_fisher.py):
// sub-chunks of ~256 tokens keep one tile's x strip (256 * NR * 4 bytes = 32 KiB) in L1;
constexpr int64_t kChunkTokens = 256;
// output tiles are grouped by 16 row panels per work item;
constexpr int64_t kOPanelsPerBlock = 16;
// packed panels of one super-chunk (the kernel's only temporary per worker) stay around L2 size;
constexpr int64_t kPackBytes = int64_t{3} << 19;
// with several threads, samples are split between threads when the private accumulators this
// needs (one copy of the touched output per extra thread) fit this budget; otherwise threads
// split the output tiles and synchronise per super-chunk.
constexpr int64_t kPrivateBytes = int64_t{6} << 20;
constexpr int64_t kMinTokensPerThread = 1024;

// Sub-chunks of at most kChunkTokens tokens (whole samples) of plan positions [p0, p1), each split
// into same-group runs.
struct Chunking {
  std::vector<int64_t> chunk_start;  // [n_chunks + 1] plan positions
  std::vector<Run> runs;             // all runs, in order
  std::vector<int64_t> first_run;    // [n_chunks + 1] index into runs
};

Chunking make_chunks(const int64_t* group, int64_t p0, int64_t p1, int64_t T) {
  Chunking c;
  const int64_t per_chunk = std::max<int64_t>(1, kChunkTokens / std::max<int64_t>(T, 1));
  for (int64_t j0 = p0; j0 < p1; j0 += per_chunk) {
    const int64_t j1 = std::min(p1, j0 + per_chunk);
    c.chunk_start.push_back(j0);
    c.first_run.push_back(static_cast<int64_t>(c.runs.size()));
    int64_t s0 = j0;
    for (int64_t s = j0 + 1; s <= j1; ++s) {
      if (s == j1 || group[s] != group[s0]) {
        c.runs.push_back({s0, s, group[s0]});
        s0 = s;
      }
    }
  }
  c.chunk_start.push_back(p1);
  c.first_run.push_back(static_cast<int64_t>(c.runs.size()));
  return c;
}

// Run the microkernel on one tile, through a zero-padded copy when the tile is ragged.
template <typename S>
inline void run_tile(int MR, int NR, MicroFn<S> fn, MicroArgs<S>& m, S* ftile, int64_t fo, int64_t nrows,
                     int64_t ncols, S* scratch) {
  if (nrows == MR && ncols == NR) {
    m.F = ftile;
    m.ldf = fo;
    fn(m);
    return;
  }
  std::fill(scratch, scratch + MR * NR, S(0));
  for (int64_t r = 0; r < nrows; ++r) std::memcpy(scratch + r * NR, ftile + r * fo, ncols * sizeof(S));
  m.F = scratch;
  m.ldf = NR;
  fn(m);
  for (int64_t r = 0; r < nrows; ++r) std::memcpy(ftile + r * fo, scratch + r * NR, ncols * sizeof(S));
}

// Everything a worker needs to know about one call.
template <typename S, typename In>
struct Problem {
  const Engine<S>* engine;
  int MR, NR;
  int64_t T, d_in, d_out, n_op, n_ip, n_ob;
  const In* xb;
  const In* gb;
  int64_t xs0, xs1, xs2, gs0, gs1, gs2;
  const int64_t* order;   // plan order: sample index of each position
  const int64_t* group;   // group of each position
  const S* weight;        // weight of each position
  bool unit;
};

// Either at::parallel_for or a plain loop over [0, n).
template <typename Fn>
inline void for_range(bool threaded, int64_t n, const Fn& fn) {
  if (threaded) {
    at::parallel_for(0, n, 1, fn);
  } else if (n > 0) {
    fn(0, n);
  }
}

// Accumulate plan positions [p0, p1) into F; group k lands at F + (k - k0) * fk. With `threaded`,
// packing and tiles are spread over ATen's threads; otherwise the calling thread does everything.
template <typename S, typename In>
void process_range(const Problem<S, In>& P, int64_t p0, int64_t p1, S* F, int64_t k0, int64_t fk, int64_t fo,
                   bool threaded) {
  if (p1 <= p0) return;
  const Engine<S>& engine = *P.engine;
  const int MR = P.MR, NR = P.NR;
  const int64_t T = P.T;
  // T = 1: (G*G)^T (X*X) is one GEMM; pack squared (and weighted) operands, accumulate linearly.
  const bool squared = T == 1;
  const MicroFn<S> fn = squared ? engine.linear : (P.unit ? engine.unit : engine.weighted);
  const Chunking ch = make_chunks(P.group, p0, p1, T);
  const int64_t n_chunks = static_cast<int64_t>(ch.chunk_start.size()) - 1;
  // Super-chunks: as many whole sub-chunks as fit kPackBytes of packed panels.
  const int64_t sub_tokens = (ch.chunk_start[1] - ch.chunk_start[0]) * T;
  const int64_t row_bytes = (P.n_op * MR + P.n_ip * NR) * static_cast<int64_t>(sizeof(S));
  const int64_t subs_per_super = std::max<int64_t>(1, kPackBytes / std::max<int64_t>(row_bytes * sub_tokens, 1));
  const int64_t super_tokens = std::min(subs_per_super * sub_tokens, (p1 - p0) * T);
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value);
  auto gpack_t = at::empty({P.n_op * super_tokens * MR}, opts);
  auto xpack_t = at::empty({P.n_ip * super_tokens * NR}, opts);
  S* gpack = gpack_t.template data_ptr<S>();
  S* xpack = xpack_t.template data_ptr<S>();
  std::vector<const In*> grows(super_tokens), xrows(super_tokens);
  const std::vector<S> ones(squared ? super_tokens : 0, S(1));
  const int64_t super_samples = super_tokens / T;
  std::vector<const S*> gbase(super_samples), xbase(super_samples);
  for (int64_t s = 0; s < super_samples; ++s) {
    gbase[s] = gpack + s * T * MR;
    xbase[s] = xpack + s * T * NR;
  }
  for (int64_t c0 = 0; c0 < n_chunks; c0 += subs_per_super) {
    const int64_t c1 = std::min(n_chunks, c0 + subs_per_super);
    const int64_t j0 = ch.chunk_start[c0], ntok = (ch.chunk_start[c1] - j0) * T;
    for (int64_t tok = 0; tok < ntok; ++tok) {
      const int64_t b = P.order[j0 + tok / T], t = tok % T;
      grows[tok] = P.gb + b * P.gs0 + t * P.gs1;
      xrows[tok] = P.xb + b * P.xs0 + t * P.xs1;
    }
    const int64_t kPackBlock = P.xs1 == 1 || P.gs1 == 1 ? 32 : 8;  // token-contiguous rows: longer runs
    for_range(threaded, (ntok + kPackBlock - 1) / kPackBlock, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t t0 = blk * kPackBlock, t1 = std::min(ntok, t0 + kPackBlock);
        pack_rows<S, In>(engine.isa, grows.data(), t0, t1, P.gs2, P.d_out, MR, super_tokens * MR, gpack,
                         PackOp{squared, squared ? P.weight + j0 : nullptr});
        pack_rows<S, In>(engine.isa, xrows.data(), t0, t1, P.xs2, P.d_in, NR, super_tokens * NR, xpack,
                         PackOp{squared, squared ? ones.data() : nullptr});
      }
    });
    for_range(threaded, P.n_ob * P.n_ip, [&](int64_t begin, int64_t end) {
      std::vector<S> scratch(static_cast<size_t>(MR) * NR);
      MicroArgs<S> m{};
      m.ldg = MR;
      m.ldx = NR;
      m.T = T;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t ob = item / P.n_ip, ip = item % P.n_ip;
        const int64_t i0 = ip * NR, ncols = std::min<int64_t>(NR, P.d_in - i0);
        const int64_t op_end = std::min(P.n_op, (ob + 1) * kOPanelsPerBlock);
        m.xoff = ip * super_tokens * NR;
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t op = ob * kOPanelsPerBlock; op < op_end; ++op) {
            const int64_t o0 = op * MR, nrows = std::min<int64_t>(MR, P.d_out - o0);
            m.goff = op * super_tokens * MR;
            if (op + 1 < op_end) {  // the next tile's F rows, while this tile computes
              const S* next = F + (ch.runs[ch.first_run[c]].k - k0) * fk + (o0 + MR) * fo + i0;
              for (int64_t rr = 0; rr < std::min<int64_t>(MR, P.d_out - o0 - MR); ++rr) {
                prefetch_l1(next + rr * fo);
                prefetch_l1(next + rr * fo + NR - 1);
              }
            }
            for (int64_t r = ch.first_run[c]; r < ch.first_run[c + 1]; ++r) {
              const Run& run = ch.runs[r];
              m.gbase = gbase.data() + (run.s0 - j0);
              m.xbase = xbase.data() + (run.s0 - j0);
              m.w = P.weight + run.s0;
              if (squared) {  // the run is one GEMM over its tokens
                m.ns = 1;
                m.T = run.s1 - run.s0;
              } else {
                m.ns = run.s1 - run.s0;
              }
              run_tile(MR, NR, fn, m, F + (run.k - k0) * fk + o0 * fo + i0, fo, nrows, ncols, scratch.data());
            }
          }
        }
      }
    });
  }
}

template <typename S, typename In>
void segmented_impl(const at::Tensor& x3, const at::Tensor& g3, const SamplePlan& plan, at::Tensor& out3) {
  static const Engine<S> engine = pick_engine<S>();
  TORCH_CHECK(out3.stride(2) == 1, "internal: out3 must have unit stride in its last dimension");
  auto order_cpu = plan.order.to(at::kCPU).contiguous();
  auto group_cpu = plan.group.to(at::kCPU).contiguous();
  auto weight_cpu = plan.weight.to(at::kCPU).to(c10::CppTypeToScalarType<S>::value).contiguous();

  Problem<S, In> P;
  P.engine = &engine;
  P.MR = x3.size(1) == 1 ? engine.linear_mr : engine.mr;
  P.NR = engine.nr;
  P.T = x3.size(1);
  P.d_in = x3.size(2);
  P.d_out = g3.size(2);
  P.n_op = (P.d_out + P.MR - 1) / P.MR;
  P.n_ip = (P.d_in + P.NR - 1) / P.NR;
  P.n_ob = (P.n_op + kOPanelsPerBlock - 1) / kOPanelsPerBlock;
  P.xb = x3.template data_ptr<In>();
  P.gb = g3.template data_ptr<In>();
  P.xs0 = x3.stride(0), P.xs1 = x3.stride(1), P.xs2 = x3.stride(2);
  P.gs0 = g3.stride(0), P.gs1 = g3.stride(1), P.gs2 = g3.stride(2);
  P.order = order_cpu.data_ptr<int64_t>();
  P.group = group_cpu.data_ptr<int64_t>();
  P.weight = weight_cpu.template data_ptr<S>();
  P.unit = plan.unit_weight;

  S* F = out3.template data_ptr<S>();
  const int64_t fk = out3.stride(0), fo = out3.stride(1);
  const int64_t n = plan.order.numel();
  const int64_t nt = at::get_num_threads();
  if (nt <= 1 || at::in_parallel_region()) {
    process_range(P, 0, n, F, 0, fk, fo, /*threaded=*/false);
    return;
  }
  // Sample-parallel: thread r takes plan positions [bounds[r], bounds[r + 1]) and, except thread 0,
  // accumulates into a private copy of the groups it touches; the copies are added at the end.
  std::vector<int64_t> bounds(nt + 1);
  for (int64_t r = 0; r <= nt; ++r) bounds[r] = n * r / nt;
  const int64_t tile_bytes = P.d_out * P.d_in * static_cast<int64_t>(sizeof(S));
  int64_t private_bytes = 0;
  for (int64_t r = 1; r < nt; ++r) {
    if (bounds[r + 1] > bounds[r]) private_bytes += (P.group[bounds[r + 1] - 1] - P.group[bounds[r]] + 1) * tile_bytes;
  }
  if (n * P.T < nt * kMinTokensPerThread || private_bytes > kPrivateBytes) {
    process_range(P, 0, n, F, 0, fk, fo, /*threaded=*/true);
    return;
  }
  std::vector<at::Tensor> priv(nt);
  for (int64_t r = 1; r < nt; ++r) {
    if (bounds[r + 1] > bounds[r]) {
      const int64_t nk = P.group[bounds[r + 1] - 1] - P.group[bounds[r]] + 1;
      priv[r] = at::zeros({nk, P.d_out, P.d_in}, out3.options());
    }
  }
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (r == 0) {
        process_range(P, bounds[0], bounds[1], F, 0, fk, fo, /*threaded=*/false);
      } else if (priv[r].defined()) {
        process_range(P, bounds[r], bounds[r + 1], priv[r].template data_ptr<S>(), P.group[bounds[r]],
                      P.d_out * P.d_in, P.d_in, /*threaded=*/false);
      }
    }
  });
  for (int64_t r = 1; r < nt; ++r) {
    if (priv[r].defined()) out3.narrow(0, P.group[bounds[r]], priv[r].size(0)).add_(priv[r]);
  }
}

}  // namespace

void segmented_cpu(const at::Tensor& x3, const at::Tensor& g3, const SamplePlan& plan, at::Tensor& out3) {
  TORCH_CHECK(x3.device().is_cpu() && g3.device().is_cpu() && out3.device().is_cpu(),
              "internal: segmented_cpu got a non-CPU tensor");
  if (plan.order.numel() == 0 || x3.size(1) == 0) return;
  const auto in = x3.scalar_type();
  if (out3.scalar_type() == at::kDouble) {
    TORCH_CHECK(in == at::kDouble, "internal: float64 accumulator needs float64 inputs");
    segmented_impl<double, double>(x3, g3, plan, out3);
    return;
  }
  switch (in) {
    case at::kFloat:
      segmented_impl<float, float>(x3, g3, plan, out3);
      break;
    case at::kBFloat16:
      segmented_impl<float, c10::BFloat16>(x3, g3, plan, out3);
      break;
    case at::kHalf:
      segmented_impl<float, c10::Half>(x3, g3, plan, out3);
      break;
    default:
      TORCH_CHECK_VALUE(false, "x must be float32, float64, bfloat16 or float16, got ", in);
  }
}

const char* cpu_kernel_isa() { return chosen_isa(); }

}  // namespace unlearn_ext
