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
//! Prefix cache: a sequence's entry may say how many of its first tokens the runner is
//! expected to take from its prefix cache (`Entry::cached`, a whole number of blocks; the
//! caller's estimate). Those rows are sent (the runner needs their ids to find the blocks) but
//! not charged against the token budget, since they are not computed: a chunk from a
//! block-aligned position carries up to the budget's worth of computed rows after the cached
//! ones (never counting its last row as cached: the runner always computes it for its logits).
//! A wrong estimate costs one step over budget; the caller lowers it from what the runner
//! reports ([`Slot::cached`] against what came back).
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
    /// Of the sequence's first tokens, how many the runner is expected to take from its prefix
    /// cache (a whole number of blocks; 0: none expected). Not charged against the budget.
    pub cached: usize,
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
    /// Of `len`, the rows expected from the runner's prefix cache (not charged against the
    /// budget).
    pub cached: usize,
}

/// The composition of one step, as logged and checked by tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub slots: Vec<Slot>,
    /// Sequences in decode (one token each).
    pub decode: usize,
    /// Prompt tokens (prefill chunks) in this step, cached ones included.
    pub prefill_tokens: usize,
    /// Of those, the rows expected from the runner's prefix cache (not charged).
    pub cached_tokens: usize,
    /// Sequences preempted to make room (their KV must be released on the gate).
    pub preempted: Vec<u64>,
    /// Sequences that can never fit in the gate's KV pool.
    pub rejected: Vec<u64>,
}

impl Plan {
    /// Adds a prefill chunk of `n` tokens of `e` (`cached` of them expected from the prefix
    /// cache; the chunk samples when it ends the prompt). Returns the rows it computes, which
    /// is what the chunk costs of the step's token budget.
    fn prefill_chunk(&mut self, e: &Entry, n: usize, cached: usize) -> usize {
        self.slots.push(Slot {
            id: e.id,
            start: e.gate_pos,
            len: n,
            sample: n == e.pending(),
            cached,
        });
        self.prefill_tokens += n;
        self.cached_tokens += cached;
        n - cached
    }
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

    /// Rows of a chunk of `n` tokens from `gate_pos` that the runner is expected to take from
    /// its prefix cache, for a sequence whose first `cached` tokens are expected there: whole
    /// blocks from a block-aligned start, never the chunk's last row.
    fn cached_rows(&self, gate_pos: usize, n: usize, cached: usize) -> usize {
        let bt = self.block_tokens.max(1);
        if gate_pos >= cached || !gate_pos.is_multiple_of(bt) || n == 0 {
            return 0;
        }
        (cached - gate_pos).min(n - 1) / bt * bt
    }

    /// `n` tokens from `gate_pos`, cut back so that a chunk which does not finish the prompt
    /// (`n < pending`) ends on a block boundary, unless that leaves nothing or ends within the
    /// `cached` rows expected from the prefix cache (then the cut would only move a cached
    /// block's rows into the computed last one).
    fn chunk(&self, gate_pos: usize, n: usize, pending: usize, cached: usize) -> usize {
        if n >= pending {
            return n;
        }
        let end = gate_pos + n;
        let aligned = end - end % self.block_tokens.max(1);
        if aligned > gate_pos + cached {
            aligned - gate_pos
        } else {
            n
        }
    }

    /// A prefill chunk for `e` within `budget` computed rows and `room` tokens of KV: (tokens
    /// sent, rows of them expected from the prefix cache).
    fn prefill(&self, e: &Entry, budget: usize, room: usize) -> (usize, usize) {
        let ahead = self.cached_rows(e.gate_pos, usize::MAX, e.cached);
        let n = e.pending().min(room).min(budget.saturating_add(ahead));
        let n = self.chunk(e.gate_pos, n, e.pending(), ahead);
        (n, self.cached_rows(e.gate_pos, n, e.cached))
    }

    /// Most tokens a sequence at `gate_pos` can add with `free` blocks.
    fn room(&self, gate_pos: usize, free: usize) -> usize {
        self.blocks(gate_pos) * self.block_tokens - gate_pos + free * self.block_tokens
    }
}

