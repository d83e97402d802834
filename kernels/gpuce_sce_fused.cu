// gpuce: fused softmax cross-entropy.  One launch reads each row of logits from device memory
// once (the "twopass" fallback twice, the second read meant to hit L2), writes the gradient
// once, and finishes the batch statistics (loss sum, z-loss part, token accuracy, the first
// bad label) on the device: every block adds its rows in a fixed order into float64 partials,
// and the last block to finish (an atomic ticket) sums the partials in block order.  Results
// are bit-identical run to run: the grid and the row-to-block mapping depend only on the shape
// and the device, and no floating-point atomics are used.
//
// Maths (A is the accumulation type: float, or double for double logits).  A row's values are
// v_j = f_j, or v_j = s tanh(f_j / s) with softcap s > 0.  Each thread keeps a partial state
// of the values it owns (Part: max m, finite shift ms, s = sum exp(v - ms), a = sum coef,
// b = sum coef (v - ms), the label value); the team combines the states once (lanes_merge:
// the maximum first, then plain sums, so every thread of the team ends with the same bits),
// then
//   lse  = ms + log s
//   loss = wl (lse - v_k) + (a log s - b) + z lse^2                       (finish_stats)
//   grad = scale (exp(v_j - ms) G / s - coef_j - wl [j = k]) (1 - tanh^2)  G = wl + a + 2 z lse
// MODE, a template argument of every kernel, is the target kind (MODE_LABELS, MODE_PROBS):
// MODE_LABELS: integer labels (coef_j = (eps/C) w_j, wl = (1-eps) w_k; rows with label ==
//         ignore_index give loss 0 and a zero gradient row; a label outside [0, C) gives a NaN
//         row and is recorded as the first bad position, never an out-of-bounds read).
// MODE_PROBS: probability targets y (coef_j = w_j ((1-eps) y_j + eps/C), wl = 0).
// w may be null (all weights 1).  Rows are always read (never gated on their label), so a
// row's loads wait only on their address.  Rows with no softcap take the lean path (a
// thread's maximum, then its sums at that shift: no online rescale; see pack_sum), the rest
// the general online update (add_pack).
//
// Kernels:
//   sce_tile       C <= 32, dense rows: a block takes 128 rows at a time (one thread a row),
//                  copied whole with cp.async into a 3-stage ring of shared memory, two tiles
//                  ahead; the gradient is written over the tile and stored with 16-byte stores.
//   sce_team<G>    G lanes a row (G = 4..32), or the whole block (G = 0), or a thread-block
//                  cluster of CL blocks (sm_90): every thread copies its own 16-byte packs of
//                  the rows S - 1 rows ahead into its own shared-memory slots with cp.async
//                  (no barrier needed for the data), one team exchange a row (shuffles; a
//                  block adds one barrier on row-parity buffers; a cluster adds tagged stores
//                  into the peers' shared memory, polled, no cluster barrier a row).
//   sce_cluster_regs  the cluster form with the current row in registers (RP packs a
//                  thread) and one shared-memory stage for the next: rows whose two-stage
//                  ring does not fit (float32 rows of 1 MiB).
//   sce_twopass    a block a row, reading the row twice: rows too long for shared memory.
//   sce_twopass_cluster  sm_90: the same over a cluster of CL blocks a row, only the row's
//                  partial state exchanged (no row in shared memory): a planner candidate.
//   sce_prologue   before the fused kernel where the call needs it: the class weights'
//                  check, and for reduction="mean" with labels the sum of w_k over the
//                  non-ignored rows, finished by the last block into the workspace.
// Offsets are 64-bit (row * ld).  C itself must be < 2^31.
//
// Workspace (long long words, one per device and stream, zeroed once; the last block of every
// launch leaves it as it found it):
//   ws[0] ticket of sce_tile/team/twopass   ws[1] ticket of sce_prologue
//   ws[3] 1 / denominator (double bits), written by sce_prologue
//   ws[4] the first bad class weight + 1 (0 for none), written by sce_prologue, cleared by the
//         fused kernel's last block
//   ws[GPUCE_WS_PARTIALS + 5 b + q]  block b's partials: loss, z part, correct, active (double
//                                    bits), the first bad label position
//
// Layout: gpuce_io.cuh (vectorised I/O, cp.async), this file's row state (Part, Label, RowOut,
// Acc: cross-entropy's) and lean path, gpuce_team.cuh (lane / block / cluster merges of Part,
// the batch finish and ticket), then the kernels.
//
// Template instantiations are named by gpuce/_cuda/fused.py (name expressions), which is also the
// list the offline NVRTC test compiles.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cooperative_groups.h>
#include "gpuce_rowstat.cuh"

#define GPUCE_WS_PARTIALS 8
#define GPUCE_NPART 4  // float64 partials a block: loss, z part, correct, active
#define GPUCE_NWORDS 5  // ... and the first bad label
#define GPUCE_TEAM_THREADS 512
#define GPUCE_TILE_ROWS 128
#define GPUCE_TILE_MAX_C 32

namespace gpuce {

typedef long long gpuce_i64;

// The MODE template argument (the host's Variant.expr writes the same numbers).
constexpr int MODE_LABELS = 0;
constexpr int MODE_PROBS = 1;

}  // namespace gpuce

#include "gpuce_io.cuh"

