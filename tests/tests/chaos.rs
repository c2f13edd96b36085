//! Chaos run (not in CI: `loadtest/chaos.sh` runs it, 10 minutes by default): steady greedy
//! load on a mesh with redundancy (two gates, two replicas of each expert shard) while faults
//! are injected one at a time at random: expert workers and gates killed and restarted or
//! paused (SIGSTOP) and resumed, etcd paused or killed and restarted. Every request is checked
//! against the in-process engine's tokens; the run fails on any failed request or wrong token.
//!
//! `MOEMESH_CHAOS_SECS` (default 600) sets the length, `MOEMESH_CHAOS_SEED` the fault sequence,
//! `MOEMESH_CHAOS_REPORT` a file for the JSON summary.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_tests::mesh::{Mesh, MeshOpts};
use moemesh_tests::{fixture, tokens_request};
use tokio::sync::Mutex;

const MODEL: &str = "tiny-deepseek-v3";
const NEW_TOKENS: u32 = 24;
const CLIENTS: usize = 8;
/// One request's bound: far above any fault's cost, so a stuck request is counted, not waited on.
const REQUEST_LIMIT: Duration = Duration::from_secs(60);

/// xorshift64*: a reproducible fault sequence from one seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: BTreeMap<String, u64>,
    mismatched: u64,
    latencies_ms: Vec<f64>,
    first_errors: Vec<String>,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a long fault-injection run; loadtest/chaos.sh runs it"]
