//! The mesh as users and SREs meet it: real etcd, real frontend, gate and expert-worker
//! processes on loopback, driven through the public gRPC API.

use std::time::{Duration, Instant};

use moemesh_proto::v1::generate_request::Input;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{self, GenerateRequest};
use moemesh_tests::mesh::{Mesh, gate_info, wait_until};
use moemesh_tests::tokens_request;
use moemesh_tests::{fixture, reference_greedy};
use tonic::Code;

struct Outcome {
    ids: Vec<u32>,
    finish: i32,
}

async fn generate(url: &str, req: GenerateRequest) -> Result<Outcome, tonic::Status> {
    let mut client = GenerationClient::connect(url.to_string())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Outcome {
        ids: Vec::new(),
        finish: 0,
    };
    while let Some(m) = stream.message().await? {
        out.ids.extend(m.token_ids);
        if m.finish_reason != 0 {
            out.finish = m.finish_reason;
        }
    }
    Ok(out)
}

trait ExpectLoad {
    fn expect_load(self) -> Vec<v1::LayerLoad>;
}

impl ExpectLoad for v1::GateInfoResponse {
    fn expect_load(self) -> Vec<v1::LayerLoad> {
        assert!(!self.expert_load.is_empty(), "no expert load in {self:?}");
        self.expert_load
    }
}

/// Polls `cond` (a readiness signal: registry or gate state) until it holds.
async fn gate_uses(mesh: &Mesh, worker: &str) -> bool {
    gate_info(&mesh.gate_url())
        .await
        .expert_workers
        .iter()
        .any(|w| w == worker)
}

/// With the experts spread over three workers, greedy tokens equal the reference (and so the
/// in-process engine, which the engine tests hold to the same reference) for all three models.
#[tokio::test(flavor = "multi_thread")]
async fn mesh_greedy_tokens_equal_reference_for_every_fixture() {
    for (model, prompt) in [
        ("tiny-deepseek-v3", 1),
        ("tiny-deepseek-v3-fp8", 2),
        ("tiny-deepseek-v2-lite", 2),
    ] {
        let dir = fixture(model);
        let mesh = Mesh::start(Some(&dir), &["0-5", "6-10", "11-15"]);
        let (input, expected) = reference_greedy(model, prompt);
        let out = generate(
            &mesh.frontend_url(),
            tokens_request(&input, expected.len() as u32),
        )
        .await
        .expect("generate");
        assert_eq!(out.ids, expected, "{model}");
        assert_eq!(out.finish, v1::FinishReason::Length as i32);

        // The gate's expert load (the placement planner's input): every MoE layer but the last
        // routed the same number of rows, each to top_k experts, and the rows are the prompt's
        // and every generated token's but the last (whose KV is never needed); the last layer
        // routed only the rows whose output is read, one per generated token (the prompt fits
        // one step). A later sequence's cached prefix rows would not count.
        let files = moemesh_engine::ModelFiles::open(&dir).expect("open");
        let cfg = &files.config;
        let load = gate_info(&mesh.gate_url()).await.expect_load();
        let moe = cfg.moe_layers();
        assert_eq!(
            load.iter().map(|l| l.layer as usize).collect::<Vec<_>>(),
            moe,
            "{model}: a count for every MoE layer"
        );
        let last = cfg.num_hidden_layers - 1;
        for l in &load {
            let rows = if l.layer as usize == last {
                expected.len() as u64
            } else {
                (input.len() + expected.len() - 1) as u64
            };
            assert_eq!(l.tokens.len(), cfg.n_routed_experts, "{model}");
            assert_eq!(
                l.tokens.iter().sum::<u64>(),
                rows * cfg.num_experts_per_tok as u64,
                "{model} layer {}",
                l.layer
            );
        }

        // The in-process engine gives the same tokens.
        let engine = moemesh_engine::InProcessEngine::load(
            &files,
            &moemesh_engine::Device::Cpu,
            moemesh_engine::DType::F32,
        )
        .expect("load");
        let req = moemesh_engine::GenerationRequest {
            prompt_ids: input.clone(),
            sampling: Default::default(),
            max_new_tokens: expected.len(),
            stop: Vec::new(),
            ignore_eos: true,
            ..Default::default()
        };
        assert_eq!(
            engine
                .generate(&req, &mut |_| true)
                .expect("in-process")
                .token_ids,
            out.ids,
            "{model}"
        );
    }
}

