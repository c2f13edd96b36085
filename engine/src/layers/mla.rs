//! Multi-head Latent Attention (DeepSeek-V2 §2.1).
//!
//! Decode (and prefill on a GPU) runs in the absorbed form: keys and values are never
//! materialised per head. With `W_UK`/`W_UV` the two halves of `kv_b_proj` for head h,
//! `q_nope·k_nope = (q_nope·W_UK)·c_kv` and `p·v = (p·c_kv)·W_UVᵀ`, so the query is projected
//! into the latent space once and attention runs directly over the cached latents. Every
//! sequence of a batch attends only to its own cache.
//!
//! Prefill on the CPU (more than one new row of a sequence) runs in the non-absorbed form, as
//! vLLM and FlashInfer prefill: the cached latents are expanded by `kv_b_proj` into per-head
//! keys (nope + rope, 192 wide for V2/V3) and values (128) in chunks of [`PREFILL_KEY_CHUNK`]
//! positions, and [`TiledAttention`] attends over each chunk with an online softmax and the
//! causal mask by index. Memory is bounded by the chunk and the output, never queries × keys,
//! and per query–key pair it is about a third of the absorbed form's work.

use std::sync::{Arc, OnceLock};

use candle_core::{D, DType, Device, Tensor};

use super::tiled_attention::{HeadsView, TiledAttention};
use super::{Linear, RmsNorm, Rotary};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::SequenceCache;
use crate::kv_pool::KvPool;
use crate::weights::Loader;

/// Cached positions expanded into per-head keys and values at once by the CPU prefill:
/// `[chunk, heads, nope + v]` plus `[chunk, heads, nope + rope]` f32, about 21 MB for V2/V3
/// (16 heads) and 0.6 MB for the embedded model.
const PREFILL_KEY_CHUNK: usize = 1024;

#[derive(Debug, Clone)]
enum QueryProj {
    /// V3 / V2: `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
    LowRank {
        q_a_proj: Linear,
        q_a_layernorm: RmsNorm,
        q_b_proj: Linear,
    },
    /// V2-Lite: a plain `q_proj`.
    Full { q_proj: Linear },
}

/// One sequence's rows in a batch: rows `start..start + len` of the step's activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRows {
    pub start: usize,
    pub len: usize,
}

/// What attention needs about a step besides the activations: each sequence's rows and the
/// rotary tables for every row's position.
pub struct AttentionStep<'a> {
    pub rows: &'a [SeqRows],
    /// `[T, rope / 2]`.
    pub cos: &'a Tensor,
    /// `[T, rope / 2]`.
    pub sin: &'a Tensor,
    /// The step's decoding sequences, batched (see [`DecodeBatch`]).
    pub decode: Option<DecodeBatch>,
}

/// The sequences of a step that decode one token each from caches in one KV pool, attended as
/// one batch: every layer scatters their new latents into the pool and gathers their prefixes,
/// padded to the longest and masked, with one kernel each, then runs the attention as batched
/// matmuls. Per-sequence attention costs about ten launches per sequence and layer, which is
/// most of a GPU decode step at batch 64. The index tensors are the same for every layer, so
/// they are built once per step.
///
/// On a GPU (fused and flash kernels on) the batch also takes prefill chunks of at most
/// [`crate::cuda::latent_prefill_rows`] rows (typically the uncached tail of a prompt whose
/// prefix came from the prefix cache): each of their rows is a query of its own over its causal
/// prefix (positions up to its own), attended in latent space by the fused decode kernels, so
/// the batch's rows are rows, not sequences (`B` below counts rows). The flash prefill kernel
/// would first expand the whole cached context into per-head keys and values, per sequence and
/// layer: for a 30-row tail after 1,500 cached positions that costs more than the attention.
/// When longer prefills share the step, the batch's rows still go through the fused kernels,
/// as a step of their own, and the longer prefills through the flash kernel.
pub struct DecodeBatch {
    /// Indices into the step's sequences (and rows order: increasing); each one's rows are all
    /// in the batch, in order.
    seqs: Vec<usize>,
    pool: Arc<KvPool>,
    /// `[B]`: the activation row of each batch row.
    rows: Tensor,
    /// The scatter indices and the padding mask of the unfused attention, made on first use
    /// from `host` (a batch without `host`, a CUDA graph's, is attended by the fused kernels
    /// only).
    unfused: OnceLock<Unfused>,
    host: Option<HostTables>,
    /// `[S · Lmax]`: pool rows of each table row's positions, padded: a table row per sequence
    /// (S sequences), or per batch row where `trows` is `None` (S = B).
    gather: Tensor,
    /// `[B]`: each batch row's table row, where some sequence brings several rows.
    trows: Option<Tensor>,
    /// `[B]`: each row's pool row for its new token, and its causal length with it (u32).
    targets: Tensor,
    lens: Tensor,
    lmax: usize,
    /// Whether every row of the step is in the batch (in order).
    all: bool,
    /// `[B]`: `0..B`, for a batch of part of its step on a GPU (its rows then run through the
    /// fused kernels as a step of their own, [`Attention::forward`]).
    local_rows: Option<Tensor>,
}

