// Host-side checks of the Hopper flash-attention forward's register and tile layouts (csrc/cuda/flash_sm90.cuh),
// no GPU needed: CuTe's layouts are host functions, so the claims the kernel's softmax and P V GEMM rest on are
// evaluated here for every instantiation, thread by thread:
//   * acc_as_a: the S accumulator register that holds S(m, n) is the register the RS wgmma of O += P V reads as
//     A(m, k = n) (P is rounded in place, never moved between threads or registers);
//   * acc_rowcol: a thread's accumulator slots form rows x columns, a row's columns live in one quad of lanes
//     (lanes differing in bits 0 and 1: the two shuffles of the row max / sum), and the quad covers each column of
//     the tile exactly once;
//   * the epilogue's paired stores: slots ni, ni + 1 (ni even) are columns c, c + 1 of the same row;
//   * shared memory fits an sm_90 CTA (227 KB) and the TMA byte counts equal one tile;
//   * InfoNCE's Hopper forward (infonce_sm90.cuh): its rows' statistics by quads, stage bytes;
//   * the backward (flash_sm90_bwd.cuh): the same register reuse for dS -> dQ += dS K, P^T -> dV += P^T dO and
//     dS^T -> dK += dS^T Q, and the transposed tile views (K^T, Q^T, dO^T) address the same bytes as the tiles.
// Built with nvcc as host code (tools/sm90_check/run.sh); prints PASSED or the first failures.
#include <cstdio>

#include "cuda/flash_sm90_bwd.cuh"
#include "cuda/infonce_sm90.cuh"

using namespace cute;
namespace fa90 = nvembed::cuda::fa90;

static int failures = 0;
#define EXPECT(cond, ...)                        \
  do {                                           \
    if (!(cond)) {                               \
      if (++failures <= 20) {                    \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                \
        std::printf("\n");                       \
      }                                          \
    }                                            \
  } while (0)

