// CPU emulation of the fused latent-pooling kernels (csrc/cuda/latent_pool.cu: the GEGLU + masked-mean stage, fwd and
// bwd; LayerNorm with a gather / with the residual; the softmax over the latents) against their contracts
// (csrc/cuda/latent_pool.cuh) in float64. Every line of the kernel bodies and of their launch functions runs; a CTA
// runs as one std::thread per CUDA thread (tools/cuda_emu/runtime.h: __syncthreads, warp shuffles), CTAs one after
// another. Outputs start as NaN, so an element the kernel should write and does not shows up; rows of u outside
// every unit must come back untouched.
//
// Build and run: tools/cuda_emu/run.sh latent_pool  (g++ and the CUDA toolkit headers; no GPU).
#include "cuda_emu/runtime.h"

thread_local uint3 threadIdx, blockIdx;

template <class Kernel, class Params>
void emu_launch_grid(Kernel kernel, dim3 grid, int threads, const Params& p) {
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx)
      emu::run_block(threads, 0, [&](int tid, char*) {
        blockIdx = make_uint3(bx, by, 0);
        threadIdx = make_uint3(tid, 0, 0);
        kernel(p);
      });
}
#define NVE_LAUNCH2(kernel, grid, threads, stream, ...) emu_launch_grid(kernel, dim3(grid), threads, __VA_ARGS__)
// __shared__ arrays become function statics: one copy for the CTA's threads (CTAs run one after another)
#undef __global__
#undef __shared__
#define __global__
#define __shared__ static
#define __launch_bounds__(...)
#include "cuda/latent_pool.cu"

namespace {

using nvembed::cuda::GegluPoolParams;
using nvembed::cuda::LatentPoolDType;
const float kNaN = std::numeric_limits<float>::quiet_NaN();

const char* dtype_name(LatentPoolDType t) {
  return t == LatentPoolDType::kFloat32 ? "fp32" : t == LatentPoolDType::kBFloat16 ? "bf16" : "fp16";
}

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
              bwd ? "bwd" : "fwd", U, t, B, F, dtype_name(dtype), int(c.vec4), ok ? "ok" : "FAIL", err_g, err_b, err_du, int(finite), int(untouched));
  std::fflush(stdout);
  return ok;
}

template <class T>
bool run_layer_norm_case(int64_t rows, int64_t d, bool residual, LatentPoolDType dtype, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> un(-2.f, 2.f);
  const int64_t src_rows = residual ? rows : rows + 5;
  std::vector<T> src(src_rows * d);
  for (auto& x : src) x = static_cast<T>(un(rng) + 0.7f);  // a nonzero mean
  std::vector<int64_t> idx(rows);
  for (int64_t r = 0; r < rows; ++r) idx[r] = (r * 7 + 3) % src_rows;  // a scattered gather
  std::vector<float> res(residual ? rows * d : 0), w(d), b(d);
  for (auto& x : res) x = un(rng);
  for (auto& x : w) x = 1.f + 0.2f * un(rng);
  for (auto& x : b) x = 0.2f * un(rng);
  std::vector<float> v(rows * d, kNaN), mean(rows, kNaN), rstd(rows, kNaN);
  std::vector<T> normed(rows * d, static_cast<T>(kNaN));
  nvembed::cuda::RowLayerNormParams p{};
  p.src = src.data();
  p.idx = residual ? nullptr : idx.data();
  p.res = residual ? res.data() : nullptr;
  p.w = w.data(), p.b = b.data();
  p.v_out = v.data(), p.normed = normed.data(), p.mean = mean.data(), p.rstd = rstd.data();
  p.dtype = dtype;
  p.rows = rows, p.d = d;
  p.eps = 1e-5f;
  nvembed::cuda::row_layer_norm_launch(p, nullptr);
  const double tol_io = dtype == LatentPoolDType::kFloat32 ? 2e-5 : dtype == LatentPoolDType::kFloat16 ? 2e-3 : 1e-2;
  double err_v = 0, err_stat = 0, err_n = 0;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> x(d);
    double m = 0, q = 0;
    for (int64_t j = 0; j < d; ++j) {
      const double s = static_cast<float>(src[(residual ? r : idx[r]) * d + j]);
      x[j] = residual ? static_cast<double>(static_cast<float>(s) + res[r * d + j]) : s;  // the fp32 sum
      err_v = std::max(err_v, std::abs(v[r * d + j] - x[j]) / (std::abs(x[j]) + 1e-30));
      m += x[j];
    }
    m /= d;
    for (int64_t j = 0; j < d; ++j) q += (x[j] - m) * (x[j] - m);
    const double rs = 1 / std::sqrt(q / d + 1e-5);
    err_stat = std::max({err_stat, std::abs(mean[r] - m) / (std::abs(m) + 1e-3), std::abs(rstd[r] - rs) / rs});
    for (int64_t j = 0; j < d; ++j) {
      const double want = (x[j] - m) * rs * w[j] + b[j];
      const double got = static_cast<float>(normed[r * d + j]);
      err_n = std::max(err_n, std::abs(got - want) / (std::abs(want) + 1e-2));
    }
  }
  const bool ok = std::isfinite(err_v) && std::isfinite(err_stat) && std::isfinite(err_n) && err_v <= 1e-7 &&
                  err_stat <= 2e-5 && err_n <= tol_io;
  std::printf("layer_norm %s: rows=%" PRId64 " d=%" PRId64 " %s: %s  input %.2e  stats %.2e  normed %.2e\n",
              residual ? "residual" : "gather  ", rows, d, dtype_name(dtype), ok ? "ok" : "FAIL", err_v, err_stat,
              err_n);
  std::fflush(stdout);
  return ok;
}

