//! Block-level prefix caching: the bookkeeping of the KV pool's blocks (free, in use, cached)
//! and the hash chain that names a full block by everything before it.
//!
//! A full block of [`BLOCK_TOKENS`] tokens is named by
//! `hash(parent block's hash, the block's token ids)`, and the chain starts from
//! `hash(model fingerprint, cache salt)`, so a hash stands for the whole prefix up to the block's
//! end, for one model, within one salt: equal hashes mean equal KV, and requests with different
//! salts never share a block. SHA-256 keeps collisions out of reach (a collision would hand one
//! sequence another's KV).
//!
//! Lifecycle of a block, owned by [`Blocks`] inside the [`KvPool`](crate::kv_pool::KvPool):
//! free → allocated to a sequence (reference count 1) → once the sequence has written it whole,
//! registered under its hash → shared by later sequences whose prompts start the same way (the
//! count goes up and down) → when the count reaches 0 it stays cached, unreferenced, in an LRU
//! order → it is evicted (its hash forgotten) only when an allocation finds no free block. A
//! block is registered only once full and only by the sequence that wrote it, so nobody ever
//! writes into a shared block. The runner ([`StepRunner`](crate::serving::StepRunner)) does the
//! matching and registering; this module has no tensors.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

use crate::host_tier::HostTierStats;
use crate::kv_blocks::BLOCK_TOKENS;

/// The name of a full block: SHA-256 over its parent's name and its token ids.
pub type BlockHash = [u8; 32];

/// The root of a chain: what every block hash of a sequence depends on besides its tokens.
pub fn chain_root(fingerprint: &str, salt: &[u8]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(b"moemesh prefix cache v1");
    h.update((fingerprint.len() as u64).to_le_bytes());
    h.update(fingerprint.as_bytes());
    h.update((salt.len() as u64).to_le_bytes());
    h.update(salt);
    h.finalize().into()
}

/// The hash of a full block (`ids.len() == BLOCK_TOKENS`) after `parent`.
pub fn block_hash(parent: &BlockHash, ids: &[u32]) -> BlockHash {
    debug_assert_eq!(ids.len(), BLOCK_TOKENS);
    let mut h = Sha256::new();
    h.update(parent);
    for id in ids {
        h.update(id.to_le_bytes());
    }
    h.finalize().into()
}

/// The hashes of the full blocks of `ids` after `parent` (a trailing partial block has none).
pub fn chain(parent: &BlockHash, ids: &[u32]) -> Vec<BlockHash> {
    let mut parent = *parent;
    ids.chunks_exact(BLOCK_TOKENS)
        .map(|block| {
            parent = block_hash(&parent, block);
            parent
        })
        .collect()
}

/// Counters of the prefix cache since the pool was made (monotonic, so a metrics exporter can
/// publish them as they are).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Lookups: a sequence's step whose rows held at least one full block that could come from
    /// the cache.
    pub lookups: u64,
    /// Full blocks asked for by those lookups.
    pub queried_blocks: u64,
    /// Of those, blocks found in the cache (their tokens were not computed).
    pub hit_blocks: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
    /// Blocks holding a registered hash now (in use or not).
    pub cached_blocks: u64,
    /// The host-memory tier's counters (all 0 without one). Its hits are counted in
    /// `hit_blocks` too.
    pub host: HostTierStats,
}

