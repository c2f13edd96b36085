// A decode step's dense projections at 9 … 64 rows, the way the engine can run them: per layer
// V2-Lite's stacked q / kv_a projection (3,648 × 2,048), o_proj (2,048 × 2,048), the shared
// experts' gate/up + SwiGLU (2 × 2,816 × 2,048) and down (2,048 × 2,816), 27 layers with weights
// of their own (nothing left in L2), each product reading a fixed input, captured in one CUDA
// graph and replayed. Prints µs per replay for:
//   cublas          cuBLAS (cublasGemmEx, bf16, f32 compute; the engine's candle matmul) and a
//                   SwiGLU kernel after the gate/up product: what bf16 weights take above 8 rows
//   rows ngN        dense.cu's dense_mma walk with N groups of 8 rows a block (each weight chunk
//                   loaded once by its warp and multiplied with every group; the engine's
//                   `_rows16` / `_rows32` are ng2 / ng4), blocks of grid y for rows beyond 8·N
//                   (the weights read again, from L2 if still there)
//   fp8 cublas+dq   the shared experts in e4m3 with 128 × 128 block scales, dequantised to bf16
//                   every call (dense.cu's fp8_dequant_bf16) and then cuBLAS (what e4m3 weights
//                   take beyond 32 rows); the attention projections bf16 through cuBLAS
//   fp8 rows ngN    the same weights through the walk (attention bf16, shared e4m3); `lb2`:
//                   registers capped for 2 blocks an SM
//   wg s4 / fp8 wg s4   the swap-AB wgmma form below (every product / the shared experts e4m3;
//                   written in session 30, not yet run on a GPU)
//   fp8 cublas+dq scratch / pieces   the dequantisation into one scratch buffer for every
//                   product, or in pieces of 1,024 weight rows each multiplied at once (its bf16
//                   read back from L2)
// Checks: `rows …` against `cublas` (bf16 weights) and `fp8 rows …` against `fp8 cublas+dq` (the
// same dequantised values), relative L2 error of every output (only the order of f32 sums and
// cuBLAS's own rounding differ: ≤ 1e-2 expected, the bf16 outputs' rounding is ~4e-3).
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o dense_rows
//          scripts/bench/dense_rows.cu -lcublas
// Run on a GPU machine: ./dense_rows [rows …]   (default 16 32 64; 1 … 128, the walk's forms to 64; exit 1 on a
// failed check)
#include "../../engine/src/cuda/kernels.cu"
#include "bench_common.cuh"

#include <cublas_v2.h>

#include <cmath>
#include <cstring>
#include <vector>

#define CB(x)                                                        \
    do {                                                             \
        cublasStatus_t s_ = (x);                                     \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                           \
            printf("cuBLAS error %d at %s:%d\n", s_, __FILE__, __LINE__); \
            exit(2);                                                 \
        }                                                            \
    } while (0)

// dense_mma with NG groups of 8 rows a block, blockIdx.y taking rows 8·NG·y on (NG < 8: more blocks, fewer registers, the weights read again per y, from L2 if
// still there).
// (MINB: __launch_bounds__' blocks an SM, registers capped to fit them.)
template <bool GU, typename W, int NG, int MINB = 1>
__global__ void __launch_bounds__(DENSE_WARPS * 32, MINB)
    rows_ng(const bf16* x, int rows, int K, const typename W::Elem* w, const float* s, int N,
            bf16* y) {
    const int r0 = blockIdx.y * 8 * NG;
    dense_mma<GU, W, NG>(x + (size_t)r0 * K, rows - r0, K, w, s, N, y + (size_t)r0 * N);
}
typedef void (*RowsBf16)(const bf16*, int, int, const bf16*, const float*, int, bf16*);
typedef void (*RowsFp8)(const bf16*, int, int, const uint8_t*, const float*, int, bf16*);
struct RowsForm {
    const char* name;
    int ng;
    RowsBf16 b, bgu;
    RowsFp8 f, fgu;
};
#define FORM(NAME, NG, MINB)                                                                \
    RowsForm {                                                                               \
        NAME, NG, rows_ng<false, MmaBf16, NG, MINB>, rows_ng<true, MmaBf16, NG, MINB>,       \
            rows_ng<false, MmaFp8, NG, MINB>, rows_ng<true, MmaFp8, NG, MINB>                \
    }
