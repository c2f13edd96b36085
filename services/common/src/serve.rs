//! Serving boilerplate every role shares: gRPC health and reflection, the shutdown signal, the
//! readiness line that `moemesh up` and the tests wait for, and one start-up/shutdown sequence
//! ([`Serving`]) with guard-counted draining ([`Drain`]) for the frontend, the gate and the expert
//! worker.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::registry::{Member, Registration, Registry};
use crate::{MeshError, MeshResult};

/// A role's health: the overall status (`""`, what readiness probes check) and its gRPC
/// service's own name (`moemesh.v1.Generation`, `.Gate`, `.Expert`), always set together, so a
/// client that checks the service by name gets the same answer.
#[derive(Clone)]
pub struct RoleHealth {
    reporter: HealthReporter,
    service: &'static str,
}

impl RoleHealth {
    pub fn new(reporter: HealthReporter, service: &'static str) -> Self {
        RoleHealth { reporter, service }
    }
}

/// Health (every status starts NOT_SERVING) and reflection, v1 and v1alpha, over moemesh's and
/// the health protocol's descriptors, advertising only what this role serves (`service`, health
/// and reflection), so grpcurl, ghz and grpcio-reflection need no .proto files.
pub fn health_and_reflection(
    service: &'static str,
) -> (
    RoleHealth,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
) {
    let (reporter, health) = tonic_health::server::health_reporter();
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(moemesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(service)
            .with_service_name("grpc.health.v1.Health")
    };
    let v1 = builder()
        .build_v1()
        .expect("the compiled-in descriptor sets are valid");
    let v1alpha = builder()
        .build_v1alpha()
        .expect("the compiled-in descriptor sets are valid");
    (RoleHealth::new(reporter, service), health, (v1, v1alpha))
}

/// A listening socket on `addr` whose accept queue holds `backlog` connections (tokio's own
/// `TcpListener::bind` asks for 128, which a load test's burst of connections overflows: the
/// kernel then drops them and their clients see resets). Linux caps the backlog at
/// `net.core.somaxconn`, silently; a lower cap is logged here, naming the sysctl. Call it
/// inside the runtime.
pub fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As tokio's bind does: a restarted server gets its port back while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    if let Some(cap) = somaxconn()
        && cap < backlog
    {
        tracing::warn!(
            %addr,
            backlog,
            somaxconn = cap,
            "the kernel caps this listener's backlog at net.core.somaxconn ({cap}, below \
             --listen-backlog {backlog}): a larger burst of new connections is dropped"
        );
    }
    socket.listen(backlog)
}

/// `net.core.somaxconn`, where the system shows it.
pub(crate) fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Accepted connections of `listener` with TCP_NODELAY set: every RPC here is a small
/// request/response exchange on a long-lived stream, where Nagle's algorithm plus delayed ACKs
/// would add ~40 ms stalls.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

/// Sets the overall health status (the `""` service, which readiness probes check) and the
/// role's service's.
pub async fn set_health(health: &RoleHealth, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.reporter.set_service_status("", status).await;
    if !health.service.is_empty() {
        health
            .reporter
            .set_service_status(health.service, status)
            .await;
    }
}

