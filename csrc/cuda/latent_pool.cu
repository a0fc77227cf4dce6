// CUDA latent pooling: the fused elementwise stages of a token chunk (contracts in latent_pool.cuh). The GEMMs of
// the layer stay cuBLAS (latent_pool_aten.cpp); these kernels replace the chains of ATen passes between them:
//   * GEGLU + masked mean over the feed-forward's [t, 2F] input, the widest tensor of the layer (2F = 32768 at
//     NV-Embed-v2 size). One CTA per (unit, 1024 columns): each thread owns 4 columns j (vector loads of u's a-half
//     and gate-half) and walks the unit's <= 64 tokens in order, keeping its fp32 sums in registers; every output
//     element has one owner: no shared memory, no atomics, no cross-thread reduction.
//   * LayerNorm with its input fused (the gather of the chunk's tokens; the attention residual): one CTA per row,
//     one read of the input, fp32 statistics, the normalized row written once in the input dtype for the next GEMM.
//   * softmax over the latents of each (token, head): one warp per row, the GEMM's io scores in, io (and, for the
//     backward, fp32) probabilities out.
// Torch-free on purpose (no ATen headers); tools/latent_pool_emu compiles this file with g++ and runs it on the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/device_utils.cuh"
#include "cuda/latent_pool.cuh"

#ifndef NVE_LAUNCH2
#define NVE_LAUNCH2(kernel, grid, threads, stream, ...) kernel<<<grid, threads, 0, stream>>>(__VA_ARGS__)
#endif

namespace nvembed::cuda {
namespace {

constexpr int kThreads = 256;
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
      const float a = to_float(xa.v[l]) + ba[l];
      const float x = to_float(xg.v[l]) + bg[l];
      const float cdf = 0.5f * (1.f + erff(x * kSqrtHalf));
      const float gelu = x * cdf;
      sg[l] += w * (a * gelu);
      if constexpr (Bwd) {
        const float dg = w * dgb[l];
        const float d_a = dg * gelu;
        const float d_gate = (dg * a) * (cdf + x * (expf(-0.5f * x * x) * kInvSqrt2Pi));
        sa[l] += d_a;
        sgt[l] += d_gate;
        da.v[l] = from_float(d_a, static_cast<T*>(nullptr));
        dgt.v[l] = from_float(d_gate, static_cast<T*>(nullptr));
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

// Calls f with a value of the element type `dtype` names (the kernels' template argument).
template <class F>
void with_type(LatentPoolDType dtype, F&& f) {
  switch (dtype) {
    case LatentPoolDType::kFloat32: f(float{}); break;
    case LatentPoolDType::kBFloat16: f(__nv_bfloat16{}); break;
    case LatentPoolDType::kFloat16: f(__half{}); break;
  }
}

template <bool Bwd>
void launch(const GegluPoolParams& p, cudaStream_t stream) {
  if (p.U == 0 || p.F == 0) return;
  const int64_t per_block = (p.vec4 ? 4 : 1) * static_cast<int64_t>(kThreads);
  const dim3 grid(static_cast<unsigned>(p.U), static_cast<unsigned>((p.F + per_block - 1) / per_block));
  with_type(p.dtype, [&](auto tag) {
    NVE_LAUNCH2((geglu_pool_kernel<decltype(tag), Bwd>), grid, kThreads, stream, p);
  });
}

// ---- row kernels -----------------------------------------------------------------------------------------------

constexpr int kRowThreads = 256, kRowWarps = kRowThreads / 32;

// The CTA's sum, in every thread; `red` [kRowWarps] shared, free again when this returns.
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kRowWarps; ++w) total += red[w];
  __syncthreads();
  return total;
}

// v_out holds the row's inputs after the first pass; each thread reads back only the elements it wrote.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) row_layer_norm_kernel(const RowLayerNormParams p) {
  __shared__ float red[kRowWarps];
  const int64_t r = blockIdx.x, d = p.d;
  const T* __restrict__ src = static_cast<const T*>(p.src) + (p.res != nullptr ? r : p.idx[r]) * d;
  float* __restrict__ v = p.v_out + r * d;
  float sum = 0.f;
  if (p.res != nullptr) {
    const float* __restrict__ res = p.res + r * d;
    for (int64_t j = threadIdx.x; j < d; j += kRowThreads) {
      const float x = to_float(src[j]) + res[j];
      v[j] = x;
      sum += x;
    }
  } else {
    for (int64_t j = threadIdx.x; j < d; j += kRowThreads) {
      const float x = to_float(src[j]);
      v[j] = x;
      sum += x;
    }
  }
  const float mean = block_sum(sum, red) / static_cast<float>(d);
  float sq = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += kRowThreads) {
    const float c = v[j] - mean;
    sq += c * c;
  }
  const float rstd = 1.f / sqrtf(block_sum(sq, red) / static_cast<float>(d) + p.eps);
  T* __restrict__ out = static_cast<T*>(p.normed) + r * d;
  for (int64_t j = threadIdx.x; j < d; j += kRowThreads) {
    out[j] = from_float((v[j] - mean) * rstd * p.w[j] + p.b[j], static_cast<T*>(nullptr));
  }
  if (threadIdx.x == 0) {
    p.mean[r] = mean;
    p.rstd[r] = rstd;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) row_softmax_kernel(const RowSoftmaxParams p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (r >= p.rows) return;  // the whole warp: the kernel has no CTA barrier
  const int lane = threadIdx.x % 32;
  const int64_t n = p.n;
  const T* __restrict__ s = static_cast<const T*>(p.scores) + r * n;
  float m = -INFINITY;
  for (int64_t j = lane; j < n; j += 32) m = fmaxf(m, to_float(s[j]) * p.scale);
  m = warp_max(m);
  float sum = 0.f;
  for (int64_t j = lane; j < n; j += 32) sum += expf(to_float(s[j]) * p.scale - m);
  const float inv = 1.f / warp_sum(sum);
  T* __restrict__ out = static_cast<T*>(p.p_io) + r * n;
  float* __restrict__ acc = p.p_acc != nullptr ? p.p_acc + r * n : nullptr;
  for (int64_t j = lane; j < n; j += 32) {
    const float e = expf(to_float(s[j]) * p.scale - m) * inv;
    out[j] = from_float(e, static_cast<T*>(nullptr));
    if (acc != nullptr) acc[j] = e;
  }
}

}  // namespace

void geglu_pool_fwd_launch(const GegluPoolParams& p, cudaStream_t stream) { launch<false>(p, stream); }
void geglu_pool_bwd_launch(const GegluPoolParams& p, cudaStream_t stream) { launch<true>(p, stream); }

void row_layer_norm_launch(const RowLayerNormParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.d == 0) return;
  const unsigned blocks = static_cast<unsigned>(p.rows);
  with_type(p.dtype, [&](auto tag) {
    NVE_LAUNCH2(row_layer_norm_kernel<decltype(tag)>, blocks, kRowThreads, stream, p);
  });
}

void row_softmax_launch(const RowSoftmaxParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.n == 0) return;
  const unsigned blocks = static_cast<unsigned>((p.rows + kRowWarps - 1) / kRowWarps);
  with_type(p.dtype, [&](auto tag) {
    NVE_LAUNCH2(row_softmax_kernel<decltype(tag)>, blocks, kRowThreads, stream, p);
  });
}

}  // namespace nvembed::cuda
