// Routed experts with FP8 weights: e4m3 values and one f32 scale (`weight_scale_inv`) per
// 128 × 128 block, as DeepSeek-V3/R1 checkpoints store them, kept so on the device (half the
// bytes of bf16, and half the bytes a decode step reads). Launched from engine/src/cuda/experts.rs
// by the weights' dtype, wherever the bf16 kernels of experts.cu are (`..._fp8` names).
//
// Numerics: a weight is bf16(e4m3 · scale), the product in f32 rounded to nearest even once —
// exactly what the load-time dequantisation to bf16 makes of it (engine/src/weights/fp8.rs) — and
// then the bf16 kernels' products: the same MMA instructions on the same fragments in the same
// order. So these kernels give bit-identical results to the bf16 kernels run on the dequantised
// weights (what `moemesh verify` checks on a GPU). The e4m3 → f16 conversion is exact (every
// e4m3 value is an f16), f16 → f32 too. The decode kernels' 128-wide forms (`_fp8w`,
// MmaFp8Wide, where the k width is a multiple of 128) take the same weight values with the sums
// in another order: within 1e-3 (relative L2) of the bf16 kernels, which `verify` checks.
//
// Layout (each expert's gate, up and down matrices with their own block grid, so that a partial
// edge block never spans two experts): w_gu [slots·2N, K] e4m3 (slot s: gate rows 2sN.., then up
// rows), its scales [slots·2·⌈N/128⌉, ⌈K/128⌉]; w_down [slots·H, I] with [slots, ⌈H/128⌉, ⌈I/128⌉].
// Both are "matrix m of R rows × C columns, scale (m·⌈R/128⌉ + r/128)·⌈C/128⌉ + c/128".
//
// The decode kernels follow experts.cu's moe_gate_up_mma / moe_down_mma step for step, as
// separate functions so that those stay as they are while the decode-kernel work on experts.cu
// (issue 18) is in flight: to be folded into templates over the weight type once it has landed.
// The grouped GEMM is experts.cu's moe_gg itself, with e4m3 weight tiles (GgFp8Weights), and on
// Hopper for prefill-sized batches its warp-specialised wgmma form moe_ws (WsFp8ConsumerLoader,
// or WsFp8Loader).

#include <cuda_fp8.h>

#include "common.cuh"

#define FP8_BLOCK 128

// Two e4m3 values (low byte first) times `scale` → two bf16, packed low first.
__device__ __forceinline__ uint32_t fp8x2_to_bf16x2(uint32_t two, float scale) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(two & 0xffffu), __NV_E4M3);
    const float2 f = __half22float2(__half2(h));
    return pack_bf16(f.x * scale, f.y * scale);
}

// Eight e4m3 values (8 bytes, memory order) → eight bf16 (16 bytes, the same order).
__device__ __forceinline__ uint4 fp8x8_to_bf16x8(uint2 v, float scale) {
    uint4 r;
    r.x = fp8x2_to_bf16x2(v.x, scale);
    r.y = fp8x2_to_bf16x2(v.x >> 16, scale);
    r.z = fp8x2_to_bf16x2(v.y, scale);
    r.w = fp8x2_to_bf16x2(v.y >> 16, scale);
    return r;
}

__device__ __forceinline__ uint2 ldcs8(const uint8_t* p) {
    return __ldcs(reinterpret_cast<const uint2*>(p));
}

// The scales of the 128 rows of matrix m that hold row r, over a K-column matrix: one per 128
// columns.
__device__ __forceinline__ const float* fp8_scale_row(const float* scales, size_t m, int rows,
                                                      int r, int K) {
    const int rb = (rows + FP8_BLOCK - 1) / FP8_BLOCK, cb = (K + FP8_BLOCK - 1) / FP8_BLOCK;
    return scales + ((size_t)m * rb + r / FP8_BLOCK) * cb;
}

// ---------------------------------------------------------------------------------------------
// Decode-sized: experts.cu's moe_gate_up_mma / moe_down_mma (gate_up_mma, down_mma) with e4m3
// weights. Each lane reads the 8 bytes of its 8 k positions of a 32-wide k block (rows g and
// g + 8 of its tile: one 128-row block, as tiles are 16 rows from a multiple of 16) and
// dequantises them, with the block's scale, to the 16 bytes of bf16 the bf16 kernel would have
// loaded; the MMAs, their order and the load pipeline are the bf16 kernels'.
struct MmaFp8 : ScaledValues {
    typedef uint8_t Elem;
    typedef uint2 Raw;
    const float* scale;  // the block scales of the row's 128 rows, one per 128 columns
    static constexpr int K_PER_ELEM = 1;
    __device__ static MmaFp8 at(const QuantArgs& qa, size_t m, int rows, int r, int K) {
        return {{}, fp8_scale_row(qa.scales, m, rows, r, K)};
    }
    __device__ static Raw load(const uint8_t* p) { return ldcs8(p); }
    __device__ uint4 frag(Raw r, int k) const {
        return fp8x8_to_bf16x8(r, __ldg(scale + k / FP8_BLOCK));
    }
    // A lane's 16 values of a 64-wide chunk: one 16-byte load (experts.cu's chunk walk). The
    // block scale is read when the chunk's MMAs want it: loading it with the chunk, in the ring
    // of loads in flight, was slower at every batch (scripts/bench/decode_quant.cu, 2026-11-28:
    // 36.2 against 34.0 µs a layer at batch 1, 327 against 283 at batch 64), as was applying it
    // to the f32 sums per 128-column block instead of to each value (35.3 / 319).
    // Two chunks in flight (one loading while one is used), as bf16's: fewer registers (137
    // against 252 in the gate/up kernel), so more blocks an SM, which pays more than a deeper
    // ring: 32.6 against 34.3 µs a layer at batch 1, 244 against 286 at batch 64, the same bits
    // (scripts/bench/decode_quant.cu, 2026-11-28).
    typedef uint4 Chunk;
    static constexpr int CHUNK_STAGES = 2;
    __device__ Chunk load2(const uint8_t* p, int) const {
        return __ldcs(reinterpret_cast<const uint4*>(p));
    }
    __device__ void frags2(const Chunk& r, int k, uint4& lo, uint4& hi) const {
        const float s = __ldg(scale + k / FP8_BLOCK);
        lo = fp8x8_to_bf16x8(make_uint2(r.x, r.y), s);
        hi = fp8x8_to_bf16x8(make_uint2(r.z, r.w), s);
    }
};

