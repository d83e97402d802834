// gpuce: token log-probabilities and entropy (the per-token quantities of RL training) as a
// row-state policy of the fused kernels' bodies (gpuce_row_kernels.cuh), beside cross-entropy's
// CeRow.  It holds everything about this mode: the call's arguments (TokArgs), a row's key
// (its label and its row index), its partial state (TokPart: max, shift, sum of exps, the
// entropy sum, the label value), the per-pack updates, the finish (TokOut), the per-row
// outputs and the gradient.  The merges and the batch finish (gpuce_team.cuh) and the bodies
// see it only through the interface TokRow spells out below.  Pasted into gpuce_tokens.cu by
// gpuce._cuda.source.
//
// Maths, per row i (A the accumulation type: float, double for double logits).  Values
// v_j = s tanh(f_j / s) with softcap s > 0, else f_j; u_j = v_j inv_tau (inv_tau = 1 / the
// temperature).  With m = max u, a finite shift ms (m when finite, else 0), e_j = u_j - ms:
//   S = sum_j exp(e_j),   B = sum_j exp(e_j) e_j   (a term is 0 where exp(e_j) == 0),
//   logp_i = e_k - log S (k the label),   H_i = log S - B / S   (the entropy of softmax(u)).
// A row whose maximum is not finite (a NaN, a +inf, every u -inf) gives NaN in both and a NaN
// gradient row; an ignored row (label == ignore_index) gives 0, 0 and a zero gradient row.
// The gradient of sum_i gl_i logp_i + gh_i H_i (gl, gh: the incoming per-row gradients, 0
// where their pointer is null), with q_j = exp(e_j) / S and alpha = gl - gh B / S:
//   G_ij = inv_tau (gl [j = k] - q_j (alpha + gh e_j))   (q_j (...) read as 0 where q_j = 0)
// times 1 - tanh^2(f_j / s) with softcap, rounded once to the gradient's type D.
//
// Two states at shifts ms1, ms2 merge at the shift M of the larger maximum as
//   S = S1 exp(ms1 - M) + S2 exp(ms2 - M),
//   B = (B1 + S1 (ms1 - M)) exp(ms1 - M) + (B2 + S2 (ms2 - M)) exp(ms2 - M)
// (TokPart::rebase moves one state, then the words add).  Shifts are always finite (the
// rowmath convention), so ms - M never is inf - inf; an empty or all -inf partial (S == 0)
// has nothing to move, and a factor exp(ms - M) that underflows to 0 takes B with it.
//
// How this policy meets the bodies:
// * the bodies' `cap` field is their path switch, not a softcap: rows with cap > 0 take the
//   online update (TokRow::add, which applies the softcap and the temperature to every value),
//   the rest the lean path, which takes the maximum of the raw values.  The entry points set
//   cap = 1 whenever u differs from f (a softcap, or a temperature other than 1), so the lean
//   hooks (sum, sum_online, pick) only ever see u = f; the softcap itself is `softcap`.
// * the incoming gradients are per row, but a row's hooks see only its key: load_key packs
//   the row index (+ 1) into the key's upper 32 bits beside the label's lower 32 bits (no
//   arithmetic on the loaded label, so the label load, issued a row ahead, is not waited on
//   until the row's context), and context loads gl and gh of that row.  The host keeps n
//   below 2^31 - 1 and an ignore_index whose lower 32 bits cannot be a label in [0, C).
// * the tile body hands context the label itself, not load_key's key, so this policy has no
//   tile entry point.
// * the gradient's type D may differ from the logits' T (float gradients of 16-bit logits):
//   the bodies form the row's pointer as grad + row * ldg in units of T, so the host passes
//   ldg as the gradient's row stride in bytes / sizeof(T), and the hooks read the pointer as
//   D*.  Such a gradient is stored a value at a time.
// * no batch sums: the accumulator counts the active rows (finish_launch needs one sum) and
//   the batch outputs write nothing.

