// Non-causal flash-attention forward for Hopper (sm_90a): TMA loads, wgmma for both GEMMs, producer / consumer
// warp specialization with register reallocation, FlashAttention-3's design (Shah et al. 2024) written on CUTLASS's
// tested pieces: cute's SM90_TMA_LOAD copies and GMMA atoms, cutlass::PipelineTmaAsync (mbarrier full / empty
// pairs), cutlass::arch::NamedBarrier and warpgroup_reg_{alloc,dealloc}.
//
// CTA (m_block, h, b) = 3 warpgroups, kBM = 128 query rows of head h of sequence b:
//   * warpgroup 0, the producer, drops to 24 registers; one thread issues the TMA loads: the Q tile once (its own
//     transaction barrier), then the K and V blocks of the sequence, last block first, into a kStages-deep ring
//     (pipeline_k / pipeline_v: the producer waits for a free stage, the TMA completes the stage's full barrier).
//   * warpgroups 1 and 2, the consumers, take 240 registers and 64 query rows each. Per key block:
//     S = Q K^T (wgmma, both operands in shared memory), online softmax in registers (log2 domain), P rounded to
//     bf16 / fp16 and used from registers as the A operand of O += P V (wgmma RS; V read as an MN-major B operand,
//     so it is never transposed). Intra-warpgroup overlap: the S GEMM of block n is issued before the P V GEMM of
//     block n + 1 and the softmax of block n runs while that GEMM executes. Inter-warpgroup ping-pong: two named
//     barriers order the two consumers' GEMM issue, so one warpgroup's softmax overlaps the other's GEMMs.
//   The last (partial) key block is processed first, so only the first step masks columns. The epilogue writes O
//   (rows inside the sequence only) and the row log-sum-exp from registers.
//
// Sequences as in flash.cuh (dense = equal-length varlen): the TMA views cover all rows of q / k / v of one head, a
// tile starts at the sequence's row offset, and rows past the sequence's end (the next sequence's, or zero fill past
// the tensor's end) are masked out of the softmax (keys) or not stored (queries). Rows of a neighbouring sequence
// reach the P V GEMM only multiplied by P = 0, so a non-finite value in one sequence's V rows could reach the
// previous sequence's output as NaN (0 * inf); the sm80 kernel zero-fills instead.
//
// Head dims 64 and 128, bf16 / fp16, fp32 accumulation; head dim 32 stays on the sm80 kernel.
#pragma once

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/pipeline.hpp>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/flash.cuh"
#include "cuda/flash_sm80.cuh"  // fa::seq_of, fa::stat_index, fa::kLn2, tc::kLog2e: one definition for both paths

namespace nvembed::cuda::fa90 {

using fa::kLn2;
using fa::stat_index;  // index of (sequence, head, row) in lse / dsum
using tc::kLog2e;

// ((2, 2, V), MMA_M, MMA_N) wgmma accumulator layout -> ((2, MMA_M), (2, V, MMA_N)) = (row slots, column slots). A
// thread of warp w holds rows 16 w + lane / 4 (+ 8) and columns 8 v + 2 (lane % 4) (+ 1) of each 64-row atom.
template <class Layout>
CUTE_HOST_DEVICE auto acc_rowcol(Layout l) {
  using namespace cute;
  static_assert(decltype(rank<0>(l))::value == 3 && decltype(rank(l))::value == 3);
  static_assert(decltype(size<0, 0>(l))::value == 2 && decltype(size<0, 1>(l))::value == 2);
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// The same accumulator registers as the A operand of a 16-bit RS wgmma: ((2, 2, N / 8), MMA_M, MMA_N) ->
// ((2, 2, 2), MMA_M, (N / 16, MMA_N)); the k16 A fragment of a thread is two adjacent n8 slices of its accumulator.
template <class Layout>
CUTE_HOST_DEVICE auto acc_as_a(Layout l) {
  using namespace cute;
  static_assert(decltype(rank<0>(l))::value == 3 && decltype(rank(l))::value == 3);
  auto v = logical_divide(get<0, 2>(l), Tile<_2>{});  // ((2, N / 16))
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0, 0>(v)), get<1>(l),
                     coalesce(make_layout(get<0, 1>(v), get<2>(l))));
}