// MmaFp8 over 128-wide chunks (chunk_walk's CHUNK_K; the matrix's K a multiple of 128): two
// 16-byte loads a row a chunk, 128 bytes a row as bf16's 64-wide chunks read, and one block scale
// a chunk (the chunk is one scale block). The same weights; the f32 sums in another order than
// the 64-wide walk's (each MMA step takes other k positions).
struct MmaFp8Wide : MmaFp8 {
    static constexpr int CHUNK_K = 128;
    struct Chunk {
        uint4 a, b;
    };
    __device__ static MmaFp8Wide at(const QuantArgs& qa, size_t m, int rows, int r, int K) {
        return {MmaFp8::at(qa, m, rows, r, K)};
    }
    __device__ Chunk load2(const uint8_t* p, int) const {
        return {__ldcs(reinterpret_cast<const uint4*>(p)),
                __ldcs(reinterpret_cast<const uint4*>(p + 16))};
    }
    __device__ void frags4(const Chunk& r, int k, uint4 (&f)[4]) const {
        const float s = __ldg(scale + k / FP8_BLOCK);
        f[0] = fp8x8_to_bf16x8(make_uint2(r.a.x, r.a.y), s);
        f[1] = fp8x8_to_bf16x8(make_uint2(r.a.z, r.a.w), s);
        f[2] = fp8x8_to_bf16x8(make_uint2(r.b.x, r.b.y), s);
        f[3] = fp8x8_to_bf16x8(make_uint2(r.b.z, r.b.w), s);
    }
};

// The decode kernels with policy W (`BOUNDS`: their __launch_bounds__).
#define FP8_DECODE_KERNELS(SUFFIX, W, BOUNDS)                                                 \
    extern "C" __global__ void BOUNDS moe_gate_up_mma_##SUFFIX(                              \
        const bf16* x, int hidden, const uint8_t* w_gu, const float* s_gu, int inner,        \
        const uint32_t* offsets, const uint32_t* active, const uint32_t* sorted, int k_div,  \
        bf16* h_out) {                                                                       \
        gate_up_mma<W>(x, hidden, w_gu, QuantArgs{s_gu, nullptr, 0}, inner, offsets, active, \
                       sorted, k_div, h_out);                                                \
    }                                                                                        \
    extern "C" __global__ void moe_down_mma_##SUFFIX(                                        \
        const bf16* h, int inner, const uint8_t* w_down, const float* s_down, int hidden,    \
        const uint32_t* offsets, const uint32_t* active, float* y, const uint32_t* pos,      \
        const float* w, int tokens, int k, float* out, uint32_t* counters,                   \
        const uint32_t* seen_from, uint32_t* seen, uint32_t* done, uint32_t done_value) {     \
        down_mma<W>(h, inner, w_down, QuantArgs{s_down, nullptr, 0}, hidden, offsets, active, \
                    y, CombineTail{pos, w, tokens, k, out, counters, seen_from, seen, done,  \
                                   done_value});                                             \
    }

FP8_DECODE_KERNELS(fp8, MmaFp8, )
// The same over 128-wide chunks (MmaFp8Wide), for a k width (hidden for gate/up, inner for down)
// that is a multiple of 128: experts.rs picks these then. The gate/up kernel is held to 3 blocks
// an SM (≤ 168 registers; 196 unbounded). One V2-Lite layer's routed experts
// (scripts/bench/decode_quant.cu, H200, 2026-11-28): 32.5 → 29.3 µs at batch 1, 123.7 → 102.8 at
// batch 8, 244 → 208 at batch 64; the sums within 4e-5 of the 64-wide walk's (another order).
FP8_DECODE_KERNELS(fp8w, MmaFp8Wide, __launch_bounds__(128, 3))
#undef FP8_DECODE_KERNELS

// ---------------------------------------------------------------------------------------------
// Decode-sized, weights streamed by the copy engine (sm_90's cp.async.bulk): a persistent grid,
// one block an SM, each block a contiguous run of work items. An item is 32 weight rows of one
// expert over the whole k width (K ≤ BULK_KMAX): gate/up, 16 gate and the same 16 up rows
// (columns j0 … j0 + 15 of h); down, 32 rows of w_down (columns r0 … r0 + 31 of y). A producer
// warp copies each item's 32 rows (one bulk copy a row, K bytes) into one of BULK_STAGES stages
// in shared memory, BULK_STAGES − 1 items ahead, with the rows' block scales, completing on the
// stage's `full` barrier; eight consumer warps each take the 128-wide chunks c ≡ warp (mod 8) of
// the item for up to 8 tokens at a time (MmaFp8Wide's lanes and MMA steps: lane t the 32 values
// at t·32 of a row's chunk, four steps of 32), release the stage on its `empty` barrier, and add
// their f32 sums in warp order through shared memory. So the bytes in flight an SM are up to
// two items' (128 KiB), held by the copy engine, not registers: what the register-ring kernels
// above could not reach (two chunks a warp). Rows in a stage are K + 16 bytes apart (a 16-byte
// skew: lanes g and g + 1 of a 16-byte load fall in other banks).
// Numerics: by MODE (below). The engine takes the gate/up kernel in BULK_F16
// (`moe_gate_up_bulk_fp8h`, from 8 pairs a call on Hopper: engine/src/cuda/experts.rs
// `takes_bulk_gate_up`): the exact products of the checkpoint's values, which `moemesh verify`
// holds to the exact FP8 layer in f32. BULK_BF16 takes the walk's values, bf16(e4m3 · scale), with the k range over 8 warps instead of
// 2 (another order of f32 sums than moe_*_mma_fp8w's); it and the down kernels are measured in
// scripts/bench/decode_quant.cu, not used (the conversions make BULK_BF16 25% slower at batch 64;
// the down kernel was no faster than the walk: docs/BENCHMARKS.md, session 29).
#define BULK_KMAX 2048
#define BULK_ROWS 32
#define BULK_STAGES 3
#define BULK_CWARPS 8
#define BULK_STAGE_BYTES (BULK_ROWS * (BULK_KMAX + 16))
#define BULK_RED_FLOATS (2 * BULK_CWARPS * 32 * 8)
// Stages, the two reduction buffers, each stage's 32 scales, the barriers (experts.rs sizes it).
#define BULK_SMEM \
    (BULK_STAGES * BULK_STAGE_BYTES + BULK_RED_FLOATS * 4 + BULK_STAGES * 32 * 4 + 2 * BULK_STAGES * 8)

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                     (uint32_t)__cvta_generic_to_shared(bar)),
                 "r"(bytes)
                 : "memory");
#else
    __trap();
#endif
}
// `bytes` (a multiple of 16) from global `src` to shared `dst` (16-byte aligned), completing
// `bytes` of transaction on `bar`; EVICT marks the lines evict-first in L2 (weights read once a
// step).
template <bool EVICT>
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, uint32_t bytes,
                                              uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    const uint32_t b = (uint32_t)__cvta_generic_to_shared(bar);
    if constexpr (EVICT)
        asm volatile(
            "{\n.reg .b64 pol;\ncreatepolicy.fractional.L2::evict_first.b64 pol, 1.0;\n"
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint "
            "[%0], [%1], %2, [%3], pol;\n}\n" ::"r"(d),
            "l"(src), "r"(bytes), "r"(b)
            : "memory");
    else
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
            "[%3];\n" ::"r"(d),
            "l"(src), "r"(bytes), "r"(b)
            : "memory");
#else
    __trap();
