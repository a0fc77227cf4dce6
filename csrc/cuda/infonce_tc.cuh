// Tensor-core InfoNCE (bf16 / fp16 inputs, fp32 accumulation, in-batch negatives): the kernel bodies, the work
// plan and the launch sequences, written over CuTe so that one source serves two builds:
//   * infonce_tc.cu instantiates them with the sm80 atoms (cp.async, ldmatrix, mma.sync m16n8k16) for the GPU;
//   * tools/infonce_emu runs the same bodies on the CPU, one std::thread per CUDA thread, with logically equivalent
//     atoms (plain copies; a warp-collective emulation of mma.sync that uses CuTe's own fragment layouts), to check
//     the index math, predicates, pipelines' stage indexing and epilogues without a GPU.
// The bodies therefore take their thread / block indices as arguments and use only __syncthreads() and
// __shfl_xor_sync() from the CUDA runtime.
//
// Logits S = Q D^T / t are produced one 128 x 128 tile at a time and never stored in global memory.
//
// Forward (fwd_tile_body): a CTA owns 128 query rows and one range of doc tiles (split-N: with few query blocks the
//   range is split so that the GPU is full; with d large it is also split so that the CTAs resident at once share
//   few query blocks, which then stay in L2 - see make_tc_plan). For each doc tile the score mainloop streams 64-wide
//   k-chunks of the query block and of the doc tile through a 3-stage cp.async pipeline into swizzled shared memory
//   (ldmatrix-conflict-free), ldmatrix -> mma.sync. The query block is re-read from L2 for every doc tile: at
//   d = 4096 it is 1 MB and cannot stay in shared memory; that is the same traffic as a plain GEMM with a
//   128 x 128 CTA tile (64 flop per byte). Each thread keeps a running (max, sum) for each of its 4 rows over its
//   own columns only, so a tile costs no cross-thread reduction; the 8 threads that share a row merge their
//   (max, sum) once at the end (quad shuffles, then shared memory across the two warps of a row). The target logit
//   is written by the one thread that meets column i*G. A small kernel combines the per-split (max, sum) into lse
//   and the row loss.
//
// Backward: dS = (P - onehot) * g / (B t), P = exp(S - lse). As on the CPU the target column is left out of the
//   tiles and its coefficient formed at the end as -(sum of the row's other probabilities): accurate when P_t is
//   close to 1. Two passes of the same kernel (bwd_side_body): the dQ pass, whose CTAs own query rows and loop
//   over docs, and the dDocs pass, whose CTAs own doc rows and loop over queries, each recomputing S (2 extra
//   forward GEMMs, as FlashAttention's backward does), so every gradient row has one owner and no atomics are
//   needed. The owned rows' gradient (128 x d fp32, 2 MB at d = 4096) fits neither registers nor shared memory, so
//   the loop is two-level: for each super-tile of 256 other-side rows the CTA computes the two 128 x 128 tiles of
//   exp(S - lse) (bf16 / fp16, in shared memory, 64 KB), then walks d in 128-column chunks: acc[128 x 128] =
//   P~[128 x 256] . Y[256 x 128-chunk] through the same kind of pipeline (ldmatrix.trans for Y), added into a
//   fp32 scratch row block owned by the CTA. Cost of the two-level loop: the scratch is read and written once per
//   super-tile, 8 bytes per owned element per 256 other rows, i.e. 128 flop per byte of scratch traffic; a larger
//   super-tile would need more shared memory than an A100 has next to the pipeline (see kNS). A reduce kernel
//   sums the splits' scratch rows, applies g / (B t) and the target terms and writes the gradient in the input
//   dtype: no fp32 [N, d] buffer (the scratch is bounded by make_tc_plan, ~1 wave of CTAs x 128 x d).
//   For fp16, P~ is stored times 2^15: softmax values ~1/N (N up to 5e5) would otherwise be fp16 subnormals.
#pragma once

#include <cute/tensor.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/cute_common.cuh"
#include "cuda/infonce.cuh"


namespace nvembed::cuda::tc {

// ---- tile configuration (one for both dtypes: few instantiations, short CI compiles) -----------------------------

struct TileConfig {
  static constexpr int kThreads = 256;
  static constexpr int kWarpsM = 4;  // warps along the owned rows of a tile
  static constexpr int kWarpsN = 2;  // warps along the other side: two warps (8 threads) share each row
  static constexpr int kBM = 128;    // owned rows per CTA (query rows in the forward)
  static constexpr int kBN = 128;    // other-side rows per score tile
  static constexpr int kBK = 64;     // d columns per pipeline stage of the score mainloop (128 B rows: 128B swizzle)
  static constexpr int kStages = 3;  // cp.async pipeline depth
  // Backward: other-side rows whose probabilities are held in shared memory at once. 256 keeps the backward CTA at
  // 161 KB of shared memory (A100's opt-in limit is 163 KB) while halving the scratch traffic of 128.
  static constexpr int kNS = 256;
  static constexpr int kBD = 128;   // gradient columns per accumulator tile in the backward
  static constexpr int kBKo = 64;   // other-side rows per pipeline stage of the backward's gradient GEMM
  static constexpr int kVec = 8;    // elements per 16-byte cp.async: rows must be 16-byte aligned, d % 8 == 0

