// The tensor-core InfoNCE kernels for the GPU: __global__ wrappers of the bodies in infonce_tc.cuh with the sm80
// atoms (cp.async, ldmatrix, mma.sync; valid on sm_80 and sm_90a), the device queries behind the plan, and the
// dispatch on dtype. Two template instantiations per kernel (bf16, fp16), one tile configuration.
#include <cuda_runtime.h>

#include <mutex>

#include "cuda/infonce_tc.cuh"

namespace nvembed::cuda {

// infonce_sm90.cu: the forward's tile pass on TMA + wgmma (sm_90a builds, compute capability 9.0 devices).
void infonce_sm90_fwd_tile(const InfoNCEParams& p, int splits, int64_t qblocks, const tc::FwdArgs& a,
                           cudaStream_t stream);

namespace {

using tc::TileConfig;
template <class E>
using Tr = tc::Traits<E>;

// Forward: 96 KB of shared memory, so two CTAs per H100 SM if the registers allow it (<= 128 per thread).
template <class E>
__global__ void __launch_bounds__(TileConfig::kThreads, 2) infonce_tc_fwd_kernel(const InfoNCEParams p,
                                                                                 const tc::FwdArgs a) {
  extern __shared__ __align__(128) char smem[];
  tc::fwd_tile_body<Tr<E>>(p, a, smem, threadIdx.x, blockIdx.x, blockIdx.y);
}

__global__ void __launch_bounds__(tc::kCombineThreads) infonce_tc_fwd_combine_kernel(const InfoNCEParams p,
                                                                                     const tc::FwdArgs a) {
  tc::fwd_combine_body(p, a, static_cast<int64_t>(blockIdx.x) * tc::kCombineThreads + threadIdx.x);
}

// Backward: 161 KB of shared memory, one CTA per SM.
template <class E, bool kOwnQueries>
__global__ void __launch_bounds__(TileConfig::kThreads, 1) infonce_tc_bwd_kernel(const InfoNCEParams p,
                                                                                 const tc::SideArgs a) {
  extern __shared__ __align__(128) char smem[];
  tc::bwd_side_body<Tr<E>, kOwnQueries>(p, a, smem, threadIdx.x, blockIdx.x, blockIdx.y);
}

template <class E, bool kOwnQueries>
__global__ void __launch_bounds__(32 * tc::kReduceRowsPerBlock) infonce_tc_bwd_reduce_kernel(
    const InfoNCEParams p, const tc::SideArgs a) {
  const int64_t row = a.chunk_row0 + static_cast<int64_t>(blockIdx.x) * tc::kReduceRowsPerBlock + threadIdx.x / 32;
  tc::bwd_reduce_body<Tr<E>, kOwnQueries>(p, a, row, threadIdx.x % 32);
}

// The attribute is per kernel and device; setting it on every launch costs about a microsecond.
template <class Kernel>
void allow_smem(Kernel kernel, int bytes) {
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <class E>
struct CudaExec {
  const InfoNCEParams& p;
  cudaStream_t stream;
  bool sm90_fwd = false;

  void fwd_tile(int splits, int64_t blocks, const tc::FwdArgs& a) {
    if (sm90_fwd) return infonce_sm90_fwd_tile(p, splits, blocks, a, stream);
    allow_smem(infonce_tc_fwd_kernel<E>, Tr<E>::kSmemFwd);
    infonce_tc_fwd_kernel<E><<<dim3(splits, static_cast<unsigned>(blocks)), TileConfig::kThreads,
                               Tr<E>::kSmemFwd, stream>>>(p, a);
  }
  void fwd_combine(int64_t blocks, const tc::FwdArgs& a) {
    infonce_tc_fwd_combine_kernel<<<static_cast<unsigned>(blocks), tc::kCombineThreads, 0, stream>>>(p, a);
  }
  template <bool kOwnQueries>
  void side(int splits, int64_t blocks, const tc::SideArgs& a) {
    allow_smem(infonce_tc_bwd_kernel<E, kOwnQueries>, Tr<E>::kSmemBwd);
    infonce_tc_bwd_kernel<E, kOwnQueries><<<dim3(splits, static_cast<unsigned>(blocks)), TileConfig::kThreads,
                                            Tr<E>::kSmemBwd, stream>>>(p, a);
  }
  template <bool kOwnQueries>
  void reduce(int64_t blocks, const tc::SideArgs& a) {
    infonce_tc_bwd_reduce_kernel<E, kOwnQueries>
        <<<static_cast<unsigned>(blocks), 32 * tc::kReduceRowsPerBlock, 0, stream>>>(p, a);
  }
};

// Per-device facts the plan needs, queried once.
struct DeviceInfo {
  bool ok = false;
  const char* why = nullptr;
  tc::DeviceShape shape{};
};

DeviceInfo query_device(int device) {
  DeviceInfo info;
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    info.why = "cudaGetDeviceProperties failed";
    return info;
  }
  if (prop.major < 8) {
    info.why = "needs compute capability 8.0 or newer (cp.async, bf16 mma.sync)";
    return info;
  }
  if (static_cast<int>(prop.sharedMemPerBlockOptin) < Tr<cute::bfloat16_t>::kSmemBwd) {
    info.why = "the device's opt-in shared memory per block is below the backward kernel's 161 KB";
    return info;
  }
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device);
  int fwd_occ = 0, bwd_occ = 0;
  using E = cute::bfloat16_t;  // both dtypes compile to the same resources
  allow_smem(infonce_tc_fwd_kernel<E>, Tr<E>::kSmemFwd);
  allow_smem(infonce_tc_bwd_kernel<E, true>, Tr<E>::kSmemBwd);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fwd_occ, infonce_tc_fwd_kernel<E>, TileConfig::kThreads,
                                                Tr<E>::kSmemFwd);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bwd_occ, infonce_tc_bwd_kernel<E, true>, TileConfig::kThreads,
                                                Tr<E>::kSmemBwd);
  cudaSetDevice(prev);
  if (cudaGetLastError() != cudaSuccess || bwd_occ < 1 || fwd_occ < 1) {
    info.why = "the kernels cannot be resident on this device (occupancy query failed or returned 0)";
    return info;
  }
  info.ok = true;
  info.shape.fwd_slots = prop.multiProcessorCount * fwd_occ;
  info.shape.bwd_slots = prop.multiProcessorCount * bwd_occ;
  info.shape.l2_bytes = prop.l2CacheSize;
  info.shape.scratch_budget_bytes = int64_t{256} << 20;
  return info;
}

