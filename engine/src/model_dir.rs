//! A model as the rest of moemesh sees it before any weights are loaded: its validated config,
//! where its tensors come from, its tokenizer if it has one, its display name and its
//! fingerprint. Opened from a checkpoint directory, or built for the embedded default.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use sha2::{Digest, Sha256};

use crate::config::ModelConfig;
use crate::embedded::{
    EMBEDDED_MODEL_NAME, embedded_config, embedded_config_json, embedded_weights,
};
use crate::error::{EngineError, Result};
use crate::experts::{ExpertShard, ShardSpec};
use crate::model::{DeepSeekModel, Parts};
use crate::synthetic::{SyntheticSource, synthetic_config, synthetic_config_json};
use crate::text::TextTokenizer;
use crate::weights::safetensors::SafetensorsSource;
use crate::weights::{ExpertsDtype, LoadedBytes, Loader, TensorSource, checkpoint_format};

/// A model, opened but not loaded.
pub struct ModelFiles {
    pub config: ModelConfig,
    pub source: Arc<dyn TensorSource>,
    /// `None` for a directory without `tokenizer.json` (token-id input only).
    pub tokenizer: Option<TextTokenizer>,
    /// The directory's name, or the embedded model's name.
    pub name: String,
    /// Hex digest of the config and the weights: processes serving different models refuse to
    /// work together.
    pub fingerprint: String,
    /// The directory, when opened from one.
    pub dir: Option<PathBuf>,
    /// How the loaders made here hold the routed experts (`--weights-dtype`).
    pub experts_dtype: ExpertsDtype,
}

fn fingerprint(config_bytes: &[u8], source: &dyn TensorSource) -> String {
    let mut h = Sha256::new();
    h.update(config_bytes);
    h.update(source.digest());
    h.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl ModelFiles {
    /// Opens a checkpoint directory: `config.json`, safetensors, and `tokenizer.json` if present.
    /// `synthetic:NAME` instead names a generated benchmark model (see [`crate::synthetic`]).
    pub fn open(dir: &Path) -> Result<Self> {
        if let Some(name) = dir.to_str().and_then(|s| s.strip_prefix("synthetic:")) {
            return Self::synthetic(name);
        }
        if !dir.is_dir() {
            return Err(EngineError::WeightFile {
                path: dir.to_path_buf(),
                reason: "not a directory".into(),
            });
        }
        let config_path = dir.join("config.json");
        let config = ModelConfig::from_file(&config_path)?;
        let config_bytes =
            std::fs::read(&config_path).map_err(|source| EngineError::ConfigRead {
                path: config_path.clone(),
                source,
            })?;
        let source: Arc<dyn TensorSource> = Arc::new(SafetensorsSource::open_dir(dir)?);
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        Ok(ModelFiles {
            fingerprint: fingerprint(&config_bytes, source.as_ref()),
            config,
            source,
            tokenizer,
            name,
            dir: Some(dir.to_path_buf()),
            experts_dtype: ExpertsDtype::Auto,
        })
    }

    /// The embedded default model with the DeepSeek-R1 tokenizer.
    pub fn embedded() -> Result<Self> {
        let config = embedded_config()?;
        let source: Arc<dyn TensorSource> = Arc::new(embedded_weights(&config)?);
        let config_bytes = embedded_config_json().to_string().into_bytes();
        Ok(ModelFiles {
            fingerprint: fingerprint(&config_bytes, source.as_ref()),
            config,
            source,
            tokenizer: Some(TextTokenizer::embedded_deepseek_r1()?),
            name: EMBEDDED_MODEL_NAME.to_string(),
            dir: None,
            experts_dtype: ExpertsDtype::Auto,
        })
    }

    /// A synthetic model: random weights generated on the loading device, no tokenizer.
    pub fn synthetic(name: &str) -> Result<Self> {
        let config = synthetic_config(name)?;
        let source: Arc<dyn TensorSource> = Arc::new(SyntheticSource::new(name, &config));
        let config_bytes = synthetic_config_json(name)?.to_string().into_bytes();
        Ok(ModelFiles {
            fingerprint: fingerprint(&config_bytes, source.as_ref()),
            config,
            source,
            tokenizer: None,
            name: format!("synthetic:{name}"),
            dir: None,
            experts_dtype: ExpertsDtype::Auto,
        })
    }

    /// `open(dir)` when a directory is given, else the embedded model.
    pub fn open_or_embedded(dir: Option<&Path>) -> Result<Self> {
        match dir {
            Some(d) => Self::open(d),
            None => Self::embedded(),
        }
    }

    /// The same model with its routed experts held as `experts` says (see [`ExpertsDtype`]).
    /// The fingerprint stays the model's: FP8 experts quantised from bf16 compute the same model
    /// to e4m3's precision, and the gate, which holds no routed experts, need not be told.
    pub fn with_experts_dtype(mut self, experts: ExpertsDtype) -> Self {
        self.experts_dtype = experts;
        self
    }

    /// The checkpoint's weight format (`bf16`, `fp8_e4m3`, `int4_gptq`, ...), as ModelInfo and
    /// the roles' memory line report it; `<format>+fp8_experts` (`+int4_experts`) when the routed
    /// experts are quantised at load (`--weights-dtype fp8` on a checkpoint that is not FP8,
    /// `int4` on one that is not INT4).
    pub fn weights_format(&self) -> String {
        let stored = checkpoint_format(&self.config, self.source.as_ref());
        match self.experts_dtype.format_suffix(&stored) {
            Some(suffix) => format!("{stored}{suffix}"),
            None => stored,
        }
    }

    pub fn loader(&self, device: &Device, dtype: DType) -> Loader<'_> {
        Loader::new(self.source.as_ref(), &self.config, device, dtype)
            .with_experts_dtype(self.experts_dtype)
    }

    /// Loads the whole model in-process (dense part and every routed expert), warning about
    /// checkpoint tensors that nothing used.
    pub fn load_all(&self, device: &Device, dtype: DType) -> Result<(DeepSeekModel, ExpertShard)> {
        let loader = self.loader(device, dtype);
        let model = DeepSeekModel::load(&self.config, &loader, Parts::ALL)?;
        let experts = ExpertShard::load(&self.config, &loader, &ShardSpec::all(&self.config))?;
        let bytes = loader.loaded_bytes();
        // The in-process memory line (the mesh roles log theirs in their services).
        tracing::info!(
            role = "in-process",
            device = ?device,
            weights_format = %self.weights_format(),
            weight_bytes = bytes.resident_total(),
            resident = %LoadedBytes::describe(&bytes.resident),
            checkpoint = %LoadedBytes::describe(&bytes.checkpoint),
            "memory plan"
        );
        let unused = loader.unused(self.config.num_hidden_layers);
        if !unused.is_empty() {
            tracing::warn!(
                count = unused.len(),
                first = ?unused.iter().take(5).collect::<Vec<_>>(),
                "checkpoint tensors that the model does not use"
            );
        }
        Ok((model, experts))
    }
}