/// A step's decode batch's own row numbers, when it is part of the step on a GPU.
fn db_local_rows<'a>(step: &'a AttentionStep) -> Option<&'a Tensor> {
    step.decode.as_ref().and_then(|db| db.local_rows.as_ref())
}

/// What the unfused decode attention needs besides the tables.
struct Unfused {
    /// `[B, kv_lora_rank]` and `[B, rope]`: each token's pool row, repeated across the width.
    write_ckv: Tensor,
    write_kpe: Tensor,
    /// `[B, 1, Lmax]`: 0 for real positions, −∞ for padding.
    mask: Tensor,
    /// `[B · Lmax]`: the pool rows of each batch row's positions (the table rows expanded).
    gather: Tensor,
}

/// The batch's tables on the host, from which [`Unfused`] is made when needed.
struct HostTables {
    targets: Vec<u32>,
    lens: Vec<u32>,
    /// `[B]` table row of each batch row.
    trows: Vec<u32>,
    /// `[S · Lmax]`.
    gather: Vec<u32>,
    kv_lora: usize,
    rope: usize,
    device: Device,
}

impl DecodeBatch {
    /// `None` when fewer than two sequences of the step decode from a shared pool (one is enough
    /// on a GPU with the fused kernels, whose decode attention needs the batch's tables).
    pub fn plan(
        rows: &[SeqRows],
        caches: &[&mut SequenceCache],
        kv_lora: usize,
        rope: usize,
        device: &Device,
    ) -> Result<Option<Self>> {
        let pool = match caches.first().and_then(|c| c.pool()) {
            Some(p) => p.clone(),
            None => return Ok(None),
        };
        let gpu = crate::cuda::gpu(device).is_some();
        let shared = |i: usize| caches[i].pool().is_some_and(|p| Arc::ptr_eq(p, &pool));
        // Short prefill chunks join a batch that the fused kernels attend through the tables:
        // on a GPU with the fused and flash kernels (the rest of the step, if any, then takes
        // the flash kernel); the unfused path would gather every row's whole prefix.
        let most_rows = crate::cuda::latent_prefill_rows();
        let short = |i: usize| rows[i].len >= 1 && rows[i].len <= most_rows;
        let chunks = gpu
            && most_rows > 1
            && crate::cuda::kernels_enabled()
            && crate::cuda::flash_prefill_enabled();
        let seqs: Vec<usize> = (0..rows.len())
            .filter(|&i| (rows[i].len == 1 || (chunks && short(i))) && shared(i))
            .collect();
        let min_batch = if gpu { 1 } else { 2 };
        if seqs.len() < min_batch {
            return Ok(None);
        }
        let b: usize = seqs.iter().map(|&i| rows[i].len).sum();
        let lmax = seqs
            .iter()
            .map(|&i| caches[i].len() + rows[i].len)
            .max()
            .unwrap_or(1);
        let mut gather = Vec::with_capacity(seqs.len() * lmax);
        let mut targets = Vec::with_capacity(b);
        let mut lens = Vec::with_capacity(b);
        let mut trows = Vec::with_capacity(b);
        let mut row_ids = Vec::with_capacity(b);
        for (s, &i) in seqs.iter().enumerate() {
            let past = caches[i].len();
            let n = past + rows[i].len;
            let own: Vec<u32> = caches[i]
                .pool_rows(n)
                .ok_or_else(|| {
                    EngineError::KvCache("decode batch: KV blocks were not reserved".into())
                })?
                .collect();
            gather.extend_from_slice(&own);
            gather.extend(std::iter::repeat_n(own[n - 1], lmax - n));
            // Row j of the sequence's rows sits at position past + j and sees positions
            // 0..=past + j (causal).
            for j in 0..rows[i].len {
                targets.push(own[past + j]);
                lens.push((past + j + 1) as u32);
                trows.push(s as u32);
                row_ids.push((rows[i].start + j) as u32);
            }
        }
        let all = seqs.len() == rows.len();
        let several = b > seqs.len();
        let s_rows = seqs.len();
        Ok(Some(DecodeBatch {
            targets: Tensor::from_slice(&targets, b, device)?,
            lens: Tensor::from_slice(&lens, b, device)?,
            pool,
            rows: Tensor::from_vec(row_ids, b, device)?,
            unfused: OnceLock::new(),
            gather: Tensor::from_slice(&gather, s_rows * lmax, device)?,
            trows: if several {
                Some(Tensor::from_slice(&trows, b, device)?)
            } else {
                None
            },
            host: Some(HostTables {
                targets,
                lens,
                trows,
                gather,
                kv_lora,
                rope,
                device: device.clone(),
            }),
            lmax,
            all,
            local_rows: if gpu && !all && most_rows > 0 && crate::cuda::kernels_enabled() {
                Some(Tensor::arange(0u32, b as u32, device)?)
            } else {
                None
            },
            seqs,
        }))
    }

