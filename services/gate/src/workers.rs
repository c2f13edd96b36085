//! Expert workers as the gate sees them: one client per worker (a long-lived `Expert.Forward`
//! stream, calls matched to replies by id) and the routing table (layer, expert) → replicas,
//! rebuilt from every registry update. Workers whose model fingerprint differs from the gate's
//! are refused, loudly. Every wait on a worker is bounded (stream open, each call); a worker
//! that fails is avoided with a growing backoff and reopened in the background; a worker that
//! leaves the registry has its waiting calls released at once.
//!
//! Placement changes live (issue 22): a worker that `SetExperts` gave new experts re-registers
//! under the same id and address with a new list; its client and stream are kept, and only the
//! routing changes. The gate's engine pins the placement for the length of a step
//! ([`WorkerPool::pin_step`]): every layer of a step routes by the placement the registry listed
//! when the step began, and the next step takes the newest. Retries of failed or refused calls
//! route by the newest placement, so a call that a worker refuses (it gave the expert up) goes
//! to the expert's new holders.
//!
//! When the gate runs on a GPU, opening a worker's stream also offers the worker CUDA IPC
//! (`Expert.OpenTransport`): the gate allocates [`IPC_SLOTS`] pairs of device buffers for it and
//! sends their handles; a worker that maps them gets each call's activations through them, and a
//! worker that refuses (or any error) keeps the gRPC tensor path. The session belongs to the
//! stream: a stream that fails (a hung or dead worker) takes its buffers with it, and the next
//! stream negotiates fresh ones, so a late write from a call that timed out lands nowhere that a
//! later call reads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use moemesh_common::metrics::names;
use moemesh_common::registry::Member;
use moemesh_common::tls::{self, Tls};
use moemesh_common::transport::{self, DeviceLayout, IpcSync, TransportMode, flags};
use moemesh_common::{MeshError, MeshResult, codec};
use moemesh_engine::cuda::ipc::{self, OpenedBuffer, SharedBuffer};
use moemesh_engine::{DType, Device};
use moemesh_proto::v1::expert_client::ExpertClient;
use moemesh_proto::v1::{ForwardRequest, ForwardResponse, OpenTransportRequest};
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<ForwardResponse, Status>>>>>;

/// Buffer slots per (gate, worker) session: one per dispatch in flight at once (the engine's two
/// micro-batches); a third concurrent call to the worker takes gRPC.
pub const IPC_SLOTS: usize = 2;

/// What the gate offers its workers for CUDA IPC.
#[derive(Clone)]
pub struct IpcOffer {
    /// `--expert-transport`.
    pub mode: TransportMode,
    /// The gate's registry id (the worker keeps one session per gate).
    pub gate_id: String,
    /// The gate's compute device; the buffers live there.
    pub device: Device,
    /// The same device as the registry names it (the gate's `--device`, e.g. `cuda:0`): a
    /// replica registered on it, reached over CUDA IPC (so on this host), is on the gate's own
    /// GPU and is preferred (see [`prefer_local`]).
    pub device_name: String,
    /// The activations' compute dtype.
    pub dtype: DType,
    /// The model's hidden size.
    pub hidden: usize,
    /// Rows per buffer (`--expert-ipc-rows`).
    pub rows: usize,
    /// `--expert-ipc-sync`.
    pub sync: IpcSync,
    /// Experts per token (the routing's width in a device-ordered input buffer).
    pub top_k: usize,
}

/// The buffers one call uses: the activations in, the worker's f32 partial sums out.
pub struct IpcSlot {
    /// `[rows, hidden]` in the session's dtype, written by the gate.
    pub input: SharedBuffer,
    /// `[rows, hidden]` f32, written by the worker.
    pub output: SharedBuffer,
    /// Held by the call using the slot, until the output's copy is queued on the gate's stream.
    busy: Arc<tokio::sync::Mutex<()>>,
}

/// The device-ordered side of a session (see `SharedActivations.device_seq` in the proto and
/// docs/DESIGN.md): flags that the two GPUs' streams write and wait for.
pub struct DeviceSync {
    /// The input buffers' layout: rows, then the routing.
    pub layout: DeviceLayout,
    pub top_k: usize,
    /// This gate's flags (`flags::done`, `flags::seen`), written by the worker.
    pub gate_flags: SharedBuffer,
    /// The worker's flags (`flags::ready` per slot), written by this gate.
    pub worker_flags: OpenedBuffer,
    /// Releases this gate's spinning waits on the worker's `done` words once the session breaks:
    /// a host store, so a stream held by a worker that never answers is let go all the same.
    pub release: ipc::ReleaseFlag,
    /// Whether this gate's eager waits on the worker spin in a kernel that polls `release`
    /// ([`transport::gate_may_spin`]); otherwise they are `cuStreamWaitValue32` waits, released
    /// by setting the `done` words past any call number on a stream of their own.
    pub spin: bool,
    /// Per slot, the number of its last call.
    seqs: Vec<AtomicU32>,
    /// Slots, for the flag words' positions.
    pub slots: usize,
}

impl DeviceSync {
    /// The next call number of `slot` (never 0: the flags start at 0).
    pub fn next_seq(&self, slot: usize) -> u32 {
        let s = self.seqs[slot]
            .fetch_add(1, Ordering::SeqCst)
            .wrapping_add(1);
        if s == 0 {
            // Wrapped: skip 0 (the waits compare cyclically, so 1 still follows u32::MAX).
            self.seqs[slot]
                .fetch_add(1, Ordering::SeqCst)
                .wrapping_add(1)
        } else {
            s
        }
    }
}

/// CUDA IPC buffers shared with one worker for the life of one stream.
pub struct IpcSession {
    /// The worker's id for this session.
    pub id: u64,
    /// Rows each buffer holds.
    pub rows: usize,
    /// The input buffers' dtype.
    pub dtype: DType,
    pub slots: Vec<IpcSlot>,
    /// Present when the worker accepted device-ordered calls.
    pub device: Option<DeviceSync>,
    /// Set once the stream failed: no new calls, and device-ordered waits were released.
    broken: AtomicBool,
    /// Unique among this process's sessions (ids are the workers': each worker numbers its own
    /// from 1, so two workers' sessions share ids): what a step's checks of its calls and a
    /// decode graph's plan key sessions by.
    pub nonce: u64,
}

