//! The MLA latent KV cache of one sequence.
//!
//! MLA needs, per token and layer, only the normalised compressed latent `c_kv`
//! (`kv_lora_rank` values) and the rotated shared key `k_pe` (`qk_rope_head_dim` values): keys
//! and values of every head are recomputed from the latent inside attention (the absorbed form),
//! so the cache is ~`(kv_lora_rank + qk_rope_head_dim)` values per token per layer rather than
//! `2 · heads · head_dim`. Storage comes in blocks of [`BLOCK_TOKENS`] tokens: either the
//! sequence's own buffers, grown in whole blocks (in-process generation), or blocks of a shared
//! [`KvPool`] through a block table (the gate, whose KV memory is bounded by the pool).
//!
//! Lifecycle: a step first [`reserve`](SequenceCache::reserve)s room for its new tokens, each
//! layer [`write`](SequenceCache::write)s its rows at the current length and reads the whole
//! prefix back, and once every layer has run the step [`commit`](SequenceCache::commit)s. A step
//! that fails before committing leaves the sequence as it was.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_blocks::pool_row;
use crate::kv_pool::KvPool;

/// Tokens per KV block (defined in [`crate::kv_blocks`]; still reachable here for the services).
pub use crate::kv_blocks::BLOCK_TOKENS;

#[derive(Debug)]
struct LayerKv {
    /// `[capacity, kv_lora_rank]`.
    ckv: Tensor,
    /// `[capacity, qk_rope_head_dim]`.
    kpe: Tensor,
}

/// Blocks of a shared pool, through a block table.
struct Paged {
    pool: Arc<KvPool>,
    table: Vec<u32>,
}

/// Latent KV for every layer of one sequence.
pub struct SequenceCache {
    /// Own storage (when `paged` is `None`).
    layers: Vec<LayerKv>,
    paged: Option<Paged>,
    /// Tokens whose KV is committed.
    len: usize,
    /// Token slots allocated per layer.
    capacity: usize,
    kv_lora_rank: usize,
    rope_dim: usize,
    max_len: usize,
    dtype: DType,
    device: Device,
}

impl SequenceCache {
    /// An empty cache for a model; `max_len` is the context length the cache refuses to exceed.
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Self {
        SequenceCache {
            layers: Vec::new(),
            paged: None,
            len: 0,
            capacity: 0,
            kv_lora_rank: cfg.kv_lora_rank,
            rope_dim: cfg.qk_rope_head_dim,
            max_len: cfg.max_position_embeddings,
            dtype,
            device: device.clone(),
        }
    }

    /// An empty cache whose blocks come from `pool`.
    pub fn paged(cfg: &ModelConfig, pool: Arc<KvPool>) -> Self {
        let mut c = SequenceCache::new(cfg, pool.dtype, &pool.device.clone());
        c.paged = Some(Paged {
            pool,
            table: Vec::new(),
        });
        c
    }

    /// Committed tokens (the position the next token gets).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks currently allocated.
    pub fn blocks(&self) -> usize {
        self.capacity / BLOCK_TOKENS
    }

    /// Makes room for `n` more tokens in each of `num_layers` layers.
    pub fn reserve(&mut self, num_layers: usize, n: usize) -> Result<()> {
        let need = self.len + n;
        if need > self.max_len {
            return Err(EngineError::KvLimit(format!(
                "sequence would reach {need} tokens, over the model's context length of {} (max_position_embeddings)",
                self.max_len
            )));
        }
        if let Some(p) = self.paged.as_mut() {
            let blocks = need.div_ceil(BLOCK_TOKENS);
            if blocks > p.table.len() {
                let more = p.pool.allocate(blocks - p.table.len())?;
                p.table.extend(more);
            }
            self.capacity = p.table.len() * BLOCK_TOKENS;
            return Ok(());
        }
        if need <= self.capacity && self.layers.len() == num_layers {
            return Ok(());
        }
        let target = need.max(self.capacity * 2).div_ceil(BLOCK_TOKENS) * BLOCK_TOKENS;
        let target = target.min(self.max_len.div_ceil(BLOCK_TOKENS) * BLOCK_TOKENS);
        let mut layers = Vec::with_capacity(num_layers);
        for l in 0..num_layers {
            let ckv = Tensor::zeros((target, self.kv_lora_rank), self.dtype, &self.device)?;
            let kpe = Tensor::zeros((target, self.rope_dim), self.dtype, &self.device)?;
            if let Some(old) = self.layers.get(l)
                && self.len > 0
            {
                ckv.slice_set(&old.ckv.narrow(0, 0, self.len)?.contiguous()?, 0, 0)?;
                kpe.slice_set(&old.kpe.narrow(0, 0, self.len)?.contiguous()?, 0, 0)?;
            }
            layers.push(LayerKv { ckv, kpe });
        }
        self.layers = layers;
        self.capacity = target;
        Ok(())
    }

