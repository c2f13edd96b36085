//! The gate's engine thread: owns the dense model and every sequence's KV cache and sampler, and
//! runs one step at a time. Sequences are keyed by (frontend connection, sequence id); a
//! connection's sequences are freed when its stream ends. Runs on a dedicated OS thread because
//! model math is synchronous CPU (or device) work that must not block the async runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use moemesh_common::metrics::names;
use moemesh_common::telemetry::{self, TraceContext};
use moemesh_common::{MeshError, MeshResult, codec};
use moemesh_engine::serving::{PromptAsk, SlotSpec, StepRunner};
use moemesh_engine::{SamplerStart, SamplingParams};
use moemesh_proto::v1::{
    GateInfoResponse, LayerLoad, SeqCached, SeqPromptLogprobs, SeqResult, SeqStep, StepRequest,
    StepResponse,
};
use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use crate::remote_experts::RemoteExperts;

pub enum Command {
    /// A step, or a run of steps (`StepRequest::run_steps`): one answer a step, in order; the
    /// sender is dropped after the last (an error is always the last).
    Step {
        conn: u64,
        req: StepRequest,
        reply: mpsc::UnboundedSender<MeshResult<StepResponse>>,
        /// Set by the connection (`StepRequest::end_run`): the run ends after the step in
        /// progress.
        end_run: Arc<AtomicBool>,
    },
    /// The connection's stream ended: free all of its sequences.
    ReleaseConn { conn: u64 },
    Info {
        reply: oneshot::Sender<GateInfoResponse>,
    },
}

/// How many times a step is run again after a released device-ordered expert call.
const DEVICE_RETRIES: usize = 2;

/// A sequence: (frontend connection, its sequence id).
pub type Key = (u64, u64);

pub struct StepEngine {
    pub runner: StepRunner<Key>,
    pub experts: RemoteExperts,
    pub id: String,
    pub fingerprint: String,
    /// `--max-step-sequences`: the most sequences one step may carry.
    pub max_step_sequences: usize,
}

impl StepEngine {
    pub fn new(
        runner: StepRunner<Key>,
        experts: RemoteExperts,
        id: String,
        fingerprint: String,
    ) -> Self {
        StepEngine {
            runner,
            experts,
            id,
            fingerprint,
            max_step_sequences: usize::MAX,
        }
    }

