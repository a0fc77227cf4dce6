// Non-causal flash attention on the CPU: torch-free kernel templates over one params struct (FA2 style).
//
// Dense [B, L, H, D] and packed varlen [T, H, D] inputs share one kernel: a dense batch is the packed layout with
// uniform sequence offsets (cu_seqlens == nullptr). Work is split into (sequence, head, query block) tasks; each
// task streams key blocks through two BLAS tiles (S = scale * Q K^T, O += P V) with an online softmax, so memory
// is O(block) per thread whatever the sequence length. When every key fits in one block (the common embedding case,
// L <= 512) the softmax is exact in one pass with no rescaling.
//
// Numerics: fp32 accumulation for fp32/bf16 inputs (the launcher converts bf16 to fp32), fp64 for fp64.
// Key padding never reaches the kernel: the launcher packs the unmasked keys of each sequence (dense q with
// varlen k), so padded keys cost no FLOPs. A query row with no key gets out = 0 and lse = +inf, so the
// backward's P = exp(S - lse) is 0.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/blas.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"

namespace nvembed::cpu {

// In: element type of q/k/v/out/dout (float, double, or bf16_t); T: accumulation type (float or double).
template <typename In, typename T>
struct FlashAttnParams {
  const In* q;
  const In* k;
  const In* v;
  In* out;
  T* lse;             // dense: [B, Hq, Lq]; varlen: [Hq, Tq]
  const int* cu_q;    // varlen only: [B + 1]; nullptr = dense
  const int* cu_k;
  int64_t batch, seqlen_q, seqlen_k;  // dense lengths (varlen: max lengths)
  int64_t total_q;                    // rows of the packed q (B * Lq for dense)
  int64_t heads_q, heads_kv, head_dim;
  T scale;

  int64_t q_start(int64_t b) const { return cu_q ? cu_q[b] : b * seqlen_q; }
  int64_t q_len(int64_t b) const { return cu_q ? cu_q[b + 1] - cu_q[b] : seqlen_q; }
  int64_t k_start(int64_t b) const { return cu_k ? cu_k[b] : b * seqlen_k; }
  int64_t k_len(int64_t b) const { return cu_k ? cu_k[b + 1] - cu_k[b] : seqlen_k; }
  // lse element of (sequence b, head h, row i of the sequence)
  int64_t lse_index(int64_t b, int64_t h, int64_t i) const {
    return cu_q ? h * total_q + cu_q[b] + i : (b * heads_q + h) * seqlen_q + i;
  }
};

template <typename In, typename T>
struct FlashAttnBwdParams : FlashAttnParams<In, T> {
  const In* dout;
  T* dq;                  // accumulation type; the launcher converts to the input dtype
  T* dk;                  // [splits, Tk, Hkv, D] when splits > 1 (summed by the launcher), else [Tk, Hkv, D]
  T* dv;
  int64_t splits = 1;     // query-range splits per (sequence, kv head), for parallelism when B * Hkv is small
  int64_t split_stride = 0;
};

template <typename T>
inline T load(float x) { return x; }
template <typename T>
inline T load(double x) { return x; }
template <typename T>
inline T load(bf16_t x) { return to_float(x); }
template <typename In, typename T>
inline In store(T x) {
  if constexpr (std::is_same_v<In, bf16_t>) return to_bf16(x); else return static_cast<In>(x);
}

// GEMM tiles on input-typed operands (bf16 tiles run on the bf16 BLAS with fp32 accumulation).
inline void tile_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const bf16_t* a, int64_t lda,
                      const bf16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm(ta, tb, m, n, k, alpha, reinterpret_cast<const uint16_t*>(a), lda, reinterpret_cast<const uint16_t*>(b),
       ldb, beta, c, ldc);
}
template <typename T>
inline void tile_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                      const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
// GEMM whose A operand is an accumulation-typed tile (P or dS, rows x cols stored with leading dim ldt) and whose
// B operand is input-typed: for bf16 inputs the tile is rounded to bf16 in `scratch` first (as FlashAttention does
// on GPUs), so both products run on the bf16 BLAS.
template <typename In, typename T>
inline void mixed_gemm(bool ta, int64_t m, int64_t n, int64_t k, T alpha, const T* tile, int64_t ldt, In* scratch,
                       const In* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if constexpr (std::is_same_v<In, T>) {
    (void)scratch;
    gemm(ta, false, m, n, k, alpha, tile, ldt, b, ldb, beta, c, ldc);
  } else {
    const int64_t rows = ta ? k : m, cols = ta ? m : k;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) scratch[i * cols + j] = to_bf16(tile[i * ldt + j]);
    tile_gemm(ta, false, m, n, k, alpha, scratch, cols, b, ldb, beta, c, ldc);
  }
}

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Block sizes: 128 query rows x 512 keys keep the S tile (256 KiB fp32) and the O accumulator in L2 while the
// BLAS tiles stay large enough to amortize operand packing. The backward holds four tiles, so it uses 64 rows.
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBwdBlockQ = 128;
constexpr int64_t kBlockK = 512;
constexpr int64_t kBwdBlockK = 512;

