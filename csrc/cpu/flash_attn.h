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
  bool allow_brgemm = true;  // bf16 forward: oneDNN brgemm tiles on pre-packed K/V where available

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
// BLAS tiles stay large enough to amortize operand packing.
constexpr int64_t kBlockQ = 128;
// The bf16 brgemm forward's query blocks: 64 rows time the same as 128 (B4 L512 H8 D64 on a 2-core AMX VM) and
// give twice the tasks where batch x heads is small.
constexpr int64_t kBrgemmBlockQ = 64;
constexpr int64_t kBwdBlockQ = 128;
constexpr int64_t kBlockK = 512;
constexpr int64_t kBwdBlockK = 512;

// One online-softmax step of a query row over a key block: the scores row[0, n) (to be multiplied by `scale`) become
// exp(scale * row - new_max), written to `probs` (row itself, or its bf16 copy for the bf16 P V product) in one pass
// that also sums them; the running max and total, and the row's O accumulator, are rescaled.
template <typename T, typename P>
inline void online_softmax_row(T* row, int64_t n, T scale, T& run_max, T& run_total, T* orow, int64_t D, P* probs) {
  if (scale < T(0)) {  // the largest scaled score is at the smallest raw one: scale first (rare)
    for (int64_t j = 0; j < n; ++j) row[j] *= scale;
    scale = T(1);
  }
  const T mx = std::max(run_max, scale * reduce_max(row, n));
  const T corr = exp_fast(run_max - mx);  // 0 on the first block (run_max = -inf), where O is still 0
  run_total = run_total * corr + exp_sum(row, n, scale, mx, probs);
  run_max = mx;
  if (corr != T(1))
    for (int64_t d = 0; d < D; ++d) orow[d] *= corr;
}

// out row = O / total and its lse; a row with no key (total exactly 0) gets 0 and lse = +inf. A NaN total (a NaN
// score) stays NaN in both, so the backward's recomputed probabilities, and the gradients, are NaN as the
// reference's are (a "> 0" test would have taken it for a row without keys and given zero gradients).
template <typename In, typename T>
inline void finish_row(const T* orow, T run_max, T run_total, int64_t D, In* dst, T* lse) {
  const bool empty = run_total == T(0);
  const T inv = empty ? T(0) : T(1) / run_total;
  for (int64_t d = 0; d < D; ++d) dst[d] = store_as<In>(orow[d] * inv);
  *lse = empty ? std::numeric_limits<T>::infinity() : run_max + std::log(run_total);
}

// The query block that forward task t covers: (sequence b, query head h, its kv head hk, first row i0, m rows).
struct FwdTile {
  int64_t b, h, hk, i0, m, lk;
};
template <typename In, typename T>
inline bool fwd_tile(const FlashAttnParams<In, T>& p, int64_t t, int64_t q_blocks, int64_t block_q, FwdTile& tile) {
  const int64_t qb = t % q_blocks, h = (t / q_blocks) % p.heads_q, b = t / (q_blocks * p.heads_q);
  const int64_t lq = p.q_len(b), i0 = qb * block_q;
  if (i0 >= lq) return false;  // past the end of a shorter (varlen) sequence
  tile = {b, h, h / (p.heads_q / p.heads_kv), i0, std::min(block_q, lq - i0), p.k_len(b)};
  return true;
}

// VNNI layouts (pairs of the reduction dim interleaved, reduction dim padded to even) of a key block, as the B
// operands of S = Q K^T (K^T: [D x n], D even) and O += P V (V: [n x D]). Key rows are `ld` elements apart.
inline void pack_kt_vnni(const bf16_t* k, int64_t ld, int64_t n, int64_t D, bf16_t* dst) {
  // element pair (2i, 2i+1) of key c is one 32-bit word, stored at word [i][c]: contiguous stores, gathered loads,
  // in blocks of 64 keys whose rows (64 x D/2 words) stay in L1 while all D/2 words are gathered from them (the
  // key-major order instead strides its stores by n words, which alias in L1's sets).
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  const uint32_t* src = reinterpret_cast<const uint32_t*>(k);  // ld and D even: rows stay 4-byte aligned
  const int64_t ldw = ld / 2;
  for (int64_t c0 = 0; c0 < n; c0 += 64) {
    const int64_t c1 = std::min(c0 + 64, n);
    for (int64_t i = 0; i < D / 2; ++i) {
      int64_t c = c0;
#if defined(__AVX512F__)
      if (ldw <= (int64_t{1} << 26)) {  // 16 key offsets of one gather fit int32 word indices (x4 bytes)
        const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(static_cast<int>(ldw)));
        for (; c + 16 <= c1; c += 16)  // (the masked form: the plain one trips GCC 12's -Wmaybe-uninitialized)
          _mm512_storeu_si512(out + i * n + c, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), 0xffff, idx,
                                                                           src + c * ldw + i, 4));
      }
