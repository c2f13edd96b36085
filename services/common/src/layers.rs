//! Tower layers for cross-cutting server behaviour.
//!
//! [`InflightLimitLayer`] bounds how many calls of some RPCs may be open at once. Unlike
//! tower's `ConcurrencyLimit`, which frees its slot when the handler returns, the permit here
//! travels with the response *body*, so a server-streaming call holds it until its stream ends
//! (or its client goes away). When no permit is free the call is answered at once with
//! RESOURCE_EXHAUSTED: load is shed at the door instead of queueing without bound. A call the
//! layer let in finds [`Pending`] in its extensions, to take more permits once it knows it
//! counts for more than one (a request for n choices).
//!
//! [`EdgeStatusLayer`] gives transport-level answers the status gRPC specifies: RESOURCE_EXHAUSTED
//! for a request message or metadata over its limit, INVALID_ARGUMENT for a request message that
//! does not decode; and it counts a method's calls by final status, whatever answered them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::MeshError;

/// Limits open calls of the gRPC methods at `paths` (e.g. `/moemesh.v1.Generation/Generate`),
/// together.
#[derive(Clone)]
pub struct InflightLimitLayer {
    paths: &'static [&'static str],
    permits: Arc<Semaphore>,
    limit: usize,
    message: Arc<str>,
}

impl InflightLimitLayer {
    /// `message` is the RESOURCE_EXHAUSTED text; it should name the limit and its flag.
    pub fn new(paths: &'static [&'static str], limit: usize, message: impl Into<Arc<str>>) -> Self {
        InflightLimitLayer {
            paths,
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            message: message.into(),
        }
    }
}

impl InflightLimitLayer {
    /// A permit for a call that reaches the service another way (the frontend's HTTP API),
    /// counted with the gRPC calls; RESOURCE_EXHAUSTED with the layer's message when none is free.
    pub fn try_acquire(&self) -> Result<OwnedSemaphorePermit, tonic::Status> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| MeshError::Overloaded(self.message.to_string()).into())
    }

    /// The handle a call let in gets (in its extensions) for more permits.
    pub fn more(&self) -> Pending {
        Pending(MorePermits::new(
            self.permits.clone(),
            self.limit,
            self.message.clone(),
        ))
    }
}

/// More permits of a limit whose first permit a call already holds: the layer that took the
/// first puts its handle in the request's extensions, and a handler that learns the call counts
/// for more (n choices count as n requests) takes the rest before it starts any work.
#[derive(Clone)]
pub struct MorePermits {
    permits: Arc<Semaphore>,
    /// How many permits the limit has in all.
    pub limit: usize,
    /// RESOURCE_EXHAUSTED text when they are not free now.
    message: Arc<str>,
}

impl MorePermits {
    /// The limit of `limit` permits that `permits` counts; `message` says it is reached.
    pub fn new(permits: Arc<Semaphore>, limit: usize, message: impl Into<Arc<str>>) -> Self {
        MorePermits {
            permits,
            limit,
            message: message.into(),
        }
    }

    /// `n` more permits (none for 0), held until dropped; RESOURCE_EXHAUSTED with the limit's
    /// message when they are not all free now (none is taken then).
    pub fn try_take(&self, n: u32) -> Result<Option<OwnedSemaphorePermit>, MeshError> {
        if n == 0 {
            return Ok(None);
        }
        self.permits
            .clone()
            .try_acquire_many_owned(n)
            .map(Some)
            .map_err(|_| MeshError::Overloaded(self.message.to_string()))
    }
}

