//! FP8 e4m3 (the `float8_e4m3fn` of DeepSeek-V3/R1 checkpoints) and its 128×128 block scales.
//!
//! A stored weight is `e4m3 value × weight_scale_inv[row / block_rows][col / block_cols]`; the last
//! block of a row or column may be partial. We dequantise once, on load, so the rest of the engine
//! only sees ordinary floating-point weights.

use crate::config::Fp8Quant;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
