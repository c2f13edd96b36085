// The shared experts of a decode or prefill step (V2-Lite: gate/up 5,632 × 2,048 + SwiGLU, down
// 2,048 × 2,816; 27 layers with weights of their own, nothing left in L2) with e4m3 weights and
// 128 × 128 block scales, in the ways an FP8 GEMM can take them, captured in one CUDA graph and
// replayed. Prints µs a replay for:
//   bf16 cublas      bf16 weights resident, cuBLAS (what a bf16 model runs; no FP8 at all)
//   fp8 cublas+dq    the engine's FP8 path above 16 rows: each weight dequantised to bf16 on
//                    every call (dense.cu's fp8_dequant_bf16), then cuBLAS
//   fp8 lt a8        cuBLASLt's FP8 GEMM with block scales (weights BLK128x128_32F as the
//                    checkpoint has them, the K blocks padded to 4; activations quantised to
//                    e4m3 per token per 128 columns, VEC128_32F): DeepSeek's W8A8 recipe
//   fp8 lt a8x2      the same GEMM over the activations quantised twice: x ≈ s1·q1 + s2·q2, q2
//                    the e4m3 of x − s1·q1 with its own scales, stacked as 2T rows of one GEMM
//                    (the weights read once), the two halves of the f32 result added by the
//                    SwiGLU (gate/up) or a sum kernel (down): bf16-level error for the
//                    activations' rounding
//   fp8 lt a8x2 beta the two terms as two GEMMs, the second adding into the first's bf16
//                    output (beta 1; its weights again, from L2)
//   fp8 sk B         experts_fp8.cu's dense_fp8_sk: moe_gg's FP8 tile over k ranges, enough of
//                    them for about B blocks, f32 sums added by dense_fp8_sk_swiglu / _sum
// Checks: every variant's outputs of layer 0, rows 0 … 15, against a host f32 product of the
// same e4m3 weights and bf16 inputs (relative L2; the inputs have outlier channels, as
// RMSNorm's outputs do).
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o shared_fp8
//          scripts/bench/shared_fp8.cu -lcublasLt -lcublas
// Run on a GPU machine: [TUNE=1] ./shared_fp8 [rows …]   (default 16 32 64 128 256; at most 4,096)
#include "../../engine/src/cuda/kernels.cu"
#include "bench_common.cuh"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_fp8.h>

#include <cmath>
#include <cstring>
#include <vector>

#define CB(x)                                                             \
    do {                                                                  \
        cublasStatus_t s_ = (x);                                          \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                \
            printf("cuBLAS error %d at %s:%d\n", (int)s_, __FILE__, __LINE__); \
            exit(2);                                                      \
        }                                                                 \
    } while (0)

// Every 61st column of x [T, K] times 16: outlier channels.
__global__ void outliers(bf16* x, int T, int K) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < T * K; i += gridDim.x * blockDim.x)
        if ((i % K) % 61 == 7) x[i] = __float2bfloat16(__bfloat162float(x[i]) * 16.f);
}
// From the two-term product's f32 rows [2T, 2N] (term 1's rows, then term 2's): SwiGLU of the
// sums.
__global__ void swiglu2(const float* gu, int T, int N, bf16* y) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < T * N; i += gridDim.x * blockDim.x) {
        const int t = i / N, j = i % N;
        const float* a = gu + (size_t)t * 2 * N;
        const float* b = gu + (size_t)(T + t) * 2 * N;
        y[i] = __float2bfloat16(silu(a[j] + b[j]) * (a[N + j] + b[N + j]));
    }
}
__global__ void sum2(const float* d, int T, int N, bf16* y) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < T * N; i += gridDim.x * blockDim.x)
        y[i] = __float2bfloat16(d[i] + d[(size_t)T * N + i]);
}
// x [T, K] bf16 → e4m3 q [TERMS·T, K] and f32 scales [K/128][TERMS·T] (the token index
// fastest: cuBLASLt's VEC128_32F layout). A warp per (token, 128 columns): term 1 the e4m3 of x
// over its amax / 448; term 2 (TERMS = 2) the same of what term 1 left (rows T … 2T − 1).
// SPLIT: each term's scales a [K/128][T] block of their own (two GEMMs of T rows each).
template <int TERMS, bool SPLIT = false>
__global__ void act_quant(const bf16* x, int T, int K, uint8_t* q, float* s) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    const int kb_n = K / 128;
    if (warp >= T * kb_n) return;
    const int t = warp / kb_n, kb = warp % kb_n;
    const size_t at = (size_t)t * K + kb * 128 + lane * 4;
    float v[4];
    const uint2 raw = *reinterpret_cast<const uint2*>(x + at);
    const bf16* b = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __bfloat162float(b[i]);