/// [`InflightLimitLayer`]'s [`MorePermits`], in the extensions of each call it let in.
#[derive(Clone)]
pub struct Pending(pub MorePermits);

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

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let permit = if self.layer.paths.contains(&req.uri().path()) {
            match self.layer.permits.clone().try_acquire_owned() {
                Ok(p) => {
                    req.extensions_mut().insert(self.layer.more());
                    Some(p)
                }
                Err(_) => {
                    let status =
                        tonic::Status::from(MeshError::Overloaded(self.layer.message.to_string()));
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

/// Called once per counted call with its final gRPC status code.
pub type CountFinal = fn(tonic::Code);

/// The server's edge, where transport-level answers get the status gRPC specifies and, for one
/// method, every call's final status is counted. Outermost, so that it sees every refusal.
///
/// - A request message over `max_decoding_message_size`: tonic says OUT_OF_RANGE; this makes it
///   RESOURCE_EXHAUSTED (gRPC's status-code guide: "sent message larger than configured limit"),
///   keeping tonic's message, which names the size and the limit.
/// - A request message that does not decode (invalid UTF-8 in a string, a truncated length,
///   wire type 7, groups nested past prost's recursion limit, a truncated or ill-flagged gRPC
///   frame): tonic says INTERNAL, which blames the server; this makes it INVALID_ARGUMENT,
///   keeping the message, which names the message type and field. Servers only: a client that
///   cannot decode a response still sees INTERNAL.
/// - Request metadata over `max_header_bytes`: RESOURCE_EXHAUSTED naming the size and the limit,
///   as gRPC's own servers do for their soft metadata limit. HTTP/2 can only refuse a stream
///   (431, which clients see as UNKNOWN) or, past its continuation-frame budget, the whole
///   connection (GOAWAY ENHANCE_YOUR_CALM), so its limit is set far higher (see
///   [`header_hard_limit`]) and this layer answers the one the operator chose, per request.
///
/// The status is in the response headers (a trailers-only answer) or in the body's trailers;
/// both are looked at. With [`count`](Self::count), the calls of one method are counted by their
/// final code: whatever answered them (a refusal here, an outer-layer refusal inside, the
/// handler's error, the stream's end), and CANCELLED when the body is dropped before its end
/// (the client went away).
#[derive(Clone, Copy)]
pub struct EdgeStatusLayer {
    max_header_bytes: usize,
    count: Option<(&'static [&'static str], CountFinal)>,
}

impl EdgeStatusLayer {
    pub fn new(max_header_bytes: usize) -> Self {
        EdgeStatusLayer {
            max_header_bytes,
            count: None,
        }
    }

    /// Calls `count` once for every call of the methods at `paths` (e.g.
    /// `/moemesh.v1.Generation/Generate`) with its final status code.
    pub fn count(mut self, paths: &'static [&'static str], count: CountFinal) -> Self {
        self.count = Some((paths, count));
        self
    }
}

/// The HTTP/2 header list limit that goes with a metadata limit of `max_header_bytes`: 16 times
/// it, and at least 1 MiB, far enough above the metadata limit that an oversized request gets
/// its RESOURCE_EXHAUSTED from [`EdgeStatusLayer`] while its connection's other streams go on.
/// Why so far: h2 answers a header block over this limit with 431 only while the block fits
/// in 1.25 × this limit's worth of CONTINUATION frames; beyond that (and beyond 4 × the limit
/// decoded) it sends GOAWAY (ENHANCE_YOUR_CALM) and every stream on the connection fails. At the
/// old 64 KiB, a 200 KB header block did that. h2 keeps one header block at a time per
/// connection, and the edge layer refuses an oversized request before any handler runs.
pub fn header_hard_limit(max_header_bytes: u32) -> u32 {
    max_header_bytes.saturating_mul(16).max(1 << 20)
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

impl<S> Layer<S> for EdgeStatusLayer {
    type Service = EdgeStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EdgeStatus {
            inner,
            layer: *self,
        }
    }
}

#[derive(Clone)]
pub struct EdgeStatus<S> {
    inner: S,
    layer: EdgeStatusLayer,
}

/// The start of tonic's message for an oversized request (`codec/decode.rs`), as it is in the
/// `grpc-message` header (percent-encoded: spaces are `%20`).
const OVERSIZE_MESSAGE: &[u8] = b"Error,%20decoded%20message%20length%20too%20large";

/// The starts of the INTERNAL messages tonic gives a request that does not decode: prost's
/// `DecodeError` (tonic-prost's codec), and tonic's own for a gRPC frame with a bad compression
/// flag, one cut short by the end of the stream, or one that does not decompress.
const DECODE_MESSAGES: [&[u8]; 4] = [
    b"failed%20to%20decode%20Protobuf%20message",
    b"protocol%20error:%20received%20message%20with",
    b"Unexpected%20EOF%20decoding%20stream",
    b"Error%20decompressing",
];

/// Gives an oversize OUT_OF_RANGE in `h` RESOURCE_EXHAUSTED, and a decode error's INTERNAL
/// INVALID_ARGUMENT; the final code, if `h` has one.
fn fix_status(h: &mut http::HeaderMap) -> Option<tonic::Code> {
    let code = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    let message = h.get("grpc-message").map_or(&[][..], |m| m.as_bytes());
    let fixed = match tonic::Code::from_i32(code) {
        tonic::Code::OutOfRange if message.starts_with(OVERSIZE_MESSAGE) => {
            tonic::Code::ResourceExhausted
        }
        tonic::Code::Internal if DECODE_MESSAGES.iter().any(|m| message.starts_with(m)) => {
            tonic::Code::InvalidArgument
        }
        other => return Some(other),
    };
    h.insert("grpc-status", http::HeaderValue::from(fixed as i32));
    Some(fixed)
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for EdgeStatus<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<EdgeBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let count = self
            .layer
            .count
            .filter(|(paths, _)| paths.contains(&req.uri().path()))
            .map(|(_, count)| count);
        let size = header_list_size(&req);
        let max = self.layer.max_header_bytes;
        let answer = move |mut resp: http::Response<ResBody>| {
            let code = fix_status(resp.headers_mut());
            // A trailers-only answer is final now; otherwise the body's trailers will say.
            let count = match (count, code) {
                (Some(f), Some(code)) => {
                    f(code);
                    None
                }
                (count, _) => count,
            };
            resp.map(|inner| EdgeBody { inner, count })
        };
        if size > max {
            // The inner service was readied for this call and is not called: it stays ready
            // for the next one.
            let status = tonic::Status::from(MeshError::Overloaded(format!(
                "request metadata is {size} bytes, over the limit of {max} bytes \
                 (--max-header-bytes)"
            )));
            let resp = answer(status.into_http::<ResBody>());
            return Box::pin(async move { Ok(resp) });
        }
        let fut = self.inner.call(req);
        Box::pin(async move { Ok(answer(fut.await?)) })
    }
}