/// The next [`IpcSession::nonce`].
static SESSION_NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A slot held for one call; dropping it frees the slot for the next call.
pub struct SlotGuard {
    pub session: Arc<IpcSession>,
    pub index: usize,
    _busy: OwnedMutexGuard<()>,
}

impl SlotGuard {
    pub fn slot(&self) -> &IpcSlot {
        &self.session.slots[self.index]
    }
}

impl IpcSession {
    /// Whether the session's stream failed (its device-ordered calls were released).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Marks the session failed and releases every device-ordered wait of this gate's stream on
    /// it: spinning waits by its [`ReleaseFlag`](ipc::ReleaseFlag) (a host store), stream waits
    /// (a session that does not spin) by setting each slot's `done` word past any call number in
    /// flight (and never equal to one). Those waits end without their calls, and
    /// [`settle`](crate::remote_experts) fails the step, which sees the session broken.
    pub fn break_and_release(&self) {
        if self.broken.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(d) = &self.device else {
            return;
        };
        tracing::debug!(target: "moemesh_gate::watch", session = self.id, spin = d.spin, "releasing the session's waits");
        d.release.release();
        if d.spin {
            return;
        }
        for (slot, seq) in d.seqs.iter().enumerate() {
            let past = seq
                .load(Ordering::SeqCst)
                .wrapping_add(flags::RELEASE_STRIDE);
            if let Err(e) = d.gate_flags.fill_words_now(flags::done(slot), 1, past) {
                tracing::error!(session = self.id, slot, error = %e, "could not release a device-ordered wait");
            }
        }
    }

    /// Every slot of the session, in index order, for calls of `rows` rows: `None` unless the
    /// buffers hold that many, the session is not broken and no slot is in use (a decode graph's
    /// step holds them all, its layers taking them in turn).
    pub(crate) fn all_slots(self: &Arc<Self>, rows: usize) -> Option<Vec<SlotGuard>> {
        if rows == 0 || rows > self.rows || self.is_broken() {
            return None;
        }
        self.slots
            .iter()
            .enumerate()
            .map(|(index, s)| {
                s.busy.clone().try_lock_owned().ok().map(|g| SlotGuard {
                    session: self.clone(),
                    index,
                    _busy: g,
                })
            })
            .collect()
    }

    /// A free slot for a call of `rows` rows, if the session's buffers hold that many.
    fn try_slot(self: &Arc<Self>, rows: usize) -> Option<SlotGuard> {
        if rows == 0 || rows > self.rows || self.is_broken() {
            return None;
        }
        self.slots.iter().enumerate().find_map(|(index, s)| {
            s.busy.clone().try_lock_owned().ok().map(|g| SlotGuard {
                session: self.clone(),
                index,
                _busy: g,
            })
        })
    }
}

/// One open `Forward` stream.
pub struct Conn {
    pub(crate) tx: mpsc::Sender<ForwardRequest>,
    waiters: Waiters,
    alive: Arc<AtomicBool>,
    /// The CUDA IPC session negotiated with this stream, if the worker accepted one.
    pub(crate) ipc: Option<Arc<IpcSession>>,
}

impl Conn {
    /// Marks the stream dead and answers every call waiting on it with `status` (they are then
    /// retried on another replica), instead of leaving them to their timeout.
    pub(crate) fn fail(&self, status: Status) {
        self.alive.store(false, Ordering::SeqCst);
        if let Some(ipc) = &self.ipc {
            ipc.break_and_release();
        }
        for (_, waiter) in lock(&self.waiters).drain() {
            let _ = waiter.send(Err(status.clone()));
        }
    }
}

/// Ids of [`WorkerClient`]s: a worker that leaves the registry and comes back is a new client,
/// so a failure of the old one does not exclude the new one.
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

/// A worker and its stream: opened lazily or in the background ([`WorkerClient::warm`]),
/// reopened after a failure. Every wait on the worker is bounded: opening the stream
/// (connect, TLS handshake, stream headers) by the connect timeout, a call by its timeout.
pub struct WorkerClient {
    /// The registration the client was made for: its id, address, device and fingerprint hold
    /// for the client's life; its experts may be out of date (the pool's routes say what the
    /// worker holds now).
    pub member: Member,
    /// Per MoE layer the worker serves (fixed for the client's life), the (token, expert) pairs
    /// it computed there for this gate (successful calls on the gRPC and host-ordered paths).
    routed_pairs: BTreeMap<u32, AtomicU64>,
    /// This client's id (see [`NEXT_SERIAL`]).
    pub serial: u64,
    /// The open stream, if any.
    conn: Mutex<Option<Arc<Conn>>>,
    /// Held while a stream is being opened, so concurrent callers share one attempt.
    dial: tokio::sync::Mutex<()>,
    /// A background open is under way.
    warming: AtomicBool,
    /// Set when the worker left the registry: no new calls.
    closed: AtomicBool,
    /// Until when to avoid this worker after a failure; the wait doubles with each failure in a
    /// row (2 s up to 30 s) and resets on a good call.
    suspect_until: Mutex<Option<Instant>>,
    failures: AtomicU32,
    next_call: AtomicU64,
    /// The TLS files for this hop (a reopened stream takes them as they are then).
    tls: Option<Arc<Tls>>,
    connect_timeout: Duration,
    /// What to offer for CUDA IPC when a stream opens; `None`: gRPC only.
    offer: Option<Arc<IpcOffer>>,
    /// The transport the current stream uses ([`transport::PENDING`] before the first).
    transport: Mutex<&'static str>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shortest and longest time a failed worker is avoided.
const SUSPECT_MIN: Duration = Duration::from_secs(2);
const SUSPECT_MAX: Duration = Duration::from_secs(30);

impl WorkerClient {
    fn new(
        member: Member,
        tls: Option<Arc<Tls>>,
        connect_timeout: Duration,
        offer: Option<Arc<IpcOffer>>,
    ) -> Self {
        WorkerClient {
            routed_pairs: member
                .layers
                .iter()
                .map(|&l| (l, AtomicU64::new(0)))
                .collect(),
            member,
            serial: NEXT_SERIAL.fetch_add(1, Ordering::Relaxed),
            conn: Mutex::new(None),
            dial: tokio::sync::Mutex::new(()),
            warming: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            suspect_until: Mutex::new(None),
            failures: AtomicU32::new(0),
            next_call: AtomicU64::new(1),
            tls,
            connect_timeout,
            offer,
            transport: Mutex::new(transport::PENDING),
        }
    }

