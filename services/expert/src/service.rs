//! `Expert.Forward`, `Expert.Info`, `Expert.OpenTransport` and `Expert.SetExperts`, and the
//! worker's life cycle.
//!
//! The experts held are one [`Held`] value behind an `ArcSwap`: every call takes the value current
//! when it starts and computes with it to the end, and `SetExperts` (live re-placement) builds the
//! next value in the background and swaps it in whole, so a Forward call never waits for a change
//! and never sees half of one. The registry entry is owned by [`run`]; `SetExperts` asks it to
//! announce a new list through [`Worker::announce`].
//!
//! A gate on the same host may hand the worker CUDA IPC buffers (`OpenTransport`): the worker maps
//! them (one session per gate; a gate's new session replaces and unmaps its old one) and then
//! serves that gate's calls that name the session by reading the activations from the slot's
//! input buffer and writing its f32 partial sums into the slot's output buffer, synchronising its
//! stream before it replies. The gRPC tensor path stays for every other call.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::Stream;
use moemesh_common::member_args::DEFAULT_MAX_MESSAGE_MB;
use moemesh_common::memory_plan::{self, PlanShard};
use moemesh_common::metrics::{code_label, names};
use moemesh_common::placement::{self, Holdings};
use moemesh_common::registry::{Member, Registry, Role};
use moemesh_common::tls::{self, ClientAuth};
use moemesh_common::transport::{DeviceLayout, flags};
use moemesh_common::{
    MeshError, MeshResult, codec, device, metrics as mesh_metrics, serve, telemetry, transport,
};
use moemesh_engine::cuda::ipc::{self, OpenedBuffer, SharedBuffer};
use moemesh_engine::cuda::{RowsAt, WaitFlag};
use moemesh_engine::weights::LoadedBytes;
use moemesh_engine::{DType, Device, ExpertShard, ModelFiles, ShardSpec};
use moemesh_proto::v1::expert_server::{Expert, ExpertServer};
use moemesh_proto::v1::{
    self as pb, ExpertInfoRequest, ExpertInfoResponse, ForwardRequest, ForwardResponse,
    OpenTransportRequest, OpenTransportResponse,
};
use moemesh_proto::v1::{SetExpertsRequest, SetExpertsResponse};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::{ExpertConfig, parse_range};

/// One gate's CUDA IPC buffers, mapped into this worker.
struct Session {
    /// Per slot: the gate's input buffer `[rows, hidden]` and output buffer `[rows, hidden]` f32.
    slots: Vec<(OpenedBuffer, OpenedBuffer)>,
    /// Rows each buffer holds.
    rows: usize,
    /// Present when device-ordered calls were accepted.
    device: Option<DeviceSide>,
}

/// This worker's side of a device-ordered session (see `SharedActivations.device_seq`).
struct DeviceSide {
    /// The session's own stream (a device handle of the worker's GPU): each gate's calls queue
    /// on their own stream, so that one gate's wait never holds up another gate's calls (two
    /// gates' calls on one stream could wait on each other).
    stream: Device,
    layout: DeviceLayout,
    top_k: usize,
    /// The gate's flags (`flags::done`, `flags::seen`), written here.
    gate_flags: OpenedBuffer,
    /// This worker's flags (`flags::ready`, `flags::scratch`), written by the gate.
    own_flags: SharedBuffer,
    /// Per slot, the highest call number queued here.
    queued: Vec<AtomicU32>,
    /// Whether waits spin in a kernel instead of `cuStreamWaitValue32` (`--ipc-wait`).
    spin: bool,
    /// The combine counters of the calls queued on `stream` (the down kernel folds a decode
    /// call's combine with them; `moemesh_engine::cuda::combine_counters`).
    counters: Option<moemesh_engine::Tensor>,
}

impl Drop for Session {
    /// Releases every wait this session queued on the worker's stream (the gate's `ready` words
    /// may never come: the gate went away) before the buffers are unmapped, which synchronises
    /// the stream.
    fn drop(&mut self) {
        let Some(d) = &self.device else {
            return;
        };
        for (slot, q) in d.queued.iter().enumerate() {
            let past = q.load(Ordering::SeqCst).wrapping_add(flags::RELEASE_STRIDE);
            if let Err(e) = d.own_flags.fill_words_now(flags::ready(slot), 1, past) {
                tracing::error!(slot, error = %e, "could not release a device-ordered wait");
            }
        }
        // The buffers are unmapped next (each synchronises the main stream): first let the
        // session's stream run out.
        if let Err(e) = ipc::synchronize(&d.stream) {
            tracing::error!(error = %e, "could not synchronise a session's stream");
        }
    }
}

/// The sessions of the gates that set one up.
#[derive(Default)]
struct Sessions {
    by_id: HashMap<u64, Arc<Session>>,
    /// Gate id → its session id (one per gate).
    by_gate: HashMap<String, u64>,
}

/// Session ids (0 means refused on the wire).
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// The routed experts this worker holds, and what is derived from their placement in the
/// shard's stacks; replaced whole by `SetExperts`.
struct Held {
    /// The weights, in every served layer.
    shard: Arc<ExpertShard>,
    /// The experts held, per served layer (each ascending), as `Info` and the registry list
    /// them. Layers may hold different experts (a per-layer `SetExperts`).
    holdings: Holdings,
    /// Slot tables of device-ordered calls that compute some of a layer's held experts. They
    /// name slots of this shard's stacks, so they live and die with it (a new shard numbers its
    /// slots anew).
    slot_tables: SlotTables,
}

/// Built slot tables, by layer, then by the experts a call computes (looked up by the call's
/// list as it came, without a copy: every device-ordered call of a replica split asks).
#[derive(Default)]
struct SlotTables(std::sync::Mutex<HashMap<usize, HashMap<Vec<u32>, moemesh_engine::Tensor>>>);

impl SlotTables {
    fn get(&self, layer: usize, experts: &[u32]) -> Option<moemesh_engine::Tensor> {
        let tables = self.0.lock().unwrap_or_else(|e| e.into_inner());
        tables.get(&layer)?.get(experts).cloned()
    }

    /// Keeps `table`; past [`MAX_SLOT_TABLES`] the ones kept are dropped first.
    fn insert(&self, layer: usize, experts: &[u32], table: moemesh_engine::Tensor) {
        let mut tables = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if tables.values().map(HashMap::len).sum::<usize>() >= MAX_SLOT_TABLES {
            tables.clear();
        }
        tables
            .entry(layer)
            .or_default()
            .insert(experts.to_vec(), table);
    }
}

impl Held {
    fn new(shard: Arc<ExpertShard>, holdings: Holdings) -> Self {
        Held {
            shard,
            holdings,
            slot_tables: Default::default(),
        }
    }
}

/// New holdings for the registry, and where to say whether etcd has them.
type Announce = (Holdings, oneshot::Sender<MeshResult<()>>);

/// Longest `SetExpertsRequest.release_grace_ms`.
const MAX_RELEASE_GRACE_MS: u32 = 60_000;

/// What `SetExperts` needs to load experts: the model, the device and the dtype the shard was
/// loaded with.
struct Source {
    files: Arc<ModelFiles>,
    dtype: DType,
}

struct Worker {
    /// The experts held now (see the module doc).
    held: ArcSwap<Held>,
    /// Registry id.
    id: String,
    /// The MoE layers served (fixed for the process's life).
    layers: Vec<u32>,
    /// The device's name as configured (`cpu`, `cuda:N`).
    device_name: String,
    /// The model fingerprint.
    fingerprint: String,
    /// The checkpoint's weight format, reported by Info.
    weights_dtype: String,
    /// Bytes one held expert of one layer takes on the device, for Info's weight_bytes.
    bytes_per_pair: u64,
    device: Device,
    hidden_size: usize,
    /// The model's routed experts per layer (the bound on `SetExperts`).
    n_experts: usize,
    /// Where `SetExperts` loads from; `None` when experts cannot change (unit tests).
    source: Option<Source>,
    /// Held for the whole of a `SetExperts`: one change at a time.
    changing: tokio::sync::Mutex<()>,
    /// To [`run`]'s loop, which owns the registry entry; `None`: nothing to announce to.
    announce: Option<mpsc::Sender<Announce>>,
    /// Calls being computed now: each holds a guard, and shutdown waits for the last one.
    in_flight: serve::InFlight,
    /// Set at shutdown: streams finish their current call and end.
    closing: Arc<AtomicBool>,
    /// CUDA IPC sessions by id.
    sessions: std::sync::Mutex<Sessions>,
    /// Device-ordered waits spin in a kernel (`--ipc-wait`, resolved at start).
    spin_waits: bool,
}

