//! Choosing the next token from a row of logits, per sequence.
//!
//! A temperature below [`GREEDY_BELOW`] (0 included) is greedy (argmax, ties to the lowest id,
//! as `torch.argmax`): dividing logits by a tinier one overflows them. Otherwise the
//! logits are divided by the temperature and the candidates are cut, each cut keeping a prefix
//! of the walk order (scaled logit descending, ties to the lower id): `min_p` keeps the ids
//! whose probability is at least `min_p` × the largest, `top_k` the k first, `top_p` the
//! shortest prefix whose mass reaches `top_p`. The draw is then one uniform `u` from a
//! counter-based generator (Philox4x32-10 keyed by the request's seed, counter = draws so far)
//! and the kept ids walked in id order until their mass passes `u` × the kept mass. So the same
//! seed gives the same tokens whatever else shares the batch, a sequence resumed on another
//! gate skips its stream in O(1), and the device sampler (engine/src/cuda/sampling.cu), which
//! finds the same cuts without sorting and walks the same order, draws the same token as this
//! host sampler but where f32/f64 rounding of the masses differs (about once in 10^7 draws).
//! The reported logprob is the token's log-softmax under the raw logits (temperature 1, no
//! penalty, no filtering), as vLLM (`raw_logprobs`) and TGI report it.
//!
//! Before any of that, in vLLM's order: the repetition penalty (prompt and generated ids: a
//! positive logit divided by it, a negative one multiplied), then the frequency (× count of
//! the id among the generated) and presence (once per generated id) penalties are subtracted,
//! and ids suppressed until `min_new_tokens` (EOS and stop ids) are set to -inf
//! ([`RowPlan::adjusted`], the one place; the device applies the same list).

use std::collections::HashMap;

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

/// One sequence's sampler: its parameters, where its random stream is, and the history its
/// penalties and `min_new_tokens` read.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    /// Key of the counter-based generator: the request's seed, or one drawn from the OS.
    seed: u64,
    /// Draws made so far: the counter of the next draw.
    draws: u64,
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
        let seed = params
            .seed
            .unwrap_or_else(|| rand::RngExt::random(&mut rand::rng()));
        Sampler {
            params,
            seed,
            draws: 0,
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

    /// Whether this row's pick is the plain arg-max of the raw row: greedy, no penalty, nothing
    /// suppressed.
    pub fn is_plain_greedy(&self) -> bool {
        self.params.is_greedy() && !self.params.has_penalties() && !self.suppressing()
    }

    /// Whether this row must be picked on the host: the device sampler
    /// ([`crate::cuda::Gpu::sample`]) does everything [`Sampler::sample`] does, so nothing needs
    /// the host today (a row's `top_logprobs` alternatives are read by the runner from its raw
    /// row, wherever the pick happened); a feature the device lacks would make this true.
    pub fn needs_host(&self) -> bool {
        false
    }

    /// Notes a token picked elsewhere (on the device) as generated; `drew` says whether the pick
    /// was a draw (moved the random stream).
    pub fn record_pick(&mut self, token: u32, drew: bool) {
        if drew {
            self.draws += 1;
        }
        self.record(token);
    }

    /// Notes a generated token (for the penalties and `min_new_tokens`).
    pub fn record(&mut self, token: u32) {
        self.generated += 1;
        if self.params.has_penalties() {
            *self.counts.entry(token).or_insert(0) += 1;
        }
    }

    fn suppressing(&self) -> bool {
        self.generated < self.min_new_tokens && !self.suppressed.is_empty()
    }

    /// What this row's next pick reads besides the logits, in the form the device sampler
    /// takes it too.
    pub fn plan(&self) -> RowPlan {
        let p = &self.params;
        RowPlan {
            greedy: p.is_greedy(),
            inv_t: if p.is_greedy() {
                1.0
            } else {
                1.0 / p.temperature
            },
            top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
            top_p: p.top_p,
            ln_min_p: (p.min_p > 0.0).then(|| p.min_p.ln()),
            repetition_penalty: p.repetition_penalty,
            seed: self.seed,
            counter: self.draws,
            adjust: self.adjustments(),
        }
    }

    /// The ids whose logit the penalties or `min_new_tokens` change, by id.
    fn adjustments(&self) -> Vec<Adjust> {
        let p = &self.params;
        let suppress = self.suppressing();
        if !suppress && !p.has_penalties() {
            return Vec::new();
        }
        let mut by_id: std::collections::BTreeMap<u32, Adjust> = std::collections::BTreeMap::new();
        let entry = |m: &mut std::collections::BTreeMap<u32, Adjust>, id: u32| {
            *m.entry(id).or_insert(Adjust {
                id,
                repeat: false,
                sub: 0.0,
                suppress: false,
            })
        };
        if p.repetition_penalty != 1.0 {
            for &t in self.prompt.iter().chain(self.counts.keys()) {
                let mut a = entry(&mut by_id, t);
                a.repeat = true;
                by_id.insert(t, a);
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                let mut a = entry(&mut by_id, t);
                a.sub = p.frequency_penalty * n as f32 + p.presence_penalty;
                by_id.insert(t, a);
            }
        }
        if suppress {
            for &t in &self.suppressed {
                let mut a = entry(&mut by_id, t);
                a.suppress = true;
                by_id.insert(t, a);
            }
        }
        by_id.into_values().collect()
    }

    /// A sampler that continues another one's random stream after `drawn` draws (a sequence
    /// moved to another gate samples exactly what it would have). The stream is counter-based,
    /// so this costs nothing however far it skips.
    pub fn resume(params: SamplingParams, drawn: u32) -> Self {
        let mut s = Sampler::new(params);
        s.draws = u64::from(drawn);
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
        let plan = self.plan();
        let row = plan.adjusted(logits);
        let token = if plan.greedy {
            argmax(&row)
        } else {
            let u = uniform(plan.seed, plan.counter);
            self.draws += 1;
            plan.draw(&row, u)
        };
        drop(row);
        self.record(token as u32);
        Ok(Sampled {
            token: token as u32,
            logprob: log_softmax_at(logits, token),
        })
    }
}

