// Fused NV-Embed latent-attention pooling on CPU, forward and backward. Torch-free templates on the compute type S
// (float for float32/bfloat16 inputs, double for float64); the launcher (latent_pool.cpp) converts and checks.
//
// Per token t (queries are tokens, keys/values come from the N latents, every token is independent):
//   xn = LN(x); p_h = softmax(scale * xn Wq_h^T K_h^T); attn = sum_h p_h V_h Wo_h^T; y1 = attn + x
//   z = LN_ff(y1); u = z Win^T; [a | gate] = u + bin; g = a * gelu(gate); y2 = g Wff^T + bff + y1
//   pooled_b = sum_t w_t y2_t with w_t = m_t / max(M_b, 1); out = pooled / max(|pooled|, 1e-12) (normalize)
// Exact algebra used to cut work:
//   * K, V depend only on the latents: computed once per call. When it is cheaper (dim_head large, e.g. the release's
//     dim_head = d), the query and output projections are folded into them: Kx_h = K_h Wq_h [N, d] and
//     Cx_h = V_h Wo_h^T [N, d], so scores = xn Kx^T and attn = P Cx are single GEMMs over [T, H*N].
//   * Wff is linear, so it is applied after the masked mean: pooled = gbar Wff^T + c_b bff + ybar (a [B, F] GEMM
//     instead of [T, F]).
//   * Tokens with m_t == 0 cannot influence the output: they are skipped (their gradient is exactly 0).
// Backward recomputes the per-token activations block by block (nothing of size [T, H*N] is stored; the forward
// saves only pooled [B, d]), accumulates the weight gradients over the blocks with beta = 1 GEMMs, then chains the
// latent side (dKx -> dWq, dK; dCx -> dWo, dV; dK, dV -> dWkv, dctx -> LN_ctx backward -> dlatents).
// Optionally (Saved, below) the forward also keeps y1 [T, d] and u [T, 2F] (13.5 MiB at the MiniLM benchmark size,
// against 65.8 MiB of saved tensors in the eager layer, counted with saved-tensor hooks), and the backward
// recomputes only LN(x), the attention probabilities (and the plain path's q, o) and LN_ff(y1).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/blas.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"

namespace nvembed::cpu::latent_pool {

template <typename S>
struct Params {
  int64_t B = 0, L = 0, d = 0, N = 0, H = 0, dh = 0, F = 0;  // I = H * dh; ff_in is [2F, d]
  S eps = S(1e-5);
  bool normalize = true;
  bool fold = true;  // fold Wq / Wo into the latent keys / values (see above)
  const S* x = nullptr;     // [B, L, d]
  const S* mask = nullptr;  // [B, L] weights, or nullptr (all tokens)
  const S *latents = nullptr, *norm_w = nullptr, *norm_b = nullptr, *ctx_w = nullptr, *ctx_b = nullptr;
  const S *wq = nullptr, *wkv = nullptr, *wo = nullptr;  // [I, d], [2I, d], [d, I]
  const S *ff_norm_w = nullptr, *ff_norm_b = nullptr;
  const S *ff_in_w = nullptr, *ff_in_b = nullptr, *ff_out_w = nullptr, *ff_out_b = nullptr;  // [2F, d], [d, F]
  int64_t I() const { return H * dh; }
};

template <typename S>
struct Grads {  // every pointer is written in full (dx rows of skipped tokens are zeroed)
  S *x, *latents, *norm_w, *norm_b, *ctx_w, *ctx_b, *wq, *wkv, *wo, *ff_norm_w, *ff_norm_b, *ff_in_w, *ff_in_b,
      *ff_out_w, *ff_out_b;
};

// Cost model for the fold: per active token the folded path costs 2*H*N*d multiply-adds (scores + attn), the plain
// one 2*I*d + 2*N*I (q / out projections + scores + P V); folding adds 2*N*I*d once per call.
inline bool fold_is_cheaper(int64_t T, int64_t d, int64_t N, int64_t H, int64_t dh) {
  const double I = double(H) * dh;
  const double folded = double(T) * 2.0 * H * N * d + 2.0 * N * I * d;
  const double plain = double(T) * (2.0 * I * d + 2.0 * N * I);
  return folded < plain;
}

namespace detail {

// Tokens are walked in blocks of <= kMaxBlock rows. Within a block every GEMM covers all its rows and is threaded
// by the BLAS (one packing of each weight per block, no per-thread gradient copies to reduce); the row-wise
// pieces (LayerNorm, softmax, GEGLU) run under parallel_for over rows, column sums under parallel_for over columns.
// No atomics and no reduction whose order depends on the thread schedule: repeated calls give the same bits.
constexpr int64_t kMaxBlock = 512;

// ---- vectorizable pointwise pieces (reduce_sum, reduce_max, exp_fast: cpu/vec_math.h) --------------------------
// erf: float32 uses Abramowitz-Stegun 7.1.26 (|error| <= 1.5e-7), the formula ATen's vectorized float erf uses;
// float64 (gradcheck) keeps libm.
template <typename S>
inline S verf(S x) {
  return std::erf(x);
}
template <>
inline float verf<float>(float x) {
  const float ax = std::fabs(x);
  const float t = 1.0f / (0.3275911f * ax + 1.0f);
  float r = 1.061405429f;
  r = r * t - 1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t - 0.284496736f;
  r = r * t + 0.254829592f;
  return std::copysign(1.0f - r * t * exp_fast(-ax * ax), x);
}

template <typename S>
inline void ln_fwd(const S* in, int64_t rows, int64_t d, const S* w, const S* b, S eps, S* out, S* mean, S* rstd) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* xi = in + r * d;
    S* yo = out + r * d;
    const S mu = reduce_sum<S>(d, [&](int64_t j) { return xi[j]; }) / S(d);
    // two-pass variance: no cancellation
    const S v = reduce_sum<S>(d, [&](int64_t j) { return (xi[j] - mu) * (xi[j] - mu); }) / S(d);
    const S rs = S(1) / std::sqrt(v + eps);
    for (int64_t j = 0; j < d; ++j) yo[j] = (xi[j] - mu) * rs * w[j] + b[j];
    mean[r] = mu;
    rstd[r] = rs;
  }
}

