// Every nvembed op schema, and which kernel serves which dispatch key.
// Public ops (flash_attn, flash_attn_varlen, infonce, latent_pool) are CompositeImplicitAutograd wrappers over
// internal ops that also return the softmax statistics the backward needs (_*_fwd); autograd, fake kernels and
// the pure-PyTorch references live in nvembed_ext/.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <algorithm>
#include <string_view>

#include "infonce_gemm.h"
#include "ops.h"

namespace nvembed {
namespace {

std::tuple<Tensor, Tensor> call_flash_attn_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const std::optional<Tensor>& mask, std::optional<double> scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nvembed::_flash_attn_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                         const std::optional<Tensor>&, std::optional<double>)>();
  return op.call(q, k, v, mask, scale);
}

Tensor flash_attn_composite(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                            std::optional<double> scale) {
  return std::get<0>(call_flash_attn_fwd(q, k, v, mask, scale));
}

Tensor flash_attn_varlen_composite(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                                   const Tensor& cu_k, int64_t max_q, int64_t max_k, std::optional<double> scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nvembed::_flash_attn_varlen_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, int64_t, int64_t, std::optional<double>)>();
  return std::get<0>(op.call(q, k, v, cu_q, cu_k, max_q, max_k, scale));
}

// Where the inputs need gradients and NVEMBED_INFONCE_GRAD picks fused (infonce_gemm.h), the forward forms them
// (_infonce_fwd_grad) and the backward scales them; otherwise _infonce_fwd, and _infonce_bwd in the backward.
Tensor infonce_composite(const Tensor& queries, const Tensor& docs, int64_t group_size, double temperature,
                         bool in_batch_negatives) {
  const bool wants_grad = at::GradMode::is_enabled() && (queries.requires_grad() || docs.requires_grad());
  if (wants_grad && in_batch_negatives &&
      std::string_view(infonce_grad_choice(kInfonceFusedGradVerified && queries.is_cuda() &&
                                           queries.scalar_type() != at::kFloat)) == "fused") {
    static auto fused = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("nvembed::_infonce_fwd_grad", "")
                            .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, double,
                                                                      bool)>();
    return std::get<0>(fused.call(queries, docs, group_size, temperature, in_batch_negatives));
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nvembed::_infonce_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, double, bool)>();
  return std::get<0>(op.call(queries, docs, group_size, temperature, in_batch_negatives));
}

// LATENT_POOL_COMPOSITE_FN_BEGIN
Tensor latent_pool_composite(NVE_LATENT_POOL_PARAMS) {
  // Where gradients are needed and latent_pool_saves_activations allows it, _latent_pool_fwd_save (the backward then
  // skips most of its recomputation); otherwise _latent_pool_fwd. Both return out first.
  const NVE_LATENT_POOL_INPUTS;
  const bool wants_grad =
      at::GradMode::is_enabled() &&
      (hidden_states.requires_grad() || std::any_of(in.w.begin(), in.w.end(), [](const Tensor* t) {
         return t->requires_grad();
       }));
  const auto out = [&](const auto& op) {
    return std::get<0>(op.call(hidden_states, pool_mask, latents, norm_weight, norm_bias, norm_context_weight,
                               norm_context_bias, to_q_weight, to_kv_weight, to_out_weight, ff_norm_weight,
                               ff_norm_bias, ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias, num_heads,
                               normalize, eps));
  };
  if (wants_grad && latent_pool_saves_activations(hidden_states, ff_in_weight)) {
    static auto save = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("nvembed::_latent_pool_fwd_save", "")
                           .typed<decltype(latent_pool_fwd_save_cpu)>();
    return out(save);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nvembed::_latent_pool_fwd", "")
                       .typed<decltype(latent_pool_fwd_cpu)>();
  return out(op);
}
// LATENT_POOL_COMPOSITE_FN_END

}  // namespace
}  // namespace nvembed

