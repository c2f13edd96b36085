// Routed experts with INT4 weights (w4a16): 4-bit integers with one f32 scale per group of input
// columns and, for asymmetric checkpoints, one 4-bit zero point per group, in compressed-tensors'
// layout (engine/src/weights/int4.rs, `Int4Tensor`), kept so on the device: a quarter of bf16's
// bytes. Launched from engine/src/cuda/experts.rs by the weights' format, wherever the bf16
// kernels of experts.cu are (`..._int4` names).
//
// Numerics, the decode kernels (groups of 64 or more columns, `MmaInt4`): the values
// q − zero are exact in bf16, the MMAs sum them times the bf16 activations in f32 per group, and
// each group's f32 sums are multiplied by its scale at the group's end: the exact product of
// the stored values but for f32's rounding of those sums (closer to the INT4 model than rounding
// each scaled weight to bf16, what `Int4Tensor::dequantize` gives the bf16 kernels). Groups of
// 16 or 32 (`MmaInt4Fine`, a chunk's 64 columns spanning several groups) and the grouped GEMM:
// a weight is bf16(scale · (q − zero)), the difference exact in f32 and the product in f32
// rounded to nearest even once — exactly `Int4Tensor::dequantize`'s value — and then the bf16
// kernels' products in the same order: bit-identical to the bf16 kernels run on the
// dequantised weights. `moemesh verify` checks both on a GPU.
//
// Layout (each expert's gate, up and down matrices with their own groups): w_gu [slots·2N, K/2]
// bytes (slot s: gate rows 2sN.., then up rows; column c of a row in byte c/2, the low nibble
// for even c), its scales [slots·2N, ⌈K/G⌉] f32 and zero points (or null: every zero is 8, the
// symmetric case) [slots·2N, ⌈K/G⌉] u8; w_down [slots·H, I/2] with [slots·H, ⌈I/G'⌉]. That is
// "row r of matrix m of R rows: scales at (m·R + r)·⌈K/G⌉". G a power of two, at least 16 (a
// lane's 16 values of a chunk, or a tail's 8, then share one group).

#define INT4_BIAS 8388608.f  // 2^23: as a float, 0x4B000000 | n is 2^23 + n exactly (n < 2^23)

// Eight nibbles of `w` (value j in bits 4j..4j+3) → eight bf16 of scale · (n − zero), 16 bytes
// in value order. `bias` = 2^23 + zero, so the difference is exact; the product is f32's
// (__fmul_rn: never contracted), then rounded to bf16 (pack_bf16).
__device__ __forceinline__ uint4 int4x8_to_bf16x8(uint32_t w, float bias, float scale) {
    float f[8];
#pragma unroll
    for (int j = 0; j < 8; ++j)
        f[j] = __fmul_rn(__fsub_rn(__uint_as_float(0x4B000000u | ((w >> (4 * j)) & 0xfu)), bias),
                         scale);
    return make_uint4(pack_bf16(f[0], f[1]), pack_bf16(f[2], f[3]), pack_bf16(f[4], f[5]),
                      pack_bf16(f[6], f[7]));
}

// The scales (and zero points) of row r of matrix m (of `rows` rows, K columns).
__device__ __forceinline__ size_t int4_group_row(size_t m, int rows, int r, int K, int shift) {
    const int groups = (K + (1 << shift) - 1) >> shift;
    return ((size_t)m * rows + r) * groups;
}

