// The CPU kernels' vector math (csrc/cpu/vec_math.h) against double-precision libm, built by tests/test_vec_math.py
// for several ISAs (AVX512 with and without AVX512-BF16, AVX2, baseline x86-64): exp_sum on every length 0..100 (the
// vector bodies and their tails) with random, special (±0, ±inf, NaN, the -87 underflow and 88.38 overflow edges)
// and scaled inputs; its float and bf16 outputs (bf16 = to_bf16 of the float result, NaN stays NaN), in place; its
// sum; reduce_max. Exit status 0 when every check holds; the first failures are printed.
#include "cpu/vec_math.h"
#include <cmath>
#include <cstdio>
#include <vector>
#include <random>
using namespace nvembed::cpu;
// counts every failed check; prints the first few
int fails = 0;
void fail(const char* what, int64_t n, int64_t j, double a, double b) {
  if (fails++ < 10) std::printf("FAIL %s n=%ld j=%ld got %.9g want %.9g\n", what, (long)n, (long)j, a, b);
}
int main() {
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> u(-120.f, 100.f);
  const float specials[] = {0.f, -0.f, 1.f, -87.f, -87.0001f, -86.9999f, 88.37f, 88.5f, 1e30f, -1e30f, INFINITY,
                            -INFINITY, NAN, 1e-30f, -1e-30f};
  for (int64_t n = 0; n <= 100; ++n) {
    for (int rep = 0; rep < 3; ++rep) {
      std::vector<float> x(n), y(n), xs(n);
      std::vector<bf16_t> yb(n);
      for (int64_t j = 0; j < n; ++j) x[j] = (rep == 2 && j % 3 == 0) ? specials[(j / 3) % 15] : u(rng);
      const float scale = rep == 1 ? 0.125f : 1.f, shift = rep == 1 ? -2.f : 3.f;
      xs = x;
      const float s = exp_sum(x.data(), n, scale, shift, y.data());
      const float sb = exp_sum(x.data(), n, scale, shift, yb.data());
      const float si = exp_sum(xs.data(), n, scale, shift, xs.data());  // in place
      double want_sum = 0;
      bool any_nan = false;
      for (int64_t j = 0; j < n; ++j) {
        const double arg = double(x[j] * scale - shift);
        double want = std::exp(arg);
        if (std::isnan(arg)) any_nan = true;
        const float got = y[j];
        if (std::isnan(arg)) {
          if (!std::isnan(got)) fail("nan", n, j, got, want);
        } else if (arg < -87.0) {
          if (got != 0.f) fail("underflow", n, j, got, 0);
          want = 0;
        } else if (arg > 88.37626) {
          if (!(got > 1e38f)) fail("overflow", n, j, got, want);  // clamped to exp(88.376), or inf
          want = got;
        } else if (std::fabs(got - want) > 4e-7 * want) {
          fail("exp", n, j, got, want);
        }
        if (!std::isnan(got)) {
          const bf16_t r = to_bf16(got);
          if (yb[j].bits != r.bits) fail("bf16", n, j, yb[j].bits, r.bits);
        } else if ((yb[j].bits & 0x7fff) <= 0x7f80) {
          fail("bf16 nan", n, j, yb[j].bits, 0x7fc0);
        }
        if (xs[j] != got && !(std::isnan(xs[j]) && std::isnan(got))) fail("in place", n, j, xs[j], got);
        want_sum += std::isnan(got) ? 0 : got;
      }
      if (any_nan) {
        if (!std::isnan(s) || !std::isnan(sb)) fail("sum nan", n, -1, s, NAN);
      } else if (want_sum > 3.4e38 ? !std::isinf(s) : std::fabs(s - want_sum) > 1e-6 * want_sum) {
        fail("sum", n, -1, s, want_sum);
      } else if (s != sb || s != si) {
        fail("sum", n, -1, s, want_sum);
      }
      // reduce_max against a plain loop (no NaN inputs)
      std::vector<float> m(n);
      for (int64_t j = 0; j < n; ++j) m[j] = std::isnan(x[j]) ? -1.f : x[j];
      float want_max = -INFINITY;
      for (float v : m) want_max = v > want_max ? v : want_max;
      if (reduce_max(m.data(), n) != want_max) fail("max", n, -1, reduce_max(m.data(), n), want_max);
    }
  }
  std::printf("%d failures\n", fails);
  return fails != 0;
}
