// The decode-size routed-expert products (moe_gate_up_mma / moe_down_mma's walk) at
// DeepSeek-V2-Lite's shapes (64 experts, hidden 2048, inner 1408, top-6) for each weight format
// and each way of decoding it, as a decode step runs them: 26 layers with weights of their own
// (no layer's experts in L2), moe_align + gate/up + down + combine per layer, captured in one CUDA
// graph and replayed. Prints µs per layer and GB/s over the bytes of the distinct experts a
// layer reads, per variant:
//   bf16       the bf16 kernels
//   fp8        e4m3 · scale in f32 → bf16 per value, the block scale read at the MMAs' use
//              (engine/src/cuda/experts_fp8.cu: two chunks in flight since 2026-11-28; the
//              pref / epi / epi2 forms below keep four)
//   fp8 pref   the same values, the scale loaded with the chunk (in the ring of loads in flight)
//   fp8 epi    e4m3 → bf16 unscaled (exact), the MMAs summed per 128-column block and the
//              block's scale applied to those f32 sums (no multiply per value)
//   fp8 epi2   as fp8 epi, with f16 → bf16 by integer operations and one bf16x2 multiplication
//              (one conversion-pipe instruction a pair of values instead of three), the scale
//              read at the block's end
//   int4 old   INT4 as before 2026-11-28 (groups of 128, symmetric): each value scaled, the
//              group's scale read at the MMAs' use
//   int4 fine  experts_int4.cu's MmaInt4Fine (groups < 64): the same values, the scale loaded
//              with the chunk
//   int4       experts_int4.cu's MmaInt4 (groups ≥ 64): q − zero exact in bf16 (one LOP3 and a
//              bf16x2 subtraction a pair), the scale applied to each group's f32 sums
//   fp8 csN    fp8 with N chunks in flight (fp8 cs2 is the kernels' own)
//   fp8 wsum   128-wide chunks, the values unscaled and exact in bf16, each chunk's f32 sums
//              times its block's scale (no multiplication a value), gate/up held to 3 blocks
//              an SM: `bits` converts with integer operations and one bf16x2 multiplication,
//              `cvt1` with one conversion instruction a pair; `nolb` unbounded (not yet run)
//   fp8 wide   experts_fp8.cu's MmaFp8Wide: 128-wide chunks (two 16-byte loads a row, a whole
//              L2 line), two in flight; wide3: three; wide lbN: the gate/up kernel held to N
//              blocks an SM
//   fp8 lbN    fp8 (four chunks) with the gate/up kernel held to N blocks an SM
//   int4 lb3, int4 csN   the same for INT4
//   int4 wide  experts_int4.cu's MmaInt4Wide: 128-wide chunks (one 16-byte load a row, 64 bytes
//              a row), two in flight; lb3: gate/up held to 3 blocks an SM; wide3: three in flight
//   fp8 a8     experts_fp8.cu's MmaFp8A8 (W8A8): the activations quantised to e4m3 per token
//              per 128 columns in the walk, e4m3 MMAs (m16n8k32), each chunk's sums times the
//              weight block's and the token group's scales; lb3: gate/up held to 3 blocks an SM
//              (the engine's), cs3: three chunks in flight. Checked against `fp8 wide lb3` by
//              ‖Δ‖/‖ref‖ < 0.1 (the activations' rounding: ~2–3% expected)
//   fp8 a8 pre the same MMAs over activations quantised ahead (fp8_act_quant of x before
//              gate/up and of h before down: two launches more a layer)
//   fp8 bulk   experts_fp8.cu's moe_bulk_fp8 (gu_bulk, dn_bulk here): a persistent grid, the weights copied
//              into shared memory by the copy engine (cp.async.bulk) an item of 32 rows at a
//              time; `bulk` takes MmaFp8's bf16 values (bf16 MMAs), `bulk f16` e4m3 as f16 with
//              the block scales on each chunk's f32 sums (the engine's gate/up kernel, its lines
//              evict-first in L2; checked against `fp8 wide lb3` within 1e-2: it rounds the
//              weights less), `bulk raw` the bytes as they are (timing only); `gu` the gate/up
//              kernel with the wide down kernel
//   gu only:   the gate/up kernel alone (timing only: no down, no output); `bulk copies`: the
//              bulk kernel's copies alone, its consumers only releasing each stage
//   no-op      the same grids doing nothing: moe_align, the combine and the launches alone
// Checks: `fp8 pref` equals `fp8` and `int4 fine` equals `int4 old` bit for bit; the scaled-sums
// forms against those by ‖a − b‖ / ‖b‖ (they round differently: the exact product of the stored
// values against each scaled weight rounded to bf16).
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o decode_quant scripts/bench/decode_quant.cu
// Run on a GPU machine: ./decode_quant [batch ...]   (default 1 8 64; exit 1 on a mismatch)
#include "../../engine/src/cuda/kernels.cu"
#include "bench_common.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>


// Random bytes; e4m3 NaN (x111 1111) replaced by 0.
__global__ void fill_bytes(uint8_t* p, size_t n, uint32_t seed, bool e4m3) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint8_t b = (uint8_t)mix((uint32_t)i * 2654435761u ^ seed);
        if (e4m3 && (b & 0x7f) == 0x7f) b = 0;
        p[i] = b;
    }
}
// Positive scales in [lo, 2·lo).
__global__ void fill_scales(float* p, size_t n, uint32_t seed, float lo) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = lo * (1.f + (mix((uint32_t)i ^ seed) & 0xffff) / 65536.f);
}

// --- W8A8 (measured 2026-11-29, not kept: −7% at b64 for 4% relative error) ---
// c += A[16 rows, 32 k] · B[32 k, 8 tokens], e4m3 × e4m3 with f32 sums (mma.sync m16n8k32,
// sm_89 and later): a0 / a2 are four values each of row g, a1 / a3 of row g + 8, b0 / b1 of token g.
__device__ __forceinline__ void mma_e4m3(float c[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();  // the Rust side takes these kernels on compute capability 8.9+ only
#endif
}

// The power of two that scales a group whose largest magnitude is `amax` into e4m3's range:
// the least 2^e ≥ amax / 448 (DeepSeek's activation groups of 1 × 128 with a power-of-two scale,
// V3.1's `ue8m0` form), 1 for an all-zero group. Multiplying by its inverse is exact, so a value
// is rounded once, into e4m3; and the sums' scale products are exact too.
__device__ __forceinline__ float e4m3_group_scale(float amax) {
    if (!(amax > 0.f)) return 1.f;  // zero (or NaN, which the values carry on)
    uint32_t u = __float_as_uint(amax / 448.f);
    if (u & 0x7fffffu) u = (u + 0x800000u) & 0xff800000u;  // up to the next power of two
    return __uint_as_float(u);
}

// A lane's 32 bf16 activations (x[0..3]: 8 each, memory order) as e4m3 bytes in the same order,
// scaled by the inverse of the group's scale `s` (e4m3_group_scale of the 128 values the quad of
// lanes holds), rounded to nearest even and saturated to ±448.
__device__ __forceinline__ void quant_e4m3_x32(const uint4 (&x)[4], float inv, uint32_t (&q)[8]) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
        const uint32_t w[4] = {x[v].x, x[v].y, x[v].z, x[v].w};
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            const uint32_t u0 = w[2 * p], u1 = w[2 * p + 1];
            const float2 lo = make_float2(__uint_as_float(u0 << 16) * inv,
                                          __uint_as_float(u0 & 0xffff0000u) * inv);
            const float2 hi = make_float2(__uint_as_float(u1 << 16) * inv,
                                          __uint_as_float(u1 & 0xffff0000u) * inv);
            const uint32_t a = __nv_cvt_float2_to_fp8x2(lo, __NV_SATFINITE, __NV_E4M3);
            const uint32_t b = __nv_cvt_float2_to_fp8x2(hi, __NV_SATFINITE, __NV_E4M3);
            q[2 * v + p] = a | (b << 16);
        }
    }
}

