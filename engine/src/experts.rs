//! Routed experts, behind the [`Experts`] trait that the dense part calls once per MoE layer.
//!
//! The dense side (in-process model, or the gate service) decides the routing; an `Experts`
//! implementation returns, for each token, `Σ_k w_k · expert_{id_k}(x)`. [`ExpertShard`] is the
//! in-process implementation over any subset of (layer, expert) weights: the whole model for
//! `moemesh generate`, one worker's share in the mesh. The mesh's remote implementation lives
//! in the gate service and sends each token once per worker with its (expert, weight) pairs.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::router::Routing;
use crate::weights::int4::Int4Tensor;
use crate::weights::{ExpertTensor, Loader, fp8};

/// Routed-expert output that may still be computing elsewhere.
pub struct PendingExperts(Box<dyn FnOnce() -> Result<RoutedOut> + Send>);

/// What a [`PendingExperts`] gives: the routed sum (`[T, hidden]`), or its parts where other
/// processes write them, each readable once its flag says so (the gate's device-ordered calls):
/// the caller either folds their wait and sum into its next kernel
/// ([`crate::cuda::Gpu::wait_add_rms_norm`]) or has them summed ([`RoutedOut::sum`]).
pub enum RoutedOut {
    Sum(Tensor),
    Parts(crate::cuda::WaitParts),
}

impl RoutedOut {
    /// The routed sum as a tensor (the parts waited for and added on their device).
    pub fn sum(self) -> Result<Tensor> {
        match self {
            RoutedOut::Sum(t) => Ok(t),
            RoutedOut::Parts(p) => p.sum(),
        }
    }
}

impl PendingExperts {
    /// Already computed.
    pub fn ready(t: Tensor) -> Self {
        PendingExperts(Box::new(move || Ok(RoutedOut::Sum(t))))
    }

    /// Computed when [`wait`](Self::wait) runs `f` (e.g. blocking on remote replies).
    pub fn deferred(f: impl FnOnce() -> Result<Tensor> + Send + 'static) -> Self {
        PendingExperts(Box::new(move || f().map(RoutedOut::Sum)))
    }

    /// Like [`deferred`](Self::deferred), where `f` may give the parts still being written.
    pub fn deferred_out(f: impl FnOnce() -> Result<RoutedOut> + Send + 'static) -> Self {
        PendingExperts(Box::new(f))
    }

    /// The routed sum.
    pub fn wait(self) -> Result<Tensor> {
        (self.0)()?.sum()
    }

    /// The routed sum, or its parts with their flags (see [`RoutedOut`]).
    pub fn wait_out(self) -> Result<RoutedOut> {
        (self.0)()
    }
}

/// Computes the routed-expert part of an MoE layer, in two phases so that the caller can run
/// the shared experts while routed ones are away (in another process).
pub trait Experts: Send + Sync {
    /// Starts `x: [T, hidden]` (post-attention-normed) through each token's routed experts; the
    /// result is `[T, hidden]`, the weighted sum of each token's experts.
    fn dispatch(&self, layer: usize, x: &Tensor, routing: &Routing) -> Result<PendingExperts>;

    /// Like [`dispatch`](Self::dispatch) for a routing that is still on the GPU. Implementations
    /// that can use it there (the in-process shard) avoid a host round trip; the default
    /// returns `None` and the caller copies the routing to the host and calls `dispatch`.
    fn dispatch_device(
        &self,
        _layer: usize,
        _x: &Tensor,
        _routing: &crate::cuda::DeviceRouting,
    ) -> Result<Option<PendingExperts>> {
        Ok(None)
    }

    /// For an MoE layer routed on the GPU: the hand-off of its rows `x` and of its routing (`k`
    /// experts a token) to the processes that compute it, for the routing launch itself to do
    /// ([`crate::cuda::RouteHandoff`]: no launch of its own between the router and the
    /// workers), or `None`, the default, when `dispatch_device` hands them off itself (it also
    /// does when the routing came back with `handed_off` false).
    fn route_handoff(
        &self,
        _layer: usize,
        _x: &Tensor,
        _k: usize,
    ) -> Result<Option<crate::cuda::RouteHandoff>> {
        Ok(None)
    }

    /// Called once per forward pass, after its last layer and before it commits anything to
    /// the caches (also when a layer failed). An implementation whose results may still be
    /// arriving on the device (the gate's device-ordered expert calls) waits for them here and
    /// reports a call that was released rather than computed, so that the step fails whole
    /// instead of committing a wrong token. The default has nothing in flight.
    fn settle(&self) -> Result<()> {
        Ok(())
    }

    /// Marks where a forward pass's device work ends, for a [`settle`](Self::settle) called
    /// later, once more work is queued behind it (a decode graph's logits): that settle then
    /// waits for the pass, not for the work after it. The default keeps nothing.
    fn settle_mark(&self) {}

    /// Whether a forward pass over this implementation can be captured as a CUDA graph
    /// ([`crate::graphs`]): all its work is queued on the model's device stream, nothing waits
    /// for the device or for another process, and nothing it keeps outlives the pass. Default:
    /// no (the gate's remote experts answer over the network).
    fn graph_capturable(&self) -> bool {
        false
    }

    /// For experts in other processes whose device work a CUDA graph can hold once a step's
    /// calls are fixed (the gate's device-ordered workers, [`crate::graphs`]): fixes, for a
    /// decode step of `rows` rows in `dtype` over the MoE layers `layers`, which process computes
    /// which experts of every layer and through which buffers, and returns a key naming that
    /// plan (graphs captured under another key must not replay), or `None` when the step should
    /// run the ordinary way. Until [`graph_end`](Self::graph_end), `dispatch_device` queues device
    /// work only, for the fixed calls, with the flag values it needs read on the device from a
    /// table that [`graph_send`](Self::graph_send) fills. Default: `None`.
    fn graph_begin(&self, _layers: &[usize], _rows: usize, _dtype: DType) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Sends the fixed plan's calls for one run of the layers (an eager run or a graph's replay,
    /// never a capture, which runs nothing) and fills the flag table, before the run is queued.
    /// `false`, having sent nothing, when the calls cannot go now (the step then runs the
    /// ordinary way).
    fn graph_send(&self) -> Result<bool> {
        Ok(false)
    }

