//! Limits that protect a serving process from its clients, shared by every role: how large a
//! message, how many streams and how much header a connection may bring, and how long a
//! connection may dawdle. Each role flattens [`ServerLimits`] into its config, builds its server
//! with [`ServerLimits::server`] and accepts connections through [`ServerLimits::incoming`].
//!
//! What bounds a slow or hostile client:
//! - before HTTP/2 starts, a connection must send the 24-byte connection preface within
//!   `--handshake-timeout` (hyper itself waits for it forever), or it is closed;
//! - after that, HTTP/2 keep-alive pings: hyper counts only complete requests and body data as
//!   activity, so a peer that trickles a partial frame gets a ping after `--keepalive-interval`
//!   and is closed when it does not answer within `--keepalive-timeout`;
//! - what one connection can make the server buffer is bounded by `--max-concurrent-streams`
//!   × `--max-message-mb`, a header block by 16 × `--max-header-bytes`, at least 1 MiB (HTTP/2's
//!   limit, kept far above the metadata limit so that metadata over `--max-header-bytes` gets
//!   RESOURCE_EXHAUSTED for its own request alone; see [`header_hard_limit`]), and a call that has
//!   not delivered its request within `--request-timeout` is cancelled.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use clap::Args;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;
use tower::layer::util::{Identity, Stack};

use crate::layers::{CountFinal, EdgeStatusLayer, header_hard_limit};

/// The HTTP/2 client connection preface's length (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest gRPC message this process accepts, in MiB (larger ones get RESOURCE_EXHAUSTED
    /// naming the limit). Default: 4 on the frontend, 256 on gates and expert workers (a
    /// step's activations).
    #[arg(long, env = "MOEMESH_MAX_MESSAGE_MB")]
    pub max_message_mb: Option<usize>,
    /// Most concurrent calls (HTTP/2 streams) on one client connection.
    #[arg(long, env = "MOEMESH_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,
    /// Largest request header block (gRPC metadata, counted as HTTP/2 does: each field's name
    /// and value plus 32 bytes), in bytes. A larger one gets RESOURCE_EXHAUSTED naming the
    /// limit, and the connection's other calls go on; one over 16× this (at least 1 MiB) is cut
    /// off by HTTP/2 (status 431; well beyond, the connection is closed).
    #[arg(long, env = "MOEMESH_MAX_HEADER_BYTES", default_value_t = 16 << 10)]
    pub max_header_bytes: u32,
    /// Seconds a new connection has to send the HTTP/2 connection preface; slower (or silent)
    /// connections are closed.
    #[arg(long, env = "MOEMESH_HANDSHAKE_TIMEOUT", default_value_t = 10)]
    pub handshake_timeout: u64,
    /// Seconds without a complete request or data on a connection before it is pinged.
    #[arg(long, env = "MOEMESH_KEEPALIVE_INTERVAL", default_value_t = 30)]
    pub keepalive_interval: u64,
    /// Seconds a pinged connection has to answer before it is closed.
    #[arg(long, env = "MOEMESH_KEEPALIVE_TIMEOUT", default_value_t = 10)]
    pub keepalive_timeout: u64,
    /// Seconds a call may take to deliver its request and get its response started (streams
    /// that are already open are not cut). A client's shorter `grpc-timeout` wins.
    #[arg(long, env = "MOEMESH_REQUEST_TIMEOUT", default_value_t = 60)]
    pub request_timeout: u64,
    /// New connections the kernel holds for the listening socket until the server accepts them
    /// (listen(2)'s backlog; Linux caps it at `net.core.somaxconn`). A burst of connections
    /// beyond it is dropped by the kernel, and its clients see resets: a load test opening
    /// 1,024 connections at once failed 7% of its calls with the 128 that tokio picks.
    #[arg(long, env = "MOEMESH_LISTEN_BACKLOG", default_value_t = 4096)]
    pub listen_backlog: u32,
}

