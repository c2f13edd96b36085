// A batch-1 decode step's dense projections as the step runs them, one after another: per layer
// V2-Lite's stacked q / kv_a projection (3,648 × 2,048), o_proj (2,048 × 2,048), the shared
// experts' gate/up + SwiGLU (2 × 2,816 × 2,048) and down (2,048 × 2,816), each kernel's input the
// previous one's output, 27 layers with weights of their own (nothing left in L2), captured in
// one CUDA graph and replayed. Prints µs per kernel for each way of launching the chain:
//   plain      dense.cu's kernels as the engine launches them (each starts when the one before it
//              has finished)
//   pdl        programmatic dependent launch: each kernel lets the next be scheduled at once
//              (griddepcontrol.launch_dependents) and waits for the one before it
//              (griddepcontrol.wait) before it reads anything
//   pdl+pf     as pdl, and before waiting each block asks L2 for its own weight rows
//              (cp.async.bulk.prefetch.L2: the weights are the step's constants, so they may be
//              read before the kernel ahead has finished); the kernel then reads them from L2
//   pf         the prefetch without PDL (the control: nothing to overlap)
//   pdl late   PDL with the wait first and the trigger after it (the dependents scheduled only
//              once this kernel runs)
//   csN        dense.cu's kernel with N 64-wide chunks in flight a warp (its own: 2)
//   no-op      the same grids doing nothing, plain and with PDL: the launches alone
// Checks: every variant's 108 outputs bit-equal to `plain`'s (a kernel that read its input early
// would differ).
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o chain_pdl scripts/bench/chain_pdl.cu
// Run on a GPU machine: ./chain_pdl [rows]   (default 1; exit 1 on a mismatch)
#include "../../engine/src/cuda/kernels.cu"
#include "bench_common.cuh"

#include <cmath>
#include <cstring>
#include <vector>

// The block's weight rows into L2: rows j0 .. j0 + 15 (and the up rows N + j0 .. for GU), K
// values each, one bulk prefetch a row.
template <bool GU>
__device__ __forceinline__ void prefetch_rows(const bf16* w, int K, int N) {
    const int j0 = blockIdx.x * 16;
    const int r = threadIdx.x;
    if (r < (GU ? 32 : 16)) {
        const int row = (GU && r >= 16) ? N + j0 + (r - 16) : j0 + r;
        const bf16* p = w + (size_t)row * K;
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(K * 2)
                     : "memory");
    }
}

// bf16 with CS chunks in flight (dense.cu's: MmaBf16's 2).
template <int CS>
struct Bf16Stages : MmaBf16 {
    static constexpr int CHUNK_STAGES = CS;
    __device__ static Bf16Stages at(const QuantArgs&, size_t, int, int, int) { return {}; }
};
template <bool GU, int CS>
__global__ void __launch_bounds__(DENSE_WARPS * 32)
    dense_cs(const bf16* x, int rows, int K, const bf16* w, int N, bf16* y) {
    dense_mma<GU, Bf16Stages<CS>>(x, rows, K, w, nullptr, N, y);
}

// MODE 0: plain; 1: trigger, wait; 2: prefetch, trigger, wait; 3: wait, trigger.
template <bool GU, int MODE>
__global__ void __launch_bounds__(DENSE_WARPS * 32)
    dense_chain(const bf16* x, int rows, int K, const bf16* w, int N, bf16* y) {
    if (MODE == 2) prefetch_rows<GU>(w, K, N);
    if (MODE == 1 || MODE == 2) {
        pdl_trigger();
        pdl_wait();
    } else if (MODE == 3) {
        pdl_wait();
        pdl_trigger();
    }
    dense_mma<GU, MmaBf16>(x, rows, K, w, nullptr, N, y);
}
template <int MODE>
__global__ void empty_chain(const bf16*, int, int, const bf16*, int, bf16*) {
    if (MODE) {
        pdl_trigger();
        pdl_wait();
    }
}

typedef void (*Kern)(const bf16*, int, int, const bf16*, int, bf16*);

static void launch(cudaStream_t st, bool pdl, Kern k, int blocks, const bf16* x, int rows, int K,
                   const bf16* w, int N, bf16* y) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(DENSE_WARPS * 32);
    cfg.stream = st;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    CK(cudaLaunchKernelEx(&cfg, k, x, rows, K, w, N, y));
}

struct Proj {
    int N, K;
    bool gu;
    bf16* w;
};

