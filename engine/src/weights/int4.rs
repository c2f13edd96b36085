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
        let tensors = vec![
            (
                "model.layers.0.mlp.down_proj.qweight",
                Dtype::I32,
                vec![IN, OUT / 8],
                le(&qweight),
            ),
            (
                "model.layers.0.mlp.down_proj.qzeros",
                Dtype::I32,
                vec![IN / GROUP, OUT / 8],
                le(&qzeros),
            ),
            (
                "model.layers.0.mlp.down_proj.scales",
                Dtype::F16,
                vec![IN / GROUP, OUT],
                scales_f16(IN / GROUP),
            ),
        ];
        let src = checkpoint(dir.path(), &tensors);
        let awq = config(serde_json::json!({
            "quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": true,
            "version": "gemm"
        }));
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

    #[test]
    fn awq_nibble_table_inverts_the_packing_order() {
        for (k, &col) in AWQ_ORDER.iter().enumerate() {
            assert_eq!(AWQ_NIBBLE[col], k);
        }
    }
}
