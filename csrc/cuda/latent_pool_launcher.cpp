// CUDA registration of nvembed::_latent_pool_{fwd,bwd}: the op's checks, then the device-generic ATen
// implementation (latent_pool_aten.cpp: cuBLAS GEMMs in the input dtype, folded algebra, chunked recomputation in
// the backward). Fused CUDA kernels for the layer do not exist yet.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "latent_pool_aten.h"
#include "ops.h"

namespace nvembed {

std::tuple<Tensor, Tensor> latent_pool_fwd_cuda(
    const Tensor& hidden_states, const std::optional<Tensor>& pool_mask, const Tensor& latents,
    const Tensor& norm_weight, const Tensor& norm_bias, const Tensor& norm_context_weight,
    const Tensor& norm_context_bias, const Tensor& to_q_weight, const Tensor& to_kv_weight,
    const Tensor& to_out_weight, const Tensor& ff_norm_weight, const Tensor& ff_norm_bias, const Tensor& ff_in_weight,
    const Tensor& ff_in_bias, const Tensor& ff_out_weight, const Tensor& ff_out_bias, int64_t num_heads,
    bool normalize, double eps) {
  latent_pool_check_args(hidden_states, pool_mask, latents, norm_weight, norm_bias, norm_context_weight,
                         norm_context_bias, to_q_weight, to_kv_weight, to_out_weight, ff_norm_weight, ff_norm_bias,
                         ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias, num_heads, eps, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(hidden_states.device());
  return latent_pool_fwd_aten(hidden_states, pool_mask, latents, norm_weight, norm_bias, norm_context_weight,
                              norm_context_bias, to_q_weight, to_kv_weight, to_out_weight, ff_norm_weight,
                              ff_norm_bias, ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias, num_heads, normalize,
                              eps);
}

std::vector<Tensor> latent_pool_bwd_cuda(
    const Tensor& grad_out, const Tensor& pooled, const Tensor& hidden_states, const std::optional<Tensor>& pool_mask,
    const Tensor& latents, const Tensor& norm_weight, const Tensor& norm_bias, const Tensor& norm_context_weight,
    const Tensor& norm_context_bias, const Tensor& to_q_weight, const Tensor& to_kv_weight,
    const Tensor& to_out_weight, const Tensor& ff_norm_weight, const Tensor& ff_norm_bias, const Tensor& ff_in_weight,
    const Tensor& ff_in_bias, const Tensor& ff_out_weight, const Tensor& ff_out_bias, int64_t num_heads,
    bool normalize, double eps) {
  const LatentPoolShapes s = latent_pool_check_args(
      hidden_states, pool_mask, latents, norm_weight, norm_bias, norm_context_weight, norm_context_bias, to_q_weight,
      to_kv_weight, to_out_weight, ff_norm_weight, ff_norm_bias, ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias,
      num_heads, eps, /*cuda=*/true);
  latent_pool_check_bwd_args(grad_out, pooled, hidden_states, s);
  const c10::cuda::CUDAGuard guard(hidden_states.device());
  return latent_pool_bwd_aten(grad_out, pooled, hidden_states, pool_mask, latents, norm_weight, norm_bias,
                              norm_context_weight, norm_context_bias, to_q_weight, to_kv_weight, to_out_weight,
                              ff_norm_weight, ff_norm_bias, ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias,
                              num_heads, normalize, eps);
}

}  // namespace nvembed
