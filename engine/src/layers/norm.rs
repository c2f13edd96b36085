//! RMSNorm as DeepSeek (and transformers) compute it: statistics in f32, the result cast back to
//! the input dtype before the weight multiplies it.

use candle_core::{D, DType, Tensor};

use crate::error::Result;
use crate::weights::Loader;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `[dim]`, in the compute dtype.
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(loader: &Loader, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: loader.get(name, &[dim])?,
            eps,
        })
    }

    /// `x: [T, dim] -> [T, dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        let normed = xf.broadcast_mul(&inv)?.to_dtype(dtype)?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}
