//! `moemesh verify` on a GPU: the FP8 routed-expert kernels (engine/src/cuda/experts_fp8.cu)
//! against the bf16 kernels run on the same weights dequantised on the device
//! (`weights::fp8::dequantize_e4m3`, the values the load-time dequantisation gives).
//!
//! The FP8 kernels dequantise to exactly those bf16 values and then run the bf16 kernels'
//! products in the same order, so the bound is **bit equality** of every output element; except
//! the decode kernels over a k width that is a multiple of 128 (V2-Lite's), which walk 128-wide
//! chunks and so sum in another order: there ‖Δ‖/‖bf16‖ ≤ 1e-3 (see `one`); and the routed
//! entry's gate/up on Hopper at V2-Lite's shape (`takes_bulk_gate_up`: e4m3 read as f16, the
//! block scales on each chunk's f32 sums), held with the FP8 stacks' exact layer in f32 as the
//! INT4 scaled-sums kernels are (below): its error may not exceed the bf16 kernels'. Random
//! bf16 weights are quantised to e4m3 with 128 × 128 block scales (`weights::fp8::quantize_e4m3`,
//! what `--weights-dtype fp8` does at load), random bf16 activations and routings; each case runs
//! one expert entry point twice, on the e4m3 stacks and on the dequantised bf16 stacks:
//! - `assigned`: host-built assignments through the decode (GEMV-style, tensor-core) kernels, at
//!   batches 1, 8 and 64;
//! - `routed`: a device routing through the engine's own dispatch (the decode kernels below
//!   [`moemesh_engine::cuda::grouped_min_pairs_per_slot`] pairs per expert, the grouped
//!   GEMM from there, the bf16 side held to the same rule: V2-Lite's 64 experts take it from
//!   batch 86 in FP8 and 171 in INT4, the partial shape's 8 from batch 32 and 64), at batches
//!   1, 8, 64 and 128;
//! - `pairs`: a 2,048-token prefill through the grouped GEMM (the bf16 side held to the same
//!   form: the wgmma one for FP8, where the widths are multiples of 64, else mma.sync; INT4 has
//!   only the mma.sync form).
//!
//! At V2-Lite's shape (hidden 2,048, 64 experts of 1,408, top-6), whose blocks are whole, and at
//! a shape of partial edge blocks (hidden 320, 8 experts of 160, top-2; also the k32 tiles).
//!
//! The INT4 routed-expert kernels (engine/src/cuda/experts_int4.cu) the same way, against the bf16
//! kernels over `Int4Tensor::dequantize`'s values (weights quantised by `Int4Tensor::quantize`,
//! what `--weights-dtype int4` does at load), the same cases, at V2-Lite's shape in groups of 128
//! (symmetric, as compressed-tensors' W4A16 stores them) and at the partial shape in groups of 32
//! with random zero points (asymmetric checkpoints; also the k32 tiles and a 32-wide k tail in
//! the decode kernels): bit equality, except where the decode kernels take groups of 64 or more
//! columns, which sum each group's exact values and scale the f32 sums (at V2-Lite's shape over
//! 128-wide chunks, `MmaInt4Wide`): there both sides are
//! compared with the exact INT4 layer in f32 (f32 weights, f32 activations between the
//! products), and the INT4 kernels' relative error ‖Δ‖/‖exact‖ may not exceed the bf16
//! kernels' (which round every scaled weight to bf16).
//!
//! Then the dense projections' FP8 kernels (`dense_small` with an e4m3 weight, dense.cu) against
//! the bf16 kernel over the weight dequantised by `fp8_dequant_bf16` (itself checked bit-equal to
//! `dequantize_matrix`): bit equality, plain and gate/up + SwiGLU, at V2-Lite's shapes and
//! partial-block ones, at 1 to 8 rows and at 9 to 32 (the `_rows16` / `_rows32` kernels, up to
//! `MOEMESH_DENSE_FP8_ROWS`), there against the bf16 kernel run on each 8 rows in turn: the walk
//! feeds every group of 8 the same MMAs in the same order as the 8-row kernel. Past those rows,
//! to 64, the split-k `dense_fp8_sk` (`dense_split`): against the f32 product of the same bf16
//! values, within one bf16 rounding of the output (its k ranges' f32 sums are added in another
//! order than any bf16 kernel's).

