// Argument checks at the op boundary. Every message starts with the op name and names the argument, e.g.
//   "nvembed::infonce: docs.size(0)=30 is not queries.size(0)*group_size=32".
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <string>

namespace nvembed {

#define NVE_CHECK(cond, op, ...) TORCH_CHECK((cond), "nvembed::", op, ": ", __VA_ARGS__)
#define NVE_CHECK_VALUE(cond, op, ...) TORCH_CHECK_VALUE((cond), "nvembed::", op, ": ", __VA_ARGS__)
#define NVE_CHECK_TYPE(cond, op, ...) TORCH_CHECK_TYPE((cond), "nvembed::", op, ": ", __VA_ARGS__)

inline std::string dtypes_str(std::initializer_list<at::ScalarType> allowed) {
  std::string s;
  for (auto t : allowed) {
    if (!s.empty()) s += ", ";
    s += c10::toString(t);
  }
  return s;
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* name,
                        std::initializer_list<at::ScalarType> allowed) {
  bool ok = false;
  for (auto a : allowed) ok |= (t.scalar_type() == a);
  NVE_CHECK_TYPE(ok, op, name, " has dtype ", t.scalar_type(), "; expected one of ", dtypes_str(allowed));
}

inline void check_rank(const at::Tensor& t, const char* op, const char* name, int64_t rank, const char* layout) {
  NVE_CHECK_VALUE(t.dim() == rank, op, name, " must be ", rank, "-D ", layout, ", got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                              const char* ref_name) {
  NVE_CHECK_VALUE(t.device() == ref.device(), op, name, " is on ", t.device(), " but ", ref_name, " is on ",
                  ref.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  NVE_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, name, " has dtype ", t.scalar_type(), " but ",
                 ref_name, " has dtype ", ref.scalar_type());
}

inline void check_finite_positive(double v, const char* op, const char* name) {
  NVE_CHECK_VALUE(std::isfinite(v) && v > 0, op, name, " must be finite and > 0, got ", v);
}

// CPU kernels accept float32, bfloat16 and float64 (float64 for gradcheck); CUDA kernels bf16 / fp16 (+fp32).
inline std::initializer_list<at::ScalarType> cpu_dtypes() {
  static const std::initializer_list<at::ScalarType> d = {at::kFloat, at::kBFloat16, at::kDouble};
  return d;
}

// Accumulation dtype of the CPU kernels: float64 inputs compute (and return their softmax statistics) in float64,
// float32 and bfloat16 in float32.
inline at::ScalarType accum_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace nvembed
