//! `moemesh gate` configuration: flags and `MOEMESH_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct GateConfig {
    /// Address to serve gRPC on (port 0 picks a free port; the ready line says which).
    #[arg(long, env = "MOEMESH_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Address to announce in the registry (default: the bound address).
    #[arg(long, env = "MOEMESH_ADVERTISE")]
    pub advertise: Option<String>,
    /// Model directory; the embedded default model when omitted.
    #[arg(long, env = "MOEMESH_MODEL")]
    pub model: Option<PathBuf>,
    /// etcd endpoints, comma-separated; the gate registers there and watches expert workers.
    #[arg(long, env = "MOEMESH_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Without etcd: the expert workers' addresses (`host:port`, comma-separated).
    #[arg(long, env = "MOEMESH_EXPERT_ADDRS", value_delimiter = ',')]
    pub expert_addrs: Vec<String>,
    /// Cluster name in registry keys.
    #[arg(long, env = "MOEMESH_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Registry id (default: `gate-<advertised address>`).
    #[arg(long, env = "MOEMESH_ID")]
    pub id: Option<String>,
    /// Registry lease TTL in seconds.
    #[arg(long, env = "MOEMESH_LEASE_TTL", default_value_t = 5)]
    pub lease_ttl: i64,
    /// Device: `cpu` (CUDA devices `cuda:N` arrive with the CUDA backend).
    #[arg(long, env = "MOEMESH_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute dtype: `f32` (exact) or `bf16`.
    #[arg(long, env = "MOEMESH_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// KV cache memory in MiB (the paged pool's size); ignored when --kv-blocks is given.
    #[arg(long, env = "MOEMESH_KV_CACHE_MB", default_value_t = 1024)]
    pub kv_cache_mb: u64,
    /// KV pool size in blocks of 16 tokens (overrides --kv-cache-mb).
    #[arg(long, env = "MOEMESH_KV_BLOCKS")]
    pub kv_blocks: Option<usize>,
    /// Split each step into two micro-batches so one half's attention overlaps the other half's
    /// expert round trip. Off by default: on CPU it measured slower (docs/BENCHMARKS.md), since
    /// the halves compete for the same cores; `--overlap true` turns it on.
    #[arg(long, env = "MOEMESH_OVERLAP", default_value_t = false, action = clap::ArgAction::Set)]
    pub overlap: bool,
    /// Seconds an expert call may take before it is retried elsewhere.
    #[arg(long, env = "MOEMESH_EXPERT_TIMEOUT", default_value_t = 30)]
    pub expert_timeout: u64,
}