// 8 groups (64 rows) a block; 4 (dense.cu's `_rows32`); 2 (`_rows16`); 4 with registers capped
// for 2 blocks an SM.
static const RowsForm FORMS[] = {FORM("rows ng8", 8, 1), FORM("rows ng4", 4, 1),
                                 FORM("rows ng2", 2, 1), FORM("rows ng4 lb2", 4, 2)};
#undef FORM
const int NFORMS = sizeof FORMS / sizeof FORMS[0];

// ---------------------------------------------------------------------------------------------
// `wg`: a swap-AB wgmma form (written in session 30, NOT YET RUN ON A GPU: its check against
// cuBLAS below is the first thing to look at). A warpgroup computes 64 weight rows × 64 tokens:
// the weights are wgmma's A operand from registers (each warp's 16 rows loaded and converted as
// dense_mma's walk does, lane t's 16 consecutive values of a 64-wide chunk), the activations
// its B operand from shared memory (K-major, 128-byte swizzle), staged once per block for its k
// slice with the walk's k permutation (MMA k 2t, 2t+1, 2t+8, 2t+9 of step j ↔ memory
// 16t + 4j + 0, 1, 2, 3), so neither the tokens' fragments nor their loads cost registers. The
// k range is split over a cluster of WG_S blocks (grid x) and the f32 sums added in rank order
// over distributed shared memory; GU: warps 0–1 hold 32 gate rows, warps 2–3 the same 32 up
// rows, and the SwiGLU is applied in the sum. Rows ≤ 64 (padding tokens are zeros).
#define WG_S 4
#define WG_T 64

// d[32] += A[64 × 16] (registers: rows 16·warp + g, + 8; k 2t, 2t + 1, 2t + 8, 2t + 9) ·
// B[64 × 16]ᵀ (shared memory descriptor).
__device__ __forceinline__ void wg_m64n64k16_ra(float d[32], uint32_t a0, uint32_t a1,
                                                uint32_t a2, uint32_t a3, uint64_t db) {
#ifdef MOEMESH_WGMMA
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, "
        "1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db), "r"(1));
#else
    __trap();
#endif
}

