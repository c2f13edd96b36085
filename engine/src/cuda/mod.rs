//! moemesh's own CUDA kernels (`kernels.cu`, which includes one `.cu` file per subject beside
//! the Rust that launches it) behind tensor-in, tensor-out functions.
//!
//! A decode step built from candle ops alone costs ~130 launches per MoE layer plus a host round
//! trip for routing; these kernels fuse the pieces so that a layer is ~20 launches with no host
//! synchronisation: here RMSNorm, the residual adds, SwiGLU and greedy sampling; in
//! [`attention`] the query split, the latent-cache write and MLA decode over the paged pool; in
//! [`experts`] routing and the grouped expert products.
//!
//! [`gpu`] hands out a [`Gpu`] only for a CUDA tensor in a CUDA build with the kernels enabled
//! (`MOEMESH_FUSED_KERNELS=0` turns them off, for A/B measurements); callers keep their candle
//! path for everything else. Every wrapper checks what its kernel assumes (contiguity, dtype,
//! widths that are multiples of 8) and returns `Ok(None)` when the input does not fit, so a
//! caller always has a correct way out.
//!
//! Only three primitives touch CUDA types (device pointers, allocation, launch); in a build
//! without CUDA, `Gpu` cannot be constructed and those three are unreachable.

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};

mod attention;
mod experts;
pub mod ipc;

pub use attention::{ABSORB_ROWS, DecodeTables, PrefillQuery};

pub use experts::{
    DeviceRouting, DoneFlag, ExpertQuant, ExpertWeights, FOLD_MAX_TOKENS, FlagWait,
    GROUPED_MIN_PAIRS_PER_SLOT, GROUPED_MIN_PAIRS_PER_SLOT_QUANTISED, HostAssignments, HostPairs,
    Int4Groups, ROUTE_HANDOFF_MAX, RouteHandoff, RouteParams, RowsAt, WaitFlag, WaitParts,
    combine_counter_words, combine_counters, grouped_min_pairs_per_slot, takes_bulk_gate_up,
    takes_grouped, takes_wide_chunks,
};

/// A kernel argument. Tensors go as raw device addresses (see [`Gpu::ptr`]).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

fn i32_arg(v: usize, what: &str) -> Result<Arg> {
    i32::try_from(v)
        .map(Arg::I32)
        .map_err(|_| EngineError::InvalidInput(format!("{what} {v} is too large for a kernel")))
}

/// `(token, logprob)` per row from a sampling kernel's output: `n` tokens, then `n` logprobs'
/// bits.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn tokens_and_logprobs(out: &[u32], n: usize) -> Vec<(u32, f32)> {
    out.iter()
        .take(n)
        .zip(out.iter().skip(n))
        .map(|(&t, &l)| (t, f32::from_bits(l)))
        .collect()
}

/// Blocks a row of `sample_rows_c8` (sampling.cu's `SAMPLE_CLUSTER`).
const SAMPLE_CLUSTER: usize = 8;
/// Most rows for which the device sampler takes a cluster of blocks a row.
const SAMPLE_CLUSTER_MAX_ROWS: usize = 16;

/// When the device sampler takes a cluster of blocks a row (`MOEMESH_SAMPLE_CLUSTER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SampleCluster {
    /// `0`, `off`, `false`: one block a row at any count.
    Never,
    /// The default: for up to [`SAMPLE_CLUSTER_MAX_ROWS`] rows, where one block a row leaves
    /// the GPU idle (at 64 rows one block each is faster: BENCHMARKS, session 25).
    FewRows,
    /// `always`: at any count (for checks of the cluster kernel).
    Always,
}

impl SampleCluster {
    fn parse(v: Option<&str>) -> Self {
        match v {
            Some("0" | "off" | "false") => Self::Never,
            Some("always") => Self::Always,
            _ => Self::FewRows,
        }
    }

    fn takes(self, rows: usize) -> bool {
        match self {
            Self::Never => false,
            Self::FewRows => rows <= SAMPLE_CLUSTER_MAX_ROWS,
            Self::Always => true,
        }
    }
}

/// Whether `n` rows are sampled with a cluster of blocks a row ([`SampleCluster`]; the
/// environment read once). Never in a build for a GPU without clusters: the PTX has them for
/// compute capability 9.0 only (engine/build.rs's `moemesh_wgmma`; sampling.cu).
fn sample_cluster_rows(n: usize) -> bool {
    if !cfg!(moemesh_wgmma) {
        return false;
    }
    static MODE: std::sync::OnceLock<SampleCluster> = std::sync::OnceLock::new();
    MODE.get_or_init(|| {
        SampleCluster::parse(std::env::var("MOEMESH_SAMPLE_CLUSTER").ok().as_deref())
    })
    .takes(n)
}

/// Threads per row of `sample_rows` (sampling.cu's `SAMPLE_THREADS`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const SAMPLE_THREADS: u32 = 512;
/// Its dynamic shared memory (sampling.cu's `SAMPLE_DYN_SMEM`: 16 bins per thread of a mass
/// (f64), a count and a smallest id (u32)).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const SAMPLE_DYN_SMEM: u32 = 16 * SAMPLE_THREADS * (8 + 4 + 4);

/// Whether rows that are not plain greedy are sampled on the device (default), read once from
/// `MOEMESH_DEVICE_SAMPLING` (`0` copies the logits to the host sampler instead, for A/B runs).
pub fn device_sampling_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("MOEMESH_DEVICE_SAMPLING")
            .map(|v| !matches!(v.as_str(), "0" | "false" | "off"))
            .unwrap_or(true)
    })
}

/// Whether the fused kernels are on (default), read once from `MOEMESH_FUSED_KERNELS`.
pub fn kernels_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("MOEMESH_FUSED_KERNELS")
            .map(|v| !matches!(v.as_str(), "0" | "false" | "off"))
            .unwrap_or(true)
    })
}

/// Whether a decode step's dense projections take moemesh's tensor-core kernel
/// ([`Gpu::dense_small`]; default) or cuBLAS (`MOEMESH_DENSE_MMA=0`, for A/B measurements), read
/// once.
pub fn dense_mma_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("MOEMESH_DENSE_MMA")
            .map(|v| !matches!(v.as_str(), "0" | "false" | "off"))
            .unwrap_or(true)
    })
}

/// Rows up to which [`Gpu::dense_small`] takes a product (dense.cu's `DENSE_MAX_ROWS`: the
/// tensor-core MMA's token width).
pub const DENSE_SMALL_MAX_ROWS: usize = 8;

/// Rows up to which dense.cu's kernels take a product with e4m3 weights (`_rows16` / `_rows32`
/// beyond 8), where the alternative is a dequantisation of the whole weight to bf16 every call
/// and cuBLAS. bf16 weights keep cuBLAS beyond 8 rows (as fast or faster there).
pub const DENSE_FP8_KERNEL_ROWS: usize = 32;

/// Rows up to which [`Gpu::dense_small`] takes e4m3 weights by default. H200, V2-Lite with
/// FP8 experts (docs/BENCHMARKS.md, session 30): a step's dense products alone
/// (scripts/bench/dense_rows.cu) 16 rows 788 against 1,214 µs, 32 rows 1,063 against 1,231;
/// decode steps in-process −0.45 ms at batch 12–16 and −0.2 at 24–32, through the mesh (gate
/// and two workers on the GPU) −0.35 at 16 but +0.8 at 32 with `_rows32` (its one block an SM
/// holds the SMs the workers' experts share): so 16.
pub const DENSE_FP8_DEFAULT_ROWS: usize = 16;

/// [`DENSE_FP8_DEFAULT_ROWS`], or what `MOEMESH_DENSE_FP8_ROWS` says (8 … 32; 8: e4m3 weights
/// take the kernels up to 8 rows only, as before session 30), read once; a value that is not a
/// number, or lies outside 8 … 32, is reported (the default, or the nearest bound, taken).
pub fn dense_fp8_max_rows() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        let v = std::env::var("MOEMESH_DENSE_FP8_ROWS").ok();
        let (rows, problem) = parse_dense_fp8_rows(v.as_deref());
        if let Some(p) = problem {
            tracing::warn!("{p}");
        }
        rows
    })
}

/// [`dense_fp8_max_rows`]'s reading of `MOEMESH_DENSE_FP8_ROWS`: the rows, and what was wrong
/// with the value if anything.
fn parse_dense_fp8_rows(v: Option<&str>) -> (usize, Option<String>) {
    let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) else {
        return (DENSE_FP8_DEFAULT_ROWS, None);
    };
    let range = DENSE_SMALL_MAX_ROWS..=DENSE_FP8_KERNEL_ROWS;
    match v.parse::<usize>() {
        Ok(n) if range.contains(&n) => (n, None),
        Ok(n) => {
            let rows = n.clamp(DENSE_SMALL_MAX_ROWS, DENSE_FP8_KERNEL_ROWS);
            let why = format!(
                "MOEMESH_DENSE_FP8_ROWS={n} is outside {DENSE_SMALL_MAX_ROWS} … \
                 {DENSE_FP8_KERNEL_ROWS}; taking {rows}"
            );
            (rows, Some(why))
        }
        Err(_) => {
            let why = format!(
                "MOEMESH_DENSE_FP8_ROWS={v:?} is not a number of rows \
                 ({DENSE_SMALL_MAX_ROWS} … {DENSE_FP8_KERNEL_ROWS}); taking the default \
                 {DENSE_FP8_DEFAULT_ROWS}"
            );
            (DENSE_FP8_DEFAULT_ROWS, Some(why))
        }
    }
}

