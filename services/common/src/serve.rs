//! Serving boilerplate every role shares: gRPC health and reflection, the shutdown signal, and
//! the readiness line that `moemesh up` and the tests wait for.

use std::future::Future;
use std::net::SocketAddr;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Health service (overall status `""` starts NOT_SERVING) and reflection over moemesh's and
/// the health protocol's descriptors, so grpcurl and ghz need no .proto files.
pub fn health_and_reflection() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
) {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(moemesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the compiled-in descriptor sets are valid");
    (reporter, health, reflection)
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

/// Sets the overall health status (the `""` service), which readiness probes check.
pub async fn set_health(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
}

/// Mirrors a registration into the overall health: NOT_SERVING while the registry has lost this
/// process (a lease that expired during a stall, until it is written again), SERVING once it is
/// listed again, so readiness probes agree with what the other roles can see. Abort the returned
/// task at shutdown, before marking the role NOT_SERVING for good.
pub fn health_follows(
    reporter: HealthReporter,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;
    use tonic_health::pb::health_server::Health;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus as Wire};

    #[tokio::test]
    async fn health_follows_the_registration_until_aborted() {
        let (reporter, _server) = tonic_health::server::health_reporter();
        set_health(&reporter, true).await;
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
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
}
