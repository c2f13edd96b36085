//! The etcd backend.
//!
//! - One lease per registration, kept alive every ttl/3 on its own task (a busy engine cannot
//!   starve it). If etcd goes away the task keeps retrying; when etcd is back and the lease has
//!   expired, it grants a new lease and writes the key again, so registrations return on their own.
//! - Watchers list the prefix, then watch from the next revision; on any error they reconnect
//!   and resume from the last revision seen (re-listing if that revision was compacted). Until
//!   then the last known member list stays in force: an etcd outage does not stop serving.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::{oneshot, watch};

use super::{Member, RegistryConfig, Role};
use crate::error::{MeshError, MeshResult};
use crate::metrics::names;

const RETRY: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct EtcdRegistry {
    cfg: RegistryConfig,
}

/// Connects to etcd; `https://` endpoints get TLS with the role's files as they are now (etcd's
/// channel redials with that config, so changed files reach etcd at the next reconnect here).
async fn connect(cfg: &RegistryConfig) -> Result<Client, etcd_client::Error> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(3));
    if let Some(tls) = &cfg.tls
        && uses_tls(cfg)
    {
        opts = opts.with_tls(tls.client_config());
    }
    Client::connect(&cfg.etcd, Some(opts)).await
}

fn uses_tls(cfg: &RegistryConfig) -> bool {
    cfg.etcd.iter().any(|e| e.starts_with("https://"))
}

impl EtcdRegistry {
    pub fn new(cfg: RegistryConfig) -> MeshResult<Self> {
        if cfg.lease_ttl_s < 2 {
            return Err(MeshError::Invalid(format!(
                "registry lease TTL must be at least 2 s, got {}",
                cfg.lease_ttl_s
            )));
        }
        if uses_tls(&cfg) && cfg.tls.is_none() {
            return Err(MeshError::Invalid(format!(
                "--etcd {:?}: https endpoints need the TLS files (--tls-cert, --tls-key, --tls-ca)",
                cfg.etcd
            )));
        }
        Ok(EtcdRegistry { cfg })
    }

    /// Writes the member under a fresh lease, then keeps it there until deregistered.
    pub async fn register(&self, member: Member) -> MeshResult<EtcdRegistration> {
        let key = format!("{}{}", self.cfg.prefix(member.role), member.id);
        let value =
            serde_json::to_string(&member).map_err(|e| MeshError::Internal(e.to_string()))?;
        // The first write is synchronous so that "registered" means visible to watchers.
        let mut client = connect(&self.cfg).await.map_err(|e| {
            MeshError::Registry(format!("cannot reach etcd at {:?}: {e}", self.cfg.etcd))
        })?;
        let lease = put_with_lease(&mut client, &key, &value, self.cfg.lease_ttl_s)
            .await
            .map_err(|e| {
                etcd_error("register");
                MeshError::Registry(format!("registering {key}: {e}"))
            })?;
        tracing::info!(%key, lease, "registered");
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(keep_alive(
            self.cfg.clone(),
            member.role.name(),
            client,
            key,
            value,
            lease,
            stop_rx,
        ));
        Ok(EtcdRegistration {
            stop: Some(stop_tx),
            task,
        })
    }

    pub fn watch(&self, role: Role) -> watch::Receiver<Vec<Member>> {
        let (tx, rx) = watch::channel(Vec::new());
        tokio::spawn(watch_prefix(
            self.cfg.clone(),
            self.cfg.prefix(role),
            role.name(),
            tx,
        ));
        rx
    }
}

async fn put_with_lease(
    client: &mut Client,
    key: &str,
    value: &str,
    ttl: i64,
) -> Result<i64, etcd_client::Error> {
    let lease = client.lease_grant(ttl, None).await?.id();
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await?;
    Ok(lease)
}

