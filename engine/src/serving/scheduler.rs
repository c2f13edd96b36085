//! Iteration-level scheduling for one gate: which tokens of which sequences go into the next
//! step. Pure logic (no I/O), so it is tested on its own.
//!
//! Every sequence has tokens the gate has not seen yet (`pending`): its whole prompt when new
//! (or after the gate lost it), one token when decoding. A step spends at most `token_budget`
//! tokens:
//! 1. every decoding sequence gets its one token first, so running decodes keep flowing;
//! 2. sequences part-way through their prompt continue, first come first served, each taking
//!    at most what is left of the budget (chunked prefill);
//! 3. waiting sequences are admitted in arrival order while there is budget and fewer than
//!    `max_running` sequences run.
//!
//! A sequence samples a token only in the step that brings it fully up to date. A prompt chunk
//! that does not finish its prompt ends on a KV block boundary when it can, so the gate's prefix
//! cache, which reuses whole blocks at a chunk's start, can serve the next chunk too.
//!
//! KV memory: the gate reports its free KV blocks after every step. A step only uses blocks
//! that are free. A waiting sequence is admitted only when its whole pending prompt fits; when
//! it does not, later (smaller) arrivals may pass it at most `max_skips` times before admission
//! waits for it. When the running decodes themselves need more blocks than are free, the
//! newest running sequence is preempted: the gate frees its KV and it goes back to the head of
//! the queue, to be prefilled again from its tokens, so nothing fails. A sequence that could
//! never fit in the gate's whole pool is rejected.

use std::collections::VecDeque;

/// `--step-token-budget` when not given, for a gate on the CPU: measured best for a long
/// prompt's time to first token and the running decodes' inter-token p99 (docs/BENCHMARKS.md).
pub const CPU_STEP_TOKEN_BUDGET: usize = 512;
/// The same for a GPU gate, whose step time grows slowly with its tokens: a 2,048-token prompt
/// is prefilled in one step.
pub const GPU_STEP_TOKEN_BUDGET: usize = 4096;

/// Scheduler limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most tokens (prefill + decode) in one step.
    pub token_budget: usize,
    /// Most sequences running on the gate at once.
    pub max_running: usize,
    /// How many times a waiting sequence may be passed over by later arrivals.
    pub max_skips: u32,
}

/// What the scheduler knows of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: u64,
    /// Times later arrivals were admitted before this one.
    pub skipped: u32,
    /// Tokens the sequence consists of so far (prompt, then generated).
    pub len: usize,
    /// Tokens whose KV the gate holds.
    pub gate_pos: usize,
}

impl Entry {
    pub fn pending(&self) -> usize {
        self.len - self.gate_pos
    }
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub id: u64,
    /// Position of the first token sent.
    pub start: usize,
    /// Tokens sent.
    pub len: usize,
    /// Whether this step brings the sequence up to date (so it samples).
    pub sample: bool,
}

/// The composition of one step, as logged and checked by tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub slots: Vec<Slot>,
    /// Sequences in decode (one token each).
    pub decode: usize,
    /// Prompt tokens (prefill chunks) in this step.
    pub prefill_tokens: usize,
    /// Sequences preempted to make room (their KV must be released on the gate).
    pub preempted: Vec<u64>,
    /// Sequences that can never fit in the gate's KV pool.
    pub rejected: Vec<u64>,
}

/// The gate's KV capacity as last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvState {
    pub free_blocks: usize,
    pub total_blocks: usize,
    pub block_tokens: usize,
}

impl KvState {
    fn blocks(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens.max(1))
    }

    /// Blocks a sequence at `gate_pos` needs to add `n` tokens.
    fn need(&self, gate_pos: usize, n: usize) -> usize {
        self.blocks(gate_pos + n) - self.blocks(gate_pos)
    }

    /// `n` tokens from `gate_pos`, cut back so that a chunk which does not finish the prompt
    /// (`n < pending`) ends on a block boundary, unless that leaves nothing.
    fn chunk(&self, gate_pos: usize, n: usize, pending: usize) -> usize {
        if n >= pending {
            return n;
        }
        let end = gate_pos + n;
        let aligned = end - end % self.block_tokens.max(1);
        if aligned > gate_pos {
            aligned - gate_pos
        } else {
            n
        }
    }

    /// Most tokens a sequence at `gate_pos` can add with `free` blocks.
    fn room(&self, gate_pos: usize, free: usize) -> usize {
        self.blocks(gate_pos) * self.block_tokens - gate_pos + free * self.block_tokens
    }
}

