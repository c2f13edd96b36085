//! The model side of a step: every live sequence's KV cache and sampler, the forward pass over
//! a step's rows, and the one token picker (greedy on the GPU when every sampling row is greedy,
//! else the logits come to the host and each row's sampler draws). The gate runs it behind gRPC;
//! in-process generation, `bench` and `verify` run it directly.
//!
//! Prefix caching: when a step comes with its rows' token ids, the runner follows each
//! sequence's hash chain ([`crate::prefix_cache`]). A slot that starts on a block boundary first
//! takes the cached blocks that continue the chain (at most up to its last row, which is always
//! computed so that there are logits) and computes only the rows after them; every block the
//! step fills is registered for later sequences. Callers see no difference but speed: the
//! sequence holds `start + tokens` tokens after the step either way, and
//! [`take_prefix_hits`](StepRunner::take_prefix_hits) tells how many came from the cache.
//!
//! Prompt logprobs: a slot that carries [`PromptAsk`] gets the logits of its rows too (in
//! groups of [`PROMPT_LOGPROB_ROWS`], each copied to the host), and never takes cached blocks
//! (a cached row has no logits; vLLM recomputes such prompts too). Every other slot keeps
//! computing only its sampling row's logits. [`take_prompt_logprobs`](StepRunner::take_prompt_logprobs)
//! hands them out after the step.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{EngineError, Result};
use crate::experts::Experts;
use crate::graphs::{DecodeGraphs, GraphStats};
use crate::kv_cache::{BLOCK_TOKENS, SequenceCache};
use crate::kv_pool::KvPool;
use crate::logprobs::{MAX_TOP_LOGPROBS, PromptLogprob, prompt_logprob};
use crate::model::{DeepSeekModel, StepSeq};
use crate::prefix_cache::{BlockHash, PrefixCacheStats, block_hash, chain, chain_root};
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
    /// The prefix cache's salt for a sequence the runner does not hold yet (a digest of the
    /// tenant's and the request's salts): sequences share cached blocks only within one salt.
    /// `None` is the unsalted space.
    pub cache_salt: Option<[u8; 32]>,
    /// Prompt logprobs to compute from this slot's rows; `None` for none (only the sampling
    /// row's logits are computed).
    pub prompt_logprobs: Option<PromptAsk>,
    /// For a sampling slot whose output is constrained: the ids its pick may take, a bit mask
    /// (bit `i % 32` of word `i / 32`; ids past it may not); every other logit is -inf before
    /// the pick ([`crate::constraint`]). `None`: any id.
    pub allowed: Option<Arc<[u32]>>,
}

/// A slot's request for prompt logprobs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PromptAsk {
    /// Alternatives to report at each position (at most [`MAX_TOP_LOGPROBS`]).
    pub top: usize,
    /// The token that follows each of the slot's first `targets.len()` rows: row `j`'s logits
    /// give `targets[j]`'s logprob. At most the slot's rows (the prompt's last row has no
    /// prompt token after it, so a final chunk has one target fewer than rows).
    pub targets: Vec<u32>,
}

/// Rows whose logits are computed and copied to the host at once for prompt logprobs (64 rows
/// of a 129k vocabulary are 33 MB of f32).
pub const PROMPT_LOGPROB_ROWS: usize = 64;

/// A picked token.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqOutput<K> {
    pub key: K,
    pub token: u32,
    pub logprob: f32,
    /// The most likely ids at this position and their raw logprobs, best first, when the
    /// sequence's sampler asks for them (`crate::logprobs::top_logprobs`); else empty.
    pub top: Vec<(u32, f32)>,
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
    /// The sequence's hash chain; `None` when its token ids are unknown (a step came without
    /// them) or caching is off.
    chain: Option<PrefixChain>,
}

/// A sequence's place in the prefix cache's hash chain.
struct PrefixChain {
    /// The chain's root: model fingerprint and salt.
    root: BlockHash,
    /// The hash of each full block so far, in order.
    hashes: Vec<BlockHash>,
    /// The ids after the last full block.
    partial: Vec<u32>,
}

