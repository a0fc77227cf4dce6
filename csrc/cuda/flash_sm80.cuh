// Non-causal flash attention for sm80+ (A100, and H100 until a wgmma kernel exists): forward and backward kernel
// bodies over CuTe with the sm80 atoms (cp.async 16-byte copies, ldmatrix, mma.sync m16n8k16; fp32 accumulation),
// written like infonce_tc.cuh so that one source serves two builds: flash_{fwd,bwd}_*.cu instantiate them for the
// GPU, and tools/flash_emu runs the same bodies on the CPU, one std::thread per CUDA thread, with logically
// equivalent atoms. The bodies take their thread / block indices as arguments and use only __syncthreads() and
// __shfl_xor_sync() from the CUDA runtime.
//
// Layout (see flash.cuh): rows of sequence b at an offset (cu_seqlens or b * L), heads interleaved in a row, so
// dense [B, L, H, D] and packed varlen [T, H, D] inputs share every kernel. GQA: query head h reads kv head
// h / (Hq / Hkv); the expanded K / V are never formed.
//
// Forward (fwd_body), FlashAttention-2's algorithm: a CTA (4 warps) owns BM query rows of one head; it walks the
// keys in BN-row blocks, S = Q K^T into registers (each warp owns 16-row slices, so a row's scores live in one
// quad of lanes and the row max / sum need two shuffles), online softmax in the log2 domain, P converted to bf16 /
// fp16 in registers and used directly as the A operand of O += P V (the m16n8 accumulator of two adjacent n-atoms
// is the m16k16 A fragment), V read with ldmatrix.trans. K / V blocks are double-buffered: the cp.async of block
// n + 1 runs under the two GEMMs of block n. Writes O and the row log-sum-exp (natural log; +inf and O = 0 for a
// row without keys).
//
// Backward: dsum = rowsum(dO * O) first (dsum_body), then two kernels that each own their output rows, so no
// atomics and bitwise-reproducible gradients (the FA2/FA3 default accumulates dQ with fp32 atomics instead):
//   * dkdv_body: a CTA owns BN keys of one kv head and loops over every query block of every query head of its
//     GQA group (dK / dV summed over the group in registers). It computes the transposed tiles S^T = K Q^T and
//     dP^T = V dO^T, so P^T and dS^T = P^T * (dP^T - dsum) are already in the A-operand registers of
//     dV += P^T dO and dK += dS^T Q (B operands read with ldmatrix.trans): nothing goes through shared memory.
//   * dq_body: a CTA owns BM query rows and loops over the key blocks: S, dP, dS as above, dQ += dS K.
//   Cost of owning instead of atomics: S and dP are computed twice (7 GEMMs of the tile instead of 5): the
//   backward does 1.4x the FLOPs of an atomic-accumulation backward, and no fp32 dQ buffer or conversion pass.
#pragma once

#include <cute/tensor.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/cute_common.cuh"
#include "cuda/flash.cuh"

namespace nvembed::cuda::fa {

constexpr float kLn2 = 0.6931471805599453f;

// ---- tile traits: shared-memory layouts, copies and the MMA for one dtype and head dim --------------------------

template <class Element_, int kHeadDim_, class Atoms = tc::Sm80Atoms<Element_>>
struct Traits {
  using Element = Element_;
  static_assert(std::is_same_v<Element, cute::half_t> || std::is_same_v<Element, cute::bfloat16_t>);
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 32 || kHeadDim == 64 || kHeadDim == 128);
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;

  // 4 warps along M, each a 16-row slice per atom row: a row's columns stay in one warp. The 16-wide N step lets
  // one ldmatrix.x4 feed two n8 atoms and makes two adjacent accumulator atoms one A fragment.
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<typename Atoms::Mma>,
                                  cute::Layout<cute::Shape<cute::Int<kWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kWarps>, cute::_16, cute::_16>>;

