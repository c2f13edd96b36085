//! Live expert re-placement (issue 22) end to end, per MoE layer: a CPU mesh on a real etcd whose
//! gate routes with a Zipf-skewed router that ranks the experts differently in each layer. The
//! two workers start with a placement by expert id (the same experts in every layer) chosen from
//! the measured load so that, summed over the layers, each worker takes about half of the routed
//! pairs, while in each layer one worker takes most of them: layer 1's hot experts on one worker,
//! layer 2's on the other. A placement by id has nothing to gain there; the per-layer plan does.
//! Under steady load, `moemesh rebalance --apply` moves and replicates experts layer by layer
//! while requests flow. No request fails, every greedy output equals the one generated before
//! any move, and the step share (each layer's busiest worker's share, summed over the layers)
//! drops.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use moemesh_proto::v1::expert_client::ExpertClient;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{GenerateRequest, SetExpertsRequest};
use moemesh_tests::mesh::{Mesh, MeshOpts, gate_info};
use moemesh_tests::{fixture, tokens_request};

const MODEL: &str = "tiny-deepseek-v3";
/// The router's Zipf exponent: large enough that a layer's top-ranked experts take most of its
/// tokens (the tiny model routes each token to 4 of 16).
const SKEW: f32 = 4.0;
const NEW_TOKENS: u32 = 24;
/// Concurrent clients of the steady load.
const CLIENTS: usize = 4;
/// The tiny model's routed experts per layer.
const EXPERTS: usize = 16;

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

/// Two experts lists of `EXPERTS / 2` each, from the measured load (layer → tokens per expert)
/// of the two MoE layers: of the splits whose first half takes within 3 points of half of all
/// the routed tokens summed over the layers (even by id), the one whose first half takes the
/// most of the first layer's tokens and the least of the second's (each layer's hot experts on
/// one worker). Every split of the 16 is tried.
fn split_by_layer_skew(load: &BTreeMap<u32, Vec<u64>>) -> (Vec<u32>, Vec<u32>) {
    let tokens = |l: &Vec<u64>| -> Vec<f64> {
        (0..EXPERTS)
            .map(|e| l.get(e).copied().unwrap_or(0) as f64)
            .collect()
    };
    let t1 = tokens(load.values().next().expect("a layer's load"));
    let t2 = tokens(load.values().last().expect("a layer's load"));
    let (s1, s2): (f64, f64) = (t1.iter().sum(), t2.iter().sum());
    let mut best: Option<(f64, u32)> = None;
    for mask in 0u32..(1 << EXPERTS) {
        if mask.count_ones() as usize != EXPERTS / 2 {
            continue;
        }
        let mine = |t: &[f64]| -> f64 {
            (0..EXPERTS)
                .filter(|e| mask & (1 << e) != 0)
                .map(|e| t[e])
                .sum()
        };
        let (m1, m2) = (mine(&t1), mine(&t2));
        if ((m1 + m2) / (s1 + s2) - 0.5).abs() > 0.03 {
            continue;
        }
        let skew = m1 / s1.max(1.0) - m2 / s2.max(1.0);
        if best.is_none_or(|(b, _)| skew > b) {
            best = Some((skew, mask));
        }
    }
    let (_, mask) = best.expect("an even split by id");
    let a = (0..EXPERTS as u32)
        .filter(|e| mask & (1 << e) != 0)
        .collect();
    let b = (0..EXPERTS as u32)
        .filter(|e| mask & (1 << e) == 0)
        .collect();
    (a, b)
}

/// Pairs each worker has computed for the gate so far, by (worker id, layer).
async fn pairs(gate: &str) -> BTreeMap<(String, u32), u64> {
    let mut out = BTreeMap::new();
    for w in gate_info(gate).await.worker_experts {
        for l in w.layers {
            out.insert((w.id.clone(), l.layer), l.routed_pairs);
        }
    }
    out
}