// The register of an M x N accumulator of mma_c that holds (m, n) is the register mma_a's RS wgmma reads as A(m, n).
template <int M, int N, class MmaC, class MmaA>
void check_reuse(const char* name, MmaC mma_c, MmaA mma_a) {
  for (int tid = 0; tid < size(mma_c); ++tid) {
    auto crd_c = mma_c.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    auto crd_p = make_tensor(crd_c.data(), fa90::acc_as_a(crd_c.layout()));
    auto crd_a = mma_a.get_thread_slice(tid).partition_A(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    EXPECT(size(crd_p) == size(crd_a), "%s: %d accumulator values, %d A values", name, int(size(crd_p)),
           int(size(crd_a)));
    for (int i = 0; i < size(crd_a); ++i) {
      EXPECT(get<0>(crd_p(i)) == get<0>(crd_a(i)) && get<1>(crd_p(i)) == get<1>(crd_a(i)),
             "%s: thread %d value %d: register holds (%d, %d), read as A(%d, %d)", name, tid, i,
             int(get<0>(crd_p(i))), int(get<1>(crd_p(i))), int(get<0>(crd_a(i))), int(get<1>(crd_a(i))));
    }
  }
}

// Quads: the lanes holding row r of an M x N accumulator are one quad (tid & ~3), inside the row's warpgroup, and
// hold each column exactly once (the two shuffles of a row reduction see the whole row).
template <int M, int N, class Mma>
void check_quads(const char* name, Mma mma) {
  for (int r = 0; r < M; ++r) {
    std::vector<int> cols(N, 0);
    int owner_quad = -1;
    for (int tid = 0; tid < size(mma); ++tid) {
      auto crd_s = mma.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
      auto rc = make_tensor(crd_s.data(), fa90::acc_rowcol(crd_s.layout()));
      for (int mi = 0; mi < size<0>(rc); ++mi) {
        if (get<0>(rc(mi, 0)) != r) continue;
        EXPECT(owner_quad == -1 || owner_quad == tid / 4, "%s: row %d held by quads %d and %d", name, r, owner_quad,
               tid / 4);
        owner_quad = tid / 4;
        EXPECT(r / 64 == tid / 128, "%s: row %d is not in thread %d's warpgroup", name, r, tid);
        for (int ni = 0; ni < size<1>(rc); ++ni) cols[get<1>(rc(mi, ni))] += 1;
      }
    }
    for (int c = 0; c < N; ++c) EXPECT(cols[c] == 1, "%s: row %d column %d held %d times", name, r, c, cols[c]);
  }
}

// The InfoNCE Hopper forward (infonce_sm90.cuh): per-row statistics by quads, stage bytes.
template <class E>
void check_infonce(const char* name) {
  using K = nvembed::cuda::nce90::FwdKernel<E>;
  check_quads<K::kBM, K::kBN>(name, typename K::MmaS{});
  EXPECT(K::kStageBytes == (size(take<0, 2>(typename K::SmemX{})) + size(take<0, 2>(typename K::SmemY{}))) * sizeof(E),
         "%s: stage bytes", name);
  EXPECT(K::kSmem <= 227 * 1024, "%s: smem %d", name, K::kSmem);
  std::printf("%s infonce forward: smem %d bytes, %d stages of %u bytes\n", name, K::kSmem, K::kStages,
              K::kStageBytes);
}

// A transposed view: t(d, r, s) is the element tile(r, d, s).
template <class Tile, class TileT>
void check_transposed(const char* name, Tile tile, TileT tile_t) {
  for (int s = 0; s < size<2>(tile); ++s)
    for (int r = 0; r < size<0>(tile); ++r)
      for (int d = 0; d < size<1>(tile); ++d)
        EXPECT(tile(r, d, s) == tile_t(d, r, s), "%s: (%d, %d, %d) at %d vs %d", name, r, d, s, int(tile(r, d, s)),
               int(tile_t(d, r, s)));
}

template <class E, int D>
void check_bwd(const char* name) {
  using Dq = fa90::DqKernel<E, D>;
  using Dkdv = fa90::DkdvKernel<E, D>;
  check_reuse<Dq::kBM, Dq::kBN>(name, typename Dq::MmaS{}, typename Dq::MmaDQ{});
  check_reuse<Dkdv::kBN, Dkdv::kBM>(name, typename Dkdv::MmaS{}, typename Dkdv::MmaKV{});
  check_transposed(name, typename Dq::SmemKV{}, typename Dq::SmemKt{});
  check_transposed(name, typename Dkdv::SmemQ{}, typename Dkdv::SmemQt{});
  EXPECT(Dq::kSmem <= 227 * 1024 && Dkdv::kSmem <= 227 * 1024, "%s: smem %d / %d", name, Dq::kSmem, Dkdv::kSmem);
  EXPECT(Dq::kBytesKV == size(take<0, 2>(typename Dq::SmemKV{})) * sizeof(E) &&
             Dkdv::kBytesQ == size(take<0, 2>(typename Dkdv::SmemQ{})) * sizeof(E),
         "%s: pipeline stage bytes", name);
  std::printf("%s backward: smem dQ %d, dK/dV %d bytes\n", name, Dq::kSmem, Dkdv::kSmem);
}

template <class E, int D>
void check(const char* name) {
  using K = fa90::FwdKernel<E, D>;
  constexpr int BM = K::kBM, BN = K::kBN;
  typename K::MmaQK mma_qk;
  typename K::MmaPV mma_pv;
  static_assert(size(typename K::MmaQK{}) == K::kConsumerThreads && size(typename K::MmaPV{}) == K::kConsumerThreads);
  for (int tid = 0; tid < K::kConsumerThreads; ++tid) {
    auto crd_s = mma_qk.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
    // acc_as_a: the S register at A-fragment position i holds the element the RS atom reads as A at position i.
    auto crd_p = make_tensor(crd_s.data(), fa90::acc_as_a(crd_s.layout()));
    auto crd_a = mma_pv.get_thread_slice(tid).partition_A(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
    EXPECT(size(crd_p) == size(crd_a), "%s: P fragment has %d values, the A fragment %d", name, int(size(crd_p)),
           int(size(crd_a)));
    static_assert(decltype(rank(crd_p))::value == 3 && decltype(rank(crd_a))::value == 3);
    EXPECT(size<2>(crd_p) == size<2>(crd_a), "%s: k blocks %d vs %d", name, int(size<2>(crd_p)), int(size<2>(crd_a)));
    for (int i = 0; i < size(crd_a); ++i) {
      auto s = crd_p(i);
      auto a = crd_a(i);
      EXPECT(get<0>(s) == get<0>(a) && get<1>(s) == get<1>(a),
             "%s: thread %d value %d: S register holds (%d, %d) but the P V wgmma reads it as A(%d, %d)", name, tid,
             i, int(get<0>(s)), int(get<1>(s)), int(get<0>(a)), int(get<1>(a)));
    }
    // acc_rowcol: rows constant along a row slot, columns constant along a column slot.
    auto rc = make_tensor(crd_s.data(), fa90::acc_rowcol(crd_s.layout()));
    for (int mi = 0; mi < size<0>(rc); ++mi) {
      for (int ni = 0; ni < size<1>(rc); ++ni) {
        EXPECT(get<0>(rc(mi, ni)) == get<0>(rc(mi, 0)), "%s: thread %d row slot %d is not one row", name, tid, mi);
        EXPECT(get<1>(rc(mi, ni)) == get<1>(rc(0, ni)), "%s: thread %d column slot %d is not one column", name,
               tid, ni);
      }
    }
  }
  check_quads<BM, BN>(name, mma_qk);
  // Epilogue pairs over the O accumulator.
  for (int tid = 0; tid < K::kConsumerThreads; ++tid) {
    auto crd_o = mma_pv.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
    auto rc = make_tensor(crd_o.data(), fa90::acc_rowcol(crd_o.layout()));
    EXPECT(size<1>(rc) % 2 == 0, "%s: odd number of O column slots", name);
    for (int mi = 0; mi < size<0>(rc); ++mi) {
      for (int ni = 0; ni + 1 < size<1>(rc); ni += 2) {
        EXPECT(get<0>(rc(mi, ni)) == get<0>(rc(mi, ni + 1)) && get<1>(rc(mi, ni + 1)) == get<1>(rc(mi, ni)) + 1 &&
                   get<1>(rc(mi, ni)) % 2 == 0,
               "%s: thread %d O slots %d, %d are not an aligned column pair", name, tid, ni, ni + 1);
      }
    }
  }
  EXPECT(K::kSmem <= 227 * 1024, "%s: %d bytes of shared memory", name, K::kSmem);
  EXPECT(K::kBytesQ == cosize(typename K::SmemQ{}) * sizeof(E), "%s: Q bytes", name);
  EXPECT(K::kBytesKV == size(take<0, 2>(typename K::SmemK{})) * sizeof(E) &&
             K::kBytesKV == size(take<0, 2>(typename K::SmemVt{})) * sizeof(E),
         "%s: K / V stage bytes", name);
  std::printf("%s: smem %d bytes, %d + %d threads, S tile %dx%d, %d k blocks in P V\n", name, K::kSmem, 128,
              K::kConsumerThreads, BM, BN, int(BN / 16));
}

int main() {
  check<cute::bfloat16_t, 64>("bf16 d64");
  check<cute::bfloat16_t, 128>("bf16 d128");
  check<cute::half_t, 64>("fp16 d64");
  check<cute::half_t, 128>("fp16 d128");
  check_bwd<cute::bfloat16_t, 64>("bf16 d64");
  check_bwd<cute::bfloat16_t, 128>("bf16 d128");
  check_bwd<cute::half_t, 64>("fp16 d64");
  check_bwd<cute::half_t, 128>("fp16 d128");
  check_infonce<cute::bfloat16_t>("bf16");
  check_infonce<cute::half_t>("fp16");
  if (failures) {
    std::printf("FAILED: %d checks\n", failures);
    return 1;
  }
  std::printf("PASSED\n");
  return 0;
}
