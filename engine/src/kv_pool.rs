//! A paged KV pool shared by many sequences (the gate's KV memory).
//!
//! The pool preallocates, per layer, `num_blocks × BLOCK_TOKENS` rows of latent (`c_kv`) and
//! rotary-key (`k_pe`) storage. A sequence owns a block table; it gets blocks as it grows and
//! gives them all back when it is dropped (finish, cancel, deadline, preemption), so KV memory
//! is bounded by the pool and fragmentation-free. Attention reads a sequence's rows by
//! gathering them through its block table.
//!
//! Which blocks are free, shared or cached is [`Blocks`]'s business (the prefix cache, in
//! [`crate::prefix_cache`]): a full block its sequence registered stays cached after the
//! sequence leaves and is evicted, least recently used first, only when an allocation needs it,
//! so "free" here counts cached blocks nobody uses.
//!
//! With a host tier ([`set_host_tier`](KvPool::set_host_tier), `--host-kv-cache-gb`), an
//! evicted block's rows are first copied to host memory ([`crate::host_tier`]), and a lookup
//! that runs out of cached blocks in the pool continues there: each further block found is
//! copied into a newly allocated pool block and registered again. The copies are exact (row
//! gathers and writes, no arithmetic). On a GPU they are plain device↔host copies on the
//! pool's stream (pageable memory, synchronous), not pinned asynchronous ones.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::host_tier::HostTier;
use crate::kv_blocks::{BLOCK_TOKENS, pool_row};
use crate::prefix_cache::{BlockHash, Blocks, PrefixCacheStats};

/// One block's rows in host memory: per layer, `(c_kv [BLOCK_TOKENS, kv_lora_rank], k_pe
/// [BLOCK_TOKENS, rope])` on the CPU, in the pool's dtype.
type HostBlock = Arc<[(Tensor, Tensor)]>;

pub struct KvPool {
    /// Per layer: `[num_blocks * BLOCK_TOKENS, kv_lora_rank]`.
    ckv: Vec<Tensor>,
    /// Per layer: `[num_blocks * BLOCK_TOKENS, qk_rope_head_dim]`.
    kpe: Vec<Tensor>,
    /// Free, in-use and cached blocks.
    blocks: Mutex<Blocks>,
    /// The host-memory tier, when there is one (locked after `blocks`, never before).
    host: Mutex<Option<HostTier<HostBlock>>>,
    num_blocks: usize,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
}

impl KvPool {
    /// A pool of `num_blocks` blocks for every layer of the model.
    pub fn new(
        cfg: &ModelConfig,
        num_blocks: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Arc<Self>> {
        if num_blocks == 0 {
            return Err(EngineError::KvLimit(
                "the KV pool needs at least one block".into(),
            ));
        }
        let rows = num_blocks * BLOCK_TOKENS;
        let mut ckv = Vec::with_capacity(cfg.num_hidden_layers);
        let mut kpe = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            ckv.push(Tensor::zeros((rows, cfg.kv_lora_rank), dtype, device)?);
            kpe.push(Tensor::zeros((rows, cfg.qk_rope_head_dim), dtype, device)?);
        }
        Ok(Arc::new(KvPool {
            ckv,
            kpe,
            blocks: Mutex::new(Blocks::new(num_blocks)),
            host: Mutex::new(None),
            num_blocks,
            dtype,
            device: device.clone(),
        }))
    }