template <bool GU, typename W>
__global__ void __cluster_dims__(WG_S, 1, 1) __launch_bounds__(128)
    wg_rows(const bf16* x, int rows, int K, const typename W::Elem* w, const float* scales,
            int N, bf16* y) {
    static_assert(W::CHUNK_K == 64 && !W::EPILOGUE && !W::PERMUTE_X && !W::OWN_WALK, "walk");
    constexpr int CS = 4;  // weight chunks in flight (even: the A buffers alternate)
    extern __shared__ unsigned char wg_rows_smem[];
    bf16* xs = reinterpret_cast<bf16*>(
        (reinterpret_cast<uintptr_t>(wg_rows_smem) + 1023) & ~static_cast<uintptr_t>(1023));
    float* part = reinterpret_cast<float*>(xs);  // [WG_T tokens][64 tile rows], after the MMAs
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int rank = blockIdx.x;
    const int n = min(rows, WG_T);
    const int ks = K / WG_S, k0 = rank * ks, chunks = ks / 64;
    // The activations' slice: chunk c a [64 tokens × 64 k] tile; tile row r's 16-byte logical
    // chunk lc (k step j = lc / 2, half = lc % 2) at physical chunk lc ^ (r & 7); its word u
    // (MMA k 8·half + 2u, + 1) the values at memory k 16u + 4j + 2·half, + 1.
    for (int i = tid; i < chunks * WG_T * 8; i += 128) {
        const int c = i / (WG_T * 8), r = (i / 8) % WG_T, lc = i % 8;
        const int j = lc >> 1, half = lc & 1;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < n) {
            const bf16* xr = x + (size_t)r * K + k0 + c * 64 + 4 * j + 2 * half;
            v.x = *reinterpret_cast<const uint32_t*>(xr);
            v.y = *reinterpret_cast<const uint32_t*>(xr + 16);
            v.z = *reinterpret_cast<const uint32_t*>(xr + 32);
            v.w = *reinterpret_cast<const uint32_t*>(xr + 48);
        }
        *reinterpret_cast<uint4*>(xs + c * WG_T * 64 + r * 64 + ((lc ^ (r & 7)) << 3)) = v;
    }
    // The warp's 16 weight rows (tile rows 16·warp …): GU, warps 0–1 gate rows j0 + 16·warp …,
    // warps 2–3 the up rows N + j0 + 16·(warp − 2) ….
    const int j0 = blockIdx.y * (GU ? 32 : 64);
    const int wrow = GU ? (warp < 2 ? j0 + 16 * warp : N + j0 + 16 * (warp - 2)) : j0 + 16 * warp;
    const int wrows = GU ? 2 * N : N;
    typedef typename W::Elem E;
    const QuantArgs qa{scales, nullptr, 0};
    const E* wp[2] = {w_at<W>(w, (size_t)(wrow + g) * K + t * 16),
                      w_at<W>(w, (size_t)(wrow + g + 8) * K + t * 16)};
    const W pol[2] = {W::at(qa, 0, wrows, wrow + g, K), W::at(qa, 0, wrows, wrow + g + 8, K)};
    float acc[32];
#pragma unroll
    for (int e = 0; e < 32; ++e) acc[e] = 0.f;
    typename W::Chunk r[CS][2];
    uint4 fa[2][2], fh[2][2];  // A of two chunks: rows g (lo, hi) and g + 8
    fence_proxy_async();       // the staged activations, for the tensor cores' async proxy
    __syncthreads();
    ring_walk<CS, 64>(
        k0, k0 + ks,
        [&](int sl, int kn) {
#pragma unroll
            for (int q = 0; q < 2; ++q) r[sl][q] = pol[q].load2(w_at<W>(wp[q], kn), kn);
        },
        [&](int i, int kk) {
            const int b = i & 1;
            pol[0].frags2(r[i][0], kk, fa[b][0], fa[b][1]);
            pol[1].frags2(r[i][1], kk, fh[b][0], fh[b][1]);
            const bf16* tile = xs + ((kk - k0) / 64) * WG_T * 64;
            wg_fence();
            wg_m64n64k16_ra(acc, fa[b][0].x, fh[b][0].x, fa[b][0].y, fh[b][0].y, wg_desc(tile));
            wg_m64n64k16_ra(acc, fa[b][0].z, fh[b][0].z, fa[b][0].w, fh[b][0].w,
                            wg_desc(tile + 16));
            wg_m64n64k16_ra(acc, fa[b][1].x, fh[b][1].x, fa[b][1].y, fh[b][1].y,
                            wg_desc(tile + 32));
            wg_m64n64k16_ra(acc, fa[b][1].z, fh[b][1].z, fa[b][1].w, fh[b][1].w,
                            wg_desc(tile + 48));
            wg_commit();
            wg_wait<1>();  // the chunk before has retired: its A buffer may be written
        });
    wg_wait<0>();
    __syncthreads();  // every wgmma has read the activations: the sums go over them
    // d[4c + e]: tile row 16·warp + g + 8·(e / 2), token 8c + 2t + e % 2.
