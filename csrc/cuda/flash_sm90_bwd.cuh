// Non-causal flash-attention backward for Hopper (sm_90a): the sm80 backward's deterministic two-kernel design
// (flash_sm80.cuh: every output row owned by one CTA, no atomics, bitwise-reproducible) on the forward's Hopper
// machinery (flash_sm90.cuh): TMA loads by a producer warpgroup into cutlass::PipelineTmaAsync rings, two consumer
// warpgroups with wgmma, setmaxnreg 24 / 240. dsum = rowsum(dO * O) comes first (the sm80 dsum kernel); the consumers
// read lse and dsum of their rows straight from global memory (L2), in the log2 domain.
//
//   * DqKernel, CTA (m_block, h, b) = 128 query rows of head h: Q and dO loaded once, K / V blocks of 64 keys
//     through a 2-stage ring. Per block: S = Q K^T and dP = dO V^T (SS wgmma), P = exp2(S * scale log2 e - lse log2 e)
//     (keys past the sequence: 0), dS = P * (dP - dsum), dQ += dS K (RS wgmma: dS from the S registers, K read as an
//     MN-major B operand through a transposed view of its tile). dQ = scale * dQ at the end.
//   * DkdvKernel, CTA (n_block, hk, b) = 128 keys of kv head hk: K and V loaded once, Q / dO blocks of 64 query rows
//     of every query head of the GQA group through a 2-stage ring. Per block the transposed tiles S^T = K Q^T and
//     dP^T = V dO^T (SS), P^T and dS^T as above (queries past the sequence: 0), then dV += P^T dO and dK += dS^T Q
//     (RS, dO and Q read MN-major). dK = scale * dK at the end; a sequence without queries gets dK = dV = 0.
// Cost of owning instead of atomics, as on sm80: S and dP are computed by both kernels (7 tile GEMMs instead of 5).
// Not yet: intra-warpgroup overlap and ping-pong between the consumers (the forward has both).
#pragma once

#include "cuda/flash_kernels.cuh"  // the dsum kernel
#include "cuda/flash_sm90.cuh"

namespace nvembed::cuda::fa90 {

// Rows [0, rows) of a wgmma accumulator tile times `mul`, in the element type, at g + row * stride (column pairs).
template <class E, class Acc, class Crd>
CUTE_DEVICE void store_rows(Acc const& acc, Crd const& crd, E* g, int64_t stride, int rows, float mul) {
  using namespace cute;
  fa::store_rowcol<E>(make_tensor(acc.data(), acc_rowcol(acc.layout())),
                      make_tensor(crd.data(), acc_rowcol(crd.layout())), g, stride, rows, mul);
}

// An accumulator rounded to the element type, as the A operand of an RS wgmma.
template <class E, class Acc>
CUTE_DEVICE auto to_a_operand(Acc const& acc) {
  using namespace cute;
  Tensor r = make_tensor<E>(acc_as_a(acc.layout()));
  Tensor s = make_tensor(acc.data(), r.layout());
  CUTE_UNROLL
  for (int i = 0; i < size(s); ++i) r(i) = static_cast<E>(s(i));
  return r;
}

// Tile layouts shared by the two kernels: R x D row tiles (K-major, 128-byte swizzle) with kStages stages, and the
// same bytes viewed as D x R (the MN-major B operand of the RS GEMMs).
template <class E, int D>
struct BwdTiles {
  template <int R, int S>
  using Rows = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                            cute::Shape<cute::Int<R>, cute::Int<D>, cute::Int<S>>{}));
  template <int R, int S>
  using RowsT = decltype(cute::composition(
      Rows<R, S>{}, cute::make_ordered_layout(cute::Shape<cute::Int<D>, cute::Int<R>, cute::Int<S>>{},
                                              cute::Step<cute::_2, cute::_1, cute::_3>{})));
  using GShape = cute::Shape<int32_t, int32_t, int32_t>;
  using GStride = cute::Stride<int64_t, cute::_1, int64_t>;
  using GTensor = decltype(cute::make_tensor(cute::make_gmem_ptr(static_cast<E const*>(nullptr)), GShape{},
                                             GStride{}));
  template <int R>
  using Tma = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{}, GTensor{}, cute::take<0, 2>(Rows<R, 1>{})));

  // (rows, D, heads) view of a [rows, H, D] tensor for a TMA descriptor. An empty tensor is never read; its
  // descriptor describes one row of `fallback` (a valid address; an empty tensor's may be null).
  static auto gmem(const void* ptr, int64_t rows, int heads, const void* fallback) {
    using namespace cute;
    return make_tensor(make_gmem_ptr(static_cast<E const*>(rows > 0 ? ptr : fallback)),
                       make_shape(static_cast<int>(rows > 0 ? rows : 1), static_cast<int>(D), heads),
                       make_stride(static_cast<int64_t>(heads) * D, _1{}, static_cast<int64_t>(D)));
  }
};