/// Between two readings of [`pairs`]: the step share (each layer's busiest worker's pairs,
/// summed over the layers, over all pairs), the busiest worker's share of all pairs summed over
/// the layers (what a placement by id evens out), and the pairs routed.
fn shares(
    from: &BTreeMap<(String, u32), u64>,
    to: &BTreeMap<(String, u32), u64>,
) -> (f64, f64, u64) {
    let mut per_layer: BTreeMap<u32, u64> = BTreeMap::new();
    let mut per_worker: BTreeMap<&str, u64> = BTreeMap::new();
    let mut total = 0;
    for ((id, layer), n) in to {
        let d = n - from.get(&(id.clone(), *layer)).copied().unwrap_or(0);
        let m = per_layer.entry(*layer).or_default();
        *m = (*m).max(d);
        *per_worker.entry(id).or_default() += d;
        total += d;
    }
    let step: u64 = per_layer.values().sum();
    let busiest = per_worker.values().copied().max().unwrap_or(0);
    let t = total.max(1) as f64;
    (step as f64 / t, busiest as f64 / t, total)
}

/// Sends every worker its experts list (the per-id field: the same experts in every layer),
/// in two phases that never leave an expert without a holder, and waits for the gate to list
/// each worker's new experts.
async fn place_by_id(gate: &str, workers: &[(String, Vec<u32>)]) {
    let info = gate_info(gate).await;
    let address = |id: &str| {
        info.worker_experts
            .iter()
            .find(|w| w.id == id)
            .map(|w| w.address.clone())
            .expect("the gate lists the worker")
    };
    let current: BTreeMap<String, Vec<u32>> = info
        .worker_experts
        .iter()
        .map(|w| (w.id.clone(), w.experts.clone()))
        .collect();
    for phase in 0..2 {
        for (id, want) in workers {
            let experts: Vec<u32> = if phase == 0 {
                want.iter()
                    .chain(&current[id])
                    .copied()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()
            } else {
                want.clone()
            };
            let mut c = ExpertClient::connect(format!("http://{}", address(id)))
                .await
                .expect("worker reachable");
            c.set_experts(SetExpertsRequest {
                experts: experts.clone(),
                release_grace_ms: 200,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("SetExperts {experts:?} on {id}: {s}"));
            moemesh_tests::mesh::wait_until("the gate to list the new experts", || {
                let (id, experts) = (id.clone(), experts.clone());
                async move {
                    gate_info(gate)
                        .await
                        .worker_experts
                        .iter()
                        .any(|w| w.id == id && w.experts == experts)
                }
            })
            .await;
        }
    }
}

/// `CLIENTS` clients, each generating the prompts in turn, `rounds` times (or, with `until`,
/// until it is set, at least once): every output must equal `reference`. Returns the requests made.
/// Each prompt's greedy output, one request at a time: what every later run must reproduce.
async fn references(url: &str, prompts: &[Vec<u32>]) -> Arc<Vec<Vec<u32>>> {
    let mut reference = Vec::new();
    for p in prompts {
        let ids = generate(url, tokens_request(p, NEW_TOKENS))
            .await
            .expect("generate");
        assert_eq!(ids.len(), NEW_TOKENS as usize);
        reference.push(ids);
    }
    Arc::new(reference)
}

/// [`load_run`] on a task of its own until `stop` is set.
fn spawn_load(
    url: &str,
    prompts: &Arc<Vec<Vec<u32>>>,
    reference: &Arc<Vec<Vec<u32>>>,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    let (url, prompts, reference, stop) = (
        url.to_string(),
        prompts.clone(),
        reference.clone(),
        stop.clone(),
    );
    tokio::spawn(async move { load_run(&url, &prompts, &reference, 0, Some(stop)).await })
}

async fn load_run(
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
async fn a_live_per_layer_rebalance_under_skewed_load_fails_nothing_keeps_every_token_and_evens_each_layer()
 {
    let opts = MeshOpts {
        gate_args: vec![format!("--router-skew={SKEW}")],
        ..MeshOpts::default()
    };
    let mut mesh = Mesh::start_opts(Some(&fixture(MODEL)), &["0-7", "8-15"], &opts);
    let (url, gate) = (mesh.frontend_url(), mesh.gate_url());

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
    let reference = references(&url, &prompts).await;

    // The starting placement, by id, from the load those requests measured.
    let load: BTreeMap<u32, Vec<u64>> = gate_info(&gate)
        .await
        .expert_load
        .into_iter()
        .map(|l| (l.layer, l.tokens))
        .collect();
    assert_eq!(load.len(), 2, "two MoE layers: {load:?}");
    let (first, second) = split_by_layer_skew(&load);
    let ids: Vec<String> = gate_info(&gate)
        .await
        .worker_experts
        .iter()
        .map(|w| w.id.clone())
        .collect();
    println!("load per layer: {load:?}\nstarting placement by id: {first:?} / {second:?}");
    place_by_id(&gate, &[(ids[0].clone(), first), (ids[1].clone(), second)]).await;

    // Steady load on the starting placement.
    let a0 = pairs(&gate).await;
    let before_requests = load_run(&url, &prompts, &reference, 2, None).await;
    let a1 = pairs(&gate).await;

    // The same load goes on while the rebalance moves experts.
    let stop = Arc::new(AtomicBool::new(false));
    let during = spawn_load(&url, &prompts, &reference, &stop);
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
                "--cumulative",
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

    // The gate routes by the plan: each worker lists its planned experts in each layer, every
    // layer holds every expert, some are replicated, and the layers differ.
    let info = gate_info(&gate).await;
    let mut holders: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    let mut differ = false;
    for w in &info.worker_experts {
        let planned = plan["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .find(|p| p["id"] == w.id.as_str())
            .expect("planned worker");
        let mut lists = Vec::new();
        for l in &w.layers {
            let want: Vec<u32> = planned["layers_planned"][l.layer.to_string()]
                .as_array()
                .expect("planned experts of the layer")
                .iter()
                .map(|e| e.as_u64().expect("id") as u32)
                .collect();
            assert_eq!(l.experts, want, "worker {} layer {}", w.id, l.layer);
            for &e in &l.experts {
                *holders.entry((l.layer, e)).or_default() += 1;
            }
            lists.push(l.experts.clone());
        }
        differ |= lists.windows(2).any(|p| p[0] != p[1]);
    }
    assert_eq!(
        holders.len(),
        2 * EXPERTS,
        "every (layer, expert) held: {holders:?}"
    );
    assert!(
        holders.values().any(|&n| n == 2),
        "nothing was replicated: {holders:?}"
    );
    assert!(
        differ,
        "no worker holds different experts per layer: {info:?}"
    );

    // The same load again, on the new placement.
    let c0 = pairs(&gate).await;
    let after_requests = load_run(&url, &prompts, &reference, 2, None).await;
    let c1 = pairs(&gate).await;
    let (before, before_overall, before_pairs) = shares(&a0, &a1);
    let (after, after_overall, after_pairs) = shares(&c0, &c1);
    println!(
        "step share (each layer's busiest worker, summed over the layers) of routed pairs: \
         {:.1}% before ({before_requests} requests, {before_pairs} pairs), {:.1}% after \
         ({after_requests} requests, {after_pairs} pairs); busiest worker summed over the \
         layers: {:.1}% before, {:.1}% after; plan: {} -> {} (by the gate's counts); \
         {during_requests} requests during the move, none failed, all tokens unchanged",
        before * 100.0,
        after * 100.0,
        before_overall * 100.0,
        after_overall * 100.0,
        plan["step_share_now"],
        plan["step_share_planned"],
    );
    // The starting placement is about even by id and skewed per layer...
    assert!(
        before_overall < 0.6 && before > 0.75,
        "the starting placement is not even by id and skewed per layer: step {before:.3}, \
         busiest by id {before_overall:.3}"
    );
    // A placement by id would see the gate's counts summed over the layers, already about
    // even: under the default --min-gain of 2 points it would not move at all.
    let by_id_now = plan["busiest_overall_now"]
        .as_f64()
        .expect("busiest overall");
    assert!(by_id_now < 52.5, "{plan}");
    // ... and the per-layer plan lowers what each step waits for.
    assert!(
        after < before,
        "the step share did not drop: {before:.3} -> {after:.3}"
    );
    // The workers logged the change; the processes live on.
    for (p, _) in &mut mesh.workers {
        assert!(p.log_text().contains("experts changed"), "{}", p.log_text());
        assert!(!p.exited(), "{} exited", p.name);
    }
}

/// Sends worker `id` (at `address`) a per-layer `SetExperts`: `layer` holds `experts` from now
/// on (its other layers keep theirs), giving up the rest after `grace_ms`; then waits for the
/// gate to list it.
async fn set_layer(
    gate: &str,
    (id, address): &(String, String),
    layer: u32,
    experts: &[u32],
    grace_ms: u32,
) {
    let mut c = ExpertClient::connect(format!("http://{address}"))
        .await
        .expect("worker reachable");
    c.set_experts(SetExpertsRequest {
        layer_experts: vec![moemesh_proto::v1::LayerExperts {
            layer,
            experts: experts.to_vec(),
        }],
        release_grace_ms: grace_ms,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|s| panic!("SetExperts layer {layer} {experts:?} on {id}: {s}"));
    moemesh_tests::mesh::wait_until("the gate to list the layer's new experts", || async move {
        gate_info(gate).await.worker_experts.iter().any(|w| {
            w.id == *id
                && w.layers
                    .iter()
                    .any(|l| l.layer == layer && l.experts == experts)
        })
    })
    .await;
}

/// Per-layer moves with no grace, under load: layer 2's halves swap between the two workers
/// and back, again and again (layer 1 stays), each worker dropping what it gave up as soon as
/// the registry lists the change, so a gate whose step still routes by the old placement reaches
/// a worker that no longer holds the expert in that layer. The worker refuses the call
/// (`not_held`), the gate re-sends its pairs to the expert's holder in that layer, and no request
/// fails: every greedy output equals the one before any move.
#[tokio::test(flavor = "multi_thread")]
async fn per_layer_moves_without_grace_are_refused_and_re_sent_never_failed() {
    let opts = MeshOpts {
        gate_args: vec!["--metrics-listen".into(), "127.0.0.1:0".into()],
        ..MeshOpts::default()
    };
    let mesh = Mesh::start_opts(Some(&fixture(MODEL)), &["0-7", "8-15"], &opts);
    let (url, gate) = (mesh.frontend_url(), mesh.gate_url());
    let prompts: Arc<Vec<Vec<u32>>> = Arc::new(
        (0..4u32)
            .map(|i| {
                (0..(5 + i * 4))
                    .map(|j| 3 + (i * 71 + j * 13) % 400)
                    .collect()
            })
            .collect(),
    );
    let reference = references(&url, &prompts).await;
    let workers: Vec<(String, String)> = gate_info(&gate)
        .await
        .worker_experts
        .iter()
        .map(|w| (w.id.clone(), w.address.clone()))
        .collect();
    assert_eq!(workers.len(), 2);
    let refusals = || {
        let metrics = mesh.gate.0.metrics.as_deref();
        let samples = moemesh_tests::mesh::parse_metrics(&moemesh_tests::mesh::scrape(
            metrics.expect("the gate's metrics address"),
        ));
        moemesh_tests::mesh::metric_sum(&samples, "moemesh_gate_expert_refusals_total", &[])
            .unwrap_or(0.0)
    };

    let stop = Arc::new(AtomicBool::new(false));
    let during = spawn_load(&url, &prompts, &reference, &stop);
    let (low, high): (Vec<u32>, Vec<u32>) = ((0..8).collect(), (8..16).collect());
    let all: Vec<u32> = (0..16).collect();
    // Swaps out and back (so the halves end where they started): at least 6, and on until the
    // gate has re-sent a refused call, at most 20.
    let mut swaps = 0;
    while swaps < 6 || (swaps < 20 && refusals() == 0.0) {
        for (to0, to1) in [(&high, &low), (&low, &high)] {
            // Both hold all of layer 2 (phase 1), then each keeps its half (phase 2, no grace).
            for w in &workers {
                set_layer(&gate, w, 2, &all, 0).await;
            }
            set_layer(&gate, &workers[0], 2, to0, 0).await;
            set_layer(&gate, &workers[1], 2, to1, 0).await;
            swaps += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let during_requests = during
        .await
        .expect("no request failed and every output held");

    // Layer 1 never moved; layer 2's halves are back where they started.
    let info = gate_info(&gate).await;
    for (i, w) in info.worker_experts.iter().enumerate() {
        let held: BTreeMap<u32, Vec<u32>> = w
            .layers
            .iter()
            .map(|l| (l.layer, l.experts.clone()))
            .collect();
        let home = if i == 0 { &low } else { &high };
        assert_eq!(&held[&1], home, "{}: layer 1", w.id);
        assert_eq!(&held[&2], home, "{}: layer 2", w.id);
    }
    let refused = refusals();
    println!(
        "{swaps} swaps of layer 2 with no grace: {during_requests} requests during them, none \
         failed, every output unchanged; {refused} calls refused (not_held) and re-sent"
    );
    assert!(
        refused > 0.0,
        "no call was refused in {swaps} swaps: the re-send path did not run"
    );
}
