// Torch-free interface between the CUDA InfoNCE kernels (infonce.cu, nvcc) and their launcher
// (infonce_launcher.cpp, host compiler): one params struct, two entry points. Plain C++ so both compilers read it.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace nvembed::cuda {

enum class InfoNCEDType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct InfoNCEParams {
  const void* queries;  // [B, d] row-major, `dtype`
  const void* docs;     // [N, d]: docs[i*G] is query i's positive; N = B*G, or more with in-batch negatives
                        // (rows B*G.. are extra negatives shared by every query)
  InfoNCEDType dtype;
  int64_t B, N, d, G;
  float inv_temperature;
  bool in_batch_negatives;  // softmax over all N docs (target i*G), else over the own G docs (target 0)

  // forward outputs (fp32)
  float* lse;       // [B]
  float* row_loss;  // [B] lse - target logit; the launcher reduces it to the mean

  // backward
  const float* lse_in;     // [B] as saved by the forward
  const float* grad_loss;  // device scalar: read on the device, so the backward never syncs the host
  float inv_batch_temperature;  // 1 / (B * temperature)
  float* grad_queries;  // [B, d] fp32, zero-initialized (the kernels accumulate into it)
  float* grad_docs;     // [N, d] fp32, zero-initialized
  float* neg_prob_sum;  // [B] fp32 workspace: written by the dQ kernel, read by the dDocs kernel

  // tensor-core backward only: the gradients in `dtype`, written once per element (no fp32 [N, d] buffer)
  void* grad_queries_out;  // [B, d]
  void* grad_docs_out;     // [N, d]
};

// Plain kernels (infonce.cu): any dtype, either mode. Enqueue on `stream`; the caller checks cudaGetLastError.
void infonce_fwd_launch(const InfoNCEParams& p, cudaStream_t stream);
void infonce_bwd_launch(const InfoNCEParams& p, cudaStream_t stream);

// ---- blocked-GEMM backward (infonce_gemm.h): its elementwise pass (infonce.cu) ----
struct InfoNCEChunkGradParams {
  const float* scores;  // [rows, cols] fp32, row-major: Q D_chunk^T, unscaled
  const float* lse;     // [rows] as saved by the forward
  float* neg_prob_sum;  // [rows] += each row's sum of the fp32 probabilities before their rounding to probs' dtype
                        // (its target column excluded), as the ATen version sums them
  void* probs;          // [rows, cols] `dtype`, row stride probs_ld: exp(scores / t - lse), 0 at column r*G - col0
                        // of row r
  InfoNCEDType dtype;
  int64_t rows, cols, probs_ld, col0, G;
  float inv_temperature;
  bool vec4;  // cols and probs_ld % 4 == 0, scores 16-byte and probs 4-element aligned: float4 loads
  bool in_place;  // probs is written over scores: probs == scores, probs_ld = cols * 4 / sizeof(dtype) (row r of
                  // probs starts where row r of scores does); otherwise they share no memory
};
// rows <= 2^31 - 1 (one block per row).
void infonce_chunk_grad_launch(const InfoNCEChunkGradParams& p, cudaStream_t stream);

// ---- GEMM forward (infonce_gemm.h): its elementwise pass, an online log-sum-exp over one chunk of columns ----
struct InfoNCEChunkLseParams {
  const float* scores;  // [rows, cols] fp32, row-major: Q D_chunk^T, unscaled
  float* run_max;       // [rows] running max of scores / t (start -inf), updated
  float* run_sum;       // [rows] running sum of exp(scores / t - run_max) (start 0), updated
  float* target;        // [rows] scores[r, r*G - col0] / t where that column is in the chunk
  int64_t rows, cols, col0, G;
  float inv_temperature;
  bool vec4;  // cols % 4 == 0 and scores 16-byte aligned: float4 loads
};
// rows <= 2^31 - 1 (one block per row).
void infonce_chunk_lse_launch(const InfoNCEChunkLseParams& p, cudaStream_t stream);

// ---- tensor-core path (infonce_tc.cu): bf16 / fp16, in-batch negatives, d % 8 == 0, 16-byte aligned rows ----

// How the work is split, from the problem size and the device (infonce_tc_plan); sizes of the workspaces the caller
// allocates (fp32, contents irrelevant: every element read is written first).
struct InfoNCETCPlan {
  int fwd_splits;             // doc-tile ranges per query block in the forward (combined by a second kernel)
  int q_splits;               // dQ pass: doc ranges per query block
  int64_t q_chunk_blocks;     // dQ pass: query blocks per launch (bounds the scratch)
  int d_splits;               // dDocs pass: query ranges per doc block
  int64_t d_chunk_blocks;     // dDocs pass: doc blocks per launch
  int64_t fwd_part_floats;    // fwd_splits * B, twice (running max, running sum)
  int64_t scratch_floats;     // max over both passes of splits * chunk_blocks * 128 * d
  int64_t part_negsum_floats; // q_splits * B
  bool sm90_fwd = false;      // the forward's tile pass on the Hopper kernel (infonce_sm90.cuh; set by the caller)
};

struct InfoNCETCWorkspace {
  float* fwd_part_max;  // [fwd_splits, B]
  float* fwd_part_sum;  // [fwd_splits, B]
  float* fwd_target;    // [B] target logit
  float* scratch;       // [scratch_floats] partial gradient rows
  float* part_negsum;   // [q_splits, B]
};

// True if the device can run the tensor-core kernels (sm_80+, enough opt-in shared memory); `why` gets the reason
// when not (may be null).
bool infonce_tc_supported(int device, const char** why);
InfoNCETCPlan infonce_tc_plan(const InfoNCEParams& p, int device);
void infonce_tc_fwd_launch(const InfoNCEParams& p, const InfoNCETCPlan& plan, const InfoNCETCWorkspace& ws,
                           cudaStream_t stream);
// Writes p.grad_queries_out, p.grad_docs_out and p.neg_prob_sum.
void infonce_tc_bwd_launch(const InfoNCEParams& p, const InfoNCETCPlan& plan, const InfoNCETCWorkspace& ws,
                           cudaStream_t stream);

}  // namespace nvembed::cuda