    /// Ends the plan of [`graph_begin`](Self::graph_begin); `ran`: whether the last run that
    /// [`graph_send`](Self::graph_send) sent calls for was queued whole (when not, the calls it
    /// never reached are released so that no worker waits for them).
    fn graph_end(&self, _ran: bool) {}

    /// `dispatch` and wait.
    fn forward(&self, layer: usize, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        self.dispatch(layer, x, routing)?.wait()
    }
}

/// Which routed experts a shard holds: for every MoE layer in `layers`, experts in `experts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    pub layers: Vec<usize>,
    pub experts: Vec<usize>,
}

impl ShardSpec {
    /// Every routed expert of every MoE layer.
    pub fn all(cfg: &ModelConfig) -> Self {
        ShardSpec {
            layers: cfg.moe_layers(),
            experts: (0..cfg.n_routed_experts).collect(),
        }
    }
}

/// An assignment checked against a shard: (token row, slot in the stacks, weight).
type Resolved = (usize, usize, f32);

/// Most token rows the dense expert form takes on (see [`ExpertShard::forward_assigned`]).
pub const DENSE_MAX_ROWS: usize = 256;

/// One MoE layer's held experts, stacked so that all of them can run as one GEMM.
#[derive(Clone)]
struct LayerExperts {
    /// expert id → slot in the stacks.
    slots: BTreeMap<usize, usize>,
    /// `[slots · 2I, hidden]`: slot s's gate rows `2sI..2sI+I`, then its up rows. In the
    /// compute dtype, e4m3, or INT4 nibbles (`[slots · 2I, hidden / 2]` u8), as `quant` says.
    gate_up: Tensor,
    /// `[slots, hidden, I]` (INT4: `[slots, hidden, I / 2]`), in `gate_up`'s dtype.
    down: Tensor,
    /// What quantised stacks need besides their values.
    quant: StackQuant,
    /// `[n_routed_experts]` (i32): each expert's slot, −1 if not held; on a GPU with the fused
    /// kernels only.
    slot_of: Option<Tensor>,
}

/// The format of a layer's stacks.
#[derive(Clone)]
enum StackQuant {
    /// In the compute dtype.
    None,
    /// e4m3, with their f32 block scales.
    Fp8(Fp8Scales),
    /// INT4 (compressed-tensors' nibbles), with the gate/up rows' groups and the down rows'.
    Int4 {
        gate_up: Int4Groups,
        down: Int4Groups,
    },
}

/// The group scales and zero points of an INT4 stack's rows (each matrix's own groups; one
/// group size for the stack): `[rows, ⌈columns / group⌉]` f32 and u8 (or `None`: symmetric).
#[derive(Clone)]
struct Int4Groups {
    scale: Tensor,
    zero: Option<Tensor>,
    group: usize,
}

impl Int4Groups {
    /// The stack `q` (`[rows, columns / 2]` u8) with these groups.
    fn tensor(&self, q: Tensor) -> Int4Tensor {
        Int4Tensor {
            q,
            scale: self.scale.clone(),
            zero: self.zero.clone(),
            group: self.group,
        }
    }

    /// Rows `start..start + len` of the groups with those rows of a stack.
    fn rows(&self, q: Tensor, start: usize, len: usize) -> Result<Int4Tensor> {
        Ok(Int4Tensor {
            q,
            scale: self.scale.narrow(0, start, len)?,
            zero: self
                .zero
                .as_ref()
                .map(|z| z.narrow(0, start, len))
                .transpose()?,
            group: self.group,
        })
    }

    fn view(&self) -> crate::cuda::Int4Groups<'_> {
        crate::cuda::Int4Groups {
            scale: &self.scale,
            zero: self.zero.as_ref(),
            group: self.group,
        }
    }
}

/// The 128 × 128 block scales of a layer's e4m3 stacks, each expert's gate, up and down
/// matrices with their own grid (so a partial edge block of one expert never spans the next):
/// the layout [`crate::cuda::ExpertWeights`] documents.
#[derive(Clone)]
struct Fp8Scales {
    /// `[slots · 2 · ⌈I/128⌉, ⌈hidden/128⌉]`: slot s's gate blocks, then its up blocks.
    gate_up: Tensor,
    /// `[slots, ⌈hidden/128⌉, ⌈I/128⌉]`.
    down: Tensor,
}

/// One expert's three projections as loaded: gate and up `[I, hidden]`, down `[hidden, I]`.
type Projections = [ExpertTensor; 3];

impl LayerExperts {
    /// Layer `l`'s stacks for `experts` (first occurrence of each kept, in order): taken from
    /// `old`'s stacks where it holds an expert (a copy, no checkpoint read), else loaded through
    /// `loader`; with the device slot table when `slot_table`. e4m3 where the loader holds
    /// experts so ([`Loader::experts_fp8`]) and every expert came as e4m3; otherwise any e4m3
    /// expert is dequantised to the compute dtype (one format per stack).
    fn build(
        cfg: &ModelConfig,
        loader: &Loader,
        l: usize,
        experts: &[usize],
        old: Option<&LayerExperts>,
        slot_table: bool,
    ) -> Result<LayerExperts> {
        let (h, inner) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let ib = inner.div_ceil(fp8::KERNEL_BLOCK);
        let mut slots = BTreeMap::new();
        let mut held: Vec<Projections> = Vec::new();
        for &e in experts {
            if e >= cfg.n_routed_experts {
                return Err(EngineError::InvalidInput(format!(
                    "expert {e} does not exist (n_routed_experts is {})",
                    cfg.n_routed_experts
                )));
            }
            if slots.contains_key(&e) {
                continue;
            }
            slots.insert(e, slots.len());
            let projections = match old.and_then(|o| o.slots.get(&e).map(|&s| (o, s))) {
                Some((o, s)) => o.projections(s, inner, ib)?,
                None => {
                    let p = format!("model.layers.{l}.mlp.experts.{e}");
                    [
                        loader.get_expert(&format!("{p}.gate_proj.weight"), &[inner, h])?,
                        loader.get_expert(&format!("{p}.up_proj.weight"), &[inner, h])?,
                        loader.get_expert(&format!("{p}.down_proj.weight"), &[h, inner])?,
                    ]
                }
            };
            held.push(projections);
        }
        if slots.is_empty() {
            return Err(EngineError::InvalidInput(
                "experts: a shard holds at least one expert".into(),
            ));
        }
        let slot_of = if slot_table {
            let mut table = vec![-1i32; cfg.n_routed_experts];
            for (&e, &s) in &slots {
                table[e] = s as i32;
            }
            Some(Tensor::from_vec(
                table,
                cfg.n_routed_experts,
                loader.device(),
            )?)
        } else {
            None
        };
        let keep = loader.experts_fp8() || loader.experts_int4();
        let (gate_up, down, quant) = Self::stack(&held, keep, loader.dtype())?;
        Ok(LayerExperts {
            slots,
            // [slots · 2I, hidden]
            gate_up,
            // [slots, hidden, I]
            down,
            quant,
            slot_of,
        })
    }

