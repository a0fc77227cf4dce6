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
// 256 MiB, C >= 4096 unless N is smaller), the chunk's scores (256 MiB), O((B + N) d).
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
// until then auto keeps the tile kernels and NVEMBED_INFONCE_BWD=gemm opts in. Verified on an H100 on 2026-11-28
// (bench/results/h100_2026-11-28): 3.0-3.7x the tile backward's fwd + bwd, so auto picks it for bf16 / fp16.
constexpr bool kInfonceGemmBwdVerified = true;

// Which backward runs an in-batch InfoNCE (NVEMBED_INFONCE_BWD = auto | tiles | gemm): "gemm" (this file) or
// "tiles" (the op's own tile kernels). auto picks gemm only where `gemm_default` (a device path verified on a GPU).
// Any other value raises an error naming the op and the variable.
const char* infonce_bwd_choice(bool gemm_default);

// Whether the CUDA GEMM forward has run on a GPU (verified on an H100 on 2026-11-28); NVEMBED_INFONCE_FWD = auto |
// tiles | gemm picks the forward of an in-batch InfoNCE as infonce_bwd_choice does the backward. auto keeps the tile
// forward (kInfonceGemmFwdDefault): measured alone there, the Hopper tile forward took 0.515 ms against the GEMM
// forward's 0.686 (B 4096, N 32768, d 1024, bf16), and on other GPUs the pair has not been timed.
constexpr bool kInfonceGemmFwdVerified = true;
constexpr bool kInfonceGemmFwdDefault = false;
const char* infonce_fwd_choice(bool gemm_default);

// Columns per chunk of the GEMM forward: NVEMBED_INFONCE_CHUNK_COLS if set, else the largest multiple of 256 whose
// B x c accumulation-dtype scores fit 256 MiB (at least 256), at most N.
int64_t infonce_fwd_chunk(int64_t B, int64_t N, int64_t acc_bytes);

// One chunk of the GEMM forward: scores [R, c] (contiguous, fp32 / fp64 for fp64 inputs; not modified) are the
// unscaled logits of R queries against c docs; row r's target doc is column r*G - col0 (col0 may be negative: a row
// block of queries that starts at query r0 passes col0 = c0 - r0*G for a chunk that starts at doc c0). run_max /
// run_sum [R] hold the running max of the scaled logits and the sum of exp(logit - max) (start: -inf / 0) and are
// updated with the chunk's; target[r] = scores[r, r*G - col0] / t for the rows whose target lies in the chunk (other
// rows untouched). Null: the ATen version.
using InfoNCEChunkLseFn = void (*)(at::Tensor& scores, at::Tensor& run_max, at::Tensor& run_sum, at::Tensor& target,
                                   int64_t col0, int64_t group_size, double inv_temperature);

// (loss, lse) of an in-batch InfoNCE in the accumulation dtype (0-dim mean loss, [B] lse); queries [B, d], docs
// [N >= B*G, d] contiguous. No input checks: the op's launchers check first.
std::tuple<at::Tensor, at::Tensor> infonce_fwd_gemm(const at::Tensor& queries, const at::Tensor& docs,
                                                    int64_t group_size, double temperature,
                                                    InfoNCEChunkLseFn chunk_lse);

// Block and chunk widths (C, c): NVEMBED_INFONCE_BLOCK_COLS / NVEMBED_INFONCE_CHUNK_COLS if set (tests: many
// small, ragged ones), else the largest multiples of 256 whose B x C probabilities fit NVEMBED_INFONCE_BLOCK_MB
// (default 256; C at least 4096) and whose B x c accumulation-dtype scores fit 256 MiB (c at least 256); c <= C <= N.
struct InfoNCEGemmWidths {
  int64_t block, chunk;
};
InfoNCEGemmWidths infonce_gemm_widths(int64_t B, int64_t N, int64_t elem_bytes);

// probs [R, c] (out, dtype of the inputs; unit column stride, any row stride) = exp(scores / t - lse) with column
// r*G - col0 of row r zeroed where it lies in the chunk (col0 as for InfoNCEChunkLseFn); neg_prob_sum [R] += the
// row sums of those probabilities in the accumulation dtype, before their rounding to probs' dtype (both versions
// do so). scores is contiguous fp32 (fp64 for fp64 inputs) and may be overwritten. probs either shares no memory
// with scores or is written over them: row r of probs starts where row r of scores does (same data pointer, row
// stride c * sizeof(accumulation dtype) / sizeof(probs' dtype)). Null: the ATen version (any device).
using InfoNCEChunkGradFn = void (*)(at::Tensor& scores, const at::Tensor& lse, at::Tensor& neg_prob_sum,
                                    at::Tensor& probs, int64_t col0, int64_t group_size, double inv_temperature);

// The chunk functions' preconditions as the CUDA kernels read them through raw pointers (scores contiguous [R, c] in
// the accumulation dtype; the row vectors contiguous [R] of that dtype; probs [R, c] with unit column stride, in
// the inputs' dtype; one device). Both implementations check them (TORCH_INTERNAL_ASSERT), so the CPU tests of the
// ATen versions also prove that the loops call them as the CUDA launchers need.
void infonce_check_chunk_lse(const at::Tensor& scores, const at::Tensor& run_max, const at::Tensor& run_sum,
                             const at::Tensor& target);
void infonce_check_chunk_grad(const at::Tensor& scores, const at::Tensor& lse, const at::Tensor& neg_prob_sum,
                              const at::Tensor& probs);

