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
//! A sequence samples a token only in the step that brings it fully up to date.

use std::collections::VecDeque;

/// Scheduler limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most tokens (prefill + decode) in one step.
    pub token_budget: usize,
    /// Most sequences running on the gate at once.
    pub max_running: usize,
}

/// What the scheduler knows of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: u64,
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
}

#[derive(Debug, Default)]
pub struct Scheduler {
    /// Sequences on the gate (or being prefilled), in admission order.
    pub running: Vec<Entry>,
    /// Sequences not yet admitted, in arrival order.
    pub waiting: VecDeque<Entry>,
}

impl Scheduler {
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Plans the next step and admits waiting sequences it includes.
    pub fn plan(&mut self, limits: Limits) -> Plan {
        let mut budget = limits.token_budget;
        let mut plan = Plan::default();
        for e in &self.running {
            if e.pending() == 1 && budget > 0 {
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
                let n = e.pending().min(budget);
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
        while budget > 0 && self.running.len() < limits.max_running {
            let Some(e) = self.waiting.pop_front() else {
                break;
            };
            let n = e.pending().min(budget);
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

    /// Removes a sequence wherever it is.
    pub fn remove(&mut self, id: u64) {
        self.running.retain(|e| e.id != id);
        self.waiting.retain(|e| e.id != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, len: usize, gate_pos: usize) -> Entry {
        Entry { id, len, gate_pos }
    }

    #[test]
    fn decodes_go_first_and_a_long_prompt_is_chunked_by_the_budget() {
        let mut s = Scheduler::default();
        for id in 0..8 {
            s.running.push(entry(id, 11, 10)); // decoding
        }
        s.waiting.push_back(entry(100, 2000, 0));
        let limits = Limits {
            token_budget: 256,
            max_running: 64,
        };
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
        let plan = s.plan(Limits {
            token_budget: 100,
            max_running: 3,
        });
        let ids: Vec<u64> = plan.slots.iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        assert!(plan.slots.iter().all(|x| x.sample && x.len == 3));
        assert_eq!(s.waiting.len(), 2);
    }

    #[test]
    fn a_partial_chunk_does_not_sample() {
        let mut s = Scheduler::default();
        s.waiting.push_back(entry(1, 10, 0));
        let plan = s.plan(Limits {
            token_budget: 4,
            max_running: 8,
        });
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
        let plan = s.plan(Limits {
            token_budget: 100,
            max_running: 8,
        });
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
}