/// Which blocks of the pool are free, in use (and by how many sequences) and cached.
#[derive(Debug)]
pub(crate) struct Blocks {
    /// Blocks nobody uses and that hold nothing worth keeping.
    free: Vec<u32>,
    /// Per block: the sequences using it.
    refs: Vec<u32>,
    /// Per block: its registered hash, if any.
    hash: Vec<Option<BlockHash>>,
    /// Registered hash → block.
    by_hash: HashMap<BlockHash, u32>,
    /// Cached blocks that no sequence uses, by the tick they were released at: the first is
    /// the least recently used, evicted first.
    lru: BTreeMap<u64, u32>,
    /// Per block: its key in `lru` (meaningful only while it is there).
    lru_tick: Vec<u64>,
    tick: u64,
    /// Whether blocks are registered and looked up (`--prefix-cache`).
    enabled: bool,
    /// Whether evicted blocks are noted in `evicted` (a host tier takes them).
    keep_evicted: bool,
    /// Blocks evicted by allocations and their names, until the pool copies them to the host
    /// tier ([`take_evicted`](Self::take_evicted)).
    evicted: Vec<(u32, BlockHash)>,
    stats: PrefixCacheStats,
}

impl Blocks {
    pub(crate) fn new(num_blocks: usize) -> Self {
        Blocks {
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            by_hash: HashMap::new(),
            lru: BTreeMap::new(),
            lru_tick: vec![0; num_blocks],
            tick: 0,
            enabled: true,
            keep_evicted: false,
            evicted: Vec::new(),
            stats: PrefixCacheStats::default(),
        }
    }

    /// Blocks an allocation can take: free ones and unused cached ones.
    pub(crate) fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Turns caching on or off; turning it off forgets every cached block.
    pub(crate) fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        if !on {
            while let Some((_, b)) = self.lru.pop_first() {
                self.forget(b);
                self.free.push(b);
            }
            for b in self.by_hash.drain().map(|(_, b)| b).collect::<Vec<_>>() {
                self.hash[b as usize] = None;
            }
            self.stats.cached_blocks = 0;
        }
    }

    pub(crate) fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// Whether evicted blocks are noted for a host tier.
    pub(crate) fn set_keep_evicted(&mut self, on: bool) {
        self.keep_evicted = on;
    }

    /// The blocks evicted since the last call, with their names (their data is still in the
    /// pool until their new owner writes them).
    pub(crate) fn take_evicted(&mut self) -> Vec<(u32, BlockHash)> {
        std::mem::take(&mut self.evicted)
    }

    /// Counts blocks a lookup found in the host tier (after [`acquire`](Self::acquire)).
    pub(crate) fn count_hits(&mut self, blocks: usize) {
        self.stats.hit_blocks += blocks as u64;
    }

    /// `n` blocks for one sequence (each with one reference), taking free blocks first and then
    /// evicting the least recently used cached ones; `None` when fewer than `n` are available.
    pub(crate) fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if self.available() < n {
            return None;
        }
        let from_free = n.min(self.free.len());
        let mut out = self.free.split_off(self.free.len() - from_free);
        while out.len() < n {
            let (_, b) = self.lru.pop_first()?;
            if let Some(h) = self.hash[b as usize].filter(|_| self.keep_evicted) {
                self.evicted.push((b, h));
            }
            self.forget(b);
            self.stats.evictions += 1;
            out.push(b);
        }
        for &b in &out {
            self.refs[b as usize] = 1;
        }
        Some(out)
    }

    /// Drops one reference to each block. A block nobody uses any more is kept cached if it is
    /// registered, else freed. A sequence's blocks are released tail first, so its last blocks
    /// (the least likely to be shared) are the first evicted.
    pub(crate) fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "block {b} released more often than taken");
            *r = r.saturating_sub(1);
            if *r > 0 {
                continue;
            }
            if self.hash[b as usize].is_some() {
                self.tick += 1;
                self.lru.insert(self.tick, b);
                self.lru_tick[b as usize] = self.tick;
            } else {
                self.free.push(b);
            }
        }
    }

    /// Takes a reference to the cached blocks of the longest prefix of `hashes` that is cached
    /// (in order), and counts the lookup.
    pub(crate) fn acquire(&mut self, hashes: &[BlockHash]) -> Vec<u32> {
        if !self.enabled || hashes.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for h in hashes {
            let Some(&b) = self.by_hash.get(h) else {
                break;
            };
            if self.refs[b as usize] == 0 {
                self.lru.remove(&self.lru_tick[b as usize]);
            }
            self.refs[b as usize] += 1;
            out.push(b);
        }
        self.stats.lookups += 1;
        self.stats.queried_blocks += hashes.len() as u64;
        self.stats.hit_blocks += out.len() as u64;
        out
    }

    /// How many of `hashes`, in order from the first, are cached; takes nothing and counts no
    /// lookup.
    pub(crate) fn peek(&self, hashes: &[BlockHash]) -> usize {
        if !self.enabled {
            return 0;
        }
        hashes
            .iter()
            .take_while(|h| self.by_hash.contains_key(*h))
            .count()
    }

    /// Registers a block its sequence has just written whole under `hash`, unless another block
    /// already holds that prefix (then this one stays private and is freed on release).
    pub(crate) fn register(&mut self, block: u32, hash: BlockHash) {
        let b = block as usize;
        if !self.enabled || self.hash[b].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.hash[b] = Some(hash);
        self.by_hash.insert(hash, block);
        self.stats.cached_blocks += 1;
    }

    /// Drops a block's registration.
    fn forget(&mut self, b: u32) {
        if let Some(h) = self.hash[b as usize].take() {
            self.by_hash.remove(&h);
            self.stats.cached_blocks = self.stats.cached_blocks.saturating_sub(1);
        }
    }
}