// One wgmma batch over the K mode: tC (+)= tA . tB; waits for all but wg_wait batches (-1: no wait).
template <bool kZeroInit, int kWait, class Mma, class TA, class TB, class TC>
CUTE_DEVICE void gemm(Mma& mma, TA const& tA, TB const& tB, TC& tC) {
  using namespace cute;
  constexpr bool kRS = !std::is_base_of_v<GMMA::DescriptorIterator, typename Mma::FrgTypeA>;
  if constexpr (kRS) warpgroup_fence_operand(const_cast<TA&>(tA));
  warpgroup_fence_operand(tC);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tA); ++k) {
    cute::gemm(mma, tA(_, _, k), tB(_, _, k), tC);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWait >= 0) warpgroup_wait<kWait>();
  warpgroup_fence_operand(tC);
  if constexpr (kRS) warpgroup_fence_operand(const_cast<TA&>(tA));
}

// fa::seq_of with the row offsets as int, the TMA coordinates' type (row counts are below 2^31, checked by the
// launcher).
struct Seq {
  int q_off, q_len, k_off, k_len;
};

CUTE_DEVICE Seq seq_of(const FlashParams& p, int b) {
  const fa::Seq s = fa::seq_of(p, b);
  return {static_cast<int>(s.q_off), s.q_len, static_cast<int>(s.k_off), s.k_len};
}

// Element pair of a 4-byte store of two adjacent output columns.
template <class E>
struct alignas(2 * sizeof(E)) Pair {
  E x, y;
};

// Registers per thread after setmaxnreg: the producer warpgroup gives up what the two consumer warpgroups take
// (128 * 24 + 256 * 240 <= 64K).
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = 240;

// Parameters of a TMA ring (cutlass::PipelineTmaAsync) of a CTA whose warpgroup 0 produces and whose other
// `consumers` threads consume: thread 0 issues the loads (and is the leader that sets each stage's byte count),
// every consumer thread releases each stage once.
template <class Pipeline>
CUTE_DEVICE typename Pipeline::Params ring_params(uint32_t stage_bytes, int warp_group, int consumers) {
  typename Pipeline::Params pp;
  pp.transaction_bytes = stage_bytes;
  pp.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = threadIdx.x == 0;
  pp.num_consumers = consumers;
  return pp;
}

template <class Pipeline, class State>
CUTE_DEVICE void consumer_wait(Pipeline& pipe, State const& st) {
  auto token = pipe.consumer_try_wait(st);
  pipe.consumer_wait(st, token);
}

template <class Element_, int kHeadDim_>
struct FwdKernel {
  using E = Element_;
  static constexpr int D = kHeadDim_;
  static_assert(D == 64 || D == 128, "the sm90 forward takes head dims 64 and 128");
  static constexpr int kBM = 128;  // query rows per CTA: 64 per consumer warpgroup
  static constexpr int kBN = 128;  // keys per step
  static constexpr int kStages = 2;
  static constexpr int kConsumerWGs = kBM / 64;
  static constexpr int kConsumerThreads = 128 * kConsumerWGs;
  static constexpr int kThreads = 128 + kConsumerThreads;
  static_assert(kConsumerWGs == 2, "the ping-pong schedule below is written for two consumer warpgroups");

