// gpuce: how the threads, blocks and clusters of a team combine a row's partial state, and how
// a launch finishes its batch: the lane merges (xor butterflies), the block merge, the cluster
// exchange through distributed shared memory (tagged stores, polled), the fixed-order block
// sums and the last-block ticket.  Order-fixed everywhere: results repeat bit for bit.
// Pasted into gpuce_sce_fused.cu by gpuce._cuda.source after the row state (Part) and the
// batch accumulator (Acc) it combines.

namespace gpuce {

template <typename A>
__device__ __forceinline__ A shfl_xor(A v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }

// The sums of W lanes' partials that share one shift (xor butterflies: every lane ends with
// the same bits).
template <int W, typename A>
__device__ __forceinline__ Part<A> lanes_sum(Part<A> p, bool coefs) {
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) {
        p.s += shfl_xor(p.s, o);
        p.xk += shfl_xor(p.xk, o);
        if (coefs) {
            p.a += shfl_xor(p.a, o);
            p.b += shfl_xor(p.b, o);
        }
    }
    return p;
}

// Merge the partials of W lanes (xor butterflies, W a power of two <= 32): the lanes agree
// on the maximum first, each moves its sums to that shift (at most one exp), then plain sums.
// Every lane ends with the same bits (IEEE addition and the max commute), and the order is
// fixed, so results repeat run to run.  Cheaper than W - 1 full pairwise merges (each with
// two rescales): the block merge of a 512-thread block went from ~630 to ~130 instructions
// a thread a row.  ``coefs``: also the coefficient sums a and b (0 everywhere otherwise).
template <int W, typename A>
__device__ __forceinline__ Part<A> lanes_merge(Part<A> p, bool coefs) {
    A m = p.m;
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) m = nanmax_fast(m, shfl_xor(m, o));
    const A ms = isfinite(m) ? m : A(0);
    p.s = rescaled(p.s, p.ms, ms);
    if (coefs) p.b += shift(p.a, p.ms, ms);
    p.m = m;
    p.ms = ms;
    return lanes_sum<W>(p, coefs);
}

#define GPUCE_PART_WORDS 6
template <typename A>
__device__ __forceinline__ void part_store(A* d, const Part<A>& p) {
    d[0] = p.m; d[1] = p.ms; d[2] = p.s; d[3] = p.a; d[4] = p.b; d[5] = p.xk;
}
template <typename A>
__device__ __forceinline__ Part<A> part_load(const A* d) {
    Part<A> p;
    p.m = d[0]; p.ms = d[1]; p.s = d[2]; p.a = d[3]; p.b = d[4]; p.xk = d[5];
    return p;
}

// Whole-block merge: each warp merges its lanes, lane 0 stores the warp's partial into red
// (double-buffered by row parity: one barrier a row), then every warp merges the warps'
// partials from red the same way (lane l takes warp l's), so every thread ends with the
// same bits.  red holds 2 * 32 * GPUCE_PART_WORDS values.
template <typename A>
__device__ __forceinline__ Part<A> block_merge(Part<A> p, A* red, int parity, bool coefs) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    p = lanes_merge<32>(p, coefs);
    A* buf = red + parity * 32 * GPUCE_PART_WORDS;
    if (lane == 0) part_store(buf + warp * GPUCE_PART_WORDS, p);
    __syncthreads();
    return lanes_merge<32>(lane < nw ? part_load(buf + lane * GPUCE_PART_WORDS) : part_identity<A>(), coefs);
}

// ------------------------------------------------------------------------- batch finishing
// Block sums of the thread accumulators in a fixed order (and the block's first bad label),
// written as block b's partials; the last block of the launch (ticket) combines the partials
// in block order and writes the outputs: total_out = loss sum * inv; stats_out = {z part sum
// * inv, correct / active (NaN when no row is active)}; bad_out = {the first bad label
// position (n when none), the first bad class weight (-1 when none)}.  It then resets the ticket for the next launch on the stream.
__device__ __forceinline__ double block_sum_fixed(double v, double* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    double r = red[0];
    for (int i = 1; i < nw; ++i) r += red[i];
    return r;
}

__device__ __forceinline__ long long block_min(long long v, long long* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, (long long)__shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    long long r = red[0];
    for (int i = 1; i < nw; ++i) r = min(r, red[i]);
    return r;
}

template <typename A>
__device__ void finish_launch(Acc acc, long long* ws, int ticket, long long n, double inv, A* total_out,
                              A* stats_out, long long* bad_out) {
    __shared__ double red[32];
    __shared__ gpuce_i64 redi[32];
    __shared__ int last[1];
    long long* part = ws + GPUCE_WS_PARTIALS;
    const double v[GPUCE_NPART] = {acc.loss, acc.zpart, acc.correct, acc.active};
#pragma unroll
    for (int q = 0; q < GPUCE_NPART; ++q) {
        const double s = block_sum_fixed(v[q], red);
        if (threadIdx.x == 0) part[GPUCE_NWORDS * blockIdx.x + q] = __double_as_longlong(s);
    }
    const long long bad = block_min(acc.bad, redi);
    if (threadIdx.x == 0) {
        part[GPUCE_NWORDS * blockIdx.x + GPUCE_NPART] = bad;
        __threadfence();
        const unsigned long long t = atomicAdd(reinterpret_cast<unsigned long long*>(ws + ticket), 1ull);
        last[0] = t == gridDim.x - 1;
    }
    __syncthreads();
    if (!last[0]) return;
    __threadfence();
    double tot[GPUCE_NPART];
#pragma unroll
    for (int q = 0; q < GPUCE_NPART; ++q) {
        double s = 0.0;
        for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x)
            s += __longlong_as_double(__ldcg(part + GPUCE_NWORDS * b + q));
        tot[q] = block_sum_fixed(s, red);
    }
    long long first = 0x7fffffffffffffffLL;
    for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x)
        first = min(first, __ldcg(part + GPUCE_NWORDS * b + GPUCE_NPART));
    first = block_min(first, redi);
    if (threadIdx.x == 0) {
        if (total_out) *total_out = A(tot[0] * inv);
        if (stats_out) {
            stats_out[0] = A(tot[1] * inv);
            stats_out[1] = tot[3] > 0.0 ? A(tot[2] / tot[3]) : quiet_nan<A>();
        }
        if (bad_out) {
            bad_out[0] = first < n ? first : n;
            bad_out[1] = ws[4] - 1;  // the first bad class weight, -1 for none
        }
        ws[4] = 0;
        ws[ticket] = 0;
        __threadfence();
    }
}