    /// The stacks of `held` experts' projections: `gate_up [slots · 2I, hidden]`, `down [slots,
    /// hidden, I]`, with their block scales when `keep` and every projection is e4m3, or as INT4
    /// when `keep` and every projection is INT4 in groups the kernels take (one group size and
    /// one zero-point form for the gate and up matrices, one for the down ones); otherwise in
    /// `dtype`, any quantised projection dequantised (one format per stack).
    fn stack(
        held: &[Projections],
        keep: bool,
        dtype: DType,
    ) -> Result<(Tensor, Tensor, StackQuant)> {
        let all_fp8 = held
            .iter()
            .flatten()
            .all(|p| matches!(p, ExpertTensor::Fp8 { .. }));
        if keep && let Some(int4) = Self::int4_stacks(held)? {
            return Ok(int4);
        }
        if all_fp8 && keep {
            let part = |i: usize, scale: bool| -> Vec<Tensor> {
                held.iter()
                    .filter_map(|p| match &p[i] {
                        ExpertTensor::Fp8 { q, scale: s } => {
                            Some(if scale { s } else { q }.clone())
                        }
                        _ => None,
                    })
                    .collect()
            };
            let (gate, up) = (part(0, false), part(1, false));
            let (gate_s, up_s) = (part(0, true), part(1, true));
            let interleave = |a: Vec<Tensor>, b: Vec<Tensor>| -> Vec<Tensor> {
                a.into_iter().zip(b).flat_map(|(x, y)| [x, y]).collect()
            };
            let scales = Fp8Scales {
                // [slots · 2 · ⌈I/128⌉, ⌈hidden/128⌉]
                gate_up: Tensor::cat(&interleave(gate_s, up_s), 0)?,
                // [slots, ⌈hidden/128⌉, ⌈I/128⌉]
                down: Tensor::stack(&part(2, true), 0)?,
            };
            return Ok((
                Tensor::cat(&interleave(gate, up), 0)?,
                Tensor::stack(&part(2, false), 0)?,
                StackQuant::Fp8(scales),
            ));
        }
        let dense = |p: &ExpertTensor| match p {
            ExpertTensor::Dense(t) => Ok(t.clone()),
            ExpertTensor::Fp8 { q, scale } => fp8::dequantize_matrix(q, scale, dtype),
            ExpertTensor::Int4(t) => t.dequantize(dtype),
        };
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for [g, u, d] in held {
            gate_up.push(dense(g)?);
            gate_up.push(dense(u)?);
            down.push(dense(d)?);
        }
        Ok((
            Tensor::cat(&gate_up, 0)?,
            Tensor::stack(&down, 0)?,
            StackQuant::None,
        ))
    }

    /// [`stack`](Self::stack)'s INT4 stacks, or `None` when not every projection is INT4 in
    /// groups the kernels take.
    fn int4_stacks(held: &[Projections]) -> Result<Option<(Tensor, Tensor, StackQuant)>> {
        let int4 = |i: usize| -> Option<Vec<&Int4Tensor>> {
            held.iter()
                .map(|p| match &p[i] {
                    ExpertTensor::Int4(t) => Some(t),
                    _ => None,
                })
                .collect()
        };
        let (Some(gate), Some(up), Some(down)) = (int4(0), int4(1), int4(2)) else {
            return Ok(None);
        };
        // One group size and zero-point form per stack, one the kernels take.
        let uniform = |ts: &[&Int4Tensor]| {
            ts.iter().all(|t| {
                t.group == ts[0].group
                    && t.zero.is_some() == ts[0].zero.is_some()
                    && crate::cuda::Int4Groups::kernel_group(t.group)
            })
        };
        let gate_up: Vec<&Int4Tensor> = gate.iter().zip(&up).flat_map(|(g, u)| [*g, *u]).collect();
        if gate_up.is_empty() || !uniform(&gate_up) || !uniform(&down) {
            return Ok(None);
        }
        let groups = |ts: &[&Int4Tensor]| -> Result<Int4Groups> {
            let cat = |f: &dyn Fn(&Int4Tensor) -> Option<Tensor>| -> Result<Option<Tensor>> {
                let parts: Option<Vec<Tensor>> = ts.iter().map(|t| f(t)).collect();
                Ok(match parts {
                    Some(p) => Some(Tensor::cat(&p, 0)?),
                    None => None,
                })
            };
            let scale = cat(&|t| Some(t.scale.clone()))?
                .ok_or_else(|| EngineError::Internal("INT4 stack: no scales".into()))?;
            Ok(Int4Groups {
                scale,
                zero: cat(&|t| t.zero.clone())?,
                group: ts[0].group,
            })
        };
        let q_gate_up: Vec<Tensor> = gate_up.iter().map(|t| t.q.clone()).collect();
        let q_down: Vec<Tensor> = down.iter().map(|t| t.q.clone()).collect();
        Ok(Some((
            // [slots · 2I, hidden / 2]
            Tensor::cat(&q_gate_up, 0)?,
            // [slots, hidden, I / 2]
            Tensor::stack(&q_down, 0)?,
            StackQuant::Int4 {
                gate_up: groups(&gate_up)?,
                down: groups(&down)?,
            },
        )))
    }

