// Decode-sized dense projections on the tensor cores: `y[t, n] = x[t]·W[n]` for a decode step's
// few rows (at most 8: the MMA's token width; e4m3 weights also 9 … 32 as groups of 8, the
// `_rows16` / `_rows32` kernels below), W `[N, K]` bf16 as a checkpoint stores a linear layer. cuBLAS runs these shapes (one to a few rows against megabytes of weights) at about half
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
// The `_rows16` / `_rows32` kernels (below): more groups of 8 rows a block, each weight chunk
// loaded once by its warp and multiplied with every group (the activations read through L1/L2,
// a group's 16 bytes a lane a 32-wide block).

// chunk_walk (experts.cu) over NG groups of 8 rows, for the 64-wide policies (MmaBf16,
// MmaFp8): x's row of lane g in group i at xr[i] (at t·16), `groups` ≤ NG of them used (a
// warp-uniform count); group i's sums in c[i]. Each chunk's fragments are made once and fed to
// every group's MMAs, in k order as chunk_walk's, so a group's sums are the 8-row kernel's bits.
template <typename W, int NA, int NG>
__device__ __forceinline__ void chunk_walk_groups(const typename W::Elem* const (&w)[2 * NA],
                                                  const W (&pol)[2 * NA],
                                                  const bf16* const (&xr)[NG], int groups,
                                                  int k_begin, int k_end,
                                                  float (&c)[NG][NA][4]) {
    static_assert(W::CHUNK_K == 64 && !W::EPILOGUE && !W::PERMUTE_X && !W::OWN_WALK,
                  "the 64-wide walk of values scaled one by one");
    constexpr int CS = W::CHUNK_STAGES;
    if (k_begin >= k_end) return;
    typename W::Chunk r[CS][2 * NA];
    ring_walk<CS, 64>(
        k_begin, k_end,
        [&](int j, int kn) {
#pragma unroll
            for (int q = 0; q < 2 * NA; ++q) r[j][q] = pol[q].load2(w_at<W>(w[q], kn), kn);
        },
        [&](int i, int kk) {
            uint4 xv[NG][2];
#pragma unroll
            for (int gi = 0; gi < NG; ++gi)
                if (gi < groups) xv[gi][0] = ld16(xr[gi] + kk), xv[gi][1] = ld16(xr[gi] + kk + 8);
#pragma unroll
            for (int a = 0; a < NA; ++a) {
                uint4 a0, a1, h0, h1;
                pol[2 * a].frags2(r[i][2 * a], kk, a0, a1);
                pol[2 * a + 1].frags2(r[i][2 * a + 1], kk, h0, h1);
#pragma unroll
                for (int gi = 0; gi < NG; ++gi)
                    if (gi < groups) {
                        mma_k32(c[gi][a], a0, h0, xv[gi][0]);
                        mma_k32(c[gi][a], a1, h1, xv[gi][1]);
                    }
            }
        });
}

// NG: groups of 8 rows (1: the 8-row kernels, rows ≤ 8; 2 and 4: the `_rows16` / `_rows32`
// ones).
template <bool GU, typename W, int NG = 1>
__device__ __forceinline__ void dense_mma(const bf16* x, int rows, int K,
                                          const typename W::Elem* w, const float* scales, int N,
                                          bf16* y) {
    constexpr int P = GU ? 8 : 4;  // partial sums a lane hands over
    // Groups handed over at a time (the rest in further rounds): at most 32 KiB of shared memory.
    constexpr int RG = NG < 4 ? NG : 4;
    __shared__ float part[DENSE_WARPS][RG][32][P];
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
    const int n = min(rows, 8 * NG);
    const int groups = (n + 7) / 8;
    constexpr int NA = GU ? 2 : 1;  // row pairs: the gate's (and the up's)
    const E* const all[4] = {w0, w1, u0, u1};
    const W all_pol[4] = {W::at(qa, 0, wrows, j0 + g, K), W::at(qa, 0, wrows, j0 + g + 8, K),
                          W::at(qa, 0, wrows, ju + g, K), W::at(qa, 0, wrows, ju + g + 8, K)};
    const E* wp[2 * NA];
    W pol[2 * NA];
#pragma unroll
    for (int q = 0; q < 2 * NA; ++q) wp[q] = all[q], pol[q] = all_pol[q];
    float acc[NG][NA][4] = {};
    if constexpr (NG == 1) {
        const bf16* xr = x + (size_t)min(g, n - 1) * K + t * 16;
        chunk_walk<W, NA>(wp, pol, xr, k_begin, k_end, acc[0]);
    } else {
        const bf16* xr[NG];
#pragma unroll
        for (int gi = 0; gi < NG; ++gi) xr[gi] = x + (size_t)min(gi * 8 + g, n - 1) * K + t * 16;
        chunk_walk_groups<W, NA, NG>(wp, pol, xr, groups, k_begin, k_end, acc);
    }
    // Rounds of RG groups: every warp hands its sums over, warp i (< RG) adds group i's in warp
    // order.
#pragma unroll
    for (int r0 = 0; r0 < NG; r0 += RG) {
        if (r0 >= groups) break;
        if (r0 > 0) __syncthreads();  // the round before read
#pragma unroll
        for (int i = 0; i < RG; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                part[warp][i][lane][e] = acc[r0 + i][0][e];
                if (GU) part[warp][i][lane][4 + e] = acc[r0 + i][NA - 1][e];
            }
        __syncthreads();
        if (warp < RG && r0 + warp < groups) {
            const int i = warp;
            // c0, c1: column g, tokens 2t, 2t+1; c2, c3: column g + 8, same tokens.
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float s = part[0][i][lane][e], su = GU ? part[0][i][lane][4 + e] : 0.f;
                for (int v = 1; v < DENSE_WARPS; ++v) {
                    s += part[v][i][lane][e];
                    if (GU) su += part[v][i][lane][4 + e];
                }
                const int tok = (r0 + i) * 8 + 2 * t + (e & 1), col = j0 + g + (e >> 1) * 8;
                if (tok < n) y[(size_t)tok * N + col] = __float2bfloat16(GU ? silu(s) * su : s);
            }
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

// The FP8 forms for 9 … 16 and 17 … 32 rows (two and four groups of 8 a block), where they beat
// a per-call dequantisation to bf16 and cuBLAS: `Gpu::dense_small` takes them for e4m3 weights
// up to `MOEMESH_DENSE_FP8_ROWS` rows (default 16: through the mesh `_rows32`, one block an SM,
// slowed the workers' experts sharing the GPU). bf16 weights keep cuBLAS above 8 rows (as fast
// or faster there), and so do e4m3 weights beyond, dequantised (scripts/bench/dense_rows.cu;
// docs/BENCHMARKS.md, session 30).
#define DENSE_ROWS_KERNELS(ROWS, NG)                                                            \
    extern "C" __global__ void __launch_bounds__(DENSE_WARPS * 32)                             \
        dense_rows##ROWS##_fp8(const bf16* x, int rows, int K, const uint8_t* w, const float* s, \
                               int N, bf16* y) {                                               \
        dense_mma<false, MmaFp8, NG>(x, rows, K, w, s, N, y);                                   \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(DENSE_WARPS * 32)                             \
        dense_gate_up_rows##ROWS##_fp8(const bf16* x, int rows, int K, const uint8_t* w,       \
                                       const float* s, int N, bf16* y) {                       \
        dense_mma<true, MmaFp8, NG>(x, rows, K, w, s, N, y);                                    \
    }
DENSE_ROWS_KERNELS(16, 2)
DENSE_ROWS_KERNELS(32, 4)
#undef DENSE_ROWS_KERNELS

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