// ---------------------------------------------------------------------------------------------
// Decode-sized: experts.cu's gate_up_mma / down_mma with INT4 weights. In a 64-wide chunk a lane
// holds its 16 values in one 8-byte load (bf16's 32 bytes), in a 32-wide tail its 8 in 4 bytes,
// loaded with their group's scale and zero point (so that those ride the ring of loads in
// flight rather than being a dependent round trip when the chunk's MMAs want them).
//
// Groups of 16 or 32 columns: each value scaled in f32 and rounded to bf16 (the bf16 kernels'
// bits over the dequantised weights).
struct MmaInt4Fine : ScaledValues {
    typedef uint8_t Elem;
    typedef uint32_t Raw;
    struct Chunk {
        uint2 v;
        float bias, s;
    };
    static constexpr int K_PER_ELEM = 2;
    // Four chunks in flight: at batch 1 the walk is bound by the loads' latency more than by
    // their bytes.
    static constexpr int CHUNK_STAGES = 4;
    const float* scale;   // the row's group scales
    const uint8_t* zero;  // the row's zero points, or null (8)
    int shift;
    __device__ static MmaInt4Fine at(const QuantArgs& qa, size_t m, int rows, int r, int K) {
        const size_t i = int4_group_row(m, rows, r, K, qa.group_shift);
        return {{}, qa.scales + i, qa.zeros ? qa.zeros + i : nullptr, qa.group_shift};
    }
    // The bias and scale of the group holding column c.
    __device__ __forceinline__ void group(int c, float& bias, float& s) const {
        const int gi = c >> shift;
        s = __ldg(scale + gi);
        bias = INT4_BIAS + (zero ? (float)__ldg(zero + gi) : 8.f);
    }
    __device__ static Raw load(const uint8_t* p) {
        return __ldcs(reinterpret_cast<const unsigned int*>(p));
    }
    // A 32-wide block at k: the lane's 8 values start at k + t·8.
    __device__ uint4 frag(Raw r, int k) const {
        float bias, s;
        group(k + (threadIdx.x & 3) * 8, bias, s);
        return int4x8_to_bf16x8(r, bias, s);
    }
    // A 64-wide chunk at k (the lane's 16 values start at k + t·16) with its group's bias and
    // scale.
    __device__ Chunk load2(const uint8_t* p, int k) const {
        Chunk c;
        c.v = __ldcs(reinterpret_cast<const uint2*>(p));
        group(k + (threadIdx.x & 3) * 16, c.bias, c.s);
        return c;
    }
    __device__ void frags2(const Chunk& r, int, uint4& lo, uint4& hi) const {
        lo = int4x8_to_bf16x8(r.v.x, r.bias, r.s);
        hi = int4x8_to_bf16x8(r.v.y, r.bias, r.s);
    }
};