    /// Counts `pairs` (token, expert) pairs of `layer` that the worker computed for this gate.
    pub fn count_pairs(&self, layer: u32, pairs: u64) {
        if let Some(n) = self.routed_pairs.get(&layer) {
            n.fetch_add(pairs, Ordering::Relaxed);
        }
    }

    /// Per layer it serves, the pairs the worker computed for this gate.
    pub fn routed_pairs(&self) -> BTreeMap<u32, u64> {
        self.routed_pairs
            .iter()
            .map(|(&l, n)| (l, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// The transport this worker's activations take now.
    pub fn transport(&self) -> &'static str {
        *lock(&self.transport)
    }

    /// The open stream and a free CUDA IPC slot of it for a call of `rows` rows, when the stream
    /// is open with an IPC session and a slot is free; otherwise the call takes gRPC.
    pub fn ipc_slot(&self, rows: usize) -> Option<(Arc<Conn>, SlotGuard)> {
        let conn = self.live()?;
        let slot = conn.ipc.as_ref()?.try_slot(rows)?;
        Some((conn, slot))
    }

    /// The open stream and a free slot of its session for a device-ordered call of `rows` rows:
    /// the stream is open, its session accepted device-ordered calls and is not broken.
    pub fn device_slot(&self, rows: usize) -> Option<(Arc<Conn>, SlotGuard)> {
        let conn = self.live()?;
        let session = conn.ipc.as_ref()?;
        session.device.as_ref()?;
        let slot = session.try_slot(rows)?;
        Some((conn, slot))
    }

    /// The open stream and every slot of its session, for a decode graph's step of `rows` rows
    /// (see [`IpcSession::all_slots`]); the session accepted device-ordered calls.
    pub fn device_slots_all(&self, rows: usize) -> Option<(Arc<Conn>, Vec<SlotGuard>)> {
        let conn = self.live()?;
        let session = conn.ipc.as_ref()?;
        session.device.as_ref()?;
        let slots = session.all_slots(rows)?;
        Some((conn, slots))
    }

    /// A call id for a request sent without waiting for its reply (device-ordered calls).
    pub fn next_call_id(&self) -> u64 {
        self.next_call.fetch_add(1, Ordering::Relaxed)
    }

    fn peer_err(&self, what: impl std::fmt::Display) -> MeshError {
        MeshError::Unavailable(format!(
            "expert worker {} ({}): {what}",
            self.member.id, self.member.address
        ))
    }

    /// The open stream, if it is alive.
    pub(crate) fn live(&self) -> Option<Arc<Conn>> {
        lock(&self.conn)
            .as_ref()
            .filter(|c| c.alive.load(Ordering::SeqCst))
            .cloned()
    }

    /// Whether a stream is open now (calls to it need no connect).
    pub fn is_ready(&self) -> bool {
        self.live().is_some()
    }

    /// Whether the worker failed recently and is being avoided.
    pub fn is_suspect(&self, now: Instant) -> bool {
        lock(&self.suspect_until).is_some_and(|t| now < t)
    }

    /// A call or an open failed: avoid the worker for a while, longer with each failure in a row.
    pub fn mark_failed(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(8);
        let wait = (SUSPECT_MIN * (1u32 << n)).min(SUSPECT_MAX);
        *lock(&self.suspect_until) = Some(Instant::now() + wait);
    }

    fn mark_ok(&self) {
        if self.failures.swap(0, Ordering::Relaxed) > 0 {
            *lock(&self.suspect_until) = None;
        }
    }

    /// The worker left the registry (or changed address): calls waiting on it are answered
    /// UNAVAILABLE now, and go to a replica, rather than waiting for their timeout.
    pub fn close(&self, why: &str) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(c) = lock(&self.conn).take() {
            c.fail(
                MeshError::Unavailable(format!("expert worker {}: {why}", self.member.id)).into(),
            );
        }
    }

    /// Opens the stream in the background (once at a time), so that the first call to a new or
    /// recovered worker does not pay for the connect; a worker that cannot be opened in time is
    /// marked failed without any step waiting on it.
    pub fn warm(self: &Arc<Self>) {
        if self.is_ready()
            || self.closed.load(Ordering::SeqCst)
            || self.warming.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.warming.store(false, Ordering::SeqCst);
            return;
        };
        let me = self.clone();
        rt.spawn(async move {
            if let Err(e) = me.connection().await {
                tracing::warn!(worker = %me.member.id, error = %e, "expert worker cannot be reached; avoiding it");
                me.mark_failed();
            }
            me.warming.store(false, Ordering::SeqCst);
        });
    }

