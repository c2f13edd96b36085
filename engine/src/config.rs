//! DeepSeek V2/V3 `config.json`, read exactly as real checkpoints write it (and as transformers 5
//! rewrites it: `rope_parameters` instead of `rope_scaling`). Parsing is two steps: serde into a
//! permissive [`RawConfig`], then [`ModelConfig::from_raw`] checks every value the engine depends on
//! and turns it into typed, validated fields. Anything we cannot run faithfully is an error that
//! names the key and the value, never a silent fallback.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// Which family the checkpoint belongs to; decides routing semantics and rotary layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Arch {
    /// `deepseek_v2` (V2, V2-Lite, V2.5): softmax router, complex (pairwise) rotary.
    V2,
    /// `deepseek_v3` (V3, R1): sigmoid router with correction bias, `noaux_tc`.
    V3,
}

/// How router logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Softmax,
    Sigmoid,
}

/// How the top-k experts are chosen from the scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// Plain top-k over all experts (V2-Lite).
    Greedy,
    /// Keep the `topk_group` groups with the highest max score, then top-k inside them (V2).
    GroupLimitedGreedy,
    /// V3: groups ranked by the sum of their top-2 biased scores; biased scores choose, unbiased weigh.
    NoauxTc,
}

/// The rotary embedding's frequency schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Yarn(YarnParams),
}

#[derive(Debug, Clone, PartialEq)]
pub struct YarnParams {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    /// Explicit cos/sin scale; when absent it is derived from `mscale`/`mscale_all_dim`.
    pub attention_factor: Option<f64>,
    /// Round the correction range to whole dimensions (transformers' default).
    pub truncate: bool,
}

/// FP8 block quantisation as DeepSeek-V3 checkpoints store it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Quant {
    pub block_rows: usize,
    pub block_cols: usize,
}

/// How a checkpoint's linear weights are quantised (`quantization_config`). Whatever the scheme,
/// the loader dequantises to the compute dtype (see [`crate::weights`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// `quant_method: "fp8"`: e4m3 weights with f32 inverse scales per block (DeepSeek-V3/R1).
    Fp8(Fp8Quant),
    /// `quant_method: "gptq"`, `"awq"` or `"compressed-tensors"` (`pack-quantized`, 4-bit int
    /// weights): 4-bit weight-only, packed in int32 with per-group scales (and zero points).
    Int4(Int4Quant),
}

/// The two published INT4 weight-only layouts (their packing is documented in
/// [`crate::weights::int4`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int4Format {
    /// GPTQ (AutoGPTQ / GPTQModel): `qweight [in/8, out]` packed along the input dimension,
    /// `qzeros [groups, out/8]`, `scales [groups, out]`, `g_idx [in]`.
    Gptq {
        /// `checkpoint_format: "gptq"` (v1, the default) stores each zero point minus one;
        /// `"gptq_v2"` stores it as it is.
        zeros_minus_one: bool,
        /// `desc_act`: rows were quantised in activation order, so a row's group is read from
        /// `g_idx` instead of being `row / group_size`.
        desc_act: bool,
    },
    /// AWQ (llm-awq / AutoAWQ, `version: "gemm"`): `qweight [in, out/8]` packed along the output
    /// dimension in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7], `qzeros [groups, out/8]`
    /// likewise, `scales [groups, out]`.
    Awq,
    /// compressed-tensors' `pack-quantized` (vLLM's llm-compressor, RedHatAI's `w4a16` models):
    /// `weight_packed [out, in/8]` packed along the input dimension, low nibble first, each
    /// nibble the signed value + 8; `weight_scale [out, in/group]`; `weight_shape [2]`; when
    /// asymmetric, `weight_zero_point [out/8, groups]` (packed along the output dimension, + 8).
    /// A layer's group size is read from its scale's shape (config groups may differ); layers in
    /// `ignore` keep a plain `weight`.
    CompressedTensors {
        /// Every config group's weights are symmetric (no zero points stored); `false`: every
        /// group's are asymmetric (each quantised layer has `weight_zero_point`).
        symmetric: bool,
    },
}

/// INT4 weight-only quantisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int4Quant {
    pub format: Int4Format,
    /// Input rows per scale/zero group; `None` for GPTQ's `group_size: -1` or compressed-tensors'
    /// `channel` strategy (one group spans the whole input dimension). For compressed-tensors,
    /// the smallest of its config groups' sizes (what the memory plan counts; each layer's own
    /// comes from its scales).
    pub group_size: Option<usize>,
}

