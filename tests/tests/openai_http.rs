//! The OpenAI-compatible HTTP API (`moemesh frontend --http-listen`) against a real mesh (etcd,
//! frontend, gate, expert workers; the embedded model, which has a tokenizer): its answers are
//! the gRPC Generate's for the same request, streamed and whole agree, a seed reproduces, and
//! bad requests get OpenAI's error JSON with the HTTP status a client library expects (its
//! `param` spelled as OpenAI's and vLLM's fields are), and vLLM's `prompt_logprobs` comes back
//! in vLLM's shape with Generate's values.

use std::io::{Read, Write};
use std::net::TcpStream;

use moemesh_proto::v1::generate_request::Input;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{self, ChatInput, ChatMessage, GenerateRequest};
use moemesh_tests::mesh::{Mesh, free_port, gate_info, wait_until};
use moemesh_tests::{test_python, workspace_root};
use serde_json::{Value, json};

/// One HTTP/1.0 exchange (the server closes the connection after the response, so a streamed
/// body ends with it): the status and the body.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the HTTP API");
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // A server that refuses a body part-way answers and closes: a write that fails then, or a
    // reset after the answer, still leaves the answer to read.
    let sent = s.write_all(req.as_bytes());
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if !raw.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read the response ({e}; the request was sent: {sent:?})"),
        }
    }
    let out = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").expect("headers end");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    (status, body.to_string())
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The `data:` payloads of a server-sent event stream.
fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