    /// Slot `s`'s three projections, copied out of the stacks (`ib` = ⌈I/128⌉).
    fn projections(&self, s: usize, inner: usize, ib: usize) -> Result<Projections> {
        let gate = self.gate_up.narrow(0, 2 * s * inner, inner)?;
        let up = self.gate_up.narrow(0, (2 * s + 1) * inner, inner)?;
        let down = self.down.get(s)?;
        Ok(match &self.quant {
            StackQuant::None => [
                ExpertTensor::Dense(gate),
                ExpertTensor::Dense(up),
                ExpertTensor::Dense(down),
            ],
            StackQuant::Int4 {
                gate_up: g,
                down: d,
            } => {
                let h = self.down.dim(1)?;
                [
                    ExpertTensor::Int4(g.rows(gate, 2 * s * inner, inner)?),
                    ExpertTensor::Int4(g.rows(up, (2 * s + 1) * inner, inner)?),
                    ExpertTensor::Int4(d.rows(down, s * h, h)?),
                ]
            }
            StackQuant::Fp8(sc) => [
                ExpertTensor::Fp8 {
                    q: gate,
                    scale: sc.gate_up.narrow(0, 2 * s * ib, ib)?,
                },
                ExpertTensor::Fp8 {
                    q: up,
                    scale: sc.gate_up.narrow(0, (2 * s + 1) * ib, ib)?,
                },
                ExpertTensor::Fp8 {
                    q: down,
                    scale: sc.down.get(s)?,
                },
            ],
        })
    }

    /// The stacks as the expert kernels take them.
    fn weights(&self) -> crate::cuda::ExpertWeights<'_> {
        use crate::cuda::ExpertQuant;
        let mut w = crate::cuda::ExpertWeights {
            gate_up: &self.gate_up,
            down: &self.down,
            quant: match &self.quant {
                StackQuant::None => ExpertQuant::None,
                StackQuant::Fp8(s) => ExpertQuant::Fp8 {
                    gate_up: &s.gate_up,
                    down: &s.down,
                },
                StackQuant::Int4 { gate_up, down } => ExpertQuant::Int4 {
                    gate_up: gate_up.view(),
                    down: down.view(),
                },
            },
            wgmma: true,
            grouped_from: 0.0,
        };
        w.grouped_from = crate::cuda::grouped_min_pairs_per_slot(&w.quant);
        w
    }

    /// The stacks in `dtype` for the candle paths: as held, or quantised stacks dequantised
    /// (per call: those paths are the fallback of shapes the kernels do not take).
    fn dense(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        let sc = match &self.quant {
            StackQuant::None => return Ok((self.gate_up.clone(), self.down.clone())),
            StackQuant::Int4 { gate_up, down } => {
                let (slots, h, half) = self.down.dims3()?;
                let d = down
                    .tensor(self.down.reshape((slots * h, half))?)
                    .dequantize(dtype)?
                    .reshape((slots, h, 2 * half))?;
                return Ok((gate_up.tensor(self.gate_up.clone()).dequantize(dtype)?, d));
            }
            StackQuant::Fp8(sc) => sc,
        };
        let (rows, hidden) = self.gate_up.dims2()?;
        let inner = self.down.dim(2)?;
        let matrices = rows / inner.max(1);
        let blocks = |n: usize| n.div_ceil(fp8::KERNEL_BLOCK);
        // [slots · 2, I, hidden] with [slots · 2, ⌈I/128⌉, ⌈hidden/128⌉] scales.
        let gate_up = fp8::dequantize_e4m3(
            &self.gate_up.reshape((matrices, inner, hidden))?,
            &sc.gate_up
                .reshape((matrices, blocks(inner), blocks(hidden)))?,
            dtype,
        )?
        .reshape((rows, hidden))?;
        let down = fp8::dequantize_e4m3(&self.down, &sc.down, dtype)?;
        Ok((gate_up, down))
    }
}

/// Routed-expert weights held in this process.
pub struct ExpertShard {
    layers: BTreeMap<usize, LayerExperts>,
    inner: usize,
    device: Device,
    dtype: DType,
    /// `forward_*` return f32 instead of the compute dtype (see
    /// [`with_f32_output`](Self::with_f32_output)).
    f32_output: bool,
    /// On a CUDA device, the combine counters of the calls queued on this shard's own stream
    /// (the in-process engine's; [`crate::cuda::combine_counters`]), so that a decode step's
    /// down kernel also combines. An expert worker's calls queue on its sessions' streams and
    /// bring their own.
    counters: Option<Tensor>,
}

impl ExpertShard {
    /// Loads `model.layers.{l}.mlp.experts.{e}.*` for every (l, e) of `spec`.
    pub fn load(cfg: &ModelConfig, loader: &Loader, spec: &ShardSpec) -> Result<Self> {
        if let Some(g) = crate::cuda::gpu(loader.device()) {
            g.preload()?;
        }
        let inner = cfg.moe_intermediate_size;
        let mut layers = BTreeMap::new();
        for &l in &spec.layers {
            if !cfg.is_moe_layer(l) {
                return Err(EngineError::InvalidInput(format!(
                    "layer {l} has no routed experts (MoE layers: {:?})",
                    cfg.moe_layers()
                )));
            }
            let on_gpu = crate::cuda::gpu(loader.device()).is_some();
            let layer = LayerExperts::build(cfg, loader, l, &spec.experts, None, on_gpu)?;
            layers.insert(l, layer);
        }
        Ok(ExpertShard {
            layers,
            inner,
            device: loader.device().clone(),
            dtype: loader.dtype(),
            f32_output: false,
            counters: crate::cuda::combine_counters(loader.device(), cfg.hidden_size)?,
        })
    }

    /// A shard of the same layers holding, in each layer `l`, the experts `experts[&l]` instead
    /// (live re-placement on an expert worker; the layers may differ in what they hold): experts
    /// held here are taken from this shard's stacks (a copy, no read from the checkpoint), the
    /// others loaded through `loader` (the same checkpoint or synthetic model, same device and
    /// dtype). Every layer of this shard must be listed, and no other. This shard is left as it
    /// is, so the caller can go on computing with it until it swaps the new one in.
    pub fn regroup(
        &self,
        cfg: &ModelConfig,
        loader: &Loader,
        experts: &BTreeMap<usize, Vec<usize>>,
    ) -> Result<ExpertShard> {
        if let Some(l) = experts.keys().find(|l| !self.layers.contains_key(l)) {
            return Err(EngineError::InvalidInput(format!(
                "layer {l} is not one of this shard's layers ({:?})",
                self.layers.keys().collect::<Vec<_>>()
            )));
        }
        let mut layers = BTreeMap::new();
        for (&l, old) in &self.layers {
            let list = experts.get(&l).ok_or_else(|| {
                EngineError::InvalidInput(format!("layer {l}: no experts given for it"))
            })?;
            // A layer whose list is what it holds, slot for slot, keeps its stacks (shared, not
            // copied): only the layers that change take new memory while the old shard lives.
            let same = list.len() == old.slots.len()
                && list
                    .iter()
                    .enumerate()
                    .all(|(i, e)| old.slots.get(e) == Some(&i));
            let layer = if same {
                old.clone()
            } else {
                LayerExperts::build(cfg, loader, l, list, Some(old), old.slot_of.is_some())?
            };
            layers.insert(l, layer);
        }
        Ok(ExpertShard {
            layers,
            inner: self.inner,
            device: self.device.clone(),
            dtype: self.dtype,
            f32_output: self.f32_output,
            counters: self.counters.clone(),
        })
    }

