// Decode-sized dense projections on the tensor cores: `y[t, n] = x[t]·W[n]` for a decode step's
// few rows (at most 8: the MMA's token width), W `[N, K]` bf16 as a checkpoint stores a linear
// layer. cuBLAS runs these shapes (one to a few rows against megabytes of weights) at about half
// the memory's speed and adds a split-K reduction or a SwiGLU kernel; this streams the weights
// much as experts.cu's moe_gate_up_mma / moe_down_mma do (16-byte streaming loads, several k
// chunks in flight, mma.sync m16n8k16 with f32 sums; its helpers: included after experts.cu).
// Launched from engine/src/cuda/mod.rs (`Gpu::dense_small`).
//
// A block of DENSE_WARPS warps owns 16 output columns; its warps split the k chunks (of 64)
// into contiguous ranges and their sums are added through shared memory in warp order (a fixed
// order: the same bits every run). `GU`: W holds an MLP's gate rows then its up rows (`[2N, K]`,
// engine/src/layers/mlp.rs's stacked weight) and y = silu(x·Wg) · (x·Wu), the SwiGLU in f32 on
// the sums, rounded to bf16 once.
//
// `W`: the weights' format: bf16 as stored (`DenseBf16`), or e4m3 with f32 128 × 128 block
// scales (`DenseFp8`: dequantised in registers to the bf16 the bf16 kernel loads, so the same
// MMAs in the same order: the bits of the bf16 kernel over the dequantised weights). A stacked
// gate/up weight is one matrix of 2N rows to the scales (row r's blocks at r / 128).

#define DENSE_WARPS 8
#define DENSE_MAX_ROWS 8

// The weights' formats, k in chunks of 64: lane t of a row holds the chunk's 16 values
// t·16 … t·16 + 15 (one MMA of 32 k takes each lane's first 8, the next MMA its last 8; x is
// read the same way, so the products are the chunk's). A 64-chunk lies in one 128-column scale
// block.
struct DenseBf16 {
    typedef bf16 E;
    struct Raw {
        uint4 a, b;
    };
    static constexpr int STAGES = 2;  // 2 × 64 k in flight: 4 loads of 16 bytes a row
    __device__ static DenseBf16 at(const float*, int, int, int) { return {}; }
    __device__ static Raw load(const bf16* p) { return {ldcs16(p), ldcs16(p + 8)}; }
    __device__ void frags(const Raw& r, int, uint4& lo, uint4& hi) const { lo = r.a, hi = r.b; }
};

// e4m3: a lane's 16 values of a chunk are one 16-byte load (half the loads of bf16 for the same
// k), dequantised with their block's scale to the bf16 the bf16 kernel loads (experts_fp8.cu's
// fp8x8_to_bf16x8), so the products are the bf16 kernel's over the dequantised weight, bit for
// bit. Twice bf16's chunks in flight: as many loads, twice the k.
struct DenseFp8 {
    typedef uint8_t E;
    typedef uint4 Raw;
    static constexpr int STAGES = 4;
    const float* scale;  // the row block's scales, one per 128 columns
    __device__ static DenseFp8 at(const float* scales, int rows, int r, int K) {
        return {fp8_scale_row(scales, 0, rows, r, K)};
    }
    __device__ static Raw load(const uint8_t* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }
    __device__ void frags(const Raw& r, int k, uint4& lo, uint4& hi) const {
        const float s = __ldg(scale + k / FP8_BLOCK);
        lo = fp8x8_to_bf16x8(make_uint2(r.x, r.y), s);
        hi = fp8x8_to_bf16x8(make_uint2(r.z, r.w), s);
    }
};

