//! Limits that protect a serving process, against a real frontend process: oversized messages,
//! over-long prompts, too many or too long stop strings and oversized metadata are refused with
//! a status that names the limit, and the process goes on serving; a client that opens a
//! connection and dawdles (slowloris) neither blocks others nor keeps its connection.
//!
//! The frontend runs alone (a static gate address that nothing listens on): every check here is
//! answered before a request would reach a gate, and `Tokenize` shows that it still serves.

use std::time::{Duration, Instant};

use moemesh_proto::v1::generate_request::Input;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{self, GenerateRequest, TokenizeRequest, tokenize_request};
use moemesh_tests::mesh::{free_port, start_role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::Channel;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn tokenize(
    client: &mut GenerationClient<Channel>,
    text: &str,
) -> Result<usize, tonic::Status> {
    let req = TokenizeRequest {
        input: Some(tokenize_request::Input::Prompt(text.to_string())),
    };
    Ok(client.tokenize(req).await?.into_inner().ids.len())
}

fn generate_with_stops(stop: Vec<String>) -> GenerateRequest {
    GenerateRequest {
        input: Some(Input::Prompt("Hello".into())),
        sampling: None,
        stopping: Some(v1::StoppingCriteria {
            max_new_tokens: Some(4),
            stop,
            ignore_eos: false,
            ..Default::default()
        }),
        request_id: String::new(),
        cache_salt: String::new(),
    }
}

/// Reads until the server closes the connection (EOF or reset); how long that took.
async fn closed_within(conn: &mut tokio::net::TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + limit).into(), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            // The server's own SETTINGS, pings, GOAWAY: keep reading.
            Ok(Ok(_)) => {}
            Err(_) => panic!("the server kept a dawdling connection open for {limit:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_and_slow_requests_are_refused_and_the_frontend_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args: Vec<String> = [
        "--gate-addrs",
        &format!("127.0.0.1:{}", free_port()),
        "--max-message-mb",
        "1",
        "--max-prompt-bytes",
        "4096",
        "--max-stop-sequences",
        "2",
        "--max-stop-bytes",
        "8",
        "--max-header-bytes",
        "8192",
        "--handshake-timeout",
        "1",
        "--keepalive-interval",
        "1",
        "--keepalive-timeout",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (_frontend, addr) = start_role(dir.path(), "frontend", "frontend", &args);
    let url = format!("http://{addr}");
    let mut client = GenerationClient::connect(url.clone())
        .await
        .expect("frontend reachable");
    assert!(
        tokenize(&mut client, "Hello world")
            .await
            .expect("tokenize")
            > 0
    );

    // A message over --max-message-mb: RESOURCE_EXHAUSTED naming the limit in bytes.
    let big = "a".repeat(2 << 20);
    let err = tokenize(&mut client, &big)
        .await
        .expect_err("2 MiB > 1 MiB");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("1048576"), "{}", err.message());
    assert!(
        tokenize(&mut client, "still here")
            .await
            .expect("next request")
            > 0
    );

    // Within the message limit but over --max-prompt-bytes: INVALID_ARGUMENT naming both.
    let err = tokenize(&mut client, &"b".repeat(5000))
        .await
        .expect_err("5000 > 4096 bytes");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("prompt") && err.message().contains("4096"),
        "{}",
        err.message()
    );

    // Too many stop strings, and one too long: INVALID_ARGUMENT naming the field and the limit.
    let stops = |n: usize, s: &str| vec![s.to_string(); n];
    let err = client
        .generate(generate_with_stops(stops(3, "x")))
        .await
        .expect_err("3 > 2 stop strings");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("stopping.stop") && err.message().contains("at most 2"),
        "{}",
        err.message()
    );
    let err = client
        .generate(generate_with_stops(stops(1, "123456789")))
        .await
        .expect_err("9 > 8 bytes");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("stopping.stop[0]") && err.message().contains("8"),
        "{}",
        err.message()
    );

    // Metadata over --max-header-bytes (8192) is refused with RESOURCE_EXHAUSTED naming the
    // size and the limit; the connection and the server live on.
    let padded = |bytes: usize| {
        let mut req = tonic::Request::new(TokenizeRequest {
            input: Some(tokenize_request::Input::Prompt("hi".into())),
        });
        req.metadata_mut()
            .insert("x-padding", "p".repeat(bytes).parse().expect("ascii"));
        req
    };
    let err = client
        .tokenize(padded(16 << 10))
        .await
        .expect_err("16 KiB of metadata");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("--max-header-bytes") && err.message().contains("8192"),
        "{}",
        err.message()
    );
    // Just under the limit (the other fields of the request take well under 1 KiB): served.
    let mut near = client
        .tokenize(padded(7 << 10))
        .await
        .expect("7 KiB of metadata");
    assert!(!near.get_mut().ids.is_empty());
    // Far over it, still a status for this request alone (HTTP/2's own limit is far higher).
    let err = client
        .tokenize(padded(200_000))
        .await
        .expect_err("200 KB of metadata");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("8192"), "{}", err.message());
    // Beyond HTTP/2's own limit (16 × 8192, at least 1 MiB) the header block is not kept:
    // HTTP/2 answers 431, which gRPC clients see as UNKNOWN.
    let err = client
        .tokenize(padded(1100 << 10))
        .await
        .expect_err("1.1 MiB of metadata");
    assert!(err.message().contains("431"), "{err:?}");
    assert!(
        tokenize(&mut client, "after the headers")
            .await
            .expect("next request")
            > 0
    );

    // Slowloris, before HTTP/2 starts: half a preface, then nothing. Others are served
    // meanwhile, and the connection is closed after --handshake-timeout.
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    slow.write_all(&PREFACE[..10]).await.expect("write");
    let mut other = GenerationClient::connect(url.clone())
        .await
        .expect("connect");
    assert!(tokenize(&mut other, "not blocked").await.expect("served") > 0);
    let took = closed_within(&mut slow, Duration::from_secs(10)).await;
    // Not before the timeout (1 s; timers may fire a little early on a busy machine).
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");

    // Slowloris after the preface: a HEADERS frame that never completes. hyper counts only
    // complete requests as activity, so the keep-alive ping goes unanswered and the connection
    // is closed after --keepalive-interval + --keepalive-timeout.
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    slow.write_all(PREFACE).await.expect("preface");
    slow.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0])
        .await
        .expect("empty SETTINGS");
    // A HEADERS frame header announcing 1000 bytes, and only 3 of them.
    slow.write_all(&[0, 0x03, 0xe8, 0x1, 0x4, 0, 0, 0, 1, 0x82, 0x86, 0x84])
        .await
        .expect("partial HEADERS");
    assert!(
        tokenize(&mut other, "still not blocked")
            .await
            .expect("served")
            > 0
    );
    let took = closed_within(&mut slow, Duration::from_secs(15)).await;
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    assert!(tokenize(&mut client, "the end").await.expect("served") > 0);
}