/// What a frontend believes one gate's prefix cache holds: the names of the blocks it has seen
/// that gate fill (the frontend follows the same [`chain`] over the token ids and salt it
/// sends), at most `capacity` of them, the least recently used forgotten first. Compact: 8 bytes
/// of each name. A guess, never a source of KV: the gate evicts on its own and a shortened name
/// may collide, which only misplaces a request or misjudges a step's budget. A block the gate
/// evicted is found missing by the next prompt that expects it, which computes it and so puts
/// it back; names nobody asks for again age out.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    /// Most names held (the gate's blocks, device and host tier).
    capacity: usize,
    /// Short name → the tick it was last seen at.
    seen: HashMap<u64, u64>,
    /// Tick → short name: the first is the least recently seen.
    lru: BTreeMap<u64, u64>,
    tick: u64,
}

impl PrefixIndex {
    pub fn new(capacity: usize) -> Self {
        PrefixIndex {
            capacity,
            ..PrefixIndex::default()
        }
    }

    fn short(h: &BlockHash) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[..8]);
        u64::from_le_bytes(b)
    }

    /// Names held.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Sets the most names held, forgetting the least recently seen past it.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.trim();
    }

    /// How many of `hashes`, in order from the first, the gate is believed to hold.
    pub fn matched(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.seen.contains_key(&Self::short(h)))
            .count()
    }

    /// The gate now holds the blocks of `hashes` (a chain from its first block). The chain's
    /// head is marked the most recently seen, so that its tail is forgotten first, as the gate's
    /// own LRU releases a sequence's blocks tail first.
    pub fn insert(&mut self, hashes: &[BlockHash]) {
        for h in hashes.iter().rev() {
            let k = Self::short(h);
            self.tick += 1;
            if let Some(old) = self.seen.insert(k, self.tick) {
                self.lru.remove(&old);
            }
            self.lru.insert(self.tick, k);
        }
        self.trim();
    }

    fn trim(&mut self) {
        while self.seen.len() > self.capacity {
            let Some((_, k)) = self.lru.pop_first() else {
                break;
            };
            self.seen.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(start: u32) -> Vec<u32> {
        (start..start + BLOCK_TOKENS as u32).collect()
    }

    #[test]
    fn a_hash_names_the_whole_prefix_the_model_and_the_salt() {
        let root = chain_root("model-a", b"");
        let a = block_hash(&root, &ids(0));
        // Deterministic.
        assert_eq!(a, block_hash(&chain_root("model-a", b""), &ids(0)));
        // The same block after a different parent is a different block.
        let b1 = block_hash(&a, &ids(100));
        let b2 = block_hash(&block_hash(&root, &ids(1)), &ids(100));
        assert_ne!(b1, b2);
        // Another model or another salt starts another chain.
        assert_ne!(a, block_hash(&chain_root("model-b", b""), &ids(0)));
        assert_ne!(a, block_hash(&chain_root("model-a", b"tenant-1"), &ids(0)));
        assert_ne!(
            chain_root("model-a", b"tenant-1"),
            chain_root("model-a", b"tenant-2")
        );
        // The length prefix keeps (fingerprint, salt) pairs from running together.
        assert_ne!(chain_root("ab", b"c"), chain_root("a", b"bc"));
        // chain() is block_hash() folded; a partial block gets no hash.
        let mut two = ids(0);
        two.extend(ids(100));
        two.extend([7, 8, 9]);
        assert_eq!(chain(&root, &two), vec![a, block_hash(&a, &ids(100))]);
    }

    #[test]
    fn shared_blocks_are_counted_and_kept_until_the_last_user_leaves() {
        let mut blocks = Blocks::new(4);
        let root = chain_root("m", b"");
        let h = chain(&root, &[ids(0), ids(16)].concat());
        let seq_a = blocks.allocate(2).expect("room");
        blocks.register(seq_a[0], h[0]);
        blocks.register(seq_a[1], h[1]);
        // A second sequence with the same prefix shares both blocks.
        let seq_b = blocks.acquire(&h);
        assert_eq!(seq_b, seq_a);
        assert_eq!(blocks.available(), 2);
        // The first one leaves: the blocks stay in use by the second.
        blocks.release(&seq_a);
        assert_eq!(blocks.available(), 2);
        assert_eq!(blocks.acquire(&h[..1]), vec![seq_a[0]]);
        blocks.release(&seq_a[..1]);
        // The second leaves: cached and unreferenced, so available, and still found.
        blocks.release(&seq_b);
        assert_eq!(blocks.available(), 4);
        assert_eq!(blocks.acquire(&h), seq_a);
        assert_eq!(blocks.available(), 2);
        let s = blocks.stats();
        assert_eq!((s.lookups, s.queried_blocks, s.hit_blocks), (3, 5, 5));
        assert_eq!(s.cached_blocks, 2);
    }

    #[test]
    fn a_duplicate_block_stays_private_and_is_freed() {
        let mut blocks = Blocks::new(2);
        let h = block_hash(&chain_root("m", b""), &ids(0));
        let a = blocks.allocate(1).expect("room");
        let b = blocks.allocate(1).expect("room");
        blocks.register(a[0], h);
        blocks.register(b[0], h);
        blocks.release(&b);
        blocks.release(&a);
        assert_eq!(blocks.stats().cached_blocks, 1);
        assert_eq!(blocks.acquire(&[h]), a);
    }

    #[test]
    fn unused_cached_blocks_are_evicted_least_recently_used_first_and_only_when_needed() {
        let mut blocks = Blocks::new(3);
        let root = chain_root("m", b"");
        let hs: Vec<BlockHash> = (0..3).map(|i| block_hash(&root, &ids(i * 16))).collect();
        let mut held = Vec::new();
        for h in &hs {
            let b = blocks.allocate(1).expect("room");
            blocks.register(b[0], *h);
            held.push(b[0]);
        }
        // Released in the order 0, 2, 1: block 0 is the least recently used.
        blocks.release(&held[0..1]);
        blocks.release(&held[2..3]);
        blocks.release(&held[1..2]);
        // Using block 0 again makes block 2 the oldest.
        assert_eq!(blocks.acquire(&hs[0..1]), vec![held[0]]);
        blocks.release(&held[0..1]);
        assert_eq!(
            blocks.stats().evictions,
            0,
            "nothing evicted while not needed"
        );
        let got = blocks.allocate(1).expect("room");
        assert_eq!(got, vec![held[2]]);
        assert_eq!(blocks.stats().evictions, 1);
        assert!(
            blocks.acquire(&hs[2..3]).is_empty(),
            "evicted: its hash is gone"
        );
        assert_eq!(blocks.acquire(&hs[1..2]), vec![held[1]]);
        assert_eq!(blocks.acquire(&hs[0..1]), vec![held[0]]);
        // Everything is in use now: nothing more to take or evict.
        assert!(blocks.allocate(1).is_none());
    }

    #[test]
    fn blocks_in_use_are_never_evicted() {
        let mut blocks = Blocks::new(2);
        let h = block_hash(&chain_root("m", b""), &ids(0));
        let a = blocks.allocate(1).expect("room");
        blocks.register(a[0], h);
        assert!(blocks.allocate(2).is_none());
        assert_eq!(blocks.allocate(1).map(|v| v.len()), Some(1));
        assert_eq!(blocks.acquire(&[h]), a);
    }

    #[test]
    fn salted_chains_do_not_meet() {
        let mut blocks = Blocks::new(4);
        let prompt = [ids(0), ids(16)].concat();
        let plain = chain(&chain_root("m", b""), &prompt);
        let salted = chain(&chain_root("m", b"tenant"), &prompt);
        let a = blocks.allocate(2).expect("room");
        for (b, h) in a.iter().zip(&plain) {
            blocks.register(*b, *h);
        }
        blocks.release(&a);
        assert!(blocks.acquire(&salted).is_empty());
        assert_eq!(blocks.acquire(&plain), a);
    }

    #[test]
    fn turned_off_nothing_is_registered_or_found() {
        let mut blocks = Blocks::new(2);
        let h = block_hash(&chain_root("m", b""), &ids(0));
        let a = blocks.allocate(1).expect("room");
        blocks.register(a[0], h);
        blocks.release(&a);
        blocks.set_enabled(false);
        assert!(blocks.acquire(&[h]).is_empty());
        assert_eq!(blocks.available(), 2);
        let b = blocks.allocate(1).expect("room");
        blocks.register(b[0], h);
        assert_eq!(blocks.stats().cached_blocks, 0);
        assert_eq!(blocks.stats().evictions, 0);
    }

    #[test]
    fn an_index_matches_chain_prefixes_and_keeps_chain_heads_longest() {
        let root = chain_root("m", b"");
        let long: Vec<u32> = (0..5 * BLOCK_TOKENS as u32).collect();
        let h = chain(&root, &long);
        let mut index = PrefixIndex::new(8);
        assert_eq!(index.matched(&h), 0);
        index.insert(&h[..3]);
        assert_eq!(index.matched(&h), 3);
        // A name stands for its whole prefix: another salt's chain over the same ids matches
        // nothing.
        assert_eq!(index.matched(&chain(&chain_root("m", b"s"), &long)), 0);
        assert_eq!(index.len(), 3);
        // Over capacity, the least recently seen go first, tails before heads.
        let other = chain(&chain_root("m", b"other"), &long);
        index.insert(&h);
        index.insert(&other[..4]);
        assert_eq!(index.len(), 8);
        assert_eq!(index.matched(&other), 4);
        assert_eq!(index.matched(&h), 4, "h's last block was forgotten first");
        index.set_capacity(2);
        assert_eq!((index.matched(&other), index.matched(&h)), (2, 0));
    }

    #[test]
    fn peek_counts_the_cached_prefix_and_takes_nothing() {
        let mut blocks = Blocks::new(3);
        let h = chain(&chain_root("m", b""), &[ids(0), ids(16), ids(32)].concat());
        let a = blocks.allocate(2).expect("room");
        blocks.register(a[0], h[0]);
        blocks.register(a[1], h[1]);
        blocks.release(&a);
        assert_eq!(blocks.peek(&h), 2);
        assert_eq!(blocks.peek(&h[2..]), 0);
        assert_eq!(blocks.available(), 3);
        assert_eq!(blocks.stats().lookups, 0);
    }
}
