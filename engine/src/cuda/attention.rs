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
    /// `[S · lmax]`: pool rows of each table row's positions.
    pub table: &'a Tensor,
    pub lmax: usize,
    /// `[B]`: each batch row's table row; `None`: row `b` has table row `b` (S = B). Rows of one
    /// sequence's prefill chunk share a table row, each with its own (causal) length.
    pub trows: Option<&'a Tensor>,
}

impl Gpu {
    /// A decode step's attention inputs in one launch: the query `q [T, H · (nope + rope)]`
    /// split heads-first, with its rotary part rotated (`q_pe [H, T, rope]`), and the new
    /// latents `kv [T, kv_lora + rope]` (kv_a_proj's output) normalised (`norm_w`, `eps`),
    /// rotated and written at pool rows `dst [T]` of one layer's `pool_ckv`/`pool_kpe`. Rows of
    /// `q` and `kv` may be strided (e.g. column ranges of one projection's output). Returns
    /// `(q_nope [H, T, nope], q_pe)`; or, given `w_uk [H, nope, kv_lora]` (the absorbed
    /// decode's W_UK), `(q_lat [H, T, kv_lora] = q_nope · w_uk, q_pe)` from the same launch (no
    /// q_nope tensor, no batched GEMM: attention.cu's `mla_decode_prep_absorb_bf16`, bf16, at
    /// most eight rows, kv_lora a multiple of 64). `None` (nothing written) when the inputs do
    /// not fit the kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_prep(
        &self,
        q: &Tensor,
        heads: usize,
        nope: usize,
        w_uk: Option<&Tensor>,
        kv: &Tensor,
        norm: (&Tensor, f64),
        rot: (&Tensor, &Tensor),
        interleaved: bool,
        pool: (&Tensor, &Tensor, &Tensor),
    ) -> Result<Option<(Tensor, Tensor)>> {
        let Some(p) = Self::prep_fits(q, heads, nope, kv, norm, rot, pool)? else {
            return Ok(None);
        };
        let dt = q.dtype();
        let absorb_fits = |w: &Tensor| {
            dt == DType::BF16
                && p.t <= ABSORB_ROWS
                && nope <= ABSORB_MAX_NOPE
                && p.kv_lora.is_multiple_of(64)
                && w.dtype() == DType::BF16
                && w.is_contiguous()
                && aligned16(w)
                && w.dims() == [heads, nope, p.kv_lora]
        };
        if w_uk.is_some_and(|w| !absorb_fits(w)) {
            return Ok(None);
        }
        let first = self.alloc(dt, &[heads, p.t, w_uk.map_or(nope, |_| p.kv_lora)])?;
        let q_pe = self.alloc(dt, &[heads, p.t, p.rope])?;
        // The query's arguments (the kernels differ there), then the latents'.
        let (name, blocks, mut args) = match w_uk {
            Some(w) => (
                "mla_decode_prep_absorb_bf16".to_string(),
                heads * p.kv_lora / 64,
                vec![
                    Arg::Ptr(self.ptr(q)?),
                    Arg::I64(p.q_stride as i64),
                    Arg::Ptr(self.ptr(w)?),
                    Arg::Ptr(self.ptr(&first)?),
                    Arg::Ptr(self.ptr(&q_pe)?),
                    i32_arg(heads, "heads")?,
                    i32_arg(nope, "nope width")?,
                ],
            ),
            None => {
                let n = p.t * heads * (nope + p.rope / 2);
                let split_blocks = n.div_ceil(256).clamp(1, 65_535);
                (
                    format!("mla_decode_prep_{}", suffix(dt)),
                    split_blocks,
                    vec![
                        Arg::Ptr(self.ptr(q)?),
                        Arg::I64(p.q_stride as i64),
                        Arg::Ptr(self.ptr(&first)?),
                        Arg::Ptr(self.ptr(&q_pe)?),
                        i32_arg(heads, "heads")?,
                        i32_arg(nope, "nope width")?,
                        i32_arg(split_blocks, "query blocks")?,
                    ],
                )
            }
        };
        let ((norm_w, eps), (cos, sin), (dst, pool_ckv, pool_kpe)) = (norm, rot, pool);
        args.extend([
            Arg::Ptr(self.ptr(kv)?),
            Arg::I64(p.kv_stride as i64),
            Arg::Ptr(self.ptr(norm_w)?),
            Arg::F32(eps as f32),
            Arg::Ptr(self.ptr(dst)?),
            Arg::Ptr(self.ptr(pool_ckv)?),
            Arg::Ptr(self.ptr(pool_kpe)?),
            i32_arg(p.kv_lora, "kv_lora_rank")?,
            Arg::Ptr(self.ptr(cos)?),
            Arg::Ptr(self.ptr(sin)?),
            i32_arg(p.t, "tokens")?,
            i32_arg(p.rope, "rotary width")?,
            Arg::I32(i32::from(interleaved)),
        ]);
        // The query's blocks, then one a token for its latents.
        self.launch(&name, ((blocks + p.t) as u32, 1, 1), 256, 0, &args)?;
        Ok(Some((first, q_pe)))
    }

    /// The shapes [`decode_prep`](Self::decode_prep)'s kernels take, or `None`.
    fn prep_fits(
        q: &Tensor,
        heads: usize,
        nope: usize,
        kv: &Tensor,
        (norm_w, _eps): (&Tensor, f64),
        (cos, sin): (&Tensor, &Tensor),
        (dst, pool_ckv, pool_kpe): (&Tensor, &Tensor, &Tensor),
    ) -> Result<Option<PrepShape>> {
        let (Ok((t, q_width)), Ok((t_kv, width)), Ok((_, kv_lora)), Ok((_, rope))) =
            (q.dims2(), kv.dims2(), pool_ckv.dims2(), pool_kpe.dims2())
        else {
            return Ok(None);
        };
        let dt = q.dtype();
        let (Some(q_stride), Some(kv_stride)) = (row_stride(q), row_stride(kv)) else {
            return Ok(None);
        };
        let fits = is_kernel_dtype(dt)
            && t != 0
            && t_kv == t
            && heads != 0
            && q_width == heads * (nope + rope)
            && width == kv_lora + rope
            && rope != 0
            && rope.is_multiple_of(2)
            && kv.dtype() == dt
            && pool_ckv.dtype() == dt
            && pool_kpe.dtype() == dt
            && pool_ckv.is_contiguous()
            && pool_kpe.is_contiguous()
            && cos.dtype() == dt
            && sin.dtype() == dt
            && cos.is_contiguous()
            && sin.is_contiguous()
            && cos.dims() == [t, rope / 2]
            && sin.dims() == [t, rope / 2]
            && dst.dtype() == DType::U32
            && dst.dims() == [t]
            && norm_w.dtype() == DType::F32;
        Ok(fits.then_some(PrepShape {
            t,
            kv_lora,
            rope,
            q_stride,
            kv_stride,
        }))
    }

    /// MLA decode attention over the paged pool: `q_lat [H, T, kv_lora]`, `q_pe [H, T, rope]`
    /// (contiguous) against one layer's pool → `o_lat [H, B, kv_lora]`: on the tensor cores
    /// ([`mla_decode_mma`](Self::mla_decode_mma)) where the shapes allow and
    /// `MOEMESH_MLA_DECODE` is not `simple`, else [`mla_decode_simple`](Self::mla_decode_simple).
    pub fn mla_decode(
        &self,
        q_lat: &Tensor,
        q_pe: &Tensor,
        pool_ckv: &Tensor,
        pool_kpe: &Tensor,
        tables: &DecodeTables,
        scale: f64,
    ) -> Result<Option<Tensor>> {
        if super::mla_decode_kernel() == "mma"
            && let Some(o) = self.mla_decode_mma(q_lat, q_pe, pool_ckv, pool_kpe, tables, scale)?
        {
            return Ok(Some(o));
        }
        self.mla_decode_simple(q_lat, q_pe, pool_ckv, pool_kpe, tables, scale)
    }

    /// The decode kernels' shapes, when they take these inputs.
    fn decode_fits(
        q_lat: &Tensor,
        q_pe: &Tensor,
        pool_ckv: &Tensor,
        pool_kpe: &Tensor,
        tables: &DecodeTables,
    ) -> Result<Option<DecodeShape>> {
        let (Ok((h, t, kv_lora)), Ok((h2, t2, rope))) = (q_lat.dims3(), q_pe.dims3()) else {
            return Ok(None);
        };
        let b = tables.qrows.dim(0)?;
        let dt = q_lat.dtype();
        let fits = h == h2
            && t == t2
            && q_lat.is_contiguous()
            && q_pe.is_contiguous()
            && is_kernel_dtype(dt)
            && q_pe.dtype() == dt
            && pool_ckv.dtype() == dt
            && pool_kpe.dtype() == dt
            && pool_ckv.dim(1)? == kv_lora
            && pool_kpe.dim(1)? == rope
            && kv_lora.is_multiple_of(8)
            && rope.is_multiple_of(8)
            && aligned16(pool_ckv)
            && aligned16(pool_kpe)
            && aligned16(q_lat)
            && aligned16(q_pe)
            && b > 0
            && tables.table.dtype() == DType::U32
            && tables.lens.dtype() == DType::U32
            && tables.qrows.dtype() == DType::U32
            && tables
                .trows
                .is_none_or(|t| t.dtype() == DType::U32 && t.dims() == [b]);
        Ok(fits.then_some(DecodeShape {
            h,
            t,
            kv_lora,
            rope,
            b,
        }))
    }

    /// [`mla_decode`](Self::mla_decode) on the CUDA cores in f32 (f32 or bf16 tensors, four
    /// heads a block).
    pub fn mla_decode_simple(
        &self,
        q_lat: &Tensor,
        q_pe: &Tensor,
        pool_ckv: &Tensor,
        pool_kpe: &Tensor,
        tables: &DecodeTables,
        scale: f64,
    ) -> Result<Option<Tensor>> {
        let Some(DecodeShape {
            h,
            t,
            kv_lora,
            rope,
            b,
        }) = Self::decode_fits(q_lat, q_pe, pool_ckv, pool_kpe, tables)?
        else {
            return Ok(None);
        };
        let dt = q_lat.dtype();
        let threads = 256usize;
        if kv_lora > 4 * threads {
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
        let split = self.decode_splits(b, h, kv_lora, b * h.div_ceil(HB), tables.lmax, tile)?;
        let (splits, (part_o, part_ml)) = (split.splits, self.split_ptrs(&split)?);
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
                Arg::Ptr(tables.trows.map_or(Ok(0), |t| self.ptr(t))?),
            ],
        )?;
        self.merge_splits(&split, &out)?;
        Ok(Some(out))
    }
}

