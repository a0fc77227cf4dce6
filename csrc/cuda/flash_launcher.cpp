// CUDA launcher of nvembed::_flash_attn_{fwd,bwd} and their varlen twins: the CPU launcher's checks
// (flash_attn_common.h, same messages) plus the CUDA kernels' own limits, key packing for a padding mask, device
// guard and stream; the kernels (flash_{fwd,bwd}_{bf16,fp16}.cu) see raw pointers only.
//
// The kernels move rows in 16-byte vectors (cp.async), so every input is made contiguous and 16-byte aligned (a
// contiguous view at an odd storage offset is copied). A key padding mask is turned into packed varlen keys exactly
// as on the CPU (flash::pack_keys): the kernels never see a padded key, and a sequence without keys gives output 0,
// lse +inf and zero gradients.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <string_view>

#include "checks.h"
#include "cuda/flash.cuh"
#include "flash_attn_common.h"
#include "kernel_choice.h"
#include "ops.h"

namespace nvembed {
namespace {

using flash::kOp;
using flash::kVarlenOp;

// The CUDA kernels' limits beyond the shared checks: head dim, compute capability, grid and index ranges.
void check_cuda_limits(const Tensor& q, const Tensor& k, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                       const char* op) {
  const int64_t D = q.size(-1);
  NVE_CHECK_VALUE(D == 32 || D == 64 || D == 128, op, "head dim ", D, " (q.size(", q.dim() - 1,
                  ")) is not supported by the CUDA kernels; supported head dims: 32, 64, 128");
  NVE_CHECK_VALUE(batch <= 65535, op, "batch ", batch, " exceeds the CUDA kernels' grid limit of 65535 sequences");
  NVE_CHECK_VALUE(q.size(-2) <= 65535, op, "q has ", q.size(-2), " heads; the CUDA kernels take at most 65535");
  constexpr int64_t kMaxRows = std::numeric_limits<int>::max();
  const int64_t q_rows = q.numel() / (q.size(-1) * q.size(-2)), k_rows = k.numel() / (k.size(-1) * k.size(-2));
  NVE_CHECK_VALUE(q_rows < kMaxRows && k_rows < kMaxRows && seqlen_q < kMaxRows && seqlen_k < kMaxRows, op,
                  "sequence lengths and token counts must be below 2^31 for the CUDA kernels");
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.device().index());
  NVE_CHECK(prop->major >= 8, op, "the CUDA kernels need compute capability 8.0 or newer (cp.async, bf16 mma.sync); ",
            q.device(), " (", prop->name, ") is ", prop->major, ".", prop->minor);
}

// Contiguous and 16-byte aligned.
Tensor aligned(const Tensor& t) {
  Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

cuda::FlashParams make_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                              const Tensor& cu_k, int64_t batch, int64_t seqlen_q, int64_t seqlen_k, double scale) {
  cuda::FlashParams p{};
  p.dtype = q.scalar_type() == at::kBFloat16 ? cuda::FlashDType::kBFloat16 : cuda::FlashDType::kFloat16;
  p.head_dim = static_cast<int>(q.size(-1));
  p.batch = static_cast<int>(batch);
  p.heads_q = static_cast<int>(q.size(-2));
  p.heads_kv = static_cast<int>(k.size(-2));
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.seqlen_k = static_cast<int>(seqlen_k);
  p.total_q = cu_q.defined() ? q.size(0) : batch * seqlen_q;
  p.total_k = cu_k.defined() ? k.size(0) : batch * seqlen_k;
  p.cu_q = cu_q.defined() ? cu_q.data_ptr<int>() : nullptr;
  p.cu_k = cu_k.defined() ? cu_k.data_ptr<int>() : nullptr;
  p.scale = static_cast<float>(scale);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  return p;
}

// Whether the Hopper kernels run the forward / backward on the current device (flash::flash_kernel_for).
bool use_sm90(const cuda::FlashParams& p, bool backward) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(dev);
  return std::string_view(flash::flash_kernel_for(backward, prop->major, prop->minor, p.head_dim,
                                                  kBuiltWithSm90a)) == "sm90";
}

