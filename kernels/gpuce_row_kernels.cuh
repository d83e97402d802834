// gpuce: the fused row kernels' bodies, written once for every row-state policy R
// (gpuce_ce_policy.cuh's CeRow is the first): the data movement (cp.async rings, register
// stages, the tile ring, the two-pass reads), the team layout (warp teams, blocks, clusters)
// and the merges, calling R's hooks for everything about the loss.  A __global__ entry point
// (gpuce_sce_fused.cu) builds R's Args and batch outputs from its parameters and calls a body:
//   team_rows<R, VEC, G, CL, RP>   G lanes a row, a block (G = 0) or a cluster of CL blocks,
//                                  each thread's packs in a shared-memory ring (or RP packs in
//                                  registers, one stage of shared memory)
//   tile_rows<R, VEC>              one thread a row of C <= 32 values, tiles of 128 rows
//   twopass_rows<R, VEC, CL>       a block (or a cluster of CL blocks) a row, read twice
// A policy's Args has the fields the bodies read: x, ldx (the logits), y, ldy (the second
// stream, read when R::Y), labels (the keys, read when R::KEYS), n, c, grad, ldg, and cap.
// Every policy's Args carries the softcap `cap` (a transform of the logits, whatever the loss):
// rows with cap > 0 take the online update (R::add), the rest the lean path (the maximum, then
// R::sum at that shift).
// Pasted into gpuce_sce_fused.cu by gpuce._cuda.source after the policies.