template <typename In, typename T>
void flash_attn_fwd_kernel(const FlashAttnParams<In, T>& p) {
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, D = p.head_dim;
  const int64_t group = Hq / Hkv;
  const int64_t ldq = Hq * D, ldk = Hkv * D;
  const int64_t max_lq = p.cu_q ? p.seqlen_q : p.seqlen_q;
  const int64_t q_blocks = (max_lq + kBlockQ - 1) / kBlockQ;
  const int64_t tasks = B * Hq * q_blocks;

  run_tasks(tasks, [&](std::atomic<int64_t>& next) {
    ScopedFlushDenormals ftz;
    std::vector<T> s_buf(kBlockQ * kBlockK), o_acc(kBlockQ * D), row_max(kBlockQ), row_total(kBlockQ);
    std::vector<In> p_low(std::is_same_v<In, T> ? 0 : kBlockQ * kBlockK);
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      const int64_t qb = t % q_blocks, h = (t / q_blocks) % Hq, b = t / (q_blocks * Hq);
      const int64_t lq = p.q_len(b), lk = p.k_len(b);
      const int64_t i0 = qb * kBlockQ;
      if (i0 >= lq) continue;
      const int64_t m = std::min(kBlockQ, lq - i0);
      const int64_t hk = h / group;
      const In* qp = p.q + (p.q_start(b) + i0) * ldq + h * D;
      const In* kp = p.k + p.k_start(b) * ldk + hk * D;
      const In* vp = p.v + p.k_start(b) * ldk + hk * D;
      T* s = s_buf.data();
      T* o = o_acc.data();
      std::fill(row_max.begin(), row_max.begin() + m, neg_inf<T>());
      std::fill(row_total.begin(), row_total.begin() + m, T(0));
      std::fill(o_acc.begin(), o_acc.begin() + m * D, T(0));
      for (int64_t k0 = 0; k0 < lk; k0 += kBlockK) {
        const int64_t n = std::min(kBlockK, lk - k0);
        tile_gemm(false, true, m, n, D, p.scale, qp, ldq, kp + k0 * ldk, ldk, T(0), s, kBlockK);
        const bool first = k0 == 0;
        for (int64_t r = 0; r < m; ++r) {
          T* row = s + r * kBlockK;
          T mx = row_max[r];
          mx = std::max(mx, reduce_max(row, n));
          const T corr = exp_fast(row_max[r] - mx);
          for (int64_t j = 0; j < n; ++j) row[j] = exp_fast(row[j] - mx);
          const T sum = row_sum(row, n);
          row_total[r] = row_total[r] * corr + sum;
          row_max[r] = mx;
          if (!first && corr != T(1)) {
            T* orow = o + r * D;
            for (int64_t d = 0; d < D; ++d) orow[d] *= corr;
          }
        }
        mixed_gemm(false, m, D, n, T(1), s, kBlockK, p_low.data(), vp + k0 * ldk, ldk, T(1), o, D);
      }
      for (int64_t r = 0; r < m; ++r) {
        In* dst = p.out + (p.q_start(b) + i0 + r) * ldq + h * D;
        const T l = row_total[r];
        const T inv = l > T(0) ? T(1) / l : T(0);
        for (int64_t d = 0; d < D; ++d) dst[d] = store<In, T>(o[r * D + d] * inv);
        p.lse[p.lse_index(b, h, i0 + r)] =
            l > T(0) ? row_max[r] + std::log(l) : std::numeric_limits<T>::infinity();
      }
    }
  });
}