#pragma unroll
    for (int term = 0; term < TERMS; ++term) {
        float m = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
        for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        const float sc = m > 0.f ? m / 448.f : 1.f;
        const float inv = 1.f / sc;
        uint32_t packed = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const __nv_fp8_e4m3 e(v[i] * inv);
            packed |= (uint32_t)(*reinterpret_cast<const uint8_t*>(&e)) << (8 * i);
            v[i] -= float(e) * sc;
        }
        const int row = term * T + t;
        *reinterpret_cast<uint32_t*>(q + (size_t)row * K + kb * 128 + lane * 4) = packed;
        if (lane == 0)
            s[SPLIT ? (size_t)term * kb_n * T + (size_t)kb * T + t : (size_t)kb * TERMS * T + row] = sc;
    }
}

struct Proj {
    int N, K;  // y [T, N] = x [T, K] · Wᵀ; gate/up: W [2N, K] and the SwiGLU
    bool gu;
    bf16* w;      // bf16 weights (the bf16 model's)
    uint8_t* q;   // e4m3 [rows, K]
    float* s;     // block scales [rows/128, K/128] (the checkpoint's)
    float* slt;   // the same padded for cuBLASLt: [rows/128, roundup(K/128, 4)]
    bf16* wd;     // dequantisation scratch
};

static float e4m3_to_f32(uint8_t b) {
    const int sign = b >> 7, e = (b >> 3) & 15, m = b & 7;
    const float v = e == 0 ? std::ldexp((float)m, -9) : std::ldexp(1.f + m / 8.f, e - 7);
    return sign ? -v : v;
}