// W8A8: e4m3 weights (MmaFp8Wide's 128-wide chunks, one block scale a chunk) times e4m3
// activations quantised per token per 128 columns, as DeepSeek's own FP8 inference runs its
// linear layers (act_quant + fp8_gemm): each chunk's four e4m3 MMAs (m16n8k32) summed in f32 and
// added times the weight block's scale and the token group's. No conversion of a weight and half
// the MMAs of the bf16 forms. The walk quantises x itself, per chunk: each lane of a quad holds
// 32 of token g's 128 values, the quad's largest magnitude (two shuffles) gives the group's
// power-of-two scale (e4m3_group_scale), so every warp that reads a group quantises it alike.
// Lane t's 32 bytes of a row's chunk (k = t·32 …) are MMA v's a0 / a2 (row g) and a1 / a3 (row
// g + 8) as words 2v and 2v + 1, and the activations' words 2v, 2v + 1 its b0 / b1: the same k
// permutation on both sides.
//
// Activations quantised ahead of the products (`fp8_act_quant`), in a buffer shaped as the bf16
// activations were ([rows, cols] of 2 bytes, so the kernels' row arithmetic is unchanged): row r's
// first `cols` bytes are its e4m3 values, the next cols / 128 · 4 bytes its groups' f32 scales.
// (PRE below; otherwise the walk quantises each chunk of x itself.)
template <bool PRE>
struct MmaFp8A8T : MmaFp8Wide {
    static constexpr bool OWN_WALK = true;
    int K;  // the row's width (PRE: its scales sit K bytes on from the row's start)
    __device__ static MmaFp8A8T at(const QuantArgs& qa, size_t m, int rows, int r, int K) {
        return {MmaFp8Wide::at(qa, m, rows, r, K), K};
    }
    // A lane's activations of a chunk: PRE the e4m3 bytes and the group's scale as loaded,
    // otherwise the 32 bf16 values.
    struct X {
        uint4 v[PRE ? 2 : 4];
        float s;
    };
    // Lane t's e4m3 words of token g's chunk and the group's scale.
    __device__ static void quantised(const X& x, uint32_t (&xq)[8], float& sx) {
        if constexpr (PRE) {
            const uint32_t w[8] = {x.v[0].x, x.v[0].y, x.v[0].z, x.v[0].w,
                                   x.v[1].x, x.v[1].y, x.v[1].z, x.v[1].w};
#pragma unroll
            for (int i = 0; i < 8; ++i) xq[i] = w[i];
            sx = x.s;
        } else {
            // The token group's scale: the quad's largest magnitude.
            float amax = 0.f;
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const uint32_t u[4] = {x.v[v].x, x.v[v].y, x.v[v].z, x.v[v].w};
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    amax = fmaxf(amax, fmaxf(fabsf(__uint_as_float(u[e] << 16)),
                                             fabsf(__uint_as_float(u[e] & 0xffff0000u))));
            }
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
            sx = e4m3_group_scale(amax);
            quant_e4m3_x32(x.v, 1.f / sx, xq);
        }
    }
    // (P: this policy, or one derived from it with another CHUNK_STAGES.)
    template <int NA, typename P>
    __device__ static void walk(const uint8_t* const (&w)[2 * NA], const P (&pol)[2 * NA],
                                const bf16* xr, int k_begin, int k_end, float (&c)[NA][4]) {
        constexpr int CS = P::CHUNK_STAGES;
        const int t = threadIdx.x & 3, t16 = t * 16;
        // PRE: `xr` (as the kernels compute it) is the packed row's byte 32·t, lane t's 32
        // bytes of chunk 0.
        const uint8_t* xq0 = reinterpret_cast<const uint8_t*>(xr);
        const float* xs = reinterpret_cast<const float*>(xq0 - 32 * t + pol[0].K);
        // The lanes holding tokens 2t and 2t + 1 (lane 4·token): c0 / c2 are token 2t's sums,
        // c1 / c3 token 2t + 1's.
        const int tok0 = 8 * t, tok1 = 8 * t + 4;
        Chunk r[CS][2 * NA];
        X b[CS];
        auto load = [&](int i, int kn) {
#pragma unroll
            for (int q = 0; q < 2 * NA; ++q) r[i][q] = pol[q].load2(w[q] + kn + t16, kn);
            if constexpr (PRE) {
                b[i].v[0] = *reinterpret_cast<const uint4*>(xq0 + kn);
                b[i].v[1] = *reinterpret_cast<const uint4*>(xq0 + kn + 16);
                b[i].s = xs[kn / FP8_BLOCK];
            } else {
#pragma unroll
                for (int v = 0; v < 4; ++v)
                    b[i].v[v] = *reinterpret_cast<const uint4*>(xr + kn + t16 + 8 * v);
            }
        };
#pragma unroll
        for (int i = 0; i < CS - 1; ++i)
            if (k_begin + i * 128 < k_end) load(i, k_begin + i * 128);
        for (int k = k_begin; k < k_end; k += CS * 128) {
#pragma unroll
            for (int i = 0; i < CS; ++i) {
                const int kk = k + i * 128, kn = kk + (CS - 1) * 128;
                if (kn < k_end) load((i + CS - 1) % CS, kn);
                if (kk < k_end) {
                    uint32_t xq[8];
                    float sx;
                    quantised(b[i], xq, sx);
                    const float s0 = __shfl_sync(0xffffffffu, sx, tok0);
                    const float s1 = __shfl_sync(0xffffffffu, sx, tok1);
                    // Each row pair's four MMAs, its f32 sums times its weight block's scale
                    // (rows g and g + 8 lie in one 128-row block) and the tokens' group scales.
#pragma unroll
                    for (int a = 0; a < NA; ++a) {
                        const Chunk& lo = r[i][2 * a];
                        const Chunk& hi = r[i][2 * a + 1];
                        const uint32_t wl[8] = {lo.a.x, lo.a.y, lo.a.z, lo.a.w,
                                                lo.b.x, lo.b.y, lo.b.z, lo.b.w};
                        const uint32_t wh[8] = {hi.a.x, hi.a.y, hi.a.z, hi.a.w,
                                                hi.b.x, hi.b.y, hi.b.z, hi.b.w};
                        float cb[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                        for (int v = 0; v < 4; ++v)
                            mma_e4m3(cb, wl[2 * v], wh[2 * v], wl[2 * v + 1], wh[2 * v + 1],
                                     xq[2 * v], xq[2 * v + 1]);
                        const float sw = __ldg(pol[2 * a].scale + kk / FP8_BLOCK);
                        const float w0 = sw * s0, w1 = sw * s1;
                        c[a][0] = fmaf(cb[0], w0, c[a][0]);
                        c[a][1] = fmaf(cb[1], w1, c[a][1]);
                        c[a][2] = fmaf(cb[2], w0, c[a][2]);
                        c[a][3] = fmaf(cb[3], w1, c[a][3]);
                    }
                }
            }
        }
    }
};
typedef MmaFp8A8T<false> MmaFp8A8;
typedef MmaFp8A8T<true> MmaFp8A8Pre;