/// A change the penalties or `min_new_tokens` make to one id's logit, in this order: the
/// repetition penalty (a positive logit divided by it, a negative one multiplied), then `sub`
/// subtracted (frequency × count + presence), then -inf if suppressed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adjust {
    pub id: u32,
    pub repeat: bool,
    pub sub: f32,
    pub suppress: bool,
}

/// Everything one row's pick reads besides its logits: the host sampler follows it
/// ([`RowPlan::adjusted`], [`RowPlan::draw`]) and the device sampler gets it packed
/// ([`pack_plans`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RowPlan {
    /// Arg-max of the adjusted row (no draw).
    pub greedy: bool,
    /// 1 / temperature, in f32, as the scaled logits are computed.
    pub inv_t: f32,
    /// 0 = no cut.
    pub top_k: u32,
    /// 1 = no cut.
    pub top_p: f32,
    /// ln(min_p) in f32; `None` = no cut.
    pub ln_min_p: Option<f32>,
    pub repetition_penalty: f32,
    /// Key and counter of this draw's Philox4x32-10 block ([`uniform`]).
    pub seed: u64,
    pub counter: u64,
    /// Sorted by id, one entry per id.
    pub adjust: Vec<Adjust>,
}

impl RowPlan {
    /// The logits the pick reads: `logits` with [`RowPlan::adjust`] applied.
    pub fn adjusted<'a>(&self, logits: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        if self.adjust.is_empty() {
            return std::borrow::Cow::Borrowed(logits);
        }
        let mut row = logits.to_vec();
        let r = self.repetition_penalty;
        for a in &self.adjust {
            if let Some(l) = row.get_mut(a.id as usize) {
                let mut v = *l;
                if a.repeat {
                    v = if v > 0.0 { v / r } else { v * r };
                }
                v -= a.sub;
                if a.suppress {
                    v = f32::NEG_INFINITY;
                }
                *l = v;
            }
        }
        std::borrow::Cow::Owned(row)
    }

    /// The draw from an adjusted row with the uniform `u` in [0, 1): the candidates (finite
    /// scaled logits; `min_p`, then `top_k`, then `top_p` cut them, each keeping a prefix of
    /// the walk order: scaled logit descending, id ascending) are walked in id order until
    /// their mass passes `u` × the kept mass. Walking by id, not by probability, is what the
    /// device does too, so the same seed gives the same token on both.
    pub fn draw(&self, row: &[f32], u: f64) -> usize {
        let inv_t = self.inv_t;
        let scaled = |l: f32| l * inv_t;
        let valid = |l: f32| !l.is_nan() && l != f32::NEG_INFINITY;
        let mut cand: Vec<(usize, f32)> = row
            .iter()
            .enumerate()
            .filter(|(_, l)| valid(**l))
            .map(|(i, &l)| (i, scaled(l)))
            .collect();
        let Some(max) = cand.iter().map(|c| c.1).max_by(f32::total_cmp) else {
            return argmax(row);
        };
        let mut cut = Cut::ALL;
        if let Some(ln) = self.ln_min_p {
            // p_i >= min_p * p_max  <=>  s_i >= s_max + ln(min_p), on the scaled logits.
            cut = Cut {
                key: order_key(max + ln),
                id: u32::MAX,
            };
            cand.retain(|c| cut.keeps(c.1, c.0));
        }
        let k = self.top_k as usize;
        if k > 0 && k < cand.len() {
            cand.select_nth_unstable_by(k - 1, by_logit_desc);
            cand.truncate(k);
            cut = cut.tighter(Cut::at(cand[k - 1]));
        }
        let weight = |s: f32| f64::from(s - max).exp();
        if self.top_p < 1.0 {
            // The nucleus: the shortest prefix, in walk order, whose mass reaches top_p. It
            // nearly always ends within the first few hundred candidates, so only those are
            // sorted up front (a whole vocabulary takes milliseconds), and more only as the
            // walk gets there.
            let total: f64 = cand.iter().map(|c| weight(c.1)).sum();
            let target = f64::from(self.top_p) * total;
            let mut sorted = SORTED_HEAD.min(cand.len());
            if sorted < cand.len() {
                cand.select_nth_unstable_by(sorted - 1, by_logit_desc);
            }
            cand[..sorted].sort_unstable_by(by_logit_desc);
            let mut cum = 0.0;
            for i in 0..cand.len() {
                if i == sorted {
                    let next = (sorted * 4).min(cand.len());
                    if next < cand.len() {
                        cand[sorted..].select_nth_unstable_by(next - sorted - 1, by_logit_desc);
                    }
                    cand[sorted..next].sort_unstable_by(by_logit_desc);
                    sorted = next;
                }
                cum += weight(cand[i].1);
                if cum >= target {
                    cut = cut.tighter(Cut::at(cand[i]));
                    break;
                }
            }
        }
        let kept: f64 = row
            .iter()
            .enumerate()
            .filter(|&(i, &l)| valid(l) && cut.keeps(scaled(l), i))
            .map(|(_, &l)| weight(scaled(l)))
            .sum();
        let target = u * kept;
        let mut acc = 0.0;
        let mut last = None;
        for (i, &l) in row.iter().enumerate() {
            if !valid(l) || !cut.keeps(scaled(l), i) {
                continue;
            }
            acc += weight(scaled(l));
            last = Some(i);
            if target < acc {
                return i;
            }
        }
        // Rounding left `acc` a hair under `target`: the last kept id.
        last.unwrap_or_else(|| argmax(row))
    }
}