impl PrefixChain {
    fn last(&self) -> BlockHash {
        self.hashes.last().copied().unwrap_or(self.root)
    }
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
    /// The model fingerprint every hash chain starts from.
    fingerprint: String,
    /// Tokens each sequence of the last step took from the prefix cache (only those that took
    /// some).
    hits: Vec<(K, usize)>,
    /// The prompt logprobs of the last step's slots that asked for them, in slot order.
    prompt_logprobs: Vec<(K, Vec<PromptLogprob>)>,
    /// Decode steps as CUDA graphs (on a GPU, with in-process experts).
    graphs: DecodeGraphs,
}

impl<K: Copy + Eq + Hash + std::fmt::Debug> StepRunner<K> {
    pub fn new(model: DeepSeekModel, pool: Arc<KvPool>) -> Self {
        StepRunner {
            model,
            pool,
            seqs: HashMap::new(),
            overlap: false,
            fingerprint: String::new(),
            hits: Vec::new(),
            prompt_logprobs: Vec::new(),
            graphs: DecodeGraphs::new(),
        }
    }

    /// Turns prefix caching on or off (on by default) and names the model whose KV the cache
    /// holds (its fingerprint starts every hash chain).
    pub fn set_prefix_cache(&mut self, on: bool, fingerprint: &str) {
        self.pool.set_prefix_caching(on);
        self.fingerprint = fingerprint.to_string();
    }

    /// Gives the prefix cache a host-memory tier of `bytes` (`--host-kv-cache-gb`; 0: none):
    /// full blocks evicted from the pool are kept there and come back on a hit.
    pub fn set_host_tier(&mut self, bytes: u64) {
        self.pool.set_host_tier(bytes);
    }

    /// Most blocks the host tier holds (0 without one).
    pub fn host_tier_blocks(&self) -> usize {
        self.pool.host_blocks()
    }

    /// Whether full blocks are kept for later prompts (`--prefix-cache`).
    pub fn prefix_caching(&self) -> bool {
        self.pool.prefix_caching()
    }

    /// How decode steps went through CUDA graphs.
    pub fn graph_stats(&self) -> GraphStats {
        self.graphs.stats()
    }

    /// The prefix cache's counters.
    pub fn prefix_stats(&self) -> PrefixCacheStats {
        self.pool.prefix_stats()
    }

    /// How many of the first tokens of `ids` (a new sequence's, in salt space `salt`) a step
    /// would take from the prefix cache now: whole blocks, never the last token. Looks, takes
    /// nothing.
    pub fn cached_prefix(&self, salt: Option<[u8; 32]>, ids: &[u32]) -> usize {
        if !self.pool.prefix_caching() || ids.is_empty() {
            return 0;
        }
        let root = chain_root(&self.fingerprint, salt.as_ref().map_or(&[][..], |s| &s[..]));
        let full = (ids.len() - 1) / BLOCK_TOKENS * BLOCK_TOKENS;
        self.pool.cached_blocks(&chain(&root, &ids[..full])) * BLOCK_TOKENS
    }

    /// For each sequence of the last step that took tokens from the prefix cache: how many.
    pub fn take_prefix_hits(&mut self) -> Vec<(K, usize)> {
        std::mem::take(&mut self.hits)
    }

    /// For each slot of the last step that asked for prompt logprobs ([`SlotSpec::prompt_logprobs`]):
    /// one per target, in order.
    pub fn take_prompt_logprobs(&mut self) -> Vec<(K, Vec<PromptLogprob>)> {
        std::mem::take(&mut self.prompt_logprobs)
    }

    /// A runner with a pool of `blocks` KV blocks on the model's device (one more on a GPU,
    /// for the decode graphs' padding rows, so that `blocks` stay the sequences').
    pub fn with_blocks(model: DeepSeekModel, blocks: usize) -> Result<Self> {
        let blocks = blocks + usize::from(crate::cuda::gpu(model.device()).is_some());
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
        self.step_tokens(slots, &hidden, ids, experts)
    }

