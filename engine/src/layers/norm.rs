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
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        let normed = xf.broadcast_mul(&inv)?.broadcast_mul(&self.weight)?;
        Ok(normed.to_dtype(dtype)?)
    }
}
