//! The model side of a step: every live sequence's KV cache and sampler, the forward pass over
//! a step's rows, and the one token picker (greedy on the GPU when every sampling row is greedy,
//! else the logits come to the host and each row's sampler draws). The gate runs it behind gRPC;
//! in-process generation, `bench` and `verify` run it directly.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{EngineError, Result};
use crate::experts::Experts;
use crate::kv_cache::{BLOCK_TOKENS, SequenceCache};
use crate::kv_pool::KvPool;
use crate::model::{DeepSeekModel, StepSeq};
use crate::sampling::{Sampled, Sampler, SamplerStart};

use super::scheduler::KvState;

/// One sequence's part of a step, as the runner takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotSpec<K> {
    pub key: K,
    /// Position of the first row (the tokens the runner already holds for the sequence).
    pub start: usize,
    /// Rows this step adds.
    pub tokens: usize,
    /// Whether the sequence's next token is picked from its last row.
    pub sample: bool,
    /// Sampling for a sequence the runner does not hold yet (read only on its first step here).
    pub sampling: Option<SamplerStart>,
}

/// A picked token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeqOutput<K> {
    pub key: K,
    pub token: u32,
    pub logprob: f32,
}

/// Which logits a step hands back besides its picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    None,
    /// The sampling rows'.
    Sampled,
    /// Every row's, and no picks.
    All,
}

struct SeqState {
    cache: SequenceCache,
    sampler: Sampler,
}

/// Blocks of KV that fit in `bytes` for this model and dtype.
pub fn blocks_for_bytes(
    cfg: &crate::config::ModelConfig,
    dtype: candle_core::DType,
    bytes: u64,
) -> usize {
    KvPool::blocks_for_bytes(cfg, dtype, bytes)
}

/// Blocks a pool needs for `seqs` sequences of up to `tokens` tokens each (one spare block per
/// sequence for the row a step writes past a block's end).
pub fn blocks_for(seqs: usize, tokens: usize) -> usize {
    seqs * (tokens.div_ceil(BLOCK_TOKENS) + 1)
}

/// The sequences of one model replica and the steps over them. `K` names a sequence (the gate
/// uses (connection, sequence id)).
pub struct StepRunner<K> {
    model: DeepSeekModel,
    pool: Arc<KvPool>,
    seqs: HashMap<K, SeqState>,
    /// Two-micro-batch overlap of attention and expert round trips (the gate with remote
    /// experts).
    pub overlap: bool,
}

impl<K: Copy + Eq + Hash + std::fmt::Debug> StepRunner<K> {
    pub fn new(model: DeepSeekModel, pool: Arc<KvPool>) -> Self {
        StepRunner {
            model,
            pool,
            seqs: HashMap::new(),
            overlap: false,
        }
    }

    /// A runner with a pool of `blocks` KV blocks on the model's device.
    pub fn with_blocks(model: DeepSeekModel, blocks: usize) -> Result<Self> {
        let pool = KvPool::new(model.config(), blocks, model.dtype(), model.device())?;
        Ok(Self::new(model, pool))
    }

    pub fn model(&self) -> &DeepSeekModel {
        &self.model
    }

    /// The KV pool's state, as the scheduler plans with it.
    pub fn kv(&self) -> KvState {
        KvState {
            free_blocks: self.pool.free_blocks(),
            total_blocks: self.pool.num_blocks(),
            block_tokens: BLOCK_TOKENS,
        }
    }

    /// Sequences held.
    pub fn live(&self) -> usize {
        self.seqs.len()
    }

    /// Tokens held in KV over all sequences.
    pub fn kv_tokens(&self) -> u64 {
        self.seqs.values().map(|s| s.cache.len() as u64).sum()
    }

    /// Frees a sequence's KV (a no-op for one not held).
    pub fn release(&mut self, key: &K) {
        self.seqs.remove(key);
    }

