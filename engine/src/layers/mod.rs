//! The building blocks of a DeepSeek decoder layer, bottom-up: linear projections, RMSNorm, the
//! rotary embedding, the SwiGLU MLP (dense layers, shared experts, routed experts alike) and MLA
//! attention. Each block is built from checkpoint names with `new(cfg, loader, prefix)` and runs
//! with `&self`; per-step state (positions, KV) is passed in, never stored in the block.

pub mod linear;
pub mod mla;
pub mod mlp;
pub mod norm;
pub mod rotary;
pub mod tiled_attention;

pub use linear::Linear;
pub use mla::Attention;
pub use mlp::Mlp;
pub use norm::RmsNorm;
pub use rotary::Rotary;
