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

// ---- row kernels of the token path: LayerNorm fused with its input (a gather / the residual), the softmax over
// the latents. Rows are contiguous; statistics in fp32 (two passes over the row: mean, then the mean square of the
// deviations, as a biased variance), outputs rounded once. ----

// One CTA per row r < rows (d columns):
//   gather   (res == nullptr): v = src[idx[r], :]                      (src: [*, d] `dtype`)
//   residual (res != nullptr): v = src[r, :] + res[r, :], written to v_out   (src: [rows, d] `dtype`, res fp32)
//   gather: v_out[r, :] = v as fp32 too (the LayerNorm backward's input and the residual's other term)
//   normed[r, :] = (v - mean) * rstd * w + b  in `dtype`;  mean[r], rstd[r] = 1 / sqrt(var + eps)
struct RowLayerNormParams {
  const void* src;
  const int64_t* idx;  // gather only
  const float* res;    // residual only
  const float* w;
  const float* b;
  float* v_out;   // [rows, d] fp32
  void* normed;   // [rows, d] `dtype`
  float* mean;    // [rows]
  float* rstd;    // [rows]
  LatentPoolDType dtype;
  int64_t rows, d;
  float eps;
};
void row_layer_norm_launch(const RowLayerNormParams& p, cudaStream_t stream);

// One warp per row of n: p = softmax(scale * scores[r, :]) into p_io (`dtype`) and, if not null, p_acc (fp32).
struct RowSoftmaxParams {
  const void* scores;  // [rows, n] `dtype`
  void* p_io;          // [rows, n] `dtype`
  float* p_acc;        // [rows, n] fp32 or null
  LatentPoolDType dtype;
  int64_t rows, n;
  float scale;
};
void row_softmax_launch(const RowSoftmaxParams& p, cudaStream_t stream);

}  // namespace nvembed::cuda
