//! What a sequence's tokens mean to its client: incremental text, stop strings, and the finish
//! rule (EOS, stop id, stop string, `max_new_tokens`, context length; `min_new_tokens` holds
//! off EOS and stop ids, in the sampler and here). The one place both the frontend
//! (mesh) and in-process generation decide that a sequence is done.

use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::generate::{FinishReason, GenerationRequest};
use crate::sampling::SamplerStart;
use crate::stop::StopMatcher;
use crate::text::{IncrementalDecoder, TextTokenizer};

/// End-of-sequence ids: the config's, plus the tokenizer's EOS token.
pub fn eos_ids(cfg: &ModelConfig, tokenizer: Option<&TextTokenizer>) -> Vec<u32> {
    let mut eos = cfg.eos_token_ids.clone();
    if let Some(id) = tokenizer.and_then(|t| t.eos_token().and_then(|e| t.token_to_id(e)))
        && !eos.contains(&id)
    {
        eos.push(id);
    }
    eos
}

/// What one token adds for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// Text completed by this token (may be empty while a character is incomplete or a stop
    /// string might be starting; includes the held-back rest when the sequence finishes).
    pub text: String,
    /// Set when this token ends the sequence.
    pub finish: Option<FinishReason>,
}

/// One sequence's text state and finish rule. Moves with the sequence when it fails over to
/// another gate, so its text continues where it was.
pub struct SequenceDecoder {
    decoder: Option<IncrementalDecoder>,
    stops: StopMatcher,
    eos: Arc<[u32]>,
    ignore_eos: bool,
    /// Ids that end the sequence as EOS does, with finish reason stop.
    stop_ids: Arc<[u32]>,
    /// EOS and stop ids end nothing before this many tokens (the sampler suppresses them too).
    min_new_tokens: usize,
    max_new_tokens: usize,
    context_length: usize,
    prompt_len: usize,
    generated: usize,
    /// The request's grammar state, when its output is constrained.
    constraint: Option<crate::constraint::Constraint>,
}

impl SequenceDecoder {
    /// Refuses stop strings without a tokenizer (the message names the field).
    pub fn new(
        req: &GenerationRequest,
        tokenizer: Option<&TextTokenizer>,
        eos: Arc<[u32]>,
        context_length: usize,
    ) -> Result<Self> {
        if tokenizer.is_none() && req.stop.iter().any(|s| !s.is_empty()) {
            return Err(EngineError::InvalidInput(
                "stopping.stop: stop strings need a tokenizer, and this model directory has no tokenizer.json".into(),
            ));
        }
        let constraint = match (&req.constraint, tokenizer) {
            (None, _) => None,
            (Some(c), None) => {
                return Err(EngineError::InvalidInput(format!(
                    "{}: constrained output needs a tokenizer, and this model directory has no tokenizer.json",
                    c.field()
                )));
            }
            (Some(c), Some(t)) => Some(t.grammars()?.constraint(c, &eos)?),
        };
        Ok(SequenceDecoder {
            constraint,
            decoder: tokenizer.map(|t| IncrementalDecoder::new(t.clone(), true)),
            stops: StopMatcher::new(&req.stop),
            eos,
            ignore_eos: req.ignore_eos,
            stop_ids: Arc::from(req.stop_token_ids.as_slice()),
            min_new_tokens: req.min_new_tokens,
            max_new_tokens: req.max_new_tokens,
            context_length,
            prompt_len: req.prompt_ids.len(),
            generated: 0,
        })
    }

    /// Tokens pushed so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// How a runner starts this sequence's sampler, `generated` tokens in (non-empty after a
    /// failover): the request's parameters, its random stream's position, and the history its
    /// penalties and `min_new_tokens` read (copied only when they read it).
    pub fn sampler_start(&self, req: &GenerationRequest, generated: &[u32]) -> SamplerStart {
        let p = req.sampling;
        let suppressing = self.min_new_tokens > generated.len();
        let suppressed: Vec<u32> = if suppressing {
            let eos = if self.ignore_eos {
                &[][..]
            } else {
                &self.eos[..]
            };
            eos.iter().chain(self.stop_ids.iter()).copied().collect()
        } else {
            Vec::new()
        };
        SamplerStart {
            params: p,
            drawn: generated.len() as u32,
            prompt: if p.repetition_penalty != 1.0 {
                Arc::from(req.prompt_ids.as_slice())
            } else {
                Arc::from(Vec::new())
            },
            generated: if p.has_penalties() || suppressing {
                Arc::from(generated)
            } else {
                Arc::from(Vec::new())
            },
            min_new_tokens: if suppressing { self.min_new_tokens } else { 0 },
            suppressed: Arc::from(suppressed),
            top_logprobs: req.top_logprobs,
        }
    }

