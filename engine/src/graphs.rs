//! Decode steps replayed as CUDA graphs.
//!
//! At small batches a decode step is bound by the host launching its ~600 kernels one by one.
//! A step whose rows all decode one token each from the runner's KV pool, with experts that
//! queue all their work on the same stream ([`Experts::graph_capturable`]: the in-process
//! shard), instead goes through a graph:
//!
//! - the batch is padded to a bucket ([`batch_bucket`]: 1, 2, 4, then steps of 8, 16 and 32
//!   up to `MOEMESH_CUDA_GRAPH_MAX_BATCH`, default 256) and the longest context to a power of two
//!   ([`length_bucket`], from 256 up to `MOEMESH_CUDA_GRAPH_MAX_LEN`, default 16,384);
//! - the step's inputs go into fixed device buffers: the embedded rows, the rotary tables and,
//!   per bucket, one u32 buffer of the attention tables ([`pack_tables`]);
//! - the layers, from those rows to the last layer's output, are the graph: the first step of a
//!   bucket runs them eagerly over the same buffers and then captures them; later steps replay.
//!   Both runs keep candle's small uploads (strided kernels' dims and strides) in its device
//!   cache, so the graph copies them from device memory that lives on
//!   ([`crate::cuda::Gpu::with_cached_uploads`]); cuBLAS gets a workspace of its own first.
//!   The final norm, lm_head and the pick run eagerly afterwards, on the real rows only.
//!
//! Padding rows decode at position 0 over a context of one row: a scratch pool row that no
//! sequence owns (one block the graphs hold while they live). Their outputs are never read.
//!
//! A bucket whose eager run or capture fails (a shape a fused kernel does not take, say) is
//! marked and stays eager, logged once; the step itself then runs the ordinary way. Steps with
//! prompt rows, or shapes beyond the buckets run the ordinary way too. `MOEMESH_CUDA_GRAPHS=0`
//! turns graphs off, for A/B runs.
//!
//! Experts in other processes (the gate's device-ordered workers) take part through
//! [`Experts::graph_begin`]: the step's calls are fixed first, under a key that names the
//! graphs (a new key drops them), and [`Experts::graph_send`] sends a run's messages and fills
//! the table its flag kernels read before each eager run or replay.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::cuda::StepGraph;
use crate::error::{EngineError, Result};
use crate::experts::Experts;
use crate::kv_blocks::pool_row;
use crate::kv_pool::KvPool;
use crate::layers::mla::{AttentionStep, DecodeBatch, SeqRows};
use crate::model::{DeepSeekModel, StepSeq};

/// Largest batch bucket by default (`MOEMESH_CUDA_GRAPH_MAX_BATCH`).
pub const DEFAULT_MAX_BATCH: usize = 256;
/// Longest context bucket by default (`MOEMESH_CUDA_GRAPH_MAX_LEN`).
pub const DEFAULT_MAX_LEN: usize = 16_384;
/// Smallest context bucket.
pub const MIN_LEN_BUCKET: usize = 256;

/// The batch a graph runs for `b` decoding rows: 1, 2, 4, then multiples of 8 up to 64, of 16
/// up to 128 and of 32 beyond (at most `max`); `None` for an empty batch or one over `max`.
/// Padding stays under 8 rows up to 64 and under 25% of the batch beyond.
pub fn batch_bucket(b: usize, max: usize) -> Option<usize> {
    if b == 0 || b > max {
        return None;
    }
    let step = match b {
        1..=4 => return Some(b.next_power_of_two().min(max)),
        5..=64 => 8,
        65..=128 => 16,
        _ => 32,
    };
    Some(b.next_multiple_of(step).min(max))
}

/// The context width a graph's attention tables hold for a longest context of `lmax` rows: the
/// next power of two, at least [`MIN_LEN_BUCKET`].
pub fn length_bucket(lmax: usize) -> usize {
    lmax.max(1).next_power_of_two().max(MIN_LEN_BUCKET)
}