// dx += LN backward of dy (rows [0, rows)).
template <typename S>
inline void ln_bwd_dx(const S* in, const S* mean, const S* rstd, const S* w, const S* dy, int64_t rows, int64_t d,
                      S* dx) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* xi = in + r * d;
    const S* gi = dy + r * d;
    S* dxi = dx + r * d;
    const S mu = mean[r], rs = rstd[r];
    const S sg = reduce_sum<S>(d, [&](int64_t j) { return gi[j] * w[j]; }) / S(d);
    const S sgx = reduce_sum<S>(d, [&](int64_t j) { return gi[j] * w[j] * ((xi[j] - mu) * rs); }) / S(d);
    for (int64_t j = 0; j < d; ++j) dxi[j] += rs * (gi[j] * w[j] - sg - (xi[j] - mu) * rs * sgx);
  }
}
// dw[j] += sum_r dy * xhat, db[j] += sum_r dy for columns [j0, j1).
template <typename S>
inline void ln_bwd_dwdb(const S* in, const S* mean, const S* rstd, const S* dy, int64_t rows, int64_t d, int64_t j0,
                        int64_t j1, S* dw, S* db) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* xi = in + r * d;
    const S* gi = dy + r * d;
    const S mu = mean[r], rs = rstd[r];
    for (int64_t j = j0; j < j1; ++j) {
      dw[j] += gi[j] * ((xi[j] - mu) * rs);
      db[j] += gi[j];
    }
  }
}

template <typename S>
inline void softmax_rows(S* p, int64_t rows, int64_t n, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    S* pr = p + r * ld;
    const S m = reduce_max(pr, n);
    const S inv = S(1) / exp_sum(pr, n, S(1), m, pr);  // exp in place and its sum, one pass
    for (int64_t j = 0; j < n; ++j) pr[j] *= inv;
  }
}

// dP <- scale * P * (dP - <P, dP>) row by row (softmax backward, with the score scale folded in).
template <typename S>
inline void softmax_bwd_rows(const S* p, S* dp, int64_t rows, int64_t n, int64_t ld, S scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* pr = p + r * ld;
    S* dr = dp + r * ld;
    const S dot = reduce_sum<S>(n, [&](int64_t j) { return pr[j] * dr[j]; });
    for (int64_t j = 0; j < n; ++j) dr[j] = scale * pr[j] * (dr[j] - dot);
  }
}