namespace gpuce {

// ------------------------------------------------------------------------- exponentials
// exp(d) for d = v - ms formed exactly first (so a large shift costs no relative precision):
// one multiply by log2(e) and ex2 for float, exp for double.
__device__ __forceinline__ float ex(float d) { return exp2f(d * 1.4426950408889634f); }
__device__ __forceinline__ double ex(double d) { return exp(d); }

// s * exp(from - to), 0 when s == 0 (an empty or all -inf partial has nothing to rescale).
template <typename A>
__device__ __forceinline__ A rescaled(A s, A from, A to) {
    return (s == A(0) || from == to) ? s : s * ex(from - to);
}

// nanmax (gpuce_rowstat.cuh) in one max.NaN instruction on sm_80+ for float.
template <typename A>
__device__ __forceinline__ A nanmax_fast(A a, A b) { return nanmax(a, b); }
template <>
__device__ __forceinline__ float nanmax_fast<float>(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(GPUCE_SIMT)
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return nanmax(a, b);
#endif
}

// ------------------------------------------------------------------------- per-row arguments
template <typename T, typename I, typename A>
struct Args {
    const T* x; long long ldx; const I* labels; const T* y; long long ldy; const A* w; long long n; int c;
    A eps_over_c; A one_minus_eps; A z; A cap; long long ignore_index; A scale;
    A* loss_out; A* lse_out; A* correct_out; T* grad; long long ldg;
    bool wbad;  // the prologue found a class weight that is NaN or infinite
};

#define GPUCE_SCE_PARAMS                                                                              \
    const T *__restrict__ x, long long ldx, const I *__restrict__ labels, const T *__restrict__ y,     \
        long long ldy, const A *__restrict__ w, long long n, int c, A eps_over_c, A one_minus_eps, A z, \
        A cap, long long ignore_index, double inv_denom, int inv_from_ws, A *__restrict__ loss_out,   \
        A *__restrict__ lse_out, A *__restrict__ correct_out, T *__restrict__ grad, long long ldg,     \
        long long *__restrict__ ws, A *__restrict__ total_out, A *__restrict__ stats_out,             \
        long long *__restrict__ bad_out

// GPUCE_SCE_PARAMS' names, in order: a kernel passing them on to its device body
#define GPUCE_SCE_ARGS                                                                                 \
    x, ldx, labels, y, ldy, w, n, c, eps_over_c, one_minus_eps, z, cap, ignore_index, inv_denom,       \
        inv_from_ws, loss_out, lse_out, correct_out, grad, ldg, ws, total_out, stats_out, bad_out

// The reduction's scale (1 / denominator for "mean", else 1) and the Args of a launch.
#define GPUCE_SCE_SETUP                                                                               \
    const bool wbad_ = w != nullptr && ws[4] != 0;                                                    \
    const double inv = wbad_ ? __longlong_as_double(0x7ff8000000000000LL)                              \
                             : (inv_from_ws ? __longlong_as_double(ws[3]) : inv_denom);                \
    const Args<T, I, A> g = {x, ldx, labels, y, ldy, w, n, c, eps_over_c, one_minus_eps, z, cap,     \
                             ignore_index, A(inv), loss_out, lse_out, correct_out, grad, ldg, wbad_}

// The value the loss sees: the logit, or s tanh(f / s) with softcap s > 0.
template <typename T, typename I, typename A>
__device__ __forceinline__ A value_of(const Args<T, I, A>& g, A f) {
    return softcap_value(f, g.cap);
}

// coef_j (MODE_LABELS: eps/C w_j; MODE_PROBS: w_j ((1 - eps) y_j + eps/C)).
template <int MODE, typename T, typename I, typename A>
__device__ __forceinline__ A coef_of(const Args<T, I, A>& g, A yv, int col) {
    const A wc = g.w ? g.w[col] : A(1);
    if (MODE == MODE_LABELS) return g.eps_over_c * wc;
    return prob_coef(yv, wc, g.one_minus_eps, g.eps_over_c);
}

// A row's label: active (not ignored), the label column k (-1 for none), wl = (1 - eps) w_k,
// bad (outside [0, C): wl NaN, the row NaN).  The one place a label is interpreted.
template <typename A>
struct Label {
    bool active, bad;
    int k;
    A wl;
};

template <int MODE, typename T, typename I, typename A>
__device__ __forceinline__ Label<A> label_of(const Args<T, I, A>& g, long long lab, bool valid) {
    Label<A> r;
    r.active = valid;
    r.bad = false;
    r.k = -1;
    r.wl = A(0);
    if (MODE == MODE_LABELS && valid) {
        r.active = lab != g.ignore_index;
        if (r.active && (lab < 0 || lab >= g.c)) {
            r.bad = true;
            r.wl = quiet_nan<A>();
        } else if (r.active) {
            r.k = (int)lab;
            r.wl = g.one_minus_eps * (g.w ? g.w[r.k] : A(1));
        }
    }
    return r;
}

template <int MODE, typename T, typename I, typename A>
__device__ __forceinline__ long long load_label(const Args<T, I, A>& g, long long row, bool valid) {
    return (MODE == MODE_LABELS && valid) ? (long long)g.labels[row] : 0;
}

// ------------------------------------------------------------------------- partial row state
template <typename A>
struct Part {
    A m;   // max of the values seen (NaN-propagating)
    A ms;  // finite shift: m when finite, else 0
    A s;   // sum exp(v - ms)
    A a;   // sum coef
    A b;   // sum coef (v - ms), coef != 0 only
    A xk;  // the label value (0 unless this thread owns the label column)
};

template <typename A>
__device__ __forceinline__ Part<A> part_identity() {
    Part<A> p;
    p.m = neg_inf<A>();
    p.ms = p.s = p.a = p.b = p.xk = A(0);
    return p;
}

// Move the partial to a new maximum (before adding values at the new shift).
template <typename A>
__device__ __forceinline__ void part_raise(Part<A>& p, A mnew) {
    const A m = nanmax(p.m, mnew);
    const A ms = isfinite(m) ? m : A(0);
    p.s = rescaled(p.s, p.ms, ms);
    p.b += shift(p.a, p.ms, ms);
    p.m = m;
    p.ms = ms;
}

// ------------------------------------------------------------------------- finishing a row
// What a row's gradient needs, and its contribution to the batch statistics.
template <typename A>
struct RowOut {
    bool active, bad;
    int k;
    A ms;    // the finite shift: e_j = exp(v_j - ms)
    A r;     // G * scale / s
    A wls;   // wl * scale
    A loss, lse, zpart, correct;
};

template <int MODE, typename T, typename I, typename A>
__device__ __forceinline__ RowOut<A> finish_row(const Args<T, I, A>& g, const Part<A>& p, const Label<A>& lb) {
    RowOut<A> o;
    o.active = lb.active;
    o.k = lb.k;
    A mx, ls, loss, gg;
    finish_stats(lb.active, p.m, p.ms, p.s, p.a, p.b, lb.k >= 0 ? p.xk - p.ms : A(0), lb.wl, g.z, mx, ls, loss, gg);
    o.lse = mx + ls;
    o.bad = lb.active && (!isfinite(o.lse) || lb.bad || g.wbad);
    o.loss = o.bad ? quiet_nan<A>() : loss;
    o.zpart = (lb.active && g.z != A(0)) ? g.z * o.lse * o.lse : A(0);
    o.correct = (MODE == MODE_LABELS && lb.k >= 0 && isfinite(p.m) && p.xk == p.m) ? A(1) : A(0);
    o.ms = p.ms;
    o.r = gg * (g.scale / p.s);
    o.wls = lb.wl * g.scale;
    return o;
}

// Per-row outputs (the team's leader) and the thread's running batch sums (float64, rows
// added in the thread's own order).
struct Acc {
    double loss, zpart, correct, active;
    long long bad;  // the first bad label position seen (LLONG_MAX for none)
};
#define GPUCE_ACC_INIT {0.0, 0.0, 0.0, 0.0, 0x7fffffffffffffffLL}

template <int MODE, typename T, typename I, typename A>
__device__ __forceinline__ void emit_row(const Args<T, I, A>& g, long long row, const RowOut<A>& o, bool bad_label,
                                         Acc& acc) {
    if (g.loss_out) g.loss_out[row] = o.active ? o.loss : A(0);
    if (g.lse_out) g.lse_out[row] = o.lse;
    if (g.correct_out) g.correct_out[row] = o.active ? o.correct : quiet_nan<A>();
    if (o.active) {
        acc.loss += (double)o.loss;
        acc.zpart += (double)o.zpart;
        acc.correct += (double)o.correct;
        acc.active += 1.0;
    }
    if (bad_label && row < acc.bad) acc.bad = row;
}

// grad_j = (e_j r - scale coef_j - wls [j = k]) (1 - tanh^2) of one column, from the raw logit
// f and the target yv (MODE_PROBS); 0 for an inactive row, NaN for a bad one.  ``is_label``: j = k
// (the callers test it once a pack, not once a value).
template <int MODE, typename T, typename I, typename A>
__device__ __forceinline__ A row_grad_at(const Args<T, I, A>& g, const RowOut<A>& o, int col, A f, A yv,
                                       bool is_label) {
    if (!o.active) return A(0);
    if (o.bad) return quiet_nan<A>();
    A v = f, dcap = A(1);
    if (g.cap > A(0)) {
        const A t = tanh_acc(f / g.cap);
        v = g.cap * t;
        dcap = A(1) - t * t;
    }
    A d = ex(v - o.ms) * o.r;
    if (MODE == MODE_PROBS || g.eps_over_c != A(0)) d -= g.scale * coef_of<MODE>(g, yv, col);
    if (is_label) d -= o.wls;
    return d * dcap;
}

// A row need not start on a 16-byte boundary: its packs are then the aligned 16-byte granules
// that hold it, starting `shift` values before column 0 (pack q holds columns
// q * VEC - shift ...), and the first and last granules hold values of the neighbouring rows
// (never outside the allocation: a granule never crosses a page), which the edge packs mask
// out.  The logits, the targets and the gradient share the shift (the host checks it).
template <typename T, int VEC>
__device__ __forceinline__ int row_shift(const T* row) {
    return VEC > 1 ? (int)(((unsigned long long)row % 16) / sizeof(T)) : 0;
}

// The gradient of the VEC columns at col0 (columns outside [0, C) of an edge pack skipped),
// stored at grow + col0: one 16-byte store for a whole pack.
template <int MODE, typename T, typename I, typename A, int VEC, bool EDGES = true>
__device__ __forceinline__ void store_grad_pack(const Args<T, I, A>& g, const RowOut<A>& o, T* grow, int col0,
                                                const A (&fv)[VEC], const A (&yv)[VEC]) {
    if constexpr (!EDGES) {  // the register-stage kernel: its unrolled loops stay small
        Pack<T, VEC> out;
#pragma unroll
        for (int u = 0; u < VEC; ++u)
            out.v[u] = store_t<T>(row_grad_at<MODE>(g, o, col0 + u, fv[u], yv[u], col0 + u == o.k));
        store_pack<T, VEC>(grow + col0, out);
        return;
    }
    const bool has_k = o.k >= col0 && o.k < col0 + VEC;  // the label column: one pack a row
    if (col0 >= 0 && col0 + VEC <= g.c) {
        A d[VEC];
        if (has_k) {
#pragma unroll
            for (int u = 0; u < VEC; ++u) d[u] = row_grad_at<MODE>(g, o, col0 + u, fv[u], yv[u], col0 + u == o.k);
        } else {
#pragma unroll
            for (int u = 0; u < VEC; ++u) d[u] = row_grad_at<MODE>(g, o, col0 + u, fv[u], yv[u], false);
        }
        store_vals<T>(grow + col0, d);
        return;
    }
#pragma unroll
    for (int u = 0; u < VEC; ++u)
        if (col0 + u >= 0 && col0 + u < g.c)
            grow[col0 + u] = store_t<T>(row_grad_at<MODE>(g, o, col0 + u, fv[u], yv[u], col0 + u == o.k));
}

// A pack of T as VEC values in A (the targets: 0 when absent).
template <typename A, typename T, int VEC>
__device__ __forceinline__ void unpack(const Pack<T, VEC>& p, A (&v)[VEC]) {
#pragma unroll
    for (int u = 0; u < VEC; ++u) v[u] = load_acc<A>(p.v[u]);
}

// Add VEC values (raw logits fv, targets yv) at columns col0.. to the partial (columns
// outside [0, C) of an edge pack count as -inf with no coefficient; EDGES = false: the caller
// guarantees whole packs).
template <int MODE, typename T, typename I, typename A, int VEC, bool EDGES = true>
__device__ __forceinline__ void add_pack(const Args<T, I, A>& g, Part<A>& p, int col0, int k, const A (&fv)[VEC],
                                         const A (&yv)[VEC]) {
    const bool whole = !EDGES || (col0 >= 0 && col0 + VEC <= g.c);
    A v[VEC];
    A pm = neg_inf<A>();
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
        v[u] = (whole || (col0 + u >= 0 && col0 + u < g.c)) ? value_of(g, fv[u]) : neg_inf<A>();
        pm = nanmax(pm, v[u]);
    }
    part_raise(p, pm);
    const bool coefs = MODE == MODE_PROBS || g.eps_over_c != A(0);
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
        const A d = v[u] - p.ms;
        p.s += ex(d);
        if (coefs && (whole || (col0 + u >= 0 && col0 + u < g.c))) {
            const A cf = coef_of<MODE>(g, yv[u], col0 + u);
            p.a += cf;
            if (cf != A(0)) p.b += cf * d;
        }
        if (col0 + u == k) p.xk = v[u];
    }
}

