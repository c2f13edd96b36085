// MoE on the device: routing (as engine/src/router.rs), the per-slot sort of (token, expert)
// pairs, the decode-sized expert products (plain and on the tensor cores), the combine, and the
// prefill-sized grouped GEMM. Launched from engine/src/cuda/experts.rs.

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// MoE routing on the device, one thread per token, exactly as engine/src/router.rs does it on
// the host (same tie rule: the lower index wins). logits [T, E] f32 → ids [T, k], weights [T, k].
// scoring: 0 sigmoid, 1 softmax. method: 0 greedy, 1 group_limited_greedy, 2 noaux_tc.

#define ROUTE_MAX_M 8    // experts per lane: E ≤ 256
#define ROUTE_MAX_K 16
#define ROUTE_WARPS 4
#define ROUTE_NONE 0x7fffffff

// (value, index) `a` beats `b`: a real entry over none, then the larger value, then the lower
// index — the host's order (sort descending, ties to the lower index).
__device__ __forceinline__ bool beats(float va, int ia, float vb, int ib) {
    if (ia == ROUTE_NONE) return false;
    if (ib == ROUTE_NONE) return true;
    return va > vb || (va == vb && ia < ib);
}

// Warp-wide best (value, index, payload); every lane gets it.
__device__ __forceinline__ void warp_best(float& v, int& i, float& p) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        const int i2 = __shfl_xor_sync(0xffffffffu, i, o);
        const float p2 = __shfl_xor_sync(0xffffffffu, p, o);
        if (beats(v2, i2, v, i)) {
            v = v2;
            i = i2;
            p = p2;
        }
    }
}

// Routes token t from its logits row `l` (read through L2: another block of moe_route_logits may
// have written it), one warp; lane l holds experts l, l+32, … (at most 8 each). `cs`: this
// warp's ROUTE_MAX_M · 32 floats of shared memory. The k weights: in an array indexed by the
// round (local memory: a 64-byte stack frame), normalised and stored by lane 0 one by one; or,
// with REG_WEIGHTS (the engine's kernels), round r's in lane r's register, the k lanes storing
// theirs at once (the same arithmetic, the same bits; scripts/bench/router_bench.cu times both).
//
// RANK_M > 0 (n_exp ≤ 32 · RANK_M; `sel`: 2 · ROUTE_MAX_K words of this warp's shared memory):
// lane l holds RANK_M experts, and the top k by rank instead of k rounds of a warp's arg-max:
// every lane counts, for each expert it holds, the experts that beat it (the host's order is a
// total order: the value, then the index), all at once; an expert of rank r < k is round r's
// pick, and the weights are summed in rank order as the rounds sum them (the same bits; a NaN
// choice ranks as -inf, where the rounds would keep the first one a lane sees).
//
// Group scores (method 1 or 2, some groups dropped): where a group is 32 experts (V3's and R1's
// 256 in 8), group g is every lane's expert slot m = g, so with GROUP_WARP all groups' scores come
// from warp reductions at once (the largest, or the two largest summed, as the host takes them);
// otherwise lane g walks its group's choices in shared memory. The same scores unless a choice
// is NaN.
template <bool REG_WEIGHTS = false, int RANK_M = 0, bool GROUP_WARP = true>
__device__ __forceinline__ void route_row(const float* l, int t, int n_exp, const float* bias,
                                          int scoring, int method, int k, int n_group,
                                          int topk_group, int normalise, int scale_weights,
                                          float scaling, float* cs, uint32_t* ids,
                                          float* weights, float* sel = nullptr) {
    constexpr int M = RANK_M ? RANK_M : ROUTE_MAX_M;  // experts a lane holds
    const int lane = threadIdx.x & 31;
    float score[M], choice[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const int e = lane + 32 * m;
        score[m] = e < n_exp ? __ldcg(l + e) : -INFINITY;
    }
    if (scoring == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) score[m] = 1.f / (1.f + expf(-score[m]));
    } else {
        float mx = -INFINITY;
#pragma unroll
        for (int m = 0; m < M; ++m)
            if (lane + 32 * m < n_exp) mx = fmaxf(mx, score[m]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float sum = 0.f;
#pragma unroll
        for (int m = 0; m < M; ++m) {
            score[m] = lane + 32 * m < n_exp ? expf(score[m] - mx) : 0.f;
            sum += score[m];
        }
        sum = warp_sum(sum);
#pragma unroll
        for (int m = 0; m < M; ++m) score[m] = score[m] / sum;
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const int e = lane + 32 * m;
        choice[m] = e < n_exp ? (bias ? score[m] + bias[e] : score[m]) : -INFINITY;
    }
    if (method != 0 && topk_group < n_group) {
        const int per = n_exp / n_group;
        float gs = -INFINITY;
        int gi = ROUTE_NONE;
        if (GROUP_WARP && per == 32) {
            // Each slot's two largest choices over the warp (a pair merged with a pair: the
            // larger of the tops, then the larger of the smaller top and the larger second).
            float t1[M], t2[M];
#pragma unroll
            for (int m = 0; m < M; ++m) t1[m] = choice[m], t2[m] = -INFINITY;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    const float o1 = __shfl_xor_sync(0xffffffffu, t1[m], o);
                    const float o2 = __shfl_xor_sync(0xffffffffu, t2[m], o);
                    t2[m] = fmaxf(fminf(t1[m], o1), fmaxf(t2[m], o2));
                    t1[m] = fmaxf(t1[m], o1);
                }
            }
#pragma unroll
            for (int m = 0; m < M; ++m)
                if (m == lane && m < n_group) {
                    gi = lane;
                    gs = method == 2 ? t1[m] + t2[m] : t1[m];
                }
        } else {
            // One lane per group (n_group ≤ 32), from the choices in shared memory.
#pragma unroll
            for (int m = 0; m < M; ++m)
                if (lane + 32 * m < n_exp) cs[lane + 32 * m] = choice[m];
            __syncwarp();
            if (lane < n_group) {
                const float* c = cs + lane * per;
                gi = lane;
                if (method == 2) {
                    int b1 = 0;
                    for (int e = 1; e < per; ++e)
                        if (c[e] > c[b1]) b1 = e;
                    int b2 = -1;
                    for (int e = 0; e < per; ++e)
                        if (e != b1 && (b2 < 0 || c[e] > c[b2])) b2 = e;
                    gs = b2 < 0 ? c[b1] : c[b1] + c[b2];
                } else {
                    float mg = -INFINITY;
                    for (int e = 0; e < per; ++e) mg = fmaxf(mg, c[e]);
                    gs = mg;
                }
            }
        }
        bool kept = false;
        for (int r = 0; r < topk_group; ++r) {
            float v = kept ? -INFINITY : gs, p = 0.f;
            int i = kept ? ROUTE_NONE : gi;
            warp_best(v, i, p);
            if (i == lane) kept = true;
        }
        const unsigned kept_mask = __ballot_sync(0xffffffffu, kept);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const int e = lane + 32 * m;
            if (e < n_exp && !((kept_mask >> (e / per)) & 1u)) choice[m] = -INFINITY;
        }
    }
    if constexpr (RANK_M > 0) {
        uint32_t* sel_i = reinterpret_cast<uint32_t*>(sel + ROUTE_MAX_K);
        __syncwarp();  // the group pass's lanes are done reading `cs`
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const int e = lane + 32 * m;
            if (choice[m] != choice[m]) choice[m] = -INFINITY;
            if (e < n_exp) cs[e] = choice[m];
        }
        __syncwarp();
        int rank[M];
#pragma unroll
        for (int m = 0; m < M; ++m) rank[m] = 0;
#pragma unroll 8
        for (int j = 0; j < n_exp; ++j) {
            const float c = cs[j];
#pragma unroll
            for (int m = 0; m < M; ++m)
                rank[m] += (c > choice[m]) | ((c == choice[m]) & (j < lane + 32 * m));
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const int e = lane + 32 * m;
            if (e < n_exp && rank[m] < k) {
                sel[rank[m]] = score[m];
                sel_i[rank[m]] = (uint32_t)e;
            }
        }
        __syncwarp();
        float sum = 0.f;
        for (int r = 0; r < k; ++r) sum += sel[r];
        sum += 1e-20f;
        if (lane < k) {
            float v = sel[lane];
            if (normalise) v = v / sum;
            if (scale_weights) v = v * scaling;
            ids[(size_t)t * k + lane] = sel_i[lane];
            weights[(size_t)t * k + lane] = v;
        }
        __syncwarp();  // `sel` and `cs` are read before the warp's next token writes them
        return;
    }
    unsigned taken = 0;
    float w[REG_WEIGHTS ? 1 : ROUTE_MAX_K];
    float mine = 0.f;
    float sum = 0.f;
    for (int r = 0; r < k; ++r) {
        float v = 0.f, p = 0.f;
        int i = ROUTE_NONE;
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const int e = lane + 32 * m;
            if (e < n_exp && !((taken >> m) & 1u) && beats(choice[m], e, v, i)) {
                v = choice[m];
                i = e;
                p = score[m];
            }
        }
        warp_best(v, i, p);
        if ((i & 31) == lane) taken |= 1u << (i >> 5);
        if (lane == 0) ids[(size_t)t * k + r] = (uint32_t)i;
        if constexpr (REG_WEIGHTS) {
            if (lane == r) mine = p;
        } else {
            w[r] = p;
        }
        sum += p;
    }
    sum += 1e-20f;
    if constexpr (REG_WEIGHTS) {
        if (lane < k) {
            float v = mine;
            if (normalise) v = v / sum;
            if (scale_weights) v = v * scaling;
            weights[(size_t)t * k + lane] = v;
        }
    } else if (lane == 0) {
        for (int r = 0; r < k; ++r) {
            float v = w[r];
            if (normalise) v = v / sum;
            if (scale_weights) v = v * scaling;
            weights[(size_t)t * k + r] = v;
        }
    }
}


// One warp per token: k rounds with the weights in registers (route_row<true>), or, in
// moe_route_e64, for ≤ 64 experts, the top k by rank (route_row<false, 2>).
template <int RANK_M>
__device__ __forceinline__ void route_tokens(const float* logits, int tokens, int n_exp,
                                             const float* bias, int scoring, int method, int k,
                                             int n_group, int topk_group, int normalise,
                                             int scale_weights, float scaling, uint32_t* ids,
                                             float* weights) {
    __shared__ float choice_s[ROUTE_WARPS][ROUTE_MAX_M * 32];
    __shared__ float sel_s[ROUTE_WARPS][RANK_M ? 2 * ROUTE_MAX_K : 1];
    const int warp = threadIdx.x >> 5;
    const int t = blockIdx.x * ROUTE_WARPS + warp;
    if (t >= tokens) return;
    route_row<RANK_M == 0, RANK_M>(logits + (size_t)t * n_exp, t, n_exp, bias, scoring, method,
                                   k, n_group, topk_group, normalise, scale_weights, scaling,
                                   choice_s[warp], ids, weights, sel_s[warp]);
}
#define ROUTE_ARGS                                                                              \
    const float *logits, int tokens, int n_exp, const float *bias, int scoring, int method,     \
        int k, int n_group, int topk_group, int normalise, int scale_weights, float scaling,   \
        uint32_t *ids, float *weights
#define ROUTE_PASS                                                                              \
    logits, tokens, n_exp, bias, scoring, method, k, n_group, topk_group, normalise,           \
        scale_weights, scaling, ids, weights
extern "C" __global__ void moe_route(ROUTE_ARGS) { route_tokens<0>(ROUTE_PASS); }
extern "C" __global__ void moe_route_e64(ROUTE_ARGS) { route_tokens<2>(ROUTE_PASS); }
#undef ROUTE_ARGS
#undef ROUTE_PASS

// Stores table[i_j] to flag word j (the first n of four), released at system scope: the flag
// values of a CUDA graph's run, read when the kernel runs.
__device__ __forceinline__ void store_from_table(uint32_t* w0, uint32_t* w1, uint32_t* w2,
                                                 uint32_t* w3, const uint32_t* table, int i0,
                                                 int i1, int i2, int i3, int n) {
    uint32_t* words[4] = {w0, w1, w2, w3};
    const int at[4] = {i0, i1, i2, i3};
    for (int j = 0; j < n && j < 4; ++j) {
        const uint32_t v = table[at[j]];
        asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(words[j]), "r"(v) : "memory");
    }
}

