//! A gate dies mid-generation: its sequences move to the other gate, are re-prefilled from the
//! frontend's token history, and finish with exactly the tokens of an uninterrupted run.

use moemesh_proto::v1::gate_client::GateClient;
use moemesh_proto::v1::generate_request::Input;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{self, GateInfoRequest, GenerateRequest};
use moemesh_tests::fixture;
use moemesh_tests::mesh::Mesh;

async fn live(url: &str) -> u32 {
    let mut c = GateClient::connect(url.to_string()).await.expect("gate");
    c.info(GateInfoRequest {})
        .await
        .expect("info")
        .into_inner()
        .live_sequences
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_one_of_two_gates_loses_no_request_and_changes_no_token() {
    let dir = fixture("tiny-deepseek-v3");
    let mut mesh = Mesh::start(Some(&dir), &["0-15"]);
    let (mut gate_b, addr_b) = mesh.add_gate("gate-b");
    let url = mesh.frontend_url();
    moemesh_tests::mesh::wait_for_gates(&url, 2).await;

    let engine = moemesh_tests::in_process_engine("tiny-deepseek-v3");
    let out_len = 150u32;
    let cases: Vec<(Vec<u32>, Option<v1::SamplingParams>)> = (0..8u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..(3 + i * 5))
                .map(|j| 2 + (i * 97 + j * 13) % 500)
                .collect();
            let sampling = (i % 2 == 1).then(|| v1::SamplingParams {
                temperature: 0.8,
                top_p: Some(0.9),
                top_k: 50,
                seed: Some(77 + u64::from(i)),
                ..Default::default()
            });
            (prompt, sampling)
        })
        .collect();
    let mut streams = Vec::new();
    for (prompt, sampling) in &cases {
        let mut c = GenerationClient::connect(url.clone())
            .await
            .expect("client");
        let req = GenerateRequest {
            input: Some(Input::Tokens(v1::TokenIds {
                ids: prompt.clone(),
            })),
            sampling: sampling.clone(),
            stopping: Some(v1::StoppingCriteria {
                max_new_tokens: Some(out_len),
                stop: vec![],
                ignore_eos: true,
                ..Default::default()
            }),
            request_id: String::new(),
            cache_salt: String::new(),
        };
        let mut s = c.generate(req).await.expect("accepted").into_inner();
        let first = s.message().await.expect("stream").expect("first token");
        streams.push((c, s, first.token_ids));
    }
    // Sequences are spread over both gates; kill the second one while they decode.
    assert!(
        live(&format!("http://{addr_b}")).await > 0,
        "gate B got no sequences"
    );
    assert!(live(&mesh.gate_url()).await > 0, "gate A got no sequences");
    gate_b.kill();

    for ((_, mut s, mut ids), (prompt, sampling)) in streams.into_iter().zip(&cases) {
        while let Some(m) = s.message().await.expect("no request fails") {
            ids.extend(m.token_ids);
        }
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
            out_len as usize,
        );
        assert_eq!(
            ids,
            alone,
            "prompt of {} tokens, sampling {sampling:?}",
            prompt.len()
        );
    }
    let log = mesh.frontend.0.log_text();
    assert!(
        log.contains("gate failed; moving its sequences"),
        "the failover path ran"
    );
    mesh.workers.clear();
}
