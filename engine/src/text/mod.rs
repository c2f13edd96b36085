//! Text in and out of token space: the model's tokenizer ([`TextTokenizer`], `tokenizer.json`
//! through the `tokenizers` crate), its chat template ([`ChatTemplate`], from
//! `tokenizer_config.json`, rendered the way transformers renders it) and incremental
//! detokenisation for streaming ([`IncrementalDecoder`]). The in-process generator and the
//! frontend use these; nothing here touches the model.

pub mod chat_template;
pub mod detokenizer;
pub mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use detokenizer::IncrementalDecoder;
pub use tokenizer::TextTokenizer;
