//! One gate's step loop: asks the [`Scheduler`] what goes into the next step (decodes first,
//! then prompt chunks, then newly admitted sequences, within the token budget), sends it, and
//! routes the sampled ids through each sequence's detokenizer and stop checks to its client.
//! Finished and abandoned sequences are released on the gate in the next step.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moemesh_common::metrics::names;
use moemesh_common::{MeshError, MeshResult, codec, telemetry};
use moemesh_engine::generate::{FinishReason, TextTracker, finish_check};
use moemesh_engine::text::TextTokenizer;
use moemesh_engine::{DeepSeekModel, GenerationRequest};
use moemesh_proto::v1::gate_client::GateClient;
use moemesh_proto::v1::{self, GenerateResponse, SeqSampling, SeqStep, StepRequest, StepResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Span;

use crate::scheduler::{Entry, KvState, Limits, Plan, Scheduler};

/// What every gate link shares: the embedding table, tokenizer and model limits.
pub struct Ctx {
    /// Step budget and running-sequence cap.
    pub limits: Limits,
    pub model: DeepSeekModel,
    pub tokenizer: Option<TextTokenizer>,
    pub eos: Vec<u32>,
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
}

pub type ClientTx = mpsc::UnboundedSender<Result<GenerateResponse, Status>>;

/// A request accepted by the service, on its way to a gate.
pub struct NewSeq {
    pub req: GenerationRequest,
    /// The client's deadline (grpc-timeout), if it sent one.
    pub deadline: Option<Instant>,
    /// Tokens already generated (non-empty when the sequence moves here from a failed gate:
    /// it is re-prefilled from prompt + generated and continues its random stream).
    pub generated: Vec<u32>,
    pub ttft: Option<Duration>,
    /// Detokenizer and stop strings (built while validating the request).
    pub text: TextTracker,
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

struct Seq {
    id: u64,
    req: GenerationRequest,
    tx: ClientTx,
    start: Instant,
    ttft: Option<Duration>,
    generated: Vec<u32>,
    text: TextTracker,
    deadline: Option<Instant>,
    /// The request's `generate` span.
    span: Span,
    /// Whether that span is exported (then every step of the sequence gets a span of its own).
    traced: bool,
    /// Open until the sequence is first scheduled.
    queue: Span,
}

impl Seq {
    /// Token `i` of the sequence (prompt, then generated).
    fn token(&self, i: usize) -> u32 {
        let p = self.req.prompt_ids.len();
        if i < p {
            self.req.prompt_ids[i]
        } else {
            self.generated[i - p]
        }
    }

    fn len(&self) -> usize {
        self.req.prompt_ids.len() + self.generated.len()
    }
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
}

/// Where a link sends its sequences when its gate dies, to be placed on another gate.
pub type Reroute = mpsc::UnboundedSender<(String, NewSeq)>;

impl GateLink {
    pub fn spawn(address: String, ctx: Arc<Ctx>, reroute: Reroute) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let load = Arc::new(AtomicUsize::new(0));
        let failed_at = Arc::new(std::sync::Mutex::new(None));
        let free_kv = Arc::new(AtomicUsize::new(usize::MAX));
        let link = Link {
            address: address.clone(),
            ctx,
            load: load.clone(),
            free_kv: free_kv.clone(),
            failed_at: failed_at.clone(),
            reroute,
        };
        tokio::spawn(run(link, rx));
        GateLink {
            address,
            tx,
            load,
            free_kv,
            failed_at,
        }
    }

    /// Whether the gate's stream broke within `window`.
    pub fn recently_failed(&self, window: Duration) -> bool {
        let at = *self.failed_at.lock().unwrap_or_else(|e| e.into_inner());
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

/// What the step loop task owns besides its sequences.
struct Link {
    address: String,
    ctx: Arc<Ctx>,
    load: Arc<AtomicUsize>,
    free_kv: Arc<AtomicUsize>,
    failed_at: Arc<std::sync::Mutex<Option<Instant>>>,
    reroute: Reroute,
}

struct Conn {
    tx: mpsc::Sender<StepRequest>,
    rx: Streaming<StepResponse>,
}

/// Opens the step stream, and asks the gate for its KV capacity (so the first step fits too)
/// and its device. A new stream takes the TLS files as they are now.
async fn connect(
    address: &str,
    tls: Option<&moemesh_common::tls::Tls>,
) -> MeshResult<(Conn, Option<KvState>, String)> {
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
    Ok((Conn { tx, rx }, kv, info.device))
}

async fn exchange(conn: &mut Conn, address: &str, req: StepRequest) -> MeshResult<StepResponse> {
    conn.tx
        .send(req)
        .await
        .map_err(|_| MeshError::Unavailable(format!("gate {address}: step stream closed")))?;
    match conn.rx.message().await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(MeshError::Unavailable(format!(
            "gate {address}: step stream closed"
        ))),
        Err(s) => Err(MeshError::Peer {
            peer: format!("gate {address}"),
            status: s,
        }),
    }
}

async fn run(link: Link, mut rx: mpsc::UnboundedReceiver<NewSeq>) {
    let Link {
        address,
        ctx,
        load,
        free_kv,
        failed_at,
        reroute,
    } = link;
    let mut seqs: HashMap<u64, Seq> = HashMap::new();
    let mut sched = Scheduler::default();
    // The CPU budget until the gate's Info says it computes on a GPU.
    let mut limits = ctx.limits;
    let mut release: Vec<u64> = Vec::new();
    let mut conn: Option<Conn> = None;
    let mut step_id = 0u64;
    let gate = address.clone();
    let queue_depth = metrics::gauge!(names::QUEUE_DEPTH, "gate" => gate.clone());
    let running = metrics::gauge!(names::RUNNING, "gate" => gate.clone());
    let step_seconds = metrics::histogram!(names::FRONTEND_STEP, "gate" => gate.clone());
    let preemptions = metrics::counter!(names::PREEMPTIONS, "gate" => gate);
    loop {
        if sched.is_idle() && release.is_empty() {
            match rx.recv().await {
                Some(n) => admit(n, &ctx, &mut seqs, &mut sched),
                None => return,
            }
        }
        while let Ok(n) = rx.try_recv() {
            admit(n, &ctx, &mut seqs, &mut sched);
        }
        let now = Instant::now();
        let gone: Vec<u64> = seqs
            .iter()
            .filter(|(_, s)| s.tx.is_closed() || s.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(s) = seqs.remove(&id) {
                if !s.tx.is_closed() {
                    let msg = format!(
                        "the request's deadline passed after {} generated tokens ({} ms since it arrived)",
                        s.generated.len(),
                        s.start.elapsed().as_millis()
                    );
                    let _ = s.tx.send(Err(Status::deadline_exceeded(msg)));
                }
                tracing::debug!(
                    seq = id,
                    "client went away or its deadline passed; releasing"
                );
            }
            sched.remove(id);
            release.push(id);
            load.fetch_sub(1, Ordering::SeqCst);
        }

        if let Some(k) = sched.kv {
            free_kv.store(k.free_blocks, Ordering::Relaxed);
        }
        step_id += 1;
        let plan = sched.plan(limits);
        queue_depth.set(sched.waiting.len() as f64);
        running.set(sched.running.len() as f64);
        preemptions.increment(plan.preempted.len() as u64);
        for id in &plan.preempted {
            tracing::info!(seq = id, gate = %address, "KV full: preempting the newest sequence; it will be prefilled again");
            release.push(*id);
        }
        for id in &plan.rejected {
            if let Some(s) = seqs.remove(id) {
                let total = sched.kv.map_or(0, |k| k.total_blocks * k.block_tokens);
                let msg = format!(
                    "the sequence ({} tokens) can never fit in gate {address}'s KV cache of {total} tokens",
                    s.len() + 1
                );
                let _ = s.tx.send(Err(Status::resource_exhausted(msg)));
                load.fetch_sub(1, Ordering::SeqCst);
            }
        }
        tracing::debug!(
            target: "moemesh_frontend::step",
            step = step_id,
            decode = plan.decode,
            prefill_tokens = plan.prefill_tokens,
            slots = ?plan.slots.iter().map(|s| (s.id, s.len)).collect::<Vec<_>>(),
            "step composition"
        );
        let step = build_step(
            step_id,
            &plan,
            &mut seqs,
            &ctx,
            std::mem::take(&mut release),
            &address,
        );
        // The sequences' `step` spans end when the gate's answer is in (dropped with this).
        let (step, _step_spans) = match step {
            Ok(s) => s,
            Err(e) => {
                fail_all(&mut seqs, &mut sched, &load, Status::from(e));
                continue;
            }
        };
        let sent = Instant::now();
        let result = async {
            if conn.is_none() {
                let (c, kv, device) = tokio::time::timeout(
                    ctx.connect_timeout,
                    connect(&address, ctx.tls.as_deref()),
                )
                .await
                .map_err(|_| {
                    MeshError::Unavailable(format!(
                        "gate {address}: no step stream within {:?} (--gate-connect-timeout-ms)",
                        ctx.connect_timeout
                    ))
                })??;
                conn = Some(c);
                if kv.is_some() {
                    sched.kv = kv;
                }
                // Steps are sized by the gate's device from the next plan on.
                if device.starts_with("cuda") {
                    limits.token_budget = ctx.gpu_token_budget;
                }
            }
            match conn.as_mut() {
                Some(c) => exchange(c, &address, step).await,
                None => Err(MeshError::Internal("no gate connection".into())),
            }
        };
        // A gate that stops answering (paused, wedged, partitioned) is treated like a dead one
        // once the step deadline passes: its stream is dropped and its sequences move.
        let result = tokio::time::timeout(ctx.step_timeout, result)
            .await
            .unwrap_or_else(|_| {
                Err(MeshError::Unavailable(format!(
                    "gate {address}: no answer to step {step_id} within {:?} (--step-timeout); taking it for hung",
                    ctx.step_timeout
                )))
            });
        if result.is_ok() {
            step_seconds.record(sent.elapsed().as_secs_f64());
        }
        match result {
            Ok(resp)
                if resp
                    .error
                    .as_ref()
                    .is_some_and(|e| e.code == tonic::Code::ResourceExhausted as i32)
                    && resp.kv_block_tokens > 0 =>
            {
                // The pool filled up under us (another frontend shares this gate): take the
                // gate's numbers and plan again; preemption makes room, nothing fails.
                tracing::info!(gate = %address, free = resp.kv_blocks_free, "gate KV full; replanning");
                for slot in &plan.slots {
                    if slot.start == 0 {
                        // The gate dropped the sequences this step would have started.
                        sched.unadmit(slot.id);
                    }
                }
                sched.kv = Some(KvState {
                    free_blocks: resp.kv_blocks_free as usize,
                    total_blocks: resp.kv_blocks_total as usize,
                    block_tokens: resp.kv_block_tokens as usize,
                });
            }
            Ok(resp) if resp.error.is_some() => {
                // The gate could not run this step (e.g. an expert has no live worker): the
                // step's sequences fail with its status; the gate and the others carry on.
                *failed_at.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let err = resp.error.unwrap_or_default();
                let status = Status::new(
                    tonic::Code::from_i32(err.code),
                    format!("gate {address}: {}", err.message),
                );
                for slot in &plan.slots {
                    if let Some(s) = seqs.remove(&slot.id) {
                        let _ = s.tx.send(Err(status.clone()));
                        load.fetch_sub(1, Ordering::SeqCst);
                    }
                    sched.remove(slot.id);
                    release.push(slot.id);
                }
            }
            Ok(resp) => {
                *failed_at.lock().unwrap_or_else(|e| e.into_inner()) = None;
                if resp.kv_block_tokens > 0 {
                    sched.kv = Some(KvState {
                        free_blocks: resp.kv_blocks_free as usize,
                        total_blocks: resp.kv_blocks_total as usize,
                        block_tokens: resp.kv_block_tokens as usize,
                    });
                }
                let by_seq: HashMap<u64, &v1::SeqResult> =
                    resp.results.iter().map(|r| (r.seq_id, r)).collect();
                for slot in &plan.slots {
                    let sampled = by_seq.get(&slot.id).filter(|_| slot.sample);
                    sched.advance(slot, sampled.is_some());
                    let (Some(r), Some(s)) = (sampled, seqs.get_mut(&slot.id)) else {
                        continue;
                    };
                    if deliver(s, r, &ctx) {
                        seqs.remove(&slot.id);
                        sched.remove(slot.id);
                        release.push(slot.id);
                        load.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
            Err(e) => {
                // The gate is gone (its stream broke or it cannot be reached), and its KV with
                // it. Every sequence moves to another gate, to be re-prefilled there from its
                // tokens so far; with greedy or seeded sampling it continues exactly as it would
                // have.
                conn = None;
                release.clear();
                *failed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                if !seqs.is_empty() {
                    tracing::warn!(gate = %address, error = %e, sequences = seqs.len(), "gate failed; moving its sequences");
                }
                for (id, s) in seqs.drain() {
                    sched.remove(id);
                    load.fetch_sub(1, Ordering::SeqCst);
                    let moved = NewSeq {
                        req: s.req,
                        text: s.text,
                        tx: s.tx,
                        start: s.start,
                        deadline: s.deadline,
                        generated: s.generated,
                        ttft: s.ttft,
                        queue: queue_span(&s.span),
                        span: s.span,
                    };
                    if let Err(e) = reroute.send((address.clone(), moved)) {
                        let _ = e.0.1.tx.send(Err(Status::unavailable(format!(
                            "gate {address} failed and the frontend is shutting down"
                        ))));
                    }
                }
            }
        }
    }
}

fn admit(n: NewSeq, ctx: &Ctx, seqs: &mut HashMap<u64, Seq>, sched: &mut Scheduler) {
    let id = ctx.next_seq.fetch_add(1, Ordering::Relaxed);
    let seq = Seq {
        id,
        req: n.req,
        tx: n.tx,
        start: n.start,
        ttft: n.ttft,
        generated: n.generated,
        text: n.text,
        deadline: n.deadline,
        traced: telemetry::is_traced(&n.span),
        span: n.span,
        queue: n.queue,
    };
    sched.waiting.push_back(Entry {
        id,
        len: seq.len(),
        gate_pos: 0,
        skipped: 0,
    });
    seqs.insert(id, seq);
}

/// The step's request, and a `step` span for each traced sequence in it (its context goes to
/// the gate in that sequence's `traceparent`).
fn build_step(
    step_id: u64,
    plan: &Plan,
    seqs: &mut HashMap<u64, Seq>,
    ctx: &Ctx,
    release: Vec<u64>,
    gate: &str,
) -> MeshResult<(StepRequest, Vec<Span>)> {
    let mut ids = Vec::with_capacity(plan.decode + plan.prefill_tokens);
    let mut seq_steps = Vec::with_capacity(plan.slots.len());
    let mut spans = Vec::new();
    for slot in &plan.slots {
        let s = seqs.get_mut(&slot.id).ok_or_else(|| {
            MeshError::Internal(format!("scheduled sequence {} has no state", slot.id))
        })?;
        ids.extend((slot.start..slot.start + slot.len).map(|i| s.token(i)));
        s.queue = Span::none();
        let mut traceparent = String::new();
        if s.traced {
            let phase = if slot.len == 1 && slot.start >= s.req.prompt_ids.len() {
                "decode"
            } else {
                "prefill"
            };
            let span = tracing::debug_span!(
                parent: &s.span,
                "step",
                step = step_id,
                phase,
                position = slot.start,
                tokens = slot.len,
                batch_sequences = plan.slots.len(),
                gate,
            );
            traceparent = telemetry::traceparent(&span);
            spans.push(span);
        }
        seq_steps.push(SeqStep {
            seq_id: s.id,
            start_position: slot.start as u32,
            num_tokens: slot.len as u32,
            sample: slot.sample,
            sampling: Some(SeqSampling {
                temperature: s.req.sampling.temperature,
                top_p: s.req.sampling.top_p,
                top_k: s.req.sampling.top_k as u32,
                seed: s.req.sampling.seed.unwrap_or(0),
                samples_drawn: s.generated.len() as u32,
            }),
            traceparent,
        });
    }
    let activations = if ids.is_empty() {
        None
    } else {
        let emb = ctx.model.embed(&ids)?;
        Some(codec::encode(&emb, v1::DType::Bf16)?)
    };
    Ok((
        StepRequest {
            step_id,
            seqs: seq_steps,
            activations,
            release,
        },
        spans,
    ))
}

/// Hands one sampled token to the sequence's client; true when the sequence is finished.
fn deliver(s: &mut Seq, r: &v1::SeqResult, ctx: &Ctx) -> bool {
    let token = r.token_id;
    s.generated.push(token);
    if s.ttft.is_none() {
        s.ttft = Some(s.start.elapsed());
    }
    let is_eos = !s.req.ignore_eos && ctx.eos.contains(&token);
    let (mut piece, stopped) = if is_eos {
        (String::new(), false)
    } else {
        match s.text.push(token) {
            Ok(x) => x,
            Err(e) => {
                let _ = s.tx.send(Err(Status::from(MeshError::from(e))));
                return true;
            }
        }
    };
    let seq_len = s.req.prompt_ids.len() + s.generated.len();
    let finish = finish_check(
        token,
        s.generated.len(),
        seq_len,
        &s.req,
        &ctx.eos,
        ctx.context_length,
        stopped,
    );
    if finish.is_some() && !stopped {
        match s.text.finish() {
            Ok(rest) => piece.push_str(&rest),
            Err(e) => tracing::warn!(error = %e, "detokenizer flush failed"),
        }
    }
    let mut msg = GenerateResponse {
        text: piece,
        token_ids: vec![token],
        logprobs: vec![r.logprob],
        finish_reason: v1::FinishReason::Unspecified as i32,
        usage: None,
    };
    if let Some(reason) = finish {
        msg.finish_reason = wire_reason(reason) as i32;
        let ttft_ms = s.ttft.unwrap_or_default().as_secs_f64() * 1e3;
        s.span.record("completion_tokens", s.generated.len());
        s.span.record("ttft_ms", ttft_ms);
        s.span.record("finish_reason", reason.as_str());
        msg.usage = Some(v1::Usage {
            prompt_tokens: s.req.prompt_ids.len() as u32,
            completion_tokens: s.generated.len() as u32,
            time_to_first_token_ms: s.ttft.unwrap_or_default().as_secs_f64() * 1e3,
        });
    }
    // A closed channel means the client left; the next step releases the sequence.
    let _ = s.tx.send(Ok(msg));
    finish.is_some()
}

pub fn wire_reason(r: FinishReason) -> v1::FinishReason {
    match r {
        FinishReason::Length => v1::FinishReason::Length,
        FinishReason::Stop => v1::FinishReason::Stop,
        FinishReason::Eos => v1::FinishReason::Eos,
        FinishReason::Cancelled => v1::FinishReason::Cancelled,
    }
}

fn fail_all(
    seqs: &mut HashMap<u64, Seq>,
    sched: &mut Scheduler,
    load: &AtomicUsize,
    status: Status,
) {
    for (id, s) in seqs.drain() {
        let _ = s.tx.send(Err(status.clone()));
        sched.remove(id);
        load.fetch_sub(1, Ordering::SeqCst);
    }
}