    /// [`step`](Self::step) for rows whose token ids are known (`ids`, one per row of `hidden`):
    /// cached prefix blocks are reused and full blocks registered. Ids of another length are
    /// ignored (the step runs uncached).
    pub fn step_tokens(
        &mut self,
        slots: &[SlotSpec<K>],
        hidden: &Tensor,
        ids: &[u32],
        experts: &dyn Experts,
    ) -> Result<Vec<SeqOutput<K>>> {
        Ok(self.step_inner(slots, hidden, ids, experts, Keep::None)?.0)
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
        Ok(self.step_inner(slots, hidden, &[], experts, Keep::None)?.0)
    }

    /// [`step`](Self::step), also returning the logits of the sampling rows (`[rows, vocab]`,
    /// f32, on the model's device), for checks that compare them.
    pub fn step_with_logits(
        &mut self,
        slots: &[SlotSpec<K>],
        hidden: &Tensor,
        experts: &dyn Experts,
    ) -> Result<(Vec<SeqOutput<K>>, Option<Tensor>)> {
        self.step_inner(slots, hidden, &[], experts, Keep::Sampled)
    }

    /// [`step`](Self::step) returning the logits of every row (`[rows, vocab]`, f32) and
    /// picking nothing, for checks of every prompt position (chunked prefill included).
    pub fn step_all_logits(
        &mut self,
        slots: &[SlotSpec<K>],
        hidden: &Tensor,
        experts: &dyn Experts,
    ) -> Result<Tensor> {
        self.step_inner(slots, hidden, &[], experts, Keep::All)?
            .1
            .ok_or_else(|| EngineError::Internal("a step of no rows has no logits".into()))
    }

    fn step_inner(
        &mut self,
        slots: &[SlotSpec<K>],
        hidden: &Tensor,
        ids: &[u32],
        experts: &dyn Experts,
        keep: Keep,
    ) -> Result<(Vec<SeqOutput<K>>, Option<Tensor>)> {
        self.hits.clear();
        self.prompt_logprobs.clear();
        if slots.is_empty() {
            return Ok((Vec::new(), None));
        }
        self.check_prompt_asks(slots)?;
        self.check_masks(slots)?;
        let rows: usize = slots.iter().map(|s| s.tokens).sum();
        let ids = if ids.len() == rows { ids } else { &[] };
        // Take the states out of the map so the step can hold them all mutably at once.
        let mut states = Vec::with_capacity(slots.len());
        let mut failure = None;
        for s in slots {
            match self.take_state(s, !ids.is_empty()) {
                Ok(st) => states.push(st),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let before: Vec<usize> = states.iter().map(|st| st.cache.len()).collect();
        let result = match failure {
            Some(e) => Err(e),
            None => self
                .take_cached(slots, ids, &mut states)
                .and_then(|skips| {
                    let mut lps = Vec::new();
                    let out =
                        self.run(slots, &skips, hidden, &mut states, experts, keep, &mut lps)?;
                    self.prompt_logprobs = lps;
                    Ok((out, skips))
                })
                .map(|(out, skips)| {
                    self.extend_chains(slots, ids, &skips, &mut states);
                    out
                }),
        };
        // Put the states back (a failed step leaves their caches as they were: nothing
        // committed, no cached block kept), except sequences this step would have started: they
        // hold no tokens.
        for ((mut st, s), len) in states.into_iter().zip(slots).zip(before) {
            if result.is_err() && st.cache.len() > len {
                st.cache.detach(len);
                if let Some(c) = st.chain.as_mut() {
                    c.hashes.truncate(len / BLOCK_TOKENS);
                }
            }
            if result.is_ok() || s.start > 0 {
                self.seqs.insert(s.key, st);
            }
        }
        if result.is_err() {
            self.hits.clear();
            self.prompt_logprobs.clear();
        }
        result
    }

    /// Rejects a step with a token mask that allows no id of the vocabulary, before anything
    /// runs (its row would have nothing to pick).
    fn check_masks(&self, slots: &[SlotSpec<K>]) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        for s in slots {
            let Some(mask) = &s.allowed else {
                continue;
            };
            let none = (0..vocab as u32)
                .step_by(32)
                .all(|id| mask.get(id as usize / 32).is_none_or(|&w| w == 0));
            if none || !s.sample {
                return Err(EngineError::InvalidInput(format!(
                    "sequence {:?}: its token mask allows no id (or it does not sample)",
                    s.key
                )));
            }
        }
        Ok(())
    }

    /// Rejects a step whose prompt-logprob requests cannot be served, before anything runs.
    fn check_prompt_asks(&self, slots: &[SlotSpec<K>]) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        for s in slots {
            let Some(ask) = &s.prompt_logprobs else {
                continue;
            };
            if ask.top > MAX_TOP_LOGPROBS {
                return Err(EngineError::InvalidInput(format!(
                    "sequence {:?}: prompt_logprobs asks {} alternatives, the limit is {MAX_TOP_LOGPROBS}",
                    s.key, ask.top
                )));
            }
            if ask.targets.len() > s.tokens {
                return Err(EngineError::InvalidInput(format!(
                    "sequence {:?}: {} prompt-logprob targets for {} rows (at most one per row)",
                    s.key,
                    ask.targets.len(),
                    s.tokens
                )));
            }
            if let Some(t) = ask.targets.iter().find(|&&t| t as usize >= vocab) {
                return Err(EngineError::InvalidInput(format!(
                    "sequence {:?}: prompt-logprob target {t} is outside the vocabulary (ids must be below {vocab})",
                    s.key
                )));
            }
        }
        Ok(())
    }