// fp8_act_quant: MmaFp8A8Pre's buffer from bf16 rows, one warp a group of 128:
// e4m3_group_scale of the group's largest magnitude, each value times its inverse rounded to e4m3
// (as MmaFp8A8's walk quantises). Needs cols % 128 == 0.
extern "C" __global__ void fp8_act_quant(const bf16* in, int rows, int cols, bf16* out) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int groups = cols / 128, gi = blockIdx.y * (blockDim.x >> 5) + warp, r = blockIdx.x;
    if (r >= rows || gi >= groups) return;
    const uint2 v = *reinterpret_cast<const uint2*>(in + (size_t)r * cols + gi * 128 + lane * 4);
    const float f0 = __uint_as_float(v.x << 16), f1 = __uint_as_float(v.x & 0xffff0000u);
    const float f2 = __uint_as_float(v.y << 16), f3 = __uint_as_float(v.y & 0xffff0000u);
    float amax = fmaxf(fmaxf(fabsf(f0), fabsf(f1)), fmaxf(fabsf(f2), fabsf(f3)));
#pragma unroll
    for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float s = e4m3_group_scale(amax), inv = 1.f / s;
    const uint32_t a = __nv_cvt_float2_to_fp8x2(make_float2(f0 * inv, f1 * inv), __NV_SATFINITE,
                                                 __NV_E4M3);
    const uint32_t b = __nv_cvt_float2_to_fp8x2(make_float2(f2 * inv, f3 * inv), __NV_SATFINITE,
                                                 __NV_E4M3);
    uint8_t* row = reinterpret_cast<uint8_t*>(out + (size_t)r * cols);
    *reinterpret_cast<uint32_t*>(row + gi * 128 + lane * 4) = a | (b << 16);
    if (lane == 0) reinterpret_cast<float*>(row + cols)[gi] = s;
}

// --- Forms measured and not kept, for the A/B: each the kernels' policy with what it changed. ---
// `at` made again so that it returns the derived type.
#define WITH_AT(NAME, BASE)                                                                   \
    __device__ static NAME at(const QuantArgs& qa, size_t m, int rows, int r, int K) {        \
        return {BASE::at(qa, m, rows, r, K)};                                                 \
    }
// Policy P with CS chunks in flight.
template <typename P, int CS>
struct Stages : P {
    static constexpr int CHUNK_STAGES = CS;
    WITH_AT(Stages, P)
};
template <int CS>
using MmaFp8Stages = Stages<MmaFp8, CS>;
template <int CS>
using MmaInt4Stages = Stages<MmaInt4, CS>;

// e4m3 (four chunks in flight) with the block scale loaded with the chunk.
struct MmaFp8Prefetch : MmaFp8Stages<4> {
    WITH_AT(MmaFp8Prefetch, MmaFp8)
    struct Chunk {
        uint4 v;
        float s;
    };
    __device__ Chunk load2(const uint8_t* p, int k) const {
        return {__ldcs(reinterpret_cast<const uint4*>(p)), __ldg(scale + k / FP8_BLOCK)};
    }
    __device__ void frags2(const Chunk& r, int, uint4& lo, uint4& hi) const {
        lo = fp8x8_to_bf16x8(make_uint2(r.v.x, r.v.y), r.s);
        hi = fp8x8_to_bf16x8(make_uint2(r.v.z, r.v.w), r.s);
    }
    __device__ float epi_scale(const Chunk&, int) const { return 1.f; }
};

// INT4 before 2026-11-28 (MmaInt4Fine's values, every group size): the group's scale read at the
// MMAs' use.
struct MmaInt4Old : MmaInt4Fine {
    WITH_AT(MmaInt4Old, MmaInt4Fine)
    typedef uint2 Chunk;
    __device__ Chunk load2(const uint8_t* p, int) const {
        return __ldcs(reinterpret_cast<const uint2*>(p));
    }
    __device__ void frags2(const Chunk& r, int k, uint4& lo, uint4& hi) const {
        float bias, s;
        group(k + (threadIdx.x & 3) * 16, bias, s);
        lo = int4x8_to_bf16x8(r.x, bias, s);
        hi = int4x8_to_bf16x8(r.y, bias, s);
    }
    __device__ float epi_scale(const Chunk&, int) const { return 1.f; }
};

// e4m3 pairs (low byte first) → the bf16 pair of the unscaled values, exact, two ways:
// through f32 (the conversion instruction to f16, two to f32, one to bf16) ...
__device__ __forceinline__ uint32_t fp8x2_to_bf16x2_exact(uint32_t two) {
    const __half2_raw h =
        __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(two & 0xffffu), __NV_E4M3);
    const float2 f = __half22float2(__half2(h));
    return pack_bf16(f.x, f.y);
}
// ... or the conversion instruction to f16, then integer operations: f16 bits shifted right by 3
// are the bf16 of value · 2^-112 (every such value a bf16 normal or zero), and one bf16x2
// multiplication by 2^112 makes it exact: one conversion-pipe instruction a pair instead of three.
__device__ __forceinline__ uint32_t fp8x2_to_bf16x2_int(uint32_t two) {
    const __half2_raw h =
        __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(two & 0xffffu), __NV_E4M3);
    const uint32_t u = (uint32_t)h.x | ((uint32_t)h.y << 16);
    const uint32_t b = ((u >> 3) & 0x0fff0fffu) | (u & 0x80008000u);
    const __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&b),
                                     __floats2bfloat162_rn(0x1p112f, 0x1p112f));
    return *reinterpret_cast<const uint32_t*>(&r);
}

