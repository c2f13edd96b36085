//! moemesh's model engine: DeepSeek-V2/V3 math with no knowledge of the wire.
//!
//! Config ([`config`]), weights ([`weights`]: safetensors, FP8 dequantisation, in-memory), the
//! layers ([`layers`]: RMSNorm, YaRN rotary, MLA, SwiGLU), the MoE router ([`router`]), routed
//! experts behind the [`experts::Experts`] trait, the latent KV cache ([`kv_cache`]), the model
//! ([`model`]), sampling ([`sampling`]), text ([`text`]: tokenizer, chat template, incremental
//! detokenisation), stop strings ([`stop`]) and in-process generation ([`generate`]).
//!
//! Services build on these types; nothing here depends on gRPC, tokio or etcd, and the device
//! (CPU now, CUDA later) is a parameter of loading, never a global.

pub mod config;
pub mod cuda;
pub mod embedded;
pub mod error;
pub mod experts;
pub mod generate;
pub mod kv_blocks;
pub mod kv_cache;
pub mod kv_pool;
pub mod layers;
pub mod model;
pub mod model_dir;
pub mod near_ties;
pub mod router;
pub mod sampling;
pub mod stop;
pub mod synthetic;
pub mod text;
pub mod weights;

pub use candle_core::{DType, Device, Tensor};
pub use config::{Arch, ModelConfig};
pub use error::{EngineError, ErrorKind, Result};
pub use experts::{ExpertShard, Experts, PendingExperts, ShardSpec};
pub use generate::{FinishReason, GenerationOutput, GenerationRequest, InProcessEngine, Limits};
pub use kv_cache::SequenceCache;
pub use kv_pool::KvPool;
pub use model::{DeepSeekModel, Parts, StepSeq};
pub use model_dir::ModelFiles;
pub use router::Routing;
pub use sampling::{GREEDY_BELOW, Sampler, SamplingParams};
