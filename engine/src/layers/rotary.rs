//! Rotary position embedding on the `qk_rope_head_dim` part of queries and keys, with YaRN
//! frequency interpolation. DeepSeek rotates adjacent pairs `(x0, x1), (x2, x3), …` by one
//! frequency each (V2's complex formulation and V3's `rope_interleave`); V3 with
//! `rope_interleave: false` rotates the two halves instead (`rotate_half`). Queries and keys get
//! the same treatment, so attention scores do not depend on which output order we pick; we keep
//! pairs in place.

use std::sync::{Arc, RwLock};

use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, RopeScaling, YarnParams, yarn_get_mscale};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Rotary {
    /// One inverse frequency per rotated pair, `[dim / 2]`.
    inv_freq: Vec<f32>,
    /// YaRN's cos/sin magnitude correction (1 without scaling).
    attention_scaling: f32,
    interleaved: bool,
    dim: usize,
    /// The scaled `cos`/`sin` of every position so far, computed once (a 2,048-token prompt's
    /// took ~2 ms of host time per step in f64) and shared by the model's clones.
    table: Arc<RwLock<Table>>,
}

/// Row-major `[rows, dim / 2]` cos and sin of positions `0..rows`.
#[derive(Debug, Default)]
struct Table {
    cos: Vec<f32>,
    sin: Vec<f32>,
    rows: usize,
}

/// Positions the table grows by at least (it doubles beyond).
const TABLE_MIN_ROWS: usize = 4096;

impl Rotary {
    pub fn new(cfg: &ModelConfig) -> Self {
        let dim = cfg.qk_rope_head_dim;
        let base = cfg.rope_theta;
        let pos_freqs: Vec<f64> = (0..dim / 2)
            .map(|i| base.powf((2 * i) as f64 / dim as f64))
            .collect();
        let (inv_freq, attention_scaling) = match &cfg.rope_scaling {
            RopeScaling::None => (pos_freqs.iter().map(|p| 1.0 / p).collect(), 1.0),
            RopeScaling::Yarn(y) => yarn(y, dim, base, &pos_freqs),
        };
        Rotary {
            inv_freq: inv_freq.into_iter().map(|f: f64| f as f32).collect(),
            attention_scaling: attention_scaling as f32,
            interleaved: cfg.rope_interleave,
            dim,
            table: Arc::default(),
        }
    }

    /// Whether rotary pairs are adjacent elements (`rope_interleave`) rather than the two halves.
    pub fn interleaved(&self) -> bool {
        self.interleaved
    }

    /// `(cos, sin)` for each position, each `[T, dim / 2]` in `dtype`, already scaled.
    pub fn cos_sin(
        &self,
        positions: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = self.cos_sin_host(positions);
        let shape = (positions.len(), self.dim / 2);
        Ok((
            Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        ))
    }

    /// [`cos_sin`](Self::cos_sin)'s values in f32 on the host, row-major `[T, dim / 2]` each.
    pub fn cos_sin_host(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let half = self.dim / 2;
        let Some(&last) = positions.iter().max() else {
            return (Vec::new(), Vec::new());
        };
        let read = |t: &Table| {
            let mut cos = Vec::with_capacity(positions.len() * half);
            let mut sin = Vec::with_capacity(positions.len() * half);
            for &p in positions {
                cos.extend_from_slice(&t.cos[p * half..(p + 1) * half]);
                sin.extend_from_slice(&t.sin[p * half..(p + 1) * half]);
            }
            (cos, sin)
        };
        {
            let t = self.table.read().unwrap_or_else(|e| e.into_inner());
            if t.rows > last {
                return read(&t);
            }
        }
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        if t.rows <= last {
            let rows = (last + 1).max(2 * t.rows).max(TABLE_MIN_ROWS);
            let from = t.rows;
            for p in from..rows {
                for &f in &self.inv_freq {
                    let (c, s) = self.angle(p, f);
                    t.cos.push(c);
                    t.sin.push(s);
                }
            }
            t.rows = rows;
        }
        read(&t)
    }

