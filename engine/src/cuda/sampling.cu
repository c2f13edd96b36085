// Sampling on the device: greedy arg-max with its log-probability. Launched from
// engine/src/cuda/mod.rs (`Gpu::argmax_logprob`).

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// Greedy sampling on the device: per row of f32 logits, the arg-max (lowest index on ties, NaN
// never chosen) and its log-softmax, as engine/src/sampling.rs computes them (sum in f64).

extern "C" __global__ void argmax_logprob(const float* logits, int vocab, uint32_t* token,
                                          float* logprob) {
    const float* l = logits + (size_t)blockIdx.x * vocab;
    __shared__ float bv[1024];
    __shared__ int bi[1024];
    __shared__ double part[32];
    float best = -INFINITY;
    int idx = -1;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = l[i];
        if (v != v) continue;
        if (idx < 0 || v > best) {
            best = v;
            idx = i;
        }
    }
    bv[threadIdx.x] = best;
    bi[threadIdx.x] = idx;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) {
            const float v2 = bv[threadIdx.x + o];
            const int i2 = bi[threadIdx.x + o];
            const float v1 = bv[threadIdx.x];
            const int i1 = bi[threadIdx.x];
            const bool take = i2 >= 0 && (i1 < 0 || v2 > v1 || (v2 == v1 && i2 < i1));
            if (take) {
                bv[threadIdx.x] = v2;
                bi[threadIdx.x] = i2;
            }
        }
        __syncthreads();
    }
    const float mx = bv[0];
    const int arg = bi[0] < 0 ? 0 : bi[0];
    double s = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = l[i];
        if (v == v) s += (double)expf(v - mx);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double tot = 0.0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) tot += part[w];
        token[blockIdx.x] = (uint32_t)arg;
        logprob[blockIdx.x] = (float)((double)(l[arg] - mx) - log(tot));
    }
}
