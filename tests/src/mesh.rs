//! Real processes for the mesh tests: an etcd server and moemesh roles, each on free loopback
//! ports, in its own process group, with its log in the test's temp dir. Readiness is etcd
//! answering a request (it has a leader) and each role's ready line; a child that dies before it
//! is ready fails the test with its log tail. Only the processes started here are stopped.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::moemesh_bin;
use crate::tls::TestCa;

/// A port that was free a moment ago (bound and released), for a process to listen on later.
/// Chosen at random below Linux's ephemeral range (32768 and up by default), not by binding
/// port 0: the kernel hands ephemeral ports to outgoing connections too, and one of the many
/// connections a test run opens could take the port before the process listens on it (seen as
/// "Address already in use" in CI). Never the same port twice in one test process.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..200 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 20_000 + (h.finish() % 12_000) as u16;
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A started child process in its own process group.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    /// The `/metrics` address from the ready line (with `--metrics-listen`).
    pub metrics: Option<String>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&mut self, sig: Signal) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process hangs as a VM pause or CPU starvation would (its sockets stay open).
    pub fn pause(&mut self) {
        self.signal(Signal::SIGSTOP);
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&mut self) {
        self.signal(Signal::SIGCONT);
    }

    /// SIGTERM and wait (at most 20 s) for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether any process of this process group is still alive.
    pub fn group_alive(&self) -> bool {
        killpg(Pid::from_raw(self.child.id() as i32), None).is_ok()
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The exit status, once the process has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.exited() {
            self.kill();
        }
        if std::env::var_os("MOEMESH_TEST_KEEP_LOGS").is_some() {
            let keep =
                std::env::temp_dir().join(format!("moemesh-{}-{}.log", self.name, self.child.id()));
            let _ = std::fs::copy(&self.log, keep);
        }
    }
}

/// A real etcd server (Debian's etcd-server) on free ports, with its data in a temp dir.
pub struct Etcd {
    pub endpoint: String,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    dir: PathBuf,
    proc: Option<Proc>,
    /// With TLS: etcd's certificate, key and CA (it requires client certificates from that CA).
    tls: Option<[PathBuf; 3]>,
}

impl Etcd {
    pub fn start(dir: &Path) -> Etcd {
        Etcd::start_opts(dir, None)
    }

    /// etcd serving `https://` with a certificate from `ca`, requiring client certificates.
    pub fn start_tls(dir: &Path, ca: &TestCa) -> Etcd {
        let leaf = ca.leaf("etcd", "etcd", &[]);
        Etcd::start_opts(dir, Some([leaf.cert, leaf.key, ca.ca_path.clone()]))
    }

    fn start_opts(dir: &Path, tls: Option<[PathBuf; 3]>) -> Etcd {
        let mut e = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            endpoint: String::new(),
            data: dir.join("etcd-data"),
            dir: dir.to_path_buf(),
            proc: None,
            tls,
        };
        let scheme = if e.tls.is_some() { "https" } else { "http" };
        e.endpoint = format!("{scheme}://127.0.0.1:{}", e.client_port);
        e.launch();
        e
    }

    fn launch(&mut self) {
        let log = self.dir.join("etcd.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("etcd log");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new("etcd");
        if let Some([cert, key, ca]) = &self.tls {
            command
                .arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", "moemesh-test", "--data-dir"])
            .arg(&self.data)
            .args([
                "--listen-client-urls",
                &self.endpoint,
                "--advertise-client-urls",
                &self.endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("moemesh-test={peer}")])
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("etcd is installed (scripts/setup.sh --test installs etcd-server)");
        let mut proc = Proc {
            name: "etcd".into(),
            child,
            log,
            metrics: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if answers(&self.endpoint, self.tls.as_ref()) {
                break;
            }
            assert!(
                !proc.exited(),
                "etcd exited before it was ready:\n{}",
                tail(&proc.log)
            );
            assert!(
                Instant::now() < deadline,
                "etcd not ready in 30 s:\n{}",
                tail(&proc.log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.proc = Some(proc);
    }

    /// Stops etcd (SIGKILL: an outage, not a clean shutdown).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGSTOP: etcd hangs with its connections open (a paused VM, a stalled disk).
    pub fn pause(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.pause();
        }
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.resume();
        }
    }

    /// Starts it again with the same data and ports.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

/// Whether etcd at `endpoint` serves a read (it has a leader). Runs on its own thread and
/// runtime so that callers may be inside async tests. With TLS it presents etcd's own
/// certificate, which is good as a client certificate too.
fn answers(endpoint: &str, tls: Option<&[PathBuf; 3]>) -> bool {
    let endpoint = endpoint.to_string();
    let options = tls.map(|[cert, key, ca]| {
        let read = |p: &PathBuf| std::fs::read(p).expect("etcd TLS file");
        etcd_client::ConnectOptions::new().with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(ca)))
                .identity(etcd_client::Identity::from_pem(read(cert), read(key))),
        )
    });
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return false;
        };
        rt.block_on(async {
            let Ok(mut c) = etcd_client::Client::connect([endpoint.as_str()], options).await else {
                return false;
            };
            c.get("/moemesh-health", None).await.is_ok()
        })
    })
    .join()
    .unwrap_or(false)
}

