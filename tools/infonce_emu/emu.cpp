// CPU emulation of the CUDA InfoNCE kernels: the tensor-core kernel bodies, plan and launch sequences of
// csrc/cuda/infonce_tc.cuh and the plain kernels of csrc/cuda/infonce.cu (through their own launch functions), run
// with one std::thread per CUDA thread of a CTA, against a float64 reference.
//
// What is real: every line of the kernel bodies (index math, predicates, zero fills, stage indexing of the
// pipelines, epilogues, shared-memory layouts and swizzles, the cross-thread merges), the plan and the launch order.
// What is emulated: __syncthreads (a std::barrier over the CTA's threads), __shfl_xor_sync (a warp exchange),
// cp.async (a synchronous 16-byte copy: the wait counts are not exercised), ldmatrix (a per-thread copy of the
// thread's own fragment elements through the same CuTe partitioning, which is what ldmatrix delivers), and
// mma.sync m16n8k16 (a warp-collective product that places operands by the atom's own CuTe fragment layouts).
// The tensor-core kernels' shared memory, scratch and outputs start as NaN, so an element read before it is written
// shows up. (The plain kernels' __shared__ arrays become zero-initialized statics: no such check there.)
//
// Build and run: tools/infonce_emu/run.sh  (g++ and the CUTLASS headers of the nvidia-cutlass wheel; no GPU).
#include "cuda_emu/runtime.h"

#include "cuda/infonce_tc.cuh"

// The plain kernels (csrc/cuda/infonce.cu) as host functions: __shared__ variables become function statics (one
// copy for the CTA's threads; CTAs run one after another), launches run the grid block by block.
thread_local uint3 threadIdx, blockIdx;
inline float __expf(float x) { return std::exp(x); }

template <class Kernel, class Params>
void emu_launch_plain(Kernel kernel, unsigned blocks, int threads, const Params& p) {
  for (unsigned b = 0; b < blocks; ++b) {
    emu::run_block(threads, 0, [&](int tid, char*) {
      threadIdx = make_uint3(tid, 0, 0);
      blockIdx = make_uint3(b, 0, 0);
      kernel(p);
    });
  }
}
#define NVE_LAUNCH(kernel, blocks, threads, stream, ...) emu_launch_plain(kernel, blocks, threads, __VA_ARGS__)
#undef __global__
#undef __shared__
#define __global__
#define __shared__ static
#define __launch_bounds__(...)
#include "cuda/infonce.cu"

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

// ---- cases against the float64 reference ---------------------------------------------------------------------------

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

// Unit-norm rows rounded to E.
template <class E>
std::vector<E> make_rows(int64_t rows, int64_t d, std::mt19937_64& rng) {
  std::normal_distribution<double> nd;
  std::vector<E> v(rows * d);
  std::vector<double> x(d);
  for (int64_t r = 0; r < rows; ++r) {
    double n2 = 0;
    for (auto& e : x) {
      e = nd(rng);
      n2 += e * e;
    }
    for (int64_t k = 0; k < d; ++k) v[r * d + k] = static_cast<E>(static_cast<float>(x[k] / std::sqrt(n2)));
  }
  return v;
}

template <class E>
std::vector<double> widen(const std::vector<E>& v) {
  std::vector<double> w(v.size());
  for (size_t i = 0; i < v.size(); ++i) w[i] = static_cast<float>(v[i]);
  return w;
}

struct Reference {
  double loss = 0;
  std::vector<double> lse, gq, gd;
};

