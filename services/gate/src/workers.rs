//! Expert workers as the gate sees them: one client per worker (a long-lived `Expert.Forward`
//! stream, calls matched to replies by id) and the routing table (layer, expert) → replicas,
//! rebuilt from every registry update. Workers whose model fingerprint differs from the gate's
//! are refused, loudly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use moemesh_common::registry::Member;
use moemesh_common::tls::{self, Tls};
use moemesh_common::{MeshError, MeshResult};
use moemesh_proto::v1::expert_client::ExpertClient;
use moemesh_proto::v1::{ForwardRequest, ForwardResponse};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<ForwardResponse, Status>>>>>;

/// One open `Forward` stream.
struct Conn {
    tx: mpsc::Sender<ForwardRequest>,
    waiters: Waiters,
    alive: Arc<AtomicBool>,
}

/// A worker and its (lazily opened, reopened after failure) stream.
pub struct WorkerClient {
    pub member: Member,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    next_call: AtomicU64,
    /// The TLS files for this hop (a reopened stream takes them as they are then).
    tls: Option<Arc<Tls>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl WorkerClient {
    fn new(member: Member, tls: Option<Arc<Tls>>) -> Self {
        WorkerClient {
            member,
            conn: tokio::sync::Mutex::new(None),
            next_call: AtomicU64::new(1),
            tls,
        }
    }

    fn peer_err(&self, what: impl std::fmt::Display) -> MeshError {
        MeshError::Unavailable(format!(
            "expert worker {} ({}): {what}",
            self.member.id, self.member.address
        ))
    }

    async fn connection(&self) -> MeshResult<Arc<Conn>> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref()
            && c.alive.load(Ordering::SeqCst)
        {
            return Ok(c.clone());
        }
        let endpoint = tls::endpoint(&self.member.address, self.tls.as_deref())
            .map_err(|e| self.peer_err(e))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        let channel = endpoint.connect().await.map_err(|e| self.peer_err(e))?;
        let mut client = ExpertClient::new(channel)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        let (tx, rx) = mpsc::channel(16);
        let mut replies = client
            .forward(ReceiverStream::new(rx))
            .await
            .map_err(|e| self.peer_err(e))?
            .into_inner();
        let waiters: Waiters = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (w, a, id) = (waiters.clone(), alive.clone(), self.member.id.clone());
        tokio::spawn(async move {
            let end = loop {
                match replies.message().await {
                    Ok(Some(r)) => {
                        if let Some(waiter) = lock(&w).remove(&r.call_id) {
                            let _ = waiter.send(Ok(r));
                        }
                    }
                    Ok(None) => break Status::unavailable("stream closed"),
                    Err(s) => break s,
                };
            };
            tracing::debug!(worker = %id, status = %end, "expert stream ended");
            a.store(false, Ordering::SeqCst);
            for (_, waiter) in lock(&w).drain() {
                let _ = waiter.send(Err(end.clone()));
            }
        });
        let conn = Arc::new(Conn { tx, waiters, alive });
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// One call: sends `req` (its call_id is assigned here) and waits for the reply.
    pub async fn call(
        &self,
        mut req: ForwardRequest,
        timeout: Duration,
    ) -> MeshResult<ForwardResponse> {
        let conn = self.connection().await?;
        req.call_id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&conn.waiters).insert(req.call_id, tx);
        if conn.tx.send(req).await.is_err() {
            conn.alive.store(false, Ordering::SeqCst);
            return Err(self.peer_err("stream closed"));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(r))) => Ok(r),
            Ok(Ok(Err(status))) if status.code() == tonic::Code::InvalidArgument => {
                Err(MeshError::Internal(format!(
                    "expert worker {} rejected a call: {}",
                    self.member.id,
                    status.message()
                )))
            }
            Ok(Ok(Err(status))) => Err(self.peer_err(status.message())),
            Ok(Err(_)) => Err(self.peer_err("stream closed")),
            Err(_) => {
                conn.alive.store(false, Ordering::SeqCst);
                Err(self.peer_err(format!("no reply within {timeout:?}")))
            }
        }
    }
}

#[derive(Default)]
struct PoolState {
    workers: BTreeMap<String, Arc<WorkerClient>>,
    /// (layer, expert) → ids of workers serving it.
    table: HashMap<(u32, u32), Vec<String>>,
    /// Workers that failed a call recently, until when to avoid them.
    suspect: HashMap<String, Instant>,
    /// (id, fingerprint) pairs already reported as refused.
    refused: HashSet<(String, String)>,
}

