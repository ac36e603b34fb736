// CPU kernel of fused_linear_masked_kl (DESIGN.md 4.2): masked KL(reference || current) fused with
// the LM-head matmuls of both models, plus an optional cross-entropy, never holding [N, V] logits.
//
// Tokens are processed in chunks of `rows` (about 32 MiB of logits per model). For one chunk:
//   1. Z = h W^T + b and R = h_ref W_ref^T + b_ref with ATen GEMMs ([rows, V] each, reused buffers);
//   2. per row, in parallel: maxima, then the softmax sums of both models and the masked KL / CE
//      sums in one sweep, then (when gradients are wanted) dLoss/dZ written over Z in place;
//   3. grad_hidden[chunk] = G W and grad_weight += G^T h (GEMMs), grad_bias += colsum(G).
// So the forward computes the gradients too (the autograd backward only scales them), and the
// extra memory is the two chunk buffers.
//
// Per token n with s = z / T, t = r / T, p = softmax(t), q = softmax(s), m the vocabulary mask:
//   KL_n = sum_v m_v p_v (log p_v - log q_v) = X / S_r - (lse_t - lse_s) * P_m,
//   X = sum_v m_v e^(t_v - c_t) (t_v - s_v),   S_r = sum_v e^(t_v - c_t),   P_m = sum_v m_v p_v,
//   dKL_n / dz_v = (P_m q_v - m_v p_v) / T.
// With renormalize, both softmaxes run over the kept entries only (P_m = 1, gradient zero elsewhere).
// CE_n = logsumexp(z) - z_target at temperature 1.
//
// The row sweeps are written as `omp simd` loops with a polynomial expf, compiled for AVX-512,
// AVX2+FMA and the baseline with target attributes and chosen at run time (UNLEARN_EXT_CPU_ISA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "unlearn_ext/checks.h"

