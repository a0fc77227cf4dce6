// CUDA latent pooling: the fused GEGLU + masked-mean stage of a token chunk (contract in latent_pool.cuh). The
// GEMMs of the layer stay cuBLAS (latent_pool_aten.cpp); this file replaces the elementwise passes over the
// feed-forward's [t, 2F] input, the widest tensor of the layer (2F = 32768 at NV-Embed-v2 size).
//
// One CTA per (unit, 1024 columns): each thread owns 4 columns j (vector loads of u's a-half and gate-half) and
// walks the unit's <= kUnitTokens tokens in order, keeping its fp32 sums in registers; every output element has one
// owner, so there is no shared memory, no atomics and no cross-thread reduction.
// Torch-free on purpose (no ATen headers); tools/latent_pool_emu compiles this file with g++ and runs it on the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/latent_pool.cuh"

#ifndef NVE_LAUNCH2
#define NVE_LAUNCH2(kernel, grid, threads, stream, ...) kernel<<<grid, threads, 0, stream>>>(__VA_ARGS__)
#endif

namespace nvembed::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_f(float x, float* out) { *out = x; }
__device__ __forceinline__ void from_f(float x, __half* out) { *out = __float2half_rn(x); }
__device__ __forceinline__ void from_f(float x, __nv_bfloat16* out) { *out = __float2bfloat16_rn(x); }

template <typename T, int V>
struct alignas(V * sizeof(T)) Pack {
  T v[V];
};

constexpr float kSqrtHalf = 0.70710678118654752f;   // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)

// Columns [j0, j0 + V) of the unit's tokens: the forward's sums, or (Bwd) also du and its sums.
template <typename T, int V, bool Bwd>
__device__ __forceinline__ void geglu_unit(const GegluPoolParams& p, int64_t j0) {
  const int64_t F = p.F, unit = blockIdx.x;
  const int32_t first = p.units[3 * unit], count = p.units[3 * unit + 1], row = p.units[3 * unit + 2];
  T* __restrict__ u = static_cast<T*>(p.u);
  float ba[V], bg[V], dgb[V], sg[V], sa[V], sgt[V];
#pragma unroll
  for (int l = 0; l < V; ++l) {
    ba[l] = p.bias[j0 + l];
    bg[l] = p.bias[F + j0 + l];
    dgb[l] = Bwd ? p.dgbar[row * F + j0 + l] : 0.f;
    sg[l] = sa[l] = sgt[l] = 0.f;
  }
  for (int32_t i = 0; i < count; ++i) {
    const int64_t tok = first + i;
    const float w = p.w[tok];
    T* ua = u + tok * 2 * F + j0;
    T* ug = ua + F;
    const Pack<T, V> xa = *reinterpret_cast<const Pack<T, V>*>(ua);
    const Pack<T, V> xg = *reinterpret_cast<const Pack<T, V>*>(ug);
    Pack<T, V> da, dgt;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const float a = to_f(xa.v[l]) + ba[l];
      const float x = to_f(xg.v[l]) + bg[l];
      const float cdf = 0.5f * (1.f + erff(x * kSqrtHalf));
      const float gelu = x * cdf;
      sg[l] += w * (a * gelu);
      if constexpr (Bwd) {
        const float dg = w * dgb[l];
        const float d_a = dg * gelu;
        const float d_gate = (dg * a) * (cdf + x * (expf(-0.5f * x * x) * kInvSqrt2Pi));
        sa[l] += d_a;
        sgt[l] += d_gate;
        from_f(d_a, &da.v[l]);
        from_f(d_gate, &dgt.v[l]);
      }
    }
    if constexpr (Bwd) {
      *reinterpret_cast<Pack<T, V>*>(ua) = da;
      *reinterpret_cast<Pack<T, V>*>(ug) = dgt;
    }
  }
#pragma unroll
  for (int l = 0; l < V; ++l) {
    p.part_g[unit * F + j0 + l] = sg[l];
    if constexpr (Bwd) {
      p.part_b[unit * 2 * F + j0 + l] = sa[l];
      p.part_b[unit * 2 * F + F + j0 + l] = sgt[l];
    }
  }
}

template <typename T, bool Bwd>
__global__ void __launch_bounds__(kThreads) geglu_pool_kernel(const GegluPoolParams p) {
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (p.vec4) {
    if (4 * col < p.F) geglu_unit<T, 4, Bwd>(p, 4 * col);
  } else {
    if (col < p.F) geglu_unit<T, 1, Bwd>(p, col);
  }
}

template <bool Bwd>
void launch(const GegluPoolParams& p, cudaStream_t stream) {
  if (p.U == 0 || p.F == 0) return;
  const int64_t per_block = (p.vec4 ? 4 : 1) * static_cast<int64_t>(kThreads);
  const dim3 grid(static_cast<unsigned>(p.U), static_cast<unsigned>((p.F + per_block - 1) / per_block));
  switch (p.dtype) {
    case LatentPoolDType::kFloat32: NVE_LAUNCH2((geglu_pool_kernel<float, Bwd>), grid, kThreads, stream, p); break;
    case LatentPoolDType::kBFloat16:
      NVE_LAUNCH2((geglu_pool_kernel<__nv_bfloat16, Bwd>), grid, kThreads, stream, p);
      break;
    case LatentPoolDType::kFloat16: NVE_LAUNCH2((geglu_pool_kernel<__half, Bwd>), grid, kThreads, stream, p); break;
  }
}

}  // namespace

void geglu_pool_fwd_launch(const GegluPoolParams& p, cudaStream_t stream) { launch<false>(p, stream); }
void geglu_pool_bwd_launch(const GegluPoolParams& p, cudaStream_t stream) { launch<true>(p, stream); }

}  // namespace nvembed::cuda
