//! Fuzz harnesses for what a gate and an expert worker decode off the wire: the activations of a
//! `Gate.Step` request and the tokens and pairs of an `Expert.Forward` request
//! ([`codec::decode_step`], [`codec::decode_forward`]). Each harness takes arbitrary bytes and
//! either decodes them as the protobuf message (what a hostile peer can send) or builds a
//! message from them field by field (which reaches the checks behind a valid encoding far more
//! often), then checks that decoding never panics, that a rejection is INVALID_ARGUMENT, and
//! that what is accepted holds what the callers rely on.
//!
//! `cargo fuzz` drives them (the targets in `fuzz/`, nightly); the tests below run each on a
//! few thousand seeded random inputs on stable, so that the harnesses cannot rot. Built for
//! tests and with the `fuzzing` feature only.

use arbitrary::{Result, Unstructured};
use moemesh_engine::{DType, Device};
use moemesh_proto::v1;
use prost::Message;

use crate::MeshError;
use crate::codec;

/// The hidden size of the model the harnesses pretend to serve.
pub const HIDDEN: usize = 8;

/// What a harness did with an input (the seeded tests check that both paths are reached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The bytes did not make a message.
    Skipped,
    /// Accepted, and every property held.
    Accepted,
    /// Refused with INVALID_ARGUMENT.
    Rejected,
}

/// One `Gate.Step` request's activations, from arbitrary bytes.
pub fn step_request(data: &[u8]) -> Outcome {
    let mut u = Unstructured::new(data);
    let req = match u.arbitrary::<bool>() {
        Ok(true) => v1::StepRequest::decode(u.take_rest()).ok(),
        Ok(false) => step_from(&mut u).ok(),
        Err(_) => None,
    };
    let Some(req) = req else {
        return Outcome::Skipped;
    };
    match codec::decode_step(&req, HIDDEN, usize::MAX, &Device::Cpu) {
        Ok(t) => {
            let (rows, width) = t.dims2().expect("decode_step returns [tokens, hidden]");
            assert_eq!(width, HIDDEN);
            let total: u64 = req.seqs.iter().map(|s| u64::from(s.num_tokens)).sum();
            assert_eq!(rows as u64, total, "rows must match the sequences' tokens");
            let mut ids: Vec<u64> = req.seqs.iter().map(|s| s.seq_id).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), req.seqs.len(), "a sequence appears twice");
            assert!(req.seqs.iter().all(|s| s.num_tokens > 0));
            read_back(&t);
            Outcome::Accepted
        }
        Err(e) => rejected(e),
    }
}

/// One `Expert.Forward` request's tokens and pairs, from arbitrary bytes.
pub fn forward_request(data: &[u8]) -> Outcome {
    let mut u = Unstructured::new(data);
    let req = match u.arbitrary::<bool>() {
        Ok(true) => v1::ForwardRequest::decode(u.take_rest()).ok(),
        Ok(false) => forward_from(&mut u).ok(),
        Err(_) => None,
    };
    let Some(req) = req else {
        return Outcome::Skipped;
    };
    match codec::decode_forward(&req, HIDDEN, &Device::Cpu) {
        Ok((x, pairs)) => {
            let (tokens, width) = x.dims2().expect("decode_forward returns [tokens, hidden]");
            assert_eq!(width, HIDDEN);
            assert_eq!(pairs.len(), req.expert_ids.len());
            assert!(pairs.iter().all(|&(row, _, _)| (row as usize) < tokens));
            assert!(pairs.windows(2).all(|w| w[0].0 <= w[1].0), "rows in order");
            read_back(&x);
            Outcome::Accepted
        }
        Err(e) => rejected(e),
    }
}

fn read_back(t: &moemesh_engine::Tensor) {
    let v: Vec<Vec<f32>> = t
        .to_dtype(DType::F32)
        .and_then(|t| t.to_vec2())
        .expect("an accepted tensor is readable");
    assert_eq!(v.iter().map(Vec::len).sum::<usize>(), t.elem_count());
}