/// A replica joins while requests stream, then the original is SIGKILLed: every request
/// completes with the reference tokens (failed expert calls are retried on the replica).
#[tokio::test(flavor = "multi_thread")]
async fn replica_takes_over_from_a_killed_worker_without_failing_requests() {
    let model = "tiny-deepseek-v3";
    let mut mesh = Mesh::start(Some(&fixture(model)), &["0-7", "8-15"]);
    let (input, expected) = reference_greedy(model, 2);
    let url = mesh.frontend_url();
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Traffic runs from before the replica joins until two batches after the kill.
    let traffic = {
        let (url, input, n, killed) = (
            url.clone(),
            input.clone(),
            expected.len() as u32,
            killed.clone(),
        );
        tokio::spawn(async move {
            let mut results = Vec::new();
            let mut after_kill = 0;
            while after_kill < 2 {
                if killed.load(std::sync::atomic::Ordering::SeqCst) {
                    after_kill += 1;
                }
                let batch: Vec<_> = (0..3)
                    .map(|_| generate(&url, tokens_request(&input, n)))
                    .collect();
                results.extend(futures::future::join_all(batch).await);
            }
            results
        })
    };
    let replica = mesh.add_worker("worker0-replica", "0-7", None);
    wait_until("the gate to accept the replica", || {
        gate_uses(&mesh, "worker0-replica")
    })
    .await;
    mesh.workers[0].0.kill();
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    let results = traffic.await.expect("traffic task");
    assert!(results.len() >= 6);
    for r in results {
        let out = r.expect("no request fails");
        assert_eq!(out.ids, expected);
    }
    // And after the kill, requests keep working on the replica alone.
    let out = generate(&url, tokens_request(&input, expected.len() as u32))
        .await
        .expect("after kill");
    assert_eq!(out.ids, expected);
    // The killed worker stayed listed until its lease expired, and the gate noticed it was
    // gone while it was listed: calls in flight on it were retried on the replica, or (when
    // none was in flight at the kill) its stream was found closed and the background reopen
    // failed, so no call went to it.
    let gate_log = mesh.gate.0.log_text();
    assert!(
        gate_log.contains("retrying on another replica")
            || gate_log.contains("cannot be reached; avoiding it"),
        "the gate detected the killed worker while it was listed:\n{gate_log}"
    );
    drop(replica);
}

/// A worker of another model (different fingerprint) is refused and logged; with experts 8-15
/// unserved, Generate fails fast with UNAVAILABLE naming a (layer, expert); a proper worker
/// brings serving back.
#[tokio::test(flavor = "multi_thread")]
async fn foreign_worker_is_refused_missing_expert_is_unavailable_and_serving_recovers() {
    let model = "tiny-deepseek-v3";
    let mesh = Mesh::start(Some(&fixture(model)), &["0-7"]);
    // Same directory name (so the same registry prefix), different config bytes: another model.
    let other = mesh.dir.path().join("other").join(model);
    std::fs::create_dir_all(&other).expect("dir");
    std::fs::copy(
        fixture(model).join("model.safetensors"),
        other.join("model.safetensors"),
    )
    .expect("copy");
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(model).join("config.json")).expect("cfg"),
    )
    .expect("json");
    cfg["rms_norm_eps"] = serde_json::json!(1e-5);
    std::fs::write(other.join("config.json"), cfg.to_string()).expect("write");
    let _foreign = mesh.add_worker("foreign", "8-15", Some(&other));
    let gate_log = mesh.gate.0.log.clone();
    wait_until("the gate to log the refusal", || {
        let log = std::fs::read_to_string(&gate_log).unwrap_or_default();
        async move { log.contains("refusing expert worker") && log.contains("foreign") }
    })
    .await;
    assert!(!gate_uses(&mesh, "foreign").await);

    let (input, expected) = reference_greedy(model, 1);
    let started = Instant::now();
    let err = generate(&mesh.frontend_url(), tokens_request(&input, 8))
        .await
        .err()
        .expect("must fail");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains("no live expert worker serves (layer "),
        "{}",
        err.message()
    );
    let expert: u32 = err
        .message()
        .rsplit("expert ")
        .next()
        .and_then(|s| s.trim_end_matches(')').split(')').next())
        .and_then(|s| s.parse().ok())
        .expect("names the expert");
    assert!((8..16).contains(&expert), "{}", err.message());
    println!("failed fast in {:?}: {}", started.elapsed(), err.message());

    let _good = mesh.add_worker("worker1", "8-15", None);
    wait_until("the gate to accept worker1", || gate_uses(&mesh, "worker1")).await;
    let out = generate(
        &mesh.frontend_url(),
        tokens_request(&input, expected.len() as u32),
    )
    .await
    .expect("recovered");
    assert_eq!(out.ids, expected);
}

