//! Incremental detokenisation for streaming: turning ids into text one at a time without ever
//! emitting half a UTF-8 character.
//!
//! A byte-level BPE token can end in the middle of a multi-byte character, and decoding a token
//! alone can differ from decoding it in context. So, as TGI and vLLM do, we decode a short window
//! of recent ids twice — up to the last emitted point, and up to now — and emit the difference,
//! holding back while the text ends in U+FFFD (an incomplete character).

use super::tokenizer::TextTokenizer;
use crate::error::Result;

pub struct IncrementalDecoder {
    tokenizer: TextTokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the decoding window (the context for the next piece).
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: TextTokenizer, skip_special_tokens: bool) -> Self {
        IncrementalDecoder {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Adds one id; returns the text it completes (often empty mid-character).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let (prefix, full) = self.window()?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && let Some(new) = full.get(prefix.len()..)
            && full.starts_with(&prefix)
        {
            let new = new.to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(new);
        }
        Ok(String::new())
    }

    /// Whatever is still held back at the end (may contain U+FFFD if generation stopped
    /// mid-character).
    pub fn finish(&mut self) -> Result<String> {
        let (prefix, full) = self.window()?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(match full.get(prefix.len()..) {
            Some(rest) if full.starts_with(&prefix) => rest.to_string(),
            _ => full,
        })
    }

    fn window(&self) -> Result<(String, String)> {
        let t = &self.tokenizer;
        let prefix = t.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = t.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        Ok((prefix, full))
    }
}