use moemesh_engine::cuda::{
    DENSE_FP8_SPLIT_MAX_ROWS, DENSE_SMALL_MAX_ROWS, DenseWeight, DeviceRouting, ExpertQuant,
    ExpertWeights, Gpu, HostAssignments, HostPairs, Int4Groups, dense_fp8_max_rows,
    dense_fp8_split_enabled, grouped_min_pairs_per_slot, takes_bulk_gate_up, takes_grouped,
    takes_wide_chunks,
};
use moemesh_engine::weights::fp8::{dequantize_e4m3, dequantize_matrix, quantize_e4m3};
use moemesh_engine::weights::int4::Int4Tensor;
use moemesh_engine::{DType, Device, Tensor};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::kernel_check::{KernelCheck, against_f32_product, compare, normal};

/// An expert layer's shape: hidden, inner, experts, top-k.
struct Shape {
    name: &'static str,
    hidden: usize,
    inner: usize,
    experts: usize,
    k: usize,
}

/// One layer's stacks both ways: quantised (e4m3 with scales, or INT4 with groups), and those
/// dequantised to bf16.
struct Stacks {
    gate_up: Tensor,
    down: Tensor,
    quant: Quant,
    gate_up_bf16: Tensor,
    down_bf16: Tensor,
    /// The dequantised values in f32, unrounded (the exact INT4 or FP8 model), `[2E·I, H]` and
    /// `[E, H, I]`: the reference the scaled-sums decode kernels are held to.
    exact: Option<(Tensor, Tensor)>,
}

/// What the quantised stacks carry besides their values.
enum Quant {
    Fp8 {
        gate_up: Tensor,
        down: Tensor,
    },
    Int4 {
        gate_up: (Tensor, Option<Tensor>),
        down: (Tensor, Option<Tensor>),
        group: usize,
    },
}

impl Quant {
    fn name(&self) -> &'static str {
        match self {
            Quant::Fp8 { .. } => "FP8",
            Quant::Int4 { .. } => "INT4",
        }
    }
}

fn int4_groups((scale, zero): &(Tensor, Option<Tensor>), group: usize) -> Int4Groups<'_> {
    Int4Groups {
        scale,
        zero: zero.as_ref(),
        group,
    }
}

impl Stacks {
    fn quantised(&self) -> ExpertWeights<'_> {
        let quant = match &self.quant {
            Quant::Fp8 { gate_up, down } => ExpertQuant::Fp8 { gate_up, down },
            Quant::Int4 {
                gate_up,
                down,
                group,
            } => ExpertQuant::Int4 {
                gate_up: int4_groups(gate_up, *group),
                down: int4_groups(down, *group),
            },
        };
        ExpertWeights {
            gate_up: &self.gate_up,
            down: &self.down,
            quant,
            wgmma: matches!(quant, ExpertQuant::Fp8 { .. }),
            grouped_from: grouped_min_pairs_per_slot(&quant),
        }
    }

    /// The dequantised stacks, taking the grouped GEMM (and its form) where the quantised ones
    /// do.
    fn bf16(&self) -> ExpertWeights<'_> {
        let q = self.quantised();
        ExpertWeights {
            wgmma: q.wgmma,
            grouped_from: q.grouped_from,
            ..ExpertWeights::dense(&self.gate_up_bf16, &self.down_bf16)
        }
    }
}

/// `m` random `[rows, cols]` matrices, each quantised on its own: `(q [m·rows, cols],
/// scales [m·⌈rows/128⌉, ⌈cols/128⌉], dequantised bf16 [m·rows, cols], dequantised f32
/// [m·rows, cols])` (f32: e4m3 · scale, the exact FP8 model).
fn quantised(
    device: &Device,
    rng: &mut ChaCha8Rng,
    m: usize,
    rows: usize,
    cols: usize,
) -> anyhow::Result<(Tensor, Tensor, Tensor, Tensor)> {
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
    let exact = dequantize_e4m3(&q, &s, DType::F32)?.reshape((m * rows, cols))?;
    let (rb, cb) = (s.dim(1)?, s.dim(2)?);
    Ok((
        q.reshape((m * rows, cols))?,
        s.reshape((m * rb, cb))?,
        deq,
        exact,
    ))
}

