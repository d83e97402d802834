// gpuce: distillation from dense teacher logits (forward and reverse KL) as a row-state policy
// of the fused kernels' bodies (gpuce_row_kernels.cuh), beside cross-entropy's CeRow.  The
// student's logits are the bodies' x, the teacher's their second stream y (R::Y, as CeRow
// reads probability targets): both rows are read once (the two-pass kernel twice), the
// student's gradient written once.  Pasted into gpuce_distill.cu by gpuce._cuda.source.
//
// Maths, per row i (A the accumulation type: float, double for double logits).  Values
// u_j = cap(S_j) inv_tau, w_j = cap(T_j) inv_tau (cap(f) = s tanh(f / s) with softcap s > 0,
// else f; inv_tau = 1 / the temperature).  Both streams' sums are kept at ONE shift: the
// merges of gpuce_team.cuh agree on a single maximum, so the state's m is the maximum over
// both rows, M = max_j max(u_j, w_j), and ms its finite shift:
//   Ss = sum_j exp(u_j - ms),  St = sum_j exp(w_j - ms),
//   forward (beta = 0):  X = sum_j exp(w_j - ms) (w_j - u_j)
//   reverse (beta = 1):  X = sum_j exp(u_j - ms) (u_j - w_j)
// (a term is 0 where its exp is 0).  With
// lse_S = ms + log Ss, lse_T = ms + log St (the shift cancels in their difference):
//   beta = 0:  L = X / St - log(St / Ss)      dL/du_j = p_S,j - p_T,j
//   beta = 1:  L = X / Ss - log(Ss / St)      dL/du_j = p_S,j (log p_S,j - log p_T,j - L)
// with p_S,j = exp((u_j - ms) - log Ss), p_T,j = exp((w_j - ms) - log St) formed a value at a
// time (full precision however small; u_j - lse_S would round at the logits' magnitude), the beta = 1 term 0 where p_S,j == 0.  The gradient written is
// sigma_i inv_tau dL/du_j, times 1 - tanh^2(S_j / s) with softcap, rounded once to T.
// The generalised JSD (0 < beta < 1) needs log M_j (both lse first) inside its loss sum and a
// second row reduction for its gradient: no body has that sweep, so it stays on the array
// path (the host raises NotImplementedError).
//
// Rows: an inactive row (the host's mask; a label equal to ignore_index) gives loss 0 and a
// zero gradient row; a row whose maximum M is not finite (a NaN anywhere, a +inf, both rows
// all -inf) gives NaN and a NaN gradient row.  The one shift costs range when the two maxima
// lie far apart: a stream whose maximum is more than ~40 (float; ~620 double) below M has a
// sum under TINY, whose small terms may be subnormal (or none: every value of that stream
// -inf, a NaN row of the array path).  Such a row is not computed here: its loss is written
// NaN, its gradient row left as it was (the student's logits when in place), its `redo` byte
// set to 1 and counted in the batch sum, and the host recomputes it on the array path.  (No
// count words tell an all -inf stream from an underflow: the double state's words would pass
// the static shared memory the planner allows.)
//
// How this policy meets the bodies:
// * the bodies' `cap` field is their path switch: the entry points always set it to 1, so
//   every row takes the online update (DisRow::add), which reads both streams; the lean hooks
//   (sum, sum_online, pick, grad_lean, tile_grad_lean) are never reached and do nothing, and
//   lean_grad is false (grad_lean does not see the teacher).  The softcap itself is `softcap`.
// * the key packs the row (+ 1) above the row's active bit: context reads the row's sigma.
//   The "labels" are the active mask (unsigned char, a null pointer for every row active).
// * no tile entry point: the tile body stages either the second stream or the keys.
// * n < 2^62 rows (the key), C < 2^31.

namespace gpuce {

// ------------------------------------------------------------------------- the call's arguments
template <typename T, typename I, typename A>
struct DisArgs {  // the fields the bodies read (x .. ldg), then this mode's
    const T* x; long long ldx; const I* labels; const T* y; long long ldy; long long n; int c;
    A cap;  // the bodies' path switch: always 1 (see the header)
    T* grad; long long ldg;
    A softcap, inv_tau;
    int reverse;             // 0: beta = 0 (KL(p_T || p_S)), 1: beta = 1 (KL(p_S || p_T))
    A scale;                 // sigma when row_scale is null
    const A* row_scale;      // per-row sigma, or null
    A* loss_out;             // (n,) losses
    unsigned char* redo;     // (n,) bytes, zero on entry: rows the host recomputes
};

namespace dis {

template <typename A> struct tiny;
template <> struct tiny<float> { static constexpr float value = 8.673617379884035e-19f; };  // 2^-60
template <> struct tiny<double> { static constexpr double value = 7.458340731200207e-272; };  // 2^-900

}  // namespace dis

// ------------------------------------------------------------------------- the partial row state
template <typename A>
struct DisPart {
    typedef A value_type;
    A m;    // max over both streams' values seen (NaN-propagating)
    A ms;   // finite shift: m when finite, else 0
    A ss;   // sum exp(u - ms)
    A st;   // sum exp(w - ms)
    A x;    // the cross sum (see the header), at the shift ms