/// dense.cu's kernel for `t` rows of a product with e4m3 (`fp8`) or bf16 weights (`gate_up`: the
/// SwiGLU form), up to `fp8_rows` rows for e4m3 ([`dense_fp8_max_rows`]); `None` beyond what the
/// kernels take.
fn dense_kernel(fp8: bool, gate_up: bool, t: usize, fp8_rows: usize) -> Option<&'static str> {
    Some(match (fp8, gate_up, t) {
        (_, _, 0) => return None,
        (false, false, 1..=DENSE_SMALL_MAX_ROWS) => "dense_mma_bf16",
        (false, true, 1..=DENSE_SMALL_MAX_ROWS) => "dense_gate_up_mma_bf16",
        (false, _, _) => return None,
        (true, _, _) if t > fp8_rows.min(DENSE_FP8_KERNEL_ROWS) => return None,
        (true, false, 1..=DENSE_SMALL_MAX_ROWS) => "dense_mma_fp8",
        (true, true, 1..=DENSE_SMALL_MAX_ROWS) => "dense_gate_up_mma_fp8",
        (true, false, 9..=16) => "dense_rows16_fp8",
        (true, true, 9..=16) => "dense_gate_up_rows16_fp8",
        (true, false, _) => "dense_rows32_fp8",
        (true, true, _) => "dense_gate_up_rows32_fp8",
    })
}

/// Rows up to which [`Gpu::dense_small`] takes an e4m3 product past dense.cu's kernels
/// ([`dense_fp8_max_rows`]) through experts_fp8.cu's `dense_fp8_sk` (one block row of 64; beyond
/// it each block row would read the weights again, slower than the dequantisation + cuBLAS it
/// replaces: docs/BENCHMARKS.md, session 34).
pub const DENSE_FP8_SPLIT_MAX_ROWS: usize = 64;

/// `dense_fp8_sk`'s shared memory: 3 stages of 64 × 64 bf16 activations and of 128 × 64 e4m3
/// weights, and the 128 × 64 bf16 tile they are dequantised into.
const DENSE_FP8_SK_SMEM: u32 = 3 * 64 * 64 * 2 + 3 * 128 * 64 + 128 * 64 * 2;

/// Whether e4m3 products of [`dense_fp8_max_rows`] + 1 … [`DENSE_FP8_SPLIT_MAX_ROWS`] rows run
/// on `dense_fp8_sk` (default) or dequantise the weight for cuBLAS as before
/// (`MOEMESH_DENSE_FP8_SPLIT=0`, for A/B measurements), read once.
pub fn dense_fp8_split_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("MOEMESH_DENSE_FP8_SPLIT")
            .map(|v| !matches!(v.trim(), "0" | "false" | "off"))
            .unwrap_or(true)
    })
}

/// `dense_fp8_sk`'s k ranges for `tiles` column blocks over `k` columns: about two waves of the
/// GPU's multiprocessors (fewer blocks measured slower: session 34), whole k steps of 64, at
/// least two steps a range, at most 16 ranges.
fn dense_fp8_splits(tiles: usize, k: usize) -> usize {
    (2 * SMS)
        .div_ceil(tiles.max(1))
        .min(k / 64 / 2)
        .clamp(1, 16)
}

/// Where [`Gpu::dense_small`] takes `t` rows of width `k` times an e4m3 weight through
/// `dense_fp8_sk`: the output width, the column blocks and the k ranges; `None` where it does
/// not (bf16 weights, rows outside what dense.cu leaves … [`DENSE_FP8_SPLIT_MAX_ROWS`], widths
/// the tiles do not take: k a multiple of 64; gate/up halves a multiple of 128, so that the
/// stacked gate and up rows each start a block row of scales).
fn dense_fp8_split_dims(
    t: usize,
    k: usize,
    w: DenseWeight<'_>,
    gate_up: bool,
    fp8_rows: usize,
) -> Option<SplitShape> {
    let DenseWeight::Fp8 { q, .. } = w else {
        return None;
    };
    let (wn, wk) = q.dims2().ok()?;
    let n = if gate_up { wn / 2 } else { wn };
    let ok = t > fp8_rows.min(DENSE_FP8_KERNEL_ROWS)
        && t <= DENSE_FP8_SPLIT_MAX_ROWS
        && wk == k
        && k.is_multiple_of(64)
        && n > 0
        && n.is_multiple_of(2)
        && (!gate_up || (wn == 2 * n && n.is_multiple_of(128)))
        && w.well_formed()
        && q.is_contiguous()
        && aligned16(q);
    let tiles = if gate_up {
        n.div_ceil(64)
    } else {
        n.div_ceil(128)
    };
    ok.then(|| SplitShape {
        n,
        tiles,
        splits: dense_fp8_splits(tiles, k),
    })
}

/// [`dense_fp8_split_dims`]'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SplitShape {
    n: usize,
    tiles: usize,
    splits: usize,
}

/// Which prefill kernels are on, read once from `MOEMESH_FLASH_PREFILL`: both (default), none
/// (`0`, the earlier path: attention through materialised scores and a host-built causal mask,
/// experts one after another beyond [`crate::experts::DENSE_MAX_ROWS`] rows), or one of them
/// (`attention`, `experts`), for A/B measurements.
fn prefill_kernels() -> (bool, bool) {
    static ON: std::sync::OnceLock<(bool, bool)> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        if !kernels_enabled() {
            return (false, false);
        }
        match std::env::var("MOEMESH_FLASH_PREFILL").as_deref() {
            Ok("0" | "false" | "off") => (false, false),
            Ok("attention") => (true, false),
            Ok("experts") => (false, true),
            _ => (true, true),
        }
    })
}

/// Whether prefill attention takes the flash kernel ([`Gpu::mla_prefill`]), with the fused
/// rotary and the one-launch pool write around it (see [`prefill_kernels`]).
pub fn flash_prefill_enabled() -> bool {
    prefill_kernels().0
}

/// Most rows a sequence may bring to a step and still be attended with the step's decodes, in
/// latent space by the decode kernel (each row a query over its own causal prefix; see
/// `layers::mla::DecodeBatch`), instead of by the flash prefill kernel, which expands the
/// sequence's whole context into per-head keys and values first
/// (`MOEMESH_LATENT_PREFILL_ROWS`, default 64; 0 is the earlier behaviour, for A/B runs: every
/// prefill on the flash kernel, and the decodes of a step that also prefills on the unfused
/// path). The short tail of a prompt whose prefix came from the prefix cache is the
/// case: expanding 1,500 cached positions to attend 30 new rows costs more than the rows'
/// attention, and launches per sequence and layer. Read once.
pub fn latent_prefill_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("MOEMESH_LATENT_PREFILL_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64)
    })
}

/// Whether prefill-sized expert batches take the grouped GEMM (see [`prefill_kernels`]).
pub fn grouped_experts_enabled() -> bool {
    prefill_kernels().1
}

/// Whether the grouped GEMM may take Hopper's warp-specialised wgmma kernels (`moe_ws_*`) for
/// prefill-sized batches: only in a build whose PTX targets sm_90a (engine/build.rs, on
/// `CUDA_COMPUTE_CAP` 90), and not where `MOEMESH_PREFILL_GEMM=mma` asks for the mma.sync
/// kernels everywhere (read once; for A/B runs).
pub fn wgmma_experts_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        cfg!(moemesh_wgmma) && std::env::var("MOEMESH_PREFILL_GEMM").as_deref() != Ok("mma")
    })
}

/// Whether a decode step's FP8 gate/up product may take the bulk-copy kernel
/// ([`experts::takes_bulk_gate_up`]): only in a build whose PTX targets sm_90a (its
/// `cp.async.bulk` and `mbarrier` transactions), and not where `MOEMESH_FP8_DECODE=wide` asks for
/// the 128-wide register walk (`moe_gate_up_mma_fp8w`) as before (read once; for A/B runs).
pub fn bulk_decode_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        cfg!(moemesh_wgmma) && std::env::var("MOEMESH_FP8_DECODE").as_deref() != Ok("wide")
    })
}

/// Which flash prefill kernel bf16 takes, read once from `MOEMESH_PREFILL_ATTN`: `split`
/// (default: tensor cores, p·v as two bf16 products of the probabilities' high and low parts),
/// `mma` (tensor cores, probabilities rounded to bf16 for p·v as FlashAttention does; 3% faster
/// at 2,048 tokens) or `simple` (CUDA cores, f32 throughout), for A/B runs of speed and rounding.
///
/// `split` is the default because the rounded probabilities fail `moemesh verify` in bf16 on
/// tiny-deepseek-v3 (one position away from routing near-ties at cosine 0.99890 against the
/// 0.999 bound; `split` 0.99983, `simple` 0.99982, the earlier absorbed path 0.99981; H100,
/// docs/BENCHMARKS.md 2026-11-26).
fn prefill_attn_kernel() -> &'static str {
    static K: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    K.get_or_init(|| match std::env::var("MOEMESH_PREFILL_ATTN").as_deref() {
        Ok("mma") => "mma",
        Ok("simple") => "simple",
        _ => "split",
    })
}

