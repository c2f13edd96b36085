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

// ---------------------------------------------------------------------------------------------
// The residual add and the next block's RMSNorm in one pass over each row (one block per row):
// h = x + (a + b), exactly as residual_add (the deltas first; `a` in TA, `b` f32, either null),
// written to `h` (`b` may come in `nb` f32 parts b, b1, b2, b3, summed in that order first, as
// add_parts_f32 sums them: the expert workers' partial sums where they wrote them); then out = h / sqrt(mean(h²) + eps) · w as rms_norm computes it (the sum of
// squares in another order: a last-bit difference in the scale), `out` in TO and `out_f32` an
// optional f32 copy (the router's). Eight columns a thread: d % 8 == 0, rows 16-byte aligned.

__device__ __forceinline__ void store8(float* p, const float v[8]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(bf16* p, const float v[8]) {
    *reinterpret_cast<uint4*>(p) = make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]),
                                              pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
}

template <typename TA, typename TO>
__device__ __forceinline__ void add_rms_norm(const float* __restrict__ x, const TA* __restrict__ a,
                                             const float* __restrict__ b, const float* b1,
                                             const float* b2, const float* b3, int nb,
                                             float* __restrict__ h, const float* __restrict__ w,
                                             TO* __restrict__ out, float* __restrict__ out_f32,
                                             int d, float eps) {
    const size_t o = (size_t)blockIdx.x * d;
    const float* more[3] = {b1, b2, b3};
    float ss = 0.f;
    for (int i = threadIdx.x * 8; i < d; i += blockDim.x * 8) {
        float hv[8], av[8], bv[8];
        load8(x + o + i, hv);
        if (a) load8(a + o + i, av);
        if (b) {
            load8(b + o + i, bv);
            for (int p = 1; p < nb; ++p) {
                float pv[8];
                load8(more[p - 1] + o + i, pv);
#pragma unroll
                for (int k = 0; k < 8; ++k) bv[k] += pv[k];
            }
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            float dk = 0.f;
            if (b) dk = bv[k];
            if (a) dk = b ? av[k] + dk : av[k];
            hv[k] += dk;
            ss = fmaf(hv[k], hv[k], ss);
        }
        store8(h + o + i, hv);
    }
    ss = block_sum(ss);
    const float inv = 1.f / sqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x * 8; i < d; i += blockDim.x * 8) {
        float hv[8], wv[8];
        load8(h + o + i, hv);  // this thread's own writes above
        load8(w + i, wv);
#pragma unroll
        for (int k = 0; k < 8; ++k) hv[k] = hv[k] * inv * wv[k];
        if (out) store8(out + o + i, hv);
        if (out_f32) store8(out_f32 + o + i, hv);
    }
}

#define ADD_RMS_NORM(NAME, TA, TO)                                                              \
    extern "C" __global__ void NAME(const float* x, const TA* a, const float* b, float* h,      \
                                    const float* w, TO* out, float* out_f32, int d, float eps) { \
        add_rms_norm<TA, TO>(x, a, b, nullptr, nullptr, nullptr, 1, h, w, out, out_f32, d, eps); \
    }
ADD_RMS_NORM(add_rms_norm_f32_f32, float, float)
ADD_RMS_NORM(add_rms_norm_f32_bf16, float, bf16)
ADD_RMS_NORM(add_rms_norm_bf16_f32, bf16, float)
ADD_RMS_NORM(add_rms_norm_bf16_bf16, bf16, bf16)

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
