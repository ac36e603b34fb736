// Vectorisable exp for the CPU row kernels of the fused LM-head losses (csrc/cpu/masked_kl.cpp,
// csrc/cpu/ce_norm.cpp), and the macros that compile one body for several x86 ISAs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace unlearn_ext {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define UNLEARN_CPU_X86 1
#define UNLEARN_CPU_TARGET(isa) __attribute__((target(isa)))
#else
#define UNLEARN_CPU_X86 0
#define UNLEARN_CPU_TARGET(isa)
#endif
#define UNLEARN_CPU_INLINE inline __attribute__((always_inline))

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

UNLEARN_CPU_INLINE float vexp(float x, ExpRange e) {
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
UNLEARN_CPU_INLINE double vexp(double x, ExpRange) { return std::exp(x); }

}  // namespace unlearn_ext