    /// Serves commands until every sender is gone.
    pub fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.blocking_recv() {
            match cmd {
                Command::Step {
                    conn,
                    req,
                    reply,
                    end_run,
                } => {
                    let steps = match run_length(&req, self.runner.model().has_embeddings()) {
                        Ok(n) => n,
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                    };
                    let mut req = req;
                    for i in 0..steps {
                        let result = self.step_once(conn, &req);
                        // The run ends at its length, at an error, when the frontend asks, or
                        // when another command waits (another frontend's step: runs take
                        // turns step by step).
                        let last = i + 1 == steps
                            || result.is_err()
                            || end_run.load(Ordering::Acquire)
                            || !rx.is_empty();
                        let next = match &result {
                            Ok(resp) if !last => Some(next_in_run(&req, resp)),
                            _ => None,
                        };
                        let result = result.map(|mut r| {
                            r.run_continues = next.is_some();
                            r
                        });
                        if reply.send(result).is_err() {
                            break;
                        }
                        match next {
                            Some(n) => req = n,
                            None => break,
                        }
                    }
                }
                Command::ReleaseConn { conn } => {
                    let freed = self.runner.retain(|(c, _)| *c != conn);
                    self.record_kv();
                    tracing::debug!(conn, freed, "connection closed; KV freed");
                }
                Command::Info { reply } => {
                    let kv = self.runner.kv();
                    let _ = reply.send(GateInfoResponse {
                        id: self.id.clone(),
                        fingerprint: self.fingerprint.clone(),
                        live_sequences: self.runner.live() as u32,
                        kv_tokens: self.runner.kv_tokens(),
                        expert_workers: Vec::new(),
                        kv_blocks_free: kv.free_blocks as u32,
                        kv_blocks_total: kv.total_blocks as u32,
                        kv_block_tokens: kv.block_tokens as u32,
                        device: String::new(),
                        expert_transports: Vec::new(),
                        expert_load: layer_loads(self.experts.routed.totals()),
                        expert_load_window: layer_loads(self.experts.routed.windowed()),
                        load_window_secs: self.experts.routed.window().as_secs() as u32,
                        worker_experts: Vec::new(),
                        prefix_cache: self.runner.prefix_caching(),
                        host_kv_blocks: self.runner.host_tier_blocks() as u32,
                        // Filled in by the service, which knows the loaded model.
                        weights_dtype: String::new(),
                        weight_bytes: 0,
                        embeds_tokens: self.runner.model().has_embeddings(),
                        registry: String::new(),
                        // A run feeds each step the tokens the one before sampled: only where
                        // the gate embeds them.
                        max_run_steps: if self.runner.model().has_embeddings() {
                            MAX_RUN_STEPS
                        } else {
                            1
                        },
                    });
                }
            }
        }
    }

    /// One step with its span and metrics.
    fn step_once(&mut self, conn: u64, req: &StepRequest) -> MeshResult<StepResponse> {
        let started = Instant::now();
        let tokens: u64 = req.seqs.iter().map(|s| s.num_tokens as u64).sum();
        let (lead, _others) = step_spans(req);
        let result = lead.in_scope(|| self.step(conn, req));
        if let Err(e) = &result {
            lead.record("otel.status_code", "ERROR");
            lead.record("error", tracing::field::display(e));
        }
        if tokens > 0 {
            metrics::histogram!(names::GATE_STEP).record(started.elapsed().as_secs_f64());
            let outcome = if result.is_ok() { "ok" } else { "error" };
            metrics::counter!(names::GATE_STEPS, "outcome" => outcome).increment(1);
            if result.is_ok() {
                metrics::counter!(names::GATE_STEP_TOKENS).increment(tokens);
            }
        }
        self.record_kv();
        self.experts.routed.publish();
        result
    }

    /// Publishes the KV pool's and the sequence table's state.
    pub fn record_kv(&self) {
        let kv = self.runner.kv();
        let (free, total) = (kv.free_blocks, kv.total_blocks);
        metrics::gauge!(names::KV_FREE).set(free as f64);
        metrics::gauge!(names::KV_TOTAL).set(total as f64);
        metrics::gauge!(names::KV_USED).set(total.saturating_sub(free) as f64);
        metrics::gauge!(names::GATE_SEQUENCES).set(self.runner.live() as f64);
        let g = self.runner.graph_stats();
        metrics::counter!(names::GATE_GRAPH_REPLAYS).absolute(g.replayed);
        metrics::gauge!(names::GATE_GRAPHS).set(g.captured as f64);
        let p = self.runner.prefix_stats();
        metrics::counter!(names::PREFIX_LOOKUPS).absolute(p.lookups);
        metrics::counter!(names::PREFIX_QUERIED_BLOCKS).absolute(p.queried_blocks);
        metrics::counter!(names::PREFIX_HIT_BLOCKS).absolute(p.hit_blocks);
        metrics::counter!(names::PREFIX_HIT_TOKENS).absolute(p.hit_blocks * kv.block_tokens as u64);
        metrics::counter!(names::PREFIX_EVICTIONS).absolute(p.evictions);
        metrics::gauge!(names::PREFIX_CACHED_BLOCKS).set(p.cached_blocks as f64);
        let h = p.host;
        metrics::counter!(names::PREFIX_HOST_HIT_BLOCKS).absolute(h.hit_blocks);
        metrics::counter!(names::PREFIX_HOST_HIT_TOKENS)
            .absolute(h.hit_blocks * kv.block_tokens as u64);
        metrics::counter!(names::PREFIX_HOST_BYTES_TO_HOST).absolute(h.bytes_to_host);
        metrics::counter!(names::PREFIX_HOST_BYTES_TO_DEVICE).absolute(h.bytes_to_device);
        metrics::counter!(names::PREFIX_HOST_EVICTIONS).absolute(h.evictions);
        metrics::gauge!(names::PREFIX_HOST_BLOCKS).set(h.blocks as f64);
    }

    fn step(&mut self, conn: u64, req: &StepRequest) -> MeshResult<StepResponse> {
        for id in &req.release {
            self.runner.release(&(conn, *id));
        }
        if req.seqs.is_empty() {
            return Ok(self.response(req.step_id, Vec::new()));
        }
        let model = self.runner.model();
        let ids = step_ids(req)?;
        let hidden = if req.activations.is_none() {
            // The frontend sent token ids only (the gate's Info says it embeds them): the rows
            // are embedded here, on the gate's device.
            if ids.is_empty() {
                return Err(MeshError::Invalid(
                    "activations: absent, and not every sequence carries token_ids for its \
                     rows; a step needs one or the other"
                        .into(),
                ));
            }
            codec::check_step_seqs(req, self.max_step_sequences, ids.len(), "token_ids have")?;
            model.embed(&ids).map_err(|e| match e {
                moemesh_engine::EngineError::InvalidInput(why) => {
                    MeshError::Invalid(format!("seqs.token_ids: {why}"))
                }
                other => other.into(),
            })?
        } else {
            codec::decode_step(
                req,
                model.config().hidden_size,
                self.max_step_sequences,
                model.device(),
            )?
        };
        let slots = req
            .seqs
            .iter()
            .map(|s| {
                let cache_salt = match s.cache_salt.len() {
                    0 => None,
                    _ => Some(<[u8; 32]>::try_from(&s.cache_salt[..]).map_err(|_| {
                        MeshError::Invalid(format!(
                            "seqs: sequence {}: cache_salt has {} bytes; it is empty or a 32-byte digest",
                            s.seq_id,
                            s.cache_salt.len()
                        ))
                    })?),
                };
                let max_top = moemesh_engine::logprobs::MAX_TOP_LOGPROBS;
                if let Some(p) = s.sampling.as_ref().filter(|p| p.top_logprobs as usize > max_top) {
                    return Err(MeshError::Invalid(format!(
                        "seqs: sequence {}: sampling.top_logprobs is {}, the limit is {max_top}",
                        s.seq_id, p.top_logprobs
                    )));
                }
                Ok(SlotSpec {
                key: (conn, s.seq_id),
                start: s.start_position as usize,
                tokens: s.num_tokens as usize,
                sample: s.sample,
                sampling: s.sampling.as_ref().map(|p| SamplerStart {
                    params: SamplingParams {
                        temperature: p.temperature,
                        top_k: p.top_k as usize,
                        top_p: p.top_p,
                        seed: Some(p.seed),
                        min_p: p.min_p,
                        repetition_penalty: p.repetition_penalty,
                        presence_penalty: p.presence_penalty,
                        frequency_penalty: p.frequency_penalty,
                    },
                    drawn: p.samples_drawn,
                    prompt: p.prompt_ids.as_slice().into(),
                    generated: p.generated_ids.as_slice().into(),
                    min_new_tokens: p.min_new_tokens as usize,
                    suppressed: p.suppressed_ids.as_slice().into(),
                    top_logprobs: p.top_logprobs as usize,
                }),
                cache_salt,
                prompt_logprobs: s.prompt_logprobs.map(|top| PromptAsk {
                    top: top as usize,
                    targets: s.prompt_targets.clone(),
                }),
                allowed: (!s.allowed_tokens.is_empty())
                    .then(|| s.allowed_tokens.as_slice().into()),
            })
            })
            .collect::<MeshResult<Vec<SlotSpec<Key>>>>()?;
        // A step whose device-ordered expert call was released (a worker died, hung or left
        // mid-step) committed nothing; it runs again at once, its calls going to replicas or
        // the host path, so that no request sees the failure.
        let mut attempt = 0;
        let outputs = loop {
            // The expert placement stays as it is now for the whole step (every layer routes by
            // it); a registry update that lands meanwhile takes effect at the next step.
            let pool = self.experts.pool.clone();
            let _placement = pool.pin_step();
            match self
                .runner
                .step_tokens(&slots, &hidden, &ids, &self.experts)
            {
                Err(e) if self.experts.take_device_failure() && attempt < DEVICE_RETRIES => {
                    attempt += 1;
                    tracing::warn!(step = req.step_id, attempt, error = %e, "step failed on a released expert call; running it again");
                }
                other => break other?,
            }
        };
        let cached = self
            .runner
            .take_prefix_hits()
            .into_iter()
            .map(|(key, tokens)| SeqCached {
                seq_id: key.1,
                tokens: tokens as u32,
            })
            .collect();
        let results = outputs
            .into_iter()
            .map(|o| SeqResult {
                seq_id: o.key.1,
                token_id: o.token,
                logprob: o.logprob,
                top_ids: o.top.iter().map(|t| t.0).collect(),
                top_logprobs: o.top.iter().map(|t| t.1).collect(),
            })
            .collect();
        let prompt_logprobs = self
            .runner
            .take_prompt_logprobs()
            .into_iter()
            .map(|(key, lps)| SeqPromptLogprobs {
                seq_id: key.1,
                logprobs: lps.iter().map(codec::prompt_logprob_to_wire).collect(),
            })
            .collect();
        let mut resp = self.response(req.step_id, results);
        resp.cached = cached;
        resp.prompt_logprobs = prompt_logprobs;
        Ok(resp)
    }

    fn response(&self, step_id: u64, results: Vec<SeqResult>) -> StepResponse {
        let kv = self.runner.kv();
        StepResponse {
            step_id,
            run_continues: false,
            error: None,
            results,
            live_sequences: self.runner.live() as u32,
            kv_tokens: self.runner.kv_tokens(),
            kv_blocks_free: kv.free_blocks as u32,
            kv_blocks_total: kv.total_blocks as u32,
            kv_block_tokens: kv.block_tokens as u32,
            cached: Vec::new(),
            prompt_logprobs: Vec::new(),
        }
    }
}

