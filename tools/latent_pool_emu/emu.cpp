// CPU emulation of the fused latent-pooling kernels (csrc/cuda/latent_pool.cu: the GEGLU + masked-mean stage, fwd and
// bwd) against their contract (csrc/cuda/latent_pool.cuh) in float64. Every line of the kernel bodies and of their
// launch functions runs; the grid is walked block by block and thread by thread (the kernels use no shared memory and
// no barriers, so the order is free). Outputs start as NaN, so an element the kernel should write and does not shows
// up; rows of u outside every unit must come back untouched.
//
// Build and run: tools/cuda_emu/run.sh latent_pool  (g++ and the CUDA toolkit headers; no GPU).
#include "cuda_emu/runtime.h"

thread_local uint3 threadIdx, blockIdx;

template <class Kernel, class Params>
void emu_launch_grid(Kernel kernel, dim3 grid, int threads, const Params& p) {
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx)
      for (int tid = 0; tid < threads; ++tid) {
        blockIdx = make_uint3(bx, by, 0);
        threadIdx = make_uint3(tid, 0, 0);
        kernel(p);
      }
}
#define NVE_LAUNCH2(kernel, grid, threads, stream, ...) emu_launch_grid(kernel, grid, threads, __VA_ARGS__)
#undef __global__
#define __global__
#define __launch_bounds__(...)
#include "cuda/latent_pool.cu"