#endif
}
__device__ __forceinline__ void fence_mbar_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// Named barrier 1 over the 256 consumer threads (warps 0–7).
__device__ __forceinline__ void bulk_consumer_bar() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }

// GATE_UP: x [tokens, K] bf16 gathered by `sorted` (/ k_div), w = w_gu, N = inner, out h (bf16,
// silu(gate) · up). Down: x = h [pairs, K], w = w_down, N = hidden, out y (f32). Needs K % 128
// == 0, K ≤ BULK_KMAX, N % 32 == 0 and `active` (the list moe_align writes).
// MODE: BULK_BF16 dequantises each value to bf16(e4m3 · scale) (MmaFp8's values, bf16 MMAs);
// BULK_F16 takes e4m3 as f16 (exact: one conversion a pair), the activations as f16 scaled by a
// power of two per (token, 128-wide chunk) (exact but for values below 2⁻³¹ of the chunk's
// largest), f16 MMAs with f32 sums, and each chunk's sums times the weights' block scale and the
// activations' power of two: the exact product of the checkpoint's values, rounded once in f32
// per chunk; BULK_RAW hands the bytes to the MMAs as they are (timing only).
#define BULK_BF16 0
#define BULK_F16 1
#define BULK_RAW 2
#define BULK_COPY 3  // the copies alone: consumers wait for each stage and release it (timing only)
__device__ __forceinline__ void mma_f16(float c[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_k32_f16(float c[4], uint4 lo, uint4 hi, uint4 b) {
    mma_f16(c, lo.x, hi.x, lo.y, hi.y, b.x, b.y);
    mma_f16(c, lo.z, hi.z, lo.w, hi.w, b.z, b.w);
}
// Four e4m3 (a word, low byte first) → four f16 (two words, the same order), exact.
__device__ __forceinline__ uint2 e4m3x4_to_f16x4(uint32_t v) {
    const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(v & 0xffffu), __NV_E4M3);
    const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(v >> 16), __NV_E4M3);
    return make_uint2((uint32_t)lo.x | ((uint32_t)lo.y << 16), (uint32_t)hi.x | ((uint32_t)hi.y << 16));
}
// Sixteen e4m3 (a uint4) → two uint4 of eight f16 each (the same order).
__device__ __forceinline__ void e4m3x16_to_f16(uint4 u, uint4& lo, uint4& hi) {
    const uint2 a = e4m3x4_to_f16x4(u.x), b = e4m3x4_to_f16x4(u.y);
    const uint2 c = e4m3x4_to_f16x4(u.z), d = e4m3x4_to_f16x4(u.w);
    lo = make_uint4(a.x, a.y, b.x, b.y);
    hi = make_uint4(c.x, c.y, d.x, d.y);
}
// Eight bf16 (a uint4) times `inv` → eight f16, the same order.
__device__ __forceinline__ uint4 bf16x8_to_f16(uint4 u, float inv) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
    uint32_t r[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const __half2 h = __floats2half2_rn(__uint_as_float(w[i] << 16) * inv,
                                            __uint_as_float(w[i] & 0xffff0000u) * inv);
        r[i] = *reinterpret_cast<const uint32_t*>(&h);
    }
    return make_uint4(r[0], r[1], r[2], r[3]);
}
__device__ __forceinline__ float bf16x8_absmax(uint4 u, float m) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i)
        m = fmaxf(m, fmaxf(fabsf(__uint_as_float(w[i] << 16)), fabsf(__uint_as_float(w[i] & 0xffff0000u))));
    return m;
}