// ------------------------------------------------------------------------- the lean path
// Rows with no softcap (the common case) skip add_pack's online update, whose compare chain,
// rescale and extra exponential a pack cost more issue slots than the memory system leaves
// (measured on an H200: the fused kernels ran at 0.28-0.47 of a copy, issue-bound).  The
// thread's values are already in shared memory (or registers), so it takes two passes over
// them: its maximum (one NaN-propagating max a value), then the sums at that shift (a
// subtract, a multiply, ex2 and an add a value).  The label value is picked once a pack.
// exp(v - ms) for the lean loops.  Two-byte logits carry 8 or 11 significant bits, so the
// shift is folded into one FMA with log2(e) (msl = ms log2(e), rounded: a relative error of
// |ms| 2^-24 in the result, far below their precision); float and double keep the exact
// subtraction first (the FMA form loses 6e-4 at logits of 1e4 in float32).
template <typename T>
__device__ __forceinline__ float ex_at(float v, float ms, float msl) {
    if constexpr (sizeof(T) == 2) return exp2f(fmaf(v, 1.4426950408889634f, -msl));
    else return ex(v - ms);
}
template <typename T>
__device__ __forceinline__ double ex_at(double v, double ms, double) {
    return ex(v - ms);
}

// Whether all VEC columns col0.. lie in [0, C) (EDGES = false: the caller guarantees it).
template <int VEC, bool EDGES>
__device__ __forceinline__ bool whole_pack(int col0, int c) {
    return !EDGES || (col0 >= 0 && col0 + VEC <= c);
}

// m = max(m, the pack's values in [0, C)).
template <typename A, int VEC, bool EDGES = true>
__device__ __forceinline__ A pack_max(A m, int col0, int c, const A (&fv)[VEC]) {
    if (whole_pack<VEC, EDGES>(col0, c)) {
#pragma unroll
        for (int u = 0; u < VEC; ++u) m = nanmax_fast(m, fv[u]);
    } else {
#pragma unroll
        for (int u = 0; u < VEC; ++u)
            if (col0 + u >= 0 && col0 + u < c) m = nanmax_fast(m, fv[u]);
    }
    return m;
}

