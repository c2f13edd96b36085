//! Choosing the next token from a row of logits, per sequence.
//!
//! A temperature below [`GREEDY_BELOW`] (0 included) is greedy (argmax, ties to the lowest id,
//! as `torch.argmax`): dividing logits by a tinier one overflows them. Otherwise the
//! logits are divided by the temperature, cut to the `top_k` best, softmaxed, cut to the smallest
//! prefix whose mass reaches `top_p`, and sampled with the sequence's own ChaCha8 generator —
//! seeded from the request's seed when given, so the same seed gives the same tokens whatever
//! else shares the batch. The reported logprob is the token's log-softmax under the raw
//! logits (temperature 1, no penalty, no filtering), as vLLM (`raw_logprobs`) and TGI report it.
//!
//! Before any of that, in vLLM's order: ids suppressed until `min_new_tokens` (EOS and stop
//! ids) are set to -inf, then the repetition penalty (prompt and generated ids: a positive logit
//! divided by it, a negative one multiplied), then the frequency (× count of the id among the
//! generated) and presence (once per generated id) penalties are subtracted. `min_p` then keeps
//! the ids whose temperature-scaled probability is at least `min_p` × the largest, before
//! `top_k` and `top_p`. A row needing none of this (greedy, no penalty, nothing suppressed)
//! may be picked on the device instead ([`Sampler::needs_host`]).

use std::collections::HashMap;

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
    /// In [0, 1]; 0 means no min-p cut.
    pub min_p: f32,
    /// In (0, 2]; 1 means none. Applies to ids of the prompt and of the generated text.
    pub repetition_penalty: f32,
    /// In [-2, 2]; 0 means none. Subtracted once from every id generated so far.
    pub presence_penalty: f32,
    /// In [-2, 2]; 0 means none. Subtracted once per time an id was generated so far.
    pub frequency_penalty: f32,
}

/// Largest `repetition_penalty` (vLLM and TGI accept any positive value; past 2 a penalty only
/// corrupts the text).
pub const MAX_REPETITION_PENALTY: f32 = 2.0;
/// Largest magnitude of `presence_penalty` and `frequency_penalty`, as OpenAI's API bounds them.
pub const MAX_ADDITIVE_PENALTY: f32 = 2.0;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
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
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return Err(EngineError::InvalidInput(format!(
                "sampling.min_p must be in [0, 1] (0 = off), got {}",
                self.min_p
            )));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= MAX_REPETITION_PENALTY) {
            return Err(EngineError::InvalidInput(format!(
                "sampling.repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}] (1 = off), got {}",
                self.repetition_penalty
            )));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_nan() || v.abs() > MAX_ADDITIVE_PENALTY {
                return Err(EngineError::InvalidInput(format!(
                    "sampling.{name} must be in [-{MAX_ADDITIVE_PENALTY}, {MAX_ADDITIVE_PENALTY}] (0 = off), got {v}"
                )));
            }
        }
        Ok(())
    }

    /// Whether any penalty is set (the pick then needs the sequence's history, on the host).
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }

    /// Whether the next token is the argmax: a temperature below [`GREEDY_BELOW`].
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }
}

/// How a runner starts a sequence's sampler: its parameters, where its random stream is, and
/// the history its penalties and `min_new_tokens` read. Built by whoever holds the sequence's
/// tokens (the frontend's batcher), so a sequence that moves to another gate samples exactly
/// what it would have.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SamplerStart {
    pub params: SamplingParams,
    /// Draws its random stream has made already (non-zero after a failover).
    pub drawn: u32,
    /// Prompt ids; read only by a repetition penalty (empty otherwise).
    pub prompt: std::sync::Arc<[u32]>,
    /// Tokens generated before this runner holds the sequence; read by the penalties and
    /// `min_new_tokens` (empty when neither is set).
    pub generated: std::sync::Arc<[u32]>,
    /// `suppressed` cannot be picked until this many tokens are generated.
    pub min_new_tokens: usize,
    /// The EOS and stop ids (empty when `min_new_tokens` is 0).
    pub suppressed: std::sync::Arc<[u32]>,
    /// Alternatives to report with each token (`crate::logprobs`); 0 for none.
    pub top_logprobs: usize,
}