  // Rows of 64 (128 B, 128B swizzle) or 32 (64 B, 64B swizzle) elements: conflict-free ldmatrix, contiguous
  // 16-byte cp.async writes.
  static constexpr int kBlockKSmem = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kBlockKSmem == 64 ? 3 : 2;
  using SmemAtom = decltype(cute::composition(
      cute::Swizzle<kSwizzleBits, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::Int<kBlockKSmem>>, cute::Stride<cute::Int<kBlockKSmem>, cute::_1>>{}));
  // An R x D tile (R rows of the sequence), and the same bytes viewed as D x R (the B operand of O += P V and of
  // the backward's dV / dK / dQ GEMMs, read with ldmatrix.trans).
  template <int R>
  using SmemRows = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<R>, cute::Int<kHeadDim>>{}));
  template <int R>
  using SmemRowsT = decltype(cute::composition(
      SmemRows<R>{}, cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<R>>{}, cute::GenRowMajor{})));
  template <int R>
  using SmemRowsTNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemRowsT<R>{}));

  // 16-byte copies, kBlockKSmem / 8 threads per smem row.
  static constexpr int kThreadsPerRow = kBlockKSmem / 8;
  using GmemCopy = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<typename Atoms::G2S, Element>{},
      cute::Layout<cute::Shape<cute::Int<kThreads / kThreadsPerRow>, cute::Int<kThreadsPerRow>>,
                   cute::Stride<cute::Int<kThreadsPerRow>, cute::_1>>{},
      cute::Layout<cute::Shape<cute::_1, cute::_8>>{}));
  using S2RAtom = cute::Copy_Atom<typename Atoms::S2R, Element>;
  using S2RAtomTrans = cute::Copy_Atom<typename Atoms::S2RTrans, Element>;

  template <int R>
  static constexpr int kTileElems = R * kHeadDim;
};

// Block sizes per head dim, and the shared memory of each kernel in bytes.
template <class Element, int kHeadDim, class Atoms = tc::Sm80Atoms<Element>>
struct Config {
  using Tr = Traits<Element, kHeadDim, Atoms>;
  static constexpr int kFwdBM = 128;                        // query rows per forward CTA (2 atom rows per warp)
  // Keys per forward step, picked by ptxas's spills at the 255-register limit (nvcc 13.0, bytes per thread,
  // sm_90a / sm_80): head dim 32: 0 / 216 with 128 keys, 0 / 0 with 64; head dim 64: 32 / 64 with 128, 96 / 44 with
  // 64; head dim 128 with 64: 88 / 116. The backward kernels do not spill.
  static constexpr int kFwdBN = kHeadDim == 64 ? 128 : 64;
  static constexpr int kDqBM = 64;                          // query rows per dQ CTA
  static constexpr int kDqBN = 64;                          // keys per dQ step
  static constexpr int kDkvBN = 64;                         // keys per dK/dV CTA
  static constexpr int kDkvBM = kHeadDim == 128 ? 32 : 64;  // query rows per dK/dV step (register budget)
  static constexpr int kE = sizeof(Element);
  // Q + 2 stages of K and V
  static constexpr int kSmemFwd = (kFwdBM + 4 * kFwdBN) * kHeadDim * kE;
  // Q, dO + 2 stages of K and V
  static constexpr int kSmemDq = (2 * kDqBM + 4 * kDqBN) * kHeadDim * kE;
  // K, V + 2 stages of Q, dO, and of the steps' lse / dsum
  static constexpr int kSmemDkv = (2 * kDkvBN + 4 * kDkvBM) * kHeadDim * kE + 4 * kDkvBM * 4;
};

// ---- sequence geometry -----------------------------------------------------------------------------------------

struct Seq {
  int64_t q_off, k_off;  // first row of the sequence in q / k
  int q_len, k_len;
};

NVE_DEVICE Seq seq_of(const FlashParams& p, int b) {
  Seq s;
  if (p.cu_q != nullptr) {
    s.q_off = p.cu_q[b];
    s.q_len = p.cu_q[b + 1] - p.cu_q[b];
  } else {
    s.q_off = static_cast<int64_t>(b) * p.seqlen_q;
    s.q_len = p.seqlen_q;
  }
  if (p.cu_k != nullptr) {
    s.k_off = p.cu_k[b];
    s.k_len = p.cu_k[b + 1] - p.cu_k[b];
  } else {
    s.k_off = static_cast<int64_t>(b) * p.seqlen_k;
    s.k_len = p.seqlen_k;
  }
  return s;
}

