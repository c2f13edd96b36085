//! In-process generation: one request through the whole model in this process (what
//! `moemesh generate --model DIR` runs, and the reference the mesh is compared against).
//!
//! The request types here (and their validation) are the ones the frontend applies to requests
//! that run through the mesh, and generation runs the same serving core ([`crate::serving`]):
//! scheduler, step runner and sequence decoder. Both paths agree token for token.

use std::time::Duration;

use candle_core::{DType, Device};

use crate::error::{EngineError, Result};
use crate::experts::ExpertShard;
use crate::model::DeepSeekModel;
use crate::model_dir::ModelFiles;
use crate::sampling::SamplingParams;
use crate::serving::LocalServer;
use crate::text::TextTokenizer;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_new_tokens` reached, or the context length.
    Length,
    /// A stop string appeared in the text.
    Stop,
    /// The model produced an end-of-sequence token.
    Eos,
    /// The caller stopped listening.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Eos => "eos",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// A validated-on-use generation request in token space.
#[derive(Debug, Clone, Default)]
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Ids that end the sequence like EOS does (finish reason stop; the id is not turned into text).
    pub stop_token_ids: Vec<u32>,
    /// Neither EOS nor a stop id can be picked before this many tokens are generated (stop
    /// strings still apply). At most `max_new_tokens`.
    pub min_new_tokens: usize,
    /// Report this many most likely ids with each token (`crate::logprobs`); 0 for none. At
    /// most [`crate::logprobs::MAX_TOP_LOGPROBS`]. Served by the serving core's runner.
    pub top_logprobs: usize,
    /// Report each prompt token's logprob given the tokens before it (every token but the
    /// first), with this many alternatives (`crate::logprobs::prompt_logprob`); `None` for none.
    /// At most [`crate::logprobs::MAX_TOP_LOGPROBS`] alternatives and
    /// [`crate::logprobs::MAX_PROMPT_LOGPROB_ENTRIES`] entries. Such a sequence bypasses the
    /// prefix cache (every prompt row must be computed for its logits), as vLLM does.
    pub prompt_logprobs: Option<usize>,
    /// What the output must follow (a regex or a JSON schema): each step's pick is masked to
    /// the ids the grammar allows ([`crate::constraint`]). Needs a tokenizer.
    pub constraint: Option<crate::constraint::ConstraintSpec>,
}

/// Server-side limits a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted `max_new_tokens`.
    pub max_new_tokens: usize,
    /// Most stop strings per request.
    pub max_stop_sequences: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_new_tokens: 4096,
            max_stop_sequences: 16,
        }
    }
}

impl GenerationRequest {
    /// Checks the request against the model and the limits. Messages name the field (as in the
    /// public API) and the limit.
    pub fn validate(
        &self,
        vocab_size: usize,
        context_length: usize,
        limits: &Limits,
    ) -> Result<()> {
        if self.prompt_ids.is_empty() {
            return Err(EngineError::InvalidInput(
                "input: the prompt is empty (it must have at least 1 token)".into(),
            ));
        }
        if let Some((i, id)) = self
            .prompt_ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= vocab_size)
        {
            return Err(EngineError::InvalidInput(format!(
                "tokens.ids[{i}]: token id {id} is outside the vocabulary (ids must be below {vocab_size})"
            )));
        }
        if self.prompt_ids.len() >= context_length {
            return Err(EngineError::InvalidInput(format!(
                "input: the prompt has {} tokens, but the context length is {context_length} (the prompt must be shorter to leave room for output)",
                self.prompt_ids.len()
            )));
        }
        if self.max_new_tokens == 0 || self.max_new_tokens > limits.max_new_tokens {
            return Err(EngineError::InvalidInput(format!(
                "stopping.max_new_tokens must be between 1 and {}, got {}",
                limits.max_new_tokens, self.max_new_tokens
            )));
        }
        if self.stop.len() > limits.max_stop_sequences {
            return Err(EngineError::InvalidInput(format!(
                "stopping.stop has {} strings; at most {} are allowed",
                self.stop.len(),
                limits.max_stop_sequences
            )));
        }
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(EngineError::InvalidInput(format!(
                "stopping.stop_token_ids has {} ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
                self.stop_token_ids.len()
            )));
        }
        if let Some((i, id)) = self
            .stop_token_ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= vocab_size)
        {
            return Err(EngineError::InvalidInput(format!(
                "stopping.stop_token_ids[{i}]: token id {id} is outside the vocabulary (ids must be below {vocab_size})"
            )));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(EngineError::InvalidInput(format!(
                "stopping.min_new_tokens must be at most max_new_tokens ({}), got {}",
                self.max_new_tokens, self.min_new_tokens
            )));
        }
        let max_top = crate::logprobs::MAX_TOP_LOGPROBS;
        if self.top_logprobs > max_top {
            return Err(EngineError::InvalidInput(format!(
                "sampling.top_logprobs must be at most {max_top}, got {}",
                self.top_logprobs
            )));
        }
        if let Some(top) = self.prompt_logprobs {
            if top > max_top {
                return Err(EngineError::InvalidInput(format!(
                    "sampling.prompt_logprobs must be at most {max_top}, got {top}"
                )));
            }
            let max = crate::logprobs::MAX_PROMPT_LOGPROB_ENTRIES;
            let positions = self.prompt_ids.len() - 1;
            let entries = positions.saturating_mul(top + 1);
            if entries > max {
                return Err(EngineError::InvalidInput(format!(
                    "sampling.prompt_logprobs: {positions} prompt positions × (1 + {top} alternatives) = {entries} entries, the limit is {max} (ask fewer alternatives or send a shorter prompt)"
                )));
            }
        }
        if let Some(c) = &self.constraint {
            let field = c.field();
            let max = crate::constraint::MAX_CONSTRAINT_BYTES;
            let len = match c {
                crate::constraint::ConstraintSpec::Regex(t)
                | crate::constraint::ConstraintSpec::JsonSchema(t) => t.len(),
                crate::constraint::ConstraintSpec::JsonObject => 0,
            };
            if len > max {
                return Err(EngineError::InvalidInput(format!(
                    "{field}: {len} bytes, the limit is {max}"
                )));
            }
            // The grammar ends the output with EOS; these would hold it off or run past it.
            if self.ignore_eos {
                return Err(EngineError::InvalidInput(format!(
                    "stopping.ignore_eos: cannot be combined with {field} (a complete output ends with EOS)"
                )));
            }
            if self.min_new_tokens > 0 {
                return Err(EngineError::InvalidInput(format!(
                    "stopping.min_new_tokens: cannot be combined with {field} (the grammar decides where the output ends)"
                )));
            }
        }
        self.sampling.validate(vocab_size)
    }
}

/// Most ids in `stopping.stop_token_ids`.
pub const MAX_STOP_TOKEN_IDS: usize = 64;

/// One generated token as it is streamed.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenChunk {
    pub token_id: u32,
    pub logprob: f32,
    /// Text completed by this token (may be empty while a character is incomplete or a stop
    /// string might be starting).
    pub text: String,
}

/// The whole result.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    pub token_ids: Vec<u32>,
    /// Each prompt token's logprob after the first, when the request asked
    /// ([`GenerationRequest::prompt_logprobs`]); else empty.
    pub prompt_logprobs: Vec<crate::logprobs::PromptLogprob>,
    pub logprobs: Vec<f32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub time_to_first_token: Duration,
    pub total_time: Duration,
}

/// The whole model in this process.
pub struct InProcessEngine {
    pub model: DeepSeekModel,
    pub experts: ExpertShard,
    pub tokenizer: Option<TextTokenizer>,
    pub name: String,
    pub limits: Limits,
}

impl InProcessEngine {
    pub fn load(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        let (model, experts) = files.load_all(device, dtype)?;
        Ok(InProcessEngine {
            model,
            experts,
            tokenizer: files.tokenizer.clone(),
            name: files.name.clone(),
            limits: Limits::default(),
        })
    }

    /// Generates for one request, calling `on_token` for every token; `on_token` returning
    /// false cancels the generation. Runs the serving core ([`LocalServer`]) with one sequence.
    pub fn generate(
        &self,
        req: &GenerationRequest,
        on_token: &mut dyn FnMut(&TokenChunk) -> bool,
    ) -> Result<GenerationOutput> {
        let tokens = req.prompt_ids.len() + req.max_new_tokens;
        let mut server = LocalServer::new(
            &self.model,
            &self.experts,
            self.tokenizer.as_ref(),
            1,
            tokens,
        )?;
        server.limits = self.limits;
        let mut outs = server.run(vec![req.clone()], &mut |_, chunk| on_token(chunk))?;
        outs.pop()
            .ok_or_else(|| EngineError::Internal("no output for the request".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logprobs::MAX_PROMPT_LOGPROB_ENTRIES;

    #[test]
    fn prompt_logprobs_are_bounded_by_alternatives_and_by_entries() {
        let req = |len: usize, top| GenerationRequest {
            prompt_ids: vec![1; len],
            max_new_tokens: 1,
            prompt_logprobs: Some(top),
            ..Default::default()
        };
        let check = |r: GenerationRequest| r.validate(1000, 1 << 20, &Limits::default());
        assert!(
            check(req(1, 0)).is_ok(),
            "a 1-token prompt has nothing to report"
        );
        assert!(check(req(4096, 20)).is_ok());
        let err = check(req(4, 21)).expect_err("21 alternatives").to_string();
        assert!(
            err.contains("sampling.prompt_logprobs must be at most 20"),
            "{err}"
        );
        // Exactly at the limit, then one position over.
        let at = MAX_PROMPT_LOGPROB_ENTRIES / 4 + 1;
        assert!(check(req(at, 3)).is_ok());
        let err = check(req(at + 1, 3)).expect_err("over").to_string();
        assert!(
            err.contains("sampling.prompt_logprobs: 32769 prompt positions")
                && err.contains("131072"),
            "{err}"
        );
    }
}