namespace gpuce {

// ------------------------------------------------------------------------- the call's arguments
template <typename T, typename I, typename A>
struct TokArgs {  // the fields the bodies read (x .. cap), then this mode's
    const T* x; long long ldx; const I* labels; const T* y; long long ldy; long long n; int c;
    A cap;  // the bodies' path switch: 1 when u differs from f, else 0 (see the header)
    T* grad; long long ldg;  // the gradient: D values, its row stride in units of T
    A softcap, inv_tau; long long ignore_index;
    A* logp_out; A* ent_out; const A* g_logp; const A* g_ent;
};

namespace tok {

template <typename X, typename Y> struct same { static constexpr bool value = false; };
template <typename X> struct same<X, X> { static constexpr bool value = true; };

// u of a raw logit f: the softcap, then the temperature.
template <typename T, typename I, typename A>
__device__ __forceinline__ A value_of(const TokArgs<T, I, A>& g, A f) {
    return softcap_value(f, g.softcap) * g.inv_tau;
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

}  // namespace tok

// ------------------------------------------------------------------------- the partial row state
// The row-state interface of gpuce_team.cuh: m, ms, identity(), rebase(), each_sum(), WORDS,
// word(), store(), load().  ``extra``: the entropy sum b is live (the call asks for H, or for
// the gradient of H); without it b stays 0 and is never exchanged.
template <typename A>
struct TokPart {
    typedef A value_type;
    A m;   // max of the values seen (NaN-propagating)
    A ms;  // finite shift: m when finite, else 0
    A s;   // sum exp(u - ms)
    A b;   // sum exp(u - ms) (u - ms), terms with exp(u - ms) == 0 left out
    A xk;  // the label's u (0 unless this thread owns the label column)

    static constexpr int WORDS = 5;  // m, ms, s, b, xk

    __device__ __forceinline__ static TokPart identity() {
        TokPart p;
        p.m = neg_inf<A>();
        p.ms = p.s = p.b = p.xk = A(0);
        return p;
    }
    // Move the sums to the shift ms2 of the maximum m2.
    __device__ __forceinline__ void rebase(A m2, A ms2, bool extra) {
        if (s != A(0) && ms != ms2) {
            const A d = ms - ms2;
            const A e = ex(d);
            if (extra) b = e == A(0) ? A(0) : (b + s * d) * e;
            s *= e;
        }
        m = m2;
        ms = ms2;
    }
    template <typename F>
    __device__ __forceinline__ void each_sum(F&& f, bool extra) {
        f(s);
        f(xk);
        if (extra) f(b);
    }
    __device__ __forceinline__ A word(int i) const {
        return i == 0 ? m : i == 1 ? ms : i == 2 ? s : i == 3 ? b : xk;
    }
    __device__ __forceinline__ void store(A* d) const {
        d[0] = m; d[1] = ms; d[2] = s; d[3] = b; d[4] = xk;
    }
    __device__ __forceinline__ static TokPart load(const A* d) {
        TokPart p;
        p.m = d[0]; p.ms = d[1]; p.s = d[2]; p.b = d[3]; p.xk = d[4];
        return p;
    }
};

// ------------------------------------------------------------------------- a row's context
// active: not ignored (and a row of the launch); bad: a label outside [0, C) (the host checks
// labels first; such a row gives NaN, never a read at its label); k: the label column (-1 for
// none); gl, gh: the row's incoming gradients (0 where absent).
template <typename A>
struct TokCtx {
    bool active, bad;
    int k;
    A gl, gh;
};

// What a row's outputs and gradient need.
template <typename A>
struct TokOut {
    bool active, bad;
    int k;
    A ms;     // the finite shift: q_j = exp(u_j - ms) r / inv_tau
    A r;      // inv_tau / S
    A alpha;  // gl - gh B / S
    A gh;     // the incoming gradient of H
    A wl;     // inv_tau gl: the label column's own term
    A logp, ent;
};

// ------------------------------------------------------------------------- the batch
// No batch sums in this mode: finish_launch needs at least one, so the active rows are counted
// (and not written anywhere).
struct TokAcc {
    static constexpr int NSUM = 1;
    double active;
    long long bad;  // never set: labels are checked by the host
    __device__ __forceinline__ static TokAcc zero() { return {0.0, 0x7fffffffffffffffLL}; }
    __device__ __forceinline__ double sum(int) const { return active; }
};

struct TokBatch {
    __device__ __forceinline__ void write(const double (&)[TokAcc::NSUM], long long, long long*) const {}
};

// ------------------------------------------------------------------------- the gradient
// G of one column from its raw logit f (is_label: j = k) of an active, good row.
template <typename T, typename I, typename A>
__device__ __forceinline__ A tok_grad_at(const TokArgs<T, I, A>& g, const TokOut<A>& o, A f, bool is_label) {
    A v = f, dcap = A(1);
    if (g.softcap > A(0)) {
        const A t = tanh_acc(f / g.softcap);
        v = g.softcap * t;
        dcap = A(1) - t * t;
    }
    const A d = v * g.inv_tau - o.ms;
    const A e = ex(d);
    const A qterm = e == A(0) ? A(0) : e * o.r * (o.alpha + o.gh * d);
    return ((is_label ? o.wl : A(0)) - qterm) * dcap;
}

// Store the VEC values d of columns col0.. (columns outside [0, C) of an edge pack skipped)
// into the row grow (a D row behind a T pointer, see the header), rounded to D once.
template <typename T, typename D, typename A, int VEC, bool EDGES>
__device__ __forceinline__ void tok_store(T* grow, int col0, int c, const A (&d)[VEC]) {
    const bool whole = whole_pack<VEC, EDGES>(col0, c);
    if constexpr (tok::same<T, D>::value) {
        if (whole) {
            store_vals<T>(grow + col0, d);
            return;
        }
#pragma unroll
        for (int u = 0; u < VEC; ++u)
            if (col0 + u >= 0 && col0 + u < c) grow[col0 + u] = store_t<T>(d[u]);
    } else {
        D* gr = reinterpret_cast<D*>(grow);
#pragma unroll
        for (int u = 0; u < VEC; ++u)
            if (whole || (col0 + u >= 0 && col0 + u < c)) gr[col0 + u] = store_t<D>(d[u]);
    }
}

// ------------------------------------------------------------------------- the policy
// T: the logits, I: the labels, A: the accumulation type, D: the gradient's type (T, or A).
template <typename T_, typename I_, typename A_, typename D_>
struct TokRow {
    typedef T_ T;
    typedef I_ I;
    typedef A_ A;
    typedef D_ D;
    typedef TokArgs<T, I, A> Args;
    typedef TokPart<A> State;
    typedef TokCtx<A> Ctx;
    typedef TokOut<A> Out;
    typedef TokAcc Acc;
    typedef TokBatch Batch;
    static constexpr bool Y = false;    // no second stream
    static constexpr bool KEYS = true;  // a key a row: the label (and the row, see load_key)

