//! The flags every registered mesh member (gate, expert worker) shares: where it listens, how
//! it is announced, which registry and cluster it joins, the device it computes on, its metrics
//! port and its TLS files.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Args;

use crate::limits::ServerLimits;
use crate::metrics::MetricsArgs;
use crate::registry::RegistryConfig;
use crate::tls::{Tls, TlsArgs};

#[derive(Args, Debug, Clone)]
pub struct MemberArgs {
    /// Address to serve gRPC on (port 0 picks a free port; the ready line says which).
    #[arg(long, env = "MOEMESH_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Address to announce in the registry (default: the bound address).
    #[arg(long, env = "MOEMESH_ADVERTISE")]
    pub advertise: Option<String>,
    /// etcd endpoints, comma-separated (e.g. `http://127.0.0.1:2379`). The process registers
    /// there; a gate also watches the expert workers there.
    #[arg(long, env = "MOEMESH_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Cluster name in registry keys.
    #[arg(long, env = "MOEMESH_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Registry id (default: `<role>-<advertised address>`).
    #[arg(long, env = "MOEMESH_ID")]
    pub id: Option<String>,
    /// Registry lease TTL in seconds (how long a crashed process stays listed).
    #[arg(long, env = "MOEMESH_LEASE_TTL", default_value_t = 5)]
    pub lease_ttl: i64,
    /// Device: `cpu`, or `cuda:N` in a CUDA build (scripts/build-cuda.sh); the process pins
    /// itself to that one GPU.
    #[arg(long, env = "MOEMESH_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute dtype: `f32` (exact) or `bf16`.
    #[arg(long, env = "MOEMESH_DTYPE", default_value = "f32")]
    pub dtype: String,
    #[command(flatten)]
    pub limits: ServerLimits,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    /// TLS for the member's own port (mutual: clients need a certificate the CA signed) and
    /// for the peers it dials.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `--max-message-mb` of gates and expert workers when not given: a step's or a layer call's
/// activations (4096 tokens × 7168 × bf16 is 56 MiB) with room to spare.
pub const DEFAULT_MAX_MESSAGE_MB: usize = 256;

impl MemberArgs {
    /// The address to announce and the registry id of a `role` process bound to `local`.
    pub fn identity(&self, role: &str, local: SocketAddr) -> (String, String) {
        let advertise = self.advertise.clone().unwrap_or_else(|| local.to_string());
        let id = self
            .id
            .clone()
            .unwrap_or_else(|| format!("{role}-{advertise}"));
        (advertise, id)
    }

    /// The registry this member joins, for the model called `model`.
    pub fn registry_config(&self, model: &str, tls: Option<Arc<Tls>>) -> RegistryConfig {
        RegistryConfig {
            etcd: self.etcd.clone(),
            cluster: self.cluster.clone(),
            model: model.to_string(),
            lease_ttl_s: self.lease_ttl,
            tls,
        }
    }
}
