//! Discovery of the mesh's processes.
//!
//! Gates and expert workers announce themselves as [`Member`]s under
//! `/moemesh/<cluster>/<model>/<role>/<id>` (JSON values a watcher can act on alone); frontends
//! watch gates and gates watch expert workers. [`Registry::Etcd`] is the production backend
//! (leases with keep-alive, watches that resume from the last revision, the last known table kept
//! through an etcd outage); [`Registry::Static`] is a fixed list for the single-machine quick
//! start, where `moemesh up` knows every address.

pub mod etcd;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::MeshResult;
use crate::placement::{self, Holdings};

/// The two kinds of registered processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Gate,
    Expert,
}

impl Role {
    /// The role's name (`gate`, `expert`), as in metric labels and the ready line.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Gate => "gate",
            Role::Expert => "expert",
        }
    }

    pub fn key_segment(&self) -> &'static str {
        match self {
            Role::Gate => "gates",
            Role::Expert => "experts",
        }
    }
}

/// One registered process, as stored (JSON) under its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Unique id of the process (e.g. `expert-<host>-<port>`).
    pub id: String,
    pub role: Role,
    /// `host:port` it serves gRPC on.
    pub address: String,
    /// Expert workers: the MoE layers they hold.
    #[serde(default)]
    pub layers: Vec<u32>,
    /// Expert workers: the routed experts they hold in each of those layers that
    /// `layer_experts` does not list. A worker whose layers differ writes here the experts
    /// common to all of them, so that a reader that knows only this field (an older gate) never
    /// routes to an expert the worker lacks.
    #[serde(default)]
    pub experts: Vec<u32>,
    /// Expert workers: per layer, the routed experts held there, for a worker whose layers hold
    /// different experts (a per-layer `SetExperts`); empty while every layer holds `experts`.
    /// Read through [`Member::holdings`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_experts: Vec<LayerExperts>,
    /// `cpu` or `cuda:N`.
    #[serde(default)]
    pub device: String,
    /// Hash of the model's config and weights; a gate refuses workers whose fingerprint differs.
    pub fingerprint: String,
    /// moemesh version of the process.
    #[serde(default)]
    pub version: String,
}

/// The routed experts an expert worker holds in one MoE layer (a registry value's
/// `layer_experts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerExperts {
    /// Decoder layer index.
    pub layer: u32,
    /// Routed experts held there, ascending.
    pub experts: Vec<u32>,
}

impl Member {
    /// What an expert worker holds, per layer it serves: a layer's `layer_experts` entry, else
    /// `experts`.
    pub fn holdings(&self) -> Holdings {
        placement::holdings_from_compact(
            &self.layers,
            |l| {
                self.layer_experts
                    .iter()
                    .find(|le| le.layer == l)
                    .map(|le| &le.experts)
            },
            &self.experts,
        )
    }

    /// Sets `layers`, `experts` and `layer_experts` to list `h` (the compact form, `experts`
    /// alone, while every layer holds the same experts).
    pub fn set_holdings(&mut self, h: &Holdings) {
        self.layers = h.keys().copied().collect();
        self.experts = placement::common_experts(h);
        self.layer_experts = if placement::is_uniform(h) {
            Vec::new()
        } else {
            h.iter()
                .map(|(&layer, experts)| LayerExperts {
                    layer,
                    experts: experts.clone(),
                })
                .collect()
        };
    }
}

/// Where the registry lives and which mesh this process belongs to.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// etcd endpoints; empty means the static registry.
    pub etcd: Vec<String>,
    /// Cluster name, the second segment of every key.
    pub cluster: String,
    /// Model name, the third segment of every key.
    pub model: String,
    /// Lease time-to-live in seconds: how long a dead process stays listed.
    pub lease_ttl_s: i64,
    /// The role's TLS files, used for `https://` endpoints (client certificate and CA).
    pub tls: Option<std::sync::Arc<crate::tls::Tls>>,
}

impl RegistryConfig {
    /// `/moemesh/<cluster>/<model>/<role>/`.
    pub fn prefix(&self, role: Role) -> String {
        format!(
            "/moemesh/{}/{}/{}/",
            self.cluster,
            self.model,
            role.key_segment()
        )
    }
}

/// A process's presence in the registry; dropping it without [`Registration::deregister`]
/// leaves the lease to expire.
pub struct Registration {
    inner: Option<etcd::EtcdRegistration>,
}

impl Registration {
    /// Whether this process is listed in the registry now (always true for the static one).
    /// Turns false when etcd reports the registration lost and true once it is written again.
    pub fn registered(&self) -> watch::Receiver<bool> {
        match &self.inner {
            Some(r) => r.registered(),
            None => watch::channel(true).1,
        }
    }

