//! `moemesh up`: a complete local mesh — N expert workers (the routed experts split evenly), one
//! gate and one frontend, each its own process — started in order, each waited for through its
//! readiness line, stopped together (SIGTERM, then SIGKILL) on Ctrl-C/SIGTERM or when the gate
//! or the frontend exits (an expert worker that exits leaves the rest running, so failover to
//! its replicas can be tried).
//!
//! With `--rebalance-every SECS` (and `--etcd`), `up` also moves experts by measured load: every
//! SECS seconds it runs `moemesh rebalance --apply`'s cycle against its gates (their loads
//! summed). It lives here, not in the gate, because placement is one decision per mesh: each gate
//! sees only its own traffic, and gates rebalancing on their own would undo each other's moves.
//! A mesh run by other means gets the same from `moemesh rebalance --apply` on a schedule.
//!
//! The internal hops (frontend → gate → workers) run mutual TLS with an ephemeral CA and one
//! certificate per process, made at start in a private temporary directory and deleted at exit
//! (`--plaintext` turns TLS off). The public port is plaintext on a loopback address; another
//! address needs `--public-plaintext` to say so (or the roles run alone, with real certificates).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use moemesh_common::tls::CertRole;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Model directory; the embedded default model when omitted.
    #[arg(long, env = "MOEMESH_MODEL")]
    pub model: Option<PathBuf>,
    /// Address of the public API (the frontend).
    #[arg(long, env = "MOEMESH_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Number of expert-worker processes, the routed experts split evenly between them; or
    /// `plan`: the workers of the memory plan (`moemesh plan`) over the GPUs of --device and
    /// --expert-devices, each sizing its shard from it (`moemesh expert --plan-shard`).
    #[arg(long, env = "MOEMESH_EXPERT_WORKERS", default_value = "2")]
    pub expert_workers: ExpertWorkers,
    /// With `--expert-workers plan`: the memory of each GPU in GiB (default: the total memory of
    /// --device's GPU).
    #[arg(long, env = "MOEMESH_GPU_MEM_GIB", value_parser = moemesh_common::memory_plan::positive_gib)]
    pub gpu_mem_gib: Option<f64>,
    /// With `--expert-workers plan`: the plan's reserves.
    #[command(
        flatten,
        next_help_heading = "Memory plan (with --expert-workers plan)"
    )]
    pub plan: moemesh_common::memory_plan::PlanReserves,
    /// How the routed experts are held (`auto`, `bf16`, `fp8`, `int4`), passed to every process
    /// (`moemesh expert --weights-dtype`); the plan counts their bytes so.
    #[arg(long, env = "MOEMESH_WEIGHTS_DTYPE", default_value = "auto")]
    pub weights_dtype: moemesh_engine::ExpertsDtype,
    /// Processes per expert shard: 2 starts every shard twice (replicas the gate balances over
    /// and fails over to), on the next device of --expert-devices.
    #[arg(long, env = "MOEMESH_EXPERT_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub expert_replicas: u16,
    /// etcd endpoint(s); without it the processes find each other through a static list.
    #[arg(long, env = "MOEMESH_ETCD")]
    pub etcd: Option<String>,
    /// Cluster name in registry keys.
    #[arg(long, env = "MOEMESH_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Compute dtype of gate and workers: `f32` or `bf16`.
    #[arg(long, env = "MOEMESH_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Device of the gate and of every expert worker: `cpu` or `cuda:N`.
    #[arg(long, env = "MOEMESH_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Devices of the expert workers, comma-separated, assigned round-robin (e.g. `cuda:1,cuda:2`
    /// puts the gate on --device and the experts on two other GPUs); defaults to --device.
    #[arg(long, env = "MOEMESH_EXPERT_DEVICES", value_delimiter = ',')]
    pub expert_devices: Vec<String>,
    /// Gate processes: each holds its own KV cache and runs its own sequences (the frontend
    /// balances new sequences over them), all sharing the expert workers. More gates use more
    /// GPUs (--gate-devices) for attention and the dense layers.
    #[arg(long, env = "MOEMESH_GATES", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub gates: u16,
    /// Devices of the gates, comma-separated, assigned round-robin; defaults to --device.
    #[arg(long, env = "MOEMESH_GATE_DEVICES", value_delimiter = ',')]
    pub gate_devices: Vec<String>,
    /// Serve Prometheus metrics: the frontend on this port, the (first) gate on the next, expert
    /// worker i on port + 2 + i, further gates after the workers (each on --metrics-host, at
    /// `/metrics`). Off when not given.
    #[arg(long, env = "MOEMESH_METRICS_BASE_PORT")]
    pub metrics_base_port: Option<u16>,
    /// Interface the metrics ports bind to.
    #[arg(long, env = "MOEMESH_METRICS_HOST", default_value = "127.0.0.1")]
    pub metrics_host: std::net::IpAddr,
    /// Also serve the OpenAI-compatible HTTP API on this address (the frontend's
    /// `--http-listen`): /v1/chat/completions, /v1/completions, /v1/models, /health.
    #[arg(long, env = "MOEMESH_HTTP_LISTEN")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// CUDA MPS: `auto` starts a private MPS daemon for the mesh when two of its processes share
    /// a GPU and nvidia-cuda-mps-control is installed (their kernels then run side by side
    /// instead of time-slicing the GPU: about 2x the mesh's decode speed on one H100); `on`
    /// whenever the mesh runs on CUDA; `off` never. A daemon named by CUDA_MPS_PIPE_DIRECTORY
    /// is used as it is.
    #[arg(long, env = "MOEMESH_MPS", value_enum, default_value = "auto")]
    pub mps: crate::mps::MpsMode,
    /// The gate's prefix cache (`moemesh gate --prefix-cache`): full KV blocks of finished
    /// prompts are kept and reused by prompts that start the same way.
    #[arg(long, env = "MOEMESH_PREFIX_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,
    /// The gates' host-memory tier for the prefix cache, in GB (`moemesh gate
    /// --host-kv-cache-gb`; 0: none): evicted KV blocks are kept in host memory and copied
    /// back on a hit.
    #[arg(long, env = "MOEMESH_HOST_KV_CACHE_GB", default_value_t = 0.0)]
    pub host_kv_cache_gb: f64,
    /// Load testing: the gates' router skew (`moemesh gate --router-skew`, a Zipf exponent; 0:
    /// off). It changes the model's outputs.
    #[arg(long, env = "MOEMESH_ROUTER_SKEW", default_value_t = 0.0,
          value_parser = moemesh_common::skew::parse_router_skew, allow_negative_numbers = true)]
    pub router_skew: f32,
    /// Move experts by measured load every this many seconds (`moemesh rebalance --apply`
    /// against the gates, their loads summed, placed per MoE layer; a move is made when it lowers
    /// the step share, each layer's busiest worker's share summed over the layers, by 2 points
    /// or more). Needs --etcd. Off when not given.
    #[arg(long, env = "MOEMESH_REBALANCE_EVERY", value_parser = clap::value_parser!(u64).range(1..))]
    pub rebalance_every: Option<u64>,
    /// Extra flags for the gate, e.g. `--gate-args=--overlap=true` (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    pub gate_args: Vec<String>,
    /// Extra flags for the frontend, e.g. `--frontend-args=--api-keys-file=keys.toml` (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    pub frontend_args: Vec<String>,
    /// Run every hop without TLS (by default the internal hops use mutual TLS with an ephemeral
    /// CA made at start).
    #[arg(long, env = "MOEMESH_PLAINTEXT")]
    pub plaintext: bool,
    /// Serve the public port (--listen) without TLS on a non-loopback address too. On loopback
    /// it is plaintext anyway.
    #[arg(long, env = "MOEMESH_PUBLIC_PLAINTEXT")]
    pub public_plaintext: bool,
}