// ---- dQ -------------------------------------------------------------------------------------------------------------

template <class Element_, int kHeadDim_>
struct DqKernel {
  using E = Element_;
  static constexpr int D = kHeadDim_;
  static_assert(D == 64 || D == 128);
  static constexpr int kBM = 128, kBN = 64, kStages = 2;
  static constexpr int kConsumerThreads = 256, kThreads = 384;
  using T = BwdTiles<E, D>;
  using WGLayout = cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>;
  using MmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<E, E, float, cute::Shape<cute::Int<kBM>, cute::Int<kBN>, cute::Int<D>>>(),
      WGLayout{}));
  using MmaDQ = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<E, E, float, cute::Shape<cute::Int<kBM>, cute::Int<D>, cute::Int<kBN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      WGLayout{}));
  using SmemQ = typename T::template Rows<kBM, 1>;
  using SmemKV = typename T::template Rows<kBN, kStages>;
  using SmemKt = typename T::template RowsT<kBN, kStages>;
  using TmaQ = typename T::template Tma<kBM>;
  using TmaKV = typename T::template Tma<kBN>;
  static constexpr uint32_t kBytesQ = kBM * D * sizeof(E), kBytesKV = kBN * D * sizeof(E);
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = cutlass::PipelineState<kStages>;

  struct SharedStorage {
    cute::array_aligned<E, cute::cosize_v<SmemQ>, 1024> q;
    cute::array_aligned<E, cute::cosize_v<SmemQ>, 1024> dout;
    cute::array_aligned<E, cute::cosize_v<SmemKV>, 1024> k;
    cute::array_aligned<E, cute::cosize_v<SmemKV>, 1024> v;
    typename Pipeline::SharedStorage pipe_k;
    typename Pipeline::SharedStorage pipe_v;
    alignas(8) uint64_t bar_q;
  };
  static constexpr int kSmem = static_cast<int>(sizeof(SharedStorage));

  struct Params {
    FlashParams p;
    TmaQ tma_q, tma_do;
    TmaKV tma_k, tma_v;
  };

  CUTE_DEVICE static void run(Params const& prm, char* smem_raw);
};