/// How a decode attention call splits each sequence (flash decoding), with the partial states
/// the splits write when there is more than one.
struct Splits {
    b: usize,
    h: usize,
    kv_lora: usize,
    splits: usize,
    /// `part_o [b, h, splits, kv_lora]` and `part_ml [b, h, splits, 2]` (running max, sum), f32.
    parts: Option<(Tensor, Tensor)>,
}

/// A decode prep call's shapes: query rows, latent and rotary widths, the row strides of the
/// query and of the latents' source.
struct PrepShape {
    t: usize,
    kv_lora: usize,
    rope: usize,
    q_stride: usize,
    kv_stride: usize,
}

/// attention.cu's `MLA_ABSORB_ROWS`, `MLA_ABSORB_MAX_NOPE`: the fused absorbed products take at
/// most this many query rows (and sequences) and nope widths.
pub const ABSORB_ROWS: usize = 8;
const ABSORB_MAX_NOPE: usize = 256;
/// attention.cu's `MLA_UV_COLS`: value columns a block of `mla_combine_uv_bf16` takes.
const UV_COLS: usize = 16;

/// A decode attention call's shapes: heads, query rows, latent and rotary widths, sequences.
struct DecodeShape {
    h: usize,
    t: usize,
    kv_lora: usize,
    rope: usize,
    b: usize,
}

