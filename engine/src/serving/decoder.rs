//! What a sequence's tokens mean to its client: incremental text, stop strings, and the finish
//! rule (EOS, stop string, `max_new_tokens`, context length). The one place both the frontend
//! (mesh) and in-process generation decide that a sequence is done.

use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::generate::{FinishReason, GenerationRequest};
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
    max_new_tokens: usize,
    context_length: usize,
    prompt_len: usize,
    generated: usize,
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
        Ok(SequenceDecoder {
            decoder: tokenizer.map(|t| IncrementalDecoder::new(t.clone(), true)),
            stops: StopMatcher::new(&req.stop),
            eos,
            ignore_eos: req.ignore_eos,
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

    /// Takes the next generated token.
    pub fn push(&mut self, token: u32) -> Result<Emitted> {
        self.generated += 1;
        let is_eos = !self.ignore_eos && self.eos.contains(&token);
        let (mut text, stopped) = if is_eos {
            (String::new(), false)
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
}
