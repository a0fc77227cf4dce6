// The blocked-GEMM InfoNCE backward (infonce_gemm.h). Device-generic ATen: cuBLAS GEMMs with fp32 output and the
// CUDA chunk kernel (cuda/infonce.cu) on CUDA; on CPU (NVEMBED_INFONCE_BWD=gemm, for its tests) the same loop with
// fp32 products of the rounded operands, i.e. the numbers the CUDA path forms.
#include "infonce_gemm.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>

#include "aten_guard.h"
#include "checks.h"
#include "kernel_choice.h"

namespace nvembed {
using at::Tensor;

namespace {

constexpr const char* kOp = "infonce";
constexpr int64_t kPartBytes = int64_t{64} << 20;    // a row block of a GEMM's fp32 output
constexpr int64_t kChunkBytes = int64_t{256} << 20;  // a chunk's scores (forward and blocked backward)

// A non-negative integer from the environment, or `fallback` when unset / empty; anything else is an error.
int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v, &end, 10);
  NVE_CHECK_VALUE(errno == 0 && end != v && *end == '\0' && x > 0, kOp, name, " must be a positive integer, got '",
                  v, "'");
  return static_cast<int64_t>(x);
}

// a @ b in the accumulation dtype. bf16 / fp16 on CUDA: cuBLAS with fp32 accumulation and fp32 output (no
// rounding of partial products to the input dtype); on CPU the same products formed in fp32.
Tensor mm_acc(const Tensor& a, const Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::mm(a, b);
  if (a.is_cuda()) return at::mm(a, b, acc);
  return at::mm(a.to(acc), b.to(acc));
}

// ceil(a / G) for any sign of a (G > 0)
int64_t ceil_div(int64_t a, int64_t G) { return a >= 0 ? (a + G - 1) / G : -((-a) / G); }

// The first / one-past-last of B rows whose target column r*G - col0 lies in [0, c) (i1 == i0: none); col0 may be
// negative (a row block of queries, infonce_gemm.h).
struct ChunkTargets {
  int64_t i0, i1;
};
ChunkTargets chunk_targets(int64_t B, int64_t c, int64_t col0, int64_t G) {
  const int64_t i0 = std::min(B, std::max<int64_t>(0, ceil_div(col0, G)));
  const int64_t i1 = std::min(B, ceil_div(col0 + c, G));
  return {i0, std::max(i0, i1)};
}

// The target entries (i, i*G - col0), i in [t.i0, t.i1), of a contiguous [B, c] chunk of scores that starts at doc
// col0, as a strided 1-d view: row i's target sits i*(c + G) - col0 elements into the chunk. t.i1 > t.i0.
Tensor target_view(const Tensor& scores, const ChunkTargets& t, int64_t col0, int64_t G) {
  const int64_t c = scores.size(1);
  return at::as_strided(scores, {t.i1 - t.i0}, {c + G}, scores.storage_offset() + t.i0 * (c + G) - col0);
}

// The rows of a [n, d] part of the docs that starts at doc n0 which are the targets of queries [t.i0, t.i1): doc
// i*G is row i*G - n0 of the part (a strided view; t.i1 > t.i0).
Tensor target_rows(const Tensor& part, const ChunkTargets& t, int64_t n0, int64_t G) {
  return part.slice(0, t.i0 * G - n0, (t.i1 - 1) * G - n0 + 1, G);
}

// (row losses, lse) from the rows' online (max, sum) of the scaled logits and their target logits; run_max and
// run_sum are consumed (lse is formed in run_max's storage). The row loss is (max - target) + log(sum), formed before
// max joins the lse: where the positive is the row's max the first term is exactly 0 and a small loss keeps its
// digits (lse - target would cancel two numbers ~1/t).
std::pair<Tensor, Tensor> finish_rows(Tensor& run_max, Tensor& run_sum, const Tensor& target) {
  const Tensor log_sum = run_sum.log_();
  Tensor row_loss = (run_max - target).add_(log_sum);
  return {row_loss, run_max.add_(log_sum)};
}

bool row_vector(const Tensor& x, const Tensor& scores) {
  return x.dim() == 1 && x.size(0) == scores.size(0) && x.is_contiguous() && x.scalar_type() == scores.scalar_type() &&
         x.device() == scores.device();
}

