//! A registration's value changes while it lives (issue 22's live re-placement: an expert
//! worker announces experts it has just loaded): against a real etcd, a watcher sees the new
//! expert set (per layer, too) under the same key and lease, and an update that would change the
//! key is refused.

use std::time::Duration;

use moemesh_common::placement::Holdings;
use moemesh_common::registry::{Member, Registry, RegistryConfig, Role};
use moemesh_tests::mesh::Etcd;

fn worker(experts: Vec<u32>) -> Member {
    Member {
        id: "expert-test-1".into(),
        role: Role::Expert,
        address: "127.0.0.1:1".into(),
        layers: vec![1, 2],
        experts,
        layer_experts: Vec::new(),
        device: "cpu".into(),
        fingerprint: "f".into(),
        version: "test".into(),
    }
}

/// The experts the watcher lists for the worker, once they equal `want` (or what they were
/// after 10 s).
async fn listed(rx: &mut tokio::sync::watch::Receiver<Vec<Member>>, want: &[u32]) -> Vec<u32> {
    let now = |rx: &tokio::sync::watch::Receiver<Vec<Member>>| {
        rx.borrow()
            .iter()
            .find(|m| m.id == "expert-test-1")
            .map(|m| m.experts.clone())
            .unwrap_or_default()
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while now(rx) != want {
            if rx.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    now(rx)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_updated_registration_shows_its_new_experts_to_watchers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(dir.path());
    let cfg = RegistryConfig {
        etcd: vec![etcd.endpoint.clone()],
        cluster: "update".into(),
        model: "m".into(),
        lease_ttl_s: 5,
        tls: None,
    };
    let registry = Registry::new(&cfg, Vec::new()).expect("registry");
    let mut registration = registry
        .register(worker(vec![0, 1, 2, 3]))
        .await
        .expect("register");
    let mut rx = Registry::new(&cfg, Vec::new())
        .expect("watcher")
        .watch_synced(Role::Expert, Duration::from_secs(10))
        .await;
    assert_eq!(listed(&mut rx, &[0, 1, 2, 3]).await, [0, 1, 2, 3]);

    // Experts 6 and 7 loaded: announced.
    registration
        .update(worker(vec![0, 1, 2, 3, 6, 7]))
        .await
        .expect("update");
    assert_eq!(
        listed(&mut rx, &[0, 1, 2, 3, 6, 7]).await,
        [0, 1, 2, 3, 6, 7]
    );
    // Experts 0 and 1 given up.
    registration
        .update(worker(vec![2, 3, 6, 7]))
        .await
        .expect("update");
    assert_eq!(listed(&mut rx, &[2, 3, 6, 7]).await, [2, 3, 6, 7]);
    assert_eq!(rx.borrow().len(), 1, "one key, rewritten");
    // Per layer: layer 2 gives up 6 and 7 for 5. The watcher reads the per-layer holdings;
    // `experts` keeps what both layers hold (all that an older gate would route to).
    let per_layer = Holdings::from([(1, vec![2, 3, 6, 7]), (2, vec![2, 3, 5])]);
    let mut m = worker(Vec::new());
    m.set_holdings(&per_layer);
    registration.update(m).await.expect("update");
    assert_eq!(listed(&mut rx, &[2, 3]).await, [2, 3]);
    let seen = rx
        .borrow()
        .iter()
        .find(|m| m.id == "expert-test-1")
        .map(Member::holdings);
    assert_eq!(seen, Some(per_layer));

    // Another id would be another key: refused, naming both.
    let other = Member {
        id: "expert-test-2".into(),
        ..worker(vec![0])
    };
    let err = registration
        .update(other)
        .await
        .expect_err("another id")
        .to_string();
    assert!(
        err.contains("expert-test-1") && err.contains("expert-test-2"),
        "{err}"
    );

    // Leaving still removes it at once (the lease is the one the updates used).
    registration.deregister().await;
    assert_eq!(listed(&mut rx, &[]).await, Vec::<u32>::new());
}
