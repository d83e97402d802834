// gpuce: fused softmax cross-entropy -- each row of logits is read from device memory once
// and the gradient written once; the "twopass" variant (reads the row twice) is the fallback
// where no single-read variant fits.
//
// All variants share one parameter list and the maths of gpuce_rowstat.cuh:
//   lse   = m + log s                        s = sum_c e_c,  e_c = exp(x_c - m)
//   loss  = wl * ((m - x_k) + log s) + (a log s - b) + z lse^2      (finish_stats)
//   grad  = scale * (e_j G / s - coef_j - wl [j = k])
// MODE 0: integer labels (coef_j = (eps/C) w_j, wl = (1-eps) w_k; rows with
//         label == ignore_index give loss 0 and a zero gradient row and are not read; a label
//         outside [0, C) gives a NaN row -- the host raises for it after the launch).
// MODE 1: probability targets y (coef_j = w_j ((1-eps) y_j + eps/C), wl = 0).
// w may be null (all weights 1).
//
// The single-read family keeps a row on chip between its read and its gradient write:
//   sce_tile     C <= 32: a block stages 128 dense rows through shared memory with coalesced
//                (16-byte) loads and stores; one thread per row does the maths;
//   sce_warp     G lanes of a warp per row (32 / G rows per warp), ITEMS packs per lane in
//                registers: C <= G * ITEMS * VEC;
//   sce_block    a block per row: ITEMS packs per thread in registers and SITEMS more in
//                shared memory (thread-private slots, no bank conflicts);
//   sce_cluster  sm_90: a thread-block cluster of CL such blocks per row, the partial max and
//                sums exchanged through distributed shared memory (two cluster barriers a row).
// e_c = exp(x_c - m) is computed once and kept in place of x_c, so each element costs one
// exponential; the label logit x_k is read by itself (an L1/L2 hit), so no per-element label
// compare is needed in the sums.
// Reductions are fixed-order trees (xor butterflies, then warps and cluster ranks in index
// order): the same input gives bit-identical loss and gradient run to run.  No floating-point
// atomics.  Offsets are 64-bit (row * ld); C itself must be < 2^31.
// The warp / block / cluster kernels carry __launch_bounds__(256, 3) (labels; 2 for probability
// targets): blocks of at most 256 threads, three of them an SM (80 registers a thread: the 32
// register-resident row values and the rest), so one block's loads overlap another's maths.  Beyond what registers
// hold, 16-byte packs go to shared memory with cp.async (no registers held in flight).
//
// Template instantiations are named by gpuce/_fused.py (name expressions), which is also
// the list the offline NVRTC test compiles.

#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include "gpuce_rowstat.cuh"

namespace gpuce {

template <typename A, typename T> __device__ __forceinline__ A load_acc(T v) { return A(v); }
template <> __device__ __forceinline__ float load_acc<float, __half>(__half v) { return __half2float(v); }
template <typename T, typename A> __device__ __forceinline__ T store_t(A v) { return T(v); }
template <> __device__ __forceinline__ __half store_t<__half, float>(float v) { return __float2half_rn(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
    T v[VEC];
};

template <typename A>
__device__ __forceinline__ A shfl_xor(A v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }

// Butterfly reductions inside aligned groups of G lanes (G a power of two <= 32); every
// lane of the group ends with the same bits.
template <int G, typename A>
__device__ __forceinline__ A group_sum(A v) {
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) v += shfl_xor(v, o);
    return v;
}
template <int G, typename A>
__device__ __forceinline__ A group_max(A v) {
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) v = nanmax(v, shfl_xor(v, o));
    return v;
}

