// Argument checks and key packing shared by the CPU (cpu/flash_attn.cpp) and CUDA (cuda/flash_launcher.cpp)
// launchers of nvembed::flash_attn and nvembed::flash_attn_varlen: one set of messages for both devices.
#include "flash_attn_common.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "checks.h"
#include "kernel_choice.h"

namespace nvembed::flash {

const char* flash_kernel_for(bool backward, int major, int minor, int64_t head_dim, bool built_with_sm90a) {
  const bool applies = built_with_sm90a && major == 9 && minor == 0 && (head_dim == 64 || head_dim == 128);
  return hopper_kernel_choice("NVEMBED_FLASH_KERNEL", kOp, applies, backward ? kSm90BwdVerified : kSm90FwdVerified);
}

double resolve_scale(std::optional<double> scale, int64_t head_dim, const char* op) {
  if (!scale.has_value()) return 1.0 / std::sqrt(static_cast<double>(head_dim));
  // the kernels multiply in float32 (also for float64 inputs' tiles of exp): a scale beyond its range is inf there
  NVE_CHECK_VALUE(std::isfinite(*scale) && std::abs(*scale) <= std::numeric_limits<float>::max(), op,
                  "scale must be finite and within float32's range, got ", *scale);
  return *scale;
}

// Shared checks of q/k/v; `rank` is 4 for dense [B, L, H, D], 3 for varlen [T, H, D].
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t rank, const char* op,
               bool cuda) {
  const char* layout = rank == 4 ? "[B, L, H, D]" : "[total, H, D]";
  check_rank(q, op, "q", rank, layout);
  check_rank(k, op, "k", rank, layout);
  check_rank(v, op, "v", rank, layout);
  if (cuda) {
    check_dtype(q, op, "q", {at::kBFloat16, at::kHalf});
  } else {
    check_dtype(q, op, "q", {at::kFloat, at::kBFloat16, at::kDouble});
  }
  check_same_dtype(k, q, op, "k", "q");
  check_same_dtype(v, q, op, "v", "q");
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");
  if (cuda) {
    NVE_CHECK_VALUE(q.is_cuda(), op, "q is on ", q.device(), "; this kernel runs on CUDA");
  } else {
    NVE_CHECK_VALUE(q.device().is_cpu(), op, "q is on ", q.device(), "; this kernel runs on CPU");
  }
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
                 const std::optional<at::Tensor>& mask, bool cuda) {
  check_qkv(q, k, v, 4, kOp, cuda);
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

// Validates cu_seqlens (reading them on the host: a device-to-host copy for CUDA tensors) and returns them as a
// contiguous int32 CPU tensor.
at::Tensor check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, int64_t max_seqlen,
                            const char* max_name, const at::Tensor& q, int64_t* longest_out) {
  NVE_CHECK_TYPE(cu.scalar_type() == at::kInt, kVarlenOp, name, " must be int32, got ", cu.scalar_type());
  check_same_device(cu, q, kVarlenOp, name, "q");
  NVE_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 2, kVarlenOp, name, " must be 1-D [B+1] with B >= 1, got shape ",
                  cu.sizes());
  auto c = cu.to(at::kCPU).contiguous();
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
  if (longest_out != nullptr) *longest_out = longest;
  return c;
}

// q/k/v and both cu_seqlens of the varlen ops; returns the offsets as contiguous int32 CPU tensors.
std::pair<at::Tensor, at::Tensor> check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                               int64_t& max_seqlen_q, int64_t& max_seqlen_k, bool cuda) {
  check_qkv(q, k, v, 3, kVarlenOp, cuda);
  auto cu_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.size(0), max_seqlen_q, "max_seqlen_q", q,
                               &max_seqlen_q);
  auto cu_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.size(0), max_seqlen_k, "max_seqlen_k", q,
                               &max_seqlen_k);
  NVE_CHECK_VALUE(cu_q.size(0) == cu_k.size(0), kVarlenOp, "cu_seqlens_q has ", cu_q.size(0) - 1,
                  " sequences but cu_seqlens_k has ", cu_k.size(0) - 1);
  return {cu_q, cu_k};
}

PackedKeys pack_keys(const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask) {
  if (!key_padding_mask.has_value() || key_padding_mask->all().item<bool>()) return {k, v, {}};
  const at::Tensor& mask = *key_padding_mask;
  at::Tensor cu_k = at::zeros({mask.size(0) + 1}, mask.options().dtype(at::kInt));
  cu_k.slice(0, 1).copy_(mask.sum(1).cumsum(0));
  return {k.index({mask}).contiguous(), v.index({mask}).contiguous(), cu_k};
}

std::pair<at::Tensor, at::Tensor> unpack_key_grads(const at::Tensor& dk, const at::Tensor& dv, const PackedKeys& keys,
                                                   const at::Tensor& k,
                                                   const std::optional<at::Tensor>& key_padding_mask) {
  if (!keys.cu_k.defined()) return {dk, dv};
  at::Tensor dk_dense = at::zeros(k.sizes(), dk.options()), dv_dense = at::zeros(k.sizes(), dv.options());
  dk_dense.index_put_({*key_padding_mask}, dk);
  dv_dense.index_put_({*key_padding_mask}, dv);
  return {dk_dense, dv_dense};
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

}  // namespace nvembed::flash