// GEGLU of [a | gate] = u + bias (u = z W_in^T without its bias): g = a * gelu(gate), exact (erf) GELU.
template <typename S>
inline void geglu_fwd(const S* u, const S* bias, int64_t F, S* g) {
  for (int64_t j = 0; j < F; ++j) {
    const S v = u[F + j] + bias[F + j];
    g[j] = (u[j] + bias[j]) * (S(0.5) * v * (S(1) + verf(v * S(0.70710678118654752440))));
  }
}
// du = [dg * gelu(gate) | dg * a * gelu'(gate)] with dg = wt * dgb.
template <typename S>
inline void geglu_bwd(const S* u, const S* bias, const S* dgb, S wt, int64_t F, S* du) {
  for (int64_t j = 0; j < F; ++j) {
    const S v = u[F + j] + bias[F + j];
    const S cdf = S(0.5) * (S(1) + verf(v * S(0.70710678118654752440)));
    const S pdf = exp_fast(S(-0.5) * v * v) * S(0.39894228040143267794);
    const S dg = wt * dgb[j];
    du[j] = dg * v * cdf;
    du[F + j] = dg * (u[j] + bias[j]) * (cdf + v * pdf);
  }
}

// Active tokens (pool weight != 0), their batch row and pooling weight.
template <typename S>
struct Tokens {
  std::vector<int64_t> row, batch;  // row = b * L + l
  std::vector<S> w;                  // m_t / max(M_b, 1)
  std::vector<S> bias_coef;          // M_b / max(M_b, 1): how much of bff enters pooled_b
  std::vector<char> any;             // row b has at least one active token
  int64_t size() const { return int64_t(row.size()); }
};

template <typename S>
Tokens<S> gather_tokens(const Params<S>& p) {
  Tokens<S> t;
  t.bias_coef.assign(p.B, S(0));
  t.any.assign(p.B, 0);
  for (int64_t b = 0; b < p.B; ++b) {
    S M = 0;
    if (p.mask) {
      for (int64_t l = 0; l < p.L; ++l) M += p.mask[b * p.L + l];
    } else {
      M = S(p.L);
    }
    const S denom = std::max(M, S(1));  // the reference's cnt.clamp_min(1)
    t.bias_coef[b] = M / denom;
    for (int64_t l = 0; l < p.L; ++l) {
      const S m = p.mask ? p.mask[b * p.L + l] : S(1);
      if (m == S(0)) continue;
      t.row.push_back(b * p.L + l);
      t.batch.push_back(b);
      t.w.push_back(m / denom);
      t.any[b] = 1;
    }
  }
  return t;
}

// Everything that depends on the latents only.
template <typename S>
struct LatentSide {
  std::vector<S> ctx, ctx_mean, ctx_rstd;  // LN_ctx(latents) [N, d]
  std::vector<S> K, V;                     // [N, I]
  std::vector<S> Kx, Cx;                   // fold only: [H*N, d]
};

template <typename S>
LatentSide<S> latent_side(const Params<S>& p) {
  const int64_t N = p.N, d = p.d, I = p.I(), H = p.H, dh = p.dh;
  LatentSide<S> s;
  s.ctx.resize(N * d);
  s.ctx_mean.resize(N);
  s.ctx_rstd.resize(N);
  ln_fwd(p.latents, N, d, p.ctx_w, p.ctx_b, p.eps, s.ctx.data(), s.ctx_mean.data(), s.ctx_rstd.data());
  s.K.resize(N * I);
  s.V.resize(N * I);
  gemm(false, true, N, I, d, S(1), s.ctx.data(), d, p.wkv, d, S(0), s.K.data(), I);
  gemm(false, true, N, I, d, S(1), s.ctx.data(), d, p.wkv + I * d, d, S(0), s.V.data(), I);
  if (p.fold) {
    s.Kx.resize(H * N * d);
    s.Cx.resize(H * N * d);
    for (int64_t h = 0; h < H; ++h) {
      gemm(false, false, N, d, dh, S(1), s.K.data() + h * dh, I, p.wq + h * dh * d, d, S(0), s.Kx.data() + h * N * d,
           d);
      gemm(false, true, N, d, dh, S(1), s.V.data() + h * dh, I, p.wo + h * dh, I, S(0), s.Cx.data() + h * N * d, d);
    }
  }
  return s;
}

// Block buffers, carved out of one per-thread workspace that is kept between calls: fresh multi-MB allocations
// cost more in page faults and zero-fill than the pointwise work itself. The workspace is bounded by
// kWorkspaceBytes through the block size (block_rows) and is the only memory the kernel retains.
constexpr int64_t kWorkspaceBytes = int64_t(64) << 20;

