//! Expert workers that size their shard from the memory plan (`moemesh expert --plan-shard`):
//! each worker computes the plan `moemesh plan` prints and serves its own worker's experts, so
//! workers started alike tile the routed experts and the mesh answers as the reference does; a
//! plan that does not fit, or a worker the plan does not have, is refused at start with the flag
//! named and the process gone.

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use moemesh_proto::v1::ExpertInfoRequest;
use moemesh_proto::v1::expert_client::ExpertClient;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_tests::mesh::Mesh;
use moemesh_tests::{fixture, moemesh_bin, reference_greedy, tokens_request};

const MODEL: &str = "tiny-deepseek-v3";

/// The plan's flags shared by every worker and by `moemesh plan`: 3 GPUs of 1 GiB, no reserves
/// (the tiny model takes a few MB, so the gate's GPU stays alone and the 16 experts split 8 + 8
/// over GPUs 1 and 2).
const PLAN: [&str; 6] = [
    "--gpu-mem-gib",
    "1",
    "--kv-cache-gib",
    "0",
    "--workspace-gib",
    "0",
];

fn owned(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// `moemesh plan --json`'s workers: (`plan_shard`, `experts`).
fn planned_workers() -> Vec<(String, String)> {
    let dir = fixture(MODEL);
    let mut args = vec![
        "plan",
        "--model",
        dir.to_str().expect("utf-8"),
        "--gpus",
        "3",
    ];
    args.extend(PLAN);
    args.push("--json");
    let out = moemesh_tests::moemesh(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a last line")).expect("json");
    assert_eq!(v["fits"], true, "{stdout}");
    assert!(
        stdout.contains("--plan-shard I/3 --gpu-mem-gib=1 --kv-cache-gib=0 --workspace-gib=0"),
        "{stdout}"
    );
    v["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| {
            (
                w["plan_shard"].as_str().expect("plan_shard").to_string(),
                w["experts"].as_str().expect("experts").to_string(),
            )
        })
        .collect()
}

async fn held_experts(address: &str) -> Vec<u32> {
    ExpertClient::connect(format!("http://{address}"))
        .await
        .expect("worker reachable")
        .info(ExpertInfoRequest {})
        .await
        .expect("info")
        .into_inner()
        .experts
}

fn range(flag: &str) -> Vec<u32> {
    let (lo, hi) = flag.split_once('-').expect("a range");
    (lo.parse().expect("lo")..=hi.parse().expect("hi")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_sized_from_the_plan_tile_the_experts_and_answer_as_the_reference() {
    let planned = planned_workers();
    assert_eq!(
        planned,
        [("0/3".into(), "0-7".into()), ("1/3".into(), "8-15".into())]
    );
    let shard_args: Vec<Vec<String>> = planned
        .iter()
        .map(|(shard, _)| {
            let mut a = owned(&["--plan-shard", shard]);
            a.extend(owned(&PLAN));
            a
        })
        .collect();
    let dir = fixture(MODEL);
    let mesh = Mesh::start_shard_args(Some(&dir), &shard_args);
    for ((_, experts), (_, address)) in planned.iter().zip(&mesh.workers) {
        assert_eq!(held_experts(address).await, range(experts));
    }
    let (input, expected) = reference_greedy(MODEL, 1);
    let mut client = GenerationClient::connect(mesh.frontend_url())
        .await
        .expect("frontend reachable");
    let mut stream = client
        .generate(tokens_request(&input, expected.len() as u32))
        .await
        .expect("generate")
        .into_inner();
    let mut ids = Vec::new();
    while let Some(m) = stream.message().await.expect("stream") {
        ids.extend(m.token_ids);
    }
    assert_eq!(ids, expected);
}

/// Runs `moemesh expert ARGS` until it exits (at most 120 s: it must refuse before serving);
/// returns (success, stderr).
fn expert_exits(args: &[&str]) -> (bool, String) {
    let dir = fixture(MODEL);
    let mut child = Command::new(moemesh_bin())
        .arg("expert")
        .args(["--model", dir.to_str().expect("utf-8")])
        .args(["--listen", "127.0.0.1:0", "--plaintext"])
        .args(args)
        .env_remove("MOEMESH_MODEL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn moemesh expert");
    let pid = child.id();
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        let _ = tx.send((child.wait().map(|s| s.success()).unwrap_or(false), text));
    });
    rx.recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("moemesh expert {args:?} did not exit: it should refuse at start")
        })
}

#[test]
fn a_plan_that_does_not_fit_or_a_worker_it_lacks_is_refused_at_start() {
    // The plan on 3 GPUs has 2 workers (the gate's GPU holds none).
    let mut args = vec!["--plan-shard", "2/3"];
    args.extend(PLAN);
    let (ok, err) = expert_exits(&args);
    assert!(!ok, "{err}");
    assert!(
        err.contains("--plan-shard 2/3") && err.contains("has 2 expert worker(s), numbered 0 to 1"),
        "{err}"
    );
    // 1 KiB GPUs hold nothing: the GPUs over budget are named.
    let (ok, err) = expert_exits(&["--plan-shard", "0/2", "--gpu-mem-gib", "0.000001"]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("does not fit") && err.contains("GPU 0 needs"),
        "{err}"
    );
    // A CPU worker has no GPU memory to read: it must be given.
    let (ok, err) = expert_exits(&["--plan-shard", "0/2"]);
    assert!(!ok, "{err}");
    assert!(err.contains("give --gpu-mem-gib"), "{err}");
    // --gpu-mem-gib alone sizes nothing, and --experts with --plan-shard is ambiguous.
    let (ok, err) = expert_exits(&["--gpu-mem-gib", "80"]);
    assert!(
        !ok && err.contains("--gpu-mem-gib sizes the shard of --plan-shard"),
        "{err}"
    );
    let (ok, err) = expert_exits(&["--plan-shard", "0/2", "--experts", "0-3"]);
    assert!(!ok && err.contains("--experts"), "{err}");
    for bad in ["3", "2/2", "0/0", "a/b"] {
        let (ok, err) = expert_exits(&["--plan-shard", bad]);
        assert!(!ok && err.contains("--plan-shard"), "{bad}: {err}");
    }
}
