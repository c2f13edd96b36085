//! `moemesh verify` on a GPU: the FP8 routed-expert kernels (engine/src/cuda/experts_fp8.cu)
//! against the bf16 kernels run on the same weights dequantised on the device
//! (`weights::fp8::dequantize_e4m3`, the values the load-time dequantisation gives).
//!
//! The FP8 kernels dequantise to exactly those bf16 values and then run the bf16 kernels'
//! products in the same order, so the bound is **bit equality** of every output element. Random
//! bf16 weights are quantised to e4m3 with 128 × 128 block scales (`weights::fp8::quantize_e4m3`,
//! what `--weights-dtype fp8` does at load), random bf16 activations and routings; each case runs
//! one expert entry point twice, on the e4m3 stacks and on the dequantised bf16 stacks:
//! - `assigned`: host-built assignments through the decode (GEMV-style, tensor-core) kernels, at
//!   batches 1, 8 and 64;
//! - `routed`: a device routing through the engine's own dispatch (the decode kernels below
//!   [`moemesh_engine::cuda::GROUPED_MIN_PAIRS_PER_SLOT`] pairs per expert, the grouped GEMM from
//!   there: V2-Lite's 64 experts take it from batch 6), at batches 1, 8 and 64;
//! - `pairs`: a 2,048-token prefill through the grouped GEMM (the bf16 side held to the same
//!   mma.sync form: FP8 has no wgmma form).
//!
//! At V2-Lite's shape (hidden 2,048, 64 experts of 1,408, top-6), whose blocks are whole, and at
//! a shape of partial edge blocks (hidden 320, 8 experts of 160, top-2; also the k32 tiles).
//!
//! Then the dense projections' FP8 kernel (`dense_small` with an e4m3 weight, dense.cu) against
//! the bf16 kernel over the weight dequantised by `fp8_dequant_bf16` (itself checked bit-equal to
//! `dequantize_matrix`): bit equality, at 1 to 8 rows, plain and gate/up + SwiGLU, at V2-Lite's
//! shapes and partial-block ones.

use moemesh_engine::cuda::{
    DenseWeight, DeviceRouting, ExpertWeights, Gpu, HostAssignments, HostPairs,
};
use moemesh_engine::weights::fp8::{dequantize_e4m3, dequantize_matrix, quantize_e4m3};
use moemesh_engine::{DType, Device, Tensor};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::kernel_check::{KernelCheck, compare, normal};

/// An expert layer's shape: hidden, inner, experts, top-k.
struct Shape {
    name: &'static str,
    hidden: usize,
    inner: usize,
    experts: usize,
    k: usize,
}

/// One layer's stacks both ways: e4m3 with scales, and those dequantised to bf16.
struct Stacks {
    gate_up: Tensor,
    down: Tensor,
    gate_up_scales: Tensor,
    down_scales: Tensor,
    gate_up_bf16: Tensor,
    down_bf16: Tensor,
}

impl Stacks {
    fn fp8(&self) -> ExpertWeights<'_> {
        ExpertWeights {
            gate_up: &self.gate_up,
            down: &self.down,
            scales: Some((&self.gate_up_scales, &self.down_scales)),
            wgmma: false,
        }
    }

    fn bf16(&self) -> ExpertWeights<'_> {
        ExpertWeights {
            wgmma: false,
            ..ExpertWeights::dense(&self.gate_up_bf16, &self.down_bf16)
        }
    }
}

/// `m` random `[rows, cols]` matrices, each quantised on its own: `(q [m·rows, cols],
/// scales [m·⌈rows/128⌉, ⌈cols/128⌉], dequantised bf16 [m·rows, cols])`.
fn quantised(
    device: &Device,
    rng: &mut ChaCha8Rng,
    m: usize,
    rows: usize,
    cols: usize,
) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
    let (mut qs, mut ss) = (Vec::with_capacity(m), Vec::with_capacity(m));
    for _ in 0..m {
        device.set_seed(rng.random())?;
        let w = Tensor::randn(0f32, 0.03, (rows, cols), device)?;
        let (q, s) = quantize_e4m3(&w)?;
        qs.push(q);
        ss.push(s);
    }
    let (q, s) = (Tensor::stack(&qs, 0)?, Tensor::stack(&ss, 0)?);
    let deq = dequantize_e4m3(&q, &s, DType::BF16)?.reshape((m * rows, cols))?;
    let (rb, cb) = (s.dim(1)?, s.dim(2)?);
    Ok((q.reshape((m * rows, cols))?, s.reshape((m * rb, cb))?, deq))
}