template <class E, int D>
CUTE_DEVICE void DqKernel<E, D>::run(Params const& prm, char* smem_raw) {
  using namespace cute;
  const FlashParams& p = prm.p;
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const auto [q_off, q_len, k_off, k_len] = seq_of(p, b);
  const int row0 = m_block * kBM;
  if (row0 >= q_len) return;  // uniform, before any barrier
  const int q_rows = min(kBM, q_len - row0);
  const int n_blocks = (k_len + kBN - 1) / kBN;
  const int64_t q_rs = static_cast<int64_t>(p.heads_q) * D;
  E* dq = static_cast<E*>(p.dq) + (static_cast<int64_t>(q_off) + row0) * q_rs + static_cast<int64_t>(h) * D;
  if (n_blocks == 0) {  // no keys: dQ = 0
    for (int i = threadIdx.x; i < q_rows * D; i += kThreads) dq[(i / D) * q_rs + i % D] = E(0.f);
    return;
  }
  const int hk = h / (p.heads_q / p.heads_kv);
  const int warp_group = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 128, 0);

  const auto pp = ring_params<Pipeline>(kBytesKV, warp_group, kConsumerThreads);
  if (threadIdx.x == 0) cutlass::arch::ClusterTransactionBarrier::init(&ss.bar_q, 1);
  Pipeline pipe_k(ss.pipe_k, pp, Shape<_1, _1, _1>{});
  Pipeline pipe_v(ss.pipe_v, pp, Shape<_1, _1, _1>{});
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), SmemQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), SmemKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), SmemKV{});
  Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), SmemKt{});

  if (warp_group == 0) {  // ---------------------------------------------------------------------------- producer
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x != 0) return;
    const int tq = static_cast<int>(p.total_q), tk = static_cast<int>(p.total_k);
    auto rows_q = [&](auto const& tma) {
      return local_tile(domain_offset(make_coord(q_off + row0, 0),
                                      tma.get_tma_tensor(make_shape(tq, static_cast<int>(D), p.heads_q))(_, _, h)),
                        Shape<Int<kBM>, Int<D>>{}, make_coord(0, 0));
    };
    auto rows_kv = [&](auto const& tma) {
      return local_tile(domain_offset(make_coord(k_off, 0),
                                      tma.get_tma_tensor(make_shape(tk, static_cast<int>(D), p.heads_kv))(_, _, hk)),
                        Shape<Int<kBN>, Int<D>>{}, make_coord(_, 0));  // (BN, D, n)
    };
    Tensor tQg = prm.tma_q.get_slice(0).partition_S(rows_q(prm.tma_q));     // (TMA, 1, 1)
    Tensor tQs = prm.tma_q.get_slice(0).partition_D(sQ);                     // (TMA, 1, 1, 1)
    Tensor tdOg = prm.tma_do.get_slice(0).partition_S(rows_q(prm.tma_do));
    Tensor tdOs = prm.tma_do.get_slice(0).partition_D(sdO);
    Tensor tKg = group_modes<0, 3>(prm.tma_k.get_slice(0).partition_S(rows_kv(prm.tma_k)));
    Tensor tKs = group_modes<0, 3>(prm.tma_k.get_slice(0).partition_D(sK));
    Tensor tVg = group_modes<0, 3>(prm.tma_v.get_slice(0).partition_S(rows_kv(prm.tma_v)));
    Tensor tVs = group_modes<0, 3>(prm.tma_v.get_slice(0).partition_D(sV));
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.bar_q, 2 * kBytesQ);
    copy(prm.tma_q.with(ss.bar_q), tQg, tQs(_, _, _, 0));
    copy(prm.tma_do.with(ss.bar_q), tdOg, tdOs(_, _, _, 0));
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
  const int tid = static_cast<int>(threadIdx.x) - 128;
  const int cwg = warp_group - 1;
  MmaS mma_s;
  MmaDQ mma_dq;
  auto wg_s = mma_s.get_slice(cwg * 128);
  auto wg_dq = mma_dq.get_slice(cwg * 128);
  Tensor tSrQ = wg_s.partition_fragment_A(sQ(_, _, 0));
  Tensor tSrdO = wg_s.partition_fragment_A(sdO(_, _, 0));
  Tensor tSrK = wg_s.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
  Tensor tSrV = wg_s.partition_fragment_B(sV);
  Tensor tdQrK = wg_dq.partition_fragment_B(sKt);  // (MMA, MMA_N, MMA_K, stage)

  Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBM>, Int<D>>{});
  clear(acc_dq);
  Tensor crd_s = mma_s.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  Tensor crd_s_rc = make_tensor(crd_s.data(), acc_rowcol(crd_s.layout()));
  constexpr int kRows = decltype(size<0>(crd_s_rc))::value;
  constexpr int kCols = decltype(size<1>(crd_s_rc))::value;
  // lse and dsum of this thread's rows, log2 domain; rows past the sequence: lse = +inf, so P = 0.
  const float scale_log2 = p.scale * kLog2e;
  float lse2[kRows], dsum[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int r = get<0>(crd_s_rc(mi, 0));
    const int64_t idx = stat_index(p, b, h, q_off, row0 + r);
    lse2[mi] = r < q_rows ? p.lse_in[idx] * kLog2e : INFINITY;
    dsum[mi] = r < q_rows ? p.dsum[idx] : 0.f;
  }

  PipelineState read;
  cutlass::arch::ClusterTransactionBarrier::wait(&ss.bar_q, 0);
  for (int n = n_blocks - 1; n >= 0; --n) {
    Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBM>, Int<kBN>>{});
    Tensor acc_dp = partition_fragment_C(mma_s, Shape<Int<kBM>, Int<kBN>>{});
    consumer_wait(pipe_k, read);
    gemm<true, -1>(mma_s, tSrQ, tSrK(_, _, _, read.index()), acc_s);
    consumer_wait(pipe_v, read);
    gemm<true, -1>(mma_s, tSrdO, tSrV(_, _, _, read.index()), acc_dp);
    warpgroup_wait<0>();
    pipe_v.consumer_release(read);
    const int cols_left = k_len - n * kBN;  // < kBN only for the last block (processed first)
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        const float pr = get<1>(crd_s_rc(mi, ni)) < cols_left ? exp2f(s(mi, ni) * scale_log2 - lse2[mi]) : 0.f;
        s(mi, ni) = pr * (dp(mi, ni) - dsum[mi]);  // dS
      }
    }
    Tensor rdS = to_a_operand<E>(acc_s);
    gemm<false, 0>(mma_dq, rdS, tdQrK(_, _, _, read.index()), acc_dq);
    pipe_k.consumer_release(read);
    ++read;
  }
  store_rows<E>(acc_dq, mma_dq.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<D>>{})),
                dq, q_rs, q_rows, p.scale);
}