// Index of (sequence b, head h, row i of the sequence) in lse / dsum.
NVE_DEVICE int64_t stat_index(const FlashParams& p, int b, int h, int64_t q_off, int i) {
  return p.cu_q != nullptr ? static_cast<int64_t>(h) * p.total_q + q_off + i
                           : (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + i;
}

// ---- building blocks -----------------------------------------------------------------------------------------------

// cp.async of rows [0, rows) of an R x D tile at g (row stride `stride` elements) into smem; rows >= `rows` are
// zero-filled (never read from global memory).
template <class Tr, int R>
NVE_DEVICE void load_tile(const typename Tr::Element* g, int64_t stride, int rows, typename Tr::Element* s, int tid) {
  using namespace cute;
  constexpr int D = Tr::kHeadDim;
  Tensor gT = make_tensor(make_gmem_ptr(g), make_shape(Int<R>{}, Int<D>{}), make_stride(stride, _1{}));
  Tensor sT = make_tensor(make_smem_ptr(s), typename Tr::template SmemRows<R>{});
  typename Tr::GmemCopy gcopy;
  auto thr = gcopy.get_thread_slice(tid);
  Tensor tg = thr.partition_S(gT);
  Tensor ts = thr.partition_D(sT);
  Tensor tcrd = thr.partition_S(make_identity_tensor(Shape<Int<R>, Int<D>>{}));
  tc::copy_or_zero(gcopy, tg, ts, tcrd, rows, D);
}

// cp.async of key / value block n (sequence rows [n * BN, +BN), zero-filled past k_len) into stage st of sK / sV.
template <class Tr, int BN>
NVE_DEVICE void load_kv(const typename Tr::Element* k, const typename Tr::Element* v, int64_t k_rs, int n,
                        int k_len, typename Tr::Element* sK, typename Tr::Element* sV, int st, int tid) {
  const int rows = std::min(BN, k_len - n * BN);
  const int64_t off = static_cast<int64_t>(n) * BN * k_rs;
  load_tile<Tr, BN>(k + off, k_rs, rows, sK + st * Tr::template kTileElems<BN>, tid);
  load_tile<Tr, BN>(v + off, k_rs, rows, sV + st * Tr::template kTileElems<BN>, tid);
}

// acc[M x N] += A[M x D] . B[N x D]^T, both operands R x D tiles in shared memory.
template <class Tr, int M, int N, class Acc>
NVE_DEVICE void gemm_ss(const typename Tr::Element* sa, const typename Tr::Element* sb, Acc& acc, int tid) {
  using namespace cute;
  Tensor sA = make_tensor(make_smem_ptr(sa), typename Tr::template SmemRows<M>{});
  Tensor sB = make_tensor(make_smem_ptr(sb), typename Tr::template SmemRows<N>{});
  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor tA = thr.partition_fragment_A(sA);  // (MMA, MMA_M, D / 16)
  Tensor tB = thr.partition_fragment_B(sB);  // (MMA, MMA_N, D / 16)
  auto s2r_a = make_tiled_copy_A(typename Tr::S2RAtom{}, mma);
  auto s2r_a_thr = s2r_a.get_thread_slice(tid);
  Tensor tAs = s2r_a_thr.partition_S(sA);
  Tensor tAv = s2r_a_thr.retile_D(tA);
  auto s2r_b = make_tiled_copy_B(typename Tr::S2RAtom{}, mma);
  auto s2r_b_thr = s2r_b.get_thread_slice(tid);
  Tensor tBs = s2r_b_thr.partition_S(sB);
  Tensor tBv = s2r_b_thr.retile_D(tB);
  CUTE_STATIC_ASSERT_V(size<1>(tA) == size<1>(acc) && size<1>(tB) == size<2>(acc));
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(tA); ++kb) {
    copy(s2r_a, tAs(_, _, kb), tAv(_, _, kb));
    copy(s2r_b, tBs(_, _, kb), tBv(_, _, kb));
    gemm(mma, tA(_, _, kb), tB(_, _, kb), acc);
  }
}

