//! The engine's [`Experts`] trait over gRPC: each MoE layer's tokens are grouped per worker and
//! sent to each worker with their (expert, weight) pairs, in one call (a few for a big step);
//! replies are weighted partial sums in f32 that add up to the routed output. A failed call is
//! retried on other replicas of the same experts (expert calls are pure). A replicated expert's
//! tokens are split evenly over its replicas (host path; a device-ordered layer gives each
//! expert to one replica per layer call, rotating). A worker that refuses a call because it gave
//! an expert up (`ForwardResponse.not_held`, live re-placement) is not taken for a failed one:
//! the call's pairs go again, by the newest placement, to the experts' other holders. The engine runs on its
//! own thread; the calls run on the tokio runtime, so the engine computes shared experts while
//! they are in flight.
//!
//! Two transports for the tensors (see `moemesh_common::transport`): a worker whose stream has
//! a CUDA IPC session gets the layer's activations copied GPU to GPU into a buffer slot of that
//! session (all `T` rows, the request naming each of its tokens' rows) and answers with its f32
//! partial sums over all `T` rows in the slot's output buffer; the others get the rows they need
//! in the gRPC message, as before. The handshake is the gRPC call itself: the gate waits on an
//! event recorded after its input copies (on the engine thread, before the shared experts are
//! queued) and only then sends (so the worker reads finished data), the worker synchronises
//! before it replies (so the reply means the output is written),
//! and the gate queues its copy out of the slot before freeing the slot for the next call, on its
//! one stream, ahead of the next input copy. Deadlines, retries and replicas are the same for
//! both: a worker that misses its deadline is failed on the control plane and its pairs go to a
//! replica, on whichever transport that replica has.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use moemesh_common::metrics::names;
use moemesh_common::transport::{DeviceLayout, ExpertGraphs, flags};
use moemesh_common::{MeshError, MeshResult, codec, telemetry};
use moemesh_engine::cuda::{FlagWait, ipc};
use moemesh_engine::{
    DType, Device, EngineError, Experts, PendingExperts, RoutedOut, Routing, Tensor,
};
use moemesh_proto::v1::{self, ForwardRequest, SharedActivations};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tracing::{Instrument, Span};

use crate::expert_load::ExpertLoad;
use crate::workers::{
    Conn, Excluded, IpcSession, Placement, Routes, SlotGuard, WorkerClient, WorkerPool,
};

const MAX_ATTEMPTS: usize = 4;

/// Largest activation payload of one expert call, in bytes (the f32 reply's, the larger of the
/// two directions). A worker's share of a big step is sent as several calls under it, far from
/// the 256 MiB message limit on both ends: one message over that limit would fail the call, and
/// the worker would be taken for a failed one and its replicas tried with the same message.
const MAX_CALL_BYTES: usize = 64 << 20;

/// (token row, expert, weight).
type Pair = (u32, u32, f32);
/// Worker id → its client and the pairs it computes this round.
type Groups = BTreeMap<String, (Arc<WorkerClient>, Vec<Pair>)>;

pub struct RemoteExperts {
    pub pool: Arc<WorkerPool>,
    pub handle: Handle,
    pub wire: v1::DType,
    pub timeout: Duration,
    /// The model's routed experts per MoE layer (every one is given to some worker in a
    /// device-ordered layer).
    n_experts: usize,
    /// The step's device-ordered calls, watched against their deadline.
    watch: Arc<Watch>,
    /// Tokens routed per (layer, expert) on device-ordered layers, counted on the GPU.
    load: Mutex<DeviceLoad>,
    /// Tokens routed per (layer, expert), since start and over the window, both paths (for
    /// `Gate.Info` and the metrics).
    pub routed: Arc<ExpertLoad>,
    /// `--expert-graphs`, and the gate's device as the registry names it (for `auto`).
    graphs: ExpertGraphs,
    gate_device: String,
    /// The decode graph step in progress, if any (see [`Experts::graph_begin`]).
    graph: Mutex<Option<Arc<GraphPlan>>>,
    /// The flag table of the newest plan, by its key: graphs captured under a key read their
    /// call numbers from that table, so it lives as long as the key does.
    graph_table: Mutex<Option<(u64, Tensor)>>,
    graph_cache: Mutex<Option<CachedPlan>>,
}

/// One worker's call in a decode graph's MoE layer.
struct GraphCall {
    client: Arc<WorkerClient>,
    conn: Arc<Conn>,
    session: Arc<IpcSession>,
    slot: usize,
    experts: Vec<u32>,
    /// Its entry in the flag table: its place in the order calls are sent in.
    entry: usize,
}

/// Every MoE layer's calls of a plan, shared by the steps that reuse it.
struct PlanCalls {
    layers: HashMap<usize, Vec<GraphCall>>,
    /// Every call in the order sent (MoE layers in order, then workers): (layer, index in its
    /// layer's calls).
    order: Vec<(usize, usize)>,
}

/// The last plan made, reused by the next steps while its placement and workers stand: making
/// one picks a holder for every (layer, expert), ~0.2 ms of host time a step.
struct CachedPlan {
    /// The placement it was made from (a new `Arc` on every registry change).
    routes: Arc<Routes>,
    layers: Vec<usize>,
    dtype: DType,
    key: u64,
    calls: Arc<PlanCalls>,
    /// Each worker's client and the stream the plan's sessions belong to.
    workers: Vec<(Arc<WorkerClient>, Arc<Conn>)>,
    /// Steps that reused it: past [`PLAN_REUSES`] it is made again, so that a replica that
    /// recovered meanwhile gets its share back.
    uses: u32,
}

/// The message of a device-ordered call: `layer`'s experts `experts` over `rows` rows in `dtype`
/// in slot `slot` of the worker's session `session` (`(session, slot)`), call number `seq`.
fn device_call(
    call_id: u64,
    layer: usize,
    (session, slot): (u64, usize),
    rows: usize,
    dtype: DType,
    seq: u32,
    experts: Vec<u32>,
) -> ForwardRequest {
    ForwardRequest {
        call_id,
        layer: layer as u32,
        hidden: None,
        pairs_per_token: Vec::new(),
        expert_ids: Vec::new(),
        weights: Vec::new(),
        traceparent: String::new(),
        shared: Some(SharedActivations {
            session,
            slot: slot as u32,
            rows: rows as u32,
            dtype: codec::wire_dtype_for(dtype) as i32,
            token_rows: Vec::new(),
            device_seq: seq,
            experts,
        }),
    }
}

/// Experts `0..n` grouped by the worker `pick` gives each (`None` if it gives none for one),
/// the groups in the order of the workers' `serial`s, each group's experts ascending: one call
/// per worker of a device-ordered layer.
fn group_experts<W>(
    n: u32,
    mut pick: impl FnMut(u32) -> Option<W>,
    serial: impl Fn(&W) -> u64,
) -> Option<Vec<(W, Vec<u32>)>> {
    let mut groups: BTreeMap<u64, (W, Vec<u32>)> = BTreeMap::new();
    for e in 0..n {
        let w = pick(e)?;
        groups
            .entry(serial(&w))
            .or_insert_with(|| (w, Vec::new()))
            .1
            .push(e);
    }
    Some(groups.into_values().collect())
}

/// A worker of a plan being made: its client, its stream and every slot of its session.
type HeldWorker = (Arc<WorkerClient>, Arc<Conn>, Vec<SlotGuard>);

/// Steps a plan is reused for before it is made again.
const PLAN_REUSES: u32 = 1024;

/// A decode graph's step: every MoE layer's calls, fixed (see [`Experts::graph_begin`]).
struct GraphPlan {
    rows: usize,
    dtype: DType,
    calls: Arc<PlanCalls>,
    /// `[calls + 1]` u32 on the device: each call's number for the run in progress, then the
    /// block counter of the launches that copy a layer's inputs and signal (0 between them).
    table: Tensor,
    /// Every slot of every session the plan uses, held for the step.
    _slots: Vec<SlotGuard>,
    /// The newest number sent per (session, slot) by the last `graph_send`, to release the
    /// calls of a run that was not queued whole.
    sent: Mutex<Vec<(Arc<IpcSession>, usize, u32)>>,
}

/// Steps between two reads of the device-side expert load into the metrics.
const LOAD_FLUSH_STEPS: u32 = 64;

/// The routing of device-ordered layers never reaches the host, so the tokens per (layer,
/// expert) (`ExpertLoad`, which the host path adds to per call) add up on
/// the GPU, one `[n_experts]` u32 count per layer, kept in the same buffer for good (decode graphs
/// add to it), read and zeroed every [`LOAD_FLUSH_STEPS`] steps at `settle`, when the step's work
/// is done anyway. (A step run again after a released call counts its layers again: rare, and
/// only the metric sees it.)
#[derive(Default)]
struct DeviceLoad {
    /// Per layer, `[E]` u32 tokens routed since the last flush (on the device).
    counts: BTreeMap<u32, Tensor>,
    steps: u32,
}

