// A small SIMT emulator for running gpuce's CUDA kernels on the host in tests.
// One block runs at a time, each CUDA thread as a std::thread; __syncthreads is a block
// barrier, __shfl_xor_sync exchanges through a per-warp slot array between two warp
// barriers, and __shared__ variables become function statics (one block at a time).
// Slow and only for small launches, but it executes the kernels' real indexing,
// reductions and barriers.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct WarpCtx {
    std::barrier<> bar{32};
    double slots[32];
};
inline thread_local WarpCtx* tl_warp = nullptr;
inline std::barrier<>* g_block_bar = nullptr;
inline unsigned char* g_dyn_smem = nullptr;

inline void __syncthreads() { g_block_bar->arrive_and_wait(); }

template <typename A>
inline A __shfl_xor_sync(unsigned, A v, int o) {
    const int lane = threadIdx.x & 31;
    tl_warp->slots[lane] = static_cast<double>(v);  // float -> double -> float is exact
    tl_warp->bar.arrive_and_wait();
    const double r = tl_warp->slots[lane ^ o];
    tl_warp->bar.arrive_and_wait();
    return static_cast<A>(r);
}

inline float __int_as_float(unsigned int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(unsigned long long i) { double d; std::memcpy(&d, &i, 8); return d; }

struct __half {
    _Float16 v;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }

using std::exp;
using std::isfinite;
using std::isnan;
using std::log;
using std::min;

template <typename F>
void simt_launch(unsigned grid, unsigned block, size_t shm, F body) {
    std::vector<unsigned char> dyn(shm + 16);
    g_dyn_smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(dyn.data()) + 15) & ~uintptr_t(15));
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> bar(block);
        g_block_bar = &bar;
        std::vector<std::unique_ptr<WarpCtx>> warps;
        for (unsigned w = 0; w < block / 32; ++w) warps.emplace_back(new WarpCtx());
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([&, t, b] {
                threadIdx.x = t;
                blockIdx.x = b;
                tl_warp = warps[t / 32].get();
                body();
            });
        }
        for (auto& th : threads) th.join();
    }
}