impl Quantization {
    /// A short name of the checkpoint's weight format, as ModelInfo reports it.
    pub fn label(&self) -> &'static str {
        match self {
            Quantization::Fp8(_) => "fp8_e4m3",
            Quantization::Int4(Int4Quant {
                format: Int4Format::Gptq { .. },
                ..
            }) => "int4_gptq",
            Quantization::Int4(Int4Quant {
                format: Int4Format::Awq,
                ..
            }) => "int4_awq",
            Quantization::Int4(Int4Quant {
                format: Int4Format::CompressedTensors { .. },
                ..
            }) => "int4_compressed_tensors",
        }
    }
}

/// The permissive serde view of `config.json`: every key optional, so that validation can name what
/// is missing or wrong instead of serde failing on the first surprise.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RawConfig {
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub moe_intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub n_shared_experts: Option<usize>,
    pub n_routed_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub routed_scaling_factor: Option<f64>,
    pub norm_topk_prob: Option<bool>,
    pub scoring_func: Option<String>,
    pub topk_method: Option<String>,
    pub first_k_dense_replace: Option<usize>,
    pub moe_layer_freq: Option<usize>,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: Option<usize>,
    pub qk_nope_head_dim: Option<usize>,
    pub qk_rope_head_dim: Option<usize>,
    pub v_head_dim: Option<usize>,
    pub hidden_act: Option<String>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    pub rope_interleave: Option<bool>,
    pub attention_bias: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    pub num_nextn_predict_layers: Option<usize>,
    pub quantization_config: Option<Value>,
}

/// A validated DeepSeek model configuration. Field names follow `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub n_shared_experts: usize,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f64,
    pub norm_topk_prob: bool,
    pub scoring_func: ScoringFunc,
    pub topk_method: TopkMethod,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// V3 only: rotary pairs are adjacent (`x0,x1`), as DeepSeek's weights lay them out.
    /// V2 always uses adjacent pairs (its complex-number formulation).
    pub rope_interleave: bool,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `None` for an unquantised (bf16/f16/f32) checkpoint.
    pub quantization: Option<Quantization>,
}

fn require<T>(v: Option<T>, key: &str) -> Result<T> {
    v.ok_or_else(|| EngineError::unsupported(key, "missing", "a required key of a DeepSeek config"))
}

fn positive(v: usize, key: &str) -> Result<usize> {
    if v == 0 {
        return Err(EngineError::unsupported(key, 0, "must be at least 1"));
    }
    Ok(v)
}

fn token_ids(v: &Option<Value>, key: &str) -> Result<Vec<u32>> {
    let as_id = |x: &Value| -> Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| EngineError::unsupported(key, x, "a token id or a list of token ids"))
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(x) => Ok(vec![as_id(x)?]),
    }
}

fn num(obj: &serde_json::Map<String, Value>, key: &str, prefix: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| EngineError::unsupported(format!("{prefix}.{key}"), v, "a number")),
    }
}

