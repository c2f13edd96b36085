//! Logging and distributed tracing for every `moemesh` subcommand.
//!
//! [`init`] installs the log formatter (`MOEMESH_LOG`, stderr) and, only when an OTLP endpoint is
//! configured through the standard variables (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`), a `tracing-opentelemetry` layer that exports moemesh's spans
//! over OTLP/gRPC. With no endpoint there is no OpenTelemetry layer at all, and the spans (debug
//! level, below the formatter's default `info`) are disabled at their call sites: tracing costs
//! nothing then. The returned [`Telemetry`] flushes the exporter when dropped, which `main` does
//! after the role has shut down (SIGTERM included).
//!
//! How one Generate becomes one trace (W3C trace context, `traceparent`):
//! - frontend: `generate` (the root, or a child of a `traceparent` the client sent) with
//!   `tokenize`, `queue` and one `step` span per step the sequence takes part in;
//! - frontend → gate: the Step stream is long-lived and every message batches several requests,
//!   so the context travels per sequence, in `SeqStep.traceparent` (the frontend's `step` span),
//!   not in the stream's metadata;
//! - gate: one `step` span per traced sequence, each a child of that sequence's frontend `step`.
//!   The step's shared work (each layer's `expert_dispatch` per worker, `sampling`) runs once for
//!   the whole batch, so it hangs under one of them, the first traced sequence's (the leader),
//!   and the other sequences' gate spans link to the leader's (and it to them);
//! - gate → expert: `ForwardRequest.traceparent` carries the `expert_dispatch` span, for the
//!   same reason (one Forward stream multiplexes every call); the worker's `expert_forward` span
//!   is its child.
//!
//! Gates and workers start no trace of their own: a step or call whose message carries no
//! sampled context makes no span. Sampling is decided once, at the frontend (the standard
//! `OTEL_TRACES_SAMPLER`, parent-based by default), and followed downstream.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// What each role's `--help` says about tracing (its settings are the standard variables).
pub const HELP: &str = "Tracing: set OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), e.g. \
http://127.0.0.1:4317, to export spans over OTLP/gRPC; off when unset. OTEL_SERVICE_NAME, \
OTEL_TRACES_SAMPLER(_ARG) and OTEL_BSP_* apply. Logs: MOEMESH_LOG (e.g. info,moemesh_gate=debug).";

/// An OpenTelemetry context (a remote parent), for the services that pass one along.
pub use opentelemetry::Context as TraceContext;

/// The standard variables that turn the exporter on (the signal-specific one wins).
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// The crates whose spans are exported (at debug level: the hot-path spans are debug so that
/// the `info` log formatter never sees them).
const TRACED_CRATES: [&str; 5] = [
    "moemesh_frontend",
    "moemesh_gate",
    "moemesh_expert",
    "moemesh_common",
    // The serving core's step spans (the gate's `sampling`), not the model's internals.
    "moemesh_engine::serving",
];

/// Keeps the exporter alive; dropping it flushes the spans not yet sent.
pub struct Telemetry {
    exporter: Option<Exporter>,
}

struct Exporter {
    provider: SdkTracerProvider,
    /// The tonic client's own runtime (one thread): export traffic never competes with serving,
    /// and it works the same for every subcommand, whatever runtime (if any) it builds.
    runtime: tokio::runtime::Runtime,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.exporter.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(e) = self.exporter.take() {
            // Flushes the batch processor: the last spans (those of the shutdown itself) go out
            // before the process exits.
            if let Err(err) = e.provider.shutdown() {
                eprintln!("moemesh: flushing traces at exit failed: {err}");
            }
            e.runtime.shutdown_background();
        }
    }
}

/// The configured OTLP endpoint, if any (an empty variable counts as unset).
pub fn otlp_endpoint() -> Option<String> {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    ENDPOINT_VARS
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
}

