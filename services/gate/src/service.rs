//! `Gate.Step` / `Gate.Info` and the gate's life cycle: load the dense model, follow the expert
//! workers (registry watch, or the static list resolved through their `Info`), serve, register,
//! and on shutdown leave the registry before stopping.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use moemesh_common::member_args::DEFAULT_MAX_MESSAGE_MB;
use moemesh_common::metrics::names;
use moemesh_common::registry::{Member, Registry, Role};
use moemesh_common::tls::{self, ClientAuth, Tls};
use moemesh_common::{MeshError, MeshResult, codec, device, metrics as mesh_metrics, serve};
use moemesh_engine::weights::LoadedBytes;
use moemesh_engine::{ModelFiles, Parts};
use moemesh_proto::v1::expert_client::ExpertClient;
use moemesh_proto::v1::gate_server::{Gate, GateServer};
use moemesh_proto::v1::{
    ExpertInfoRequest, GateInfoRequest, GateInfoResponse, StepError, StepRequest, StepResponse,
    WorkerExperts, WorkerLayer,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::GateConfig;
use crate::remote_experts::RemoteExperts;
use crate::step_engine::{Command, StepEngine};
use crate::workers::{IpcOffer, WorkerPool};

#[derive(Clone)]
struct GateService {
    engine: mpsc::Sender<Command>,
    pool: Arc<WorkerPool>,
    next_conn: Arc<AtomicU64>,
    /// `--device`, reported by Info.
    device: String,
    /// The checkpoint's weight format, reported by Info.
    weights_dtype: String,
    /// Bytes of the loaded weights as held on the device, reported by Info.
    weight_bytes: u64,
    /// Where the expert workers are found (`etcd` or `static`), reported by Info.
    registry: &'static str,
    /// Marked after every step answer and every closed Step stream: the only events that end
    /// sequences, which a draining gate waits on (see `run`).
    stepped: Arc<watch::Sender<()>>,
}

type StepStream = Pin<Box<dyn Stream<Item = Result<StepResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Gate for GateService {
    type StepStream = StepStream;

    async fn step(
        &self,
        request: Request<Streaming<StepRequest>>,
    ) -> Result<Response<StepStream>, Status> {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let engine = self.engine.clone();
        let stepped = self.stepped.clone();
        tokio::spawn(async move {
            // Set by an `end_run` message while a run is answered (see `answer_run`).
            let end_run = Arc::new(AtomicBool::new(false));
            // A step that came while a run was answered (the frontend waits for a run's last
            // answer before its next step; this keeps one that did not): it goes next.
            let mut early: Option<StepRequest> = None;
            loop {
                let req = match early.take() {
                    Some(r) => r,
                    None => match incoming.message().await {
                        Ok(Some(r)) => r,
                        Ok(None) => break,
                        // A message that does not decode (malformed, or over --max-message-mb)
                        // ends the stream with its status, not with OK: the server's status
                        // layer makes it INVALID_ARGUMENT or RESOURCE_EXHAUSTED naming the limit.
                        // (If the frontend went away, no one reads this.)
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    },
                };
                // Outside a run there is nothing to end.
                if req.end_run && req.seqs.is_empty() && req.release.is_empty() {
                    continue;
                }
                end_run.store(false, Ordering::Release);
                let (reply_tx, reply_rx) = mpsc::unbounded_channel();
                if engine
                    .send(Command::Step {
                        conn,
                        req,
                        reply: reply_tx,
                        end_run: end_run.clone(),
                    })
                    .await
                    .is_err()
                {
                    let _ = tx
                        .send(Err(
                            MeshError::Unavailable("gate is shutting down".into()).into()
                        ))
                        .await;
                    break;
                }
                match answer_run(reply_rx, &mut incoming, &end_run, &engine, &tx, &stepped).await {
                    RunEnd::Done => {}
                    RunEnd::Early(r) => early = Some(r),
                    RunEnd::Close(status) => {
                        if let Some(status) = status {
                            let _ = tx.send(Err(status)).await;
                        }
                        break;
                    }
                }
            }
            // The frontend left (or a step failed and ended the stream): free its sequences.
            let _ = engine.send(Command::ReleaseConn { conn }).await;
            stepped.send_replace(());
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn info(
        &self,
        _: Request<GateInfoRequest>,
    ) -> Result<Response<GateInfoResponse>, Status> {
        let (tx, rx) = oneshot::channel();
        self.engine
            .send(Command::Info { reply: tx })
            .await
            .map_err(|_| MeshError::Unavailable("gate engine stopped".into()))?;
        let mut info = rx
            .await
            .map_err(|_| MeshError::Unavailable("gate engine stopped".into()))?;
        for v in self.pool.views() {
            let layers = v
                .member
                .holdings()
                .into_iter()
                .map(|(layer, experts)| WorkerLayer {
                    layer,
                    experts,
                    routed_pairs: v.routed_pairs.get(&layer).copied().unwrap_or(0),
                })
                .collect();
            info.worker_experts.push(WorkerExperts {
                id: v.member.id.clone(),
                experts: v.member.experts.clone(),
                address: v.member.address.clone(),
                routed_pairs: v.routed_pairs.values().sum(),
                layers,
            });
            info.expert_workers.push(v.member.id);
            info.expert_transports.push(v.transport.to_string());
        }
        info.device = self.device.clone();
        info.weights_dtype = self.weights_dtype.clone();
        info.weight_bytes = self.weight_bytes;
        info.registry = self.registry.to_string();
        Ok(Response::new(info))
    }
}

/// How answering a run ended.
enum RunEnd {
    /// Every answer sent; the stream goes on.
    Done,
    /// Answered, and a step came meanwhile: it goes next.
    Early(StepRequest),
    /// The stream ends (the frontend left or sent what does not decode: its status, if any; or
    /// the engine or the answer stream is gone).
    Close(Option<Status>),
}

/// Forwards a step's or a run's answers to the stream, in order, until the engine drops the
/// run's sender; meanwhile reads the stream for an `end_run` (the run ends after the step in
/// progress) or a frontend that leaves (so does the run).
async fn answer_run(
    mut replies: mpsc::UnboundedReceiver<MeshResult<StepResponse>>,
    incoming: &mut Streaming<StepRequest>,
    end_run: &AtomicBool,
    engine: &mpsc::Sender<Command>,
    tx: &mpsc::Sender<Result<StepResponse, Status>>,
    stepped: &watch::Sender<()>,
) -> RunEnd {
    let mut answered = false;
    let mut reading = true;
    let mut after: Option<RunEnd> = None;
    loop {
        let reply = tokio::select! {
            biased;
            r = replies.recv() => r,
            m = incoming.next(), if reading => {
                match m {
                    Some(Ok(r)) if r.end_run && r.seqs.is_empty() && r.release.is_empty() => {
                        end_run.store(true, Ordering::Release);
                    }
                    Some(Ok(r)) => {
                        end_run.store(true, Ordering::Release);
                        after = Some(RunEnd::Early(r));
                        reading = false;
                    }
                    Some(Err(status)) => {
                        end_run.store(true, Ordering::Release);
                        after = Some(RunEnd::Close(Some(status)));
                        reading = false;
                    }
                    None => {
                        end_run.store(true, Ordering::Release);
                        after = Some(RunEnd::Close(None));
                        reading = false;
                    }
                }
                continue;
            }
        };
        let reply = match reply {
            Some(Ok(r)) => r,
            // A failed step is answered in-band so the stream (and every other sequence on it)
            // survives; it is a run's last answer.
            Some(Err(e)) => {
                let status = Status::from(e);
                let kv = kv_state(engine).await;
                StepResponse {
                    error: Some(StepError {
                        code: status.code() as i32,
                        message: status.message().to_string(),
                    }),
                    kv_blocks_free: kv.kv_blocks_free,
                    kv_blocks_total: kv.kv_blocks_total,
                    kv_block_tokens: kv.kv_block_tokens,
                    ..Default::default()
                }
            }
            None if answered => return after.unwrap_or(RunEnd::Done),
            None => {
                let _ = tx
                    .send(Err(
                        MeshError::Unavailable("gate engine stopped".into()).into()
                    ))
                    .await;
                return RunEnd::Close(None);
            }
        };
        answered = true;
        stepped.send_replace(());
        if tx.send(Ok(reply)).await.is_err() {
            return RunEnd::Close(None);
        }
    }
}

/// The gate's KV numbers right now (asked of the engine thread).
async fn kv_state(engine: &mpsc::Sender<Command>) -> GateInfoResponse {
    let (tx, rx) = oneshot::channel();
    if engine.send(Command::Info { reply: tx }).await.is_err() {
        return GateInfoResponse::default();
    }
    rx.await.unwrap_or_default()
}

/// Resolves statically configured workers into members by asking each for its `Info`
/// (retrying for up to a minute while they start).
async fn static_members(addrs: &[String], tls: Option<&Tls>) -> MeshResult<Vec<Member>> {
    let mut out = Vec::new();
    for addr in addrs {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let info = loop {
            let attempt = async {
                let channel = tls::endpoint(addr, tls)
                    .map_err(|e| e.to_string())?
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
                let mut c = ExpertClient::new(channel);
                c.info(ExpertInfoRequest {})
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            match attempt {
                Ok(r) => break r.into_inner(),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    return Err(MeshError::Unavailable(format!(
                        "expert worker at {addr} did not answer Info: {e}"
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let mut member = Member {
            id: info.id.clone(),
            role: Role::Expert,
            address: addr.clone(),
            layers: Vec::new(),
            experts: Vec::new(),
            layer_experts: Vec::new(),
            device: info.device.clone(),
            fingerprint: info.fingerprint.clone(),
            version: String::new(),
        };
        member.set_holdings(&codec::holdings_from_info(&info));
        out.push(member);
    }
    Ok(out)
}

pub async fn run(
    cfg: GateConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> MeshResult<()> {
    let device = device::parse_device(&cfg.member.device)?;
    let dtype = device::parse_dtype(&cfg.member.dtype)?;
    if cfg.member.etcd.is_empty() && cfg.expert_addrs.is_empty() {
        return Err(MeshError::Invalid(
            "the gate needs expert workers: give --etcd (registry) or --expert-addrs (static list)"
                .into(),
        ));
    }
    let tls = cfg.member.tls.load(ClientAuth::Required)?;
    cfg.member.limits.validate().map_err(MeshError::Invalid)?;
    if cfg.max_step_sequences == 0 {
        return Err(MeshError::Invalid(
            "--max-step-sequences must be at least 1".into(),
        ));
    }
    let local = listener
        .local_addr()
        .map_err(|e| MeshError::Internal(e.to_string()))?;
    let (advertise, id) = cfg.member.identity("gate", local);
    // First, so that everything started below records into it.
    let metrics_server = mesh_metrics::start(&cfg.member.metrics).await?;

    let model_dir = cfg.model.clone();
    let dev = device.clone();
    let router_skew = cfg.router_skew;
    let weights_dtype = cfg.weights_dtype;
    let (files, model, loaded) = tokio::task::spawn_blocking(move || {
        let files =
            ModelFiles::open_or_embedded(model_dir.as_deref())?.with_experts_dtype(weights_dtype);
        let loader = files.loader(&dev, dtype);
        let model = moemesh_engine::DeepSeekModel::load(
            &files.config,
            &loader,
            // The embeddings too: the gate embeds the token ids a frontend sends without
            // activations (Info.embeds_tokens).
            Parts::ALL,
        );
        let loaded = loader.loaded_bytes();
        drop(loader);
        let mut model = model?;
        model.set_router_skew(router_skew)?;
        Ok::<_, MeshError>((files, model, loaded))
    })
    .await
    .map_err(|e| MeshError::Internal(e.to_string()))??;

    let pool = Arc::new(
        WorkerPool::new(
            files.fingerprint.clone(),
            tls.clone(),
            Duration::from_millis(cfg.expert_connect_timeout_ms),
        )
        .with_ipc(IpcOffer {
            mode: cfg.expert_transport,
            gate_id: id.clone(),
            device: device.clone(),
            device_name: cfg.member.device.clone(),
            dtype,
            hidden: files.config.hidden_size,
            rows: cfg.expert_ipc_rows as usize,
            sync: cfg.expert_ipc_sync,
            top_k: files.config.num_experts_per_tok,
        }),
    );
    let members = if cfg.member.etcd.is_empty() {
        static_members(&cfg.expert_addrs, tls.as_deref()).await?
    } else {
        Vec::new()
    };
    let registry = Registry::new(
        &cfg.member.registry_config(&files.name, tls.clone()),
        members,
    )?;
    let mut workers = registry
        .watch_synced(Role::Expert, Duration::from_secs(10))
        .await;
    let moe_layers: Vec<u32> = files
        .config
        .moe_layers()
        .into_iter()
        .map(|l| l as u32)
        .collect();
    let n_experts = files.config.n_routed_experts as u32;
    let update = move |pool: &WorkerPool, list: &[Member]| {
        pool.update(list);
        metrics::gauge!(names::GATE_WORKERS).set(pool.members().len() as f64);
        metrics::gauge!(names::MISSING_EXPERTS).set(pool.missing(&moe_layers, n_experts) as f64);
    };
    update(&pool, &workers.borrow_and_update());
    let p = pool.clone();
    tokio::spawn(async move {
        while workers.changed().await.is_ok() {
            let list = workers.borrow_and_update().clone();
            update(&p, &list);
        }
    });

    let experts = RemoteExperts::new(
        pool.clone(),
        tokio::runtime::Handle::current(),
        codec::wire_dtype_for(dtype),
        Duration::from_secs(cfg.expert_timeout),
        files.config.n_routed_experts,
        Duration::from_secs(cfg.load_window_secs),
    )
    .with_graphs(cfg.expert_graphs, &cfg.member.device);
    // On a GPU the default pool is a share of what is free now, with this gate's weights (and
    // the workers `up` started before it) loaded.
    let device_free = match moemesh_engine::cuda::gpu(&device) {
        Some(g) => Some(g.memory_info()?.0),
        None => None,
    };
    let blocks = cfg.kv_blocks.unwrap_or_else(|| {
        moemesh_engine::serving::blocks_for_bytes(
            &files.config,
            dtype,
            cfg.kv_cache_bytes(device_free),
        )
    });
    let runner = moemesh_engine::serving::StepRunner::with_blocks(model, blocks).map_err(|e| {
        MeshError::Invalid(format!(
            "--kv-cache-mb/--kv-blocks: {e} (got {blocks} blocks)"
        ))
    })?;
    tracing::info!(
        blocks,
        block_tokens = runner.kv().block_tokens,
        tokens = blocks * runner.kv().block_tokens,
        sized_by = if cfg.kv_blocks.is_some() {
            "--kv-blocks"
        } else if cfg.kv_cache_mb.is_some() {
            "--kv-cache-mb"
        } else if device_free.is_some() {
            "--kv-cache-fraction of the GPU's free memory"
        } else {
            "the CPU default"
        },
        device_free_bytes = device_free,
        prefix_cache = cfg.prefix_cache,
        "KV pool allocated"
    );
    let kv_bytes = (blocks
        * runner.kv().block_tokens
        * files.config.num_hidden_layers
        * files.config.kv_cache_width()
        * dtype.size_in_bytes()) as u64;
    // The memory plan line: what this gate holds on its device (`moemesh plan` predicts it).
    tracing::info!(
        role = "gate",
        device = %cfg.member.device,
        weights_format = %files.weights_format(),
        weight_bytes = loaded.resident_total(),
        resident = %LoadedBytes::describe(&loaded.resident),
        checkpoint = %LoadedBytes::describe(&loaded.checkpoint),
        kv_cache_bytes = kv_bytes,
        "memory plan"
    );
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let mut engine = StepEngine::new(runner, experts, id.clone(), files.fingerprint.clone());
    engine.runner.overlap = cfg.overlap;
    engine
        .runner
        .set_prefix_cache(cfg.prefix_cache, &files.fingerprint);
    if cfg.prefix_cache {
        engine.runner.set_host_tier(cfg.host_kv_cache_bytes());
        tracing::info!(
            host_blocks = engine.runner.host_tier_blocks(),
            host_kv_cache_gb = cfg.host_kv_cache_gb,
            "prefix cache host tier"
        );
    }
    engine.max_step_sequences = cfg.max_step_sequences;
    engine.record_kv();
    std::thread::Builder::new()
        .name("gate-engine".into())
        .spawn(move || engine.run(cmd_rx))
        .map_err(|e| MeshError::Internal(format!("starting the engine thread: {e}")))?;

    let (reporter, health, reflection) = serve::health_and_reflection("moemesh.v1.Gate");
    let engine = cmd_tx.clone();
    let (stepped, mut stepped_rx) = watch::channel(());
    let service = GateService {
        engine: cmd_tx,
        pool: pool.clone(),
        next_conn: Arc::new(AtomicU64::new(1)),
        device: cfg.member.device.clone(),
        weights_dtype: files.weights_format(),
        weight_bytes: loaded.resident_total(),
        registry: if cfg.member.etcd.is_empty() {
            "static"
        } else {
            "etcd"
        },
        stepped: Arc::new(stepped),
    };
    let limits = &cfg.member.limits;
    let router = limits
        .server()
        // Under TLS, only frontends run steps: a peer whose certificate lacks the
        // frontend role gets PERMISSION_DENIED (health and reflection stay open to probes).
        .layer(tls::RequireRoleLayer::new(
            "/moemesh.v1.Gate/Step",
            tls::CertRole::Frontend,
        ))
        .add_service(health)
        .add_service(reflection.0)
        .add_service(reflection.1)
        .add_service(
            GateServer::new(service)
                .max_decoding_message_size(limits.max_message_bytes(DEFAULT_MAX_MESSAGE_MB))
                .max_encoding_message_size(256 << 20),
        );
    let incoming = limits.incoming(tls::incoming(listener, tls));
    let mut serving = serve::Serving::start(reporter, |stop| {
        router.serve_with_incoming_shutdown(incoming, stop)
    })
    .await;
    serving
        .register(
            &registry,
            Member {
                id: id.clone(),
                role: Role::Gate,
                address: advertise.clone(),
                layers: Vec::new(),
                experts: Vec::new(),
                layer_experts: Vec::new(),
                device: cfg.member.device.clone(),
                fingerprint: files.fingerprint.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
        )
        .await?;
    tracing::info!(%id, address = %advertise, workers = pool.members().len(), "gate serving");
    serve::announce_ready("gate", local, &id, metrics_server.as_ref());

    shutdown.await;
    tracing::info!(%id, "shutting down: leaving the registry, then draining sequences");
    // Sequences end only through Step streams (a release, a finished step, a closed stream),
    // each of which marks `stepped`; the engine's count, asked after the mark is seen, includes
    // that change. So the drain wakes on events, never on a timer.
    let drained = async move {
        loop {
            stepped_rx.borrow_and_update();
            if kv_state(&engine).await.live_sequences == 0 || stepped_rx.changed().await.is_err() {
                break;
            }
        }
    };
    serving
        .drain_then_stop(
            drained,
            Duration::from_secs(cfg.drain_timeout),
            "sequences (their frontends move them)",
            Duration::from_secs(5),
        )
        .await;
    Ok(())
}