    /// The prompt logprobs of the slots that ask, from `out` (the hidden rows the step
    /// computed, `computed[i]` of them for slot `i`, in order).
    fn prompt_logprobs(
        &self,
        slots: &[SlotSpec<K>],
        computed: &[usize],
        out: &Tensor,
    ) -> Result<Vec<(K, Vec<PromptLogprob>)>> {
        use rayon::prelude::*;
        let mut all = Vec::new();
        let mut first = 0;
        for (s, &n) in slots.iter().zip(computed) {
            let at = first;
            first += n;
            let Some(ask) = &s.prompt_logprobs else {
                continue;
            };
            if n != s.tokens {
                return Err(EngineError::Internal(format!(
                    "sequence {:?} asks for prompt logprobs but {} of its {} rows came from the prefix cache",
                    s.key,
                    s.tokens - n,
                    s.tokens
                )));
            }
            let mut lps = Vec::with_capacity(ask.targets.len());
            for (g, targets) in ask.targets.chunks(PROMPT_LOGPROB_ROWS).enumerate() {
                let rows = out.narrow(0, at + g * PROMPT_LOGPROB_ROWS, targets.len())?;
                let host = self.model.logits(&rows)?.flatten_all()?.to_vec1::<f32>()?;
                let vocab = host.len() / targets.len();
                let group: Vec<Option<PromptLogprob>> = host
                    .par_chunks_exact(vocab.max(1))
                    .zip(targets.par_iter())
                    .map(|(row, &t)| prompt_logprob(row, t, ask.top))
                    .collect();
                for (lp, &t) in group.into_iter().zip(targets) {
                    lps.push(lp.ok_or_else(|| {
                        EngineError::InvalidInput(format!(
                            "sequence {:?}: prompt-logprob target {t} is outside the logits row ({vocab} ids)",
                            s.key
                        ))
                    })?);
                }
            }
            all.push((s.key, lps));
        }
        Ok(all)
    }

    /// Attaches, for each slot that starts on a block boundary, the cached blocks continuing its
    /// chain (leaving at least the slot's last row to compute). Returns the rows of each slot
    /// that came from the cache.
    fn take_cached(
        &mut self,
        slots: &[SlotSpec<K>],
        ids: &[u32],
        states: &mut [SeqState],
    ) -> Result<Vec<usize>> {
        let mut skips = vec![0; slots.len()];
        if ids.is_empty() || !self.pool.prefix_caching() {
            return Ok(skips);
        }
        let mut at = 0;
        for ((s, st), skip) in slots.iter().zip(states.iter_mut()).zip(skips.iter_mut()) {
            let rows = &ids[at..at + s.tokens];
            at += s.tokens;
            let Some(c) = st.chain.as_mut() else {
                continue;
            };
            if s.prompt_logprobs.is_some() {
                // Every row's logits are wanted: nothing may come from the cache.
                continue;
            }
            // The last row is always computed: its logits pick the next token.
            let blocks = s.tokens.saturating_sub(1) / BLOCK_TOKENS;
            if blocks == 0
                || !c.partial.is_empty()
                || c.hashes.len() * BLOCK_TOKENS != st.cache.len()
            {
                continue;
            }
            let hashes = chain(&c.last(), &rows[..blocks * BLOCK_TOKENS]);
            let found = self.pool.acquire_cached(&hashes);
            if found.is_empty() {
                continue;
            }
            let n = found.len();
            st.cache.attach(found)?;
            c.hashes.extend_from_slice(&hashes[..n]);
            *skip = n * BLOCK_TOKENS;
            self.hits.push((s.key, *skip));
        }
        Ok(skips)
    }

