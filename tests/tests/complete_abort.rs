//! `Complete` (Generate answered whole), `Abort` (ending a running request by its request_id)
//! and `n` > 1 (several choices of one prompt) through a real mesh: etcd, an expert worker, a
//! gate and a frontend.

use std::time::{Duration, Instant};

use moemesh_proto::v1::gate_client::GateClient;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{self, AbortRequest, FinishReason, GenerateRequest};
use moemesh_tests::mesh::Mesh;
use moemesh_tests::tokens_request;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

async fn client(url: &str) -> GenerationClient<Channel> {
    GenerationClient::connect(url.to_string())
        .await
        .expect("connect to the frontend")
}

/// Each choice's ids as the stream gave them, and the finish reasons by index.
async fn streamed(url: &str, req: GenerateRequest) -> (Vec<Vec<u32>>, Vec<i32>) {
    let mut stream = client(url)
        .await
        .generate(req)
        .await
        .expect("accepted")
        .into_inner();
    let (mut ids, mut finish) = (Vec::<Vec<u32>>::new(), Vec::new());
    while let Some(m) = stream.message().await.expect("stream") {
        let i = m.index as usize;
        if ids.len() <= i {
            ids.resize(i + 1, Vec::new());
            finish.resize(i + 1, 0);
        }
        ids[i].extend(m.token_ids);
        if m.finish_reason != 0 {
            finish[i] = m.finish_reason;
        }
    }
    (ids, finish)
}

fn seeded(prompt: &[u32], max_new_tokens: u32, seed: u64, n: u32) -> GenerateRequest {
    let mut req = tokens_request(prompt, max_new_tokens);
    req.sampling = Some(v1::SamplingParams {
        temperature: 0.9,
        seed: Some(seed),
        n,
        ..Default::default()
    });
    req
}

#[tokio::test(flavor = "multi_thread")]
async fn complete_returns_what_generate_streams_and_n_choices_each_follow_their_seed() {
    let mesh = Mesh::start(None, &["0-15"]);
    let url = mesh.frontend_url();
    let prompt = [5, 17, 42, 7];

    // Greedy, one choice: Complete's ids, finish reason and usage are the stream's.
    let req = tokens_request(&prompt, 6);
    let (ids, finish) = streamed(&url, req.clone()).await;
    let whole = client(&url)
        .await
        .complete(req)
        .await
        .expect("complete")
        .into_inner();
    assert_eq!(whole.choices.len(), 1);
    let c = &whole.choices[0];
    assert_eq!(c.token_ids, ids[0]);
    assert_eq!(c.logprobs.len(), 6);
    assert_eq!(c.finish_reason, finish[0]);
    assert_eq!(c.finish_reason, FinishReason::Length as i32);
    let usage = whole.usage.expect("usage");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (4, 6));

    // n = 3 with seed 11: choice i is exactly the single-choice request seeded 11 + i, streamed
    // (interleaved, each message with its index) or whole; usage sums the completions.
    let (choices, finish) = streamed(&url, seeded(&prompt, 8, 11, 3)).await;
    assert_eq!(choices.len(), 3);
    assert!(finish.iter().all(|&f| f == FinishReason::Length as i32));
    for (i, got) in choices.iter().enumerate() {
        let (alone, _) = streamed(&url, seeded(&prompt, 8, 11 + i as u64, 1)).await;
        assert_eq!(*got, alone[0], "choice {i} vs seed {}", 11 + i);
    }
    assert_ne!(choices[0], choices[1], "the choices drew the same tokens");
    let whole = client(&url)
        .await
        .complete(seeded(&prompt, 8, 11, 3))
        .await
        .expect("complete n=3")
        .into_inner();
    let ids: Vec<Vec<u32>> = whole.choices.iter().map(|c| c.token_ids.clone()).collect();
    assert_eq!(ids, choices);
    assert_eq!(
        whole.choices.iter().map(|c| c.index).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    let usage = whole.usage.expect("usage");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (4, 24));

    // Over the limit: INVALID_ARGUMENT naming the field and the limit, on both calls.
    let err = client(&url)
        .await
        .complete(seeded(&prompt, 8, 11, 17))
        .await
        .expect_err("n = 17 is refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("sampling.n") && err.message().contains("16"),
        "{err:?}"
    );
    // The field also comes as a google.rpc BadRequest violation, for clients that read details.
    let bad = err.get_details_bad_request().expect("BadRequest details");
    let fields: Vec<&str> = bad
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["sampling.n"]);
    drop(mesh);
}