    // The row's key: the row + 1 in the upper 32 bits, the label's lower 32 bits below (0 for
    // a row past the end).  Bit moves only: the label is not waited on here.
    __device__ __forceinline__ static long long load_key(const Args& g, long long row, bool valid) {
        if (!valid) return 0;
        const unsigned lo = (unsigned)(unsigned long long)(long long)g.labels[row];
        return (long long)(((unsigned long long)(row + 1) << 32) | lo);
    }
    __device__ __forceinline__ static Ctx context(const Args& g, long long key, bool valid) {
        Ctx r;
        const long long row = (long long)((unsigned long long)key >> 32) - 1;
        const int lab = (int)(unsigned)(unsigned long long)key;
        r.active = valid && row >= 0 && lab != (int)(unsigned)(unsigned long long)g.ignore_index;
        r.bad = r.active && (lab < 0 || lab >= g.c);
        r.k = r.active && !r.bad ? lab : -1;
        r.gl = (r.active && g.g_logp) ? g.g_logp[row] : A(0);
        r.gh = (r.active && g.g_ent) ? g.g_ent[row] : A(0);
        return r;
    }
    // Whether the entropy sum is live in this call.
    __device__ __forceinline__ static bool extra(const Args& g) {
        return g.ent_out != nullptr || (g.grad != nullptr && g.g_ent != nullptr);
    }
    // The online update of a pack (raw logits fv, columns col0..; columns outside [0, C) of
    // an edge pack count as -inf): u of each value, the state raised to the pack's maximum,
    // then the sums at the shift.
    template <int VEC, bool EDGES>
    __device__ __forceinline__ static void add(const Args& g, State& p, const Ctx& lb, int col0, const A (&fv)[VEC],
                                               const A (&)[VEC]) {
        const bool whole = whole_pack<VEC, EDGES>(col0, g.c);
        const bool ext = extra(g);
        A v[VEC];
        A pm = neg_inf<A>();
#pragma unroll
        for (int u = 0; u < VEC; ++u) {
            v[u] = (whole || (col0 + u >= 0 && col0 + u < g.c)) ? tok::value_of(g, fv[u]) : neg_inf<A>();
            pm = nanmax(pm, v[u]);
        }
        const A m = nanmax(p.m, pm);
        p.rebase(m, isfinite(m) ? m : A(0), ext);
#pragma unroll
        for (int u = 0; u < VEC; ++u) {
            const A d = v[u] - p.ms;
            const A e = ex(d);
            p.s += e;
            if (ext && e != A(0)) p.b += e * d;
        }
        tok::pick_label(p.xk, col0, lb.k, v);
    }
    // The lean sums of a pack at the state's shift (u = f here: see the header).  EXTRA: the
    // entropy sum too; PICK: take the label's value from the pack.
    template <bool EXTRA, int VEC, bool EDGES, bool PICK = true>
    __device__ __forceinline__ static void sum(const Args& g, State& p, const Ctx& lb, int col0, const A (&fv)[VEC],
                                               const A (&)[VEC]) {
        const bool whole = whole_pack<VEC, EDGES>(col0, g.c);
        const A msl = p.ms * A(1.4426950408889634);
#pragma unroll
        for (int u = 0; u < VEC; ++u) {
            if (!whole && !(col0 + u >= 0 && col0 + u < g.c)) continue;
            if (EXTRA) {
                const A d = fv[u] - p.ms;
                const A e = ex(d);
                p.s += e;
                if (e != A(0)) p.b += e * d;
            } else {
                p.s += ex_at<T>(fv[u], p.ms, msl);
            }
        }
        if (PICK) tok::pick_label(p.xk, col0, lb.k, fv);
    }
    // The label's value of a row held whole (the tile body; u = f there).
    __device__ __forceinline__ static void pick(State& p, const Ctx& lb, const T* row) {
        if (lb.k >= 0) p.xk = load_acc<A>(row[lb.k]);
    }
    // The two-pass body's lean online update of a pack (edges already -inf; u = f, no
    // entropy sum): the pack's maximum, a rescale only when it exceeds the state's, the sum.
    template <int VEC>
    __device__ __forceinline__ static void sum_online(State& p, const Ctx& lb, int col0, const A (&fv)[VEC]) {
        A pm = fv[0];
#pragma unroll
        for (int u = 1; u < VEC; ++u) pm = nanmax_fast(pm, fv[u]);
        if (!(pm <= p.m)) {  // a new maximum, or a NaN
            const A m = nanmax_fast(p.m, pm);
            p.rebase(m, isfinite(m) ? m : A(0), false);
        }
        const A msl = p.ms * A(1.4426950408889634);
#pragma unroll
        for (int u = 0; u < VEC; ++u) p.s += ex_at<T>(fv[u], p.ms, msl);
        tok::pick_label(p.xk, col0, lb.k, fv);
    }
    __device__ __forceinline__ static Out finish(const Args& g, const State& p, const Ctx& lb) {
        Out o;
        o.active = lb.active;
        o.bad = lb.active && (lb.bad || !isfinite(p.m));
        o.k = lb.k;
        o.ms = p.ms;
        const A ls = log(p.s);
        const A bs = p.b / p.s;
        o.logp = (p.xk - p.ms) - ls;
        o.ent = ls - bs;
        o.r = g.inv_tau / p.s;
        o.gh = lb.gh;
        o.alpha = lb.gh != A(0) ? lb.gl - lb.gh * bs : lb.gl;
        o.wl = g.inv_tau * lb.gl;
        return o;
    }
    __device__ __forceinline__ static void emit(const Args& g, long long row, const Out& o, const Ctx&, Acc& acc) {
        const A nan = quiet_nan<A>();
        g.logp_out[row] = !o.active ? A(0) : o.bad ? nan : o.logp;
        if (g.ent_out) g.ent_out[row] = !o.active ? A(0) : o.bad ? nan : o.ent;
        if (o.active) acc.active += 1.0;
    }
    // Whether the row's gradient takes grad_lean (an active, good row) rather than grad.
    __device__ __forceinline__ static bool lean_grad(const Args&, const Out& o) { return o.active && !o.bad; }
    template <int VEC, bool EDGES>
    __device__ __forceinline__ static void grad_lean(const Args& g, const Out& o, T* grow, int col0,
                                                     const A (&fv)[VEC]) {
        A d[VEC];
        if (o.k >= 0 && (unsigned)(o.k - col0) < (unsigned)VEC) {  // the label column: one pack a row
#pragma unroll
            for (int u = 0; u < VEC; ++u) d[u] = tok_grad_at(g, o, fv[u], col0 + u == o.k);
        } else {
#pragma unroll
            for (int u = 0; u < VEC; ++u) d[u] = tok_grad_at(g, o, fv[u], false);
        }
        tok_store<T, D, A, VEC, EDGES>(grow, col0, g.c, d);
    }
    // Any row's gradient: 0 for an inactive row, NaN for a bad one, else grad_lean's.
    template <int VEC, bool EDGES>
    __device__ __forceinline__ static void grad(const Args& g, const Out& o, T* grow, int col0, const A (&fv)[VEC],
                                                const A (&)[VEC]) {
        if (o.active && !o.bad) {
            grad_lean<VEC, EDGES>(g, o, grow, col0, fv);
            return;
        }
        A d[VEC];
        const A fill = o.active ? quiet_nan<A>() : A(0);
#pragma unroll
        for (int u = 0; u < VEC; ++u) d[u] = fill;
        tok_store<T, D, A, VEC, EDGES>(grow, col0, g.c, d);
    }
    // The tile body's lean gradient (no tile entry point uses this policy: see the header).
    template <typename Cols>
    __device__ __forceinline__ static void tile_grad_lean(T*, const State&, const Out&, Cols&&) {}
};

}  // namespace gpuce