// The end of a launch that hands an MoE layer to expert workers (copy_batch_signal's last
// block, or the routing launch's with a RouteHandoff), once the block's copies are fenced: thread
// 0 stores the `ready` words from the table, then the block adds the layer's routed ids to the
// gate's expert load (counts[e] += |{p < n : ids[p] = e}|, ids ≥ n_experts left out; null
// counts: none), after the signal, so off the workers' path.
__device__ __forceinline__ void signal_then_count(uint32_t* w0, uint32_t* w1, uint32_t* w2,
                                                  uint32_t* w3, const uint32_t* table, int i0,
                                                  int i1, int i2, int i3, int words,
                                                  const uint32_t* ids, int n, int n_experts,
                                                  uint32_t* counts) {
    if (threadIdx.x == 0) store_from_table(w0, w1, w2, w3, table, i0, i1, i2, i3, words);
    if (!counts) return;
    for (int p = threadIdx.x; p < n; p += blockDim.x) {
        const uint32_t e = ids[p];
        if (e < (uint32_t)n_experts) atomicAdd(&counts[e], 1u);
    }
}

// A mesh's decode graph: the hand-off of an MoE layer's rows and routing to its expert workers'
// slots, done by the routing launch (route_logits) instead of a copy_batch_signal launch after
// it (the gate's `route` fold, services/gate's RemoteExperts::route_handoff). Each block copies
// its share of `rows` (the rows in the workers' dtype, `row_words` u32) into every slot's x and
// fences at system scope before it counts itself; the last block, once it has routed, copies
// the ids and weights into every slot, fences, stores the `ready` words from the table (as
// copy_batch_signal's last block does), then adds the ids to `counts` (the gate's expert load;
// null: none). `slots` 0: no hand-off.
struct RouteHandoff {
    const uint32_t* rows;
    int row_words;
    uint32_t* x[4];
    uint32_t* ids[4];
    uint32_t* weights[4];
    int slots;
    uint32_t* words[4];
    const uint32_t* table;
    int at[4];
    int n_words;
    uint32_t* counts;
};
#define ROUTE_HANDOFF_ARGS                                                                      \
    const uint32_t *ho_rows, int ho_row_words, uint32_t *ho_x0, uint32_t *ho_x1,                \
        uint32_t *ho_x2, uint32_t *ho_x3, uint32_t *ho_i0, uint32_t *ho_i1, uint32_t *ho_i2,    \
        uint32_t *ho_i3, uint32_t *ho_w0, uint32_t *ho_w1, uint32_t *ho_w2, uint32_t *ho_w3,    \
        int ho_slots, uint32_t *ho_f0, uint32_t *ho_f1, uint32_t *ho_f2, uint32_t *ho_f3,       \
        const uint32_t *ho_table, int ho_a0, int ho_a1, int ho_a2, int ho_a3, int ho_words,     \
        uint32_t *ho_counts
#define ROUTE_HANDOFF_MAKE                                                                      \
    RouteHandoff {                                                                              \
        ho_rows, ho_row_words, {ho_x0, ho_x1, ho_x2, ho_x3}, {ho_i0, ho_i1, ho_i2, ho_i3},      \
            {ho_w0, ho_w1, ho_w2, ho_w3}, ho_slots, {ho_f0, ho_f1, ho_f2, ho_f3}, ho_table,     \
            {ho_a0, ho_a1, ho_a2, ho_a3}, ho_words, ho_counts                                   \
    }

// Router logits and routing in one launch, for a few tokens (a decode step): block b computes
// the logits of experts b·ROUTE_WARPS … b·ROUTE_WARPS + 3 for every token (a warp an expert:
// lanes over the row in float4s, then a warp sum; plus `skew[e]` when not null) into `logits`;
// the last block to finish (`counter`, which it sets back to 0 for the next launch) routes every
// token as moe_route does. Needs hidden % 4 == 0 and 16-byte aligned rows.
// A block per expert (128 threads, each over every 128th float4 of the row, its loads in
// flight together), its tokens' dot products summed in a fixed order (lane partials, the warp's
// butterfly, then the 4 warps in order); the last block routes. `tokens` ≤ ROUTE_LOGITS_MAX_T.
#define ROUTE_LOGITS_MAX_T 16
template <bool REG_WEIGHTS, int RANK_M = 0, int UNROLL = 4>
__device__ __forceinline__ void route_logits(const float* x, int tokens, int hidden,
                                             const float* w_router, const float* skew,
                                             float* logits, uint32_t* counter, int n_exp,
                                             const float* bias, int scoring, int method, int k,
                                             int n_group, int topk_group, int normalise,
                                             int scale_weights, float scaling, uint32_t* ids,
                                             float* weights,
                                             const RouteHandoff& ho = RouteHandoff{}) {
    __shared__ float choice_s[ROUTE_WARPS][ROUTE_MAX_M * 32];
    __shared__ float part[ROUTE_WARPS][ROUTE_LOGITS_MAX_T];
    __shared__ float sel_s[ROUTE_WARPS][RANK_M ? 2 * ROUTE_MAX_K : 1];
    __shared__ bool last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int e = blockIdx.x;
    const int n4 = hidden / 4;
    const float4* wr = reinterpret_cast<const float4*>(w_router + (size_t)e * hidden);
    float acc[ROUTE_LOGITS_MAX_T];
#pragma unroll
    for (int t = 0; t < ROUTE_LOGITS_MAX_T; ++t) acc[t] = 0.f;
#pragma unroll UNROLL
    for (int c = threadIdx.x; c < n4; c += ROUTE_WARPS * 32) {
        const float4 a = __ldcs(wr + c);
#pragma unroll
        for (int t = 0; t < ROUTE_LOGITS_MAX_T; ++t) {
            if (t < tokens) {
                const float4 b = reinterpret_cast<const float4*>(x + (size_t)t * hidden)[c];
                acc[t] = fmaf(a.x, b.x, acc[t]);
                acc[t] = fmaf(a.y, b.y, acc[t]);
                acc[t] = fmaf(a.z, b.z, acc[t]);
                acc[t] = fmaf(a.w, b.w, acc[t]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < ROUTE_LOGITS_MAX_T; ++t) {
        if (t < tokens) {
            const float v = warp_sum(acc[t]);
            if (lane == 0) part[warp][t] = v;
        }
    }
    __syncthreads();
    if (threadIdx.x < tokens) {
        const int t = threadIdx.x;
        float v = part[0][t];
#pragma unroll
        for (int w = 1; w < ROUTE_WARPS; ++w) v += part[w][t];
        logits[(size_t)t * n_exp + e] = skew ? v + skew[e] : v;
    }
    if (ho.slots > 0) {
        // This block's share of the rows, into every slot (fenced for the workers).
        const int per = (ho.row_words + gridDim.x - 1) / gridDim.x;
        const int b0 = blockIdx.x * per, b1 = min(ho.row_words, b0 + per);
        for (int s = 0; s < ho.slots; ++s)
            for (int i = b0 + threadIdx.x; i < b1; i += blockDim.x) ho.x[s][i] = ho.rows[i];
        __threadfence_system();
    }
    // Every block's logits are out before it counts itself; the last one sees them all.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    if (threadIdx.x == 0) *counter = 0u;
    __threadfence();
    for (int t = warp; t < tokens; t += ROUTE_WARPS)
        route_row<REG_WEIGHTS, RANK_M>(logits + (size_t)t * n_exp, t, n_exp, bias, scoring,
                                       method, k, n_group, topk_group, normalise,
                                       scale_weights, scaling, choice_s[warp], ids, weights,
                                       sel_s[warp]);
    if (ho.slots == 0) return;
    // The routing into every slot, then the `ready` words (after every block's fenced rows and
    // this block's fenced routing), then the load count.
    __syncthreads();
    const int n = tokens * k;
    for (int s = 0; s < ho.slots; ++s)
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            ho.ids[s][i] = ids[i];
            ho.weights[s][i] = __float_as_uint(weights[i]);
        }
    __threadfence_system();
    __syncthreads();
    signal_then_count(ho.words[0], ho.words[1], ho.words[2], ho.words[3], ho.table, ho.at[0],
                      ho.at[1], ho.at[2], ho.at[3], ho.n_words, ids, n, n_exp, ho.counts);
}
// moe_route_logits: k rounds with the weights in registers (route_row<true>); _e64: the top k by
// rank (route_row<false, 2>), for ≤ 64 experts: 9.5 → 5.8–6.0 µs a layer at V2-Lite's router,
// batch 1, on an H200 (scripts/bench/router_bench.cu; at 256 experts the rank costs more than
// the rounds, 27 against 24 µs).
#define ROUTE_LOGITS_ARGS                                                                       \
    const float *x, int tokens, int hidden, const float *w_router, const float *skew,          \
        float *logits, uint32_t *counter, int n_exp, const float *bias, int scoring,           \
        int method, int k, int n_group, int topk_group, int normalise, int scale_weights,      \
        float scaling, uint32_t *ids, float *weights, ROUTE_HANDOFF_ARGS
#define ROUTE_LOGITS_PASS                                                                       \
    x, tokens, hidden, w_router, skew, logits, counter, n_exp, bias, scoring, method, k,       \
        n_group, topk_group, normalise, scale_weights, scaling, ids, weights, ROUTE_HANDOFF_MAKE
extern "C" __global__ void __launch_bounds__(ROUTE_WARPS * 32)
    moe_route_logits(ROUTE_LOGITS_ARGS) {
    route_logits<true>(ROUTE_LOGITS_PASS);
}
extern "C" __global__ void __launch_bounds__(ROUTE_WARPS * 32)
    moe_route_logits_e64(ROUTE_LOGITS_ARGS) {
    route_logits<false, 2>(ROUTE_LOGITS_PASS);
}
#undef ROUTE_LOGITS_ARGS
#undef ROUTE_LOGITS_PASS
#undef ROUTE_HANDOFF_ARGS
#undef ROUTE_HANDOFF_MAKE

// ---------------------------------------------------------------------------------------------
// Grouped routed experts. A step's (token, expert) pairs are sorted by expert slot so that each
// expert's weights are read once for all of its tokens:
//   moe_align:    ids [P] (P = T·k) → per-slot offsets [S+1], sorted[q] = pair p, pos[p] = q.
//   moe_gate_up:  h[q, j] = silu(x[row(q)]·Wg[s, j]) · (x[row(q)]·Wu[s, j])   (f32)
//   moe_down:     y[q, r] = h[q]·Wd[s, r]                                      (f32)
//   moe_combine:  out[t, r] = Σ_j w[t, j] · y[pos[t, j], r], in j order        (f32)
// row(q) = sorted[q] / k_div (k_div = k for device routing, 1 when `sorted` holds rows).

#define ALIGN_MAX_S 1024

// The flags' one spin: until *word reaches v in the cyclic order ((int)(word - v) >= 0, as
// cuStreamWaitValue32 GEQ), polling with acquire loads at system scope every `sleep_ns`; the word
// seen goes to *seen. Returns whether it was reached.
// A gate's wait on a worker's flag can also be released by the host, with no stream involved
// (a stream op to release it could queue behind the very wait it releases): `release`, when not
// null, is a word in pinned host memory (ipc::ReleaseFlag) read every 64 polls, and a wait that
// sees it set gives up (returns false). While such a wait spins, *waiting holds its release
// word's index from `waiting` (both in the same pinned block; 0 once the wait ends): what the
// gate's watch reads to know which worker holds the stream past its deadline.
__device__ __forceinline__ bool wait_or_release(const uint32_t* word, uint32_t v, int sleep_ns,
                                                const uint32_t* release, uint32_t* waiting,
                                                uint32_t* seen) {
    uint32_t w;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(w) : "l"(word) : "memory");
    bool reached = (int)(w - v) >= 0;
    if (reached) {
        if (seen) *seen = w;
        return true;
    }
    const uint32_t tag = (release && waiting) ? (uint32_t)(release - waiting) : 0u;
    if (tag) asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(waiting), "r"(tag) : "memory");
    for (uint32_t i = 1;; ++i) {
        __nanosleep(sleep_ns);
        asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(w) : "l"(word) : "memory");
        if ((int)(w - v) >= 0) {
            reached = true;
            break;
        }
        if (release && (i & 63) == 0) {
            uint32_t r;
            asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(r) : "l"(release) : "memory");
            if (r) break;
        }
    }
    if (tag) asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(waiting), "r"(0u) : "memory");
    if (seen) *seen = w;
    return reached;
}

// An expert worker's wait for the gate's `ready` flag, folded into the first kernel of its call
// (when `wait_word` is not null): thread 0 spins until *wait_word reaches wait_value in the
// cyclic order, stores what it saw to *observed (a released wait sees more, which the gate
// checks), fences, and the block's barrier holds the other threads until then: no launch of
// its own on the call's critical path.
__device__ __forceinline__ void align_wait(const uint32_t* wait_word, uint32_t wait_value,
                                           uint32_t* observed) {
    if (wait_word && threadIdx.x == 0) {
        uint32_t w;
        wait_or_release(wait_word, wait_value, 128, nullptr, nullptr, &w);
        if (observed) *observed = w;
        __threadfence_system();
    }
    __syncthreads();
}

