// CPU launcher of the fused latent-attention pooling (kernel templates in latent_pool.h): checks every argument at
// the op boundary, converts to the compute type (float for float32 / bfloat16, double for float64), runs, converts
// back. The pooled statistic (pre-normalization mean, [B, d]) stays in the compute type.
#include "cpu/latent_pool.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "checks.h"
#include "latent_pool_aten.h"
#include "ops.h"

namespace nvembed {

bool latent_pool_fold_override(bool cost_model_choice) {
  const char* env = std::getenv("NVEMBED_LATENT_POOL_FOLD");
  if (env && std::strcmp(env, "0") == 0) return false;
  if (env && std::strcmp(env, "1") == 0) return true;
  return cost_model_choice;
}

namespace {

constexpr const char* kOp = "latent_pool";

void check_vec(const Tensor& t, const char* name, int64_t n) {
  NVE_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, kOp, name, " must have shape [", n, "] (d), got ", t.sizes());
}

}  // namespace

LatentPoolShapes latent_pool_check_args(const Tensor& hs, const std::optional<Tensor>& pool_mask,
                                        const Tensor& latents, const Tensor& norm_w, const Tensor& norm_b,
                                        const Tensor& ctx_w, const Tensor& ctx_b, const Tensor& wq, const Tensor& wkv,
                                        const Tensor& wo, const Tensor& ff_norm_w, const Tensor& ff_norm_b,
                                        const Tensor& ff_in_w, const Tensor& ff_in_b, const Tensor& ff_out_w,
                                        const Tensor& ff_out_b, int64_t num_heads, double eps, bool cuda) {
  check_rank(hs, kOp, "hidden_states", 3, "[B, L, d]");
  if (cuda) {
    check_dtype(hs, kOp, "hidden_states", {at::kFloat, at::kBFloat16, at::kHalf});
  } else {
    check_dtype(hs, kOp, "hidden_states", cpu_dtypes());
  }
  const int64_t B = hs.size(0), L = hs.size(1), d = hs.size(2);
  NVE_CHECK_VALUE(B > 0, kOp, "hidden_states has an empty batch (B = 0), shape ", hs.sizes());
  NVE_CHECK_VALUE(d > 0, kOp, "hidden_states has hidden size 0, shape ", hs.sizes());
  NVE_CHECK_VALUE(num_heads >= 1, kOp, "num_heads must be >= 1, got ", num_heads);
  check_finite_positive(eps, kOp, "eps");
  // LayerNorm adds eps in float32 for float32 / bf16 / fp16 inputs: below its smallest normal number it is 0 there
  // (or flushed), and a constant token's variance + eps = 0 gives NaN
  NVE_CHECK_VALUE(hs.scalar_type() == at::kDouble || eps >= std::numeric_limits<float>::min(), kOp, "eps=", eps,
                  " is too small for ", hs.scalar_type(), " inputs: it must be at least float32's smallest normal "
                  "number (", std::numeric_limits<float>::min(), ")");
  const std::pair<const Tensor*, const char*> weights[] = {
      {&latents, "latents"},     {&norm_w, "norm_weight"},        {&norm_b, "norm_bias"},
      {&ctx_w, "norm_context_weight"}, {&ctx_b, "norm_context_bias"}, {&wq, "to_q_weight"},
      {&wkv, "to_kv_weight"},    {&wo, "to_out_weight"},          {&ff_norm_w, "ff_norm_weight"},
      {&ff_norm_b, "ff_norm_bias"}, {&ff_in_w, "ff_in_weight"},   {&ff_in_b, "ff_in_bias"},
      {&ff_out_w, "ff_out_weight"}, {&ff_out_b, "ff_out_bias"}};
  for (const auto& [t, name] : weights) {
    check_same_device(*t, hs, kOp, name, "hidden_states");
    check_same_dtype(*t, hs, kOp, name, "hidden_states");
  }
  check_rank(latents, kOp, "latents", 2, "[N, d]");
  NVE_CHECK_VALUE(latents.size(0) >= 1 && latents.size(1) == d, kOp, "latents must have shape [N >= 1, d = ", d,
                  "], got ", latents.sizes());
  check_vec(norm_w, "norm_weight", d);
  check_vec(norm_b, "norm_bias", d);
  check_vec(ctx_w, "norm_context_weight", d);
  check_vec(ctx_b, "norm_context_bias", d);
  check_vec(ff_norm_w, "ff_norm_weight", d);
  check_vec(ff_norm_b, "ff_norm_bias", d);
  check_rank(wq, kOp, "to_q_weight", 2, "[I, d]");
  const int64_t I = wq.size(0);
  NVE_CHECK_VALUE(I >= 1 && wq.size(1) == d, kOp, "to_q_weight must have shape [I >= 1, d = ", d, "], got ",
                  wq.sizes());
  NVE_CHECK_VALUE(I % num_heads == 0, kOp, "to_q_weight.size(0) (I = ", I, ") must be a multiple of num_heads (",
                  num_heads, ")");
  check_rank(wkv, kOp, "to_kv_weight", 2, "[2I, d]");
  NVE_CHECK_VALUE(wkv.size(0) == 2 * I && wkv.size(1) == d, kOp, "to_kv_weight must have shape [2I = ", 2 * I,
                  ", d = ", d, "], got ", wkv.sizes());
  check_rank(wo, kOp, "to_out_weight", 2, "[d, I]");
  NVE_CHECK_VALUE(wo.size(0) == d && wo.size(1) == I, kOp, "to_out_weight must have shape [d = ", d, ", I = ", I,
                  "], got ", wo.sizes());
  check_rank(ff_in_w, kOp, "ff_in_weight", 2, "[2F, d]");
  const int64_t F2 = ff_in_w.size(0);
  NVE_CHECK_VALUE(F2 >= 2 && F2 % 2 == 0 && ff_in_w.size(1) == d, kOp, "ff_in_weight must have shape [2F, d = ", d,
                  "] with F >= 1, got ", ff_in_w.sizes());
  NVE_CHECK_VALUE(ff_in_b.dim() == 1 && ff_in_b.size(0) == F2, kOp, "ff_in_bias must have shape [", F2, "], got ",
                  ff_in_b.sizes());
  check_rank(ff_out_w, kOp, "ff_out_weight", 2, "[d, F]");
  NVE_CHECK_VALUE(ff_out_w.size(0) == d && ff_out_w.size(1) == F2 / 2, kOp, "ff_out_weight must have shape [d = ",
                  d, ", F = ", F2 / 2, "], got ", ff_out_w.sizes());
  check_vec(ff_out_b, "ff_out_bias", d);
  if (pool_mask.has_value()) {
    const Tensor& m = *pool_mask;
    check_same_device(m, hs, kOp, "pool_mask", "hidden_states");
    NVE_CHECK_TYPE(!m.is_complex(), kOp, "pool_mask has dtype ", m.scalar_type(), "; expected bool, integer or float");
    NVE_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == L, kOp, "pool_mask must have shape [B = ", B,
                    ", L = ", L, "], got ", m.sizes());
  }
  return {B, L, d, latents.size(0), num_heads, I / num_heads, F2 / 2};
}

