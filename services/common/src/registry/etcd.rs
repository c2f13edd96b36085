//! The etcd backend.
//!
//! - One lease per registration, kept alive every ttl/3 on its own task (a busy engine cannot
//!   starve it); each round also checks that the key is still there under that lease. If etcd
//!   goes away the task keeps retrying, every call bounded in time. When the lease is gone
//!   (expired during a stall of this process or of etcd, revoked, or etcd restored from an older
//!   snapshot) it grants a new lease and writes the key again; a missing key is written again.
//!   Registrations return on their own, and [`EtcdRegistration::registered`] says false meanwhile.
//! - A registration's value can be changed while it lives ([`EtcdRegistration::update`], e.g. an
//!   expert worker announcing experts it has just loaded): the same task writes it under the same
//!   lease and answers once etcd has it, and later re-registrations write the new value.
//! - Watchers list the prefix, then watch from the next revision; on any error they reconnect,
//!   list again and watch from there (so a compacted revision or a store restored from an older
//!   snapshot cannot leave them waiting). Until then the last known member list stays in force:
//!   an etcd outage does not stop serving.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Member, RegistryConfig, Role};
use crate::error::{MeshError, MeshResult};
use crate::metrics::names;

const RETRY: Duration = Duration::from_millis(500);
/// Bound on each etcd call of the keep-alive loop (a paused etcd accepts TCP and never answers).
const ETCD_CALL: Duration = Duration::from_secs(3);

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
        let (registered_tx, registered) = watch::channel(true);
        let (update_tx, update_rx) = mpsc::channel(1);
        let entry = Entry {
            role: member.role.name(),
            key,
            value,
        };
        let task = tokio::spawn(keep_alive(
            self.cfg.clone(),
            entry,
            client,
            lease,
            registered_tx,
            Control {
                stop: stop_rx,
                update: update_rx,
            },
        ));
        Ok(EtcdRegistration {
            stop: Some(stop_tx),
            update: update_tx,
            task,
            member,
            registered,
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
    /// New values for the key, each answered once written (or not).
    update: mpsc::Sender<Update>,
    task: tokio::task::JoinHandle<()>,
    /// What the key says now (its id and role name the key).
    member: Member,
    /// Whether the key is known to be in etcd: false from the moment etcd reports the lease
    /// gone (or the key missing) until it is written again; unchanged while etcd is unreachable.
    registered: watch::Receiver<bool>,
}

impl EtcdRegistration {
    pub fn registered(&self) -> watch::Receiver<bool> {
        self.registered.clone()
    }

    /// Rewrites the key with `member` (same id and role) under the registration's lease;
    /// returns once etcd has it, so watchers see the new value from then on.
    pub async fn update(&mut self, member: Member) -> MeshResult<()> {
        if member.id != self.member.id || member.role != self.member.role {
            return Err(MeshError::Invalid(format!(
                "a registration update must keep its id and role ({} {}), got {} {}",
                self.member.role.name(),
                self.member.id,
                member.role.name(),
                member.id
            )));
        }
        let value =
            serde_json::to_string(&member).map_err(|e| MeshError::Internal(e.to_string()))?;
        let (done, written) = oneshot::channel();
        let gone = || MeshError::Registry("the registration's keep-alive task has ended".into());
        self.update.send((value, done)).await.map_err(|_| gone())?;
        written.await.map_err(|_| gone())??;
        self.member = member;
        Ok(())
    }

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

/// What a registration writes: `value` under `key`, for a process of `role`.
struct Entry {
    role: &'static str,
    key: String,
    value: String,
}

/// A new value for the key, and where to say whether it was written.
type Update = (String, oneshot::Sender<MeshResult<()>>);

/// What the owner of a registration tells its keep-alive task.
struct Control {
    stop: oneshot::Receiver<()>,
    update: mpsc::Receiver<Update>,
}

async fn keep_alive(
    cfg: RegistryConfig,
    entry: Entry,
    mut client: Client,
    mut lease: i64,
    registered: watch::Sender<bool>,
    control: Control,
) {
    let Entry {
        role,
        key,
        mut value,
    } = entry;
    let Control {
        mut stop,
        mut update,
    } = control;
    let period = Duration::from_millis((cfg.lease_ttl_s as u64 * 1000) / 3);
    let mut healthy = true;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some((new, done)) = update.recv() => {
                let put = client.put(
                    key.as_str(),
                    new.as_str(),
                    Some(PutOptions::new().with_lease(lease)),
                );
                let result = match tokio::time::timeout(ETCD_CALL, put).await {
                    Ok(Ok(_)) => {
                        tracing::info!(%key, value = %new, "registration updated");
                        value = new;
                        Ok(())
                    }
                    Ok(Err(e)) => {
                        etcd_error("register");
                        Err(MeshError::Registry(format!("updating {key}: {e}")))
                    }
                    Err(_) => {
                        etcd_error("register");
                        Err(MeshError::Registry(format!("updating {key}: {}", too_slow())))
                    }
                };
                // (Then a keep-alive round, so that a run of updates cannot hold renewals off.)
                let _ = done.send(result);
            }
            _ = tokio::time::sleep(if healthy { period } else { RETRY }) => {}
        }
        match renew(&mut client, lease, &key).await {
            Ok(Renewal::Alive) => {
                metrics::counter!(names::LEASE_RENEWALS, "role" => role).increment(1);
                if !healthy {
                    tracing::info!(%key, "etcd reachable again; lease still valid");
                }
                healthy = true;
                registered.send_replace(true);
            }
            Ok(gone) => {
                // The lease expired (a stall or an etcd outage longer than the TTL), was
                // revoked, or the key went (deleted, or etcd restored from a snapshot): this
                // process is invisible to watchers until it is written again.
                registered.send_replace(false);
                let write = async {
                    match gone {
                        Renewal::KeyMissing => client
                            .put(
                                key.as_str(),
                                value.as_str(),
                                Some(PutOptions::new().with_lease(lease)),
                            )
                            .await
                            .map(|_| lease),
                        _ => put_with_lease(&mut client, &key, &value, cfg.lease_ttl_s).await,
                    }
                };
                let result = tokio::time::timeout(2 * ETCD_CALL, write)
                    .await
                    .unwrap_or_else(|_| Err(too_slow()));
                match result {
                    Ok(l) => {
                        tracing::warn!(%key, lease = l, reason = gone.as_str(), "registration was lost; registered again");
                        metrics::counter!(names::REREGISTRATIONS, "role" => role).increment(1);
                        lease = l;
                        healthy = true;
                        registered.send_replace(true);
                    }
                    Err(e) => {
                        etcd_error("register");
                        tracing::warn!(%key, error = %e, "re-registering failed; retrying");
                        healthy = false;
                    }
                }
            }
            Err(e) => {
                // etcd unreachable or slow: keep serving (the last state stands) and retry.
                etcd_error("keepalive");
                if healthy {
                    tracing::warn!(%key, error = %e, "lease keep-alive failed; retrying");
                }
                healthy = false;
                if let Ok(Ok(c)) = tokio::time::timeout(ETCD_CALL, connect(&cfg)).await {
                    client = c;
                }
            }
        }
    }
    // Revoke first so watchers drop us at once instead of after the TTL.
    match tokio::time::timeout(ETCD_CALL, client.lease_revoke(lease)).await {
        Ok(Ok(_)) => tracing::info!(%key, "deregistered"),
        Ok(Err(e)) => {
            etcd_error("revoke");
            tracing::warn!(%key, error = %e, "revoking the lease failed; it will expire")
        }
        Err(_) => {
            etcd_error("revoke");
            tracing::warn!(%key, "revoking the lease timed out; it will expire")
        }
    }
}

