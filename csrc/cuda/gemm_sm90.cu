// A CUTLASS 3 Hopper GEMM for bf16 (contract in gemm_sm90.cuh): CUTLASS's collective builders with the
// warp-specialized cooperative schedule (a TMA producer warp group feeding two consumer warp groups that split a
// 128 x 256 tile, wgmma with fp32 accumulation), 2 x 1 clusters (TMA multicast of B), a TMA epilogue. The
// stage count is what shared memory leaves after the epilogue. CUTLASS's tested parts only, nothing custom: the
// point is a like-for-like measurement of cuBLAS against it (bench/gpu_gemm_compare.py). The kernel body exists only
// in sm_90a code; the caller checks the device and the build.
#include "cuda/gemm_sm90.cuh"

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

namespace nvembed::cuda {
namespace {

using namespace cute;

using Element = cutlass::bfloat16_t;
constexpr int kAlign = 8;  // elements per 16 bytes
using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_2, _1, _1>;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float,
    void, cutlass::layout::RowMajor, kAlign,  // no C operand
    Element, cutlass::layout::RowMajor, kAlign, cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;

using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, kAlign, Element,
    cutlass::layout::ColumnMajor, kAlign, float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

// A packed row-major stride (ld, 1, batch stride) of the kernel's stride type.
template <class Stride>
Stride packed(int64_t ld, int64_t batch) {
  Stride s{};
  get<0>(s) = ld;
  get<2>(s) = batch;
  return s;
}

typename Gemm::Arguments arguments(const void* a, const void* b, void* d, int M, int N, int K) {
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;
  // the current device's (the caller sets it to the operands' device); an attribute query, no context work
  cutlass::KernelHardwareInfo hw{};
  cudaGetDevice(&hw.device_id);
  cudaDeviceGetAttribute(&hw.sm_count, cudaDevAttrMultiProcessorCount, hw.device_id);
  return typename Gemm::Arguments{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<const Element*>(a), packed<StrideA>(K, int64_t{M} * K), static_cast<const Element*>(b),
       packed<StrideB>(K, int64_t{N} * K)},
      {{1.f, 0.f}, nullptr, packed<StrideC>(N, int64_t{M} * N), static_cast<Element*>(d),
       packed<StrideD>(N, int64_t{M} * N)},
      hw};
}

}  // namespace

size_t gemm_sm90_bf16_workspace(int M, int N, int K) {
  return Gemm::get_workspace_size(arguments(nullptr, nullptr, nullptr, M, N, K));
}

const char* gemm_sm90_bf16(const void* a, const void* b, void* d, int M, int N, int K, void* workspace,
                           cudaStream_t stream) {
  Gemm gemm;
  const auto args = arguments(a, b, d, M, N, K);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "CUTLASS cannot implement this problem";
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return "CUTLASS initialize failed";
  if (gemm.run(stream) != cutlass::Status::kSuccess) return "CUTLASS run failed";
  return nullptr;
}

}  // namespace nvembed::cuda