// MmaInt4 (groups of 64 columns or more: a chunk within one group): a pair of nibbles n, n' in
// bits 0–3 and 16–19 of a word becomes the bf16 pair (128 + n, 128 + n') with one LOP3
// (0x4300 | n is bf16 128 + n), and one bf16x2 subtraction of 128 + zero makes q − zero, exact;
// the words (w >> 4j) & 0x000f000f hold values j and j + 4 of the lane's eight, so the
// activations' fragment is permuted to the same pairs (`permute_x`; the MMA's k order is any
// order both operands share). The chunk walk sums a group into its own f32 accumulators and
// adds them times the scale at the group's end (W::EPILOGUE). About 1.5 instructions a value
// instead of 4.5: 26.7 against 36.3 µs a layer at batch 1, 219 against 277 at batch 64
// (scripts/bench/decode_quant.cu, H200, 2026-11-28). MmaInt4Fine's row, loads and 32-wide tail
// (8 values scaled one by one, in memory order, after the walk); its own chunks.
struct MmaInt4 : MmaInt4Fine {
    static constexpr bool EPILOGUE = true, PERMUTE_X = true;
    // Four chunks in flight (MmaInt4Fine's): 27.0 µs a layer at batch 1 against 27.5 with
    // three, 31.8 with two, 33.3 with six; three is 3–4% faster at batches 8–64
    // (decode_quant.cu, 2026-11-28).
    // A chunk's words (uint2 here, MmaInt4Wide's uint4) with its group's bf16 128 + zero (twice)
    // and scale.
    template <typename V>
    struct ChunkOf {
        V v;
        uint32_t zz;
        float s;
    };
    typedef ChunkOf<uint2> Chunk;
    __device__ static MmaInt4 at(const QuantArgs& qa, size_t m, int rows, int r, int K) {
        return {MmaInt4Fine::at(qa, m, rows, r, K)};
    }
    __device__ int group_size() const { return 1 << shift; }
    template <typename C>
    __device__ float epi_scale(const C& c, int) const {
        return c.s;
    }
    // The words at p, with group gi's zero point and scale.
    template <typename V>
    __device__ ChunkOf<V> load_group(const uint8_t* p, int gi) const {
        ChunkOf<V> c;
        c.v = __ldcs(reinterpret_cast<const V*>(p));
        c.s = __ldg(scale + gi);
        const uint32_t z = 0x4300u | (zero ? (uint32_t)__ldg(zero + gi) : 8u);
        c.zz = z | (z << 16);
        return c;
    }
    // x's eight bf16 (x0 x1 | x2 x3 | x4 x5 | x6 x7) → (x0 x4 | x1 x5 | x2 x6 | x3 x7).
    __device__ static uint4 permute_x(uint4 x) {
        return make_uint4(__byte_perm(x.x, x.z, 0x5410), __byte_perm(x.x, x.z, 0x7632),
                          __byte_perm(x.y, x.w, 0x5410), __byte_perm(x.y, x.w, 0x7632));
    }
    // Eight nibbles → the four bf16 pairs (q_j − z, q_{j+4} − z), j = 0..3.
    __device__ static uint4 pairs(uint32_t w, uint32_t zz) {
        uint32_t p[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t v = ((w >> (4 * j)) & 0x000f000fu) | 0x43004300u;
            const __nv_bfloat162 d = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&v),
                                             *reinterpret_cast<const __nv_bfloat162*>(&zz));
            p[j] = *reinterpret_cast<const uint32_t*>(&d);
        }
        return make_uint4(p[0], p[1], p[2], p[3]);
    }
    __device__ Chunk load2(const uint8_t* p, int k) const {
        return load_group<uint2>(p, (k + (threadIdx.x & 3) * 16) >> shift);
    }
    __device__ void frags2(const Chunk& r, int, uint4& lo, uint4& hi) const {
        lo = pairs(r.v.x, r.zz);
        hi = pairs(r.v.y, r.zz);
    }
};

// MmaInt4 over 128-wide chunks (chunk_walk's CHUNK_K), for groups of 128 or more and a k width
// that is a multiple of 128: a lane's 32 values of a chunk in one 16-byte load, 64 bytes a row
// (at 64 wide, 32: one sector), each chunk in one group. The same sums in another order.
struct MmaInt4Wide : MmaInt4 {
    static constexpr int CHUNK_K = 128;
    static constexpr int CHUNK_STAGES = 2;
    typedef ChunkOf<uint4> Chunk;
    __device__ static MmaInt4Wide at(const QuantArgs& qa, size_t m, int rows, int r, int K) {
        return {MmaInt4::at(qa, m, rows, r, K)};
    }
    __device__ Chunk load2(const uint8_t* p, int k) const {
        return load_group<uint4>(p, k >> shift);  // the chunk's group
    }
    __device__ void frags4(const Chunk& r, int, uint4 (&f)[4]) const {
        f[0] = pairs(r.v.x, r.zz);
        f[1] = pairs(r.v.y, r.zz);
        f[2] = pairs(r.v.z, r.zz);
        f[3] = pairs(r.v.w, r.zz);
    }
};

// The decode kernels take either policy by the group size (a uniform branch).
#define INT4_EPILOGUE_MIN_SHIFT 6