extern "C" __global__ void moe_align(const uint32_t* ids, int pairs, const int* slot_of,
                                     int n_slots, uint32_t* offsets, uint32_t* sorted,
                                     uint32_t* pos, uint32_t* active, const uint32_t* wait_word,
                                     uint32_t wait_value, uint32_t* observed) {
    __shared__ uint32_t cnt[ALIGN_MAX_S];
    __shared__ uint32_t cur[ALIGN_MAX_S];
    pdl_wait();
    pdl_trigger();
    align_wait(wait_word, wait_value, observed);
    for (int s = threadIdx.x; s < n_slots; s += blockDim.x) cnt[s] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int s = slot_of ? slot_of[ids[p]] : (int)ids[p];
        if (s >= 0 && s < n_slots) atomicAdd(&cnt[s], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t acc = 0, used = 0;
        for (int s = 0; s < n_slots; ++s) {
            offsets[s] = acc;
            cur[s] = acc;
            acc += cnt[s];
            if (active && cnt[s]) active[1 + used++] = (uint32_t)s;
        }
        offsets[n_slots] = acc;
        if (active) active[0] = used;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int s = slot_of ? slot_of[ids[p]] : (int)ids[p];
        if (s >= 0 && s < n_slots) {
            const uint32_t q = atomicAdd(&cur[s], 1u);
            sorted[q] = (uint32_t)p;
            pos[p] = q;
        } else {
            pos[p] = 0xffffffffu;
        }
    }
}

// counts[e] += |{p < n : ids[p] = e}| for e < n_experts (ids at or past n_experts left out):
// the gate's per-layer expert load. A histogram per block in shared memory, then one atomic
// per (block, expert) into `counts`; any grid.
extern "C" __global__ void expert_count(const uint32_t* ids, int n, int n_experts,
                                        uint32_t* counts) {
    __shared__ uint32_t cnt[ALIGN_MAX_S];
    for (int e = threadIdx.x; e < n_experts; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < n; p += gridDim.x * blockDim.x) {
        const uint32_t e = ids[p];
        if (e < (uint32_t)n_experts) atomicAdd(&cnt[e], 1u);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < n_experts; e += blockDim.x)
        if (cnt[e]) atomicAdd(&counts[e], cnt[e]);
}

// The flags of device-ordered expert calls (the gate's side). In a CUDA graph the arguments are
// fixed, so each run's call numbers come from `table`, which the host fills before the run; an
// eager call passes its number as `value` and no table. `flag_signal_n` stores table[i] to a
// peer's flag word after everything queued before it (fence, then a release store at system
// scope, as cuStreamWriteValue32 does); `flag_wait_geq` waits, one thread, until the word reaches
// the number in the cyclic order or the host releases it (wait_or_release), then fences so that
// what follows on the stream reads what the peer wrote before its flag.
extern "C" __global__ void flag_wait_geq(const uint32_t* word, const uint32_t* table, int i,
                                         uint32_t value, const uint32_t* release,
                                         uint32_t* waiting) {
    wait_or_release(word, table ? table[i] : value, 256, release, waiting, nullptr);
    __threadfence_system();
}

// Thread 0 of each block waits for word j (of the first n, up to four) to reach table[i_j] or
// for its release flag r_j (wait_or_release; block 0 keeps the `waiting` record), then fences;
// the barrier holds the block's other threads until then.
__device__ __forceinline__ void wait_words_block(const uint32_t* w0, const uint32_t* w1,
                                                 const uint32_t* w2, const uint32_t* w3,
                                                 const uint32_t* table, int i0, int i1, int i2,
                                                 int i3, const uint32_t* r0, const uint32_t* r1,
                                                 const uint32_t* r2, const uint32_t* r3,
                                                 uint32_t* waiting, int n) {
    if (threadIdx.x == 0) {
        const uint32_t* words[4] = {w0, w1, w2, w3};
        const uint32_t* release[4] = {r0, r1, r2, r3};
        const int at[4] = {i0, i1, i2, i3};
        uint32_t* record = blockIdx.x == 0 ? waiting : nullptr;
        for (int j = 0; j < n && j < 4; ++j)
            wait_or_release(words[j], table[at[j]], 128, release[j], record, nullptr);
        __threadfence_system();
    }
    __syncthreads();
}

// Up to four words at once: word j gets table[i_j] (the first n are written).
extern "C" __global__ void flag_signal_n(uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3,
                                         const uint32_t* table, int i0, int i1, int i2, int i3,
                                         int n) {
    __threadfence_system();
    store_from_table(w0, w1, w2, w3, table, i0, i1, i2, i3, n);
}

// After a call's output: *seen = *from (what the wait saw), then `done` = v, released after
// everything queued before (the output) at system scope.
extern "C" __global__ void flag_seen_done(const uint32_t* from, uint32_t* seen, uint32_t* done,
                                         uint32_t v) {
    *seen = *from;
    __threadfence_system();
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(done), "r"(v) : "memory");
}

// out = p0 + p1 + p2 + p3 over n4 float4s (the first `parts` pointers are read): the expert
// workers' f32 partial sums, read where the workers wrote them.
__device__ __forceinline__ void sum_parts(float4* out, const float4* p0, const float4* p1,
                                          const float4* p2, const float4* p3, int parts, int n4) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += gridDim.x * blockDim.x) {
        float4 s = p0[i];
        const float4* more[3] = {p1, p2, p3};
        for (int p = 1; p < parts; ++p) {
            const float4 v = more[p - 1][i];
            s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
        }
        out[i] = s;
    }
}

extern "C" __global__ void add_parts_f32(float4* out, const float4* p0, const float4* p1,
                                         const float4* p2, const float4* p3, int parts, int n4) {
    sum_parts(out, p0, p1, p2, p3, parts, n4);
}

// add_parts_f32 after flag_wait_geq on each part's `done` word (word j against table[i_j],
// released by r_j), in one launch: each block's thread 0 waits for every word, fences, and the
// barrier holds the block's other threads until then (small sums only: every block polls; block
// 0 keeps the `waiting` record).
extern "C" __global__ void wait_add_parts_f32(float4* out, const float4* p0, const float4* p1,
                                              const float4* p2, const float4* p3, int parts, int n4,
                                              const uint32_t* w0, const uint32_t* w1,
                                              const uint32_t* w2, const uint32_t* w3,
                                              const uint32_t* table, int i0, int i1, int i2,
                                              int i3, const uint32_t* r0, const uint32_t* r1,
                                              const uint32_t* r2, const uint32_t* r3,
                                              uint32_t* waiting) {
    wait_words_block(w0, w1, w2, w3, table, i0, i1, i2, i3, r0, r1, r2, r3, waiting, parts);
    sum_parts(out, p0, p1, p2, p3, parts, n4);
}

// norm.cu's add_rms_norm with its f32 delta in up to four parts (the workers' outputs), after
// waiting for each part's `done` word as wait_add_parts_f32 does (thread 0 of each block, then
// the barrier; block 0 keeps the `waiting` record): the gate's wait, sum and next residual add
// and norm in one launch. One block a row (few rows: every block polls).
#define WAIT_ADD_RMS_NORM(NAME, TA, TO)                                                         \
    extern "C" __global__ void NAME(                                                            \
        const float* x, const TA* a, const float* p0, const float* p1, const float* p2,         \
        const float* p3, int parts, const uint32_t* w0, const uint32_t* w1, const uint32_t* w2, \
        const uint32_t* w3, const uint32_t* table, int i0, int i1, int i2, int i3,              \
        const uint32_t* r0, const uint32_t* r1, const uint32_t* r2, const uint32_t* r3,         \
        uint32_t* waiting, float* h, const float* w, TO* out, float* out_f32, int d,            \
        float eps) {                                                                            \
        wait_words_block(w0, w1, w2, w3, table, i0, i1, i2, i3, r0, r1, r2, r3, waiting, parts); \
        add_rms_norm<TA, TO>(x, a, p0, p1, p2, p3, parts, h, w, out, out_f32, d, eps);          \
    }
WAIT_ADD_RMS_NORM(wait_add_rms_norm_f32_f32, float, float)
WAIT_ADD_RMS_NORM(wait_add_rms_norm_f32_bf16, float, bf16)
WAIT_ADD_RMS_NORM(wait_add_rms_norm_bf16_f32, bf16, float)
WAIT_ADD_RMS_NORM(wait_add_rms_norm_bf16_bf16, bf16, bf16)

// Up to eight copies of n_c u32 words from s_c to d_c in one launch (blockIdx.y = c): the
// activations and routing into the expert workers' shared buffers, and out of them, without a
// copy launch each. 16-byte moves where both ends are aligned.
#define COPY_BATCH_ARGS                                                                         \
    const uint32_t *s0, const uint32_t *s1, const uint32_t *s2, const uint32_t *s3,             \
        const uint32_t *s4, const uint32_t *s5, const uint32_t *s6, const uint32_t *s7,         \
        uint32_t *d0, uint32_t *d1, uint32_t *d2, uint32_t *d3, uint32_t *d4, uint32_t *d5,     \
        uint32_t *d6, uint32_t *d7, int n0, int n1, int n2, int n3, int n4, int n5, int n6, int n7
#define COPY_BATCH_PASS s0, s1, s2, s3, s4, s5, s6, s7, d0, d1, d2, d3, d4, d5, d6, d7, n0, n1, n2, n3, n4, n5, n6, n7

__device__ __forceinline__ void copy_batch_block(COPY_BATCH_ARGS) {
    const uint32_t* s = nullptr;
    uint32_t* d = nullptr;
    int n = 0;
    switch (blockIdx.y) {
        case 0: s = s0; d = d0; n = n0; break;
        case 1: s = s1; d = d1; n = n1; break;
        case 2: s = s2; d = d2; n = n2; break;
        case 3: s = s3; d = d3; n = n3; break;
        case 4: s = s4; d = d4; n = n4; break;
        case 5: s = s5; d = d5; n = n5; break;
        case 6: s = s6; d = d6; n = n6; break;
        case 7: s = s7; d = d7; n = n7; break;
        default: return;
    }
    const int step = gridDim.x * blockDim.x;
    int start = 0;
    if ((((uintptr_t)s | (uintptr_t)d) & 15) == 0) {
        const int n4 = n >> 2;
        const uint4* s4 = reinterpret_cast<const uint4*>(s);
        uint4* d4 = reinterpret_cast<uint4*>(d);
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += step) d4[i] = s4[i];
        start = n4 << 2;
    }
    for (int i = start + blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) d[i] = s[i];
}

extern "C" __global__ void copy_batch(COPY_BATCH_ARGS) { copy_batch_block(COPY_BATCH_PASS); }

// copy_batch, then flag_signal_n's stores, in one launch (a decode graph's rows and routing into
// the workers' slots, then their `ready` words): every block fences its copies at system scope
// and counts itself in *counter (0 between launches; one stream's); the last block puts the
// counter back to 0 and stores table[i_j] to word j (the first `words` of them), released at
// system scope, as flag_signal_n does after a copy launch; with `counts`, that block then adds
// the layer's routed ids to the gate's per-layer expert load (signal_then_count), so the load
// needs no expert_count launch of its own.
extern "C" __global__ void copy_batch_signal(COPY_BATCH_ARGS, uint32_t* counter, uint32_t* w0,
                                             uint32_t* w1, uint32_t* w2, uint32_t* w3,
                                             const uint32_t* table, int i0, int i1, int i2,
                                             int i3, int words, const uint32_t* count_ids,
                                             int count_n, int n_experts, uint32_t* counts) {
    __shared__ bool last;
    copy_batch_block(COPY_BATCH_PASS);
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0)
        last = atomicAdd(counter, 1u) == gridDim.x * gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    if (threadIdx.x == 0) {
        *counter = 0u;
        __threadfence_system();
    }
    signal_then_count(w0, w1, w2, w3, table, i0, i1, i2, i3, words, count_ids, count_n,
                      n_experts, counts);
}

// The slot a block of the expert kernels works on: blockIdx.y, or, with `active` (moe_align's
// list: the number of slots with pairs, then those slots ascending), the blockIdx.y-th slot with
// pairs, so that a grid of min(slots, pairs) rows of blocks covers them (at batch 1, 6 of 64
// experts: no grid of mostly idle blocks). -1: no slot for this block.
__device__ __forceinline__ int active_slot(const uint32_t* active) {
    if (!active) return (int)blockIdx.y;
    return blockIdx.y < active[0] ? (int)active[1 + blockIdx.y] : -1;
}

