//! The SwiGLU feed-forward block, `down(silu(gate(x)) ⊙ up(x))`: the dense MLP of the first
//! layers, the shared experts (one MLP `n_shared_experts` times as wide) and each routed expert.

use candle_core::Tensor;

use super::Linear;
use crate::error::Result;
use crate::weights::Loader;

#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// Loads `{prefix}.{gate,up,down}_proj.weight` for a hidden → `inner` → hidden block.
    pub fn new(loader: &Loader, prefix: &str, hidden: usize, inner: usize) -> Result<Self> {
        Ok(Mlp {
            gate_proj: Linear::new(loader, &format!("{prefix}.gate_proj"), hidden, inner, false)?,
            up_proj: Linear::new(loader, &format!("{prefix}.up_proj"), hidden, inner, false)?,
            down_proj: Linear::new(loader, &format!("{prefix}.down_proj"), inner, hidden, false)?,
        })
    }

    /// `x: [T, hidden] -> [T, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&(gate * up)?)
    }
}
