//! An in-test OTLP collector: a tonic server implementing the OTLP `TraceService` on
//! `127.0.0.1:0` that keeps every span it receives, with the `service.name` of the process that
//! sent it, so that a test can look at whole traces across processes. Tests wait on it with a
//! deadline and a change notification (every export wakes the waiters), never a fixed sleep.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tokio::sync::watch;

/// One received span, flattened for assertions (ids in lowercase hex).
#[derive(Debug, Clone)]
pub struct SpanRecord {
    /// `service.name` of the process that exported it.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// Attribute values, as text.
    pub attributes: BTreeMap<String, String>,
    /// (trace id, span id) of each link.
    pub links: Vec<(String, String)>,
}

impl SpanRecord {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// A running collector; its server stops when this is dropped.
pub struct Collector {
    /// What to put in `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    spans: Arc<Mutex<Vec<SpanRecord>>>,
    changed: watch::Receiver<usize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Service {
    spans: Arc<Mutex<Vec<SpanRecord>>>,
    changed: watch::Sender<usize>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| attributes(&r.attributes).remove("service.name"))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(SpanRecord {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: attributes(&span.attributes),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                });
            }
        }
        let total = {
            let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
            spans.extend(got);
            spans.len()
        };
        self.changed.send_replace(total);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Starts serving on a free loopback port (call inside a tokio runtime).
    pub async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port for the collector");
        let addr = listener.local_addr().expect("bound address");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let (tx, changed) = watch::channel(0);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = TraceServiceServer::new(Service {
            spans: spans.clone(),
            changed: tx,
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        Collector {
            endpoint: format!("http://{addr}"),
            spans,
            changed,
            _stop: stop,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<SpanRecord> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until `check` finds what it wants in the spans received so far (checked again
    /// after every export), at most `within`; on timeout, the spans received, for the message.
    pub async fn wait_for<T>(
        &self,
        within: Duration,
        mut check: impl FnMut(&[SpanRecord]) -> Option<T>,
    ) -> Result<T, Vec<SpanRecord>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut changed = self.changed.clone();
        loop {
            changed.borrow_and_update();
            let spans = self.spans();
            if let Some(t) = check(&spans) {
                return Ok(t);
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(self.spans()),
            }
        }
    }
}
