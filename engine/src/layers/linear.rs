//! `y = x·Wᵀ (+ b)` with the weight as the checkpoint stores it, `[out, in]`: in the compute
//! dtype, or e4m3 with 128 × 128 block scales where the process keeps FP8 dense weights
//! ([`crate::weights::Loader::dense_fp8`]).

use candle_core::{DType, Module, Tensor};

use crate::cuda::DenseWeight;
use crate::error::{EngineError, Result};
use crate::weights::{ExpertTensor, Loader, fp8};

/// A projection's weight as held.
#[derive(Debug, Clone)]
enum Weight {
    /// `[out, in]` in the compute dtype.
    Dense(Tensor),
    /// `q [out, in]` e4m3, `scale [⌈out/128⌉, ⌈in/128⌉]` f32 (row r's blocks at r / 128);
    /// dequantised to `dtype` where no FP8 kernel takes the product.
    Fp8 {
        q: Tensor,
        scale: Tensor,
        dtype: DType,
    },
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`), in the format the process holds
    /// projections in ([`Loader::get_projection`]).
    pub fn new(
        loader: &Loader,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let held = loader.get_projection(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let weight = Self::held(loader, held)?;
        Self::with_bias(loader, prefix, out_dim, bias, weight)
    }

    /// A shared expert's projection `{prefix}.weight` (no bias), held as
    /// [`Loader::get_shared_expert`] says.
    pub fn new_shared_expert(
        loader: &Loader,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Self> {
        let held = loader.get_shared_expert(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let weight = Self::held(loader, held)?;
        Self::with_bias(loader, prefix, out_dim, false, weight)
    }

    fn held(loader: &Loader, held: ExpertTensor) -> Result<Weight> {
        Ok(match held {
            ExpertTensor::Dense(w) => Weight::Dense(w),
            ExpertTensor::Fp8 { q, scale } => Weight::Fp8 {
                q,
                scale,
                dtype: loader.dtype(),
            },
            // Not handed out for projections; dequantised should it ever be.
            ExpertTensor::Int4(t) => Weight::Dense(t.dequantize(loader.dtype())?),
        })
    }

    /// [`new`](Self::new) always in the compute dtype (`lm_head`, which FP8 checkpoints keep in
    /// bf16 too: its logits are the model's output).
    pub fn new_dense(
        loader: &Loader,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = Weight::Dense(loader.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?);
        Self::with_bias(loader, prefix, out_dim, bias, weight)
    }

    fn with_bias(
        loader: &Loader,
        prefix: &str,
        out_dim: usize,
        bias: bool,
        weight: Weight,
    ) -> Result<Self> {
        let bias = if bias {
            Some(loader.get(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub fn from_weight(weight: Tensor) -> Self {
        Linear {
            weight: Weight::Dense(weight),
            bias: None,
        }
    }

    /// Output features (the weight's rows).
    pub fn out_dim(&self) -> Result<usize> {
        Ok(match &self.weight {
            Weight::Dense(w) => w.dim(0)?,
            Weight::Fp8 { q, .. } => q.dim(0)?,
        })
    }

    /// Whether the weight is held in e4m3.
    pub fn is_fp8(&self) -> bool {
        matches!(self.weight, Weight::Fp8 { .. })
    }

    /// The weight for moemesh's dense kernel.
    pub(crate) fn kernel_weight(&self) -> DenseWeight<'_> {
        match &self.weight {
            Weight::Dense(w) => DenseWeight::Bf16(w),
            Weight::Fp8 { q, scale, .. } => DenseWeight::Fp8 { q, scale },
        }
    }

    /// The weight in the compute dtype (an FP8 weight dequantised: a new tensor).
    fn dense(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Fp8 { q, scale, dtype } => {
                if *dtype == DType::BF16
                    && let Some(g) = crate::cuda::gpu(q.device())
                    && let Some(w) = g.fp8_dequant_bf16(q, scale)?
                {
                    return Ok(w);
                }
                fp8::dequantize_matrix(q, scale, *dtype)
            }
        }
    }

    /// The rows of `parts` stacked into one projection (no biases): `x` times it is the parts'
    /// outputs side by side. e4m3 stays e4m3 where every part is and each part but the last
    /// ends on a 128-row block (so the scales stack as rows too); otherwise the stack is in the
    /// compute dtype.
    pub fn stack(parts: &[&Linear]) -> Result<Linear> {
        if parts.iter().any(|p| p.bias.is_some()) {
            return Err(EngineError::Internal(
                "stacking projections with biases".into(),
            ));
        }
        let fp8_rows = |p: &Linear| match &p.weight {
            Weight::Fp8 { q, .. } => q.dim(0).ok(),
            Weight::Dense(_) => None,
        };
        let aligned = parts.iter().all(|p| p.is_fp8())
            && parts[..parts.len().saturating_sub(1)]
                .iter()
                .all(|p| fp8_rows(p).is_some_and(|r| r % fp8::KERNEL_BLOCK == 0));
        if aligned && let Some(Weight::Fp8 { dtype, .. }) = parts.first().map(|p| &p.weight) {
            let (mut qs, mut scales) = (Vec::new(), Vec::new());
            for p in parts {
                if let Weight::Fp8 { q, scale, .. } = &p.weight {
                    qs.push(q);
                    scales.push(scale);
                }
            }
            return Ok(Linear {
                weight: Weight::Fp8 {
                    q: Tensor::cat(&qs, 0)?,
                    scale: Tensor::cat(&scales, 0)?,
                    dtype: *dtype,
                },
                bias: None,
            });
        }
        let dense = parts
            .iter()
            .map(|p| p.dense())
            .collect::<Result<Vec<_>>>()?;
        Ok(Linear::from_weight(Tensor::cat(&dense, 0)?))
    }

    /// Rows `start..start + len` of the weight (a view; an e4m3 weight's `start` on a 128-row
    /// block, as [`stack`](Self::stack) makes them).
    pub fn rows(&self, start: usize, len: usize) -> Result<Linear> {
        let weight = match &self.weight {
            Weight::Dense(w) => Weight::Dense(w.narrow(0, start, len)?),
            Weight::Fp8 { q, scale, dtype } => {
                const B: usize = fp8::KERNEL_BLOCK;
                if !start.is_multiple_of(B) {
                    return Err(EngineError::Internal(format!(
                        "rows of an e4m3 weight from {start}, not a multiple of {B}"
                    )));
                }
                Weight::Fp8 {
                    q: q.narrow(0, start, len)?,
                    scale: scale.narrow(0, start / B, len.div_ceil(B))?,
                    dtype: *dtype,
                }
            }
        };
        Ok(Linear { weight, bias: None })
    }

    /// `x: [T, in] -> [T, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Dense(w) => matmul_t(x, w)?,
            Weight::Fp8 { .. } => {
                let small = match crate::cuda::gpu(x.device()) {
                    Some(g) => g.dense_small(x, self.kernel_weight(), false)?,
                    None => None,
                };
                match small {
                    Some(y) => y,
                    None => x.matmul(&self.dense()?.t()?)?,
                }
            }
        };
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
        && let Some(y) = g.dense_small(x, DenseWeight::Bf16(w), false)?
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

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// An e4m3 projection `[out, in]` from seeded random values.
    fn fp8_linear(out: usize, inp: usize, seed: u64) -> Linear {
        let dev = Device::Cpu;
        let vals: Vec<f32> = (0..out * inp)
            .map(|i| (((i as u64 * 2_654_435_761 + seed * 97) % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect();
        let w = Tensor::from_vec(vals, (out, inp), &dev).expect("weight");
        let (q, scale) = fp8::quantize_e4m3(&w).expect("quantise");
        Linear {
            weight: Weight::Fp8 {
                q,
                scale,
                dtype: DType::F32,
            },
            bias: None,
        }
    }

    fn input(rows: usize, inp: usize) -> Tensor {
        let vals: Vec<f32> = (0..rows * inp)
            .map(|i| ((i % 13) as f32 - 6.0) / 7.0)
            .collect();
        Tensor::from_vec(vals, (rows, inp), &Device::Cpu).expect("x")
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().and_then(|t| t.to_vec1()).expect("values")
    }

    /// Largest difference: products of different widths may add in another order (the CPU
    /// GEMM's blocking), so stacked and separate outputs agree to f32 rounding, not bits.
    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (values(a), values(b));
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Parts ending on 128-row blocks stack as e4m3 (values and scales as rows), and the stack's
    /// row ranges are the parts again: the same outputs (bit for bit for the row ranges, whose
    /// products have the parts' shapes; to f32 rounding, 1e-6 of outputs ≤ ~0.3, for the stack).
    #[test]
    fn aligned_fp8_parts_stack_as_fp8_and_split_back() {
        let (a, b) = (fp8_linear(256, 192, 1), fp8_linear(72, 192, 2));
        let both = Linear::stack(&[&a, &b]).expect("stack");
        assert!(both.is_fp8());
        assert_eq!(both.out_dim().expect("rows"), 328);
        let x = input(3, 192);
        let y = both.forward(&x).expect("forward");
        let want =
            Tensor::cat(&[a.forward(&x).expect("a"), b.forward(&x).expect("b")], 1).expect("cat");
        assert!(max_diff(&y, &want) <= 1e-6);
        let (ra, rb) = (
            both.rows(0, 256).expect("rows a"),
            both.rows(256, 72).expect("rows b"),
        );
        assert!(ra.is_fp8() && rb.is_fp8());
        assert_eq!(
            values(&ra.forward(&x).expect("a")),
            values(&a.forward(&x).expect("a"))
        );
        assert_eq!(
            values(&rb.forward(&x).expect("b")),
            values(&b.forward(&x).expect("b"))
        );
    }

    /// A part that does not end on a 128-row block cannot share the scale grid: the stack is
    /// dequantised (the same outputs, to f32 rounding), and an e4m3 row range must start on a
    /// block.
    #[test]
    fn unaligned_fp8_parts_stack_dequantised() {
        let (a, b) = (fp8_linear(96, 64, 3), fp8_linear(64, 64, 4));
        let both = Linear::stack(&[&a, &b]).expect("stack");
        assert!(!both.is_fp8());
        let x = input(2, 64);
        let want =
            Tensor::cat(&[a.forward(&x).expect("a"), b.forward(&x).expect("b")], 1).expect("cat");
        assert!(max_diff(&both.forward(&x).expect("forward"), &want) <= 1e-6);
        let aligned = Linear::stack(&[&fp8_linear(128, 64, 5), &b]).expect("stack");
        assert!(
            aligned.rows(64, 64).is_err(),
            "rows from 64 of an e4m3 weight"
        );
    }
}