// e4m3 (four chunks in flight) summed per 128-column block, the block's scale applied to the
// f32 sums: loaded with the chunk (SCALE_WITH_CHUNK) or read at the block's end.
template <uint32_t (*Convert)(uint32_t), bool SCALE_WITH_CHUNK>
struct MmaFp8Sums : MmaFp8Stages<4> {
    static constexpr bool EPILOGUE = true;
    WITH_AT(MmaFp8Sums, MmaFp8)
    __device__ int group_size() const { return FP8_BLOCK; }
    struct Chunk {
        uint4 v;
        float s;
    };
    __device__ Chunk load2(const uint8_t* p, int k) const {
        return {__ldcs(reinterpret_cast<const uint4*>(p)),
                SCALE_WITH_CHUNK ? __ldg(scale + k / FP8_BLOCK) : 0.f};
    }
    __device__ float epi_scale(const Chunk& c, int k) const {
        return SCALE_WITH_CHUNK ? c.s : __ldg(scale + k / FP8_BLOCK);
    }
    __device__ void frags2(const Chunk& r, int, uint4& lo, uint4& hi) const {
        lo = make_uint4(Convert(r.v.x), Convert(r.v.x >> 16), Convert(r.v.y), Convert(r.v.y >> 16));
        hi = make_uint4(Convert(r.v.z), Convert(r.v.z >> 16), Convert(r.v.w), Convert(r.v.w >> 16));
    }
};
typedef MmaFp8Sums<fp8x2_to_bf16x2_exact, true> MmaFp8Epi;
typedef MmaFp8Sums<fp8x2_to_bf16x2_int, false> MmaFp8Epi2;

// ... or with no conversion instruction at all: a byte b of e4m3 (s eeee mmm) as the bf16
// (b & 0x80) << 8 | (b & 0x7f) << 4 is the value · 2^-120, normal or subnormal alike (the
// exponent field taken as is), and one bf16x2 multiplication by 2^120 makes it exact (a bf16
// subnormal times 2^120 is a normal): a byte permutation, two shifts and a LOP3 (integer pipe)
// and one bf16x2 multiplication a pair, where the kernels' own take two conversion-pipe
// instructions, two f32 multiplications and more.
__device__ __forceinline__ uint32_t fp8x2_to_bf16x2_bits(uint32_t two) {
    const uint32_t t = __byte_perm(two, 0u, 0x4140);  // byte 1 to bits 16–23, byte 0 to 0–7
    const uint32_t b = ((t << 8) & 0x80008000u) | ((t << 4) & 0x07f007f0u);
    const __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&b),
                                     __floats2bfloat162_rn(0x1p120f, 0x1p120f));
    return *reinterpret_cast<const uint32_t*>(&r);
}

// experts_fp8.cu's 128-wide chunks (one chunk = one block's 128 columns) with the unscaled
// values exact in bf16 (Convert) and the block's scale on each chunk's f32 sums (the walk's
// EPILOGUE, every chunk a group): no multiplication a value.
template <uint32_t (*Convert)(uint32_t)>
struct MmaFp8WideSums : MmaFp8Wide {
    static constexpr bool EPILOGUE = true;
    struct Chunk {
        uint4 a, b;
        float s;
    };
    WITH_AT(MmaFp8WideSums, MmaFp8Wide)
    __device__ int group_size() const { return FP8_BLOCK; }
    __device__ float epi_scale(const Chunk& c, int) const { return c.s; }
    __device__ Chunk load2(const uint8_t* p, int k) const {
        return {__ldcs(reinterpret_cast<const uint4*>(p)),
                __ldcs(reinterpret_cast<const uint4*>(p + 16)), __ldg(scale + k / FP8_BLOCK)};
    }
    __device__ static uint4 eight(uint32_t lo, uint32_t hi) {
        return make_uint4(Convert(lo), Convert(lo >> 16), Convert(hi), Convert(hi >> 16));
    }
    __device__ void frags4(const Chunk& r, int, uint4 (&f)[4]) const {
        f[0] = eight(r.a.x, r.a.y);
        f[1] = eight(r.a.z, r.a.w);
        f[2] = eight(r.b.x, r.b.y);
        f[3] = eight(r.b.z, r.b.w);
    }
};

template <typename W>
__global__ void gu_kernel(const bf16* x, int hidden, const typename W::Elem* w, QuantArgs qa,
                          int inner, const uint32_t* offsets, const uint32_t* active,
                          const uint32_t* sorted, int k_div, bf16* h) {
    gate_up_mma<W>(x, hidden, w, qa, inner, offsets, active, sorted, k_div, h);
}
template <typename W>
__global__ void dn_kernel(const bf16* h, int inner, const typename W::Elem* w, QuantArgs qa,
                          int hidden, const uint32_t* offsets, const uint32_t* active, float* y) {
    down_mma<W>(h, inner, w, qa, hidden, offsets, active, y,
                CombineTail{nullptr, nullptr, 0, 0, nullptr, nullptr});
}

// The same grids doing nothing: what align, combine and four launches cost a layer.
__global__ void gu_empty(const bf16*, int, const bf16*, QuantArgs, int, const uint32_t*,
                         const uint32_t*, const uint32_t*, int, bf16*) {}
__global__ void dn_empty(const bf16*, int, const bf16*, QuantArgs, int, const uint32_t*,
                         const uint32_t*, float*) {}



// Diagnostics, timing only (the values are not decoded, so the sums are garbage): the fp8
// kernels' walk with the conversions cut, to bound what conversion work costs at each batch.
//   fp8 nocvt  the 16 loaded bytes handed to the MMAs as they are (no instruction a value);
//              nocvt4: with four chunks in flight
//   fp8 cvt1   e4m3 pairs → f16 pairs, one conversion instruction a pair, the bits taken as bf16
//              (what a kernel on f16 MMAs with the scale on the sums would convert)
template <int CS>
struct MmaFp8NoCvt : MmaFp8Stages<CS> {
    WITH_AT(MmaFp8NoCvt, MmaFp8)
    typedef typename MmaFp8Stages<CS>::Chunk Chunk;
    __device__ void frags2(const Chunk& r, int, uint4& lo, uint4& hi) const {
        lo = r;
        hi = make_uint4(r.y, r.x, r.w, r.z);
    }
};
__device__ __forceinline__ uint32_t fp8x2_to_f16x2_bits(uint32_t two) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(two & 0xffffu), __NV_E4M3);
    return (uint32_t)h.x | ((uint32_t)h.y << 16);
}
struct MmaFp8Cvt1 : MmaFp8 {
    WITH_AT(MmaFp8Cvt1, MmaFp8)
    __device__ void frags2(const Chunk& r, int, uint4& lo, uint4& hi) const {
        lo = make_uint4(fp8x2_to_f16x2_bits(r.x), fp8x2_to_f16x2_bits(r.x >> 16),
                        fp8x2_to_f16x2_bits(r.y), fp8x2_to_f16x2_bits(r.y >> 16));
        hi = make_uint4(fp8x2_to_f16x2_bits(r.z), fp8x2_to_f16x2_bits(r.z >> 16),
                        fp8x2_to_f16x2_bits(r.w), fp8x2_to_f16x2_bits(r.w >> 16));
    }
};