// Block-wide reductions; `red` is shared scratch of at least 32 * 4 values.  Results are
// broadcast to all threads.  Warps are combined in index order (deterministic).
template <typename A>
__device__ A block_max(A v, A* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = group_max<32>(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    A r = red[0];
    for (int i = 1; i < nw; ++i) r = nanmax(r, red[i]);
    return r;
}

template <typename A>
__device__ void block_sum4(A& p, A& q, A& r, A& s, A* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    p = group_sum<32>(p); q = group_sum<32>(q); r = group_sum<32>(r); s = group_sum<32>(s);
    __syncthreads();
    if (lane == 0) { red[4 * warp] = p; red[4 * warp + 1] = q; red[4 * warp + 2] = r; red[4 * warp + 3] = s; }
    __syncthreads();
    p = red[0]; q = red[1]; r = red[2]; s = red[3];
    for (int i = 1; i < nw; ++i) { p += red[4 * i]; q += red[4 * i + 1]; r += red[4 * i + 2]; s += red[4 * i + 3]; }
}

// One exponential: exp2 of a product for float (d = x - m is formed exactly first, so the
// product's rounding costs |d| * 2^-24 relative, nothing for the large terms), exp for double.
__device__ __forceinline__ float ex(float d) { return exp2f(d * 1.4426950408889634f); }
__device__ __forceinline__ double ex(double d) { return exp(d); }

template <typename A>
__device__ void block_sum3(A& p, A& q, A& r, A* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    p = group_sum<32>(p); q = group_sum<32>(q); r = group_sum<32>(r);
    __syncthreads();
    if (lane == 0) { red[4 * warp] = p; red[4 * warp + 1] = q; red[4 * warp + 2] = r; }
    __syncthreads();
    p = red[0]; q = red[1]; r = red[2];
    for (int i = 1; i < nw; ++i) { p += red[4 * i]; q += red[4 * i + 1]; r += red[4 * i + 2]; }
}

// The label fields of a row from its label `lab`: active (not ignored), the label column k
// (-1 for none) and wl = (1 - eps) w_k, NaN for an out-of-range label (a NaN row, never an
// out-of-bounds read).  The one place the label is interpreted, for every kernel.
template <typename A>
__device__ __forceinline__ void label_fields(long long lab, long long ignore_index, int c, const A* w,
                                             A one_minus_eps, bool& active, int& k, A& wl) {
    active = lab != ignore_index;
    k = -1;
    wl = A(0);
    if (active && (lab < 0 || lab >= c)) wl = quiet_nan<A>();
    else if (active) { k = (int)lab; wl = one_minus_eps * (w ? w[k] : A(1)); }
}

// Per-row constants of the two-pass kernel.
template <int MODE, typename T, typename I, typename A>
struct RowCtx {
    bool active;
    int k;          // label column (MODE 0, active rows), else -1
    A wl;           // (1 - eps) w_k or 0
    const T* yrow;  // MODE 1
};

template <int MODE, typename T, typename I, typename A>
__device__ __forceinline__ RowCtx<MODE, T, I, A> row_ctx(long long row, const I* labels, const T* y,
                                                         long long ldy, const A* w, A one_minus_eps,
                                                         long long ignore_index, int c) {
    RowCtx<MODE, T, I, A> r;
    r.yrow = nullptr;
    r.k = -1;
    r.wl = A(0);
    if (MODE == 0) {
        label_fields((long long)labels[row], ignore_index, c, w, one_minus_eps, r.active, r.k, r.wl);
    } else {
        r.active = true;
        r.yrow = y + row * ldy;
    }
    return r;
}

template <int MODE, typename T, typename I, typename A>
__device__ __forceinline__ A coef_at(const RowCtx<MODE, T, I, A>& r, int col, const A* w, A eps_over_c,
                                     A one_minus_eps) {
    A wc = w ? w[col] : A(1);
    if (MODE == 0) return label_coef(r.active, wc, eps_over_c);
    return prob_coef(load_acc<A>(r.yrow[col]), wc, one_minus_eps, eps_over_c);
}

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
    Pack<T, VEC> r;
    if (VEC > 1) r = *reinterpret_cast<const Pack<T, VEC>*>(p);
    else r.v[0] = p[0];
    return r;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& r) {
    if (VEC > 1) *reinterpret_cast<Pack<T, VEC>*>(p) = r;
    else p[0] = r.v[0];
}

template <typename A, typename T, int VEC>
__device__ __forceinline__ Pack<A, VEC> to_acc(const Pack<T, VEC>& p) {
    Pack<A, VEC> r;
#pragma unroll
    for (int u = 0; u < VEC; ++u) r.v[u] = load_acc<A>(p.v[u]);
    return r;
}

// The gradient of VEC consecutive logits xv (columns col0...), stored at grow + col0.
template <int MODE, typename T, typename I, typename A, int VEC>
__device__ __forceinline__ void store_grad(T* grow, int col0, const Pack<A, VEC>& xv,
                                           const RowCtx<MODE, T, I, A>& ctx, const A* w, A eps_over_c,
                                           A one_minus_eps, A mx, A ls, A g, A scale) {
    Pack<T, VEC> p;
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
        const int col = col0 + u;
        const A cf = coef_at<MODE, T, I, A>(ctx, col, w, eps_over_c, one_minus_eps);
        p.v[u] = store_t<T>(grad_element(ctx.active, xv.v[u], mx, ls, g, cf, ctx.wl, col == ctx.k, scale));
    }
    store_pack<T, VEC>(grow + col0, p);
}

