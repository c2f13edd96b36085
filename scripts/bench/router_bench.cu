// Where a decode step's router time goes (issue 18): `moe_route_logits` (router logits and
// routing in one launch, engine/src/cuda/experts.cu) took 11.4 µs a layer at batch 1 under Nsight
// Compute on an H200 (docs/BENCHMARKS.md, session 23), as long as a 34 MB dense projection, for a
// 64 × 2,048 f32 product and a top-6. This times it and its parts the way a decode step runs them:
// 26 layers, each with router weights of its own, captured in one CUDA graph and replayed; µs a
// layer, median of 7 × 20 replays (bench_common.cuh):
//   fused        moe_route_logits (k rounds of a warp's arg-max; the engine's above 64 experts)
//   fused-arr    the same with route_row's weights in a local-memory array (before 2026-11-28)
//   logits       the same kernel with a counter that never names a last block: its logits half
//                (and the count) alone
//   route        moe_route alone over those logits (one warp a token)
//   fused-rank   the fused kernel with the top k by rank (moe_route_logits_e64, the engine's at
//                ≤ 64 experts; at V3's 256, route_row<false, 8>)
//   route-rank   moe_route likewise (moe_route_e64)
//   fused-uU     the fused kernel with its weight loads unrolled U deep (the engine's: 4)
//   route-serial moe_route with V3's group scores walked by one lane a group (before 2026-11-28)
//   no-op        an empty kernel with the fused kernel's grid: the launch floor in a graph
// at DeepSeek-V2-Lite's router (64 experts, hidden 2,048, softmax, greedy top-6) and V3's (256
// experts, hidden 7,168, sigmoid + bias, noaux_tc top-8 from 4 of 8 groups), batches 1 and 8.
// Checks that every variant's ids and weights equal the fused kernel's, bit for bit.
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o router_bench scripts/bench/router_bench.cu
// Run on a GPU machine: ./router_bench   (exit 1 on a mismatch)
#include "../../engine/src/cuda/kernels.cu"
#include "bench_common.cuh"

// The routing launch's hand-off arguments (experts.cu's ROUTE_HANDOFF_ARGS) with none: a
// router alone, as in-process.
#define NO_HANDOFF                                                                              \
    nullptr, 0, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,        \
        nullptr, nullptr, nullptr, nullptr, 0, nullptr, nullptr, nullptr, nullptr, nullptr, 0, \
        0, 0, 0, 0, nullptr

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>


__global__ void fill_f32(float* p, size_t n, uint32_t seed, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        p[i] = ((int)(h & 0xffff) - 32768) * (scale / 32768.f);
    }
}

__global__ void empty_kernel() {}

// The fused kernel with route_row's k weights in the local-memory array lane 0 walks (before
// 2026-11-28) instead of registers (lane r holds round r's, the k lanes store at once).
__global__ void __launch_bounds__(ROUTE_WARPS * 32)
    fused_arr(const float* x, int tokens, int hidden, const float* w_router, float* logits,
              uint32_t* counter, int n_exp, const float* bias, int scoring, int method, int k,
              int n_group, int topk_group, int normalise, uint32_t* ids, float* weights) {
    route_logits<false>(x, tokens, hidden, w_router, nullptr, logits, counter, n_exp, bias,
                        scoring, method, k, n_group, topk_group, normalise, 0, 1.f, ids,
                        weights);
}

// The fused kernel and moe_route with the top k by rank at 256 experts (route_row<false, 8>;
// the engine has the rank form for ≤ 64 experts only, moe_route_logits_e64 and moe_route_e64).
template <int M>
__global__ void __launch_bounds__(ROUTE_WARPS * 32)
    fused_rank(const float* x, int tokens, int hidden, const float* w_router, float* logits,
               uint32_t* counter, int n_exp, const float* bias, int scoring, int method, int k,
               int n_group, int topk_group, int normalise, uint32_t* ids, float* weights) {
    route_logits<false, M>(x, tokens, hidden, w_router, nullptr, logits, counter, n_exp, bias,
                           scoring, method, k, n_group, topk_group, normalise, 0, 1.f, ids,
                           weights);
}
template <int M>
__global__ void route_rank(const float* logits, int tokens, int n_exp, const float* bias,
                           int scoring, int method, int k, int n_group, int topk_group,
                           int normalise, uint32_t* ids, float* weights) {
    __shared__ float choice_s[ROUTE_WARPS][ROUTE_MAX_M * 32];
    __shared__ float sel_s[ROUTE_WARPS][2 * ROUTE_MAX_K];
    const int warp = threadIdx.x >> 5;
    const int t = blockIdx.x * ROUTE_WARPS + warp;
    if (t >= tokens) return;
    route_row<false, M>(logits + (size_t)t * n_exp, t, n_exp, bias, scoring, method, k, n_group,
                        topk_group, normalise, 0, 1.f, choice_s[warp], ids, weights,
                        sel_s[warp]);
}

