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

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_blocks::{BLOCK_TOKENS, pool_row};
use crate::prefix_cache::{BlockHash, Blocks, PrefixCacheStats};

pub struct KvPool {
    /// Per layer: `[num_blocks * BLOCK_TOKENS, kv_lora_rank]`.
    ckv: Vec<Tensor>,
    /// Per layer: `[num_blocks * BLOCK_TOKENS, qk_rope_head_dim]`.
    kpe: Vec<Tensor>,
    /// Free, in-use and cached blocks.
    blocks: Mutex<Blocks>,
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
        self.lock().stats()
    }

    pub(crate) fn allocate(&self, n: usize) -> Result<Vec<u32>> {
        let mut blocks = self.lock();
        let available = blocks.available();
        blocks.allocate(n).ok_or_else(|| {
            EngineError::KvExhausted(format!(
                "KV pool exhausted: {n} more blocks needed, {available} of {} free",
                self.num_blocks
            ))
        })
    }

    pub(crate) fn release(&self, blocks: &[u32]) {
        self.lock().release(blocks);
    }

    /// References the cached blocks of the longest cached prefix of `hashes`.
    pub(crate) fn acquire_cached(&self, hashes: &[BlockHash]) -> Vec<u32> {
        self.lock().acquire(hashes)
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
