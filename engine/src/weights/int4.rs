//! INT4 weight-only checkpoints (GPTQ and AWQ, 4 bits, grouped scales and zero points),
//! dequantised once at load like FP8 ([`super::fp8`]), so the rest of the engine sees ordinary
//! floating-point weights. The [`super::Loader`] finds a quantised linear layer by its packed
//! tensors (`<layer>.qweight` where `<layer>.weight` is asked for), checks every shape, and calls
//! the functions here with the words already read.
//!
//! Both formats store, per linear layer `y = x Wᵀ` with `W: [out, in]`, 4-bit integers `q`, one
//! 4-bit zero point `z` and one scale `s` per (group of input rows, output column):
//! `W[o][i] = s[g(i)][o] · (q[i][o] − z[g(i)][o])`. They differ in how the nibbles are packed
//! into little-endian int32 words:
//!
//! - **GPTQ** (AutoGPTQ / GPTQModel, `checkpoint_format` "gptq" or "gptq_v2"):
//!   `qweight: [in/8, out]`, word `(i/8, o)` holds rows `i` of 8 consecutive input rows, row
//!   `8k + j` in bits `4j..4j+4` (packed along the input dimension). `qzeros: [groups, out/8]`
//!   packs 8 consecutive output columns the same way (column `8k + j` in bits `4j..`). The v1
//!   format ("gptq") stores `z − 1` (AutoGPTQ subtracts one before packing and its kernels add it
//!   back); "gptq_v2" stores `z`. `scales: [groups, out]` (f16). `g_idx: [in]` (int32) is each
//!   input row's group: `i / group_size`, or a permutation's groups with `desc_act`.
//! - **AWQ** (llm-awq / AutoAWQ, `version` "gemm"): `qweight: [in, out/8]`, packed along the
//!   output dimension in the interleaved order `[0, 2, 4, 6, 1, 3, 5, 7]`: nibble `k` (bits
//!   `4k..`) of word `(i, c)` holds column `8c + ORDER[k]`. `qzeros: [groups, out/8]` likewise,
//!   `scales: [groups, out]`; the group of row `i` is `i / group_size`; zeros are stored as
//!   they are.
//! - **compressed-tensors** `pack-quantized` (vLLM's llm-compressor; RedHatAI's w4a16 models;
//!   `compressed_tensors/compressors/pack_quantized` in compressed-tensors 0.20):
//!   `weight_packed: [out, ⌈in/8⌉]`, packed along the *input* dimension, column `8k + j` of a
//!   row in bits `4j..` of word `k`; each nibble is the signed value plus 8 (`q − 8 ∈ [−8, 7]`).
//!   `weight_scale: [out, groups]` (the weight's dtype), group of column `i` = `i / group_size`
//!   (`channel` strategy: one group). Symmetric layers store no zero point (it is 8 in nibble
//!   terms); asymmetric ones `weight_zero_point: [⌈out/8⌉, groups]`, packed along the *output*
//!   dimension (row `8k + j` in bits `4j..` of word `(k, g)`), also plus 8. `weight_shape: [2]`
//!   holds `[out, in]`. Its dequantisation (`quantization/lifecycle/forward.py`) is
//!   `(q − z) · s` in the scale's dtype.
//!
//! [`Int4Tensor`] is that last layout as moemesh keeps it, in candle tensors: the routed experts
//! on a GPU stay so ([`crate::weights::ExpertsDtype::Int4`]), read by the INT4 expert kernels
//! (engine/src/cuda/experts_int4.cu), which dequantise in registers or shared memory to exactly
//! the values [`Int4Tensor::dequantize`] gives.

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};

/// AWQ's packing order: nibble `k` of a word holds output column `AWQ_ORDER[k]` of its 8.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// The inverse of [`AWQ_ORDER`]: output column `j` of a word sits in nibble `AWQ_NIBBLE[j]`.
const AWQ_NIBBLE: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// The 4-bit value in nibble `k` (bits `4k..4k+4`) of `word`.
fn nibble(word: u32, k: usize) -> u32 {
    (word >> (4 * k)) & 0xf
}

/// The shape of one INT4 linear layer and the group of each of its input rows.
pub struct Int4Layout<'a> {
    pub in_features: usize,
    pub out_features: usize,
    /// `in_features` entries, each below the number of scale rows.
    pub group_of_row: &'a [usize],
}

/// Dequantises a GPTQ layer into `W` laid out `[in, out]` row-major (the caller transposes).
/// `qweight` has `in/8 · out` words, `qzeros` `groups · out/8`, `scales` `groups · out`; the
/// loader has checked those lengths and every `group_of_row` entry.
pub fn dequantize_gptq_in_out(
    layout: &Int4Layout<'_>,
    qweight: &[u32],
    qzeros: &[u32],
    scales: &[f32],
    zeros_minus_one: bool,
) -> Vec<f32> {
    let (n_in, n_out) = (layout.in_features, layout.out_features);
    let zero_words = n_out / 8;
    let offset = u32::from(zeros_minus_one);
    let mut out = Vec::with_capacity(n_in * n_out);
    for i in 0..n_in {
        let g = layout.group_of_row[i];
        let words = &qweight[(i / 8) * n_out..][..n_out];
        let zeros = &qzeros[g * zero_words..][..zero_words];
        let scale = &scales[g * n_out..][..n_out];
        out.extend((0..n_out).map(|o| {
            let q = nibble(words[o], i % 8) as f32;
            let z = (nibble(zeros[o / 8], o % 8) + offset) as f32;
            scale[o] * (q - z)
        }));
    }
    out
}