#define MOE_GROUP 8      // tokens sharing one pass over a weight row
#define MOE_WARPS 4      // warps per block
#define MOE_ROWS 16      // output rows per block

template <typename T>
__device__ void moe_gate_up(const T* x, int hidden, const T* w_gu, int inner,
                            const uint32_t* offsets, const uint32_t* active,
                            const uint32_t* sorted, int k_div, float* h_out) {
    const int s = active_slot(active);
    if (s < 0) return;
    const uint32_t beg = offsets[s], end = offsets[s + 1];
    if (beg == end) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunks = hidden / 8;
    for (int j = blockIdx.x * MOE_ROWS + warp; j < min(inner, (int)(blockIdx.x + 1) * MOE_ROWS);
         j += MOE_WARPS) {
        const T* wg = w_gu + ((size_t)2 * s * inner + j) * hidden;
        const T* wu = wg + (size_t)inner * hidden;
        for (uint32_t g0 = beg; g0 < end; g0 += MOE_GROUP) {
            const int n = min((int)(end - g0), MOE_GROUP);
            const T* xr[MOE_GROUP];
#pragma unroll
            for (int i = 0; i < MOE_GROUP; ++i)
                xr[i] = x + (size_t)(sorted[g0 + min(i, n - 1)] / k_div) * hidden;
            float ag[MOE_GROUP], au[MOE_GROUP];
#pragma unroll
            for (int i = 0; i < MOE_GROUP; ++i) ag[i] = au[i] = 0.f;
            for (int c = lane; c < chunks; c += 32) {
                float a[8], b[8];
                load8_stream(wg + c * 8, a);
                load8_stream(wu + c * 8, b);
#pragma unroll
                for (int i = 0; i < MOE_GROUP; ++i) {
                    if (i < n) {
                        float v[8];
                        load8(xr[i] + c * 8, v);
                        ag[i] += dot8(a, v);
                        au[i] += dot8(b, v);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < MOE_GROUP; ++i) {
                if (i < n) {
                    const float gs = warp_sum(ag[i]);
                    const float us = warp_sum(au[i]);
                    if (lane == 0) h_out[(size_t)(g0 + i) * inner + j] = silu(gs) * us;
                }
            }
        }
    }
}

template <typename T>
__device__ void moe_down(const float* h, int inner, const T* w_down, int hidden,
                         const uint32_t* offsets, const uint32_t* active, float* y) {
    const int s = active_slot(active);
    if (s < 0) return;
    const uint32_t beg = offsets[s], end = offsets[s + 1];
    if (beg == end) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunks = inner / 8;
    for (int r = blockIdx.x * MOE_ROWS + warp; r < min(hidden, (int)(blockIdx.x + 1) * MOE_ROWS);
         r += MOE_WARPS) {
        const T* wr = w_down + ((size_t)s * hidden + r) * inner;
        for (uint32_t g0 = beg; g0 < end; g0 += MOE_GROUP) {
            const int n = min((int)(end - g0), MOE_GROUP);
            float acc[MOE_GROUP];
#pragma unroll
            for (int i = 0; i < MOE_GROUP; ++i) acc[i] = 0.f;
            for (int c = lane; c < chunks; c += 32) {
                float a[8];
                load8_stream(wr + c * 8, a);
#pragma unroll
                for (int i = 0; i < MOE_GROUP; ++i) {
                    if (i < n) {
                        float v[8];
                        load8(h + (size_t)(g0 + i) * inner + c * 8, v);
                        acc[i] += dot8(a, v);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < MOE_GROUP; ++i) {
                if (i < n) {
                    const float v = warp_sum(acc[i]);
                    if (lane == 0) y[(size_t)(g0 + i) * hidden + r] = v;
                }
            }
        }
    }
}


// bf16 experts on the tensor cores (mma.sync m16n8k16, f32 accumulation): a warp computes 16
// weight rows × 8 tokens per instruction. Each lane loads 16 contiguous bytes of a weight row and
// of a token's activations per 32-wide k block and feeds them to two MMAs; the MMA's k order is
// a permutation of memory order, the same for both operands (a fragment's k positions depend only
// on lane % 4), so the dot products are unchanged.

__device__ __forceinline__ uint4 ldcs16(const bf16* p) {
    return __ldcs(reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ uint4 ld16(const bf16* p) { return *reinterpret_cast<const uint4*>(p); }

// c += A[16 rows, 32 k] · B[32 k, 8 tokens] for one 32-wide k block: lo/hi are this lane's 16
// bytes of rows g and g+8, b its 16 bytes of token g.
__device__ __forceinline__ void mma_k32(float c[4], uint4 lo, uint4 hi, uint4 b) {
    mma_bf16(c, lo.x, hi.x, lo.y, hi.y, b.x, b.y);
    mma_bf16(c, lo.z, hi.z, lo.w, hi.w, b.z, b.w);
}

// Work split: a block's 4 warps take 2 tiles of 16 rows, each tile's k range in two halves
// (warps 2i and 2i+1), added through shared memory in a fixed order. Halving the k range doubles
// the number of warp tasks, so the last wave of a grid that is ~1.3 waves deep idles less.

// The k blocks (of 32) of half `khalf` of `n32` blocks.
__device__ __forceinline__ void k_half(int n32, int khalf, int& kb0, int& kb1) {
    const int mid = (n32 + 1) / 2;
    kb0 = khalf ? mid : 0;
    kb1 = khalf ? n32 : mid;
}

// Loads run CHUNK_STAGES − 1 chunks of 64 k ahead of the MMAs (a ring of registers, slot i % CS
// for chunk i; the policy's: 2 for bf16, as many bytes as the earlier 4 blocks of 32, and for
// e4m3, where a deeper ring cost more in registers (blocks an SM) than it gave; 4 for INT4):
// what a decode-size grid (a few warps per SM) needs to stream weights at the memory's speed
// (scripts/bench/decode_quant.cu measures the depths). The MMAs run in k order, the same as
// with any depth: the sums do not depend on it.

// The weights' side of the two kernels below, as a policy W: `Elem` is what a weight is stored
// as, `Raw` what a lane loads of one row for one 32-wide k block (its 8 k positions), `load` that
// load, and `frag` the 16 bytes of bf16 the MMA takes from it (at k, for the rows W::at named:
// matrix m's block scales where the weights have them). MmaBf16 is the identity; the FP8 form
// (experts_fp8.cu) dequantises e4m3 with the row's block scale.
//
// The kernels walk k in chunks of 64 (then a last 32-wide block where K % 64 == 32): in a chunk,
// lane t of a row holds the 16 values t·16 … t·16 + 15 (`Chunk`, `load2`; `frags2` gives the
// bf16 of its first and last 8, for two MMAs of 32 k; x is read the same way), which takes
// half as many loads for e4m3 and half the loop's iterations for bf16 as 8 values of a 32-wide
// block (dense.cu's measure, 2026-11-28); `CHUNK_STAGES` chunks in flight.
//
// A policy is made per weight row (`at`: row r of matrix m, which has `rows` rows of K values),
// so that formats with per-row scales (INT4's groups) and per-block ones (e4m3's 128 × 128) are
// alike to the walk; `K_PER_ELEM` values share one stored `Elem` (two nibbles a byte for INT4),
// and `w_at` finds value k of a row. `load2(p, k)` may load what decoding the chunk at k needs
// besides its values (INT4's group scale and zero point) into the `Chunk`.
//
// `EPILOGUE`: `frags2` gives the stored values unscaled (exact in bf16); the walk sums each scale
// group (`group_size()` columns, a multiple of 64) into accumulators of its own and adds them
// times `epi_scale(chunk, k)` (rows g and g + 8: each row's own) at the group's end, or at the
// warp's k_end. `PERMUTE_X`: `frags2` gives a lane's values in another pair order, and
// `permute_x` puts the activations' fragment in the same one (the MMA's k order is any order
// both operands share).
//
// What a weight format needs besides its values, passed through unchanged: e4m3's block scales,
// INT4's group scales, zero points (null: symmetric) and group size (experts_int4.cu).
struct QuantArgs {
    const float* scales;
    const uint8_t* zeros;
    int group_shift;  // log2 of INT4's group size
};

template <typename W>
__device__ __forceinline__ const typename W::Elem* w_at(const typename W::Elem* p, ptrdiff_t k) {
    return p + k / W::K_PER_ELEM;
}

// What a policy that scales each value (every one but INT4's in groups of 64+) has of the
// EPILOGUE / PERMUTE_X interface: neither, so the walk sums into c directly.
struct ScaledValues {
    static constexpr bool EPILOGUE = false, PERMUTE_X = false;
    // OWN_WALK: the policy walks its chunks itself (`W::walk<NA>`, chunk_walk's arguments):
    // scripts/bench/decode_quant.cu's W8A8 forms, whose MMAs take e4m3 activations too.
    static constexpr bool OWN_WALK = false;
    static constexpr int CHUNK_K = 64;     // chunk_walk's chunks: 64 k wide
    __device__ static uint4 permute_x(uint4 x) { return x; }
    __device__ int group_size() const { return 1 << 30; }
    template <typename C>
    __device__ float epi_scale(const C&, int) const {
        return 1.f;
    }
};

struct MmaBf16 : ScaledValues {
    typedef bf16 Elem;
    typedef uint4 Raw;
    struct Chunk {
        uint4 a, b;
    };
    static constexpr int CHUNK_STAGES = 2;
    static constexpr int K_PER_ELEM = 1;
    __device__ static MmaBf16 at(const QuantArgs&, size_t, int, int, int) { return {}; }
    __device__ static Raw load(const bf16* p) { return ldcs16(p); }
    __device__ uint4 frag(Raw r, int) const { return r; }
    __device__ Chunk load2(const bf16* p, int) const { return {ldcs16(p), ldcs16(p + 8)}; }
    __device__ void frags2(const Chunk& r, int, uint4& lo, uint4& hi) const {
        lo = r.a, hi = r.b;
    }
};

// One warp's k chunks [k_begin, k_end) (multiples of W::CHUNK_K: 64, or 128 for the wide FP8
// and INT4 policies, whose lanes then hold 32 values of a chunk) for NA pairs of weight rows,
// W's CHUNK_STAGES chunks in flight: pair a's rows g and g + 8 start at w[2a] and w[2a + 1]
// (each at its lane's t·16), with their policies pol[2a] and pol[2a + 1], summed into c[a]; x's
// row at xr (also at t·16).
// The MMAs run in k order, pair by pair within a chunk. Shared by the expert kernels below and
// dense.cu.
// The ring of loads the walks share: chunks of CK at k_begin … k_end, CS in flight: `load(slot,
// k)` fills ring slot `slot` with the chunk at k, CS − 1 chunks ahead of `use(slot, k)`; chunk i
// lives in slot i % CS.
template <int CS, int CK, typename Load, typename Use>
__device__ __forceinline__ void ring_walk(int k_begin, int k_end, Load&& load, Use&& use) {
#pragma unroll
    for (int i = 0; i < CS - 1; ++i)
        if (k_begin + i * CK < k_end) load(i, k_begin + i * CK);
    for (int k = k_begin; k < k_end; k += CS * CK) {
#pragma unroll
        for (int i = 0; i < CS; ++i) {
            const int kk = k + i * CK, kn = kk + (CS - 1) * CK;
            if (kn < k_end) load((i + CS - 1) % CS, kn);
            if (kk < k_end) use(i, kk);
        }
    }
}

template <typename W, int NA>
__device__ __forceinline__ void chunk_walk(const typename W::Elem* const (&w)[2 * NA],
                                           const W (&pol)[2 * NA], const bf16* xr, int k_begin,
                                           int k_end, float (&c)[NA][4]) {
    constexpr int CS = W::CHUNK_STAGES;
    if (k_begin >= k_end) return;
    if constexpr (W::OWN_WALK) {
        W::template walk<NA>(w, pol, xr, k_begin, k_end, c);
        return;
    }
    // W::EPILOGUE: the fragments are the stored values unscaled (exact in bf16), summed per
    // scale group into cb and scaled into c at each group's end (`epi_scale` of rows g and
    // g + 8, each its own).
    float cb[NA][4];
    if constexpr (W::EPILOGUE) {
#pragma unroll
        for (int a = 0; a < NA; ++a)
#pragma unroll
            for (int e = 0; e < 4; ++e) cb[a][e] = 0.f;
    }
    // After the chunk of `width` at kk (rows' chunks r): at a scale group's end (or the walk's),
    // the group's sums times each row's scale into c.
    auto group_end = [&](const auto& r, int kk, int width) {
        if constexpr (W::EPILOGUE) {
            if (((kk + width) & (pol[0].group_size() - 1)) == 0 || kk + width >= k_end) {
#pragma unroll
                for (int a = 0; a < NA; ++a) {
                    const float s0 = pol[2 * a].epi_scale(r[2 * a], kk);
                    const float s1 = pol[2 * a + 1].epi_scale(r[2 * a + 1], kk);
                    c[a][0] = fmaf(cb[a][0], s0, c[a][0]);
                    c[a][1] = fmaf(cb[a][1], s0, c[a][1]);
                    c[a][2] = fmaf(cb[a][2], s1, c[a][2]);
                    c[a][3] = fmaf(cb[a][3], s1, c[a][3]);
#pragma unroll
                    for (int e = 0; e < 4; ++e) cb[a][e] = 0.f;
                }
            }
        }
    };
    // One chunk's MMAs (rows' chunks r, x's 16 values x0 and x1 at kk).
    // (Generic, so that it is compiled only for the walks that call it.)
    auto consume = [&](const auto& r, uint4 x0, uint4 x1, int kk) {
        if constexpr (W::PERMUTE_X) {
            x0 = W::permute_x(x0);
            x1 = W::permute_x(x1);
        }
#pragma unroll
        for (int a = 0; a < NA; ++a) {
            uint4 a0, a1, h0, h1;
            pol[2 * a].frags2(r[2 * a], kk, a0, a1);
            pol[2 * a + 1].frags2(r[2 * a + 1], kk, h0, h1);
            if constexpr (W::EPILOGUE) {
                mma_k32(cb[a], a0, h0, x0);
                mma_k32(cb[a], a1, h1, x1);
            } else {
                mma_k32(c[a], a0, h0, x0);
                mma_k32(c[a], a1, h1, x1);
            }
        }
        group_end(r, kk, 64);
    };
    if constexpr (W::CHUNK_K == 128) {
        // 128-wide chunks (k_begin, k_end multiples of 128): lane t holds the 32 consecutive
        // values at t·32 of each row's chunk (the callers' pointers are at t·16: t·16 more) and
        // of x's, four MMA steps of 32 a row pair. An e4m3 row's chunk is then 128 bytes, a
        // whole L2 line, as a bf16 row's 64-wide chunk is; at 64 wide each e4m3 request is half
        // a line. W::frags4 gives the four steps' fragments. (With W::EPILOGUE, a chunk lies in
        // one scale group: groups of 128 or more.)
        const int t16 = (threadIdx.x & 3) * 16;
        typename W::Chunk r[CS][2 * NA];
        uint4 b[CS][4];
        auto load = [&](int i, int kn) {
#pragma unroll
            for (int q = 0; q < 2 * NA; ++q) r[i][q] = pol[q].load2(w_at<W>(w[q], kn + t16), kn);
#pragma unroll
            for (int v = 0; v < 4; ++v) b[i][v] = ld16(xr + kn + t16 + 8 * v);
        };
        ring_walk<CS, 128>(k_begin, k_end, load, [&](int i, int kk) {
            uint4 xv[4];
#pragma unroll
            for (int v = 0; v < 4; ++v) xv[v] = W::PERMUTE_X ? W::permute_x(b[i][v]) : b[i][v];
#pragma unroll
            for (int a = 0; a < NA; ++a) {
                uint4 fa[4], fh[4];
                pol[2 * a].frags4(r[i][2 * a], kk, fa);
                pol[2 * a + 1].frags4(r[i][2 * a + 1], kk, fh);
#pragma unroll
                for (int v = 0; v < 4; ++v)
                    mma_k32(W::EPILOGUE ? cb[a] : c[a], fa[v], fh[v], xv[v]);
            }
            group_end(r[i], kk, 128);
        });
    } else {
        typename W::Chunk r[CS][2 * NA];
        uint4 b[CS][2];
        ring_walk<CS, 64>(
            k_begin, k_end,
            [&](int j, int kn) {
#pragma unroll
                for (int q = 0; q < 2 * NA; ++q) r[j][q] = pol[q].load2(w_at<W>(w[q], kn), kn);
                b[j][0] = ld16(xr + kn), b[j][1] = ld16(xr + kn + 8);
            },
            [&](int i, int kk) { consume(r[i], b[i][0], b[i][1], kk); });
    }
}

// h[q, j] = silu(x·Wg[j]) · (x·Wu[j]) for 16 columns j per tile; h in bf16 (what the unfused
// bf16 path stores too). Needs hidden % 32 == 0 and inner % 16 == 0. `qa`: the weights'
// scales (W's; unused for bf16).
template <typename W>
__device__ __forceinline__ void gate_up_mma(const bf16* x, int hidden,
                                            const typename W::Elem* w_gu, const QuantArgs& qa,
                                            int inner, const uint32_t* offsets,
                                            const uint32_t* active, const uint32_t* sorted,
                                            int k_div, bf16* h_out) {
    __shared__ float other[2][32][8];
    pdl_wait();
    pdl_trigger();
    const int s = active_slot(active);
    if (s < 0) return;
    const uint32_t beg = offsets[s], end = offsets[s + 1];
    if (beg == end) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tile = warp >> 1, khalf = warp & 1;
    const int g = lane >> 2, t = lane & 3;
    const int j0 = (blockIdx.x * 2 + tile) * 16;
    const bool valid = j0 < inner;  // every warp still takes part in the barriers
    const int jc = valid ? j0 : 0;
    typedef typename W::Elem E;
    const E* wg0 = w_at<W>(w_gu, ((size_t)2 * s * inner + jc + g) * hidden + t * 16);
    const E* wg1 = w_at<W>(wg0, (size_t)8 * hidden);
    const E* wu0 = w_at<W>(wg0, (size_t)inner * hidden);
    const E* wu1 = w_at<W>(wu0, (size_t)8 * hidden);
    const W pols[4] = {W::at(qa, (size_t)2 * s, inner, jc + g, hidden),
                       W::at(qa, (size_t)2 * s, inner, jc + g + 8, hidden),
                       W::at(qa, (size_t)2 * s + 1, inner, jc + g, hidden),
                       W::at(qa, (size_t)2 * s + 1, inner, jc + g + 8, hidden)};
    int kb0, kb1;
    k_half(hidden / W::CHUNK_K, khalf, kb0, kb1);
    const int k_begin = kb0 * W::CHUNK_K, k_end = kb1 * W::CHUNK_K;
    // A last 32-wide block (hidden % 64 == 32): the second half's, 8 values a lane at t·8.
    const int k_tail = (hidden / 64) * 64;
    const bool tail = khalf && k_tail < hidden;
    const E* const rows[4] = {wg0, wg1, wu0, wu1};
    for (uint32_t g0 = beg; g0 < end; g0 += 8) {
        const int n = min((int)(end - g0), 8);
        const bf16* xr = x + (size_t)(sorted[g0 + min(g, n - 1)] / k_div) * hidden + t * 16;
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        float(&cg)[4] = acc[0];
        float(&cu)[4] = acc[1];
        if (valid) chunk_walk<W, 2>(rows, pols, xr, k_begin, k_end, acc);
        if (valid && tail) {
            const int o = k_tail - t * 8;  // from t·16 to t·8 into the block at k_tail
            const uint4 bt = ld16(xr + o);
            mma_k32(cg, pols[0].frag(W::load(w_at<W>(wg0, o)), k_tail),
                    pols[1].frag(W::load(w_at<W>(wg1, o)), k_tail), bt);
            mma_k32(cu, pols[2].frag(W::load(w_at<W>(wu0, o)), k_tail),
                    pols[3].frag(W::load(w_at<W>(wu1, o)), k_tail), bt);
        }
        if (khalf) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                other[tile][lane][e] = cg[e];
                other[tile][lane][4 + e] = cu[e];
            }
        }
        __syncthreads();
        if (!khalf && valid) {
            // c0, c1: rows g, tokens 2t, 2t+1; c2, c3: row g + 8, same tokens.
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int tok = 2 * t + (e & 1), row = g + (e >> 1) * 8;
                const float gs = cg[e] + other[tile][lane][e];
                const float us = cu[e] + other[tile][lane][4 + e];
                if (tok < n)
                    h_out[(size_t)(g0 + tok) * inner + j0 + row] = __float2bfloat16(silu(gs) * us);
            }
        }
        __syncthreads();
    }
}

// The combine folded into the down kernel (a decode step's few tokens): `counters` (null: no
// fold) holds a word per 32-column block of the grid, 0 between launches; each block counts
// itself after its `y` is out, and the last of a column block's blocks sums those columns of
// every token, `out[t, r] = Σ_j w[j] · y[pos[j], r]` over t's entries t·k..t·k+k in entry
// order, as moe_combine does (the same fmaf chain from 0: the same bits), then puts the word
// back to 0. The counters belong to one stream (a launch at a time).
// With `done` (an expert worker's device-ordered call), the call's end is signalled here too,
// as flag_seen_done would in a launch of its own: `counters[gridDim.x]` counts the column
// blocks whose combine is out, and the last one's block copies *seen_from to *seen, then stores
// `done_value` to *done released at system scope after every block's fenced writes.
struct CombineTail {
    const uint32_t* pos;
    const float* w;
    int tokens;
    int k;
    float* out;
    uint32_t* counters;
    const uint32_t* seen_from;
    uint32_t* seen;
    uint32_t* done;
    uint32_t done_value;
};

__device__ __forceinline__ void combine_tail(const CombineTail& c, const float* y, int hidden) {
    __shared__ bool last;
    if (!c.counters) return;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(c.counters + blockIdx.x, 1u) == gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    if (threadIdx.x == 0) c.counters[blockIdx.x] = 0u;
    __threadfence();
    const int r0 = blockIdx.x * 32;
    for (int i = threadIdx.x; i < c.tokens * 32; i += blockDim.x) {
        const int t = i >> 5, r = r0 + (i & 31);
        if (r >= hidden) continue;
        float sum = 0.f;
        for (int j = t * c.k; j < t * c.k + c.k; ++j) {
            const uint32_t q = c.pos[j];
            if (q != 0xffffffffu) sum = fmaf(c.w[j], __ldcg(y + (size_t)q * hidden + r), sum);
        }
        c.out[(size_t)t * hidden + r] = sum;
    }
    if (!c.done) return;
    __shared__ bool finish;
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) finish = atomicAdd(c.counters + gridDim.x, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!finish || threadIdx.x != 0) return;
    c.counters[gridDim.x] = 0u;
    __threadfence_system();
    *c.seen = *c.seen_from;
    __threadfence_system();
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(c.done), "r"(c.done_value) : "memory");
}

// y[q, r] = h[q]·Wd[r] for 16 rows r per tile, f32 out. Needs inner % 32 == 0, hidden % 16 == 0.
// With `tail.counters`, also the combine of y (above).
template <typename W>
__device__ __forceinline__ void down_mma(const bf16* h, int inner,
                                         const typename W::Elem* w_down, const QuantArgs& qa,
                                         int hidden, const uint32_t* offsets,
                                         const uint32_t* active, float* y,
                                         const CombineTail& tail) {
    __shared__ float other[2][32][4];
    pdl_wait();
    pdl_trigger();
    const int s = active_slot(active);
    // Every block goes on to the combine's count, with pairs or without.
    if (s >= 0) {
        const uint32_t beg = offsets[s], end = offsets[s + 1];
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        const int tile = warp >> 1, khalf = warp & 1;
        const int g = lane >> 2, t = lane & 3;
        const int r0 = (blockIdx.x * 2 + tile) * 16;
        const bool valid = r0 < hidden;
        const int rc = valid ? r0 : 0;
        const typename W::Elem* w0 = w_at<W>(w_down, ((size_t)s * hidden + rc + g) * inner + t * 16);
        const typename W::Elem* w1 = w_at<W>(w0, (size_t)8 * inner);
        int kb0, kb1;
        k_half(inner / W::CHUNK_K, khalf, kb0, kb1);
        const int k_begin = kb0 * W::CHUNK_K, k_end = kb1 * W::CHUNK_K;
        const int k_tail = (inner / 64) * 64;
        const bool tail = khalf && k_tail < inner;
        const typename W::Elem* const rows[2] = {w0, w1};
        const W pols[2] = {W::at(qa, (size_t)s, hidden, rc + g, inner),
                           W::at(qa, (size_t)s, hidden, rc + g + 8, inner)};
        for (uint32_t g0 = beg; g0 < end; g0 += 8) {
            const int n = min((int)(end - g0), 8);
            const bf16* hr = h + (size_t)(g0 + min(g, n - 1)) * inner + t * 16;
            float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
            float(&c)[4] = acc[0];
            if (valid) chunk_walk<W, 1>(rows, pols, hr, k_begin, k_end, acc);
            if (valid && tail) {
                const int o = k_tail - t * 8;
                mma_k32(c, pols[0].frag(W::load(w_at<W>(w0, o)), k_tail),
                        pols[1].frag(W::load(w_at<W>(w1, o)), k_tail), ld16(hr + o));
            }
            if (khalf) {
#pragma unroll
                for (int e = 0; e < 4; ++e) other[tile][lane][e] = c[e];
            }
            __syncthreads();
            if (!khalf && valid) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int tok = 2 * t + (e & 1), row = g + (e >> 1) * 8;
                    if (tok < n)
                        y[(size_t)(g0 + tok) * hidden + r0 + row] = c[e] + other[tile][lane][e];
                }
            }
            __syncthreads();
        }
    }
    combine_tail(tail, y, hidden);
}

