//! One gate's step loop: a [`Batch`] from the serving core plans each step (decodes first, then
//! prompt chunks, then newly admitted sequences, within the token budget); this module sends it
//! to the gate over the step stream and settles each outcome: tokens go through each
//! sequence's decoder to its client, a full KV pool replans, a failed step fails its sequences,
//! a lost gate moves every sequence to another. Every sequence leaves the link through one
//! [`StepLoop::retire`], which settles its load count and its stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moemesh_common::metrics::names;
use moemesh_common::{MeshError, MeshResult, codec, telemetry};
use moemesh_engine::generate::FinishReason;
use moemesh_engine::prefix_cache::{BlockHash, PrefixIndex};
use moemesh_engine::serving::{
    Batch, KvState, Limits, SeqOutput, Sequence, SequenceDecoder, Step, Token,
};
use moemesh_engine::text::TextTokenizer;
use moemesh_engine::{DeepSeekModel, GenerationRequest};
use moemesh_proto::v1::gate_client::GateClient;
use moemesh_proto::v1::{self, GenerateResponse, SeqSampling, SeqStep, StepRequest, StepResponse};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Span;

/// What every gate link shares: the embedding table, tokenizer and model limits.
pub struct Ctx {
    /// Step budget and running-sequence cap.
    pub limits: Limits,
    pub model: DeepSeekModel,
    pub tokenizer: Option<TextTokenizer>,
    pub eos: Arc<[u32]>,
    pub context_length: usize,
    pub next_seq: AtomicU64,
    /// The TLS files for the hop to the gates; `None` with --plaintext.
    pub tls: Option<Arc<moemesh_common::tls::Tls>>,
    /// The step budget for a gate whose Info reports a GPU (`limits.token_budget` is the
    /// CPU gates'; the two are equal when --step-token-budget is given).
    pub gpu_token_budget: usize,
    /// `--step-timeout`: a step's whole round trip, after which the gate is taken for hung.
    pub step_timeout: Duration,
    /// `--gate-connect-timeout-ms`: opening the step stream.
    pub connect_timeout: Duration,
    /// `--decode-run-steps`: the most decode steps one request to a gate may run (1: a request
    /// a step).
    pub run_steps: u32,
}

pub type ClientTx = mpsc::UnboundedSender<Result<GenerateResponse, Status>>;

/// A request accepted by the service, on its way to a gate.
pub struct NewSeq {
    pub req: GenerationRequest,
    /// The prefix cache's salt (`request::cache_salt`).
    pub cache_salt: Option<[u8; 32]>,
    /// The names of the prompt's full KV blocks (`request::prefix_chain`), looked up in and
    /// added to the gate's [`PrefixIndex`].
    pub prefix: Arc<[BlockHash]>,
    /// The client's `request_id`, echoed on every message.
    pub request_id: String,
    /// Which of the request's choices this sequence is (`GenerateResponse.index`).
    pub index: u32,
    /// Raised by `Abort`; shared by the request's choices (`crate::abort`).
    pub aborted: Arc<AtomicBool>,
    /// The client's deadline (grpc-timeout), if it sent one.
    pub deadline: Option<Instant>,
    /// Tokens already generated (non-empty when the sequence moves here from a failed gate:
    /// it is re-prefilled from prompt + generated and continues its random stream).
    pub generated: Vec<u32>,
    pub ttft: Option<Duration>,
    /// Text, stop strings and finish rule (built while validating the request).
    pub decoder: SequenceDecoder,
    pub tx: ClientTx,
    pub start: Instant,
    /// The request's `generate` span (the root of its trace).
    pub span: Span,
    /// Its `queue` span, which ends when the sequence is first scheduled.
    pub queue: Span,
}

/// A `queue` span under a request's `generate` span: the time until the sequence is first
/// scheduled into a step.
pub fn queue_span(request: &Span) -> Span {
    if telemetry::is_traced(request) {
        tracing::debug_span!(parent: request, "queue")
    } else {
        Span::none()
    }
}

/// What the frontend keeps of a sequence besides the serving core's state: its client.
struct Client {
    request_id: String,
    /// The names of the prompt's full KV blocks.
    prefix: Arc<[BlockHash]>,
    /// The choice's index.
    index: u32,
    /// Raised by `Abort`.
    aborted: Arc<AtomicBool>,
    tx: ClientTx,
    start: Instant,
    ttft: Option<Duration>,
    deadline: Option<Instant>,
    /// The request's `generate` span.
    span: Span,
    /// Whether that span is exported (then every step of the sequence gets a span of its own).
    traced: bool,
    /// Open until the sequence is first scheduled.
    queue: Span,
}

