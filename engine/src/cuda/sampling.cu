// Sampling on the device: greedy arg-max with its log-probability. Launched from
// engine/src/cuda/mod.rs (`Gpu::argmax_logprob`).

#include <cooperative_groups.h>

#include "common.cuh"

// Thread-block clusters (the few-row kernels below, `_c8`) exist from compute capability 9.0.
// Elsewhere (a build for another CUDA_COMPUTE_CAP, engine/build.rs) `sample_cg` stands in so that
// the shared templates compile, the `_c8` kernels trap, and the Rust side never launches them
// (engine/src/cuda/mod.rs `sample_cluster_rows`, off without `moemesh_wgmma`).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define SAMPLE_CLUSTERS 0
namespace sample_cg {
struct cluster_group {
    __device__ void sync() const { __trap(); }
    __device__ unsigned block_rank() const { return 0; }
    template <typename T>
    __device__ T* map_shared_rank(T* p, unsigned) const {
        __trap();
        return p;
    }
};
__device__ inline cluster_group this_cluster() { return {}; }
}  // namespace sample_cg
#define SAMPLE_CLUSTER_DIMS(N)
#else
#define SAMPLE_CLUSTERS 1
namespace sample_cg = cooperative_groups;
#define SAMPLE_CLUSTER_DIMS(N) __cluster_dims__(N, 1, 1)
#endif

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
// Sampling on the device: one block per row does what engine/src/sampling.rs's host sampler
// does (`RowPlan::adjusted`, then `RowPlan::draw` or the arg-max), reading the row table and the
// adjustment table that `pack_plans` lays out there. No sort: each cut (min_p, top_k, top_p) is
// a prefix of the walk order (scaled logit descending, id ascending), found as a key by a radix
// search over the logits' order-preserving bits, 4 bits a pass, counting (top_k) or summing
// probability mass in f64 (top_p) over the ids still in the bracket; ties at the found key go
// by id (the r-th tied id in id order, one ordered pass). The draw walks the kept ids in id
// order, as the host does, with the same Philox4x32-10 uniform, so the two draw the same token
// but where rounding of the masses differs (weights here are f32 `expf`, summed in f64).

#define SAMPLE_THREADS 512
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
static_assert(SAMPLE_THREADS % 32 == 0 && SAMPLE_THREADS <= 1024, "whole warps, one block");
#define SAMPLE_PLAN_WORDS 12
#define SAMPLE_NONE 0xFFFFFFFFu

struct SampleCut {
    uint32_t key;
    uint32_t id;
};

// The ids [s0, s1) of a row that this block takes: the whole row, or with a cluster of C blocks
// a row (`sample_rows_c8`) block `rank`'s contiguous share (a multiple of 4 ids long, so that
// float4 loads stay aligned). Everything below that walks ids in id order walks them as
// (rank, warp, lane): the blocks' shares in rank order.
struct SampleSlice {
    int s0, s1;
    unsigned rank;
};

// A value every thread of each block holds, combined over the cluster's blocks in rank order
// (the same result in every block): `slot[0]`, this block's shared word the others read,
// `slot[-1]` where the result is handed to the block. Lane q of warp 0 reads block q's (one
// remote latency), lane 0 folds them in rank order. C = 1: v.
template <int C, class T, class Op>
__device__ __forceinline__ T sample_cluster(T v, Op op, T* slot) {
    static_assert(C <= 32, "a lane per block");
    if constexpr (C == 1) {
        return v;
    } else {
        sample_cg::cluster_group cl = sample_cg::this_cluster();
        if (threadIdx.x == 0) *slot = v;
        cl.sync();
        if (threadIdx.x < 32) {
            const unsigned lane = threadIdx.x;
            const T mine = lane < (unsigned)C ? *cl.map_shared_rank(slot, lane) : v;
            T r = __shfl_sync(0xffffffffu, mine, 0);
            for (int q = 1; q < C; ++q) r = op(r, __shfl_sync(0xffffffffu, mine, q));
            if (lane == 0) slot[-1] = r;
        }
        cl.sync();
        return slot[-1];
    }
}
template <int C>
__device__ __forceinline__ void sample_cluster_sync() {
    if constexpr (C > 1) sample_cg::this_cluster().sync();
}