extern "C" __global__ void moe_gate_up_mma(const bf16* x, int hidden, const bf16* w_gu, int inner,
                                           const uint32_t* offsets, const uint32_t* active,
                                           const uint32_t* sorted, int k_div, bf16* h_out) {
    gate_up_mma<MmaBf16>(x, hidden, w_gu, QuantArgs{}, inner, offsets, active, sorted, k_div,
                         h_out);
}
extern "C" __global__ void moe_down_mma(const bf16* h, int inner, const bf16* w_down, int hidden,
                                        const uint32_t* offsets, const uint32_t* active,
                                        float* y, const uint32_t* pos, const float* w, int tokens,
                                        int k, float* out, uint32_t* counters,
                                        const uint32_t* seen_from, uint32_t* seen,
                                        uint32_t* done, uint32_t done_value) {
    down_mma<MmaBf16>(h, inner, w_down, QuantArgs{}, hidden, offsets, active, y,
                      CombineTail{pos, w, tokens, k, out, counters, seen_from, seen, done,
                                  done_value});
}

#define MOE_KERNELS(SUFFIX, T)                                                                  \
    extern "C" __global__ void moe_gate_up_##SUFFIX(                                            \
        const T* x, int hidden, const T* w_gu, int inner, const uint32_t* offsets,               \
        const uint32_t* active, const uint32_t* sorted, int k_div, float* h_out) {               \
        moe_gate_up<T>(x, hidden, w_gu, inner, offsets, active, sorted, k_div, h_out);          \
    }                                                                                           \
    extern "C" __global__ void moe_down_##SUFFIX(const float* h, int inner, const T* w_down,    \
                                                 int hidden, const uint32_t* offsets,            \
                                                 const uint32_t* active, float* y) {             \
        moe_down<T>(h, inner, w_down, hidden, offsets, active, y);                              \
    }
