//! `moemesh verify` on a GPU: the absorbed decode's products fused with their neighbours
//! (`Gpu::decode_prep` given W_UK: the prep and q_nope · W_UK in one launch; `Gpu::mla_decode_uv`:
//! the split merge and W_UV in one launch, `[B, H · v]` out) against the path they replace (the
//! prep kernel, the batched GEMM, the decode kernel with its merge, the GEMM and the transpose),
//! at DeepSeek-V2-Lite's attention shapes (16 heads, nope 128, rope 64, v 128, latent 512) with
//! random bf16 inputs, on 1 to 8 sequences whose contexts take one split (≤ 64 positions) or
//! several.
//!
//! What must hold: the latents written into the pool are bit-equal (the same kv_write code);
//! the rotated q_pe bit-equal (the same arithmetic); q_lat and the attention output within the
//! MLA decode check's bound (every element within 1% of the output's largest magnitude, cosine
//! ≥ 0.99999): both sides sum the same bf16 products in f32 and round once to bf16, in another
//! order, so an element may land one bf16 rounding step (2⁻⁸ of its magnitude) away, and that
//! difference in q_lat moves the attention output by about as much.

use moemesh_engine::cuda::{DecodeTables, Gpu};
use moemesh_engine::{DType, Device, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::kernel_check::{KernelCheck, compare, normal};

const HEADS: usize = 16;
const NOPE: usize = 128;
const ROPE: usize = 64;
const V: usize = 128;
const KV_LORA: usize = 512;

/// Every case: contexts (the new token's position included) of the step's sequences.
pub fn run(g: &Gpu, device: &Device) -> anyhow::Result<Vec<KernelCheck>> {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let cases: [&[usize]; 5] = [
        &[7],
        &[160],
        &[1, 65, 300],
        &[64, 64],
        &[1, 9, 40, 64, 65, 130, 257, 400],
    ];
    cases
        .iter()
        .map(|ctx| one(g, device, &mut rng, ctx))
        .collect()
}

fn one(
    g: &Gpu,
    device: &Device,
    rng: &mut ChaCha8Rng,
    ctx: &[usize],
) -> anyhow::Result<KernelCheck> {
    let b = ctx.len();
    let name = format!("fused absorbed MLA decode, b{b}, contexts {ctx:?}");
    let bf16 = |v: Vec<f32>, shape: &[usize]| -> anyhow::Result<Tensor> {
        Ok(Tensor::from_vec(v, shape, device)?.to_dtype(DType::BF16)?)
    };
    // The step's rows: q_proj's output and kv_a_proj's, as one stacked projection gives them.
    let q = bf16(
        normal(rng, b * HEADS * (NOPE + ROPE), 1.0),
        &[b, HEADS * (NOPE + ROPE)],
    )?;
    let kv = bf16(normal(rng, b * (KV_LORA + ROPE), 1.0), &[b, KV_LORA + ROPE])?;
    let norm_w = Tensor::from_vec(normal(rng, KV_LORA, 1.0), KV_LORA, device)?;
    let angles: Vec<f32> = (0..b * ROPE / 2)
        .map(|i| (i as f32 * 0.37).sin() * 3.0)
        .collect();
    let cos = bf16(angles.iter().map(|a| a.cos()).collect(), &[b, ROPE / 2])?;
    let sin = bf16(angles.iter().map(|a| a.sin()).collect(), &[b, ROPE / 2])?;
    // kv_b_proj [H · (nope + v), kv_lora]; W_UK and W_UV as the model derives them.
    let kv_b = bf16(
        normal(rng, HEADS * (NOPE + V) * KV_LORA, 0.05),
        &[HEADS * (NOPE + V), KV_LORA],
    )?;
    let kv_b3 = kv_b.reshape((HEADS, NOPE + V, KV_LORA))?;
    let w_uk = kv_b3.narrow(1, 0, NOPE)?.contiguous()?;
    let w_uv_t = kv_b3.narrow(1, NOPE, V)?.transpose(1, 2)?.contiguous()?;
    // A pool with each sequence's earlier positions at scattered rows; the new token's row last.
    let pool_rows = ctx.iter().sum::<usize>() * 2 + 8;
    let ckv = bf16(normal(rng, pool_rows * KV_LORA, 1.0), &[pool_rows, KV_LORA])?;
    let kpe = bf16(normal(rng, pool_rows * ROPE, 1.0), &[pool_rows, ROPE])?;
    let lmax = ctx.iter().copied().max().unwrap_or(1);
    let mut free: Vec<u32> = (0..pool_rows as u32).collect();
    let (mut table, mut dst) = (Vec::with_capacity(b * lmax), Vec::with_capacity(b));
    for &n in ctx {
        let own: Vec<u32> = (0..n)
            .map(|_| free.swap_remove(rng.random_range(0..free.len())))
            .collect();
        dst.push(own[n - 1]);
        table.extend_from_slice(&own);
        table.extend(std::iter::repeat_n(own[n - 1], lmax - n));
    }
    let table = Tensor::from_vec(table, b * lmax, device)?;
    let dst = Tensor::from_vec(dst, b, device)?;
    let lens = Tensor::from_vec(ctx.iter().map(|&n| n as u32).collect(), b, device)?;
    let qrows = Tensor::from_vec((0..b as u32).collect(), b, device)?;
    let tables = DecodeTables {
        qrows: &qrows,
        lens: &lens,
        table: &table,
        lmax,
        trows: None,
    };
    let scale = 1.0 / ((NOPE + ROPE) as f64).sqrt();
    let norm = (&norm_w, 1e-6);
    let missing = |what: &str| anyhow::anyhow!("{what} did not take {name}");

    // The path the fused kernels replace, on a copy of the pool.
    let (ckv_a, kpe_a) = (ckv.copy()?, kpe.copy()?);
    let (q_nope, q_pe_ref) = g
        .decode_prep(
            &q,
            HEADS,
            NOPE,
            None,
            &kv,
            norm,
            (&cos, &sin),
            false,
            (&dst, &ckv_a, &kpe_a),
        )?
        .ok_or_else(|| missing("the prep kernel"))?;
    let q_lat_ref = q_nope.matmul(&w_uk)?;
    let o_lat = g
        .mla_decode_mma(&q_lat_ref, &q_pe_ref, &ckv_a, &kpe_a, &tables, scale)?
        .ok_or_else(|| missing("the tensor-core decode kernel"))?;
    let reference = o_lat
        .matmul(&w_uv_t)?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((b, HEADS * V))?;

    // The fused kernels on another copy.
    let (ckv_b, kpe_b) = (ckv.copy()?, kpe.copy()?);
    let (q_lat, q_pe) = g
        .decode_prep(
            &q,
            HEADS,
            NOPE,
            Some(&w_uk),
            &kv,
            norm,
            (&cos, &sin),
            false,
            (&dst, &ckv_b, &kpe_b),
        )?
        .ok_or_else(|| missing("the fused prep kernel"))?;
    // Attention over the reference's query, so that the output's check is of the merge and
    // W_UV alone; q_lat's own check is below.
    let got = g
        .mla_decode_uv(
            &q_lat_ref,
            &q_pe_ref,
            &ckv_b,
            &kpe_b,
            &tables,
            scale,
            (&kv_b, NOPE, V),
        )?
        .ok_or_else(|| missing("the fused merge + W_UV kernel"))?;

    let same = |a: &Tensor, c: &Tensor| -> anyhow::Result<bool> {
        let f = |t: &Tensor| -> anyhow::Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        Ok(f(a)? == f(c)?)
    };
    let pools_equal = same(&ckv_a, &ckv_b)? && same(&kpe_a, &kpe_b)?;
    let q_pe_equal = same(&q_pe_ref, &q_pe)?;
    let (rel_q, cos_q) = compare(&q_lat_ref, &q_lat)?;
    let (rel_o, cos_o) = compare(&reference, &got)?;
    let (max_rel, cosine) = (rel_q.max(rel_o), cos_q.min(cos_o));
    let mut case = name;
    if !pools_equal {
        case.push_str(": pool rows differ");
    }
    if !q_pe_equal {
        case.push_str(": q_pe differs");
    }
    Ok(KernelCheck {
        case,
        max_rel,
        cosine,
        passed: pools_equal && q_pe_equal && max_rel <= 0.01 && cosine >= 0.99999,
    })
}
