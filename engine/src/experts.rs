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
use crate::layers::Mlp;
use crate::router::Routing;
use crate::weights::Loader;

/// Routed-expert output that may still be computing elsewhere.
pub struct PendingExperts(Box<dyn FnOnce() -> Result<Tensor> + Send>);

impl PendingExperts {
    /// Already computed.
    pub fn ready(t: Tensor) -> Self {
        PendingExperts(Box::new(move || Ok(t)))
    }

    /// Computed when [`wait`](Self::wait) runs `f` (e.g. blocking on remote replies).
    pub fn deferred(f: impl FnOnce() -> Result<Tensor> + Send + 'static) -> Self {
        PendingExperts(Box::new(f))
    }

    pub fn wait(self) -> Result<Tensor> {
        (self.0)()
    }
}

/// Computes the routed-expert part of an MoE layer, in two phases so that the caller can run
/// the shared experts while routed ones are away (in another process).
pub trait Experts: Send + Sync {
    /// Starts `x: [T, hidden]` (post-attention-normed) through each token's routed experts; the
    /// result is `[T, hidden]`, the weighted sum of each token's experts.
    fn dispatch(&self, layer: usize, x: &Tensor, routing: &Routing) -> Result<PendingExperts>;

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

/// Routed-expert weights held in this process.
pub struct ExpertShard {
    /// (layer, expert) → the expert's MLP.
    experts: BTreeMap<(usize, usize), Mlp>,
    device: Device,
    dtype: DType,
}

impl ExpertShard {
    /// Loads `model.layers.{l}.mlp.experts.{e}.*` for every (l, e) of `spec`.
    pub fn load(cfg: &ModelConfig, loader: &Loader, spec: &ShardSpec) -> Result<Self> {
        let mut experts = BTreeMap::new();
        for &l in &spec.layers {
            if !cfg.is_moe_layer(l) {
                return Err(EngineError::InvalidInput(format!(
                    "layer {l} has no routed experts (MoE layers: {:?})",
                    cfg.moe_layers()
                )));
            }
            for &e in &spec.experts {
                if e >= cfg.n_routed_experts {
                    return Err(EngineError::InvalidInput(format!(
                        "expert {e} does not exist (n_routed_experts is {})",
                        cfg.n_routed_experts
                    )));
                }
                let prefix = format!("model.layers.{l}.mlp.experts.{e}");
                let mlp = Mlp::new(loader, &prefix, cfg.hidden_size, cfg.moe_intermediate_size)?;
                experts.insert((l, e), mlp);
            }
        }
        Ok(ExpertShard {
            experts,
            device: loader.device().clone(),
            dtype: loader.dtype(),
        })
    }

    /// Whether this shard holds expert `expert` of `layer`.
    pub fn has(&self, layer: usize, expert: usize) -> bool {
        self.experts.contains_key(&(layer, expert))
    }

    /// The (layer, expert) pairs held.
    pub fn held(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.experts.keys().copied()
    }

    /// `out[t] = Σ w · expert(x[t])` over `assignments`, a list of (token row, expert, weight);
    /// a token may appear several times (once per expert it was routed to here).
    pub fn forward_assigned(
        &self,
        layer: usize,
        x: &Tensor,
        assignments: &[(u32, u32, f32)],
    ) -> Result<Tensor> {
        let (t, hidden) = x.dims2()?;
        let mut by_expert: BTreeMap<u32, (Vec<u32>, Vec<f32>)> = BTreeMap::new();
        for &(row, expert, w) in assignments {
            if row as usize >= t {
                return Err(EngineError::InvalidInput(format!(
                    "assignment names token row {row}, but the batch has {t} rows"
                )));
            }
            let entry = by_expert.entry(expert).or_default();
            entry.0.push(row);
            entry.1.push(w);
        }
        // Accumulate in f32 whatever the compute dtype: up to k experts add into each row.
        let mut out = Tensor::zeros((t, hidden), DType::F32, &self.device)?;
        for (expert, (rows, ws)) in by_expert {
            let mlp = self.experts.get(&(layer, expert as usize)).ok_or_else(|| {
                EngineError::InvalidInput(format!(
                    "expert {expert} of layer {layer} is not held by this shard"
                ))
            })?;
            let n = rows.len();
            let idx = Tensor::from_vec(rows, n, &self.device)?;
            let xe = x.index_select(&idx, 0)?;
            let ye = mlp.forward(&xe)?.to_dtype(DType::F32)?;
            let w = Tensor::from_vec(ws, (n, 1), &self.device)?;
            out = out.index_add(&idx, &ye.broadcast_mul(&w)?, 0)?;
        }
        Ok(out.to_dtype(self.dtype)?)
    }
}

impl Experts for ExpertShard {
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
