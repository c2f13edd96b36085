// Row-wise kernels of every layer: RMSNorm, the residual adds and SwiGLU. Launched from
// engine/src/cuda/mod.rs (`Gpu::rms_norm`, `residual_add`, `silu_mul`).

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// RMSNorm: out = x / sqrt(mean(x²) + eps) · w, one block per row. `out` in TO (may be null),
// `out_f32` an optional second f32 copy (the router scores the f32 normed activations).

template <typename TI, typename TO>
__device__ void rms_norm(const TI* __restrict__ x, const float* __restrict__ w, TO* out,
                         float* out_f32, int d, float eps) {
    const size_t row = blockIdx.x;
    const TI* xr = x + row * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = to_f(xr[i]);
        ss = fmaf(v, v, ss);
    }
    ss = block_sum(ss);
    const float inv = 1.f / sqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = to_f(xr[i]) * inv * w[i];
        if (out) out[row * d + i] = from_f<TO>(v);
        if (out_f32) out_f32[row * d + i] = v;
    }
}

#define RMS_NORM(NAME, TI, TO)                                                                  \
    extern "C" __global__ void NAME(const TI* x, const float* w, TO* out, float* out_f32,       \
                                    int d, float eps) {                                         \
        rms_norm<TI, TO>(x, w, out, out_f32, d, eps);                                           \
    }
RMS_NORM(rms_norm_f32_f32, float, float)
RMS_NORM(rms_norm_f32_bf16, float, bf16)
RMS_NORM(rms_norm_bf16_bf16, bf16, bf16)
RMS_NORM(rms_norm_bf16_f32, bf16, float)

// ---------------------------------------------------------------------------------------------
// Residual: out = x + (a) + (b), x and out f32 (the residual stream), `a` in T and `b` f32, either
// null. The two deltas are added first, as the unfused path does (shared + routed, then residual).

template <typename T>
__device__ void residual_add(const float* x, const T* a, const float* b, float* out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float d = 0.f;
        if (b) d = b[i];
        if (a) d = b ? to_f(a[i]) + d : to_f(a[i]);
        out[i] = x[i] + d;
    }
}
extern "C" __global__ void residual_add_f32(const float* x, const float* a, const float* b,
                                            float* out, unsigned long long n) {
    residual_add<float>(x, a, b, out, n);
}
extern "C" __global__ void residual_add_bf16(const float* x, const bf16* a, const float* b,
                                             float* out, unsigned long long n) {
    residual_add<bf16>(x, a, b, out, n);
}

// SwiGLU on a fused gate|up row: out[t, j] = silu(gu[t, j]) · gu[t, inner + j].
template <typename T>
__device__ void silu_mul(const T* gu, T* out, int rows, int inner) {
    const size_t n = (size_t)rows * inner;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / inner, j = i % inner;
        const float g = to_f(gu[t * 2 * inner + j]);
        const float u = to_f(gu[t * 2 * inner + inner + j]);
        out[i] = from_f<T>(silu(g) * u);
    }
}
extern "C" __global__ void silu_mul_f32(const float* gu, float* out, int rows, int inner) {
    silu_mul<float>(gu, out, rows, inner);
}
extern "C" __global__ void silu_mul_bf16(const bf16* gu, bf16* out, int rows, int inner) {
    silu_mul<bf16>(gu, out, rows, inner);
}
