//! Live expert re-placement (issue 22) end to end: a CPU mesh on a real etcd whose gate routes
//! with a Zipf-skewed router, its hot experts all on one of two workers; under steady load,
//! `moemesh rebalance --apply` moves and replicates experts while requests flow. No request
//! fails, every greedy output equals the one generated before the move, and the busiest worker's
//! share of the routed (token, expert) pairs drops.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use moemesh_proto::v1::GenerateRequest;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_tests::mesh::{Mesh, MeshOpts, gate_info};
use moemesh_tests::{fixture, tokens_request};

const MODEL: &str = "tiny-deepseek-v3";
/// The router's Zipf exponent: large enough that a layer's four top-ranked experts take most
/// of its tokens (the tiny model routes each token to 4 of 16).
const SKEW: f32 = 4.0;
const NEW_TOKENS: u32 = 24;
/// Concurrent clients of the steady load.
const CLIENTS: usize = 4;

async fn generate(url: &str, req: GenerateRequest) -> Result<Vec<u32>, tonic::Status> {
    let mut client = GenerationClient::connect(url.to_string())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut stream = client.generate(req).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(m) = stream.message().await? {
        ids.extend(m.token_ids);
    }
    Ok(ids)
}

/// The experts a MoE layer's skewed router ranks in its top `k`, for each of `layers`, together
/// (the "hot" ones), and the others, as `--experts` lists of `n / 2` experts each: the hot
/// experts (padded with the coldest) on one worker, the rest on the other.
fn hot_and_cold(n: usize, layers: &[usize], k: usize) -> (String, String) {
    let mut rank_sum = vec![0usize; n];
    let mut hot = std::collections::BTreeSet::new();
    for &l in layers {
        let bias = moemesh_engine::router::zipf_skew(n, l, SKEW);
        // Rank r has bias -S·ln(1 + r): sort by bias, highest first.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| bias[b].total_cmp(&bias[a]));
        for (r, &e) in order.iter().enumerate() {
            rank_sum[e] += r;
            if r < k {
                hot.insert(e);
            }
        }
    }
    let mut rest: Vec<usize> = (0..n).filter(|e| !hot.contains(e)).collect();
    rest.sort_by_key(|&e| std::cmp::Reverse(rank_sum[e]));
    let mut first: Vec<usize> = hot.into_iter().collect();
    while first.len() < n / 2 {
        first.push(rest.remove(0));
    }
    first.sort_unstable();
    let list = |v: &[usize]| {
        v.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let second: Vec<usize> = (0..n).filter(|e| !first.contains(e)).collect();
    (list(&first), list(&second))
}

/// Pairs each worker has computed for the gate so far, by worker id.
async fn pairs(gate: &str) -> BTreeMap<String, u64> {
    gate_info(gate)
        .await
        .worker_experts
        .into_iter()
        .map(|w| (w.id, w.routed_pairs))
        .collect()
}

/// The busiest worker's share of the pairs routed between two readings.
fn busiest_share(from: &BTreeMap<String, u64>, to: &BTreeMap<String, u64>) -> (f64, u64) {
    let deltas: Vec<u64> = to
        .iter()
        .map(|(id, n)| n - from.get(id).copied().unwrap_or(0))
        .collect();
    let total: u64 = deltas.iter().sum();
    let max = deltas.iter().copied().max().unwrap_or(0);
    (max as f64 / total.max(1) as f64, total)
}

/// `CLIENTS` clients, each generating the prompts in turn, `rounds` times (or, with `until`,
/// until it is set, at least once): every output must equal `reference`. Returns the requests made.
async fn load(
    url: &str,
    prompts: &Arc<Vec<Vec<u32>>>,
    reference: &Arc<Vec<Vec<u32>>>,
    rounds: usize,
    until: Option<Arc<AtomicBool>>,
) -> usize {
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (url, prompts, reference) = (url.to_string(), prompts.clone(), reference.clone());
        let (until, done) = (until.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            loop {
                let p = i % prompts.len();
                let ids = generate(&url, tokens_request(&prompts[p], NEW_TOKENS))
                    .await
                    .unwrap_or_else(|s| panic!("client {c}: prompt {p} failed: {s}"));
                assert_eq!(
                    ids, reference[p],
                    "client {c}: prompt {p}: tokens differ from before the move"
                );
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
                let finished = match &until {
                    Some(flag) => flag.load(Ordering::SeqCst),
                    None => i - c >= rounds * prompts.len(),
                };
                if finished {
                    break;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("a load client panicked");
    }
    done.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_rebalance_under_skewed_load_fails_nothing_keeps_every_token_and_evens_the_load() {
    let (hot, cold) = hot_and_cold(16, &[1, 2], 4);
    let opts = MeshOpts {
        gate_args: vec![format!("--router-skew={SKEW}")],
        ..MeshOpts::default()
    };
    let mut mesh = Mesh::start_opts(Some(&fixture(MODEL)), &[&hot, &cold], &opts);
    let (url, gate) = (mesh.frontend_url(), mesh.gate_url());
    println!("worker0 (hot) --experts {hot}; worker1 --experts {cold}");

    // Outputs before any move, one request at a time.
    let prompts: Arc<Vec<Vec<u32>>> = Arc::new(
        (0..6u32)
            .map(|i| {
                (0..(4 + i * 3))
                    .map(|j| 2 + (i * 89 + j * 17) % 500)
                    .collect()
            })
            .collect(),
    );
    let mut reference = Vec::new();
    for p in prompts.iter() {
        let ids = generate(&url, tokens_request(p, NEW_TOKENS))
            .await
            .expect("generate");
        assert_eq!(ids.len(), NEW_TOKENS as usize);
        reference.push(ids);
    }
    let reference = Arc::new(reference);

    // Steady load on today's placement.
    let a0 = pairs(&gate).await;
    let before_requests = load(&url, &prompts, &reference, 2, None).await;
    let a1 = pairs(&gate).await;

    // The same load goes on while the rebalance moves experts.
    let stop = Arc::new(AtomicBool::new(false));
    let during = {
        let (url, prompts, reference, stop) = (
            url.clone(),
            prompts.clone(),
            reference.clone(),
            stop.clone(),
        );
        tokio::spawn(async move { load(&url, &prompts, &reference, 0, Some(stop)).await })
    };
    let addr = gate.trim_start_matches("http://").to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(moemesh_tests::moemesh_bin())
            .args(["rebalance", "--addr", &addr, "--apply", "--json"])
            .args([
                "--spare",
                "2",
                "--max-copies",
                "2",
                "--release-grace-ms",
                "500",
            ])
            .args(["--apply-timeout", "120"])
            .output()
            .expect("run moemesh rebalance")
    })
    .await
    .expect("join");
    stop.store(true, Ordering::SeqCst);
    let during_requests = during.await.expect("load during the move");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "rebalance --apply failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    let plan: serde_json::Value =
        serde_json::from_str(lines.next().expect("the plan")).expect("plan JSON");
    let applied: serde_json::Value =
        serde_json::from_str(lines.next().expect("the report")).expect("report JSON");
    println!("plan: {plan}\napplied: {applied}");
    assert_eq!(applied["applied"], true, "{applied}");

    // The gate routes by the plan: each worker lists its planned experts, and the hottest
    // experts have two holders.
    let info = gate_info(&gate).await;
    let mut holders: BTreeMap<u32, usize> = BTreeMap::new();
    for w in &info.worker_experts {
        let planned = plan["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .find(|p| p["id"] == w.id.as_str())
            .expect("planned worker");
        let want: Vec<u32> = planned["experts_planned"]
            .as_array()
            .expect("planned experts")
            .iter()
            .map(|e| e.as_u64().expect("id") as u32)
            .collect();
        assert_eq!(w.experts, want, "worker {}", w.id);
        for &e in &w.experts {
            *holders.entry(e).or_default() += 1;
        }
    }
    assert_eq!(holders.len(), 16, "every expert held: {holders:?}");
    assert!(
        holders.values().any(|&n| n == 2),
        "no expert was replicated: {holders:?}"
    );

    // The same load again, on the new placement.
    let c0 = pairs(&gate).await;
    let after_requests = load(&url, &prompts, &reference, 2, None).await;
    let c1 = pairs(&gate).await;
    let (before, before_pairs) = busiest_share(&a0, &a1);
    let (after, after_pairs) = busiest_share(&c0, &c1);
    println!(
        "busiest worker's share of routed pairs: {:.1}% before ({before_requests} requests, \
         {before_pairs} pairs), {:.1}% after ({after_requests} requests, {after_pairs} pairs); \
         {during_requests} requests during the move, none failed, all tokens unchanged",
        before * 100.0,
        after * 100.0
    );
    assert!(
        after < before,
        "the busiest worker's share did not drop: {before:.3} -> {after:.3}"
    );
    // The workers logged the change; the processes live on.
    for (p, _) in &mut mesh.workers {
        assert!(p.log_text().contains("experts changed"), "{}", p.log_text());
        assert!(!p.exited(), "{} exited", p.name);
    }
}