async fn grpc_text(url: &str, input: Input, max_new_tokens: u32) -> (String, u32) {
    let mut client = GenerationClient::connect(url.to_string())
        .await
        .expect("connect");
    let req = GenerateRequest {
        input: Some(input),
        sampling: Some(v1::SamplingParams::default()),
        stopping: Some(v1::StoppingCriteria {
            max_new_tokens: Some(max_new_tokens),
            ..Default::default()
        }),
        request_id: String::new(),
        cache_salt: String::new(),
    };
    let mut stream = client.generate(req).await.expect("accepted").into_inner();
    let (mut text, mut tokens) = (String::new(), 0);
    while let Some(m) = stream.message().await.expect("stream") {
        text.push_str(&m.text);
        tokens += m.token_ids.len() as u32;
    }
    (text, tokens)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_api_answers_as_generate_does_streamed_or_whole_with_openai_errors() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mesh = Mesh::start_with(None, &["0-15"], &["--http-listen", &listen]);
    let url = mesh.frontend_url();

    let (status, body) = http(port, "GET", "/v1/models", None);
    assert_eq!(status, 200, "{body}");
    let models = json_of(&body);
    let model = models["data"][0]["id"]
        .as_str()
        .expect("a model id")
        .to_string();
    assert_eq!(models["object"], "list");

    // Greedy chat: the same text and token count as Generate with the same messages.
    let chat = json!({"model": model, "messages": [{"role": "user", "content": "Name a color."}],
        "max_tokens": 6, "temperature": 0, "logprobs": true});
    let (status, body) = http(port, "POST", "/v1/chat/completions", Some(&chat));
    assert_eq!(status, 200, "{body}");
    let whole = json_of(&body);
    let input = Input::Chat(ChatInput {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "Name a color.".into(),
        }],
    });
    let (want, tokens) = grpc_text(&url, input, 6).await;
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    assert_eq!(whole["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(whole["usage"]["completion_tokens"], tokens);
    assert_eq!(
        whole["choices"][0]["logprobs"]["content"]
            .as_array()
            .map(Vec::len),
        Some(tokens as usize)
    );
    let finish = if tokens == 6 { "length" } else { "stop" };
    assert_eq!(whole["choices"][0]["finish_reason"], finish);

    // top_logprobs: each token with its 3 best alternatives, best first, the greedy pick the
    // first of them; without logprobs: true it is refused, as OpenAI does.
    let mut top = chat.clone();
    top["top_logprobs"] = json!(3);
    let (status, body) = http(port, "POST", "/v1/chat/completions", Some(&top));
    assert_eq!(status, 200, "{body}");
    let content = json_of(&body)["choices"][0]["logprobs"]["content"].clone();
    let content = content.as_array().expect("logprobs.content");
    assert_eq!(content.len(), tokens as usize);
    for t in content {
        let alts = t["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(alts.len(), 3, "{t}");
        assert_eq!(alts[0]["token"], t["token"], "{t}");
        assert_eq!(alts[0]["logprob"], t["logprob"], "{t}");
        let lps: Vec<f64> = alts.iter().filter_map(|a| a["logprob"].as_f64()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{t}");
    }
    top["logprobs"] = json!(false);
    let (status, body) = http(port, "POST", "/v1/chat/completions", Some(&top));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("top_logprobs"), "{body}");
    // The legacy completions API: `logprobs: 2` is the chosen token's and 2 alternatives, as a
    // map of text to logprob per token.
    let legacy = json!({"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0,
        "logprobs": 2, "ignore_eos": true});
    let (status, body) = http(port, "POST", "/v1/completions", Some(&legacy));
    assert_eq!(status, 200, "{body}");
    let lp = json_of(&body)["choices"][0]["logprobs"].clone();
    let per_token = lp["top_logprobs"].as_array().expect("top_logprobs");
    assert_eq!(per_token.len(), 3, "{lp}");
    assert!(
        per_token
            .iter()
            .all(|m| m.as_object().is_some_and(|m| (1..=2).contains(&m.len()))),
        "{lp}"
    );

    // A longer prompt sent again comes from the gate's prefix cache (whole 16-token blocks) and
    // says so in usage; with another cache_salt it does not.
    let mut long = json!({"model": model, "max_tokens": 2, "temperature": 0, "messages": [{"role": "user",
        "content": "Describe the colors of a sunset over a calm sea on a clear summer evening, \
                    then say which of them you like most, and why, in one short sentence."}]});
    let cached = || {
        let (status, body) = http(port, "POST", "/v1/chat/completions", Some(&long));
        assert_eq!(status, 200, "{body}");
        let usage = json_of(&body)["usage"].clone();
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or_else(|| panic!("usage without cached_tokens: {usage}"))
    };
    let (first, second) = (cached(), cached());
    assert!(
        second >= 16 && second > first && second % 16 == 0,
        "cached tokens {first}, then {second}"
    );
    long["cache_salt"] = json!("another tenant");
    let (status, body) = http(port, "POST", "/v1/chat/completions", Some(&long));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json_of(&body)["usage"]["prompt_tokens_details"]["cached_tokens"],
        0
    );

    // The same request streamed: the deltas add up to the same text; usage on request; [DONE].
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, body) = http(port, "POST", "/v1/chat/completions", Some(&streamed));
    assert_eq!(status, 200, "{body}");
    let evs = events(&body);
    assert_eq!(evs.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = evs[..evs.len() - 1].iter().map(|e| json_of(e)).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let usage = chunks
        .iter()
        .find(|c| c["usage"].is_object())
        .expect("a usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], tokens);

    // A completion with a seed: the same seed gives the same text.
    let completion = json!({"prompt": "Once upon a time", "max_tokens": 8,
        "temperature": 0.9, "seed": 1234});
    let (s1, b1) = http(port, "POST", "/v1/completions", Some(&completion));
    let (s2, b2) = http(port, "POST", "/v1/completions", Some(&completion));
    assert_eq!((s1, s2), (200, 200), "{b1} {b2}");
    let (c1, c2) = (json_of(&b1), json_of(&b2));
    assert_eq!(c1["object"], "text_completion");
    assert_eq!(c1["choices"][0]["text"], c2["choices"][0]["text"]);

    // n = 2: two choices, indexed; choice 1 is what seed + 1 gives alone (vLLM's rule); the
    // usage counts the prompt once and both completions. Streamed, each chunk names its choice.
    let mut two = completion.clone();
    two["n"] = json!(2);
    two["max_tokens"] = json!(4);
    two["ignore_eos"] = json!(true);
    let (status, body) = http(port, "POST", "/v1/completions", Some(&two));
    assert_eq!(status, 200, "{body}");
    let both = json_of(&body);
    let mut alone = two.clone();
    alone["n"] = json!(1);
    alone["seed"] = json!(1235);
    let (status, body) = http(port, "POST", "/v1/completions", Some(&alone));
    assert_eq!(status, 200, "{body}");
    let alone = json_of(&body);
    assert_eq!(both["choices"][1]["index"], 1);
    assert_eq!(both["choices"][1]["text"], alone["choices"][0]["text"]);
    assert_eq!(
        both["usage"]["prompt_tokens"],
        alone["usage"]["prompt_tokens"]
    );
    assert_eq!(both["usage"]["completion_tokens"], 8);
    two["stream"] = json!(true);
    let (status, body) = http(port, "POST", "/v1/completions", Some(&two));
    assert_eq!(status, 200, "{body}");
    let evs = events(&body);
    let mut texts = [String::new(), String::new()];
    for c in evs[..evs.len() - 1].iter().map(|e| json_of(e)) {
        let i = c["choices"][0]["index"].as_u64().expect("an index") as usize;
        texts[i].push_str(c["choices"][0]["text"].as_str().unwrap_or_default());
    }
    assert_eq!(texts[0], both["choices"][0]["text"].as_str().expect("text"));
    assert_eq!(texts[1], both["choices"][1]["text"].as_str().expect("text"));
    let mut many = two.clone();
    many["n"] = json!(17);
    let (status, body) = http(port, "POST", "/v1/completions", Some(&many));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("16"), "{body}");

    // OpenAI's error shape, with the status a client library maps to its exception.
    let bad = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0});
    let (status, body) = http(port, "POST", "/v1/chat/completions", Some(&bad));
    assert_eq!(status, 400, "{body}");
    let err = json_of(&body);
    assert_eq!(err["error"]["type"], "invalid_request_error");
    // `param` in OpenAI's spelling; the message keeps the Generate field path.
    assert_eq!(err["error"]["param"], "max_tokens", "{body}");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_new_tokens") && m.contains("4096")),
        "{body}"
    );
    let (status, body) = http(port, "POST", "/v1/chat/completions", None);
    assert_eq!(status, 400, "an empty body: {body}");
    // Over the body limit (2 × --max-prompt-bytes + 1 MiB = 3 MiB by default): a 400 in
    // OpenAI's shape naming the limit, and the server stays up for the next request.
    let huge = json!({"prompt": "x".repeat(4 << 20)});
    let (status, body) = http(port, "POST", "/v1/completions", Some(&huge));
    assert_eq!(status, 400, "{}", &body[..body.len().min(300)]);
    assert!(body.contains("3145728 bytes"), "{body}");
    let tools = json!({"messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f"}}]});
    let (status, body) = http(port, "POST", "/v1/chat/completions", Some(&tools));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("tools"), "{body}");
    let other = json!({"model": "not-this-one", "prompt": "x"});
    let (status, body) = http(port, "POST", "/v1/completions", Some(&other));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not-this-one"), "{body}");
    let (status, _) = http(port, "GET", "/health", None);
    assert_eq!(status, 200);

    // Over gRPC: ModelInfo names the special ids and the version; request_id is echoed.
    let mut client = GenerationClient::connect(url.clone())
        .await
        .expect("connect");
    let info = client
        .model_info(v1::ModelInfoRequest {})
        .await
        .expect("model info")
        .into_inner();
    assert!(!info.eos_token_ids.is_empty(), "{info:?}");
    assert!(
        info.bos_token_id.is_some(),
        "the R1 tokenizer has a BOS: {info:?}"
    );
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    let req = GenerateRequest {
        input: Some(Input::Prompt("Hello".into())),
        sampling: None,
        stopping: Some(v1::StoppingCriteria {
            max_new_tokens: Some(3),
            ..Default::default()
        }),
        request_id: "req-42".into(),
        cache_salt: String::new(),
    };
    let mut stream = client.generate(req).await.expect("accepted").into_inner();
    let mut messages = 0;
    while let Some(m) = stream.message().await.expect("stream") {
        assert_eq!(m.request_id, "req-42");
        messages += 1;
    }
    assert!(messages > 0);
    drop(mesh);
}

