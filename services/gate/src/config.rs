//! `moemesh gate` configuration: flags and `MOEMESH_*` environment variables.

use std::path::PathBuf;

use clap::Args;
use moemesh_common::member_args::MemberArgs;
use moemesh_common::transport::{ExpertGraphs, IpcSync, TransportMode};

#[derive(Args, Debug, Clone)]
pub struct GateConfig {
    #[command(flatten)]
    pub member: MemberArgs,
    /// Model directory; the embedded default model when omitted.
    #[arg(long, env = "MOEMESH_MODEL")]
    pub model: Option<PathBuf>,
    /// The routed experts' format the workers are told (`--weights-dtype` of `moemesh expert`:
    /// `auto`, `bf16`, `fp8` or `int4`), for the weights format this role reports (ModelInfo / Info
    /// `weights_dtype`); it holds no routed experts itself.
    #[arg(long, env = "MOEMESH_WEIGHTS_DTYPE", default_value = "auto")]
    pub weights_dtype: moemesh_engine::ExpertsDtype,
    /// Without etcd: the expert workers' addresses (`host:port`, comma-separated).
    #[arg(long, env = "MOEMESH_EXPERT_ADDRS", value_delimiter = ',')]
    pub expert_addrs: Vec<String>,
    /// KV cache memory in MiB (the paged pool's size); ignored when --kv-blocks is given.
    /// Default: on a GPU, --kv-cache-fraction of the device memory free once the gate has
    /// loaded its weights; on the CPU, 1024.
    #[arg(long, env = "MOEMESH_KV_CACHE_MB")]
    pub kv_cache_mb: Option<u64>,
    /// On a GPU without --kv-cache-mb or --kv-blocks: the share of the device's free memory,
    /// measured once the gate has loaded its weights, that the KV pool takes. The rest stays for
    /// activations, CUDA graphs and expert workers on the same GPU (`moemesh up` starts its
    /// workers before its gates, so theirs are already counted; leave room for workers added
    /// later). Above 0, at most 0.95.
    #[arg(long, env = "MOEMESH_KV_CACHE_FRACTION", default_value_t = 0.5, value_parser = kv_fraction,
          allow_negative_numbers = true)]
    pub kv_cache_fraction: f64,
    /// KV pool size in blocks of 16 tokens (overrides --kv-cache-mb).
    #[arg(long, env = "MOEMESH_KV_BLOCKS")]
    pub kv_blocks: Option<usize>,
    /// Split each step into two micro-batches so one half's attention overlaps the other half's
    /// expert round trip. Off by default: on CPU it measured slower (docs/BENCHMARKS.md), since
    /// the halves compete for the same cores; `--overlap true` turns it on.
    #[arg(long, env = "MOEMESH_OVERLAP", default_value_t = false, action = clap::ArgAction::Set)]
    pub overlap: bool,
    /// Keep full KV blocks after their sequences finish and reuse them for prompts that start
    /// with the same tokens (within one cache salt); they are evicted least recently used first
    /// when the pool needs room. `--prefix-cache false` computes every prompt in full.
    #[arg(long, env = "MOEMESH_PREFIX_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,
    /// Host memory, in GB (10^9 bytes, fractions allowed), for a second tier of the prefix
    /// cache: full KV blocks evicted from the pool are copied there and copied back on a
    /// prefix hit instead of being computed again, least recently used dropped first (this
    /// also keeps a preempted sequence's blocks). 0 (the default): no host tier. Ignored with
    /// `--prefix-cache false`.
    #[arg(long, env = "MOEMESH_HOST_KV_CACHE_GB", default_value_t = 0.0, value_parser = host_gb,
          allow_negative_numbers = true)]
    pub host_kv_cache_gb: f64,
    /// Most seconds to let running sequences finish after SIGTERM. The gate leaves the
    /// registry first (frontends send it no new sequences) and waits until it holds none; any
    /// left at the deadline move to another gate, re-prefilled by their frontend.
    #[arg(long, env = "MOEMESH_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
    /// Most sequences one `Gate.Step` may carry; a larger step is refused with INVALID_ARGUMENT
    /// naming `seqs` and this limit. A frontend sends at most its --max-running (default 256).
    #[arg(long, env = "MOEMESH_MAX_STEP_SEQUENCES", default_value_t = 1024)]
    pub max_step_sequences: usize,
    /// Seconds an expert call may take (sending it and waiting for the reply) before the worker
    /// is taken for hung and the call is retried on a replica. Also the longest a layer's
    /// dispatch waits for the registry to list a live worker for an expert that has none.
    #[arg(long, env = "MOEMESH_EXPERT_TIMEOUT", default_value_t = 30)]
    pub expert_timeout: u64,
    /// Milliseconds to open a stream to an expert worker (TCP connect, TLS handshake, stream
    /// headers). A worker that accepts connections and never answers costs at most this, once;
    /// after that it is avoided with a growing backoff and probed in the background.
    #[arg(long, env = "MOEMESH_EXPERT_CONNECT_TIMEOUT_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub expert_connect_timeout_ms: u64,
    /// How activations reach expert workers: `auto` sets up CUDA IPC (device buffers shared on
    /// one host, any GPU) with every CUDA worker that accepts and keeps gRPC for the others;
    /// `grpc` sends every tensor in the gRPC messages (the baseline, or a way around a driver
    /// problem).
    #[arg(
        long,
        env = "MOEMESH_EXPERT_TRANSPORT",
        value_enum,
        default_value = "auto"
    )]
    pub expert_transport: TransportMode,
    /// Rows (tokens) each CUDA IPC buffer holds: 2 slots per worker of [rows, hidden] in the
    /// compute dtype plus [rows, hidden] f32. A layer call with more tokens takes gRPC.
    #[arg(long, env = "MOEMESH_EXPERT_IPC_ROWS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub expert_ipc_rows: u32,
    /// How a CUDA IPC session orders the gate's and the worker's work: `device` (the default)
    /// with flags that each GPU's stream writes and waits for, so that no host synchronises per
    /// layer and the gate's host queues a whole step ahead; `host` synchronises both hosts on
    /// every call (the earlier handshake, kept for comparison). A worker whose driver cannot wait
    /// on memory from a stream gets `host`.
    #[arg(
        long,
        env = "MOEMESH_EXPERT_IPC_SYNC",
        value_enum,
        default_value = "device"
    )]
    pub expert_ipc_sync: IpcSync,
    /// Decode steps through device-ordered workers as CUDA graphs (the step's ~650 launches and
    /// its per-layer calls queued as one replay): `auto` when the workers are on other GPUs or
    /// the processes run under MPS (which `moemesh up` starts where they share a GPU), `on`,
    /// or `off`. `MOEMESH_CUDA_GRAPHS=0` turns every graph off.
    #[arg(
        long,
        env = "MOEMESH_EXPERT_GRAPHS",
        value_enum,
        default_value = "auto"
    )]
    pub expert_graphs: ExpertGraphs,
    /// Load testing: skew every MoE layer's router by this Zipf exponent S, adding
    /// `-S·ln(1 + rank(e))` to the router logits before the top-k, with each layer's ranks a
    /// fixed permutation of its experts (so each layer has its own hot experts). 0 (the
    /// default) is off. It changes which experts tokens go to, and so the model's outputs: a
    /// knob for measuring expert load balancing without real traffic, never for serving.
    #[arg(long, env = "MOEMESH_ROUTER_SKEW", default_value_t = 0.0,
          value_parser = moemesh_common::skew::parse_router_skew, allow_negative_numbers = true)]
    pub router_skew: f32,
    /// Seconds of routed tokens per (layer, expert) the gate keeps as its recent load
    /// (`Gate.Info.expert_load_window`, the per-layer imbalance gauges), in buckets of a
    /// twelfth of it: what `moemesh rebalance` plans from.
    #[arg(long, env = "MOEMESH_LOAD_WINDOW_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub load_window_secs: u64,
}