// xk = the pack's value at the label column k, when the pack (columns col0..) holds it.
template <typename A, int VEC>
__device__ __forceinline__ void pick_label(A& xk, int col0, int k, const A (&fv)[VEC]) {
    if (k >= 0 && (unsigned)(k - col0) < (unsigned)VEC) {
#pragma unroll
        for (int u = 0; u < VEC; ++u)
            if (col0 + u == k) xk = fv[u];
    }
}

// Add the pack's values at the fixed shift p.ms: s, and with COEF the coefficient sums a, b
// (as add_pack does); xk when the pack holds the label column k.
template <int MODE, bool COEF, typename T, typename I, typename A, int VEC, bool EDGES = true>
__device__ __forceinline__ void pack_sum(const Args<T, I, A>& g, Part<A>& p, int col0, int k, const A (&fv)[VEC],
                                         const A (&yv)[VEC]) {
    const bool whole = whole_pack<VEC, EDGES>(col0, g.c);
    const A msl = p.ms * A(1.4426950408889634);
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
        if (!whole && !(col0 + u >= 0 && col0 + u < g.c)) continue;
        const A d = fv[u] - p.ms;
        p.s += COEF ? ex(d) : ex_at<T>(fv[u], p.ms, msl);
        if (COEF) {
            const A cf = coef_of<MODE>(g, yv[u], col0 + u);
            p.a += cf;
            if (cf != A(0)) p.b += cf * d;
        }
    }
    pick_label(p.xk, col0, k, fv);
}

// The partial's shift from its maximum (Part's convention: ms = m when finite, else 0).
template <typename A>
__device__ __forceinline__ void part_at_max(Part<A>& p, A m) {
    p.m = m;
    p.ms = isfinite(m) ? m : A(0);
}

// The gradient of a pack of an active, good row with no softcap and no coefficients
// (labels, no smoothing): exp(v - ms) r (ex_at), less wls at the label column.
template <typename T, typename A, int VEC, bool EDGES = true>
__device__ __forceinline__ void store_grad_lean(T* grow, int col0, int c, const A (&fv)[VEC], A ms, A r, int k,
                                                A wls) {
    A d[VEC];
    const A msl = ms * A(1.4426950408889634);
#pragma unroll
    for (int u = 0; u < VEC; ++u) d[u] = ex_at<T>(fv[u], ms, msl) * r;
    if (k >= 0 && (unsigned)(k - col0) < (unsigned)VEC) {
#pragma unroll
        for (int u = 0; u < VEC; ++u)
            if (col0 + u == k) d[u] -= wls;
    }
    if (whole_pack<VEC, EDGES>(col0, c)) {
        store_vals<T>(grow + col0, d);
    } else {
#pragma unroll
        for (int u = 0; u < VEC; ++u)
            if (col0 + u >= 0 && col0 + u < c) grow[col0 + u] = store_t<T>(d[u]);
    }
}

// The lean online update of the two-pass kernel (its values are not kept, so the sums must
// follow the maximum as it grows): the pack's maximum, a rescale only when it exceeds the
// partial's (rare after the first packs of a row), then the sums at the shift.  Columns
// outside [0, C) of an edge pack are -inf (no term).  No softcap, no coefficients.
template <typename T, typename A, int VEC>
__device__ __forceinline__ void pack_online(Part<A>& p, const A (&fv)[VEC]) {
    A pm = fv[0];
#pragma unroll
    for (int u = 1; u < VEC; ++u) pm = nanmax_fast(pm, fv[u]);
    if (!(pm <= p.m)) {  // a new maximum, or a NaN: move the sum to it
        const A m = nanmax_fast(p.m, pm);
        const A ms = isfinite(m) ? m : A(0);
        p.s = rescaled(p.s, p.ms, ms);
        p.m = m;
        p.ms = ms;
    }
    const A msl = p.ms * A(1.4426950408889634);
#pragma unroll
    for (int u = 0; u < VEC; ++u) p.s += ex_at<T>(fv[u], p.ms, msl);
}

// -inf in the columns of a pack outside [0, C).
template <typename A, int VEC>
__device__ __forceinline__ void mask_edges(A (&fv)[VEC], int col0, int c) {
    if (col0 >= 0 && col0 + VEC <= c) return;
#pragma unroll
    for (int u = 0; u < VEC; ++u)
        if (col0 + u < 0 || col0 + u >= c) fv[u] = neg_inf<A>();
}

}  // namespace gpuce

#include "gpuce_team.cuh"

