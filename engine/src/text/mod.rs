//! Text in and out of token space: the model's tokenizer (`tokenizer.json` through the
//! `tokenizers` crate), its chat template (`tokenizer_config.json`, rendered with minijinja the
//! way transformers renders it), and incremental detokenisation for streaming. Used by the
//! in-process generator and by the frontend; nothing here touches the model.

pub mod chat_template;
pub mod detokenizer;
pub mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use detokenizer::IncrementalDecoder;
pub use tokenizer::TextTokenizer;
