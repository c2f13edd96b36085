//! The sequences of one step loop, without I/O: what the next step carries (through the
//! [`Scheduler`]), and what each outcome of a step does to the sequences. The frontend drives
//! one per gate over gRPC; [`LocalServer`](super::LocalServer) drives one over a
//! [`StepRunner`](super::StepRunner) in this process. `T` is the driver's own per-sequence
//! state (a client stream and spans, or an output being collected).

use std::collections::HashMap;

use crate::error::EngineError;
use crate::generate::{FinishReason, GenerationRequest};
use crate::logprobs::PromptLogprob;

use super::decoder::SequenceDecoder;
use super::runner::{PromptAsk, SeqOutput, SlotSpec};
use super::scheduler::{Entry, KvState, Limits, Plan, Scheduler, Slot};

/// A sequence in a step loop.
pub struct Sequence<T> {
    pub id: u64,
    pub req: GenerationRequest,
    /// Tokens generated so far (non-empty when the sequence resumes after a failover: it is
    /// prefilled again from prompt + generated and continues its random stream).
    pub generated: Vec<u32>,
    pub decoder: SequenceDecoder,
    /// The prefix cache's salt (a digest of the tenant's and the request's salts; `None`:
    /// unsalted): only sequences with the same salt share cached KV blocks.
    pub cache_salt: Option<[u8; 32]>,
    /// Prompt tokens the runner took from its prefix cache instead of computing them, in the
    /// sequence's latest prefill (reported in the request's usage).
    pub cached_tokens: usize,
    /// Prompt logprobs gathered from the prefill chunks so far, when the request asks for them;
    /// handed to the sequence's first token ([`Token::prompt_logprobs`]).
    pub prompt_logprobs: Vec<PromptLogprob>,
    pub payload: T,
}

impl<T> Sequence<T> {
    /// Token `i` of the sequence (prompt, then generated).
    pub fn token(&self, i: usize) -> u32 {
        let p = self.req.prompt_ids.len();
        if i < p {
            self.req.prompt_ids[i]
        } else {
            self.generated[i - p]
        }
    }

    /// Tokens so far (prompt and generated).
    pub fn len(&self) -> usize {
        self.req.prompt_ids.len() + self.generated.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the runner computes for this slot's prompt logprobs: asked only while the first
    /// token has not been generated (a sequence prefilled again after preemption or a failover
    /// already delivered them), for the rows followed by a prompt token.
    fn prompt_ask(&self, start: usize, len: usize) -> Option<PromptAsk> {
        let top = self.req.prompt_logprobs?;
        if !self.generated.is_empty() {
            return None;
        }
        let prompt = &self.req.prompt_ids;
        let end = (start + len + 1).min(prompt.len());
        Some(PromptAsk {
            top,
            targets: prompt
                .get(start + 1..end)
                .map(<[u32]>::to_vec)
                .unwrap_or_default(),
        })
    }
}

/// What the next step carries.
#[derive(Debug, Clone, Default)]
pub struct Step {
    /// The scheduler's plan (slots, counts, preempted and rejected ids).
    pub plan: Plan,
    /// The slots as the runner takes them, in the plan's order.
    pub slots: Vec<SlotSpec<u64>>,
    /// The slots' token ids, in order.
    pub ids: Vec<u32>,
    /// Sequences whose KV the runner frees before the step.
    pub release: Vec<u64>,
}

/// A token for its client.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub token: u32,
    pub logprob: f32,
    /// The most likely ids at this position and their logprobs, when the request asked.
    pub top: Vec<(u32, f32)>,
    /// Text completed by this token (includes the held-back rest when it finishes).
    pub text: String,
    /// With a sequence's first token, its prompt logprobs when the request asked; else empty.
    pub prompt_logprobs: Vec<PromptLogprob>,
    pub finish: Option<FinishReason>,
}

/// The sequences of a step loop and its scheduler.
pub struct Batch<T> {
    seqs: HashMap<u64, Sequence<T>>,
    sched: Scheduler,
    release: Vec<u64>,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Batch {
            seqs: HashMap::new(),
            sched: Scheduler::default(),
            release: Vec::new(),
        }
    }
}

impl<T> Batch<T> {
    /// Queues a sequence (first come, first served).
    pub fn admit(&mut self, seq: Sequence<T>) {
        self.sched.waiting.push_back(Entry {
            id: seq.id,
            len: seq.len(),
            gate_pos: 0,
            skipped: 0,
            cached: 0,
        });
        self.seqs.insert(seq.id, seq);
    }

    /// No sequence to run and no KV to release.
    pub fn is_idle(&self) -> bool {
        self.sched.is_idle() && self.release.is_empty()
    }

    /// Sequences held (running or waiting).
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Sequences running and waiting, as the scheduler counts them.
    pub fn counts(&self) -> (usize, usize) {
        (self.sched.running.len(), self.sched.waiting.len())
    }