/// The u32 tables of a padded decode batch of `bb` rows, as one buffer:
/// `targets [bb]` (each row's pool row for its new token), `lens [bb]` (its context, the new
/// token included), `rows [bb]` (its activation row, `0..bb`) and `gather [bb · lcap]` (the pool
/// rows of its positions `0..lens`, then its last one repeated). `tables[i]` holds sequence
/// `i`'s pool rows for positions `0..=len`; rows from `tables.len()` on are padding: context
/// one, at `scratch`.
pub fn pack_tables(tables: &[Vec<u32>], bb: usize, lcap: usize, scratch: u32) -> Result<Vec<u32>> {
    if tables.len() > bb {
        return Err(EngineError::Internal(format!(
            "{} decoding rows do not fit a graph of {bb}",
            tables.len()
        )));
    }
    let mut out = vec![0u32; bb * (3 + lcap)];
    let (head, gather) = out.split_at_mut(3 * bb);
    for i in 0..bb {
        let own: &[u32] = match tables.get(i) {
            Some(t) => t,
            None => std::slice::from_ref(&scratch),
        };
        let Some(&last) = own.last() else {
            return Err(EngineError::Internal(format!(
                "decoding row {i} has no pool rows"
            )));
        };
        if own.len() > lcap {
            return Err(EngineError::Internal(format!(
                "decoding row {i} has a context of {} over the graph's {lcap}",
                own.len()
            )));
        }
        head[i] = last;
        head[bb + i] = own.len() as u32;
        head[2 * bb + i] = i as u32;
        let row = &mut gather[i * lcap..(i + 1) * lcap];
        row[..own.len()].copy_from_slice(own);
        row[own.len()..].fill(last);
    }
    Ok(out)
}

/// How decode steps went through graphs, for benchmarks and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Buckets captured.
    pub captured: u64,
    /// Steps replayed from a graph.
    pub replayed: u64,
    /// Buckets whose eager run or capture failed (they stay eager).
    pub failed: u64,
}

/// The fixed buffers every bucket shares, sized for the largest batch.
struct Shared {
    /// `[max_batch, hidden]` in the embedded rows' dtype.
    x_in: Tensor,
    /// `cos [max_batch, rope / 2]` then `sin [max_batch, rope / 2]`, f32.
    trig: Tensor,
    /// `[max_batch, hidden]` f32: the last layer's output.
    x_out: Tensor,
}

/// One (batch, context) bucket.
struct Bucket {
    /// [`pack_tables`]' buffer, `[bb · (3 + lcap)]` u32.
    ints: Tensor,
    graph: Option<StepGraph>,
    failed: bool,
}

/// The block whose first row padding rows decode into.
struct Scratch {
    pool: Arc<KvPool>,
    block: u32,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.pool.release(&[self.block]);
    }
}

/// A step runner's decode graphs (see the module docs).
pub struct DecodeGraphs {
    enabled: bool,
    max_batch: usize,
    max_len: usize,
    shared: Option<Shared>,
    scratch: Option<Scratch>,
    buckets: HashMap<(usize, usize), Bucket>,
    /// The key of the remote experts' plan the graphs were captured under
    /// ([`Experts::graph_begin`]).
    remote_key: Option<u64>,
    stats: GraphStats,
}

/// A remote experts' plan fixed for one step; ends it when dropped, whatever the step's fate.
struct RemotePlan<'a> {
    experts: &'a dyn Experts,
    /// Whether the last run that calls were sent for was queued whole.
    ran: bool,
}

impl Drop for RemotePlan<'_> {
    fn drop(&mut self) {
        self.experts.graph_end(self.ran);
    }
}

