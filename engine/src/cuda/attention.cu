// MLA attention: the decode path over the paged latent pool (query split, latent write, absorbed
// decode attention and its split merge) and the prefill path (non-absorbed flash attention, the
// chunk's latents into the pool, rotary on strided rows). Launched from
// engine/src/cuda/attention.rs.

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// A decode step's attention inputs, one launch: the query split and the new latents written.

// Rotary of pair p of a rope-wide part `pe` with row t's tables, into `out`: (a, b) →
// (a·c − b·s, b·c + a·s), the pair (2p, 2p + 1) when interleaved, else (p, p + half).
template <typename T>
__device__ __forceinline__ void rope_pair(const T* pe, T* out, const T* cos_t, const T* sin_t,
                                          size_t t, int p, int half, int interleaved) {
    const float c = to_f(cos_t[t * half + p]), s = to_f(sin_t[t * half + p]);
    const int ia = interleaved ? 2 * p : p;
    const int ib = interleaved ? 2 * p + 1 : p + half;
    const float a = to_f(pe[ia]), b = to_f(pe[ib]);
    out[ia] = from_f<T>(a * c - b * s);
    out[ib] = from_f<T>(b * c + a * s);
}
//
// The query of decoding tokens, split for the absorbed attention in one pass: q [T, H, nope +
// rope] (row t at q + t·q_stride) → q_nope [H, T, nope] (copied) and q_pe [H, T, rope] (rotated),
// both heads-first. One thread per (token, head, element of nope + rope/2), over blocks
// blk = 0 … nblk − 1.
template <typename T>
__device__ void split_q(const T* q, long long q_stride, T* q_nope, T* q_pe, const T* cos_t,
                        const T* sin_t, int tokens, int heads, int nope, int rope_dim,
                        int interleaved, int blk, int nblk) {
    const int half = rope_dim / 2;
    const int per = nope + half;
    const size_t n = (size_t)tokens * heads * per;
    for (size_t i = blk * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)nblk * blockDim.x) {
        const int e = (int)(i % per);
        const size_t th = i / per;
        const int h = (int)(th % heads);
        const size_t t = th / heads;
        const T* row = q + t * q_stride + (size_t)h * (nope + rope_dim);
        if (e < nope) {
            q_nope[((size_t)h * tokens + t) * nope + e] = row[e];
        } else {
            rope_pair<T>(row + nope, q_pe + ((size_t)h * tokens + t) * rope_dim, cos_t, sin_t, t,
                         e - nope, half, interleaved);
        }
    }
}

// The new latents of decoding tokens, straight into the KV pool: for token t (one block),
// `kv[t] = [c (kv_lora) | k_pe (rope)]` from kv_a_proj (row t at kv + t·kv_stride); c is
// RMS-normed (weight `w`), k_pe rotated, and both are written at pool row `dst[t]`.
template <typename T>
__device__ void kv_write(const T* kv, long long kv_stride, const float* w, float eps,
                         const T* cos_t, const T* sin_t, int interleaved, const uint32_t* dst,
                         T* pool_ckv, T* pool_kpe, int kv_lora, int rope_dim, size_t t) {
    const T* row = kv + t * kv_stride;
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
    for (int p = threadIdx.x; p < half; p += blockDim.x)
        rope_pair<T>(row + kv_lora, pool_kpe + r * rope_dim, cos_t, sin_t, t, p, half,
                     interleaved);
}

// Blocks 0 … split_blocks − 1 split the query, the next `tokens` blocks write a token's latents
// each (both read the same rotary rows).
#define DECODE_PREP(NAME, T)                                                                    \
    extern "C" __global__ void NAME(const T* q, long long q_stride, T* q_nope, T* q_pe,         \
                                    int heads, int nope, int split_blocks, const T* kv,         \
                                    long long kv_stride, const float* w, float eps,             \
                                    const uint32_t* dst, T* pool_ckv, T* pool_kpe, int kv_lora, \
                                    const T* cos_t, const T* sin_t, int tokens, int rope_dim,   \
                                    int interleaved) {                                          \
        if ((int)blockIdx.x < split_blocks)                                                     \
            split_q<T>(q, q_stride, q_nope, q_pe, cos_t, sin_t, tokens, heads, nope, rope_dim,  \
                       interleaved, blockIdx.x, split_blocks);                                  \
        else                                                                                    \
            kv_write<T>(kv, kv_stride, w, eps, cos_t, sin_t, interleaved, dst, pool_ckv,        \
                        pool_kpe, kv_lora, rope_dim, blockIdx.x - split_blocks);                \
    }
