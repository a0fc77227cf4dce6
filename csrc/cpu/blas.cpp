#include "cpu/blas.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

// torch's x86-64 wheels link MKL statically and export its Fortran-style BLAS entry points. They are declared
// weak so that a torch build without them (e.g. an OpenBLAS-less aarch64 wheel) still loads: we then use loops.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// CBLAS enums: CblasRowMajor = 101, CblasNoTrans = 111, CblasTrans = 112.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
}

namespace nvembed::cpu {
namespace {

// The BLAS interfaces take 32-bit sizes: a larger one would wrap around into a wrong (or negative) size.
int blas_int(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "nvembed: a CPU GEMM size or leading dimension (", v,
              ") exceeds the 32-bit range of the BLAS interface");
  return static_cast<int>(v);
}

template <typename T>
void gemm_loops(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                int64_t ldb, T beta, T* c, int64_t ldc) {
  std::vector<T> acc(n);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) acc[j] = 0;
    for (int64_t p = 0; p < k; ++p) {
      const T av = ta ? a[p * lda + i] : a[i * lda + p];
      if (tb) {
        for (int64_t j = 0; j < n; ++j) acc[j] += av * b[j * ldb + p];
      } else {
        const T* brow = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) acc[j] += av * brow[j];
      }
    }
    T* crow = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) crow[j] = alpha * acc[j] + (beta == T(0) ? T(0) : beta * crow[j]);
  }
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the flags.
template <typename T, typename Fn>
void gemm_fortran(Fn fn, bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                  const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
  const int M = blas_int(n), N = blas_int(m), K = blas_int(k);
  // BLAS rejects leading dimensions smaller than the stored row length even when that dim is 1.
  const int la = blas_int(std::max<int64_t>(ldb, tb ? k : n));
  const int lb = blas_int(std::max<int64_t>(lda, ta ? m : k));
  const int lc = blas_int(std::max<int64_t>(ldc, n));
  fn(&tA, &tB, &M, &N, &K, &alpha, b, &la, a, &lb, &beta, c, &lc);
}

}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
    return;
  }
  if (sgemm_) return gemm_fortran<float>(sgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  gemm_loops<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0. ? 0. : beta * c[i * ldc + j];
    return;
  }
  if (dgemm_) return gemm_fortran<double>(dgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  gemm_loops<double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
          const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k > 0 && cblas_gemm_bf16bf16f32) {
    cblas_gemm_bf16bf16f32(101, ta ? 112 : 111, tb ? 112 : 111, blas_int(m), blas_int(n), blas_int(k), alpha, a,
                           blas_int(std::max<int64_t>(lda, ta ? m : k)), b,
                           blas_int(std::max<int64_t>(ldb, tb ? k : n)), beta, c, blas_int(std::max<int64_t>(ldc, n)));
    return;
  }
  auto widen = [](const uint16_t* src, int64_t rows, int64_t cols, int64_t ld) {
    std::vector<float> dst(rows * cols);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) {
        uint32_t u = static_cast<uint32_t>(src[i * ld + j]) << 16;
        float f;
        std::memcpy(&f, &u, sizeof(f));
        dst[i * cols + j] = f;
      }
    return dst;
  };
  const int64_t ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
  auto af = widen(a, ar, ac, lda);
  auto bf = widen(b, br, bc, ldb);
  gemm(ta, tb, m, n, k, alpha, af.data(), ac, bf.data(), bc, beta, c, ldc);
}

bool has_bf16_brgemm() {
  static const bool ok = at::native::cpublas::could_pack(at::kBFloat16);
  return ok;
}

void brgemm_bf16(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
                 const uint16_t* a, const uint16_t* b_vnni, float* c) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add_c, reinterpret_cast<const at::BFloat16*>(a),
                              reinterpret_cast<const at::BFloat16*>(b_vnni), c, /*is_vnni=*/true);
}

void brgemm_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

const char* blas_name() { return (sgemm_ && dgemm_) ? "mkl" : "reference-loops"; }

}  // namespace nvembed::cpu