fn stacks(device: &Device, rng: &mut ChaCha8Rng, sh: &Shape) -> anyhow::Result<Stacks> {
    let (gate_up, gate_up_scales, gate_up_bf16) =
        quantised(device, rng, 2 * sh.experts, sh.inner, sh.hidden)?;
    let (down, down_scales, down_bf16) = quantised(device, rng, sh.experts, sh.hidden, sh.inner)?;
    let (e, h, i) = (sh.experts, sh.hidden, sh.inner);
    let (hb, ib) = (h.div_ceil(128), i.div_ceil(128));
    Ok(Stacks {
        gate_up,
        // [experts, hidden, inner] and [experts, ⌈hidden/128⌉, ⌈inner/128⌉]
        down: down.reshape((e, h, i))?,
        gate_up_scales,
        down_scales: down_scales.reshape((e, hb, ib))?,
        gate_up_bf16,
        down_bf16: down_bf16.reshape((e, h, i))?,
    })
}

/// Every case at both shapes; empty where the kernels do not run.
pub fn run(g: &Gpu, device: &Device, rng: &mut ChaCha8Rng) -> anyhow::Result<Vec<KernelCheck>> {
    let shapes = [
        Shape {
            name: "V2-Lite",
            hidden: 2048,
            inner: 1408,
            experts: 64,
            k: 6,
        },
        Shape {
            name: "partial blocks",
            hidden: 320,
            inner: 160,
            experts: 8,
            k: 2,
        },
    ];
    let mut out = Vec::new();
    for sh in &shapes {
        let st = stacks(device, rng, sh)?;
        for batch in [1, 8, 64] {
            out.push(one(g, device, rng, sh, &st, Entry::Assigned, batch)?);
            out.push(one(g, device, rng, sh, &st, Entry::Routed, batch)?);
        }
        out.push(one(g, device, rng, sh, &st, Entry::Pairs, 2048)?);
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug)]
enum Entry {
    Assigned,
    Routed,
    Pairs,
}

fn one(
    g: &Gpu,
    device: &Device,
    rng: &mut ChaCha8Rng,
    sh: &Shape,
    st: &Stacks,
    entry: Entry,
    t: usize,
) -> anyhow::Result<KernelCheck> {
    let x = Tensor::from_vec(normal(rng, t * sh.hidden, 1.0), (t, sh.hidden), device)?
        .to_dtype(DType::BF16)?;
    // Each token's k distinct experts, weights in (0.05, 1].
    let mut triples = Vec::with_capacity(t * sh.k);
    for row in 0..t {
        let mut free: Vec<usize> = (0..sh.experts).collect();
        for _ in 0..sh.k {
            let e = free.swap_remove(rng.random_range(0..free.len()));
            triples.push((row, e, 0.05 + 0.95 * rng.random::<f32>()));
        }
    }
    let name = format!("FP8 experts, {}, {entry:?}, {t} tokens", sh.name).to_lowercase();
    // The routed entry's FP8 run folds the combine into its down kernel (up to
    // FOLD_MAX_TOKENS tokens), the bf16 reference combines apart: equal bits check both.
    let counters = moemesh_engine::cuda::combine_counters(device, sh.hidden)?;
    let run = |w: &ExpertWeights, counters: Option<&Tensor>| -> anyhow::Result<Option<Tensor>> {
        Ok(match entry {
            Entry::Assigned => {
                let a = HostAssignments::build(t, sh.experts, &triples, device)?;
                g.experts_assigned(&x, &a, w)?
            }
            Entry::Pairs => {
                let a = HostPairs::build(t, sh.experts, &triples, device)?;
                g.experts_pairs(&x, &a, w)?
            }
            Entry::Routed => {
                let ids: Vec<u32> = triples.iter().map(|p| p.1 as u32).collect();
                let ws: Vec<f32> = triples.iter().map(|p| p.2).collect();
                let routing = DeviceRouting {
                    ids: Tensor::from_vec(ids, (t, sh.k), device)?,
                    weights: Tensor::from_vec(ws, (t, sh.k), device)?,
                    k: sh.k,
                };
                let slot_of: Vec<i32> = (0..sh.experts as i32).collect();
                let slot_of = Tensor::from_vec(slot_of, sh.experts, device)?;
                g.experts_routed(&x, &routing, &slot_of, w, usize::MAX, counters)?
            }
        })
    };
    let missing = |what: &str| anyhow::anyhow!("the {what} expert kernels did not take {name}");
    let reference = run(&st.bf16(), None)?.ok_or_else(|| missing("bf16"))?;
    let got = run(&st.fp8(), counters.as_ref())?.ok_or_else(|| missing("FP8"))?;
    let equal = bits(&reference)? == bits(&got)?;
    let (max_rel, cosine) = compare(&reference, &got)?;
    Ok(KernelCheck {
        case: if equal {
            name
        } else {
            format!("{name}: not bit-equal")
        },
        max_rel,
        cosine,
        passed: equal,
    })
}

