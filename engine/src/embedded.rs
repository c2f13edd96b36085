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

use crate::config::{ModelConfig, RawConfig, TopkMethod};
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

/// One checkpoint tensor of a generated model and the normal distribution its values come from.
#[derive(Debug, Clone)]
pub struct TensorInit {
    pub name: String,
    pub shape: Vec<usize>,
    pub mean: f32,
    pub std: f32,
}

/// Every tensor a DeepSeek checkpoint of `cfg`'s shape holds (bf16 layout, no FP8 scales), in a
/// fixed order, with the initialisation generated models use: projections `N(0, gain²/in)`,
/// norms `N(1, 0.1²)`, embeddings `N(0, 1)`. The scales keep activations of order one through
/// the layers, so the routing of a random model is as spread as a trained one's.
pub fn checkpoint_layout(cfg: &ModelConfig) -> Vec<TensorInit> {
    let mut l = Layout(Vec::new());
    let h = cfg.hidden_size;
    let heads = cfg.num_attention_heads;
    let qk = cfg.qk_head_dim();
    l.put(
        "model.embed_tokens.weight".into(),
        &[cfg.vocab_size, h],
        0.0,
        1.0,
    );
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        l.norm(format!("{p}.input_layernorm.weight"), h);
        l.norm(format!("{p}.post_attention_layernorm.weight"), h);
        let a = format!("{p}.self_attn");
        match cfg.q_lora_rank {
            Some(r) => {
                l.linear(format!("{a}.q_a_proj.weight"), r, h, 1.0);
                l.norm(format!("{a}.q_a_layernorm.weight"), r);
                l.linear(format!("{a}.q_b_proj.weight"), heads * qk, r, 1.0);
            }
            None => l.linear(format!("{a}.q_proj.weight"), heads * qk, h, 1.0),
        }
        l.linear(
            format!("{a}.kv_a_proj_with_mqa.weight"),
            cfg.kv_cache_width(),
            h,
            1.0,
        );
        l.norm(format!("{a}.kv_a_layernorm.weight"), cfg.kv_lora_rank);
        let kv_b = heads * (cfg.qk_nope_head_dim + cfg.v_head_dim);
        l.linear(format!("{a}.kv_b_proj.weight"), kv_b, cfg.kv_lora_rank, 1.0);
        l.linear(format!("{a}.o_proj.weight"), h, heads * cfg.v_head_dim, 1.0);
        let m = format!("{p}.mlp");
        if cfg.is_moe_layer(i) {
            let mi = cfg.moe_intermediate_size;
            for e in 0..cfg.n_routed_experts {
                l.mlp(&format!("{m}.experts.{e}"), h, mi);
            }
            l.mlp(&format!("{m}.shared_experts"), h, mi * cfg.n_shared_experts);
            l.linear(format!("{m}.gate.weight"), cfg.n_routed_experts, h, 2.0);
            if cfg.topk_method == TopkMethod::NoauxTc {
                let name = format!("{m}.gate.e_score_correction_bias");
                l.put(name, &[cfg.n_routed_experts], 0.0, 0.1);
            }
        } else {
            l.mlp(&m, h, cfg.intermediate_size);
        }
    }
    l.norm("model.norm.weight".into(), h);
    l.linear("lm_head.weight".into(), cfg.vocab_size, h, 4.0);
    l.0
}

struct Layout(Vec<TensorInit>);

impl Layout {
    fn put(&mut self, name: String, shape: &[usize], mean: f32, std: f32) {
        self.0.push(TensorInit {
            name,
            shape: shape.to_vec(),
            mean,
            std,
        });
    }

    fn linear(&mut self, name: String, out_f: usize, in_f: usize, gain: f32) {
        self.put(name, &[out_f, in_f], 0.0, gain / (in_f as f32).sqrt());
    }

    fn norm(&mut self, name: String, n: usize) {
        self.put(name, &[n], 1.0, 0.1);
    }

    fn mlp(&mut self, prefix: &str, hidden: usize, inner: usize) {
        self.linear(format!("{prefix}.gate_proj.weight"), inner, hidden, 1.0);
        self.linear(format!("{prefix}.up_proj.weight"), inner, hidden, 1.0);
        self.linear(format!("{prefix}.down_proj.weight"), hidden, inner, 0.5);
    }
}

/// Builds the embedded model's weights (about 70 M parameters, ~1 s), drawing every tensor of
/// [`checkpoint_layout`] in order from one seeded stream; stored as bf16, like a real checkpoint,
/// so f32 and bf16 runs see the same weights.
pub fn embedded_weights(cfg: &ModelConfig) -> Result<MemorySource> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut tensors = HashMap::new();
    for t in checkpoint_layout(cfg) {
        let n: usize = t.shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                let z: f32 = StandardNormal.sample(&mut rng);
                t.mean + t.std * z
            })
            .collect();
        let tensor =
            Tensor::from_vec(values, t.shape.as_slice(), &Device::Cpu)?.to_dtype(DType::BF16)?;
        tensors.insert(t.name, tensor);
    }
    let identity = format!("{EMBEDDED_MODEL_NAME} seed={SEED:#x}");
    Ok(MemorySource::new(tensors, identity))
}
