// gpuce: cross-entropy's row-state policy, the first policy the fused kernels
// (gpuce_row_kernels.cuh) are templated on.  It holds everything about the loss: the call's
// arguments (Args, GPUCE_SCE_PARAMS), a row's label (Label), its partial state (CePart: max,
// shift, sum of exps, the coefficient sums, the label value), the per-pack updates, the
// finish (RowOut), the per-row outputs and the batch sums (CeAcc, CeBatch), and the gradient.
// The merges and the batch finish (gpuce_team.cuh) and the kernels see it only through the
// interface CeRow spells out below.  Pasted into gpuce_sce_fused.cu by gpuce._cuda.source.
//
// The maths (lse, loss, gradient and the label rules) is stated once, in gpuce_sce_fused.cu's
// header.

namespace gpuce {

// ------------------------------------------------------------------------- the call's arguments
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

// GPUCE_SCE_PARAMS' names, in order: a kernel passing them on
#define GPUCE_SCE_ARGS                                                                                 \
    x, ldx, labels, y, ldy, w, n, c, eps_over_c, one_minus_eps, z, cap, ignore_index, inv_denom,       \
        inv_from_ws, loss_out, lse_out, correct_out, grad, ldg, ws, total_out, stats_out, bad_out

// The reduction's scale (1 / denominator for "mean", else 1), the Args of a launch (g) and
// its batch outputs (out).
#define GPUCE_SCE_SETUP                                                                               \
    const bool wbad_ = w != nullptr && ws[4] != 0;                                                    \
    const double inv = wbad_ ? __longlong_as_double(0x7ff8000000000000LL)                              \
                             : (inv_from_ws ? __longlong_as_double(ws[3]) : inv_denom);                \
    const Args<T, I, A> g = {x, ldx, labels, y, ldy, w, n, c, eps_over_c, one_minus_eps, z, cap,     \
                             ignore_index, A(inv), loss_out, lse_out, correct_out, grad, ldg, wbad_}; \
    const CeBatch<A> out = {n, inv, total_out, stats_out, bad_out}

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

// ------------------------------------------------------------------------- the partial row state
// The row-state interface the merges use (gpuce_team.cuh): the members m and ms, identity(),
// rebase(), each_sum(), WORDS, word(), store(), load().
template <typename A>
struct CePart {
    typedef A value_type;
    A m;   // max of the values seen (NaN-propagating)
    A ms;  // finite shift: m when finite, else 0
    A s;   // sum exp(v - ms)
    A a;   // sum coef
    A b;   // sum coef (v - ms), coef != 0 only
    A xk;  // the label value (0 unless this thread owns the label column)

    static constexpr int WORDS = 6;  // m, ms, s, a, b, xk