struct Layer {
    void *gu, *dn;
    QuantArgs qgu, qdn;
};
enum Fmt { BF16, FP8, INT4 };
struct Variant {
    const char* name;
    Fmt fmt;
    int ref;  // the variant this one must equal bit for bit (−1: none, −2: no-op, −3: timing
              // only), or compare to (epi)
    bool exact;
    void (*run)(cudaStream_t, const Layer&, int gy, const bf16* x, int hidden, int inner,
                const uint32_t* off, const uint32_t* act, const uint32_t* sorted, int k, bf16* h,
                float* y);
    double tol;  // the relative difference allowed against `ref` (0: 1e-2)
};
// The gate/up kernel held to `MIN_BLOCKS` blocks an SM (registers capped to fit).
template <typename W, int MIN_BLOCKS>
__global__ void __launch_bounds__(128, MIN_BLOCKS)
    gu_kernel_lb(const bf16* x, int hidden, const typename W::Elem* w, QuantArgs qa, int inner,
                 const uint32_t* offsets, const uint32_t* active, const uint32_t* sorted,
                 int k_div, bf16* h) {
    gate_up_mma<W>(x, hidden, w, qa, inner, offsets, active, sorted, k_div, h);
}
// A layer's routed experts with policy W: gate/up by the kernel GU, then down.
template <typename W, auto GU>
static void run_gu(cudaStream_t st, const Layer& L, int gy, const bf16* x, int hidden, int inner,
                   const uint32_t* off, const uint32_t* act, const uint32_t* sorted, int k,
                   bf16* h, float* y) {
    GU<<<dim3(inner / 32, gy), 128, 0, st>>>(x, hidden, (const typename W::Elem*)L.gu, L.qgu,
                                             inner, off, act, sorted, k, h);
    dn_kernel<W><<<dim3(hidden / 32, gy), 128, 0, st>>>(
        h, inner, (const typename W::Elem*)L.dn, L.qdn, hidden, off, act, y);
}
template <typename W>
constexpr auto run_w = run_gu<W, gu_kernel<W>>;
template <typename W, int MIN_BLOCKS>
constexpr auto run_lb = run_gu<W, gu_kernel_lb<W, MIN_BLOCKS>>;
static void run_empty(cudaStream_t st, const Layer& L, int gy, const bf16* x, int hidden,
                      int inner, const uint32_t* off, const uint32_t* act,
                      const uint32_t* sorted, int k, bf16* h, float* y) {
    gu_empty<<<dim3(inner / 32, gy), 128, 0, st>>>(x, hidden, (const bf16*)L.gu, L.qgu, inner,
                                                   off, act, sorted, k, h);
    dn_empty<<<dim3(hidden / 32, gy), 128, 0, st>>>(h, inner, (const bf16*)L.dn, L.qdn, hidden,
                                                    off, act, y);
}
// W8A8 over pre-quantised activations: fp8_act_quant of x, gate/up, fp8_act_quant of h, down
// (two launches more a layer; `q` a buffer of h's size for the packed h).
static bf16* g_xq;
static bf16* g_hq;
static int g_rows_x, g_rows_h;  // rows of x (the batch) and of h (its pairs)
template <typename W, int MIN_BLOCKS>
static void run_pre(cudaStream_t st, const Layer& L, int gy, const bf16* x, int hidden, int inner,
                    const uint32_t* off, const uint32_t* act, const uint32_t* sorted, int k,
                    bf16* h, float* y) {
    fp8_act_quant<<<dim3(g_rows_x, (hidden / 128 + 7) / 8), 256, 0, st>>>(x, g_rows_x, hidden, g_xq);
    gu_kernel_lb<W, MIN_BLOCKS><<<dim3(inner / 32, gy), 128, 0, st>>>(
        g_xq, hidden, (const uint8_t*)L.gu, L.qgu, inner, off, act, sorted, k, h);
    fp8_act_quant<<<dim3(g_rows_h, (inner / 128 + 7) / 8), 256, 0, st>>>(h, g_rows_h, inner, g_hq);
    dn_kernel<W><<<dim3(hidden / 32, gy), 128, 0, st>>>(g_hq, inner, (const uint8_t*)L.dn, L.qdn,
                                                        hidden, off, act, y);
}
// The bulk-copy kernels (experts_fp8.cu's moe_*_bulk_fp8): one block an SM. `bulk` both,
// `bulk gu` the gate/up one with the wide down kernel.
static int g_sms;
template <auto GU, auto DN>
static void run_bulk(cudaStream_t st, const Layer& L, int gy, const bf16* x, int hidden,
                     int inner, const uint32_t* off, const uint32_t* act, const uint32_t* sorted,
                     int k, bf16* h, float* y) {
    GU<<<g_sms, 32 * (BULK_CWARPS + 1), BULK_SMEM, st>>>(
        x, hidden, (const uint8_t*)L.gu, L.qgu.scales, inner, off, act, sorted, k, h);
    if constexpr (DN == nullptr)
        dn_kernel<MmaFp8Wide><<<dim3(hidden / 32, gy), 128, 0, st>>>(
            h, inner, (const uint8_t*)L.dn, L.qdn, hidden, off, act, y);
    else
        DN<<<g_sms, 32 * (BULK_CWARPS + 1), BULK_SMEM, st>>>(
            h, inner, (const uint8_t*)L.dn, L.qdn.scales, hidden, off, act, y);
}
// Timing only: the gate/up kernel alone (no down: y and the output not computed).
template <auto GU, bool BULK>
static void run_gu_only(cudaStream_t st, const Layer& L, int gy, const bf16* x, int hidden,
                        int inner, const uint32_t* off, const uint32_t* act,
                        const uint32_t* sorted, int k, bf16* h, float* y) {
    if constexpr (BULK)
        GU<<<g_sms, 32 * (BULK_CWARPS + 1), BULK_SMEM, st>>>(
            x, hidden, (const uint8_t*)L.gu, L.qgu.scales, inner, off, act, sorted, k, h);
    else
        GU<<<dim3(inner / 32, gy), 128, 0, st>>>(x, hidden, (const uint8_t*)L.gu, L.qgu, inner,
                                                 off, act, sorted, k, h);
}
// The bulk kernels in each mode (the engine instantiates only moe_gate_up_bulk_fp8h).
template <int MODE, bool EVICT>
__global__ void __launch_bounds__(32 * (BULK_CWARPS + 1), 1)
    gu_bulk(const bf16* x, int hidden, const uint8_t* w_gu, const float* s_gu, int inner,
            const uint32_t* offsets, const uint32_t* active, const uint32_t* sorted, int k_div,
            bf16* h_out) {
    moe_bulk_fp8<true, MODE, EVICT>(x, hidden, w_gu, s_gu, inner, offsets, active, sorted, k_div,
                                    h_out, nullptr);
}
template <int MODE, bool EVICT>
__global__ void __launch_bounds__(32 * (BULK_CWARPS + 1), 1)
    dn_bulk(const bf16* h, int inner, const uint8_t* w_down, const float* s_down, int hidden,
            const uint32_t* offsets, const uint32_t* active, float* y) {
    moe_bulk_fp8<false, MODE, EVICT>(h, inner, w_down, s_down, hidden, offsets, active, nullptr,
                                     1, nullptr, y);
}
// The down product with TILES tiles of 16 rows a block and the k chunks split over KP warps a
// tile (experts.cu's down_mma: TILES 2, KP 2), the KP partial sums added in warp order through
// shared memory. Needs inner % W::CHUNK_K == 0 (V2-Lite's 1,408 = 11 · 128). Session 31: is the
// down walk (2.7 TB/s at b64) bound by its bytes in flight a block, or by blocks too short?
template <typename W, int TILES, int KP>
__global__ void __launch_bounds__(32 * TILES * KP)
    dn_kp(const bf16* h, int inner, const typename W::Elem* w_down, QuantArgs qa, int hidden,
          const uint32_t* offsets, const uint32_t* active, float* y) {
    __shared__ float other[TILES][KP][32][4];
    const int s = active_slot(active);
    if (s < 0) return;
    const uint32_t beg = offsets[s], end = offsets[s + 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tile = warp / KP, kp = warp % KP;
    const int g = lane >> 2, t = lane & 3;
    const int r0 = (blockIdx.x * TILES + tile) * 16;
    const bool valid = r0 < hidden;
    const int rc = valid ? r0 : 0;
    const typename W::Elem* w0 = w_at<W>(w_down, ((size_t)s * hidden + rc + g) * inner + t * 16);
    const typename W::Elem* w1 = w_at<W>(w0, (size_t)8 * inner);
    const int nch = inner / W::CHUNK_K;
    const int k_begin = (kp * nch / KP) * W::CHUNK_K, k_end = ((kp + 1) * nch / KP) * W::CHUNK_K;
    const typename W::Elem* const rows[2] = {w0, w1};
    const W pols[2] = {W::at(qa, (size_t)s, hidden, rc + g, inner),
                       W::at(qa, (size_t)s, hidden, rc + g + 8, inner)};
    for (uint32_t g0 = beg; g0 < end; g0 += 8) {
        const int n = min((int)(end - g0), 8);
        const bf16* hr = h + (size_t)(g0 + min(g, n - 1)) * inner + t * 16;
        float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
        if (valid) chunk_walk<W, 1>(rows, pols, hr, k_begin, k_end, acc);
        if (kp > 0) {
#pragma unroll
            for (int e = 0; e < 4; ++e) other[tile][kp][lane][e] = acc[0][e];
        }
        __syncthreads();
        if (kp == 0 && valid) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float c = acc[0][e];
#pragma unroll
                for (int q = 1; q < KP; ++q) c += other[tile][q][lane][e];
                const int tok = 2 * t + (e & 1), row = g + (e >> 1) * 8;
                if (tok < n) y[(size_t)(g0 + tok) * hidden + r0 + row] = c;
            }
        }
        __syncthreads();
    }
}
// The engine's gate/up (moe_gate_up_bulk_fp8h) with dn_kp<W, TILES, KP> for the down product.
template <typename W, int TILES, int KP>
static void run_bulk_kp(cudaStream_t st, const Layer& L, int gy, const bf16* x, int hidden,
                        int inner, const uint32_t* off, const uint32_t* act,
                        const uint32_t* sorted, int k, bf16* h, float* y) {
    moe_gate_up_bulk_fp8h<<<g_sms, 32 * (BULK_CWARPS + 1), BULK_SMEM, st>>>(
        x, hidden, (const uint8_t*)L.gu, L.qgu.scales, inner, off, act, sorted, k, h);
    dn_kp<W, TILES, KP><<<dim3(hidden / (16 * TILES), gy), 32 * TILES * KP, 0, st>>>(
        h, inner, (const uint8_t*)L.dn, L.qdn, hidden, off, act, y);
}
typedef void (*DnBulk)(const bf16*, int, const uint8_t*, const float*, int, const uint32_t*,
                       const uint32_t*, float*);
