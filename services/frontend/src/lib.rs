//! The frontend: the public `moemesh.v1.Generation` API. It validates and tokenizes requests,
//! looks up embeddings (memory-mapped, CPU), runs the per-gate step loop that batches every
//! running sequence into one `Gate.Step` per iteration, turns sampled ids back into text
//! incrementally, applies stop strings and limits, and frees a sequence's KV on the gate when it
//! finishes or its client goes away.

mod abort;
mod audit;
mod auth;
mod config;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
mod gate_link;
mod metered;
mod openai;
mod request;
mod service;

pub use config::FrontendConfig;
pub use service::run;