/// Why a sequence leaves a link.
enum Outcome {
    /// Its last token went to the client.
    Finished,
    /// It fails with this status (made from a [`MeshError`]).
    Failed(Status),
    /// Its client left, or its deadline passed.
    Gone,
    /// `Abort` ended it: its stream ends with finish reason CANCELLED.
    Aborted,
    /// Its gate was lost: it moves to another.
    Moved,
}

/// The handle the service uses to give sequences to a gate.
#[derive(Clone)]
pub struct GateLink {
    pub address: String,
    tx: mpsc::UnboundedSender<NewSeq>,
    /// Sequences running or queued on this gate (for spreading load).
    pub load: Arc<AtomicUsize>,
    /// The gate's free KV blocks as last reported (`usize::MAX` until known).
    pub free_kv: Arc<AtomicUsize>,
    /// When the gate's stream last broke (cleared by the next good step).
    pub failed_at: Arc<std::sync::Mutex<Option<Instant>>>,
    /// What the gate's prefix cache is believed to hold: the block names of the prompts this
    /// link has prefilled there (empty, with no room, while the gate reports no prefix cache).
    pub index: Arc<std::sync::Mutex<PrefixIndex>>,
}

/// Where a link sends its sequences when its gate dies, to be placed on another gate.
pub type Reroute = mpsc::UnboundedSender<(String, NewSeq)>;