#[derive(Debug, Default)]
pub struct Scheduler {
    /// Sequences on the gate (or being prefilled), in admission order.
    pub running: Vec<Entry>,
    /// Sequences not yet admitted, in arrival order.
    pub waiting: VecDeque<Entry>,
    /// The gate's KV capacity; `None` until the gate has reported it.
    pub kv: Option<KvState>,
}

impl Scheduler {
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Plans the next step and admits waiting sequences it includes.
    pub fn plan(&mut self, limits: Limits) -> Plan {
        let mut budget = limits.token_budget;
        let mut plan = Plan::default();
        let kv = self.kv;
        let mut free = kv.map_or(usize::MAX, |k| k.free_blocks);
        if let Some(k) = kv {
            // Anything that could never fit in the whole pool is rejected, not queued forever.
            let too_big = |e: &Entry| k.blocks(e.len + 1) > k.total_blocks;
            plan.rejected.extend(
                self.waiting
                    .iter()
                    .chain(&self.running)
                    .filter(|e| too_big(e))
                    .map(|e| e.id),
            );
            self.waiting.retain(|e| !too_big(e));
            self.running.retain(|e| !too_big(e));
            // Decodes first: preempt the newest running sequences until they all fit.
            loop {
                let need: usize = self
                    .running
                    .iter()
                    .filter(|e| e.pending() == 1)
                    .map(|e| k.need(e.gate_pos, 1))
                    .sum();
                if need <= free || self.running.len() <= 1 {
                    break;
                }
                let Some(mut e) = self.running.pop() else {
                    break;
                };
                free += k.blocks(e.gate_pos);
                e.gate_pos = 0;
                plan.preempted.push(e.id);
                self.waiting.push_front(e);
            }
        }
        for e in &self.running {
            if e.pending() == 1 && budget > 0 {
                let need = kv.map_or(0, |k| k.need(e.gate_pos, 1));
                if need > free {
                    continue;
                }
                free -= need;
                plan.slots.push(Slot {
                    id: e.id,
                    start: e.gate_pos,
                    len: 1,
                    sample: true,
                });
                plan.decode += 1;
                budget -= 1;
            }
        }
        for e in &self.running {
            if e.pending() > 1 && budget > 0 {
                let room = kv.map_or(usize::MAX, |k| k.room(e.gate_pos, free));
                let n = e.pending().min(budget).min(room);
                let n = kv.map_or(n, |k| k.chunk(e.gate_pos, n, e.pending()));
                if n == 0 {
                    continue;
                }
                free -= kv.map_or(0, |k| k.need(e.gate_pos, n));
                plan.slots.push(Slot {
                    id: e.id,
                    start: e.gate_pos,
                    len: n,
                    sample: n == e.pending(),
                });
                plan.prefill_tokens += n;
                budget -= n;
            }
        }
        let mut i = 0;
        while budget > 0 && self.running.len() < limits.max_running && i < self.waiting.len() {
            let fits = kv.is_none_or(|k| {
                k.need(self.waiting[i].gate_pos, self.waiting[i].pending()) <= free
            });
            if !fits {
                // Let later arrivals pass this one only a bounded number of times.
                if self.waiting[i].skipped >= limits.max_skips {
                    break;
                }
                i += 1;
                continue;
            }
            let Some(e) = self.waiting.remove(i) else {
                break;
            };
            for passed in self.waiting.iter_mut().take(i) {
                passed.skipped += 1;
            }
            let n = e.pending().min(budget);
            let n = kv.map_or(n, |k| k.chunk(e.gate_pos, n, e.pending()));
            free -= kv.map_or(0, |k| k.need(e.gate_pos, n));
            plan.slots.push(Slot {
                id: e.id,
                start: e.gate_pos,
                len: n,
                sample: n == e.pending(),
            });
            plan.prefill_tokens += n;
            budget -= n;
            self.running.push(e);
        }
        plan
    }