/// The tensor-core decode kernel's shapes (attention.cu's `MLA_MMA_*`): latent and latent +
/// rotary widths, positions per tile, shared memory.
const MMA_VD: usize = 512;
const MMA_QK: usize = 576;
const MMA_TILE: usize = 64;
const MMA_SMEM: usize = (16 + MMA_TILE) * (MMA_QK + 8) * 2 + 16 * (MMA_TILE + 4) * 4 + 3 * 16 * 4;

impl Gpu {
    /// Splits for `blocks` blocks per split over `b` sequences of `h` heads: enough for about
    /// two waves of the GPU's multiprocessors, at least one `tile` of the `lmax` positions per
    /// split, at most 64 (`mla_combine`'s bound); partial states allocated when more than one.
    fn decode_splits(
        &self,
        b: usize,
        h: usize,
        kv_lora: usize,
        blocks: usize,
        lmax: usize,
        tile: usize,
    ) -> Result<Splits> {
        let splits = (2 * SMS)
            .div_ceil(blocks)
            .min(lmax.div_ceil(tile))
            .clamp(1, 64);
        let parts = if splits > 1 {
            Some((
                self.alloc(DType::F32, &[b, h, splits, kv_lora])?,
                self.alloc(DType::F32, &[b, h, splits, 2])?,
            ))
        } else {
            None
        };
        Ok(Splits {
            b,
            h,
            kv_lora,
            splits,
            parts,
        })
    }

