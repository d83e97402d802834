// gpuce: fused distillation from dense teacher logits (forward KL, beta = 0; reverse KL,
// beta = 1).  One launch reads each row of the student's and the teacher's logits once (the
// two-pass kernel twice), writes the loss per row and, when asked, sigma_i times the gradient
// with respect to the student's logits once, in place over them if the caller wants.  The
// maths, the row state and its merge are stated once, in gpuce_distill_policy.cuh's header;
// the bodies (gpuce_row_kernels.cuh) and the merges (gpuce_team.cuh) are cross-entropy's,
// unchanged, run with the policy DisRow.
//
// Kernels (the bodies' kinds; no tile, see the policy's header):
//   dis_team<G>          G lanes a row (G = 4..32) or the whole block (G = 0), each thread's
//                        16-byte packs of both streams in its own slots of a shared-memory
//                        ring, S - 1 rows ahead (cp.async)
//   dis_cluster<CL>      sm_90, float accumulation: a cluster of CL blocks a row
//   dis_twopass          a block a row, both rows read twice: rows no ring holds
// Template arguments: T the logits (student and teacher alike, and the gradient), A the
// accumulation type (float; double for double logits), VEC the pack width.  The active mask
// is unsigned char (null: every row active).  Offsets are 64-bit.
//
// Workspace: the fused cross-entropy's (gpuce._cuda.fused.workspace): ws[0] the last-block
// ticket, ws[GPUCE_WS_PARTIALS + GPUCE_NWORDS b ..] block b's partial -- gpuce_sce_fused.cu's
// layout, left as found.
//
// Template instantiations are named by gpuce/_cuda/distill.py (name expressions), also the
// list the offline NVRTC test compiles.

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
#include "gpuce_distill_policy.cuh"
#include "gpuce_row_kernels.cuh"

namespace gpuce {

// ------------------------------------------------------------------------- entry points
#define GPUCE_DIS_PARAMS                                                                                  \
    const T *__restrict__ s, long long lds, const T *__restrict__ t, long long ldt,                      \
        const unsigned char *__restrict__ active, long long n, int c, A softcap, A inv_tau, int reverse, \
        A scale, const A *__restrict__ row_scale, A *__restrict__ loss_out, unsigned char *__restrict__ redo, \
        double *__restrict__ redo_count, T *__restrict__ grad, long long ldg, long long *__restrict__ ws

// The policy's Args (cap: the bodies' path switch, always 1: every row takes the online update
// of both streams) and its batch output (the count of rows left to the host).
#define GPUCE_DIS_SETUP                                                                              \
    const DisArgs<T, unsigned char, A> g = {s,       lds,     active, t,     ldt,       n,        c, \
                                            A(1),    grad,    ldg,    softcap, inv_tau, reverse,    \
                                            scale,   row_scale, loss_out, redo};                    \
    const DisBatch out = {redo_count}

template <typename T, typename A, int VEC, int G>
__global__ void __launch_bounds__(GPUCE_TEAM_THREADS, 1) dis_team(GPUCE_DIS_PARAMS, int P, int S) {
    GPUCE_DIS_SETUP;
    team_rows<DisRow<T, unsigned char, A>, VEC, G, 1>(g, out, ws, P, S);
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
template <typename T, typename A, int VEC, int CL>
__global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(GPUCE_TEAM_THREADS, 1)
    dis_cluster(GPUCE_DIS_PARAMS, int P, int S) {
    GPUCE_DIS_SETUP;
    team_rows<DisRow<T, unsigned char, A>, VEC, 0, CL>(g, out, ws, P, S);
}
#endif

template <typename T, typename A, int VEC>
__global__ void __launch_bounds__(GPUCE_TEAM_THREADS, 1) dis_twopass(GPUCE_DIS_PARAMS) {
    GPUCE_DIS_SETUP;
    twopass_rows<DisRow<T, unsigned char, A>, VEC, 1>(g, out, ws);
}

}  // namespace gpuce
