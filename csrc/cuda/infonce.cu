// CUDA InfoNCE, plain kernels: CUDA C++ with fp32 FMA tiles through shared memory. They serve fp32 inputs, the
// own-group mode (any dtype) and NVEMBED_INFONCE_CUDA_PLAIN=1; bf16 / fp16 with in-batch negatives take the
// tensor-core kernels of infonce_tc.cu (the launcher decides).
//
// docs has N >= B*G rows with in-batch negatives (rows B*G.. are extra negatives of every query), N = B*G without.
// Logits S = Q D^T / t are produced one 64 x 64 tile at a time (score_tile) and never stored in global memory:
//   forward  : one block per 64 query rows loops over all doc tiles with a running max / sum per row.
//   backward : dS = (exp(S - lse) - onehot) * grad_loss / (B t) is recomputed per tile; dQ comes from a kernel
//              whose blocks own query rows (loop over doc tiles), dDocs from a second kernel whose blocks own doc
//              rows (loop over query tiles). Every output row has one owner block, so no atomics anywhere.
//              As on the CPU, the tiles skip the target column: its coefficient P_t - 1 is applied at the end as
//              -(sum of the row's other probabilities), which stays accurate when P_t is within 1e-3 of 1 (the
//              fp32 lse, ~1/t in size, carries an absolute rounding error that P_t - 1 would amplify).
// Without in-batch negatives each query only sees its own G docs: one warp per query row, G dot products.
// Torch-free on purpose (no ATen headers): nvcc compiles this file fast; infonce_launcher.cpp owns the tensors.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/device_utils.cuh"
#include "cuda/infonce.cuh"

// tools/infonce_emu compiles this file with g++ and runs the kernels on CPU threads (it defines NVE_LAUNCH).
#ifndef NVE_LAUNCH
#define NVE_LAUNCH(kernel, blocks, threads, stream, ...) kernel<<<blocks, threads, 0, stream>>>(__VA_ARGS__)
#endif