    static constexpr int WORDS = 5;

    __device__ __forceinline__ static DisPart identity() {
        DisPart p;
        p.m = neg_inf<A>();
        p.ms = p.ss = p.st = p.x = A(0);
        return p;
    }
    // Move the sums to the shift ms2 of the maximum m2 (X scales as the sums: its factors
    // w - u do not depend on the shift).  A zero sum stays 0: the identity's shift 0 may lie
    // far above the first values' (exp(ms - ms2) = inf).
    __device__ __forceinline__ void rebase(A m2, A ms2, bool) {
        if (ms != ms2) {
            const A e = ex(ms - ms2);
            ss = ss == A(0) ? ss : ss * e;
            st = st == A(0) ? st : st * e;
            x = x == A(0) ? x : x * e;
        }
        m = m2;
        ms = ms2;
    }
    template <typename F>
    __device__ __forceinline__ void each_sum(F&& f, bool) {
        f(ss);
        f(st);
        f(x);
    }
    __device__ __forceinline__ A word(int i) const {
        return i == 0 ? m : i == 1 ? ms : i == 2 ? ss : i == 3 ? st : x;
    }
    __device__ __forceinline__ void store(A* d) const {
        d[0] = m; d[1] = ms; d[2] = ss; d[3] = st; d[4] = x;
    }
    __device__ __forceinline__ static DisPart load(const A* d) {
        DisPart p;
        p.m = d[0]; p.ms = d[1]; p.ss = d[2]; p.st = d[3]; p.x = d[4];
        return p;
    }
};

// ------------------------------------------------------------------------- a row's context
template <typename A>
struct DisCtx {
    bool active;
    A coef;  // sigma_i inv_tau
};

template <typename A>
struct DisOut {
    bool active, bad, redo;
    A ms;            // the shift; log p = (u - ms) - ls (never u - lse: lse rounds at |u|)
    A ls, lt;        // log Ss, log St
    A loss;
    A coef;          // sigma_i inv_tau
};

// ------------------------------------------------------------------------- the batch
struct DisAcc {
    static constexpr int NSUM = 1;  // the rows left to the host
    double redo;
    long long bad;  // never set
    __device__ __forceinline__ static DisAcc zero() { return {0.0, 0x7fffffffffffffffLL}; }
    __device__ __forceinline__ double sum(int) const { return redo; }
};

struct DisBatch {
    double* redo_count;  // the number of rows left to the host, or null
    __device__ __forceinline__ void write(const double (&tot)[DisAcc::NSUM], long long, long long*) const {
        if (redo_count) redo_count[0] = tot[0];
    }
};

// ------------------------------------------------------------------------- the policy
template <typename T_, typename I_, typename A_>
struct DisRow {
    typedef T_ T;
    typedef I_ I;
    typedef A_ A;
    typedef DisArgs<T, I, A> Args;
    typedef DisPart<A> State;
    typedef DisCtx<A> Ctx;
    typedef DisOut<A> Out;
    typedef DisAcc Acc;
    typedef DisBatch Batch;
    static constexpr bool Y = true;     // the teacher's logits
    static constexpr bool KEYS = true;  // the row and its active bit

    __device__ __forceinline__ static long long load_key(const Args& g, long long row, bool valid) {
        if (!valid) return 0;
        const long long act = g.labels ? (g.labels[row] != 0 ? 1 : 0) : 1;
        return ((row + 1) << 1) | act;
    }
    __device__ __forceinline__ static Ctx context(const Args& g, long long key, bool valid) {
        Ctx r;
        const long long row = (key >> 1) - 1;
        r.active = valid && row >= 0 && (key & 1);
        r.coef = (r.active && g.row_scale ? g.row_scale[row] : g.scale) * g.inv_tau;
        return r;
    }
    __device__ __forceinline__ static bool extra(const Args&) { return true; }