impl ModelConfig {
    /// Reads and validates `config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawConfig =
            serde_json::from_str(&text).map_err(|source| EngineError::ConfigParse {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_raw(&raw)
    }

    /// Validates a parsed config.
    pub fn from_raw(raw: &RawConfig) -> Result<Self> {
        let model_type = require(raw.model_type.clone(), "model_type")?;
        let arch = match model_type.as_str() {
            "deepseek_v3" => Arch::V3,
            "deepseek_v2" => Arch::V2,
            other => {
                return Err(EngineError::unsupported(
                    "model_type",
                    format!("{other:?}"),
                    "expected \"deepseek_v3\" or \"deepseek_v2\"",
                ));
            }
        };
        let hidden_act = raw.hidden_act.clone().unwrap_or_else(|| "silu".into());
        if hidden_act != "silu" {
            return Err(EngineError::unsupported(
                "hidden_act",
                format!("{hidden_act:?}"),
                "DeepSeek models use \"silu\"",
            ));
        }

        let num_attention_heads = positive(
            require(raw.num_attention_heads, "num_attention_heads")?,
            "num_attention_heads",
        )?;
        if let Some(kv_heads) = raw.num_key_value_heads
            && kv_heads != num_attention_heads
        {
            return Err(EngineError::unsupported(
                "num_key_value_heads",
                kv_heads,
                format!(
                    "MLA expands the latent to every head, so it must equal num_attention_heads ({num_attention_heads})"
                ),
            ));
        }

        let n_routed_experts = raw.n_routed_experts.unwrap_or(0);
        let num_experts_per_tok = raw.num_experts_per_tok.unwrap_or(0);
        let n_group = raw.n_group.unwrap_or(1);
        let topk_group = raw.topk_group.unwrap_or(n_group);
        let (default_scoring, default_method) = match arch {
            Arch::V3 => ("sigmoid", "noaux_tc"),
            Arch::V2 => ("softmax", "greedy"),
        };
        let scoring = raw
            .scoring_func
            .clone()
            .unwrap_or_else(|| default_scoring.into());
        let method = raw
            .topk_method
            .clone()
            .unwrap_or_else(|| default_method.into());
        let (scoring_func, topk_method) = match (arch, scoring.as_str(), method.as_str()) {
            (Arch::V3, "sigmoid", "noaux_tc") => (ScoringFunc::Sigmoid, TopkMethod::NoauxTc),
            (Arch::V3, "sigmoid", m) => {
                return Err(EngineError::unsupported(
                    "topk_method",
                    format!("{m:?}"),
                    "deepseek_v3 routes with \"noaux_tc\"",
                ));
            }
            (Arch::V3, s, _) => {
                return Err(EngineError::unsupported(
                    "scoring_func",
                    format!("{s:?}"),
                    "deepseek_v3 scores experts with \"sigmoid\"",
                ));
            }
            (Arch::V2, "softmax", "greedy") => (ScoringFunc::Softmax, TopkMethod::Greedy),
            (Arch::V2, "softmax", "group_limited_greedy") => {
                (ScoringFunc::Softmax, TopkMethod::GroupLimitedGreedy)
            }
            (Arch::V2, "softmax", m) => {
                return Err(EngineError::unsupported(
                    "topk_method",
                    format!("{m:?}"),
                    "deepseek_v2 supports \"greedy\" and \"group_limited_greedy\"",
                ));
            }
            (Arch::V2, s, _) => {
                return Err(EngineError::unsupported(
                    "scoring_func",
                    format!("{s:?}"),
                    "deepseek_v2 scores experts with \"softmax\"",
                ));
            }
        };
        if n_routed_experts > 0 {
            positive(num_experts_per_tok, "num_experts_per_tok")?;
            positive(n_group, "n_group")?;
            if !n_routed_experts.is_multiple_of(n_group) {
                return Err(EngineError::unsupported(
                    "n_group",
                    n_group,
                    format!("must divide n_routed_experts ({n_routed_experts})"),
                ));
            }
            if topk_group == 0 || topk_group > n_group {
                return Err(EngineError::unsupported(
                    "topk_group",
                    topk_group,
                    format!("must be between 1 and n_group ({n_group})"),
                ));
            }
            let per_group = n_routed_experts / n_group;
            let reachable = match topk_method {
                TopkMethod::Greedy => n_routed_experts,
                _ => topk_group * per_group,
            };
            if num_experts_per_tok > reachable {
                return Err(EngineError::unsupported(
                    "num_experts_per_tok",
                    num_experts_per_tok,
                    format!("at most {reachable} experts are selectable"),
                ));
            }
            if topk_method == TopkMethod::NoauxTc && per_group < 2 {
                return Err(EngineError::unsupported(
                    "n_group",
                    n_group,
                    "noaux_tc ranks groups by their top-2 scores, so each group needs at least 2 experts",
                ));
            }
        }

        let max_position_embeddings = positive(
            require(raw.max_position_embeddings, "max_position_embeddings")?,
            "max_position_embeddings",
        )?;
        let qk_rope_head_dim = positive(
            require(raw.qk_rope_head_dim, "qk_rope_head_dim")?,
            "qk_rope_head_dim",
        )?;
        if qk_rope_head_dim % 2 != 0 {
            return Err(EngineError::unsupported(
                "qk_rope_head_dim",
                qk_rope_head_dim,
                "rotary pairs need an even dimension",
            ));
        }
        let (rope_theta, rope_scaling) = parse_rope(raw)?;
        let quantization = parse_quantization(&raw.quantization_config)?;
        let eos_token_ids = token_ids(&raw.eos_token_id, "eos_token_id")?;
        let bos_token_id = token_ids(&raw.bos_token_id, "bos_token_id")?
            .first()
            .copied();

        let vocab_size = positive(require(raw.vocab_size, "vocab_size")?, "vocab_size")?;
        for &id in &eos_token_ids {
            if id as usize >= vocab_size {
                return Err(EngineError::unsupported(
                    "eos_token_id",
                    id,
                    format!("must be below vocab_size ({vocab_size})"),
                ));
            }
        }

        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size: positive(require(raw.hidden_size, "hidden_size")?, "hidden_size")?,
            intermediate_size: require(raw.intermediate_size, "intermediate_size")?,
            moe_intermediate_size: raw.moe_intermediate_size.unwrap_or(0),
            num_hidden_layers: positive(
                require(raw.num_hidden_layers, "num_hidden_layers")?,
                "num_hidden_layers",
            )?,
            num_attention_heads,
            n_shared_experts: raw.n_shared_experts.unwrap_or(0),
            n_routed_experts,
            num_experts_per_tok,
            n_group,
            topk_group,
            routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(1.0),
            norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
            scoring_func,
            topk_method,
            first_k_dense_replace: raw.first_k_dense_replace.unwrap_or(0),
            moe_layer_freq: positive(raw.moe_layer_freq.unwrap_or(1), "moe_layer_freq")?,
            q_lora_rank: raw.q_lora_rank,
            kv_lora_rank: positive(require(raw.kv_lora_rank, "kv_lora_rank")?, "kv_lora_rank")?,
            qk_nope_head_dim: require(raw.qk_nope_head_dim, "qk_nope_head_dim")?,
            qk_rope_head_dim,
            v_head_dim: positive(require(raw.v_head_dim, "v_head_dim")?, "v_head_dim")?,
            max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_interleave: match arch {
                Arch::V3 => raw.rope_interleave.unwrap_or(true),
                Arch::V2 => true,
            },
            attention_bias: raw.attention_bias.unwrap_or(false),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id,
            eos_token_ids,
            quantization,
        };
        if cfg.n_routed_experts > 0 && cfg.moe_intermediate_size == 0 {
            return Err(EngineError::unsupported(
                "moe_intermediate_size",
                "missing or 0",
                "required when n_routed_experts > 0",
            ));
        }
        Ok(cfg)
    }

