// Timing of the decode-size routed-expert path (moe_align, moe_gate_up_mma, moe_down_mma,
// moe_combine4) at DeepSeek-V2-Lite's shapes (64 experts, hidden 2048, inner 1408, top-6), as the
// decode step runs it: 26 layers with weights of their own (so no layer's experts sit in L2),
// captured in one CUDA graph and replayed. Prints µs per layer and the bandwidth over the bytes of
// the distinct experts a layer reads: the grid over every slot ("all slots") or over the slots
// with pairs only ("active"), kernels launched as programmatic dependent launches or not
// ("PDL"); checks that all give the same sums, bit for bit. (The load-depth sweep it once ran is
// gone: the depth is the weight policy's CHUNK_STAGES now.)
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o decode_experts scripts/bench/decode_experts.cu
// Run on a GPU machine: ./decode_experts [batch ...]   (default 1 2 8 64; exit 1 on a mismatch)
#include "../../engine/src/cuda/kernels.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#define CK(x)                                                                              \
    do {                                                                                   \
        cudaError_t e = (x);                                                               \
        if (e != cudaSuccess) {                                                            \
            printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
            exit(2);                                                                       \
        }                                                                                  \
    } while (0)

// Fills n bf16 with a hash of the index, scaled: values of either sign, no host transfer.
__global__ void fill_bf16(bf16* p, size_t n, uint32_t seed, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        p[i] = __float2bfloat16(((int)(h & 0xffff) - 32768) * (scale / 32768.f));
    }
}

// The two projections as experts.cu runs them (its pipeline depth is the weight policy's
// CHUNK_STAGES since 2026-11-28; the depth sweep this file did before is in docs/BENCHMARKS.md),
// the down kernel without the folded combine.
__global__ void gate_up_plain(const bf16* x, int hidden, const bf16* w_gu, int inner,
                              const uint32_t* offsets, const uint32_t* active,
                              const uint32_t* sorted, int k_div, bf16* h_out) {
    gate_up_mma<MmaBf16>(x, hidden, w_gu, nullptr, inner, offsets, active, sorted, k_div, h_out);
}
__global__ void down_plain(const bf16* h, int inner, const bf16* w_down, int hidden,
                           const uint32_t* offsets, const uint32_t* active, float* y) {
    down_mma<MmaBf16>(h, inner, w_down, nullptr, hidden, offsets, active, y,
                      CombineTail{nullptr, nullptr, 0, 0, nullptr, nullptr});
}
typedef void (*GateUpFn)(const bf16*, int, const bf16*, int, const uint32_t*, const uint32_t*,
                         const uint32_t*, int, bf16*);
typedef void (*DownFn)(const bf16*, int, const bf16*, int, const uint32_t*, const uint32_t*,
                       float*);
struct Variant {
    const char* name;
    bool active, pdl;
    GateUpFn gu;
    DownFn dn;
};
static const Variant VARIANTS[] = {
    {"all slots ", false, false, gate_up_plain, down_plain},
    {"active    ", true, false, gate_up_plain, down_plain},
    {"active+PDL", true, true, gate_up_plain, down_plain},
};
static const int N_VARIANTS = sizeof(VARIANTS) / sizeof(VARIANTS[0]);

// Launches `kernel` on `st`, with programmatic stream serialisation when `pdl`.
template <typename... Params, typename... Args>
static void launch(bool pdl, cudaStream_t st, dim3 grid, dim3 block, void (*kernel)(Params...),
                   Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.stream = st;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    CK(cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...));
}