impl GateLink {
    pub fn spawn(address: String, ctx: Arc<Ctx>, reroute: Reroute) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let load = Arc::new(AtomicUsize::new(0));
        let failed_at = Arc::new(std::sync::Mutex::new(None));
        let free_kv = Arc::new(AtomicUsize::new(usize::MAX));
        let index = Arc::new(std::sync::Mutex::new(PrefixIndex::new(0)));
        let link = StepLoop::new(
            address.clone(),
            ctx,
            Shared {
                load: load.clone(),
                free_kv: free_kv.clone(),
                failed_at: failed_at.clone(),
                index: index.clone(),
            },
            reroute,
        );
        tokio::spawn(link.run(rx));
        GateLink {
            address,
            tx,
            load,
            free_kv,
            failed_at,
            index,
        }
    }

    /// How many of `prefix`'s blocks (from the first) this gate is believed to hold.
    pub fn prefix_blocks(&self, prefix: &[BlockHash]) -> usize {
        lock(&self.index).matched(prefix)
    }

    /// Whether the gate's stream broke within `window`.
    pub fn recently_failed(&self, window: Duration) -> bool {
        let at = *lock(&self.failed_at);
        at.is_some_and(|t| t.elapsed() < window)
    }

    /// Queues a sequence for this gate; gives it back when the gate's step loop has stopped.
    pub fn submit(&self, seq: NewSeq) -> Result<(), Box<NewSeq>> {
        self.load.fetch_add(1, Ordering::SeqCst);
        self.tx.send(seq).map_err(|e| {
            self.load.fetch_sub(1, Ordering::SeqCst);
            Box::new(e.0)
        })
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A poisoned lock still holds good state (its holders only update counters and maps).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a step loop shares with its [`GateLink`] handles.
struct Shared {
    load: Arc<AtomicUsize>,
    free_kv: Arc<AtomicUsize>,
    failed_at: Arc<std::sync::Mutex<Option<Instant>>>,
    index: Arc<std::sync::Mutex<PrefixIndex>>,
}

/// What the gate's Info says when its step stream opens.
struct GateInfo {
    kv: Option<KvState>,
    device: String,
    /// Blocks its prefix cache can hold (device pool and host tier); 0 without one.
    prefix_blocks: usize,
    /// The most steps one request may run there (1 for a gate that runs one).
    max_run_steps: u32,
}

struct Conn {
    tx: mpsc::Sender<StepRequest>,
    rx: Streaming<StepResponse>,
    /// The gate embeds token ids itself (its Info's embeds_tokens): steps go without
    /// activations.
    embeds: bool,
}

/// Opens the step stream, and asks the gate for its KV capacity (so the first step fits too)
/// and its device. A new stream takes the TLS files as they are now.
async fn connect(
    address: &str,
    tls: Option<&moemesh_common::tls::Tls>,
) -> MeshResult<(Conn, GateInfo)> {
    let unavailable =
        |e: &dyn std::fmt::Display| MeshError::Unavailable(format!("gate {address}: {e}"));
    let endpoint = moemesh_common::tls::endpoint(address, tls)
        .map_err(|e| unavailable(&e))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    let channel = endpoint.connect().await.map_err(|e| unavailable(&e))?;
    let mut client = GateClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(2);
    let info = client
        .info(v1::GateInfoRequest {})
        .await
        .map_err(|e| unavailable(&e))?
        .into_inner();
    let kv = (info.kv_block_tokens > 0).then_some(KvState {
        free_blocks: info.kv_blocks_free as usize,
        total_blocks: info.kv_blocks_total as usize,
        block_tokens: info.kv_block_tokens as usize,
    });
    let rx = client
        .step(ReceiverStream::new(rx))
        .await
        .map_err(|e| unavailable(&e))?
        .into_inner();
    let prefix_blocks = if info.prefix_cache {
        info.kv_blocks_total as usize + info.host_kv_blocks as usize
    } else {
        0
    };
    Ok((
        Conn {
            tx,
            rx,
            embeds: info.embeds_tokens,
        },
        GateInfo {
            kv,
            device: info.device,
            prefix_blocks,
            max_run_steps: if info.embeds_tokens {
                info.max_run_steps.max(1)
            } else {
                1
            },
        },
    ))
}

async fn exchange(conn: &mut Conn, address: &str, req: StepRequest) -> MeshResult<StepResponse> {
    send(conn, address, req).await?;
    answer(address, conn.rx.next().await)
}

/// A message onto the step stream.
async fn send(conn: &mut Conn, address: &str, req: StepRequest) -> MeshResult<()> {
    conn.tx.send(req).await.map_err(|_| closed(address))
}

/// What the step stream gave: an answer, its end, or the gate's status.
fn answer(address: &str, m: Option<Result<StepResponse, Status>>) -> MeshResult<StepResponse> {
    match m {
        Some(Ok(r)) => Ok(r),
        None => Err(closed(address)),
        Some(Err(status)) => Err(MeshError::Peer {
            peer: format!("gate {address}"),
            status,
        }),
    }
}

fn closed(address: &str) -> MeshError {
    MeshError::Unavailable(format!("gate {address}: step stream closed"))
}

/// A gate that gave no answer to a step within --step-timeout.
fn hung(address: &str, step_id: u64, timeout: Duration) -> MeshError {
    MeshError::Unavailable(format!(
        "gate {address}: no answer to step {step_id} within {timeout:?} (--step-timeout); taking it for hung"
    ))
}

/// One gate's step loop.
struct StepLoop {
    address: String,
    ctx: Arc<Ctx>,
    batch: Batch<Client>,
    /// The CPU budget until the gate's Info says it computes on a GPU.
    limits: Limits,
    conn: Option<Conn>,
    /// The most steps a request to this gate runs: `--decode-run-steps`, as far as the gate's
    /// Info allows (1 until the stream is open).
    run_cap: u32,
    step_id: u64,
    shared: Shared,
    reroute: Reroute,
    queue_depth: metrics::Gauge,
    running: metrics::Gauge,
    step_seconds: metrics::Histogram,
    preemptions: metrics::Counter,
}

impl StepLoop {
    fn new(address: String, ctx: Arc<Ctx>, shared: Shared, reroute: Reroute) -> Self {
        let gate = address.clone();
        StepLoop {
            queue_depth: metrics::gauge!(names::QUEUE_DEPTH, "gate" => gate.clone()),
            running: metrics::gauge!(names::RUNNING, "gate" => gate.clone()),
            step_seconds: metrics::histogram!(names::FRONTEND_STEP, "gate" => gate.clone()),
            preemptions: metrics::counter!(names::PREEMPTIONS, "gate" => gate),
            limits: ctx.limits,
            address,
            ctx,
            batch: Batch::default(),
            conn: None,
            run_cap: 1,
            step_id: 0,
            shared,
            reroute,
        }
    }

    /// Steps until the service drops its sender and no sequence is left.
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<NewSeq>) {
        loop {
            if self.batch.is_idle() {
                match rx.recv().await {
                    Some(n) => self.admit(n),
                    None => return,
                }
            }
            while let Ok(n) = rx.try_recv() {
                self.admit(n);
            }
            self.drop_gone();
            let Some((mut step, mut request, _step_spans)) = self.next_step() else {
                continue;
            };
            let run = self.run_length(&step);
            if run > 1 {
                request.run_steps = run;
            }
            // The sequences' `step` spans end when the gate's answer is in (dropped with this
            // iteration).
            // The run's sequences (nothing waits when one starts).
            let members = self.batch.len();
            let mut sent = Instant::now();
            let answer = self.exchange(request).await;
            if !self.on_answer(&step, sent, answer) {
                continue;
            }
            // A run: the gate goes on with the same sequences and answers each step. A request
            // that arrives meanwhile ends it after the step in progress (it waits one step, not
            // the run).
            let mut asked_end = false;
            loop {
                // Sequences aborted, gone or past their deadline leave now (their later tokens
                // are dropped). Once one has left (so too one that finished), the run is not
                // worth going on: the next request releases it and plans afresh.
                self.drop_gone();
                if self.batch.len() < members && !asked_end {
                    asked_end = true;
                    if let Err(e) = self.end_run().await {
                        self.on_gate_lost(e);
                        break;
                    }
                }
                step = Batch::<Client>::continue_step(&step);
                sent = Instant::now();
                let answer = self.run_answer(&mut rx, &mut asked_end).await;
                if !self.on_answer(&step, sent, answer) {
                    break;
                }
            }
        }
    }

    /// How many steps to ask the gate to run for `step` (`StepRequest::run_steps`; 1: this
    /// step alone). More than one only when the gate allows it, nothing waits, every sequence
    /// decodes one token with no prompt logprobs, no constraint (a constraint's mask follows
    /// each token) and no trace, and each may make that many more tokens: a run never computes
    /// past a sequence's max_tokens or context (a sequence that finishes earlier, at an EOS or
    /// a stop, ends the run after the step in progress).
    fn run_length(&self, step: &Step) -> u32 {
        if self.run_cap < 2 || step.slots.is_empty() || self.batch.counts().1 > 0 {
            return 1;
        }
        let mut n = self.run_cap as usize;
        for slot in &step.slots {
            let Some(s) = self.batch.get(slot.key) else {
                return 1;
            };
            // A traced sequence keeps one request a step, so that its trace holds each step
            // under its own frontend `step` span (the context goes with the request).
            if slot.tokens != 1
                || !slot.sample
                || slot.prompt_logprobs.is_some()
                || slot.allowed.is_some()
                || slot.start + 1 != s.len()
                || s.payload.traced
            {
                return 1;
            }
            let left = s
                .req
                .max_new_tokens
                .saturating_sub(s.generated.len())
                .min(self.ctx.context_length.saturating_sub(s.len()));
            n = n.min(left);
        }
        n.max(1) as u32
    }

    /// One answer from the gate: the sequences move on as it says. Whether a run goes on (the
    /// answer was a step of a run, not its last).
    fn on_answer(&mut self, step: &Step, sent: Instant, answer: MeshResult<StepResponse>) -> bool {
        match answer {
            Ok(resp) if is_kv_full(&resp) => self.on_kv_full(step, &resp),
            Ok(resp) if resp.error.is_some() => self.on_step_error(step, resp),
            Ok(resp) => {
                let took = sent.elapsed();
                self.step_seconds.record(took.as_secs_f64());
                self.log_step_time(step, sent, took);
                let more = resp.run_continues;
                self.on_ok(step, resp);
                return more;
            }
            Err(e) => self.on_gate_lost(e),
        }
        false
    }

    /// Asks the gate to end its run after the step in progress (`StepRequest::end_run`).
    async fn end_run(&mut self) -> MeshResult<()> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(MeshError::Internal("no gate connection".into()));
        };
        let end = StepRequest {
            end_run: true,
            ..Default::default()
        };
        send(conn, &self.address, end).await
    }

    /// The next answer of a run, within --step-timeout. A request that arrives meanwhile is
    /// admitted (it waits for the run's end) and the gate asked once to end the run.
    async fn run_answer(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<NewSeq>,
        asked_end: &mut bool,
    ) -> MeshResult<StepResponse> {
        enum Event {
            Answer(Option<Result<StepResponse, Status>>),
            Arrived(Option<Box<NewSeq>>),
            Late,
        }
        let (address, timeout) = (self.address.clone(), self.ctx.step_timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Err(MeshError::Internal("no gate connection".into()));
            };
            let event = tokio::select! {
                biased;
                m = conn.rx.next() => Event::Answer(m),
                n = rx.recv(), if !*asked_end => Event::Arrived(n.map(Box::new)),
                _ = tokio::time::sleep_until(deadline) => Event::Late,
            };
            match event {
                Event::Answer(m) => return answer(&address, m),
                Event::Arrived(n) => {
                    *asked_end = true;
                    if let Some(n) = n {
                        self.admit(*n);
                    }
                    self.end_run().await?;
                }
                Event::Late => return Err(hung(&address, self.step_id, timeout)),
            }
        }
    }

    fn admit(&mut self, n: NewSeq) {
        let id = self.ctx.next_seq.fetch_add(1, Ordering::Relaxed);
        self.batch.admit(Sequence {
            id,
            req: n.req,
            generated: n.generated,
            decoder: n.decoder,
            cache_salt: n.cache_salt,
            cached_tokens: 0,
            prompt_logprobs: Vec::new(),
            payload: Client {
                request_id: n.request_id,
                prefix: n.prefix,
                index: n.index,
                aborted: n.aborted,
                tx: n.tx,
                start: n.start,
                ttft: n.ttft,
                deadline: n.deadline,
                traced: telemetry::is_traced(&n.span),
                span: n.span,
                queue: n.queue,
            },
        });
    }

    /// Sequences whose client went away, whose deadline passed or that `Abort` ended; their KV
    /// is released with the next step.
    fn drop_gone(&mut self) {
        let now = Instant::now();
        let gone = self.batch.remove_where(|s| {
            let c = &s.payload;
            c.tx.is_closed()
                || c.deadline.is_some_and(|d| d <= now)
                || c.aborted.load(Ordering::Relaxed)
        });
        for s in gone {
            if s.payload.aborted.load(Ordering::Relaxed) {
                tracing::debug!(seq = s.id, request_id = %s.payload.request_id, "aborted; releasing");
                self.retire(s, Outcome::Aborted);
            } else {
                tracing::debug!(
                    seq = s.id,
                    "client went away or its deadline passed; releasing"
                );
                self.retire(s, Outcome::Gone);
            }
        }
    }

    /// Plans the next step and builds its request, with a `step` span for each traced sequence
    /// in it (its context goes to the gate in that sequence's `traceparent`). `None` when a
    /// sequence could not be put on the wire (they all failed).
    fn next_step(&mut self) -> Option<(Step, StepRequest, Vec<Span>)> {
        if let Some(k) = self.batch.kv() {
            self.shared.free_kv.store(k.free_blocks, Ordering::Relaxed);
        }
        self.step_id += 1;
        {
            let index = lock(&self.shared.index);
            let bt = self.batch.kv().map_or(0, |k| k.block_tokens);
            self.batch
                .expect_cached(|s| index.matched(&s.payload.prefix) * bt);
        }
        let (step, rejected) = self.batch.next_step(self.limits);
        let (running, waiting) = self.batch.counts();
        self.queue_depth.set(waiting as f64);
        self.running.set(running as f64);
        self.preemptions.increment(step.plan.preempted.len() as u64);
        for id in &step.plan.preempted {
            tracing::info!(seq = id, gate = %self.address, "KV full: preempting the newest sequence; it will be prefilled again");
        }
        let total = self
            .batch
            .kv()
            .map_or(0, |k| k.total_blocks * k.block_tokens);
        for s in rejected {
            let msg = format!(
                "the sequence ({} tokens) can never fit in gate {}'s KV cache of {total} tokens",
                s.len() + 1,
                self.address
            );
            self.retire(s, Outcome::Failed(MeshError::Overloaded(msg).into()));
        }
        tracing::debug!(
            target: "moemesh_frontend::step",
            step = self.step_id,
            decode = step.plan.decode,
            prefill_tokens = step.plan.prefill_tokens,
            cached_tokens = step.plan.cached_tokens,
            slots = ?step.plan.slots.iter().map(|s| (s.id, s.len)).collect::<Vec<_>>(),
            "step composition"
        );
        match self.build_request(&step) {
            Ok((request, spans)) => Some((step, request, spans)),
            Err(e) => {
                let status = Status::from(e);
                for s in self.batch.remove_where(|_| true) {
                    self.retire(s, Outcome::Failed(status.clone()));
                }
                None
            }
        }
    }

    fn build_request(&mut self, step: &Step) -> MeshResult<(StepRequest, Vec<Span>)> {
        let mut seq_steps = Vec::with_capacity(step.slots.len());
        let mut row = 0;
        let mut spans = Vec::new();
        let batch_sequences = step.slots.len();
        for slot in &step.slots {
            let s = self.batch.get_mut(slot.key).ok_or_else(|| {
                MeshError::Internal(format!("scheduled sequence {} has no state", slot.key))
            })?;
            let prompt_len = s.req.prompt_ids.len();
            let cache_salt = s.cache_salt.map(Vec::from).unwrap_or_default();
            let c = &mut s.payload;
            c.queue = Span::none();
            let mut traceparent = String::new();
            if c.traced {
                let phase = if slot.tokens == 1 && slot.start >= prompt_len {
                    "decode"
                } else {
                    "prefill"
                };
                let span = tracing::debug_span!(
                    parent: &c.span,
                    "step",
                    step = self.step_id,
                    phase,
                    position = slot.start,
                    tokens = slot.tokens,
                    batch_sequences,
                    gate = %self.address,
                );
                traceparent = telemetry::traceparent(&span);
                spans.push(span);
            }
            // Only a sequence's first step on the gate carries its sampling.
            let sampling = slot.sampling.as_ref().map(|st| {
                let p = st.params;
                SeqSampling {
                    temperature: p.temperature,
                    top_p: p.top_p,
                    top_k: p.top_k as u32,
                    seed: p.seed.unwrap_or(0),
                    samples_drawn: st.drawn,
                    min_p: p.min_p,
                    repetition_penalty: p.repetition_penalty,
                    presence_penalty: p.presence_penalty,
                    frequency_penalty: p.frequency_penalty,
                    prompt_ids: st.prompt.to_vec(),
                    generated_ids: st.generated.to_vec(),
                    min_new_tokens: st.min_new_tokens as u32,
                    suppressed_ids: st.suppressed.to_vec(),
                    top_logprobs: st.top_logprobs as u32,
                }
            });
            let (prompt_logprobs, prompt_targets) = match &slot.prompt_logprobs {
                Some(ask) => (Some(ask.top as u32), ask.targets.clone()),
                None => (None, Vec::new()),
            };
            seq_steps.push(SeqStep {
                seq_id: slot.key,
                start_position: slot.start as u32,
                num_tokens: slot.tokens as u32,
                sample: slot.sample,
                sampling,
                traceparent,
                // The gate names cached KV blocks by these.
                token_ids: step
                    .ids
                    .get(row..row + slot.tokens)
                    .map(<[u32]>::to_vec)
                    .unwrap_or_default(),
                cache_salt,
                prompt_logprobs,
                prompt_targets,
                allowed_tokens: slot
                    .allowed
                    .as_deref()
                    .map(<[u32]>::to_vec)
                    .unwrap_or_default(),
            });
            row += slot.tokens;
        }
        // Activations only for a gate that does not embed token ids itself (`exchange`).
        Ok((
            StepRequest {
                step_id: self.step_id,
                seqs: seq_steps,
                activations: None,
                release: step.release.clone(),
                run_steps: 0,
                end_run: false,
            },
            spans,
        ))
    }

    /// Sends a step and waits for its answer, opening the stream first if needed. A gate that
    /// stops answering (paused, wedged, partitioned) is taken for dead once `--step-timeout`
    /// passes.
    async fn exchange(&mut self, mut request: StepRequest) -> MeshResult<StepResponse> {
        let (address, timeout, step_id) =
            (self.address.clone(), self.ctx.step_timeout, self.step_id);
        let result = async {
            if self.conn.is_none() {
                let (c, info) = tokio::time::timeout(
                    self.ctx.connect_timeout,
                    connect(&address, self.ctx.tls.as_deref()),
                )
                .await
                .map_err(|_| {
                    MeshError::Unavailable(format!(
                        "gate {address}: no step stream within {:?} (--gate-connect-timeout-ms)",
                        self.ctx.connect_timeout
                    ))
                })??;
                self.conn = Some(c);
                self.run_cap = self.ctx.run_steps.min(info.max_run_steps).max(1);
                if let Some(kv) = info.kv {
                    self.batch.set_kv(kv);
                }
                lock(&self.shared.index).set_capacity(info.prefix_blocks);
                // Steps are sized by the gate's device from the next plan on.
                if info.device.starts_with("cuda") {
                    self.limits.token_budget = self.ctx.gpu_token_budget;
                }
            }
            match self.conn.as_mut() {
                Some(c) => {
                    if !c.embeds && !request.seqs.is_empty() {
                        // An older gate: the rows cross the wire embedded, bf16.
                        let ids: Vec<u32> = request
                            .seqs
                            .iter()
                            .flat_map(|s| s.token_ids.iter().copied())
                            .collect();
                        let emb = self.ctx.model.embed(&ids)?;
                        request.activations = Some(codec::encode(&emb, v1::DType::Bf16)?);
                    }
                    exchange(c, &address, request).await
                }
                None => Err(MeshError::Internal("no gate connection".into())),
            }
        };
        tokio::time::timeout(timeout, result)
            .await
            .unwrap_or_else(|_| Err(hung(&address, step_id, timeout)))
    }

    /// Where time to first token goes (`moemesh_frontend::step_time=debug`): each step's wall
    /// time and composition, and for the sequences it brings their first token, how long they
    /// waited before it was sent (arrival at this link to the step's send).
    fn log_step_time(&self, step: &Step, sent: Instant, took: Duration) {
        if !tracing::enabled!(target: "moemesh_frontend::step_time", tracing::Level::DEBUG) {
            return;
        }
        let first: Vec<u64> = step
            .plan
            .slots
            .iter()
            .filter(|slot| slot.sample)
            .filter_map(|slot| self.batch.get(slot.id))
            .filter(|s| s.payload.ttft.is_none())
            .map(|s| sent.saturating_duration_since(s.payload.start).as_micros() as u64)
            .collect();
        tracing::debug!(
            target: "moemesh_frontend::step_time",
            step = self.step_id,
            us = took.as_micros() as u64,
            decode = step.plan.decode,
            prefills = step.plan.slots.len() - step.plan.decode,
            prefill_tokens = step.plan.prefill_tokens,
            cached_tokens = step.plan.cached_tokens,
            first_waits_us = ?first,
            "step time"
        );
    }

    /// The step ran: tokens go to their clients; finished sequences leave.
    fn on_ok(&mut self, step: &Step, resp: StepResponse) {
        self.gate_answered();
        if let Some(kv) = kv_state(&resp) {
            self.batch.set_kv(kv);
        }
        let outputs: Vec<SeqOutput<u64>> = resp
            .results
            .iter()
            .map(|r| SeqOutput {
                key: r.seq_id,
                token: r.token_id,
                logprob: r.logprob,
                top: r
                    .top_ids
                    .iter()
                    .copied()
                    .zip(r.top_logprobs.iter().copied())
                    .collect(),
            })
            .collect();
        let hits: Vec<(u64, usize)> = resp
            .cached
            .iter()
            .map(|c| (c.seq_id, c.tokens as usize))
            .collect();
        self.batch.on_prefix_hits(step, &hits);
        self.learn_prefixes(step);
        self.batch.on_prompt_logprobs(
            resp.prompt_logprobs
                .iter()
                .map(|p| {
                    let lps = p.logprobs.iter().map(codec::prompt_logprob_from_wire);
                    (p.seq_id, lps.collect())
                })
                .collect(),
        );
        let done = self.batch.on_tokens(step, &outputs, deliver);
        for (s, finish) in done {
            let outcome = match finish {
                Ok(_) => Outcome::Finished,
                Err(e) => Outcome::Failed(MeshError::from(e).into()),
            };
            self.retire(s, outcome);
        }
    }

    /// After a step ran: the gate now holds (and caches) the full prompt blocks its prefill
    /// chunks reached, taken from its cache or computed (a block expected cached but missing
    /// was computed and registered again, so the index stays right).
    fn learn_prefixes(&mut self, step: &Step) {
        let Some(bt) = self.batch.kv().map(|k| k.block_tokens.max(1)) else {
            return;
        };
        let mut index = lock(&self.shared.index);
        for slot in &step.plan.slots {
            let Some(s) = self.batch.get_mut(slot.id) else {
                continue;
            };
            let p = &s.payload.prefix;
            // Decodes add nothing: only steps that reach prompt blocks.
            if slot.start < p.len() * bt {
                index.insert(&p[..((slot.start + slot.len) / bt).min(p.len())]);
            }
        }
    }

    /// The pool filled up under us (another frontend shares this gate): take the gate's numbers
    /// and plan again; preemption makes room, nothing fails.
    fn on_kv_full(&mut self, step: &Step, resp: &StepResponse) {
        tracing::info!(gate = %self.address, free = resp.kv_blocks_free, "gate KV full; replanning");
        if let Some(kv) = kv_state(resp) {
            self.batch.on_kv_full(step, kv);
        }
    }

    /// The gate could not run this step (e.g. an expert has no live worker): the step's
    /// sequences fail with its status; the gate and the others carry on.
    fn on_step_error(&mut self, step: &Step, resp: StepResponse) {
        self.gate_answered();
        let err = resp.error.unwrap_or_default();
        let status = Status::from(MeshError::Peer {
            peer: format!("gate {}", self.address),
            status: Status::new(tonic::Code::from_i32(err.code), err.message),
        });
        for s in self.batch.on_step_failed(step) {
            self.retire(s, Outcome::Failed(status.clone()));
        }
    }

    /// The gate is gone (its stream broke, it cannot be reached, or it stopped answering), and
    /// its KV with it. Every sequence moves to another gate, to be prefilled again there from
    /// its tokens so far; with greedy or seeded sampling it continues exactly as it would have.
    fn on_gate_lost(&mut self, e: MeshError) {
        self.conn = None;
        *lock(&self.shared.failed_at) = Some(Instant::now());
        let moved = self.batch.on_lost();
        if !moved.is_empty() {
            tracing::warn!(gate = %self.address, error = %e, sequences = moved.len(), "gate failed; moving its sequences");
        }
        for s in moved {
            self.retire(s, Outcome::Moved);
        }
    }

    fn gate_answered(&self) {
        *lock(&self.shared.failed_at) = None;
    }

    /// A sequence leaves this link: its load count is given back, and its stream gets what the
    /// outcome owes it (its last token has already gone when it finished).
    fn retire(&self, s: Sequence<Client>, outcome: Outcome) {
        self.shared.load.fetch_sub(1, Ordering::SeqCst);
        if let Outcome::Aborted = outcome {
            let msg = last_message(&s, FinishReason::Cancelled, String::new(), None);
            let _ = s.payload.tx.send(Ok(msg));
            return;
        }
        let c = s.payload;
        match outcome {
            Outcome::Finished | Outcome::Aborted => {}
            Outcome::Failed(status) => {
                let _ = c.tx.send(Err(status));
            }
            Outcome::Gone => {
                if !c.tx.is_closed() {
                    let msg = format!(
                        "the request's deadline passed after {} generated tokens ({} ms since it arrived)",
                        s.generated.len(),
                        c.start.elapsed().as_millis()
                    );
                    let _ = c.tx.send(Err(MeshError::Deadline(msg).into()));
                }
            }
            Outcome::Moved => {
                let moved = NewSeq {
                    req: s.req,
                    cache_salt: s.cache_salt,
                    prefix: c.prefix,
                    request_id: c.request_id,
                    index: c.index,
                    aborted: c.aborted,
                    decoder: s.decoder,
                    tx: c.tx,
                    start: c.start,
                    deadline: c.deadline,
                    generated: s.generated,
                    ttft: c.ttft,
                    queue: queue_span(&c.span),
                    span: c.span,
                };
                if let Err(e) = self.reroute.send((self.address.clone(), moved)) {
                    let _ = e.0.1.tx.send(Err(MeshError::Unavailable(format!(
                        "gate {} failed and the frontend is shutting down",
                        self.address
                    ))
                    .into()));
                }
            }
        }
    }
}