#endif
      for (; c < c1; ++c) out[i * n + c] = src[c * ldw + i];
    }
  }
}
inline void pack_v_vnni(const bf16_t* v, int64_t ld, int64_t n, int64_t D, bf16_t* dst) {
  // rows r, r+1 interleaved: word c of the pair = v[r][c] | v[r+1][c] << 16
  const uint16_t* src = reinterpret_cast<const uint16_t*>(v);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t r = 0; r < n; r += 2) {
    const uint16_t* a = src + r * ld;
    const uint16_t* b = r + 1 < n ? a + ld : nullptr;
    uint32_t* o = out + (r / 2) * D;
    if (b) {
      for (int64_t c = 0; c < D; ++c) o[c] = static_cast<uint32_t>(a[c]) | (static_cast<uint32_t>(b[c]) << 16);
    } else {
      for (int64_t c = 0; c < D; ++c) o[c] = static_cast<uint32_t>(a[c]);
    }
  }
}

// The bf16 forward on oneDNN brgemm tiles (AMX on CPUs that have it). K^T and V of every (sequence, key block, kv
// head) are packed to VNNI once, in a parallel pre-pass, and then shared by all query blocks and all query heads of
// the GQA group; the softmax is the same online one as in the BLAS path, in fp32.
inline void flash_attn_fwd_brgemm(const FlashAttnParams<bf16_t, float>& p) {
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, D = p.head_dim;
  const int64_t ldq = Hq * D, ldk = Hkv * D;
  const int64_t region = 2 * kBlockK * D;  // packed K^T block (D x n) then packed V block (n_even x D)
  std::vector<int64_t> block_base(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) block_base[b + 1] = block_base[b] + (p.k_len(b) + kBlockK - 1) / kBlockK;
  bf16_t* packed = thread_scratch<bf16_t, 1>(block_base[B] * Hkv * region);
  const int64_t pack_tasks = block_base[B] * Hkv;
  run_tasks(pack_tasks, [&](std::atomic<int64_t>& next) {
    for (int64_t t; (t = next.fetch_add(1)) < pack_tasks;) {
      const int64_t hk = t % Hkv, gblk = t / Hkv;
      const int64_t b = std::upper_bound(block_base.begin(), block_base.end(), gblk) - block_base.begin() - 1;
      const int64_t k0 = (gblk - block_base[b]) * kBlockK, n = std::min(kBlockK, p.k_len(b) - k0);
      const bf16_t* kp = p.k + (p.k_start(b) + k0) * ldk + hk * D;
      const bf16_t* vp = p.v + (p.k_start(b) + k0) * ldk + hk * D;
      bf16_t* dst = packed + t * region;
      pack_kt_vnni(kp, ldk, n, D, dst);
      pack_v_vnni(vp, ldk, n, D, dst + kBlockK * D);
    }
  });

  const int64_t q_blocks = (p.seqlen_q + kBrgemmBlockQ - 1) / kBrgemmBlockQ;
  const int64_t tasks = B * Hq * q_blocks;
  run_tasks(tasks, [&](std::atomic<int64_t>& next) {
    ScopedFlushDenormals ftz;
    float* s = thread_scratch<float>(kBrgemmBlockQ * (kBlockK + D + 2));
    float *o = s + kBrgemmBlockQ * kBlockK, *row_max = o + kBrgemmBlockQ * D, *row_total = row_max + kBrgemmBlockQ;
    bf16_t* p_low = thread_scratch<bf16_t>(kBrgemmBlockQ * kBlockK);
    FwdTile tile;
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      if (!fwd_tile(p, t, q_blocks, kBrgemmBlockQ, tile)) continue;
      const auto [b, h, hk, i0, m, lk] = tile;
      const bf16_t* qp = p.q + (p.q_start(b) + i0) * ldq + h * D;
      std::fill(row_max, row_max + m, neg_inf<float>());
      std::fill(row_total, row_total + m, 0.f);
      std::fill(o, o + m * D, 0.f);
      for (int64_t k0 = 0; k0 < lk; k0 += kBlockK) {
        const int64_t n = std::min(kBlockK, lk - k0), n_even = n + (n & 1);
        const bf16_t* kt = packed + ((block_base[b] + k0 / kBlockK) * Hkv + hk) * region;
        brgemm_bf16(m, n, D, ldq, n, kBlockK, false, reinterpret_cast<const uint16_t*>(qp),
                    reinterpret_cast<const uint16_t*>(kt), s);
        for (int64_t r = 0; r < m; ++r) {
          // unscaled scores (brgemm has no alpha): the scale goes into the exp; P straight to bf16
          bf16_t* pl = p_low + r * kBlockK;
          online_softmax_row(s + r * kBlockK, n, p.scale, row_max[r], row_total[r], o + r * D, D, pl);
          if (n_even != n) pl[n] = bf16_t{0};
        }
        brgemm_bf16(m, D, n_even, kBlockK, D, D, true, reinterpret_cast<const uint16_t*>(p_low),
                    reinterpret_cast<const uint16_t*>(kt + kBlockK * D), o);
      }
      for (int64_t r = 0; r < m; ++r)
        finish_row(o + r * D, row_max[r], row_total[r], D, p.out + (p.q_start(b) + i0 + r) * ldq + h * D,
                   &p.lse[p.lse_index(b, h, i0 + r)]);
    }
    brgemm_release();
  });
}

