// Torch-free interface of the CUTLASS Hopper GEMM (gemm_sm90.cu), used by bench/gpu_gemm_compare.py to measure
// cuBLAS (through ATen, what latent pooling runs) against CUTLASS's warp-specialized TMA + wgmma GEMM on the layer's
// shapes. No op calls it.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

namespace nvembed::cuda {

// D [M, N] = A [M, K] B [N, K]^T, bf16 row-major (contiguous), fp32 accumulation, D rounded once. M, N, K > 0,
// K and N multiples of 8 (16-byte TMA rows). Returns nullptr when enqueued on `stream`, else why not. `workspace`:
// gemm_sm90_bf16_workspace(M, N, K) bytes of device memory (may be null when that is 0).
size_t gemm_sm90_bf16_workspace(int M, int N, int K);
const char* gemm_sm90_bf16(const void* a, const void* b, void* d, int M, int N, int K, void* workspace,
                           cudaStream_t stream);

}  // namespace nvembed::cuda