// float64 InfoNCE: query i's logits over all N docs (in-batch, target i*G) or its own G docs (target i*G).
Reference reference(const std::vector<double>& q, const std::vector<double>& docs, int64_t B, int64_t G, int64_t N,
                    int64_t d, double t, double g, bool inb) {
  Reference r;
  r.lse.assign(B, 0);
  r.gq.assign(B * d, 0);
  r.gd.assign(N * d, 0);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t j0 = inb ? 0 : i * G, j1 = inb ? N : (i + 1) * G;
    std::vector<double> s(j1 - j0);
    double m = -INFINITY;
    for (int64_t j = j0; j < j1; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < d; ++k) acc += q[i * d + k] * docs[j * d + k];
      s[j - j0] = acc / t;
      m = std::max(m, s[j - j0]);
    }
    double sum = 0;
    for (double v : s) sum += std::exp(v - m);
    r.lse[i] = m + std::log(sum);
    r.loss += (r.lse[i] - s[i * G - j0]) / B;
    for (int64_t j = j0; j < j1; ++j) {
      const double ds = (std::exp(s[j - j0] - r.lse[i]) - (j == i * G ? 1.0 : 0.0)) * g / (B * t);
      for (int64_t k = 0; k < d; ++k) {
        r.gq[i * d + k] += ds * docs[j * d + k];
        r.gd[j * d + k] += ds * q[i * d + k];
      }
    }
  }
  return r;
}

template <class OutVec>
Errors compare(const Reference& ref, const std::vector<float>& row_loss, const std::vector<float>& lse,
               const OutVec& gq, const OutVec& gd) {
  Errors e{};
  double loss = 0;
  for (auto v : row_loss) loss += v / double(row_loss.size());
  std::vector<double> lse_d(lse.begin(), lse.end()), gq_d = widen(gq), gd_d = widen(gd);
  e.finite = std::isfinite(loss);
  for (const auto* v : {&lse_d, &gq_d, &gd_d})
    for (double x : *v) e.finite &= std::isfinite(x);
  e.loss = std::abs(loss - ref.loss) / std::max(std::abs(ref.loss), 1e-30);
  e.lse = rel(lse_d, ref.lse);
  e.gq = rel(gq_d, ref.gq);
  e.gd = rel(gd_d, ref.gd);
  return e;
}

InfoNCEParams base_params(const void* q, const void* docs, InfoNCEDType dtype, int64_t B, int64_t N, int64_t d,
                          int64_t G, double t, bool inb) {
  InfoNCEParams p{};
  p.queries = q;
  p.docs = docs;
  p.dtype = dtype;
  p.B = B, p.N = N, p.d = d, p.G = G;
  p.inv_temperature = static_cast<float>(1.0 / t);
  p.in_batch_negatives = inb;
  p.inv_batch_temperature = static_cast<float>(1.0 / (B * t));
  return p;
}

constexpr double kGradLoss = 1.7;
const float kNaN = std::numeric_limits<float>::quiet_NaN();

// The tensor-core path: plan, forward, backward exactly as infonce_tc.cu sequences them.
template <class E>
Errors run_tc_case(const Case& c, uint64_t seed) {
  const int64_t B = c.B, G = c.G, d = c.d, N = B * G + c.extra;
  std::mt19937_64 rng(seed);
  const std::vector<E> q = make_rows<E>(B, d, rng), docs = make_rows<E>(N, d, rng);
  const Reference ref = reference(widen(q), widen(docs), B, G, N, d, c.t, kGradLoss, true);

  InfoNCEParams p = base_params(q.data(), docs.data(), c.fp16 ? InfoNCEDType::kFloat16 : InfoNCEDType::kBFloat16,
                                B, N, d, G, c.t, true);
  std::vector<float> lse(B, kNaN), row_loss(B, kNaN);
  p.lse = lse.data();
  p.row_loss = row_loss.data();
  const InfoNCETCPlan plan = tc::make_tc_plan(B, N, d, 2, c.dev);
  std::vector<float> part_max(plan.fwd_part_floats, kNaN), part_sum(plan.fwd_part_floats, kNaN), target(B, kNaN),
      scratch(plan.scratch_floats, kNaN), part_negsum(plan.part_negsum_floats, kNaN), neg_prob_sum(B, kNaN);
  InfoNCETCWorkspace ws{part_max.data(), part_sum.data(), target.data(), scratch.data(), part_negsum.data()};
  EmuExec<E> exec{p};
  tc::run_fwd(p, plan, ws, exec);

  const float gl = static_cast<float>(kGradLoss);
  p.lse_in = lse.data();
  p.grad_loss = &gl;
  p.neg_prob_sum = neg_prob_sum.data();
  std::vector<E> gq(B * d, static_cast<E>(kNaN)), gd(N * d, static_cast<E>(kNaN));
  p.grad_queries_out = gq.data();
  p.grad_docs_out = gd.data();
  tc::run_bwd(p, plan, ws, exec);
  std::printf("  plan: fwd_splits=%d q_splits=%d q_chunk_blocks=%" PRId64 " d_splits=%d d_chunk_blocks=%" PRId64
              " scratch=%" PRId64 " floats, %d launches\n",
              plan.fwd_splits, plan.q_splits, plan.q_chunk_blocks, plan.d_splits, plan.d_chunk_blocks,
              plan.scratch_floats, exec.launches);
  return compare(ref, row_loss, lse, gq, gd);
}

