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
// of the values it owns (CePart: max m, finite shift ms, s = sum exp(v - ms), a = sum coef,
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
// Layout, one concept a file (pasted in this order by gpuce._cuda.source):
//   gpuce_rowstat.cuh      the row statistics shared with the elementwise/reduction kernels
//   gpuce_io.cuh           16-bit packs, 16-byte words, cp.async
//   gpuce_rowmath.cuh      a softmax row's exponentials, rescales, maxima, pack edges
//   gpuce_team.cuh         the lane / block / cluster merges of any row state, the batch
//                          finish and the ticket
//   gpuce_ce_policy.cuh    cross-entropy's row-state policy (CeRow): arguments, label, state,
//                          updates, finish, outputs, gradient
//   gpuce_row_kernels.cuh  the kernels' bodies, templated on the policy
//   this file              cross-entropy's entry points (CeRow instantiated from MODE) and
//                          the prologue.
// A new loss mode is a new policy beside CeRow (the same hooks) and its entry points here;
// the merges and the bodies do not change.
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
#define GPUCE_TILE_STAGES 3

namespace gpuce {

typedef long long gpuce_i64;

// The MODE template argument (the host's Variant.expr writes the same numbers).
constexpr int MODE_LABELS = 0;
constexpr int MODE_PROBS = 1;

}  // namespace gpuce

#include "gpuce_io.cuh"

#include "gpuce_rowmath.cuh"
#include "gpuce_team.cuh"
#include "gpuce_ce_policy.cuh"
#include "gpuce_row_kernels.cuh"

namespace gpuce {

// ------------------------------------------------------------------------- entry points
// Cross-entropy's kernels: each builds the policy's Args and batch outputs (GPUCE_SCE_SETUP)
// and runs a body of gpuce_row_kernels.cuh with CeRow<T, I, A, MODE>.
template <typename T, typename I, typename A, int MODE, int VEC, int G>
__global__ void __launch_bounds__(GPUCE_TEAM_THREADS, 1) sce_team(GPUCE_SCE_PARAMS, int P, int S) {
    GPUCE_SCE_SETUP;
    team_rows<CeRow<T, I, A, MODE>, VEC, G, 1>(g, out, ws, P, S);
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
template <typename T, typename I, typename A, int MODE, int VEC, int CL>
__global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(GPUCE_TEAM_THREADS, 1)
    sce_cluster(GPUCE_SCE_PARAMS, int P, int S) {
    GPUCE_SCE_SETUP;
    team_rows<CeRow<T, I, A, MODE>, VEC, 0, CL>(g, out, ws, P, S);
}

// The register-stage form (RP packs a thread in registers, one shared-memory stage, P == RP):
// rows whose ring of two stages would not fit shared memory (float32 rows of 1 MiB).
template <typename T, typename I, typename A, int MODE, int VEC, int CL, int RP>
__global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(GPUCE_TEAM_THREADS, 1)
    sce_cluster_regs(GPUCE_SCE_PARAMS, int P, int S) {
    GPUCE_SCE_SETUP;
    team_rows<CeRow<T, I, A, MODE>, VEC, 0, CL, RP>(g, out, ws, P, S);
}
#endif

template <typename T, typename I, typename A, int MODE, int VEC>
__global__ void __launch_bounds__(GPUCE_TILE_ROWS, sizeof(A) == 8 ? 5 : 8) sce_tile(GPUCE_SCE_PARAMS) {
    GPUCE_SCE_SETUP;
    tile_rows<CeRow<T, I, A, MODE>, VEC>(g, out, ws);
}

template <typename T, typename I, typename A, int MODE, int VEC>
__global__ void __launch_bounds__(GPUCE_TEAM_THREADS, 1) sce_twopass(GPUCE_SCE_PARAMS) {
    GPUCE_SCE_SETUP;
    twopass_rows<CeRow<T, I, A, MODE>, VEC, 1>(g, out, ws);
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
template <typename T, typename I, typename A, int MODE, int VEC, int CL>
__global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(GPUCE_TEAM_THREADS, 1)
    sce_twopass_cluster(GPUCE_SCE_PARAMS) {
    GPUCE_SCE_SETUP;
    twopass_rows<CeRow<T, I, A, MODE>, VEC, CL>(g, out, ws);
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