impl DeviceLoad {
    /// Adds a layer's routed ids to its counts. On the GPU the counts stay in one buffer per
    /// layer for good (a decode graph's kernels add to it at every replay).
    fn add(&mut self, layer: u32, ids: &Tensor, n_experts: usize) -> moemesh_engine::Result<()> {
        let counts = self.buffer(layer, n_experts, ids.device())?;
        // One histogram launch: candle's `index_add` with one output element runs its loop over
        // the ids in a single thread (2 ms a layer at 2,048 rows, on the step's critical path).
        let counted = match moemesh_engine::cuda::gpu(ids.device()) {
            Some(g) => g.count_experts(ids, &counts)?,
            None => false,
        };
        let counts = if counted {
            counts
        } else {
            let flat = ids.flatten_all()?;
            let ones = Tensor::ones(flat.dim(0)?, DType::U32, ids.device())?;
            counts.index_add(&flat, &ones, 0)?
        };
        self.counts.insert(layer, counts);
        Ok(())
    }

    /// A layer's counts (`[n_experts]` u32 on `device`), made (zeros) on first use and kept:
    /// for a kernel that adds to them itself (`copy_batch_signal`'s count).
    fn buffer(
        &mut self,
        layer: u32,
        n_experts: usize,
        device: &Device,
    ) -> moemesh_engine::Result<Tensor> {
        if let Some(c) = self.counts.get(&layer) {
            return Ok(c.clone());
        }
        let c = Tensor::zeros(n_experts, DType::U32, device)?;
        self.counts.insert(layer, c.clone());
        Ok(c)
    }

    /// Every [`LOAD_FLUSH_STEPS`]th call: the counts into `routed`, and zero again.
    fn step_done(&mut self, routed: &ExpertLoad) -> moemesh_engine::Result<()> {
        self.steps += 1;
        if self.steps < LOAD_FLUSH_STEPS || self.counts.is_empty() {
            return Ok(());
        }
        self.steps = 0;
        for (&layer, counts) in &self.counts {
            let read = counts.to_vec1::<u32>()?;
            // Zeroed where they are: decode graphs hold the buffers' addresses.
            counts.slice_set(&counts.zeros_like()?, 0, 0)?;
            let counts = read;
            routed.add(
                layer,
                counts
                    .into_iter()
                    .enumerate()
                    .filter(|&(_, n)| n > 0)
                    .map(|(e, n)| (e as u32, n as u64)),
            );
        }
        Ok(())
    }
}

impl RemoteExperts {
    pub fn new(
        pool: Arc<WorkerPool>,
        handle: Handle,
        wire: v1::DType,
        timeout: Duration,
        n_experts: usize,
        load_window: Duration,
    ) -> Self {
        let watch = Arc::new(Watch {
            timeout,
            step: Mutex::new(None),
            failed: AtomicBool::new(false),
        });
        Watch::start(&watch);
        RemoteExperts {
            pool,
            handle,
            wire,
            timeout,
            n_experts,
            watch,
            load: Mutex::default(),
            routed: Arc::new(ExpertLoad::new(n_experts, load_window)),
            graphs: ExpertGraphs::Off,
            gate_device: String::new(),
            graph: Mutex::new(None),
            graph_table: Mutex::new(None),
            graph_cache: Mutex::new(None),
        }
    }

    /// Decode steps as CUDA graphs, by `--expert-graphs`; `gate_device` is the gate's device as
    /// the registry names it (`auto` compares the workers' with it).
    pub fn with_graphs(mut self, graphs: ExpertGraphs, gate_device: &str) -> Self {
        self.graphs = graphs;
        self.gate_device = gate_device.to_string();
        self
    }

    /// Whether `auto` allows graphs with `client`: it is on another GPU, or MPS runs.
    fn graph_allowed(&self, client: &WorkerClient) -> bool {
        match self.graphs {
            ExpertGraphs::Off => false,
            ExpertGraphs::On => true,
            ExpertGraphs::Auto => moemesh_common::transport::gate_may_spin(
                &client.member.device,
                &self.gate_device,
                moemesh_common::transport::under_mps(),
            ),
        }
    }

    /// Whether the last step failed because a device-ordered call was released (its worker
    /// died, hung or left): the step may be run again at once, its calls going elsewhere.
    pub fn take_device_failure(&self) -> bool {
        self.watch.failed.swap(false, Ordering::SeqCst)
    }
}

/// One device-ordered call of the step in progress.
struct Sent {
    client: Arc<WorkerClient>,
    conn: Arc<Conn>,
    session: Arc<IpcSession>,
    slot: usize,
    seq: u32,
}

/// The step in progress's device-ordered calls.
struct InFlight {
    device: Device,
    deadline: Instant,
    sent: Vec<Sent>,
    /// Where the step's device work ends (`settle_mark`), when work was queued after it, and
    /// how many calls were tracked then (a call tracked later makes the mark stale).
    end: Option<(ipc::Fence, usize)>,
    /// Workers (serials) whose streams the watch failed for this step.
    failed: HashSet<u64>,
}

/// The index of the first call whose session's release flag (the address of each call's
/// [`ReleaseFlag`](moemesh_engine::cuda::ipc::ReleaseFlag), `None` for a call without one) is
/// the one the wait spinning now names (`waiting`, from
/// [`waiting_on`](moemesh_engine::cuda::ipc::waiting_on)): the worker holding the step up.
fn holding(releases: &[Option<u64>], waiting: Option<u64>) -> Option<usize> {
    let waiting = waiting?;
    releases.iter().position(|&r| r == Some(waiting))
}

/// For calls whose waits do not spin (and so never appear in the waiting record): the index of
/// the first call (session, slot, number), in the order sent, whose slot's `done` word
/// (`done[session][slot]`, `None` when it could not be read) has not reached its number in the
/// cyclic order the device waits use.
fn first_unfinished(
    calls: &[(u64, usize, u32)],
    done: &HashMap<u64, Option<Vec<u32>>>,
) -> Option<usize> {
    calls.iter().position(|&(session, slot, seq)| {
        match done
            .get(&session)
            .and_then(|w| w.as_ref()?.get(slot).copied())
        {
            Some(word) => (word.wrapping_sub(seq) as i32) < 0,
            None => true,
        }
    })
}

/// Bounds a step's device-ordered calls: the gate's stream waits on the device for each
/// worker's flag, which a dead or hung worker never writes, so a thread watches the step's
/// deadline (`--expert-timeout`) and, past it, fails the stream of the worker whose flag the
/// spinning wait names, which releases its waits with a host store
/// ([`IpcSession::break_and_release`]); the step then fails whole at `settle` and is run again
/// without it. With spinning waits nothing here queues work on the GPU, which the held stream
/// could hold up too; sessions whose waits are on the stream (one GPU without MPS) are found by
/// reading their `done` words and released by writing them.
struct Watch {
    /// `--expert-timeout`: how long a step's device-ordered calls may take.
    timeout: Duration,
    step: Mutex<Option<InFlight>>,
    /// Set when a step failed on a released call (see [`RemoteExperts::take_device_failure`]).
    failed: AtomicBool,
}

impl Watch {
    fn start(me: &Arc<Self>) {
        let weak = Arc::downgrade(me);
        let spawned = std::thread::Builder::new()
            .name("expert-watch".into())
            .spawn(move || {
                while let Some(w) = weak.upgrade() {
                    w.check(Instant::now(), w.timeout);
                    drop(w);
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the expert-call watch thread");
        }
    }

    /// Past the deadline: fails the stream of the worker whose call holds the step up (the
    /// worker whose flag the wait spinning now names; the calls after it wait on the gate's
    /// stream, which waits on that one), which releases its waits, and gives the rest of the
    /// step another deadline. A step with no wait spinning is the gate's own slowness: nothing
    /// is failed.
    fn check(&self, now: Instant, timeout: Duration) {
        // The watch's progress is traced (target `moemesh_gate::watch`, debug): a watch that
        // stops short of failing a late worker shows where it waits.
        let mut step = match self.step.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                tracing::debug!(target: "moemesh_gate::watch", "the step's record is busy; waiting for it");
                lock(&self.step)
            }
        };
        let Some(f) = step.as_mut() else {
            return;
        };
        if now < f.deadline {
            return;
        }
        f.deadline = now + timeout;
        let waiting = ipc::waiting_on();
        let releases: Vec<Option<u64>> = f
            .sent
            .iter()
            .map(|c| c.session.device.as_ref().map(|d| d.release.address()))
            .collect();
        let i = match holding(&releases, waiting) {
            Some(i) => i,
            None => {
                // Calls that wait on the stream (one GPU without MPS) are not in the record:
                // their `done` words are read (a copy beside the held stream).
                let stream_waits: Vec<usize> = (0..f.sent.len())
                    .filter(|&i| f.sent[i].session.device.as_ref().is_some_and(|d| !d.spin))
                    .collect();
                tracing::debug!(target: "moemesh_gate::watch", calls = f.sent.len(), stream_waits = stream_waits.len(), ?waiting, "a step is past its deadline with no call's wait spinning");
                let mut done: HashMap<u64, Option<Vec<u32>>> = HashMap::new();
                for &i in &stream_waits {
                    let c = &f.sent[i];
                    done.entry(c.session.nonce).or_insert_with(|| {
                        let d = c.session.device.as_ref()?;
                        d.gate_flags.read_words_now(0, d.slots).ok()
                    });
                }
                let calls: Vec<(u64, usize, u32)> = stream_waits
                    .iter()
                    .map(|&i| (f.sent[i].session.nonce, f.sent[i].slot, f.sent[i].seq))
                    .collect();
                let Some(j) = first_unfinished(&calls, &done) else {
                    return;
                };
                stream_waits[j]
            }
        };
        let c = &f.sent[i];
        if !f.failed.insert(c.client.serial) {
            return;
        }
        tracing::warn!(worker = %c.client.member.id, timeout = ?timeout, "a device-ordered expert call missed its deadline; failing the worker's stream");
        metrics::counter!(names::RETRIES, "worker" => c.client.member.id.clone()).increment(1);
        c.client.mark_failed();
        c.conn.fail(
            MeshError::Unavailable("a device-ordered call missed its deadline".into()).into(),
        );
        tracing::debug!(target: "moemesh_gate::watch", worker = %c.client.member.id, "the late worker's stream failed and its waits released");
    }