/// The host's available memory (`MemAvailable` in /proc/meminfo), in bytes; `None` where there
/// is no such file or line.
fn host_memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Device memory a `SetExperts` leaves free beyond the stacks it builds (other processes on the
/// GPU, the gate's activations among them, allocate too).
const SET_EXPERTS_RESERVE: u64 = 2 << 30;

/// Most cached slot tables (a table per replica split in use; cleared when full).
const MAX_SLOT_TABLES: usize = 4096;

impl Worker {
    fn info(&self) -> ExpertInfoResponse {
        let held = self.held.load();
        let pairs: usize = held.holdings.values().map(Vec::len).sum();
        ExpertInfoResponse {
            id: self.id.clone(),
            layers: self.layers.clone(),
            weight_bytes: self.bytes_per_pair * pairs as u64,
            experts: placement::common_experts(&held.holdings),
            device: self.device_name.clone(),
            fingerprint: self.fingerprint.clone(),
            weights_dtype: self.weights_dtype.clone(),
            layer_experts: codec::holdings_to_wire(&held.holdings),
            bytes_per_pair: self.bytes_per_pair,
            memory_free_bytes: self.memory_free().unwrap_or(0),
        }
    }

    /// The device's free memory now (see `ExpertInfoResponse.memory_free_bytes`).
    fn memory_free(&self) -> Option<u64> {
        match moemesh_engine::cuda::gpu(&self.device) {
            Some(g) => g.memory_info().ok().map(|(free, _)| free),
            None => host_memory_available(),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps a gate's buffers (after [`transport::worker_check`]); replaces that gate's session.
    /// Returns the session id, and for device-ordered calls this worker's flags handle (or why
    /// they were refused: the session then takes host-ordered calls).
    fn open_session(
        &self,
        req: &OpenTransportRequest,
    ) -> MeshResult<(u64, Result<Vec<u8>, String>)> {
        let dtype = match pb::DType::try_from(req.dtype) {
            Ok(pb::DType::Bf16) => DType::BF16,
            _ => DType::F32,
        };
        let rows = req.rows as usize;
        let layout = DeviceLayout::new(
            rows,
            self.hidden_size,
            dtype.size_in_bytes(),
            req.top_k as usize,
        );
        let in_bytes = if req.device_sync {
            layout.bytes
        } else {
            rows * self.hidden_size * dtype.size_in_bytes()
        };
        let out_bytes = rows * self.hidden_size * DType::F32.size_in_bytes();
        let mut slots = Vec::with_capacity(req.input_handles.len());
        for (i, o) in req.input_handles.iter().zip(&req.output_handles) {
            slots.push((
                OpenedBuffer::open(&self.device, i, in_bytes)?,
                OpenedBuffer::open(&self.device, o, out_bytes)?,
            ));
        }
        let device = if req.device_sync {
            self.open_device_side(req, layout, slots.len())
        } else {
            Err("not asked for".into())
        };
        let handle = match &device {
            Ok(d) => d.own_flags.handle().map_err(|e| e.to_string()),
            Err(why) => Err(why.clone()),
        };
        let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session {
            slots,
            rows,
            device: device.ok(),
        });
        let old = {
            let mut st = self.sessions();
            st.by_id.insert(id, session);
            st.by_gate
                .insert(req.gate_id.clone(), id)
                .and_then(|old| st.by_id.remove(&old))
        };
        // Released and unmapped here (or when its last call finishes), outside the lock.
        drop(old);
        Ok((id, handle))
    }

    /// Sets up device-ordered calls: maps the gate's flags, allocates and zeroes this worker's,
    /// and checks that this driver lets a stream write and wait on memory.
    fn open_device_side(
        &self,
        req: &OpenTransportRequest,
        layout: DeviceLayout,
        slots: usize,
    ) -> Result<DeviceSide, String> {
        let gate_flags = OpenedBuffer::open(
            &self.device,
            &req.gate_flags_handle,
            4 * flags::gate_words(slots),
        )
        .map_err(|e| format!("mapping the gate's flags: {e}"))?;
        let words = flags::worker_words(slots);
        let own_flags = SharedBuffer::alloc(&self.device, 4 * words).map_err(|e| e.to_string())?;
        let stream =
            ipc::stream_device(&self.device).map_err(|e| format!("a session stream: {e}"))?;
        // The shard's weights were written on the main stream; the session reads them on its
        // own from now on.
        ipc::synchronize(&self.device).map_err(|e| e.to_string())?;
        let probe = || -> moemesh_engine::Result<()> {
            own_flags.fill_words_now(0, words, 0)?;
            own_flags.signal(flags::scratch(slots, 0), 1)?;
            own_flags.wait_geq(flags::scratch(slots, 0), 1)?;
            ipc::synchronize(&self.device)?;
            own_flags.fill_words_now(0, words, 0)
        };
        probe().map_err(|e| format!("stream memory operations: {e}"))?;
        let counters = moemesh_engine::cuda::combine_counters(&stream, self.hidden_size)
            .map_err(|e| format!("combine counters: {e}"))?;
        Ok(DeviceSide {
            stream,
            layout,
            top_k: req.top_k as usize,
            gate_flags,
            own_flags,
            queued: (0..slots).map(|_| AtomicU32::new(0)).collect(),
            spin: self.spin_waits,
            counters,
        })
    }

    /// Drops the sessions a gate's stream used once the stream ends: the gate dropped them with
    /// it (a new stream negotiates new ones), and their queued waits are released.
    fn end_sessions(&self, used: &std::collections::HashSet<u64>) {
        let gone: Vec<Arc<Session>> = {
            let mut st = self.sessions();
            let mut gone = Vec::new();
            for id in used {
                if let Some(s) = st.by_id.remove(id) {
                    gone.push(s);
                }
            }
            st.by_gate.retain(|_, id| !used.contains(id));
            gone
        };
        drop(gone);
    }

    /// The session a call names. Its absence is UNAVAILABLE, not INVALID_ARGUMENT: the gate
    /// retries the call (its stream's session is gone, replaced or never opened).
    fn session(&self, shared: &pb::SharedActivations) -> MeshResult<Arc<Session>> {
        self.sessions()
            .by_id
            .get(&shared.session)
            .cloned()
            .ok_or_else(|| {
                MeshError::Unavailable(format!(
                    "no transport session {} on this worker (replaced or never opened)",
                    shared.session
                ))
            })
    }

    /// A device-ordered call: queues, on this worker's stream, the wait for the gate's input,
    /// the experts over every row with the routing read from the slot, the partial sums into the
    /// slot's output, and the flags back to the gate; nothing here waits for the device.
    fn forward_device(
        &self,
        req: &ForwardRequest,
        shared: &pb::SharedActivations,
    ) -> MeshResult<ForwardResponse> {
        let session = self.session(shared)?;
        let Some(d) = &session.device else {
            return Err(MeshError::Invalid(format!(
                "shared.device_seq on session {} that takes host-ordered calls only",
                shared.session
            )));
        };
        let index = shared.slot as usize;
        let Some((input, output)) = session.slots.get(index) else {
            return Err(MeshError::Invalid(format!(
                "shared.slot {} of a session with {} slots",
                shared.slot,
                session.slots.len()
            )));
        };
        let rows = shared.rows as usize;
        if rows == 0 || rows > session.rows {
            return Err(MeshError::Invalid(format!(
                "shared.rows {rows} is outside 1..={} (the session's buffers)",
                session.rows
            )));
        }
        let dtype = match pb::DType::try_from(shared.dtype) {
            Ok(pb::DType::Bf16) => DType::BF16,
            Ok(pb::DType::F32) => DType::F32,
            _ => return Err(MeshError::Invalid("shared.dtype is not f32 or bf16".into())),
        };
        let layer = req.layer as usize;
        let seq = shared.device_seq;
        let slots = session.slots.len();
        // The experts held when the call started, for the whole call.
        let held = self.held.load_full();
        // A call naming an expert given up (the gate's placement behind this worker's) fails
        // here, before anything is queued: the stream ends with UNAVAILABLE, which releases the
        // gate's waits on it, and the gate runs the step again without this worker (the
        // device-ordered failover, docs/DESIGN.md).
        let slot_of = self.slot_table(&held, layer, &shared.experts)?;
        // Everything below queues on the session's stream.
        let own = d.own_flags.on(&d.stream)?;
        let (input, output) = (input.on(&d.stream)?, output.on(&d.stream)?);
        let gate_flags = d.gate_flags.on(&d.stream)?;
        let unfit = || {
            MeshError::Invalid(format!(
                "layer {layer}: the device expert kernels do not take {rows} rows of {dtype:?}"
            ))
        };
        let g = moemesh_engine::cuda::gpu(&d.stream).ok_or_else(unfit)?;
        // What the wait saw goes to the slot's scratch word: `seq` when the gate's input is
        // there, more when it was released. A spinning wait (under MPS; it wakes at once) is
        // done by the call's first kernel; a stream's memory wait polls, queued before it.
        let observed = own.word_address(flags::scratch(slots, index))?;
        let wait = if d.spin {
            Some(WaitFlag {
                word: own.word_address(flags::ready(index))?,
                value: seq,
                observed,
            })
        } else {
            own.wait_geq(flags::ready(index), seq)?;
            own.copy_word(flags::ready(index), &own, flags::scratch(slots, index))?;
            moemesh_engine::cuda::trace_mark(&d.stream, "worker ready");
            None
        };
        d.queued[index].store(seq, Ordering::SeqCst);
        // The rows and the routing read where the gate wrote them; the experts' sum straight
        // into the gate's output buffer.
        let (hidden, k) = (self.hidden_size, d.top_k);
        let input = RowsAt {
            x: input.address(0, rows * hidden * dtype.size_in_bytes())?,
            ids: input.address(d.layout.ids, 4 * rows * k)?,
            weights: input.address(d.layout.weights, 4 * rows * k)?,
            rows,
            hidden,
            k,
            dtype,
        };
        let into = output.address(0, 4 * rows * hidden)?;
        // The call's end: what the wait saw into the gate's `seen` word, then its `done` word;
        // by the down kernel where it folds the combine, else by a launch of its own (spinning
        // waits) or stream memory operations.
        let seen = gate_flags.word_address(flags::seen(slots, index, seq))?;
        let done_word = gate_flags.word_address(flags::done(index))?;
        let done = moemesh_engine::cuda::DoneFlag {
            seen_from: observed,
            seen,
            done: done_word,
            value: seq,
        };
        let Some(signalled) = held.shard.forward_routed_at(
            &d.stream,
            layer,
            &input,
            &slot_of,
            into,
            (wait.as_ref(), Some(&done)),
            d.counters.as_ref(),
        )?
        else {
            return Err(unfit());
        };
        moemesh_engine::cuda::trace_mark(&d.stream, "worker done");
        // A trace line per 26 calls (a V2-Lite step's MoE layers) where traces are on.
        moemesh_engine::cuda::trace_flush("worker", 52);
        if !signalled {
            match wait {
                Some(_) => g.seen_then_signal(observed, seen, done_word, seq)?,
                None => {
                    own.copy_word(
                        flags::scratch(slots, index),
                        &gate_flags,
                        flags::seen(slots, index, seq),
                    )?;
                    gate_flags.signal(flags::done(index), seq)?;
                }
            }
        }
        Ok(ForwardResponse {
            call_id: req.call_id,
            output: None,
            shared_output: true,
            not_held: Vec::new(),
        })
    }

    /// Whether a device-ordered call for `layer` finds its slot table without building one:
    /// every held expert (`shared.experts` empty), or a subset already built. Building one
    /// uploads it and waits for the device, which a call run on the stream's task must not do.
    fn slot_table_cached(&self, layer: u32, shared: &pb::SharedActivations) -> bool {
        shared.experts.is_empty()
            || self
                .held
                .load()
                .slot_tables
                .get(layer as usize, &shared.experts)
                .is_some()
    }

    /// The slot table for a call computing `experts` of `layer` (empty: every held one) on the
    /// shard of `held`. An expert not held is UNAVAILABLE (retryable: the gate's placement is
    /// behind a `SetExperts`).
    fn slot_table(
        &self,
        held: &Held,
        layer: usize,
        experts: &[u32],
    ) -> MeshResult<moemesh_engine::Tensor> {
        if experts.is_empty() {
            return held
                .shard
                .slot_table(layer)?
                .cloned()
                .ok_or_else(|| MeshError::Invalid("device-ordered calls need a GPU shard".into()));
        }
        if let Some(e) = experts
            .iter()
            .find(|&&e| !held.shard.has(layer, e as usize))
        {
            return Err(MeshError::Unavailable(format!(
                "expert {e} of layer {layer} is not held by worker {} (its experts there are now {:?})",
                self.id,
                held.holdings.get(&(layer as u32))
            )));
        }
        if let Some(t) = held.slot_tables.get(layer, experts) {
            return Ok(t);
        }
        let t = held.shard.slot_table_for(layer, experts)?;
        // Uploaded on the main stream, read on sessions' streams.
        ipc::synchronize(&self.device)?;
        held.slot_tables.insert(layer, experts, t.clone());
        Ok(t)
    }

    /// A call whose activations are in a session's slot: reads them there, writes the partial
    /// sums back there, and synchronises before the reply says they are written.
    fn forward_shared(
        &self,
        req: &ForwardRequest,
        shared: &pb::SharedActivations,
    ) -> MeshResult<ForwardResponse> {
        let session = self.session(shared)?;
        let Some((input, output)) = session.slots.get(shared.slot as usize) else {
            return Err(MeshError::Invalid(format!(
                "shared.slot {} of a session with {} slots",
                shared.slot,
                session.slots.len()
            )));
        };
        let assignments = transport::shared_assignments(req, shared, session.rows)?;
        let dtype = match pb::DType::try_from(shared.dtype) {
            Ok(pb::DType::Bf16) => DType::BF16,
            Ok(pb::DType::F32) => DType::F32,
            _ => return Err(MeshError::Invalid("shared.dtype is not f32 or bf16".into())),
        };
        let held = self.held.load_full();
        let layer = req.layer as usize;
        let not_held = self.not_held(&held, layer, &assignments)?;
        if !not_held.is_empty() {
            return Ok(refusal(req.call_id, not_held));
        }
        let rows = shared.rows as usize;
        let x = input.read(dtype, &[rows, self.hidden_size])?;
        let out = self.compute(&held, layer, &x, &assignments)?;
        let out = out
            .to_dtype(DType::F32)
            .map_err(moemesh_engine::EngineError::from)?;
        output.write(
            &out.contiguous()
                .map_err(moemesh_engine::EngineError::from)?,
        )?;
        ipc::synchronize(&self.device)?;
        Ok(ForwardResponse {
            call_id: req.call_id,
            output: None,
            shared_output: true,
            not_held: Vec::new(),
        })
    }

    fn forward(&self, req: &ForwardRequest) -> MeshResult<ForwardResponse> {
        if let Some(shared) = &req.shared {
            if shared.device_seq != 0 {
                return self.forward_device(req, shared);
            }
            return self.forward_shared(req, shared);
        }
        let (x, assignments) = codec::decode_forward(req, self.hidden_size, &self.device)?;
        // The experts held when the call started, for the whole call.
        let held = self.held.load_full();
        let layer = req.layer as usize;
        let not_held = self.not_held(&held, layer, &assignments)?;
        if !not_held.is_empty() {
            return Ok(refusal(req.call_id, not_held));
        }
        let out = self.compute(&held, layer, &x, &assignments)?;
        Ok(ForwardResponse {
            call_id: req.call_id,
            output: Some(codec::encode(&out, moemesh_proto::v1::DType::F32)?),
            shared_output: false,
            not_held: Vec::new(),
        })
    }

    /// The experts of `assignments` that `held` lacks (given up by a `SetExperts` the gate's
    /// placement has not caught up with: the call is refused in its reply and re-sent). A layer
    /// this worker never served is the caller's error.
    fn not_held(
        &self,
        held: &Held,
        layer: usize,
        assignments: &[codec::Assignment],
    ) -> MeshResult<Vec<u32>> {
        if !self.layers.contains(&(layer as u32)) {
            return Err(MeshError::Invalid(format!(
                "layer {layer} is not served by worker {} (its layers: {:?})",
                self.id, self.layers
            )));
        }
        let mut missing: Vec<u32> = assignments
            .iter()
            .map(|&(_, e, _)| e)
            .filter(|&e| !held.shard.has(layer, e as usize))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            metrics::counter!(names::WORKER_REFUSED_CALLS).increment(1);
            tracing::debug!(worker = %self.id, layer, ?missing, "refusing a call for experts given up");
        }
        Ok(missing)
    }

    /// `held`'s weighted sum for `assignments` over `x`'s rows (every expert checked as held).
    fn compute(
        &self,
        held: &Held,
        layer: usize,
        x: &moemesh_engine::Tensor,
        assignments: &[codec::Assignment],
    ) -> MeshResult<moemesh_engine::Tensor> {
        // The shard returns its f32 accumulator (see `with_f32_output` below), sent as f32
        // whatever the request's dtype: the gate adds every worker's partial sum in f32 and
        // rounds once, as the in-process engine does, instead of rounding each partial first.
        let out = held.shard.forward_assigned(layer, x, assignments)?;
        let mut per_expert: BTreeMap<u32, u64> = BTreeMap::new();
        for &(_, e, _) in assignments {
            *per_expert.entry(e).or_default() += 1;
        }
        let layer_label = layer.to_string();
        for (e, n) in per_expert {
            metrics::counter!(names::WORKER_EXPERT_TOKENS, "layer" => layer_label.clone(), "expert" => e.to_string())
                .increment(n);
        }
        Ok(out)
    }
}

/// A Forward reply that refuses the call: `not_held` are experts it named that are not held here.
fn refusal(call_id: u64, not_held: Vec<u32>) -> ForwardResponse {
    ForwardResponse {
        call_id,
        output: None,
        shared_output: false,
        not_held,
    }
}

/// Sorted, without duplicates.
fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v.dedup();
    v
}