impl SamplerStart {
    /// The sampler this describes.
    pub fn sampler(&self) -> Sampler {
        Sampler::resume(self.params, self.drawn)
            .with_history(&self.prompt, &self.generated)
            .with_min_new_tokens(self.min_new_tokens, &self.suppressed)
            .with_top_logprobs(self.top_logprobs)
    }
}

/// A sampled token and its log-probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

/// One sequence's sampler: its parameters, its random generator, and the history its penalties
/// and `min_new_tokens` read.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// How many times each id was generated (kept only while a penalty is set).
    counts: HashMap<u32, u32>,
    /// Prompt ids, sorted and deduplicated (kept only for a repetition penalty).
    prompt: Vec<u32>,
    /// Tokens picked so far (the ones given to [`Sampler::with_history`] included).
    generated: usize,
    /// Ids that cannot be picked while `generated < min_new_tokens` (EOS and stop ids).
    suppressed: Vec<u32>,
    /// See `suppressed`.
    min_new_tokens: usize,
    /// Alternatives the runner reports with each token (0: none); see [`Sampler::top_logprobs`].
    top_logprobs: usize,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        Sampler {
            params,
            rng,
            counts: HashMap::new(),
            prompt: Vec::new(),
            generated: 0,
            suppressed: Vec::new(),
            min_new_tokens: 0,
            top_logprobs: 0,
        }
    }

    /// Gives the sampler the sequence's prompt and the tokens it already generated (on another
    /// gate, before a failover): what the penalties and `min_new_tokens` read. Does not move the
    /// random stream ([`Sampler::resume`] does).
    pub fn with_history(mut self, prompt: &[u32], generated: &[u32]) -> Self {
        if self.params.repetition_penalty != 1.0 {
            self.prompt = prompt.to_vec();
            self.prompt.sort_unstable();
            self.prompt.dedup();
        }
        for &t in generated {
            self.record(t);
        }
        self
    }

    /// Keeps `ids` (the EOS and stop ids) from being picked until `min_new_tokens` tokens have
    /// been generated.
    pub fn with_min_new_tokens(mut self, min_new_tokens: usize, ids: &[u32]) -> Self {
        self.min_new_tokens = min_new_tokens;
        self.suppressed = ids.to_vec();
        self
    }

    /// Asks the runner for the `n` most likely ids with each token (`crate::logprobs`).
    pub fn with_top_logprobs(mut self, n: usize) -> Self {
        self.top_logprobs = n;
        self
    }

    /// How many alternatives the runner reports with each token of this sequence.
    pub fn top_logprobs(&self) -> usize {
        self.top_logprobs
    }

    /// Whether this row's pick needs the host: anything but plain greedy argmax, or a row whose
    /// alternatives are reported (they are computed from the host copy of the row).
    pub fn needs_host(&self) -> bool {
        !self.params.is_greedy()
            || self.params.has_penalties()
            || self.suppressing()
            || self.top_logprobs > 0
    }

    /// Notes a token picked elsewhere (the device's greedy pick) as generated.
    pub fn record(&mut self, token: u32) {
        self.generated += 1;
        if self.params.has_penalties() {
            *self.counts.entry(token).or_insert(0) += 1;
        }
    }

    fn suppressing(&self) -> bool {
        self.generated < self.min_new_tokens && !self.suppressed.is_empty()
    }

    /// The logits the pick reads: penalties applied and suppressed ids at -inf, or the row as
    /// it is when neither applies.
    fn adjusted<'a>(&self, logits: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        let p = &self.params;
        if !self.suppressing()
            && (!p.has_penalties() || (self.counts.is_empty() && self.prompt.is_empty()))
        {
            return std::borrow::Cow::Borrowed(logits);
        }
        let mut row = logits.to_vec();
        let vocab = row.len();
        if p.repetition_penalty != 1.0 {
            let r = p.repetition_penalty;
            let seen = self.prompt.iter().chain(
                self.counts
                    .keys()
                    .filter(|t| self.prompt.binary_search(t).is_err()),
            );
            for &t in seen {
                if let Some(l) = row.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
        for (&t, &n) in &self.counts {
            if let Some(l) = row.get_mut(t as usize) {
                *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
            }
        }
        if self.suppressing() {
            for &t in &self.suppressed {
                if (t as usize) < vocab {
                    row[t as usize] = f32::NEG_INFINITY;
                }
            }
        }
        std::borrow::Cow::Owned(row)
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
        let row = self.adjusted(logits);
        let token = if self.params.is_greedy() {
            argmax(&row)
        } else {
            self.draw(&row)
        };
        drop(row);
        self.record(token as u32);
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

/// The tokens a draw chooses from, as (id, logit / temperature): NaNs and -inf left out, cut to
/// those within `min_p` of the best when that is set, and to the `top_k` best (in no particular
/// order) when that is set.
fn candidates(params: &SamplingParams, logits: &[f32]) -> Vec<(usize, f32)> {
    let inv_t = 1.0 / params.temperature;
    let mut cand: Vec<(usize, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.is_nan() && **l != f32::NEG_INFINITY)
        .map(|(i, &l)| (i, l * inv_t))
        .collect();
    if params.min_p > 0.0 {
        // p_i >= min_p * p_max  <=>  l_i >= l_max + ln(min_p), on the scaled logits.
        let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let floor = max + params.min_p.ln();
        cand.retain(|c| c.1 >= floor);
    }
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
            ..SamplingParams::default()
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

    /// The penalised row by hand: vLLM's rules on a fixed row.
    #[test]
    fn penalties_change_the_logits_as_vllm_does() {
        let logits = [2.0, -1.0, 0.5, 3.0, 1.25];
        // Prompt [0, 1], generated [3, 3, 2]: repetition 2 on ids 0, 1, 2, 3; frequency 0.5 and
        // presence 0.25 on ids 3 (twice) and 2 (once).
        let p = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..SamplingParams::default()
        };
        let s = Sampler::new(p).with_history(&[0, 1], &[3, 3, 2]);
        let got = s.adjusted(&logits).into_owned();
        let want = [1.0, -2.0, 0.25 - 0.5 - 0.25, 1.5 - 1.0 - 0.25, 1.25];
        assert_eq!(got, want);
        // Greedy picks from the penalised row (id 4 now leads), and counts its pick.
        let mut s = s;
        let out = s.sample(&logits).expect("sample");
        assert_eq!(out.token, 4);
        // The logprob is the raw row's, not the penalised one's.
        assert!((out.logprob - log_softmax_at(&logits, 4)).abs() < 1e-6);
        assert_eq!(s.counts.get(&4), Some(&1));
        assert!(s.needs_host(), "penalties are applied on the host");
        // Without a repetition penalty the prompt is not kept: only generated ids are penalised.
        let p = SamplingParams {
            presence_penalty: 1.0,
            ..SamplingParams::default()
        };
        let s = Sampler::new(p).with_history(&[0, 1], &[3]);
        assert_eq!(
            s.adjusted(&logits).into_owned(),
            [2.0, -1.0, 0.5, 2.0, 1.25]
        );
    }

    #[test]
    fn min_p_keeps_ids_within_the_ratio_of_the_best() {
        // Probabilities ∝ e^l: ids 0 and 1 are within 0.3 of the best (e^-1 ≈ 0.37), id 2
        // (e^-2 ≈ 0.14) is not; temperature 1.
        let logits = [3.0, 2.0, 1.0, -5.0];
        let p = SamplingParams {
            temperature: 1.0,
            min_p: 0.3,
            seed: Some(3),
            ..SamplingParams::default()
        };
        let mut ids: Vec<usize> = candidates(&p, &logits).iter().map(|c| c.0).collect();
        ids.sort_unstable();
        assert_eq!(ids, [0, 1]);
        let mut s = Sampler::new(p);
        let mut seen = [0usize; 4];
        for _ in 0..400 {
            seen[s.sample(&logits).expect("sample").token as usize] += 1;
        }
        assert!(
            seen[0] > 0 && seen[1] > 0 && seen[2] == 0 && seen[3] == 0,
            "{seen:?}"
        );
        // At temperature 0.5 the ratios square: id 1 (e^-2 ≈ 0.14) falls out too.
        let p = SamplingParams {
            temperature: 0.5,
            ..p
        };
        assert_eq!(candidates(&p, &logits).len(), 1);
    }

    #[test]
    fn min_new_tokens_suppresses_the_given_ids_until_reached() {
        let logits = [0.0, 5.0, 1.0];
        let mut s = Sampler::new(SamplingParams::default()).with_min_new_tokens(2, &[1]);
        assert!(s.needs_host());
        assert_eq!(s.sample(&logits).expect("sample").token, 2);
        assert_eq!(s.sample(&logits).expect("sample").token, 2);
        assert!(!s.needs_host(), "plain greedy again once reached");
        assert_eq!(s.sample(&logits).expect("sample").token, 1);
        // Sampling never draws a suppressed id either.
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(1),
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(p).with_min_new_tokens(200, &[1]);
        for _ in 0..200 {
            assert_ne!(s.sample(&logits).expect("sample").token, 1);
        }
    }

    #[test]
    fn a_resumed_sampler_with_history_continues_as_the_original() {
        let logits: Vec<f32> = (0..40).map(|i| ((i * 13) % 7) as f32 * 0.4).collect();
        let p = SamplingParams {
            temperature: 0.9,
            seed: Some(11),
            frequency_penalty: 0.7,
            repetition_penalty: 1.3,
            ..SamplingParams::default()
        };
        let prompt = [1, 2, 3];
        let start = |generated: &[u32]| SamplerStart {
            params: p,
            drawn: generated.len() as u32,
            prompt: prompt.to_vec().into(),
            generated: generated.to_vec().into(),
            min_new_tokens: 0,
            suppressed: Vec::new().into(),
            top_logprobs: 0,
        };
        let mut whole = start(&[]).sampler();
        let all: Vec<u32> = (0..30)
            .map(|_| whole.sample(&logits).expect("sample").token)
            .collect();
        let mut resumed = start(&all[..12]).sampler();
        let rest: Vec<u32> = (0..18)
            .map(|_| resumed.sample(&logits).expect("sample").token)
            .collect();
        assert_eq!(rest, all[12..]);
    }

    #[test]
    fn validation_names_field_and_limit() {
        let bad = [
            (params(-0.1, 0, 1.0, 0), "temperature"),
            (params(1.0, 0, 0.0, 0), "top_p"),
            (params(1.0, 0, 1.5, 0), "top_p"),
            (params(1.0, 11, 1.0, 0), "top_k"),
            (
                SamplingParams {
                    min_p: 1.5,
                    ..params(1.0, 0, 1.0, 0)
                },
                "min_p must be in [0, 1]",
            ),
            (
                SamplingParams {
                    min_p: -0.1,
                    ..params(1.0, 0, 1.0, 0)
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..params(1.0, 0, 1.0, 0)
                },
                "repetition_penalty must be in (0, 2]",
            ),
            (
                SamplingParams {
                    repetition_penalty: 2.5,
                    ..params(1.0, 0, 1.0, 0)
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: -2.1,
                    ..params(1.0, 0, 1.0, 0)
                },
                "presence_penalty must be in [-2, 2]",
            ),
            (
                SamplingParams {
                    frequency_penalty: f32::NAN,
                    ..params(1.0, 0, 1.0, 0)
                },
                "frequency_penalty must be in [-2, 2]",
            ),
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