/// The step was refused for KV room (with the gate's numbers to plan again with).
fn is_kv_full(resp: &StepResponse) -> bool {
    resp.error
        .as_ref()
        .is_some_and(|e| e.code == tonic::Code::ResourceExhausted as i32)
        && resp.kv_block_tokens > 0
}

fn kv_state(resp: &StepResponse) -> Option<KvState> {
    (resp.kv_block_tokens > 0).then_some(KvState {
        free_blocks: resp.kv_blocks_free as usize,
        total_blocks: resp.kv_blocks_total as usize,
        block_tokens: resp.kv_block_tokens as usize,
    })
}

/// Hands one token to the sequence's client (a closed channel means the client left; the next
/// step releases the sequence).
fn deliver(s: &mut Sequence<Client>, t: &Token) {
    let c = &mut s.payload;
    if c.ttft.is_none() {
        c.ttft = Some(c.start.elapsed());
    }
    let msg = match t.finish {
        Some(reason) => last_message(s, reason, t.text.clone(), Some(t)),
        None => GenerateResponse {
            text: t.text.clone(),
            token_ids: vec![t.token],
            logprobs: vec![t.logprob],
            finish_reason: v1::FinishReason::Unspecified as i32,
            usage: None,
            request_id: c.request_id.clone(),
            index: c.index,
            top_logprobs: top_logprobs(t),
            prompt_logprobs: prompt_logprobs(t),
        },
    };
    let _ = s.payload.tx.send(Ok(msg));
}

