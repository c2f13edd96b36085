//! The serving core: what turns requests into steps and steps into tokens, shared by the mesh
//! and by in-process serving. Like the rest of the engine it knows no wire types.
//!
//! - [`Scheduler`]: which tokens of which sequences go into the next step (pure logic).
//! - [`Batch`]: the sequences of one step loop, without I/O: the next step, and what each
//!   outcome (tokens, KV full, step failed, runner lost) does to them.
//! - [`SequenceDecoder`]: a sequence's text, stop strings and finish rule.
//! - [`StepRunner`]: the model side of a step: KV caches, samplers, forward, token pick.
//! - [`LocalServer`]: a `Batch` over a `StepRunner` with local experts, in this process.
//!
//! The frontend drives a `Batch` per gate over gRPC and the gate wraps a `StepRunner` with
//! remote experts; `moemesh generate --model`, `bench --in-process` and `verify` run
//! `LocalServer` or `StepRunner` directly.

mod batch;
mod decoder;
mod local;
mod runner;
mod scheduler;

pub use batch::{Batch, Sequence, Step, Token};
pub use decoder::{Emitted, SequenceDecoder, eos_ids};
pub use local::{AroundStep, LocalServer, OnToken};
pub use runner::{
    PROMPT_LOGPROB_ROWS, PromptAsk, SeqOutput, SlotSpec, StepRunner, blocks_for, blocks_for_bytes,
    pick,
};
pub use scheduler::{
    CPU_STEP_TOKEN_BUDGET, Entry, GPU_STEP_TOKEN_BUDGET, KvState, Limits, Plan, Scheduler, Slot,
};