/// `--expert-workers`: how many shards, split evenly, or the memory plan's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertWorkers {
    Even(usize),
    Plan,
}

impl std::str::FromStr for ExpertWorkers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "plan" {
            return Ok(ExpertWorkers::Plan);
        }
        match s.parse::<usize>() {
            Ok(0) => Err("--expert-workers: 0; a mesh needs at least 1".into()),
            Ok(n) => Ok(ExpertWorkers::Even(n)),
            Err(_) => Err(format!(
                "--expert-workers: {s:?} is neither a number of workers nor `plan`"
            )),
        }
    }
}

/// One expert-worker process `up` starts.
#[derive(Debug, Clone, PartialEq)]
struct WorkerSpec {
    /// Shard and replica, for the log.
    shard: usize,
    replica: usize,
    device: String,
    /// The experts it serves, `lo-hi`, for the log.
    experts: String,
    /// `--experts …`, or `--plan-shard …` with the plan's flags.
    flags: Vec<String>,
}

/// The expert workers `args` asks for. `gpu_mem_gib` reads a GPU's total memory, for a plan
/// without --gpu-mem-gib.
fn worker_specs(
    args: &UpArgs,
    cfg: &moemesh_engine::ModelConfig,
    gpu_mem_gib: impl FnOnce(&str) -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<WorkerSpec>> {
    use moemesh_common::memory_plan::{self, ModelBytes, PlanShard};
    let n_experts = cfg.n_routed_experts;
    let replicas = usize::from(args.expert_replicas);
    let n = match args.expert_workers {
        ExpertWorkers::Even(n) => n,
        ExpertWorkers::Plan => {
            if replicas > 1 {
                bail!(
                    "--expert-workers plan places one worker per shard; --expert-replicas {replicas} \
                     would need room the plan does not count (start replicas with `moemesh expert \
                     --plan-shard` on other GPUs)"
                );
            }
            if args.gates > 1 {
                bail!(
                    "--expert-workers plan places one gate, on --device; with --gates {} give \
                     --expert-workers a number (`moemesh plan` shows what fits)",
                    args.gates
                );
            }
            if args.gate_devices.iter().any(|d| *d != args.device) {
                bail!(
                    "--expert-workers plan puts the gate on --device {} (the plan's GPU 0); \
                     --gate-devices {} would put it elsewhere",
                    args.device,
                    args.gate_devices.join(",")
                );
            }
            let gpus = plan_gpus(args);
            if let Some(bad) = gpus.iter().find(|d| !d.starts_with("cuda")) {
                bail!(
                    "--expert-workers plan places the mesh on GPUs, and {bad} is not one: give \
                     --device cuda:N (and --expert-devices for the other GPUs)"
                );
            }
            let mem = match args.gpu_mem_gib {
                Some(g) => g,
                None => gpu_mem_gib(&gpus[0])?,
            };
            let model = ModelBytes::of_flag(cfg, args.weights_dtype);
            let input = args.plan.input(gpus.len(), mem);
            let plan = memory_plan::place(&model, &input)?;
            let mut specs = Vec::new();
            for (i, w) in plan.workers.iter().enumerate() {
                let shard = PlanShard {
                    index: i,
                    gpus: gpus.len(),
                };
                // The worker checks the plan fits (and refuses it with the GPUs over budget).
                let mut flags = vec![
                    "--plan-shard".to_string(),
                    shard.to_string(),
                    format!("--gpu-mem-gib={mem}"),
                ];
                flags.extend(args.plan.flags());
                specs.push(WorkerSpec {
                    shard: i,
                    replica: 0,
                    device: gpus[w.gpu].clone(),
                    experts: w.experts_flag(),
                    flags,
                });
            }
            if !plan.fits() {
                bail!(
                    "--expert-workers plan: the model does not fit {} × {mem:.2} GiB \
                     ({}; `moemesh plan --gpus {} --gpu-mem-gib {mem}` prints the plan)",
                    gpus.len(),
                    plan.overflow(),
                    gpus.len()
                );
            }
            // The plan as placed: each GPU's processes and bytes against its budget.
            for g in &plan.gpus {
                eprintln!(
                    "moemesh up: memory plan ({}): {} {}: {:.2} GiB of {:.2} (weights {:.2}, \
                     KV {:.2}, workspace {:.2})",
                    model.scheme.dtype.name(),
                    gpus[g.index],
                    plan.processes(g),
                    memory_plan::gib(g.total()),
                    memory_plan::gib(g.budget_bytes),
                    memory_plan::gib(g.weight_bytes),
                    memory_plan::gib(g.kv_bytes),
                    memory_plan::gib(g.workspace_bytes),
                );
            }
            return Ok(specs);
        }
    };
    if n > n_experts.max(1) {
        bail!("--expert-workers {n} exceeds the model's {n_experts} routed experts");
    }
    Ok((0..n * replicas)
        .map(|k| {
            // Shard i, replica r: replicas of one shard go on consecutive devices.
            let (i, r) = (k / replicas, k % replicas);
            let (lo, hi) = (i * n_experts / n, (i + 1) * n_experts / n);
            let experts = format!("{lo}-{}", hi - 1);
            WorkerSpec {
                shard: i,
                replica: r,
                device: worker_device(args, k),
                flags: vec!["--experts".into(), experts.clone()],
                experts,
            }
        })
        .collect())
}

/// The GPUs of `--expert-workers plan`, GPU 0 first: --device (the gate's), then the other
/// --expert-devices in their order.
fn plan_gpus(args: &UpArgs) -> Vec<String> {
    let mut gpus = vec![args.device.clone()];
    for d in &args.expert_devices {
        if !gpus.contains(d) {
            gpus.push(d.clone());
        }
    }
    gpus
}

/// The total memory of `device`'s GPU in GiB, read through a CUDA context that is released
/// before the mesh starts.
fn gpu_total_gib(device: &str) -> anyhow::Result<f64> {
    let d = moemesh_common::device::parse_device(device)?;
    let gpu = moemesh_engine::cuda::gpu(&d)
        .with_context(|| format!("{device}: not a GPU, so it has no GPU memory to plan with"))?;
    let (_, total) = gpu.memory_info()?;
    Ok(moemesh_common::memory_plan::gib(total))
}

/// Variables that would give the children another transport than the one `up` chooses.
const TRANSPORT_ENV: [&str; 6] = [
    "MOEMESH_TLS_CERT",
    "MOEMESH_TLS_KEY",
    "MOEMESH_TLS_CA",
    "MOEMESH_TLS_SERVER_NAME",
    "MOEMESH_PLAINTEXT",
    "MOEMESH_PUBLIC_PLAINTEXT",
];

/// The ephemeral CA and the per-process certificates, in a directory only this user can read
/// (mode 0700; the files 0600). Each certificate carries its process's role as a URI SAN
/// (`spiffe://moemesh/role/<role>`), which the gate and the workers check on their internal calls.
struct DevPki {
    dir: tempfile::TempDir,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl DevPki {
    fn new() -> anyhow::Result<Self> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("moemesh-up-pki-");
        // Created with mode 0700 (not the umask's usual 0755), so no one else may even list it.
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700));
        let dir = builder
            .tempdir()
            .context("creating the directory for the mesh's certificates")?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "moemesh up ephemeral CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().context("CA key")?;
        let cert = params.self_signed(&key).context("CA certificate")?;
        write_private(&dir.path().join("ca.pem"), cert.pem().as_bytes())?;
        Ok(DevPki {
            dir,
            ca: rcgen::Issuer::new(params, key),
        })
    }

    /// `--tls-cert/--tls-key/--tls-ca` for the process `name` in `role`: a certificate for
    /// localhost and 127.0.0.1 carrying the role, good as server and as client.
    fn flags(&self, name: &str, role: CertRole) -> anyhow::Result<Vec<String>> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .context("certificate names")?;
        params.subject_alt_names.push(rcgen::SanType::IpAddress(
            std::net::Ipv4Addr::LOCALHOST.into(),
        ));
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(role.uri()).context("role URI")?,
        ));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().context("key")?;
        let cert = params
            .signed_by(&key, &self.ca)
            .with_context(|| format!("certificate for {name}"))?;
        let (cert_path, key_path) = (
            self.dir.path().join(format!("{name}.pem")),
            self.dir.path().join(format!("{name}-key.pem")),
        );
        write_private(&cert_path, cert.pem().as_bytes())?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        let path = |p: &std::path::Path| p.display().to_string();
        Ok(vec![
            "--tls-cert".into(),
            path(&cert_path),
            "--tls-key".into(),
            path(&key_path),
            "--tls-ca".into(),
            path(&self.dir.path().join("ca.pem")),
        ])
    }
}