template <bool GATE_UP, int MODE = BULK_BF16, bool EVICT = false>
__device__ __forceinline__ void moe_bulk_fp8(const bf16* __restrict__ x_in, int K,
                                             const uint8_t* __restrict__ w,
                                             const float* __restrict__ scales, int N,
                                             const uint32_t* offsets, const uint32_t* active,
                                             const uint32_t* sorted, int k_div, bf16* h_out,
                                             float* y) {
    extern __shared__ __align__(128) unsigned char bulk_smem[];
    constexpr int NST = BULK_STAGES, SB = BULK_STAGE_BYTES;
    float* red = reinterpret_cast<float*>(bulk_smem + NST * SB);
    float* sscale = red + BULK_RED_FLOATS;  // [NST][32]: tile 0's chunks, then tile 1's
    uint64_t* full = reinterpret_cast<uint64_t*>(sscale + NST * 32);
    uint64_t* empty = full + NST;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int stride = K + 16, nchunk = K / 128;
    if (tid == 0) {
        for (int i = 0; i < NST; ++i) {
            mbar_init(full + i, 1);
            mbar_init(empty + i, BULK_CWARPS);
        }
        fence_mbar_init();
    }
    __syncthreads();
    pdl_wait();
    pdl_trigger();
    // Items: (active expert a, tile) in order; the block's run [i0, i1).
    const int tiles = GATE_UP ? N / 16 : N / 32;
    const int total = (int)active[0] * tiles;
    const int i0 = (int)((long long)total * blockIdx.x / gridDim.x);
    const int i1 = (int)((long long)total * (blockIdx.x + 1) / gridDim.x);
    if (warp == BULK_CWARPS) {
        // The producer. Lane r copies row r of each item; lanes < 2·nchunk load its scales.
        // (Measured and not kept, scripts/bench/decode_quant.cu, session 29: an item's k width
        // in 2 or 4 stages of half or quarter rows, 9–70% slower; each tile's 16 rows as one
        // copy, unskewed, +7% at batch 64.)
        int ca = -1, s = 0;
        for (int item = i0, it = 0; item < i1; ++item, ++it) {
            const int a = item / tiles, tile = item % tiles, st = it % NST;
            if (a != ca) s = (int)active[1 + a], ca = a;
            if (it >= NST) mbar_wait(empty + st, ((it / NST) & 1) ^ 1);
            const int r0 = GATE_UP ? tile * 16 : tile * 32;
            const size_t row = GATE_UP ? (size_t)2 * s * N + (lane >= 16 ? N : 0) + r0 + (lane & 15)
                                       : (size_t)s * N + r0 + lane;
            unsigned char* dst = bulk_smem + st * SB + lane * stride;
            bulk_copy_g2s<EVICT>(dst, w + row * K, (uint32_t)K, full + st);
            if (lane < 2 * nchunk) {
                const int tl = lane / nchunk, c = lane % nchunk;
                const size_t m = GATE_UP ? (size_t)2 * s + tl : (size_t)s;
                sscale[st * 32 + tl * 16 + c] = __ldg(fp8_scale_row(scales, m, N, r0, K) + c);
            }
            __syncwarp();
            if (lane == 0) mbar_expect_tx(full + st, (uint32_t)(BULK_ROWS * K));
        }
        return;
    }
    // The consumers. The activations of an expert's first two groups of 8 tokens stay in
    // registers while the block's items are that expert's (x0, x1); a third group or more (rare
    // at decode sizes) is loaded into x1 each time it is due.
    const int g = lane >> 2, t = lane & 3;
    int ca = -1, s = 0, xs = -1;
    uint32_t beg = 0, end = 0, xg1 = 0;
    uint4 x0[2][4], x1[2][4];
    float xsc0[2][2], xsc1[2][2];  // BULK_F16: the activations' powers of two, tokens 2t, 2t + 1
    // Group g0's activations (lane: token g0 + g, or the group's last) into x, for this warp's
    // chunks; BULK_F16 makes them f16 with their powers of two in xsc.
    auto load_x = [&](uint32_t g0, uint4(&x)[2][4]) {
        const int n = min((int)(end - g0), 8);
        const uint32_t q = g0 + min(g, n - 1);
        const bf16* xp = GATE_UP ? x_in + (size_t)(sorted[q] / k_div) * K : x_in + (size_t)q * K;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int c = warp + j * BULK_CWARPS;
            if (c < nchunk) {
#pragma unroll
                for (int v = 0; v < 4; ++v) x[j][v] = ld16(xp + c * 128 + t * 32 + 8 * v);
            }
        }
    };
    auto prep_x = [&](uint4(&x)[2][4], float(&xsc)[2][2]) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            xsc[j][0] = xsc[j][1] = 1.f;
            if constexpr (MODE == BULK_F16) {
                // Token g's chunk is held by lanes 4g … 4g + 3: its largest magnitude, the
                // power of two that brings it into [2¹⁴, 2¹⁵), the f16 values; the sums of
                // tokens 2t and 2t + 1 take those tokens' powers (lanes 8t, 8t + 4).
                float m = 0.f;
#pragma unroll
                for (int v = 0; v < 4; ++v) m = bf16x8_absmax(x[j][v], m);
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
                const uint32_t ex = min(max((__float_as_uint(m) >> 23) & 0xffu, 15u), 254u);
                const float inv = __uint_as_float((268u - ex) << 23);
                const float sx = __uint_as_float((ex - 14u) << 23);
#pragma unroll
                for (int v = 0; v < 4; ++v) x[j][v] = bf16x8_to_f16(x[j][v], inv);
                xsc[j][0] = __shfl_sync(0xffffffffu, sx, 8 * t);
                xsc[j][1] = __shfl_sync(0xffffffffu, sx, 8 * t + 4);
            }
        }
    };
    int nb = 0;
    for (int item = i0, it = 0; item < i1; ++item, ++it) {
        const int a = item / tiles, tile = item % tiles, st = it % NST;
        if (a != ca) {
            s = (int)active[1 + a], ca = a;
            beg = offsets[s], end = offsets[s + 1];
        }
        if (MODE != BULK_COPY && s != xs) {
            // Both groups' loads in flight at once, then converted.
            load_x(beg, x0);
            if (end - beg > 8) load_x(beg + 8, x1);
            prep_x(x0, xsc0);
            if (end - beg > 8) prep_x(x1, xsc1);
            xs = s, xg1 = beg + 8;
        }
        const int r0 = GATE_UP ? tile * 16 : tile * 32;
        const unsigned char* sb = bulk_smem + st * SB;
        mbar_wait(full + st, (it / NST) & 1);
        if constexpr (MODE == BULK_COPY) {
            __syncwarp();
            if (lane == 0) mbar_arrive(empty + st);
            continue;
        }
        // One group of ≤ 8 tokens at g0 with activations x (powers xsc): the MMAs, the stage
        // released after the last group, the warps' sums added and stored.
        auto group = [&](uint32_t g0, const uint4(&x)[2][4], const float(&xsc)[2][2]) {
            const int n = min((int)(end - g0), 8);
            float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int c = warp + j * BULK_CWARPS;
                if (c < nchunk) {
#pragma unroll
                    for (int tl = 0; tl < 2; ++tl) {
                        const float sc = sscale[st * 32 + tl * 16 + c];
                        const unsigned char* p0 = sb + (tl * 16 + g) * stride + c * 128 + t * 32;
                        const unsigned char* p1 = p0 + 8 * stride;
                        const uint4 u0 = *reinterpret_cast<const uint4*>(p0);
                        const uint4 u1 = *reinterpret_cast<const uint4*>(p0 + 16);
                        const uint4 v0 = *reinterpret_cast<const uint4*>(p1);
                        const uint4 v1 = *reinterpret_cast<const uint4*>(p1 + 16);
                        if constexpr (MODE == BULK_BF16) {
                            mma_k32(acc[tl], fp8x8_to_bf16x8(make_uint2(u0.x, u0.y), sc),
                                    fp8x8_to_bf16x8(make_uint2(v0.x, v0.y), sc), x[j][0]);
                            mma_k32(acc[tl], fp8x8_to_bf16x8(make_uint2(u0.z, u0.w), sc),
                                    fp8x8_to_bf16x8(make_uint2(v0.z, v0.w), sc), x[j][1]);
                            mma_k32(acc[tl], fp8x8_to_bf16x8(make_uint2(u1.x, u1.y), sc),
                                    fp8x8_to_bf16x8(make_uint2(v1.x, v1.y), sc), x[j][2]);
                            mma_k32(acc[tl], fp8x8_to_bf16x8(make_uint2(u1.z, u1.w), sc),
                                    fp8x8_to_bf16x8(make_uint2(v1.z, v1.w), sc), x[j][3]);
                        } else {
                            uint4 wa[4], wb[4];
                            if constexpr (MODE == BULK_F16) {
                                e4m3x16_to_f16(u0, wa[0], wa[1]);
                                e4m3x16_to_f16(u1, wa[2], wa[3]);
                                e4m3x16_to_f16(v0, wb[0], wb[1]);
                                e4m3x16_to_f16(v1, wb[2], wb[3]);
                            } else {
                                wa[0] = u0, wa[1] = make_uint4(u0.y, u0.x, u0.w, u0.z), wa[2] = u1,
                                wa[3] = make_uint4(u1.y, u1.x, u1.w, u1.z);
                                wb[0] = v0, wb[1] = make_uint4(v0.y, v0.x, v0.w, v0.z), wb[2] = v1,
                                wb[3] = make_uint4(v1.y, v1.x, v1.w, v1.z);
                            }
                            float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                            for (int v = 0; v < 4; ++v) mma_k32_f16(part, wa[v], wb[v], x[j][v]);
                            const float f0 = sc * xsc[j][0], f1 = sc * xsc[j][1];
                            acc[tl][0] = fmaf(part[0], f0, acc[tl][0]);
                            acc[tl][1] = fmaf(part[1], f1, acc[tl][1]);
                            acc[tl][2] = fmaf(part[2], f0, acc[tl][2]);
                            acc[tl][3] = fmaf(part[3], f1, acc[tl][3]);
                        }
                    }
                }
            }
            float* rb = red + (nb & 1) * (BULK_CWARPS * 32 * 8);
            *reinterpret_cast<float4*>(rb + (warp * 32 + lane) * 8) =
                make_float4(acc[0][0], acc[0][1], acc[0][2], acc[0][3]);
            *reinterpret_cast<float4*>(rb + (warp * 32 + lane) * 8 + 4) =
                make_float4(acc[1][0], acc[1][1], acc[1][2], acc[1][3]);
            if (g0 + 8 >= end) {
                // The stage's last use by this warp.
                __syncwarp();
                if (lane == 0) mbar_arrive(empty + st);
            }
            bulk_consumer_bar();
            // Output (row, tok) of tile tl: lane (row % 8)·4 + tok / 2, element (row / 8)·2 +
            // tok % 2 (mma's c layout), summed over the warps in order.
            const int tl = tid >> 7, row = (tid >> 3) & 15, tok = tid & 7;
            const int L = (row & 7) * 4 + (tok >> 1), e = (row >> 3) * 2 + (tok & 1);
            if (tok < n && (!GATE_UP || tl == 0)) {
                float s0 = 0.f, s1 = 0.f;
#pragma unroll
                for (int v = 0; v < BULK_CWARPS; ++v) {
                    s0 += rb[(v * 32 + L) * 8 + tl * 4 + e];
                    if (GATE_UP) s1 += rb[(v * 32 + L) * 8 + 4 + e];
                }
                if constexpr (GATE_UP)
                    h_out[(size_t)(g0 + tok) * N + r0 + row] = __float2bfloat16(silu(s0) * s1);
                else
                    y[(size_t)(g0 + tok) * N + r0 + tl * 16 + row] = s0;
            }
            ++nb;
        };
        group(beg, x0, xsc0);
        for (uint32_t g0 = beg + 8; g0 < end; g0 += 8) {
            if (g0 != xg1) {
                load_x(g0, x1);
                prep_x(x1, xsc1);
                xg1 = g0;
            }
            group(g0, x1, xsc1);
        }
    }
}

