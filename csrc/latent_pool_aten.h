// nvembed::latent_pool through ATen ops on any device (latent_pool_aten.cpp), and the argument checks shared with
// the CPU kernel's launcher (cpu/latent_pool.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace nvembed {
using at::Tensor;

struct LatentPoolShapes {
  int64_t B, L, d, N, H, dh, F;
};

// Every argument of the op (messages name the op and the argument). `cuda`: the dtypes of the CUDA path
// (float32 / bfloat16 / float16) instead of the CPU kernel's (float32 / bfloat16 / float64).
LatentPoolShapes latent_pool_check_args(const Tensor& hs, const std::optional<Tensor>& pool_mask,
                                        const Tensor& latents, const Tensor& norm_w, const Tensor& norm_b,
                                        const Tensor& ctx_w, const Tensor& ctx_b, const Tensor& wq, const Tensor& wkv,
                                        const Tensor& wo, const Tensor& ff_norm_w, const Tensor& ff_norm_b,
                                        const Tensor& ff_in_w, const Tensor& ff_in_b, const Tensor& ff_out_w,
                                        const Tensor& ff_out_b, int64_t num_heads, double eps, bool cuda);
// grad_out and pooled of the backward: [B, d], on hidden_states' device.
void latent_pool_check_bwd_args(const Tensor& grad_out, const Tensor& pooled, const Tensor& hs,
                                const LatentPoolShapes& s);
// The attention path: NVEMBED_LATENT_POOL_FOLD=0|1 forces plain / folded (tests cover both), anything else keeps
// the cost model's choice.
bool latent_pool_fold_override(bool cost_model_choice);

// Same contract as latent_pool_fwd_cpu / latent_pool_bwd_cpu (ops.h); arguments already checked.
std::tuple<Tensor, Tensor> latent_pool_fwd_aten(
    const Tensor& hidden_states, const std::optional<Tensor>& pool_mask, const Tensor& latents,
    const Tensor& norm_weight, const Tensor& norm_bias, const Tensor& norm_context_weight,
    const Tensor& norm_context_bias, const Tensor& to_q_weight, const Tensor& to_kv_weight,
    const Tensor& to_out_weight, const Tensor& ff_norm_weight, const Tensor& ff_norm_bias, const Tensor& ff_in_weight,
    const Tensor& ff_in_bias, const Tensor& ff_out_weight, const Tensor& ff_out_bias, int64_t num_heads,
    bool normalize, double eps);
std::vector<Tensor> latent_pool_bwd_aten(
    const Tensor& grad_out, const Tensor& pooled, const Tensor& hidden_states, const std::optional<Tensor>& pool_mask,
    const Tensor& latents, const Tensor& norm_weight, const Tensor& norm_bias, const Tensor& norm_context_weight,
    const Tensor& norm_context_bias, const Tensor& to_q_weight, const Tensor& to_kv_weight,
    const Tensor& to_out_weight, const Tensor& ff_norm_weight, const Tensor& ff_norm_bias, const Tensor& ff_in_weight,
    const Tensor& ff_in_bias, const Tensor& ff_out_weight, const Tensor& ff_out_bias, int64_t num_heads,
    bool normalize, double eps);

}  // namespace nvembed
