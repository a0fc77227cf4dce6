// CPU emulation of the sm80 flash-attention kernels: the kernel bodies of csrc/cuda/flash_sm80.cuh (forward, dsum,
// dQ, dK/dV) with the block sizes and grids of the CUDA build, run one std::thread per CUDA thread of a CTA
// (tools/cuda_emu/runtime.h), against a float64 reference.
//
// What is real: every line of the kernel bodies (index math, sequence offsets, GQA head mapping, predicates and zero
// fills, the double-buffered stage indexing, online softmax, the accumulator -> A-operand register reuse, the
// transposed shared-memory views, epilogues). What is emulated: __syncthreads, __shfl_xor_sync, cp.async (a
// synchronous 16-byte copy), ldmatrix (a per-thread copy of the thread's own fragment through the same CuTe
// partitioning) and mma.sync (placing operands by the atom's CuTe layouts). Shared memory and every output start as
// NaN, so an element read before it is written, or an output left unwritten, shows up.
//
// Build and run: tools/flash_emu/run.sh [--quick | --case D,fp16,Hq,Hkv,Lq,Lk]  (g++ and the CUTLASS headers of the
// nvidia-cutlass wheel; no GPU). FLASH_EMU_DUMP=1 also prints, for the first rows of dQ / dK / dV, the columns that
// differ from the reference (a wrong column block points at a fragment layout).
#include "cuda_emu/runtime.h"

#include "cuda/flash_sm80.cuh"

namespace fa = nvembed::cuda::fa;
using nvembed::cuda::FlashDType;
using nvembed::cuda::FlashParams;

template <class E>
struct EmuAtoms {
  using G2S = cute::UniversalCopy<cute::uint128_t>;
  using S2R = cute::DefaultCopy;
  using S2RTrans = cute::DefaultCopy;
  using Mma = EmuMma<typename nvembed::cuda::tc::Sm80Atoms<E>::Mma>;
};

template <class E, int D>
using EmuConfig = fa::Config<E, D, EmuAtoms<E>>;

template <class Body>
void run_grid(fa::Grid g, int threads, int smem, Body body) {
  for (int z = 0; z < g.z; ++z)
    for (int y = 0; y < g.y; ++y)
      for (int x = 0; x < g.x; ++x)
        emu::run_block(threads, smem, [&](int tid, char* s) { body(s, tid, x, y, z); });
}

template <class E, int D>
void emu_forward(const FlashParams& p) {
  using C = EmuConfig<E, D>;
  run_grid(fa::fwd_grid<C>(p), C::Tr::kThreads, C::kSmemFwd, [&](char* s, int tid, int x, int y, int z) {
    fa::fwd_body<typename C::Tr, C::kFwdBM, C::kFwdBN>(p, s, tid, x, y, z);
  });
}

template <class E, int D>
void emu_backward(const FlashParams& p) {
  using C = EmuConfig<E, D>;
  run_grid(fa::dsum_grid(p), 32 * fa::kDsumWarps, 0, [&](char*, int tid, int x, int y, int) {
    fa::dsum_body<E>(p, static_cast<int64_t>(x) * fa::kDsumWarps + tid / 32, y, tid % 32);
  });
  run_grid(fa::dq_grid<C>(p), C::Tr::kThreads, C::kSmemDq, [&](char* s, int tid, int x, int y, int z) {
    fa::dq_body<typename C::Tr, C::kDqBM, C::kDqBN>(p, s, tid, x, y, z);
  });
  run_grid(fa::dkdv_grid<C>(p), C::Tr::kThreads, C::kSmemDkv, [&](char* s, int tid, int x, int y, int z) {
    fa::dkdv_body<typename C::Tr, C::kDkvBN, C::kDkvBM>(p, s, tid, x, y, z);
  });
}

// ---- cases against the float64 reference -------------------------------------------------------------------------