    /// Blocks that fit in `bytes` for this model and dtype.
    pub fn blocks_for_bytes(cfg: &ModelConfig, dtype: DType, bytes: u64) -> usize {
        let per_block =
            (BLOCK_TOKENS * cfg.num_hidden_layers * cfg.kv_cache_width() * dtype.size_in_bytes())
                as u64;
        (bytes / per_block.max(1)) as usize
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks an allocation can take: free ones and cached ones no sequence uses.
    pub fn free_blocks(&self) -> usize {
        self.lock().available()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Blocks> {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn host(&self) -> std::sync::MutexGuard<'_, Option<HostTier<HostBlock>>> {
        self.host.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of one block's rows over every layer.
    pub fn block_bytes(&self) -> u64 {
        let width: usize = self
            .ckv
            .iter()
            .chain(&self.kpe)
            .map(|t| t.dim(1).unwrap_or(0))
            .sum();
        (BLOCK_TOKENS * width * self.dtype.size_in_bytes()) as u64
    }

    /// Gives the prefix cache a host-memory tier of `bytes` (`--host-kv-cache-gb`; 0: none):
    /// evicted blocks go there and come back on a hit.
    pub fn set_host_tier(&self, bytes: u64) {
        let tier = (bytes > 0).then(|| HostTier::new(bytes, self.block_bytes()));
        let on = tier.as_ref().is_some_and(|t| t.capacity() > 0);
        *self.host() = tier;
        self.lock().set_keep_evicted(on);
    }

    /// Most blocks the host tier holds (0 without one).
    pub fn host_blocks(&self) -> usize {
        self.host().as_ref().map_or(0, |t| t.capacity())
    }

    /// The rows of `blocks`, copied to host memory: one gather and (on a GPU) one copy per
    /// layer for all of them, then each block's rows as tensors of their own (so that the
    /// tier's byte budget is what it holds).
    fn copy_out(&self, blocks: &[u32]) -> Result<Vec<HostBlock>> {
        let bt = BLOCK_TOKENS as u32;
        let rows: Vec<u32> = blocks.iter().flat_map(|&b| b * bt..(b + 1) * bt).collect();
        let idx = Tensor::from_vec(rows, blocks.len() * BLOCK_TOKENS, &self.device)?;
        let mut out: Vec<Vec<(Tensor, Tensor)>> = vec![Vec::new(); blocks.len()];
        for layer in 0..self.ckv.len() {
            // index_select makes new storage, so the copy outlives the pool's next write.
            let (ckv, kpe) = self.gather_rows(layer, &idx)?;
            let (ckv, kpe) = (ckv.to_device(&Device::Cpu)?, kpe.to_device(&Device::Cpu)?);
            for (i, block) in out.iter_mut().enumerate() {
                if blocks.len() == 1 {
                    block.push((ckv.clone(), kpe.clone()));
                    continue;
                }
                let own = Tensor::arange(i as u32 * bt, (i as u32 + 1) * bt, &Device::Cpu)?;
                block.push((ckv.index_select(&own, 0)?, kpe.index_select(&own, 0)?));
            }
        }
        Ok(out.into_iter().map(HostBlock::from).collect())
    }

    /// Writes blocks' rows from host memory into pool blocks `blocks` (in order): one copy (on
    /// a GPU) and one write per layer for all of them.
    fn copy_in(&self, blocks: &[u32], data: &[HostBlock]) -> Result<()> {
        for layer in 0..self.ckv.len() {
            let mut ckv = Vec::with_capacity(data.len());
            let mut kpe = Vec::with_capacity(data.len());
            for d in data {
                let (c, k) = d.get(layer).ok_or_else(|| {
                    EngineError::KvCache(format!("a host-tier block has no layer {layer}"))
                })?;
                ckv.push(c);
                kpe.push(k);
            }
            let ckv = Tensor::cat(&ckv, 0)?.to_device(&self.device)?;
            let kpe = Tensor::cat(&kpe, 0)?.to_device(&self.device)?;
            self.write(layer, blocks, 0, &ckv, &kpe)?;
        }
        Ok(())
    }

    /// Copies the blocks that allocations evicted to the host tier (before their new owners
    /// write them). A block the tier holds already (it came from there) needs no copy. A copy
    /// that fails loses only those cache entries.
    fn keep_evicted(&self, evicted: Vec<(u32, BlockHash)>) {
        let fresh: Vec<(u32, BlockHash)> = {
            let mut host = self.host();
            let Some(t) = host.as_mut() else {
                return;
            };
            evicted.into_iter().filter(|(_, h)| !t.refresh(h)).collect()
        };
        if fresh.is_empty() {
            return;
        }
        let blocks: Vec<u32> = fresh.iter().map(|e| e.0).collect();
        match self.copy_out(&blocks) {
            Ok(data) => {
                if let Some(t) = self.host().as_mut() {
                    for ((_, h), d) in fresh.into_iter().zip(data) {
                        t.put(h, d);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(blocks = blocks.len(), error = %e, "could not copy evicted KV blocks to the host tier")
            }
        }
    }

    /// Whether full blocks are kept and shared by prompts that start the same way.
    pub fn prefix_caching(&self) -> bool {
        self.lock().enabled()
    }

    /// Turns prefix caching on or off (`--prefix-cache`); off forgets every cached block.
    pub fn set_prefix_caching(&self, on: bool) {
        self.lock().set_enabled(on);
    }

    /// The prefix cache's counters.
    pub fn prefix_stats(&self) -> PrefixCacheStats {
        let mut s = self.lock().stats();
        s.host = self.host().as_ref().map(|t| t.stats()).unwrap_or_default();
        s
    }

    pub(crate) fn allocate(&self, n: usize) -> Result<Vec<u32>> {
        let mut blocks = self.lock();
        let available = blocks.available();
        let got = blocks.allocate(n).ok_or_else(|| {
            EngineError::KvExhausted(format!(
                "KV pool exhausted: {n} more blocks needed, {available} of {} free",
                self.num_blocks
            ))
        });
        let evicted = blocks.take_evicted();
        drop(blocks);
        self.keep_evicted(evicted);
        got
    }

    pub(crate) fn release(&self, blocks: &[u32]) {
        self.lock().release(blocks);
    }

    /// References the cached blocks of the longest cached prefix of `hashes`: those in the pool,
    /// then those the host tier holds (as many as the pool has blocks available for), copied
    /// into new pool blocks and registered again.
    pub(crate) fn acquire_cached(&self, hashes: &[BlockHash]) -> Vec<u32> {
        let mut found = self.lock().acquire(hashes);
        let rest = &hashes[found.len()..];
        let room = self.free_blocks();
        // Taken (and marked most recently used) before allocating: the allocation's evictions
        // then drop other blocks from the tier, and these stay valid in any case.
        let data: Vec<HostBlock> = match self.host().as_mut() {
            Some(t) => rest.iter().take(room).map_while(|h| t.hit(h)).collect(),
            None => return found,
        };
        if data.is_empty() {
            return found;
        }
        let Ok(blocks) = self.allocate(data.len()) else {
            return found;
        };
        if let Err(e) = self.copy_in(&blocks, &data) {
            tracing::warn!(error = %e, "could not copy KV blocks back from the host tier");
            self.release(&blocks);
            return found;
        }
        for (&b, h) in blocks.iter().zip(rest) {
            self.register(b, *h);
        }
        self.lock().count_hits(blocks.len());
        found.extend(blocks);
        found
    }

    /// How many of `hashes`, in order from the first, are cached (nothing is taken).
    pub(crate) fn cached_blocks(&self, hashes: &[BlockHash]) -> usize {
        let n = self.lock().peek(hashes);
        let host = self.host();
        let more = host.as_ref().map_or(0, |t| {
            hashes[n..].iter().take_while(|h| t.contains(h)).count()
        });
        n + more
    }

    /// Registers a block its sequence has written whole.
    pub(crate) fn register(&self, block: u32, hash: BlockHash) {
        self.lock().register(block, hash);
    }

    /// Writes rows for positions `start..start + n` of a sequence with block table `table`.
    pub(crate) fn write(
        &self,
        layer: usize,
        table: &[u32],
        start: usize,
        ckv: &Tensor,
        kpe: &Tensor,
    ) -> Result<()> {
        let n = ckv.dim(0)?;
        let (ckv, kpe) = (ckv.to_dtype(self.dtype)?, kpe.to_dtype(self.dtype)?);
        if n > 1
            && crate::cuda::flash_prefill_enabled()
            && let Some(g) = crate::cuda::gpu(&self.device)
        {
            // A prefill chunk on the GPU: one launch instead of two copies per block.
            let rows: Vec<u32> = (start..start + n).map(|p| pool_row(table, p)).collect();
            let rows = Tensor::from_vec(rows, n, &self.device)?;
            let (ckv, kpe) = (ckv.contiguous()?, kpe.contiguous()?);
            if g.pool_write(&ckv, &kpe, &rows, &self.ckv[layer], &self.kpe[layer])? {
                return Ok(());
            }
        }
        let mut done = 0;
        while done < n {
            let pos = start + done;
            let block = table[pos / BLOCK_TOKENS] as usize;
            let offset = pos % BLOCK_TOKENS;
            let run = (BLOCK_TOKENS - offset).min(n - done);
            let row = block * BLOCK_TOKENS + offset;
            self.ckv[layer].slice_set(&ckv.narrow(0, done, run)?.contiguous()?, 0, row)?;
            self.kpe[layer].slice_set(&kpe.narrow(0, done, run)?.contiguous()?, 0, row)?;
            done += run;
        }
        Ok(())
    }

    /// The first `len` rows of a sequence: `(c_kv [len, kv_lora_rank], k_pe [len, rope])`.
    /// Writes row `i` of `ckv`/`kpe` to pool row `rows[i]` (`ckv_rows`/`kpe_rows` hold each
    /// destination row repeated across the width, as `scatter_set` wants).
    pub(crate) fn scatter(
        &self,
        layer: usize,
        ckv_rows: &Tensor,
        ckv: &Tensor,
        kpe_rows: &Tensor,
        kpe: &Tensor,
    ) -> Result<()> {
        self.ckv[layer].scatter_set(ckv_rows, &ckv.to_dtype(self.dtype)?.contiguous()?, 0)?;
        self.kpe[layer].scatter_set(kpe_rows, &kpe.to_dtype(self.dtype)?.contiguous()?, 0)?;
        Ok(())
    }

    /// Layer `layer`'s storage, `([rows, kv_lora_rank], [rows, rope])`, for kernels that read or
    /// write it in place.
    pub(crate) fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.ckv[layer], &self.kpe[layer])
    }

    /// Rows `idx` (`[n]`, u32) of layer `layer`: `([n, kv_lora_rank], [n, rope])`.
    pub(crate) fn gather_rows(&self, layer: usize, idx: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.ckv[layer].index_select(idx, 0)?,
            self.kpe[layer].index_select(idx, 0)?,
        ))
    }

    pub(crate) fn gather(
        &self,
        layer: usize,
        table: &[u32],
        len: usize,
    ) -> Result<(Tensor, Tensor)> {
        let rows: Vec<u32> = (0..len).map(|p| pool_row(table, p)).collect();
        let idx = Tensor::from_vec(rows, len, &self.device)?;
        Ok((
            self.ckv[layer].index_select(&idx, 0)?,
            self.kpe[layer].index_select(&idx, 0)?,
        ))
    }
}