void latent_pool_check_bwd_args(const Tensor& grad_out, const Tensor& pooled, const Tensor& hs,
                                const LatentPoolShapes& s) {
  check_same_device(grad_out, hs, kOp, "grad_out", "hidden_states");
  check_same_device(pooled, hs, kOp, "pooled", "hidden_states");
  NVE_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == s.B && grad_out.size(1) == s.d, kOp,
                  "grad_out must have shape [B, d] = [", s.B, ", ", s.d, "], got ", grad_out.sizes());
  NVE_CHECK_VALUE(pooled.dim() == 2 && pooled.size(0) == s.B && pooled.size(1) == s.d, kOp,
                  "pooled must have shape [B, d] = [", s.B, ", ", s.d, "], got ", pooled.sizes());
}

LatentPoolShapes LatentPoolInputs::check(bool cuda) const {
  return latent_pool_check_args(hs, mask, *w[0], *w[1], *w[2], *w[3], *w[4], *w[5], *w[6], *w[7], *w[8], *w[9],
                                *w[10], *w[11], *w[12], *w[13], num_heads, eps, cuda);
}

std::tuple<Tensor, Tensor> LatentPoolInputs::aten_fwd(const LatentPoolKernels* kernels,
                                                      const std::vector<Tensor>* saved) const {
  return latent_pool_fwd_aten(hs, mask, *w[0], *w[1], *w[2], *w[3], *w[4], *w[5], *w[6], *w[7], *w[8], *w[9], *w[10],
                              *w[11], *w[12], *w[13], num_heads, normalize, eps, kernels, saved);
}