int main(int argc, char** argv) {
    const int T = argc > 1 ? atoi(argv[1]) : 1;
    const int NL = 27, hidden = 2048, shared = 2816;
    const Proj shape[4] = {{3648, hidden, false, nullptr},
                           {hidden, hidden, false, nullptr},
                           {shared, hidden, true, nullptr},
                           {hidden, shared, false, nullptr}};
    std::vector<Proj> chain;
    double bytes = 0;
    for (int l = 0; l < NL; ++l)
        for (int i = 0; i < 4; ++i) {
            Proj p = shape[i];
            const size_t n = (size_t)(p.gu ? 2 : 1) * p.N * p.K;
            CK(cudaMalloc(&p.w, n * 2));
            fill_bf16<<<1024, 256>>>(p.w, n, 77u * l + i, 1.7f / std::sqrt((float)p.K));
            bytes += n * 2.0;
            chain.push_back(p);
        }
    // Output of kernel i at outs + i·T·4096 (every output ≤ 3,648 wide); kernel i's input is
    // kernel i − 1's output (its first K columns; a row stride of K), the first kernel's x0.
    const size_t ostride = (size_t)T * 4096;
    bf16 *x0, *outs;
    CK(cudaMalloc(&x0, (size_t)T * hidden * 2));
    CK(cudaMalloc(&outs, chain.size() * ostride * 2));
    fill_bf16<<<64, 256>>>(x0, (size_t)T * hidden, 5u, 1.f);
    CK(cudaDeviceSynchronize());

    struct Variant {
        const char* name;
        bool pdl, empty;
        Kern plain, gu;
    };
    const Variant variants[] = {
        {"plain", false, false, dense_chain<false, 0>, dense_chain<true, 0>},
        {"pdl", true, false, dense_chain<false, 1>, dense_chain<true, 1>},
        {"pdl+pf", true, false, dense_chain<false, 2>, dense_chain<true, 2>},
        {"pf", false, false, dense_chain<false, 2>, dense_chain<true, 2>},
        {"pdl late", true, false, dense_chain<false, 3>, dense_chain<true, 3>},
        {"cs3", false, false, dense_cs<false, 3>, dense_cs<true, 3>},
        {"cs4", false, false, dense_cs<false, 4>, dense_cs<true, 4>},
        {"cs6", false, false, dense_cs<false, 6>, dense_cs<true, 6>},
        {"no-op", false, true, empty_chain<0>, empty_chain<0>},
        {"no-op pdl", true, true, empty_chain<1>, empty_chain<1>},
    };
    std::vector<bf16> ref(chain.size() * ostride), got(ref.size());
    int bad = 0;
    printf("rows %d: %zu kernels, %.1f MB of weights a replay\n", T, chain.size(), bytes / 1e6);
    printf("%-10s %10s %10s %8s %s\n", "variant", "us/replay", "us/kernel", "GB/s", "check");
    for (const Variant& v : variants) {
        CK(cudaMemset(outs, 0, ref.size() * 2));
        const float ms = graph_median_ms([&](cudaStream_t st) {
            for (size_t i = 0; i < chain.size(); ++i) {
                const Proj& p = chain[i];
                const bf16* x = i == 0 ? x0 : outs + (i - 1) * ostride;
                // the first kernel of a replay after the previous replay's last: keep it plain
                const bool pdl = v.pdl && i > 0;
                launch(st, pdl, p.gu ? v.gu : v.plain, p.N / 16, x, T, p.K, p.w, p.N,
                       outs + i * ostride);
            }
        });
        CK(cudaMemcpy(got.data(), outs, got.size() * 2, cudaMemcpyDeviceToHost));
        char check[96] = "";
        if (v.empty) {
            snprintf(check, sizeof check, "(launches only)");
        } else if (&v == &variants[0]) {
            ref = got;
            double ss = 0;
            for (bf16 b : ref) ss += (double)__bfloat162float(b) * __bfloat162float(b);
            snprintf(check, sizeof check, "(reference; rms %.3g)", std::sqrt(ss / ref.size()));
        } else {
            const bool same = memcmp(ref.data(), got.data(), ref.size() * 2) == 0;
            snprintf(check, sizeof check, "%s", same ? "bit-equal to plain" : "DIFFERS from plain");
            bad |= !same;
        }
        const double us = ms * 1000.0;
        printf("%-10s %10.1f %10.2f %8.0f %s\n", v.name, us, us / chain.size(),
               v.empty ? 0.0 : bytes / (us * 1e3), check);
    }
    return bad;
}
