//! Running one mesh role in this process: bind the configured address, serve until Ctrl-C or
//! SIGTERM, then shut down as the role's `run` describes.

use std::net::SocketAddr;

use anyhow::Context;
use moemesh_common::serve::shutdown_signal;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Binds `addr` with the role's `--listen-backlog`, once the limits are checked (a zero limit is
/// refused by flag before any port is bound); inside the runtime.
fn bind(
    addr: SocketAddr,
    limits: &moemesh_common::limits::ServerLimits,
) -> anyhow::Result<tokio::net::TcpListener> {
    limits.validate().map_err(anyhow::Error::msg)?;
    limits.bind(addr).with_context(|| format!("binding {addr}"))
}

pub fn frontend(cfg: moemesh_frontend::FrontendConfig) -> anyhow::Result<()> {
    tracing::info!(config = ?cfg, "frontend");
    // TLS or --plaintext must be chosen before any port is bound.
    cfg.tls.check()?;
    runtime()?.block_on(async {
        let listener = bind(cfg.listen, &cfg.limits)?;
        moemesh_frontend::run(cfg, listener, shutdown_signal())
            .await
            .context("frontend")
    })
}

pub fn gate(cfg: moemesh_gate::GateConfig) -> anyhow::Result<()> {
    tracing::info!(config = ?cfg, "gate");
    cfg.member.tls.check()?;
    runtime()?.block_on(async {
        let listener = bind(cfg.member.listen, &cfg.member.limits)?;
        moemesh_gate::run(cfg, listener, shutdown_signal())
            .await
            .context("gate")
    })
}

pub fn expert(cfg: moemesh_expert::ExpertConfig) -> anyhow::Result<()> {
    tracing::info!(config = ?cfg, "expert");
    cfg.member.tls.check()?;
    runtime()?.block_on(async {
        let listener = bind(cfg.member.listen, &cfg.member.limits)?;
        moemesh_expert::run(cfg, listener, shutdown_signal())
            .await
            .context("expert worker")
    })
}
