//! The model's tokenizer: `tokenizer.json` through the `tokenizers` crate (the same Rust code
//! that backs Python's `tokenizers`, so ids match the reference exactly), plus what
//! `tokenizer_config.json` adds on top: the BOS/EOS tokens and the chat template.
//!
//! Loaded once per model (from the model directory, or the vendored DeepSeek-R1 tokenizer for the
//! embedded model) and shared by the frontend, the in-process generator and the incremental
//! decoder; cloning is cheap.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::chat_template::{ChatMessage, ChatTemplate};
use crate::error::{EngineError, Result};

const R1_TOKENIZER_JSON: &[u8] =
    include_bytes!("../../assets/deepseek-r1-tokenizer/tokenizer.json");
const R1_TOKENIZER_CONFIG_JSON: &[u8] =
    include_bytes!("../../assets/deepseek-r1-tokenizer/tokenizer_config.json");

/// Where the bytes came from, so that load errors name the actual file.
struct Origin {
    tokenizer: String,
    config: String,
}

impl Origin {
    fn bare() -> Self {
        Origin {
            tokenizer: "tokenizer.json".into(),
            config: "tokenizer_config.json".into(),
        }
    }
}

/// A chat template kept in its own file (`chat_template.jinja`, which recent transformers writes
/// instead of the `chat_template` key); it takes precedence over the config's, as in transformers.
struct TemplateFile {
    source: String,
    origin: String,
}

struct Inner {
    tokenizer: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<ChatTemplate>,
    /// Why there is no chat template, for the error when a chat request arrives anyway.
    no_template_reason: String,
    /// Constrained decoding's token trie and parser factory, built on first use (or why they
    /// cannot be).
    grammars: std::sync::OnceLock<std::result::Result<Arc<crate::constraint::Grammars>, String>>,
}

/// A tokenizer with its config. Clones share one loaded tokenizer.
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
            .field("has_chat_template", &self.inner.chat_template.is_some())
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (and `tokenizer_config.json` when present) from a model
    /// directory; `Ok(None)` when there is no `tokenizer.json`, since a model directory may come
    /// without one and the caller then decides on a fallback.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Ok(None);
        }
        let read = |p: &Path| {
            std::fs::read(p)
                .map_err(|e| EngineError::Tokenizer(format!("cannot read {}: {e}", p.display())))
        };
        let tokenizer_json = read(&tokenizer_path)?;
        let config_path = dir.join("tokenizer_config.json");
        let config_json = if config_path.is_file() {
            Some(read(&config_path)?)
        } else {
            None
        };
        let template_path = dir.join("chat_template.jinja");
        let template_file = if template_path.is_file() {
            let source = String::from_utf8(read(&template_path)?).map_err(|e| {
                EngineError::ChatTemplate(format!("{} is not UTF-8: {e}", template_path.display()))
            })?;
            Some(TemplateFile {
                source,
                origin: template_path.display().to_string(),
            })
        } else {
            None
        };
        let origin = Origin {
            tokenizer: tokenizer_path.display().to_string(),
            config: config_path.display().to_string(),
        };
        Self::load(
            &tokenizer_json,
            config_json.as_deref(),
            template_file,
            origin,
        )
        .map(Some)
    }

    pub fn from_bytes(tokenizer_json: &[u8], tokenizer_config_json: Option<&[u8]>) -> Result<Self> {
        Self::load(tokenizer_json, tokenizer_config_json, None, Origin::bare())
    }

    /// The vendored DeepSeek-R1 tokenizer (see `engine/assets/deepseek-r1-tokenizer/NOTICE.md`),
    /// for models whose directory has no tokenizer of its own.
    pub fn embedded_deepseek_r1() -> Result<Self> {
        let origin = Origin {
            tokenizer: "embedded DeepSeek-R1 tokenizer.json".into(),
            config: "embedded DeepSeek-R1 tokenizer_config.json".into(),
        };
        Self::load(
            R1_TOKENIZER_JSON,
            Some(R1_TOKENIZER_CONFIG_JSON),
            None,
            origin,
        )
    }

    fn load(
        tokenizer_json: &[u8],
        config_json: Option<&[u8]>,
        template_file: Option<TemplateFile>,
        origin: Origin,
    ) -> Result<Self> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(|e| {
            EngineError::Tokenizer(format!("{} does not load: {e}", origin.tokenizer))
        })?;
        let config: Value = match config_json {
            Some(bytes) => serde_json::from_slice(bytes).map_err(|e| {
                EngineError::Tokenizer(format!("{} is not valid JSON: {e}", origin.config))
            })?,
            None => Value::Null,
        };
        let bos_token = special_token(&config, "bos_token", &origin.config)?;
        let eos_token = special_token(&config, "eos_token", &origin.config)?;
        let source = match template_file {
            Some(file) => Some((file.source, file.origin)),
            None => template_source(&config, &origin.config)?
                .map(|s| (s, format!("{}: `chat_template`", origin.config))),
        };
        let chat_template = match source {
            Some((source, template_origin)) => Some(
                ChatTemplate::new(source, bos_token.clone(), eos_token.clone()).map_err(|e| {
                    EngineError::ChatTemplate(format!("{template_origin}: {}", inner_message(e)))
                })?,
            ),
            None => None,
        };
        Ok(TextTokenizer {
            inner: Arc::new(Inner {
                tokenizer,
                bos_token,
                eos_token,
                chat_template,
                no_template_reason: if config_json.is_some() {
                    format!("{} has no `chat_template`", origin.config)
                } else {
                    format!("there is no {}", origin.config)
                },
                grammars: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Each id's bytes, as the byte-level decoder turns it into text (special tokens behind
    /// toktrie's marker byte, so no text matches them), for constrained decoding's token trie.
    pub fn token_bytes(&self) -> std::result::Result<Vec<Vec<u8>>, String> {
        let json = serde_json::to_value(&self.inner.tokenizer).map_err(|e| e.to_string())?;
        llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())
    }

    /// Constrained decoding's grammars over this vocabulary, built on the first call (a few
    /// hundred milliseconds for a 129k vocabulary) and shared after.
    pub fn grammars(&self) -> Result<Arc<crate::constraint::Grammars>> {
        self.inner
            .grammars
            .get_or_init(|| {
                crate::constraint::Grammars::new(self)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(EngineError::Tokenizer)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text. Ids the tokenizer does not know (the model's embedding is padded past
    /// the tokenizer's vocabulary) decode to nothing, as in Python `tokenizers`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| EngineError::Tokenizer(format!("cannot decode {} ids: {e}", ids.len())))
    }

    /// Vocabulary size including added tokens (this is the tokenizer's, which can be smaller than
    /// the model's `vocab_size`).
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

    /// Renders the chat template; an error if the tokenizer config has none.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template().ok_or_else(|| {
            EngineError::ChatTemplate(format!(
                "this model has no chat template ({}), so it cannot take chat messages; send a plain prompt",
                self.inner.no_template_reason
            ))
        })?;
        template.render(messages, add_generation_prompt)
    }

    /// Renders, then encodes without adding special tokens: the template already starts with
    /// BOS, and adding it again would give the model a prompt it never saw in training. This is
    /// what transformers' `apply_chat_template(tokenize=True)` does.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}

/// A special token in `tokenizer_config.json`: a string, an AddedToken object
/// (`{"__type": "AddedToken", "content": ...}`), or null/absent.
fn special_token(config: &Value, key: &str, origin: &str) -> Result<Option<String>> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(EngineError::Tokenizer(format!(
                "{origin}: `{key}` is an object without a string `content`"
            ))),
        },
        Some(other) => Err(EngineError::Tokenizer(format!(
            "{origin}: `{key}` must be a string or an AddedToken object, not {other}"
        ))),
    }
}