namespace unlearn_ext {

const char* cpu_kernel_isa();  // csrc/cpu/sq_grad_segmented.cpp

namespace {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define UNLEARN_KL_X86 1
#define UNLEARN_KL_TARGET(isa) __attribute__((target(isa)))
#else
#define UNLEARN_KL_X86 0
#define UNLEARN_KL_TARGET(isa)
#endif
#define UNLEARN_KL_INLINE inline __attribute__((always_inline))

// Bytes of logits per model and chunk of tokens.
constexpr int64_t kChunkBytes = 32 << 20;

// Tokens per chunk: about kChunkBytes of logits per model, or UNLEARN_EXT_KL_CHUNK_ROWS (tests use it
// to run many chunks on small shapes).
int64_t tokens_per_chunk(int64_t V, size_t elem_size) {
  const char* env = std::getenv("UNLEARN_EXT_KL_CHUNK_ROWS");
  if (env != nullptr && env[0] != '\0') {
    char* end = nullptr;
    const long long rows = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && rows >= 1,
                      "UNLEARN_EXT_KL_CHUNK_ROWS must be a positive integer, got '", env, "'");
    return rows;
  }
  return std::max<int64_t>(1, kChunkBytes / (V * static_cast<int64_t>(elem_size)));
}

// exp for float, branch-free so `omp simd` loops vectorise it (Cephes expf: range reduction by
// ln 2 in two parts and a degree-6 polynomial; about 1 ulp). Arguments are clamped to the range
// whose result is a normal float, so -inf gives ~1e-38 (callers only use it as a weight).
//
// The clamp bounds arrive as run-time values (ExpRange, read once per row): with literal bounds GCC
// threads the clamped branch to the constant exp(bound) and, for AVX2 and the baseline, can no
// longer vectorise the loop ("control flow in loop"), which made it 8x slower.
struct ExpRange {
  float lo, hi;
};
inline ExpRange exp_range() {
  static volatile float lo = -87.3365448f, hi = 88.3762626f;
  return {lo, hi};
}

UNLEARN_KL_INLINE float vexp(float x, ExpRange e) {
  x = x > e.lo ? x : e.lo;
  x = x < e.hi ? x : e.hi;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
UNLEARN_KL_INLINE double vexp(double x, ExpRange) { return std::exp(x); }

// What one row needs. `z` holds the current logits on entry and dLoss/dz on exit (when `grad`).
template <typename S>
struct Row {
  S* z;
  const S* r;       // reference logits (nullptr when the row takes no KL)
  int64_t target;   // class id, or -1 for no CE on this row
  bool kl;          // the row is in the KL (token mask and kl_weight != 0)
  S kl_coef;        // dLoss/dKL_n (gradient mode)
  S ce_coef;        // dLoss/dCE_n (gradient mode)
};

struct RowConfig {
  const void* vmask;     // [V] of S (1 kept, 0 not; float, so the loops stay in one width), or nullptr
  bool any_kept;         // vmask has at least one true entry (or is absent)
  int64_t V;
  double inv_t;
  bool renorm;  // softmaxes over kept entries only (only with a vmask)
  bool grad;
};

// One row: returns (KL_n, CE_n); writes dLoss/dz over row.z when cfg.grad.
template <typename S, bool kMask>
UNLEARN_KL_INLINE std::pair<S, S> row_kernel(const Row<S>& row, const RowConfig& cfg) {
  constexpr S kNegInf = -std::numeric_limits<S>::infinity();
  constexpr S kFar = S(-200);  // exp(kFar) is ~0: the argument for excluded entries
  const int64_t V = cfg.V;
  const S inv_t = static_cast<S>(cfg.inv_t);
  const S* vm = static_cast<const S*>(cfg.vmask);
  S* z = row.z;
  const S* r = row.r;
  const bool renorm = kMask && cfg.renorm;
  const bool want_kl = row.kl && cfg.any_kept;
  const bool want_ce = row.target >= 0;
  const ExpRange er = exp_range();

  // ---- pass 1: maxima (over the KL domain; over all entries for CE) ----
  // (Written as ternaries: GCC vectorises `omp simd reduction(max)` of std::max ten times worse.)
  S mz = kNegInf, mzk = kNegInf, mr = kNegInf;
  if (renorm) {
    if (want_kl) {
#pragma omp simd reduction(max : mzk, mr)
      for (int64_t v = 0; v < V; ++v) {
        const bool k = vm[v] != 0;
        const S zk = k ? z[v] : kNegInf, rk = k ? r[v] : kNegInf;
        mzk = zk > mzk ? zk : mzk;
        mr = rk > mr ? rk : mr;
      }
    }
    if (want_ce) {
#pragma omp simd reduction(max : mz)
      for (int64_t v = 0; v < V; ++v) mz = z[v] > mz ? z[v] : mz;
    }
  } else {
#pragma omp simd reduction(max : mz)
    for (int64_t v = 0; v < V; ++v) mz = z[v] > mz ? z[v] : mz;
    if (want_kl) {
#pragma omp simd reduction(max : mr)
      for (int64_t v = 0; v < V; ++v) mr = r[v] > mr ? r[v] : mr;
    }
    mzk = mz;
  }

  // ---- pass 2: sums ----
  S kl = 0, ce = 0, lse_s = 0, lse_t = 0, pm = 0, lse_ce = 0;
  if (want_kl) {
    const S cs = mzk * inv_t, ct = mr * inv_t;
    S sz = 0, sr = 0, sm = 0, x = 0;
    if (renorm) {
#pragma omp simd reduction(+ : sz, sr, x)
      for (int64_t v = 0; v < V; ++v) {
        const bool k = vm[v] != 0;
        const S s = z[v] * inv_t, t = r[v] * inv_t;
        const S es = vexp(k ? s - cs : kFar, er), et = vexp(k ? t - ct : kFar, er);
        const S kf = k ? S(1) : S(0);
        sz += kf * es;
        sr += kf * et;
        x += kf * et * (t - s);
      }
      sm = sr;
    } else if (kMask) {
#pragma omp simd reduction(+ : sz, sr, sm, x)
      for (int64_t v = 0; v < V; ++v) {
        const S kf = vm[v];
        const S s = z[v] * inv_t, t = r[v] * inv_t;
        const S es = vexp(s - cs, er), et = vexp(t - ct, er);
        sz += es;
        sr += et;
        sm += kf * et;
        x += kf * et * (t - s);
      }
    } else {
#pragma omp simd reduction(+ : sz, sr, x)
      for (int64_t v = 0; v < V; ++v) {
        const S s = z[v] * inv_t, t = r[v] * inv_t;
        const S es = vexp(s - cs, er), et = vexp(t - ct, er);
        sz += es;
        sr += et;
        x += et * (t - s);
      }
      sm = sr;
    }
    lse_s = cs + std::log(sz);
    lse_t = ct + std::log(sr);
    pm = sm / sr;
    kl = x / sr - (lse_t - lse_s) * pm;
  }
  // CE shares the sums of the KL when they cover all entries at temperature 1.
  const bool ce_shares = want_kl && !renorm && inv_t == S(1);
  if (want_ce) {
    if (ce_shares) {
      lse_ce = lse_s;
    } else {
      S sce = 0;
#pragma omp simd reduction(+ : sce)
      for (int64_t v = 0; v < V; ++v) sce += vexp(z[v] - mz, er);
      lse_ce = mz + std::log(sce);
    }
    ce = lse_ce - z[row.target];
  }
  if (!cfg.grad) return {kl, ce};

  // ---- pass 3: dLoss/dz, in place ----
  const S a = want_kl ? row.kl_coef * inv_t : S(0);  // coefficient of the KL gradient
  const S c = want_ce ? row.ce_coef : S(0);
  if (a == S(0) && c == S(0)) {
    std::fill(z, z + V, S(0));
    return {kl, ce};
  }
  if (a == S(0)) {  // CE only
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) z[v] = c * vexp(z[v] - lse_ce, er);
  } else if (renorm) {
    const bool ce_too = c != S(0);
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const bool k = vm[v] != 0;
      const S s = z[v] * inv_t, t = r[v] * inv_t;
      const S q = vexp(k ? s - lse_s : kFar, er), p = vexp(k ? t - lse_t : kFar, er);
      const S g = k ? a * (q - p) : S(0);
      z[v] = g + (ce_too ? c * vexp(z[v] - lse_ce, er) : S(0));
    }
  } else if (ce_shares) {  // q is also CE's softmax
    const S apm = a * pm;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const S kf = kMask ? vm[v] : S(1);
      const S q = vexp(z[v] * inv_t - lse_s, er), p = vexp(r[v] * inv_t - lse_t, er);
      z[v] = (apm + c) * q - a * kf * p;
    }
  } else {
    const S apm = a * pm;
    const bool ce_too = c != S(0);
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const S kf = kMask ? vm[v] : S(1);
      const S q = vexp(z[v] * inv_t - lse_s, er), p = vexp(r[v] * inv_t - lse_t, er);
      z[v] = apm * q - a * kf * p + (ce_too ? c * vexp(z[v] - lse_ce, er) : S(0));
    }
  }
  if (want_ce) z[row.target] -= c;
  return {kl, ce};
}