impl Default for DecodeGraphs {
    fn default() -> Self {
        Self::new()
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(default)
}

impl DecodeGraphs {
    /// Settings from the environment (`MOEMESH_CUDA_GRAPHS`, `MOEMESH_CUDA_GRAPH_MAX_BATCH`,
    /// `MOEMESH_CUDA_GRAPH_MAX_LEN`).
    pub fn new() -> Self {
        // Step traces (`MOEMESH_STEP_TRACE`) mark points inside the layers, which a replayed
        // graph would not: they run steps the ordinary way.
        let enabled = std::env::var("MOEMESH_CUDA_GRAPHS")
            .map(|v| !matches!(v.as_str(), "0" | "false" | "off"))
            .unwrap_or(true)
            && !crate::cuda::trace_enabled();
        DecodeGraphs {
            enabled,
            max_batch: env_usize("MOEMESH_CUDA_GRAPH_MAX_BATCH", DEFAULT_MAX_BATCH),
            max_len: env_usize("MOEMESH_CUDA_GRAPH_MAX_LEN", DEFAULT_MAX_LEN),
            shared: None,
            scratch: None,
            buckets: HashMap::new(),
            remote_key: None,
            stats: GraphStats::default(),
        }
    }

    pub fn stats(&self) -> GraphStats {
        self.stats
    }

    /// Runs a decode step through its bucket's graph when the step is one for a graph: plans
    /// it (reserving KV) and runs the layers, as [`DeepSeekModel::forward_hidden`] does, up to
    /// its end: the caller settles the experts ([`Experts::settle`], once it has queued what
    /// follows: the pass's end is marked with [`Experts::settle_mark`]) and then commits one
    /// token to every cache ([`finish_step`]). Returns the last layer's output for the real
    /// rows (`[B, hidden]` f32, a view of a buffer the next step overwrites), or `None`, having
    /// committed nothing, when the step should run the ordinary way.
    pub fn step(
        &mut self,
        model: &DeepSeekModel,
        pool: &Arc<KvPool>,
        hidden: &Tensor,
        seqs: &mut [StepSeq],
        experts: &dyn Experts,
    ) -> Result<Option<Tensor>> {
        let b = seqs.len();
        if !self.enabled
            || b == 0
            || model.layers().is_empty()
            || crate::cuda::gpu(model.device()).is_none()
            || seqs
                .iter()
                .any(|s| s.new_tokens != 1 || !s.cache.pool().is_some_and(|p| Arc::ptr_eq(p, pool)))
            || hidden.dims() != [b, model.config().hidden_size]
        {
            return Ok(None);
        }
        let Some(bb) = batch_bucket(b, self.max_batch) else {
            return Ok(None);
        };
        let lmax = seqs.iter().map(|s| s.cache.len() + 1).max().unwrap_or(1);
        let lcap = length_bucket(lmax);
        if lcap > self.max_len || !self.ready(model, pool, hidden.dtype())? {
            return Ok(None);
        }
        // Experts in other processes fix the step's calls first (ended when `plan` drops); a
        // new plan (other workers, buffers or placement) drops the graphs of the old one.
        let mut plan = if experts.graph_capturable() {
            None
        } else {
            let layers = model.config().moe_layers();
            let Some(key) = experts.graph_begin(&layers, bb, model.dtype())? else {
                return Ok(None);
            };
            let plan = RemotePlan { experts, ran: true };
            if self.remote_key != Some(key) {
                if self.remote_key.is_some() {
                    tracing::info!(
                        graphs = self.buckets.len(),
                        "the expert calls' plan changed; dropping the decode graphs made for the old one"
                    );
                }
                self.buckets.clear();
                self.remote_key = Some(key);
            }
            Some(plan)
        };
        if self.buckets.get(&(bb, lcap)).is_some_and(|k| k.failed) {
            return Ok(None);
        }
        let (Some(shared), Some(scratch)) = (&self.shared, &self.scratch) else {
            return Ok(None);
        };
        let scratch_row = pool_row(&[scratch.block], 0);
        let (_, mut positions) = model.plan(hidden, seqs)?;
        let mut tables = Vec::with_capacity(b);
        for s in seqs.iter() {
            let n = s.cache.len() + 1;
            let rows = s.cache.pool_rows(n).ok_or_else(|| {
                EngineError::KvCache("decode graph: KV blocks were not reserved".into())
            })?;
            tables.push(rows.collect::<Vec<u32>>());
        }
        let ints = pack_tables(&tables, bb, lcap, scratch_row)?;
        positions.resize(bb, 0);
        let (cos, sin) = model.rotary().cos_sin_host(&positions);

        let dev = model.device();
        let bucket = match self.buckets.entry((bb, lcap)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Bucket {
                ints: Tensor::zeros(bb * (3 + lcap), DType::U32, dev)?,
                graph: None,
                failed: false,
            }),
        };
        let n = ints.len();
        bucket
            .ints
            .slice_set(&Tensor::from_vec(ints, n, dev)?, 0, 0)?;
        let half = cos.len() / bb;
        let trig = Tensor::from_vec([cos, sin].concat(), 2 * bb * half, dev)?;
        shared
            .trig
            .slice_set(&trig.narrow(0, 0, bb * half)?, 0, 0)?;
        shared.trig.slice_set(
            &trig.narrow(0, bb * half, bb * half)?,
            0,
            self.max_batch * half,
        )?;
        shared.x_in.slice_set(&hidden.contiguous()?, 0, 0)?;

