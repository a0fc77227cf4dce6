// nvembed_ext._C as a Python module: importing it runs the static TORCH_LIBRARY registrations of this library,
// and build_info() says how it was built.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "cpu/blas.h"
#include "flash_attn_common.h"
#include "infonce_gemm.h"
#include "kernel_choice.h"
#ifdef NVEMBED_WITH_CUDA
#include "cuda/gemm_sm90.cuh"
#endif

#ifndef NVEMBED_VERSION
#define NVEMBED_VERSION "0.0.0"
#endif
#ifndef NVEMBED_CPU_ISA_FLAGS
#define NVEMBED_CPU_ISA_FLAGS "generic"
#endif

namespace py = pybind11;

static const char* cpu_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__SSE4_2__)
  return "sse4.2";
#elif defined(__aarch64__)
  return "aarch64-neon";
#else
  return "generic";
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "nvembed kernels (ops are registered under torch.ops.nvembed)";
  m.def("build_info", []() {
    py::dict d;
    d["version"] = NVEMBED_VERSION;
#ifdef NVEMBED_WITH_CUDA
    d["with_cuda"] = true;
    d["cuda_archs"] = NVEMBED_CUDA_ARCHS_STR;
#else
    d["with_cuda"] = false;
    d["cuda_archs"] = "";
#endif
    d["cpu_isa"] = cpu_isa();
    d["cpu_flags"] = NVEMBED_CPU_ISA_FLAGS;
    d["cpu_blas"] = nvembed::cpu::blas_name();
    return d;
  });
  m.def(
      "flash_kernel_for",
      [](int major, int minor, int64_t head_dim, bool backward) {
        return nvembed::flash::flash_kernel_for(backward, major, minor, head_dim, nvembed::kBuiltWithSm90a);
      },
      py::arg("major"), py::arg("minor"), py::arg("head_dim"), py::arg("backward") = false,
      "The CUDA kernel set flash_attn would run (forward, or backward) on a device of compute capability "
      "major.minor: 'sm90' or 'sm80' (NVEMBED_FLASH_KERNEL = auto | sm80 | sm90 chooses).");
  m.def("infonce_fwd_kernel_for", &nvembed::infonce_fwd_kernel_for, py::arg("major"), py::arg("minor"),
        "The CUDA forward kernel infonce's tensor-core path would run on a device of compute capability "
        "major.minor: 'sm90' or 'sm80' (NVEMBED_INFONCE_KERNEL = auto | sm80 | sm90 chooses).");
  m.def(
      "infonce_fused_plan",
      [](int64_t B, int64_t N, int64_t d, int64_t elem_bytes) {
        nvembed::InfoNCEFusedPlan plan{};
        try {
          plan = nvembed::infonce_fused_plan(B, N, d, elem_bytes);
        } catch (const c10::Error& e) {  // a bad variable: the op's message, as a ValueError
          throw py::value_error(e.what_without_backtrace());
        }
        py::dict out;
        out["rows"] = plan.rows;
        out["accumulator"] = plan.acc == nvembed::InfoNCEFusedAcc::kNone   ? "none"
                             : plan.acc == nvembed::InfoNCEFusedAcc::kFp32 ? "fp32"
                                                                            : "output";
        return out;
      },
      py::arg("B"), py::arg("N"), py::arg("d"), py::arg("elem_bytes"),
      "The row blocks and dD accumulator of infonce's gradients formed in the forward (NVEMBED_INFONCE_GRAD=fused) "
      "for B queries, N docs of width d and inputs of elem_bytes bytes, under the current NVEMBED_INFONCE_FUSED_MB, "
      "NVEMBED_INFONCE_FUSED_ACC and NVEMBED_INFONCE_ROW_BLOCK: {'rows': R, 'accumulator': 'none' | 'fp32' | "
      "'output'} (csrc/infonce_gemm.h).");
#ifdef NVEMBED_WITH_CUDA
  // Raw-pointer entry points of the CUTLASS Hopper GEMM (cuda/gemm_sm90.cuh) for nvembed_ext.cutlass_gemm, which
  // checks the tensors; benchmarks only.
  m.def("gemm_sm90_bf16_workspace", &nvembed::cuda::gemm_sm90_bf16_workspace, py::arg("M"), py::arg("N"),
        py::arg("K"));
  m.def(
      "gemm_sm90_bf16",
      [](uintptr_t a, uintptr_t b, uintptr_t d, int M, int N, int K, uintptr_t workspace, uintptr_t stream) {
        const char* err = nvembed::cuda::gemm_sm90_bf16(
            reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b), reinterpret_cast<void*>(d), M, N, K,
            reinterpret_cast<void*>(workspace), reinterpret_cast<cudaStream_t>(stream));
        if (err != nullptr) throw std::runtime_error(std::string("nvembed.cutlass_gemm: ") + err);
      },
      py::arg("a"), py::arg("b"), py::arg("d"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("workspace"),
      py::arg("stream"));
#endif
}