TORCH_LIBRARY(nvembed, m) {
  // Non-causal attention. q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], Hq % Hkv == 0 (GQA: query head h reads kv head
  // h / (Hq / Hkv)); key_padding_mask [B, Lk] bool, True = attend; scale defaults to 1/sqrt(D). A query row with
  // every key masked returns zeros (and zero gradients).
  m.def("flash_attn(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask=None, float? scale=None) -> Tensor");
  m.def("_flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask=None, float? scale=None)"
        " -> (Tensor out, Tensor lse)");
  m.def("_flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor? key_padding_mask=None, float? scale=None) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Packed variable-length sequences: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens int32 [B+1].
  m.def("flash_attn_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,"
        " int max_seqlen_q, int max_seqlen_k, float? scale=None) -> Tensor");
  m.def("_flash_attn_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,"
        " int max_seqlen_q, int max_seqlen_k, float? scale=None) -> (Tensor out, Tensor lse)");
  m.def("_flash_attn_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float? scale=None)"
        " -> (Tensor dq, Tensor dk, Tensor dv)");
  // InfoNCE, mean over queries: queries [B, d], docs [B*G + E, d] grouped per query (docs[i*G] positive, the rest of
  // the group hard negatives), then E >= 0 extra rows that are negatives for every query (e.g. other ranks' docs).
  // in_batch_negatives=True: softmax over all B*G + E docs, target i*G; False: over the query's own G docs, and
  // E must be 0.
  m.def("infonce(Tensor queries, Tensor docs, int group_size, float temperature, bool in_batch_negatives=True)"
        " -> Tensor");
  m.def("_infonce_fwd(Tensor queries, Tensor docs, int group_size, float temperature,"
        " bool in_batch_negatives=True) -> (Tensor loss, Tensor lse)");
  m.def("_infonce_bwd(Tensor grad_loss, Tensor queries, Tensor docs, Tensor lse, int group_size,"
        " float temperature, bool in_batch_negatives=True) -> (Tensor grad_queries, Tensor grad_docs)");
  // the loss and its gradients for an upstream gradient of 1 (the backward scales them): see infonce_gemm.h
  m.def("_infonce_fwd_grad(Tensor queries, Tensor docs, int group_size, float temperature,"
        " bool in_batch_negatives=True) -> (Tensor loss, Tensor grad_queries, Tensor grad_docs)");
  // LATENT_POOL_SCHEMAS_BEGIN
  // NV-Embed latent-attention pooling: hidden_states [B, L, d] attend to the latents [N, d] (PreNorm cross-attention,
  // residual, PreNorm GEGLU feed-forward, residual), masked mean over pool_mask [B, L] (None = all tokens; an
  // all-zero row gives 0), optional L2 normalization -> [B, d].
  m.def("latent_pool(Tensor hidden_states, Tensor? pool_mask, Tensor latents, Tensor norm_weight, Tensor norm_bias,"
        " Tensor norm_context_weight, Tensor norm_context_bias, Tensor to_q_weight, Tensor to_kv_weight,"
        " Tensor to_out_weight, Tensor ff_norm_weight, Tensor ff_norm_bias, Tensor ff_in_weight,"
        " Tensor ff_in_bias, Tensor ff_out_weight, Tensor ff_out_bias, int num_heads, bool normalize=True,"
        " float eps=1e-05) -> Tensor");
  m.def("_latent_pool_fwd(Tensor hidden_states, Tensor? pool_mask, Tensor latents, Tensor norm_weight, Tensor norm_bias,"
        " Tensor norm_context_weight, Tensor norm_context_bias, Tensor to_q_weight, Tensor to_kv_weight,"
        " Tensor to_out_weight, Tensor ff_norm_weight, Tensor ff_norm_bias, Tensor ff_in_weight,"
        " Tensor ff_in_bias, Tensor ff_out_weight, Tensor ff_out_bias, int num_heads, bool normalize=True,"
        " float eps=1e-05) -> (Tensor out, Tensor pooled)");
  m.def("_latent_pool_bwd(Tensor grad_out, Tensor pooled, Tensor hidden_states, Tensor? pool_mask, Tensor latents, Tensor norm_weight, Tensor norm_bias,"
        " Tensor norm_context_weight, Tensor norm_context_bias, Tensor to_q_weight, Tensor to_kv_weight,"
        " Tensor to_out_weight, Tensor ff_norm_weight, Tensor ff_norm_bias, Tensor ff_in_weight,"
        " Tensor ff_in_bias, Tensor ff_out_weight, Tensor ff_out_bias, int num_heads, bool normalize=True,"
        " float eps=1e-05) -> Tensor[]");
  // _latent_pool_fwd that also returns the activations its backward would recompute (geglu_mean [B, F] = the masked
  // mean of the GEGLU output, resid [B*L, d] = attention output + residual, ff_hidden [B*L, 2F] = LN_ff(resid)
  // ff_in_weight^T before the bias; rows = the active tokens in order, then zeros; dtypes: latent_pool_saved_empty in
  // latent_pool_aten.h), and the backward that reads them.
  m.def("_latent_pool_fwd_save(Tensor hidden_states, Tensor? pool_mask, Tensor latents, Tensor norm_weight,"
        " Tensor norm_bias, Tensor norm_context_weight, Tensor norm_context_bias, Tensor to_q_weight,"
        " Tensor to_kv_weight, Tensor to_out_weight, Tensor ff_norm_weight, Tensor ff_norm_bias,"
        " Tensor ff_in_weight, Tensor ff_in_bias, Tensor ff_out_weight, Tensor ff_out_bias, int num_heads,"
        " bool normalize=True, float eps=1e-05)"
        " -> (Tensor out, Tensor pooled, Tensor geglu_mean, Tensor resid, Tensor ff_hidden)");
  m.def("_latent_pool_bwd_saved(Tensor grad_out, Tensor pooled, Tensor geglu_mean, Tensor resid, Tensor ff_hidden,"
        " Tensor hidden_states, Tensor? pool_mask, Tensor latents, Tensor norm_weight, Tensor norm_bias,"
        " Tensor norm_context_weight, Tensor norm_context_bias, Tensor to_q_weight, Tensor to_kv_weight,"
        " Tensor to_out_weight, Tensor ff_norm_weight, Tensor ff_norm_bias, Tensor ff_in_weight,"
        " Tensor ff_in_bias, Tensor ff_out_weight, Tensor ff_out_bias, int num_heads, bool normalize=True,"
        " float eps=1e-05) -> Tensor[]");
  // LATENT_POOL_SCHEMAS_END
}

TORCH_LIBRARY_IMPL(nvembed, CompositeImplicitAutograd, m) {
  m.impl("flash_attn", &nvembed::flash_attn_composite);
  m.impl("flash_attn_varlen", &nvembed::flash_attn_varlen_composite);
  m.impl("infonce", &nvembed::infonce_composite);
  // LATENT_POOL_COMPOSITE_BEGIN
  m.impl("latent_pool", &nvembed::latent_pool_composite);
  // LATENT_POOL_COMPOSITE_END
}

TORCH_LIBRARY_IMPL(nvembed, CPU, m) {
  m.impl("_flash_attn_fwd", &nvembed::flash_attn_fwd_cpu);
  m.impl("_flash_attn_bwd", &nvembed::flash_attn_bwd_cpu);
  m.impl("_flash_attn_varlen_fwd", &nvembed::flash_attn_varlen_fwd_cpu);
  m.impl("_flash_attn_varlen_bwd", &nvembed::flash_attn_varlen_bwd_cpu);
  m.impl("_infonce_fwd", &nvembed::infonce_fwd_cpu);
  m.impl("_infonce_bwd", &nvembed::infonce_bwd_cpu);
  m.impl("_infonce_fwd_grad", &nvembed::infonce_fwd_grad_cpu);
  // LATENT_POOL_CPU_BEGIN
  m.impl("_latent_pool_fwd", &nvembed::latent_pool_fwd_cpu);
  m.impl("_latent_pool_bwd", &nvembed::latent_pool_bwd_cpu);
  m.impl("_latent_pool_fwd_save", &nvembed::latent_pool_fwd_save_cpu);
  m.impl("_latent_pool_bwd_saved", &nvembed::latent_pool_bwd_saved_cpu);
  // LATENT_POOL_CPU_END
}

#ifdef NVEMBED_WITH_CUDA
TORCH_LIBRARY_IMPL(nvembed, CUDA, m) {
  m.impl("_flash_attn_fwd", &nvembed::flash_attn_fwd_cuda);
  m.impl("_flash_attn_bwd", &nvembed::flash_attn_bwd_cuda);
  m.impl("_flash_attn_varlen_fwd", &nvembed::flash_attn_varlen_fwd_cuda);
  m.impl("_flash_attn_varlen_bwd", &nvembed::flash_attn_varlen_bwd_cuda);
  m.impl("_latent_pool_fwd", &nvembed::latent_pool_fwd_cuda);
  m.impl("_latent_pool_bwd", &nvembed::latent_pool_bwd_cuda);
  m.impl("_latent_pool_fwd_save", &nvembed::latent_pool_fwd_save_cuda);
  m.impl("_latent_pool_bwd_saved", &nvembed::latent_pool_bwd_saved_cuda);
  m.impl("_infonce_fwd", &nvembed::infonce_fwd_cuda);
  m.impl("_infonce_bwd", &nvembed::infonce_bwd_cuda);
  m.impl("_infonce_fwd_grad", &nvembed::infonce_fwd_grad_cuda);
}
#endif
