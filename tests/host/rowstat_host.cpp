// Host build of kernels/gpuce_rowstat.cuh for the CPU tests (tests/test_rowstat_host.py).
// The device helpers are compiled as plain C++ and driven the way the kernels drive them:
//   * "portable": element states merged (sequentially, or as a pairwise tree like a block
//     reduction), then finish_reduction + finish_loss + grad_element (the CuPy kernels' maths);
//   * "fused": max first, sums relative to it, then finish_stats (the RawKernels' maths).
#include <cmath>
#include <cstring>
#include <vector>

#define __device__
#define __forceinline__ inline
using std::exp;
using std::isfinite;
using std::isnan;
using std::log;
static inline float __int_as_float(unsigned int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline double __longlong_as_double(unsigned long long i) { double d; std::memcpy(&d, &i, 8); return d; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
using std::tanh;

#include GPUCE_ROWSTAT

using namespace gpuce;

template <typename A>
static RowStat<A> reduce_tree(const std::vector<RowStat<A>>& v, size_t lo, size_t hi) {
    if (hi - lo == 1) return v[lo];
    size_t mid = lo + (hi - lo) / 2;
    return merge(reduce_tree(v, lo, mid), reduce_tree(v, mid, hi));
}

// mode 0: labels (lbl), mode 1: probabilities (y).  method 0: sequential merges,
// 1: tree merges, 2: fused (max, then relative sums, finish_stats).
template <typename A>
static void run(const A* x, long long n, int c, int mode, const long long* lbl, const A* y, const A* w,
                A eps, A z, long long ign, A scale, int method, A* loss, A* lse, A* grad) {
    const A eps_c = eps / A(c), ome = A(1) - eps;
    for (long long i = 0; i < n; ++i) {
        const A* xr = x + i * c;
        bool active = true;
        int k = -1;
        A wl = A(0);
        if (mode == 0) {
            active = lbl[i] != ign;
            if (active) { k = (int)lbl[i]; wl = ome * w[k]; }
        }
        auto coef = [&](int j) {
            return mode == 0 ? label_coef(active, w[j], eps_c) : prob_coef(y[i * c + j], w[j], ome, eps_c);
        };
        A l, g, mx, ls;
        if (method < 2) {
            std::vector<RowStat<A>> st;
            for (int j = 0; j < c; ++j) st.push_back(RowStat<A>::element(xr[j], coef(j), mode == 0 && j == k));
            RowStat<A> r = RowStat<A>::identity();
            if (method == 0) for (auto& s : st) r = merge(r, s);
            else r = merge(r, reduce_tree(st, 0, st.size()));
            A tlab, smooth, asum, hit;
            finish_reduction(r, mx, ls, tlab, smooth, asum, hit);
            finish_loss(active, mx, ls, tlab, smooth, asum, wl, z, l, g);
        } else {
            A m = neg_inf<A>();
            for (int j = 0; j < c; ++j) m = nanmax(m, xr[j]);
            const A ms = isfinite(m) ? m : A(0);
            A s = 0, a = 0, b = 0, t = 0;
            for (int j = 0; j < c; ++j) {
                const A d = xr[j] - ms;
                s += exp(d);
                const A cf = coef(j);
                a += cf;
                if (cf != A(0)) b += cf * d;
                if (j == k) t = d;
            }
            finish_stats(active, m, ms, s, a, b, t, wl, z, mx, ls, l, g);
        }
        loss[i] = l;
        lse[i] = mx + ls;
        for (int j = 0; j < c; ++j)
            grad[i * c + j] = grad_element(active, xr[j], mx, ls, g, coef(j), wl, j == k, scale, A(0));
    }
}

extern "C" {
void rows_f64(const double* x, long long n, int c, int mode, const long long* lbl, const double* y,
              const double* w, double eps, double z, long long ign, double scale, int method, double* loss,
              double* lse, double* grad) {
    run<double>(x, n, c, mode, lbl, y, w, eps, z, ign, scale, method, loss, lse, grad);
}
void rows_f32(const float* x, long long n, int c, int mode, const long long* lbl, const float* y,
              const float* w, float eps, float z, long long ign, float scale, int method, float* loss,
              float* lse, float* grad) {
    run<float>(x, n, c, mode, lbl, y, w, eps, z, ign, scale, method, loss, lse, grad);
}
}