/// The keys file of the SDK test: one key.
const KEYS: &str = r#"
[[key]]
id = "sdk"
key = "sdk-secret-0123456789"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_python_client_streams_completes_and_gets_its_errors() {
    let python = test_python();
    if !python.is_file() {
        // CI runs scripts/setup.sh --test first, so there a missing environment is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing: scripts/setup.sh --test installs it",
            python.display()
        );
        eprintln!(
            "\n*** SKIPPED: {} is missing, so the openai client is NOT tried. \
             scripts/setup.sh --test installs it. ***\n",
            python.display()
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, KEYS).expect("keys file");
    let keys = keys.display().to_string();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mesh = Mesh::start_with(
        None,
        &["0-15"],
        &[
            "--http-listen",
            &listen,
            "--api-keys-file",
            &keys,
            "--reasoning-parser",
            "deepseek-r1",
        ],
    );
    let base = format!("http://127.0.0.1:{port}/v1");
    let script = workspace_root().join("tests/python/openai_client.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(&base)
        .arg("sdk-secret-0123456789")
        .output()
        .expect("run the openai client");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the openai client failed:\n{stderr}");
    let seen = json_of(String::from_utf8_lossy(&out.stdout).trim());
    // Greedy: the stream and the whole answer agree, and so do their usages. The random-weight
    // model never writes `</think>`, so with the R1 parser all of it is reasoning.
    assert_eq!(seen["chat_text"], seen["stream_text"], "{seen}");
    assert_eq!(seen["chat_text"], "", "{seen}");
    assert!(
        seen["chat_reasoning"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{seen}"
    );
    assert_eq!(seen["chat_reasoning"], seen["stream_reasoning"], "{seen}");
    assert_eq!(seen["chat_usage"], seen["stream_usage"], "{seen}");
    assert!(
        seen["chat_usage"]
            .as_u64()
            .is_some_and(|n| (1..=6).contains(&n)),
        "{seen}"
    );
    assert_eq!(seen["cached_tokens"], 0);
    assert!(["length", "stop"].contains(&seen["chat_finish"].as_str().unwrap_or_default()));
    assert_eq!(seen["seeded_equal"], true, "{seen}");
    if seen["stop_used"] == true {
        assert_eq!(seen["stop_finish"], "stop", "{seen}");
        assert_eq!(seen["stop_text_is_prefix"], true, "{seen}");
    } else {
        assert_eq!(seen["stop_finish"], "length", "{seen}");
    }
    assert_eq!(seen["bad_request"][0], 400, "{seen}");
    assert_eq!(seen["bad_key"], 401, "{seen}");
    drop(mesh);
}

/// A frontend is ready only while a gate of its model is registered: gRPC health (what
/// Kubernetes readiness checks) and the HTTP `/health` turn NOT_SERVING / 503 when the gate
/// leaves, and back when one registers.
#[tokio::test(flavor = "multi_thread")]
async fn a_frontend_without_a_gate_is_not_ready() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut mesh = Mesh::start_with(None, &["0-15"], &["--http-listen", &listen]);
    let channel = tonic::transport::Channel::from_shared(mesh.frontend_url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    let mut updates = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    // Waits (on the Watch stream, no polling) for the next status equal to `want`.
    async fn until(
        updates: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
        want: ServingStatus,
    ) {
        let wait = async {
            while let Some(u) = updates.message().await.expect("health stream") {
                if u.status == want as i32 {
                    return;
                }
            }
            panic!("the health stream ended before {want:?}");
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), wait)
            .await
            .unwrap_or_else(|_| panic!("no {want:?} within 30 s"));
    }
    until(&mut updates, ServingStatus::Serving).await;
    assert_eq!(http(port, "GET", "/health", None).0, 200);
    // The gate leaves (SIGTERM: it revokes its lease at once).
    mesh.gate.0.terminate();
    until(&mut updates, ServingStatus::NotServing).await;
    let (status, body) = http(port, "GET", "/health", None);
    assert_eq!(status, 503, "{body}");
    let (_gate, _) = mesh.add_gate("gate-2");
    until(&mut updates, ServingStatus::Serving).await;
    assert_eq!(http(port, "GET", "/health", None).0, 200);
}

/// `--max-pending` counts HTTP completions with the gRPC calls: with one running, the next is a
/// 429 in OpenAI's shape naming the limit, on either API; once it ends, HTTP is served again;
/// a completion's `n` choices count as `n`.
#[tokio::test(flavor = "multi_thread")]
async fn max_pending_bounds_the_http_api_too() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mesh = Mesh::start_with(
        None,
        &["0-15"],
        &["--http-listen", &listen, "--max-pending", "1"],
    );
    let mut client = GenerationClient::connect(mesh.frontend_url())
        .await
        .expect("connect");
    // A long gRPC stream takes the one permit; its first token says it is running.
    let mut long = moemesh_tests::tokens_request(&[5, 17, 42], 4000);
    long.request_id = "hold".into();
    let mut stream = client.generate(long).await.expect("accepted").into_inner();
    stream.message().await.expect("stream").expect("a token");
    let completion = json!({"prompt": "Hi", "max_tokens": 2});
    let (status, body) = http(port, "POST", "/v1/completions", Some(&completion));
    assert_eq!(status, 429, "{body}");
    let err = json_of(&body);
    assert_eq!(err["error"]["type"], "rate_limit_error", "{body}");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--max-pending")),
        "{body}"
    );
    // The stream ends (aborted) and its permit with it: HTTP is served again.
    client
        .abort(v1::AbortRequest {
            request_id: "hold".into(),
        })
        .await
        .expect("abort");
    while stream.message().await.expect("stream").is_some() {}
    drop(stream);
    // The server lets go of the permit when it drops the finished response body, a moment
    // after the client has read its end.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, body) = http(port, "POST", "/v1/completions", Some(&completion));
        if status == 200 {
            break;
        }
        assert!(
            status == 429 && std::time::Instant::now() < deadline,
            "{status} {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // n choices count as n requests here too: two are more than --max-pending 1 ever runs.
    let pair = json!({"prompt": "Hi", "max_tokens": 2, "n": 2});
    let (status, body) = http(port, "POST", "/v1/completions", Some(&pair));
    assert_eq!(status, 400, "{body}");
    let err = json_of(&body);
    assert_eq!(err["error"]["param"], "n", "{body}");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--max-pending")),
        "{body}"
    );
    drop(mesh);
}