    /// Query/key head width: the non-rotary part plus the rotary part.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values one token stores per layer in the latent KV cache.
    pub fn kv_cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Whether decoder layer `layer` has a routed-expert MoE block (otherwise a dense MLP).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts > 0
            && layer >= self.first_k_dense_replace
            && layer.is_multiple_of(self.moe_layer_freq)
    }

    /// Indices of the layers with routed experts.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.is_moe_layer(l))
            .collect()
    }

    /// The softmax scale of attention: `qk_head_dim^-1/2`, times mscale² under YaRN.
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.rope_scaling {
            RopeScaling::Yarn(y) => match y.mscale_all_dim {
                Some(m) if m != 0.0 => {
                    let ms = yarn_get_mscale(y.factor, m);
                    base * ms * ms
                }
                _ => base,
            },
            RopeScaling::None => base,
        }
    }
}

/// YaRN's magnitude correction, `0.1·m·ln(s) + 1` for scale factors above 1.
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn parse_rope(raw: &RawConfig) -> Result<(f64, RopeScaling)> {
    // transformers 5 writes `rope_parameters` (with rope_theta inside); checkpoints write
    // `rope_scaling` plus a top-level rope_theta. Accept either; prefer the explicit one.
    let (obj, prefix) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(Value::Object(o)), _) => (Some(o), "rope_parameters"),
        (Some(Value::Null) | None, Some(Value::Object(o))) => (Some(o), "rope_scaling"),
        (Some(Value::Null) | None, None | Some(Value::Null)) => (None, ""),
        (Some(v), _) => return Err(EngineError::unsupported("rope_parameters", v, "an object")),
        (_, Some(v)) => return Err(EngineError::unsupported("rope_scaling", v, "an object")),
    };
    let mut theta = raw.rope_theta.unwrap_or(10000.0);
    let Some(obj) = obj else {
        return Ok((theta, RopeScaling::None));
    };
    if let Some(t) = num(obj, "rope_theta", prefix)? {
        theta = t;
    }
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok((theta, RopeScaling::None)),
        "yarn" => {
            let factor = num(obj, "factor", prefix)?.ok_or_else(|| {
                EngineError::unsupported(
                    format!("{prefix}.factor"),
                    "missing",
                    "YaRN needs a factor",
                )
            })?;
            if factor <= 0.0 {
                return Err(EngineError::unsupported(
                    format!("{prefix}.factor"),
                    factor,
                    "must be positive",
                ));
            }
            let original = num(obj, "original_max_position_embeddings", prefix)?
                .map(|v| v as usize)
                .or(raw.max_position_embeddings)
                .ok_or_else(|| {
                    EngineError::unsupported(
                        format!("{prefix}.original_max_position_embeddings"),
                        "missing",
                        "YaRN needs the pre-training context length",
                    )
                })?;
            let truncate = match obj.get("truncate") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(EngineError::unsupported(
                        format!("{prefix}.truncate"),
                        v,
                        "true or false",
                    ));
                }
            };
            Ok((
                theta,
                RopeScaling::Yarn(YarnParams {
                    factor,
                    original_max_position_embeddings: original,
                    // transformers treats 0 like "absent" here (`or 32`), so do we.
                    beta_fast: num(obj, "beta_fast", prefix)?
                        .filter(|v| *v != 0.0)
                        .unwrap_or(32.0),
                    beta_slow: num(obj, "beta_slow", prefix)?
                        .filter(|v| *v != 0.0)
                        .unwrap_or(1.0),
                    mscale: num(obj, "mscale", prefix)?,
                    mscale_all_dim: num(obj, "mscale_all_dim", prefix)?,
                    attention_factor: num(obj, "attention_factor", prefix)?,
                    truncate,
                }),
            ))
        }
        other => Err(EngineError::unsupported(
            format!("{prefix}.type"),
            format!("{other:?}"),
            "moemesh supports \"yarn\" and \"default\" rotary embeddings",
        )),
    }
}