/// Which MLA decode kernel bf16 takes, read once from `MOEMESH_MLA_DECODE`: `mma` (default:
/// tensor cores, 16 heads a block, where the shapes allow) or `simple` (CUDA cores, f32, four
/// heads a block), for A/B runs.
fn mla_decode_kernel() -> &'static str {
    static K: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    K.get_or_init(|| match std::env::var("MOEMESH_MLA_DECODE").as_deref() {
        Ok("simple") => "simple",
        _ => "mma",
    })
}

/// Whether a decode step of at most eight rows takes the absorbed products fused with their
/// neighbours (`Gpu::decode_prep` given W_UK, `Gpu::mla_decode_uv`): `MOEMESH_MLA_FUSED`, default
/// on; `0`, `false` or `off` keep the batched GEMMs. Read once.
pub fn mla_fused() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        mla_decode_kernel() == "mma"
            && std::env::var("MOEMESH_MLA_FUSED")
                .map(|v| !matches!(v.as_str(), "0" | "false" | "off"))
                .unwrap_or(true)
    })
}

/// Which of a device-ordered expert call's flag launches fold into the kernels beside them
/// (`MOEMESH_MESH_FOLDS`, read once; default all four): `signal`, the gate's `ready` stores
/// done by the kernel that copies the rows and routing into the workers' slots (its last
/// block); `done`, the worker's `seen` copy and `done` store by its down kernel's folded
/// combine (its last column block); `wait`, the gate's wait for the workers' `done` words and
/// the sum of their outputs done by the next residual add and norm; `route`, the rows and
/// routing copied into the workers' slots and their `ready` words stored by the routing launch
/// itself (for the few rows its fused kernel takes; else `signal`'s launch does it). `none` (or
/// `0`) keeps each in a launch of its own, for A/B runs; a comma list names the folds to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshFolds {
    pub signal: bool,
    pub done: bool,
    pub wait: bool,
    pub route: bool,
}

impl MeshFolds {
    pub const ALL: MeshFolds = MeshFolds {
        signal: true,
        done: true,
        wait: true,
        route: true,
    };
    pub const NONE: MeshFolds = MeshFolds {
        signal: false,
        done: false,
        wait: false,
        route: false,
    };

    /// `None` (unset), `all`: every fold; `none`, `0`, `off`: none; else a comma list of
    /// `signal`, `done`, `wait`, `route`. An unknown name is an error naming it.
    pub fn parse(v: Option<&str>) -> std::result::Result<Self, String> {
        let v = match v.map(str::trim) {
            None | Some("" | "all" | "1" | "on") => return Ok(Self::ALL),
            Some("none" | "0" | "off") => return Ok(Self::NONE),
            Some(v) => v,
        };
        let mut f = Self::NONE;
        for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "signal" => f.signal = true,
                "done" => f.done = true,
                "wait" => f.wait = true,
                "route" => f.route = true,
                other => {
                    return Err(format!(
                        "MOEMESH_MESH_FOLDS: unknown fold {other:?} (expected all, none, or a \
                         comma list of signal, done, wait, route)"
                    ));
                }
            }
        }
        Ok(f)
    }

    /// The process's folds (the environment read once; an unknown value is reported and every
    /// fold taken).
    pub fn get() -> Self {
        static F: std::sync::OnceLock<MeshFolds> = std::sync::OnceLock::new();
        *F.get_or_init(
            || match Self::parse(std::env::var("MOEMESH_MESH_FOLDS").ok().as_deref()) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!("{e}; taking every fold");
                    Self::ALL
                }
            },
        )
    }
}

/// Most context positions whose keys and values prefill attention expands at once
/// (`MOEMESH_PREFILL_KV_CHUNK`, default 4096): a longer context is attended chunk by chunk and
/// merged by log-sum-exp, so the expanded keys and values stay bounded
/// (4096 × 16 heads × 256 bf16 = 32 MiB for DeepSeek-V2-Lite). Read once.
pub fn prefill_kv_chunk() -> usize {
    static CHUNK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CHUNK.get_or_init(|| {
        std::env::var("MOEMESH_PREFILL_KV_CHUNK")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or(4096)
    })
}

/// Starts (`true`) or stops the collection of an attached CUDA profiler (`ncu
/// --profile-from-start off`), so that a benchmark can profile chosen steps only. A no-op
/// without CUDA.
pub fn profiler(on: bool) -> Result<()> {
    imp::profiler(on)
}

/// Whether `MOEMESH_STEP_TRACE=1` asks for step traces (read once): CUDA events at named points
/// of a step ([`trace_mark`]), printed by [`trace_flush`] as the time between consecutive points
/// on the GPU and on the host, to see where a step's time goes without a profiler (the lent GPU
/// machines have no Nsight Systems). Off by default; when on, every flush waits for the GPU.
pub fn trace_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MOEMESH_STEP_TRACE").as_deref() == Ok("1"))
}

/// Records the point `label` on `device`'s stream (a no-op unless [`trace_enabled`], or off a
/// GPU). Points collect process-wide until [`trace_flush`].
pub fn trace_mark(device: &Device, label: &'static str) {
    if trace_enabled() {
        imp::trace_mark(device, label);
    }
}

/// Prints the points collected so far, once there are at least `min_points`, as one JSON line
/// on stderr (`{"trace": what, "points": n, "gpu_ms": first→last, "host_ms": …, "steps":
/// {"a→b": [count, gpu ms, host ms], …}}`), and forgets them. Waits for the last point's work.
pub fn trace_flush(what: &str, min_points: usize) {
    if trace_enabled() {
        imp::trace_flush(what, min_points);
    }
}

/// The kernels for tensors on `device`, when it is a CUDA device and they are enabled.
pub fn gpu(device: &Device) -> Option<Gpu> {
    imp::gpu(device)
}

/// Multiprocessors of the GPUs moemesh is tuned for (H100 SXM: 132; H200: 132), for sizing
/// split grids; a different count changes only how well a grid fills the chip.
const SMS: usize = 132;

fn is_kernel_dtype(d: DType) -> bool {
    matches!(d, DType::F32 | DType::BF16)
}

/// Whether `t` starts on a 16-byte boundary (the vectorised loads need it; allocations are
/// aligned, views into them may not be).
fn aligned16(t: &Tensor) -> bool {
    (t.layout().start_offset() * t.dtype().size_in_bytes()).is_multiple_of(16)
}

fn suffix(d: DType) -> &'static str {
    if d == DType::BF16 { "bf16" } else { "f32" }
}

/// Most rows [`Gpu::wait_add_rms_norm`] takes: each row's block polls the workers' flags.
pub const WAIT_NORM_MAX_ROWS: usize = 32;

/// What [`Gpu::add_rms_norm`] computes: the residual stream after the add (f32) and its norm.
pub struct AddNormed {
    pub h: Tensor,
    pub normed: Tensor,
    pub normed_f32: Option<Tensor>,
}

/// A norm kernel's outputs: `[t, d]` in the compute dtype, and a second f32 copy when one is
/// wanted and the compute dtype is not f32 already.
struct NormOut {
    out: Tensor,
    extra_f32: Option<Tensor>,
}

impl NormOut {
    fn alloc(g: &Gpu, t: usize, d: usize, dtype: DType, want_f32: bool) -> Result<Self> {
        Ok(NormOut {
            out: g.alloc(dtype, &[t, d])?,
            extra_f32: if want_f32 && dtype != DType::F32 {
                Some(g.alloc(DType::F32, &[t, d])?)
            } else {
                None
            },
        })
    }

    /// The f32 copy's address for the kernel (0: none).
    fn f32_ptr(&self, g: &Gpu) -> Result<u64> {
        self.extra_f32.as_ref().map_or(Ok(0), |o| g.ptr(o))
    }

    /// `(normed, normed in f32 when want_f32)`: the f32 one is the output itself in an f32 run.
    fn into_pair(self, want_f32: bool) -> (Tensor, Option<Tensor>) {
        let f32_copy = match (want_f32, self.extra_f32) {
            (true, Some(o)) => Some(o),
            (true, None) => Some(self.out.clone()),
            (false, _) => None,
        };
        (self.out, f32_copy)
    }
}

/// Handle on the kernels of one CUDA device.
#[derive(Clone)]
pub struct Gpu {
    inner: imp::Inner,
}