  using TileQK = cute::Shape<cute::Int<kBM>, cute::Int<kBN>, cute::Int<D>>;
  using TilePV = cute::Shape<cute::Int<kBM>, cute::Int<D>, cute::Int<kBN>>;
  using WGLayout = cute::Layout<cute::Shape<cute::Int<kConsumerWGs>, cute::_1, cute::_1>>;
  using MmaQK = decltype(cute::make_tiled_mma(cute::GMMA::ss_op_selector<E, E, float, TileQK>(), WGLayout{}));
  using MmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<E, E, float, TilePV, cute::GMMA::Major::K, cute::GMMA::Major::MN>(), WGLayout{}));

  // Rows of D 16-bit elements (128 or 256 bytes) in 128-byte-swizzled K-major atoms; V as (D, keys), D contiguous
  // (MN-major), the layout its TMA writes and the P V wgmma reads.
  using SmemQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                             cute::Shape<cute::Int<kBM>, cute::Int<D>>{}));
  using SmemK = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                             cute::Shape<cute::Int<kBN>, cute::Int<D>, cute::Int<kStages>>{}));
  using SmemVt = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<E>{},
                                              cute::Shape<cute::Int<D>, cute::Int<kBN>, cute::Int<kStages>>{},
                                              cute::Step<cute::_2, cute::_1, cute::_3>{}));

  // Global views for the TMA descriptors: q / k as (rows, D, heads), v as (D, rows, heads).
  using GShape = cute::Shape<int32_t, int32_t, int32_t>;
  using GStrideRows = cute::Stride<int64_t, cute::_1, int64_t>;
  using GStrideCols = cute::Stride<cute::_1, int64_t, int64_t>;
  template <class Stride>
  using GTensor = decltype(cute::make_tensor(cute::make_gmem_ptr(static_cast<E const*>(nullptr)), GShape{},
                                             Stride{}));
  using TmaQ = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{}, GTensor<GStrideRows>{}, SmemQ{}));
  using TmaK = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{}, GTensor<GStrideRows>{},
                                            cute::take<0, 2>(SmemK{})));
  using TmaV = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{}, GTensor<GStrideCols>{},
                                            cute::take<0, 2>(SmemVt{})));
  static constexpr uint32_t kBytesQ = kBM * D * sizeof(E);
  static constexpr uint32_t kBytesKV = kBN * D * sizeof(E);

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = cutlass::PipelineState<kStages>;

  struct SharedStorage {
    cute::array_aligned<E, cute::cosize_v<SmemQ>, 1024> q;
    cute::array_aligned<E, cute::cosize_v<SmemK>, 1024> k;
    cute::array_aligned<E, cute::cosize_v<SmemVt>, 1024> v;
    typename Pipeline::SharedStorage pipe_k;
    typename Pipeline::SharedStorage pipe_v;
    alignas(8) uint64_t bar_q;
  };
  static constexpr int kSmem = static_cast<int>(sizeof(SharedStorage));

  struct Params {
    FlashParams p;
    TmaQ tma_q;
    TmaK tma_k;
    TmaV tma_v;
  };

  // Named barriers of the ping-pong schedule (ids after CUTLASS's reserved ones).
  static constexpr uint32_t kSchedBarrier0 = 1;

  CUTE_DEVICE static void run(Params const& prm, char* smem_raw);
};