fn stacks(device: &Device, rng: &mut ChaCha8Rng, sh: &Shape) -> anyhow::Result<Stacks> {
    let (gate_up, gate_up_scales, gate_up_bf16, gate_up_f32) =
        quantised(device, rng, 2 * sh.experts, sh.inner, sh.hidden)?;
    let (down, down_scales, down_bf16, down_f32) =
        quantised(device, rng, sh.experts, sh.hidden, sh.inner)?;
    let (e, h, i) = (sh.experts, sh.hidden, sh.inner);
    let (hb, ib) = (h.div_ceil(128), i.div_ceil(128));
    Ok(Stacks {
        gate_up,
        // [experts, hidden, inner] and [experts, ⌈hidden/128⌉, ⌈inner/128⌉]
        down: down.reshape((e, h, i))?,
        quant: Quant::Fp8 {
            gate_up: gate_up_scales,
            down: down_scales.reshape((e, hb, ib))?,
        },
        gate_up_bf16,
        down_bf16: down_bf16.reshape((e, h, i))?,
        exact: Some((gate_up_f32, down_f32.reshape((e, h, i))?)),
    })
}

/// `m` random `[rows, cols]` matrices, each quantised to INT4 in groups of `group` columns, with
/// random zero points in 5..=11 when `asymmetric`: `(q [m·rows, cols/2], (scales [m·rows,
/// ⌈cols/group⌉], zeros), dequantised bf16 [m·rows, cols], dequantised f32 [m·rows, cols])`.
type Int4Stack = (Tensor, (Tensor, Option<Tensor>), Tensor, Tensor);
fn int4_quantised(
    device: &Device,
    rng: &mut ChaCha8Rng,
    (m, rows, cols): (usize, usize, usize),
    group: usize,
    asymmetric: bool,
) -> anyhow::Result<Int4Stack> {
    let (mut qs, mut ss, mut zs, mut ds, mut fs) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..m {
        device.set_seed(rng.random())?;
        let w = Tensor::randn(0f32, 0.03, (rows, cols), device)?;
        let mut t = Int4Tensor::quantize(&w, group)?;
        if asymmetric {
            let groups = t.scale.dim(1)?;
            let z: Vec<u8> = (0..rows * groups)
                .map(|_| rng.random_range(5..=11))
                .collect();
            t.zero = Some(Tensor::from_vec(z, (rows, groups), device)?);
        }
        ds.push(t.dequantize(DType::BF16)?);
        fs.push(t.dequantize(DType::F32)?);
        qs.push(t.q);
        ss.push(t.scale);
        zs.extend(t.zero);
    }
    let zeros = if zs.is_empty() {
        None
    } else {
        Some(Tensor::cat(&zs, 0)?)
    };
    Ok((
        Tensor::cat(&qs, 0)?,
        (Tensor::cat(&ss, 0)?, zeros),
        Tensor::cat(&ds, 0)?,
        Tensor::cat(&fs, 0)?,
    ))
}