impl Gpu {
    /// RMSNorm of `x [T, d]` (f32 or bf16) with f32 weight `w [d]`: the result in `dtype` and,
    /// when `want_f32`, also in f32 (the router scores the f32 one). `None` if it does not fit.
    pub fn rms_norm(
        &self,
        x: &Tensor,
        w: &Tensor,
        eps: f64,
        dtype: DType,
        want_f32: bool,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let Ok((t, d)) = x.dims2() else {
            return Ok(None);
        };
        if !x.is_contiguous()
            || !is_kernel_dtype(x.dtype())
            || !is_kernel_dtype(dtype)
            || w.dtype() != DType::F32
            || !w.is_contiguous()
            || t == 0
        {
            return Ok(None);
        }
        let out = NormOut::alloc(self, t, d, dtype, want_f32)?;
        let name = format!("rms_norm_{}_{}", suffix(x.dtype()), suffix(dtype));
        self.launch(
            &name,
            (t as u32, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(x)?),
                Arg::Ptr(self.ptr(w)?),
                Arg::Ptr(self.ptr(&out.out)?),
                Arg::Ptr(out.f32_ptr(self)?),
                i32_arg(d, "norm width")?,
                Arg::F32(eps as f32),
            ],
        )?;
        Ok(Some(out.into_pair(want_f32)))
    }

    /// `x + a + b` with `x` f32 (the residual stream), `a` in the compute dtype and `b` f32,
    /// either optional; f32 out.
    pub fn residual_add(
        &self,
        x: &Tensor,
        a: Option<&Tensor>,
        b: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let adt = a.map_or(DType::F32, |a| a.dtype());
        let fits = |t: &Tensor| t.is_contiguous() && t.dims() == x.dims();
        if x.dtype() != DType::F32
            || !fits(x)
            || a.is_some_and(|a| !fits(a) || !is_kernel_dtype(a.dtype()))
            || b.is_some_and(|b| !fits(b) || b.dtype() != DType::F32)
        {
            return Ok(None);
        }
        let n = x.elem_count();
        let out = self.alloc(DType::F32, x.dims())?;
        let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
        self.launch(
            &format!("residual_add_{}", suffix(adt)),
            (blocks, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(x)?),
                Arg::Ptr(a.map_or(Ok(0), |a| self.ptr(a))?),
                Arg::Ptr(b.map_or(Ok(0), |b| self.ptr(b))?),
                Arg::Ptr(self.ptr(&out)?),
                Arg::I64(n as i64),
            ],
        )?;
        Ok(Some(out))
    }

    /// [`residual_add`](Self::residual_add) and then [`rms_norm`](Self::rms_norm) of its result
    /// with `w`, in one pass over the rows: `(h, normed in dtype, normed in f32 when want_f32)`.
    /// `None` if the shapes do not fit the kernel (the caller runs the two apart).
    #[allow(clippy::too_many_arguments)]
    pub fn add_rms_norm(
        &self,
        x: &Tensor,
        a: Option<&Tensor>,
        b: Option<&Tensor>,
        w: &Tensor,
        eps: f64,
        dtype: DType,
        want_f32: bool,
    ) -> Result<Option<AddNormed>> {
        if b.is_some_and(|b| !b.is_contiguous() || b.dims() != x.dims() || !aligned16(b))
            || b.is_some_and(|b| b.dtype() != DType::F32)
        {
            return Ok(None);
        }
        let b = b.map(|b| self.ptr(b)).transpose()?;
        self.add_rms_norm_launch(x, a, w, eps, dtype, want_f32, |args| {
            args.insert(2, Arg::Ptr(b.unwrap_or(0)));
            Ok("add_rms_norm")
        })
    }

    /// [`add_rms_norm`](Self::add_rms_norm) with `b` the sum of `parts`, each waited for
    /// first (its flag reaching its table entry, or released): the gate's wait for its
    /// workers, their sum and the next residual add and norm in one launch. `None` when the
    /// kernel does not take them (more than [`WAIT_NORM_MAX_ROWS`] rows, parts that are not
    /// `x`'s shape; nothing queued then).
    #[allow(clippy::too_many_arguments)]
    pub fn wait_add_rms_norm(
        &self,
        x: &Tensor,
        a: Option<&Tensor>,
        parts: &experts::WaitParts,
        w: &Tensor,
        eps: f64,
        dtype: DType,
        want_f32: bool,
    ) -> Result<Option<AddNormed>> {
        let n = parts.parts.len();
        if x.dims() != [parts.rows, parts.cols]
            || parts.rows > WAIT_NORM_MAX_ROWS
            || n == 0
            || n > 4
            || parts.waits.len() != n
            || parts.parts.iter().any(|p| !p.is_multiple_of(16))
            || parts.table.device().location() != x.device().location()
        {
            return Ok(None);
        }
        let flags = self.wait_args(&parts.waits, &parts.table, "wait_add_rms_norm")?;
        self.add_rms_norm_launch(x, a, w, eps, dtype, want_f32, |args| {
            let at = |i: usize| Arg::Ptr(parts.parts.get(i).copied().unwrap_or(0));
            let mut ins = vec![at(0), at(1), at(2), at(3), i32_arg(n, "parts")?];
            ins.extend(flags);
            args.splice(2..2, ins);
            Ok("wait_add_rms_norm")
        })
    }

    /// The launch both of the above share: `x`, `a` (and what `fill` inserts at argument 2:
    /// the f32 delta's arguments) then `h, w, out, out_f32, d, eps`; one block a row. `fill`
    /// names the kernel family (`{name}_{a}_{out}`).
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm_launch(
        &self,
        x: &Tensor,
        a: Option<&Tensor>,
        w: &Tensor,
        eps: f64,
        dtype: DType,
        want_f32: bool,
        fill: impl FnOnce(&mut Vec<Arg>) -> Result<&'static str>,
    ) -> Result<Option<AddNormed>> {
        let Ok((t, d)) = x.dims2() else {
            return Ok(None);
        };
        let fits = |t: &Tensor| t.is_contiguous() && t.dims() == x.dims() && aligned16(t);
        if x.dtype() != DType::F32
            || t == 0
            || !d.is_multiple_of(8)
            || !fits(x)
            || a.is_some_and(|a| !fits(a) || !is_kernel_dtype(a.dtype()))
            || !is_kernel_dtype(dtype)
            || w.dtype() != DType::F32
            || !w.is_contiguous()
            || w.dims() != [d]
            || !aligned16(w)
        {
            return Ok(None);
        }
        let h = self.alloc(DType::F32, &[t, d])?;
        let out = NormOut::alloc(self, t, d, dtype, want_f32)?;
        let adt = a.map_or(DType::F32, |a| a.dtype());
        let mut args = vec![
            Arg::Ptr(self.ptr(x)?),
            Arg::Ptr(a.map_or(Ok(0), |a| self.ptr(a))?),
            Arg::Ptr(self.ptr(&h)?),
            Arg::Ptr(self.ptr(w)?),
            Arg::Ptr(self.ptr(&out.out)?),
            Arg::Ptr(out.f32_ptr(self)?),
            i32_arg(d, "norm width")?,
            Arg::F32(eps as f32),
        ];
        let name = fill(&mut args)?;
        self.launch(
            &format!("{name}_{}_{}", suffix(adt), suffix(dtype)),
            (t as u32, 1, 1),
            256,
            0,
            &args,
        )?;
        let (normed, normed_f32) = out.into_pair(want_f32);
        Ok(Some(AddNormed {
            h,
            normed,
            normed_f32,
        }))
    }

    /// SwiGLU on fused gate|up rows: `gu [T, 2I]` → `silu(gu[:, :I]) · gu[:, I:]`, `[T, I]`.
    pub fn silu_mul(&self, gu: &Tensor) -> Result<Option<Tensor>> {
        let Ok((t, two_i)) = gu.dims2() else {
            return Ok(None);
        };
        if !gu.is_contiguous() || !is_kernel_dtype(gu.dtype()) || !two_i.is_multiple_of(2) || t == 0
        {
            return Ok(None);
        }
        let inner = two_i / 2;
        let out = self.alloc(gu.dtype(), &[t, inner])?;
        let blocks = (t * inner).div_ceil(256).clamp(1, 65_535) as u32;
        self.launch(
            &format!("silu_mul_{}", suffix(gu.dtype())),
            (blocks, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(gu)?),
                Arg::Ptr(self.ptr(&out)?),
                i32_arg(t, "rows")?,
                i32_arg(inner, "inner size")?,
            ],
        )?;
        Ok(Some(out))
    }

    /// `x [T, K] · wᵀ` for a decode step's few rows (bf16 `x`, T ≤ [`DENSE_SMALL_MAX_ROWS`], or ≤
    /// [`dense_fp8_max_rows`] for e4m3 weights), with
    /// `w [N, K]` as a linear layer stores it (bf16, or e4m3 with block scales) → `[T, N]` bf16 (dense.cu: the weights streamed through the tensor cores, e4m3
    /// dequantised in registers, f32 sums rounded once). With `gate_up`, `w` is an MLP's stacked
    /// `[2·N, K]` gate and up rows and the result is `silu(x·Wgᵀ) ⊙ (x·Wuᵀ)`, `[T, N]`. `None`
    /// when the kernel does not take the shapes (K a multiple of 64, N of 16, contiguous
    /// 16-byte-aligned operands) or `MOEMESH_DENSE_MMA=0`. e4m3 weights past dense.cu's rows
    /// ([`dense_fp8_max_rows`]), up to [`DENSE_FP8_SPLIT_MAX_ROWS`], take experts_fp8.cu's
    /// `dense_fp8_sk` instead (the weight read once over k ranges, no dequantised copy) where
    /// [`dense_fp8_split_enabled`] and the widths fit ([`dense_fp8_split_dims`]).
    pub fn dense_small(
        &self,
        x: &Tensor,
        w: DenseWeight<'_>,
        gate_up: bool,
    ) -> Result<Option<Tensor>> {
        let Some((t, k)) = bf16_rows(x) else {
            return Ok(None);
        };
        if let Some(DenseShape { rows: t, n, kernel }) = dense_small_dims(t, k, w, gate_up) {
            let y = self.alloc(DType::BF16, &[t, n])?;
            self.launch_dense(x, w, kernel, &y)?;
            return Ok(Some(y));
        }
        if let DenseWeight::Fp8 { q, scale } = w
            && dense_fp8_split_enabled()
            && let Some(shape) = dense_fp8_split_dims(t, k, w, gate_up, dense_fp8_max_rows())
        {
            return self.dense_fp8_split(x, q, scale, gate_up, shape).map(Some);
        }
        Ok(None)
    }

    /// `x [T, K] · qᵀ` (or the SwiGLU form) through experts_fp8.cu's `dense_fp8_sk`: the weight
    /// read once, its columns and k range spread over `shape`'s blocks, each k range's f32 sums
    /// added (and the SwiGLU applied) by `dense_fp8_sk_sum` / `_swiglu` into `[T, N]` bf16.
    fn dense_fp8_split(
        &self,
        x: &Tensor,
        q: &Tensor,
        scale: &Tensor,
        gate_up: bool,
        shape: SplitShape,
    ) -> Result<Tensor> {
        let (t, k) = x.dims2()?;
        let SplitShape { n, tiles, splits } = shape;
        let part = self.alloc(DType::F32, &[splits, t, if gate_up { 2 * n } else { n }])?;
        let (kernel, add) = if gate_up {
            ("dense_fp8_sk_gate_up", "dense_fp8_sk_swiglu")
        } else {
            ("dense_fp8_sk", "dense_fp8_sk_sum")
        };
        let tiles = u32::try_from(tiles).map_err(|_| {
            EngineError::InvalidInput(format!("an output width of {n} is too large"))
        })?;
        self.launch(
            kernel,
            (tiles, 1, splits as u32),
            128,
            DENSE_FP8_SK_SMEM,
            &[
                Arg::Ptr(self.ptr(x)?),
                i32_arg(t, "rows")?,
                i32_arg(k, "input width")?,
                Arg::Ptr(self.ptr(q)?),
                Arg::Ptr(self.ptr(scale)?),
                i32_arg(n, "output width")?,
                Arg::Ptr(self.ptr(&part)?),
            ],
        )?;
        let y = self.alloc(DType::BF16, &[t, n])?;
        let blocks = u32::try_from((t * n / 2).div_ceil(256))
            .map_err(|_| EngineError::InvalidInput(format!("{t} rows of {n} are too many")))?;
        self.launch(
            add,
            (blocks, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(&part)?),
                i32_arg(splits, "k ranges")?,
                i32_arg(t, "rows")?,
                i32_arg(n, "output width")?,
                Arg::Ptr(self.ptr(&y)?),
            ],
        )?;
        Ok(y)
    }

    /// Queues dense.cu's `kernel` for `x · wᵀ` (or the SwiGLU form) into `y`, as
    /// [`dense_small_dims`] chose them.
    fn launch_dense(&self, x: &Tensor, w: DenseWeight<'_>, kernel: &str, y: &Tensor) -> Result<()> {
        let (t, k) = x.dims2()?;
        let n = y.dim(1)?;
        let grid = ((n / 16) as u32, 1, 1);
        let head = [
            Arg::Ptr(self.ptr(x)?),
            i32_arg(t, "rows")?,
            i32_arg(k, "input width")?,
        ];
        let tail = [i32_arg(n, "output width")?, Arg::Ptr(self.ptr(y)?)];
        let weights = match w {
            DenseWeight::Bf16(w) => vec![Arg::Ptr(self.ptr(w)?)],
            DenseWeight::Fp8 { q, scale } => {
                vec![Arg::Ptr(self.ptr(q)?), Arg::Ptr(self.ptr(scale)?)]
            }
        };
        let args = [&head[..], &weights[..], &tail[..]].concat();
        self.launch(kernel, grid, 256, 0, &args)
    }

    /// An e4m3 weight `q [R, C]` with its block scales `[⌈R/128⌉, ⌈C/128⌉]` dequantised to bf16
    /// in one pass (the values [`Gpu::dense_small`]'s FP8 kernel multiplies, the same as
    /// `weights::fp8::dequantize_matrix` to bf16). `None` where the kernel does not take it
    /// (C not a multiple of 8, a view not 8-byte aligned).
    pub fn fp8_dequant_bf16(&self, q: &Tensor, scale: &Tensor) -> Result<Option<Tensor>> {
        let Ok((r, c)) = q.dims2() else {
            return Ok(None);
        };
        let w = DenseWeight::Fp8 { q, scale };
        if !w.well_formed()
            || !c.is_multiple_of(8)
            || !q.is_contiguous()
            || !self.ptr(q)?.is_multiple_of(8)
            || r * c == 0
        {
            return Ok(None);
        }
        let out = self.alloc(DType::BF16, &[r, c])?;
        let threads = (r * c / 8) as u64;
        let blocks = u32::try_from(threads.div_ceil(256)).map_err(|_| {
            EngineError::InvalidInput(format!("an e4m3 weight of {r} × {c} is too large"))
        })?;
        self.launch(
            "fp8_dequant_bf16",
            (blocks, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(q)?),
                Arg::Ptr(self.ptr(scale)?),
                i32_arg(r, "rows")?,
                i32_arg(c, "columns")?,
                Arg::Ptr(self.ptr(&out)?),
            ],
        )?;
        Ok(Some(out))
    }

    /// Greedy sampling of each row of f32 `logits [N, V]`: `(token, logprob)` per row, with one
    /// small copy to the host instead of the whole logits.
    pub fn argmax_logprob(&self, logits: &Tensor) -> Result<Option<Vec<(u32, f32)>>> {
        let Ok((n, v)) = logits.dims2() else {
            return Ok(None);
        };
        if logits.dtype() != DType::F32 || !logits.is_contiguous() || n == 0 || v == 0 {
            return Ok(None);
        }
        // Tokens, then the logprobs' bits: one copy back.
        let out = self.alloc(DType::U32, &[2 * n])?;
        let at = self.ptr(&out)?;
        // A few rows: a cluster of blocks a row, as the sampler takes them (one block walked a
        // row's logits twice on one multiprocessor).
        let (kernel, blocks) = if sample_cluster_rows(n) {
            ("argmax_logprob_c8", n * SAMPLE_CLUSTER)
        } else {
            ("argmax_logprob", n)
        };
        self.launch(
            kernel,
            (blocks as u32, 1, 1),
            1024,
            0,
            &[
                Arg::Ptr(self.ptr(logits)?),
                i32_arg(v, "vocabulary size")?,
                Arg::Ptr(at),
                Arg::Ptr(at + 4 * n as u64),
            ],
        )?;
        Ok(Some(tokens_and_logprobs(&out.to_vec1::<u32>()?, n)))
    }

    /// Sampling of each row of f32 `logits [N, V]` as `plans` say (engine/src/sampling.rs's
    /// semantics: penalties, suppressed ids, temperature, min_p, top_k, top_p, the Philox draw
    /// walked in id order): `(token, logprob)` per row, with the plans and the adjusted ids as
    /// the only upload and two small copies back. The logits are left as they are.
    pub fn sample(
        &self,
        logits: &Tensor,
        plans: &[crate::sampling::RowPlan],
    ) -> Result<Option<Vec<(u32, f32)>>> {
        let Ok((n, v)) = logits.dims2() else {
            return Ok(None);
        };
        if logits.dtype() != DType::F32
            || !logits.is_contiguous()
            || n == 0
            || v == 0
            || n != plans.len()
        {
            return Ok(None);
        }
        let (mut table, adjust) = crate::sampling::pack_plans(plans);
        // One upload: the row table, then the adjustment table.
        let adjust_at = table.len();
        let any_adjust = !adjust.is_empty();
        table.extend(adjust);
        let len = table.len();
        let table = Tensor::from_vec(table, len, logits.device())?;
        // Rows with adjustments read a copy of their logits with the adjustments applied.
        let work = if any_adjust {
            Some(self.alloc(DType::F32, &[n, v])?)
        } else {
            None
        };
        let work_ptr = match &work {
            Some(w) => self.ptr(w)?,
            None => 0,
        };
        let out = self.alloc(DType::U32, &[2 * n])?;
        // A few rows: a cluster of blocks a row (sampling.cu's `sample_rows_c8`), so that the
        // passes over the vocabulary run on several multiprocessors; more rows fill the GPU
        // with one block each.
        let (kernel, blocks) = if sample_cluster_rows(n) {
            ("sample_rows_c8", n * SAMPLE_CLUSTER)
        } else {
            ("sample_rows", n)
        };
        self.launch(
            kernel,
            (blocks as u32, 1, 1),
            SAMPLE_THREADS,
            SAMPLE_DYN_SMEM,
            &[
                Arg::Ptr(self.ptr(logits)?),
                Arg::Ptr(work_ptr),
                i32_arg(v, "vocabulary size")?,
                Arg::Ptr(self.ptr(&table)?),
                i32_arg(adjust_at, "sampling table")?,
                Arg::Ptr(self.ptr(&out)?),
            ],
        )?;
        Ok(Some(tokens_and_logprobs(&out.to_vec1::<u32>()?, n)))
    }

    fn ptr(&self, t: &Tensor) -> Result<u64> {
        imp::ptr(&self.inner, t)
    }

    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        imp::alloc(&self.inner, dtype, shape)
    }

    /// Loads moemesh's kernel module now (the driver compiles its PTX for this GPU, seconds at
    /// first), instead of at the first launch: at start-up, before a process takes traffic, so
    /// that the first step is not slowed by it and no process is ever stopped or killed inside
    /// that compilation while serving (under MPS, a client stopped inside the driver can hold
    /// the other clients up).
    pub fn preload(&self) -> Result<()> {
        imp::preload(&self.inner)
    }

    /// The device's free and total memory in bytes, as the driver reports them now (other
    /// processes on the GPU included).
    pub fn memory_info(&self) -> Result<(u64, u64)> {
        imp::memory_info(&self.inner)
    }

    fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        imp::launch(&self.inner, name, grid, block, smem, args)
    }

    /// Starts capturing the device's stream into a graph (relaxed mode: other threads may use
    /// the driver meanwhile). Until [`end_capture`](Self::end_capture), work queued on the
    /// stream is recorded, not run; allocations become the graph's own (fixed addresses, freed
    /// inside it when their tensors drop before the capture ends); anything that waits for the
    /// device (a copy to the host) fails and spoils the capture.
    pub fn begin_capture(&self) -> Result<()> {
        imp::begin_capture(&self.inner)
    }

    /// Runs `f` with candle's small host-to-device uploads (a strided kernel's dims and
    /// strides) served from a device cache keyed by their bytes: an eager run fills it, and a
    /// capture inside `f` then records copies from the cached device buffers instead of from
    /// host memory that is gone when the graph replays (an upload the cache lacks fails the
    /// capture).
    pub fn with_cached_uploads<R>(&self, f: impl FnOnce() -> R) -> R {
        imp::with_cached_uploads(&self.inner, f)
    }

    /// Ends a capture and returns its graph, instantiated and uploaded; an error if the
    /// capture failed. Always leaves the stream out of capture mode, with any error the capture
    /// left in the driver's context cleared.
    pub fn end_capture(&self) -> Result<StepGraph> {
        Ok(StepGraph {
            inner: imp::end_capture(&self.inner)?,
        })
    }
}

