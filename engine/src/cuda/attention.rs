//! The attention kernels of a decode step: the query split heads-first with its rotary part
//! rotated, the new latents normed, rotated and written into the paged pool, and MLA decode
//! attention (absorbed form) over the block tables, split over the sequence and merged.

use candle_core::{DType, Tensor};

use super::{Arg, Gpu, SMS, aligned16, i32_arg, is_kernel_dtype, suffix};
use crate::error::Result;

/// A step's decode batch as the MLA kernel reads it: per sequence, the activation row of its
/// query, its length (cache plus the new token) and its pool rows (`table [B, lmax]`).
pub struct DecodeTables<'a> {
    pub qrows: &'a Tensor,
    pub lens: &'a Tensor,
    pub table: &'a Tensor,
    pub lmax: usize,
}

impl Gpu {
    /// The decoding query `q [T, H, nope + rope]` (contiguous), split heads-first in one pass:
    /// `(q_nope [H, T, nope], rotated q_pe [H, T, rope])`.
    pub fn split_q(
        &self,
        q: &Tensor,
        nope: usize,
        cos: &Tensor,
        sin: &Tensor,
        interleaved: bool,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let Ok((t, h, width)) = q.dims3() else {
            return Ok(None);
        };
        let rope = width.saturating_sub(nope);
        let dt = q.dtype();
        if !q.is_contiguous()
            || !is_kernel_dtype(dt)
            || rope == 0
            || !rope.is_multiple_of(2)
            || cos.dtype() != dt
            || sin.dtype() != dt
            || !cos.is_contiguous()
            || !sin.is_contiguous()
            || cos.dims() != [t, rope / 2]
            || sin.dims() != [t, rope / 2]
            || t == 0
        {
            return Ok(None);
        }
        let q_nope = self.alloc(dt, &[h, t, nope])?;
        let q_pe = self.alloc(dt, &[h, t, rope])?;
        let n = t * h * (nope + rope / 2);
        let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
        self.launch(
            &format!("split_q_{}", suffix(dt)),
            (blocks, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(q)?),
                Arg::Ptr(self.ptr(&q_nope)?),
                Arg::Ptr(self.ptr(&q_pe)?),
                Arg::Ptr(self.ptr(cos)?),
                Arg::Ptr(self.ptr(sin)?),
                i32_arg(t, "tokens")?,
                i32_arg(h, "heads")?,
                i32_arg(nope, "nope width")?,
                i32_arg(rope, "rotary width")?,
                Arg::I32(i32::from(interleaved)),
            ],
        )?;
        Ok(Some((q_nope, q_pe)))
    }

    /// Normalises and rotates decoding tokens' new latents (`kv [T, kv_lora + rope]` from
    /// kv_a_proj) and writes them at pool rows `dst [T]` of one layer's `pool_ckv`/`pool_kpe`.
    /// Returns `false` (nothing written) when the inputs do not fit the kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_write(
        &self,
        kv: &Tensor,
        norm_w: &Tensor,
        eps: f64,
        cos: &Tensor,
        sin: &Tensor,
        interleaved: bool,
        dst: &Tensor,
        pool_ckv: &Tensor,
        pool_kpe: &Tensor,
    ) -> Result<bool> {
        let (Ok((t, width)), Ok((_, kv_lora)), Ok((_, rope))) =
            (kv.dims2(), pool_ckv.dims2(), pool_kpe.dims2())
        else {
            return Ok(false);
        };
        let dt = kv.dtype();
        if !kv.is_contiguous()
            || !is_kernel_dtype(dt)
            || width != kv_lora + rope
            || pool_ckv.dtype() != dt
            || pool_kpe.dtype() != dt
            || !pool_ckv.is_contiguous()
            || !pool_kpe.is_contiguous()
            || cos.dtype() != dt
            || !cos.is_contiguous()
            || !sin.is_contiguous()
            || cos.dims() != [t, rope / 2]
            || dst.dtype() != DType::U32
            || dst.dims() != [t]
            || norm_w.dtype() != DType::F32
            || t == 0
        {
            return Ok(false);
        }
        self.launch(
            &format!("kv_write_{}", suffix(dt)),
            (t as u32, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(kv)?),
                Arg::Ptr(self.ptr(norm_w)?),
                Arg::F32(eps as f32),
                Arg::Ptr(self.ptr(cos)?),
                Arg::Ptr(self.ptr(sin)?),
                Arg::I32(i32::from(interleaved)),
                Arg::Ptr(self.ptr(dst)?),
                Arg::Ptr(self.ptr(pool_ckv)?),
                Arg::Ptr(self.ptr(pool_kpe)?),
                i32_arg(kv_lora, "kv_lora_rank")?,
                i32_arg(rope, "rotary width")?,
            ],
        )?;
        Ok(true)
    }

    /// MLA decode attention over the paged pool: `q_lat [H, T, kv_lora]`, `q_pe [H, T, rope]`
    /// (contiguous) against one layer's pool → `o_lat [H, B, kv_lora]`.
    pub fn mla_decode(
        &self,
        q_lat: &Tensor,
        q_pe: &Tensor,
        pool_ckv: &Tensor,
        pool_kpe: &Tensor,
        tables: &DecodeTables,
        scale: f64,
    ) -> Result<Option<Tensor>> {
        let (Ok((h, t, kv_lora)), Ok((h2, t2, rope))) = (q_lat.dims3(), q_pe.dims3()) else {
            return Ok(None);
        };
        let b = tables.qrows.dim(0)?;
        let dt = q_lat.dtype();
        let threads = 256usize;
        if h != h2
            || t != t2
            || !q_lat.is_contiguous()
            || !q_pe.is_contiguous()
            || !is_kernel_dtype(dt)
            || q_pe.dtype() != dt
            || pool_ckv.dtype() != dt
            || pool_kpe.dtype() != dt
            || pool_ckv.dim(1)? != kv_lora
            || pool_kpe.dim(1)? != rope
            || !kv_lora.is_multiple_of(8)
            || !rope.is_multiple_of(8)
            || kv_lora > 4 * threads
            || !aligned16(pool_ckv)
            || !aligned16(pool_kpe)
            || b == 0
            || tables.table.dtype() != DType::U32
            || tables.lens.dtype() != DType::U32
            || tables.qrows.dtype() != DType::U32
        {
            return Ok(None);
        }
        const HB: usize = 4;
        let stride = kv_lora + rope + 4;
        let smem = |tile: usize| (HB * stride + tile * stride + HB * tile + 3 * HB) * 4;
        let tile = [16usize, 8, 4]
            .into_iter()
            .find(|&tl| smem(tl) <= 48 * 1024)
            .unwrap_or(4);
        let out = self.alloc(dt, &[h, b, kv_lora])?;
        // Split each sequence over enough blocks for about two waves of the GPU's
        // multiprocessors (flash decoding), at least one tile per split.
        let blocks = b * h.div_ceil(HB);
        let splits = (2 * SMS)
            .div_ceil(blocks)
            .min(tables.lmax.div_ceil(tile))
            .clamp(1, 64);
        let parts = if splits > 1 {
            Some((
                self.alloc(DType::F32, &[b, h, splits, kv_lora])?,
                self.alloc(DType::F32, &[b, h, splits, 2])?,
            ))
        } else {
            None
        };
        let (part_o, part_ml) = match &parts {
            Some((o, ml)) => (self.ptr(o)?, self.ptr(ml)?),
            None => (0, 0),
        };
        self.launch(
            &format!("mla_decode_{}", suffix(dt)),
            (b as u32, h.div_ceil(HB) as u32, splits as u32),
            threads as u32,
            smem(tile) as u32,
            &[
                Arg::Ptr(self.ptr(q_lat)?),
                Arg::I64((t * kv_lora) as i64),
                Arg::I64(kv_lora as i64),
                Arg::Ptr(self.ptr(q_pe)?),
                Arg::I64((t * rope) as i64),
                Arg::I64(rope as i64),
                Arg::Ptr(self.ptr(pool_ckv)?),
                Arg::Ptr(self.ptr(pool_kpe)?),
                Arg::Ptr(self.ptr(tables.table)?),
                i32_arg(tables.lmax, "longest sequence")?,
                Arg::Ptr(self.ptr(tables.lens)?),
                Arg::Ptr(self.ptr(tables.qrows)?),
                Arg::Ptr(self.ptr(&out)?),
                Arg::I64((b * kv_lora) as i64),
                Arg::I64(kv_lora as i64),
                i32_arg(h, "heads")?,
                i32_arg(kv_lora, "kv_lora_rank")?,
                i32_arg(rope, "rotary width")?,
                i32_arg(tile, "tile")?,
                Arg::F32(scale as f32),
                i32_arg(splits, "splits")?,
                Arg::Ptr(part_o),
                Arg::Ptr(part_ml),
            ],
        )?;
        if parts.is_some() {
            self.launch(
                &format!("mla_combine_{}", suffix(dt)),
                (b as u32, h as u32, 1),
                128,
                0,
                &[
                    Arg::Ptr(part_o),
                    Arg::Ptr(part_ml),
                    i32_arg(splits, "splits")?,
                    i32_arg(h, "heads")?,
                    i32_arg(kv_lora, "kv_lora_rank")?,
                    Arg::Ptr(self.ptr(&out)?),
                    Arg::I64((b * kv_lora) as i64),
                    Arg::I64(kv_lora as i64),
                ],
            )?;
        }
        Ok(Some(out))
    }
}
