//! Continuous batching through the mesh: batched output equals unbatched output, and a long
//! prompt is prefilled in chunks while running decodes keep flowing.

use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{self, GenerateRequest};
use moemesh_tests::fixture;
use moemesh_tests::mesh::Mesh;

fn request(ids: Vec<u32>, max_new: u32, sampling: Option<v1::SamplingParams>) -> GenerateRequest {
    moemesh_tests::sampled_tokens_request(&ids, max_new, sampling)
}

async fn run(url: String, req: GenerateRequest) -> Vec<u32> {
    let mut c = GenerationClient::connect(url).await.expect("client");
    let mut s = c.generate(req).await.expect("generate").into_inner();
    let mut ids = Vec::new();
    while let Some(m) = s.message().await.expect("stream") {
        ids.extend(m.token_ids);
    }
    ids
}

/// 32 concurrent requests of mixed prompt and output lengths, half greedy and half seeded
/// sampling, each give exactly the tokens the in-process engine gives for them alone.
#[tokio::test(flavor = "multi_thread")]
async fn batched_output_equals_unbatched_for_greedy_and_seeded_sampling() {
    let dir = fixture("tiny-deepseek-v3");
    // The gate runs with its two-micro-batch overlap on, so that path is held to the same tokens.
    let mesh = Mesh::start_full(
        Some(&dir),
        &["0-7", "8-15"],
        &["--overlap", "true"],
        &["--step-token-budget", "64", "--max-running", "32"],
    );
    let engine = moemesh_tests::in_process_engine("tiny-deepseek-v3");
    let mut cases = Vec::new();
    for i in 0..32u32 {
        let prompt: Vec<u32> = (0..(1 + (i * 7) % 90))
            .map(|j| 2 + (i * 31 + j * 17) % 500)
            .collect();
        let max_new = 4 + (i * 5) % 29;
        let seeded = i % 2 == 1;
        let sampling = seeded.then(|| v1::SamplingParams {
            temperature: 0.9,
            top_p: Some(0.95),
            top_k: 40,
            seed: Some(1000 + u64::from(i)),
            ..Default::default()
        });
        cases.push((prompt, max_new, sampling));
    }
    let url = mesh.frontend_url();
    let handles: Vec<_> = cases
        .iter()
        .map(|(p, n, s)| tokio::spawn(run(url.clone(), request(p.clone(), *n, s.clone()))))
        .collect();
    for (h, (prompt, max_new, sampling)) in handles.into_iter().zip(&cases) {
        let batched = h.await.expect("task");
        let alone = moemesh_tests::in_process_tokens(
            &engine,
            prompt,
            sampling.as_ref().map(|s| {
                (
                    s.temperature,
                    s.top_k as usize,
                    s.top_p.unwrap_or(1.0),
                    s.seed.unwrap_or(0),
                )
            }),
            *max_new as usize,
        );
        assert_eq!(
            batched,
            alone,
            "prompt of {} tokens, sampling {sampling:?}",
            prompt.len()
        );
    }
    // The scheduler did batch: some step carried many sequences at once.
    let log = mesh.frontend.0.log_text();
    let widest = steps(&log).iter().map(|s| s.slots).max().unwrap_or(0);
    assert!(widest >= 8, "steps carried at most {widest} sequences");
}

struct Step {
    decode: usize,
    prefill_tokens: usize,
    slots: usize,
    long_chunk: Option<usize>,
}

/// Parses the frontend's `step composition` records. `long` marks the slot of a sequence whose
/// chunk we follow (by the size of its slot list entries: the long prompt's id is the largest).
fn steps(log: &str) -> Vec<Step> {
    log.lines()
        .filter(|l| l.contains("step composition"))
        .filter_map(|l| {
            let field = |k: &str| -> Option<String> {
                let i = l.find(&format!(" {k}="))? + k.len() + 2;
                let rest = &l[i..];
                let end = if rest.starts_with('[') {
                    rest.find(']')? + 1
                } else {
                    rest.find(' ').unwrap_or(rest.len())
                };
                Some(rest[..end].to_string())
            };
            let slots = field("slots")?;
            let pairs: Vec<(u64, usize)> = slots
                .trim_matches(|c| c == '[' || c == ']')
                .split("), (")
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let p = p.trim_matches(|c| c == '(' || c == ')');
                    let (a, b) = p.split_once(", ")?;
                    Some((a.parse().ok()?, b.parse().ok()?))
                })
                .collect();
            Some(Step {
                decode: field("decode")?.parse().ok()?,
                prefill_tokens: field("prefill_tokens")?.parse().ok()?,
                slots: pairs.len(),
                long_chunk: pairs.iter().filter(|(_, n)| *n > 1).map(|(_, n)| *n).max(),
            })
        })
        .collect()
}

