//! moemesh's model engine: DeepSeek-V2/V3 math with no knowledge of the wire.
//!
//! Config ([`config`]) and the model directory ([`model_dir`]; the embedded default in
//! [`embedded`], benchmark models with random weights in [`synthetic`]), weights ([`weights`]:
//! safetensors, FP8 dequantisation, in-memory), the layers ([`layers`]: RMSNorm, YaRN rotary, MLA,
//! SwiGLU), the MoE router ([`router`]), routed experts behind the [`experts::Experts`] trait, KV
//! memory ([`kv_blocks`] the paged layout, [`kv_cache`] one sequence's latent cache, [`kv_pool`]
//! the shared pool), the model ([`model`]), sampling ([`sampling`]), text ([`text`]: tokenizer,
//! chat template, incremental detokenisation), stop strings ([`stop`]), the serving core shared
//! by the mesh and in-process serving ([`serving`]: scheduler, batch, step runner, sequence
//! decoder), in-process generation ([`generate`]), routing near-ties for reduced-precision checks ([`near_ties`]), the KL/top-1 criterion for them
//! against HF at the same precision ([`divergence`]), the CUDA
//! kernels ([`cuda`]) and the error type ([`error`]).
//!
//! Services build on these types; nothing here depends on gRPC, tokio or etcd, and the device
//! (the CPU, or a CUDA GPU in a build with the `cuda` feature) is a parameter of loading, never a
//! global.

pub mod config;
pub mod constraint;
pub mod cuda;
pub mod divergence;
pub mod embedded;
pub mod error;
pub mod experts;
pub mod generate;
pub mod graphs;
pub mod host_tier;
pub mod kv_blocks;
pub mod kv_cache;
pub mod kv_pool;
pub mod layers;
pub mod logprobs;
pub mod model;
pub mod model_dir;
pub mod near_ties;
pub mod prefix_cache;
pub mod router;
pub mod sampling;
pub mod serving;
pub mod stop;
pub mod synthetic;
pub mod text;
pub mod weights;

pub use candle_core::{DType, Device, Tensor};
pub use config::{Arch, ModelConfig};
pub use error::{EngineError, ErrorKind, Result};
pub use experts::{ExpertShard, Experts, PendingExperts, RoutedOut, ShardSpec};
pub use generate::{FinishReason, GenerationOutput, GenerationRequest, InProcessEngine, Limits};
pub use kv_cache::SequenceCache;
pub use kv_pool::KvPool;
pub use model::{DeepSeekModel, Parts, StepSeq};
pub use model_dir::ModelFiles;
pub use router::Routing;
pub use sampling::{GREEDY_BELOW, Sampler, SamplerStart, SamplingParams};
pub use weights::ExpertsDtype;
