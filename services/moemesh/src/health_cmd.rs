//! `moemesh health`: one `grpc.health.v1.Health/Check` against a role's serving port, for
//! container health checks and exec probes where no gRPC probe is built in (docker compose,
//! Kubernetes with TLS on the serving port, which the kubelet's gRPC probe cannot speak).

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// Address of the frontend, gate or expert worker to check (`host:port`).
    #[arg(long, env = "MOEMESH_HEALTH_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Health service name; `""` (the default) is the process as a whole, which turns
    /// NOT_SERVING when it starts draining.
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this many seconds (connecting included).
    #[arg(long, default_value_t = 2)]
    pub timeout: u64,
    /// TLS as for the role's own peers: with mTLS on the gate and expert workers, the role's own
    /// certificate (`MOEMESH_TLS_*` in its container) is what the probe presents.
    #[command(flatten)]
    pub client: moemesh_tools::client_args::ClientArgs,
}

/// Succeeds (exit 0) only when the status is SERVING; otherwise the error names the status.
pub fn run(args: HealthArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let limit = Duration::from_secs(args.timeout);
    let status = rt.block_on(async {
        tokio::time::timeout(limit, async {
            let channel = args.client.channel(&args.addr).await?;
            let reply = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: args.service.clone(),
                })
                .await
                .with_context(|| format!("grpc.health.v1.Health/Check on {}", args.addr))?;
            anyhow::Ok(reply.into_inner().status)
        })
        .await
        .with_context(|| format!("no answer from {} within {}s", args.addr, args.timeout))?
    })?;
    let status = ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown);
    if status != ServingStatus::Serving {
        bail!("{} is {}", args.addr, status.as_str_name());
    }
    println!("{} SERVING", args.addr);
    Ok(())
}
