// CPU launchers for nvembed::_flash_attn_{fwd,bwd} and their varlen twins: argument checks, dtype handling
// (bf16 runs in fp32, fp64 in fp64), then the torch-free kernels in flash_attn.h.
#include "cpu/flash_attn.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "checks.h"
#include "ops.h"

namespace nvembed {
namespace {

constexpr const char* kOp = "flash_attn";
constexpr const char* kVarlenOp = "flash_attn_varlen";

// Runs fn.template operator()<In, T>() for the input dtype: bf16 stays bf16 (bf16 BLAS tiles, fp32 softmax and
// accumulation); fp32 and fp64 compute in their own type.
template <typename Fn>
void dispatch_io(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn.template operator()<float, float>(); break;
    case at::kDouble: fn.template operator()<double, double>(); break;
    case at::kBFloat16: fn.template operator()<cpu::bf16_t, float>(); break;
    default: TORCH_CHECK(false, "nvembed::flash_attn: unsupported dtype ", t);
  }
}

template <typename In>
In* ptr(const at::Tensor& t) {
  return reinterpret_cast<In*>(t.data_ptr());
}

double resolve_scale(std::optional<double> scale, int64_t head_dim, const char* op) {
  if (!scale.has_value()) return 1.0 / std::sqrt(static_cast<double>(head_dim));
  NVE_CHECK_VALUE(std::isfinite(*scale), op, "scale must be finite, got ", *scale);
  return *scale;
}

// Shared checks of q/k/v; `rank` is 4 for dense [B, L, H, D], 3 for varlen [T, H, D].
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t rank, const char* op) {
  const char* layout = rank == 4 ? "[B, L, H, D]" : "[total, H, D]";
  check_rank(q, op, "q", rank, layout);
  check_rank(k, op, "k", rank, layout);
  check_rank(v, op, "v", rank, layout);
  check_dtype(q, op, "q", {at::kFloat, at::kBFloat16, at::kDouble});
  check_same_dtype(k, q, op, "k", "q");
  check_same_dtype(v, q, op, "v", "q");
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");
  NVE_CHECK_VALUE(q.device().is_cpu(), op, "q is on ", q.device(), "; this kernel runs on CPU");
  NVE_CHECK_VALUE(k.sizes() == v.sizes(), op, "k has shape ", k.sizes(), " but v has shape ", v.sizes());
  const int64_t D = q.size(rank - 1);
  NVE_CHECK_VALUE(D > 0, op, "q.size(", rank - 1, ") (head dim) must be > 0");
  NVE_CHECK_VALUE(k.size(rank - 1) == D, op, "k.size(", rank - 1, ")=", k.size(rank - 1), " (head dim) is not q.size(",
                  rank - 1, ")=", D);
  const int64_t hq = q.size(rank - 2), hkv = k.size(rank - 2);
  NVE_CHECK_VALUE(hkv > 0 && hq > 0, op, "q and k need at least one head, got q heads ", hq, ", k heads ", hkv);
  NVE_CHECK_VALUE(hq % hkv == 0, op, "q heads (", hq, ") must be a multiple of k/v heads (", hkv, ")");
}

void check_dense(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask) {
  check_qkv(q, k, v, 4, kOp);
  NVE_CHECK_VALUE(q.size(0) > 0, kOp, "q has an empty batch (q.size(0) == 0)");
  NVE_CHECK_VALUE(k.size(0) == q.size(0), kOp, "k.size(0)=", k.size(0), " (batch) is not q.size(0)=", q.size(0));
  if (mask.has_value()) {
    const auto& m = *mask;
    NVE_CHECK_TYPE(m.scalar_type() == at::kBool, kOp, "key_padding_mask must be bool (True = attend), got ",
                   m.scalar_type());
    check_same_device(m, q, kOp, "key_padding_mask", "q");
    NVE_CHECK_VALUE(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == k.size(1), kOp,
                    "key_padding_mask must have shape [B, Lk] = [", q.size(0), ", ", k.size(1), "], got ", m.sizes());
  }
}

// Validates cu_seqlens and returns them as a contiguous int32 CPU tensor.
at::Tensor check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, int64_t max_seqlen,
                            const char* max_name, const at::Tensor& q) {
  NVE_CHECK_TYPE(cu.scalar_type() == at::kInt, kVarlenOp, name, " must be int32, got ", cu.scalar_type());
  check_same_device(cu, q, kVarlenOp, name, "q");
  NVE_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 2, kVarlenOp, name, " must be 1-D [B+1] with B >= 1, got shape ",
                  cu.sizes());
  auto c = cu.contiguous();
  const int* p = c.data_ptr<int>();
  NVE_CHECK_VALUE(p[0] == 0, kVarlenOp, name, "[0] must be 0, got ", p[0]);
  int64_t longest = 0;
  for (int64_t i = 1; i < c.size(0); ++i) {
    NVE_CHECK_VALUE(p[i] >= p[i - 1], kVarlenOp, name, " must be non-decreasing, but ", name, "[", i, "]=", p[i],
                    " < ", name, "[", i - 1, "]=", p[i - 1]);
    longest = std::max<int64_t>(longest, p[i] - p[i - 1]);
  }
  NVE_CHECK_VALUE(p[c.size(0) - 1] == total, kVarlenOp, name, "[-1]=", p[c.size(0) - 1],
                  " must equal the packed length ", total);
  NVE_CHECK_VALUE(max_seqlen >= longest, kVarlenOp, max_name, "=", max_seqlen, " is smaller than the longest sequence (",
                  longest, ")");
  return c;
}

