// InfoNCE forward for Hopper (sm_90a): the score tiles S = Q D^T / t of the tensor-core path (infonce_tc.cuh) through
// TMA and wgmma, with the same work split and outputs, so the plan, the combine kernel and the backward are shared.
//
// CTA (split, qblock) = 3 warpgroups, 128 query rows against the doc tiles [t_begin, t_end) of its split:
//   * warpgroup 0 (24 registers): one thread streams, for every doc tile and every 64-wide chunk of d, the query
//     chunk (128 x 64) and the doc chunk (128 x 64) into a 4-stage ring (cutlass::PipelineTmaAsync, 32 KB a stage).
//     The query block is re-read from L2 for every doc tile, as on sm80 (at d = 4096 it is 1 MB). Rows past B / N
//     and columns past d are zero-filled by the TMA unit, so any d % 8 == 0 works without predicates.
//   * warpgroups 1 and 2 (240 registers, 64 query rows each): S += X_chunk Y_chunk^T as SS wgmma 64x128x16, one
//     batch in flight while the next chunk is awaited (a stage is released when the batch after it was issued and
//     it has completed). After each tile: scale by 1 / t, mask doc rows past N, pick the target logit (the one
//     thread holding column i * G of row i writes it), and update the thread's running (max, sum) per row. A row's
//     128 columns live in one quad of lanes, so the end needs only two shuffles, no shared memory.
// Writes part_max / part_sum [splits, B] and target [B] exactly like tc::fwd_tile_body; tc::fwd_combine_body turns
// them into lse and the row loss.
#pragma once

#include "cuda/flash_sm90.cuh"  // acc_rowcol, gemm, ring_params, consumer_wait
#include "cuda/infonce.cuh"
#include "cuda/infonce_tc.cuh"  // FwdArgs, TileConfig, lse_merge

namespace nvembed::cuda::nce90 {

template <class Element_>
struct FwdKernel {
  using E = Element_;
  static constexpr int kBM = tc::TileConfig::kBM;  // 128: the plan's query block
  static constexpr int kBN = tc::TileConfig::kBN;  // 128: the plan's doc tile
  static constexpr int kBK = 64;                   // d columns per stage (128-byte rows)
  static constexpr int kStages = 4;
  static constexpr int kConsumerThreads = 256, kThreads = 384;
  static_assert(kBM == 128 && kBN == 128, "two consumer warpgroups of 64 rows, 128-column tiles");

  using MmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<E, E, float, cute::Shape<cute::Int<kBM>, cute::Int<kBN>, cute::Int<kBK>>>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  using SmemX = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                             cute::Shape<cute::Int<kBM>, cute::Int<kBK>, cute::Int<kStages>>{}));
  using SmemY = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                             cute::Shape<cute::Int<kBN>, cute::Int<kBK>, cute::Int<kStages>>{}));
  using GTensor = decltype(cute::make_tensor(cute::make_gmem_ptr(static_cast<E const*>(nullptr)),
                                             cute::Shape<int32_t, int32_t>{}, cute::Stride<int64_t, cute::_1>{}));
  using TmaX = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{}, GTensor{}, cute::take<0, 2>(SmemX{})));
  using TmaY = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{}, GTensor{}, cute::take<0, 2>(SmemY{})));
  static constexpr uint32_t kStageBytes = (kBM + kBN) * kBK * sizeof(E);
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = cutlass::PipelineState<kStages>;

  struct SharedStorage {
    cute::array_aligned<E, cute::cosize_v<SmemX>, 1024> x;
    cute::array_aligned<E, cute::cosize_v<SmemY>, 1024> y;
    typename Pipeline::SharedStorage pipe;
  };
  static constexpr int kSmem = static_cast<int>(sizeof(SharedStorage));

  struct Params {
    InfoNCEParams p;
    tc::FwdArgs a;
    TmaX tma_x;
    TmaY tma_y;
  };

  CUTE_DEVICE static void run(Params const& prm, char* smem_raw);
};

