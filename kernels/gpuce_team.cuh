// gpuce: how the threads, blocks and clusters of a team combine a row's partial state, and how
// a launch finishes its batch: the lane merges (xor butterflies), the block merge, the cluster
// exchange through distributed shared memory (tagged stores, polled), the fixed-order block
// sums and the last-block ticket.  Order-fixed everywhere: results repeat bit for bit.
//
// Written once for every row-state policy.  A row state S (cross-entropy's: CePart in
// gpuce_ce_policy.cuh) provides
//   typedef value_type A; A m, ms;   the maximum seen (NaN-propagating) and its finite shift
//                                     (m when finite, else 0): every softmax state has them
//   static S identity();             the state of no values
//   void rebase(A m, A ms, bool extra)  move its sums to the shift ms of the maximum m
//   void each_sum(f, bool extra)     f(word) for each word that adds as it is once two states
//                                     share a shift, in a fixed order
//   WORDS, A word(int i), store(A*), static S load(const A*)   the state as WORDS values
// ``extra`` says whether the policy's optional words are live in this call (cross-entropy's
// coefficient sums), so a call that does not need them pays nothing for them.  A batch
// accumulator B provides NSUM, double sum(int q) (its float64 sums, q < NSUM) and bad (the
// first bad row position, LLONG_MAX for none); its batch outputs O a
// write(tot, first, ws) run once by the last block.
// Pasted into gpuce_sce_fused.cu by gpuce._cuda.source after gpuce_rowmath.cuh.

namespace gpuce {

template <typename A>
__device__ __forceinline__ A shfl_xor(A v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }

// The sums of W lanes' states that share one shift (xor butterflies: every lane ends with
// the same bits).
template <int W, typename S>
__device__ __forceinline__ S lanes_sum(S p, bool extra) {
    typedef typename S::value_type A;
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) p.each_sum([&](A& v) { v += shfl_xor(v, o); }, extra);
    return p;
}

// Merge the states of W lanes (xor butterflies, W a power of two <= 32): the lanes agree
// on the maximum first, each moves its sums to that shift (at most one exp), then plain sums.
// Every lane ends with the same bits (IEEE addition and the max commute), and the order is
// fixed, so results repeat run to run.  Cheaper than W - 1 full pairwise merges (each with
// two rescales): the block merge of a 512-thread block went from ~630 to ~130 instructions
// a thread a row.
template <int W, typename S>
__device__ __forceinline__ S lanes_merge(S p, bool extra) {
    typedef typename S::value_type A;
    A m = p.m;
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) m = nanmax_fast(m, shfl_xor(m, o));
    p.rebase(m, isfinite(m) ? m : A(0), extra);
    return lanes_sum<W>(p, extra);
}

// Whole-block merge: each warp merges its lanes, lane 0 stores the warp's state into red
// (double-buffered by row parity: one barrier a row), then every warp merges the warps'
// states from red the same way (lane l takes warp l's), so every thread ends with the
// same bits.  red holds 2 * 32 * S::WORDS values.
template <typename S>
__device__ __forceinline__ S block_merge(S p, typename S::value_type* red, int parity, bool extra) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    p = lanes_merge<32>(p, extra);
    typename S::value_type* buf = red + parity * 32 * S::WORDS;
    if (lane == 0) p.store(buf + warp * S::WORDS);
    __syncthreads();
    return lanes_merge<32>(lane < nw ? S::load(buf + lane * S::WORDS) : S::identity(), extra);
}

// ------------------------------------------------------------------------- batch finishing
// Block sums of the thread accumulators in a fixed order (and the block's first bad row),
// written as block b's partials (GPUCE_NWORDS words a block: NSUM sums and the bad row); the
// last block of the launch (ticket) combines the partials in block order, has the batch
// outputs written (out.write) and resets the ticket for the next launch on the stream.
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

