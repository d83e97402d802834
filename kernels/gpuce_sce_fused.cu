// gpuce: fused softmax cross-entropy -- each row of logits is read from device memory once
// and the gradient written once (the "regs", "smem" and "cluster" variants); the "twopass"
// variant (reads the row twice) is the fallback where no single-read variant fits.
//
// All variants share one parameter list and the maths of gpuce_rowstat.cuh:
//   lse   = m + log s                        s = sum_c exp(x_c - m)
//   loss  = wl * ((m - x_k) + log s) + (a log s - b) + z lse^2      (finish_row / finish_loss)
//   grad  = scale * (exp((x_j - m) - log s) G - coef_j - wl [j = k])   (grad_element)
// MODE 0: integer labels (coef_j = (eps/C) w_j, wl = (1-eps) w_k; rows with
//         label == ignore_index give loss 0 and a zero gradient row).
// MODE 1: probability targets y (coef_j = w_j ((1-eps) y_j + eps/C), wl = 0).
// Reductions are fixed-order trees (xor butterflies, then warps in index order): the same
// input gives bit-identical loss and gradient run to run.  No floating-point atomics.
// Offsets are 64-bit (row * ld); C itself must be < 2^31.
// No __launch_bounds__: with it ptxas aims at two 1024-thread blocks per SM (32 registers)
// and spills; the host instead clamps the block to the function's max_threads_per_block.
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

