//! The MoE kernels: routing on the device, and the routed experts as grouped products over
//! (token, expert) pairs sorted by expert — tensor cores for bf16, CUDA cores for f32 — with a
//! combine in a fixed order.

use candle_core::{DType, Device, Tensor};

use super::{Arg, Gpu, aligned16, i32_arg, is_kernel_dtype, suffix};
use crate::error::{EngineError, Result};

/// The routing of a batch, on the device: `ids [T, k]` (u32) and `weights [T, k]` (f32).
#[derive(Debug, Clone)]
pub struct DeviceRouting {
    pub ids: Tensor,
    pub weights: Tensor,
    pub k: usize,
    /// Whether the routing launch also handed the rows and this routing to expert workers'
    /// slots and signalled them ([`RouteHandoff`]): the caller then copies and signals nothing.
    pub handed_off: bool,
}

/// Most expert calls (slots) and `ready` words one [`RouteHandoff`] serves.
pub const ROUTE_HANDOFF_MAX: usize = 4;

/// A mesh decode graph's hand-off of an MoE layer's rows and routing to its expert workers,
/// done by the routing launch ([`Gpu::route_logits`]; experts.cu's `RouteHandoff`) instead of a
/// copy-and-signal launch after it: every block copies its share of the rows into each slot,
/// and the last one, once it has routed, copies the ids and weights, stores the `ready` words
/// (their values read from `table` when the kernel runs, as a graph's flags are) and adds the
/// ids to `counts`. Built by the gate ([`crate::experts::Experts::route_handoff`]).
#[derive(Clone)]
pub struct RouteHandoff {
    /// The rows the workers take: `[T, hidden]` in their dtype, contiguous.
    pub rows: Tensor,
    /// Per call (at most [`ROUTE_HANDOFF_MAX`]): the device addresses of its slot's rows, ids
    /// and weights (4-byte aligned).
    pub slots: Vec<[u64; 3]>,
    /// The `ready` words and their entries in `table` (at most [`ROUTE_HANDOFF_MAX`]).
    pub words: Vec<(u64, usize)>,
    /// `[n]` u32 on the device: the flag values of the run in progress.
    pub table: Tensor,
    /// The layer's expert load (`[E]` u32), added to after the signal; `None`: not counted.
    pub counts: Option<Tensor>,
}

impl DeviceRouting {
    /// The same routing on the host (one copy of `T·k` ids and weights).
    pub fn to_host(&self) -> Result<crate::router::Routing> {
        Ok(crate::router::Routing {
            k: self.k,
            expert_ids: self.ids.flatten_all()?.to_vec1::<u32>()?,
            weights: self.weights.flatten_all()?.to_vec1::<f32>()?,
        })
    }
}

/// An expert call's inputs read where they are (an expert worker's slot of a gate's shared
/// buffer): `x [rows, hidden]` of `dtype`, and the routing `ids [rows, k]` (u32) and `weights
/// [rows, k]` (f32), at device addresses (16-byte aligned for `x`, 4 for the routing).
#[derive(Debug, Clone, Copy)]
pub struct RowsAt {
    pub x: u64,
    pub ids: u64,
    pub weights: u64,
    pub rows: usize,
    pub hidden: usize,
    pub k: usize,
    pub dtype: DType,
}

/// A flag a call waits for in its first kernel, before it reads its inputs: the u32 at device
/// address `word` reaching `value` (cyclic order); what it saw is stored at `observed`.
#[derive(Debug, Clone, Copy)]
pub struct WaitFlag {
    pub word: u64,
    pub value: u32,
    pub observed: u64,
}

/// The end of a worker's device-ordered call, signalled by the call's last kernel where it can
/// be (the down kernel's folded combine): the u32 at `seen_from` (what the call's wait saw) copied
/// to `seen`, then `value` stored to `done`, released at system scope after the call's output.
#[derive(Debug, Clone, Copy)]
pub struct DoneFlag {
    pub seen_from: u64,
    pub seen: u64,
    pub done: u64,
    pub value: u32,
}

/// A routed sum's parts where other processes write them: up to four `[rows, cols]` f32 arrays
/// at device addresses (16-byte aligned), part `j` readable once the word of `waits[j].0`
/// reaches `table[waits[j].1]` in the cyclic order (or its release flag is set; see
/// [`FlagWait`]). `keep` holds what the addresses belong to until a kernel reading them is
/// queued.
pub struct WaitParts {
    pub parts: Vec<u64>,
    pub waits: Vec<(FlagWait, usize)>,
    pub table: Tensor,
    pub rows: usize,
    pub cols: usize,
    pub keep: std::sync::Arc<dyn std::any::Any + Send + Sync>,
}

impl WaitParts {
    /// The sum of the parts, `[rows, cols]` f32, on the table's device: the waits and the sum
    /// in one launch where it takes them, else a wait launch each, then the sum.
    pub fn sum(self) -> Result<Tensor> {
        let g = super::gpu(self.table.device()).ok_or_else(|| {
            EngineError::Internal("a routed sum's parts off the GPU kernels' devices".into())
        })?;
        let shape = [self.rows, self.cols];
        if let Some(sum) = g.wait_add_parts(&self.parts, &self.waits, &self.table, &shape)? {
            return Ok(sum);
        }
        for &(w, index) in &self.waits {
            g.wait_word(w, &self.table, index)?;
        }
        g.add_parts(&self.parts, &shape)?.ok_or_else(|| {
            EngineError::Internal(format!(
                "{} parts of [{}, {}] that the sum kernel does not take",
                self.parts.len(),
                self.rows,
                self.cols
            ))
        })
    }
}

/// A gate's device-ordered wait on a worker's flag: the flag word's device address, and the
/// [`ReleaseFlag::address`](super::ipc::ReleaseFlag::address) of the host flag that releases
/// the wait when the worker's stream fails.
#[derive(Debug, Clone, Copy)]
pub struct FlagWait {
    pub word: u64,
    pub release: u64,
}

/// The three kernel arguments of an optional [`WaitFlag`] (null word: no wait).
fn wait_args(wait: Option<&WaitFlag>) -> [Arg; 3] {
    match wait {
        Some(w) => [
            Arg::Ptr(w.word),
            Arg::I32(w.value as i32),
            Arg::Ptr(w.observed),
        ],
        None => [Arg::Ptr(0), Arg::I32(0), Arg::Ptr(0)],
    }
}

/// A launch's grid (x, y, z).
type Grid = (u32, u32, u32);

/// Copies `copy_batch` takes in one launch (experts.cu's `copy_batch`: eight pointer pairs).
const COPIES_PER_LAUNCH: usize = 8;

/// The inputs of a routed-experts call, as the kernels take them.
struct RoutedIn {
    x: u64,
    dtype: DType,
    rows: usize,
    hidden: usize,
    inner: usize,
    ids: u64,
    weights: u64,
    k: usize,
}

/// Experts up to which the routing kernels pick the top k by rank (`moe_route_e64`,
/// `moe_route_logits_e64`: every lane ranks its two experts against all at once) instead of k
/// rounds of a warp's arg-max; the same routing, bit for bit. Above it the rank's all-pairs
/// count costs more than the rounds (scripts/bench/router_bench.cu).
const ROUTE_RANK_MAX_EXPERTS: usize = 64;

/// Tokens up to which a routed call given combine counters folds the combine into the down
/// kernel (`moe_down_mma`'s tail: its last block per column block sums those columns of every
/// token, so the tail grows with the tokens; a decode step's few rows).
pub const FOLD_MAX_TOKENS: usize = 16;

/// Words of combine counters a routed call needs: one per 32 columns of `hidden`, and one that
/// counts the column blocks done (a [`DoneFlag`] signalled by the down kernel).
pub const fn combine_counter_words(hidden: usize) -> usize {
    hidden.div_ceil(32) + 1
}

/// Combine counters for routed calls of `hidden` columns on `device`'s stream (zeros, which the
/// kernels leave as they found them): `None` off CUDA devices. One stream's: two launches at
/// once must not share them (an expert worker keeps one per session stream).
pub fn combine_counters(device: &Device, hidden: usize) -> Result<Option<Tensor>> {
    if !device.is_cuda() {
        return Ok(None);
    }
    Ok(Some(Tensor::zeros(
        combine_counter_words(hidden),
        DType::U32,
        device,
    )?))
}

/// The folded combine's arguments (device addresses; all 0: no fold).
#[derive(Debug, Clone, Copy, Default)]
struct CombineFold {
    pos: u64,
    weights: u64,
    tokens: usize,
    k: usize,
    out: u64,
    counters: u64,
    done: Option<DoneFlag>,
}

/// One MoE layer's stacked routed-expert weights, as the expert kernels read them: bf16 or f32
/// (the compute dtype), e4m3 with f32 block scales (experts_fp8.cu), or INT4 with group scales
/// (experts_int4.cu). The quantised kernels dequantise in registers or shared memory to the very
/// bf16 values the load-time dequantisation gives, then run the bf16 kernels' products: the
/// results are bit-identical.
#[derive(Debug, Clone, Copy)]
pub struct ExpertWeights<'a> {
    /// `[slots · 2I, hidden]`: slot s's gate rows `2sI..2sI+I`, then its up rows (INT4: two
    /// values a byte, `[slots · 2I, hidden / 2]` u8).
    pub gate_up: &'a Tensor,
    /// `[slots, hidden, I]` (INT4: `[slots, hidden, I / 2]` u8).
    pub down: &'a Tensor,
    /// What the values need besides themselves.
    pub quant: ExpertQuant<'a>,
    /// Whether prefill-sized bf16 and FP8 batches may take the wgmma grouped GEMM (`moe_ws_*`,
    /// `moe_ws_*_fp8`: the e4m3 tiles dequantised into the bf16 ones, the same products). INT4
    /// weights have only the mma.sync form (`moe_gg_*_int4`); the kernel checks set this alike
    /// on both sides so that both run the same products.
    pub wgmma: bool,
    /// Average pairs per held expert from which a batch takes the grouped GEMM
    /// ([`grouped_min_pairs_per_slot`] of the format; the kernel checks give the bf16 side the
    /// quantised side's, so that both run the same products).
    pub grouped_from: f64,
}

/// The format of [`ExpertWeights`]' stacks beyond their dtype.
#[derive(Debug, Clone, Copy)]
pub enum ExpertQuant<'a> {
    /// In the compute dtype.
    None,
    /// e4m3, with their 128 × 128 block scales (`weight_scale_inv`, f32), each expert's gate,
    /// up and down matrices with their own (partial edge blocks included):
    /// `[slots · 2 · ⌈I/128⌉, ⌈hidden/128⌉]` (gate blocks, then up, per slot) and
    /// `[slots, ⌈hidden/128⌉, ⌈I/128⌉]`.
    Fp8 {
        gate_up: &'a Tensor,
        down: &'a Tensor,
    },
    /// INT4 (compressed-tensors' nibbles, [`crate::weights::int4::Int4Tensor`]), with the
    /// groups of the gate/up rows (`[slots · 2I, ⌈hidden/G⌉]`) and of the down rows
    /// (`[slots · hidden, ⌈I/G'⌉]`).
    Int4 {
        gate_up: Int4Groups<'a>,
        down: Int4Groups<'a>,
    },
}

/// An INT4 stack's group scales and zero points, one per (row, group of input columns).
#[derive(Debug, Clone, Copy)]
pub struct Int4Groups<'a> {
    /// `[rows, ⌈columns / group⌉]` f32.
    pub scale: &'a Tensor,
    /// The same shape in u8 nibble values, or `None`: every zero point is 8 (symmetric).
    pub zero: Option<&'a Tensor>,
    /// Input columns per group: the kernels take powers of two from 16 (a lane's values of a
    /// k chunk then share one group).
    pub group: usize,
}

