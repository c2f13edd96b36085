//! Constrained decoding: a request's output must match a regex or a JSON schema. Each step, the
//! sequence's grammar state (llguidance's Earley parser over the tokenizer's token trie) gives
//! the ids allowed next as a bit mask; the step runner sets every other id's logit to -inf
//! before the one token picker, so greedy, sampling, penalties and the device sampler all pick
//! within the grammar. The picked token then advances the state.
//!
//! Who calls it: [`SequenceDecoder`](crate::serving::SequenceDecoder) holds a sequence's
//! [`Constraint`] (built when the request is validated, so a bad regex or schema is refused
//! before anything runs; it moves with the sequence on a failover) and advances it with every
//! token; [`Batch`](crate::serving::Batch) puts its mask on each sampling slot. The token trie
//! and llguidance's parser factory are built once per tokenizer ([`Grammars`], held by the
//! [`TextTokenizer`]).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};

use crate::error::{EngineError, Result};
use crate::text::TextTokenizer;

/// What a request's output must follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConstraintSpec {
    /// A regular expression (Rust `regex` syntax) the whole output matches.
    Regex(String),
    /// The text of a JSON schema the output is an instance of (compact JSON).
    JsonSchema(String),
    /// Any JSON object (OpenAI's `{"type": "json_object"}`).
    JsonObject,
}

impl ConstraintSpec {
    /// The request field it came from, for messages.
    pub fn field(&self) -> &'static str {
        match self {
            ConstraintSpec::Regex(_) => "sampling.constraint.regex",
            ConstraintSpec::JsonSchema(_) => "sampling.constraint.json_schema",
            ConstraintSpec::JsonObject => "sampling.constraint.json_object",
        }
    }
}

/// Longest regex or schema text accepted (a grammar is compiled per request).
pub const MAX_CONSTRAINT_BYTES: usize = 64 * 1024;

/// The token trie and parser factory of one tokenizer: built once (a few hundred ms for a
/// 129k vocabulary), shared by every request's [`Constraint`].
pub struct Grammars {
    factory: ParserFactory,
    /// The tokenizer's end-of-sequence id in the trie (the grammar allows it once complete).
    trie_eos: u32,
}

impl Grammars {
    /// The grammars over `tok`'s vocabulary.
    pub fn new(tok: &TextTokenizer) -> Result<Self> {
        let invalid = |e: String| EngineError::Tokenizer(format!("constrained decoding: {e}"));
        let words = tok.token_bytes().map_err(invalid)?;
        let trie_eos = tok
            .eos_token()
            .and_then(|e| tok.token_to_id(e))
            .ok_or_else(|| invalid("the tokenizer has no end-of-sequence token".into()))?;
        let info = TokRxInfo::new(words.len() as u32, trie_eos);
        let env = ApproximateTokEnv::new(TokTrie::from(&info, &words));
        let env: llguidance::toktrie::TokEnv = Arc::new(env);
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| invalid(e.to_string()))?;
        // Nothing on stderr: a refused grammar is the request's error, not the server's log.
        factory.quiet();
        Ok(Grammars { factory, trie_eos })
    }

    /// A fresh state for `spec`; INVALID_ARGUMENT naming the field for a regex or schema that
    /// does not compile.
    pub fn constraint(&self, spec: &ConstraintSpec, eos: &[u32]) -> Result<Constraint> {
        let field = spec.field();
        let bad = |e: String| EngineError::InvalidInput(format!("{field}: {e}"));
        let grammar = match spec {
            ConstraintSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            ConstraintSpec::JsonSchema(text) => {
                let schema: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
                let serde_json::Value::Object(schema) = schema else {
                    return Err(bad("a JSON schema is a JSON object".into()));
                };
                TopLevelGrammar::from_json_schema(compact(schema))
            }
            ConstraintSpec::JsonObject => {
                let any = serde_json::json!({"type": "object"});
                TopLevelGrammar::from_json_schema(compact(
                    any.as_object().cloned().unwrap_or_default(),
                ))
            }
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| bad(format!("the grammar does not compile: {e}")))?;
        let mut c = Constraint {
            matcher: Matcher::new(Ok(parser)),
            trie_eos: self.trie_eos,
            eos: eos.into(),
            mask: Arc::from(Vec::new()),
        };
        c.mask = c.next_mask().map_err(|e| bad(e.to_string()))?;
        Ok(c)
    }
}

/// One sequence's grammar state and the ids it allows next.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// The trie's end-of-sequence id, and the sequence's own (the model config's too).
    trie_eos: u32,
    eos: Arc<[u32]>,
    /// Bit `i` of word `i / 32` is set when id `i` may come next.
    mask: Arc<[u32]>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("allowed", &self.allowed_count())
            .finish()
    }
}

impl Constraint {
    /// The ids allowed next, as a bit mask (bit `i % 32` of word `i / 32` for id `i`).
    pub fn mask(&self) -> Arc<[u32]> {
        self.mask.clone()
    }