static const Variant VARIANTS[] = {
    {"bf16     ", BF16, -1, true, run_w<MmaBf16>},
    {"fp8      ", FP8, -1, true, run_w<MmaFp8>},
    {"fp8 pref ", FP8, 1, true, run_w<MmaFp8Prefetch>},
    {"fp8 epi  ", FP8, 1, false, run_w<MmaFp8Epi>},
    {"fp8 epi2 ", FP8, 1, false, run_w<MmaFp8Epi2>},
    {"fp8 cs3  ", FP8, 1, true, run_w<MmaFp8Stages<3>>},
    {"fp8 cs2  ", FP8, 1, true, run_w<MmaFp8Stages<2>>},
    {"fp8 lb3  ", FP8, 1, true, run_lb<MmaFp8Stages<4>, 3>},
    {"fp8 lb4  ", FP8, 1, true, run_lb<MmaFp8Stages<4>, 4>},
    {"fp8 cs3lb3", FP8, 1, true, run_lb<MmaFp8Stages<3>, 3>},
    {"fp8 wide ", FP8, 1, false, run_w<MmaFp8Wide>},
    {"fp8 wide3", FP8, 1, false, run_w<Stages<MmaFp8Wide, 3>>},
    {"fp8 wide lb3", FP8, 1, false, run_lb<MmaFp8Wide, 3>},
    {"fp8 wsum bits", FP8, 1, false, run_lb<MmaFp8WideSums<fp8x2_to_bf16x2_bits>, 3>},
    {"fp8 wsum cvt1", FP8, 1, false, run_lb<MmaFp8WideSums<fp8x2_to_bf16x2_int>, 3>},
    {"fp8 wsum bits nolb", FP8, 1, false, run_w<MmaFp8WideSums<fp8x2_to_bf16x2_bits>>},
    {"fp8 wide lb4", FP8, 1, false, run_lb<MmaFp8Wide, 4>},
    {"fp8 nocvt", FP8, -3, true, run_w<MmaFp8NoCvt<2>>},
    {"fp8 nocvt4", FP8, -3, true, run_w<MmaFp8NoCvt<4>>},
    {"fp8 cvt1 ", FP8, -3, true, run_w<MmaFp8Cvt1>},
    {"int4 old ", INT4, -1, true, run_w<MmaInt4Old>},
    {"int4 wide", INT4, 20, false, run_w<MmaInt4Wide>},
    {"int4 wide lb3", INT4, 20, false, run_lb<MmaInt4Wide, 3>},
    {"int4 wide3", INT4, 20, false, run_w<Stages<MmaInt4Wide, 3>>},
    {"int4 fine", INT4, 20, true, run_w<MmaInt4Fine>},
    {"int4     ", INT4, 20, false, run_w<MmaInt4>},
    {"int4 lb3 ", INT4, 20, false, run_lb<MmaInt4, 3>},
    {"int4 cs3 ", INT4, 20, false, run_w<MmaInt4Stages<3>>},
    {"int4 cs2 ", INT4, 20, false, run_w<MmaInt4Stages<2>>},
    {"int4 cs6 ", INT4, 20, false, run_w<MmaInt4Stages<6>>},
    {"fp8 a8 lb3", FP8, 12, false, run_lb<MmaFp8A8, 3>, 0.1},
    {"fp8 a8   ", FP8, 12, false, run_w<MmaFp8A8>, 0.1},
    {"fp8 a8 cs3", FP8, 12, false, run_lb<Stages<MmaFp8A8, 3>, 3>, 0.1},
    {"fp8 a8 pre lb3", FP8, 12, false, run_pre<MmaFp8A8Pre, 3>, 0.1},
    {"fp8 a8 pre cs3", FP8, 12, false, run_pre<Stages<MmaFp8A8Pre, 3>, 3>, 0.1},
    {"fp8 a8 pre nolb", FP8, 12, false, run_pre<MmaFp8A8Pre, 1>, 0.1},
    {"fp8 a8 pre lb4", FP8, 12, false, run_pre<MmaFp8A8Pre, 4>, 0.1},
    {"fp8 bulk gu", FP8, 12, false, run_bulk<gu_bulk<BULK_BF16, false>, (DnBulk) nullptr>, 1e-3},
    {"fp8 bulk ", FP8, 12, false, run_bulk<gu_bulk<BULK_BF16, false>, dn_bulk<BULK_BF16, false>>, 1e-3},
    {"fp8 bulk f16 gu", FP8, 12, false, run_bulk<moe_gate_up_bulk_fp8h, (DnBulk) nullptr>, 1e-2},
    {"fp8 bulk f16", FP8, 12, false, run_bulk<moe_gate_up_bulk_fp8h, dn_bulk<BULK_F16, true>>, 1e-2},
    {"fp8 bulk raw", FP8, -3, true, run_bulk<gu_bulk<BULK_RAW, false>, dn_bulk<BULK_RAW, false>>},
    {"gu only: wide lb3", FP8, -3, true, run_gu_only<gu_kernel_lb<MmaFp8Wide, 3>, false>},
    {"gu only: bulk f16", FP8, -3, true, run_gu_only<moe_gate_up_bulk_fp8h, true>},
    {"gu only: bulk raw", FP8, -3, true, run_gu_only<gu_bulk<BULK_RAW, false>, true>},
    {"gu only: bulk copies", FP8, -3, true, run_gu_only<gu_bulk<BULK_COPY, true>, true>},
    {"gu only: bulk copies no hint", FP8, -3, true, run_gu_only<gu_bulk<BULK_COPY, false>, true>},
    {"dn t2k2 ", FP8, 12, false, run_bulk_kp<MmaFp8Wide, 2, 2>, 1e-2},
    {"dn t2k4 ", FP8, 12, false, run_bulk_kp<MmaFp8Wide, 2, 4>, 1e-2},
    {"dn t1k4 ", FP8, 12, false, run_bulk_kp<MmaFp8Wide, 1, 4>, 1e-2},
    {"dn t1k2 ", FP8, 12, false, run_bulk_kp<MmaFp8Wide, 1, 2>, 1e-2},
    {"dn t4k2 ", FP8, 12, false, run_bulk_kp<MmaFp8Wide, 4, 2>, 1e-2},
    {"dn t1k8 ", FP8, 12, false, run_bulk_kp<MmaFp8Wide, 1, 8>, 1e-2},
    {"dn t2k2 cs3", FP8, 12, false, run_bulk_kp<Stages<MmaFp8Wide, 3>, 2, 2>, 1e-2},
    {"dn t2k2 cs4", FP8, 12, false, run_bulk_kp<Stages<MmaFp8Wide, 4>, 2, 2>, 1e-2},
    {"dn t1k4 cs3", FP8, 12, false, run_bulk_kp<Stages<MmaFp8Wide, 3>, 1, 4>, 1e-2},
    {"dn t2k4 cs3", FP8, 12, false, run_bulk_kp<Stages<MmaFp8Wide, 3>, 2, 4>, 1e-2},
    {"no-op    ", BF16, -2, true, run_empty},
};
static const int N_VARIANTS = sizeof(VARIANTS) / sizeof(VARIANTS[0]);