        let run =
            |ints: &Tensor| body(model, shared, self.max_batch, ints, pool, bb, lcap, experts);
        // Remote experts' calls for the run about to be queued (not for a capture).
        let send = |plan: &mut Option<RemotePlan>| -> Result<bool> {
            match plan {
                None => Ok(true),
                Some(p) => {
                    p.ran = false;
                    experts.graph_send()
                }
            }
        };
        match &bucket.graph {
            Some(graph) => {
                if !send(&mut plan)? {
                    return Ok(None);
                }
                graph.launch()?;
                if let Some(p) = plan.as_mut() {
                    p.ran = true;
                }
                self.stats.replayed += 1;
            }
            None => {
                let g = crate::cuda::gpu(dev)
                    .ok_or_else(|| EngineError::Internal("the GPU went away".into()))?;
                if !send(&mut plan)? {
                    return Ok(None);
                }
                // The eager run fills candle's cache of small uploads; the capture reads it.
                if let Err(e) = g.with_cached_uploads(|| run(&bucket.ints)) {
                    // Nothing is committed; the step runs the ordinary way (its KV rows are
                    // written again there).
                    tracing::warn!(
                        batch = bb,
                        context = lcap,
                        error = %e,
                        "decode step does not run as a CUDA graph at this shape; it stays eager"
                    );
                    bucket.failed = true;
                    self.stats.failed += 1;
                    return Ok(None);
                }
                if let Some(p) = plan.as_mut() {
                    p.ran = true;
                }
                // This step is computed; a failed capture only leaves the shape eager.
                let captured = g.with_cached_uploads(|| {
                    g.begin_capture().and_then(|()| {
                        let ran = run(&bucket.ints);
                        let ended = g.end_capture();
                        ran.and(ended)
                    })
                });
                match captured {
                    Ok(graph) => {
                        bucket.graph = Some(graph);
                        self.stats.captured += 1;
                        tracing::debug!(
                            batch = bb,
                            context = lcap,
                            remote = plan.is_some(),
                            "decode step captured as a CUDA graph"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(
                            batch = bb,
                            context = lcap,
                            error = %e,
                            "capturing the decode step failed; this shape stays eager"
                        );
                        bucket.failed = true;
                        self.stats.failed += 1;
                    }
                }
            }
        }
        experts.settle_mark();
        Ok(Some(shared.x_out.narrow(0, 0, b)?))
    }