// A float's bits mapped so that unsigned order is total order (sampling.rs: `order_key`).
__device__ __forceinline__ uint32_t sample_key(float v) {
    const uint32_t b = __float_as_uint(v);
    return (b >> 31) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float sample_unkey(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

__device__ __forceinline__ bool cut_keeps(SampleCut c, uint32_t k, uint32_t i) {
    return k > c.key || (k == c.key && i <= c.id);
}

__device__ __forceinline__ SampleCut cut_tighter(SampleCut a, SampleCut b) {
    return (b.key > a.key || (b.key == a.key && b.id < a.id)) ? b : a;
}

// Finite or +inf, not NaN, not -inf: a candidate (sampling.rs: `valid`).
__device__ __forceinline__ bool sample_valid(float v) { return v == v && v != -INFINITY; }

// The candidate key of a[i] at inverse temperature inv_t, or false when a[i] is no candidate.
// The product is rounded on its own (no FMA contraction), as the host computes it.
__device__ __forceinline__ bool sample_elem(const float* a, int i, float inv_t, uint32_t* key) {
    const float v = a[i];
    if (!sample_valid(v)) return false;
    *key = sample_key(__fmul_rn(v, inv_t));
    return true;
}

// An f32 weight exp(s - max), as a double (the host computes exp in f64 of the same f32
// difference; the two differ by about one f32 rounding).
__device__ __forceinline__ double sample_weight(uint32_t key, float mx) {
    return (double)expf(__fsub_rn(sample_unkey(key), mx));
}

// Calls f(i, a[i]) for every i of this thread's share of a row, with float4 loads where the
// row allows them (four times fewer loads in flight per byte: these passes are latency-bound).
template <class F>
__device__ __forceinline__ void sample_each(const float* a, SampleSlice sl, F f) {
    if ((sl.s0 & 3) == 0 && (sl.s1 & 3) == 0 && (((size_t)a) & 15) == 0) {
        const float4* a4 = reinterpret_cast<const float4*>(a);
        const int e4 = sl.s1 >> 2;
#pragma unroll 4
        for (int j = (sl.s0 >> 2) + threadIdx.x; j < e4; j += SAMPLE_THREADS) {
            const float4 v = a4[j];
            f(4 * j, v.x);
            f(4 * j + 1, v.y);
            f(4 * j + 2, v.z);
            f(4 * j + 3, v.w);
        }
    } else {
        for (int i = sl.s0 + threadIdx.x; i < sl.s1; i += SAMPLE_THREADS) f(i, a[i]);
    }
}

// The candidate key of value v at inverse temperature inv_t, or false when v is no candidate.
__device__ __forceinline__ bool sample_val(float v, float inv_t, uint32_t* key) {
    if (!sample_valid(v)) return false;
    *key = sample_key(__fmul_rn(v, inv_t));
    return true;
}

// Philox4x32-10 of counter (c_lo, c_hi, 0, 0) under key (k_lo, k_hi); 53 bits of its first two
// words as a uniform in [0, 1) (sampling.rs: `uniform`).
__device__ double philox_uniform(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1) {
    uint32_t c2 = 0, c3 = 0;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    return ((double)(c0 >> 5) * 67108864.0 + (double)(c1 >> 6)) / 9007199254740992.0;
}

// Reductions by `op` (max or sum) with identity `id`: over a warp, and block-wide over
// SAMPLE_THREADS threads, where every thread gets the result. The block-wide one starts with a
// barrier, so the shared scratch of the previous one is free.
struct SampleMax {
    template <class T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct SampleAdd {
    template <class T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

template <class T, class Op>
__device__ __forceinline__ T sample_warp_reduce(T v, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

template <class T, class Op>
__device__ T sample_block_reduce(T v, T id, Op op, T* sh) {
    v = sample_warp_reduce(v, op);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    v = (threadIdx.x & 31) < SAMPLE_WARPS ? sh[threadIdx.x & 31] : id;
    return sample_warp_reduce(v, op);
}

// Over the row: the block's, then the cluster's blocks' in rank order (each block's shared
// scratch `sh` of 32: sh[0 .. SAMPLE_WARPS) for the warps, sh[31] the block's result, sh[30]
// the cluster's).
// The raw row's maximum skips NaN before it gets here, so `>` is fmaxf on what it sees.
static_assert(SAMPLE_WARPS < 30, "sh[30], sh[31] are free for the cluster's combine");
template <int C>
__device__ __forceinline__ float sample_max_f(float v, float* sh) {
    return sample_cluster<C>(sample_block_reduce(v, -INFINITY, SampleMax{}, sh), SampleMax{},
                             sh + 31);
}
template <int C>
__device__ __forceinline__ uint32_t sample_max_u(uint32_t v, uint32_t* sh) {
    return sample_cluster<C>(sample_block_reduce(v, 0u, SampleMax{}, sh), SampleMax{}, sh + 31);
}
__device__ __forceinline__ uint32_t sample_max_u_warp(uint32_t v) {
    return sample_warp_reduce(v, SampleMax{});
}
template <int C>
__device__ __forceinline__ uint32_t sample_sum_u(uint32_t v, uint32_t* sh) {
    return sample_cluster<C>(sample_block_reduce(v, 0u, SampleAdd{}, sh), SampleAdd{}, sh + 31);
}

// Sums in a fixed order (lane tree, then warps in order, then the cluster's blocks in rank
// order), so a row's result never depends on timing.
template <int C>
__device__ double sample_sum_d(double v, double* sh) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    double s = 0.0;
    for (int w = 0; w < SAMPLE_WARPS; ++w) s += sh[w];
    return sample_cluster<C>(s, SampleAdd{}, sh + 31);
}

// Where `target_of(total)` falls in the running sum, in id order, of every block's segment values
// `seg[0 .. SAMPLE_WARPS)` (a block's warps' contiguous segments; the blocks in rank order),
// `total` being their sum: the first segment (rank, warp) with target < before + its value, and
// `before`, the sum ahead of it; warp −1 when none. One block (C = 1): thread 0 walks the warps
// in order. A cluster: lane q of warp 0 reads block q's total (`scratch[0]`, each block's sum of
// its own in warp order), the lanes fold them in rank order to find the block, then read that
// block's segments and find the warp. Every thread gets the answer (through `out`).
template <class T>
struct SampleSeg {
    int warp;
    unsigned rank;
    T before, target;
};
template <int C, class T, class F>
__device__ SampleSeg<T> sample_seg_find(const T* seg, T* scratch, SampleSeg<T>* out, F target_of) {
    if constexpr (C == 1) {
        if (threadIdx.x == 0) {
            T total = 0;
            for (int j = 0; j < SAMPLE_WARPS; ++j) total += seg[j];
            const T target = target_of(total);
            T before = 0;
            int sw = -1;
            for (int j = 0; j < SAMPLE_WARPS; ++j) {
                if (target < before + seg[j]) {
                    sw = j;
                    break;
                }
                before += seg[j];
            }
            *out = SampleSeg<T>{sw, 0u, before, target};
        }
        __syncthreads();
        return *out;
    } else {
        sample_cg::cluster_group cl = sample_cg::this_cluster();
        if (threadIdx.x == 0) {
            T t = 0;
            for (int j = 0; j < SAMPLE_WARPS; ++j) t += seg[j];
            scratch[0] = t;
        }
        cl.sync();
        if (threadIdx.x < 32) {
            const int lane = threadIdx.x;
            const T mine = lane < C ? *cl.map_shared_rank(scratch, (unsigned)lane) : T(0);
            T total = 0;
            for (int q = 0; q < C; ++q) total += __shfl_sync(0xffffffffu, mine, q);
            const T target = target_of(total);
            T before = 0;
            int sq = -1, sw = -1;
            for (int q = 0; q < C; ++q) {
                const T x = __shfl_sync(0xffffffffu, mine, q);
                if (sq < 0) {
                    if (target < before + x)
                        sq = q;
                    else
                        before += x;
                }
            }
            if (sq >= 0) {
                const T v = lane < SAMPLE_WARPS ? cl.map_shared_rank(seg, (unsigned)sq)[lane] : T(0);
                for (int j = 0; j < SAMPLE_WARPS; ++j) {
                    const T x = __shfl_sync(0xffffffffu, v, j);
                    if (sw < 0) {
                        if (target < before + x)
                            sw = j;
                        else
                            before += x;
                    }
                }
            }
            if (lane == 0) *out = SampleSeg<T>{sw, sq < 0 ? 0u : (unsigned)sq, before, target};
        }
        cl.sync();
        return *out;
    }
}

// The arg-max of a row as sampling.rs's `argmax`: strictly greater than -inf, ties to the
// lowest id, NaN never; 0 when nothing is.
template <int C>
__device__ uint32_t sample_argmax(const float* a, SampleSlice sl, float* shv, uint32_t* shi) {
    float best = -INFINITY;
    uint32_t bi = SAMPLE_NONE;
    for (int i = sl.s0 + threadIdx.x; i < sl.s1; i += SAMPLE_THREADS) {
        const float v = a[i];
        if (v > best) {
            best = v;
            bi = (uint32_t)i;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(0xffffffffu, best, o);
        const uint32_t i2 = __shfl_xor_sync(0xffffffffu, bi, o);
        if (i2 != SAMPLE_NONE && (bi == SAMPLE_NONE || v2 > best || (v2 == best && i2 < bi))) {
            best = v2;
            bi = i2;
        }
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) {
        shv[threadIdx.x >> 5] = best;
        shi[threadIdx.x >> 5] = bi;
    }
    __syncthreads();
    best = -INFINITY;
    bi = SAMPLE_NONE;
    for (int w = 0; w < SAMPLE_WARPS; ++w) {
        const uint32_t i2 = shi[w];
        const float v2 = shv[w];
        if (i2 != SAMPLE_NONE && (bi == SAMPLE_NONE || v2 > best || (v2 == best && i2 < bi))) {
            best = v2;
            bi = i2;
        }
    }
    if constexpr (C > 1) {
        // The blocks' picks in rank order, by the same rule (shv[31], shi[31]: this block's).
        sample_cg::cluster_group cl = sample_cg::this_cluster();
        if (threadIdx.x == 0) {
            shv[31] = best;
            shi[31] = bi;
        }
        cl.sync();
        best = -INFINITY;
        bi = SAMPLE_NONE;
        for (unsigned q = 0; q < (unsigned)C; ++q) {
            const uint32_t i2 = *cl.map_shared_rank(shi + 31, q);
            const float v2 = *cl.map_shared_rank(shv + 31, q);
            if (i2 != SAMPLE_NONE && (bi == SAMPLE_NONE || v2 > best || (v2 == best && i2 < bi))) {
                best = v2;
                bi = i2;
            }
        }
        cl.sync();
    }
    return bi == SAMPLE_NONE ? 0u : bi;
}

// The id of the r-th (1-based) candidate in id order whose key is `key` and that `cut` keeps;
// SAMPLE_NONE when there are fewer. Each warp counts its contiguous segment of the row; the
// warp whose segment holds the r-th walks it again, 32 ids at a time.
template <int C>
__device__ uint32_t sample_nth_tie(const float* a, SampleSlice sl, float inv_t, SampleCut cut,
                                   uint32_t key, uint32_t r, uint32_t* shu, uint32_t* found) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int seg = ((sl.s1 - sl.s0 + SAMPLE_THREADS - 1) / SAMPLE_THREADS) * 32;
    const int begin = sl.s0 + w * seg, end = min(begin + seg, sl.s1);
    uint32_t c = 0;
    for (int i = begin + lane; i < end; i += 32) {
        uint32_t k;
        c += sample_elem(a, i, inv_t, &k) && k == key && cut_keeps(cut, k, (uint32_t)i);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
    __syncthreads();
    if (lane == 0) shu[w] = c;
    if (threadIdx.x == 0) *found = SAMPLE_NONE;
    __syncthreads();
    // The (block, warp) whose segment holds the r-th: the first where r − 1 < before + count.
    __shared__ SampleSeg<uint32_t> at;
    const SampleSeg<uint32_t> f =
        sample_seg_find<C>(shu, shu + 31, &at, [&](uint32_t) { return r - 1; });
    const int sw = f.warp;
    const unsigned srank = f.rank;
    uint32_t before = f.before;
    if (w == sw && srank == sl.rank) {
        for (int base = begin; base < end; base += 32) {
            const int i = base + lane;
            uint32_t k = 0;
            const bool p = i < end && sample_elem(a, i, inv_t, &k) && k == key &&
                           cut_keeps(cut, k, (uint32_t)i);
            const uint32_t bal = __ballot_sync(0xffffffffu, p);
            const uint32_t n = __popc(bal);
            if (before + n >= r) {
                // The (r - before)-th set bit of bal.
                uint32_t m = bal;
                for (uint32_t t = 1; t < r - before; ++t) m &= m - 1;
                if (lane == 0) *found = (uint32_t)(base + __ffs(m) - 1);
                break;
            }
            before += n;
        }
    }
    __syncthreads();
    if constexpr (C > 1) {
        // The id the selected block found (SAMPLE_NONE where there was none).
        sample_cg::cluster_group cl = sample_cg::this_cluster();
        cl.sync();
        const uint32_t id = *cl.map_shared_rank(found, srank);
        cl.sync();
        return id;
    }
    return *found;
}

// Per-thread digit histograms in dynamic shared memory: bin b of thread t at [b][t], so a
// warp's updates never conflict and each in-bracket id costs one load and one store (not 16
// predicated adds): mass (f64), count, and in the last pass the smallest id (u32).
// SAMPLE_WARPS >= 16 warps then reduce one bin each.
#define SAMPLE_BINS 16
#define SAMPLE_DYN_SMEM (SAMPLE_BINS * SAMPLE_THREADS * (8 + 4 + 4))
static_assert(SAMPLE_WARPS >= SAMPLE_BINS, "one warp per bin reduces the histograms");

struct SampleBins {
    double* mass;    // [SAMPLE_BINS][SAMPLE_THREADS]
    uint32_t* count; // [SAMPLE_BINS][SAMPLE_THREADS]
    uint32_t* low;   // [SAMPLE_BINS][SAMPLE_THREADS]: smallest id
    double* bins;    // [SAMPLE_BINS] reduced (over the cluster's blocks with C > 1)
    uint32_t* counts;
    uint32_t* lows;
    double* cbins;   // [SAMPLE_BINS]: the cluster's totals on their way (C > 1)
    uint32_t* ccounts;
    uint32_t* clows;
};

// Clears this thread's column.
__device__ __forceinline__ void sample_clear_bins(SampleBins h, bool mass, bool low) {
#pragma unroll
    for (int b = 0; b < SAMPLE_BINS; ++b) {
        const int at = b * SAMPLE_THREADS + threadIdx.x;
        h.count[at] = 0;
        if (mass) h.mass[at] = 0.0;
        if (low) h.low[at] = SAMPLE_NONE;
    }
}

// Sums bin `w` (this warp's) over the threads into bins/counts/lows (mass and the smallest id
// only where asked), then, with a cluster, over its blocks in rank order.
template <int C>
__device__ __forceinline__ void sample_reduce_bins(SampleBins h, bool mass, bool low) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    __syncthreads();
    if (w < SAMPLE_BINS) {
        double s = 0.0;
        uint32_t n = 0, l = SAMPLE_NONE;
        for (int j = lane; j < SAMPLE_THREADS; j += 32) {
            const int at = w * SAMPLE_THREADS + j;
            if (mass) s += h.mass[at];
            n += h.count[at];
            if (low) l = min(l, h.low[at]);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            s += __shfl_xor_sync(0xffffffffu, s, o);
            n += __shfl_xor_sync(0xffffffffu, n, o);
            l = min(l, __shfl_xor_sync(0xffffffffu, l, o));
        }
        if (lane == 0) {
            h.bins[w] = s;
            h.counts[w] = n;
            h.lows[w] = l;
        }
    }
    __syncthreads();
    if constexpr (C > 1) {
        sample_cg::cluster_group cl = sample_cg::this_cluster();
        cl.sync();
        if (threadIdx.x < SAMPLE_BINS) {
            const int b = threadIdx.x;
            double s = *cl.map_shared_rank(h.bins + b, 0);
            uint32_t n = *cl.map_shared_rank(h.counts + b, 0);
            uint32_t l = *cl.map_shared_rank(h.lows + b, 0);
            for (unsigned q = 1; q < (unsigned)C; ++q) {
                if (mass) s += *cl.map_shared_rank(h.bins + b, q);
                n += *cl.map_shared_rank(h.counts + b, q);
                if (low) l = min(l, *cl.map_shared_rank(h.lows + b, q));
            }
            h.cbins[b] = s;
            h.ccounts[b] = n;
            h.clows[b] = l;
        }
        cl.sync();
        if (threadIdx.x < SAMPLE_BINS) {
            h.bins[threadIdx.x] = h.cbins[threadIdx.x];
            h.counts[threadIdx.x] = h.ccounts[threadIdx.x];
            h.lows[threadIdx.x] = h.clows[threadIdx.x];
        }
        __syncthreads();
    }
}

// The cut that keeps the first `rank` (>= 1) candidates in walk order among those `cut`
// keeps: top_k. False when `cut` keeps no more than `rank` (no cut, as on the host).
template <int C>
__device__ bool sample_select_rank(const float* a, SampleSlice sl, float inv_t, SampleCut cut,
                                   uint32_t rank, SampleBins h, uint32_t* shu, uint32_t* found,
                                   SampleCut* out) {
    uint32_t prefix = 0, above = 0, low = SAMPLE_NONE;
    for (int shift = 28; shift >= 0; shift -= 4) {
        const uint32_t hi = shift == 28 ? 0u : (0xFFFFFFFFu << (shift + 4));
        const bool last = shift == 0;
        sample_clear_bins(h, false, last);
        sample_each(a, sl, [&](int i, float v) {
            uint32_t k;
            if (!sample_val(v, inv_t, &k) || (k & hi) != prefix || !cut_keeps(cut, k, (uint32_t)i))
                return;
            const int at = ((k >> shift) & 15u) * SAMPLE_THREADS + threadIdx.x;
            h.count[at] += 1;
            if (last) h.low[at] = min(h.low[at], (uint32_t)i);
        });
        sample_reduce_bins<C>(h, false, last);
        if (shift == 28) {
            uint32_t total = 0;
            for (int b = 0; b < SAMPLE_BINS; ++b) total += h.counts[b];
            if (rank >= total) return false;
        }
        int d = 15;
        for (; d > 0; --d) {
            if (above + h.counts[d] >= rank) break;
            above += h.counts[d];
        }
        prefix |= (uint32_t)d << shift;
        if (last) low = h.lows[d];
    }
    const uint32_t need = rank - above;
    const uint32_t id =
        need == 1 ? low : sample_nth_tie<C>(a, sl, inv_t, cut, prefix, need, shu, found);
    *out = SampleCut{prefix, id};
    return true;
}

// The cut at the first candidate in walk order (among those `cut` keeps) where the mass so far
// reaches top_p × the mass of all of them: top_p. False when the whole mass stays below it
// (rounding).
template <int C>
__device__ bool sample_select_mass(const float* a, SampleSlice sl, float inv_t, float mx, SampleCut cut,
                                   float top_p, SampleBins h, uint32_t* shu, uint32_t* found,
                                   SampleCut* out) {
    uint32_t prefix = 0, ties = 0, low = SAMPLE_NONE;
    double above = 0.0, target = 0.0;
    for (int shift = 28; shift >= 0; shift -= 4) {
        const uint32_t hi = shift == 28 ? 0u : (0xFFFFFFFFu << (shift + 4));
        const bool last = shift == 0;
        sample_clear_bins(h, true, last);
        sample_each(a, sl, [&](int i, float v) {
            uint32_t k;
            if (!sample_val(v, inv_t, &k) || (k & hi) != prefix || !cut_keeps(cut, k, (uint32_t)i))
                return;
            const int at = ((k >> shift) & 15u) * SAMPLE_THREADS + threadIdx.x;
            h.mass[at] += sample_weight(k, mx);
            h.count[at] += 1;
            if (last) h.low[at] = min(h.low[at], (uint32_t)i);
        });
        sample_reduce_bins<C>(h, true, last);
        if (shift == 28) {
            // The first pass sees every candidate: their mass is the total.
            double total = 0.0;
            for (int b = 0; b < SAMPLE_BINS; ++b) total += h.bins[b];
            target = (double)top_p * total;
        }
        int d = 15;
        for (; d >= 0; --d) {
            if (above + h.bins[d] >= target) break;
            above += h.bins[d];
        }
        if (d < 0) return false;
        prefix |= (uint32_t)d << shift;
        ties = h.counts[d];
        if (last) low = h.lows[d];
    }
    // Ties at the found key weigh the same: the walk takes r of them, in id order.
    const double x = sample_weight(prefix, mx);
    double need = x > 0.0 ? ceil((target - above) / x) : 1.0;
    need = fmin(fmax(need, 1.0), (double)ties);
    const uint32_t id = need == 1.0 ? low
                                    : sample_nth_tie<C>(a, sl, inv_t, cut, prefix,
                                                        (uint32_t)need, shu, found);
    *out = SampleCut{prefix, id};
    return true;
}

// One block (SAMPLE_THREADS threads) per row of f32 `logits [rows, vocab]`. `plans` holds the
// row table and then the adjustment table (`adjust_at` words in). `work` is a `[rows, vocab]`
// scratch for the adjusted rows (only rows with adjustments touch it; null when none has).
// Writes each row's token to out[row] and its raw log-softmax's bits to out[rows + row].
// Dynamic shared memory: SAMPLE_DYN_SMEM bytes (the digit histograms).
// With C > 1 (`sample_rows_c8`), a cluster of C blocks takes each row, block `rank` the ids of
// its SampleSlice: every pass over the row runs on C multiprocessors, and every sum, maximum,
// histogram and id-order walk is combined over the blocks in rank order (distributed shared
// memory), so the result is the same in every block and never depends on timing. The host
// launches it for a few rows (where one block a row leaves the GPU idle); the f64 sums add the
// same terms in another order than one block's, so a draw may differ from C = 1's where a
// uniform lands within their rounding of a boundary, as against the host sampler.
template <int C>
__device__ __forceinline__ void sample_row(const float* logits, float* work, int vocab,
                                           const uint32_t* plans, int adjust_at, uint32_t* out) {
    __shared__ float shf[32];
    __shared__ uint32_t shu[32];
    __shared__ double shd[32];
    __shared__ uint32_t binu[SAMPLE_BINS], binl[SAMPLE_BINS];
    __shared__ double bind[SAMPLE_BINS];
    __shared__ uint32_t cbinu[SAMPLE_BINS], cbinl[SAMPLE_BINS];
    __shared__ double cbind[SAMPLE_BINS];
    extern __shared__ double sample_dyn[];
    double* mb = sample_dyn;
    uint32_t* cb = reinterpret_cast<uint32_t*>(sample_dyn + SAMPLE_BINS * SAMPLE_THREADS);
    __shared__ uint32_t found;
    __shared__ int sel_warp;
    __shared__ unsigned sel_rank;
    __shared__ double sel_before, sel_target;
    __shared__ uint32_t picked;

    const int row = blockIdx.x / C, rows = gridDim.x / C;
    SampleSlice sl{0, vocab, 0u};
    if constexpr (C > 1) {
        sl.rank = sample_cg::this_cluster().block_rank();
        const int share = ((vocab + C - 1) / C + 3) & ~3;
        sl.s0 = min(vocab, (int)sl.rank * share);
        sl.s1 = min(vocab, sl.s0 + share);
    }
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const uint32_t* P = plans + (size_t)row * SAMPLE_PLAN_WORDS;
    const uint32_t* adjust = plans + adjust_at;
    const float* raw = logits + (size_t)row * vocab;
    const bool sampled = !(P[0] & 1u);
    const float inv_t = __uint_as_float(P[1]);

    // The adjusted row: penalties and suppressed ids, in sampling.rs's `RowPlan::adjusted` order;
    // the raw row's maximum on the way (for the reported logprob), and the candidates' best key
    // and count where the row is not adjusted.
    float mraw = -INFINITY;
    uint32_t mk = 0, n = 0;
    const float* a = raw;
    const uint32_t ab = P[10], ae = P[11];
    const bool adjusted = ae > ab;
    if (adjusted) {
        // Each block copies and adjusts its own ids (an id is adjusted at most once), and reads
        // only those.
        float* wr = work + (size_t)row * vocab;
        sample_each(raw, sl, [&](int i, float v) {
            wr[i] = v;
            if (v == v) mraw = fmaxf(mraw, v);
        });
        __syncthreads();
        const float rep = __uint_as_float(P[5]);
        for (uint32_t j = ab + threadIdx.x; j < ae; j += SAMPLE_THREADS) {
            const uint32_t id = adjust[3 * j], mode = adjust[3 * j + 1];
            const float sub = __uint_as_float(adjust[3 * j + 2]);
            if (id < (uint32_t)sl.s0 || id >= (uint32_t)sl.s1) continue;
            float v = wr[id];
            if (mode & 1u) v = v > 0.0f ? __fdiv_rn(v, rep) : __fmul_rn(v, rep);
            v = __fsub_rn(v, sub);
            if (mode & 2u) v = -INFINITY;
            wr[id] = v;
        }
        __syncthreads();
        a = wr;
        if (sampled) {
            sample_each(a, sl, [&](int, float v) {
                uint32_t k;
                if (sample_val(v, inv_t, &k)) {
                    mk = max(mk, k);
                    ++n;
                }
            });
        }
    } else if (sampled) {
        sample_each(raw, sl, [&](int, float v) {
            if (v == v) mraw = fmaxf(mraw, v);
            uint32_t k;
            if (sample_val(v, inv_t, &k)) {
                mk = max(mk, k);
                ++n;
            }
        });
    } else {
        sample_each(raw, sl, [&](int, float v) {
            if (v == v) mraw = fmaxf(mraw, v);
        });
    }
    mraw = sample_max_f<C>(mraw, shf);

    uint32_t token;
    double sraw = 0.0;
    bool have_sraw = false;
    if (sampled) {
        mk = sample_max_u<C>(mk, shu);
        n = sample_sum_u<C>(n, shu);
    }
    if (!sampled || n == 0) {
        token = sample_argmax<C>(a, sl, shf, shu);
    } else {
        const float mx = sample_unkey(mk);
        SampleCut cut{0u, SAMPLE_NONE};
        if (P[0] & 2u) cut = SampleCut{sample_key(__fadd_rn(mx, __uint_as_float(P[3]))), SAMPLE_NONE};
        const SampleBins h{mb,   cb,    cb + SAMPLE_BINS * SAMPLE_THREADS,
                           bind, binu, binl, cbind, cbinu, cbinl};
        SampleCut c2;
        const uint32_t top_k = P[4];
        if (top_k > 0 && sample_select_rank<C>(a, sl, inv_t, cut, top_k, h, shu, &found, &c2))
            cut = cut_tighter(cut, c2);
        const float top_p = __uint_as_float(P[2]);
        if (top_p < 1.0f &&
            sample_select_mass<C>(a, sl, inv_t, mx, cut, top_p, h, shu, &found, &c2))
            cut = cut_tighter(cut, c2);
        // The draw: kept ids in id order, each warp over one contiguous segment of its block's
        // share; the raw row's softmax sum on the way.
        const int seg = ((sl.s1 - sl.s0 + SAMPLE_THREADS - 1) / SAMPLE_THREADS) * 32;
        const int begin = sl.s0 + w * seg, end = min(begin + seg, sl.s1);
        double part = 0.0, sr = 0.0;
        uint32_t last = 0;  // 1 + the last kept id, 0 for none
#pragma unroll 4
        for (int i = begin + lane; i < end; i += 32) {
            const float v = a[i];
            const float r0 = adjusted ? raw[i] : v;
            if (r0 == r0) sr += (double)expf(r0 - mraw);
            uint32_t k;
            if (sample_val(v, inv_t, &k) && cut_keeps(cut, k, (uint32_t)i)) {
                part += sample_weight(k, mx);
                last = (uint32_t)i + 1;
            }
        }
        sraw = sample_sum_d<C>(sr, shd);
        have_sraw = true;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
        const uint32_t last_all = sample_max_u<C>(last, shu);
        __syncthreads();
        if (lane == 0) shd[w] = part;
        __syncthreads();
        // The segment (block, warp) where the uniform's share of the kept mass falls.
        __shared__ SampleSeg<double> at;
        const SampleSeg<double> f = sample_seg_find<C>(shd, shd + 31, &at, [&](double kept) {
            return philox_uniform(P[6], P[7], P[8], P[9]) * kept;
        });
        if (threadIdx.x == 0) {
            sel_warp = f.warp;
            sel_rank = f.rank;
            sel_before = f.before;
            sel_target = f.target;
            picked = last_all == 0 ? 0u : last_all - 1;
        }
        __syncthreads();
        sample_cluster_sync<C>();
        if (w == sel_warp && sel_rank == sl.rank) {
            double acc = sel_before;
            const double target = sel_target;
            uint32_t mine = SAMPLE_NONE;
            for (int base = begin; base < end; base += 32) {
                const int i = base + lane;
                uint32_t k;
                double x = 0.0;
                if (i < end && sample_elem(a, i, inv_t, &k) && cut_keeps(cut, k, (uint32_t)i))
                    x = sample_weight(k, mx);
                // Inclusive scan over the lanes, in f64.
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    const double y = __shfl_up_sync(0xffffffffu, x, o);
                    if (lane >= o) x += y;
                }
                const uint32_t hit = __ballot_sync(0xffffffffu, target < acc + x);
                if (hit) {
                    mine = (uint32_t)(base + __ffs(hit) - 1);
                    break;
                }
                acc += __shfl_sync(0xffffffffu, x, 31);
            }
            // Rounding left the scan a hair under the target: the segment's last kept id.
            if (mine == SAMPLE_NONE) {
                const uint32_t l = sample_max_u_warp(last);
                mine = l == 0 ? 0u : l - 1;
            }
            if (lane == 0) {
                // Into rank 0's `picked`, which writes the row's result.
                if constexpr (C > 1)
                    *sample_cg::this_cluster().map_shared_rank(&picked, 0) = mine;
                else
                    picked = mine;
            }
        }
        __syncthreads();
        sample_cluster_sync<C>();
        token = picked;
    }
    if (!have_sraw) {
        double sr = 0.0;
        sample_each(raw, sl, [&](int, float v) {
            if (v == v) sr += (double)expf(v - mraw);
        });
        sraw = sample_sum_d<C>(sr, shd);
    }
    if (sl.rank == 0 && threadIdx.x == 0) {
        out[row] = token;
        out[rows + row] = __float_as_uint((float)((double)(raw[token] - mraw) - log(sraw)));
    }
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS, 1)
    sample_rows(const float* logits, float* work, int vocab, const uint32_t* plans, int adjust_at,
                uint32_t* out) {
    sample_row<1>(logits, work, vocab, plans, adjust_at, out);
}
// A cluster of SAMPLE_CLUSTER blocks a row (grid: rows · SAMPLE_CLUSTER blocks).
#define SAMPLE_CLUSTER 8
extern "C" __global__ void SAMPLE_CLUSTER_DIMS(SAMPLE_CLUSTER)
    __launch_bounds__(SAMPLE_THREADS, 1)
        sample_rows_c8(const float* logits, float* work, int vocab, const uint32_t* plans,
                       int adjust_at, uint32_t* out) {
    if (!SAMPLE_CLUSTERS) __trap();  // no clusters in this build (above)
    sample_row<SAMPLE_CLUSTER>(logits, work, vocab, plans, adjust_at, out);
}

// ---------------------------------------------------------------------------------------------
// Greedy sampling of a few rows on a cluster of SAMPLE_CLUSTER blocks a row (grid: rows ·
// SAMPLE_CLUSTER blocks of 1,024 threads), the host's rule as `argmax_logprob` has it (lowest id
// on ties, NaN never chosen; the log-softmax's sum in f64): one block a row walked its 102,400
// logits twice on one multiprocessor (47 us a step at batch 1, H200; BENCHMARKS session 27).
// Block `rank` takes the contiguous ids of its SampleSlice; the maximum and its id go over the
// cluster as one 64-bit key (value's order key high, inverted id low: the largest key is the
// largest value at its lowest id), the sum in rank order, so every block sees the same result.
// The sum adds the same terms as one block's in another order (the last bits of the f64 sum).
__device__ __forceinline__ unsigned long long argmax_block_max(unsigned long long k,
                                                               unsigned long long* part) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long other = __shfl_xor_sync(0xffffffffu, k, o);
        k = other > k ? other : k;
    }
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = k;
    __syncthreads();
    if (threadIdx.x < 32) {
        k = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0ull;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const unsigned long long other = __shfl_xor_sync(0xffffffffu, k, o);
            k = other > k ? other : k;
        }
    }
    return k;  // valid in warp 0
}

