//! Decode runs (`--decode-run-steps`, `StepRequest.run_steps`): while nothing waits, the gate
//! runs several decode steps for one request from the frontend, feeding each the tokens the one
//! before sampled. The tokens are those of one request a step (and of the in-process engine),
//! greedy and seeded; a request that arrives during a run ends it and is served; the frontend
//! sends fewer requests than there are steps.

use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{self, GenerateRequest};
use moemesh_tests::fixture;
use moemesh_tests::mesh::{Mesh, gate_info};

fn request(ids: Vec<u32>, max_new: u32, sampling: Option<v1::SamplingParams>) -> GenerateRequest {
    moemesh_tests::sampled_tokens_request(&ids, max_new, sampling)
}

/// The frontend's requests to its gate (its `step composition` records: one per request sent,
/// a run included).
fn requests_sent(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("step composition"))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_give_the_tokens_of_single_steps_and_a_request_arriving_meanwhile_is_served() {
    let dir = fixture("tiny-deepseek-v3");
    let engine = moemesh_tests::in_process_engine("tiny-deepseek-v3");
    let long: Vec<u32> = (0..9).map(|j| 3 + j * 41 % 400).collect();
    let short: Vec<u32> = (0..5).map(|j| 7 + j * 29 % 300).collect();
    let seeded = v1::SamplingParams {
        temperature: 0.9,
        top_p: Some(0.95),
        top_k: 40,
        seed: Some(5),
        ..Default::default()
    };
    let (long_new, short_new) = (40usize, 12usize);
    let want_long = moemesh_tests::in_process_tokens(&engine, &long, None, long_new);
    let want_short =
        moemesh_tests::in_process_tokens(&engine, &short, Some((0.9, 40, 0.95, 5)), short_new);

    for runs in ["16", "1"] {
        let mesh = Mesh::start_with(Some(&dir), &["0-7", "8-15"], &["--decode-run-steps", runs]);
        assert_eq!(
            gate_info(&mesh.gate_url()).await.max_run_steps,
            64,
            "a gate that embeds tokens offers runs"
        );
        let url = mesh.frontend_url();
        let mut c = GenerationClient::connect(url.clone())
            .await
            .expect("client");
        let mut a = c
            .generate(request(long.clone(), long_new as u32, None))
            .await
            .expect("generate")
            .into_inner();
        // The long request decodes (its first token is in) before the short one arrives.
        let mut got_long = Vec::new();
        let first = a.message().await.expect("stream").expect("a first message");
        got_long.extend(first.token_ids);
        let (short, seeded) = (short.clone(), seeded.clone());
        let b = tokio::spawn(async move {
            let mut c = GenerationClient::connect(url).await.expect("client");
            let mut s = c
                .generate(request(short.clone(), short_new as u32, Some(seeded)))
                .await
                .expect("generate")
                .into_inner();
            let mut ids = Vec::new();
            while let Some(m) = s.message().await.expect("stream") {
                ids.extend(m.token_ids);
            }
            ids
        });
        while let Some(m) = a.message().await.expect("stream") {
            got_long.extend(m.token_ids);
        }
        let got_short = b.await.expect("task");
        assert_eq!(got_long, want_long, "greedy, --decode-run-steps {runs}");
        assert_eq!(got_short, want_short, "seeded, --decode-run-steps {runs}");

        let sent = requests_sent(&mesh.frontend.0.log_text());
        if runs == "1" {
            // One request a step: at least one per token of the long sequence.
            assert!(sent >= long_new, "{sent} requests for {long_new} tokens");
        } else {
            // Runs: the long sequence alone after the short one finished needs few requests.
            assert!(sent < long_new, "{sent} requests for {long_new} tokens");
        }
    }
}

/// A run is refused with INVALID_ARGUMENT naming the field where a sequence does not decode
/// one token id (a gate answers it in-band and its stream goes on).
#[tokio::test(flavor = "multi_thread")]
async fn a_run_over_a_prefill_is_refused_naming_run_steps() {
    let dir = fixture("tiny-deepseek-v3");
    let mesh = Mesh::start(Some(&dir), &["0-7", "8-15"]);
    let channel = tonic::transport::Endpoint::from_shared(mesh.gate_url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut gate = v1::gate_client::GateClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = gate
        .step(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let seq = |seq_id, ids: Vec<u32>| v1::SeqStep {
        seq_id,
        start_position: 0,
        num_tokens: ids.len() as u32,
        sample: true,
        token_ids: ids,
        // Greedy: the sampling a sequence's first step on a gate carries.
        sampling: Some(v1::SeqSampling {
            top_p: 1.0,
            repetition_penalty: 1.0,
            ..Default::default()
        }),
        ..Default::default()
    };
    tx.send(v1::StepRequest {
        step_id: 1,
        seqs: vec![seq(1, vec![5, 6, 7])],
        run_steps: 4,
        ..Default::default()
    })
    .await
    .expect("send");
    let refused = answers.message().await.expect("answer").expect("one");
    let err = refused.error.expect("refused in-band");
    assert_eq!(err.code, tonic::Code::InvalidArgument as i32);
    assert!(err.message.contains("run_steps"), "{}", err.message);
    assert!(!refused.run_continues);
    // The same stream runs a one-token sequence for 3 steps: three answers, the last one ends.
    tx.send(v1::StepRequest {
        step_id: 2,
        seqs: vec![seq(2, vec![9])],
        run_steps: 3,
        ..Default::default()
    })
    .await
    .expect("send");
    let mut step_ids = Vec::new();
    loop {
        let r = answers.message().await.expect("answer").expect("one");
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.results.len(), 1);
        step_ids.push(r.step_id);
        if !r.run_continues {
            break;
        }
    }
    assert_eq!(step_ids, vec![2, 2, 2]);
}