    /// How many ids the mask allows.
    pub fn allowed_count(&self) -> usize {
        self.mask.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the grammar is complete: its mask allows only an end of sequence.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Takes the picked `token` and computes the next mask. An end-of-sequence id ends the
    /// grammar's work. A token the mask did not allow is an internal error (the picker never
    /// picks a masked id).
    pub fn advance(&mut self, token: u32) -> Result<()> {
        if self.eos.contains(&token) {
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| {
            EngineError::Internal(format!("token {token} does not follow the constraint: {e}"))
        })?;
        self.mask = self.next_mask()?;
        Ok(())
    }

    fn next_mask(&mut self) -> Result<Arc<[u32]>> {
        let vob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| EngineError::Internal(format!("constraint: {e}")))?;
        let mut words = vob.as_slice().to_vec();
        // The trie knows one end-of-sequence id; the sequence ends on any of its own.
        if vob.is_allowed(self.trie_eos) {
            for &id in self.eos.iter() {
                let w = id as usize / 32;
                if w >= words.len() {
                    words.resize(w + 1, 0);
                }
                words[w] |= 1 << (id % 32);
            }
        }
        if words.iter().all(|&w| w == 0) {
            return Err(EngineError::Internal(
                "the constraint allows no token here".into(),
            ));
        }
        Ok(Arc::from(words))
    }
}

/// `schema` producing compact JSON (no whitespace between tokens, as vLLM's
/// `disable_any_whitespace`): with whitespace allowed anywhere, a weak model can emit it for
/// ever. A schema's own `x-guidance` options win.
fn compact(mut schema: serde_json::Map<String, serde_json::Value>) -> serde_json::Value {
    schema
        .entry("x-guidance")
        .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    serde_json::Value::Object(schema)
}

/// Whether `mask` allows id `id` (ids past the mask are not allowed).
pub fn allows(mask: &[u32], id: u32) -> bool {
    mask.get(id as usize / 32)
        .is_some_and(|w| w & (1 << (id % 32)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grammars() -> (TextTokenizer, Arc<Grammars>, Vec<u32>) {
        let tok = TextTokenizer::embedded_deepseek_r1().expect("embedded tokenizer");
        let g = tok.grammars().expect("grammars");
        let eos = vec![
            tok.token_to_id(tok.eos_token().expect("eos"))
                .expect("eos id"),
        ];
        (tok, g, eos)
    }

    /// Feeds `text`'s tokens (as the tokenizer splits it) through the constraint.
    fn feed(tok: &TextTokenizer, c: &mut Constraint, text: &str) -> Result<()> {
        for id in tok.encode(text, false)? {
            if !allows(&c.mask(), id) {
                return Err(EngineError::Internal(format!("{id} is not allowed")));
            }
            c.advance(id)?;
        }
        Ok(())
    }

    #[test]
    fn a_regex_allows_its_matches_and_then_only_the_end() {
        let (tok, g, eos) = grammars();
        let spec = ConstraintSpec::Regex("(yes|no), [0-9]{2}".into());
        let mut c = g.constraint(&spec, &eos).expect("compiles");
        assert!(!allows(&c.mask(), eos[0]), "nothing is complete yet");
        feed(&tok, &mut c, "yes, 42").expect("a match");
        assert!(c.is_complete());
        assert_eq!(c.allowed_count(), 1);
        assert!(allows(&c.mask(), eos[0]));
        // A text that leaves the regex is refused at its first wrong token.
        let mut c = g.constraint(&spec, &eos).expect("compiles");
        assert!(feed(&tok, &mut c, "maybe").is_err());
    }

    #[test]
    fn a_json_schema_allows_only_instances_and_bad_ones_name_the_field() {
        let (tok, g, eos) = grammars();
        let schema = r#"{"type":"object","properties":{"ok":{"type":"boolean"}},"required":["ok"],"additionalProperties":false}"#;
        let spec = ConstraintSpec::JsonSchema(schema.into());
        let mut c = g.constraint(&spec, &eos).expect("compiles");
        feed(&tok, &mut c, r#"{"ok":true}"#).expect("an instance");
        assert!(c.is_complete());
        let mut c = g.constraint(&spec, &eos).expect("compiles");
        assert!(feed(&tok, &mut c, r#"{"no": 1}"#).is_err());
        // Any JSON object, compact.
        let mut c = g
            .constraint(&ConstraintSpec::JsonObject, &eos)
            .expect("compiles");
        assert!(
            feed(&tok, &mut c, "[1]").is_err(),
            "an array is not an object"
        );
        let mut c = g
            .constraint(&ConstraintSpec::JsonObject, &eos)
            .expect("compiles");
        feed(&tok, &mut c, r#"{"a":[1,{"b":null}]}"#).expect("an object");
        assert!(allows(&c.mask(), eos[0]));
        for (bad, field) in [
            (
                ConstraintSpec::JsonSchema("{not json".into()),
                "sampling.constraint.json_schema",
            ),
            (
                ConstraintSpec::JsonSchema("[1]".into()),
                "sampling.constraint.json_schema",
            ),
            (
                ConstraintSpec::Regex("(unclosed".into()),
                "sampling.constraint.regex",
            ),
        ] {
            let err = g.constraint(&bad, &eos).expect_err("refused").to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