// A routing copied to the host: n ids and weights; equal = the same ids and the same weights,
// bit for bit.
struct HostRouting {
    std::vector<uint32_t> ids;
    std::vector<uint32_t> wbits;
    HostRouting(const uint32_t* d_ids, const float* d_w, size_t n) : ids(n), wbits(n) {
        CK(cudaMemcpy(ids.data(), d_ids, n * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(wbits.data(), d_w, n * 4, cudaMemcpyDeviceToHost));
    }
    bool operator==(const HostRouting& o) const { return ids == o.ids && wbits == o.wbits; }
};

// Ties: logits drawn from 5 values (so most experts tie with others) and some −inf, over 64,
// 40 and 7 experts (rows not a multiple of 32 wide), k up to 8, softmax and sigmoid: the rank
// form (moe_route_e64) must pick what the rounds (moe_route) pick, the lower index on a tie, and
// sum the same weights, bit for bit.
__global__ void fill_ties(float* p, int n, uint32_t seed) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        const int v = (int)(h % 6);
        p[i] = v == 5 ? -INFINITY : 0.5f * (float)v - 1.f;
    }
}
static int ties_check() {
    const int T = 512;
    int bad = 0;
    for (int E : {64, 40, 7}) {
        for (int scoring : {0, 1}) {
            for (int k : {1, 6, 8}) {
                if (k > E) continue;
                float *logits, *w1, *w2;
                uint32_t *i1, *i2;
                CK(cudaMalloc(&logits, (size_t)T * E * 4));
                CK(cudaMalloc(&w1, (size_t)T * k * 4));
                CK(cudaMalloc(&w2, (size_t)T * k * 4));
                CK(cudaMalloc(&i1, (size_t)T * k * 4));
                CK(cudaMalloc(&i2, (size_t)T * k * 4));
                fill_ties<<<64, 256>>>(logits, T * E, 17u + E + k);
                const int blocks = (T + ROUTE_WARPS - 1) / ROUTE_WARPS;
                moe_route<<<blocks, ROUTE_WARPS * 32>>>(logits, T, E, nullptr, scoring, 0, k, 1, 1,
                                                        1, 0, 1.f, i1, w1);
                moe_route_e64<<<blocks, ROUTE_WARPS * 32>>>(logits, T, E, nullptr, scoring, 0, k,
                                                            1, 1, 1, 0, 1.f, i2, w2);
                CK(cudaDeviceSynchronize());
                const bool same = HostRouting(i1, w1, (size_t)T * k) ==
                                  HostRouting(i2, w2, (size_t)T * k);
                printf("ties: %d experts, %s, top-%d: rank %s rounds\n", E,
                       scoring ? "softmax" : "sigmoid", k, same ? "=" : "DIFFERS FROM");
                bad |= !same;
                cudaFree(logits); cudaFree(w1); cudaFree(w2); cudaFree(i1); cudaFree(i2);
            }
        }
    }
    return bad;
}

// The fused kernel with its weight loads unrolled U deep (the engine's: 4), and moe_route with
// the group scores walked serially by one lane a group (route_row's GROUP_WARP off: how it was).
template <int U>
__global__ void __launch_bounds__(ROUTE_WARPS * 32)
    fused_unroll(const float* x, int tokens, int hidden, const float* w_router, float* logits,
                 uint32_t* counter, int n_exp, const float* bias, int scoring, int method, int k,
                 int n_group, int topk_group, int normalise, uint32_t* ids, float* weights) {
    route_logits<true, 0, U>(x, tokens, hidden, w_router, nullptr, logits, counter, n_exp, bias,
                              scoring, method, k, n_group, topk_group, normalise, 0, 1.f, ids,
                              weights);
}
__global__ void route_serial(const float* logits, int tokens, int n_exp, const float* bias,
                             int scoring, int method, int k, int n_group, int topk_group,
                             int normalise, uint32_t* ids, float* weights) {
    __shared__ float choice_s[ROUTE_WARPS][ROUTE_MAX_M * 32];
    const int warp = threadIdx.x >> 5;
    const int t = blockIdx.x * ROUTE_WARPS + warp;
    if (t >= tokens) return;
    route_row<true, 0, false>(logits + (size_t)t * n_exp, t, n_exp, bias, scoring, method, k,
                               n_group, topk_group, normalise, 0, 1.f, choice_s[warp], ids,
                               weights);
}

