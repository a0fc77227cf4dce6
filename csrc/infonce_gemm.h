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

// The forward the same way (infonce_fwd_gemm): chunks of c columns of the logits, S_c = Q D_c^T as a GEMM with fp32
// output (256 MiB of scores at a time), one elementwise pass per chunk folding S_c / t into a running max and sum per
// row (the online log-sum-exp) and picking the target logits; lse = max + log(sum). One GEMM of 2 B N d FLOPs at the
// library's rate plus 8 bytes of memory traffic per logit.

// Whether the CUDA blocked-GEMM backward has run on a GPU (bench/gpu_check.sh: CUDA tests, memcheck, benchmark);
// until then auto keeps the tile kernels and NVEMBED_INFONCE_BWD=gemm opts in.
constexpr bool kInfonceGemmBwdVerified = false;

// Which backward runs an in-batch InfoNCE (NVEMBED_INFONCE_BWD = auto | tiles | gemm): "gemm" (this file) or
// "tiles" (the op's own tile kernels). auto picks gemm only where `gemm_default` (a device path verified on a GPU).
// Any other value raises an error naming the op and the variable.
const char* infonce_bwd_choice(bool gemm_default);

// Whether the CUDA GEMM forward has run on a GPU; NVEMBED_INFONCE_FWD = auto | tiles | gemm picks the forward of an
// in-batch InfoNCE as infonce_bwd_choice does the backward.
constexpr bool kInfonceGemmFwdVerified = false;
const char* infonce_fwd_choice(bool gemm_default);

// Columns per chunk of the GEMM forward: NVEMBED_INFONCE_CHUNK_COLS if set, else the largest multiple of 256 whose
// B x c accumulation-dtype scores fit 256 MiB (at least 256), at most N.
int64_t infonce_fwd_chunk(int64_t B, int64_t N, int64_t acc_bytes);

// One chunk of the GEMM forward: scores [B, c] (contiguous, fp32 / fp64 for fp64 inputs; may be overwritten) are
// the unscaled logits of docs col0 .. col0 + c - 1. run_max / run_sum [B] hold the running max of the scaled logits
// and the sum of exp(logit - max) (start: -inf / 0) and are updated with the chunk's; target[i] = scores[i, i*G -
// col0] / t for the rows whose target lies in the chunk (other rows untouched). Null: the ATen version.
using InfoNCEChunkLseFn = void (*)(at::Tensor& scores, at::Tensor& run_max, at::Tensor& run_sum, at::Tensor& target,
                                   int64_t col0, int64_t group_size, double inv_temperature);

// (loss, lse) of an in-batch InfoNCE in the accumulation dtype (0-dim mean loss, [B] lse); queries [B, d], docs
// [N >= B*G, d] contiguous. No input checks: the op's launchers check first.
std::tuple<at::Tensor, at::Tensor> infonce_fwd_gemm(const at::Tensor& queries, const at::Tensor& docs,
                                                    int64_t group_size, double temperature,
                                                    InfoNCEChunkLseFn chunk_lse);

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