/// etcd goes away for a few seconds while requests run: none fails. A worker started after
/// etcd returns is used (the original workers are then killed and requests still succeed).
#[tokio::test(flavor = "multi_thread")]
async fn etcd_outage_fails_no_request_and_a_later_worker_is_used() {
    let model = "tiny-deepseek-v3";
    let mut mesh = Mesh::start(Some(&fixture(model)), &["0-7", "8-15"]);
    let (input, expected) = reference_greedy(model, 0);
    let url = mesh.frontend_url();
    let n = expected.len() as u32;
    let traffic = {
        let (url, input) = (url.clone(), input.clone());
        tokio::spawn(async move {
            let mut out = Vec::new();
            let until = Instant::now() + Duration::from_secs(6);
            while Instant::now() < until {
                out.push(generate(&url, tokens_request(&input, n)).await);
            }
            out
        })
    };
    mesh.etcd.stop();
    // The outage itself lasts a few seconds by design; nothing waits on it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    mesh.etcd.restart();
    let results = traffic.await.expect("traffic");
    assert!(!results.is_empty());
    for r in results {
        assert_eq!(r.expect("no request fails during the outage").ids, expected);
    }
    let _late = mesh.add_worker("late", "0-15", None);
    wait_until("the gate to use the late worker", || {
        gate_uses(&mesh, "late")
    })
    .await;
    for w in mesh.workers.iter_mut() {
        w.0.kill();
    }
    let out = generate(&url, tokens_request(&input, n))
        .await
        .expect("served by the late worker");
    assert_eq!(out.ids, expected);
}

/// Bad requests get INVALID_ARGUMENT naming the field and the limit; the server lives on.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_invalid_argument_and_the_next_request_works() {
    let mesh = Mesh::start(None, &["0-15"]);
    let url = mesh.frontend_url();
    let chat = |role: &str| {
        Input::Chat(v1::ChatInput {
            messages: vec![v1::ChatMessage {
                role: role.into(),
                content: "hi".into(),
            }],
        })
    };
    let base = GenerateRequest {
        input: Some(Input::Prompt("Hello".into())),
        sampling: None,
        stopping: Some(v1::StoppingCriteria {
            max_new_tokens: Some(4),
            stop: Vec::new(),
            ignore_eos: false,
            ..Default::default()
        }),
        request_id: String::new(),
        cache_salt: String::new(),
    };
    let with = |f: &dyn Fn(&mut GenerateRequest)| {
        let mut r = base.clone();
        f(&mut r);
        r
    };
    let sampling = |t: f32, p: Option<f32>, k: u32| {
        Some(v1::SamplingParams {
            temperature: t,
            top_p: p,
            top_k: k,
            seed: None,
            ..Default::default()
        })
    };
    let cases: Vec<(GenerateRequest, &[&str])> = vec![
        (
            with(&|r| r.input = Some(Input::Prompt(String::new()))),
            &["prompt", "empty"],
        ),
        (
            with(&|r| r.input = Some(Input::Tokens(v1::TokenIds { ids: vec![5; 4096] }))),
            &["4096 tokens", "context length is 4096"],
        ),
        (
            with(&|r| r.stopping.as_mut().expect("s").max_new_tokens = Some(0)),
            &["max_new_tokens", "between 1 and 4096"],
        ),
        (
            with(&|r| r.stopping.as_mut().expect("s").max_new_tokens = Some(5000)),
            &["max_new_tokens", "4096", "5000"],
        ),
        (
            with(&|r| r.sampling = sampling(-0.5, None, 0)),
            &["temperature", ">= 0"],
        ),
        (
            with(&|r| r.sampling = sampling(1.0, Some(0.0), 0)),
            &["top_p", "(0, 1]"],
        ),
        (
            with(&|r| r.sampling = sampling(1.0, Some(1.5), 0)),
            &["top_p", "(0, 1]"],
        ),
        (
            with(&|r| r.sampling = sampling(1.0, None, 200_000)),
            &["top_k", "129280"],
        ),
        (
            with(&|r| r.input = Some(chat("wizard"))),
            &["role", "wizard", "system, user, assistant, tool"],
        ),
        (
            with(&|r| {
                r.input = Some(Input::Tokens(v1::TokenIds {
                    ids: vec![1, 129_280],
                }))
            }),
            &["tokens.ids[1]", "129280"],
        ),
        (
            with(&|r| r.input = None),
            &["input", "prompt, chat or tokens"],
        ),
    ];
    for (req, needles) in cases {
        let err = generate(&url, req).await.err().expect("must be rejected");
        assert_eq!(err.code(), Code::InvalidArgument, "{needles:?}: {err:?}");
        for n in needles {
            assert!(err.message().contains(n), "{needles:?}: {}", err.message());
        }
    }
    let ok = generate(&url, base.clone())
        .await
        .expect("a good request after the bad ones");
    assert!(!ok.ids.is_empty() && ok.ids.len() <= 4);
}