    /// The partial states' addresses (0, 0 for one split: the kernel writes the output).
    fn split_ptrs(&self, split: &Splits) -> Result<(u64, u64)> {
        Ok(match &split.parts {
            Some((o, ml)) => (self.ptr(o)?, self.ptr(ml)?),
            None => (0, 0),
        })
    }

    /// `mla_combine` of the splits into `out [h, b, kv_lora]`; nothing for one split.
    fn merge_splits(&self, split: &Splits, out: &Tensor) -> Result<()> {
        let Some((o, ml)) = &split.parts else {
            return Ok(());
        };
        let (b, h, kv_lora) = (split.b, split.h, split.kv_lora);
        self.launch(
            &format!("mla_combine_{}", suffix(out.dtype())),
            (b as u32, h as u32, 1),
            128,
            0,
            &[
                Arg::Ptr(self.ptr(o)?),
                Arg::Ptr(self.ptr(ml)?),
                i32_arg(split.splits, "splits")?,
                i32_arg(h, "heads")?,
                i32_arg(kv_lora, "kv_lora_rank")?,
                Arg::Ptr(self.ptr(out)?),
                Arg::I64((b * kv_lora) as i64),
                Arg::I64(kv_lora as i64),
            ],
        )
    }

    /// [`mla_decode`](Self::mla_decode) on the tensor cores: one block per (sequence, 16 heads,
    /// split). `None` unless bf16 with DeepSeek's 512 + 64 latent and heads in groups of 16.
    pub fn mla_decode_mma(
        &self,
        q_lat: &Tensor,
        q_pe: &Tensor,
        pool_ckv: &Tensor,
        pool_kpe: &Tensor,
        tables: &DecodeTables,
        scale: f64,
    ) -> Result<Option<Tensor>> {
        let Some((split, out)) =
            self.mla_decode_mma_split(q_lat, q_pe, pool_ckv, pool_kpe, tables, scale)?
        else {
            return Ok(None);
        };
        self.merge_splits(&split, &out)?;
        Ok(Some(out))
    }