impl Int4Groups<'_> {
    /// Whether the INT4 kernels take a group size.
    pub fn kernel_group(group: usize) -> bool {
        group.is_power_of_two() && group >= 16
    }

    /// Whether these groups cover a `[rows, cols]` matrix stack as the kernels read them.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        let shape = [rows, cols.div_ceil(self.group.max(1))];
        Self::kernel_group(self.group)
            && self.scale.dtype() == DType::F32
            && self.scale.is_contiguous()
            && self.scale.dims() == shape
            && self
                .zero
                .is_none_or(|z| z.dtype() == DType::U8 && z.is_contiguous() && z.dims() == shape)
    }
}

impl<'a> ExpertWeights<'a> {
    /// Weights in the compute dtype.
    pub fn dense(gate_up: &'a Tensor, down: &'a Tensor) -> Self {
        ExpertWeights {
            gate_up,
            down,
            quant: ExpertQuant::None,
            wgmma: true,
            grouped_from: grouped_min_pairs_per_slot(&ExpertQuant::None),
        }
    }
}

impl ExpertQuant<'_> {
    /// The kernels' name suffix for this format.
    fn suffix(&self) -> &'static str {
        match self {
            ExpertQuant::None => "",
            ExpertQuant::Fp8 { .. } => "_fp8",
            ExpertQuant::Int4 { .. } => "_int4",
        }
    }
}

/// Router constants the routing kernel needs (see engine/src/router.rs for their meaning).
pub struct RouteParams<'a> {
    pub bias: Option<&'a Tensor>,
    pub softmax: bool,
    /// 0 greedy, 1 group_limited_greedy, 2 noaux_tc.
    pub method: i32,
    pub k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub normalise: bool,
    pub scale: bool,
    pub scaling: f32,
}

/// Routed-expert assignments built on the host (an expert worker's request): pairs sorted by
/// slot, and for each token row the positions of its pairs, with their weights.
pub struct HostAssignments {
    /// `[slots + 1 | pairs | rows + 1 | pairs]` (u32): slot offsets, each sorted pair's token
    /// row, each row's entry range, each entry's sorted pair.
    pub packed: Tensor,
    /// `[pairs]`, the weight of each entry (row order).
    pub weights: Tensor,
    pub slots: usize,
    pub pairs: usize,
    pub rows: usize,
}

impl HostAssignments {
    /// From `(row, slot, weight)` triples over `rows` token rows and `slots` held experts.
    pub fn build(
        rows: usize,
        slots: usize,
        assignments: &[(usize, usize, f32)],
        device: &Device,
    ) -> Result<Self> {
        let pairs = assignments.len();
        let mut offsets = vec![0u32; slots + 1];
        for &(_, s, _) in assignments {
            offsets[s + 1] += 1;
        }
        for s in 0..slots {
            offsets[s + 1] += offsets[s];
        }
        let mut cursor = offsets.clone();
        let mut sorted_rows = vec![0u32; pairs];
        let mut pos_of = vec![0u32; pairs];
        for (i, &(r, s, _)) in assignments.iter().enumerate() {
            let q = cursor[s];
            cursor[s] += 1;
            sorted_rows[q as usize] = r as u32;
            pos_of[i] = q;
        }
        // Entries grouped by row, each row's in assignment order (fixed summation order).
        let mut row_ptr = vec![0u32; rows + 1];
        for &(r, _, _) in assignments {
            row_ptr[r + 1] += 1;
        }
        for r in 0..rows {
            row_ptr[r + 1] += row_ptr[r];
        }
        let mut fill = row_ptr.clone();
        let mut entry_pos = vec![0u32; pairs];
        let mut entry_w = vec![0f32; pairs];
        for (i, &(r, _, w)) in assignments.iter().enumerate() {
            let at = fill[r] as usize;
            fill[r] += 1;
            entry_pos[at] = pos_of[i];
            entry_w[at] = w;
        }
        let mut packed = offsets;
        packed.extend_from_slice(&sorted_rows);
        packed.extend_from_slice(&row_ptr);
        packed.extend_from_slice(&entry_pos);
        let n = packed.len();
        Ok(HostAssignments {
            packed: Tensor::from_vec(packed, n, device)?,
            weights: Tensor::from_vec(entry_w, pairs, device)?,
            slots,
            pairs,
            rows,
        })
    }
}

/// Routed-expert pairs built on the host for the grouped GEMM (an expert worker's prefill-sized
/// request): the pairs in token-row order, so that pair j is entry j of its row.
pub struct HostPairs {
    /// `[pairs | pairs | rows + 1]` (u32): each pair's slot, its token row, each row's pair range.
    pub packed: Tensor,
    /// `[pairs]`: each pair's weight.
    pub weights: Tensor,
    pub slots: usize,
    pub pairs: usize,
    pub rows: usize,
}

impl HostPairs {
    /// From `(row, slot, weight)` triples over `rows` token rows and `slots` held experts; each
    /// row keeps its triples' order (the combine's fixed summation order).
    pub fn build(
        rows: usize,
        slots: usize,
        assignments: &[(usize, usize, f32)],
        device: &Device,
    ) -> Result<Self> {
        let pairs = assignments.len();
        let mut order: Vec<usize> = (0..pairs).collect();
        order.sort_by_key(|&i| assignments[i].0);
        let mut packed = Vec::with_capacity(2 * pairs + rows + 1);
        packed.extend(order.iter().map(|&i| assignments[i].1 as u32));
        packed.extend(order.iter().map(|&i| assignments[i].0 as u32));
        let mut row_ptr = vec![0u32; rows + 1];
        for &(r, _, _) in assignments {
            row_ptr[r + 1] += 1;
        }
        for r in 0..rows {
            row_ptr[r + 1] += row_ptr[r];
        }
        packed.extend_from_slice(&row_ptr);
        let weights: Vec<f32> = order.iter().map(|&i| assignments[i].2).collect();
        let n = packed.len();
        Ok(HostPairs {
            packed: Tensor::from_vec(packed, n, device)?,
            weights: Tensor::from_vec(weights, pairs, device)?,
            slots,
            pairs,
            rows,
        })
    }
}

/// Rows of one block of the grouped GEMM (`GG_BM` in experts.cu): each expert's segment is
/// padded to a multiple of it.
const GG_BM: usize = 64;
/// Columns of one block of the grouped GEMM (`GG_BN` in experts.cu).
const GG_BN: usize = 128;
/// Rows, columns, threads and shared memory of one block of the warp-specialised wgmma form
/// (`moe_ws_*_n256` and `WS_SMEM(128, 256, 4)` in experts.cu).
const WS_BM: usize = 128;
const WS_BN: usize = 256;
const WS_THREADS: u32 = 384;
const WS_SMEM: usize = 4 * (WS_BM + WS_BN) * 64 * 2 + 1024 + 16 * 4;
/// The same with e4m3 weights. The default (`moe_ws_*_fp8_n256c`, experts_fp8.cu's
/// `WsFp8ConsumerLoader`): `WS_FP8C_STAGES` stages of activations and e4m3 tiles, two bf16 tiles
/// the consumers dequantise into. The loader-dequantising form (`moe_ws_*_fp8_n256`,
/// `WsFp8Loader`): `WS_FP8_STAGES` bf16 stages and `WS_FP8_SLOTS` e4m3 staging slots.
const WS_FP8C_STAGES: usize = 5;
const WS_FP8C_SMEM: usize =
    WS_FP8C_STAGES * (WS_BM * 2 + WS_BN) * 64 + 2 * WS_BN * 64 * 2 + 1024 + 16 * WS_FP8C_STAGES;
const WS_FP8_STAGES: usize = 4;
const WS_FP8_SLOTS: usize = 2;
const WS_FP8_SMEM: usize = WS_FP8_STAGES * (WS_BM + WS_BN) * 64 * 2
    + 1024
    + 16 * WS_FP8_STAGES
    + WS_FP8_SLOTS * WS_BN * 64;

/// Which wgmma form FP8 experts take: the consumers dequantising (default) or the loader
/// (`MOEMESH_WS_FP8=loader`, for A/B runs; read once): the kernels' name suffix and shared
/// memory. H200, a V2-Lite layer at 8,192 tokens: gate/up 1,007 against 1,105 µs, down 502
/// against 576 (docs/BENCHMARKS.md, session 28).
fn ws_fp8_form() -> (&'static str, usize) {
    static LOADER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *LOADER.get_or_init(|| std::env::var("MOEMESH_WS_FP8").as_deref() == Ok("loader")) {
        ("", WS_FP8_SMEM)
    } else {
        ("c", WS_FP8C_SMEM)
    }
}

/// Average pairs per held expert from which the grouped GEMM takes the wgmma form: its
/// 128-row segments waste more padding than the 64-row ones, which pays only for larger
/// segments. Measured on the H100 (scripts/bench/prefill_kernels.cu, one V2-Lite layer): 48
/// pairs per expert (512 tokens) 0.533 vs 0.463 ms for the 64-row mma.sync form; 192 (2,048
/// tokens) 0.713 vs 0.811; 768 (8,192 tokens) 1.94 vs 2.84.
pub const WS_MIN_PAIRS_PER_SLOT: usize = 128;

/// Average (token, expert) pairs per held expert from which a batch of bf16 experts takes the
/// grouped GEMM (segments padded to 64 rows, tensor-core tiles, the weights streamed by cp.async
/// in 3 stages); below it the decode kernels (`moe_*_mma`), which read each expert's weights once
/// per 8 of its tokens without padding. Measured on an H200 (docs/BENCHMARKS.md, 2026-11-28,
/// V2-Lite's 64 experts, decode step in-process, ms, decode kernels / grouped): batch 8 (0.75
/// pairs per expert) 6.60 / 7.04, 16 (1.5) 8.94 / 9.10, 32 (3) 9.57 / 10.21, 64 (6) 11.35 /
/// 10.96, 128 (12) 17.68 / 11.65. (0.5 until then, measured before the decode kernels ran on the
/// tensor cores.)
pub const GROUPED_MIN_PAIRS_PER_SLOT: f64 = 4.0;

/// The same for FP8 and INT4 experts, whose grouped GEMM dequantises each weight tile in shared
/// memory (one more pass and barrier per k step) while the decode kernels do it in registers:
/// the same measurement, FP8 / INT4, decode kernels against grouped: batch 64 (6 pairs per
/// expert) 10.60 / 11.63 and 10.43 / 12.69 ms, batch 128 (12) 15.88 / 12.41 and 15.51 / 13.56.
pub const GROUPED_MIN_PAIRS_PER_SLOT_QUANTISED: f64 = 8.0;

/// INT4's, since its decode kernels walk 128-wide chunks (2026-11-28, H200, V2-Lite in groups
/// of 128, decode step in-process, ms): batch 128 (12 pairs per expert) 11.60 through the decode
/// kernels against 13.78 through the grouped GEMM; batch 256 (24) 18.97 against 15.35. (FP8 at
/// batch 128: 12.83 against 12.97, no gain: it keeps 8.)
pub const GROUPED_MIN_PAIRS_PER_SLOT_INT4: f64 = 16.0;

/// The grouped GEMM's block shape, kernels, threads and shared memory for a weight format:
/// the wgmma form (bf16 and FP8, where `wgmma`), or k steps of 64 in 3 stages where both widths
/// allow, else of 32 in 4 (experts.cu); e4m3 weights the same mma.sync tiles (experts_fp8.cu),
/// whose shared memory holds each stage's e4m3 weight tile and one bf16 tile they are
/// dequantised into; INT4 the same with a quarter of bf16's bytes staged (experts_int4.cu).
struct GgPlan {
    bm: usize,
    bn: usize,
    gate_up_fn: String,
    down_fn: String,
    threads: u32,
    smem: usize,
}