    /// Stores the new tokens' latent rows for `layer` after the committed prefix and returns the
    /// whole prefix including them: `(c_kv [len + n, kv_lora_rank], k_pe [len + n, rope])`.
    pub fn write(&mut self, layer: usize, ckv: &Tensor, kpe: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = ckv.dim(0)?;
        let total = self.len + n;
        if let Some(p) = &self.paged {
            if total > p.table.len() * BLOCK_TOKENS {
                return Err(EngineError::KvCache(format!(
                    "layer {layer}: no blocks reserved for {n} tokens after {} (call reserve first)",
                    self.len
                )));
            }
            p.pool.write(layer, &p.table, self.len, ckv, kpe)?;
            return p.pool.gather(layer, &p.table, total);
        }
        let slot = self
            .layers
            .get(layer)
            .filter(|_| total <= self.capacity)
            .ok_or_else(|| {
                EngineError::KvCache(format!(
                    "layer {layer}: no room reserved for {n} tokens after {} (call reserve first)",
                    self.len
                ))
            })?;
        slot.ckv
            .slice_set(&ckv.to_dtype(self.dtype)?.contiguous()?, 0, self.len)?;
        slot.kpe
            .slice_set(&kpe.to_dtype(self.dtype)?.contiguous()?, 0, self.len)?;
        Ok((slot.ckv.narrow(0, 0, total)?, slot.kpe.narrow(0, 0, total)?))
    }

    /// The pool of a paged cache.
    pub(crate) fn pool(&self) -> Option<&Arc<KvPool>> {
        self.paged.as_ref().map(|p| &p.pool)
    }

    /// Pool rows of positions `0..n` of a paged cache (reserved beforehand).
    pub(crate) fn pool_rows(&self, n: usize) -> Option<impl Iterator<Item = u32> + '_> {
        let p = self.paged.as_ref()?;
        (n <= p.table.len() * BLOCK_TOKENS).then(|| (0..n).map(|pos| pool_row(&p.table, pos)))
    }

    /// The block table of a paged cache (empty for own storage).
    pub(crate) fn block_ids(&self) -> &[u32] {
        self.paged.as_ref().map_or(&[], |p| &p.table)
    }

    /// Appends cached full blocks (already referenced for this sequence) after the committed
    /// tokens, as if their tokens had been computed. The committed length must be a whole number
    /// of blocks; blocks reserved past it are given back first. On error the blocks are given
    /// back.
    pub(crate) fn attach(&mut self, blocks: Vec<u32>) -> Result<()> {
        let Some(p) = self.paged.as_mut() else {
            return Err(EngineError::KvCache(
                "cached blocks can only be attached to a paged cache".into(),
            ));
        };
        let need = self.len + blocks.len() * BLOCK_TOKENS;
        if !self.len.is_multiple_of(BLOCK_TOKENS) || need > self.max_len {
            p.pool.release(&blocks);
            return Err(EngineError::KvCache(format!(
                "cannot attach {} cached blocks after {} tokens (context length {})",
                blocks.len(),
                self.len,
                self.max_len
            )));
        }
        let spare = p.table.split_off(self.len / BLOCK_TOKENS);
        p.pool.release(&spare);
        p.table.extend(blocks);
        self.len = need;
        self.capacity = p.table.len() * BLOCK_TOKENS;
        Ok(())
    }

    /// Undoes [`attach`](Self::attach): back to `len` committed tokens (a whole number of blocks),
    /// giving back every block after them.
    pub(crate) fn detach(&mut self, len: usize) {
        if let Some(p) = self.paged.as_mut() {
            let keep = len.div_ceil(BLOCK_TOKENS).min(p.table.len());
            let gone = p.table.split_off(keep);
            p.pool.release(&gone);
            self.capacity = p.table.len() * BLOCK_TOKENS;
            self.len = self.len.min(len).min(self.capacity);
        }
    }

    /// Makes the last `n` written tokens part of the sequence.
    pub fn commit(&mut self, n: usize) {
        self.len = (self.len + n).min(self.capacity);
    }

    /// Forgets everything after the first `len` tokens (storage is kept).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Drop for SequenceCache {
    fn drop(&mut self) {
        if let Some(p) = &self.paged {
            p.pool.release(&p.table);
        }
    }
}

impl std::fmt::Debug for SequenceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequenceCache")
            .field("len", &self.len)
            .field("blocks", &self.blocks())
            .field("paged", &self.paged.is_some())
            .finish()
    }
}