MOE_KERNELS(f32, float)
MOE_KERNELS(bf16, bf16)

// out[t, r] = Σ_j w[j] · y[pos[j], r] over token t's entries j: t·k..t·k+k when row_ptr is null,
// row_ptr[t]..row_ptr[t+1] otherwise. pos = 0xffffffff skips an entry (an expert not held here).
// V = float4 (moe_combine4) takes four columns a thread with 16-byte accesses: `hidden` then
// counts float4s, and y and out are 16-byte aligned (y 8-byte for bf16). Same sums, in the same
// entry order. The _bf16 forms read y in bf16 (the grouped GEMM's output), the sums in f32.
__device__ __forceinline__ void fma_cols(float w, float v, float& s) { s = fmaf(w, v, s); }
__device__ __forceinline__ void fma_cols(float w, const float4& v, float4& s) {
    s.x = fmaf(w, v.x, s.x);
    s.y = fmaf(w, v.y, s.y);
    s.z = fmaf(w, v.z, s.z);
    s.w = fmaf(w, v.w, s.w);
}
__device__ __forceinline__ float cols_of(float v) { return v; }
__device__ __forceinline__ float cols_of(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float4 cols_of(float4 v) { return v; }
__device__ __forceinline__ float4 cols_of(uint2 v) {  // four bf16
    return make_float4(__uint_as_float(v.x << 16), __uint_as_float(v.x & 0xffff0000u),
                       __uint_as_float(v.y << 16), __uint_as_float(v.y & 0xffff0000u));
}
// Y: y's element (float or bf16 a column; float4 or uint2, four bf16, for four columns);
// V: the f32 sum's (float or float4).
template <typename Y, typename V>
__device__ __forceinline__ void moe_combine_cols(const Y* y, int hidden, const uint32_t* pos,
                                                 const float* w, const uint32_t* row_ptr, int k,
                                                 V* out) {
    pdl_wait();
    pdl_trigger();
    const size_t t = blockIdx.x;
    const uint32_t beg = row_ptr ? row_ptr[t] : (uint32_t)(t * k);
    const uint32_t end = row_ptr ? row_ptr[t + 1] : (uint32_t)(t * k + k);
    for (int r = blockIdx.y * blockDim.x + threadIdx.x; r < hidden; r += gridDim.y * blockDim.x) {
        V sum{};
        for (uint32_t j = beg; j < end; ++j) {
            const uint32_t q = pos[j];
            if (q != 0xffffffffu) fma_cols(w[j], cols_of(y[(size_t)q * hidden + r]), sum);
        }
        out[t * hidden + r] = sum;
    }
}
#define MOE_COMBINE(NAME, Y, V)                                                                   \
    extern "C" __global__ void NAME(const Y* y, int hidden, const uint32_t* pos, const float* w,  \
                                    const uint32_t* row_ptr, int k, V* out) {                    \
        moe_combine_cols<Y, V>(y, hidden, pos, w, row_ptr, k, out);                              \
    }
MOE_COMBINE(moe_combine, float, float)
MOE_COMBINE(moe_combine_bf16, bf16, float)
MOE_COMBINE(moe_combine4, float4, float4)
MOE_COMBINE(moe_combine4_bf16, uint2, float4)

// ---------------------------------------------------------------------------------------------
// Prefill-sized routed experts: a grouped GEMM over padded per-expert segments (the
// `moe_align_block_size` idea). moe_align_blocks sorts a step's (token, expert) pairs by slot
// into segments padded to GG_BM rows, one expert slot per GG_BM-row block (0xffffffff past the
// last block), with no host synchronisation: the grid is sized by an upper bound on the block
// count (pairs / GG_BM + slots) and surplus blocks exit. Then one launch per projection for all
// experts, each block a GG_BM × GG_BN tile on the tensor cores (mma.sync m16n8k16 bf16, f32
// accumulation) fed by a multi-stage cp.async pipeline through swizzled shared memory:
//   moe_gg_gate_up: h[q, j] = silu(x[row(q)]·Wg[s, j]) · (x[row(q)]·Wu[s, j])   (bf16, as the
//                   decode kernels store it); a tile holds 64 gate and the same 64 up columns.
//   moe_gg_down:    y[q, r] = h[q]·Wd[s, r]      (bf16: an expert's output in the compute dtype,
//                   as HF transformers' bf16 experts return it; the combine sums in f32)
// Padding rows read zeros and are never combined. moe_combine then adds each token's k entries
// in a fixed order (so the result does not depend on scheduling).

#define GG_BM 64
#define GG_BN 128
#define GG_NONE 0xffffffffu

// Pair p goes to slot slot_of[ids[p]] (ids[p] itself when slot_of is null; out of range: not
// held here, pos[p] = GG_NONE); its token row is pair_rows[p], or p / k_div when that is null.
// Segments are padded to `bm` rows (the GEMM's block rows).
// Out: sorted_rows [max_blocks·bm] (GG_NONE for padding), block_slot [max_blocks], pos [P].
extern "C" __global__ void moe_align_blocks(const uint32_t* ids, int pairs, const int* slot_of,
                                            int n_slots, const uint32_t* pair_rows, int k_div,
                                            int max_blocks, int bm, uint32_t* sorted_rows,
                                            uint32_t* block_slot, uint32_t* pos,
                                            const uint32_t* wait_word, uint32_t wait_value,
                                            uint32_t* observed) {
    __shared__ uint32_t cnt[ALIGN_MAX_S];
    __shared__ uint32_t cur[ALIGN_MAX_S];
    __shared__ uint32_t start[ALIGN_MAX_S + 1];
    align_wait(wait_word, wait_value, observed);
    for (int s = threadIdx.x; s < n_slots; s += blockDim.x) cnt[s] = 0;
    for (int i = threadIdx.x; i < max_blocks * bm; i += blockDim.x) sorted_rows[i] = GG_NONE;
    for (int b = threadIdx.x; b < max_blocks; b += blockDim.x) block_slot[b] = GG_NONE;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int s = slot_of ? slot_of[ids[p]] : (int)ids[p];
        if (s >= 0 && s < n_slots) atomicAdd(&cnt[s], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t acc = 0;
        for (int s = 0; s < n_slots; ++s) {
            start[s] = acc;
            cur[s] = acc;
            acc += (cnt[s] + bm - 1) / bm * bm;
        }
        start[n_slots] = acc;
    }
    __syncthreads();
    for (int s = threadIdx.x; s < n_slots; s += blockDim.x)
        for (uint32_t b = start[s] / bm; b < start[s + 1] / bm; ++b) block_slot[b] = s;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int s = slot_of ? slot_of[ids[p]] : (int)ids[p];
        if (s >= 0 && s < n_slots) {
            const uint32_t q = atomicAdd(&cur[s], 1u);
            sorted_rows[q] = pair_rows ? pair_rows[p] : (uint32_t)(p / k_div);
            pos[p] = q;
        } else {
            pos[p] = GG_NONE;
        }
    }
}

// Shared-memory tile of rows × BK bf16: 16-byte chunk c of row r sits at chunk c ^ f(r), so the
// 8 rows an ldmatrix phase reads fall in 8 different bank groups (BK 32: two rows share a
// 128-byte line; BK 64: one row is a line).
template <int BK> __device__ __forceinline__ int gg_off(int r, int c) {
    if (BK == 64) return r * 64 + ((c ^ (r & 7)) << 3);
    return r * 32 + ((c ^ ((r >> 1) & 3)) << 3);
}

// The pieces of a grouped-GEMM tile that moe_gg and its FP8 form (experts_fp8.cu) share.
// The activations' 16-byte chunks this thread copies into a BM × BK tile: tile row r is
// x[sorted_rows[q]] for gate/up (GG_NONE padding: zeros) or h[q] for down, q = blk · BM + r.
template <bool GATE_UP, int BM, int BK, int THREADS, int A_PER>
__device__ __forceinline__ void gg_a_tiles(const bf16* a, int K, const uint32_t* sorted_rows,
                                           uint32_t blk, int tid, const bf16* (&asrc)[A_PER],
                                           bool (&aok)[A_PER], int (&aoff)[A_PER]) {
    constexpr int CH = BK / 8;
#pragma unroll
    for (int i = 0; i < A_PER; ++i) {
        const int id = tid + i * THREADS, r = id / CH, c = id % CH;
        aoff[i] = gg_off<BK>(r, c);
        const uint32_t q = blk * BM + r;
        if (GATE_UP) {
            const uint32_t row = sorted_rows[q];
            aok[i] = row != GG_NONE;
            asrc[i] = a + (size_t)(aok[i] ? row : 0) * K + c * 8;
        } else {
            aok[i] = true;
            asrc[i] = a + (size_t)q * K + c * 8;
        }
    }
}

