//! Choosing the next token from a row of logits, per sequence.
//!
//! A temperature below [`GREEDY_BELOW`] (0 included) is greedy (argmax, ties to the lowest id,
//! as `torch.argmax`): dividing logits by a tinier one overflows them. Otherwise the
//! logits are divided by the temperature, cut to the `top_k` best, softmaxed, cut to the smallest
//! prefix whose mass reaches `top_p`, and sampled with the sequence's own ChaCha8 generator —
//! seeded from the request's seed when given, so the same seed gives the same tokens whatever
//! else shares the batch. The reported logprob is the token's log-softmax under the raw
//! logits (temperature 1, no filtering), as vLLM and TGI report it.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{EngineError, Result};

/// Temperatures below this are greedy decoding, as vLLM rules (`_SAMPLING_EPS`): dividing
/// logits by anything smaller (down to the subnormals) overflows them to infinities. The one
/// place the rule lives; the proto comments and the README state it.
pub const GREEDY_BELOW: f32 = 1e-5;

/// Per-request sampling parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Below [`GREEDY_BELOW`] (0 included) means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// In (0, 1]; 1 means no nucleus cut.
    pub top_p: f32,
    /// Seed of the sequence's generator; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks every field; the message names the field and its allowed range.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(EngineError::InvalidInput(format!(
                "sampling.temperature must be a finite number >= 0 (below {GREEDY_BELOW} = greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::InvalidInput(format!(
                "sampling.top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.top_k > vocab_size {
            return Err(EngineError::InvalidInput(format!(
                "sampling.top_k must be at most the vocabulary size ({vocab_size}), got {}",
                self.top_k
            )));
        }
        Ok(())
    }

    /// Whether the next token is the argmax: a temperature below [`GREEDY_BELOW`].
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }
}

/// A sampled token and its log-probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

/// One sequence's sampler: its parameters and its random generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        Sampler { params, rng }
    }

    /// A sampler that continues another one's random stream after `drawn` samples (a sequence
    /// moved to another gate samples exactly what it would have).
    pub fn resume(params: SamplingParams, drawn: u32) -> Self {
        let mut s = Sampler::new(params);
        if !params.is_greedy() {
            for _ in 0..drawn {
                let _: f64 = s.rng.random();
            }
        }
        s
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (`[vocab]`, f32).
    pub fn sample(&mut self, logits: &[f32]) -> Result<Sampled> {
        if logits.is_empty() {
            return Err(EngineError::InvalidInput(
                "cannot sample from an empty logits row".into(),
            ));
        }
        let token = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        Ok(Sampled {
            token: token as u32,
            logprob: log_softmax_at(logits, token),
        })
    }

    fn draw(&mut self, logits: &[f32]) -> usize {
        let mut cand = candidates(&self.params, logits);
        // The candidates are walked from the most likely down, for the nucleus and for the draw.
        // Sorting a whole vocabulary (129k entries for DeepSeek) for each token takes
        // milliseconds, and the walk nearly always ends within the first few hundred, so only
        // those are sorted up front, and more only as the walk gets there.
        let mut sorted = SORTED_HEAD.min(cand.len());
        if sorted == 0 {
            return argmax(logits);
        }
        if sorted < cand.len() {
            cand.select_nth_unstable_by(sorted - 1, by_logit_desc);
        }
        cand[..sorted].sort_unstable_by(by_logit_desc);
        let (best, max) = cand[0];
        let weight = |l: f32| f64::from(l - max).exp();
        let total: f64 = cand.iter().map(|&(_, l)| weight(l)).sum();
        // Once the walk reaches the end of the sorted prefix, the next best candidates (four
        // times as many) are selected from the rest and sorted.
        fn sort_rest(cand: &mut [(usize, f32)], sorted: &mut usize, upto: usize) {
            if upto < *sorted || *sorted == cand.len() {
                return;
            }
            let next = (*sorted * 4).min(cand.len());
            if next < cand.len() {
                cand[*sorted..].select_nth_unstable_by(next - *sorted - 1, by_logit_desc);
            }
            cand[*sorted..next].sort_unstable_by(by_logit_desc);
            *sorted = next;
        }
        // The nucleus: the shortest prefix whose probability reaches top_p.
        let mut keep = cand.len();
        let mut kept = total;
        if self.params.top_p < 1.0 {
            let target = f64::from(self.params.top_p) * total;
            let mut cum = 0.0;
            for i in 0..cand.len() {
                sort_rest(&mut cand, &mut sorted, i);
                cum += weight(cand[i].1);
                if cum >= target {
                    keep = i + 1;
                    kept = cum;
                    break;
                }
            }
        }
        let u = self.rng.random::<f64>() * kept;
        let mut acc = 0.0;
        for i in 0..keep {
            sort_rest(&mut cand, &mut sorted, i);
            acc += weight(cand[i].1);
            if u < acc {
                return cand[i].0;
            }
        }
        // Rounding left `acc` a hair under `kept` and `u` above it: the last kept candidate.
        cand.get(keep - 1).map_or(best, |c| c.0)
    }
}