/// Every value's f32 bits (bf16 and f32 widen exactly): what bit equality compares.
fn bits(t: &Tensor) -> anyhow::Result<Vec<u32>> {
    Ok(t.to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}

/// The dense FP8 cases (see the module doc): (rows, K, N, gate/up).
pub fn dense(g: &Gpu, device: &Device, rng: &mut ChaCha8Rng) -> anyhow::Result<Vec<KernelCheck>> {
    let mut out = Vec::new();
    for (rows, k, n, gate_up) in [
        (1, 2048, 3648, false),
        (8, 2048, 2048, false),
        (5, 2048, 2816, true),
        (8, 1408, 2048, false),
        (1, 2048, 1408, true),
        (8, 2048, 1408, true),
        (5, 320, 176, false),
        (3, 320, 80, true),
    ] {
        out.push(dense_one(g, device, rng, rows, k, n, gate_up)?);
    }
    Ok(out)
}

fn dense_one(
    g: &Gpu,
    device: &Device,
    rng: &mut ChaCha8Rng,
    rows: usize,
    k: usize,
    n: usize,
    gate_up: bool,
) -> anyhow::Result<KernelCheck> {
    let wn = if gate_up { 2 * n } else { n };
    let name = format!(
        "dense FP8 {}{rows} × {k} → {n}",
        if gate_up { "gate/up + SwiGLU, " } else { "" }
    );
    let missing = |what: &str| anyhow::anyhow!("the {what} kernel did not take {name}");
    device.set_seed(rng.random())?;
    let w = Tensor::randn(0f32, 0.03, (wn, k), device)?;
    let (q, s) = quantize_e4m3(&w)?;
    let x =
        Tensor::from_vec(normal(rng, rows * k, 1.0), (rows, k), device)?.to_dtype(DType::BF16)?;
    let deq = g
        .fp8_dequant_bf16(&q, &s)?
        .ok_or_else(|| missing("dequantisation"))?;
    let deq_equal = bits(&deq)? == bits(&dequantize_matrix(&q, &s, DType::BF16)?)?;
    let reference = g
        .dense_small(&x, DenseWeight::Bf16(&deq), gate_up)?
        .ok_or_else(|| missing("bf16 dense"))?;
    let got = g
        .dense_small(&x, DenseWeight::Fp8 { q: &q, scale: &s }, gate_up)?
        .ok_or_else(|| missing("FP8 dense"))?;
    let equal = bits(&reference)? == bits(&got)?;
    let (max_rel, cosine) = compare(&reference, &got)?;
    Ok(KernelCheck {
        case: match (deq_equal, equal) {
            (true, true) => name,
            (false, _) => format!("{name}: dequantisation not bit-equal"),
            (true, false) => format!("{name}: not bit-equal"),
        },
        max_rel,
        cosine,
        passed: deq_equal && equal,
    })
}