  static_assert(kThreads == 32 * kWarpsM * kWarpsN);
  static_assert(kBM % (16 * kWarpsM) == 0 && kBN % (16 * kWarpsN) == 0 && kBD % (16 * kWarpsN) == 0);
  static_assert(kBK % 16 == 0 && kBKo % 16 == 0 && kBK == 64 && kBKo == 64, "the 8 x 64 swizzle atom");
  static_assert(kNS % kBN == 0 && kBN % kBKo == 0 && kBD % 64 == 0);
  static_assert((kBM * kBK / kVec) % kThreads == 0 && (kBKo * kBD / kVec) % kThreads == 0);
};

template <class Element_, class Atoms = Sm80Atoms<Element_>>
struct Traits : TileConfig {
  using Element = Element_;
  static_assert(std::is_same_v<Element, cute::half_t> || std::is_same_v<Element, cute::bfloat16_t>);

  // 4 x 2 warps, each 32 x 64 of a 128 x 128 tile (accumulator: 64 fp32 per thread). The 16-wide N step per warp
  // lets one ldmatrix.x4 feed two n8 atoms.
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<typename Atoms::Mma>,
                                  cute::Layout<cute::Shape<cute::Int<kWarpsM>, cute::Int<kWarpsN>, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kWarpsM>, cute::Int<16 * kWarpsN>, cute::_16>>;

  // Rows of 64 elements (128 B) with the 128B XOR swizzle: ldmatrix reads 8 rows x 16 B without bank conflicts and
  // the 16-byte cp.async writes stay contiguous.
  using SmemAtom = decltype(cute::composition(
      cute::Swizzle<3, 3, 3>{}, cute::Layout<cute::Shape<cute::_8, cute::_64>, cute::Stride<cute::_64, cute::_1>>{}));
  using SmemLayoutX = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBM>, cute::Int<kBK>, cute::Int<kStages>>{}));  // owned rows x k x stage
  using SmemLayoutY = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBN>, cute::Int<kBK>, cute::Int<kStages>>{}));  // other rows x k x stage
  using SmemLayoutP = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBM>, cute::Int<kNS>>{}));  // P~: owned rows x other rows (K-major A)
  using SmemLayoutYo = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBKo>, cute::Int<kBD>, cute::Int<kStages>>{}));  // other rows x d x stage
  // The same bytes as the gradient GEMM's B operand (n = d column, k = other row): (n, k, s) -> Yo(k, n, s).
  using SmemLayoutYoT = decltype(cute::composition(
      SmemLayoutYo{}, cute::Layout<cute::Shape<cute::Int<kBD>, cute::Int<kBKo>, cute::Int<kStages>>,
                                   cute::Stride<cute::Int<kBKo>, cute::_1, cute::Int<kBKo * kBD>>>{}));
  using SmemLayoutYoTNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutYoT{}));

  // 16-byte copies, 8 threads per 64-element row: a [32 x 64] block per pass.
  using GmemCopy = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<typename Atoms::G2S, Element>{},
      cute::Layout<cute::Shape<cute::Int<kThreads / 8>, cute::_8>, cute::Stride<cute::_8, cute::_1>>{},
      cute::Layout<cute::Shape<cute::_1, cute::Int<kVec>>>{}));
  using S2RAtom = cute::Copy_Atom<typename Atoms::S2R, Element>;
  using S2RAtomTrans = cute::Copy_Atom<typename Atoms::S2RTrans, Element>;

  // fp16 P~ is stored times 2^15 (max 32768 < 65504): probabilities down to ~1e-9 stay normal numbers.
  static constexpr float kPScale = std::is_same_v<Element, cute::half_t> ? 32768.f : 1.f;

  // Shared memory, in bytes. Forward: the score pipeline + the row merge. Backward: the score pipeline (reused by
  // the gradient GEMM's pipeline, the two never overlap) + P~ + the row merge.
  static constexpr int kSmemX = cute::cosize_v<SmemLayoutX> * sizeof(Element);
  static constexpr int kSmemY = cute::cosize_v<SmemLayoutY> * sizeof(Element);
  static constexpr int kSmemYo = cute::cosize_v<SmemLayoutYo> * sizeof(Element);
  static constexpr int kSmemP = cute::cosize_v<SmemLayoutP> * sizeof(Element);
  static constexpr int kSmemPipe = std::max(kSmemX + kSmemY, kSmemYo);
  static constexpr int kSmemRed = 2 * kWarpsN * kBM * sizeof(float);
  static constexpr int kSmemFwd = kSmemX + kSmemY + kSmemRed;
  static constexpr int kSmemBwd = kSmemPipe + kSmemP + kSmemRed;
  static_assert(kSmemX % 128 == 0 && kSmemY % 128 == 0 && kSmemPipe % 128 == 0 && kSmemP % 128 == 0);
};

