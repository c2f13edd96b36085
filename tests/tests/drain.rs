//! Graceful drain on SIGTERM, which the grace periods in deploy/k8s rely on. A frontend stops
//! accepting calls but finishes the streams it accepted. A gate leaves the registry, so no new
//! sequence reaches it, and stops only once its sequences have finished. Both then exit by
//! themselves, with success.

use std::time::{Duration, Instant};

use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{self, FinishReason, GenerateRequest, ModelInfoRequest};
use moemesh_tests::mesh::{Mesh, Proc};
use moemesh_tests::{fixture, tokens_request};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Tokens to generate: most of the fixture's 256-token context, so the stream is still running
/// when the signal lands right after its first token.
const OUT_LEN: u32 = 240;

/// A request for `max_new_tokens` tokens after a short prompt.
fn request(max_new_tokens: u32) -> GenerateRequest {
    tokens_request(&[5, 17, 42], max_new_tokens)
}

fn sigterm(p: &Proc) {
    killpg(Pid::from_raw(p.pid() as i32), Signal::SIGTERM).expect("SIGTERM");
}

/// Starts a long stream and returns it with the tokens of its first message.
async fn start_stream(
    url: &str,
) -> (
    GenerationClient<tonic::transport::Channel>,
    tonic::Streaming<v1::GenerateResponse>,
    usize,
) {
    let mut c = GenerationClient::connect(url.to_string())
        .await
        .expect("client");
    let mut s = c
        .generate(request(OUT_LEN))
        .await
        .expect("accepted")
        .into_inner();
    let first = s.message().await.expect("stream").expect("first message");
    (c, s, first.token_ids.len())
}

/// Reads the stream to its end: every token arrives and it ends as a normal `length` finish.
async fn finish(mut s: tonic::Streaming<v1::GenerateResponse>, mut tokens: usize) {
    let mut reason = FinishReason::Unspecified;
    while let Some(m) = s.message().await.expect("the accepted stream is not cut") {
        tokens += m.token_ids.len();
        if m.finish_reason != 0 {
            reason = m.finish_reason();
        }
    }
    assert_eq!(tokens, OUT_LEN as usize);
    assert_eq!(reason, FinishReason::Length);
}

async fn exits_successfully(p: &mut Proc, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = p.exit_status() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not exit after draining:\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{what} exited with {status}");
    let log = p.log_text();
    assert!(
        !log.contains("drain timeout"),
        "{what} hit its drain timeout:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_the_gate_and_the_frontend() {
    let model = fixture("tiny-deepseek-v3");
    let mut mesh = Mesh::start(Some(&model), &["0-15"]);
    let url = mesh.frontend_url();

    // The only gate is told to stop mid-stream: it leaves the registry at once (the frontend's
    // ModelInfo lists no gate) but finishes the sequence it holds.
    let (mut info, stream, tokens) = start_stream(&url).await;
    sigterm(&mesh.gate.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !info
        .model_info(ModelInfoRequest {})
        .await
        .expect("ModelInfo")
        .into_inner()
        .gates
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the draining gate is still registered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    finish(stream, tokens).await;
    exits_successfully(&mut mesh.gate.0, "the gate").await;
    assert!(
        mesh.gate.0.log_text().contains("draining sequences"),
        "the gate's drain path ran"
    );

    // A second gate takes over; the frontend is told to stop mid-stream and refuses new calls
    // while the accepted stream runs to its end.
    let (gate_b, _) = mesh.add_gate("gate-b");
    let deadline = Instant::now() + Duration::from_secs(10);
    while info
        .model_info(ModelInfoRequest {})
        .await
        .expect("ModelInfo")
        .into_inner()
        .gates
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the frontend never saw gate-b");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_client, stream, tokens) = start_stream(&url).await;
    sigterm(&mesh.frontend.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let refused = async {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())
                .expect("url")
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await?;
            let mut c = GenerationClient::new(channel);
            let mut req = tonic::Request::new(request(1));
            req.set_timeout(Duration::from_secs(1));
            c.generate(req)
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        };
        // No answer within the limit is a refusal too: the listener no longer accepts.
        let accepted: Result<anyhow::Result<()>, _> =
            tokio::time::timeout(Duration::from_secs(3), refused).await;
        if !matches!(accepted, Ok(Ok(()))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the draining frontend still accepts calls"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    finish(stream, tokens).await;
    exits_successfully(&mut mesh.frontend.0, "the frontend").await;
    drop(gate_b);
}