/// Writes a file only its owner can read.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .with_context(|| format!("writing {}", path.display()))
}

/// How each child is told its transport.
struct Transport {
    pki: Option<DevPki>,
}

impl Transport {
    fn flags(&self, name: &str, role: CertRole) -> anyhow::Result<Vec<String>> {
        match &self.pki {
            Some(pki) => pki.flags(name, role),
            None => Ok(vec!["--plaintext".into()]),
        }
    }
}

struct Proc {
    role: String,
    child: Child,
}

/// Starts `moemesh <args>` and waits for its ready line; returns the process and its address.
async fn start(
    role: &str,
    args: Vec<String>,
    env: &[(String, PathBuf)],
) -> anyhow::Result<(Proc, String)> {
    let exe = std::env::current_exe().context("locating the moemesh binary")?;
    let mut command = Command::new(exe);
    command.envs(env.iter().map(|(k, v)| (k, v)));
    for var in TRANSPORT_ENV {
        command.env_remove(var);
    }
    let mut child = command
        .arg(role)
        .args(&args)
        // Each child gets its own metrics port (or none) from `up`, never a shared one.
        .env_remove("MOEMESH_METRICS_LISTEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {role}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = tokio::select! {
            l = lines.next_line() => l?,
            status = child.wait() => bail!("{role} exited before it was ready ({})", status?),
        };
        let Some(line) = line else {
            bail!("{role} closed its output before it was ready")
        };
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["event"] == "ready"
        {
            break v["address"].as_str().unwrap_or_default().to_string();
        }
    };
    Ok((
        Proc {
            role: role.to_string(),
            child,
        },
        addr,
    ))
}