// The plain kernels through infonce_fwd_launch / infonce_bwd_launch (fp32 gradients, zero-initialized as the
// launcher does).
template <class T>
Errors run_plain_case(const Case& c, bool inb, InfoNCEDType dtype, uint64_t seed) {
  const int64_t B = c.B, G = c.G, d = c.d, N = B * G + (inb ? c.extra : 0);
  std::mt19937_64 rng(seed);
  const std::vector<T> q = make_rows<T>(B, d, rng), docs = make_rows<T>(N, d, rng);
  const Reference ref = reference(widen(q), widen(docs), B, G, N, d, c.t, kGradLoss, inb);
  InfoNCEParams p = base_params(q.data(), docs.data(), dtype, B, N, d, G, c.t, inb);
  std::vector<float> lse(B, kNaN), row_loss(B, kNaN), neg_prob_sum(B, kNaN), gq(B * d, 0.f), gd(N * d, 0.f);
  p.lse = lse.data();
  p.row_loss = row_loss.data();
  nvembed::cuda::infonce_fwd_launch(p, nullptr);
  const float gl = static_cast<float>(kGradLoss);
  p.lse_in = lse.data();
  p.grad_loss = &gl;
  p.grad_queries = gq.data();
  p.grad_docs = gd.data();
  p.neg_prob_sum = neg_prob_sum.data();
  nvembed::cuda::infonce_bwd_launch(p, nullptr);
  return compare(ref, row_loss, lse, gq, gd);
}