    fn track(&self, device: &Device, sent: Sent) {
        let mut step = lock(&self.step);
        let f = step.get_or_insert_with(|| InFlight {
            device: device.clone(),
            deadline: Instant::now() + self.timeout,
            sent: Vec::new(),
            end: None,
            failed: HashSet::new(),
        });
        f.sent.push(sent);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether every device-ordered call of a finished step was computed: its session is not
/// broken and the worker's wait saw exactly the call's number (calls older than the ring on
/// their slot are past checking). `Err` names the first worker that fails this.
fn verify_calls(sent: &[Sent]) -> Result<(), (Arc<WorkerClient>, Arc<Conn>, String)> {
    // Each session's flags are read once.
    let mut words: HashMap<u64, Vec<u32>> = HashMap::new();
    // The newest call number per (session, slot), to skip calls the ring no longer holds.
    let mut newest: HashMap<(u64, usize), u32> = HashMap::new();
    for c in sent {
        newest.insert((c.session.nonce, c.slot), c.seq);
    }
    for c in sent {
        let bad = |why: String| Err((c.client.clone(), c.conn.clone(), why));
        if c.session.is_broken() {
            return bad("its stream failed during the step".into());
        }
        let Some(d) = &c.session.device else {
            return bad("a device-ordered call on a session without device flags".into());
        };
        let last = newest
            .get(&(c.session.nonce, c.slot))
            .copied()
            .unwrap_or(c.seq);
        if last.wrapping_sub(c.seq) as usize >= flags::RING {
            continue;
        }
        let all = match words.entry(c.session.nonce) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                match d.gate_flags.read_words_now(0, flags::gate_words(d.slots)) {
                    Ok(w) => v.insert(w),
                    Err(e) => return bad(format!("reading its flags: {e}")),
                }
            }
        };
        let seen = all
            .get(flags::seen(d.slots, c.slot, c.seq))
            .copied()
            .unwrap_or(0);
        if seen != c.seq {
            return bad(format!(
                "call {} of slot {} was released, not computed (its wait saw {seen})",
                c.seq, c.slot
            ));
        }
    }
    Ok(())
}

/// Queues a layer's rows `x`, expert ids and weights into each device-ordered input buffer
/// (laid out by its `DeviceLayout`): one launch for all of them where the addresses allow it,
/// else three copies each.
fn write_inputs(
    inputs: &[(&ipc::SharedBuffer, DeviceLayout)],
    x: &Tensor,
    ids: &Tensor,
    weights: &Tensor,
) -> moemesh_engine::Result<()> {
    if let Some(g) = moemesh_engine::cuda::gpu(x.device())
        && let Some(copies) = input_copies(&g, inputs, x, ids, weights)?
    {
        return g.copy_batch(&copies);
    }
    for (input, layout) in inputs {
        input.write_at(0, x)?;
        input.write_at(layout.ids, ids)?;
        input.write_at(layout.weights, weights)?;
    }
    Ok(())
}

/// [`write_inputs`]'s copies as `(source, destination, bytes)` device addresses for
/// [`Gpu::copy_batch`](moemesh_engine::cuda::Gpu::copy_batch) (`None`: not in whole aligned
/// words; the buffers' own writes then).
fn input_copies(
    g: &moemesh_engine::cuda::Gpu,
    inputs: &[(&ipc::SharedBuffer, DeviceLayout)],
    x: &Tensor,
    ids: &Tensor,
    weights: &Tensor,
) -> moemesh_engine::Result<Option<Vec<(u64, u64, usize)>>> {
    let sizes = [x, ids, weights].map(|t| t.elem_count() * t.dtype().size_in_bytes());
    let src = [g.address(x)?, g.address(ids)?, g.address(weights)?];
    if !src.iter().all(|a| a.is_multiple_of(4)) || !sizes.iter().all(|n| n.is_multiple_of(4)) {
        return Ok(None);
    }
    let mut copies = Vec::with_capacity(3 * inputs.len());
    for (input, layout) in inputs {
        for (i, at) in [0, layout.ids, layout.weights].into_iter().enumerate() {
            copies.push((src[i], input.address(at, sizes[i])?, sizes[i]));
        }
    }
    Ok(Some(copies))
}

/// The sum of the workers' `[t, h]` f32 partial sums in their slots' output buffers (after
/// their `done` waits are queued): one kernel reading them where they are when it can, else a
/// copy of each and adds. Zeros when there are none.
fn sum_outputs(
    outputs: &[&ipc::SharedBuffer],
    t: usize,
    h: usize,
    device: &Device,
) -> moemesh_engine::Result<Tensor> {
    if outputs.is_empty() {
        return Ok(Tensor::zeros((t, h), DType::F32, device)?);
    }
    if outputs.len() <= 4
        && let Some(g) = moemesh_engine::cuda::gpu(device)
    {
        let parts = outputs
            .iter()
            .map(|o| o.address(0, 4 * t * h))
            .collect::<moemesh_engine::Result<Vec<u64>>>()?;
        if let Some(sum) = g.add_parts(&parts, &[t, h])? {
            return Ok(sum);
        }
    }
    let mut sum: Option<Tensor> = None;
    for o in outputs {
        let part = o.read(DType::F32, &[t, h])?;
        sum = Some(match sum {
            None => part,
            Some(s) => (s + part)?,
        });
    }
    sum.ok_or_else(|| EngineError::Internal("no expert outputs to add".into()))
}

/// A device-ordered call being set up: the worker, its stream, the slot and the message's room.
struct DevicePlan {
    client: Arc<WorkerClient>,
    conn: Arc<Conn>,
    slot: SlotGuard,
    permit: mpsc::OwnedPermit<ForwardRequest>,
    /// The experts this worker computes (explicitly: see `plan_device`).
    experts: Vec<u32>,
}

impl RemoteExperts {
    /// Plans a device-ordered layer: every expert given to a worker (the replica rotation's
    /// choice), each of those workers with an open device-ordered session, a free slot and room
    /// on its stream. `None` when any of that is missing (the layer then takes the host path).
    fn plan_device(
        &self,
        layer: u32,
        rows: usize,
        dtype: DType,
        k: usize,
    ) -> Option<Vec<DevicePlan>> {
        if self.n_experts == 0 {
            return None;
        }
        let round = self.pool.next_round();
        let none = Excluded::default();
        let groups = group_experts(
            self.n_experts as u32,
            |e| self.pool.pick(layer, e, &none, round, Placement::Step).ok(),
            |c| c.serial,
        )?;
        let mut planned = Vec::with_capacity(groups.len());
        for (client, experts) in groups {
            let (conn, slot) = client.device_slot(rows)?;
            let d = slot.session.device.as_ref()?;
            if slot.session.dtype != dtype || d.top_k != k {
                return None;
            }
            let permit = conn.tx.clone().try_reserve_owned().ok()?;
            // Always the explicit list, never "every expert held": a worker whose experts just
            // grew (SetExperts) would otherwise also compute experts this placement gives to
            // another worker, and their sum would count twice.
            planned.push(DevicePlan {
                client,
                conn,
                slot,
                permit,
                experts,
            });
        }
        Some(planned)
    }
}

impl RemoteExperts {
    /// The GPU decode graphs run on: where the workers' sessions live, if that is a CUDA device
    /// with moemesh's kernels (the flag kernels).
    fn graph_device(&self) -> Option<Device> {
        self.pool
            .ipc_device()
            .filter(|d| moemesh_engine::cuda::gpu(d).is_some())
    }

    /// The cached plan's key, calls and every slot of its sessions, when it still holds for a
    /// step over `layers` of `rows` rows: the same pinned placement, every worker ready, not
    /// suspect and on the stream the plan was made with, its slots free.
    fn reuse_plan(
        &self,
        routes: Option<&Arc<Routes>>,
        layers: &[usize],
        rows: usize,
        dtype: DType,
    ) -> Option<(u64, Arc<PlanCalls>, Vec<SlotGuard>)> {
        let mut cache = lock(&self.graph_cache);
        let c = cache.as_mut()?;
        if !routes.is_some_and(|r| Arc::ptr_eq(r, &c.routes))
            || c.layers != layers
            || c.dtype != dtype
            || c.uses >= PLAN_REUSES
        {
            return None;
        }
        let now = Instant::now();
        let mut slots = Vec::new();
        for (client, conn) in &c.workers {
            if !client.is_ready()
                || client.is_suspect(now)
                || !client.live().is_some_and(|l| Arc::ptr_eq(&l, conn))
            {
                return None;
            }
            slots.extend(conn.ipc.as_ref()?.all_slots(rows)?);
        }
        c.uses += 1;
        Some((c.key, c.calls.clone(), slots))
    }

