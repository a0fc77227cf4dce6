// nvembed::latent_pool on any device: GEMMs through ATen (cuBLAS on CUDA), the elementwise stages between them
// through LatentPoolKernels (the fused kernels of cuda/latent_pool.cu, or ATen's LayerNorm / softmax / GELU ops): the
// CUDA implementation, and the same code on CPU tensors for its tests (NVEMBED_LATENT_POOL_ATEN=1 routes the CPU op
// here, with the ATen stages). Same algebra as the CPU kernel (cpu/latent_pool.h):
//   * K / V of the latents once per call; the query and output projections folded into them when the cost model
//     says so (the release's dim_head = d: ~9x fewer attention FLOPs per token): scores = xn Kx^T, attn = P Cx;
//   * the last feed-forward matrix applied after the masked mean ([B, F] GEMM instead of [T, F]);
//   * tokens with pool weight 0 skipped (their gradient is exactly 0);
//   * the backward recomputes the token activations chunk by chunk (the forward saves only pooled [B, d]), or,
//     given the activations _latent_pool_fwd_save kept (y1 [T, d] acc and u = z W_in^T [T, 2F]), only LN(x), the
//     attention probabilities (and q, o) and LN_ff(y1): no attention output, no ff_in GEMM.
// Memory: a chunk's length comes from an element budget (Layer::chunk), the GEGLU backward runs in place in the
// [t, 2F] buffer of its input, weight-gradient accumulations go through row blocks (add_mm), and gradients that are
// only returned come out of their GEMM in the input dtype. fwd + bwd at NV-Embed-v2 size (bf16) then peaks at the
// returned gradients (1.5 GiB) plus ~0.2 GiB, the chunk loop at ~1.6 GiB (model_peak_bytes in
// tests/test_latent_pool_memory.py, checked against measured CPU peaks; an estimate for CUDA).
// GEMMs run in the input dtype (bf16 / fp16: tensor cores with fp32 accumulation), like the eager layer;
// activations, LayerNorm, softmax, GELU, the pooled sums and every gradient accumulation are fp32 (fp64 for fp64
// inputs). The masked mean is a [B, t] x [t, *] GEMM per chunk, not a scatter-add: chunks run in order and no
// atomics are involved, so repeated calls give the same bits.
// Stages with a fixed contract (LatentPoolKernels in the header), fused CUDA kernels or the ATen ops below
// (NVEMBED_LATENT_POOL_KERNELS): the gather of a chunk's tokens + LayerNorm, the softmax over the latents, the
// residual + LayerNorm, and the GEGLU + masked mean of the feed-forward's [t, 2F] input, the widest tensor of the
// layer (fused: one read of u, per-unit partial sums that a small GEMM adds per batch row).
#include "latent_pool_aten.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "aten_guard.h"
#include "cpu/latent_pool.h"
#include "kernel_choice.h"

