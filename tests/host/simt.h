// A small SIMT emulator for running gpuce's CUDA kernels on the host in tests.
// Each CUDA thread runs as a std::thread.  Blocks run one cluster at a time (a cluster of one
// block for ordinary launches); __syncthreads is a block barrier, __shfl_xor_sync exchanges
// through a per-warp slot array between two warp barriers, __shared__ arrays and the dynamic
// shared memory live in per-block storage, and a minimal cooperative_groups::this_cluster()
// gives block_rank, sync (a cluster barrier) and map_shared_rank (the same shared array of
// another block of the cluster).  Slow and only for small launches, but it executes the
// kernels' real indexing, reductions, barriers and cluster exchanges.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct WarpCtx {
    std::barrier<> bar{32};
    unsigned char slots[32][8];
};

struct BlockCtx {
    explicit BlockCtx(unsigned threads, size_t shm) : bar(threads), dyn(shm + 16) {
        for (unsigned w = 0; w < threads / 32; ++w) warps.emplace_back(new WarpCtx());
    }
    std::barrier<> bar;
    std::vector<std::unique_ptr<WarpCtx>> warps;
    std::vector<unsigned char> dyn;
    std::mutex mu;
    std::map<int, std::vector<unsigned char>> arrays;  // __shared__ arrays by declaration site
    unsigned char* dyn_aligned() {
        return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(dyn.data()) + 15) & ~uintptr_t(15));
    }
};

struct ClusterCtx {
    explicit ClusterCtx(unsigned threads) : bar(threads) {}
    std::barrier<> bar;
    std::vector<BlockCtx*> blocks;
};

inline thread_local BlockCtx* tl_block = nullptr;
inline thread_local ClusterCtx* tl_cluster = nullptr;
inline thread_local unsigned tl_rank = 0;

inline void __syncthreads() { tl_block->bar.arrive_and_wait(); }

template <typename A>
inline A __shfl_xor_sync(unsigned, A v, int o) {
    static_assert(sizeof(A) <= 8, "shuffle of at most 8 bytes");
    const int lane = threadIdx.x & 31;
    WarpCtx* w = tl_block->warps[threadIdx.x / 32].get();
    std::memcpy(w->slots[lane], &v, sizeof(A));
    w->bar.arrive_and_wait();
    A r;
    std::memcpy(&r, w->slots[lane ^ o], sizeof(A));
    w->bar.arrive_and_wait();
    return r;
}

// __shared__ T name[n]  ->  T* name = simt_shared<T>(site, n)
template <typename T>
inline T* simt_shared(int site, size_t n) {
    std::lock_guard<std::mutex> lock(tl_block->mu);
    auto& buf = tl_block->arrays[site];
    if (buf.empty()) buf.assign(n * sizeof(T) + 16, 0);
    return reinterpret_cast<T*>(buf.data());
}
inline unsigned char* simt_dyn_smem() { return tl_block->dyn_aligned(); }

// cp.async: a thread's copies are held back until a copy_wait of its own lets their group
// complete (the latest a GPU may complete them, source read included), so a kernel that reads
// a ring stage before waiting for it, waits for the wrong number of groups, or overwrites a
// stage another thread still reads, computes with stale data here instead of passing by luck.
struct SimtCopy {
    void* dst;
    const void* src;
    size_t bytes;
    unsigned group;
};
inline thread_local std::vector<SimtCopy> tl_copies;
inline thread_local unsigned tl_group = 0;  // groups committed so far
inline void simt_copy_async(void* dst, const void* src, size_t bytes) {
    tl_copies.push_back({dst, src, bytes, tl_group});
}
inline void simt_copy_commit() { ++tl_group; }
// cp.async.wait_group pending: every committed group but the last `pending` completes.
inline void simt_copy_wait(int pending) {
    const unsigned done = tl_group > (unsigned)pending ? tl_group - (unsigned)pending : 0;
    size_t k = 0;
    for (size_t i = 0; i < tl_copies.size(); ++i) {
        if (tl_copies[i].group < done) std::memcpy(tl_copies[i].dst, tl_copies[i].src, tl_copies[i].bytes);
        else tl_copies[k++] = tl_copies[i];
    }
    tl_copies.resize(k);
}