/// The most steps one request's run may have (`StepRequest::run_steps`; the gate's Info
/// says it as `max_run_steps`).
pub const MAX_RUN_STEPS: u32 = 64;

/// How many steps `req` runs: its `run_steps` (0 is 1), checked: a run of more than one step
/// needs every sequence to decode one token and sample, with no prompt logprobs and no allowed
/// ids (the frontend's mask follows each token), and the gate to embed the tokens it feeds.
fn run_length(req: &StepRequest, embeds: bool) -> MeshResult<u32> {
    if req.end_run {
        return Err(MeshError::Invalid(
            "end_run: sent alone (no seqs, no release), while a run is answered; this request \
             carries a step"
                .into(),
        ));
    }
    let n = req.run_steps.max(1);
    if n == 1 {
        return Ok(1);
    }
    if req.seqs.is_empty() {
        return Err(MeshError::Invalid(format!(
            "run_steps is {n} for a step with no seqs; a run needs at least one sequence"
        )));
    }
    if n > MAX_RUN_STEPS {
        return Err(MeshError::Invalid(format!(
            "run_steps is {n}, the limit is {MAX_RUN_STEPS} (the gate's Info max_run_steps)"
        )));
    }
    if !embeds || req.activations.is_some() {
        return Err(MeshError::Invalid(
            "run_steps: a run needs token ids only (the gate embeds each step's sampled tokens); \
             this step carries activations or the gate does not embed tokens"
                .into(),
        ));
    }
    if let Some(s) = req.seqs.iter().find(|s| {
        s.num_tokens != 1
            || !s.sample
            || s.prompt_logprobs.is_some()
            || !s.allowed_tokens.is_empty()
            || s.token_ids.len() != 1
    }) {
        return Err(MeshError::Invalid(format!(
            "run_steps: sequence {} does not decode one token id and sample, or asks for prompt \
             logprobs or allowed tokens; a run of {n} steps takes only such sequences",
            s.seq_id
        )));
    }
    Ok(n)
}

