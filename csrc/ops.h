// Declarations of every kernel entry point registered in torch_bindings.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "latent_pool_aten.h"  // NVE_LATENT_POOL_PARAMS

namespace nvembed {
using at::Tensor;

// ---- non-causal flash attention ------------------------------------------------------------------------------
// q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]; returns out [B, Lq, Hq, D] and lse [B, Hq, Lq] (fp32, +inf where every
// key of the row is masked).
std::tuple<Tensor, Tensor> flash_attn_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const std::optional<Tensor>& key_padding_mask,
                                              std::optional<double> scale);
std::tuple<Tensor, Tensor, Tensor> flash_attn_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Tensor& out, const Tensor& lse,
                                                      const std::optional<Tensor>& key_padding_mask,
                                                      std::optional<double> scale);
// packed q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens int32 [B+1]; lse [Hq, Tq].
std::tuple<Tensor, Tensor> flash_attn_varlen_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                     int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                     std::optional<double> scale);
std::tuple<Tensor, Tensor, Tensor> flash_attn_varlen_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                             const Tensor& v, const Tensor& out, const Tensor& lse,
                                                             const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                             int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                             std::optional<double> scale);
#ifdef NVEMBED_WITH_CUDA
// The same four on CUDA (bf16 / fp16, head dims 32 / 64 / 128, sm_80+): csrc/cuda/flash_launcher.cpp.
std::tuple<Tensor, Tensor> flash_attn_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const std::optional<Tensor>& key_padding_mask,
                                               std::optional<double> scale);
std::tuple<Tensor, Tensor, Tensor> flash_attn_bwd_cuda(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                       const Tensor& v, const Tensor& out, const Tensor& lse,
                                                       const std::optional<Tensor>& key_padding_mask,
                                                       std::optional<double> scale);
std::tuple<Tensor, Tensor> flash_attn_varlen_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                      const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                      int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                      std::optional<double> scale);
std::tuple<Tensor, Tensor, Tensor> flash_attn_varlen_bwd_cuda(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                              const Tensor& v, const Tensor& out, const Tensor& lse,
                                                              const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                              int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                              std::optional<double> scale);
#endif

// ---- InfoNCE over grouped docs, tiled (never materializes B x N) ---------------------------------------------
// returns (loss 0-dim fp32, lse [B] fp32 per query row); both float64 for float64 inputs (CPU, for gradcheck)
std::tuple<Tensor, Tensor> infonce_fwd_cpu(const Tensor& queries, const Tensor& docs, int64_t group_size,
                                           double temperature, bool in_batch_negatives);
std::tuple<Tensor, Tensor> infonce_bwd_cpu(const Tensor& grad_loss, const Tensor& queries, const Tensor& docs,
                                           const Tensor& lse, int64_t group_size, double temperature,
                                           bool in_batch_negatives);
// (loss, grad_queries, grad_docs) for an upstream gradient of 1 (infonce_gemm.h: gradients formed in the forward)
std::tuple<Tensor, Tensor, Tensor> infonce_fwd_grad_cpu(const Tensor& queries, const Tensor& docs,
                                                        int64_t group_size, double temperature,
                                                        bool in_batch_negatives);
#ifdef NVEMBED_WITH_CUDA
std::tuple<Tensor, Tensor> infonce_fwd_cuda(const Tensor& queries, const Tensor& docs, int64_t group_size,
                                            double temperature, bool in_batch_negatives);
std::tuple<Tensor, Tensor> infonce_bwd_cuda(const Tensor& grad_loss, const Tensor& queries, const Tensor& docs,
                                            const Tensor& lse, int64_t group_size, double temperature,
                                            bool in_batch_negatives);
std::tuple<Tensor, Tensor, Tensor> infonce_fwd_grad_cuda(const Tensor& queries, const Tensor& docs,
                                                         int64_t group_size, double temperature,
                                                         bool in_batch_negatives);
#endif

// ---- fused latent-attention pooling (NV-Embed) -----------------------------------------------------------------
// LATENT_POOL_DECLS_BEGIN
// hidden_states [B, L, d], pool_mask [B, L] (weights, None = all), latents [N, d], weights as in NV-Embed-v2.
// Returns (out [B, d] in hidden_states' dtype, pooled [B, d] pre-normalization mean in the compute dtype:
// float32, or float64 for float64 inputs).
std::tuple<Tensor, Tensor> latent_pool_fwd_cpu(NVE_LATENT_POOL_PARAMS);
// Returns the 15 gradients, in argument order without pool_mask (hidden_states, latents, norm_weight, ...).
std::vector<Tensor> latent_pool_bwd_cpu(const Tensor& grad_out, const Tensor& pooled, NVE_LATENT_POOL_PARAMS);
// The forward that also returns the activations the backward would otherwise recompute (geglu_mean [B, F], resid
// [B*L, d], ff_hidden [B*L, 2F]: latent_pool_saved_empty in latent_pool_aten.h; cpu::latent_pool::Saved), and the
// backward that reads them. latent_pool's composite takes this pair when gradients are needed and
// latent_pool_saves_activations says so.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> latent_pool_fwd_save_cpu(NVE_LATENT_POOL_PARAMS);
std::vector<Tensor> latent_pool_bwd_saved_cpu(
    const Tensor& grad_out, const Tensor& pooled, const Tensor& geglu_mean, const Tensor& resid,
    const Tensor& ff_hidden, NVE_LATENT_POOL_PARAMS);
// Whether to keep those activations: their size within NVEMBED_LATENT_POOL_SAVE_MB (MiB; 0 = always recompute).
// Default: 1024 for the CPU kernel; 0 for the ATen implementation (CUDA, and CPU tensors under
// NVEMBED_LATENT_POOL_ATEN=1): verified on a GPU, but slower there than the fused stages' recomputation
// (kLatentPoolSaveByDefault).
bool latent_pool_saves_activations(const Tensor& hidden_states, const Tensor& ff_in_weight);
#ifdef NVEMBED_WITH_CUDA
// The same two on CUDA (float32 / bfloat16 / float16): csrc/cuda/latent_pool_launcher.cpp.
std::tuple<Tensor, Tensor> latent_pool_fwd_cuda(NVE_LATENT_POOL_PARAMS);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> latent_pool_fwd_save_cuda(NVE_LATENT_POOL_PARAMS);
std::vector<Tensor> latent_pool_bwd_saved_cuda(
    const Tensor& grad_out, const Tensor& pooled, const Tensor& geglu_mean, const Tensor& resid,
    const Tensor& ff_hidden, NVE_LATENT_POOL_PARAMS);
std::vector<Tensor> latent_pool_bwd_cuda(const Tensor& grad_out, const Tensor& pooled, NVE_LATENT_POOL_PARAMS);
#endif
// LATENT_POOL_DECLS_END

}  // namespace nvembed
