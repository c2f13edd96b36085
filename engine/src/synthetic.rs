//! Synthetic models for benchmarks: a real architecture's config with random weights drawn on
//! the loading device (a 16 B-parameter model would take minutes to generate on the host). Named
//! on the command line as `--model synthetic:NAME`.
//!
//! Each tensor is drawn from its own seed (derived from its name), so a process always builds
//! the same values on the same kind of device; processes on different devices (a CPU frontend
//! and a GPU gate, say) do not share values, only shapes. The text such a model writes is
//! noise: it exists to measure speed, never correctness.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::config::{ModelConfig, RawConfig};
use crate::embedded::{TensorInit, checkpoint_layout};
use crate::error::{EngineError, Result};
use crate::weights::{RawData, RawTensor, StoredDtype, TensorSource};

/// The names `synthetic:NAME` accepts.
pub const SYNTHETIC_MODELS: &[&str] = &["v2-lite"];

/// `config.json` of a synthetic model.
pub fn synthetic_config_json(name: &str) -> Result<serde_json::Value> {
    match name {
        // DeepSeek-V2-Lite's shape (15.7 B parameters, 2.4 B active per token), as in
        // shared/bench/hf_baseline.py so that both sides of the comparison run one model shape.
        "v2-lite" => Ok(serde_json::json!({
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
            "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
            "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
            "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
            "routed_scaling_factor": 1.0, "norm_topk_prob": false, "scoring_func": "softmax",
            "topk_method": "greedy", "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "q_lora_rank": null, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "hidden_act": "silu",
            "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
            "attention_bias": false, "tie_word_embeddings": false,
            "bos_token_id": 100000, "eos_token_id": 100001, "torch_dtype": "bfloat16"
        })),
        other => Err(EngineError::InvalidInput(format!(
            "unknown synthetic model {other:?} (known: {})",
            SYNTHETIC_MODELS.join(", ")
        ))),
    }
}

pub fn synthetic_config(name: &str) -> Result<ModelConfig> {
    let raw: RawConfig = serde_json::from_value(synthetic_config_json(name)?)
        .map_err(|e| EngineError::InvalidInput(format!("synthetic config {name}: {e}")))?;
    ModelConfig::from_raw(&raw)
}

/// Tensors generated on the loading device.
pub struct SyntheticSource {
    tensors: HashMap<String, TensorInit>,
    name: String,
}

impl SyntheticSource {
    pub fn new(name: &str, cfg: &ModelConfig) -> Self {
        SyntheticSource {
            tensors: checkpoint_layout(cfg)
                .into_iter()
                .map(|t| (t.name.clone(), t))
                .collect(),
            name: name.to_string(),
        }
    }
}

/// FNV-1a: a stable per-name seed (std's hasher is randomised per process).
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl TensorSource for SyntheticSource {
    fn raw(&self, name: &str) -> Result<Option<RawTensor<'_>>> {
        Ok(self.tensors.get(name).map(|t| RawTensor {
            dtype: StoredDtype::BF16,
            shape: t.shape.clone(),
            data: RawData::Random {
                mean: t.mean,
                std: t.std,
                seed: seed_of(name),
            },
        }))
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn digest(&self) -> Vec<u8> {
        let mut names: Vec<&TensorInit> = self.tensors.values().collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        let mut h = Sha256::new();
        h.update(format!("synthetic:{}", self.name).as_bytes());
        for t in names {
            h.update(format!("{}{:?}", t.name, t.shape).as_bytes());
        }
        h.finalize().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_lite_has_the_published_parameter_count() {
        let cfg = synthetic_config("v2-lite").expect("config");
        let params: usize = checkpoint_layout(&cfg)
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        // DeepSeek-V2-Lite: 15.7 B parameters.
        assert!((15.6e9..15.8e9).contains(&(params as f64)), "{params}");
        assert!(synthetic_config("nope").is_err());
    }

    #[test]
    fn tensors_are_generated_with_their_layout_shape() {
        let cfg = synthetic_config("v2-lite").expect("config");
        let src = SyntheticSource::new("v2-lite", &cfg);
        let raw = src
            .raw("model.layers.3.mlp.experts.7.down_proj.weight")
            .expect("raw")
            .expect("present");
        assert_eq!(raw.shape, vec![2048, 1408]);
        assert!(
            src.raw("model.layers.0.mlp.experts.0.up_proj.weight")
                .expect("raw")
                .is_none()
        );
    }
}