namespace cooperative_groups {
struct cluster_group {
    unsigned block_rank() const { return tl_rank; }
    void sync() const { tl_cluster->bar.arrive_and_wait(); }
    template <typename T>
    T* map_shared_rank(T* p, int rank) const {
        BlockCtx* mine = tl_block;
        BlockCtx* other = tl_cluster->blocks[rank];
        auto* q = reinterpret_cast<unsigned char*>(p);
        int site = -1;
        ptrdiff_t off = 0;
        {  // one lock at a time: no lock-order inversion between blocks
            std::lock_guard<std::mutex> lock(mine->mu);
            for (auto& [s, buf] : mine->arrays) {
                if (q >= buf.data() && q < buf.data() + buf.size()) { site = s; off = q - buf.data(); }
            }
        }
        if (site < 0) return reinterpret_cast<T*>(other->dyn_aligned() + (q - mine->dyn_aligned()));
        std::lock_guard<std::mutex> lock(other->mu);
        return reinterpret_cast<T*>(other->arrays.at(site).data() + off);
    }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

inline float __int_as_float(unsigned int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(unsigned long long i) { double d; std::memcpy(&d, &i, 8); return d; }

struct __half {
    _Float16 v;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }

using std::exp;
inline float exp2f(float x) { return std::exp2(x); }
using std::isfinite;
using std::isnan;
using std::log;
using std::min;

// Launch `grid` blocks of `block` threads, `cluster` blocks at a time sharing a cluster.
template <typename F>
void simt_launch(unsigned grid, unsigned block, size_t shm, F body, unsigned cluster = 1) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b0 = 0; b0 < grid; b0 += cluster) {
        ClusterCtx cl(block * cluster);
        std::vector<std::unique_ptr<BlockCtx>> blocks;
        for (unsigned r = 0; r < cluster; ++r) {
            blocks.emplace_back(new BlockCtx(block, shm));
            cl.blocks.push_back(blocks.back().get());
        }
        // every block's __shared__ arrays exist before any thread maps another block's
        std::vector<std::thread> threads;
        for (unsigned r = 0; r < cluster; ++r) {
            for (unsigned t = 0; t < block; ++t) {
                threads.emplace_back([&, r, t] {
                    threadIdx.x = t;
                    blockIdx.x = b0 + r;
                    tl_block = blocks[r].get();
                    tl_cluster = &cl;
                    tl_rank = r;
                    body();
                });
            }
        }
        for (auto& th : threads) th.join();
    }
}

// ---- what the fused kernels use beyond the above
#include <atomic>
#include <cstdint>
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = uint32_t(h.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((u >> 16) | 0x40)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return __nv_bfloat16{uint16_t(u >> 16)};
}
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline float __frcp_rn(float x) { return 1.0f / x; }
using std::copysign;
inline float copysignf(float a, float b) { return std::copysign(a, b); }
inline float fabsf(float a) { return std::fabs(a); }
using std::tanh;

template <typename T>
inline T __ldcg(const T* p) { return std::atomic_ref<T>(*const_cast<T*>(p)).load(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
// the cluster exchange's tagged words: a store into another block's shared memory, a poll
inline void simt_store_remote(unsigned long long* local, int rank, unsigned long long v) {
    unsigned long long* dst = cooperative_groups::this_cluster().map_shared_rank(local, rank);
    std::atomic_ref<unsigned long long>(*dst).store(v);
}
inline unsigned long long simt_load_relaxed(const unsigned long long* p) {
    std::this_thread::yield();
    return std::atomic_ref<unsigned long long>(*const_cast<unsigned long long*>(p)).load();
}
inline void __syncwarp(unsigned = 0xffffffffu) { tl_block->warps[threadIdx.x / 32]->bar.arrive_and_wait(); }

// ---- the 16-byte word paths of gpuce_io.cuh and max.NaN, as the device computes them: the
// vector loads and stores as 16-byte memcpys (an address off its 16-byte boundary faults on
// the device: here it aborts), the paired 16-bit types with x in the low half of their word,
// a double's words low first
#include <bit>
#include <cstdio>
#include <cstdlib>
inline void simt_check_16(const void* p) {
    if (reinterpret_cast<uintptr_t>(p) % 16) {
        std::fprintf(stderr, "simt: 16-byte access at %p, off its 16-byte boundary\n", p);
        std::abort();
    }
}
inline void simt_words_load(const void* p, unsigned (&w)[4]) {
    simt_check_16(p);
    std::memcpy(w, p, 16);
}
inline void simt_words_store(void* p, const unsigned (&w)[4]) {
    simt_check_16(p);
    std::memcpy(p, w, 16);
}
struct float2 {
    float x, y;
};
struct alignas(4) __half2 {
    __half x, y;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
static_assert(sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4, "paired 16-bit types are one word");
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline double __hiloint2double(int hi, int lo) {
    return std::bit_cast<double>((uint64_t(uint32_t(hi)) << 32) | uint32_t(lo));
}
inline int __double2loint(double d) { return int(uint32_t(std::bit_cast<uint64_t>(d))); }
inline int __double2hiint(double d) { return int(uint32_t(std::bit_cast<uint64_t>(d) >> 32)); }
// max.NaN.f32: the canonical NaN when either input is NaN; +0 is above -0
inline float simt_max_nan(float a, float b) {
    if (std::isnan(a) || std::isnan(b)) return __uint_as_float(0x7fffffffu);
    if (a == b) return std::signbit(a) ? b : a;
    return a > b ? a : b;
}