/// Mirrors a registration into the overall health: NOT_SERVING while the registry has lost this
/// process (a lease that expired during a stall, until it is written again), SERVING once it is
/// listed again, so readiness probes agree with what the other roles can see. Abort the returned
/// task at shutdown, before marking the role NOT_SERVING for good.
pub fn health_follows(
    reporter: RoleHealth,
    mut registered: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while registered.changed().await.is_ok() {
            let now = *registered.borrow_and_update();
            if !now {
                tracing::warn!("not in the registry: health NOT_SERVING until registered again");
            }
            set_health(&reporter, now).await;
        }
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Prints the one-line JSON readiness record on stdout: `{"event":"ready","role":…,"address":…,"id":…}`,
/// plus `"metrics":"host:port"` when the role serves `/metrics`. Printed only once the role
/// serves and (if it registers) is registered.
pub fn announce_ready(
    role: &str,
    address: SocketAddr,
    id: &str,
    metrics: Option<&crate::metrics::MetricsServer>,
) {
    let mut line = serde_json::json!({"event": "ready", "role": role, "address": address.to_string(), "id": id});
    if let Some(m) = metrics {
        line["metrics"] = serde_json::Value::String(m.address.to_string());
    }
    println!("{line}");
}

/// Waits for `fut`, but at most `limit`; used to bound draining at shutdown.
pub async fn bounded<F: Future>(limit: std::time::Duration, fut: F) -> Option<F::Output> {
    tokio::time::timeout(limit, fut).await.ok()
}

/// A role between start-up and shutdown: its server task, its health, and (for the roles that
/// register) its registry entry. Every role starts and stops through it, in the order the design
/// asks for: serve, report SERVING, register, announce readiness; then NOT_SERVING, leave the
/// registry, drain, stop the server.
pub struct Serving {
    /// The overall health status that readiness probes check.
    reporter: RoleHealth,
    /// Tells the server to stop accepting and close its connections gracefully.
    stop: oneshot::Sender<()>,
    /// The server, until its last connection is closed.
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    /// This process's registry entry, and the task mirroring it into health (registering roles).
    registration: Option<(Registration, JoinHandle<()>)>,
}

impl Serving {
    /// Spawns the server that `serve` builds around the stop signal it is given (for
    /// `serve_with_incoming_shutdown`), then reports SERVING.
    pub async fn start<F>(
        reporter: RoleHealth,
        serve: impl FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
    ) -> Self
    where
        F: Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(Box::pin(async {
            let _ = stopped.await;
        })));
        set_health(&reporter, true).await;
        Serving {
            reporter,
            stop,
            server,
            registration: None,
        }
    }

    /// Registers `member` (only now that this role serves), and from then on mirrors the
    /// registration into health (see [`health_follows`]).
    pub async fn register(&mut self, registry: &Registry, member: Member) -> MeshResult<()> {
        let registration = registry.register(member).await?;
        let follow = health_follows(self.reporter.clone(), registration.registered());
        self.registration = Some((registration, follow));
        Ok(())
    }

    /// Rewrites this role's registry entry (same id and role), e.g. an expert worker's experts
    /// after `SetExperts`; returns once watchers can see it. Before [`register`](Self::register)
    /// (or after [`leave`](Self::leave)) there is no entry to change.
    pub async fn update(&mut self, member: Member) -> MeshResult<()> {
        match &mut self.registration {
            Some((registration, _)) => registration.update(member).await,
            None => Err(MeshError::Unavailable(
                "not registered (starting or leaving)".into(),
            )),
        }
    }

    /// NOT_SERVING for good, then out of the registry (its lease revoked), so that no new work
    /// is sent here. The shutdowns below begin with it; calling it first is harmless.
    pub async fn leave(&mut self) {
        let registration = self.registration.take().map(|(registration, follow)| {
            follow.abort();
            registration
        });
        set_health(&self.reporter, false).await;
        if let Some(registration) = registration {
            registration.deregister().await;
        }
    }

    /// Shutdown for a role whose work outlives single calls (sequences on a gate, calls on an
    /// expert's long-lived streams): leaves, waits for `drained` (at most `limit`, naming `what`
    /// if it gives up), then stops the server and gives its streams `grace` to close.
    pub async fn drain_then_stop(
        mut self,
        drained: impl Future<Output = ()>,
        limit: Duration,
        what: &str,
        grace: Duration,
    ) {
        self.leave().await;
        if bounded(limit, drained).await.is_none() {
            tracing::warn!("drain timeout: stopping with {what} unfinished");
        }
        let _ = self.stop.send(());
        let _ = bounded(grace, self.server).await;
    }

    /// Shutdown for a role whose work is its accepted calls (the frontend's Generate streams):
    /// leaves, stops accepting at once (GOAWAY), and waits at most `limit` for the accepted calls
    /// to end, naming `what` if it gives up.
    pub async fn stop_then_drain(mut self, limit: Duration, what: &str) {
        self.leave().await;
        let _ = self.stop.send(());
        if bounded(limit, self.server).await.is_none() {
            tracing::warn!("drain timeout: exiting with {what} in flight");
        }
    }
}

/// Work that shutdown waits for, counted by guards instead of polled: each unit of work holds
/// an [`InFlightGuard`] from [`InFlight::enter`], and [`Drain::drained`] resolves the moment the
/// last guard is dropped (every sender of the channel is gone).
pub struct Drain {
    /// The one strong sender not held by work; dropped when draining starts.
    tx: mpsc::Sender<()>,
    /// Closed once `tx` and every guard are dropped.
    rx: mpsc::Receiver<()>,
}

/// Hands out guards; cloned into the service. Holds no guard itself, so it never delays a drain.
#[derive(Clone)]
pub struct InFlight(mpsc::WeakSender<()>);

/// One unit of work in flight; dropping it ends it.
pub struct InFlightGuard {
    _held: mpsc::Sender<()>,
}

impl Drain {
    pub fn new() -> (Drain, InFlight) {
        let (tx, rx) = mpsc::channel(1);
        let in_flight = InFlight(tx.downgrade());
        (Drain { tx, rx }, in_flight)
    }