struct Case {
  int D;
  bool fp16;
  int Hq, Hkv;
  std::vector<int> q_lens, k_lens;  // per sequence
  bool varlen_q, varlen_k;          // packed (cu_seqlens) or dense (all lengths equal)
  double scale;                     // 0: 1 / sqrt(D)
  const char* note;
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
std::vector<E> randn(size_t n, std::mt19937_64& rng) {
  std::normal_distribution<double> nd;
  std::vector<E> v(n);
  for (auto& e : v) e = static_cast<E>(static_cast<float>(nd(rng)));
  return v;
}

template <class E>
std::vector<double> to_double(const std::vector<E>& v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = static_cast<double>(static_cast<float>(v[i]));
  return r;
}

template <class E, int D>
bool run_case(const Case& c, uint64_t seed) {
  const int B = static_cast<int>(c.q_lens.size()), Hq = c.Hq, Hkv = c.Hkv, g = Hq / Hkv;
  std::vector<int> cu_q(B + 1, 0), cu_k(B + 1, 0);
  for (int b = 0; b < B; ++b) {
    cu_q[b + 1] = cu_q[b] + c.q_lens[b];
    cu_k[b + 1] = cu_k[b] + c.k_lens[b];
  }
  const int Tq = cu_q[B], Tk = cu_k[B];
  const int max_q = *std::max_element(c.q_lens.begin(), c.q_lens.end());
  const int max_k = *std::max_element(c.k_lens.begin(), c.k_lens.end());
  const double scale = c.scale != 0 ? c.scale : 1.0 / std::sqrt(static_cast<double>(D));
  std::mt19937_64 rng(seed);
  auto q = randn<E>(static_cast<size_t>(Tq) * Hq * D, rng), dout = randn<E>(static_cast<size_t>(Tq) * Hq * D, rng);
  auto k = randn<E>(static_cast<size_t>(Tk) * Hkv * D, rng), v = randn<E>(static_cast<size_t>(Tk) * Hkv * D, rng);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<E> out(q.size(), static_cast<E>(nan)), dq(q.size(), static_cast<E>(nan));
  std::vector<E> dk(k.size(), static_cast<E>(nan)), dv(k.size(), static_cast<E>(nan));
  // dense layouts need equal lengths; lse / dsum: [B, Hq, Lq] dense, [Hq, Tq] varlen
  std::vector<float> lse(static_cast<size_t>(Hq) * Tq, nan), dsum(lse.size(), nan);

  FlashParams p{};
  p.dtype = c.fp16 ? FlashDType::kFloat16 : FlashDType::kBFloat16;
  p.head_dim = D;
  p.batch = B;
  p.heads_q = Hq;
  p.heads_kv = Hkv;
  p.seqlen_q = max_q;
  p.seqlen_k = max_k;
  p.total_q = Tq;
  p.cu_q = c.varlen_q ? cu_q.data() : nullptr;
  p.cu_k = c.varlen_k ? cu_k.data() : nullptr;
  p.scale = static_cast<float>(scale);
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.lse = lse.data();
  emu_forward<E, D>(p);
  p.dout = dout.data();
  p.out_in = out.data();
  p.lse_in = lse.data();
  p.dsum = dsum.data();
  p.dq = dq.data();
  p.dk = dk.data();
  p.dv = dv.data();
  emu_backward<E, D>(p);

  // float64 reference on the same (rounded) inputs
  const auto Q = to_double(q), K = to_double(k), V = to_double(v), dO = to_double(dout);
  std::vector<double> rO(Q.size(), 0), rdQ(Q.size(), 0), rdK(K.size(), 0), rdV(K.size(), 0);
  std::vector<double> rL(lse.size(), 0);
  bool masked_ok = true;
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < Hq; ++h) {
      const int hk = h / g;
      for (int i = 0; i < c.q_lens[b]; ++i) {
        const int64_t qr = cu_q[b] + i;
        const int64_t li =
            c.varlen_q ? static_cast<int64_t>(h) * Tq + qr : (static_cast<int64_t>(b) * Hq + h) * max_q + i;
        const double* qv = &Q[(qr * Hq + h) * D];
        const int nk = c.k_lens[b];
        if (nk == 0) {
          rL[li] = INFINITY;
          if (!(lse[li] == INFINITY)) masked_ok = false;
          for (int e = 0; e < D; ++e)
            if (static_cast<float>(out[(qr * Hq + h) * D + e]) != 0.f) masked_ok = false;
          continue;
        }
        std::vector<double> s(nk), pr(nk), dp(nk);
        double mx = -INFINITY;
        for (int j = 0; j < nk; ++j) {
          const double* kv = &K[((cu_k[b] + j) * static_cast<int64_t>(Hkv) + hk) * D];
          double acc = 0;
          for (int e = 0; e < D; ++e) acc += qv[e] * kv[e];
          s[j] = acc * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (int j = 0; j < nk; ++j) sum += (pr[j] = std::exp(s[j] - mx));
        rL[li] = mx + std::log(sum);
        double* o = &rO[(qr * Hq + h) * D];
        const double* go = &dO[(qr * Hq + h) * D];
        for (int j = 0; j < nk; ++j) {
          pr[j] /= sum;
          const double* vv = &V[((cu_k[b] + j) * static_cast<int64_t>(Hkv) + hk) * D];
          double acc = 0;
          for (int e = 0; e < D; ++e) {
            o[e] += pr[j] * vv[e];
            acc += go[e] * vv[e];
          }
          dp[j] = acc;
        }
        double ds = 0;
        for (int e = 0; e < D; ++e) ds += go[e] * o[e];
        for (int j = 0; j < nk; ++j) {
          const double dS = pr[j] * (dp[j] - ds);
          const int64_t kr = ((cu_k[b] + j) * static_cast<int64_t>(Hkv) + hk) * D;
          for (int e = 0; e < D; ++e) {
            rdQ[(qr * Hq + h) * D + e] += scale * dS * K[kr + e];
            rdK[kr + e] += scale * dS * qv[e];
            rdV[kr + e] += pr[j] * go[e];
          }
        }
      }
    }
  }