// ---- score tile: acc[BM x BN] = X[0:x_rows, 0:d] . Y[0:y_rows, 0:d]^T ---------------------------------------------
// x / y point at the first row of the block; rows >= x_rows / y_rows and columns >= d are read as zeros.
// On return every thread has finished with smem_x / smem_y and no copy into them is in flight.
template <class Tr, class Acc>
NVE_DEVICE void score_tile(const typename Tr::Element* x, int x_rows, const typename Tr::Element* y, int y_rows,
                           int d, typename Tr::Element* smem_x, typename Tr::Element* smem_y, Acc& acc, int tid) {
  using namespace cute;
  constexpr int BM = Tr::kBM, BN = Tr::kBN, BK = Tr::kBK, S = Tr::kStages;

  Tensor gX = local_tile(make_tensor(make_gmem_ptr(x), make_shape(Int<BM>{}, d), make_stride(d, _1{})),
                         Shape<Int<BM>, Int<BK>>{}, make_coord(0, _));  // (BM, BK, nk)
  Tensor gY = local_tile(make_tensor(make_gmem_ptr(y), make_shape(Int<BN>{}, d), make_stride(d, _1{})),
                         Shape<Int<BN>, Int<BK>>{}, make_coord(0, _));  // (BN, BK, nk)
  Tensor sX = make_tensor(make_smem_ptr(smem_x), typename Tr::SmemLayoutX{});  // (BM, BK, S)
  Tensor sY = make_tensor(make_smem_ptr(smem_y), typename Tr::SmemLayoutY{});  // (BN, BK, S)

  typename Tr::GmemCopy gcopy;
  auto gthr = gcopy.get_thread_slice(tid);
  Tensor tXg = gthr.partition_S(gX);  // (CPY, CPY_M, CPY_K, nk)
  Tensor tXs = gthr.partition_D(sX);  // (CPY, CPY_M, CPY_K, S)
  Tensor tXc = gthr.partition_S(make_identity_tensor(Shape<Int<BM>, Int<BK>>{}));
  Tensor tYg = gthr.partition_S(gY);
  Tensor tYs = gthr.partition_D(sY);
  Tensor tYc = gthr.partition_S(make_identity_tensor(Shape<Int<BN>, Int<BK>>{}));

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tCrX = thr_mma.partition_fragment_A(sX(_, _, 0));  // (MMA, MMA_M, MMA_K)
  Tensor tCrY = thr_mma.partition_fragment_B(sY(_, _, 0));  // (MMA, MMA_N, MMA_K)
  auto s2r_x = make_tiled_copy_A(typename Tr::S2RAtom{}, mma);
  auto s2r_x_thr = s2r_x.get_thread_slice(tid);
  Tensor tCsX = s2r_x_thr.partition_S(sX);  // (CPY, MMA_M, MMA_K, S)
  Tensor tCrX_view = s2r_x_thr.retile_D(tCrX);
  auto s2r_y = make_tiled_copy_B(typename Tr::S2RAtom{}, mma);
  auto s2r_y_thr = s2r_y.get_thread_slice(tid);
  Tensor tCsY = s2r_y_thr.partition_S(sY);  // (CPY, MMA_N, MMA_K, S)
  Tensor tCrY_view = s2r_y_thr.retile_D(tCrY);
  CUTE_STATIC_ASSERT_V(size<1>(tCrX) == size<1>(acc) && size<1>(tCrY) == size<2>(acc));
  CUTE_STATIC_ASSERT_V(size<2>(tCrX) == Int<BK / 16>{} && size<2>(tCrY) == Int<BK / 16>{});

  const int nk = (d + BK - 1) / BK;
  auto load = [&](int kt, int stage) {
    const int k_left = d - kt * BK;
    copy_or_zero(gcopy, tXg(_, _, _, kt), tXs(_, _, _, stage), tXc, x_rows, k_left);
    copy_or_zero(gcopy, tYg(_, _, _, kt), tYs(_, _, _, stage), tYc, y_rows, k_left);
  };

  // Group g of cp.async loads k-tile g (empty groups past the end keep the wait count uniform).
  CUTE_UNROLL
  for (int s = 0; s < S - 1; ++s) {
    if (s < nk) load(s, s);
    cp_async_fence();
  }
  clear(acc);
  for (int kt = 0; kt < nk; ++kt) {
    // Groups 0..kt are complete (at most S - 2 younger ones pending): k-tile kt has landed for this thread, and
    // after the barrier for all threads; the barrier also retires every thread's reads of stage (kt - 1) % S,
    // which the load below overwrites.
    cp_async_wait<S - 2>();
    __syncthreads();
    if (kt + S - 1 < nk) load(kt + S - 1, (kt + S - 1) % S);
    cp_async_fence();
    const int stage = kt % S;
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tCrX); ++kb) {
      copy(s2r_x, tCsX(_, _, kb, stage), tCrX_view(_, _, kb));
      copy(s2r_y, tCsY(_, _, kb, stage), tCrY_view(_, _, kb));
      gemm(mma, tCrX(_, _, kb), tCrY(_, _, kb), acc);
    }
  }
  // The groups still pending are the empty ones; the barrier retires the reads of the last stages.
  __syncthreads();
}