struct Router {
    const char* name;
    int experts, hidden, scoring, method, k, n_group, topk_group, normalise;
    bool bias;
};
static const Router ROUTERS[] = {
    {"V2-Lite", 64, 2048, 1, 0, 6, 1, 1, 0, false},
    {"V3", 256, 7168, 0, 2, 8, 8, 4, 1, true},
};

// Ties in the group scores: 256 experts in 8 groups of 32 (V3's), top-4 groups, top-8, logits
// from 5 values (and some −inf), sigmoid + a bias from 3 values and softmax: group scores by warp
// reductions (moe_route) must equal one lane's walk (route_serial), bit for bit.
static int group_ties_check() {
    const int T = 512, E = 256, k = 8;
    int bad = 0;
    float *logits, *bias, *w1, *w2;
    uint32_t *i1, *i2;
    CK(cudaMalloc(&logits, (size_t)T * E * 4));
    CK(cudaMalloc(&bias, E * 4));
    CK(cudaMalloc(&w1, (size_t)T * k * 4));
    CK(cudaMalloc(&w2, (size_t)T * k * 4));
    CK(cudaMalloc(&i1, (size_t)T * k * 4));
    CK(cudaMalloc(&i2, (size_t)T * k * 4));
    fill_ties<<<64, 256>>>(logits, T * E, 99u);
    for (int method : {1, 2}) {
        for (int scoring : {0, 1}) {
            fill_ties<<<1, 256>>>(bias, E, 7u + method);
            const float* b = scoring == 0 ? bias : nullptr;
            const int blocks = (T + ROUTE_WARPS - 1) / ROUTE_WARPS;
            moe_route<<<blocks, ROUTE_WARPS * 32>>>(logits, T, E, b, scoring, method, k, 8, 4, 1,
                                                    0, 1.f, i1, w1);
            route_serial<<<blocks, ROUTE_WARPS * 32>>>(logits, T, E, b, scoring, method, k, 8, 4,
                                                       1, i2, w2);
            CK(cudaDeviceSynchronize());
            const bool same =
                HostRouting(i1, w1, (size_t)T * k) == HostRouting(i2, w2, (size_t)T * k);
            printf("group ties: method %d, %s: warp %s serial\n", method,
                   scoring ? "softmax" : "sigmoid + bias", same ? "=" : "DIFFERS FROM");
            bad |= !same;
        }
    }
    cudaFree(logits); cudaFree(bias); cudaFree(w1); cudaFree(w2); cudaFree(i1); cudaFree(i2);
    return bad;
}

