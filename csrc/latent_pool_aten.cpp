// nvembed::latent_pool on any device through ATen (cuBLAS GEMMs and ATen's LayerNorm / softmax / GELU kernels on
// CUDA): the CUDA implementation until fused kernels exist, and the same code on CPU tensors for its tests
// (NVEMBED_LATENT_POOL_ATEN=1 routes the CPU op here). Same algebra as the CPU kernel (cpu/latent_pool.h):
//   * K / V of the latents once per call; the query and output projections folded into them when the cost model
//     says so (the release's dim_head = d: ~9x fewer attention FLOPs per token): scores = xn Kx^T, attn = P Cx;
//   * the last feed-forward matrix applied after the masked mean ([B, F] GEMM instead of [T, F]);
//   * tokens with pool weight 0 skipped (their gradient is exactly 0);
//   * the backward recomputes the token activations chunk by chunk (the forward saves only pooled [B, d]).
// GEMMs run in the input dtype (bf16 / fp16: tensor cores with fp32 accumulation), like the eager layer;
// activations, LayerNorm, softmax, GELU, the pooled sums and every gradient accumulation are fp32 (fp64 for fp64
// inputs). The masked mean is a [B, t] x [t, *] GEMM per chunk, not a scatter-add: chunks run in order and no
// atomics are involved, so repeated calls give the same bits.
#include "latent_pool_aten.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "cpu/latent_pool.h"