/// The gate's view of the expert workers.
pub struct WorkerPool {
    state: RwLock<PoolState>,
    fingerprint: String,
    rr: AtomicU64,
    /// The gate's TLS files, for every worker's stream; `None` with --plaintext.
    tls: Option<Arc<Tls>>,
}

const SUSPECT_FOR: Duration = Duration::from_secs(2);

impl WorkerPool {
    pub fn new(fingerprint: String, tls: Option<Arc<Tls>>) -> Self {
        WorkerPool {
            state: RwLock::new(PoolState::default()),
            fingerprint,
            rr: AtomicU64::new(0),
            tls,
        }
    }

    /// Replaces the member list (from the registry). Existing clients are kept when a worker's
    /// id and address are unchanged.
    pub fn update(&self, members: &[Member]) {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        let mut workers = BTreeMap::new();
        let mut table: HashMap<(u32, u32), Vec<String>> = HashMap::new();
        for m in members {
            if m.fingerprint != self.fingerprint {
                if st.refused.insert((m.id.clone(), m.fingerprint.clone())) {
                    tracing::error!(
                        worker = %m.id, address = %m.address, theirs = %m.fingerprint, ours = %self.fingerprint,
                        "refusing expert worker: its model fingerprint differs from this gate's (a different model or version)"
                    );
                }
                continue;
            }
            let client = match st.workers.get(&m.id) {
                Some(c) if c.member == *m => c.clone(),
                _ => Arc::new(WorkerClient::new(m.clone(), self.tls.clone())),
            };
            for &l in &m.layers {
                for &e in &m.experts {
                    table.entry((l, e)).or_default().push(m.id.clone());
                }
            }
            workers.insert(m.id.clone(), client);
        }
        let added: Vec<&String> = workers
            .keys()
            .filter(|k| !st.workers.contains_key(*k))
            .collect();
        let removed: Vec<&String> = st
            .workers
            .keys()
            .filter(|k| !workers.contains_key(*k))
            .collect();
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(
                ?added,
                ?removed,
                live = workers.len(),
                "expert workers changed"
            );
        }
        st.workers = workers;
        st.table = table;
    }

    /// How many of the (layer, expert) pairs in `layers` × `0..experts` no accepted worker serves.
    pub fn missing(&self, layers: &[u32], experts: u32) -> usize {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        layers
            .iter()
            .flat_map(|&l| (0..experts).map(move |e| (l, e)))
            .filter(|k| st.table.get(k).is_none_or(|ids| ids.is_empty()))
            .count()
    }

    /// Live workers (accepted ones).
    pub fn members(&self) -> Vec<Member> {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        st.workers.values().map(|w| w.member.clone()).collect()
    }

    pub fn mark_failed(&self, id: &str) {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.suspect
            .insert(id.to_string(), Instant::now() + SUSPECT_FOR);
    }

    /// Starts a new dispatch round (advances the replica rotation).
    pub fn next_round(&self) -> u64 {
        self.rr.fetch_add(1, Ordering::Relaxed)
    }

    /// A worker for (layer, expert), avoiding `excluded` and (when possible) recently failed
    /// ones; rotates over replicas by `round`.
    pub fn pick(
        &self,
        layer: u32,
        expert: u32,
        excluded: &HashSet<String>,
        round: u64,
    ) -> MeshResult<Arc<WorkerClient>> {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        let Some(ids) = st.table.get(&(layer, expert)) else {
            return Err(MeshError::Unavailable(format!(
                "no live expert worker serves (layer {layer}, expert {expert})"
            )));
        };
        let now = Instant::now();
        let usable: Vec<&String> = ids.iter().filter(|id| !excluded.contains(*id)).collect();
        let healthy: Vec<&String> = usable
            .iter()
            .copied()
            .filter(|id| st.suspect.get(*id).is_none_or(|t| *t < now))
            .collect();
        let choices = if healthy.is_empty() { usable } else { healthy };
        if choices.is_empty() {
            return Err(MeshError::Unavailable(format!(
                "every expert worker serving (layer {layer}, expert {expert}) failed: {ids:?}"
            )));
        }
        let id = choices[(round as usize) % choices.len()];
        st.workers
            .get(id)
            .cloned()
            .ok_or_else(|| MeshError::Internal(format!("routing table names unknown worker {id}")))
    }
}
