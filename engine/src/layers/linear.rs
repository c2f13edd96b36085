//! `y = x·Wᵀ (+ b)` with the weight as the checkpoint stores it, `[out, in]`.

use candle_core::{Module, Tensor};

use crate::error::Result;
use crate::weights::Loader;

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, in the compute dtype.
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`).
    pub fn new(
        loader: &Loader,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = loader.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(loader.get(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub fn from_weight(weight: Tensor) -> Self {
        Linear { weight, bias: None }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `x: [T, in] -> [T, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = matmul_t(x, &self.weight)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// `x [T, in] · wᵀ` with `w [out, in]`: a decode step's few rows through moemesh's tensor-core
/// kernel on a GPU ([`crate::cuda::Gpu::dense_small`]), anything else through candle (cuBLAS).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if let Some(g) = crate::cuda::gpu(x.device())
        && let Some(y) = g.dense_small(x, w, false)?
    {
        return Ok(y);
    }
    Ok(x.matmul(&w.t()?)?)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, x).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}
