// Where a decode step's router time goes (issue 18): `moe_route_logits` (router logits and
// routing in one launch, engine/src/cuda/experts.cu) took 11.4 µs a layer at batch 1 under Nsight
// Compute on an H200 (docs/BENCHMARKS.md, session 23), as long as a 34 MB dense projection, for a
// 64 × 2,048 f32 product and a top-6. This times it and its parts the way a decode step runs them:
// 26 layers, each with router weights of its own, captured in one CUDA graph and replayed; µs a
// layer, median of 7 × 20 replays (bench_common.cuh):
//   fused        moe_route_logits (what the engine runs, batch ≤ 16)
//   fused-reg    the same with route_row's weights in registers (no 64-byte stack frame)
//   logits       the same kernel with a counter that never names a last block: its logits half
//                (and the count) alone
//   route        moe_route alone over those logits (one warp a token)
//   no-op        an empty kernel with the fused kernel's grid: the launch floor in a graph
// at DeepSeek-V2-Lite's router (64 experts, hidden 2,048, softmax, greedy top-6) and V3's (256
// experts, hidden 7,168, sigmoid + bias, noaux_tc top-8 from 4 of 8 groups), batches 1 and 8.
// Checks that the fused kernel's ids and weights equal route-after-logits' and fused-reg's (the
// same routing arithmetic), bit for bit.
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o router_bench scripts/bench/router_bench.cu
// Run on a GPU machine: ./router_bench   (exit 1 on a mismatch)
#include "../../engine/src/cuda/kernels.cu"
#include "bench_common.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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

// The fused kernel with route_row's k weights in registers (lane r holds round r's, the k lanes
// store at once) instead of the local-memory array lane 0 walks.
__global__ void __launch_bounds__(ROUTE_WARPS * 32)
    fused_reg(const float* x, int tokens, int hidden, const float* w_router, float* logits,
              uint32_t* counter, int n_exp, const float* bias, int scoring, int method, int k,
              int n_group, int topk_group, int normalise, uint32_t* ids, float* weights) {
    route_logits<true>(x, tokens, hidden, w_router, nullptr, logits, counter, n_exp, bias,
                       scoring, method, k, n_group, topk_group, normalise, 0, 1.f, ids,
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
            uint32_t *ids_f, *ids_r, *ids_g, *ids_n, *counter, *never;
            float *wts_f, *wts_r, *wts_g, *wts_n;
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
            const char* names[] = {"fused", "fused-reg", "logits", "route", "no-op"};
            for (int v = 0; v < 5; ++v) {
                const float ms = graph_median_ms(
                    [&](cudaStream_t st) {
                        for (int l = 0; l < L; ++l) {
                            float* lg = logits + (size_t)l * T * R.experts;
                            const size_t o = (size_t)l * T * R.k;
                            if (v == 0)
                                moe_route_logits<<<R.experts, ROUTE_WARPS * 32, 0, st>>>(
                                    x, T, R.hidden, w[l], nullptr, lg, counter + l, R.experts,
                                    bias, R.scoring, R.method, R.k, R.n_group, R.topk_group,
                                    R.normalise, 0, 1.f, ids_f + o, wts_f + o);
                            else if (v == 1)
                                fused_reg<<<R.experts, ROUTE_WARPS * 32, 0, st>>>(
                                    x, T, R.hidden, w[l], lg, counter + l, R.experts, bias,
                                    R.scoring, R.method, R.k, R.n_group, R.topk_group,
                                    R.normalise, ids_g + o, wts_g + o);
                            else if (v == 2)
                                // `never` counts from 2^31: no block is ever the last, so the
                                // kernel stops after the logits (ids and weights untouched).
                                moe_route_logits<<<R.experts, ROUTE_WARPS * 32, 0, st>>>(
                                    x, T, R.hidden, w[l], nullptr, lg, never + l, R.experts,
                                    bias, R.scoring, R.method, R.k, R.n_group, R.topk_group,
                                    R.normalise, 0, 1.f, ids_n + o, wts_n + o);
                            else if (v == 3)
                                moe_route<<<(T + ROUTE_WARPS - 1) / ROUTE_WARPS,
                                            ROUTE_WARPS * 32, 0, st>>>(
                                    lg, T, R.experts, bias, R.scoring, R.method, R.k, R.n_group,
                                    R.topk_group, R.normalise, 0, 1.f, ids_r + o, wts_r + o);
                            else
                                empty_kernel<<<R.experts, ROUTE_WARPS * 32, 0, st>>>();
                        }
                    },
                    20);
                printf("%-8s %5d %-9s %10.2f\n", R.name, T, names[v], ms * 1000.0 / L);
            }
            // The fused kernels' routings against moe_route over the logits (the route variant
            // ran after the logits one, which wrote the same values).
            std::vector<uint32_t> a((size_t)L * T * R.k), b(a.size()), c(a.size());
            std::vector<float> wa(a.size()), wb(a.size()), wc(a.size());
            CK(cudaMemcpy(a.data(), ids_f, a.size() * 4, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(b.data(), ids_r, b.size() * 4, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(c.data(), ids_g, c.size() * 4, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(wa.data(), wts_f, wa.size() * 4, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(wb.data(), wts_r, wb.size() * 4, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(wc.data(), wts_g, wc.size() * 4, cudaMemcpyDeviceToHost));
            const bool same = a == b && a == c &&
                              memcmp(wa.data(), wb.data(), wa.size() * 4) == 0 &&
                              memcmp(wa.data(), wc.data(), wa.size() * 4) == 0;
            printf("%-8s %5d routing %s\n", R.name, T,
                   same ? "fused = fused-reg = route after logits" : "MISMATCH");
            bad |= !same;
            cudaFree(x); cudaFree(logits); cudaFree(ids_f); cudaFree(ids_r); cudaFree(wts_f);
            cudaFree(wts_r); cudaFree(ids_g); cudaFree(wts_g); cudaFree(ids_n); cudaFree(wts_n);
            cudaFree(counter); cudaFree(never);
        }
        for (float* p : w) cudaFree(p);
        if (bias) cudaFree(bias);
    }
    return bad;
}