fn rejected(e: MeshError) -> Outcome {
    assert!(
        matches!(e, MeshError::Invalid(_)),
        "not INVALID_ARGUMENT: {e:?}"
    );
    let status = tonic::Status::from(e);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(!status.message().is_empty());
    Outcome::Rejected
}

/// A dimension: mostly small, sometimes anything.
fn dim(u: &mut Unstructured) -> Result<u32> {
    Ok(match u.int_in_range(0..=7)? {
        0 => u.arbitrary()?,
        1 => 0,
        _ => u.int_in_range(1..=12)?,
    })
}

/// A tensor, usually `[rows, HIDDEN]` and often with the right number of bytes.
fn tensor(u: &mut Unstructured, rows: u32) -> Result<v1::Tensor> {
    let dtype = match u.int_in_range(0..=9)? {
        0 => u.arbitrary()?,
        1 => v1::DType::Unspecified as i32,
        2..=5 => v1::DType::F32 as i32,
        _ => v1::DType::Bf16 as i32,
    };
    let shape = if u.ratio(3, 4)? {
        vec![rows, HIDDEN as u32]
    } else {
        let rank = u.int_in_range(0..=10)?;
        (0..rank).map(|_| dim(u)).collect::<Result<_>>()?
    };
    let width = if dtype == v1::DType::F32 as i32 { 4 } else { 2 };
    let want = shape
        .iter()
        .try_fold(width, |n: usize, &d| n.checked_mul(d as usize))
        .filter(|&n| n <= 1 << 16);
    let len = match (want, u.int_in_range(0..=5)?) {
        (Some(n), 0) => n.saturating_sub(1),
        (Some(n), 1) => n + 1,
        (Some(n), _) => n,
        (None, _) => u.int_in_range(0..=64)?,
    };
    // Values: whatever bytes remain (NaNs and infinities included), zeros past the end.
    let mut data = vec![0u8; len];
    let have = u.len().min(len);
    u.fill_buffer(&mut data[..have])?;
    Ok(v1::Tensor { dtype, shape, data })
}

fn step_from(u: &mut Unstructured) -> Result<v1::StepRequest> {
    let n = u.int_in_range(0..=6)?;
    let mut seqs = Vec::with_capacity(n);
    for _ in 0..n {
        seqs.push(v1::SeqStep {
            seq_id: u.int_in_range(0..=4)?,
            start_position: u.arbitrary()?,
            num_tokens: if u.ratio(1, 8)? {
                u.arbitrary()?
            } else {
                u.int_in_range(0..=5)?
            },
            sample: u.arbitrary()?,
            sampling: None,
            traceparent: String::new(),
            token_ids: Vec::new(),
            cache_salt: Vec::new(),
            // Prompt logprobs now and then, with any count and targets (over the rows too).
            prompt_logprobs: if u.ratio(1, 8)? {
                Some(u.arbitrary()?)
            } else {
                None
            },
            prompt_targets: (0..u.int_in_range(0..=6)?)
                .map(|_| u.arbitrary())
                .collect::<Result<_>>()?,
            // A token mask now and then: empty words, stray bits, past the vocabulary.
            allowed_tokens: (0..u.int_in_range(0..=3)?)
                .map(|_| u.arbitrary())
                .collect::<Result<_>>()?,
        });
    }
    let rows = seqs
        .iter()
        .fold(0u32, |acc, s| acc.wrapping_add(s.num_tokens));
    let activations = if u.ratio(1, 10)? {
        None
    } else {
        Some(tensor(u, rows)?)
    };
    Ok(v1::StepRequest {
        step_id: u.arbitrary()?,
        seqs,
        activations,
        release: Vec::new(),
        run_steps: 0,
        end_run: false,
    })
}