namespace nvembed {

const char* latent_pool_kernel_choice() {
  return kernel_choice("NVEMBED_LATENT_POOL_KERNELS", "latent_pool", "aten", "fused", true,
                       kLatentPoolFusedVerified);
}

void latent_pool_check_geglu(const Tensor& u, const Tensor& bias, const Tensor& w, const Tensor& units,
                             const Tensor& part_g, const Tensor& dgbar, const Tensor& part_b) {
  TORCH_INTERNAL_ASSERT(u.dim() == 2 && u.size(1) % 2 == 0 && u.is_contiguous(), "latent_pool: u");
  const int64_t t = u.size(0), F = u.size(1) / 2, U = units.size(0);
  const at::ScalarType acc = w.scalar_type();
  TORCH_INTERNAL_ASSERT(units.dim() == 2 && units.size(1) == 3 && units.scalar_type() == at::kInt &&
                            units.is_contiguous() && units.device() == u.device(),
                        "latent_pool: units");
  const auto vec = [&](const Tensor& x, int64_t n) {
    return x.is_contiguous() && x.numel() == n && x.scalar_type() == acc && x.device() == u.device();
  };
  const auto mat = [&](const Tensor& x, int64_t rows, int64_t cols) {
    return x.dim() == 2 && x.size(0) == rows && x.size(1) == cols && vec(x, rows * cols);
  };
  TORCH_INTERNAL_ASSERT(vec(w, t) && vec(bias, 2 * F) && mat(part_g, U, F), "latent_pool: w / bias / part_g");
  TORCH_INTERNAL_ASSERT(dgbar.defined() == part_b.defined(), "latent_pool: dgbar / part_b");
  if (dgbar.defined()) {
    TORCH_INTERNAL_ASSERT(dgbar.dim() == 2 && mat(dgbar, dgbar.size(0), F) && mat(part_b, U, 2 * F),
                          "latent_pool: dgbar / part_b");
  }
}

void latent_pool_check_rows(const Tensor& src, const Tensor& idx, const Tensor& res, const Tensor& w,
                            const Tensor& b) {
  const at::ScalarType acc = w.scalar_type();
  TORCH_INTERNAL_ASSERT(src.dim() == 2 && src.is_contiguous(), "latent_pool: rows");
  const int64_t d = src.size(1), t = idx.defined() ? idx.numel() : src.size(0);
  TORCH_INTERNAL_ASSERT(w.is_contiguous() && w.numel() == d && b.is_contiguous() && b.numel() == d &&
                            b.scalar_type() == acc && w.device() == src.device() && b.device() == src.device(),
                        "latent_pool: LayerNorm weight / bias");
  TORCH_INTERNAL_ASSERT(!idx.defined() || (idx.dim() == 1 && idx.is_contiguous() && idx.scalar_type() == at::kLong &&
                                           idx.device() == src.device()),
                        "latent_pool: idx");
  TORCH_INTERNAL_ASSERT(!res.defined() || (res.is_contiguous() && res.scalar_type() == acc && res.dim() == 2 &&
                                           res.size(0) == t && res.size(1) == d && res.device() == src.device()),
                        "latent_pool: residual");
}

void latent_pool_check_softmax(const Tensor& scores) {
  TORCH_INTERNAL_ASSERT(scores.dim() == 2 && scores.is_contiguous(), "latent_pool: scores");
}

namespace {

// Token chunks hold ~kChunkElems elements in their widest per-token row (u [t, 2F], q / o [t, I], scores
// [t, H*N]): 256 MB of fp32, whatever F (a fixed 4096-token chunk at NV-Embed-v2 size, 2F = 32768, held 0.5 GB per
// [t, 2F] fp32 tensor and several of them at once). At v2 size that is t = 2048 and the backward's chunk loop peaks
// under its end (the returned gradients): a smaller chunk would not lower the peak, but every chunk costs one fp32
// read-modify-write of the [2F, d] / [H*N, d] accumulators (at t = 1024 ~80 % of the d_ff_in_w GEMM's time on an
// H200, from its bandwidth and GEMM rate). Never below kMinRows (unless fewer tokens are active): GEMMs keep M >= 1024,
// where cuBLAS runs near peak; never above kMaxChunkTokens, the old fixed length.
constexpr int64_t kChunkElems = int64_t(64) << 20;
constexpr int64_t kMinRows = 1024, kMaxChunkTokens = 4096;

struct Layer {
  int64_t B, L, d, N, H, dh, I, F;
  double scale, eps;
  bool fold;
  int64_t chunk;  // tokens per chunk
  at::ScalarType io, acc;
  // GEMM weights (io) and LayerNorm parameters / biases (acc)
  Tensor wq, wkv, wo, ff_in_w, ff_out_w;
  Tensor norm_w, norm_b, ctx_w, ctx_b, ff_norm_w, ff_norm_b, ff_in_b, ff_out_b;
  Tensor latents;                  // acc
  Tensor ctx, ctx_mean, ctx_rstd;  // LN(latents), acc
  Tensor kh_io, vh_io;             // [H, N, dh]: only ever GEMM operands, so no acc copy is kept
  Tensor kx_io, cx_io;             // folded: [H*N, d]
  // active tokens
  Tensor idx, batch, w, c;  // [T] flat token index, [T] batch row, [T] pool weight, [B] row weight sum
  Tensor active;            // [B] bool: the row pools a token (a nonzero weight; its weights may still sum to 0)
  // units of the fused GEGLU stage (LatentPoolKernels): int32 [U, 3] for all chunks (first token relative to its
  // chunk, count, row); chunk k owns rows [unit_off[k], unit_off[k + 1])
  Tensor units;
  std::vector<int64_t> unit_off;
};

Tensor mm(const Tensor& a, const Tensor& b, at::ScalarType io, at::ScalarType acc) {
  return at::matmul(a.to(io), b.to(io)).to(acc);
}

// out += a @ b (GEMM in io, accumulation in out's acc dtype) one block of out's rows at a time: the io GEMM output
// exists for <= ~kChunkElems elements and is added in place with promotion (CUDA casts on the fly; the CPU makes an
// acc copy of the block), instead of an io and an acc copy of all of out (d_ff_in_w [2F, d] at NV-Embed-v2 size:
// 0.125 instead of 0.75 GB per chunk); blocks of >= 1024 rows keep the GEMMs big. With io == acc (fp32 / fp64) the
// GEMM accumulates into out itself (beta = 1).
void add_mm(Tensor& out, const Tensor& a, const Tensor& b, at::ScalarType io, at::ScalarType acc) {
  if (io == acc) {
    out.addmm_(a, b);
    return;
  }
  const Tensor a_io = a.to(io), b_io = b.to(io);
  const int64_t R = out.size(0);
  const int64_t rows = std::max<int64_t>(kMinRows, kChunkElems / std::max<int64_t>(out.size(1), 1));
  for (int64_t r0 = 0; r0 < R; r0 += rows) {
    const int64_t r = std::min(rows, R - r0);
    out.narrow(0, r0, r).add_(at::mm(a_io.narrow(0, r0, r), b_io));
  }
}


Layer setup(const Tensor& hs, const std::optional<Tensor>& pool_mask, const Tensor& latents, const Tensor& norm_w,
            const Tensor& norm_b, const Tensor& ctx_w, const Tensor& ctx_b, const Tensor& wq, const Tensor& wkv,
            const Tensor& wo, const Tensor& ff_norm_w, const Tensor& ff_norm_b, const Tensor& ff_in_w,
            const Tensor& ff_in_b, const Tensor& ff_out_w, const Tensor& ff_out_b, int64_t num_heads, double eps,
            bool fused) {
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
  s.active = wgt.ne(0).any(1);

  auto ln = at::native_layer_norm(s.latents, {s.d}, s.ctx_w, s.ctx_b, eps);
  s.ctx = std::get<0>(ln), s.ctx_mean = std::get<1>(ln), s.ctx_rstd = std::get<2>(ln);
  const Tensor kv = at::matmul(s.ctx.to(s.io), s.wkv.t());  // [N, 2I] io
  s.kh_io = kv.narrow(1, 0, s.I).reshape({s.N, s.H, s.dh}).transpose(0, 1).contiguous();
  s.vh_io = kv.narrow(1, s.I, s.I).reshape({s.N, s.H, s.dh}).transpose(0, 1).contiguous();
  const int64_t T = std::max<int64_t>(s.idx.size(0), 1);
  s.fold = latent_pool_fold_override(cpu::latent_pool::fold_is_cheaper(T, s.d, s.N, s.H, s.dh));
  if (s.fold) {
    // Kx_h = K_h Wq_h [N, d]; Cx_h = V_h Wo_h^T [N, d]
    // (only the GEMM operands are kept: the backward chains dKx / dCx through K, V, Wq, Wo directly)
    s.kx_io = at::matmul(s.kh_io, s.wq.view({s.H, s.dh, s.d})).reshape({s.H * s.N, s.d});
    s.cx_io = at::matmul(s.vh_io, s.wo.view({s.d, s.H, s.dh}).permute({1, 2, 0})).reshape({s.H * s.N, s.d});
  }
  // The widest per-token rows a chunk allocates, in acc elements. ATen's GEGLU stage holds u [t, 2F] in acc; the
  // fused kernels work in u's io buffer (half the bytes for bf16 / fp16) and the folded path has no [t, I] rows, so
  // at NV-Embed-v2 size their chunks are 4096 tokens instead of 2048: half as many read-modify-writes of the
  // [2F, d] fp32 d_ff_in_w accumulator (1.5 GB of traffic per chunk there) in no more memory than ATen's 2048.
  const int64_t io_bytes = c10::elementSize(s.io), acc_bytes = c10::elementSize(s.acc);
  const int64_t width = fused ? std::max({2 * s.F * io_bytes / acc_bytes, s.fold ? 0 : s.I, s.H * s.N, s.d})
                              : std::max({2 * s.F, s.I, s.H * s.N});
  s.chunk = std::clamp(kChunkElems / std::max<int64_t>(width, 1), kMinRows, kMaxChunkTokens);

  // Units: the active tokens of each batch row are consecutive in flat order; cut them at chunk borders and every
  // kLatentPoolUnitTokens tokens (one host copy of the B row counts; the nonzero above synchronized already).
  const Tensor counts = wgt.ne(0).sum(1).to(at::kCPU, at::kLong).contiguous();
  const int64_t* cnt = counts.data_ptr<int64_t>();
  std::vector<int32_t> units;
  int64_t row = 0, row_begin = 0;  // row's first active token (flat active order)
  for (int64_t t0 = 0; t0 < s.idx.size(0); t0 += s.chunk) {
    s.unit_off.push_back(static_cast<int64_t>(units.size() / 3));
    const int64_t t1 = std::min(t0 + s.chunk, s.idx.size(0));
    for (int64_t pos = t0; pos < t1;) {
      while (row_begin + cnt[row] <= pos) row_begin += cnt[row++];  // skips rows without active tokens
      const int64_t end = std::min({t1, row_begin + cnt[row], pos + kLatentPoolUnitTokens});
      units.insert(units.end(), {static_cast<int32_t>(pos - t0), static_cast<int32_t>(end - pos),
                                 static_cast<int32_t>(row)});
      pos = end;
    }
  }
  s.unit_off.push_back(static_cast<int64_t>(units.size() / 3));
  s.units = at::from_blob(units.data(), {static_cast<int64_t>(units.size() / 3), 3}, at::kInt)
                .to(hs.device(), at::kInt, /*non_blocking=*/false, /*copy=*/true);
  return s;
}

// One chunk of active tokens up to the feed-forward's input z, recomputed in the backward. GEMM operands are kept
// in io (xn, p_io, z: what the next GEMMs read), the LayerNorm backward's inputs and the softmax output in acc.
struct Acts {
  Tensor x, xn, xn_mean, xn_rstd;  // x acc, xn io
  Tensor q;                        // [t, I] acc, unfolded path only
  Tensor p, p_io;                  // [t, H, N] softmax: acc (backward only) and io
  Tensor o;                        // [t, I] acc, unfolded path only
  Tensor y1, z, z_mean, z_rstd;    // y1 acc, z io
};

// y1: the chunk's rows of y1 that the forward saved (acc), or undefined; with them the attention output and the
// residual are not recomputed, and z = LN_ff(y1) comes from ATen's LayerNorm.
Acts token_forward(const Layer& s, const LatentPoolKernels& k, const Tensor& x_flat, const Tensor& idx,
                   bool backward, const Tensor& y1 = Tensor()) {
  Acts a;
  const int64_t t = idx.size(0);
  LatentPoolRows l1 = k.gather_layer_norm(x_flat, idx, s.norm_w, s.norm_b, s.eps);
  a.x = std::move(l1.input), a.xn = std::move(l1.normed), a.xn_mean = std::move(l1.mean);
  a.xn_rstd = std::move(l1.rstd);
  // scores in io, softmax rows of N: [t, H, N] folded, [H, t, N] plain
  Tensor scores;
  if (s.fold) {
    scores = at::matmul(a.xn, s.kx_io.t());
  } else {
    a.q = mm(a.xn, s.wq.t(), s.io, s.acc);
    scores = at::matmul(a.q.view({t, s.H, s.dh}).transpose(0, 1).to(s.io), s.kh_io.transpose(1, 2));
  }
  auto [p_io, p] = k.softmax(scores.view({-1, s.N}), s.scale, backward);
  scores.reset();
  const std::vector<int64_t> shape = s.fold ? std::vector<int64_t>{t, s.H, s.N} : std::vector<int64_t>{s.H, t, s.N};
  a.p_io = s.fold ? p_io.view(shape) : p_io.view(shape).transpose(0, 1);
  if (p.defined()) a.p = s.fold ? p.view(shape) : p.view(shape).transpose(0, 1);
  if (!s.fold) a.o = at::matmul(a.p_io.transpose(0, 1), s.vh_io).to(s.acc).transpose(0, 1).reshape({t, s.I});
  if (y1.defined()) {
    auto [z, mean, rstd] = at::native_layer_norm(y1, {s.d}, s.ff_norm_w, s.ff_norm_b, s.eps);
    a.y1 = y1, a.z = z.to(s.io), a.z_mean = std::move(mean), a.z_rstd = std::move(rstd);
    return a;
  }
  const Tensor attn = s.fold ? at::matmul(a.p_io.reshape({t, s.H * s.N}), s.cx_io)  // io
                             : at::matmul(a.o.to(s.io), s.wo.t());
  LatentPoolRows l2 = k.residual_layer_norm(attn, a.x, s.ff_norm_w, s.ff_norm_b, s.eps);
  a.y1 = std::move(l2.input), a.z = std::move(l2.normed), a.z_mean = std::move(l2.mean);
  a.z_rstd = std::move(l2.rstd);
  return a;
}

// u = z W_in^T = [a | gate] - b_in, [t, 2F] io: the input of the GEGLU stage, whose output is g = a * gelu(gate).
Tensor ff_in(const Layer& s, const Tensor& z) { return at::matmul(z.to(s.io), s.ff_in_w.t()); }

// ---- the GEGLU stage through ATen ops (the LatentPoolKernels contract; CPU, and CUDA unless fused) -------------

// [n, m] in acc, 1 where row r == index[j] (m integers): the one-hot matrices that add rows per unit / batch row.
Tensor one_hot_rows(int64_t n, const Tensor& index, at::ScalarType acc) {
  const Tensor idx = index.to(at::kLong);
  return at::arange(n, idx.options()).unsqueeze(1).eq(idx.unsqueeze(0)).to(acc);
}

// [t] int64: the unit of each of the chunk's t tokens (units are consecutive runs of tokens, in order).
Tensor unit_of_tokens(const Tensor& units, int64_t t) {
  const Tensor lens = units.select(1, 1).to(at::kLong);
  return at::repeat_interleave(at::arange(units.size(0), lens.options()), lens, 0, t);
}

// The io GEMM output dies with the conversion to acc (u = uf when io == acc: then it is overwritten in place).
Tensor geglu_input(Tensor& u, const Tensor& bias, at::ScalarType acc) {
  Tensor uf = u.to(acc);
  u.reset();
  uf.add_(bias);
  return uf;
}

void aten_geglu_pool_fwd(Tensor& u, const Tensor& bias, const Tensor& w, const Tensor& units, Tensor& part_g) {
  latent_pool_check_geglu(u, bias, w, units, part_g, Tensor(), Tensor());
  const int64_t t = u.size(0), F = u.size(1) / 2;
  Tensor uf = geglu_input(u, bias, w.scalar_type());
  Tensor g = at::gelu(uf.narrow(1, F, F));
  g.mul_(uf.narrow(1, 0, F));  // a * gelu(gate)
  uf.reset();
  at::mm_out(part_g, one_hot_rows(units.size(0), unit_of_tokens(units, t), w.scalar_type()).mul_(w.unsqueeze(0)), g);
}

// The GEGLU backward in place in the [t, 2F] acc buffer: u = [a | gate] becomes du = [dg gelu(gate) |
// gelu'(gate) dg a] (at most u and two [t, F] acc tensors alive: gelu(gate) with g, then with dg).
void aten_geglu_pool_bwd(Tensor& u, const Tensor& bias, const Tensor& w, const Tensor& units, const Tensor& dgbar,
                         Tensor& part_g, Tensor& part_b) {
  latent_pool_check_geglu(u, bias, w, units, part_g, dgbar, part_b);
  const int64_t t = u.size(0), F = u.size(1) / 2;
  const at::ScalarType io = u.scalar_type(), acc = w.scalar_type();
  Tensor uf = geglu_input(u, bias, acc);
  Tensor ua = uf.narrow(1, 0, F), ugate = uf.narrow(1, F, F);
  const Tensor unit_of = unit_of_tokens(units, t);
  const Tensor in_unit = one_hot_rows(units.size(0), unit_of, acc);  // [U, t]
  {
    const Tensor gg = at::gelu(ugate);
    at::mm_out(part_g, in_unit * w.unsqueeze(0), ua * gg);
    const Tensor row_of = units.select(1, 2).to(at::kLong).index_select(0, unit_of);
    const Tensor dg = dgbar.index_select(0, row_of).mul_(w.unsqueeze(1));  // [t, F]
    ua.mul_(dg);
    at::gelu_backward_out(ugate, ua, ugate);
    at::mul_out(ua, dg, gg);
  }
  at::mm_out(part_b, in_unit, uf);
  u = uf.to(io);
}

LatentPoolRows aten_gather_layer_norm(const Tensor& x_flat, const Tensor& idx, const Tensor& w, const Tensor& b,
                                      double eps) {
  latent_pool_check_rows(x_flat, idx, Tensor(), w, b);
  Tensor x = x_flat.index_select(0, idx).to(w.scalar_type());
  auto [y, mean, rstd] = at::native_layer_norm(x, {x.size(1)}, w, b, eps);
  return {std::move(x), y.to(x_flat.scalar_type()), std::move(mean), std::move(rstd)};
}

LatentPoolRows aten_residual_layer_norm(const Tensor& attn, const Tensor& x, const Tensor& w, const Tensor& b,
                                        double eps) {
  latent_pool_check_rows(attn, Tensor(), x, w, b);
  Tensor y1 = attn.to(x.scalar_type()).add_(x);
  auto [y, mean, rstd] = at::native_layer_norm(y1, {y1.size(1)}, w, b, eps);
  return {std::move(y1), y.to(attn.scalar_type()), std::move(mean), std::move(rstd)};
}

std::pair<Tensor, Tensor> aten_softmax(const Tensor& scores, double scale, bool want_acc) {
  latent_pool_check_softmax(scores);
  const at::ScalarType acc = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor p = at::softmax(scores.to(acc) * scale, -1);
  Tensor p_io = p.to(scores.scalar_type());
  if (!want_acc) p.reset();
  return {std::move(p_io), std::move(p)};
}

constexpr LatentPoolKernels kAtenKernels{&aten_geglu_pool_fwd, &aten_geglu_pool_bwd, &aten_gather_layer_norm,
                                         &aten_residual_layer_norm, &aten_softmax};

// [B, U]: 1 where unit k belongs to batch row b (adds the units' partial sums per row)
Tensor unit_rows(const Layer& s, const Tensor& units) { return one_hot_rows(s.B, units.select(1, 2), s.acc); }

// [B, t] pooling matrix of a chunk: row b holds the weights of the chunk's tokens of batch row b.
Tensor pool_matrix(const Layer& s, const Tensor& batch, const Tensor& w) {
  return one_hot_rows(s.B, batch, s.acc).mul_(w.unsqueeze(0));
}

// fn(t0, idx, batch, w, units) per chunk of active tokens [t0, t0 + t)
template <class Fn>
void for_chunks(const Layer& s, Fn fn) {
  const int64_t T = s.idx.size(0);
  for (int64_t t0 = 0, k = 0; t0 < T; t0 += s.chunk, ++k) {
    const int64_t t = std::min(s.chunk, T - t0);
    fn(t0, s.idx.narrow(0, t0, t), s.batch.narrow(0, t0, t), s.w.narrow(0, t0, t),
       s.units.narrow(0, s.unit_off[k], s.unit_off[k + 1] - s.unit_off[k]));
  }
}

}  // namespace

std::tuple<Tensor, Tensor> latent_pool_fwd_aten(NVE_LATENT_POOL_PARAMS, const LatentPoolKernels* kernels,
                                                const std::vector<Tensor>* saved) {
  const AtenKernelGuard guard;  // below autograd, outside autocast
  const LatentPoolKernels& k = kernels != nullptr ? *kernels : kAtenKernels;
  const Layer s = setup(hidden_states, pool_mask, latents, norm_weight, norm_bias, norm_context_weight,
                        norm_context_bias, to_q_weight, to_kv_weight, to_out_weight, ff_norm_weight, ff_norm_bias,
                        ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias, num_heads, eps, kernels != nullptr);
  const Tensor x_flat = hidden_states.reshape({s.B * s.L, s.d}).contiguous();  // the row kernels' gather
  Tensor gbar = at::zeros({s.B, s.F}, x_flat.options().dtype(s.acc));
  Tensor ybar = at::zeros({s.B, s.d}, x_flat.options().dtype(s.acc));
  for_chunks(s, [&](int64_t t0, const Tensor& idx, const Tensor& batch, const Tensor& w, const Tensor& units) {
    const int64_t t = idx.size(0);
    Tensor z;
    {
      const Acts a = token_forward(s, k, x_flat, idx, /*backward=*/false);
      ybar.add_(at::matmul(pool_matrix(s, batch, w), a.y1));
      if (saved) (*saved)[1].narrow(0, t0, t).copy_(a.y1);
      z = a.z;
    }
    Tensor u = ff_in(s, z);
    z.reset();
    if (saved) (*saved)[2].narrow(0, t0, t).copy_(u);  // before the GEGLU stage, which may work in place
    Tensor part_g = at::empty({units.size(0), s.F}, x_flat.options().dtype(s.acc));
    k.geglu_pool_fwd(u, s.ff_in_b, w, units, part_g);
    gbar.add_(at::mm(unit_rows(s, units), part_g));
  });
  if (saved) {
    const int64_t T = s.idx.size(0);
    (*saved)[0].copy_(gbar);
    (*saved)[1].narrow(0, T, s.B * s.L - T).zero_();
    (*saved)[2].narrow(0, T, s.B * s.L - T).zero_();
  }
  Tensor pooled = mm(gbar, s.ff_out_w.t(), s.io, s.acc) + s.c.unsqueeze(1) * s.ff_out_b + ybar;
  // out never aliases pooled (two outputs of one op must not share storage, also for fp32 / fp64 where .to is a
  // no-op)
  Tensor out = normalize ? pooled / pooled.norm(2, {1}, true).clamp_min(1e-12) : pooled.clone();
  return {out.to(s.io), pooled};
}

std::vector<Tensor> latent_pool_bwd_aten(const Tensor& grad_out, const Tensor& pooled, NVE_LATENT_POOL_PARAMS,
                                         const LatentPoolKernels* kernels, const std::vector<Tensor>* saved) {
  const AtenKernelGuard guard;  // below autograd, outside autocast
  const LatentPoolKernels& k = kernels != nullptr ? *kernels : kAtenKernels;
  Layer s = setup(hidden_states, pool_mask, latents, norm_weight, norm_bias, norm_context_weight, norm_context_bias,
                  to_q_weight, to_kv_weight, to_out_weight, ff_norm_weight, ff_norm_bias, ff_in_weight, ff_in_bias,
                  ff_out_weight, ff_out_bias, num_heads, eps, kernels != nullptr);
  const auto opts = hidden_states.options().dtype(s.acc);
  const Tensor x_flat = hidden_states.reshape({s.B * s.L, s.d}).contiguous();  // the row kernels' gather

  // through the normalization: F.normalize(p) = p / max(|p|, 1e-12)
  const Tensor go = grad_out.to(s.acc), pl = pooled.to(s.acc);
  Tensor gp = go;
  if (normalize) {
    const Tensor nrm = pl.norm(2, {1}, true);
    const Tensor o = pl / nrm.clamp_min(1e-12);
    gp = at::where(nrm > 1e-12, (go - o * (o * go).sum(1, true)) / nrm.clamp_min(1e-12), go / 1e-12);
    // A row with no pooled token is the constant 0: no gradient. Its go / 1e-12 would also overflow to inf in the
    // fp16 GEMM operand below, and inf * 0 spread NaN into every weight gradient.
    gp = at::where(s.active.unsqueeze(1), gp, at::zeros_like(gp));
  }
  const Tensor d_ff_out_b = (gp * s.c.unsqueeze(1)).sum(0);
  const Tensor dgbar = mm(gp, s.ff_out_w, s.io, s.acc);  // [B, F]

  // Each active token's row of dx is written once, so it is stored in the output dtype right away (the same single
  // rounding as a conversion at the end, without an acc copy of [B*L, d]).
  Tensor dx_flat = at::zeros({s.B * s.L, s.d}, hidden_states.options().dtype(s.io));
  Tensor gbar = at::zeros({s.B, s.F}, opts);  // d_ff_out_w = gp^T gbar after the loop: no [d, F] accumulator
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

  for_chunks(s, [&](int64_t t0, const Tensor& idx, const Tensor& batch, const Tensor& w, const Tensor& units) {
    const int64_t t = idx.size(0);
    Acts a = token_forward(s, k, x_flat, idx, /*backward=*/true,
                           saved ? (*saved)[1].narrow(0, t0, t) : Tensor());
    Tensor dy1 = at::matmul(pool_matrix(s, batch, w).t(), gp);  // [t, d]
    // [t, 2F] io: u, then du in its place (a copy of the saved rows: autograd may hand them to a second backward)
    Tensor du = saved ? (*saved)[2].narrow(0, t0, t).to(s.io, /*non_blocking=*/false, /*copy=*/true).contiguous()
                      : ff_in(s, a.z);  // contiguous: a direct call may pass non-contiguous saved rows
    {
      Tensor part_g = at::empty({units.size(0), s.F}, opts), part_b = at::empty({units.size(0), 2 * s.F}, opts);
      k.geglu_pool_bwd(du, s.ff_in_b, w, units, dgbar, part_g, part_b);
      gbar.add_(at::mm(unit_rows(s, units), part_g));
      d_ff_in_b.add_(part_b.sum(0));
    }
    add_mm(d_ff_in_w, du.t(), a.z, s.io, s.acc);
    a.z.reset();
    const Tensor dz = mm(du, s.ff_in_w, s.io, s.acc);
    du.reset();
    auto ln2 = at::native_layer_norm_backward(dz, a.y1, {s.d}, a.z_mean, a.z_rstd, s.ff_norm_w, s.ff_norm_b,
                                              {true, true, true});
    dy1.add_(std::get<0>(ln2));
    d_ff_norm_w.add_(std::get<1>(ln2));
    d_ff_norm_b.add_(std::get<2>(ln2));
    // y1 = attn + x
    Tensor dp;  // [t, H, N]
    if (s.fold) {
      dp = mm(dy1, s.cx_io.t(), s.io, s.acc).view({t, s.H, s.N});
      add_mm(d_cx, a.p_io.reshape({t, s.H * s.N}).t(), dy1, s.io, s.acc);
    } else {
      add_mm(d_wo, dy1.t(), a.o, s.io, s.acc);
      const Tensor doh = mm(dy1, s.wo, s.io, s.acc).view({t, s.H, s.dh}).transpose(0, 1);  // [H, t, dh]
      dp = at::matmul(doh.to(s.io), s.vh_io.transpose(1, 2)).to(s.acc).transpose(0, 1);
      d_vh.add_(at::matmul(a.p_io.permute({1, 2, 0}), doh.to(s.io)).to(s.acc));  // [H, N, dh]
    }
    const Tensor ds = at::_softmax_backward_data(dp, a.p, -1, s.acc) * s.scale;  // [t, H, N]
    Tensor dxn;
    if (s.fold) {
      const Tensor ds2 = ds.reshape({t, s.H * s.N});
      dxn = mm(ds2, s.kx_io, s.io, s.acc);
      add_mm(d_kx, ds2.t(), a.xn, s.io, s.acc);
    } else {
      const Tensor dsh = ds.transpose(0, 1);                                       // [H, t, N]
      const Tensor dq = at::matmul(dsh.to(s.io), s.kh_io).to(s.acc);              // [H, t, dh]
      d_kh.add_(at::matmul(dsh.transpose(1, 2).to(s.io), a.q.view({t, s.H, s.dh}).transpose(0, 1).to(s.io))
                    .to(s.acc));
      const Tensor dq2 = dq.transpose(0, 1).reshape({t, s.I});
      add_mm(d_wq, dq2.t(), a.xn, s.io, s.acc);
      dxn = mm(dq2, s.wq, s.io, s.acc);
    }
    auto ln1 = at::native_layer_norm_backward(dxn, a.x, {s.d}, a.xn_mean, a.xn_rstd, s.norm_w, s.norm_b,
                                              {true, true, true});
    d_norm_w.add_(std::get<1>(ln1));
    d_norm_b.add_(std::get<2>(ln1));
    dx_flat.index_copy_(0, idx, dy1.add_(std::get<0>(ln1)).to(s.io));
  });

  // Returned gradients leave acc as soon as they are final, each before the next big one is made; the ones that
  // come straight out of an io GEMM stay io (with io = bf16 / fp16 the acc round trip was exact and only cost an
  // acc copy of d_wq / d_wkv / d_wo: 2 GB at NV-Embed-v2 size).
  s.kx_io.reset(), s.cx_io.reset();  // token side done
  d_ff_in_w = d_ff_in_w.to(s.io);
  const Tensor d_ff_out_w = at::matmul(gp.t(), gbar).to(s.io);  // [d, F], one acc GEMM over the pooled rows
  // the latent side: fold -> (dK, dWq), (dV, dWo); K, V -> dWkv, dctx -> LN_ctx backward
  if (s.fold) {
    const Tensor dkx = d_kx.to(s.io).view({s.H, s.N, s.d}), dcx = d_cx.to(s.io).view({s.H, s.N, s.d});
    d_kx.reset(), d_cx.reset();
    // GEMMs in the input dtype like the rest (no acc copies of the big projection weights)
    const Tensor wq_h = s.wq.view({s.H, s.dh, s.d});                      // Wq_h [dh, d]
    const Tensor wo_h = s.wo.view({s.d, s.H, s.dh}).permute({1, 0, 2});  // Wo_h [d, dh]
    d_kh = at::matmul(dkx, wq_h.transpose(1, 2));                                         // [H, N, dh]
    d_wq = at::matmul(s.kh_io.transpose(1, 2), dkx).reshape({s.I, s.d});                  // [H, dh, d]
    d_vh = at::matmul(dcx, wo_h);                                                         // [H, N, dh]
    // dWo[:, h] = dCx_h^T V_h [d, dh], written in place into its column block (no [H, dh, d] -> [d, I] copy)
    d_wo = at::empty({s.d, s.I}, dcx.options());
    for (int64_t h = 0; h < s.H; ++h) {
      Tensor d_wo_h = d_wo.narrow(1, h * s.dh, s.dh);
      at::mm_out(d_wo_h, dcx[h].t(), s.vh_io[h]);
    }
  } else {
    d_wq = d_wq.to(s.io), d_wo = d_wo.to(s.io);
  }
  const Tensor dkv = at::cat({d_kh.to(s.io).transpose(0, 1).reshape({s.N, s.I}),
                              d_vh.to(s.io).transpose(0, 1).reshape({s.N, s.I})},
                             1);  // [N, 2I] io
  d_kh.reset(), d_vh.reset();
  const Tensor d_wkv = at::matmul(dkv.t(), s.ctx.to(s.io));
  const Tensor dctx = at::matmul(dkv, s.wkv).to(s.acc);
  auto lnc = at::native_layer_norm_backward(dctx, s.latents, {s.d}, s.ctx_mean, s.ctx_rstd, s.ctx_w, s.ctx_b,
                                            {true, true, true});
  std::vector<Tensor> grads = {dx_flat.view({s.B, s.L, s.d}), std::get<0>(lnc), d_norm_w, d_norm_b,
                               std::get<1>(lnc), std::get<2>(lnc), d_wq, d_wkv, d_wo, d_ff_norm_w, d_ff_norm_b,
                               d_ff_in_w, d_ff_in_b, d_ff_out_w, d_ff_out_b};
  for (auto& g : grads) g = g.to(s.io).contiguous();
  return grads;
}

}  // namespace nvembed