/// The end of a prefix of the walk order (scaled logit descending, id ascending): the
/// candidates at or before `(key, id)`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cut {
    /// [`order_key`] of the last kept scaled logit.
    key: u32,
    /// Among candidates with that logit, the largest kept id.
    id: u32,
}

impl Cut {
    /// Every candidate.
    const ALL: Cut = Cut {
        key: 0,
        id: u32::MAX,
    };

    fn at((id, s): (usize, f32)) -> Cut {
        Cut {
            key: order_key(s),
            id: u32::try_from(id).unwrap_or(u32::MAX),
        }
    }

    fn keeps(&self, s: f32, id: usize) -> bool {
        let k = order_key(s);
        k > self.key || (k == self.key && id <= self.id as usize)
    }

    /// The shorter of two prefixes.
    fn tighter(self, o: Cut) -> Cut {
        if o.key > self.key || (o.key == self.key && o.id < self.id) {
            o
        } else {
            self
        }
    }
}

/// A float's bits mapped so that unsigned order is `f32::total_cmp`'s order (for non-NaN: -inf
/// lowest, -0 below +0). The device computes the same map.
pub fn order_key(v: f32) -> u32 {
    let b = v.to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

/// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): the
/// counter-based generator the device sampler uses too, so a draw is a function of (seed,
/// counter) alone.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const M0: u32 = 0xD251_1F53;
    const M1: u32 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let (mut c, mut k) = (ctr, key);
    for r in 0..10 {
        if r > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = u64::from(M0) * u64::from(c[0]);
        let p1 = u64::from(M1) * u64::from(c[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The uniform in [0, 1) of draw number `counter` of the stream keyed by `seed`: 53 random
/// bits from the first two words of one Philox block.
pub fn uniform(seed: u64, counter: u64) -> f64 {
    let x = philox4x32_10(
        [counter as u32, (counter >> 32) as u32, 0, 0],
        [seed as u32, (seed >> 32) as u32],
    );
    (f64::from(x[0] >> 5) * 67_108_864.0 + f64::from(x[1] >> 6)) / 9_007_199_254_740_992.0
}

/// 32-bit words per row in [`pack_plans`]' row table.
pub const PLAN_WORDS: usize = 12;
/// 32-bit words per entry in [`pack_plans`]' adjustment table.
pub const ADJUST_WORDS: usize = 3;

/// The device sampler's inputs for `plans`: a row table of [`PLAN_WORDS`] words per row and
/// an adjustment table of [`ADJUST_WORDS`] words per entry (engine/src/cuda/sampling.cu reads
/// the same layout):
///
/// row: `flags` (bit 0 greedy, bit 1 min_p on), `inv_t`, `top_p`, `ln_min_p`, `top_k`,
/// `repetition_penalty`, seed low, seed high, counter low, counter high, first adjustment,
/// end of adjustments; adjustment: id, mode (bit 0 repetition, bit 1 suppressed), `sub`.
/// Floats are their bits.
pub fn pack_plans(plans: &[RowPlan]) -> (Vec<u32>, Vec<u32>) {
    let mut rows = Vec::with_capacity(plans.len() * PLAN_WORDS);
    let mut adj = Vec::new();
    for p in plans {
        let begin = (adj.len() / ADJUST_WORDS) as u32;
        for a in &p.adjust {
            adj.extend([
                a.id,
                u32::from(a.repeat) | (u32::from(a.suppress) << 1),
                a.sub.to_bits(),
            ]);
        }
        let end = (adj.len() / ADJUST_WORDS) as u32;
        rows.extend([
            u32::from(p.greedy) | (u32::from(p.ln_min_p.is_some()) << 1),
            p.inv_t.to_bits(),
            p.top_p.to_bits(),
            p.ln_min_p.unwrap_or(0.0).to_bits(),
            p.top_k,
            p.repetition_penalty.to_bits(),
            p.seed as u32,
            (p.seed >> 32) as u32,
            p.counter as u32,
            (p.counter >> 32) as u32,
            begin,
            end,
        ]);
    }
    (rows, adj)
}

/// How many of the most likely candidates [`RowPlan::draw`] sorts before it walks them.
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

    /// The draw by its definition: the candidates sorted in walk order, cut, and the kept ones
    /// walked in id order. The reference for the partial sort in [`RowPlan::draw`].
    fn reference_draw(plan: &RowPlan, row: &[f32], u: f64) -> usize {
        let mut cand: Vec<(usize, f32)> = row
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan() && **l != f32::NEG_INFINITY)
            .map(|(i, &l)| (i, l * plan.inv_t))
            .collect();
        cand.sort_by(by_logit_desc);
        let Some(&(_, max)) = cand.first() else {
            return argmax(row);
        };
        let mut keep = cand.len();
        if let Some(ln) = plan.ln_min_p {
            keep = cand
                .iter()
                .filter(|c| c.1.total_cmp(&(max + ln)).is_ge())
                .count();
        }
        if plan.top_k > 0 {
            keep = keep.min(plan.top_k as usize);
        }
        let w: Vec<f64> = cand.iter().map(|c| f64::from(c.1 - max).exp()).collect();
        if plan.top_p < 1.0 {
            let target = f64::from(plan.top_p) * w[..keep].iter().sum::<f64>();
            let mut cum = 0.0;
            for (i, x) in w[..keep].iter().enumerate() {
                cum += x;
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
        }
        let mut kept: Vec<(usize, f64)> = cand[..keep].iter().map(|c| c.0).zip(w).collect();
        kept.sort_by_key(|k| k.0);
        let target = u * kept.iter().map(|k| k.1).sum::<f64>();
        let mut acc = 0.0;
        for &(i, x) in &kept {
            acc += x;
            if target < acc {
                return i;
            }
        }
        kept.last().map_or(0, |k| k.0)
    }

    fn plan(temperature: f32, top_k: u32, top_p: f32, min_p: f32) -> RowPlan {
        Sampler::new(SamplingParams {
            temperature,
            top_k: top_k as usize,
            top_p,
            min_p,
            seed: Some(0),
            ..SamplingParams::default()
        })
        .plan()
    }

    #[test]
    fn partial_sort_draws_what_a_full_sort_draws() {
        use rand::{RngExt, SeedableRng};
        use rand_chacha::ChaCha8Rng;
        use rand_distr::{Distribution, Normal};
        // Peaked rows end the walk within the sorted head; flat ones (spread 0.05) go far past
        // it, into the lazily sorted tail. Values rounded to bf16 tie often: ties go by id.
        let mut noise = ChaCha8Rng::seed_from_u64(1);
        let mut rows = Vec::new();
        for (vocab, spread, bf16) in [
            (129_280, 3.0, false),
            (129_280, 0.05, false),
            (20_000, 1.0, true),
            (300, 0.5, false),
        ] {
            let normal = Normal::new(0.0f32, spread).expect("normal");
            let mut row: Vec<f32> = (0..vocab).map(|_| normal.sample(&mut noise)).collect();
            if bf16 {
                row.iter_mut()
                    .for_each(|v| *v = f32::from_bits(v.to_bits() & 0xFFFF_0000));
            }
            row[7] = row[3];
            rows.push(row);
        }
        let mut draws = 0;
        for row in &rows {
            for temperature in [0.6, 1.0, 1.7] {
                for top_k in [0, 40, 2_000] {
                    for (top_p, min_p) in [(1.0, 0.0), (0.95, 0.0), (0.5, 0.0), (0.9, 0.05)] {
                        let p = plan(temperature, top_k, top_p, min_p);
                        for _ in 0..4 {
                            let u: f64 = noise.random();
                            let want = reference_draw(&p, row, u);
                            assert_eq!(p.draw(row, u), want, "{p:?}, vocab {}", row.len());
                            draws += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(draws, 4 * 36 * 4);
    }

    /// The exact distribution of a row under a plan, by the definition (sort, cut, normalise).
    fn exact_distribution(plan: &RowPlan, row: &[f32]) -> Vec<f64> {
        let mut probs = vec![0.0; row.len()];
        // Every u on a fine grid: the draw is a step function of u, so this integrates it.
        let grid = 200_000;
        for g in 0..grid {
            let u = (g as f64 + 0.5) / grid as f64;
            probs[reference_draw(plan, row, u)] += 1.0 / grid as f64;
        }
        probs
    }

    /// Many seeded draws against the exact distribution, by a chi-square test: the statistic
    /// of N draws over the kept ids has the chi-square law with (kept - 1) degrees of freedom,
    /// whose mean is df and standard deviation sqrt(2 df); 6 standard deviations above the
    /// mean fails about once in 10^6 runs of a correct sampler, and a sampler that ignores a
    /// cut or walks a wrong mass fails it by hundreds of deviations.
    #[test]
    fn seeded_draws_follow_the_exact_distribution() {
        let row: Vec<f32> = (0..64)
            .map(|i| ((i * 37) % 23) as f32 * 0.21 - 2.0)
            .collect();
        for p in [
            plan(1.0, 0, 1.0, 0.0),
            plan(0.6, 0, 0.95, 0.0),
            plan(1.3, 20, 0.8, 0.0),
            plan(0.8, 0, 1.0, 0.1),
        ] {
            let exact = exact_distribution(&p, &row);
            let n = 40_000u64;
            let mut seen = vec![0u64; row.len()];
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0 / p.inv_t,
                top_k: p.top_k as usize,
                top_p: p.top_p,
                min_p: p.ln_min_p.map_or(0.0, f32::exp),
                seed: Some(42),
                ..SamplingParams::default()
            });
            for _ in 0..n {
                seen[s.sample(&row).expect("sample").token as usize] += 1;
            }
            let mut chi2 = 0.0;
            let mut df = 0.0f64;
            for (i, &q) in exact.iter().enumerate() {
                if q == 0.0 {
                    assert_eq!(seen[i], 0, "id {i} is cut by {p:?} but was drawn");
                    continue;
                }
                let e = q * n as f64;
                chi2 += (seen[i] as f64 - e).powi(2) / e;
                df += 1.0;
            }
            df -= 1.0;
            assert!(
                chi2 < df + 6.0 * (2.0 * df).sqrt(),
                "chi-square {chi2:.1} over {df} degrees of freedom for {p:?}"
            );
        }
    }

    /// Random123's known-answer vectors for Philox4x32-10.
    #[test]
    fn philox_matches_the_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
        let u = uniform(7, 3);
        assert!((0.0..1.0).contains(&u));
        assert_eq!(u, uniform(7, 3));
        assert_ne!(u, uniform(7, 4));
    }

    #[test]
    fn plans_pack_in_the_device_layout() {
        let s = Sampler::resume(
            SamplingParams {
                temperature: 0.5,
                top_k: 40,
                top_p: 0.9,
                min_p: 0.25,
                seed: Some(0x1_0000_0002),
                repetition_penalty: 1.5,
                frequency_penalty: 0.5,
                ..SamplingParams::default()
            },
            3,
        )
        .with_history(&[9, 4], &[4, 4, 2]);
        let greedy = Sampler::new(SamplingParams::default());
        let (rows, adj) = pack_plans(&[greedy.plan(), s.plan()]);
        assert_eq!(rows.len(), 2 * PLAN_WORDS);
        assert_eq!(&rows[..PLAN_WORDS][10..], &[0, 0], "no adjustments");
        assert_eq!(rows[0] & 1, 1, "greedy flag");
        let r = &rows[PLAN_WORDS..];
        assert_eq!(r[0], 2, "sampled, min_p on");
        assert_eq!(f32::from_bits(r[1]), 2.0);
        assert_eq!(f32::from_bits(r[2]), 0.9);
        assert_eq!(f32::from_bits(r[3]), 0.25f32.ln());
        assert_eq!(r[4], 40);
        assert_eq!(f32::from_bits(r[5]), 1.5);
        assert_eq!((r[6], r[7]), (2, 1), "seed low, high");
        assert_eq!((r[8], r[9]), (3, 0), "three draws made");
        assert_eq!((r[10], r[11]), (0, 3), "ids 2, 4, 9");
        assert_eq!(
            adj,
            [2, 1, 0.5f32.to_bits(), 4, 1, 1.0f32.to_bits(), 9, 1, 0]
        );
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
        let got = s.plan().adjusted(&logits).into_owned();
        let want = [1.0, -2.0, 0.25 - 0.5 - 0.25, 1.5 - 1.0 - 0.25, 1.25];
        assert_eq!(got, want);
        // Greedy picks from the penalised row (id 4 now leads), and counts its pick.
        let mut s = s;
        let out = s.sample(&logits).expect("sample");
        assert_eq!(out.token, 4);
        // The logprob is the raw row's, not the penalised one's.
        assert!((out.logprob - log_softmax_at(&logits, 4)).abs() < 1e-6);
        assert_eq!(s.counts.get(&4), Some(&1));
        assert!(
            !s.is_plain_greedy(),
            "a penalised row is not the raw arg-max"
        );
        // Without a repetition penalty the prompt is not kept: only generated ids are penalised.
        let p = SamplingParams {
            presence_penalty: 1.0,
            ..SamplingParams::default()
        };
        let s = Sampler::new(p).with_history(&[0, 1], &[3]);
        assert_eq!(
            s.plan().adjusted(&logits).into_owned(),
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
        let mut s = Sampler::new(p);
        for _ in 0..100 {
            assert_eq!(s.sample(&logits).expect("sample").token, 0);
        }
    }

    #[test]
    fn min_new_tokens_suppresses_the_given_ids_until_reached() {
        let logits = [0.0, 5.0, 1.0];
        let mut s = Sampler::new(SamplingParams::default()).with_min_new_tokens(2, &[1]);
        assert!(!s.is_plain_greedy());
        assert_eq!(s.sample(&logits).expect("sample").token, 2);
        assert_eq!(s.sample(&logits).expect("sample").token, 2);
        assert!(s.is_plain_greedy(), "plain greedy again once reached");
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