/// A projection's weight for [`Gpu::dense_small`]: `[N, K]` bf16, or e4m3 with its f32
/// 128 × 128 block scales `[⌈N/128⌉, ⌈K/128⌉]` (row r's at r / 128; a stacked gate/up weight is
/// one matrix of 2N rows to them).
#[derive(Debug, Clone, Copy)]
pub enum DenseWeight<'a> {
    Bf16(&'a Tensor),
    Fp8 { q: &'a Tensor, scale: &'a Tensor },
}

impl DenseWeight<'_> {
    fn tensor(&self) -> &Tensor {
        match self {
            DenseWeight::Bf16(w) => w,
            DenseWeight::Fp8 { q, .. } => q,
        }
    }

    /// Whether the format is one the kernel reads: bf16, or e4m3 with a scale grid of the
    /// weight's shape.
    fn well_formed(&self) -> bool {
        let fp8_block = crate::weights::fp8::KERNEL_BLOCK;
        match self {
            DenseWeight::Bf16(w) => w.dtype() == DType::BF16,
            DenseWeight::Fp8 { q, scale } => {
                q.dtype() == DType::F8E4M3
                    && scale.dtype() == DType::F32
                    && scale.is_contiguous()
                    && match (q.dims2(), scale.dims2()) {
                        (Ok((n, k)), Ok((sr, sc))) => {
                            sr == n.div_ceil(fp8_block) && sc == k.div_ceil(fp8_block)
                        }
                        _ => false,
                    }
            }
        }
    }
}