// ---- backward gradient tile: acc[BM x BD] = P~[:, 0:kc_count*BKo] . Y[0:kc_count*BKo, col0 : col0 + BD] ------------
// y points at the super-tile's first other-side row; rows >= y_rows and columns >= d read as zeros. P~ must be
// complete in smem_p (the caller's barrier) for columns < kc_count * BKo. Same exit guarantee as score_tile.
template <class Tr, class Acc>
NVE_DEVICE void grad_tile(const typename Tr::Element* y, int y_rows, int d, int col0, int kc_count,
                          const typename Tr::Element* smem_p, typename Tr::Element* smem_yo, Acc& acc, int tid) {
  using namespace cute;
  constexpr int BM = Tr::kBM, BD = Tr::kBD, BKo = Tr::kBKo, NS = Tr::kNS, S = Tr::kStages;

  Tensor gYo = local_tile(
      make_tensor(make_gmem_ptr(y + col0), make_shape(Int<NS>{}, Int<BD>{}), make_stride(d, _1{})),
      Shape<Int<BKo>, Int<BD>>{}, make_coord(_, 0));  // (BKo, BD, NS / BKo)
  Tensor sYo = make_tensor(make_smem_ptr(smem_yo), typename Tr::SmemLayoutYo{});           // (BKo, BD, S)
  Tensor sYoT = make_tensor(make_smem_ptr(smem_yo), typename Tr::SmemLayoutYoT{});         // (BD, BKo, S)
  Tensor sYoTNoSw = make_tensor(make_smem_ptr(smem_yo), typename Tr::SmemLayoutYoTNoSwizzle{});
  Tensor sP = make_tensor(make_smem_ptr(smem_p), typename Tr::SmemLayoutP{});               // (BM, NS)
  Tensor sPk = local_tile(sP, Shape<Int<BM>, Int<BKo>>{}, make_coord(0, _));               // (BM, BKo, NS / BKo)

  typename Tr::GmemCopy gcopy;
  auto gthr = gcopy.get_thread_slice(tid);
  Tensor tYg = gthr.partition_S(gYo);  // (CPY, CPY_K, CPY_N, NS / BKo)
  Tensor tYs = gthr.partition_D(sYo);  // (CPY, CPY_K, CPY_N, S)
  Tensor tYc = gthr.partition_S(make_identity_tensor(Shape<Int<BKo>, Int<BD>>{}));

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tOrP = thr_mma.partition_fragment_A(sPk(_, _, 0));         // (MMA, MMA_M, MMA_K)
  Tensor tOrY = thr_mma.partition_fragment_B(sYoTNoSw(_, _, 0));    // (MMA, MMA_N, MMA_K)
  auto s2r_p = make_tiled_copy_A(typename Tr::S2RAtom{}, mma);
  auto s2r_p_thr = s2r_p.get_thread_slice(tid);
  Tensor tOsP = s2r_p_thr.partition_S(sPk);  // (CPY, MMA_M, MMA_K, NS / BKo)
  Tensor tOrP_view = s2r_p_thr.retile_D(tOrP);
  auto s2r_y = make_tiled_copy_B(typename Tr::S2RAtomTrans{}, mma);
  auto s2r_y_thr = s2r_y.get_thread_slice(tid);
  Tensor tOsY = s2r_y_thr.partition_S(sYoT);  // (CPY, MMA_N, MMA_K, S)
  Tensor tOrY_view = s2r_y_thr.retile_D(tOrY);
  CUTE_STATIC_ASSERT_V(size<1>(tOrP) == size<1>(acc) && size<1>(tOrY) == size<2>(acc));
  CUTE_STATIC_ASSERT_V(size<2>(tOrP) == Int<BKo / 16>{} && size<2>(tOrY) == Int<BKo / 16>{});

  const int d_left = d - col0;
  auto load = [&](int kc, int stage) {
    copy_or_zero(gcopy, tYg(_, _, _, kc), tYs(_, _, _, stage), tYc, y_rows - kc * BKo, d_left);
  };
  CUTE_UNROLL
  for (int s = 0; s < S - 1; ++s) {
    if (s < kc_count) load(s, s);
    cp_async_fence();
  }
  clear(acc);
  for (int kc = 0; kc < kc_count; ++kc) {
    cp_async_wait<S - 2>();  // as in score_tile
    __syncthreads();
    if (kc + S - 1 < kc_count) load(kc + S - 1, (kc + S - 1) % S);
    cp_async_fence();
    const int stage = kc % S;
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tOrP); ++kb) {
      copy(s2r_p, tOsP(_, _, kb, kc), tOrP_view(_, _, kb));
      copy(s2r_y, tOsY(_, _, kb, stage), tOrY_view(_, _, kb));
      gemm(mma, tOrP(_, _, kb), tOrY(_, _, kb), acc);
    }
  }
  __syncthreads();
}

// ---- kernel arguments ----------------------------------------------------------------------------------------------

struct FwdArgs {
  int splits;
  float* part_max;  // [splits, B]
  float* part_sum;  // [splits, B]
  float* target;    // [B]
};

struct SideArgs {
  int splits;
  int64_t chunk_row0;  // first owned row of this launch
  int64_t chunk_rows;  // scratch rows per split (the launch's blocks * kBM)
  float* scratch;      // [splits, chunk_rows, d]
  float* part_negsum;  // [splits, B], dQ pass only: sum over the split's docs of exp(S - lse), target excluded
};

// ---- forward ---------------------------------------------------------------------------------------------------

// One score tile's part of the forward, on this thread's accumulator slots (acc_rc / crd_rc: (row slot, column slot)
// views, rows relative to row0, columns to col0): scale by 1 / t, mask columns >= y_rows, write the target logit of
// a row whose target column this thread holds, and fold the tile into the running (max, sum) of each row slot over
// this thread's columns. Shared by the sm80 (fwd_tile_body) and the Hopper (infonce_sm90.cuh) forward.
template <int kRows, class AccRC, class CrdRC>
NVE_DEVICE void tile_row_stats(const InfoNCEParams& p, const FwdArgs& a, AccRC& acc_rc, CrdRC const& crd_rc,
                               int64_t row0, int64_t col0, int y_rows, float (&run_max)[kRows],
                               float (&run_sum)[kRows]) {
  using namespace cute;
  constexpr int kCols = decltype(size<1>(acc_rc))::value;
  static_assert(decltype(size<0>(acc_rc))::value == kRows);
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int64_t row = row0 + get<0>(crd_rc(mi, 0));
    float tile_max = -INFINITY;
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) {
      const int c = get<1>(crd_rc(mi, ni));
      const float s = c < y_rows ? acc_rc(mi, ni) * p.inv_temperature : -INFINITY;
      acc_rc(mi, ni) = s;
      tile_max = fmaxf(tile_max, s);
      if (col0 + c == row * p.G && row < p.B) a.target[row] = s;  // one thread of one CTA meets it
    }
    if (tile_max == -INFINITY) continue;  // no valid column of this row in this thread's part of the tile
    const float new_max = fmaxf(run_max[mi], tile_max);
    float sum = 0.f;
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) sum += exp2f((acc_rc(mi, ni) - new_max) * kLog2e);  // -inf -> 0
    run_sum[mi] = run_sum[mi] * exp2f((run_max[mi] - new_max) * kLog2e) + sum;
    run_max[mi] = new_max;
  }
}

