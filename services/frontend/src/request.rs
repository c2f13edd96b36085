//! Turning a `GenerateRequest` off the wire into a validated engine request. Every rejection is
//! INVALID_ARGUMENT with the field and the limit in the message.

use moemesh_common::{MeshError, MeshResult};
use std::sync::Arc;

use moemesh_engine::constraint::ConstraintSpec;
use moemesh_engine::prefix_cache::{BlockHash, chain, chain_root};
use moemesh_engine::text::{ChatMessage, TextTokenizer};
use moemesh_engine::{GenerationRequest, Limits, ModelConfig, SamplingParams};
use moemesh_proto::v1::{self, generate_request::Input};

use crate::config::FrontendConfig;

/// Longest `request_id` (it is logged and put on the request's trace span).
pub const MAX_REQUEST_ID_BYTES: usize = 256;
/// Longest `cache_salt`.
pub const MAX_CACHE_SALT_BYTES: usize = 256;
/// Most choices (`sampling.n`) per request: each is a sequence of its own in the batch.
pub const MAX_CHOICES: u32 = 16;

/// How many choices a validated request asks for (`sampling.n`; 0 means 1).
pub fn choices(req: &v1::GenerateRequest) -> u32 {
    req.sampling.as_ref().map_or(1, |s| s.n.max(1))
}

/// The prefix-cache salt a gate gets for a request: a digest of the caller's API key id (when
/// keys are on, so tenants never share cached blocks) and the request's own `cache_salt`.
/// `None` when there is neither (the shared, unsalted space).
pub fn cache_salt(key: Option<&str>, salt: &str) -> Option<[u8; 32]> {
    use sha2::{Digest, Sha256};
    if key.is_none() && salt.is_empty() {
        return None;
    }
    let mut h = Sha256::new();
    for part in [key.unwrap_or(""), salt] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update([u8::from(key.is_some())]);
    Some(h.finalize().into())
}

/// The names of the prompt's full KV blocks as the gates' prefix caches name them
/// (`moemesh_engine::prefix_cache::chain` from the model fingerprint and the request's salt):
/// the frontend's index of what each gate holds is keyed by them.
pub fn prefix_chain(fingerprint: &str, salt: Option<[u8; 32]>, prompt: &[u32]) -> Arc<[BlockHash]> {
    let root = chain_root(fingerprint, salt.as_ref().map_or(&[][..], |s| &s[..]));
    chain(&root, prompt).into()
}

fn need_tokenizer<'a>(
    tok: Option<&'a TextTokenizer>,
    field: &str,
) -> MeshResult<&'a TextTokenizer> {
    tok.ok_or_else(|| {
        MeshError::Invalid(format!(
            "{field}: this model has no tokenizer (its directory has no tokenizer.json); send token ids in `tokens`"
        ))
    })
}

/// Prompt ids for `prompt` or `chat`, plus the rendered chat text (empty for a prompt).
pub fn tokenize(
    prompt: Option<&str>,
    chat: Option<&v1::ChatInput>,
    tok: Option<&TextTokenizer>,
    max_bytes: usize,
) -> MeshResult<(Vec<u32>, String)> {
    if let Some(p) = prompt {
        if p.is_empty() {
            return Err(MeshError::Invalid(
                "prompt: empty (it must have at least 1 character)".into(),
            ));
        }
        if p.len() > max_bytes {
            return Err(MeshError::Invalid(format!(
                "prompt: {} bytes, the limit is {max_bytes}",
                p.len()
            )));
        }
        let tok = need_tokenizer(tok, "prompt")?;
        return Ok((tok.encode(p, true)?, String::new()));
    }
    let Some(chat) = chat else {
        return Err(MeshError::Invalid(
            "input: one of prompt, chat or tokens is required".into(),
        ));
    };
    let bytes: usize = chat
        .messages
        .iter()
        .map(|m| m.content.len() + m.role.len())
        .sum();
    if bytes > max_bytes {
        return Err(MeshError::Invalid(format!(
            "chat.messages: {bytes} bytes, the limit is {max_bytes}"
        )));
    }
    let tok = need_tokenizer(tok, "chat")?;
    let messages: Vec<ChatMessage> = chat
        .messages
        .iter()
        .map(|m| ChatMessage::new(&m.role, &m.content))
        .collect();
    let rendered = tok.apply_chat_template(&messages, true)?;
    Ok((tok.encode(&rendered, false)?, rendered))
}

