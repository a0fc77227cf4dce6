// __global__ wrappers of the flash-attention bodies (flash_sm80.cuh) with the sm80 atoms, and their launch sequences
// per dtype and head dim. Included by the per-dtype translation units flash_{fwd,bwd}_{bf16,fp16}.cu: each one
// instantiates 3 head dims, so the CUDA build compiles the 12 kernel variants in 4 files that build in parallel.
#pragma once
#include <cuda_runtime.h>

#include "cuda/flash.cuh"
#include "cuda/flash_sm80.cuh"

namespace nvembed::cuda::fa {

template <class E, int D>
__global__ void __launch_bounds__(128) flash_fwd_kernel(const FlashParams p) {
  extern __shared__ __align__(128) char smem[];
  using C = Config<E, D>;
  fwd_body<typename C::Tr, C::kFwdBM, C::kFwdBN>(p, smem, threadIdx.x, blockIdx.x, blockIdx.y, blockIdx.z);
}

template <class E>
__global__ void __launch_bounds__(32 * kDsumWarps) flash_dsum_kernel(const FlashParams p) {
  dsum_body<E>(p, static_cast<int64_t>(blockIdx.x) * kDsumWarps + threadIdx.x / 32, blockIdx.y, threadIdx.x % 32);
}

template <class E, int D>
__global__ void __launch_bounds__(128) flash_dq_kernel(const FlashParams p) {
  extern __shared__ __align__(128) char smem[];
  using C = Config<E, D>;
  dq_body<typename C::Tr, C::kDqBM, C::kDqBN>(p, smem, threadIdx.x, blockIdx.x, blockIdx.y, blockIdx.z);
}

template <class E, int D>
__global__ void __launch_bounds__(128) flash_dkdv_kernel(const FlashParams p) {
  extern __shared__ __align__(128) char smem[];
  using C = Config<E, D>;
  dkdv_body<typename C::Tr, C::kDkvBN, C::kDkvBM>(p, smem, threadIdx.x, blockIdx.x, blockIdx.y, blockIdx.z);
}

// An empty grid (no query rows, no keys) launches nothing. The shared-memory attribute is per kernel and device;
// setting it on every launch costs about a microsecond.
template <class Kernel>
void launch(Kernel kernel, Grid g, int threads, int smem, const FlashParams& p, cudaStream_t stream) {
  if (g.x <= 0 || g.y <= 0 || g.z <= 0) return;
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  kernel<<<dim3(g.x, g.y, g.z), threads, smem, stream>>>(p);
}

template <class E, int D>
void run_fwd(const FlashParams& p, cudaStream_t stream) {
  using C = Config<E, D>;
  launch(flash_fwd_kernel<E, D>, fwd_grid<C>(p), C::Tr::kThreads, C::kSmemFwd, p, stream);
}

template <class E, int D>
void run_bwd(const FlashParams& p, cudaStream_t stream) {
  using C = Config<E, D>;
  launch(flash_dsum_kernel<E>, dsum_grid(p), 32 * kDsumWarps, 0, p, stream);
  launch(flash_dq_kernel<E, D>, dq_grid<C>(p), C::Tr::kThreads, C::kSmemDq, p, stream);
  launch(flash_dkdv_kernel<E, D>, dkdv_grid<C>(p), C::Tr::kThreads, C::kSmemDkv, p, stream);
}

template <class E>
void run_fwd_hdim(const FlashParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return run_fwd<E, 32>(p, stream);
    case 64: return run_fwd<E, 64>(p, stream);
    case 128: return run_fwd<E, 128>(p, stream);
  }
}

template <class E>
void run_bwd_hdim(const FlashParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return run_bwd<E, 32>(p, stream);
    case 64: return run_bwd<E, 64>(p, stream);
    case 128: return run_bwd<E, 128>(p, stream);
  }
}

}  // namespace nvembed::cuda::fa