    /// Makes `calls` the step's plan, with the flag table of `key` (kept while the key is).
    fn install_plan(
        &self,
        key: u64,
        calls: Arc<PlanCalls>,
        slots: Vec<SlotGuard>,
        rows: usize,
        dtype: DType,
        device: &Device,
    ) -> moemesh_engine::Result<()> {
        let n = calls.order.len();
        let table = {
            let mut t = lock(&self.graph_table);
            match t.as_ref() {
                Some((k, table)) if *k == key && table.dim(0)? == n + 1 => table.clone(),
                _ => {
                    let table = Tensor::zeros(n + 1, DType::U32, device)?;
                    *t = Some((key, table.clone()));
                    table
                }
            }
        };
        *lock(&self.graph) = Some(Arc::new(GraphPlan {
            rows,
            dtype,
            calls,
            table,
            _slots: slots,
            sent: Mutex::new(Vec::new()),
        }));
        Ok(())
    }

    /// A decode graph's MoE layer's hand-off done by launches of its own (when the routing
    /// launch did not do it): the rows and routing into each call's slot, then the `ready`
    /// words, and the layer's expert load counted.
    fn graph_inputs(
        &self,
        plan: &GraphPlan,
        calls: &[GraphCall],
        g: &moemesh_engine::cuda::Gpu,
        layer: usize,
        x: &Tensor,
        routing: &moemesh_engine::cuda::DeviceRouting,
    ) -> moemesh_engine::Result<()> {
        let internal = move |what: String| {
            EngineError::Internal(format!("decode graph, layer {layer}: {what}"))
        };
        let x = x.contiguous()?;
        let ids = routing.ids.contiguous()?;
        let weights = routing.weights.contiguous()?;
        let mut inputs = Vec::with_capacity(calls.len());
        let mut ready = Vec::with_capacity(calls.len());
        for c in calls {
            let d = c
                .session
                .device
                .as_ref()
                .ok_or_else(|| internal("a session without device flags".into()))?;
            if d.top_k != routing.k {
                return Err(internal(format!(
                    "routing of width {} on a session of width {}",
                    routing.k, d.top_k
                )));
            }
            let slot = c
                .session
                .slots
                .get(c.slot)
                .ok_or_else(|| internal(format!("no slot {}", c.slot)))?;
            inputs.push((&slot.input, d.layout));
            ready.push((d.worker_flags.word_address(flags::ready(c.slot))?, c.entry));
        }
        // The copies and the `ready` words in one launch where they fit one (the table's last
        // word counts its blocks), else a launch each; the layer's expert load counted by that
        // launch too, after its signals.
        let counter = plan.calls.order.len();
        let folded = moemesh_engine::cuda::MeshFolds::get().signal
            && match input_copies(g, &inputs, &x, &ids, &weights)? {
                Some(copies) => {
                    let counts =
                        lock(&self.load).buffer(layer as u32, self.n_experts, x.device())?;
                    g.copy_batch_signal(
                        &copies,
                        &ready,
                        &plan.table,
                        counter,
                        Some((&ids, &counts)),
                    )?
                }
                None => false,
            };
        if !folded {
            write_inputs(&inputs, &x, &ids, &weights)?;
            g.signal_words(&ready, &plan.table)?;
            // Counted after the signals: off the workers' critical path.
            lock(&self.load).add(layer as u32, &ids, self.n_experts)?;
        }
        Ok(())
    }

    /// A decode graph's MoE layer: the fixed calls' device work only (rows and routing into each
    /// slot, the `ready` flag from the table; then, deferred, each `done` flag waited for and the
    /// partial sums added). The messages went out in `graph_send`.
    fn dispatch_graph(
        &self,
        plan: &Arc<GraphPlan>,
        layer: usize,
        x: &Tensor,
        routing: &moemesh_engine::cuda::DeviceRouting,
    ) -> moemesh_engine::Result<PendingExperts> {
        let internal = move |what: String| {
            EngineError::Internal(format!("decode graph, layer {layer}: {what}"))
        };
        let (t, h) = x.dims2()?;
        if t != plan.rows || x.dtype() != plan.dtype {
            return Err(internal(format!(
                "{t} rows of {:?} where the plan has {} of {:?}",
                x.dtype(),
                plan.rows,
                plan.dtype
            )));
        }
        let calls = plan
            .calls
            .layers
            .get(&layer)
            .ok_or_else(|| internal("not a layer of the plan".into()))?;
        let device = x.device().clone();
        let g =
            moemesh_engine::cuda::gpu(&device).ok_or_else(|| internal("no GPU kernels".into()))?;
        if !routing.handed_off {
            self.graph_inputs(plan, calls, &g, layer, x, routing)?;
        }
        let plan = plan.clone();
        Ok(PendingExperts::deferred_out(move || {
            let calls = plan
                .calls
                .layers
                .get(&layer)
                .ok_or_else(|| internal("not a layer of the plan".into()))?;
            let mut outputs = Vec::with_capacity(calls.len());
            let mut done = Vec::with_capacity(calls.len());
            for c in calls {
                let (Some(d), Some(slot)) =
                    (c.session.device.as_ref(), c.session.slots.get(c.slot))
                else {
                    return Err(internal("a call's session changed".into()));
                };
                let word = d.gate_flags.word_address(flags::done(c.slot))?;
                let release = d.release.address();
                done.push((FlagWait { word, release }, c.entry));
                outputs.push(&slot.output);
            }
            let parts = outputs
                .iter()
                .map(|o| o.address(0, 4 * t * h))
                .collect::<moemesh_engine::Result<Vec<u64>>>()?;
            // A few rows: the parts and their flags go to the layer's residual add and next
            // norm, which waits and sums in its own launch (or has them summed).
            if moemesh_engine::cuda::MeshFolds::get().wait
                && (1..=4).contains(&parts.len())
                && t <= moemesh_engine::cuda::WAIT_NORM_MAX_ROWS
            {
                let keep: Arc<dyn std::any::Any + Send + Sync> = plan.clone();
                return Ok(RoutedOut::Parts(moemesh_engine::cuda::WaitParts {
                    parts,
                    waits: done,
                    table: plan.table.clone(),
                    rows: t,
                    cols: h,
                    keep,
                }));
            }
            // Small steps wait and add in one launch; others wait per worker, then add.
            if let Some(sum) = g.wait_add_parts(&parts, &done, &plan.table, &[t, h])? {
                return Ok(RoutedOut::Sum(sum));
            }
            for &(w, entry) in &done {
                g.wait_word(w, &plan.table, entry)?;
            }
            sum_outputs(&outputs, t, h, &device).map(RoutedOut::Sum)
        }))
    }
}

impl Experts for RemoteExperts {
    fn route_handoff(
        &self,
        layer: usize,
        x: &Tensor,
        k: usize,
    ) -> moemesh_engine::Result<Option<moemesh_engine::cuda::RouteHandoff>> {
        if !moemesh_engine::cuda::MeshFolds::get().route {
            return Ok(None);
        }
        let Some(plan) = lock(&self.graph).clone() else {
            return Ok(None);
        };
        let (t, _) = x.dims2()?;
        let Some(calls) = plan.calls.layers.get(&layer) else {
            return Ok(None);
        };
        // Only the fused routing kernel (a few rows) takes a hand-off.
        if t != plan.rows
            || t > moemesh_engine::router::FUSED_ROUTE_MAX_TOKENS
            || x.dtype() != plan.dtype
            || calls.is_empty()
            || calls.len() > moemesh_engine::cuda::ROUTE_HANDOFF_MAX
        {
            return Ok(None);
        }
        let rows = x.contiguous()?;
        let row_bytes = rows.elem_count() * rows.dtype().size_in_bytes();
        let id_bytes = t * k * 4;
        let mut slots = Vec::with_capacity(calls.len());
        let mut words = Vec::with_capacity(calls.len());
        for c in calls {
            let (Some(d), Some(slot)) = (c.session.device.as_ref(), c.session.slots.get(c.slot))
            else {
                return Ok(None);
            };
            if d.top_k != k {
                return Ok(None);
            }
            slots.push([
                slot.input.address(0, row_bytes)?,
                slot.input.address(d.layout.ids, id_bytes)?,
                slot.input.address(d.layout.weights, id_bytes)?,
            ]);
            words.push((d.worker_flags.word_address(flags::ready(c.slot))?, c.entry));
        }
        let counts = lock(&self.load).buffer(layer as u32, self.n_experts, rows.device())?;
        Ok(Some(moemesh_engine::cuda::RouteHandoff {
            rows,
            slots,
            words,
            table: plan.table.clone(),
            counts: Some(counts),
        }))
    }