template <typename S>
int64_t work_floats_per_row(const Params<S>& p, bool bwd) {
  const int64_t d = p.d, I = p.I(), HN = p.H * p.N, F = p.F;
  int64_t n = 5 * d + 4 + HN + 3 * F + (p.fold ? 0 : 2 * I);  // x, xn, attn, y1, z, stats, P, u, g, (q, o)
  if (bwd) n += 2 * F + 4 * d + HN + (p.fold ? 0 : 2 * I);     // du, dz, dy1, dxn, dx, dP, (dq, dout)
  return n;
}

template <typename S>
struct Work {
  S *x, *xn, *mean1, *rstd1, *q = nullptr, *P, *o = nullptr, *attn, *y1, *z, *mean2, *rstd2, *u, *g;  // forward
  S *du = nullptr, *dz = nullptr, *dy1 = nullptr, *dP = nullptr, *dq = nullptr, *dxn = nullptr, *dx = nullptr,
    *dout = nullptr;  // backward
  Work(const Params<S>& p, bool bwd, int64_t R) {
    const int64_t d = p.d, I = p.I(), HN = p.H * p.N, F = p.F;
    S* at = thread_scratch<S>(size_t(R * work_floats_per_row(p, bwd)));
    auto take = [&](int64_t n) {
      S* r = at;
      at += n;
      return r;
    };
    x = take(R * d), xn = take(R * d), mean1 = take(R), rstd1 = take(R), P = take(R * HN), attn = take(R * d);
    y1 = take(R * d), z = take(R * d), mean2 = take(R), rstd2 = take(R), u = take(R * 2 * F), g = take(R * F);
    if (!p.fold) q = take(R * I), o = take(R * I);
    if (bwd) {
      du = take(R * 2 * F), dz = take(R * d), dy1 = take(R * d), dP = take(R * HN), dxn = take(R * d);
      dx = take(R * d);
      if (!p.fold) dq = take(R * I), dout = take(R * I);
    }
  }
};

// fn(r0, r1) over [0, n) in parallel; `work` = rough cost of one item, to size the grain.
template <typename Fn>
inline void par(int64_t n, int64_t work, Fn fn) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(work, 1));
  parallel_for(n, grain, [&](int64_t a, int64_t b) { fn(a, b); });
}

// Plain attention path, head by head: with at least as many heads as threads the heads run in parallel (each GEMM
// single-threaded, no synchronization inside a head); otherwise one after another with threaded GEMMs.
template <typename Fn>
inline void for_each_head(int64_t H, Fn fn) {
  if (H >= num_threads()) {
    parallel_for(H, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) fn(h);
    });
  } else {
    for (int64_t h = 0; h < H; ++h) fn(h);
  }
}

template <typename S>
void ln_fwd_par(const S* in, int64_t rows, int64_t d, const S* w, const S* b, S eps, S* out, S* mean, S* rstd) {
  par(rows, 4 * d, [&](int64_t r0, int64_t r1) {
    ln_fwd(in + r0 * d, r1 - r0, d, w, b, eps, out + r0 * d, mean + r0, rstd + r0);
  });
}
// dx += LN backward; dw, db += their sums over the rows.
template <typename S>
void ln_bwd_par(const S* in, const S* mean, const S* rstd, const S* w, const S* dy, int64_t rows, int64_t d, S* dx,
                S* dw, S* db) {
  par(rows, 6 * d, [&](int64_t r0, int64_t r1) {
    ln_bwd_dx(in + r0 * d, mean + r0, rstd + r0, w, dy + r0 * d, r1 - r0, d, dx + r0 * d);
  });
  par(d, 3 * rows, [&](int64_t j0, int64_t j1) { ln_bwd_dwdb(in, mean, rstd, dy, rows, d, j0, j1, dw, db); });
}
// dst[batch[r], j] += wt[r] * src[r, j] (the masked mean's sums), parallel over columns: no two threads share a
// destination element, and each element's summation order is fixed. dst is a double accumulator (PoolSum): summed
// token by token in fp32, the mean's rounding error grew with the sequence length (2.6e-6 relative at L = 32768,
// ~40x PyTorch's pairwise mean); in double it stays at the final rounding to S.
using PoolSum = std::vector<double>;
template <typename S>
void pool_rows(const S* src, int64_t rows, int64_t n, const int64_t* batch, const S* wt, double* dst) {
  par(n, 2 * rows, [&](int64_t j0, int64_t j1) {
    for (int64_t r = 0; r < rows; ++r) {
      const S* sr = src + r * n;
      double* dr = dst + batch[r] * n;
      const double wr = wt[r];
      for (int64_t j = j0; j < j1; ++j) dr[j] += wr * static_cast<double>(sr[j]);
    }
  });
}
template <typename S>
std::vector<S> rounded(const PoolSum& sum) {
  return std::vector<S>(sum.begin(), sum.end());
}
template <typename S>
void colsum_add(const S* src, int64_t rows, int64_t n, S* dst) {
  par(n, rows, [&](int64_t j0, int64_t j1) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = j0; j < j1; ++j) dst[j] += src[r * n + j];
  });
}

