// gpuce: vectorised loads and stores of the fused kernels (packs of VEC elements, 16-byte
// words, storage <-> accumulation types) and cp.async copies global -> shared (with the host
// emulator's hold-back under GPUCE_SIMT).  Pasted into gpuce_sce_fused.cu by
// gpuce._cuda.source (as every gpuce #include "..."), after the CUDA headers.

namespace gpuce {

// ------------------------------------------------------------------------- storage types
template <typename A, typename T> __device__ __forceinline__ A load_acc(T v) { return A(v); }
template <> __device__ __forceinline__ float load_acc<float, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float load_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
    return __bfloat162float(v);
}
template <typename T, typename A> __device__ __forceinline__ T store_t(A v) { return T(v); }
template <> __device__ __forceinline__ __half store_t<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_t<__nv_bfloat16, float>(float v) {
    return __float2bfloat16_rn(v);
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
    T v[VEC];
};

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

// ------------------------------------------------------------------------- 16-byte words
// A 16-byte pack moves as four 32-bit words: one LDS.128 from shared memory, one STG.128 to
// global memory.  (An aggregate copy of Pack is split by the compiler: the SASS showed four
// STG.E a float pack and LDS.64 / LDS.U16 for bfloat16 packs.)  The words convert to and
// from the accumulation type here: bfloat16 by a shift or a mask (exact), float16 through
// half2, and the results are rounded to nearest even two at a time.
template <typename T> struct is_bf16 { static constexpr bool value = false; };
template <> struct is_bf16<__nv_bfloat16> { static constexpr bool value = true; };
// The host emulator (GPUCE_SIMT) runs these paths too: its lds128 / ldg128 / stg128 are
// 16-byte memcpys that fail on an address off its 16-byte boundary, and tests/host/simt.h
// gives the bit conversions below (__half2, __hiloint2double, ...) memcpy-exact forms, so a
// lane or word swap here fails on the CPU.
#if defined(__CUDA_ARCH__)
#define GPUCE_WORDS 1
#if defined(GPUCE_SIMT)
__device__ __forceinline__ void lds128(const void* p, unsigned (&w)[4]) { simt_words_load(p, w); }
__device__ __forceinline__ void ldg128(const void* p, unsigned (&w)[4]) { simt_words_load(p, w); }
__device__ __forceinline__ void stg128(void* p, const unsigned (&w)[4]) { simt_words_store(p, w); }
#else
__device__ __forceinline__ void lds128(const void* p, unsigned (&w)[4]) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldg128(const void* p, unsigned (&w)[4]) {
    asm volatile("ld.global.nc.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                 : "l"(p));
}
__device__ __forceinline__ void stg128(void* p, const unsigned (&w)[4]) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
}
#endif
__device__ __forceinline__ void to_vals(const unsigned (&w)[4], float (&v)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __uint_as_float(w[i]);
}
__device__ __forceinline__ void to_vals(const unsigned (&w)[4], double (&v)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) v[i] = __hiloint2double((int)w[2 * i + 1], (int)w[2 * i]);
}
template <typename T>
__device__ __forceinline__ void to_vals(const unsigned (&w)[4], float (&v)[8]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if constexpr (is_bf16<T>::value) {
            v[2 * i] = __uint_as_float(w[i] << 16);
            v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        } else {
            const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
            v[2 * i] = f.x;
            v[2 * i + 1] = f.y;
        }
    }
}
__device__ __forceinline__ void from_vals(const float (&v)[4], unsigned (&w)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(v[i]);
}
__device__ __forceinline__ void from_vals(const double (&v)[2], unsigned (&w)[4]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        w[2 * i] = (unsigned)__double2loint(v[i]);
        w[2 * i + 1] = (unsigned)__double2hiint(v[i]);
    }
}
template <typename T>
__device__ __forceinline__ void from_vals(const float (&v)[8], unsigned (&w)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if constexpr (is_bf16<T>::value) {
            const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
            w[i] = *reinterpret_cast<const unsigned*>(&h);
        } else {
            const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
            w[i] = *reinterpret_cast<const unsigned*>(&h);
        }
    }
}
#endif

