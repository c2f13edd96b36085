//! The gate embeds token ids itself (Info.embeds_tokens): a step may carry every sequence's
//! token_ids without activations, and it computes what the same rows sent embedded compute;
//! a step with neither, or with an id outside the vocabulary, is refused by name.

use moemesh_common::codec;
use moemesh_engine::{DType, Device, ModelFiles, Parts};
use moemesh_proto::v1::{self, gate_client::GateClient};
use moemesh_tests::mesh::Mesh;
use tonic::Code;

const PROMPT: [u32; 6] = [5, 17, 42, 7, 99, 3];

fn seq(seq_id: u64, token_ids: Vec<u32>) -> v1::SeqStep {
    v1::SeqStep {
        seq_id,
        start_position: 0,
        num_tokens: PROMPT.len() as u32,
        sample: true,
        sampling: Some(v1::SeqSampling {
            temperature: 0.0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            top_logprobs: 3,
            ..Default::default()
        }),
        token_ids,
        ..Default::default()
    }
}

/// The embedded model's rows for `ids`, f32 on the CPU, as a frontend would send them.
fn embedded_rows(ids: &[u32]) -> v1::Tensor {
    let files = ModelFiles::open_or_embedded(None).expect("the embedded model");
    let loader = files.loader(&Device::Cpu, DType::F32);
    let model = moemesh_engine::DeepSeekModel::load(
        &files.config,
        &loader,
        Parts {
            embeddings: true,
            decoder: false,
        },
    )
    .expect("embeddings");
    let rows = model.embed(ids).expect("embed");
    codec::encode(&rows, v1::DType::F32).expect("encode")
}

/// Sends one step on a new stream and returns its answer, or its error as a status.
async fn one_step(url: &str, req: v1::StepRequest) -> Result<v1::StepResponse, tonic::Status> {
    let mut gate = GateClient::connect(url.to_string())
        .await
        .expect("connect to the gate");
    let mut answers = gate.step(tokio_stream::iter([req])).await?.into_inner();
    // A refused step is answered with its error (the stream stays open for the next).
    match answers.message().await? {
        Some(v1::StepResponse { error: Some(e), .. }) => {
            Err(tonic::Status::new(Code::from_i32(e.code), e.message))
        }
        Some(r) => Ok(r),
        None => Err(tonic::Status::unknown(
            "the step stream ended without an answer",
        )),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_of_token_ids_computes_what_its_embedded_rows_compute() {
    let mesh = Mesh::start(None, &["0-15"]);
    let url = mesh.gate_url();
    let info = moemesh_tests::mesh::gate_info(&url).await;
    assert!(info.embeds_tokens, "the gate says it embeds token ids");

    // Sequence 1 as token ids (the gate embeds), sequence 2 as rows embedded here (no ids, so
    // neither takes anything from the other through the prefix cache).
    let activations = embedded_rows(&PROMPT);
    let ids_only = v1::StepRequest {
        step_id: 1,
        seqs: vec![seq(1, PROMPT.to_vec())],
        ..Default::default()
    };
    let rows_only = v1::StepRequest {
        step_id: 2,
        seqs: vec![seq(2, Vec::new())],
        activations: Some(activations),
        ..Default::default()
    };
    let a = one_step(&url, ids_only).await.expect("a step of ids");
    let b = one_step(&url, rows_only).await.expect("a step of rows");
    let (a, b) = (&a.results[0], &b.results[0]);
    // Same f32 rows, same model, one row each: the same token and logprobs to f32 rounding
    // (1e-5: the two steps run separately, so only summation order could differ).
    assert_eq!(a.token_id, b.token_id, "{a:?} vs {b:?}");
    assert_eq!(a.top_ids, b.top_ids, "{a:?} vs {b:?}");
    for (x, y) in a.top_logprobs.iter().zip(&b.top_logprobs) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }

    // Neither activations nor ids: refused, naming both.
    let neither = v1::StepRequest {
        step_id: 3,
        seqs: vec![seq(3, Vec::new())],
        ..Default::default()
    };
    let err = one_step(&url, neither).await.expect_err("nothing to embed");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("activations") && err.message().contains("token_ids"),
        "{err:?}"
    );

    // An id past the vocabulary: refused, naming the field and the limit.
    let mut bad = PROMPT.to_vec();
    bad[2] = 1 << 30;
    let outside = v1::StepRequest {
        step_id: 4,
        seqs: vec![seq(4, bad)],
        ..Default::default()
    };
    let err = one_step(&url, outside)
        .await
        .expect_err("an id past the vocabulary");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("token_ids") && err.message().contains("vocab_size"),
        "{err:?}"
    );

    // The gate lives on: the ids step again, on a new sequence, gives the same token.
    let again = one_step(
        &url,
        v1::StepRequest {
            step_id: 5,
            seqs: vec![seq(5, PROMPT.to_vec())],
            ..Default::default()
        },
    )
    .await
    .expect("the gate still answers");
    assert_eq!(again.results[0].token_id, a.token_id);
    drop(mesh);
}