#pragma unroll
    for (int e = 0; e < 32; ++e) {
        const int row = 16 * warp + g + 8 * ((e >> 1) & 1), tok = 8 * (e >> 2) + 2 * t + (e & 1);
        part[tok * 64 + row] = acc[e];
    }
    sample_cg::cluster_group cl = sample_cg::this_cluster();
    cl.sync();
    // Tokens rank, rank + S, … of the tile's columns, over the cluster's blocks in rank order.
    constexpr int COLS = GU ? 32 : 64;
    for (int i = tid; i < ((WG_T - rank + WG_S - 1) / WG_S) * COLS; i += 128) {
        const int tok = rank + WG_S * (i / COLS), col = i % COLS;
        if (tok < n) {
            float s = 0.f, su = 0.f;
#pragma unroll
            for (int q = 0; q < WG_S; ++q) {
                const float* pq = cl.map_shared_rank(part, (unsigned)q) + tok * 64;
                s += pq[col];
                if (GU) su += pq[32 + col];
            }
            y[(size_t)tok * N + j0 + col] = __float2bfloat16(GU ? silu(s) * su : s);
        }
    }
    cl.sync();  // no block leaves while another reads its sums
}

struct Proj {
    int N, K;  // output width (gate/up: each half's), input width
    bool gu, shared;
    bf16* w;           // bf16 weights [rows, K], rows = N (2N for gate/up)
    uint8_t* q;        // e4m3 (shared experts), with
    float* s;          // block scales [rows/128, K/128]
    bf16* wd;          // dequantisation scratch [rows, K] bf16
};

static double rel_l2(const std::vector<bf16>& a, const std::vector<bf16>& b) {
    double d = 0, n = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        const double x = __bfloat162float(a[i]), y = __bfloat162float(b[i]);
        d += (x - y) * (x - y);
        n += y * y;
    }
    return std::sqrt(d / std::max(n, 1e-30));
}

