// gpuce: per-row statistics for stable softmax / log-sum-exp / cross-entropy.
//
// These device helpers are pasted (not #included by NVRTC) into the preamble of the
// CuPy ElementwiseKernel / ReductionKernel definitions in gpuce/_cuda/kernels.py, so that
// CuPy's kernel cache key always sees the current text; gpuce_sce_fused.cu's
// #include "gpuce_rowstat.cuh" is pasted the same way by gpuce._cuda.source.
//
// Conventions (documented in the README):
//   * A is the accumulation type: float for float16/float32 logits, double for
//     float64 logits.
//   * A row whose maximum is not finite (a NaN, a +inf, or all -inf) has a
//     NaN loss and a NaN gradient; logsumexp of an all -inf row is -inf.
//   * Terms whose coefficient is exactly zero are skipped, so a -inf logit
//     with zero target mass contributes 0, not 0 * inf = NaN.

namespace gpuce {

// Special values without relying on <cmath> macros (NVRTC has no INFINITY / NAN).
template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000ULL); }
template <typename A> __device__ __forceinline__ A quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fffffff); }
template <> __device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7fffffffffffffffULL); }

// exp(from - to), with exp(-inf - -inf) read as 1: the merge of two empty
// (all -inf) partial rows keeps their counts instead of turning into NaN.
template <typename A>
__device__ __forceinline__ A rescale(A from, A to) {
    return from == to ? A(1) : exp(from - to);
}

// NaN-propagating max.
template <typename A>
__device__ __forceinline__ A nanmax(A p, A q) {
    return (p > q || isnan(p)) ? p : q;
}

// Online log-sum-exp state: m is the running max, s = sum exp(x - m).
template <typename A>
struct LseStat {
    A m;
    A s;
    __device__ static LseStat identity() { LseStat r; r.m = neg_inf<A>(); r.s = A(0); return r; }
    __device__ static LseStat element(A x) { LseStat r; r.m = x; r.s = A(1); return r; }
    __device__ A lse() const { return m + log(s); }
};

template <typename A>
__device__ __forceinline__ LseStat<A> merge(const LseStat<A>& p, const LseStat<A>& q) {
    LseStat<A> r;
    r.m = nanmax(p.m, q.m);
    r.s = p.s * rescale(p.m, r.m) + q.s * rescale(q.m, r.m);
    return r;
}

// Row state for the loss: the log-sum-exp state plus
//   a = sum_c coef_c,   b = sum_c coef_c * (x_c - m)   (coef_c != 0 only),
//   t = the logit at the label column (0 when there is none).
// b is kept relative to the running max m, so the smoothing / soft-target
// term a*lse - sum coef*x = a*log(s) - b has no cancellation for large logits.
template <typename A>
struct RowStat {
    LseStat<A> e;
    A a;
    A b;
    A t;
    __device__ static RowStat identity() {
        RowStat r; r.e = LseStat<A>::identity(); r.a = A(0); r.b = A(0); r.t = A(0); return r;
    }
    __device__ static RowStat element(A x, A coef, bool is_label) {
        RowStat r; r.e = LseStat<A>::element(x); r.a = coef; r.b = A(0);
        r.t = is_label ? x : A(0);
        return r;
    }
};

// coef * (m_from - m_to), read as 0 when coef == 0 (so 0 * inf is not NaN).
template <typename A>
__device__ __forceinline__ A shift(A coef, A from, A to) {
    return (coef == A(0) || from == to) ? A(0) : coef * (from - to);
}

template <typename A>
__device__ __forceinline__ RowStat<A> merge(const RowStat<A>& p, const RowStat<A>& q) {
    RowStat<A> r;
    r.e = merge(p.e, q.e);
    r.a = p.a + q.a;
    r.b = (p.b + shift(p.a, p.e.m, r.e.m)) + (q.b + shift(q.a, q.e.m, r.e.m));
    r.t = p.t + q.t;
    return r;
}

// Logit soft-capping: the loss sees cap * tanh(f / cap) (cap > 0; cap == 0: f itself), and
// d/df of it is 1 - tanh^2.  tanh is written out for float so that it inlines (a few ulp):
// an odd polynomial near 0, 1 - 2 / (e^{2|v|} + 1) elsewhere; double calls the library's.
__device__ __forceinline__ float tanh_acc(float v) {
    const float a = fabsf(v);
    if (a < 0.3f) {
        const float x2 = v * v;
        const float p = -0.33333333f + x2 * (0.13333333f + x2 * (-0.053968254f + x2 * (0.021869488f + x2 * -0.0088632355f)));
        return v + v * x2 * p;
    }
    return copysignf(1.0f - 2.0f * __frcp_rn(exp2f(2.0f * a * 1.4426950408889634f) + 1.0f), v);
}
__device__ __forceinline__ double tanh_acc(double v) { return tanh(v); }