/// A sequence's last message: its last token (none when `Abort` ended it), the finish reason
/// and its usage, which also go on the request's span.
fn last_message(
    s: &Sequence<Client>,
    reason: FinishReason,
    text: String,
    token: Option<&Token>,
) -> GenerateResponse {
    let c = &s.payload;
    let ttft = c.ttft.unwrap_or_default().as_secs_f64() * 1e3;
    c.span.record("completion_tokens", s.generated.len());
    c.span.record("ttft_ms", ttft);
    c.span.record("finish_reason", reason.as_str());
    GenerateResponse {
        text,
        token_ids: token.map(|t| vec![t.token]).unwrap_or_default(),
        logprobs: token.map(|t| vec![t.logprob]).unwrap_or_default(),
        finish_reason: wire_reason(reason) as i32,
        usage: Some(v1::Usage {
            prompt_tokens: s.req.prompt_ids.len() as u32,
            completion_tokens: s.generated.len() as u32,
            time_to_first_token_ms: ttft,
            cached_prompt_tokens: s.cached_tokens as u32,
        }),
        request_id: c.request_id.clone(),
        index: c.index,
        top_logprobs: token.map(top_logprobs).unwrap_or_default(),
        prompt_logprobs: token.map(prompt_logprobs).unwrap_or_default(),
    }
}

/// The prompt logprobs a sequence's first token carries, on the wire.
fn prompt_logprobs(t: &Token) -> Vec<v1::PromptLogprob> {
    t.prompt_logprobs
        .iter()
        .map(codec::prompt_logprob_to_wire)
        .collect()
}

/// A token's alternatives on the wire: one entry per token, or none when not asked for.
fn top_logprobs(t: &Token) -> Vec<v1::TopLogprobs> {
    if t.top.is_empty() {
        return Vec::new();
    }
    vec![v1::TopLogprobs {
        token_ids: t.top.iter().map(|a| a.0).collect(),
        logprobs: t.top.iter().map(|a| a.1).collect(),
    }]
}

pub fn wire_reason(r: FinishReason) -> v1::FinishReason {
    match r {
        FinishReason::Length => v1::FinishReason::Length,
        FinishReason::Stop => v1::FinishReason::Stop,
        FinishReason::Eos => v1::FinishReason::Eos,
        FinishReason::Cancelled => v1::FinishReason::Cancelled,
    }
}