template <class E>
CUTE_DEVICE void FwdKernel<E>::run(Params const& prm, char* smem_raw) {
  using namespace cute;
  using fa90::acc_rowcol;
  const InfoNCEParams& p = prm.p;
  const tc::FwdArgs& a = prm.a;
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
  const int split = blockIdx.x, qblock = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(qblock) * kBM;
  const int64_t tiles = (p.N + kBN - 1) / kBN;
  const int64_t t_begin = tiles * split / a.splits, t_end = tiles * (split + 1) / a.splits;
  const int k_chunks = static_cast<int>((p.d + kBK - 1) / kBK);
  if (row0 >= p.B || t_begin >= t_end) return;  // uniform, before any barrier (the plan never makes either)
  const int warp_group = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 128, 0);

  Pipeline pipe(ss.pipe, fa90::ring_params<Pipeline>(kStageBytes, warp_group, kConsumerThreads),
                Shape<_1, _1, _1>{});
  __syncthreads();
  Tensor sX = make_tensor(make_smem_ptr(ss.x.data()), SmemX{});
  Tensor sY = make_tensor(make_smem_ptr(ss.y.data()), SmemY{});

  if (warp_group == 0) {  // ---------------------------------------------------------------------------- producer
    cutlass::arch::warpgroup_reg_dealloc<fa90::kProducerRegs>();
    if (threadIdx.x != 0) return;
    const int B = static_cast<int>(p.B), N = static_cast<int>(p.N), d = static_cast<int>(p.d);
    // (BM, BK, k chunk) of the query block; (BN, BK, doc tile, k chunk) of the docs
    Tensor gX = local_tile(prm.tma_x.get_tma_tensor(make_shape(B, d)), Shape<Int<kBM>, Int<kBK>>{},
                           make_coord(qblock, _));
    Tensor gY = local_tile(prm.tma_y.get_tma_tensor(make_shape(N, d)), Shape<Int<kBN>, Int<kBK>>{},
                           make_coord(_, _));
    Tensor tXg = group_modes<0, 3>(prm.tma_x.get_slice(0).partition_S(gX));  // (TMA, k)
    Tensor tXs = group_modes<0, 3>(prm.tma_x.get_slice(0).partition_D(sX));  // (TMA, stage)
    Tensor tYg = group_modes<0, 3>(prm.tma_y.get_slice(0).partition_S(gY));  // (TMA, tile, k)
    Tensor tYs = group_modes<0, 3>(prm.tma_y.get_slice(0).partition_D(sY));  // (TMA, stage)
    PipelineState write = cutlass::make_producer_start_state<Pipeline>();
    for (int64_t t = t_begin; t < t_end; ++t) {
      for (int c = 0; c < k_chunks; ++c) {
        pipe.producer_acquire(write);
        auto* bar = pipe.producer_get_barrier(write);
        copy(prm.tma_x.with(*bar), tXg(_, c), tXs(_, write.index()));
        copy(prm.tma_y.with(*bar), tYg(_, static_cast<int>(t), c), tYs(_, write.index()));
        ++write;
      }
    }
    return;
  }

  // ---------------------------------------------------------------------------------------------------- consumers
  cutlass::arch::warpgroup_reg_alloc<fa90::kConsumerRegs>();
  const int tid = static_cast<int>(threadIdx.x) - 128;
  const int cwg = warp_group - 1;
  MmaS mma;
  auto wg = mma.get_slice(cwg * 128);
  Tensor tSrX = wg.partition_fragment_A(sX);  // (MMA, MMA_M, MMA_K, stage)
  Tensor tSrY = wg.partition_fragment_B(sY);  // (MMA, MMA_N, MMA_K, stage)
  Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});
  Tensor acc_rc = make_tensor(acc.data(), acc_rowcol(acc.layout()));
  Tensor crd = mma.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  Tensor crd_rc = make_tensor(crd.data(), acc_rowcol(crd.layout()));
  constexpr int kRows = decltype(size<0>(acc_rc))::value;

  float run_max[kRows], run_sum[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    run_max[mi] = -INFINITY;
    run_sum[mi] = 0.f;
  }
  PipelineState read, release;
  for (int64_t t = t_begin; t < t_end; ++t) {
    for (int c = 0; c < k_chunks; ++c) {
      fa90::consumer_wait(pipe, read);
      if (c == 0) mma.accumulate_ = GMMA::ScaleOut::Zero;
      fa90::gemm<false, -1>(mma, tSrX(_, _, _, read.index()), tSrY(_, _, _, read.index()), acc);
      warpgroup_wait<1>();  // every batch but this one is done: the previous stage is free
      if (c > 0) {
        pipe.consumer_release(release);
        ++release;
      }
      ++read;
    }
    warpgroup_wait<0>();
    pipe.consumer_release(release);
    ++release;

    const int64_t col0 = t * kBN;
    const int y_rows = static_cast<int>(std::min<int64_t>(kBN, p.N - col0));
    tc::tile_row_stats(p, a, acc_rc, crd_rc, row0, col0, y_rows, run_max, run_sum);
  }

  // A row's columns are in one quad: merge its 4 partial (max, sum), then lane 0 of the quad writes them.
  const int lane = threadIdx.x % 32;
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    CUTE_UNROLL
    for (int o = 1; o <= 2; o <<= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, run_max[mi], o);
      const float s2 = __shfl_xor_sync(0xffffffffu, run_sum[mi], o);
      tc::lse_merge(run_max[mi], run_sum[mi], m2, s2);
    }
    const int64_t row = row0 + get<0>(crd_rc(mi, 0));
    if (lane % 4 == 0 && row < p.B) {
      a.part_max[split * p.B + row] = run_max[mi];  // finite: the range holds >= 1 valid column
      a.part_sum[split * p.B + row] = run_sum[mi];
    }
  }
}

// The tile pass of the forward: grid (splits, query blocks), like tc::run_fwd's fwd_tile.
template <class E>
void fwd_tile(const InfoNCEParams& p, int splits, int64_t qblocks, const tc::FwdArgs& a, cudaStream_t stream) {
  using namespace cute;
  using K = FwdKernel<E>;
  if (splits <= 0 || qblocks <= 0 || p.B <= 0 || p.N <= 0) return;
  const int d = static_cast<int>(p.d);
  auto gx = make_tensor(make_gmem_ptr(static_cast<E const*>(p.queries)), make_shape(static_cast<int>(p.B), d),
                        make_stride(p.d, _1{}));
  auto gy = make_tensor(make_gmem_ptr(static_cast<E const*>(p.docs)), make_shape(static_cast<int>(p.N), d),
                        make_stride(p.d, _1{}));
  typename K::Params prm{p, a, make_tma_copy(SM90_TMA_LOAD{}, gx, take<0, 2>(typename K::SmemX{})),
                         make_tma_copy(SM90_TMA_LOAD{}, gy, take<0, 2>(typename K::SmemY{}))};
  auto kernel = fa90::sm90_kernel<K>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, K::kSmem);
  kernel<<<dim3(splits, static_cast<unsigned>(qblocks)), K::kThreads, K::kSmem, stream>>>(prm);
}

}  // namespace nvembed::cuda::nce90