/// Starts `moemesh <role> <args…> --listen 127.0.0.1:0` and waits for its ready line.
/// Returns the process and the address it serves on. A role given no TLS files runs with
/// `--plaintext` (roles refuse to start without choosing).
pub fn start_role(dir: &Path, name: &str, role: &str, args: &[String]) -> (Proc, String) {
    start_role_env(dir, name, role, args, &[])
}

/// [`start_role`] with extra environment variables.
pub fn start_role_env(
    dir: &Path,
    name: &str,
    role: &str,
    args: &[String],
    env: &[(String, String)],
) -> (Proc, String) {
    let mut all = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
    all.extend_from_slice(args);
    if !args.iter().any(|a| a == "--tls-cert" || a == "--plaintext") {
        all.push("--plaintext".into());
    }
    start_moemesh_env(dir, name, role, &all, env)
}

/// Starts `moemesh <subcommand> <args…>` in its own process group and waits for its ready line.
pub fn start_moemesh(dir: &Path, name: &str, subcommand: &str, args: &[String]) -> (Proc, String) {
    start_moemesh_env(dir, name, subcommand, args, &[])
}

/// [`start_moemesh`] with extra environment variables.
pub fn start_moemesh_env(
    dir: &Path,
    name: &str,
    subcommand: &str,
    args: &[String],
    env: &[(String, String)],
) -> (Proc, String) {
    let log = dir.join(format!("{name}.log"));
    let err = std::fs::File::create(&log).expect("log file");
    let mut child = Command::new(moemesh_bin())
        .arg(subcommand)
        .args(args)
        .env("MOEMESH_LOG", "info,moemesh_frontend::step=debug")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["event"] == "ready"
            {
                let _ = tx.send(v);
            }
        }
    });
    let mut proc = Proc {
        name: name.to_string(),
        child,
        log,
        metrics: None,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(ready) => {
                proc.metrics = ready["metrics"].as_str().map(str::to_string);
                let addr = ready["address"].as_str().unwrap_or_default().to_string();
                return (proc, addr);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        assert!(
            !proc.exited(),
            "{name} exited before it was ready:\n{}",
            tail(&proc.log)
        );
        assert!(
            Instant::now() < deadline,
            "{name} not ready in 120 s:\n{}",
            tail(&proc.log)
        );
    }
}

/// Extra flags and environment variables for a mesh's processes.
#[derive(Debug, Clone, Default)]
pub struct MeshOpts {
    pub worker_args: Vec<String>,
    pub gate_args: Vec<String>,
    pub frontend_args: Vec<String>,
    /// For every process.
    pub env: Vec<(String, String)>,
    /// For the frontend only (after `env`, so it wins).
    pub frontend_env: Vec<(String, String)>,
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// A mesh on etcd: workers, one gate, one frontend.
pub struct Mesh {
    // Fields drop in order: processes first, the temp dir (with their logs) last.
    pub frontend: (Proc, String),
    pub gate: (Proc, String),
    pub workers: Vec<(Proc, String)>,
    pub etcd: Etcd,
    pub cluster: String,
    pub model: Option<PathBuf>,
    pub dir: tempfile::TempDir,
}

impl Mesh {
    /// `shards`: the `--experts` range of each worker.
    pub fn start(model: Option<&Path>, shards: &[&str]) -> Mesh {
        Mesh::start_with(model, shards, &[])
    }

    /// Like [`start`](Self::start), with extra frontend flags.
    pub fn start_with(model: Option<&Path>, shards: &[&str], frontend_args: &[&str]) -> Mesh {
        Mesh::start_full(model, shards, &[], frontend_args)
    }

