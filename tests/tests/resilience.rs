//! Faults that cost at most a bounded, configured time and never a wrong token: a process or
//! etcd stalled past the lease TTL (registrations heal), an expert worker that accepts
//! connections and never answers or hangs on an open stream, and a gate that hangs mid-step.
//! Each test fails on a mesh without the corresponding bound (it would wait for ever or for the
//! full 60 s timeouts configured here).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moemesh_proto::v1::gate_client::GateClient;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{GateInfoRequest, ModelInfoRequest};
use moemesh_tests::mesh::Mesh;
use moemesh_tests::{fixture, tokens_request};

const MODEL: &str = "tiny-deepseek-v3";

/// The whole greedy output of one request, or its error status.
async fn generate(url: &str, prompt: &[u32], n: u32) -> Result<Vec<u32>, tonic::Status> {
    let mut c = GenerationClient::connect(url.to_string())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut s = c.generate(tokens_request(prompt, n)).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(m) = s.message().await? {
        ids.extend(m.token_ids);
    }
    Ok(ids)
}

fn prompt(i: u32) -> Vec<u32> {
    (0..(4 + i * 3))
        .map(|j| 2 + (i * 89 + j * 31) % 500)
        .collect()
}

/// Registry keys of the mesh's cluster → the lease each is attached to.
async fn registrations(etcd: &str, cluster: &str) -> BTreeMap<String, i64> {
    let mut c = etcd_client::Client::connect([etcd], None)
        .await
        .expect("etcd client");
    let resp = c
        .get(
            format!("/moemesh/{cluster}/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("etcd get");
    resp.kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap_or_default().to_string(), kv.lease()))
        .collect()
}