// ------------------------------------------------------------------------- cluster exchange
// Clusters: the block partials of a row go to every block of the cluster as tagged 64-bit
// words (value bits | tag << 32, tag = the row's step + 1) stored into the peers' shared
// memory, buffered by row parity; in every warp of a block, lane l polls rank l's words in
// its own buffer until they carry the row's tag, then the warp merges them (lanes_merge).  A
// buffer is written again two rows later, by which time every warp has read it (a block
// sends row i + 1 after the block barrier of row i + 1's block merge, which every warp
// reaches only after reading row i).  Float partials only (the tag needs the word's upper
// half).
typedef unsigned long long gpuce_u64;

template <typename A, int CL>
struct ClusterXchg {  // CL == 1: nothing to exchange
    static_assert(CL == 1, "cluster teams exchange float partials only");
    __device__ __forceinline__ void init() {}
    __device__ __forceinline__ void finish() {}
    __device__ __forceinline__ Part<A> merge(const Part<A>& p, int, unsigned, int, bool) { return p; }
};

__device__ __forceinline__ int cluster_block_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return (int)cooperative_groups::this_cluster().block_rank();
#else
    return 0;
#endif
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
__device__ __forceinline__ void st_remote_tagged(unsigned long long* local_addr, int rank, unsigned long long v) {
#if defined(GPUCE_SIMT)
    simt_store_remote(local_addr, rank, v);
#else
    unsigned addr = (unsigned)__cvta_generic_to_shared(local_addr), raddr;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(raddr) : "r"(addr), "r"(rank));
    asm volatile("st.relaxed.cluster.shared::cluster.u64 [%0], %1;\n" ::"r"(raddr), "l"(v) : "memory");
#endif
}

__device__ __forceinline__ unsigned long long ld_tagged(const unsigned long long* p) {
#if defined(GPUCE_SIMT)
    return simt_load_relaxed(p);
#else
    unsigned long long v;
    const unsigned addr = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ld.relaxed.cluster.shared::cta.u64 %0, [%1];\n" : "=l"(v) : "r"(addr) : "memory");
    return v;
#endif
}

template <int CL>
struct ClusterXchg<float, CL> {
    unsigned long long* buf;  // [2][CL][GPUCE_PART_WORDS] tagged words
    __device__ __forceinline__ void init() {
        __shared__ gpuce_u64 words[2 * CL * GPUCE_PART_WORDS];
        buf = words;
        for (int i = threadIdx.x; i < 2 * CL * GPUCE_PART_WORDS; i += blockDim.x) words[i] = 0ull;
        cooperative_groups::this_cluster().sync();  // zeroed everywhere before any peer writes
    }
    __device__ __forceinline__ void finish() {
        cooperative_groups::this_cluster().sync();  // no block leaves while a peer may still write
    }
    __device__ __forceinline__ Part<float> merge(const Part<float>& p, int rank, unsigned tag, int parity, bool coefs) {
        unsigned long long* mine = buf + (parity * CL + rank) * GPUCE_PART_WORDS;
        for (int q = threadIdx.x; q < CL * GPUCE_PART_WORDS; q += blockDim.x) {  // word q % 6 to rank q / 6
            const int dst = q / GPUCE_PART_WORDS, wd = q % GPUCE_PART_WORDS;
            const float v = wd == 0 ? p.m : wd == 1 ? p.ms : wd == 2 ? p.s : wd == 3 ? p.a : wd == 4 ? p.b : p.xk;
            st_remote_tagged(mine + wd, dst, (gpuce_u64)__float_as_uint(v) | ((gpuce_u64)tag << 32));
        }
        // in every warp, lane l < CL waits for rank l's words; the warp then merges the CL
        // partials (lanes_merge: the same bits in every lane of every warp of the cluster)
        const int lane = threadIdx.x & 31;
        Part<float> r = part_identity<float>();
        if (lane < CL) {
            const gpuce_u64* src = buf + (parity * CL + lane) * GPUCE_PART_WORDS;
            float vals[GPUCE_PART_WORDS];
#pragma unroll
            for (int wd = 0; wd < GPUCE_PART_WORDS; ++wd) {
                gpuce_u64 word = ld_tagged(src + wd);
                while ((unsigned)(word >> 32) != tag) word = ld_tagged(src + wd);
                vals[wd] = __uint_as_float((unsigned)word);
            }
            r = part_load(vals);
        }
        return lanes_merge<32>(r, coefs);
    }
};
#endif

}  // namespace gpuce
