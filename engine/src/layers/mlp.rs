//! The SwiGLU feed-forward block, `down(silu(gate(x)) ⊙ up(x))`: the dense MLP of the first
//! layers, the shared experts (one MLP `n_shared_experts` times as wide) and each routed expert.

use candle_core::Tensor;

use super::Linear;
use crate::error::Result;
use crate::weights::Loader;

/// The gate and up projections: separate, or (on a GPU with the fused kernels) stacked into one
/// `[2·inner, hidden]` weight so that both are one GEMM and SwiGLU one kernel.
#[derive(Debug, Clone)]
enum GateUp {
    Separate { gate_proj: Linear, up_proj: Linear },
    Stacked(Linear),
}

#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up: GateUp,
    down_proj: Linear,
}

impl Mlp {
    /// Loads `{prefix}.{gate,up,down}_proj.weight` for a hidden → `inner` → hidden block (a
    /// dense MLP layer: projections held as [`Loader::get_projection`] says).
    pub fn new(loader: &Loader, prefix: &str, hidden: usize, inner: usize) -> Result<Self> {
        Self::of(loader, hidden, inner, |name, i, o| {
            Linear::new(loader, &format!("{prefix}.{name}"), i, o, false)
        })
    }

    /// [`new`](Self::new) for an MoE layer's shared experts, held as the routed experts are
    /// where those are FP8 ([`Loader::get_shared_expert`]).
    pub fn shared_experts(
        loader: &Loader,
        prefix: &str,
        hidden: usize,
        inner: usize,
    ) -> Result<Self> {
        Self::of(loader, hidden, inner, |name, i, o| {
            Linear::new_shared_expert(loader, &format!("{prefix}.{name}"), i, o)
        })
    }

    /// The block from its three projections, `proj(name, in, out)`.
    fn of(
        loader: &Loader,
        hidden: usize,
        inner: usize,
        proj: impl Fn(&str, usize, usize) -> Result<Linear>,
    ) -> Result<Self> {
        let gate_proj = proj("gate_proj", hidden, inner)?;
        let up_proj = proj("up_proj", hidden, inner)?;
        let gate_up = if crate::cuda::gpu(loader.device()).is_some() {
            GateUp::Stacked(Linear::stack(&[&gate_proj, &up_proj])?)
        } else {
            GateUp::Separate { gate_proj, up_proj }
        };
        Ok(Mlp {
            gate_up,
            down_proj: proj("down_proj", inner, hidden)?,
        })
    }

    /// `x: [T, hidden] -> [T, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                (gate_proj.forward(x)?.silu()? * up_proj.forward(x)?)?
            }
            GateUp::Stacked(gate_up) => {
                // A decode step's few rows: both products and the SwiGLU in one kernel.
                if let Some(g) = crate::cuda::gpu(x.device())
                    && let Some(h) = g.dense_small(x, gate_up.kernel_weight(), true)?
                {
                    return self.down_proj.forward(&h);
                }
                let gu = gate_up.forward(x)?;
                match crate::cuda::gpu(x.device()).map(|g| g.silu_mul(&gu)) {
                    Some(Ok(Some(h))) => h,
                    Some(Err(e)) => return Err(e),
                    _ => {
                        let inner = gu.dim(1)? / 2;
                        (gu.narrow(1, 0, inner)?.silu()? * gu.narrow(1, inner, inner)?)?
                    }
                }
            }
        };
        self.down_proj.forward(&h)
    }
}