template <typename In, typename T>
void flash_attn_fwd_kernel(const FlashAttnParams<In, T>& p) {
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, D = p.head_dim;
  const int64_t ldq = Hq * D, ldk = Hkv * D;
  const int64_t q_blocks = (p.seqlen_q + kBlockQ - 1) / kBlockQ;
  const int64_t tasks = B * Hq * q_blocks;
  if constexpr (std::is_same_v<In, bf16_t>) {
    if (p.allow_brgemm && D % 2 == 0 && has_bf16_brgemm()) return flash_attn_fwd_brgemm(p);
  }

  run_tasks(tasks, [&](std::atomic<int64_t>& next) {
    ScopedFlushDenormals ftz;
    T* s = thread_scratch<T>(kBlockQ * (kBlockK + D + 2));
    T *o = s + kBlockQ * kBlockK, *row_max = o + kBlockQ * D, *row_total = row_max + kBlockQ;
    In* p_low = std::is_same_v<In, T> ? nullptr : thread_scratch<In>(kBlockQ * kBlockK);
    FwdTile tile;
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      if (!fwd_tile(p, t, q_blocks, kBlockQ, tile)) continue;
      const auto [b, h, hk, i0, m, lk] = tile;
      const In* qp = p.q + (p.q_start(b) + i0) * ldq + h * D;
      const In* kp = p.k + p.k_start(b) * ldk + hk * D;
      const In* vp = p.v + p.k_start(b) * ldk + hk * D;
      std::fill(row_max, row_max + m, neg_inf<T>());
      std::fill(row_total, row_total + m, T(0));
      std::fill(o, o + m * D, T(0));
      for (int64_t k0 = 0; k0 < lk; k0 += kBlockK) {
        const int64_t n = std::min(kBlockK, lk - k0);
        tile_gemm(false, true, m, n, D, p.scale, qp, ldq, kp + k0 * ldk, ldk, T(0), s, kBlockK);
        for (int64_t r = 0; r < m; ++r)  // the GEMM applied the scale
          online_softmax_row(s + r * kBlockK, n, T(1), row_max[r], row_total[r], o + r * D, D, s + r * kBlockK);
        mixed_gemm(false, m, D, n, T(1), s, kBlockK, p_low, vp + k0 * ldk, ldk, T(1), o, D);
      }
      for (int64_t r = 0; r < m; ++r)
        finish_row(o + r * D, row_max[r], row_total[r], D, p.out + (p.q_start(b) + i0 + r) * ldq + h * D,
                   &p.lse[p.lse_index(b, h, i0 + r)]);
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
    constexpr int64_t kTile = kBwdBlockQ * kBwdBlockK;
    T* s = thread_scratch<T>(2 * kTile + kBwdBlockQ * (D + 2));
    T *dp = s + kTile, *dq_acc = dp + kTile, *delta = dq_acc + kBwdBlockQ * D, *lse_row = delta + kBwdBlockQ;
    In* t_low = std::is_same_v<In, T> ? nullptr : thread_scratch<In>(kTile);
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
          std::fill(dq_acc, dq_acc + m * D, T(0));
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
            mixed_gemm(true, n, D, m, T(1), s, kBwdBlockK, t_low, dop, ldq, T(1), dvp + k0 * ldk, ldk);
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
            mixed_gemm(false, m, D, n, T(1), dp, kBwdBlockK, t_low, kp + k0 * ldk, ldk, T(1), dq_acc,
                       D);
            if constexpr (std::is_same_v<In, T>) {
              gemm(true, false, n, D, m, T(1), dp, kBwdBlockK, qp, ldq, T(1), dkp + k0 * ldk, ldk);
            } else {  // t_low already holds dS in bf16 (m x n, ld n) from the dQ product
              tile_gemm(true, false, n, D, m, T(1), t_low, n, qp, ldq, T(1), dkp + k0 * ldk, ldk);
            }
          }
          for (int64_t r = 0; r < m; ++r)
            std::memcpy(dqp + r * ldq, dq_acc + r * D, sizeof(T) * D);
        }
      }
    }
  });
}

}  // namespace nvembed::cpu