namespace nvembed::cuda {
namespace {

constexpr int kBM = 64;        // query rows per tile
constexpr int kBN = 64;        // docs per tile
constexpr int kBK = 32;        // embedding columns per shared-memory stage of the score mainloop
constexpr int kBD = 64;        // embedding columns per stage of the gradient update
constexpr int kThreads = 256;  // 16 x 16 threads, each owning a 4 x 4 sub-tile (rows ty + 16 i, cols tx + 16 j)
constexpr int kPad = 1;        // +1 column: k-major stores and row reads hit distinct banks
constexpr int kWarpsPerBlock = kThreads / 32;

static_assert(kBM == 64 && kBN == 64 && kBD == 64 && kThreads == 256, "the 16 x 16 x (4 x 4) mapping below");


// The 16 threads sharing a row (tx = 0..15) sit in one half warp: xor shuffles with offsets < 16 stay inside it.
__device__ __forceinline__ float half_warp_max(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Shared memory of the tiled kernels: the score mainloop's two k-major stages, reused as one [64][64] operand
// stage of the gradient update (the two phases are separated by __syncthreads).
union TileSmem {
  struct {
    float a[kBK][kBM + kPad];  // queries[row0 + r][k0 + k] at a[k][r]
    float b[kBK][kBN + kPad];  // docs[col0 + c][k0 + k] at b[k][c]
  } score;
  float operand[kBN][kBD + kPad];
};

// acc[i][j] = <queries[row0 + ty + 16 i], docs[col0 + tx + 16 j]> (unscaled), 0 outside [B) x [N).
// Ends with __syncthreads, so the caller may reuse `sm` right away.
template <typename T>
__device__ __forceinline__ void score_tile(const T* __restrict__ q, const T* __restrict__ docs, int64_t B,
                                           int64_t N, int64_t d, int64_t row0, int64_t col0, TileSmem& sm,
                                           float (&acc)[4][4]) {
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < d; k0 += kBK) {
    // consecutive threads read consecutive k of one row: coalesced global loads
#pragma unroll
    for (int it = 0; it < kBM * kBK / kThreads; ++it) {
      const int e = tid + it * kThreads;
      const int r = e / kBK, k = e % kBK;
      const int64_t gk = k0 + k;
      const int64_t gr = row0 + r, gc = col0 + r;
      sm.score.a[k][r] = (gr < B && gk < d) ? to_float(q[gr * d + gk]) : 0.f;
      sm.score.b[k][r] = (gc < N && gk < d) ? to_float(docs[gc * d + gk]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kBK; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sm.score.a[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sm.score.b[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
}

// ---- forward ----------------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) infonce_fwd_in_batch_kernel(const InfoNCEParams p) {
  __shared__ TileSmem sm;
  const T* q = static_cast<const T*>(p.queries);
  const T* docs = static_cast<const T*>(p.docs);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;

  float run_max[4], run_sum[4], target[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    run_max[i] = -INFINITY;
    run_sum[i] = 0.f;
    target[i] = 0.f;
  }
  for (int64_t col0 = 0; col0 < p.N; col0 += kBN) {
    float acc[4][4];
    score_tile<T>(q, docs, p.B, p.N, p.d, row0, col0, sm, acc);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row0 + ty + 16 * i;
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = col0 + tx + 16 * j;
        acc[i][j] *= p.inv_temperature;
        if (col < p.N) tile_max = fmaxf(tile_max, acc[i][j]);
        if (col == row * p.G) target[i] = acc[i][j];
      }
      // col0 < N, so the lane with tx = 0 holds a valid column: new_max is finite.
      const float new_max = fmaxf(run_max[i], half_warp_max(tile_max));
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (col0 + tx + 16 * j < p.N) sum += __expf(acc[i][j] - new_max);
      sum = half_warp_sum(sum);
      run_sum[i] = run_sum[i] * __expf(run_max[i] - new_max) + sum;  // exp(-inf) = 0 on the first tile
      run_max[i] = new_max;
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float tgt = half_warp_sum(target[i]);  // exactly one lane of the row saw the target column
    const int64_t row = row0 + ty + 16 * i;
    if (tx == 0 && row < p.B) {
      // (max - target) + log(sum), not lse - target: keeps a small loss (dominant positive) from being rounded
      // to the ulp of the 1/t-sized lse first.
      const float log_sum = logf(run_sum[i]);
      p.lse[row] = run_max[i] + log_sum;
      p.row_loss[row] = (run_max[i] - tgt) + log_sum;
    }
  }
}

// One warp per query: its G logits with an online log-sum-exp. Returns (lse, loss = (max - first) + log(sum)).
template <typename T>
__device__ __forceinline__ float2 own_group_lse(const T* __restrict__ qi, const T* __restrict__ group, int64_t d,
                                                int64_t G, float inv_t) {
  const int lane = threadIdx.x % 32;
  float run_max = -INFINITY, run_sum = 0.f, first = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    const T* dg = group + g * d;
    float s = 0.f;
    for (int64_t k = lane; k < d; k += 32) s = fmaf(to_float(qi[k]), to_float(dg[k]), s);
    s = warp_sum(s) * inv_t;
    if (g == 0) first = s;
    const float new_max = fmaxf(run_max, s);
    run_sum = run_sum * __expf(run_max - new_max) + __expf(s - new_max);
    run_max = new_max;
  }
  const float log_sum = logf(run_sum);
  return make_float2(run_max + log_sum, (run_max - first) + log_sum);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) infonce_fwd_own_group_kernel(const InfoNCEParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (i >= p.B) return;  // warp-uniform
  const T* qi = static_cast<const T*>(p.queries) + i * p.d;
  const T* group = static_cast<const T*>(p.docs) + i * p.G * p.d;
  const float2 r = own_group_lse(qi, group, p.d, p.G, p.inv_temperature);
  if (threadIdx.x % 32 == 0) {
    p.lse[i] = r.x;
    p.row_loss[i] = r.y;
  }
}

// ---- backward ---------------------------------------------------------------------------------------------------

// dS tile into ds[r][c] (rows row0.., cols col0..), 0 outside [B) x [N) and at the target column; adds each of
// the thread's rows' partial sums to row_sum[i] (row ty + 16 i).
template <typename T>
__device__ __forceinline__ void grad_score_tile(const InfoNCEParams& p, const T* q, const T* docs, int64_t row0,
                                                int64_t col0, float scale, TileSmem& sm,
                                                float (&ds)[kBM][kBN + kPad], float (&row_sum)[4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4];
  score_tile<T>(q, docs, p.B, p.N, p.d, row0, col0, sm, acc);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + ty + 16 * i;
    const float lse = row < p.B ? p.lse_in[row] : 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = col0 + tx + 16 * j;
      float v = 0.f;
      if (row < p.B && col < p.N && col != row * p.G) v = __expf(acc[i][j] * p.inv_temperature - lse) * scale;
      ds[ty + 16 * i][tx + 16 * j] = v;
      row_sum[i] += v;
    }
  }
  __syncthreads();
}

// dQ[row0 : row0 + 64] += dS D over all doc tiles; the block owns these rows.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) infonce_bwd_dq_kernel(const InfoNCEParams p) {
  __shared__ TileSmem sm;
  __shared__ float ds[kBM][kBN + kPad];
  const T* q = static_cast<const T*>(p.queries);
  const T* docs = static_cast<const T*>(p.docs);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const float scale = *p.grad_loss * p.inv_batch_temperature;
  float row_sum[4] = {};
  for (int64_t col0 = 0; col0 < p.N; col0 += kBN) {
    grad_score_tile<T>(p, q, docs, row0, col0, scale, sm, ds, row_sum);
    for (int64_t k0 = 0; k0 < p.d; k0 += kBD) {
#pragma unroll
      for (int it = 0; it < kBN * kBD / kThreads; ++it) {
        const int e = tid + it * kThreads;
        const int c = e / kBD, k = e % kBD;
        const int64_t gc = col0 + c, gk = k0 + k;
        sm.operand[c][k] = (gc < p.N && gk < p.d) ? to_float(docs[gc * p.d + gk]) : 0.f;
      }
      __syncthreads();
      float out[4][4] = {};
#pragma unroll 8
      for (int c = 0; c < kBN; ++c) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = ds[ty + 16 * i][c];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = sm.operand[c][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) out[i][j] = fmaf(a[i], b[j], out[i][j]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t row = row0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t k = k0 + tx + 16 * j;
          if (row < p.B && k < p.d) p.grad_queries[row * p.d + k] += out[i][j];
        }
      }
      __syncthreads();  // sm.operand is rewritten next stage; ds next doc tile
    }
  }
  // Target terms: dQ[row] -= neg_prob_sum[row] * docs[row * G]; publish neg_prob_sum for the dDocs kernel.
  __shared__ float neg_sum[kBM];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float sum = half_warp_sum(row_sum[i]);
    const int64_t row = row0 + ty + 16 * i;
    if (tx == 0) {
      neg_sum[ty + 16 * i] = sum;
      if (row < p.B) p.neg_prob_sum[row] = sum;
    }
  }
  __syncthreads();  // also orders the grad_queries updates above before the ones below
  for (int64_t e = tid; e < static_cast<int64_t>(kBM) * p.d; e += kThreads) {
    const int r = static_cast<int>(e / p.d);
    const int64_t k = e % p.d, row = row0 + r;
    if (row < p.B) p.grad_queries[row * p.d + k] -= neg_sum[r] * to_float(docs[row * p.G * p.d + k]);
  }
}