    /// Allocates the shared buffers and takes the scratch block on first use; `false` when
    /// graphs cannot run now (rows of another dtype than the first step's, or no free block).
    fn ready(&mut self, model: &DeepSeekModel, pool: &Arc<KvPool>, dtype: DType) -> Result<bool> {
        if self.scratch.is_none() {
            let Ok(blocks) = pool.allocate(1) else {
                return Ok(false);
            };
            let Some(&block) = blocks.first() else {
                return Ok(false);
            };
            self.scratch = Some(Scratch {
                pool: pool.clone(),
                block,
            });
        }
        if let Some(s) = &self.shared {
            return Ok(s.x_in.dtype() == dtype);
        }
        let (dev, hidden) = (model.device(), model.config().hidden_size);
        let half = model.rotary().dim() / 2;
        self.shared = Some(Shared {
            x_in: Tensor::zeros((self.max_batch, hidden), dtype, dev)?,
            trig: Tensor::zeros(2 * self.max_batch * half, DType::F32, dev)?,
            x_out: Tensor::zeros((self.max_batch, hidden), DType::F32, dev)?,
        });
        Ok(true)
    }
}

/// Rows from which a graph step's [`finish_step`] waits until the step's logits are queued
/// (below it, it runs as soon as the layers are): through the mesh on an H200 the late check
/// took 0.4–0.9 ms off a 64-row step but added 0.2–0.3 ms to a 1-row one (docs/BENCHMARKS.md,
/// session 26).
pub const SETTLE_LATE_MIN_ROWS: usize = 32;

/// When a graph step's [`finish_step`] waits until its logits are queued
/// (`MOEMESH_SETTLE_LATE`: unset or `auto`, from [`SETTLE_LATE_MIN_ROWS`] rows; `1`/`on`
/// always; `0`/`off` never, for A/B runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettleLate {
    Auto,
    Always,
    Never,
}

impl SettleLate {
    pub fn parse(v: Option<&str>) -> Self {
        match v.map(str::trim) {
            Some("1" | "on" | "true" | "always") => Self::Always,
            Some("0" | "off" | "false" | "never") => Self::Never,
            _ => Self::Auto,
        }
    }

    /// Whether a step of `rows` rows settles late.
    pub fn takes(self, rows: usize) -> bool {
        match self {
            Self::Auto => rows >= SETTLE_LATE_MIN_ROWS,
            Self::Always => true,
            Self::Never => false,
        }
    }
}

/// [`SettleLate`] from the environment (read once) for a step of `rows` rows.
pub fn settle_late(rows: usize) -> bool {
    static MODE: std::sync::OnceLock<SettleLate> = std::sync::OnceLock::new();
    MODE.get_or_init(|| SettleLate::parse(std::env::var("MOEMESH_SETTLE_LATE").ok().as_deref()))
        .takes(rows)
}

/// The end of a step that [`DecodeGraphs::step`] ran: the experts settled (a call released
/// rather than computed fails the step here, before anything is committed), then one token
/// committed to every sequence's cache.
pub fn finish_step(experts: &dyn Experts, seqs: &mut [StepSeq]) -> Result<()> {
    experts.settle()?;
    for s in seqs.iter_mut() {
        s.cache.commit(1);
    }
    Ok(())
}

