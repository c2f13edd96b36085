//! Hostile requests against a real mesh (etcd, frontend, gate, worker; plaintext): each fails
//! alone, with a status that says what was wrong, and is counted; the calls around it go on.
//! - Metadata far over `--max-header-bytes` (200 KB) gets RESOURCE_EXHAUSTED for its own
//!   request, while Generate streams open on the same HTTP/2 connection run to their end (HTTP/2
//!   used to answer it with a GOAWAY that failed them all).
//! - Malformed protobuf gets INVALID_ARGUMENT on the public API, and is counted in
//!   `moemesh_frontend_requests_total`; on Gate.Step and Expert.Forward it ends the stream with
//!   INVALID_ARGUMENT instead of an OK with no answers.

use moemesh_proto::v1::ModelInfoRequest;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_tests::mesh::{Mesh, metric_sum, parse_metrics, scrape};
use moemesh_tests::raw::{self, MALFORMED};
use moemesh_tests::{fixture, tokens_request};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

/// Generate streams that run alongside the oversized request, and their length.
const STREAMS: usize = 4;
const TOKENS: u32 = 200;

#[tokio::test(flavor = "multi_thread")]
async fn oversized_metadata_and_malformed_messages_fail_alone_and_are_counted() {
    let mesh = Mesh::start_with_metrics(Some(&fixture("tiny-deepseek-v3")), &["0-15"]);
    // One HTTP/2 connection carries every call below.
    let channel = Channel::from_shared(mesh.frontend_url())
        .expect("url")
        .connect()
        .await
        .expect("frontend reachable");
    let client = GenerationClient::new(channel.clone());

    // Long Generate streams, each under way (its first token in) before the bad request is sent.
    let mut streams = Vec::new();
    for i in 0..STREAMS as u32 {
        let mut stream = client
            .clone()
            .generate(tokens_request(&[3 + i, 5, 7], TOKENS))
            .await
            .expect("generate")
            .into_inner();
        let first = stream
            .message()
            .await
            .expect("first token")
            .expect("a message");
        streams.push((stream, first.token_ids.len()));
    }

    // 200 KB of metadata on the same connection (the default limit is 16 KiB).
    let mut big = tonic::Request::new(tokens_request(&[1, 2], 4));
    big.metadata_mut()
        .insert("x-padding", "p".repeat(200_000).parse().expect("ascii"));
    let err = client
        .clone()
        .generate(big)
        .await
        .expect_err("200 KB of metadata");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("--max-header-bytes") && err.message().contains("16384"),
        "{}",
        err.message()
    );

    // Every stream that was under way finishes with all of its tokens.
    for (mut stream, mut got) in streams {
        while let Some(m) = stream.message().await.expect("the stream survives") {
            got += m.token_ids.len();
        }
        assert_eq!(got, TOKENS as usize);
    }

    // Malformed protobuf on the public API: INVALID_ARGUMENT naming the message, on the same
    // connection, which keeps serving.
    for (what, bytes) in MALFORMED {
        let err = raw::call(
            channel.clone(),
            "/moemesh.v1.Generation/Generate",
            vec![bytes.to_vec()],
        )
        .await
        .expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().contains("GenerateRequest") || err.message().contains("decode"),
            "{what}: {}",
            err.message()
        );
    }
    let ok = raw::call(
        channel.clone(),
        "/moemesh.v1.Generation/ModelInfo",
        vec![ModelInfoRequest {}.encode_to_vec()],
    )
    .await
    .expect("model info after the malformed calls");
    assert_eq!(ok.len(), 1);

    // Every Generate above is counted by its final status; the counts were recorded before the
    // answers left the frontend, so having the answers is the readiness signal.
    let metrics = parse_metrics(&scrape(
        mesh.frontend.0.metrics.as_deref().expect("metrics address"),
    ));
    let count = |code: &str| {
        metric_sum(
            &metrics,
            "moemesh_frontend_requests_total",
            &[("code", code)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("Ok"), STREAMS as f64);
    assert_eq!(count("ResourceExhausted"), 1.0);
    assert_eq!(count("InvalidArgument"), MALFORMED.len() as f64);

    // The internal streams answer a message that does not decode with a status, not with an OK
    // and no answers.
    for (url, path) in [
        (mesh.gate_url(), "/moemesh.v1.Gate/Step"),
        (
            format!("http://{}", mesh.workers[0].1),
            "/moemesh.v1.Expert/Forward",
        ),
    ] {
        let channel = Channel::from_shared(url)
            .expect("url")
            .connect()
            .await
            .expect("reachable");
        for (what, bytes) in &MALFORMED[1..] {
            let err = raw::call(channel.clone(), path, vec![bytes.to_vec()])
                .await
                .expect_err(what);
            assert_eq!(err.code(), Code::InvalidArgument, "{path}, {what}: {err:?}");
        }
    }
}