    pub fn get(&self, id: u64) -> Option<&Sequence<T>> {
        self.seqs.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Sequence<T>> {
        self.seqs.get_mut(&id)
    }

    /// The runner's KV capacity as last reported (`None` until known).
    pub fn kv(&self) -> Option<KvState> {
        self.sched.kv
    }

    pub fn set_kv(&mut self, kv: KvState) {
        self.sched.kv = Some(kv);
    }

    /// Removes every sequence `gone` says yes to; their KV is released in the next step.
    pub fn remove_where(&mut self, mut gone: impl FnMut(&Sequence<T>) -> bool) -> Vec<Sequence<T>> {
        let ids: Vec<u64> = self
            .seqs
            .values()
            .filter(|s| gone(s))
            .map(|s| s.id)
            .collect();
        ids.into_iter().filter_map(|id| self.take(id)).collect()
    }

    fn take(&mut self, id: u64) -> Option<Sequence<T>> {
        self.sched.remove(id);
        self.release.push(id);
        self.seqs.remove(&id)
    }

    /// Sets, for every waiting sequence that starts from scratch, how many of its first tokens
    /// the runner is expected to take from its prefix cache (`expect`'s estimate, cut to whole
    /// blocks and short of the last token): their prefill chunks are budgeted by the rows they
    /// compute ([`Entry::cached`]). A sequence that asks for prompt logprobs expects none (the
    /// runner computes its every row). Does nothing before the runner's KV numbers are known.
    pub fn expect_cached(&mut self, mut expect: impl FnMut(&Sequence<T>) -> usize) {
        let Some(bt) = self.sched.kv.map(|k| k.block_tokens.max(1)) else {
            return;
        };
        for e in self.sched.waiting.iter_mut().filter(|e| e.gate_pos == 0) {
            if let Some(s) = self.seqs.get(&e.id) {
                let n = match s.req.prompt_logprobs {
                    Some(_) => 0,
                    None => expect(s),
                };
                e.cached = n.min(e.len.saturating_sub(1)) / bt * bt;
            }
        }
    }

    /// Plans the next step. Preempted sequences' KV is released in it (they are prefilled again
    /// later); sequences that can never fit are removed and returned.
    pub fn next_step(&mut self, limits: Limits) -> (Step, Vec<Sequence<T>>) {
        let plan = self.sched.plan(limits);
        self.release.extend(&plan.preempted);
        let rejected = plan
            .rejected
            .iter()
            .filter_map(|&id| self.take(id))
            .collect();
        let mut step = Step {
            slots: Vec::with_capacity(plan.slots.len()),
            ids: Vec::with_capacity(plan.decode + plan.prefill_tokens),
            release: std::mem::take(&mut self.release),
            plan: Plan::default(),
        };
        for slot in &plan.slots {
            let Some(s) = self.seqs.get_mut(&slot.id) else {
                continue;
            };
            if slot.start == 0 {
                // A (re)prefill from scratch: its cache hits are counted afresh, and prompt
                // logprobs not yet delivered are computed again.
                s.cached_tokens = 0;
                s.prompt_logprobs.clear();
            }
            step.ids
                .extend((slot.start..slot.start + slot.len).map(|i| s.token(i)));
            step.slots.push(SlotSpec {
                key: slot.id,
                start: slot.start,
                tokens: slot.len,
                sample: slot.sample,
                // Read by the runner only on a sequence's first step there.
                sampling: (slot.start == 0).then(|| s.decoder.sampler_start(&s.req, &s.generated)),
                cache_salt: s.cache_salt,
                prompt_logprobs: s.prompt_ask(slot.start, slot.len),
                allowed: slot.sample.then(|| s.decoder.allowed()).flatten(),
            });
        }
        step.plan = plan;
        (step, rejected)
    }

    /// The runner took `hits` (sequence, tokens) of `step`'s rows from its prefix cache: they
    /// count as the sequences' cached prompt tokens. Call before [`on_tokens`](Self::on_tokens),
    /// which may finish them. A sequence whose slot took fewer rows than expected
    /// ([`Slot::cached`](super::Slot::cached)) expects nothing more from the cache (the blocks
    /// after a miss cannot be found either: a block is named by its whole prefix); the rows it
    /// computed instead made that step run over budget once.
    pub fn on_prefix_hits(&mut self, step: &Step, hits: &[(u64, usize)]) {
        for &(id, tokens) in hits {
            if let Some(s) = self.seqs.get_mut(&id) {
                s.cached_tokens = (s.cached_tokens + tokens).min(s.req.prompt_ids.len());
            }
        }
        for slot in step.plan.slots.iter().filter(|x| x.cached > 0) {
            let got = hits.iter().find(|h| h.0 == slot.id).map_or(0, |h| h.1);
            if got >= slot.cached {
                continue;
            }
            if let Some(e) = self.sched.running.iter_mut().find(|e| e.id == slot.id) {
                e.cached = e.cached.min(slot.start + got);
            }
        }
    }

    /// The step after `prev` in a run of decode steps (the gate runs several steps of the same
    /// sequences for one request, feeding each the tokens the one before sampled): the same
    /// slots one position on, one row each, sampling; no ids (the runner has them), nothing
    /// released. The planner is not asked: a run holds its sequences as they were, and
    /// [`on_tokens`](Self::on_tokens) skips those that finished meanwhile (their KV is released
    /// with the next step sent).
    pub fn continue_step(prev: &Step) -> Step {
        let slots: Vec<Slot> = prev
            .plan
            .slots
            .iter()
            .map(|s| Slot {
                id: s.id,
                start: s.start + s.len,
                len: 1,
                sample: true,
                cached: 0,
            })
            .collect();
        Step {
            slots: prev
                .slots
                .iter()
                .map(|s| SlotSpec {
                    key: s.key,
                    start: s.start + s.tokens,
                    tokens: 1,
                    sample: true,
                    sampling: None,
                    cache_salt: s.cache_salt,
                    prompt_logprobs: None,
                    allowed: None,
                })
                .collect(),
            ids: Vec::new(),
            release: Vec::new(),
            plan: Plan {
                decode: slots.len(),
                slots,
                ..Plan::default()
            },
        }
    }

    /// The runner computed prompt logprobs for (sequence, its rows' logprobs): they are kept
    /// until the sequence's first token. Call before [`on_tokens`](Self::on_tokens).
    pub fn on_prompt_logprobs(&mut self, lps: Vec<(u64, Vec<PromptLogprob>)>) {
        for (id, lp) in lps {
            if let Some(s) = self.seqs.get_mut(&id) {
                s.prompt_logprobs.extend(lp);
            }
        }
    }

    /// The step ran: records what the runner now holds, and hands each picked token to its
    /// sequence's decoder and then to `deliver`. Returns the sequences that finished (removed;
    /// their KV is released in the next step), with why, or the decoder's error.
    pub fn on_tokens(
        &mut self,
        step: &Step,
        outputs: &[SeqOutput<u64>],
        mut deliver: impl FnMut(&mut Sequence<T>, &Token),
    ) -> Vec<(Sequence<T>, Result<FinishReason, EngineError>)> {
        let by_id: HashMap<u64, &SeqOutput<u64>> = outputs.iter().map(|o| (o.key, o)).collect();
        let mut done = Vec::new();
        for slot in &step.plan.slots {
            let out = by_id.get(&slot.id).filter(|_| slot.sample);
            self.sched.advance(slot, out.is_some());
            let (Some(o), Some(s)) = (out, self.seqs.get_mut(&slot.id)) else {
                continue;
            };
            s.generated.push(o.token);
            match s.decoder.push(o.token) {
                Ok(e) => {
                    let token = Token {
                        token: o.token,
                        logprob: o.logprob,
                        top: o.top.clone(),
                        text: e.text,
                        prompt_logprobs: std::mem::take(&mut s.prompt_logprobs),
                        finish: e.finish,
                    };
                    deliver(s, &token);
                    if let Some(reason) = e.finish
                        && let Some(s) = self.take(slot.id)
                    {
                        done.push((s, Ok(reason)));
                    }
                }
                Err(err) => {
                    if let Some(s) = self.take(slot.id) {
                        done.push((s, Err(err)));
                    }
                }
            }
        }
        done
    }

    /// The runner had no KV room for the step (another client shares it): nothing ran; plan
    /// again with its numbers (preemption makes room, nothing fails). Sequences the step would
    /// have started go back to the head of the queue.
    pub fn on_kv_full(&mut self, step: &Step, kv: KvState) {
        for slot in &step.plan.slots {
            if slot.start == 0 {
                self.sched.unadmit(slot.id);
            }
        }
        self.sched.kv = Some(kv);
    }

    /// The step failed for its sequences (not for the runner as a whole): they are removed and
    /// returned, their KV released in the next step; the others carry on.
    pub fn on_step_failed(&mut self, step: &Step) -> Vec<Sequence<T>> {
        step.plan
            .slots
            .iter()
            .filter_map(|slot| self.take(slot.id))
            .collect()
    }

    /// The runner is gone, and the KV it held: every sequence is removed and returned, to be
    /// placed elsewhere and prefilled again from its tokens so far.
    pub fn on_lost(&mut self) -> Vec<Sequence<T>> {
        let all: Vec<Sequence<T>> = self.seqs.drain().map(|(_, s)| s).collect();
        for s in &all {
            self.sched.remove(s.id);
        }
        self.release.clear();
        all
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn seq(id: u64, prompt: usize) -> Sequence<()> {
        let req = GenerationRequest {
            prompt_ids: (0..prompt as u32).collect(),
            max_new_tokens: 4,
            ..Default::default()
        };
        let decoder = SequenceDecoder::new(&req, None, Arc::from(vec![]), 4096).expect("decoder");
        Sequence {
            id,
            req,
            generated: Vec::new(),
            decoder,
            cache_salt: None,
            cached_tokens: 0,
            prompt_logprobs: Vec::new(),
            payload: (),
        }
    }

    /// A budget of 64 tokens, 8 running, and 100 free KV blocks of 16 tokens.
    fn small_batch() -> (Limits, Batch<()>) {
        let limits = Limits {
            token_budget: 64,
            max_running: 8,
            max_skips: 4,
        };
        let mut batch = Batch::default();
        batch.set_kv(KvState {
            free_blocks: 100,
            total_blocks: 100,
            block_tokens: 16,
        });
        (limits, batch)
    }

    #[test]
    fn a_run_continues_its_decodes_one_position_on_and_skips_what_finished() {
        let (limits, mut batch) = small_batch();
        // Sequence 2 may make 2 tokens, sequence 1 four (`seq`).
        batch.admit(seq(1, 5));
        let mut two = seq(2, 3);
        two.req.max_new_tokens = 2;
        two.decoder =
            SequenceDecoder::new(&two.req, None, Arc::from(vec![]), 4096).expect("decoder");
        batch.admit(two);
        let (prefill, _) = batch.next_step(limits);
        let out = |ids: &[u64], token| -> Vec<SeqOutput<u64>> {
            ids.iter()
                .map(|&key| SeqOutput {
                    key,
                    token,
                    logprob: 0.0,
                    top: Vec::new(),
                })
                .collect()
        };
        assert!(
            batch
                .on_tokens(&prefill, &out(&[1, 2], 7), |_, _| {})
                .is_empty()
        );
        let (decode, _) = batch.next_step(limits);
        let starts = |st: &Step| -> Vec<(u64, usize, usize)> {
            st.plan
                .slots
                .iter()
                .map(|x| (x.id, x.start, x.len))
                .collect()
        };
        assert_eq!(starts(&decode), vec![(1, 5, 1), (2, 3, 1)]);
        let run = Batch::<()>::continue_step(&decode);
        assert_eq!(starts(&run), vec![(1, 6, 1), (2, 4, 1)]);
        assert!(run.ids.is_empty() && run.release.is_empty());
        assert!(
            run.slots
                .iter()
                .all(|x| x.tokens == 1 && x.sample && x.sampling.is_none())
        );
        assert_eq!(
            run.slots
                .iter()
                .map(|x| (x.key, x.start))
                .collect::<Vec<_>>(),
            vec![(1, 6), (2, 4)]
        );
        // Sequence 2 finishes with the decode step's token; the run's next step still holds
        // it (the gate runs it), and its token there is not delivered.
        let done = batch.on_tokens(&decode, &out(&[1, 2], 8), |_, _| {});
        assert_eq!(done.iter().map(|(s, _)| s.id).collect::<Vec<_>>(), vec![2]);
        let mut delivered = Vec::new();
        batch.on_tokens(&run, &out(&[1, 2], 9), |s, t| {
            delivered.push((s.id, t.token))
        });
        assert_eq!(delivered, vec![(1, 9)]);
        assert_eq!(
            batch.get(1).map(|s| s.generated.clone()),
            Some(vec![7, 8, 9])
        );
        // The next step sent releases the finished sequence and continues the other.
        let (next, _) = batch.next_step(limits);
        assert_eq!(next.release, vec![2]);
        assert_eq!(starts(&next), vec![(1, 7, 1)]);
    }

    #[test]
    fn expected_cache_hits_shape_the_chunks_and_a_miss_expects_no_more() {
        let (limits, mut batch) = small_batch();
        batch.admit(seq(1, 500));
        // The estimate is cut to whole blocks, short of the last token.
        batch.expect_cached(|_| 330);
        let (step, _) = batch.next_step(limits);
        let slot = step.plan.slots[0];
        assert_eq!((slot.len, slot.cached), (384, 320));
        assert_eq!(step.ids.len(), 384, "cached rows are sent, with their ids");
        // The runner took only 5 blocks: the 15 blocks expected after them were computed.
        batch.on_prefix_hits(&step, &[(1, 80)]);
        assert_eq!(batch.get_mut(1).map(|s| s.cached_tokens), Some(80));
        batch.on_tokens(&step, &[], |_, _| {});
        // The next chunk expects nothing from the cache: the budget's size.
        let (step, _) = batch.next_step(limits);
        let slot = step.plan.slots[0];
        assert_eq!((slot.start, slot.len, slot.cached), (384, 64, 0));
    }
}
