// Vectorizable scalar math shared by the CPU kernels (torch-free). No -ffast-math in this build (masking relies
// on -inf), so reductions use kLanes independent partial results, which the compiler vectorizes without
// reassociating one loop-carried chain, and exp is a branch-free polynomial instead of libm's expf.
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace nvembed::cpu {

constexpr int kLanes = 16;

// sum_{j < n} f(j)
template <typename S, typename Fn>
inline S reduce_sum(int64_t n, Fn f) {
  S acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += f(j + l);
  S s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; j < n; ++j) s += f(j);
  return s;
}

template <typename S>
inline S row_sum(const S* x, int64_t n) {
  return reduce_sum<S>(n, [&](int64_t j) { return x[j]; });
}

template <typename S>
inline S dot(const S* a, const S* b, int64_t n) {
  return reduce_sum<S>(n, [&](int64_t j) { return a[j] * b[j]; });
}

// max over x[0, n); -inf for n == 0 (and for a row that is all -inf, i.e. fully masked)
template <typename S>
inline S reduce_max(const S* x, int64_t n) {
  S acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -std::numeric_limits<S>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = acc[l] > x[j + l] ? acc[l] : x[j + l];
  S m = -std::numeric_limits<S>::infinity();
  for (int l = 0; l < kLanes; ++l) m = m > acc[l] ? m : acc[l];
  for (; j < n; ++j) m = m > x[j] ? m : x[j];
  return m;
}

#if defined(__AVX512F__) || defined(__AVX2__)
// float: the generic lane loop above compiles to 16 scalar maxss chains (GCC will not turn `a > b ? a : b` into
// maxps without -ffinite-math-only); maxps has exactly that semantics, so use it directly.
template <>
inline float reduce_max<float>(const float* x, int64_t n) {
  int64_t j = 0;
  float m = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  __m512 acc = _mm512_set1_ps(m);
  for (; j + 16 <= n; j += 16) acc = _mm512_max_ps(_mm512_loadu_ps(x + j), acc);
  m = _mm512_reduce_max_ps(acc);
#else
  __m256 acc = _mm256_set1_ps(m);
  for (; j + 8 <= n; j += 8) acc = _mm256_max_ps(_mm256_loadu_ps(x + j), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float l : lanes) m = m > l ? m : l;
#endif
  for (; j < n; ++j) m = m > x[j] ? m : x[j];
  return m;
}
#endif

// exp for float with ~1 ulp error (Cephes' expf: exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2/2, degree-6
// polynomial). Below -87 it returns exactly 0, so exp(-inf) = 0 for masked logits, and results near FLT_MIN, which
// would be denormals costing ~100x per operation in the sums and GEMMs that consume them, never appear.
inline float exp_fast(float x) {
  const bool underflow = x < -87.0f;
  x = std::min(std::max(x, -87.0f), 88.37626f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return underflow ? 0.0f : y * std::bit_cast<float>(bits);
}
inline double exp_fast(double x) { return std::exp(x); }  // the fp64 path serves gradcheck: exactness first

// Flush-to-zero / denormals-are-zero for the calling thread while in scope: softmax probabilities of far-off keys
// times a gradient scale land in the denormal range, and the backward GEMMs that read them then run ~50x slower
// (x86 microcode assists). The previous mode is restored.
class ScopedFlushDenormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  ScopedFlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~ScopedFlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// bfloat16 as raw bits, so the kernels stay torch-free.
struct bf16_t {
  uint16_t bits;
};
inline float to_float(bf16_t x) { return std::bit_cast<float>(static_cast<uint32_t>(x.bits) << 16); }
inline bf16_t to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

}  // namespace nvembed::cpu