DECODE_PREP(mla_decode_prep_f32, float)
DECODE_PREP(mla_decode_prep_bf16, bf16)

// ---------------------------------------------------------------------------------------------
// MLA decode attention in the absorbed form, over the paged latent pool. One block per
// (sequence b, group of MLA_HB heads); the sequence's cache rows are streamed through shared
// memory in tiles of `tile` positions, each tile read once for all the group's heads, with an
// online softmax. Scores: (q_lat·c + q_pe·k_pe)·scale; output: o_lat = Σ p·c, unnormalised until
// the end.
// q_lat element (h, t, d) at q_lat[h*sq_h + t*sq_t + d]; q_pe likewise with sp_*; the sequence's
// query row is qrows[b], its length lens[b] (cache plus the new token, already in the pool), its
// pool rows table[tb*lmax + 0..len] with tb = trows[b], or b when trows is null (several rows
// of one sequence's prefill chunk share its table row, each with its own causal length).
// Output element (h, b, d) at out[h*so_h + b*so_b + d].

#define MLA_HB 4
#define MLA_MAXD 4  // kv_lora ≤ MLA_MAXD · blockDim.x

template <typename T>
__device__ void mla_decode(const T* q_lat, long long sq_h, long long sq_t, const T* q_pe,
                           long long sp_h, long long sp_t, const T* ckv, const T* kpe,
                           const uint32_t* table, int lmax, const uint32_t* lens,
                           const uint32_t* qrows, T* out, long long so_h, long long so_b,
                           int heads, int kv_lora, int rope_dim, int tile, float scale,
                           int splits, float* part_o, float* part_ml, const uint32_t* trows) {
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
    const size_t tb = trows ? trows[b] : (size_t)b;
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
            const size_t row = table[tb * lmax + start + j];
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
        float* part_ml, const uint32_t* trows) {                                                \
        mla_decode<T>(q_lat, sq_h, sq_t, q_pe, sp_h, sp_t, ckv, kpe, table, lmax, lens, qrows,  \
                      out, so_h, so_b, heads, kv_lora, rope_dim, tile, scale, splits, part_o,   \
                      part_ml, trows);                                                          \
    }
MLA_DECODE(mla_decode_f32, float)
MLA_DECODE(mla_decode_bf16, bf16)

// Tensor-core MLA decode (bf16; kv_lora 512, rope 64, heads a multiple of 16), as FlashMLA
// shapes it: one block of 4 warps per (sequence, 16 heads, split), so a latent row is read
// once for 16 heads instead of once per 4. Per tile of MLA_MMA_TILE positions, gathered from
// the pool through the table by cp.async: S = Q·Kᵀ on the tensor cores (each warp 16
// positions, K = 576), the online softmax per head in shared memory (natural exp, as
// `mla_decode`), then O += P·V with V the tile's first 512 columns (each warp 128 of the output
// dims) and P as two bf16 parts (high and low, as the flash prefill's default), so the
// probabilities keep ~16 significant bits. Same outputs as `mla_decode` (the split state, or
// the normalised result when there is one split), to f32 rounding.
#define MLA_MMA_TILE 64
#define MLA_MMA_QK 576
#define MLA_MMA_VD 512
#define MLA_MMA_KS (MLA_MMA_QK + 8)    // smem row stride (bf16): 16 bytes of padding
#define MLA_MMA_SS (MLA_MMA_TILE + 4)  // score row stride (f32)
#define MLA_MMA_SMEM \
    ((16 + MLA_MMA_TILE) * MLA_MMA_KS * 2 + 16 * MLA_MMA_SS * 4 + 3 * 16 * 4)

