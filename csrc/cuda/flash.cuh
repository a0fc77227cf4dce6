// Torch-free interface between the CUDA flash-attention kernels (flash_*.cu, nvcc) and their launcher
// (flash_launcher.cpp, host compiler). Plain C++ so both compilers read it.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace nvembed::cuda {

enum class FlashDType : int { kBFloat16 = 1, kFloat16 = 2 };

// Every tensor is contiguous. q / out / dout / dq are [rows, Hq, D] and k / v / dk / dv are [rows, Hkv, D], where
// the rows of sequence b start at cu_q[b] (cu_k[b]), or at b * seqlen_q (b * seqlen_k) when cu_q (cu_k) is null:
// dense [B, L, H, D] tensors are the special case of equal-length sequences. lse / dsum are fp32: [B, Hq, seqlen_q]
// when cu_q is null, else [Hq, total_q].
struct FlashParams {
  FlashDType dtype;
  int head_dim;   // 32, 64 or 128
  int batch;
  int heads_q, heads_kv;
  int seqlen_q, seqlen_k;  // dense length, or the longest sequence (cu_* given): the grid covers it
  int64_t total_q;         // rows of q
  int64_t total_k;         // rows of k / v
  const int* cu_q;         // [batch + 1] device int32, or null
  const int* cu_k;
  float scale;             // softmax(scale * q k^T); any finite value, negative included

  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // natural log; +inf for a row without keys (its output is 0)

  // backward
  const void* dout;
  const void* out_in;  // the forward's output
  const float* lse_in;
  float* dsum;  // workspace, lse's layout: rowsum(dout * out)
  void* dq;
  void* dk;
  void* dv;
};

// Enqueue on `stream` (one translation unit per dtype and direction); the caller checks cudaGetLastError.
// p.head_dim must be 32, 64 or 128 (checked by the launcher); the device must be sm_80 or newer. The forward writes
// out and lse; the backward writes dsum (workspace), dq, dk and dv.
void flash_fwd_bf16(const FlashParams& p, cudaStream_t stream);
void flash_fwd_fp16(const FlashParams& p, cudaStream_t stream);
void flash_bwd_bf16(const FlashParams& p, cudaStream_t stream);
void flash_bwd_fp16(const FlashParams& p, cudaStream_t stream);

// The Hopper forward (flash_sm90.cuh): sm_90a devices only, head dims 64 and 128. Compiled only when the build
// targets sm_90a (NVEMBED_HAS_SM90A); the launcher picks it (flash_kernel_for).
void flash_fwd_sm90_bf16(const FlashParams& p, cudaStream_t stream);
void flash_fwd_sm90_fp16(const FlashParams& p, cudaStream_t stream);
// The Hopper backward (flash_sm90_bwd.cuh), same conditions: dsum, then the dQ and dK / dV kernels.
void flash_bwd_sm90_bf16(const FlashParams& p, cudaStream_t stream);
void flash_bwd_sm90_fp16(const FlashParams& p, cudaStream_t stream);

}  // namespace nvembed::cuda