    __device__ __forceinline__ static CePart identity() {
        CePart p;
        p.m = neg_inf<A>();
        p.ms = p.s = p.a = p.b = p.xk = A(0);
        return p;
    }
    // Move the sums to the shift ms2 of the maximum m2 (``extra``: the coefficient sums too).
    __device__ __forceinline__ void rebase(A m2, A ms2, bool extra) {
        s = rescaled(s, ms, ms2);
        if (extra) b += shift(a, ms, ms2);
        m = m2;
        ms = ms2;
    }
    // f(w) for each word that adds as it is once the states share a shift, in a fixed order
    // (``extra``: the coefficient sums a and b, zero everywhere otherwise).
    template <typename F>
    __device__ __forceinline__ void each_sum(F&& f, bool extra) {
        f(s);
        f(xk);
        if (extra) {
            f(a);
            f(b);
        }
    }
    __device__ __forceinline__ A word(int i) const {
        return i == 0 ? m : i == 1 ? ms : i == 2 ? s : i == 3 ? a : i == 4 ? b : xk;
    }
    __device__ __forceinline__ void store(A* d) const {
        d[0] = m; d[1] = ms; d[2] = s; d[3] = a; d[4] = b; d[5] = xk;
    }
    __device__ __forceinline__ static CePart load(const A* d) {
        CePart p;
        p.m = d[0]; p.ms = d[1]; p.s = d[2]; p.a = d[3]; p.b = d[4]; p.xk = d[5];
        return p;
    }
};

// Move the partial to a new maximum (before adding values at the new shift).
template <typename A>
__device__ __forceinline__ void part_raise(CePart<A>& p, A mnew) {
    const A m = nanmax(p.m, mnew);
    p.rebase(m, isfinite(m) ? m : A(0), true);
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
__device__ __forceinline__ RowOut<A> finish_row(const Args<T, I, A>& g, const CePart<A>& p, const Label<A>& lb) {
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

// ------------------------------------------------------------------------- the batch
// A thread's running batch sums (float64, rows added in the thread's own order): the batch
// accumulator interface of finish_launch (gpuce_team.cuh): NSUM, sum(q), bad.
struct CeAcc {
    static constexpr int NSUM = GPUCE_NPART;  // loss, z part, correct, active
    double loss, zpart, correct, active;
    long long bad;  // the first bad label position seen (LLONG_MAX for none)
    __device__ __forceinline__ static CeAcc zero() { return {0.0, 0.0, 0.0, 0.0, 0x7fffffffffffffffLL}; }
    __device__ __forceinline__ double sum(int q) const {
        return q == 0 ? loss : q == 1 ? zpart : q == 2 ? correct : active;
    }
};

// The launch's batch outputs, written by the last block: total_out = loss sum * inv;
// stats_out = {z part sum * inv, correct / active (NaN when no row is active)}; bad_out =
// {the first bad label position (n when none), the first bad class weight (-1 when none)}.
template <typename A>
struct CeBatch {
    long long n;
    double inv;
    A* total_out;
    A* stats_out;
    long long* bad_out;
    __device__ __forceinline__ void write(const double (&tot)[CeAcc::NSUM], long long first, long long* ws) const {
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
    }
};

// The team leader's per-row outputs and its batch sums.
template <int MODE, typename T, typename I, typename A>
__device__ __forceinline__ void emit_row(const Args<T, I, A>& g, long long row, const RowOut<A>& o, bool bad_label,
                                         CeAcc& acc) {
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

// ------------------------------------------------------------------------- the gradient
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

// The gradient of the VEC columns at col0 (columns outside [0, C) of an edge pack skipped),
// stored at grow + col0: one 16-byte store for a whole pack.
template <int MODE, typename T, typename I, typename A, int VEC, bool EDGES = true>
__device__ __forceinline__ void store_grad_pack(const Args<T, I, A>& g, const RowOut<A>& o, T* grow, int col0,
                                                const A (&fv)[VEC], const A (&yv)[VEC]) {
    if constexpr (!EDGES) {  // the register-stage kernel: its unrolled loops stay small
        Pack<T, VEC> outp;
#pragma unroll
        for (int u = 0; u < VEC; ++u)
            outp.v[u] = store_t<T>(row_grad_at<MODE>(g, o, col0 + u, fv[u], yv[u], col0 + u == o.k));
        store_pack<T, VEC>(grow + col0, outp);
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

// ------------------------------------------------------------------------- the online update
// Add VEC values (raw logits fv, targets yv) at columns col0.. to the partial (columns
// outside [0, C) of an edge pack count as -inf with no coefficient; EDGES = false: the caller
// guarantees whole packs).
template <int MODE, typename T, typename I, typename A, int VEC, bool EDGES = true>
__device__ __forceinline__ void add_pack(const Args<T, I, A>& g, CePart<A>& p, int col0, int k, const A (&fv)[VEC],
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
// subtract, a multiply, ex2 (ex_at) and an add a value).  The label value is picked once a pack.

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
__device__ __forceinline__ void pack_sum(const Args<T, I, A>& g, CePart<A>& p, int col0, int k, const A (&fv)[VEC],
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
__device__ __forceinline__ void pack_online(CePart<A>& p, const A (&fv)[VEC]) {
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

// ------------------------------------------------------------------------- the policy
// What the kernels of gpuce_row_kernels.cuh call.  A policy names its types (the element T,
// the key I, the accumulation A, its Args, its row state, its per-row context, its finished
// row, its batch accumulator and batch outputs), says whether it reads a second stream of T
// beside the logits (Y: the probability targets here; a teacher's logits elsewhere), and
// implements the hooks below; every hook is forceinline, so the kernels compile as if the
// loss were written into them.
template <typename T_, typename I_, typename A_, int MODE>
struct CeRow {
    typedef T_ T;
    typedef I_ I;
    typedef A_ A;
    typedef gpuce::Args<T, I, A> Args;
    typedef CePart<A> State;
    typedef Label<A> Ctx;
    typedef RowOut<A> Out;
    typedef CeAcc Acc;
    typedef CeBatch<A> Batch;
    static constexpr bool Y = MODE == MODE_PROBS;  // the targets: a second stream of T
    static constexpr bool KEYS = MODE == MODE_LABELS;  // a key (the label) a row, of type I

    // The row's key (its label), loaded a row ahead of its use, and its context.
    __device__ __forceinline__ static long long load_key(const Args& g, long long row, bool valid) {
        return load_label<MODE>(g, row, valid);
    }
    __device__ __forceinline__ static Ctx context(const Args& g, long long key, bool valid) {
        return label_of<MODE>(g, key, valid);
    }
    // Whether the state's optional words (the coefficient sums) are live in this call.
    __device__ __forceinline__ static bool extra(const Args& g) {
        return MODE == MODE_PROBS || g.eps_over_c != A(0);
    }
    // The online update of a pack (raw logits fv, targets yv, columns col0..).
    template <int VEC, bool EDGES>
    __device__ __forceinline__ static void add(const Args& g, State& p, const Ctx& lb, int col0, const A (&fv)[VEC],
                                               const A (&yv)[VEC]) {
        add_pack<MODE, T, I, A, VEC, EDGES>(g, p, col0, lb.k, fv, yv);
    }
    // The lean sums of a pack at the state's shift (EXTRA: the optional words too; PICK: take
    // the key column's value from the pack, else pick() does it after).
    template <bool EXTRA, int VEC, bool EDGES, bool PICK = true>
    __device__ __forceinline__ static void sum(const Args& g, State& p, const Ctx& lb, int col0, const A (&fv)[VEC],
                                               const A (&yv)[VEC]) {
        pack_sum<MODE, EXTRA, T, I, A, VEC, EDGES>(g, p, col0, PICK ? lb.k : -1, fv, yv);
    }
    // The key column's value of a row held whole (the tile), after sums taken without PICK.
    __device__ __forceinline__ static void pick(State& p, const Ctx& lb, const T* row) {
        if (lb.k >= 0) p.xk = load_acc<A>(row[lb.k]);
    }
    // The two-pass kernel's lean online update of a pack (edges already -inf).
    template <int VEC>
    __device__ __forceinline__ static void sum_online(State& p, const Ctx& lb, int col0, const A (&fv)[VEC]) {
        pack_online<T>(p, fv);
        pick_label(p.xk, col0, lb.k, fv);
    }
    __device__ __forceinline__ static Out finish(const Args& g, const State& p, const Ctx& lb) {
        return finish_row<MODE>(g, p, lb);
    }
    __device__ __forceinline__ static void emit(const Args& g, long long row, const Out& o, const Ctx& lb, Acc& acc) {
        emit_row<MODE>(g, row, o, lb.bad, acc);
    }
    // Whether the row's gradient takes the lean form (grad_lean) rather than grad.
    __device__ __forceinline__ static bool lean_grad(const Args& g, const Out& o) {
        return o.active && !o.bad && !extra(g) && g.cap == A(0);
    }
    template <int VEC, bool EDGES>
    __device__ __forceinline__ static void grad_lean(const Args& g, const Out& o, T* grow, int col0,
                                                     const A (&fv)[VEC]) {
        store_grad_lean<T, A, VEC, EDGES>(grow, col0, g.c, fv, o.ms, o.r, o.k, o.wls);
    }
    template <int VEC, bool EDGES>
    __device__ __forceinline__ static void grad(const Args& g, const Out& o, T* grow, int col0, const A (&fv)[VEC],
                                                const A (&yv)[VEC]) {
        store_grad_pack<MODE, T, I, A, VEC, EDGES>(g, o, grow, col0, fv, yv);
    }
    // The tile's lean gradient written over its row (one thread a row), columns in the order
    // cols(f) visits them, rounded to T once.
    template <typename Cols>
    __device__ __forceinline__ static void tile_grad_lean(T* xr, const State& p, const Out& o, Cols&& cols) {
        const A msl = o.ms * A(1.4426950408889634);
        cols([&](int j) { xr[j] = store_t<T>(ex_at<T>(load_acc<A>(xr[j]), o.ms, msl) * o.r); });
        if (o.k >= 0) xr[o.k] = store_t<T>(ex_at<T>(p.xk, o.ms, msl) * o.r - o.wls);
    }
};

}  // namespace gpuce
