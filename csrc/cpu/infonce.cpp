// PLACEHOLDER (to be replaced by the tiled CPU InfoNCE kernel)
#include "checks.h"
#include "ops.h"
namespace nvembed {
std::tuple<Tensor, Tensor> infonce_fwd_cpu(const Tensor&, const Tensor&, int64_t, double, bool) {
  TORCH_CHECK(false, "nvembed::infonce: not implemented yet");
}
std::tuple<Tensor, Tensor> infonce_bwd_cpu(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                                           double, bool) {
  TORCH_CHECK(false, "nvembed::infonce: not implemented yet");
}
}  // namespace nvembed