template <typename B, typename O>
__device__ void finish_launch(const B& acc, long long* ws, int ticket, const O& out) {
    static_assert(B::NSUM + 1 <= GPUCE_NWORDS, "the workspace holds GPUCE_NWORDS words a block");
    __shared__ double red[32];
    __shared__ gpuce_i64 redi[32];
    __shared__ int last[1];
    long long* part = ws + GPUCE_WS_PARTIALS;
#pragma unroll
    for (int q = 0; q < B::NSUM; ++q) {
        const double s = block_sum_fixed(acc.sum(q), red);
        if (threadIdx.x == 0) part[GPUCE_NWORDS * blockIdx.x + q] = __double_as_longlong(s);
    }
    const long long bad = block_min(acc.bad, redi);
    if (threadIdx.x == 0) {
        part[GPUCE_NWORDS * blockIdx.x + B::NSUM] = bad;
        __threadfence();
        const unsigned long long t = atomicAdd(reinterpret_cast<unsigned long long*>(ws + ticket), 1ull);
        last[0] = t == gridDim.x - 1;
    }
    __syncthreads();
    if (!last[0]) return;
    __threadfence();
    double tot[B::NSUM];
#pragma unroll
    for (int q = 0; q < B::NSUM; ++q) {
        double s = 0.0;
        for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x)
            s += __longlong_as_double(__ldcg(part + GPUCE_NWORDS * b + q));
        tot[q] = block_sum_fixed(s, red);
    }
    long long first = 0x7fffffffffffffffLL;
    for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x)
        first = min(first, __ldcg(part + GPUCE_NWORDS * b + B::NSUM));
    first = block_min(first, redi);
    if (threadIdx.x == 0) {
        out.write(tot, first, ws);
        ws[ticket] = 0;
        __threadfence();
    }
}

// ------------------------------------------------------------------------- cluster exchange
// Clusters: the block states of a row go to every block of the cluster as tagged 64-bit
// words (value bits | tag << 32, tag = the row's step + 1) stored into the peers' shared
// memory, buffered by row parity; in every warp of a block, lane l polls rank l's words in
// its own buffer until they carry the row's tag, then the warp merges them (lanes_merge).  A
// buffer is written again two rows later, by which time every warp has read it (a block
// sends row i + 1 after the block barrier of row i + 1's block merge, which every warp
// reaches only after reading row i).  Float partials only (the tag needs the word's upper
// half).
typedef unsigned long long gpuce_u64;

template <typename S, int CL>
struct ClusterXchg;  // CL > 1: below, for sm_90

// One block (CL == 1): nothing to exchange.  Float states on sm_90 still pass a cluster
// barrier (a cluster of one) at the start and the end, and zero a few shared words, as every
// float kernel has done since the cluster kernels came: without them the register allocation
// of the float32 warp teams moves from 79 to 85 registers, three blocks an SM to two, and the
// 16-bit block teams' code grows 2 %.  Taking them out is a change to measure on a GPU.
template <typename S>
struct ClusterXchg<S, 1> {
    __device__ __forceinline__ void init() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
        if constexpr (sizeof(typename S::value_type) == 4) {
            __shared__ gpuce_u64 words[2 * S::WORDS];
            for (int i = threadIdx.x; i < 2 * S::WORDS; i += blockDim.x) words[i] = 0ull;
            cooperative_groups::this_cluster().sync();
        }
#endif
    }
    __device__ __forceinline__ void finish() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
        if constexpr (sizeof(typename S::value_type) == 4) cooperative_groups::this_cluster().sync();
#endif
    }
    __device__ __forceinline__ S merge(const S& p, int, unsigned, int, bool) { return p; }
};

__device__ __forceinline__ int cluster_block_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return (int)cooperative_groups::this_cluster().block_rank();
#else
    return 0;
