//! `moemesh verify`'s device-sampler check: on a GPU, the device sampler
//! ([`moemesh_engine::serving::pick`] through `sample_rows`) against the host sampler, the
//! reference ([`moemesh_engine::sampling`]), on fixed logits.
//!
//! Two checks:
//! - **Same draws.** For each kind of row (peaked, flat, bf16-rounded with many ties, with NaN
//!   and -inf entries; DeepSeek-V2's vocabulary of 102,400) and each parameter set (temperature,
//!   top_k, top_p, min_p, the penalties, suppressed ids, penalised greedy), a batch of seeded
//!   samplers picks several tokens on the device and the same samplers' clones pick them on the
//!   host. Both walk the same cuts in the same order with the same Philox uniform, so the
//!   tokens must be equal but where the masses' rounding differs (the device's weights are f32
//!   `expf`, the host's f64 `exp`: a draw lands within that rounding of a boundary about once
//!   in 10^7); at most [`MAX_MISMATCH_SHARE`] may differ. Logprobs within [`MAX_LOGPROB_ERR`].
//! - **The exact distribution.** Many seeded device draws of one small row against the row's
//!   exact distribution under the plan, by a chi-square test: the statistic has the chi-square
//!   law with df = kept - 1; it must stay below df + 6 sqrt(2 df) (a correct sampler fails
//!   about once in 10^6 runs; a wrong cut or mass fails by hundreds of deviations).