/// The tokens a draw chooses from, as (id, logit / temperature): NaNs left out, and cut to the
/// `top_k` best (in no particular order) when that is set.
fn candidates(params: &SamplingParams, logits: &[f32]) -> Vec<(usize, f32)> {
    let inv_t = 1.0 / params.temperature;
    let mut cand: Vec<(usize, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.is_nan())
        .map(|(i, &l)| (i, l * inv_t))
        .collect();
    let k = params.top_k;
    if k > 0 && k < cand.len() {
        cand.select_nth_unstable_by(k - 1, by_logit_desc);
        cand.truncate(k);
    }
    cand
}

/// How many of the most likely candidates [`Sampler::draw`] sorts before it walks them.
const SORTED_HEAD: usize = 256;

/// Descending logit, ties to the lower id: the order candidates are walked in.
fn by_logit_desc(a: &(usize, f32), b: &(usize, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Samples one row for each sampler, the rows in parallel: a row costs a few passes over the
/// vocabulary, and a step samples for every sequence of its batch.
pub fn sample_batch(jobs: &mut [(&mut Sampler, &[f32])]) -> Result<Vec<Sampled>> {
    use rayon::prelude::*;
    jobs.par_iter_mut().map(|(s, row)| s.sample(row)).collect()
}

/// Index of the largest value; ties go to the lowest index; NaNs are never chosen.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in x.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best
}

fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    let max = logits
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| f64::from(v - max).exp())
        .sum();
    (f64::from(logits[i] - max) - sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The draw as it was before the partial sort: the whole candidate list sorted, then
    /// walked. The reference for `partial_sort_draws_what_a_full_sort_draws`.
    fn reference_draw(params: &SamplingParams, rng: &mut ChaCha8Rng, logits: &[f32]) -> usize {
        // The candidates are built as before; what changed is how they are walked.
        let mut cand = candidates(params, logits);
        cand.sort_unstable_by(by_logit_desc);
        let Some(&(best, max)) = cand.first() else {
            return argmax(logits);
        };
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|&(_, l)| f64::from(l - max).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if params.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= f64::from(params.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let kept: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= kept);
        }
        let u: f64 = rng.random();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if u < acc {
                return cand[i].0;
            }
        }
        // Rounding left `acc` a hair under 1 and `u` above it: the last kept candidate.
        cand.get(probs.len().saturating_sub(1))
            .map_or(best, |c| c.0)
    }

    #[test]
    fn partial_sort_draws_what_a_full_sort_draws() {
        use rand_distr::{Distribution, Normal};
        // Peaked rows end the walk within the sorted head; flat ones (spread 0.05) go far past
        // it, into the lazily sorted tail. A repeated value checks that ties go by id.
        let mut noise = ChaCha8Rng::seed_from_u64(1);
        let mut rows = Vec::new();
        for (vocab, spread) in [(129_280, 3.0), (129_280, 0.05), (5_000, 1.0), (300, 0.5)] {
            let normal = Normal::new(0.0f32, spread).expect("normal");
            let mut row: Vec<f32> = (0..vocab).map(|_| normal.sample(&mut noise)).collect();
            row[7] = row[3];
            rows.push(row);
        }
        let mut draws = 0;
        for row in &rows {
            for temperature in [0.6, 1.0, 1.7] {
                for top_k in [0, 40, 2_000] {
                    for top_p in [1.0, 0.95, 0.5] {
                        let p = params(temperature, top_k, top_p, draws as u64);
                        let mut fast = Sampler::new(p);
                        let mut rng = ChaCha8Rng::seed_from_u64(draws as u64);
                        for _ in 0..8 {
                            let want = reference_draw(&p, &mut rng, row);
                            assert_eq!(fast.draw(row), want, "{p:?}, vocab {}", row.len());
                            draws += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(draws, 4 * 27 * 8);
    }

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
        }
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        let mut s = Sampler::new(SamplingParams::default());
        let out = s.sample(&[0.1, 2.0, 2.0, -1.0]).expect("sample");
        assert_eq!(out.token, 1);
        let expect = 2.0 - (0.1f64.exp() + 2.0 * 2f64.exp() + (-1f64).exp()).ln();
        assert!((f64::from(out.logprob) - expect).abs() < 1e-6);
    }

    #[test]
    fn same_seed_same_tokens_and_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..64)
                .map(|_| s.sample(&logits).expect("sample").token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0, 4.0, 3.0, 0.0, -1.0];
        let mut s = Sampler::new(params(1.0, 2, 1.0, 1));
        for _ in 0..200 {
            assert!(s.sample(&logits).expect("sample").token < 2);
        }
        // p(0) = e^5 / Σ ≈ 0.66, so top_p 0.5 keeps only token 0.
        let mut s = Sampler::new(params(1.0, 0, 0.5, 1));
        for _ in 0..200 {
            assert_eq!(s.sample(&logits).expect("sample").token, 0);
        }
    }

    #[test]
    fn validation_names_field_and_limit() {
        let bad = [
            (params(-0.1, 0, 1.0, 0), "temperature"),
            (params(1.0, 0, 0.0, 0), "top_p"),
            (params(1.0, 0, 1.5, 0), "top_p"),
            (params(1.0, 11, 1.0, 0), "top_k"),
        ];
        for (p, field) in bad {
            let msg = p.validate(10).expect_err(field).to_string();
            assert!(msg.contains(field), "{msg}");
        }
        params(0.7, 10, 0.9, 0).validate(10).expect("valid");
    }

    #[test]
    fn temperatures_below_the_threshold_are_greedy_and_sample_finite_tokens() {
        // Large logits, so that dividing them by a tiny temperature would overflow to +inf.
        let logits = [100.0, 300.0, 200.0, -50.0];
        let subnormal = f32::from_bits(1);
        assert!(subnormal > 0.0 && !subnormal.is_normal());
        for t in [0.0, subnormal, 5e-38, 1e-30, 9.9e-6] {
            let p = params(t, 0, 1.0, 7);
            p.validate(4).expect("a tiny temperature is valid");
            assert!(p.is_greedy(), "{t} is below {GREEDY_BELOW}");
            let mut s = Sampler::new(p);
            for _ in 0..20 {
                let got = s.sample(&logits).expect("sample");
                assert_eq!(got.token, 1, "temperature {t}");
                assert!(got.logprob.is_finite() && got.logprob <= 0.0, "{got:?}");
            }
        }
        for t in [GREEDY_BELOW, 1e-4, 0.7] {
            assert!(!params(t, 0, 1.0, 7).is_greedy(), "{t} samples");
        }
    }
}