    /// Changes what the registry lists for this process (same id and role), e.g. an expert
    /// worker's experts after it loaded more; returns once watchers can see it. The static
    /// registry's lists never change: a no-op there.
    pub async fn update(&mut self, member: Member) -> MeshResult<()> {
        match &mut self.inner {
            Some(r) => r.update(member).await,
            None => Ok(()),
        }
    }

    /// Leaves the registry now (revokes the lease), so watchers stop sending work at once.
    pub async fn deregister(self) {
        if let Some(r) = self.inner {
            r.deregister().await;
        }
    }
}

#[derive(Clone)]
pub enum Registry {
    Etcd(etcd::EtcdRegistry),
    /// A fixed member list (no announcements, no changes).
    Static(Vec<Member>),
}

impl Registry {
    /// Connects to etcd when endpoints are configured (retrying in the background if etcd is
    /// down), else a static registry with `members`.
    pub fn new(cfg: &RegistryConfig, members: Vec<Member>) -> MeshResult<Self> {
        if cfg.etcd.is_empty() {
            Ok(Registry::Static(members))
        } else {
            Ok(Registry::Etcd(etcd::EtcdRegistry::new(cfg.clone())?))
        }
    }

    /// Announces `member` (etcd: under a lease kept alive on its own task).
    pub async fn register(&self, member: Member) -> MeshResult<Registration> {
        match self {
            Registry::Etcd(e) => Ok(Registration {
                inner: Some(e.register(member).await?),
            }),
            Registry::Static(_) => Ok(Registration { inner: None }),
        }
    }

    /// Like [`watch`](Self::watch), but returns once the first listing has arrived (at most
    /// `limit` later), so a process does not report ready with an empty view of the mesh.
    pub async fn watch_synced(
        &self,
        role: Role,
        limit: std::time::Duration,
    ) -> watch::Receiver<Vec<Member>> {
        let mut rx = self.watch(role);
        if matches!(self, Registry::Etcd(_))
            && tokio::time::timeout(limit, rx.changed()).await.is_err()
        {
            tracing::warn!(
                ?role,
                "no registry listing yet (etcd unreachable?); starting with an empty view"
            );
        }
        rx
    }

    /// The live members of `role`, kept current by a background task.
    pub fn watch(&self, role: Role) -> watch::Receiver<Vec<Member>> {
        match self {
            Registry::Etcd(e) => e.watch(role),
            Registry::Static(members) => {
                let list = members.iter().filter(|m| m.role == role).cloned().collect();
                let (tx, rx) = watch::channel(list);
                // Keep the sender alive for the life of the process: the list never changes.
                std::mem::forget(tx);
                rx
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker() -> Member {
        Member {
            id: "w".into(),
            role: Role::Expert,
            address: "127.0.0.1:1".into(),
            layers: vec![1, 2],
            experts: vec![0, 1],
            layer_experts: Vec::new(),
            device: "cpu".into(),
            fingerprint: "fp".into(),
            version: String::new(),
        }
    }

    /// A uniform worker's value is the old form (no `layer_experts` key); a per-layer one lists
    /// every layer and keeps in `experts` what all of them hold, which is all an older reader
    /// routes to; a value without the key reads as before.
    #[test]
    fn holdings_round_trip_through_the_registry_value_and_old_values_still_read() {
        let mut m = worker();
        assert_eq!(m.holdings(), placement::uniform(&[1, 2], &[0, 1]));
        let json = serde_json::to_string(&m).expect("json");
        assert!(!json.contains("layer_experts"), "{json}");
        let per_layer = Holdings::from([(1, vec![0, 1, 2]), (2, vec![1, 3])]);
        m.set_holdings(&per_layer);
        assert_eq!(m.experts, vec![1]);
        assert_eq!(m.layer_experts.len(), 2);
        let back: Member =
            serde_json::from_str(&serde_json::to_string(&m).expect("json")).expect("parse");
        assert_eq!(back.holdings(), per_layer);
        // Back to uniform: the compact form again.
        m.set_holdings(&placement::uniform(&[1, 2], &[4]));
        assert!(m.layer_experts.is_empty());
        assert_eq!(m.holdings(), placement::uniform(&[1, 2], &[4]));
        // An older writer's value.
        let old = r#"{"id":"w","role":"expert","address":"a:1","layers":[1,2],"experts":[5],"fingerprint":"fp"}"#;
        let old: Member = serde_json::from_str(old).expect("old value");
        assert_eq!(old.holdings(), placement::uniform(&[1, 2], &[5]));
    }
}
