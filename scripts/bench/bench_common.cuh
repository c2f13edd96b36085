// What the standalone kernel benches (scripts/bench/*.cu) share: the CUDA error check and the
// timing of a captured CUDA graph's replays.
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
