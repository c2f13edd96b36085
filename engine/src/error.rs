//! The engine's one error type. Every message names what was wrong (the config key, the tensor, the
//! limit) so that a service can hand it to a user as it is; `kind()` gives callers a category they
//! can act on without parsing text (the services map it to a gRPC status once, at their edge).

use std::path::PathBuf;

/// What a caller can do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request or the model directory is wrong; retrying the same thing fails the same way.
    Invalid,
    /// A needed resource (file, tokenizer, expert) is not there now.
    Unavailable,
    /// A bounded resource (KV memory) is full now; retrying later may work.
    Exhausted,
    /// A bug or an unexpected failure inside the engine.
    Internal,
    /// The request does not match the state held for its sequence (e.g. a step for positions
    /// this replica does not hold): resend from a state that does.
    Precondition,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("config: cannot read {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config: {path} is not valid JSON for a DeepSeek config: {source}")]
    ConfigParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("config: unsupported value for `{key}`: {value} ({expected})")]
    ConfigUnsupported {
        key: String,
        value: String,
        expected: String,
    },
    #[error("weights: cannot open {path}: {reason}")]
    WeightFile { path: PathBuf, reason: String },
    #[error("weights: tensor `{name}` is missing from the checkpoint{hint}")]
    MissingTensor { name: String, hint: String },
    #[error("weights: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("weights: tensor `{name}` has dtype {dtype}, which moemesh does not load ({expected})")]
    TensorDtype {
        name: String,
        dtype: String,
        expected: String,
    },
    /// A quantised tensor whose packing, scales or groups do not match its layer (named).
    #[error("weights: quantised tensor `{name}`: {reason}")]
    QuantizedTensor { name: String, reason: String },
    /// A reference-figures file beside a fixture (`hf_bf16_reference.json`) that cannot be read
    /// or does not have the expected fields.
    #[error("reference figures: {path}: {reason}")]
    ReferenceFigures { path: PathBuf, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A sequence or pool asked for more than the model or the configuration allows (the context
    /// length, a pool of no blocks): the caller's request or flags are wrong.
    #[error("kv cache: {0}")]
    KvLimit(String),
    /// The KV bookkeeping is inconsistent (blocks written or read without a reservation): a bug
    /// in the engine, never the client's fault.
    #[error("kv cache: {0}")]
    KvCache(String),
    #[error("kv cache: {0}")]
    KvExhausted(String),
    /// This process was asked for a part of the model it did not load (a wiring fault between
    /// roles, not a bad request).
    #[error("{0}")]
    NotLoaded(String),
    /// Routed experts could not be computed (no live worker, or every replica failed).
    #[error("{0}")]
    ExpertsUnavailable(String),
    /// A step does not match what is held for one of its sequences.
    #[error("{0}")]
    SequenceState(String),
    /// A broken invariant inside the engine (a bug).
    #[error("internal: {0}")]
    Internal(String),
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl EngineError {
    /// The category of this error. Every variant is named, so a new one has to be placed
    /// deliberately: an engine fault must never reach a client as INVALID_ARGUMENT.
    pub fn kind(&self) -> ErrorKind {
        match self {
            // The model directory is wrong: loading it again fails the same way.
            EngineError::ConfigParse { .. }
            | EngineError::ConfigUnsupported { .. }
            | EngineError::MissingTensor { .. }
            | EngineError::TensorShape { .. }
            | EngineError::TensorDtype { .. }
            | EngineError::QuantizedTensor { .. }
            | EngineError::ReferenceFigures { .. } => ErrorKind::Invalid,
            // The text or the template cannot be encoded or rendered as asked.
            EngineError::Tokenizer(_) | EngineError::ChatTemplate(_) => ErrorKind::Invalid,
            EngineError::InvalidInput(_) | EngineError::KvLimit(_) => ErrorKind::Invalid,
            EngineError::ConfigRead { .. }
            | EngineError::WeightFile { .. }
            | EngineError::ExpertsUnavailable(_) => ErrorKind::Unavailable,
            EngineError::Internal(_) => ErrorKind::Internal,
            EngineError::SequenceState(_) => ErrorKind::Precondition,
            EngineError::KvExhausted(_) => ErrorKind::Exhausted,
            EngineError::KvCache(_) | EngineError::NotLoaded(_) | EngineError::Tensor(_) => {
                ErrorKind::Internal
            }
        }
    }

    pub(crate) fn unsupported(
        key: impl Into<String>,
        value: impl std::fmt::Display,
        expected: impl Into<String>,
    ) -> Self {
        EngineError::ConfigUnsupported {
            key: key.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_faults_are_not_the_callers_fault() {
        let reserve = EngineError::KvCache("decode batch: KV blocks were not reserved".into());
        assert_eq!(reserve.kind(), ErrorKind::Internal);
        let wiring = EngineError::NotLoaded("this process did not load the embedding table".into());
        assert_eq!(wiring.kind(), ErrorKind::Internal);
        let candle = EngineError::Tensor(candle_core::Error::Msg("shape mismatch".into()));
        assert_eq!(candle.kind(), ErrorKind::Internal);
    }

    #[test]
    fn each_category_has_its_variants() {
        let cases = [
            (
                EngineError::InvalidInput("token id 9 is outside".into()),
                ErrorKind::Invalid,
            ),
            (
                EngineError::KvLimit("over the context length".into()),
                ErrorKind::Invalid,
            ),
            (
                EngineError::Tokenizer("cannot encode".into()),
                ErrorKind::Invalid,
            ),
            (
                EngineError::ChatTemplate("rendering failed".into()),
                ErrorKind::Invalid,
            ),
            (
                EngineError::unsupported("model_type", "llama", "deepseek_v3"),
                ErrorKind::Invalid,
            ),
            (
                EngineError::MissingTensor {
                    name: "lm_head.weight".into(),
                    hint: String::new(),
                },
                ErrorKind::Invalid,
            ),
            (
                EngineError::KvExhausted("no free blocks".into()),
                ErrorKind::Exhausted,
            ),
            (
                EngineError::ExpertsUnavailable("no live worker".into()),
                ErrorKind::Unavailable,
            ),
            (
                EngineError::WeightFile {
                    path: "model.safetensors".into(),
                    reason: "gone".into(),
                },
                ErrorKind::Unavailable,
            ),
        ];
        for (err, kind) in cases {
            assert_eq!(err.kind(), kind, "{err}");
        }
    }
}