// Gradients (queries, docs) in the inputs' dtype; queries [B, d], docs [N >= B*G, d] contiguous, lse [B] in the
// accumulation dtype (fp32, fp64 for fp64 inputs), grad_loss a 0-dim tensor on the same device (never read on the
// host). No input checks: the op's launchers check first.
std::tuple<at::Tensor, at::Tensor> infonce_bwd_gemm(const at::Tensor& grad_loss, const at::Tensor& queries,
                                                    const at::Tensor& docs, const at::Tensor& lse,
                                                    int64_t group_size, double temperature,
                                                    InfoNCEChunkGradFn chunk_grad);

// ---- gradients formed in the forward (NVEMBED_INFONCE_GRAD=fused) ------------------------------------------------
// The loss is a mean, so its gradient for any upstream g is g times the gradient for g = 1: when the inputs need
// gradients, the forward can form them while the logits are at hand and the backward only scales them (as fused
// linear-cross-entropy kernels do). That removes the backward's recomputation of the logits: three GEMMs of 2 B N d
// FLOPs in all (the naive loss's count) instead of four. Rows blocks of R queries, each with all N docs:
//   S_R  = Q_R D^T                                  [R, N] fp32, one GEMM
//   lse_R, target logits                            one pass over S_R (the chunk-lse kernel)
//   P_R  = exp(S_R / t - lse), targets zeroed       written over S_R in the input dtype (the chunk-grad kernel, in
//                                                   place: P_R's row r starts where S_R's does; neg_prob_sum)
//   dQ_R = (P_R D - neg_prob_sum D_target) / (B t)  written once (fp32 parts, the target term exact)
//   P_R's targets := P_t - 1 = -neg_prob_sum        so that dD's update is one GEMM with no target terms
//   dD  += P_R^T Q_R / (B t)                        accumulated as the plan says (InfoNCEFusedAcc)
// Memory beyond the inputs and the gradients: S_R (P_R lives in it), one fp32 part of dQ_R (min(R, rows of 64 MiB)
// x d) and, for the kFp32 accumulator, N d fp32 plus one <= 64 MiB fp32 part of the block's update. Every plan
// rounds the targets' P_t - 1 to the input dtype for dD's GEMM (dQ applies it in fp32).

// Where the row blocks' dD updates accumulate.
enum class InfoNCEFusedAcc : int {
  kNone = 0,    // one row block holds all B queries: dD = P^T Q written once (one rounding to the input dtype)
  kFp32 = 1,    // an fp32 [N, d] accumulator, updated in 64 MiB fp32 GEMM parts (16 N d bytes of traffic per block),
                // scaled and rounded to the input dtype once at the end (bf16 / fp16 inputs only)
  kOutput = 2,  // straight into the output: each block's GEMM adds alpha P^T Q_R to dD in the input dtype (cuBLAS
                // beta = 1, fp32 arithmetic, one rounding per block: B / R roundings of the running sum in bf16 /
                // fp16, error growing ~ sqrt(B / R); exact accumulation in the fp32 / fp64 output for those inputs)
};

struct InfoNCEFusedPlan {
  int64_t rows;  // queries per row block, 1..B
  InfoNCEFusedAcc acc;
};

// Whether the fused forward has run on a GPU; NVEMBED_INFONCE_GRAD = auto | backward | fused picks, for an in-batch
// InfoNCE whose inputs need gradients, between the backward (infonce_bwd_choice's) and gradients formed in the
// forward. Any other value raises an error naming the op and the variable. Verified on an H100 on 2026-11-28
// (bench/results/h100_2026-11-28): fwd + bwd 1.18-2.09x the naive loss, 609 TFLOP/s at B 16384, d 4096, a tenth of
// its memory; auto picks it for bf16 / fp16 on CUDA.
constexpr bool kInfonceFusedGradVerified = true;
const char* infonce_grad_choice(bool fused_default);

// The fused forward's row blocks and accumulator for B queries, N docs of width d and inputs of elem_bytes bytes.
// The budget M = NVEMBED_INFONCE_FUSED_MB MiB (default 1024) holds a block's scores (R N 4 bytes, 8 for fp64; the
// probabilities are written over them) and the kFp32 accumulator (N d 4) where there is one. NVEMBED_INFONCE_FUSED_ACC
// = auto | fp32 | output and NVEMBED_INFONCE_ROW_BLOCK (a positive integer) override the choice:
//   all B rows fit M                            -> R = B, kNone
//   bf16 / fp16, accumulator + 4096 rows fit M  -> kFp32, R = the multiple of 256 that fills M (>= 4096): below
//                                                  4096 rows the accumulator's traffic passes ~10% of a block's
//                                                  three GEMMs (6 R N d FLOPs) at H100-class rate and bandwidth
//   otherwise                                   -> kOutput, R = the multiple of 256 that fills M, at least 1024 (the
//                                                  output's read + write, 4 N d bytes, against a block's GEMMs)
// fp32 / fp64 inputs always accumulate in the output (it has the accumulation dtype: no copy, no extra rounding).
// With NVEMBED_INFONCE_ROW_BLOCK set and the accumulator auto: kFp32 where it fits M beside the block, else kOutput.
// Where all B rows fit M and the accumulator is not forced to fp32, one block (kNone) whatever else was asked.
InfoNCEFusedPlan infonce_fused_plan(int64_t B, int64_t N, int64_t d, int64_t elem_bytes);

// (loss, grad_queries, grad_docs) of an in-batch InfoNCE for an upstream gradient of 1: the loss in the accumulation
// dtype (0-dim mean), the gradients in the inputs' dtype. queries [B, d], docs [N >= B*G, d] contiguous; chunk_lse /
// chunk_grad as above (null: the ATen versions). No input checks: the op's launchers check first.
std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_fwd_grad_gemm(const at::Tensor& queries,
                                                                     const at::Tensor& docs, int64_t group_size,
                                                                     double temperature, InfoNCEChunkLseFn chunk_lse,
                                                                     InfoNCEChunkGradFn chunk_grad);

}  // namespace nvembed