namespace gpuce {

// ------------------------------------------------------------------------- team_rows
// G lanes a row (G in 4..32; 256 / G rows a block at a time), or G == 0: the block is the
// team (CL blocks of a cluster with CL > 1).  Pack it (< P) of a row is at column
// (it * NT + tid) * VEC, NT the team's threads; thread tid keeps it in its own slot of the
// S-stage ring in dynamic shared memory: slots[((stage * P + it) * blockDim.x + threadIdx.x)]
// (then the second stream's ring, R::Y).  Row i + S - 1 is copied while row i is computed.
template <typename R, int VEC, int G, int CL, int RP = 0>
__device__ __forceinline__ void team_rows(const typename R::Args& g, const typename R::Batch& out, long long* ws,
                                          int P, int S) {
    typedef typename R::T T;
    typedef typename R::A A;
    typedef typename R::State State;
    static_assert(RP == 0 || (!R::Y && G == 0), "the register stage is for block / cluster kernels of one stream");
    // the register stage takes rows that start on a 16-byte boundary and hold whole packs
    // (the host checks it), which keeps its unrolled loops free of edge masks
    constexpr bool EDGES = RP == 0;
    const long long n = g.n;
    const int c = g.c;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ A red[2 * 32 * State::WORDS];
    Pack<T, VEC>* xs = reinterpret_cast<Pack<T, VEC>*>(smem_raw);
    Pack<T, VEC>* ys = xs + (size_t)S * P * blockDim.x;
    const int bt = blockDim.x;
    const int rank = CL > 1 ? cluster_block_rank() : 0;
    const int nt = G > 0 ? G : bt * CL;
    const int tid = G > 0 ? (threadIdx.x & (G - 1)) : rank * bt + threadIdx.x;
    const long long teams_per_block = G > 0 ? bt / G : 1;
    const long long nteams = (long long)(gridDim.x / CL) * teams_per_block;
    const long long team = (long long)(blockIdx.x / CL) * teams_per_block + (G > 0 ? threadIdx.x / G : 0);
    // every lane of a warp runs the same number of rows (the shuffles need all 32)
    const long long warp_team0 = G > 0 ? team - ((threadIdx.x & 31) / G) : team;
    const int PMAX = RP > 0 ? RP : P;
    // this thread's packs of a row of `packs`: it = 0 .. mine - 1, pack q = it * nt + tid
    // A row spans packs0 = ceil(C / VEC) packs, or one more when it starts off a 16-byte
    // boundary: both counts are worked out once here, not with two integer divisions a row.
    auto mine_slow = [&](int packs) { return tid < packs ? min((packs - 1 - tid) / nt + 1, PMAX) : 0; };
    const int packs0 = (c + VEC - 1) / VEC;
    const int mine0 = mine_slow(packs0), mine1 = mine_slow(packs0 + 1);
    // (a shift sh < VEC makes ceil((sh + C) / VEC) one of the two)
    auto mine_of = [&](int packs) { return packs == packs0 ? mine0 : mine1; };
    typename R::Acc acc = R::Acc::zero();
    ClusterXchg<State, CL> xchg;
    xchg.init();

    // copy row `row`'s packs of this thread into ring stage `stage` (slot it of the stage at
    // (stage * P + it) * bt + threadIdx.x), one commit group
    auto issue = [&](long long row, int stage) {
        if (row < n) {
            const T* xrow = g.x + row * g.ldx;
            const int sh = EDGES ? row_shift<T, VEC>(xrow) : 0;
            const int mine = mine_of((sh + c + VEC - 1) / VEC);
            const T* xsrc = xrow - sh + (size_t)tid * VEC;
            Pack<T, VEC>* xdst = xs + (size_t)stage * P * bt + threadIdx.x;
            const T* ysrc = R::Y ? g.y + row * g.ldy - sh + (size_t)tid * VEC : nullptr;
            Pack<T, VEC>* ydst = ys + (size_t)stage * P * bt + threadIdx.x;
            for (int it = 0; it < mine; ++it) {
                copy_pack_async<T, VEC>(xdst + (size_t)it * bt, xsrc + (size_t)it * nt * VEC);
                if (R::Y) copy_pack_async<T, VEC>(ydst + (size_t)it * bt, ysrc + (size_t)it * nt * VEC);
            }
        }
        copy_commit();
    };

    // RP > 0 (a register stage): row i is moved from the one shared-memory stage into
    // registers, and row i + 1 is copied into that stage while row i is computed
    Pack<T, VEC> rx[RP > 0 ? RP : 1];
    if (RP > 0) issue(team, 0);
    else
        for (int s = 0; s < S - 1; ++s) issue(team + s * nteams, s);
    int parity = 0;
    // labels are loaded a row ahead: the load of row i + 1's is in flight while row i is
    // computed (a label loaded in its own row stalled the sums, which need its column)
    long long lab_next = R::load_key(g, team, team < n);
    for (long long i = 0; warp_team0 + i * nteams < n; ++i) {
        const long long row = team + i * nteams;
        const bool valid = row < n;
        const int stage = RP > 0 ? 0 : (int)(i % S);
        if (RP == 0) issue(team + (i + S - 1) * nteams, (int)((i + S - 1) % S));
        const long long lab = lab_next;
        lab_next = R::load_key(g, row + nteams, row + nteams < n);
        const int sh = EDGES ? row_shift<T, VEC>(g.x + (valid ? row : 0) * g.ldx) : 0;
        const int packs = (sh + c + VEC - 1) / VEC;
        const int mine = valid ? mine_of(packs) : 0;
        const Pack<T, VEC>* xst = xs + (size_t)stage * P * bt + threadIdx.x;
        const Pack<T, VEC>* yst = ys + (size_t)stage * P * bt + threadIdx.x;
        copy_wait(RP > 0 ? 0 : S - 1);
        if constexpr (RP > 0) {
#pragma unroll
            for (int it = 0; it < RP; ++it)
                if (it < mine) rx[it] = xst[(size_t)it * bt];
        }
        auto xvals = [&](int it, A (&fv)[VEC]) {
            if constexpr (RP > 0) unpack(rx[it], fv);
            else load_vals<A>(xst + (size_t)it * bt, fv);
        };
        auto yvals = [&](int it, A (&yv)[VEC]) {
            if (R::Y) load_vals<A>(yst + (size_t)it * bt, yv);
        };
        // f(it, col0) over this thread's packs it in [lo, hi) (col0: the pack's first column)
        auto each = [&](int lo, int hi, auto&& f) {
            if constexpr (RP > 0) {
#pragma unroll
                for (int it = 0; it < RP; ++it)
                    if (it >= lo && it < hi) f(it, (it * nt + tid) * VEC - sh);
            } else {
                for (int it = lo; it < hi; ++it) f(it, (it * nt + tid) * VEC - sh);
            }
        };
        // The edge packs (a row off a 16-byte boundary: the first pack, and the last when
        // the row does not end on one) are taken apart, so the loops over whole packs
        // carry no column masks.
        int lo = 0, hi = mine, e0 = -1, e1 = -1;
        if constexpr (EDGES) {
            if (mine > 0 && sh > 0 && tid == 0) {
                lo = 1;
                e0 = 0;
            }
            if (mine > 0 && (sh + c) % VEC != 0 && (mine - 1) * nt + tid == packs - 1) {
                hi = mine - 1;
                if (mine - 1 != e0) e1 = mine - 1;
            }
            if (hi < lo) hi = lo;
        }
        auto edges = [&](auto&& f) {
            if constexpr (EDGES) {
                if (e0 >= 0) f(e0, (e0 * nt + tid) * VEC - sh);
                if (e1 >= 0) f(e1, (e1 * nt + tid) * VEC - sh);
            }
        };
        const typename R::Ctx lb = R::context(g, lab, valid);
        const bool extra = R::extra(g);
        State p = State::identity();
        // softcap: the online update (tanh once a value); not in the register-stage kernel,
        // whose row fills the registers (the host never plans it for a softcap call)
        if (RP == 0 && g.cap > A(0)) {
            each(0, mine, [&](int it, int col0) {
                A fv[VEC], yv[VEC] = {};
                xvals(it, fv);
                yvals(it, yv);
                R::template add<VEC, EDGES>(g, p, lb, col0, fv, yv);
            });
            if (G > 0) p = lanes_merge<(G > 0 ? G : 32)>(p, extra);
        } else {  // the lean path: the maximum, then the sums at that shift
            A m = neg_inf<A>();
            each(lo, hi, [&](int it, int) {
                A fv[VEC];
                xvals(it, fv);
#pragma unroll
                for (int u = 0; u < VEC; ++u) m = nanmax_fast(m, fv[u]);
            });
            edges([&](int it, int col0) {
                A fv[VEC];
                xvals(it, fv);
                m = pack_max<A, VEC>(m, col0, c, fv);
            });
            // a warp team agrees on its maximum first (shuffles are cheap), so its sums need
            // no rescaling; a block or cluster merges the thread partials once
            if (G > 0) {
#pragma unroll
                for (int o = (G > 0 ? G : 2) / 2; o > 0; o >>= 1) m = nanmax_fast(m, shfl_xor(m, o));
            }
            state_at_max(p, m);
            if (extra) {
                each(lo, hi, [&](int it, int col0) {
                    A fv[VEC], yv[VEC] = {};
                    xvals(it, fv);
                    yvals(it, yv);
                    R::template sum<true, VEC, false>(g, p, lb, col0, fv, yv);
                });
                edges([&](int it, int col0) {
                    A fv[VEC], yv[VEC] = {};
                    xvals(it, fv);
                    yvals(it, yv);
                    R::template sum<true, VEC, true>(g, p, lb, col0, fv, yv);
                });
            } else {
                each(lo, hi, [&](int it, int col0) {
                    A fv[VEC], yv[VEC] = {};
                    xvals(it, fv);
                    R::template sum<false, VEC, false>(g, p, lb, col0, fv, yv);
                });
                edges([&](int it, int col0) {
                    A fv[VEC], yv[VEC] = {};
                    xvals(it, fv);
                    R::template sum<false, VEC, true>(g, p, lb, col0, fv, yv);
                });
            }
            if (G > 0) p = lanes_sum<(G > 0 ? G : 32)>(p, extra);  // the sums share the shift
        }
        if (RP > 0) {  // the stage's reads are done (their values consumed, and __syncwarp
            __syncwarp();  // orders this thread's shared accesses): copy the next row into it
            issue(team + (i + 1) * nteams, 0);
        }
        if (G == 0) {
            p = block_merge(p, red, parity, extra);
            if (CL > 1) p = xchg.merge(p, rank, (unsigned)(i + 1), parity, extra);
        }
        parity ^= 1;
        const typename R::Out o = R::finish(g, p, lb);
        if (valid && tid == 0) R::emit(g, row, o, lb, acc);
        if (g.grad && valid) {
            T* grow = g.grad + row * g.ldg;
            if (R::lean_grad(g, o)) {  // the lean gradient
                each(lo, hi, [&](int it, int col0) {
                    A fv[VEC];
                    xvals(it, fv);
                    R::template grad_lean<VEC, false>(g, o, grow, col0, fv);
                });
                edges([&](int it, int col0) {
                    A fv[VEC];
                    xvals(it, fv);
                    R::template grad_lean<VEC, true>(g, o, grow, col0, fv);
                });
            } else {
                each(0, mine, [&](int it, int col0) {
                    A fv[VEC], yv[VEC] = {};
                    xvals(it, fv);
                    yvals(it, yv);
                    R::template grad<VEC, EDGES>(g, o, grow, col0, fv, yv);
                });
            }
        }
    }
    copy_wait(0);
    xchg.finish();
    finish_launch(acc, ws, 0, out);
}

// ------------------------------------------------------------------------- tile_rows
// C <= 32, dense rows (ldx == ldy == ldg == c): a block takes 128 rows at a time (a tile,
// one thread a row).  Tiles are copied whole, exactly as they lie in global memory, into an
// S-stage ring in dynamic shared memory with cp.async, S - 1 tiles ahead (16-byte packs when
// VEC > 1; the labels too, one a thread), so no register holds a prefetched tile and a block
// keeps up to S - 1 tiles in flight.  Each thread reads its row from the ring, writes its
// gradient over it in place (rounded to T once), and the block stores the tile back with
// 16-byte stores.  Rows whose length is a multiple of 4 are read from column t % c onwards
// (wrapping), so that the 32 rows of a warp do not fall into a few shared-memory banks (a
// row's sums then run in an order set by its place in its tile: its last bits may differ
// from the same row's at another position, never from run to run).
// Stage layout: the tile's values (a 16-byte multiple), then the second stream's (Y) or the
// keys (KEYS: the labels).  The host sizes the ring with gpuce/_cuda/fused.py tile_plan.

// This thread's share of copying `elems` contiguous values src -> dst (shared memory):
// packs threadIdx.x, + blockDim.x, ..., then the values past the last whole pack one by one.
template <typename T, int VEC>
__device__ __forceinline__ void tile_copy(T* dst, const T* src, int elems) {
    const int packs = elems / VEC;
    for (int q = threadIdx.x; q < packs; q += blockDim.x)
        copy_pack_async<T, VEC>(reinterpret_cast<Pack<T, VEC>*>(dst) + q, src + (long long)q * VEC);
    for (int i = packs * VEC + threadIdx.x; i < elems; i += blockDim.x)
        copy_pack_async<T, 1>(reinterpret_cast<Pack<T, 1>*>(dst + i), src + i);
}

// The block's store of `elems` contiguous values src (shared memory) -> dst: 16-byte words.
template <typename T, int VEC>
__device__ __forceinline__ void tile_store(T* dst, const T* src, int elems) {
    const int packs = elems / VEC;
    for (int q = threadIdx.x; q < packs; q += blockDim.x) {
#ifdef GPUCE_WORDS
        if constexpr (sizeof(Pack<T, VEC>) == 16) {
            unsigned w[4];
            lds128(src + q * VEC, w);
            stg128(dst + (long long)q * VEC, w);
            continue;
        }
#endif
        store_pack<T, VEC>(dst + (long long)q * VEC, *reinterpret_cast<const Pack<T, VEC>*>(src + q * VEC));
    }
    for (int i = packs * VEC + threadIdx.x; i < elems; i += blockDim.x) dst[i] = src[i];
}

// Copy the tile of rows row0.. (nothing past the last row) into the ring stage at st: the
// values, then the second stream (Y) or the keys (KEYS), one commit group a tile (empty past
// the end, so that the wait counts stay the same).
template <typename T, typename I, bool Y, bool KEYS, int VEC>
__device__ __forceinline__ void tile_issue(const T* x, const T* y, const I* labels, long long n, int c, long long row0,
                                           unsigned char* st, int vb) {
    if (row0 < n) {
        const int rows = (int)min((long long)GPUCE_TILE_ROWS, n - row0);
        tile_copy<T, VEC>(reinterpret_cast<T*>(st), x + row0 * c, rows * c);
        if (Y) tile_copy<T, VEC>(reinterpret_cast<T*>(st + vb), y + row0 * c, rows * c);
        else if (KEYS && (int)threadIdx.x < rows)
            copy_pack_async<I, 1>(reinterpret_cast<Pack<I, 1>*>(st + vb) + threadIdx.x, labels + row0 + threadIdx.x);
    }
    copy_commit();
}

// The bytes of one ring stage for rows of c values (tile_plan mirrors it).
template <typename T, typename I, bool Y, bool KEYS>
__device__ __forceinline__ int tile_stage_bytes(int c, int& values_bytes) {
    values_bytes = (GPUCE_TILE_ROWS * c * (int)sizeof(T) + 15) & ~15;
    return values_bytes * (Y ? 2 : 1) + (KEYS ? GPUCE_TILE_ROWS * (int)sizeof(I) : 0);
}

template <typename R, int VEC>
__device__ __forceinline__ void tile_rows(const typename R::Args& g, const typename R::Batch& out, long long* ws) {
    typedef typename R::T T;
    typedef typename R::I I;
    typedef typename R::A A;
    constexpr int ROWS = GPUCE_TILE_ROWS, S = GPUCE_TILE_STAGES;
    const long long n = g.n;
    const int c = g.c;
    const T* x = g.x;
    const T* y = g.y;
    const I* labels = g.labels;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    int vb;
    const int sb = tile_stage_bytes<T, I, R::Y, R::KEYS>(c, vb);
    const int t = threadIdx.x;
    const long long step = (long long)gridDim.x * ROWS;
    const long long first = (long long)blockIdx.x * ROWS;
    typename R::Acc acc = R::Acc::zero();
#pragma unroll
    for (int s = 0; s < S - 1; ++s)
        tile_issue<T, I, R::Y, R::KEYS, VEC>(x, y, labels, n, c, first + s * step, smem_raw + s * sb, vb);
    const bool extra = R::extra(g);
    const int j0 = (c & 3) == 0 ? t % c : 0;  // the column this thread starts its row at
    int stage = 0;
    for (long long row0 = first; row0 < n; row0 += step) {
        copy_wait(S - 2);  // this thread's copies of the tile have landed
        __syncthreads();   // everyone's have; and the stage written next was stored last round
        tile_issue<T, I, R::Y, R::KEYS, VEC>(x, y, labels, n, c, row0 + (S - 1) * step,
                                             smem_raw + (stage == 0 ? S - 1 : stage - 1) * sb, vb);
        const int rows = (int)min((long long)ROWS, n - row0);
        unsigned char* st = smem_raw + stage * sb;
        if (t < rows) {
            T* xr = reinterpret_cast<T*>(st) + t * c;
            const T* yr = R::Y ? reinterpret_cast<const T*>(st + vb) + t * c : nullptr;
            const long long key = R::KEYS ? (long long)reinterpret_cast<const I*>(st + vb)[t] : 0;
            const typename R::Ctx lb = R::context(g, key, true);
            typename R::State p = R::State::identity();
            // every column of the row once, from j0 on (two loops: no wrap test a value)
            auto cols = [&](auto&& f) {
                for (int j = j0; j < c; ++j) f(j);
                for (int j = 0; j < j0; ++j) f(j);
            };
            auto vals = [&](int j, A (&fv)[1], A (&yv)[1]) {
                fv[0] = load_acc<A>(xr[j]);
                yv[0] = R::Y ? load_acc<A>(yr[j]) : A(0);
            };
            if (g.cap > A(0)) {  // softcap: the online update
                cols([&](int j) {
                    A fv[1], yv[1];
                    vals(j, fv, yv);
                    R::template add<1, true>(g, p, lb, j, fv, yv);
                });
            } else {  // the lean path: the row's maximum, then its sums, then the key's value
                A m = neg_inf<A>();
                cols([&](int j) { m = nanmax_fast(m, load_acc<A>(xr[j])); });
                state_at_max(p, m);
                if (extra) {
                    cols([&](int j) {
                        A fv[1], yv[1];
                        vals(j, fv, yv);
                        R::template sum<true, 1, false, false>(g, p, lb, j, fv, yv);
                    });
                } else {
                    cols([&](int j) {
                        A fv[1] = {load_acc<A>(xr[j])}, yv[1] = {A(0)};
                        R::template sum<false, 1, false, false>(g, p, lb, j, fv, yv);
                    });
                }
                R::pick(p, lb, xr);
            }
            const typename R::Out o = R::finish(g, p, lb);
            R::emit(g, row0 + t, o, lb, acc);
            if (g.grad) {  // the gradient over the row's values, rounded to T once
                if (R::lean_grad(g, o)) {
                    R::tile_grad_lean(xr, p, o, cols);
                } else {
                    cols([&](int j) {
                        A fv[1], yv[1];
                        vals(j, fv, yv);
                        R::template grad<1, false>(g, o, xr, j, fv, yv);
                    });
                }
            }
        }
        if (g.grad) {
            __syncthreads();  // the tile's gradient is complete
            tile_store<T, VEC>(g.grad + row0 * c, reinterpret_cast<const T*>(st), rows * c);
        }
        stage = stage + 1 == S ? 0 : stage + 1;
    }
    copy_wait(0);  // the empty groups past the end
    finish_launch(acc, ws, 0, out);
}

// ------------------------------------------------------------------------- twopass_rows
// One block a row (grid-stride), the row read twice: the statistics, then the gradient.
// For rows that do not fit the shared-memory rings of sce_team; the second read is meant to
// hit L2 (one row a block in flight).  Rows with no softcap and no coefficients take the lean
// online update (pack_online), loading four packs a thread before using any.
//
// sce_twopass_cluster (sm_90): the same with a cluster of CL blocks a row, each block reading
// its CL-th of the row's packs (interleaved: pack q belongs to thread q mod (CL x threads)).
// The blocks exchange only the row's partial state through distributed shared memory (one
// ClusterXchg merge a row, as sce_cluster) and re-read their slice for the gradient.  No row
// is held in shared memory; a cluster keeps one row in flight, so the device has
// (resident blocks / CL) rows in flight instead of one a block: CL times fewer bytes between
// a row's two reads, which is what lets the second read hit L2 at LLM vocabularies (a
// candidate of the planner, timed by `gpuce bench --variants`).
template <typename R, int VEC, int CL>
__device__ __forceinline__ void twopass_rows(const typename R::Args& g, const typename R::Batch& out, long long* ws) {
    typedef typename R::T T;
    typedef typename R::A A;
    typedef typename R::State State;
    const long long n = g.n;
    const int c = g.c;
    __shared__ A red[2 * 32 * State::WORDS];
    typename R::Acc acc = R::Acc::zero();
    int parity = 0;
    // CL == 1: rank 0, and every index below is the block's own (the code sce_twopass had)
    const unsigned rank = CL > 1 ? (unsigned)cluster_block_rank() : 0u;
    const unsigned tid = rank * blockDim.x + threadIdx.x;  // the thread's place on the row
    ClusterXchg<State, CL> xchg;
    xchg.init();
    unsigned tag = 0;  // the cluster's row step + 1 (its exchange tag)
    for (long long row = blockIdx.x / CL; row < n; row += gridDim.x / CL) {
        const long long key = R::load_key(g, row, true);
        const int sh = row_shift<T, VEC>(g.x + row * g.ldx);
        const int packs = (sh + c + VEC - 1) / VEC;
        const T* xrow = g.x + row * g.ldx - sh;
        const T* yrow = R::Y ? g.y + row * g.ldy - sh : nullptr;
        const typename R::Ctx lb = R::context(g, key, true);
        const bool extra = R::extra(g);
        const bool lean = g.cap == A(0) && !extra;
        // the lean path loads U packs before using any (U 16-byte loads in flight a thread)
        constexpr int U = 4;
        const int step = U * (int)(blockDim.x * CL);
        auto load_batch = [&](int q0, A (&fv)[U][VEC]) {  // packs q0 + j blockDim.x CL, j < U
#pragma unroll
            for (int j = 0; j < U; ++j) {
                const int q = q0 + j * (int)(blockDim.x * CL);
                if (q < packs) load_vals_global<A>(xrow + (size_t)q * VEC, fv[j]);
            }
        };
        State p = State::identity();
        if (lean) {
            for (int q0 = tid; q0 < packs; q0 += step) {
                A fv[U][VEC];
                load_batch(q0, fv);
#pragma unroll
                for (int j = 0; j < U; ++j) {
                    const int q = q0 + j * (int)(blockDim.x * CL);
                    if (q >= packs) continue;
                    mask_edges(fv[j], q * VEC - sh, c);
                    R::sum_online(p, lb, q * VEC - sh, fv[j]);
                }
            }
        } else {
            for (int q = tid; q < packs; q += blockDim.x * CL) {
                A fv[VEC], yv[VEC] = {};
                unpack(load_pack<T, VEC>(xrow + (size_t)q * VEC), fv);
                if (R::Y) unpack(load_pack<T, VEC>(yrow + (size_t)q * VEC), yv);
                R::template add<VEC, true>(g, p, lb, q * VEC - sh, fv, yv);
            }
        }
        p = block_merge(p, red, parity, extra);
        if (CL > 1) p = xchg.merge(p, (int)rank, ++tag, parity, extra);
        parity ^= 1;
        const typename R::Out o = R::finish(g, p, lb);
        if (threadIdx.x == 0 && rank == 0) R::emit(g, row, o, lb, acc);
        if (g.grad && R::lean_grad(g, o)) {
            T* grow = g.grad + row * g.ldg;
            for (int q0 = tid; q0 < packs; q0 += step) {
                A fv[U][VEC];
                load_batch(q0, fv);
#pragma unroll
                for (int j = 0; j < U; ++j) {
                    const int q = q0 + j * (int)(blockDim.x * CL);
                    if (q < packs) R::template grad_lean<VEC, true>(g, o, grow, q * VEC - sh, fv[j]);
                }
            }
        } else if (g.grad) {
            T* grow = g.grad + row * g.ldg;
            for (int q = tid; q < packs; q += blockDim.x * CL) {
                A fv[VEC], yv[VEC] = {};
                unpack(load_pack<T, VEC>(xrow + (size_t)q * VEC), fv);
                if (R::Y) unpack(load_pack<T, VEC>(yrow + (size_t)q * VEC), yv);
                R::template grad<VEC, true>(g, o, grow, q * VEC - sh, fv, yv);
            }
        }
    }
    xchg.finish();
    finish_launch(acc, ws, 0, out);
}

}  // namespace gpuce