// Rows [begin, end) of a chunk; the ISA variants below inline this body with their own target.
template <typename S>
struct ChunkArgs {
  S* z;              // [rows, V]
  const S* r;        // [rows, V] or nullptr
  const int64_t* target;  // [rows], -1 for no CE
  const uint8_t* kl_row;  // [rows], 1 when the row is in the KL
  const S* kl_coef;       // [rows] or nullptr
  const S* ce_coef;       // [rows] or nullptr
  S* kl_out;              // [rows]
  S* ce_out;              // [rows]
};

template <typename S>
UNLEARN_KL_INLINE void chunk_rows(const ChunkArgs<S>& a, const RowConfig& cfg, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    Row<S> row{a.z + i * cfg.V,
               a.r ? a.r + i * cfg.V : nullptr,
               a.target[i],
               a.kl_row[i] != 0,
               a.kl_coef ? a.kl_coef[i] : S(0),
               a.ce_coef ? a.ce_coef[i] : S(0)};
    const auto res = cfg.vmask ? row_kernel<S, true>(row, cfg) : row_kernel<S, false>(row, cfg);
    a.kl_out[i] = res.first;
    a.ce_out[i] = res.second;
  }
}

#if UNLEARN_KL_X86
UNLEARN_KL_TARGET("avx512f,avx512dq")
void chunk_rows_avx512(const ChunkArgs<float>& a, const RowConfig& cfg, int64_t begin, int64_t end) {
  chunk_rows<float>(a, cfg, begin, end);
}
UNLEARN_KL_TARGET("avx2,fma")
void chunk_rows_avx2(const ChunkArgs<float>& a, const RowConfig& cfg, int64_t begin, int64_t end) {
  chunk_rows<float>(a, cfg, begin, end);
}
#endif
void chunk_rows_baseline(const ChunkArgs<float>& a, const RowConfig& cfg, int64_t begin, int64_t end) {
  chunk_rows<float>(a, cfg, begin, end);
}
void chunk_rows_double(const ChunkArgs<double>& a, const RowConfig& cfg, int64_t begin, int64_t end) {
  chunk_rows<double>(a, cfg, begin, end);
}