#[tokio::test(flavor = "multi_thread")]
async fn prompt_logprobs_come_in_vllms_shape_and_errors_name_openai_params() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mesh = Mesh::start_with(None, &["0-15"], &["--http-listen", &listen]);
    let text = "The sky is blue and the grass is";

    // gRPC's answer for the same prompt is the reference.
    let mut client = GenerationClient::connect(mesh.frontend_url())
        .await
        .expect("connect");
    let req = GenerateRequest {
        input: Some(Input::Prompt(text.into())),
        sampling: Some(v1::SamplingParams {
            prompt_logprobs: Some(2),
            ..Default::default()
        }),
        stopping: Some(v1::StoppingCriteria {
            max_new_tokens: Some(2),
            ..Default::default()
        }),
        request_id: String::new(),
        cache_salt: String::new(),
    };
    let want = client.complete(req).await.expect("complete").into_inner();
    let want = &want.choices[0].prompt_logprobs;
    assert!(want.len() >= 5, "{want:?}");
    let check = |p: &Value, top: usize| {
        let p = p.as_array().expect("prompt_logprobs is a list");
        assert_eq!(p.len(), want.len() + 1, "one per prompt token");
        assert!(p[0].is_null(), "the first prompt token has none");
        for (entry, w) in p[1..].iter().zip(want) {
            let m = entry.as_object().expect("a map per position");
            let own = &m[&w.token_id.to_string()];
            assert!(
                (own["logprob"].as_f64().expect("logprob") - f64::from(w.logprob)).abs() < 1e-3
            );
            assert_eq!(own["rank"], w.rank);
            assert!(own["decoded_token"].is_string());
            let alts = w.top.as_ref().map_or(&[][..], |t| &t.token_ids[..]);
            for (k, id) in alts.iter().take(top).enumerate() {
                assert_eq!(m[&id.to_string()]["rank"], k + 1, "{entry}");
            }
            // The prompt token and the alternatives, once each.
            let mut ids: Vec<u32> = alts[..top.min(alts.len())].to_vec();
            ids.push(w.token_id);
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(m.len(), ids.len(), "{entry}");
        }
    };
    // Completions: on every choice (as vLLM), whole or streamed on the first chunk.
    let mut body = json!({"prompt": text, "max_tokens": 2, "temperature": 0, "n": 2,
        "prompt_logprobs": 2});
    let (status, got) = http(port, "POST", "/v1/completions", Some(&body));
    assert_eq!(status, 200, "{got}");
    let got = json_of(&got);
    check(&got["choices"][0]["prompt_logprobs"], 2);
    assert_eq!(
        got["choices"][1]["prompt_logprobs"],
        got["choices"][0]["prompt_logprobs"]
    );
    body["stream"] = json!(true);
    body["n"] = json!(1);
    let (status, got) = http(port, "POST", "/v1/completions", Some(&body));
    assert_eq!(status, 200, "{got}");
    let with: Vec<Value> = events(&got)
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| json_of(e))
        .filter(|c| !c["choices"][0]["prompt_logprobs"].is_null())
        .collect();
    assert_eq!(with.len(), 1, "{got}");
    check(&with[0]["choices"][0]["prompt_logprobs"], 2);
    // Chat: beside the choices; 0 alternatives gives the prompt tokens' own only.
    let chat = json!({"messages": [{"role": "user", "content": text}], "max_tokens": 2,
        "prompt_logprobs": 0});
    let (status, got) = http(port, "POST", "/v1/chat/completions", Some(&chat));
    assert_eq!(status, 200, "{got}");
    let p = json_of(&got)["prompt_logprobs"].clone();
    let p = p.as_array().expect("a list");
    assert!(p[0].is_null() && p.len() > 5);
    assert!(
        p[1..]
            .iter()
            .all(|e| e.as_object().is_some_and(|m| m.len() == 1)),
        "{got}"
    );

    // Errors name the field as OpenAI (or vLLM) spells it.
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        ("/v1/completions", json!({"prompt": "x", "n": 17}), "n"),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "max_completion_tokens": 0}),
            "max_completion_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "logprobs": 21}),
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "prompt_logprobs": 21}),
            "prompt_logprobs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "temperature": -1}),
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "stop_token_ids": [1, 999999]}),
            "stop_token_ids",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 2, "min_tokens": 3}),
            "min_tokens",
        ),
        ("/v1/completions", json!({"prompt": ""}), "prompt"),
    ];
    for (path, body, param) in cases {
        let (status, got) = http(port, "POST", path, Some(&body));
        assert_eq!(status, 400, "{body}: {got}");
        assert_eq!(json_of(&got)["error"]["param"], param, "{body}: {got}");
    }
    drop(mesh);
}