    /// Returns the weighted sums in f32 (the accumulator, not rounded to the compute dtype): for
    /// expert workers, whose partial sums the gate adds to other workers' before rounding once.
    pub fn with_f32_output(mut self) -> Self {
        self.f32_output = true;
        self
    }

    /// The dtype of `forward_*`'s result.
    fn output_dtype(&self) -> DType {
        if self.f32_output {
            DType::F32
        } else {
            self.dtype
        }
    }

    /// Whether this shard holds expert `expert` of `layer`.
    pub fn has(&self, layer: usize, expert: usize) -> bool {
        self.layers
            .get(&layer)
            .is_some_and(|l| l.slots.contains_key(&expert))
    }

    /// The (layer, expert) pairs held.
    pub fn held(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.layers
            .iter()
            .flat_map(|(&l, le)| le.slots.keys().map(move |&e| (l, e)))
    }

    /// `out[t] = Σ w · expert(x[t])` over `assignments`, a list of (token row, expert, weight);
    /// a token may appear several times (once per expert it was routed to here).
    ///
    /// Two ways to compute it, with the same result up to summation order: one expert at a
    /// time over its tokens (reads only the experts used, but costs ~10 kernel launches per
    /// expert), or every held expert over every token as two GEMMs (reads every expert's
    /// weights once, a handful of launches). On a GPU the launches dominate as soon as there
    /// is about one assignment per held expert, so the dense form takes over there, up to
    /// [`DENSE_MAX_ROWS`] rows: beyond that its wasted FLOPs (held/k times the useful ones)
    /// cost more than the launches it saves (a 2,048-token prefill ran 10× slower dense). The
    /// CPU always goes expert by expert (its FLOPs are what cost).
    ///
    /// With the fused CUDA kernels (engine/src/cuda), prefill-sized batches in bf16 (at least
    /// [`crate::cuda::ExpertWeights::grouped_from`] pairs per held expert) take the grouped GEMM:
    /// pairs sorted into padded per-expert segments on the device, one tensor-core launch per
    /// projection for all experts, then the combine. Other batches up to [`DENSE_MAX_ROWS`] rows
    /// take a fourth way: the pairs are sorted by expert on the host and two grouped GEMV kernels read
    /// each used expert's weights once for all of its tokens (f32 accumulation, f32 result).
    pub fn forward_assigned(
        &self,
        layer: usize,
        x: &Tensor,
        assignments: &[(u32, u32, f32)],
    ) -> Result<Tensor> {
        let le = self.layer(layer)?;
        let t = x.dim(0)?;
        if self.dtype == DType::BF16
            && crate::cuda::grouped_experts_enabled()
            && crate::cuda::takes_grouped(assignments.len(), le.slots.len(), &le.weights())
            && let Some(g) = crate::cuda::gpu(&self.device)
        {
            let (le, resolved) = self.resolve(layer, t, assignments)?;
            let pairs = crate::cuda::HostPairs::build(t, le.slots.len(), &resolved, &self.device)?;
            if let Some(out) = g.experts_pairs(x, &pairs, &le.weights())? {
                return Ok(out.to_dtype(self.output_dtype())?);
            }
        }
        if t <= DENSE_MAX_ROWS
            && let Some(g) = crate::cuda::gpu(&self.device)
        {
            let (le, resolved) = self.resolve(layer, t, assignments)?;
            if resolved.is_empty() {
                return Ok(Tensor::zeros(x.dims(), self.dtype, &self.device)?);
            }
            let host =
                crate::cuda::HostAssignments::build(t, le.slots.len(), &resolved, &self.device)?;
            if let Some(out) = g.experts_assigned(x, &host, &le.weights())? {
                return Ok(out.to_dtype(self.output_dtype())?);
            }
        }
        let dense =
            !self.device.is_cpu() && 2 * assignments.len() >= le.slots.len() && t <= DENSE_MAX_ROWS;
        if dense {
            self.forward_dense(layer, x, assignments)
        } else {
            self.forward_sparse(layer, x, assignments)
        }
    }