// Per-row constants shared by all variants.
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
                                                         long long ignore_index) {
    RowCtx<MODE, T, I, A> r;
    r.yrow = nullptr;
    r.k = -1;
    r.wl = A(0);
    if (MODE == 0) {
        long long lab = (long long)labels[row];
        r.active = lab != ignore_index;
        if (r.active) {
            r.k = (int)lab;
            r.wl = one_minus_eps * (w ? w[r.k] : A(1));
        }
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

// One thread's share of the row sums, relative to the finite shift ms:
//   s = sum exp(x - ms), a = sum coef, b = sum coef (x - ms), t = x_label - ms.
template <typename A>
struct RowSums {
    A s, a, b, t;
};

template <int MODE, typename T, typename I, typename A>
__device__ __forceinline__ void add_element(RowSums<A>& r, A xv, int col, A ms, const RowCtx<MODE, T, I, A>& ctx,
                                            const A* w, A eps_over_c, A one_minus_eps) {
    const A d = xv - ms;
    r.s += exp(d);
    const A cf = coef_at<MODE, T, I, A>(ctx, col, w, eps_over_c, one_minus_eps);
    r.a += cf;
    if (cf != A(0)) r.b += cf * d;
    if (col == ctx.k) r.t = d;
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
__device__ __forceinline__ void store_row(long long row, A loss, A mx, A ls, A* loss_out, A* lse_out) {
    loss_out[row] = loss;
    if (lse_out) lse_out[row] = mx + ls;
}

#define GPUCE_SCE_PARAMS                                                                          \
    const T *__restrict__ x, long long ldx, const I *__restrict__ labels, const T *__restrict__ y, \
        long long ldy, const A *__restrict__ w, long long n, int c, A eps_over_c, A one_minus_eps, \
        A z, long long ignore_index, const A *__restrict__ scale_ptr, A *__restrict__ loss_out,   \
        A *__restrict__ lse_out, T *__restrict__ grad, long long ldg

// ---------------------------------------------------------------------------------------------
// "regs": G lanes per row, the row held in registers (C <= G * ITEMS * VEC).  Several rows per
// warp when G < 32.  Needs c % VEC == 0 and 16-byte aligned rows when VEC > 1.
template <typename T, typename I, typename A, int MODE, int VEC, int ITEMS, int G>
__global__ void sce_regs(GPUCE_SCE_PARAMS) {
    constexpr int PER = ITEMS * VEC;
    const int lane = threadIdx.x & (G - 1);
    const long long groups = ((long long)gridDim.x * blockDim.x) / G;
    const long long first = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / G;
    const A scale = grad ? *scale_ptr : A(0);
    // every lane of a warp runs the same number of iterations (shuffles need all 32)
    const long long warp_first = first - (threadIdx.x & 31) / G;
    for (long long base = warp_first; base < n; base += groups) {
        const long long row = base + (first - warp_first);
        const bool valid = row < n;
        const long long rr = valid ? row : 0;
        RowCtx<MODE, T, I, A> ctx = row_ctx<MODE, T, I, A>(rr, labels, y, ldy, w, one_minus_eps, ignore_index);
        const T* xrow = x + rr * ldx;
        A v[PER];
        A m = neg_inf<A>();
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {
            const int col0 = (it * G + lane) * VEC;
            if (valid && col0 < c) {
                const Pack<A, VEC> p = to_acc<A>(load_pack<T, VEC>(xrow + col0));
#pragma unroll
                for (int u = 0; u < VEC; ++u) v[it * VEC + u] = p.v[u];
#pragma unroll
                for (int u = 0; u < VEC; ++u) m = nanmax(m, v[it * VEC + u]);
            } else {
#pragma unroll
                for (int u = 0; u < VEC; ++u) v[it * VEC + u] = neg_inf<A>();
            }
        }
        m = group_max<G>(m);
        const A ms = isfinite(m) ? m : A(0);
        RowSums<A> r = {A(0), A(0), A(0), A(0)};
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {
#pragma unroll
            for (int u = 0; u < VEC; ++u) {
                const int col = (it * G + lane) * VEC + u;
                if (valid && col < c) add_element(r, v[it * VEC + u], col, ms, ctx, w, eps_over_c, one_minus_eps);
            }
        }
        r.s = group_sum<G>(r.s); r.a = group_sum<G>(r.a); r.b = group_sum<G>(r.b); r.t = group_sum<G>(r.t);
        A mx, ls, loss, g;
        finish_stats(ctx.active, m, ms, r.s, r.a, r.b, r.t, ctx.wl, z, mx, ls, loss, g);
        if (valid && lane == 0) store_row(row, loss, mx, ls, loss_out, lse_out);
        if (grad && valid) {
            T* grow = grad + row * ldg;
#pragma unroll
            for (int it = 0; it < ITEMS; ++it) {
                const int col0 = (it * G + lane) * VEC;
                if (col0 < c) {
                    Pack<A, VEC> xv;
#pragma unroll
                    for (int u = 0; u < VEC; ++u) xv.v[u] = v[it * VEC + u];
                    store_grad<MODE, T, I, A, VEC>(grow, col0, xv, ctx, w, eps_over_c, one_minus_eps, mx, ls, g, scale);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// "smem": one block per row (grid-stride over rows), the row cached in dynamic shared memory
// as T (c * sizeof(T) bytes).
template <typename T, typename I, typename A, int MODE, int VEC>
__global__ void sce_smem(GPUCE_SCE_PARAMS) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* row_s = reinterpret_cast<T*>(smem_raw);
    __shared__ A red[32 * 4];
    const A scale = grad ? *scale_ptr : A(0);
    for (long long row = blockIdx.x; row < n; row += gridDim.x) {
        RowCtx<MODE, T, I, A> ctx = row_ctx<MODE, T, I, A>(row, labels, y, ldy, w, one_minus_eps, ignore_index);
        const T* xrow = x + row * ldx;
        A m = neg_inf<A>();
        for (int col0 = threadIdx.x * VEC; col0 < c; col0 += blockDim.x * VEC) {
            const Pack<T, VEC> p = load_pack<T, VEC>(xrow + col0);
            store_pack<T, VEC>(row_s + col0, p);
#pragma unroll
            for (int u = 0; u < VEC; ++u) m = nanmax(m, load_acc<A>(p.v[u]));
        }
        m = block_max(m, red);  // its barriers also publish row_s
        const A ms = isfinite(m) ? m : A(0);
        RowSums<A> r = {A(0), A(0), A(0), A(0)};
        for (int col = threadIdx.x; col < c; col += blockDim.x)
            add_element(r, load_acc<A>(row_s[col]), col, ms, ctx, w, eps_over_c, one_minus_eps);
        block_sum4(r.s, r.a, r.b, r.t, red);
        A mx, ls, loss, g;
        finish_stats(ctx.active, m, ms, r.s, r.a, r.b, r.t, ctx.wl, z, mx, ls, loss, g);
        if (threadIdx.x == 0) store_row(row, loss, mx, ls, loss_out, lse_out);
        if (grad) {
            T* grow = grad + row * ldg;
            for (int col0 = threadIdx.x * VEC; col0 < c; col0 += blockDim.x * VEC)
                store_grad<MODE, T, I, A, VEC>(grow, col0, to_acc<A>(load_pack<T, VEC>(row_s + col0)), ctx, w,
                                               eps_over_c, one_minus_eps, mx, ls, g, scale);
        }
        __syncthreads();  // row_s and red are reused by the next row
    }
}

// ---------------------------------------------------------------------------------------------
// "twopass": one block per row, online max/sum-exp in the first read, gradient in the second.
template <typename T, typename I, typename A, int MODE, int VEC>
__global__ void sce_twopass(GPUCE_SCE_PARAMS) {
    __shared__ A red[32 * 4];
    const A scale = grad ? *scale_ptr : A(0);
    for (long long row = blockIdx.x; row < n; row += gridDim.x) {
        RowCtx<MODE, T, I, A> ctx = row_ctx<MODE, T, I, A>(row, labels, y, ldy, w, one_minus_eps, ignore_index);
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
        if (threadIdx.x == 0) store_row(row, loss, mx, ls, loss_out, lse_out);
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
// "cluster" (sm_90+): CL blocks of one thread-block cluster share a row; each caches a slice
// of c / CL columns in its shared memory, and the partial max / sums are exchanged through
// distributed shared memory.  One read and one write of the row, for rows larger than one
// SM's shared memory.  Launch with gridDim.x a multiple of CL.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
template <typename T, typename I, typename A, int MODE, int VEC, int CL>
__global__ void __cluster_dims__(CL, 1, 1) sce_cluster(GPUCE_SCE_PARAMS) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* row_s = reinterpret_cast<T*>(smem_raw);
    __shared__ A red[32 * 4];
    __shared__ A part[4];  // this block's partials, read by the other blocks of the cluster
    const int rank = (int)cluster.block_rank();
    const A scale = grad ? *scale_ptr : A(0);
    // slice of columns owned by this block: a multiple of VEC
    const int per = ((c + CL * VEC - 1) / (CL * VEC)) * VEC;
    const int lo = rank * per;
    const int hi = min(c, lo + per);
    const long long clusters = gridDim.x / CL;
    for (long long row = blockIdx.x / CL; row < n; row += clusters) {
        RowCtx<MODE, T, I, A> ctx = row_ctx<MODE, T, I, A>(row, labels, y, ldy, w, one_minus_eps, ignore_index);
        const T* xrow = x + row * ldx;
        A m = neg_inf<A>();
        for (int col0 = lo + threadIdx.x * VEC; col0 < hi; col0 += blockDim.x * VEC) {
            const Pack<T, VEC> p = load_pack<T, VEC>(xrow + col0);
            store_pack<T, VEC>(row_s + (col0 - lo), p);
#pragma unroll
            for (int u = 0; u < VEC; ++u) m = nanmax(m, load_acc<A>(p.v[u]));
        }
        m = block_max(m, red);
        if (threadIdx.x == 0) part[0] = m;
        cluster.sync();
        A gm = *cluster.map_shared_rank(&part[0], 0);
        for (int r = 1; r < CL; ++r) gm = nanmax(gm, *cluster.map_shared_rank(&part[0], r));
        cluster.sync();  // everyone has read part[0] before it is overwritten below
        const A ms = isfinite(gm) ? gm : A(0);
        RowSums<A> r = {A(0), A(0), A(0), A(0)};
        for (int col = lo + threadIdx.x; col < hi; col += blockDim.x)
            add_element(r, load_acc<A>(row_s[col - lo]), col, ms, ctx, w, eps_over_c, one_minus_eps);
        block_sum4(r.s, r.a, r.b, r.t, red);
        if (threadIdx.x == 0) { part[0] = r.s; part[1] = r.a; part[2] = r.b; part[3] = r.t; }
        cluster.sync();
        RowSums<A> tot = {A(0), A(0), A(0), A(0)};
        for (int q = 0; q < CL; ++q) {  // same order in every block: identical totals
            const A* pr = cluster.map_shared_rank(&part[0], q);
            tot.s += pr[0]; tot.a += pr[1]; tot.b += pr[2]; tot.t += pr[3];
        }
        cluster.sync();  // part[] is free again for the next row
        A mx, ls, loss, g;
        finish_stats(ctx.active, gm, ms, tot.s, tot.a, tot.b, tot.t, ctx.wl, z, mx, ls, loss, g);
        if (rank == 0 && threadIdx.x == 0) store_row(row, loss, mx, ls, loss_out, lse_out);
        if (grad) {
            T* grow = grad + row * ldg;
            for (int col0 = lo + threadIdx.x * VEC; col0 < hi; col0 += blockDim.x * VEC)
                store_grad<MODE, T, I, A, VEC>(grow, col0, to_acc<A>(load_pack<T, VEC>(row_s + (col0 - lo))), ctx,
                                               w, eps_over_c, one_minus_eps, mx, ls, g, scale);
        }
        __syncthreads();
    }
}
#endif

}  // namespace gpuce
