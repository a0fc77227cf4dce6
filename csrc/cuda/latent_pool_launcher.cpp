// CUDA registration of nvembed::_latent_pool_{fwd,bwd}: the op's checks, then the device-generic implementation
// (latent_pool_aten.cpp: cuBLAS GEMMs in the input dtype, folded algebra, chunked recomputation in the backward) with
// its elementwise stages on the fused kernels of latent_pool.cu where NVEMBED_LATENT_POOL_KERNELS picks them
// (auto: the fused kernels, verified on an H100 on 2026-11-28: kLatentPoolFusedVerified).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <string_view>

#include "checks.h"
#include "cuda/latent_pool.cuh"
#include "latent_pool_aten.h"
#include "ops.h"

namespace nvembed {
namespace {

cuda::LatentPoolDType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::LatentPoolDType::kFloat32;
    case at::kBFloat16: return cuda::LatentPoolDType::kBFloat16;
    case at::kHalf: return cuda::LatentPoolDType::kFloat16;
    default: TORCH_INTERNAL_ASSERT(false, "nvembed::latent_pool: no fused kernel for ", t);
  }
}

cuda::GegluPoolParams geglu_params(Tensor& u, const Tensor& bias, const Tensor& w, const Tensor& units,
                                   Tensor& part_g) {
  TORCH_INTERNAL_ASSERT(w.scalar_type() == at::kFloat, "latent_pool: the fused kernels accumulate in fp32");
  const int64_t F = u.size(1) / 2;
  // grid (U, column blocks of 256 or 1024): y stays within CUDA's 65535 up to F ~ 16.7M (NV-Embed-v2: F = 16384)
  NVE_CHECK_VALUE((F + 255) / 256 <= 65535, "latent_pool", "ff_in_weight",
                  ": the fused GEGLU kernel takes a feed-forward width of at most 16776960, got ", F);
  cuda::GegluPoolParams p{};
  p.u = u.data_ptr();
  p.bias = bias.data_ptr<float>();
  p.w = w.data_ptr<float>();
  p.units = units.data_ptr<int32_t>();
  p.part_g = part_g.data_ptr<float>();
  p.dtype = kernel_dtype(u.scalar_type());
  p.U = units.size(0);
  p.F = u.size(1) / 2;
  p.vec4 = p.F % 4 == 0 && reinterpret_cast<uintptr_t>(p.u) % 16 == 0;
  return p;
}

