// Tiled InfoNCE on the CPU: torch-free kernel templates over raw pointers (the launcher is infonce.cpp).
//
// queries Q [B, d], docs D [N, d], row-major: N = B*G grouped rows (docs[i*G] is query i's positive, the next G-1
// its hard negatives) followed, with in-batch negatives only, by E = N - B*G extra rows that are negatives for every
// query (e.g. other ranks' docs). The in-batch kernels walk all N columns and find the target at i*G; the own-group
// kernels touch only the first B*G rows, and the launcher requires N == B*G there.
// Logits S = Q D^T / t are never materialized: the kernels walk (query block x doc block) tiles of at most
// kQueryBlock x kDocBlock scores, produced by a BLAS tile, and keep a running max / sum per query row (forward), or
// recompute the tile and apply P = exp(S - lse) (backward).
// T is the compute type: float (float32 and bfloat16 inputs) or double (float64 inputs, for gradcheck).
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/blas.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"

namespace nvembed::cpu {

template <typename T>
struct InfoNCEParams {
  const T* queries;  // [B, d]
  const T* docs;     // [N, d], N >= B * G (N == B * G without in-batch negatives); docs[i*G] is query i's positive
  int64_t B, N, d, G;
  T inv_temperature;
  bool in_batch_negatives;  // softmax over all N docs (target i*G), else over the query's own G docs (target 0)

  // forward outputs
  T* lse;       // [B] log-sum-exp of each query row's logits
  T* row_loss;  // [B] lse - target logit

  // backward
  const T* lse_in;  // [B] as saved by the forward
  T grad_scale;     // grad_loss / (B * temperature): d loss / d S_ij = (P_ij - onehot_ij) * grad_loss / B
  T* grad_queries;  // [B, d], zero-initialized (tiles accumulate into it)
  T* grad_docs;     // [N, d], zero-initialized
  T* neg_prob_sum;  // [B] workspace, zero-initialized: grad_scale * sum of the non-target probabilities per row
};

// 128 query rows x 512 docs of fp32 scores is a 256 KB tile: it stays in L2 between the score GEMM, the softmax
// pass over it and (backward) the two gradient GEMMs that read it back, and each GEMM is big enough for MKL's
// micro-kernel to run near peak (k = d >= 32 typically).
constexpr int64_t kQueryBlock = 128;
constexpr int64_t kDocBlock = 512;


// sum_j exp(x[j] - shift)
template <typename T>
inline T row_sum_exp(const T* x, int64_t n, T shift) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += exp_fast(x[j + l] - shift);
  T s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; j < n; ++j) s += exp_fast(x[j] - shift);
  return s;
}

// x[j] = exp(x[j] - shift) * scale, in place
template <typename T>
inline void row_exp_scale(T* x, int64_t n, T shift, T scale) {
  for (int64_t j = 0; j < n; ++j) x[j] = exp_fast(x[j] - shift) * scale;
}



// ---- forward --------------------------------------------------------------------------------------------------

// In-batch negatives: parallel over query blocks; each block streams every doc block through one score tile.
template <typename T>
void infonce_fwd_in_batch(const InfoNCEParams<T>& p) {
  const int64_t QB = std::min(kQueryBlock, p.B), NB = std::min(kDocBlock, p.N);
  const int64_t num_qblocks = (p.B + QB - 1) / QB;
  run_tasks(num_qblocks, [&](std::atomic<int64_t>& next) {
    ScopedFlushDenormals ftz;
    std::vector<T> scores(QB * NB), run_max(QB), run_sum(QB), target(QB);
    for (int64_t blk; (blk = next.fetch_add(1)) < num_qblocks;) {
      const int64_t r0 = blk * QB, rows = std::min(QB, p.B - r0);
      std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<T>::infinity());
      std::fill(run_sum.begin(), run_sum.end(), T(0));
      std::fill(target.begin(), target.end(), T(0));
      for (int64_t c0 = 0; c0 < p.N; c0 += NB) {
        const int64_t cols = std::min(NB, p.N - c0);
        gemm(false, true, rows, cols, p.d, p.inv_temperature, p.queries + r0 * p.d, p.d, p.docs + c0 * p.d, p.d,
             T(0), scores.data(), NB);
        for (int64_t r = 0; r < rows; ++r) {
          const T* s = scores.data() + r * NB;
          const T m = std::max(run_max[r], reduce_max(s, cols));
          // run_max is -inf only before the first tile, where run_sum is 0 and exp(-inf) = 0.
          run_sum[r] = run_sum[r] * std::exp(run_max[r] - m) + row_sum_exp(s, cols, m);
          run_max[r] = m;
          const int64_t tgt = (r0 + r) * p.G;
          if (tgt >= c0 && tgt < c0 + cols) target[r] = s[tgt - c0];
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const T log_sum = std::log(run_sum[r]);
        p.lse[r0 + r] = run_max[r] + log_sum;
        // (max - target) + log_sum, not lse - target: with a dominant positive the loss is ~log_sum << lse, and
        // forming lse first would round log_sum to the ulp of lse (1/t-sized logits) before the subtraction.
        p.row_loss[r0 + r] = (run_max[r] - target[r]) + log_sum;
      }
    }
  });
}