#endif
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
// The exchange's tagged words: each 64-bit word carries its value and its row's tag, so a
// reader needs nothing but the word itself.  A slot is written again two rows later, after
// the writer has seen the reader's words of the row between, which the reader stored after
// reading the slot: that order holds on the hardware through the control dependency of the
// poll loops, but it is not a release/acquire pair in PTX's memory model.  GPUCE_XCHG_ORDERED
// makes it one (st.release.cluster / ld.acquire.cluster).  Not the default: on sm_90 (ptxas
// 13.0) each release store becomes MEMBAR.ALL.GPU + CGAERRBAR, waiting on the thread's pending
// global stores, and each acquire poll a CCTL.IVALL that empties the SM's L1: a cost a row to
// be timed (gpu_check.sh part variants runs both) before it can be called free.
__device__ __forceinline__ void st_remote_tagged(unsigned long long* local_addr, int rank, unsigned long long v) {
#if defined(GPUCE_SIMT)
    simt_store_remote(local_addr, rank, v);
#else
    unsigned addr = (unsigned)__cvta_generic_to_shared(local_addr), raddr;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(raddr) : "r"(addr), "r"(rank));
#if defined(GPUCE_XCHG_ORDERED)
    asm volatile("st.release.cluster.shared::cluster.u64 [%0], %1;\n" ::"r"(raddr), "l"(v) : "memory");
#else
    asm volatile("st.relaxed.cluster.shared::cluster.u64 [%0], %1;\n" ::"r"(raddr), "l"(v) : "memory");
#endif
#endif
}

__device__ __forceinline__ unsigned long long ld_tagged(const unsigned long long* p) {
#if defined(GPUCE_SIMT)
    return simt_load_relaxed(p);
#else
    unsigned long long v;
    const unsigned addr = (unsigned)__cvta_generic_to_shared(p);
#if defined(GPUCE_XCHG_ORDERED)
    asm volatile("ld.acquire.cluster.shared::cta.u64 %0, [%1];\n" : "=l"(v) : "r"(addr) : "memory");
#else
    asm volatile("ld.relaxed.cluster.shared::cta.u64 %0, [%1];\n" : "=l"(v) : "r"(addr) : "memory");
#endif
    return v;
#endif
}

template <typename S, int CL>
struct ClusterXchg {
    static_assert(sizeof(typename S::value_type) == 4, "cluster teams exchange float states only");
    static constexpr int WORDS = S::WORDS;
    unsigned long long* buf;  // [2][CL][WORDS] tagged words
    __device__ __forceinline__ void init() {
        __shared__ gpuce_u64 words[2 * CL * WORDS];
        buf = words;
        for (int i = threadIdx.x; i < 2 * CL * WORDS; i += blockDim.x) words[i] = 0ull;
        cooperative_groups::this_cluster().sync();  // zeroed everywhere before any peer writes
    }
    __device__ __forceinline__ void finish() {
        cooperative_groups::this_cluster().sync();  // no block leaves while a peer may still write
    }
    __device__ __forceinline__ S merge(const S& p, int rank, unsigned tag, int parity, bool extra) {
        unsigned long long* mine = buf + (parity * CL + rank) * WORDS;
        for (int q = threadIdx.x; q < CL * WORDS; q += blockDim.x) {  // word q % WORDS to rank q / WORDS
            const int dst = q / WORDS, wd = q % WORDS;
            st_remote_tagged(mine + wd, dst, (gpuce_u64)__float_as_uint(p.word(wd)) | ((gpuce_u64)tag << 32));
        }
        // in every warp, lane l < CL waits for rank l's words; the warp then merges the CL
        // states (lanes_merge: the same bits in every lane of every warp of the cluster)
        const int lane = threadIdx.x & 31;
        S r = S::identity();
        if (lane < CL) {
            const gpuce_u64* src = buf + (parity * CL + lane) * WORDS;
            float vals[WORDS];
#pragma unroll
            for (int wd = 0; wd < WORDS; ++wd) {
                gpuce_u64 word = ld_tagged(src + wd);
                while ((unsigned)(word >> 32) != tag) word = ld_tagged(src + wd);
                vals[wd] = __uint_as_float((unsigned)word);
            }
            r = S::load(vals);
        }
        return lanes_merge<32>(r, extra);
    }
};
#endif

}  // namespace gpuce