// What block_forward computes: kAll = everything up to g = GEGLU(...); kForBackward = what the backward needs when
// y1 and u were saved by the forward (w.y1 and w.u point at the saved rows): x, xn, (q, o), P, then z = LN_ff(y1)
// and its statistics; neither the attention output (P Cx / o Wo^T), nor the ff_in GEMM, nor the GEGLU.
enum class Stage { kAll, kForBackward };

// Forward of tokens [t0, t0 + R); kAll fills w.x, xn, (q, o), P, y1, z, u, g and the LN stats.
template <typename S>
void block_forward(const Params<S>& p, const LatentSide<S>& s, const Tokens<S>& tok, int64_t t0, int64_t R,
                   Work<S>& w, Stage stage = Stage::kAll) {
  const bool all = stage == Stage::kAll;
  const int64_t d = p.d, N = p.N, H = p.H, dh = p.dh, I = p.I(), HN = H * N, F = p.F;
  const S scale = S(1) / std::sqrt(S(dh));
  par(R, d, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::memcpy(&w.x[r * d], p.x + tok.row[t0 + r] * d, sizeof(S) * d);
  });
  ln_fwd_par(w.x, R, d, p.norm_w, p.norm_b, p.eps, w.xn, w.mean1, w.rstd1);
  // rows of P are [H][N] contiguous: softmax over R*H rows of N
  auto softmax = [&] {
    par(R * H, 4 * N, [&](int64_t a, int64_t b) { softmax_rows(w.P + a * N, b - a, N, N); });
  };
  if (p.fold) {
    gemm(false, true, R, HN, d, scale, w.xn, d, s.Kx.data(), d, S(0), w.P, HN);
    softmax();
    if (all) gemm(false, false, R, d, HN, S(1), w.P, HN, s.Cx.data(), d, S(0), w.attn, d);
  } else {
    gemm(false, true, R, I, d, S(1), w.xn, d, p.wq, d, S(0), w.q, I);
    // head by head: scores, softmax and P V while P_h [R, N] is still in cache
    for_each_head(H, [&](int64_t h) {
      gemm(false, true, R, N, dh, scale, w.q + h * dh, I, s.K.data() + h * dh, I, S(0), w.P + h * N, HN);
      par(R, 4 * N, [&](int64_t r0, int64_t r1) { softmax_rows(w.P + r0 * HN + h * N, r1 - r0, N, HN); });
      gemm(false, false, R, dh, N, S(1), w.P + h * N, HN, s.V.data() + h * dh, I, S(0), w.o + h * dh, I);
    });
    if (all) gemm(false, true, R, d, I, S(1), w.o, I, p.wo, I, S(0), w.attn, d);
  }
  if (all) {
    par(R, d, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0 * d; i < r1 * d; ++i) w.y1[i] = w.attn[i] + w.x[i];
    });
  }
  ln_fwd_par(w.y1, R, d, p.ff_norm_w, p.ff_norm_b, p.eps, w.z, w.mean2, w.rstd2);
  if (!all) return;
  gemm(false, true, R, 2 * F, d, S(1), w.z, d, p.ff_in_w, d, S(0), w.u, 2 * F);
  par(R, 20 * F, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      geglu_fwd(&w.u[r * 2 * F], p.ff_in_b, F, &w.g[r * F]);
    }
  });
}

// Equal blocks of at most kMaxBlock rows, and of at most the rows that fit the workspace budget (>= 16).
template <typename S>
int64_t block_rows(const Params<S>& p, bool bwd, int64_t T) {
  const int64_t fit = kWorkspaceBytes / int64_t(sizeof(S)) / work_floats_per_row(p, bwd);
  const int64_t cap = std::max<int64_t>(16, std::min<int64_t>(kMaxBlock, fit));
  const int64_t nb = std::max<int64_t>(1, (T + cap - 1) / cap);
  return std::max<int64_t>(1, (T + nb - 1) / nb);
}

}  // namespace detail