    // The online update of a pack (student fv, teacher yv, columns col0..; columns outside
    // [0, C) of an edge pack count as -inf in both).
    template <int VEC, bool EDGES>
    __device__ __forceinline__ static void add(const Args& g, State& p, const Ctx&, int col0, const A (&fv)[VEC],
                                               const A (&yv)[VEC]) {
        const bool whole = whole_pack<VEC, EDGES>(col0, g.c);
        A u[VEC], w[VEC];
        A pm = neg_inf<A>();
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const bool in = whole || (col0 + k >= 0 && col0 + k < g.c);
            u[k] = in ? softcap_value(fv[k], g.softcap) * g.inv_tau : neg_inf<A>();
            w[k] = in ? softcap_value(yv[k], g.softcap) * g.inv_tau : neg_inf<A>();
            pm = nanmax(pm, nanmax(u[k], w[k]));
        }
        const A m = nanmax(p.m, pm);
        p.rebase(m, isfinite(m) ? m : A(0), true);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const A es = ex(u[k] - p.ms), et = ex(w[k] - p.ms);
            p.ss += es;
            p.st += et;
            if (g.reverse) {
                if (es != A(0)) p.x += es * (u[k] - w[k]);
            } else {
                if (et != A(0)) p.x += et * (w[k] - u[k]);
            }
        }
    }
    // The lean hooks: never reached (cap is always 1, lean_grad always false).
    template <bool EXTRA, int VEC, bool EDGES, bool PICK = true>
    __device__ __forceinline__ static void sum(const Args&, State&, const Ctx&, int, const A (&)[VEC],
                                               const A (&)[VEC]) {}
    __device__ __forceinline__ static void pick(State&, const Ctx&, const T*) {}
    template <int VEC>
    __device__ __forceinline__ static void sum_online(State&, const Ctx&, int, const A (&)[VEC]) {}
    template <int VEC, bool EDGES>
    __device__ __forceinline__ static void grad_lean(const Args&, const Out&, T*, int, const A (&)[VEC]) {}
    template <typename Cols>
    __device__ __forceinline__ static void tile_grad_lean(T*, const State&, const Out&, Cols&&) {}
    __device__ __forceinline__ static bool lean_grad(const Args&, const Out&) { return false; }

    __device__ __forceinline__ static Out finish(const Args& g, const State& p, const Ctx& lb) {
        Out o;
        o.active = lb.active;
        o.bad = lb.active && !isfinite(p.m);
        o.redo = lb.active && !o.bad && (p.ss < dis::tiny<A>::value || p.st < dis::tiny<A>::value);
        const A ls = log(p.ss), lt = log(p.st);
        o.ms = p.ms;
        o.ls = ls;
        o.lt = lt;
        o.loss = g.reverse ? p.x / p.ss - (ls - lt) : p.x / p.st - (lt - ls);
        o.coef = lb.coef;
        return o;
    }
    __device__ __forceinline__ static void emit(const Args& g, long long row, const Out& o, const Ctx&, Acc& acc) {
        g.loss_out[row] = !o.active ? A(0) : (o.bad || o.redo) ? quiet_nan<A>() : o.loss;
        if (o.redo) {
            g.redo[row] = 1;
            acc.redo += 1.0;
        }
    }
    // A pack's gradient: 0 for an inactive row, NaN for a bad one, nothing for a row left to
    // the host, else the formulas of the header.
    template <int VEC, bool EDGES>
    __device__ __forceinline__ static void grad(const Args& g, const Out& o, T* grow, int col0, const A (&fv)[VEC],
                                                const A (&yv)[VEC]) {
        if (o.redo) return;
        A d[VEC];
        if (!o.active || o.bad) {
            const A fill = o.active ? quiet_nan<A>() : A(0);
#pragma unroll
            for (int k = 0; k < VEC; ++k) d[k] = fill;
        } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                A v = fv[k], dcap = A(1);
                if (g.softcap > A(0)) {
                    const A t = tanh_acc(fv[k] / g.softcap);
                    v = g.softcap * t;
                    dcap = A(1) - t * t;
                }
                const A ls = (v * g.inv_tau - o.ms) - o.ls;                              // log p_S
                const A lt = (softcap_value(yv[k], g.softcap) * g.inv_tau - o.ms) - o.lt;  // log p_T
                const A ps = ex(ls);
                A r;
                if (g.reverse) r = ps == A(0) ? A(0) : ps * ((ls - lt) - o.loss);
                else r = ps - ex(lt);
                d[k] = r * o.coef * dcap;
            }
        }
        const bool whole = whole_pack<VEC, EDGES>(col0, g.c);
        if (whole) {
            store_vals<T>(grow + col0, d);
            return;
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k)
            if (col0 + k >= 0 && col0 + k < g.c) grow[col0 + k] = store_t<T>(d[k]);
    }
};

}  // namespace gpuce