// The chunked-GEMM backward's elementwise kernel (infonce_chunk_grad_launch) against its contract in float64:
// probs = exp(scores / t - lse) with column r*G - col0 of row r zeroed, neg_prob_sum += the row sums. probs start
// as NaN (an unwritten element shows), neg_prob_sum at 0.25 (the kernel adds to it).
template <class T>
bool run_chunk_grad_case(int64_t rows, int64_t cols, int64_t ld, int64_t col0, int64_t G, double t,
                         InfoNCEDType dtype, bool vec4, bool in_place, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> scores(rows * cols), lse(rows), nps(rows, 0.25f);
  for (auto& x : scores) x = u(rng);
  for (int64_t r = 0; r < rows; ++r) {  // the row's log-sum-exp over this chunk plus a few more docs
    double m = 0;
    for (int64_t j = 0; j < cols; ++j) m += std::exp(scores[r * cols + j] / t);
    lse[r] = static_cast<float>(std::log(m + 3.0));
  }
  alignas(16) static T probs_store[1 << 14];
  T* probs = probs_store;
  for (int64_t i = 0; i < rows * ld; ++i) probs[i] = static_cast<T>(kNaN);  // the gaps must stay NaN
  // in place (the fused forward): probs written over a copy of the scores, row r where the scores' row r starts
  std::vector<float> overlay;
  if (in_place) {
    overlay = scores;
    probs = reinterpret_cast<T*>(overlay.data());
    ld = cols * static_cast<int64_t>(sizeof(float) / sizeof(T));
  }
  nvembed::cuda::InfoNCEChunkGradParams p{};
  p.scores = in_place ? overlay.data() : scores.data();
  p.in_place = in_place;
  p.lse = lse.data();
  p.neg_prob_sum = nps.data();
  p.probs = probs;
  p.dtype = dtype;
  p.rows = rows, p.cols = cols, p.probs_ld = ld, p.col0 = col0, p.G = G;
  p.inv_temperature = static_cast<float>(1.0 / t);
  p.vec4 = vec4;
  nvembed::cuda::infonce_chunk_grad_launch(p, nullptr);
  double err = 0, err_sum = 0;
  bool finite = true;
  const double tol = dtype == InfoNCEDType::kFloat32 ? 1e-5 : dtype == InfoNCEDType::kFloat16 ? 1e-3 : 8e-3;
  // fp16 flushes probabilities below its normal range (6.1e-5) to subnormals / 0: relative error from there on
  const double floor = dtype == InfoNCEDType::kFloat16 ? 6.1e-5 : 1e-30;
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const double want = col0 + j == r * G ? 0.0 : std::exp(scores[r * cols + j] / t - lse[r]);
      const double got = static_cast<double>(static_cast<float>(probs[r * ld + j]));
      finite = finite && std::isfinite(got);
      err = std::max(err, std::abs(got - want) / std::max(want, floor));  // a zeroed target must be exactly 0
      sum += want;
    }
    err_sum = std::max(err_sum, std::abs(nps[r] - (0.25 + sum)) / (0.25 + sum));
    if (!in_place) {  // in place the rest of the row holds what is left of its scores
      for (int64_t j = cols; j < ld; ++j) finite = finite && std::isnan(static_cast<float>(probs[r * ld + j]));
    }
  }
  const bool ok = finite && err <= tol && err_sum <= 1e-5;
  std::printf("chunk grad: rows=%" PRId64 " cols=%" PRId64 " ld=%" PRId64 " col0=%" PRId64 " G=%" PRId64
              " %s vec4=%d in_place=%d: %s  probs %.2e  neg_prob_sum %.2e  finite/untouched=%d\n",
              rows, cols, ld, col0, G,
              dtype == InfoNCEDType::kFloat32 ? "fp32" : dtype == InfoNCEDType::kBFloat16 ? "bf16" : "fp16",
              int(vec4), int(in_place), ok ? "ok" : "FAIL", err, err_sum, int(finite));
  std::fflush(stdout);
  return ok;
}

// The GEMM forward's elementwise kernel (infonce_chunk_lse_launch) against its contract in float64: run_max /
// run_sum (start: a previous chunk's pair, or -inf / 0) merged with the chunk's online log-sum-exp of scores / t, the
// target logit of each row whose target column lies in the chunk (other rows keep their NaN).
bool run_chunk_lse_case(int64_t rows, int64_t cols, int64_t col0, int64_t G, double t, bool fresh, bool vec4,
                        uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  alignas(16) static float scores_store[1 << 14];
  float* scores = scores_store;
  for (int64_t i = 0; i < rows * cols; ++i) scores[i] = u(rng);
  std::vector<float> run_max(rows), run_sum(rows), target(rows, kNaN);
  for (int64_t r = 0; r < rows; ++r) {
    run_max[r] = fresh ? -INFINITY : static_cast<float>(u(rng) / t);
    run_sum[r] = fresh ? 0.f : 1.f + 3.f * std::abs(u(rng));
  }
  const std::vector<float> max0 = run_max, sum0 = run_sum;
  nvembed::cuda::InfoNCEChunkLseParams p{};
  p.scores = scores;
  p.run_max = run_max.data();
  p.run_sum = run_sum.data();
  p.target = target.data();
  p.rows = rows, p.cols = cols, p.col0 = col0, p.G = G;
  p.inv_temperature = static_cast<float>(1.0 / t);
  p.vec4 = vec4;
  nvembed::cuda::infonce_chunk_lse_launch(p, nullptr);
  double err_lse = 0, err_tgt = 0;
  bool targets_ok = true;
  for (int64_t r = 0; r < rows; ++r) {
    double total = fresh ? 0.0 : sum0[r] * std::exp(static_cast<double>(max0[r]));
    for (int64_t j = 0; j < cols; ++j) total += std::exp(scores[r * cols + j] / t);
    const double want = std::log(total), got = run_max[r] + std::log(static_cast<double>(run_sum[r]));
    err_lse = std::max(err_lse, std::abs(got - want) / std::max(std::abs(want), 1.0));
    const int64_t tc = r * G - col0;
    if (tc >= 0 && tc < cols) {
      err_tgt = std::max(err_tgt, std::abs(target[r] - scores[r * cols + tc] / t) / (1.0 / t));
    } else {
      targets_ok = targets_ok && std::isnan(target[r]);
    }
  }
  const bool ok = targets_ok && std::isfinite(err_lse) && err_lse <= 2e-6 && err_tgt <= 1e-6;
  std::printf("chunk lse: rows=%" PRId64 " cols=%" PRId64 " col0=%" PRId64 " G=%" PRId64 " %s vec4=%d: %s  lse %.2e"
              "  target %.2e  untouched=%d\n",
              rows, cols, col0, G, fresh ? "first chunk" : "merged", int(vec4), ok ? "ok" : "FAIL", err_lse, err_tgt,
              int(targets_ok));
  std::fflush(stdout);
  return ok;
}