fn int4_stacks(
    device: &Device,
    rng: &mut ChaCha8Rng,
    sh: &Shape,
    group: usize,
    asymmetric: bool,
) -> anyhow::Result<Stacks> {
    let (e, h, i) = (sh.experts, sh.hidden, sh.inner);
    let (gate_up, gu_groups, gate_up_bf16, gate_up_f32) =
        int4_quantised(device, rng, (2 * e, i, h), group, asymmetric)?;
    let (down, d_groups, down_bf16, down_f32) =
        int4_quantised(device, rng, (e, h, i), group, asymmetric)?;
    Ok(Stacks {
        gate_up,
        // [experts, hidden, inner / 2]; the groups stay [experts · hidden, ⌈inner/group⌉]
        down: down.reshape((e, h, i / 2))?,
        quant: Quant::Int4 {
            gate_up: gu_groups,
            down: d_groups,
            group,
        },
        gate_up_bf16,
        down_bf16: down_bf16.reshape((e, h, i))?,
        exact: Some((gate_up_f32, down_f32.reshape((e, h, i))?)),
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
    for (n, sh) in shapes.iter().enumerate() {
        // INT4: V2-Lite in groups of 128, symmetric; the partial shape in groups of 32 with
        // zero points.
        let partial = n == 1;
        for st in [
            stacks(device, rng, sh)?,
            int4_stacks(device, rng, sh, if partial { 32 } else { 128 }, partial)?,
        ] {
            for batch in [1, 8, 64, 128] {
                out.push(one(g, device, rng, sh, &st, Entry::Assigned, batch)?);
                out.push(one(g, device, rng, sh, &st, Entry::Routed, batch)?);
            }
            out.push(one(g, device, rng, sh, &st, Entry::Pairs, 2048)?);
        }
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
    let name = format!(
        "{} experts, {}, {entry:?}, {t} tokens",
        st.quant.name(),
        sh.name
    )
    .to_lowercase();
    // The routed entry's quantised run folds the combine into its down kernel (up to
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
                    handed_off: false,
                };
                let slot_of: Vec<i32> = (0..sh.experts as i32).collect();
                let slot_of = Tensor::from_vec(slot_of, sh.experts, device)?;
                g.experts_routed(&x, &routing, &slot_of, w, usize::MAX, counters)?
            }
        })
    };
    let missing = |what: &str| anyhow::anyhow!("the {what} expert kernels did not take {name}");
    let reference = run(&st.bf16(), None)?.ok_or_else(|| missing("bf16"))?;
    let got = run(&st.quantised(), counters.as_ref())?.ok_or_else(|| missing(st.quant.name()))?;
    let (max_rel, cosine) = compare(&reference, &got)?;
    // INT4 in groups of 64+ through the decode kernels sums each group's exact q − zero and
    // scales the sums (experts_int4.cu's MmaInt4): not the bf16 kernels' bits, which round each
    // scaled weight to bf16. Both are held to the exact INT4 model in f32: its error may not
    // exceed the bf16 reference's.
    let decode = match entry {
        Entry::Assigned => true,
        Entry::Routed => !takes_grouped(t * sh.k, sh.experts, &st.quantised()),
        Entry::Pairs => false,
    };
    // FP8's gate/up through the bulk-copy kernel (the routed entry at V2-Lite's shape on Hopper,
    // `takes_bulk_gate_up`) takes e4m3 as f16 and scales each chunk's f32 sums: the exact
    // products, not the bf16 kernels' rounded weights; held to the exact layer likewise.
    let q = st.quantised().quant;
    let bulk = matches!(st.quant, Quant::Fp8 { .. })
        && matches!(entry, Entry::Routed)
        && decode
        && takes_bulk_gate_up(&q, sh.hidden, sh.inner, t * sh.k);
    let scaled_sums =
        (matches!(st.quant, Quant::Int4 { group, .. } if group >= 64) && decode) || bulk;
    if let (true, Some((gate_up, down))) = (scaled_sums, &st.exact) {
        let exact = exact_layer(&x, &triples, gate_up, down, sh)?;
        let (e_got, e_ref) = (rel_l2(&exact, &got)?, rel_l2(&exact, &reference)?);
        return Ok(KernelCheck {
            case: format!(
                "{name}: ‖Δ‖/‖exact‖ {e_got:.2e} against the bf16 kernels' {e_ref:.2e}{}",
                if e_got <= e_ref { "" } else { " (worse)" }
            ),
            max_rel,
            cosine,
            passed: e_got <= e_ref,
        });
    }
    // FP8 through the decode kernels where a k width is a multiple of 128 (V2-Lite's both):
    // the 128-wide chunk forms (experts_fp8.cu's MmaFp8Wide) take the same bf16 weight values
    // in another order of f32 sums, which can also flip a bf16 rounding of the intermediate h.
    // Held to ‖Δ‖/‖bf16‖ ≤ 1e-3: a quarter of one bf16 step (2⁻⁸ = 3.9e-3), a tenth of what
    // rounding the weights to bf16 costs against the exact layer (3.3e-3 at this shape, the
    // INT4 cases'), and far below what a wrong scale, row or chunk gives (≥ 1e-2).
    let wide = matches!(st.quant, Quant::Fp8 { .. })
        && decode
        && (takes_wide_chunks(&q, sh.hidden, true) || takes_wide_chunks(&q, sh.inner, false));
    if wide {
        let d = rel_l2(&reference, &got)?;
        return Ok(KernelCheck {
            case: format!(
                "{name} (128-wide chunks): ‖Δ‖/‖bf16 kernels‖ {d:.2e}{}",
                if d <= 1e-3 { "" } else { " (> 1e-3)" }
            ),
            max_rel,
            cosine,
            passed: d <= 1e-3,
        });
    }
    let equal = bits(&reference)? == bits(&got)?;
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

