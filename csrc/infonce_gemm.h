// InfoNCE backward (in-batch negatives) as chunked GEMMs over ATen: the docs are split into column chunks of the
// B x N logits, and each chunk runs three library GEMMs (cuBLAS on CUDA) around one elementwise pass,
//   S_c   = Q D_c^T                        [B, c] fp32
//   P_c   = exp(S_c / t - lse), target column zeroed; neg_prob_sum += row sums      (chunk_grad)
//   dQ   += P_c D_c                        fp32 accumulator [B, d]
//   dD_c  = P_c^T Q                        written once, scaled by g / (B t)
// and the target terms (P_t - 1 = -(sum of the row's other probabilities), as in the tiled kernels: accurate when
// P_t is within the fp32 lse's rounding of 1) are applied to dQ and to the target rows of dD at the end.
// Three GEMMs of 2 B N d FLOPs each, the same count as the naive loss's backward, at the library's GEMM rate; the
// memory is the chunk (B c (4 + elem) bytes, NVEMBED_INFONCE_CHUNK_MB, default 256 MiB) plus O((B + N) d).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace nvembed {

// Whether the CUDA chunked-GEMM backward has run on a GPU (bench/gpu_check.sh: CUDA tests, memcheck, benchmark);
// until then auto keeps the tile kernels and NVEMBED_INFONCE_BWD=gemm opts in.
constexpr bool kInfonceGemmBwdVerified = false;

// Which backward runs an in-batch InfoNCE (NVEMBED_INFONCE_BWD = auto | tiles | gemm): "gemm" (this file) or
// "tiles" (the op's own tile kernels). auto picks gemm only where `gemm_default` (a device path verified on a GPU).
// Any other value raises an error naming the op and the variable.
const char* infonce_bwd_choice(bool gemm_default);

// Columns per chunk: NVEMBED_INFONCE_CHUNK_COLS if set (tests: many small chunks), else the largest multiple of 256
// whose B x c fp32 scores + elem-byte probabilities fit NVEMBED_INFONCE_CHUNK_MB (default 256), at least 256,
// at most N.
int64_t infonce_gemm_chunk_cols(int64_t B, int64_t N, int64_t elem_bytes);

// probs [B, c] (out, dtype of the inputs) = exp(scores / t - lse) with column i*G - col0 of row i zeroed where it
// lies in the chunk; neg_prob_sum [B] += the row sums of what was written. scores is fp32 (fp64 for fp64 inputs)
// and may be overwritten. Null: the ATen version (any device).
using InfoNCEChunkGradFn = void (*)(at::Tensor& scores, const at::Tensor& lse, at::Tensor& neg_prob_sum,
                                    at::Tensor& probs, int64_t col0, int64_t group_size, double inv_temperature);

// Gradients (queries, docs) in the inputs' dtype; queries [B, d], docs [N >= B*G, d] contiguous, lse [B] in the
// accumulation dtype (fp32, fp64 for fp64 inputs), grad_loss a 0-dim tensor on the same device (never read on the
// host). No input checks: the op's launchers check first.
std::tuple<at::Tensor, at::Tensor> infonce_bwd_gemm(const at::Tensor& grad_loss, const at::Tensor& queries,
                                                    const at::Tensor& docs, const at::Tensor& lse,
                                                    int64_t group_size, double temperature,
                                                    InfoNCEChunkGradFn chunk_grad);

}  // namespace nvembed