std::vector<Tensor> LatentPoolInputs::aten_bwd(const Tensor& grad_out, const Tensor& pooled,
                                               const LatentPoolKernels* kernels,
                                               const std::vector<Tensor>* saved) const {
  return latent_pool_bwd_aten(grad_out, pooled, hs, mask, *w[0], *w[1], *w[2], *w[3], *w[4], *w[5], *w[6], *w[7],
                              *w[8], *w[9], *w[10], *w[11], *w[12], *w[13], num_heads, normalize, eps, kernels, saved);
}

namespace {

// Tensors converted to the compute type S, kept alive while the kernel reads them.
struct Converted {
  std::vector<Tensor> keep;
  template <typename S>
  const S* ptr(const Tensor& t, at::ScalarType st) {
    keep.push_back(t.to(st).contiguous());
    return keep.back().data_ptr<S>();
  }
};

// NVEMBED_LATENT_POOL_ATEN=1: run the device-generic ATen implementation (the CUDA path) on CPU tensors, so its
// tests run without a GPU.
bool use_aten_path() {
  const char* env = std::getenv("NVEMBED_LATENT_POOL_ATEN");
  const bool aten = env != nullptr && std::strcmp(env, "1") == 0;
  // NVEMBED_LATENT_POOL_KERNELS is checked as on CUDA; either value runs ATen ops on CPU tensors (no fused kernels)
  if (aten) latent_pool_kernel_choice();
  return aten;
}

template <typename S>
cpu::latent_pool::Params<S> make_params(Converted& cv, const LatentPoolShapes& s, at::ScalarType st,
                                        const LatentPoolInputs& in) {
  cpu::latent_pool::Params<S> p;
  p.B = s.B, p.L = s.L, p.d = s.d, p.N = s.N, p.H = s.H, p.dh = s.dh, p.F = s.F;
  p.eps = S(in.eps);
  p.normalize = in.normalize;
  p.x = cv.template ptr<S>(in.hs, st);
  p.mask = in.mask.has_value() ? cv.template ptr<S>(*in.mask, st) : nullptr;
  const S** dst[] = {&p.latents, &p.norm_w,    &p.norm_b,    &p.ctx_w,   &p.ctx_b,   &p.wq,       &p.wkv,
                     &p.wo,      &p.ff_norm_w, &p.ff_norm_b, &p.ff_in_w, &p.ff_in_b, &p.ff_out_w, &p.ff_out_b};
  for (size_t i = 0; i < in.w.size(); ++i) *dst[i] = cv.template ptr<S>(*in.w[i], st);
  int64_t T = s.B * s.L;
  if (in.mask.has_value()) T = in.mask->ne(0).sum().item<int64_t>();
  p.fold =
      latent_pool_fold_override(cpu::latent_pool::fold_is_cheaper(std::max<int64_t>(T, 1), s.d, s.N, s.H, s.dh));
  return p;
}

// The CPU kernel's forward; `saved` = {geglu_mean, resid, ff_hidden} to fill (latent_pool_fwd_save_cpu) or empty.
std::tuple<Tensor, Tensor> run_forward(const LatentPoolShapes& s, const LatentPoolInputs& in,
                                       const std::vector<Tensor>& saved) {
  const at::ScalarType st = accum_dtype(in.hs.scalar_type());
  auto opts = in.hs.options().dtype(st);
  Tensor out = at::empty({s.B, s.d}, opts);
  Tensor pooled = at::empty({s.B, s.d}, opts);
  Converted cv;
  AT_DISPATCH_FLOATING_TYPES(st, "nvembed::latent_pool", [&] {
    auto p = make_params<scalar_t>(cv, s, st, in);
    if (saved.empty()) {
      cpu::latent_pool::forward<scalar_t>(p, out.data_ptr<scalar_t>(), pooled.data_ptr<scalar_t>());
    } else {
      const cpu::latent_pool::Saved<scalar_t> sv{saved[0].data_ptr<scalar_t>(), saved[1].data_ptr<scalar_t>(),
                                                 saved[2].data_ptr<scalar_t>()};
      cpu::latent_pool::forward<scalar_t>(p, out.data_ptr<scalar_t>(), pooled.data_ptr<scalar_t>(), &sv);
    }
  });
  return {out.to(in.hs.scalar_type()), pooled};
}

// The CPU kernel's backward; `saved` as in run_forward (then the activations it holds are not recomputed).
std::vector<Tensor> run_backward(const LatentPoolShapes& s, const LatentPoolInputs& in, const Tensor& grad_out,
                                 const Tensor& pooled, const std::vector<Tensor>& saved) {
  const at::ScalarType st = accum_dtype(in.hs.scalar_type());
  auto opts = in.hs.options().dtype(st);
  std::vector<Tensor> grads{at::empty(in.hs.sizes(), opts)};
  for (const Tensor* t : in.w) grads.push_back(at::empty(t->sizes(), opts));
  Converted cv;
  AT_DISPATCH_FLOATING_TYPES(st, "nvembed::latent_pool_backward", [&] {
    auto p = make_params<scalar_t>(cv, s, st, in);
    const scalar_t* go = cv.template ptr<scalar_t>(grad_out, st);
    const scalar_t* pl = cv.template ptr<scalar_t>(pooled, st);
    auto g = [&](int i) { return grads[i].data_ptr<scalar_t>(); };
    cpu::latent_pool::Grads<scalar_t> gr{g(0), g(1), g(2),  g(3),  g(4),  g(5),  g(6), g(7),
                                         g(8), g(9), g(10), g(11), g(12), g(13), g(14)};
    if (saved.empty()) {
      cpu::latent_pool::backward<scalar_t>(p, go, pl, gr);
    } else {
      // the backward only reads them (the kernel's work rows are not const)
      auto rd = [&](int i) { return const_cast<scalar_t*>(cv.template ptr<scalar_t>(saved[i], st)); };
      const cpu::latent_pool::Saved<scalar_t> sv{rd(0), rd(1), rd(2)};
      cpu::latent_pool::backward<scalar_t>(p, go, pl, gr, &sv);
    }
  });
  for (auto& t : grads) t = t.to(in.hs.scalar_type());
  return grads;
}

// geglu_mean, resid, ff_hidden: their shapes and dtypes (see latent_pool_saved_empty in latent_pool_aten.h).
constexpr const char* kSavedNames[] = {"geglu_mean", "resid", "ff_hidden"};
std::vector<std::vector<int64_t>> saved_shapes(int64_t B, int64_t L, int64_t d, int64_t F) {
  return {{B, F}, {B * L, d}, {B * L, 2 * F}};
}
std::vector<at::ScalarType> saved_dtypes(const Tensor& hs) {
  const at::ScalarType acc = accum_dtype(hs.scalar_type());
  return {acc, acc, hs.is_cuda() ? hs.scalar_type() : acc};
}

}  // namespace