/// The run's next step after `req` answered `resp`: every sequence one position on, fed the
/// token it sampled; nothing released again, sampling set up already.
fn next_in_run(req: &StepRequest, resp: &StepResponse) -> StepRequest {
    let sampled: std::collections::HashMap<u64, u32> = resp
        .results
        .iter()
        .map(|r| (r.seq_id, r.token_id))
        .collect();
    StepRequest {
        step_id: req.step_id,
        seqs: req
            .seqs
            .iter()
            .filter_map(|s| {
                let token = *sampled.get(&s.seq_id)?;
                Some(SeqStep {
                    start_position: s.start_position + s.num_tokens,
                    token_ids: vec![token],
                    sampling: None,
                    ..s.clone()
                })
            })
            .collect(),
        activations: None,
        release: Vec::new(),
        run_steps: 0,
        end_run: false,
    }
}

/// The step's token ids, one per activation row (for the prefix cache): every sequence's, or
/// none when no sequence sent them (a step that mixes the two caches none of them).
fn step_ids(req: &StepRequest) -> MeshResult<Vec<u32>> {
    if let Some(s) = req
        .seqs
        .iter()
        .find(|s| !s.token_ids.is_empty() && s.token_ids.len() != s.num_tokens as usize)
    {
        return Err(MeshError::Invalid(format!(
            "seqs: sequence {} has {} token_ids for {} tokens; send one id per row or none",
            s.seq_id,
            s.token_ids.len(),
            s.num_tokens
        )));
    }
    if req.seqs.iter().any(|s| s.token_ids.is_empty()) {
        return Ok(Vec::new());
    }
    Ok(req
        .seqs
        .iter()
        .flat_map(|s| s.token_ids.iter().copied())
        .collect())
}