void launch_fwd(const cuda::FlashParams& p) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (use_sm90(p, /*backward=*/false)) {
    if (p.dtype == cuda::FlashDType::kBFloat16) {
      cuda::flash_fwd_sm90_bf16(p, stream);
    } else {
      cuda::flash_fwd_sm90_fp16(p, stream);
    }
  } else if (p.dtype == cuda::FlashDType::kBFloat16) {
    cuda::flash_fwd_bf16(p, stream);
  } else {
    cuda::flash_fwd_fp16(p, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_bwd(const cuda::FlashParams& p) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (use_sm90(p, /*backward=*/true)) {
    if (p.dtype == cuda::FlashDType::kBFloat16) {
      cuda::flash_bwd_sm90_bf16(p, stream);
    } else {
      cuda::flash_bwd_sm90_fp16(p, stream);
    }
  } else if (p.dtype == cuda::FlashDType::kBFloat16) {
    cuda::flash_bwd_bf16(p, stream);
  } else {
    cuda::flash_bwd_fp16(p, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Forward on prepared (aligned, contiguous) inputs; cu_q / cu_k undefined for dense q / k.
std::tuple<Tensor, Tensor> run_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                                   const Tensor& cu_k, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                   double scale) {
  Tensor out = at::empty(q.sizes(), q.options());
  auto lse_opts = q.options().dtype(at::kFloat);
  Tensor lse = cu_q.defined() ? at::empty({q.size(1), q.size(0)}, lse_opts)
                              : at::empty({batch, q.size(2), seqlen_q}, lse_opts);
  auto p = make_params(q, k, v, cu_q, cu_k, batch, seqlen_q, seqlen_k, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  launch_fwd(p);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> run_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& out, const Tensor& lse, const Tensor& cu_q,
                                           const Tensor& cu_k, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                           double scale) {
  const Tensor d = aligned(dout.to(q.scalar_type()));
  const Tensor o = aligned(out.to(q.scalar_type()));
  const Tensor l = lse.to(at::kFloat).contiguous();
  Tensor dsum = at::empty(l.sizes(), l.options());
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options()), dv = at::empty(v.sizes(), v.options());
  auto p = make_params(q, k, v, cu_q, cu_k, batch, seqlen_q, seqlen_k, scale);
  p.dout = d.data_ptr();
  p.out_in = o.data_ptr();
  p.lse_in = l.data_ptr<float>();
  p.dsum = dsum.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  launch_bwd(p);
  return {dq, dk, dv};
}

}  // namespace

std::tuple<Tensor, Tensor> flash_attn_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const std::optional<Tensor>& key_padding_mask,
                                               std::optional<double> scale) {
  flash::check_dense(q, k, v, key_padding_mask, /*cuda=*/true);
  check_cuda_limits(q, k, q.size(0), q.size(1), k.size(1), kOp);
  const double sc = flash::resolve_scale(scale, q.size(3), kOp);
  const c10::cuda::CUDAGuard guard(q.device());
  auto keys = flash::pack_keys(aligned(k), aligned(v), key_padding_mask);
  return run_fwd(aligned(q), keys.k, keys.v, {}, keys.cu_k, q.size(0), q.size(1), k.size(1), sc);
}

std::tuple<Tensor, Tensor, Tensor> flash_attn_bwd_cuda(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                       const Tensor& v, const Tensor& out, const Tensor& lse,
                                                       const std::optional<Tensor>& key_padding_mask,
                                                       std::optional<double> scale) {
  flash::check_dense(q, k, v, key_padding_mask, /*cuda=*/true);
  flash::check_bwd_tensors(dout, q, out, lse, {q.size(0), q.size(2), q.size(1)}, kOp);
  check_cuda_limits(q, k, q.size(0), q.size(1), k.size(1), kOp);
  const double sc = flash::resolve_scale(scale, q.size(3), kOp);
  const c10::cuda::CUDAGuard guard(q.device());
  auto keys = flash::pack_keys(aligned(k), aligned(v), key_padding_mask);
  auto [dq, dk, dv] = run_bwd(dout, aligned(q), keys.k, keys.v, out, lse, {}, keys.cu_k, q.size(0), q.size(1),
                              k.size(1), sc);
  auto [dk_dense, dv_dense] = flash::unpack_key_grads(dk, dv, keys, k, key_padding_mask);
  return {dq, dk_dense, dv_dense};
}

std::tuple<Tensor, Tensor> flash_attn_varlen_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                      const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                      int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                      std::optional<double> scale) {
  flash::check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, /*cuda=*/true);
  check_cuda_limits(q, k, cu_seqlens_q.size(0) - 1, max_seqlen_q, max_seqlen_k, kVarlenOp);
  const double sc = flash::resolve_scale(scale, q.size(2), kVarlenOp);
  const c10::cuda::CUDAGuard guard(q.device());
  return run_fwd(aligned(q), aligned(k), aligned(v), cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                 cu_seqlens_q.size(0) - 1, max_seqlen_q, max_seqlen_k, sc);
}

std::tuple<Tensor, Tensor, Tensor> flash_attn_varlen_bwd_cuda(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                              const Tensor& v, const Tensor& out, const Tensor& lse,
                                                              const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                              int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                              std::optional<double> scale) {
  flash::check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, /*cuda=*/true);
  flash::check_bwd_tensors(dout, q, out, lse, {q.size(1), q.size(0)}, kVarlenOp);
  check_cuda_limits(q, k, cu_seqlens_q.size(0) - 1, max_seqlen_q, max_seqlen_k, kVarlenOp);
  const double sc = flash::resolve_scale(scale, q.size(2), kVarlenOp);
  const c10::cuda::CUDAGuard guard(q.device());
  return run_bwd(dout, aligned(q), aligned(k), aligned(v), out, lse, cu_seqlens_q.contiguous(),
                 cu_seqlens_k.contiguous(), cu_seqlens_q.size(0) - 1, max_seqlen_q, max_seqlen_k, sc);
}

}  // namespace nvembed