namespace gpuce {

// ------------------------------------------------------------------------- sce_team
// G lanes a row (G in 4..32; 256 / G rows a block at a time), or G == 0: the block is the
// team (CL blocks of a cluster with CL > 1).  Pack it (< P) of a row is at column
// (it * NT + tid) * VEC, NT the team's threads; thread tid keeps it in its own slot of the
// S-stage ring in dynamic shared memory: slots[((stage * P + it) * blockDim.x + threadIdx.x)]
// (then the targets' ring, MODE_PROBS).  Row i + S - 1 is copied while row i is computed.
template <typename T, typename I, typename A, int MODE, int VEC, int G, int CL, int RP = 0>
__device__ __forceinline__ void team_rows(GPUCE_SCE_PARAMS, int P, int S) {
    static_assert(RP == 0 || (MODE == MODE_LABELS && G == 0), "the register stage is for block / cluster label kernels");
    // the register stage takes rows that start on a 16-byte boundary and hold whole packs
    // (the host checks it), which keeps its unrolled loops free of edge masks
    constexpr bool EDGES = RP == 0;
    GPUCE_SCE_SETUP;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ A red[2 * 32 * GPUCE_PART_WORDS];
    Pack<T, VEC>* xs = reinterpret_cast<Pack<T, VEC>*>(smem_raw);
    Pack<T, VEC>* ys = xs + (size_t)S * P * blockDim.x;
    const int bt = blockDim.x;
    const int rank = CL > 1 ? cluster_block_rank() : 0;
    const int nt = G > 0 ? G : bt * CL;
    const int tid = G > 0 ? (threadIdx.x & (G - 1)) : rank * bt + threadIdx.x;
    const long long teams_per_block = G > 0 ? bt / G : 1;
    const long long nteams = (long long)(gridDim.x / CL) * teams_per_block;
    const long long team = (long long)(blockIdx.x / CL) * teams_per_block + (G > 0 ? threadIdx.x / G : 0);
    // every lane of a warp runs the same number of rows (the shuffles need all 32)
    const long long warp_team0 = G > 0 ? team - ((threadIdx.x & 31) / G) : team;
    const int PMAX = RP > 0 ? RP : P;
    // this thread's packs of a row of `packs`: it = 0 .. mine - 1, pack q = it * nt + tid
    // A row spans packs0 = ceil(C / VEC) packs, or one more when it starts off a 16-byte
    // boundary: both counts are worked out once here, not with two integer divisions a row.
    auto mine_slow = [&](int packs) { return tid < packs ? min((packs - 1 - tid) / nt + 1, PMAX) : 0; };
    const int packs0 = (c + VEC - 1) / VEC;
    const int mine0 = mine_slow(packs0), mine1 = mine_slow(packs0 + 1);
    // (a shift sh < VEC makes ceil((sh + C) / VEC) one of the two)
    auto mine_of = [&](int packs) { return packs == packs0 ? mine0 : mine1; };
    Acc acc = GPUCE_ACC_INIT;
    ClusterXchg<A, CL> xchg;
    xchg.init();

    // copy row `row`'s packs of this thread into ring stage `stage` (slot it of the stage at
    // (stage * P + it) * bt + threadIdx.x), one commit group
    auto issue = [&](long long row, int stage) {
        if (row < n) {
            const T* xrow = g.x + row * g.ldx;
            const int sh = EDGES ? row_shift<T, VEC>(xrow) : 0;
            const int mine = mine_of((sh + c + VEC - 1) / VEC);
            const T* xsrc = xrow - sh + (size_t)tid * VEC;
            Pack<T, VEC>* xdst = xs + (size_t)stage * P * bt + threadIdx.x;
            const T* ysrc = MODE == MODE_PROBS ? g.y + row * g.ldy - sh + (size_t)tid * VEC : nullptr;
            Pack<T, VEC>* ydst = ys + (size_t)stage * P * bt + threadIdx.x;
            for (int it = 0; it < mine; ++it) {
                copy_pack_async<T, VEC>(xdst + (size_t)it * bt, xsrc + (size_t)it * nt * VEC);
                if (MODE == MODE_PROBS) copy_pack_async<T, VEC>(ydst + (size_t)it * bt, ysrc + (size_t)it * nt * VEC);
            }
        }
        copy_commit();
    };

    // RP > 0 (a register stage): row i is moved from the one shared-memory stage into
    // registers, and row i + 1 is copied into that stage while row i is computed
    Pack<T, VEC> rx[RP > 0 ? RP : 1];
    if (RP > 0) issue(team, 0);
    else
        for (int s = 0; s < S - 1; ++s) issue(team + s * nteams, s);
    int parity = 0;
    // labels are loaded a row ahead: the load of row i + 1's is in flight while row i is
    // computed (a label loaded in its own row stalled the sums, which need its column)
    long long lab_next = load_label<MODE>(g, team, team < n);
    for (long long i = 0; warp_team0 + i * nteams < n; ++i) {
        const long long row = team + i * nteams;
        const bool valid = row < n;
        const int stage = RP > 0 ? 0 : (int)(i % S);
        if (RP == 0) issue(team + (i + S - 1) * nteams, (int)((i + S - 1) % S));
        const long long lab = lab_next;
        lab_next = load_label<MODE>(g, row + nteams, row + nteams < n);
        const int sh = EDGES ? row_shift<T, VEC>(g.x + (valid ? row : 0) * g.ldx) : 0;
        const int packs = (sh + c + VEC - 1) / VEC;
        const int mine = valid ? mine_of(packs) : 0;
        const Pack<T, VEC>* xst = xs + (size_t)stage * P * bt + threadIdx.x;
        const Pack<T, VEC>* yst = ys + (size_t)stage * P * bt + threadIdx.x;
        copy_wait(RP > 0 ? 0 : S - 1);
        if constexpr (RP > 0) {
#pragma unroll
            for (int it = 0; it < RP; ++it)
                if (it < mine) rx[it] = xst[(size_t)it * bt];
        }
        auto xvals = [&](int it, A (&fv)[VEC]) {
            if constexpr (RP > 0) unpack(rx[it], fv);
            else load_vals<A>(xst + (size_t)it * bt, fv);
        };
        auto yvals = [&](int it, A (&yv)[VEC]) {
            if (MODE == MODE_PROBS) load_vals<A>(yst + (size_t)it * bt, yv);
        };
        // f(it, col0) over this thread's packs it in [lo, hi) (col0: the pack's first column)
        auto each = [&](int lo, int hi, auto&& f) {
            if constexpr (RP > 0) {
#pragma unroll
                for (int it = 0; it < RP; ++it)
                    if (it >= lo && it < hi) f(it, (it * nt + tid) * VEC - sh);
            } else {
                for (int it = lo; it < hi; ++it) f(it, (it * nt + tid) * VEC - sh);
            }
        };
        // The edge packs (a row off a 16-byte boundary: the first pack, and the last when
        // the row does not end on one) are taken apart, so the loops over whole packs
        // carry no column masks.
        int lo = 0, hi = mine, e0 = -1, e1 = -1;
        if constexpr (EDGES) {
            if (mine > 0 && sh > 0 && tid == 0) {
                lo = 1;
                e0 = 0;
            }
            if (mine > 0 && (sh + c) % VEC != 0 && (mine - 1) * nt + tid == packs - 1) {
                hi = mine - 1;
                if (mine - 1 != e0) e1 = mine - 1;
            }
            if (hi < lo) hi = lo;
        }
        auto edges = [&](auto&& f) {
            if constexpr (EDGES) {
                if (e0 >= 0) f(e0, (e0 * nt + tid) * VEC - sh);
                if (e1 >= 0) f(e1, (e1 * nt + tid) * VEC - sh);
            }
        };
        const Label<A> lb = label_of<MODE>(g, lab, valid);
        const bool coefs = MODE == MODE_PROBS || g.eps_over_c != A(0);
        Part<A> p = part_identity<A>();
        // softcap: the online update (tanh once a value); not in the register-stage kernel,
        // whose row fills the registers (the host never plans it for a softcap call)
        if (RP == 0 && g.cap > A(0)) {
            each(0, mine, [&](int it, int col0) {
                A fv[VEC], yv[VEC] = {};
                xvals(it, fv);
                yvals(it, yv);
                add_pack<MODE, T, I, A, VEC, EDGES>(g, p, col0, lb.k, fv, yv);
            });
            if (G > 0) p = lanes_merge<(G > 0 ? G : 32)>(p, coefs);
        } else {  // the lean path: the maximum, then the sums at that shift
            A m = neg_inf<A>();
            each(lo, hi, [&](int it, int) {
                A fv[VEC];
                xvals(it, fv);
#pragma unroll
                for (int u = 0; u < VEC; ++u) m = nanmax_fast(m, fv[u]);
            });
            edges([&](int it, int col0) {
                A fv[VEC];
                xvals(it, fv);
                m = pack_max<A, VEC>(m, col0, c, fv);
            });
            // a warp team agrees on its maximum first (shuffles are cheap), so its sums need
            // no rescaling; a block or cluster merges the thread partials once
            if (G > 0) {
#pragma unroll
                for (int o = (G > 0 ? G : 2) / 2; o > 0; o >>= 1) m = nanmax_fast(m, shfl_xor(m, o));
            }
            part_at_max(p, m);
            if (coefs) {
                each(lo, hi, [&](int it, int col0) {
                    A fv[VEC], yv[VEC] = {};
                    xvals(it, fv);
                    yvals(it, yv);
                    pack_sum<MODE, true, T, I, A, VEC, false>(g, p, col0, lb.k, fv, yv);
                });
                edges([&](int it, int col0) {
                    A fv[VEC], yv[VEC] = {};
                    xvals(it, fv);
                    yvals(it, yv);
                    pack_sum<MODE, true, T, I, A, VEC, true>(g, p, col0, lb.k, fv, yv);
                });
            } else {
                each(lo, hi, [&](int it, int col0) {
                    A fv[VEC], yv[VEC] = {};
                    xvals(it, fv);
                    pack_sum<MODE, false, T, I, A, VEC, false>(g, p, col0, lb.k, fv, yv);
                });
                edges([&](int it, int col0) {
                    A fv[VEC], yv[VEC] = {};
                    xvals(it, fv);
                    pack_sum<MODE, false, T, I, A, VEC, true>(g, p, col0, lb.k, fv, yv);
                });
            }
            if (G > 0) p = lanes_sum<(G > 0 ? G : 32)>(p, coefs);  // the sums share the shift
        }
        if (RP > 0) {  // the stage's reads are done (their values consumed, and __syncwarp
            __syncwarp();  // orders this thread's shared accesses): copy the next row into it
            issue(team + (i + 1) * nteams, 0);
        }
        if (G == 0) {
            p = block_merge(p, red, parity, coefs);
            if (CL > 1) p = xchg.merge(p, rank, (unsigned)(i + 1), parity, coefs);
        }
        parity ^= 1;
        const RowOut<A> o = finish_row<MODE>(g, p, lb);
        if (valid && tid == 0) emit_row<MODE>(g, row, o, lb.bad, acc);
        if (g.grad && valid) {
            T* grow = g.grad + row * g.ldg;
            if (o.active && !o.bad && !coefs && g.cap == A(0)) {  // the lean gradient
                each(lo, hi, [&](int it, int col0) {
                    A fv[VEC];
                    xvals(it, fv);
                    store_grad_lean<T, A, VEC, false>(grow, col0, c, fv, o.ms, o.r, o.k, o.wls);
                });
                edges([&](int it, int col0) {
                    A fv[VEC];
                    xvals(it, fv);
                    store_grad_lean<T, A, VEC, true>(grow, col0, c, fv, o.ms, o.r, o.k, o.wls);
                });
            } else {
                each(0, mine, [&](int it, int col0) {
                    A fv[VEC], yv[VEC] = {};
                    xvals(it, fv);
                    yvals(it, yv);
                    store_grad_pack<MODE, T, I, A, VEC, EDGES>(g, o, grow, col0, fv, yv);
                });
            }
        }
    }
    copy_wait(0);
    xchg.finish();
    finish_launch<A>(acc, ws, 0, n, inv, total_out, stats_out, bad_out);
}

template <typename T, typename I, typename A, int MODE, int VEC, int G>
__global__ void __launch_bounds__(GPUCE_TEAM_THREADS, 1) sce_team(GPUCE_SCE_PARAMS, int P, int S) {
    team_rows<T, I, A, MODE, VEC, G, 1>(GPUCE_SCE_ARGS, P, S);
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
template <typename T, typename I, typename A, int MODE, int VEC, int CL>
__global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(GPUCE_TEAM_THREADS, 1)
    sce_cluster(GPUCE_SCE_PARAMS, int P, int S) {
    team_rows<T, I, A, MODE, VEC, 0, CL>(GPUCE_SCE_ARGS, P, S);
}

// The register-stage form (RP packs a thread in registers, one shared-memory stage, P == RP):
// rows whose ring of two stages would not fit shared memory (float32 rows of 1 MiB).
template <typename T, typename I, typename A, int MODE, int VEC, int CL, int RP>
__global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(GPUCE_TEAM_THREADS, 1)
    sce_cluster_regs(GPUCE_SCE_PARAMS, int P, int S) {
    team_rows<T, I, A, MODE, VEC, 0, CL, RP>(GPUCE_SCE_ARGS, P, S);
}
#endif

// ------------------------------------------------------------------------- sce_tile
// C <= 32, dense rows (ldx == ldy == ldg == c): a block takes 128 rows at a time (a tile,
// one thread a row).  Tiles are copied whole, exactly as they lie in global memory, into an
// S-stage ring in dynamic shared memory with cp.async, S - 1 tiles ahead (16-byte packs when
// VEC > 1; the labels too, one a thread), so no register holds a prefetched tile and a block
// keeps up to S - 1 tiles in flight.  Each thread reads its row from the ring, writes its
// gradient over it in place (rounded to T once), and the block stores the tile back with
// 16-byte stores.  Rows whose length is a multiple of 4 are read from column t % c onwards
// (wrapping), so that the 32 rows of a warp do not fall into a few shared-memory banks (a
// row's sums then run in an order set by its place in its tile: its last bits may differ
// from the same row's at another position, never from run to run).
// Stage layout: the tile's values (a 16-byte multiple), then the targets' (MODE_PROBS) or the
// labels (MODE_LABELS).  The host sizes the ring with gpuce/_cuda/fused.py tile_plan.
#define GPUCE_TILE_STAGES 3

// This thread's share of copying `elems` contiguous values src -> dst (shared memory):
// packs threadIdx.x, + blockDim.x, ..., then the values past the last whole pack one by one.
template <typename T, int VEC>
__device__ __forceinline__ void tile_copy(T* dst, const T* src, int elems) {
    const int packs = elems / VEC;
    for (int q = threadIdx.x; q < packs; q += blockDim.x)
        copy_pack_async<T, VEC>(reinterpret_cast<Pack<T, VEC>*>(dst) + q, src + (long long)q * VEC);
    for (int i = packs * VEC + threadIdx.x; i < elems; i += blockDim.x)
        copy_pack_async<T, 1>(reinterpret_cast<Pack<T, 1>*>(dst + i), src + i);
}

// The block's store of `elems` contiguous values src (shared memory) -> dst: 16-byte words.
template <typename T, int VEC>
__device__ __forceinline__ void tile_store(T* dst, const T* src, int elems) {
    const int packs = elems / VEC;
    for (int q = threadIdx.x; q < packs; q += blockDim.x) {
#ifdef GPUCE_WORDS
        if constexpr (sizeof(Pack<T, VEC>) == 16) {
            unsigned w[4];
            lds128(src + q * VEC, w);
            stg128(dst + (long long)q * VEC, w);
            continue;
        }
#endif
        store_pack<T, VEC>(dst + (long long)q * VEC, *reinterpret_cast<const Pack<T, VEC>*>(src + q * VEC));
    }
    for (int i = packs * VEC + threadIdx.x; i < elems; i += blockDim.x) dst[i] = src[i];
}

// Copy the tile of rows row0.. (nothing past the last row) into the ring stage at st: the
// values, then the targets (MODE_PROBS) or the labels, one commit group a tile (empty past the
// end, so that the wait counts stay the same).
template <typename T, typename I, int MODE, int VEC>
__device__ __forceinline__ void tile_issue(const T* x, const T* y, const I* labels, long long n, int c, long long row0,
                                           unsigned char* st, int vb) {
    if (row0 < n) {
        const int rows = (int)min((long long)GPUCE_TILE_ROWS, n - row0);
        tile_copy<T, VEC>(reinterpret_cast<T*>(st), x + row0 * c, rows * c);
        if (MODE == MODE_PROBS) tile_copy<T, VEC>(reinterpret_cast<T*>(st + vb), y + row0 * c, rows * c);
        else if ((int)threadIdx.x < rows)
            copy_pack_async<I, 1>(reinterpret_cast<Pack<I, 1>*>(st + vb) + threadIdx.x, labels + row0 + threadIdx.x);
    }
    copy_commit();
}

// The bytes of one ring stage for rows of c values (tile_plan mirrors it).
template <typename T, typename I, int MODE>
__device__ __forceinline__ int tile_stage_bytes(int c, int& values_bytes) {
    values_bytes = (GPUCE_TILE_ROWS * c * (int)sizeof(T) + 15) & ~15;
    return values_bytes * (MODE == MODE_PROBS ? 2 : 1) + (MODE == MODE_LABELS ? GPUCE_TILE_ROWS * (int)sizeof(I) : 0);
}

// Every column of a tile row once, from j0 on (two loops: no wrap test a value).
#define GPUCE_TILE_COLS(j, ...)                        \
    for (int j = j0; j < c; ++j) __VA_ARGS__          \
    for (int j = 0; j < j0; ++j) __VA_ARGS__

template <typename T, typename I, typename A, int MODE, int VEC>
__global__ void __launch_bounds__(GPUCE_TILE_ROWS, sizeof(A) == 8 ? 5 : 8) sce_tile(GPUCE_SCE_PARAMS) {
    GPUCE_SCE_SETUP;
    constexpr int R = GPUCE_TILE_ROWS, S = GPUCE_TILE_STAGES;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    int vb;
    const int sb = tile_stage_bytes<T, I, MODE>(c, vb);
    const int t = threadIdx.x;
    const long long step = (long long)gridDim.x * R;
    const long long first = (long long)blockIdx.x * R;
    Acc acc = GPUCE_ACC_INIT;
#pragma unroll
    for (int s = 0; s < S - 1; ++s) tile_issue<T, I, MODE, VEC>(x, y, labels, n, c, first + s * step, smem_raw + s * sb, vb);
    const bool coefs = MODE == MODE_PROBS || g.eps_over_c != A(0);
    const int j0 = (c & 3) == 0 ? t % c : 0;  // the column this thread starts its row at
    int stage = 0;
    for (long long row0 = first; row0 < n; row0 += step) {
        copy_wait(S - 2);  // this thread's copies of the tile have landed
        __syncthreads();   // everyone's have; and the stage written next was stored last round
        tile_issue<T, I, MODE, VEC>(x, y, labels, n, c, row0 + (S - 1) * step,
                                    smem_raw + (stage == 0 ? S - 1 : stage - 1) * sb, vb);
        const int rows = (int)min((long long)R, n - row0);
        unsigned char* st = smem_raw + stage * sb;
        if (t < rows) {
            T* xr = reinterpret_cast<T*>(st) + t * c;
            const T* yr = MODE == MODE_PROBS ? reinterpret_cast<const T*>(st + vb) + t * c : nullptr;
            const long long lab = MODE == MODE_LABELS ? (long long)reinterpret_cast<const I*>(st + vb)[t] : 0;
            const Label<A> lb = label_of<MODE>(g, lab, true);
            Part<A> p = part_identity<A>();
            if (g.cap > A(0)) {  // softcap: the online update
                GPUCE_TILE_COLS(j, {
                    A fv[1] = {load_acc<A>(xr[j])}, yv[1] = {MODE == MODE_PROBS ? load_acc<A>(yr[j]) : A(0)};
                    add_pack<MODE, T, I, A, 1>(g, p, j, lb.k, fv, yv);
                })
            } else {  // the lean path (see pack_sum): the row's maximum, then its sums
                A m = neg_inf<A>();
                GPUCE_TILE_COLS(j, { m = nanmax_fast(m, load_acc<A>(xr[j])); })
                part_at_max(p, m);
                if (coefs) {
                    GPUCE_TILE_COLS(j, {
                        A fv[1] = {load_acc<A>(xr[j])}, yv[1] = {MODE == MODE_PROBS ? load_acc<A>(yr[j]) : A(0)};
                        pack_sum<MODE, true, T, I, A, 1, false>(g, p, j, -1, fv, yv);
                    })
                } else {
                    const A msl = p.ms * A(1.4426950408889634);
                    A s = A(0);
                    GPUCE_TILE_COLS(j, { s += ex_at<T>(load_acc<A>(xr[j]), p.ms, msl); })
                    p.s = s;
                }
                if (lb.k >= 0) p.xk = load_acc<A>(xr[lb.k]);
            }
            const RowOut<A> o = finish_row<MODE>(g, p, lb);
            emit_row<MODE>(g, row0 + t, o, lb.bad, acc);
            if (grad) {  // the gradient over the row's values, rounded to T once
                if (o.active && !o.bad && !coefs && g.cap == A(0)) {  // the lean gradient (store_grad_lean)
                    const A msl = o.ms * A(1.4426950408889634);
                    GPUCE_TILE_COLS(j, { xr[j] = store_t<T>(ex_at<T>(load_acc<A>(xr[j]), o.ms, msl) * o.r); })
                    if (o.k >= 0) xr[o.k] = store_t<T>(ex_at<T>(p.xk, o.ms, msl) * o.r - o.wls);
                } else {
                    GPUCE_TILE_COLS(j, {
                        xr[j] = store_t<T>(row_grad_at<MODE>(g, o, j, load_acc<A>(xr[j]),
                                                           MODE == MODE_PROBS ? load_acc<A>(yr[j]) : A(0), j == o.k));
                    })
                }
            }
        }
        if (grad) {
            __syncthreads();  // the tile's gradient is complete
            tile_store<T, VEC>(grad + row0 * c, reinterpret_cast<const T*>(st), rows * c);
        }
        stage = stage + 1 == S ? 0 : stage + 1;
    }
    copy_wait(0);  // the empty groups past the end
    finish_launch<A>(acc, ws, 0, n, inv, total_out, stats_out, bad_out);
}

// ------------------------------------------------------------------------- sce_twopass
// One block a row (grid-stride), the row read twice: the statistics, then the gradient.
// For rows that do not fit the shared-memory rings of sce_team; the second read is meant to
// hit L2 (one row a block in flight).  Rows with no softcap and no coefficients take the lean
// online update (pack_online), loading four packs a thread before using any.
//
// sce_twopass_cluster (sm_90): the same with a cluster of CL blocks a row, each block reading
// its CL-th of the row's packs (interleaved: pack q belongs to thread q mod (CL x threads)).
// The blocks exchange only the row's partial state through distributed shared memory (one
// ClusterXchg merge a row, as sce_cluster) and re-read their slice for the gradient.  No row
// is held in shared memory; a cluster keeps one row in flight, so the device has
// (resident blocks / CL) rows in flight instead of one a block: CL times fewer bytes between
// a row's two reads, which is what lets the second read hit L2 at LLM vocabularies (a
// candidate of the planner, timed by `gpuce bench --variants`).
template <typename T, typename I, typename A, int MODE, int VEC, int CL>
__device__ __forceinline__ void twopass_rows(GPUCE_SCE_PARAMS) {
    GPUCE_SCE_SETUP;
    __shared__ A red[2 * 32 * GPUCE_PART_WORDS];
    Acc acc = GPUCE_ACC_INIT;
    int parity = 0;
    // CL == 1: rank 0, and every index below is the block's own (the code sce_twopass had)
    const unsigned rank = CL > 1 ? (unsigned)cluster_block_rank() : 0u;
    const unsigned tid = rank * blockDim.x + threadIdx.x;  // the thread's place on the row
    ClusterXchg<A, CL> xchg;
    xchg.init();
    unsigned tag = 0;  // the cluster's row step + 1 (its exchange tag)
    for (long long row = blockIdx.x / CL; row < n; row += gridDim.x / CL) {
        const long long lab = load_label<MODE>(g, row, true);
        const int sh = row_shift<T, VEC>(x + row * ldx);
        const int packs = (sh + c + VEC - 1) / VEC;
        const T* xrow = x + row * ldx - sh;
        const T* yrow = MODE == MODE_PROBS ? y + row * ldy - sh : nullptr;
        const Label<A> lb = label_of<MODE>(g, lab, true);
        const bool coefs = MODE == MODE_PROBS || g.eps_over_c != A(0);
        const bool lean = g.cap == A(0) && !coefs;
        // the lean path loads U packs before using any (U 16-byte loads in flight a thread)
        constexpr int U = 4;
        const int step = U * (int)(blockDim.x * CL);
        auto load_batch = [&](int q0, A (&fv)[U][VEC]) {  // packs q0 + j blockDim.x CL, j < U
#pragma unroll
            for (int j = 0; j < U; ++j) {
                const int q = q0 + j * (int)(blockDim.x * CL);
                if (q < packs) load_vals_global<A>(xrow + (size_t)q * VEC, fv[j]);
            }
        };
        Part<A> p = part_identity<A>();
        if (lean) {
            for (int q0 = tid; q0 < packs; q0 += step) {
                A fv[U][VEC];
                load_batch(q0, fv);
#pragma unroll
                for (int j = 0; j < U; ++j) {
                    const int q = q0 + j * (int)(blockDim.x * CL);
                    if (q >= packs) continue;
                    mask_edges(fv[j], q * VEC - sh, c);
                    pack_online<T>(p, fv[j]);
                    pick_label(p.xk, q * VEC - sh, lb.k, fv[j]);
                }
            }
        } else {
            for (int q = tid; q < packs; q += blockDim.x * CL) {
                A fv[VEC], yv[VEC] = {};
                unpack(load_pack<T, VEC>(xrow + (size_t)q * VEC), fv);
                if (MODE == MODE_PROBS) unpack(load_pack<T, VEC>(yrow + (size_t)q * VEC), yv);
                add_pack<MODE, T, I, A, VEC>(g, p, q * VEC - sh, lb.k, fv, yv);
            }
        }
        p = block_merge(p, red, parity, coefs);
        if (CL > 1) p = xchg.merge(p, (int)rank, ++tag, parity, coefs);
        parity ^= 1;
        const RowOut<A> o = finish_row<MODE>(g, p, lb);
        if (threadIdx.x == 0 && rank == 0) emit_row<MODE>(g, row, o, lb.bad, acc);
        if (grad && lean && o.active && !o.bad) {
            T* grow = grad + row * ldg;
            for (int q0 = tid; q0 < packs; q0 += step) {
                A fv[U][VEC];
                load_batch(q0, fv);
#pragma unroll
                for (int j = 0; j < U; ++j) {
                    const int q = q0 + j * (int)(blockDim.x * CL);
                    if (q < packs) store_grad_lean<T, A, VEC>(grow, q * VEC - sh, c, fv[j], o.ms, o.r, o.k, o.wls);
                }
            }
        } else if (grad) {
            T* grow = grad + row * ldg;
            for (int q = tid; q < packs; q += blockDim.x * CL) {
                A fv[VEC], yv[VEC] = {};
                unpack(load_pack<T, VEC>(xrow + (size_t)q * VEC), fv);
                if (MODE == MODE_PROBS) unpack(load_pack<T, VEC>(yrow + (size_t)q * VEC), yv);
                store_grad_pack<MODE, T, I, A, VEC>(g, o, grow, q * VEC - sh, fv, yv);
            }
        }
    }
    xchg.finish();
    finish_launch<A>(acc, ws, 0, n, inv, total_out, stats_out, bad_out);
}

template <typename T, typename I, typename A, int MODE, int VEC>
__global__ void __launch_bounds__(GPUCE_TEAM_THREADS, 1) sce_twopass(GPUCE_SCE_PARAMS) {
    twopass_rows<T, I, A, MODE, VEC, 1>(GPUCE_SCE_ARGS);
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
template <typename T, typename I, typename A, int MODE, int VEC, int CL>
__global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(GPUCE_TEAM_THREADS, 1)
    sce_twopass_cluster(GPUCE_SCE_PARAMS) {
    twopass_rows<T, I, A, MODE, VEC, CL>(GPUCE_SCE_ARGS);
}
#endif

// ------------------------------------------------------------------------- sce_prologue
// Before the fused kernel, where the call needs it: with class weights, block 0 finds the
// first weight that is NaN or infinite (ws[4] = its index + 1, 0 for none: the fused
// kernel then gives NaN results and reports it); with ``denominator`` (reduction="mean" with
// labels), D = sum of w_k (1 without weights) over the rows whose label is in [0, C) and not
// ignore_index, ws[3] = 1 / D (0 when D == 0), as double bits, finished by the last block.
template <typename I, typename A>
__global__ void __launch_bounds__(256) sce_prologue(const I* __restrict__ labels, const A* __restrict__ w,
                                                    long long n, int c, long long ignore_index, int denominator,
                                                    long long* __restrict__ ws) {
    __shared__ double red[32];
    __shared__ gpuce_i64 redi[32];
    __shared__ int last[1];
    if (w && blockIdx.x == 0) {
        long long first = 0x7fffffffffffffffLL;
        for (int j = threadIdx.x; j < c; j += blockDim.x)
            if (!isfinite(w[j]) && j < first) first = j;
        first = block_min(first, redi);
        if (threadIdx.x == 0) ws[4] = first < c ? first + 1 : 0;
    }
    if (!denominator) return;
    long long* part = ws + GPUCE_WS_PARTIALS;
    double s = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long lab = (long long)labels[i];
        if (lab != ignore_index && lab >= 0 && lab < c) s += w ? (double)w[lab] : 1.0;
    }
    s = block_sum_fixed(s, red);
    if (threadIdx.x == 0) {
        part[blockIdx.x] = __double_as_longlong(s);
        __threadfence();
        const unsigned long long t = atomicAdd(reinterpret_cast<unsigned long long*>(ws + 1), 1ull);
        last[0] = t == gridDim.x - 1;
    }
    __syncthreads();
    if (!last[0]) return;
    __threadfence();
    double d = 0.0;
    for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x) d += __longlong_as_double(__ldcg(part + b));
    d = block_sum_fixed(d, red);
    if (threadIdx.x == 0) {
        ws[3] = __double_as_longlong(d == 0.0 ? 0.0 : 1.0 / d);
        ws[1] = 0;
        __threadfence();
    }
}

}  // namespace gpuce