/// The routed experts' weighted sum in f32 from f32 weights (`gate_up [2E·I, H]`, expert e's
/// gate rows at 2e·I, its up rows after them; `down [E, H, I]`), nothing rounded to bf16 but the
/// activations as given: `[T, H]` f32.
fn exact_layer(
    x: &Tensor,
    triples: &[(usize, usize, f32)],
    gate_up: &Tensor,
    down: &Tensor,
    sh: &Shape,
) -> anyhow::Result<Tensor> {
    let device = x.device();
    let x = x.to_dtype(DType::F32)?;
    let mut out = Tensor::zeros((x.dim(0)?, sh.hidden), DType::F32, device)?;
    for e in 0..sh.experts {
        let mine: Vec<&(usize, usize, f32)> = triples.iter().filter(|p| p.1 == e).collect();
        if mine.is_empty() {
            continue;
        }
        let rows: Vec<u32> = mine.iter().map(|p| p.0 as u32).collect();
        let ws: Vec<f32> = mine.iter().map(|p| p.2).collect();
        let rows = Tensor::from_vec(rows, mine.len(), device)?;
        let ws = Tensor::from_vec(ws, (mine.len(), 1), device)?;
        let xe = x.index_select(&rows, 0)?;
        let gu = xe.matmul(&gate_up.narrow(0, 2 * e * sh.inner, 2 * sh.inner)?.t()?)?;
        let h = (gu.narrow(1, 0, sh.inner)?.silu()? * gu.narrow(1, sh.inner, sh.inner)?)?;
        let y = h.matmul(&down.get(e)?.t()?)?.broadcast_mul(&ws)?;
        out = out.index_add(&rows, &y, 0)?;
    }
    Ok(out)
}

/// ‖got − exact‖ / ‖exact‖ over every element.
fn rel_l2(exact: &Tensor, got: &Tensor) -> anyhow::Result<f64> {
    let a = exact
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let b = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        num += (f64::from(*y) - f64::from(*x)).powi(2);
        den += f64::from(*x).powi(2);
    }
    Ok((num / den.max(f64::MIN_POSITIVE)).sqrt())
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
        (16, 2048, 2816, true),
        (13, 2048, 3648, false),
        (24, 2048, 2816, true),
        (32, 2816, 2048, false),
        (20, 320, 176, false),
        (17, 320, 80, true),
    ] {
        if rows <= dense_fp8_max_rows() {
            out.push(dense_one(g, device, rng, rows, k, n, gate_up)?);
        }
    }
    Ok(out)
}