// The kernel the engine launches (experts.rs `takes_bulk_gate_up`). The other modes, and the
// down product, are instantiated by scripts/bench/decode_quant.cu, which measures them.
extern "C" __global__ void __launch_bounds__(32 * (BULK_CWARPS + 1), 1)
    moe_gate_up_bulk_fp8h(const bf16* x, int hidden, const uint8_t* w_gu, const float* s_gu,
                          int inner, const uint32_t* offsets, const uint32_t* active,
                          const uint32_t* sorted, int k_div, bf16* h_out) {
    moe_bulk_fp8<true, BULK_F16, true>(x, hidden, w_gu, s_gu, inner, offsets, active, sorted,
                                       k_div, h_out, nullptr);
}

// ---------------------------------------------------------------------------------------------
// The copies of a packed weight tile (e4m3 here, INT4 in experts_int4.cu: K_PER_BYTE values a
// byte) into one stage of shared memory, unswizzled: a k step's BN tile rows of RB bytes each, as
// 16-byte cp.async chunks (chunk i of row n at n · RB bytes). Rows past N are zero-filled.
template <bool GATE_UP, int BN, int RB, int THREADS, int TN, int K_PER_BYTE>
struct GgStagedCopies {
    static constexpr int CQ = RB / 16;  // 16-byte chunks a row
    static constexpr int PER = BN * CQ / THREADS;
    static_assert(PER >= 1, "tile shape");
    const uint8_t* src[PER];
    bool ok[PER];
    int off[PER];
    __device__ __forceinline__ GgStagedCopies(const uint8_t* w, int K, int N, uint32_t s, int n0,
                                              int tid) {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int id = tid + i * THREADS, n = id / CQ, c = id % CQ;
            size_t m;
            int r;
            src[i] = w + gg_weight_row<GATE_UP, TN>(n, n0, s, N, ok[i], m, r) * (K / K_PER_BYTE) +
                     c * 16;
            off[i] = n * RB + c * 16;
        }
    }
    // Queues the copies of columns k0.. into `stage` (in the caller's cp.async group).
    __device__ __forceinline__ void load(uint8_t* stage, int k0) const {
#pragma unroll
        for (int i = 0; i < PER; ++i) cp_async16(stage + off[i], src[i] + k0 / K_PER_BYTE, ok[i]);
    }
};

// What the FP8 and INT4 grouped tiles (GgFp8Weights, experts_int4.cu's GgInt4Weights) share: a
// stage's packed BN × BK weight tile (RB = BK / K_PER_BYTE bytes a row) in shared memory, STAGES
// of them, then the one bf16 tile they are dequantised into; the copies into a stage; and for each
// of a thread's 8-value chunks its byte in a stage (`from`) and its element in the bf16 tile
// (`to`). The constructor hands `row(i, m, r)` each chunk's weight row (row r of matrix m), from
// which a format keeps what its scales need.
template <bool GATE_UP, int BN, int BK, int STAGES, int THREADS, int TN, int K_PER_BYTE>
struct GgStagedTile {
    static constexpr int RB = BK / K_PER_BYTE;  // bytes of a stage's tile row
    static constexpr int CH = BK / 8;           // 8-value chunks a row, dequantised
    static constexpr int PER = BN * CH / THREADS;
    static constexpr int SMEM = STAGES * BN * RB + BN * BK * 2;
    static_assert(PER >= 1, "tile shape");
    GgStagedCopies<GATE_UP, BN, RB, THREADS, TN, K_PER_BYTE> copies;
    int from[PER], to[PER];
    uint8_t* staged;
    bf16* tile;
    template <typename Row>
    __device__ __forceinline__ GgStagedTile(const uint8_t* w, int K, int N, uint32_t s, int n0,
                                            int tid, unsigned char* smem, Row row)
        : copies(w, K, N, s, n0, tid),
          staged(smem),
          tile(reinterpret_cast<bf16*>(smem + STAGES * BN * RB)) {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int id = tid + i * THREADS, n = id / CH, c = id % CH;
            bool ok;
            size_t m;
            int r;
            gg_weight_row<GATE_UP, TN>(n, n0, s, N, ok, m, r);
            row(i, m, r);
            from[i] = n * RB + c * (8 / K_PER_BYTE);
            to[i] = gg_off<BK>(n, c);
        }
    }
    // Queues stage st's copies of columns k0.. (in the caller's cp.async group).
    __device__ __forceinline__ void load(int k0, int st) { copies.load(staged + st * BN * RB, k0); }
    // Stage st's packed bytes.
    __device__ __forceinline__ const uint8_t* stage(int st) const { return staged + st * BN * RB; }
};