const DeviceInfo& device_info(int device) {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static DeviceInfo info[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) {
    static const DeviceInfo none{false, "device index out of range", {}};
    return none;
  }
  std::call_once(once[device], [&] { info[device] = query_device(device); });
  return info[device];
}

template <class E>
void tc_fwd(const InfoNCEParams& p, const InfoNCETCPlan& plan, const InfoNCETCWorkspace& ws, cudaStream_t s) {
  CudaExec<E> exec{p, s, plan.sm90_fwd};
  tc::run_fwd(p, plan, ws, exec);
}

template <class E>
void tc_bwd(const InfoNCEParams& p, const InfoNCETCPlan& plan, const InfoNCETCWorkspace& ws, cudaStream_t s) {
  CudaExec<E> exec{p, s};
  tc::run_bwd(p, plan, ws, exec);
}

}  // namespace

bool infonce_tc_supported(int device, const char** why) {
  const DeviceInfo& info = device_info(device);
  if (!info.ok && why != nullptr) *why = info.why;
  return info.ok;
}

InfoNCETCPlan infonce_tc_plan(const InfoNCEParams& p, int device) {
  return tc::make_tc_plan(p.B, p.N, p.d, 2, device_info(device).shape);
}

void infonce_tc_fwd_launch(const InfoNCEParams& p, const InfoNCETCPlan& plan, const InfoNCETCWorkspace& ws,
                           cudaStream_t stream) {
  if (p.dtype == InfoNCEDType::kBFloat16) return tc_fwd<cute::bfloat16_t>(p, plan, ws, stream);
  if (p.dtype == InfoNCEDType::kFloat16) return tc_fwd<cute::half_t>(p, plan, ws, stream);
}

void infonce_tc_bwd_launch(const InfoNCEParams& p, const InfoNCETCPlan& plan, const InfoNCETCWorkspace& ws,
                           cudaStream_t stream) {
  if (p.dtype == InfoNCEDType::kBFloat16) return tc_bwd<cute::bfloat16_t>(p, plan, ws, stream);
  if (p.dtype == InfoNCEDType::kFloat16) return tc_bwd<cute::half_t>(p, plan, ws, stream);
}

}  // namespace nvembed::cuda