// CTA (split, qblock): partial (max, sum) of query rows [qblock * BM, +BM) over doc tiles of the split's range.
template <class Tr>
NVE_DEVICE void fwd_tile_body(const InfoNCEParams& p, const FwdArgs& a, char* smem, int tid, int split,
                              int qblock) {
  using namespace cute;
  using E = typename Tr::Element;
  constexpr int BM = Tr::kBM, BN = Tr::kBN;
  const E* q = static_cast<const E*>(p.queries);
  const E* docs = static_cast<const E*>(p.docs);
  const int d = static_cast<int>(p.d);
  E* smem_x = reinterpret_cast<E*>(smem);
  E* smem_y = reinterpret_cast<E*>(smem + Tr::kSmemX);
  float* red_max = reinterpret_cast<float*>(smem + Tr::kSmemX + Tr::kSmemY);  // [kWarpsN][BM]
  float* red_sum = red_max + Tr::kWarpsN * BM;

  const int64_t row0 = static_cast<int64_t>(qblock) * BM;
  const int x_rows = static_cast<int>(std::min<int64_t>(BM, p.B - row0));
  const int64_t tiles = (p.N + BN - 1) / BN;
  const int64_t t_begin = tiles * split / a.splits, t_end = tiles * (split + 1) / a.splits;

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor acc = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});  // (MMA, MMA_M, MMA_N) fp32
  Tensor acc_rc = make_tensor(acc.data(), acc_rowcol(acc.layout()));  // (row slot, column slot)
  Tensor crd = thr_mma.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  Tensor crd_rc = make_tensor(crd.data(), acc_rowcol(crd.layout()));  // (row, column) within the tile
  constexpr int kRows = decltype(size<0>(acc_rc))::value;

  float run_max[kRows], run_sum[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    run_max[mi] = -INFINITY;
    run_sum[mi] = 0.f;
  }
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t col0 = t * BN;
    const int y_rows = static_cast<int>(std::min<int64_t>(BN, p.N - col0));
    score_tile<Tr>(q + row0 * p.d, x_rows, docs + col0 * p.d, y_rows, d, smem_x, smem_y, acc, tid);
    tile_row_stats(p, a, acc_rc, crd_rc, row0, col0, y_rows, run_max, run_sum);
  }

  // Merge the 8 partial (max, sum) of each row: the 4 lanes of a quad (same rows, xor 1 and 2), then the
  // kWarpsN warps at the same M position through shared memory.
  const int warp = tid / 32, lane = tid % 32, warp_n = warp / Tr::kWarpsM;
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    CUTE_UNROLL
    for (int o = 1; o <= 2; o <<= 1) {
      const float m2 = shfl_xor(run_max[mi], o), s2 = shfl_xor(run_sum[mi], o);
      lse_merge(run_max[mi], run_sum[mi], m2, s2);
    }
    if (lane % 4 == 0) {
      const int r = get<0>(crd_rc(mi, 0));
      red_max[warp_n * BM + r] = run_max[mi];
      red_sum[warp_n * BM + r] = run_sum[mi];
    }
  }
  __syncthreads();
  if (tid < BM && row0 + tid < p.B) {
    float m = red_max[tid], s = red_sum[tid];
    CUTE_UNROLL
    for (int w = 1; w < Tr::kWarpsN; ++w) lse_merge(m, s, red_max[w * BM + tid], red_sum[w * BM + tid]);
    a.part_max[split * p.B + row0 + tid] = m;  // finite: the range holds >= 1 valid column
    a.part_sum[split * p.B + row0 + tid] = s;
  }
}

// Thread per query row: lse and the row loss from the splits' partials.
NVE_DEVICE void fwd_combine_body(const InfoNCEParams& p, const FwdArgs& a, int64_t row) {
  if (row >= p.B) return;
  float m = -INFINITY, s = 0.f;
  for (int k = 0; k < a.splits; ++k) lse_merge(m, s, a.part_max[k * p.B + row], a.part_sum[k * p.B + row]);
  const float log_sum = logf(s);
  p.lse[row] = m + log_sum;
  p.row_loss[row] = (m - a.target[row]) + log_sum;  // see infonce.cu: keeps a small loss accurate
}

// ---- backward ----------------------------------------------------------------------------------------------------