// A layer's quantised stacks: `gu_bytes` and `dn_bytes` random bytes (no e4m3 NaN where
// `e4m3`), `sgu` and `sdn` f32 scales in [lo, 2·lo), INT4's group shift `shift` (0: e4m3).
static Layer quantised(size_t gu_bytes, size_t dn_bytes, bool e4m3, size_t sgu, size_t sdn,
                       float lo, int shift, uint32_t seed) {
    Layer q;
    float *s1, *s2;
    CK(cudaMalloc(&q.gu, gu_bytes));
    CK(cudaMalloc(&q.dn, dn_bytes));
    CK(cudaMalloc(&s1, sgu * 4));
    CK(cudaMalloc(&s2, sdn * 4));
    fill_bytes<<<1024, 256>>>((uint8_t*)q.gu, gu_bytes, seed, e4m3);
    fill_bytes<<<1024, 256>>>((uint8_t*)q.dn, dn_bytes, seed + 6, e4m3);
    fill_scales<<<64, 256>>>(s1, sgu, seed + 100, lo);
    fill_scales<<<64, 256>>>(s2, sdn, seed + 102, lo);
    q.qgu = QuantArgs{s1, nullptr, shift};
    q.qdn = QuantArgs{s2, nullptr, shift};
    return q;
}

// DQ_ONLY="a,b,…": only the variants whose names contain one of these ("=name": that name only;
// a variant's `ref` must be among them for its check).
static bool selected(const char* name) {
    const char* only = getenv("DQ_ONLY");
    if (!only || !*only) return true;
    std::string s(only);
    size_t at = 0;
    while (at <= s.size()) {
        const size_t comma = s.find(',', at);
        const std::string part = s.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
        if (part.size() > 1 && part[0] == '=') {
            // "=name": that variant only (its name without the padding).
            std::string n(name);
            n.erase(n.find_last_not_of(' ') + 1);
            if (n == part.substr(1)) return true;
        } else if (!part.empty() && strstr(name, part.c_str())) {
            return true;
        }
        if (comma == std::string::npos) break;
        at = comma + 1;
    }
    return false;
}

