// CuTe pieces shared by the tensor-core kernels (infonce_tc.cuh, flash_sm80.cuh): the sm80 atoms, and helpers over
// the mma.sync m16n8k16 accumulator layout. Written so that the CPU emulator (tools/emu) compiles them too: device
// code uses only __syncthreads() and __shfl_xor_sync() from the CUDA runtime.
#pragma once

#include <cute/tensor.hpp>

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define NVE_DEVICE __device__ __forceinline__
#else
#define NVE_DEVICE inline
#endif

namespace nvembed::cuda::tc {

// The atoms: real sm80 instructions on the GPU, logical equivalents in the CPU emulator (same CuTe layouts).
template <class Element>
struct Sm80Atoms {
  using G2S = cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>;  // L2 only: tiles are streamed, not reused by the SM
  using S2R = cute::SM75_U32x4_LDSM_N;
  using S2RTrans = cute::SM75_U16x8_LDSM_T;
  using Mma = std::conditional_t<std::is_same_v<Element, cute::half_t>, cute::SM80_16x8x16_F32F16F16F32_TN,
                                 cute::SM80_16x8x16_F32BF16BF16F32_TN>;
};

// ---- small helpers ------------------------------------------------------------------------------------------------

constexpr float kLog2e = 1.4426950408889634f;

NVE_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

// Merge of two (max, sum of exp(x - max)) pairs. max = -inf means "no element yet" (sum 0).
NVE_DEVICE void lse_merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;  // both empty: avoid exp(-inf - -inf) = NaN
  s = s * exp2f((m - mm) * kLog2e) + s2 * exp2f((m2 - mm) * kLog2e);
  m = mm;
}

// (MMA = 4, MMA_M, MMA_N) accumulator layout -> ((2, MMA_M), (2, MMA_N)) = (row slots, column slots). The sm80
// 16 x 8 C fragment gives a thread rows lane/4 + 8 * (value bit 1) and columns 2 * (lane % 4) + (value bit 0).
template <class Layout>
NVE_DEVICE auto acc_rowcol(Layout l) {
  using namespace cute;
  static_assert(decltype(rank(l))::value == 3 && decltype(size<0>(l))::value == 4);
  auto v = logical_divide(l, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(v), get<1>(v)), make_layout(get<0, 0>(v), get<2>(v)));
}

// One tiled copy of a (CPY, CPY_M, CPY_K) partition; vectors whose first element lies outside [rows) x [cols)
// are zero-filled instead (a 16-byte vector is wholly inside or outside since cols % 8 == 0).
template <class TiledCopy, class Src, class Dst, class Crd>
NVE_DEVICE void copy_or_zero(TiledCopy const& tc, Src const& src, Dst&& dst, Crd const& crd, int rows, int cols) {
  using namespace cute;
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    CUTE_UNROLL
    for (int k = 0; k < size<2>(src); ++k) {
      if (get<0>(crd(0, m, k)) < rows && get<1>(crd(0, m, k)) < cols) {
        copy(tc, src(_, m, k), dst(_, m, k));
      } else {
        clear(dst(_, m, k));
      }
    }
  }
}

}  // namespace nvembed::cuda::tc