// dDocs[col0 : col0 + 64] += dS^T Q over all query tiles; the block owns these doc rows.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) infonce_bwd_ddocs_kernel(const InfoNCEParams p) {
  __shared__ TileSmem sm;
  __shared__ float ds[kBM][kBN + kPad];
  const T* q = static_cast<const T*>(p.queries);
  const T* docs = static_cast<const T*>(p.docs);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const float scale = *p.grad_loss * p.inv_batch_temperature;
  float unused_row_sum[4] = {};
  for (int64_t row0 = 0; row0 < p.B; row0 += kBM) {
    grad_score_tile<T>(p, q, docs, row0, col0, scale, sm, ds, unused_row_sum);
    for (int64_t k0 = 0; k0 < p.d; k0 += kBD) {
#pragma unroll
      for (int it = 0; it < kBM * kBD / kThreads; ++it) {
        const int e = tid + it * kThreads;
        const int r = e / kBD, k = e % kBD;
        const int64_t gr = row0 + r, gk = k0 + k;
        sm.operand[r][k] = (gr < p.B && gk < p.d) ? to_float(q[gr * p.d + gk]) : 0.f;
      }
      __syncthreads();
      float out[4][4] = {};  // out[i][j]: doc col0 + ty + 16 i, column k0 + tx + 16 j
#pragma unroll 8
      for (int r = 0; r < kBM; ++r) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = ds[r][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = sm.operand[r][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) out[i][j] = fmaf(a[i], b[j], out[i][j]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t doc = col0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t k = k0 + tx + 16 * j;
          if (doc < p.N && k < p.d) p.grad_docs[doc * p.d + k] += out[i][j];
        }
      }
      __syncthreads();
    }
  }
  // Target terms: docs[i * G] is row i's target: dDocs[i * G] -= neg_prob_sum[i] * queries[i] (from the dQ kernel,
  // which ran before on the same stream). Rows from B*G on are extra negatives: no query targets them.
  __syncthreads();
  for (int64_t e = threadIdx.x; e < static_cast<int64_t>(kBN) * p.d; e += kThreads) {
    const int64_t doc = col0 + e / p.d, k = e % p.d;
    if (doc < p.N && doc % p.G == 0 && doc / p.G < p.B) {
      const int64_t i = doc / p.G;
      p.grad_docs[doc * p.d + k] -= p.neg_prob_sum[i] * to_float(q[i * p.d + k]);
    }
  }
}

