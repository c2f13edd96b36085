//! `moemesh verify` on a GPU: the tensor-core MLA decode kernel against the CUDA-core one.
//!
//! The tiny fixtures are too small for the tensor-core kernel (it needs DeepSeek's 512 + 64
//! latent and heads in groups of 16), so `verify`'s fixture checks exercise only the CUDA-core
//! kernel, which they compare with HF transformers. This check closes the loop: random bf16
//! queries and a random paged pool at V2-Lite's shapes (16 heads; batches of 1 to 64; contexts
//! from 1 to 4,100 positions, in pool rows scattered over the pool; table widths both the
//! longest context, as an eager step passes them, and a wider power of two, as a CUDA graph
//! does), both kernels, every output compared.
//!
//! Bound: both compute in f32 from the same bf16 inputs and round the output to bf16 once, so
//! an element may differ by a rounding step of bf16 (2⁻⁸ of its magnitude) plus the f32
//! differences of summation order and of the probabilities' two bf16 parts (~2⁻¹⁶): the check
//! asks every element to be within 1% of the output's largest magnitude, and the cosine
//! over all of them to be at least 0.99999.

use moemesh_engine::cuda::{DecodeTables, Gpu};
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
const KV_LORA: usize = 512;
const ROPE: usize = 64;

fn normal(rng: &mut ChaCha8Rng, n: usize, spread: f32) -> Vec<f32> {
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
    let cases: Vec<(&str, Vec<usize>, bool)> = vec![
        ("b1, 7 positions", vec![7], false),
        ("b1, 160 positions, table 256", vec![160], true),
        ("b1, 4,100 positions", vec![4100], false),
        ("b5, 1 to 257", vec![1, 64, 65, 130, 257], false),
        ("b5, 1 to 257, table 512", vec![1, 64, 65, 130, 257], true),
        (
            "b64, 1 to 400",
            (0..64).map(|i| 1 + (i * 37) % 400).collect(),
            true,
        ),
    ];
    let mut out = Vec::new();
    for (name, lens, wide) in cases {
        out.push(one(&g, device, &mut rng, name, &lens, wide)?);
    }
    Ok(out)
}

fn one(
    g: &Gpu,
    device: &Device,
    rng: &mut ChaCha8Rng,
    name: &str,
    lens: &[usize],
    wide: bool,
) -> anyhow::Result<KernelCheck> {
    let b = lens.len();
    let longest = lens.iter().copied().max().unwrap_or(1);
    let lmax = if wide {
        longest.next_power_of_two().max(256)
    } else {
        longest
    };
    // A pool with room to scatter every sequence's rows.
    let pool_rows = lens.iter().sum::<usize>() * 2 + 16;
    let bf16 = |v: Vec<f32>, shape: &[usize]| -> anyhow::Result<Tensor> {
        Ok(Tensor::from_vec(v, shape, device)?.to_dtype(DType::BF16)?)
    };
    let q_lat = bf16(normal(rng, HEADS * b * KV_LORA, 1.0), &[HEADS, b, KV_LORA])?;
    let q_pe = bf16(normal(rng, HEADS * b * ROPE, 1.0), &[HEADS, b, ROPE])?;
    let ckv = bf16(normal(rng, pool_rows * KV_LORA, 1.0), &[pool_rows, KV_LORA])?;
    let kpe = bf16(normal(rng, pool_rows * ROPE, 1.0), &[pool_rows, ROPE])?;
    // Each sequence's positions at distinct random pool rows, the table padded with its last.
    let mut free: Vec<u32> = (0..pool_rows as u32).collect();
    let mut table = Vec::with_capacity(b * lmax);
    for &n in lens {
        let mut own = Vec::with_capacity(n);
        for _ in 0..n {
            let at = rng.random_range(0..free.len());
            own.push(free.swap_remove(at));
        }
        let last = own[n - 1];
        table.extend_from_slice(&own);
        table.extend(std::iter::repeat_n(last, lmax - n));
    }
    let table = Tensor::from_vec(table, b * lmax, device)?;
    let lens_t = Tensor::from_vec(
        lens.iter().map(|&n| n as u32).collect::<Vec<_>>(),
        b,
        device,
    )?;
    let qrows = Tensor::from_vec((0..b as u32).collect::<Vec<_>>(), b, device)?;
    let tables = DecodeTables {
        qrows: &qrows,
        lens: &lens_t,
        table: &table,
        lmax,
    };
    // DeepSeek-V2's softmax scale for a 192-wide query head.
    let scale = 1.0 / (192f64).sqrt();
    let reference = g
        .mla_decode_simple(&q_lat, &q_pe, &ckv, &kpe, &tables, scale)?
        .ok_or_else(|| anyhow::anyhow!("the CUDA-core MLA decode kernel did not take {name}"))?;
    let got = g
        .mla_decode_mma(&q_lat, &q_pe, &ckv, &kpe, &tables, scale)?
        .ok_or_else(|| anyhow::anyhow!("the tensor-core MLA decode kernel did not take {name}"))?;
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
    Ok(KernelCheck {
        case: format!("{name} (table {lmax})"),
        max_rel,
        cosine,
        passed: max_rel <= 0.01 && cosine >= 0.99999,
    })
}

pub fn print(device: &str, checks: &[KernelCheck]) {
    println!(
        "moemesh verify on {device}: tensor-core MLA decode against the CUDA-core kernel (bf16, 16 heads, 512 + 64)"
    );
    println!(
        "{:<44} {:>12} {:>10}  result",
        "case", "max |Δ|/max", "cosine"
    );
    for c in checks {
        println!(
            "{:<44} {:>12.2e} {:>10.7} {}",
            c.case,
            c.max_rel,
            c.cosine,
            if c.passed { "pass" } else { "FAIL" }
        );
    }
}
