// CPU launchers for nvembed::_flash_attn_{fwd,bwd} and their varlen twins: argument checks, dtype handling
// (bf16 runs in fp32, fp64 in fp64), then the torch-free kernels in flash_attn.h.
#include "cpu/flash_attn.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "checks.h"
#include "flash_attn_common.h"
#include "ops.h"

namespace nvembed {
namespace {

using flash::check_bwd_tensors;
using flash::kOp;
using flash::kVarlenOp;
using flash::resolve_scale;

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
  // no query or no key: every gradient is 0 (and the kernel's B * Hkv tasks would each find nothing to do: a
  // zero-length batch of 2^34 rows took minutes)
  if (q.numel() == 0 || k.numel() == 0) return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v)};
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

}  // namespace

std::tuple<Tensor, Tensor> flash_attn_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const std::optional<Tensor>& key_padding_mask,
                                              std::optional<double> scale) {
  flash::check_dense(q, k, v, key_padding_mask, /*cuda=*/false);
  const double sc = resolve_scale(scale, q.size(3), kOp);
  auto keys = flash::pack_keys(k.contiguous(), v.contiguous(), key_padding_mask);
  auto r = run_fwd(q.contiguous(), keys.k, keys.v, {}, keys.cu_k, q.size(0), q.size(1), k.size(1), sc);
  return {r.out, r.lse};
}

std::tuple<Tensor, Tensor, Tensor> flash_attn_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Tensor& out, const Tensor& lse,
                                                      const std::optional<Tensor>& key_padding_mask,
                                                      std::optional<double> scale) {
  flash::check_dense(q, k, v, key_padding_mask, /*cuda=*/false);
  check_bwd_tensors(dout, q, out, lse, {q.size(0), q.size(2), q.size(1)}, kOp);
  const double sc = resolve_scale(scale, q.size(3), kOp);
  auto keys = flash::pack_keys(k.contiguous(), v.contiguous(), key_padding_mask);
  auto [dq, dk, dv] = run_bwd(dout.to(q.scalar_type()).contiguous(), q.contiguous(), keys.k, keys.v,
                              out.to(q.scalar_type()).contiguous(), lse.to(accum_dtype(q.scalar_type())).contiguous(),
                              {}, keys.cu_k, q.size(0), q.size(1), k.size(1), sc);
  auto [dk_dense, dv_dense] = flash::unpack_key_grads(dk, dv, keys, k, key_padding_mask);
  return {dq, dk_dense, dv_dense};
}

std::tuple<Tensor, Tensor> flash_attn_varlen_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                     int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                     std::optional<double> scale) {
  auto [cu_q, cu_k] =
      flash::check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, /*cuda=*/false);
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
  auto [cu_q, cu_k] =
      flash::check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, /*cuda=*/false);
  check_bwd_tensors(dout, q, out, lse, {q.size(1), q.size(0)}, kVarlenOp);
  const double sc = resolve_scale(scale, q.size(2), kVarlenOp);
  return run_bwd(dout.to(q.scalar_type()).contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                 out.to(q.scalar_type()).contiguous(), lse.to(accum_dtype(q.scalar_type())).contiguous(), cu_q, cu_k,
                 cu_q.size(0) - 1, max_seqlen_q, max_seqlen_k, sc);
}

}  // namespace nvembed