    fn dispatch_device(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &moemesh_engine::cuda::DeviceRouting,
    ) -> moemesh_engine::Result<Option<PendingExperts>> {
        let device = x.device().clone();
        if !device.is_cuda() {
            return Ok(None);
        }
        let (t, h) = x.dims2()?;
        let graph = lock(&self.graph).clone();
        if let Some(plan) = graph {
            return self.dispatch_graph(&plan, layer, x, routing).map(Some);
        }
        // `pick` opens replicas' streams in the background on the runtime.
        let _runtime = self.handle.enter();
        let Some(planned) = self.plan_device(layer as u32, t, x.dtype(), routing.k) else {
            return Ok(None);
        };
        let x = x.contiguous()?;
        let ids = routing.ids.contiguous()?;
        lock(&self.load).add(layer as u32, &ids, self.n_experts)?;
        let weights = routing.weights.contiguous()?;
        // The rows and the routing into every planned slot first (nothing is sent if that
        // fails), then each worker's `ready` word (fenced after them) and its message.
        let inputs = planned
            .iter()
            .filter_map(|p| {
                let d = p.slot.session.device.as_ref()?;
                Some((&p.slot.slot().input, d.layout))
            })
            .collect::<Vec<_>>();
        write_inputs(&inputs, &x, &ids, &weights)?;
        let mut waits: Vec<(SlotGuard, u32)> = Vec::with_capacity(planned.len());
        let mut failure = None;
        for p in planned {
            let Some(d) = p.slot.session.device.as_ref() else {
                continue;
            };
            let index = p.slot.index;
            let seq = d.next_seq(index);
            let queued = d.worker_flags.signal(flags::ready(index), seq);
            if let Err(e) = queued {
                failure = Some(e);
                break;
            }
            p.permit.send(device_call(
                p.client.next_call_id(),
                layer,
                (p.slot.session.id, index),
                t,
                x.dtype(),
                seq,
                p.experts,
            ));
            self.watch.track(
                &device,
                Sent {
                    client: p.client,
                    conn: p.conn,
                    session: p.slot.session.clone(),
                    slot: index,
                    seq,
                },
            );
            waits.push((p.slot, seq));
        }
        let sum_device = device.clone();
        let wait_all =
            move |waits: Vec<(SlotGuard, u32)>| -> moemesh_engine::Result<Option<Tensor>> {
                let mut done = Vec::with_capacity(waits.len());
                for (slot, seq) in &waits {
                    let Some(d) = slot.session.device.as_ref() else {
                        continue;
                    };
                    // The gate's stream waits for the worker's `done` word (or the session's
                    // release), then reads the output; the slot is free for the next call once
                    // that read is queued.
                    if d.spin {
                        let g = moemesh_engine::cuda::gpu(&sum_device).ok_or_else(|| {
                            EngineError::Internal("device-ordered calls without GPU kernels".into())
                        })?;
                        let word = d.gate_flags.word_address(flags::done(slot.index))?;
                        let release = d.release.address();
                        g.wait_value(FlagWait { word, release }, *seq)?;
                    } else {
                        d.gate_flags.wait_geq(flags::done(slot.index), *seq)?;
                    }
                    done.push(&slot.slot().output);
                }
                if done.is_empty() {
                    return Ok(None);
                }
                sum_outputs(&done, t, h, &sum_device).map(Some)
            };
        if let Some(e) = failure {
            // Calls already sent are waited for, so that their slots are not reused under them.
            let _ = wait_all(waits);
            return Err(e);
        }
        Ok(Some(PendingExperts::deferred(move || {
            match wait_all(waits)? {
                Some(sum) => Ok(sum),
                None => Ok(Tensor::zeros((t, h), DType::F32, &device)?),
            }
        })))
    }

    fn graph_begin(
        &self,
        layers: &[usize],
        rows: usize,
        dtype: DType,
    ) -> moemesh_engine::Result<Option<u64>> {
        use std::hash::{Hash, Hasher};
        if self.graphs == ExpertGraphs::Off || self.n_experts == 0 || layers.is_empty() {
            return Ok(None);
        }
        let Some(device) = self.graph_device() else {
            return Ok(None);
        };
        let routes = self.pool.pinned_routes();
        if let Some(hit) = self.reuse_plan(routes.as_ref(), layers, rows, dtype) {
            let (key, calls, slots) = hit;
            self.install_plan(key, calls, slots, rows, dtype, &device)?;
            return Ok(Some(key));
        }
        // `pick` opens replicas' streams in the background on the runtime.
        let _runtime = self.handle.enter();
        let none = Excluded::default();
        // Per worker (serial): its stream, every slot of its session.
        let mut held: BTreeMap<u64, HeldWorker> = BTreeMap::new();
        let mut plan_layers: HashMap<usize, Vec<GraphCall>> = HashMap::new();
        let mut order = Vec::new();
        let mut key = std::collections::hash_map::DefaultHasher::new();
        format!("{dtype:?}").hash(&mut key);
        for (i, &layer) in layers.iter().enumerate() {
            // Each expert to one holder; replicas take turns by layer (the eager path rotates
            // them by call).
            let Some(groups) = group_experts(
                self.n_experts as u32,
                |e| {
                    self.pool
                        .pick(layer as u32, e, &none, i as u64, Placement::Step)
                        .ok()
                },
                |c| c.serial,
            ) else {
                return Ok(None);
            };
            let mut calls = Vec::with_capacity(groups.len());
            for (client, experts) in groups {
                let serial = client.serial;
                let (_, conn, slots) = match held.entry(serial) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        if !self.graph_allowed(&client) {
                            return Ok(None);
                        }
                        let Some((conn, taken)) = client.device_slots_all(rows) else {
                            return Ok(None);
                        };
                        v.insert((client.clone(), conn, taken))
                    }
                };
                let Some(first) = slots.first() else {
                    return Ok(None);
                };
                let session = first.session.clone();
                if session.dtype != dtype || session.device.is_none() {
                    return Ok(None);
                }
                let slot = i % slots.len();
                (layer, serial, session.nonce, slot, &experts).hash(&mut key);
                order.push((layer, calls.len()));
                calls.push(GraphCall {
                    client,
                    conn: conn.clone(),
                    session,
                    slot,
                    experts,
                    entry: order.len() - 1,
                });
            }
            plan_layers.insert(layer, calls);
        }
        let key = key.finish();
        let calls = Arc::new(PlanCalls {
            layers: plan_layers,
            order,
        });
        let mut workers = Vec::with_capacity(held.len());
        let mut slots = Vec::new();
        for (client, conn, s) in held.into_values() {
            workers.push((client, conn));
            slots.extend(s);
        }
        *lock(&self.graph_cache) = routes.map(|routes| CachedPlan {
            routes,
            layers: layers.to_vec(),
            dtype,
            key,
            calls: calls.clone(),
            workers,
            uses: 0,
        });
        self.install_plan(key, calls, slots, rows, dtype, &device)?;
        Ok(Some(key))
    }

    fn graph_send(&self) -> moemesh_engine::Result<bool> {
        let Some(plan) = lock(&self.graph).clone() else {
            return Ok(false);
        };
        let calls: Vec<&GraphCall> = plan
            .calls
            .order
            .iter()
            .filter_map(|(layer, j)| plan.calls.layers.get(layer)?.get(*j))
            .collect();
        if calls.len() != plan.calls.order.len() {
            return Ok(false);
        }
        // Room for every message first: a run is sent whole or not at all.
        let mut permits = Vec::with_capacity(calls.len());
        for c in &calls {
            if c.session.is_broken() {
                return Ok(false);
            }
            match c.conn.tx.clone().try_reserve_owned() {
                Ok(p) => permits.push(p),
                Err(_) => return Ok(false),
            }
        }
        let mut seqs = Vec::with_capacity(calls.len());
        let mut newest: HashMap<(u64, usize), (Arc<IpcSession>, u32)> = HashMap::new();
        for c in &calls {
            let Some(d) = c.session.device.as_ref() else {
                return Ok(false);
            };
            let seq = d.next_seq(c.slot);
            seqs.push(seq);
            newest.insert((c.session.nonce, c.slot), (c.session.clone(), seq));
        }
        let device = plan.table.device().clone();
        let n = seqs.len();
        plan.table
            .slice_set(&Tensor::from_vec(seqs.clone(), n, &device)?, 0, 0)?;
        for ((c, permit), seq) in calls.iter().zip(permits).zip(seqs) {
            permit.send(device_call(
                c.client.next_call_id(),
                plan.calls.order[c.entry].0,
                (c.session.id, c.slot),
                plan.rows,
                plan.dtype,
                seq,
                c.experts.clone(),
            ));
            self.watch.track(
                &device,
                Sent {
                    client: c.client.clone(),
                    conn: c.conn.clone(),
                    session: c.session.clone(),
                    slot: c.slot,
                    seq,
                },
            );
        }
        *lock(&plan.sent) = newest
            .into_iter()
            .map(|((_, slot), (session, seq))| (session, slot, seq))
            .collect();
        Ok(true)
    }

    fn graph_end(&self, ran: bool) {
        let Some(plan) = lock(&self.graph).take() else {
            return;
        };
        let sent = std::mem::take(&mut *lock(&plan.sent));
        if ran || sent.is_empty() {
            return;
        }
        // The run stopped part way: the workers wait for flags it never queued. Once this GPU's
        // queued work is done (bounded: the watch releases waits on a dead worker), each slot's
        // `ready` word gets the newest number sent on it, which lets the worker's remaining
        // waits on it through (those calls compute on stale rows and are never read).
        if let Err(e) = ipc::fence(plan.table.device()).and_then(|f| f.wait()) {
            tracing::warn!(error = %e, "waiting for an unfinished graph run's work");
        }
        for (session, slot, seq) in sent {
            if let Some(d) = &session.device
                && let Err(e) = d.worker_flags.fill_words_now(flags::ready(slot), 1, seq)
            {
                tracing::warn!(session = session.id, slot, error = %e, "could not release a worker's waits after an unfinished graph run");
            }
        }
        // Those calls were released on purpose: the step (run again the ordinary way) must not
        // check them, or their workers would be taken for failed ones.
        *lock(&self.watch.step) = None;
    }

    fn settle_mark(&self) {
        let mut step = lock(&self.watch.step);
        if let Some(f) = step.as_mut() {
            match ipc::fence(&f.device) {
                Ok(end) => f.end = Some((end, f.sent.len())),
                // `settle` then waits for everything queued by then.
                Err(e) => {
                    tracing::debug!(error = %e, "could not mark the end of a step's device work")
                }
            }
        }
    }

    fn settle(&self) -> moemesh_engine::Result<()> {
        let Some((device, end)) = lock(&self.watch.step).as_mut().map(|f| {
            let end = f.end.take().filter(|(_, n)| *n == f.sent.len());
            (f.device.clone(), end)
        }) else {
            return Ok(());
        };
        // Bounded: past the deadline the watch releases every wait of the step.
        let waited = match end {
            Some((end, _)) => end.wait(),
            None => ipc::fence(&device).and_then(|f| f.wait()),
        };
        let Some(step) = lock(&self.watch.step).take() else {
            return waited;
        };
        waited?;
        match verify_calls(&step.sent) {
            Ok(()) => lock(&self.load).step_done(&self.routed),
            Err((client, conn, why)) => {
                self.watch.failed.store(true, Ordering::SeqCst);
                if !step.failed.contains(&client.serial) {
                    client.mark_failed();
                    conn.fail(MeshError::Unavailable(why.clone()).into());
                }
                tracing::warn!(worker = %client.member.id, reason = %why, "a device-ordered expert call was not computed; the step runs again");
                Err(EngineError::ExpertsUnavailable(format!(
                    "expert worker {}: {why}",
                    client.member.id
                )))
            }
        }
    }

    fn dispatch(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
    ) -> moemesh_engine::Result<PendingExperts> {
        if lock(&self.graph).is_some() {
            // A graph step's calls for this layer are sent already and wait for its flags: the
            // run fails, its calls are released and the step runs the ordinary way.
            return Err(EngineError::Internal(format!(
                "layer {layer}: the host path in a decode graph's step"
            )));
        }
        let device = x.device().clone();
        let (t, h) = x.dims2()?;
        let mut pairs = Vec::with_capacity(routing.expert_ids.len());
        for t in 0..routing.num_tokens() {
            for (e, w) in routing.token(t) {
                pairs.push((t as u32, e, w));
            }
        }
        // The load per (layer, expert), counted once per routed pair (not again on retries).
        let mut per_expert: BTreeMap<u32, u64> = BTreeMap::new();
        for &(_, e, _) in &pairs {
            *per_expert.entry(e).or_default() += 1;
        }
        self.routed.add(layer as u32, per_expert);
        let x_dev = if device.is_cuda() {
            Some(x.contiguous()?)
        } else {
            None
        };
        // The first round is planned here, on the engine thread, before the engine queues the
        // shared experts: the CUDA IPC input copies are queued and waited for (the gate's side of
        // the handshake), and the gRPC workers' rows copied to the host, without waiting for the
        // shared experts' kernels; those then run while the workers compute.
        let round = self.pool.next_round();
        // `pick` opens replicas' streams in the background on the runtime (`WorkerClient::warm`),
        // which it finds through the current context: enter it on this (engine) thread.
        let _runtime = self.handle.enter();
        let first = plan_round(
            &self.pool,
            layer as u32,
            &pairs,
            &Excluded::default(),
            round,
            Placement::Step,
            x_dev.as_ref(),
            t,
            max_rows(h),
        )
        .map_err(into_engine)?
        .ok();
        if let Some(fence) = first.as_ref().and_then(|p| p.fence.as_ref()) {
            fence.wait()?;
        }
        let needs_host = first
            .as_ref()
            .is_none_or(|p| p.plans.iter().any(|c| matches!(c, Plan::Wire(..))));
        let x_host = if needs_host {
            Some(x.to_device(&Device::Cpu)?)
        } else {
            None
        };
        let job = execute(
            Dispatch {
                pool: self.pool.clone(),
                layer: layer as u32,
                x: x.clone(),
                x_dev,
                x_host,
                round,
                wire: self.wire,
                timeout: self.timeout,
                // The step's span (on the engine thread), under which each call's span goes.
                step: Span::current(),
            },
            first,
            pairs,
        );
        let task = self.handle.spawn(job);
        let handle = self.handle.clone();
        Ok(PendingExperts::deferred(move || {
            let out = handle.block_on(task).map_err(|e| {
                EngineError::ExpertsUnavailable(format!("expert dispatch task: {e}"))
            })?;
            // The f32 sum goes back as it is: the model rounds it once where it adds it (on a
            // GPU it stays f32 into the residual, as the in-process experts' sum does).
            Ok(out.map_err(into_engine)?.to_device(&device)?)
        }))
    }
}

