// gpuce: fused token log-probabilities and entropy.  One launch reads each row of logits once
// (the two-pass kernel twice), writes logp and H per row and, when asked, the gradient of
// sum_i gl_i logp_i + gh_i H_i once, in place over the logits if the caller wants.  The maths,
// the row state and its merge are stated once, in gpuce_tokens_policy.cuh's header; the
// bodies (gpuce_row_kernels.cuh) and the merges (gpuce_team.cuh) are cross-entropy's,
// unchanged, run with the policy TokRow.
//
// Kernels (the bodies' kinds; no tile, see the policy's header):
//   tok_team<G>          G lanes a row (G = 4..32) or the whole block (G = 0), each thread's
//                        16-byte packs in its own slots of a shared-memory ring, S - 1 rows
//                        ahead (cp.async)
//   tok_cluster<CL>      sm_90, float accumulation: a cluster of CL blocks a row, the partial
//                        states exchanged through the peers' shared memory
//   tok_twopass          a block a row, the row read twice: rows no ring holds
// Template arguments: T the logits, I the labels (int, long long), A the accumulation type
// (float; double for double logits), D the gradient's type (T, or A for float gradients of
// 16-bit logits), VEC the pack width.  Offsets are 64-bit; n < 2^31 - 1 rows (the key packs
// the row), C < 2^31.
//
// Workspace: the fused cross-entropy's (gpuce._cuda.fused.workspace, one per device and
// stream): ws[0] the last-block ticket, ws[GPUCE_WS_PARTIALS + GPUCE_NWORDS b ..] block b's
// partial (its active rows) -- the layout gpuce_sce_fused.cu uses, left as found.
//
// Template instantiations are named by gpuce/_cuda/tokens.py (name expressions), also the list
// the offline NVRTC test compiles.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cooperative_groups.h>
#include "gpuce_rowstat.cuh"

// the workspace layout and the bodies' constants: gpuce_sce_fused.cu's values
#define GPUCE_WS_PARTIALS 8
#define GPUCE_NWORDS 5
#define GPUCE_TEAM_THREADS 512
#define GPUCE_TILE_ROWS 128
#define GPUCE_TILE_MAX_C 32
#define GPUCE_TILE_STAGES 3

namespace gpuce {

typedef long long gpuce_i64;

}  // namespace gpuce

#include "gpuce_io.cuh"

#include "gpuce_rowmath.cuh"
#include "gpuce_team.cuh"
#include "gpuce_tokens_policy.cuh"
#include "gpuce_row_kernels.cuh"

namespace gpuce {

// ------------------------------------------------------------------------- entry points
#define GPUCE_TOK_PARAMS                                                                               \
    const T *__restrict__ x, long long ldx, const I *__restrict__ labels, long long n, int c, A softcap, \
        A inv_tau, long long ignore_index, A *__restrict__ logp_out, A *__restrict__ ent_out,           \
        T *__restrict__ grad, long long ldg, const A *__restrict__ g_logp, const A *__restrict__ g_ent, \
        long long *__restrict__ ws

// The policy's Args (cap: the bodies' path switch, 1 when u differs from f) and its batch
// outputs (none).
#define GPUCE_TOK_SETUP                                                                                   \
    const TokArgs<T, I, A> g = {x, ldx, labels, nullptr, 0, n, c,                                         \
                                (softcap > A(0) || inv_tau != A(1)) ? A(1) : A(0), grad, ldg, softcap,    \
                                inv_tau, ignore_index, logp_out, ent_out, g_logp, g_ent};                 \
    const TokBatch out = {}

template <typename T, typename I, typename A, typename D, int VEC, int G>
__global__ void __launch_bounds__(GPUCE_TEAM_THREADS, 1) tok_team(GPUCE_TOK_PARAMS, int P, int S) {
    GPUCE_TOK_SETUP;
    team_rows<TokRow<T, I, A, D>, VEC, G, 1>(g, out, ws, P, S);
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
template <typename T, typename I, typename A, typename D, int VEC, int CL>
__global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(GPUCE_TEAM_THREADS, 1)
    tok_cluster(GPUCE_TOK_PARAMS, int P, int S) {
    GPUCE_TOK_SETUP;
    team_rows<TokRow<T, I, A, D>, VEC, 0, CL>(g, out, ws, P, S);
}
#endif

template <typename T, typename I, typename A, typename D, int VEC>
__global__ void __launch_bounds__(GPUCE_TEAM_THREADS, 1) tok_twopass(GPUCE_TOK_PARAMS) {
    GPUCE_TOK_SETUP;
    twopass_rows<TokRow<T, I, A, D>, VEC, 1>(g, out, ws);
}

}  // namespace gpuce