    /// Checks `assignments` against the batch (`t` rows) and the held experts of `layer`, and
    /// resolves each to `(row, slot, weight)`.
    fn resolve(
        &self,
        layer: usize,
        t: usize,
        assignments: &[(u32, u32, f32)],
    ) -> Result<(&LayerExperts, Vec<Resolved>)> {
        let le = self.layer(layer)?;
        let resolved = assignments
            .iter()
            .map(|&(row, expert, w)| {
                if row as usize >= t {
                    return Err(EngineError::InvalidInput(format!(
                        "assignment names token row {row}, but the batch has {t} rows"
                    )));
                }
                let slot = le.slots.get(&(expert as usize)).copied().ok_or_else(|| {
                    EngineError::InvalidInput(format!(
                        "expert {expert} of layer {layer} is not held by this shard"
                    ))
                })?;
                Ok((row as usize, slot, w))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((le, resolved))
    }

    fn layer(&self, layer: usize) -> Result<&LayerExperts> {
        self.layers.get(&layer).ok_or_else(|| {
            EngineError::InvalidInput(format!(
                "layer {layer}: no experts of it are held by this shard"
            ))
        })
    }

    /// Layer `layer`'s `[n_routed_experts]` slot table (i32, −1 for experts not held), on a GPU.
    pub fn slot_table(&self, layer: usize) -> Result<Option<&Tensor>> {
        Ok(self.layer(layer)?.slot_of.as_ref())
    }

    /// A slot table for layer `layer` that maps only `experts` (each held here) to their slots:
    /// for a call that computes some of the held experts (their replicas elsewhere take the rest).
    pub fn slot_table_for(&self, layer: usize, experts: &[u32]) -> Result<Tensor> {
        let le = self.layer(layer)?;
        let Some(n) = le.slot_of.as_ref().map(|t| t.elem_count()) else {
            return Err(EngineError::InvalidInput(
                "slot tables are for a shard on a GPU (device-ordered calls)".into(),
            ));
        };
        let mut table = vec![-1i32; n];
        for &e in experts {
            let (Some(&slot), Some(entry)) =
                (le.slots.get(&(e as usize)), table.get_mut(e as usize))
            else {
                return Err(EngineError::InvalidInput(format!(
                    "expert {e} of layer {layer} is not held by this shard"
                )));
            };
            *entry = slot as i32;
        }
        Ok(Tensor::from_vec(table, n, &self.device)?)
    }

    /// The routed experts of `layer` for a routing that is on the GPU, restricted to the experts
    /// that `slot_of` maps (see [`slot_table`](Self::slot_table)): `[T, hidden]` f32, rows with
    /// no expert here zero. `None` when the device kernels do not take these shapes.
    pub fn forward_routed_device(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &crate::cuda::DeviceRouting,
        slot_of: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some(g) = crate::cuda::gpu(x.device()) else {
            return Ok(None);
        };
        let le = self.layer(layer)?;
        g.experts_routed(
            x,
            routing,
            slot_of,
            &le.weights(),
            usize::MAX,
            self.counters.as_ref(),
        )
    }

    /// [`forward_routed_device`](Self::forward_routed_device) for an expert worker's
    /// device-ordered call: the rows and routing read where they are (`input`, the gate's shared
    /// buffer), the `[T, hidden]` f32 result written at device address `into` (the shared output
    /// buffer), with `wait` the wait for the gate's flag done in the first kernel, and with
    /// `done` the call's end signalled by its last kernel where it can be; every kernel queued
    /// on `stream` (a handle of this shard's GPU: the caller's session stream, which need not
    /// be the one the weights or `slot_of` were made on), with that stream's combine counters
    /// (`counters`, [`crate::cuda::combine_counters`]; `None`: a separate combine). `None` when
    /// the device kernels do not take the call (nothing queued), else whether `done` was
    /// signalled (if not, the caller signals it after the call).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_routed_at(
        &self,
        stream: &Device,
        layer: usize,
        input: &crate::cuda::RowsAt,
        slot_of: &Tensor,
        into: u64,
        flags: (
            Option<&crate::cuda::WaitFlag>,
            Option<&crate::cuda::DoneFlag>,
        ),
        counters: Option<&Tensor>,
    ) -> Result<Option<bool>> {
        let Some(g) = crate::cuda::gpu(stream) else {
            return Ok(None);
        };
        let le = self.layer(layer)?;
        g.experts_routed_at(
            input,
            slot_of,
            &le.weights(),
            usize::MAX,
            into,
            flags,
            counters,
        )
    }

    /// Expert by expert.
    pub fn forward_sparse(
        &self,
        layer: usize,
        x: &Tensor,
        assignments: &[(u32, u32, f32)],
    ) -> Result<Tensor> {
        let (t, hidden) = x.dims2()?;
        let (le, resolved) = self.resolve(layer, t, assignments)?;
        let (gate_up, down) = le.dense(self.dtype)?;
        let inner = self.inner;
        let mut by_slot: BTreeMap<usize, (Vec<u32>, Vec<f32>)> = BTreeMap::new();
        for (row, slot, w) in resolved {
            let entry = by_slot.entry(slot).or_default();
            entry.0.push(row as u32);
            entry.1.push(w);
        }
        // Accumulate in f32 whatever the compute dtype: up to k experts add into each row.
        let mut out = Tensor::zeros((t, hidden), DType::F32, &self.device)?;
        for (slot, (rows, ws)) in by_slot {
            let n = rows.len();
            let idx = Tensor::from_vec(rows, n, &self.device)?;
            let xe = x.index_select(&idx, 0)?;
            let gu = xe.matmul(&gate_up.narrow(0, 2 * slot * inner, 2 * inner)?.t()?)?;
            let h = (gu.narrow(1, 0, inner)?.silu()? * gu.narrow(1, inner, inner)?)?;
            let ye = h.matmul(&down.get(slot)?.t()?)?.to_dtype(DType::F32)?;
            let w = Tensor::from_vec(ws, (n, 1), &self.device)?;
            out = out.index_add(&idx, &ye.broadcast_mul(&w)?, 0)?;
        }
        Ok(out.to_dtype(self.output_dtype())?)
    }

    /// Every held expert over every token; the weights of unassigned (token, expert) pairs are
    /// zero.
    pub fn forward_dense(
        &self,
        layer: usize,
        x: &Tensor,
        assignments: &[(u32, u32, f32)],
    ) -> Result<Tensor> {
        let (t, hidden) = x.dims2()?;
        let (le, resolved) = self.resolve(layer, t, assignments)?;
        let (n, inner) = (le.slots.len(), self.inner);
        let mut weights = vec![0f32; t * n];
        for (row, slot, w) in resolved {
            weights[row * n + slot] += w;
        }
        let (gate_up, down) = le.dense(self.dtype)?;
        let gu = x.matmul(&gate_up.t()?)?.reshape((t, n, 2, inner))?;
        let h = (gu.narrow(2, 0, 1)?.silu()? * gu.narrow(2, 1, 1)?)?
            .reshape((t, n, inner))?
            .transpose(0, 1)?
            .contiguous()?; // [n, T, I]
        let y = h.matmul(&down.transpose(1, 2)?)?; // [n, T, hidden]
        let y = y.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?; // [T, n, hidden]
        let w = Tensor::from_vec(weights, (t, 1, n), &self.device)?;
        let out = w.matmul(&y)?.reshape((t, hidden))?;
        Ok(out.to_dtype(self.output_dtype())?)
    }
}

impl Experts for ExpertShard {
    /// On a GPU with the kernels, every held layer routes on the device
    /// ([`dispatch_device`](Experts::dispatch_device)); a batch its kernels do not take would
    /// copy the routing to the host, which spoils the capture and leaves that shape eager.
    fn graph_capturable(&self) -> bool {
        crate::cuda::gpu(&self.device).is_some()
            && self.layers.values().all(|l| l.slot_of.is_some())
    }

    fn dispatch_device(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &crate::cuda::DeviceRouting,
    ) -> Result<Option<PendingExperts>> {
        let Some(g) = crate::cuda::gpu(x.device()) else {
            return Ok(None);
        };
        let le = self.layer(layer)?;
        let Some(slot_of) = &le.slot_of else {
            return Ok(None);
        };
        Ok(g.experts_routed(
            x,
            routing,
            slot_of,
            &le.weights(),
            DENSE_MAX_ROWS,
            self.counters.as_ref(),
        )?
        .map(PendingExperts::ready))
    }