// ---------------------------------------------------------------------------------------------
// Grouped (larger batches and prefill): moe_gg (experts.cu) with e4m3 weight tiles. Each k step's
// BN × BK tile arrives as e4m3 bytes through moe_gg's cp.async pipeline (half the bytes), into a
// staging area of its own per stage; when a stage is due, the block dequantises it into one bf16
// tile laid out exactly as moe_gg's bf16 tiles (gg_off swizzle), and the k step's ldmatrix and
// MMAs are moe_gg's. One more barrier per k step; shared memory STAGES · BN · BK + BN · BK · 2
// bytes for the weights.
template <bool GATE_UP, int BN, int BK, int STAGES, int THREADS, int TN>
struct GgFp8Weights {
    typedef uint8_t Elem;
    typedef GgStagedTile<GATE_UP, BN, BK, STAGES, THREADS, TN, 1> Tile;
    static constexpr int PER = Tile::PER;
    static constexpr int SMEM = Tile::SMEM;
    static_assert(FP8_BLOCK % BK == 0, "a k step within one scale block");
    // Each chunk's row's block scales, one per 128 columns.
    const float* scale[PER];
    Tile t;
    __device__ __forceinline__ GgFp8Weights(const uint8_t* w, const QuantArgs& qa, int K, int N,
                                            uint32_t s, int n0, int tid, unsigned char* smem)
        : t(w, K, N, s, n0, tid, smem, [&](int i, size_t m, int r) {
              scale[i] = fp8_scale_row(qa.scales, m, N, r, K);
          }) {}
    __device__ __forceinline__ void load(int k0, int st) { t.load(k0, st); }
    // Stage st (landed: the caller's wait and barrier, which also found every warp done with
    // the previous step's tile) dequantised into the bf16 tile; every thread of the block calls
    // it.
    __device__ __forceinline__ const bf16* ready(int k0, int st) {
        convert(k0, st, t.tile);
        __syncthreads();
        return t.tile;
    }
    // This thread's chunks of stage st (columns k0..) dequantised into the bf16 tile `dst`.
    __device__ __forceinline__ void convert(int k0, int st, bf16* dst) const {
        const uint8_t* Q = t.stage(st);
        const int kb = k0 / FP8_BLOCK;
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const uint2 v = *reinterpret_cast<const uint2*>(Q + t.from[i]);
            *reinterpret_cast<uint4*>(dst + t.to[i]) = fp8x8_to_bf16x8(v, __ldg(scale[i] + kb));
        }
    }
};

// moe_ws's loader with e4m3 weights (experts.cu's WsBf16Loader is the bf16 one): the loader
// warpgroup copies each k step's BN × 64 e4m3 tile into a staging ring of S8 slots (`extra`
// shared memory, S8 · BN · 64 bytes) S8 − 1 steps ahead, and when the step's stage is free
// dequantises its slot into the stage's bf16 tile in moe_ws's layout (gg_off<64>, as GgFp8Weights
// does for moe_gg), so the consumers' wgmma read the same bf16 values as over a dequantised
// checkpoint, in the same order: the bf16 kernel's bits. A stage is full after each loader
// thread's activation copies land (cp.async's arrive) and it has written its part of the tile
// (a plain arrive after a proxy fence): FULL = 2 · 128.
template <bool GATE_UP, int BN, int S8, int STAGES>
struct WsFp8Loader {
    typedef uint8_t Elem;
    // (Its staging ring, S8 · BN · 64 bytes, follows moe_ws's barriers: experts.rs sizes it.)
    static constexpr int FULL = 256;
    static constexpr int B_BYTES = STAGES * BN * 64 * 2;
    static constexpr bool CONSUMER_DEQUANT = false;
    typedef GgFp8Weights<GATE_UP, BN, 64, S8, 128, 128> Staged;
    Staged wt;
    bf16* sb;
    __device__ __forceinline__ WsFp8Loader(const uint8_t* w, const QuantArgs& qa, int K, int N,
                                           uint32_t s, int n0, int tid, bf16* sb_,
                                           unsigned char* extra)
        : wt(w, qa, K, N, s, n0, tid, extra), sb(sb_) {}
    // The first S8 − 1 steps' copies, a cp.async group each.
    __device__ __forceinline__ void start(int kt_n) {
#pragma unroll
        for (int i = 0; i < S8 - 1; ++i) {
            if (i < kt_n) wt.load(i * 64, i);
            cp_async_commit();
        }
    }
    __device__ __forceinline__ void load(int kt, int st, int kt_n, uint64_t* full) {
        mbar_cp_async_arrive(full);  // the activations' copies of this stage
        // Every loader thread is done dequantising step kt − 1, whose slot the next copies take.
        asm volatile("bar.sync 1, 128;\n" ::: "memory");
        const int kn = kt + S8 - 1;
        if (kn < kt_n) wt.load(kn * 64, kn % S8);
        cp_async_commit();
        cp_async_wait<S8 - 1>();  // this thread's copies of step kt have landed
        asm volatile("bar.sync 1, 128;\n" ::: "memory");  // and every loader thread's
        wt.convert(kt * 64, kt % S8, sb + st * BN * 64);
        fence_proxy_async();
        mbar_arrive(full);
    }
};

// The shapes of GG_KERNELS (experts.cu), with e4m3 weights (engine/src/cuda/experts.rs sizes
// their shared memory: 64 KiB for k64 in 3 stages, 40 KiB for k32 in 4).
template <bool GATE_UP, int BK, int STAGES>
using GgFp8 = GgFp8Weights<GATE_UP, GG_BN, BK, STAGES, 128, GG_BN / 2>;
#define GG_FP8_KERNELS(SFX, BK, STAGES)                                                            \
    extern "C" __global__ void __launch_bounds__(128)                                             \
        moe_gg_gate_up_fp8_##SFX(const bf16* x, int hidden, const uint8_t* w_gu,                  \
                                 const float* s_gu, int inner, const uint32_t* sorted_rows,       \
                                 const uint32_t* block_slot, bf16* h) {                           \
        moe_gg<true, GG_BM, GG_BN, BK, STAGES, 2, 2, GgFp8<true, BK, STAGES>>(                    \
            x, hidden, w_gu, QuantArgs{s_gu, nullptr, 0}, inner, sorted_rows, block_slot, h);     \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(128)                                             \
        moe_gg_down_fp8_##SFX(const bf16* h, int inner, const uint8_t* w_down,                    \
                              const float* s_down, int hidden, const uint32_t* sorted_rows,       \
                              const uint32_t* block_slot, bf16* y) {                              \
        moe_gg<false, GG_BM, GG_BN, BK, STAGES, 2, 2, GgFp8<false, BK, STAGES>>(                  \
            h, inner, w_down, QuantArgs{s_down, nullptr, 0}, hidden, sorted_rows, block_slot, y); \
    }
GG_FP8_KERNELS(k64, 64, 3)
GG_FP8_KERNELS(k32, 32, 4)