/// What [`Gpu::dense_small`] launches for a product: its rows, output width and dense.cu kernel.
#[derive(Debug, Clone, Copy)]
struct DenseShape {
    rows: usize,
    n: usize,
    kernel: &'static str,
}

/// `x`'s rows and width where [`Gpu::dense_small`]'s kernels read it: contiguous, 16-byte
/// aligned bf16 rows; `None` otherwise.
fn bf16_rows(x: &Tensor) -> Option<(usize, usize)> {
    let (t, k) = x.dims2().ok()?;
    (x.dtype() == DType::BF16 && x.is_contiguous() && aligned16(x)).then_some((t, k))
}

/// Which of dense.cu's kernels [`Gpu::dense_small`] takes `x · wᵀ` with (`gate_up`: the SwiGLU
/// form over a stacked weight) for an input of `t` contiguous, aligned bf16 rows of width `k`;
/// `None` where none does.
fn dense_small_dims(t: usize, k: usize, w: DenseWeight<'_>, gate_up: bool) -> Option<DenseShape> {
    let wt = w.tensor();
    let (wn, wk) = wt.dims2().ok()?;
    let n = if gate_up { wn / 2 } else { wn };
    let fp8 = matches!(w, DenseWeight::Fp8 { .. });
    let kernel = dense_kernel(fp8, gate_up, t, dense_fp8_max_rows())?;
    let ok = dense_mma_enabled()
        && wk == k
        && k.is_multiple_of(64)
        && n > 0
        && n.is_multiple_of(16)
        && (!gate_up || wn.is_multiple_of(2))
        && w.well_formed()
        && wt.is_contiguous()
        && aligned16(wt);
    ok.then_some(DenseShape { rows: t, n, kernel })
}

/// A captured piece of the device's work (a decode step, [`crate::graphs`]), replayed with the
/// addresses and launch shapes it was captured with.
pub struct StepGraph {
    inner: imp::Graph,
}

impl StepGraph {
    /// Queues one replay on the stream it was captured from.
    pub fn launch(&self) -> Result<()> {
        imp::launch_graph(&self.inner)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
    use candle_core::op::BackpropOp;
    use candle_core::{DType, Device, Storage, Tensor};

    use super::{Arg, Gpu};
    use crate::error::{EngineError, Result};

    use candle_core::cuda_backend::cudarc::cublas::sys::{cublasSetWorkspace_v2, cublasStatus_t};
    use candle_core::cuda_backend::cudarc::driver::sys::{
        CUgraphInstantiate_flags, CUstreamCaptureMode,
    };
    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaSlice};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/moemesh_kernels.ptx"));
    const MODULE: &str = "moemesh_kernels";

    #[derive(Clone)]
    pub struct Inner {
        dev: CudaDevice,
    }

    type TracePoint = (
        &'static str,
        candle_core::cuda_backend::cudarc::driver::CudaEvent,
        std::time::Instant,
    );
    static TRACE: std::sync::Mutex<Vec<TracePoint>> = std::sync::Mutex::new(Vec::new());

    pub fn trace_mark(device: &Device, label: &'static str) {
        use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
        let Device::Cuda(dev) = device else {
            return;
        };
        if let Ok(ev) = dev
            .cuda_stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        {
            TRACE.lock().unwrap_or_else(|e| e.into_inner()).push((
                label,
                ev,
                std::time::Instant::now(),
            ));
        }
    }

