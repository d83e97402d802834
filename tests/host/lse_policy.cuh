// A second row-state policy, for the tests only: each row's log-sum-exp (softcap applied
// first) and its gradient, the softmax (times 1 - tanh^2 with softcap).  It is written
// against the policy interface alone (gpuce_team.cuh's row state and batch accumulator,
// gpuce_row_kernels.cuh's hooks), and the unchanged kernel bodies, merges and batch finish run
// it: tests/test_row_policy_emulated.py checks it against float64.  A state of three words
// (no coefficient sums, no label value), no keys, no second stream, two batch sums.
//
// Semantics: lse = log sum exp(v); a row with a NaN gives NaN; an all -inf row gives -inf
// and a NaN gradient.  Batch: the sum of the finite lse and their count.

namespace gpuce {

template <typename T, typename I, typename A>
struct LseArgs {  // the fields every policy's Args has for the bodies, and the outputs
    const T* x; long long ldx; const I* labels; const T* y; long long ldy; long long n; int c;
    A cap; T* grad; long long ldg; A* lse_out;
};

template <typename A>
struct LseState {
    typedef A value_type;
    A m, ms, s;
    static constexpr int WORDS = 3;
    __device__ __forceinline__ static LseState identity() {
        LseState p;
        p.m = neg_inf<A>();
        p.ms = p.s = A(0);
        return p;
    }
    __device__ __forceinline__ void rebase(A m2, A ms2, bool) {
        s = rescaled(s, ms, ms2);
        m = m2;
        ms = ms2;
    }
    template <typename F>
    __device__ __forceinline__ void each_sum(F&& f, bool) { f(s); }
    __device__ __forceinline__ A word(int i) const { return i == 0 ? m : i == 1 ? ms : s; }
    __device__ __forceinline__ void store(A* d) const { d[0] = m; d[1] = ms; d[2] = s; }
    __device__ __forceinline__ static LseState load(const A* d) {
        LseState p;
        p.m = d[0]; p.ms = d[1]; p.s = d[2];
        return p;
    }
};

struct LseAcc {
    static constexpr int NSUM = 2;  // the finite lse's sum, their count
    double total, finite;
    long long bad;
    __device__ __forceinline__ static LseAcc zero() { return {0.0, 0.0, 0x7fffffffffffffffLL}; }
    __device__ __forceinline__ double sum(int q) const { return q == 0 ? total : finite; }
};

template <typename A>
struct LseBatch {
    double* out;  // {sum, count}
    __device__ __forceinline__ void write(const double (&tot)[LseAcc::NSUM], long long, long long*) const {
        out[0] = tot[0];
        out[1] = tot[1];
    }
};

template <typename A>
struct LseOut {
    A ms, inv_s, lse;
};

struct LseCtx {};

template <typename T_, typename I_, typename A_>
struct LseRow {
    typedef T_ T;
    typedef I_ I;
    typedef A_ A;
    typedef LseArgs<T, I, A> Args;
    typedef LseState<A> State;
    typedef LseCtx Ctx;
    typedef LseOut<A> Out;
    typedef LseAcc Acc;
    typedef LseBatch<A> Batch;
    static constexpr bool Y = false;
    static constexpr bool KEYS = false;

    __device__ __forceinline__ static long long load_key(const Args&, long long, bool) { return 0; }
    __device__ __forceinline__ static Ctx context(const Args&, long long, bool) { return {}; }
    __device__ __forceinline__ static bool extra(const Args&) { return false; }
    template <int VEC, bool EDGES>
    __device__ __forceinline__ static void add(const Args& g, State& p, const Ctx&, int col0, const A (&fv)[VEC],
                                               const A (&)[VEC]) {
        A v[VEC], pm = neg_inf<A>();
        for (int u = 0; u < VEC; ++u) {
            const bool in = !EDGES || (col0 + u >= 0 && col0 + u < g.c);
            v[u] = in ? softcap_value(fv[u], g.cap) : neg_inf<A>();
            pm = nanmax(pm, v[u]);
        }
        const A m = nanmax(p.m, pm);
        p.rebase(m, isfinite(m) ? m : A(0), false);
        for (int u = 0; u < VEC; ++u) p.s += ex(v[u] - p.ms);
    }
    template <bool EXTRA, int VEC, bool EDGES, bool PICK = true>
    __device__ __forceinline__ static void sum(const Args& g, State& p, const Ctx&, int col0, const A (&fv)[VEC],
                                               const A (&)[VEC]) {
        for (int u = 0; u < VEC; ++u)
            if (!EDGES || (col0 + u >= 0 && col0 + u < g.c)) p.s += ex(fv[u] - p.ms);
    }
    __device__ __forceinline__ static void pick(State&, const Ctx&, const T*) {}
    template <int VEC>
    __device__ __forceinline__ static void sum_online(State& p, const Ctx&, int, const A (&fv)[VEC]) {
        A pm = fv[0];
        for (int u = 1; u < VEC; ++u) pm = nanmax(pm, fv[u]);
        if (!(pm <= p.m)) {
            const A m = nanmax(p.m, pm);
            p.rebase(m, isfinite(m) ? m : A(0), false);
        }
        for (int u = 0; u < VEC; ++u) p.s += ex(fv[u] - p.ms);
    }
    __device__ __forceinline__ static Out finish(const Args&, const State& p, const Ctx&) {
        Out o;
        o.ms = p.ms;
        o.inv_s = A(1) / p.s;
        o.lse = isnan(p.m) ? p.m : p.ms + log(p.s);
        return o;
    }
    __device__ __forceinline__ static void emit(const Args& g, long long row, const Out& o, const Ctx&, Acc& acc) {
        if (g.lse_out) g.lse_out[row] = o.lse;
        if (isfinite(o.lse)) {
            acc.total += (double)o.lse;
            acc.finite += 1.0;
        }
    }
    __device__ __forceinline__ static bool lean_grad(const Args& g, const Out&) { return g.cap == A(0); }
    template <int VEC, bool EDGES>
    __device__ __forceinline__ static void grad_lean(const Args& g, const Out& o, T* grow, int col0,
                                                     const A (&fv)[VEC]) {
        for (int u = 0; u < VEC; ++u)
            if (!EDGES || (col0 + u >= 0 && col0 + u < g.c)) grow[col0 + u] = store_t<T>(ex(fv[u] - o.ms) * o.inv_s);
    }
    template <int VEC, bool EDGES>
    __device__ __forceinline__ static void grad(const Args& g, const Out& o, T* grow, int col0, const A (&fv)[VEC],
                                                const A (&)[VEC]) {
        for (int u = 0; u < VEC; ++u) {
            if (EDGES && !(col0 + u >= 0 && col0 + u < g.c)) continue;
            const A t = g.cap > A(0) ? tanh_acc(fv[u] / g.cap) : A(0);
            const A v = g.cap > A(0) ? g.cap * t : fv[u];
            grow[col0 + u] = store_t<T>(ex(v - o.ms) * o.inv_s * (A(1) - t * t));
        }
    }
    template <typename Cols>
    __device__ __forceinline__ static void tile_grad_lean(T* xr, const State&, const Out& o, Cols&& cols) {
        cols([&](int j) { xr[j] = store_t<T>(ex(load_acc<A>(xr[j]) - o.ms) * o.inv_s); });
    }
};

}  // namespace gpuce