    async fn connection(&self) -> MeshResult<Arc<Conn>> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let _dial = self.dial.lock().await;
        if let Some(c) = self.live() {
            return Ok(c);
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.peer_err("left the registry"));
        }
        let conn = tokio::time::timeout(self.connect_timeout, self.open())
            .await
            .map_err(|_| {
                self.peer_err(format!(
                    "no stream within {:?} (connect, handshake and stream open)",
                    self.connect_timeout
                ))
            })??;
        *lock(&self.conn) = Some(conn.clone());
        if self.closed.load(Ordering::SeqCst) {
            // Closed while we were opening: close() found nothing to fail.
            self.close("left the registry");
            return Err(self.peer_err("left the registry"));
        }
        Ok(conn)
    }

    /// Connect, handshake and open the `Forward` stream (bounded by the caller).
    async fn open(&self) -> MeshResult<Arc<Conn>> {
        let endpoint = tls::endpoint(&self.member.address, self.tls.as_deref())
            .map_err(|e| self.peer_err(e))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        let channel = endpoint.connect().await.map_err(|e| self.peer_err(e))?;
        let mut client = ExpertClient::new(channel)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        let ipc = self.negotiate(&mut client).await;
        // Device-ordered calls are queued a whole step ahead (a call per MoE layer per micro-batch)
        // without waiting for replies; the bound only limits a stalled stream.
        let (tx, rx) = mpsc::channel(256);
        let mut replies = client
            .forward(ReceiverStream::new(rx))
            .await
            .map_err(|e| self.peer_err(e))?
            .into_inner();
        let conn = Arc::new(Conn {
            tx,
            waiters: Arc::default(),
            alive: Arc::new(AtomicBool::new(true)),
            ipc,
        });
        let (w, id) = (Arc::downgrade(&conn), self.member.id.clone());
        let waiters = conn.waiters.clone();
        tokio::spawn(async move {
            let end = loop {
                match replies.message().await {
                    Ok(Some(r)) => {
                        if let Some(waiter) = lock(&waiters).remove(&r.call_id) {
                            let _ = waiter.send(Ok(r));
                        }
                    }
                    Ok(None) => break MeshError::Unavailable("stream closed".into()).into(),
                    Err(s) => break s,
                };
            };
            tracing::debug!(worker = %id, status = %end, "expert stream ended");
            match w.upgrade() {
                Some(conn) => conn.fail(end),
                None => {
                    for (_, waiter) in lock(&waiters).drain() {
                        let _ = waiter.send(Err(end.clone()));
                    }
                }
            }
        });
        Ok(conn)
    }

    /// Chooses this stream's transport: offers CUDA IPC when the gate and worker allow it, and
    /// keeps gRPC on any refusal or error. Logs the choice and sets the transport metric.
    async fn negotiate(
        &self,
        client: &mut ExpertClient<tonic::transport::Channel>,
    ) -> Option<Arc<IpcSession>> {
        let offer = self.offer.as_ref()?;
        let choice = transport::gate_choice(
            offer.mode,
            matches!(offer.device, Device::Cuda(_)),
            ipc::available(&offer.device),
            &self.member.device,
        );
        let result = match choice {
            Ok(()) => self.offer_ipc(client, offer).await,
            Err(reason) => Err(reason),
        };
        let chosen = match &result {
            Ok(session) => {
                let sync = if session.device.is_some() {
                    "device"
                } else {
                    "host"
                };
                tracing::info!(worker = %self.member.id, transport = transport::CUDA_IPC, session = session.id, slots = session.slots.len(), rows = session.rows, sync, "expert transport chosen");
                transport::CUDA_IPC
            }
            Err(reason) => {
                tracing::info!(worker = %self.member.id, transport = transport::GRPC, %reason, "expert transport chosen");
                transport::GRPC
            }
        };
        *lock(&self.transport) = chosen;
        for t in [transport::GRPC, transport::CUDA_IPC] {
            metrics::gauge!(names::WORKER_TRANSPORT, "worker" => self.member.id.clone(), "transport" => t)
                .set(if t == chosen { 1.0 } else { 0.0 });
        }
        result.ok()
    }

    /// Allocates this stream's buffers and asks the worker to map them.
    async fn offer_ipc(
        &self,
        client: &mut ExpertClient<tonic::transport::Channel>,
        offer: &IpcOffer,
    ) -> Result<Arc<IpcSession>, String> {
        let device_sync = offer.sync == IpcSync::Device && offer.top_k > 0;
        let layout = DeviceLayout::new(
            offer.rows,
            offer.hidden,
            offer.dtype.size_in_bytes(),
            offer.top_k,
        );
        let in_bytes = if device_sync {
            layout.bytes
        } else {
            offer.rows * offer.hidden * offer.dtype.size_in_bytes()
        };
        let out_bytes = offer.rows * offer.hidden * DType::F32.size_in_bytes();
        let mut slots = Vec::with_capacity(IPC_SLOTS);
        for _ in 0..IPC_SLOTS {
            slots.push(IpcSlot {
                input: SharedBuffer::alloc(&offer.device, in_bytes).map_err(|e| e.to_string())?,
                output: SharedBuffer::alloc(&offer.device, out_bytes).map_err(|e| e.to_string())?,
                busy: Arc::default(),
            });
        }
        let gate_flags = if device_sync {
            let words = flags::gate_words(IPC_SLOTS);
            let buf = SharedBuffer::alloc(&offer.device, 4 * words).map_err(|e| e.to_string())?;
            buf.fill_words_now(0, words, 0).map_err(|e| e.to_string())?;
            match ipc::ReleaseFlag::new(&offer.device) {
                Ok(release) => Some((buf, release)),
                Err(e) => {
                    tracing::warn!(worker = %self.member.id, error = %e, "no release flag for device-ordered calls; this session's calls are host-ordered");
                    None
                }
            }
        } else {
            None
        };
        let device_sync = gate_flags.is_some();
        let mut req = OpenTransportRequest {
            gate_id: offer.gate_id.clone(),
            host_id: transport::host_id(),
            kind: transport::CUDA_IPC.into(),
            rows: offer.rows as u32,
            hidden: offer.hidden as u32,
            dtype: codec::wire_dtype_for(offer.dtype) as i32,
            input_handles: Vec::with_capacity(IPC_SLOTS),
            output_handles: Vec::with_capacity(IPC_SLOTS),
            device_sync,
            top_k: if device_sync { offer.top_k as u32 } else { 0 },
            gate_flags_handle: match &gate_flags {
                Some((b, _)) => b.handle().map_err(|e| e.to_string())?,
                None => Vec::new(),
            },
        };
        for s in &slots {
            req.input_handles
                .push(s.input.handle().map_err(|e| e.to_string())?);
            req.output_handles
                .push(s.output.handle().map_err(|e| e.to_string())?);
        }
        let reply = client
            .open_transport(req)
            .await
            .map_err(|s| format!("OpenTransport: {}", s.message()))?
            .into_inner();
        if reply.session == 0 || reply.transport != transport::CUDA_IPC {
            return Err(format!("the worker refused: {}", reply.reason));
        }
        let device = match (gate_flags, reply.worker_flags_handle.is_empty()) {
            (Some((gate_flags, release)), false) => {
                let bytes = 4 * flags::worker_words(IPC_SLOTS);
                match OpenedBuffer::open(&offer.device, &reply.worker_flags_handle, bytes) {
                    Ok(worker_flags) => Some(DeviceSync {
                        layout,
                        top_k: offer.top_k,
                        gate_flags,
                        worker_flags,
                        release,
                        spin: transport::gate_may_spin(
                            &self.member.device,
                            &offer.device_name,
                            transport::under_mps(),
                        ),
                        seqs: (0..IPC_SLOTS).map(|_| AtomicU32::new(0)).collect(),
                        slots: IPC_SLOTS,
                    }),
                    Err(e) => {
                        tracing::warn!(worker = %self.member.id, error = %e, "cannot map the worker's flags; its calls are host-ordered");
                        None
                    }
                }
            }
            (Some(_), true) => {
                tracing::info!(worker = %self.member.id, reason = %reply.device_sync_reason, "the worker takes host-ordered calls only");
                None
            }
            (None, _) => None,
        };
        Ok(Arc::new(IpcSession {
            id: reply.session,
            rows: offer.rows,
            dtype: offer.dtype,
            slots,
            device,
            broken: AtomicBool::new(false),
            nonce: SESSION_NONCE.fetch_add(1, Ordering::Relaxed),
        }))
    }

    /// One call: opens the stream if needed (bounded by the connect timeout), sends `req` (its
    /// call_id is assigned here) and waits for the reply, sending and waiting bounded by `timeout`.
    pub async fn call(
        &self,
        req: ForwardRequest,
        timeout: Duration,
    ) -> MeshResult<ForwardResponse> {
        let conn = self.connection().await?;
        self.call_on(&conn, req, timeout).await
    }

    /// [`call`](Self::call) on a given stream (the one whose IPC slot the request names).
    pub async fn call_on(
        &self,
        conn: &Arc<Conn>,
        mut req: ForwardRequest,
        timeout: Duration,
    ) -> MeshResult<ForwardResponse> {
        req.call_id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let call_id = req.call_id;
        let (tx, rx) = oneshot::channel();
        lock(&conn.waiters).insert(call_id, tx);
        let exchange = async {
            if conn.tx.send(req).await.is_err() {
                conn.alive.store(false, Ordering::SeqCst);
                return Err(self.peer_err("stream closed"));
            }
            rx.await.map_err(|_| self.peer_err("stream closed"))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(Ok(r))) => {
                self.mark_ok();
                Ok(r)
            }
            Ok(Ok(Err(status))) if status.code() == tonic::Code::InvalidArgument => {
                Err(MeshError::Internal(format!(
                    "expert worker {} rejected a call: {}",
                    self.member.id,
                    status.message()
                )))
            }
            Ok(Ok(Err(status))) => Err(self.peer_err(status.message())),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                lock(&conn.waiters).remove(&call_id);
                // A worker that misses a reply is taken for hung: its stream is dropped (and
                // every call on it released), the next call opens a new one.
                conn.fail(
                    MeshError::Unavailable(format!(
                        "a call on this stream got no reply within {timeout:?}"
                    ))
                    .into(),
                );
                Err(self.peer_err(format!("no reply within {timeout:?}")))
            }
        }
    }
}