// ---- dK, dV ---------------------------------------------------------------------------------------------------------

template <class Element_, int kHeadDim_>
struct DkdvKernel {
  using E = Element_;
  static constexpr int D = kHeadDim_;
  static_assert(D == 64 || D == 128);
  static constexpr int kBN = 128, kBM = 64, kStages = 2;  // keys per CTA (64 per consumer warpgroup), queries per step
  static constexpr int kConsumerThreads = 256, kThreads = 384;
  using T = BwdTiles<E, D>;
  using WGLayout = cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>;
  using MmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<E, E, float, cute::Shape<cute::Int<kBN>, cute::Int<kBM>, cute::Int<D>>>(),
      WGLayout{}));
  using MmaKV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<E, E, float, cute::Shape<cute::Int<kBN>, cute::Int<D>, cute::Int<kBM>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      WGLayout{}));
  using SmemKV = typename T::template Rows<kBN, 1>;
  using SmemQ = typename T::template Rows<kBM, kStages>;
  using SmemQt = typename T::template RowsT<kBM, kStages>;
  using TmaQ = typename T::template Tma<kBM>;
  using TmaKV = typename T::template Tma<kBN>;
  static constexpr uint32_t kBytesQ = kBM * D * sizeof(E), kBytesKV = kBN * D * sizeof(E);
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = cutlass::PipelineState<kStages>;

  struct SharedStorage {
    cute::array_aligned<E, cute::cosize_v<SmemKV>, 1024> k;
    cute::array_aligned<E, cute::cosize_v<SmemKV>, 1024> v;
    cute::array_aligned<E, cute::cosize_v<SmemQ>, 1024> q;
    cute::array_aligned<E, cute::cosize_v<SmemQ>, 1024> dout;
    typename Pipeline::SharedStorage pipe_q;
    typename Pipeline::SharedStorage pipe_do;
    alignas(8) uint64_t bar_kv;
  };
  static constexpr int kSmem = static_cast<int>(sizeof(SharedStorage));

  struct Params {
    FlashParams p;
    TmaQ tma_q, tma_do;
    TmaKV tma_k, tma_v;
  };

  CUTE_DEVICE static void run(Params const& prm, char* smem_raw);
};

