//! The MoE router (DeepSeek's `Gate`): which routed experts each token goes to, and with what
//! weight.
//!
//! - V3 `noaux_tc`: `s = sigmoid(x·Wᵀ)`; the correction bias is added for *selection only*;
//!   groups are ranked by the sum of their two best biased scores, the best `topk_group` groups
//!   are kept, experts outside them are excluded (−∞), the top-k biased scores choose the experts,
//!   and their *unbiased* scores are the weights (normalised when `norm_topk_prob`), times
//!   `routed_scaling_factor`.
//! - V2 `greedy`: softmax, top-k. `group_limited_greedy`: groups ranked by their max score.
//!   Weights are the softmax scores times `routed_scaling_factor`; with `norm_topk_prob` (and
//!   k > 1) they are normalised to sum to 1 instead, as DeepSeek's V2 code does.
//!
//! The router runs in f32 on the host: it is a `[T, E]` problem of a few thousand numbers, and
//! exactness (ties, −∞ masks) matters more here than speed.

use candle_core::{DType, Tensor};

use crate::config::{ModelConfig, ScoringFunc, TopkMethod};
use crate::error::Result;
use crate::weights::Loader;

/// The routing decision for a batch of tokens: `k` (expert id, weight) pairs per token,
/// row-major `[T, k]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub k: usize,
    pub expert_ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn num_tokens(&self) -> usize {
        self.expert_ids.len().checked_div(self.k).unwrap_or(0)
    }

    /// Token `t`'s `(expert, weight)` pairs.
    pub fn token(&self, t: usize) -> impl Iterator<Item = (u32, f32)> + '_ {
        let r = t * self.k..(t + 1) * self.k;
        self.expert_ids[r.clone()]
            .iter()
            .copied()
            .zip(self.weights[r].iter().copied())
    }
}

#[derive(Debug, Clone)]
pub struct Router {
    /// `[E, hidden]`, f32.
    weight: Tensor,
    /// `e_score_correction_bias` (V3), `[E]`.
    bias: Option<Vec<f32>>,
    /// The same bias on the weight's device, for the routing kernel.
    bias_device: Option<Tensor>,
    scoring: ScoringFunc,
    method: TopkMethod,
    top_k: usize,
    n_group: usize,
    topk_group: usize,
    norm_topk_prob: bool,
    scaling: f32,
    /// `--router-skew`: a load-testing bias added to the logits before the top-k (see
    /// [`zipf_skew`]); `None` when off, which leaves the logits untouched.
    skew: Option<Skew>,
    /// On a GPU, the one-word counter of the fused logits-and-routing kernel
    /// ([`route_logits`](crate::cuda::Gpu::route_logits)); 0 between launches. The kernels of a
    /// model run on its device's one stream, so no two launches use it at once.
    counter: Option<Tensor>,
}

/// Tokens up to which a GPU router computes its logits in the routing kernel itself (a decode
/// step's few rows; one launch instead of the logits GEMM's two and the routing's one). Above,
/// the GEMM's blocking pays: the fused kernel reads the router weight once per token.
pub const FUSED_ROUTE_MAX_TOKENS: usize = 16;

/// The router skew's per-expert bias, on the host and on the weight's device.
#[derive(Debug, Clone)]
struct Skew {
    /// `[E]`, added to each token's host logits.
    host: Vec<f32>,
    /// The same `[E]` on the weight's device, added to the logits of the routing kernel.
    device: Tensor,
}

/// The bias a Zipf-skewed router adds to layer `layer`'s `n` router logits: `-s·ln(1 + rank(e))`,
/// where `rank` is a permutation of the experts drawn from the layer index alone (SplitMix64
/// seeded with it, then Fisher–Yates), so that every process computes the same one and each
/// layer has its own hot experts. The expert of rank 0 gets 0; with exponent `s` the softmax
/// (or sigmoid) weight of rank `r` is scaled by about `(1 + r)^-s`, a Zipf law over the ranks.
/// A load-testing knob (`--router-skew`): it changes which experts a token goes to, so outputs
/// differ from the model's own.
pub fn zipf_skew(n: usize, layer: usize, s: f32) -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (layer as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    // order[r] = the expert of rank r.
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let mut bias = vec![0.0f32; n];
    for (rank, &e) in order.iter().enumerate() {
        bias[e] = -s * (1.0 + rank as f32).ln();
    }
    bias
}