extern "C" __global__ void __launch_bounds__(128)
    mla_decode_mma_bf16(const bf16* q_lat, long long sq_h, long long sq_t, const bf16* q_pe,
                        long long sp_h, long long sp_t, const bf16* ckv, const bf16* kpe,
                        const uint32_t* table, int lmax, const uint32_t* lens,
                        const uint32_t* qrows, bf16* out, long long so_h, long long so_b,
                        int heads, float scale, int splits, float* part_o, float* part_ml,
                        const uint32_t* trows) {
    extern __shared__ __align__(128) unsigned char mla_smem[];
    bf16* sq = reinterpret_cast<bf16*>(mla_smem);                   // [16][KS]
    bf16* sk = sq + 16 * MLA_MMA_KS;                                  // [TILE][KS]
    float* ss = reinterpret_cast<float*>(sk + MLA_MMA_TILE * MLA_MMA_KS);  // [16][SS]
    float* sm = ss + 16 * MLA_MMA_SS;  // per head: running max,
    float* sl = sm + 16;               // running sum,
    float* sa = sl + 16;               // this tile's rescale
    const int b = blockIdx.x, h0 = blockIdx.y * 16;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int len = (int)lens[b];
    const int chunk = (len + splits - 1) / splits;
    const int pos0 = min(len, (int)blockIdx.z * chunk), pos1 = min(len, pos0 + chunk);
    const size_t qt = qrows[b];
    const size_t tb = trows ? trows[b] : (size_t)b;  // the row's table row (see mla_decode)
    constexpr int CH = MLA_MMA_QK / 8, CC = MLA_MMA_VD / 8;  // 16-byte chunks per row
    for (int id = tid; id < 16 * CH; id += 128) {
        const int r = id / CH, c = id % CH;
        const size_t h = h0 + r;
        const bf16* src = c < CC ? q_lat + h * sq_h + qt * sq_t + c * 8
                                 : q_pe + h * sp_h + qt * sp_t + (c - CC) * 8;
        cp_async16(&sq[r * MLA_MMA_KS + c * 8], src, true);
    }
    // Not waited for here: the first tile's wait takes the query with it (one memory latency
    // a block fewer; the loop's barriers come before any read of sq).
    cp_async_commit();
    if (tid < 16) {
        sm[tid] = -INFINITY;
        sl[tid] = 0.f;
    }
    float oacc[16][4];
#pragma unroll
    for (int n = 0; n < 16; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) oacc[n][e] = 0.f;

    for (int start = pos0; start < pos1; start += MLA_MMA_TILE) {
        const int n_valid = min(MLA_MMA_TILE, pos1 - start);
        __syncthreads();  // the previous tile's K and P are no longer read
        for (int id = tid; id < MLA_MMA_TILE * CH; id += 128) {
            const int j = id / CH, c = id % CH;
            const bool ok = j < n_valid;
            const size_t row = ok ? table[tb * lmax + start + j] : 0;
            const bf16* src = c < CC ? ckv + row * MLA_MMA_VD + c * 8
                                     : kpe + row * (MLA_MMA_QK - MLA_MMA_VD) + (c - CC) * 8;
            cp_async16(&sk[j * MLA_MMA_KS + c * 8], src, ok);
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        // S for this warp's 16 positions: two n-tiles of 8.
        float sacc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll 4
        for (int kk = 0; kk < MLA_MMA_QK / 16; ++kk) {
            uint32_t a[4], bfr[4];
            ldmatrix_x4(a, &sq[(lane & 15) * MLA_MMA_KS + kk * 16 + (lane >> 4) * 8]);
            ldmatrix_x4(bfr, &sk[(warp * 16 + (lane & 7) + ((lane >> 4) << 3)) * MLA_MMA_KS +
                                 kk * 16 + ((lane >> 3) & 1) * 8]);
            mma_bf16(sacc[0], a[0], a[1], a[2], a[3], bfr[0], bfr[1]);
            mma_bf16(sacc[1], a[0], a[1], a[2], a[3], bfr[2], bfr[3]);
        }
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = warp * 16 + n * 8 + 2 * t4 + (e & 1);
                const int r = g + (e >> 1) * 8;
                ss[r * MLA_MMA_SS + j] = j < n_valid ? sacc[n][e] * scale : -INFINITY;
            }
        __syncthreads();
        {
            // Online softmax: 8 threads per head, 8 positions each.
            const int r = tid >> 3, sub = tid & 7;
            float* row = ss + r * MLA_MMA_SS + sub * 8;
            float mx = -INFINITY;
#pragma unroll
            for (int e = 0; e < 8; ++e) mx = fmaxf(mx, row[e]);
#pragma unroll
            for (int o = 4; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            const float m_old = sm[r];
            const float m_new = fmaxf(m_old, mx);
            const float base = m_new == -INFINITY ? 0.f : m_new;
            float sum = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float p = row[e] == -INFINITY ? 0.f : expf(row[e] - base);
                row[e] = p;
                sum += p;
            }
#pragma unroll
            for (int o = 4; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            __syncwarp();
            if (sub == 0) {
                const float alpha = m_old == -INFINITY ? 0.f : expf(m_old - base);
                sl[r] = sl[r] * alpha + sum;
                sm[r] = m_new;
                sa[r] = alpha;
            }
        }
        __syncthreads();
        const float al0 = sa[g], al1 = sa[g + 8];
#pragma unroll
        for (int n = 0; n < 16; ++n) {
            oacc[n][0] *= al0;
            oacc[n][1] *= al0;
            oacc[n][2] *= al1;
            oacc[n][3] *= al1;
        }
#pragma unroll
        for (int kc = 0; kc < MLA_MMA_TILE / 16; ++kc) {
            const float* p0 = ss + g * MLA_MMA_SS + kc * 16 + 2 * t4;
            const float* p1 = p0 + 8 * MLA_MMA_SS;
            const uint32_t a0 = pack_bf16(p0[0], p0[1]), a1 = pack_bf16(p1[0], p1[1]);
            const uint32_t a2 = pack_bf16(p0[8], p0[9]), a3 = pack_bf16(p1[8], p1[9]);
            auto lo = [](uint32_t hi, float x0, float x1) {
                const __nv_bfloat162 hh = *reinterpret_cast<const __nv_bfloat162*>(&hi);
                return pack_bf16(x0 - __low2float(hh), x1 - __high2float(hh));
            };
            const uint32_t l0 = lo(a0, p0[0], p0[1]), l1 = lo(a1, p1[0], p1[1]);
            const uint32_t l2 = lo(a2, p0[8], p0[9]), l3 = lo(a3, p1[8], p1[9]);
#pragma unroll
            for (int dp = 0; dp < 8; ++dp) {
                uint32_t bfr[4];
                ldmatrix_x4_trans(bfr, &sk[(kc * 16 + (lane & 15)) * MLA_MMA_KS + warp * 128 +
                                           dp * 16 + (lane >> 4) * 8]);
                mma_bf16(oacc[2 * dp], a0, a1, a2, a3, bfr[0], bfr[1]);
                mma_bf16(oacc[2 * dp + 1], a0, a1, a2, a3, bfr[2], bfr[3]);
                mma_bf16(oacc[2 * dp], l0, l1, l2, l3, bfr[0], bfr[1]);
                mma_bf16(oacc[2 * dp + 1], l0, l1, l2, l3, bfr[2], bfr[3]);
            }
        }
    }
    cp_async_wait<0>();  // an empty split's query copies
    __syncthreads();
    const float lrow[2] = {sl[g], sl[g + 8]};
#pragma unroll
    for (int n = 0; n < 16; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = g + (e >> 1) * 8;
            const int d = warp * 128 + n * 8 + 2 * t4 + (e & 1);
            const size_t h = h0 + r;
            if (part_o) {
                const size_t slot = ((size_t)b * heads + h) * splits + blockIdx.z;
                part_o[slot * MLA_MMA_VD + d] = oacc[n][e];
            } else {
                out[h * so_h + (size_t)b * so_b + d] = from_f<bf16>(oacc[n][e] / lrow[e >> 1]);
            }
        }
    if (part_o && tid < 16) {
        const size_t slot = ((size_t)b * heads + h0 + tid) * splits + blockIdx.z;
        part_ml[slot * 2] = sm[tid];
        part_ml[slot * 2 + 1] = sl[tid];
    }
}

// Merges mla_decode's splits: one block per (sequence, head). The first warp turns the splits'
// (max, sum) into one weight each, exp(m_z − m) / Σ_z exp(m_z − m)·l_z, in shared memory; then
// every output element is an independent weighted sum over the splits (no chain of dependent
// loads per element). Empty splits (m = −∞) weigh 0 and are not read. At most 64 splits.
#define MLA_MAX_SPLITS 64
// One warp: the split weights of the splits' (max, sum) pairs at part_ml[base · 2 ..] into wz.
__device__ __forceinline__ void split_weights(const float* part_ml, size_t base, int splits,
                                              float* wz) {
    const int lane = threadIdx.x & 31;
    float mx = -INFINITY;
    for (int z = lane; z < splits; z += 32) mx = fmaxf(mx, part_ml[(base + z) * 2]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float denom = 0.f;
    for (int z = lane; z < splits; z += 32) {
        const float m = part_ml[(base + z) * 2];
        if (m != -INFINITY) denom += expf(m - mx) * part_ml[(base + z) * 2 + 1];
    }
    for (int o = 16; o > 0; o >>= 1) denom += __shfl_xor_sync(0xffffffffu, denom, o);
    for (int z = lane; z < splits; z += 32) {
        const float m = part_ml[(base + z) * 2];
        wz[z] = m != -INFINITY ? expf(m - mx) / denom : 0.f;
    }
}
template <typename T>
__device__ void mla_combine(const float* part_o, const float* part_ml, int splits, int heads,
                            int kv_lora, T* out, long long so_h, long long so_b) {
    __shared__ float wz[MLA_MAX_SPLITS];
    const int b = blockIdx.x, h = blockIdx.y;
    const size_t base = ((size_t)b * heads + h) * splits;
    if (threadIdx.x < 32) split_weights(part_ml, base, splits, wz);
    __syncthreads();
    for (int d = threadIdx.x; d < kv_lora; d += blockDim.x) {
        float o = 0.f;
        for (int z = 0; z < splits; ++z) {
            const float wgt = wz[z];
            if (wgt != 0.f) o = fmaf(wgt, part_o[(base + z) * kv_lora + d], o);
        }
        out[(size_t)h * so_h + (size_t)b * so_b + d] = from_f<T>(o);
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
// The absorbed decode's two products on its small side, fused with what runs next to them (bf16,
// at most MLA_ABSORB_ROWS query rows and sequences): `mla_decode_prep_absorb_bf16` is
// mla_decode_prep with the query's latent product q_lat = q_nope · W_UK done in the same launch
// (no q_nope tensor, no batched GEMM), and `mla_combine_uv_bf16` merges the decode's splits and
// applies W_UV, writing `[B, H · v]` as o_proj takes it (no o_lat tensor, no GEMM, no transpose).
// Both sum in f32 and round to bf16 once, as the GEMMs they replace (in another order).
#define MLA_ABSORB_ROWS 8
#define MLA_ABSORB_MAX_NOPE 256

// Blocks 0 … heads · kv_lora/64 − 1: block (h, c) computes q_lat[h, t, 64c .. 64c + 63] for every
// row t, from W_UK [H, nope, kv_lora] (row n of head h contiguous); thread (rg, c8) takes
// columns 64c + 8·c8 .. + 7 over rows n ≡ rg (mod 32), the 32 row groups added by two shuffles
// and then in warp order. Blocks with c = 0 also rotate head h's q_pe (as split_q). The last
// `tokens` blocks write the latents (kv_write).
extern "C" __global__ void __launch_bounds__(256) mla_decode_prep_absorb_bf16(
    const bf16* q, long long q_stride, const bf16* w_uk, bf16* q_lat, bf16* q_pe, int heads,
    int nope, const bf16* kv, long long kv_stride, const float* w, float eps,
    const uint32_t* dst, bf16* pool_ckv, bf16* pool_kpe, int kv_lora, const bf16* cos_t,
    const bf16* sin_t, int tokens, int rope_dim, int interleaved) {
    __shared__ float qs[MLA_ABSORB_ROWS][MLA_ABSORB_MAX_NOPE];
    __shared__ float red[8][MLA_ABSORB_ROWS][64];
    const int cpb = kv_lora / 64;
    if ((int)blockIdx.x >= heads * cpb) {
        kv_write<bf16>(kv, kv_stride, w, eps, cos_t, sin_t, interleaved, dst, pool_ckv, pool_kpe,
                       kv_lora, rope_dim, blockIdx.x - heads * cpb);
        return;
    }
    const int h = blockIdx.x / cpb, c = blockIdx.x % cpb;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int qw = nope + rope_dim;
    // The thread's W_UK rows first (rows n ≡ rg mod 32, 8 columns each), so that their latency
    // runs under the query's loads.
    const int c8 = tid & 7, rg = tid >> 3;
    const bf16* wp = w_uk + (size_t)h * nope * kv_lora + c * 64 + c8 * 8;
    uint4 wr[MLA_ABSORB_MAX_NOPE / 32];
#pragma unroll
    for (int i = 0; i < MLA_ABSORB_MAX_NOPE / 32; ++i)
        if (rg + 32 * i < nope)
            wr[i] = __ldcs(reinterpret_cast<const uint4*>(wp + (size_t)(rg + 32 * i) * kv_lora));
    for (int i = tid; i < tokens * nope; i += blockDim.x) {
        const int t = i / nope, n = i % nope;
        qs[t][n] = to_f(q[(size_t)t * q_stride + (size_t)h * qw + n]);
    }
    if (c == 0) {
        const int half = rope_dim / 2;
        for (int i = tid; i < tokens * half; i += blockDim.x) {
            const int t = i / half;
            rope_pair<bf16>(q + (size_t)t * q_stride + (size_t)h * qw + nope,
                            q_pe + ((size_t)h * tokens + t) * rope_dim, cos_t, sin_t, t,
                            i % half, half, interleaved);
        }
    }
    __syncthreads();
    float acc[MLA_ABSORB_ROWS][8];
#pragma unroll
    for (int t = 0; t < MLA_ABSORB_ROWS; ++t)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[t][e] = 0.f;
#pragma unroll
    for (int i = 0; i < MLA_ABSORB_MAX_NOPE / 32; ++i) {
        const int n = rg + 32 * i;
        if (n >= nope) break;
        const uint4 u = wr[i];
        const float wv[8] = {__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                             __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u),
                             __uint_as_float(u.z << 16), __uint_as_float(u.z & 0xffff0000u),
                             __uint_as_float(u.w << 16), __uint_as_float(u.w & 0xffff0000u)};
#pragma unroll
        for (int t = 0; t < MLA_ABSORB_ROWS; ++t) {
            if (t < tokens) {
                const float qv = qs[t][n];
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[t][e] = fmaf(qv, wv[e], acc[t][e]);
            }
        }
    }
    // Lanes c8, c8 + 8, c8 + 16, c8 + 24 hold the same columns: fold them into lanes 0 … 7.
#pragma unroll
    for (int t = 0; t < MLA_ABSORB_ROWS; ++t) {
        if (t < tokens) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                float v = acc[t][e];
                v += __shfl_xor_sync(0xffffffffu, v, 8);
                v += __shfl_xor_sync(0xffffffffu, v, 16);
                if (lane < 8) red[warp][t][c8 * 8 + e] = v;
            }
        }
    }
    __syncthreads();
    for (int i = tid; i < tokens * 64; i += blockDim.x) {
        const int t = i / 64, j = i % 64;
        float v = red[0][t][j];
#pragma unroll
        for (int wv = 1; wv < 8; ++wv) v += red[wv][t][j];
        q_lat[((size_t)h * tokens + t) * kv_lora + c * 64 + j] = from_f<bf16>(v);
    }
}

// Block (h, vc): out[b, h·v + 16·vc + j] = Σ_d o_lat[h, b, d] · W_UV[h, j, d] for j < 16 and
// every sequence b, W_UV's row j of head h at kv_b[(h·(nope + v) + nope + j)·512] (kv_b_proj as
// stored: a row contiguous over the latent of 512). o_lat is the merge of the decode's splits
// (`part_o`, `part_ml` as mla_combine takes them, rounded to bf16 as mla_combine stores it), or
// with one split (`part_o` null) the decode's normalised `o_lat [H, B, 512]`. Each warp takes 2
// of the 16 rows, a lane 8 consecutive latents of each 256, loaded before the merge so that
// their latency runs under it. Each of a head's v / 16 blocks merges the splits itself (reading
// splits × 2 KB a sequence from L2 again): cheaper than a launch between the merge and W_UV.
#define MLA_UV_LATENT 512
#define MLA_UV_COLS 16
extern "C" __global__ void __launch_bounds__(256) mla_combine_uv_bf16(
    const float* part_o, const float* part_ml, int splits, const bf16* o_lat, int seqs,
    int heads, const bf16* kv_b, int nope, int v_dim, bf16* out) {
    __shared__ __align__(16) float os[MLA_ABSORB_ROWS][MLA_UV_LATENT];
    __shared__ float wz[MLA_ABSORB_ROWS][MLA_MAX_SPLITS];
    constexpr int L = MLA_UV_LATENT;
    const int h = blockIdx.x, vc = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    uint4 wr[2][2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = vc * MLA_UV_COLS + warp * 2 + r;
        const bf16* row = kv_b + ((size_t)h * (nope + v_dim) + nope + j) * L + lane * 8;
#pragma unroll
        for (int q = 0; q < 2; ++q) wr[r][q] = __ldcs(reinterpret_cast<const uint4*>(row + q * 256));
    }
    if (part_o) {
        // Warp b: sequence b's split weights (mla_combine's).
        if (warp < seqs) split_weights(part_ml, ((size_t)warp * heads + h) * splits, splits, wz[warp]);
        __syncthreads();
        for (int i = tid; i < seqs * L; i += blockDim.x) {
            const int b = i / L, d = i % L;
            const size_t base = ((size_t)b * heads + h) * splits;
            float o = 0.f;
            for (int z = 0; z < splits; ++z) {
                const float wgt = wz[b][z];
                if (wgt != 0.f) o = fmaf(wgt, part_o[(base + z) * L + d], o);
            }
            os[b][d] = __bfloat162float(__float2bfloat16(o));
        }
    } else {
        for (int i = tid; i < seqs * L; i += blockDim.x) {
            const int b = i / L, d = i % L;
            os[b][d] = to_f(o_lat[((size_t)h * seqs + b) * L + d]);
        }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = vc * MLA_UV_COLS + warp * 2 + r;
        float acc[MLA_ABSORB_ROWS];
#pragma unroll
        for (int b = 0; b < MLA_ABSORB_ROWS; ++b) acc[b] = 0.f;
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const uint4 u = wr[r][q];
            const float wv[8] = {__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                                 __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u),
                                 __uint_as_float(u.z << 16), __uint_as_float(u.z & 0xffff0000u),
                                 __uint_as_float(u.w << 16), __uint_as_float(u.w & 0xffff0000u)};
            const int d0 = q * 256 + lane * 8;
#pragma unroll
            for (int b = 0; b < MLA_ABSORB_ROWS; ++b) {
                if (b < seqs) {
                    const float4 x0 = *reinterpret_cast<const float4*>(&os[b][d0]);
                    const float4 x1 = *reinterpret_cast<const float4*>(&os[b][d0 + 4]);
                    const float xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
                    acc[b] += dot8(wv, xv);
                }
            }
        }
#pragma unroll
        for (int b = 0; b < MLA_ABSORB_ROWS; ++b) {
            if (b < seqs) {
                const float v = warp_sum(acc[b]);
                if (lane == 0)
                    out[(size_t)b * heads * v_dim + (size_t)h * v_dim + j] = from_f<bf16>(v);
            }
        }
    }
}

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
        rope_pair<T>(x + t * (size_t)rs + (size_t)h * hs, out + th * rope, cos_t, sin_t, t, pr,
                     half, interleaved);
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