using FloatRowsFn = void (*)(const ChunkArgs<float>&, const RowConfig&, int64_t, int64_t);

FloatRowsFn pick_float_rows() {
  const std::string isa = cpu_kernel_isa();
#if UNLEARN_KL_X86
  if (isa == "avx512") return &chunk_rows_avx512;
  if (isa == "avx2") return &chunk_rows_avx2;
#endif
  return &chunk_rows_baseline;
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

struct Problem {
  at::Tensor hidden, weight, bias;              // current side, contiguous (bias undefined if absent)
  at::Tensor ref_hidden, ref_weight, ref_bias;  // reference side
  at::Tensor token_mask, vocab_mask, target;    // bool [N], bool [V], int64 [N] (undefined if absent)
  int64_t N = 0, H = 0, Hr = 0, V = 0;
  double temperature = 1.0;
  int64_t ignore_index = -100;
  bool renormalize = false;
};

at::Tensor opt(const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

void check_vector(const at::Tensor& t, int64_t n, const char* name, const char* what, const at::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "] (", what, "), got ", t.sizes());
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but hidden is on ", device);
}

Problem make_problem(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& ref_hidden, const at::Tensor& ref_weight,
                     const c10::optional<at::Tensor>& ref_bias, const c10::optional<at::Tensor>& token_mask,
                     const c10::optional<at::Tensor>& vocab_mask, const c10::optional<at::Tensor>& target,
                     double temperature, int64_t ignore_index, bool renormalize) {
  check_dim(hidden, 2, "hidden", "[N, H]");
  check_dim(weight, 2, "weight", "[V, H]");
  check_dim(ref_hidden, 2, "ref_hidden", "[N, H_ref]");
  check_dim(ref_weight, 2, "ref_weight", "[V, H_ref]");
  const auto dev = hidden.device();
  check_same_device(weight, "weight", hidden, "hidden");
  check_same_device(ref_hidden, "ref_hidden", hidden, "hidden");
  check_same_device(ref_weight, "ref_weight", hidden, "hidden");
  const auto dt = hidden.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble,
                    "fused_linear_masked_kl on the CPU takes float32 or float64, got hidden of ", dt);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{weight, "weight"},
                                {ref_hidden, "ref_hidden"},
                                {ref_weight, "ref_weight"}}) {
    TORCH_CHECK_VALUE(t.scalar_type() == dt, name, " must have hidden's dtype ", dt, ", got ", t.scalar_type());
  }
  Problem p;
  p.N = hidden.size(0);
  p.H = hidden.size(1);
  p.V = weight.size(0);
  p.Hr = ref_hidden.size(1);
  TORCH_CHECK_VALUE(weight.size(1) == p.H, "weight must be [V, H] with H = hidden.size(1) = ", p.H, ", got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(ref_hidden.size(0) == p.N, "ref_hidden must have hidden's ", p.N, " rows, got ",
                    ref_hidden.sizes());
  TORCH_CHECK_VALUE(ref_weight.size(0) == p.V && ref_weight.size(1) == p.Hr, "ref_weight must be [", p.V, ", ",
                    p.Hr, "] (weight's vocabulary, ref_hidden's width), got ", ref_weight.sizes());
  TORCH_CHECK_VALUE(p.V >= 1, "weight must have at least one vocabulary row");
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be a positive finite number, got ",
                    temperature);
  p.hidden = hidden.contiguous();
  p.weight = weight.contiguous();
  p.ref_hidden = ref_hidden.contiguous();
  p.ref_weight = ref_weight.contiguous();
  for (const auto& [b, name, out] :
       {std::tuple<const c10::optional<at::Tensor>&, const char*, at::Tensor*>{bias, "bias", &p.bias},
        {ref_bias, "ref_bias", &p.ref_bias}}) {
    if (!b.has_value()) continue;
    check_vector(*b, p.V, name, "one entry per vocabulary row", dev);
    TORCH_CHECK_VALUE(b->scalar_type() == dt, name, " must have hidden's dtype ", dt, ", got ", b->scalar_type());
    *out = b->contiguous();
  }
  if (token_mask.has_value()) {
    check_vector(*token_mask, p.N, "token_mask", "one flag per token", dev);
    TORCH_CHECK_VALUE(token_mask->scalar_type() == at::kBool, "token_mask must be a bool tensor, got ",
                      token_mask->scalar_type());
    p.token_mask = token_mask->contiguous();
  }
  if (vocab_mask.has_value()) {
    check_vector(*vocab_mask, p.V, "vocab_mask", "one flag per vocabulary entry", dev);
    TORCH_CHECK_VALUE(vocab_mask->scalar_type() == at::kBool, "vocab_mask must be a bool tensor, got ",
                      vocab_mask->scalar_type());
    p.vocab_mask = vocab_mask->contiguous();
  }
  if (target.has_value()) {
    check_vector(*target, p.N, "target", "one class id per token", dev);
    TORCH_CHECK_VALUE(!at::isFloatingType(target->scalar_type()) && target->scalar_type() != at::kBool,
                      "target must be an integer tensor, got ", target->scalar_type());
    p.target = target->to(at::kLong).contiguous();
    if (p.N > 0) {
      const auto valid = p.target.ne(ignore_index);
      if (valid.any().item<bool>()) {
        const auto kept = p.target.masked_select(valid);
        const int64_t lo = kept.min().item<int64_t>(), hi = kept.max().item<int64_t>();
        TORCH_CHECK_VALUE(lo >= 0 && hi < p.V, "target ids must be in [0, ", p.V, ") or ignore_index (", ignore_index,
                          "), got ", lo < 0 ? lo : hi);
      }
    }
  }
  // Logits from non-finite inputs would be silently wrong (the row sweeps clamp): refuse them.
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{p.hidden, "hidden"},
                                {p.weight, "weight"},
                                {p.ref_hidden, "ref_hidden"},
                                {p.ref_weight, "ref_weight"}}) {
    TORCH_CHECK_VALUE(all_finite(t), name, " contains NaN or inf");
  }
  if (p.bias.defined()) TORCH_CHECK_VALUE(all_finite(p.bias), "bias contains NaN or inf");
  if (p.ref_bias.defined()) TORCH_CHECK_VALUE(all_finite(p.ref_bias), "ref_bias contains NaN or inf");
  p.temperature = temperature;
  p.ignore_index = ignore_index;
  p.renormalize = renormalize;
  return p;
}