/// `--host-kv-cache-gb`: a finite number of GB, at least 0.
fn host_gb(s: &str) -> Result<f64, String> {
    moemesh_common::skew::finite_non_negative("--host-kv-cache-gb", s)
}

fn kv_fraction(s: &str) -> Result<f64, String> {
    let f = moemesh_common::skew::finite_non_negative("--kv-cache-fraction", s)?;
    if f > 0.0 && f <= 0.95 {
        Ok(f)
    } else {
        Err(format!(
            "--kv-cache-fraction must be above 0 and at most 0.95 (got {s})"
        ))
    }
}

/// MiB of KV cache on the CPU when --kv-cache-mb is not given.
pub const CPU_KV_CACHE_MB: u64 = 1024;

impl GateConfig {
    /// The KV pool's bytes when --kv-blocks is not given: --kv-cache-mb if given; else, on a
    /// GPU (`device_free`: its free bytes after the gate's weights), --kv-cache-fraction of the
    /// free memory; else [`CPU_KV_CACHE_MB`].
    pub fn kv_cache_bytes(&self, device_free: Option<u64>) -> u64 {
        match (self.kv_cache_mb, device_free) {
            (Some(mb), _) => mb << 20,
            (None, Some(free)) => (free as f64 * self.kv_cache_fraction) as u64,
            (None, None) => CPU_KV_CACHE_MB << 20,
        }
    }

