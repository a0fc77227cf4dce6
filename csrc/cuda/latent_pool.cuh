// Torch-free interface between the CUDA latent-pooling kernels (latent_pool.cu, nvcc) and their launcher
// (latent_pool_launcher.cpp, host compiler). Plain C++ so both compilers read it.
//
// The fused GEGLU + masked-mean stage of a token chunk (latent_pool_aten.h, LatentPoolKernels): the chunk's tokens
// are split into units (runs of <= kUnitTokens consecutive tokens of one batch row); one pass over the feed-forward
// input u = z W_in^T (the GEMM's output in the input dtype, without bias) computes per unit and column
//   forward   part_g[unit, j] = sum_tok w_tok * a * gelu(gate)                        a = u[tok, j] + b[j],
//   backward  the same part_g, du written over u, part_b[unit, :] = sum_tok du_tok     gate = u[tok, F + j] + b[F + j]
//             du[tok, j] = dg gelu(gate),  du[tok, F + j] = dg a gelu'(gate),  dg = w_tok * dgbar[row(unit), j]
// in fp32 (gelu with erf, as torch's default). Per token and column that is one read of u (and one write of du)
// instead of ATen's dozen fp32 passes over [t, 2F]; the caller adds the units of each batch row with a small GEMM, so
// nothing is atomic and repeated calls give the same bits.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace nvembed::cuda {

enum class LatentPoolDType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct GegluPoolParams {
  void* u;               // [t, 2F] contiguous, `dtype`; the backward overwrites it with du
  const float* bias;     // [2F]
  const float* w;        // [t] pool weight of each token of the chunk
  const int32_t* units;  // [U, 3]: first token (in the chunk), token count, batch row
  const float* dgbar;    // [B, F] backward only: gradient of the pooled GEGLU output
  float* part_g;         // [U, F] out
  float* part_b;         // [U, 2F] out, backward only
  LatentPoolDType dtype;
  int64_t U, F;
  bool vec4;  // F % 4 == 0 and u 16-byte aligned: 4 columns per thread with vector loads and stores
};

// U <= 2^31 - 1. Enqueue on `stream`; the caller checks cudaGetLastError.
void geglu_pool_fwd_launch(const GegluPoolParams& p, cudaStream_t stream);
void geglu_pool_bwd_launch(const GegluPoolParams& p, cudaStream_t stream);

}  // namespace nvembed::cuda
