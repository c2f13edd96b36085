//! The embedded default model: a small DeepSeek-V3-architecture model with deterministic random
//! weights and the real DeepSeek-R1 vocabulary (129,280 tokens), built in memory so that a new
//! user can run every part of moemesh without downloading weights. Its text is gibberish; its
//! shapes, routing and code paths are those of V3/R1.
//!
//! Every process (in-process engine, gate, expert workers) builds the identical model from the
//! same seed, so the mesh needs no shared files either.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::config::{ModelConfig, RawConfig};
use crate::error::Result;
use crate::weights::memory::MemorySource;

/// Name reported for the embedded model.
pub const EMBEDDED_MODEL_NAME: &str = "moemesh-embedded-deepseek-v3";
const SEED: u64 = 0x6d6f_656d_6573_6801;

/// The embedded model's `config.json`.
pub fn embedded_config_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 256,
        "intermediate_size": 768,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "n_shared_experts": 1,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": true,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "q_lora_rank": 192,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "attention_bias": false,
        "tie_word_embeddings": false,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "num_nextn_predict_layers": 0,
        "torch_dtype": "bfloat16"
    })
}

pub fn embedded_config() -> Result<ModelConfig> {
    let raw: RawConfig = serde_json::from_value(embedded_config_json())
        .map_err(|e| crate::error::EngineError::InvalidInput(format!("embedded config: {e}")))?;
    ModelConfig::from_raw(&raw)
}

struct Init {
    rng: ChaCha8Rng,
    tensors: HashMap<String, Tensor>,
}

impl Init {
    fn normal(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let z: f32 = StandardNormal.sample(&mut self.rng);
                offset + scale * z
            })
            .collect()
    }

    /// Stored as bf16, like a real checkpoint, so f32 and bf16 runs see the same weights.
    fn put(&mut self, name: String, values: Vec<f32>, shape: &[usize]) -> Result<()> {
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(DType::BF16)?;
        self.tensors.insert(name, t);
        Ok(())
    }

    fn linear(&mut self, name: String, out_f: usize, in_f: usize, gain: f32) -> Result<()> {
        let v = self.normal(out_f * in_f, gain / (in_f as f32).sqrt(), 0.0);
        self.put(name, v, &[out_f, in_f])
    }

    fn norm(&mut self, name: String, n: usize) -> Result<()> {
        let v = self.normal(n, 0.1, 1.0);
        self.put(name, v, &[n])
    }
}

/// Builds the embedded model's weights (about 70 M parameters, ~1 s).
pub fn embedded_weights(cfg: &ModelConfig) -> Result<MemorySource> {
    let mut w = Init {
        rng: ChaCha8Rng::seed_from_u64(SEED),
        tensors: HashMap::new(),
    };
    let h = cfg.hidden_size;
    let heads = cfg.num_attention_heads;
    let qk = cfg.qk_head_dim();
    let v = w.normal(cfg.vocab_size * h, 1.0, 0.0);
    w.put("model.embed_tokens.weight".into(), v, &[cfg.vocab_size, h])?;
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        w.norm(format!("{p}.input_layernorm.weight"), h)?;
        w.norm(format!("{p}.post_attention_layernorm.weight"), h)?;
        let a = format!("{p}.self_attn");
        match cfg.q_lora_rank {
            Some(r) => {
                w.linear(format!("{a}.q_a_proj.weight"), r, h, 1.0)?;
                w.norm(format!("{a}.q_a_layernorm.weight"), r)?;
                w.linear(format!("{a}.q_b_proj.weight"), heads * qk, r, 1.0)?;
            }
            None => w.linear(format!("{a}.q_proj.weight"), heads * qk, h, 1.0)?,
        }
        w.linear(
            format!("{a}.kv_a_proj_with_mqa.weight"),
            cfg.kv_cache_width(),
            h,
            1.0,
        )?;
        w.norm(format!("{a}.kv_a_layernorm.weight"), cfg.kv_lora_rank)?;
        w.linear(
            format!("{a}.kv_b_proj.weight"),
            heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
            cfg.kv_lora_rank,
            1.0,
        )?;
        w.linear(format!("{a}.o_proj.weight"), h, heads * cfg.v_head_dim, 1.0)?;
        let m = format!("{p}.mlp");
        if cfg.is_moe_layer(i) {
            let mi = cfg.moe_intermediate_size;
            for e in 0..cfg.n_routed_experts {
                w.linear(format!("{m}.experts.{e}.gate_proj.weight"), mi, h, 1.0)?;
                w.linear(format!("{m}.experts.{e}.up_proj.weight"), mi, h, 1.0)?;
                w.linear(format!("{m}.experts.{e}.down_proj.weight"), h, mi, 0.5)?;
            }
            let si = mi * cfg.n_shared_experts;
            w.linear(format!("{m}.shared_experts.gate_proj.weight"), si, h, 1.0)?;
            w.linear(format!("{m}.shared_experts.up_proj.weight"), si, h, 1.0)?;
            w.linear(format!("{m}.shared_experts.down_proj.weight"), h, si, 0.5)?;
            w.linear(format!("{m}.gate.weight"), cfg.n_routed_experts, h, 2.0)?;
            let b = w.normal(cfg.n_routed_experts, 0.1, 0.0);
            w.put(
                format!("{m}.gate.e_score_correction_bias"),
                b,
                &[cfg.n_routed_experts],
            )?;
        } else {
            w.linear(
                format!("{m}.gate_proj.weight"),
                cfg.intermediate_size,
                h,
                1.0,
            )?;
            w.linear(format!("{m}.up_proj.weight"), cfg.intermediate_size, h, 1.0)?;
            w.linear(
                format!("{m}.down_proj.weight"),
                h,
                cfg.intermediate_size,
                0.5,
            )?;
        }
    }
    w.norm("model.norm.weight".into(), h)?;
    w.linear("lm_head.weight".into(), cfg.vocab_size, h, 4.0)?;
    let identity = format!("{EMBEDDED_MODEL_NAME} seed={SEED:#x}");
    Ok(MemorySource::new(w.tensors, identity))
}