template <class E, int D>
CUTE_DEVICE void FwdKernel<E, D>::run(Params const& prm, char* smem_raw) {
  using namespace cute;
  const FlashParams& p = prm.p;
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;

  const auto [q_off, q_len, k_off, k_len] = seq_of(p, b);
  const int row0 = m_block * kBM;
  if (row0 >= q_len) return;  // uniform over the CTA, before any barrier
  const int q_rows = min(kBM, q_len - row0);
  const int n_blocks = (k_len + kBN - 1) / kBN;
  const int64_t q_rs = static_cast<int64_t>(p.heads_q) * D;
  E* out = static_cast<E*>(p.out) + (static_cast<int64_t>(q_off) + row0) * q_rs + static_cast<int64_t>(h) * D;
  auto lse_index = [&](int r) { return stat_index(p, b, h, q_off, row0 + r); };  // lse slot of tile row r

  if (n_blocks == 0) {  // no keys: O = 0, lse = +inf
    for (int i = threadIdx.x; i < q_rows * D; i += kThreads) out[(i / D) * q_rs + i % D] = E(0.f);
    for (int r = threadIdx.x; r < q_rows; r += kThreads) p.lse[lse_index(r)] = INFINITY;
    return;
  }
  const int hk = h / (p.heads_q / p.heads_kv);
  const int warp_group = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 128, 0);

  const auto pp = ring_params<Pipeline>(kBytesKV, warp_group, kConsumerThreads);
  if (threadIdx.x == 0) cutlass::arch::ClusterTransactionBarrier::init(&ss.bar_q, 1);
  Pipeline pipe_k(ss.pipe_k, pp, Shape<_1, _1, _1>{});  // initializes the barriers, fences the init
  Pipeline pipe_v(ss.pipe_v, pp, Shape<_1, _1, _1>{});
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), SmemK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), SmemVt{});

  if (warp_group == 0) {  // ---------------------------------------------------------------------------- producer
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x != 0) return;
    const int total_q = static_cast<int>(p.total_q), total_k = static_cast<int>(p.total_k);
    Tensor mQ = prm.tma_q.get_tma_tensor(make_shape(total_q, static_cast<int>(D), p.heads_q))(_, _, h);
    Tensor mK = prm.tma_k.get_tma_tensor(make_shape(total_k, static_cast<int>(D), p.heads_kv))(_, _, hk);
    Tensor mVt = prm.tma_v.get_tma_tensor(make_shape(static_cast<int>(D), total_k, p.heads_kv))(_, _, hk);
    Tensor gQ = local_tile(domain_offset(make_coord(q_off + row0, 0), mQ), Shape<Int<kBM>, Int<D>>{},
                           make_coord(0, 0));                                                    // (BM, D)
    Tensor gK = local_tile(domain_offset(make_coord(k_off, 0), mK), Shape<Int<kBN>, Int<D>>{},
                           make_coord(_, 0));                                                    // (BN, D, n)
    Tensor gVt = local_tile(domain_offset(make_coord(0, k_off), mVt), Shape<Int<D>, Int<kBN>>{},
                            make_coord(0, _));                                                   // (D, BN, n)
    auto cta_q = prm.tma_q.get_slice(0);
    auto cta_k = prm.tma_k.get_slice(0);
    auto cta_v = prm.tma_v.get_slice(0);
    Tensor tQg = cta_q.partition_S(gQ);
    Tensor tQs = cta_q.partition_D(sQ);
    Tensor tKg = group_modes<0, 3>(cta_k.partition_S(gK));   // (TMA, n)
    Tensor tKs = group_modes<0, 3>(cta_k.partition_D(sK));   // (TMA, stage)
    Tensor tVg = group_modes<0, 3>(cta_v.partition_S(gVt));  // (TMA, n)
    Tensor tVs = group_modes<0, 3>(cta_v.partition_D(sVt));  // (TMA, stage)

    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.bar_q, kBytesQ);
    copy(prm.tma_q.with(ss.bar_q), tQg, tQs);
    PipelineState write = cutlass::make_producer_start_state<Pipeline>();
    for (int n = n_blocks - 1; n >= 0; --n) {
      pipe_k.producer_acquire(write);
      copy(prm.tma_k.with(*pipe_k.producer_get_barrier(write)), tKg(_, n), tKs(_, write.index()));
      pipe_v.producer_acquire(write);
      copy(prm.tma_v.with(*pipe_v.producer_get_barrier(write)), tVg(_, n), tVs(_, write.index()));
      ++write;
    }
    return;
  }

  // ---------------------------------------------------------------------------------------------------- consumers
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  const int tid = static_cast<int>(threadIdx.x) - 128;  // 0 .. kConsumerThreads - 1
  const int cwg = warp_group - 1;                       // consumer warpgroup: query rows [64 cwg, +64)
  MmaQK mma_qk;
  MmaPV mma_pv;
  auto wg_qk = mma_qk.get_slice(cwg * 128);
  auto wg_pv = mma_pv.get_slice(cwg * 128);
  Tensor tSrQ = wg_qk.partition_fragment_A(sQ);   // descriptors
  Tensor tSrK = wg_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrV = wg_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stage)

  Tensor acc_o = partition_fragment_C(mma_pv, Shape<Int<kBM>, Int<D>>{});
  Tensor acc_o_rc = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
  Tensor crd_s = mma_qk.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  Tensor crd_s_rc = make_tensor(crd_s.data(), acc_rowcol(crd_s.layout()));
  Tensor crd_o = mma_pv.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<D>>{}));
  Tensor crd_o_rc = make_tensor(crd_o.data(), acc_rowcol(crd_o.layout()));
  constexpr int kRows = decltype(size<0>(crd_s_rc))::value;
  constexpr int kCols = decltype(size<1>(crd_s_rc))::value;
  constexpr int kColsO = decltype(size<1>(acc_o_rc))::value;
  static_assert(decltype(size<0>(acc_o_rc))::value == kRows);

  float row_max[kRows], row_sum[kRows], corr[kRows];  // log2 domain; row_sum: this thread's columns until the end
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    row_max[mi] = -INFINITY;
    row_sum[mi] = 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;

  // Online softmax of one score tile in place (scores -> exp2(scale_log2 * s - max)); corr[] receives the factor
  // that rescales the previous O and row sums. Columns >= cols_left are masked (only the first, partial block).
  auto softmax = [&](auto& acc_s, int cols_left, auto masked) {
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      float mx = -INFINITY;
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        float x = s(mi, ni) * scale_log2;
        if constexpr (decltype(masked)::value) {
          if (get<1>(crd_s_rc(mi, ni)) >= cols_left) x = -INFINITY;
        }
        s(mi, ni) = x;
        mx = fmaxf(mx, x);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // a row's columns live in one quad of lanes
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float new_max = fmaxf(row_max[mi], mx);
      const float base = new_max == -INFINITY ? 0.f : new_max;  // no valid key yet: every exp below is 0
      corr[mi] = exp2f(row_max[mi] - base);
      row_max[mi] = new_max;
      float sum = 0.f;
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        const float e = exp2f(s(mi, ni) - base);
        s(mi, ni) = e;
        sum += e;
      }
      row_sum[mi] = row_sum[mi] * corr[mi] + sum;
    }
  };
  auto rescale_o = [&]() {
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < kColsO; ++ni) acc_o_rc(mi, ni) *= corr[mi];
    }
  };
  // Ping-pong: a warpgroup issues its GEMMs after the other one issued its own.
  auto sched_sync = [&]() { cutlass::arch::NamedBarrier::sync(kConsumerThreads, kSchedBarrier0 + cwg); };
  auto sched_arrive = [&]() { cutlass::arch::NamedBarrier::arrive(kConsumerThreads, kSchedBarrier0 + (1 - cwg)); };
  if (cwg == 0) cutlass::arch::NamedBarrier::arrive(kConsumerThreads, kSchedBarrier0);  // warpgroup 1 goes first

  PipelineState read;  // stage 0, phase 0
  cutlass::arch::ClusterTransactionBarrier::wait(&ss.bar_q, 0);

  // First step: the last key block (the only partial one).
  Tensor acc_s0 = partition_fragment_C(mma_qk, Shape<Int<kBM>, Int<kBN>>{});
  consumer_wait(pipe_k, read);
  gemm<true, 0>(mma_qk, tSrQ, tSrK(_, _, _, read.index()), acc_s0);
  pipe_k.consumer_release(read);
  softmax(acc_s0, k_len - (n_blocks - 1) * kBN, cute::true_type{});
  Tensor rP = make_tensor<E>(acc_as_a(acc_s0.layout()));  // P of the pending P V GEMM
  {
    Tensor s = make_tensor(acc_s0.data(), rP.layout());
    CUTE_UNROLL
    for (int i = 0; i < size(s); ++i) rP(i) = static_cast<E>(s(i));
  }
  clear(acc_o);

  for (int n = n_blocks - 2; n >= 0; --n) {
    PipelineState read_v = read;  // stage of block n + 1, whose P is in rP
    ++read;
    Tensor acc_s = partition_fragment_C(mma_qk, Shape<Int<kBM>, Int<kBN>>{});
    consumer_wait(pipe_k, read);
    sched_sync();
    gemm<true, -1>(mma_qk, tSrQ, tSrK(_, _, _, read.index()), acc_s);
    consumer_wait(pipe_v, read_v);
    gemm<false, -1>(mma_pv, rP, tOrV(_, _, _, read_v.index()), acc_o);
    sched_arrive();
    warpgroup_wait<1>();  // S of block n is in registers
    pipe_k.consumer_release(read);
    softmax(acc_s, kBN, cute::false_type{});
    warpgroup_wait<0>();  // O += P V of block n + 1 done: rP and V's stage are free
    pipe_v.consumer_release(read_v);
    Tensor s = make_tensor(acc_s.data(), rP.layout());
    CUTE_UNROLL
    for (int i = 0; i < size(s); ++i) rP(i) = static_cast<E>(s(i));
    rescale_o();
  }
  consumer_wait(pipe_v, read);
  gemm<false, 0>(mma_pv, rP, tOrV(_, _, _, read.index()), acc_o);
  pipe_v.consumer_release(read);

  // Epilogue: O / rowsum, lse = ln 2 * (max + log2 sum); rows past the sequence's end are not written.
  const int lane = threadIdx.x % 32;
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    float sum = row_sum[mi];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float mul = sum > 0.f ? 1.f / sum : 0.f;
    const int r = get<0>(crd_o_rc(mi, 0));
    if (r >= q_rows) continue;
    if (lane % 4 == 0) p.lse[lse_index(r)] = sum > 0.f ? (row_max[mi] + log2f(sum)) * kLn2 : INFINITY;
    CUTE_UNROLL
    for (int ni = 0; ni < kColsO; ni += 2) {
      const int col = get<1>(crd_o_rc(mi, ni));  // even; col + 1 is slot ni + 1
      *reinterpret_cast<Pair<E>*>(out + r * q_rs + col) =
          Pair<E>{static_cast<E>(acc_o_rc(mi, ni) * mul), static_cast<E>(acc_o_rc(mi, ni + 1) * mul)};
    }
  }
}