    /// The tensor-core decode kernel's launch, its splits not yet merged: the split state, and
    /// `o_lat [H, B, kv_lora]`, which holds the result only when there is one split.
    fn mla_decode_mma_split(
        &self,
        q_lat: &Tensor,
        q_pe: &Tensor,
        pool_ckv: &Tensor,
        pool_kpe: &Tensor,
        tables: &DecodeTables,
        scale: f64,
    ) -> Result<Option<(Splits, Tensor)>> {
        let Some(DecodeShape {
            h,
            t,
            kv_lora,
            rope,
            b,
        }) = Self::decode_fits(q_lat, q_pe, pool_ckv, pool_kpe, tables)?
        else {
            return Ok(None);
        };
        if q_lat.dtype() != DType::BF16
            || kv_lora != MMA_VD
            || rope != MMA_QK - MMA_VD
            || !h.is_multiple_of(16)
        {
            return Ok(None);
        }
        let out = self.alloc(DType::BF16, &[h, b, kv_lora])?;
        let split = self.decode_splits(b, h, kv_lora, b * (h / 16), tables.lmax, MMA_TILE)?;
        let (splits, (part_o, part_ml)) = (split.splits, self.split_ptrs(&split)?);
        self.launch(
            "mla_decode_mma_bf16",
            (b as u32, (h / 16) as u32, splits as u32),
            128,
            MMA_SMEM as u32,
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
                Arg::F32(scale as f32),
                i32_arg(splits, "splits")?,
                Arg::Ptr(part_o),
                Arg::Ptr(part_ml),
                Arg::Ptr(tables.trows.map_or(Ok(0), |t| self.ptr(t))?),
            ],
        )?;
        Ok(Some((split, out)))
    }

    /// Absorbed decode attention and its value projection, fused at the small side: the
    /// tensor-core decode kernel, then one launch that merges its splits and applies W_UV
    /// (rows `nope .. nope + v_dim` of each head's block of `kv_b [H · (nope + v), kv_lora]`,
    /// kv_b_proj as stored) → `[B, H · v]`, o_proj's input (attention.cu's
    /// `mla_combine_uv_bf16`; no o_lat tensor, GEMM or transpose). `None` (nothing launched)
    /// unless the tensor-core kernel takes the inputs and there are at most eight sequences.
    #[allow(clippy::too_many_arguments)]
    pub fn mla_decode_uv(
        &self,
        q_lat: &Tensor,
        q_pe: &Tensor,
        pool_ckv: &Tensor,
        pool_kpe: &Tensor,
        tables: &DecodeTables,
        scale: f64,
        (kv_b, nope, v_dim): (&Tensor, usize, usize),
    ) -> Result<Option<Tensor>> {
        let (Ok((h, _, kv_lora)), Ok(b)) = (q_lat.dims3(), tables.qrows.dim(0)) else {
            return Ok(None);
        };
        if b == 0
            || b > ABSORB_ROWS
            || v_dim == 0
            || !v_dim.is_multiple_of(UV_COLS)
            || kv_lora != MMA_VD
            || kv_b.dtype() != DType::BF16
            || !kv_b.is_contiguous()
            || !aligned16(kv_b)
            || kv_b.dims() != [h * (nope + v_dim), kv_lora]
        {
            return Ok(None);
        }
        let Some((split, o_lat)) =
            self.mla_decode_mma_split(q_lat, q_pe, pool_ckv, pool_kpe, tables, scale)?
        else {
            return Ok(None);
        };
        let (part_o, part_ml) = self.split_ptrs(&split)?;
        let out = self.alloc(DType::BF16, &[b, h * v_dim])?;
        self.launch(
            "mla_combine_uv_bf16",
            (h as u32, (v_dim / UV_COLS) as u32, 1),
            256,
            0,
            &[
                Arg::Ptr(part_o),
                Arg::Ptr(part_ml),
                i32_arg(split.splits, "splits")?,
                Arg::Ptr(self.ptr(&o_lat)?),
                i32_arg(b, "sequences")?,
                i32_arg(h, "heads")?,
                Arg::Ptr(self.ptr(kv_b)?),
                i32_arg(nope, "nope width")?,
                i32_arg(v_dim, "value width")?,
                Arg::Ptr(self.ptr(&out)?),
            ],
        )?;
        Ok(Some(out))
    }

    /// Rotary of a `[T, H, rope]` or `[T, rope]` view whose last dimension is contiguous (rows
    /// and heads may be strided, e.g. the rotary part of `q [T, H, nope + rope]`) → contiguous
    /// `[T, H, rope]` / `[T, rope]`, in f32 and rounded once. `cos`/`sin` `[T, rope / 2]`.
    pub fn rope_rows(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        interleaved: bool,
    ) -> Result<Option<Tensor>> {
        let dims = x.dims().to_vec();
        let st = x.stride().to_vec();
        let (t, heads, rope, rs, hs) = match (dims.as_slice(), st.as_slice()) {
            ([t, h, d], [rs, hs, 1]) => (*t, *h, *d, *rs, *hs),
            ([t, d], [rs, 1]) => (*t, 1, *d, *rs, 0),
            _ => return Ok(None),
        };
        let dt = x.dtype();
        if !is_kernel_dtype(dt)
            || rope == 0
            || !rope.is_multiple_of(2)
            || t == 0
            || cos.dtype() != dt
            || sin.dtype() != dt
            || !cos.is_contiguous()
            || !sin.is_contiguous()
            || cos.dims() != [t, rope / 2]
            || sin.dims() != [t, rope / 2]
        {
            return Ok(None);
        }
        let out = self.alloc(dt, &dims)?;
        let n = t * heads * rope / 2;
        self.launch(
            &format!("rope_rows_{}", suffix(dt)),
            (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(x)?),
                i32_arg(rs, "row stride")?,
                i32_arg(hs, "head stride")?,
                Arg::Ptr(self.ptr(cos)?),
                Arg::Ptr(self.ptr(sin)?),
                Arg::Ptr(self.ptr(&out)?),
                i32_arg(t, "tokens")?,
                i32_arg(heads, "heads")?,
                i32_arg(rope, "rotary width")?,
                Arg::I32(i32::from(interleaved)),
            ],
        )?;
        Ok(Some(out))
    }

    /// Writes `ckv [n, kv_lora]` and `kpe [n, rope]` (normed and rotated) at pool rows
    /// `rows [n]` (u32) of one layer's `pool_ckv`/`pool_kpe`, in one launch. `false` (nothing
    /// written) when the inputs do not fit the kernel.
    pub fn pool_write(
        &self,
        ckv: &Tensor,
        kpe: &Tensor,
        rows: &Tensor,
        pool_ckv: &Tensor,
        pool_kpe: &Tensor,
    ) -> Result<bool> {
        let (Ok((n, kv_lora)), Ok((n2, rope)), Ok((_, kv_lora2)), Ok((_, rope2))) =
            (ckv.dims2(), kpe.dims2(), pool_ckv.dims2(), pool_kpe.dims2())
        else {
            return Ok(false);
        };
        let dt = ckv.dtype();
        if n != n2
            || n == 0
            || kv_lora != kv_lora2
            || rope != rope2
            || !is_kernel_dtype(dt)
            || [kpe.dtype(), pool_ckv.dtype(), pool_kpe.dtype()]
                .iter()
                .any(|&d| d != dt)
            || ![ckv, kpe, pool_ckv, pool_kpe]
                .iter()
                .all(|t| t.is_contiguous())
            || rows.dtype() != DType::U32
            || rows.dims() != [n]
        {
            return Ok(false);
        }
        self.launch(
            &format!("pool_write_{}", suffix(dt)),
            (n as u32, 1, 1),
            128,
            0,
            &[
                Arg::Ptr(self.ptr(ckv)?),
                Arg::Ptr(self.ptr(kpe)?),
                Arg::Ptr(self.ptr(rows)?),
                Arg::Ptr(self.ptr(pool_ckv)?),
                Arg::Ptr(self.ptr(pool_kpe)?),
                i32_arg(kv_lora, "kv_lora_rank")?,
                i32_arg(rope, "rotary width")?,
            ],
        )?;
        Ok(true)
    }
}

