// What the standalone kernel benches (scripts/bench/*.cu) share: the CUDA error check, the
// timing of a captured CUDA graph's replays, and random-looking bf16 test data.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_runtime.h>

#define CK(x)                                                                              \
    do {                                                                                   \
        cudaError_t e_ = (x);                                                              \
        if (e_ != cudaSuccess) {                                                           \
            printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
            exit(2);                                                                       \
        }                                                                                  \
    } while (0)

// The launches `capture(stream)` queues, captured once as a CUDA graph, replayed 3 times to warm
// up (then checked for errors), then timed: the median over `rounds` of `replays` back-to-back
// replays, in ms per replay. The graph and stream are gone on return; the last replay's results
// are in device memory.
template <typename Capture>
float graph_median_ms(Capture capture, int replays = 10, int rounds = 7) {
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    capture(st);
    CK(cudaStreamEndCapture(st, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < 3; ++i) CK(cudaGraphLaunch(exec, st));
    CK(cudaStreamSynchronize(st));
    CK(cudaGetLastError());
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> times;
    for (int r = 0; r < rounds; ++r) {
        CK(cudaEventRecord(a, st));
        for (int i = 0; i < replays; ++i) CK(cudaGraphLaunch(exec, st));
        CK(cudaEventRecord(b, st));
        CK(cudaEventSynchronize(b));
        float ms = 0;
        CK(cudaEventElapsedTime(&ms, a, b));
        times.push_back(ms / replays);
    }
    std::sort(times.begin(), times.end());
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    CK(cudaStreamDestroy(st));
    return times[times.size() / 2];
}

// Random-looking test data (the benches include engine/src/cuda/kernels.cu first, for bf16):
// a hash of the index, and n bf16 of either sign in (−scale, scale) from it.
__device__ __forceinline__ uint32_t mix(uint32_t h) {
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    h *= 3266489917u;
    h ^= h >> 16;
    return h;
}
__global__ void fill_bf16(bf16* p, size_t n, uint32_t seed, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const uint32_t h = mix((uint32_t)i * 2654435761u ^ seed);
        p[i] = __float2bfloat16(((int)(h & 0xffff) - 32768) * (scale / 32768.f));
    }
}
// n e4m3 of either sign, exponents 4 … 11 (magnitudes 2^-3 … 2^4), no NaN.
__global__ void fill_e4m3(uint8_t* p, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const uint32_t h = mix((uint32_t)i * 2654435761u ^ seed);
        p[i] = (uint8_t)((h & 0x80u) | ((4u + ((h >> 8) & 7u)) << 3) | ((h >> 16) & 7u));
    }
}
// n f32 in [lo, hi).
__global__ void fill_f32_range(float* p, size_t n, uint32_t seed, float lo, float hi) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = lo + (hi - lo) * (mix((uint32_t)i ^ seed) & 0xffff) / 65536.f;
}
// y[t, j] = silu(g[t, j]) · u[t, j] from gu [T, 2N] (the engine's silu_mul after cuBLAS).
__global__ void swiglu(const bf16* gu, int T, int N, bf16* y) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < T * N; i += gridDim.x * blockDim.x) {
        const int t = i / N, j = i % N;
        const float g = __bfloat162float(gu[(size_t)t * 2 * N + j]);
        const float u = __bfloat162float(gu[(size_t)t * 2 * N + N + j]);
        y[i] = __float2bfloat16(silu(g) * u);
    }
}