/// A live registration: its keep-alive task and the way to stop it.
pub struct EtcdRegistration {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl EtcdRegistration {
    pub async fn deregister(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Counts a failed etcd operation (`op`: keepalive, register, watch, revoke).
fn etcd_error(op: &'static str) {
    metrics::counter!(names::ETCD_ERRORS, "op" => op).increment(1);
}

async fn keep_alive(
    cfg: RegistryConfig,
    role: &'static str,
    mut client: Client,
    key: String,
    value: String,
    mut lease: i64,
    mut stop: oneshot::Receiver<()>,
) {
    let period = Duration::from_millis((cfg.lease_ttl_s as u64 * 1000) / 3);
    let mut healthy = true;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(if healthy { period } else { RETRY }) => {}
        }
        match renew(&mut client, lease).await {
            Ok(true) => {
                metrics::counter!(names::LEASE_RENEWALS, "role" => role).increment(1);
                if !healthy {
                    tracing::info!(%key, "etcd reachable again; lease still valid");
                }
                healthy = true;
            }
            Ok(false) => {
                // The lease expired while etcd was unreachable: register again.
                match put_with_lease(&mut client, &key, &value, cfg.lease_ttl_s).await {
                    Ok(l) => {
                        tracing::info!(%key, lease = l, "lease had expired; registered again");
                        lease = l;
                        healthy = true;
                    }
                    Err(e) => {
                        etcd_error("register");
                        tracing::warn!(%key, error = %e, "re-registering failed; retrying");
                        healthy = false;
                    }
                }
            }
            Err(e) => {
                etcd_error("keepalive");
                if healthy {
                    tracing::warn!(%key, error = %e, "lease keep-alive failed; retrying");
                }
                healthy = false;
                if let Ok(c) = connect(&cfg).await {
                    client = c;
                }
            }
        }
    }
    // Revoke first so watchers drop us at once instead of after the TTL.
    match client.lease_revoke(lease).await {
        Ok(_) => tracing::info!(%key, "deregistered"),
        Err(e) => {
            etcd_error("revoke");
            tracing::warn!(%key, error = %e, "revoking the lease failed; it will expire")
        }
    }
}

/// One keep-alive round trip: `Ok(false)` when etcd says the lease no longer exists.
async fn renew(client: &mut Client, lease: i64) -> Result<bool, etcd_client::Error> {
    let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
    keeper.keep_alive().await?;
    match tokio::time::timeout(Duration::from_secs(3), stream.message()).await {
        Ok(Ok(Some(resp))) => Ok(resp.ttl() > 0),
        Ok(Ok(None)) => Ok(false),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(etcd_client::Error::WatchError(
            "keep-alive response timed out".into(),
        )),
    }
}

fn parse(kv: &etcd_client::KeyValue) -> Option<(String, Member)> {
    let key = kv.key_str().ok()?.to_string();
    match serde_json::from_slice::<Member>(kv.value()) {
        Ok(m) => Some((key, m)),
        Err(e) => {
            tracing::warn!(%key, error = %e, "ignoring a registry entry that is not a moemesh member");
            None
        }
    }
}

async fn watch_prefix(
    cfg: RegistryConfig,
    prefix: String,
    role: &'static str,
    tx: watch::Sender<Vec<Member>>,
) {
    let members_gauge = metrics::gauge!(names::REGISTRY_MEMBERS, "role" => role);
    let mut members: BTreeMap<String, Member> = BTreeMap::new();
    let mut revision: Option<i64> = None;
    let mut logged_down = false;
    loop {
        if tx.is_closed() {
            return;
        }
        let result = async {
            let mut client = connect(&cfg).await?;
            if revision.is_none() {
                let resp = client
                    .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                    .await?;
                members = resp.kvs().iter().filter_map(parse).collect();
                revision = resp.header().map(|h| h.revision());
                members_gauge.set(members.len() as f64);
                let _ = tx.send(members.values().cloned().collect());
            }
            let start = revision.unwrap_or(0) + 1;
            let mut stream = client
                .watch(
                    prefix.as_str(),
                    Some(WatchOptions::new().with_prefix().with_start_revision(start)),
                )
                .await?;
            if logged_down {
                tracing::info!(%prefix, "registry watch resumed");
                logged_down = false;
            }
            while let Some(resp) = stream.message().await? {
                if resp.compact_revision() > 0 || resp.canceled() {
                    // Our revision was compacted away: start over from a fresh listing.
                    revision = None;
                    return Ok::<(), etcd_client::Error>(());
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = kv.key_str().unwrap_or_default().to_string();
                    match ev.event_type() {
                        EventType::Put => {
                            if let Some((k, m)) = parse(kv) {
                                members.insert(k, m);
                            }
                        }
                        EventType::Delete => {
                            members.remove(&key);
                        }
                    }
                }
                if let Some(h) = resp.header() {
                    revision = Some(h.revision());
                }
                members_gauge.set(members.len() as f64);
                let _ = tx.send(members.values().cloned().collect());
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            etcd_error("watch");
        }
        if let Err(e) = result
            && !logged_down
        {
            tracing::warn!(%prefix, error = %e, "registry watch interrupted; keeping the last known members");
            logged_down = true;
        }
        tokio::time::sleep(RETRY).await;
    }
}