/// The error for an etcd call that ran past [`ETCD_CALL`].
fn too_slow() -> etcd_client::Error {
    etcd_client::Error::WatchError("etcd did not answer in time".into())
}

/// What one keep-alive round found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewal {
    /// The lease is renewed and the key is there, under it.
    Alive,
    /// etcd says the lease does not exist (expired or revoked): a new lease is needed.
    LeaseGone,
    /// The lease lives but the key is not ours any more (deleted, or an older snapshot).
    KeyMissing,
}

impl Renewal {
    fn as_str(self) -> &'static str {
        match self {
            Renewal::Alive => "alive",
            Renewal::LeaseGone => "lease expired or revoked",
            Renewal::KeyMissing => "key missing",
        }
    }
}

/// One keep-alive round trip plus a check that the key still carries the lease. Every etcd call
/// is bounded by [`ETCD_CALL`], so a paused or partitioned etcd cannot stall the loop. `Err` means
/// etcd could not be asked (unreachable, slow); the `Renewal` variants are etcd's own answers.
async fn renew(client: &mut Client, lease: i64, key: &str) -> Result<Renewal, etcd_client::Error> {
    // etcd-client sends the first keep-alive itself and reads its answer: a TTL of 0 comes back
    // as `LeaseKeepAliveError("lease not found")`.
    match tokio::time::timeout(ETCD_CALL, client.lease_keep_alive(lease)).await {
        Err(_) => return Err(too_slow()),
        Ok(Err(etcd_client::Error::LeaseKeepAliveError(msg))) if msg.contains("not found") => {
            return Ok(Renewal::LeaseGone);
        }
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) => {}
    }
    let resp = tokio::time::timeout(ETCD_CALL, client.get(key, None))
        .await
        .map_err(|_| too_slow())??;
    Ok(match resp.kvs().first() {
        Some(kv) if kv.lease() == lease => Renewal::Alive,
        _ => Renewal::KeyMissing,
    })
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
    // Whether a first listing was sent (an empty one counts).
    let mut synced = false;
    let mut logged_down = false;
    loop {
        if tx.is_closed() {
            return;
        }
        let result = async {
            let mut client = connect(&cfg).await?;
            // A fresh listing on every (re)connect, not only the first: after an outage the
            // store may have been compacted past our revision or restored from an older
            // snapshot (whose revisions are behind ours, so a watch from our revision would
            // wait for ever). The listing is a few small keys.
            let resp = client
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await?;
            let listed: BTreeMap<String, Member> = resp.kvs().iter().filter_map(parse).collect();
            revision = resp.header().map(|h| h.revision());
            if listed != members || !synced {
                members = listed;
                synced = true;
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