/// The chat template source: a string, or (as newer transformers saves it) a list of named
/// templates, of which chat requests use the one called "default".
fn template_source(config: &Value, origin: &str) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let default = list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
            match default.map(|t| t.get("template")) {
                Some(Some(Value::String(s))) => Ok(Some(s.clone())),
                Some(_) => Err(EngineError::Tokenizer(format!(
                    "{origin}: `chat_template` entry \"default\" has no string `template`"
                ))),
                None => Err(EngineError::Tokenizer(format!(
                    "{origin}: `chat_template` is a list without an entry named \"default\""
                ))),
            }
        }
        Some(_) => Err(EngineError::Tokenizer(format!(
            "{origin}: `chat_template` must be a string or a list of {{name, template}}"
        ))),
    }
}

/// The message of a chat-template error without its "chat template:" prefix, so that adding
/// the file name does not repeat it.
fn inner_message(e: EngineError) -> String {
    match e {
        EngineError::ChatTemplate(m) => m,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r1() -> TextTokenizer {
        TextTokenizer::embedded_deepseek_r1().expect("embedded tokenizer loads")
    }

    /// A unique, initially empty directory under the system temp dir.
    fn scratch_dir(tag: &str) -> std::path::PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "moemesh-tokenizer-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    #[test]
    fn embedded_r1_has_its_special_tokens_and_template() {
        let t = r1();
        assert_eq!(t.vocab_size(), 128_815);
        assert_eq!(t.bos_token(), Some("<｜begin▁of▁sentence｜>"));
        assert_eq!(t.eos_token(), Some("<｜end▁of▁sentence｜>"));
        assert_eq!(t.token_to_id("<｜begin▁of▁sentence｜>"), Some(0));
        assert_eq!(t.token_to_id("<｜end▁of▁sentence｜>"), Some(1));
        assert_eq!(t.token_to_id("<｜Assistant｜>"), Some(128_804));
        assert!(t.chat_template().is_some());
        assert!(format!("{t:?}").contains("128815"));
    }

    #[test]
    fn add_special_tokens_does_not_add_bos_for_r1() {
        // R1's tokenizer.json has a ByteLevel post-processor, not a template adding BOS; the
        // chat template is what puts BOS in a prompt.
        let t = r1();
        assert_eq!(
            t.encode("Hello", true).expect("encode"),
            t.encode("Hello", false).expect("encode")
        );
    }

    #[test]
    fn special_tokens_may_be_strings_objects_or_null() {
        let config = serde_json::json!({
            "bos_token": "<s>",
            "eos_token": {"__type": "AddedToken", "content": "</s>"},
            "unk_token": null,
            "pad_token": {"content": 3},
            "sep_token": 7,
        });
        assert_eq!(
            special_token(&config, "bos_token", "cfg").expect("ok"),
            Some("<s>".into())
        );
        assert_eq!(
            special_token(&config, "eos_token", "cfg").expect("ok"),
            Some("</s>".into())
        );
        assert_eq!(
            special_token(&config, "unk_token", "cfg").expect("ok"),
            None
        );
        assert_eq!(special_token(&config, "missing", "cfg").expect("ok"), None);
        let err = special_token(&config, "pad_token", "cfg")
            .expect_err("bad content")
            .to_string();
        assert!(err.contains("cfg") && err.contains("pad_token"), "{err}");
        let err = special_token(&config, "sep_token", "cfg")
            .expect_err("number")
            .to_string();
        assert!(err.contains("sep_token"), "{err}");
    }

    #[test]
    fn a_list_of_named_templates_uses_the_default_one() {
        let config = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "plain"},
        ]});
        assert_eq!(
            template_source(&config, "cfg").expect("ok"),
            Some("plain".into())
        );
        let config = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "t"}]});
        let err = template_source(&config, "cfg")
            .expect_err("no default")
            .to_string();
        assert!(err.contains("cfg") && err.contains("default"), "{err}");
    }

    #[test]
    fn bad_input_files_are_named_in_the_error() {
        let err = TextTokenizer::from_bytes(b"{not json", None)
            .expect_err("bad tokenizer.json")
            .to_string();
        assert!(err.contains("tokenizer.json does not load"), "{err}");

        let err = TextTokenizer::from_bytes(R1_TOKENIZER_JSON, Some(b"[1,"))
            .expect_err("bad config")
            .to_string();
        assert!(
            err.contains("tokenizer_config.json is not valid JSON"),
            "{err}"
        );

        let err = TextTokenizer::from_bytes(
            R1_TOKENIZER_JSON,
            Some(br#"{"chat_template": "{% for %}"}"#),
        )
        .expect_err("bad template")
        .to_string();
        assert!(
            err.starts_with("chat template: tokenizer_config.json: `chat_template`: the template does not compile"),
            "{err}"
        );
    }

    #[test]
    fn without_a_config_there_is_no_chat_template() {
        let t = TextTokenizer::from_bytes(R1_TOKENIZER_JSON, None).expect("loads");
        assert_eq!(t.bos_token(), None);
        assert!(t.chat_template().is_none());
        let err = t
            .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
            .expect_err("no template");
        assert!(matches!(err, EngineError::ChatTemplate(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("no chat template (there is no tokenizer_config.json)"),
            "{err}"
        );
        let t = TextTokenizer::from_bytes(R1_TOKENIZER_JSON, Some(b"{}")).expect("loads");
        let err = t
            .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
            .expect_err("no template")
            .to_string();
        assert!(
            err.contains("(tokenizer_config.json has no `chat_template`)"),
            "{err}"
        );
    }

    #[test]
    fn from_dir_loads_both_files_and_names_the_path_on_error() {
        let dir = scratch_dir("load");
        std::fs::write(dir.join("tokenizer.json"), R1_TOKENIZER_JSON).expect("write");
        std::fs::write(dir.join("tokenizer_config.json"), R1_TOKENIZER_CONFIG_JSON).expect("write");
        let t = TextTokenizer::from_dir(&dir)
            .expect("loads")
            .expect("has a tokenizer");
        assert_eq!(
            t.encode_chat(&[ChatMessage::new("user", "Hi")], true)
                .expect("chat"),
            vec![0, 128_803, 23_166, 128_804]
        );

        std::fs::write(dir.join("tokenizer_config.json"), "{").expect("write");
        let err = TextTokenizer::from_dir(&dir)
            .expect_err("bad config")
            .to_string();
        let config_path = dir.join("tokenizer_config.json").display().to_string();
        assert!(err.contains(&config_path), "{err}");

        // A separate chat_template.jinja wins over the config's template.
        std::fs::write(dir.join("tokenizer_config.json"), R1_TOKENIZER_CONFIG_JSON).expect("write");
        std::fs::write(
            dir.join("chat_template.jinja"),
            "{% for m in messages %}{{ m.role }}:{{ m.content }}{% endfor %}",
        )
        .expect("write");
        let t = TextTokenizer::from_dir(&dir)
            .expect("loads")
            .expect("has a tokenizer");
        assert_eq!(
            t.apply_chat_template(&[ChatMessage::new("user", "Hi")], true)
                .expect("chat"),
            "user:Hi"
        );
        std::fs::write(dir.join("chat_template.jinja"), "{% if %}").expect("write");
        let err = TextTokenizer::from_dir(&dir)
            .expect_err("bad template")
            .to_string();
        let template_path = dir.join("chat_template.jinja").display().to_string();
        assert!(err.contains(&template_path), "{err}");

        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