/// `--metrics-listen` for the process `offset` ports above --metrics-base-port, if it is set.
fn metrics_flag(args: &UpArgs, offset: usize) -> anyhow::Result<Vec<String>> {
    let Some(base) = args.metrics_base_port else {
        return Ok(Vec::new());
    };
    let port = u16::try_from(usize::from(base) + offset)
        .ok()
        .filter(|_| base != 0)
        .with_context(|| {
            format!(
                "--metrics-base-port {base}: needs {offset} more ports above it, within 1-65535"
            )
        })?;
    let addr = std::net::SocketAddr::new(args.metrics_host, port);
    Ok(vec!["--metrics-listen".into(), addr.to_string()])
}

/// Gate `g`'s device: --gate-devices round-robin, else --device.
fn gate_device(args: &UpArgs, g: usize) -> String {
    match args.gate_devices.as_slice() {
        [] => args.device.clone(),
        list => list[g % list.len()].clone(),
    }
}

/// Expert worker process `k`'s device: --expert-devices round-robin, else --device.
fn worker_device(args: &UpArgs, k: usize) -> String {
    match args.expert_devices.as_slice() {
        [] => args.device.clone(),
        list => list[k % list.len()].clone(),
    }
}

/// The device of every GPU-using process `up` starts (gates and expert workers).
fn process_devices(args: &UpArgs, workers: &[WorkerSpec]) -> Vec<String> {
    (0..usize::from(args.gates))
        .map(|g| gate_device(args, g))
        .chain(workers.iter().map(|w| w.device.clone()))
        .collect()
}

