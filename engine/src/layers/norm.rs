//! RMSNorm: statistics, scaling and the weight product in f32, the result cast to the dtype the
//! next matmul wants. In f32 this is exactly transformers' computation; in bf16 it rounds once
//! (after the weight) instead of twice.

use candle_core::{D, DType, Tensor};

use crate::error::Result;
use crate::weights::Loader;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `[dim]`, f32.
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(loader: &Loader, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: loader.get_f32(name, &[dim])?,
            eps,
        })
    }

    /// `x: [T, dim] -> [T, dim]`, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_as(x, x.dtype())
    }

    /// `x: [T, dim] -> [T, dim]` in `dtype`.
    pub fn forward_as(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        if let Some(g) = crate::cuda::gpu(x.device())
            && let Some((y, _)) = g.rms_norm(x, &self.weight, self.eps, dtype, false)?
        {
            return Ok(y);
        }
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        let normed = xf.broadcast_mul(&inv)?.broadcast_mul(&self.weight)?;
        Ok(normed.to_dtype(dtype)?)
    }

    /// The normed rows both in `dtype` (for the matmuls) and in f32 (for the router), from one
    /// pass on the GPU.
    pub fn forward_pair(&self, x: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        if let Some(g) = crate::cuda::gpu(x.device())
            && let Some((y, Some(yf))) = g.rms_norm(x, &self.weight, self.eps, dtype, true)?
        {
            return Ok((y, yf));
        }
        let yf = self.forward_as(x, DType::F32)?;
        Ok((yf.to_dtype(dtype)?, yf))
    }

    /// `[dim]`, f32.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }
}
