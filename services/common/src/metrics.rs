//! Prometheus metrics: every metric name in one place, the recorder, and a tiny HTTP server that
//! answers `GET /metrics` in the Prometheus text format.
//!
//! Services record through the `metrics` facade (`metrics::counter!(names::X, …)`); until
//! [`start`] installs the recorder (only when `--metrics-listen` is given) those calls cost a
//! load and a branch and record nothing. Names carry their unit (`_seconds`, `_total`); labels
//! stay low-cardinality: a gRPC code, a role, a worker id or gate address, and (layer, expert)
//! for the expert-load counter a rebalancer reads.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use clap::Args;
use http_body_util::Full;
use hyper::body::Bytes;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::{MeshError, MeshResult};

/// The flag every role takes.
#[derive(Args, Debug, Clone, Default)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on `http://ADDR/metrics` (port 0 picks a free port; the ready
    /// line's `metrics` field says which). Off when not given.
    #[arg(long, env = "MOEMESH_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Declares the metric names (module `names`) and [`describe`], which gives each its type and
/// its doc comment as the `# HELP` line.
macro_rules! metrics_table {
    ($( $(#[doc = $doc:literal])* $kind:ident $name:ident = $value:literal; )*) => {
        /// Metric names, with what each counts. Labels are listed with each.
        pub mod names {
            $( $(#[doc = $doc])* pub const $name: &str = $value; )*
        }

        /// Registers every metric's type and help text with the installed recorder.
        fn describe() {
            $( metrics_table!(@describe $kind, $value, concat!($($doc),*).trim()); )*
        }
    };
    (@describe counter, $name:expr, $help:expr) => { metrics::describe_counter!($name, $help) };
    (@describe gauge, $name:expr, $help:expr) => { metrics::describe_gauge!($name, $help) };
    (@describe histogram, $name:expr, $help:expr) => { metrics::describe_histogram!($name, $help) };
}

metrics_table! {
    // Frontend.
    /// Generate calls by final gRPC status: `code` (`Ok`, `InvalidArgument`, …; `Cancelled`
    /// when the client went away before the end).
    counter REQUESTS = "moemesh_frontend_requests_total";
    /// Tokens streamed to clients.
    counter TOKENS_GENERATED = "moemesh_frontend_generated_tokens_total";
    /// Prompt tokens of accepted requests.
    counter PROMPT_TOKENS = "moemesh_frontend_prompt_tokens_total";
    /// Time from a request's arrival to its first token.
    histogram TTFT = "moemesh_frontend_time_to_first_token_seconds";
    /// Time between consecutive tokens of one request.
    histogram ITL = "moemesh_frontend_inter_token_latency_seconds";
    /// Sequences waiting for admission, per `gate`.
    gauge QUEUE_DEPTH = "moemesh_frontend_queue_depth";
    /// Sequences running, per `gate`.
    gauge RUNNING = "moemesh_frontend_running_sequences";
    /// A step's round trip seen from the frontend (send to answer), per `gate`.
    histogram FRONTEND_STEP = "moemesh_frontend_step_duration_seconds";
    /// Sequences preempted because the gate's KV was full, per `gate`.
    counter PREEMPTIONS = "moemesh_frontend_preemptions_total";
    /// Audit log lines dropped because its writer fell behind (it queues 65,536).
    counter AUDIT_DROPPED = "moemesh_frontend_audit_dropped_total";

    // Gate.
    /// Steps run by the gate's engine, by `outcome` (`ok`, `error`).
    counter GATE_STEPS = "moemesh_gate_steps_total";
    /// Time the engine spent on one step (attention, experts, sampling).
    histogram GATE_STEP = "moemesh_gate_step_duration_seconds";
    /// Tokens (prefill and decode) through the gate's steps.
    counter GATE_STEP_TOKENS = "moemesh_gate_step_tokens_total";
    /// Sequences holding KV on the gate.
    gauge GATE_SEQUENCES = "moemesh_gate_live_sequences";
    /// Paged KV blocks holding some sequence's tokens.
    gauge KV_USED = "moemesh_gate_kv_blocks_used";
    /// Paged KV blocks free.
    gauge KV_FREE = "moemesh_gate_kv_blocks_free";
    /// Paged KV blocks in the pool (--kv-cache-mb or --kv-blocks).
    gauge KV_TOTAL = "moemesh_gate_kv_blocks_total";
    /// Prefix-cache lookups: a sequence's step with at least one full block that could come
    /// from the cache.
    counter PREFIX_LOOKUPS = "moemesh_gate_prefix_cache_lookups_total";
    /// Full KV blocks asked for by prefix-cache lookups.
    counter PREFIX_QUERIED_BLOCKS = "moemesh_gate_prefix_cache_queried_blocks_total";
    /// KV blocks found in the prefix cache (hit rate: this over the queried blocks).
    counter PREFIX_HIT_BLOCKS = "moemesh_gate_prefix_cache_hit_blocks_total";
    /// Prompt tokens whose KV came from the prefix cache (not computed).
    counter PREFIX_HIT_TOKENS = "moemesh_gate_prefix_cache_hit_tokens_total";
    /// Cached KV blocks evicted (least recently used first) to make room.
    counter PREFIX_EVICTIONS = "moemesh_gate_prefix_cache_evictions_total";
    /// KV blocks holding a cached prefix (in use or kept for later).
    gauge PREFIX_CACHED_BLOCKS = "moemesh_gate_prefix_cache_blocks";
    /// KV blocks brought back from the host tier on a prefix hit (--host-kv-cache-gb); also
    /// counted in the hit blocks.
    counter PREFIX_HOST_HIT_BLOCKS = "moemesh_gate_prefix_cache_host_hit_blocks_total";
    /// Prompt tokens whose KV came back from the host tier.
    counter PREFIX_HOST_HIT_TOKENS = "moemesh_gate_prefix_cache_host_hit_tokens_total";
    /// Bytes of evicted KV blocks copied from the pool to the host tier.
    counter PREFIX_HOST_BYTES_TO_HOST = "moemesh_gate_prefix_cache_host_bytes_to_host_total";
    /// Bytes of KV blocks copied from the host tier back into the pool.
    counter PREFIX_HOST_BYTES_TO_DEVICE = "moemesh_gate_prefix_cache_host_bytes_to_device_total";
    /// KV blocks dropped from the host tier (least recently used first) to stay in its budget.
    counter PREFIX_HOST_EVICTIONS = "moemesh_gate_prefix_cache_host_evictions_total";
    /// KV blocks the host tier holds.
    gauge PREFIX_HOST_BLOCKS = "moemesh_gate_prefix_cache_host_blocks";
    /// Routed (token, expert) pairs, per `layer` (per expert: `Gate.Info.expert_load`).
    counter EXPERT_TOKENS = "moemesh_gate_expert_tokens_total";
    /// Over the gate's load window (`--load-window-secs`), per `layer`: the busiest expert's
    /// routed tokens over the mean per expert (1: even).
    gauge EXPERT_LOAD_IMBALANCE = "moemesh_gate_expert_load_imbalance";
    /// Over the gate's load window, per `layer`: the id of the busiest expert.
    gauge EXPERT_LOAD_HOTTEST = "moemesh_gate_expert_load_hottest";
    /// One Forward call to an expert worker, per `worker`.
    histogram DISPATCH = "moemesh_gate_expert_dispatch_duration_seconds";
    /// Failed expert calls whose pairs were retried on another replica, per failed `worker`.
    counter RETRIES = "moemesh_gate_expert_retries_total";
    /// Expert calls a worker refused because it gave an expert up (live re-placement), per
    /// `worker`; their pairs went to the experts' other holders.
    counter GATE_EXPERT_REFUSALS = "moemesh_gate_expert_refusals_total";
    /// Decode steps the gate replayed as CUDA graphs (`--expert-graphs`).
    counter GATE_GRAPH_REPLAYS = "moemesh_gate_decode_graph_replays_total";
    /// Decode graphs the gate captured (one per batch and context bucket, since start).
    gauge GATE_GRAPHS = "moemesh_gate_decode_graphs";
    /// Expert workers the gate accepts (same model fingerprint).
    gauge GATE_WORKERS = "moemesh_gate_expert_workers";
    /// (layer, expert) pairs of the model that no accepted worker serves.
    gauge MISSING_EXPERTS = "moemesh_gate_missing_experts";
    /// 1 for the transport each expert `worker`'s activations take (`transport`: grpc or
    /// cuda-ipc), set when its stream opens.
    gauge WORKER_TRANSPORT = "moemesh_gate_expert_transport";

    // Expert worker.
    /// Forward calls, by `code`.
    counter FORWARDS = "moemesh_expert_forward_calls_total";
    /// Time to compute one Forward call.
    histogram FORWARD = "moemesh_expert_forward_duration_seconds";
    /// (token, expert) pairs computed, per `layer` and `expert`.
    counter WORKER_EXPERT_TOKENS = "moemesh_expert_tokens_total";
    /// Forward calls refused because they named experts this worker gave up (`SetExperts`); the
    /// gate re-sends them to other holders.
    counter WORKER_REFUSED_CALLS = "moemesh_expert_refused_calls_total";
    /// `SetExperts` changes, per `outcome` (`ok`, `error`).
    counter WORKER_SET_EXPERTS = "moemesh_expert_set_experts_total";
    /// Routed experts this worker holds now per served layer (the mean over its layers, which
    /// may hold different experts).
    gauge WORKER_HELD_EXPERTS = "moemesh_expert_held_experts";

    // Registry (every role).
    /// Members seen through the registry watch, per watched `role` (`gate`, `expert`).
    gauge REGISTRY_MEMBERS = "moemesh_registry_members";
    /// Successful lease keep-alives, per `role` of this process.
    counter LEASE_RENEWALS = "moemesh_registry_lease_renewals_total";
    /// Registrations written again after etcd reported the lease gone or the key missing, per `role`.
    counter REREGISTRATIONS = "moemesh_registry_reregistrations_total";
    /// Failed etcd operations, per `op` (`keepalive`, `register`, `watch`, `revoke`).
    counter ETCD_ERRORS = "moemesh_registry_etcd_errors_total";
}

/// Latency buckets (seconds) for every `_seconds` histogram: 0.5 ms to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The process's recorder: one per process, installed by the first role that asks.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

fn handle() -> MeshResult<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| MeshError::Internal(format!("metrics buckets: {e}")))?
        .build_recorder();
    let h = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| MeshError::Internal(format!("installing the metrics recorder: {e}")))?;
    describe();
    let _ = HANDLE.set(h.clone());
    Ok(h)
}

/// The `/metrics` server of a running role.
pub struct MetricsServer {
    /// The address it serves on (the bound one, so port 0 is resolved).
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Installs the recorder and serves `/metrics` when `--metrics-listen` is given; stops serving
/// when the returned server is dropped. Binding is done here, before the role serves, so a bad
/// address fails the start.
pub async fn start(args: &MetricsArgs) -> MeshResult<Option<MetricsServer>> {
    let Some(addr) = args.metrics_listen else {
        return Ok(None);
    };
    let handle = handle()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| MeshError::Invalid(format!("--metrics-listen {addr}: {e}")))?;
    let address = listener
        .local_addr()
        .map_err(|e| MeshError::Internal(format!("metrics listener address: {e}")))?;
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(serve(listener, handle, async {
        let _ = stopped.await;
    }));
    tracing::info!(%address, "serving Prometheus metrics on /metrics");
    Ok(Some(MetricsServer {
        address,
        stop: Some(stop),
    }))
}

/// Answers `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send,
) {
    use hyper::service::service_fn;
    let mut shutdown = std::pin::pin!(shutdown);
    // Histograms keep raw samples until rendered; upkeep bounds that between scrapes.
    let mut upkeep = tokio::time::interval(Duration::from_secs(5));
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            _ = upkeep.tick() => {
                handle.run_upkeep();
                continue;
            }
            conn = listener.accept() => match conn {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let h = handle.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let h = h.clone();
                async move { Ok::<_, Infallible>(respond(&req, &h)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

fn respond<B>(req: &hyper::Request<B>, handle: &PrometheusHandle) -> hyper::Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            hyper::StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        ),
        (_, "/metrics") => (
            hyper::StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "use GET\n".to_string(),
        ),
        _ => (
            hyper::StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "metrics are on /metrics\n".to_string(),
        ),
    };
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

/// A gRPC code as a label value (`Ok`, `InvalidArgument`, …, as grpc-prometheus writes them).
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}
