//! `Generation.Generate`, `Tokenize` and `ModelInfo`, and the frontend's life cycle.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use moemesh_common::layers::Pending;
use moemesh_common::metrics::names;
use moemesh_common::registry::{Member, Registry, RegistryConfig, Role};
use moemesh_common::{MeshError, MeshResult, metrics as mesh_metrics, serve, telemetry};
use moemesh_engine::prefix_cache::BlockHash;
use moemesh_engine::serving::SequenceDecoder;
use moemesh_engine::weights::LoadedBytes;
use moemesh_engine::{Arch, DType, Device, ModelFiles, Parts};
use moemesh_proto::v1::generation_server::{Generation, GenerationServer};
use moemesh_proto::v1::{
    AbortRequest, AbortResponse, CompleteResponse, GenerateRequest, GenerateResponse, MemberInfo,
    ModelInfoRequest, ModelInfoResponse, TokenizeRequest, TokenizeResponse, Usage,
    tokenize_request,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use crate::abort::Running;
use crate::audit::{AuditLog, Audited, Trail};
use crate::auth::{ApiKeys, AuthLayer, KeyId, KeyStreams};
use crate::config::FrontendConfig;
use crate::gate_link::{Ctx, GateLink, NewSeq};
use crate::{metered, request};

/// `--max-message-mb` when not given: a public request is text or token ids, far below this.
const DEFAULT_MAX_MESSAGE_MB: usize = 4;
/// The public calls that run a generation (streamed and whole), which load shedding bounds and
/// the request metrics count.
const GENERATE_PATHS: &[&str] = &[
    "/moemesh.v1.Generation/Generate",
    "/moemesh.v1.Generation/Complete",
];
/// How long a request waits for a gate to appear before UNAVAILABLE.
const GATE_WAIT: Duration = Duration::from_secs(5);
/// How long a gate whose stream broke is passed over while another is listed.
const FAILED_GATE_BACKOFF: Duration = Duration::from_secs(10);

struct Frontend {
    cfg: FrontendConfig,
    ctx: Arc<Ctx>,
    name: String,
    fingerprint: String,
    /// The checkpoint's weight format, for ModelInfo.
    weights_dtype: String,
    arch: &'static str,
    gates: watch::Receiver<Vec<Member>>,
    experts: watch::Receiver<Vec<Member>>,
    /// Step loops by gate address, created when a gate first appears.
    links: Mutex<BTreeMap<String, GateLink>>,
    /// Where gate links hand sequences whose gate died.
    reroute: crate::gate_link::Reroute,
    seed: AtomicU64,
    /// `--audit-log`, when given.
    audit: Option<AuditLog>,
    /// The running requests that have a request_id, for `Abort`.
    running: Arc<Running>,
}

impl Frontend {
    /// The live gate for a request whose prompt's blocks are named `prefix` ([`choose_gate`]:
    /// the one believed to hold the longest prefix unless it is too busy, else the fewest
    /// sequences, then the most free KV), avoiding `avoid` and gates whose stream broke
    /// recently; waits a little for one when none is listed (a gate restarting, or the
    /// registry catching up), then UNAVAILABLE.
    async fn pick_gate(&self, avoid: Option<&str>, prefix: &[BlockHash]) -> MeshResult<GateLink> {
        let mut rx = self.gates.clone();
        let usable = |g: &Vec<Member>| g.iter().any(|m| Some(m.address.as_str()) != avoid);
        let _ = tokio::time::timeout(GATE_WAIT, rx.wait_for(usable)).await;
        let gates: Vec<Member> = rx
            .borrow()
            .iter()
            .filter(|m| Some(m.address.as_str()) != avoid)
            .cloned()
            .collect();
        if gates.is_empty() {
            return Err(MeshError::Unavailable("no gate is available".into()));
        }
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links.retain(|addr, l| !l.is_closed() || gates.iter().any(|g| &g.address == addr));
        let mut usable = Vec::with_capacity(gates.len());
        for g in &gates {
            let link = links
                .entry(g.address.clone())
                .or_insert_with(|| {
                    GateLink::spawn(g.address.clone(), self.ctx.clone(), self.reroute.clone())
                })
                .clone();
            if link.recently_failed(FAILED_GATE_BACKOFF) && gates.len() > 1 {
                continue;
            }
            usable.push(link);
        }
        let margin = self
            .cfg
            .prefix_routing
            .then_some(self.cfg.prefix_routing_margin);
        let loads: Vec<GateLoad> = usable
            .iter()
            .map(|l| GateLoad {
                prefix_blocks: if margin.is_some() {
                    l.prefix_blocks(prefix)
                } else {
                    0
                },
                load: l.load.load(Ordering::SeqCst),
                free_kv: l.free_kv.load(Ordering::Relaxed),
            })
            .collect();
        choose_gate(&loads, margin)
            .and_then(|i| usable.get(i).cloned())
            .ok_or_else(|| MeshError::Unavailable("no gate is available".into()))
    }

    fn member_info(m: &Member) -> MemberInfo {
        MemberInfo {
            id: m.id.clone(),
            address: m.address.clone(),
            layers: m.layers.clone(),
            experts: m.experts.clone(),
            device: m.device.clone(),
        }
    }
}

#[derive(Clone)]
struct GenerationService(Arc<Frontend>);

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

impl GenerationService {
    /// Validates and tokenizes a Generate request and hands it to a gate's step loop; the
    /// returned stream carries its tokens. `trail` gets the prompt once it is known.
    async fn start_generate(
        &self,
        request: Request<GenerateRequest>,
        start: Instant,
        trail: Option<&mut Trail>,
        span: &tracing::Span,
    ) -> Result<Response<GenerateStream>, Status> {
        let f = &self.0;
        let deadline = grpc_timeout(request.metadata()).map(|t| start + t);
        let key = request.extensions().get::<KeyId>().map(|k| k.0.clone());
        let pending = request.extensions().get::<Pending>().cloned();
        let key_streams = request.extensions().get::<KeyStreams>().cloned();
        let req = request.into_inner();
        // Not one that validation will refuse for its length: that stays off the span too.
        if req.request_id.len() <= request::MAX_REQUEST_ID_BYTES {
            span.record("request_id", req.request_id.as_str());
        }
        let seed = f.seed.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        let (choices, rendered) = {
            let _tokenize = tracing::debug_span!(parent: span, "tokenize").entered();
            let (engine_req, rendered) = request::to_engine_request(
                &req,
                &f.cfg,
                f.ctx.model.config(),
                f.ctx.tokenizer.as_ref(),
                seed,
            )?;
            // One sequence per choice; choice i draws from seed + i (vLLM's rule for n > 1).
            let mut choices = Vec::new();
            for i in 0..request::choices(&req) {
                let mut choice = engine_req.clone();
                choice.sampling.seed = engine_req
                    .sampling
                    .seed
                    .map(|s| s.wrapping_add(u64::from(i)));
                if i > 0 {
                    // The prompt's logprobs come once, with choice 0.
                    choice.prompt_logprobs = None;
                }
                let decoder = SequenceDecoder::new(
                    &choice,
                    f.ctx.tokenizer.as_ref(),
                    f.ctx.eos.clone(),
                    f.ctx.context_length,
                )
                .map_err(MeshError::from)?;
                choices.push((choice, decoder));
            }
            (choices, rendered)
        };
        // Before any work: the permits of its further choices.
        let n = choices.len() as u32;
        let more = more_permits(n, pending.as_ref(), key_streams.as_ref())?;
        let prompt_len = choices.first().map_or(0, |(r, _)| r.prompt_ids.len());
        span.record("prompt_tokens", prompt_len);
        if let Some(trail) = trail {
            let (bytes, text) = request::audit_prompt(&req, &rendered);
            trail.prompt(&bytes, text, prompt_len);
        }
        tracing::debug!(request_id = %req.request_id, prompt_tokens = prompt_len, choices = choices.len(), "generate");
        // The choices share one stream (their messages carry their index), one gate (so the
        // later ones find the prompt in its prefix cache) and one abort flag.
        let (tx, rx) = mpsc::unbounded_channel();
        // Abortable from here on, while it waits for a gate too.
        let (aborted, registered) = f.running.register(key.clone(), &req.request_id);
        let cache_salt = request::cache_salt(key.as_deref(), &req.cache_salt);
        let prompt = choices.first().map_or(&[][..], |(r, _)| &r.prompt_ids[..]);
        let prefix = request::prefix_chain(&f.fingerprint, cache_salt, prompt);
        let link = f.pick_gate(None, &prefix).await?;
        for (index, (choice, decoder)) in (0u32..).zip(choices) {
            let queued = link.submit(NewSeq {
                req: choice,
                cache_salt,
                prefix: prefix.clone(),
                request_id: req.request_id.clone(),
                index,
                aborted: aborted.clone(),
                decoder,
                tx: tx.clone(),
                start,
                deadline,
                generated: Vec::new(),
                ttft: None,
                queue: crate::gate_link::queue_span(span),
                span: span.clone(),
            });
            if queued.is_err() {
                let msg = format!("gate {} is not accepting work", link.address);
                return Err(MeshError::Unavailable(msg).into());
            }
        }
        drop(tx);
        metrics::counter!(names::PROMPT_TOKENS).increment(prompt_len as u64);
        let stream =
            metered::Metered::new(UnboundedReceiverStream::new(rx), start, span.clone(), n)
                // Abort can find the request for as long as its stream is open, and its
                // choices count against the limits as long.
                .map(move |m| {
                    let _running = (&registered, &more);
                    m
                });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// What the frontend knows of a gate when it places a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GateLoad {
    /// Blocks of the request's prompt the gate is believed to hold (from the first).
    prefix_blocks: usize,
    /// Sequences running or queued there.
    load: usize,
    /// Its free KV blocks as last reported.
    free_kv: usize,
}

/// Which of `gates` a new request goes to. With prefix routing on (`margin`: how many more
/// sequences than the least loaded gate a prefix holder may have, `--prefix-routing-margin`),
/// the gate believed to hold the longest prefix of its prompt, unless its load exceeds the
/// least loaded gate's by more than the margin; otherwise (and among equal prefixes) the fewest
/// sequences, then the most free KV. `None` when there is no gate.
fn choose_gate(gates: &[GateLoad], margin: Option<usize>) -> Option<usize> {
    let by_load = |g: &GateLoad| (g.load, std::cmp::Reverse(g.free_kv));
    let least = (0..gates.len()).min_by_key(|&i| by_load(&gates[i]))?;
    let Some(margin) = margin else {
        return Some(least);
    };
    let floor = gates[least].load.saturating_add(margin);
    let holder = (0..gates.len())
        .filter(|&i| gates[i].prefix_blocks > 0 && gates[i].load <= floor)
        .min_by_key(|&i| {
            (
                std::cmp::Reverse(gates[i].prefix_blocks),
                by_load(&gates[i]),
            )
        });
    Some(holder.unwrap_or(least))
}

/// A request for `n` choices is `n` sequences on a gate, so it counts as `n` requests against
/// `--max-pending` and as `n` streams against its key's `max_streams`, as vLLM's `max_num_seqs`
/// counts each sequence of a request: the door took one permit of each, this takes the other
/// `n - 1` (held while the request runs). A request for more choices than a limit has in all is
/// INVALID_ARGUMENT naming `sampling.n` and the limit; one that does not fit now is
/// RESOURCE_EXHAUSTED, as a request over the limit at the door is.
fn more_permits(
    n: u32,
    pending: Option<&Pending>,
    key: Option<&KeyStreams>,
) -> MeshResult<Vec<tokio::sync::OwnedSemaphorePermit>> {
    let limits = [
        pending.map(|p| (&p.0, "requests at once on this server (--max-pending)")),
        key.map(|k| {
            (
                &k.0,
                "Generate streams at once for this API key (max_streams)",
            )
        }),
    ];
    let mut held = Vec::new();
    for (more, what) in limits.into_iter().flatten() {
        if n as usize > more.limit {
            return Err(MeshError::Invalid(format!(
                "sampling.n: {n} choices count as {n} requests, and at most {} {what} may run",
                more.limit
            )));
        }
        held.extend(more.try_take(n.saturating_sub(1))?);
    }
    Ok(held)
}

#[tonic::async_trait]
impl Generation for GenerationService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        // The request's trace: its root, unless the caller sent a `traceparent` of its own.
        let span = tracing::info_span!(
            parent: None,
            "generate",
            otel.kind = "server",
            request_id = tracing::field::Empty,
            prompt_tokens = tracing::field::Empty,
            completion_tokens = tracing::field::Empty,
            ttft_ms = tracing::field::Empty,
            finish_reason = tracing::field::Empty,
            grpc_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if let Some(cx) = telemetry::metadata_context(request.metadata()) {
            telemetry::set_parent(&span, cx);
        }
        let start = Instant::now();
        let choices = request::choices(request.get_ref());
        let mut trail = self.0.audit.as_ref().map(|log| {
            let key = request.extensions().get::<KeyId>().map(|k| &*k.0);
            log.generate(key, &request.get_ref().request_id, start)
        });
        let result = self
            .start_generate(request, start, trail.as_mut(), &span)
            .await;
        match (result, trail) {
            (Err(status), trail) => {
                metered::record_end(&span, status.code());
                if let Some(mut t) = trail {
                    t.end(status.code(), None);
                }
                Err(status)
            }
            (Ok(stream), Some(trail)) => {
                Ok(stream.map(|s| Box::pin(Audited::new(s, trail, choices)) as GenerateStream))
            }
            (Ok(stream), None) => Ok(stream),
        }
    }

    async fn complete(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let request_id = request.get_ref().request_id.clone();
        let stream = self.generate(request).await?.into_inner();
        Ok(Response::new(whole(stream, request_id).await?))
    }

    async fn abort(
        &self,
        request: Request<AbortRequest>,
    ) -> Result<Response<AbortResponse>, Status> {
        let key = request.extensions().get::<KeyId>().map(|k| k.0.clone());
        let id = &request.get_ref().request_id;
        if id.is_empty() {
            return Err(MeshError::Invalid(
                "request_id: empty; give the request_id the request to abort was sent with".into(),
            )
            .into());
        }
        match self.0.running.abort(key.clone(), id) {
            0 => {
                let whose = if key.is_some() {
                    " of this API key"
                } else {
                    ""
                };
                Err(MeshError::NotFound(format!(
                    "request_id {id:?}: no running request{whose} has this id (it finished, or never ran)"
                ))
                .into())
            }
            n => {
                tracing::info!(request_id = %id, requests = n, "aborting");
                Ok(Response::new(AbortResponse { aborted: n as u32 }))
            }
        }
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let f = &self.0;
        let (prompt, chat) = match &request.get_ref().input {
            Some(tokenize_request::Input::Prompt(p)) => (Some(p.as_str()), None),
            Some(tokenize_request::Input::Chat(c)) => (None, Some(c)),
            None => (None, None),
        };
        let (ids, rendered) = request::tokenize(
            prompt,
            chat,
            f.ctx.tokenizer.as_ref(),
            f.cfg.max_prompt_bytes,
        )?;
        Ok(Response::new(TokenizeResponse { ids, rendered }))
    }

    async fn model_info(
        &self,
        _: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        let f = &self.0;
        let cfg = f.ctx.model.config();
        Ok(Response::new(ModelInfoResponse {
            model_name: f.name.clone(),
            architecture: f.arch.to_string(),
            context_length: cfg.max_position_embeddings as u32,
            vocab_size: cfg.vocab_size as u32,
            has_tokenizer: f.ctx.tokenizer.is_some(),
            fingerprint: f.fingerprint.clone(),
            gates: f.gates.borrow().iter().map(Frontend::member_info).collect(),
            expert_workers: f
                .experts
                .borrow()
                .iter()
                .map(Frontend::member_info)
                .collect(),
            max_new_tokens_limit: f.cfg.max_new_tokens_limit,
            eos_token_ids: f.ctx.eos.to_vec(),
            bos_token_id: f
                .ctx
                .tokenizer
                .as_ref()
                .and_then(|t| t.bos_token().and_then(|b| t.token_to_id(b))),
            version: env!("CARGO_PKG_VERSION").to_string(),
            weights_dtype: f.weights_dtype.clone(),
        }))
    }
}

pub async fn run(
    cfg: FrontendConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> MeshResult<()> {
    if cfg.etcd.is_empty() && cfg.gate_addrs.is_empty() {
        return Err(MeshError::Invalid(
            "the frontend needs gates: give --etcd (registry) or --gate-addrs (static list)".into(),
        ));
    }
    if cfg.default_max_new_tokens == 0 || cfg.default_max_new_tokens > cfg.max_new_tokens_limit {
        return Err(MeshError::Invalid(format!(
            "--default-max-new-tokens must be between 1 and --max-new-tokens-limit ({})",
            cfg.max_new_tokens_limit
        )));
    }
    if cfg.max_running == 0 || cfg.step_token_budget.is_some_and(|b| b < cfg.max_running) {
        return Err(MeshError::Invalid(format!(
            "--step-token-budget ({}) must be at least --max-running ({}), which must be at least 1, so every running decode fits in a step",
            cfg.step_token_budget.unwrap_or(0),
            cfg.max_running
        )));
    }
    cfg.limits.validate().map_err(MeshError::Invalid)?;
    // The transport and the keys file are checked before anything is loaded.
    let frontend_tls = cfg.tls.load(moemesh_common::tls::ClientAuth::Optional)?;
    let public_tls = if cfg.public_plaintext {
        None
    } else {
        frontend_tls.clone()
    };
    let api_keys = cfg
        .api_keys_file
        .as_deref()
        .map(ApiKeys::load)
        .transpose()?;
    let local = listener
        .local_addr()
        .map_err(|e| MeshError::Internal(e.to_string()))?;
    // First, so that everything started below records into it.
    let metrics_server = mesh_metrics::start(&cfg.metrics).await?;
    let model_dir = cfg.model.clone();
    let weights_dtype = cfg.weights_dtype;
    let (files, model) = tokio::task::spawn_blocking(move || {
        let files =
            ModelFiles::open_or_embedded(model_dir.as_deref())?.with_experts_dtype(weights_dtype);
        let loader = files.loader(&Device::Cpu, DType::BF16);
        let model = moemesh_engine::DeepSeekModel::load(
            &files.config,
            &loader,
            Parts {
                embeddings: true,
                decoder: false,
            },
        );
        let loaded = loader.loaded_bytes();
        drop(loader);
        let model = model?;
        // The memory plan line: the embedding table, in host memory.
        tracing::info!(
            role = "frontend",
            device = "cpu",
            weights_format = %files.weights_format(),
            weight_bytes = loaded.resident_total(),
            resident = %LoadedBytes::describe(&loaded.resident),
            checkpoint = %LoadedBytes::describe(&loaded.checkpoint),
            "memory plan"
        );
        Ok::<_, moemesh_engine::EngineError>((files, model))
    })
    .await
    .map_err(|e| MeshError::Internal(e.to_string()))??;

    let eos = moemesh_engine::serving::eos_ids(&files.config, files.tokenizer.as_ref());
    let static_gates = cfg
        .gate_addrs
        .iter()
        .map(|a| Member {
            id: format!("gate-{a}"),
            role: Role::Gate,
            address: a.clone(),
            layers: Vec::new(),
            experts: Vec::new(),
            layer_experts: Vec::new(),
            device: String::new(),
            fingerprint: files.fingerprint.clone(),
            version: String::new(),
        })
        .collect();
    let registry = Registry::new(
        &RegistryConfig {
            etcd: cfg.etcd.clone(),
            cluster: cfg.cluster.clone(),
            model: files.name.clone(),
            lease_ttl_s: 5,
            tls: frontend_tls.clone(),
        },
        static_gates,
    )?;
    let gates = same_model(
        registry
            .watch_synced(Role::Gate, Duration::from_secs(10))
            .await,
        files.fingerprint.clone(),
    );
    let experts = registry
        .watch_synced(Role::Expert, Duration::from_secs(10))
        .await;
    let (audit, audit_writer) = match &cfg.audit_log {
        Some(target) => {
            let (log, writer) = AuditLog::open(target, cfg.audit_log_text)?;
            (Some(log), Some(writer))
        }
        None => (None, None),
    };
    let (reroute_tx, mut reroute_rx) = mpsc::unbounded_channel::<(String, NewSeq)>();
    let frontend = Arc::new(Frontend {
        ctx: Arc::new(Ctx {
            limits: moemesh_engine::serving::Limits {
                token_budget: cfg
                    .step_token_budget
                    .unwrap_or(moemesh_engine::serving::CPU_STEP_TOKEN_BUDGET)
                    .max(cfg.max_running),
                max_running: cfg.max_running,
                max_skips: 8,
            },
            context_length: files.config.max_position_embeddings,
            model,
            tokenizer: files.tokenizer.clone(),
            eos: eos.into(),
            next_seq: AtomicU64::new(1),
            tls: frontend_tls,
            gpu_token_budget: cfg
                .step_token_budget
                .unwrap_or(moemesh_engine::serving::GPU_STEP_TOKEN_BUDGET)
                .max(cfg.max_running),
            step_timeout: Duration::from_secs(cfg.step_timeout),
            connect_timeout: Duration::from_millis(cfg.gate_connect_timeout_ms),
            run_steps: cfg.decode_run_steps,
        }),
        name: files.name.clone(),
        fingerprint: files.fingerprint.clone(),
        weights_dtype: files.weights_format(),
        arch: match files.config.arch {
            Arch::V3 => "deepseek_v3",
            Arch::V2 => "deepseek_v2",
        },
        gates,
        experts,
        links: Mutex::new(BTreeMap::new()),
        reroute: reroute_tx,
        seed: AtomicU64::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x1234_5678),
        ),
        audit: audit.clone(),
        running: Arc::default(),
        cfg,
    });

    // Sequences of a failed gate go to another live gate (or fail with UNAVAILABLE).
    let weak = Arc::downgrade(&frontend);
    tokio::spawn(async move {
        while let Some((from, seq)) = reroute_rx.recv().await {
            let Some(f) = weak.upgrade() else { break };
            let fail = |seq: NewSeq, msg: String| {
                let _ = seq.tx.send(Err(MeshError::Unavailable(msg).into()));
            };
            match f.pick_gate(Some(&from), &seq.prefix.clone()).await {
                Ok(link) => {
                    if let Err(seq) = link.submit(seq) {
                        fail(
                            *seq,
                            format!(
                                "gate {from} failed and gate {} is not accepting work",
                                link.address
                            ),
                        );
                    }
                }
                Err(e) => fail(
                    seq,
                    format!("gate {from} failed and no other gate is available: {e}"),
                ),
            }
        }
    });
    let (reporter, health, reflection) = serve::health_and_reflection("moemesh.v1.Generation");
    let gate_health = reporter.clone();
    let mut usable_gates = frontend.gates.clone();
    // Load shedding at the door: at most --max-pending Generate streams open at once; the permit
    // is held by each response stream until it ends.
    let max_pending = frontend.cfg.max_pending;
    let drain_timeout = frontend.cfg.drain_timeout;
    let shed = moemesh_common::layers::InflightLimitLayer::new(
        GENERATE_PATHS,
        max_pending,
        format!(
            "server is at capacity: {max_pending} requests are running or waiting (--max-pending); retry later"
        ),
    );
    let limits = frontend.cfg.limits.clone();
    let max_message = limits.max_message_bytes(DEFAULT_MAX_MESSAGE_MB);
    // Before shedding: a call without a valid key takes no load-shedding permit.
    let auth = AuthLayer::new(api_keys, audit);
    let http = match frontend.cfg.http_listen {
        Some(addr) => Some(serve_http(addr, frontend.clone(), auth.clone(), shed.clone()).await?),
        None => None,
    };
    // The edge layer (outermost) counts every Generate call by its final status, whatever
    // answered it: the limits, the key checks, load shedding, the codec, or the handler.
    let router = limits
        .server_counting(GENERATE_PATHS, metered::count_request)
        .layer(auth)
        .layer(shed)
        .add_service(health)
        .add_service(reflection.0)
        .add_service(reflection.1)
        .add_service(
            GenerationServer::new(GenerationService(frontend))
                .max_decoding_message_size(max_message),
        );
    let incoming = limits.incoming(moemesh_common::tls::incoming(listener, public_tls));
    // The frontend does not register: gates and clients find it by its address.
    let serving = serve::Serving::start(reporter, |stop| {
        router.serve_with_incoming_shutdown(incoming, stop)
    })
    .await;
    // Ready only while there is a gate of this model to send work to: a frontend without one
    // would accept every Generate and fail it UNAVAILABLE.
    let follow_gates = tokio::spawn(async move {
        loop {
            let usable = !usable_gates.borrow_and_update().is_empty();
            if !usable {
                tracing::warn!(
                    "no gate of this model is registered: health NOT_SERVING until one is"
                );
            }
            serve::set_health(&gate_health, usable).await;
            if usable_gates.changed().await.is_err() {
                break;
            }
        }
    });
    tracing::info!(address = %local, model = %files.name, "frontend serving");
    serve::announce_ready("frontend", local, "frontend", metrics_server.as_ref());
    shutdown.await;
    follow_gates.abort();
    if let Some(http) = http {
        // New HTTP connections are refused; running completions end with the gRPC ones.
        let _ = http.stop.send(());
    }
    // Graceful: new calls are refused (GOAWAY), accepted streams run to their end, bounded.
    tracing::info!(
        drain_timeout_s = drain_timeout,
        "shutting down: draining accepted streams"
    );
    serving
        .stop_then_drain(Duration::from_secs(drain_timeout), "Generate streams")
        .await;
    if let Some(writer) = audit_writer {
        // The server is gone, and with it every handle on the log: its last lines get written.
        let _ = serve::bounded(Duration::from_secs(2), writer.finished()).await;
    }
    Ok(())
}