    /// A batch of `b` rows (every row of its step, in order) over tables that already sit on
    /// the device (a CUDA graph's fixed buffers, [`crate::graphs`]): `targets`, `lens`, `rows`
    /// `[b]` and `gather [b · lmax]`, all u32. Only the fused kernels attend it.
    pub(crate) fn from_tables(
        pool: Arc<KvPool>,
        targets: Tensor,
        lens: Tensor,
        rows: Tensor,
        gather: Tensor,
        lmax: usize,
    ) -> Result<Self> {
        let b = targets.dim(0)?;
        if lens.dims() != [b] || rows.dims() != [b] || gather.dims() != [b * lmax] {
            return Err(EngineError::Internal(format!(
                "decode tables for {b} rows: lens {:?}, rows {:?}, gather {:?} (lmax {lmax})",
                lens.dims(),
                rows.dims(),
                gather.dims()
            )));
        }
        Ok(DecodeBatch {
            seqs: (0..b).collect(),
            pool,
            rows,
            unfused: OnceLock::new(),
            host: None,
            gather,
            trows: None,
            targets,
            lens,
            lmax,
            all: true,
            local_rows: None,
        })
    }

    /// Rows in the batch (`B`).
    fn len(&self) -> usize {
        self.lens.dims().first().copied().unwrap_or(0)
    }

    /// The fused kernels' view of the batch's tables.
    fn tables(&self) -> crate::cuda::DecodeTables<'_> {
        crate::cuda::DecodeTables {
            qrows: &self.rows,
            lens: &self.lens,
            table: &self.gather,
            lmax: self.lmax,
            trows: self.trows.as_ref(),
        }
    }

    fn unfused(&self) -> Result<&Unfused> {
        if let Some(u) = self.unfused.get() {
            return Ok(u);
        }
        let h = self.host.as_ref().ok_or_else(|| {
            EngineError::Internal(
                "this decode batch is attended by the fused kernels only (a CUDA graph's), and they did not fit".into(),
            )
        })?;
        let (b, lmax) = (h.lens.len(), self.lmax);
        let mut gather = Vec::with_capacity(b * lmax);
        let mut mask = Vec::with_capacity(b * lmax);
        for (&t, &n) in h.trows.iter().zip(&h.lens) {
            let row = t as usize * lmax;
            gather.extend_from_slice(&h.gather[row..row + lmax]);
            mask.extend(std::iter::repeat_n(0f32, n as usize));
            mask.extend(std::iter::repeat_n(f32::NEG_INFINITY, lmax - n as usize));
        }
        let t = Tensor::from_slice(&h.targets, (b, 1), &h.device)?;
        let made = Unfused {
            write_ckv: t.broadcast_as((b, h.kv_lora))?.contiguous()?,
            write_kpe: t.broadcast_as((b, h.rope))?.contiguous()?,
            mask: Tensor::from_vec(mask, (b, 1, lmax), &h.device)?,
            gather: Tensor::from_vec(gather, b * lmax, &h.device)?,
        };
        Ok(self.unfused.get_or_init(|| made))
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    q: QueryProj,
    kv_a_proj_with_mqa: Linear,
    /// On a GPU (no biases): the first query projection's weight (`q_proj`, or `q_a_proj`)
    /// and `kv_a_proj_with_mqa`'s stacked, `[q_out + kv_lora + rope, hidden]`, so that a decode
    /// step computes both from x in one GEMM; those two [`Linear`]s hold row ranges of it (views,
    /// no second copy).
    qkv_a: Option<Linear>,
    kv_a_layernorm: RmsNorm,
    /// `W_UK`, `[heads, qk_nope_head_dim, kv_lora_rank]`.
    w_uk: Tensor,
    /// `W_UVᵀ`, `[heads, kv_lora_rank, v_head_dim]`.
    w_uv_t: Tensor,
    /// `kv_b_proj` itself, `[heads · (nope + v), kv_lora_rank]`: prefill attention expands
    /// the cached latents into per-head keys and values with it (the non-absorbed form: the
    /// flash kernel on a GPU, [`Attention::attend_flash`]; tiles on the CPU,
    /// [`Attention::attend_tiled`]).
    kv_b: Tensor,
    o_proj: Linear,
    heads: usize,
    nope: usize,
    rope: usize,
    v_dim: usize,
    kv_lora: usize,
    scale: f64,
}