/// Per layer, the experts of `a` that `b` lacks (layers where there are none left out).
fn minus(a: &Holdings, b: &Holdings) -> Holdings {
    a.iter()
        .filter_map(|(&l, list)| {
            let other = b.get(&l).map(Vec::as_slice).unwrap_or(&[]);
            let left: Vec<u32> = list
                .iter()
                .copied()
                .filter(|e| !other.contains(e))
                .collect();
            (!left.is_empty()).then_some((l, left))
        })
        .collect()
}

/// Per layer, the experts of `a` and of `b`, ascending.
fn union(a: &Holdings, b: &Holdings) -> Holdings {
    let mut out = a.clone();
    for (&l, list) in b {
        let entry = out.entry(l).or_default();
        entry.extend(list);
        *entry = sorted(std::mem::take(entry));
    }
    out
}

/// The distinct experts of every layer of `h`, ascending.
fn all_experts(h: &Holdings) -> Vec<u32> {
    sorted(h.values().flatten().copied().collect())
}

impl Worker {
    /// Checks an expert list of a `SetExperts` request (`field` names it in errors): sorted and
    /// deduplicated.
    fn check_list(&self, field: &str, experts: &[u32]) -> MeshResult<Vec<u32>> {
        if experts.is_empty() {
            return Err(MeshError::Invalid(format!(
                "{field}: empty list (a worker holds at least one expert in each layer it serves)"
            )));
        }
        if let Some((i, e)) = experts
            .iter()
            .enumerate()
            .find(|&(_, &e)| e as usize >= self.n_experts)
        {
            return Err(MeshError::Invalid(format!(
                "{field}[{i}]: expert {e} does not exist (the model has {} routed experts, 0-{})",
                self.n_experts,
                self.n_experts.saturating_sub(1)
            )));
        }
        Ok(sorted(experts.to_vec()))
    }