// Own-group negatives only: G dot products per query, no GEMM needed.
template <typename T>
void infonce_fwd_own_group(const InfoNCEParams<T>& p) {
  parallel_for(p.B, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> s(p.G);
    for (int64_t i = begin; i < end; ++i) {
      const T* q = p.queries + i * p.d;
      for (int64_t g = 0; g < p.G; ++g) s[g] = dot(q, p.docs + (i * p.G + g) * p.d, p.d) * p.inv_temperature;
      const T m = reduce_max(s.data(), p.G);
      T sum = 0;
      for (int64_t g = 0; g < p.G; ++g) sum += std::exp(s[g] - m);
      const T log_sum = std::log(sum);
      p.lse[i] = m + log_sum;
      p.row_loss[i] = (m - s[0]) + log_sum;  // see infonce_fwd_in_batch
    }
  });
}

template <typename T>
void infonce_fwd(const InfoNCEParams<T>& p) {
  if (p.in_batch_negatives)
    infonce_fwd_in_batch(p);
  else
    infonce_fwd_own_group(p);
}

// ---- backward -------------------------------------------------------------------------------------------------

// In-batch negatives. A tile's gradient dS = (P - onehot) * grad_scale feeds two GEMMs: dQ_blk += dS D_blk and
// dD_blk += dS^T Q_blk. dQ rows belong to one query block, but every query block adds into every dD row, so the
// dD reduction must not race. Options: (a) a second pass parallel over doc blocks recomputing S^T (one more
// B x N x d GEMM plus exps: 5 GEMM-sized passes per fwd+bwd instead of 4, ~25% more time), (b) per-thread dD
// partials ((threads - 1) x N x d extra: 16 MB per extra thread at N = 16384, d = 256, as much again as all of
// our memory there, growing with the thread count, plus a reduction pass). We do (c): split queries
// and docs into K chunks each and run K rounds; in round r task t pairs query chunk t with doc chunk
// (t + r) % K, so within a round no two tasks share a dQ or dD row. Every (query, doc) chunk pair is visited once,
// with 3 GEMMs per tile and no extra memory; a round ends at parallel_for's barrier. Correctness does not depend
// on how parallel_for maps tasks to threads (nested calls run inline, still race-free).
//
// The target column is left out of the tiles: its coefficient P_t - 1 is formed at the end as -(sum of the row's
// other probabilities). With a dominant positive, P_t = exp(s_t - lse) is within 1e-3 of 1 and lse (fp32, ~1/t in
// size) carries an absolute rounding error ~ulp(lse); computing P_t - 1 directly would turn that into a ~1e-3
// relative gradient error, while the non-target probabilities only get a ~ulp relative error from it.
template <typename T>
void infonce_bwd_in_batch(const InfoNCEParams<T>& p) {
  const int64_t QB = std::min(kQueryBlock, p.B), NB = std::min(kDocBlock, p.N);
  // 4 chunks per thread: tasks are handed out dynamically (run_tasks), so a round's imbalance is at most a task.
  const int64_t K = std::max<int64_t>(1, std::min<int64_t>(4 * num_threads(), (p.B + 31) / 32));
  auto q_lo = [&](int64_t c) { return p.B * c / K; };
  auto d_lo = [&](int64_t c) { return p.N * c / K; };
  for (int64_t round = 0; round < K; ++round) {
    run_tasks(K, [&](std::atomic<int64_t>& next) {
      ScopedFlushDenormals ftz;
      std::vector<T> ds(QB * NB);
      for (int64_t task; (task = next.fetch_add(1)) < K;) {
        const int64_t q_begin = q_lo(task), q_end = q_lo(task + 1);
        const int64_t dchunk = (task + round) % K;
        const int64_t d_begin = d_lo(dchunk), d_end = d_lo(dchunk + 1);
        // doc blocks outer: the dD block being accumulated (NB x d) stays in cache across the query blocks.
        for (int64_t c0 = d_begin; c0 < d_end; c0 += NB) {
          const int64_t cols = std::min(NB, d_end - c0);
          const T* dblk = p.docs + c0 * p.d;
          for (int64_t r0 = q_begin; r0 < q_end; r0 += QB) {
            const int64_t rows = std::min(QB, q_end - r0);
            const T* qblk = p.queries + r0 * p.d;
            gemm(false, true, rows, cols, p.d, p.inv_temperature, qblk, p.d, dblk, p.d, T(0), ds.data(), NB);
            for (int64_t r = 0; r < rows; ++r) {
              T* s = ds.data() + r * NB;
              row_exp_scale(s, cols, p.lse_in[r0 + r], p.grad_scale);
              const int64_t tgt = (r0 + r) * p.G;
              if (tgt >= c0 && tgt < c0 + cols) s[tgt - c0] = T(0);
              p.neg_prob_sum[r0 + r] += row_sum(s, cols);  // this task owns row r0 + r during the round
            }
            gemm(false, false, rows, p.d, cols, T(1), ds.data(), NB, dblk, p.d, T(1), p.grad_queries + r0 * p.d,
                 p.d);
            gemm(true, false, cols, p.d, rows, T(1), ds.data(), NB, qblk, p.d, T(1), p.grad_docs + c0 * p.d, p.d);
          }
        }
      }
    });
  }
  // Target terms: coefficient (P_t - 1) * grad_scale = -neg_prob_sum. Row i is the only row whose target is
  // docs[i*G], so rows are independent here.
  parallel_for(p.B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T c = p.neg_prob_sum[i];
      const T* q = p.queries + i * p.d;
      const T* dt = p.docs + i * p.G * p.d;
      T* gq = p.grad_queries + i * p.d;
      T* gd = p.grad_docs + i * p.G * p.d;
      for (int64_t k = 0; k < p.d; ++k) {
        gq[k] -= c * dt[k];
        gd[k] -= c * q[k];
      }
    }
  });
}

