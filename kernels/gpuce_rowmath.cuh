// gpuce: the arithmetic of a softmax row that every row-state policy shares: exponentials at a
// finite shift, the rescale of a sum to a new shift, the NaN-propagating max in one
// instruction, and the per-pack helpers (edge masks, a pack's maximum, 16-byte row shifts).
// Pasted into gpuce_sce_fused.cu by gpuce._cuda.source after gpuce_io.cuh.

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
#elif defined(GPUCE_SIMT)
    return simt_max_nan(a, b);  // the instruction's result: the canonical NaN, +0 above -0
#else
    return nanmax(a, b);
#endif
}

// exp(v - ms) for the lean loops (no online rescale: the shift is the row's maximum).
// Two-byte logits carry 8 or 11 significant bits, so the shift is folded into one FMA with
// log2(e) (msl = ms log2(e), rounded: a relative error of |ms| 2^-24 in the result, far below
// their precision); float and double keep the exact subtraction first (the FMA form loses
// 6e-4 at logits of 1e4 in float32).
template <typename T>
__device__ __forceinline__ float ex_at(float v, float ms, float msl) {
    if constexpr (sizeof(T) == 2) return exp2f(fmaf(v, 1.4426950408889634f, -msl));
    else return ex(v - ms);
}
template <typename T>
__device__ __forceinline__ double ex_at(double v, double ms, double) {
    return ex(v - ms);
}

// ------------------------------------------------------------------------- packs of a row
// A row need not start on a 16-byte boundary: its packs are then the aligned 16-byte granules
// that hold it, starting `shift` values before column 0 (pack q holds columns
// q * VEC - shift ...), and the first and last granules hold values of the neighbouring rows
// (never outside the allocation: a granule never crosses a page), which the edge packs mask
// out.  The logits, the targets and the gradient share the shift (the host checks it).
template <typename T, int VEC>
__device__ __forceinline__ int row_shift(const T* row) {
    return VEC > 1 ? (int)(((unsigned long long)row % 16) / sizeof(T)) : 0;
}

// A pack of T as VEC values in A (the targets: 0 when absent).
template <typename A, typename T, int VEC>
__device__ __forceinline__ void unpack(const Pack<T, VEC>& p, A (&v)[VEC]) {
#pragma unroll
    for (int u = 0; u < VEC; ++u) v[u] = load_acc<A>(p.v[u]);
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

// -inf in the columns of a pack outside [0, C).
template <typename A, int VEC>
__device__ __forceinline__ void mask_edges(A (&fv)[VEC], int col0, int c) {
    if (col0 >= 0 && col0 + VEC <= c) return;
#pragma unroll
    for (int u = 0; u < VEC; ++u)
        if (col0 + u < 0 || col0 + u >= c) fv[u] = neg_inf<A>();
}

// The state's shift from its maximum (every row state's convention: ms = m when finite,
// else 0).
template <typename S, typename A>
__device__ __forceinline__ void state_at_max(S& p, A m) {
    p.m = m;
    p.ms = isfinite(m) ? m : A(0);
}

}  // namespace gpuce