/// Dequantises an AWQ layer into `W` laid out `[in, out]` row-major (the caller transposes).
/// `qweight` has `in · out/8` words, `qzeros` `groups · out/8`, `scales` `groups · out`.
pub fn dequantize_awq_in_out(
    layout: &Int4Layout<'_>,
    qweight: &[u32],
    qzeros: &[u32],
    scales: &[f32],
) -> Vec<f32> {
    let (n_in, n_out) = (layout.in_features, layout.out_features);
    let words_per_row = n_out / 8;
    let mut out = Vec::with_capacity(n_in * n_out);
    for i in 0..n_in {
        let g = layout.group_of_row[i];
        let words = &qweight[i * words_per_row..][..words_per_row];
        let zeros = &qzeros[g * words_per_row..][..words_per_row];
        let scale = &scales[g * n_out..][..n_out];
        out.extend((0..n_out).map(|o| {
            let k = AWQ_NIBBLE[o % 8];
            let q = nibble(words[o / 8], k) as f32;
            let z = nibble(zeros[o / 8], k) as f32;
            scale[o] * (q - z)
        }));
    }
    out
}

/// The zero point, in stored-nibble terms, of a symmetric layer (signed value 0).
pub const SYMMETRIC_ZERO: u8 = 8;

/// The group size moemesh quantises to (`--weights-dtype int4` on a checkpoint stored otherwise):
/// 128 input columns, as GPTQ, AWQ and compressed-tensors' W4A16 preset use.
pub const QUANT_GROUP: usize = 128;

/// An INT4 matrix `W [R, C]` in compressed-tensors' layout, on some device:
/// `W[r][c] = scale[r][c / group] · (q[r][c] − zero[r][c / group])`, the difference exact and
/// the product in f32. The last group of a row may be partial (`C` need not be a multiple of
/// `group`: each matrix keeps its own grid, as FP8's edge blocks do).
#[derive(Clone, Debug)]
pub struct Int4Tensor {
    /// `[R, C/2]` u8: column `c` of row `r` in byte `c/2`, the low nibble for even `c` (the
    /// bytes of compressed-tensors' little-endian `weight_packed` words).
    pub q: Tensor,
    /// `[R, ⌈C/group⌉]` f32.
    pub scale: Tensor,
    /// `[R, ⌈C/group⌉]` u8 zero points (0..=15; 16 from a GPTQ v1 checkpoint, which stores
    /// `z − 1`), or `None`: every zero is [`SYMMETRIC_ZERO`].
    pub zero: Option<Tensor>,
    /// Input columns per scale.
    pub group: usize,
}