impl GgPlan {
    fn new(w: &ExpertWeights, hidden: usize, inner: usize, wgmma: bool) -> GgPlan {
        let gg_smem = |bk: usize, stages: usize| match w.quant {
            ExpertQuant::None => stages * (GG_BM + GG_BN) * bk * 2,
            ExpertQuant::Fp8 { .. } => stages * (GG_BM * 2 + GG_BN) * bk + GG_BN * bk * 2,
            ExpertQuant::Int4 { .. } => stages * (GG_BM * 2 * bk + GG_BN * bk / 2) + GG_BN * bk * 2,
        };
        let sfx = w.quant.suffix();
        let gg = |bk: usize, stages: usize| GgPlan {
            bm: GG_BM,
            bn: GG_BN,
            gate_up_fn: format!("moe_gg_gate_up{sfx}_k{bk}"),
            down_fn: format!("moe_gg_down{sfx}_k{bk}"),
            threads: 128,
            smem: gg_smem(bk, stages),
        };
        if wgmma {
            let (form, smem) = match w.quant {
                ExpertQuant::Fp8 { .. } => ws_fp8_form(),
                _ => ("", WS_SMEM),
            };
            GgPlan {
                bm: WS_BM,
                bn: WS_BN,
                gate_up_fn: format!("moe_ws_gate_up{sfx}_n256{form}"),
                down_fn: format!("moe_ws_down{sfx}_n256{form}"),
                threads: WS_THREADS,
                smem,
            }
        } else if hidden.is_multiple_of(64) && inner.is_multiple_of(64) {
            gg(64, 3)
        } else {
            gg(32, 4)
        }
    }
}

/// [`GROUPED_MIN_PAIRS_PER_SLOT`] (bf16 and f32 weights),
/// [`GROUPED_MIN_PAIRS_PER_SLOT_QUANTISED`] (FP8) or [`GROUPED_MIN_PAIRS_PER_SLOT_INT4`], or `MOEMESH_GROUPED_MIN_PAIRS` where set (read once;
/// a positive number, fractions allowed; every format), for A/B runs of where the grouped GEMM
/// takes over.
pub fn grouped_min_pairs_per_slot(quant: &ExpertQuant) -> f64 {
    static N: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    let set = *N.get_or_init(|| {
        std::env::var("MOEMESH_GROUPED_MIN_PAIRS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &f64| n > 0.0 && n.is_finite())
    });
    set.unwrap_or(match quant {
        ExpertQuant::None => GROUPED_MIN_PAIRS_PER_SLOT,
        ExpertQuant::Fp8 { .. } => GROUPED_MIN_PAIRS_PER_SLOT_QUANTISED,
        ExpertQuant::Int4 { .. } => GROUPED_MIN_PAIRS_PER_SLOT_INT4,
    })
}

/// Whether the decode kernels take the 128-wide chunk forms (`_fp8w`, `_int4w`) for a product
/// over `k` input columns (`hidden` for gate/up, `inner` for down) of weights in `quant`: e4m3,
/// or INT4 in groups of 128 or more (a chunk within one group), where `k` is a multiple of 128.
/// A row's chunk is then 128 bytes for e4m3 and 64 for INT4, twice the 64-wide walk's: 8–18%
/// faster at V2-Lite's shapes (docs/BENCHMARKS.md, session 24), the sums in another order.
pub fn takes_wide_chunks(quant: &ExpertQuant, k: usize, gate_up: bool) -> bool {
    let quant_ok = match quant {
        ExpertQuant::Fp8 { .. } => true,
        ExpertQuant::Int4 { gate_up: g, down } => (if gate_up { g } else { down }).group >= 128,
        ExpertQuant::None => false,
    };
    quant_ok && k.is_multiple_of(128)
}

/// Shared memory of `moe_gate_up_bulk_fp8h` (experts_fp8.cu's `BULK_SMEM`): 3 stages of 32 rows
/// of 2,048 + 16 bytes, two reduction buffers of 8 warps × 32 lanes × 8 f32, a stage's 32 scales
/// each, and 6 barriers.
const BULK_SMEM: usize = 3 * 32 * (2048 + 16) + 2 * 8 * 32 * 8 * 4 + 3 * 32 * 4 + 2 * 3 * 8;
// Within sm_90's 227 KiB of shared memory a block.
const _: () = assert!(BULK_SMEM <= 227 * 1024);
/// Its block: 8 consumer warps and the producer warp.
const BULK_THREADS: u32 = 32 * 9;

/// Whether a decode step's FP8 gate/up product takes `moe_gate_up_bulk_fp8h` (experts_fp8.cu):
/// the weights streamed into shared memory by the copy engine, e4m3 read as f16, the block scales
/// on each 128-wide chunk's f32 sums. Needs Hopper ([`super::bulk_decode_enabled`]), a hidden size
/// that is a multiple of 128 and at most 2,048 (a stage holds 32 whole rows; V2-Lite's 2,048,
/// not V3's 7,168), the list of experts with pairs (the routed entry), and at least
/// [`bulk_min_pairs`] pairs: its grid holds every SM's shared memory, so a call of a few pairs,
/// latency-bound, waits for (or holds up) whatever else runs on the GPU (two expert workers on
/// one GPU). 8–14% less time for a V2-Lite layer's routed experts at batches 1 to 64
/// (docs/BENCHMARKS.md, session 29).
pub fn takes_bulk_gate_up(quant: &ExpertQuant, hidden: usize, inner: usize, pairs: usize) -> bool {
    super::bulk_decode_enabled() && bulk_fits(quant, hidden, inner, pairs, bulk_min_pairs())
}

/// [`takes_bulk_gate_up`]'s rule, the build and the environment aside.
fn bulk_fits(quant: &ExpertQuant, hidden: usize, inner: usize, pairs: usize, min: usize) -> bool {
    matches!(quant, ExpertQuant::Fp8 { .. })
        && pairs >= min
        && hidden.is_multiple_of(128)
        && hidden <= 2048
        && inner.is_multiple_of(16)
}

/// Pairs from which a decode call's FP8 gate/up takes the bulk-copy kernel
/// ([`takes_bulk_gate_up`]): `MOEMESH_FP8_BULK_MIN_PAIRS` (read once), else 8 (a batch of 2
/// in-process; 3 pairs a worker at batch 1 through a mesh of two stay on the register walk).
pub fn bulk_min_pairs() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("MOEMESH_FP8_BULK_MIN_PAIRS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(BULK_MIN_PAIRS)
    })
}
const BULK_MIN_PAIRS: usize = 8;

/// Whether `pairs` (token, expert) pairs over `slots` experts take the grouped GEMM, for the
/// weights `w` ([`ExpertWeights::grouped_from`]).
pub fn takes_grouped(pairs: usize, slots: usize, w: &ExpertWeights) -> bool {
    pairs as f64 >= w.grouped_from * slots as f64
}