/// Polls the registry (it has no change signal of its own to wait on here) until `check`
/// holds, at most `limit`.
async fn wait_registry(
    mesh: &Mesh,
    limit: Duration,
    what: &str,
    check: impl Fn(&BTreeMap<String, i64>) -> bool,
) -> BTreeMap<String, i64> {
    let deadline = Instant::now() + limit;
    loop {
        let regs = registrations(&mesh.etcd.endpoint, &mesh.cluster).await;
        if check(&regs) {
            return regs;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; registry holds {regs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn gate_workers(url: &str) -> Vec<String> {
    let mut c = GateClient::connect(url.to_string()).await.expect("gate");
    c.info(GateInfoRequest {})
        .await
        .expect("info")
        .into_inner()
        .expert_workers
}

/// Waits until the gate at `url` lists exactly `want` as its expert workers (a registry update
/// reached it).
async fn wait_gate_workers(url: &str, mut want: Vec<&str>) {
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut have = gate_workers(url).await;
        have.sort();
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gate lists {have:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn registrations_come_back_after_a_worker_and_etcd_stall_past_the_lease_ttl() {
    let dir = fixture(MODEL);
    // Every member's lease TTL is 3 s here.
    let mut mesh = Mesh::start(Some(&dir), &["0-15"]);
    let url = mesh.frontend_url();
    let engine = moemesh_tests::in_process_engine(MODEL);
    let p = prompt(2);
    let want = moemesh_tests::in_process_tokens(&engine, &p, None, 12);
    assert_eq!(generate(&url, &p, 12).await.expect("serves"), want);

    let is_worker = |k: &String| k.ends_with("/experts/worker0");
    let is_gate = |k: &String| k.contains("/gates/");
    let before = wait_registry(&mesh, Duration::from_secs(10), "both registered", |r| {
        r.keys().any(is_worker) && r.keys().any(is_gate)
    })
    .await;

    // The worker stalls past its TTL: its key expires. Resumed, it must write it again.
    mesh.workers[0].0.pause();
    wait_registry(
        &mesh,
        Duration::from_secs(20),
        "the paused worker's key expires",
        |r| !r.keys().any(is_worker),
    )
    .await;
    mesh.workers[0].0.resume();
    wait_registry(
        &mesh,
        Duration::from_secs(15),
        "the worker registers again",
        |r| r.keys().any(is_worker),
    )
    .await;
    assert!(
        mesh.workers[0]
            .0
            .log_text()
            .contains("registration was lost; registered again"),
        "the worker's log says it re-registered"
    );
    assert_eq!(
        generate(&url, &p, 12)
            .await
            .expect("serves after the worker's stall"),
        want
    );

    // etcd stalls past every lease's TTL: etcd revokes them all when it resumes (an expired
    // lease cannot be renewed). Every member must come back under a new lease.
    let leases = wait_registry(&mesh, Duration::from_secs(10), "both registered", |r| {
        r.keys().any(is_worker) && r.keys().any(is_gate)
    })
    .await;
    assert_eq!(leases.len(), before.len());
    mesh.etcd.pause();
    // The stall itself: nothing to wait on but time.
    tokio::time::sleep(Duration::from_secs(6)).await;
    mesh.etcd.resume();
    wait_registry(
        &mesh,
        Duration::from_secs(20),
        "every member registers again under a new lease",
        |r| {
            leases
                .iter()
                .all(|(k, old)| r.get(k).is_some_and(|new| new != old))
        },
    )
    .await;
    // The frontend's and the gate's views recover too: requests are served, same tokens.
    for i in 0..3 {
        let p = prompt(i);
        let want = moemesh_tests::in_process_tokens(&engine, &p, None, 12);
        assert_eq!(
            generate(&url, &p, 12)
                .await
                .expect("serves after etcd's stall"),
            want
        );
    }
    let mut info = GenerationClient::connect(url.clone())
        .await
        .expect("client");
    let model = info
        .model_info(ModelInfoRequest {})
        .await
        .expect("model info")
        .into_inner();
    assert_eq!(model.gates.len(), 1, "the frontend lists the gate again");
}

/// Runs every (prompt, expected tokens) case at once; each must succeed with its tokens. Returns
/// the time they took together.
async fn run_all(url: &str, cases: &[(Vec<u32>, Vec<u32>)]) -> Duration {
    let started = Instant::now();
    let runs = cases
        .iter()
        .map(|(p, want)| async move { (generate(url, p, 16).await, want) });
    // Bounded, so that a mesh that waits on a hung peer for ever fails here instead of hanging.
    let results = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(runs))
        .await
        .expect("the requests finish within 120 s");
    for (got, want) in results {
        assert_eq!(&got.expect("no request fails"), want);
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn hung_expert_workers_cost_a_bounded_time_and_no_token() {
    let dir = fixture(MODEL);
    // Reply timeout 60 s: a mesh that waited on a hung worker for its reply timeout would take
    // over a minute here. Opening a stream is bounded by 1 s.
    let gate_args = [
        "--expert-timeout",
        "60",
        "--expert-connect-timeout-ms",
        "1000",
    ];
    let mesh = Mesh::start_full(Some(&dir), &["0-15"], &gate_args, &[]);
    let url = mesh.frontend_url();
    let gate = mesh.gate_url();
    let engine = moemesh_tests::in_process_engine(MODEL);
    let cases: Vec<(Vec<u32>, Vec<u32>)> = (0..4)
        .map(|i| {
            let p = prompt(i);
            let want = moemesh_tests::in_process_tokens(&engine, &p, None, 16);
            (p, want)
        })
        .collect();
    run_all(&url, &cases).await;

    // 1. A tarpit: accepts TCP connections and never says a word, listed in the registry as a
    //    replica of the real worker.
    let tarpit = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let tarpit_addr = tarpit.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in tarpit.incoming() {
            held.push(conn);
        }
    });
    let mut etcd = etcd_client::Client::connect([mesh.etcd.endpoint.as_str()], None)
        .await
        .expect("etcd");
    let regs = registrations(&mesh.etcd.endpoint, &mesh.cluster).await;
    let worker_key = regs
        .keys()
        .find(|k| k.ends_with("/experts/worker0"))
        .expect("worker0 registered")
        .clone();
    let value = etcd
        .get(worker_key.as_str(), None)
        .await
        .expect("get")
        .kvs()[0]
        .value_str()
        .expect("utf-8")
        .to_string();
    let mut member: serde_json::Value = serde_json::from_str(&value).expect("member json");
    member["id"] = "tarpit".into();
    member["address"] = tarpit_addr.clone().into();
    let tarpit_key = worker_key.replace("/worker0", "/tarpit");
    etcd.put(tarpit_key.as_str(), member.to_string(), None)
        .await
        .expect("put");
    wait_gate_workers(&gate, vec!["tarpit", "worker0"]).await;
    let took = run_all(&url, &cases).await;
    assert!(
        took < Duration::from_secs(20),
        "a tarpit replica cost {took:?}; opening a stream is bounded by 1 s"
    );
    let again = run_all(&url, &cases).await;
    assert!(
        again < Duration::from_secs(20),
        "later requests still pay for the tarpit: {again:?}"
    );
    etcd.delete(tarpit_key.as_str(), None)
        .await
        .expect("delete");
    wait_gate_workers(&gate, vec!["worker0"]).await;

    // 2. A replica hangs on its open stream (SIGSTOP). Its lease (3 s) expires; the gate drops it
    //    from the table and releases the calls waiting on it at once, to the other replica.
    let (mut second, _) = mesh.add_worker("worker1", "0-15", None);
    wait_gate_workers(&gate, vec!["worker0", "worker1"]).await;
    // Both replicas get traffic (and open streams) before one hangs.
    run_all(&url, &cases).await;
    run_all(&url, &cases).await;
    second.pause();
    let took = run_all(&url, &cases).await;
    second.resume();
    assert!(
        took < Duration::from_secs(30),
        "a hung replica cost {took:?}; its lease expires after 3 s"
    );
    let log = mesh.gate.0.log_text();
    assert!(
        log.contains("retrying on another replica"),
        "the retry path ran:\n{log}"
    );
    second.kill();
    drop(mesh);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_gates_sequences_finish_on_another_gate_with_the_same_tokens() {
    let dir = fixture(MODEL);
    let mesh = Mesh::start_with(Some(&dir), &["0-15"], &["--step-timeout", "5"]);
    let (mut gate_b, addr_b) = mesh.add_gate("gate-b");
    let url = mesh.frontend_url();
    moemesh_tests::mesh::wait_for_gates(&url, 2).await;
    let engine = moemesh_tests::in_process_engine(MODEL);
    let out_len = 150u32;
    let prompts: Vec<Vec<u32>> = (0..6).map(prompt).collect();
    let mut streams = Vec::new();
    for p in &prompts {
        let mut c = GenerationClient::connect(url.clone())
            .await
            .expect("client");
        let mut s = c
            .generate(tokens_request(p, out_len))
            .await
            .expect("accepted")
            .into_inner();
        let first = s.message().await.expect("stream").expect("first token");
        streams.push((c, s, first.token_ids));
    }
    let live = |url: String| async move {
        let mut c = GateClient::connect(url).await.expect("gate");
        c.info(GateInfoRequest {})
            .await
            .expect("info")
            .into_inner()
            .live_sequences
    };
    assert!(
        live(format!("http://{addr_b}")).await > 0,
        "gate B got no sequences"
    );
    assert!(live(mesh.gate_url()).await > 0, "gate A got no sequences");
    // Gate B hangs (its process stopped, its sockets open): no error ever reaches the frontend.
    gate_b.pause();
    let finish = async {
        for ((_, mut s, mut ids), p) in streams.into_iter().zip(&prompts) {
            while let Some(m) = s.message().await.expect("no request fails") {
                ids.extend(m.token_ids);
            }
            let alone = moemesh_tests::in_process_tokens(&engine, p, None, out_len as usize);
            assert_eq!(ids, alone, "prompt of {} tokens", p.len());
        }
    };
    let done = tokio::time::timeout(Duration::from_secs(90), finish).await;
    gate_b.resume();
    assert!(
        done.is_ok(),
        "sequences on the hung gate never finished (--step-timeout 5)"
    );
    let log = mesh.frontend.0.log_text();
    assert!(
        log.contains("taking it for hung"),
        "the step deadline fired"
    );
    gate_b.kill();
    drop(mesh);
}