impl Int4Tensor {
    /// `[R, C]`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        let (r, half) = self.q.dims2()?;
        Ok((r, 2 * half))
    }

    /// Round-to-nearest symmetric quantisation of `w [R, C]` (any float dtype, any device; `C` a
    /// multiple of 8) in groups of `group` columns, compressed-tensors' W4A16 recipe
    /// (`calculate_qparams` with `symmetric: true`, then `quantize`): per group
    /// `scale = amax(|w|) / 7.5` (the int4 range's half-width, (7 − (−8)) / 2), an all-zero group
    /// getting scale 1; `q = clamp(round(w / scale), −8, 7)`, the division in f32 and ties
    /// rounded away from zero (candle's `round`; torch rounds them to even, which differs only
    /// on exact ties); stored as `q + 8`, no zero points.
    pub fn quantize(w: &Tensor, group: usize) -> Result<Int4Tensor> {
        let (r, c) = w.dims2()?;
        if !c.is_multiple_of(8) || group == 0 || !group.is_multiple_of(8) {
            return Err(EngineError::InvalidInput(format!(
                "INT4 quantisation of a [{r}, {c}] matrix in groups of {group}: the columns and \
                 the group size must be multiples of 8"
            )));
        }
        let groups = c.div_ceil(group);
        // [R, G, group]
        let blocks = w
            .to_dtype(DType::F32)?
            .pad_with_zeros(1, 0, groups * group - c)?
            .reshape((r, groups, group))?;
        let amax = blocks.abs()?.max_keepdim(2)?;
        // A true division (candle's `t / 7.5` multiplies by the reciprocal).
        let half_range = Tensor::new(7.5f32, w.device())?;
        let scale = amax.broadcast_div(&half_range)?;
        let scale = (&scale + scale.eq(0f32)?.to_dtype(DType::F32)?)?;
        let q = blocks
            .broadcast_div(&scale)?
            .round()?
            .clamp(-8f32, 7f32)?
            .affine(1.0, f64::from(SYMMETRIC_ZERO))?
            .reshape((r, groups * group))?
            .narrow(1, 0, c)?
            .reshape((r, c / 2, 2))?;
        let (lo, hi) = (q.narrow(2, 0, 1)?, q.narrow(2, 1, 1)?);
        let bytes = (lo + (hi * 16.0)?)?.squeeze(2)?.to_dtype(DType::U8)?;
        Ok(Int4Tensor {
            q: bytes,
            scale: scale.reshape((r, groups))?,
            zero: None,
            group,
        })
    }

    /// `W` in `dtype` on the tensors' device: `scale · (q − zero)` in f32, converted to `dtype`
    /// once (round to nearest even) — what the INT4 kernels compute in registers.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let (r, c) = self.dims()?;
        let device = self.q.device();
        // [R, C/2, 2]: low nibble, then high, as f32 (exact).
        let bytes = self.q.to_dtype(DType::F32)?;
        let hi = (&bytes / 16.0)?.floor()?;
        let lo = (&bytes - (&hi * 16.0)?)?;
        let q = Tensor::stack(&[lo, hi], 2)?.reshape((r, c))?;
        let group_of: Vec<u32> = (0..c).map(|i| (i / self.group) as u32).collect();
        let group_of = Tensor::from_vec(group_of, c, device)?;
        let per_column = |t: &Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(DType::F32)?
                .contiguous()?
                .index_select(&group_of, 1)?)
        };
        let centred = match &self.zero {
            Some(z) => (q - per_column(z)?)?,
            None => (q - f64::from(SYMMETRIC_ZERO))?,
        };
        Ok((centred * per_column(&self.scale)?)?.to_dtype(dtype)?)
    }

    /// The same tensors on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Int4Tensor> {
        Ok(Int4Tensor {
            q: self.q.to_device(device)?,
            scale: self.scale.to_device(device)?,
            zero: self
                .zero
                .as_ref()
                .map(|z| z.to_device(device))
                .transpose()?,
            group: self.group,
        })
    }

    /// Bytes held: the nibbles, the f32 scales and the zero points.
    pub fn bytes(&self) -> u64 {
        let n = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        n(&self.q) + n(&self.scale) + self.zero.as_ref().map_or(0, n)
    }
}

/// A GPTQ layer whose rows are grouped by position (`i / group`: no act-order permutation) in
/// [`Int4Tensor`]'s layout, the same values: its [`Int4Tensor::dequantize`] is
/// [`dequantize_gptq_in_out`]'s `W`, transposed to `[out, in]`. Zero points become nibble values
/// (v1's stored `z − 1` plus one, so up to 16). Lengths as for [`dequantize_gptq_in_out`]
/// (`in` a multiple of 8); the caller checks the grouping.
pub fn gptq_to_tensor(
    (n_in, n_out, group): (usize, usize, usize),
    qweight: &[u32],
    qzeros: &[u32],
    scales: &[f32],
    zeros_minus_one: bool,
) -> Result<Int4Tensor> {
    let offset = u32::from(zeros_minus_one);
    let q = |i: usize, o: usize| nibble(qweight[(i / 8) * n_out + o], i % 8);
    let z = |g: usize, o: usize| nibble(qzeros[g * (n_out / 8) + o / 8], o % 8) + offset;
    int4_tensor((n_in, n_out, group), q, z, |g, o| scales[g * n_out + o])
}

/// An AWQ layer in [`Int4Tensor`]'s layout, the same values: its [`Int4Tensor::dequantize`] is
/// [`dequantize_awq_in_out`]'s `W`, transposed to `[out, in]`.
pub fn awq_to_tensor(
    (n_in, n_out, group): (usize, usize, usize),
    qweight: &[u32],
    qzeros: &[u32],
    scales: &[f32],
) -> Result<Int4Tensor> {
    let wpr = n_out / 8;
    let q = |i: usize, o: usize| nibble(qweight[i * wpr + o / 8], AWQ_NIBBLE[o % 8]);
    let z = |g: usize, o: usize| nibble(qzeros[g * wpr + o / 8], AWQ_NIBBLE[o % 8]);
    int4_tensor((n_in, n_out, group), q, z, |g, o| scales[g * n_out + o])
}

/// An [`Int4Tensor`] `[out, in]` on the host from each (input row, output column)'s nibble
/// `q(i, o)` and each (group, output column)'s zero point `z(g, o)` and scale `s(g, o)`.
fn int4_tensor(
    (n_in, n_out, group): (usize, usize, usize),
    q: impl Fn(usize, usize) -> u32,
    z: impl Fn(usize, usize) -> u32,
    s: impl Fn(usize, usize) -> f32,
) -> Result<Int4Tensor> {
    let groups = n_in.div_ceil(group.max(1));
    let mut bytes = Vec::with_capacity(n_out * n_in / 2);
    let (mut scale, mut zero) = (
        Vec::with_capacity(n_out * groups),
        Vec::with_capacity(n_out * groups),
    );
    for o in 0..n_out {
        bytes.extend((0..n_in / 2).map(|c| (q(2 * c, o) | (q(2 * c + 1, o) << 4)) as u8));
        scale.extend((0..groups).map(|g| s(g, o)));
        zero.extend((0..groups).map(|g| z(g, o) as u8));
    }
    Ok(Int4Tensor {
        q: Tensor::from_vec(bytes, (n_out, n_in / 2), &Device::Cpu)?,
        scale: Tensor::from_vec(scale, (n_out, groups), &Device::Cpu)?,
        zero: Some(Tensor::from_vec(zero, (n_out, groups), &Device::Cpu)?),
        group,
    })
}