/// Asks the gate how many sequences it holds KV for, until there are none (or 30 s pass).
async fn gate_empties(url: &str) {
    let mut gate = GateClient::connect(url.to_string())
        .await
        .expect("connect to the gate");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = gate
            .info(v1::GateInfoRequest {})
            .await
            .expect("gate info")
            .into_inner();
        if info.live_sequences == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gate still holds {} sequences",
            info.live_sequences
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_ends_a_running_request_with_cancelled_and_frees_its_kv() {
    let mesh = Mesh::start(None, &["0-15"]);
    let url = mesh.frontend_url();
    let mut api = client(&url).await;
    // Long enough that it is still running when the abort comes.
    let mut req = tokens_request(&[5, 17, 42, 7], 4000);
    req.request_id = "long-1".into();
    req.sampling = Some(v1::SamplingParams {
        n: 2,
        ..Default::default()
    });
    let mut stream = api
        .generate(req.clone())
        .await
        .expect("accepted")
        .into_inner();
    let first = stream.message().await.expect("stream").expect("a token");
    assert_eq!(first.request_id, "long-1");
    let reply = api
        .abort(AbortRequest {
            request_id: "long-1".into(),
        })
        .await
        .expect("abort")
        .into_inner();
    assert_eq!(reply.aborted, 1, "one request (of two choices)");
    // Both choices end normally, with CANCELLED and their usage so far.
    let mut ended = Vec::new();
    while let Some(m) = stream
        .message()
        .await
        .expect("the stream ends without an error")
    {
        if m.finish_reason != 0 {
            assert_eq!(m.finish_reason, FinishReason::Cancelled as i32, "{m:?}");
            let usage = m.usage.expect("usage on the last message");
            assert!(usage.completion_tokens < 4000, "{usage:?}");
            ended.push(m.index);
        }
    }
    ended.sort_unstable();
    assert_eq!(ended, [0, 1]);
    gate_empties(&mesh.gate_url()).await;

    // It is gone: aborting it again names the id; so does an id that never ran.
    for id in ["long-1", "never-sent"] {
        let err = api
            .abort(AbortRequest {
                request_id: id.into(),
            })
            .await
            .expect_err("nothing to abort");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(err.message().contains(id), "{err:?}");
    }
    let err = api
        .abort(AbortRequest::default())
        .await
        .expect_err("an empty id");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("request_id"), "{err:?}");

    // A Complete in flight answers with what it had, finished CANCELLED. Abort is retried
    // until the request is registered (NOT_FOUND until then).
    req.request_id = "long-2".into();
    req.sampling = None;
    let mut other = api.clone();
    let running = tokio::spawn(async move { other.complete(req).await });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = api
            .abort(AbortRequest {
                request_id: "long-2".into(),
            })
            .await;
        match r {
            Ok(_) => break,
            Err(e) if e.code() == Code::NotFound && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("abort: {e:?}"),
        }
    }
    let whole = running
        .await
        .expect("join")
        .expect("complete answers")
        .into_inner();
    assert_eq!(whole.request_id, "long-2");
    assert_eq!(
        whole.choices[0].finish_reason,
        FinishReason::Cancelled as i32
    );
    assert!(whole.choices[0].token_ids.len() < 4000);
    gate_empties(&mesh.gate_url()).await;
    drop(mesh);
}