std::vector<Tensor> latent_pool_saved_empty(const Tensor& hs, const LatentPoolShapes& s) {
  std::vector<Tensor> saved;
  const auto shapes = saved_shapes(s.B, s.L, s.d, s.F);
  const auto dtypes = saved_dtypes(hs);
  for (size_t i = 0; i < shapes.size(); ++i) saved.push_back(at::empty(shapes[i], hs.options().dtype(dtypes[i])));
  return saved;
}

void latent_pool_check_saved(const std::vector<Tensor>& saved, const Tensor& hs, const LatentPoolShapes& s) {
  const auto shapes = saved_shapes(s.B, s.L, s.d, s.F);
  const auto dtypes = saved_dtypes(hs);
  for (size_t i = 0; i < saved.size(); ++i) {
    check_same_device(saved[i], hs, kOp, kSavedNames[i], "hidden_states");
    NVE_CHECK_TYPE(saved[i].scalar_type() == dtypes[i], kOp, kSavedNames[i], " has dtype ", saved[i].scalar_type(),
                   "; expected ", dtypes[i], " (what _latent_pool_fwd_save returns)");
    NVE_CHECK_VALUE(saved[i].sizes() == at::IntArrayRef(shapes[i]), kOp, kSavedNames[i], " must have shape ",
                    at::IntArrayRef(shapes[i]), ", got ", saved[i].sizes());
  }
}