int main(int argc, char** argv) {
    const int S = 64, hidden = 2048, inner = 1408, k = 6, NL = 26;
    std::vector<int> batches;
    for (int i = 1; i < argc; ++i) batches.push_back(atoi(argv[i]));
    if (batches.empty()) batches = {1, 8, 64};
    const size_t gu_n = (size_t)S * 2 * inner * hidden, dn_n = (size_t)S * hidden * inner;
    // Per format, per layer.
    std::vector<Layer> layers[3];
    for (int f = 0; f < 3; ++f) layers[f].resize(NL);
    for (int l = 0; l < NL; ++l) {
        Layer& b = layers[BF16][l];
        CK(cudaMalloc(&b.gu, gu_n * 2));
        CK(cudaMalloc(&b.dn, dn_n * 2));
        fill_bf16<<<1024, 256>>>((bf16*)b.gu, gu_n, 17u + l, 1.f / 45.f);
        fill_bf16<<<1024, 256>>>((bf16*)b.dn, dn_n, 991u + l, 1.f / 37.f);
        b.qgu = b.qdn = QuantArgs{nullptr, nullptr, 0};
        // e4m3: blocks of 128 × 128 per matrix (gate, up of each slot; down of each slot).
        layers[FP8][l] = quantised(gu_n, dn_n, true,
                                   (size_t)S * 2 * ((inner + 127) / 128) * (hidden / 128),
                                   (size_t)S * (hidden / 128) * ((inner + 127) / 128),
                                   1.f / 4096.f, 0, 23u + l);
        // INT4: nibbles, a scale per row per 128 columns, symmetric.
        layers[INT4][l] = quantised(gu_n / 2, dn_n / 2, false,
                                    (size_t)S * 2 * inner * (hidden / 128),
                                    (size_t)S * hidden * ((inner + 127) / 128), 1.f / 256.f, 7,
                                    31u + l);
    }
    CK(cudaDeviceSynchronize());
    CK(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, 0));
    for (const void* f :
         {(const void*)moe_gate_up_bulk_fp8h, (const void*)gu_bulk<BULK_BF16, false>,
          (const void*)gu_bulk<BULK_RAW, false>, (const void*)gu_bulk<BULK_COPY, true>,
          (const void*)gu_bulk<BULK_COPY, false>, (const void*)dn_bulk<BULK_BF16, false>,
          (const void*)dn_bulk<BULK_F16, true>, (const void*)dn_bulk<BULK_RAW, false>})
        CK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, BULK_SMEM));

    const double params = 3.0 * inner * hidden;
    const double bytes_per[3] = {2.0, 1.0 + 4.0 / (128 * 128), 0.5 + 4.0 / 128};
    int bad = 0;
    std::mt19937 rng(7);
    printf("%-6s %-10s %10s %8s %s\n", "batch", "variant", "us/layer", "GB/s", "check");
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
        CK(cudaMalloc(&d_out, (size_t)NL * T * hidden * 4));
        fill_bf16<<<64, 256>>>(d_x, (size_t)T * hidden, 5u, 1.f);
        CK(cudaMalloc(&g_xq, (size_t)T * hidden * 2));
        CK(cudaMalloc(&g_hq, (size_t)P * inner * 2));
        g_rows_x = T, g_rows_h = P;
        std::vector<std::vector<float>> outs(N_VARIANTS);
        for (int vi = 0; vi < N_VARIANTS; ++vi) {
            const Variant& V = VARIANTS[vi];
            if (!selected(V.name)) continue;
            const int gy = std::min(S, P);
            const float ms = graph_median_ms([&](cudaStream_t st) {
                for (int l = 0; l < NL; ++l) {
                    moe_align<<<1, 1024, 0, st>>>(d_ids, P, nullptr, S, d_off, d_sorted, d_pos,
                                                  d_active, nullptr, 0u, nullptr);
                    V.run(st, layers[V.fmt][l], gy, d_x, hidden, inner, d_off, d_active,
                          d_sorted, k, d_h, d_y);
                    moe_combine4<<<dim3(T, (hidden / 4 + 255) / 256), 256, 0, st>>>(
                        reinterpret_cast<const float4*>(d_y), hidden / 4, d_pos, d_w, nullptr, k,
                        reinterpret_cast<float4*>(d_out + (size_t)l * T * hidden));
                }
            });
            const double us_layer = ms * 1000.0 / NL;
            const double gbs = distinct.size() * params * bytes_per[V.fmt] / (us_layer * 1e3);
            outs[vi].resize((size_t)NL * T * hidden);
            CK(cudaMemcpy(outs[vi].data(), d_out, outs[vi].size() * 4, cudaMemcpyDeviceToHost));
            char check[128] = "";
            bool finite = true;
            for (float v : outs[vi]) finite = finite && std::isfinite(v);
            if (V.ref == -2) {
                snprintf(check, sizeof check, "(launches, align, combine only)");
            } else if (V.ref == -3) {
                snprintf(check, sizeof check, "(timing only: values not decoded)");
            } else if (!finite) {
                snprintf(check, sizeof check, "NON-FINITE");
                bad = 1;
            } else if (V.ref >= 0) {
                const std::vector<float>& r = outs[V.ref];
                if (V.exact) {
                    const bool same = memcmp(r.data(), outs[vi].data(), r.size() * 4) == 0;
                    snprintf(check, sizeof check, "%s '%s'", same ? "bit-equal to" : "DIFFERS from",
                             VARIANTS[V.ref].name);
                    bad |= !same;
                } else {
                    double num = 0, den = 0;
                    for (size_t i = 0; i < r.size(); ++i) {
                        const double d = (double)outs[vi][i] - r[i];
                        num += d * d;
                        den += (double)r[i] * r[i];
                    }
                    const double rel = std::sqrt(num / den);
                    snprintf(check, sizeof check, "rel. diff. to '%s' %.2e", VARIANTS[V.ref].name,
                             rel);
                    bad |= !(rel < (V.tol > 0 ? V.tol : 1e-2));
                }
            }
            printf("%-6d %-10s %10.2f %8.0f %s\n", T, V.name, us_layer, gbs, check);
        }
        cudaFree(d_ids); cudaFree(d_w); cudaFree(d_off); cudaFree(d_active); cudaFree(d_sorted);
        cudaFree(g_xq); cudaFree(g_hq);
        cudaFree(d_pos); cudaFree(d_x); cudaFree(d_h); cudaFree(d_y); cudaFree(d_out);
    }
    return bad;
}
