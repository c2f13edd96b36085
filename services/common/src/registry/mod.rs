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
    /// Expert workers: the routed experts they hold in each of those layers.
    #[serde(default)]
    pub experts: Vec<u32>,
    /// `cpu` or `cuda:N`.
    #[serde(default)]
    pub device: String,
    /// Hash of the model's config and weights; a gate refuses workers whose fingerprint differs.
    pub fingerprint: String,
    /// moemesh version of the process.
    #[serde(default)]
    pub version: String,
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