extern "C" __global__ void moe_gate_up_mma_int4(const bf16* x, int hidden, const uint8_t* w_gu,
                                                const float* s_gu, const uint8_t* z_gu,
                                                int shift_gu, int inner, const uint32_t* offsets,
                                                const uint32_t* active, const uint32_t* sorted,
                                                int k_div, bf16* h_out) {
    const QuantArgs qa{s_gu, z_gu, shift_gu};
    if (shift_gu >= INT4_EPILOGUE_MIN_SHIFT)
        gate_up_mma<MmaInt4>(x, hidden, w_gu, qa, inner, offsets, active, sorted, k_div, h_out);
    else
        gate_up_mma<MmaInt4Fine>(x, hidden, w_gu, qa, inner, offsets, active, sorted, k_div,
                                 h_out);
}

extern "C" __global__ void moe_down_mma_int4(const bf16* h, int inner, const uint8_t* w_down,
                                             const float* s_down, const uint8_t* z_down,
                                             int shift_down, int hidden, const uint32_t* offsets,
                                             const uint32_t* active, float* y,
                                             const uint32_t* pos, const float* w, int tokens,
                                             int k, float* out, uint32_t* counters,
                                             const uint32_t* seen_from, uint32_t* seen,
                                             uint32_t* done, uint32_t done_value) {
    const QuantArgs qa{s_down, z_down, shift_down};
    const CombineTail tail{pos, w, tokens, k, out, counters, seen_from, seen, done, done_value};
    if (shift_down >= INT4_EPILOGUE_MIN_SHIFT)
        down_mma<MmaInt4>(h, inner, w_down, qa, hidden, offsets, active, y, tail);
    else
        down_mma<MmaInt4Fine>(h, inner, w_down, qa, hidden, offsets, active, y, tail);
}

// MmaInt4Wide's forms, for groups of 128 or more and a k width (hidden for gate/up, inner for
// down) that is a multiple of 128: experts.rs picks these then. The gate/up kernel is held to 3
// blocks an SM (≤ 168 registers; 197 unbounded). One V2-Lite layer's routed experts in groups of
// 128 (scripts/bench/decode_quant.cu, H200, 2026-11-28): 26.8 → 27.2 µs at batch 1, 111.5 → 92.6
// at batch 8, 225.7 → 185.6 at batch 64.
extern "C" __global__ void __launch_bounds__(128, 3)
    moe_gate_up_mma_int4w(const bf16* x, int hidden, const uint8_t* w_gu, const float* s_gu,
                          const uint8_t* z_gu, int shift_gu, int inner, const uint32_t* offsets,
                          const uint32_t* active, const uint32_t* sorted, int k_div,
                          bf16* h_out) {
    gate_up_mma<MmaInt4Wide>(x, hidden, w_gu, QuantArgs{s_gu, z_gu, shift_gu}, inner, offsets,
                             active, sorted, k_div, h_out);
}

extern "C" __global__ void moe_down_mma_int4w(const bf16* h, int inner, const uint8_t* w_down,
                                              const float* s_down, const uint8_t* z_down,
                                              int shift_down, int hidden,
                                              const uint32_t* offsets, const uint32_t* active,
                                              float* y, const uint32_t* pos, const float* w,
                                              int tokens, int k, float* out,
                                              uint32_t* counters, const uint32_t* seen_from,
                                              uint32_t* seen, uint32_t* done,
                                              uint32_t done_value) {
    down_mma<MmaInt4Wide>(h, inner, w_down, QuantArgs{s_down, z_down, shift_down}, hidden,
                          offsets, active, y,
                          CombineTail{pos, w, tokens, k, out, counters, seen_from, seen, done,
                                      done_value});
}

