// moemesh's own CUDA kernels: the fused pieces of a DeepSeek decode step that candle lacks.
// Compiled to PTX by engine/build.rs (feature `cuda`) and loaded once per device; the Rust side is
// engine/src/cuda/mod.rs, which checks shapes, alignment and dtypes before every launch.
//
// Conventions:
// - Every kernel exists for f32 and bf16 activations/weights (`_f32` / `_bf16` suffix); the
//   arithmetic is f32 in both (bf16 values are widened on load and rounded once on store).
// - Rows handed to the vectorised loads (`load8`) are 8 elements long multiples and 16-byte
//   aligned; mod.rs guarantees it or falls back to candle ops.
// - Where the result must not depend on scheduling (the MoE combine, softmax sums), the
//   summation order is fixed; atomics only place work, never add values.

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }

// Eight consecutive elements, widened to f32.
__device__ __forceinline__ void load8(const float* p, float v[8]) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16* p, float v[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    v[0] = __uint_as_float(u.x << 16); v[1] = __uint_as_float(u.x & 0xffff0000u);
    v[2] = __uint_as_float(u.y << 16); v[3] = __uint_as_float(u.y & 0xffff0000u);
    v[4] = __uint_as_float(u.z << 16); v[5] = __uint_as_float(u.z & 0xffff0000u);
    v[6] = __uint_as_float(u.w << 16); v[7] = __uint_as_float(u.w & 0xffff0000u);
}
// Weights are read once per step: keep them out of L1.
__device__ __forceinline__ void load8_stream(const float* p, float v[8]) {
    const float4 a = __ldcs(reinterpret_cast<const float4*>(p));
    const float4 b = __ldcs(reinterpret_cast<const float4*>(p + 4));
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8_stream(const bf16* p, float v[8]) {
    const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
    v[0] = __uint_as_float(u.x << 16); v[1] = __uint_as_float(u.x & 0xffff0000u);
    v[2] = __uint_as_float(u.y << 16); v[3] = __uint_as_float(u.y & 0xffff0000u);
    v[4] = __uint_as_float(u.z << 16); v[5] = __uint_as_float(u.z & 0xffff0000u);
    v[6] = __uint_as_float(u.w << 16); v[7] = __uint_as_float(u.w & 0xffff0000u);
}

__device__ __forceinline__ float dot8(const float a[8], const float b[8]) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s = fmaf(a[i], b[i], s);
    return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    const float r = total;
    __syncthreads();
    return r;
}

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

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

// ---------------------------------------------------------------------------------------------
// The query of decoding tokens, split for the absorbed attention in one pass: q [T, H, nope + rope]
// (contiguous) → q_nope [H, T, nope] (copied) and q_pe [H, T, rope] (rotated), both heads-first.
// One thread per (token, head, element of nope + rope/2).

template <typename T>
__device__ void split_q(const T* q, T* q_nope, T* q_pe, const T* cos_t, const T* sin_t, int tokens,
                        int heads, int nope, int rope_dim, int interleaved) {
    const int half = rope_dim / 2;
    const int per = nope + half;
    const size_t n = (size_t)tokens * heads * per;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const int e = (int)(i % per);
        const size_t th = i / per;
        const int h = (int)(th % heads);
        const size_t t = th / heads;
        const T* row = q + (t * heads + h) * (size_t)(nope + rope_dim);
        if (e < nope) {
            q_nope[((size_t)h * tokens + t) * nope + e] = row[e];
        } else {
            const int p = e - nope;
            const T* pe = row + nope;
            T* out = q_pe + ((size_t)h * tokens + t) * rope_dim;
            const float c = to_f(cos_t[t * half + p]), s = to_f(sin_t[t * half + p]);
            const int ia = interleaved ? 2 * p : p;
            const int ib = interleaved ? 2 * p + 1 : p + half;
            const float a = to_f(pe[ia]), b = to_f(pe[ib]);
            out[ia] = from_f<T>(a * c - b * s);
            out[ib] = from_f<T>(b * c + a * s);
        }
    }
}
#define SPLIT_Q(NAME, T)                                                                        \
    extern "C" __global__ void NAME(const T* q, T* q_nope, T* q_pe, const T* cos_t,             \
                                    const T* sin_t, int tokens, int heads, int nope,            \
                                    int rope_dim, int interleaved) {                            \
        split_q<T>(q, q_nope, q_pe, cos_t, sin_t, tokens, heads, nope, rope_dim, interleaved);  \
    }
SPLIT_Q(split_q_f32, float)
SPLIT_Q(split_q_bf16, bf16)

// ---------------------------------------------------------------------------------------------
// The new latents of decoding tokens, straight into the KV pool: for token t (one block each),
// `kv[t] = [c (kv_lora) | k_pe (rope)]` from kv_a_proj; c is RMS-normed (weight `w`), k_pe rotated,
// and both are written at pool row `dst[t]`.

template <typename T>
__device__ void kv_write(const T* kv, const float* w, float eps, const T* cos_t, const T* sin_t,
                         int interleaved, const uint32_t* dst, T* pool_ckv, T* pool_kpe,
                         int kv_lora, int rope_dim) {
    const size_t t = blockIdx.x;
    const int width = kv_lora + rope_dim;
    const T* row = kv + t * width;
    float ss = 0.f;
    for (int i = threadIdx.x; i < kv_lora; i += blockDim.x) {
        const float v = to_f(row[i]);
        ss = fmaf(v, v, ss);
    }
    ss = block_sum(ss);
    const float inv = 1.f / sqrtf(ss / (float)kv_lora + eps);
    const size_t r = dst[t];
    for (int i = threadIdx.x; i < kv_lora; i += blockDim.x) {
        // Round the normed value to T first, as the unfused path stores it.
        pool_ckv[r * kv_lora + i] = from_f<T>(to_f(row[i]) * inv * w[i]);
    }
    const int half = rope_dim / 2;
    const T* pe = row + kv_lora;
    for (int p = threadIdx.x; p < half; p += blockDim.x) {
        const float c = to_f(cos_t[t * half + p]), s = to_f(sin_t[t * half + p]);
        const int ia = interleaved ? 2 * p : p;
        const int ib = interleaved ? 2 * p + 1 : p + half;
        const float a = to_f(pe[ia]), b = to_f(pe[ib]);
        pool_kpe[r * rope_dim + ia] = from_f<T>(a * c - b * s);
        pool_kpe[r * rope_dim + ib] = from_f<T>(b * c + a * s);
    }
}
#define KV_WRITE(NAME, T)                                                                       \
    extern "C" __global__ void NAME(const T* kv, const float* w, float eps, const T* cos_t,    \
                                    const T* sin_t, int interleaved, const uint32_t* dst,       \
                                    T* pool_ckv, T* pool_kpe, int kv_lora, int rope_dim) {      \
        kv_write<T>(kv, w, eps, cos_t, sin_t, interleaved, dst, pool_ckv, pool_kpe, kv_lora,    \
                    rope_dim);                                                                  \
    }
KV_WRITE(kv_write_f32, float)
KV_WRITE(kv_write_bf16, bf16)

// ---------------------------------------------------------------------------------------------
// MLA decode attention in the absorbed form, over the paged latent pool. One block per
// (sequence b, group of MLA_HB heads); the sequence's cache rows are streamed through shared
// memory in tiles of `tile` positions, each tile read once for all the group's heads, with an
// online softmax. Scores: (q_lat·c + q_pe·k_pe)·scale; output: o_lat = Σ p·c, unnormalised until
// the end.
// q_lat element (h, t, d) at q_lat[h*sq_h + t*sq_t + d]; q_pe likewise with sp_*; the sequence's
// query row is qrows[b], its length lens[b] (cache plus the new token, already in the pool), its
// pool rows table[b*lmax + 0..len]. Output element (h, b, d) at out[h*so_h + b*so_b + d].

#define MLA_HB 4
#define MLA_MAXD 4  // kv_lora ≤ MLA_MAXD · blockDim.x

