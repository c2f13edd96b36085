//! Distributed tracing as an operator sees it in a trace backend: a mesh whose processes export
//! to an in-test OTLP collector (`OTEL_EXPORTER_OTLP_ENDPOINT`), one Generate, and the one trace
//! it makes across the frontend, the gate and the expert workers.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use moemesh_proto::v1::generate_request::Input;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{self, GenerateRequest};
use moemesh_tests::fixture;
use moemesh_tests::mesh::{Mesh, MeshOpts};
use moemesh_tests::otlp::{Collector, SpanRecord};

const REQUEST_ID: &str = "trace-me-1";

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn named<'a>(spans: &'a [SpanRecord], service: &str, name: &str) -> Vec<&'a SpanRecord> {
    spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_generate_is_one_trace_across_frontend_gate_and_experts() {
    let dir = fixture("tiny-deepseek-v3");
    let files = moemesh_engine::ModelFiles::open(&dir).expect("fixture");
    let moe_layers = files.config.moe_layers().len();
    let collector = Collector::start().await;
    let opts = MeshOpts {
        // Gates and workers send their spans every 50 ms. The frontend's batch delay is so long
        // that its spans can only arrive through the flush at shutdown, which this checks too.
        env: env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ]),
        frontend_env: env(&[("OTEL_BSP_SCHEDULE_DELAY", "600000")]),
        ..MeshOpts::default()
    };
    let mut mesh = Mesh::start_opts(Some(&dir), &["0-7", "8-15"], &opts);

    let prompt = [1u32, 2, 3];
    let new_tokens = 4usize;
    let mut client = GenerationClient::connect(mesh.frontend_url())
        .await
        .expect("frontend reachable");
    let mut stream = client
        .generate(GenerateRequest {
            input: Some(Input::Tokens(v1::TokenIds {
                ids: prompt.to_vec(),
            })),
            sampling: None,
            stopping: Some(v1::StoppingCriteria {
                max_new_tokens: Some(new_tokens as u32),
                stop: Vec::new(),
                ignore_eos: true,
                ..Default::default()
            }),
            request_id: REQUEST_ID.into(),
            cache_salt: String::new(),
        })
        .await
        .expect("generate")
        .into_inner();
    let mut got = 0;
    while let Some(m) = stream.message().await.expect("stream") {
        got += m.token_ids.len();
    }
    assert_eq!(got, new_tokens);

    // One prefill step and then one decode step per further token; the gate's and workers'
    // spans come in first. Every dispatch has its worker's span once both have exported. A
    // process's export batches may arrive out of order (a step's span before its children's),
    // so the wait is for every step's sampling span and at least one dispatch per MoE layer of
    // every step too, not just for the step spans.
    let steps = new_tokens;
    let wait = Duration::from_secs(30);
    collector
        .wait_for(wait, |spans| {
            let dispatches = named(spans, "moemesh-gate", "expert_dispatch");
            let forwards = named(spans, "moemesh-expert", "expert_forward").len();
            let g_steps = named(spans, "moemesh-gate", "step");
            let every_step_dispatched = g_steps.iter().all(|g| {
                dispatches
                    .iter()
                    .filter(|d| d.parent_span_id == g.span_id)
                    .count()
                    >= moe_layers
            });
            (g_steps.len() == steps
                && named(spans, "moemesh-gate", "sampling").len() == steps
                && every_step_dispatched
                && forwards == dispatches.len())
            .then_some(())
        })
        .await
        .unwrap_or_else(|spans| panic!("gate and worker spans did not arrive: {spans:#?}"));
    assert!(
        named(&collector.spans(), "moemesh-frontend", "generate").is_empty(),
        "the frontend exported before its shutdown flush"
    );

    // SIGTERM: the frontend flushes its spans on the way out.
    let status = mesh
        .frontend
        .0
        .terminate()
        .expect("the frontend exits on SIGTERM");
    assert!(status.success(), "frontend exit: {status}");
    let root = collector
        .wait_for(wait, |spans| {
            named(spans, "moemesh-frontend", "generate")
                .into_iter()
                .find(|s| s.attr("request_id") == Some(REQUEST_ID))
                .cloned()
        })
        .await
        .unwrap_or_else(|spans| panic!("no generate span after the shutdown flush: {spans:#?}"));

    let all = collector.spans();
    let trace: Vec<&SpanRecord> = all.iter().filter(|s| s.trace_id == root.trace_id).collect();
    let by_id: BTreeMap<&str, &SpanRecord> =
        trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from(["moemesh-frontend", "moemesh-gate", "moemesh-expert"])
    );
    // The root is the frontend's Generate span; every other span's parent is in the trace.
    assert!(root.parent_span_id.is_empty(), "{root:?}");
    for s in &trace {
        if s.span_id != root.span_id {
            assert!(
                by_id.contains_key(s.parent_span_id.as_str()),
                "{} ({}) has a parent outside the trace: {s:?}",
                s.name,
                s.service
            );
        }
    }
    // Gates and workers start no traces of their own: all their spans are in this one.
    for s in &all {
        if s.service != "moemesh-frontend" {
            assert_eq!(s.trace_id, root.trace_id, "a stray trace: {s:?}");
        }
    }
    let mut census: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for s in &trace {
        *census
            .entry((s.service.as_str(), s.name.as_str()))
            .or_default() += 1;
    }
    eprintln!("trace {}: {census:?}", root.trace_id);
    let parent = |s: &SpanRecord| by_id[s.parent_span_id.as_str()];
    let in_trace = |service: &str, name: &str| -> Vec<&SpanRecord> {
        trace
            .iter()
            .copied()
            .filter(|s| s.service == service && s.name == name)
            .collect()
    };

    // Frontend: the request's attributes, tokenisation and queueing, one span per step.
    assert_eq!(root.attr("prompt_tokens"), Some("3"));
    assert_eq!(
        root.attr("completion_tokens"),
        Some(new_tokens.to_string().as_str())
    );
    assert_eq!(root.attr("finish_reason"), Some("length"));
    assert_eq!(root.attr("grpc_code"), Some("Ok"));
    let ttft: f64 = root
        .attr("ttft_ms")
        .and_then(|t| t.parse().ok())
        .expect("a ttft_ms attribute");
    assert!(ttft > 0.0, "{ttft}");
    for name in ["tokenize", "queue"] {
        let s = in_trace("moemesh-frontend", name);
        assert_eq!(s.len(), 1, "{name}");
        assert_eq!(s[0].parent_span_id, root.span_id, "{name}");
    }
    let f_steps = in_trace("moemesh-frontend", "step");
    assert_eq!(f_steps.len(), steps);
    let phases: Vec<&str> = f_steps.iter().filter_map(|s| s.attr("phase")).collect();
    assert_eq!(phases.iter().filter(|p| **p == "prefill").count(), 1);
    assert_eq!(phases.iter().filter(|p| **p == "decode").count(), steps - 1);
    assert!(f_steps.iter().all(|s| s.parent_span_id == root.span_id));

    // Gate: each step under its frontend step; sampling and every layer's dispatch per worker
    // under the gate's step.
    let g_steps = in_trace("moemesh-gate", "step");
    assert_eq!(g_steps.len(), steps);
    let f_parents: BTreeSet<&str> = g_steps.iter().map(|s| s.parent_span_id.as_str()).collect();
    assert_eq!(f_parents.len(), steps, "one gate step per frontend step");
    assert!(
        g_steps
            .iter()
            .all(|s| parent(s).name == "step" && parent(s).service == "moemesh-frontend")
    );
    let sampling = in_trace("moemesh-gate", "sampling");
    assert_eq!(sampling.len(), steps);
    assert!(
        sampling
            .iter()
            .all(|s| parent(s).service == "moemesh-gate" && parent(s).name == "step")
    );
    let dispatches = in_trace("moemesh-gate", "expert_dispatch");
    for g in &g_steps {
        let mine: Vec<&&SpanRecord> = dispatches
            .iter()
            .filter(|d| d.parent_span_id == g.span_id)
            .collect();
        // Each MoE layer calls one or both workers.
        assert!(
            (moe_layers..=2 * moe_layers).contains(&mine.len()),
            "{} dispatches in a step of {moe_layers} MoE layers",
            mine.len()
        );
        let layers: BTreeSet<&str> = mine.iter().filter_map(|d| d.attr("layer")).collect();
        assert_eq!(layers.len(), moe_layers);
    }
    assert_eq!(
        dispatches.len(),
        dispatches
            .iter()
            .filter(|d| parent(d).service == "moemesh-gate")
            .count()
    );

    // Workers: one span per call, each the child of the gate's dispatch span for it.
    let forwards = in_trace("moemesh-expert", "expert_forward");
    assert_eq!(forwards.len(), dispatches.len());
    let mut per_dispatch: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &forwards {
        let d = parent(f);
        assert_eq!(
            (d.service.as_str(), d.name.as_str()),
            ("moemesh-gate", "expert_dispatch")
        );
        assert_eq!(d.attr("layer"), f.attr("layer"));
        assert_eq!(d.attr("worker"), f.attr("worker"));
        *per_dispatch.entry(d.span_id.as_str()).or_default() += 1;
    }
    assert!(per_dispatch.values().all(|&n| n == 1));
}