// q/k/v and both cu_seqlens of the varlen ops; returns the offsets as contiguous int32 CPU tensors.
std::pair<at::Tensor, at::Tensor> check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                               int64_t max_seqlen_q, int64_t max_seqlen_k) {
  check_qkv(q, k, v, 3, kVarlenOp);
  auto cu_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.size(0), max_seqlen_q, "max_seqlen_q", q);
  auto cu_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.size(0), max_seqlen_k, "max_seqlen_k", q);
  NVE_CHECK_VALUE(cu_q.size(0) == cu_k.size(0), kVarlenOp, "cu_seqlens_q has ", cu_q.size(0) - 1,
                  " sequences but cu_seqlens_k has ", cu_k.size(0) - 1);
  return {cu_q, cu_k};
}

template <typename In, typename T>
void fill_common(cpu::FlashAttnParams<In, T>& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q,
                 const at::Tensor& cu_k, int64_t batch, int64_t lq, int64_t lk, double scale) {
  p.q = ptr<In>(q);
  p.k = ptr<In>(k);
  p.v = ptr<In>(v);
  p.out = ptr<In>(out);
  p.lse = ptr<T>(lse);
  p.scale = static_cast<T>(scale);
  p.cu_q = cu_q.defined() ? cu_q.data_ptr<int>() : nullptr;
  p.cu_k = cu_k.defined() ? cu_k.data_ptr<int>() : nullptr;
  p.batch = batch;
  p.seqlen_q = lq;
  p.seqlen_k = lk;
  p.total_q = cu_q.defined() ? q.size(0) : batch * lq;
  p.heads_q = q.size(-2);
  p.heads_kv = k.size(-2);
  p.head_dim = q.size(-1);
  // NVEMBED_CPU_BRGEMM=0 keeps the bf16 forward on the cblas tiles (the tests run both paths)
  const char* brgemm = std::getenv("NVEMBED_CPU_BRGEMM");
  p.allow_brgemm = brgemm == nullptr || std::string(brgemm) != "0";
}

// Query-range splits for the backward, so that B * Hkv * splits tasks keep every thread busy.
int64_t bwd_splits(int64_t batch, int64_t heads_kv, int64_t max_lq) {
  const int64_t threads = at::get_num_threads();
  const int64_t q_blocks = std::max<int64_t>(1, (max_lq + cpu::kBwdBlockQ - 1) / cpu::kBwdBlockQ);
  const int64_t want = (2 * threads + batch * heads_kv - 1) / (batch * heads_kv);
  return std::max<int64_t>(1, std::min(want, q_blocks));
}

struct Outputs {
  at::Tensor out, lse;
};

