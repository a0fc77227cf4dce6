// Torch-free face of at::parallel_for for the kernel templates: fn(begin, end) over [0, n) in chunks of at least
// `grain`. Nested calls run inline (ATen's rule), so BLAS tiles issued inside run single-threaded.
#pragma once
#include <cstdint>
#include <functional>

namespace nvembed::cpu {
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);
int num_threads();
}  // namespace nvembed::cpu