// Activations the forward can keep for the backward (all three or none), in the compute type: the backward then
// skips the attention output projection, the ff_in GEMM and the GEGLU of its recomputation (about 2/3 of the
// recomputed multiply-adds at MiniLM size). Rows are the active tokens in (b, l) order; rows T .. B*L - 1 are zero.
template <typename S>
struct Saved {
  S* gbar;  // [B, F]: the masked mean of g = GEGLU(...), what d ff_out_weight needs
  S* y1;    // [B*L, d]: attention output + residual, the input of LN_ff
  S* u;     // [B*L, 2F]: z ff_in_w^T, the input of the GEGLU before its bias (as csrc/latent_pool_aten.cpp's u)
};

// out [B, d] (normalized if p.normalize), pooled [B, d] (before normalization: the backward's statistic); with
// `save`, the activations above are written too.
template <typename S>
void forward(const Params<S>& p, S* out, S* pooled, const Saved<S>* save = nullptr) {
  using namespace detail;
  const int64_t B = p.B, L = p.L, d = p.d, F = p.F;
  const Tokens<S> tok = gather_tokens(p);
  const int64_t T = tok.size();
  const LatentSide<S> side = latent_side(p);
  PoolSum gbar_sum(B * F, 0.0), ybar_sum(B * d, 0.0);
  const int64_t Rb = block_rows(p, false, T);
  Work<S> w(p, false, std::min(Rb, std::max<int64_t>(T, 1)));
  for (int64_t tb = 0; tb < T; tb += Rb) {
    const int64_t R = std::min(Rb, T - tb);
    if (save) w.y1 = save->y1 + tb * d, w.u = save->u + tb * 2 * F;  // the GEMMs write the saved rows directly
    block_forward(p, side, tok, tb, R, w);
    pool_rows(w.g, R, F, tok.batch.data() + tb, tok.w.data() + tb, gbar_sum.data());
    pool_rows(w.y1, R, d, tok.batch.data() + tb, tok.w.data() + tb, ybar_sum.data());
  }
  const std::vector<S> gbar = rounded<S>(gbar_sum), ybar = rounded<S>(ybar_sum);
  if (save) {
    std::copy(gbar.begin(), gbar.end(), save->gbar);
    std::fill(save->y1 + T * d, save->y1 + B * L * d, S(0));
    std::fill(save->u + T * 2 * F, save->u + B * L * 2 * F, S(0));
  }
  gemm(false, true, B, d, F, S(1), gbar.data(), F, p.ff_out_w, F, S(0), pooled, d);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < d; ++j) pooled[b * d + j] += tok.bias_coef[b] * p.ff_out_b[j] + ybar[b * d + j];
  for (int64_t b = 0; b < B; ++b) {
    S nrm = 1;
    if (p.normalize) {
      S ss = 0;
      for (int64_t j = 0; j < d; ++j) ss += pooled[b * d + j] * pooled[b * d + j];
      nrm = std::max(std::sqrt(ss), S(1e-12));  // F.normalize(eps=1e-12)
    }
    for (int64_t j = 0; j < d; ++j) out[b * d + j] = pooled[b * d + j] / nrm;
  }
}