/// A response body whose trailers go through [`fix_status`], and which counts its call's final
/// code when it has one to count.
#[derive(Default)]
pub struct EdgeBody<B> {
    inner: B,
    /// Set until the call's final code has been counted.
    count: Option<CountFinal>,
}

impl<B: Body + Unpin> Body for EdgeBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &mut frame
            && let Some(t) = f.trailers_mut()
            && let Some(code) = fix_status(t)
            && let Some(count) = self.count.take()
        {
            count(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for EdgeBody<B> {
    fn drop(&mut self) {
        // Dropped before its trailers: the client went away (or the connection did).
        if let Some(count) = self.count.take() {
            count(tonic::Code::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_permits_are_all_or_nothing_and_come_back_when_dropped() {
        let layer = InflightLimitLayer::new(&["/x"], 3, "at capacity (--max-pending 3)");
        let first = layer.try_acquire().expect("the door's permit");
        let more = layer.more().0;
        assert_eq!(more.limit, 3);
        assert!(more.try_take(0).expect("nothing to take").is_none());
        let two = more.try_take(2).expect("two of the three");
        let err = more.try_take(1).expect_err("none left");
        assert!(err.to_string().contains("--max-pending 3"), "{err}");
        drop(two);
        // Three asked with one held: none is taken.
        assert!(more.try_take(3).is_err());
        assert!(more.try_take(2).is_ok());
        drop(first);
    }

    /// `status` as the headers of a trailers-only answer, through [`fix_status`].
    fn fixed(status: tonic::Status) -> (Option<tonic::Code>, tonic::Status) {
        let mut resp = status.into_http::<tonic::body::Body>();
        let code = fix_status(resp.headers_mut());
        let back = tonic::Status::from_header_map(resp.headers()).expect("a status");
        (code, back)
    }

    #[test]
    fn decode_errors_become_invalid_argument_and_oversize_resource_exhausted() {
        use prost::Message;
        // What tonic-prost's codec answers for each kind of malformed message.
        let malformed: [&[u8]; 4] = [
            &[0x0a, 0x02, 0xff, 0xfe], // field 1 (a string): invalid UTF-8
            &[0x0a, 0x10, b'a'],       // a length of 16, and 1 byte
            &[0x0f],                   // wire type 7
            &[0x7b; 200],              // 200 nested groups
        ];
        for bytes in malformed {
            let err = moemesh_proto::v1::TokenizeRequest::decode(bytes).expect_err("malformed");
            let (code, status) = fixed(tonic::Status::internal(err.to_string()));
            assert_eq!(code, Some(tonic::Code::InvalidArgument), "{status:?}");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(
                status
                    .message()
                    .starts_with("failed to decode Protobuf message"),
                "{status:?}"
            );
        }
        for message in [
            "Unexpected EOF decoding stream.",
            "protocol error: received message with invalid compression flag: 7 (valid flags are 0 and 1), while sending request",
        ] {
            let (code, _) = fixed(tonic::Status::internal(message));
            assert_eq!(code, Some(tonic::Code::InvalidArgument), "{message}");
        }
        let (code, status) = fixed(tonic::Status::out_of_range(
            "Error, decoded message length too large: found 2097152 bytes, the limit is: 1048576 bytes",
        ));
        assert_eq!(code, Some(tonic::Code::ResourceExhausted));
        assert!(status.message().contains("1048576"), "{status:?}");
        // Anything else keeps its code.
        for status in [
            tonic::Status::internal("internal error"),
            tonic::Status::out_of_range("position 9 is past the end"),
            tonic::Status::ok(""),
        ] {
            let want = status.code();
            assert_eq!(fixed(status).0, Some(want));
        }
    }
}