void aten_chunk_grad(Tensor& scores, const Tensor& lse, Tensor& neg_prob_sum, Tensor& probs, int64_t col0,
                     int64_t G, double inv_temperature) {
  infonce_check_chunk_grad(scores, lse, neg_prob_sum, probs);
  const int64_t B = scores.size(0), c = scores.size(1);
  scores.mul_(inv_temperature).sub_(lse.unsqueeze(1)).exp_();
  const ChunkTargets t = chunk_targets(B, c, col0, G);
  if (t.i1 > t.i0) target_view(scores, t, col0, G).fill_(0);
  neg_prob_sum.add_(scores.sum(1));
  if (probs.data_ptr() != scores.data_ptr()) {
    probs.copy_(scores);
  } else if (probs.scalar_type() != scores.scalar_type()) {  // written over the scores: through a copy
    probs.copy_(scores.to(probs.scalar_type()));
  }  // else probs is scores
}

void aten_chunk_lse(Tensor& scores, Tensor& run_max, Tensor& run_sum, Tensor& target, int64_t col0, int64_t G,
                    double inv_temperature) {
  infonce_check_chunk_lse(scores, run_max, run_sum, target);
  const int64_t B = scores.size(0), c = scores.size(1);
  Tensor x = scores * inv_temperature;  // scores stay as they are (the fused forward reads them again)
  const ChunkTargets t = chunk_targets(B, c, col0, G);
  if (t.i1 > t.i0) target.narrow(0, t.i0, t.i1 - t.i0).copy_(target_view(x, t, col0, G));
  const Tensor m = at::maximum(run_max, std::get<0>(x.max(1)));
  run_sum.mul_((run_max - m).exp_()).add_(x.sub_(m.unsqueeze(1)).exp_().sum(1));
  run_max.copy_(m);
}

}  // namespace

void infonce_check_chunk_lse(const Tensor& scores, const Tensor& run_max, const Tensor& run_sum,
                             const Tensor& target) {
  TORCH_INTERNAL_ASSERT(scores.dim() == 2 && scores.is_contiguous(), "infonce: chunk scores");
  TORCH_INTERNAL_ASSERT(row_vector(run_max, scores) && row_vector(run_sum, scores) && row_vector(target, scores),
                        "infonce: chunk row vectors");
}

void infonce_check_chunk_grad(const Tensor& scores, const Tensor& lse, const Tensor& neg_prob_sum,
                              const Tensor& probs) {
  TORCH_INTERNAL_ASSERT(scores.dim() == 2 && scores.is_contiguous(), "infonce: chunk scores");
  TORCH_INTERNAL_ASSERT(row_vector(lse, scores) && row_vector(neg_prob_sum, scores), "infonce: chunk row vectors");
  TORCH_INTERNAL_ASSERT(probs.dim() == 2 && probs.size(0) == scores.size(0) && probs.size(1) == scores.size(1) &&
                            probs.stride(1) == 1 && probs.device() == scores.device(),
                        "infonce: chunk probabilities");
  // sharing memory with the scores only as their in-place overlay (what the CUDA kernel's in-place loop assumes)
  if (probs.numel() > 0 && probs.storage().is_alias_of(scores.storage())) {
    TORCH_INTERNAL_ASSERT(probs.data_ptr() == scores.data_ptr() &&
                              probs.stride(0) * probs.element_size() == scores.size(1) * scores.element_size(),
                          "infonce: chunk probabilities overlap the scores other than row by row");
  }
}

const char* infonce_fwd_choice(bool gemm_default) {
  return kernel_choice("NVEMBED_INFONCE_FWD", kOp, "tiles", "gemm", true, gemm_default);
}

int64_t infonce_fwd_chunk(int64_t B, int64_t N, int64_t acc_bytes) {
  int64_t chunk = env_int("NVEMBED_INFONCE_CHUNK_COLS", 0);
  if (chunk == 0) chunk = std::max<int64_t>(kChunkBytes / (B * acc_bytes) / 256 * 256, 256);
  return std::min(chunk, N);
}

std::tuple<Tensor, Tensor> infonce_fwd_gemm(const Tensor& queries, const Tensor& docs, int64_t group_size,
                                            double temperature, InfoNCEChunkLseFn chunk_lse) {
  const AtenKernelGuard guard;  // below autograd, outside autocast
  const at::ScalarType acc = queries.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = queries.size(0), N = docs.size(0);
  const auto opts = queries.options().dtype(acc);
  Tensor run_max = at::full({B}, -std::numeric_limits<double>::infinity(), opts);
  Tensor run_sum = at::zeros({B}, opts);
  Tensor target = at::empty({B}, opts);  // every row's target column is in exactly one chunk (N >= B*G)
  const int64_t chunk = infonce_fwd_chunk(B, N, c10::elementSize(acc));
  for (int64_t col0 = 0; col0 < N; col0 += chunk) {
    const int64_t cn = std::min(chunk, N - col0);
    Tensor scores = mm_acc(queries, docs.narrow(0, col0, cn).t(), acc);
    (chunk_lse != nullptr ? chunk_lse : aten_chunk_lse)(scores, run_max, run_sum, target, col0, group_size,
                                                         1.0 / temperature);
  }
  auto [row_loss, lse] = finish_rows(run_max, run_sum, target);
  return {row_loss.mean(), lse};
}

