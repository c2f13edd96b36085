//! moemesh's own CUDA kernels (`kernels.cu`) behind tensor-in, tensor-out functions.
//!
//! A decode step built from candle ops alone costs ~130 launches per MoE layer plus a host round
//! trip for routing; these kernels fuse the pieces (RMSNorm, rotary, the latent-cache write, MLA
//! decode attention over the paged pool, routing, grouped expert GEMVs, the residual adds, greedy
//! sampling) so that a layer is ~20 launches with no host synchronisation.
//!
//! [`gpu`] hands out a [`Gpu`] only for a CUDA tensor in a CUDA build with the kernels enabled
//! (`MOEMESH_FUSED_KERNELS=0` turns them off, for A/B measurements); callers keep their candle
//! path for everything else. Every wrapper checks what its kernel assumes (contiguity, dtype,
//! widths that are multiples of 8) and returns `Ok(None)` when the input does not fit, so a
//! caller always has a correct way out.
//!
//! Only three primitives touch CUDA types (device pointers, allocation, launch); in a build
//! without CUDA, `Gpu` cannot be constructed and those three are unreachable.

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};

/// A kernel argument. Tensors go as raw device addresses (see [`Gpu::ptr`]).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

fn i32_arg(v: usize, what: &str) -> Result<Arg> {
    i32::try_from(v)
        .map(Arg::I32)
        .map_err(|_| EngineError::InvalidInput(format!("{what} {v} is too large for a kernel")))
}

/// Whether the fused kernels are on (default), read once from `MOEMESH_FUSED_KERNELS`.
pub fn kernels_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("MOEMESH_FUSED_KERNELS")
            .map(|v| !matches!(v.as_str(), "0" | "false" | "off"))
            .unwrap_or(true)
    })
}

/// Starts (`true`) or stops the collection of an attached CUDA profiler (`ncu
/// --profile-from-start off`), so that a benchmark can profile chosen steps only. A no-op
/// without CUDA.
pub fn profiler(on: bool) -> Result<()> {
    imp::profiler(on)
}

/// The kernels for tensors on `device`, when it is a CUDA device and they are enabled.
pub fn gpu(device: &Device) -> Option<Gpu> {
    imp::gpu(device)
}

/// Multiprocessors of the GPUs moemesh is tuned for (H100 SXM: 132; H200: 132), for sizing
/// split grids; a different count changes only how well a grid fills the chip.
const SMS: usize = 132;

fn is_kernel_dtype(d: DType) -> bool {
    matches!(d, DType::F32 | DType::BF16)
}

/// Whether `t` starts on a 16-byte boundary (the vectorised loads need it; allocations are
/// aligned, views into them may not be).
fn aligned16(t: &Tensor) -> bool {
    (t.layout().start_offset() * t.dtype().size_in_bytes()).is_multiple_of(16)
}

fn suffix(d: DType) -> &'static str {
    if d == DType::BF16 { "bf16" } else { "f32" }
}

/// The routing of a batch, on the device: `ids [T, k]` (u32) and `weights [T, k]` (f32).
#[derive(Debug, Clone)]
pub struct DeviceRouting {
    pub ids: Tensor,
    pub weights: Tensor,
    pub k: usize,
}

impl DeviceRouting {
    /// The same routing on the host (one copy of `T·k` ids and weights).
    pub fn to_host(&self) -> Result<crate::router::Routing> {
        Ok(crate::router::Routing {
            k: self.k,
            expert_ids: self.ids.flatten_all()?.to_vec1::<u32>()?,
            weights: self.weights.flatten_all()?.to_vec1::<f32>()?,
        })
    }
}

/// Router constants the routing kernel needs (see engine/src/router.rs for their meaning).
pub struct RouteParams<'a> {
    pub bias: Option<&'a Tensor>,
    pub softmax: bool,
    /// 0 greedy, 1 group_limited_greedy, 2 noaux_tc.
    pub method: i32,
    pub k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub normalise: bool,
    pub scale: bool,
    pub scaling: f32,
}