int main(int argc, char** argv) {
    std::vector<int> rows_list;
    for (int i = 1; i < argc; ++i) rows_list.push_back(std::min(std::max(atoi(argv[i]), 1), 128));
    if (rows_list.empty()) rows_list = {16, 32, 64};
    const int NL = 27, hidden = 2048, shared = 2816;
    const Proj shape[4] = {{3648, hidden, false, false},
                           {hidden, hidden, false, false},
                           {shared, hidden, true, true},
                           {hidden, shared, false, true}};
    std::vector<Proj> chain;
    double bf16_bytes = 0, fp8_bytes = 0;
    for (int l = 0; l < NL; ++l)
        for (int i = 0; i < 4; ++i) {
            Proj p = shape[i];
            const int rows = (p.gu ? 2 : 1) * p.N;
            const size_t n = (size_t)rows * p.K;
            CK(cudaMalloc(&p.w, n * 2));
            fill_bf16<<<1024, 256>>>(p.w, n, 77u * l + i, 1.7f / std::sqrt((float)p.K));
            bf16_bytes += n * 2.0;
            if (p.shared) {
                const size_t ns = (size_t)(rows / 128) * (p.K / 128);
                CK(cudaMalloc(&p.q, n));
                CK(cudaMalloc(&p.s, ns * 4));
                CK(cudaMalloc(&p.wd, n * 2));
                fill_e4m3<<<1024, 256>>>(p.q, n, 91u * l + i);
                const float sc = 0.15f / std::sqrt((float)p.K);
                fill_f32_range<<<64, 256>>>(p.s, ns, 13u * l + i, 0.5f * sc, 1.5f * sc);
                fp8_bytes += n + ns * 4.0;
            } else {
                fp8_bytes += n * 2.0;
            }
            chain.push_back(p);
        }
    const int TMAX = 128;
    bf16 *xa, *xb, *outs, *gu;
    CK(cudaMalloc(&xa, (size_t)TMAX * hidden * 2));
    CK(cudaMalloc(&xb, (size_t)128 * shared * 2));
    const size_t ostride = (size_t)128 * 4096;  // the grouped forms write 64 or 128 rows
    CK(cudaMalloc(&outs, chain.size() * ostride * 2));
    CK(cudaMalloc(&gu, (size_t)TMAX * 2 * shared * 2));
    fill_bf16<<<64, 256>>>(xa, (size_t)TMAX * hidden, 5u, 1.f);
    fill_bf16<<<64, 256>>>(xb, (size_t)128 * shared, 6u, 1.f);
    CK(cudaDeviceSynchronize());
    cublasHandle_t h;
    CB(cublasCreate(&h));
    CB(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));

    // y [T, N] = x [T, K] · Wᵀ (W [N, K] row-major) in cuBLAS's column-major terms.
    // (`ldy`: y's row stride, N unless given.)
    auto gemm = [&](cudaStream_t st, const bf16* x, const bf16* w, int T, int N, int K, bf16* y,
                    int ldy = 0) {
        const float one = 1.f, zero = 0.f;
        CB(cublasSetStream(h, st));
        CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &one, w, CUDA_R_16BF, K, x,
                        CUDA_R_16BF, K, &zero, y, CUDA_R_16BF, ldy ? ldy : N, CUBLAS_COMPUTE_32F,
                        CUBLAS_GEMM_DEFAULT));
    };
    // The dequantisation's other places: one scratch for every product (the bf16 of one weight
    // written where the one before was, so perhaps still in L2), or pieces of DQ_PIECE weight
    // rows, each dequantised into a small scratch and multiplied at once (read back from L2).
    const int DQ_PIECE = 1024;
    bf16 *scratch, *piece;
    CK(cudaMalloc(&scratch, (size_t)2 * shared * hidden * 2));
    CK(cudaMalloc(&piece, (size_t)DQ_PIECE * shared * 2));
    // Modes: 0 cublas; 1 … NFORMS the `_rows` walk in FORMS' shapes; then the same with the
    // shared experts in e4m3 (cuBLAS after a dequantisation, and the forms).

    for (auto k : {(const void*)wg_rows<false, MmaBf16>, (const void*)wg_rows<true, MmaBf16>,
                   (const void*)wg_rows<false, MmaFp8>, (const void*)wg_rows<true, MmaFp8>})
        CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024));
    int bad = 0;
    for (int T : rows_list) {
        printf("rows %d: %zu products; %.1f MB of weights a replay (bf16), %.1f MB (shared "
               "experts e4m3)\n",
               T, chain.size(), bf16_bytes / 1e6, fp8_bytes / 1e6);
        printf("%-18s %10s %10s %8s %s\n", "variant", "us/replay", "us/layer", "GB/s", "check");
        std::vector<bf16> ref[2];
        // The fp8 modes add two: the dequantisation into one scratch, and in pieces.
        // Per set (bf16, fp8): cuBLAS, FORMS, then `wg` (the last form).
        const int PER = 2 + NFORMS, NM = 2 * PER + 2;
        for (int m = 0; m < NM; ++m) {
            const int form = m < 2 * PER ? m % PER : 0;
            const bool fp8_mode = m >= PER;
            const int dq = m < 2 * PER ? 0 : m - 2 * PER + 1;  // 1 scratch, 2 pieces
            const bool wg = form == NFORMS + 1;
            const RowsForm* rf = form > 0 && !wg ? &FORMS[form - 1] : nullptr;
            if ((rf || wg) && T > 64) continue;
            char name[64];
            snprintf(name, sizeof name, "%s%s", fp8_mode ? "fp8 " : "",
                     wg          ? "wg s4"
                     : rf        ? rf->name
                     : !fp8_mode ? "cublas"
                     : dq == 0   ? "cublas+dq"
                     : dq == 1   ? "cublas+dq scratch"
                                 : "cublas+dq pieces");
            CK(cudaMemset(outs, 0, chain.size() * ostride * 2));
            const float ms = graph_median_ms([&](cudaStream_t st) {
                for (size_t i = 0; i < chain.size(); ++i) {
                    const Proj& p = chain[i];
                    const bf16* x = p.K == hidden ? xa : xb;
                    bf16* y = outs + i * ostride;
                    const bool fp8 = fp8_mode && p.shared;
                    const int wrows = (p.gu ? 2 : 1) * p.N;
                    if (wg) {
                        const dim3 grid(WG_S, p.N / (p.gu ? 32 : 64));
                        const int smem = p.K / WG_S * 128 + 1024;
                        if (fp8) {
                            if (p.gu)
                                wg_rows<true, MmaFp8><<<grid, 128, smem, st>>>(x, T, p.K, p.q, p.s, p.N, y);
                            else
                                wg_rows<false, MmaFp8><<<grid, 128, smem, st>>>(x, T, p.K, p.q, p.s, p.N, y);
                        } else {
                            if (p.gu)
                                wg_rows<true, MmaBf16><<<grid, 128, smem, st>>>(x, T, p.K, p.w, nullptr, p.N, y);
                            else
                                wg_rows<false, MmaBf16><<<grid, 128, smem, st>>>(x, T, p.K, p.w, nullptr, p.N, y);
                        }
                    } else if (rf) {
                        const dim3 grid(p.N / 16, (T + 8 * rf->ng - 1) / (8 * rf->ng));
                        const int B = DENSE_WARPS * 32;
                        if (fp8)
                            (p.gu ? rf->fgu : rf->f)<<<grid, B, 0, st>>>(x, T, p.K, p.q, p.s, p.N, y);
                        else
                            (p.gu ? rf->bgu : rf->b)<<<grid, B, 0, st>>>(x, T, p.K, p.w, nullptr, p.N, y);
                    } else {
                        const bf16* w = p.w;
                        if (fp8 && dq == 2) {
                            // pieces of DQ_PIECE rows (multiples of 128: whole scale rows)
                            bf16* out = p.gu ? gu : y;
                            for (int r0 = 0; r0 < wrows; r0 += DQ_PIECE) {
                                const int len = std::min(DQ_PIECE, wrows - r0);
                                const size_t n8 = (size_t)len * p.K / 8;
                                fp8_dequant_bf16<<<(unsigned)((n8 + 255) / 256), 256, 0, st>>>(
                                    p.q + (size_t)r0 * p.K, p.s + (size_t)(r0 / 128) * (p.K / 128),
                                    len, p.K, piece);
                                gemm(st, x, piece, T, len, p.K, out + r0, wrows);
                            }
                            if (p.gu) swiglu<<<(T * p.N + 255) / 256, 256, 0, st>>>(gu, T, p.N, y);
                            continue;
                        }
                        if (fp8) {
                            const size_t n8 = (size_t)wrows * p.K / 8;
                            bf16* into = dq == 1 ? scratch : p.wd;
                            fp8_dequant_bf16<<<(unsigned)((n8 + 255) / 256), 256, 0, st>>>(
                                p.q, p.s, wrows, p.K, into);
                            w = into;
                        }
                        if (p.gu) {
                            gemm(st, x, w, T, 2 * p.N, p.K, gu);
                            swiglu<<<(T * p.N + 255) / 256, 256, 0, st>>>(gu, T, p.N, y);
                        } else {
                            gemm(st, x, w, T, p.N, p.K, y);
                        }
                    }
                }
            });
            std::vector<bf16> got(chain.size() * ostride);
            CK(cudaMemcpy(got.data(), outs, got.size() * 2, cudaMemcpyDeviceToHost));
            char check[96] = "(reference)";
            if (rf || wg || dq) {
                const double e = rel_l2(got, ref[fp8_mode]);
                const bool ok = e <= 1e-2;
                snprintf(check, sizeof check, "rel L2 %.2e against %s%s", e,
                         fp8_mode ? "fp8 cublas+dq" : "cublas", ok ? "" : " FAILED");
                bad |= !ok;
            } else {
                ref[fp8_mode] = got;
            }
            const double us = ms * 1000.0;
            const double bytes = fp8_mode ? fp8_bytes : bf16_bytes;
            printf("%-18s %10.1f %10.2f %8.0f %s\n", name, us, us / NL, bytes / (us * 1e3),
                   check);
        }
    }
    return bad;
}