    /// Checks a `SetExperts` request: the layers it changes, each with its new list (the
    /// per-id `experts` field: every served layer), and the grace.
    fn check_set_experts(&self, req: &SetExpertsRequest) -> MeshResult<(Holdings, Duration)> {
        let changes = if req.layer_experts.is_empty() {
            let list = self.check_list("experts", &req.experts)?;
            placement::uniform(&self.layers, &list)
        } else {
            if !req.experts.is_empty() {
                return Err(MeshError::Invalid(
                    "experts: must be empty when layer_experts is set (one placement per request)"
                        .into(),
                ));
            }
            let mut changes = Holdings::new();
            for (i, le) in req.layer_experts.iter().enumerate() {
                if !self.layers.contains(&le.layer) {
                    return Err(MeshError::Invalid(format!(
                        "layer_experts[{i}].layer: layer {} is not served by worker {} (its layers: {:?})",
                        le.layer, self.id, self.layers
                    )));
                }
                if changes.contains_key(&le.layer) {
                    return Err(MeshError::Invalid(format!(
                        "layer_experts[{i}].layer: layer {} is listed twice",
                        le.layer
                    )));
                }
                let list = self.check_list(&format!("layer_experts[{i}].experts"), &le.experts)?;
                changes.insert(le.layer, list);
            }
            changes
        };
        if req.release_grace_ms > MAX_RELEASE_GRACE_MS {
            return Err(MeshError::Invalid(format!(
                "release_grace_ms: {} is over the limit of {MAX_RELEASE_GRACE_MS}",
                req.release_grace_ms
            )));
        }
        Ok((
            changes,
            Duration::from_millis(u64::from(req.release_grace_ms)),
        ))
    }

    /// Refuses (RESOURCE_EXHAUSTED, before anything is allocated) a change from `from` to `to`
    /// whose new stacks do not fit the device's free memory less [`SET_EXPERTS_RESERVE`]: every
    /// layer that changes is stacked anew (its kept experts copied, the others loaded) while the
    /// old shard still serves, so a change needs its changed layers' new size on top of what is
    /// held. A worker that cannot tell its free memory does not check.
    fn check_room(&self, from: &Holdings, to: &Holdings) -> MeshResult<()> {
        self.room_for(from, to, self.memory_free())
    }

    /// [`check_room`](Self::check_room) with the free bytes given (`None`: unknown).
    fn room_for(&self, from: &Holdings, to: &Holdings, free: Option<u64>) -> MeshResult<()> {
        let pairs: u64 = to
            .iter()
            .filter(|(l, list)| from.get(l) != Some(*list))
            .map(|(_, list)| list.len() as u64)
            .sum();
        let need = pairs * self.bytes_per_pair;
        let Some(free) = free.filter(|_| pairs > 0) else {
            return Ok(());
        };
        if need.saturating_add(SET_EXPERTS_RESERVE) > free {
            return Err(MeshError::Overloaded(format!(
                "worker {}: restacking {pairs} (layer, expert) pairs needs {:.2} GB on {} beside \
                 the experts held, and {:.2} GB are free ({:.1} GB kept for activations): \
                 nothing changed; ask for fewer experts, or free memory on the device",
                self.id,
                need as f64 / 1e9,
                self.device_name,
                free as f64 / 1e9,
                SET_EXPERTS_RESERVE as f64 / 1e9,
            )));
        }
        Ok(())
    }

    /// A shard holding `holdings`, built from `from` (experts it holds are copied, the others
    /// loaded) on a blocking thread; Forward calls go on meanwhile on whatever is held.
    async fn build(&self, from: Arc<ExpertShard>, holdings: Holdings) -> MeshResult<ExpertShard> {
        let Some(source) = &self.source else {
            return Err(MeshError::Precondition(format!(
                "worker {} cannot load experts (no model source)",
                self.id
            )));
        };
        let (files, dtype, device) = (source.files.clone(), source.dtype, self.device.clone());
        tokio::task::spawn_blocking(move || {
            let loader = files.loader(&device, dtype);
            let per_layer: BTreeMap<usize, Vec<usize>> = holdings
                .iter()
                .map(|(&l, list)| (l as usize, list.iter().map(|&e| e as usize).collect()))
                .collect();
            let shard = from.regroup(&files.config, &loader, &per_layer)?;
            // The new weights were written on the main stream; sessions read them on their own.
            ipc::synchronize(&device)?;
            Ok::<_, MeshError>(shard)
        })
        .await
        .map_err(|e| MeshError::Internal(format!("loading experts: {e}")))?
    }

    /// Drops `replaced` (a shard just swapped out) and, on a GPU, waits for the device: the
    /// allocator returns freed memory to the device at a synchronisation (stream-ordered frees
    /// go to a pool until then), so memory the worker no longer uses shows as free to its
    /// `Info`, its next `check_room` and other processes on the GPU. Calls in flight that still
    /// hold the old shard free it when they finish, and the next synchronisation returns it.
    async fn release(&self, replaced: Arc<Held>) -> MeshResult<()> {
        drop(replaced);
        if moemesh_engine::cuda::gpu(&self.device).is_none() {
            return Ok(());
        }
        let device = self.device.clone();
        tokio::task::spawn_blocking(move || ipc::synchronize(&device))
            .await
            .map_err(|e| MeshError::Internal(format!("releasing experts: {e}")))??;
        Ok(())
    }

    /// Swaps `held` in; calls in flight finish on what they started with.
    fn install(&self, held: Held) {
        let pairs: usize = held.holdings.values().map(Vec::len).sum();
        metrics::gauge!(names::WORKER_HELD_EXPERTS)
            .set(pairs as f64 / held.holdings.len().max(1) as f64);
        self.held.store(Arc::new(held));
    }

    /// Lists `holdings` in the registry; returns once etcd has them.
    async fn announce(&self, holdings: Holdings) -> MeshResult<()> {
        let Some(tx) = &self.announce else {
            return Ok(());
        };
        let (done, written) = oneshot::channel();
        let gone = || MeshError::Unavailable(format!("worker {} is shutting down", self.id));
        tx.send((holdings, done)).await.map_err(|_| gone())?;
        written.await.map_err(|_| gone())?
    }

