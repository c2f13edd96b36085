//! Request metrics from the response stream itself: every Generate stream passes through
//! [`Metered`], which sees each token as it goes to the client (time to first token,
//! inter-token latency, tokens generated) and the stream's end, which it records on the
//! request's `generate` span. Watching the stream, not the step loop, sees every way a request
//! can end in one place: finished, failed on a gate, rerouted and failed, or abandoned by its
//! client.
//!
//! Requests by final status ([`count_request`]) are counted at the server's edge
//! (`EdgeStatusLayer`, set up in `service::run`), which also sees the calls that never reach the
//! handler: malformed or oversized messages, oversized metadata, refused keys, shed load.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::Stream;
use moemesh_common::MeshError;
use moemesh_common::metrics::{code_label, names};
use moemesh_proto::v1::{FinishReason, GenerateResponse};
use tonic::Status;

/// Counts a Generate call that ended with `code` (the server's edge layer calls it once per call).
pub fn count_request(code: tonic::Code) {
    metrics::counter!(names::REQUESTS, "code" => code_label(code)).increment(1);
}

/// Records how a request ended on its `generate` span (an error status marks the span failed;
/// a client that went away is not the server's error).
pub fn record_end(span: &tracing::Span, code: tonic::Code) {
    span.record("grpc_code", code_label(code));
    if !matches!(code, tonic::Code::Ok | tonic::Code::Cancelled) {
        span.record("otel.status_code", "ERROR");
    }
}

pub struct Metered<S> {
    inner: S,
    /// When the request arrived.
    start: Instant,
    /// When the previous token went out.
    last: Option<Instant>,
    /// Whether the final status has been recorded.
    done: bool,
    /// The request's choices (`sampling.n`), each of which ends with a finish reason.
    choices: u32,
    /// Choices finished so far.
    finished: u32,
    /// The request's `generate` span, which ends when the stream does (or later, when the step
    /// loop lets go of the sequence).
    span: tracing::Span,
}

impl<S> Metered<S> {
    pub fn new(inner: S, start: Instant, span: tracing::Span, choices: u32) -> Self {
        Metered {
            inner,
            start,
            last: None,
            done: false,
            choices,
            finished: 0,
            span,
        }
    }

    fn finish(&mut self, code: tonic::Code) {
        if !self.done {
            self.done = true;
            record_end(&self.span, code);
        }
    }
}

impl<S> Stream for Metered<S>
where
    S: Stream<Item = Result<GenerateResponse, Status>> + Unpin,
{
    type Item = Result<GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = std::task::ready!(Pin::new(&mut self.inner).poll_next(cx));
        match &item {
            Some(Ok(msg)) => {
                let now = Instant::now();
                if !msg.token_ids.is_empty() {
                    match self.last {
                        None => metrics::histogram!(names::TTFT)
                            .record(now.duration_since(self.start).as_secs_f64()),
                        Some(prev) => metrics::histogram!(names::ITL)
                            .record(now.duration_since(prev).as_secs_f64()),
                    }
                    self.last = Some(now);
                    metrics::counter!(names::TOKENS_GENERATED)
                        .increment(msg.token_ids.len() as u64);
                }
                if msg.finish_reason != FinishReason::Unspecified as i32 {
                    self.finished += 1;
                    if self.finished >= self.choices {
                        self.finish(tonic::Code::Ok);
                    }
                }
            }
            Some(Err(status)) => {
                let code = status.code();
                self.finish(code);
            }
            // The sender went away without a final message (the frontend is stopping): the
            // client gets UNAVAILABLE rather than a stream that ends OK without finishing.
            None if !self.done => {
                self.finish(tonic::Code::Unavailable);
                return Poll::Ready(Some(Err(MeshError::Unavailable(
                    "the frontend stopped before this request finished".into(),
                )
                .into())));
            }
            None => {}
        }
        Poll::Ready(item)
    }
}

impl<S> Drop for Metered<S> {
    fn drop(&mut self) {
        // Dropped before its end: the client went away.
        self.finish(tonic::Code::Cancelled);
    }
}