// (MMA = 4, MMA_M, MMA_N) accumulator layout -> ((4, 2), MMA_M, MMA_N / 2): the registers of two adjacent n8
// accumulator atoms are, in order, the m16k16 A fragment (rows g / g + 8, k = 2t, 2t + 1, then 2t + 8, 2t + 9).
template <class Layout>
NVE_DEVICE auto acc_as_a(Layout l) {
  using namespace cute;
  static_assert(decltype(rank(l))::value == 3 && decltype(size<0>(l))::value == 4);
  static_assert(decltype(size<2>(l))::value % 2 == 0);
  auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});  // (4, MMA_M, (2, MMA_N / 2))
  return make_layout(make_layout(get<0>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

// The accumulator rounded to the element type (same layout); view it with acc_as_a for gemm_rs.
template <class E, class Acc>
NVE_DEVICE auto to_element(Acc const& acc) {
  using namespace cute;
  Tensor r = make_tensor<E>(acc.layout());
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) r(i) = static_cast<E>(acc(i));
  return r;
}

// acc[M x D] += A[M x R] . B[R x D], A in registers (an acc_as_a view), B an R x D tile in shared memory read
// transposed (ldmatrix.trans).
template <class Tr, int R, class ARegs, class Acc>
NVE_DEVICE void gemm_rs(ARegs const& tA, const typename Tr::Element* sb, Acc& acc, int tid) {
  using namespace cute;
  Tensor sBt = make_tensor(make_smem_ptr(sb), typename Tr::template SmemRowsT<R>{});  // (D, R)
  Tensor sBtNoSw = make_tensor(make_smem_ptr(sb), typename Tr::template SmemRowsTNoSwizzle<R>{});
  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor tB = thr.partition_fragment_B(sBtNoSw);  // (MMA, D / 8, R / 16)
  auto s2r_b = make_tiled_copy_B(typename Tr::S2RAtomTrans{}, mma);
  auto s2r_b_thr = s2r_b.get_thread_slice(tid);
  Tensor tBs = s2r_b_thr.partition_S(sBt);
  Tensor tBv = s2r_b_thr.retile_D(tB);
  CUTE_STATIC_ASSERT_V(size<1>(tA) == size<1>(acc) && size<1>(tB) == size<2>(acc));
  CUTE_STATIC_ASSERT_V(size<2>(tA) == size<2>(tB));
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(tA); ++kb) {
    copy(s2r_b, tBs(_, _, kb), tBv(_, _, kb));
    gemm(mma, tA(_, _, kb), tB(_, _, kb), acc);
  }
}

// Stores rows [0, rows) of an accumulator tile (times `mul`) in the element type; row r of the tile goes to
// g + r * stride. `a` is the tile as (row slots, column slots) and `c` the (row, column) of each slot (the sm80
// mma.sync layout through tc::acc_rowcol here, the wgmma layout through fa90::acc_rowcol in the Hopper backward).
// Pairs of adjacent columns are one 4-byte store.
template <class E, class A, class C>
NVE_DEVICE void store_rowcol(A const& a, C const& c, E* g, int64_t stride, int rows, float mul) {
  using namespace cute;
  struct alignas(2 * sizeof(E)) E2 {
    E x, y;
  };
  static_assert(decltype(size<1>(a))::value % 2 == 0);
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(a); ++mi) {
    const int r = get<0>(c(mi, 0));
    if (r >= rows) continue;
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(a); ni += 2) {
      const int col = get<1>(c(mi, ni));  // even; col + 1 is slot ni + 1 (value bit 0)
      E2 v{static_cast<E>(a(mi, ni) * mul), static_cast<E>(a(mi, ni + 1) * mul)};
      *reinterpret_cast<E2*>(g + r * stride + col) = v;
    }
  }
}

template <class E, class Acc, class Crd>
NVE_DEVICE void store_rows(Acc const& acc, Crd const& crd, E* g, int64_t stride, int rows, float mul) {
  using namespace cute;
  store_rowcol<E>(make_tensor(acc.data(), tc::acc_rowcol(acc.layout())),
                  make_tensor(crd.data(), tc::acc_rowcol(crd.layout())), g, stride, rows, mul);
}

// ---- forward -------------------------------------------------------------------------------------------------------