    /// `SetExperts`: load what is missing next to what is held (per layer, the union), swap that
    /// in, announce the target holdings, keep computing the given-up experts for the grace, then
    /// swap in the target shard (dropping the others once the calls using them finish). Every
    /// intermediate state holds at least what the registry lists, so a gate that routes by the
    /// registry is never refused by a worker that is still announcing.
    async fn set_experts(&self, req: SetExpertsRequest) -> MeshResult<SetExpertsResponse> {
        let (changes, grace) = self.check_set_experts(&req)?;
        let Ok(_one) = self.changing.try_lock() else {
            return Err(MeshError::Precondition(format!(
                "worker {}: another SetExperts is in progress; retry once it has answered",
                self.id
            )));
        };
        let old = self.held.load_full();
        // Layers the request does not list keep what they hold.
        let mut target = old.holdings.clone();
        target.extend(changes);
        let loaded = minus(&target, &old.holdings);
        let dropped = minus(&old.holdings, &target);
        let started = std::time::Instant::now();
        tracing::info!(worker = %self.id, ?loaded, ?dropped, "changing the experts held");
        if !loaded.is_empty() {
            let both = union(&old.holdings, &loaded);
            self.check_room(&old.holdings, &both)?;
            let shard = self.build(old.shard.clone(), both.clone()).await?;
            self.install(Held::new(Arc::new(shard), both));
            // The replaced stacks go back to the device before this answers: the next worker
            // changed (possibly on the same GPU) measures its room after this one's.
            self.release(old).await?;
        } else {
            // Nothing replaced; not kept past this point (the drop below frees what it held).
            drop(old);
        }
        let load_ms = started.elapsed().as_millis() as u64;
        self.announce(target.clone()).await.map_err(|e| {
            MeshError::Unavailable(format!(
                "worker {}: the experts {loaded:?} are loaded, but announcing {target:?} failed \
                 (the registry still lists the old ones; the worker keeps both): {e}",
                self.id
            ))
        })?;
        if !dropped.is_empty() {
            // Gates switch when they see the announcement, at their next step.
            tokio::time::sleep(grace).await;
            let now = self.held.load_full();
            let shard = self.build(now.shard.clone(), target.clone()).await?;
            self.install(Held::new(Arc::new(shard), target.clone()));
            self.release(now).await?;
        }
        tracing::info!(worker = %self.id, holdings = ?target, ?loaded, ?dropped, load_ms, "experts changed");
        Ok(SetExpertsResponse {
            experts: placement::common_experts(&target),
            loaded: all_experts(&loaded),
            dropped: all_experts(&dropped),
            load_ms,
            layer_experts: codec::holdings_to_wire(&target),
            layer_loaded: codec::holdings_to_wire(&loaded),
            layer_dropped: codec::holdings_to_wire(&dropped),
        })
    }
}

#[derive(Clone)]
struct ExpertService {
    worker: Arc<Worker>,
}