template <typename T>
__device__ void mla_decode(const T* q_lat, long long sq_h, long long sq_t, const T* q_pe,
                           long long sp_h, long long sp_t, const T* ckv, const T* kpe,
                           const uint32_t* table, int lmax, const uint32_t* lens,
                           const uint32_t* qrows, T* out, long long so_h, long long so_b,
                           int heads, int kv_lora, int rope_dim, int tile, float scale,
                           int splits, float* part_o, float* part_ml) {
    extern __shared__ float smem[];
    const int width = kv_lora + rope_dim;
    const int stride = width + 4;  // rows padded so that 8 rows read one column bank-free
    float* q_s = smem;                       // [MLA_HB][stride]
    float* kv_s = q_s + MLA_HB * stride;     // [tile][stride]
    float* p_s = kv_s + tile * stride;       // [MLA_HB][tile]
    float* m_s = p_s + MLA_HB * tile;        // [MLA_HB]
    float* l_s = m_s + MLA_HB;               // [MLA_HB]
    float* c_s = l_s + MLA_HB;               // [MLA_HB]

    const int b = blockIdx.x;
    const int h0 = blockIdx.y * MLA_HB;
    const int nh = min(MLA_HB, heads - h0);
    const int len = (int)lens[b];
    // Split-K (flash decoding): block z takes positions [pos0, pos1) of the sequence.
    const int chunk = (len + splits - 1) / splits;
    const int pos0 = min(len, (int)blockIdx.z * chunk), pos1 = min(len, pos0 + chunk);
    const size_t qt = qrows[b];
    const int tid = threadIdx.x, nt = blockDim.x;

    for (int i = tid; i < MLA_HB * width; i += nt) {
        const int hh = i / width, d = i % width;
        float v = 0.f;
        if (hh < nh) {
            const size_t h = h0 + hh;
            v = d < kv_lora ? to_f(q_lat[h * sq_h + qt * sq_t + d])
                            : to_f(q_pe[h * sp_h + qt * sp_t + (d - kv_lora)]);
        }
        q_s[hh * stride + d] = v;
    }
    if (tid < MLA_HB) {
        m_s[tid] = -INFINITY;
        l_s[tid] = 0.f;
    }
    float acc[MLA_HB][MLA_MAXD];
#pragma unroll
    for (int hh = 0; hh < MLA_HB; ++hh)
#pragma unroll
        for (int i = 0; i < MLA_MAXD; ++i) acc[hh][i] = 0.f;

    // Threads per score: the largest power of two with MLA_HB·tile·g ≤ blockDim.x (≤ 32).
    int g = 1;
    while (g < 32 && MLA_HB * tile * g * 2 <= nt) g *= 2;
    const int lane_g = tid % g, which = tid / g;
    const int chunks_c = kv_lora / 8, chunks_k = rope_dim / 8;

    for (int start = pos0; start < pos1; start += tile) {
        const int n = min(tile, pos1 - start);
        __syncthreads();
        for (int i = tid; i < n * (chunks_c + chunks_k); i += nt) {
            const int j = i / (chunks_c + chunks_k), c = i % (chunks_c + chunks_k);
            const size_t row = table[(size_t)b * lmax + start + j];
            float v[8];
            int d;
            if (c < chunks_c) {
                load8(ckv + row * kv_lora + c * 8, v);
                d = c * 8;
            } else {
                load8(kpe + row * rope_dim + (c - chunks_c) * 8, v);
                d = kv_lora + (c - chunks_c) * 8;
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) kv_s[j * stride + d + e] = v[e];
        }
        __syncthreads();
        {
            // Every thread takes part in the shuffles; those past the last score add zeros.
            const bool mine = which < MLA_HB * tile;
            const int hh = which / tile, j = which % tile;
            float s = 0.f;
            if (mine && j < n) {
                const float* qa = q_s + hh * stride;
                const float* ka = kv_s + j * stride;
                for (int d = lane_g; d < width; d += g) s = fmaf(qa[d], ka[d], s);
            }
            for (int o = g / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o, g);
            if (mine && lane_g == 0)
                p_s[hh * tile + j] = (j < n && hh < nh) ? s * scale : -INFINITY;
        }
        __syncthreads();
        if (tid < MLA_HB) {
            const float m_old = m_s[tid];
            float mx = m_old;
            for (int j = 0; j < n; ++j) mx = fmaxf(mx, p_s[tid * tile + j]);
            // A head past `nh` has only −∞ scores; keep its state finite.
            const bool live = mx != -INFINITY;
            const float corr = (live && m_old != -INFINITY) ? expf(m_old - mx) : (live ? 0.f : 1.f);
            float sum = 0.f;
            for (int j = 0; j < tile; ++j) {
                const float e = (live && j < n) ? expf(p_s[tid * tile + j] - mx) : 0.f;
                p_s[tid * tile + j] = e;
                sum += e;
            }
            l_s[tid] = l_s[tid] * corr + sum;
            m_s[tid] = mx;
            c_s[tid] = corr;
        }
        __syncthreads();
#pragma unroll
        for (int hh = 0; hh < MLA_HB; ++hh) {
            const float corr = c_s[hh];
#pragma unroll
            for (int i = 0; i < MLA_MAXD; ++i) {
                const int d = tid + i * nt;
                if (d < kv_lora) {
                    float a = acc[hh][i] * corr;
                    for (int j = 0; j < n; ++j) a = fmaf(p_s[hh * tile + j], kv_s[j * stride + d], a);
                    acc[hh][i] = a;
                }
            }
        }
    }
    __syncthreads();
    if (part_o) {
        // Unnormalised partial state; mla_combine merges the splits.
#pragma unroll
        for (int hh = 0; hh < MLA_HB; ++hh) {
            if (hh >= nh) break;
            const size_t slot = ((size_t)b * heads + h0 + hh) * splits + blockIdx.z;
#pragma unroll
            for (int i = 0; i < MLA_MAXD; ++i) {
                const int d = tid + i * nt;
                if (d < kv_lora) part_o[slot * kv_lora + d] = acc[hh][i];
            }
            if (tid == 0) {
                part_ml[slot * 2] = m_s[hh];
                part_ml[slot * 2 + 1] = l_s[hh];
            }
        }
        return;
    }
#pragma unroll
    for (int hh = 0; hh < MLA_HB; ++hh) {
        if (hh >= nh) break;
        const float inv = 1.f / l_s[hh];
        const size_t h = h0 + hh;
#pragma unroll
        for (int i = 0; i < MLA_MAXD; ++i) {
            const int d = tid + i * nt;
            if (d < kv_lora) out[h * so_h + (size_t)b * so_b + d] = from_f<T>(acc[hh][i] * inv);
        }
    }
}
#define MLA_DECODE(NAME, T)                                                                     \
    extern "C" __global__ void NAME(                                                            \
        const T* q_lat, long long sq_h, long long sq_t, const T* q_pe, long long sp_h,          \
        long long sp_t, const T* ckv, const T* kpe, const uint32_t* table, int lmax,            \
        const uint32_t* lens, const uint32_t* qrows, T* out, long long so_h, long long so_b,    \
        int heads, int kv_lora, int rope_dim, int tile, float scale, int splits, float* part_o, \
        float* part_ml) {                                                                       \
        mla_decode<T>(q_lat, sq_h, sq_t, q_pe, sp_h, sp_t, ckv, kpe, table, lmax, lens, qrows,  \
                      out, so_h, so_b, heads, kv_lora, rope_dim, tile, scale, splits, part_o,   \
                      part_ml);                                                                 \
    }
MLA_DECODE(mla_decode_f32, float)
MLA_DECODE(mla_decode_bf16, bf16)

// Merges mla_decode's splits: one block per (sequence, head).
template <typename T>
__device__ void mla_combine(const float* part_o, const float* part_ml, int splits, int heads,
                            int kv_lora, T* out, long long so_h, long long so_b) {
    const int b = blockIdx.x, h = blockIdx.y;
    const size_t base = ((size_t)b * heads + h) * splits;
    float mx = -INFINITY;
    for (int z = 0; z < splits; ++z) mx = fmaxf(mx, part_ml[(base + z) * 2]);
    float denom = 0.f;
    for (int z = 0; z < splits; ++z) {
        const float m = part_ml[(base + z) * 2];
        if (m != -INFINITY) denom += expf(m - mx) * part_ml[(base + z) * 2 + 1];
    }
    for (int d = threadIdx.x; d < kv_lora; d += blockDim.x) {
        float o = 0.f;
        for (int z = 0; z < splits; ++z) {
            const float m = part_ml[(base + z) * 2];
            if (m != -INFINITY) o += expf(m - mx) * part_o[(base + z) * kv_lora + d];
        }
        out[(size_t)h * so_h + (size_t)b * so_b + d] = from_f<T>(o / denom);
    }
}
extern "C" __global__ void mla_combine_f32(const float* part_o, const float* part_ml, int splits,
                                           int heads, int kv_lora, float* out, long long so_h,
                                           long long so_b) {
    mla_combine<float>(part_o, part_ml, splits, heads, kv_lora, out, so_h, so_b);
}
extern "C" __global__ void mla_combine_bf16(const float* part_o, const float* part_ml,
                                            int splits, int heads, int kv_lora, bf16* out,
                                            long long so_h, long long so_b) {
    mla_combine<bf16>(part_o, part_ml, splits, heads, kv_lora, out, so_h, so_b);
}

// ---------------------------------------------------------------------------------------------
// MoE routing on the device, one thread per token, exactly as engine/src/router.rs does it on
// the host (same tie rule: the lower index wins). logits [T, E] f32 → ids [T, k], weights [T, k].
// scoring: 0 sigmoid, 1 softmax. method: 0 greedy, 1 group_limited_greedy, 2 noaux_tc.

#define ROUTE_MAX_M 8    // experts per lane: E ≤ 256
#define ROUTE_MAX_K 16
#define ROUTE_WARPS 4
#define ROUTE_NONE 0x7fffffff

