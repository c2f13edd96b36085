//! `moemesh`: one binary, one subcommand per job: the three mesh roles, `up` (a whole local
//! mesh), `generate` (in-process, or as a client of a running mesh with `--addr`), `plan` and
//! `rebalance` (placement), and the
//! tools from `moemesh-tools` (`bench`, `verify`), which the role crates do not link.

mod generate_cmd;
mod health_cmd;
mod mps;
mod plan_cmd;
mod rebalance_cmd;
mod roles;
mod up_cmd;

use moemesh_tools::{bench as bench_cmd, verify as verify_cmd};

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "moemesh",
    version,
    about = "Serve DeepSeek-V3/R1-style MoE models, with the experts in their own processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text: in-process (the whole model here), or from a running mesh with --addr.
    Generate(generate_cmd::GenerateArgs),
    /// Load a running mesh with concurrent Generate calls and report throughput and latency
    /// (or run a ghz scenario file with --scenario and write ghz's JSON report).
    Bench(bench_cmd::BenchArgs),
    /// Check a role's grpc.health.v1 status (exit 0 when SERVING), for container health checks.
    Health(health_cmd::HealthArgs),
    /// Memory plan: a model's bytes per part under a weights dtype, its placement on N GPUs of
    /// G GiB (gate, expert workers and their --experts ranges) and whether it fits.
    Plan(plan_cmd::PlanArgs),
    /// Expert placement per MoE layer from the gates' measured load: the planner's choice
    /// beside today's (each layer's busiest worker, summed over the layers), applied live with
    /// --apply.
    Rebalance(rebalance_cmd::RebalanceArgs),
    /// Start a complete local mesh: expert workers, a gate and a frontend, as separate processes.
    Up(up_cmd::UpArgs),
    /// Check the engine on a device against the HF transformers reference fixtures.
    Verify(verify_cmd::VerifyArgs),
    /// Serve the public Generation API (tokenizer, scheduling, streaming).
    #[command(after_help = moemesh_common::telemetry::HELP)]
    Frontend(moemesh_frontend::FrontendConfig),
    /// Serve the dense part of the model (attention, KV cache, router, shared experts, sampling).
    #[command(after_help = moemesh_common::telemetry::HELP)]
    Gate(moemesh_gate::GateConfig),
    /// Serve routed experts.
    #[command(after_help = moemesh_common::telemetry::HELP)]
    Expert(moemesh_expert::ExpertConfig),
}

/// Hardware work queues a CUDA context may use (the driver's default is 8). Device-ordered
/// expert calls leave waits on streams (`cuStreamWaitValue32`); streams that share a queue wait
/// behind each other, and with several gates on MPS (which shares queues between its clients)
/// that made two gates' waits hold each other up until the deadline (4 × H200, 4 gates, 512
/// concurrent requests: every request failed with 8, all succeeded with 32).
const CUDA_DEVICE_MAX_CONNECTIONS: &str = "32";

fn main() -> std::process::ExitCode {
    if std::env::var_os("CUDA_DEVICE_MAX_CONNECTIONS").is_none() {
        // SAFETY: the first statement of main: no other thread exists yet to read the
        // environment concurrently, and the CUDA driver reads it later, at initialisation (also
        // in `up`'s children and its MPS daemon, which inherit it).
        unsafe { std::env::set_var("CUDA_DEVICE_MAX_CONNECTIONS", CUDA_DEVICE_MAX_CONNECTIONS) };
    }
    moemesh_common::tls::install_crypto_provider();
    let cli = Cli::parse();
    // Logs (MOEMESH_LOG) and, when OTEL_EXPORTER_OTLP_ENDPOINT is set, traces; dropped (flushing
    // the last spans) once the command has returned, after a role's shutdown too.
    let telemetry = moemesh_common::telemetry::init(match &cli.command {
        Command::Frontend(_) => "moemesh-frontend",
        Command::Gate(_) => "moemesh-gate",
        Command::Expert(_) => "moemesh-expert",
        _ => "moemesh",
    });
    let result = match cli.command {
        Command::Generate(args) => generate_cmd::run(args),
        Command::Up(args) => up_cmd::run(args),
        Command::Bench(args) => bench_cmd::run(args),
        Command::Health(args) => health_cmd::run(args),
        Command::Plan(args) => plan_cmd::run(args),
        Command::Rebalance(args) => rebalance_cmd::run(args),
        Command::Verify(args) => verify_cmd::run(args),
        Command::Frontend(cfg) => roles::frontend(cfg),
        Command::Gate(cfg) => roles::gate(cfg),
        Command::Expert(cfg) => roles::expert(cfg),
    };
    drop(telemetry);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