// Runs the forward for dense (cu == undefined) or varlen inputs (contiguous, input dtype).
Outputs run_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t batch, int64_t lq, int64_t lk,
                double scale) {
  const bool varlen = cu_q.defined();
  const int64_t hq = q.size(-2);
  const int64_t total_q = varlen ? q.size(0) : batch * lq;
  at::Tensor out = at::empty_like(q);
  auto lse_opts = q.options().dtype(accum_dtype(q.scalar_type()));
  at::Tensor lse = varlen ? at::empty({hq, total_q}, lse_opts) : at::empty({batch, hq, lq}, lse_opts);
  dispatch_io(q.scalar_type(), [&]<typename In, typename T>() {
    cpu::FlashAttnParams<In, T> p{};
    fill_common(p, q, k, v, out, lse, cu_q, cu_k, batch, lq, lk, scale);
    cpu::flash_attn_fwd_kernel(p);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                       const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& out, const at::Tensor& lse,
                                                       const at::Tensor& cu_q,
                                                       const at::Tensor& cu_k, int64_t batch, int64_t lq, int64_t lk,
                                                       double scale) {
  const int64_t hkv = k.size(-2);
  const int64_t splits = bwd_splits(batch, hkv, lq);
  const auto acc = q.options().dtype(accum_dtype(q.scalar_type()));
  at::Tensor dq = at::zeros(q.sizes(), acc);
  auto kv_shape = k.sizes().vec();
  if (splits > 1) kv_shape.insert(kv_shape.begin(), splits);
  at::Tensor dk_acc = at::zeros(kv_shape, acc), dv_acc = at::zeros(kv_shape, acc);
  dispatch_io(q.scalar_type(), [&]<typename In, typename T>() {
    cpu::FlashAttnBwdParams<In, T> p{};
    fill_common<In, T>(p, q, k, v, out, lse, cu_q, cu_k, batch, lq, lk, scale);
    p.dout = ptr<In>(dout);
    p.dq = ptr<T>(dq);
    p.dk = ptr<T>(dk_acc);
    p.dv = ptr<T>(dv_acc);
    p.splits = splits;
    p.split_stride = splits > 1 ? k.numel() : 0;
    cpu::flash_attn_bwd_kernel(p);
  });
  at::Tensor dk = splits > 1 ? dk_acc.sum(0) : dk_acc;
  at::Tensor dv = splits > 1 ? dv_acc.sum(0) : dv_acc;
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

// Dense keys with a padding mask become packed varlen keys: k[mask] -> [Tk, Hkv, D] with per-sequence offsets
// cu_k, so the kernel never sees a padded key (no masking pass, no FLOPs on padding). q stays dense.
struct PackedKeys {
  at::Tensor k, v, cu_k;  // undefined cu_k: no mask (or nothing masked), k / v are the dense tensors
};

PackedKeys pack_keys(const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask) {
  if (!key_padding_mask.has_value() || key_padding_mask->all().item<bool>()) return {k, v, {}};
  const at::Tensor& mask = *key_padding_mask;
  at::Tensor cu_k = at::zeros({mask.size(0) + 1}, mask.options().dtype(at::kInt));
  cu_k.slice(0, 1).copy_(mask.sum(1).cumsum(0));
  return {k.index({mask}).contiguous(), v.index({mask}).contiguous(), cu_k};
}

void check_bwd_tensors(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                       at::IntArrayRef lse_shape, const char* op) {
  NVE_CHECK_VALUE(dout.sizes() == q.sizes(), op, "dout has shape ", dout.sizes(), " but q has shape ", q.sizes());
  NVE_CHECK_VALUE(out.sizes() == q.sizes(), op, "out has shape ", out.sizes(), " but q has shape ", q.sizes());
  check_same_device(dout, q, op, "dout", "q");
  check_same_device(out, q, op, "out", "q");
  check_same_device(lse, q, op, "lse", "q");
  NVE_CHECK_VALUE(lse.sizes() == lse_shape, op, "lse must have shape ", lse_shape, ", got ", lse.sizes());
}

}  // namespace

std::tuple<Tensor, Tensor> flash_attn_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const std::optional<Tensor>& key_padding_mask,
                                              std::optional<double> scale) {
  check_dense(q, k, v, key_padding_mask);
  const double sc = resolve_scale(scale, q.size(3), kOp);
  auto keys = pack_keys(k.contiguous(), v.contiguous(), key_padding_mask);
  auto r = run_fwd(q.contiguous(), keys.k, keys.v, {}, keys.cu_k, q.size(0), q.size(1), k.size(1), sc);
  return {r.out, r.lse};
}

std::tuple<Tensor, Tensor, Tensor> flash_attn_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Tensor& out, const Tensor& lse,
                                                      const std::optional<Tensor>& key_padding_mask,
                                                      std::optional<double> scale) {
  check_dense(q, k, v, key_padding_mask);
  check_bwd_tensors(dout, q, out, lse, {q.size(0), q.size(2), q.size(1)}, kOp);
  const double sc = resolve_scale(scale, q.size(3), kOp);
  auto keys = pack_keys(k.contiguous(), v.contiguous(), key_padding_mask);
  auto [dq, dk, dv] = run_bwd(dout.to(q.scalar_type()).contiguous(), q.contiguous(), keys.k, keys.v,
                              out.to(q.scalar_type()).contiguous(), lse.to(accum_dtype(q.scalar_type())).contiguous(),
                              {}, keys.cu_k, q.size(0), q.size(1), k.size(1), sc);
  if (!keys.cu_k.defined()) return {dq, dk, dv};
  // scatter the packed key gradients back; padded keys get exactly zero
  at::Tensor dk_dense = at::zeros(k.sizes(), dk.options()), dv_dense = at::zeros(v.sizes(), dv.options());
  dk_dense.index_put_({*key_padding_mask}, dk);
  dv_dense.index_put_({*key_padding_mask}, dv);
  return {dq, dk_dense, dv_dense};
}

std::tuple<Tensor, Tensor> flash_attn_varlen_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                     int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                     std::optional<double> scale) {
  auto [cu_q, cu_k] = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const double sc = resolve_scale(scale, q.size(2), kVarlenOp);
  auto r = run_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, cu_q.size(0) - 1, max_seqlen_q,
                   max_seqlen_k, sc);
  return {r.out, r.lse};
}

std::tuple<Tensor, Tensor, Tensor> flash_attn_varlen_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                             const Tensor& v, const Tensor& out, const Tensor& lse,
                                                             const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                             int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                             std::optional<double> scale) {
  auto [cu_q, cu_k] = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_bwd_tensors(dout, q, out, lse, {q.size(1), q.size(0)}, kVarlenOp);
  const double sc = resolve_scale(scale, q.size(2), kVarlenOp);
  return run_bwd(dout.to(q.scalar_type()).contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                 out.to(q.scalar_type()).contiguous(), lse.to(accum_dtype(q.scalar_type())).contiguous(), cu_q, cu_k,
                 cu_q.size(0) - 1, max_seqlen_q, max_seqlen_k, sc);
}

}  // namespace nvembed
