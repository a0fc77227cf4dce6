// CPU emulation of the tensor-core InfoNCE kernels (csrc/cuda/infonce_tc.cuh): the same kernel bodies, plan and
// launch sequences, run with one std::thread per CUDA thread of a CTA, against a float64 reference.
//
// What is real: every line of the kernel bodies (index math, predicates, zero fills, stage indexing of the
// pipelines, epilogues, shared-memory layouts and swizzles, the cross-thread merges), the plan and the launch order.
// What is emulated: __syncthreads (a std::barrier over the CTA's threads), __shfl_xor_sync (a warp exchange),
// cp.async (a synchronous 16-byte copy: the wait counts are not exercised), ldmatrix (a per-thread copy of the
// thread's own fragment elements through the same CuTe partitioning, which is what ldmatrix delivers), and
// mma.sync m16n8k16 (a warp-collective product that places operands by the atom's own CuTe fragment layouts).
// Shared memory, the scratch and the outputs start as NaN, so an element read before it is written shows up.
//
// Build and run: tools/infonce_emu/run.sh  (g++ and the CUTLASS headers of the nvidia-cutlass wheel; no GPU).
#include <cute/tensor.hpp>

#include <atomic>
#include <barrier>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

// ---- the emulated CUDA runtime --------------------------------------------------------------------------------------

namespace emu {

struct Warp {
  std::barrier<> bar{32};
  float shfl[2][32];
  uint32_t a[2][32][4];
  uint32_t b[2][32][2];
};

struct Block {
  explicit Block(int threads) : bar(threads), warps(threads / 32) {
    for (auto& w : warps) w = std::make_unique<Warp>();
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

thread_local Block* tl_block = nullptr;
thread_local int tl_tid = 0;
thread_local unsigned tl_shfl_phase = 0, tl_mma_phase = 0;

inline Warp& warp() { return *tl_block->warps[tl_tid / 32]; }

// Runs fn(tid, smem) on `threads` threads as one CTA; shared memory starts as NaN bytes.
inline void run_block(int threads, int smem_bytes, const std::function<void(int, char*)>& fn) {
  Block block(threads);
  std::vector<char> smem(smem_bytes + 128, static_cast<char>(0xFF));
  char* base = smem.data() + (128 - reinterpret_cast<uintptr_t>(smem.data()) % 128) % 128;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      tl_block = &block;
      tl_tid = t;
      tl_shfl_phase = tl_mma_phase = 0;
      fn(t, base);
    });
  }
  for (auto& th : pool) th.join();
}

// One warp-wide m16n8k16 product D = A B^T + C: each lane deposits its registers, then computes its own D values.
// Two alternating deposit buffers: a buffer is rewritten two calls later, after every lane passed the barrier of
// the call in between, i.e. finished reading it.
template <class Real>
void mma(float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  using T = cute::MMA_Traits<Real>;
  using VA = typename T::ValTypeA;
  static_assert(std::is_same_v<typename T::Shape_MNK, cute::Shape<cute::_16, cute::_8, cute::_16>>);
  Warp& w = warp();
  const int lane = tl_tid % 32, ph = tl_mma_phase++ & 1;
  std::memcpy(w.a[ph][lane], a, sizeof(uint32_t) * 4);
  std::memcpy(w.b[ph][lane], b, sizeof(uint32_t) * 2);
  w.bar.arrive_and_wait();
  auto unpack = [](uint32_t reg, int half) {
    return static_cast<float>(VA::bitcast(static_cast<uint16_t>((reg >> (16 * half)) & 0xFFFFu)));
  };
  float A[16][16], B[8][16];
  for (int l = 0; l < 32; ++l) {
    for (int v = 0; v < 8; ++v) {
      const int idx = typename T::ALayout{}(l, v);  // m + 16 k
      A[idx % 16][idx / 16] = unpack(w.a[ph][l][v / 2], v % 2);
    }
    for (int v = 0; v < 4; ++v) {
      const int idx = typename T::BLayout{}(l, v);  // n + 8 k
      B[idx % 8][idx / 8] = unpack(w.b[ph][l][v / 2], v % 2);
    }
  }
  for (int v = 0; v < 4; ++v) {
    const int idx = typename T::CLayout{}(lane, v);  // m + 16 n
    const int m = idx % 16, n = idx / 16;
    float s = c[v];
    for (int k = 0; k < 16; ++k) s += A[m][k] * B[n][k];
    d[v] = s;
  }
}

}  // namespace emu