/// compressed-tensors' packed zero points `[⌈rows/8⌉, groups]` (row `8k + j` in bits `4j..` of
/// word `(k, g)`) unpacked to `[rows, groups]` nibble values.
pub fn unpack_zero_points(words: &[u32], rows: usize, groups: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows * groups);
    for r in 0..rows {
        out.extend((0..groups).map(|g| nibble(words[(r / 8) * groups + g], r % 8) as u8));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::{DType, Device};
    use safetensors::tensor::{Dtype, TensorView};

    use super::*;
    use crate::config::{ModelConfig, RawConfig};
    use crate::error::EngineError;
    use crate::weights::Loader;
    use crate::weights::safetensors::SafetensorsSource;

    /// A small layer: `[OUT, IN]` with two groups of 16 input rows.
    const OUT: usize = 16;
    const IN: usize = 32;
    const GROUP: usize = 16;

    /// Known 4-bit values, zero points (1..=15, so GPTQ v1 can store `z − 1`) and power-of-two
    /// scales of both signs: every dequantised value `s · (q − z)` is exact in f16 and f32.
    fn q(i: usize, o: usize) -> u32 {
        ((i * 7 + o * 3) % 16) as u32
    }
    fn z(g: usize, o: usize) -> u32 {
        1 + ((g * 5 + o) % 15) as u32
    }
    fn s(g: usize, o: usize) -> f32 {
        let sign = if (g + o).is_multiple_of(3) { -1.0 } else { 1.0 };
        sign * 2f32.powi(-(((g + o) % 4) as i32))
    }

    /// The expected `[out, in]` weight, straight from the definition.
    fn expected(group_of_row: impl Fn(usize) -> usize) -> Vec<Vec<f32>> {
        (0..OUT)
            .map(|o| {
                (0..IN)
                    .map(|i| {
                        let g = group_of_row(i);
                        s(g, o) * (q(i, o) as f32 - z(g, o) as f32)
                    })
                    .collect()
            })
            .collect()
    }

    fn scales_f16(groups: usize) -> Vec<u8> {
        (0..groups)
            .flat_map(|g| (0..OUT).map(move |o| half::f16::from_f32(s(g, o))))
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    fn le(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// GPTQ's packing (AutoGPTQ `QuantLinear.pack`): 8 consecutive input rows per int32 of
    /// `qweight [in/8, out]`, row `8k + j` in bits `4j`; zero points of 8 consecutive output
    /// columns per int32 of `qzeros [groups, out/8]`, stored minus one in the v1 format.
    fn pack_gptq(groups: usize, zeros_minus_one: bool) -> (Vec<u32>, Vec<u32>) {
        let mut qweight = vec![0u32; IN / 8 * OUT];
        for i in 0..IN {
            for o in 0..OUT {
                qweight[(i / 8) * OUT + o] |= q(i, o) << (4 * (i % 8));
            }
        }
        let mut qzeros = vec![0u32; groups * OUT / 8];
        for g in 0..groups {
            for o in 0..OUT {
                let stored = z(g, o) - u32::from(zeros_minus_one);
                qzeros[g * OUT / 8 + o / 8] |= stored << (4 * (o % 8));
            }
        }
        (qweight, qzeros)
    }

    /// AWQ's packing (llm-awq `pack_intweight` / AutoAWQ `WQLinear_GEMM.from_linear`): 8 output
    /// columns per int32 of `qweight [in, out/8]`, nibble `k` holding column `AWQ_ORDER[k]`;
    /// `qzeros [groups, out/8]` the same way.
    fn pack_awq(groups: usize) -> (Vec<u32>, Vec<u32>) {
        let mut qweight = vec![0u32; IN * OUT / 8];
        for i in 0..IN {
            for c in 0..OUT / 8 {
                for (k, &col) in AWQ_ORDER.iter().enumerate() {
                    qweight[i * OUT / 8 + c] |= q(i, 8 * c + col) << (4 * k);
                }
            }
        }
        let mut qzeros = vec![0u32; groups * OUT / 8];
        for g in 0..groups {
            for c in 0..OUT / 8 {
                for (k, &col) in AWQ_ORDER.iter().enumerate() {
                    qzeros[g * OUT / 8 + c] |= z(g, 8 * c + col) << (4 * k);
                }
            }
        }
        (qweight, qzeros)
    }

    fn config(quant: serde_json::Value) -> ModelConfig {
        let v = serde_json::json!({
            "model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": IN,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
            "max_position_embeddings": 64, "quantization_config": quant
        });
        let raw: RawConfig = serde_json::from_value(v).expect("raw config");
        ModelConfig::from_raw(&raw).expect("config")
    }

    /// Writes `tensors` (name, dtype, shape, bytes) as one safetensors file and opens it.
    fn checkpoint(dir: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> SafetensorsSource {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, shape, b)| {
                let view = TensorView::new(*d, shape.clone(), b).expect("view");
                (n.to_string(), view)
            })
            .collect();
        let path = dir.join("model.safetensors");
        safetensors::tensor::serialize_to_file(views, None, &path).expect("write");
        SafetensorsSource::open_dir(dir).expect("open")
    }

    const STEM: &str = "model.layers.0.mlp.down_proj";

    fn load(src: &SafetensorsSource, cfg: &ModelConfig) -> crate::error::Result<Vec<Vec<f32>>> {
        let loader = Loader::new(src, cfg, &Device::Cpu, DType::F32);
        let w = loader.get(&format!("{STEM}.weight"), &[OUT, IN])?;
        Ok(w.to_vec2::<f32>().expect("f32 values"))
    }

    fn gptq_tensors(
        qweight: &[u32],
        qzeros: &[u32],
        g_idx: Option<&[u32]>,
    ) -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
        let groups = qzeros.len() / (OUT / 8);
        let mut t = vec![
            (
                "model.layers.0.mlp.down_proj.qweight",
                Dtype::I32,
                vec![IN / 8, OUT],
                le(qweight),
            ),
            (
                "model.layers.0.mlp.down_proj.qzeros",
                Dtype::I32,
                vec![groups, OUT / 8],
                le(qzeros),
            ),
            (
                "model.layers.0.mlp.down_proj.scales",
                Dtype::F16,
                vec![groups, OUT],
                scales_f16(groups),
            ),
        ];
        if let Some(g) = g_idx {
            t.push((
                "model.layers.0.mlp.down_proj.g_idx",
                Dtype::I32,
                vec![IN],
                le(g),
            ));
        }
        t
    }

    /// An AWQ layer's tensors (groups of GROUP input rows).
    fn awq_tensors(
        qweight: &[u32],
        qzeros: &[u32],
    ) -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
        vec![
            (
                "model.layers.0.mlp.down_proj.qweight",
                Dtype::I32,
                vec![IN, OUT / 8],
                le(qweight),
            ),
            (
                "model.layers.0.mlp.down_proj.qzeros",
                Dtype::I32,
                vec![IN / GROUP, OUT / 8],
                le(qzeros),
            ),
            (
                "model.layers.0.mlp.down_proj.scales",
                Dtype::F16,
                vec![IN / GROUP, OUT],
                scales_f16(IN / GROUP),
            ),
        ]
    }

    fn awq_config() -> ModelConfig {
        config(serde_json::json!({
            "quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": true,
            "version": "gemm"
        }))
    }

    fn gptq_config(desc_act: bool, format: &str) -> ModelConfig {
        config(serde_json::json!({
            "quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": desc_act,
            "sym": false, "checkpoint_format": format
        }))
    }

    #[test]
    fn gptq_v1_and_v2_dequantise_exactly() {
        let by_position: Vec<u32> = (0..IN).map(|i| (i / GROUP) as u32).collect();
        for (format, minus_one) in [("gptq", true), ("gptq_v2", false)] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (qweight, qzeros) = pack_gptq(IN / GROUP, minus_one);
            let src = checkpoint(
                dir.path(),
                &gptq_tensors(&qweight, &qzeros, Some(&by_position)),
            );
            let cfg = gptq_config(false, format);
            let got = load(&src, &cfg).expect("dequantised");
            assert_eq!(got, expected(|i| i / GROUP), "{format}");
            let loader = Loader::new(&src, &cfg, &Device::Cpu, DType::F32);
            assert!(
                loader
                    .contains(&format!("{STEM}.weight"))
                    .expect("contains")
            );
            assert!(!loader.contains(&format!("{STEM}.bias")).expect("contains"));
            // Every packed tensor counts as used, so a full load reports nothing left over.
            let loader = Loader::new(&src, &cfg, &Device::Cpu, DType::F32);
            loader
                .get(&format!("{STEM}.weight"), &[OUT, IN])
                .expect("load");
            assert!(loader.unused(1).is_empty(), "{:?}", loader.unused(1));
            let bytes = loader.loaded_bytes();
            let stored = 4 * (IN / 8 * OUT) + 4 * (2 * OUT / 8) + 2 * (2 * OUT) + 4 * IN;
            assert_eq!(bytes.checkpoint.get("int4"), Some(&(stored as u64)));
            assert_eq!(bytes.resident.get("f32"), Some(&((4 * OUT * IN) as u64)));
        }
    }

    #[test]
    fn gptq_desc_act_reads_each_rows_group_from_g_idx() {
        // Activation order: rows alternate between the two groups.
        let g_idx: Vec<u32> = (0..IN).map(|i| (i % 2) as u32).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let (qweight, qzeros) = pack_gptq(2, true);
        let src = checkpoint(dir.path(), &gptq_tensors(&qweight, &qzeros, Some(&g_idx)));
        let got = load(&src, &gptq_config(true, "gptq")).expect("dequantised");
        assert_eq!(got, expected(|i| i % 2));

        // The same g_idx under desc_act = false contradicts the config: refused, naming g_idx.
        let err = load(&src, &gptq_config(false, "gptq")).expect_err("inconsistent g_idx");
        let msg = err.to_string();
        assert!(
            msg.contains("down_proj.g_idx") && msg.contains("row 1 is in group 1"),
            "{msg}"
        );
    }

    #[test]
    fn gptq_without_g_idx_groups_by_position_unless_desc_act() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (qweight, qzeros) = pack_gptq(2, true);
        let src = checkpoint(dir.path(), &gptq_tensors(&qweight, &qzeros, None));
        let got = load(&src, &gptq_config(false, "gptq")).expect("dequantised");
        assert_eq!(got, expected(|i| i / GROUP));
        let err = load(&src, &gptq_config(true, "gptq")).expect_err("desc_act needs g_idx");
        assert!(
            matches!(&err, EngineError::MissingTensor { name, .. } if name == "model.layers.0.mlp.down_proj.g_idx"),
            "{err}"
        );
    }

    #[test]
    fn awq_dequantises_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (qweight, qzeros) = pack_awq(IN / GROUP);
        let src = checkpoint(dir.path(), &awq_tensors(&qweight, &qzeros));
        let awq = awq_config();
        assert_eq!(
            load(&src, &awq).expect("dequantised"),
            expected(|i| i / GROUP)
        );

        // Read as GPTQ, the same tensors have the wrong packed shape: refused, naming qweight.
        let err = load(&src, &gptq_config(false, "gptq")).expect_err("not gptq");
        assert!(
            matches!(&err, EngineError::TensorShape { name, expected, .. }
                if name == "model.layers.0.mlp.down_proj.qweight" && expected == &[IN / 8, OUT]),
            "{err}"
        );
    }

    #[test]
    fn a_group_size_that_does_not_match_the_tensors_names_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (qweight, qzeros) = pack_gptq(2, true);
        let src = checkpoint(dir.path(), &gptq_tensors(&qweight, &qzeros, None));
        // The config says groups of 8 rows (4 groups); the checkpoint holds 2.
        let cfg = config(serde_json::json!({
            "quant_method": "gptq", "bits": 4, "group_size": 8, "desc_act": false
        }));
        let err = load(&src, &cfg).expect_err("group size mismatch");
        assert!(
            matches!(&err, EngineError::TensorShape { name, expected, actual }
                if name == "model.layers.0.mlp.down_proj.qzeros"
                    && expected == &[4, OUT / 8] && actual == &[2, OUT / 8]),
            "{err}"
        );
    }

    #[test]
    fn output_features_must_pack_into_whole_words() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (qweight, qzeros) = pack_gptq(2, true);
        let src = checkpoint(dir.path(), &gptq_tensors(&qweight, &qzeros, None));
        let loader = Loader::new(&src, &gptq_config(false, "gptq"), &Device::Cpu, DType::F32);
        let err = loader
            .get(&format!("{STEM}.weight"), &[12, IN])
            .expect_err("12 columns");
        let msg = err.to_string();
        assert!(
            msg.contains("down_proj.qweight") && msg.contains("12 output features"),
            "{msg}"
        );
    }

    /// compressed-tensors' `pack_to_int32` by hand: `weight_packed [OUT, IN/8]`, column `8k + j`
    /// of a row in bits `4j` of word `k`, each nibble the signed value + 8; asymmetric zero
    /// points `[OUT/8, groups]` packed along the output dimension, also + 8.
    fn pack_compressed_tensors(groups: usize) -> (Vec<u32>, Vec<u32>) {
        let mut packed = vec![0u32; OUT * IN / 8];
        for o in 0..OUT {
            for i in 0..IN {
                packed[o * IN / 8 + i / 8] |= q(i, o) << (4 * (i % 8));
            }
        }
        let mut zeros = vec![0u32; OUT / 8 * groups];
        for o in 0..OUT {
            for g in 0..groups {
                zeros[(o / 8) * groups + g] |= z(g, o) << (4 * (o % 8));
            }
        }
        (packed, zeros)
    }

    /// `weight_scale [OUT, groups]` in bf16 (the weight's dtype, as llm-compressor stores it).
    fn scales_out_by_group_bf16(groups: usize) -> Vec<u8> {
        (0..OUT)
            .flat_map(|o| (0..groups).map(move |g| half::bf16::from_f32(s(g, o))))
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    fn compressed_tensors_config(symmetric: bool) -> ModelConfig {
        config(serde_json::json!({
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
                "group_size": GROUP}}}
        }))
    }

    fn compressed_tensors_checkpoint(
        dir: &Path,
        zero_points: bool,
        weight_shape: [i64; 2],
    ) -> SafetensorsSource {
        let groups = IN / GROUP;
        let (packed, zeros) = pack_compressed_tensors(groups);
        let shape_bytes: Vec<u8> = weight_shape.iter().flat_map(|d| d.to_le_bytes()).collect();
        let mut t = vec![
            (
                "model.layers.0.mlp.down_proj.weight_packed",
                Dtype::I32,
                vec![OUT, IN / 8],
                le(&packed),
            ),
            (
                "model.layers.0.mlp.down_proj.weight_scale",
                Dtype::BF16,
                vec![OUT, groups],
                scales_out_by_group_bf16(groups),
            ),
            (
                "model.layers.0.mlp.down_proj.weight_shape",
                Dtype::I64,
                vec![2],
                shape_bytes,
            ),
        ];
        if zero_points {
            t.push((
                "model.layers.0.mlp.down_proj.weight_zero_point",
                Dtype::I32,
                vec![OUT / 8, groups],
                le(&zeros),
            ));
        }
        checkpoint(dir, &t)
    }

    #[test]
    fn compressed_tensors_asymmetric_dequantises_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = compressed_tensors_checkpoint(dir.path(), true, [OUT as i64, IN as i64]);
        let cfg = compressed_tensors_config(false);
        assert_eq!(
            load(&src, &cfg).expect("dequantised"),
            expected(|i| i / GROUP)
        );
        let loader = Loader::new(&src, &cfg, &Device::Cpu, DType::F32);
        assert!(
            loader
                .contains(&format!("{STEM}.weight"))
                .expect("contains")
        );
        loader
            .get(&format!("{STEM}.weight"), &[OUT, IN])
            .expect("load");
        assert!(loader.unused(1).is_empty(), "{:?}", loader.unused(1));
        let stored = 4 * (OUT * IN / 8) + 2 * (OUT * 2) + 16 + 4 * (OUT / 8 * 2);
        assert_eq!(
            loader.loaded_bytes().checkpoint.get("int4"),
            Some(&(stored as u64))
        );
    }

    #[test]
    fn compressed_tensors_symmetric_centres_on_eight() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = compressed_tensors_checkpoint(dir.path(), false, [OUT as i64, IN as i64]);
        let got = load(&src, &compressed_tensors_config(true)).expect("dequantised");
        let want: Vec<Vec<f32>> = (0..OUT)
            .map(|o| {
                (0..IN)
                    .map(|i| s(i / GROUP, o) * (q(i, o) as f32 - 8.0))
                    .collect()
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn compressed_tensors_errors_name_the_tensor() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Asymmetric config, no zero points stored.
        let src = compressed_tensors_checkpoint(dir.path(), false, [OUT as i64, IN as i64]);
        let err = load(&src, &compressed_tensors_config(false)).expect_err("no zeros");
        assert!(
            matches!(&err, EngineError::MissingTensor { name, .. }
                if name == "model.layers.0.mlp.down_proj.weight_zero_point"),
            "{err}"
        );
        // weight_shape contradicting the model.
        let dir = tempfile::tempdir().expect("tempdir");
        let src = compressed_tensors_checkpoint(dir.path(), false, [OUT as i64, 2 * IN as i64]);
        let msg = load(&src, &compressed_tensors_config(true))
            .expect_err("shape")
            .to_string();
        assert!(
            msg.contains("down_proj.weight_shape") && msg.contains("[16, 64]"),
            "{msg}"
        );
        // The packed words of another width.
        let dir = tempfile::tempdir().expect("tempdir");
        let src = compressed_tensors_checkpoint(dir.path(), false, [OUT as i64, IN as i64]);
        let loader = Loader::new(
            &src,
            &compressed_tensors_config(true),
            &Device::Cpu,
            DType::F32,
        );
        let err = loader
            .get(&format!("{STEM}.weight"), &[2 * OUT, IN])
            .expect_err("rows");
        assert!(err.to_string().contains("down_proj.weight_shape"), "{err}");
    }

    /// The quantiser's round trip: every value within half a step of its group's scale, the
    /// scale amax / 7.5, and `dequantize` equal to the formula evaluated on the host — partial
    /// last groups included.
    #[test]
    fn quantise_then_dequantise_is_the_formula() {
        let (r, c, group) = (24, 160, 128);
        let w = Tensor::randn(0f32, 0.05, (r, c), &Device::Cpu).expect("w");
        let t = Int4Tensor::quantize(&w, group).expect("quantise");
        assert_eq!(t.q.dims(), &[r, c / 2]);
        assert_eq!(t.scale.dims(), &[r, 2]);
        let bytes = t.q.to_vec2::<u8>().expect("bytes");
        let scale = t.scale.to_vec2::<f32>().expect("scales");
        let wv = w.to_vec2::<f32>().expect("w");
        let got = t
            .dequantize(DType::F32)
            .expect("dequantise")
            .to_vec2::<f32>()
            .expect("f32");
        for row in 0..r {
            for (g, &sc) in scale[row].iter().enumerate() {
                let cols = g * group..((g + 1) * group).min(c);
                let amax = wv[row][cols].iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_eq!(sc, amax / 7.5);
            }
            for col in 0..c {
                let nib = u32::from(bytes[row][col / 2]);
                let qv = (nib >> (4 * (col % 2))) & 0xf;
                let sc = scale[row][col / group];
                assert_eq!(got[row][col], sc * (qv as f32 - 8.0));
                assert!((got[row][col] - wv[row][col]).abs() <= sc / 2.0 * (1.0 + 1e-4));
            }
        }
        let bf16 = t.dequantize(DType::BF16).expect("bf16");
        let want = Tensor::new(got, &Device::Cpu)
            .expect("t")
            .to_dtype(DType::BF16)
            .expect("bf16");
        assert_eq!(
            crate::weights::fp8::f32_bits(&bf16),
            crate::weights::fp8::f32_bits(&want)
        );
    }

    #[test]
    fn awq_nibble_table_inverts_the_packing_order() {
        for (k, &col) in AWQ_ORDER.iter().enumerate() {
            assert_eq!(AWQ_NIBBLE[col], k);
        }
    }

    /// GPTQ (v1 and v2) and AWQ layers repacked into the compressed-tensors layout hold the same
    /// values: their dequantisation equals the format's own, transposed, bit for bit.
    #[test]
    fn gptq_and_awq_repack_into_the_same_values() {
        let groups = IN / GROUP;
        let scales: Vec<f32> = (0..groups)
            .flat_map(|g| (0..OUT).map(move |o| s(g, o)))
            .collect();
        let by_position: Vec<usize> = (0..IN).map(|i| i / GROUP).collect();
        let layout = Int4Layout {
            in_features: IN,
            out_features: OUT,
            group_of_row: &by_position,
        };
        let transposed = |w: Vec<f32>| -> Vec<u32> {
            (0..OUT)
                .flat_map(|o| (0..IN).map(move |i| (i, o)))
                .map(|(i, o)| w[i * OUT + o].to_bits())
                .collect()
        };
        let bits = |t: &Int4Tensor| -> Vec<u32> {
            t.dequantize(DType::F32)
                .and_then(|w| Ok(w.flatten_all()?.to_vec1::<f32>()?))
                .expect("dequantise")
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        for zeros_minus_one in [true, false] {
            let (qweight, qzeros) = pack_gptq(groups, zeros_minus_one);
            let t = gptq_to_tensor(
                (IN, OUT, GROUP),
                &qweight,
                &qzeros,
                &scales,
                zeros_minus_one,
            )
            .expect("repack");
            assert_eq!(t.dims().expect("dims"), (OUT, IN));
            let want = dequantize_gptq_in_out(&layout, &qweight, &qzeros, &scales, zeros_minus_one);
            assert_eq!(bits(&t), transposed(want), "gptq, v1: {zeros_minus_one}");
        }
        let (qweight, qzeros) = pack_awq(groups);
        let t = awq_to_tensor((IN, OUT, GROUP), &qweight, &qzeros, &scales).expect("repack");
        let want = dequantize_awq_in_out(&layout, &qweight, &qzeros, &scales);
        assert_eq!(bits(&t), transposed(want), "awq");
    }

    /// What the loader hands the GPU's INT4 stacks (`read_int4` packed): GPTQ grouped by
    /// position and AWQ repacked with their own values; a GPTQ layer in activation order (a
    /// permuted `g_idx`) dequantised instead.
    #[test]
    fn the_loader_repacks_gptq_and_awq_unless_act_order() {
        let read = |src: &SafetensorsSource, cfg: &ModelConfig| {
            let loader = Loader::new(src, cfg, &Device::Cpu, DType::F32);
            let q = loader.int4_checkpoint().expect("an INT4 checkpoint");
            let (layer, _) = loader.read_int4(STEM, &[OUT, IN], q, true).expect("read");
            match layer {
                super::super::Int4Layer::Packed(t) => {
                    (true, t.dequantize(DType::F32).expect("dequantise"))
                }
                super::super::Int4Layer::Values(w) => (false, w),
            }
        };
        let values = |w: Tensor| w.to_vec2::<f32>().expect("f32");
        let dir = tempfile::tempdir().expect("tempdir");
        let (qweight, qzeros) = pack_gptq(2, true);
        let by_position: Vec<u32> = (0..IN).map(|i| (i / GROUP) as u32).collect();
        let src = checkpoint(
            dir.path(),
            &gptq_tensors(&qweight, &qzeros, Some(&by_position)),
        );
        let (packed, w) = read(&src, &gptq_config(false, "gptq"));
        assert!(packed);
        assert_eq!(values(w), expected(|i| i / GROUP));

        let dir = tempfile::tempdir().expect("tempdir");
        let act_order: Vec<u32> = (0..IN).map(|i| (i % 2) as u32).collect();
        let src = checkpoint(
            dir.path(),
            &gptq_tensors(&qweight, &qzeros, Some(&act_order)),
        );
        let (packed, w) = read(&src, &gptq_config(true, "gptq"));
        assert!(!packed, "a permuted g_idx has no compressed-tensors layout");
        assert_eq!(values(w), expected(|i| i % 2));

        let dir = tempfile::tempdir().expect("tempdir");
        let (qweight, qzeros) = pack_awq(IN / GROUP);
        let src = checkpoint(dir.path(), &awq_tensors(&qweight, &qzeros));
        let awq = awq_config();
        let (packed, w) = read(&src, &awq);
        assert!(packed);
        assert_eq!(values(w), expected(|i| i / GROUP));
    }
}
