// Row-major GEMM tiles for the CPU kernels: C[m x n] = alpha * op(A)[m x k] * op(B)[k x n] + beta * C.
// Torch-free interface; the implementation (blas.cpp) calls the BLAS that torch ships (MKL on x86-64) and falls
// back to a plain blocked loop where that BLAS is not exported. Each call is single-threaded when issued from
// inside a parallel region: the kernels parallelize over (batch, head, block) themselves.
#pragma once
#include <cstdint>

namespace nvembed::cpu {

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// bfloat16 tiles (raw bit patterns) with fp32 accumulation and output: MKL's cblas_gemm_bf16bf16f32 (AMX /
// AVX512-BF16 where the CPU has them) when torch exports it, else converted to fp32 tiles.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
          int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Batch-reduce GEMM on bf16 with fp32 output (oneDNN micro-kernels through torch, AMX where present), the fast
// path for small repeated tiles: C[m x n] (+)= A[m x k] (row-major, lda) * B, where B is [k x n] in VNNI layout
// (pack_vnni in the kernels: pairs of k interleaved, k even, ldb = n). Only where has_bf16_brgemm().
bool has_bf16_brgemm();
void brgemm_bf16(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
                 const uint16_t* a, const uint16_t* b_vnni, float* c);
// Releases the calling thread's micro-kernel state (AMX tile configuration) after a run of brgemm_bf16 calls.
void brgemm_release();

// Name of the BLAS the tiles run on ("mkl" or "reference-loops"), for build_info().
const char* blas_name();

}  // namespace nvembed::cpu