fn parse_quantization(v: &Option<Value>) -> Result<Option<Quantization>> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(v) => {
            return Err(EngineError::unsupported(
                "quantization_config",
                v,
                "an object",
            ));
        }
    };
    let method = obj
        .get("quant_method")
        .and_then(Value::as_str)
        .unwrap_or("");
    match method {
        "fp8" => parse_fp8(obj).map(|q| Some(Quantization::Fp8(q))),
        "gptq" | "awq" => parse_int4(obj, method).map(|q| Some(Quantization::Int4(q))),
        "compressed-tensors" => parse_compressed_tensors(obj).map(|q| Some(Quantization::Int4(q))),
        _ => Err(EngineError::unsupported(
            "quantization_config.quant_method",
            format!("{method:?}"),
            "moemesh loads \"fp8\" block-quantised, and \"gptq\", \"awq\" or \"compressed-tensors\" 4-bit checkpoints",
        )),
    }
}

fn parse_fp8(obj: &serde_json::Map<String, Value>) -> Result<Fp8Quant> {
    if let Some(fmt) = obj.get("fmt").and_then(Value::as_str)
        && fmt != "e4m3"
    {
        return Err(EngineError::unsupported(
            "quantization_config.fmt",
            format!("{fmt:?}"),
            "only \"e4m3\" FP8 is supported",
        ));
    }
    if let Some(scheme) = obj.get("activation_scheme").and_then(Value::as_str)
        && scheme != "dynamic"
    {
        return Err(EngineError::unsupported(
            "quantization_config.activation_scheme",
            format!("{scheme:?}"),
            "only \"dynamic\" is supported (weights are dequantised on load)",
        ));
    }
    let block = match obj.get("weight_block_size") {
        None | Some(Value::Null) => [128, 128],
        Some(Value::Array(a)) if a.len() == 2 => {
            let dim = |v: &Value| v.as_u64().filter(|n| *n > 0).map(|n| n as usize);
            match (dim(&a[0]), dim(&a[1])) {
                (Some(r), Some(c)) => [r, c],
                _ => {
                    return Err(EngineError::unsupported(
                        "quantization_config.weight_block_size",
                        Value::Array(a.clone()),
                        "two positive integers",
                    ));
                }
            }
        }
        Some(v) => {
            return Err(EngineError::unsupported(
                "quantization_config.weight_block_size",
                v,
                "two positive integers",
            ));
        }
    };
    Ok(Fp8Quant {
        block_rows: block[0],
        block_cols: block[1],
    })
}

/// The first of `keys` that is present (AutoAWQ writes `w_bit`/`q_group_size` where
/// transformers writes `bits`/`group_size`).
fn first_key<'a>(
    obj: &'a serde_json::Map<String, Value>,
    keys: &[&'static str],
) -> Option<(&'static str, &'a Value)> {
    keys.iter()
        .find_map(|&k| obj.get(k).filter(|v| !v.is_null()).map(|v| (k, v)))
}

