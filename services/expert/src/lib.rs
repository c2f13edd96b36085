//! The expert worker: loads the routed experts it is told to serve onto one device, registers
//! itself once it serves, answers `Expert.Forward` (one request per MoE layer call, each token
//! once with its (expert, weight) pairs, answered with the weighted partial sums), and on
//! shutdown marks itself NOT_SERVING, leaves the registry, drains in-flight calls and exits.

mod config;
mod service;

pub use config::{ExpertConfig, parse_range};
pub use service::run;