void __syncthreads() { emu::tl_block->bar.arrive_and_wait(); }

float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  emu::Warp& w = emu::warp();
  const int lane = emu::tl_tid % 32, ph = emu::tl_shfl_phase++ & 1;
  w.shfl[ph][lane] = v;
  w.bar.arrive_and_wait();
  return w.shfl[ph][lane ^ lane_mask];
}

template <class Real>
struct EmuMma {
  using DRegisters = float[4];
  using ARegisters = uint32_t[4];
  using BRegisters = uint32_t[2];
  using CRegisters = float[4];
  static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0, uint32_t const& a1,
                  uint32_t const& a2, uint32_t const& a3, uint32_t const& b0, uint32_t const& b1, float const& c0,
                  float const& c1, float const& c2, float const& c3) {
    const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
    const float c[4] = {c0, c1, c2, c3};
    float d[4];
    emu::mma<Real>(d, a, b, c);
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
  }
};

namespace cute {
template <class Real>
struct MMA_Traits<EmuMma<Real>> : MMA_Traits<Real> {};
}  // namespace cute

#include "cuda/infonce_tc.cuh"

namespace tc = nvembed::cuda::tc;
using nvembed::cuda::InfoNCEDType;
using nvembed::cuda::InfoNCEParams;
using nvembed::cuda::InfoNCETCPlan;
using nvembed::cuda::InfoNCETCWorkspace;

template <class E>
struct EmuAtoms {
  using G2S = cute::UniversalCopy<cute::uint128_t>;
  using S2R = cute::DefaultCopy;
  using S2RTrans = cute::DefaultCopy;
  using Mma = EmuMma<typename tc::Sm80Atoms<E>::Mma>;
};
template <class E>
using EmuTr = tc::Traits<E, EmuAtoms<E>>;

template <class E>
struct EmuExec {
  const InfoNCEParams& p;
  int launches = 0;

  void fwd_tile(int splits, int64_t blocks, const tc::FwdArgs& a) {
    ++launches;
    for (int64_t by = 0; by < blocks; ++by)
      for (int bx = 0; bx < splits; ++bx)
        emu::run_block(tc::TileConfig::kThreads, EmuTr<E>::kSmemFwd, [&](int tid, char* smem) {
          tc::fwd_tile_body<EmuTr<E>>(p, a, smem, tid, bx, static_cast<int>(by));
        });
  }
  void fwd_combine(int64_t blocks, const tc::FwdArgs& a) {
    ++launches;
    for (int64_t r = 0; r < blocks * tc::kCombineThreads; ++r) tc::fwd_combine_body(p, a, r);
  }
  template <bool kOwnQueries>
  void side(int splits, int64_t blocks, const tc::SideArgs& a) {
    ++launches;
    for (int64_t by = 0; by < blocks; ++by)
      for (int bx = 0; bx < splits; ++bx)
        emu::run_block(tc::TileConfig::kThreads, EmuTr<E>::kSmemBwd, [&](int tid, char* smem) {
          tc::bwd_side_body<EmuTr<E>, kOwnQueries>(p, a, smem, tid, bx, static_cast<int>(by));
        });
  }
  template <bool kOwnQueries>
  void reduce(int64_t blocks, const tc::SideArgs& a) {
    ++launches;
    for (int64_t b = 0; b < blocks; ++b)
      for (int w = 0; w < tc::kReduceRowsPerBlock; ++w)
        for (int lane = 0; lane < 32; ++lane)
          tc::bwd_reduce_body<EmuTr<E>, kOwnQueries>(p, a, a.chunk_row0 + b * tc::kReduceRowsPerBlock + w, lane);
  }
};

// ---- one case against the float64 reference -------------------------------------------------------------------------

struct Case {
  int64_t B, G, d, extra;
  double t;
  bool fp16;
  tc::DeviceShape dev;
  const char* note;
};

struct Errors {
  double loss, lse, gq, gd;
  bool finite;
};