template <typename A>
__device__ __forceinline__ void store_row(long long row, bool active, A loss, A mx, A ls, A* loss_out, A* lse_out) {
    loss_out[row] = loss;
    if (lse_out) lse_out[row] = active ? mx + ls : quiet_nan<A>();  // lse of ignored rows: NaN
}

#define GPUCE_SCE_PARAMS                                                                          \
    const T *__restrict__ x, long long ldx, const I *__restrict__ labels, const T *__restrict__ y, \
        long long ldy, const A *__restrict__ w, long long n, int c, A eps_over_c, A one_minus_eps, \
        A z, long long ignore_index, const A *__restrict__ scale_ptr, A *__restrict__ loss_out,   \
        A *__restrict__ lse_out, T *__restrict__ grad, long long ldg

// Blocks an SM must hold (the register cap): 3 for labels (80 registers), 2 for probability
// targets (the target row's addresses and loads need more).
#define GPUCE_BLOCKS_PER_SM(MODE) ((MODE) == 0 ? 3 : 2)

#define GPUCE_SCE_ARGS                                                                             \
    Args<T, I, A> g = {x, ldx, labels, y, ldy, w, n, c, eps_over_c, one_minus_eps, z, ignore_index, \
                       grad ? *scale_ptr : A(0), loss_out, lse_out, grad, ldg}

template <typename T, typename I, typename A>
struct Args {
    const T* x; long long ldx; const I* labels; const T* y; long long ldy; const A* w; long long n; int c;
    A eps_over_c; A one_minus_eps; A z; long long ignore_index; A scale; A* loss_out; A* lse_out; T* grad;
    long long ldg;
};

// The row's label context (label_fields; an invalid row is inactive), from the row index or
// from a label loaded earlier.  The AHEAD kernels
// load each row's label one row ahead (load_label), so that a row's loads never wait for its
// label -- in the others the row's packs are loaded only once the label says the row is not
// ignored (a global-load round trip before every row's loads, visible in the SASS as the
// branch over the LDG.E.128s).
template <int MODE, typename T, typename I, typename A>
__device__ __forceinline__ long long load_label(const Args<T, I, A>& g, long long row) {
    return (MODE == 0 && row < g.n) ? (long long)g.labels[row] : 0;
}

template <int MODE, typename T, typename I, typename A>
__device__ __forceinline__ void label_ctx_from(const Args<T, I, A>& g, long long lab, bool valid, bool& active,
                                               int& k, A& wl) {
    active = valid;
    k = -1;
    wl = A(0);
    if (MODE == 0 && valid) label_fields(lab, g.ignore_index, g.c, g.w, g.one_minus_eps, active, k, wl);
}

template <int MODE, typename T, typename I, typename A>
__device__ __forceinline__ void label_ctx(const Args<T, I, A>& g, long long row, bool valid, bool& active, int& k,
                                          A& wl) {
    // label_fields written out: this is the text that compiled to the kernels that passed the
    // GPU suite; factoring it into the call changes their SASS (scheduling), so it stays.
    active = valid;
    k = -1;
    wl = A(0);
    if (MODE == 0 && valid) {
        const long long lab = (long long)g.labels[row];
        active = lab != g.ignore_index;
        if (active && (lab < 0 || lab >= g.c)) wl = quiet_nan<A>();
        else if (active) { k = (int)lab; wl = g.one_minus_eps * (g.w ? g.w[k] : A(1)); }
    }
}

// coef_j (MODE 0: eps/C w_j; MODE 1: w_j ((1 - eps) y_j + eps/C)); only called when some
// coefficient can be non-zero.
template <int MODE, typename T, typename I, typename A>
__device__ __forceinline__ A coef_of(const Args<T, I, A>& g, const T* yrow, int col) {
    const A wc = g.w ? g.w[col] : A(1);
    if (MODE == 0) return g.eps_over_c * wc;
    return prob_coef(load_acc<A>(yrow[col]), wc, g.one_minus_eps, g.eps_over_c);
}

// Reduction teams: the threads that share a row.
template <int G>
struct WarpTeam {  // G lanes of one warp
    template <typename A> __device__ __forceinline__ A max(A v) const { return group_max<G>(v); }
    template <typename A> __device__ __forceinline__ void sum3(A& p, A& q, A& r) const {
        p = group_sum<G>(p); q = group_sum<G>(q); r = group_sum<G>(r);
    }
};

