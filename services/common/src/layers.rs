//! Tower layers for cross-cutting server behaviour.
//!
//! [`InflightLimitLayer`] bounds how many calls of one streaming RPC may be open at once. Unlike
//! tower's `ConcurrencyLimit`, which frees its slot when the handler returns, the permit here
//! travels with the response *body*, so a server-streaming call holds it until its stream ends
//! (or its client goes away). When no permit is free the call is answered at once with
//! RESOURCE_EXHAUSTED: load is shed at the door instead of queueing without bound.
//!
//! [`OversizeStatusLayer`] answers a request message over the size limit with
//! RESOURCE_EXHAUSTED, the code gRPC specifies for it, where tonic says OUT_OF_RANGE, and does the
//! same for request metadata over `--max-header-bytes`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

/// Limits open calls of the gRPC method at `path` (e.g. `/moemesh.v1.Generation/Generate`).
#[derive(Clone)]
pub struct InflightLimitLayer {
    path: &'static str,
    permits: Arc<Semaphore>,
    message: Arc<str>,
    /// Counts the calls turned away.
    rejected: metrics::Counter,
}

impl InflightLimitLayer {
    /// `message` is the RESOURCE_EXHAUSTED text; it should name the limit and its flag.
    pub fn new(path: &'static str, limit: usize, message: impl Into<Arc<str>>) -> Self {
        InflightLimitLayer {
            path,
            permits: Arc::new(Semaphore::new(limit)),
            message: message.into(),
            rejected: metrics::Counter::noop(),
        }
    }

    /// Counts every call turned away on `rejected` (a handle taken after the recorder is
    /// installed).
    pub fn count_rejected(mut self, rejected: metrics::Counter) -> Self {
        self.rejected = rejected;
        self
    }
}

impl<S> Layer<S> for InflightLimitLayer {
    type Service = InflightLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InflightLimit {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct InflightLimit<S> {
    inner: S,
    layer: InflightLimitLayer,
}

/// The future of the layers' services: boxed, because it awaits the inner service's.
pub type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for InflightLimit<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<PermitBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let permit = if req.uri().path() == self.layer.path {
            match self.layer.permits.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    self.layer.rejected.increment(1);
                    let status = tonic::Status::resource_exhausted(self.layer.message.to_string());
                    return Box::pin(async move {
                        Ok(status
                            .into_http::<ResBody>()
                            .map(PermitBody::without_permit))
                    });
                }
            }
        } else {
            None
        };
        // The readied service handles this call; a fresh clone takes its place (tower's rule
        // for services that are driven to readiness before `call`).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            Ok(resp.map(|body| PermitBody {
                inner: body,
                _permit: permit,
            }))
        })
    }
}

/// A response body that holds an in-flight permit until it is finished or dropped.
#[derive(Default)]
pub struct PermitBody<B> {
    inner: B,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<B> PermitBody<B> {
    /// `inner`, holding `permit` (if any) until it is finished or dropped.
    pub fn new(inner: B, permit: Option<OwnedSemaphorePermit>) -> Self {
        PermitBody {
            inner,
            _permit: permit,
        }
    }

    fn without_permit(inner: B) -> Self {
        PermitBody {
            inner,
            _permit: None,
        }
    }
}

impl<B: Body + Unpin> Body for PermitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Rewrites tonic's OUT_OF_RANGE for a request message over `max_decoding_message_size` into
/// RESOURCE_EXHAUSTED (gRPC's status-code guide: "sent message larger than configured limit"),
/// keeping tonic's message, which names the size and the limit. The status is in the response
/// headers (a trailers-only answer) or in the body's trailers; both are looked at.
///
/// It also refuses a request whose metadata is over `max_header_bytes` with RESOURCE_EXHAUSTED
/// naming the size and the limit, as gRPC's own servers do for their soft metadata limit. HTTP/2
/// itself can only answer 431, which gRPC clients see as UNKNOWN, so the HTTP/2 limit is set
/// higher (see [`header_hard_limit`]) and this layer enforces the one the operator chose.
#[derive(Clone, Copy)]
pub struct OversizeStatusLayer {
    max_header_bytes: usize,
}

impl OversizeStatusLayer {
    pub fn new(max_header_bytes: usize) -> Self {
        OversizeStatusLayer { max_header_bytes }
    }
}

/// The HTTP/2 header list limit that goes with a metadata limit of `max_header_bytes`: four
/// times it, and at least 64 KiB. Between the two a client gets a gRPC status; only a header
/// block beyond this one is cut off by HTTP/2 (431) before the server buffers it.
pub fn header_hard_limit(max_header_bytes: u32) -> u32 {
    max_header_bytes.saturating_mul(4).max(64 << 10)
}

/// A request's header list size as HTTP/2 counts it (RFC 9113 §6.5.2: each field's name and
/// value plus 32 bytes), the pseudo-header fields included.
fn header_list_size<B>(req: &http::Request<B>) -> usize {
    const FIELD_OVERHEAD: usize = 32;
    let pseudo = [
        (":method".len(), req.method().as_str().len()),
        (":scheme".len(), req.uri().scheme_str().map_or(0, str::len)),
        (
            ":authority".len(),
            req.uri().authority().map_or(0, |a| a.as_str().len()),
        ),
        (
            ":path".len(),
            req.uri().path_and_query().map_or(0, |p| p.as_str().len()),
        ),
    ];
    let pseudo: usize = pseudo.iter().map(|(n, v)| n + v + FIELD_OVERHEAD).sum();
    let fields: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + FIELD_OVERHEAD)
        .sum();
    pseudo + fields
}

impl<S> Layer<S> for OversizeStatusLayer {
    type Service = OversizeStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OversizeStatus {
            inner,
            max_header_bytes: self.max_header_bytes,
        }
    }
}

#[derive(Clone)]
pub struct OversizeStatus<S> {
    inner: S,
    max_header_bytes: usize,
}

/// The start of tonic's message for an oversized request (`codec/decode.rs`), as it is in the
/// `grpc-message` header (percent-encoded: spaces are `%20`).
const OVERSIZE_MESSAGE: &[u8] = b"Error,%20decoded%20message%20length%20too%20large";

/// Turns an oversize OUT_OF_RANGE in `h` into RESOURCE_EXHAUSTED.
fn fix_oversize_status(h: &mut http::HeaderMap) {
    let oversize = h.get("grpc-status").map(|v| v.as_bytes()) == Some(b"11".as_slice())
        && h.get("grpc-message")
            .is_some_and(|m| m.as_bytes().starts_with(OVERSIZE_MESSAGE));
    if oversize {
        h.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for OversizeStatus<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<OversizeBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let size = header_list_size(&req);
        if size > self.max_header_bytes {
            // The inner service was readied for this call and is not called: it stays ready
            // for the next one.
            let status = tonic::Status::resource_exhausted(format!(
                "request metadata is {size} bytes, over the limit of {} bytes \
                 (--max-header-bytes)",
                self.max_header_bytes
            ));
            return Box::pin(async move {
                Ok(status
                    .into_http::<ResBody>()
                    .map(|inner| OversizeBody { inner }))
            });
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            fix_oversize_status(resp.headers_mut());
            Ok(resp.map(|inner| OversizeBody { inner }))
        })
    }
}

/// A response body whose trailers go through [`fix_oversize_status`].
#[derive(Default)]
pub struct OversizeBody<B> {
    inner: B,
}

impl<B: Body + Unpin> Body for OversizeBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(frame.map(|f| {
            f.map(|mut f| {
                if let Some(t) = f.trailers_mut() {
                    fix_oversize_status(t);
                }
                f
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