impl ServerLimits {
    /// `--max-message-mb` in bytes, or `default_mb` MiB when it was not given.
    pub fn max_message_bytes(&self, default_mb: usize) -> usize {
        self.max_message_mb
            .unwrap_or(default_mb)
            .saturating_mul(1 << 20)
    }

    /// Checks the values before any port is bound; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            (
                "--max-concurrent-streams",
                u64::from(self.max_concurrent_streams),
            ),
            ("--max-header-bytes", u64::from(self.max_header_bytes)),
            ("--handshake-timeout", self.handshake_timeout),
            ("--keepalive-interval", self.keepalive_interval),
            ("--keepalive-timeout", self.keepalive_timeout),
            ("--request-timeout", self.request_timeout),
            ("--listen-backlog", u64::from(self.listen_backlog)),
            (
                "--max-message-mb",
                self.max_message_mb.map_or(1, |m| m as u64),
            ),
        ];
        match positive.iter().find(|(_, v)| *v == 0) {
            Some((flag, _)) => Err(format!("{flag} must be at least 1")),
            None => Ok(()),
        }
    }

    /// A tonic server builder with these limits (the per-message size is set on each service,
    /// with [`max_message_bytes`](Self::max_message_bytes); an oversized message or metadata is
    /// answered with RESOURCE_EXHAUSTED, a malformed one with INVALID_ARGUMENT: see
    /// [`EdgeStatusLayer`]).
    pub fn server(&self) -> tonic::transport::Server<Stack<EdgeStatusLayer, Identity>> {
        self.server_with(EdgeStatusLayer::new(self.max_header_bytes as usize))
    }

    /// [`server`](Self::server), counting every call of the methods at `paths` by its final
    /// status with `count`, refusals by these limits included.
    pub fn server_counting(
        &self,
        paths: &'static [&'static str],
        count: CountFinal,
    ) -> tonic::transport::Server<Stack<EdgeStatusLayer, Identity>> {
        self.server_with(EdgeStatusLayer::new(self.max_header_bytes as usize).count(paths, count))
    }

    fn server_with(
        &self,
        edge: EdgeStatusLayer,
    ) -> tonic::transport::Server<Stack<EdgeStatusLayer, Identity>> {
        tonic::transport::Server::builder()
            .max_concurrent_streams(self.max_concurrent_streams)
            .http2_max_header_list_size(header_hard_limit(self.max_header_bytes))
            .http2_keepalive_interval(Some(Duration::from_secs(self.keepalive_interval)))
            .http2_keepalive_timeout(Some(Duration::from_secs(self.keepalive_timeout)))
            .timeout(Duration::from_secs(self.request_timeout))
            .layer(edge)
    }

    /// Binds `addr` with `--listen-backlog` (see [`crate::serve::bind`]).
    pub fn bind(&self, addr: std::net::SocketAddr) -> io::Result<tokio::net::TcpListener> {
        crate::serve::bind(addr, self.listen_backlog)
    }

    /// `conns` (the listener's connections, after TLS where it is on: see
    /// [`crate::tls::incoming`]), each of which must bring its HTTP/2 connection preface within
    /// `--handshake-timeout`.
    pub fn incoming<T, S: Stream<Item = io::Result<T>>>(
        &self,
        conns: S,
    ) -> impl Stream<Item = io::Result<HandshakeDeadline<T>>> + use<T, S> {
        let limit = Duration::from_secs(self.handshake_timeout);
        conns.map(move |c| c.map(|c| HandshakeDeadline::new(c, limit)))
    }
}

/// A connection that fails its reads once `limit` has passed before [`PREFACE_LEN`] bytes
/// arrived; hyper then drops it. After that it is a plain pass-through.
pub struct HandshakeDeadline<T> {
    inner: T,
    /// Armed until the preface is in.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    limit: Duration,
    received: usize,
}