template <class E, int D>
CUTE_DEVICE void DkdvKernel<E, D>::run(Params const& prm, char* smem_raw) {
  using namespace cute;
  const FlashParams& p = prm.p;
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const auto [q_off, q_len, k_off, k_len] = seq_of(p, b);
  const int key0 = n_block * kBN;
  if (key0 >= k_len) return;  // uniform, before any barrier
  const int k_rows = min(kBN, k_len - key0);
  const int group = p.heads_q / p.heads_kv;
  const int m_blocks = (q_len + kBM - 1) / kBM;
  const int n_steps = group * m_blocks;  // (query head of the group, query block), head-major
  const int64_t k_rs = static_cast<int64_t>(p.heads_kv) * D;
  const int64_t k_base = (static_cast<int64_t>(k_off) + key0) * k_rs + static_cast<int64_t>(hk) * D;
  E* dk = static_cast<E*>(p.dk) + k_base;
  E* dv = static_cast<E*>(p.dv) + k_base;
  if (n_steps == 0) {  // no queries: dK = dV = 0
    for (int i = threadIdx.x; i < k_rows * D; i += kThreads) {
      dk[(i / D) * k_rs + i % D] = E(0.f);
      dv[(i / D) * k_rs + i % D] = E(0.f);
    }
    return;
  }
  const int warp_group = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 128, 0);

  const auto pp = ring_params<Pipeline>(kBytesQ, warp_group, kConsumerThreads);
  if (threadIdx.x == 0) cutlass::arch::ClusterTransactionBarrier::init(&ss.bar_kv, 1);
  Pipeline pipe_q(ss.pipe_q, pp, Shape<_1, _1, _1>{});
  Pipeline pipe_do(ss.pipe_do, pp, Shape<_1, _1, _1>{});
  __syncthreads();

  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), SmemKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), SmemKV{});
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), SmemQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), SmemQ{});
  Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), SmemQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), SmemQt{});

  if (warp_group == 0) {  // ---------------------------------------------------------------------------- producer
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x != 0) return;
    const int tq = static_cast<int>(p.total_q), tk = static_cast<int>(p.total_k);
    auto rows_kv = [&](auto const& tma) {
      return local_tile(domain_offset(make_coord(k_off + key0, 0),
                                      tma.get_tma_tensor(make_shape(tk, static_cast<int>(D), p.heads_kv))(_, _, hk)),
                        Shape<Int<kBN>, Int<D>>{}, make_coord(0, 0));
    };
    // (BM, D, m block, head): every query head's rows of this sequence
    auto rows_q = [&](auto const& tma) {
      return local_tile(domain_offset(make_coord(q_off, 0, 0),
                                      tma.get_tma_tensor(make_shape(tq, static_cast<int>(D), p.heads_q))),
                        Shape<Int<kBM>, Int<D>>{}, make_coord(_, 0, _));
    };
    Tensor tKg = prm.tma_k.get_slice(0).partition_S(rows_kv(prm.tma_k));  // (TMA, 1, 1)
    Tensor tKs = prm.tma_k.get_slice(0).partition_D(sK);                  // (TMA, 1, 1, 1)
    Tensor tVg = prm.tma_v.get_slice(0).partition_S(rows_kv(prm.tma_v));
    Tensor tVs = prm.tma_v.get_slice(0).partition_D(sV);
    Tensor tQg = group_modes<0, 3>(prm.tma_q.get_slice(0).partition_S(rows_q(prm.tma_q)));     // (TMA, m, h)
    Tensor tQs = group_modes<0, 3>(prm.tma_q.get_slice(0).partition_D(sQ));                    // (TMA, stage)
    Tensor tdOg = group_modes<0, 3>(prm.tma_do.get_slice(0).partition_S(rows_q(prm.tma_do)));  // (TMA, m, h)
    Tensor tdOs = group_modes<0, 3>(prm.tma_do.get_slice(0).partition_D(sdO));                 // (TMA, stage)
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.bar_kv, 2 * kBytesKV);
    copy(prm.tma_k.with(ss.bar_kv), tKg, tKs(_, _, _, 0));
    copy(prm.tma_v.with(ss.bar_kv), tVg, tVs(_, _, _, 0));
    PipelineState write = cutlass::make_producer_start_state<Pipeline>();
    for (int step = 0; step < n_steps; ++step) {
      const int h = hk * group + step / m_blocks, m = step % m_blocks;
      pipe_q.producer_acquire(write);
      copy(prm.tma_q.with(*pipe_q.producer_get_barrier(write)), tQg(_, m, h), tQs(_, write.index()));
      pipe_do.producer_acquire(write);
      copy(prm.tma_do.with(*pipe_do.producer_get_barrier(write)), tdOg(_, m, h), tdOs(_, write.index()));
      ++write;
    }
    return;
  }

  // ---------------------------------------------------------------------------------------------------- consumers
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  const int tid = static_cast<int>(threadIdx.x) - 128;
  const int cwg = warp_group - 1;
  MmaS mma_s;
  MmaKV mma_kv;
  auto wg_s = mma_s.get_slice(cwg * 128);
  auto wg_kv = mma_kv.get_slice(cwg * 128);
  Tensor tSrK = wg_s.partition_fragment_A(sK(_, _, 0));
  Tensor tSrV = wg_s.partition_fragment_A(sV(_, _, 0));
  Tensor tSrQ = wg_s.partition_fragment_B(sQ);     // (MMA, MMA_N, MMA_K, stage)
  Tensor tSrdO = wg_s.partition_fragment_B(sdO);
  Tensor tKVrQt = wg_kv.partition_fragment_B(sQt);    // (MMA, MMA_N, MMA_K, stage)
  Tensor tKVrdOt = wg_kv.partition_fragment_B(sdOt);

  Tensor acc_dk = partition_fragment_C(mma_kv, Shape<Int<kBN>, Int<D>>{});
  Tensor acc_dv = partition_fragment_C(mma_kv, Shape<Int<kBN>, Int<D>>{});
  clear(acc_dk);
  clear(acc_dv);
  Tensor crd_s = mma_s.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kBN>, Int<kBM>>{}));
  Tensor crd_s_rc = make_tensor(crd_s.data(), acc_rowcol(crd_s.layout()));  // (key slot, query slot)
  constexpr int kRows = decltype(size<0>(crd_s_rc))::value;
  constexpr int kCols = decltype(size<1>(crd_s_rc))::value;
  const float scale_log2 = p.scale * kLog2e;

  PipelineState read;
  cutlass::arch::ClusterTransactionBarrier::wait(&ss.bar_kv, 0);
  for (int step = 0; step < n_steps; ++step) {
    const int h = hk * group + step / m_blocks, m = step % m_blocks;
    const int rows_left = q_len - m * kBM;  // query rows of this block inside the sequence (< kBM for the last)
    // lse (log2 domain) and dsum of this thread's query columns; columns past the sequence: P = 0
    float lse2[kCols], dsum[kCols];
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) {
      const int c = get<1>(crd_s_rc(0, ni));
      const int64_t idx = stat_index(p, b, h, q_off, m * kBM + c);
      lse2[ni] = c < rows_left ? p.lse_in[idx] * kLog2e : INFINITY;
      dsum[ni] = c < rows_left ? p.dsum[idx] : 0.f;
    }
    Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBN>, Int<kBM>>{});
    Tensor acc_dp = partition_fragment_C(mma_s, Shape<Int<kBN>, Int<kBM>>{});
    consumer_wait(pipe_q, read);
    gemm<true, -1>(mma_s, tSrK, tSrQ(_, _, _, read.index()), acc_s);
    consumer_wait(pipe_do, read);
    gemm<true, -1>(mma_s, tSrV, tSrdO(_, _, _, read.index()), acc_dp);
    warpgroup_wait<0>();
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        const float pr = exp2f(s(mi, ni) * scale_log2 - lse2[ni]);  // 0 where lse2 = +inf
        s(mi, ni) = pr;
        dp(mi, ni) = pr * (dp(mi, ni) - dsum[ni]);  // dS^T
      }
    }
    Tensor rP = to_a_operand<E>(acc_s);
    Tensor rdS = to_a_operand<E>(acc_dp);
    gemm<false, -1>(mma_kv, rP, tKVrdOt(_, _, _, read.index()), acc_dv);
    gemm<false, -1>(mma_kv, rdS, tKVrQt(_, _, _, read.index()), acc_dk);
    warpgroup_wait<0>();
    pipe_q.consumer_release(read);
    pipe_do.consumer_release(read);
    ++read;
  }
  auto thr_kv = mma_kv.get_thread_slice(tid);
  Tensor crd_o = thr_kv.partition_C(make_identity_tensor(Shape<Int<kBN>, Int<D>>{}));
  store_rows<E>(acc_dk, crd_o, dk, k_rs, k_rows, p.scale);
  store_rows<E>(acc_dv, crd_o, dv, k_rs, k_rows, 1.f);
}