  bool finite = true;
  auto dbl = [&](const std::vector<E>& x) {
    auto r = to_double(x);
    for (double e : r) finite &= std::isfinite(e);
    return r;
  };
  std::vector<double> L;  // finite lse entries only (rows with keys)
  std::vector<double> RL;
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(rL[i])) continue;
    finite &= std::isfinite(lse[i]);
    L.push_back(lse[i]);
    RL.push_back(rL[i]);
  }
  const double e_out = rel(dbl(out), rO), e_lse = rel(L, RL), e_dq = rel(dbl(dq), rdQ), e_dk = rel(dbl(dk), rdK),
               e_dv = rel(dbl(dv), rdV);
  if (std::getenv("FLASH_EMU_DUMP")) {
    auto dump = [&](const char* name, const std::vector<E>& x, const std::vector<double>& ref, int H, int rows) {
      auto xd = to_double(x);
      for (int r = 0; r < rows; ++r) {
        std::printf("%s row %d:", name, r);
        for (int e = 0; e < D; e += 1)
          if (std::fabs(xd[r * H * D + e] - ref[r * H * D + e]) > 0.05 * std::fabs(ref[r * H * D + e]) + 1e-2)
            std::printf(" %d", e);
        std::printf("\n");
      }
    };
    dump("dv", dv, rdV, Hkv, std::min(Tk, 3));
    dump("dk", dk, rdK, Hkv, std::min(Tk, 3));
    dump("dq", dq, rdQ, Hq, std::min(Tq, 3));
  }
  const double tol_o = c.fp16 ? 2e-3 : 1e-2, tol_g = c.fp16 ? 5e-3 : 3e-2;
  const bool ok = finite && masked_ok && e_out < tol_o && e_lse < 1e-4 && e_dq < tol_g && e_dk < tol_g &&
                  e_dv < tol_g;
  std::printf("%s D=%d %s Hq=%d Hkv=%d B=%d Lq<=%d Lk<=%d%s%s: out %.2e lse %.2e dq %.2e dk %.2e dv %.2e "
              "finite=%d masked_ok=%d -> %s\n",
              c.note, D, c.fp16 ? "fp16" : "bf16", Hq, Hkv, B, max_q, max_k, c.varlen_q ? " varlen-q" : "",
              c.varlen_k ? " varlen-k" : "", e_out, e_lse, e_dq, e_dk, e_dv, finite, masked_ok, ok ? "ok" : "FAIL");
  return ok;
}

template <class E>
bool run_dtype(const Case& c, uint64_t seed) {
  switch (c.D) {
    case 32: return run_case<E, 32>(c, seed);
    case 64: return run_case<E, 64>(c, seed);
    case 128: return run_case<E, 128>(c, seed);
  }
  return false;
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  // Dense q with packed keys and empty key sequences is what the launcher makes of a key padding mask.
  std::vector<Case> cases = {
      {64, false, 1, 1, {1}, {1}, false, false, 0, "single query, single key"},
      {32, true, 2, 1, {17, 17}, {77, 77}, false, false, 0, "odd lengths, GQA 2:1"},
      {32, false, 2, 2, {33, 33}, {0, 40}, false, true, 0, "key mask: one sequence with no keys"},
      {128, false, 4, 2, {130}, {70}, false, false, 0, "Lq > one tile, hd128 GQA"},
      {64, true, 2, 1, {5, 0, 140}, {70, 3, 129}, true, true, 0, "varlen with an empty query sequence"},
      {128, true, 1, 1, {200}, {300}, false, false, -0.1, "negative scale"},
      {64, false, 3, 1, {129}, {257}, false, false, 0, "MQA, tails on both sides"},
      {32, true, 1, 1, {260}, {129}, false, false, 0, "3 forward row blocks"},
  };
  if (quick) cases = {cases[0], cases[1], cases[2]};
  if (argc > 2 && std::string(argv[1]) == "--case") {  // --case D,fp16,Hq,Hkv,Lq,Lk: one dense case
    int d, f, hq, hkv, lq, lk;
    if (std::sscanf(argv[2], "%d,%d,%d,%d,%d,%d", &d, &f, &hq, &hkv, &lq, &lk) != 6) return 2;
    cases = {{d, f != 0, hq, hkv, {lq}, {lk}, false, false, 0, "custom"}};
  }
  int failed = 0;
  uint64_t seed = 1234;
  for (const auto& c : cases) {
    failed += !(c.fp16 ? run_dtype<cute::half_t>(c, seed++) : run_dtype<cute::bfloat16_t>(c, seed++));
  }
  std::printf("%s: %d of %zu cases failed\n", failed ? "FAILED" : "PASSED", failed, cases.size());
  return failed ? 1 : 0;
}
