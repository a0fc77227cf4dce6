// nvembed::latent_pool through ATen ops on any device (latent_pool_aten.cpp), and the argument checks shared with
// the CPU kernel's launcher (cpu/latent_pool.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace nvembed {
using at::Tensor;

// The parameters of every latent_pool entry point that takes the op's arguments (the schema's names and order, see
// torch_bindings.cpp): the composite, the CPU / CUDA launchers and the ATen implementation. NVE_LATENT_POOL_INPUTS
// (below) gathers them by these names.
#define NVE_LATENT_POOL_PARAMS                                                                                   \
  const Tensor& hidden_states, const std::optional<Tensor>& pool_mask, const Tensor& latents,                     \
      const Tensor& norm_weight, const Tensor& norm_bias, const Tensor& norm_context_weight,                      \
      const Tensor& norm_context_bias, const Tensor& to_q_weight, const Tensor& to_kv_weight,                     \
      const Tensor& to_out_weight, const Tensor& ff_norm_weight, const Tensor& ff_norm_bias,                      \
      const Tensor& ff_in_weight, const Tensor& ff_in_bias, const Tensor& ff_out_weight, const Tensor& ff_out_bias, \
      int64_t num_heads, bool normalize, double eps

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

// The fused GEGLU + masked-mean stage of a token chunk (contract: cuda/latent_pool.cuh). The chunk's tokens are
// split into units, runs of <= kLatentPoolUnitTokens consecutive tokens of one batch row, described by `units`
// (int32 [U, 3] on the tensors' device: first token in the chunk, token count, batch row). u is the feed-forward
// input z W_in^T [t, 2F] in the input dtype without bias; bias [2F], w [t] (pool weights), dgbar [B, F] and the
// outputs are in the accumulation dtype:
//   geglu_pool_fwd: part_g [U, F] = per unit sum_tok w_tok * a * gelu(gate); u is consumed (released or
//                   overwritten)
//   geglu_pool_bwd: the same part_g; u replaced by du = [dg gelu(gate) | dg a gelu'(gate)] in the input dtype
//                   (dg = w_tok dgbar[row]); part_b [U, 2F] = per unit sums of du before its rounding
// The token path's row stages (contracts: cuda/latent_pool.cuh), statistics in the accumulation dtype acc (that of
// w / x), normalized rows in the input dtype io (the next GEMM's operand):
//   gather_layer_norm:   x = x_flat[idx] -> {x (acc), LN(x) (io), mean, rstd ([t, 1] acc)}
//   residual_layer_norm: y1 = attn (io) + x (acc) -> {y1 (acc), LN(y1) (io), mean, rstd}
//   softmax:             rows of scores (io, [R, n] contiguous) -> {p (io), p (acc) if want_acc, else undefined},
//                        p = softmax(scale * scores) per row
// The ATen versions (kAtenKernels in latent_pool_aten.cpp) serve CPU tensors and CUDA unless fused.
constexpr int64_t kLatentPoolUnitTokens = 64;
struct LatentPoolRows {
  Tensor input, normed, mean, rstd;
};
struct LatentPoolKernels {
  void (*geglu_pool_fwd)(Tensor& u, const Tensor& bias, const Tensor& w, const Tensor& units, Tensor& part_g);
  void (*geglu_pool_bwd)(Tensor& u, const Tensor& bias, const Tensor& w, const Tensor& units, const Tensor& dgbar,
                         Tensor& part_g, Tensor& part_b);
  LatentPoolRows (*gather_layer_norm)(const Tensor& x_flat, const Tensor& idx, const Tensor& w, const Tensor& b,
                                      double eps);
  LatentPoolRows (*residual_layer_norm)(const Tensor& attn, const Tensor& x, const Tensor& w, const Tensor& b,
                                        double eps);
  std::pair<Tensor, Tensor> (*softmax)(const Tensor& scores, double scale, bool want_acc);
};

// The preconditions of LatentPoolKernels' stages as the fused CUDA kernels read them through raw pointers
// (contiguity, shapes, dtypes, one device); both implementations check them (TORCH_INTERNAL_ASSERT), so the CPU tests
// of the ATen version also prove that the callers satisfy what the CUDA launchers need. dgbar / part_b: undefined
// for the forward; idx / res: undefined where the stage has none.
void latent_pool_check_geglu(const Tensor& u, const Tensor& bias, const Tensor& w, const Tensor& units,
                             const Tensor& part_g, const Tensor& dgbar, const Tensor& part_b);