/// A step's decode batch as the MLA kernel reads it: per sequence, the activation row of its
/// query, its length (cache plus the new token) and its pool rows (`table [B, lmax]`).
pub struct DecodeTables<'a> {
    pub qrows: &'a Tensor,
    pub lens: &'a Tensor,
    pub table: &'a Tensor,
    pub lmax: usize,
}

/// Routed-expert assignments built on the host (an expert worker's request): pairs sorted by
/// slot, and for each token row the positions of its pairs, with their weights.
pub struct HostAssignments {
    /// `[slots + 1 | pairs | rows + 1 | pairs]` (u32): slot offsets, each sorted pair's token
    /// row, each row's entry range, each entry's sorted pair.
    pub packed: Tensor,
    /// `[pairs]`, the weight of each entry (row order).
    pub weights: Tensor,
    pub slots: usize,
    pub pairs: usize,
    pub rows: usize,
}

impl HostAssignments {
    /// From `(row, slot, weight)` triples over `rows` token rows and `slots` held experts.
    pub fn build(
        rows: usize,
        slots: usize,
        assignments: &[(usize, usize, f32)],
        device: &Device,
    ) -> Result<Self> {
        let pairs = assignments.len();
        let mut offsets = vec![0u32; slots + 1];
        for &(_, s, _) in assignments {
            offsets[s + 1] += 1;
        }
        for s in 0..slots {
            offsets[s + 1] += offsets[s];
        }
        let mut cursor = offsets.clone();
        let mut sorted_rows = vec![0u32; pairs];
        let mut pos_of = vec![0u32; pairs];
        for (i, &(r, s, _)) in assignments.iter().enumerate() {
            let q = cursor[s];
            cursor[s] += 1;
            sorted_rows[q as usize] = r as u32;
            pos_of[i] = q;
        }
        // Entries grouped by row, each row's in assignment order (fixed summation order).
        let mut row_ptr = vec![0u32; rows + 1];
        for &(r, _, _) in assignments {
            row_ptr[r + 1] += 1;
        }
        for r in 0..rows {
            row_ptr[r + 1] += row_ptr[r];
        }
        let mut fill = row_ptr.clone();
        let mut entry_pos = vec![0u32; pairs];
        let mut entry_w = vec![0f32; pairs];
        for (i, &(r, _, w)) in assignments.iter().enumerate() {
            let at = fill[r] as usize;
            fill[r] += 1;
            entry_pos[at] = pos_of[i];
            entry_w[at] = w;
        }
        let mut packed = offsets;
        packed.extend_from_slice(&sorted_rows);
        packed.extend_from_slice(&row_ptr);
        packed.extend_from_slice(&entry_pos);
        let n = packed.len();
        Ok(HostAssignments {
            packed: Tensor::from_vec(packed, n, device)?,
            weights: Tensor::from_vec(entry_w, pairs, device)?,
            slots,
            pairs,
            rows,
        })
    }
}

/// Handle on the kernels of one CUDA device.
#[derive(Clone)]
pub struct Gpu {
    inner: imp::Inner,
}