/// The gate's spans for one step: a `step` span for every sequence whose `traceparent` is
/// sampled, each a child of that sequence's frontend `step` span. The step's shared work
/// (expert dispatch, sampling) happens once for the whole batch, so it goes under one of them,
/// the first (returned first, to be entered while the step runs); it links to the others' and
/// they to it. A step with no traced sequence gets no spans: the gate starts no trace itself.
fn step_spans(req: &StepRequest) -> (Span, Vec<Span>) {
    let traced: Vec<(u64, TraceContext)> = req
        .seqs
        .iter()
        .filter_map(|s| telemetry::remote_context(&s.traceparent).map(|cx| (s.seq_id, cx)))
        .collect();
    let Some(((lead_seq, lead_cx), rest)) = traced.split_first() else {
        return (Span::none(), Vec::new());
    };
    let tokens: u64 = req.seqs.iter().map(|s| u64::from(s.num_tokens)).sum();
    let span = |seq: u64, shared: bool| {
        tracing::debug_span!(
            parent: None,
            "step",
            otel.kind = "server",
            step = req.step_id,
            seq,
            batch_sequences = req.seqs.len(),
            batch_tokens = tokens,
            shared_work = shared,
            error = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        )
    };
    let lead = span(*lead_seq, true);
    telemetry::set_parent(&lead, lead_cx.clone());
    for (_, cx) in rest {
        telemetry::link(&lead, telemetry::remote_span_context(cx));
    }
    let lead_context = telemetry::span_context(&lead);
    let others = rest
        .iter()
        .map(|(seq, cx)| {
            let s = span(*seq, false);
            telemetry::set_parent(&s, cx.clone());
            telemetry::link(&s, lead_context.clone());
            s
        })
        .collect();
    (lead, others)
}