/// One sequence's new queries for [`Gpu::mla_prefill`]: `q_nope [n, H, nope]` and the rotated
/// `q_pe [n, H, rope]` (rows and heads may be strided, the last dimension contiguous), the first
/// at position `past` (the tokens already in the cache).
pub struct PrefillQuery<'a> {
    pub q_nope: &'a Tensor,
    pub q_pe: &'a Tensor,
    pub past: usize,
}

/// Row and head strides (elements) of a `[n, H, d]` view whose last dimension is contiguous.
fn row_head_strides(t: &Tensor) -> Option<(usize, usize)> {
    let s = t.stride();
    (t.rank() == 3 && s[2] == 1).then(|| (s[0], s[1]))
}

impl Gpu {
    /// Prefill attention for one sequence in the non-absorbed form (flash-style: online softmax,
    /// causal mask in the kernel, nothing of size queries × context materialised): the queries
    /// against the sequence's whole context, its latents `c [L, kv_lora]` and rotated `k_pe
    /// [L, rope]` (L = past + n, the new tokens' included). Keys and values are expanded with
    /// `kv_b [H·(nope + v), kv_lora]` (`kv_b_proj`) at most `chunk` positions at a time; chunks
    /// are merged by log-sum-exp. → `[n, H · v]`, or `None` if the shapes do not fit a kernel.
    /// bf16 runs on the tensor cores for (nope, rope, v) = (128, 64, 128) (DeepSeek V2/V3) and
    /// (32, 16, 32) (the test fixtures), the probabilities split into two bf16 parts for p·v
    /// unless `MOEMESH_PREFILL_ATTN` says otherwise; f32 and other shapes on the CUDA cores.
    #[allow(clippy::too_many_arguments)]
    pub fn mla_prefill(
        &self,
        q: &PrefillQuery,
        c: &Tensor,
        k_pe: &Tensor,
        kv_b: &Tensor,
        v_dim: usize,
        scale: f64,
        chunk: usize,
    ) -> Result<Option<Tensor>> {
        let (Ok((n, heads, nope)), Ok((n2, heads2, rope)), Ok((l, kv_lora)), Ok((l2, rope2))) =
            (q.q_nope.dims3(), q.q_pe.dims3(), c.dims2(), k_pe.dims2())
        else {
            return Ok(None);
        };
        let dt = q.q_nope.dtype();
        let (Some((qn_rs, qn_hs)), Some((qp_rs, qp_hs))) =
            (row_head_strides(q.q_nope), row_head_strides(q.q_pe))
        else {
            return Ok(None);
        };
        let fits = n == n2
            && heads == heads2
            && rope == rope2
            && l == l2
            && l == q.past + n
            && n > 0
            && is_kernel_dtype(dt)
            && [q.q_pe.dtype(), c.dtype(), k_pe.dtype(), kv_b.dtype()]
                .iter()
                .all(|&d| d == dt)
            && c.is_contiguous()
            && k_pe.is_contiguous()
            && kv_b.dims() == [heads * (nope + v_dim), kv_lora]
            && v_dim <= 256
            && chunk > 0;
        if !fits {
            return Ok(None);
        }
        let variant = super::prefill_attn_kernel();
        let mma_name = match (nope, rope, v_dim, variant) {
            (_, _, _, "simple") => None,
            (128, 64, 128, "split") => Some("mla_prefill_mma_split_192_128"),
            (32, 16, 32, "split") => Some("mla_prefill_mma_split_48_32"),
            (128, 64, 128, _) => Some("mla_prefill_mma_192_128"),
            (32, 16, 32, _) => Some("mla_prefill_mma_48_32"),
            _ => None,
        };
        // The tensor-core kernel copies 16-byte pieces: rows, heads and bases 16-byte aligned.
        let aligned = [qn_rs, qn_hs, qp_rs, qp_hs, rope]
            .iter()
            .all(|s| s % 8 == 0)
            && aligned16(q.q_nope)
            && aligned16(q.q_pe)
            && aligned16(k_pe);
        let mma = dt == DType::BF16 && aligned && mma_name.is_some();
        let out = self.alloc(dt, &[n, heads * v_dim])?;
        let chunks = l.div_ceil(chunk);
        let (o_state, lse_state) = if chunks > 1 {
            (
                Some(self.alloc(DType::F32, &[n, heads, v_dim])?),
                Some(self.alloc(DType::F32, &[n, heads])?),
            )
        } else {
            (None, None)
        };
        let state_ptr = |t: &Option<Tensor>| t.as_ref().map_or(Ok(0), |t| self.ptr(t));
        let kv_b_t = kv_b.t()?;
        let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
        for ci in 0..chunks {
            let c0 = ci * chunk;
            let len = chunk.min(l - c0);
            // [len, H·(nope + v)]: each head's k_nope, then its v.
            let kv = c.narrow(0, c0, len)?.matmul(&kv_b_t)?;
            let kpe = k_pe.narrow(0, c0, len)?;
            let last = ci + 1 == chunks;
            let mut args = vec![
                Arg::Ptr(self.ptr(q.q_nope)?),
                i32_arg(qn_rs, "query row stride")?,
                i32_arg(qn_hs, "query head stride")?,
                Arg::Ptr(self.ptr(q.q_pe)?),
                i32_arg(qp_rs, "query row stride")?,
                i32_arg(qp_hs, "query head stride")?,
                Arg::Ptr(self.ptr(&kv)?),
                i32_arg(heads * (nope + v_dim), "expanded key width")?,
                Arg::Ptr(self.ptr(&kpe)?),
                i32_arg(rope, "rotary width")?,
                i32_arg(n, "prefill tokens")?,
                i32_arg(len, "context chunk")?,
                i32_arg(heads, "heads")?,
                i32_arg(q.past, "past tokens")?,
                i32_arg(c0, "chunk start")?,
                Arg::F32(scale_log2),
                Arg::Ptr(state_ptr(&o_state)?),
                Arg::Ptr(state_ptr(&lse_state)?),
                Arg::I32(i32::from(ci > 0)),
                Arg::Ptr(if last { self.ptr(&out)? } else { 0 }),
                i32_arg(heads * v_dim, "output width")?,
            ];
            match mma_name.filter(|_| mma) {
                Some(name) => self.launch(
                    name,
                    (n.div_ceil(64) as u32, heads as u32, 1),
                    128,
                    0,
                    &args,
                )?,
                None => {
                    args.extend([
                        i32_arg(nope, "nope width")?,
                        i32_arg(rope, "rotary width")?,
                        i32_arg(v_dim, "value width")?,
                    ]);
                    // One warp per (query, head), four per block.
                    self.launch(
                        &format!("mla_prefill_simple_{}", suffix(dt)),
                        (n.div_ceil(4) as u32, heads as u32, 1),
                        128,
                        0,
                        &args,
                    )?;
                }
            }
        }
        Ok(Some(out))
    }
}