// CTA (split, block): owned rows [chunk_row0 + block * BM, +BM) (queries if kOwnQueries, else docs) against the
// split's range of other-side super-tiles; writes its scratch row block (fp32, unscaled: sum_j exp(S - lse) y_j,
// times kPScale) and, for the dQ pass, the rows' sums of exp(S - lse) over the range.
template <class Tr, bool kOwnQueries>
NVE_DEVICE void bwd_side_body(const InfoNCEParams& p, const SideArgs& a, char* smem, int tid, int split,
                              int block) {
  using namespace cute;
  using E = typename Tr::Element;
  constexpr int BM = Tr::kBM, BN = Tr::kBN, NS = Tr::kNS, BD = Tr::kBD, BKo = Tr::kBKo;
  const E* own = static_cast<const E*>(kOwnQueries ? p.queries : p.docs);
  const E* other = static_cast<const E*>(kOwnQueries ? p.docs : p.queries);
  const int64_t own_count = kOwnQueries ? p.B : p.N, other_count = kOwnQueries ? p.N : p.B;
  const int d = static_cast<int>(p.d);
  E* smem_x = reinterpret_cast<E*>(smem);
  E* smem_y = reinterpret_cast<E*>(smem + Tr::kSmemX);
  E* smem_yo = reinterpret_cast<E*>(smem);  // the gradient GEMM's pipeline reuses the score pipeline's bytes
  E* smem_p = reinterpret_cast<E*>(smem + Tr::kSmemPipe);
  float* red = reinterpret_cast<float*>(smem + Tr::kSmemPipe + Tr::kSmemP);  // [kWarpsN][BM]

  const int64_t row0 = a.chunk_row0 + static_cast<int64_t>(block) * BM;
  if (row0 >= own_count) return;  // uniform over the CTA, before any barrier
  const int x_rows = static_cast<int>(std::min<int64_t>(BM, own_count - row0));
  const int64_t supertiles = (other_count + NS - 1) / NS;
  const int64_t st_begin = supertiles * split / a.splits, st_end = supertiles * (split + 1) / a.splits;
  float* scratch = a.scratch + (split * a.chunk_rows + (row0 - a.chunk_row0)) * p.d;

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor acc = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});
  Tensor acc_rc = make_tensor(acc.data(), acc_rowcol(acc.layout()));
  Tensor crd = thr_mma.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  Tensor crd_rc = make_tensor(crd.data(), acc_rowcol(crd.layout()));
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<BM>, Int<BD>>{});
  Tensor acc_o_rc = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
  Tensor crd_o = thr_mma.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BD>>{}));
  Tensor crd_o_rc = make_tensor(crd_o.data(), acc_rowcol(crd_o.layout()));
  Tensor sP = make_tensor(make_smem_ptr(smem_p), typename Tr::SmemLayoutP{});
  constexpr int kRows = decltype(size<0>(acc_rc))::value;
  constexpr int kCols = decltype(size<1>(acc_rc))::value;
  constexpr int kRowsO = decltype(size<0>(acc_o_rc))::value;
  constexpr int kColsO = decltype(size<1>(acc_o_rc))::value;
  static_assert(kColsO % 2 == 0);

  const float k2 = p.inv_temperature * kLog2e;  // exp(S - lse) = exp2(acc * k2 - lse * log2 e)
  float lse2_row[kRows], negsum[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int64_t row = row0 + get<0>(crd_rc(mi, 0));
    lse2_row[mi] = (kOwnQueries && row < p.B) ? p.lse_in[row] * kLog2e : 0.f;
    negsum[mi] = 0.f;
  }

  if (st_begin == st_end) {  // cannot happen with make_tc_plan (splits <= super-tiles); keep the scratch defined
    for (int64_t e = tid; e < static_cast<int64_t>(x_rows) * p.d; e += Tr::kThreads) scratch[e] = 0.f;
  }
  for (int64_t st = st_begin; st < st_end; ++st) {
    const int64_t c_base = st * NS;
    const int64_t st_rows = std::min<int64_t>(NS, other_count - c_base);
    // 1. P~ for the super-tile's sub-tiles that hold valid rows (the gradient GEMM reads only those).
    for (int sub = 0; sub * BN < st_rows; ++sub) {
      const int64_t col0 = c_base + sub * BN;
      const int y_rows = static_cast<int>(std::min<int64_t>(BN, other_count - col0));
      score_tile<Tr>(own + row0 * p.d, x_rows, other + col0 * p.d, y_rows, d, smem_x, smem_y, acc, tid);
      float lse2_col[kCols];
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        const int64_t c = col0 + get<1>(crd_rc(0, ni));
        lse2_col[ni] = (!kOwnQueries && c < p.B) ? p.lse_in[c] * kLog2e : 0.f;
      }
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        CUTE_UNROLL
        for (int ni = 0; ni < kCols; ++ni) {
          const int r = get<0>(crd_rc(mi, ni)), c = get<1>(crd_rc(mi, ni));
          const int64_t own_row = row0 + r, other_row = col0 + c;
          const int64_t qi = kOwnQueries ? own_row : other_row, dj = kOwnQueries ? other_row : own_row;
          const bool keep = r < x_rows && c < y_rows && dj != qi * p.G;
          const float e = keep ? exp2f(acc_rc(mi, ni) * k2 - (kOwnQueries ? lse2_row[mi] : lse2_col[ni])) : 0.f;
          if constexpr (kOwnQueries) negsum[mi] += e;
          sP(r, sub * BN + c) = static_cast<E>(e * Tr::kPScale);
        }
      }
    }
    __syncthreads();  // P~ complete before any warp reads it
    // 2. scratch[:, dc] (+)= P~ . Y_super-tile[:, dc] for every 128-column chunk of d.
    const int kc_count = static_cast<int>((st_rows + BKo - 1) / BKo);
    const int y_rows = static_cast<int>(st_rows);
    for (int col0 = 0; col0 < d; col0 += BD) {
      grad_tile<Tr>(other + c_base * p.d, y_rows, d, col0, kc_count, smem_p, smem_yo, acc_o, tid);
      // All of the chunk's scratch values are loaded first, then added and stored: one memory round trip per chunk.
      // Read-modify-writes one after another (a load cannot pass the store before it) kept each CTA waiting on 32
      // serialized round trips per chunk, ~95% of the backward's time on an H200 (bench/gpu_profile_infonce.py,
      // 2026-11-26). Loading them before the GEMM instead would hide even that one, but spills at 255 registers.
      float2 old[kRowsO][kColsO / 2];
      CUTE_UNROLL
      for (int mi = 0; mi < kRowsO; ++mi) {
        const int r = get<0>(crd_o_rc(mi, 0));
        CUTE_UNROLL
        for (int ni = 0; ni < kColsO; ni += 2) {
          const int c = get<1>(crd_o_rc(mi, ni));  // even; c + 1 is slot ni + 1 (value bit 0); d is even
          old[mi][ni / 2] = (st != st_begin && r < x_rows && col0 + c < d)
                                ? __ldcg(reinterpret_cast<const float2*>(scratch + static_cast<int64_t>(r) * p.d +
                                                                         col0 + c))
                                : make_float2(0.f, 0.f);
        }
      }
      CUTE_UNROLL
      for (int mi = 0; mi < kRowsO; ++mi) {
        const int r = get<0>(crd_o_rc(mi, 0));
        if (r >= x_rows) continue;
        float* out_row = scratch + static_cast<int64_t>(r) * p.d + col0;
        CUTE_UNROLL
        for (int ni = 0; ni < kColsO; ni += 2) {
          const int c = get<1>(crd_o_rc(mi, ni));
          if (col0 + c >= d) continue;
          __stcg(reinterpret_cast<float2*>(out_row + c), make_float2(acc_o_rc(mi, ni) + old[mi][ni / 2].x,
                                                                     acc_o_rc(mi, ni + 1) + old[mi][ni / 2].y));
        }
      }
    }
    // grad_tile ended with a barrier: P~ may be rewritten by the next super-tile.
  }

  if constexpr (kOwnQueries) {
    const int warp = tid / 32, lane = tid % 32, warp_n = warp / Tr::kWarpsM;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      float s = negsum[mi];
      s += shfl_xor(s, 1);
      s += shfl_xor(s, 2);
      if (lane % 4 == 0) red[warp_n * BM + get<0>(crd_rc(mi, 0))] = s;
    }
    __syncthreads();
    if (tid < x_rows) {
      float s = red[tid];
      CUTE_UNROLL
      for (int w = 1; w < Tr::kWarpsN; ++w) s += red[w * BM + tid];
      a.part_negsum[split * p.B + row0 + tid] = s;
    }
  }
}