    /// Resolves once every guard has been dropped.
    pub async fn drained(self) {
        let Drain { tx, mut rx } = self;
        drop(tx);
        // Nothing is ever sent: `recv` returns `None` when the last sender is gone.
        let _ = rx.recv().await;
    }
}

impl InFlight {
    /// A guard for one unit of work; `None` once a drain has finished (nothing waits any more).
    pub fn enter(&self) -> Option<InFlightGuard> {
        self.0.upgrade().map(|tx| InFlightGuard { _held: tx })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;
    use tonic_health::pb::health_server::Health;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus as Wire};

    #[tokio::test]
    async fn health_follows_the_registration_until_aborted() {
        let (inner, _server) = tonic_health::server::health_reporter();
        let reporter = RoleHealth::new(inner.clone(), "moemesh.v1.Expert");
        set_health(&reporter, true).await;
        let service = tonic_health::server::HealthService::from_health_reporter(inner);
        let mut updates = service
            .watch(tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            }))
            .await
            .expect("watch")
            .into_inner();
        let mut next = async || {
            updates
                .next()
                .await
                .expect("an update")
                .expect("a status")
                .status
        };
        assert_eq!(next().await, Wire::Serving as i32);
        let (registered, rx) = tokio::sync::watch::channel(true);
        let follow = health_follows(reporter.clone(), rx);
        registered.send_replace(false);
        assert_eq!(next().await, Wire::NotServing as i32, "lease lost");
        registered.send_replace(true);
        assert_eq!(next().await, Wire::Serving as i32, "registered again");
        // At shutdown the role aborts the follower and goes NOT_SERVING for good.
        follow.abort();
        let _ = follow.await;
        registered.send_replace(true);
        set_health(&reporter, false).await;
        assert_eq!(next().await, Wire::NotServing as i32);
    }

    #[tokio::test]
    async fn drained_waits_for_the_last_guard() {
        let (drain, in_flight) = Drain::new();
        let first = in_flight.enter().expect("a guard while serving");
        let second = in_flight.enter().expect("a guard while serving");
        let mut drained = std::pin::pin!(drain.drained());
        assert!(
            futures::poll!(&mut drained).is_pending(),
            "two calls in flight"
        );
        drop(first);
        assert!(
            futures::poll!(&mut drained).is_pending(),
            "one call in flight"
        );
        drop(second);
        drained.await;
        assert!(in_flight.enter().is_none(), "nothing waits after the drain");
    }

    /// The way out of a registering role: NOT_SERVING (and out of the registry) at once, the
    /// server still answering while its work drains, and stopped once the last guard is gone.
    #[tokio::test]
    async fn drain_then_stop_leaves_first_and_stops_after_the_work() {
        use tonic_health::pb::health_client::HealthClient;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let (reporter, health, _) = health_and_reflection("moemesh.v1.Expert");
        let mut serving = Serving::start(reporter, |stop| {
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(incoming(listener), stop)
        })
        .await;
        let member = Member {
            id: "expert-test".into(),
            role: crate::registry::Role::Expert,
            address: url.clone(),
            layers: vec![1],
            experts: vec![0],
            layer_experts: Vec::new(),
            device: "cpu".into(),
            fingerprint: "f".into(),
            version: String::new(),
        };
        serving
            .register(&Registry::Static(Vec::new()), member)
            .await
            .expect("register");
        let connect = |url: String| async move {
            let channel = tonic::transport::Endpoint::from_shared(url)?
                .connect()
                .await?;
            Ok::<_, tonic::transport::Error>(HealthClient::new(channel))
        };
        let mut client = connect(url.clone()).await.expect("connect");
        let mut updates = client
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("watch")
            .into_inner();
        let mut next = async || {
            updates
                .next()
                .await
                .expect("an update")
                .expect("a status")
                .status
        };
        assert_eq!(next().await, Wire::Serving as i32);

        let (drain, in_flight) = Drain::new();
        let call = in_flight.enter().expect("a call in flight");
        let stopping = tokio::spawn(serving.drain_then_stop(
            drain.drained(),
            Duration::from_secs(60),
            "calls",
            Duration::from_secs(60),
        ));
        assert_eq!(
            next().await,
            Wire::NotServing as i32,
            "left before draining"
        );
        assert!(!stopping.is_finished(), "a call is still in flight");
        drop(updates);
        drop(client);
        drop(call);
        stopping.await.expect("shutdown");
        assert!(connect(url).await.is_err(), "the server stopped listening");
    }
}