/// One placement: (layer, expert) → ids of the workers holding that expert in that layer, as
/// the registry listed them at one moment (a worker may hold different experts in each layer).
#[derive(Default)]
pub struct Routes {
    table: HashMap<(u32, u32), Vec<String>>,
}

#[derive(Default)]
struct PoolState {
    workers: BTreeMap<String, Arc<WorkerClient>>,
    /// Each accepted worker's registration as listed now (its experts current).
    members: BTreeMap<String, Member>,
    /// The newest placement.
    routes: Arc<Routes>,
    /// (id, fingerprint) pairs already reported as refused.
    refused: HashSet<(String, String)>,
}

/// Which placement a pick routes by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The one pinned for the step in progress ([`WorkerPool::pin_step`]); the newest outside
    /// a step.
    Step,
    /// The newest the registry listed (retries).
    Newest,
}

/// What a dispatch must not use: workers that failed it (serials), and (worker serial, expert)
/// pairs a worker refused because it no longer holds the expert.
#[derive(Debug, Default)]
pub struct Excluded {
    pub workers: HashSet<u64>,
    pub refused: HashSet<(u64, u32)>,
}

impl Excluded {
    fn allows(&self, serial: u64, expert: u32) -> bool {
        !self.workers.contains(&serial) && !self.refused.contains(&(serial, expert))
    }
}

/// Unpins the step's placement when dropped.
pub struct StepPin<'a>(&'a WorkerPool);

impl Drop for StepPin<'_> {
    fn drop(&mut self) {
        *self.0.pinned.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// An accepted worker as `Gate.Info` reports it.
pub struct WorkerView {
    /// Its registration as listed now.
    pub member: Member,
    /// The transport its activations take.
    pub transport: &'static str,
    /// Per layer it serves, the pairs it computed there for this gate.
    pub routed_pairs: BTreeMap<u32, u64>,
}

/// Of the replicas a call may go to, those on the gate's own GPU (`gate_device`, as the registry
/// names devices) that it reaches over CUDA IPC (so on its host), when there are some and not
/// all are: their activations never leave the GPU, and with a replica of every expert beside
/// each gate (`moemesh up --gates N --expert-replicas N`, one of each per GPU) every GPU works
/// on its own gate's calls instead of each worker taking every gate's. The others stay the
/// failover: a local replica that fails is not `ready`, and the choice falls to the rest.
fn prefer_local<'a>(
    choices: Vec<&'a Arc<WorkerClient>>,
    gate_device: Option<&str>,
) -> Vec<&'a Arc<WorkerClient>> {
    let Some(device) = gate_device else {
        return choices;
    };
    let local: Vec<&Arc<WorkerClient>> = choices
        .iter()
        .copied()
        .filter(|w| w.member.device == device && w.transport() == transport::CUDA_IPC)
        .collect();
    if local.is_empty() || local.len() == choices.len() {
        choices
    } else {
        local
    }
}