// Warp per owned row: gradient row = g / (B t) * (sum over splits of scratch / kPScale - negsum * target side),
// in the input dtype. The dQ pass also publishes each query's negsum (summed over its splits) for the dDocs pass.
template <class Tr, bool kOwnQueries>
NVE_DEVICE void bwd_reduce_body(const InfoNCEParams& p, const SideArgs& a, int64_t row, int lane) {
  using E = typename Tr::Element;
  struct alignas(4 * sizeof(E)) E4 { E v[4]; };
  const int64_t own_count = kOwnQueries ? p.B : p.N;
  if (row >= own_count || row >= a.chunk_row0 + a.chunk_rows) return;  // uniform over the warp
  const float scale = *p.grad_loss * p.inv_batch_temperature;
  float negsum = 0.f;
  const E* partner = nullptr;  // the row whose target term this gradient row gets
  if constexpr (kOwnQueries) {
    for (int k = 0; k < a.splits; ++k) negsum += a.part_negsum[k * p.B + row];
    if (lane == 0) p.neg_prob_sum[row] = negsum;
    partner = static_cast<const E*>(p.docs) + row * p.G * p.d;
  } else if (row % p.G == 0 && row / p.G < p.B) {  // docs[i*G] is query i's positive; extra negatives have none
    negsum = p.neg_prob_sum[row / p.G];
    partner = static_cast<const E*>(p.queries) + (row / p.G) * p.d;
  }
  const float inv_pscale = 1.f / Tr::kPScale;
  const float* src = a.scratch + (row - a.chunk_row0) * p.d;
  const int64_t split_stride = a.chunk_rows * p.d;
  E* out = static_cast<E*>(kOwnQueries ? p.grad_queries_out : p.grad_docs_out) + row * p.d;
  for (int64_t k = 4 * lane; k < p.d; k += 128) {  // d % 8 == 0: whole float4 / 4-element vectors
    float4 acc = *reinterpret_cast<const float4*>(src + k);
    for (int sp = 1; sp < a.splits; ++sp) {
      const float4 v = *reinterpret_cast<const float4*>(src + sp * split_stride + k);
      acc.x += v.x;
      acc.y += v.y;
      acc.z += v.z;
      acc.w += v.w;
    }
    float r[4] = {acc.x * inv_pscale, acc.y * inv_pscale, acc.z * inv_pscale, acc.w * inv_pscale};
    if (partner != nullptr) {
      const E4 t = *reinterpret_cast<const E4*>(partner + k);
      for (int i = 0; i < 4; ++i) r[i] -= negsum * static_cast<float>(t.v[i]);
    }
    E4 o;
    for (int i = 0; i < 4; ++i) o.v[i] = static_cast<E>(scale * r[i]);
    *reinterpret_cast<E4*>(out + k) = o;
  }
}

// ---- the plan (host) -----------------------------------------------------------------------------------------------

struct DeviceShape {
  int fwd_slots;        // forward CTAs resident at once on the device (SMs x occupancy)
  int bwd_slots;        // backward CTAs resident at once
  int64_t l2_bytes;
  int64_t scratch_budget_bytes;  // soft bound of the backward scratch (at least one wave of CTAs gets scratch)
};