/// The gate's prefix-cache flags that differ from its defaults: `--prefix-cache=false` when
/// `up` turns it off, `--host-kv-cache-gb` when it gives a host tier.
fn prefix_cache_flag(args: &UpArgs) -> Vec<String> {
    let mut v = Vec::new();
    if !args.prefix_cache {
        v.push("--prefix-cache=false".to_string());
    }
    if args.host_kv_cache_gb != 0.0 {
        v.push(format!("--host-kv-cache-gb={}", args.host_kv_cache_gb));
    }
    v
}

fn common(args: &UpArgs) -> Vec<String> {
    let mut v = vec![
        "--weights-dtype".to_string(),
        args.weights_dtype.name().to_string(),
    ];
    if let Some(m) = &args.model {
        v.extend(["--model".to_string(), m.display().to_string()]);
    }
    if let Some(e) = &args.etcd {
        v.extend([
            "--etcd".to_string(),
            e.clone(),
            "--cluster".to_string(),
            args.cluster.clone(),
        ]);
    }
    v
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    if args.rebalance_every.is_some() && args.etcd.is_none() {
        bail!(
            "--rebalance-every needs --etcd: placement changes reach the gates through the registry \
             (a mesh without etcd has a fixed list of workers)"
        );
    }
    let files = moemesh_engine::ModelFiles::open_or_embedded(args.model.as_deref())
        .context("opening the model")?;
    let specs = worker_specs(&args, &files.config, gpu_total_gib)?;
    drop(files);
    let listen: std::net::SocketAddr = args.listen.parse().with_context(|| {
        format!(
            "--listen {:?}: not an address like 127.0.0.1:50051",
            args.listen
        )
    })?;
    if !args.plaintext && !args.public_plaintext && !listen.ip().is_loopback() {
        bail!(
            "--listen {listen}: the public port is plaintext, and this address is reachable from \
             other machines; pass --public-plaintext to accept that (or run the roles alone with \
             --tls-cert/--tls-key/--tls-ca for a TLS public port)"
        );
    }
    let transport = Transport {
        pki: (!args.plaintext).then(DevPki::new).transpose()?,
    };
    let mps = {
        let devices = process_devices(&args, &specs);
        let on_cuda = devices.iter().any(|d| d.starts_with("cuda"));
        let shares = crate::mps::shares_gpu(&devices);
        let control = crate::mps::find_on_path(crate::mps::CONTROL);
        let external = std::env::var_os("CUDA_MPS_PIPE_DIRECTORY").is_some();
        let (start, why) =
            crate::mps::decide(args.mps, on_cuda, shares, control.is_some(), external)?;
        match control.filter(|_| start) {
            Some(control) => {
                let d = crate::mps::MpsDaemon::start(&control)?;
                eprintln!(
                    "moemesh up: MPS daemon started ({why}), pipe {}",
                    d.pipe_dir().display()
                );
                Some(d)
            }
            None => {
                if on_cuda {
                    eprintln!("moemesh up: no MPS daemon of its own ({why})");
                }
                None
            }
        }
    };
    let child_env = mps.as_ref().map(|d| d.env()).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut procs = Vec::new();
        let mut rebalancer: Option<tokio::task::JoinHandle<()>> = None;
        let result = async {
            let mut worker_addrs = Vec::new();
            for (k, w) in specs.iter().enumerate() {
                let mut a = common(&args);
                a.extend(["--listen".into(), "127.0.0.1:0".into(), "--dtype".into(), args.dtype.clone()]);
                a.extend(w.flags.iter().cloned());
                a.extend(["--device".into(), w.device.clone()]);
                a.extend(metrics_flag(&args, 2 + k)?);
                a.extend(transport.flags(&format!("expert-{k}"), CertRole::Expert)?);
                let (p, addr) = start("expert", a, &child_env).await?;
                eprintln!("moemesh up: expert worker {} replica {} (experts {}) on {addr} ({}), pid {}", w.shard, w.replica, w.experts, w.device, p.child.id().unwrap_or(0));
                procs.push(p);
                worker_addrs.push(addr);
            }
            let mut gate_addrs = Vec::new();
            let workers = specs.len();
            for g in 0..usize::from(args.gates) {
                let mut a = common(&args);
                a.extend(["--listen".into(), "127.0.0.1:0".into(), "--dtype".into(), args.dtype.clone()]);
                a.extend(["--device".into(), gate_device(&args, g)]);
                let port = if g == 0 { 1 } else { 2 + workers + g - 1 };
                a.extend(metrics_flag(&args, port)?);
                a.extend(prefix_cache_flag(&args));
                if args.router_skew != 0.0 {
                    a.push(format!("--router-skew={}", args.router_skew));
                }
                a.extend(args.gate_args.iter().cloned());
                a.extend(transport.flags(&format!("gate-{g}"), CertRole::Gate)?);
                if args.etcd.is_none() {
                    a.extend(["--expert-addrs".into(), worker_addrs.join(",")]);
                }
                let (p, gate_addr) = start("gate", a, &child_env).await?;
                eprintln!("moemesh up: gate {g} on {gate_addr} ({})", gate_device(&args, g));
                procs.push(p);
                gate_addrs.push(gate_addr);
            }
            let mut a = common(&args);
            a.extend(["--listen".into(), args.listen.clone()]);
            a.extend(metrics_flag(&args, 0)?);
            if args.etcd.is_none() {
                a.extend(["--gate-addrs".into(), gate_addrs.join(",")]);
            }
            a.extend(transport.flags("frontend", CertRole::Frontend)?);
            if transport.pki.is_some() {
                a.push("--public-plaintext".into());
            }
            if let Some(http) = args.http_listen {
                a.extend(["--http-listen".into(), http.to_string()]);
            }
            a.extend(args.frontend_args.iter().cloned());
            let (p, addr) = start("frontend", a, &child_env).await?;
            if let Some(http) = args.http_listen {
                eprintln!("moemesh up: OpenAI-compatible HTTP API on http://{http}/v1");
            }
            procs.push(p);
            println!("{}", serde_json::json!({"event": "ready", "role": "up", "address": addr}));
            if let Some(every) = args.rebalance_every {
                let client = client_args(transport.flags("rebalancer", CertRole::Gate)?);
                rebalancer = Some(tokio::spawn(rebalance_loop(gate_addrs.clone(), client, every)));
            }
            let internal = if transport.pki.is_some() { "mutual TLS (ephemeral CA)" } else { "plaintext" };
            eprintln!("moemesh up: frontend (moemesh.v1.Generation) on {addr}, plaintext; internal hops: {internal}; Ctrl-C stops the mesh");
            anyhow::Ok(())
        }
        .await;
        if result.is_ok() {
            // Children's exits, each woken by its exit (SIGCHLD), not found by polling. An expert
            // worker that exits leaves the mesh running (its replicas, if any, take its calls;
            // without one, requests that need its experts fail UNAVAILABLE), so failover can be
            // tried under `up`; the gate or the frontend exiting stops the mesh.
            let mut waits: Vec<_> = procs
                .iter_mut()
                .map(|p| Box::pin(async { (p.role.as_str(), p.child.wait().await) }))
                .collect();
            loop {
                let exited = std::future::poll_fn(|cx| {
                    waits
                        .iter_mut()
                        .enumerate()
                        .find_map(|(i, w)| match w.as_mut().poll(cx) {
                            std::task::Poll::Ready(done) => Some((i, done)),
                            std::task::Poll::Pending => None,
                        })
                        .map_or(std::task::Poll::Pending, std::task::Poll::Ready)
                });
                tokio::select! {
                    _ = moemesh_common::serve::shutdown_signal() => {
                        eprintln!("moemesh up: stopping");
                        break;
                    }
                    (i, (role, status)) = exited => {
                        let status = status.map_or_else(|e| format!("cannot wait for it: {e}"), |s| s.to_string());
                        if role == "expert" {
                            eprintln!("moemesh up: an expert worker exited ({status}); the mesh keeps running (its replicas serve its experts; without one, requests that need them fail)");
                            drop(waits.remove(i));
                            continue;
                        }
                        eprintln!("moemesh up: {role} exited ({status}); stopping the mesh");
                        break;
                    }
                }
            }
            drop(waits);
        }
        if let Some(r) = rebalancer {
            r.abort();
        }
        stop_all(&mut procs).await;
        result
    })
}