fn into_engine(e: MeshError) -> EngineError {
    match e {
        MeshError::Engine(inner) => inner,
        other => EngineError::ExpertsUnavailable(other.to_string()),
    }
}

/// Most distinct tokens in one gRPC call for hidden size `h` (see [`MAX_CALL_BYTES`]).
fn max_rows(h: usize) -> usize {
    (MAX_CALL_BYTES / (h * 4).max(1)).max(1)
}

/// One call of a dispatch round, on its transport.
enum Plan {
    /// Rows in the message (gRPC): the worker's pairs, split to bound the message size.
    Wire(Arc<WorkerClient>, Vec<Pair>),
    /// Rows in a CUDA IPC slot, already written: all of the worker's pairs in one call.
    Shared(Arc<WorkerClient>, Vec<Pair>, Arc<Conn>, SlotGuard),
}

/// A round's calls, and what must pass before they are sent.
struct Planned {
    plans: Vec<Plan>,
    /// Passed once the CUDA IPC input copies queued with the plan have run.
    fence: Option<ipc::Fence>,
}

/// Groups `pairs` by the worker picked for each (under `placement`; the i-th pair of an expert
/// at `round + i`, which splits a replicated expert's tokens over its replicas) and plans each
/// worker's calls: a CUDA IPC slot (its input copy queued now) where the worker's stream has a
/// free one, gRPC otherwise. `Ok(Err(_))` when some pair has no live replica now.
#[allow(clippy::too_many_arguments)]
fn plan_round(
    pool: &WorkerPool,
    layer: u32,
    pairs: &[Pair],
    excluded: &Excluded,
    round: u64,
    placement: Placement,
    x_dev: Option<&Tensor>,
    t: usize,
    max_rows: usize,
) -> MeshResult<MeshResult<Planned>> {
    // Worker id -> (client, its pairs).
    let mut groups: Groups = BTreeMap::new();
    // Pairs of each expert so far.
    let mut nth: HashMap<u32, u64> = HashMap::new();
    for &(tok, e, w) in pairs {
        let i = nth.entry(e).or_default();
        let turn = round.wrapping_add(*i);
        *i += 1;
        match pool.pick(layer, e, excluded, turn, placement) {
            Ok(client) => groups
                .entry(client.member.id.clone())
                .or_insert_with(|| (client, Vec::new()))
                .1
                .push((tok, e, w)),
            Err(err) => return Ok(Err(err)),
        }
    }
    let mut plans = Vec::new();
    let mut wrote = false;
    for (client, group) in groups.into_values() {
        let slot = x_dev.and_then(|xd| {
            let (conn, slot) = client.ipc_slot(t)?;
            (slot.session.dtype == xd.dtype()).then_some((conn, slot, xd))
        });
        match slot {
            Some((conn, slot, xd)) => {
                slot.slot().input.write(xd)?;
                wrote = true;
                plans.push(Plan::Shared(client, group, conn, slot));
            }
            None => plans.extend(
                split_rows(group, max_rows)
                    .into_iter()
                    .map(|chunk| Plan::Wire(client.clone(), chunk)),
            ),
        }
    }
    let fence = match x_dev {
        Some(xd) if wrote => Some(ipc::fence(xd.device())?),
        _ => None,
    };
    Ok(Ok(Planned { plans, fence }))
}

/// A worker's answer: rows of the step (gRPC) or every row of it on the device (CUDA IPC), or a
/// refusal naming the experts of the call it does not hold (any more).
enum Partial {
    Host(Vec<u32>, Tensor),
    Device(Tensor),
    Refused(Vec<u32>),
}

/// What one layer's dispatch works with.
struct Dispatch {
    pool: Arc<WorkerPool>,
    layer: u32,
    /// The activations `[T, hidden]` where the engine computed them.
    x: Tensor,
    /// `x` contiguous on the GPU (for CUDA IPC); `None` on the CPU.
    x_dev: Option<Tensor>,
    /// `x` on the host, once some call takes gRPC.
    x_host: Option<Tensor>,
    /// The replica rotation's round.
    round: u64,
    wire: v1::DType,
    timeout: Duration,
    step: Span,
}