template <typename A>
struct BlockTeam {  // one block
    A* red;
    __device__ __forceinline__ A max(A v) const { return block_max(v, red); }
    __device__ __forceinline__ void sum3(A& p, A& q, A& r) const { block_sum3(p, q, r, red); }
};

// The result of one row's pass: what the gradient needs.
template <typename A>
struct RowOut {
    bool active, bad;
    int k;
    A r;       // G * scale / s: grad_j = e_j r - scale coef_j - scale wl [j = k]
    A wls;     // wl * scale
    A ms;      // the finite shift (e_j = exp(x_j - ms))
};

// 16-byte asynchronous copy global -> shared (sm_80 cp.async, no registers held while in
// flight); the host emulator copies at once.
__device__ __forceinline__ void copy_async16(void* dst_shared, const void* src_global) {
#if defined(__CUDA_ARCH__) && !defined(GPUCE_SIMT)
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst_shared);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src_global) : "memory");
#else
    memcpy(dst_shared, src_global, 16);
#endif
}
__device__ __forceinline__ void copy_async_wait_all() {
#if defined(__CUDA_ARCH__) && !defined(GPUCE_SIMT)
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#endif
}

// One row with a team of nt threads (this one is tid).  Pack it of the row, it < ITEMS + SITEMS,
// starts at column (it * nt + tid) * VEC.  The first ITEMS packs go to registers (v, converted
// to A), the other SITEMS (16-byte packs only) are copied asynchronously into this thread's own
// shared-memory slots sp[j * sstride] as raw T.  Writes loss and lse (the team's thread 0);
// leaves e_c = exp(x_c - m) in v (the shared-memory part keeps x and is exponentiated again).
template <typename T, typename I, typename A, int MODE, int VEC, int ITEMS, int SITEMS, bool AHEAD, class Team>
__device__ __forceinline__ RowOut<A> row_pass(const Args<T, I, A>& g, const Team& team, long long row, bool valid,
                                              int tid, int nt, A (&v)[ITEMS * VEC], Pack<T, VEC>* sp, int sstride,
                                              long long lab) {
    RowOut<A> o;
    A wl;
    if (AHEAD) label_ctx_from<MODE>(g, lab, valid, o.active, o.k, wl);
    else label_ctx<MODE>(g, row, valid, o.active, o.k, wl);  // the row's loads wait for the label
    const long long rr = valid ? row : 0;
    const T* xrow = g.x + rr * g.ldx;
    const T* yrow = MODE == 1 ? g.y + rr * g.ldy : nullptr;
#pragma unroll 4
    for (int j = 0; j < SITEMS; ++j) {
        const int col0 = ((ITEMS + j) * nt + tid) * VEC;
        if (o.active && col0 < g.c) copy_async16(sp + j * sstride, xrow + col0);
    }
    const A xk = (o.k >= 0) ? load_acc<A>(xrow[o.k]) : A(0);
    A m = neg_inf<A>();
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
        const int col0 = (it * nt + tid) * VEC;
        Pack<A, VEC> p;
        if (o.active && col0 < g.c) {
            p = to_acc<A>(load_pack<T, VEC>(xrow + col0));
        } else {
#pragma unroll
            for (int u = 0; u < VEC; ++u) p.v[u] = neg_inf<A>();
        }
#pragma unroll
        for (int u = 0; u < VEC; ++u) {
            m = nanmax(m, p.v[u]);
            v[it * VEC + u] = p.v[u];
        }
    }
    if (SITEMS > 0) {
        copy_async_wait_all();  // this thread's own slots: no barrier needed
#pragma unroll 2
        for (int j = 0; j < SITEMS; ++j) {
            const int col0 = ((ITEMS + j) * nt + tid) * VEC;
            if (o.active && col0 < g.c) {
                const Pack<A, VEC> p = to_acc<A>(sp[j * sstride]);
#pragma unroll
                for (int u = 0; u < VEC; ++u) m = nanmax(m, p.v[u]);
            }
        }
    }
    m = team.max(m);
    const A ms = isfinite(m) ? m : A(0);
    const bool coefs = MODE == 1 || g.eps_over_c != A(0);
    A s = A(0), a = A(0), b = A(0);
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
        const int col0 = (it * nt + tid) * VEC;
