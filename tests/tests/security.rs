//! Security as an operator turns it on: mutual TLS between the roles and to etcd (certificates
//! from a CA made here), certificate reload, API keys with their limits, and the audit log. Real etcd,
//! real processes.

use std::path::Path;
use std::time::{Duration, Instant};

use moemesh_proto::v1::expert_client::ExpertClient;
use moemesh_proto::v1::gate_client::GateClient;
use moemesh_proto::v1::generate_request::Input;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{
    self, GateInfoRequest, GenerateRequest, ModelInfoRequest, TokenizeRequest,
};
use moemesh_tests::mesh::Mesh;
use moemesh_tests::tls::{TestCa, alert, channel, probe};
use moemesh_tests::tokens_request;
use moemesh_tests::{fixture, json_lines, moemesh, reference_greedy};
use rustls::AlertDescription;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::transport::Channel;

/// A request carrying `authorization: Bearer <key>` (when given).
fn with_key<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(k) = key {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {k}").parse().expect("ascii key"),
        );
    }
    req
}

/// Generates to the end: (token ids, text).
async fn generate(
    channel: Channel,
    req: GenerateRequest,
    key: Option<&str>,
) -> Result<(Vec<u32>, String), tonic::Status> {
    let mut client = GenerationClient::new(channel);
    let mut stream = client.generate(with_key(req, key)).await?.into_inner();
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(m) = stream.message().await? {
        ids.extend(m.token_ids);
        text.push_str(&m.text);
    }
    Ok((ids, text))
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Polls `cond` until it holds; the reloads and refills it waits for have no event to wait on.
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_role_without_tls_files_or_plaintext_refuses_to_start_and_names_both() {
    for role in ["frontend", "gate", "expert"] {
        let out = moemesh(&[role, "--listen", "127.0.0.1:0"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{role}: {err}");
        for flag in ["--tls-cert", "--tls-key", "--tls-ca", "--plaintext"] {
            assert!(err.contains(flag), "{role}: {flag} not named: {err}");
        }
    }
    let out = moemesh(&["gate", "--plaintext", "--tls-ca", "ca.pem"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--plaintext conflicts"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_mesh_generates_refuses_foreign_certificates_and_reloads_its_own() {
    let pki = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(pki.path(), "mesh");
    let other = TestCa::new(pki.path(), "other");
    let model = fixture("tiny-deepseek-v3");
    let mesh = Mesh::start_tls(&ca, Some(&model), &["0-15"], &[]);
    let (frontend, gate, worker) = (&mesh.frontend.1, &mesh.gate.1, &mesh.workers[0].1);
    // The roles found each other through an etcd that takes only clients with a certificate.
    assert!(
        mesh.etcd.endpoint.starts_with("https://"),
        "{}",
        mesh.etcd.endpoint
    );

    // The whole mesh over TLS: the reference tokens come back through frontend → gate → worker.
    let (input, expected) = reference_greedy("tiny-deepseek-v3", 0);
    let public = channel(frontend, &ca, None)
        .await
        .expect("TLS to the frontend");
    let (ids, _) = generate(public, tokens_request(&input, expected.len() as u32), None)
        .await
        .expect("generate over TLS");
    assert_eq!(ids, expected);

    // `moemesh generate` as a TLS client, with a client certificate.
    let client = ca.leaf("client", "test client", &["client"]);
    let prompt_ids: Vec<String> = input.iter().map(u32::to_string).collect();
    let (ca_path, cert, key) = (
        ca.ca_path.display().to_string(),
        client.cert.display().to_string(),
        client.key.display().to_string(),
    );
    let max = expected.len().to_string();
    let out = moemesh(&[
        "generate",
        "--addr",
        frontend,
        "--tls-ca",
        &ca_path,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--prompt-ids",
        &prompt_ids.join(","),
        "--max-new-tokens",
        &max,
        "--ignore-eos",
        "--json",
    ]);
    let last = json_lines(&out).pop().expect("a summary line");
    assert_eq!(last["token_ids"], serde_json::json!(expected));

    // Internal services take only clients with a certificate from the mesh's CA.
    let stranger = other.leaf("client", "stranger", &["frontend"]);
    for (name, addr) in [("gate", gate), ("worker", worker)] {
        let none = probe(addr, &ca, None).await.expect_err("no certificate");
        assert_eq!(
            alert(&none),
            Some(AlertDescription::CertificateRequired),
            "{name}: {none}"
        );
        let foreign = probe(addr, &ca, Some(&stranger))
            .await
            .expect_err("foreign certificate");
        assert_eq!(
            alert(&foreign),
            Some(AlertDescription::UnknownCA),
            "{name}: {foreign}"
        );
        probe(addr, &ca, Some(&client))
            .await
            .unwrap_or_else(|e| panic!("{name} refused a certificate of its CA: {e}"));
    }
    // Role-bound certificates: the public-port client certificate (role `client`) passes the
    // TLS handshake, but Gate.Step and Expert.Forward refuse it, naming the role they expect;
    // health stays open to it. A frontend-role certificate may step, and only a gate-role one
    // may call the workers.
    let as_client = channel(gate, &ca, Some(&client))
        .await
        .expect("TLS to the gate");
    let err = GateClient::new(as_client.clone())
        .step(tokio_stream::iter([v1::StepRequest::default()]))
        .await
        .expect_err("a client certificate may not step");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("frontend role")
            && err.message().contains("spiffe://moemesh/role/frontend"),
        "{}",
        err.message()
    );
    let health = tonic_health::pb::health_client::HealthClient::new(as_client)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health with a client certificate");
    assert_eq!(
        health.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let frontend_leaf = ca.leaf("frontend2", "another frontend", &["frontend"]);
    let as_frontend = channel(gate, &ca, Some(&frontend_leaf))
        .await
        .expect("TLS to the gate");
    let mut steps = GateClient::new(as_frontend)
        .step(tokio_stream::iter([v1::StepRequest::default()]))
        .await
        .expect("a frontend certificate may step")
        .into_inner();
    assert!(steps.message().await.expect("a step answer").is_some());
    for leaf in [&client, &frontend_leaf] {
        let to_worker = channel(worker, &ca, Some(leaf))
            .await
            .expect("TLS to the worker");
        let err = ExpertClient::new(to_worker)
            .forward(tokio_stream::iter([v1::ForwardRequest::default()]))
            .await
            .expect_err("only gates may forward");
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("gate role"), "{}", err.message());
    }

    // Plaintext gRPC reaches nothing.
    let plain = GateClient::connect(mesh.gate_url()).await;
    let refused = match plain {
        Err(_) => true,
        Ok(mut c) => c.info(GateInfoRequest {}).await.is_err(),
    };
    assert!(refused, "the gate answered a plaintext call");
    // The frontend's public port: a client certificate is optional, but a foreign one is refused.
    probe(frontend, &ca, None)
        .await
        .expect("no client certificate is fine");
    let foreign = probe(frontend, &ca, Some(&stranger))
        .await
        .expect_err("foreign certificate");
    assert_eq!(
        alert(&foreign),
        Some(AlertDescription::UnknownCA),
        "{foreign}"
    );

    // Reload: the gate's files are replaced (key first, then certificate, as a careless
    // rotation would); new connections get the new certificate, without a restart.
    let old = probe(gate, &ca, Some(&client)).await.expect("gate");
    let renewed = ca.leaf("gate", "gate renewed", &["gate"]);
    assert_ne!(old, renewed.der);
    let started = Instant::now();
    wait_until(
        "the gate to present its new certificate",
        Duration::from_secs(20),
        || async { probe(gate, &ca, Some(&client)).await.ok() == Some(renewed.der.clone()) },
    )
    .await;
    eprintln!("gate certificate reloaded in {:?}", started.elapsed());
    // A fresh frontend connection to the gate still works (the frontend keeps its stream; a new
    // client sees the same tokens).
    let public = channel(frontend, &ca, Some(&client))
        .await
        .expect("TLS with a client cert");
    let (ids, _) = generate(public, tokens_request(&input, expected.len() as u32), None)
        .await
        .expect("generate after the reload");
    assert_eq!(ids, expected);
}

const KEYS: &str = r#"
[[key]]
id = "alice"
key = "alice-secret-0123456789"

[[key]]
id = "limited"
key = "limited-secret-0123456789"
requests_per_second = 2.0
burst = 2

[[key]]
id = "one-stream"
key = "one-stream-secret-0123456789"
max_streams = 1

[[key]]
id = "two-streams"
key = "two-streams-secret-0123456789"
max_streams = 2

[[key]]
id = "info-only"
key = "info-only-secret-0123456789"
methods = ["ModelInfo"]
"#;

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_and_their_limits_decide_the_status_and_every_call_is_audited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, KEYS).expect("keys file");
    let audit = dir.path().join("audit.log");
    let (keys_s, audit_s) = (keys.display().to_string(), audit.display().to_string());
    // The embedded model has a tokenizer, so the audit log has texts to hash.
    let mesh = Mesh::start_with(
        None,
        &["0-15"],
        &["--api-keys-file", &keys_s, "--audit-log", &audit_s],
    );
    let url = mesh.frontend_url();
    let ch = Channel::from_shared(url.clone())
        .expect("url")
        .connect()
        .await
        .expect("frontend");
    let mut client = GenerationClient::new(ch.clone());
    let info = |key: Option<&str>| with_key(ModelInfoRequest {}, key);

    // No key, an unknown key, a malformed header: UNAUTHENTICATED, and nothing more is said.
    for key in [None, Some("alice-secret-0123456788")] {
        let err = client.model_info(info(key)).await.expect_err("refused");
        assert_eq!(err.code(), Code::Unauthenticated);
        assert_eq!(err.message(), "missing or invalid API key");
    }
    let mut basic = info(None);
    basic.metadata_mut().insert(
        "authorization",
        "Basic alice-secret-0123456789".parse().expect("ascii"),
    );
    let err = client
        .model_info(basic)
        .await
        .expect_err("not a bearer token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = generate(
        ch.clone(),
        tokens_request(&[1, 2, 3], 2),
        Some("nope-nope-nope-nope"),
    )
    .await
    .expect_err("refused");
    assert_eq!(err.code(), Code::Unauthenticated);
    // Health needs no key (probes carry none).
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health without a key")
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // `moemesh generate --api-key`, and without one.
    let addr = &mesh.frontend.1;
    let cli = [
        "generate",
        "--addr",
        addr,
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "2",
    ];
    let out = moemesh(&cli);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("UNAUTHENTICATED: missing or invalid API key"),
        "{err}"
    );
    let out = moemesh(&[&cli[..], &["--api-key", "alice-secret-0123456789"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A key limited to ModelInfo: PERMISSION_DENIED elsewhere.
    client
        .model_info(info(Some("info-only-secret-0123456789")))
        .await
        .expect("its one method");
    let err = generate(
        ch.clone(),
        tokens_request(&[1, 2, 3], 2),
        Some("info-only-secret-0123456789"),
    )
    .await
    .expect_err("not its method");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), "this API key may not call this method");

    // 2 requests/s with a burst of 2: the third call in a row is RESOURCE_EXHAUSTED naming the
    // limit, and the bucket refills.
    let limited = Some("limited-secret-0123456789");
    let burst_start = Instant::now();
    for _ in 0..2 {
        client
            .model_info(info(limited))
            .await
            .expect("within the burst");
    }
    let err = client
        .model_info(info(limited))
        .await
        .expect_err("over the rate");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("2 requests/s (burst 2)"),
        "{}",
        err.message()
    );
    wait_until("the bucket to refill", Duration::from_secs(5), || {
        let mut c = client.clone();
        async move { c.model_info(info(limited)).await.is_ok() }
    })
    .await;
    // A token comes back every 500 ms, so the third call can pass no sooner than 500 ms after
    // the first (50 ms of slack for clock granularity).
    assert!(
        burst_start.elapsed() >= Duration::from_millis(450),
        "{:?}",
        burst_start.elapsed()
    );

    // One Generate stream at a time for "one-stream": a second is refused while the first runs;
    // once the first is dropped (its client cancels) the slot frees.
    let one = Some("one-stream-secret-0123456789");
    let mut first = GenerationClient::new(ch.clone())
        .generate(with_key(tokens_request(&[1, 2, 3], 4000), one))
        .await
        .expect("first stream")
        .into_inner();
    first.message().await.expect("a token").expect("streaming");
    let err = generate(ch.clone(), tokens_request(&[1, 2, 3], 2), one)
        .await
        .expect_err("second stream");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("max_streams"), "{}", err.message());
    // A request for n choices counts n streams: three choices are more than "two-streams" may
    // ever run (INVALID_ARGUMENT naming sampling.n and the limit) ...
    let two = Some("two-streams-secret-0123456789");
    let choices = |n| {
        Some(moemesh_proto::v1::SamplingParams {
            n,
            ..Default::default()
        })
    };
    let mut three = tokens_request(&[1, 2, 3], 2);
    three.sampling = choices(3);
    let err = generate(ch.clone(), three, two)
        .await
        .expect_err("three choices for a two-stream key");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("sampling.n: 3 choices") && err.message().contains("max_streams"),
        "{}",
        err.message()
    );
    // ... and two running hold both of its streams.
    let mut long_pair = tokens_request(&[1, 2, 3], 4000);
    long_pair.sampling = choices(2);
    let mut held = GenerationClient::new(ch.clone())
        .generate(with_key(long_pair, two))
        .await
        .expect("two choices")
        .into_inner();
    held.message().await.expect("a token").expect("streaming");
    let err = generate(ch.clone(), tokens_request(&[1, 2, 3], 2), two)
        .await
        .expect_err("a third stream");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("max_streams"), "{}", err.message());
    drop(held);
    drop(first);
    wait_until("the stream slot to free", Duration::from_secs(10), || {
        let ch = ch.clone();
        async move {
            generate(ch, tokens_request(&[1, 2, 3], 2), one)
                .await
                .is_ok()
        }
    })
    .await;

    // The audit line of a finished request: key id, counts, and the hashes a client can check.
    let prompt = "Hello, audit log";
    let req = GenerateRequest {
        input: Some(Input::Prompt(prompt.into())),
        sampling: None,
        stopping: Some(v1::StoppingCriteria {
            max_new_tokens: Some(6),
            stop: Vec::new(),
            ignore_eos: true,
            ..Default::default()
        }),
        request_id: "audit-1".into(),
        cache_salt: String::new(),
    };
    let alice = Some("alice-secret-0123456789");
    let (ids, text) = generate(ch.clone(), req, alice)
        .await
        .expect("alice generates");
    let prompt_ids = client
        .tokenize(with_key(
            TokenizeRequest {
                input: Some(v1::tokenize_request::Input::Prompt(prompt.into())),
            },
            alice,
        ))
        .await
        .expect("tokenize")
        .into_inner()
        .ids;
    let mut line = None;
    wait_until("the audit line of audit-1", Duration::from_secs(10), || {
        line = audit_lines(&audit)
            .into_iter()
            .find(|l| l["request_id"] == "audit-1");
        std::future::ready(line.is_some())
    })
    .await;
    let line = line.expect("found");
    assert_eq!(line["method"], "Generate");
    assert_eq!(line["key_id"], "alice");
    assert_eq!(line["status"], "Ok");
    assert_eq!(line["finish_reason"], "length");
    assert_eq!(line["prompt_tokens"], prompt_ids.len());
    assert_eq!(line["completion_tokens"], ids.len());
    assert_eq!(ids.len(), 6);
    assert_eq!(line["prompt_sha256"], hex_sha256(prompt.as_bytes()));
    assert_eq!(line["output_sha256"], hex_sha256(text.as_bytes()));
    assert!(
        line.get("prompt").is_none() && line.get("output").is_none(),
        "texts are not logged: {line}"
    );
    assert!(
        line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{line}"
    );

    // Refusals and the cancelled stream have their lines too.
    let lines = audit_lines(&audit);
    let count = |f: &dyn Fn(&serde_json::Value) -> bool| lines.iter().filter(|l| f(l)).count();
    assert!(
        count(&|l| l["status"] == "Unauthenticated" && l["key_id"].is_null()) >= 4,
        "{lines:?}"
    );
    assert_eq!(
        count(&|l| l["status"] == "PermissionDenied" && l["key_id"] == "info-only"),
        1
    );
    assert!(count(&|l| l["status"] == "ResourceExhausted" && l["key_id"] == "limited") >= 1);
    assert_eq!(
        count(&|l| l["key_id"] == "one-stream" && l["finish_reason"] == "cancelled"),
        1,
        "{lines:?}"
    );

    // The keys file is re-read when it changes: a new key works, a removed one no longer does.
    let rotated = KEYS.replace("alice", "bob");
    std::fs::write(&keys, rotated).expect("rewriting the keys file");
    wait_until(
        "the new key to be accepted",
        Duration::from_secs(10),
        || {
            let mut c = client.clone();
            async move {
                c.model_info(info(Some("bob-secret-0123456789")))
                    .await
                    .is_ok()
            }
        },
    )
    .await;
    let err = client
        .model_info(info(alice))
        .await
        .expect_err("alice was removed");
    assert_eq!(err.code(), Code::Unauthenticated);
}
