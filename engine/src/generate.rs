//! In-process generation: one request through the whole model in this process (what
//! `moemesh generate --model DIR` runs, and the reference the mesh is compared against).
//!
//! The request types and the finish logic here (validation, EOS, stop strings, length limits,
//! incremental text) are the same ones the frontend applies to requests that run through the
//! mesh, so both paths agree token for token.

use std::time::{Duration, Instant};

use candle_core::{DType, Device};

use crate::error::{EngineError, Result};
use crate::experts::ExpertShard;
use crate::kv_cache::SequenceCache;
use crate::model::{DeepSeekModel, StepSeq};
use crate::model_dir::ModelFiles;
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::text::{IncrementalDecoder, TextTokenizer};

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
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
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
        self.sampling.validate(vocab_size)
    }
}

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
    pub logprobs: Vec<f32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub time_to_first_token: Duration,
    pub total_time: Duration,
}

/// Per-sequence text state: incremental detokenisation and stop strings.
pub struct TextTracker {
    decoder: Option<IncrementalDecoder>,
    stops: StopMatcher,
}

impl TextTracker {
    pub fn new(tokenizer: Option<&TextTokenizer>, stop: &[String]) -> Result<Self> {
        if tokenizer.is_none() && stop.iter().any(|s| !s.is_empty()) {
            return Err(EngineError::InvalidInput(
                "stopping.stop: stop strings need a tokenizer, and this model directory has no tokenizer.json".into(),
            ));
        }
        Ok(TextTracker {
            decoder: tokenizer.map(|t| IncrementalDecoder::new(t.clone(), true)),
            stops: StopMatcher::new(stop),
        })
    }

    /// Text to emit for a new token, and whether a stop string completed.
    pub fn push(&mut self, token: u32) -> Result<(String, bool)> {
        let Some(dec) = self.decoder.as_mut() else {
            return Ok((String::new(), false));
        };
        let piece = dec.push(token)?;
        let o = self.stops.push(&piece);
        Ok((o.emit, o.stopped.is_some()))
    }

    /// Held-back text at the end (not called after a stop).
    pub fn finish(&mut self) -> Result<String> {
        let Some(dec) = self.decoder.as_mut() else {
            return Ok(String::new());
        };
        let rest = dec.finish()?;
        let o = self.stops.push(&rest);
        if o.stopped.is_some() {
            return Ok(o.emit);
        }
        Ok(o.emit + &self.stops.finish())
    }
}

/// Decides, after each token, whether the sequence is done.
pub fn finish_check(
    token: u32,
    generated: usize,
    seq_len: usize,
    req: &GenerationRequest,
    eos: &[u32],
    context_length: usize,
    stopped_by_text: bool,
) -> Option<FinishReason> {
    if stopped_by_text {
        Some(FinishReason::Stop)
    } else if !req.ignore_eos && eos.contains(&token) {
        Some(FinishReason::Eos)
    } else if generated >= req.max_new_tokens || seq_len >= context_length {
        Some(FinishReason::Length)
    } else {
        None
    }
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

    /// End-of-sequence ids: the config's, plus the tokenizer's EOS token.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut eos = self.model.config().eos_token_ids.clone();
        if let Some(id) = self
            .tokenizer
            .as_ref()
            .and_then(|t| t.eos_token().and_then(|e| t.token_to_id(e)))
            && !eos.contains(&id)
        {
            eos.push(id);
        }
        eos
    }

    /// Generates for one request, calling `on_token` for every token; `on_token` returning
    /// false cancels the generation.
    pub fn generate(
        &self,
        req: &GenerationRequest,
        on_token: &mut dyn FnMut(&TokenChunk) -> bool,
    ) -> Result<GenerationOutput> {
        let cfg = self.model.config();
        let context = cfg.max_position_embeddings;
        req.validate(cfg.vocab_size, context, &self.limits)?;
        let start = Instant::now();
        let eos = self.eos_ids();
        let mut text = TextTracker::new(self.tokenizer.as_ref(), &req.stop)?;
        let mut sampler = Sampler::new(req.sampling);
        // On a GPU with the fused kernels the decode attention reads a paged pool: give the
        // request one of its own, sized for the prompt and every token it may generate.
        let mut cache = match crate::cuda::gpu(self.model.device()) {
            Some(_) => {
                let tokens = (req.prompt_ids.len() + req.max_new_tokens).min(context);
                let blocks = tokens.div_ceil(crate::kv_cache::BLOCK_TOKENS) + 1;
                let pool =
                    crate::KvPool::new(cfg, blocks, self.model.dtype(), self.model.device())?;
                SequenceCache::paged(cfg, pool)
            }
            None => self.model.new_cache(),
        };
        let mut out = GenerationOutput {
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            text: String::new(),
            finish_reason: FinishReason::Length,
            prompt_tokens: req.prompt_ids.len(),
            time_to_first_token: Duration::ZERO,
            total_time: Duration::ZERO,
        };
        let mut input = req.prompt_ids.clone();
        loop {
            let hidden = self.model.embed(&input)?;
            let mut seqs = [StepSeq {
                cache: &mut cache,
                new_tokens: input.len(),
            }];
            let logits = self
                .model
                .step_last_logits(&hidden, &mut seqs, &self.experts)?;
            // Greedy picks happen on the GPU (a few bytes back instead of the vocabulary).
            let device_pick = match crate::cuda::gpu(logits.device()) {
                Some(g) if sampler.params().is_greedy() => g.argmax_logprob(&logits)?,
                _ => None,
            };
            let s = match device_pick.as_deref() {
                Some(&[(token, logprob)]) => Sampled { token, logprob },
                _ => sampler.sample(&logits.squeeze(0)?.to_vec1::<f32>()?)?,
            };
            if out.token_ids.is_empty() {
                out.time_to_first_token = start.elapsed();
            }
            out.token_ids.push(s.token);
            out.logprobs.push(s.logprob);
            let (piece, stopped) = if eos.contains(&s.token) && !req.ignore_eos {
                (String::new(), false)
            } else {
                text.push(s.token)?
            };
            let finish = finish_check(
                s.token,
                out.token_ids.len(),
                cache.len() + 1,
                req,
                &eos,
                context,
                stopped,
            );
            let mut piece = piece;
            if finish.is_some() && !stopped {
                piece.push_str(&text.finish()?);
            }
            out.text.push_str(&piece);
            let chunk = TokenChunk {
                token_id: s.token,
                logprob: s.logprob,
                text: piece,
            };
            if !on_token(&chunk) {
                out.finish_reason = FinishReason::Cancelled;
                break;
            }
            if let Some(reason) = finish {
                out.finish_reason = reason;
                break;
            }
            input = vec![s.token];
        }
        out.total_time = start.elapsed();
        Ok(out)
    }
}
