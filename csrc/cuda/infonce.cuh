// Torch-free interface between the CUDA InfoNCE kernels (infonce.cu, nvcc) and their launcher
// (infonce_launcher.cpp, host compiler): one params struct, two entry points. Plain C++ so both compilers read it.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace nvembed::cuda {

enum class InfoNCEDType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct InfoNCEParams {
  const void* queries;  // [B, d] row-major, `dtype`
  const void* docs;     // [N, d], N = B * G; docs[i*G] is query i's positive
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
};

// Enqueue the kernels on `stream`; the caller checks cudaGetLastError.
void infonce_fwd_launch(const InfoNCEParams& p, cudaStream_t stream);
void infonce_bwd_launch(const InfoNCEParams& p, cudaStream_t stream);

}  // namespace nvembed::cuda