// CTA (m_block, h, b): query rows [m_block * BM, +BM) of head h of sequence b.
template <class Tr, int BM, int BN>
NVE_DEVICE void fwd_body(const FlashParams& p, char* smem, int tid, int m_block, int h, int b) {
  using namespace cute;
  using E = typename Tr::Element;
  constexpr int D = Tr::kHeadDim;
  const Seq s = seq_of(p, b);
  const int row0 = m_block * BM;
  if (row0 >= s.q_len) return;  // uniform over the CTA, before any barrier
  const int q_rows = std::min(BM, s.q_len - row0);
  const int hk = h / (p.heads_q / p.heads_kv);
  const int64_t q_rs = static_cast<int64_t>(p.heads_q) * D, k_rs = static_cast<int64_t>(p.heads_kv) * D;
  const E* q = static_cast<const E*>(p.q) + (s.q_off + row0) * q_rs + static_cast<int64_t>(h) * D;
  const E* k = static_cast<const E*>(p.k) + s.k_off * k_rs + static_cast<int64_t>(hk) * D;
  const E* v = static_cast<const E*>(p.v) + s.k_off * k_rs + static_cast<int64_t>(hk) * D;
  E* sQ = reinterpret_cast<E*>(smem);
  E* sK = sQ + Tr::template kTileElems<BM>;  // 2 stages
  E* sV = sK + 2 * Tr::template kTileElems<BN>;
  const int n_blocks = (s.k_len + BN - 1) / BN;

  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<BM>, Int<D>>{});
  Tensor acc_o_rc = make_tensor(acc_o.data(), tc::acc_rowcol(acc_o.layout()));
  Tensor crd_o = thr.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  Tensor acc_s = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});
  Tensor acc_s_rc = make_tensor(acc_s.data(), tc::acc_rowcol(acc_s.layout()));
  Tensor crd_s = thr.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  Tensor crd_s_rc = make_tensor(crd_s.data(), tc::acc_rowcol(crd_s.layout()));
  constexpr int kRows = decltype(size<0>(acc_s_rc))::value;
  constexpr int kCols = decltype(size<1>(acc_s_rc))::value;
  constexpr int kColsO = decltype(size<1>(acc_o_rc))::value;
  static_assert(decltype(size<0>(acc_o_rc))::value == kRows);

  clear(acc_o);
  float row_max[kRows], row_sum[kRows];  // log2 domain; row_sum is this thread's columns only until the end
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    row_max[mi] = -INFINITY;
    row_sum[mi] = 0.f;
  }
  const float scale_log2 = p.scale * tc::kLog2e;

  load_tile<Tr, BM>(q, q_rs, q_rows, sQ, tid);
  if (n_blocks > 0) load_kv<Tr, BN>(k, v, k_rs, 0, s.k_len, sK, sV, 0, tid);
  cp_async_fence();
  for (int n = 0; n < n_blocks; ++n) {
    const int st = n & 1;
    // Block n (and Q) landed for this thread, and after the barrier for all; the barrier also retires every
    // thread's reads of stage st ^ 1 (block n - 1), which the prefetch below overwrites.
    cp_async_wait<0>();
    __syncthreads();
    if (n + 1 < n_blocks) load_kv<Tr, BN>(k, v, k_rs, n + 1, s.k_len, sK, sV, st ^ 1, tid);
    cp_async_fence();

    clear(acc_s);
    gemm_ss<Tr, BM, BN>(sQ, sK + st * Tr::template kTileElems<BN>, acc_s, tid);

    const int cols_left = s.k_len - n * BN;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      float mx = -INFINITY;
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        const float x = get<1>(crd_s_rc(mi, ni)) < cols_left ? acc_s_rc(mi, ni) * scale_log2 : -INFINITY;
        acc_s_rc(mi, ni) = x;
        mx = fmaxf(mx, x);
      }
      mx = fmaxf(mx, tc::shfl_xor(mx, 1));  // the quad holds the row's columns
      mx = fmaxf(mx, tc::shfl_xor(mx, 2));
      const float new_max = fmaxf(row_max[mi], mx);
      const float base = new_max == -INFINITY ? 0.f : new_max;  // no valid key yet: every exp below is 0
      const float corr = exp2f(row_max[mi] - base);
      row_max[mi] = new_max;
      float sum = 0.f;
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        const float e = exp2f(acc_s_rc(mi, ni) - base);
        acc_s_rc(mi, ni) = e;
        sum += e;
      }
      row_sum[mi] = row_sum[mi] * corr + sum;
      CUTE_UNROLL
      for (int ni = 0; ni < kColsO; ++ni) acc_o_rc(mi, ni) *= corr;
    }

    Tensor rP = to_element<E>(acc_s);
    gemm_rs<Tr, BN>(make_tensor(rP.data(), acc_as_a(rP.layout())), sV + st * Tr::template kTileElems<BN>, acc_o,
                    tid);
  }
  cp_async_wait<0>();  // nothing in flight at exit (n_blocks == 0 left the Q copy pending)

  // Epilogue: O / rowsum, lse = ln 2 * (max + log2 sum); a row without keys gets O = 0, lse = +inf.
  const int lane = tid % 32;
  float mul[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    float sum = row_sum[mi];
    sum += tc::shfl_xor(sum, 1);
    sum += tc::shfl_xor(sum, 2);
    mul[mi] = sum > 0.f ? 1.f / sum : 0.f;
    const float lse = sum > 0.f ? (row_max[mi] + log2f(sum)) * kLn2 : INFINITY;
    const int r = get<0>(crd_s_rc(mi, 0));
    if (lane % 4 == 0 && r < q_rows) p.lse[stat_index(p, b, h, s.q_off, row0 + r)] = lse;
    CUTE_UNROLL
    for (int ni = 0; ni < kColsO; ++ni) acc_o_rc(mi, ni) *= mul[mi];
  }
  E* out = static_cast<E*>(p.out) + (s.q_off + row0) * q_rs + static_cast<int64_t>(h) * D;
  store_rows<E>(acc_o, crd_o, out, q_rs, q_rows, 1.f);
}