template <typename A>
__device__ __forceinline__ A softcap_value(A f, A cap) {
    return cap > A(0) ? cap * tanh_acc(f / cap) : f;
}

// d softcap_value / df.
template <typename A>
__device__ __forceinline__ A softcap_slope(A f, A cap) {
    if (!(cap > A(0))) return A(1);
    const A t = tanh_acc(f / cap);
    return A(1) - t * t;
}

// Per-column coefficient of the loss, sum_c coef_c * (lse - x_c):
//   integer labels:        coef_c = (eps / C) * w_c          (0 on ignored rows)
//   probability targets:   coef_c = w_c * ((1 - eps) * y_c + eps / C)
template <typename A>
__device__ __forceinline__ A label_coef(bool active, A w, A eps_over_c) {
    return active ? eps_over_c * w : A(0);
}

template <typename A>
__device__ __forceinline__ A prob_coef(A y, A w, A one_minus_eps, A eps_over_c) {
    return w * (one_minus_eps * y + eps_over_c);
}

// A row's normaliser is kept as the pair (mx, ls): mx is the shift (the row max when it is
// finite; the non-finite max itself marks a bad row) and ls = log sum_c exp(x_c - mx).
// lse = mx + ls, but probabilities are formed as exp((x - mx) - ls): x - mx is exact for the
// large entries, so float32 keeps full relative precision even for logits near 1e4, which
// exp(x - lse) with a rounded lse does not.

// logsumexp / softmax reduction output.
template <typename A>
__device__ __forceinline__ void finish_lse(const LseStat<A>& r, A& mx, A& ls) {
    mx = r.m;
    ls = log(r.s);
}

// Writes the per-row reduction outputs of the loss:
//   mx, ls  the normaliser (above)
//   tlab   = lse - x_label, formed as (m - t) + ls
//   smooth = sum_c coef_c * (lse - x_c) = a * ls - b
//   asum   = sum_c coef_c
//   hit    = 1 when the label value attains the (finite) row max, else 0 (token accuracy)
template <typename A>
__device__ __forceinline__ void finish_reduction(const RowStat<A>& r, A& mx, A& ls, A& tlab, A& smooth, A& asum,
                                                 A& hit) {
    mx = r.e.m;
    ls = log(r.e.s);
    tlab = (r.e.m - r.t) + ls;
    smooth = (r.a == A(0)) ? A(0) : r.a * ls - r.b;
    asum = r.a;
    hit = (isfinite(r.e.m) && r.t == r.e.m) ? A(1) : A(0);
}

// Per-row loss and gradient coefficient from the reduction outputs.
//   loss_i = wl * tlab + smooth + z * lse^2        (active rows, else 0)
//   G_i    = wl + asum + 2 z lse                   (so grad_j = p_j G_i - coef_j - wl [j = k])
// A row with a non-finite lse (NaN, +inf or all -inf logits) gets NaN for both.
template <typename A>
__device__ __forceinline__ void finish_loss(bool active, A mx, A ls, A tlab, A smooth, A asum, A wl, A z,
                                            A& loss, A& g) {
    if (!active) { loss = A(0); g = A(0); return; }
    const A lse = mx + ls;
    if (!isfinite(lse)) { loss = quiet_nan<A>(); g = quiet_nan<A>(); return; }
    A lab = (wl == A(0)) ? A(0) : wl * tlab;
    A zt = (z == A(0)) ? A(0) : z * lse * lse;
    loss = lab + smooth + zt;
    g = wl + asum + A(2) * z * lse;
}

// The fused kernels' version of finish_reduction + finish_loss.  m is the row max (NaN / +inf /
// -inf for a bad row); s, b and t_rel = x_label - ms are relative to the finite shift ms
// (ms = m when m is finite), so the label term is ls - t_rel with no x + m - m rounding.
template <typename A>
__device__ __forceinline__ void finish_stats(bool active, A m, A ms, A s, A a, A b, A t_rel, A wl, A z,
                                             A& mx, A& ls, A& loss, A& g) {
    mx = isfinite(m) ? ms : m;
    ls = log(s);
    A tlab = ls - t_rel;
    A smooth = (a == A(0)) ? A(0) : a * ls - b;
    finish_loss(active, mx, ls, tlab, smooth, a, wl, z, loss, g);
}

// d loss / d f_j for one element (f the raw logit, the loss seeing softcap_value(f, cap)),
// times the reduction's scale.
template <typename A>
__device__ __forceinline__ A grad_element(bool active, A f, A mx, A ls, A g, A coef, A wl, bool is_label,
                                          A scale, A cap) {
    if (!active) return A(0);
    if (!isfinite(mx + ls)) return quiet_nan<A>();
    const A x = softcap_value(f, cap);
    A p = exp((x - mx) - ls);
    A d = p * g - coef - (is_label ? wl : A(0));
    return d * scale * softcap_slope(f, cap);
}

}  // namespace gpuce
