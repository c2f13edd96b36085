//! The most likely ids of a row of logits and their log-probabilities (`top_logprobs`): what a
//! response reports besides the picked token, as vLLM's `logprobs=N` and OpenAI's
//! `top_logprobs` do. A pure function of the raw row (temperature 1, no penalty, no cut), so
//! it says what the model thought whatever the request's sampling did; the runner calls it for
//! the rows that ask (`Sampler::top_logprobs`), wherever the pick happened.
//!
//! Prompt logprobs (vLLM's `prompt_logprobs`): for each prompt token after the first, its
//! log-probability under the model given the tokens before it, its rank, and the most likely
//! alternatives at its position ([`prompt_logprob`]). The runner computes them from every row of
//! the prefill chunks of the sequences that ask (and only those), never from the prefix cache.

/// Most alternatives a request may ask for per token (OpenAI's and vLLM's default limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The `n` largest entries of `raw_row`, best first, ties to the lower id, each with its
/// log-softmax over the whole row (NaNs are never chosen and count for nothing). Fewer when the
/// row has fewer ids.
pub fn top_logprobs(raw_row: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    // Kept sorted by descending logit then ascending id; the row is walked in id order, so an
    // equal logit never displaces an earlier (lower) id.
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &v) in raw_row.iter().enumerate() {
        if v.is_nan() || (best.len() == n && best.last().is_some_and(|&(_, w)| v <= w)) {
            continue;
        }
        let at = best.partition_point(|&(_, w)| w >= v);
        best.insert(at, (i as u32, v));
        best.truncate(n);
    }
    let max = best.first().map_or(f32::NEG_INFINITY, |&(_, v)| v);
    // The same sum as the picked token's logprob (`sampling`), so the two agree exactly.
    let sum: f64 = raw_row
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| f64::from(v - max).exp())
        .sum();
    let log_sum = sum.ln();
    best.into_iter()
        .map(|(i, v)| (i, (f64::from(v - max) - log_sum) as f32))
        .collect()
}

/// Most entries (prompt positions × (1 + alternatives)) one request's prompt logprobs may hold:
/// they come back in one message, and every position costs a copy of a logits row to the host.
/// 131,072 is a 32k-token prompt with 3 alternatives, or a 128k one with none, about 1.2 MB on
/// the wire.
pub const MAX_PROMPT_LOGPROB_ENTRIES: usize = 131_072;

/// One prompt token's log-probability given the tokens before it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    /// The prompt token.
    pub token: u32,
    /// Its log-softmax under the raw logits of the position before it.
    pub logprob: f32,
    /// 1 + how many ids have a larger logit there (1: the model's first choice).
    pub rank: u32,
    /// The most likely ids there and their logprobs, best first ([`top_logprobs`]).
    pub top: Vec<(u32, f32)>,
}

/// `token`'s log-probability, rank and the `top` best alternatives in `raw_row` (the logits of
/// the position before `token`). `None` when `token` is outside the row.
pub fn prompt_logprob(raw_row: &[f32], token: u32, top: usize) -> Option<PromptLogprob> {
    let v = *raw_row.get(token as usize)?;
    let max = raw_row
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    // The same sum as `top_logprobs` and the sampled token's logprob, so they agree exactly.
    let sum: f64 = raw_row
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| f64::from(v - max).exp())
        .sum();
    let above = raw_row.iter().filter(|&&w| w > v).count();
    Some(PromptLogprob {
        token,
        logprob: (f64::from(v - max) - sum.ln()) as f32,
        rank: u32::try_from(above + 1).unwrap_or(u32::MAX),
        top: top_logprobs(raw_row, top),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: a full sort of (id, log-softmax) in f64, by value then id.
    fn reference(row: &[f32], n: usize) -> Vec<(u32, f64)> {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
        let mut all: Vec<(u32, f64)> = (0u32..)
            .zip(row)
            .map(|(i, &v)| (i, f64::from(v - max) - sum.ln()))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    #[test]
    fn the_best_ids_with_their_log_softmax_best_first() {
        // 5000 logits on a 0.01 grid of 2000 values: many ties, which the reference breaks by id.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let row: Vec<f32> = (0..5000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 2000) as f32 / 100.0 - 10.0
            })
            .collect();
        for n in [1, 5, 20] {
            let got = top_logprobs(&row, n);
            let want = reference(&row, n);
            assert_eq!(got.len(), n);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.0, w.0, "n={n}: {got:?} vs {want:?}");
                assert!((f64::from(g.1) - w.1).abs() < 1e-5, "{g:?} vs {w:?}");
            }
        }
    }

    #[test]
    fn a_row_that_asks_for_alternatives_keeps_its_pick_on_the_device() {
        use crate::sampling::{Sampler, SamplingParams};
        let greedy = Sampler::new(SamplingParams::default());
        let asking = greedy.with_top_logprobs(3);
        // The alternatives come from the raw row whatever picked the token, so the row keeps
        // the device's pick (and the rest of its batch with it).
        assert!(!asking.needs_host());
        assert!(asking.is_plain_greedy());
        assert_eq!(asking.top_logprobs(), 3);
    }

    #[test]
    fn a_prompt_tokens_logprob_rank_and_alternatives() {
        let row = [1.0, 3.0, 0.5, 2.0];
        let want = reference(&row, 4);
        for (rank, &(id, lp)) in want.iter().enumerate() {
            let got = prompt_logprob(&row, id, 2).expect("in the row");
            assert_eq!(got.token, id);
            assert_eq!(got.rank as usize, rank + 1);
            assert!((f64::from(got.logprob) - lp).abs() < 1e-6, "{got:?}");
            assert_eq!(got.top, top_logprobs(&row, 2));
        }
        assert!(prompt_logprob(&row, 4, 0).is_none());
    }

    #[test]
    fn ties_go_to_the_lower_id_and_nans_are_skipped() {
        let row = [1.0, 3.0, f32::NAN, 3.0, 2.0, 3.0];
        let got = top_logprobs(&row, 4);
        let ids: Vec<u32> = got.iter().map(|g| g.0).collect();
        assert_eq!(ids, [1, 3, 5, 4]);
        assert_eq!(got[0].1, got[1].1);
        assert!(got[0].1 > got[3].1 && got[3].1 < 0.0);
        let p: f64 = [1.0f64, 3.0, 3.0, 2.0, 3.0]
            .iter()
            .map(|v| (v - 3.0).exp())
            .sum();
        assert!((f64::from(got[0].1) + p.ln()).abs() < 1e-6);
        // More than the row has: all of it; none asked: none.
        assert_eq!(top_logprobs(&row, 10).len(), 5);
        assert!(top_logprobs(&row, 0).is_empty());
    }
}