impl Attention {
    pub fn new(cfg: &ModelConfig, loader: &Loader, prefix: &str) -> Result<Self> {
        let h = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        let qk = cfg.qk_head_dim();
        let bias = cfg.attention_bias;
        let q = match cfg.q_lora_rank {
            Some(r) => QueryProj::LowRank {
                q_a_proj: Linear::new(loader, &format!("{prefix}.q_a_proj"), h, r, bias)?,
                q_a_layernorm: RmsNorm::new(
                    loader,
                    &format!("{prefix}.q_a_layernorm.weight"),
                    r,
                    cfg.rms_norm_eps,
                )?,
                q_b_proj: Linear::new(loader, &format!("{prefix}.q_b_proj"), r, heads * qk, false)?,
            },
            None => QueryProj::Full {
                q_proj: Linear::new(loader, &format!("{prefix}.q_proj"), h, heads * qk, false)?,
            },
        };
        let kv_lora = cfg.kv_lora_rank;
        let (nope, v_dim) = (cfg.qk_nope_head_dim, cfg.v_head_dim);
        let kv_b = loader.get(
            &format!("{prefix}.kv_b_proj.weight"),
            &[heads * (nope + v_dim), kv_lora],
        )?;
        let mut kv_a_proj_with_mqa = Linear::new(
            loader,
            &format!("{prefix}.kv_a_proj_with_mqa"),
            h,
            kv_lora + cfg.qk_rope_head_dim,
            bias,
        )?;
        let mut q = q;
        let qkv_a = match (&mut q, crate::cuda::gpu(loader.device()).is_some() && !bias) {
            (
                QueryProj::Full { q_proj: first }
                | QueryProj::LowRank {
                    q_a_proj: first, ..
                },
                true,
            ) => {
                let n_first = first.out_dim()?;
                let both = Linear::stack(&[first, &kv_a_proj_with_mqa])?;
                *first = both.rows(0, n_first)?;
                kv_a_proj_with_mqa = both.rows(n_first, both.out_dim()? - n_first)?;
                Some(both)
            }
            (_, false) => None,
        };
        let kv_b3 = kv_b.reshape((heads, nope + v_dim, kv_lora))?;
        let w_uk = kv_b3.narrow(1, 0, nope)?.contiguous()?;
        let w_uv_t = kv_b3
            .narrow(1, nope, v_dim)?
            .transpose(1, 2)?
            .contiguous()?;
        Ok(Attention {
            q,
            kv_a_proj_with_mqa,
            qkv_a,
            kv_a_layernorm: RmsNorm::new(
                loader,
                &format!("{prefix}.kv_a_layernorm.weight"),
                kv_lora,
                cfg.rms_norm_eps,
            )?,
            w_uk,
            w_uv_t,
            kv_b,
            o_proj: Linear::new(loader, &format!("{prefix}.o_proj"), heads * v_dim, h, bias)?,
            heads,
            nope,
            rope: cfg.qk_rope_head_dim,
            v_dim,
            kv_lora,
            scale: cfg.softmax_scale(),
        })
    }

