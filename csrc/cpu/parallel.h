// Torch-free face of ATen's thread pool for the kernel templates.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <vector>

namespace nvembed::cpu {

// fn(begin, end) over [0, n) in chunks of at least `grain`, statically split. Inside, MKL is pinned to one thread
// per worker, so BLAS tiles issued from fn run single-threaded (a nested MKL team would spin in libgomp waiting
// for partner threads busy with their own tiles). Nested calls run inline (ATen's rule).
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);
int num_threads();

// Runs body(next) on min(n, threads) workers; each claims tasks with next.fetch_add(1) until n are taken. Dynamic
// hand-out instead of a static split: CI runners and dev boxes share their 2 cores, and with a static split a
// thread that loses its core stalls the whole op while the other waits at the barrier.
template <typename Body>
void run_tasks(int64_t n, Body&& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, num_threads()));
  parallel_for(workers, 1, [&](int64_t, int64_t) { body(next); });
}

}  // namespace nvembed::cpu

namespace nvembed::cpu {

// Per-thread, grow-only scratch memory (Slot tells apart buffers used together). Tile buffers of a few hundred KiB
// are above malloc's mmap threshold: allocated per call they cost an mmap plus a page fault per 4 KiB every time.
// Retained per thread: the largest size ever asked for. The pointer is 64-byte aligned: malloc's large blocks start
// 16 bytes into a page, and AMX tile loads / stores (the brgemm tiles read and write these buffers) and 512-bit
// vector accesses of rows that straddle two cache lines cost two.
template <typename T, int Slot = 0>
T* thread_scratch(size_t n) {
  static_assert(64 % sizeof(T) == 0, "thread_scratch: element size must divide 64");
  constexpr size_t kPad = 64 / sizeof(T);
  static thread_local std::vector<T> buf;
  if (buf.size() < n + kPad) {
    std::vector<T>().swap(buf);
    buf.resize(n + kPad);
  }
  const auto addr = reinterpret_cast<std::uintptr_t>(buf.data());
  return buf.data() + ((64 - addr % 64) % 64) / sizeof(T);
}

}  // namespace nvembed::cpu