    /// Records that the gate processed a slot (and, if it sampled, that a token was added).
    pub fn advance(&mut self, slot: &Slot, sampled: bool) {
        if let Some(e) = self.running.iter_mut().find(|e| e.id == slot.id) {
            e.gate_pos = slot.start + slot.len;
            if sampled {
                e.len += 1;
            }
        }
    }

    /// Puts a just-admitted sequence back at the head of the queue (its first step failed).
    pub fn unadmit(&mut self, id: u64) {
        if let Some(i) = self.running.iter().position(|e| e.id == id) {
            let mut e = self.running.remove(i);
            e.gate_pos = 0;
            self.waiting.push_front(e);
        }
    }

    /// Removes a sequence wherever it is. The blocks it holds count as free from the next plan
    /// on: the step that plan makes releases them before it runs.
    pub fn remove(&mut self, id: u64) {
        if let Some(i) = self.running.iter().position(|e| e.id == id) {
            let e = self.running.remove(i);
            if let Some(k) = self.kv.as_mut() {
                k.free_blocks = (k.free_blocks + k.blocks(e.gate_pos)).min(k.total_blocks);
            }
        }
        self.waiting.retain(|e| e.id != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, len: usize, gate_pos: usize) -> Entry {
        Entry {
            id,
            len,
            gate_pos,
            skipped: 0,
        }
    }

    fn limits(token_budget: usize, max_running: usize) -> Limits {
        Limits {
            token_budget,
            max_running,
            max_skips: 4,
        }
    }

    #[test]
    fn decodes_that_do_not_fit_preempt_the_newest_sequence() {
        let mut s = Scheduler::default();
        // Three sequences at a block boundary (32 tokens = 2 blocks each): each decode needs a
        // new block, and only one is free.
        for id in 0..3 {
            s.running.push(entry(id, 33, 32));
        }
        s.kv = Some(KvState {
            free_blocks: 1,
            total_blocks: 7,
            block_tokens: 16,
        });
        let plan = s.plan(limits(100, 8));
        // Freeing the newest (2 blocks) leaves 3 free: enough for the other two decodes.
        assert_eq!(plan.preempted, vec![2]);
        assert_eq!(plan.decode, 2);
        assert_eq!(s.waiting.front().map(|e| (e.id, e.gate_pos)), Some((2, 0)));
    }

    #[test]
    fn a_sequence_that_cannot_fit_waits_and_smaller_ones_pass_it_a_bounded_number_of_times() {
        let mut s = Scheduler {
            kv: Some(KvState {
                free_blocks: 2,
                total_blocks: 10,
                block_tokens: 16,
            }),
            ..Default::default()
        };
        s.waiting.push_back(entry(1, 100, 0)); // needs 7 blocks
        for id in 2..10 {
            s.waiting.push_back(entry(id, 3, 0)); // 1 block each
        }
        let mut admitted = Vec::new();
        for _ in 0..8 {
            let plan = s.plan(limits(1000, 100));
            admitted.extend(plan.slots.iter().filter(|x| x.start == 0).map(|x| x.id));
            for slot in &plan.slots {
                s.advance(slot, false);
            }
            // The gate frees nothing (the admitted ones keep running); report what is left.
            let used: usize = s.running.iter().map(|e| e.gate_pos.div_ceil(16)).sum();
            s.kv = Some(KvState {
                free_blocks: 2usize.saturating_sub(used),
                total_blocks: 10,
                block_tokens: 16,
            });
        }
        assert!(!admitted.contains(&1));
        assert!(
            admitted.len() <= 4,
            "passed over more than max_skips times: {admitted:?}"
        );
    }

    #[test]
    fn a_sequence_larger_than_the_whole_pool_is_rejected() {
        let mut s = Scheduler {
            kv: Some(KvState {
                free_blocks: 4,
                total_blocks: 4,
                block_tokens: 16,
            }),
            ..Default::default()
        };
        s.waiting.push_back(entry(1, 200, 0));
        let plan = s.plan(limits(1000, 10));
        assert_eq!(plan.rejected, vec![1]);
        assert!(s.is_idle());
    }

    #[test]
    fn decodes_go_first_and_a_long_prompt_is_chunked_by_the_budget() {
        let mut s = Scheduler::default();
        for id in 0..8 {
            s.running.push(entry(id, 11, 10)); // decoding
        }
        s.waiting.push_back(entry(100, 2000, 0));
        let limits = limits(256, 64);
        let mut chunks = 0;
        let mut sent = 0;
        loop {
            let plan = s.plan(limits);
            assert_eq!(plan.decode, 8, "every step keeps all 8 decodes");
            assert!(plan.prefill_tokens <= 248, "prefill bounded by one chunk");
            for slot in plan.slots.clone() {
                let sampled = slot.sample;
                s.advance(&slot, sampled);
                if slot.id == 100 {
                    chunks += 1;
                    sent += slot.len;
                }
            }
            if sent == 2000 {
                break;
            }
        }
        assert_eq!(chunks, 2000usize.div_ceil(248));
    }

    #[test]
    fn admission_is_first_come_first_served_within_max_running() {
        let mut s = Scheduler::default();
        for id in 0..5 {
            s.waiting.push_back(entry(id, 3, 0));
        }
        let plan = s.plan(limits(100, 3));
        let ids: Vec<u64> = plan.slots.iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        assert!(plan.slots.iter().all(|x| x.sample && x.len == 3));
        assert_eq!(s.waiting.len(), 2);
    }

    #[test]
    fn a_partial_chunk_does_not_sample() {
        let mut s = Scheduler::default();
        s.waiting.push_back(entry(1, 10, 0));
        let plan = s.plan(limits(4, 8));
        assert_eq!(
            plan.slots,
            vec![Slot {
                id: 1,
                start: 0,
                len: 4,
                sample: false
            }]
        );
        s.advance(&plan.slots[0], false);
        let plan = s.plan(limits(100, 8));
        assert_eq!(
            plan.slots,
            vec![Slot {
                id: 1,
                start: 4,
                len: 6,
                sample: true
            }]
        );
    }

    #[test]
    fn prompt_chunks_end_on_block_boundaries_when_the_gate_reports_its_blocks() {
        let mut s = Scheduler {
            kv: Some(KvState {
                free_blocks: 100,
                total_blocks: 100,
                block_tokens: 16,
            }),
            ..Scheduler::default()
        };
        s.running.push(entry(1, 11, 10)); // one decode
        s.waiting.push_back(entry(2, 100, 0));
        // 40 of budget: 1 decode, then 39 prompt tokens cut back to 32 (two whole blocks).
        let plan = s.plan(limits(40, 4));
        let chunk = plan.slots.iter().find(|x| x.id == 2).copied();
        assert_eq!(
            chunk.map(|c| (c.start, c.len, c.sample)),
            Some((0, 32, false))
        );
        for slot in &plan.slots {
            s.advance(slot, slot.sample);
        }
        // A budget under one block still makes progress.
        let plan = s.plan(limits(10, 4));
        let chunk = plan.slots.iter().find(|x| x.id == 2).copied();
        assert_eq!(chunk.map(|c| (c.start, c.len)), Some((32, 9)));
        for slot in &plan.slots {
            s.advance(slot, slot.sample);
        }
        // The last chunk is whatever is left.
        let plan = s.plan(limits(200, 4));
        let chunk = plan.slots.iter().find(|x| x.id == 2).copied();
        assert_eq!(
            chunk.map(|c| (c.start, c.len, c.sample)),
            Some((41, 59, true))
        );
    }

    #[test]
    fn a_removed_sequence_frees_its_blocks_for_the_next_plan() {
        // A pool of 2 blocks of 16 tokens: one running sequence holds both; the next one can be
        // admitted in the very step that releases the first, not a step later.
        let mut s = Scheduler {
            kv: Some(KvState {
                free_blocks: 0,
                total_blocks: 2,
                block_tokens: 16,
            }),
            ..Scheduler::default()
        };
        s.running.push(entry(1, 32, 31));
        s.waiting.push_back(entry(2, 20, 0));
        s.remove(1);
        let plan = s.plan(limits(64, 4));
        assert_eq!(plan.slots.len(), 1);
        assert_eq!(plan.slots[0].id, 2);
        assert_eq!(s.kv.map(|k| k.free_blocks), Some(2));
    }
}