const char* infonce_bwd_choice(bool gemm_default) {
  return kernel_choice("NVEMBED_INFONCE_BWD", kOp, "tiles", "gemm", true, gemm_default);
}

InfoNCEGemmWidths infonce_gemm_widths(int64_t B, int64_t N, int64_t elem_bytes) {
  const int64_t acc_bytes = elem_bytes == 8 ? 8 : 4;
  int64_t block = env_int("NVEMBED_INFONCE_BLOCK_COLS", 0);
  if (block == 0) {
    const int64_t budget = env_int("NVEMBED_INFONCE_BLOCK_MB", 256) << 20;
    block = std::max<int64_t>(budget / (B * elem_bytes) / 256 * 256, 4096);
  }
  block = std::min(block, N);
  int64_t chunk = env_int("NVEMBED_INFONCE_CHUNK_COLS", 0);
  // 256 MiB of scores, like the forward's chunks: at 64 MiB a batch of 65536 queries got 256-column chunks, whose
  // elementwise kernel gives each of its 65536 rows one float4 per 4 threads (2048 latency-bound launches at
  // N = 524288, by a static estimate as long as the chunk GEMMs); 1024 columns keep every thread busy
  if (chunk == 0) chunk = std::max<int64_t>(kChunkBytes / (B * acc_bytes) / 256 * 256, 256);
  return {block, std::min(chunk, block)};
}

std::tuple<Tensor, Tensor> infonce_bwd_gemm(const Tensor& grad_loss, const Tensor& queries, const Tensor& docs,
                                            const Tensor& lse, int64_t group_size, double temperature,
                                            InfoNCEChunkGradFn chunk_grad) {
  const AtenKernelGuard guard;  // below autograd, outside autocast
  const at::ScalarType io = queries.scalar_type();
  const at::ScalarType acc = io == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = queries.size(0), N = docs.size(0), d = queries.size(1), G = group_size;
  const auto opts = queries.options().dtype(acc);
  // g / (B t) as a 0-dim tensor on the device: the backward never waits for the host
  const Tensor coef = grad_loss.reshape({}).to(acc) * (1.0 / (static_cast<double>(B) * temperature));
  const Tensor lse_acc = lse.to(acc).contiguous();
  Tensor grad_q = at::zeros({B, d}, opts);    // sum over blocks of P_C D_C
  Tensor grad_tgt = at::empty({B, d}, opts);  // row i: P^T Q of doc i*G before its target term; every row written
  Tensor neg_prob_sum = at::zeros({B}, opts);
  Tensor grad_d = at::empty({N, d}, queries.options());
  const InfoNCEGemmWidths w = infonce_gemm_widths(B, N, queries.element_size());
  // the fp32 products of dQ and dD exist one row block (<= 64 MiB, >= 1024 rows: GEMMs stay large) at a time
  const int64_t rows = std::max<int64_t>(kPartBytes / (std::max<int64_t>(d, 1) * 4), 1024);  // d = 0: no columns
  Tensor probs_buf = at::empty({B, w.block}, queries.options());
  for (int64_t col0 = 0; col0 < N; col0 += w.block) {
    const int64_t cn = std::min(w.block, N - col0);
    const Tensor dc = docs.narrow(0, col0, cn);
    const Tensor probs = probs_buf.narrow(1, 0, cn);
    for (int64_t s0 = 0; s0 < cn; s0 += w.chunk) {
      const int64_t sn = std::min(w.chunk, cn - s0);
      Tensor scores = mm_acc(queries, dc.narrow(0, s0, sn).t(), acc);
      Tensor p = probs.narrow(1, s0, sn);
      (chunk_grad != nullptr ? chunk_grad : aten_chunk_grad)(scores, lse_acc, neg_prob_sum, p, col0 + s0, G,
                                                               1.0 / temperature);
    }
    for (int64_t r0 = 0; r0 < B; r0 += rows) {
      const int64_t rn = std::min(rows, B - r0);
      grad_q.narrow(0, r0, rn).add_(mm_acc(probs.narrow(0, r0, rn), dc, acc));
    }
    for (int64_t r0 = 0; r0 < cn; r0 += rows) {  // docs col0 + r0 ..
      const int64_t rn = std::min(rows, cn - r0), n0 = col0 + r0;
      Tensor gd = mm_acc(probs.narrow(1, r0, rn).t(), queries, acc);  // [rn, d]
      const ChunkTargets t = chunk_targets(B, rn, n0, G);
      if (t.i1 > t.i0) {
        grad_tgt.narrow(0, t.i0, t.i1 - t.i0).copy_(target_rows(gd, t, n0, G));
      }
      grad_d.narrow(0, n0, rn).copy_(gd.mul_(coef));
    }
  }
  probs_buf.reset();
  // target terms: (P_t - 1) = -neg_prob_sum, applied in fp32 before the one rounding to the output dtype (in place:
  // CUDA casts the input-dtype rows on the fly, no [B, d] fp32 copies)
  const Tensor ns = neg_prob_sum.unsqueeze(1);
  const ChunkTargets all{0, B};
  grad_q.addcmul_(target_rows(docs, all, 0, G), ns, -1).mul_(coef);
  grad_tgt.addcmul_(queries, ns, -1).mul_(coef);
  target_rows(grad_d, all, 0, G).copy_(grad_tgt);
  return {grad_q.to(io), grad_d};
}