/// A client that cancels mid-stream frees its sequence's KV on the gate; the other stream
/// runs to its end unaffected.
#[tokio::test(flavor = "multi_thread")]
async fn cancelled_stream_frees_its_kv_and_others_continue() {
    let model = "tiny-deepseek-v3";
    let mesh = Mesh::start(Some(&fixture(model)), &["0-15"]);
    let url = mesh.frontend_url();
    let (input, _) = reference_greedy(model, 1);
    let long = 200u32;
    let mut a = GenerationClient::connect(url.clone())
        .await
        .expect("client");
    let mut stream_a = a
        .generate(tokens_request(&input, long))
        .await
        .expect("a")
        .into_inner();
    let b = tokio::spawn({
        let (url, input) = (url.clone(), input.clone());
        async move { generate(&url, tokens_request(&input, long)).await }
    });
    for _ in 0..3 {
        stream_a
            .message()
            .await
            .expect("a streams")
            .expect("a token");
    }
    wait_until("both sequences on the gate", || async {
        gate_info(&mesh.gate_url()).await.live_sequences == 2
    })
    .await;
    drop(stream_a);
    drop(a);
    wait_until(
        "the cancelled sequence's KV to be freed while the other runs",
        || async {
            let info = gate_info(&mesh.gate_url()).await;
            info.live_sequences == 1 && !b.is_finished()
        },
    )
    .await;
    let out = b.await.expect("task").expect("b completes");
    assert_eq!(out.ids.len(), long as usize);
    assert_eq!(out.finish, v1::FinishReason::Length as i32);
    wait_until("all KV freed", || async {
        gate_info(&mesh.gate_url()).await.live_sequences == 0
    })
    .await;
}