/// Whether two registrations are the same worker process at the same place, whatever experts
/// each lists (a worker that changed its experts keeps its client and stream).
fn same_process(a: &Member, b: &Member) -> bool {
    a.id == b.id
        && a.role == b.role
        && a.address == b.address
        && a.device == b.device
        && a.fingerprint == b.fingerprint
        && a.layers == b.layers
        && a.version == b.version
}

/// The gate's view of the expert workers.
pub struct WorkerPool {
    state: RwLock<PoolState>,
    /// The placement of the step in progress, while one runs (see [`pin_step`](Self::pin_step)).
    pinned: RwLock<Option<Arc<Routes>>>,
    fingerprint: String,
    rr: AtomicU64,
    /// The gate's TLS files, for every worker's stream; `None` with --plaintext.
    tls: Option<Arc<Tls>>,
    /// Bound on opening a worker's stream (`--expert-connect-timeout-ms`).
    connect_timeout: Duration,
    /// What each worker is offered for CUDA IPC ([`WorkerPool::with_ipc`]); `None`: gRPC only.
    offer: Option<Arc<IpcOffer>>,
    /// Bumped on every registry update, so a dispatch that found no live replica can wait for
    /// one to appear.
    changes: watch::Sender<u64>,
}

impl WorkerPool {
    pub fn new(fingerprint: String, tls: Option<Arc<Tls>>, connect_timeout: Duration) -> Self {
        WorkerPool {
            state: RwLock::new(PoolState::default()),
            pinned: RwLock::new(None),
            fingerprint,
            rr: AtomicU64::new(0),
            tls,
            connect_timeout,
            offer: None,
            changes: watch::channel(0).0,
        }
    }

    /// The device CUDA IPC sessions' buffers live on (the gate's), if IPC is offered.
    pub fn ipc_device(&self) -> Option<Device> {
        self.offer.as_ref().map(|o| o.device.clone())
    }

    /// Offers CUDA IPC to every worker whose stream opens from now on (see [`IpcOffer`]).
    pub fn with_ipc(mut self, offer: IpcOffer) -> Self {
        self.offer = Some(Arc::new(offer));
        self
    }

    /// Live workers (as [`members`](Self::members)) with the transport each one's activations
    /// take and the pairs each computed.
    pub fn views(&self) -> Vec<WorkerView> {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        st.workers
            .iter()
            .map(|(id, w)| WorkerView {
                member: st.members.get(id).unwrap_or(&w.member).clone(),
                transport: w.transport(),
                routed_pairs: w.routed_pairs(),
            })
            .collect()
    }