/// Structured outputs over HTTP, on the embedded model (random weights: only the token mask
/// keeps the output in shape): OpenAI's `response_format` with a JSON schema gives content that
/// is an instance of it, vLLM's `guided_regex` text that matches; a schema that is not one is a
/// 400 whose `param` is `response_format`.
#[tokio::test(flavor = "multi_thread")]
async fn response_format_and_guided_regex_shape_the_output() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mesh = Mesh::start_with(None, &["0-15"], &["--http-listen", &listen]);
    let schema = json!({"type": "object", "properties": {"color": {"enum": ["red", "blue"]}},
        "required": ["color"], "additionalProperties": false});
    let chat = json!({"messages": [{"role": "user", "content": "Name a color."}],
        "max_tokens": 32, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}});
    let (status, body) = http(port, "POST", "/v1/chat/completions", Some(&chat));
    assert_eq!(status, 200, "{body}");
    let got = json_of(&body);
    let content = got["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    let v = json_of(content);
    assert!(
        matches!(v["color"].as_str(), Some("red" | "blue")),
        "{content}"
    );
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{content}");
    assert_eq!(got["choices"][0]["finish_reason"], "stop", "{body}");

    let completion = json!({"prompt": "Code:", "max_tokens": 16, "temperature": 1, "seed": 3,
        "guided_regex": "[A-Z]{2}[0-9]{2}"});
    let (status, body) = http(port, "POST", "/v1/completions", Some(&completion));
    assert_eq!(status, 200, "{body}");
    let text = json_of(&body)["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_string();
    let b = text.as_bytes();
    assert!(
        b.len() == 4
            && b[..2].iter().all(u8::is_ascii_uppercase)
            && b[2..].iter().all(u8::is_ascii_digit),
        "{text:?}"
    );

    for bad in [
        json!({"type": "json_schema", "json_schema": {"name": "c"}}),
        json!({"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}),
        json!({"type": "xml"}),
    ] {
        let req = json!({"messages": [{"role": "user", "content": "hi"}], "response_format": bad});
        let (status, body) = http(port, "POST", "/v1/chat/completions", Some(&req));
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(
            json_of(&body)["error"]["param"],
            "response_format",
            "{body}"
        );
    }
    drop(mesh);
}

/// An HTTP client that goes away mid-stream cancels its sequence: the gate frees its KV while
/// another request runs on to its end.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_mid_stream_frees_its_sequence() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mesh = Mesh::start_with(None, &["0-15"], &["--http-listen", &listen]);
    let (status, body) = http(port, "GET", "/v1/models", None);
    assert_eq!(status, 200, "{body}");
    let model = json_of(&body)["data"][0]["id"]
        .as_str()
        .expect("a model id")
        .to_string();
    let long = json!({"model": model, "prompt": "Count slowly:", "max_tokens": 400,
        "temperature": 0, "stream": true, "ignore_eos": true});
    // The one that leaves: read the first streamed event, then close the connection.
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the HTTP API");
    let body = long.to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: {") {
        let n = s.read(&mut buf).expect("the stream starts");
        assert!(n > 0, "the stream ended before its first event");
        seen.extend_from_slice(&buf[..n]);
    }
    // The one that stays, on its own connection.
    let stays = std::thread::spawn(move || http(port, "POST", "/v1/completions", Some(&long)));
    wait_until("both sequences on the gate", || async {
        gate_info(&mesh.gate_url()).await.live_sequences == 2
    })
    .await;
    drop(s);
    wait_until(
        "the gone client's sequence to be freed while the other runs",
        || async { gate_info(&mesh.gate_url()).await.live_sequences == 1 && !stays.is_finished() },
    )
    .await;
    let (status, body) = stays.join().expect("the other request");
    assert_eq!(status, 200, "{body}");
    let events = events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    wait_until("every sequence freed", || async {
        gate_info(&mesh.gate_url()).await.live_sequences == 0
    })
    .await;
}
