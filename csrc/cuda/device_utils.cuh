// Device helpers shared by the plain CUDA kernels (infonce.cu, latent_pool.cu): conversions between the input
// dtypes and fp32, vector packs of input-dtype elements, warp reductions. Torch-free; the CPU emulators compile it
// with g++ too (tools/cuda_emu).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace nvembed::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// x rounded to the element type of the (unused) pointer argument: from_float(x, static_cast<T*>(nullptr))
__device__ __forceinline__ float from_float(float x, float*) { return x; }
__device__ __forceinline__ __half from_float(float x, __half*) { return __float2half_rn(x); }
__device__ __forceinline__ __nv_bfloat16 from_float(float x, __nv_bfloat16*) { return __float2bfloat16_rn(x); }

// V consecutive elements, aligned for one vector load / store
template <typename T, int V>
struct alignas(V * sizeof(T)) Pack {
  T v[V];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace nvembed::cuda
