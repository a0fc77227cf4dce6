// Which CUDA kernel generation runs an op: the environment variable that chooses between the sm80 kernels (every
// sm80+ device) and the Hopper (sm_90a: TMA + wgmma) kernels where they exist. Plain C++ (CPU and CUDA builds).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

namespace nvembed {

// The value of the environment variable `env_var` that picks how `op` runs a step: "auto" when it is unset or empty,
// else one of `allowed` (any other value raises an error naming `op` and the variable, listing auto and `allowed`).
std::string env_choice(const char* env_var, const char* op, std::initializer_list<std::string_view> allowed);

// `base` or `alt`, the two implementations of one op step named by `env_var`: it holds auto (default, also when unset
// or empty), `base` or `alt`; any other value raises an error naming `op` and the variable. `alt` is returned only
// where it `applies` and is wanted: always when named, for auto only once it has been `verified` on a GPU
// (bench/gpu_check.sh).
const char* kernel_choice(const char* env_var, const char* op, const char* base, const char* alt, bool applies,
                          bool verified);

// "sm90" or "sm80": kernel_choice between the sm80 kernels and the Hopper one, which `applies` on an sm_90a build,
// a compute capability 9.0 device and a supported shape.
const char* hopper_kernel_choice(const char* env_var, const char* op, bool applies, bool verified);

// Whether this build has sm_90a code (NVEMBED_CUDA_ARCHS contains 90a): the Hopper kernels' bodies exist.
constexpr bool kBuiltWithSm90a =
#ifdef NVEMBED_HAS_SM90A
    true;
#else
    false;
#endif

// The InfoNCE tensor-core forward on a device of compute capability major.minor (NVEMBED_INFONCE_KERNEL): the
// Hopper forward (infonce_sm90.cuh) or the sm80 one. The tile backward is sm80 either way (the blocked-GEMM
// backward is chosen separately: infonce_gemm.h). Verified on an H200 on
// 2026-11-26 (CUDA tests, memcheck and racecheck clean), so auto picks it on compute capability 9.0.
constexpr bool kInfonceSm90FwdVerified = true;
const char* infonce_fwd_kernel_for(int major, int minor);

}  // namespace nvembed