impl Gpu {
    /// RMSNorm of `x [T, d]` (f32 or bf16) with f32 weight `w [d]`: the result in `dtype` and,
    /// when `want_f32`, also in f32 (the router scores the f32 one). `None` if it does not fit.
    pub fn rms_norm(
        &self,
        x: &Tensor,
        w: &Tensor,
        eps: f64,
        dtype: DType,
        want_f32: bool,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let Ok((t, d)) = x.dims2() else {
            return Ok(None);
        };
        if !x.is_contiguous()
            || !is_kernel_dtype(x.dtype())
            || !is_kernel_dtype(dtype)
            || w.dtype() != DType::F32
            || !w.is_contiguous()
            || t == 0
        {
            return Ok(None);
        }
        let out = self.alloc(dtype, &[t, d])?;
        let out_f32 = if want_f32 && dtype != DType::F32 {
            Some(self.alloc(DType::F32, &[t, d])?)
        } else {
            None
        };
        let name = format!("rms_norm_{}_{}", suffix(x.dtype()), suffix(dtype));
        self.launch(
            &name,
            (t as u32, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(x)?),
                Arg::Ptr(self.ptr(w)?),
                Arg::Ptr(self.ptr(&out)?),
                Arg::Ptr(match &out_f32 {
                    Some(o) => self.ptr(o)?,
                    None => 0,
                }),
                i32_arg(d, "norm width")?,
                Arg::F32(eps as f32),
            ],
        )?;
        let f32_copy = match (want_f32, out_f32) {
            (true, Some(o)) => Some(o),
            (true, None) => Some(out.clone()),
            (false, _) => None,
        };
        Ok(Some((out, f32_copy)))
    }

    /// `x + a + b` with `x` f32 (the residual stream), `a` in the compute dtype and `b` f32,
    /// either optional; f32 out.
    pub fn residual_add(
        &self,
        x: &Tensor,
        a: Option<&Tensor>,
        b: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let adt = a.map_or(DType::F32, |a| a.dtype());
        let fits = |t: &Tensor| t.is_contiguous() && t.dims() == x.dims();
        if x.dtype() != DType::F32
            || !fits(x)
            || a.is_some_and(|a| !fits(a) || !is_kernel_dtype(a.dtype()))
            || b.is_some_and(|b| !fits(b) || b.dtype() != DType::F32)
        {
            return Ok(None);
        }
        let n = x.elem_count();
        let out = self.alloc(DType::F32, x.dims())?;
        let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
        self.launch(
            &format!("residual_add_{}", suffix(adt)),
            (blocks, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(x)?),
                Arg::Ptr(a.map_or(Ok(0), |a| self.ptr(a))?),
                Arg::Ptr(b.map_or(Ok(0), |b| self.ptr(b))?),
                Arg::Ptr(self.ptr(&out)?),
                Arg::I64(n as i64),
            ],
        )?;
        Ok(Some(out))
    }

    /// SwiGLU on fused gate|up rows: `gu [T, 2I]` → `silu(gu[:, :I]) · gu[:, I:]`, `[T, I]`.
    pub fn silu_mul(&self, gu: &Tensor) -> Result<Option<Tensor>> {
        let Ok((t, two_i)) = gu.dims2() else {
            return Ok(None);
        };
        if !gu.is_contiguous() || !is_kernel_dtype(gu.dtype()) || !two_i.is_multiple_of(2) || t == 0
        {
            return Ok(None);
        }
        let inner = two_i / 2;
        let out = self.alloc(gu.dtype(), &[t, inner])?;
        let blocks = (t * inner).div_ceil(256).clamp(1, 65_535) as u32;
        self.launch(
            &format!("silu_mul_{}", suffix(gu.dtype())),
            (blocks, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(gu)?),
                Arg::Ptr(self.ptr(&out)?),
                i32_arg(t, "rows")?,
                i32_arg(inner, "inner size")?,
            ],
        )?;
        Ok(Some(out))
    }

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

    /// Routing from f32 router logits `[T, E]`, on the device.
    pub fn route(&self, logits: &Tensor, p: &RouteParams) -> Result<Option<DeviceRouting>> {
        let Ok((t, e)) = logits.dims2() else {
            return Ok(None);
        };
        if logits.dtype() != DType::F32
            || !logits.is_contiguous()
            || e > 256
            || p.k == 0
            || p.k > e
            || p.k > 16
            || p.n_group == 0
            || p.n_group > 32
            || !e.is_multiple_of(p.n_group)
            || p.topk_group == 0
            || t == 0
        {
            return Ok(None);
        }
        let ids = self.alloc(DType::U32, &[t, p.k])?;
        let weights = self.alloc(DType::F32, &[t, p.k])?;
        // One warp per token, four per block.
        self.launch(
            "moe_route",
            (t.div_ceil(4) as u32, 1, 1),
            128,
            0,
            &[
                Arg::Ptr(self.ptr(logits)?),
                i32_arg(t, "tokens")?,
                i32_arg(e, "experts")?,
                Arg::Ptr(p.bias.map_or(Ok(0), |b| self.ptr(b))?),
                Arg::I32(i32::from(p.softmax)),
                Arg::I32(p.method),
                i32_arg(p.k, "top-k")?,
                i32_arg(p.n_group, "n_group")?,
                i32_arg(p.topk_group, "topk_group")?,
                Arg::I32(i32::from(p.normalise)),
                Arg::I32(i32::from(p.scale)),
                Arg::F32(p.scaling),
                Arg::Ptr(self.ptr(&ids)?),
                Arg::Ptr(self.ptr(&weights)?),
            ],
        )?;
        Ok(Some(DeviceRouting {
            ids,
            weights,
            k: p.k,
        }))
    }

    fn experts_fit(x: &Tensor, gate_up: &Tensor, down: &Tensor) -> Result<Option<(usize, usize)>> {
        let (Ok((_, hidden)), Ok((_, hidden2, inner))) = (x.dims2(), down.dims3()) else {
            return Ok(None);
        };
        let dt = x.dtype();
        let ok = hidden == hidden2
            && hidden.is_multiple_of(8)
            && inner.is_multiple_of(8)
            && is_kernel_dtype(dt)
            && gate_up.dtype() == dt
            && down.dtype() == dt
            && x.is_contiguous()
            && gate_up.is_contiguous()
            && down.is_contiguous()
            && aligned16(x)
            && aligned16(gate_up)
            && aligned16(down)
            && gate_up.dim(1)? == hidden;
        Ok(ok.then_some((hidden, inner)))
    }

    /// The two grouped expert products over pairs already sorted by slot: `h [P, I]` then
    /// `y [P, hidden]` (f32). bf16 weights run on the tensor cores (`h` in bf16, as the unfused
    /// bf16 path rounds it); f32 weights, or widths that are not multiples of 32, on the CUDA
    /// cores in f32.
    #[allow(clippy::too_many_arguments)]
    fn experts_core(
        &self,
        x: &Tensor,
        gate_up: &Tensor,
        down: &Tensor,
        slots: usize,
        pairs: usize,
        offsets: u64,
        sorted: u64,
        k_div: usize,
        hidden: usize,
        inner: usize,
    ) -> Result<Tensor> {
        let mma = x.dtype() == DType::BF16 && hidden.is_multiple_of(32) && inner.is_multiple_of(32);
        // Blocks of 4 warps: two 16-row tiles, each over two k halves (tensor cores), or 16
        // rows, 4 per warp (CUDA cores).
        let rows_per_block = if mma { 32 } else { 16 };
        let (gate_up_fn, down_fn, h_dtype) = if mma {
            (
                "moe_gate_up_mma".to_string(),
                "moe_down_mma".to_string(),
                DType::BF16,
            )
        } else {
            let sfx = suffix(x.dtype());
            (
                format!("moe_gate_up_{sfx}"),
                format!("moe_down_{sfx}"),
                DType::F32,
            )
        };
        let h = self.alloc(h_dtype, &[pairs, inner])?;
        self.launch(
            &gate_up_fn,
            (inner.div_ceil(rows_per_block) as u32, slots as u32, 1),
            128,
            0,
            &[
                Arg::Ptr(self.ptr(x)?),
                i32_arg(hidden, "hidden size")?,
                Arg::Ptr(self.ptr(gate_up)?),
                i32_arg(inner, "expert inner size")?,
                Arg::Ptr(offsets),
                Arg::Ptr(sorted),
                i32_arg(k_div, "top-k")?,
                Arg::Ptr(self.ptr(&h)?),
            ],
        )?;
        let y = self.alloc(DType::F32, &[pairs, hidden])?;
        self.launch(
            &down_fn,
            (hidden.div_ceil(rows_per_block) as u32, slots as u32, 1),
            128,
            0,
            &[
                Arg::Ptr(self.ptr(&h)?),
                i32_arg(inner, "expert inner size")?,
                Arg::Ptr(self.ptr(down)?),
                i32_arg(hidden, "hidden size")?,
                Arg::Ptr(offsets),
                Arg::Ptr(self.ptr(&y)?),
            ],
        )?;
        Ok(y)
    }

    /// Routed experts for device routing: `x [T, hidden]`, the stacked weights of `slots`
    /// experts (`gate_up [slots·2I, hidden]`, `down [slots, hidden, I]`), `slot_of [E]` (i32,
    /// −1 for experts not held) → `Σ_k w·expert(x)`, `[T, hidden]` f32.
    pub fn experts_routed(
        &self,
        x: &Tensor,
        routing: &DeviceRouting,
        slot_of: &Tensor,
        gate_up: &Tensor,
        down: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some((hidden, inner)) = Self::experts_fit(x, gate_up, down)? else {
            return Ok(None);
        };
        let t = x.dim(0)?;
        let slots = down.dim(0)?;
        let pairs = t * routing.k;
        if routing.ids.dims() != [t, routing.k] || slots > 1024 || slot_of.dtype() != DType::I32 {
            return Ok(None);
        }
        let offsets = self.alloc(DType::U32, &[slots + 1])?;
        let sorted = self.alloc(DType::U32, &[pairs])?;
        let pos = self.alloc(DType::U32, &[pairs])?;
        self.launch(
            "moe_align",
            (1, 1, 1),
            1024,
            0,
            &[
                Arg::Ptr(self.ptr(&routing.ids)?),
                i32_arg(pairs, "pairs")?,
                Arg::Ptr(self.ptr(slot_of)?),
                i32_arg(slots, "slots")?,
                Arg::Ptr(self.ptr(&offsets)?),
                Arg::Ptr(self.ptr(&sorted)?),
                Arg::Ptr(self.ptr(&pos)?),
            ],
        )?;
        let (off_p, sorted_p) = (self.ptr(&offsets)?, self.ptr(&sorted)?);
        let y = self.experts_core(
            x, gate_up, down, slots, pairs, off_p, sorted_p, routing.k, hidden, inner,
        )?;
        let out = self.alloc(DType::F32, &[t, hidden])?;
        self.launch(
            "moe_combine",
            (t as u32, hidden.div_ceil(256) as u32, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(&y)?),
                i32_arg(hidden, "hidden size")?,
                Arg::Ptr(self.ptr(&pos)?),
                Arg::Ptr(self.ptr(&routing.weights)?),
                Arg::Ptr(0),
                i32_arg(routing.k, "top-k")?,
                Arg::Ptr(self.ptr(&out)?),
            ],
        )?;
        Ok(Some(out))
    }

    /// Routed experts for host-built assignments (an expert worker's request) → `[T, hidden]` f32.
    pub fn experts_assigned(
        &self,
        x: &Tensor,
        a: &HostAssignments,
        gate_up: &Tensor,
        down: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some((hidden, inner)) = Self::experts_fit(x, gate_up, down)? else {
            return Ok(None);
        };
        let t = x.dim(0)?;
        if a.rows != t || a.slots != down.dim(0)? || a.pairs == 0 {
            return Ok(None);
        }
        let base = self.ptr(&a.packed)?;
        let at = |elems: usize| base + 4 * elems as u64;
        let offsets = at(0);
        let sorted = at(a.slots + 1);
        let row_ptr = at(a.slots + 1 + a.pairs);
        let entry_pos = at(a.slots + 1 + a.pairs + a.rows + 1);
        let y = self.experts_core(
            x, gate_up, down, a.slots, a.pairs, offsets, sorted, 1, hidden, inner,
        )?;
        let out = self.alloc(DType::F32, &[t, hidden])?;
        self.launch(
            "moe_combine",
            (t as u32, hidden.div_ceil(256) as u32, 1),
            256,
            0,
            &[
                Arg::Ptr(self.ptr(&y)?),
                i32_arg(hidden, "hidden size")?,
                Arg::Ptr(entry_pos),
                Arg::Ptr(self.ptr(&a.weights)?),
                Arg::Ptr(row_ptr),
                Arg::I32(0),
                Arg::Ptr(self.ptr(&out)?),
            ],
        )?;
        Ok(Some(out))
    }

    /// Greedy sampling of each row of f32 `logits [N, V]`: `(token, logprob)` per row, with one
    /// small copy to the host instead of the whole logits.
    pub fn argmax_logprob(&self, logits: &Tensor) -> Result<Option<Vec<(u32, f32)>>> {
        let Ok((n, v)) = logits.dims2() else {
            return Ok(None);
        };
        if logits.dtype() != DType::F32 || !logits.is_contiguous() || n == 0 || v == 0 {
            return Ok(None);
        }
        let tok = self.alloc(DType::U32, &[n])?;
        let lp = self.alloc(DType::F32, &[n])?;
        self.launch(
            "argmax_logprob",
            (n as u32, 1, 1),
            1024,
            0,
            &[
                Arg::Ptr(self.ptr(logits)?),
                i32_arg(v, "vocabulary size")?,
                Arg::Ptr(self.ptr(&tok)?),
                Arg::Ptr(self.ptr(&lp)?),
            ],
        )?;
        let tok = tok.to_vec1::<u32>()?;
        let lp = lp.to_vec1::<f32>()?;
        Ok(Some(tok.into_iter().zip(lp).collect()))
    }

    fn ptr(&self, t: &Tensor) -> Result<u64> {
        imp::ptr(&self.inner, t)
    }

    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        imp::alloc(&self.inner, dtype, shape)
    }

    fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        imp::launch(&self.inner, name, grid, block, smem, args)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
    use candle_core::op::BackpropOp;
    use candle_core::{DType, Device, Storage, Tensor};

    use super::{Arg, Gpu};
    use crate::error::{EngineError, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/moemesh_kernels.ptx"));
    const MODULE: &str = "moemesh_kernels";

    #[derive(Clone)]
    pub struct Inner {
        dev: CudaDevice,
    }

    pub fn profiler(on: bool) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::{profiler_start, profiler_stop};
        if on {
            profiler_start()
        } else {
            profiler_stop()
        }
        .map_err(|e| cuda_err("profiler", e))
    }

    pub fn gpu(device: &Device) -> Option<Gpu> {
        match device {
            Device::Cuda(dev) if super::kernels_enabled() => Some(Gpu {
                inner: Inner { dev: dev.clone() },
            }),
            _ => None,
        }
    }

    fn cuda_err(what: &str, e: impl std::fmt::Display) -> EngineError {
        EngineError::Tensor(candle_core::Error::Msg(format!("{what}: {e}")))
    }

    /// The device address of `t`'s first element.
    pub fn ptr(inner: &Inner, t: &Tensor) -> Result<u64> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(cuda_err(
                "kernel argument",
                "tensor is not on a CUDA device",
            ));
        };
        let stream = inner.dev.cuda_stream();
        // The returned guards only record events when cudarc tracks them; moemesh runs one
        // stream per device with tracking off (services/common/src/device.rs), and the tensors
        // outlive the launch (they are borrowed by the caller), with frees ordered on the stream.
        let base = match &cs.slice {
            CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
            CudaStorageSlice::F32(s) => s.device_ptr(&stream).0,
            CudaStorageSlice::U32(s) => s.device_ptr(&stream).0,
            CudaStorageSlice::I32(s) => s.device_ptr(&stream).0,
            _ => {
                return Err(cuda_err(
                    "kernel argument",
                    format!("dtype {:?} is not used by the kernels", cs.dtype()),
                ));
            }
        };
        Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
    }

    pub fn alloc(inner: &Inner, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let n = shape.iter().product::<usize>().max(1);
        let dev = &inner.dev;
        // SAFETY: every kernel that receives a fresh output writes all of its elements before
        // anything reads them (each wrapper sizes the output to the kernel's index space).
        let storage = unsafe {
            match dtype {
                DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
                DType::BF16 => {
                    CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(n)?, dev.clone())
                }
                DType::U32 => CudaStorage::wrap_cuda_slice(dev.alloc::<u32>(n)?, dev.clone()),
                other => {
                    return Err(cuda_err("kernel output", format!("dtype {other:?}")));
                }
            }
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            shape,
            BackpropOp::none(),
            false,
        ))
    }

    pub fn launch(
        inner: &Inner,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        let func = inner.dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let mut b = func.builder();
        for a in args {
            match a {
                Arg::Ptr(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: each wrapper in super passes the argument list its kernel in kernels.cu
        // declares (pointers as 64-bit addresses, `int` as i32, `long long` as i64), with
        // pointers into live tensors whose sizes it checked against the launch's index space.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(name, e))?;
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{DType, Device, Tensor};

    use super::{Arg, Gpu};
    use crate::error::Result;

    /// Uninhabited: a build without CUDA never hands out a [`Gpu`].
    #[derive(Clone)]
    pub enum Inner {}

    pub fn gpu(_device: &Device) -> Option<Gpu> {
        None
    }

    pub fn profiler(_on: bool) -> Result<()> {
        Ok(())
    }

    pub fn ptr(inner: &Inner, _t: &Tensor) -> Result<u64> {
        match *inner {}
    }

    pub fn alloc(inner: &Inner, _dtype: DType, _shape: &[usize]) -> Result<Tensor> {
        match *inner {}
    }

    pub fn launch(
        inner: &Inner,
        _name: &str,
        _grid: (u32, u32, u32),
        _block: u32,
        _smem: u32,
        _args: &[Arg],
    ) -> Result<()> {
        match *inner {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_assignments_sort_pairs_by_slot_and_keep_each_rows_order() {
        // (row, slot, weight): row 0 uses slots 1 then 0, row 2 slot 0, row 1 nothing.
        let a = [(0, 1, 0.5), (2, 0, 0.25), (0, 0, 1.0)];
        let h = HostAssignments::build(3, 2, &a, &Device::Cpu).expect("build");
        let packed = h.packed.to_vec1::<u32>().expect("packed");
        // Slot offsets: slot 0 holds pairs 0..2 (rows 2 and 0, in assignment order), slot 1 pair 2.
        assert_eq!(&packed[..3], &[0, 2, 3]);
        assert_eq!(&packed[3..6], &[2, 0, 0]);
        // Row ranges: row 0 has entries 0..2, row 1 none, row 2 entry 2.
        assert_eq!(&packed[6..10], &[0, 2, 2, 3]);
        // Row 0's entries in assignment order: (slot 1 → sorted pair 2), (slot 0 → pair 1); row 2
        // → pair 0.
        assert_eq!(&packed[10..], &[2, 1, 0]);
        assert_eq!(h.weights.to_vec1::<f32>().expect("w"), vec![0.5, 1.0, 0.25]);
        assert_eq!((h.slots, h.pairs, h.rows), (2, 3, 3));
    }

    #[test]
    fn no_kernels_without_a_gpu() {
        assert!(gpu(&Device::Cpu).is_none());
    }
}