int main(int argc, char** argv) {
    const int S = 64, hidden = 2048, inner = 1408, k = 6, L = 26;
    std::vector<int> batches;
    for (int i = 1; i < argc; ++i) batches.push_back(atoi(argv[i]));
    if (batches.empty()) batches = {1, 2, 8, 64};
    const size_t gu_elems = (size_t)S * 2 * inner * hidden, d_elems = (size_t)S * hidden * inner;
    std::vector<bf16*> wgu(L), wd(L);
    for (int l = 0; l < L; ++l) {
        CK(cudaMalloc(&wgu[l], gu_elems * 2));
        CK(cudaMalloc(&wd[l], d_elems * 2));
        fill_bf16<<<1024, 256>>>(wgu[l], gu_elems, 17u + l, 1.f / 45.f);
        fill_bf16<<<1024, 256>>>(wd[l], d_elems, 991u + l, 1.f / 37.f);
    }
    const double expert_bytes = 3.0 * inner * hidden * 2;
    int bad = 0;
    std::mt19937 rng(7);
    for (int T : batches) {
        const int P = T * k;
        std::vector<uint32_t> ids(P);
        std::set<uint32_t> distinct;
        for (int t = 0; t < T; ++t) {
            std::vector<uint32_t> perm(S);
            for (int s = 0; s < S; ++s) perm[s] = s;
            std::shuffle(perm.begin(), perm.end(), rng);
            for (int j = 0; j < k; ++j) {
                ids[t * k + j] = perm[j];
                distinct.insert(perm[j]);
            }
        }
        std::vector<float> w(P, 1.f / k);
        uint32_t *d_ids, *d_off, *d_sorted, *d_pos, *d_active;
        float *d_w, *d_y, *d_out;
        bf16 *d_x, *d_h;
        CK(cudaMalloc(&d_ids, P * 4));
        CK(cudaMalloc(&d_w, P * 4));
        CK(cudaMemcpy(d_ids, ids.data(), P * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_w, w.data(), P * 4, cudaMemcpyHostToDevice));
        CK(cudaMalloc(&d_off, (S + 1) * 4));
        CK(cudaMalloc(&d_active, (S + 1) * 4));
        CK(cudaMalloc(&d_sorted, P * 4));
        CK(cudaMalloc(&d_pos, P * 4));
        CK(cudaMalloc(&d_x, (size_t)T * hidden * 2));
        CK(cudaMalloc(&d_h, (size_t)P * inner * 2));
        CK(cudaMalloc(&d_y, (size_t)P * hidden * 4));
        CK(cudaMalloc(&d_out, (size_t)L * T * hidden * 4));
        fill_bf16<<<64, 256>>>(d_x, (size_t)T * hidden, 5u, 1.f);
        std::vector<std::vector<float>> outs;
        for (int variant = 0; variant < N_VARIANTS; ++variant) {
            const Variant& V = VARIANTS[variant];
            const bool act = V.active, pdl = V.pdl;
            const int gy = act ? std::min(S, P) : S;
            cudaStream_t st;
            CK(cudaStreamCreate(&st));
            cudaGraph_t graph;
            cudaGraphExec_t exec;
            CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
            for (int l = 0; l < L; ++l) {
                uint32_t* a = act ? d_active : nullptr;
                launch(pdl, st, dim3(1), dim3(1024), moe_align, d_ids, P, (const int*)nullptr, S,
                       d_off, d_sorted, d_pos, a, (const uint32_t*)nullptr, 0u,
                       (uint32_t*)nullptr);
                launch(pdl, st, dim3(inner / 32, gy), dim3(128), V.gu, (const bf16*)d_x, hidden,
                       (const bf16*)wgu[l], inner, (const uint32_t*)d_off, (const uint32_t*)a,
                       (const uint32_t*)d_sorted, k, d_h);
                launch(pdl, st, dim3(hidden / 32, gy), dim3(128), V.dn, (const bf16*)d_h, inner,
                       (const bf16*)wd[l], hidden, (const uint32_t*)d_off, (const uint32_t*)a,
                       d_y);
                launch(pdl, st, dim3(T, (hidden / 4 + 255) / 256), dim3(256), moe_combine4,
                       reinterpret_cast<const float4*>(d_y), hidden / 4, d_pos, d_w,
                       (const uint32_t*)nullptr, k,
                       reinterpret_cast<float4*>(d_out + (size_t)l * T * hidden));
            }
            CK(cudaStreamEndCapture(st, &graph));
            CK(cudaGraphInstantiate(&exec, graph, 0));
            for (int i = 0; i < 3; ++i) CK(cudaGraphLaunch(exec, st));
            cudaEvent_t a, b;
            CK(cudaEventCreate(&a));
            CK(cudaEventCreate(&b));
            const int reps = 20;
            CK(cudaEventRecord(a, st));
            for (int i = 0; i < reps; ++i) CK(cudaGraphLaunch(exec, st));
            CK(cudaEventRecord(b, st));
            CK(cudaEventSynchronize(b));
            float ms = 0;
            CK(cudaEventElapsedTime(&ms, a, b));
            const double us_layer = ms * 1000.0 / reps / L;
            const double gbs = distinct.size() * expert_bytes / (us_layer * 1e3);
            printf("batch %3d, %2zu experts, %s: %7.2f us per layer, %6.0f GB/s\n", T,
                   distinct.size(), V.name, us_layer, gbs);
            std::vector<float> o((size_t)L * T * hidden);
            CK(cudaMemcpy(o.data(), d_out, o.size() * 4, cudaMemcpyDeviceToHost));
            outs.push_back(o);
            CK(cudaGraphExecDestroy(exec));
            CK(cudaGraphDestroy(graph));
            CK(cudaStreamDestroy(st));
        }
        for (int v = 1; v < N_VARIANTS; ++v) {
            if (memcmp(outs[0].data(), outs[v].data(), outs[0].size() * 4) != 0) {
                printf("batch %d: MISMATCH between '%s' and '%s'\n", T, VARIANTS[0].name,
                       VARIANTS[v].name);
                bad = 1;
            }
        }
        if (!bad) printf("batch %d: same sums, bit for bit\n", T);
        cudaFree(d_ids); cudaFree(d_w); cudaFree(d_off); cudaFree(d_active); cudaFree(d_sorted);
        cudaFree(d_pos); cudaFree(d_x); cudaFree(d_h); cudaFree(d_y); cudaFree(d_out);
    }
    return bad;
}