// Backward (FA2 algorithm, recomputing P from the saved lse). Tasks own (sequence, kv head, query split): they
// accumulate dK / dV of their kv head race-free (all query heads of the GQA group are processed by the same task)
// and own the dQ rows of their query range.
template <typename In, typename T>
void flash_attn_bwd_kernel(const FlashAttnBwdParams<In, T>& p) {
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, D = p.head_dim;
  const int64_t group = Hq / Hkv;
  const int64_t ldq = Hq * D, ldk = Hkv * D;
  const int64_t splits = p.splits;
  const int64_t tasks = B * Hkv * splits;

  run_tasks(tasks, [&](std::atomic<int64_t>& next) {
    ScopedFlushDenormals ftz;  // P of far-off keys and dS land in the denormal range
    std::vector<T> s_buf(kBwdBlockQ * kBwdBlockK), dp_buf(kBwdBlockQ * kBwdBlockK), dq_acc(kBwdBlockQ * D),
        delta(kBwdBlockQ), lse_row(kBwdBlockQ);
    std::vector<In> t_low(std::is_same_v<In, T> ? 0 : kBwdBlockQ * kBwdBlockK);
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      const int64_t sidx = t % splits, hk = (t / splits) % Hkv, b = t / (splits * Hkv);
      const int64_t lq = p.q_len(b), lk = p.k_len(b);
      const int64_t q_blocks = (lq + kBwdBlockQ - 1) / kBwdBlockQ;
      const int64_t blk_begin = q_blocks * sidx / splits, blk_end = q_blocks * (sidx + 1) / splits;
      if (blk_begin >= blk_end || lk == 0) continue;
      const In* kp = p.k + p.k_start(b) * ldk + hk * D;
      const In* vp = p.v + p.k_start(b) * ldk + hk * D;
      T* dkp = p.dk + sidx * p.split_stride + p.k_start(b) * ldk + hk * D;
      T* dvp = p.dv + sidx * p.split_stride + p.k_start(b) * ldk + hk * D;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t qb = blk_begin; qb < blk_end; ++qb) {
          const int64_t i0 = qb * kBwdBlockQ, m = std::min(kBwdBlockQ, lq - i0);
          const int64_t row0 = p.q_start(b) + i0;
          const In* qp = p.q + row0 * ldq + h * D;
          const In* op = p.out + row0 * ldq + h * D;
          const In* dop = p.dout + row0 * ldq + h * D;
          T* dqp = p.dq + row0 * ldq + h * D;
          const bool single_block = lk <= kBwdBlockK;
          for (int64_t r = 0; r < m && !single_block; ++r) {
            const In* orow = op + r * ldq;
            const In* gorow = dop + r * ldq;
            delta[r] = reduce_sum<T>(D, [&](int64_t d) { return load<T>(orow[d]) * load<T>(gorow[d]); });
          }
          for (int64_t r = 0; r < m; ++r) lse_row[r] = p.lse[p.lse_index(b, h, i0 + r)];
          std::fill(dq_acc.begin(), dq_acc.begin() + m * D, T(0));
          T* s = s_buf.data();
          T* dp = dp_buf.data();
          for (int64_t k0 = 0; k0 < lk; k0 += kBwdBlockK) {
            const int64_t n = std::min(kBwdBlockK, lk - k0);
            tile_gemm(false, true, m, n, D, p.scale, qp, ldq, kp + k0 * ldk, ldk, T(0), s, kBwdBlockK);
            // P = exp(S - lse)
            for (int64_t r = 0; r < m; ++r) {
              T* row = s + r * kBwdBlockK;
              const T l = lse_row[r];
              for (int64_t j = 0; j < n; ++j) row[j] = exp_fast(row[j] - l);
            }
            // dV += P^T dO
            mixed_gemm(true, n, D, m, T(1), s, kBwdBlockK, t_low.data(), dop, ldq, T(1), dvp + k0 * ldk, ldk);
            // dP = dO V^T ; dS = P * (dP - delta) * scale
            tile_gemm(false, true, m, n, D, T(1), dop, ldq, vp + k0 * ldk, ldk, T(0), dp, kBwdBlockK);
            for (int64_t r = 0; r < m; ++r) {
              T* prow = s + r * kBwdBlockK;
              T* dprow = dp + r * kBwdBlockK;
              // delta = rowsum(P * dP): equal to rowsum(dO * O), but cancels exactly (a single key gives dS = 0)
              if (single_block) delta[r] = dot(prow, dprow, n);
              const T dl = delta[r];
              for (int64_t j = 0; j < n; ++j) dprow[j] = prow[j] * (dprow[j] - dl) * p.scale;
            }
            // dQ += dS K ; dK += dS^T Q
            mixed_gemm(false, m, D, n, T(1), dp, kBwdBlockK, t_low.data(), kp + k0 * ldk, ldk, T(1), dq_acc.data(),
                       D);
            if constexpr (std::is_same_v<In, T>) {
              gemm(true, false, n, D, m, T(1), dp, kBwdBlockK, qp, ldq, T(1), dkp + k0 * ldk, ldk);
            } else {  // t_low already holds dS in bf16 (m x n, ld n) from the dQ product
              tile_gemm(true, false, n, D, m, T(1), t_low.data(), n, qp, ldq, T(1), dkp + k0 * ldk, ldk);
            }
          }
          for (int64_t r = 0; r < m; ++r)
            std::memcpy(dqp + r * ldq, dq_acc.data() + r * D, sizeof(T) * D);
        }
      }
    }
  });
}

}  // namespace nvembed::cpu