bool report(const Errors& e, double tol_g) {
  const bool ok = e.finite && e.loss <= 1e-4 && e.lse <= 1e-5 && e.gq <= tol_g && e.gd <= tol_g;
  std::printf("  %s: loss %.2e  lse %.2e  grad_queries %.2e  grad_docs %.2e  finite=%d\n", ok ? "ok" : "FAIL", e.loss,
              e.lse, e.gq, e.gd, int(e.finite));
  std::fflush(stdout);
  return ok;
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
  int failures = 0, total = 0;
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const Case& c = cases[ci];
    std::printf("tensor cores, case %zu: B=%" PRId64 " G=%" PRId64 " d=%" PRId64 " extra=%" PRId64 " t=%g %s (%s)\n",
                ci, c.B, c.G, c.d, c.extra, c.t, c.fp16 ? "fp16" : "bf16", c.note);
    std::fflush(stdout);
    const Errors e = c.fp16 ? run_tc_case<cute::half_t>(c, 1234 + ci) : run_tc_case<cute::bfloat16_t>(c, 1234 + ci);
    // bf16 / fp16 inputs are exact here; errors come from fp32 accumulation, P~ rounded to the input dtype and the
    // gradients rounded to it: ~2^-9 (bf16) / 2^-12 (fp16) relative per element.
    failures += !report(e, c.fp16 ? 2e-3 : 1e-2);
    ++total;
  }
  // The plain kernels: every dtype, both modes (own-group: no extra rows).
  const std::vector<Case> plain_cases = {
      {1, 1, 8, 0, 0.05, false, {}, "B=1 G=1"},
      {37, 3, 65, 5, 0.05, false, {}, "tails, d % 8 != 0, extra negatives"},
      {130, 2, 72, 3, 0.02, false, {}, "3 query blocks of 64, 5 doc tiles"},
  };
  const size_t n_plain = (argc > 1 && std::string(argv[1]) == "--quick") ? 1 : plain_cases.size();
  for (size_t ci = 0; ci < n_plain; ++ci) {
    const Case& c = plain_cases[ci];
    for (bool inb : {true, false}) {
      for (InfoNCEDType dt : {InfoNCEDType::kFloat32, InfoNCEDType::kBFloat16, InfoNCEDType::kFloat16}) {
        const char* name = dt == InfoNCEDType::kFloat32 ? "fp32" : dt == InfoNCEDType::kBFloat16 ? "bf16" : "fp16";
        std::printf("plain, case %zu: B=%" PRId64 " G=%" PRId64 " d=%" PRId64 " extra=%" PRId64 " t=%g %s %s (%s)\n",
                    ci, c.B, c.G, c.d, inb ? c.extra : 0, c.t, name, inb ? "in-batch" : "own-group", c.note);
        std::fflush(stdout);
        const uint64_t seed = 777 + ci;
        const Errors e = dt == InfoNCEDType::kFloat32 ? run_plain_case<float>(c, inb, dt, seed)
                         : dt == InfoNCEDType::kBFloat16 ? run_plain_case<__nv_bfloat16>(c, inb, dt, seed)
                                                         : run_plain_case<__half>(c, inb, dt, seed);
        failures += !report(e, 1e-5);  // fp32 math on exactly representable inputs, fp32 gradients
        ++total;
      }
    }
  }
  // The chunked-GEMM backward's elementwise kernel: targets inside / before / after the chunk, G = 1 and > 1,
  // scalar and float4 paths (cols % 4 != 0 forces the scalar one), a row longer than one pass of the block.
  // Row strides past the chunk's width (a chunk written into its block's probability buffer): the gap untouched.
  struct ChunkCase {
    int64_t rows, cols, ld, col0, G;
    bool vec4;
    bool in_place = false;  // probs written over the scores (ld: cols * 4 / sizeof(T), set by the case)
  };
  const std::vector<ChunkCase> chunk_cases = {
      {5, 7, 7, 0, 1, false},     {5, 8, 8, 0, 1, true},        {6, 12, 20, 4, 2, true},
      {9, 13, 17, 10, 3, false},  {3, 1100, 1100, 0, 400, true}, {4, 1101, 1105, 2, 300, false},
      {7, 16, 16, 100, 2, true},
      // the fused forward (infonce_fwd_grad_gemm): a row block of queries from r0 against all docs, col0 = -r0 G
      {6, 40, 40, -12, 4, true},  {5, 33, 33, -6, 2, false},    {3, 1100, 1100, -800, 100, true},
      // ... with the probabilities written over the scores: one pass, several passes of the barrier loop (4096
      // columns per float4 pass, 1024 per scalar one) with a ragged last one, targets early and late in the row
      {6, 40, 0, -12, 4, true, true}, {5, 33, 0, -6, 2, false, true}, {2, 9000, 0, -8, 8000, true, true},
      {3, 2501, 0, -4, 1200, false, true},
  };
  for (size_t ci = 0; ci < chunk_cases.size(); ++ci) {
    const ChunkCase& c = chunk_cases[ci];
    for (InfoNCEDType dt : {InfoNCEDType::kFloat32, InfoNCEDType::kBFloat16, InfoNCEDType::kFloat16}) {
      const uint64_t seed = 4242 + ci;
      auto run = [&](auto tag) {
        using T = decltype(tag);
        return run_chunk_grad_case<T>(c.rows, c.cols, c.ld, c.col0, c.G, 0.05, dt, c.vec4, c.in_place, seed);
      };
      const bool ok = dt == InfoNCEDType::kFloat32    ? run(float{})
                      : dt == InfoNCEDType::kBFloat16 ? run(__nv_bfloat16{})
                                                      : run(__half{});
      failures += !ok;
      ++total;
    }
  }
  // The GEMM forward's online log-sum-exp kernel: first and later chunks, targets inside / before / after,
  // scalar and float4 paths, rows longer than one pass of the block (a thread's max growing mid-row).
  struct LseCase {
    int64_t rows, cols, col0, G;
    bool vec4;
  };
  const std::vector<LseCase> lse_cases = {{1, 1, 0, 1, false},     {5, 7, 0, 1, false},       {5, 8, 4, 2, true},
                                          {9, 13, 10, 3, false},   {3, 2100, 0, 700, true},   {4, 1101, 2, 300, false},
                                          {7, 16, 100, 2, true},
                                          // the fused forward's row blocks: col0 = -r0 G
                                          {6, 40, -12, 4, true},     {5, 33, -6, 2, false},     {3, 1100, -800, 100, true}};
  for (size_t ci = 0; ci < lse_cases.size(); ++ci) {
    const LseCase& c = lse_cases[ci];
    for (bool fresh : {true, false})
      for (double t : {0.02, 1.0}) {
        failures += !run_chunk_lse_case(c.rows, c.cols, c.col0, c.G, t, fresh, c.vec4, 9000 + ci);
        ++total;
      }
  }
  std::printf("%s: %d of %d cases failed\n", failures ? "FAILED" : "PASSED", failures, total);
  return failures ? 1 : 0;
}