/// Sends every (token, expert, weight) pair to some worker, retrying failed workers' pairs on
/// other replicas; returns the routed output `[T, hidden]` in f32 on `x`'s device. `first` is
/// the first round's plan when the engine thread made it.
async fn execute(
    d: Dispatch,
    mut first: Option<Planned>,
    mut pairs: Vec<Pair>,
) -> MeshResult<Tensor> {
    let Dispatch {
        pool,
        layer,
        x,
        x_dev,
        mut x_host,
        round,
        wire,
        timeout,
        step,
    } = d;
    let (t, h) = x.dims2().map_err(EngineError::from)?;
    let device = x.device().clone();
    // gRPC partial sums add up on the host, CUDA IPC ones on the device; the two meet at the end.
    let mut host_out: Option<Tensor> = None;
    let mut dev_out: Option<Tensor> = None;
    // Workers that failed this dispatch, and experts that workers refused.
    let mut excluded = Excluded::default();
    let mut changes = pool.changes();
    // How long pairs with no live replica wait for the registry to show one (a worker
    // restarting, or every lease expiring at once after an etcd outage and coming back).
    let wait_until = tokio::time::Instant::now() + timeout;
    let mut attempt = 0;
    while attempt < MAX_ATTEMPTS {
        // Changes from here on wake the wait below.
        changes.borrow_and_update();
        let planned = match first.take() {
            Some(p) => p,
            // Retries (and a first round the engine thread could not plan) route by the newest
            // placement: the one a refusing worker has announced.
            None => match plan_round(
                &pool,
                layer,
                &pairs,
                &excluded,
                round,
                Placement::Newest,
                x_dev.as_ref(),
                t,
                max_rows(h),
            )? {
                Ok(p) => {
                    if let Some(fence) = &p.fence {
                        // A retry: short, and rare enough to block for here.
                        fence.wait()?;
                    }
                    p
                }
                Err(err) => match tokio::time::timeout_at(wait_until, changes.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => return Err(err),
                },
            },
        };
        let plans = planned.plans;
        if x_host.is_none() && plans.iter().any(|p| matches!(p, Plan::Wire(..))) {
            x_host = Some(x.to_device(&Device::Cpu).map_err(EngineError::from)?);
        }
        let calls = plans.into_iter().map(|plan| {
            let x_host = &x_host;
            let step = &step;
            async move {
                let (client, group, shared) = match plan {
                    Plan::Wire(client, group) => (client, group, None),
                    Plan::Shared(client, group, conn, slot) => (client, group, Some((conn, slot))),
                };
                let (rows, mut req) = match (&shared, x_host) {
                    (Some((_, slot)), _) => build_shared_request(layer, &group, slot, t),
                    (None, Some(xh)) => build_request(layer, xh, &group, wire)?,
                    (None, None) => {
                        return Err(MeshError::Internal(
                            "activations were not copied to the host for a gRPC call".into(),
                        ));
                    }
                };
                let span = if step.is_none() {
                    Span::none()
                } else {
                    tracing::debug_span!(
                        parent: step,
                        "expert_dispatch",
                        otel.kind = "client",
                        layer,
                        worker = %client.member.id,
                        tokens = rows.len(),
                        pairs = group.len(),
                        attempt,
                        otel.status_code = tracing::field::Empty,
                    )
                };
                req.traceparent = telemetry::traceparent(&span);
                let sent = std::time::Instant::now();
                let reply = async {
                    match &shared {
                        Some((conn, _)) => client.call_on(conn, req, timeout).await,
                        None => client.call(req, timeout).await,
                    }
                }
                .instrument(span.clone())
                .await;
                if reply.is_err() {
                    span.record("otel.status_code", "ERROR");
                }
                metrics::histogram!(names::DISPATCH, "worker" => client.member.id.clone())
                    .record(sent.elapsed().as_secs_f64());
                let partial = reply.and_then(|r| match &shared {
                    _ if !r.not_held.is_empty() => Ok(Partial::Refused(r.not_held)),
                    // Copied out (queued on the gate's stream) before the slot is freed.
                    Some((_, slot)) if r.shared_output => Ok(Partial::Device(
                        slot.slot().output.read(DType::F32, &[t, h])?,
                    )),
                    Some(_) => Err(MeshError::Internal(
                        "a CUDA IPC call was answered without its shared output".into(),
                    )),
                    None => {
                        let o = r
                            .output
                            .ok_or_else(|| MeshError::Internal("reply without output".into()))?;
                        Ok(Partial::Host(
                            rows,
                            codec::decode(&o, "output", &Device::Cpu)?,
                        ))
                    }
                });
                drop(shared);
                Ok::<_, MeshError>((client, group, partial))
            }
        });
        let mut failed = Vec::new();
        for result in join_all(calls).await {
            let (client, group, partial) = result?;
            if matches!(partial, Ok(Partial::Host(..) | Partial::Device(_))) {
                client.count_pairs(layer, group.len() as u64);
            }
            match partial {
                Ok(Partial::Refused(experts)) => {
                    // Not a failure: the worker gave these experts up (its new list is in the
                    // registry, or about to be); nothing was computed, so every pair of the call
                    // goes again, those experts to their other holders.
                    tracing::debug!(worker = %client.member.id, layer, ?experts, "expert call refused: experts given up; re-sending");
                    metrics::counter!(names::GATE_EXPERT_REFUSALS, "worker" => client.member.id.clone())
                        .increment(1);
                    excluded
                        .refused
                        .extend(experts.into_iter().map(|e| (client.serial, e)));
                    failed.extend(group);
                }
                Ok(Partial::Device(partial)) => {
                    dev_out = Some(match dev_out.take() {
                        None => partial,
                        Some(o) => (o + partial).map_err(EngineError::from)?,
                    });
                }
                Ok(Partial::Host(rows, partial)) => {
                    let idx = Tensor::from_vec(
                        rows,
                        partial.dim(0).map_err(EngineError::from)?,
                        &Device::Cpu,
                    )
                    .map_err(EngineError::from)?;
                    // Workers send their f32 accumulators (older ones the request's dtype):
                    // the partial sums add up in f32 and round to the compute dtype once.
                    let partial = partial.to_dtype(DType::F32).map_err(EngineError::from)?;
                    let out = match host_out.take() {
                        Some(o) => o,
                        None => Tensor::zeros((t, h), DType::F32, &Device::Cpu)
                            .map_err(EngineError::from)?,
                    };
                    host_out = Some(
                        out.index_add(&idx, &partial, 0)
                            .map_err(EngineError::from)?,
                    );
                }
                Err(e @ MeshError::Internal(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(worker = %client.member.id, layer, attempt, error = %e, "expert call failed; retrying on another replica");
                    metrics::counter!(names::RETRIES, "worker" => client.member.id.clone())
                        .increment(1);
                    client.mark_failed();
                    excluded.workers.insert(client.serial);
                    failed.extend(group);
                }
            }
        }
        if failed.is_empty() {
            let host_out = match host_out {
                Some(o) => Some(o.to_device(&device).map_err(EngineError::from)?),
                None => None,
            };
            let out = match (host_out, dev_out) {
                (Some(a), Some(b)) => (a + b).map_err(EngineError::from)?,
                (Some(o), None) | (None, Some(o)) => o,
                (None, None) => {
                    Tensor::zeros((t, h), DType::F32, &device).map_err(EngineError::from)?
                }
            };
            return Ok(out);
        }
        pairs = failed;
        attempt += 1;
    }
    Err(MeshError::Unavailable(format!(
        "layer {layer}: expert calls still failing after {MAX_ATTEMPTS} attempts"
    )))
}

/// Splits a worker's pairs into runs of at most `max_rows` distinct tokens, each run one request.
/// Consecutive pairs of one token stay in one run. (After a retry a token's pairs may come in two
/// places; then two requests carry its row, and their partial sums add up the same.)
fn split_rows(group: Vec<Pair>, max_rows: usize) -> Vec<Vec<Pair>> {
    let mut chunks: Vec<Vec<Pair>> = Vec::new();
    let mut rows = 0;
    let mut last = None;
    for pair in group {
        if last != Some(pair.0) {
            if rows == max_rows || chunks.is_empty() {
                chunks.push(Vec::new());
                rows = 0;
            }
            rows += 1;
            last = Some(pair.0);
        }
        if let Some(chunk) = chunks.last_mut() {
            chunk.push(pair);
        }
    }
    chunks
}

/// One worker's request: its distinct tokens (each once) and their pairs. Returns the token rows
/// in request order, for adding the reply back.
fn build_request(
    layer: u32,
    x: &Tensor,
    group: &[(u32, u32, f32)],
    wire: v1::DType,
) -> MeshResult<(Vec<u32>, ForwardRequest)> {
    let by_token = by_token(group);
    let rows: Vec<u32> = by_token.keys().copied().collect();
    let idx =
        Tensor::from_vec(rows.clone(), rows.len(), &Device::Cpu).map_err(EngineError::from)?;
    let hidden = x.index_select(&idx, 0).map_err(EngineError::from)?;
    let mut req = ForwardRequest {
        call_id: 0,
        layer,
        hidden: Some(codec::encode(&hidden, wire)?),
        pairs_per_token: Vec::with_capacity(rows.len()),
        expert_ids: Vec::with_capacity(group.len()),
        weights: Vec::with_capacity(group.len()),
        traceparent: String::new(),
        shared: None,
    };
    push_pairs(&mut req, &by_token);
    Ok((rows, req))
}

/// A worker's request on its CUDA IPC slot: its distinct tokens (each once, with its row in the
/// slot's `[t, hidden]` input) and their pairs. Returns the token rows, as [`build_request`].
fn build_shared_request(
    layer: u32,
    group: &[Pair],
    slot: &SlotGuard,
    t: usize,
) -> (Vec<u32>, ForwardRequest) {
    let by_token = by_token(group);
    let rows: Vec<u32> = by_token.keys().copied().collect();
    let mut req = ForwardRequest {
        call_id: 0,
        layer,
        hidden: None,
        pairs_per_token: Vec::with_capacity(rows.len()),
        expert_ids: Vec::with_capacity(group.len()),
        weights: Vec::with_capacity(group.len()),
        traceparent: String::new(),
        shared: Some(SharedActivations {
            session: slot.session.id,
            slot: slot.index as u32,
            rows: t as u32,
            dtype: codec::wire_dtype_for(slot.session.dtype) as i32,
            token_rows: rows.clone(),
            device_seq: 0,
            experts: Vec::new(),
        }),
    };
    push_pairs(&mut req, &by_token);
    (rows, req)
}

fn by_token(group: &[Pair]) -> BTreeMap<u32, Vec<(u32, f32)>> {
    let mut by_token: BTreeMap<u32, Vec<(u32, f32)>> = BTreeMap::new();
    for &(tok, e, w) in group {
        by_token.entry(tok).or_default().push((e, w));
    }
    by_token
}

fn push_pairs(req: &mut ForwardRequest, by_token: &BTreeMap<u32, Vec<(u32, f32)>>) {
    for pairs in by_token.values() {
        req.pairs_per_token.push(pairs.len() as u32);
        for &(e, w) in pairs {
            req.expert_ids.push(e);
            req.weights.push(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_load_counts_every_routed_pair_per_layer_and_expert() {
        let dev = Device::Cpu;
        let mut load = DeviceLoad::default();
        // Layer 1: two tokens, top-2; layer 2: one token. Then layer 1 again. (On the CPU the
        // counts take candle's index_add; a GPU takes the `expert_count` kernel instead, which
        // no test runs.)
        let ids = |v: Vec<u32>, rows: usize| Tensor::from_vec(v, (rows, 2), &dev).expect("ids");
        load.add(1, &ids(vec![0, 3, 3, 1], 2), 4).expect("add");
        load.add(2, &ids(vec![2, 2], 1), 4).expect("add");
        load.add(1, &ids(vec![3, 0], 1), 4).expect("add");
        let counts = |load: &DeviceLoad, l: u32| load.counts[&l].to_vec1::<u32>().expect("counts");
        assert_eq!(counts(&load, 1), vec![2, 1, 0, 3]);
        assert_eq!(counts(&load, 2), vec![0, 0, 2, 0]);
        // Read (and zeroed) only on the flush step.
        let routed = ExpertLoad::new(4, Duration::from_secs(60));
        for _ in 1..LOAD_FLUSH_STEPS {
            load.step_done(&routed).expect("step");
        }
        assert_eq!(load.counts.len(), 2);
        assert!(routed.totals().is_empty());
        load.step_done(&routed).expect("flush");
        // The buffers stay (a decode graph holds their addresses), zeroed.
        assert_eq!(counts(&load, 1), vec![0; 4]);
        assert_eq!(counts(&load, 2), vec![0; 4]);
        let expect = BTreeMap::from([(1, vec![2, 1, 0, 3]), (2, vec![0, 0, 2, 0])]);
        assert_eq!(routed.totals(), expect);
        assert_eq!(routed.windowed(), expect);
        // The next window adds from zero; an all-zero layer adds nothing to the totals.
        load.add(2, &ids(vec![1, 1], 1), 4).expect("add");
        for _ in 0..LOAD_FLUSH_STEPS {
            load.step_done(&routed).expect("step");
        }
        let expect = BTreeMap::from([(1, vec![2, 1, 0, 3]), (2, vec![0, 2, 2, 0])]);
        assert_eq!(routed.totals(), expect);
    }

    #[test]
    fn experts_group_by_worker_in_serial_order_each_once() {
        // Workers by serial: 7 holds the even experts, 3 the odd ones, 5 expert 4 (a replica
        // rotation's choice); every expert lands in exactly one group, ascending.
        let holder = |e: u32| match e {
            4 => 5u64,
            e if e % 2 == 0 => 7,
            _ => 3,
        };
        let groups = group_experts(8, |e| Some(holder(e)), |w| *w).expect("all picked");
        assert_eq!(
            groups,
            vec![(3, vec![1, 3, 5, 7]), (5, vec![4]), (7, vec![0, 2, 6])]
        );
        // One expert without a holder: no plan (the layer takes another path).
        assert!(group_experts(8, |e| (e != 6).then(|| holder(e)), |w| *w).is_none());
        // No experts: no calls.
        assert_eq!(group_experts(0, |e| Some(holder(e)), |w| *w), Some(vec![]));
    }

    /// A device-ordered layer's calls follow that layer's placement: with holdings that differ
    /// per layer, the same pool groups the experts differently in each layer (what
    /// `plan_device` and `graph_begin` send as each call's explicit expert list, and what the
    /// worker's per-layer slot table is built from).
    #[test]
    fn device_groups_follow_each_layers_placement() {
        use moemesh_common::placement::Holdings;
        use moemesh_common::registry::{Member, Role};
        let member = |id: &str, h: Holdings| {
            let mut m = Member {
                id: id.into(),
                role: Role::Expert,
                address: "127.0.0.1:9".into(),
                layers: Vec::new(),
                experts: Vec::new(),
                layer_experts: Vec::new(),
                device: "cpu".into(),
                fingerprint: "fp".into(),
                version: String::new(),
            };
            m.set_holdings(&h);
            m
        };
        let pool = WorkerPool::new("fp".into(), None, Duration::from_millis(200));
        pool.update(&[
            member("a", Holdings::from([(1, vec![0, 1]), (2, vec![1, 2, 3])])),
            member("b", Holdings::from([(1, vec![2, 3]), (2, vec![0])])),
        ]);
        let none = Excluded::default();
        let groups = |layer: u32| {
            group_experts(
                4,
                |e| pool.pick(layer, e, &none, 0, Placement::Step).ok(),
                |c| c.serial,
            )
            .expect("every expert held")
            .into_iter()
            .map(|(c, experts)| (c.member.id.clone(), experts))
            .collect::<Vec<_>>()
        };
        assert_eq!(
            groups(1),
            [("a".to_string(), vec![0, 1]), ("b".to_string(), vec![2, 3])]
        );
        assert_eq!(
            groups(2),
            [("a".to_string(), vec![1, 2, 3]), ("b".to_string(), vec![0])]
        );
    }

    #[test]
    fn for_stream_waits_the_watch_blames_the_first_call_not_marked_done_in_the_order_sent() {
        // Session 1 (slots 0 and 1) and session 2 (slot 0); calls in the order sent.
        let calls = vec![(1, 0, 5), (2, 0, 9), (1, 1, 3), (2, 0, 10), (1, 0, 6)];
        let done = |a: Vec<u32>, b: Vec<u32>| HashMap::from([(1, Some(a)), (2, Some(b))]);
        // Session 2 has done 9 but not 10; session 1 is stuck at 5 on slot 0 → call 0.
        assert_eq!(
            first_unfinished(&calls, &done(vec![4, 3], vec![9])),
            Some(0)
        );
        // Session 1 slot 0 done through 5, slot 1 through 3; session 2 stuck before 10.
        assert_eq!(
            first_unfinished(&calls, &done(vec![5, 3], vec![9])),
            Some(3)
        );
        // Everything done: the gate itself is slow, nobody is blamed.
        assert_eq!(first_unfinished(&calls, &done(vec![6, 3], vec![10])), None);
        // A released word (far past) counts as done; numbers compare cyclically across the wrap.
        assert_eq!(
            first_unfinished(&[(1, 0, u32::MAX), (1, 0, 1)], &done(vec![0], vec![])),
            Some(1),
            "u32::MAX is done at 0, 1 is not"
        );
        assert_eq!(
            first_unfinished(&calls, &done(vec![6 + flags::RELEASE_STRIDE, 3], vec![10])),
            None
        );
        // Flags that cannot be read blame their session.
        let unreadable = HashMap::from([(1, Some(vec![6, 3])), (2, None)]);
        assert_eq!(first_unfinished(&calls, &unreadable), Some(1));
    }

    #[test]
    fn the_watch_blames_the_call_whose_release_flag_the_spinning_wait_names() {
        let releases = [Some(0x100), None, Some(0x104), Some(0x100)];
        // The first call of the named session (its later calls wait behind it anyway).
        assert_eq!(holding(&releases, Some(0x100)), Some(0));
        assert_eq!(holding(&releases, Some(0x104)), Some(2));
        // No wait spinning: the gate itself is slow, nobody is blamed.
        assert_eq!(holding(&releases, None), None);
        // A wait of a session this step did not call (a step before it): nobody.
        assert_eq!(holding(&releases, Some(0x108)), None);
        assert_eq!(holding(&[], Some(0x100)), None);
    }

    #[test]
    fn split_rows_keeps_a_tokens_pairs_together_and_every_pair_once() {
        // Tokens 0..5 with 1, 2, 1, 3, 2 pairs.
        let group: Vec<Pair> = [(0, 1), (1, 2), (2, 1), (3, 3), (4, 2)]
            .iter()
            .flat_map(|&(tok, n)| (0..n).map(move |e| (tok, e, 0.5)))
            .collect();
        for max_rows in 1..=6 {
            let chunks = split_rows(group.clone(), max_rows);
            assert_eq!(
                chunks.len(),
                5usize.div_ceil(max_rows),
                "max_rows {max_rows}"
            );
            for c in &chunks {
                let mut toks: Vec<u32> = c.iter().map(|p| p.0).collect();
                toks.dedup();
                assert!(!toks.is_empty() && toks.len() <= max_rows, "{c:?}");
            }
            // Order and content kept, so no token is split across two requests.
            assert_eq!(chunks.concat(), group, "max_rows {max_rows}");
        }
        assert!(split_rows(Vec::new(), 4).is_empty());
    }
}