double rel(const std::vector<double>& out, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

template <class E>
Errors run_case(const Case& c, uint64_t seed) {
  const int64_t B = c.B, G = c.G, d = c.d, N = B * G + c.extra;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd;
  auto make = [&](int64_t rows) {
    std::vector<E> v(rows * d);
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> x(d);
      double n2 = 0;
      for (auto& e : x) {
        e = nd(rng);
        n2 += e * e;
      }
      for (int64_t k = 0; k < d; ++k) v[r * d + k] = static_cast<E>(static_cast<float>(x[k] / std::sqrt(n2)));
    }
    return v;
  };
  std::vector<E> q = make(B), docs = make(N);
  const double g = 1.7;  // grad_loss

  // float64 reference on the rounded inputs
  std::vector<double> S(B * N), lse_ref(B), gq_ref(B * d, 0.0), gd_ref(N * d, 0.0);
  double loss_ref = 0;
  for (int64_t i = 0; i < B; ++i) {
    double m = -INFINITY;
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < d; ++k) s += double(float(q[i * d + k])) * double(float(docs[j * d + k]));
      S[i * N + j] = s / c.t;
      m = std::max(m, S[i * N + j]);
    }
    double sum = 0;
    for (int64_t j = 0; j < N; ++j) sum += std::exp(S[i * N + j] - m);
    lse_ref[i] = m + std::log(sum);
    loss_ref += (lse_ref[i] - S[i * N + i * G]) / B;
    for (int64_t j = 0; j < N; ++j) {
      const double ds = (std::exp(S[i * N + j] - lse_ref[i]) - (j == i * G ? 1.0 : 0.0)) * g / (B * c.t);
      for (int64_t k = 0; k < d; ++k) {
        gq_ref[i * d + k] += ds * double(float(docs[j * d + k]));
        gd_ref[j * d + k] += ds * double(float(q[i * d + k]));
      }
    }
  }

  const float nanf_ = std::numeric_limits<float>::quiet_NaN();
  InfoNCEParams p{};
  p.queries = q.data();
  p.docs = docs.data();
  p.dtype = c.fp16 ? InfoNCEDType::kFloat16 : InfoNCEDType::kBFloat16;
  p.B = B, p.N = N, p.d = d, p.G = G;
  p.inv_temperature = static_cast<float>(1.0 / c.t);
  p.in_batch_negatives = true;
  p.inv_batch_temperature = static_cast<float>(1.0 / (B * c.t));
  std::vector<float> lse(B, nanf_), row_loss(B, nanf_);
  p.lse = lse.data();
  p.row_loss = row_loss.data();

  const InfoNCETCPlan plan = tc::make_tc_plan(B, N, d, 2, c.dev);
  std::vector<float> part_max(plan.fwd_part_floats, nanf_), part_sum(plan.fwd_part_floats, nanf_),
      target(B, nanf_), scratch(plan.scratch_floats, nanf_), part_negsum(plan.part_negsum_floats, nanf_),
      neg_prob_sum(B, nanf_);
  InfoNCETCWorkspace ws{part_max.data(), part_sum.data(), target.data(), scratch.data(), part_negsum.data()};

  EmuExec<E> exec{p};
  tc::run_fwd(p, plan, ws, exec);

  float gl = static_cast<float>(g);
  p.lse_in = lse.data();
  p.grad_loss = &gl;
  p.neg_prob_sum = neg_prob_sum.data();
  std::vector<E> gq(B * d, static_cast<E>(nanf_)), gd(N * d, static_cast<E>(nanf_));
  p.grad_queries_out = gq.data();
  p.grad_docs_out = gd.data();
  tc::run_bwd(p, plan, ws, exec);

  Errors e{};
  double loss = 0;
  for (auto v : row_loss) loss += v / double(B);
  std::vector<double> lse_d(lse.begin(), lse.end()), gq_d(B * d), gd_d(N * d);
  for (size_t i = 0; i < gq.size(); ++i) gq_d[i] = float(gq[i]);
  for (size_t i = 0; i < gd.size(); ++i) gd_d[i] = float(gd[i]);
  e.finite = std::isfinite(loss);
  for (double v : lse_d) e.finite &= std::isfinite(v);
  for (double v : gq_d) e.finite &= std::isfinite(v);
  for (double v : gd_d) e.finite &= std::isfinite(v);
  e.loss = std::abs(loss - loss_ref) / std::max(std::abs(loss_ref), 1e-30);
  e.lse = rel(lse_d, lse_ref);
  e.gq = rel(gq_d, gq_ref);
  e.gd = rel(gd_d, gd_ref);
  std::printf("  plan: fwd_splits=%d q_splits=%d q_chunk_blocks=%" PRId64 " d_splits=%d d_chunk_blocks=%" PRId64
              " scratch=%" PRId64 " floats, %d launches\n",
              plan.fwd_splits, plan.q_splits, plan.q_chunk_blocks, plan.d_splits, plan.d_chunk_blocks,
              plan.scratch_floats, exec.launches);
  return e;
}