fn forward_from(u: &mut Unstructured) -> Result<v1::ForwardRequest> {
    let tokens = u.int_in_range(0..=6)?;
    let mut pairs_per_token: Vec<u32> = (0..tokens)
        .map(|_| u.int_in_range(0..=3))
        .collect::<Result<_>>()?;
    let mut total: usize = pairs_per_token.iter().map(|&n| n as usize).sum();
    if u.ratio(1, 8)? {
        // Counts that do not add up, or a token count that does not match the rows.
        match u.int_in_range(0..=2)? {
            0 => pairs_per_token.push(u.arbitrary()?),
            1 => total = total.saturating_sub(1),
            _ => total += 1,
        }
    }
    let expert_ids = (0..total)
        .map(|_| u.int_in_range(0..=15))
        .collect::<Result<_>>()?;
    let mut weights: Vec<f32> = (0..total).map(|_| u.arbitrary()).collect::<Result<_>>()?;
    if u.ratio(1, 16)? {
        weights.pop();
    }
    let hidden = if u.ratio(1, 10)? {
        None
    } else {
        Some(tensor(u, tokens as u32)?)
    };
    Ok(v1::ForwardRequest {
        call_id: u.arbitrary()?,
        layer: u.int_in_range(0..=3)?,
        hidden,
        pairs_per_token,
        expert_ids,
        weights,
        traceparent: String::new(),
        shared: None,
    })
}

/// Runs `harness` on `n` inputs of random length (up to 512 bytes) and content from a fixed
/// seed, so that a failure reproduces: the stable stand-in for `cargo fuzz run`, for tests.
/// Returns how many inputs were accepted and how many rejected.
pub fn run_seeded(harness: fn(&[u8]) -> Outcome, seed: u64, n: usize) -> (usize, usize) {
    let (mut accepted, mut rejected) = (0, 0);
    // splitmix64: enough randomness for inputs, and no dependency for the `fuzzing` feature.
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in 0..n {
        let len = (next() % 513) as usize;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        match std::panic::catch_unwind(|| harness(&data)) {
            Ok(Outcome::Accepted) => accepted += 1,
            Ok(Outcome::Rejected) => rejected += 1,
            Ok(Outcome::Skipped) => {}
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(not a string)");
                panic!("input {i} of seed {seed:#x} panicked: {msg}\ninput: {data:?}");
            }
        }
    }
    (accepted, rejected)
}

/// Checks that a seeded run exercised both paths: at least `min` of `n` inputs accepted and as
/// many rejected (the structured half of the inputs is built to land on both sides of every
/// check, so a harness that stops reaching one of them fails here).
pub fn assert_both_paths((accepted, rejected): (usize, usize), n: usize, min: usize) {
    assert!(
        accepted >= min && rejected >= min,
        "of {n} inputs {accepted} were accepted and {rejected} rejected; expected at least {min} of each"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_decoding_survives_seeded_random_inputs() {
        assert_both_paths(run_seeded(step_request, 0x5eed_0001, 4000), 4000, 200);
    }

    #[test]
    fn forward_decoding_survives_seeded_random_inputs() {
        assert_both_paths(run_seeded(forward_request, 0x5eed_0002, 4000), 4000, 200);
    }

    #[test]
    fn a_well_formed_step_is_accepted_and_the_harness_sees_it() {
        // The harness must reach the accepting path, not only the rejections.
        let req = v1::StepRequest {
            step_id: 1,
            seqs: vec![v1::SeqStep {
                seq_id: 3,
                num_tokens: 2,
                ..Default::default()
            }],
            activations: Some(v1::Tensor {
                dtype: v1::DType::Bf16 as i32,
                shape: vec![2, HIDDEN as u32],
                data: vec![0; 2 * HIDDEN * 2],
            }),
            ..Default::default()
        };
        let t = codec::decode_step(&req, HIDDEN, usize::MAX, &Device::Cpu).expect("valid");
        assert_eq!(t.dims2().expect("2-D"), (2, HIDDEN));
        let mut bytes = vec![1u8];
        bytes.extend(req.encode_to_vec());
        assert_eq!(step_request(&bytes), Outcome::Accepted);
    }
}