// One warp per query; it owns grad_queries[i] and grad_docs[i*G : (i+1)*G]. Like the CPU kernel it renormalizes
// its G logits instead of reading lse_in, so the probabilities match the logits as rounded here.
template <typename T>
__global__ void __launch_bounds__(kThreads) infonce_bwd_own_group_kernel(const InfoNCEParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (i >= p.B) return;  // warp-uniform
  const int lane = threadIdx.x % 32;
  const T* qi = static_cast<const T*>(p.queries) + i * p.d;
  const T* group = static_cast<const T*>(p.docs) + i * p.G * p.d;
  const float scale = *p.grad_loss * p.inv_batch_temperature;
  const float lse = own_group_lse(qi, group, p.d, p.G, p.inv_temperature).x;
  float* gq = p.grad_queries + i * p.d;
  // negatives g = 1..G-1 first; the positive's coefficient is -(their sum), as in the in-batch kernels
  float others = 0.f;
  for (int64_t g = 1; g <= p.G; ++g) {
    const int64_t gg = g < p.G ? g : 0;
    const T* dg = group + gg * p.d;
    float coef;
    if (gg != 0) {
      float s = 0.f;
      for (int64_t k = lane; k < p.d; k += 32) s = fmaf(to_float(qi[k]), to_float(dg[k]), s);
      s = warp_sum(s) * p.inv_temperature;
      coef = __expf(s - lse) * scale;
      others += coef;
    } else {
      coef = -others;
    }
    float* gd = p.grad_docs + (i * p.G + gg) * p.d;
    for (int64_t k = lane; k < p.d; k += 32) {
      gq[k] += coef * to_float(dg[k]);  // lane-owned columns: no race
      gd[k] = coef * to_float(qi[k]);
    }
  }
}

// ---- blocked-GEMM backward (infonce_gemm.h): the elementwise pass between its GEMMs -------------------------

// probs[j + l] = exp(scores / t - lse) from the row's fp32 scores x[l] (l < V, one vector store), 0 in the target
// column; adds them to sum. k = log2(e) / t, shift = log2(e) lse.
template <typename T, int V>
__device__ __forceinline__ void store_probs(T* out, int64_t j, const float (&x)[V], int64_t target, float k,
                                            float shift, float& sum) {
  Pack<T, V> v;
#pragma unroll
  for (int l = 0; l < V; ++l) {
    const float e = j + l == target ? 0.f : exp2f(fmaf(x[l], k, -shift));
    sum += e;
    v.v[l] = from_float(e, static_cast<T*>(nullptr));
  }
  *reinterpret_cast<Pack<T, V>*>(out + j) = v;
}

