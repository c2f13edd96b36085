//! The model's tokenizer: `tokenizer.json` through the `tokenizers` crate, plus what
//! `tokenizer_config.json` adds (BOS/EOS tokens, the chat template).

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::chat_template::{ChatMessage, ChatTemplate};
use crate::error::{EngineError, Result};

const R1_TOKENIZER: &[u8] = include_bytes!("../../assets/deepseek-r1-tokenizer/tokenizer.json");
const R1_TOKENIZER_CONFIG: &[u8] =
    include_bytes!("../../assets/deepseek-r1-tokenizer/tokenizer_config.json");

struct Inner {
    tokenizer: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<ChatTemplate>,
}

/// A tokenizer with its config; cheap to clone.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.inner.bos_token)
            .field("eos_token", &self.inner.eos_token)
            .finish()
    }
}

/// A special token in `tokenizer_config.json`: a string, or an AddedToken object.
fn special_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (and `tokenizer_config.json` when present) from a model
    /// directory; `Ok(None)` when there is no `tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Ok(None);
        }
        let read = |p: &Path| {
            std::fs::read(p)
                .map_err(|e| EngineError::Tokenizer(format!("cannot read {}: {e}", p.display())))
        };
        let tok = read(&tok_path)?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.is_file() {
            Some(read(&cfg_path)?)
        } else {
            None
        };
        Self::from_bytes(&tok, cfg.as_deref())
            .map(Some)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", dir.display())))
    }

    pub fn from_bytes(tokenizer_json: &[u8], tokenizer_config_json: Option<&[u8]>) -> Result<Self> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| EngineError::Tokenizer(format!("tokenizer.json does not load: {e}")))?;
        let cfg: Value = match tokenizer_config_json {
            Some(b) => serde_json::from_slice(b).map_err(|e| {
                EngineError::Tokenizer(format!("tokenizer_config.json is not valid JSON: {e}"))
            })?,
            None => Value::Null,
        };
        let bos_token = special_token(&cfg, "bos_token");
        let eos_token = special_token(&cfg, "eos_token");
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(src)) => Some(ChatTemplate::new(
                src.clone(),
                bos_token.clone(),
                eos_token.clone(),
            )?),
            // A list of named templates: use the one called "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(|src| ChatTemplate::new(src.to_string(), bos_token.clone(), eos_token.clone()))
                .transpose()?,
            _ => None,
        };
        Ok(TextTokenizer {
            inner: Arc::new(Inner {
                tokenizer,
                bos_token,
                eos_token,
                chat_template,
            }),
        })
    }

    /// The vendored DeepSeek-R1 tokenizer (see `engine/assets/deepseek-r1-tokenizer/NOTICE.md`).
    pub fn embedded_deepseek_r1() -> Result<Self> {
        Self::from_bytes(R1_TOKENIZER, Some(R1_TOKENIZER_CONFIG))
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| EngineError::Tokenizer(format!("decoding failed: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.tokenizer.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.inner.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.inner.eos_token.as_deref()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.tokenizer.token_to_id(token)
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.inner.chat_template.as_ref()
    }

    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let t = self.chat_template().ok_or_else(|| {
            EngineError::InvalidInput(
                "chat: this model's tokenizer_config.json has no chat_template; send a plain prompt instead".into(),
            )
        })?;
        t.render(messages, add_generation_prompt)
    }

    /// Renders the template, then encodes without adding special tokens (the template already
    /// has BOS), as transformers' `apply_chat_template(tokenize=True)` does.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}
