//! The prefix cache's host-memory tier (`--host-kv-cache-gb`): full KV blocks evicted from the
//! pool keep living in host memory, under the same [`BlockHash`], and come back into the pool
//! on a prefix hit instead of being computed again.
//!
//! Owned by the [`KvPool`](crate::kv_pool::KvPool) (which does the copies, in
//! `KvPool::allocate` and `KvPool::acquire_cached`); this module is the bookkeeping: a byte
//! budget, least-recently-used order, and the tier's counters. It is inclusive: a block brought
//! back stays here too, so evicting it again from the pool costs no copy. A preempted sequence's
//! full blocks reach this tier the same way (the gate releases them into the pool's cache, and
//! the pool evicts them here when it needs room), so its new prefill finds them.

use std::collections::{BTreeMap, HashMap};

use crate::prefix_cache::BlockHash;

/// Counters of the host tier since it was made (monotonic, but `blocks`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostTierStats {
    /// Blocks brought back from the tier into the pool on a prefix hit.
    pub hit_blocks: u64,
    /// Bytes copied from the pool into the tier (evicted blocks).
    pub bytes_to_host: u64,
    /// Bytes copied from the tier into the pool (hits).
    pub bytes_to_device: u64,
    /// Blocks dropped from the tier to stay within its budget.
    pub evictions: u64,
    /// Blocks held now.
    pub blocks: u64,
}

/// Blocks of KV in host memory, by name, within a byte budget. `V` is one block's data (the
/// pool's per-layer host tensors; anything in the tests).
#[derive(Debug)]
pub(crate) struct HostTier<V> {
    /// Most blocks held: the budget over one block's bytes.
    capacity: usize,
    /// Bytes of one block (every block has the same shape).
    block_bytes: u64,
    /// Name → (its key in `lru`, its data).
    blocks: HashMap<BlockHash, (u64, V)>,
    /// Tick → name: the first is the least recently used, dropped first.
    lru: BTreeMap<u64, BlockHash>,
    tick: u64,
    stats: HostTierStats,
}

impl<V: Clone> HostTier<V> {
    /// A tier of `budget` bytes for blocks of `block_bytes` each.
    pub(crate) fn new(budget: u64, block_bytes: u64) -> Self {
        HostTier {
            capacity: (budget / block_bytes.max(1)) as usize,
            block_bytes,
            blocks: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            stats: HostTierStats::default(),
        }
    }

    /// Most blocks the tier holds.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn stats(&self) -> HostTierStats {
        self.stats
    }

    /// Whether a block of this name is held (nothing is touched).
    pub(crate) fn contains(&self, hash: &BlockHash) -> bool {
        self.blocks.contains_key(hash)
    }

    /// Marks a held block the most recently used; whether it is held.
    pub(crate) fn refresh(&mut self, hash: &BlockHash) -> bool {
        let held = self.contains(hash);
        if held {
            self.touch(hash);
        }
        held
    }

    fn touch(&mut self, hash: &BlockHash) {
        self.tick += 1;
        if let Some((t, _)) = self.blocks.get_mut(hash) {
            self.lru.remove(t);
            *t = self.tick;
            self.lru.insert(self.tick, *hash);
        }
    }

    /// Keeps a block evicted from the pool (copied by the caller: `block_bytes` moved to the
    /// host), dropping the least recently used ones past the budget. A name already held is
    /// only marked used (the caller need not copy it: see [`contains`](Self::contains)).
    pub(crate) fn put(&mut self, hash: BlockHash, data: V) {
        if self.capacity == 0 {
            return;
        }
        if self.blocks.contains_key(&hash) {
            self.touch(&hash);
            return;
        }
        self.tick += 1;
        self.blocks.insert(hash, (self.tick, data));
        self.lru.insert(self.tick, hash);
        self.stats.bytes_to_host += self.block_bytes;
        while self.blocks.len() > self.capacity {
            let Some((_, h)) = self.lru.pop_first() else {
                break;
            };
            self.blocks.remove(&h);
            self.stats.evictions += 1;
        }
        self.stats.blocks = self.blocks.len() as u64;
    }

    /// The data of a held block, for a hit (the caller copies it into the pool: counted as
    /// `block_bytes` moved to the device), marked the most recently used.
    pub(crate) fn hit(&mut self, hash: &BlockHash) -> Option<V> {
        let data = self.blocks.get(hash)?.1.clone();
        self.touch(hash);
        self.stats.hit_blocks += 1;
        self.stats.bytes_to_device += self.block_bytes;
        Some(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> BlockHash {
        [i; 32]
    }

    #[test]
    fn the_tier_holds_what_fits_in_its_budget_and_drops_the_least_recently_used() {
        // 100 bytes of budget, 30-byte blocks: 3 blocks.
        let mut tier = HostTier::new(100, 30);
        assert_eq!(tier.capacity(), 3);
        for i in 0..3 {
            tier.put(h(i), vec![i; 30]);
        }
        // Using block 0 makes block 1 the least recently used.
        assert_eq!(tier.hit(&h(0)), Some(vec![0; 30]));
        tier.put(h(3), vec![3; 30]);
        assert!(!tier.contains(&h(1)));
        assert!(tier.contains(&h(0)) && tier.contains(&h(2)) && tier.contains(&h(3)));
        // Putting a held block again copies nothing and keeps it.
        tier.put(h(2), vec![9; 30]);
        assert!(tier.refresh(&h(3)) && !tier.refresh(&h(1)));
        assert_eq!(tier.hit(&h(2)), Some(vec![2; 30]));
        assert_eq!(tier.hit(&h(1)), None);
        let s = tier.stats();
        assert_eq!(
            (s.hit_blocks, s.bytes_to_host, s.bytes_to_device),
            (2, 4 * 30, 2 * 30)
        );
        assert_eq!((s.evictions, s.blocks), (1, 3));
    }

    #[test]
    fn a_budget_under_one_block_holds_nothing() {
        let mut tier = HostTier::new(29, 30);
        tier.put(h(0), ());
        assert!(!tier.contains(&h(0)));
        assert_eq!(tier.stats(), HostTierStats::default());
    }
}