impl<T> HandshakeDeadline<T> {
    pub fn new(inner: T, limit: Duration) -> Self {
        HandshakeDeadline {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(limit))),
            limit,
            received: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HandshakeDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(d) = this.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            tracing::debug!(
                received = this.received,
                "closing a connection that did not send its HTTP/2 preface within {:?} (--handshake-timeout)",
                this.limit
            );
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 connection preface within --handshake-timeout",
            )));
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.deadline.is_some() {
            this.received += buf.filled().len() - before;
            if this.received >= PREFACE_LEN {
                this.deadline = None;
            }
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HandshakeDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The peer's connection info, as the connection inside gives it.
impl<T: Connected> Connected for HandshakeDeadline<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_fails_at_the_deadline_and_a_prompt_one_does_not() {
        let (client, server) = tokio::io::duplex(64);
        let mut conn = HandshakeDeadline::new(server, Duration::from_secs(5));
        let mut buf = [0u8; 64];
        // Nothing arrives: the read fails once the (paused, auto-advanced) clock passes 5 s.
        let err = conn.read(&mut buf).await.expect_err("deadline");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(client);

        let (mut client, server) = tokio::io::duplex(64);
        let mut conn = HandshakeDeadline::new(server, Duration::from_secs(5));
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("write");
        let mut got = 0;
        while got < PREFACE_LEN {
            got += conn.read(&mut buf[got..]).await.expect("preface");
        }
        // Past the deadline, an idle but established connection is left alone.
        tokio::time::sleep(Duration::from_secs(60)).await;
        client.write_all(b"x").await.expect("write");
        assert_eq!(conn.read(&mut buf).await.expect("read"), 1);
    }

    /// Every limit at its least value.
    fn least() -> ServerLimits {
        ServerLimits {
            max_message_mb: None,
            max_concurrent_streams: 1,
            max_header_bytes: 1,
            handshake_timeout: 1,
            keepalive_interval: 1,
            keepalive_timeout: 1,
            request_timeout: 1,
            listen_backlog: 1,
        }
    }

    #[test]
    fn zero_limits_are_refused_by_flag() {
        let mut l = least();
        assert_eq!(l.validate(), Ok(()));
        assert_eq!(l.max_message_bytes(4), 4 << 20);
        l.max_message_mb = Some(0);
        assert_eq!(
            l.validate(),
            Err("--max-message-mb must be at least 1".into())
        );
        l.max_message_mb = None;
        l.listen_backlog = 0;
        assert_eq!(
            l.validate(),
            Err("--listen-backlog must be at least 1".into())
        );
    }

    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_backlog_until_accepted() {
        // 200 connections arrive before the server accepts any (a load test's clients all
        // connecting at once). With tokio's backlog of 128 the kernel drops the SYNs past the
        // full accept queue, and those connects cannot complete until the server accepts; with
        // `--listen-backlog` above the burst every one completes at once. Where the system caps
        // backlogs lower (net.core.somaxconn), the burst shrinks to fit under the cap.
        let cap = crate::serve::somaxconn().map_or(4096, |c| c as usize);
        let burst = 200.min(cap.saturating_sub(1)).max(1);
        let limits = ServerLimits {
            listen_backlog: 256,
            ..least()
        };
        let listener = limits
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let connects = (0..burst).map(|_| tokio::net::TcpStream::connect(addr));
        // A connect the kernel dropped never completes while nothing accepts: the bound is
        // there to fail the test instead of hanging it, not to time anything.
        let clients =
            tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(connects))
                .await
                .expect("every connect completes with nothing accepted yet (none dropped)");
        let clients: Vec<_> = clients
            .into_iter()
            .collect::<io::Result<_>>()
            .expect("connect");
        let mut accepted = Vec::new();
        for _ in 0..burst {
            accepted.push(listener.accept().await.expect("accept").0);
        }
        assert_eq!((clients.len(), accepted.len()), (burst, burst));
    }
}