// (value, index) `a` beats `b`: a real entry over none, then the larger value, then the lower
// index — the host's order (sort descending, ties to the lower index).
__device__ __forceinline__ bool beats(float va, int ia, float vb, int ib) {
    if (ia == ROUTE_NONE) return false;
    if (ib == ROUTE_NONE) return true;
    return va > vb || (va == vb && ia < ib);
}

// Warp-wide best (value, index, payload); every lane gets it.
__device__ __forceinline__ void warp_best(float& v, int& i, float& p) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        const int i2 = __shfl_xor_sync(0xffffffffu, i, o);
        const float p2 = __shfl_xor_sync(0xffffffffu, p, o);
        if (beats(v2, i2, v, i)) {
            v = v2;
            i = i2;
            p = p2;
        }
    }
}

// One warp per token; lane l holds experts l, l+32, … (at most 8 each).
extern "C" __global__ void moe_route(const float* logits, int tokens, int n_exp,
                                     const float* bias, int scoring, int method, int k,
                                     int n_group, int topk_group, int normalise,
                                     int scale_weights, float scaling, uint32_t* ids,
                                     float* weights) {
    __shared__ float choice_s[ROUTE_WARPS][ROUTE_MAX_M * 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.x * ROUTE_WARPS + warp;
    if (t >= tokens) return;
    const float* l = logits + (size_t)t * n_exp;
    float score[ROUTE_MAX_M], choice[ROUTE_MAX_M];
#pragma unroll
    for (int m = 0; m < ROUTE_MAX_M; ++m) {
        const int e = lane + 32 * m;
        score[m] = e < n_exp ? l[e] : -INFINITY;
    }
    if (scoring == 0) {
#pragma unroll
        for (int m = 0; m < ROUTE_MAX_M; ++m) score[m] = 1.f / (1.f + expf(-score[m]));
    } else {
        float mx = -INFINITY;
#pragma unroll
        for (int m = 0; m < ROUTE_MAX_M; ++m)
            if (lane + 32 * m < n_exp) mx = fmaxf(mx, score[m]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float sum = 0.f;
#pragma unroll
        for (int m = 0; m < ROUTE_MAX_M; ++m) {
            score[m] = lane + 32 * m < n_exp ? expf(score[m] - mx) : 0.f;
            sum += score[m];
        }
        sum = warp_sum(sum);
#pragma unroll
        for (int m = 0; m < ROUTE_MAX_M; ++m) score[m] = score[m] / sum;
    }
#pragma unroll
    for (int m = 0; m < ROUTE_MAX_M; ++m) {
        const int e = lane + 32 * m;
        choice[m] = e < n_exp ? (bias ? score[m] + bias[e] : score[m]) : -INFINITY;
    }
    if (method != 0 && topk_group < n_group) {
        // Group scores, one lane per group (n_group ≤ 32), from the choices in shared memory.
        float* cs = choice_s[warp];
#pragma unroll
        for (int m = 0; m < ROUTE_MAX_M; ++m)
            if (lane + 32 * m < n_exp) cs[lane + 32 * m] = choice[m];
        __syncwarp();
        const int per = n_exp / n_group;
        float gs = -INFINITY;
        int gi = ROUTE_NONE;
        if (lane < n_group) {
            const float* c = cs + lane * per;
            gi = lane;
            if (method == 2) {
                int b1 = 0;
                for (int e = 1; e < per; ++e)
                    if (c[e] > c[b1]) b1 = e;
                int b2 = -1;
                for (int e = 0; e < per; ++e)
                    if (e != b1 && (b2 < 0 || c[e] > c[b2])) b2 = e;
                gs = b2 < 0 ? c[b1] : c[b1] + c[b2];
            } else {
                float mg = -INFINITY;
                for (int e = 0; e < per; ++e) mg = fmaxf(mg, c[e]);
                gs = mg;
            }
        }
        bool kept = false;
        for (int r = 0; r < topk_group; ++r) {
            float v = kept ? -INFINITY : gs, p = 0.f;
            int i = kept ? ROUTE_NONE : gi;
            warp_best(v, i, p);
            if (i == lane) kept = true;
        }
        const unsigned kept_mask = __ballot_sync(0xffffffffu, kept);
#pragma unroll
        for (int m = 0; m < ROUTE_MAX_M; ++m) {
            const int e = lane + 32 * m;
            if (e < n_exp && !((kept_mask >> (e / per)) & 1u)) choice[m] = -INFINITY;
        }
    }
    unsigned taken = 0;
    float w[ROUTE_MAX_K];
    float sum = 0.f;
    for (int r = 0; r < k; ++r) {
        float v = 0.f, p = 0.f;
        int i = ROUTE_NONE;
#pragma unroll
        for (int m = 0; m < ROUTE_MAX_M; ++m) {
            const int e = lane + 32 * m;
            if (e < n_exp && !((taken >> m) & 1u) && beats(choice[m], e, v, i)) {
                v = choice[m];
                i = e;
                p = score[m];
            }
        }
        warp_best(v, i, p);
        if ((i & 31) == lane) taken |= 1u << (i >> 5);
        if (lane == 0) ids[(size_t)t * k + r] = (uint32_t)i;
        w[r] = p;
        sum += p;
    }
    sum += 1e-20f;
    if (lane == 0) {
        for (int r = 0; r < k; ++r) {
            float v = w[r];
            if (normalise) v = v / sum;
            if (scale_weights) v = v * scaling;
            weights[(size_t)t * k + r] = v;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Grouped routed experts. A step's (token, expert) pairs are sorted by expert slot so that each
// expert's weights are read once for all of its tokens:
//   moe_align:    ids [P] (P = T·k) → per-slot offsets [S+1], sorted[q] = pair p, pos[p] = q.
//   moe_gate_up:  h[q, j] = silu(x[row(q)]·Wg[s, j]) · (x[row(q)]·Wu[s, j])   (f32)
//   moe_down:     y[q, r] = h[q]·Wd[s, r]                                      (f32)
//   moe_combine:  out[t, r] = Σ_j w[t, j] · y[pos[t, j], r], in j order        (f32)
// row(q) = sorted[q] / k_div (k_div = k for device routing, 1 when `sorted` holds rows).

#define ALIGN_MAX_S 1024

extern "C" __global__ void moe_align(const uint32_t* ids, int pairs, const int* slot_of,
                                     int n_slots, uint32_t* offsets, uint32_t* sorted,
                                     uint32_t* pos) {
    __shared__ uint32_t cnt[ALIGN_MAX_S];
    __shared__ uint32_t cur[ALIGN_MAX_S];
    for (int s = threadIdx.x; s < n_slots; s += blockDim.x) cnt[s] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int s = slot_of ? slot_of[ids[p]] : (int)ids[p];
        if (s >= 0 && s < n_slots) atomicAdd(&cnt[s], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t acc = 0;
        for (int s = 0; s < n_slots; ++s) {
            offsets[s] = acc;
            cur[s] = acc;
            acc += cnt[s];
        }
        offsets[n_slots] = acc;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int s = slot_of ? slot_of[ids[p]] : (int)ids[p];
        if (s >= 0 && s < n_slots) {
            const uint32_t q = atomicAdd(&cur[s], 1u);
            sorted[q] = (uint32_t)p;
            pos[p] = q;
        } else {
            pos[p] = 0xffffffffu;
        }
    }
}

#define MOE_GROUP 8      // tokens sharing one pass over a weight row
#define MOE_WARPS 4      // warps per block
#define MOE_ROWS 16      // output rows per block

template <typename T>
__device__ void moe_gate_up(const T* x, int hidden, const T* w_gu, int inner,
                            const uint32_t* offsets, const uint32_t* sorted, int k_div,
                            float* h_out) {
    const int s = blockIdx.y;
    const uint32_t beg = offsets[s], end = offsets[s + 1];
    if (beg == end) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunks = hidden / 8;
    for (int j = blockIdx.x * MOE_ROWS + warp; j < min(inner, (int)(blockIdx.x + 1) * MOE_ROWS);
         j += MOE_WARPS) {
        const T* wg = w_gu + ((size_t)2 * s * inner + j) * hidden;
        const T* wu = wg + (size_t)inner * hidden;
        for (uint32_t g0 = beg; g0 < end; g0 += MOE_GROUP) {
            const int n = min((int)(end - g0), MOE_GROUP);
            const T* xr[MOE_GROUP];
#pragma unroll
            for (int i = 0; i < MOE_GROUP; ++i)
                xr[i] = x + (size_t)(sorted[g0 + min(i, n - 1)] / k_div) * hidden;
            float ag[MOE_GROUP], au[MOE_GROUP];
#pragma unroll
            for (int i = 0; i < MOE_GROUP; ++i) ag[i] = au[i] = 0.f;
            for (int c = lane; c < chunks; c += 32) {
                float a[8], b[8];
                load8_stream(wg + c * 8, a);
                load8_stream(wu + c * 8, b);
#pragma unroll
                for (int i = 0; i < MOE_GROUP; ++i) {
                    if (i < n) {
                        float v[8];
                        load8(xr[i] + c * 8, v);
                        ag[i] += dot8(a, v);
                        au[i] += dot8(b, v);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < MOE_GROUP; ++i) {
                if (i < n) {
                    const float gs = warp_sum(ag[i]);
                    const float us = warp_sum(au[i]);
                    if (lane == 0) h_out[(size_t)(g0 + i) * inner + j] = silu(gs) * us;
                }
            }
        }
    }
}

template <typename T>
__device__ void moe_down(const float* h, int inner, const T* w_down, int hidden,
                         const uint32_t* offsets, float* y) {
    const int s = blockIdx.y;
    const uint32_t beg = offsets[s], end = offsets[s + 1];
    if (beg == end) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunks = inner / 8;
    for (int r = blockIdx.x * MOE_ROWS + warp; r < min(hidden, (int)(blockIdx.x + 1) * MOE_ROWS);
         r += MOE_WARPS) {
        const T* wr = w_down + ((size_t)s * hidden + r) * inner;
        for (uint32_t g0 = beg; g0 < end; g0 += MOE_GROUP) {
            const int n = min((int)(end - g0), MOE_GROUP);
            float acc[MOE_GROUP];
#pragma unroll
            for (int i = 0; i < MOE_GROUP; ++i) acc[i] = 0.f;
            for (int c = lane; c < chunks; c += 32) {
                float a[8];
                load8_stream(wr + c * 8, a);
#pragma unroll
                for (int i = 0; i < MOE_GROUP; ++i) {
                    if (i < n) {
                        float v[8];
                        load8(h + (size_t)(g0 + i) * inner + c * 8, v);
                        acc[i] += dot8(a, v);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < MOE_GROUP; ++i) {
                if (i < n) {
                    const float v = warp_sum(acc[i]);
                    if (lane == 0) y[(size_t)(g0 + i) * hidden + r] = v;
                }
            }
        }
    }
}


// bf16 experts on the tensor cores (mma.sync m16n8k16, f32 accumulation): a warp computes 16
// weight rows × 8 tokens per instruction. Each lane loads 16 contiguous bytes of a weight row and
// of a token's activations per 32-wide k block and feeds them to two MMAs; the MMA's k order is
// a permutation of memory order, the same for both operands (a fragment's k positions depend only
// on lane % 4), so the dot products are unchanged.

__device__ __forceinline__ void mma_bf16(float c[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 ldcs16(const bf16* p) {
    return __ldcs(reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ uint4 ld16(const bf16* p) { return *reinterpret_cast<const uint4*>(p); }

// c += A[16 rows, 32 k] · B[32 k, 8 tokens] for one 32-wide k block: lo/hi are this lane's 16
// bytes of rows g and g+8, b its 16 bytes of token g.
__device__ __forceinline__ void mma_k32(float c[4], uint4 lo, uint4 hi, uint4 b) {
    mma_bf16(c, lo.x, hi.x, lo.y, hi.y, b.x, b.y);
    mma_bf16(c, lo.z, hi.z, lo.w, hi.w, b.z, b.w);
}

// Work split: a block's 4 warps take 2 tiles of 16 rows, each tile's k range in two halves
// (warps 2i and 2i+1), added through shared memory in a fixed order. Halving the k range doubles
// the number of warp tasks, so the last wave of a grid that is ~1.3 waves deep idles less.

// The k blocks (of 32) of half `khalf` of `n32` blocks.
__device__ __forceinline__ void k_half(int n32, int khalf, int& kb0, int& kb1) {
    const int mid = (n32 + 1) / 2;
    kb0 = khalf ? mid : 0;
    kb1 = khalf ? n32 : mid;
}

// h[q, j] = silu(x·Wg[j]) · (x·Wu[j]) for 16 columns j per tile; h in bf16 (what the unfused
// bf16 path stores too). Needs hidden % 32 == 0 and inner % 16 == 0.
extern "C" __global__ void moe_gate_up_mma(const bf16* x, int hidden, const bf16* w_gu, int inner,
                                           const uint32_t* offsets, const uint32_t* sorted,
                                           int k_div, bf16* h_out) {
    __shared__ float other[2][32][8];
    const int s = blockIdx.y;
    const uint32_t beg = offsets[s], end = offsets[s + 1];
    if (beg == end) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tile = warp >> 1, khalf = warp & 1;
    const int g = lane >> 2, t = lane & 3;
    const int j0 = (blockIdx.x * 2 + tile) * 16;
    const bool valid = j0 < inner;  // every warp still takes part in the barriers
    const int jc = valid ? j0 : 0;
    const bf16* wg0 = w_gu + ((size_t)2 * s * inner + jc + g) * hidden + t * 8;
    const bf16* wg1 = wg0 + (size_t)8 * hidden;
    const bf16* wu0 = wg0 + (size_t)inner * hidden;
    const bf16* wu1 = wu0 + (size_t)8 * hidden;
    int kb0, kb1;
    k_half(hidden / 32, khalf, kb0, kb1);
    const int k_begin = kb0 * 32, k_end = kb1 * 32;
    for (uint32_t g0 = beg; g0 < end; g0 += 8) {
        const int n = min((int)(end - g0), 8);
        const bf16* xr = x + (size_t)(sorted[g0 + min(g, n - 1)] / k_div) * hidden + t * 8;
        float cg[4] = {0.f, 0.f, 0.f, 0.f}, cu[4] = {0.f, 0.f, 0.f, 0.f};
        if (valid && k_begin < k_end) {
            // Software pipeline: the next block's loads are issued before this block's MMAs.
            uint4 a0 = ldcs16(wg0 + k_begin), a1 = ldcs16(wg1 + k_begin);
            uint4 u0 = ldcs16(wu0 + k_begin), u1 = ldcs16(wu1 + k_begin);
            uint4 b = ld16(xr + k_begin);
#pragma unroll 2
            for (int k = k_begin; k < k_end; k += 32) {
                const int kn = k + 32 < k_end ? k + 32 : k;
                const uint4 na0 = ldcs16(wg0 + kn), na1 = ldcs16(wg1 + kn);
                const uint4 nu0 = ldcs16(wu0 + kn), nu1 = ldcs16(wu1 + kn);
                const uint4 nb = ld16(xr + kn);
                mma_k32(cg, a0, a1, b);
                mma_k32(cu, u0, u1, b);
                a0 = na0;
                a1 = na1;
                u0 = nu0;
                u1 = nu1;
                b = nb;
            }
        }
        if (khalf) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                other[tile][lane][e] = cg[e];
                other[tile][lane][4 + e] = cu[e];
            }
        }
        __syncthreads();
        if (!khalf && valid) {
            // c0, c1: rows g, tokens 2t, 2t+1; c2, c3: row g + 8, same tokens.
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int tok = 2 * t + (e & 1), row = g + (e >> 1) * 8;
                const float gs = cg[e] + other[tile][lane][e];
                const float us = cu[e] + other[tile][lane][4 + e];
                if (tok < n)
                    h_out[(size_t)(g0 + tok) * inner + j0 + row] = __float2bfloat16(silu(gs) * us);
            }
        }
        __syncthreads();
    }
}

// y[q, r] = h[q]·Wd[r] for 16 rows r per tile, f32 out. Needs inner % 32 == 0, hidden % 16 == 0.
extern "C" __global__ void moe_down_mma(const bf16* h, int inner, const bf16* w_down, int hidden,
                                        const uint32_t* offsets, float* y) {
    __shared__ float other[2][32][4];
    const int s = blockIdx.y;
    const uint32_t beg = offsets[s], end = offsets[s + 1];
    if (beg == end) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tile = warp >> 1, khalf = warp & 1;
    const int g = lane >> 2, t = lane & 3;
    const int r0 = (blockIdx.x * 2 + tile) * 16;
    const bool valid = r0 < hidden;
    const int rc = valid ? r0 : 0;
    const bf16* w0 = w_down + ((size_t)s * hidden + rc + g) * inner + t * 8;
    const bf16* w1 = w0 + (size_t)8 * inner;
    int kb0, kb1;
    k_half(inner / 32, khalf, kb0, kb1);
    const int k_begin = kb0 * 32, k_end = kb1 * 32;
    for (uint32_t g0 = beg; g0 < end; g0 += 8) {
        const int n = min((int)(end - g0), 8);
        const bf16* hr = h + (size_t)(g0 + min(g, n - 1)) * inner + t * 8;
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        if (valid && k_begin < k_end) {
            uint4 a0 = ldcs16(w0 + k_begin), a1 = ldcs16(w1 + k_begin), b = ld16(hr + k_begin);
#pragma unroll 2
            for (int k = k_begin; k < k_end; k += 32) {
                const int kn = k + 32 < k_end ? k + 32 : k;
                const uint4 na0 = ldcs16(w0 + kn), na1 = ldcs16(w1 + kn), nb = ld16(hr + kn);
                mma_k32(c, a0, a1, b);
                a0 = na0;
                a1 = na1;
                b = nb;
            }
        }
        if (khalf) {
#pragma unroll
            for (int e = 0; e < 4; ++e) other[tile][lane][e] = c[e];
        }
        __syncthreads();
        if (!khalf && valid) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int tok = 2 * t + (e & 1), row = g + (e >> 1) * 8;
                if (tok < n) y[(size_t)(g0 + tok) * hidden + r0 + row] = c[e] + other[tile][lane][e];
            }
        }
        __syncthreads();
    }
}

#define MOE_KERNELS(SUFFIX, T)                                                                  \
    extern "C" __global__ void moe_gate_up_##SUFFIX(const T* x, int hidden, const T* w_gu,      \
                                                    int inner, const uint32_t* offsets,          \
                                                    const uint32_t* sorted, int k_div,           \
                                                    float* h_out) {                              \
        moe_gate_up<T>(x, hidden, w_gu, inner, offsets, sorted, k_div, h_out);                  \
    }                                                                                           \
    extern "C" __global__ void moe_down_##SUFFIX(const float* h, int inner, const T* w_down,    \
                                                 int hidden, const uint32_t* offsets, float* y) { \
        moe_down<T>(h, inner, w_down, hidden, offsets, y);                                      \
    }
MOE_KERNELS(f32, float)
MOE_KERNELS(bf16, bf16)

// out[t, r] = Σ_j w[j] · y[pos[j], r] over token t's entries j: t·k..t·k+k when row_ptr is null,
// row_ptr[t]..row_ptr[t+1] otherwise. pos = 0xffffffff skips an entry (an expert not held here).
extern "C" __global__ void moe_combine(const float* y, int hidden, const uint32_t* pos,
                                       const float* w, const uint32_t* row_ptr, int k,
                                       float* out) {
    const size_t t = blockIdx.x;
    const uint32_t beg = row_ptr ? row_ptr[t] : (uint32_t)(t * k);
    const uint32_t end = row_ptr ? row_ptr[t + 1] : (uint32_t)(t * k + k);
    for (int r = blockIdx.y * blockDim.x + threadIdx.x; r < hidden; r += gridDim.y * blockDim.x) {
        float sum = 0.f;
        for (uint32_t j = beg; j < end; ++j) {
            const uint32_t q = pos[j];
            if (q != 0xffffffffu) sum = fmaf(w[j], y[(size_t)q * hidden + r], sum);
        }
        out[t * hidden + r] = sum;
    }
}

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

// ---------------------------------------------------------------------------------------------
// Prefill-sized routed experts: a grouped GEMM over padded per-expert segments (the
// `moe_align_block_size` idea). moe_align_blocks sorts a step's (token, expert) pairs by slot
// into segments padded to GG_BM rows, one expert slot per GG_BM-row block (0xffffffff past the
// last block), with no host synchronisation: the grid is sized by an upper bound on the block
// count (pairs / GG_BM + slots) and surplus blocks exit. Then one launch per projection for all
// experts, each block a GG_BM × GG_BN tile on the tensor cores (mma.sync m16n8k16 bf16, f32
// accumulation) fed by a multi-stage cp.async pipeline through swizzled shared memory:
//   moe_gg_gate_up: h[q, j] = silu(x[row(q)]·Wg[s, j]) · (x[row(q)]·Wu[s, j])   (bf16, as the
//                   decode kernels store it); a tile holds 64 gate and the same 64 up columns.
//   moe_gg_down:    y[q, r] = h[q]·Wd[s, r]                                      (f32)
// Padding rows read zeros and are never combined. moe_combine then adds each token's k entries
// in a fixed order (so the result does not depend on scheduling).

#define GG_BM 64
#define GG_BN 128
#define GG_NONE 0xffffffffu

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    const int n = valid ? 16 : 0;  // 0: fill the 16 bytes with zeros, read nothing
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

// Pair p goes to slot slot_of[ids[p]] (ids[p] itself when slot_of is null; out of range: not
// held here, pos[p] = GG_NONE); its token row is pair_rows[p], or p / k_div when that is null.
// Segments are padded to `bm` rows (the GEMM's block rows).
// Out: sorted_rows [max_blocks·bm] (GG_NONE for padding), block_slot [max_blocks], pos [P].
extern "C" __global__ void moe_align_blocks(const uint32_t* ids, int pairs, const int* slot_of,
                                            int n_slots, const uint32_t* pair_rows, int k_div,
                                            int max_blocks, int bm, uint32_t* sorted_rows,
                                            uint32_t* block_slot, uint32_t* pos) {
    __shared__ uint32_t cnt[ALIGN_MAX_S];
    __shared__ uint32_t cur[ALIGN_MAX_S];
    __shared__ uint32_t start[ALIGN_MAX_S + 1];
    for (int s = threadIdx.x; s < n_slots; s += blockDim.x) cnt[s] = 0;
    for (int i = threadIdx.x; i < max_blocks * bm; i += blockDim.x) sorted_rows[i] = GG_NONE;
    for (int b = threadIdx.x; b < max_blocks; b += blockDim.x) block_slot[b] = GG_NONE;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int s = slot_of ? slot_of[ids[p]] : (int)ids[p];
        if (s >= 0 && s < n_slots) atomicAdd(&cnt[s], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t acc = 0;
        for (int s = 0; s < n_slots; ++s) {
            start[s] = acc;
            cur[s] = acc;
            acc += (cnt[s] + bm - 1) / bm * bm;
        }
        start[n_slots] = acc;
    }
    __syncthreads();
    for (int s = threadIdx.x; s < n_slots; s += blockDim.x)
        for (uint32_t b = start[s] / bm; b < start[s + 1] / bm; ++b) block_slot[b] = s;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int s = slot_of ? slot_of[ids[p]] : (int)ids[p];
        if (s >= 0 && s < n_slots) {
            const uint32_t q = atomicAdd(&cur[s], 1u);
            sorted_rows[q] = pair_rows ? pair_rows[p] : (uint32_t)(p / k_div);
            pos[p] = q;
        } else {
            pos[p] = GG_NONE;
        }
    }
}

// Shared-memory tile of rows × BK bf16: 16-byte chunk c of row r sits at chunk c ^ f(r), so the
// 8 rows an ldmatrix phase reads fall in 8 different bank groups (BK 32: two rows share a
// 128-byte line; BK 64: one row is a line).
template <int BK> __device__ __forceinline__ int gg_off(int r, int c) {
    if (BK == 64) return r * 64 + ((c ^ (r & 7)) << 3);
    return r * 32 + ((c ^ ((r >> 1) & 3)) << 3);
}

// One BM × BN tile of a grouped product, WM × WN warps (each (BM/WM) × (BN/WN)), BK-wide k
// steps through a STAGES-deep cp.async pipeline in dynamic shared memory
// (STAGES · (BM + BN) · BK · 2 bytes).
// GATE_UP: a = x [T, K] gathered by sorted_rows, w = w_gu [slots·2N, K], out = h [Ppad, N] bf16;
//   a warp's columns are (BN/WN)/2 gate columns and the same up columns, so the SwiGLU is
//   applied in registers.
// Otherwise: a = h [Ppad, K] by block row, w = w_down [slots·N, K], out = y [Ppad, N] f32.
// K % BK == 0, N % 8 == 0, 16-byte aligned rows.
template <bool GATE_UP, int BM, int BN, int BK, int STAGES, int WM, int WN>
__device__ __forceinline__ void moe_gg(const bf16* __restrict__ a, int K, const bf16* __restrict__ w,
                                       int N, const uint32_t* sorted_rows,
                                       const uint32_t* block_slot, void* out) {
    constexpr int THREADS = WM * WN * 32;
    constexpr int TM = BM / WM, TN = BN / WN;  // warp tile
    constexpr int FM = TM / 16, FN = TN / 8;  // fragments per warp
    constexpr int CH = BK / 8;  // 16-byte chunks per row
    constexpr int A_PER = BM * CH / THREADS, B_PER = BN * CH / THREADS;
    static_assert(TM % 16 == 0 && TN % 16 == 0 && A_PER >= 1 && B_PER >= 1, "tile shape");
    extern __shared__ __align__(128) unsigned char gg_smem[];
    bf16* sa = reinterpret_cast<bf16*>(gg_smem);
    bf16* sb = sa + STAGES * BM * BK;
    const uint32_t blk = blockIdx.y;
    const uint32_t s = block_slot[blk];
    if (s == GG_NONE) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n0 = blockIdx.x * (GATE_UP ? BN / 2 : BN);
    const bf16* asrc[A_PER];
    bool aok[A_PER];
    int aoff[A_PER];
#pragma unroll
    for (int i = 0; i < A_PER; ++i) {
        const int id = tid + i * THREADS, r = id / CH, c = id % CH;
        aoff[i] = gg_off<BK>(r, c);
        const uint32_t q = blk * BM + r;
        if (GATE_UP) {
            const uint32_t row = sorted_rows[q];
            aok[i] = row != GG_NONE;
            asrc[i] = a + (size_t)(aok[i] ? row : 0) * K + c * 8;
        } else {
            aok[i] = true;
            asrc[i] = a + (size_t)q * K + c * 8;
        }
    }
    const bf16* bsrc[B_PER];
    bool bok[B_PER];
    int boff[B_PER];
#pragma unroll
    for (int i = 0; i < B_PER; ++i) {
        const int id = tid + i * THREADS, n = id / CH, c = id % CH;
        boff[i] = gg_off<BK>(n, c);
        size_t wrow;
        if (GATE_UP) {
            const int local = n % TN;
            const int j = n0 + (n / TN) * (TN / 2) + local % (TN / 2);
            bok[i] = j < N;
            wrow = (size_t)s * 2 * N + (local >= TN / 2 ? (size_t)N : 0) + (bok[i] ? j : 0);
        } else {
            const int r = n0 + n;
            bok[i] = r < N;
            wrow = (size_t)s * N + (bok[i] ? r : 0);
        }
        bsrc[i] = w + wrow * K + c * 8;
    }
    const int kt_n = K / BK;
    auto load = [&](int kt, int st) {
        const int k0 = kt * BK;
        bf16* A = sa + st * BM * BK;
        bf16* B = sb + st * BN * BK;
#pragma unroll
        for (int i = 0; i < A_PER; ++i) cp_async16(A + aoff[i], asrc[i] + k0, aok[i]);
#pragma unroll
        for (int i = 0; i < B_PER; ++i) cp_async16(B + boff[i], bsrc[i] + k0, bok[i]);
    };
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < kt_n) load(st, st);
        cp_async_commit();
    }
    const int wm = warp / WN, wn = warp % WN;
    float acc[FM][FN][4];
#pragma unroll
    for (int mi = 0; mi < FM; ++mi)
#pragma unroll
        for (int ni = 0; ni < FN; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
    for (int kt = 0; kt < kt_n; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int nk = kt + STAGES - 1;
        if (nk < kt_n) load(nk, nk % STAGES);
        cp_async_commit();
        const bf16* A = sa + (kt % STAGES) * BM * BK;
        const bf16* B = sb + (kt % STAGES) * BN * BK;
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            uint32_t af[FM][4];
#pragma unroll
            for (int mi = 0; mi < FM; ++mi)
                ldmatrix_x4(af[mi], A + gg_off<BK>(wm * TM + mi * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
            for (int np = 0; np < FN / 2; ++np) {
                uint32_t bf[4];
                ldmatrix_x4(bf, B + gg_off<BK>(wn * TN + np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                               kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
                for (int mi = 0; mi < FM; ++mi) {
                    mma_bf16(acc[mi][2 * np], af[mi][0], af[mi][1], af[mi][2], af[mi][3], bf[0], bf[1]);
                    mma_bf16(acc[mi][2 * np + 1], af[mi][0], af[mi][1], af[mi][2], af[mi][3], bf[2], bf[3]);
                }
            }
        }
    }
    cp_async_wait<0>();
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mi = 0; mi < FM; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const size_t q = (size_t)blk * BM + wm * TM + mi * 16 + g + half * 8;
            if (GATE_UP) {
                bf16* h = reinterpret_cast<bf16*>(out);
#pragma unroll
                for (int ni = 0; ni < FN / 2; ++ni) {
                    const int j = n0 + wn * (TN / 2) + ni * 8 + 2 * t4;
                    if (j < N) {
                        const float h0 = silu(acc[mi][ni][2 * half]) * acc[mi][ni + FN / 2][2 * half];
                        const float h1 =
                            silu(acc[mi][ni][2 * half + 1]) * acc[mi][ni + FN / 2][2 * half + 1];
                        *reinterpret_cast<uint32_t*>(h + q * N + j) = pack_bf16(h0, h1);
                    }
                }
            } else {
                float* y = reinterpret_cast<float*>(out);
#pragma unroll
                for (int ni = 0; ni < FN; ++ni) {
                    const int r = n0 + wn * TN + ni * 8 + 2 * t4;
                    if (r < N)
                        *reinterpret_cast<float2*>(y + q * N + r) =
                            make_float2(acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
                }
            }
        }
    }
}

// The shapes moemesh launches (engine/src/cuda/experts.rs sizes grids and shared memory from
// the same numbers): 64-row blocks (prefill segments of a few hundred pairs per expert waste
// little padding), 128 columns, 4 warps; k steps of 64 in 3 stages (72 KiB of shared memory)
// where both widths are multiples of 64, else of 32 in 4 stages (48 KiB). Measured on the H100
// against 128 × 128 and 64 × 256 tiles and other depths (scripts/bench/prefill_kernels.cu):
// 64 × 128 × 64 was fastest at 512, 2,048 and 8,192 tokens.
#define GG_KERNELS(SFX, BK, STAGES)                                                               \
    extern "C" __global__ void __launch_bounds__(128)                                            \
        moe_gg_gate_up_##SFX(const bf16* x, int hidden, const bf16* w_gu, int inner,             \
                             const uint32_t* sorted_rows, const uint32_t* block_slot, bf16* h) { \
        moe_gg<true, GG_BM, GG_BN, BK, STAGES, 2, 2>(x, hidden, w_gu, inner, sorted_rows,       \
                                                     block_slot, h);                             \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(128)                                            \
        moe_gg_down_##SFX(const bf16* h, int inner, const bf16* w_down, int hidden,              \
                          const uint32_t* sorted_rows, const uint32_t* block_slot, float* y) {   \
        moe_gg<false, GG_BM, GG_BN, BK, STAGES, 2, 2>(h, inner, w_down, hidden, sorted_rows,    \
                                                      block_slot, y);                            \
    }
GG_KERNELS(k64, 64, 3)
GG_KERNELS(k32, 32, 4)

// ---------------------------------------------------------------------------------------------
// MLA prefill attention in the non-absorbed form (as vLLM and FlashInfer prefill do): per head,
// q = [q_nope | q_pe] (NOPE + ROPE), k = [k_nope | k_pe] with k_nope, v from kv_b_proj applied
// to the latents (`kv` [L, H·(NOPE+VD)], each head's k_nope then v) and k_pe [L, ROPE] shared
// by the heads. Query i sits at position q_pos0 + i, key j at k_pos0 + j; i sees j iff
// k_pos0 + j ≤ q_pos0 + i (the causal mask, evaluated in the kernel; nothing of size T × L is
// stored). Online softmax in base 2 (scores pre-multiplied by scale·log2 e).
//
// The keys of a long context come in bounded chunks (one launch each): a launch either writes
// the bf16/f32 output, or keeps its normalised output and log-sum-exp (base 2) in f32 state
// (`o_state` [T, H, VD], `lse_state` [T, H]); `merge` first combines with the state the
// previous chunk left, so the result is the softmax over all chunks.
//
// Tensor-core version (bf16): one block of 4 warps per (64 queries, head), each warp 16 query
// rows; keys in tiles of 64 through shared memory (cp.async), q·k and p·v with mma.sync
// m16n8k16 (f32 accumulation), fragments by ldmatrix. Padded smem rows keep ldmatrix free of
// bank conflicts.

#define FA_BQ 64
#define FA_BKV 64

struct PrefillArgs {
    const void* qn;  // q_nope (i, h, d) at qn[i·qn_rs + h·qn_hs + d]
    int qn_rs, qn_hs;
    const void* qp;  // q_pe (i, h, d) at qp[i·qp_rs + h·qp_hs + d] (rotary applied)
    int qp_rs, qp_hs;
    const void* kv;  // k_nope (j, h, d) at kv[j·kv_rs + h·(NOPE+VD) + d], v at + NOPE
    int kv_rs;
    const void* kpe;  // k_pe (j, d) at kpe[j·kpe_rs + d]
    int kpe_rs;
    int nq, L, H, q_pos0, k_pos0;
    float scale_log2;
    float* o_state;  // [T, H, VD] f32
    float* lse_state;  // [T, H] f32
    int merge;
    void* out;  // (i, h, d) at out[i·o_rs + h·VD + d], null: write the state instead
    int o_rs;
};

// Folds this chunk's normalised output `o` (row lse `lse`) into the state / output for one
// query row and head, `n` consecutive dims starting at d.
template <typename TO>
__device__ __forceinline__ void fa_store(const PrefillArgs& p, int vd, int i, int h, int d,
                                         float lse, float* o, int n) {
    float* os = p.o_state + ((size_t)i * p.H + h) * vd + d;
    if (p.merge) {
        const float prev = p.lse_state[(size_t)i * p.H + h];
        const float mx = fmaxf(prev, lse);
        if (mx != -INFINITY) {
            const float a = exp2f(prev - mx), b = exp2f(lse - mx);
            const float inv = 1.f / (a + b);
            for (int e = 0; e < n; ++e) o[e] = (os[e] * a + o[e] * b) * inv;
        } else {
            for (int e = 0; e < n; ++e) o[e] = 0.f;
        }
    }
    if (p.out) {
        TO* out = reinterpret_cast<TO*>(p.out) + (size_t)i * p.o_rs + (size_t)h * vd + d;
        for (int e = 0; e < n; ++e) out[e] = from_f<TO>(o[e]);
    } else {
        for (int e = 0; e < n; ++e) os[e] = o[e];
    }
}
__device__ __forceinline__ float fa_lse_merged(const PrefillArgs& p, int i, int h, float lse) {
    if (!p.merge) return lse;
    const float prev = p.lse_state[(size_t)i * p.H + h];
    const float mx = fmaxf(prev, lse);
    return mx == -INFINITY ? mx : mx + log2f(exp2f(prev - mx) + exp2f(lse - mx));
}

// SPLIT_P: p·v as (p_hi + p_lo)·v with both halves in bf16 (two MMAs), so the probabilities keep
// ~16 significant bits instead of bf16's 8. The default (MOEMESH_PREFILL_ATTN, engine/src/cuda/
// mod.rs says why); 3% slower than rounding p at 2,048 tokens.
template <int NOPE, int ROPE, int VD, bool SPLIT_P>
__device__ __forceinline__ void mla_prefill_mma(const PrefillArgs& p) {
    constexpr int QK = NOPE + ROPE;
    constexpr int KS = QK + 8;  // smem row strides (elements): 16 bytes of padding
    constexpr int VS = VD + 8;
    __shared__ __align__(128) bf16 sk[FA_BKV * KS];
    __shared__ __align__(128) bf16 sv[FA_BKV * VS];
    const int h = blockIdx.y;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * FA_BQ;  // longest rows first
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const bf16* qn = reinterpret_cast<const bf16*>(p.qn);
    const bf16* qp = reinterpret_cast<const bf16*>(p.qp);
    const bf16* kv = reinterpret_cast<const bf16*>(p.kv);
    const bf16* kpe = reinterpret_cast<const bf16*>(p.kpe);
    // The query tile, through the key buffer, into registers.
    for (int id = tid; id < FA_BQ * (QK / 8); id += 128) {
        const int r = id / (QK / 8), c = id % (QK / 8);
        const int i = q0 + r;
        const bool ok = i < p.nq;
        const int ic = ok ? i : 0;
        const bf16* src = c < NOPE / 8 ? qn + (size_t)ic * p.qn_rs + (size_t)h * p.qn_hs + c * 8
                                       : qp + (size_t)ic * p.qp_rs + (size_t)h * p.qp_hs + (c - NOPE / 8) * 8;
        cp_async16(&sk[r * KS + c * 8], src, ok);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qf[QK / 16][4];
#pragma unroll
    for (int kk = 0; kk < QK / 16; ++kk)
        ldmatrix_x4(qf[kk], &sk[(warp * 16 + (lane & 15)) * KS + kk * 16 + (lane >> 4) * 8]);
    __syncthreads();

    // Keys this tile can see: j < L and k_pos0 + j ≤ q_pos0 + (last query row of the tile).
    const int q_last = min(q0 + FA_BQ, p.nq) - 1;
    const int j_end = min(p.L, p.q_pos0 + q_last - p.k_pos0 + 1);
    const int n_tiles = j_end > 0 ? (j_end + FA_BKV - 1) / FA_BKV : 0;
    auto load_k = [&](int kt) {
        for (int id = tid; id < FA_BKV * (QK / 8); id += 128) {
            const int r = id / (QK / 8), c = id % (QK / 8);
            const int j = kt * FA_BKV + r;
            const bool ok = j < p.L;
            const int jc = ok ? j : 0;
            const bf16* src = c < NOPE / 8 ? kv + (size_t)jc * p.kv_rs + (size_t)h * (NOPE + VD) + c * 8
                                           : kpe + (size_t)jc * p.kpe_rs + (c - NOPE / 8) * 8;
            cp_async16(&sk[r * KS + c * 8], src, ok);
        }
    };
    auto load_v = [&](int kt) {
        for (int id = tid; id < FA_BKV * (VD / 8); id += 128) {
            const int r = id / (VD / 8), c = id % (VD / 8);
            const int j = kt * FA_BKV + r;
            const bool ok = j < p.L;
            const int jc = ok ? j : 0;
            cp_async16(&sv[r * VS + c * 8],
                       kv + (size_t)jc * p.kv_rs + (size_t)h * (NOPE + VD) + NOPE + c * 8, ok);
        }
    };
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    float oacc[VD / 8][4];
#pragma unroll
    for (int n = 0; n < VD / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) oacc[n][e] = 0.f;
    if (n_tiles > 0) load_k(0);
    cp_async_commit();
    for (int kt = 0; kt < n_tiles; ++kt) {
        cp_async_wait<0>();
        __syncthreads();  // k tile in; every warp is done with the previous v tile
        load_v(kt);
        cp_async_commit();
        float sacc[FA_BKV / 8][4];
#pragma unroll
        for (int n = 0; n < FA_BKV / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) sacc[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < QK / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < FA_BKV / 16; ++np) {
                uint32_t bfr[4];
                ldmatrix_x4(bfr, &sk[(np * 16 + (lane & 7) + ((lane >> 4) << 3)) * KS + kk * 16 +
                                     ((lane >> 3) & 1) * 8]);
                mma_bf16(sacc[2 * np], qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], bfr[0], bfr[1]);
                mma_bf16(sacc[2 * np + 1], qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], bfr[2], bfr[3]);
            }
        }
        // Mask, scale, online softmax (rows g and g + 8 of the warp's 16).
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < FA_BKV / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = kt * FA_BKV + n * 8 + 2 * t4 + (e & 1);
                const int i = q0 + warp * 16 + g + (e >> 1) * 8;
                const bool ok = j < p.L && p.k_pos0 + j <= p.q_pos0 + i;
                const float v = ok ? sacc[n][e] * p.scale_log2 : -INFINITY;
                sacc[n][e] = v;
                mx[e >> 1] = fmaxf(mx[e >> 1], v);
            }
        float alpha[2], base[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mn = fmaxf(m[r], mx[r]);
            base[r] = mn == -INFINITY ? 0.f : mn;
            alpha[r] = exp2f(m[r] - base[r]);
            m[r] = mn;
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int n = 0; n < FA_BKV / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float pr = exp2f(sacc[n][e] - base[e >> 1]);
                sacc[n][e] = pr;
                l[e >> 1] += pr;
            }
#pragma unroll
        for (int n = 0; n < VD / 8; ++n) {
            oacc[n][0] *= alpha[0];
            oacc[n][1] *= alpha[0];
            oacc[n][2] *= alpha[1];
            oacc[n][3] *= alpha[1];
        }
        __syncthreads();  // every warp is done with the k tile
        const bool more = kt + 1 < n_tiles;
        if (more) load_k(kt + 1);
        cp_async_commit();
        cp_async_wait<1>();  // the v tile (the next k tile may still be in flight)
        __syncthreads();
#pragma unroll
        for (int kc = 0; kc < FA_BKV / 16; ++kc) {
            const uint32_t a0 = pack_bf16(sacc[2 * kc][0], sacc[2 * kc][1]);
            const uint32_t a1 = pack_bf16(sacc[2 * kc][2], sacc[2 * kc][3]);
            const uint32_t a2 = pack_bf16(sacc[2 * kc + 1][0], sacc[2 * kc + 1][1]);
            const uint32_t a3 = pack_bf16(sacc[2 * kc + 1][2], sacc[2 * kc + 1][3]);
            uint32_t l0 = 0, l1 = 0, l2 = 0, l3 = 0;
            if (SPLIT_P) {
                auto lo = [](uint32_t hi, float x0, float x1) {
                    const __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&hi);
                    return pack_bf16(x0 - __low2float(h), x1 - __high2float(h));
                };
                l0 = lo(a0, sacc[2 * kc][0], sacc[2 * kc][1]);
                l1 = lo(a1, sacc[2 * kc][2], sacc[2 * kc][3]);
                l2 = lo(a2, sacc[2 * kc + 1][0], sacc[2 * kc + 1][1]);
                l3 = lo(a3, sacc[2 * kc + 1][2], sacc[2 * kc + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < VD / 16; ++dp) {
                uint32_t bfr[4];
                ldmatrix_x4_trans(bfr, &sv[(kc * 16 + (lane & 15)) * VS + dp * 16 + (lane >> 4) * 8]);
                mma_bf16(oacc[2 * dp], a0, a1, a2, a3, bfr[0], bfr[1]);
                mma_bf16(oacc[2 * dp + 1], a0, a1, a2, a3, bfr[2], bfr[3]);
                if (SPLIT_P) {
                    mma_bf16(oacc[2 * dp], l0, l1, l2, l3, bfr[0], bfr[1]);
                    mma_bf16(oacc[2 * dp + 1], l0, l1, l2, l3, bfr[2], bfr[3]);
                }
            }
        }
    }
    cp_async_wait<0>();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = q0 + warp * 16 + g + r * 8;
        if (i >= p.nq) continue;
        const float lse = l[r] > 0.f ? m[r] + log2f(l[r]) : -INFINITY;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
#pragma unroll
        for (int n = 0; n < VD / 8; ++n) {
            float o[2] = {oacc[n][2 * r] * inv, oacc[n][2 * r + 1] * inv};
            fa_store<bf16>(p, VD, i, h, n * 8 + 2 * t4, lse, o, 2);
        }
    }
    // The state's lse is written after every dim of the row was merged (fa_store read it).
    __syncwarp();
    if (!p.out && t4 == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = q0 + warp * 16 + g + r * 8;
            if (i >= p.nq) continue;
            const float lse = l[r] > 0.f ? m[r] + log2f(l[r]) : -INFINITY;
            p.lse_state[(size_t)i * p.H + h] = fa_lse_merged(p, i, h, lse);
        }
    }
}

// Kernel parameters: PrefillArgs' fields, in order.
#define FA_PARAMS \
    const void* qn, int qn_rs, int qn_hs, const void* qp, int qp_rs, int qp_hs, const void* kv,  \
    int kv_rs, const void* kpe, int kpe_rs, int nq, int L, int H, int q_pos0, int k_pos0,            \
    float scale_log2, float* o_state, float* lse_state, int merge, void* out, int o_rs
#define FA_ARGS \
    PrefillArgs{qn, qn_rs, qn_hs, qp, qp_rs, qp_hs, kv, kv_rs, kpe, kpe_rs, nq, L, H, q_pos0, \
                k_pos0, scale_log2, o_state, lse_state, merge, out, o_rs}

#define FA_MMA(NAME, NOPE, ROPE, VD, SPLIT)                                                     \
    extern "C" __global__ void __launch_bounds__(128) NAME(FA_PARAMS) {                          \
        mla_prefill_mma<NOPE, ROPE, VD, SPLIT>(FA_ARGS);                                         \
    }
FA_MMA(mla_prefill_mma_192_128, 128, 64, 128, false)
FA_MMA(mla_prefill_mma_48_32, 32, 16, 32, false)
FA_MMA(mla_prefill_mma_split_192_128, 128, 64, 128, true)
FA_MMA(mla_prefill_mma_split_48_32, 32, 16, 32, true)

// The same on the CUDA cores, for f32 and for shapes the tensor-core version does not take: one
// warp per (query row, head); each key's score is a warp sum, lane d holds output dims d, d + 32,
// …; at most FA_SIMPLE_VD (256) value dims.
#define FA_SIMPLE_VD 256
template <typename T>
__device__ __forceinline__ void mla_prefill_simple(const PrefillArgs& p, int nope, int rope, int vd) {
    const int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int h = blockIdx.y, lane = threadIdx.x & 31;
    if (i >= p.nq) return;
    const T* qn = reinterpret_cast<const T*>(p.qn) + (size_t)i * p.qn_rs + (size_t)h * p.qn_hs;
    const T* qp = reinterpret_cast<const T*>(p.qp) + (size_t)i * p.qp_rs + (size_t)h * p.qp_hs;
    const T* kv = reinterpret_cast<const T*>(p.kv);
    const T* kpe = reinterpret_cast<const T*>(p.kpe);
    float o[FA_SIMPLE_VD / 32];
    for (int e = 0; e < FA_SIMPLE_VD / 32; ++e) o[e] = 0.f;
    float m = -INFINITY, l = 0.f;
    const int j_end = min(p.L, p.q_pos0 + i - p.k_pos0 + 1);
    for (int j = 0; j < j_end; ++j) {
        const T* kr = kv + (size_t)j * p.kv_rs + (size_t)h * (nope + vd);
        float s = 0.f;
        for (int d = lane; d < nope; d += 32) s = fmaf(to_f(qn[d]), to_f(kr[d]), s);
        for (int d = lane; d < rope; d += 32)
            s = fmaf(to_f(qp[d]), to_f(kpe[(size_t)j * p.kpe_rs + d]), s);
        s = warp_sum(s) * p.scale_log2;
        const float mn = fmaxf(m, s);
        const float alpha = exp2f(m - mn), pr = exp2f(s - mn);
        l = l * alpha + pr;
        for (int e = 0; e < FA_SIMPLE_VD / 32; ++e) {
            const int d = lane + 32 * e;
            if (d < vd) o[e] = o[e] * alpha + pr * to_f(kr[nope + d]);
        }
        m = mn;
    }
    const float lse = l > 0.f ? m + log2f(l) : -INFINITY;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int e = 0; e < FA_SIMPLE_VD / 32; ++e) {
        const int d = lane + 32 * e;
        if (d < vd) {
            float v = o[e] * inv;
            fa_store<T>(p, vd, i, h, d, lse, &v, 1);
        }
    }
    __syncwarp();
    if (!p.out && lane == 0) p.lse_state[(size_t)i * p.H + h] = fa_lse_merged(p, i, h, lse);
}