fn layer_loads(counts: crate::expert_load::Counts) -> Vec<LayerLoad> {
    counts
        .into_iter()
        .map(|(layer, tokens)| LayerLoad { layer, tokens })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use moemesh_proto::v1::SeqStep;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Keeps every finished span.
    #[derive(Debug, Clone, Default)]
    struct Keep(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Keep {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(batch);
            Ok(())
        }
    }

    const A: &str = "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-1111111111111111-01";
    const B: &str = "00-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-2222222222222222-01";
    const UNSAMPLED: &str = "00-cccccccccccccccccccccccccccccccc-3333333333333333-00";

    #[test]
    fn token_ids_come_one_per_row_for_every_sequence_or_not_at_all() {
        let seq = |seq_id, num_tokens, token_ids: Vec<u32>| SeqStep {
            seq_id,
            num_tokens,
            token_ids,
            ..Default::default()
        };
        let req = |seqs| StepRequest {
            seqs,
            ..Default::default()
        };
        let ids = step_ids(&req(vec![seq(1, 2, vec![5, 6]), seq(2, 1, vec![7])]));
        assert_eq!(ids.expect("valid"), vec![5, 6, 7]);
        // A sequence without ids: the step runs uncached.
        let ids = step_ids(&req(vec![seq(1, 2, vec![5, 6]), seq(2, 1, vec![])]));
        assert!(ids.expect("valid").is_empty());
        let err = step_ids(&req(vec![seq(1, 2, vec![5])])).expect_err("refused");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn a_run_takes_decoding_sequences_only_and_feeds_each_step_what_the_last_sampled() {
        let decode = |seq_id, start_position, token| SeqStep {
            seq_id,
            start_position,
            num_tokens: 1,
            sample: true,
            token_ids: vec![token],
            traceparent: "tp".into(),
            ..Default::default()
        };
        let run = |seqs, run_steps| StepRequest {
            step_id: 4,
            seqs,
            release: vec![9],
            run_steps,
            ..Default::default()
        };
        let ok = run(vec![decode(1, 10, 5), decode(2, 3, 6)], 8);
        assert_eq!(run_length(&ok, true).expect("a run"), 8);
        assert_eq!(run_length(&run(ok.seqs.clone(), 0), false).expect("one"), 1);
        let refused = |req: &StepRequest, embeds: bool, names: &str| {
            let e = run_length(req, embeds).expect_err("refused");
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains(names), "{}", status.message());
        };
        refused(
            &run(ok.seqs.clone(), MAX_RUN_STEPS + 1),
            true,
            "the limit is 64",
        );
        refused(&run(Vec::new(), 2), true, "no seqs");
        let ended = StepRequest {
            end_run: true,
            ..run(ok.seqs.clone(), 0)
        };
        refused(&ended, true, "end_run");
        refused(&ok, false, "embeds");
        let mut prefill = decode(3, 0, 7);
        prefill.num_tokens = 2;
        prefill.token_ids = vec![7, 8];
        refused(&run(vec![decode(1, 10, 5), prefill], 2), true, "sequence 3");
        let mut masked = decode(4, 2, 7);
        masked.allowed_tokens = vec![1];
        refused(&run(vec![masked], 2), true, "sequence 4");
        let mut quiet = decode(5, 2, 7);
        quiet.sample = false;
        refused(&run(vec![quiet], 2), true, "sequence 5");

        // The next step: one position on, the sampled token, nothing released again; a
        // sequence without a token (none sampled) is left out.
        let resp = StepResponse {
            results: vec![SeqResult {
                seq_id: 2,
                token_id: 42,
                ..Default::default()
            }],
            ..Default::default()
        };
        let next = next_in_run(&ok, &resp);
        assert_eq!(next.seqs.len(), 1);
        let s = &next.seqs[0];
        assert_eq!((s.seq_id, s.start_position, s.num_tokens), (2, 4, 1));
        assert_eq!(s.token_ids, vec![42]);
        assert!(s.sample && s.sampling.is_none() && s.traceparent == "tp");
        assert!(next.release.is_empty() && next.run_steps == 0 && next.step_id == 4);
    }

    #[test]
    fn each_traced_sequence_gets_a_gate_span_and_the_shared_work_goes_under_the_first() {
        let keep = Keep::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(keep.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let seq = |seq_id, traceparent: &str| SeqStep {
            seq_id,
            num_tokens: 1,
            traceparent: traceparent.into(),
            ..Default::default()
        };
        let req = StepRequest {
            step_id: 9,
            seqs: vec![seq(1, ""), seq(2, A), seq(3, UNSAMPLED), seq(4, B)],
            ..Default::default()
        };
        tracing::subscriber::with_default(subscriber, || {
            let (lead, others) = step_spans(&req);
            lead.in_scope(|| {
                let _sampling = moemesh_common::child_span!("sampling").entered();
            });
            // Outside a traced step the same work makes no span (and starts no trace).
            let _untraced = moemesh_common::child_span!("sampling").entered();
            drop((lead, others));
            // A step with no sampled context has no spans at all.
            let (lead, others) = step_spans(&StepRequest {
                seqs: vec![seq(1, ""), seq(3, UNSAMPLED)],
                ..req.clone()
            });
            assert!(lead.is_none() && others.is_empty());
        });
        let spans = keep.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let of_trace = |name: &str, trace: &str| {
            spans
                .iter()
                .filter(|s| s.name == name && s.span_context.trace_id().to_string() == trace)
                .collect::<Vec<_>>()
        };
        assert_eq!(spans.iter().filter(|s| s.name == "step").count(), 2);
        let lead = of_trace("step", &"a".repeat(32));
        let other = of_trace("step", &"b".repeat(32));
        assert_eq!((lead.len(), other.len()), (1, 1));
        let (lead, other) = (lead[0], other[0]);
        // Each under its own sequence's frontend span.
        assert_eq!(lead.parent_span_id.to_string(), "1111111111111111");
        assert_eq!(other.parent_span_id.to_string(), "2222222222222222");
        // Linked both ways.
        assert!(
            lead.links
                .iter()
                .any(|l| l.span_context.span_id().to_string() == "2222222222222222")
        );
        assert!(
            other
                .links
                .iter()
                .any(|l| l.span_context.span_id() == lead.span_context.span_id())
        );
        // The shared work is under the first traced sequence's gate span only.
        let sampling: Vec<&SpanData> = spans.iter().filter(|s| s.name == "sampling").collect();
        assert_eq!(sampling.len(), 1);
        assert_eq!(sampling[0].parent_span_id, lead.span_context.span_id());
        assert_eq!(
            sampling[0].span_context.trace_id(),
            lead.span_context.trace_id()
        );
    }
}