impl Gpu {
    /// Adds to `counts` (`[E]` u32, E ≤ 1024) how many of `ids` (u32, contiguous, any shape)
    /// name each expert; ids ≥ E are left out. One launch, no host sync: the gate's per-layer
    /// expert load. `false` (nothing done) where the tensors do not fit.
    pub fn count_experts(&self, ids: &Tensor, counts: &Tensor) -> Result<bool> {
        let Some(e) = Self::count_fits(ids, counts) else {
            return Ok(false);
        };
        let n = ids.elem_count();
        if n == 0 {
            return Ok(true);
        }
        let blocks = n.div_ceil(2048).min(super::SMS) as u32;
        self.launch(
            "expert_count",
            (blocks, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(ids)?),
                i32_arg(n, "expert ids")?,
                i32_arg(e, "experts")?,
                Arg::Ptr(self.ptr(counts)?),
            ],
        )?;
        Ok(true)
    }

    /// The experts E of `counts` when [`count_experts`](Self::count_experts) (and
    /// [`copy_batch_signal`](Self::copy_batch_signal)'s count) take these tensors.
    fn count_fits(ids: &Tensor, counts: &Tensor) -> Option<usize> {
        let e = counts.dims1().ok()?;
        (ids.dtype() == DType::U32
            && counts.dtype() == DType::U32
            && e <= 1024
            && ids.is_contiguous()
            && counts.is_contiguous())
        .then_some(e)
    }

    /// Queues a one-thread kernel that stores `table[i]` (u32, on this device) to the u32 at
    /// device address `w` (a peer's flag, mapped into this process), for each `(w, i)` (four
    /// to a launch), after everything queued before it: flag writes whose values are read when
    /// the kernel runs, so that a CUDA graph can carry them (see
    /// [`crate::cuda::ipc::Region::word_address`]).
    pub fn signal_words(&self, words: &[(u64, usize)], table: &Tensor) -> Result<()> {
        for chunk in words.chunks(4) {
            let args = self.signal_args(chunk, table, "flag_signal_n")?;
            self.launch("flag_signal_n", (1, 1, 1), 1, 0, &args)?;
        }
        Ok(())
    }

    /// The arguments of the kernels that store table entries to up to four flag words
    /// (experts.cu's `store_from_table`: `flag_signal_n`, the tail of `copy_batch_signal`):
    /// four words, the table, four entries, the count.
    fn signal_args(&self, words: &[(u64, usize)], table: &Tensor, name: &str) -> Result<Vec<Arg>> {
        if words.len() > 4 {
            return Err(EngineError::Internal(format!(
                "{name}: {} flag words (at most 4)",
                words.len()
            )));
        }
        for &(word, i) in words {
            Self::check_flag(table, i, word, name)?;
        }
        let mut args = Vec::with_capacity(10);
        for j in 0..4 {
            args.push(Arg::Ptr(words.get(j).map_or(0, |w| w.0)));
        }
        args.push(Arg::Ptr(self.ptr(table)?));
        for j in 0..4 {
            args.push(i32_arg(
                words.get(j).map_or(0, |w| w.1),
                "flag table entry",
            )?);
        }
        args.push(i32_arg(words.len(), "flag words")?);
        Ok(args)
    }

    /// Queues a one-thread kernel that waits until the flag `w.word` reaches `table[index]` in
    /// the cyclic order (`(i32)(word - value) >= 0`), or its release flag is set; nothing queued
    /// after it runs before. The flag is written by a peer; one that never comes holds the
    /// stream until the host sets `w.release` (see [`super::ipc::ReleaseFlag`]), so callers
    /// bound it with a deadline.
    pub fn wait_word(&self, w: FlagWait, table: &Tensor, index: usize) -> Result<()> {
        Self::check_flag(table, index, w.word, "flag_wait_geq")?;
        self.flag_wait(w, Arg::Ptr(self.ptr(table)?), index, 0)
    }

    /// [`wait_word`](Self::wait_word) for the number `value` (no table: an eager call).
    pub fn wait_value(&self, w: FlagWait, value: u32) -> Result<()> {
        if !w.word.is_multiple_of(4) {
            return Err(EngineError::Internal(format!(
                "flag_wait_geq: word at {:#x}",
                w.word
            )));
        }
        self.flag_wait(w, Arg::Ptr(0), 0, value)
    }

    fn flag_wait(&self, w: FlagWait, table: Arg, index: usize, value: u32) -> Result<()> {
        let waiting = Self::waiting_for([&w])?;
        self.launch(
            "flag_wait_geq",
            (1, 1, 1),
            1,
            0,
            &[
                Arg::Ptr(w.word),
                table,
                i32_arg(index, "flag table entry")?,
                Arg::I32(value as i32),
                Arg::Ptr(w.release),
                Arg::Ptr(waiting),
            ],
        )
    }

    /// The `waiting` record the waits on `ws` keep (every release flag lives beside it).
    fn waiting_for<'a>(ws: impl IntoIterator<Item = &'a FlagWait>) -> Result<u64> {
        let record = super::ipc::waiting_record();
        for w in ws {
            if record.is_none() || w.release == 0 || !w.release.is_multiple_of(4) {
                return Err(EngineError::Internal(format!(
                    "a device-ordered wait without a release flag: {w:?}"
                )));
            }
        }
        record.ok_or_else(|| EngineError::Internal("no release flags in this process".into()))
    }

    /// Queues a one-thread kernel that copies the u32 at `from` to `seen`, then stores `value`
    /// to `done` after everything queued before it (fence, release at system scope).
    pub fn seen_then_signal(&self, from: u64, seen: u64, done: u64, value: u32) -> Result<()> {
        self.launch(
            "flag_seen_done",
            (1, 1, 1),
            1,
            0,
            &[
                Arg::Ptr(from),
                Arg::Ptr(seen),
                Arg::Ptr(done),
                Arg::I32(value as i32),
            ],
        )
    }

    /// A new `[shape]` f32 tensor, the sum of the f32 arrays at the device addresses `parts`
    /// (1 to 4 of them, each of the shape's element count, 16-byte aligned; the expert workers'
    /// partial sums where they wrote them). `None` when the shape or the parts do not fit.
    pub fn add_parts(&self, parts: &[u64], shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(n4) = Self::parts_fit(parts, shape) else {
            return Ok(None);
        };
        let blocks = n4.div_ceil(256).min(4 * super::SMS);
        self.sum_parts("add_parts_f32", parts, shape, blocks, &[])
            .map(Some)
    }

    /// The float4 count of a sum of 1 to 4 f32 parts of `shape` at 16-byte aligned addresses,
    /// if the sum kernels take it.
    fn parts_fit(parts: &[u64], shape: &[usize]) -> Option<usize> {
        let n: usize = shape.iter().product();
        let fit = !parts.is_empty()
            && parts.len() <= 4
            && n > 0
            && n.is_multiple_of(4)
            && parts.iter().all(|p| p.is_multiple_of(16));
        fit.then_some(n / 4)
    }

    /// A new `[shape]` f32 tensor summed from `parts` by `kernel` (`add_parts_f32` or
    /// `wait_add_parts_f32`, whose arguments begin alike; `extra` are the rest).
    fn sum_parts(
        &self,
        kernel: &str,
        parts: &[u64],
        shape: &[usize],
        blocks: usize,
        extra: &[Arg],
    ) -> Result<Tensor> {
        let out = self.alloc(DType::F32, shape)?;
        let n4 = shape.iter().product::<usize>() / 4;
        let at = |i: usize| Arg::Ptr(parts.get(i).or(parts.first()).copied().unwrap_or(0));
        let mut args = vec![
            Arg::Ptr(self.ptr(&out)?),
            at(0),
            at(1),
            at(2),
            at(3),
            i32_arg(parts.len(), "parts")?,
            i32_arg(n4, "elements")?,
        ];
        args.extend_from_slice(extra);
        self.launch(kernel, (blocks as u32, 1, 1), 256, 0, &args)?;
        Ok(out)
    }

    /// [`add_parts`](Self::add_parts) after waiting for each part's flag (`waits[j]`: the flag
    /// reaching `table[index]` or released, as [`wait_word`](Self::wait_word)), in
    /// one launch. For small sums only (every block of the launch polls the flags): `None`
    /// when the sum is larger than 32 blocks' worth or the parts do not fit `add_parts`
    /// (nothing queued then).
    pub fn wait_add_parts(
        &self,
        parts: &[u64],
        waits: &[(FlagWait, usize)],
        table: &Tensor,
        shape: &[usize],
    ) -> Result<Option<Tensor>> {
        const MAX_BLOCKS: usize = 32;
        let Some(n4) = Self::parts_fit(parts, shape) else {
            return Ok(None);
        };
        if waits.len() != parts.len() || n4.div_ceil(256) > MAX_BLOCKS {
            return Ok(None);
        }
        let extra = self.wait_args(waits, table, "wait_add_parts_f32")?;
        self.sum_parts("wait_add_parts_f32", parts, shape, n4.div_ceil(256), &extra)
            .map(Some)
    }

    /// The flag arguments of the kernels that wait for up to four parts (experts.cu's
    /// `wait_add_parts_f32` and `wait_add_rms_norm_*`, alike): four words, the table, four
    /// entries, four release flags, the `waiting` record.
    pub(super) fn wait_args(
        &self,
        waits: &[(FlagWait, usize)],
        table: &Tensor,
        name: &str,
    ) -> Result<Vec<Arg>> {
        if waits.is_empty() || waits.len() > 4 {
            return Err(EngineError::Internal(format!(
                "{name}: {} flags (1 to 4)",
                waits.len()
            )));
        }
        for &(w, index) in waits {
            Self::check_flag(table, index, w.word, name)?;
        }
        let waiting = Self::waiting_for(waits.iter().map(|w| &w.0))?;
        let word = |i: usize| Arg::Ptr(waits.get(i).map_or(0, |w| w.0.word));
        let release = |i: usize| Arg::Ptr(waits.get(i).map_or(0, |w| w.0.release));
        let entry = |i: usize| i32_arg(waits.get(i).map_or(0, |w| w.1), "flag table entry");
        Ok(vec![
            word(0),
            word(1),
            word(2),
            word(3),
            Arg::Ptr(self.ptr(table)?),
            entry(0)?,
            entry(1)?,
            entry(2)?,
            entry(3)?,
            release(0),
            release(1),
            release(2),
            release(3),
            Arg::Ptr(waiting),
        ])
    }

    /// The device address of contiguous `t`'s first element (for [`copy_batch`](Self::copy_batch)).
    pub fn address(&self, t: &Tensor) -> Result<u64> {
        if !t.is_contiguous() {
            return Err(EngineError::Internal(format!(
                "the address of a non-contiguous {:?} tensor",
                t.dims()
            )));
        }
        self.ptr(t)
    }

    /// Queues `(source, destination, bytes)` copies between device addresses (4-byte aligned,
    /// whole u32 words), eight to a launch: several small copies for the price of one launch.
    pub fn copy_batch(&self, copies: &[(u64, u64, usize)]) -> Result<()> {
        for chunk in copies.chunks(COPIES_PER_LAUNCH) {
            if let Some((args, grid)) = Self::copy_args(chunk)? {
                self.launch("copy_batch", grid, 256, 0, &args)?;
            }
        }
        Ok(())
    }

    /// [`copy_batch`](Self::copy_batch) then [`signal_words`](Self::signal_words) in one launch
    /// (its last block stores the words): at most eight copies and four words, with `table`'s
    /// entry `counter` (0 between launches, this stream's) counting the blocks. With `count`
    /// (`(ids, counts)`, as [`count_experts`](Self::count_experts) takes them), the same block
    /// then adds the ids to the counts, so the expert load needs no launch of its own.
    /// `false` when the call does not fit one launch (nothing queued then, nothing counted).
    pub fn copy_batch_signal(
        &self,
        copies: &[(u64, u64, usize)],
        words: &[(u64, usize)],
        table: &Tensor,
        counter: usize,
        count: Option<(&Tensor, &Tensor)>,
    ) -> Result<bool> {
        if copies.len() > COPIES_PER_LAUNCH || words.is_empty() || words.len() > 4 {
            return Ok(false);
        }
        let count = match count {
            Some((ids, counts)) => match Self::count_fits(ids, counts) {
                Some(e) => Some((ids, counts, e)),
                None => return Ok(false),
            },
            None => None,
        };
        let Some((mut args, grid)) = Self::copy_args(copies)? else {
            return Ok(false);
        };
        Self::check_flag(table, counter, 0, "copy_batch_signal")?;
        args.push(Arg::Ptr(self.ptr(table)? + 4 * counter as u64));
        args.extend(self.signal_args(words, table, "copy_batch_signal")?);
        match count {
            Some((ids, counts, e)) if ids.elem_count() > 0 => args.extend([
                Arg::Ptr(self.ptr(ids)?),
                i32_arg(ids.elem_count(), "expert ids")?,
                i32_arg(e, "experts")?,
                Arg::Ptr(self.ptr(counts)?),
            ]),
            _ => args.extend([Arg::Ptr(0), Arg::I32(0), Arg::I32(0), Arg::Ptr(0)]),
        }
        self.launch("copy_batch_signal", grid, 256, 0, &args)?;
        Ok(true)
    }

    /// A launch of `copy_batch`'s arguments and grid for up to eight copies (`None`: nothing
    /// to copy).
    fn copy_args(chunk: &[(u64, u64, usize)]) -> Result<Option<(Vec<Arg>, Grid)>> {
        if let Some(c) = chunk
            .iter()
            .find(|(s, d, n)| !s.is_multiple_of(4) || !d.is_multiple_of(4) || !n.is_multiple_of(4))
        {
            return Err(EngineError::Internal(format!(
                "copy_batch: {c:?} is not in whole aligned u32 words"
            )));
        }
        let words = chunk.iter().map(|c| c.2 / 4).max().unwrap_or(0);
        if words == 0 || chunk.len() > COPIES_PER_LAUNCH {
            return Ok(None);
        }
        let mut args = Vec::with_capacity(3 * COPIES_PER_LAUNCH + 11);
        for i in 0..COPIES_PER_LAUNCH {
            args.push(Arg::Ptr(chunk.get(i).map_or(0, |c| c.0)));
        }
        for i in 0..COPIES_PER_LAUNCH {
            args.push(Arg::Ptr(chunk.get(i).map_or(0, |c| c.1)));
        }
        for i in 0..COPIES_PER_LAUNCH {
            args.push(i32_arg(chunk.get(i).map_or(0, |c| c.2 / 4), "copy words")?);
        }
        let blocks = words.div_ceil(4 * 256).clamp(1, 2 * super::SMS);
        Ok(Some((args, (blocks as u32, chunk.len() as u32, 1))))
    }

    /// A flag kernel's table entry and word: a u32 table holding `index`, a 4-byte aligned word.
    fn check_flag(table: &Tensor, index: usize, word: u64, name: &str) -> Result<()> {
        if table.dtype() != DType::U32 || index >= table.elem_count() || !word.is_multiple_of(4) {
            return Err(EngineError::Internal(format!(
                "{name}: entry {index} of a {:?} {:?} table, word at {word:#x}",
                table.dims(),
                table.dtype()
            )));
        }
        Ok(())
    }

    /// Whether the routing launch of `t` tokens over `e` experts takes `h`: one to four slots
    /// and words, whole aligned u32 words of rows of `t` rows, counts of `e` experts.
    fn handoff_fits(h: &RouteHandoff, t: usize, e: usize) -> bool {
        let row_bytes = h.rows.elem_count() * h.rows.dtype().size_in_bytes();
        (1..=ROUTE_HANDOFF_MAX).contains(&h.slots.len())
            && (1..=ROUTE_HANDOFF_MAX).contains(&h.words.len())
            && h.rows.dims().first() == Some(&t)
            && h.rows.is_contiguous()
            && row_bytes.is_multiple_of(4)
            && h.slots.iter().flatten().all(|a| a.is_multiple_of(4))
            && h.words
                .iter()
                .all(|&(w, i)| Self::check_flag(&h.table, i, w, "route hand-off").is_ok())
            && h.counts
                .as_ref()
                .is_none_or(|c| c.dtype() == DType::U32 && c.is_contiguous() && c.dims() == [e])
    }

    /// The routing kernels' hand-off arguments (experts.cu's ROUTE_HANDOFF_ARGS) for `h`
    /// (checked by [`handoff_fits`](Self::handoff_fits)).
    fn handoff_args(&self, h: &RouteHandoff) -> Result<Vec<Arg>> {
        let rows = self.ptr(&h.rows)?;
        if !rows.is_multiple_of(4) {
            return Err(EngineError::Internal(format!(
                "route hand-off: rows at {rows:#x} are not 4-byte aligned"
            )));
        }
        let words = h.rows.elem_count() * h.rows.dtype().size_in_bytes() / 4;
        let mut args = vec![Arg::Ptr(rows), i32_arg(words, "hand-off rows")?];
        for part in 0..3 {
            for j in 0..ROUTE_HANDOFF_MAX {
                args.push(Arg::Ptr(h.slots.get(j).map_or(0, |s| s[part])));
            }
        }
        args.push(i32_arg(h.slots.len(), "hand-off slots")?);
        for j in 0..ROUTE_HANDOFF_MAX {
            args.push(Arg::Ptr(h.words.get(j).map_or(0, |w| w.0)));
        }
        args.push(Arg::Ptr(self.ptr(&h.table)?));
        for j in 0..ROUTE_HANDOFF_MAX {
            args.push(i32_arg(
                h.words.get(j).map_or(0, |w| w.1),
                "flag table entry",
            )?);
        }
        args.push(i32_arg(h.words.len(), "flag words")?);
        args.push(Arg::Ptr(h.counts.as_ref().map_or(Ok(0), |c| self.ptr(c))?));
        Ok(args)
    }

    /// ROUTE_HANDOFF_ARGS with no hand-off (no slots).
    fn no_handoff_args() -> Vec<Arg> {
        let mut args = vec![Arg::Ptr(0), Arg::I32(0)];
        args.extend([Arg::Ptr(0); 3 * ROUTE_HANDOFF_MAX]);
        args.push(Arg::I32(0));
        args.extend([Arg::Ptr(0); ROUTE_HANDOFF_MAX]);
        args.push(Arg::Ptr(0));
        args.extend([Arg::I32(0); ROUTE_HANDOFF_MAX]);
        args.push(Arg::I32(0));
        args.push(Arg::Ptr(0));
        args
    }

    /// Whether the routing kernels take `t` tokens over `e` experts with `p`.
    fn route_fits(t: usize, e: usize, p: &RouteParams) -> bool {
        t > 0
            && e <= 256
            && p.k > 0
            && p.k <= e
            && p.k <= 16
            && p.n_group > 0
            && p.n_group <= 32
            && e.is_multiple_of(p.n_group)
            && p.topk_group > 0
    }

    /// The routing kernels' trailing arguments (after the logits' source): `e`, the router
    /// constants, and where the ids and weights go.
    fn route_args(&self, e: usize, p: &RouteParams, out: &DeviceRouting) -> Result<Vec<Arg>> {
        Ok(vec![
            i32_arg(e, "experts")?,
            Arg::Ptr(p.bias.map_or(Ok(0), |b| self.ptr(b))?),
            Arg::I32(i32::from(p.softmax)),
            Arg::I32(p.method),
            i32_arg(p.k, "top-k")?,
            i32_arg(p.n_group, "n_group")?,
            i32_arg(p.topk_group, "topk_group")?,
            Arg::I32(i32::from(p.normalise)),
            Arg::I32(i32::from(p.scale)),
            Arg::F32(p.scaling),
            Arg::Ptr(self.ptr(&out.ids)?),
            Arg::Ptr(self.ptr(&out.weights)?),
        ])
    }

    fn routing_for(&self, t: usize, k: usize) -> Result<DeviceRouting> {
        Ok(DeviceRouting {
            ids: self.alloc(DType::U32, &[t, k])?,
            weights: self.alloc(DType::F32, &[t, k])?,
            k,
            handed_off: false,
        })
    }

    /// `t` cast between f32 and e4m3 on the device (`e4m3_from_f32` / `e4m3_to_f32`): f32 → e4m3
    /// rounds to nearest even (saturating at ±448), e4m3 → f32 is exact. `None` for other
    /// dtype pairs. candle's own casts of F8E4M3 tensors fail on CUDA (a kernel-name mismatch
    /// in candle-core 0.11), so every e4m3 cast on a GPU goes through here
    /// ([`crate::weights::fp8`]).
    pub fn e4m3_cast(&self, t: &Tensor, to: DType) -> Result<Option<Tensor>> {
        let (name, out) = match (t.dtype(), to) {
            (DType::F32, DType::F8E4M3) => (
                "e4m3_from_f32",
                Tensor::zeros(t.dims(), DType::F8E4M3, t.device())?,
            ),
            (DType::F8E4M3, DType::F32) => ("e4m3_to_f32", self.alloc(DType::F32, t.dims())?),
            _ => return Ok(None),
        };
        let t = t.contiguous()?;
        let n = t.elem_count();
        if n == 0 {
            return Ok(Some(out));
        }
        self.launch(
            name,
            (n.div_ceil(256).min(65_535) as u32, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(&t)?),
                Arg::Ptr(self.ptr(&out)?),
                Arg::I64(n as i64),
            ],
        )?;
        Ok(Some(out))
    }

    /// Routing from f32 router logits `[T, E]`, on the device.
    pub fn route(&self, logits: &Tensor, p: &RouteParams) -> Result<Option<DeviceRouting>> {
        let Ok((t, e)) = logits.dims2() else {
            return Ok(None);
        };
        if logits.dtype() != DType::F32 || !logits.is_contiguous() || !Self::route_fits(t, e, p) {
            return Ok(None);
        }
        let out = self.routing_for(t, p.k)?;
        let mut args = vec![Arg::Ptr(self.ptr(logits)?), i32_arg(t, "tokens")?];
        args.extend(self.route_args(e, p, &out)?);
        // One warp per token, four per block.
        let name = if e <= ROUTE_RANK_MAX_EXPERTS {
            "moe_route_e64"
        } else {
            "moe_route"
        };
        self.launch(name, (t.div_ceil(4) as u32, 1, 1), 128, 0, &args)?;
        Ok(Some(out))
    }

    /// Router logits of `x: [T, hidden]` (f32) against `weight: [E, hidden]` (f32), plus
    /// `skew: [E]` when given, and the routing of them, in one launch (`moe_route_logits`):
    /// for a decode step's few tokens, where the logits GEMM would be two launches of its own.
    /// `counter`: a u32 device word that is 0 between launches (the kernel's last block sets it
    /// back), one per router, never used by two launches at once. `None` when the kernel does
    /// not take the shapes. With `handoff`, the same launch hands the rows and the routing to
    /// expert workers where it takes the hand-off (the routing's `handed_off` says whether).
    pub fn route_logits(
        &self,
        x: &Tensor,
        weight: &Tensor,
        skew: Option<&Tensor>,
        counter: &Tensor,
        p: &RouteParams,
        handoff: Option<&RouteHandoff>,
    ) -> Result<Option<DeviceRouting>> {
        let (Ok((t, hidden)), Ok((e, hidden_w))) = (x.dims2(), weight.dims2()) else {
            return Ok(None);
        };
        let f32_rows = |a: &Tensor| a.dtype() == DType::F32 && a.is_contiguous() && aligned16(a);
        if hidden != hidden_w
            || !hidden.is_multiple_of(4)
            || !f32_rows(x)
            || !f32_rows(weight)
            || skew.is_some_and(|s| s.dims() != [e] || s.dtype() != DType::F32)
            || counter.dtype() != DType::U32
            || counter.elem_count() != 1
            || t > crate::router::FUSED_ROUTE_MAX_TOKENS
            || !Self::route_fits(t, e, p)
        {
            return Ok(None);
        }
        let logits = self.alloc(DType::F32, &[t, e])?;
        let mut out = self.routing_for(t, p.k)?;
        let mut args = vec![
            Arg::Ptr(self.ptr(x)?),
            i32_arg(t, "tokens")?,
            i32_arg(hidden, "hidden size")?,
            Arg::Ptr(self.ptr(weight)?),
            Arg::Ptr(skew.map_or(Ok(0), |s| self.ptr(s))?),
            Arg::Ptr(self.ptr(&logits)?),
            Arg::Ptr(self.ptr(counter)?),
        ];
        args.extend(self.route_args(e, p, &out)?);
        match handoff.filter(|h| Self::handoff_fits(h, t, e)) {
            Some(h) => {
                args.extend(self.handoff_args(h)?);
                out.handed_off = true;
            }
            None => args.extend(Self::no_handoff_args()),
        }
        // A block an expert's logits; the last block routes.
        let name = if e <= ROUTE_RANK_MAX_EXPERTS {
            "moe_route_logits_e64"
        } else {
            "moe_route_logits"
        };
        self.launch(name, (e as u32, 1, 1), 128, 0, &args)?;
        Ok(Some(out))
    }

    fn experts_fit(x: &Tensor, w: &ExpertWeights) -> Result<Option<(usize, usize)>> {
        let Ok((_, hidden)) = x.dims2() else {
            return Ok(None);
        };
        if !x.is_contiguous() || !aligned16(x) {
            return Ok(None);
        }
        Self::weights_fit(hidden, x.dtype(), w)
    }

    /// Whether the expert kernels take rows of `hidden` `dt` values against these stacked
    /// weights: `Some((hidden, inner))` if so. e4m3 weights take bf16 rows only, widths that
    /// are multiples of 32 (the tensor-core kernels) and scales of the stacks' block grid.
    fn weights_fit(hidden: usize, dt: DType, w: &ExpertWeights) -> Result<Option<(usize, usize)>> {
        let (gate_up, down) = (w.gate_up, w.down);
        let Ok((slots, hidden2, down_cols)) = down.dims3() else {
            return Ok(None);
        };
        let mut inner = down_cols;
        let (weights_dt, values_per_elem) = match w.quant {
            ExpertQuant::None => (dt, 1),
            ExpertQuant::Int4 {
                gate_up: g_gu,
                down: g_d,
            } => {
                inner = 2 * down_cols;
                if dt != DType::BF16
                    || !hidden.is_multiple_of(32)
                    || !inner.is_multiple_of(32)
                    || !g_gu.fits(slots * 2 * inner, hidden)
                    || !g_d.fits(slots * hidden, inner)
                {
                    return Ok(None);
                }
                (DType::U8, 2)
            }
            ExpertQuant::Fp8 {
                gate_up: s_gu,
                down: s_d,
            } => {
                let (hb, ib) = (hidden.div_ceil(128), inner.div_ceil(128));
                let scales_ok = s_gu.dtype() == DType::F32
                    && s_d.dtype() == DType::F32
                    && s_gu.is_contiguous()
                    && s_d.is_contiguous()
                    && s_gu.dims() == [slots * 2 * ib, hb]
                    && s_d.dims() == [slots, hb, ib];
                if dt != DType::BF16
                    || !scales_ok
                    || !hidden.is_multiple_of(32)
                    || !inner.is_multiple_of(32)
                {
                    return Ok(None);
                }
                (DType::F8E4M3, 1)
            }
        };
        let ok = hidden == hidden2
            && hidden.is_multiple_of(8)
            && inner.is_multiple_of(8)
            && is_kernel_dtype(dt)
            && gate_up.dtype() == weights_dt
            && down.dtype() == weights_dt
            && gate_up.is_contiguous()
            && down.is_contiguous()
            && aligned16(gate_up)
            && aligned16(down)
            && gate_up.dim(1)? * values_per_elem == hidden;
        Ok(ok.then_some((hidden, inner)))
    }

    /// An expert projection kernel's arguments: its input and the input's width `k`, the
    /// weight stack (and what its format needs: e4m3's block scales; INT4's group scales, zero
    /// points and log2 of the group size), the output width `n`, then `rest`. `gate_up`: which
    /// of the stacks.
    fn projection_args(
        &self,
        (input, k, k_what): (u64, usize, &str),
        weights: &Tensor,
        (quant, gate_up): (&ExpertQuant, bool),
        (n, n_what): (usize, &str),
        rest: impl IntoIterator<Item = Arg>,
    ) -> Result<Vec<Arg>> {
        let mut args = vec![
            Arg::Ptr(input),
            i32_arg(k, k_what)?,
            Arg::Ptr(self.ptr(weights)?),
        ];
        match *quant {
            ExpertQuant::None => {}
            ExpertQuant::Fp8 { gate_up: g, down } => {
                args.push(Arg::Ptr(self.ptr(if gate_up { g } else { down })?));
            }
            ExpertQuant::Int4 { gate_up: g, down } => {
                let groups = if gate_up { g } else { down };
                args.push(Arg::Ptr(self.ptr(groups.scale)?));
                args.push(Arg::Ptr(match groups.zero {
                    Some(z) => self.ptr(z)?,
                    None => 0,
                }));
                args.push(Arg::I32(groups.group.trailing_zeros() as i32));
            }
        }
        args.push(i32_arg(n, n_what)?);
        args.extend(rest);
        Ok(args)
    }

    /// The two grouped expert products over pairs already sorted by slot: `h [P, I]` then
    /// `y [P, hidden]` (f32). bf16 weights run on the tensor cores (`h` in bf16, as the unfused
    /// bf16 path rounds it); f32 weights, or widths that are not multiples of 32, on the CUDA
    /// cores in f32.
    /// With `fold` and the tensor-core kernels, the down kernel also writes the combine of `y`
    /// (`moe_down_mma`'s tail): the second value says whether it did.
    #[allow(clippy::too_many_arguments)]
    fn experts_core(
        &self,
        (x, x_dtype): (u64, DType),
        w: &ExpertWeights,
        (slots, active): (usize, Option<u64>),
        pairs: usize,
        offsets: u64,
        sorted: u64,
        k_div: usize,
        hidden: usize,
        inner: usize,
        fold: Option<&CombineFold>,
    ) -> Result<(Tensor, bool)> {
        // With the list of slots with pairs, a row of blocks per such slot (at most one a pair).
        let grid_slots = match active {
            Some(_) => slots.min(pairs),
            None => slots,
        } as u32;
        let listed = active.is_some();
        let active = active.unwrap_or(0);
        let mma = Self::takes_mma(x_dtype, hidden, inner);
        let bulk = mma && listed && takes_bulk_gate_up(&w.quant, hidden, inner, pairs);
        // Blocks of 4 warps: two 16-row tiles, each over two k halves (tensor cores), or 16
        // rows, 4 per warp (CUDA cores). e4m3 weights: the tensor-core kernels' FP8 forms
        // (weights_fit checked their widths).
        let rows_per_block = if mma { 32 } else { 16 };
        let (gate_up_fn, down_fn, h_dtype) = if mma {
            let sfx = w.quant.suffix();
            let wide = |k: usize, gate_up: bool| {
                if takes_wide_chunks(&w.quant, k, gate_up) {
                    "w"
                } else {
                    ""
                }
            };
            (
                if bulk {
                    "moe_gate_up_bulk_fp8h".to_string()
                } else {
                    format!("moe_gate_up_mma{sfx}{}", wide(hidden, true))
                },
                format!("moe_down_mma{sfx}{}", wide(inner, false)),
                DType::BF16,
            )
        } else {
            let sfx = suffix(x_dtype);
            (
                format!("moe_gate_up_{sfx}"),
                format!("moe_down_{sfx}"),
                DType::F32,
            )
        };
        let h = self.alloc(h_dtype, &[pairs, inner])?;
        let args = self.projection_args(
            (x, hidden, "hidden size"),
            w.gate_up,
            (&w.quant, true),
            (inner, "expert inner size"),
            [
                Arg::Ptr(offsets),
                Arg::Ptr(active),
                Arg::Ptr(sorted),
                i32_arg(k_div, "top-k")?,
                Arg::Ptr(self.ptr(&h)?),
            ],
        )?;
        if bulk {
            // A persistent grid: one block an SM, each a run of the (expert, 16 columns) items.
            self.launch(
                &gate_up_fn,
                (super::SMS as u32, 1, 1),
                BULK_THREADS,
                BULK_SMEM as u32,
                &args,
            )?;
        } else {
            self.launch(
                &gate_up_fn,
                (inner.div_ceil(rows_per_block) as u32, grid_slots, 1),
                128,
                0,
                &args,
            )?;
        }
        let y = self.alloc(DType::F32, &[pairs, hidden])?;
        let mut args = self.projection_args(
            (self.ptr(&h)?, inner, "expert inner size"),
            w.down,
            (&w.quant, false),
            (hidden, "hidden size"),
            [Arg::Ptr(offsets), Arg::Ptr(active), Arg::Ptr(self.ptr(&y)?)],
        )?;
        let fold = fold.filter(|_| mma);
        if mma {
            let f = fold.copied().unwrap_or_default();
            args.extend([
                Arg::Ptr(f.pos),
                Arg::Ptr(f.weights),
                i32_arg(f.tokens, "tokens")?,
                i32_arg(f.k, "top-k")?,
                Arg::Ptr(f.out),
                Arg::Ptr(f.counters),
            ]);
            args.extend(match f.done {
                Some(d) => [
                    Arg::Ptr(d.seen_from),
                    Arg::Ptr(d.seen),
                    Arg::Ptr(d.done),
                    Arg::I32(d.value as i32),
                ],
                None => [Arg::Ptr(0), Arg::Ptr(0), Arg::Ptr(0), Arg::I32(0)],
            });
        }
        self.launch(
            &down_fn,
            (hidden.div_ceil(rows_per_block) as u32, grid_slots, 1),
            128,
            0,
            &args,
        )?;
        Ok((y, fold.is_some()))
    }

    /// Whether the tensor-core decode kernels take rows of `dtype` at these widths.
    fn takes_mma(dtype: DType, hidden: usize, inner: usize) -> bool {
        dtype == DType::BF16 && hidden.is_multiple_of(32) && inner.is_multiple_of(32)
    }

    /// Whether the grouped GEMM takes these shapes: bf16, both projections' k widths multiples
    /// of 32 (hidden and inner), at most `ALIGN_MAX_S` slots.
    fn grouped_fits(dtype: DType, hidden: usize, inner: usize, slots: usize) -> bool {
        dtype == DType::BF16
            && hidden.is_multiple_of(32)
            && inner.is_multiple_of(32)
            && slots <= 1024
            && super::grouped_experts_enabled()
    }

    /// The grouped GEMM: pairs sorted by slot into segments padded to [`GG_BM`] rows on the
    /// device (`ids`/`slot_of` as for `moe_align`, `pair_rows` 0 for row = pair / k_div), then
    /// gate/up and down as one launch each for all experts → `(y [blocks·GG_BM, hidden] bf16,
    /// pos [pairs])`, pair p's row of `y` at `pos[p]`.
    #[allow(clippy::too_many_arguments)]
    fn experts_grouped(
        &self,
        x: u64,
        w: &ExpertWeights,
        ids: u64,
        pairs: usize,
        slot_of: u64,
        slots: usize,
        pair_rows: u64,
        k_div: usize,
        hidden: usize,
        inner: usize,
        wait: Option<&WaitFlag>,
    ) -> Result<(Tensor, Tensor)> {
        let wgmma = super::wgmma_experts_enabled()
            && w.wgmma
            && matches!(w.quant, ExpertQuant::None | ExpertQuant::Fp8 { .. })
            && hidden.is_multiple_of(64)
            && inner.is_multiple_of(64)
            && pairs >= WS_MIN_PAIRS_PER_SLOT * slots;
        let plan = GgPlan::new(w, hidden, inner, wgmma);
        // Every slot's segment wastes less than one block: an upper bound without a host sync.
        let max_blocks = pairs.div_ceil(plan.bm) + slots;
        let sorted = self.alloc(DType::U32, &[max_blocks * plan.bm])?;
        let block_slot = self.alloc(DType::U32, &[max_blocks])?;
        let pos = self.alloc(DType::U32, &[pairs])?;
        let [wait_word, wait_value, observed] = wait_args(wait);
        self.launch(
            "moe_align_blocks",
            (1, 1, 1),
            1024,
            0,
            &[
                Arg::Ptr(ids),
                i32_arg(pairs, "pairs")?,
                Arg::Ptr(slot_of),
                i32_arg(slots, "slots")?,
                Arg::Ptr(pair_rows),
                i32_arg(k_div, "top-k")?,
                i32_arg(max_blocks, "expert blocks")?,
                i32_arg(plan.bm, "block rows")?,
                Arg::Ptr(self.ptr(&sorted)?),
                Arg::Ptr(self.ptr(&block_slot)?),
                Arg::Ptr(self.ptr(&pos)?),
                wait_word,
                wait_value,
                observed,
            ],
        )?;
        let blocks = (&sorted, &block_slot, max_blocks);
        let h = self.gg_product(&plan, true, x, w, blocks, (hidden, inner))?;
        // Each pair's expert output in bf16 (as the experts' matmuls return it in a bf16 model),
        // summed in f32 by the combine.
        let y = self.gg_product(&plan, false, self.ptr(&h)?, w, blocks, (hidden, inner))?;
        Ok((y, pos))
    }

    /// One of the grouped GEMM's two products over rows already sorted into blocks (`blocks`:
    /// moe_align_blocks' sorted rows and block slots, and how many blocks): gate/up (`h [rows,
    /// inner]` bf16 from `input [·, hidden]`) or down (`y [rows, hidden]` bf16 from `input
    /// [rows, inner]`), rows = blocks · plan.bm.
    fn gg_product(
        &self,
        plan: &GgPlan,
        gate_up: bool,
        input: u64,
        w: &ExpertWeights,
        (sorted, block_slot, max_blocks): (&Tensor, &Tensor, usize),
        (hidden, inner): (usize, usize),
    ) -> Result<Tensor> {
        let rows = max_blocks * plan.bm;
        let (k, n, out_width) = if gate_up {
            ((hidden, "hidden size"), (inner, "expert inner size"), inner)
        } else {
            (
                (inner, "expert inner size"),
                (hidden, "hidden size"),
                hidden,
            )
        };
        let out = self.alloc(DType::BF16, &[rows, out_width])?;
        let args = self.projection_args(
            (input, k.0, k.1),
            if gate_up { w.gate_up } else { w.down },
            (&w.quant, gate_up),
            n,
            [
                Arg::Ptr(self.ptr(sorted)?),
                Arg::Ptr(self.ptr(block_slot)?),
                Arg::Ptr(self.ptr(&out)?),
            ],
        )?;
        // A gate/up tile is bn/2 gate and the same bn/2 up columns; a down tile bn columns.
        let (name, tile) = if gate_up {
            (&plan.gate_up_fn, plan.bn / 2)
        } else {
            (&plan.down_fn, plan.bn)
        };
        self.launch(
            name,
            (out_width.div_ceil(tile) as u32, max_blocks as u32, 1),
            plan.threads,
            plan.smem as u32,
            &args,
        )?;
        Ok(out)
    }

    /// Routed experts for device routing: `x [T, hidden]`, the stacked weights of `slots`
    /// experts (`gate_up [slots·2I, hidden]`, `down [slots, hidden, I]`), `slot_of [E]` (i32,
    /// −1 for experts not held) → `Σ_k w·expert(x)`, `[T, hidden]` f32. Prefill-sized batches
    /// (at least [`ExpertWeights::grouped_from`] pairs per slot, bf16) take the grouped GEMM;
    /// others the GEMV-style kernels, up to `max_rows` rows (`None` beyond).
    pub fn experts_routed(
        &self,
        x: &Tensor,
        routing: &DeviceRouting,
        slot_of: &Tensor,
        w: &ExpertWeights,
        max_rows: usize,
        counters: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let Some(input) = self.routed_in(x, routing, w)? else {
            return Ok(None);
        };
        Ok(self
            .routed(&input, slot_of, w, max_rows, None, (None, None), counters)?
            .and_then(|(out, _)| out))
    }

    /// [`experts_routed`](Self::experts_routed) for an expert worker's call: the rows and the
    /// routing read where they are (`input`, the gate's shared buffer), the `[rows, hidden]` f32
    /// result written at device address `into` (`4 · rows · hidden` bytes), and, with `wait`,
    /// the wait for the gate's flag done by the call's first kernel, and with `done` the call's
    /// end signalled by its last kernel where that kernel can (the combine folded into the
    /// down kernel). `None` when the kernels do not take this call (nothing queued then), else
    /// whether `done` was signalled (if not, the caller signals it).
    #[allow(clippy::too_many_arguments)]
    pub fn experts_routed_at(
        &self,
        input: &RowsAt,
        slot_of: &Tensor,
        w: &ExpertWeights,
        max_rows: usize,
        into: u64,
        (wait, done): (Option<&WaitFlag>, Option<&DoneFlag>),
        counters: Option<&Tensor>,
    ) -> Result<Option<bool>> {
        let Some((hidden, inner)) = Self::weights_fit(input.hidden, input.dtype, w)? else {
            return Ok(None);
        };
        if !input.x.is_multiple_of(16)
            || !input.ids.is_multiple_of(4)
            || !input.weights.is_multiple_of(4)
            || !into.is_multiple_of(16)
            || input.rows == 0
            || input.k == 0
        {
            return Ok(None);
        }
        let routed = RoutedIn {
            x: input.x,
            dtype: input.dtype,
            rows: input.rows,
            hidden,
            inner,
            ids: input.ids,
            weights: input.weights,
            k: input.k,
        };
        Ok(self
            .routed(
                &routed,
                slot_of,
                w,
                max_rows,
                Some(into),
                (wait, done),
                counters,
            )?
            .map(|(_, signalled)| signalled))
    }

    /// A tensor call's inputs as the kernels take them (`None`: they do not take them).
    fn routed_in(
        &self,
        x: &Tensor,
        routing: &DeviceRouting,
        w: &ExpertWeights,
    ) -> Result<Option<RoutedIn>> {
        let Some((hidden, inner)) = Self::experts_fit(x, w)? else {
            return Ok(None);
        };
        let t = x.dim(0)?;
        if routing.ids.dims() != [t, routing.k]
            || routing.weights.dims() != [t, routing.k]
            || !routing.ids.is_contiguous()
            || !routing.weights.is_contiguous()
        {
            return Ok(None);
        }
        Ok(Some(RoutedIn {
            x: self.ptr(x)?,
            dtype: x.dtype(),
            rows: t,
            hidden,
            inner,
            ids: self.ptr(&routing.ids)?,
            weights: self.ptr(&routing.weights)?,
            k: routing.k,
        }))
    }

    /// Both of the above: `None` when the kernels do not take the call, `Some((None, _))` when
    /// the result went to `into`; the flag says whether `done` was signalled by the kernels.
    #[allow(clippy::too_many_arguments)]
    fn routed(
        &self,
        input: &RoutedIn,
        slot_of: &Tensor,
        w: &ExpertWeights,
        max_rows: usize,
        into: Option<u64>,
        (wait, done): (Option<&WaitFlag>, Option<&DoneFlag>),
        counters: Option<&Tensor>,
    ) -> Result<Option<(Option<Tensor>, bool)>> {
        let RoutedIn {
            x,
            dtype,
            rows: t,
            hidden,
            inner,
            ids,
            weights,
            k,
        } = *input;
        let slots = w.down.dim(0)?;
        let pairs = t * k;
        if slots > 1024 || slot_of.dtype() != DType::I32 {
            return Ok(None);
        }
        // The pairs are the routing's, of every expert; a shard (an expert worker's) gets about
        // its share of them, so pairs per held expert are pairs over the model's experts (the
        // slot table's length), as in-process.
        let experts = slot_of.dim(0)?.max(1);
        if Self::grouped_fits(dtype, hidden, inner, slots) && takes_grouped(pairs, experts, w) {
            let (y, pos) = self.experts_grouped(
                x,
                w,
                ids,
                pairs,
                self.ptr(slot_of)?,
                slots,
                0,
                k,
                hidden,
                inner,
                wait,
            )?;
            let pos = self.ptr(&pos)?;
            return Ok(Some((
                self.combine_to(&y, t, hidden, pos, weights, 0, k, into)?,
                false,
            )));
        }
        if t > max_rows {
            return Ok(None);
        }
        let offsets = self.alloc(DType::U32, &[slots + 1])?;
        let sorted = self.alloc(DType::U32, &[pairs])?;
        let pos = self.alloc(DType::U32, &[pairs])?;
        // The slots with pairs (a count, then the slots): the expert kernels' grid covers
        // min(slots, pairs) of them instead of every slot.
        let active = self.alloc(DType::U32, &[slots + 1])?;
        let [wait_word, wait_value, observed] = wait_args(wait);
        self.launch(
            "moe_align",
            (1, 1, 1),
            1024,
            0,
            &[
                Arg::Ptr(ids),
                i32_arg(pairs, "pairs")?,
                Arg::Ptr(self.ptr(slot_of)?),
                i32_arg(slots, "slots")?,
                Arg::Ptr(self.ptr(&offsets)?),
                Arg::Ptr(self.ptr(&sorted)?),
                Arg::Ptr(self.ptr(&pos)?),
                Arg::Ptr(self.ptr(&active)?),
                wait_word,
                wait_value,
                observed,
            ],
        )?;
        let (off_p, sorted_p) = (self.ptr(&offsets)?, self.ptr(&sorted)?);
        let pos = self.ptr(&pos)?;
        // A decode step's few tokens: the combine in the down kernel's tail (one launch fewer).
        let fold_into = match counters {
            Some(c)
                if t <= FOLD_MAX_TOKENS
                    && Self::takes_mma(dtype, hidden, inner)
                    && c.dtype() == DType::U32
                    && c.elem_count() >= combine_counter_words(hidden) =>
            {
                Some(match into {
                    Some(at) => (None, at, self.ptr(c)?),
                    None => {
                        let out = self.alloc(DType::F32, &[t, hidden])?;
                        let at = self.ptr(&out)?;
                        (Some(out), at, self.ptr(c)?)
                    }
                })
            }
            _ => None,
        };
        let fold = fold_into.as_ref().map(|&(_, out, counters)| CombineFold {
            pos,
            weights,
            tokens: t,
            k,
            out,
            counters,
            done: done.copied().filter(|_| super::MeshFolds::get().done),
        });
        let (y, folded) = self.experts_core(
            (x, dtype),
            w,
            (slots, Some(self.ptr(&active)?)),
            pairs,
            off_p,
            sorted_p,
            k,
            hidden,
            inner,
            fold.as_ref(),
        )?;
        if folded && let Some((out, _, _)) = fold_into {
            let signalled = fold.is_some_and(|f| f.done.is_some());
            return Ok(Some((out, signalled)));
        }
        Ok(Some((
            self.combine_to(&y, t, hidden, pos, weights, 0, k, into)?,
            false,
        )))
    }

    /// Routed experts for host-built assignments (an expert worker's request) → `[T, hidden]` f32.
    pub fn experts_assigned(
        &self,
        x: &Tensor,
        a: &HostAssignments,
        w: &ExpertWeights,
    ) -> Result<Option<Tensor>> {
        let Some((hidden, inner)) = Self::experts_fit(x, w)? else {
            return Ok(None);
        };
        let t = x.dim(0)?;
        if a.rows != t || a.slots != w.down.dim(0)? || a.pairs == 0 {
            return Ok(None);
        }
        let base = self.ptr(&a.packed)?;
        let at = |elems: usize| base + 4 * elems as u64;
        let offsets = at(0);
        let sorted = at(a.slots + 1);
        let row_ptr = at(a.slots + 1 + a.pairs);
        let entry_pos = at(a.slots + 1 + a.pairs + a.rows + 1);
        let (y, _) = self.experts_core(
            (self.ptr(x)?, x.dtype()),
            w,
            (a.slots, None),
            a.pairs,
            offsets,
            sorted,
            1,
            hidden,
            inner,
            None,
        )?;
        let w = self.ptr(&a.weights)?;
        self.combine_to(&y, t, hidden, entry_pos, w, row_ptr, 0, None)
    }

    /// Routed experts for host-built pairs through the grouped GEMM (an expert worker's
    /// prefill-sized request) → `[T, hidden]` f32, or `None` if the shapes do not fit it.
    pub fn experts_pairs(
        &self,
        x: &Tensor,
        a: &HostPairs,
        w: &ExpertWeights,
    ) -> Result<Option<Tensor>> {
        let Some((hidden, inner)) = Self::experts_fit(x, w)? else {
            return Ok(None);
        };
        let t = x.dim(0)?;
        if a.rows != t
            || a.slots != w.down.dim(0)?
            || a.pairs == 0
            || !Self::grouped_fits(x.dtype(), hidden, inner, a.slots)
        {
            return Ok(None);
        }
        let base = self.ptr(&a.packed)?;
        let at = |elems: usize| base + 4 * elems as u64;
        let (y, pos) = self.experts_grouped(
            self.ptr(x)?,
            w,
            at(0),
            a.pairs,
            0,
            a.slots,
            at(a.pairs),
            1,
            hidden,
            inner,
            None,
        )?;
        let (pos, w) = (self.ptr(&pos)?, self.ptr(&a.weights)?);
        self.combine_to(&y, t, hidden, pos, w, at(2 * a.pairs), 0, None)
    }

    /// `out[t] = Σ_j w[j] · y[pos[j]]` over token t's entries, in entry order (f32): entries
    /// `t·k..t·k+k` when `row_ptr` is 0, else `row_ptr[t]..row_ptr[t+1]`.
    /// The result is a new `[t, hidden]` tensor, or is written at `into` (`None` returned).
    #[allow(clippy::too_many_arguments)]
    fn combine_to(
        &self,
        y: &Tensor,
        t: usize,
        hidden: usize,
        pos: u64,
        w: u64,
        row_ptr: u64,
        k: usize,
        into: Option<u64>,
    ) -> Result<Option<Tensor>> {
        let (out, at) = match into {
            Some(at) => (None, at),
            None => {
                let out = self.alloc(DType::F32, &[t, hidden])?;
                let at = self.ptr(&out)?;
                (Some(out), at)
            }
        };
        let y_at = self.ptr(y)?;
        // Four columns a thread where the rows allow 16-byte accesses (8 for bf16 `y`).
        let bf16 = y.dtype() == DType::BF16;
        let y_align = if bf16 { 8 } else { 16 };
        let four = hidden.is_multiple_of(4) && y_at % y_align == 0 && at % 16 == 0;
        let (name, width) = match (four, bf16) {
            (true, false) => ("moe_combine4", hidden / 4),
            (true, true) => ("moe_combine4_bf16", hidden / 4),
            (false, false) => ("moe_combine", hidden),
            (false, true) => ("moe_combine_bf16", hidden),
        };
        self.launch(
            name,
            (t as u32, width.div_ceil(256) as u32, 1),
            256,
            0,
            &[
                Arg::Ptr(y_at),
                i32_arg(width, "hidden size")?,
                Arg::Ptr(pos),
                Arg::Ptr(w),
                Arg::Ptr(row_ptr),
                i32_arg(k, "top-k")?,
                Arg::Ptr(at),
            ],
        )?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FP8 weights for the rules below (the rules read only the format).
    fn fp8_of(t: &Tensor) -> ExpertQuant<'_> {
        ExpertQuant::Fp8 {
            gate_up: t,
            down: t,
        }
    }

    /// The bulk-copy gate/up: FP8 only, a hidden size that is a multiple of 128 and at most
    /// 2,048 (V2-Lite's and the FP8 fixture's 128; not V3's 7,168), inner a multiple of 16, from
    /// `min` pairs; its shared memory as experts_fp8.cu's `BULK_SMEM` adds it up; never in a
    /// build without the sm_90a PTX (CI's).
    #[test]
    fn bulk_gate_up_takes_fp8_up_to_2048_wide_from_min_pairs() {
        let t = Tensor::zeros(1, DType::F32, &Device::Cpu).expect("tensor");
        let fp8 = fp8_of(&t);
        assert!(bulk_fits(&fp8, 2048, 1408, 8, 8));
        assert!(bulk_fits(&fp8, 128, 160, 8, 8));
        assert!(!bulk_fits(&fp8, 2048, 1408, 7, 8));
        assert!(!bulk_fits(&fp8, 7168, 2048, 512, 8));
        assert!(!bulk_fits(&fp8, 320, 160, 64, 8));
        assert!(!bulk_fits(&fp8, 2048, 1400, 64, 8));
        assert!(!bulk_fits(&ExpertQuant::None, 2048, 1408, 64, 8));
        assert_eq!(BULK_SMEM, 214_960);
        if !cfg!(moemesh_wgmma) {
            assert!(!takes_bulk_gate_up(&fp8, 2048, 1408, 64));
        }
    }

    /// The routing launch's hand-off to expert workers (the mesh's `route` fold) takes one to
    /// four slots and `ready` words, 4-byte aligned addresses, rows of the launch's tokens in
    /// whole u32 words, table entries inside the table and counts of the launch's experts (or
    /// none); anything else leaves the hand-off to the gate's own launch.
    #[test]
    fn route_handoff_takes_one_to_four_aligned_slots_of_the_launchs_rows() {
        let zeros = |shape: &[usize], dtype: DType| {
            Tensor::zeros(shape, dtype, &Device::Cpu).expect("tensor")
        };
        let (t, e) = (3, 64);
        let base = RouteHandoff {
            rows: zeros(&[t, 2048], DType::BF16),
            slots: vec![[0x1000, 0x2000, 0x3000]; 2],
            words: vec![(0x4000, 0), (0x4004, 1)],
            table: zeros(&[3], DType::U32),
            counts: Some(zeros(&[e], DType::U32)),
        };
        let fits = |change: &dyn Fn(&mut RouteHandoff)| {
            let mut h = base.clone();
            change(&mut h);
            Gpu::handoff_fits(&h, t, e)
        };
        assert!(fits(&|_| {}));
        assert!(fits(&|h| h.counts = None));
        assert!(fits(&|h| {
            h.slots = vec![[0x1000, 0x2000, 0x3000]; ROUTE_HANDOFF_MAX];
            h.words = vec![(0x4000, 2); ROUTE_HANDOFF_MAX];
        }));
        // Slots and words: none, or more than the kernel's four.
        assert!(!fits(&|h| h.slots.clear()));
        assert!(!fits(&|h| h.slots = vec![[0x1000, 0x2000, 0x3000]; 5]));
        assert!(!fits(&|h| h.words.clear()));
        assert!(!fits(&|h| h.words = vec![(0x4000, 0); 5]));
        // Addresses off 4 bytes, a table entry past the table, a table not of u32.
        assert!(!fits(&|h| h.slots[1][2] = 0x3002));
        assert!(!fits(&|h| h.words[0].0 = 0x4001));
        assert!(!fits(&|h| h.words[1].1 = 3));
        assert!(!fits(&|h| h.table = zeros(&[3], DType::F32)));
        // Rows of another step, or not whole u32 words (3 bf16 values).
        assert!(!fits(&|h| h.rows = zeros(&[t + 1, 2048], DType::BF16)));
        assert!(!fits(&|h| h.rows = zeros(&[t, 1], DType::BF16)));
        // Counts of another expert count or dtype.
        assert!(!fits(&|h| h.counts = Some(zeros(&[e / 2], DType::U32))));
        assert!(!fits(&|h| h.counts = Some(zeros(&[e], DType::F32))));
    }

    /// The 128-wide chunk forms: e4m3 at any k that is a multiple of 128; INT4 only where that
    /// projection's groups are 128 or more (a chunk in one group); bf16 never.
    #[test]
    fn wide_chunks_need_k_a_multiple_of_128_and_int4_groups_of_128() {
        let t = Tensor::zeros(1, DType::F32, &Device::Cpu).expect("tensor");
        let fp8 = fp8_of(&t);
        let groups = |group| Int4Groups {
            scale: &t,
            zero: None,
            group,
        };
        // V2-Lite: hidden 2,048 (gate/up's k), inner 1,408 (down's); the FP8 fixture's 320 / 160.
        for (k, want) in [
            (2048, true),
            (1408, true),
            (7168, true),
            (320, false),
            (160, false),
        ] {
            assert_eq!(takes_wide_chunks(&fp8, k, true), want, "{k}");
            assert_eq!(takes_wide_chunks(&fp8, k, false), want, "{k}");
            assert!(!takes_wide_chunks(&ExpertQuant::None, k, true));
        }
        let int4 = ExpertQuant::Int4 {
            gate_up: groups(128),
            down: groups(64),
        };
        assert!(takes_wide_chunks(&int4, 2048, true));
        assert!(
            !takes_wide_chunks(&int4, 1408, false),
            "groups of 64 span half a chunk"
        );
        assert!(!takes_wide_chunks(&int4, 320, true));
        let int4_256 = ExpertQuant::Int4 {
            gate_up: groups(256),
            down: groups(32),
        };
        assert!(takes_wide_chunks(&int4_256, 2048, true));
        assert!(!takes_wide_chunks(&int4_256, 2048, false));
    }

    /// e4m3 stacks go to the FP8 kernels only with bf16 rows, widths that are multiples of 32
    /// and scales of the stacks' own block grid (each expert matrix its own, partial edge blocks
    /// included); anything else is left to the callers' other paths.
    #[test]
    fn fp8_stacks_fit_the_kernels_only_with_their_scales() {
        let (slots, hidden, inner) = (3, 320, 160);
        let zeros = |shape: &[usize], dtype: DType| {
            Tensor::zeros(shape, dtype, &Device::Cpu).expect("tensor")
        };
        let gate_up = zeros(&[slots * 2 * inner, hidden], DType::F8E4M3);
        let down = zeros(&[slots, hidden, inner], DType::F8E4M3);
        // ⌈160/128⌉ = 2 row blocks a gate or up matrix, ⌈320/128⌉ = 3 column blocks.
        let s_gu = zeros(&[slots * 2 * 2, 3], DType::F32);
        let s_d = zeros(&[slots, 3, 2], DType::F32);
        fn fp8<'a>(
            stacks: (&'a Tensor, &'a Tensor),
            s_gu: &'a Tensor,
            s_d: &'a Tensor,
        ) -> ExpertWeights<'a> {
            ExpertWeights {
                quant: ExpertQuant::Fp8 {
                    gate_up: s_gu,
                    down: s_d,
                },
                ..ExpertWeights::dense(stacks.0, stacks.1)
            }
        }
        let stacks = (&gate_up, &down);
        let fit = |dt: DType, w: &ExpertWeights| Gpu::weights_fit(hidden, dt, w).expect("fit");
        assert_eq!(
            fit(DType::BF16, &fp8(stacks, &s_gu, &s_d)),
            Some((hidden, inner))
        );
        // f32 rows, no scales, or scales of a stacked (not per-matrix) grid: not these kernels.
        assert_eq!(fit(DType::F32, &fp8(stacks, &s_gu, &s_d)), None);
        assert_eq!(
            fit(DType::BF16, &ExpertWeights::dense(&gate_up, &down)),
            None
        );
        let stacked_grid = zeros(&[(slots * 2 * inner).div_ceil(128), 3], DType::F32);
        assert_eq!(fit(DType::BF16, &fp8(stacks, &stacked_grid, &s_d)), None);
        let s_d16 = s_d.to_dtype(DType::BF16).expect("bf16");
        assert_eq!(fit(DType::BF16, &fp8(stacks, &s_gu, &s_d16)), None);
        // bf16 stacks as before.
        let (gu16, d16) = (
            gate_up.to_dtype(DType::BF16).expect("gu"),
            down.to_dtype(DType::BF16).expect("d"),
        );
        assert_eq!(
            fit(DType::BF16, &ExpertWeights::dense(&gu16, &d16)),
            Some((hidden, inner))
        );
        // Scales beside bf16 stacks: refused.
        let mixed = ExpertWeights {
            quant: ExpertQuant::Fp8 {
                gate_up: &s_gu,
                down: &s_d,
            },
            ..ExpertWeights::dense(&gu16, &d16)
        };
        assert_eq!(fit(DType::BF16, &mixed), None);
    }

    /// INT4 stacks (two values a byte) go to the INT4 kernels only with bf16 rows, groups of a
    /// power of two from 16 whose scales (and zero points, when given) cover each row, and
    /// widths that are multiples of 32.
    #[test]
    fn int4_stacks_fit_the_kernels_only_with_their_groups() {
        let (slots, hidden, inner) = (3, 320, 160);
        let zeros = |shape: &[usize], dtype: DType| {
            Tensor::zeros(shape, dtype, &Device::Cpu).expect("tensor")
        };
        let gate_up = zeros(&[slots * 2 * inner, hidden / 2], DType::U8);
        let down = zeros(&[slots, hidden, inner / 2], DType::U8);
        let s_gu = zeros(&[slots * 2 * inner, hidden / 32], DType::F32);
        let s_d = zeros(&[slots * hidden, inner / 32], DType::F32);
        let z_d = zeros(&[slots * hidden, inner / 32], DType::U8);
        let int4 = |s_gu: &'_ Tensor, group_gu: usize, z: Option<&'_ Tensor>| {
            let w = ExpertWeights {
                quant: ExpertQuant::Int4 {
                    gate_up: Int4Groups {
                        scale: s_gu,
                        zero: None,
                        group: group_gu,
                    },
                    down: Int4Groups {
                        scale: &s_d,
                        zero: z,
                        group: 32,
                    },
                },
                ..ExpertWeights::dense(&gate_up, &down)
            };
            (
                Gpu::weights_fit(hidden, DType::BF16, &w).expect("fit"),
                Gpu::weights_fit(hidden, DType::F32, &w).expect("fit"),
            )
        };
        assert_eq!(int4(&s_gu, 32, None), (Some((hidden, inner)), None));
        assert_eq!(int4(&s_gu, 32, Some(&z_d)), (Some((hidden, inner)), None));
        // Scales of another group size, or a group the kernels do not take.
        assert_eq!(int4(&s_gu, 64, None).0, None);
        let s_gu8 = zeros(&[slots * 2 * inner, hidden / 8], DType::F32);
        assert_eq!(int4(&s_gu8, 8, None).0, None);
        // Zero points of the wrong shape.
        let z_bad = zeros(&[slots * hidden, 1], DType::U8);
        assert_eq!(int4(&s_gu, 32, Some(&z_bad)).0, None);
    }
}