/// A 2,000-token prompt arriving while 8 sequences decode is prefilled in chunks of at most
/// one step budget, and every one of those steps still carries all 8 decodes.
#[tokio::test(flavor = "multi_thread")]
async fn long_prompt_is_chunked_and_running_decodes_keep_flowing() {
    let budget = 256;
    let mesh = Mesh::start_with(None, &["0-15"], &["--step-token-budget", "256"]);
    let url = mesh.frontend_url();
    // Eight decoders with short prompts and long outputs.
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    for i in 0..8u32 {
        let mut c = GenerationClient::connect(url.clone())
            .await
            .expect("client");
        let mut s = c
            .generate(request(vec![100 + i, 200, 300], 120, None))
            .await
            .expect("generate")
            .into_inner();
        s.message().await.expect("stream").expect("first token");
        clients.push(c);
        streams.push(s);
    }
    let long: Vec<u32> = (0..2000u32).map(|i| 1000 + (i * 7919) % 100_000).collect();
    let long_out = run(url.clone(), request(long, 2, None)).await;
    assert_eq!(long_out.len(), 2);
    for s in streams.iter_mut() {
        while s.message().await.expect("decoder stream").is_some() {}
    }
    let all = steps(&mesh.frontend.0.log_text());
    let prefill_steps: Vec<&Step> = all
        .iter()
        .filter(|s| s.long_chunk.is_some_and(|n| n > 10))
        .collect();
    assert!(
        prefill_steps.len() >= 2000 / budget,
        "the prompt went in {} chunks",
        prefill_steps.len()
    );
    for s in &prefill_steps {
        assert_eq!(s.decode, 8, "a prefill step left out running decodes");
        assert!(
            s.prefill_tokens <= budget - 8,
            "a step carried {} prompt tokens",
            s.prefill_tokens
        );
    }
    let chunked: usize = prefill_steps.iter().map(|s| s.prefill_tokens).sum();
    assert_eq!(chunked, 2000);
}

async fn gate_live(url: &str) -> u32 {
    let mut c = moemesh_proto::v1::gate_client::GateClient::connect(url.to_string())
        .await
        .expect("gate");
    c.info(v1::GateInfoRequest {})
        .await
        .expect("info")
        .into_inner()
        .live_sequences
}

/// With the pending-request bound reached, Generate answers RESOURCE_EXHAUSTED at once; the
/// accepted requests complete, and once they have, new requests are accepted again.
#[tokio::test(flavor = "multi_thread")]
async fn queue_overflow_is_resource_exhausted_and_later_requests_succeed() {
    let mesh = Mesh::start_with(
        Some(&fixture("tiny-deepseek-v3")),
        &["0-15"],
        &["--max-pending", "2"],
    );
    let url = mesh.frontend_url();
    let mut c = GenerationClient::connect(url.clone())
        .await
        .expect("client");
    let mut held = Vec::new();
    for i in 0..2u32 {
        let mut s = c
            .generate(request(vec![5 + i, 6, 7], 150, None))
            .await
            .expect("accepted")
            .into_inner();
        s.message().await.expect("stream").expect("first token");
        held.push(s);
    }
    let err = c
        .generate(request(vec![9, 9, 9], 4, None))
        .await
        .expect_err("over capacity");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("--max-pending") && err.message().contains('2'),
        "{}",
        err.message()
    );
    for s in held.iter_mut() {
        let mut n = 1;
        while let Some(m) = s.message().await.expect("accepted requests complete") {
            n += m.token_ids.len();
        }
        assert_eq!(n, 150);
    }
    let out = run(url, request(vec![9, 9, 9], 4, None)).await;
    assert_eq!(out.len(), 4);
}