impl Router {
    /// Loads `{prefix}.weight` (and `{prefix}.e_score_correction_bias` for `noaux_tc`).
    pub fn new(cfg: &ModelConfig, loader: &Loader, prefix: &str) -> Result<Self> {
        let e = cfg.n_routed_experts;
        let weight = loader.get_f32(&format!("{prefix}.weight"), &[e, cfg.hidden_size])?;
        let bias_device = match cfg.topk_method {
            TopkMethod::NoauxTc => {
                Some(loader.get_f32(&format!("{prefix}.e_score_correction_bias"), &[e])?)
            }
            _ => None,
        };
        let bias = bias_device
            .as_ref()
            .map(|b| b.to_vec1::<f32>())
            .transpose()?;
        Ok(Router {
            weight,
            bias,
            bias_device,
            scoring: cfg.scoring_func,
            method: cfg.topk_method,
            top_k: cfg.num_experts_per_tok,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            norm_topk_prob: cfg.norm_topk_prob,
            scaling: cfg.routed_scaling_factor as f32,
            skew: None,
            counter: crate::cuda::gpu(loader.device())
                .map(|_| Tensor::zeros(1, DType::U32, loader.device()))
                .transpose()?,
        })
    }

    /// Skews this router (of MoE layer `layer`) by Zipf exponent `s` ([`zipf_skew`]); `s == 0`
    /// turns the skew off (the logits are then the model's, bit for bit).
    pub fn set_skew(&mut self, layer: usize, s: f32) -> Result<()> {
        self.skew = if s == 0.0 {
            None
        } else {
            let host = zipf_skew(self.weight.dim(0)?, layer, s);
            let device = Tensor::from_slice(&host, host.len(), self.weight.device())?;
            Some(Skew { host, device })
        };
        Ok(())
    }

    /// Router logits of `x: [T, hidden]`, f32 on the host (with the skew, if any, added).
    fn logits(&self, x: &Tensor) -> Result<Vec<Vec<f32>>> {
        let weight = self.weight.to_device(x.device())?;
        let logits = x.to_dtype(DType::F32)?.matmul(&weight.t()?)?;
        let mut rows: Vec<Vec<f32>> = logits.to_device(&candle_core::Device::Cpu)?.to_vec2()?;
        if let Some(skew) = &self.skew {
            for row in &mut rows {
                row.iter_mut().zip(&skew.host).for_each(|(l, b)| *l += b);
            }
        }
        Ok(rows)
    }