// ---- backward ------------------------------------------------------------------------------------------------------

// Warp per (query row t, head h): dsum = sum_d dout * out, in fp32.
template <class E>
NVE_DEVICE void dsum_body(const FlashParams& p, int64_t t, int h, int lane) {
  if (t >= p.total_q) return;  // uniform over the warp
  const int64_t q_rs = static_cast<int64_t>(p.heads_q) * p.head_dim;
  const E* o = static_cast<const E*>(p.out_in) + t * q_rs + static_cast<int64_t>(h) * p.head_dim;
  const E* d = static_cast<const E*>(p.dout) + t * q_rs + static_cast<int64_t>(h) * p.head_dim;
  float acc = 0.f;
  for (int c = lane; c < p.head_dim; c += 32) acc += static_cast<float>(o[c]) * static_cast<float>(d[c]);
  for (int m = 16; m > 0; m >>= 1) acc += tc::shfl_xor(acc, m);
  if (lane == 0) {
    const int64_t idx = p.cu_q != nullptr
                            ? static_cast<int64_t>(h) * p.total_q + t
                            : ((t / p.seqlen_q) * p.heads_q + h) * p.seqlen_q + t % p.seqlen_q;
    p.dsum[idx] = acc;
  }
}

// CTA (m_block, h, b): dQ of query rows [m_block * BM, +BM) of head h, over every key of the sequence.
template <class Tr, int BM, int BN>
NVE_DEVICE void dq_body(const FlashParams& p, char* smem, int tid, int m_block, int h, int b) {
  using namespace cute;
  using E = typename Tr::Element;
  constexpr int D = Tr::kHeadDim;
  const Seq s = seq_of(p, b);
  const int row0 = m_block * BM;
  if (row0 >= s.q_len) return;
  const int q_rows = std::min(BM, s.q_len - row0);
  const int hk = h / (p.heads_q / p.heads_kv);
  const int64_t q_rs = static_cast<int64_t>(p.heads_q) * D, k_rs = static_cast<int64_t>(p.heads_kv) * D;
  const int64_t q_base = (s.q_off + row0) * q_rs + static_cast<int64_t>(h) * D;
  const E* q = static_cast<const E*>(p.q) + q_base;
  const E* dout = static_cast<const E*>(p.dout) + q_base;
  const E* k = static_cast<const E*>(p.k) + s.k_off * k_rs + static_cast<int64_t>(hk) * D;
  const E* v = static_cast<const E*>(p.v) + s.k_off * k_rs + static_cast<int64_t>(hk) * D;
  E* sQ = reinterpret_cast<E*>(smem);
  E* sdO = sQ + Tr::template kTileElems<BM>;
  E* sK = sdO + Tr::template kTileElems<BM>;  // 2 stages
  E* sV = sK + 2 * Tr::template kTileElems<BN>;
  const int n_blocks = (s.k_len + BN - 1) / BN;

  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor acc_dq = partition_fragment_C(mma, Shape<Int<BM>, Int<D>>{});
  Tensor crd_dq = thr.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  Tensor acc_s = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});
  Tensor acc_s_rc = make_tensor(acc_s.data(), tc::acc_rowcol(acc_s.layout()));
  Tensor acc_dp = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});
  Tensor acc_dp_rc = make_tensor(acc_dp.data(), tc::acc_rowcol(acc_dp.layout()));
  Tensor crd_s = thr.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  Tensor crd_s_rc = make_tensor(crd_s.data(), tc::acc_rowcol(crd_s.layout()));
  constexpr int kRows = decltype(size<0>(acc_s_rc))::value;
  constexpr int kCols = decltype(size<1>(acc_s_rc))::value;

  // Rows past the sequence get lse = +inf: P = 0, so they add nothing (and are not stored).
  float lse2[kRows], dsum[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int r = get<0>(crd_s_rc(mi, 0));
    const int64_t idx = stat_index(p, b, h, s.q_off, row0 + r);
    lse2[mi] = r < q_rows ? p.lse_in[idx] * tc::kLog2e : INFINITY;
    dsum[mi] = r < q_rows ? p.dsum[idx] : 0.f;
  }
  const float scale_log2 = p.scale * tc::kLog2e;
  clear(acc_dq);

  load_tile<Tr, BM>(q, q_rs, q_rows, sQ, tid);
  load_tile<Tr, BM>(dout, q_rs, q_rows, sdO, tid);
  if (n_blocks > 0) load_kv<Tr, BN>(k, v, k_rs, 0, s.k_len, sK, sV, 0, tid);
  cp_async_fence();
  for (int n = 0; n < n_blocks; ++n) {
    const int st = n & 1;
    cp_async_wait<0>();  // as in fwd_body
    __syncthreads();
    if (n + 1 < n_blocks) load_kv<Tr, BN>(k, v, k_rs, n + 1, s.k_len, sK, sV, st ^ 1, tid);
    cp_async_fence();
    const E* sKs = sK + st * Tr::template kTileElems<BN>;
    clear(acc_s);
    gemm_ss<Tr, BM, BN>(sQ, sKs, acc_s, tid);
    clear(acc_dp);
    gemm_ss<Tr, BM, BN>(sdO, sV + st * Tr::template kTileElems<BN>, acc_dp, tid);
    const int cols_left = s.k_len - n * BN;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        const float pr =
            get<1>(crd_s_rc(mi, ni)) < cols_left ? exp2f(acc_s_rc(mi, ni) * scale_log2 - lse2[mi]) : 0.f;
        acc_dp_rc(mi, ni) = pr * (acc_dp_rc(mi, ni) - dsum[mi]);  // dS (without the softmax scale)
      }
    }
    Tensor rdS = to_element<E>(acc_dp);
    gemm_rs<Tr, BN>(make_tensor(rdS.data(), acc_as_a(rdS.layout())), sKs, acc_dq, tid);
  }
  cp_async_wait<0>();
  store_rows<E>(acc_dq, crd_dq, static_cast<E*>(p.dq) + q_base, q_rs, q_rows, p.scale);
}