/// The OpenAI-compatible HTTP API's server.
struct HttpApi {
    stop: tokio::sync::oneshot::Sender<()>,
}

/// Binds `--http-listen` and serves the OpenAI-compatible API there: every completion is a
/// Generate call into `frontend`, checked by `auth` as a gRPC call is, and holding one of the
/// `--max-pending` permits of `shed` (shared with gRPC) until its stream ends.
async fn serve_http(
    addr: std::net::SocketAddr,
    frontend: Arc<Frontend>,
    auth: AuthLayer,
    shed: moemesh_common::layers::InflightLimitLayer,
) -> MeshResult<HttpApi> {
    let listener = frontend
        .cfg
        .limits
        .bind(addr)
        .map_err(|e| MeshError::Invalid(format!("--http-listen {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| MeshError::Internal(format!("--http-listen {addr}: {e}")))?;
    let service = GenerationService(frontend.clone());
    let generate: crate::openai::Generator = Arc::new(move |req, headers| {
        let (service, auth, shed) = (service.clone(), auth.clone(), shed.clone());
        Box::pin(async move {
            let passed = auth.check_http("Generate", &headers)?;
            // After the key check, as on gRPC: a call without a valid key takes no permit.
            let pending = shed
                .try_acquire()
                .inspect_err(|s| metered::count_request(s.code()))?;
            let mut request = Request::from_parts(
                tonic::metadata::MetadataMap::from_headers(headers),
                tonic::Extensions::default(),
                req,
            );
            // What the gRPC layers put there: the handles for a request's further choices.
            request.extensions_mut().insert(shed.more());
            let mut permit = None;
            if let Some(p) = passed {
                request.extensions_mut().insert(p.key);
                if let Some(more) = p.more {
                    request.extensions_mut().insert(more);
                }
                permit = p.permit;
            }
            let stream = service.generate(request).await?.into_inner();
            // The key's stream permit and the --max-pending one are held until the stream is
            // dropped.
            Ok(stream
                .map(move |m| {
                    let _held = (&permit, &pending);
                    m
                })
                .boxed())
        })
    });
    let gates = frontend.gates.clone();
    let tokenizer = frontend.ctx.tokenizer.clone();
    let token_text = Arc::new(move |id: u32| match &tokenizer {
        Some(t) => t.decode(&[id], false).unwrap_or_else(|_| format!("[{id}]")),
        None => format!("[{id}]"),
    });
    let app = crate::openai::router(crate::openai::Api {
        model: frontend.name.clone(),
        generate,
        ready: Arc::new(move || !gates.borrow().is_empty()),
        reasoning: frontend.cfg.reasoning_parser != "none",
        max_body_bytes: frontend.cfg.max_prompt_bytes.saturating_mul(2) + (1 << 20),
        token_text,
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the HTTP API stopped");
        }
    });
    tracing::info!(address = %local, "OpenAI-compatible HTTP API serving");
    println!(
        "{}",
        serde_json::json!({"event": "listening", "api": "openai-http", "address": local.to_string()})
    );
    Ok(HttpApi { stop })
}

/// The gates of `all` whose model fingerprint is ours, kept current. A gate serving other
/// weights under the same registry prefix (a model version rolled in place) would decode this
/// frontend's embeddings with the wrong model, so it is refused, and the refusal logged once.
fn same_model(
    mut all: watch::Receiver<Vec<Member>>,
    fingerprint: String,
) -> watch::Receiver<Vec<Member>> {
    let split = move |list: &[Member],
                      refused: &mut std::collections::HashSet<(String, String)>| {
        let mut keep = Vec::new();
        for m in list {
            if m.fingerprint == fingerprint {
                keep.push(m.clone());
            } else if refused.insert((m.id.clone(), m.fingerprint.clone())) {
                tracing::error!(
                    gate = %m.id, address = %m.address, theirs = %m.fingerprint, ours = %fingerprint,
                    "refusing a gate of a different model fingerprint"
                );
            }
        }
        keep
    };
    let mut refused = std::collections::HashSet::new();
    let (tx, rx) = watch::channel(split(&all.borrow_and_update(), &mut refused));
    tokio::spawn(async move {
        while all.changed().await.is_ok() {
            let list = split(&all.borrow_and_update(), &mut refused);
            if tx.send(list).is_err() {
                break;
            }
        }
    });
    rx
}

/// A Generate stream gathered into `Complete`'s answer: each choice whole (its pieces joined in
/// order), and the request's usage (the prompt once, completions summed, the earliest first
/// token). The first error status is the answer.
async fn whole(
    mut stream: impl Stream<Item = Result<GenerateResponse, Status>> + Unpin,
    request_id: String,
) -> Result<CompleteResponse, Status> {
    let mut choices: Vec<GenerateResponse> = Vec::new();
    while let Some(m) = stream.next().await {
        let m = m?;
        let i = m.index as usize;
        if choices.len() <= i {
            choices.resize_with(i + 1, GenerateResponse::default);
        }
        let c = &mut choices[i];
        c.index = m.index;
        c.request_id.clone_from(&m.request_id);
        c.text.push_str(&m.text);
        c.token_ids.extend(m.token_ids);
        c.logprobs.extend(m.logprobs);
        c.top_logprobs.extend(m.top_logprobs);
        c.prompt_logprobs.extend(m.prompt_logprobs);
        if m.finish_reason != 0 {
            c.finish_reason = m.finish_reason;
            c.usage = m.usage;
        }
    }
    let usage = choices
        .iter()
        .filter_map(|c| c.usage)
        .reduce(|total, u| Usage {
            completion_tokens: total.completion_tokens + u.completion_tokens,
            time_to_first_token_ms: total.time_to_first_token_ms.min(u.time_to_first_token_ms),
            ..total
        });
    Ok(CompleteResponse {
        choices,
        usage,
        request_id,
    })
}

/// The client's `grpc-timeout` header (e.g. `500m`, `2S`), as a duration.
fn grpc_timeout(md: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::{GateLoad, choose_gate, grpc_timeout, whole};

    fn gate(prefix_blocks: usize, load: usize, free_kv: usize) -> GateLoad {
        GateLoad {
            prefix_blocks,
            load,
            free_kv,
        }
    }

    #[test]
    fn a_request_goes_to_the_gate_holding_its_prefix_unless_it_is_too_busy() {
        assert_eq!(choose_gate(&[], Some(4)), None);
        // Off, or no gate holds the prefix: the fewest sequences, then the most free KV.
        let gates = [gate(10, 5, 0), gate(0, 2, 10), gate(0, 2, 50)];
        assert_eq!(choose_gate(&gates, None), Some(2));
        let none = [gate(0, 5, 0), gate(0, 2, 10), gate(0, 2, 50)];
        assert_eq!(choose_gate(&none, Some(4)), Some(2));
        // The holder, within the margin of the least loaded.
        assert_eq!(choose_gate(&gates, Some(3)), Some(0));
        // Past it: the least loaded, even though it must compute the prompt.
        assert_eq!(choose_gate(&gates, Some(2)), Some(2));
        // The longest prefix among the holders within the margin, then the load.
        let gates = [gate(3, 1, 0), gate(8, 9, 0), gate(8, 2, 0), gate(8, 2, 9)];
        assert_eq!(choose_gate(&gates, Some(4)), Some(3));
        assert_eq!(choose_gate(&gates, Some(0)), Some(0));
    }
    use moemesh_proto::v1::{GenerateResponse, Usage};
    use std::time::Duration;

    fn msg(index: u32, text: &str, id: u32, finish: i32, ttft: f64) -> GenerateResponse {
        GenerateResponse {
            text: text.into(),
            token_ids: vec![id],
            logprobs: vec![-0.5],
            finish_reason: finish,
            usage: (finish != 0).then_some(Usage {
                prompt_tokens: 4,
                completion_tokens: 2,
                time_to_first_token_ms: ttft,
                cached_prompt_tokens: 0,
            }),
            request_id: "r".into(),
            index,
            top_logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
        }
    }

    #[tokio::test]
    async fn complete_gathers_interleaved_choices_and_sums_their_usage() {
        let stream = futures::stream::iter(vec![
            Ok(msg(1, "x", 7, 0, 0.0)),
            Ok(msg(0, "a", 5, 0, 0.0)),
            Ok(msg(0, "b", 6, 1, 30.0)),
            Ok(msg(1, "y", 8, 3, 20.0)),
        ]);
        let got = whole(stream, "r".into()).await.expect("whole");
        let texts: Vec<&str> = got.choices.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["ab", "xy"]);
        assert_eq!(got.choices[1].token_ids, [7, 8]);
        assert_eq!(got.choices[1].finish_reason, 3);
        let u = got.usage.expect("usage");
        assert_eq!((u.prompt_tokens, u.completion_tokens), (4, 4));
        assert_eq!(u.time_to_first_token_ms, 20.0);
        // An error anywhere is the answer.
        let failing = futures::stream::iter(vec![
            Ok(msg(0, "a", 5, 0, 0.0)),
            Err(tonic::Status::unavailable("gate gone")),
        ]);
        let err = whole(failing, "r".into()).await.expect_err("fails");
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn parses_grpc_timeout_units() {
        let mut md = tonic::metadata::MetadataMap::new();
        for (v, d) in [
            ("250m", Duration::from_millis(250)),
            ("2S", Duration::from_secs(2)),
            ("1M", Duration::from_secs(60)),
        ] {
            md.insert("grpc-timeout", v.parse().expect("ascii"));
            assert_eq!(grpc_timeout(&md), Some(d));
        }
        md.insert("grpc-timeout", "12x".parse().expect("ascii"));
        assert_eq!(grpc_timeout(&md), None);
    }
}
