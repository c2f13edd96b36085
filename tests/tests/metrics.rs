//! Prometheus metrics as an operator scrapes them: a mesh with `--metrics-listen` on every
//! process, known traffic through the public API, then each process's `/metrics`.

use moemesh_proto::v1::GenerateRequest;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_tests::fixture;
use moemesh_tests::mesh::{Mesh, Sample, metric_sum, parse_metrics, scrape};
use moemesh_tests::tokens_request;
use tonic::Code;

/// Runs one Generate to its end; the number of tokens streamed.
async fn generate(url: &str, req: GenerateRequest) -> Result<usize, tonic::Status> {
    let mut client = GenerationClient::connect(url.to_string())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut stream = client.generate(req).await?.into_inner();
    let mut n = 0;
    while let Some(m) = stream.message().await? {
        n += m.token_ids.len();
    }
    Ok(n)
}

fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    metric_sum(samples, name, with)
        .unwrap_or_else(|| panic!("no sample of {name} with {with:?} in the scrape"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scrape_after_known_traffic_shows_the_expected_counts() {
    let dir = fixture("tiny-deepseek-v3");
    let files = moemesh_engine::ModelFiles::open(&dir).expect("fixture");
    let moe_layers = files.config.moe_layers().len() as f64;
    let top_k = files.config.num_experts_per_tok as f64;
    let mesh = Mesh::start_with_metrics(Some(&dir), &["0-7", "8-15"]);

    // Three requests run concurrently (so they share steps); each prompt of P tokens making N
    // tokens sends P + N - 1 tokens through the gate (the last token is never fed back).
    let prompts: [(&[u32], u32); 3] = [(&[1, 2, 3], 5), (&[7, 8, 9, 10, 11], 4), (&[42], 6)];
    let url = mesh.frontend_url();
    let runs = prompts
        .iter()
        .map(|(ids, n)| generate(&url, tokens_request(ids, *n)));
    for (r, (_, n)) in futures::future::join_all(runs).await.iter().zip(&prompts) {
        assert_eq!(r.as_ref().ok(), Some(&(*n as usize)), "{r:?}");
    }
    // One invalid request: an empty prompt.
    let err = generate(&url, tokens_request(&[], 4))
        .await
        .expect_err("an empty prompt is refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let generated: f64 = prompts.iter().map(|(_, n)| *n as f64).sum();
    let prompt_tokens: f64 = prompts.iter().map(|(p, _)| p.len() as f64).sum();
    let routed_tokens = prompt_tokens + generated - prompts.len() as f64;

    // Every count below was recorded before the answer that carried it left the process, so
    // the client having its answers is the readiness signal: no waiting.
    let metrics_of = |p: &moemesh_tests::mesh::Proc| {
        let addr = p
            .metrics
            .as_deref()
            .unwrap_or_else(|| panic!("{}'s ready line has no metrics address", p.name));
        parse_metrics(&scrape(addr))
    };

    let text = scrape(mesh.frontend.0.metrics.as_deref().expect("metrics address"));
    assert!(
        text.contains("# TYPE moemesh_frontend_requests_total counter")
            && text.contains(
                "# HELP moemesh_frontend_requests_total Generate calls by final gRPC status"
            ),
        "{text}"
    );
    let f = metrics_of(&mesh.frontend.0);
    assert_eq!(
        sum(&f, "moemesh_frontend_requests_total", &[("code", "Ok")]),
        3.0
    );
    assert_eq!(
        sum(
            &f,
            "moemesh_frontend_requests_total",
            &[("code", "InvalidArgument")]
        ),
        1.0
    );
    assert_eq!(sum(&f, "moemesh_frontend_requests_total", &[]), 4.0);
    assert_eq!(
        sum(&f, "moemesh_frontend_generated_tokens_total", &[]),
        generated
    );
    assert_eq!(
        sum(&f, "moemesh_frontend_prompt_tokens_total", &[]),
        prompt_tokens
    );
    // One first token per request, and every other token one inter-token gap.
    assert_eq!(
        sum(
            &f,
            "moemesh_frontend_time_to_first_token_seconds_count",
            &[]
        ),
        3.0
    );
    assert_eq!(
        sum(
            &f,
            "moemesh_frontend_inter_token_latency_seconds_count",
            &[]
        ),
        generated - 3.0
    );
    assert_eq!(
        sum(
            &f,
            "moemesh_frontend_time_to_first_token_seconds_bucket",
            &[("le", "+Inf")]
        ),
        3.0
    );
    let gate = mesh.gate.1.as_str();
    assert_eq!(
        sum(&f, "moemesh_frontend_queue_depth", &[("gate", gate)]),
        0.0
    );
    assert_eq!(
        sum(&f, "moemesh_frontend_running_sequences", &[("gate", gate)]),
        0.0
    );
    assert!(
        sum(
            &f,
            "moemesh_frontend_step_duration_seconds_count",
            &[("gate", gate)]
        ) >= 1.0
    );
    assert_eq!(
        sum(&f, "moemesh_registry_members", &[("role", "gate")]),
        1.0
    );

    let g = metrics_of(&mesh.gate.0);
    assert_eq!(
        sum(&g, "moemesh_gate_step_tokens_total", &[]),
        routed_tokens
    );
    assert!(sum(&g, "moemesh_gate_steps_total", &[("outcome", "ok")]) >= 1.0);
    assert_eq!(
        metric_sum(&g, "moemesh_gate_steps_total", &[("outcome", "error")]),
        None
    );
    assert!(sum(&g, "moemesh_gate_step_duration_seconds_count", &[]) >= 1.0);
    // Each routed token goes to top_k experts in every MoE layer but the last, which routes
    // only the rows whose output is read: here the rows that sampled a token (every prompt
    // fits one step, so no step samples nothing).
    let last = files.config.num_hidden_layers - 1;
    assert_eq!(
        files.config.moe_layers().last(),
        Some(&last),
        "the last layer is MoE"
    );
    assert_eq!(
        sum(&g, "moemesh_gate_expert_tokens_total", &[]),
        routed_tokens * top_k * (moe_layers - 1.0) + generated * top_k
    );
    for layer in files.config.moe_layers() {
        let rows = if layer == last {
            generated
        } else {
            routed_tokens
        };
        assert_eq!(
            sum(
                &g,
                "moemesh_gate_expert_tokens_total",
                &[("layer", &layer.to_string())]
            ),
            rows * top_k,
            "layer {layer}"
        );
        // Compact: per layer, never per expert; the busiest expert over the mean is 1 or more.
        let imbalance = sum(
            &g,
            "moemesh_gate_expert_load_imbalance",
            &[("layer", &layer.to_string())],
        );
        assert!(imbalance >= 1.0, "layer {layer}: {imbalance}");
    }
    assert!(
        g.iter()
            .all(|s| s.name != "moemesh_gate_expert_tokens_total"
                || s.labels.iter().all(|(k, _)| k != "expert")),
        "no per-expert series on the gate"
    );
    let total = sum(&g, "moemesh_gate_kv_blocks_total", &[]);
    let free = sum(&g, "moemesh_gate_kv_blocks_free", &[]);
    let used = sum(&g, "moemesh_gate_kv_blocks_used", &[]);
    assert!(total > 0.0 && free + used == total, "{total} {free} {used}");
    assert_eq!(sum(&g, "moemesh_gate_expert_workers", &[]), 2.0);
    assert_eq!(sum(&g, "moemesh_gate_missing_experts", &[]), 0.0);
    assert_eq!(
        sum(&g, "moemesh_registry_members", &[("role", "expert")]),
        2.0
    );
    for (w, _) in &mesh.workers {
        assert!(
            sum(
                &g,
                "moemesh_gate_expert_dispatch_duration_seconds_count",
                &[("worker", &w.name)]
            ) >= 1.0,
            "{}",
            w.name
        );
    }
    assert!(metric_sum(&g, "moemesh_gate_expert_retries_total", &[]).is_none());

    // The workers computed exactly the pairs the gate routed, each only its own experts.
    let mut worker_pairs = 0.0;
    for (w, _) in &mesh.workers {
        let m = metrics_of(w);
        worker_pairs += sum(&m, "moemesh_expert_tokens_total", &[]);
        assert!(sum(&m, "moemesh_expert_forward_calls_total", &[("code", "Ok")]) >= 1.0);
        let lo = if w.name == "worker0" { 0 } else { 8 };
        for s in m.iter().filter(|s| s.name == "moemesh_expert_tokens_total") {
            let e: u32 = s
                .labels
                .iter()
                .find(|(k, _)| k == "expert")
                .and_then(|(_, v)| v.parse().ok())
                .expect("an expert label");
            assert!((lo..lo + 8).contains(&e), "{} computed expert {e}", w.name);
        }
    }
    assert_eq!(
        worker_pairs,
        routed_tokens * top_k * (moe_layers - 1.0) + generated * top_k
    );
}