#ifdef GPUCE_WORDS
// A 16-byte pack's four words as its VEC values in A (2-byte types need T: bf16 or half).
template <typename T, typename A, int VEC>
__device__ __forceinline__ void words_to_vals(const unsigned (&w)[4], A (&v)[VEC]) {
    if constexpr (VEC == 8) to_vals<T>(w, v);
    else to_vals(w, v);
}
#endif

// The VEC values of a pack in shared memory, in the accumulation type.
template <typename A, typename T, int VEC>
__device__ __forceinline__ void load_vals(const Pack<T, VEC>* p, A (&v)[VEC]) {
#ifdef GPUCE_WORDS
    if constexpr (sizeof(Pack<T, VEC>) == 16) {
        unsigned w[4];
        lds128(p, w);
        words_to_vals<T>(w, v);
        return;
    }
#endif
#pragma unroll
    for (int u = 0; u < VEC; ++u) v[u] = load_acc<A>(p->v[u]);
}

// The VEC values of a pack in global memory (read-only for the kernel's life), in A.
template <typename A, typename T, int VEC>
__device__ __forceinline__ void load_vals_global(const T* p, A (&v)[VEC]) {
#ifdef GPUCE_WORDS
    if constexpr (sizeof(Pack<T, VEC>) == 16) {
        unsigned w[4];
        ldg128(p, w);
        words_to_vals<T>(w, v);
        return;
    }
#endif
    const Pack<T, VEC> q = load_pack<T, VEC>(p);
#pragma unroll
    for (int u = 0; u < VEC; ++u) v[u] = load_acc<A>(q.v[u]);
}

// Store VEC values, rounded to T once, at p (16-byte aligned when the pack is 16 bytes).
template <typename T, typename A, int VEC>
__device__ __forceinline__ void store_vals(T* p, const A (&v)[VEC]) {
#ifdef GPUCE_WORDS
    if constexpr (sizeof(Pack<T, VEC>) == 16) {
        unsigned w[4];
        if constexpr (VEC == 8) from_vals<T>(v, w);
        else from_vals(v, w);
        stg128(p, w);
        return;
    }
#endif
    Pack<T, VEC> out;
#pragma unroll
    for (int u = 0; u < VEC; ++u) out.v[u] = store_t<T>(v[u]);
    store_pack<T, VEC>(p, out);
}

// ------------------------------------------------------------------------- asynchronous copies
// cp.async global -> shared of one pack (16 bytes, or one 4- / 8-byte element); 2-byte
// elements have no cp.async form and are copied through a register.  The host emulator
// (GPUCE_SIMT) holds every copy back until a copy_wait lets its group complete.
template <typename T, int VEC>
__device__ __forceinline__ void copy_pack_async(Pack<T, VEC>* dst, const T* src) {
#if defined(__CUDA_ARCH__) && !defined(GPUCE_SIMT)
    constexpr int BYTES = sizeof(T) * VEC;
    if (BYTES == 16 || BYTES == 8 || BYTES == 4) {
        const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
        if (BYTES == 16) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
        else if (BYTES == 8) asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(d), "l"(src) : "memory");
        else asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src) : "memory");
    } else {
        *dst = load_pack<T, VEC>(src);
    }
#elif defined(GPUCE_SIMT)
    simt_copy_async(dst, src, sizeof(Pack<T, VEC>));
#else
    *dst = load_pack<T, VEC>(src);
#endif
}

__device__ __forceinline__ void copy_commit() {
#if defined(__CUDA_ARCH__) && !defined(GPUCE_SIMT)
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(GPUCE_SIMT)
    simt_copy_commit();
#endif
}

// Wait until at most `pending` of this thread's committed groups are still in flight.
__device__ __forceinline__ void copy_wait(int pending) {
#if defined(__CUDA_ARCH__) && !defined(GPUCE_SIMT)
    switch (pending) {
        case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
        case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
        case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
        default: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    }
#elif defined(GPUCE_SIMT)
    simt_copy_wait(pending);
#endif
}

}  // namespace gpuce
