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
// `W`: the weights' format, the expert kernels' policies and their k walk (experts.cu's
// `chunk_walk`: 64-wide chunks, lane t of a row holding 16 consecutive values): bf16 as stored
// (`MmaBf16`), or e4m3 with f32 128 × 128 block scales (`MmaFp8`: dequantised in registers to
// the bf16 the bf16 kernel loads, so the same MMAs in the same order: the bits of the bf16
// kernel over the dequantised weights). A stacked
// gate/up weight is one matrix of 2N rows to the scales (row r's blocks at r / 128).

#define DENSE_WARPS 8
#define DENSE_MAX_ROWS 8

template <bool GU, typename W>
__device__ __forceinline__ void dense_mma(const bf16* x, int rows, int K,
                                          const typename W::Elem* w, const float* scales, int N,
                                          bf16* y) {
    constexpr int P = GU ? 8 : 4;  // partial sums a lane hands over
    __shared__ float part[DENSE_WARPS][32][P];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int j0 = blockIdx.x * 16;
    const int n64 = K / 64, per = (n64 + DENSE_WARPS - 1) / DENSE_WARPS;
    const int k_begin = min(n64, warp * per) * 64, k_end = min(n64, warp * per + per) * 64;
    typedef typename W::Elem E;
    const E* w0 = w_at<W>(w, (size_t)(j0 + g) * K + t * 16);
    const E* w1 = w_at<W>(w0, (size_t)8 * K);
    const E* u0 = w_at<W>(w0, (size_t)N * K);  // GU only
    const E* u1 = w_at<W>(u0, (size_t)8 * K);
    const int wrows = GU ? 2 * N : N, ju = GU ? N + j0 : j0;
    const QuantArgs qa{scales, nullptr, 0};
    const int n = min(rows, 8);
    const bf16* xr = x + (size_t)min(g, n - 1) * K + t * 16;
    constexpr int NA = GU ? 2 : 1;  // row pairs: the gate's (and the up's)
    const E* const all[4] = {w0, w1, u0, u1};
    const W all_pol[4] = {W::at(qa, 0, wrows, j0 + g, K), W::at(qa, 0, wrows, j0 + g + 8, K),
                          W::at(qa, 0, wrows, ju + g, K), W::at(qa, 0, wrows, ju + g + 8, K)};
    const E* wp[2 * NA];
    W pol[2 * NA];
#pragma unroll
    for (int q = 0; q < 2 * NA; ++q) wp[q] = all[q], pol[q] = all_pol[q];
    float acc[NA][4] = {};
    chunk_walk<W, NA>(wp, pol, xr, k_begin, k_end, acc);
    const float* c = acc[0];
    const float* cu = acc[NA - 1];
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
    dense_mma<false, MmaBf16>(x, rows, K, w, nullptr, N, y);
}
extern "C" __global__ void __launch_bounds__(DENSE_WARPS * 32)
    dense_gate_up_mma_bf16(const bf16* x, int rows, int K, const bf16* w, int N, bf16* y) {
    dense_mma<true, MmaBf16>(x, rows, K, w, nullptr, N, y);
}
extern "C" __global__ void __launch_bounds__(DENSE_WARPS * 32)
    dense_mma_fp8(const bf16* x, int rows, int K, const uint8_t* w, const float* s, int N,
                  bf16* y) {
    dense_mma<false, MmaFp8>(x, rows, K, w, s, N, y);
}
extern "C" __global__ void __launch_bounds__(DENSE_WARPS * 32)
    dense_gate_up_mma_fp8(const bf16* x, int rows, int K, const uint8_t* w, const float* s, int N,
                          bf16* y) {
    dense_mma<true, MmaFp8>(x, rows, K, w, s, N, y);
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