// Own-group negatives: query i only touches docs[i*G, (i+1)*G), so rows are independent.
template <typename T>
void infonce_bwd_own_group(const InfoNCEParams<T>& p) {
  parallel_for(p.B, 16, [&](int64_t begin, int64_t end) {
    ScopedFlushDenormals ftz;
    std::vector<T> coef(p.G);
    for (int64_t i = begin; i < end; ++i) {
      const T* q = p.queries + i * p.d;
      const T* dg = p.docs + i * p.G * p.d;
      // G logits are cheap to renormalize: recomputing their lse here (instead of reading lse_in) keeps the
      // probabilities consistent with the logits as rounded in this pass, so e.g. G = 1 gives exactly zero grads.
      for (int64_t g = 0; g < p.G; ++g) coef[g] = dot(q, dg + g * p.d, p.d) * p.inv_temperature;
      const T m = reduce_max(coef.data(), p.G);
      T sum = 0;
      for (int64_t g = 0; g < p.G; ++g) sum += std::exp(coef[g] - m);
      const T lse = m + std::log(sum);
      // the positive's coefficient as -(sum of the others), as in infonce_bwd_in_batch
      T others = 0;
      for (int64_t g = 1; g < p.G; ++g) others += coef[g] = std::exp(coef[g] - lse) * p.grad_scale;
      coef[0] = -others;
      T* gq = p.grad_queries + i * p.d;
      T* gd = p.grad_docs + i * p.G * p.d;
      for (int64_t g = 0; g < p.G; ++g) {
        const T c = coef[g];
        const T* dr = dg + g * p.d;
        T* gdr = gd + g * p.d;
        for (int64_t k = 0; k < p.d; ++k) {
          gq[k] += c * dr[k];
          gdr[k] = c * q[k];
        }
      }
    }
  });
}

template <typename T>
void infonce_bwd(const InfoNCEParams<T>& p) {
  if (p.in_batch_negatives)
    infonce_bwd_in_batch(p);
  else
    infonce_bwd_own_group(p);
}

}  // namespace nvembed::cpu