// `saved`: what forward(..., save) wrote for the same inputs, or nullptr (recompute everything).
template <typename S>
void backward(const Params<S>& p, const S* grad_out, const S* pooled, const Grads<S>& gr,
              const Saved<S>* saved = nullptr) {
  using namespace detail;
  const int64_t B = p.B, L = p.L, d = p.d, N = p.N, H = p.H, dh = p.dh, I = p.I(), HN = H * N, F = p.F;
  const S scale = S(1) / std::sqrt(S(dh));
  const Tokens<S> tok = gather_tokens(p);
  const int64_t T = tok.size();
  const LatentSide<S> side = latent_side(p);

  // de = d loss / d pooled (through the L2 normalization); rows without active tokens get none.
  std::vector<S> de(B * d, S(0));
  for (int64_t b = 0; b < B; ++b) {
    if (!tok.any[b]) continue;
    const S* pb = pooled + b * d;
    const S* gb = grad_out + b * d;
    if (!p.normalize) {
      for (int64_t j = 0; j < d; ++j) de[b * d + j] = gb[j];
      continue;
    }
    S ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += pb[j] * pb[j];
    const S n = std::sqrt(ss);
    if (n > S(1e-12)) {
      S dot = 0;
      for (int64_t j = 0; j < d; ++j) dot += pb[j] * gb[j];
      dot /= n * n;
      for (int64_t j = 0; j < d; ++j) de[b * d + j] = (gb[j] - pb[j] * dot) / n;
    } else {
      for (int64_t j = 0; j < d; ++j) de[b * d + j] = gb[j] / S(1e-12);
    }
  }
  // dg_t = w_t * (de_b Wff): one [B, F] GEMM instead of [T, F].
  std::vector<S> dgb(B * F);
  gemm(false, false, B, F, d, S(1), de.data(), d, p.ff_out_w, F, S(0), dgb.data(), F);

  // gradient accumulators; fold: dk = dKx, dv = dCx [H*N, d]; plain: dk = dK, dv = dV [N, I]
  PoolSum gbar_sum(saved ? 0 : B * F, 0.0);
  std::vector<S> dwin(2 * F * d, S(0)), dbin(2 * F, S(0)), dfw(d, S(0)), dfb(d, S(0));
  std::vector<S> dnw(d, S(0)), dnb(d, S(0)), dk, dv, dwq, dwo;
  if (p.fold) {
    dk.assign(HN * d, S(0)), dv.assign(HN * d, S(0));
  } else {
    dk.assign(N * I, S(0)), dv.assign(N * I, S(0)), dwq.assign(I * d, S(0)), dwo.assign(d * I, S(0));
  }
  std::fill(gr.x, gr.x + B * L * d, S(0));

  const int64_t Rb = block_rows(p, true, T);
  Work<S> w(p, true, std::min(Rb, std::max<int64_t>(T, 1)));
  for (int64_t tb = 0; tb < T; tb += Rb) {
    const int64_t R = std::min(Rb, T - tb);
    if (saved) {
      w.y1 = saved->y1 + tb * d, w.u = saved->u + tb * 2 * F;
      block_forward(p, side, tok, tb, R, w, Stage::kForBackward);
    } else {
      block_forward(p, side, tok, tb, R, w);
      pool_rows(w.g, R, F, tok.batch.data() + tb, tok.w.data() + tb, gbar_sum.data());
    }
    // GEGLU backward; dy1 starts as the residual path's w_t * de_b.
    par(R, 30 * F, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = tok.batch[tb + r];
        const S wt = tok.w[tb + r];
        geglu_bwd(&w.u[r * 2 * F], p.ff_in_b, &dgb[b * F], wt, F, &w.du[r * 2 * F]);
        for (int64_t j = 0; j < d; ++j) w.dy1[r * d + j] = wt * de[b * d + j];
      }
    });
    colsum_add(w.du, R, 2 * F, dbin.data());
    gemm(true, false, 2 * F, d, R, S(1), w.du, 2 * F, w.z, d, S(1), dwin.data(), d);
    gemm(false, false, R, d, 2 * F, S(1), w.du, 2 * F, p.ff_in_w, d, S(0), w.dz, d);
    ln_bwd_par(w.y1, w.mean2, w.rstd2, p.ff_norm_w, w.dz, R, d, w.dy1,
               dfw.data(), dfb.data());
    // attention backward: dattn = dy1
    auto softmax_bwd = [&] {
      par(R * H, 4 * N, [&](int64_t a, int64_t b) {
        softmax_bwd_rows(w.P + a * N, w.dP + a * N, b - a, N, N, scale);
      });
    };
    if (p.fold) {
      gemm(false, true, R, HN, d, S(1), w.dy1, d, side.Cx.data(), d, S(0), w.dP, HN);
      gemm(true, false, HN, d, R, S(1), w.P, HN, w.dy1, d, S(1), dv.data(), d);
      softmax_bwd();
      gemm(false, false, R, d, HN, S(1), w.dP, HN, side.Kx.data(), d, S(0), w.dxn, d);
      gemm(true, false, HN, d, R, S(1), w.dP, HN, w.xn, d, S(1), dk.data(), d);
    } else {
      gemm(true, false, d, I, R, S(1), w.dy1, d, w.o, I, S(1), dwo.data(), I);
      gemm(false, false, R, I, d, S(1), w.dy1, d, p.wo, I, S(0), w.dout, I);
      for_each_head(H, [&](int64_t h) {  // heads write disjoint column slices of dq, dk, dv
        gemm(false, true, R, N, dh, S(1), w.dout + h * dh, I, side.V.data() + h * dh, I, S(0), w.dP + h * N, HN);
        gemm(true, false, N, dh, R, S(1), w.P + h * N, HN, w.dout + h * dh, I, S(1), dv.data() + h * dh, I);
        par(R, 4 * N, [&](int64_t r0, int64_t r1) {
          softmax_bwd_rows(w.P + r0 * HN + h * N, w.dP + r0 * HN + h * N, r1 - r0, N, HN, scale);
        });
        gemm(false, false, R, dh, N, S(1), w.dP + h * N, HN, side.K.data() + h * dh, I, S(0), w.dq + h * dh, I);
        gemm(true, false, N, dh, R, S(1), w.dP + h * N, HN, w.q + h * dh, I, S(1), dk.data() + h * dh, I);
      });
      gemm(false, false, R, d, I, S(1), w.dq, I, p.wq, d, S(0), w.dxn, d);
      gemm(true, false, I, d, R, S(1), w.dq, I, w.xn, d, S(1), dwq.data(), d);
    }
    std::memcpy(w.dx, w.dy1, sizeof(S) * R * d);  // residual
    ln_bwd_par(w.x, w.mean1, w.rstd1, p.norm_w, w.dxn, R, d, w.dx, dnw.data(),
               dnb.data());
    par(R, d, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) std::memcpy(gr.x + tok.row[tb + r] * d, &w.dx[r * d], sizeof(S) * d);
    });
  }
  std::copy(dwin.begin(), dwin.end(), gr.ff_in_w);
  std::copy(dbin.begin(), dbin.end(), gr.ff_in_b);
  std::copy(dfw.begin(), dfw.end(), gr.ff_norm_w);
  std::copy(dfb.begin(), dfb.end(), gr.ff_norm_b);
  std::copy(dnw.begin(), dnw.end(), gr.norm_w);
  std::copy(dnb.begin(), dnb.end(), gr.norm_b);
  // Wff and its bias see only the pooled rows.
  const std::vector<S> gbar = rounded<S>(gbar_sum);
  gemm(true, false, d, F, B, S(1), de.data(), d, saved ? saved->gbar : gbar.data(), F, S(0), gr.ff_out_w, F);
  for (int64_t j = 0; j < d; ++j) {
    S s = 0;
    for (int64_t b = 0; b < B; ++b) s += tok.bias_coef[b] * de[b * d + j];
    gr.ff_out_b[j] = s;
  }
  // Latent side: dK, dV [N, I] (the score scale is already in dk via softmax_bwd_rows).
  std::vector<S> dK, dV;
  if (p.fold) {
    dK.assign(N * I, S(0)), dV.assign(N * I, S(0));
    for (int64_t h = 0; h < H; ++h) {
      const S* dKx = dk.data() + h * N * d;
      const S* dCx = dv.data() + h * N * d;
      gemm(false, true, N, dh, d, S(1), dKx, d, p.wq + h * dh * d, d, S(0), dK.data() + h * dh, I);
      gemm(true, false, dh, d, N, S(1), side.K.data() + h * dh, I, dKx, d, S(0), gr.wq + h * dh * d, d);
      gemm(false, false, N, dh, d, S(1), dCx, d, p.wo + h * dh, I, S(0), dV.data() + h * dh, I);
      gemm(true, false, d, dh, N, S(1), dCx, d, side.V.data() + h * dh, I, S(0), gr.wo + h * dh, I);
    }
  } else {
    dK.swap(dk), dV.swap(dv);
    std::copy(dwq.begin(), dwq.end(), gr.wq);
    std::copy(dwo.begin(), dwo.end(), gr.wo);
  }
  gemm(true, false, I, d, N, S(1), dK.data(), I, side.ctx.data(), d, S(0), gr.wkv, d);
  gemm(true, false, I, d, N, S(1), dV.data(), I, side.ctx.data(), d, S(0), gr.wkv + I * d, d);
  std::vector<S> dctx(N * d);
  gemm(false, false, N, d, I, S(1), dK.data(), I, p.wkv, d, S(0), dctx.data(), d);
  gemm(false, false, N, d, I, S(1), dV.data(), I, p.wkv + I * d, d, S(1), dctx.data(), d);
  std::fill(gr.latents, gr.latents + N * d, S(0));
  std::fill(gr.ctx_w, gr.ctx_w + d, S(0));
  std::fill(gr.ctx_b, gr.ctx_b + d, S(0));
  ln_bwd_par(p.latents, side.ctx_mean.data(), side.ctx_rstd.data(), p.ctx_w, dctx.data(), N, d, gr.latents,
             gr.ctx_w, gr.ctx_b);
}

}  // namespace nvembed::cpu::latent_pool