int main(int argc, char** argv) {
  const tc::DeviceShape h100{264, 132, 50 << 20, int64_t{256} << 20};
  // Few slots, a tiny L2 and no scratch budget: many splits and one owned block per launch.
  const tc::DeviceShape tiny{3, 1, 1 << 15, 0};
  const tc::DeviceShape mid{6, 4, 1 << 16, 0};
  // Two slots and an L2 of one block: 2 splits per owned block and one owned block per launch in both passes.
  const tc::DeviceShape stress{2, 2, 1 << 12, 0};
  std::vector<Case> cases = {
      {1, 1, 8, 0, 0.05, false, h100, "B=1 G=1 d=8: one valid logit"},
      {3, 1, 16, 0, 0.5, true, h100, "G=1 fp16"},
      {37, 3, 64, 5, 0.05, false, h100, "extra negatives, row/col tails"},
      {37, 3, 64, 5, 0.05, false, tiny, "same, split and chunked"},
      {5, 8, 136, 0, 0.02, false, h100, "d=136: k-tile and d-chunk tails"},
      {5, 8, 136, 0, 0.02, true, mid, "fp16, d=136, splits"},
      {130, 2, 72, 3, 1.0, false, h100, "2 query blocks, 3 doc tiles, 2 super-tiles"},
      {130, 2, 72, 3, 1.0, false, tiny, "same, split and chunked"},
      {130, 2, 72, 3, 0.02, true, tiny, "fp16, split and chunked"},
      {300, 1, 32, 0, 0.1, false, mid, "3 query blocks, G=1, d=32"},
      {300, 1, 32, 0, 0.1, false, stress, "same, split and chunked in both passes"},
      {260, 2, 48, 7, 0.05, true, stress, "fp16, extra negatives, split and chunked in both passes"},
      {40, 8, 520, 0, 0.05, false, h100, "d=520: 9 k-tiles rotate through the 3 stages; 4 + 1 gradient k-chunks"},
  };
  if (argc > 1 && std::string(argv[1]) == "--quick") cases.resize(3);
  if (argc > 1 && std::string(argv[1]) == "--big") cases = {{4, 2, 1024, 0, 0.05, false, h100, "d=1024"}};
  int failures = 0;
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const Case& c = cases[ci];
    std::printf("case %zu: B=%" PRId64 " G=%" PRId64 " d=%" PRId64 " extra=%" PRId64 " t=%g %s (%s)\n", ci, c.B,
                c.G, c.d, c.extra, c.t, c.fp16 ? "fp16" : "bf16", c.note);
    std::fflush(stdout);
    const Errors e = c.fp16 ? run_case<cute::half_t>(c, 1234 + ci) : run_case<cute::bfloat16_t>(c, 1234 + ci);
    // bf16 / fp16 inputs are exact here; errors come from fp32 accumulation, P~ rounded to the input dtype and the
    // gradients rounded to it: ~2^-9 (bf16) / 2^-12 (fp16) relative per element.
    const double tol_g = c.fp16 ? 2e-3 : 1e-2, tol_l = 1e-5;
    const bool ok = e.finite && e.loss <= 1e-4 && e.lse <= tol_l && e.gq <= tol_g && e.gd <= tol_g;
    std::printf("  %s: loss %.2e  lse %.2e  grad_queries %.2e  grad_docs %.2e  finite=%d\n", ok ? "ok" : "FAIL",
                e.loss, e.lse, e.gq, e.gd, int(e.finite));
    std::fflush(stdout);
    failures += !ok;
  }
  std::printf("%s: %d of %zu cases failed\n", failures ? "FAILED" : "PASSED", failures, cases.size());
  return failures ? 1 : 0;
}