fn parse_int4(obj: &serde_json::Map<String, Value>, method: &str) -> Result<Int4Quant> {
    let key = |k: &str| format!("quantization_config.{k}");
    match first_key(obj, &["bits", "w_bit"]) {
        Some((_, v)) if v.as_u64() == Some(4) => {}
        Some((k, v)) => {
            return Err(EngineError::unsupported(
                key(k),
                v,
                format!("moemesh loads 4-bit {method} checkpoints only"),
            ));
        }
        None => {
            return Err(EngineError::unsupported(
                key("bits"),
                "missing",
                format!("a {method} checkpoint states its bits (4)"),
            ));
        }
    }
    let group_size = match first_key(obj, &["group_size", "q_group_size"]) {
        None => {
            return Err(EngineError::unsupported(
                key("group_size"),
                "missing",
                format!("a {method} checkpoint states its group size (e.g. 128)"),
            ));
        }
        Some((_, v)) if v.as_i64() == Some(-1) && method == "gptq" => None,
        Some((k, v)) => match v.as_u64().filter(|&g| g > 0 && g.is_multiple_of(8)) {
            Some(g) => Some(g as usize),
            None => {
                let expected = if method == "gptq" {
                    "a positive multiple of 8 (e.g. 128), or -1 for one group per column"
                } else {
                    "a positive multiple of 8 (e.g. 128)"
                };
                return Err(EngineError::unsupported(key(k), v, expected));
            }
        },
    };
    let flag = |k: &str, default: bool| -> Result<bool> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(EngineError::unsupported(key(k), v, "true or false")),
        }
    };
    let format = if method == "gptq" {
        let zeros_minus_one = match obj.get("checkpoint_format").and_then(Value::as_str) {
            None | Some("gptq") => true,
            Some("gptq_v2") => false,
            Some(other) => {
                return Err(EngineError::unsupported(
                    key("checkpoint_format"),
                    format!("{other:?}"),
                    "moemesh reads the \"gptq\" and \"gptq_v2\" layouts (not repacked ones such as marlin)",
                ));
            }
        };
        Int4Format::Gptq {
            zeros_minus_one,
            desc_act: flag("desc_act", false)?,
        }
    } else {
        if let Some(version) = obj.get("version").and_then(Value::as_str)
            && !version.eq_ignore_ascii_case("gemm")
        {
            return Err(EngineError::unsupported(
                key("version"),
                format!("{version:?}"),
                "moemesh reads AWQ's \"gemm\" layout (gemv and repacked layouts differ)",
            ));
        }
        if !flag("zero_point", true)? {
            return Err(EngineError::unsupported(
                key("zero_point"),
                false,
                "moemesh reads AWQ checkpoints with zero points (qzeros)",
            ));
        }
        Int4Format::Awq
    };
    Ok(Int4Quant { format, group_size })
}