void cuda_geglu_pool_fwd(Tensor& u, const Tensor& bias, const Tensor& w, const Tensor& units, Tensor& part_g) {
  latent_pool_check_geglu(u, bias, w, units, part_g, Tensor(), Tensor());
  const cuda::GegluPoolParams p = geglu_params(u, bias, w, units, part_g);
  cuda::geglu_pool_fwd_launch(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cuda_geglu_pool_bwd(Tensor& u, const Tensor& bias, const Tensor& w, const Tensor& units, const Tensor& dgbar,
                         Tensor& part_g, Tensor& part_b) {
  latent_pool_check_geglu(u, bias, w, units, part_g, dgbar, part_b);
  cuda::GegluPoolParams p = geglu_params(u, bias, w, units, part_g);
  p.dgbar = dgbar.data_ptr<float>();
  p.part_b = part_b.data_ptr<float>();
  cuda::geglu_pool_bwd_launch(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// LayerNorm rows: gather (res undefined: rows of x_flat picked by idx) or residual (src + res).
LatentPoolRows cuda_layer_norm(const Tensor& src, const Tensor& idx, const Tensor& res, const Tensor& w,
                               const Tensor& b, double eps) {
  const int64_t t = idx.defined() ? idx.size(0) : src.size(0), d = src.size(1);
  latent_pool_check_rows(src, idx, res, w, b);
  TORCH_INTERNAL_ASSERT(w.scalar_type() == at::kFloat, "latent_pool: the fused kernels accumulate in fp32");
  const auto f32 = src.options().dtype(at::kFloat);
  LatentPoolRows out{at::empty({t, d}, f32), at::empty({t, d}, src.options()), at::empty({t, 1}, f32),
                     at::empty({t, 1}, f32)};
  cuda::RowLayerNormParams p{};
  p.src = src.data_ptr();
  p.idx = idx.defined() ? idx.data_ptr<int64_t>() : nullptr;
  p.res = res.defined() ? res.data_ptr<float>() : nullptr;
  p.w = w.data_ptr<float>();
  p.b = b.data_ptr<float>();
  p.v_out = out.input.data_ptr<float>();
  p.normed = out.normed.data_ptr();
  p.mean = out.mean.data_ptr<float>();
  p.rstd = out.rstd.data_ptr<float>();
  p.dtype = kernel_dtype(src.scalar_type());
  p.rows = t;
  p.d = d;
  p.eps = static_cast<float>(eps);
  cuda::row_layer_norm_launch(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

LatentPoolRows cuda_gather_layer_norm(const Tensor& x_flat, const Tensor& idx, const Tensor& w, const Tensor& b,
                                      double eps) {
  return cuda_layer_norm(x_flat, idx, Tensor(), w, b, eps);
}

LatentPoolRows cuda_residual_layer_norm(const Tensor& attn, const Tensor& x, const Tensor& w, const Tensor& b,
                                        double eps) {
  return cuda_layer_norm(attn, Tensor(), x, w, b, eps);
}

std::pair<Tensor, Tensor> cuda_softmax(const Tensor& scores, double scale, bool want_acc) {
  latent_pool_check_softmax(scores);
  Tensor p_io = at::empty_like(scores);
  Tensor p = want_acc ? at::empty(scores.sizes(), scores.options().dtype(at::kFloat)) : Tensor();
  cuda::RowSoftmaxParams prm{};
  prm.scores = scores.data_ptr();
  prm.p_io = p_io.data_ptr();
  prm.p_acc = want_acc ? p.data_ptr<float>() : nullptr;
  prm.dtype = kernel_dtype(scores.scalar_type());
  prm.rows = scores.size(0);
  prm.n = scores.size(1);
  prm.scale = static_cast<float>(scale);
  cuda::row_softmax_launch(prm, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {std::move(p_io), std::move(p)};
}

constexpr LatentPoolKernels kFusedKernels{&cuda_geglu_pool_fwd, &cuda_geglu_pool_bwd, &cuda_gather_layer_norm,
                                          &cuda_residual_layer_norm, &cuda_softmax};

const LatentPoolKernels* chosen_kernels() {
  return std::string_view(latent_pool_kernel_choice()) == "fused" ? &kFusedKernels : nullptr;
}

}  // namespace

std::tuple<Tensor, Tensor> latent_pool_fwd_cuda(NVE_LATENT_POOL_PARAMS) {
  const NVE_LATENT_POOL_INPUTS;
  in.check(/*cuda=*/true);
  const c10::cuda::CUDAGuard guard(hidden_states.device());
  return in.aten_fwd(chosen_kernels(), nullptr);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> latent_pool_fwd_save_cuda(NVE_LATENT_POOL_PARAMS) {
  const NVE_LATENT_POOL_INPUTS;
  const LatentPoolShapes s = in.check(/*cuda=*/true);
  const c10::cuda::CUDAGuard guard(hidden_states.device());
  const std::vector<Tensor> saved = latent_pool_saved_empty(hidden_states, s);
  auto [out, pooled] = in.aten_fwd(chosen_kernels(), &saved);
  return {out, pooled, saved[0], saved[1], saved[2]};
}

std::vector<Tensor> latent_pool_bwd_cuda(const Tensor& grad_out, const Tensor& pooled, NVE_LATENT_POOL_PARAMS) {
  const NVE_LATENT_POOL_INPUTS;
  const LatentPoolShapes s = in.check(/*cuda=*/true);
  latent_pool_check_bwd_args(grad_out, pooled, hidden_states, s);
  const c10::cuda::CUDAGuard guard(hidden_states.device());
  return in.aten_bwd(grad_out, pooled, chosen_kernels(), nullptr);
}

std::vector<Tensor> latent_pool_bwd_saved_cuda(
    const Tensor& grad_out, const Tensor& pooled, const Tensor& geglu_mean, const Tensor& resid,
    const Tensor& ff_hidden, NVE_LATENT_POOL_PARAMS) {
  const NVE_LATENT_POOL_INPUTS;
  const LatentPoolShapes s = in.check(/*cuda=*/true);
  latent_pool_check_bwd_args(grad_out, pooled, hidden_states, s);
  const std::vector<Tensor> saved{geglu_mean, resid, ff_hidden};
  latent_pool_check_saved(saved, hidden_states, s);
  const c10::cuda::CUDAGuard guard(hidden_states.device());
  return in.aten_bwd(grad_out, pooled, chosen_kernels(), &saved);
}

}  // namespace nvembed
