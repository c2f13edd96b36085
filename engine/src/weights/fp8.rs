//! FP8 e4m3 (the `float8_e4m3fn` of DeepSeek-V3/R1 checkpoints) and its 128×128 block scales.
//!
//! A stored weight is `e4m3 value × weight_scale_inv[row / block_rows][col / block_cols]`; the last
//! block of a row or column may be partial. The loader dequantises once, on load, so the rest of
//! the engine sees ordinary floating-point weights — except the routed experts on a GPU, which
//! can stay e4m3 ([`crate::weights::ExpertsDtype`]): their kernels (engine/src/cuda/experts_fp8.cu)
//! dequantise in registers to exactly the bf16 values [`dequantize_e4m3`] gives here.
//!
//! [`quantize_e4m3`] makes such weights from floating-point ones (a synthetic model with FP8
//! experts, the kernel checks), with DeepSeek's recipe.

use candle_core::{DType, Tensor};

use crate::config::Fp8Quant;
use crate::error::{EngineError, Result};

/// The block of the e4m3 weights the FP8 expert kernels read: 128 × 128, DeepSeek-V3/R1's
/// `weight_block_size`.
pub const KERNEL_BLOCK: usize = 128;

/// The largest finite e4m3fn magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// The value of one e4m3fn byte: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; no
/// infinities, and `S.1111.111` is NaN.
pub fn e4m3_to_f32(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 3) & 0x0f);
    let mant = f32::from(bits & 0x07);
    if exp == 0x0f && bits & 0x07 == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        // Subnormal: no implicit leading one, exponent fixed at 1 - bias.
        mant / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
    };
    sign * magnitude
}

/// All 256 e4m3 values, so dequantising is one table lookup per element.
fn table() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (i, v) in t.iter_mut().enumerate() {
        *v = e4m3_to_f32(i as u8);
    }
    t
}

/// Dequantises a `[rows, cols]` e4m3 matrix with per-block scales laid out row-major as
/// `[ceil(rows/br), ceil(cols/bc)]`.
pub fn dequantize_blocks(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    scales: &[f32],
    quant: Fp8Quant,
) -> Vec<f32> {
    let lut = table();
    let scale_cols = cols.div_ceil(quant.block_cols);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let scale_row = &scales[(r / quant.block_rows) * scale_cols..][..scale_cols];
        let row = &bytes[r * cols..(r + 1) * cols];
        out.extend(
            row.iter()
                .enumerate()
                .map(|(c, &b)| lut[b as usize] * scale_row[c / quant.block_cols]),
        );
    }
    out
}

/// Quantises `w [R, C]` (any float dtype, on any device) to e4m3 with one f32 scale per
/// [`KERNEL_BLOCK`]² block, as DeepSeek quantised V3: `scale = amax(|block|) / 448`,
/// `q = e4m3(w / scale)` (round to nearest even, saturated to ±448). Returns `(q [R, C]` e4m3,
/// `scale_inv [⌈R/128⌉, ⌈C/128⌉]` f32), what an FP8 checkpoint stores. An all-zero block gets
/// the smallest normal scale (its values stay 0).
pub fn quantize_e4m3(w: &Tensor) -> Result<(Tensor, Tensor)> {
    const B: usize = KERNEL_BLOCK;
    let (r, c) = w.dims2()?;
    let (rb, cb) = (r.div_ceil(B), c.div_ceil(B));
    let blocks = w
        .to_dtype(DType::F32)?
        .pad_with_zeros(0, 0, rb * B - r)?
        .pad_with_zeros(1, 0, cb * B - c)?
        .reshape((rb, B, cb, B))?;
    // [rb, 1, cb, 1]
    let scale = (blocks.abs()?.max_keepdim(3)?.max_keepdim(1)? / f64::from(E4M3_MAX))?
        .clamp(f32::MIN_POSITIVE, f32::MAX)?;
    // Cut to [r, c] in f32, then cast (an e4m3 tensor is only ever made contiguous).
    let q = blocks
        .broadcast_div(&scale)?
        .clamp(-E4M3_MAX, E4M3_MAX)?
        .reshape((rb * B, cb * B))?
        .narrow(0, 0, r)?
        .narrow(1, 0, c)?
        .contiguous()?;
    Ok((cast(&q, DType::F8E4M3)?, scale.reshape((rb, cb))?))
}