// One block per row of the chunk: probs[r, j] = exp(scores[r, j] / t - lse[r]), 0 in the row's target column
// r*G - col0 (its P_t - 1 is applied by the caller as -neg_prob_sum), neg_prob_sum[r] += the row's fp32 sum. One
// owner per row and launches in stream order: deterministic, no atomics.
template <typename T>
__global__ void __launch_bounds__(kThreads) infonce_chunk_grad_kernel(const InfoNCEChunkGradParams p) {
  __shared__ float warp_part[kWarpsPerBlock];
  const int64_t row = blockIdx.x;
  // no __restrict__: in place, out and s are the same row
  const float* s = p.scores + row * p.cols;
  T* out = static_cast<T*>(p.probs) + row * p.probs_ld;
  constexpr float kLog2e = 1.4426950408889634f;
  const float k = p.inv_temperature * kLog2e, shift = p.lse[row] * kLog2e;
  const int64_t target = row * p.G - p.col0;  // outside [0, cols) when the row's positive is in another chunk
  float sum = 0.f;
  if (p.in_place) {
    // probs element j overlays the bytes of score j * sizeof(T) / 4 <= j. A pass reads its columns [j0, j0 + W)
    // into registers, then (barrier: every thread's reads of this pass and the earlier ones are done) writes them:
    // the writes cover scores [j0 s, (j0 + W) s) with s = sizeof(T) / 4 <= 1, all read by then, and none that a later
    // pass reads (>= j0 + W). The trip count is the same for every thread (the barrier); kUnroll loads in flight.
    constexpr int kUnroll = 4;
    const int width = p.vec4 ? 4 : 1;
    const int64_t pass = static_cast<int64_t>(width) * kThreads * kUnroll;
    for (int64_t j0 = 0; j0 < p.cols; j0 += pass) {
      float x[kUnroll][4];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + (static_cast<int64_t>(u) * kThreads + threadIdx.x) * width;
        if (j >= p.cols) continue;
        if (p.vec4) {
          const float4 v = *reinterpret_cast<const float4*>(s + j);
          x[u][0] = v.x, x[u][1] = v.y, x[u][2] = v.z, x[u][3] = v.w;
        } else {
          x[u][0] = s[j];
        }
      }
      __syncthreads();
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + (static_cast<int64_t>(u) * kThreads + threadIdx.x) * width;
        if (j >= p.cols) continue;
        if (p.vec4) {
          store_probs<T, 4>(out, j, x[u], target, k, shift, sum);
        } else {
          const float x1[1] = {x[u][0]};
          store_probs<T, 1>(out, j, x1, target, k, shift, sum);
        }
      }
    }
  } else if (p.vec4) {
    for (int64_t j = 4 * static_cast<int64_t>(threadIdx.x); j < p.cols; j += 4 * kThreads) {
      const float4 v = *reinterpret_cast<const float4*>(s + j);
      const float x[4] = {v.x, v.y, v.z, v.w};
      store_probs<T, 4>(out, j, x, target, k, shift, sum);
    }
  } else {
    for (int64_t j = threadIdx.x; j < p.cols; j += kThreads) {
      const float x[1] = {s[j]};
      store_probs<T, 1>(out, j, x, target, k, shift, sum);
    }
  }
  sum = warp_sum(sum);
  if (threadIdx.x % 32 == 0) warp_part[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kWarpsPerBlock; ++w) total += warp_part[w];
    p.neg_prob_sum[row] += total;
  }
}

// (max, sum of exp(x - max)) pairs: merged so that an empty side (max = -inf, sum = 0) changes nothing.
__device__ __forceinline__ void lse_merge(float& m, float& sum, float m2, float sum2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;  // both empty
  sum = sum * exp2f((m - mm) * 1.4426950408889634f) + sum2 * exp2f((m2 - mm) * 1.4426950408889634f);
  m = mm;
}