/// `--tls-cert/--tls-key/--tls-ca` flags (or `--plaintext`) as a client's TLS settings.
fn client_args(flags: Vec<String>) -> moemesh_tools::client_args::ClientArgs {
    let mut c = moemesh_tools::client_args::ClientArgs::default();
    let mut it = flags.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().map(PathBuf::from);
        match flag.as_str() {
            "--tls-cert" => c.tls_cert = value(),
            "--tls-key" => c.tls_key = value(),
            "--tls-ca" => c.tls_ca = value(),
            _ => {}
        }
    }
    c
}

/// `--rebalance-every`: a rebalance cycle every `every` seconds, each reported on stderr; a cycle
/// that fails is reported and the next one tried.
async fn rebalance_loop(
    gates: Vec<String>,
    client: moemesh_tools::client_args::ClientArgs,
    every: u64,
) {
    let args = crate::rebalance_cmd::RebalanceArgs {
        addr: gates,
        plan: true,
        apply: true,
        spare: 2,
        max_copies: 2,
        memory_reserve_mb: 2048,
        cumulative: false,
        min_gain: 2.0,
        release_grace_ms: 1000,
        apply_timeout: 300,
        json: false,
        timeout: 10,
        client,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: skip it, there is no load yet.
    tick.tick().await;
    loop {
        tick.tick().await;
        match crate::rebalance_cmd::cycle(&args).await {
            Ok((p, applied)) => {
                let (now, planned) = p.busiest();
                eprintln!(
                    "moemesh up: rebalance: step share (each layer's busiest worker, summed) {now:.1}% now, {planned:.1}% planned; {}",
                    applied.line()
                );
            }
            Err(e) => eprintln!("moemesh up: rebalance failed: {e:#}"),
        }
    }
}

/// SIGTERM in reverse start order (frontend first, workers last), then SIGKILL stragglers.
async fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter_mut().rev() {
        if let Some(pid) = p.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(15), p.child.wait())
            .await
            .is_err()
        {
            let _ = p.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        up: UpArgs,
    }

    fn up(args: &[&str]) -> UpArgs {
        Cli::try_parse_from(std::iter::once("up").chain(args.iter().copied()))
            .expect("valid flags")
            .up
    }

    #[test]
    fn rebalancing_is_off_by_default_and_takes_whole_seconds() {
        assert_eq!(up(&[]).rebalance_every, None);
        assert_eq!(up(&["--rebalance-every", "30"]).rebalance_every, Some(30));
        assert!(Cli::try_parse_from(["up", "--rebalance-every", "0"]).is_err());
        let c = client_args(vec![
            "--tls-cert".into(),
            "c.pem".into(),
            "--tls-key".into(),
            "k.pem".into(),
            "--tls-ca".into(),
            "ca.pem".into(),
        ]);
        assert_eq!(c.tls_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(c.tls_cert, Some(PathBuf::from("c.pem")));
        assert!(client_args(vec!["--plaintext".into()]).tls_ca.is_none());
    }

    #[test]
    fn one_replica_per_shard_unless_asked_and_never_zero() {
        assert_eq!(up(&[]).expert_replicas, 1);
        assert_eq!(up(&["--expert-replicas", "2"]).expert_replicas, 2);
        assert!(Cli::try_parse_from(["up", "--gates", "0"]).is_err());
        assert!(Cli::try_parse_from(["up", "--expert-replicas", "0"]).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn the_pki_directory_is_private_and_certificates_carry_their_role() {
        use rustls::pki_types::pem::PemObject;
        use std::os::unix::fs::PermissionsExt;
        let pki = DevPki::new().expect("pki");
        let mode = std::fs::metadata(pki.dir.path())
            .expect("dir")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        let flags = pki.flags("gate", CertRole::Gate).expect("flags");
        let pem = std::fs::read(&flags[1]).expect("certificate");
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).expect("PEM");
        assert_eq!(CertRole::of_certificate(&der), [CertRole::Gate]);
        let mode = std::fs::metadata(&flags[3])
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    #[test]
    fn the_gate_keeps_its_prefix_cache_unless_up_turns_it_off() {
        assert!(prefix_cache_flag(&up(&[])).is_empty());
        assert_eq!(
            prefix_cache_flag(&up(&["--prefix-cache", "false"])),
            ["--prefix-cache=false"]
        );
        assert_eq!(
            prefix_cache_flag(&up(&["--host-kv-cache-gb", "2.5"])),
            ["--host-kv-cache-gb=2.5"]
        );
    }

    #[test]
    fn metrics_ports_count_up_from_the_base_port() {
        let args = up(&["--metrics-base-port", "9090"]);
        let flag = |offset| metrics_flag(&args, offset).expect("in range");
        assert_eq!(flag(0), ["--metrics-listen", "127.0.0.1:9090"]);
        assert_eq!(flag(1), ["--metrics-listen", "127.0.0.1:9091"]);
        assert_eq!(flag(3), ["--metrics-listen", "127.0.0.1:9093"]);
        assert!(metrics_flag(&up(&[]), 0).expect("off").is_empty());
        let high = up(&["--metrics-base-port", "65534", "--metrics-host", "0.0.0.0"]);
        assert_eq!(
            metrics_flag(&high, 1).expect("in range"),
            ["--metrics-listen", "0.0.0.0:65535"]
        );
        let err = metrics_flag(&high, 2).expect_err("past 65535");
        assert!(
            err.to_string().contains("--metrics-base-port 65534"),
            "{err}"
        );
    }

    /// V2-Lite's config (64 routed experts over 26 MoE layers).
    fn v2_lite() -> moemesh_engine::ModelConfig {
        let raw: moemesh_engine::config::RawConfig = serde_json::from_value(
            moemesh_engine::synthetic::synthetic_config_json("v2-lite").expect("synthetic"),
        )
        .expect("config");
        moemesh_engine::ModelConfig::from_raw(&raw).expect("valid")
    }

    fn no_gpu(device: &str) -> anyhow::Result<f64> {
        bail!("no GPU to ask for {device}")
    }

    fn devices(args: &UpArgs) -> Vec<String> {
        let specs = worker_specs(args, &v2_lite(), no_gpu).expect("workers");
        process_devices(args, &specs)
    }

    #[test]
    fn even_shards_split_the_experts_and_replicas_follow_their_shard() {
        let specs = worker_specs(
            &up(&["--expert-workers", "3", "--expert-replicas", "2"]),
            &v2_lite(),
            no_gpu,
        )
        .expect("workers");
        let got: Vec<(usize, usize, &str)> = specs
            .iter()
            .map(|w| (w.shard, w.replica, w.experts.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (0, 0, "0-20"),
                (0, 1, "0-20"),
                (1, 0, "21-41"),
                (1, 1, "21-41"),
                (2, 0, "42-63"),
                (2, 1, "42-63")
            ]
        );
        assert_eq!(specs[2].flags, ["--experts", "21-41"]);
        let err = worker_specs(&up(&["--expert-workers", "65"]), &v2_lite(), no_gpu)
            .expect_err("more workers than experts");
        assert!(
            err.to_string()
                .contains("--expert-workers 65 exceeds the model's 64"),
            "{err}"
        );
        for bad in ["0", "two", "2.5"] {
            let err = Cli::try_parse_from(["up", "--expert-workers", bad])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("--expert-workers"), "{bad}: {err}");
        }
    }

    #[test]
    fn plan_workers_take_the_memory_plans_shards_and_gpus() {
        // V2-Lite in bf16: 31.4 GB of routed experts. On 3 × 24 GiB the gate takes GPU 0
        // alone and the experts split over GPUs 1 and 2; each worker is told its shard of the
        // same plan.
        let args = up(&[
            "--device",
            "cuda:0",
            "--expert-devices",
            "cuda:1,cuda:2",
            "--expert-workers",
            "plan",
            "--kv-cache-gib",
            "2",
        ]);
        assert_eq!(plan_gpus(&args), ["cuda:0", "cuda:1", "cuda:2"]);
        let mut asked = Vec::new();
        let specs = worker_specs(&args, &v2_lite(), |d| {
            asked.push(d.to_string());
            Ok(24.0)
        })
        .expect("fits");
        // The GPU memory is read once, from the gate's GPU, and handed to every worker.
        assert_eq!(asked, ["cuda:0"]);
        let got: Vec<(&str, &str)> = specs
            .iter()
            .map(|w| (w.device.as_str(), w.experts.as_str()))
            .collect();
        assert_eq!(got, [("cuda:1", "0-31"), ("cuda:2", "32-63")]);
        assert_eq!(
            specs[1].flags,
            [
                "--plan-shard",
                "1/3",
                "--gpu-mem-gib=24",
                "--kv-cache-gib=2"
            ]
        );
        // The same plan as `moemesh plan` computes.
        let plan = moemesh_common::memory_plan::place(
            &moemesh_common::memory_plan::ModelBytes::of(
                &v2_lite(),
                moemesh_common::memory_plan::Scheme::new(
                    moemesh_common::memory_plan::WeightsDtype::Bf16,
                    &v2_lite(),
                ),
            ),
            &args.plan.input(3, 24.0),
        )
        .expect("plan");
        let flags: Vec<String> = plan.workers.iter().map(|w| w.experts_flag()).collect();
        assert_eq!(flags, ["0-31", "32-63"]);
        // One 24 GiB GPU holds the gate but not the experts beside it: refused, naming the GPU.
        let one = up(&[
            "--device",
            "cuda:0",
            "--expert-workers",
            "plan",
            "--gpu-mem-gib",
            "24",
        ]);
        let err = worker_specs(&one, &v2_lite(), no_gpu).expect_err("does not fit");
        assert!(
            err.to_string().contains("does not fit 1 × 24.00 GiB")
                && err.to_string().contains("GPU 0 needs"),
            "{err}"
        );
        // Plans are for GPUs, one gate and one replica.
        for (flags, says) in [
            (&["--device", "cpu"][..], "cpu is not one"),
            (&["--device", "cuda:0", "--gates", "2"][..], "--gates 2"),
            (
                &["--device", "cuda:0", "--expert-replicas", "2"][..],
                "--expert-replicas 2",
            ),
            (
                &["--device", "cuda:0", "--gate-devices", "cuda:1"][..],
                "--gate-devices cuda:1",
            ),
        ] {
            let mut a = vec!["--expert-workers", "plan", "--gpu-mem-gib", "80"];
            a.extend_from_slice(flags);
            let err = worker_specs(&up(&a), &v2_lite(), no_gpu).expect_err("refused");
            assert!(err.to_string().contains(says), "{flags:?}: {err}");
        }
    }

    #[test]
    fn gates_and_workers_go_round_robin_over_their_devices() {
        let a = up(&[
            "--device",
            "cuda:0",
            "--gates",
            "2",
            "--gate-devices",
            "cuda:0,cuda:1",
            "--expert-devices",
            "cuda:2,cuda:3",
        ]);
        assert_eq!(devices(&a), ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]);
        assert!(!crate::mps::shares_gpu(&devices(&a)));
        // Without device lists every process is on --device (and MPS is for them).
        let b = up(&[
            "--device",
            "cuda:0",
            "--gates",
            "2",
            "--expert-workers",
            "3",
        ]);
        assert_eq!(devices(&b), vec!["cuda:0"; 5]);
        assert!(crate::mps::shares_gpu(&devices(&b)));
        // Replicas count as processes: 2 shards × 2 replicas on two GPUs.
        let c = up(&[
            "--device",
            "cuda:0",
            "--expert-replicas",
            "2",
            "--expert-devices",
            "cuda:1,cuda:2",
        ]);
        assert_eq!(
            devices(&c),
            ["cuda:0", "cuda:1", "cuda:2", "cuda:1", "cuda:2"]
        );
    }
}