    /// The scaled cos and sin of position `p` at inverse frequency `f`.
    fn angle(&self, p: usize, f: f32) -> (f32, f32) {
        // The angle in f32, as transformers computes it (`inv_freq @ position_ids`).
        let angle = (p as f32 * f) as f64;
        (
            (angle.cos() as f32) * self.attention_scaling,
            (angle.sin() as f32) * self.attention_scaling,
        )
    }

    /// Rotated width (`qk_rope_head_dim`).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rotates `x: [T, heads, dim]` by its row's position; `cos`/`sin` are `[T, dim / 2]`.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (t, heads, dim) = x.dims3()?;
        let half = dim / 2;
        let cos = cos.reshape((t, 1, half))?;
        let sin = sin.reshape((t, 1, half))?;
        if self.interleaved {
            let pairs = x.reshape((t, heads, half, 2))?;
            let a = pairs.narrow(3, 0, 1)?.squeeze(3)?;
            let b = pairs.narrow(3, 1, 1)?.squeeze(3)?;
            let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
            let rb = (b.broadcast_mul(&cos)? + a.broadcast_mul(&sin)?)?;
            Ok(Tensor::stack(&[ra, rb], 3)?.reshape((t, heads, dim))?)
        } else {
            let a = x.narrow(2, 0, half)?;
            let b = x.narrow(2, half, half)?;
            let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
            let rb = (b.broadcast_mul(&cos)? + a.broadcast_mul(&sin)?)?;
            Ok(Tensor::cat(&[ra, rb], 2)?)
        }
    }
}

/// YaRN: interpolate low frequencies by `factor`, keep high ones, blend linearly between the
/// correction dimensions; scale cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim).
fn yarn(y: &YarnParams, dim: usize, base: f64, pos_freqs: &[f64]) -> (Vec<f64>, f64) {
    let attention_factor =
        y.attention_factor
            .unwrap_or_else(|| match (y.mscale, y.mscale_all_dim) {
                (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                    yarn_get_mscale(y.factor, m) / yarn_get_mscale(y.factor, ma)
                }
                _ => yarn_get_mscale(y.factor, 1.0),
            });
    let correction_dim = |rotations: f64| {
        dim as f64
            * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI))
                .ln()
            / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
    if y.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let high = high.min(dim as f64 - 1.0);
    let span = if low == high { 0.001 } else { high - low };
    let inv_freq = pos_freqs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0 - ramp;
            let interpolated = 1.0 / (y.factor * p);
            let extrapolated = 1.0 / p;
            interpolated * (1.0 - extrapolation_factor) + extrapolated * extrapolation_factor
        })
        .collect();
    (inv_freq, attention_factor)
}

#[cfg(test)]
mod table_tests {
    use super::*;

    /// The shared table gives exactly the values computed for each position alone, in any
    /// order, past its first size, and to the model's clones.
    #[test]
    fn the_table_matches_the_direct_computation_past_its_growth() {
        let cfg = crate::synthetic::synthetic_config("v2-lite").expect("config");
        let rotary = Rotary::new(&cfg);
        let half = rotary.dim() / 2;
        let clone = rotary.clone();
        for positions in [vec![5usize, 0, 17], vec![4095, 4096, 9000, 3], vec![12_345]] {
            let (cos, sin) = clone.cos_sin_host(&positions);
            assert_eq!(cos.len(), positions.len() * half);
            for (i, &p) in positions.iter().enumerate() {
                for (j, &f) in rotary.inv_freq.iter().enumerate() {
                    let (c, s) = rotary.angle(p, f);
                    assert_eq!(cos[i * half + j].to_bits(), c.to_bits(), "cos at {p}, {j}");
                    assert_eq!(sin[i * half + j].to_bits(), s.to_bits(), "sin at {p}, {j}");
                }
            }
        }
        assert!(rotary.cos_sin_host(&[]).0.is_empty());
        assert!(rotary.table.read().expect("table").rows > 12_345);
    }
}