#pragma unroll
        for (int u = 0; u < VEC; ++u) {
            const A d = v[it * VEC + u] - ms;
            const A e = ex(d);
            s += e;
            v[it * VEC + u] = e;
            if (coefs && o.active && col0 + u < g.c) {
                const A cf = coef_of<MODE>(g, yrow, col0 + u);
                a += cf;
                if (cf != A(0)) b += cf * d;
            }
        }
    }
#pragma unroll 2
    for (int j = 0; j < SITEMS; ++j) {
        const int col0 = ((ITEMS + j) * nt + tid) * VEC;
        if (!(o.active && col0 < g.c)) continue;
        const Pack<A, VEC> p = to_acc<A>(sp[j * sstride]);
#pragma unroll
        for (int u = 0; u < VEC; ++u) {
            const A d = p.v[u] - ms;
            s += ex(d);
            if (coefs) {
                const A cf = coef_of<MODE>(g, yrow, col0 + u);
                a += cf;
                if (cf != A(0)) b += cf * d;
            }
        }
    }
    team.sum3(s, a, b);
    A mx, ls, loss, gg;
    finish_stats(o.active, m, ms, s, a, b, o.k >= 0 ? xk - ms : A(0), wl, g.z, mx, ls, loss, gg);
    if (valid && tid == 0) {
        g.loss_out[row] = loss;
        if (g.lse_out) g.lse_out[row] = o.active ? mx + ls : quiet_nan<A>();  // ignored rows are not read
    }
    o.bad = !isfinite(mx + ls) || isnan(wl);
    o.r = gg * g.scale / s;
    o.wls = wl * g.scale;
    o.ms = ms;
    return o;
}

// grad_j = e_j r - scale coef_j - scale wl [j = k] for the VEC columns at col0.
template <int MODE, typename T, typename I, typename A, int VEC>
__device__ __forceinline__ void store_grad_pack(const Args<T, I, A>& g, const RowOut<A>& o, const T* yrow, T* grow,
                                                int col0, const Pack<A, VEC>& e, bool coefs) {
    A d[VEC];
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
        d[u] = e.v[u] * o.r;
        if (coefs) d[u] -= g.scale * coef_of<MODE>(g, yrow, col0 + u);
    }
    if (o.k >= col0 && o.k < col0 + VEC) {  // the label column (one thread of the team)
#pragma unroll
        for (int u = 0; u < VEC; ++u)
            if (col0 + u == o.k) d[u] -= o.wls;
    }
    Pack<T, VEC> p;
#pragma unroll
    for (int u = 0; u < VEC; ++u) p.v[u] = store_t<T>(d[u]);
    store_pack<T, VEC>(grow + col0, p);
}

// The gradient of the row from e (v), the raw shared-memory packs and the row's RowOut.
template <typename T, typename I, typename A, int MODE, int VEC, int ITEMS, int SITEMS>
__device__ __forceinline__ void row_grad(const Args<T, I, A>& g, const RowOut<A>& o, long long row, int tid, int nt,
                                         const A (&v)[ITEMS * VEC], const Pack<T, VEC>* sp, int sstride) {
    constexpr int P = ITEMS + SITEMS;
    T* grow = g.grad + row * g.ldg;
    if (!o.active || o.bad) {  // zeros for an ignored row, NaN for a bad one
        Pack<T, VEC> f;
#pragma unroll
        for (int u = 0; u < VEC; ++u) f.v[u] = store_t<T>(o.active ? quiet_nan<A>() : A(0));
#pragma unroll 4
        for (int it = 0; it < P; ++it) {
            const int col0 = (it * nt + tid) * VEC;
            if (col0 < g.c) store_pack<T, VEC>(grow + col0, f);
        }
        return;
    }
    const bool coefs = MODE == 1 || g.eps_over_c != A(0);
    const T* yrow = MODE == 1 ? g.y + row * g.ldy : nullptr;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
        const int col0 = (it * nt + tid) * VEC;
        if (col0 < g.c) {
            Pack<A, VEC> e;
#pragma unroll
            for (int u = 0; u < VEC; ++u) e.v[u] = v[it * VEC + u];
            store_grad_pack<MODE>(g, o, yrow, grow, col0, e, coefs);
        }
    }