// Splits of the other side for `own_blocks` owned blocks: enough CTAs to fill the device in whole waves, and enough
// that the CTAs resident at once (launch order: split fastest) share few owned blocks, whose k-chunks are re-read
// for every score tile: they should stay within half of L2.
inline int pick_splits(int64_t own_blocks, int64_t other_units, int slots, int64_t own_block_bytes, int64_t l2) {
  constexpr int kMaxSplits = 64;
  int64_t s = 1;
  if (own_blocks < slots) {
    s = slots / own_blocks;
  }
  const int64_t l2_blocks = std::max<int64_t>(1, (l2 / 2) / std::max<int64_t>(own_block_bytes, 1));
  const int64_t resident = std::min<int64_t>(own_blocks, slots);
  if (resident > l2_blocks) s = std::max<int64_t>(s, (resident + l2_blocks - 1) / l2_blocks);
  if (own_blocks < slots && own_blocks * s > slots) {  // round up to whole waves
    const int64_t waves = (own_blocks * s + slots - 1) / slots;
    s = std::max<int64_t>(s, waves * slots / own_blocks);
  }
  return static_cast<int>(std::clamp<int64_t>(s, 1, std::min<int64_t>(other_units, kMaxSplits)));
}

inline InfoNCETCPlan make_tc_plan(int64_t B, int64_t N, int64_t d, int elem_bytes, const DeviceShape& dev) {
  using C = TileConfig;
  InfoNCETCPlan plan{};
  const int64_t qblocks = (B + C::kBM - 1) / C::kBM, dblocks = (N + C::kBM - 1) / C::kBM;
  const int64_t block_bytes = C::kBM * d * elem_bytes;
  plan.fwd_splits = pick_splits(qblocks, (N + C::kBN - 1) / C::kBN, dev.fwd_slots, block_bytes, dev.l2_bytes);
  plan.q_splits = pick_splits(qblocks, (N + C::kNS - 1) / C::kNS, dev.bwd_slots, block_bytes, dev.l2_bytes);
  plan.d_splits = pick_splits(dblocks, (B + C::kNS - 1) / C::kNS, dev.bwd_slots, block_bytes, dev.l2_bytes);
  // Owned blocks per launch: at least one wave of CTAs, else as many as the scratch budget allows.
  const int64_t unit_floats = C::kBM * d;
  const int64_t budget_units = std::max<int64_t>(dev.bwd_slots, dev.scratch_budget_bytes / 4 / unit_floats);
  plan.q_chunk_blocks = std::clamp<int64_t>(budget_units / plan.q_splits, 1, qblocks);
  plan.d_chunk_blocks = std::clamp<int64_t>(budget_units / plan.d_splits, 1, dblocks);
  plan.fwd_part_floats = plan.fwd_splits * B;
  plan.scratch_floats = std::max(plan.q_splits * plan.q_chunk_blocks, plan.d_splits * plan.d_chunk_blocks) *
                        unit_floats;
  plan.part_negsum_floats = plan.q_splits * B;
  return plan;
}

// ---- launch sequences, over an executor (CUDA launches in infonce_tc.cu, host threads in the emulator) -------------
// Exec provides fwd_tile(grid, args), fwd_combine(blocks, args), side<bool>(grid, args), reduce<bool>(blocks, args)
// where grid = (x = split, y = block) and the reduce / combine kernels have 256 threads.

constexpr int kCombineThreads = 256;
constexpr int kReduceRowsPerBlock = 8;  // one warp per row

template <class Exec>
void run_fwd(const InfoNCEParams& p, const InfoNCETCPlan& plan, const InfoNCETCWorkspace& ws, Exec& exec) {
  const FwdArgs a{plan.fwd_splits, ws.fwd_part_max, ws.fwd_part_sum, ws.fwd_target};
  const int64_t qblocks = (p.B + TileConfig::kBM - 1) / TileConfig::kBM;
  exec.fwd_tile(plan.fwd_splits, qblocks, a);
  exec.fwd_combine((p.B + kCombineThreads - 1) / kCombineThreads, a);
}

template <bool kOwnQueries, class Exec>
void run_bwd_pass(const InfoNCEParams& p, int splits, int64_t chunk_blocks, const InfoNCETCWorkspace& ws,
                  Exec& exec) {
  const int64_t own_count = kOwnQueries ? p.B : p.N;
  const int64_t blocks = (own_count + TileConfig::kBM - 1) / TileConfig::kBM;
  for (int64_t b0 = 0; b0 < blocks; b0 += chunk_blocks) {
    const int64_t nb = std::min(chunk_blocks, blocks - b0);
    const SideArgs a{splits, b0 * TileConfig::kBM, chunk_blocks * TileConfig::kBM, ws.scratch, ws.part_negsum};
    exec.template side<kOwnQueries>(splits, nb, a);
    const int64_t rows = std::min(nb * TileConfig::kBM, own_count - a.chunk_row0);
    exec.template reduce<kOwnQueries>((rows + kReduceRowsPerBlock - 1) / kReduceRowsPerBlock, a);
  }
}

// The dQ pass runs first: it publishes p.neg_prob_sum, which the dDocs pass's reduce reads.
template <class Exec>
void run_bwd(const InfoNCEParams& p, const InfoNCETCPlan& plan, const InfoNCETCWorkspace& ws, Exec& exec) {
  run_bwd_pass<true>(p, plan.q_splits, plan.q_chunk_blocks, ws, exec);
  run_bwd_pass<false>(p, plan.d_splits, plan.d_chunk_blocks, ws, exec);
}

}  // namespace nvembed::cuda::tc
