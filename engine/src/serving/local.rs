//! The mesh's serving loop in one process: a [`Batch`] planned by the same scheduler the
//! frontend runs, stepped by a [`StepRunner`] over local experts. `moemesh generate --model`,
//! the in-process `bench` and the reference tests run this, so the in-process numbers and
//! tokens are those of the code the mesh runs, less the wire.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{EngineError, Result};
use crate::experts::Experts;
use crate::generate::{FinishReason, GenerationOutput, GenerationRequest, Limits, TokenChunk};
use crate::text::TextTokenizer;

use super::batch::{Batch, Sequence, Step};
use super::decoder::{SequenceDecoder, eos_ids};
use super::runner::{StepRunner, blocks_for};
use super::scheduler::{CPU_STEP_TOKEN_BUDGET, GPU_STEP_TOKEN_BUDGET, Limits as StepLimits};
use crate::model::DeepSeekModel;

/// One request's output as it is collected.
struct Collect {
    index: usize,
    start: Instant,
    out: GenerationOutput,
    cancelled: bool,
}

/// Sees each step before (true) and after (false) it runs.
pub type AroundStep<'a> = dyn FnMut(&Step, bool) -> Result<()> + 'a;

/// Sees each token of request `i`; returning false cancels the request.
pub type OnToken<'a> = dyn FnMut(usize, &TokenChunk) -> bool + 'a;

/// Serving in this process.
pub struct LocalServer<'a> {
    runner: StepRunner<u64>,
    experts: &'a dyn Experts,
    tokenizer: Option<&'a TextTokenizer>,
    eos: Arc<[u32]>,
    /// Request limits (`max_new_tokens`, stop strings), as the frontend's defaults.
    pub limits: Limits,
    /// Step budget and running-sequence cap (the frontend's defaults for the device).
    pub step_limits: StepLimits,
    /// Called with each step before (true) and after (false) it runs (the profiler hook of
    /// `bench`).
    pub around_step: Option<Box<AroundStep<'a>>>,
}

impl<'a> LocalServer<'a> {
    /// A server for up to `concurrency` sequences at once of up to `max_tokens` tokens each
    /// (prompt and output): its KV pool is sized for exactly that.
    pub fn new(
        model: &DeepSeekModel,
        experts: &'a dyn Experts,
        tokenizer: Option<&'a TextTokenizer>,
        concurrency: usize,
        max_tokens: usize,
    ) -> Result<Self> {
        let concurrency = concurrency.max(1);
        let cfg = model.config();
        let max_tokens = max_tokens.min(cfg.max_position_embeddings).max(1);
        let runner = StepRunner::with_blocks(model.clone(), blocks_for(concurrency, max_tokens))?;
        let budget = if model.device().is_cuda() {
            GPU_STEP_TOKEN_BUDGET
        } else {
            CPU_STEP_TOKEN_BUDGET
        };
        Ok(LocalServer {
            runner,
            experts,
            tokenizer,
            eos: Arc::from(eos_ids(cfg, tokenizer)),
            limits: Limits::default(),
            step_limits: StepLimits {
                token_budget: budget.max(concurrency),
                max_running: concurrency,
                max_skips: 8,
            },
            around_step: None,
        })
    }

    /// How decode steps went through CUDA graphs so far.
    pub fn graph_stats(&self) -> crate::graphs::GraphStats {
        self.runner.graph_stats()
    }