// ---------------------------------------------------------------------------------------------
// Grouped (larger batches and prefill): moe_gg (experts.cu) with INT4 weight tiles, as
// experts_fp8.cu's GgFp8Weights: each k step's BN × BK tile arrives as packed nibbles through
// moe_gg's cp.async pipeline (a quarter of bf16's bytes) into a staging area per stage; when a
// stage is due, the block dequantises it into one bf16 tile laid out as moe_gg's (gg_off
// swizzle), and the k step's ldmatrix and MMAs are moe_gg's. Shared memory
// STAGES · BN · BK / 2 + BN · BK · 2 bytes for the weights.
template <bool GATE_UP, int BN, int BK, int STAGES, int THREADS, int TN>
struct GgInt4Weights {
    typedef uint8_t Elem;
    typedef GgStagedTile<GATE_UP, BN, BK, STAGES, THREADS, TN, 2> Tile;
    static constexpr int PER = Tile::PER;
    static constexpr int SMEM = Tile::SMEM;
    static_assert(THREADS % Tile::CH == 0, "tile shape");
    // The dequantisation: a thread's chunks are all at column `col` of the k step
    // (THREADS % CH == 0), each with its row's groups (`grow`: index into the scales / zero
    // points).
    int col, shift;
    const float* scales;
    const uint8_t* zeros;
    size_t grow[PER];
    Tile t;
    __device__ __forceinline__ GgInt4Weights(const uint8_t* w, const QuantArgs& qa, int K, int N,
                                             uint32_t s, int n0, int tid, unsigned char* smem)
        : col((tid % Tile::CH) * 8),
          shift(qa.group_shift),
          scales(qa.scales),
          zeros(qa.zeros),
          t(w, K, N, s, n0, tid, smem, [&](int i, size_t m, int r) {
              grow[i] = int4_group_row(m, N, r, K, shift);
          }) {}
    __device__ __forceinline__ void load(int k0, int st) { t.load(k0, st); }
    // Stage st (landed: the caller's wait and barrier, which also found every warp done with
    // the previous step's tile) dequantised into the bf16 tile; every thread of the block calls
    // it.
    __device__ __forceinline__ const bf16* ready(int k0, int st) {
        const uint8_t* Q = t.stage(st);
        const int gi = (k0 + col) >> shift;
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const uint32_t v = *reinterpret_cast<const uint32_t*>(Q + t.from[i]);
            const float sc = __ldg(scales + grow[i] + gi);
            const float bias = INT4_BIAS + (zeros ? (float)__ldg(zeros + grow[i] + gi) : 8.f);
            *reinterpret_cast<uint4*>(t.tile + t.to[i]) = int4x8_to_bf16x8(v, bias, sc);
        }
        __syncthreads();
        return t.tile;
    }
};

// The shapes of GG_KERNELS (experts.cu), with INT4 weights (engine/src/cuda/experts.rs sizes
// their shared memory).
template <bool GATE_UP, int BK, int STAGES>
using GgInt4 = GgInt4Weights<GATE_UP, GG_BN, BK, STAGES, 128, GG_BN / 2>;
#define GG_INT4_KERNELS(SFX, BK, STAGES)                                                          \
    extern "C" __global__ void __launch_bounds__(128) moe_gg_gate_up_int4_##SFX(                 \
        const bf16* x, int hidden, const uint8_t* w_gu, const float* s_gu, const uint8_t* z_gu,  \
        int shift_gu, int inner, const uint32_t* sorted_rows, const uint32_t* block_slot,        \
        bf16* h) {                                                                               \
        moe_gg<true, GG_BM, GG_BN, BK, STAGES, 2, 2, GgInt4<true, BK, STAGES>>(                  \
            x, hidden, w_gu, QuantArgs{s_gu, z_gu, shift_gu}, inner, sorted_rows, block_slot,    \
            h);                                                                                  \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(128) moe_gg_down_int4_##SFX(                    \
        const bf16* h, int inner, const uint8_t* w_down, const float* s_down,                    \
        const uint8_t* z_down, int shift_down, int hidden, const uint32_t* sorted_rows,          \
        const uint32_t* block_slot, bf16* y) {                                                   \
        moe_gg<false, GG_BM, GG_BN, BK, STAGES, 2, 2, GgInt4<false, BK, STAGES>>(                \
            h, inner, w_down, QuantArgs{s_down, z_down, shift_down}, hidden, sorted_rows,        \
            block_slot, y);                                                                      \
    }
GG_INT4_KERNELS(k64, 64, 3)
GG_INT4_KERNELS(k32, 32, 4)