    /// The ids the sequence's constraint allows next (a bit mask, see
    /// [`crate::constraint::Constraint::mask`]); `None` when its output is free.
    pub fn allowed(&self) -> Option<Arc<[u32]>> {
        self.constraint.as_ref().map(|c| c.mask())
    }

    /// Takes the next generated token.
    pub fn push(&mut self, token: u32) -> Result<Emitted> {
        if let Some(c) = self.constraint.as_mut() {
            c.advance(token)?;
        }
        self.generated += 1;
        let allowed = self.generated > self.min_new_tokens;
        let is_eos = allowed && !self.ignore_eos && self.eos.contains(&token);
        let is_stop_id = allowed && !is_eos && self.stop_ids.contains(&token);
        let (mut text, stopped) = if is_eos || is_stop_id {
            (String::new(), is_stop_id)
        } else {
            self.text(token)?
        };
        let finish = if stopped {
            Some(FinishReason::Stop)
        } else if is_eos {
            Some(FinishReason::Eos)
        } else if self.generated >= self.max_new_tokens
            || self.prompt_len + self.generated >= self.context_length
        {
            Some(FinishReason::Length)
        } else {
            None
        };
        if finish.is_some() && !stopped {
            text.push_str(&self.flush()?);
        }
        Ok(Emitted { text, finish })
    }

    /// Text for a token, and whether a stop string completed.
    fn text(&mut self, token: u32) -> Result<(String, bool)> {
        let Some(dec) = self.decoder.as_mut() else {
            return Ok((String::new(), false));
        };
        let piece = dec.push(token)?;
        let o = self.stops.push(&piece);
        Ok((o.emit, o.stopped.is_some()))
    }

    /// Held-back text at the end (not called after a stop).
    fn flush(&mut self) -> Result<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;

    fn req(max_new_tokens: usize, ignore_eos: bool) -> GenerationRequest {
        GenerationRequest {
            prompt_ids: vec![5, 6, 7],
            sampling: SamplingParams::default(),
            max_new_tokens,
            stop: Vec::new(),
            ignore_eos,
            ..Default::default()
        }
    }

    #[test]
    fn eos_ends_a_sequence_unless_ignored_and_length_ends_it_at_the_limit() {
        let eos: Arc<[u32]> = Arc::from(vec![2u32]);
        let mut d = SequenceDecoder::new(&req(4, false), None, eos.clone(), 100).expect("new");
        assert_eq!(d.push(9).expect("push").finish, None);
        assert_eq!(d.push(2).expect("push").finish, Some(FinishReason::Eos));
        let mut d = SequenceDecoder::new(&req(2, true), None, eos, 100).expect("new");
        assert_eq!(d.push(2).expect("push").finish, None);
        assert_eq!(d.push(2).expect("push").finish, Some(FinishReason::Length));
        assert_eq!(d.generated(), 2);
    }

    #[test]
    fn the_context_length_ends_a_sequence() {
        // 3 prompt tokens + 2 generated reach a context of 5.
        let mut d = SequenceDecoder::new(&req(100, true), None, Arc::from(vec![]), 5).expect("new");
        assert_eq!(d.push(9).expect("push").finish, None);
        assert_eq!(d.push(9).expect("push").finish, Some(FinishReason::Length));
    }

    #[test]
    fn stop_strings_need_a_tokenizer() {
        let mut r = req(4, false);
        r.stop = vec!["x".into()];
        let e = SequenceDecoder::new(&r, None, Arc::from(vec![]), 100)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("stopping.stop"), "{e}");
    }

    #[test]
    fn stop_ids_end_a_sequence_and_min_new_tokens_holds_off_eos_and_stop_ids() {
        let eos: Arc<[u32]> = Arc::from(vec![2u32]);
        let mut r = req(10, false);
        r.stop_token_ids = vec![4];
        let mut d = SequenceDecoder::new(&r, None, eos.clone(), 100).expect("new");
        assert_eq!(d.push(9).expect("push").finish, None);
        assert_eq!(d.push(4).expect("push").finish, Some(FinishReason::Stop));

        r.min_new_tokens = 2;
        let mut d = SequenceDecoder::new(&r, None, eos, 100).expect("new");
        let start = d.sampler_start(&r, &[]);
        assert_eq!(
            (start.min_new_tokens, &start.suppressed[..]),
            (2, &[2, 4][..])
        );
        assert_eq!(
            d.push(2).expect("push").finish,
            None,
            "EOS as token 1 of at least 2"
        );
        assert_eq!(
            d.push(4).expect("push").finish,
            None,
            "a stop id as token 2 of at least 2"
        );
        // Resumed after two tokens, nothing is suppressed any more.
        assert_eq!(d.sampler_start(&r, &[2, 4]).min_new_tokens, 0);
        assert_eq!(d.push(4).expect("push").finish, Some(FinishReason::Stop));
    }
}