void latent_pool_check_rows(const Tensor& src, const Tensor& idx, const Tensor& res, const Tensor& w,
                            const Tensor& b);
void latent_pool_check_softmax(const Tensor& scores);

// The activations _latent_pool_fwd_save returns: geglu_mean [B, F] and resid [B*L, d] in the compute dtype (float32;
// float64 for float64 inputs), ff_hidden [B*L, 2F] in the dtype of the GEMM that makes it (the input dtype on CUDA,
// the compute dtype on CPU, also on the ATen path there). _saved_empty allocates them; _check_saved checks what
// _latent_pool_bwd_saved is handed (errors name the op and the argument).
std::vector<Tensor> latent_pool_saved_empty(const Tensor& hs, const LatentPoolShapes& s);
void latent_pool_check_saved(const std::vector<Tensor>& saved, const Tensor& hs, const LatentPoolShapes& s);
// Whether the CUDA path with saved activations (ATen implementation, latent_pool_aten.cpp) has run on a GPU
// (verified on an H100 on 2026-11-28). The op keeps nothing there unless NVEMBED_LATENT_POOL_SAVE_MB asks for it
// (kLatentPoolSaveByDefault): at NV-Embed-v2 size it made fwd + bwd 1.07-1.09x the ATen stages' recomputation at
// 1.75x its memory, and the fused stages' recomputation is faster still (bench/results/h100_2026-11-28).
constexpr bool kLatentPoolSavedVerified = true;
constexpr bool kLatentPoolSaveByDefault = false;

// Whether the fused CUDA kernels (cuda/latent_pool.cu) have run on a GPU (bench/gpu_check.sh: CUDA tests, memcheck,
// benchmark); auto picks them once verified, and NVEMBED_LATENT_POOL_KERNELS=aten forces ATen's elementwise ops.
// Verified on an H100 on 2026-11-28: fwd + bwd 1.47-1.52x the ATen stages at NV-Embed-v2 size; auto picks them.
constexpr bool kLatentPoolFusedVerified = true;
// NVEMBED_LATENT_POOL_KERNELS = auto | aten | fused: "fused" or "aten"; any other value raises an error naming the
// op and the variable.
const char* latent_pool_kernel_choice();

// Same contract as latent_pool_fwd_cpu / latent_pool_bwd_cpu (ops.h); arguments already checked. `kernels`: the
// fused stage's device kernels, null for ATen ops. `saved`: {geglu_mean, resid, ff_hidden} as
// latent_pool_saved_empty makes them, for the forward to fill and the backward to read (_latent_pool_fwd_save /
// _latent_pool_bwd_saved), or null.
std::tuple<Tensor, Tensor> latent_pool_fwd_aten(NVE_LATENT_POOL_PARAMS, const LatentPoolKernels* kernels = nullptr,
                                                const std::vector<Tensor>* saved = nullptr);
std::vector<Tensor> latent_pool_bwd_aten(const Tensor& grad_out, const Tensor& pooled, NVE_LATENT_POOL_PARAMS,
                                         const LatentPoolKernels* kernels = nullptr,
                                         const std::vector<Tensor>* saved = nullptr);

// The op's arguments, gathered once by each entry point of a launcher (NVE_LATENT_POOL_INPUTS, in a function
// whose parameters carry the schema's names); weights in schema order (latents ... ff_out_bias).
struct LatentPoolInputs {
  const Tensor& hs;
  const std::optional<Tensor>& mask;
  std::array<const Tensor*, 14> w;
  int64_t num_heads;
  bool normalize;
  double eps;

  LatentPoolShapes check(bool cuda) const;  // latent_pool_check_args
  std::tuple<Tensor, Tensor> aten_fwd(const LatentPoolKernels* kernels, const std::vector<Tensor>* saved) const;
  std::vector<Tensor> aten_bwd(const Tensor& grad_out, const Tensor& pooled, const LatentPoolKernels* kernels,
                               const std::vector<Tensor>* saved) const;
};

#define NVE_LATENT_POOL_INPUTS                                                                                     \
  LatentPoolInputs in {                                                                                            \
    hidden_states, pool_mask,                                                                                      \
        {&latents, &norm_weight, &norm_bias, &norm_context_weight, &norm_context_bias, &to_q_weight, &to_kv_weight, \
         &to_out_weight, &ff_norm_weight, &ff_norm_bias, &ff_in_weight, &ff_in_bias, &ff_out_weight, &ff_out_bias}, \
        num_heads, normalize, eps                                                                                  \
  }

}  // namespace nvembed