use moemesh_engine::sampling::{RowPlan, Sampler, SamplingParams};
use moemesh_engine::{Device, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Most draws, as a share, whose device token may differ from the host's (rounding; see the
/// module comment: the expected share is about 1e-7).
const MAX_MISMATCH_SHARE: f64 = 1e-3;
/// Largest |device - host| logprob: the device sums f32 `expf` terms in f64, the host f64 `exp`
/// terms, over 102,400 entries (relative error of the sum ~1e-7).
const MAX_LOGPROB_ERR: f32 = 1e-4;

/// One row of the report.
pub struct SamplerCheck {
    pub case: String,
    pub draws: usize,
    pub equal: usize,
    pub max_logprob_err: f32,
    /// (statistic, degrees of freedom) for the distribution check.
    pub chi2: Option<(f64, f64)>,
    pub passed: bool,
}

fn normal_row(rng: &mut ChaCha8Rng, vocab: usize, spread: f32) -> Vec<f32> {
    (0..vocab)
        .map(|_| {
            // Box–Muller.
            let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
            let u2: f32 = rng.random();
            spread * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

/// The parameter sets checked, by name, each with the batch it runs at where that is fixed: the plain greedy
/// rows go through `argmax_logprob`, at 8 rows on a cluster of blocks a row
/// (`argmax_logprob_c8`) and at 32 with one block a row.
fn param_sets() -> Vec<(&'static str, SamplingParams, Option<usize>)> {
    let base = SamplingParams {
        temperature: 1.0,
        seed: Some(0),
        ..SamplingParams::default()
    };
    let greedy = SamplingParams {
        temperature: 0.0,
        ..base
    };
    let sets = vec![
        ("T1", base),
        (
            "T0.6 p0.95",
            SamplingParams {
                temperature: 0.6,
                top_p: 0.95,
                ..base
            },
        ),
        ("k40", SamplingParams { top_k: 40, ..base }),
        (
            "T0.8 k50 p0.9",
            SamplingParams {
                temperature: 0.8,
                top_k: 50,
                top_p: 0.9,
                ..base
            },
        ),
        (
            "p0.9 minp0.05",
            SamplingParams {
                top_p: 0.9,
                min_p: 0.05,
                ..base
            },
        ),
        (
            "T1.7 k2000 p0.5",
            SamplingParams {
                temperature: 1.7,
                top_k: 2000,
                top_p: 0.5,
                ..base
            },
        ),
        (
            "T0.7 p0.95 penalties",
            SamplingParams {
                temperature: 0.7,
                top_p: 0.95,
                repetition_penalty: 1.3,
                frequency_penalty: 0.5,
                presence_penalty: 0.2,
                ..base
            },
        ),
        (
            "greedy penalties",
            SamplingParams {
                temperature: 0.0,
                repetition_penalty: 1.5,
                presence_penalty: 0.5,
                ..base
            },
        ),
    ];
    let mut out: Vec<_> = sets.into_iter().map(|(n, p)| (n, p, None)).collect();
    out.push(("greedy, 8 rows", greedy, Some(8)));
    out.push(("greedy, 32 rows", greedy, Some(32)));
    out
}

/// Runs both checks on `device`; an empty report where the device is not a GPU. `quick` runs
/// only the row with NaN and -inf entries, at batch 4 for one step, and no distribution check
/// (for compute-sanitizer, under which every launch is slow).
pub fn run(device: &Device, quick: bool) -> anyhow::Result<Vec<SamplerCheck>> {
    if !device.is_cuda() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let vocab = 102_400;
    let mut rows: Vec<(&str, Vec<f32>)> = vec![
        ("peaked", normal_row(&mut rng, vocab, 3.0)),
        ("flat", normal_row(&mut rng, vocab, 0.05)),
        ("bf16 ties", {
            let mut r = normal_row(&mut rng, vocab, 1.0);
            r.iter_mut()
                .for_each(|v| *v = f32::from_bits(v.to_bits() & 0xFFFF_0000));
            r
        }),
    ];
    let mut odd = normal_row(&mut rng, vocab, 2.0);
    for i in (0..vocab).step_by(97) {
        odd[i] = if i % 2 == 0 {
            f32::NAN
        } else {
            f32::NEG_INFINITY
        };
    }
    rows.push(("nan/-inf", odd));
    let (batch, steps) = if quick {
        rows.drain(..3);
        (4, 1)
    } else {
        (32, 4)
    };
    for (row_name, row) in &rows {
        for (pname, params, rows_here) in param_sets() {
            let batch = rows_here.unwrap_or(batch);
            let plain_greedy = rows_here.is_some();
            let mut device_side: Vec<Sampler> = (0..batch)
                .map(|b| {
                    let p = SamplingParams {
                        seed: Some(1000 + b as u64),
                        ..params
                    };
                    let prompt: Vec<u32> = (0..64).map(|_| rng.random_range(0..200u32)).collect();
                    let generated: Vec<u32> = (0..8).map(|_| rng.random_range(0..200u32)).collect();
                    // Every fourth sampler also has EOS-like ids suppressed for a while (not in
                    // the plain greedy sets: a row with suppressed ids goes to the sampler).
                    let s = Sampler::resume(p, b as u32).with_history(&prompt, &generated);
                    if b % 4 == 0 && !plain_greedy {
                        s.with_min_new_tokens(10 + steps, &[1, 2, 3])
                    } else {
                        s
                    }
                })
                .collect();
            let mut host_side = device_side.clone();
            let logits = Tensor::from_vec(row.repeat(batch), (batch, vocab), device)?;
            let (mut draws, mut equal, mut worst) = (0, 0, 0.0f32);
            for _ in 0..steps {
                let mut refs: Vec<&mut Sampler> = device_side.iter_mut().collect();
                let got = moemesh_engine::serving::pick(&logits, &mut refs)?;
                for (b, g) in got.iter().enumerate() {
                    let want = host_side[b].sample(row)?;
                    draws += 1;
                    equal += usize::from(want.token == g.token);
                    worst = worst.max((want.logprob - g.logprob).abs());
                    // Keep the two in step (their penalties read the history) where a token
                    // differed.
                    if want.token != g.token {
                        host_side[b] = device_side[b].clone();
                    }
                }
            }
            let passed = (draws - equal) as f64 <= MAX_MISMATCH_SHARE * draws as f64
                && worst <= MAX_LOGPROB_ERR;
            out.push(SamplerCheck {
                case: format!("{row_name}, {pname}"),
                draws,
                equal,
                max_logprob_err: worst,
                chi2: None,
                passed,
            });
        }
    }
    if !quick {
        out.extend(distribution_checks(device)?);
    }
    Ok(out)
}

/// One row of the timing table: the median wall time of one `pick` (launch, kernel, the copy
/// back) over 102,400-id rows.
pub struct PickTiming {
    pub rows: &'static str,
    pub batch: usize,
    pub how: &'static str,
    pub median_us: f64,
}

/// Times `pick` at batch 1 and 64, greedy and sampled (T 0.6, top_p 0.95: DeepSeek-R1's
/// defaults), on a peaked and a flat row: what the device sampler adds to a decode step.
pub fn timings(device: &Device) -> anyhow::Result<Vec<PickTiming>> {
    if !device.is_cuda() {
        return Ok(Vec::new());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let vocab = 102_400;
    let mut out = Vec::new();
    for (rows, spread) in [("peaked", 3.0), ("flat", 0.05)] {
        let row = normal_row(&mut rng, vocab, spread);
        for batch in [1, 64] {
            let logits = Tensor::from_vec(row.repeat(batch), (batch, vocab), device)?;
            for (how, params) in [
                ("greedy", SamplingParams::default()),
                (
                    "T0.6 p0.95",
                    SamplingParams {
                        temperature: 0.6,
                        top_p: 0.95,
                        seed: Some(1),
                        ..SamplingParams::default()
                    },
                ),
                (
                    "T0.6 p0.95 k50",
                    SamplingParams {
                        temperature: 0.6,
                        top_p: 0.95,
                        top_k: 50,
                        seed: Some(1),
                        ..SamplingParams::default()
                    },
                ),
            ] {
                let mut samplers: Vec<Sampler> = (0..batch).map(|_| Sampler::new(params)).collect();
                let mut times = Vec::new();
                for it in 0..40 {
                    let mut refs: Vec<&mut Sampler> = samplers.iter_mut().collect();
                    let t = std::time::Instant::now();
                    moemesh_engine::serving::pick(&logits, &mut refs)?;
                    if it >= 5 {
                        times.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                }
                times.sort_by(f64::total_cmp);
                out.push(PickTiming {
                    rows,
                    batch,
                    how,
                    median_us: times[times.len() / 2],
                });
            }
        }
    }
    Ok(out)
}

/// Prints the timing table.
pub fn print_timings(timings: &[PickTiming]) {
    println!("pick (launch, kernel, copy back), median of 35, 102,400 ids per row");
    println!("{:<8}{:>7}{:>18}{:>12}", "rows", "batch", "sampling", "µs");
    for t in timings {
        println!(
            "{:<8}{:>7}{:>18}{:>12.1}",
            t.rows, t.batch, t.how, t.median_us
        );
    }
}

/// Seeded device draws of one small row against its exact distribution.
fn distribution_checks(device: &Device) -> anyhow::Result<Vec<SamplerCheck>> {
    let row: Vec<f32> = (0..64)
        .map(|i| ((i * 37) % 23) as f32 * 0.21 - 2.0)
        .collect();
    let mut out = Vec::new();
    for (name, params) in [
        (
            "64 ids, T1.3 k20 p0.8",
            SamplingParams {
                temperature: 1.3,
                top_k: 20,
                top_p: 0.8,
                ..SamplingParams::default()
            },
        ),
        (
            "64 ids, T0.8 minp0.1",
            SamplingParams {
                temperature: 0.8,
                min_p: 0.1,
                ..SamplingParams::default()
            },
        ),
    ] {
        let rows = 4096;
        let launches = 10;
        let logits = Tensor::from_vec(row.repeat(rows), (rows, row.len()), device)?;
        let mut seen = vec![0u64; row.len()];
        let mut samplers: Vec<Sampler> = (0..rows)
            .map(|r| {
                Sampler::new(SamplingParams {
                    seed: Some(r as u64),
                    ..params
                })
            })
            .collect();
        for _ in 0..launches {
            let mut refs: Vec<&mut Sampler> = samplers.iter_mut().collect();
            for s in moemesh_engine::serving::pick(&logits, &mut refs)? {
                seen[s.token as usize] += 1;
            }
        }
        let plan: RowPlan = Sampler::new(params).plan();
        let exact = exact_distribution(&plan, &row);
        let n = (rows * launches) as f64;
        let (mut chi2, mut df, mut stray) = (0.0f64, -1.0f64, 0u64);
        for (i, &q) in exact.iter().enumerate() {
            if q == 0.0 {
                stray += seen[i];
                continue;
            }
            let e = q * n;
            chi2 += (seen[i] as f64 - e).powi(2) / e;
            df += 1.0;
        }
        let passed = stray == 0 && chi2 < df + 6.0 * (2.0 * df).sqrt();
        out.push(SamplerCheck {
            case: name.to_string(),
            draws: n as usize,
            equal: n as usize - stray as usize,
            max_logprob_err: 0.0,
            chi2: Some((chi2, df)),
            passed,
        });
    }
    Ok(out)
}

/// The probability of each id under `plan`: the host draw is a step function of its uniform,
/// so walking a fine grid of uniforms integrates it (the host draw itself is checked against
/// the definition by the engine's unit tests).
fn exact_distribution(plan: &RowPlan, row: &[f32]) -> Vec<f64> {
    let grid = 1 << 20;
    let mut probs = vec![0.0; row.len()];
    for g in 0..grid {
        let u = (g as f64 + 0.5) / grid as f64;
        probs[plan.draw(row, u)] += 1.0 / grid as f64;
    }
    probs
}

/// Prints the report as a table.
pub fn print(device: &str, checks: &[SamplerCheck]) {
    println!("moemesh verify on {device}: the device sampler against the host sampler");
    println!(
        "{:<34}{:>8}{:>12}{:>14}{:>18}{:>8}",
        "case", "draws", "equal", "max |Δ lp|", "chi2 / df", "result"
    );
    for c in checks {
        println!(
            "{:<34}{:>8}{:>12}{:>14.2e}{:>18}{:>8}",
            c.case,
            c.draws,
            c.equal,
            c.max_logprob_err,
            c.chi2
                .map(|(x, df)| format!("{x:.1} / {df}"))
                .unwrap_or_else(|| "—".into()),
            if c.passed { "pass" } else { "FAIL" }
        );
    }
}