    /// Runs `requests`, at most `max_running` at a time (a finished one lets the next in, as
    /// requests arriving at a fixed concurrency). `on_token(i, chunk)` sees every token of
    /// request `i`; returning false cancels that request. Outputs are in request order. Every
    /// request is validated before any runs.
    pub fn run(
        &mut self,
        requests: Vec<GenerationRequest>,
        on_token: &mut OnToken<'_>,
    ) -> Result<Vec<GenerationOutput>> {
        let cfg = self.runner.model().config();
        let (vocab, context) = (cfg.vocab_size, cfg.max_position_embeddings);
        let mut decoders = Vec::with_capacity(requests.len());
        for r in &requests {
            r.validate(vocab, context, &self.limits)?;
            decoders.push(SequenceDecoder::new(
                r,
                self.tokenizer,
                self.eos.clone(),
                context,
            )?);
        }
        let n = requests.len();
        let mut outputs: Vec<Option<GenerationOutput>> = (0..n).map(|_| None).collect();
        let mut pending = requests.into_iter().zip(decoders).enumerate();
        let mut batch: Batch<Collect> = Batch::default();
        // The pool as the runner reports it after each step (as the gate does in its answer);
        // sequences that finish count as freed at once (the next step releases them first).
        batch.set_kv(self.runner.kv());
        // A step refused for KV room is planned again with the pool's numbers; twice in a row
        // means the plan and the pool disagree (a bug), not a full pool.
        let mut refused = false;
        loop {
            while batch.len() < self.step_limits.max_running {
                let Some((index, (req, decoder))) = pending.next() else {
                    break;
                };
                let out = GenerationOutput {
                    token_ids: Vec::new(),
                    prompt_logprobs: Vec::new(),
                    logprobs: Vec::new(),
                    text: String::new(),
                    finish_reason: FinishReason::Length,
                    prompt_tokens: req.prompt_ids.len(),
                    time_to_first_token: Duration::ZERO,
                    total_time: Duration::ZERO,
                };
                batch.admit(Sequence {
                    id: index as u64,
                    req,
                    generated: Vec::new(),
                    decoder,
                    cache_salt: None,
                    cached_tokens: 0,
                    prompt_logprobs: Vec::new(),
                    payload: Collect {
                        index,
                        start: Instant::now(),
                        out,
                        cancelled: false,
                    },
                });
            }
            if batch.is_idle() {
                break;
            }
            // The pool is here: what it holds is known, not guessed.
            let runner = &self.runner;
            batch.expect_cached(|s| {
                let ids: Vec<u32> = (0..s.len()).map(|i| s.token(i)).collect();
                runner.cached_prefix(s.cache_salt, &ids)
            });
            let (step, rejected) = batch.next_step(self.step_limits);
            if let Some(s) = rejected.first() {
                return Err(EngineError::KvExhausted(format!(
                    "request {}: {} tokens can never fit in the KV pool of {} blocks",
                    s.payload.index,
                    s.len() + 1,
                    self.runner.kv().total_blocks
                )));
            }
            for id in &step.release {
                self.runner.release(id);
            }
            if step.slots.is_empty() {
                // Only KV to free (or sequences the pool cannot take yet, which the plan would
                // have preempted for): plan again with the pool as it is now.
                if !step.release.is_empty() || batch.is_idle() {
                    batch.set_kv(self.runner.kv());
                    continue;
                }
                return Err(EngineError::Internal(
                    "the scheduler planned an empty step with sequences waiting".into(),
                ));
            }
            if let Some(hook) = self.around_step.as_mut() {
                hook(&step, true)?;
            }
            let outputs_of_step = match self.runner.step_ids(&step.slots, &step.ids, self.experts) {
                Ok(o) => o,
                Err(EngineError::KvExhausted(m)) if !refused => {
                    refused = true;
                    tracing::debug!(reason = %m, "step refused for KV room; planning again");
                    batch.on_kv_full(&step, self.runner.kv());
                    continue;
                }
                Err(e) => return Err(e),
            };
            refused = false;
            batch.on_prefix_hits(&step, &self.runner.take_prefix_hits());
            batch.on_prompt_logprobs(self.runner.take_prompt_logprobs());
            batch.set_kv(self.runner.kv());
            if let Some(hook) = self.around_step.as_mut() {
                hook(&step, false)?;
            }
            let done = batch.on_tokens(&step, &outputs_of_step, |s, t| {
                let c = &mut s.payload;
                if c.out.token_ids.is_empty() {
                    c.out.time_to_first_token = c.start.elapsed();
                }
                if c.out.token_ids.is_empty() {
                    c.out.prompt_logprobs = t.prompt_logprobs.clone();
                }
                c.out.token_ids.push(t.token);
                c.out.logprobs.push(t.logprob);
                c.out.text.push_str(&t.text);
                let chunk = TokenChunk {
                    token_id: t.token,
                    logprob: t.logprob,
                    text: t.text.clone(),
                };
                if !on_token(c.index, &chunk) {
                    c.cancelled = true;
                }
            });
            for (s, why) in done {
                let mut c = s.payload;
                c.out.finish_reason = if c.cancelled {
                    FinishReason::Cancelled
                } else {
                    why?
                };
                c.out.total_time = c.start.elapsed();
                outputs[c.index] = Some(c.out);
            }
            for s in batch.remove_where(|s| s.payload.cancelled) {
                let mut c = s.payload;
                c.out.finish_reason = FinishReason::Cancelled;
                c.out.total_time = c.start.elapsed();
                outputs[c.index] = Some(c.out);
            }
        }
        outputs
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                o.ok_or_else(|| EngineError::Internal(format!("request {i} did not finish")))
            })
            .collect()
    }
}