// One BK-wide k step of a warp's (FM·16) × (FN·8) tile: acc += A[warp rows] · B[warp columns]ᵀ,
// both bf16 tiles in shared memory laid out by gg_off.
template <int BK, int FM, int FN, int TM, int TN>
__device__ __forceinline__ void gg_k_step(const bf16* A, const bf16* B, int wm, int wn, int lane,
                                          float (&acc)[FM][FN][4]) {
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
        uint32_t af[FM][4];
#pragma unroll
        for (int mi = 0; mi < FM; ++mi)
            ldmatrix_x4(af[mi], A + gg_off<BK>(wm * TM + mi * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
        for (int np = 0; np < FN / 2; ++np) {
            uint32_t bf[4];
            ldmatrix_x4(bf, B + gg_off<BK>(wn * TN + np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                           kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
            for (int mi = 0; mi < FM; ++mi) {
                mma_bf16(acc[mi][2 * np], af[mi][0], af[mi][1], af[mi][2], af[mi][3], bf[0], bf[1]);
                mma_bf16(acc[mi][2 * np + 1], af[mi][0], af[mi][1], af[mi][2], af[mi][3], bf[2], bf[3]);
            }
        }
    }
}

// A warp's tile to memory in bf16, padding rows left out: gate/up as SiLU(gate) · up into h
// (a warp's first FN/2 fragments are gate columns, the next FN/2 the same up columns), down
// into y.
template <bool GATE_UP, int BM, int FM, int FN, int TM, int TN>
__device__ __forceinline__ void gg_store(const float (&acc)[FM][FN][4], uint32_t blk, int wm,
                                         int wn, int lane, int n0, int N,
                                         const uint32_t* sorted_rows, void* out) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mi = 0; mi < FM; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const size_t q = (size_t)blk * BM + wm * TM + mi * 16 + g + half * 8;
            if (sorted_rows[q] == GG_NONE) continue;  // padding: never read
            if (GATE_UP) {
                bf16* h = reinterpret_cast<bf16*>(out);
#pragma unroll
                for (int ni = 0; ni < FN / 2; ++ni) {
                    const int j = n0 + wn * (TN / 2) + ni * 8 + 2 * t4;
                    if (j < N) {
                        const float h0 = silu(acc[mi][ni][2 * half]) * acc[mi][ni + FN / 2][2 * half];
                        const float h1 =
                            silu(acc[mi][ni][2 * half + 1]) * acc[mi][ni + FN / 2][2 * half + 1];
                        *reinterpret_cast<uint32_t*>(h + q * N + j) = pack_bf16(h0, h1);
                    }
                }
            } else {
                bf16* y = reinterpret_cast<bf16*>(out);
#pragma unroll
                for (int ni = 0; ni < FN; ++ni) {
                    const int r = n0 + wn * TN + ni * 8 + 2 * t4;
                    if (r < N)
                        *reinterpret_cast<uint32_t*>(y + q * N + r) =
                            pack_bf16(acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
                }
            }
        }
    }
}

// Tile row n of a grouped product's weight tile (n0 its first column) → the weight row it reads
// (`ok` false past the projection's N rows: the row reads zeros), with that row's matrix m and
// row r within it (for block scales). Gate/up tiles take, per TN rows, TN/2 gate columns then
// the same TN/2 up columns; slot s's gate rows are matrix 2s, its up rows 2s + 1, of N rows
// each; down's matrix s has N rows.
template <bool GATE_UP, int TN>
__device__ __forceinline__ size_t gg_weight_row(int n, int n0, uint32_t s, int N, bool& ok,
                                                size_t& m, int& r) {
    if (GATE_UP) {
        const unsigned local = (unsigned)n % TN;  // n ≥ 0: unsigned, so TN's powers of 2 shift
        const int j = n0 + (int)(((unsigned)n / TN) * (TN / 2) + local % (TN / 2));
        ok = j < N;
        m = (size_t)2 * s + (local >= TN / 2 ? 1 : 0);
        r = ok ? j : 0;
    } else {
        const int rr = n0 + n;
        ok = rr < N;
        m = s;
        r = ok ? rr : 0;
    }
    return m * N + r;
}

// moe_gg's bf16 weight tiles: each stage's BN × BK tile (TN as moe_gg's warp tile) copied by
// cp.async straight into its swizzled place; STAGES tiles of shared memory.
template <bool GATE_UP, int BN, int BK, int STAGES, int THREADS, int TN>
struct GgBf16Weights {
    typedef bf16 Elem;
    static constexpr int CH = BK / 8, PER = BN * CH / THREADS;
    static constexpr int SMEM = STAGES * BN * BK * 2;
    static_assert(PER >= 1, "tile shape");
    const bf16* src[PER];
    bool ok[PER];
    int off[PER];
    bf16* tiles;
    __device__ __forceinline__ GgBf16Weights(const bf16* w, const QuantArgs&, int K, int N, uint32_t s,
                                             int n0, int tid, unsigned char* smem)
        : tiles(reinterpret_cast<bf16*>(smem)) {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int id = tid + i * THREADS, n = id / CH, c = id % CH;
            off[i] = gg_off<BK>(n, c);
            size_t m;
            int r;
            src[i] = w + gg_weight_row<GATE_UP, TN>(n, n0, s, N, ok[i], m, r) * K + c * 8;
        }
    }
    // Queues stage st's copies of columns k0.. (in the caller's cp.async group).
    __device__ __forceinline__ void load(int k0, int st) {
        bf16* B = tiles + st * BN * BK;
#pragma unroll
        for (int i = 0; i < PER; ++i) cp_async16(B + off[i], src[i] + k0, ok[i]);
    }
    // Stage st's tile, once its copies have landed (the caller's wait and barrier).
    __device__ __forceinline__ const bf16* ready(int, int st) const { return tiles + st * BN * BK; }
};

// The k loop of a grouped-GEMM tile (moe_gg, and experts_fp8.cu's split-k dense_fp8_sk): k steps
// kt0 … kt0 + kt_n − 1, the activations' 16-byte chunks (asrc / aok / aoff, as gg_a_tiles
// makes them) and the weight tiles `wt` arriving through a STAGES-deep cp.async pipeline, each
// step's MMAs (gg_k_step) into acc, which starts at zero. Every thread of the block calls it.
template <int BM, int BK, int STAGES, int FM, int FN, int TM, int TN, int A_PER, typename W>
__device__ __forceinline__ void gg_mainloop(bf16* sa, W& wt, const bf16* const (&asrc)[A_PER],
                                            const bool (&aok)[A_PER], const int (&aoff)[A_PER],
                                            int kt0, int kt_n, int wm, int wn, int lane,
                                            float (&acc)[FM][FN][4]) {
    auto load = [&](int kt, int st) {
        const int k0 = (kt0 + kt) * BK;
        bf16* A = sa + st * BM * BK;
#pragma unroll
        for (int i = 0; i < A_PER; ++i) cp_async16(A + aoff[i], asrc[i] + k0, aok[i]);
        wt.load(k0, st);
    };
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < kt_n) load(st, st);
        cp_async_commit();
    }
#pragma unroll
    for (int mi = 0; mi < FM; ++mi)
#pragma unroll
        for (int ni = 0; ni < FN; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
    for (int kt = 0; kt < kt_n; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int nk = kt + STAGES - 1;
        if (nk < kt_n) load(nk, nk % STAGES);
        cp_async_commit();
        const bf16* B = wt.ready((kt0 + kt) * BK, kt % STAGES);
        gg_k_step<BK, FM, FN, TM, TN>(sa + (kt % STAGES) * BM * BK, B, wm, wn, lane, acc);
    }
    cp_async_wait<0>();
}

// One BM × BN tile of a grouped product, WM × WN warps (each (BM/WM) × (BN/WN)), BK-wide k
// steps through a STAGES-deep cp.async pipeline in dynamic shared memory (STAGES · BM · BK · 2
// bytes of activations, then the weight tiles' W::SMEM). W, the weights' tiles: GgBf16Weights
// (bf16), or experts_fp8.cu's GgFp8Weights (e4m3 with block scales, dequantised into the same
// bf16 tile, so both run the same MMAs).
// GATE_UP: a = x [T, K] gathered by sorted_rows, w = w_gu [slots·2N, K], out = h [Ppad, N] bf16;
//   a warp's columns are (BN/WN)/2 gate columns and the same up columns, so the SwiGLU is
//   applied in registers.
// Otherwise: a = h [Ppad, K] by block row, w = w_down [slots·N, K], out = y [Ppad, N] bf16.
// Padding rows (sorted_rows GG_NONE) are computed (from zeros, or whatever h holds there: rows
// are independent) but not stored.
// K % BK == 0, N % 8 == 0, 16-byte aligned rows.
template <bool GATE_UP, int BM, int BN, int BK, int STAGES, int WM, int WN, typename W>
__device__ __forceinline__ void moe_gg(const bf16* __restrict__ a, int K,
                                       const typename W::Elem* __restrict__ w,
                                       const QuantArgs& qa, int N, const uint32_t* sorted_rows,
                                       const uint32_t* block_slot, void* out) {
    constexpr int THREADS = WM * WN * 32;
    constexpr int TM = BM / WM, TN = BN / WN;  // warp tile
    constexpr int FM = TM / 16, FN = TN / 8;  // fragments per warp
    constexpr int CH = BK / 8;  // 16-byte chunks per row
    constexpr int A_PER = BM * CH / THREADS;
    static_assert(TM % 16 == 0 && TN % 16 == 0 && A_PER >= 1, "tile shape");
    extern __shared__ __align__(128) unsigned char gg_smem[];
    bf16* sa = reinterpret_cast<bf16*>(gg_smem);
    const uint32_t blk = blockIdx.y;
    const uint32_t s = block_slot[blk];
    if (s == GG_NONE) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n0 = blockIdx.x * (GATE_UP ? BN / 2 : BN);
    const bf16* asrc[A_PER];
    bool aok[A_PER];
    int aoff[A_PER];
    gg_a_tiles<GATE_UP, BM, BK, THREADS, A_PER>(a, K, sorted_rows, blk, tid, asrc, aok, aoff);
    W wt(w, qa, K, N, s, n0, tid, gg_smem + STAGES * BM * BK * 2);
    const int wm = warp / WN, wn = warp % WN;
    float acc[FM][FN][4];
    gg_mainloop<BM, BK, STAGES, FM, FN, TM, TN, A_PER>(sa, wt, asrc, aok, aoff, 0, K / BK, wm, wn,
                                                      lane, acc);
    gg_store<GATE_UP, BM, FM, FN, TM, TN>(acc, blk, wm, wn, lane, n0, N, sorted_rows, out);
}

// The shapes moemesh launches (engine/src/cuda/experts.rs sizes grids and shared memory from
// the same numbers): 64-row blocks (prefill segments of a few hundred pairs per expert waste
// little padding), 128 columns, 4 warps; k steps of 64 in 3 stages (72 KiB of shared memory)
// where both widths are multiples of 64, else of 32 in 4 stages (48 KiB). Measured on the H100
// against 128 × 128 and 64 × 256 tiles and other depths (scripts/bench/prefill_kernels.cu):
// 64 × 128 × 64 was fastest at 512, 2,048 and 8,192 tokens.
// moe_gg's bf16 weight tiles at the launched shapes (4 warps, 2 × 2: warp tiles of GG_BN / 2).
template <bool GATE_UP, int BK, int STAGES>
using GgBf16 = GgBf16Weights<GATE_UP, GG_BN, BK, STAGES, 128, GG_BN / 2>;
#define GG_KERNELS(SFX, BK, STAGES)                                                               \
    extern "C" __global__ void __launch_bounds__(128)                                            \
        moe_gg_gate_up_##SFX(const bf16* x, int hidden, const bf16* w_gu, int inner,             \
                             const uint32_t* sorted_rows, const uint32_t* block_slot, bf16* h) { \
        moe_gg<true, GG_BM, GG_BN, BK, STAGES, 2, 2, GgBf16<true, BK, STAGES>>(                 \
            x, hidden, w_gu, QuantArgs{}, inner, sorted_rows, block_slot, h);                    \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(128)                                            \
        moe_gg_down_##SFX(const bf16* h, int inner, const bf16* w_down, int hidden,              \
                          const uint32_t* sorted_rows, const uint32_t* block_slot, bf16* y) {    \
        moe_gg<false, GG_BM, GG_BN, BK, STAGES, 2, 2, GgBf16<false, BK, STAGES>>(               \
            h, inner, w_down, QuantArgs{}, hidden, sorted_rows, block_slot, y);                  \
    }
GG_KERNELS(k64, 64, 3)
GG_KERNELS(k32, 32, 4)

// ---------------------------------------------------------------------------------------------
// The same grouped GEMM on Hopper's warpgroup tensor-core instructions (wgmma, sm_90a only:
// built where `__CUDA_ARCH_FEAT_SM90_ALL` is defined, i.e. the `compute_90a` PTX that
// engine/build.rs asks for on CUDA_COMPUTE_CAP 90; elsewhere the kernels trap and the Rust side
// never launches them). A block computes a 128 × BN tile: the k steps of 64 bf16 (one 128-byte
// row per tile row, which is exactly the 128-byte swizzle's atom, laid out by gg_off<64>) arrive
// through a STAGES-deep cp.async pipeline, and each k step is four m64n128k16 wgmma per 128
// columns and consumer warpgroup, both operands read from shared memory (K-major, no
// transpose), accumulating in registers. The tile's columns, epilogue and padding rules are
// moe_gg's; segments are padded to 128 rows (moe_align_blocks with bm 128).

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOEMESH_WGMMA 1
#endif

// Shared-memory matrix descriptor for a K-major tile with the 128-byte swizzle: start address,
// leading offset unused (1), stride 1024 bytes between 8-row groups, layout type 1 (128B swizzle).
__device__ __forceinline__ uint64_t wg_desc(const void* smem) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem);
    return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}