const char* infonce_grad_choice(bool fused_default) {
  return kernel_choice("NVEMBED_INFONCE_GRAD", kOp, "backward", "fused", true, fused_default);
}

InfoNCEFusedPlan infonce_fused_plan(int64_t B, int64_t N, int64_t d, int64_t elem_bytes) {
  const int64_t acc_bytes = elem_bytes == 8 ? 8 : 4;
  const bool low_precision = elem_bytes < acc_bytes;
  const int64_t budget = env_int("NVEMBED_INFONCE_FUSED_MB", 1024) << 20;
  const int64_t row_bytes = std::max<int64_t>(N * acc_bytes, 1);  // one query's scores
  const int64_t acc_d_bytes = N * d * 4;
  const std::string mode = env_choice("NVEMBED_INFONCE_FUSED_ACC", kOp, {"fp32", "output"});
  int64_t rows = env_int("NVEMBED_INFONCE_ROW_BLOCK", 0);
  bool fp32 = false;
  if (rows == 0) {
    if (B * row_bytes <= budget && mode != "fp32") {  // one block: nothing to accumulate, whatever was asked
      rows = B;
    } else {
      const int64_t r32 = (budget - acc_d_bytes) / row_bytes / 256 * 256;  // rows beside the accumulator
      fp32 = low_precision && (mode == "fp32" || (mode == "auto" && r32 >= 4096));
      rows = fp32 ? std::max<int64_t>(r32, 4096) : std::max<int64_t>(budget / row_bytes / 256 * 256, 1024);
    }
  } else {
    fp32 = low_precision &&
           (mode == "fp32" || (mode == "auto" && acc_d_bytes + std::min(rows, B) * row_bytes <= budget));
  }
  rows = std::clamp<int64_t>(rows, 1, std::max<int64_t>(B, 1));
  if (rows >= B) return {rows, InfoNCEFusedAcc::kNone};
  return {rows, fp32 ? InfoNCEFusedAcc::kFp32 : InfoNCEFusedAcc::kOutput};
}