/// `t.to_dtype(to)`, through moemesh's kernels for e4m3 ↔ f32 on a GPU (candle-core 0.11's
/// F8E4M3 casts fail there: [`crate::cuda::Gpu::e4m3_cast`]).
fn cast(t: &Tensor, to: DType) -> Result<Tensor> {
    if let Some(g) = crate::cuda::gpu(t.device())
        && let Some(out) = g.e4m3_cast(t, to)?
    {
        return Ok(out);
    }
    Ok(t.to_dtype(to)?)
}

/// `q · scale_inv` per [`KERNEL_BLOCK`]² block in f32, rounded once to `dtype`, on `q`'s device:
/// `q [m, R, C]` e4m3 (m matrices stacked, each with its own partial edge blocks) and
/// `scales [m, ⌈R/128⌉, ⌈C/128⌉]` f32 → `[m, R, C]`. The same values as
/// [`dequantize_blocks`] then a conversion to `dtype` (the load-time path): the products are the
/// same f32 multiplications, rounded to nearest even once.
pub fn dequantize_e4m3(q: &Tensor, scales: &Tensor, dtype: DType) -> Result<Tensor> {
    const B: usize = KERNEL_BLOCK;
    let (m, r, c) = q.dims3()?;
    let want = [m, r.div_ceil(B), c.div_ceil(B)];
    if q.dtype() != DType::F8E4M3 || scales.dtype() != DType::F32 || scales.dims() != want {
        return Err(EngineError::Internal(format!(
            "dequantize_e4m3: {:?} {:?} values with {:?} {:?} scales (want F8E4M3 and F32 {want:?})",
            q.dims(),
            q.dtype(),
            scales.dims(),
            scales.dtype()
        )));
    }
    let block_of = |n: usize| {
        let idx: Vec<u32> = (0..n).map(|i| (i / B) as u32).collect();
        Tensor::from_vec(idx, n, q.device())
    };
    // [m, R, C]: each element's block scale.
    let s = scales
        .contiguous()?
        .index_select(&block_of(r)?, 1)?
        .index_select(&block_of(c)?, 2)?;
    Ok((cast(q, DType::F32)? * s)?.to_dtype(dtype)?)
}

/// [`dequantize_e4m3`] of one matrix: `q [R, C]`, `scales [⌈R/128⌉, ⌈C/128⌉]` → `[R, C]`.
pub fn dequantize_matrix(q: &Tensor, scales: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(dequantize_e4m3(&q.unsqueeze(0)?, &scales.unsqueeze(0)?, dtype)?.squeeze(0)?)
}