/// `moemesh bench` drives concurrent requests and accounts for every one of them.
#[tokio::test(flavor = "multi_thread")]
async fn bench_reports_every_request_as_a_table_and_as_json() {
    let mesh = Mesh::start(Some(&fixture("tiny-deepseek-v3")), &["0-15"]);
    // `moemesh bench` against the mesh with 5-token prompts and 6 new tokens, plus `extra`.
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench".to_string(),
            "--addr".into(),
            mesh.frontend.1.clone(),
            "--prompt-len".into(),
            "5".into(),
            "--output-len".into(),
            "6".into(),
            "--json".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                moemesh_tests::moemesh(&args)
            })
            .await
            .expect("bench process")
        }
    };
    let out = bench(&["--concurrency", "3", "--requests", "7"]).await;
    let lines = moemesh_tests::json_lines(&out);
    let r = &lines[0];
    assert_eq!(r["requests"], 7);
    assert_eq!(r["succeeded"], 7, "{r}");
    // One warm-up wave (3 requests) ran first and is not counted.
    assert_eq!(r["warmup_waves"], 1, "{r}");
    assert_eq!(r["concurrency"], 3);
    assert!(r["output_tokens_per_s"].as_f64().expect("rate") > 0.0);
    for key in ["ttft_ms", "itl_ms"] {
        for p in ["p50", "p90", "p99"] {
            assert!(
                r[key][p].as_f64().expect("percentile") > 0.0,
                "{key}.{p}: {r}"
            );
        }
    }
    assert_eq!(r["sampling"], "greedy");

    // Sampled requests: the frontend accepts the flags' parameters and every request completes.
    let out = bench(&[
        "--concurrency",
        "2",
        "--requests",
        "4",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
    ])
    .await;
    let r = &moemesh_tests::json_lines(&out)[0];
    assert_eq!(r["succeeded"], 4, "{r}");
    assert_eq!(r["sampling"]["top_k"], 50, "{r}");

    // A sampling flag out of range is refused before any request, naming the flag and its range.
    let out = bench(&["--top-p", "1.5"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--top-p must be in (0, 1]"), "{err}");
    let out = bench(&["--temperature", "0.5", "--top-k", "1000000"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--top-k must be at most the vocabulary size"),
        "{err}"
    );
}

/// `moemesh rebalance --plan` reads a gate's measured expert load and workers and prints a plan
/// that holds every expert, gives each worker at most its room, and leaves the busiest worker no
/// busier than today.
#[tokio::test(flavor = "multi_thread")]
async fn rebalance_plans_from_the_gates_measured_load() {
    let model = "tiny-deepseek-v3";
    let mesh = Mesh::start(Some(&fixture(model)), &["0-11", "12-15"]);
    for prompt in 0..3 {
        let (input, expected) = reference_greedy(model, prompt);
        let out = generate(
            &mesh.frontend_url(),
            tokens_request(&input, expected.len() as u32),
        )
        .await
        .expect("generate");
        assert_eq!(out.ids, expected);
    }
    let gate = mesh.gate_url();
    let addr = gate.trim_start_matches("http://").to_string();
    let rebalance = |extra: &'static [&'static str]| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(moemesh_tests::moemesh_bin())
                .args(["rebalance", "--addr", &addr, "--json", "--spare", "2"])
                .args(extra)
                .output()
                .expect("run moemesh rebalance");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("one JSON object")
        })
    };
    let plan = rebalance(&[]).await.expect("join");
    let cumulative = rebalance(&["--cumulative"]).await.expect("join");
    // The default plans from the gate's window (60 s, longer than this test so far), which
    // therefore holds every token routed since start.
    assert_eq!(plan["load"], "in the last 60s", "{plan}");
    assert_eq!(cumulative["load"], "since the gate started", "{cumulative}");
    assert!(plan["routed_tokens"].as_u64().unwrap_or(0) > 0, "{plan}");
    assert_eq!(plan["routed_tokens"], cumulative["routed_tokens"]);
    let workers = plan["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2, "{plan}");
    // Per MoE layer: every expert held by some worker, no worker over its room there.
    let mut held: std::collections::BTreeMap<String, std::collections::BTreeSet<u64>> =
        Default::default();
    for w in workers {
        let layers = w["layers_planned"].as_object().expect("layers planned");
        assert!(!layers.is_empty(), "{w}");
        for (layer, planned) in layers {
            let planned = planned.as_array().expect("planned");
            // Room: an even share of the 16 experts over 2 workers, plus --spare 2.
            assert!(
                planned.len() <= 16 / 2 + 2,
                "over its room in layer {layer}: {w}"
            );
            held.entry(layer.clone())
                .or_default()
                .extend(planned.iter().filter_map(|e| e.as_u64()));
        }
    }
    for (layer, experts) in &held {
        assert_eq!(
            *experts,
            (0..16).collect(),
            "layer {layer}: every expert held: {plan}"
        );
    }
    // Today's shards are 12 and 4 experts: the plan evens every layer out, so the step (each
    // layer's busiest worker, summed) shrinks.
    let (now, planned) = (
        plan["step_tokens_now"].as_f64().expect("now"),
        plan["step_tokens_planned"].as_f64().expect("planned"),
    );
    assert!(
        planned < now,
        "planned {planned} is not below today's {now}: {plan}"
    );
}