    /// Like [`start`](Self::start), with extra gate and frontend flags.
    pub fn start_full(
        model: Option<&Path>,
        shards: &[&str],
        gate_args: &[&str],
        frontend_args: &[&str],
    ) -> Mesh {
        let opts = MeshOpts {
            gate_args: owned(gate_args),
            frontend_args: owned(frontend_args),
            ..MeshOpts::default()
        };
        Mesh::start_opts(model, shards, &opts)
    }

    /// Like [`start`](Self::start), with every process serving `/metrics` on a free port (its
    /// [`Proc::metrics`]).
    pub fn start_with_metrics(model: Option<&Path>, shards: &[&str]) -> Mesh {
        let m = owned(&["--metrics-listen", "127.0.0.1:0"]);
        let opts = MeshOpts {
            worker_args: m.clone(),
            gate_args: m.clone(),
            frontend_args: m,
            ..MeshOpts::default()
        };
        Mesh::start_opts(model, shards, &opts)
    }

    /// Like [`start_with`](Self::start_with), with TLS on every hop, etcd included: each process
    /// gets a certificate from `ca`, in the CA's directory (`<ca>-worker<i>.pem`,
    /// `<ca>-gate.pem`, `<ca>-frontend.pem`, `<ca>-etcd.pem`, each with its `-key.pem`).
    pub fn start_tls(
        ca: &TestCa,
        model: Option<&Path>,
        shards: &[&str],
        frontend_args: &[&str],
    ) -> Mesh {
        let opts = MeshOpts {
            frontend_args: owned(frontend_args),
            ..MeshOpts::default()
        };
        Mesh::start_opts_ca(model, &experts_args(shards), &opts, Some(ca))
    }

    /// Like [`start`](Self::start), with extra flags and environment for its processes.
    pub fn start_opts(model: Option<&Path>, shards: &[&str], opts: &MeshOpts) -> Mesh {
        Mesh::start_opts_ca(model, &experts_args(shards), opts, None)
    }

    /// A mesh whose workers are told their shards by `shard_args` (one flag list per worker,
    /// e.g. `--plan-shard 0/3 …`) instead of `--experts`.
    pub fn start_shard_args(model: Option<&Path>, shard_args: &[Vec<String>]) -> Mesh {
        Mesh::start_opts_ca(model, shard_args, &MeshOpts::default(), None)
    }

    fn start_opts_ca(
        model: Option<&Path>,
        shard_args: &[Vec<String>],
        opts: &MeshOpts,
        ca: Option<&TestCa>,
    ) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = |name: &str, role: &str| {
            ca.map(|ca| ca.flags(&ca.leaf(name, name, &[role])))
                .unwrap_or_default()
        };
        let etcd = match ca {
            Some(ca) => Etcd::start_tls(dir.path(), ca),
            None => Etcd::start(dir.path()),
        };
        let cluster = format!("test{}", free_port());
        let model = model.map(Path::to_path_buf);
        let mut workers = Vec::new();
        for (i, shard) in shard_args.iter().enumerate() {
            let name = format!("worker{i}");
            let mut args = opts.worker_args.clone();
            args.extend(tls(&name, "expert"));
            workers.push(start_worker(
                dir.path(),
                common_args(&etcd, &cluster, model.as_deref()),
                &name,
                shard,
                &args,
                &opts.env,
            ));
        }
        let mut args = common_args(&etcd, &cluster, model.as_deref());
        args.extend(["--lease-ttl".into(), "3".into()]);
        args.extend(opts.gate_args.iter().cloned());
        args.extend(tls("gate", "gate"));
        let gate = start_role_env(dir.path(), "gate", "gate", &args, &opts.env);
        let mut fargs = common_args(&etcd, &cluster, model.as_deref());
        fargs.extend(opts.frontend_args.iter().cloned());
        fargs.extend(tls("frontend", "frontend"));
        let fenv: Vec<(String, String)> =
            opts.env.iter().chain(&opts.frontend_env).cloned().collect();
        let frontend = start_role_env(dir.path(), "frontend", "frontend", &fargs, &fenv);
        Mesh {
            dir,
            etcd,
            cluster,
            model,
            workers,
            gate,
            frontend,
        }
    }