/// A prefill chunk for `e` within `budget` computed rows and `room` tokens: (tokens sent, rows of
/// them expected from the prefix cache). Without the gate's KV numbers nothing is expected
/// cached and chunks need not end on blocks.
fn chunk(kv: Option<KvState>, e: &Entry, budget: usize, room: usize) -> (usize, usize) {
    match kv {
        Some(k) => k.prefill(e, budget, room),
        None => (e.pending().min(budget).min(room), 0),
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
                    cached: 0,
                });
                plan.decode += 1;
                budget -= 1;
            }
        }
        for e in &self.running {
            if e.pending() > 1 && budget > 0 {
                let room = kv.map_or(usize::MAX, |k| k.room(e.gate_pos, free));
                let (n, cached) = chunk(kv, e, budget, room);
                if n == 0 {
                    continue;
                }
                free -= kv.map_or(0, |k| k.need(e.gate_pos, n));
                budget = budget.saturating_sub(plan.prefill_chunk(e, n, cached));
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
            let (n, cached) = chunk(kv, &e, budget, usize::MAX);
            free -= kv.map_or(0, |k| k.need(e.gate_pos, n));
            budget = budget.saturating_sub(plan.prefill_chunk(&e, n, cached));
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
            cached: 0,
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
                sample: false,
                cached: 0,
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
                sample: true,
                cached: 0,
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

    /// A scheduler whose gate has room for everything.
    fn roomy() -> Scheduler {
        Scheduler {
            kv: Some(KvState {
                free_blocks: 1000,
                total_blocks: 1000,
                block_tokens: 16,
            }),
            ..Scheduler::default()
        }
    }

    #[test]
    fn rows_expected_from_the_prefix_cache_are_not_charged_against_the_budget() {
        let mut s = roomy();
        s.running.push(entry(1, 11, 10)); // one decode
        // A 1,000-token prompt whose first 960 tokens (60 blocks) are expected cached.
        let mut long = entry(2, 1000, 0);
        long.cached = 960;
        s.waiting.push_back(long);
        s.waiting.push_back(entry(3, 100, 0));
        let plan = s.plan(limits(64, 8));
        let slot = |id| plan.slots.iter().find(|x| x.id == id).copied();
        // The whole prompt goes at once and costs only its 40 computed rows (the last block
        // holds the prompt's last row, always computed).
        assert_eq!(
            slot(2).map(|x| (x.start, x.len, x.cached, x.sample)),
            Some((0, 1000, 960, true))
        );
        // What is left of the budget (64 - 1 - 40) goes to the next prompt, cut to one block.
        assert_eq!(slot(3).map(|x| (x.len, x.cached)), Some((16, 0)));
        assert_eq!((plan.prefill_tokens, plan.cached_tokens), (1016, 960));
        let computed: usize = plan.slots.iter().map(|x| x.len - x.cached).sum();
        assert!(computed <= 64, "computed rows {computed} within the budget");
    }

    #[test]
    fn a_prompt_whose_cached_part_is_shorter_than_it_is_chunked_after_the_cached_blocks() {
        let mut s = roomy();
        let mut e = entry(1, 1000, 0);
        e.cached = 320;
        s.waiting.push_back(e);
        // 100 of budget: the 320 cached tokens, then 96 computed (cut to a block boundary).
        let plan = s.plan(limits(100, 8));
        assert_eq!(
            plan.slots.first().map(|x| (x.len, x.cached, x.sample)),
            Some((416, 320, false))
        );
        for slot in &plan.slots {
            s.advance(slot, false);
        }
        // Past the cached part, chunks are the budget's size again.
        let plan = s.plan(limits(100, 8));
        assert_eq!(
            plan.slots.first().map(|x| (x.start, x.len, x.cached)),
            Some((416, 96, 0))
        );
        // A chunk is not cut back to a block boundary inside the cached part: 8 of budget after
        // 320 cached tokens ends at 328, not at 320 (whose last block would then be computed).
        let mut s = roomy();
        let mut e = entry(1, 1000, 0);
        e.cached = 320;
        s.waiting.push_back(e);
        let plan = s.plan(limits(8, 8));
        assert_eq!(
            plan.slots.first().map(|x| (x.len, x.cached)),
            Some((328, 320))
        );
    }
}
