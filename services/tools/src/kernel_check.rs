//! `moemesh verify` on a GPU: the tensor-core MLA decode kernel against the CUDA-core one.
//!
//! The tiny fixtures are too small for the tensor-core kernel (it needs DeepSeek's 512 + 64
//! latent and heads in groups of 16), so `verify`'s fixture checks exercise only the CUDA-core
//! kernel, which they compare with HF transformers. This check closes the loop: random bf16
//! queries and a random paged pool at V2-Lite's shapes (16 heads; batches of 1 to 64; contexts
//! from 1 to 4,100 positions, in pool rows scattered over the pool; table widths both the
//! longest context, as an eager step passes them, and a wider power of two, as a CUDA graph
//! does), both kernels, every output compared. Two cases are prefill chunks attended in latent
//! space (several rows of one sequence sharing its table row, each with its own causal length):
//! the tensor-core kernel reads the shared table, the reference a table row per row.
//!
//! Bound: both compute in f32 from the same bf16 inputs and round the output to bf16 once, so
//! an element may differ by a rounding step of bf16 (2⁻⁸ of its magnitude) plus the f32
//! differences of summation order and of the probabilities' two bf16 parts (~2⁻¹⁶): the check
//! asks every element to be within 1% of the output's largest magnitude, and the cosine
//! over all of them to be at least 0.99999.
//!
//! Two more cases check the residual add fused with the next RMSNorm (`Gpu::add_rms_norm`, what
//! every layer runs on a GPU) against the two kernels it replaces, at V2-Lite's and V3's widths:
//! the new residual stream must be bit-equal (the same additions in the same order) and the norm
//! within the same bound (its sum of squares is taken in another order).
//!
//! Routing cases check the fused router-logits-and-routing kernel (`Gpu::route_logits`, a
//! decode step's router) against the logits GEMM and `Gpu::route`: V2-Lite's softmax greedy
//! top-6 of 64 and V3's sigmoid top-8 of 256 from 4 of 8 groups with a correction bias, 1 to 16
//! tokens, one case with a router skew. Both sum the same f32 products in other orders (logits
//! differ by ~1e-6 relative); on random rows no two choices are that close, so the experts must
//! be the same and the weights within 1e-4 of the largest.
//! Then the decode-sized dense projections (`dense_small`) against f32 products, the absorbed
//! MLA decode's fused products against the GEMM path (`mla_fused_check`), and the FP8
//! routed-expert kernels against the bf16 ones, bit for bit (`fp8_check`).