// ---------------------------------------------------------------------------------------------
// The chunked driver
// ---------------------------------------------------------------------------------------------

struct Result {
  at::Tensor kl, ce;          // [N], accumulation dtype
  at::Tensor gh, gw, gb;      // [N, H], [V, H], [V] (undefined when not computed / no bias)
};

// kl_coef / ce_coef: per-token gradient coefficients ([N], S) when `grad`, else undefined.
template <typename S>
Result run(const Problem& p, bool want_kl, bool want_ce, bool grad, const at::Tensor& kl_coef,
           const at::Tensor& ce_coef) {
  const auto opts = p.hidden.options();
  Result res;
  res.kl = at::zeros({p.N}, opts);
  res.ce = at::zeros({p.N}, opts);
  auto zero_grads = [&] {
    if (!grad) return;
    res.gh = at::zeros({p.N, p.H}, opts);
    res.gw = at::zeros({p.V, p.H}, opts);
    if (p.bias.defined()) res.gb = at::zeros({p.V}, opts);
  };
  if (p.N == 0 || (!want_kl && !want_ce)) {
    zero_grads();
    return res;
  }

  // Per-token flags; only rows in the KL or the CE are computed (gathered when some are not).
  at::Tensor kl_row = want_kl ? (p.token_mask.defined() ? p.token_mask : at::ones({p.N}, opts.dtype(at::kBool)))
                              : at::zeros({p.N}, opts.dtype(at::kBool));
  at::Tensor tgt = at::full({p.N}, -1, opts.dtype(at::kLong));
  if (want_ce) tgt = at::where(p.target.ne(p.ignore_index), p.target, tgt);
  if (grad) {  // a row whose coefficients are both zero contributes nothing to the gradient
    kl_row = kl_row.logical_and(kl_coef.ne(0));
    tgt = at::where(ce_coef.ne(0), tgt, at::full_like(tgt, -1));
  }
  const at::Tensor active = kl_row.logical_or(tgt.ge(0));
  const at::Tensor idx = active.nonzero().flatten();
  const int64_t n_act = idx.numel();
  if (n_act == 0) {
    zero_grads();
    return res;
  }
  const bool gather = n_act < p.N;
  if (grad) {  // the first chunk's GEMMs initialise grad_weight / grad_bias (no zero fill)
    res.gh = gather ? at::zeros({p.N, p.H}, opts) : at::empty({p.N, p.H}, opts);
    res.gw = at::empty({p.V, p.H}, opts);
    if (p.bias.defined()) res.gb = at::empty({p.V}, opts);
  }
  auto take = [&](const at::Tensor& t) { return gather ? t.index_select(0, idx).contiguous() : t; };
  const at::Tensor h = take(p.hidden);
  const at::Tensor hr = want_kl ? take(p.ref_hidden) : at::Tensor();
  const at::Tensor kl_row_a = take(kl_row).to(at::kByte).contiguous();
  const at::Tensor tgt_a = take(tgt).contiguous();
  const at::Tensor klc_a = grad ? take(kl_coef).contiguous() : at::Tensor();
  const at::Tensor cec_a = grad ? take(ce_coef).contiguous() : at::Tensor();
  at::Tensor kl_a = at::zeros({n_act}, opts), ce_a = at::zeros({n_act}, opts);
  at::Tensor gh_a = grad ? (gather ? at::empty({n_act, p.H}, opts) : res.gh) : at::Tensor();

  const int64_t rows = std::min<int64_t>(n_act, tokens_per_chunk(p.V, sizeof(S)));
  at::Tensor zbuf = at::empty({rows, p.V}, opts);
  const bool any_kl_row = kl_row_a.any().item<bool>();
  at::Tensor rbuf = any_kl_row ? at::empty({rows, p.V}, opts) : at::Tensor();
  const at::Tensor wt = p.weight.t(), rwt = p.ref_weight.t();

  RowConfig cfg{};
  at::Tensor vmask_s;
  if (p.vocab_mask.defined()) {
    vmask_s = p.vocab_mask.to(opts.dtype()).contiguous();
    cfg.vmask = vmask_s.data_ptr<S>();
    cfg.any_kept = p.vocab_mask.any().item<bool>();
  } else {
    cfg.vmask = nullptr;
    cfg.any_kept = true;
  }
  cfg.V = p.V;
  cfg.inv_t = 1.0 / p.temperature;
  cfg.renorm = p.renormalize && cfg.vmask != nullptr;
  cfg.grad = grad;
  FloatRowsFn float_rows = pick_float_rows();

  for (int64_t n0 = 0; n0 < n_act; n0 += rows) {
    const int64_t m = std::min(rows, n_act - n0);
    at::Tensor z = zbuf.narrow(0, 0, m);
    const at::Tensor hc = h.narrow(0, n0, m);
    if (p.bias.defined()) {
      at::addmm_out(z, p.bias, hc, wt);
    } else {
      at::mm_out(z, hc, wt);
    }
    at::Tensor r;
    if (any_kl_row) {
      r = rbuf.narrow(0, 0, m);
      const at::Tensor hrc = hr.narrow(0, n0, m);
      if (p.ref_bias.defined()) {
        at::addmm_out(r, p.ref_bias, hrc, rwt);
      } else {
        at::mm_out(r, hrc, rwt);
      }
    }
    ChunkArgs<S> args{z.data_ptr<S>(),
                      any_kl_row ? r.data_ptr<S>() : nullptr,
                      tgt_a.data_ptr<int64_t>() + n0,
                      kl_row_a.data_ptr<uint8_t>() + n0,
                      grad ? klc_a.data_ptr<S>() + n0 : nullptr,
                      grad ? cec_a.data_ptr<S>() + n0 : nullptr,
                      kl_a.data_ptr<S>() + n0,
                      ce_a.data_ptr<S>() + n0};
    at::parallel_for(0, m, 1, [&](int64_t b, int64_t e) {
      if constexpr (std::is_same_v<S, float>) {
        float_rows(args, cfg, b, e);
      } else {
        chunk_rows_double(args, cfg, b, e);
      }
    });
    if (grad) {
      at::Tensor ghc = gh_a.narrow(0, n0, m);
      at::mm_out(ghc, z, p.weight);
      if (n0 == 0) {
        at::mm_out(res.gw, z.t(), hc);
        if (p.bias.defined()) at::sum_out(res.gb, z, 0);
      } else {
        res.gw.addmm_(z.t(), hc);
        if (p.bias.defined()) res.gb.add_(z.sum(0));
      }
    }
  }
  if (gather) {
    res.kl.index_copy_(0, idx, kl_a);
    res.ce.index_copy_(0, idx, ce_a);
    if (grad) res.gh.index_copy_(0, idx, gh_a);
  } else {
    res.kl = kl_a;
    res.ce = ce_a;
  }
  return res;
}