#pragma unroll 2
    for (int j = 0; j < SITEMS; ++j) {
        const int col0 = ((ITEMS + j) * nt + tid) * VEC;
        if (col0 < g.c) {
            Pack<A, VEC> e = to_acc<A>(sp[j * sstride]);
#pragma unroll
            for (int u = 0; u < VEC; ++u) e.v[u] = ex(e.v[u] - o.ms);
            store_grad_pack<MODE>(g, o, yrow, grow, col0, e, coefs);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// "warp": G lanes per row, 32 / G rows per warp, the row in registers.  Needs c % VEC == 0 and
// 16-byte aligned rows when VEC > 1.
template <typename T, typename I, typename A, int MODE, int VEC, int ITEMS, int G, bool AHEAD = false>
__global__ void __launch_bounds__(256, GPUCE_BLOCKS_PER_SM(MODE)) sce_warp(GPUCE_SCE_PARAMS) {
    GPUCE_SCE_ARGS;
    const int lane = threadIdx.x & (G - 1);
    const long long groups = ((long long)gridDim.x * blockDim.x) / G;
    const long long first = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / G;
    // every lane of a warp runs the same number of iterations (shuffles need all 32)
    const long long warp_first = first - (threadIdx.x & 31) / G;
    A v[ITEMS * VEC];
    long long lab = AHEAD ? load_label<MODE>(g, first) : 0;
    for (long long base = warp_first; base < n; base += groups) {
        const long long row = base + (first - warp_first);
        const bool valid = row < n;
        const long long lab_next = AHEAD ? load_label<MODE>(g, row + groups) : 0;
        const RowOut<A> o = row_pass<T, I, A, MODE, VEC, ITEMS, 0, AHEAD>(g, WarpTeam<G>{}, row, valid, lane, G, v,
                                                                         nullptr, 0, lab);
        if (grad && valid) row_grad<T, I, A, MODE, VEC, ITEMS, 0>(g, o, row, lane, G, v, nullptr, 0);
        lab = lab_next;
    }
}

// ---------------------------------------------------------------------------------------------
// "block": one block per row (grid-stride over rows); ITEMS packs a thread in registers and
// SITEMS 16-byte packs in dynamic shared memory (SITEMS * 16 * blockDim.x bytes).
template <typename T, typename I, typename A, int MODE, int VEC, int ITEMS, int SITEMS, bool AHEAD = false>
__global__ void __launch_bounds__(256, GPUCE_BLOCKS_PER_SM(MODE)) sce_block(GPUCE_SCE_PARAMS) {
    GPUCE_SCE_ARGS;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ A red[32 * 4];
    Pack<T, VEC>* sp = reinterpret_cast<Pack<T, VEC>*>(smem_raw) + threadIdx.x;
    A v[ITEMS * VEC];
    long long lab = AHEAD ? load_label<MODE>(g, blockIdx.x) : 0;
    for (long long row = blockIdx.x; row < n; row += gridDim.x) {
        const long long lab_next = AHEAD ? load_label<MODE>(g, row + gridDim.x) : 0;
        const RowOut<A> o = row_pass<T, I, A, MODE, VEC, ITEMS, SITEMS, AHEAD>(
            g, BlockTeam<A>{red}, row, true, threadIdx.x, blockDim.x, v, sp, blockDim.x, lab);
        lab = lab_next;
        if (grad) row_grad<T, I, A, MODE, VEC, ITEMS, SITEMS>(g, o, row, threadIdx.x, blockDim.x, v, sp, blockDim.x);
    }
}

// ---------------------------------------------------------------------------------------------
// "tile": C <= 32 dense rows (ldx == c, and ldg == c), 128 rows a block.  The tile is copied
// into shared memory (as A, element i at i + i / 32: a thread's row of c values spreads over
// the banks) with VEC-wide coalesced loads, each thread reduces its own row and writes its
// gradient back in place, and the tile goes out with coalesced stores.  The base pointers
// must be 16-byte aligned when VEC > 1.
#define GPUCE_TILE_ROWS 128
template <typename T, typename I, typename A, int MODE, int VEC>
__global__ void __launch_bounds__(GPUCE_TILE_ROWS) sce_tile(GPUCE_SCE_PARAMS) {
    GPUCE_SCE_ARGS;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* tile = reinterpret_cast<A*>(smem_raw);
    const int t = threadIdx.x;
    const bool coefs = MODE == 1 || eps_over_c != A(0);
    for (long long row0 = (long long)blockIdx.x * GPUCE_TILE_ROWS; row0 < n; row0 += (long long)gridDim.x * GPUCE_TILE_ROWS) {
        const int rows = (int)min((long long)GPUCE_TILE_ROWS, n - row0);
        const long long e0 = row0 * c;  // first element of the tile (dense rows)
        const int elems = rows * c;
        const int packs = elems / VEC;
        for (int q = t; q < packs; q += GPUCE_TILE_ROWS) {
            const Pack<A, VEC> p = to_acc<A>(load_pack<T, VEC>(x + e0 + (long long)q * VEC));
#pragma unroll
            for (int u = 0; u < VEC; ++u) { const int i = q * VEC + u; tile[i + (i >> 5)] = p.v[u]; }
        }
        for (int i = packs * VEC + t; i < elems; i += GPUCE_TILE_ROWS) tile[i + (i >> 5)] = load_acc<A>(x[e0 + i]);
        __syncthreads();
        if (t < rows) {
            const long long row = row0 + t;
            bool active; int k; A wl;
            label_ctx<MODE>(g, row, true, active, k, wl);
            const int base = t * c;
            const T* yrow = MODE == 1 ? y + row * ldy : nullptr;
            A m = neg_inf<A>();
            for (int j = 0; j < c; ++j) m = nanmax(m, tile[base + j + ((base + j) >> 5)]);
            const A ms = isfinite(m) ? m : A(0);
            A s = A(0), a = A(0), b = A(0), xk = A(0);
            for (int j = 0; j < c; ++j) {
                const int i = base + j + ((base + j) >> 5);
                const A d = tile[i] - ms;
                if (j == k) xk = d;
                const A e = ex(d);
                s += e;
                tile[i] = e;
                if (coefs && active) {
                    const A cf = coef_of<MODE>(g, yrow, j);
                    a += cf;
                    if (cf != A(0)) b += cf * d;
                }
            }
            A mx, ls, loss, gg;
            finish_stats(active, m, ms, s, a, b, xk, wl, z, mx, ls, loss, gg);
            loss_out[row] = loss;
            if (lse_out) lse_out[row] = active ? mx + ls : quiet_nan<A>();
            if (grad) {
                const bool bad = !isfinite(mx + ls) || isnan(wl);
                const A r = gg * g.scale / s, wls = wl * g.scale;
                for (int j = 0; j < c; ++j) {
                    const int i = base + j + ((base + j) >> 5);
                    A d;
                    if (!active) d = A(0);
                    else if (bad) d = quiet_nan<A>();
                    else {
                        d = tile[i] * r;
                        if (coefs) d -= g.scale * coef_of<MODE>(g, yrow, j);
                        if (j == k) d -= wls;
                    }
                    tile[i] = d;
                }
            }
        }
        __syncthreads();
        if (grad) {
            T* gout = grad + e0;
            for (int q = t; q < packs; q += GPUCE_TILE_ROWS) {
                Pack<T, VEC> p;
#pragma unroll
                for (int u = 0; u < VEC; ++u) { const int i = q * VEC + u; p.v[u] = store_t<T>(tile[i + (i >> 5)]); }
                store_pack<T, VEC>(gout + (long long)q * VEC, p);
            }
            for (int i = packs * VEC + t; i < elems; i += GPUCE_TILE_ROWS) gout[i] = store_t<T>(tile[i + (i >> 5)]);
        }
        __syncthreads();  // the tile is reused
    }
}

// ---------------------------------------------------------------------------------------------
// "twopass": one block per row, online max/sum-exp in the first read, gradient in the second.
template <typename T, typename I, typename A, int MODE, int VEC>
__global__ void sce_twopass(GPUCE_SCE_PARAMS) {
    __shared__ A red[32 * 4];
    const A scale = grad ? *scale_ptr : A(0);
    for (long long row = blockIdx.x; row < n; row += gridDim.x) {
        RowCtx<MODE, T, I, A> ctx = row_ctx<MODE, T, I, A>(row, labels, y, ldy, w, one_minus_eps, ignore_index, c);
        const T* xrow = x + row * ldx;
        // per-thread online state, relative to the thread's running max
        RowStat<A> st = RowStat<A>::identity();
        for (int col0 = threadIdx.x * VEC; col0 < c; col0 += blockDim.x * VEC) {
            const Pack<T, VEC> p = load_pack<T, VEC>(xrow + col0);
#pragma unroll
            for (int u = 0; u < VEC; ++u) {
                const int col = col0 + u;
                const A xv = load_acc<A>(p.v[u]);
                const A cf = coef_at<MODE, T, I, A>(ctx, col, w, eps_over_c, one_minus_eps);
                st = merge(st, RowStat<A>::element(xv, cf, col == ctx.k));
            }
        }
        // block max, then rescale every thread's partial sums to it and add them up
        const A m = block_max(st.e.m, red);
        const A ms = isfinite(m) ? m : A(0);
        A s = st.e.s * rescale(st.e.m, ms);
        A a = st.a;
        A b = st.b + shift(st.a, st.e.m, ms);
        A t = st.t;  // the raw label logit (one thread holds it), made relative below
        block_sum4(s, a, b, t, red);
        A mx, ls, loss, g;
        finish_stats(ctx.active, m, ms, s, a, b, ctx.k >= 0 ? t - ms : A(0), ctx.wl, z, mx, ls, loss, g);
        if (threadIdx.x == 0) store_row(row, ctx.active, loss, mx, ls, loss_out, lse_out);
        if (grad) {
            T* grow = grad + row * ldg;
            for (int col0 = threadIdx.x * VEC; col0 < c; col0 += blockDim.x * VEC)
                store_grad<MODE, T, I, A, VEC>(grow, col0, to_acc<A>(load_pack<T, VEC>(xrow + col0)), ctx, w,
                                               eps_over_c, one_minus_eps, mx, ls, g, scale);
        }
        __syncthreads();  // red is reused by the next row
    }
}

// ---------------------------------------------------------------------------------------------
// "cluster" (sm_90+): CL blocks of one thread-block cluster share a row, laid out like one
// block of CL * blockDim.x threads (thread rank * blockDim.x + threadIdx.x); each block reduces
// its part and the CL partials are combined through distributed shared memory, in rank order
// in every block (identical results).  pm / ps are written in different phases, so two
// cluster barriers a row suffice: a block writes pm only after every block has passed the
// previous row's second barrier (so has read pm), and ps only after the first barrier of the
// row (every block has read the previous ps).  A last barrier keeps each block's shared
// memory alive until the others have read it.  Launch with gridDim.x a multiple of CL.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
template <typename A, int CL>
struct ClusterTeam {
    A* red;
    A* pm;
    A* ps;
    __device__ __forceinline__ A max(A v) const {
        namespace cg = cooperative_groups;
        cg::cluster_group cl = cg::this_cluster();
        v = block_max(v, red);
        if (threadIdx.x == 0) pm[0] = v;
        cl.sync();
        A r = *cl.map_shared_rank(pm, 0);
#pragma unroll
        for (int q = 1; q < CL; ++q) r = nanmax(r, *cl.map_shared_rank(pm, q));
        return r;
    }
    __device__ __forceinline__ void sum3(A& p, A& q, A& r) const {
        namespace cg = cooperative_groups;
        cg::cluster_group cl = cg::this_cluster();
        block_sum3(p, q, r, red);
        if (threadIdx.x == 0) { ps[0] = p; ps[1] = q; ps[2] = r; }
        cl.sync();
        p = A(0); q = A(0); r = A(0);
#pragma unroll
        for (int k = 0; k < CL; ++k) {
            const A* o = cl.map_shared_rank(ps, k);
            p += o[0]; q += o[1]; r += o[2];
        }
    }
};

template <typename T, typename I, typename A, int MODE, int VEC, int ITEMS, int SITEMS, int CL, bool AHEAD = false>
__global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(256, GPUCE_BLOCKS_PER_SM(MODE)) sce_cluster(GPUCE_SCE_PARAMS) {
    namespace cg = cooperative_groups;
    GPUCE_SCE_ARGS;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ A red[32 * 4];
    __shared__ A pm[1];
    __shared__ A ps[3];
    Pack<T, VEC>* sp = reinterpret_cast<Pack<T, VEC>*>(smem_raw) + threadIdx.x;
    const int rank = (int)cg::this_cluster().block_rank();
    const int tid = rank * blockDim.x + threadIdx.x, nt = CL * blockDim.x;
    const ClusterTeam<A, CL> team{red, pm, ps};
    A v[ITEMS * VEC];
    long long lab = AHEAD ? load_label<MODE>(g, blockIdx.x / CL) : 0;
    for (long long row = blockIdx.x / CL; row < n; row += gridDim.x / CL) {
        const long long lab_next = AHEAD ? load_label<MODE>(g, row + gridDim.x / CL) : 0;
        const RowOut<A> o = row_pass<T, I, A, MODE, VEC, ITEMS, SITEMS, AHEAD>(g, team, row, true, tid, nt, v, sp,
                                                                              blockDim.x, lab);
        lab = lab_next;
        if (grad) row_grad<T, I, A, MODE, VEC, ITEMS, SITEMS>(g, o, row, tid, nt, v, sp, blockDim.x);
    }
    cg::this_cluster().sync();
}
#endif

}  // namespace gpuce