type ForwardStream = Pin<Box<dyn Stream<Item = Result<ForwardResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Expert for ExpertService {
    type ForwardStream = ForwardStream;

    async fn forward(
        &self,
        request: Request<Streaming<ForwardRequest>>,
    ) -> Result<Response<ForwardStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let worker = self.worker.clone();
        tokio::spawn(async move {
            // The sessions this stream's calls named: they end with it.
            let mut used = std::collections::HashSet::new();
            loop {
                if worker.closing.load(Ordering::SeqCst) {
                    let _ = tx
                        .send(Err(MeshError::Unavailable(
                            "expert worker is shutting down".into(),
                        )
                        .into()))
                        .await;
                    break;
                }
                let req = match incoming.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    // A message that does not decode (malformed, or over --max-message-mb) ends
                    // the stream with its status, not with OK: the server's status layer makes it
                    // INVALID_ARGUMENT or RESOURCE_EXHAUSTED naming the limit.
                    Err(status) => {
                        tracing::debug!(error = %status, "forward stream ended");
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                if let Some(shared) = &req.shared {
                    used.insert(shared.session);
                }
                // Whether the call only queues work on its session's stream (see below).
                let queues_only = req
                    .shared
                    .as_ref()
                    .is_some_and(|s| s.device_seq != 0 && worker.slot_table_cached(req.layer, s));
                let call = worker.in_flight.enter();
                // A child of the gate's dispatch span when the call carries a sampled context;
                // the worker starts no trace of its own.
                let span = match telemetry::remote_context(&req.traceparent) {
                    Some(cx) => {
                        let span = tracing::debug_span!(
                            parent: None,
                            "expert_forward",
                            otel.kind = "server",
                            worker = %worker.id,
                            layer = req.layer,
                            tokens = req.pairs_per_token.len(),
                            pairs = req.expert_ids.len(),
                            otel.status_code = tracing::field::Empty,
                        );
                        telemetry::set_parent(&span, cx);
                        span
                    }
                    None => tracing::Span::none(),
                };
                let w = worker.clone();
                let started = std::time::Instant::now();
                let run = move || {
                    let result = span.in_scope(|| w.forward(&req));
                    if result.is_err() {
                        span.record("otel.status_code", "ERROR");
                    }
                    result
                };
                // A device-ordered call only queues work on its session's stream (tens of µs of
                // driver calls, nothing waits for the device): it runs here, without a hop to
                // the blocking pool and back, which cost as much again on each of a step's 26
                // calls. Calls that compute on the host (tensors in the message), and the first
                // call for a subset of the held experts (its slot table's upload waits for the
                // device), take the pool.
                let result = if queues_only && inline_device_calls() {
                    Ok(run())
                } else {
                    tokio::task::spawn_blocking(run).await
                };
                drop(call);
                let reply = match result {
                    Ok(r) => r.map_err(Status::from),
                    Err(e) => Err(Status::from(MeshError::Internal(format!(
                        "expert task: {e}"
                    )))),
                };
                let code = reply
                    .as_ref()
                    .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
                metrics::histogram!(names::FORWARD).record(started.elapsed().as_secs_f64());
                metrics::counter!(names::FORWARDS, "code" => code_label(code)).increment(1);
                if tx.send(reply).await.is_err() {
                    break;
                }
            }
            if !used.is_empty() {
                let w = worker.clone();
                let _ = tokio::task::spawn_blocking(move || w.end_sessions(&used)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn info(
        &self,
        _: Request<ExpertInfoRequest>,
    ) -> Result<Response<ExpertInfoResponse>, Status> {
        Ok(Response::new(self.worker.info()))
    }

    async fn set_experts(
        &self,
        request: Request<SetExpertsRequest>,
    ) -> Result<Response<SetExpertsResponse>, Status> {
        let result = self.worker.set_experts(request.into_inner()).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!(names::WORKER_SET_EXPERTS, "outcome" => outcome).increment(1);
        if let Err(e) = &result {
            tracing::warn!(worker = %self.worker.id, error = %e, "SetExperts failed");
        }
        Ok(Response::new(result?))
    }

    async fn open_transport(
        &self,
        request: Request<OpenTransportRequest>,
    ) -> Result<Response<OpenTransportResponse>, Status> {
        let req = request.into_inner();
        let w = &self.worker;
        let checked = transport::worker_check(
            &req,
            &transport::host_id(),
            ipc::available(&w.device),
            w.hidden_size,
        );
        let result = match checked {
            Err(reason) => Err(reason),
            Ok(()) => {
                let w = w.clone();
                tokio::task::spawn_blocking(move || w.open_session(&req))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
            }
        };
        let reply = match result {
            Ok((session, device)) => {
                let sync = match &device {
                    Ok(_) if w.spin_waits => "device (spinning waits)",
                    Ok(_) => "device",
                    Err(_) => "host",
                };
                tracing::info!(worker = %w.id, session, transport = transport::CUDA_IPC, sync, "gate transport opened");
                let (worker_flags_handle, device_sync_reason) = match device {
                    Ok(h) => (h, String::new()),
                    Err(why) => (Vec::new(), why),
                };
                OpenTransportResponse {
                    session,
                    transport: transport::CUDA_IPC.into(),
                    reason: String::new(),
                    worker_flags_handle,
                    device_sync_reason,
                }
            }
            Err(reason) => {
                tracing::info!(worker = %w.id, transport = transport::GRPC, %reason, "gate transport refused");
                OpenTransportResponse {
                    session: 0,
                    transport: transport::GRPC.into(),
                    reason,
                    worker_flags_handle: Vec::new(),
                    device_sync_reason: String::new(),
                }
            }
        };
        Ok(Response::new(reply))
    }
}

/// Whether device-ordered calls run on the stream's task (default) rather than in the blocking
/// pool: `MOEMESH_WORKER_INLINE=0` sends them to the pool, as before, for A/B runs.
fn inline_device_calls() -> bool {
    static INLINE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INLINE.get_or_init(|| std::env::var("MOEMESH_WORKER_INLINE").map_or(true, |v| v != "0"))
}

/// The routed experts of worker `shard` in the memory plan (`--plan-shard`): the plan of the
/// model under this worker's `--weights-dtype` on `shard.gpus` GPUs of `--gpu-mem-gib` (default:
/// this GPU's total memory), with the reserve flags' values.
fn planned_experts(
    cfg: &ExpertConfig,
    shard: PlanShard,
    mc: &moemesh_engine::ModelConfig,
    device: &moemesh_engine::Device,
) -> MeshResult<Vec<u32>> {
    let gpu_mem_gib = match (cfg.gpu_mem_gib, moemesh_engine::cuda::gpu(device)) {
        (Some(g), _) => g,
        (None, Some(gpu)) => memory_plan::gib(gpu.memory_info()?.1),
        (None, None) => {
            return Err(MeshError::Invalid(format!(
                "--plan-shard on {}: give --gpu-mem-gib (the plan's GPU memory; a CPU worker has \
                 no GPU to read it from)",
                cfg.member.device
            )));
        }
    };
    let model = memory_plan::ModelBytes::of_flag(mc, cfg.weights_dtype);
    let input = cfg.plan.input(shard.gpus, gpu_mem_gib);
    let w = memory_plan::shard_of_plan(&model, &input, shard)?;
    tracing::info!(
        plan_shard = %shard,
        plan_gpu = w.gpu,
        gpu_mem_gib,
        weights_dtype = model.scheme.dtype.name(),
        experts = %w.experts_flag(),
        expert_count = w.experts,
        planned_bytes = w.experts as u64 * model.expert_bytes(),
        "shard sized from the memory plan"
    );
    Ok((w.first_expert as u32..(w.first_expert + w.experts) as u32).collect())
}

/// Loads the shard, serves on `listener` until `shutdown` resolves, then leaves the registry and
/// drains.
pub async fn run(
    cfg: ExpertConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> MeshResult<()> {
    let device = device::parse_device(&cfg.member.device)?;
    let dtype = device::parse_dtype(&cfg.member.dtype)?;
    let tls = cfg.member.tls.load(ClientAuth::Required)?;
    cfg.member.limits.validate().map_err(MeshError::Invalid)?;
    let local = listener
        .local_addr()
        .map_err(|e| MeshError::Internal(e.to_string()))?;
    let (advertise, id) = cfg.member.identity("expert", local);
    // First, so that everything started below records into it.
    let metrics_server = mesh_metrics::start(&cfg.member.metrics).await?;

    let model = cfg.model.clone();
    let weights_dtype = cfg.weights_dtype;
    let files = tokio::task::spawn_blocking(move || {
        ModelFiles::open_or_embedded(model.as_deref()).map(|f| f.with_experts_dtype(weights_dtype))
    })
    .await
    .map_err(|e| MeshError::Internal(e.to_string()))??;
    let mc = &files.config;
    let moe_layers: Vec<u32> = mc.moe_layers().into_iter().map(|l| l as u32).collect();
    let layers = match &cfg.layers {
        Some(s) => parse_range(s, "layers").map_err(MeshError::Invalid)?,
        None => moe_layers.clone(),
    };
    if let Some(bad) = layers.iter().find(|l| !moe_layers.contains(l)) {
        return Err(MeshError::Invalid(format!(
            "--layers: layer {bad} has no routed experts (MoE layers: {moe_layers:?})"
        )));
    }
    if cfg.gpu_mem_gib.is_some() && cfg.plan_shard.is_none() {
        return Err(MeshError::Invalid(
            "--gpu-mem-gib sizes the shard of --plan-shard; without --plan-shard the worker \
             serves --experts (default: all)"
                .into(),
        ));
    }
    let experts = match (&cfg.experts, cfg.plan_shard) {
        (Some(s), _) => parse_range(s, "experts").map_err(MeshError::Invalid)?,
        (None, Some(shard)) => planned_experts(&cfg, shard, mc, &device)?,
        (None, None) => (0..mc.n_routed_experts as u32).collect(),
    };
    if let Some(bad) = experts.iter().find(|&&e| e as usize >= mc.n_routed_experts) {
        return Err(MeshError::Invalid(format!(
            "--experts: expert {bad} does not exist (the model has {} routed experts)",
            mc.n_routed_experts
        )));
    }
    let spec = ShardSpec {
        layers: layers.iter().map(|&l| l as usize).collect(),
        experts: experts.iter().map(|&e| e as usize).collect(),
    };
    let hidden_size = mc.hidden_size;
    let n_experts = mc.n_routed_experts;
    let (shard, files, loaded) = {
        let device = device.clone();
        tokio::task::spawn_blocking(move || {
            let loader = files.loader(&device, dtype);
            let shard = ExpertShard::load(&files.config, &loader, &spec);
            let loaded = loader.loaded_bytes();
            drop(loader);
            shard.map(|s| (s.with_f32_output(), files, loaded))
        })
        .await
        .map_err(|e| MeshError::Internal(e.to_string()))??
    };
    let weights_dtype = files.weights_format();
    tracing::info!(%id, address = %advertise, layers = ?layers, experts = ?experts, fingerprint = %files.fingerprint, "expert worker loaded");
    // The memory plan line: what this worker holds on its device (`moemesh plan` predicts it).
    tracing::info!(
        role = "expert",
        device = %cfg.member.device,
        weights_format = %weights_dtype,
        experts = experts.len(),
        moe_layers = layers.len(),
        weight_bytes = loaded.resident_total(),
        resident = %LoadedBytes::describe(&loaded.resident),
        checkpoint = %LoadedBytes::describe(&loaded.checkpoint),
        "memory plan"
    );
    // Every expert of every layer of a shard takes the same bytes: Info scales this by the
    // (layer, expert) pairs held now.
    let bytes_per_pair = loaded.resident_total() / ((experts.len() * layers.len()).max(1) as u64);
    let holdings = placement::uniform(&layers, &experts);
    let files = Arc::new(files);

    let (calls, in_flight) = serve::Drain::new();
    let (announce, mut announcements) = mpsc::channel::<Announce>(1);
    metrics::gauge!(names::WORKER_HELD_EXPERTS).set(experts.len() as f64);
    let worker = Arc::new(Worker {
        held: ArcSwap::from_pointee(Held::new(Arc::new(shard), holdings)),
        id: id.clone(),
        layers: layers.clone(),
        device_name: cfg.member.device.clone(),
        fingerprint: files.fingerprint.clone(),
        weights_dtype,
        bytes_per_pair,
        device,
        hidden_size,
        n_experts,
        source: Some(Source {
            files: files.clone(),
            dtype,
        }),
        changing: tokio::sync::Mutex::new(()),
        announce: Some(announce),
        in_flight,
        closing: Arc::new(AtomicBool::new(false)),
        sessions: Default::default(),
        spin_waits: cfg.ipc_wait.spins(),
    });
    let (reporter, health, reflection) = serve::health_and_reflection("moemesh.v1.Expert");
    let limits = &cfg.member.limits;
    let router = limits
        .server()
        // Under TLS, only gates send tokens to experts: a peer whose certificate lacks the
        // gate role gets PERMISSION_DENIED (health and reflection stay open to probes).
        .layer(tls::RequireRoleLayer::new(
            "/moemesh.v1.Expert/Forward",
            tls::CertRole::Gate,
        ))
        // The same for the device transport: only a gate may make this worker map its buffers.
        .layer(tls::RequireRoleLayer::new(
            "/moemesh.v1.Expert/OpenTransport",
            tls::CertRole::Gate,
        ))
        // And for changing the experts held: a gate's certificate (the rebalancer presents one).
        .layer(tls::RequireRoleLayer::new(
            "/moemesh.v1.Expert/SetExperts",
            tls::CertRole::Gate,
        ))
        .add_service(health)
        .add_service(reflection.0)
        .add_service(reflection.1)
        .add_service(
            ExpertServer::new(ExpertService {
                worker: worker.clone(),
            })
            .max_decoding_message_size(limits.max_message_bytes(DEFAULT_MAX_MESSAGE_MB))
            .max_encoding_message_size(256 << 20),
        );
    let incoming = limits.incoming(tls::incoming(listener, tls.clone()));
    let mut serving = serve::Serving::start(reporter, |stop| {
        router.serve_with_incoming_shutdown(incoming, stop)
    })
    .await;

    let registry = Registry::new(&cfg.member.registry_config(&files.name, tls), Vec::new())?;
    let mut member = Member {
        id: id.clone(),
        role: Role::Expert,
        address: advertise.clone(),
        layers,
        experts,
        layer_experts: Vec::new(),
        device: cfg.member.device.clone(),
        fingerprint: files.fingerprint.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    serving.register(&registry, member.clone()).await?;
    serve::announce_ready("expert", local, &id, metrics_server.as_ref());

    // Until shutdown: the registry entry follows the experts SetExperts installs.
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some((holdings, done)) = announcements.recv() => {
                member.set_holdings(&holdings);
                let _ = done.send(serving.update(member.clone()).await);
            }
        }
    }
    tracing::info!(%id, "shutting down: leaving the registry, then draining");
    serving.leave().await;
    // Streams finish their current call and end; open gate streams would keep tonic's graceful
    // shutdown waiting, hence the short grace after the drain.
    worker.closing.store(true, Ordering::SeqCst);
    serving
        .drain_then_stop(
            calls.drained(),
            Duration::from_secs(cfg.drain_timeout),
            "calls",
            Duration::from_secs(2),
        )
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use moemesh_engine::DType;
    use moemesh_proto::v1;

    use super::*;

    /// A CPU worker for experts 0 and 1 of every MoE layer of the embedded model, in `dtype`.
    fn worker(dtype: DType) -> Worker {
        let files = ModelFiles::open_or_embedded(None).expect("embedded model");
        let cfg = &files.config;
        let spec = ShardSpec {
            layers: cfg.moe_layers(),
            experts: vec![0, 1],
        };
        let layers: Vec<u32> = spec.layers.iter().map(|&l| l as u32).collect();
        let loader = files.loader(&Device::Cpu, dtype);
        let shard = ExpertShard::load(cfg, &loader, &spec).expect("shard");
        let (hidden_size, n_experts) = (cfg.hidden_size, cfg.n_routed_experts);
        drop(loader);
        Worker {
            held: ArcSwap::from_pointee(Held::new(
                Arc::new(shard.with_f32_output()),
                placement::uniform(&layers, &[0, 1]),
            )),
            id: "worker-test".into(),
            layers,
            device_name: "cpu".into(),
            fingerprint: files.fingerprint.clone(),
            weights_dtype: files.weights_format(),
            bytes_per_pair: 0,
            device: Device::Cpu,
            hidden_size,
            n_experts,
            source: Some(Source {
                files: Arc::new(files),
                dtype,
            }),
            changing: tokio::sync::Mutex::new(()),
            announce: None,
            in_flight: serve::Drain::new().1,
            closing: Arc::new(AtomicBool::new(false)),
            sessions: Default::default(),
            spin_waits: false,
        }
    }

    fn cpu_worker() -> Arc<Worker> {
        Arc::new(worker(DType::F32))
    }

    /// A device-ordered call runs on the stream's task only when its slot table is there: every
    /// held expert, or a subset built by an earlier call; the first call for a new subset (whose
    /// upload waits for the device) does not, and an expert not held stays UNAVAILABLE.
    #[test]
    fn only_a_built_slot_table_keeps_a_call_on_the_stream_task() {
        let worker = cpu_worker();
        let layer = worker.layers[0];
        let shared = |experts: Vec<u32>| pb::SharedActivations {
            experts,
            device_seq: 1,
            ..Default::default()
        };
        assert!(worker.slot_table_cached(layer, &shared(Vec::new())));
        assert!(!worker.slot_table_cached(layer, &shared(vec![0])));
        // As the first call for experts [0] leaves it (on the CPU a shard has no slot tables to
        // build from).
        let held = worker.held.load_full();
        let table =
            moemesh_engine::Tensor::from_vec(vec![0i32, -1], 2, &Device::Cpu).expect("a table");
        held.slot_tables.insert(layer as usize, &[0], table);
        assert!(worker.slot_table_cached(layer, &shared(vec![0])));
        assert!(!worker.slot_table_cached(layer, &shared(vec![1])));
        assert!(!worker.slot_table_cached(layer, &shared(vec![0, 1])));
        assert!(matches!(
            worker.slot_table(&held, layer as usize, &[2]),
            Err(MeshError::Unavailable(_))
        ));
        // No call is device-ordered on the CPU; asked anyway, a subset's table says why not.
        let err = worker
            .slot_table(&held, layer as usize, &[1])
            .expect_err("a CPU shard has no slot tables");
        assert!(err.to_string().contains("shard on a GPU"), "{err}");
        assert!(!worker.slot_table_cached(layer, &shared(vec![2])));
    }

    /// The cache counts its tables over every layer: the one past MAX_SLOT_TABLES starts it
    /// anew, whichever layer it is for.
    #[test]
    fn slot_tables_start_anew_past_their_cap() {
        let tables = SlotTables::default();
        let table = || moemesh_engine::Tensor::from_vec(vec![0i32], 1, &Device::Cpu).expect("t");
        for i in 0..MAX_SLOT_TABLES as u32 {
            tables.insert((i % 2) as usize, &[i], table());
        }
        assert!(tables.get(0, &[0]).is_some() && tables.get(1, &[1]).is_some());
        assert!(tables.get(0, &[1]).is_none(), "layer 0 never had [1]");
        tables.insert(2, &[7], table());
        assert!(tables.get(2, &[7]).is_some());
        assert!(tables.get(0, &[0]).is_none() && tables.get(1, &[1]).is_none());
    }

    /// A CPU worker refuses CUDA IPC with a reason (the gate keeps gRPC), not with an error.
    #[tokio::test]
    async fn a_cpu_worker_refuses_cuda_ipc_and_keeps_grpc() {
        let worker = cpu_worker();
        let svc = ExpertService {
            worker: worker.clone(),
        };
        let req = OpenTransportRequest {
            gate_id: "gate-1".into(),
            host_id: transport::host_id(),
            kind: transport::CUDA_IPC.into(),
            rows: 8,
            hidden: worker.hidden_size as u32,
            dtype: v1::DType::F32 as i32,
            input_handles: vec![vec![0; ipc::HANDLE_BYTES]],
            output_handles: vec![vec![0; ipc::HANDLE_BYTES]],
            device_sync: true,
            top_k: 2,
            gate_flags_handle: vec![0; ipc::HANDLE_BYTES],
        };
        let reply = svc
            .open_transport(Request::new(req))
            .await
            .expect("a refusal is an answer")
            .into_inner();
        assert_eq!(reply.session, 0);
        assert_eq!(reply.transport, transport::GRPC);
        assert!(reply.reason.contains("CPU"), "{}", reply.reason);
        assert!(worker.sessions().by_id.is_empty());
    }

    /// A call naming a session the worker does not hold fails as UNAVAILABLE, so the gate retries
    /// it (on a replica, or on this worker's next stream) instead of failing the step.
    #[test]
    fn a_call_on_an_unknown_session_is_retryable() {
        let worker = cpu_worker();
        let req = ForwardRequest {
            call_id: 1,
            layer: 1,
            pairs_per_token: vec![1],
            expert_ids: vec![0],
            weights: vec![1.0],
            shared: Some(v1::SharedActivations {
                session: 42,
                slot: 0,
                rows: 1,
                dtype: v1::DType::F32 as i32,
                token_rows: vec![0],
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = worker.forward(&req).expect_err("no such session");
        assert!(matches!(err, MeshError::Unavailable(_)), "{err}");
        assert_eq!(Status::from(err).code(), tonic::Code::Unavailable);
        // The same for a device-ordered call (its routing on the device, none in the message).
        let device_call = ForwardRequest {
            pairs_per_token: Vec::new(),
            expert_ids: Vec::new(),
            weights: Vec::new(),
            shared: Some(v1::SharedActivations {
                session: 42,
                slot: 0,
                rows: 1,
                dtype: v1::DType::F32 as i32,
                device_seq: 3,
                ..Default::default()
            }),
            ..req
        };
        let err = worker.forward(&device_call).expect_err("no such session");
        assert!(matches!(err, MeshError::Unavailable(_)), "{err}");
    }

    /// A host-path request for `experts` (one token each, weight 1) in the worker's first layer.
    fn call_for(worker: &Worker, experts: &[u32]) -> ForwardRequest {
        call_in(worker, worker.layers[0], experts)
    }

    /// A host-path request for `experts` (one token each, weight 1) in `layer`.
    fn call_in(worker: &Worker, layer: u32, experts: &[u32]) -> ForwardRequest {
        let x = moemesh_engine::Tensor::randn(
            0f32,
            1.0,
            (experts.len(), worker.hidden_size),
            &Device::Cpu,
        )
        .expect("activations");
        ForwardRequest {
            call_id: 9,
            layer,
            hidden: Some(codec::encode(&x, v1::DType::F32).expect("encode")),
            pairs_per_token: vec![1; experts.len()],
            expert_ids: experts.to_vec(),
            weights: vec![1.0; experts.len()],
            ..Default::default()
        }
    }

    /// A change is refused (RESOURCE_EXHAUSTED, sizes named) when the layers it restacks do not
    /// fit the device's free memory less the reserve; layers that keep their list cost nothing;
    /// an unknown free size does not refuse.
    #[test]
    fn a_change_whose_new_stacks_do_not_fit_the_free_memory_is_refused() {
        let worker = cpu_worker();
        let layers = worker.layers.clone();
        let from: Holdings = layers.iter().map(|&l| (l, vec![0, 1])).collect();
        let mut to = from.clone();
        let first = layers[0];
        to.insert(first, vec![0, 1, 2]);
        let b = worker.bytes_per_pair;
        // Three pairs restacked in one layer; the other layers keep theirs.
        let fits = SET_EXPERTS_RESERVE + 3 * b;
        assert!(worker.room_for(&from, &to, Some(fits)).is_ok());
        let err = worker
            .room_for(&from, &to, Some(fits - 1))
            .expect_err("short by a byte");
        let status = Status::from(err);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
        assert!(status.message().contains("restacking 3"), "{status}");
        assert!(status.message().contains("nothing changed"), "{status}");
        assert!(worker.room_for(&from, &from, Some(0)).is_ok());
        assert!(worker.room_for(&from, &to, None).is_ok());
    }

    /// SetExperts checks its input (field and limit named), loads the experts it lacks, drops
    /// those it gives up, and from then on refuses (in the reply, not with an error status)
    /// calls for a dropped expert while computing the new ones.
    #[tokio::test]
    async fn set_experts_checks_loads_drops_and_then_refuses_dropped_experts() {
        let worker = cpu_worker();
        let n = worker.n_experts as u32;
        let bad = [
            (vec![], 0, "experts: empty list"),
            (vec![1, n], 0, "experts[1]: expert"),
            (
                vec![1],
                MAX_RELEASE_GRACE_MS + 1,
                "release_grace_ms: 60001 is over the limit of 60000",
            ),
        ];
        for (experts, grace, want) in bad {
            let req = SetExpertsRequest {
                experts,
                release_grace_ms: grace,
                ..Default::default()
            };
            let status = Status::from(worker.set_experts(req).await.expect_err("refused"));
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
            assert!(status.message().contains(want), "{status}");
        }
        assert_eq!(worker.info().experts, vec![0, 1], "nothing changed");
        // One change at a time.
        {
            let _busy = worker.changing.try_lock().expect("free");
            let req = SetExpertsRequest {
                experts: vec![1],
                release_grace_ms: 0,
                ..Default::default()
            };
            let err = worker.set_experts(req).await.expect_err("busy");
            assert_eq!(Status::from(err).code(), tonic::Code::FailedPrecondition);
        }
        let before = call_for(&worker, &[0]);
        assert!(worker.forward(&before).expect("held").not_held.is_empty());
        let reply = worker
            .set_experts(SetExpertsRequest {
                experts: vec![2, 1, 2],
                release_grace_ms: 0,
                ..Default::default()
            })
            .await
            .expect("changed");
        assert_eq!(
            (reply.experts, reply.loaded, reply.dropped),
            (vec![1, 2], vec![2], vec![0])
        );
        assert_eq!(worker.info().experts, vec![1, 2]);
        // Expert 0 was given up: refused in the reply, nothing computed.
        let refused = worker
            .forward(&call_for(&worker, &[0, 2]))
            .expect("an answer");
        assert_eq!(refused.not_held, vec![0]);
        assert!(refused.output.is_none());
        // Expert 2 was loaded: computed, equal to a shard loaded with it from the start.
        let req = call_for(&worker, &[2, 1]);
        let got = worker.forward(&req).expect("computed");
        assert!(got.not_held.is_empty());
        let files = ModelFiles::open_or_embedded(None).expect("embedded model");
        let spec = ShardSpec {
            layers: vec![req.layer as usize],
            experts: vec![1, 2],
        };
        let fresh = ExpertShard::load(
            &files.config,
            &files.loader(&Device::Cpu, DType::F32),
            &spec,
        )
        .expect("shard")
        .with_f32_output();
        let (x, assignments) =
            codec::decode_forward(&req, worker.hidden_size, &Device::Cpu).expect("decode");
        let want: Vec<Vec<f32>> = fresh
            .forward_assigned(req.layer as usize, &x, &assignments)
            .and_then(|t| Ok(t.to_vec2()?))
            .expect("fresh");
        let got: Vec<Vec<f32>> =
            codec::decode(&got.output.expect("output"), "output", &Device::Cpu)
                .and_then(|t| Ok(t.to_vec2().map_err(moemesh_engine::EngineError::from)?))
                .expect("decode");
        assert_eq!(got, want);
        // A layer the worker never served is the caller's error, not a refusal.
        let mut other = call_for(&worker, &[1]);
        other.layer = 0;
        assert!(matches!(worker.forward(&other), Err(MeshError::Invalid(_))));
    }

    /// A per-layer SetExperts checks each entry (field and limit named), changes only the layers
    /// it lists, and from then on each layer computes and refuses by its own list.
    #[tokio::test]
    async fn set_experts_per_layer_checks_each_entry_and_changes_only_those_layers() {
        let worker = cpu_worker();
        let n = worker.n_experts as u32;
        let (l1, l2) = (worker.layers[0], worker.layers[1]);
        let entry = |layer: u32, experts: Vec<u32>| v1::LayerExperts { layer, experts };
        let bad = [
            (
                vec![entry(0, vec![1])],
                vec![],
                "layer_experts[0].layer: layer 0 is not served",
            ),
            (
                vec![entry(l1, vec![1]), entry(l1, vec![2])],
                vec![],
                "layer_experts[1].layer: layer 1 is listed twice",
            ),
            (
                vec![entry(l1, vec![1]), entry(l2, vec![])],
                vec![],
                "layer_experts[1].experts: empty list",
            ),
            (
                vec![entry(l2, vec![0, n])],
                vec![],
                "layer_experts[0].experts[1]: expert",
            ),
            (vec![entry(l1, vec![1])], vec![1], "experts: must be empty"),
        ];
        for (layer_experts, experts, want) in bad {
            let req = SetExpertsRequest {
                experts,
                layer_experts,
                ..Default::default()
            };
            let status = Status::from(worker.set_experts(req).await.expect_err("refused"));
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
            assert!(status.message().contains(want), "{want}: {status}");
        }
        assert!(
            worker
                .info()
                .layer_experts
                .iter()
                .all(|le| le.experts == [0, 1])
        );
        // Layer l1 swaps expert 0 for 2; the other layers keep theirs.
        let reply = worker
            .set_experts(SetExpertsRequest {
                layer_experts: vec![entry(l1, vec![2, 1])],
                ..Default::default()
            })
            .await
            .expect("changed");
        assert_eq!(reply.layer_loaded, vec![entry(l1, vec![2])]);
        assert_eq!(reply.layer_dropped, vec![entry(l1, vec![0])]);
        assert_eq!((reply.loaded, reply.dropped), (vec![2], vec![0]));
        // Held in every layer: only expert 1 now.
        assert_eq!(reply.experts, vec![1]);
        let info = worker.info();
        assert_eq!(info.experts, vec![1]);
        assert_eq!(codec::holdings_from_info(&info), {
            let mut h = placement::uniform(&worker.layers, &[0, 1]);
            h.insert(l1, vec![1, 2]);
            h
        });
        assert_eq!(info.layer_experts, reply.layer_experts);
        // Expert 0 is refused in l1 and computed in l2; expert 2 the other way round.
        let in_l1 = worker
            .forward(&call_in(&worker, l1, &[0, 2]))
            .expect("an answer");
        assert_eq!(in_l1.not_held, vec![0]);
        let in_l2 = worker
            .forward(&call_in(&worker, l2, &[0, 2]))
            .expect("an answer");
        assert_eq!(in_l2.not_held, vec![2]);
        assert!(
            worker
                .forward(&call_in(&worker, l2, &[0, 1]))
                .expect("computed")
                .output
                .is_some()
        );
        let got = worker
            .forward(&call_in(&worker, l1, &[2, 1]))
            .expect("computed");
        assert!(got.not_held.is_empty() && got.output.is_some());
    }

    /// A bf16 worker answers a bf16 request with its f32 accumulator, not a bf16 rounding of it.
    #[test]
    fn bf16_worker_returns_f32_partial_sums() {
        let files = ModelFiles::open_or_embedded(None).expect("embedded model");
        let cfg = &files.config;
        let layer = cfg.moe_layers()[0];
        let worker = worker(DType::BF16);
        let x = moemesh_engine::Tensor::randn(0f32, 1.0, (3, cfg.hidden_size), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::BF16))
            .expect("activations");
        let req = ForwardRequest {
            call_id: 7,
            layer: layer as u32,
            hidden: Some(codec::encode(&x, v1::DType::Bf16).expect("encode")),
            pairs_per_token: vec![2, 1, 1],
            expert_ids: vec![0, 1, 1, 0],
            weights: vec![0.7, 0.3, 1.1, 0.45],
            traceparent: String::new(),
            shared: None,
        };
        let reply = worker.forward(&req).expect("forward");
        assert_eq!(reply.call_id, 7);
        let out = reply.output.expect("output");
        assert_eq!(out.dtype, v1::DType::F32 as i32);
        let got: Vec<Vec<f32>> = codec::decode(&out, "output", &Device::Cpu)
            .and_then(|t| Ok(t.to_vec2().map_err(moemesh_engine::EngineError::from)?))
            .expect("decode");
        // The same shard computing in-process (output in f32) gives exactly these values.
        let assignments = [(0, 0, 0.7), (0, 1, 0.3), (1, 1, 1.1), (2, 0, 0.45)];
        let want: Vec<Vec<f32>> = worker
            .held
            .load()
            .shard
            .forward_assigned(layer, &x, &assignments)
            .and_then(|t| Ok(t.to_vec2()?))
            .expect("shard forward");
        assert_eq!(got, want);
        // ...and they are not all representable in bf16 (the old reply rounded them).
        let rounded: Vec<Vec<f32>> = moemesh_engine::Tensor::new(got.clone(), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?.to_vec2())
            .expect("round");
        assert_ne!(got, rounded, "expected f32 values that bf16 cannot hold");
    }
}