// CTA (n_block, hk, b): dK, dV of keys [n_block * BN, +BN) of kv head hk, over every query row of every query head
// of the GQA group. The tiles are transposed (rows = keys, columns = query rows).
template <class Tr, int BN, int BM>
NVE_DEVICE void dkdv_body(const FlashParams& p, char* smem, int tid, int n_block, int hk, int b) {
  using namespace cute;
  using E = typename Tr::Element;
  constexpr int D = Tr::kHeadDim;
  const Seq s = seq_of(p, b);
  const int n0 = n_block * BN;
  if (n0 >= s.k_len) return;
  const int k_rows = std::min(BN, s.k_len - n0);
  const int group = p.heads_q / p.heads_kv;
  const int64_t q_rs = static_cast<int64_t>(p.heads_q) * D, k_rs = static_cast<int64_t>(p.heads_kv) * D;
  const int64_t k_base = (s.k_off + n0) * k_rs + static_cast<int64_t>(hk) * D;
  E* sK = reinterpret_cast<E*>(smem);
  E* sV = sK + Tr::template kTileElems<BN>;
  E* sQ = sV + Tr::template kTileElems<BN>;   // 2 stages
  E* sdO = sQ + 2 * Tr::template kTileElems<BM>;  // 2 stages
  float* sLse2 = reinterpret_cast<float*>(sdO + 2 * Tr::template kTileElems<BM>);  // [2][BM], log2 domain
  float* sDsum = sLse2 + 2 * BM;                                                    // [2][BM]
  const int m_blocks = (s.q_len + BM - 1) / BM;
  const int steps = group * m_blocks;

  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor acc_dk = partition_fragment_C(mma, Shape<Int<BN>, Int<D>>{});
  Tensor acc_dv = partition_fragment_C(mma, Shape<Int<BN>, Int<D>>{});
  Tensor crd_kv = thr.partition_C(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
  Tensor acc_s = partition_fragment_C(mma, Shape<Int<BN>, Int<BM>>{});
  Tensor acc_s_rc = make_tensor(acc_s.data(), tc::acc_rowcol(acc_s.layout()));
  Tensor acc_dp = partition_fragment_C(mma, Shape<Int<BN>, Int<BM>>{});
  Tensor acc_dp_rc = make_tensor(acc_dp.data(), tc::acc_rowcol(acc_dp.layout()));
  Tensor crd_s = thr.partition_C(make_identity_tensor(Shape<Int<BN>, Int<BM>>{}));
  Tensor crd_s_rc = make_tensor(crd_s.data(), tc::acc_rowcol(crd_s.layout()));
  constexpr int kRows = decltype(size<0>(acc_s_rc))::value;
  constexpr int kCols = decltype(size<1>(acc_s_rc))::value;

  // Step `it`: query block it % m_blocks of query head hk * group + it / m_blocks, into stage st. Columns past the
  // sequence get lse = +inf (P = 0) and dsum = 0.
  auto load_step = [&](int it, int st) {
    const int h = hk * group + it / m_blocks;
    const int m0 = (it % m_blocks) * BM, rows = std::min(BM, s.q_len - m0);
    const int64_t q_base = (s.q_off + m0) * q_rs + static_cast<int64_t>(h) * D;
    load_tile<Tr, BM>(static_cast<const E*>(p.q) + q_base, q_rs, rows, sQ + st * Tr::template kTileElems<BM>, tid);
    load_tile<Tr, BM>(static_cast<const E*>(p.dout) + q_base, q_rs, rows, sdO + st * Tr::template kTileElems<BM>,
                      tid);
    for (int i = tid; i < BM; i += Tr::kThreads) {
      const int64_t idx = stat_index(p, b, h, s.q_off, m0 + i);
      sLse2[st * BM + i] = i < rows ? p.lse_in[idx] * tc::kLog2e : INFINITY;
      sDsum[st * BM + i] = i < rows ? p.dsum[idx] : 0.f;
    }
  };

  clear(acc_dk);
  clear(acc_dv);
  const float scale_log2 = p.scale * tc::kLog2e;
  load_tile<Tr, BN>(static_cast<const E*>(p.k) + k_base, k_rs, k_rows, sK, tid);
  load_tile<Tr, BN>(static_cast<const E*>(p.v) + k_base, k_rs, k_rows, sV, tid);
  if (steps > 0) load_step(0, 0);
  cp_async_fence();
  for (int it = 0; it < steps; ++it) {
    const int st = it & 1;
    // Step it's tiles landed (cp.async) and its lse / dsum stores are visible after the barrier, which also retires
    // the reads of stage st ^ 1 (step it - 1) that the prefetch overwrites.
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < steps) load_step(it + 1, st ^ 1);
    cp_async_fence();
    const E* sQs = sQ + st * Tr::template kTileElems<BM>;
    const E* sdOs = sdO + st * Tr::template kTileElems<BM>;
    clear(acc_s);
    gemm_ss<Tr, BN, BM>(sK, sQs, acc_s, tid);  // S^T
    clear(acc_dp);
    gemm_ss<Tr, BN, BM>(sV, sdOs, acc_dp, tid);  // dP^T
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) {
      const int c = get<1>(crd_s_rc(0, ni));
      const float l2 = sLse2[st * BM + c], ds = sDsum[st * BM + c];
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        const float pr = exp2f(acc_s_rc(mi, ni) * scale_log2 - l2);
        acc_s_rc(mi, ni) = pr;
        acc_dp_rc(mi, ni) = pr * (acc_dp_rc(mi, ni) - ds);
      }
    }
    Tensor rP = to_element<E>(acc_s);
    gemm_rs<Tr, BM>(make_tensor(rP.data(), acc_as_a(rP.layout())), sdOs, acc_dv, tid);  // dV += P^T dO
    Tensor rdS = to_element<E>(acc_dp);
    gemm_rs<Tr, BM>(make_tensor(rdS.data(), acc_as_a(rdS.layout())), sQs, acc_dk, tid);  // dK += dS^T Q
  }
  cp_async_wait<0>();
  store_rows<E>(acc_dk, crd_kv, static_cast<E*>(p.dk) + k_base, k_rs, k_rows, p.scale);
  store_rows<E>(acc_dv, crd_kv, static_cast<E*>(p.dv) + k_base, k_rs, k_rows, 1.f);
}

// ---- grids ---------------------------------------------------------------------------------------------------------

struct Grid {
  int x, y, z;
};
constexpr int kDsumWarps = 8;

template <class C>
Grid fwd_grid(const FlashParams& p) {
  return {(p.seqlen_q + C::kFwdBM - 1) / C::kFwdBM, p.heads_q, p.batch};
}
template <class C>
Grid dq_grid(const FlashParams& p) {
  return {(p.seqlen_q + C::kDqBM - 1) / C::kDqBM, p.heads_q, p.batch};
}
template <class C>
Grid dkdv_grid(const FlashParams& p) {
  return {(p.seqlen_k + C::kDkvBN - 1) / C::kDkvBN, p.heads_kv, p.batch};
}
inline Grid dsum_grid(const FlashParams& p) {
  return {static_cast<int>((p.total_q + kDsumWarps - 1) / kDsumWarps), p.heads_q, 1};
}

}  // namespace nvembed::cuda::fa
