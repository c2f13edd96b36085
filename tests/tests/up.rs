//! `moemesh up`: a whole local mesh from one command, reachable with no .proto files (health and
//! reflection), with mutual TLS inside, serving the reference tokens, and gone — every child —
//! after SIGTERM.

use moemesh_proto::v1::gate_client::GateClient;
use moemesh_proto::v1::generate_request::Input;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{self, GenerateRequest};
use moemesh_tests::mesh::start_moemesh;
use moemesh_tests::{fixture, reference_greedy};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test(flavor = "multi_thread")]
async fn up_serves_reference_tokens_with_health_and_reflection_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture("tiny-deepseek-v3");
    let args: Vec<String> = [
        "--model",
        model.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
        "--expert-workers",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut up, addr) = start_moemesh(dir.path(), "up", "up", &args);
    let url = format!("http://{addr}");

    let channel = tonic::transport::Channel::from_shared(url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Health by the service's own name answers as the overall status does.
    let named = health
        .check(HealthCheckRequest {
            service: "moemesh.v1.Generation".into(),
        })
        .await
        .expect("health of moemesh.v1.Generation")
        .into_inner();
    assert_eq!(
        named.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // grpcio-reflection speaks v1alpha: it lists the same services.
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest as AlphaRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaMessage;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResponse;
        let req = AlphaRequest {
            host: String::new(),
            message_request: Some(AlphaMessage::ListServices(String::new())),
        };
        let mut replies = AlphaClient::new(channel.clone())
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .expect("v1alpha reflection")
            .into_inner();
        let reply = replies.message().await.expect("reply").expect("one reply");
        let Some(AlphaResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("not a service list")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.contains(&"moemesh.v1.Generation".to_string()),
            "{names:?}"
        );
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let reply = replies.message().await.expect("reply").expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("not a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"moemesh.v1.Generation".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    // The frontend advertises only what it serves: not the gate's or the workers' services.
    assert!(
        !names
            .iter()
            .any(|n| n == "moemesh.v1.Gate" || n == "moemesh.v1.Expert"),
        "{names:?}"
    );

    // The internal hops run mutual TLS by default: the gate answers no plaintext call (the
    // public port above is plaintext on loopback).
    let log = up.log_text();
    let gate = log
        .lines()
        .find_map(|l| l.strip_prefix("moemesh up: gate 0 on "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no gate address in the log:\n{log}"))
        .to_string();
    let refused = match GateClient::connect(format!("http://{gate}")).await {
        Err(_) => true,
        Ok(mut c) => c.info(v1::GateInfoRequest {}).await.is_err(),
    };
    assert!(
        refused,
        "the gate of `moemesh up` answered a plaintext call"
    );

    let (input, expected) = reference_greedy("tiny-deepseek-v3", 3);
    let mut client = GenerationClient::connect(url.clone())
        .await
        .expect("client");
    let req = GenerateRequest {
        input: Some(Input::Tokens(v1::TokenIds { ids: input.clone() })),
        sampling: None,
        stopping: Some(v1::StoppingCriteria {
            max_new_tokens: Some(expected.len() as u32),
            stop: vec![],
            ignore_eos: true,
            ..Default::default()
        }),
        request_id: "up-test".into(),
        cache_salt: String::new(),
    };
    let mut stream = client.generate(req).await.expect("generate").into_inner();
    let mut ids = Vec::new();
    while let Some(m) = stream.message().await.expect("stream") {
        ids.extend(m.token_ids);
    }
    assert_eq!(ids, expected);

    // Python's standard reflection client (grpcio-reflection, v1alpha) finds Generate from the
    // server's descriptors alone (no generated code) and calls it: the same reference tokens.
    let python = moemesh_tests::test_python();
    if python.is_file() {
        let csv: Vec<String> = input.iter().map(|t| t.to_string()).collect();
        let out = std::process::Command::new(&python)
            .arg(moemesh_tests::workspace_root().join("tests/python/grpc_reflection_client.py"))
            .arg(&addr)
            .arg(csv.join(","))
            .arg(expected.len().to_string())
            .output()
            .expect("run the grpcio-reflection client");
        assert!(
            out.status.success(),
            "the grpcio-reflection client failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seen: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("one JSON line from the client");
        assert_eq!(seen["token_ids"], serde_json::json!(expected), "{seen}");
        assert_eq!(seen["finish_reason"], "FINISH_REASON_LENGTH", "{seen}");
        assert!(
            seen["services"]
                .as_array()
                .is_some_and(|s| s.iter().any(|n| n == "moemesh.v1.Generation")),
            "{seen}"
        );
    } else {
        // CI runs scripts/setup.sh --test first, so there a missing environment is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing: scripts/setup.sh --test installs it",
            python.display()
        );
        eprintln!(
            "\n*** SKIPPED: {} is missing, so grpcio-reflection is NOT tried. \
             scripts/setup.sh --test installs it. ***\n",
            python.display()
        );
    }

    // The fixture has no tokenizer: text input is refused, and says why.
    let text = GenerateRequest {
        input: Some(Input::Prompt("hello".into())),
        sampling: None,
        stopping: None,
        request_id: String::new(),
        cache_salt: String::new(),
    };
    let err = client.generate(text).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("no tokenizer") && err.message().contains("tokens"),
        "{}",
        err.message()
    );

    let status = up.terminate().expect("up exits after SIGTERM");
    assert!(
        status.success(),
        "up exit status {status}:\n{}",
        up.log_text()
    );
    assert!(
        !up.group_alive(),
        "every process moemesh up started is gone"
    );
}

/// Under `up` with `--expert-replicas 2`, a killed expert worker leaves the mesh running and its
/// replica takes its calls: the reference tokens still come back, and `up` is still there.
#[tokio::test(flavor = "multi_thread")]
async fn up_keeps_serving_when_an_expert_worker_dies_and_its_replica_takes_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture("tiny-deepseek-v3");
    let args: Vec<String> = [
        "--model",
        model.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
        "--expert-workers",
        "1",
        "--expert-replicas",
        "2",
        "--gate-args=--expert-timeout=10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut up, addr) = start_moemesh(dir.path(), "up", "up", &args);
    let log = up.log_text();
    let pid: i32 = log
        .lines()
        .find(|l| l.contains("expert worker 0 replica 0"))
        .and_then(|l| l.rsplit("pid ").next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid for replica 0 in the log:\n{log}"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill replica 0");

    let (prompt, expected) = reference_greedy("tiny-deepseek-v3", 0);
    let mut client = GenerationClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    for _ in 0..2 {
        let req = GenerateRequest {
            input: Some(Input::Tokens(v1::TokenIds {
                ids: prompt.clone(),
            })),
            sampling: None,
            stopping: Some(v1::StoppingCriteria {
                max_new_tokens: Some(expected.len() as u32),
                stop: Vec::new(),
                ignore_eos: true,
                ..Default::default()
            }),
            request_id: String::new(),
            cache_salt: String::new(),
        };
        let mut stream = client.generate(req).await.expect("accepted").into_inner();
        let mut ids = Vec::new();
        while let Some(m) = stream.message().await.expect("no failed request") {
            ids.extend(m.token_ids);
        }
        assert_eq!(ids, expected);
    }
    assert!(!up.exited(), "up stopped the mesh:\n{}", up.log_text());
    assert!(
        up.log_text().contains("an expert worker exited"),
        "{}",
        up.log_text()
    );
}

/// `up --gates 2`: two gate processes share the expert workers; concurrent requests through the
/// one frontend all get the reference tokens.
#[tokio::test(flavor = "multi_thread")]
async fn up_with_two_gates_serves_reference_tokens_to_concurrent_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture("tiny-deepseek-v3");
    let args: Vec<String> = [
        "--model",
        model.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
        "--expert-workers",
        "2",
        "--gates",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut up, addr) = start_moemesh(dir.path(), "up", "up", &args);
    let log = up.log_text();
    for g in ["gate 0 on", "gate 1 on"] {
        assert!(log.contains(g), "no {g:?} in the log:\n{log}");
    }
    let client = GenerationClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let calls = (0..6).map(|i| {
        let mut client = client.clone();
        async move {
            let (prompt, expected) = reference_greedy("tiny-deepseek-v3", i % 3);
            let req = moemesh_tests::tokens_request(&prompt, expected.len() as u32);
            let mut stream = client.generate(req).await.expect("accepted").into_inner();
            let mut ids = Vec::new();
            while let Some(m) = stream.message().await.expect("no failed request") {
                ids.extend(m.token_ids);
            }
            (ids, expected)
        }
    });
    for (ids, expected) in futures::future::join_all(calls).await {
        assert_eq!(ids, expected);
    }
    let status = up.terminate().expect("up exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", up.log_text());
}
