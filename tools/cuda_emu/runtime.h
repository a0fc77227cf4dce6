// The emulated CUDA runtime shared by the CPU kernel emulators (tools/infonce_emu, tools/flash_emu): a CTA runs as
// one std::thread per CUDA thread. Emulated: __syncthreads (a std::barrier over the CTA's threads), __shfl_xor_sync
// (a warp exchange), and mma.sync m16n8k16 (EmuMma: a warp-collective product that places operands by the atom's
// own CuTe fragment layouts). Copies use logical equivalents chosen by each emulator (plain 16-byte copies for
// cp.async, per-thread fragment copies for ldmatrix), so cp.async wait counts are not exercised.
#pragma once
#include <cute/tensor.hpp>

#include <atomic>
#include <barrier>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

// ---- the emulated CUDA runtime --------------------------------------------------------------------------------------

namespace emu {

struct Warp {
  std::barrier<> bar{32};
  float shfl[2][32];
  uint32_t a[2][32][4];
  uint32_t b[2][32][2];
};

struct Block {
  explicit Block(int threads) : bar(threads), warps(threads / 32) {
    for (auto& w : warps) w = std::make_unique<Warp>();
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

thread_local Block* tl_block = nullptr;
thread_local int tl_tid = 0;
thread_local unsigned tl_shfl_phase = 0, tl_mma_phase = 0;

inline Warp& warp() { return *tl_block->warps[tl_tid / 32]; }

// Runs fn(tid, smem) on `threads` threads as one CTA; shared memory starts as NaN bytes.
inline void run_block(int threads, int smem_bytes, const std::function<void(int, char*)>& fn) {
  Block block(threads);
  std::vector<char> smem(smem_bytes + 128, static_cast<char>(0xFF));
  char* base = smem.data() + (128 - reinterpret_cast<uintptr_t>(smem.data()) % 128) % 128;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      tl_block = &block;
      tl_tid = t;
      tl_shfl_phase = tl_mma_phase = 0;
      fn(t, base);
    });
  }
  for (auto& th : pool) th.join();
}

// One warp-wide m16n8k16 product D = A B^T + C: each lane deposits its registers, then computes its own D values.
// Two alternating deposit buffers: a buffer is rewritten two calls later, after every lane passed the barrier of
// the call in between, i.e. finished reading it.
template <class Real>
void mma(float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  using T = cute::MMA_Traits<Real>;
  using VA = typename T::ValTypeA;
  static_assert(std::is_same_v<typename T::Shape_MNK, cute::Shape<cute::_16, cute::_8, cute::_16>>);
  Warp& w = warp();
  const int lane = tl_tid % 32, ph = tl_mma_phase++ & 1;
  std::memcpy(w.a[ph][lane], a, sizeof(uint32_t) * 4);
  std::memcpy(w.b[ph][lane], b, sizeof(uint32_t) * 2);
  w.bar.arrive_and_wait();
  auto unpack = [](uint32_t reg, int half) {
    return static_cast<float>(VA::bitcast(static_cast<uint16_t>((reg >> (16 * half)) & 0xFFFFu)));
  };
  float A[16][16], B[8][16];
  for (int l = 0; l < 32; ++l) {
    for (int v = 0; v < 8; ++v) {
      const int idx = typename T::ALayout{}(l, v);  // m + 16 k
      A[idx % 16][idx / 16] = unpack(w.a[ph][l][v / 2], v % 2);
    }
    for (int v = 0; v < 4; ++v) {
      const int idx = typename T::BLayout{}(l, v);  // n + 8 k
      B[idx % 8][idx / 8] = unpack(w.b[ph][l][v / 2], v % 2);
    }
  }
  for (int v = 0; v < 4; ++v) {
    const int idx = typename T::CLayout{}(lane, v);  // m + 16 n
    const int m = idx % 16, n = idx / 16;
    float s = c[v];
    for (int k = 0; k < 16; ++k) s += A[m][k] * B[n][k];
    d[v] = s;
  }
}

}  // namespace emu

void __syncthreads() { emu::tl_block->bar.arrive_and_wait(); }

float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  emu::Warp& w = emu::warp();
  const int lane = emu::tl_tid % 32, ph = emu::tl_shfl_phase++ & 1;
  w.shfl[ph][lane] = v;
  w.bar.arrive_and_wait();
  return w.shfl[ph][lane ^ lane_mask];
}

// Cache-hinted global accesses: plain loads / stores on the host.
inline float2 __ldcg(const float2* p) { return *p; }
inline void __stcg(float2* p, float2 v) { *p = v; }

template <class Real>
struct EmuMma {
  using DRegisters = float[4];
  using ARegisters = uint32_t[4];
  using BRegisters = uint32_t[2];
  using CRegisters = float[4];
  static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0, uint32_t const& a1,
                  uint32_t const& a2, uint32_t const& a3, uint32_t const& b0, uint32_t const& b1, float const& c0,
                  float const& c1, float const& c2, float const& c3) {
    const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
    const float c[4] = {c0, c1, c2, c3};
    float d[4];
    emu::mma<Real>(d, a, b, c);
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
  }
};

namespace cute {
template <class Real>
struct MMA_Traits<EmuMma<Real>> : MMA_Traits<Real> {};
}  // namespace cute