    /// Starts another worker of this mesh (same etcd, cluster and model unless `model` is given).
    pub fn add_worker(&self, name: &str, experts: &str, model: Option<&Path>) -> (Proc, String) {
        let model = model.map(Path::to_path_buf).or_else(|| self.model.clone());
        start_worker(
            self.dir.path(),
            common_args(&self.etcd, &self.cluster, model.as_deref()),
            name,
            &["--experts".to_string(), experts.to_string()],
            &[],
            &[],
        )
    }

    /// Starts another gate of this mesh.
    pub fn add_gate(&self, name: &str) -> (Proc, String) {
        self.add_gate_with(name, &[])
    }

    /// Starts another gate of this mesh with extra flags.
    pub fn add_gate_with(&self, name: &str, extra: &[String]) -> (Proc, String) {
        let mut args = common_args(&self.etcd, &self.cluster, self.model.as_deref());
        args.extend(["--lease-ttl".into(), "3".into()]);
        args.extend(extra.iter().cloned());
        start_role(self.dir.path(), name, "gate", &args)
    }

    pub fn frontend_url(&self) -> String {
        format!("http://{}", self.frontend.1)
    }

    pub fn gate_url(&self) -> String {
        format!("http://{}", self.gate.1)
    }
}

fn common_args(etcd: &Etcd, cluster: &str, model: Option<&Path>) -> Vec<String> {
    let mut a = vec![
        "--etcd".to_string(),
        etcd.endpoint.clone(),
        "--cluster".into(),
        cluster.to_string(),
    ];
    if let Some(m) = model {
        a.extend(["--model".into(), m.display().to_string()]);
    }
    a
}

/// `--experts SHARD` for each shard.
fn experts_args(shards: &[&str]) -> Vec<Vec<String>> {
    shards
        .iter()
        .map(|s| vec!["--experts".to_string(), s.to_string()])
        .collect()
}

/// `common`: the registry and model flags ([`common_args`]); `shard`: what the worker serves
/// (`--experts …`).
fn start_worker(
    dir: &Path,
    mut args: Vec<String>,
    name: &str,
    shard: &[String],
    extra: &[String],
    env: &[(String, String)],
) -> (Proc, String) {
    args.extend(extra.iter().cloned());
    args.extend(shard.iter().cloned());
    args.extend(["--lease-ttl".into(), "3".into()]);
    args.extend(["--id".into(), name.to_string()]);
    start_role_env(dir, name, "expert", &args, env)
}

/// `GET /metrics` from `addr` (`host:port`): the Prometheus text.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("connecting to the metrics port {addr}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("sending the scrape");
    let mut resp = String::new();
    conn.read_to_string(&mut resp)
        .unwrap_or_else(|e| panic!("reading /metrics from {addr}: {e}"));
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response from {addr}: {resp}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{addr}: {head}");
    body.to_string()
}

/// One sample of a Prometheus text exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// The samples of a Prometheus text exposition (comments skipped). Label values here never
/// hold commas or escaped quotes, which keeps this parser small.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|e| panic!("sample value in {line}: {e}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let inner = rest.trim_end_matches('}');
                let labels = inner
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv
                            .split_once('=')
                            .unwrap_or_else(|| panic!("label in {line}"));
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
            None => (series.to_string(), Vec::new()),
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The sum of the samples named `name` whose labels include every pair of `with`; `None` when
/// there is none.
pub fn metric_sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// Waits (at most 30 s) until the frontend at `url` lists `n` gates in its ModelInfo.
pub async fn wait_for_gates(url: &str, n: usize) {
    use moemesh_proto::v1::ModelInfoRequest;
    use moemesh_proto::v1::generation_client::GenerationClient;
    let mut info = GenerationClient::connect(url.to_string())
        .await
        .expect("client");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let gates = info
            .model_info(ModelInfoRequest {})
            .await
            .expect("model info")
            .into_inner()
            .gates
            .len();
        if gates >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the frontend lists {gates} gates, not {n}, after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The gate's `Info` answer (live sequences, KV blocks used, …).
pub async fn gate_info(url: &str) -> moemesh_proto::v1::GateInfoResponse {
    let mut c = moemesh_proto::v1::gate_client::GateClient::connect(url.to_string())
        .await
        .expect("gate reachable");
    c.info(moemesh_proto::v1::GateInfoRequest {})
        .await
        .expect("gate info")
        .into_inner()
}

/// Polls `cond` until it holds, for at most a minute (the state it watches has no change
/// notification to wait on: the gate's `Info` is a snapshot).
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