// One block per row of the chunk: the row's (max, sum) of x = scores / t over the chunk, merged into run_max /
// run_sum[r] (one owner per row, launches in stream order: deterministic); the target logit of row r (column
// r*G - col0) when it lies in the chunk. Each thread keeps its own online pair over its columns (a rescale only when
// its max grows), then warp shuffles and the block's warps merge them in a fixed order.
__global__ void __launch_bounds__(kThreads) infonce_chunk_lse_kernel(const InfoNCEChunkLseParams p) {
  __shared__ float warp_m[kWarpsPerBlock], warp_s[kWarpsPerBlock];
  const int64_t row = blockIdx.x;
  const float* __restrict__ s = p.scores + row * p.cols;
  constexpr float kLog2e = 1.4426950408889634f;
  const float k = p.inv_temperature;
  const int64_t target = row * p.G - p.col0;  // outside [0, cols) when the row's positive is in another chunk
  float m = -INFINITY, sum = 0.f;
  auto add = [&](float x) {
    if (x > m) {
      sum = sum * exp2f((m - x) * kLog2e) + 1.f;
      m = x;
    } else {
      sum += exp2f((x - m) * kLog2e);
    }
  };
  if (p.vec4) {
    for (int64_t j = 4 * static_cast<int64_t>(threadIdx.x); j < p.cols; j += 4 * kThreads) {
      const float4 v = *reinterpret_cast<const float4*>(s + j);
      add(v.x * k), add(v.y * k), add(v.z * k), add(v.w * k);
    }
  } else {
    for (int64_t j = threadIdx.x; j < p.cols; j += kThreads) add(s[j] * k);
  }
  if (target >= 0 && target < p.cols && threadIdx.x == (p.vec4 ? (target / 4) % kThreads : target % kThreads)) {
    p.target[row] = s[target] * k;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, sum, o);
    lse_merge(m, sum, m2, s2);
  }
  if (threadIdx.x % 32 == 0) warp_m[threadIdx.x / 32] = m, warp_s[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float bm = p.run_max[row], bs = p.run_sum[row];
    for (int w = 0; w < kWarpsPerBlock; ++w) lse_merge(bm, bs, warp_m[w], warp_s[w]);
    p.run_max[row] = bm;
    p.run_sum[row] = bs;
  }
}

template <typename T>
void fwd(const InfoNCEParams& p, cudaStream_t stream) {
  if (p.in_batch_negatives) {
    const unsigned blocks = static_cast<unsigned>((p.B + kBM - 1) / kBM);
    NVE_LAUNCH(infonce_fwd_in_batch_kernel<T>, blocks, kThreads, stream, p);
  } else {
    const unsigned blocks = static_cast<unsigned>((p.B + kWarpsPerBlock - 1) / kWarpsPerBlock);
    NVE_LAUNCH(infonce_fwd_own_group_kernel<T>, blocks, kThreads, stream, p);
  }
}

template <typename T>
void bwd(const InfoNCEParams& p, cudaStream_t stream) {
  if (p.in_batch_negatives) {
    const unsigned q_blocks = static_cast<unsigned>((p.B + kBM - 1) / kBM);
    const unsigned d_blocks = static_cast<unsigned>((p.N + kBN - 1) / kBN);
    NVE_LAUNCH(infonce_bwd_dq_kernel<T>, q_blocks, kThreads, stream, p);
    NVE_LAUNCH(infonce_bwd_ddocs_kernel<T>, d_blocks, kThreads, stream, p);
  } else {
    const unsigned blocks = static_cast<unsigned>((p.B + kWarpsPerBlock - 1) / kWarpsPerBlock);
    NVE_LAUNCH(infonce_bwd_own_group_kernel<T>, blocks, kThreads, stream, p);
  }
}

}  // namespace

void infonce_fwd_launch(const InfoNCEParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case InfoNCEDType::kFloat32: return fwd<float>(p, stream);
    case InfoNCEDType::kBFloat16: return fwd<__nv_bfloat16>(p, stream);
    case InfoNCEDType::kFloat16: return fwd<__half>(p, stream);
  }
}

void infonce_bwd_launch(const InfoNCEParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case InfoNCEDType::kFloat32: return bwd<float>(p, stream);
    case InfoNCEDType::kBFloat16: return bwd<__nv_bfloat16>(p, stream);
    case InfoNCEDType::kFloat16: return bwd<__half>(p, stream);
  }
}

void infonce_chunk_lse_launch(const InfoNCEChunkLseParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return;
  NVE_LAUNCH(infonce_chunk_lse_kernel, static_cast<unsigned>(p.rows), kThreads, stream, p);
}

void infonce_chunk_grad_launch(const InfoNCEChunkGradParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return;
  const unsigned blocks = static_cast<unsigned>(p.rows);
  switch (p.dtype) {
    case InfoNCEDType::kFloat32: NVE_LAUNCH(infonce_chunk_grad_kernel<float>, blocks, kThreads, stream, p); break;
    case InfoNCEDType::kBFloat16:
      NVE_LAUNCH(infonce_chunk_grad_kernel<__nv_bfloat16>, blocks, kThreads, stream, p);
      break;
    case InfoNCEDType::kFloat16: NVE_LAUNCH(infonce_chunk_grad_kernel<__half>, blocks, kThreads, stream, p); break;
  }
}

}  // namespace nvembed::cuda