/// The work a graph holds: the layers over the fixed buffers of bucket `(bb, lcap)`, the
/// result into `shared.x_out`. Everything it allocates is dropped before it returns (inside a
/// capture, the graph frees it itself).
#[allow(clippy::too_many_arguments)]
fn body(
    model: &DeepSeekModel,
    shared: &Shared,
    max_batch: usize,
    ints: &Tensor,
    pool: &Arc<KvPool>,
    bb: usize,
    lcap: usize,
    experts: &dyn Experts,
) -> Result<()> {
    let decode = DecodeBatch::from_tables(
        pool.clone(),
        ints.narrow(0, 0, bb)?,
        ints.narrow(0, bb, bb)?,
        ints.narrow(0, 2 * bb, bb)?,
        ints.narrow(0, 3 * bb, bb * lcap)?,
        lcap,
    )?;
    let half = model.rotary().dim() / 2;
    let dtype = model.dtype();
    let cos = shared
        .trig
        .narrow(0, 0, bb * half)?
        .reshape((bb, half))?
        .to_dtype(dtype)?;
    let sin = shared
        .trig
        .narrow(0, max_batch * half, bb * half)?
        .reshape((bb, half))?
        .to_dtype(dtype)?;
    let rows: Vec<SeqRows> = (0..bb).map(|start| SeqRows { start, len: 1 }).collect();
    let step = AttentionStep {
        rows: &rows,
        cos: &cos,
        sin: &sin,
        decode: Some(decode),
    };
    let x = shared.x_in.narrow(0, 0, bb)?.to_dtype(DType::F32)?;
    let out = model.run_layers(x, &step, &mut [], experts, None, &mut |_, _| {})?;
    shared.x_out.slice_set(&out, 0, 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_steps_settle_late_unless_told() {
        let auto = SettleLate::parse(None);
        assert_eq!(SettleLate::parse(Some("auto")), auto);
        assert!(!auto.takes(1) && !auto.takes(SETTLE_LATE_MIN_ROWS - 1));
        assert!(auto.takes(SETTLE_LATE_MIN_ROWS) && auto.takes(256));
        for on in ["1", "on", "always"] {
            assert!(SettleLate::parse(Some(on)).takes(1));
        }
        for off in ["0", "off", "never"] {
            assert!(!SettleLate::parse(Some(off)).takes(256));
        }
    }

    #[test]
    fn batches_pad_to_few_buckets() {
        let max = DEFAULT_MAX_BATCH;
        let got: Vec<usize> = [1, 2, 3, 4, 5, 8, 9, 63, 64, 65, 100, 128, 129, 250, 256]
            .iter()
            .map(|&b| batch_bucket(b, max).expect("in range"))
            .collect();
        assert_eq!(
            got,
            [1, 2, 4, 4, 8, 8, 16, 64, 64, 80, 112, 128, 160, 256, 256]
        );
        assert_eq!(batch_bucket(0, max), None);
        assert_eq!(batch_bucket(257, max), None);
        // A lower limit caps the bucket, never below the batch.
        assert_eq!(batch_bucket(97, 100), Some(100));
        // Every batch gets a bucket at least as large: under 8 rows of padding up to 64, under
        // 25% beyond; 19 buckets in all.
        let mut buckets = std::collections::BTreeSet::new();
        for b in 1..=max {
            let bb = batch_bucket(b, max).expect("in range");
            assert!(bb >= b);
            if b <= 64 {
                assert!(bb - b < 8, "{b} → {bb}");
            } else {
                assert!(4 * (bb - b) < b, "{b} → {bb}");
            }
            buckets.insert(bb);
        }
        assert_eq!(buckets.len(), 19, "{buckets:?}");
    }

    #[test]
    fn contexts_pad_to_powers_of_two() {
        assert_eq!(length_bucket(1), MIN_LEN_BUCKET);
        assert_eq!(length_bucket(256), 256);
        assert_eq!(length_bucket(257), 512);
        assert_eq!(length_bucket(4096), 4096);
        assert_eq!(length_bucket(4097), 8192);
    }

    #[test]
    fn tables_pack_targets_lens_rows_then_padded_gathers() {
        // Two sequences (contexts 3 and 1 with the new token) in a bucket of 4 rows × 4 wide.
        let tables = vec![vec![10, 11, 12], vec![40]];
        let scratch = 99;
        let out = pack_tables(&tables, 4, 4, scratch).expect("fits");
        assert_eq!(out.len(), 4 * (3 + 4));
        assert_eq!(&out[0..4], &[12, 40, 99, 99], "targets");
        assert_eq!(&out[4..8], &[3, 1, 1, 1], "lens");
        assert_eq!(&out[8..12], &[0, 1, 2, 3], "rows");
        assert_eq!(&out[12..16], &[10, 11, 12, 12]);
        assert_eq!(&out[16..20], &[40, 40, 40, 40]);
        assert_eq!(&out[20..28], &[99; 8], "padding rows read the scratch row");
    }

    #[test]
    fn tables_that_do_not_fit_are_refused() {
        assert!(pack_tables(&[vec![1], vec![2]], 1, 4, 0).is_err());
        assert!(pack_tables(&[vec![1, 2, 3]], 1, 2, 0).is_err());
        assert!(pack_tables(&[vec![]], 1, 2, 0).is_err());
    }
}