int main(int argc, char** argv) {
    std::vector<int> rows_list;
    for (int i = 1; i < argc; ++i) rows_list.push_back(std::min(std::max(atoi(argv[i]), 1), 4096));
    if (rows_list.empty()) rows_list = {16, 32, 64, 128, 256};
    int TMAX = 16;
    for (int t : rows_list) TMAX = std::max(TMAX, t);
    const int NL = 27, hidden = 2048, inner = 2816;
    const Proj shape[2] = {{inner, hidden, true}, {hidden, inner, false}};
    std::vector<Proj> chain;
    double bf16_bytes = 0, fp8_bytes = 0;
    for (int l = 0; l < NL; ++l)
        for (int i = 0; i < 2; ++i) {
            Proj p = shape[i];
            const int rows = (p.gu ? 2 : 1) * p.N;
            const size_t n = (size_t)rows * p.K;
            const int kb = p.K / 128, kbp = (kb + 3) / 4 * 4;
            const size_t ns = (size_t)(rows / 128) * kb;
            CK(cudaMalloc(&p.w, n * 2));
            CK(cudaMalloc(&p.q, n));
            CK(cudaMalloc(&p.s, ns * 4));
            CK(cudaMalloc(&p.slt, (size_t)(rows / 128) * kbp * 4));
            CK(cudaMalloc(&p.wd, n * 2));
            fill_e4m3<<<1024, 256>>>(p.q, n, 91u * l + i);
            const float sc = 0.15f / std::sqrt((float)p.K);
            fill_f32_range<<<64, 256>>>(p.s, ns, 13u * l + i, 0.5f * sc, 1.5f * sc);
            CK(cudaMemset(p.slt, 0, (size_t)(rows / 128) * kbp * 4));
            CK(cudaMemcpy2D(p.slt, kbp * 4, p.s, kb * 4, kb * 4, rows / 128,
                            cudaMemcpyDeviceToDevice));
            // The bf16 model's weights: the same values (dequantised once).
            fp8_dequant_bf16<<<(unsigned)((n / 8 + 255) / 256), 256>>>(p.q, p.s, rows, p.K, p.w);
            bf16_bytes += n * 2.0;
            fp8_bytes += n + ns * 4.0;
            chain.push_back(p);
        }
    bf16 *xa, *xb, *outs, *gu;
    CK(cudaMalloc(&xa, (size_t)TMAX * hidden * 2));
    CK(cudaMalloc(&xb, (size_t)TMAX * inner * 2));
    CK(cudaMalloc(&outs, chain.size() * (size_t)TMAX * inner * 2));
    CK(cudaMalloc(&gu, (size_t)TMAX * 2 * inner * 2));
    fill_bf16<<<64, 256>>>(xa, (size_t)TMAX * hidden, 5u, 1.f);
    fill_bf16<<<64, 256>>>(xb, (size_t)TMAX * inner, 6u, 0.3f);
    outliers<<<64, 256>>>(xa, TMAX, hidden);
    outliers<<<64, 256>>>(xb, TMAX, inner);
    uint8_t* aq;
    float *as, *d32;
    CK(cudaMalloc(&aq, (size_t)2 * TMAX * inner));
    CK(cudaMalloc(&as, (size_t)2 * TMAX * (inner / 128) * 4));
    CK(cudaMalloc(&d32, (size_t)2 * TMAX * 2 * inner * 4));
    CK(cudaMemset(aq, 0x38, (size_t)2 * TMAX * inner));  // e4m3 1.0, until quantised
    CK(cudaMemset(as, 0, (size_t)2 * TMAX * (inner / 128) * 4));
    CK(cudaDeviceSynchronize());
    const size_t WS = 32u << 20;
    void* ws;
    CK(cudaMalloc(&ws, WS));
    cublasHandle_t h;
    CB(cublasCreate(&h));
    cublasLtHandle_t lt;
    CB(cublasLtCreate(&lt));

    auto gemm = [&](cudaStream_t st, const bf16* x, const bf16* w, int T, int N, int K, bf16* y) {
        const float one = 1.f, zero = 0.f;
        CB(cublasSetStream(h, st));
        CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &one, w, CUDA_R_16BF, K, x,
                        CUDA_R_16BF, K, &zero, y, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F,
                        CUBLAS_GEMM_DEFAULT));
    };
    // One cuBLASLt FP8 product, set up once per (N, K, rows, output type): y [rows, N] =
    // deq(q_act) · deq(W)ᵀ (+ beta · y).
    struct LtPlan {
        cublasLtMatmulDesc_t desc;
        cublasLtMatrixLayout_t a, b, d;
        cublasLtMatmulAlgo_t algo;
        bool ok;
        std::vector<cublasLtMatmulHeuristicResult_t> all;
    };
    auto lt_plan = [&](int N, int K, int rows, cudaDataType_t out) {
        LtPlan p{};
        CB(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        const cublasOperation_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
        CB(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof tA));
        CB(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof tB));
        const int32_t ma = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
                      mb = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
        CB(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &ma, sizeof ma));
        CB(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mb, sizeof mb));
        // Heuristics need the scale pointers set to something; the real ones go in per call.
        const void* dummy = ws;
        CB(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &dummy,
                                          sizeof dummy));
        CB(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &dummy,
                                          sizeof dummy));
        CB(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_8F_E4M3, K, N, K));
        CB(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_8F_E4M3, K, rows, K));
        CB(cublasLtMatrixLayoutCreate(&p.d, out, N, rows, N));
        cublasLtMatmulPreference_t pref;
        CB(cublasLtMatmulPreferenceCreate(&pref));
        CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &WS, sizeof WS));
        cublasLtMatmulHeuristicResult_t r[32];
        int n = 0;
        const cublasStatus_t st =
            cublasLtMatmulAlgoGetHeuristic(lt, p.desc, p.a, p.b, p.d, p.d, pref, 32, r, &n);
        p.ok = st == CUBLAS_STATUS_SUCCESS && n > 0;
        if (p.ok) {
            p.algo = r[0].algo;
            p.all.assign(r, r + n);
        }
        else printf("  (cuBLASLt: no FP8 algorithm for N %d K %d rows %d out %d: status %d)\n",
                    N, K, rows, (int)out, (int)st);
        CB(cublasLtMatmulPreferenceDestroy(pref));
        return p;
    };
    auto lt_run = [&](cudaStream_t st, LtPlan& p, const uint8_t* wq, const float* ws_, const uint8_t* xq,
                      const float* xs, void* y, float beta) {
        CB(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws_,
                                          sizeof ws_));
        CB(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xs,
                                          sizeof xs));
        const float one = 1.f;
        CB(cublasLtMatmul(lt, p.desc, &one, wq, p.a, xq, p.b, &beta, y, p.d, y, p.d, &p.algo, ws,
                          WS, st));
    };

    // Host reference: layer 0's two products, rows 0 … R−1, f32 from the e4m3 weights.
    const int R = 16;
    std::vector<float> ref_gu, ref_dn;
    {
        auto host = [&](const Proj& p, const bf16* xd, int N2) {
            const size_t n = (size_t)N2 * p.K;
            std::vector<uint8_t> q(n);
            std::vector<float> s((size_t)(N2 / 128) * (p.K / 128));
            std::vector<bf16> x((size_t)R * p.K);
            CK(cudaMemcpy(q.data(), p.q, n, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(s.data(), p.s, s.size() * 4, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(x.data(), xd, x.size() * 2, cudaMemcpyDeviceToHost));
            std::vector<float> y((size_t)R * N2);
            std::vector<float> wr(p.K);
            for (int j = 0; j < N2; ++j) {
                for (int k = 0; k < p.K; ++k)
                    wr[k] = e4m3_to_f32(q[(size_t)j * p.K + k]) *
                            s[(size_t)(j / 128) * (p.K / 128) + k / 128];
                for (int t = 0; t < R; ++t) {
                    double a = 0;
                    for (int k = 0; k < p.K; ++k)
                        a += (double)wr[k] * __bfloat162float(x[(size_t)t * p.K + k]);
                    y[(size_t)t * N2 + j] = (float)a;
                }
            }
            return y;
        };
        const std::vector<float> g = host(chain[0], xa, 2 * inner);
        ref_gu.resize((size_t)R * inner);
        for (int t = 0; t < R; ++t)
            for (int j = 0; j < inner; ++j) {
                const float a = g[(size_t)t * 2 * inner + j], b = g[(size_t)t * 2 * inner + inner + j];
                ref_gu[(size_t)t * inner + j] = a / (1.f + std::exp(-a)) * b;
            }
        ref_dn = host(chain[1], xb, hidden);
    }
    auto check = [&](int T) {
        std::vector<bf16> a((size_t)R * inner), b((size_t)R * hidden);
        CK(cudaMemcpy(a.data(), outs, a.size() * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(b.data(), outs + (size_t)TMAX * inner, b.size() * 2, cudaMemcpyDeviceToHost));
        (void)T;
        auto rel = [](const std::vector<bf16>& got, const std::vector<float>& want) {
            double d = 0, n = 0;
            for (size_t i = 0; i < want.size(); ++i) {
                const double x = __bfloat162float(got[i]), y = want[i];
                d += (x - y) * (x - y);
                n += y * y;
            }
            return std::sqrt(d / std::max(n, 1e-30));
        };
        char buf[96];
        snprintf(buf, sizeof buf, "rel L2 gate/up %.2e down %.2e", rel(a, ref_gu), rel(b, ref_dn));
        return std::string(buf);
    };

    const char* names[] = {"bf16 cublas", "fp8 cublas+dq", "fp8 lt a8", "fp8 lt a8x2",
                           "fp8 lt a8x2 beta", "fp8 sk 132", "fp8 sk 264", "fp8 sk 396",
                           "fp8 sk 528"};
    const int NV = sizeof names / sizeof names[0];
    float* part;
    const size_t part_n = (size_t)16 * TMAX * 2 * inner;  // up to 16 k ranges of gate/up sums
    CK(cudaMalloc(&part, part_n * 4));
    CK(cudaFuncSetAttribute(dense_fp8_sk_gate_up, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            64 * 1024));
    CK(cudaFuncSetAttribute(dense_fp8_sk, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            64 * 1024));
    // k ranges for about `blocks` blocks (whole k steps of 64, at least 2 a range, at most 16).
    auto splits = [](int tiles, int K, int blocks) {
        const int kt = K / 64;
        return std::max(1, std::min({(blocks + tiles - 1) / tiles, kt / 2, 16}));
    };
    int printed_for = -1;
    for (int T : rows_list) {
        if (T < R) continue;
        printf("rows %d: 27 layers' shared experts; %.1f MB of weights a replay (bf16), %.1f MB "
               "(e4m3)\n", T, bf16_bytes / 1e6, fp8_bytes / 1e6);
        printf("%-18s %10s %10s %8s %s\n", "variant", "us/replay", "us/layer", "GB/s", "check");
        // Plans: gate/up and down, for T rows (bf16 out), 2T rows (f32 out), T rows again (beta).
        LtPlan p1[2] = {lt_plan(2 * inner, hidden, T, CUDA_R_16BF), lt_plan(hidden, inner, T, CUDA_R_16BF)};
        LtPlan p2[2] = {lt_plan(2 * inner, hidden, 2 * T, CUDA_R_32F),
                        lt_plan(hidden, inner, 2 * T, CUDA_R_32F)};
        // Each plan's GEMM alone over the 27 layers, for every algorithm the heuristics offer:
        // the heuristics' first, and the fastest (kept for the variants below when TUNE=1).
        const bool tune = getenv("TUNE") && atoi(getenv("TUNE")) == 1;
        for (int pi = 0; pi < 4; ++pi) {
            LtPlan& pl = pi < 2 ? p1[pi] : p2[pi - 2];
            if (!pl.ok) continue;
            const bool gup = pi % 2 == 0;
            const int K = gup ? hidden : inner;
            float best = 1e30f, first = 0;
            int bi = 0;
            for (size_t a = 0; a < pl.all.size(); ++a) {
                pl.algo = pl.all[a].algo;
                const float ms = graph_median_ms([&](cudaStream_t st) {
                    for (size_t i = gup ? 0 : 1; i < chain.size(); i += 2)
                        lt_run(st, pl, chain[i].q, chain[i].slt, aq, as, d32, 0.f);
                }, 5, 3);
                (void)K;
                if (a == 0) first = ms;
                if (ms < best) best = ms, bi = (int)a;
            }
            printf("  lt %s rows %d: %zu algorithms; first %.1f us/replay, best (#%d) %.1f\n",
                   gup ? "gate/up" : "down", pi < 2 ? T : 2 * T, pl.all.size(), first * 1e3, bi,
                   best * 1e3);
            pl.algo = pl.all[tune ? bi : 0].algo;
        }
        for (int m = 0; m < NV; ++m) {
            if (m >= 2 && m < 5 && !(m == 3 ? p2[0].ok && p2[1].ok : p1[0].ok && p1[1].ok)) continue;
            CK(cudaMemset(outs, 0, chain.size() * (size_t)TMAX * inner * 2));
            const float ms = graph_median_ms([&](cudaStream_t st) {
                for (size_t i = 0; i < chain.size(); ++i) {
                    const Proj& p = chain[i];
                    const bf16* x = p.gu ? xa : xb;
                    bf16* y = outs + i * (size_t)TMAX * inner;
                    const int wrows = (p.gu ? 2 : 1) * p.N;
                    const int g = (T * p.N + 255) / 256;
                    if (m >= 5) {
                        const int target = 132 * (m - 4);
                        const int ty = (T + 63) / 64, tx = p.gu ? p.N / 64 : p.N / 128;
                        const int S = splits(tx * ty, p.K, target);
                        const dim3 grid(tx, ty, S);
                        if (i < 2 && printed_for != T * 100 + m) {
                            printf("  (sk %s: %d x %d x %d blocks)\n", p.gu ? "gate/up" : "down",
                                   tx, ty, S);
                            if (!p.gu) printed_for = T * 100 + m;
                        }
                        if (p.gu) {
                            dense_fp8_sk_gate_up<<<grid, 128, 64 * 1024, st>>>(x, T, p.K, p.q, p.s, p.N, part);
                            dense_fp8_sk_swiglu<<<(T * p.N / 2 + 255) / 256, 256, 0, st>>>(part, S, T, p.N, y);
                        } else {
                            dense_fp8_sk<<<grid, 128, 64 * 1024, st>>>(x, T, p.K, p.q, p.s, p.N, part);
                            dense_fp8_sk_sum<<<(T * p.N / 2 + 255) / 256, 256, 0, st>>>(part, S, T, p.N, y);
                        }
                        continue;
                    }
                    if (m <= 1) {
                        const bf16* w = p.w;
                        if (m == 1) {
                            const size_t n8 = (size_t)wrows * p.K / 8;
                            fp8_dequant_bf16<<<(unsigned)((n8 + 255) / 256), 256, 0, st>>>(
                                p.q, p.s, wrows, p.K, p.wd);
                            w = p.wd;
                        }
                        if (p.gu) {
                            gemm(st, x, w, T, wrows, p.K, gu);
                            swiglu<<<g, 256, 0, st>>>(gu, T, p.N, y);
                        } else {
                            gemm(st, x, w, T, p.N, p.K, y);
                        }
                        continue;
                    }
                    const int warps = T * (p.K / 128);
                    LtPlan& pl = m == 3 ? p2[p.gu ? 0 : 1] : p1[p.gu ? 0 : 1];
                    if (m == 2) {
                        act_quant<1><<<(warps + 7) / 8, 256, 0, st>>>(x, T, p.K, aq, as);
                        lt_run(st, pl, p.q, p.slt, aq, as, p.gu ? (void*)gu : (void*)y, 0.f);
                        if (p.gu) swiglu<<<g, 256, 0, st>>>(gu, T, p.N, y);
                    } else if (m == 3) {
                        act_quant<2><<<(warps + 7) / 8, 256, 0, st>>>(x, T, p.K, aq, as);
                        lt_run(st, pl, p.q, p.slt, aq, as, d32, 0.f);
                        if (p.gu) swiglu2<<<g, 256, 0, st>>>(d32, T, p.N, y);
                        else sum2<<<g, 256, 0, st>>>(d32, T, p.N, y);
                    } else {
                        // Two GEMMs over T rows each, each term's scales a block of their own.
                        act_quant<2, true><<<(warps + 7) / 8, 256, 0, st>>>(x, T, p.K, aq, as);
                        void* out = p.gu ? (void*)gu : (void*)y;
                        lt_run(st, pl, p.q, p.slt, aq, as, out, 0.f);
                        lt_run(st, pl, p.q, p.slt, aq + (size_t)T * p.K, as + (size_t)(p.K / 128) * T,
                               out, 1.f);
                        if (p.gu) swiglu<<<g, 256, 0, st>>>(gu, T, p.N, y);
                    }
                }
            });
            std::string c = check(T);
            const double us = ms * 1000.0;
            const double bytes = m == 0 ? bf16_bytes : fp8_bytes;
            printf("%-18s %10.1f %10.2f %8.0f %s\n", names[m], us, us / NL, bytes / (us * 1e3),
                   c.c_str());
        }
    }
    return 0;
}