template <class T>
bool run_softmax_case(int64_t rows, int64_t n, float scale, bool want_acc, LatentPoolDType dtype, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> un(-8.f, 8.f);
  std::vector<T> scores(rows * n), p_io(rows * n, static_cast<T>(kNaN));
  for (auto& x : scores) x = static_cast<T>(un(rng));
  std::vector<float> p_acc(rows * n, kNaN);
  nvembed::cuda::RowSoftmaxParams p{};
  p.scores = scores.data(), p.p_io = p_io.data(), p.p_acc = want_acc ? p_acc.data() : nullptr;
  p.dtype = dtype;
  p.rows = rows, p.n = n;
  p.scale = scale;
  nvembed::cuda::row_softmax_launch(p, nullptr);
  const double tol_io = dtype == LatentPoolDType::kFloat32 ? 2e-6 : dtype == LatentPoolDType::kFloat16 ? 1e-3 : 8e-3;
  double err_io = 0, err_acc = 0;
  bool untouched = true;
  for (int64_t r = 0; r < rows; ++r) {
    double m = -INFINITY, sum = 0;
    for (int64_t j = 0; j < n; ++j) m = std::max(m, double(static_cast<float>(scores[r * n + j])) * scale);
    for (int64_t j = 0; j < n; ++j) sum += std::exp(double(static_cast<float>(scores[r * n + j])) * scale - m);
    for (int64_t j = 0; j < n; ++j) {
      const double want = std::exp(double(static_cast<float>(scores[r * n + j])) * scale - m) / sum;
      // relative to the value, down to the io format's smallest normal (fp16 flushes below 6.1e-5)
      const double floor = dtype == LatentPoolDType::kFloat16 ? 6.1e-5 : 1e-30;
      err_io = std::max(err_io, std::abs(double(static_cast<float>(p_io[r * n + j])) - want) / std::max(want, floor));
      if (want_acc) err_acc = std::max(err_acc, std::abs(p_acc[r * n + j] - want) / std::max(want, 1e-30));
      else untouched = untouched && std::isnan(p_acc[r * n + j]);
    }
  }
  const bool ok = std::isfinite(err_io) && std::isfinite(err_acc) && untouched && err_io <= tol_io && err_acc <= 2e-6;
  std::printf("softmax: rows=%" PRId64 " n=%" PRId64 " scale=%g acc=%d %s: %s  p_io %.2e  p_acc %.2e\n", rows, n,
              scale, int(want_acc), dtype_name(dtype), ok ? "ok" : "FAIL", err_io, err_acc);
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
  for (bool residual : {false, true})
    for (auto [rows, d] : {std::pair<int64_t, int64_t>{1, 1}, {3, 7}, {2, 256}, {5, 300}, {2, 1000}}) {
      ok &= run_layer_norm_case<float>(rows, d, residual, LatentPoolDType::kFloat32, seed++);
      ok &= run_layer_norm_case<__nv_bfloat16>(rows, d, residual, LatentPoolDType::kBFloat16, seed++);
      ok &= run_layer_norm_case<__half>(rows, d, residual, LatentPoolDType::kFloat16, seed++);
    }
  for (auto [rows, n] : {std::pair<int64_t, int64_t>{1, 1}, {9, 5}, {8, 32}, {17, 33}, {3, 512}})
    for (bool want_acc : {false, true}) {
      const float scale = n == 512 ? 0.125f : 1.f;
      ok &= run_softmax_case<float>(rows, n, scale, want_acc, LatentPoolDType::kFloat32, seed++);
      ok &= run_softmax_case<__nv_bfloat16>(rows, n, scale, want_acc, LatentPoolDType::kBFloat16, seed++);
      ok &= run_softmax_case<__half>(rows, n, scale, want_acc, LatentPoolDType::kFloat16, seed++);
    }
  std::printf(ok ? "PASSED\n" : "FAILED\n");
  return ok ? 0 : 1;
}