    /// Pins the newest placement for one step: every pick with [`Placement::Step`] routes by it
    /// until the guard is dropped, so a registry update lands between steps, never inside one.
    pub fn pin_step(&self) -> StepPin<'_> {
        let routes = self
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .routes
            .clone();
        *self.pinned.write().unwrap_or_else(|e| e.into_inner()) = Some(routes);
        StepPin(self)
    }

    /// The placement pinned for the step in progress ([`pin_step`](Self::pin_step)); a new
    /// `Arc` whenever the registry's list changed.
    pub fn pinned_routes(&self) -> Option<Arc<Routes>> {
        self.pinned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Resolves when the member list changes next.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Replaces the member list (from the registry). Existing clients (and their streams) are
    /// kept when a worker is the same process at the same address, whatever its experts.
    pub fn update(&self, members: &[Member]) {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        let mut workers = BTreeMap::new();
        let mut listed = BTreeMap::new();
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
                Some(c) if same_process(&c.member, m) => c.clone(),
                _ => {
                    let c = Arc::new(WorkerClient::new(
                        m.clone(),
                        self.tls.clone(),
                        self.connect_timeout,
                        self.offer.clone(),
                    ));
                    c.warm();
                    c
                }
            };
            let holdings = m.holdings();
            for (&l, experts) in &holdings {
                for &e in experts {
                    table.entry((l, e)).or_default().push(m.id.clone());
                }
            }
            if st
                .members
                .get(&m.id)
                .is_some_and(|old| old.holdings() != holdings)
            {
                tracing::info!(worker = %m.id, ?holdings, "expert worker's experts changed; routing by them from the next step");
            }
            workers.insert(m.id.clone(), client);
            listed.insert(m.id.clone(), m.clone());
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
        // Workers that left (or moved): their waiting calls go to replicas now.
        for (id, old) in &st.workers {
            if workers.get(id).is_none_or(|new| new.serial != old.serial) {
                old.close("left the registry");
            }
        }
        st.workers = workers;
        st.members = listed;
        st.routes = Arc::new(Routes { table });
        drop(st);
        self.changes.send_modify(|n| *n += 1);
    }

    /// How many of the (layer, expert) pairs in `layers` × `0..experts` no accepted worker serves.
    pub fn missing(&self, layers: &[u32], experts: u32) -> usize {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        layers
            .iter()
            .flat_map(|&l| (0..experts).map(move |e| (l, e)))
            .filter(|k| st.routes.table.get(k).is_none_or(|ids| ids.is_empty()))
            .count()
    }

    /// Live workers (accepted ones), as listed now.
    pub fn members(&self) -> Vec<Member> {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        st.members.values().cloned().collect()
    }

    /// Starts a new dispatch round (advances the replica rotation).
    pub fn next_round(&self) -> u64 {
        self.rr.fetch_add(1, Ordering::Relaxed)
    }

    /// A worker for (layer, expert) under `placement`, never one `excluded` (failed this
    /// dispatch, or refused this expert); rotates over replicas by `round` (a dispatch passes
    /// `round + i` for the i-th token of an expert, which splits a replicated expert's tokens
    /// evenly over its replicas). Preference: workers with an open stream that have not failed
    /// recently, then ones not yet connected (opened by the call), then recently failed ones.
    /// While a connected replica exists, the others are opened in the background instead, so a
    /// worker that cannot be reached (a tarpit) costs no step any time.
    pub fn pick(
        &self,
        layer: u32,
        expert: u32,
        excluded: &Excluded,
        round: u64,
        placement: Placement,
    ) -> MeshResult<Arc<WorkerClient>> {
        let pinned = match placement {
            Placement::Step => self
                .pinned
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            Placement::Newest => None,
        };
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        let routes = pinned.as_ref().unwrap_or(&st.routes);
        let Some(ids) = routes.table.get(&(layer, expert)) else {
            return Err(MeshError::Unavailable(format!(
                "no live expert worker serves (layer {layer}, expert {expert})"
            )));
        };
        let now = Instant::now();
        let usable: Vec<&Arc<WorkerClient>> = ids
            .iter()
            .filter_map(|id| st.workers.get(id))
            .filter(|w| excluded.allows(w.serial, expert))
            .collect();
        let fresh: Vec<&Arc<WorkerClient>> = usable
            .iter()
            .copied()
            .filter(|w| !w.is_suspect(now))
            .collect();
        let ready: Vec<&Arc<WorkerClient>> =
            fresh.iter().copied().filter(|w| w.is_ready()).collect();
        if !ready.is_empty() {
            for w in &fresh {
                w.warm();
            }
        }
        let choices = [ready, fresh, usable]
            .into_iter()
            .find(|c| !c.is_empty())
            .ok_or_else(|| {
                MeshError::Unavailable(format!(
                    "every expert worker serving (layer {layer}, expert {expert}) failed: {ids:?}"
                ))
            })?;
        let choices = prefer_local(choices, self.offer.as_ref().map(|o| o.device_name.as_str()));
        Ok(choices[(round as usize) % choices.len()].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moemesh_common::registry::Role;

    fn member(id: &str, experts: Vec<u32>) -> Member {
        Member {
            id: id.into(),
            role: Role::Expert,
            address: "127.0.0.1:9".into(),
            layers: vec![1, 2],
            experts,
            layer_experts: Vec::new(),
            device: "cpu".into(),
            fingerprint: "fp".into(),
            version: String::new(),
        }
    }

    #[test]
    fn a_replica_on_the_gates_gpu_over_cuda_ipc_is_preferred_and_the_rest_stay_the_failover() {
        let client = |id: &str, device: &str, transport: &'static str| {
            let mut m = member(id, vec![0]);
            m.device = device.into();
            let w = Arc::new(WorkerClient::new(m, None, Duration::from_secs(1), None));
            *lock(&w.transport) = transport;
            w
        };
        let local = client("a", "cuda:0", transport::CUDA_IPC);
        let other_gpu = client("b", "cuda:1", transport::CUDA_IPC);
        // Same name, but over gRPC: not known to be on this host.
        let remote = client("c", "cuda:0", transport::GRPC);
        let ids =
            |v: Vec<&Arc<WorkerClient>>| v.iter().map(|w| w.member.id.clone()).collect::<Vec<_>>();
        let all = vec![&local, &other_gpu, &remote];
        assert_eq!(ids(prefer_local(all.clone(), Some("cuda:0"))), ["a"]);
        assert_eq!(ids(prefer_local(all.clone(), Some("cuda:1"))), ["b"]);
        // None on the gate's GPU (the local one failed, or there is none): every choice stays.
        assert_eq!(
            ids(prefer_local(vec![&other_gpu, &remote], Some("cuda:0"))),
            ["b", "c"]
        );
        // No device transport offered (a CPU gate): no preference.
        assert_eq!(ids(prefer_local(all.clone(), None)), ["a", "b", "c"]);
        // Every choice local: all of them, rotated over as before.
        let local2 = client("d", "cuda:0", transport::CUDA_IPC);
        assert_eq!(
            ids(prefer_local(vec![&local, &local2], Some("cuda:0"))),
            ["a", "d"]
        );
    }

    #[test]
    fn a_failed_worker_is_avoided_longer_each_time_and_forgiven_by_a_good_call() {
        let w = WorkerClient::new(member("a", vec![0]), None, Duration::from_secs(1), None);
        let now = Instant::now();
        assert!(!w.is_suspect(now));
        let mut waits = Vec::new();
        for _ in 0..6 {
            w.mark_failed();
            let until = lock(&w.suspect_until).expect("suspect");
            waits.push(until.duration_since(now).as_secs_f64().round() as u64);
        }
        // 2, 4, 8, 16 s, then capped at 30 s.
        assert_eq!(waits, vec![2, 4, 8, 16, 30, 30]);
        assert!(w.is_suspect(Instant::now()));
        w.mark_ok();
        assert!(!w.is_suspect(Instant::now()));
    }

    /// A gate on the CPU offers no device transport: the worker's stream takes gRPC, and the
    /// pool reports that (Gate.Info, the metric) once the stream opens.
    #[tokio::test]
    async fn a_cpu_gate_keeps_grpc_and_reports_it() {
        let offer = IpcOffer {
            mode: TransportMode::Auto,
            gate_id: "g".into(),
            device: Device::Cpu,
            device_name: "cpu".into(),
            dtype: DType::F32,
            hidden: 8,
            rows: 4,
            sync: IpcSync::Device,
            top_k: 2,
        };
        let pool = WorkerPool::new("fp".into(), None, Duration::from_millis(200)).with_ipc(offer);
        pool.update(&[member("a", vec![0])]);
        let w = pool
            .pick(1, 0, &Excluded::default(), 0, Placement::Step)
            .expect("a");
        assert_eq!(w.transport(), transport::PENDING);
        // Nothing listens there: the refusal comes before any call to the worker.
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        assert!(w.negotiate(&mut ExpertClient::new(channel)).await.is_none());
        assert_eq!(w.transport(), transport::GRPC);
        assert!(w.ipc_slot(1).is_none());
        let reported: Vec<_> = pool
            .views()
            .into_iter()
            .map(|v| (v.member.id, v.transport))
            .collect();
        assert_eq!(reported, vec![("a".to_string(), transport::GRPC)]);
    }

    #[tokio::test]
    async fn leaving_the_registry_closes_a_worker_and_a_comeback_is_a_new_client() {
        let pool = WorkerPool::new("fp".into(), None, Duration::from_millis(200));
        let changes = pool.changes();
        pool.update(&[member("a", vec![0, 1]), member("b", vec![1])]);
        assert!(changes.has_changed().expect("open"));
        let none = Excluded::default();
        let pick = |e, ex: &Excluded| pool.pick(1, e, ex, 0, Placement::Step);
        let a = pick(0, &none).expect("a serves expert 0");
        assert_eq!(a.member.id, "a");
        // Excluding a's serial leaves expert 0 with no replica, expert 1 with b.
        let excluded = Excluded {
            workers: [a.serial].into(),
            ..Excluded::default()
        };
        assert!(pick(0, &excluded).is_err());
        assert_eq!(pick(1, &excluded).expect("b").member.id, "b");
        // a leaves: closed, so no call can start on it.
        pool.update(&[member("b", vec![1])]);
        assert!(a.closed.load(Ordering::SeqCst));
        assert!(
            a.call(ForwardRequest::default(), Duration::from_secs(1))
                .await
                .is_err()
        );
        // a comes back: a new client, not excluded by the old one's failure.
        pool.update(&[member("a", vec![0, 1]), member("b", vec![1])]);
        let again = pool
            .pick(1, 0, &excluded, 0, Placement::Step)
            .expect("a is back");
        assert_ne!(again.serial, a.serial);
    }

    /// A worker that changes its experts keeps its client (and stream); a step in progress
    /// routes by the placement it began with, the next step and retries by the new one; a
    /// refused (worker, expert) pair is avoided for that expert only.
    #[test]
    fn new_experts_keep_the_client_and_switch_routing_between_steps() {
        let pool = WorkerPool::new("fp".into(), None, Duration::from_millis(200));
        pool.update(&[member("a", vec![0, 1]), member("b", vec![2, 3])]);
        let none = Excluded::default();
        let serial_a = pool
            .pick(1, 0, &none, 0, Placement::Step)
            .expect("a")
            .serial;
        let step = pool.pin_step();
        // b now also holds expert 0; a gave it up.
        pool.update(&[member("a", vec![1]), member("b", vec![0, 2, 3])]);
        let in_step = pool.pick(1, 0, &none, 0, Placement::Step).expect("a");
        assert_eq!(in_step.member.id, "a", "the step keeps its placement");
        assert_eq!(in_step.serial, serial_a, "same client, same stream");
        let retry = pool.pick(1, 0, &none, 0, Placement::Newest).expect("b");
        assert_eq!(retry.member.id, "b", "retries take the newest placement");
        drop(step);
        let next = pool.pick(1, 0, &none, 0, Placement::Step).expect("b");
        assert_eq!(
            next.member.id, "b",
            "the next step takes the newest placement"
        );
        assert_eq!(
            pool.members()
                .iter()
                .map(|m| m.experts.clone())
                .collect::<Vec<_>>(),
            vec![vec![1], vec![0, 2, 3]],
            "members as listed now"
        );
        // Expert 1 is on a only; a refusal of expert 0 by a does not exclude a for expert 1.
        let refused = Excluded {
            refused: [(serial_a, 0)].into(),
            ..Excluded::default()
        };
        assert_eq!(
            pool.pick(1, 1, &refused, 0, Placement::Newest)
                .expect("a")
                .member
                .id,
            "a"
        );
    }

    /// Holdings that differ per layer route each (layer, expert) to the workers holding that
    /// expert in that layer only (a replica in one layer is a single holder in another); pairs
    /// are counted per layer.
    #[test]
    fn routes_and_counts_are_per_layer() {
        use moemesh_common::placement::Holdings;
        let pool = WorkerPool::new("fp".into(), None, Duration::from_millis(200));
        let with = |id: &str, h: Holdings| {
            let mut m = member(id, Vec::new());
            m.set_holdings(&h);
            m
        };
        pool.update(&[
            with("a", Holdings::from([(1, vec![0, 1]), (2, vec![2, 3])])),
            with("b", Holdings::from([(1, vec![0, 2, 3]), (2, vec![0, 1])])),
        ]);
        let none = Excluded::default();
        let id = |l, e, round| {
            pool.pick(l, e, &none, round, Placement::Step)
                .expect("a holder")
                .member
                .id
                .clone()
        };
        // Expert 0: replicated in layer 1, on b alone in layer 2.
        assert_eq!([id(1, 0, 0), id(1, 0, 1)], ["a", "b"]);
        assert_eq!([id(2, 0, 0), id(2, 0, 1)], ["b", "b"]);
        // Expert 2: b in layer 1, a in layer 2.
        assert_eq!(
            (id(1, 2, 0), id(2, 2, 0)),
            ("b".to_string(), "a".to_string())
        );
        assert_eq!(pool.missing(&[1, 2], 4), 0);
        assert_eq!(pool.missing(&[1, 2], 5), 2);
        let a = pool.pick(1, 1, &none, 0, Placement::Step).expect("a");
        a.count_pairs(1, 3);
        a.count_pairs(2, 2);
        // A layer the worker does not serve counts nowhere.
        a.count_pairs(7, 5);
        assert_eq!(a.routed_pairs(), BTreeMap::from([(1, 3), (2, 2)]));
        let views = pool.views();
        assert_eq!(views[0].routed_pairs, BTreeMap::from([(1, 3), (2, 2)]));
        assert_eq!(views[0].member.holdings()[&2], vec![2, 3]);
    }

    /// A replicated expert's picks alternate over its replicas as the round advances, so the
    /// dispatch (round + i for its i-th token) splits its tokens evenly.
    #[test]
    fn a_replicated_expert_alternates_between_its_replicas() {
        let pool = WorkerPool::new("fp".into(), None, Duration::from_millis(200));
        pool.update(&[member("a", vec![0, 1]), member("b", vec![0, 2])]);
        let none = Excluded::default();
        let ids: Vec<String> = (0..4)
            .map(|i| {
                pool.pick(1, 0, &none, i, Placement::Step)
                    .expect("a replica")
                    .member
                    .id
                    .clone()
            })
            .collect();
        assert_eq!(ids, ["a", "b", "a", "b"]);
        // An expert with one holder always goes there.
        assert!((0..4).all(|i| {
            pool.pick(1, 2, &none, i, Placement::Step)
                .expect("b")
                .member
                .id
                == "b"
        }));
    }
}
