//! Incremental detokenisation for streaming: turns generated ids into text one id at a time
//! without ever emitting half a UTF-8 character. The generator and the frontend's streaming path
//! keep one [`IncrementalDecoder`] per sequence.
//!
//! Decoding each id on its own is wrong twice over: a byte-level BPE token can end in the middle
//! of a multi-byte character (DeepSeek splits most emoji and many CJK characters across tokens),
//! and some decoders render a token differently depending on what precedes it. So, as TGI and
//! vLLM do, we keep two offsets into the ids: `prefix_offset` starts a short window of context
//! and `read_offset` marks what has been emitted. Each step decodes the window up to
//! `read_offset` and up to the end, and emits the difference — unless the text ends in U+FFFD,
//! which means the last character is still incomplete and the next id may complete it.

use super::tokenizer::TextTokenizer;
use crate::error::Result;

const REPLACEMENT: char = '\u{FFFD}';

pub struct IncrementalDecoder {
    tokenizer: TextTokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the decoding window; always a point where the text decoded cleanly, so the
    /// window never starts inside a character.
    prefix_offset: usize,
    /// End of the text already emitted.
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

    /// Every id pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Adds one generated id; returns the text it completes (empty while a character is
    /// incomplete, or when the id decodes to nothing, e.g. a skipped special token).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let (prefix, full) = self.window()?;
        // Byte lengths are fine for "has grown": the window's text only grows as ids are added.
        if full.len() <= prefix.len() || full.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        let new = suffix_after(&full, &prefix);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(new)
    }

    /// At the end of generation: whatever is still held back. It contains U+FFFD if the model
    /// stopped in the middle of a character, because that is the honest rendering of those bytes.
    pub fn finish(&mut self) -> Result<String> {
        let (prefix, full) = self.window()?;
        let rest = suffix_after(&full, &prefix);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(rest)
    }

    /// The window's text up to what was emitted, and up to now.
    fn window(&self) -> Result<(String, String)> {
        let prefix = self.tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        Ok((prefix, full))
    }
}

/// The part of `full` after `prefix`. Normally `full` extends `prefix`; if a decoder ever
/// rewrites earlier text, fall back to skipping as many characters as the prefix has (what the
/// Python implementations do) rather than slicing at a byte offset that may split a character.
fn suffix_after(full: &str, prefix: &str) -> String {
    match full.strip_prefix(prefix) {
        Some(rest) => rest.to_string(),
        None => full.chars().skip(prefix.chars().count()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r1() -> TextTokenizer {
        TextTokenizer::embedded_deepseek_r1().expect("embedded tokenizer loads")
    }

    fn stream(dec: &mut IncrementalDecoder, ids: &[u32]) -> Vec<String> {
        let mut pieces: Vec<String> = ids.iter().map(|&id| dec.push(id).expect("push")).collect();
        pieces.push(dec.finish().expect("finish"));
        pieces
    }

    #[test]
    fn a_split_emoji_is_held_back_until_complete() {
        let t = r1();
        let ids = t.encode("a🚀b", false).expect("encode");
        let mut dec = IncrementalDecoder::new(t.clone(), false);
        let pieces = stream(&mut dec, &ids);
        assert!(pieces.iter().any(String::is_empty), "{pieces:?}");
        assert!(
            pieces.iter().all(|p| !p.contains(REPLACEMENT)),
            "{pieces:?}"
        );
        assert_eq!(pieces.concat(), "a🚀b");
        assert_eq!(dec.ids(), ids.as_slice());
    }

    #[test]
    fn stopping_mid_character_flushes_a_replacement_character() {
        let t = r1();
        let ids = t.encode("🚀", false).expect("encode");
        assert!(ids.len() > 1, "the rocket spans several tokens: {ids:?}");
        let mut dec = IncrementalDecoder::new(t, false);
        assert_eq!(dec.push(ids[0]).expect("push"), "");
        assert_eq!(dec.finish().expect("finish"), "\u{FFFD}");
        assert_eq!(dec.finish().expect("finish again"), "");
    }

    #[test]
    fn skipped_special_tokens_emit_nothing_and_do_not_disturb_the_text() {
        let t = r1();
        let mut ids = t
            .encode("<think>\nhi\n</think>\n\n", false)
            .expect("encode");
        ids.extend(t.encode("done 毕老师", false).expect("encode"));
        ids.push(t.token_to_id("<｜end▁of▁sentence｜>").expect("eos id"));
        let mut dec = IncrementalDecoder::new(t.clone(), true);
        let streamed = stream(&mut dec, &ids).concat();
        assert_eq!(streamed, t.decode(&ids, true).expect("decode"));
        assert!(!streamed.contains("end▁of▁sentence"), "{streamed:?}");
    }

    #[test]
    fn suffix_after_never_splits_a_character() {
        assert_eq!(suffix_after("héllo", "hé"), "llo");
        assert_eq!(suffix_after("Xéllo", "hé"), "llo");
        assert_eq!(suffix_after("é", "abc"), "");
    }
}