/// The element stride between rows of a 2-D tensor whose rows are contiguous (`None` when they
/// are not): a column range of a wider matrix qualifies.
fn row_stride(t: &Tensor) -> Option<usize> {
    let (rows, cols) = t.dims2().ok()?;
    let &[rs, cs] = t.layout().stride() else {
        return None;
    };
    // A lone row or column has no stride to speak of; otherwise rows must not overlap.
    ((cs == 1 || cols <= 1) && (rs >= cols || rows <= 1)).then_some(rs.max(cols))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn zeros(dt: DType, shape: &[usize]) -> Tensor {
        Tensor::zeros(shape, dt, &Device::Cpu).expect("zeros")
    }

    /// V2-Lite's decode prep: q and kv as column ranges of one stacked projection's output
    /// (rows strided by its full width), a pool of 100 rows.
    #[test]
    fn prep_takes_column_ranges_of_a_stacked_projection() {
        let (t, h, nope, rope, lora) = (3, 16, 128, 64, 512);
        let qw = h * (nope + rope);
        let width = qw + lora + rope;
        let y = zeros(DType::BF16, &[t, width]);
        let q = y.narrow(1, 0, qw).expect("q");
        let kv = y.narrow(1, qw, lora + rope).expect("kv");
        let w = zeros(DType::F32, &[lora]);
        let (cos, sin) = (
            zeros(DType::BF16, &[t, rope / 2]),
            zeros(DType::BF16, &[t, rope / 2]),
        );
        let dst = zeros(DType::U32, &[t]);
        let (ckv, kpe) = (
            zeros(DType::BF16, &[100, lora]),
            zeros(DType::BF16, &[100, rope]),
        );
        let fits = |q: &Tensor, kv: &Tensor, w: &Tensor, cos: &Tensor| {
            Gpu::prep_fits(q, h, nope, kv, (w, 1e-6), (cos, &sin), (&dst, &ckv, &kpe))
                .expect("prep_fits")
        };
        let p = fits(&q, &kv, &w, &cos).expect("a decode step's prep fits");
        assert_eq!(
            (p.t, p.kv_lora, p.rope, p.q_stride, p.kv_stride),
            (t, lora, rope, width, width)
        );
        // What the kernels cannot take: a latent width other than the pool's, the norm weight
        // in bf16, rotary tables of another row count, a query of another head width.
        let kv_short = y.narrow(1, qw, lora + rope - 8).expect("kv");
        assert!(fits(&q, &kv_short, &w, &cos).is_none());
        assert!(fits(&q, &kv, &zeros(DType::BF16, &[lora]), &cos).is_none());
        assert!(fits(&q, &kv, &w, &zeros(DType::BF16, &[t + 1, rope / 2])).is_none());
        let q_wide = y.narrow(1, 0, qw + 8).expect("q");
        assert!(fits(&q_wide, &kv, &w, &cos).is_none());
    }
}