    /// Keeps only the sequences `keep` says yes to; returns how many were freed.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) -> usize {
        let before = self.seqs.len();
        self.seqs.retain(|k, _| keep(k));
        before - self.seqs.len()
    }

    /// Embeds `ids` (the step's rows, sequences in slot order) and runs [`step`](Self::step).
    pub fn step_ids(
        &mut self,
        slots: &[SlotSpec<K>],
        ids: &[u32],
        experts: &dyn Experts,
    ) -> Result<Vec<SeqOutput<K>>> {
        let hidden = self.model.embed(ids)?;
        self.step(slots, &hidden, experts)
    }

    /// Runs one step: `hidden` holds the slots' rows in order. Returns a token for every slot
    /// that samples. A failed step commits nothing: every sequence's cache is as it was, and
    /// sequences it would have started are not kept.
    pub fn step(
        &mut self,
        slots: &[SlotSpec<K>],
        hidden: &Tensor,
        experts: &dyn Experts,
    ) -> Result<Vec<SeqOutput<K>>> {
        Ok(self.step_inner(slots, hidden, experts, Keep::None)?.0)
    }

    /// [`step`](Self::step), also returning the logits of the sampling rows (`[rows, vocab]`,
    /// f32, on the model's device), for checks that compare them.
    pub fn step_with_logits(
        &mut self,
        slots: &[SlotSpec<K>],
        hidden: &Tensor,
        experts: &dyn Experts,
    ) -> Result<(Vec<SeqOutput<K>>, Option<Tensor>)> {
        self.step_inner(slots, hidden, experts, Keep::Sampled)
    }

    /// [`step`](Self::step) returning the logits of every row (`[rows, vocab]`, f32) and
    /// picking nothing, for checks of every prompt position (chunked prefill included).
    pub fn step_all_logits(
        &mut self,
        slots: &[SlotSpec<K>],
        hidden: &Tensor,
        experts: &dyn Experts,
    ) -> Result<Tensor> {
        self.step_inner(slots, hidden, experts, Keep::All)?
            .1
            .ok_or_else(|| EngineError::Internal("a step of no rows has no logits".into()))
    }

    fn step_inner(
        &mut self,
        slots: &[SlotSpec<K>],
        hidden: &Tensor,
        experts: &dyn Experts,
        keep: Keep,
    ) -> Result<(Vec<SeqOutput<K>>, Option<Tensor>)> {
        if slots.is_empty() {
            return Ok((Vec::new(), None));
        }
        // Take the states out of the map so the step can hold them all mutably at once.
        let mut states = Vec::with_capacity(slots.len());
        let mut failure = None;
        for s in slots {
            match self.take_state(s) {
                Ok(st) => states.push(st),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let result = match failure {
            Some(e) => Err(e),
            None => self.run(slots, hidden, &mut states, experts, keep),
        };
        // Put the states back (a failed step leaves their caches as they were: nothing
        // committed), except sequences this step would have started: they hold no tokens.
        for (st, s) in states.into_iter().zip(slots) {
            if result.is_ok() || s.start > 0 {
                self.seqs.insert(s.key, st);
            }
        }
        result
    }

    fn take_state(&mut self, s: &SlotSpec<K>) -> Result<SeqState> {
        if let Some(st) = self.seqs.remove(&s.key) {
            if st.cache.len() != s.start {
                let held = st.cache.len();
                self.seqs.insert(s.key, st);
                return Err(EngineError::SequenceState(format!(
                    "sequence {:?}: {held} tokens are held but the step starts at position {}",
                    s.key, s.start
                )));
            }
            return Ok(st);
        }
        if s.start != 0 {
            return Err(EngineError::SequenceState(format!(
                "sequence {:?} is unknown here (the step starts at position {}); prefill it from position 0",
                s.key, s.start
            )));
        }
        let start = s.sampling.as_ref().ok_or_else(|| {
            EngineError::InvalidInput(format!(
                "sequence {:?}: sampling is required on its first step",
                s.key
            ))
        })?;
        start.params.validate(self.model.config().vocab_size)?;
        Ok(SeqState {
            cache: SequenceCache::paged(self.model.config(), self.pool.clone()),
            sampler: start.sampler(),
        })
    }

    fn run(
        &self,
        slots: &[SlotSpec<K>],
        hidden: &Tensor,
        states: &mut [SeqState],
        experts: &dyn Experts,
        keep: Keep,
    ) -> Result<(Vec<SeqOutput<K>>, Option<Tensor>)> {
        let mut step_seqs: Vec<StepSeq> = states
            .iter_mut()
            .zip(slots)
            .map(|(st, s)| StepSeq {
                cache: &mut st.cache,
                new_tokens: s.tokens,
            })
            .collect();
        let out = if self.overlap {
            self.model
                .forward_hidden_overlapped(hidden, &mut step_seqs, experts)?
        } else {
            self.model
                .forward_hidden(hidden, &mut step_seqs, experts, |_, _| {})?
        };
        drop(step_seqs);
        if keep == Keep::All {
            return Ok((Vec::new(), Some(self.model.logits(&out)?)));
        }
        // Logits only for the last row of sequences that sample.
        let mut rows = Vec::new();
        let mut end = 0;
        for s in slots {
            end += s.tokens;
            if s.sample {
                rows.push(end as u32 - 1);
            }
        }
        if rows.is_empty() {
            return Ok((Vec::new(), None));
        }
        let n = rows.len();
        // Under a traced step (the gate's), the pick is a span of its own; untraced work
        // starts no span.
        let span = if tracing::Span::current().is_none() {
            tracing::Span::none()
        } else {
            tracing::debug_span!("sampling", rows = n)
        };
        let _sampling = span.entered();
        let idx = Tensor::from_vec(rows, n, self.model.device())?;
        let logits = self.model.logits(&out.index_select(&idx, 0)?)?;
        let mut keys = Vec::with_capacity(n);
        let mut samplers = Vec::with_capacity(n);
        for (st, s) in states.iter_mut().zip(slots) {
            if s.sample {
                keys.push(s.key);
                samplers.push(&mut st.sampler);
            }
        }
        let picked = pick(&logits, &mut samplers)?;
        let outputs = keys
            .into_iter()
            .zip(picked)
            .map(|(key, s)| SeqOutput {
                key,
                token: s.token,
                logprob: s.logprob,
            })
            .collect();
        Ok((outputs, (keep == Keep::Sampled).then_some(logits)))
    }
}

/// The next token of every row of `logits` (`[rows, vocab]`, f32), row `i` drawn by
/// `samplers[i]`. When every row is greedy and the logits are on a GPU with moemesh's kernels,
/// the pick happens there and only the ids and log-probabilities come back; otherwise the rows
/// come to the host in one copy and are sampled in parallel.
pub fn pick(logits: &Tensor, samplers: &mut [&mut Sampler]) -> Result<Vec<Sampled>> {
    let (n, vocab) = logits.dims2()?;
    if n != samplers.len() {
        return Err(EngineError::Internal(format!(
            "{n} logits rows for {} samplers",
            samplers.len()
        )));
    }
    if samplers.iter().all(|s| !s.needs_host())
        && let Some(g) = crate::cuda::gpu(logits.device())
        && let Some(picks) = g.argmax_logprob(logits)?
    {
        // The greedy draw advances no random stream; the samplers only count the token.
        for (s, &(token, _)) in samplers.iter_mut().zip(&picks) {
            s.record(token);
        }
        return Ok(picks
            .into_iter()
            .map(|(token, logprob)| Sampled { token, logprob })
            .collect());
    }
    let host = logits.flatten_all()?.to_vec1::<f32>()?;
    let mut jobs: Vec<(&mut Sampler, &[f32])> = samplers
        .iter_mut()
        .map(|s| &mut **s)
        .zip(host.chunks_exact(vocab.max(1)))
        .collect();
    crate::sampling::sample_batch(&mut jobs)
}
