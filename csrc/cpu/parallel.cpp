#include "cpu/parallel.h"

#include <ATen/Parallel.h>

namespace nvembed::cpu {
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  at::parallel_for(0, n, grain, fn);
}
int num_threads() { return at::get_num_threads(); }
}  // namespace nvembed::cpu