/// compressed-tensors' `quantization_config` (`quant_method: "compressed-tensors"`): only its
/// `pack-quantized` format with 4-bit integer weights, `group` or `channel` strategy, and no
/// activation quantisation (W4A16) is read; `ignore` needs nothing (those layers store a plain
/// `weight`).
fn parse_compressed_tensors(obj: &serde_json::Map<String, Value>) -> Result<Int4Quant> {
    let key = |k: &str| format!("quantization_config.{k}");
    match obj.get("format").and_then(Value::as_str) {
        Some("pack-quantized") => {}
        other => {
            return Err(EngineError::unsupported(
                key("format"),
                format!("{other:?}"),
                "moemesh reads compressed-tensors' \"pack-quantized\" (4-bit int) checkpoints",
            ));
        }
    }
    let groups = match obj.get("config_groups") {
        Some(Value::Object(g)) if !g.is_empty() => g,
        other => {
            return Err(EngineError::unsupported(
                key("config_groups"),
                format!("{other:?}"),
                "at least one config group",
            ));
        }
    };
    let (mut symmetric, mut smallest) = (None::<bool>, None::<Option<usize>>);
    for (name, group) in groups {
        let at = |k: &str| key(&format!("config_groups.{name}.{k}"));
        for act in ["input_activations", "output_activations"] {
            if group.get(act).is_some_and(|v| !v.is_null()) {
                return Err(EngineError::unsupported(
                    at(act),
                    &group[act],
                    "null: moemesh runs weight-only (W4A16) compressed-tensors checkpoints",
                ));
            }
        }
        let Some(w) = group.get("weights").and_then(Value::as_object) else {
            return Err(EngineError::unsupported(
                at("weights"),
                "missing",
                "the group's weight quantisation",
            ));
        };
        let field = |k: &str| w.get(k).filter(|v| !v.is_null());
        if field("num_bits").and_then(Value::as_u64) != Some(4) {
            return Err(EngineError::unsupported(
                at("weights.num_bits"),
                format!("{:?}", field("num_bits")),
                "4 (moemesh loads 4-bit compressed-tensors checkpoints)",
            ));
        }
        if let Some(t) = field("type").and_then(Value::as_str)
            && t != "int"
        {
            return Err(EngineError::unsupported(
                at("weights.type"),
                format!("{t:?}"),
                "\"int\"",
            ));
        }
        let sym = match field("symmetric") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(EngineError::unsupported(
                    at("weights.symmetric"),
                    v,
                    "true or false",
                ));
            }
        };
        if symmetric.is_some_and(|s| s != sym) {
            return Err(EngineError::unsupported(
                at("weights.symmetric"),
                sym,
                "the same in every config group (moemesh reads all-symmetric or all-asymmetric checkpoints)",
            ));
        }
        symmetric = Some(sym);
        let size = match field("strategy").and_then(Value::as_str) {
            Some("channel") => None,
            Some("group") => match field("group_size").and_then(Value::as_u64) {
                Some(g) if g > 0 && g.is_multiple_of(8) => Some(g as usize),
                _ => {
                    return Err(EngineError::unsupported(
                        at("weights.group_size"),
                        format!("{:?}", field("group_size")),
                        "a positive multiple of 8 (e.g. 128)",
                    ));
                }
            },
            other => {
                return Err(EngineError::unsupported(
                    at("weights.strategy"),
                    format!("{other:?}"),
                    "\"group\" or \"channel\"",
                ));
            }
        };
        smallest = Some(match (smallest.flatten(), size) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        });
    }
    Ok(Int4Quant {
        format: Int4Format::CompressedTensors {
            symmetric: symmetric.unwrap_or(true),
        },
        group_size: smallest.flatten(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "model_type": "deepseek_v3", "vocab_size": 512, "hidden_size": 128,
            "intermediate_size": 320, "moe_intermediate_size": 160, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
            "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
            "routed_scaling_factor": 2.5, "norm_topk_prob": true, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc", "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "q_lora_rank": 96, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
            "v_head_dim": 32, "max_position_embeddings": 256, "rope_theta": 10000.0,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
            "eos_token_id": 1, "bos_token_id": 0
        })
    }

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_raw(&serde_json::from_value(v).expect("raw config"))
    }

    #[test]
    fn reads_yarn_from_rope_scaling_and_rope_parameters_alike() {
        let a = parse(base()).expect("rope_scaling form");
        let mut v = base();
        let scaling = v["rope_scaling"].take();
        let obj = v.as_object_mut().expect("object");
        obj.remove("rope_scaling");
        obj.remove("rope_theta");
        let mut params = scaling;
        params["rope_type"] = "yarn".into();
        params["rope_theta"] = 10000.0.into();
        obj.insert("rope_parameters".into(), params);
        let b = parse(v).expect("rope_parameters form");
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert_eq!(a.rope_theta, b.rope_theta);
        assert!(matches!(a.rope_scaling, RopeScaling::Yarn(ref y) if y.factor == 4.0));
    }

    #[test]
    fn unsupported_values_name_the_key_and_value() {
        let mut v = base();
        v["topk_method"] = "group_limited_greedy".into();
        let err = parse(v).expect_err("v3 with v2 routing").to_string();
        assert!(
            err.contains("topk_method") && err.contains("group_limited_greedy"),
            "{err}"
        );

        let mut v = base();
        v["rope_scaling"]["type"] = "dynamic".into();
        let err = parse(v).expect_err("dynamic rope").to_string();
        assert!(
            err.contains("rope_scaling.type") && err.contains("dynamic"),
            "{err}"
        );

        let mut v = base();
        v["quantization_config"] = serde_json::json!({"quant_method": "bitsandbytes"});
        let err = parse(v).expect_err("bitsandbytes").to_string();
        assert!(
            err.contains("quant_method") && err.contains("bitsandbytes"),
            "{err}"
        );

        let mut v = base();
        v["model_type"] = "llama".into();
        let err = parse(v).expect_err("llama").to_string();
        assert!(err.contains("model_type") && err.contains("llama"), "{err}");
    }

    fn with_quant(q: Value) -> Result<ModelConfig> {
        let mut v = base();
        v["quantization_config"] = q;
        parse(v)
    }

    #[test]
    fn reads_gptq_and_awq_int4_configs() {
        // As GPTQModel/AutoGPTQ write it (transformers' GPTQConfig keys).
        let gptq = with_quant(serde_json::json!({
            "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false,
            "sym": true, "damp_percent": 0.01, "true_sequential": true
        }))
        .expect("gptq");
        assert_eq!(
            gptq.quantization,
            Some(Quantization::Int4(Int4Quant {
                format: Int4Format::Gptq {
                    zeros_minus_one: true,
                    desc_act: false
                },
                group_size: Some(128),
            }))
        );
        let v2 = with_quant(serde_json::json!({
            "quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": true,
            "checkpoint_format": "gptq_v2"
        }))
        .expect("gptq v2");
        assert_eq!(
            v2.quantization,
            Some(Quantization::Int4(Int4Quant {
                format: Int4Format::Gptq {
                    zeros_minus_one: false,
                    desc_act: true
                },
                group_size: None,
            }))
        );
        // AutoAWQ's own keys.
        let awq = with_quant(serde_json::json!({
            "quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": true,
            "version": "GEMM"
        }))
        .expect("awq");
        assert_eq!(
            awq.quantization,
            Some(Quantization::Int4(Int4Quant {
                format: Int4Format::Awq,
                group_size: Some(64),
            }))
        );
        assert_eq!(awq.quantization.map(|q| q.label()), Some("int4_awq"));
    }

    #[test]
    fn unsupported_int4_settings_name_the_key_and_limit() {
        let cases = [
            (
                serde_json::json!({"quant_method": "gptq", "bits": 8, "group_size": 128}),
                ["quantization_config.bits", "8", "4-bit"],
            ),
            (
                serde_json::json!({"quant_method": "awq", "w_bit": 3, "q_group_size": 128}),
                ["quantization_config.w_bit", "3", "4-bit"],
            ),
            (
                serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": 100}),
                ["quantization_config.group_size", "100", "multiple of 8"],
            ),
            (
                serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": -1}),
                ["quantization_config.group_size", "-1", "positive"],
            ),
            (
                serde_json::json!({"quant_method": "gptq", "bits": 4}),
                ["quantization_config.group_size", "missing", "group size"],
            ),
            (
                serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": 128,
                    "checkpoint_format": "marlin"}),
                ["quantization_config.checkpoint_format", "marlin", "gptq_v2"],
            ),
            (
                serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 128,
                    "version": "gemv"}),
                ["quantization_config.version", "gemv", "gemm"],
            ),
            (
                serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": 128,
                    "desc_act": "yes"}),
                ["quantization_config.desc_act", "yes", "true or false"],
            ),
        ];
        for (q, needles) in cases {
            let err = with_quant(q.clone()).expect_err("unsupported").to_string();
            for n in needles {
                assert!(err.contains(n), "{q}: {err} lacks {n:?}");
            }
        }
    }

    /// As llm-compressor writes a W4A16 checkpoint's config (RedHatAI's DeepSeek-R1 w4a16).
    fn compressed_tensors(group: Value) -> Value {
        serde_json::json!({
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head", "re:.*mlp.gate$"],
            "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": null, "output_activations": null,
                "weights": group
            }}
        })
    }

    #[test]
    fn reads_compressed_tensors_w4a16_configs() {
        let q = with_quant(compressed_tensors(serde_json::json!({
            "num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
            "group_size": 128, "dynamic": false, "observer": "minmax"
        })))
        .expect("w4a16");
        assert_eq!(
            q.quantization,
            Some(Quantization::Int4(Int4Quant {
                format: Int4Format::CompressedTensors { symmetric: true },
                group_size: Some(128),
            }))
        );
        assert_eq!(
            q.quantization.map(|q| q.label()),
            Some("int4_compressed_tensors")
        );
        let channel = with_quant(compressed_tensors(serde_json::json!({
            "num_bits": 4, "type": "int", "symmetric": false, "strategy": "channel"
        })))
        .expect("channel");
        assert_eq!(
            channel.quantization,
            Some(Quantization::Int4(Int4Quant {
                format: Int4Format::CompressedTensors { symmetric: false },
                group_size: None,
            }))
        );
    }

    #[test]
    fn unsupported_compressed_tensors_settings_name_the_key() {
        let w = |extra: Value| {
            let mut g = serde_json::json!({
                "num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
                "group_size": 128
            });
            for (k, v) in extra.as_object().expect("object") {
                g[k] = v.clone();
            }
            compressed_tensors(g)
        };
        let mut fp8 = w(serde_json::json!({}));
        fp8["format"] = "float-quantized".into();
        let mut w4a8 = w(serde_json::json!({}));
        w4a8["config_groups"]["group_0"]["input_activations"] =
            serde_json::json!({"num_bits": 8, "type": "int"});
        let cases = [
            (w(serde_json::json!({"num_bits": 8})), "weights.num_bits"),
            (w(serde_json::json!({"type": "float"})), "weights.type"),
            (
                w(serde_json::json!({"strategy": "tensor"})),
                "weights.strategy",
            ),
            (
                w(serde_json::json!({"group_size": 100})),
                "weights.group_size",
            ),
            (fp8, "quantization_config.format"),
            (w4a8, "group_0.input_activations"),
        ];
        for (q, needle) in cases {
            let err = with_quant(q.clone()).expect_err("unsupported").to_string();
            assert!(err.contains(needle), "{q}: {err} lacks {needle:?}");
        }
    }

    #[test]
    fn moe_layers_follow_first_k_dense_and_frequency() {
        let cfg = parse(base()).expect("config");
        assert_eq!(cfg.moe_layers(), vec![1, 2]);
        assert_eq!(cfg.kv_cache_width(), 80);
    }
}