use moemesh_engine::cuda::{DecodeTables, DenseWeight, Gpu};
use moemesh_engine::{DType, Device, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One case of the check.
pub struct KernelCheck {
    pub case: String,
    pub max_rel: f32,
    pub cosine: f64,
    pub passed: bool,
}

const HEADS: usize = 16;
/// A sequence of a case: (positions up to and with its last row, rows).
type Seq = (usize, usize);
const KV_LORA: usize = 512;
const ROPE: usize = 64;

pub(crate) fn normal(rng: &mut ChaCha8Rng, n: usize, spread: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
            let u2: f32 = rng.random();
            spread * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

/// Runs every case; empty without a CUDA device (or with the kernels off).
pub fn run(device: &Device) -> anyhow::Result<Vec<KernelCheck>> {
    let Some(g) = moemesh_engine::cuda::gpu(device) else {
        return Ok(Vec::new());
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // Each case: sequences as (positions up to and with the last row, rows), the table width.
    // A sequence of several rows is a prefill chunk attended in latent space (rows of one table
    // row, each seeing its own causal prefix); the reference then takes a table row per row.
    let one_row = |lens: Vec<usize>| lens.into_iter().map(|n| (n, 1)).collect::<Vec<_>>();
    let cases: Vec<(&str, Vec<Seq>, bool)> = vec![
        ("b1, 7 positions", one_row(vec![7]), false),
        ("b1, 160 positions, table 256", one_row(vec![160]), true),
        ("b1, 4,100 positions", one_row(vec![4100]), false),
        ("b5, 1 to 257", one_row(vec![1, 64, 65, 130, 257]), false),
        (
            "b5, 1 to 257, table 512",
            one_row(vec![1, 64, 65, 130, 257]),
            true,
        ),
        (
            "b64, 1 to 400",
            one_row((0..64).map(|i| 1 + (i * 37) % 400).collect()),
            true,
        ),
        ("chunk of 40 rows after 1,500", vec![(1540, 40)], false),
        (
            "3 decodes and chunks of 5 and 64 rows",
            vec![(300, 1), (1530, 5), (17, 1), (1600, 64), (1, 1)],
            false,
        ),
    ];
    let mut out = Vec::new();
    for (name, seqs, wide) in cases {
        out.push(one(&g, device, &mut rng, name, &seqs, wide)?);
    }
    for (rows, width, with_b) in [(2048, 2048, true), (5, 7168, false)] {
        out.push(add_norm(&g, device, &mut rng, rows, width, with_b)?);
    }
    // (tokens, V3's router rather than V2-Lite's, a skew)
    for (tokens, v3, skew) in [
        (1, false, false),
        (16, false, true),
        (1, true, false),
        (5, true, false),
    ] {
        out.push(route(&g, device, &mut rng, tokens, v3, skew)?);
    }
    // The mesh's hand-off in the routing launch: 1 and 16 tokens (a decode step's extremes),
    // two workers' slots, V2-Lite's router.
    for (tokens, slots) in [(1, 2), (16, 2), (5, 4)] {
        out.push(route_handoff(&g, device, &mut rng, tokens, slots)?);
    }
    // (rows, K, N, gate_up): V2-Lite's o_proj, stacked q/kv_a, shared experts' gate/up and
    // down, and a tiny fixture's width.
    for (rows, k, n, gate_up) in [
        (1, 2048, 2048, false),
        (5, 2048, 3648, false),
        (8, 2816, 2048, false),
        (1, 2048, 2816, true),
        (8, 2048, 2816, true),
        (3, 128, 96, false),
    ] {
        out.push(dense(&g, device, &mut rng, rows, k, n, gate_up)?);
    }
    out.extend(crate::mla_fused_check::run(&g, device)?);
    out.extend(crate::fp8_check::run(&g, device, &mut rng)?);
    out.extend(crate::fp8_check::dense(&g, device, &mut rng)?);
    out.extend(crate::fp8_check::dense_split(&g, device, &mut rng)?);
    Ok(out)
}

/// `dense_small` (a decode step's dense projections on the tensor cores) against the product
/// in f32 of the same bf16 values ([`against_f32_product`]).
fn dense(
    g: &Gpu,
    device: &Device,
    rng: &mut ChaCha8Rng,
    rows: usize,
    k: usize,
    n: usize,
    gate_up: bool,
) -> anyhow::Result<KernelCheck> {
    let wn = if gate_up { 2 * n } else { n };
    let x =
        Tensor::from_vec(normal(rng, rows * k, 1.0), (rows, k), device)?.to_dtype(DType::BF16)?;
    let w = Tensor::from_vec(normal(rng, wn * k, 0.02), (wn, k), device)?.to_dtype(DType::BF16)?;
    let name = format!(
        "dense {}{rows} × {k} → {n}",
        if gate_up { "gate/up + SwiGLU, " } else { "" }
    );
    let got = g
        .dense_small(&x, DenseWeight::Bf16(&w), gate_up)?
        .ok_or_else(|| anyhow::anyhow!("the dense kernel did not take {name}"))?;
    against_f32_product(name, &x, &w, n, gate_up, &got)
}

/// `got`, a kernel's bf16 `x · wᵀ` (`gate_up`: the SwiGLU of a stacked `[2n, K]` weight's
/// products) from bf16 `x` and `w`, against the product in f32 of the same values (and SwiGLU in
/// f32): within the output's one bf16 rounding (unit roundoff 2⁻⁸ of a value, so of the
/// largest), plus 5% for the f32 sums' other order; cosine ≥ 0.99999.
pub(crate) fn against_f32_product(
    case: String,
    x: &Tensor,
    w: &Tensor,
    n: usize,
    gate_up: bool,
    got: &Tensor,
) -> anyhow::Result<KernelCheck> {
    let y = x
        .to_dtype(DType::F32)?
        .matmul(&w.to_dtype(DType::F32)?.t()?)?;
    let reference = if gate_up {
        (y.narrow(1, 0, n)?.silu()? * y.narrow(1, n, n)?)?
    } else {
        y
    };
    let (max_rel, cosine) = compare(&reference, got)?;
    Ok(KernelCheck {
        case,
        max_rel,
        cosine,
        passed: max_rel <= 1.05 * 2f32.powi(-8) && cosine >= 0.99999,
    })
}

/// `route_logits` against the logits GEMM then `route`, at V2-Lite's or V3's router.
fn route(
    g: &Gpu,
    device: &Device,
    rng: &mut ChaCha8Rng,
    tokens: usize,
    v3: bool,
    skew: bool,
) -> anyhow::Result<KernelCheck> {
    let (hidden, e) = if v3 { (7168, 256) } else { (2048, 64) };
    let x = Tensor::from_vec(normal(rng, tokens * hidden, 1.0), &[tokens, hidden], device)?;
    let w = Tensor::from_vec(normal(rng, e * hidden, 0.02), &[e, hidden], device)?;
    let bias = Tensor::from_vec(normal(rng, e, 0.1), e, device)?;
    let skew = skew
        .then(|| Tensor::from_vec(normal(rng, e, 1.0), e, device))
        .transpose()?;
    let params = moemesh_engine::cuda::RouteParams {
        bias: v3.then_some(&bias),
        softmax: !v3,
        method: if v3 { 2 } else { 0 },
        k: if v3 { 8 } else { 6 },
        n_group: if v3 { 8 } else { 1 },
        topk_group: if v3 { 4 } else { 1 },
        normalise: v3,
        scale: true,
        scaling: if v3 { 2.5 } else { 1.0 },
    };
    let name = format!(
        "router logits + routing, {tokens} × {e} experts{}",
        if skew.is_some() { ", skewed" } else { "" }
    );
    let missing = || anyhow::anyhow!("a routing kernel did not take {name}");
    let logits = x.matmul(&w.t()?)?;
    let logits = match &skew {
        Some(s) => logits.broadcast_add(s)?,
        None => logits,
    };
    let reference = g.route(&logits, &params)?.ok_or_else(missing)?;
    let counter = Tensor::zeros(1, DType::U32, device)?;
    // Twice: the counter must be back at 0 for the second launch to route at all.
    let mut got = None;
    for _ in 0..2 {
        got = Some(
            g.route_logits(&x, &w, skew.as_ref(), &counter, &params, None)?
                .ok_or_else(missing)?,
        );
    }
    let got = got.ok_or_else(missing)?;
    let ids_equal = reference.ids.flatten_all()?.to_vec1::<u32>()?
        == got.ids.flatten_all()?.to_vec1::<u32>()?;
    let counter_back = counter.to_vec1::<u32>()? == [0];
    let (max_rel, cosine) = compare(&reference.weights, &got.weights)?;
    Ok(KernelCheck {
        case: match (ids_equal, counter_back) {
            (true, true) => name,
            (false, _) => format!("{name}: other experts"),
            (true, false) => format!("{name}: counter left set"),
        },
        max_rel,
        cosine,
        passed: ids_equal && counter_back && max_rel <= 1e-4,
    })
}

/// `route_logits` with a [`RouteHandoff`](moemesh_engine::cuda::RouteHandoff) (the mesh's
/// `route` fold) at V2-Lite's router, launched twice: every slot must hold the rows' bits and the
/// launch's ids and weights bit for bit, each `ready` word its table value, the counts twice each
/// expert's routed tokens, the routing the same as without the hand-off, the counter back at 0.
fn route_handoff(
    g: &Gpu,
    device: &Device,
    rng: &mut ChaCha8Rng,
    tokens: usize,
    slots: usize,
) -> anyhow::Result<KernelCheck> {
    let (hidden, e, k) = (2048, 64, 6);
    let xf = Tensor::from_vec(normal(rng, tokens * hidden, 1.0), &[tokens, hidden], device)?;
    let rows = xf.to_dtype(DType::BF16)?;
    let w = Tensor::from_vec(normal(rng, e * hidden, 0.02), &[e, hidden], device)?;
    let params = moemesh_engine::cuda::RouteParams {
        bias: None,
        softmax: true,
        method: 0,
        k,
        n_group: 1,
        topk_group: 1,
        normalise: false,
        scale: true,
        scaling: 1.0,
    };
    let name = format!("router with the workers' hand-off, {tokens} tokens, {slots} slots");
    let missing = || anyhow::anyhow!("the routing kernel did not take {name}");
    let row_words = tokens * hidden / 2;
    let x_slots = (0..slots)
        .map(|_| Tensor::zeros(row_words, DType::U32, device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let id_slots = (0..slots)
        .map(|_| Tensor::zeros(tokens * k, DType::U32, device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let w_slots = (0..slots)
        .map(|_| Tensor::zeros(tokens * k, DType::U32, device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let flags = Tensor::zeros(slots, DType::U32, device)?;
    let values: Vec<u32> = (0..slots as u32).map(|j| 7 + 2 * j).collect();
    let table = Tensor::from_vec([values.clone(), vec![0]].concat(), slots + 1, device)?;
    let counts = Tensor::zeros(e, DType::U32, device)?;
    let handoff = moemesh_engine::cuda::RouteHandoff {
        rows: rows.clone(),
        slots: (0..slots)
            .map(|j| {
                Ok([
                    g.address(&x_slots[j])?,
                    g.address(&id_slots[j])?,
                    g.address(&w_slots[j])?,
                ])
            })
            .collect::<moemesh_engine::Result<Vec<_>>>()?,
        words: (0..slots)
            .map(|j| Ok((g.address(&flags)? + 4 * j as u64, j)))
            .collect::<moemesh_engine::Result<Vec<_>>>()?,
        table,
        counts: Some(counts.clone()),
    };
    let counter = Tensor::zeros(1, DType::U32, device)?;
    let plain = g
        .route_logits(&xf, &w, None, &counter, &params, None)?
        .ok_or_else(missing)?;
    let mut got = None;
    for _ in 0..2 {
        got = Some(
            g.route_logits(&xf, &w, None, &counter, &params, Some(&handoff))?
                .ok_or_else(missing)?,
        );
    }
    let got = got.ok_or_else(missing)?;
    let ids = got.ids.flatten_all()?.to_vec1::<u32>()?;
    let weight_bits: Vec<u32> = got
        .weights
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| v.to_bits())
        .collect();
    // bf16 → f32 is exact: a value's bf16 bits are its f32 bits' top half.
    let row_bits: Vec<u32> = rows
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .chunks(2)
        .map(|p| (p[0].to_bits() >> 16) | (p[1].to_bits() & 0xffff_0000))
        .collect();
    let mut failures = Vec::new();
    if !got.handed_off {
        failures.push("not handed off");
    }
    if ids != plain.ids.flatten_all()?.to_vec1::<u32>()? {
        failures.push("other experts than without the hand-off");
    }
    for j in 0..slots {
        if x_slots[j].to_vec1::<u32>()? != row_bits {
            failures.push("a slot's rows differ");
        }
        if id_slots[j].to_vec1::<u32>()? != ids {
            failures.push("a slot's ids differ");
        }
        if w_slots[j].to_vec1::<u32>()? != weight_bits {
            failures.push("a slot's weights differ");
        }
    }
    if flags.to_vec1::<u32>()? != values {
        failures.push("a ready word without its table value");
    }
    let mut expect = vec![0u32; e];
    for &id in &ids {
        expect[id as usize] += 2;
    }
    if counts.to_vec1::<u32>()? != expect {
        failures.push("the expert load miscounted");
    }
    if counter.to_vec1::<u32>()? != [0] {
        failures.push("counter left set");
    }
    failures.dedup();
    Ok(KernelCheck {
        case: if failures.is_empty() {
            name
        } else {
            format!("{name}: {}", failures.join(", "))
        },
        max_rel: 0.0,
        cosine: 1.0,
        passed: failures.is_empty(),
    })
}

/// Max |Δ| over the reference's largest magnitude, and the cosine, of two tensors.
pub(crate) fn compare(reference: &Tensor, got: &Tensor) -> anyhow::Result<(f32, f64)> {
    let a = reference
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let c = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let scale_of = a
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let max_rel = a
        .iter()
        .zip(&c)
        .map(|(x, y)| (x - y).abs() / scale_of)
        .fold(
            0f32,
            |m, v| if v.is_nan() { f32::INFINITY } else { m.max(v) },
        );
    let (mut dot, mut na, mut nc) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&c) {
        dot += f64::from(*x) * f64::from(*y);
        na += f64::from(*x) * f64::from(*x);
        nc += f64::from(*y) * f64::from(*y);
    }
    let cosine = dot / (na.sqrt() * nc.sqrt()).max(f64::MIN_POSITIVE);
    Ok((max_rel, cosine))
}

/// `add_rms_norm` against `residual_add` then `rms_norm`: `rows × width`, a bf16 delta and
/// (`with_b`) an f32 one, the norm in bf16 and f32.
fn add_norm(
    g: &Gpu,
    device: &Device,
    rng: &mut ChaCha8Rng,
    rows: usize,
    width: usize,
    with_b: bool,
) -> anyhow::Result<KernelCheck> {
    let n = rows * width;
    let x = Tensor::from_vec(normal(rng, n, 4.0), &[rows, width], device)?;
    let a = Tensor::from_vec(normal(rng, n, 1.0), &[rows, width], device)?.to_dtype(DType::BF16)?;
    let b = if with_b {
        Some(Tensor::from_vec(
            normal(rng, n, 1.0),
            &[rows, width],
            device,
        )?)
    } else {
        None
    };
    let w = Tensor::from_vec(normal(rng, width, 1.0), width, device)?;
    let eps = 1e-6;
    let name = format!(
        "residual + RMSNorm, {rows} × {width}{}",
        if with_b { ", two deltas" } else { "" }
    );
    let missing = || anyhow::anyhow!("a norm kernel did not take {name}");
    let h_ref = g
        .residual_add(&x, Some(&a), b.as_ref())?
        .ok_or_else(missing)?;
    let (n_ref, nf_ref) = g
        .rms_norm(&h_ref, &w, eps, DType::BF16, true)?
        .ok_or_else(missing)?;
    let got = g
        .add_rms_norm(&x, Some(&a), b.as_ref(), &w, eps, DType::BF16, true)?
        .ok_or_else(missing)?;
    let nf_ref = nf_ref.ok_or_else(missing)?;
    let nf_got = got.normed_f32.ok_or_else(missing)?;
    let h_equal =
        h_ref.flatten_all()?.to_vec1::<f32>()? == got.h.flatten_all()?.to_vec1::<f32>()?;
    let (rel_b, cos_b) = compare(&n_ref, &got.normed)?;
    let (rel_f, cos_f) = compare(&nf_ref, &nf_got)?;
    let (max_rel, cosine) = (rel_b.max(rel_f), cos_b.min(cos_f));
    Ok(KernelCheck {
        case: if h_equal {
            name
        } else {
            format!("{name}: residual differs")
        },
        max_rel,
        cosine,
        passed: h_equal && max_rel <= 0.01 && cosine >= 0.99999,
    })
}

fn one(
    g: &Gpu,
    device: &Device,
    rng: &mut ChaCha8Rng,
    name: &str,
    seqs: &[Seq],
    wide: bool,
) -> anyhow::Result<KernelCheck> {
    // Batch rows: (sequence, causal length).
    let rows: Vec<(usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(s, &(n, k))| (n + 1 - k..=n).map(move |len| (s, len)))
        .collect();
    let b = rows.len();
    let longest = seqs.iter().map(|s| s.0).max().unwrap_or(1);
    let lmax = if wide {
        longest.next_power_of_two().max(256)
    } else {
        longest
    };
    // A pool with room to scatter every sequence's rows.
    let pool_rows = seqs.iter().map(|s| s.0).sum::<usize>() * 2 + 16;
    let bf16 = |v: Vec<f32>, shape: &[usize]| -> anyhow::Result<Tensor> {
        Ok(Tensor::from_vec(v, shape, device)?.to_dtype(DType::BF16)?)
    };
    let q_lat = bf16(normal(rng, HEADS * b * KV_LORA, 1.0), &[HEADS, b, KV_LORA])?;
    let q_pe = bf16(normal(rng, HEADS * b * ROPE, 1.0), &[HEADS, b, ROPE])?;
    let ckv = bf16(normal(rng, pool_rows * KV_LORA, 1.0), &[pool_rows, KV_LORA])?;
    let kpe = bf16(normal(rng, pool_rows * ROPE, 1.0), &[pool_rows, ROPE])?;
    // Each sequence's positions at distinct random pool rows, padded with its last.
    let mut free: Vec<u32> = (0..pool_rows as u32).collect();
    let mut owns = Vec::with_capacity(seqs.len());
    for &(n, _) in seqs {
        let mut own = Vec::with_capacity(n);
        for _ in 0..n {
            let at = rng.random_range(0..free.len());
            own.push(free.swap_remove(at));
        }
        owns.push(own);
    }
    let padded = |own: &[u32], n: usize, table: &mut Vec<u32>| {
        table.extend_from_slice(&own[..n]);
        table.extend(std::iter::repeat_n(own[n - 1], lmax - n));
    };
    // The reference's table: a row per batch row. The shared one: a row per sequence.
    let mut per_row = Vec::with_capacity(b * lmax);
    for &(s, len) in &rows {
        padded(&owns[s], len, &mut per_row);
    }
    let mut shared = Vec::with_capacity(seqs.len() * lmax);
    for (own, &(n, _)) in owns.iter().zip(seqs) {
        padded(own, n, &mut shared);
    }
    let several = seqs.iter().any(|s| s.1 > 1);
    let per_row = Tensor::from_vec(per_row, b * lmax, device)?;
    let shared_n = shared.len();
    let shared = Tensor::from_vec(shared, shared_n, device)?;
    let trows = Tensor::from_vec(
        rows.iter().map(|&(s, _)| s as u32).collect::<Vec<_>>(),
        b,
        device,
    )?;
    let lens_t = Tensor::from_vec(
        rows.iter().map(|&(_, n)| n as u32).collect::<Vec<_>>(),
        b,
        device,
    )?;
    let qrows = Tensor::from_vec((0..b as u32).collect::<Vec<_>>(), b, device)?;
    let tables = DecodeTables {
        qrows: &qrows,
        lens: &lens_t,
        table: &per_row,
        lmax,
        trows: None,
    };
    // The kernel under test reads the shared table where the case has chunks.
    let tested = DecodeTables {
        table: if several { &shared } else { &per_row },
        trows: several.then_some(&trows),
        ..tables
    };
    // DeepSeek-V2's softmax scale for a 192-wide query head.
    let scale = 1.0 / (192f64).sqrt();
    let reference = g
        .mla_decode_simple(&q_lat, &q_pe, &ckv, &kpe, &tables, scale)?
        .ok_or_else(|| anyhow::anyhow!("the CUDA-core MLA decode kernel did not take {name}"))?;
    let got = g
        .mla_decode_mma(&q_lat, &q_pe, &ckv, &kpe, &tested, scale)?
        .ok_or_else(|| anyhow::anyhow!("the tensor-core MLA decode kernel did not take {name}"))?;
    let (max_rel, cosine) = compare(&reference, &got)?;
    Ok(KernelCheck {
        case: format!("{name} (table {lmax})"),
        max_rel,
        cosine,
        passed: max_rel <= 0.01 && cosine >= 0.99999,
    })
}

pub fn print(device: &str, checks: &[KernelCheck]) {
    println!(
        "moemesh verify on {device}: tensor-core MLA decode against the CUDA-core kernel (bf16, 16 heads, 512 + 64); the fused absorbed products (prep + W_UK, split merge + W_UV) against the GEMM path; the fused residual + RMSNorm against its two kernels; the FP8 and INT4 expert kernels against the bf16 ones on the dequantised weights (bit-equal where they sum in the same order)"
    );
    println!(
        "{:<56} {:>12} {:>10}  result",
        "case", "max |Δ|/max", "cosine"
    );
    for c in checks {
        println!(
            "{:<56} {:>12.2e} {:>10.7} {}",
            c.case,
            c.max_rel,
            c.cosine,
            if c.passed { "pass" } else { "FAIL" }
        );
    }
}