Result dispatch(const Problem& p, bool want_kl, bool want_ce, bool grad, const at::Tensor& kl_coef,
                const at::Tensor& ce_coef) {
  if (p.hidden.scalar_type() == at::kDouble) return run<double>(p, want_kl, want_ce, grad, kl_coef, ce_coef);
  return run<float>(p, want_kl, want_ce, grad, kl_coef, ce_coef);
}

enum class Reduction { kNone, kMean, kSum };

Reduction parse_reduction(c10::string_view reduction) {
  const std::string r(reduction);
  if (r == "none") return Reduction::kNone;
  if (r == "mean") return Reduction::kMean;
  if (r == "sum") return Reduction::kSum;
  TORCH_CHECK_VALUE(false, "reduction must be 'mean', 'sum' or 'none', got '", r, "'");
}

// ---------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------

// Returns (loss, grad_hidden, grad_weight, grad_bias). loss is a scalar for mean/sum and [N] for none
// (kl_weight * KL_n * token_mask_n + ce_weight * CE_n). With compute_grad (mean/sum only) the
// gradients of the loss are returned, else empty tensors; grad_bias is empty without a bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_masked_kl_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& ref_hidden, const at::Tensor& ref_weight, const c10::optional<at::Tensor>& ref_bias,
    const c10::optional<at::Tensor>& token_mask, const c10::optional<at::Tensor>& vocab_mask,
    const c10::optional<at::Tensor>& target, double kl_weight, double ce_weight, double temperature,
    int64_t ignore_index, bool renormalize, c10::string_view reduction, bool compute_grad) {
  const Problem p = make_problem(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask,
                                 target, temperature, ignore_index, renormalize);
  const Reduction red = parse_reduction(reduction);
  TORCH_CHECK_VALUE(std::isfinite(kl_weight) && std::isfinite(ce_weight), "kl_weight and ce_weight must be finite");
  TORCH_CHECK_VALUE(ce_weight == 0.0 || p.target.defined(), "ce_weight=", ce_weight, " needs target");
  TORCH_CHECK_VALUE(!compute_grad || red != Reduction::kNone,
                    "compute_grad is for reduction 'mean' or 'sum'; 'none' computes gradients in backward");
  const bool want_kl = kl_weight != 0.0;
  const bool want_ce = ce_weight != 0.0;
  const auto opts = p.hidden.options();

  // Per-token coefficients of the reduced loss: kl_weight / n_kl on KL tokens, ce_weight / n_ce on CE tokens.
  at::Tensor kl_tok = p.token_mask.defined() ? p.token_mask.to(opts.dtype()) : at::ones({p.N}, opts);
  at::Tensor ce_tok = p.target.defined() ? p.target.ne(ignore_index).to(opts.dtype()) : at::zeros({p.N}, opts);
  double kl_div = 1.0, ce_div = 1.0;
  if (red == Reduction::kMean) {
    kl_div = std::max(1.0, kl_tok.sum().item<double>());
    ce_div = std::max(1.0, ce_tok.sum().item<double>());
  }
  at::Tensor kl_coef, ce_coef;
  if (compute_grad) {
    kl_coef = kl_tok * (kl_weight / kl_div);
    ce_coef = ce_tok * (ce_weight / ce_div);
  }
  Result res = dispatch(p, want_kl, want_ce, compute_grad, kl_coef, ce_coef);
  at::Tensor per_token = res.kl * kl_weight + res.ce * ce_weight;  // KL_n is 0 off the token mask
  at::Tensor loss;
  if (red == Reduction::kNone) {
    loss = per_token;
  } else {
    loss = res.kl.sum() * (kl_weight / kl_div) + res.ce.sum() * (ce_weight / ce_div);
  }
  // Distinct empty tensors: outputs must not alias each other.
  if (!compute_grad) return {loss, at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts)};
  return {loss, res.gh, res.gw, res.gb.defined() ? res.gb : at::empty({0}, opts)};
}