    /// The host tier's budget in bytes (`--host-kv-cache-gb`).
    pub fn host_kv_cache_bytes(&self) -> u64 {
        (self.host_kv_cache_gb * 1e9) as u64
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use moemesh_common::transport::ExpertGraphs;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: super::GateConfig,
    }

    #[test]
    fn the_prefix_cache_is_on_unless_turned_off() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("gate").chain(args.iter().copied()))
                .expect("the flags parse")
                .cfg
                .prefix_cache
        };
        assert!(parse(&[]));
        assert!(!parse(&["--prefix-cache=false"]));
        assert!(!parse(&["--prefix-cache", "false"]));
        assert!(parse(&["--prefix-cache", "true"]));
    }

    #[test]
    fn the_host_tier_is_off_unless_given_and_refuses_a_negative_size() {
        let gb = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("gate").chain(args.iter().copied()))
                .map(|c| c.cfg.host_kv_cache_bytes())
                .map_err(|e| e.to_string())
        };
        assert_eq!(gb(&[]), Ok(0));
        assert_eq!(gb(&["--host-kv-cache-gb", "0.5"]), Ok(500_000_000));
        let err = gb(&["--host-kv-cache-gb", "-1"]).expect_err("negative");
        assert!(err.contains("--host-kv-cache-gb"), "{err}");
        assert!(gb(&["--host-kv-cache-gb", "inf"]).is_err());
    }

    #[test]
    fn the_kv_cache_is_given_or_a_share_of_the_gpus_free_memory_or_the_cpu_default() {
        let cfg = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("gate").chain(args.iter().copied()))
                .map(|c| c.cfg)
                .map_err(|e| e.to_string())
        };
        let gib = 1u64 << 30;
        let default = cfg(&[]).expect("no flags");
        assert_eq!(default.kv_cache_bytes(None), 1024 << 20);
        assert_eq!(default.kv_cache_bytes(Some(40 * gib)), 20 * gib);
        let given = cfg(&["--kv-cache-mb", "4096"]).expect("a size");
        assert_eq!(given.kv_cache_bytes(Some(40 * gib)), 4 * gib);
        assert_eq!(given.kv_cache_bytes(None), 4 * gib);
        let share = cfg(&["--kv-cache-fraction", "0.25"]).expect("a share");
        assert_eq!(share.kv_cache_bytes(Some(40 * gib)), 10 * gib);
        for bad in ["0", "0.96", "-0.5", "NaN"] {
            let err = cfg(&["--kv-cache-fraction", bad]).expect_err(bad);
            assert!(err.contains("--kv-cache-fraction"), "{bad}: {err}");
        }
    }

    #[test]
    fn expert_graphs_default_to_auto_and_refuse_other_values_by_name() {
        let graphs = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("gate").chain(args.iter().copied()))
                .map(|c| c.cfg.expert_graphs)
                .map_err(|e| e.to_string())
        };
        assert_eq!(graphs(&[]), Ok(ExpertGraphs::Auto));
        assert_eq!(graphs(&["--expert-graphs", "off"]), Ok(ExpertGraphs::Off));
        assert_eq!(graphs(&["--expert-graphs=on"]), Ok(ExpertGraphs::On));
        let err = graphs(&["--expert-graphs", "sometimes"]).expect_err("not a value");
        assert!(err.contains("--expert-graphs"), "{err}");
    }

    #[test]
    fn the_router_skew_is_off_unless_given_and_refuses_a_negative_exponent() {
        let skew = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("gate").chain(args.iter().copied()))
                .map(|c| c.cfg.router_skew)
                .map_err(|e| e.to_string())
        };
        assert_eq!(skew(&[]), Ok(0.0));
        assert_eq!(skew(&["--router-skew", "1.5"]), Ok(1.5));
        for bad in ["-1", "NaN"] {
            let err = skew(&["--router-skew", bad]).expect_err(bad);
            assert!(err.contains("--router-skew"), "{err}");
        }
    }
}
