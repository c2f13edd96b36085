//! The gate's prefix cache through the whole mesh (real etcd, workers, gate and frontend): prompts
//! that share a prefix give the same greedy tokens as the in-process engine (which has no
//! prefix cache), report the prompt tokens the gate took from its cache, keep salted requests
//! apart, and a small pool evicts; with `--prefix-cache false` nothing is cached.

use moemesh_proto::v1::generate_request::Input;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{self, GenerateRequest};
use moemesh_tests::mesh::{Mesh, MeshOpts, metric_sum, parse_metrics, scrape};
use moemesh_tests::{fixture, in_process_engine, in_process_tokens};

const NEW: u32 = 6;

fn request(ids: &[u32], salt: &str) -> GenerateRequest {
    GenerateRequest {
        input: Some(Input::Tokens(v1::TokenIds { ids: ids.to_vec() })),
        sampling: None,
        stopping: Some(v1::StoppingCriteria {
            max_new_tokens: Some(NEW),
            stop: Vec::new(),
            ignore_eos: true,
            ..Default::default()
        }),
        request_id: String::new(),
        cache_salt: salt.into(),
    }
}

/// The generated ids and the final usage's cached prompt tokens.
async fn run(url: &str, ids: &[u32], salt: &str) -> (Vec<u32>, u32) {
    run_as(url, ids, salt, None).await
}

/// [`run`] with `authorization: Bearer <key>` when a key is given.
async fn run_as(url: &str, ids: &[u32], salt: &str, key: Option<&str>) -> (Vec<u32>, u32) {
    let mut c = GenerationClient::connect(url.to_string())
        .await
        .expect("client");
    let mut req = tonic::Request::new(request(ids, salt));
    if let Some(k) = key {
        let value = format!("Bearer {k}").parse().expect("ascii key");
        req.metadata_mut().insert("authorization", value);
    }
    let s = c.generate(req).await.expect("generate").into_inner();
    finish((s, Vec::new())).await
}

fn prompt(seed: u32, len: u32) -> Vec<u32> {
    (0..len).map(|k| 3 + (seed + 7 * k) % 90).collect()
}

fn mesh(gate_args: &[&str]) -> Mesh {
    mesh_with(gate_args, &[])
}

fn mesh_with(gate_args: &[&str], frontend_args: &[&str]) -> Mesh {
    let mut args: Vec<String> = gate_args.iter().map(|a| a.to_string()).collect();
    args.extend(["--metrics-listen".into(), "127.0.0.1:0".into()]);
    let opts = MeshOpts {
        gate_args: args,
        frontend_args: frontend_args.iter().map(|a| a.to_string()).collect(),
        ..MeshOpts::default()
    };
    Mesh::start_opts(Some(&fixture("tiny-deepseek-v3")), &["0-7", "8-15"], &opts)
}