// ---- kernels and launches -----------------------------------------------------------------------------------------

// Launch of one backward kernel; `owned_rows` is the row count of the side its CTAs own (q for dQ, k for dK / dV):
// with none there is nothing to write.
template <class K>
void launch_bwd(const FlashParams& p, dim3 grid, int64_t owned_rows, cudaStream_t stream) {
  using namespace cute;
  using T = typename K::T;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || owned_rows <= 0) return;
  const void* any = p.total_q > 0 ? p.q : p.k;  // non-empty: owned_rows > 0
  typename K::Params prm{
      p, make_tma_copy(SM90_TMA_LOAD{}, T::gmem(p.q, p.total_q, p.heads_q, any), take<0, 2>(typename K::SmemQ{})),
      make_tma_copy(SM90_TMA_LOAD{}, T::gmem(p.dout, p.total_q, p.heads_q, any), take<0, 2>(typename K::SmemQ{})),
      make_tma_copy(SM90_TMA_LOAD{}, T::gmem(p.k, p.total_k, p.heads_kv, any), take<0, 2>(typename K::SmemKV{})),
      make_tma_copy(SM90_TMA_LOAD{}, T::gmem(p.v, p.total_k, p.heads_kv, any), take<0, 2>(typename K::SmemKV{}))};
  auto kernel = sm90_kernel<K>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, K::kSmem);
  kernel<<<grid, K::kThreads, K::kSmem, stream>>>(prm);
}

template <class E, int D>
void run_bwd(const FlashParams& p, cudaStream_t stream) {
  using Dq = DqKernel<E, D>;
  using Dkdv = DkdvKernel<E, D>;
  fa::launch(fa::flash_dsum_kernel<E>, fa::dsum_grid(p), 32 * fa::kDsumWarps, 0, p, stream);
  launch_bwd<Dq>(p, dim3((p.seqlen_q + Dq::kBM - 1) / Dq::kBM, p.heads_q, p.batch), p.total_q, stream);
  launch_bwd<Dkdv>(p, dim3((p.seqlen_k + Dkdv::kBN - 1) / Dkdv::kBN, p.heads_kv, p.batch), p.total_k, stream);
}

template <class E>
void run_bwd_hdim(const FlashParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return run_bwd<E, 64>(p, stream);
    case 128: return run_bwd<E, 128>(p, stream);
  }
}

}  // namespace nvembed::cuda::fa90