/// Each value's f32 bits (of any float dtype: bf16 and e4m3 widen exactly, -0 kept), for tests
/// that require bit equality.
#[cfg(test)]
pub(crate) fn f32_bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("a float tensor")
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn known_e4m3_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0); // exponent 7 = bias
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0); // largest finite value
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert!(e4m3_to_f32(0x7f).is_nan());
    }

    #[test]
    fn partial_edge_blocks_use_their_own_scale() {
        // 3×5 matrix with 2×2 blocks: scale grid 2×3, the last row and column are partial blocks.
        let q = Fp8Quant {
            block_rows: 2,
            block_cols: 2,
        };
        let ones = vec![0x38u8; 15];
        let scales = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let out = dequantize_blocks(&ones, 3, 5, &scales, q);
        assert_eq!(&out[0..5], &[1.0, 1.0, 2.0, 2.0, 3.0]);
        assert_eq!(&out[10..15], &[4.0, 4.0, 5.0, 5.0, 6.0]);
    }

    /// Quantising then dequantising keeps each value to e4m3's precision of its block's scale
    /// (3 mantissa bits: half a step is 2⁻⁴ of the value, or of the scale near zero), partial
    /// edge blocks included; the dequantised bf16 values are exactly what the load-time path
    /// (`dequantize_blocks`, then bf16) makes of the same bytes and scales.
    #[test]
    fn quantise_then_dequantise_matches_the_load_time_path() {
        let (r, c) = (200, 300);
        let w = Tensor::randn(0f32, 0.02, (r, c), &Device::Cpu).expect("w");
        let (q, s) = quantize_e4m3(&w).expect("quantise");
        assert_eq!(q.dims(), &[r, c]);
        assert_eq!(s.dims(), &[2, 3]);
        let deq = dequantize_matrix(&q, &s, DType::F32).expect("dequantise");
        let (wv, dv): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
            (w.to_vec2().expect("w"), deq.to_vec2().expect("deq"));
        let sv: Vec<Vec<f32>> = s.to_vec2().expect("s");
        for i in 0..r {
            for j in 0..c {
                let scale = sv[i / 128][j / 128];
                let tol = (wv[i][j].abs() / 16.0).max(scale / 64.0) * 1.0001;
                assert!(
                    (wv[i][j] - dv[i][j]).abs() <= tol,
                    "({i}, {j}): {} vs {}",
                    wv[i][j],
                    dv[i][j]
                );
            }
        }
        // Each block's largest magnitude maps to ±448 exactly.
        let qf: Vec<Vec<f32>> = q.to_dtype(DType::F32).expect("f32").to_vec2().expect("q");
        let amax = qf.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(amax, E4M3_MAX);
        // Against the load-time path on the raw bytes (a value's bits: -0 is its own byte).
        let bytes: Vec<u8> = qf
            .iter()
            .flatten()
            .map(|&v| {
                (0u8..=255)
                    .find(|&b| e4m3_to_f32(b).to_bits() == v.to_bits())
                    .expect("an e4m3 value")
            })
            .collect();
        let flat_scales: Vec<f32> = sv.iter().flatten().copied().collect();
        let quant = Fp8Quant {
            block_rows: 128,
            block_cols: 128,
        };
        let host = Tensor::from_vec(
            dequantize_blocks(&bytes, r, c, &flat_scales, quant),
            (r, c),
            &Device::Cpu,
        )
        .expect("host")
        .to_dtype(DType::BF16)
        .expect("bf16");
        let ours = dequantize_matrix(&q, &s, DType::BF16).expect("bf16");
        let (h, o) = (f32_bits(&host), f32_bits(&ours));
        let diff: Vec<(usize, u32, u32)> = h
            .iter()
            .zip(&o)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| (i, *a, *b))
            .take(8)
            .collect();
        assert!(
            diff.is_empty(),
            "{} of {} differ, first {diff:?}",
            h.iter().zip(&o).filter(|(a, b)| a != b).count(),
            h.len()
        );
    }

    /// A zero block quantises to zeros (no division by a zero scale), and stacked matrices each
    /// use their own scales.
    #[test]
    fn zero_blocks_and_stacked_matrices() {
        let w = Tensor::zeros((130, 5), DType::F32, &Device::Cpu).expect("zeros");
        let (q, s) = quantize_e4m3(&w).expect("quantise");
        let qf: Vec<f32> = q
            .to_dtype(DType::F32)
            .expect("f32")
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("q");
        assert!(qf.iter().all(|&v| v == 0.0));
        assert!(
            s.flatten_all()
                .expect("flat")
                .to_vec1::<f32>()
                .expect("s")
                .iter()
                .all(|&v| v > 0.0)
        );
        // Two stacked 3×2 matrices of ones (0x38), scales 2 and 3.
        let q = Tensor::from_raw_buffer(&[0x38u8; 12], DType::F8E4M3, &[2, 3, 2], &Device::Cpu)
            .expect("q");
        let s = Tensor::from_vec(vec![2f32, 3.0], (2, 1, 1), &Device::Cpu).expect("s");
        let d: Vec<f32> = dequantize_e4m3(&q, &s, DType::F32)
            .expect("deq")
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("d");
        assert_eq!(d, [vec![2.0; 6], vec![3.0; 6]].concat());
        assert!(dequantize_e4m3(&q, &s.reshape((1, 2, 1)).expect("bad"), DType::F32).is_err());
    }
}