// ---------------------------------------------------------------------------------------------
// One wide e4m3 matrix (the shared experts' stacked gate/up [2N, K] or down [N, K], 128 × 128
// block scales) times a few dozen rows x [T, K]: the products past dense.cu's rows (17 … 64 by
// default; `Gpu::dense_small` launches it for one block row, DENSE_FP8_SPLIT_MAX_ROWS). cuBLAS needs the weight dequantised to bf16 on every call (reads 1 byte,
// writes 2 and reads them again), and moe_gg's grid over one matrix's columns (44 or 16 blocks)
// leaves most SMs idle. Here moe_gg's tile (64 rows × 128 columns, k steps of 64 in 3 stages,
// the e4m3 dequantised into its bf16 tile) runs over one k range of `gridDim.z` (each a run of
// whole k steps), so the weights are read once by enough blocks to fill the GPU, and each block
// writes its f32 sums to `part [gridDim.z][T][C]` (C = 2N for gate/up: gate column j at j, up
// at N + j; N for down). dense_fp8_sk_swiglu / dense_fp8_sk_sum add the k ranges' sums. (The
// sums added into one zeroed buffer by f32 atomics instead were slower: session 34.)
// Grid: x the column tiles (gate/up: ⌈N / 64⌉, else ⌈N / 128⌉), y ⌈T / 64⌉, z the k ranges.
// K % 64 == 0; gate/up: the stacked [2N, K] weight with N % 128 == 0 (gate and up rows each
// start a block row of scales).
template <bool GATE_UP>
__device__ __forceinline__ void dense_fp8_sk_tile(const bf16* __restrict__ x, int T, int K,
                                             const uint8_t* __restrict__ w, const float* scales,
                                             int N, float* __restrict__ part) {
    constexpr int BM = GG_BM, BN = GG_BN, BK = 64, STAGES = 3, WM = 2, WN = 2;
    constexpr int THREADS = WM * WN * 32, TM = BM / WM, TN = BN / WN, FM = TM / 16, FN = TN / 8;
    constexpr int CH = BK / 8, A_PER = BM * CH / THREADS;
    typedef GgFp8<GATE_UP, BK, STAGES> W;
    extern __shared__ __align__(128) unsigned char gg_smem[];
    bf16* sa = reinterpret_cast<bf16*>(gg_smem);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n0 = blockIdx.x * (GATE_UP ? BN / 2 : BN);
    const int r0 = blockIdx.y * BM;
    const int kt_all = K / BK, S = gridDim.z, z = blockIdx.z;
    const int kt0 = kt_all * z / S, kt1 = kt_all * (z + 1) / S;
    const bf16* asrc[A_PER];
    bool aok[A_PER];
    int aoff[A_PER];
#pragma unroll
    for (int i = 0; i < A_PER; ++i) {
        const int id = tid + i * THREADS, r = id / CH, c = id % CH;
        aoff[i] = gg_off<BK>(r, c);
        aok[i] = r0 + r < T;
        asrc[i] = x + (size_t)(aok[i] ? r0 + r : 0) * K + c * 8;
    }
    W wt(w, QuantArgs{scales, nullptr, 0}, K, N, 0, n0, tid, gg_smem + STAGES * BM * BK * 2);
    const int wm = warp / WN, wn = warp % WN;
    float acc[FM][FN][4];
    gg_mainloop<BM, BK, STAGES, FM, FN, TM, TN, A_PER>(sa, wt, asrc, aok, aoff, kt0, kt1 - kt0, wm,
                                                      wn, lane, acc);
    const int C = GATE_UP ? 2 * N : N;
    float* out = part + (size_t)z * T * C;
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mi = 0; mi < FM; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int q = r0 + wm * TM + mi * 16 + g + half * 8;
            if (q >= T) continue;
#pragma unroll
            for (int ni = 0; ni < FN; ++ni) {
                // gate/up: a warp's first FN/2 fragments are gate columns, the next FN/2 the
                // same up columns (gg_weight_row's tile order).
                const int j = GATE_UP ? n0 + wn * (TN / 2) + (ni % (FN / 2)) * 8 + 2 * t4
                                      : n0 + wn * TN + ni * 8 + 2 * t4;
                const int col = GATE_UP && ni >= FN / 2 ? N + j : j;
                if (j < N)
                    *reinterpret_cast<float2*>(out + (size_t)q * C + col) =
                        make_float2(acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
            }
        }
}
extern "C" __global__ void __launch_bounds__(128)
    dense_fp8_sk_gate_up(const bf16* x, int T, int K, const uint8_t* w, const float* s, int N,
                         float* part) {
    dense_fp8_sk_tile<true>(x, T, K, w, s, N, part);
}
extern "C" __global__ void __launch_bounds__(128)
    dense_fp8_sk(const bf16* x, int T, int K, const uint8_t* w, const float* s, int N,
                 float* part) {
    dense_fp8_sk_tile<false>(x, T, K, w, s, N, part);
}
// h [T, N] = SiLU(Σ gate) · Σ up over the S k ranges' sums `part [S][T][2N]`, 2 columns a thread.
extern "C" __global__ void dense_fp8_sk_swiglu(const float* part, int S, int T, int N, bf16* h) {
    const int i = (blockIdx.x * blockDim.x + threadIdx.x) * 2;
    if (i >= T * N) return;
    const int t = i / N, j = i % N;
    float2 g = make_float2(0.f, 0.f), u = g;
    for (int z = 0; z < S; ++z) {
        const float* p = part + ((size_t)z * T + t) * 2 * N;
        const float2 a = *reinterpret_cast<const float2*>(p + j);
        const float2 b = *reinterpret_cast<const float2*>(p + N + j);
        g.x += a.x, g.y += a.y, u.x += b.x, u.y += b.y;
    }
    *reinterpret_cast<uint32_t*>(h + i) = pack_bf16(silu(g.x) * u.x, silu(g.y) * u.y);
}
// y [T, N] = Σ over the S k ranges' sums `part [S][T][N]`, 2 columns a thread.
extern "C" __global__ void dense_fp8_sk_sum(const float* part, int S, int T, int N, bf16* y) {
    const int i = (blockIdx.x * blockDim.x + threadIdx.x) * 2;
    if (i >= T * N) return;
    float2 a = make_float2(0.f, 0.f);
    for (int z = 0; z < S; ++z) {
        const float2 b = *reinterpret_cast<const float2*>(part + (size_t)z * T * N + i);
        a.x += b.x, a.y += b.y;
    }
    *reinterpret_cast<uint32_t*>(y + i) = pack_bf16(a.x, a.y);
}