    /// `x: [T, hidden]` (already normed) → `[T, hidden]`. Writes each sequence's new latents into
    /// its cache (`caches[i]` belongs to `step.rows[i]`); the caller commits after the last layer.
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        step: &AttentionStep,
        rotary: &Rotary,
        caches: &mut [&mut SequenceCache],
    ) -> Result<Tensor> {
        let gpu = crate::cuda::gpu(x.device());
        if let Some(db) = &step.decode
            && db.all
            && let Some(g) = &gpu
            && let Some(o) =
                self.forward_decode_fused(g, x, layer, step.cos, step.sin, db, &db.rows, rotary)?
        {
            return self.o_proj.forward(&o);
        }
        // A batch beside prefills that the flash kernel takes: the batch's rows by the fused
        // kernels as a step of their own (their latents written to the pool, attended through
        // the tables), the other sequences below.
        let fused_batch = match (&step.decode, &gpu, &db_local_rows(step)) {
            (Some(db), Some(g), Some(local)) if crate::cuda::flash_prefill_enabled() => {
                let xb = x.index_select(&db.rows, 0)?;
                let cos = step.cos.index_select(&db.rows, 0)?;
                let sin = step.sin.index_select(&db.rows, 0)?;
                self.forward_decode_fused(g, &xb, layer, &cos, &sin, db, local, rotary)?
            }
            _ => None,
        };
        let q = self.queries(x)?;
        let q_nope = q.narrow(2, 0, self.nope)?; // [T, H, nope]
        // Prefill attention on the GPU takes the flash kernel (non-absorbed form), with the
        // rotary as one kernel; on the CPU prefill rows attend non-absorbed in tiles; the
        // decode batch and everything else attend in latent space.
        let flash = crate::cuda::gpu(x.device()).filter(|_| crate::cuda::flash_prefill_enabled());
        let tiled = |rows: &SeqRows| rows.len > 1 && x.device().is_cpu();
        let q_pe_rows = self.rotate(
            flash.as_ref(),
            rotary,
            &q.narrow(2, self.nope, self.rope)?,
            step,
        )?; // [T, H, rope]
        let absorbed_rows = (step.decode.is_some() && fused_batch.is_none())
            || (flash.is_none() && !step.rows.iter().all(tiled));
        let latent = if absorbed_rows {
            // Queries in latent space: [H, T, nope] x [H, nope, kv_lora] -> [H, T, kv_lora].
            let q_lat = q_nope.transpose(0, 1)?.contiguous()?.matmul(&self.w_uk)?;
            Some((q_lat, q_pe_rows.transpose(0, 1)?.contiguous()?)) // q_pe: [H, T, rope]
        } else {
            None
        };

        let kv = self.kv_a_proj_with_mqa.forward(x)?; // [T, kv_lora + rope]
        let ckv = self
            .kv_a_layernorm
            .forward(&kv.narrow(1, 0, self.kv_lora)?.contiguous()?)?;
        let kpe = self.rotate(
            flash.as_ref(),
            rotary,
            &kv.narrow(1, self.kv_lora, self.rope)?,
            step,
        )?; // [T, rope]

        let batched = match (&step.decode, &latent, fused_batch) {
            (Some(_), _, Some(o)) => Some(o),
            (Some(db), Some((q_lat, q_pe)), None) => {
                Some(self.attend_decode_batch(db, layer, q_lat, q_pe, &ckv, &kpe)?)
            }
            _ => None,
        };
        let in_batch = |i: usize| step.decode.as_ref().is_some_and(|db| db.seqs.contains(&i));
        if let (Some(o), Some(db)) = (&batched, &step.decode)
            && db.all
        {
            return self.o_proj.forward(o);
        }
        if caches.len() != step.rows.len() {
            return Err(EngineError::Internal(format!(
                "attention step of {} sequences got {} caches",
                step.rows.len(),
                caches.len()
            )));
        }
        let mut outputs = Vec::with_capacity(step.rows.len());
        // Row order of `outputs` concatenated: the batch first, then the others.
        let mut order: Vec<u32> = Vec::new();
        if let (Some(o), Some(db)) = (batched, &step.decode) {
            outputs.push(o);
            for &i in &db.seqs {
                let r = step.rows[i];
                order.extend((r.start..r.start + r.len).map(|row| row as u32));
            }
        }
        for (i, (rows, cache)) in step.rows.iter().zip(caches.iter_mut()).enumerate() {
            if in_batch(i) {
                continue;
            }
            order.extend((rows.start..rows.start + rows.len).map(|r| r as u32));
            let past = cache.len();
            let (c_all, k_all) = cache.write(
                layer,
                &ckv.narrow(0, rows.start, rows.len)?,
                &kpe.narrow(0, rows.start, rows.len)?,
            )?;
            if let Some(g) = &flash {
                let q = crate::cuda::PrefillQuery {
                    q_nope: &q_nope.narrow(0, rows.start, rows.len)?,
                    q_pe: &q_pe_rows.narrow(0, rows.start, rows.len)?,
                    past,
                };
                if let Some(o) = self.attend_flash(g, &q, &c_all, &k_all)? {
                    outputs.push(o);
                    continue;
                }
            }
            if tiled(rows) {
                let qn = q_nope.narrow(0, rows.start, rows.len)?;
                let qp = q_pe_rows.narrow(0, rows.start, rows.len)?;
                outputs.push(self.attend_tiled(&qn, &qp, &c_all, &k_all, past)?);
                continue;
            }
            let (q_lat, q_pe) = match &latent {
                Some(l) => (l.0.clone(), l.1.clone()),
                None => {
                    let rows_nope = q_nope.narrow(0, rows.start, rows.len)?;
                    let rows_pe = q_pe_rows.narrow(0, rows.start, rows.len)?;
                    (
                        rows_nope
                            .transpose(0, 1)?
                            .contiguous()?
                            .matmul(&self.w_uk)?,
                        rows_pe.transpose(0, 1)?.contiguous()?,
                    )
                }
            };
            // Without `latent` the queries above are this sequence's rows only.
            let (ql, qp) = if latent.is_some() {
                (
                    q_lat.narrow(1, rows.start, rows.len)?,
                    q_pe.narrow(1, rows.start, rows.len)?,
                )
            } else {
                (q_lat, q_pe)
            };
            outputs.push(self.attend(&ql, &qp, &c_all, &k_all, past)?);
        }
        let mut o = Tensor::cat(&outputs, 0)?; // [T, H * v], in `order`
        if step.decode.is_some() {
            // Back to row order: position r of the result is the output of row r.
            let mut inverse = vec![0u32; order.len()];
            for (at, &row) in order.iter().enumerate() {
                inverse[row as usize] = at as u32;
            }
            let n = inverse.len();
            o = o.index_select(&Tensor::from_vec(inverse, n, o.device())?, 0)?;
        }
        self.o_proj.forward(&o)
    }

    /// `x [T, heads, rope]` or `[T, rope]` (a view) rotated by each row's position, contiguous:
    /// one kernel on a GPU with the prefill kernels, else the candle ops.
    fn rotate(
        &self,
        g: Option<&crate::cuda::Gpu>,
        rotary: &Rotary,
        x: &Tensor,
        step: &AttentionStep,
    ) -> Result<Tensor> {
        if let Some(g) = g
            && let Some(r) = g.rope_rows(x, step.cos, step.sin, rotary.interleaved())?
        {
            return Ok(r);
        }
        if let Ok((t, rope)) = x.dims2() {
            let x = x.contiguous()?.reshape((t, 1, rope))?;
            return Ok(rotary.apply(&x, step.cos, step.sin)?.reshape((t, rope))?);
        }
        Ok(rotary
            .apply(&x.contiguous()?, step.cos, step.sin)?
            .contiguous()?)
    }

    /// The queries of `x`'s rows, `[T, H, nope + rope]`.
    fn queries(&self, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(0)?;
        let q = match &self.q {
            QueryProj::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => q_b_proj.forward(&q_a_layernorm.forward(&q_a_proj.forward(x)?)?)?,
            QueryProj::Full { q_proj } => q_proj.forward(x)?,
        };
        Ok(q.reshape((t, self.heads, self.nope + self.rope))?)
    }

    /// A decode batch's rows `x [B, hidden]` (with their rotary tables `cos`, `sin`; `qrows`:
    /// each batch row's row of `x`) with the fused kernels: the new latents are normed, rotated
    /// and written into the pool by one kernel, the query's rotary part lands in the
    /// heads-first layout by another, and attention reads the pool through the block tables (no
    /// gather, no padding mask). `[B, H · v]`, or `None` if a kernel does not fit the shapes
    /// (the caller then takes the general path, which writes the cache itself).
    #[allow(clippy::too_many_arguments)]
    fn forward_decode_fused(
        &self,
        g: &crate::cuda::Gpu,
        x: &Tensor,
        layer: usize,
        cos: &Tensor,
        sin: &Tensor,
        db: &DecodeBatch,
        qrows: &Tensor,
        rotary: &Rotary,
    ) -> Result<Option<Tensor>> {
        let b = db.len();
        let (pool_ckv, pool_kpe) = db.pool.layer(layer);
        // [B, H · (nope + rope)] and [B, kv_lora + rope]: column ranges of one GEMM's output
        // where the weights are stacked.
        let (q, kv) = match &self.qkv_a {
            Some(w) => {
                let y = w.forward(x)?;
                let n_first = y.dim(1)? - (self.kv_lora + self.rope);
                let first = y.narrow(1, 0, n_first)?;
                let q = match &self.q {
                    QueryProj::LowRank {
                        q_a_layernorm,
                        q_b_proj,
                        ..
                    } => q_b_proj.forward(&q_a_layernorm.forward(&first.contiguous()?)?)?,
                    QueryProj::Full { .. } => first,
                };
                (q, y.narrow(1, n_first, self.kv_lora + self.rope)?)
            }
            None => {
                let t = x.dim(0)?;
                let q = self.queries(x)?.reshape((t, ()))?;
                (q, self.kv_a_proj_with_mqa.forward(x)?)
            }
        };
        let norm = (self.kv_a_layernorm.weight(), self.kv_a_layernorm.eps());
        let pool = (&db.targets, pool_ckv, pool_kpe);
        let tables = crate::cuda::DecodeTables {
            qrows,
            ..db.tables()
        };
        // A few rows: the latent products fused with the prep and with the split merge (two
        // launches and a transpose fewer a layer); else the batched GEMMs.
        if crate::cuda::mla_fused()
            && b <= crate::cuda::ABSORB_ROWS
            && let Some((q_lat, q_pe)) = g.decode_prep(
                &q,
                self.heads,
                self.nope,
                Some(&self.w_uk),
                &kv,
                norm,
                (cos, sin),
                rotary.interleaved(),
                pool,
            )?
        {
            let uv = (&self.kv_b, self.nope, self.v_dim);
            if let Some(o) =
                g.mla_decode_uv(&q_lat, &q_pe, pool_ckv, pool_kpe, &tables, self.scale, uv)?
            {
                return Ok(Some(o));
            }
            // The latents are in the pool; attend with the query as the unfused path has it.
            return self
                .attend_pooled(g, db, layer, &q_lat, &q_pe, &tables)
                .map(Some);
        }
        let Some((q_nope, q_pe)) = g.decode_prep(
            &q,
            self.heads,
            self.nope,
            None,
            &kv,
            norm,
            (cos, sin),
            rotary.interleaved(),
            pool,
        )?
        else {
            return Ok(None);
        };
        // [H, B, nope] x [H, nope, kv_lora] -> [H, B, kv_lora].
        let q_lat = q_nope.matmul(&self.w_uk)?;
        self.attend_pooled(g, db, layer, &q_lat, &q_pe, &tables)
            .map(Some)
    }

    /// Decode attention of `q_lat [H, B, kv_lora]`, `q_pe [H, B, rope]` over one layer's pool
    /// (the step's latents already in it), then W_UV → `[B, H · v]`: the decode kernel where it
    /// takes the shapes, else gathered rows and matmuls.
    fn attend_pooled(
        &self,
        g: &crate::cuda::Gpu,
        db: &DecodeBatch,
        layer: usize,
        q_lat: &Tensor,
        q_pe: &Tensor,
        tables: &crate::cuda::DecodeTables,
    ) -> Result<Tensor> {
        let b = db.len();
        let (pool_ckv, pool_kpe) = db.pool.layer(layer);
        let Some(o_lat) = g.mla_decode(q_lat, q_pe, pool_ckv, pool_kpe, tables, self.scale)? else {
            // The latents are in the pool already; attend the unfused way over the same pool.
            let (c, k) = db.pool.gather_rows(layer, &db.unfused()?.gather)?;
            let c = c.reshape((b, db.lmax, self.kv_lora))?;
            let k = k.reshape((b, db.lmax, self.rope))?;
            let ql = q_lat.transpose(0, 1)?.contiguous()?;
            let qp = q_pe.transpose(0, 1)?.contiguous()?;
            let scores = (ql.matmul(&c.transpose(1, 2)?)? + qp.matmul(&k.transpose(1, 2)?)?)?;
            let scores =
                (scores.to_dtype(DType::F32)? * self.scale)?.broadcast_add(&db.unfused()?.mask)?;
            let probs = softmax_last(&scores)?.to_dtype(c.dtype())?;
            let o = probs
                .matmul(&c)?
                .transpose(0, 1)?
                .contiguous()?
                .matmul(&self.w_uv_t)?;
            return Ok(o
                .transpose(0, 1)?
                .contiguous()?
                .reshape((b, self.heads * self.v_dim))?);
        };
        let o = o_lat.matmul(&self.w_uv_t)?; // [H, B, v]
        Ok(o.transpose(0, 1)?
            .contiguous()?
            .reshape((b, self.heads * self.v_dim))?)
    }

    /// The decode batch: `q_lat [H, T, kv_lora]`, `q_pe [H, T, rope]`, the step's new latents
    /// `ckv [T, kv_lora]`, `kpe [T, rope]` → `[B, H · v]`.
    fn attend_decode_batch(
        &self,
        db: &DecodeBatch,
        layer: usize,
        q_lat: &Tensor,
        q_pe: &Tensor,
        ckv: &Tensor,
        kpe: &Tensor,
    ) -> Result<Tensor> {
        let b = db.len();
        let (ckv_b, kpe_b, ql, qp) = if db.all {
            (ckv.clone(), kpe.clone(), q_lat.clone(), q_pe.clone())
        } else {
            (
                ckv.index_select(&db.rows, 0)?,
                kpe.index_select(&db.rows, 0)?,
                q_lat.index_select(&db.rows, 1)?,
                q_pe.index_select(&db.rows, 1)?,
            )
        };
        let unfused = db.unfused()?;
        db.pool.scatter(
            layer,
            &unfused.write_ckv,
            &ckv_b,
            &unfused.write_kpe,
            &kpe_b,
        )?;
        let (c, k) = db.pool.gather_rows(layer, &db.unfused()?.gather)?;
        let c = c.reshape((b, db.lmax, self.kv_lora))?;
        let k = k.reshape((b, db.lmax, self.rope))?;
        let ql = ql.transpose(0, 1)?.contiguous()?; // [B, H, kv_lora]
        let qp = qp.transpose(0, 1)?.contiguous()?; // [B, H, rope]
        let scores = (ql.matmul(&c.transpose(1, 2)?)? + qp.matmul(&k.transpose(1, 2)?)?)?;
        let scores = (scores.to_dtype(DType::F32)? * self.scale)?.broadcast_add(&unfused.mask)?;
        let probs = softmax_last(&scores)?.to_dtype(c.dtype())?; // [B, H, Lmax]
        let o_lat = probs.matmul(&c)?; // [B, H, kv_lora]
        let o = o_lat.transpose(0, 1)?.contiguous()?.matmul(&self.w_uv_t)?; // [H, B, v]
        Ok(o.transpose(0, 1)?
            .contiguous()?
            .reshape((b, self.heads * self.v_dim))?)
    }

    /// One sequence's prefill on the GPU with the flash kernel: its queries against its whole
    /// context (`c [L, kv_lora]`, `k [L, rope]`) → `[n, H · v]`, or `None` if the kernel does
    /// not take the shapes.
    fn attend_flash(
        &self,
        g: &crate::cuda::Gpu,
        q: &crate::cuda::PrefillQuery,
        c: &Tensor,
        k: &Tensor,
    ) -> Result<Option<Tensor>> {
        g.mla_prefill(
            q,
            &c.contiguous()?,
            &k.contiguous()?,
            &self.kv_b,
            self.v_dim,
            self.scale,
            crate::cuda::prefill_kv_chunk(),
        )
    }

    /// One sequence's prefill on the CPU, non-absorbed and tiled: `q_nope [n, H, nope]`,
    /// `q_pe [n, H, rope]` (rotated) against the cached latents `c [L, kv_lora]`, `k [L, rope]`,
    /// the n queries at positions `past..past + n = L` → `[n, H * v]`.
    fn attend_tiled(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        c: &Tensor,
        k: &Tensor,
        past: usize,
    ) -> Result<Tensor> {
        let (n, h, _) = q_nope.dims3()?;
        let l = c.dim(0)?;
        let dtype = c.dtype();
        let dk = self.nope + self.rope;
        let dkv = self.nope + self.v_dim;
        let q = Tensor::cat(&[q_nope, q_pe], 2)?.to_dtype(DType::F32)?; // [n, H, dk]
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let kv_b_t = self.kv_b.t()?; // [kv_lora, H * (nope + v)]
        let mut att = TiledAttention::new(h, n, self.v_dim, past, self.scale as f32);
        for k0 in (0..l).step_by(PREFILL_KEY_CHUNK) {
            let lc = PREFILL_KEY_CHUNK.min(l - k0);
            let kv = c.narrow(0, k0, lc)?.matmul(&kv_b_t)?; // [lc, H * (nope + v)]
            let kv = kv.to_dtype(DType::F32)?.reshape((lc, h, dkv))?;
            let kpe = k
                .narrow(0, k0, lc)?
                .to_dtype(DType::F32)?
                .reshape((lc, 1, self.rope))?;
            let keys = Tensor::cat(
                &[
                    &kv.narrow(2, 0, self.nope)?,
                    &kpe.broadcast_as((lc, h, self.rope))?,
                ],
                2,
            )?; // [lc, H, dk]
            let keys = keys.flatten_all()?.to_vec1::<f32>()?;
            let kv = kv.flatten_all()?.to_vec1::<f32>()?;
            let values = HeadsView {
                data: &kv,
                offset: self.nope,
                row: h * dkv,
                head: dkv,
                dim: self.v_dim,
            }; // [lc, H, v] inside [lc, H, nope + v]
            att.update(
                HeadsView::contiguous(&q, h, dk),
                HeadsView::contiguous(&keys, h, dk),
                values,
                k0,
                lc,
            );
        }
        let o = Tensor::from_vec(att.finish(), (n, h * self.v_dim), c.device())?; // [n, H * v]
        Ok(o.to_dtype(dtype)?)
    }

    /// One sequence: `ql [H, n, kv_lora]`, `qp [H, n, rope]` against `c [L, kv_lora]`,
    /// `k [L, rope]` where the n queries sit at positions `past..past + n` → `[n, H * v]`.
    fn attend(
        &self,
        ql: &Tensor,
        qp: &Tensor,
        c: &Tensor,
        k: &Tensor,
        past: usize,
    ) -> Result<Tensor> {
        let (h, n, _) = ql.dims3()?;
        let l = c.dim(0)?;
        let ql2 = ql.contiguous()?.reshape((h * n, self.kv_lora))?;
        let qp2 = qp.contiguous()?.reshape((h * n, self.rope))?;
        let scores = (ql2.matmul(&c.t()?)? + qp2.matmul(&k.t()?)?)?; // [H*n, L]
        let scores = (scores.to_dtype(DType::F32)? * self.scale)?.reshape((h, n, l))?;
        let scores = if n > 1 {
            scores.broadcast_add(&causal_mask(n, l, past, scores.device())?)?
        } else {
            scores
        };
        let probs = softmax_last(&scores)?
            .to_dtype(c.dtype())?
            .reshape((h * n, l))?;
        let o_lat = probs.matmul(c)?.reshape((h, n, self.kv_lora))?; // [H, n, kv_lora]
        let o = o_lat.matmul(&self.w_uv_t)?; // [H, n, v]
        Ok(o.transpose(0, 1)?
            .contiguous()?
            .reshape((n, h * self.v_dim))?)
    }
}

/// `[n, L]`: 0 where query i (at position `past + i`) may see key j, −∞ after it.
fn causal_mask(n: usize, l: usize, past: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..l).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (n, l), device)?)
}

/// Softmax over the last dimension, in f32.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}