// Gradients for per-token coefficients grad_kl [N] (dLoss/dKL_n) and grad_ce [N] (dLoss/dCE_n):
// returns (grad_hidden [N, H], grad_weight [V, H], grad_bias [V] or empty without a bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_masked_kl_backward_cpu(
    const at::Tensor& grad_kl, const at::Tensor& grad_ce, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& ref_hidden, const at::Tensor& ref_weight,
    const c10::optional<at::Tensor>& ref_bias, const c10::optional<at::Tensor>& token_mask,
    const c10::optional<at::Tensor>& vocab_mask, const c10::optional<at::Tensor>& target, double temperature,
    int64_t ignore_index, bool renormalize) {
  const Problem p = make_problem(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_mask, vocab_mask,
                                 target, temperature, ignore_index, renormalize);
  const auto dev = p.hidden.device();
  check_vector(grad_kl, p.N, "grad_kl", "one coefficient per token", dev);
  check_vector(grad_ce, p.N, "grad_ce", "one coefficient per token", dev);
  const auto opts = p.hidden.options();
  const at::Tensor klc = grad_kl.to(opts.dtype()).contiguous();
  at::Tensor cec = grad_ce.to(opts.dtype()).contiguous();
  const bool want_ce = p.target.defined() && cec.ne(0).any().item<bool>();
  const bool want_kl = klc.ne(0).any().item<bool>();
  TORCH_CHECK_VALUE(all_finite(klc) && all_finite(cec), "the incoming gradient contains NaN or inf");
  Result res = dispatch(p, want_kl, want_ce, /*grad=*/true, klc, cec);
  return {res.gh, res.gw, res.gb.defined() ? res.gb : at::empty({0}, opts)};
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("fused_linear_masked_kl", &fused_linear_masked_kl_cpu);
  m.impl("fused_linear_masked_kl_backward", &fused_linear_masked_kl_backward_cpu);
}

}  // namespace unlearn_ext