extern "C" __global__ void mla_prefill_simple_f32(FA_PARAMS, int nope, int rope, int vd) {
    mla_prefill_simple<float>(FA_ARGS, nope, rope, vd);
}
extern "C" __global__ void mla_prefill_simple_bf16(FA_PARAMS, int nope, int rope, int vd) {
    mla_prefill_simple<bf16>(FA_ARGS, nope, rope, vd);
}

// ---------------------------------------------------------------------------------------------
// A prefill chunk's latents (already normed and rotated) into the paged pool: token t's
// `ckv [kv_lora]` and `kpe [rope]` rows to pool row rows[t], one block per token (one launch
// instead of two copies per 16-token block).
template <typename T>
__device__ __forceinline__ void pool_write(const T* ckv, const T* kpe, const uint32_t* rows,
                                           T* pool_ckv, T* pool_kpe, int kv_lora, int rope) {
    const size_t t = blockIdx.x, dst = rows[t];
    for (int i = threadIdx.x; i < kv_lora; i += blockDim.x)
        pool_ckv[dst * kv_lora + i] = ckv[t * kv_lora + i];
    for (int i = threadIdx.x; i < rope; i += blockDim.x) pool_kpe[dst * rope + i] = kpe[t * rope + i];
}
extern "C" __global__ void pool_write_f32(const float* ckv, const float* kpe, const uint32_t* rows,
                                          float* pool_ckv, float* pool_kpe, int kv_lora, int rope) {
    pool_write<float>(ckv, kpe, rows, pool_ckv, pool_kpe, kv_lora, rope);
}
extern "C" __global__ void pool_write_bf16(const bf16* ckv, const bf16* kpe, const uint32_t* rows,
                                           bf16* pool_ckv, bf16* pool_kpe, int kv_lora, int rope) {
    pool_write<bf16>(ckv, kpe, rows, pool_ckv, pool_kpe, kv_lora, rope);
}