namespace nvembed {
namespace {

constexpr int64_t kChunkTokens = 4096;

struct Layer {
  int64_t B, L, d, N, H, dh, I, F;
  double scale, eps;
  bool fold;
  at::ScalarType io, acc;
  // GEMM weights (io) and LayerNorm parameters / biases (acc)
  Tensor wq, wkv, wo, ff_in_w, ff_out_w;
  Tensor norm_w, norm_b, ctx_w, ctx_b, ff_norm_w, ff_norm_b, ff_in_b, ff_out_b;
  Tensor latents;                  // acc
  Tensor ctx, ctx_mean, ctx_rstd;  // LN(latents), acc
  Tensor kh, vh;                   // [H, N, dh] acc
  Tensor kh_io, vh_io;             // unfolded path operands
  Tensor kx_io, cx_io;             // folded: [H*N, d]
  // active tokens
  Tensor idx, batch, w, c;  // [T] flat token index, [T] batch row, [T] pool weight, [B] row weight sum
};

Tensor mm(const Tensor& a, const Tensor& b, at::ScalarType io, at::ScalarType acc) {
  return at::matmul(a.to(io), b.to(io)).to(acc);
}


Layer setup(const Tensor& hs, const std::optional<Tensor>& pool_mask, const Tensor& latents, const Tensor& norm_w,
            const Tensor& norm_b, const Tensor& ctx_w, const Tensor& ctx_b, const Tensor& wq, const Tensor& wkv,
            const Tensor& wo, const Tensor& ff_norm_w, const Tensor& ff_norm_b, const Tensor& ff_in_w,
            const Tensor& ff_in_b, const Tensor& ff_out_w, const Tensor& ff_out_b, int64_t num_heads, double eps) {
  Layer s;
  s.io = hs.scalar_type();
  s.acc = s.io == at::kDouble ? at::kDouble : at::kFloat;
  s.B = hs.size(0), s.L = hs.size(1), s.d = hs.size(2), s.N = latents.size(0), s.H = num_heads;
  s.I = wq.size(0), s.dh = s.I / s.H, s.F = ff_in_w.size(0) / 2;
  s.scale = 1.0 / std::sqrt(static_cast<double>(s.dh));
  s.eps = eps;
  auto io = [&](const Tensor& t) { return t.to(s.io).contiguous(); };
  auto acc = [&](const Tensor& t) { return t.to(s.acc).contiguous(); };
  s.wq = io(wq), s.wkv = io(wkv), s.wo = io(wo), s.ff_in_w = io(ff_in_w), s.ff_out_w = io(ff_out_w);
  s.norm_w = acc(norm_w), s.norm_b = acc(norm_b), s.ctx_w = acc(ctx_w), s.ctx_b = acc(ctx_b);
  s.ff_norm_w = acc(ff_norm_w), s.ff_norm_b = acc(ff_norm_b), s.ff_in_b = acc(ff_in_b), s.ff_out_b = acc(ff_out_b);
  s.latents = acc(latents);

  // pool weights w_t = m_t / max(sum_l m, 1) of the tokens with m_t != 0, in flat order (batch rows ascending)
  Tensor m = pool_mask.has_value() ? pool_mask->to(s.acc) : at::ones({s.B, s.L}, hs.options().dtype(s.acc));
  Tensor wgt = m / m.sum(1, true).clamp_min(1);
  Tensor flat = wgt.reshape({-1});
  s.idx = flat.ne(0).nonzero().reshape({-1});
  s.batch = at::div(s.idx, s.L, "floor");
  s.w = flat.index_select(0, s.idx);
  s.c = wgt.sum(1);

  auto ln = at::native_layer_norm(s.latents, {s.d}, s.ctx_w, s.ctx_b, eps);
  s.ctx = std::get<0>(ln), s.ctx_mean = std::get<1>(ln), s.ctx_rstd = std::get<2>(ln);
  const Tensor kv = mm(s.ctx, s.wkv.t(), s.io, s.acc);  // [N, 2I]
  s.kh = kv.narrow(1, 0, s.I).reshape({s.N, s.H, s.dh}).transpose(0, 1).contiguous();
  s.vh = kv.narrow(1, s.I, s.I).reshape({s.N, s.H, s.dh}).transpose(0, 1).contiguous();
  const int64_t T = std::max<int64_t>(s.idx.size(0), 1);
  s.fold = latent_pool_fold_override(cpu::latent_pool::fold_is_cheaper(T, s.d, s.N, s.H, s.dh));
  if (s.fold) {
    // Kx_h = K_h Wq_h [N, d]; Cx_h = V_h Wo_h^T [N, d]
    // (only the GEMM operands are kept: the backward chains dKx / dCx through K, V, Wq, Wo directly)
    s.kx_io = at::matmul(s.kh.to(s.io), s.wq.view({s.H, s.dh, s.d})).reshape({s.H * s.N, s.d});
    s.cx_io = at::matmul(s.vh.to(s.io), s.wo.view({s.d, s.H, s.dh}).permute({1, 2, 0})).reshape({s.H * s.N, s.d});
  } else {
    s.kh_io = s.kh.to(s.io), s.vh_io = s.vh.to(s.io);
  }
  return s;
}

// One chunk of active tokens, recomputed in the backward.
struct Acts {
  Tensor x, xn, xn_mean, xn_rstd;
  Tensor q;  // [t, I], unfolded path only
  Tensor p;  // [t, H, N] softmax
  Tensor o;  // [t, I], unfolded path only
  Tensor y1, z, z_mean, z_rstd, a, gate, g;
};

Acts token_forward(const Layer& s, const Tensor& x_flat, const Tensor& idx) {
  Acts a;
  const int64_t t = idx.size(0);
  a.x = x_flat.index_select(0, idx).to(s.acc);
  auto ln = at::native_layer_norm(a.x, {s.d}, s.norm_w, s.norm_b, s.eps);
  a.xn = std::get<0>(ln), a.xn_mean = std::get<1>(ln), a.xn_rstd = std::get<2>(ln);
  Tensor scores;  // [t, H, N]
  if (s.fold) {
    scores = at::matmul(a.xn.to(s.io), s.kx_io.t()).to(s.acc).view({t, s.H, s.N});
  } else {
    a.q = mm(a.xn, s.wq.t(), s.io, s.acc);
    scores = at::matmul(a.q.view({t, s.H, s.dh}).transpose(0, 1).to(s.io), s.kh_io.transpose(1, 2))
                 .to(s.acc)
                 .transpose(0, 1);
  }
  a.p = at::softmax(scores * s.scale, -1);
  Tensor attn;
  if (s.fold) {
    attn = at::matmul(a.p.reshape({t, s.H * s.N}).to(s.io), s.cx_io).to(s.acc);
  } else {
    a.o = at::matmul(a.p.transpose(0, 1).to(s.io), s.vh_io).to(s.acc).transpose(0, 1).reshape({t, s.I});
    attn = mm(a.o, s.wo.t(), s.io, s.acc);
  }
  a.y1 = attn + a.x;
  auto ln2 = at::native_layer_norm(a.y1, {s.d}, s.ff_norm_w, s.ff_norm_b, s.eps);
  a.z = std::get<0>(ln2), a.z_mean = std::get<1>(ln2), a.z_rstd = std::get<2>(ln2);
  const Tensor u = mm(a.z, s.ff_in_w.t(), s.io, s.acc) + s.ff_in_b;
  a.a = u.narrow(1, 0, s.F);
  a.gate = u.narrow(1, s.F, s.F);
  a.g = a.a * at::gelu(a.gate);
  return a;
}

// [B, t] pooling matrix of a chunk: row b holds the weights of the chunk's tokens of batch row b.
Tensor pool_matrix(const Layer& s, const Tensor& batch, const Tensor& w) {
  return at::arange(s.B, batch.options()).unsqueeze(1).eq(batch.unsqueeze(0)).to(s.acc) * w.unsqueeze(0);
}

template <class Fn>
void for_chunks(const Layer& s, Fn fn) {
  const int64_t T = s.idx.size(0);
  for (int64_t t0 = 0; t0 < T; t0 += kChunkTokens) {
    const int64_t t = std::min(kChunkTokens, T - t0);
    fn(s.idx.narrow(0, t0, t), s.batch.narrow(0, t0, t), s.w.narrow(0, t0, t));
  }
}

}  // namespace

std::tuple<Tensor, Tensor> latent_pool_fwd_aten(
    const Tensor& hidden_states, const std::optional<Tensor>& pool_mask, const Tensor& latents,
    const Tensor& norm_weight, const Tensor& norm_bias, const Tensor& norm_context_weight,
    const Tensor& norm_context_bias, const Tensor& to_q_weight, const Tensor& to_kv_weight,
    const Tensor& to_out_weight, const Tensor& ff_norm_weight, const Tensor& ff_norm_bias, const Tensor& ff_in_weight,
    const Tensor& ff_in_bias, const Tensor& ff_out_weight, const Tensor& ff_out_bias, int64_t num_heads,
    bool normalize, double eps) {
  const Layer s = setup(hidden_states, pool_mask, latents, norm_weight, norm_bias, norm_context_weight,
                        norm_context_bias, to_q_weight, to_kv_weight, to_out_weight, ff_norm_weight, ff_norm_bias,
                        ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias, num_heads, eps);
  const Tensor x_flat = hidden_states.reshape({s.B * s.L, s.d});
  Tensor gbar = at::zeros({s.B, s.F}, x_flat.options().dtype(s.acc));
  Tensor ybar = at::zeros({s.B, s.d}, x_flat.options().dtype(s.acc));
  for_chunks(s, [&](const Tensor& idx, const Tensor& batch, const Tensor& w) {
    const Acts a = token_forward(s, x_flat, idx);
    const Tensor pm = pool_matrix(s, batch, w);
    gbar.add_(at::matmul(pm, a.g));
    ybar.add_(at::matmul(pm, a.y1));
  });
  Tensor pooled = mm(gbar, s.ff_out_w.t(), s.io, s.acc) + s.c.unsqueeze(1) * s.ff_out_b + ybar;
  // out never aliases pooled (two outputs of one op must not share storage, also for fp32 / fp64 where .to is a
  // no-op)
  Tensor out = normalize ? pooled / pooled.norm(2, {1}, true).clamp_min(1e-12) : pooled.clone();
  return {out.to(s.io), pooled};
}

std::vector<Tensor> latent_pool_bwd_aten(
    const Tensor& grad_out, const Tensor& pooled, const Tensor& hidden_states, const std::optional<Tensor>& pool_mask,
    const Tensor& latents, const Tensor& norm_weight, const Tensor& norm_bias, const Tensor& norm_context_weight,
    const Tensor& norm_context_bias, const Tensor& to_q_weight, const Tensor& to_kv_weight,
    const Tensor& to_out_weight, const Tensor& ff_norm_weight, const Tensor& ff_norm_bias, const Tensor& ff_in_weight,
    const Tensor& ff_in_bias, const Tensor& ff_out_weight, const Tensor& ff_out_bias, int64_t num_heads,
    bool normalize, double eps) {
  const Layer s = setup(hidden_states, pool_mask, latents, norm_weight, norm_bias, norm_context_weight,
                        norm_context_bias, to_q_weight, to_kv_weight, to_out_weight, ff_norm_weight, ff_norm_bias,
                        ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias, num_heads, eps);
  const auto opts = hidden_states.options().dtype(s.acc);
  const Tensor x_flat = hidden_states.reshape({s.B * s.L, s.d});

  // through the normalization: F.normalize(p) = p / max(|p|, 1e-12)
  const Tensor go = grad_out.to(s.acc), pl = pooled.to(s.acc);
  Tensor gp = go;
  if (normalize) {
    const Tensor nrm = pl.norm(2, {1}, true);
    const Tensor o = pl / nrm.clamp_min(1e-12);
    gp = at::where(nrm > 1e-12, (go - o * (o * go).sum(1, true)) / nrm.clamp_min(1e-12), go / 1e-12);
    // A row with no pooled token is the constant 0: no gradient. Its go / 1e-12 would also overflow to inf in the
    // fp16 GEMM operand below, and inf * 0 spread NaN into every weight gradient.
    gp = at::where(s.c.unsqueeze(1) > 0, gp, at::zeros_like(gp));
  }
  const Tensor d_ff_out_b = (gp * s.c.unsqueeze(1)).sum(0);
  Tensor d_ff_out_w = at::zeros({s.d, s.F}, opts);
  const Tensor dgbar = mm(gp, s.ff_out_w, s.io, s.acc);  // [B, F]

  Tensor dx_flat = at::zeros({s.B * s.L, s.d}, opts);
  Tensor d_ff_in_w = at::zeros({2 * s.F, s.d}, opts), d_ff_in_b = at::zeros({2 * s.F}, opts);
  Tensor d_ff_norm_w = at::zeros({s.d}, opts), d_ff_norm_b = at::zeros({s.d}, opts);
  Tensor d_norm_w = at::zeros({s.d}, opts), d_norm_b = at::zeros({s.d}, opts);
  Tensor d_kx, d_cx, d_wq, d_wo, d_kh, d_vh;
  if (s.fold) {
    d_kx = at::zeros({s.H * s.N, s.d}, opts), d_cx = at::zeros({s.H * s.N, s.d}, opts);
  } else {
    d_wq = at::zeros({s.I, s.d}, opts), d_wo = at::zeros({s.d, s.I}, opts);
    d_kh = at::zeros({s.H, s.N, s.dh}, opts), d_vh = at::zeros({s.H, s.N, s.dh}, opts);
  }

  for_chunks(s, [&](const Tensor& idx, const Tensor& batch, const Tensor& w) {
    const int64_t t = idx.size(0);
    const Acts a = token_forward(s, x_flat, idx);
    const Tensor pm = pool_matrix(s, batch, w);  // [B, t]
    d_ff_out_w.add_(at::matmul(gp.t(), at::matmul(pm, a.g)));
    const Tensor dg = at::matmul(pm.t(), dgbar);  // [t, F]
    Tensor dy1 = at::matmul(pm.t(), gp);          // [t, d]
    // GEGLU: g = a * gelu(gate)
    const Tensor du = at::cat({dg * at::gelu(a.gate), at::gelu_backward(dg * a.a, a.gate)}, 1);  // [t, 2F]
    d_ff_in_w.add_(mm(du.t(), a.z, s.io, s.acc));
    d_ff_in_b.add_(du.sum(0));
    const Tensor dz = mm(du, s.ff_in_w, s.io, s.acc);
    auto ln2 = at::native_layer_norm_backward(dz, a.y1, {s.d}, a.z_mean, a.z_rstd, s.ff_norm_w, s.ff_norm_b,
                                              {true, true, true});
    dy1 = dy1 + std::get<0>(ln2);
    d_ff_norm_w.add_(std::get<1>(ln2));
    d_ff_norm_b.add_(std::get<2>(ln2));
    // y1 = attn + x
    Tensor dp;  // [t, H, N]
    if (s.fold) {
      dp = mm(dy1, s.cx_io.t(), s.io, s.acc).view({t, s.H, s.N});
      d_cx.add_(mm(a.p.reshape({t, s.H * s.N}).t(), dy1, s.io, s.acc));
    } else {
      d_wo.add_(mm(dy1.t(), a.o, s.io, s.acc));
      const Tensor doh = mm(dy1, s.wo, s.io, s.acc).view({t, s.H, s.dh}).transpose(0, 1);  // [H, t, dh]
      dp = at::matmul(doh.to(s.io), s.vh_io.transpose(1, 2)).to(s.acc).transpose(0, 1);
      d_vh.add_(at::matmul(a.p.permute({1, 2, 0}).to(s.io), doh.to(s.io)).to(s.acc));  // [H, N, dh]
    }
    const Tensor ds = at::_softmax_backward_data(dp, a.p, -1, s.acc) * s.scale;  // [t, H, N]
    Tensor dxn;
    if (s.fold) {
      const Tensor ds2 = ds.reshape({t, s.H * s.N});
      dxn = mm(ds2, s.kx_io, s.io, s.acc);
      d_kx.add_(mm(ds2.t(), a.xn, s.io, s.acc));
    } else {
      const Tensor dsh = ds.transpose(0, 1);                                       // [H, t, N]
      const Tensor dq = at::matmul(dsh.to(s.io), s.kh_io).to(s.acc);              // [H, t, dh]
      d_kh.add_(at::matmul(dsh.transpose(1, 2).to(s.io), a.q.view({t, s.H, s.dh}).transpose(0, 1).to(s.io))
                    .to(s.acc));
      const Tensor dq2 = dq.transpose(0, 1).reshape({t, s.I});
      d_wq.add_(mm(dq2.t(), a.xn, s.io, s.acc));
      dxn = mm(dq2, s.wq, s.io, s.acc);
    }
    auto ln1 = at::native_layer_norm_backward(dxn, a.x, {s.d}, a.xn_mean, a.xn_rstd, s.norm_w, s.norm_b,
                                              {true, true, true});
    d_norm_w.add_(std::get<1>(ln1));
    d_norm_b.add_(std::get<2>(ln1));
    dx_flat.index_copy_(0, idx, dy1 + std::get<0>(ln1));
  });

  // the latent side: fold -> (dK, dWq), (dV, dWo); K, V -> dWkv, dctx -> LN_ctx backward
  if (s.fold) {
    const Tensor dkx = d_kx.view({s.H, s.N, s.d}), dcx = d_cx.view({s.H, s.N, s.d});
    // GEMMs in the input dtype like the rest (no fp32 copies of the big projection weights)
    const Tensor wq_h = s.wq.view({s.H, s.dh, s.d});                      // Wq_h [dh, d]
    const Tensor wo_h = s.wo.view({s.d, s.H, s.dh}).permute({1, 0, 2});  // Wo_h [d, dh]
    d_kh = mm(dkx, wq_h.transpose(1, 2), s.io, s.acc);                                  // [H, N, dh]
    d_wq = mm(s.kh.transpose(1, 2), dkx, s.io, s.acc).reshape({s.I, s.d});              // [H, dh, d]
    d_vh = mm(dcx, wo_h, s.io, s.acc);                                                   // [H, N, dh]
    d_wo = mm(s.vh.transpose(1, 2), dcx, s.io, s.acc).permute({2, 0, 1}).reshape({s.d, s.I});
  }
  const Tensor dkv =
      at::cat({d_kh.transpose(0, 1).reshape({s.N, s.I}), d_vh.transpose(0, 1).reshape({s.N, s.I})}, 1);
  const Tensor d_wkv = mm(dkv.t(), s.ctx, s.io, s.acc);
  const Tensor dctx = mm(dkv, s.wkv, s.io, s.acc);
  auto lnc = at::native_layer_norm_backward(dctx, s.latents, {s.d}, s.ctx_mean, s.ctx_rstd, s.ctx_w, s.ctx_b,
                                            {true, true, true});
  std::vector<Tensor> grads = {dx_flat.view({s.B, s.L, s.d}), std::get<0>(lnc), d_norm_w, d_norm_b,
                               std::get<1>(lnc), std::get<2>(lnc), d_wq, d_wkv, d_wo, d_ff_norm_w, d_ff_norm_b,
                               d_ff_in_w, d_ff_in_b, d_ff_out_w, d_ff_out_b};
  for (auto& g : grads) g = g.to(s.io).contiguous();
  return grads;
}

}  // namespace nvembed