    /// Routes `x: [T, hidden]` (the post-attention-normed activations).
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let logits = self.logits(x)?;
        let mut expert_ids = Vec::with_capacity(logits.len() * self.top_k);
        let mut weights = Vec::with_capacity(logits.len() * self.top_k);
        for row in &logits {
            let (ids, w) = self.route_token(row);
            expert_ids.extend(ids);
            weights.extend(w);
        }
        Ok(Routing {
            k: self.top_k,
            expert_ids,
            weights,
        })
    }

    /// Experts a token is routed to.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Routes on the GPU with the routing kernel (same rules, same tie-breaking as
    /// [`route_token`](Self::route_token)): the result stays on the device, so the in-process
    /// experts need no host round trip. `None` off the GPU. `handoff`: the rows and routing
    /// to hand to expert workers in the same launch where the fused kernel runs
    /// ([`crate::cuda::RouteHandoff`]; the routing's `handed_off` says whether it did).
    pub fn route_device(
        &self,
        x: &Tensor,
        handoff: Option<&crate::cuda::RouteHandoff>,
    ) -> Result<Option<crate::cuda::DeviceRouting>> {
        let Some(g) = crate::cuda::gpu(x.device()) else {
            return Ok(None);
        };
        let normalise =
            self.norm_topk_prob && (self.method == TopkMethod::NoauxTc || self.top_k > 1);
        let params = crate::cuda::RouteParams {
            bias: self.bias_device.as_ref(),
            softmax: self.scoring == ScoringFunc::Softmax,
            method: match self.method {
                TopkMethod::Greedy => 0,
                TopkMethod::GroupLimitedGreedy => 1,
                TopkMethod::NoauxTc => 2,
            },
            k: self.top_k,
            n_group: self.n_group,
            topk_group: self.topk_group,
            normalise,
            scale: self.method == TopkMethod::NoauxTc || !normalise,
            scaling: self.scaling,
        };
        let weight = self.weight.to_device(x.device())?;
        let xf = x.to_dtype(DType::F32)?;
        let skew = self
            .skew
            .as_ref()
            .map(|s| s.device.to_device(x.device()))
            .transpose()?;
        if let Some(counter) = &self.counter
            && xf.dim(0)? <= FUSED_ROUTE_MAX_TOKENS
            && let Some(routing) =
                g.route_logits(&xf, &weight, skew.as_ref(), counter, &params, handoff)?
        {
            return Ok(Some(routing));
        }
        let logits = xf.matmul(&weight.t()?)?;
        // [T, E] + [E]
        let logits = match &skew {
            Some(skew) => logits.broadcast_add(skew)?,
            None => logits,
        };
        g.route(&logits, &params)
    }

    /// How close each token of `x: [T, hidden]` is to a different expert choice (see
    /// [`decision_margin`](Self::decision_margin)).
    pub fn margins(&self, x: &Tensor) -> Result<Vec<f32>> {
        Ok(self
            .logits(x)?
            .iter()
            .map(|row| self.decision_margin(row))
            .collect())
    }

    /// How far one token's routing is from a tie, as the smallest change ε of the router
    /// logits (every logit moving by at most ε) that could change which experts are chosen:
    ///
    /// - sigmoid scores move by at most ε/4 (the sigmoid's slope is ≤ 1/4), so the gap g
    ///   between the k-th and (k+1)-th selection score closes only when ε ≥ 2g, and the gap
    ///   between the last kept and first dropped group (a V3 group score is a sum of two
    ///   scores) only when ε ≥ g;
    /// - softmax preserves the order of the logits (no bias), so a logit gap g closes only when
    ///   ε ≥ g/2, for experts and for groups (a V2 group score is its max).
    ///
    /// `f32::INFINITY` when nothing is dropped. Used to tell routing near-ties (where bf16
    /// rounding may legitimately pick other experts) from decisions it must not change.
    pub fn decision_margin(&self, logits: &[f32]) -> f32 {
        let (_, choice, group_gap) = match self.scoring {
            ScoringFunc::Sigmoid => self.selection_scores(logits),
            // Rank by the logits themselves: the same order as the softmax scores.
            ScoringFunc::Softmax => self.selection_by_logits(logits),
        };
        let kept: Vec<f32> = choice.iter().copied().filter(|v| v.is_finite()).collect();
        let top = top_values(&kept, self.top_k + 1);
        let expert_gap = match (top.get(self.top_k - 1), top.get(self.top_k)) {
            (Some(a), Some(b)) => a - b,
            _ => f32::INFINITY,
        };
        match self.scoring {
            ScoringFunc::Sigmoid => (2.0 * expert_gap).min(group_gap),
            ScoringFunc::Softmax => (expert_gap / 2.0).min(group_gap / 2.0),
        }
    }

    /// `selection_scores` over the raw logits (softmax routing has no bias).
    fn selection_by_logits(&self, logits: &[f32]) -> (Vec<f32>, Vec<f32>, f32) {
        let mut choice = logits.to_vec();
        let per_group = choice.len() / self.n_group;
        let mut group_gap = f32::INFINITY;
        if self.method == TopkMethod::GroupLimitedGreedy && self.topk_group < self.n_group {
            let group_max: Vec<f32> = choice
                .chunks(per_group)
                .map(|g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max))
                .collect();
            let ranked = top_values(&group_max, self.topk_group + 1);
            group_gap = ranked[self.topk_group - 1] - ranked[self.topk_group];
            let kept = top_indices(&group_max, self.topk_group);
            for (g, chunk) in choice.chunks_mut(per_group).enumerate() {
                if !kept.contains(&g) {
                    chunk.fill(f32::NEG_INFINITY);
                }
            }
        }
        (logits.to_vec(), choice, group_gap)
    }

    /// The scores (weights come from these), the selection scores with excluded groups at −∞,
    /// and the gap between the last kept and the first excluded group score (∞ when ungrouped).
    fn selection_scores(&self, logits: &[f32]) -> (Vec<f32>, Vec<f32>, f32) {
        let scores: Vec<f32> = match self.scoring {
            ScoringFunc::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
            ScoringFunc::Softmax => softmax(logits),
        };
        let mut choice: Vec<f32> = match &self.bias {
            Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
            None => scores.clone(),
        };
        let per_group = scores.len() / self.n_group;
        let grouped = matches!(
            self.method,
            TopkMethod::NoauxTc | TopkMethod::GroupLimitedGreedy
        );
        let mut group_gap = f32::INFINITY;
        if grouped && self.topk_group < self.n_group {
            let group_scores: Vec<f32> = choice
                .chunks(per_group)
                .map(|g| match self.method {
                    TopkMethod::NoauxTc => top_values(g, 2).iter().sum(),
                    _ => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                })
                .collect();
            let ranked = top_values(&group_scores, self.topk_group + 1);
            group_gap = ranked[self.topk_group - 1] - ranked[self.topk_group];
            let kept = top_indices(&group_scores, self.topk_group);
            for (g, chunk) in choice.chunks_mut(per_group).enumerate() {
                if !kept.contains(&g) {
                    chunk.fill(f32::NEG_INFINITY);
                }
            }
        }
        (scores, choice, group_gap)
    }

    /// One token's routing from its router logits.
    pub fn route_token(&self, logits: &[f32]) -> (Vec<u32>, Vec<f32>) {
        let (scores, choice, _) = self.selection_scores(logits);
        let ids = top_indices(&choice, self.top_k);
        let mut w: Vec<f32> = ids.iter().map(|&i| scores[i]).collect();
        let normalise =
            self.norm_topk_prob && (self.method == TopkMethod::NoauxTc || self.top_k > 1);
        if normalise {
            let sum: f32 = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|x| *x /= sum);
        }
        // V3 scales after normalising; V2 scales only when it does not normalise.
        if self.method == TopkMethod::NoauxTc || !normalise {
            w.iter_mut().for_each(|x| *x *= self.scaling);
        }
        (ids.into_iter().map(|i| i as u32).collect(), w)
    }
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
fn top_indices(x: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

fn top_values(x: &[f32], k: usize) -> Vec<f32> {
    top_indices(x, k).into_iter().map(|i| x[i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(method: TopkMethod, scoring: ScoringFunc, bias: Option<Vec<f32>>) -> Router {
        Router {
            weight: Tensor::zeros((8, 2), DType::F32, &candle_core::Device::Cpu).expect("zeros"),
            bias_device: None,
            bias,
            scoring,
            method,
            top_k: 2,
            n_group: 4,
            topk_group: 2,
            norm_topk_prob: true,
            scaling: 2.5,
            skew: None,
            counter: None,
        }
    }

    /// A router over 16 experts with random weights (hidden 8), greedy softmax top-2.
    /// `n` fixed pseudo-normal values (Irwin–Hall: twelve uniforms from an xorshift, minus 6),
    /// so that a test's draw is the same on every run.
    fn normals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut uniform = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f32 / (1u64 << 53) as f32
        };
        (0..n)
            .map(|_| (0..12).map(|_| uniform()).sum::<f32>() - 6.0)
            .collect()
    }

    fn random_router() -> Router {
        let dev = candle_core::Device::Cpu;
        Router {
            weight: Tensor::from_vec(normals(16 * 8, 1), (16, 8), &dev).expect("weight"),
            n_group: 1,
            topk_group: 1,
            ..router(TopkMethod::Greedy, ScoringFunc::Softmax, None)
        }
    }

    #[test]
    fn a_large_skew_sends_the_tokens_to_the_top_ranked_experts_and_zero_leaves_logits_alone() {
        let dev = candle_core::Device::Cpu;
        let mut r = random_router();
        let x = Tensor::from_vec(normals(512 * 8, 2), (512, 8), &dev).expect("x");
        let plain = r.logits(&x).expect("logits");
        // S = 30: the rank-2 expert trails rank 1 by 30·ln(3/2) = 12.2 in the logits, about 3
        // standard deviations of the difference of two experts' logits (hidden 8, unit weights:
        // sd ≈ 4), so nearly every token's top 2 are ranks 0 and 1. (At S = 10 the gap, 4.1, is
        // one standard deviation and the share lands near 0.9, too close to a bound.)
        let bias = zipf_skew(16, 3, 30.0);
        // Ranks 0 and 1 of layer 3: the two largest biases.
        let hot = top_indices(&bias, 2);
        let share = |r: &Router| {
            let routing = r.route(&x).expect("route");
            let on_hot = routing
                .expert_ids
                .iter()
                .filter(|&&e| hot.contains(&(e as usize)))
                .count();
            on_hot as f64 / routing.expert_ids.len() as f64
        };
        let unskewed = share(&r);
        r.set_skew(3, 30.0).expect("skew");
        let skewed = share(&r);
        println!(
            "share of the top-2 ranked experts: {unskewed:.3} unskewed, {skewed:.3} at S = 30"
        );
        assert!(skewed > 0.95, "{skewed}");
        assert!(skewed > unskewed + 0.3, "{unskewed} -> {skewed}");
        // The skew is exactly the bias added to each logit.
        let biased = r.logits(&x).expect("logits");
        for (p, b) in plain.iter().zip(&biased) {
            for ((p, b), z) in p.iter().zip(b).zip(&bias) {
                assert_eq!((p + z).to_bits(), b.to_bits());
            }
        }
        // S = 0: the model's logits, bit for bit.
        r.set_skew(3, 0.0).expect("skew off");
        let back = r.logits(&x).expect("logits");
        let bits = |v: &[Vec<f32>]| v.iter().flatten().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&plain), bits(&back));
    }

    #[test]
    fn the_skews_ranks_are_a_permutation_that_differs_by_layer_and_is_stable() {
        let b0 = zipf_skew(64, 0, 1.0);
        assert_eq!(b0, zipf_skew(64, 0, 1.0));
        // Exactly one expert per rank: the sorted biases are -ln(1 + r), r = 0..63.
        let mut sorted = b0.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        for (r, v) in sorted.iter().enumerate() {
            assert_eq!(*v, -(1.0 + r as f32).ln());
        }
        let hottest: std::collections::BTreeSet<usize> = (0..8)
            .map(|l| top_indices(&zipf_skew(64, l, 1.0), 1)[0])
            .collect();
        assert!(hottest.len() > 4, "hot experts per layer: {hottest:?}");
    }

    #[test]
    fn noaux_tc_selects_on_biased_scores_but_weighs_by_unbiased_ones() {
        // Group scores use the top-2 biased scores of each pair of experts.
        let bias = vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, -5.0];
        let r = router(TopkMethod::NoauxTc, ScoringFunc::Sigmoid, Some(bias));
        let logits = [3.0, 2.9, 0.0, 0.0, 0.0, 0.0, -3.0, 4.0];
        let (ids, w) = r.route_token(&logits);
        // Group 3 (experts 6, 7) sums to ~5.05+~-4.02 ≈ 1.03; group 0 ≈ 1.9; groups 1, 2 = 1.0.
        // Kept: groups 0 and 3. Top-2 biased: expert 6 (5.05) then expert 0 (0.95).
        assert_eq!(ids, vec![6, 0]);
        let s6 = 1.0 / (1.0 + 3f32.exp());
        let s0 = 1.0 / (1.0 + (-3f32).exp());
        let expect = [s6 / (s6 + s0) * 2.5, s0 / (s6 + s0) * 2.5];
        assert!(
            (w[0] - expect[0]).abs() < 1e-6 && (w[1] - expect[1]).abs() < 1e-6,
            "{w:?}"
        );
    }

    #[test]
    fn decision_margin_is_the_closest_group_or_expert_boundary() {
        let bias = vec![0.0; 8];
        let r = router(TopkMethod::NoauxTc, ScoringFunc::Sigmoid, Some(bias));
        let s = |l: f32| 1.0 / (1.0 + (-l).exp());
        // Groups (top-2 sums): 0 → s(3)+s(2.9), 1 → s(1)+s(0.2), 2 → s(0.9)+s(0.1), 3 → 1.0.
        // Kept: groups 0 and 1; a logit change ε moves a group sum by ≤ ε/2 and a difference
        // of two by ≤ ε, so the margin is the group gap itself. The experts' boundary (2nd
        // s(2.9) vs 3rd s(1)) closes at twice their gap.
        let logits = [3.0, 2.9, 1.0, 0.2, 0.9, 0.1, 0.0, 0.0];
        let group_gap = (s(1.0) + s(0.2)) - (s(0.9) + s(0.1));
        let expert_gap = s(2.9) - s(1.0);
        assert!(group_gap < 2.0 * expert_gap);
        assert!((r.decision_margin(&logits) - group_gap).abs() < 1e-6);
        // Far-apart groups: the expert boundary is the closer one.
        let logits = [3.0, 2.9, 2.85, 0.0, -3.0, -3.0, -3.0, -3.0];
        let expert_gap = s(2.9) - s(2.85);
        assert!((r.decision_margin(&logits) - 2.0 * expert_gap).abs() < 1e-6);
        // Softmax: half the logit gap between the 3rd (1.9) and the 4th (1.8) expert.
        let mut r = router(TopkMethod::Greedy, ScoringFunc::Softmax, None);
        r.top_k = 3;
        let logits = [3.0, 2.0, 1.9, 1.8, 0.0, 0.0, 0.0, 0.0];
        assert!((r.decision_margin(&logits) - 0.05).abs() < 1e-6);
    }

    #[test]
    fn group_limited_greedy_ranks_groups_by_max() {
        let mut r = router(TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax, None);
        r.norm_topk_prob = false;
        r.topk_group = 1;
        // Group 1 holds the single best expert (3); group 0 has the best sum but a lower max.
        let logits = [1.9, 1.9, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0];
        let (ids, _) = r.route_token(&logits);
        assert_eq!(ids, vec![3, 2]);
    }
}