__device__ __forceinline__ double argmax_block_sum(double s, double* part) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    double tot = 0.0;
    if (threadIdx.x == 0)
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) tot += part[w];
    return tot;  // valid in thread 0
}

extern "C" __global__ void SAMPLE_CLUSTER_DIMS(SAMPLE_CLUSTER) __launch_bounds__(1024, 1)
    argmax_logprob_c8(const float* logits, int vocab, uint32_t* token, float* logprob) {
    if (!SAMPLE_CLUSTERS) __trap();  // no clusters in this build (above)
    constexpr int C = SAMPLE_CLUSTER;
    __shared__ unsigned long long kpart[32], kslot[2];
    __shared__ double dpart[32], dslot[2];
    __shared__ unsigned long long kblock;
    __shared__ double dblock;
    const int row = blockIdx.x / C;
    const unsigned rank = sample_cg::this_cluster().block_rank();
    const int share = ((vocab + C - 1) / C + 3) & ~3;
    const int s0 = min(vocab, (int)rank * share), s1 = min(vocab, s0 + share);
    const float* l = logits + (size_t)row * vocab;

    unsigned long long key = 0ull;
    for (int i = s0 + threadIdx.x; i < s1; i += blockDim.x) {
        const float v = l[i];
        if (v != v) continue;
        const unsigned long long k =
            ((unsigned long long)sample_key(v) << 32) | (unsigned long long)(0xFFFFFFFFu - (uint32_t)i);
        key = k > key ? k : key;
    }
    key = argmax_block_max(key, kpart);
    if (threadIdx.x == 0) kblock = key;
    __syncthreads();
    key = sample_cluster<C>(
        kblock, [](unsigned long long a, unsigned long long b) { return b > a ? b : a; }, &kslot[1]);
    // No valid logit: id 0 against a maximum of -inf (as `argmax_logprob`).
    const float mx = key ? sample_unkey((uint32_t)(key >> 32)) : -INFINITY;
    const uint32_t arg = key ? 0xFFFFFFFFu - (uint32_t)(key & 0xFFFFFFFFull) : 0u;

    double s = 0.0;
    for (int i = s0 + threadIdx.x; i < s1; i += blockDim.x) {
        const float v = l[i];
        if (v == v) s += (double)expf(v - mx);
    }
    s = argmax_block_sum(s, dpart);
    if (threadIdx.x == 0) dblock = s;
    __syncthreads();
    const double tot =
        sample_cluster<C>(dblock, [](double a, double b) { return a + b; }, &dslot[1]);
    if (rank == 0 && threadIdx.x == 0) {
        token[row] = arg;
        logprob[row] = (float)((double)(l[arg] - mx) - log(tot));
    }
}
