// Argument checks and key packing shared by the CPU and CUDA launchers of nvembed::flash_attn(_varlen). Every
// message starts with the op name and names the argument (checks.h).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <utility>

namespace nvembed::flash {

constexpr const char* kOp = "flash_attn";
constexpr const char* kVarlenOp = "flash_attn_varlen";

// The CUDA kernel set for a device of compute capability major.minor, forward or backward: "sm90" (TMA + wgmma,
// flash_sm90.cuh / flash_sm90_bwd.cuh: head dims 64 / 128, sm_90a builds on 9.0 devices) or "sm80" (flash_sm80.cuh:
// every sm80+ device and head dim), chosen by NVEMBED_FLASH_KERNEL = auto | sm80 | sm90 (kernel_choice.h). auto
// picks a Hopper kernel where it applies once it has been verified on a GPU by bench/gpu_check.sh (kSm90*Verified):
// both were, on an H200 on 2026-11-26 (CUDA tests against the fp64 reference, compute-sanitizer memcheck and
// racecheck clean; bench/results/h200_2026-11-26/).
constexpr bool kSm90FwdVerified = true;
constexpr bool kSm90BwdVerified = true;
const char* flash_kernel_for(bool backward, int major, int minor, int64_t head_dim, bool built_with_sm90a);

// The softmax scale: 1/sqrt(head_dim) by default, else any finite value.
double resolve_scale(std::optional<double> scale, int64_t head_dim, const char* op);

// q/k/v: rank (4 dense [B, L, H, D], 3 varlen [T, H, D]), dtype (CPU: fp32/bf16/fp64, CUDA: bf16/fp16), one
// device of the launcher's kind, k and v of one shape, equal head dims, Hq a multiple of Hkv.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t rank, const char* op,
               bool cuda);
// check_qkv for the dense op, plus the batch sizes and the key padding mask (bool [B, Lk]).
void check_dense(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask, bool cuda);
// *longest (if given) receives the longest sequence's length.
at::Tensor check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, int64_t max_seqlen,
                            const char* max_name, const at::Tensor& q, int64_t* longest = nullptr);
// q/k/v and both cu_seqlens of the varlen op; returns the offsets as contiguous int32 CPU tensors (validated on
// the host, also for CUDA inputs). max_seqlen_q / _k (each at least its longest sequence, else an error) are
// replaced by the longest sequence's length: the kernels size their work from them, and an oversized value
// (anything up to INT64_MAX passes the schema) would otherwise cost empty blocks or overflow their arithmetic.
std::pair<at::Tensor, at::Tensor> check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                               int64_t& max_seqlen_q, int64_t& max_seqlen_k, bool cuda);
void check_bwd_tensors(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                       at::IntArrayRef lse_shape, const char* op);

// Dense keys with a padding mask become packed varlen keys: k[mask] -> [Tk, Hkv, D] with per-sequence offsets
// cu_k (int32, on the mask's device), so the kernels never see a padded key (no masking pass, no FLOPs on
// padding). q stays dense.
struct PackedKeys {
  at::Tensor k, v, cu_k;  // undefined cu_k: no mask (or nothing masked), k / v are the dense tensors
};
PackedKeys pack_keys(const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask);
// The backward's packed key gradients scattered back to the dense [B, Lk, Hkv, D] layout of k; padded keys get
// exactly zero. Returns (dk, dv) unchanged when the keys were not packed.
std::pair<at::Tensor, at::Tensor> unpack_key_grads(const at::Tensor& dk, const at::Tensor& dv, const PackedKeys& keys,
                                                   const at::Tensor& k,
                                                   const std::optional<at::Tensor>& key_padding_mask);

}  // namespace nvembed::flash
