#include "cpu/parallel.h"

#include <ATen/Parallel.h>

// MKL (linked into torch's x86-64 wheels) would otherwise open its own OpenMP team for every BLAS tile issued
// from inside our parallel region, and the threads then spin in libgomp. Weak, so builds without MKL still load.
extern "C" int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));

namespace nvembed::cpu {
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    const int prev = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    fn(begin, end);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
  });
}
int num_threads() { return at::get_num_threads(); }
}  // namespace nvembed::cpu
