//! Tensors on the wire: candle tensors to and from `moemesh.v1.Tensor` (raw little-endian bytes,
//! dtype, shape). Decoding checks that the byte count matches the shape before touching data.
//! Also the small wire conversions the services share (an expert worker's holdings, logprobs).

use moemesh_engine::{DType, Device, Tensor};
use moemesh_proto::v1;

use crate::error::{MeshError, MeshResult};

/// Most dimensions a wire tensor may have (moemesh sends 2-D ones; the bound keeps a hostile
/// shape from costing memory before the byte count is checked).
const MAX_RANK: usize = 8;

/// Encodes a 2-D tensor as f32 or bf16 bytes.
pub fn encode(t: &Tensor, dtype: v1::DType) -> MeshResult<v1::Tensor> {
    let (candle_dtype, _) = wire_dtype(dtype)?;
    let t = t
        .to_dtype(candle_dtype)
        .and_then(|t| t.to_device(&Device::Cpu))
        .and_then(|t| t.contiguous())
        .map_err(|e| MeshError::Internal(format!("encode tensor: {e}")))?;
    let shape: Vec<u32> = t.dims().iter().map(|&d| d as u32).collect();
    let flat = t
        .flatten_all()
        .map_err(|e| MeshError::Internal(e.to_string()))?;
    let data = match candle_dtype {
        DType::F32 => {
            let v: Vec<f32> = flat
                .to_vec1()
                .map_err(|e| MeshError::Internal(e.to_string()))?;
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        _ => {
            let v: Vec<half::bf16> = flat
                .to_vec1()
                .map_err(|e| MeshError::Internal(e.to_string()))?;
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
    };
    Ok(v1::Tensor {
        dtype: dtype as i32,
        shape,
        data,
    })
}

/// Decodes a tensor message; `field` names it in errors.
pub fn decode(t: &v1::Tensor, field: &str, device: &Device) -> MeshResult<Tensor> {
    let dtype = v1::DType::try_from(t.dtype)
        .map_err(|_| MeshError::Invalid(format!("{field}.dtype: unknown dtype {}", t.dtype)))?;
    let (candle_dtype, size) = wire_dtype(dtype).map_err(|_| {
        MeshError::Invalid(format!("{field}.dtype must be D_TYPE_F32 or D_TYPE_BF16"))
    })?;
    if t.shape.len() > MAX_RANK {
        return Err(MeshError::Invalid(format!(
            "{field}: {} dimensions, at most {MAX_RANK} are allowed",
            t.shape.len()
        )));
    }
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let elems = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    // With a zero dimension there are no elements, but the strides of the other dimensions
    // must still be representable.
    let strides = shape
        .iter()
        .filter(|&&d| d > 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(size));
    let want = elems
        .and_then(|e| e.checked_mul(size))
        .filter(|_| strides.is_some());
    if want != Some(t.data.len()) {
        return Err(MeshError::Invalid(format!(
            "{field}: shape {shape:?} of {dtype:?} needs {} bytes, got {}",
            want.map_or_else(|| "too many".to_string(), |w| w.to_string()),
            t.data.len()
        )));
    }
    Tensor::from_raw_buffer(&t.data, candle_dtype, &shape, device)
        .map_err(|e| MeshError::Invalid(format!("{field}: {e}")))
}

/// The `[tokens, hidden_size]` activations in the message's field `field` (which must be set),
/// and their number of rows.
fn decode_rows(
    t: Option<&v1::Tensor>,
    field: &str,
    hidden_size: usize,
    device: &Device,
) -> MeshResult<(Tensor, usize)> {
    let t = t.ok_or_else(|| MeshError::Invalid(format!("{field}: missing")))?;
    let x = decode(t, field, device)?;
    let (rows, width) = x
        .dims2()
        .map_err(|_| MeshError::Invalid(format!("{field}: expected [tokens, hidden]")))?;
    if width != hidden_size {
        return Err(MeshError::Invalid(format!(
            "{field}: width {width}, the model's hidden_size is {hidden_size}"
        )));
    }
    Ok((x, rows))
}

/// The first (row, column) of a `[rows, width]` f32 or bf16 tensor's little-endian bytes that
/// holds a NaN or an infinity (all exponent bits set, in either format).
fn first_non_finite(t: &v1::Tensor, width: usize) -> Option<(usize, usize)> {
    let at = |i: usize| (i / width.max(1), i % width.max(1));
    if t.dtype == v1::DType::F32 as i32 {
        t.data
            .chunks_exact(4)
            .position(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000)
            .map(at)
    } else {
        t.data
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80)
            .map(at)
    }
}

/// The activations of a `Gate.Step` request, `[total tokens, hidden_size]`, checked against its
/// sequences ([`check_step_seqs`]); every value finite (a NaN or infinity would come out as
/// token 0 with a NaN logprob). Only for a step that has sequences.
pub fn decode_step(
    req: &v1::StepRequest,
    hidden_size: usize,
    max_seqs: usize,
    device: &Device,
) -> MeshResult<Tensor> {
    let (hidden, rows) = decode_rows(req.activations.as_ref(), "activations", hidden_size, device)?;
    if let Some((row, col)) = req
        .activations
        .as_ref()
        .and_then(|t| first_non_finite(t, hidden_size))
    {
        return Err(MeshError::Invalid(format!(
            "activations: row {row}, column {col} is not finite (NaN or infinity); every \
             activation must be a finite number"
        )));
    }
    check_step_seqs(req, max_seqs, rows, "activations has")?;
    Ok(hidden)
}

/// A `Gate.Step` request's sequences checked against the step's `rows` (activation rows, or
/// token ids where the gate embeds them; `what` names them in the error): at most `max_seqs`
/// sequences (`--max-step-sequences`), each at most once and with at least one token, their
/// token counts adding up to the rows.
pub fn check_step_seqs(
    req: &v1::StepRequest,
    max_seqs: usize,
    rows: usize,
    what: &str,
) -> MeshResult<()> {
    if req.seqs.len() > max_seqs {
        return Err(MeshError::Invalid(format!(
            "seqs: {} sequences in one step, over the limit of {max_seqs} (--max-step-sequences)",
            req.seqs.len()
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(req.seqs.len());
    if let Some(s) = req
        .seqs
        .iter()
        .find(|s| !seen.insert(s.seq_id) || s.num_tokens == 0)
    {
        return Err(MeshError::Invalid(format!(
            "seqs: sequence {} appears twice or has no tokens",
            s.seq_id
        )));
    }
    let total: u64 = req.seqs.iter().map(|s| u64::from(s.num_tokens)).sum();
    if total != rows as u64 {
        return Err(MeshError::Invalid(format!(
            "{what} {rows} rows but the sequences add up to {total} tokens"
        )));
    }
    Ok(())
}

/// One (token row, expert, weight) pair of a `Expert.Forward` call.
pub type Assignment = (u32, u32, f32);

/// The tokens of an `Expert.Forward` request, `[tokens, hidden_size]`, and its (row, expert,
/// weight) pairs, checked for consistency (whether this worker serves those experts is the
/// worker's to check).
pub fn decode_forward(
    req: &v1::ForwardRequest,
    hidden_size: usize,
    device: &Device,
) -> MeshResult<(Tensor, Vec<Assignment>)> {
    let (x, t) = decode_rows(req.hidden.as_ref(), "hidden", hidden_size, device)?;
    if req.pairs_per_token.len() != t {
        return Err(MeshError::Invalid(format!(
            "pairs_per_token has {} entries for {t} tokens",
            req.pairs_per_token.len()
        )));
    }
    let pairs = assignments(req, |i| i as u32)?;
    Ok((x, pairs))
}

/// The (row, expert, weight) pairs of an `Expert.Forward` call whose token `i` is in row
/// `row(i)` (its own index, or a row of a shared buffer), checked against `pairs_per_token`.
/// The caller has checked that `pairs_per_token` has one entry per token.
pub fn assignments(
    req: &v1::ForwardRequest,
    row: impl Fn(usize) -> u32,
) -> MeshResult<Vec<Assignment>> {
    let total: u64 = req.pairs_per_token.iter().map(|&n| u64::from(n)).sum();
    if req.expert_ids.len() as u64 != total || req.weights.len() as u64 != total {
        return Err(MeshError::Invalid(format!(
            "expert_ids ({}) and weights ({}) must both have sum(pairs_per_token) = {total} entries",
            req.expert_ids.len(),
            req.weights.len()
        )));
    }
    let mut pairs = Vec::with_capacity(req.expert_ids.len());
    let mut ids = req.expert_ids.iter().zip(&req.weights);
    for (i, &n) in req.pairs_per_token.iter().enumerate() {
        for (&e, &w) in ids.by_ref().take(n as usize) {
            pairs.push((row(i), e, w));
        }
    }
    Ok(pairs)
}

fn wire_dtype(d: v1::DType) -> MeshResult<(DType, usize)> {
    match d {
        v1::DType::F32 => Ok((DType::F32, 4)),
        v1::DType::Bf16 => Ok((DType::BF16, 2)),
        v1::DType::Unspecified => Err(MeshError::Invalid("tensor dtype is unspecified".into())),
    }
}

/// Holdings (per layer, the experts held) as `LayerExperts` messages, ascending by layer.
pub fn holdings_to_wire(h: &crate::placement::Holdings) -> Vec<v1::LayerExperts> {
    h.iter()
        .map(|(&layer, experts)| v1::LayerExperts {
            layer,
            experts: experts.clone(),
        })
        .collect()
}

/// What an expert worker's `ExpertInfoResponse` says it holds: per layer of `layers`, its
/// `layer_experts` entry, else `experts` (an older worker lists no entries).
pub fn holdings_from_info(info: &v1::ExpertInfoResponse) -> crate::placement::Holdings {
    crate::placement::holdings_from_compact(
        &info.layers,
        |l| {
            info.layer_experts
                .iter()
                .find(|le| le.layer == l)
                .map(|le| &le.experts)
        },
        &info.experts,
    )
}

/// The wire dtype for a compute dtype: f32 stays exact; everything else travels as bf16.
pub fn wire_dtype_for(d: DType) -> v1::DType {
    if d == DType::F32 {
        v1::DType::F32
    } else {
        v1::DType::Bf16
    }
}

/// A prompt token's logprob on the wire.
pub fn prompt_logprob_to_wire(p: &moemesh_engine::logprobs::PromptLogprob) -> v1::PromptLogprob {
    v1::PromptLogprob {
        token_id: p.token,
        logprob: p.logprob,
        rank: p.rank,
        top: (!p.top.is_empty()).then(|| v1::TopLogprobs {
            token_ids: p.top.iter().map(|t| t.0).collect(),
            logprobs: p.top.iter().map(|t| t.1).collect(),
        }),
    }
}

/// A prompt token's logprob off the wire (alternatives beyond the shorter of the two lists are
/// dropped).
pub fn prompt_logprob_from_wire(p: &v1::PromptLogprob) -> moemesh_engine::logprobs::PromptLogprob {
    moemesh_engine::logprobs::PromptLogprob {
        token: p.token_id,
        logprob: p.logprob,
        rank: p.rank,
        top: p
            .top
            .as_ref()
            .map(|t| {
                t.token_ids
                    .iter()
                    .copied()
                    .zip(t.logprobs.iter().copied())
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_f32_and_bf16() {
        let t =
            Tensor::new(&[[1.5f32, -2.0, 3.25], [0.0, 7.0, -0.5]], &Device::Cpu).expect("tensor");
        for d in [v1::DType::F32, v1::DType::Bf16] {
            let back = decode(&encode(&t, d).expect("encode"), "x", &Device::Cpu).expect("decode");
            let back: Vec<Vec<f32>> = back
                .to_dtype(DType::F32)
                .expect("f32")
                .to_vec2()
                .expect("vec");
            assert_eq!(back, vec![vec![1.5, -2.0, 3.25], vec![0.0, 7.0, -0.5]]);
        }
    }

    /// A valid two-sequence step of `hidden` columns (f32 zeros), one token each.
    fn step(hidden: usize) -> v1::StepRequest {
        v1::StepRequest {
            seqs: (1..=2)
                .map(|id| v1::SeqStep {
                    seq_id: id,
                    num_tokens: 1,
                    ..Default::default()
                })
                .collect(),
            activations: Some(v1::Tensor {
                dtype: v1::DType::F32 as i32,
                shape: vec![2, hidden as u32],
                data: vec![0; 2 * hidden * 4],
            }),
            ..Default::default()
        }
    }

    /// `e` is INVALID_ARGUMENT and its message holds each of `words`.
    fn assert_invalid_naming(e: MeshError, words: &[&str]) {
        assert!(matches!(e, MeshError::Invalid(_)), "{e:?}");
        let e = e.to_string();
        assert!(
            words.iter().all(|w| e.contains(w)),
            "{e} lacks one of {words:?}"
        );
    }

    #[test]
    fn non_finite_activations_are_invalid_and_named() {
        let ok = step(3);
        decode_step(&ok, 3, 8, &Device::Cpu).expect("zeros are fine");
        for (dtype, bad) in [
            (v1::DType::F32, f32::NAN.to_le_bytes().to_vec()),
            (v1::DType::F32, f32::INFINITY.to_le_bytes().to_vec()),
            (v1::DType::F32, f32::NEG_INFINITY.to_le_bytes().to_vec()),
            (v1::DType::Bf16, half::bf16::NAN.to_le_bytes().to_vec()),
            (
                v1::DType::Bf16,
                half::bf16::NEG_INFINITY.to_le_bytes().to_vec(),
            ),
        ] {
            let mut req = step(3);
            let t = req.activations.as_mut().expect("set");
            let size = bad.len();
            t.dtype = dtype as i32;
            t.data = vec![0; 6 * size];
            // Row 1, column 2.
            t.data[5 * size..].copy_from_slice(&bad);
            let e = decode_step(&req, 3, 8, &Device::Cpu).expect_err("non-finite");
            assert_invalid_naming(e, &["activations", "row 1, column 2", "finite"]);
        }
        // The largest finite values pass.
        let mut req = step(3);
        let t = req.activations.as_mut().expect("set");
        t.data = f32::MAX.to_le_bytes().repeat(6);
        decode_step(&req, 3, 8, &Device::Cpu).expect("finite");
    }

    #[test]
    fn a_step_over_the_sequence_cap_is_refused_naming_field_and_limit() {
        let req = step(3);
        decode_step(&req, 3, 2, &Device::Cpu).expect("2 sequences, cap 2");
        let e = decode_step(&req, 3, 1, &Device::Cpu).expect_err("2 > 1");
        assert_invalid_naming(e, &["seqs", "limit of 1", "--max-step-sequences"]);
    }

    #[test]
    fn a_short_buffer_is_invalid_and_names_the_field() {
        let bad = v1::Tensor {
            dtype: v1::DType::F32 as i32,
            shape: vec![2, 3],
            data: vec![0; 20],
        };
        let e = decode(&bad, "activations", &Device::Cpu)
            .expect_err("short")
            .to_string();
        assert!(e.contains("activations") && e.contains("24 bytes"), "{e}");
    }
}
