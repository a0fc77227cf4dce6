// InfoNCE backward (in-batch negatives) as blocked GEMMs over ATen (cuBLAS on CUDA): the B x N logits are visited
// one block of C docs at a time, and a block's probabilities one chunk of c <= C columns at a time:
//   per chunk  S_c  = Q D_c^T                     [B, c] fp32 (then freed)
//              P_c  = exp(S_c / t - lse), target column zeroed, into columns of P_C; neg_prob_sum += row sums
//   per block  dQ  += P_C D_C                     fp32 accumulator [B, d] (added one row block at a time)
//              dD_C = P_C^T Q                     written once, scaled by g / (B t)
// and the target terms (P_t - 1 = -(sum of the row's other probabilities), as in the tiled kernels: accurate when
// P_t is within the fp32 lse's rounding of 1) are applied to dQ and to the target rows of dD at the end.
// Three GEMMs of 2 B N d FLOPs each, the same count as the naive loss's backward, at the library's GEMM rate. Why
// two widths: every block re-reads and re-writes the fp32 dQ (16 B d bytes), which costs ~400 / C of the GEMM time
// at H100-class rate and bandwidth, so C wants to be thousands of columns; the block's probabilities are B C elem
// bytes but its fp32 scores, twice as big, exist one chunk at a time. Memory: P_C (NVEMBED_INFONCE_BLOCK_MB, default
// 256 MiB, C >= 4096 unless N is smaller), the chunk's scores (64 MiB), O((B + N) d).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace nvembed {

// Whether the CUDA blocked-GEMM backward has run on a GPU (bench/gpu_check.sh: CUDA tests, memcheck, benchmark);
// until then auto keeps the tile kernels and NVEMBED_INFONCE_BWD=gemm opts in.
constexpr bool kInfonceGemmBwdVerified = false;

// Which backward runs an in-batch InfoNCE (NVEMBED_INFONCE_BWD = auto | tiles | gemm): "gemm" (this file) or
// "tiles" (the op's own tile kernels). auto picks gemm only where `gemm_default` (a device path verified on a GPU).
// Any other value raises an error naming the op and the variable.
const char* infonce_bwd_choice(bool gemm_default);

// Block and chunk widths (C, c): NVEMBED_INFONCE_BLOCK_COLS / NVEMBED_INFONCE_CHUNK_COLS if set (tests: many
// small, ragged ones), else the largest multiples of 256 whose B x C probabilities fit NVEMBED_INFONCE_BLOCK_MB
// (default 256; C at least 4096) and whose B x c accumulation-dtype scores fit 64 MiB (c at least 256); c <= C <= N.
struct InfoNCEGemmWidths {
  int64_t block, chunk;
};
InfoNCEGemmWidths infonce_gemm_widths(int64_t B, int64_t N, int64_t elem_bytes);

// probs [B, c] (out, dtype of the inputs; unit column stride, any row stride) = exp(scores / t - lse) with column
// i*G - col0 of row i zeroed where it lies in the chunk; neg_prob_sum [B] += the row sums of what was written.
// scores is contiguous fp32 (fp64 for fp64 inputs) and may be overwritten. Null: the ATen version (any device).
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