async fn chaos() {
    let secs = env_u64("MOEMESH_CHAOS_SECS", 600);
    let mut rng = Rng(env_u64("MOEMESH_CHAOS_SEED", 0x5eed_c4a0_5eed) | 1);
    let dir = fixture(MODEL);
    let gate_args: Vec<String> = [
        "--expert-timeout",
        "5",
        "--expert-connect-timeout-ms",
        "1000",
    ]
    .map(String::from)
    .to_vec();
    let opts = MeshOpts {
        gate_args: gate_args.clone(),
        frontend_args: ["--step-timeout", "5"].map(String::from).to_vec(),
        ..MeshOpts::default()
    };
    let shards = ["0-7", "8-15", "0-7", "8-15"];
    let mesh = Mesh::start_opts(Some(&dir), &shards, &opts);
    let second_gate = mesh.add_gate_with("gate-b", &gate_args);
    let url = mesh.frontend_url();

    let engine = moemesh_tests::in_process_engine(MODEL);
    let cases: Arc<Vec<(Vec<u32>, Vec<u32>)>> = Arc::new(
        (0..16u32)
            .map(|i| {
                let p: Vec<u32> = (0..(3 + i * 4))
                    .map(|j| 2 + (i * 61 + j * 17) % 500)
                    .collect();
                let want = moemesh_tests::in_process_tokens(&engine, &p, None, NEW_TOKENS as usize);
                (p, want)
            })
            .collect(),
    );

    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (url, cases, tally, stop) = (url.clone(), cases.clone(), tally.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut i = c;
            while !stop.load(Ordering::SeqCst) {
                let (prompt, want) = &cases[i % cases.len()];
                i += CLIENTS + 1;
                let started = Instant::now();
                let run = async {
                    let mut client = GenerationClient::connect(url.clone())
                        .await
                        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                    let mut s = client
                        .generate(tokens_request(prompt, NEW_TOKENS))
                        .await?
                        .into_inner();
                    let mut ids = Vec::new();
                    while let Some(m) = s.message().await? {
                        ids.extend(m.token_ids);
                    }
                    Ok::<_, tonic::Status>(ids)
                };
                let result = tokio::time::timeout(REQUEST_LIMIT, run).await;
                let mut t = tally.lock().await;
                match result {
                    Ok(Ok(ids)) if &ids == want => {
                        t.ok += 1;
                        t.latencies_ms.push(started.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok(Ok(ids)) => {
                        t.mismatched += 1;
                        if t.first_errors.len() < 20 {
                            t.first_errors
                                .push(format!("mismatch: prompt {prompt:?}: {ids:?} != {want:?}"));
                        }
                    }
                    Ok(Err(status)) => {
                        *t.failed.entry(format!("{:?}", status.code())).or_default() += 1;
                        if t.first_errors.len() < 20 {
                            t.first_errors.push(format!(
                                "{:?} after {:?}: {}",
                                status.code(),
                                started.elapsed(),
                                status.message()
                            ));
                        }
                    }
                    Err(_) => {
                        *t.failed.entry("Timeout".into()).or_default() += 1;
                        if t.first_errors.len() < 20 {
                            t.first_errors
                                .push(format!("no answer within {REQUEST_LIMIT:?}"));
                        }
                    }
                }
            }
        }));
    }

    // Faults, one at a time: the other replica of a worker's shard and the other gate are
    // always healthy while one is down, as an SRE's redundancy would have it.
    let mut mesh = mesh;
    let mut gate_b = second_gate;
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut restarts = 0;
    while Instant::now() < end {
        tokio::time::sleep(rng.millis(1500, 4000)).await;
        let what = match rng.below(6) {
            0 => {
                let w = rng.below(shards.len() as u64) as usize;
                mesh.workers[w].0.kill();
                tokio::time::sleep(rng.millis(500, 4000)).await;
                let new = mesh.add_worker(&format!("worker{w}"), shards[w], None);
                mesh.workers[w] = new;
                "kill and restart a worker"
            }
            1 => {
                let w = rng.below(shards.len() as u64) as usize;
                mesh.workers[w].0.pause();
                tokio::time::sleep(rng.millis(1000, 8000)).await;
                mesh.workers[w].0.resume();
                "pause and resume a worker"
            }
            2 => {
                let first = rng.below(2) == 0;
                let gate = if first { &mut mesh.gate } else { &mut gate_b };
                gate.0.kill();
                tokio::time::sleep(rng.millis(500, 4000)).await;
                restarts += 1;
                let new = mesh.add_gate_with(&format!("gate-r{restarts}"), &gate_args);
                let gate = if first { &mut mesh.gate } else { &mut gate_b };
                *gate = new;
                "kill and restart a gate"
            }
            3 => {
                let gate = if rng.below(2) == 0 {
                    &mut mesh.gate
                } else {
                    &mut gate_b
                };
                gate.0.pause();
                tokio::time::sleep(rng.millis(1000, 8000)).await;
                gate.0.resume();
                "pause and resume a gate"
            }
            4 => {
                mesh.etcd.pause();
                tokio::time::sleep(rng.millis(1000, 8000)).await;
                mesh.etcd.resume();
                "pause and resume etcd"
            }
            _ => {
                mesh.etcd.stop();
                tokio::time::sleep(rng.millis(500, 5000)).await;
                mesh.etcd.restart();
                "kill and restart etcd"
            }
        };
        *faults.entry(what).or_default() += 1;
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        let _ = c.await;
    }
    let t = tally.lock().await;
    let mut lat = t.latencies_ms.clone();
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let failed: u64 = t.failed.values().sum();
    let report = serde_json::json!({
        "seconds": secs,
        "clients": CLIENTS,
        "new_tokens": NEW_TOKENS,
        "requests_ok": t.ok,
        "requests_failed": failed,
        "failed_by_code": t.failed,
        "greedy_mismatches": t.mismatched,
        "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
        "faults": faults,
        "first_errors": t.first_errors,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    if let Ok(path) = std::env::var("MOEMESH_CHAOS_REPORT") {
        let _ = std::fs::write(
            path,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        );
    }
    assert!(t.ok > 0, "no request succeeded");
    assert_eq!(failed, 0, "failed requests: {:?}", t.first_errors);
    assert_eq!(t.mismatched, 0, "wrong tokens: {:?}", t.first_errors);
    drop(gate_b);
    drop(mesh);
}
