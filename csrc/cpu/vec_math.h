// Vectorizable scalar math shared by the CPU kernels (torch-free). No -ffast-math in this build (masking relies
// on -inf), so reductions use kLanes independent partial results, which the compiler vectorizes without
// reassociating one loop-carried chain, and exp is a branch-free polynomial instead of libm's expf.
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

// GCC 12's AVX512 intrinsics seed their unused pass-through operand with a self-initialized temporary
// (_mm512_undefined_ps), which -Wmaybe-uninitialized reports at every inlined use: a known false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
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
  // four independent chains: one would wait on maxps's latency every 16 elements
  __m512 a0 = _mm512_set1_ps(m), a1 = a0, a2 = a0, a3 = a0;
  for (; j + 64 <= n; j += 64) {
    a0 = _mm512_max_ps(_mm512_loadu_ps(x + j), a0);
    a1 = _mm512_max_ps(_mm512_loadu_ps(x + j + 16), a1);
    a2 = _mm512_max_ps(_mm512_loadu_ps(x + j + 32), a2);
    a3 = _mm512_max_ps(_mm512_loadu_ps(x + j + 48), a3);
  }
  for (; j + 16 <= n; j += 16) a0 = _mm512_max_ps(_mm512_loadu_ps(x + j), a0);
  m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3)));
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
// The constants of exp_fast and exp_fast16 (AVX512), shared so the scalar tails and the vector bodies agree.
struct ExpConst {
  static constexpr float kLo = -87.0f, kHi = 88.37626f;  // below kLo: 0; kHi: the largest finite result
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 = kLn2Hi + kLn2Lo
  static constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
};

inline float exp_fast(float x) {
  using C = ExpConst;
  const bool underflow = x < C::kLo;
  x = std::min(std::max(x, C::kLo), C::kHi);
  const float n = std::floor(x * C::kLog2e + 0.5f);
  const float r = x - n * C::kLn2Hi - n * C::kLn2Lo;
  float y = C::kP[0];
  for (int i = 1; i < 6; ++i) y = y * r + C::kP[i];
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return underflow ? 0.0f : y * std::bit_cast<float>(bits);
}
inline double exp_fast(double x) { return std::exp(x); }  // the fp64 path serves gradcheck: exactness first

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

template <typename Out, typename S>
inline Out store_as(S x) {
  if constexpr (std::is_same_v<Out, bf16_t>) return to_bf16(x); else return static_cast<Out>(x);
}

// out[j] = exp(x[j] * scale - shift) for j < n, returning the sum of the exponentials before any rounding to Out:
// one pass where a softmax would otherwise write the row, read it again for the sum and again to round it. out may
// be x itself (same type). Vectorized like reduce_sum (kLanes partial sums).
template <typename S, typename Out>
inline S exp_sum(const S* x, int64_t n, S scale, S shift, Out* out) {
  S acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const S e = exp_fast(x[j + l] * scale - shift);
      acc[l] += e;
      out[j + l] = store_as<Out>(e);
    }
  S s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; j < n; ++j) {
    const S e = exp_fast(x[j] * scale - shift);
    s += e;
    out[j] = store_as<Out>(e);
  }
  return s;
}

#if defined(__AVX512F__)
// exp_fast on 16 lanes (the same range reduction and polynomial; NaN stays NaN, below -87 exactly 0).
inline __m512 exp_fast16(__m512 x) {
  using C = ExpConst;
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(C::kLo), _CMP_LT_OQ);
  // max_ps / min_ps return their second operand where either is NaN: x second keeps a NaN
  x = _mm512_min_ps(_mm512_set1_ps(C::kHi), _mm512_max_ps(_mm512_set1_ps(C::kLo), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(C::kLog2e), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C::kLn2Lo), _mm512_fnmadd_ps(n, _mm512_set1_ps(C::kLn2Hi), x));
  __m512 y = _mm512_set1_ps(C::kP[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(C::kP[i]));
  y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(y, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~underflow), y, _mm512_castsi512_ps(bits));
}

// 16 floats rounded to bf16 (nearest even, NaN stays NaN), as to_bf16.
inline __m256i to_bf16x16(__m512 v) {
#if defined(__AVX512BF16__)
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
#endif
}

template <typename Out>
inline void store16(Out* out, __m512 v) {
  if constexpr (std::is_same_v<Out, bf16_t>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), to_bf16x16(v));
  } else {
    _mm512_storeu_ps(out, v);
  }
}

// exp_sum for float rows, 32 lanes at a time in two independent chains (GCC does not vectorize the generic loop
// well when the output is bf16).
template <typename Out>
inline float exp_sum_avx512(const float* x, int64_t n, float scale, float shift, Out* out) {
  const __m512 vs = _mm512_set1_ps(scale), vb = _mm512_set1_ps(shift);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 e0 = exp_fast16(_mm512_fmsub_ps(_mm512_loadu_ps(x + j), vs, vb));
    const __m512 e1 = exp_fast16(_mm512_fmsub_ps(_mm512_loadu_ps(x + j + 16), vs, vb));
    a0 = _mm512_add_ps(a0, e0);
    a1 = _mm512_add_ps(a1, e1);
    store16(out + j, e0);
    store16(out + j + 16, e1);
  }
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp_fast16(_mm512_fmsub_ps(_mm512_loadu_ps(x + j), vs, vb));
    a0 = _mm512_add_ps(a0, e);
    store16(out + j, e);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, _mm512_add_ps(a0, a1));
  float s = 0.f;
  for (float l : lanes) s += l;
  for (; j < n; ++j) {
    const float e = exp_fast(x[j] * scale - shift);
    s += e;
    out[j] = store_as<Out>(e);
  }
  return s;
}
template <>
inline float exp_sum<float, float>(const float* x, int64_t n, float scale, float shift, float* out) {
  return exp_sum_avx512(x, n, scale, shift, out);
}
template <>
inline float exp_sum<float, bf16_t>(const float* x, int64_t n, float scale, float shift, bf16_t* out) {
  return exp_sum_avx512(x, n, scale, shift, out);
}
#endif

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

}  // namespace nvembed::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