    fn dispatch(&self, layer: usize, x: &Tensor, routing: &Routing) -> Result<PendingExperts> {
        let mut assignments = Vec::with_capacity(routing.expert_ids.len());
        for t in 0..routing.num_tokens() {
            for (e, w) in routing.token(t) {
                assignments.push((t as u32, e, w));
            }
        }
        Ok(PendingExperts::ready(self.forward_assigned(
            layer,
            x,
            &assignments,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelFiles;

    /// A regrouped shard (some experts kept from the old stacks, some loaded; each layer its own
    /// list) computes exactly what a shard loaded fresh with those experts computes, and the old
    /// shard is unchanged.
    #[test]
    fn a_regrouped_shard_equals_a_fresh_load_of_its_experts_layer_by_layer() {
        let files = ModelFiles::open_or_embedded(None).expect("embedded model");
        let cfg = &files.config;
        let loader = files.loader(&Device::Cpu, DType::F32);
        let spec = |experts: Vec<usize>| ShardSpec {
            layers: cfg.moe_layers(),
            experts,
        };
        let old = ExpertShard::load(cfg, &loader, &spec(vec![0, 1, 2])).expect("old");
        // The first MoE layer keeps 2 and 0 (in another order), drops 1, adds 3; every other
        // layer keeps 1 and adds 4.
        let layers = cfg.moe_layers();
        let first = layers[0];
        let target_of = |l: usize| {
            if l == first {
                vec![2, 3, 0]
            } else {
                vec![1, 4]
            }
        };
        let target: BTreeMap<usize, Vec<usize>> =
            layers.iter().map(|&l| (l, target_of(l))).collect();
        let regrouped = old.regroup(cfg, &loader, &target).expect("regroup");
        assert!(regrouped.has(first, 3) && !regrouped.has(first, 1));
        assert!(old.has(first, 1) && !old.has(first, 3));
        let x = Tensor::randn(0f32, 1.0, (4, cfg.hidden_size), &Device::Cpu).expect("x");
        for &l in &layers {
            let fresh = ExpertShard::load(cfg, &loader, &spec(target_of(l))).expect("fresh");
            let held = target_of(l);
            // Token t goes to the layer's held experts in turn.
            let assignments: Vec<(u32, u32, f32)> = (0..5)
                .map(|i| {
                    (
                        (i % 4) as u32,
                        held[i % held.len()] as u32,
                        0.1 + i as f32 / 8.0,
                    )
                })
                .collect();
            let got = regrouped
                .forward_assigned(l, &x, &assignments)
                .expect("regrouped");
            let want = fresh.forward_assigned(l, &x, &assignments).expect("fresh");
            let (got, want): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
                (got.to_vec2().expect("got"), want.to_vec2().expect("want"));
            assert_eq!(got, want, "layer {l}");
            if l != first {
                assert!(regrouped.has(l, 4) && !regrouped.has(l, 0), "layer {l}");
            }
        }
        // Nothing held in a layer, an expert the model lacks, a layer left out or one the
        // shard does not have is refused by name.
        let with = |l: usize, experts: Vec<usize>| {
            let mut t = target.clone();
            t.insert(l, experts);
            t
        };
        let err = old
            .regroup(cfg, &loader, &with(first, vec![]))
            .err()
            .expect("empty");
        assert!(err.to_string().contains("at least one"), "{err}");
        let n = cfg.n_routed_experts;
        let err = old
            .regroup(cfg, &loader, &with(first, vec![n]))
            .err()
            .expect("beyond");
        assert!(err.to_string().contains(&format!("expert {n}")), "{err}");
        let mut missing = target.clone();
        missing.remove(&first);
        let err = old.regroup(cfg, &loader, &missing).err().expect("missing");
        assert!(err.to_string().contains(&format!("layer {first}")), "{err}");
        let err = old
            .regroup(cfg, &loader, &with(0, vec![1]))
            .err()
            .expect("not a shard layer");
        assert!(err.to_string().contains("layer 0"), "{err}");
    }

    /// Every slot of `le` (stacked from `held`, in order) gives back its projections as they came
    /// (`parts`: what identifies one), and the candle fallback's dequantised stacks hold each
    /// projection's own dequantisation (`deq`, f32 bits); `ib` = ⌈I/128⌉ for e4m3 stacks.
    fn assert_slots_round_trip<P: PartialEq + std::fmt::Debug>(
        le: &LayerExperts,
        held: &[Projections],
        ib: usize,
        parts: impl Fn(&ExpertTensor) -> P,
        deq: impl Fn(&ExpertTensor) -> Vec<u32>,
    ) {
        let inner = le.gate_up.dim(0).expect("rows") / (2 * held.len());
        let bits = fp8::f32_bits;
        let (gate_up, down) = le.dense(DType::F32).expect("dense");
        for (s, p) in held.iter().enumerate() {
            let back = le.projections(s, inner, ib).expect("projections");
            for i in 0..3 {
                assert_eq!(parts(&back[i]), parts(&p[i]), "slot {s}, projection {i}");
            }
            let gate = gate_up.narrow(0, 2 * s * inner, inner).expect("gate");
            let up = gate_up.narrow(0, (2 * s + 1) * inner, inner).expect("up");
            assert_eq!(bits(&gate), deq(&p[0]), "slot {s} gate");
            assert_eq!(bits(&up), deq(&p[1]), "slot {s} up");
            assert_eq!(
                bits(&down.get(s).expect("down")),
                deq(&p[2]),
                "slot {s} down"
            );
        }
    }

    /// e4m3 stacks keep each expert's own block grid (partial edge blocks here: inner 160 =
    /// 128 + 32, hidden 288 = 2 · 128 + 32) where the kernels read it: a slot's projections
    /// copied back out are its bytes and scales, restacking in another order (as `regroup` does)
    /// moves them whole, and the candle fallback's dequantised stacks are each expert's own
    /// dequantisation.
    #[test]
    fn fp8_stacks_keep_each_experts_blocks() {
        let (h, inner) = (288, 160);
        let q = |rows: usize, cols: usize| -> ExpertTensor {
            let w = Tensor::randn(0f32, 0.02, (rows, cols), &Device::Cpu).expect("w");
            let (q, scale) = fp8::quantize_e4m3(&w).expect("quantise");
            ExpertTensor::Fp8 { q, scale }
        };
        let held: Vec<Projections> = (0..3)
            .map(|_| [q(inner, h), q(inner, h), q(h, inner)])
            .collect();
        let bits = fp8::f32_bits;
        let parts = |p: &ExpertTensor| match p {
            ExpertTensor::Fp8 { q, scale } => (bits(q), bits(scale)),
            _ => panic!("an e4m3 projection"),
        };
        let deq = |p: &ExpertTensor| match p {
            ExpertTensor::Fp8 { q, scale } => {
                bits(&fp8::dequantize_matrix(q, scale, DType::F32).expect("dequantise"))
            }
            _ => panic!("an e4m3 projection"),
        };
        let layer = |held: &[Projections]| {
            let (gate_up, down, quant) =
                LayerExperts::stack(held, true, DType::F32).expect("stack");
            LayerExperts {
                slots: (0..held.len()).map(|e| (e, e)).collect(),
                gate_up,
                down,
                quant,
                slot_of: None,
            }
        };
        let le = layer(&held);
        let StackQuant::Fp8(sc) = &le.quant else {
            panic!("e4m3 stacks")
        };
        assert_eq!(le.gate_up.dims(), &[3 * 2 * inner, h]);
        assert_eq!(le.gate_up.dtype(), DType::F8E4M3);
        assert_eq!(sc.gate_up.dims(), &[3 * 2 * 2, 3]);
        assert_eq!(le.down.dims(), &[3, h, inner]);
        assert_eq!(sc.down.dims(), &[3, 3, 2]);
        assert_slots_round_trip(&le, &held, 2, parts, deq);
        // Restacked as [2, 0]: the new slots hold the old ones' bytes and scales.
        let moved: Vec<Projections> = [2, 0]
            .iter()
            .map(|&s| le.projections(s, inner, 2).expect("projections"))
            .collect();
        let re = layer(&moved);
        for (new, old) in [(0, 2), (1, 0)] {
            let back = re.projections(new, inner, 2).expect("projections");
            for i in 0..3 {
                assert_eq!(
                    parts(&back[i]),
                    parts(&held[old][i]),
                    "slot {new}, projection {i}"
                );
            }
        }
        // Not kept e4m3 (or a mix): one dense stack of the dequantised values.
        let (dense_gu, _, none) = LayerExperts::stack(&held, false, DType::F32).expect("stack");
        assert!(matches!(none, StackQuant::None));
        let (gate_up, _) = le.dense(DType::F32).expect("dense");
        assert_eq!(bits(&dense_gu), bits(&gate_up));
    }

    /// INT4 stacks keep each expert's nibbles and groups (zero points too) where the kernels read
    /// them: a slot's projections copied back out are its own, and the candle fallback's
    /// dequantised stacks are each expert's own dequantisation. Groups the kernels do not take
    /// (8 columns), or a mix of group sizes within a stack, give one dense stack instead.
    #[test]
    fn int4_stacks_keep_each_experts_groups() {
        let (h, inner) = (256, 96);
        let q = |rows: usize, cols: usize, group: usize, zero: bool| -> ExpertTensor {
            let w = Tensor::randn(0f32, 0.02, (rows, cols), &Device::Cpu).expect("w");
            let mut t = Int4Tensor::quantize(&w, group).expect("quantise");
            if zero {
                let groups = cols.div_ceil(group);
                let z: Vec<u8> = (0..rows * groups).map(|i| (i % 7 + 5) as u8).collect();
                t.zero = Some(Tensor::from_vec(z, (rows, groups), &Device::Cpu).expect("z"));
            }
            ExpertTensor::Int4(t)
        };
        // `n` experts whose gate, up and down are quantised in groups of `g` (down with zero
        // points when `zero`).
        let layer = |n: usize, [gg, gu, gd]: [usize; 3], zero: bool| -> Vec<Projections> {
            (0..n)
                .map(|_| {
                    [
                        q(inner, h, gg, false),
                        q(inner, h, gu, false),
                        q(h, inner, gd, zero),
                    ]
                })
                .collect()
        };
        let held = layer(3, [128, 128, 32], true);
        let bits = fp8::f32_bits;
        let u8s = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<u8>()).expect("u8");
        let parts = |p: &ExpertTensor| match p {
            ExpertTensor::Int4(t) => (u8s(&t.q), bits(&t.scale), t.zero.as_ref().map(u8s), t.group),
            _ => panic!("an INT4 projection"),
        };
        let deq = |p: &ExpertTensor| match p {
            ExpertTensor::Int4(t) => bits(&t.dequantize(DType::F32).expect("dequantise")),
            _ => panic!("an INT4 projection"),
        };
        let (gate_up, down, quant) = LayerExperts::stack(&held, true, DType::F32).expect("stack");
        let StackQuant::Int4 {
            gate_up: g,
            down: d,
        } = &quant
        else {
            panic!("INT4 stacks")
        };
        assert_eq!(gate_up.dims(), &[3 * 2 * inner, h / 2]);
        assert_eq!(gate_up.dtype(), DType::U8);
        assert_eq!(g.scale.dims(), &[3 * 2 * inner, 2]);
        assert!(g.zero.is_none());
        assert_eq!(down.dims(), &[3, h, inner / 2]);
        assert_eq!(d.scale.dims(), &[3 * h, 3]);
        assert_eq!(
            d.zero.as_ref().map(|z| z.dims().to_vec()),
            Some(vec![3 * h, 3])
        );
        let le = LayerExperts {
            slots: (0..3).map(|e| (e, e)).collect(),
            gate_up,
            down,
            quant,
            slot_of: None,
        };
        assert_slots_round_trip(&le, &held, 1, parts, deq);
        // Groups of 8, or of two sizes in the gate/up stack: dequantised, one dense stack.
        for held in [layer(2, [8, 8, 32], false), layer(2, [128, 64, 32], false)] {
            let (gu, _, quant) = LayerExperts::stack(&held, true, DType::F32).expect("stack");
            assert!(matches!(quant, StackQuant::None));
            assert_eq!(gu.dims(), &[2 * 2 * inner, h]);
            assert_eq!(
                bits(&gu.narrow(0, 0, inner).expect("gate")),
                deq(&held[0][0])
            );
        }
    }
}