namespace {

// out = alpha a b + beta out in out's dtype, the product in the accumulation dtype and one rounding (beta = 0: out
// is not read). CUDA: cuBLAS (fp32 arithmetic for bf16 / fp16); CPU: the same numbers formed with an fp32 product.
void addmm_acc_(Tensor& out, const Tensor& a, const Tensor& b, double alpha, double beta, at::ScalarType acc) {
  if (out.is_cuda() || out.scalar_type() == acc) {
    out.addmm_(a, b, beta, alpha);
    return;
  }
  Tensor prod = at::mm(a.to(acc), b.to(acc)).mul_(alpha);
  if (beta != 0) prod.add_(out.to(acc), beta);
  out.copy_(prod);
}

// The target entries of a row block's probabilities: row r (query r0 + r) at column (r0 + r) G; probs [rn, N] with
// unit column stride, any row stride.
Tensor block_targets(const Tensor& probs, int64_t r0, int64_t G) {
  return at::as_strided(probs, {probs.size(0)}, {probs.stride(0) + G}, probs.storage_offset() + r0 * G);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> infonce_fwd_grad_gemm(const Tensor& queries, const Tensor& docs,
                                                         int64_t group_size, double temperature,
                                                         InfoNCEChunkLseFn chunk_lse, InfoNCEChunkGradFn chunk_grad) {
  const AtenKernelGuard guard;  // below autograd, outside autocast
  const at::ScalarType io = queries.scalar_type();
  const at::ScalarType acc = io == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = queries.size(0), N = docs.size(0), d = queries.size(1), G = group_size;
  const auto opts = queries.options().dtype(acc);
  const double inv_t = 1.0 / temperature, coef = 1.0 / (static_cast<double>(B) * temperature);
  TORCH_INTERNAL_ASSERT(B > 0, "infonce: an empty batch reached the fused gradients");  // the op rejects it
  const InfoNCEFusedPlan plan = infonce_fused_plan(B, N, d, queries.element_size());
  const int64_t R = plan.rows;
  // the fp32 products of dQ (and of dD into the kFp32 accumulator) exist one part (<= 64 MiB, >= 1024 rows: GEMMs
  // stay large) at a time
  const int64_t part = std::max<int64_t>(kPartBytes / (std::max<int64_t>(d, 1) * c10::elementSize(acc)), 1024);
  Tensor grad_q = at::empty({B, d}, queries.options());
  Tensor grad_d = at::empty({N, d}, queries.options());
  Tensor acc_d = plan.acc == InfoNCEFusedAcc::kFp32 ? at::zeros({N, d}, opts) : Tensor();  // sum of P_R'^T Q_R
  Tensor loss_sum = at::zeros({}, opts);
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t rn = std::min(R, B - r0), col0 = -r0 * G;  // row r of the block: target column (r0 + r) G
    const Tensor qr = queries.narrow(0, r0, rn);
    Tensor scores = mm_acc(qr, docs.t(), acc);  // [rn, N], contiguous
    Tensor run_max = at::full({rn}, -std::numeric_limits<double>::infinity(), opts);
    Tensor run_sum = at::zeros({rn}, opts);
    Tensor target = at::empty({rn}, opts);  // every row's target is among the N columns
    (chunk_lse != nullptr ? chunk_lse : aten_chunk_lse)(scores, run_max, run_sum, target, col0, G, inv_t);
    const auto [row_loss, lse] = finish_rows(run_max, run_sum, target);
    loss_sum.add_(row_loss.sum());
    // the probabilities in the input dtype, written over the scores (row r where the scores' row r starts)
    Tensor probs = io == acc ? scores : scores.view(io).narrow(1, 0, N);
    Tensor neg_prob_sum = at::zeros({rn}, opts);
    (chunk_grad != nullptr ? chunk_grad : aten_chunk_grad)(scores, lse, neg_prob_sum, probs, col0, G, inv_t);
    const Tensor ns = neg_prob_sum.unsqueeze(1);
    // dQ_R = (P_R D - neg_prob_sum D_target) / (B t); the target term (P_t - 1 = -neg_prob_sum) as in the backward
    const Tensor d_tgt = target_rows(docs, {r0, r0 + rn}, 0, G);
    for (int64_t k0 = 0; k0 < rn; k0 += part) {
      const int64_t kn = std::min(part, rn - k0);
      Tensor gq = mm_acc(probs.narrow(0, k0, kn), docs, acc);
      gq.addcmul_(d_tgt.narrow(0, k0, kn), ns.narrow(0, k0, kn), -1);
      grad_q.narrow(0, r0 + k0, kn).copy_(gq.mul_(coef));
    }
    // dD += P_R'^T Q_R with P_R' = P_R - onehot: the targets take P_t - 1 = -neg_prob_sum (in the input dtype, like
    // every other probability)
    block_targets(probs, r0, G).copy_(neg_prob_sum.neg());
    if (plan.acc == InfoNCEFusedAcc::kFp32) {
      for (int64_t n0 = 0; n0 < N; n0 += part) {
        const int64_t nn = std::min(part, N - n0);
        acc_d.narrow(0, n0, nn).add_(mm_acc(probs.narrow(1, n0, nn).t(), qr, acc));
      }
    } else {
      addmm_acc_(grad_d, probs.t(), qr, coef, r0 == 0 ? 0.0 : 1.0, acc);
    }
  }
  if (plan.acc == InfoNCEFusedAcc::kFp32) {
    for (int64_t n0 = 0; n0 < N; n0 += part) {  // in place, one part at a time: no second [N, d] fp32 tensor
      const int64_t nn = std::min(part, N - n0);
      grad_d.narrow(0, n0, nn).copy_(acc_d.narrow(0, n0, nn).mul_(coef));
    }
  }
  return {loss_sum.div_(static_cast<double>(B)), grad_q, grad_d};
}

}  // namespace nvembed