/// Validates and converts a request; `seed` is used when the request sets none. Also returns the
/// rendered chat (empty for other inputs).
pub fn to_engine_request(
    req: &v1::GenerateRequest,
    cfg: &FrontendConfig,
    model: &ModelConfig,
    tok: Option<&TextTokenizer>,
    seed: u64,
) -> MeshResult<(GenerationRequest, String)> {
    if req.request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(MeshError::Invalid(format!(
            "request_id: {} bytes, the limit is {MAX_REQUEST_ID_BYTES}",
            req.request_id.len()
        )));
    }
    if req.cache_salt.len() > MAX_CACHE_SALT_BYTES {
        return Err(MeshError::Invalid(format!(
            "cache_salt: {} bytes, the limit is {MAX_CACHE_SALT_BYTES}",
            req.cache_salt.len()
        )));
    }
    let (prompt_ids, rendered) = match &req.input {
        Some(Input::Tokens(t)) => {
            if t.ids.is_empty() {
                return Err(MeshError::Invalid(
                    "tokens.ids: empty (at least 1 token id is required)".into(),
                ));
            }
            (t.ids.clone(), String::new())
        }
        Some(Input::Prompt(p)) => tokenize(Some(p), None, tok, cfg.max_prompt_bytes)?,
        Some(Input::Chat(c)) => tokenize(None, Some(c), tok, cfg.max_prompt_bytes)?,
        None => tokenize(None, None, tok, cfg.max_prompt_bytes)?,
    };
    let s = req.sampling.clone().unwrap_or_default();
    if s.n > MAX_CHOICES {
        return Err(MeshError::Invalid(format!(
            "sampling.n: {} choices, the limit is {MAX_CHOICES}",
            s.n
        )));
    }
    let stopping = req.stopping.clone().unwrap_or_default();
    let out = GenerationRequest {
        prompt_ids,
        sampling: SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k as usize,
            top_p: s.top_p.unwrap_or(1.0),
            seed: Some(s.seed.unwrap_or(seed)),
            min_p: s.min_p.unwrap_or(0.0),
            repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
        },
        max_new_tokens: stopping
            .max_new_tokens
            .unwrap_or(cfg.default_max_new_tokens) as usize,
        stop: stopping.stop,
        ignore_eos: stopping.ignore_eos,
        stop_token_ids: stopping.stop_token_ids,
        min_new_tokens: stopping.min_new_tokens as usize,
        top_logprobs: s.top_logprobs as usize,
        prompt_logprobs: s.prompt_logprobs.map(|n| n as usize),
        constraint: constraint(s.constraint.as_ref())?,
    };
    let limits = Limits {
        max_new_tokens: cfg.max_new_tokens_limit as usize,
        max_stop_sequences: cfg.max_stop_sequences,
    };
    out.validate(model.vocab_size, model.max_position_embeddings, &limits)?;
    if let Some((i, s)) = out
        .stop
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() > cfg.max_stop_bytes)
    {
        return Err(MeshError::Invalid(format!(
            "stopping.stop[{i}]: {} bytes, the limit is {} (--max-stop-bytes)",
            s.len(),
            cfg.max_stop_bytes
        )));
    }
    if tok.is_none() && out.stop.iter().any(|s| !s.is_empty()) {
        return Err(MeshError::Invalid(
            "stopping.stop: stop strings need a tokenizer, and this model has none".into(),
        ));
    }
    Ok((out, rendered))
}

/// A request's constraint as the engine takes it (`None` when unset or empty).
fn constraint(c: Option<&v1::Constraint>) -> MeshResult<Option<ConstraintSpec>> {
    use v1::constraint::Kind;
    Ok(match c.and_then(|c| c.kind.as_ref()) {
        None => None,
        Some(Kind::Regex(r)) if r.is_empty() => {
            return Err(MeshError::Invalid(
                "sampling.constraint.regex: empty".into(),
            ));
        }
        Some(Kind::Regex(r)) => Some(ConstraintSpec::Regex(r.clone())),
        Some(Kind::JsonSchema(s)) => Some(ConstraintSpec::JsonSchema(s.clone())),
        Some(Kind::JsonObject(true)) => Some(ConstraintSpec::JsonObject),
        Some(Kind::JsonObject(false)) => None,
    })
}

/// The prompt as the model reads it, for the audit log: a prompt's UTF-8 bytes, the rendered
/// chat, or token ids as little-endian u32s; plus its text when it has one.
pub fn audit_prompt<'a>(
    req: &'a v1::GenerateRequest,
    rendered: &'a str,
) -> (std::borrow::Cow<'a, [u8]>, Option<&'a str>) {
    use std::borrow::Cow;
    match &req.input {
        Some(Input::Prompt(p)) => (Cow::Borrowed(p.as_bytes()), Some(p.as_str())),
        Some(Input::Chat(_)) => (Cow::Borrowed(rendered.as_bytes()), Some(rendered)),
        Some(Input::Tokens(t)) => (
            Cow::Owned(t.ids.iter().flat_map(|id| id.to_le_bytes()).collect()),
            None,
        ),
        None => (Cow::Borrowed(&[]), None),
    }
}