/// Installs logging (`MOEMESH_LOG`, default `info`, on stderr) and, when an OTLP endpoint is
/// set, the span exporter. `service` names this process in traces (`service.name`) unless
/// `OTEL_SERVICE_NAME` is set. Call once, outside any async runtime.
pub fn init(service: &str) -> Telemetry {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(
            EnvFilter::try_from_env("MOEMESH_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        );
    let exporter = match otlp_endpoint() {
        Some(endpoint) => match start_exporter(service) {
            Ok(e) => Some((e, endpoint)),
            Err(err) => {
                eprintln!(
                    "moemesh: tracing is off: the OTLP exporter for {endpoint} failed: {err}"
                );
                None
            }
        },
        None => None,
    };
    let otel = exporter.as_ref().map(|(e, _)| {
        let targets = TRACED_CRATES
            .iter()
            .fold(Targets::new(), |t, c| t.with_target(*c, LevelFilter::DEBUG));
        tracing_opentelemetry::layer()
            .with_tracer(e.provider.tracer("moemesh"))
            .with_filter(targets)
    });
    tracing_subscriber::registry().with(fmt).with(otel).init();
    if let Some((_, endpoint)) = &exporter {
        tracing::info!(%endpoint, service, "exporting traces over OTLP/gRPC");
    }
    Telemetry {
        exporter: exporter.map(|(e, _)| e),
    }
}

fn start_exporter(service: &str) -> Result<Exporter, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| format!("starting its runtime: {e}"))?;
    // The tonic channel is created (lazily connecting) inside the runtime that drives it.
    let exporter = {
        let _rt = runtime.enter();
        let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        // The exporter reads the endpoint from the same variables; a bare `host:port` (without
        // a scheme) is given one so both spellings work.
        if let Some(e) = otlp_endpoint().filter(|e| !e.contains("://")) {
            b = b.with_endpoint(format!("http://{e}"));
        }
        b.build().map_err(|e| e.to_string())?
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_string());
    }
    // Batching (OTEL_BSP_SCHEDULE_DELAY, OTEL_BSP_MAX_QUEUE_SIZE, …) and sampling
    // (OTEL_TRACES_SAMPLER) follow the standard variables.
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    Ok(Exporter { provider, runtime })
}

struct Carrier<'a>(&'a mut HashMap<String, String>);

impl Injector for Carrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

struct One<'a>(&'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The W3C `traceparent` of `span`, or an empty string when it is not being traced (no
/// exporter, or not sampled).
pub fn traceparent(span: &Span) -> String {
    if span.is_none() {
        return String::new();
    }
    let cx = span.context();
    if !cx.span().span_context().is_sampled() {
        return String::new();
    }
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut Carrier(&mut map));
    map.remove("traceparent").unwrap_or_default()
}

/// The sampled span context a `traceparent` names; `None` for an empty, malformed or unsampled
/// one.
pub fn remote_context(traceparent: &str) -> Option<opentelemetry::Context> {
    if traceparent.is_empty() {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&One(traceparent));
    cx.span().span_context().is_sampled().then_some(cx.clone())
}

/// The trace context a client sent in its call's metadata, if it sent a valid one.
pub fn metadata_context(md: &tonic::metadata::MetadataMap) -> Option<opentelemetry::Context> {
    md.get("traceparent")?;
    let cx = TraceContextPropagator::new().extract(&Metadata(md));
    cx.span().span_context().is_valid().then_some(cx.clone())
}

/// Makes `span` a child of a remote span (call before the span is entered or has children).
pub fn set_parent(span: &Span, parent: opentelemetry::Context) {
    if let Err(e) = span.set_parent(parent) {
        tracing::debug!(error = %e, "could not set a span's remote parent");
    }
}

/// The span context of `span` (for links); invalid when it is not traced.
pub fn span_context(span: &Span) -> SpanContext {
    span.context().span().span_context().clone()
}

/// The span context inside a remote context (for links).
pub fn remote_span_context(cx: &TraceContext) -> SpanContext {
    cx.span().span_context().clone()
}

/// Links `span` to `to` (before `span` is entered or has children).
pub fn link(span: &Span, to: SpanContext) {
    if to.is_valid() {
        span.add_link(to);
    }
}

/// Whether `span` is being recorded by the exporter (cheap: false at once without one).
pub fn is_traced(span: &Span) -> bool {
    !span.is_none() && span.context().span().span_context().is_sampled()
}

/// A debug-level span named `$name` as a child of the current span, or a disabled span when no
/// span is current: work that runs on behalf of a traced step joins its trace, and untraced
/// work never starts a trace of its own.
#[macro_export]
macro_rules! child_span {
    ($name:literal $(, $($fields:tt)*)?) => {
        if tracing::Span::current().is_none() {
            tracing::Span::none()
        } else {
            tracing::debug_span!($name $(, $($fields)*)?)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_only_when_sampled() {
        let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = remote_context(sampled).expect("a sampled context");
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(
            remote_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").is_none()
        );
        assert!(remote_context("").is_none());
        assert!(remote_context("not a traceparent").is_none());
        // Without an exporter no span is traced, and nothing is propagated.
        assert_eq!(traceparent(&tracing::info_span!("x")), "");
        assert_eq!(traceparent(&Span::none()), "");
    }

    #[test]
    fn metadata_context_reads_the_callers_traceparent() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert!(metadata_context(&md).is_none());
        md.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .expect("ascii"),
        );
        let cx = metadata_context(&md).expect("a context");
        assert_eq!(
            cx.span().span_context().span_id().to_string(),
            "00f067aa0ba902b7"
        );
    }
}