// moe_ws's weights e4m3 with the dequantisation in the consumers (CONSUMER_DEQUANT): the loader
// warpgroup only copies each stage's 256 × 64 e4m3 tile (STAGES of them, 16 KiB each) beside the
// activations, and the 256 consumer threads dequantise step kt + 1's tile into one of two bf16
// buffers (32 KiB each) while step kt's wgmma run (moe_ws's loop), 8 of a tile's 2,048 8-value
// chunks each. The same values in the same layout as WsFp8Loader's (gg_off<64>): the same bits.
template <bool GATE_UP, int BN, int STAGES>
struct WsFp8ConsumerLoader {
    typedef uint8_t Elem;
    static constexpr int FULL = 128;
    static constexpr int B_BYTES = STAGES * BN * 64 + 2 * BN * 64 * 2;
    static constexpr bool CONSUMER_DEQUANT = true;
    GgStagedCopies<GATE_UP, BN, 64, 128, 128, 1> copies;
    unsigned char* staged;
    __device__ __forceinline__ WsFp8ConsumerLoader(const uint8_t* w, const QuantArgs&, int K,
                                                   int N, uint32_t s, int n0, int tid, bf16* sb,
                                                   unsigned char*)
        : copies(w, K, N, s, n0, tid), staged(reinterpret_cast<unsigned char*>(sb)) {}
    __device__ __forceinline__ void start(int) {}
    __device__ __forceinline__ void load(int kt, int st, int, uint64_t* full) {
        copies.load(staged + st * BN * 64, kt * 64);
        mbar_cp_async_arrive(full);
    }
    // A consumer thread's part (ct in 0..255): tile rows n = ct / 8 + 32 i (i < 8), chunk ct % 8
    // of each. A gate/up tile's 256 rows are 128 output columns from n0 (a multiple of 128: one
    // block row of scales), gate rows (local row < 64 of each 128) and up rows; a down tile's
    // are rows n0 + n (n0 a multiple of 256: two block rows, the second clamped to the last for
    // a partial edge, whose rows are zeros).
    struct Conv {
        const float* scales;
        uint32_t soff[2];  // scale-row offsets: gate / up, or block rows 0 / 1 of the tile
        int from0, to0, nb;
        unsigned char* staged;
        bf16* bufs;
        __device__ __forceinline__ Conv(const QuantArgs& qa, int K, int N, uint32_t s, int n0,
                                        int ct, unsigned char* sb)
            : scales(qa.scales),
              staged(sb),
              bufs(reinterpret_cast<bf16*>(sb + STAGES * BN * 64)) {
            const int rb = (N + FP8_BLOCK - 1) / FP8_BLOCK, cb = (K + FP8_BLOCK - 1) / FP8_BLOCK;
            nb = ct / 8;
            const int c = ct % 8;
            from0 = nb * 64 + c * 8;
            to0 = gg_off<64>(nb, c);
            if (GATE_UP) {
                const int br = n0 / FP8_BLOCK;
                soff[0] = (uint32_t)(((size_t)2 * s * rb + br) * cb);
                soff[1] = (uint32_t)(((size_t)(2 * s + 1) * rb + br) * cb);
            } else {
                const int b0 = min(n0 / FP8_BLOCK, rb - 1), b1 = min(n0 / FP8_BLOCK + 1, rb - 1);
                soff[0] = (uint32_t)(((size_t)s * rb + b0) * cb);
                soff[1] = (uint32_t)(((size_t)s * rb + b1) * cb);
            }
        }
        __device__ __forceinline__ const bf16* tile(int kt) const {
            return bufs + (kt & 1) * BN * 64;
        }
        // Step kt's staged tile (stage st) into buffer kt % 2.
        __device__ __forceinline__ void convert(int kt, int st) const {
            const int kb = kt * 64 / FP8_BLOCK;
            const float s0 = __ldg(scales + soff[0] + kb), s1 = __ldg(scales + soff[1] + kb);
            const unsigned char* Q = staged + st * BN * 64;
            bf16* T = bufs + (kt & 1) * BN * 64;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int n = nb + 32 * i;
                // gate/up: local row n % 128 ≥ 64 is an up row; down: n ≥ 128 the second block row
                const bool second = GATE_UP ? (n & 127) >= 64 : n >= 128;
                const uint2 v = *reinterpret_cast<const uint2*>(Q + from0 + i * 32 * 64);
                *reinterpret_cast<uint4*>(T + to0 + i * 32 * 64) =
                    fp8x8_to_bf16x8(v, second ? s1 : s0);
            }
        }
    };
};

// moe_ws (experts.cu's warp-specialised wgmma grouped GEMM) with e4m3 weights (engine/src/cuda/
// experts.rs `ws_fp8_form` picks; its `WS_FP8*` constants size the shared memory). H200, a
// V2-Lite layer at 8,192 tokens, µs a call, gate/up / down (docs/BENCHMARKS.md, session 28):
// the consumers dequantising (`_n256c`, the default) 1,007 / 502; the loader dequantising
// (`_n256`) with 4 bf16 stages and 2 staging slots 1,107 / 577, against 3 + 3, 3 + 5 and 2 + 6:
// 1,249 / 630, 1,268 / 621 and 1,291 / 645; the mma.sync form 1,317 / 664; bf16's 561 / 297.
#define WS_FP8_STAGES 4
#define WS_FP8_SLOTS 2
// The consumer-dequantising form (WsFp8ConsumerLoader, the default): 5 stages of activations and
// e4m3 tiles and two bf16 tiles (225 KiB).
#define WS_FP8C_STAGES 5
// The gate/up and down kernels `moe_ws_{gate_up,down}_fp8_n256{SFX}` over loader policy L.
#define WS_FP8_KERNELS(SFX, STAGES, L)                                                             \
    extern "C" __global__ void __launch_bounds__(384, 1) moe_ws_gate_up_fp8_n256##SFX(            \
        const bf16* x, int hidden, const uint8_t* w_gu, const float* s_gu, int inner,              \
        const uint32_t* sorted_rows, const uint32_t* block_slot, bf16* h) {                        \
        moe_ws<true, 128, 256, STAGES, L(true)>(x, hidden, w_gu, QuantArgs{s_gu, nullptr, 0},      \
                                                inner, sorted_rows, block_slot, h);                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(384, 1) moe_ws_down_fp8_n256##SFX(               \
        const bf16* h, int inner, const uint8_t* w_down, const float* s_down, int hidden,          \
        const uint32_t* sorted_rows, const uint32_t* block_slot, bf16* y) {                        \
        moe_ws<false, 128, 256, STAGES, L(false)>(h, inner, w_down,                                \
                                                  QuantArgs{s_down, nullptr, 0}, hidden,           \
                                                  sorted_rows, block_slot, y);                     \
    }
#define WS_FP8_CONSUMER(GU) WsFp8ConsumerLoader<GU, 256, WS_FP8C_STAGES>
#define WS_FP8_LOADER(GU) WsFp8Loader<GU, 256, WS_FP8_SLOTS, WS_FP8_STAGES>
WS_FP8_KERNELS(c, WS_FP8C_STAGES, WS_FP8_CONSUMER)
WS_FP8_KERNELS(, WS_FP8_STAGES, WS_FP8_LOADER)
#undef WS_FP8_KERNELS
#undef WS_FP8_CONSUMER
#undef WS_FP8_LOADER

// e4m3 ↔ f32 casts on the device (candle 0.11's own F8E4M3 casts look kernels up under names its
// kernel module does not define, "cast_f32_f8e4m3" against "cast_f32_f8_e4m3"): f32 → e4m3
// rounds to nearest even and saturates to ±448 (what the host's float8 crate does for the
// clamped values a quantiser gives it); e4m3 → f32 is exact.
extern "C" __global__ void e4m3_from_f32(const float* in, __nv_fp8_e4m3* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = __nv_fp8_e4m3(in[i]);
}
extern "C" __global__ void e4m3_to_f32(const __nv_fp8_e4m3* in, float* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = float(in[i]);
}
