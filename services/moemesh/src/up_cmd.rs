//! `moemesh up`: a complete local mesh — N expert workers (the routed experts split evenly), one
//! gate and one frontend, each its own process — started in order, each waited for through its
//! readiness line, stopped together (SIGTERM, then SIGKILL) on Ctrl-C/SIGTERM or when any of
//! them exits.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
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
    /// Number of expert-worker processes; the routed experts are split evenly between them.
    #[arg(long, env = "MOEMESH_EXPERT_WORKERS", default_value_t = 2)]
    pub expert_workers: usize,
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
    /// Serve Prometheus metrics: the frontend on this port, the gate on the next, expert worker i
    /// on port + 2 + i (each on --metrics-host, at `/metrics`). Off when not given.
    #[arg(long, env = "MOEMESH_METRICS_BASE_PORT")]
    pub metrics_base_port: Option<u16>,
    /// Interface the metrics ports bind to.
    #[arg(long, env = "MOEMESH_METRICS_HOST", default_value = "127.0.0.1")]
    pub metrics_host: std::net::IpAddr,
    /// Extra flags for the gate, e.g. `--gate-args=--overlap` (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    pub gate_args: Vec<String>,
    /// Extra flags for the frontend, e.g. `--frontend-args=--max-pending=8` (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    pub frontend_args: Vec<String>,
}

struct Proc {
    role: String,
    child: Child,
}

/// Starts `moemesh <args>` and waits for its ready line; returns the process and its address.
async fn start(role: &str, args: Vec<String>) -> anyhow::Result<(Proc, String)> {
    let exe = std::env::current_exe().context("locating the moemesh binary")?;
    let mut child = Command::new(exe)
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

fn common(args: &UpArgs) -> Vec<String> {
    let mut v = Vec::new();
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
    if args.expert_workers == 0 {
        bail!("--expert-workers must be at least 1");
    }
    let files = moemesh_engine::ModelFiles::open_or_embedded(args.model.as_deref())
        .context("opening the model")?;
    let n_experts = files.config.n_routed_experts;
    if args.expert_workers > n_experts.max(1) {
        bail!(
            "--expert-workers {} exceeds the model's {n_experts} routed experts",
            args.expert_workers
        );
    }
    drop(files);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut procs = Vec::new();
        let result = async {
            let mut worker_addrs = Vec::new();
            for i in 0..args.expert_workers {
                let (lo, hi) = (i * n_experts / args.expert_workers, (i + 1) * n_experts / args.expert_workers);
                let mut a = common(&args);
                a.extend(["--listen".into(), "127.0.0.1:0".into(), "--dtype".into(), args.dtype.clone()]);
                a.extend(["--experts".into(), format!("{lo}-{}", hi - 1)]);
                let device = match args.expert_devices.as_slice() {
                    [] => args.device.clone(),
                    list => list[i % list.len()].clone(),
                };
                a.extend(["--device".into(), device]);
                a.extend(metrics_flag(&args, 2 + i)?);
                let (p, addr) = start("expert", a).await?;
                eprintln!("moemesh up: expert worker {i} (experts {lo}-{}) on {addr}", hi - 1);
                procs.push(p);
                worker_addrs.push(addr);
            }
            let mut a = common(&args);
            a.extend(["--listen".into(), "127.0.0.1:0".into(), "--dtype".into(), args.dtype.clone()]);
            a.extend(["--device".into(), args.device.clone()]);
            a.extend(metrics_flag(&args, 1)?);
            a.extend(args.gate_args.iter().cloned());
            if args.etcd.is_none() {
                a.extend(["--expert-addrs".into(), worker_addrs.join(",")]);
            }
            let (p, gate_addr) = start("gate", a).await?;
            eprintln!("moemesh up: gate on {gate_addr}");
            procs.push(p);
            let mut a = common(&args);
            a.extend(["--listen".into(), args.listen.clone()]);
            a.extend(metrics_flag(&args, 0)?);
            a.extend(args.frontend_args.iter().cloned());
            if args.etcd.is_none() {
                a.extend(["--gate-addrs".into(), gate_addr]);
            }
            let (p, addr) = start("frontend", a).await?;
            procs.push(p);
            println!("{}", serde_json::json!({"event": "ready", "role": "up", "address": addr}));
            eprintln!("moemesh up: frontend (moemesh.v1.Generation) on {addr}; Ctrl-C stops the mesh");
            anyhow::Ok(())
        }
        .await;
        if result.is_ok() {
            let exited = async {
                loop {
                    for p in procs.iter_mut() {
                        if let Ok(Some(status)) = p.child.try_wait() {
                            return (p.role.clone(), status);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            };
            tokio::select! {
                _ = moemesh_common::serve::shutdown_signal() => eprintln!("moemesh up: stopping"),
                (role, status) = exited => eprintln!("moemesh up: {role} exited ({status}); stopping the mesh"),
            }
        }
        stop_all(&mut procs).await;
        result
    })
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
}