template <bool GU, typename W>
__device__ __forceinline__ void dense_mma(const bf16* x, int rows, int K,
                                          const typename W::E* w, const float* scales, int N,
                                          bf16* y) {
    constexpr int P = GU ? 8 : 4;  // partial sums a lane hands over
    constexpr int NW = GU ? 4 : 2; // weight loads a lane makes per chunk
    constexpr int ST = W::STAGES;
    __shared__ float part[DENSE_WARPS][32][P];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int j0 = blockIdx.x * 16;
    const int n64 = K / 64, per = (n64 + DENSE_WARPS - 1) / DENSE_WARPS;
    const int k_begin = min(n64, warp * per) * 64, k_end = min(n64, warp * per + per) * 64;
    typedef typename W::E E;
    const E* w0 = w + (size_t)(j0 + g) * K + t * 16;
    const E* w1 = w0 + (size_t)8 * K;
    const E* u0 = w0 + (size_t)N * K;  // GU only
    const E* u1 = u0 + (size_t)8 * K;
    const int wrows = GU ? 2 * N : N;
    const W wg = W::at(scales, wrows, j0, K);
    const W wu = W::at(scales, wrows, GU ? N + j0 : j0, K);
    const int n = min(rows, 8);
    const bf16* xr = x + (size_t)min(g, n - 1) * K + t * 16;
    float c[4] = {0.f, 0.f, 0.f, 0.f}, cu[4] = {0.f, 0.f, 0.f, 0.f};
    if (k_begin < k_end) {
        typename W::Raw wr[ST][NW];
        uint4 b[ST][2];
#pragma unroll
        for (int i = 0; i < ST - 1; ++i) {
            const int kk = k_begin + i * 64;
            if (kk < k_end) {
                wr[i][0] = W::load(w0 + kk), wr[i][1] = W::load(w1 + kk);
                if (GU) wr[i][NW - 2] = W::load(u0 + kk), wr[i][NW - 1] = W::load(u1 + kk);
                b[i][0] = ld16(xr + kk), b[i][1] = ld16(xr + kk + 8);
            }
        }
        for (int k = k_begin; k < k_end; k += ST * 64) {
#pragma unroll
            for (int i = 0; i < ST; ++i) {
                const int kk = k + i * 64, kn = kk + (ST - 1) * 64;
                const int j = (i + ST - 1) % ST;
                if (kn < k_end) {
                    wr[j][0] = W::load(w0 + kn), wr[j][1] = W::load(w1 + kn);
                    if (GU) wr[j][NW - 2] = W::load(u0 + kn), wr[j][NW - 1] = W::load(u1 + kn);
                    b[j][0] = ld16(xr + kn), b[j][1] = ld16(xr + kn + 8);
                }
                if (kk < k_end) {
                    uint4 g0, g1, h0, h1;
                    wg.frags(wr[i][0], kk, g0, g1);
                    wg.frags(wr[i][1], kk, h0, h1);
                    mma_k32(c, g0, h0, b[i][0]);
                    mma_k32(c, g1, h1, b[i][1]);
                    if (GU) {
                        wu.frags(wr[i][NW - 2], kk, g0, g1);
                        wu.frags(wr[i][NW - 1], kk, h0, h1);
                        mma_k32(cu, g0, h0, b[i][0]);
                        mma_k32(cu, g1, h1, b[i][1]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        part[warp][lane][e] = c[e];
        if (GU) part[warp][lane][4 + e] = cu[e];
    }
    __syncthreads();
    if (warp == 0) {
        // c0, c1: column g, tokens 2t, 2t+1; c2, c3: column g + 8, same tokens.
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float s = part[0][lane][e], su = GU ? part[0][lane][4 + e] : 0.f;
            for (int v = 1; v < DENSE_WARPS; ++v) {
                s += part[v][lane][e];
                if (GU) su += part[v][lane][4 + e];
            }
            const int tok = 2 * t + (e & 1), col = j0 + g + (e >> 1) * 8;
            if (tok < n) y[(size_t)tok * N + col] = __float2bfloat16(GU ? silu(s) * su : s);
        }
    }
}

extern "C" __global__ void __launch_bounds__(DENSE_WARPS * 32)
    dense_mma_bf16(const bf16* x, int rows, int K, const bf16* w, int N, bf16* y) {
    dense_mma<false, DenseBf16>(x, rows, K, w, nullptr, N, y);
}
extern "C" __global__ void __launch_bounds__(DENSE_WARPS * 32)
    dense_gate_up_mma_bf16(const bf16* x, int rows, int K, const bf16* w, int N, bf16* y) {
    dense_mma<true, DenseBf16>(x, rows, K, w, nullptr, N, y);
}
extern "C" __global__ void __launch_bounds__(DENSE_WARPS * 32)
    dense_mma_fp8(const bf16* x, int rows, int K, const uint8_t* w, const float* s, int N,
                  bf16* y) {
    dense_mma<false, DenseFp8>(x, rows, K, w, s, N, y);
}
extern "C" __global__ void __launch_bounds__(DENSE_WARPS * 32)
    dense_gate_up_mma_fp8(const bf16* x, int rows, int K, const uint8_t* w, const float* s, int N,
                          bf16* y) {
    dense_mma<true, DenseFp8>(x, rows, K, w, s, N, y);
}

// An e4m3 weight `q [R, C]` with its block scales dequantised to bf16 `out [R, C]`, 8 values a
// thread (C % 8 == 0): the values the FP8 kernels feed their MMAs, for the products no FP8
// kernel takes (cuBLAS over the result).
extern "C" __global__ void fp8_dequant_bf16(const uint8_t* q, const float* s, int R, int C,
                                            bf16* out) {
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= (size_t)R * C) return;
    const int r = (int)(i / C), c = (int)(i % C);
    const float scale = __ldg(fp8_scale_row(s, 0, R, r, C) + c / FP8_BLOCK);
    const uint2 v = *reinterpret_cast<const uint2*>(q + i);
    *reinterpret_cast<uint4*>(out + i) = fp8x8_to_bf16x8(v, scale);
}