/// e4m3 products of more rows than dense.cu's kernels take, up to
/// [`DENSE_FP8_SPLIT_MAX_ROWS`]: experts_fp8.cu's split-k `dense_fp8_sk` (through `dense_small`,
/// where [`dense_fp8_split_enabled`]) against the product in f32 of the same bf16 values (the
/// weight as `fp8_dequant_bf16` gives it, which the kernel's tiles hold), by
/// `kernel_check::against_f32_product`'s bound, as the bf16 dense cases. (rows, K, N, gate/up): V2-Lite's
/// shared experts' gate/up and down at 24–64 rows, its o_proj, a gate/up half of 1,408, a column
/// block cut short (N 176), a k range of 3 steps (one range), and a gate/up form whose halves do
/// not start a block row of scales (N 80: not taken, `None`, so the caller dequantises).
pub fn dense_split(
    g: &Gpu,
    device: &Device,
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<Vec<KernelCheck>> {
    let mut out = Vec::new();
    if !dense_fp8_split_enabled() {
        return Ok(out);
    }
    for (rows, k, n, gate_up) in [
        (24, 2048, 2816, true),
        (64, 2048, 2816, true),
        (32, 2816, 2048, false),
        (64, 2816, 2048, false),
        (17, 2048, 2048, false),
        (40, 2048, 1408, true),
        (20, 320, 176, false),
        (48, 192, 256, false),
        (33, 320, 80, true),
    ] {
        if rows <= dense_fp8_max_rows() || rows > DENSE_FP8_SPLIT_MAX_ROWS {
            continue;
        }
        let wn = if gate_up { 2 * n } else { n };
        let name = format!(
            "dense FP8 split-k {}{rows} × {k} → {n}",
            if gate_up { "gate/up + SwiGLU, " } else { "" }
        );
        device.set_seed(rng.random())?;
        let w = Tensor::randn(0f32, 0.03, (wn, k), device)?;
        let (q, s) = quantize_e4m3(&w)?;
        let x = Tensor::from_vec(normal(rng, rows * k, 1.0), (rows, k), device)?
            .to_dtype(DType::BF16)?;
        let got = g.dense_small(&x, DenseWeight::Fp8 { q: &q, scale: &s }, gate_up)?;
        let takes = !gate_up || n.is_multiple_of(128);
        let Some(got) = got else {
            out.push(KernelCheck {
                case: if takes {
                    format!("{name}: not taken")
                } else {
                    format!("{name}: not taken, as it must not be")
                },
                max_rel: 0.0,
                cosine: 1.0,
                passed: !takes,
            });
            continue;
        };
        if !takes {
            out.push(KernelCheck {
                case: format!("{name}: taken, though its up rows start inside a scale block"),
                max_rel: f32::INFINITY,
                cosine: 0.0,
                passed: false,
            });
            continue;
        }
        let deq = g
            .fp8_dequant_bf16(&q, &s)?
            .ok_or_else(|| anyhow::anyhow!("the dequantisation did not take {name}"))?;
        out.push(against_f32_product(name, &x, &deq, n, gate_up, &got)?);
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
    // The bf16 kernel on 8 rows at a time (all of them up to 8).
    let reference = (0..rows)
        .step_by(DENSE_SMALL_MAX_ROWS)
        .map(|r0| {
            let xs = x
                .narrow(0, r0, DENSE_SMALL_MAX_ROWS.min(rows - r0))?
                .contiguous()?;
            g.dense_small(&xs, DenseWeight::Bf16(&deq), gate_up)?
                .ok_or_else(|| missing("bf16 dense"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let reference = Tensor::cat(&reference, 0)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// `exact_layer` is Σ_j w_j · down_e(silu(gate_e(x)) ⊙ up_e(x)) per token, from the stacked
    /// layout the kernels read (expert e's gate rows at 2e·I, its up rows after them): checked
    /// against the formula written out element by element in f64 on a tiny layer.
    #[test]
    fn the_exact_layer_is_the_routed_experts_weighted_sum() -> anyhow::Result<()> {
        let sh = Shape {
            name: "tiny",
            hidden: 6,
            inner: 4,
            experts: 3,
            k: 2,
        };
        let (h, i, e) = (sh.hidden, sh.inner, sh.experts);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let dev = Device::Cpu;
        let gu: Vec<f32> = normal(&mut rng, 2 * e * i * h, 0.5);
        let dn: Vec<f32> = normal(&mut rng, e * h * i, 0.5);
        let xs: Vec<f32> = normal(&mut rng, 3 * h, 1.0);
        let triples = [
            (0, 2, 0.7f32),
            (0, 0, 0.3),
            (1, 1, 1.0),
            (2, 2, 0.25),
            (2, 1, 0.5),
        ];
        let x = Tensor::from_vec(xs.clone(), (3, h), &dev)?;
        let got = exact_layer(
            &x,
            &triples,
            &Tensor::from_vec(gu.clone(), (2 * e * i, h), &dev)?,
            &Tensor::from_vec(dn.clone(), (e, h, i), &dev)?,
            &sh,
        )?
        .to_vec2::<f32>()?;
        let dot = |w: &[f32], v: &[f32]| -> f64 {
            w.iter()
                .zip(v)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum()
        };
        for (t, row) in got.iter().enumerate() {
            let xt = &xs[t * h..(t + 1) * h];
            let mut want = vec![0f64; h];
            for &(_, ex, w) in triples.iter().filter(|p| p.0 == t) {
                let act: Vec<f32> = (0..i)
                    .map(|j| {
                        let g = dot(&gu[(2 * ex * i + j) * h..][..h], xt);
                        let u = dot(&gu[((2 * ex + 1) * i + j) * h..][..h], xt);
                        (g / (1.0 + (-g).exp()) * u) as f32
                    })
                    .collect();
                for (r, out) in want.iter_mut().enumerate() {
                    *out += f64::from(w) * dot(&dn[(ex * h + r) * i..][..i], &act);
                }
            }
            for (a, b) in row.iter().zip(&want) {
                assert!(
                    (f64::from(*a) - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{a} vs {b}"
                );
            }
        }
        let exact = Tensor::from_vec(vec![3f32, 4.0], 2, &dev)?;
        let off = Tensor::from_vec(vec![3f32, 4.5], 2, &dev)?;
        assert!((rel_l2(&exact, &off)? - 0.1).abs() < 1e-12);
        assert_eq!(rel_l2(&exact, &exact)?, 0.0);
        Ok(())
    }
}