bool latent_pool_saves_activations(const Tensor& hidden_states, const Tensor& ff_in_weight) {
  const bool cuda = hidden_states.is_cuda();
  if (!(cuda || hidden_states.device().is_cpu()) || hidden_states.dim() != 3 || ff_in_weight.dim() != 2) {
    return false;
  }
  // the CPU kernel: 1 GiB; the ATen implementation (CUDA, and on CPU tensors its tests): nothing unless asked
  // (kLatentPoolSaveByDefault: measured slower than the fused stages' recomputation on an H100)
  const bool aten = cuda || use_aten_path();
  int64_t budget_mb = aten ? (kLatentPoolSaveByDefault ? 4096 : 0) : 1024;
  if (const char* env = std::getenv("NVEMBED_LATENT_POOL_SAVE_MB"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    NVE_CHECK_VALUE(*end == '\0' && v >= 0, kOp,
                    "NVEMBED_LATENT_POOL_SAVE_MB must be a non-negative integer (MiB), got '", env, "'");
    budget_mb = v;
  }
  if (budget_mb == 0) return false;
  const int64_t B = hidden_states.size(0), L = hidden_states.size(1), d = hidden_states.size(2);
  const int64_t F = ff_in_weight.size(0) / 2;
  const auto shapes = saved_shapes(B, L, d, F);
  const auto dtypes = saved_dtypes(hidden_states);
  double bytes = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    bytes += double(shapes[i][0]) * double(shapes[i][1]) * double(c10::elementSize(dtypes[i]));
  }
  return bytes <= double(budget_mb) * 1024.0 * 1024.0;
}

std::tuple<Tensor, Tensor> latent_pool_fwd_cpu(NVE_LATENT_POOL_PARAMS) {
  const NVE_LATENT_POOL_INPUTS;
  const LatentPoolShapes s = in.check(/*cuda=*/false);
  return use_aten_path() ? in.aten_fwd(nullptr, nullptr) : run_forward(s, in, {});
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> latent_pool_fwd_save_cpu(NVE_LATENT_POOL_PARAMS) {
  const NVE_LATENT_POOL_INPUTS;
  const LatentPoolShapes s = in.check(/*cuda=*/false);
  const std::vector<Tensor> saved = latent_pool_saved_empty(hidden_states, s);
  auto [out, pooled] = use_aten_path() ? in.aten_fwd(nullptr, &saved) : run_forward(s, in, saved);
  return {out, pooled, saved[0], saved[1], saved[2]};
}

std::vector<Tensor> latent_pool_bwd_cpu(const Tensor& grad_out, const Tensor& pooled, NVE_LATENT_POOL_PARAMS) {
  const NVE_LATENT_POOL_INPUTS;
  const LatentPoolShapes s = in.check(/*cuda=*/false);
  latent_pool_check_bwd_args(grad_out, pooled, hidden_states, s);
  return use_aten_path() ? in.aten_bwd(grad_out, pooled, nullptr, nullptr)
                         : run_backward(s, in, grad_out, pooled, {});
}

std::vector<Tensor> latent_pool_bwd_saved_cpu(
    const Tensor& grad_out, const Tensor& pooled, const Tensor& geglu_mean, const Tensor& resid,
    const Tensor& ff_hidden, NVE_LATENT_POOL_PARAMS) {
  const NVE_LATENT_POOL_INPUTS;
  const LatentPoolShapes s = in.check(/*cuda=*/false);
  latent_pool_check_bwd_args(grad_out, pooled, hidden_states, s);
  const std::vector<Tensor> saved{geglu_mean, resid, ff_hidden};
  latent_pool_check_saved(saved, hidden_states, s);
  return use_aten_path() ? in.aten_bwd(grad_out, pooled, nullptr, &saved)
                         : run_backward(s, in, grad_out, pooled, saved);
}

}  // namespace nvembed