// ---------------------------------------------------------------------------------------------
// Rotary on the rows of a strided [T, H, rope] view (x (t, h, d) at x[t·rs + h·hs + d]) into a
// contiguous [T, H, rope], computed in f32 and rounded once (as split_q and kv_write do); one
// thread per (token, head, pair). cos/sin [T, rope / 2].
template <typename T>
__device__ __forceinline__ void rope_rows(const T* x, int rs, int hs, const T* cos_t,
                                          const T* sin_t, T* out, int tokens, int heads, int rope,
                                          int interleaved) {
    const int half = rope / 2;
    const size_t n = (size_t)tokens * heads * half;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const int pr = (int)(i % half);
        const size_t th = i / half;
        const int h = (int)(th % heads);
        const size_t t = th / heads;
        const T* row = x + t * (size_t)rs + (size_t)h * hs;
        T* o = out + th * rope;
        const float c = to_f(cos_t[t * half + pr]), s = to_f(sin_t[t * half + pr]);
        const int ia = interleaved ? 2 * pr : pr;
        const int ib = interleaved ? 2 * pr + 1 : pr + half;
        const float a = to_f(row[ia]), b = to_f(row[ib]);
        o[ia] = from_f<T>(a * c - b * s);
        o[ib] = from_f<T>(b * c + a * s);
    }
}
extern "C" __global__ void rope_rows_f32(const float* x, int rs, int hs, const float* cos_t,
                                         const float* sin_t, float* out, int tokens, int heads,
                                         int rope, int interleaved) {
    rope_rows<float>(x, rs, hs, cos_t, sin_t, out, tokens, heads, rope, interleaved);
}
extern "C" __global__ void rope_rows_bf16(const bf16* x, int rs, int hs, const bf16* cos_t,
                                          const bf16* sin_t, bf16* out, int tokens, int heads,
                                          int rope, int interleaved) {
    rope_rows<bf16>(x, rs, hs, cos_t, sin_t, out, tokens, heads, rope, interleaved);
}