__device__ __forceinline__ void wg_fence() {
#ifdef MOEMESH_WGMMA
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit() {
#ifdef MOEMESH_WGMMA
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void wg_wait() {
#ifdef MOEMESH_WGMMA
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// d[64] += A[64 × 16] · B[128 × 16]ᵀ, both from shared memory (descriptors above).
__device__ __forceinline__ void wg_m64n128k16(float d[64], uint64_t da, uint64_t db) {
#ifdef MOEMESH_WGMMA
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(1));
#else
    __trap();
#endif
}


// Warp-specialised form (BM = 128): warpgroup 0 loads (cp.async, completing on a per-stage
// mbarrier), warpgroups 1 and 2 each multiply 64 rows × BN columns with wgmma and release a stage
// to the loader through a second mbarrier once the wgmma that read it has retired. No barrier
// over the whole block in the k loop, so loads of later stages overlap the tensor cores.
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"((uint32_t)__cvta_generic_to_shared(bar)),
                 "r"(count));
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(bar);
    asm volatile(
        "{\n.reg .pred p;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT_%=;\n}\n" ::"r"(a),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"((uint32_t)__cvta_generic_to_shared(bar))
                 : "memory");
}
// Named barrier 2 over moe_ws's 256 consumer threads (warps 4–11).
__device__ __forceinline__ void consumer_bar() { asm volatile("bar.sync 2, 256;\n" ::: "memory"); }
// The barrier counts one arrival when all of this thread's earlier cp.async have landed.
__device__ __forceinline__ void mbar_cp_async_arrive(uint64_t* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(
                     (uint32_t)__cvta_generic_to_shared(bar))
                 : "memory");
}

// moe_ws's weight side (`WL`): WsBf16Loader (below) copies each stage's bf16 tile with cp.async;
// experts_fp8.cu's WsFp8Loader copies e4m3 tiles a few k steps ahead into a staging ring of its
// own (after the barriers) and the loader warpgroup dequantises each into the stage's bf16 tile;
// its WsFp8ConsumerLoader copies each stage's e4m3 tile and the consumers dequantise
// (`CONSUMER_DEQUANT`, through its `Conv`: moe_ws's consumer loop). `B_BYTES`: the weights'
// shared memory after the activations' stages; `FULL`: the arrivals a stage's `full` barrier
// counts; `start(kt_n)` queues what goes ahead of the loop; `load(kt, st, kt_n, full)` queues
// or makes stage st's weights for k step kt, the activations' copies already queued by the
// calling thread, and arrives on `full` (once for those copies and its own, through cp.async's
// arrive, plus once for whatever else it writes).
template <bool GATE_UP, int BN, int STAGES>
struct WsBf16Loader {
    typedef bf16 Elem;
    static constexpr int FULL = 128;
    // STAGES bf16 tiles.
    static constexpr int B_BYTES = STAGES * BN * 64 * 2;
    static constexpr bool CONSUMER_DEQUANT = false;
    GgBf16Weights<GATE_UP, BN, 64, STAGES, 128, 128> wt;
    __device__ __forceinline__ WsBf16Loader(const bf16* w, const QuantArgs& qa, int K, int N,
                                            uint32_t s, int n0, int tid, bf16* sb, unsigned char*)
        : wt(w, qa, K, N, s, n0, tid, reinterpret_cast<unsigned char*>(sb)) {}
    __device__ __forceinline__ void start(int) {}
    __device__ __forceinline__ void load(int kt, int st, int, uint64_t* full) {
        wt.load(kt * 64, st);
        mbar_cp_async_arrive(full);
    }
};

template <bool GATE_UP, int BM, int BN, int STAGES, typename WL = WsBf16Loader<GATE_UP, BN, STAGES>>
__device__ __forceinline__ void moe_ws(const bf16* __restrict__ a, int K,
                                       const typename WL::Elem* __restrict__ w,
                                       const QuantArgs& qa, int N, const uint32_t* sorted_rows,
                                       const uint32_t* block_slot, void* out) {
    constexpr int BK = 64, CH = BK / 8, LOADERS = 128, CONSUMERS = 256;
    // 128 rows: each consumer warpgroup takes 64 rows and every column; 64 rows: each takes the
    // 64 rows and half the columns. NW m64n128 accumulators per consumer thread.
    constexpr int NW = BM == 128 ? BN / 128 : BN / 256;
    static_assert((BM == 128 || BM == 64) && NW >= 1, "tile shape");
    constexpr int A_PER = BM * CH / LOADERS;
    static_assert(BN % 128 == 0, "tile shape");
    extern __shared__ unsigned char wg_smem_raw[];
    bf16* sa = reinterpret_cast<bf16*>(
        (reinterpret_cast<uintptr_t>(wg_smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
    bf16* sb = sa + STAGES * BM * BK;
    uint64_t* full =
        reinterpret_cast<uint64_t*>(reinterpret_cast<unsigned char*>(sb) + WL::B_BYTES);
    uint64_t* empty = full + STAGES;
    const uint32_t blk = blockIdx.y;
    const uint32_t s = block_slot[blk];
    if (s == GG_NONE) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n0 = blockIdx.x * (GATE_UP ? BN / 2 : BN);
    if (tid == 0) {
        for (int st = 0; st < STAGES; ++st) {
            mbar_init(&full[st], WL::FULL);
            mbar_init(&empty[st], CONSUMERS);
        }
    }
    __syncthreads();
    const int kt_n = K / BK;
    if (warp < 4) {
        // Loader warpgroup. Each 128 tile rows of a gate/up tile (one accumulator's columns):
        // 64 gate columns, then the same 64 up columns.
        const bf16* asrc[A_PER];
        bool aok[A_PER];
        int aoff[A_PER];
        gg_a_tiles<GATE_UP, BM, BK, LOADERS, A_PER>(a, K, sorted_rows, blk, tid, asrc, aok, aoff);
        WL wt(w, qa, K, N, s, n0, tid, sb,
              reinterpret_cast<unsigned char*>(full + 2 * STAGES));
        wt.start(kt_n);
        for (int kt = 0; kt < kt_n; ++kt) {
            const int st = kt % STAGES;
            mbar_wait(&empty[st], ((kt / STAGES) & 1) ^ 1);
            const int k0 = kt * BK;
            bf16* A = sa + st * BM * BK;
#pragma unroll
            for (int i = 0; i < A_PER; ++i) cp_async16(A + aoff[i], asrc[i] + k0, aok[i]);
            wt.load(kt, st, kt_n, &full[st]);
        }
        cp_async_wait<0>();
        return;
    }
    // Consumer warpgroups: cw 0..7, warpgroup wg = cw / 4 takes tile rows 64·wg… (BM 128) or
    // the tile's columns from wg·BN/2 on (BM 64).
    const int cw = warp - 4, wg = cw >> 2;
    const int row0 = BM == 128 ? wg * 64 : 0, group0 = BM == 128 ? 0 : wg * NW;
    float acc[NW][64];
#pragma unroll
    for (int nw = 0; nw < NW; ++nw)
#pragma unroll
        for (int e = 0; e < 64; ++e) acc[nw][e] = 0.f;
    // One k step's wgmma: the activations' stage st and the weights' bf16 tile `Bt`.
    auto mma_step = [&](int st, const bf16* Bt) {
        const bf16* A = sa + st * BM * BK + row0 * BK;
        const bf16* B = Bt + group0 * 128 * BK;
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            const uint64_t da = wg_desc(A + kk * 16);
#pragma unroll
            for (int nw = 0; nw < NW; ++nw) wg_m64n128k16(acc[nw], da, wg_desc(B + nw * 128 * BK + kk * 16));
        }
        wg_commit();
    };
    if constexpr (WL::CONSUMER_DEQUANT) {
        // The consumers make each step's bf16 tile from the stage's staged weights (WL::Conv)
        // into one of two buffers, step kt + 1's while step kt's wgmma run; named barrier 2
        // over the 256 consumer threads: before a buffer is written (both warpgroups' wgmma
        // that read it have retired) and before it is read (every thread's part is written).
        typename WL::Conv cv(qa, K, N, s, n0, tid - LOADERS, reinterpret_cast<unsigned char*>(sb));
        mbar_wait(&full[0], 0);
        cv.convert(0, 0);
        fence_proxy_async();
        consumer_bar();
        for (int kt = 0; kt < kt_n; ++kt) {
            const int st = kt % STAGES;
            fence_proxy_async();  // the stage's activations, seen by the async proxy
            mma_step(st, cv.tile(kt));
            wg_wait<1>();  // this warpgroup's step kt − 1 has retired
            if (kt + 1 < kt_n) {
                const int sn = (kt + 1) % STAGES;
                mbar_wait(&full[sn], ((kt + 1) / STAGES) & 1);
                consumer_bar();  // and the other's: tile (kt + 1) % 2 is free
                if (kt > 0) mbar_arrive(&empty[(kt - 1) % STAGES]);
                cv.convert(kt + 1, sn);
                fence_proxy_async();
                consumer_bar();
            } else if (kt > 0) {
                mbar_arrive(&empty[(kt - 1) % STAGES]);
            }
        }
    } else {
        for (int kt = 0; kt < kt_n; ++kt) {
            const int st = kt % STAGES;
            mbar_wait(&full[st], (kt / STAGES) & 1);
            fence_proxy_async();  // the stage's writes, seen by the tensor cores' async proxy
            mma_step(st, sb + st * BN * BK);
            wg_wait<1>();
            if (kt > 0) mbar_arrive(&empty[(kt - 1) % STAGES]);
        }
    }
    wg_wait<0>();
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const size_t q = (size_t)blk * BM + row0 + (cw & 3) * 16 + g + half * 8;
        if (sorted_rows[q] == GG_NONE) continue;  // padding: never read
        if (GATE_UP) {
            bf16* h = reinterpret_cast<bf16*>(out);
            // Accumulator nw holds group group0 + nw: gate columns in its first 8 column
            // octets, the same up columns in the next 8.
#pragma unroll
            for (int nw = 0; nw < NW; ++nw)
#pragma unroll
                for (int x8 = 0; x8 < 8; ++x8) {
                    const float* ga = acc[nw] + x8 * 4;
                    const float* ua = acc[nw] + (x8 + 8) * 4;
                    const int j = n0 + (group0 + nw) * 64 + x8 * 8 + 2 * t4;
                    if (j < N) {
                        const float h0 = silu(ga[2 * half]) * ua[2 * half];
                        const float h1 = silu(ga[2 * half + 1]) * ua[2 * half + 1];
                        *reinterpret_cast<uint32_t*>(h + q * N + j) = pack_bf16(h0, h1);
                    }
                }
        } else {
            bf16* y = reinterpret_cast<bf16*>(out);
#pragma unroll
            for (int nw = 0; nw < NW; ++nw)
#pragma unroll
                for (int j8 = 0; j8 < 16; ++j8) {
                    const int r = n0 + (group0 + nw) * 128 + j8 * 8 + 2 * t4;
                    if (r < N)
                        *reinterpret_cast<uint32_t*>(y + q * N + r) =
                            pack_bf16(acc[nw][4 * j8 + 2 * half], acc[nw][4 * j8 + 2 * half + 1]);
                }
        }
    }
}
#define WS_SMEM(BM, BN, STAGES) ((STAGES) * ((BM) + (BN)) * 64 * 2 + 1024 + 16 * (STAGES))

// The shape moemesh launches (engine/src/cuda/experts.rs: `WS_BM`, `WS_BN`, `WS_SMEM`): 128 × 256
// tiles, 4 stages (193 KiB of shared memory, one block per multiprocessor), 384 threads. Measured
// on the H100 (scripts/bench/prefill_kernels.cu) against 128 × 128 in 4 and 6 stages, 128 × 256 in
// 3, and the same tiles without warp specialisation: fastest at 2,048 and 8,192 tokens; at 512
// (48 pairs per expert) the 64-row moe_gg tiles waste less padding and stay faster.
#define WS_KERNELS(SFX, BN, STAGES)                                                               \
    extern "C" __global__ void __launch_bounds__(384, 1)                                         \
        moe_ws_gate_up_##SFX(const bf16* x, int hidden, const bf16* w_gu, int inner,             \
                             const uint32_t* sorted_rows, const uint32_t* block_slot, bf16* h) { \
        moe_ws<true, 128, BN, STAGES>(x, hidden, w_gu, QuantArgs{}, inner, sorted_rows, block_slot, \
                                      h);                                                        \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(384, 1)                                         \
        moe_ws_down_##SFX(const bf16* h, int inner, const bf16* w_down, int hidden,              \
                          const uint32_t* sorted_rows, const uint32_t* block_slot, bf16* y) {    \
        moe_ws<false, 128, BN, STAGES>(h, inner, w_down, QuantArgs{}, hidden, sorted_rows,         \
                                       block_slot, y);                                           \
    }
WS_KERNELS(n256, 256, 4)