/// A request for n choices is n sequences, and counts as n requests against `--max-pending`
/// (as vLLM's max_num_seqs counts each): more choices than the limit is INVALID_ARGUMENT naming
/// `sampling.n` and the limit; running choices hold their permits, so a request whose choices do
/// not fit now is RESOURCE_EXHAUSTED while a smaller one still fits; they are freed at the end.
#[tokio::test(flavor = "multi_thread")]
async fn choices_count_as_requests_against_max_pending() {
    let mesh = Mesh::start_with(
        Some(&fixture("tiny-deepseek-v3")),
        &["0-15"],
        &["--max-pending", "3"],
    );
    let url = mesh.frontend_url();
    let mut c = GenerationClient::connect(url.clone())
        .await
        .expect("client");
    let n = |n| {
        Some(v1::SamplingParams {
            n,
            ..Default::default()
        })
    };
    let err = c
        .generate(request(vec![1, 2, 3], 4, n(4)))
        .await
        .expect_err("more choices than the server runs");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    for needle in ["sampling.n: 4 choices", "--max-pending", "at most 3"] {
        assert!(err.message().contains(needle), "{}", err.message());
    }
    // Two running choices hold two of the three permits.
    let mut two = c
        .generate(request(vec![5, 6, 7], 200, n(2)))
        .await
        .expect("accepted")
        .into_inner();
    two.message().await.expect("stream").expect("a token");
    let err = c
        .generate(request(vec![9, 9, 9], 4, n(2)))
        .await
        .expect_err("two more choices do not fit");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("--max-pending"), "{}", err.message());
    let mut one = c
        .generate(request(vec![8, 8, 8], 200, None))
        .await
        .expect("one more fits")
        .into_inner();
    one.message().await.expect("stream").expect("a token");
    let err = c
        .generate(request(vec![9, 9, 9], 4, None))
        .await
        .expect_err("full");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    for s in [&mut two, &mut one] {
        while s
            .message()
            .await
            .expect("accepted requests complete")
            .is_some()
        {}
    }
    drop((two, one));
    // The server lets go of the permits when it drops the finished response bodies, a moment
    // after the client has read their ends.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match c.generate(request(vec![9, 9, 9], 4, n(3))).await {
            Ok(s) => {
                let mut s = s.into_inner();
                let mut got = 0;
                while let Some(m) = s.message().await.expect("stream") {
                    got += m.token_ids.len();
                }
                assert_eq!(got, 12, "three choices of 4 tokens");
                break;
            }
            Err(e) => assert!(
                e.code() == tonic::Code::ResourceExhausted && std::time::Instant::now() < deadline,
                "{e:?}"
            ),
        }
    }
}

/// Past the client's deadline the sequence stops with DEADLINE_EXCEEDED and its KV is freed.
#[tokio::test(flavor = "multi_thread")]
async fn deadline_exceeded_stops_the_sequence_and_frees_its_kv() {
    let mesh = Mesh::start(Some(&fixture("tiny-deepseek-v3")), &["0-15"]);
    let mut c = GenerationClient::connect(mesh.frontend_url())
        .await
        .expect("client");
    let mut req = tonic::Request::new(request(vec![1, 2, 3], 250, None));
    req.set_timeout(std::time::Duration::from_millis(300));
    let mut s = c.generate(req).await.expect("accepted").into_inner();
    let mut got = 0;
    let status = loop {
        match s.message().await {
            Ok(Some(m)) => got += m.token_ids.len(),
            Ok(None) => panic!("the stream ended without an error after {got} tokens"),
            Err(st) => break st,
        }
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        got < 250,
        "the deadline stopped generation early ({got} tokens)"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while gate_live(&mesh.gate_url()).await != 0 {
        assert!(std::time::Instant::now() < deadline, "KV not freed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A gate with a small KV pool (12 blocks = 192 tokens) and four sequences that together need
/// more: the newest is preempted and recomputed, and every request completes with the tokens
/// it would have had alone.
#[tokio::test(flavor = "multi_thread")]
async fn kv_exhaustion_preempts_and_recomputes_without_failing_or_changing_tokens() {
    let dir = fixture("tiny-deepseek-v3");
    let mesh = Mesh::start_full(Some(&dir), &["0-15"], &["--kv-blocks", "12"], &[]);
    let engine = moemesh_tests::in_process_engine("tiny-deepseek-v3");
    let url = mesh.frontend_url();
    let cases: Vec<Vec<u32>> = (0..4u32)
        .map(|i| (0..20).map(|j| 2 + (i * 101 + j * 7) % 500).collect())
        .collect();
    let handles: Vec<_> = cases
        .iter()
        .map(|p| tokio::spawn(run(url.clone(), request(p.clone(), 60, None))))
        .collect();
    for (h, prompt) in handles.into_iter().zip(&cases) {
        let got = h.await.expect("task");
        let alone = moemesh_tests::in_process_tokens(&engine, prompt, None, 60);
        assert_eq!(got, alone);
    }
    assert!(
        mesh.frontend.0.log_text().contains("preempting"),
        "the KV budget forced preemption"
    );
    assert_eq!(gate_live(&mesh.gate_url()).await, 0);
}