fn gate_metric(mesh: &Mesh, name: &str) -> f64 {
    let addr = mesh
        .gate
        .0
        .metrics
        .as_deref()
        .expect("gate metrics address");
    metric_sum(&parse_metrics(&scrape(addr)), name, &[]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_prefixes_are_served_from_the_cache_with_unchanged_tokens_salts_apart_and_eviction()
{
    // 12 blocks of 16 tokens: room for the small prompts' cached blocks (seven of them, and
    // five free), and a long prompt that needs all 12 evicts every one.
    let mesh = mesh(&["--kv-blocks", "12"]);
    let url = mesh.frontend_url();
    let engine = in_process_engine("tiny-deepseek-v3");
    let expect = |p: &[u32]| in_process_tokens(&engine, p, None, NEW as usize);

    let a = prompt(1, 40);
    // Shares 36 tokens with `a`: two whole blocks, then differs in the middle of the third.
    let mut b = a[..36].to_vec();
    b.extend(prompt(50, 9));
    let long = prompt(7, 180);

    // (what, prompt, salt, cached prompt tokens the usage must report)
    let cases: Vec<(&str, &[u32], &str, u32)> = vec![
        ("a, first", &a, "", 0),
        ("b, differs mid-block", &b, "", 32),
        // Never the last prompt token: it is computed so that there are logits.
        ("a, again", &a, "", 32),
        ("a, salted t1", &a, "t1", 0),
        ("a, salted t1 again", &a, "t1", 32),
        ("a, salted t2", &a, "t2", 0),
        ("a, unsalted", &a, "", 32),
        // 180 + 6 tokens need the whole pool: every cached block goes.
        ("long", &long, "", 0),
        ("a, after the long prompt", &a, "", 0),
    ];
    for (what, p, salt, cached) in cases {
        let (tokens, got) = run(&url, p, salt).await;
        assert_eq!(tokens, expect(p), "{what}: greedy tokens");
        assert_eq!(got, cached, "{what}: cached prompt tokens");
    }
    let evictions = gate_metric(&mesh, "moemesh_gate_prefix_cache_evictions_total");
    assert!(evictions >= 7.0, "evictions: {evictions}");
    let hits = gate_metric(&mesh, "moemesh_gate_prefix_cache_hit_tokens_total");
    assert_eq!(hits, 4.0 * 32.0);
    let blocks = gate_metric(&mesh, "moemesh_gate_prefix_cache_hit_blocks_total");
    assert_eq!(blocks, 8.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_cache_off_every_prompt_is_computed() {
    let mesh = mesh(&["--prefix-cache", "false"]);
    let url = mesh.frontend_url();
    let engine = in_process_engine("tiny-deepseek-v3");
    let a = prompt(1, 40);
    let expect = in_process_tokens(&engine, &a, None, NEW as usize);
    for _ in 0..2 {
        assert_eq!(run(&url, &a, "").await, (expect.clone(), 0));
    }
    assert_eq!(
        gate_metric(&mesh, "moemesh_gate_prefix_cache_hit_blocks_total"),
        0.0
    );
}

/// With API keys on, each key has its own cache space: a prompt one key sent is cached for that
/// key only, whatever `cache_salt` the other sends.
#[tokio::test(flavor = "multi_thread")]
async fn each_api_key_has_its_own_cache_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        "[[key]]\nid = \"team-a\"\nkey = \"team-a-secret-0123456789\"\n\n\
         [[key]]\nid = \"team-b\"\nkey = \"team-b-secret-0123456789\"\n",
    )
    .expect("keys file");
    let keys = keys.display().to_string();
    let mesh = mesh_with(&[], &["--api-keys-file", &keys]);
    let url = mesh.frontend_url();
    let (a, b) = (
        Some("team-a-secret-0123456789"),
        Some("team-b-secret-0123456789"),
    );
    let p = prompt(1, 40);
    let first = run_as(&url, &p, "", a).await;
    assert_eq!(first.1, 0);
    // The other key, with no salt and with the salt the key id would make: nothing cached.
    assert_eq!(run_as(&url, &p, "", b).await.1, 0);
    assert_eq!(run_as(&url, &p, "team-a", b).await.1, 0);
    // The same key again: its own blocks.
    let again = run_as(&url, &p, "", a).await;
    assert_eq!(again, (first.0, 32));
}

/// [`run`] of `new` tokens, as a stream whose first message has arrived (the sequence is on its
/// gate and counts in its load); [`finish`] reads the rest.
async fn open(
    url: &str,
    ids: &[u32],
    new: u32,
) -> (tonic::Streaming<v1::GenerateResponse>, Vec<u32>) {
    let mut c = GenerationClient::connect(url.to_string())
        .await
        .expect("client");
    let mut req = request(ids, "");
    if let Some(s) = req.stopping.as_mut() {
        s.max_new_tokens = Some(new);
    }
    let mut s = c.generate(req).await.expect("generate").into_inner();
    let first = s.message().await.expect("stream").expect("a first token");
    (s, first.token_ids)
}

/// The rest of a stream after the tokens `out` already read: every token and the cached prompt
/// tokens.
async fn finish(
    (mut s, mut out): (tonic::Streaming<v1::GenerateResponse>, Vec<u32>),
) -> (Vec<u32>, u32) {
    let mut cached = None;
    while let Some(m) = s.message().await.expect("stream") {
        out.extend(m.token_ids);
        if let Some(u) = m.usage {
            cached = Some(u.cached_prompt_tokens);
        }
    }
    (out, cached.expect("the last message carries usage"))
}

/// A small pool with a host tier: the blocks a long prompt evicts go to host memory, and the
/// next prompt that starts with them takes them back (reported as cached, counted by the host
/// tier's metrics) with the same tokens as the in-process engine.
#[tokio::test(flavor = "multi_thread")]
async fn blocks_evicted_from_a_small_pool_come_back_from_the_host_tier() {
    let mesh = mesh(&["--kv-blocks", "12", "--host-kv-cache-gb", "0.01"]);
    let url = mesh.frontend_url();
    let engine = in_process_engine("tiny-deepseek-v3");
    let expect = |p: &[u32]| in_process_tokens(&engine, p, None, NEW as usize);
    let a = prompt(1, 40);
    let long = prompt(7, 180);
    assert_eq!(run(&url, &a, "").await, (expect(&a), 0), "a, first");
    // 180 + 6 tokens need the whole pool: `a`'s cached blocks leave it for the host tier.
    assert_eq!(run(&url, &long, "").await, (expect(&long), 0), "long");
    assert!(gate_metric(&mesh, "moemesh_gate_prefix_cache_evictions_total") >= 2.0);
    let to_host = gate_metric(&mesh, "moemesh_gate_prefix_cache_host_bytes_to_host_total");
    assert!(to_host > 0.0, "evicted blocks were copied to the host tier");
    // `a` again: both full blocks back from the host tier, nothing recomputed.
    assert_eq!(
        run(&url, &a, "").await,
        (expect(&a), 32),
        "a, from the host tier"
    );
    assert_eq!(
        gate_metric(&mesh, "moemesh_gate_prefix_cache_host_hit_blocks_total"),
        2.0
    );
    assert_eq!(
        gate_metric(&mesh, "moemesh_gate_prefix_cache_host_hit_tokens_total"),
        32.0
    );
    assert!(
        gate_metric(
            &mesh,
            "moemesh_gate_prefix_cache_host_bytes_to_device_total"
        ) > 0.0
    );
    assert!(gate_metric(&mesh, "moemesh_gate_prefix_cache_host_blocks") >= 2.0);
}

/// A pool too small for four sequences at once, with a host tier: the newest sequence is
/// preempted, its full blocks (prompt and generated tokens alike) go to the pool's cache and, as
/// the others grow, on to the host tier; when it is prefilled again it takes them back from
/// there instead of computing them, and every sequence ends with the tokens it has alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_preempted_sequence_resumes_from_the_host_tier_with_unchanged_tokens() {
    const LONG: u32 = 60;
    let mesh = mesh(&["--kv-blocks", "12", "--host-kv-cache-gb", "0.01"]);
    let url = mesh.frontend_url();
    let engine = in_process_engine("tiny-deepseek-v3");
    // 4 × (20 + 60) tokens need 20 blocks of 16; the pool holds 12.
    let cases: Vec<Vec<u32>> = (0..4u32).map(|i| prompt(11 + 13 * i, 20)).collect();
    let handles: Vec<_> = cases
        .iter()
        .map(|p| {
            let (url, p) = (url.clone(), p.clone());
            tokio::spawn(async move { finish(open(&url, &p, LONG).await).await })
        })
        .collect();
    for (h, p) in handles.into_iter().zip(&cases) {
        let (got, _) = h.await.expect("task");
        assert_eq!(got, in_process_tokens(&engine, p, None, LONG as usize));
    }
    assert!(
        mesh.frontend.0.log_text().contains("preempting"),
        "the pool forced a preemption"
    );
    assert!(
        gate_metric(&mesh, "moemesh_gate_prefix_cache_host_bytes_to_host_total") > 0.0,
        "blocks went to the host tier"
    );
    assert!(
        gate_metric(&mesh, "moemesh_gate_prefix_cache_host_hit_blocks_total") >= 1.0,
        "a resumed sequence took blocks back from the host tier"
    );
}

/// Two gates: a request goes to the gate that prefilled its prefix, even when the other gate is
/// as idle. Two prompt families are placed on different gates (the second arrives while the
/// first runs, so least-loaded placement spreads them); their follow-ups, sent one at a time to
/// two idle gates, each find their family's blocks (plain least-loaded placement would put both
/// on the same gate, and one would miss), with the single-gate engine's tokens.
#[tokio::test(flavor = "multi_thread")]
async fn with_two_gates_requests_sharing_a_prefix_land_on_the_gate_that_holds_it() {
    let mesh = mesh(&[]);
    let _gate_b = mesh.add_gate("gate-b");
    let url = mesh.frontend_url();
    moemesh_tests::mesh::wait_for_gates(&url, 2).await;
    let engine = in_process_engine("tiny-deepseek-v3");
    let expect = |p: &[u32], n| in_process_tokens(&engine, p, None, n);
    // Two families: a 96-token shared prefix (six blocks), then a per-request tail.
    let family = |f: u32, tail: u32| {
        let mut p = prompt(100 + f, 96);
        p.extend(prompt(tail, 10));
        p
    };
    let (one, two) = (family(1, 1), family(2, 2));
    let running = open(&url, &one, 40).await;
    let (out, cached) = run(&url, &two, "").await;
    assert_eq!(
        (out, cached),
        (expect(&two, NEW as usize), 0),
        "family 2, first"
    );
    assert_eq!(
        finish(running).await,
        (expect(&one, 40), 0),
        "family 1, first"
    );
    for f in [1, 2] {
        let p = family(f, 50 + f);
        let (out, cached) = run(&url, &p, "").await;
        assert_eq!(
            out,
            expect(&p, NEW as usize),
            "family {f}, follow-up: tokens"
        );
        assert_eq!(
            cached, 96,
            "family {f}, follow-up: its gate holds the prefix"
        );
    }
}