    /// After a step ran: follows each sequence's chain over the rows it computed and registers
    /// the blocks they filled.
    fn extend_chains(
        &self,
        slots: &[SlotSpec<K>],
        ids: &[u32],
        skips: &[usize],
        states: &mut [SeqState],
    ) {
        let mut at = 0;
        for ((s, st), &skip) in slots.iter().zip(states.iter_mut()).zip(skips) {
            let rows = ids.get(at + skip..at + s.tokens);
            at += s.tokens;
            let Some(c) = st.chain.as_mut() else {
                continue;
            };
            let Some(rows) = rows else {
                st.chain = None;
                continue;
            };
            for &id in rows {
                c.partial.push(id);
                if c.partial.len() == BLOCK_TOKENS {
                    let h = block_hash(&c.last(), &c.partial);
                    c.partial.clear();
                    if let Some(&block) = st.cache.block_ids().get(c.hashes.len()) {
                        self.pool.register(block, h);
                    }
                    c.hashes.push(h);
                }
            }
        }
    }

    fn take_state(&mut self, s: &SlotSpec<K>, with_ids: bool) -> Result<SeqState> {
        if let Some(mut st) = self.seqs.remove(&s.key) {
            if !with_ids {
                // The chain cannot follow tokens it does not see.
                st.chain = None;
            }
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
        let chain = (with_ids && self.pool.prefix_caching()).then(|| PrefixChain {
            root: chain_root(
                &self.fingerprint,
                s.cache_salt.as_ref().map_or(&[][..], |salt| &salt[..]),
            ),
            hashes: Vec::new(),
            partial: Vec::new(),
        });
        Ok(SeqState {
            cache: SequenceCache::paged(self.model.config(), self.pool.clone()),
            sampler: start.sampler(),
            chain,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        slots: &[SlotSpec<K>],
        skips: &[usize],
        hidden: &Tensor,
        states: &mut [SeqState],
        experts: &dyn Experts,
        keep: Keep,
        prompt_logprobs: &mut Vec<(K, Vec<PromptLogprob>)>,
    ) -> Result<(Vec<SeqOutput<K>>, Option<Tensor>)> {
        // Rows that came from the prefix cache are not computed.
        let computed: Vec<usize> = slots.iter().zip(skips).map(|(s, k)| s.tokens - k).collect();
        let kept;
        let hidden = if skips.iter().any(|&k| k > 0) {
            let mut idx = Vec::with_capacity(computed.iter().sum());
            let mut at = 0u32;
            for (s, &k) in slots.iter().zip(skips) {
                idx.extend(at + k as u32..at + s.tokens as u32);
                at += s.tokens as u32;
            }
            let n = idx.len();
            kept = hidden.index_select(&Tensor::from_vec(idx, n, hidden.device())?, 0)?;
            &kept
        } else {
            hidden
        };
        let mut step_seqs: Vec<StepSeq> = states
            .iter_mut()
            .zip(&computed)
            .map(|(st, &n)| StepSeq {
                cache: &mut st.cache,
                new_tokens: n,
            })
            .collect();
        // Logits only for the last row of sequences that sample.
        let mut rows = Vec::new();
        let mut end = 0;
        for (s, n) in slots.iter().zip(&computed) {
            end += n;
            if s.sample {
                rows.push(end as u32 - 1);
            }
        }
        // Unless every row's output is read (all logits, prompt logprobs) or every row samples
        // (a decode step: nothing to leave out), the last layer's feed-forward block runs over
        // the sampled rows only (one row if none samples: its output is then not read at all).
        let every_row = keep == Keep::All || slots.iter().any(|s| s.prompt_logprobs.is_some());
        let out_rows = if every_row || rows.len() == end {
            None
        } else if rows.is_empty() {
            Some(Tensor::from_slice(
                &[(end as u32).saturating_sub(1)],
                1,
                hidden.device(),
            )?)
        } else {
            Some(Tensor::from_slice(&rows, rows.len(), hidden.device())?)
        };
        crate::cuda::trace_mark(hidden.device(), "step");
        let graphed = self
            .graphs
            .step(&self.model, &self.pool, hidden, &mut step_seqs, experts)?;
        // A graph's step is settled and committed by `finish_step`: for a large step that
        // samples, once its logits are queued (the experts' check then runs while the GPU
        // computes them), else at once.
        let finish_late = graphed.is_some()
            && keep != Keep::All
            && !every_row
            && !rows.is_empty()
            && crate::graphs::settle_late(step_seqs.len());
        if graphed.is_some() && !finish_late {
            crate::graphs::finish_step(experts, &mut step_seqs)?;
        }
        // Whether `out` holds the sampled rows only, in order.
        let mut trimmed = false;
        let out = if let Some(out) = graphed {
            out
        } else if self.overlap {
            self.model
                .forward_hidden_overlapped(hidden, &mut step_seqs, experts)?
        } else {
            trimmed = out_rows.is_some();
            self.model.forward_hidden_rows(
                hidden,
                &mut step_seqs,
                experts,
                out_rows.as_ref(),
                |_, _| {},
            )?
        };
        let mut unfinished = finish_late.then_some(step_seqs);
        crate::cuda::trace_mark(out.device(), "layers");
        if keep == Keep::All {
            crate::cuda::trace_flush("step", 0);
            return Ok((Vec::new(), Some(self.model.logits(&out)?)));
        }
        // (Prompt logprobs read every row: `out` is then never trimmed.)
        *prompt_logprobs = self.prompt_logprobs(slots, &computed, &out)?;
        if rows.is_empty() {
            crate::cuda::trace_flush("step", 0);
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
        let logits = if trimmed {
            self.model.logits(&out)?
        } else {
            let idx = Tensor::from_vec(rows, n, self.model.device())?;
            self.model.logits(&out.index_select(&idx, 0)?)?
        };
        if let Some(seqs) = unfinished.as_mut() {
            crate::graphs::finish_step(experts, seqs)?;
        }
        drop(unfinished);
        let logits = masked(logits, slots.iter().filter(|s| s.sample))?;
        let mut keys = Vec::with_capacity(n);
        let mut samplers = Vec::with_capacity(n);
        for (st, s) in states.iter_mut().zip(slots) {
            if s.sample {
                keys.push(s.key);
                samplers.push(&mut st.sampler);
            }
        }
        let picked = pick(&logits, &mut samplers)?;
        crate::cuda::trace_mark(logits.device(), "picked");
        crate::cuda::trace_flush("step", 0);
        // Alternatives from the raw rows that ask for them; such rows were picked on the host,
        // and only they are copied again here.
        let mut tops = Vec::with_capacity(n);
        for (i, s) in samplers.iter().enumerate() {
            tops.push(match s.top_logprobs() {
                0 => Vec::new(),
                k => crate::logprobs::top_logprobs(&logits.get(i)?.to_vec1::<f32>()?, k),
            });
        }
        let outputs = keys
            .into_iter()
            .zip(picked)
            .zip(tops)
            .map(|((key, s), top)| SeqOutput {
                key,
                token: s.token,
                logprob: s.logprob,
                top,
            })
            .collect();
        Ok((outputs, (keep == Keep::Sampled).then_some(logits)))
    }
}

/// `logits` (`[rows, vocab]`, one row per sampling slot in `sampling`) with -inf for every id
/// a row's mask does not allow ([`SlotSpec::allowed`]); the rows without a mask are untouched,
/// and only the masked rows' biases are built and added (on the logits' device).
fn masked<'a, K: 'a>(
    logits: Tensor,
    sampling: impl Iterator<Item = &'a SlotSpec<K>>,
) -> Result<Tensor> {
    let (_, vocab) = logits.dims2()?;
    let mut rows = Vec::new();
    let mut bias = Vec::new();
    for (i, s) in sampling.enumerate() {
        let Some(mask) = &s.allowed else {
            continue;
        };
        rows.push(i as u32);
        bias.extend((0..vocab as u32).map(|id| {
            if crate::constraint::allows(mask, id) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        }));
    }
    if rows.is_empty() {
        return Ok(logits);
    }
    let m = rows.len();
    let device = logits.device().clone();
    let bias = Tensor::from_vec(bias, (m, vocab), &device)?;
    let idx = Tensor::from_vec(rows, m, &device)?;
    Ok(logits.index_add(&idx, &bias, 0)?)
}

/// The next token of every row of `logits` (`[rows, vocab]`, f32), row `i` drawn by
/// `samplers[i]`. On a GPU with moemesh's kernels the pick happens there and only the ids and
/// log-probabilities come back: the plain arg-max when every row is plain greedy, otherwise the
/// device sampler (the host sampler's semantics, [`crate::sampling`]). Elsewhere, or for a row
/// that needs the host, the rows come to the host in one copy and are sampled in parallel.
pub fn pick(logits: &Tensor, samplers: &mut [&mut Sampler]) -> Result<Vec<Sampled>> {
    let (n, vocab) = logits.dims2()?;
    if n != samplers.len() {
        return Err(EngineError::Internal(format!(
            "{n} logits rows for {} samplers",
            samplers.len()
        )));
    }
    if let Some(g) = crate::cuda::gpu(logits.device()) {
        let picks = if samplers.iter().all(|s| s.is_plain_greedy()) {
            g.argmax_logprob(logits)?.map(|p| (p, Vec::new()))
        } else if crate::cuda::device_sampling_enabled() && samplers.iter().all(|s| !s.needs_host())
        {
            let plans: Vec<_> = samplers.iter().map(|s| s.plan()).collect();
            g.sample(logits, &plans)?.map(|p| (p, plans))
        } else {
            None
        };
        if let Some((picks, plans)) = picks {
            for (i, (s, &(token, _))) in samplers.iter_mut().zip(&picks).enumerate() {
                // A greedy pick advances no random stream; the samplers count the token.
                s.record_pick(token, plans.get(i).is_some_and(|p| !p.greedy));
            }
            return Ok(picks
                .into_iter()
                .map(|(token, logprob)| Sampled { token, logprob })
                .collect());
        }
    }
    let host = logits.flatten_all()?.to_vec1::<f32>()?;
    let mut jobs: Vec<(&mut Sampler, &[f32])> = samplers
        .iter_mut()
        .map(|s| &mut **s)
        .zip(host.chunks_exact(vocab.max(1)))
        .collect();
    crate::sampling::sample_batch(&mut jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(allowed: Option<&[u32]>) -> SlotSpec<u64> {
        SlotSpec {
            key: 0,
            start: 0,
            tokens: 1,
            sample: true,
            sampling: None,
            cache_salt: None,
            prompt_logprobs: None,
            allowed: allowed.map(Arc::from),
        }
    }

    #[test]
    fn a_mask_leaves_its_rows_allowed_ids_and_no_other_row() {
        let vocab = 40;
        let rows: Vec<f32> = (0..2 * vocab).map(|i| (i % 7) as f32).collect();
        let logits =
            Tensor::from_vec(rows.clone(), (2, vocab), &candle_core::Device::Cpu).expect("logits");
        // Row 1 may take ids 3 and 35 (word 1, bit 3); a mask shorter than the vocabulary
        // allows nothing past it.
        let mask = [1u32 << 3, 1 << 3];
        let slots = [slot(None), slot(Some(&mask))];
        let out: Vec<Vec<f32>> = masked(logits, slots.iter())
            .expect("masked")
            .to_vec2()
            .expect("rows");
        assert_eq!(out[0], rows[..vocab]);
        for (id, &v) in out[1].iter().enumerate() {
            if id == 3 || id == 35 {
                assert_eq!(v, rows[vocab + id]);
            } else {
                assert_eq!(v, f32::NEG_INFINITY, "id {id}");
            }
        }
        let picked = crate::sampling::argmax(&out[1]);
        assert!(picked == 3 || picked == 35);
    }
}