int main() {
    const int L = 26;
    int bad = 0;
    printf("%-8s %5s %-9s %10s\n", "router", "batch", "variant", "us/layer");
    for (const Router& R : ROUTERS) {
        std::vector<float*> w(L);
        for (int l = 0; l < L; ++l) {
            CK(cudaMalloc(&w[l], (size_t)R.experts * R.hidden * 4));
            fill_f32<<<256, 256>>>(w[l], (size_t)R.experts * R.hidden, 11u + l, 0.05f);
        }
        float* bias = nullptr;
        if (R.bias) {
            CK(cudaMalloc(&bias, R.experts * 4));
            fill_f32<<<1, 256>>>(bias, R.experts, 3u, 0.01f);
        }
        for (int T : {1, 8}) {
            float *x, *logits;
            uint32_t *ids_f, *ids_r, *ids_g, *ids_n, *ids_k, *ids_q, *counter, *never;
            float *wts_f, *wts_r, *wts_g, *wts_n, *wts_k, *wts_q;
            uint32_t *ids_u8, *ids_u16, *ids_s;
            float *wts_u8, *wts_u16, *wts_s;
            for (uint32_t** p : {&ids_u8, &ids_u16, &ids_s})
                CK(cudaMalloc(p, (size_t)L * T * R.k * 4));
            for (float** p : {&wts_u8, &wts_u16, &wts_s})
                CK(cudaMalloc(p, (size_t)L * T * R.k * 4));
            CK(cudaMalloc(&ids_k, (size_t)L * T * R.k * 4));
            CK(cudaMalloc(&wts_k, (size_t)L * T * R.k * 4));
            CK(cudaMalloc(&ids_q, (size_t)L * T * R.k * 4));
            CK(cudaMalloc(&wts_q, (size_t)L * T * R.k * 4));
            CK(cudaMalloc(&x, (size_t)T * R.hidden * 4));
            CK(cudaMalloc(&logits, (size_t)L * T * R.experts * 4));
            CK(cudaMalloc(&ids_f, (size_t)L * T * R.k * 4));
            CK(cudaMalloc(&ids_r, (size_t)L * T * R.k * 4));
            CK(cudaMalloc(&ids_g, (size_t)L * T * R.k * 4));
            CK(cudaMalloc(&wts_g, (size_t)L * T * R.k * 4));
            CK(cudaMalloc(&ids_n, (size_t)L * T * R.k * 4));
            CK(cudaMalloc(&wts_n, (size_t)L * T * R.k * 4));
            CK(cudaMalloc(&wts_f, (size_t)L * T * R.k * 4));
            CK(cudaMalloc(&wts_r, (size_t)L * T * R.k * 4));
            CK(cudaMalloc(&counter, L * 4));
            CK(cudaMemset(counter, 0, L * 4));
            CK(cudaMalloc(&never, L * 4));
            {
                const std::vector<uint32_t> from(L, 0x80000000u);
                CK(cudaMemcpy(never, from.data(), L * 4, cudaMemcpyHostToDevice));
            }
            fill_f32<<<64, 256>>>(x, (size_t)T * R.hidden, 5u, 1.f);
            const char* names[] = {"fused",      "fused-arr",  "logits",   "route",
                                   "fused-rank", "route-rank", "fused-u8", "fused-u16",
                                   "route-serial", "no-op"};
            for (int v = 0; v < 10; ++v) {
                const float ms = graph_median_ms(
                    [&](cudaStream_t st) {
                        for (int l = 0; l < L; ++l) {
                            float* lg = logits + (size_t)l * T * R.experts;
                            const size_t o = (size_t)l * T * R.k;
                            if (v == 0)
                                moe_route_logits<<<R.experts, ROUTE_WARPS * 32, 0, st>>>(
                                    x, T, R.hidden, w[l], nullptr, lg, counter + l, R.experts,
                                    bias, R.scoring, R.method, R.k, R.n_group, R.topk_group,
                                    R.normalise, 0, 1.f, ids_f + o, wts_f + o, NO_HANDOFF);
                            else if (v == 1)
                                fused_arr<<<R.experts, ROUTE_WARPS * 32, 0, st>>>(
                                    x, T, R.hidden, w[l], lg, counter + l, R.experts, bias,
                                    R.scoring, R.method, R.k, R.n_group, R.topk_group,
                                    R.normalise, ids_g + o, wts_g + o);
                            else if (v == 2)
                                // `never` counts from 2^31: no block is ever the last, so the
                                // kernel stops after the logits (ids and weights untouched).
                                moe_route_logits<<<R.experts, ROUTE_WARPS * 32, 0, st>>>(
                                    x, T, R.hidden, w[l], nullptr, lg, never + l, R.experts,
                                    bias, R.scoring, R.method, R.k, R.n_group, R.topk_group,
                                    R.normalise, 0, 1.f, ids_n + o, wts_n + o, NO_HANDOFF);
                            else if (v == 3)
                                moe_route<<<(T + ROUTE_WARPS - 1) / ROUTE_WARPS,
                                            ROUTE_WARPS * 32, 0, st>>>(
                                    lg, T, R.experts, bias, R.scoring, R.method, R.k, R.n_group,
                                    R.topk_group, R.normalise, 0, 1.f, ids_r + o, wts_r + o);
                            else if (v == 4 && R.experts <= 64)
                                moe_route_logits_e64<<<R.experts, ROUTE_WARPS * 32, 0, st>>>(
                                    x, T, R.hidden, w[l], nullptr, lg, counter + l, R.experts,
                                    bias, R.scoring, R.method, R.k, R.n_group, R.topk_group,
                                    R.normalise, 0, 1.f, ids_k + o, wts_k + o, NO_HANDOFF);
                            else if (v == 4)
                                fused_rank<8><<<R.experts, ROUTE_WARPS * 32, 0, st>>>(
                                    x, T, R.hidden, w[l], lg, counter + l, R.experts, bias,
                                    R.scoring, R.method, R.k, R.n_group, R.topk_group,
                                    R.normalise, ids_k + o, wts_k + o);
                            else if (v == 5 && R.experts <= 64)
                                moe_route_e64<<<(T + ROUTE_WARPS - 1) / ROUTE_WARPS,
                                                ROUTE_WARPS * 32, 0, st>>>(
                                    lg, T, R.experts, bias, R.scoring, R.method, R.k, R.n_group,
                                    R.topk_group, R.normalise, 0, 1.f, ids_q + o, wts_q + o);
                            else if (v == 5)
                                route_rank<8><<<(T + ROUTE_WARPS - 1) / ROUTE_WARPS,
                                                ROUTE_WARPS * 32, 0, st>>>(
                                    lg, T, R.experts, bias, R.scoring, R.method, R.k, R.n_group,
                                    R.topk_group, R.normalise, ids_q + o, wts_q + o);
                            else if (v == 6 || v == 7)
                                (v == 6 ? fused_unroll<8> : fused_unroll<16>)<<<
                                    R.experts, ROUTE_WARPS * 32, 0, st>>>(
                                    x, T, R.hidden, w[l], lg, counter + l, R.experts, bias,
                                    R.scoring, R.method, R.k, R.n_group, R.topk_group,
                                    R.normalise, (v == 6 ? ids_u8 : ids_u16) + o,
                                    (v == 6 ? wts_u8 : wts_u16) + o);
                            else if (v == 8)
                                route_serial<<<(T + ROUTE_WARPS - 1) / ROUTE_WARPS,
                                               ROUTE_WARPS * 32, 0, st>>>(
                                    lg, T, R.experts, bias, R.scoring, R.method, R.k, R.n_group,
                                    R.topk_group, R.normalise, ids_s + o, wts_s + o);
                            else
                                empty_kernel<<<R.experts, ROUTE_WARPS * 32, 0, st>>>();
                        }
                    },
                    20);
                printf("%-8s %5d %-9s %10.2f\n", R.name, T, names[v], ms * 1000.0 / L);
            }
            // Every variant's routing against the fused kernel's (the route variants ran after
            // the logits one, which wrote the same logits).
            const size_t n = (size_t)L * T * R.k;
            const HostRouting fused(ids_f, wts_f, n);
            bool same = true;
            for (auto pr : {std::make_pair(ids_r, wts_r), std::make_pair(ids_g, wts_g),
                            std::make_pair(ids_k, wts_k), std::make_pair(ids_q, wts_q),
                            std::make_pair(ids_u8, wts_u8), std::make_pair(ids_u16, wts_u16),
                            std::make_pair(ids_s, wts_s)})
                same = same && HostRouting(pr.first, pr.second, n) == fused;
            for (auto p : {ids_u8, ids_u16, ids_s}) cudaFree(p);
            for (auto p : {wts_u8, wts_u16, wts_s}) cudaFree(p);
            printf("%-8s %5d routing %s\n", R.name, T,
                   same ? "every variant's ids and weights equal, bit for bit" : "MISMATCH");
            bad |= !same;
            cudaFree(x); cudaFree(logits); cudaFree(ids_f); cudaFree(ids_r); cudaFree(wts_f);
            cudaFree(wts_r); cudaFree(ids_g); cudaFree(wts_g); cudaFree(ids_n); cudaFree(wts_n);
            cudaFree(counter); cudaFree(never); cudaFree(ids_k); cudaFree(wts_k);
            cudaFree(ids_q); cudaFree(wts_q);
        }
        for (float* p : w) cudaFree(p);
        if (bias) cudaFree(bias);
    }
    bad |= ties_check();
    bad |= group_ties_check();
    return bad;
}