// The __global__ wrapper of every Hopper kernel K (K::run, K::Params, K::kThreads): one CTA per SM (setmaxnreg needs
// the whole register file), the TMA descriptors in K::Params as a __grid_constant__ parameter. The body exists in
// sm_90a code only; the sm_80 pass compiles an empty kernel that is never launched.
template <class K>
__global__ void __launch_bounds__(K::kThreads, 1) sm90_kernel(const __grid_constant__ typename K::Params prm) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) char smem[];
  K::run(prm, smem);
#endif
}

// Host side: TMA descriptors over the prepared (contiguous, 16-byte aligned) tensors, and the launch.
template <class E, int D>
void run_fwd(const FlashParams& p, cudaStream_t stream) {
  using namespace cute;
  using K = FwdKernel<E, D>;
  const int grid_x = (p.seqlen_q + K::kBM - 1) / K::kBM;
  if (grid_x <= 0 || p.heads_q <= 0 || p.batch <= 0 || p.total_q <= 0) return;
  // No keys at all: every CTA writes zeros and issues no TMA of k / v; their descriptors then describe q's memory
  // (a valid address; an empty tensor's may be null).
  const bool no_keys = p.total_k <= 0;
  const void* k_ptr = no_keys ? p.q : p.k;
  const void* v_ptr = no_keys ? p.q : p.v;
  const int tq = static_cast<int>(p.total_q), tk = no_keys ? 1 : static_cast<int>(p.total_k);
  const int64_t q_rs = static_cast<int64_t>(p.heads_q) * D, k_rs = static_cast<int64_t>(p.heads_kv) * D;
  auto gq = make_tensor(make_gmem_ptr(static_cast<E const*>(p.q)), make_shape(tq, D, p.heads_q),
                        make_stride(q_rs, _1{}, static_cast<int64_t>(D)));
  auto gk = make_tensor(make_gmem_ptr(static_cast<E const*>(k_ptr)), make_shape(tk, D, p.heads_kv),
                        make_stride(k_rs, _1{}, static_cast<int64_t>(D)));
  auto gvt = make_tensor(make_gmem_ptr(static_cast<E const*>(v_ptr)), make_shape(D, tk, p.heads_kv),
                         make_stride(_1{}, k_rs, static_cast<int64_t>(D)));
  typename K::Params prm{p, make_tma_copy(SM90_TMA_LOAD{}, gq, typename K::SmemQ{}),
                         make_tma_copy(SM90_TMA_LOAD{}, gk, take<0, 2>(typename K::SmemK{})),
                         make_tma_copy(SM90_TMA_LOAD{}, gvt, take<0, 2>(typename K::SmemVt{}))};
  auto kernel = sm90_kernel<K>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, K::kSmem);
  kernel<<<dim3(grid_x, p.heads_q, p.batch), K::kThreads, K::kSmem, stream>>>(prm);
}

template <class E>
void run_fwd_hdim(const FlashParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return run_fwd<E, 64>(p, stream);
    case 128: return run_fwd<E, 128>(p, stream);
  }
}

}  // namespace nvembed::cuda::fa90
