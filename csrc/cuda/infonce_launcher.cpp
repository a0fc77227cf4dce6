// PLACEHOLDER (to be replaced by the CUDA InfoNCE launcher)
#include "checks.h"
#include "ops.h"
namespace nvembed {
std::tuple<Tensor, Tensor> infonce_fwd_cuda(const Tensor&, const Tensor&, int64_t, double, bool) {
  TORCH_CHECK(false, "nvembed::infonce: CUDA not implemented yet");
}
std::tuple<Tensor, Tensor> infonce_bwd_cuda(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                                            double, bool) {
  TORCH_CHECK(false, "nvembed::infonce: CUDA not implemented yet");
}
}  // namespace nvembed