    pub fn trace_flush(what: &str, min_points: usize) {
        let points = {
            let mut t = TRACE.lock().unwrap_or_else(|e| e.into_inner());
            if t.len() < min_points.max(2) {
                return;
            }
            std::mem::take(&mut *t)
        };
        let mut steps: std::collections::BTreeMap<String, (u32, f64, f64)> = Default::default();
        for w in points.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            // Points on streams of different contexts have no common clock: left out.
            let Ok(gpu) = a.1.elapsed_ms(&b.1) else {
                continue;
            };
            let e = steps.entry(format!("{}→{}", a.0, b.0)).or_default();
            e.0 += 1;
            e.1 += f64::from(gpu);
            e.2 += (b.2 - a.2).as_secs_f64() * 1e3;
        }
        let (first, last) = (&points[0], &points[points.len() - 1]);
        let gpu_ms = first
            .1
            .elapsed_ms(&last.1)
            .map(f64::from)
            .unwrap_or(f64::NAN);
        let steps: serde_json::Map<String, serde_json::Value> = steps
            .into_iter()
            .map(|(k, (n, g, h))| (k, serde_json::json!([n, g, h])))
            .collect();
        eprintln!(
            "{}",
            serde_json::json!({
                "trace": what,
                "points": points.len(),
                "gpu_ms": gpu_ms,
                "host_ms": (last.2 - first.2).as_secs_f64() * 1e3,
                "steps": steps,
            })
        );
    }

    pub fn profiler(on: bool) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::{profiler_start, profiler_stop};
        if on {
            profiler_start()
        } else {
            profiler_stop()
        }
        .map_err(|e| cuda_err("profiler", e))
    }

    pub fn gpu(device: &Device) -> Option<Gpu> {
        match device {
            Device::Cuda(dev) if super::kernels_enabled() => Some(Gpu {
                inner: Inner { dev: dev.clone() },
            }),
            _ => None,
        }
    }

    fn cuda_err(what: &str, e: impl std::fmt::Display) -> EngineError {
        EngineError::Tensor(candle_core::Error::Msg(format!("{what}: {e}")))
    }

    /// The device address of `t`'s first element.
    pub fn ptr(inner: &Inner, t: &Tensor) -> Result<u64> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(cuda_err(
                "kernel argument",
                "tensor is not on a CUDA device",
            ));
        };
        let stream = inner.dev.cuda_stream();
        // The returned guards only record events when cudarc tracks them; moemesh runs one
        // stream per device with tracking off (services/common/src/device.rs), and the tensors
        // outlive the launch (they are borrowed by the caller), with frees ordered on the stream.
        let base = match &cs.slice {
            CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
            CudaStorageSlice::F32(s) => s.device_ptr(&stream).0,
            CudaStorageSlice::U32(s) => s.device_ptr(&stream).0,
            CudaStorageSlice::I32(s) => s.device_ptr(&stream).0,
            CudaStorageSlice::F8E4M3(s) => s.device_ptr(&stream).0,
            CudaStorageSlice::U8(s) => s.device_ptr(&stream).0,
            _ => {
                return Err(cuda_err(
                    "kernel argument",
                    format!("dtype {:?} is not used by the kernels", cs.dtype()),
                ));
            }
        };
        Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
    }

    /// A captured graph of one device's stream.
    pub struct Graph(CudaGraph);

    // SAFETY: a graph is not internally synchronised (CUDA's graph thread-safety rules), and
    // moemesh never shares one: it lives in one step runner, which only `&mut` methods reach,
    // so one thread at a time launches it. Moving it between threads is allowed by the driver.
    unsafe impl Send for Graph {}

    /// cuBLAS's workspace for the device's handle, allocated once per handle and kept for the
    /// process's life (the handle keeps using it).
    static CUBLAS_WORKSPACES: std::sync::Mutex<Vec<(usize, CudaSlice<u8>)>> =
        std::sync::Mutex::new(Vec::new());
    /// 32 MiB, what cuBLAS asks for on Hopper.
    const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

    pub fn begin_capture(inner: &Inner) -> Result<()> {
        // Without a workspace of its own, cuBLAS allocates one inside the capture (graph memory,
        // valid only while that graph runs) and keeps using it afterwards: an illegal address
        // in the next eager GEMM. Give the handle one first.
        let blas = inner.dev.cublas_handle();
        let handle = *blas.handle();
        let mut held = CUBLAS_WORKSPACES.lock().unwrap_or_else(|e| e.into_inner());
        if !held.iter().any(|(h, _)| *h == handle as usize) {
            let ws = inner.dev.alloc_zeros::<u8>(CUBLAS_WORKSPACE_BYTES)?;
            let stream = inner.dev.cuda_stream();
            let ptr = ws.device_ptr(&stream).0;
            // SAFETY: `handle` is candle's live cuBLAS handle for this device; the workspace is
            // a device allocation of the size given, kept alive (in `CUBLAS_WORKSPACES`) for as
            // long as the process, so the handle never sees it freed.
            let status = unsafe {
                cublasSetWorkspace_v2(handle, ptr as *mut std::ffi::c_void, CUBLAS_WORKSPACE_BYTES)
            };
            if status != cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(cuda_err("cublasSetWorkspace", format!("{status:?}")));
            }
            held.push((handle as usize, ws));
        }
        drop(held);
        inner
            .dev
            .cuda_stream()
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| cuda_err("begin graph capture", e))
    }

    pub fn end_capture(inner: &Inner) -> Result<Graph> {
        let stream = inner.dev.cuda_stream();
        let ended = stream.end_capture(CUgraphInstantiate_flags(0));
        // Frees queued on a spoiled capture record their errors in the context; a failed
        // capture is reported by `ended`, and the next launch must not see them.
        let leftover = stream.context().check_err();
        let graph = ended
            .map_err(|e| cuda_err("end graph capture", e))?
            .ok_or_else(|| cuda_err("end graph capture", "nothing was captured"))?;
        leftover.map_err(|e| cuda_err("graph capture", e))?;
        graph.upload().map_err(|e| cuda_err("graph upload", e))?;
        Ok(Graph(graph))
    }

    pub fn launch_graph(graph: &Graph) -> Result<()> {
        graph.0.launch().map_err(|e| cuda_err("graph launch", e))
    }

    pub fn with_cached_uploads<R>(inner: &Inner, f: impl FnOnce() -> R) -> R {
        let _cached = inner.dev.enable_cuda_graph_htod_cache();
        f()
    }

    pub fn alloc(inner: &Inner, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let n = shape.iter().product::<usize>().max(1);
        let dev = &inner.dev;
        // SAFETY: every kernel that receives a fresh output writes all of its elements before
        // anything reads them (each wrapper sizes the output to the kernel's index space).
        let storage = unsafe {
            match dtype {
                DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
                DType::BF16 => {
                    CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(n)?, dev.clone())
                }
                DType::U32 => CudaStorage::wrap_cuda_slice(dev.alloc::<u32>(n)?, dev.clone()),
                other => {
                    return Err(cuda_err("kernel output", format!("dtype {other:?}")));
                }
            }
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            shape,
            BackpropOp::none(),
            false,
        ))
    }

    pub fn memory_info(inner: &Inner) -> Result<(u64, u64)> {
        let (free, total) = inner
            .dev
            .cuda_stream()
            .context()
            .mem_get_info()
            .map_err(|e| cuda_err("cuMemGetInfo", e))?;
        Ok((free as u64, total as u64))
    }

    pub fn preload(inner: &Inner) -> Result<()> {
        inner
            .dev
            .get_or_load_custom_func("expert_count", MODULE, PTX)
            .map(|_| ())
            .map_err(|e| cuda_err("loading moemesh's kernels", e))
    }

    pub fn launch(
        inner: &Inner,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        let func = inner.dev.get_or_load_custom_func(name, MODULE, PTX)?;
        if smem > 48 * 1024 {
            // Dynamic shared memory beyond the default 48 KiB needs the kernel's opt-in.
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| cuda_err(name, e))?;
        }
        let mut b = func.builder();
        for a in args {
            match a {
                Arg::Ptr(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: each wrapper in super passes the argument list its kernel in the .cu files
        // declares (pointers as 64-bit addresses, `int` as i32, `long long` as i64), with
        // pointers into live tensors whose sizes it checked against the launch's index space.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(name, e))?;
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{DType, Device, Tensor};

    use super::{Arg, Gpu};
    use crate::error::Result;

    /// Uninhabited: a build without CUDA never hands out a [`Gpu`].
    #[derive(Clone)]
    pub enum Inner {}

    pub fn preload(inner: &Inner) -> Result<()> {
        match *inner {}
    }

    pub fn memory_info(inner: &Inner) -> Result<(u64, u64)> {
        match *inner {}
    }

    pub fn gpu(_device: &Device) -> Option<Gpu> {
        None
    }

    pub fn profiler(_on: bool) -> Result<()> {
        Ok(())
    }

    pub fn trace_mark(_device: &Device, _label: &'static str) {}

    pub fn trace_flush(_what: &str, _min_points: usize) {}

    pub fn ptr(inner: &Inner, _t: &Tensor) -> Result<u64> {
        match *inner {}
    }

    pub fn alloc(inner: &Inner, _dtype: DType, _shape: &[usize]) -> Result<Tensor> {
        match *inner {}
    }

    /// Uninhabited, as [`Inner`].
    pub enum Graph {}

    pub fn begin_capture(inner: &Inner) -> Result<()> {
        match *inner {}
    }

    pub fn end_capture(inner: &Inner) -> Result<Graph> {
        match *inner {}
    }

    pub fn launch_graph(graph: &Graph) -> Result<()> {
        match *graph {}
    }

    pub fn with_cached_uploads<R>(inner: &Inner, _f: impl FnOnce() -> R) -> R {
        match *inner {}
    }

    pub fn launch(
        inner: &Inner,
        _name: &str,
        _grid: (u32, u32, u32),
        _block: u32,
        _smem: u32,
        _args: &[Arg],
    ) -> Result<()> {
        match *inner {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_fp8_rows_default_to_16_and_report_what_they_cannot_take() {
        assert_eq!(parse_dense_fp8_rows(None), (DENSE_FP8_DEFAULT_ROWS, None));
        assert_eq!(
            parse_dense_fp8_rows(Some(" ")),
            (DENSE_FP8_DEFAULT_ROWS, None)
        );
        assert_eq!(parse_dense_fp8_rows(Some("8")), (8, None));
        assert_eq!(parse_dense_fp8_rows(Some(" 32 ")), (32, None));
        let (rows, why) = parse_dense_fp8_rows(Some("64"));
        assert_eq!(rows, 32);
        assert!(why.is_some_and(|w| w.contains("MOEMESH_DENSE_FP8_ROWS=64") && w.contains("32")));
        let (rows, why) = parse_dense_fp8_rows(Some("2"));
        assert_eq!(rows, 8);
        assert!(why.is_some_and(|w| w.contains("outside 8")));
        let (rows, why) = parse_dense_fp8_rows(Some("sixteen"));
        assert_eq!(rows, DENSE_FP8_DEFAULT_ROWS);
        assert!(why.is_some_and(|w| w.contains("\"sixteen\"") && w.contains("not a number")));
    }

    #[test]
    fn e4m3_products_past_the_dense_kernels_split_k_to_fill_the_gpu() {
        use crate::weights::fp8::KERNEL_BLOCK as B;
        let cpu = candle_core::Device::Cpu;
        let fp8 = |n: usize, k: usize| {
            let q = Tensor::zeros((n, k), DType::F8E4M3, &cpu).expect("q");
            let s = Tensor::zeros((n.div_ceil(B), k.div_ceil(B)), DType::F32, &cpu).expect("s");
            (q, s)
        };
        // V2-Lite's shared experts: gate/up [2 · 2,816, 2,048], down [2,048, 2,816].
        let (gq, gs) = fp8(2 * 2816, 2048);
        let (dq, ds) = fp8(2048, 2816);
        let gu = DenseWeight::Fp8 { q: &gq, scale: &gs };
        let down = DenseWeight::Fp8 { q: &dq, scale: &ds };
        for t in 17..=DENSE_FP8_SPLIT_MAX_ROWS {
            // 44 column blocks of 64 gate + 64 up columns: 6 k ranges of the 32 steps (264
            // blocks, two waves of 132 SMs); down 16 blocks of 128: 16 ranges (the cap).
            let want = SplitShape {
                n: 2816,
                tiles: 44,
                splits: 6,
            };
            assert_eq!(dense_fp8_split_dims(t, 2048, gu, true, 16), Some(want));
            let want = SplitShape {
                n: 2048,
                tiles: 16,
                splits: 16,
            };
            assert_eq!(dense_fp8_split_dims(t, 2816, down, false, 16), Some(want));
        }
        // Rows dense.cu takes, rows past one block row, widths that do not match: none.
        for t in [0, 1, 8, 16, DENSE_FP8_SPLIT_MAX_ROWS + 1, 256] {
            assert_eq!(
                dense_fp8_split_dims(t, 2048, gu, true, 16),
                None,
                "rows {t}"
            );
        }
        assert_eq!(
            dense_fp8_split_dims(24, 2048, gu, true, 32),
            None,
            "dense.cu's to 32"
        );
        assert!(dense_fp8_split_dims(40, 2048, gu, true, 32).is_some());
        assert_eq!(
            dense_fp8_split_dims(32, 1024, gu, true, 16),
            None,
            "k differs"
        );
        let (oq, os) = fp8(2 * 2816, 2000);
        let odd_k = DenseWeight::Fp8 { q: &oq, scale: &os };
        assert_eq!(
            dense_fp8_split_dims(32, 2000, odd_k, true, 16),
            None,
            "k % 64"
        );
        let (hq, hs) = fp8(2 * 192, 2048);
        let half_blocks = DenseWeight::Fp8 { q: &hq, scale: &hs };
        assert_eq!(
            dense_fp8_split_dims(32, 2048, half_blocks, true, 16),
            None,
            "the up rows would start inside a block row of scales"
        );
        assert!(dense_fp8_split_dims(32, 2048, half_blocks, false, 16).is_some());
        let bf = Tensor::zeros((2048, 2816), DType::BF16, &cpu).expect("bf16");
        assert_eq!(
            dense_fp8_split_dims(32, 2816, DenseWeight::Bf16(&bf), false, 16),
            None
        );
        // The k ranges: two waves' worth, at least two steps of 64 each, at most 16.
        assert_eq!(dense_fp8_splits(44, 2048), 6);
        assert_eq!(dense_fp8_splits(1, 2048), 16);
        assert_eq!(dense_fp8_splits(300, 2048), 1);
        assert_eq!(dense_fp8_splits(16, 192), 1, "three steps: one range");
        assert_eq!(dense_fp8_splits(16, 64), 1);
    }

    #[test]
    fn dense_kernels_take_bf16_to_8_rows_and_e4m3_to_32_by_groups() {
        for gu in [false, true] {
            let pre = if gu { "dense_gate_up_" } else { "dense_" };
            let name = |fp8, t, most| dense_kernel(fp8, gu, t, most);
            assert_eq!(name(false, 0, 32), None);
            assert_eq!(name(true, 0, 32), None);
            for t in 1..=8 {
                assert_eq!(
                    name(false, t, 32),
                    Some(format!("{pre}mma_bf16")).as_deref()
                );
                assert_eq!(name(true, t, 32), Some(format!("{pre}mma_fp8")).as_deref());
                assert_eq!(name(true, t, 8), Some(format!("{pre}mma_fp8")).as_deref());
            }
            for t in 9..=16 {
                assert_eq!(
                    name(false, t, 32),
                    None,
                    "bf16 weights: cuBLAS beyond 8 rows"
                );
                assert_eq!(
                    name(true, t, 32),
                    Some(format!("{pre}rows16_fp8")).as_deref()
                );
                assert_eq!(
                    name(true, t, 8),
                    None,
                    "MOEMESH_DENSE_FP8_ROWS=8: as before"
                );
            }
            for t in 17..=32 {
                assert_eq!(
                    name(true, t, 32),
                    Some(format!("{pre}rows32_fp8")).as_deref()
                );
                assert_eq!(name(true, t, 16), None);
            }
            // Beyond 32 rows (and beyond any setting) e4m3 weights are dequantised for cuBLAS.
            assert_eq!(name(true, 33, 32), None);
            assert_eq!(name(true, 33, 64), None);
            assert_eq!(name(true, 64, usize::MAX), None);
        }
    }

    #[test]
    fn host_assignments_sort_pairs_by_slot_and_keep_each_rows_order() {
        // (row, slot, weight): row 0 uses slots 1 then 0, row 2 slot 0, row 1 nothing.
        let a = [(0, 1, 0.5), (2, 0, 0.25), (0, 0, 1.0)];
        let h = HostAssignments::build(3, 2, &a, &Device::Cpu).expect("build");
        let packed = h.packed.to_vec1::<u32>().expect("packed");
        // Slot offsets: slot 0 holds pairs 0..2 (rows 2 and 0, in assignment order), slot 1 pair 2.
        assert_eq!(&packed[..3], &[0, 2, 3]);
        assert_eq!(&packed[3..6], &[2, 0, 0]);
        // Row ranges: row 0 has entries 0..2, row 1 none, row 2 entry 2.
        assert_eq!(&packed[6..10], &[0, 2, 2, 3]);
        // Row 0's entries in assignment order: (slot 1 → sorted pair 2), (slot 0 → pair 1); row 2
        // → pair 0.
        assert_eq!(&packed[10..], &[2, 1, 0]);
        assert_eq!(h.weights.to_vec1::<f32>().expect("w"), vec![0.5, 1.0, 0.25]);
        assert_eq!((h.slots, h.pairs, h.rows), (2, 3, 3));
    }

    #[test]
    fn host_pairs_go_in_row_order_and_keep_each_rows_order() {
        // (row, slot, weight): row 2 uses slot 0, row 0 slots 1 then 0, row 1 nothing.
        let a = [(2, 0, 0.25), (0, 1, 0.5), (0, 0, 1.0)];
        let h = HostPairs::build(3, 2, &a, &Device::Cpu).expect("build");
        let packed = h.packed.to_vec1::<u32>().expect("packed");
        // Pair j is entry j of its row: slots, then rows, then each row's pair range.
        assert_eq!(&packed[..3], &[1, 0, 0]);
        assert_eq!(&packed[3..6], &[0, 0, 2]);
        assert_eq!(&packed[6..], &[0, 2, 2, 3]);
        assert_eq!(h.weights.to_vec1::<f32>().expect("w"), vec![0.5, 1.0, 0.25]);
        assert_eq!((h.slots, h.pairs, h.rows), (2, 3, 3));
    }

    #[test]
    fn the_sampler_takes_clusters_for_few_rows_unless_told() {
        let auto = SampleCluster::parse(None);
        assert!(auto.takes(1) && auto.takes(SAMPLE_CLUSTER_MAX_ROWS));
        assert!(!auto.takes(SAMPLE_CLUSTER_MAX_ROWS + 1) && !auto.takes(64));
        assert_eq!(SampleCluster::parse(Some("something")), auto);
        for off in ["0", "off", "false"] {
            let never = SampleCluster::parse(Some(off));
            assert!(!never.takes(1) && !never.takes(64));
        }
        let always = SampleCluster::parse(Some("always"));
        assert!(always.takes(1) && always.takes(4096));
    }

    #[test]
    fn mesh_folds_default_to_all_and_take_a_list() {
        assert_eq!(MeshFolds::parse(None), Ok(MeshFolds::ALL));
        assert_eq!(MeshFolds::parse(Some("all")), Ok(MeshFolds::ALL));
        for off in ["none", "0", "off"] {
            assert_eq!(MeshFolds::parse(Some(off)), Ok(MeshFolds::NONE));
        }
        assert_eq!(
            MeshFolds::parse(Some("done, wait")),
            Ok(MeshFolds {
                signal: false,
                done: true,
                wait: true,
                route: false
            })
        );
        assert_eq!(
            MeshFolds::parse(Some("signal")),
            Ok(MeshFolds {
                signal: true,
                done: false,
                wait: false,
                route: false
            })
        );
        // Session 31's fold named alone; the three before it without it (for A/B runs).
        assert_eq!(
            MeshFolds::parse(Some("route")),
            Ok(MeshFolds {
                route: true,
                ..MeshFolds::NONE
            })
        );
        assert_eq!(
            MeshFolds::parse(Some("signal,done,wait")),
            Ok(MeshFolds {
                route: false,
                ..MeshFolds::ALL
            })
        );
        let e = MeshFolds::parse(Some("signal,combine")).expect_err("unknown fold");
        assert!(
            e.contains("\"combine\"") && e.contains("MOEMESH_MESH_FOLDS"),
            "{e}"
        );
    }

    #[test]
    fn combine_counters_hold_a_word_per_column_block_and_one_for_the_end() {
        // V2-Lite's 2,048 columns: 64 column blocks of 32, and the word the down kernel's
        // last column block counts on to signal a worker's call done.
        assert_eq!(combine_counter_words(2048), 65);
        assert_eq!(combine_counter_words(33), 3);
    }

    #[test]
    fn no_kernels_without_a_gpu() {
        assert!(gpu(&Device::Cpu).is_none());
    }
}