namespace {

using nvembed::cuda::GegluPoolParams;
using nvembed::cuda::LatentPoolDType;
const float kNaN = std::numeric_limits<float>::quiet_NaN();

double gelu(double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }
double gelu_grad(double x) {
  return 0.5 * (1 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
}
// The sizes of the terms the fp32 formulas cancel (torch's too): 1 + erf(x / sqrt 2) for negative x, and gelu_grad's
// two terms around its zero near x = -0.75. Errors are measured against these.
double gelu_scale(double x) { return 0.5 * std::abs(x) * (1 + std::abs(std::erf(x / std::sqrt(2.0)))); }
double gelu_grad_scale(double x) {
  return 0.5 * (1 + std::abs(std::erf(x / std::sqrt(2.0)))) + std::abs(x) * std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
}

struct Case {
  std::vector<int> rows;  // tokens of each batch row in this chunk (0: a row without tokens)
  int64_t F;
  bool vec4;
  int extra_rows;  // rows of u after the chunk's tokens that no unit covers: must stay untouched
};

// Units as latent_pool_aten.cpp cuts them: the row's tokens, every 64.
std::vector<int32_t> make_units(const std::vector<int>& rows) {
  std::vector<int32_t> u;
  int32_t pos = 0;
  for (size_t r = 0; r < rows.size(); ++r)
    for (int s = 0; s < rows[r]; s += 64) {
      const int n = std::min(64, rows[r] - s);
      u.insert(u.end(), {pos, n, static_cast<int32_t>(r)});
      pos += n;
    }
  return u;
}

template <class T>
bool run_case(const Case& c, LatentPoolDType dtype, bool bwd, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> un(-2.f, 2.f), uw(0.01f, 1.f);
  const std::vector<int32_t> units = make_units(c.rows);
  const int64_t U = static_cast<int64_t>(units.size() / 3), F = c.F, B = static_cast<int64_t>(c.rows.size());
  int64_t t = 0;
  for (int n : c.rows) t += n;
  const int64_t rows_u = t + c.extra_rows;
  std::vector<T, std::allocator<T>> u(rows_u * 2 * F + 8);
  T* ub = u.data();
  while (reinterpret_cast<uintptr_t>(ub) % 16 != 0) ++ub;  // the launcher's vec4 needs a 16-byte aligned u
  std::vector<double> u0(rows_u * 2 * F);
  for (int64_t i = 0; i < rows_u * 2 * F; ++i) {
    ub[i] = static_cast<T>(un(rng));
    u0[i] = static_cast<double>(static_cast<float>(ub[i]));
  }
  std::vector<float> bias(2 * F), w(t), dgbar(B * F);
  for (auto& x : bias) x = 0.5f * un(rng);
  for (auto& x : w) x = uw(rng);
  for (auto& x : dgbar) x = un(rng);
  std::vector<float> part_g(U * F, kNaN), part_b(U * 2 * F, kNaN);
  GegluPoolParams p{};
  p.u = ub;
  p.bias = bias.data();
  p.w = w.data();
  p.units = units.data();
  p.dgbar = bwd ? dgbar.data() : nullptr;
  p.part_g = part_g.data();
  p.part_b = bwd ? part_b.data() : nullptr;
  p.dtype = dtype;
  p.U = U, p.F = F;
  p.vec4 = c.vec4;
  if (bwd)
    nvembed::cuda::geglu_pool_bwd_launch(p, nullptr);
  else
    nvembed::cuda::geglu_pool_fwd_launch(p, nullptr);

  const double tol_io = dtype == LatentPoolDType::kFloat32 ? 2e-6 : dtype == LatentPoolDType::kFloat16 ? 1e-3 : 8e-3;
  double err_g = 0, err_b = 0, err_du = 0;
  bool finite = true, untouched = true;
  for (int64_t k = 0; k < U; ++k) {
    const int64_t first = units[3 * k], count = units[3 * k + 1], row = units[3 * k + 2];
    for (int64_t j = 0; j < F; ++j) {
      double sg = 0, ag = 0, sa = 0, aa = 0, sgt = 0, agt = 0;
      for (int64_t tok = first; tok < first + count; ++tok) {
        const double a = u0[tok * 2 * F + j] + bias[j], x = u0[tok * 2 * F + F + j] + bias[F + j];
        sg += w[tok] * a * gelu(x), ag += std::abs(w[tok] * a) * gelu_scale(x);
        if (bwd) {
          const double dg = w[tok] * static_cast<double>(dgbar[row * F + j]);
          const double da = dg * gelu(x), dgt = dg * a * gelu_grad(x);
          sa += da, aa += std::abs(dg) * gelu_scale(x), sgt += dgt, agt += std::abs(dg * a) * gelu_grad_scale(x);
          const double got_a = static_cast<float>(ub[tok * 2 * F + j]);
          const double got_g = static_cast<float>(ub[tok * 2 * F + F + j]);
          finite = finite && std::isfinite(got_a) && std::isfinite(got_g);
          err_du = std::max(err_du, std::abs(got_a - da) / (std::abs(dg) * gelu_scale(x) + 1e-4));
          err_du = std::max(err_du, std::abs(got_g - dgt) / (std::abs(dg * a) * gelu_grad_scale(x) + 1e-4));
        }
      }
      finite = finite && std::isfinite(part_g[k * F + j]);
      err_g = std::max(err_g, std::abs(part_g[k * F + j] - sg) / (ag + 1e-30));
      if (bwd) {
        finite = finite && std::isfinite(part_b[k * 2 * F + j]) && std::isfinite(part_b[k * 2 * F + F + j]);
        err_b = std::max(err_b, std::abs(part_b[k * 2 * F + j] - sa) / (aa + 1e-30));
        err_b = std::max(err_b, std::abs(part_b[k * 2 * F + F + j] - sgt) / (agt + 1e-30));
      }
    }
  }
  // the forward leaves u as it was; the backward touches only the units' rows
  for (int64_t i = bwd ? t * 2 * F : 0; i < rows_u * 2 * F; ++i)
    untouched = untouched && static_cast<double>(static_cast<float>(ub[i])) == u0[i];
  const bool ok = finite && untouched && err_g <= 1e-5 && err_b <= 1e-5 && err_du <= tol_io;
  std::printf("geglu_pool %s: U=%" PRId64 " t=%" PRId64 " B=%" PRId64 " F=%" PRId64 " %s vec4=%d: %s  part_g %.2e"
              "  part_b %.2e  du %.2e  finite=%d untouched=%d\n",
              bwd ? "bwd" : "fwd", U, t, B, F,
              dtype == LatentPoolDType::kFloat32 ? "fp32" : dtype == LatentPoolDType::kBFloat16 ? "bf16" : "fp16",
              int(c.vec4), ok ? "ok" : "FAIL", err_g, err_b, err_du, int(finite), int(untouched));
  std::fflush(stdout);
  return ok;
}

}  // namespace

int main() {
  const std::vector<Case> cases = {
      {{1}, 1, false, 0},                 // one token, one column
      {{3, 0, 5}, 3, false, 2},           // odd F (scalar path), a row without tokens, uncovered rows after
      {{70, 1}, 4, true, 1},              // a row cut into units of 64 + 6
      {{2, 129, 64}, 8, true, 0},         // 64 + 64 + 1, a full unit
      {{5, 9}, 1030, false, 0},           // more columns than one CTA's 256 (scalar)
      {{17, 3}, 1032, true, 3},           // more than one CTA's 1024 (4 per thread), ragged last CTA
      {{33}, 7, false, 0},
  };
  bool ok = true;
  uint64_t seed = 1;
  for (const Case& c : cases)
    for (bool bwd : {false, true}) {
      ok &= run_case<float>(c, LatentPoolDType::kFloat32, bwd, seed++);
      ok &= run_case<__nv_bfloat16>(c, LatentPoolDType::kBFloat16, bwd, seed++);
      ok &= run_case<__half>(c, LatentPoolDType::kFloat16, bwd, seed++);
    }
  std::printf(ok ? "PASSED\n" : "FAILED\n");
  return ok ? 0 : 1;
}
