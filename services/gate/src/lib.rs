//! The gate: holds the model's dense weights and every sequence's latent KV cache, runs steps
//! that frontends send (attention, router, shared experts, lm_head, sampling), and sends routed
//! experts' work to expert workers found through the registry, retrying a failed call on another
//! replica (expert calls are pure, so a retry is always safe).

mod config;
mod expert_load;
mod remote_experts;
mod service;
mod step_engine;
mod workers;

pub use config::GateConfig;
pub use service::run;
