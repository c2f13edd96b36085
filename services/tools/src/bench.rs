//! `moemesh bench`: drives `Generation.Generate` on a running mesh with C concurrent clients and
//! reports throughput and latency: requests/s, output tokens/s, time to first token and
//! inter-token latency (p50/p90/p99), and failures by gRPC code — as a table and as JSON. With
//! `--scenario` it runs a ghz config file instead (`bench_scenario.rs`) and writes ghz's report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use moemesh_proto::v1::{self, GenerateRequest, ModelInfoRequest, generate_request::Input};

use crate::client_args::Client;
use rand::{RngExt, SeedableRng};

/// The frontend `moemesh up` and `moemesh frontend` listen on by default.
const DEFAULT_ADDR: &str = "127.0.0.1:50051";

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Frontend address (`host:port`) [default: 127.0.0.1:50051, or the scenario's "host"].
    #[arg(long, env = "MOEMESH_ADDR")]
    pub addr: Option<String>,
    /// A ghz JSON config file (e.g. loadtest/scenarios/short-chat.json) to run instead of the
    /// synthetic load: its data, concurrency, total or duration, rps, timeout and stream limits
    /// are used as ghz would, and ghz's JSON report is written (to --output, the file's
    /// "output", or stdout) with time to first token and inter-token latency added under
    /// "tokenMetrics". --addr, --concurrency, --requests, --rps and --duration override the
    /// file.
    #[arg(long, conflicts_with_all = ["in_process", "sweep", "prompt_len", "output_len", "json", "temperature", "top_p", "top_k"])]
    pub scenario: Option<std::path::PathBuf>,
    /// With --scenario: where the JSON report goes.
    #[arg(long, requires = "scenario")]
    pub output: Option<String>,
    /// With --scenario: most calls started per second, over all clients.
    #[arg(long, requires = "scenario")]
    pub rps: Option<u64>,
    /// With --scenario: run this long (Go syntax: 45s, 2m) instead of a number of requests.
    #[arg(long, requires = "scenario", value_parser = crate::ghz::parse_go_duration)]
    pub duration: Option<Duration>,
    /// Concurrent clients, each with one request in flight [default: 1, or the scenario's].
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Requests in total [default: 16, or the scenario's "total"].
    #[arg(long)]
    pub requests: Option<usize>,
    /// Prompt length in tokens (random ids, the same seed every run).
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Tokens to generate per request (EOS ignored, so every request generates exactly this many).
    #[arg(long, default_value_t = 64)]
    pub output_len: u32,
    /// Sampling temperature of every request; 0 is greedy. Sampled requests are seeded by their
    /// index, so runs draw the same tokens.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus mass in (0, 1] for sampled requests (1: no cut).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens in sampled requests (0: no cut).
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Instead of a mesh, run the whole model in this process (the embedded default, or
    /// --model), decoding up to --concurrency sequences as one batch: the no-network reference
    /// for the mesh numbers.
    #[arg(long, conflicts_with = "addr")]
    pub in_process: bool,
    /// Model for --in-process: a directory, or `synthetic:v2-lite` (random weights generated on
    /// the device); the embedded default when omitted.
    #[arg(long, requires = "in_process")]
    pub model: Option<std::path::PathBuf>,
    /// Device for --in-process: `cpu` or `cuda:N`.
    #[arg(long, requires = "in_process", default_value = "cpu")]
    pub device: String,
    /// Load testing, for --in-process: skew the model's routers by this Zipf exponent (as
    /// `moemesh gate --router-skew`, which a mesh takes instead; 0: off). It changes the outputs.
    #[arg(long, requires = "in_process", default_value_t = 0.0,
          value_parser = moemesh_common::skew::parse_router_skew, allow_negative_numbers = true)]
    pub router_skew: f32,
    /// Compute dtype for --in-process: `f32` or `bf16`.
    #[arg(long, requires = "in_process", default_value = "f32")]
    pub dtype: String,
    /// How --in-process holds the routed experts: `auto` (an FP8 checkpoint's stay FP8, an
    /// INT4 one's INT4, on a GPU computing in bf16), `bf16` (dequantised to the compute dtype),
    /// `fp8` (e4m3 with 128 × 128 block scales; other weights, a synthetic model's too,
    /// quantised at load) or `int4` (4 bits, one f32 scale per 128 input columns, quantised at
    /// load where stored otherwise); quantised experts stay so on a GPU computing in bf16,
    /// dequantised elsewhere.
    #[arg(
        long,
        requires = "in_process",
        env = "MOEMESH_WEIGHTS_DTYPE",
        default_value = "auto"
    )]
    pub weights_dtype: moemesh_engine::ExpertsDtype,
    /// Run once per listed concurrency (comma-separated), each with as many requests as
    /// clients, in one process (the in-process model is loaded once); one JSON line or table
    /// per run.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<usize>,
    /// Waves of --concurrency requests of the same shape run first and left out of the
    /// figures: the first requests after a start pay for first allocations, kernel loading and
    /// cuBLAS set-up (a fresh in-process run always, a server just started too), which a
    /// long-running server does not. 0 measures from the first request.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// TLS and the API key for --addr.
    #[command(flatten)]
    pub client: crate::client_args::ClientArgs,
}

impl BenchArgs {
    fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(1)
    }

    fn requests(&self) -> usize {
        self.requests.unwrap_or(16)
    }

    fn addr(&self) -> &str {
        self.addr.as_deref().unwrap_or(DEFAULT_ADDR)
    }

    /// The sampling parameters of request `i`.
    fn sampling(&self, i: usize) -> moemesh_engine::SamplingParams {
        moemesh_engine::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k as usize,
            top_p: self.top_p,
            seed: Some(i as u64),
            ..Default::default()
        }
    }

    /// Whether requests sample (not greedy), by the engine's rule (a temperature of at least
    /// `moemesh_engine::GREEDY_BELOW`).
    fn sampled(&self) -> bool {
        !self.sampling(0).is_greedy()
    }

    /// Checks --temperature, --top-p and --top-k as the frontend checks a request's.
    fn check_sampling(&self, vocab: usize) -> anyhow::Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!(
                "--temperature must be a finite number >= 0 (0 = greedy), got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if self.top_k as usize > vocab {
            bail!(
                "--top-k must be at most the vocabulary size ({vocab}), got {}",
                self.top_k
            );
        }
        Ok(())
    }
}

/// `--scenario`: run the ghz file, write its report, print a summary on stderr.
fn run_scenario(args: &BenchArgs, path: &std::path::Path) -> anyhow::Result<()> {
    let plan = crate::ghz::Scenario::load(path)?.plan(crate::ghz::Overrides {
        host: args.addr.clone(),
        total: args.requests.map(|n| n as u64),
        concurrency: args.concurrency.map(|n| n as u64),
        rps: args.rps,
        duration: args.duration,
        output: args.output.clone(),
    })?;
    let output = plan.output.clone();
    let report = crate::bench_scenario::run(plan)?;
    eprint!("{}", crate::bench_scenario::summary(&report));
    let text = serde_json::to_string_pretty(&report)?;
    match output.as_deref() {
        None | Some("-") => println!("{text}"),
        Some(file) => std::fs::write(file, text + "\n")
            .with_context(|| format!("writing the report to {file}"))?,
    }
    Ok(())
}

#[derive(Default)]
struct Sample {
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    tokens: usize,
    error: Option<String>,
    /// The failed call's status message (the first of each code is reported).
    error_message: Option<String>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn one(client: &mut Client, req: GenerateRequest) -> Sample {
    let start = Instant::now();
    let mut s = Sample::default();
    let mut last = start;
    let result = async {
        let mut stream = client.generate(req).await?.into_inner();
        while let Some(m) = stream.message().await? {
            if m.token_ids.is_empty() {
                continue;
            }
            let now = Instant::now();
            if s.ttft.is_none() {
                s.ttft = Some(now - start);
            } else {
                s.gaps.push(now - last);
            }
            last = now;
            s.tokens += m.token_ids.len();
        }
        Ok::<(), tonic::Status>(())
    }
    .await;
    if let Err(st) = result {
        s.error = Some(format!("{:?}", st.code()));
        // The transport's own words too: a dropped connection reads "transport error" or
        // "operation was canceled" alone, its cause only in the source chain.
        let mut message = st.message().to_string();
        let mut source = std::error::Error::source(&st);
        while let Some(e) = source {
            message.push_str(&format!(": {e}"));
            source = e.source();
        }
        s.error_message = Some(message);
    }
    s
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.scenario {
        return run_scenario(&args, path);
    }
    if args.sweep.contains(&0) {
        bail!("--sweep: every concurrency must be at least 1");
    }
    if !args.sweep.is_empty() {
        if args.in_process {
            let engine = load_in_process(&args)?;
            for &c in &args.sweep {
                let a = BenchArgs {
                    concurrency: Some(c),
                    requests: Some(c),
                    sweep: Vec::new(),
                    ..args.clone()
                };
                run_in_process(&a, &engine)?;
            }
            return Ok(());
        }
        for &c in &args.sweep {
            run(BenchArgs {
                concurrency: Some(c),
                requests: Some(c),
                sweep: Vec::new(),
                ..args.clone()
            })?;
        }
        return Ok(());
    }
    if args.concurrency() == 0
        || args.requests() == 0
        || args.prompt_len == 0
        || args.output_len == 0
    {
        bail!("--concurrency, --requests, --prompt-len and --output-len must all be at least 1");
    }
    if args.in_process {
        return run_in_process(&args, &load_in_process(&args)?);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut client = args.client.connect(args.addr()).await?;
        let info = client
            .model_info(ModelInfoRequest {})
            .await
            .context("ModelInfo")?
            .into_inner();
        let vocab = info.vocab_size.max(2);
        args.check_sampling(vocab as usize)?;
        let prompts = |seed: u64, n: usize| -> Vec<Vec<u32>> {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            (0..n)
                .map(|_| {
                    (0..args.prompt_len)
                        .map(|_| rng.random_range(2..vocab))
                        .collect()
                })
                .collect()
        };
        let warm = args.warmup * args.concurrency().min(args.requests());
        if warm > 0 {
            drive(&args, prompts(7, warm)).await?;
        }
        let prompts = prompts(42, args.requests());
        let started = Instant::now();
        let samples = drive(&args, prompts).await?;
        let wall = started.elapsed().as_secs_f64();
        report(&args, &info.model_name, &samples, wall)
    })
}

/// Sends `prompts` at --concurrency (a finished request lets the next in) and times each.
async fn drive(args: &BenchArgs, prompts: Vec<Vec<u32>>) -> anyhow::Result<Vec<Sample>> {
    let prompts = Arc::new(prompts);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency() {
        let (prompts, next, out_len) = (prompts.clone(), next.clone(), args.output_len);
        let (temperature, top_p, top_k) = (args.temperature, args.top_p, args.top_k);
        let sampled = args.sampled();
        let (client_args, addr) = (args.client.clone(), args.addr().to_string());
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut client = match client_args.connect(&addr).await {
                Ok(c) => c,
                Err(e) => {
                    // A client that cannot connect fails one request, so that the run shows it
                    // (the others take the rest at a lower concurrency than asked for).
                    if next.fetch_add(1, Ordering::SeqCst) < prompts.len() {
                        samples.push(Sample {
                            error: Some(format!("{:?}", tonic::Code::Unavailable)),
                            error_message: Some(format!("{e:#}")),
                            ..Default::default()
                        });
                    }
                    return samples;
                }
            };
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(p) = prompts.get(i) else { break };
                let req = GenerateRequest {
                    input: Some(Input::Tokens(v1::TokenIds { ids: p.clone() })),
                    sampling: sampled.then_some(v1::SamplingParams {
                        temperature,
                        top_p: Some(top_p),
                        top_k,
                        seed: Some(i as u64),
                        ..Default::default()
                    }),
                    stopping: Some(v1::StoppingCriteria {
                        max_new_tokens: Some(out_len),
                        stop: Vec::new(),
                        ignore_eos: true,
                        ..Default::default()
                    }),
                    request_id: format!("bench-{i}"),
                    cache_salt: String::new(),
                };
                samples.push(one(&mut client, req).await);
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.context("bench client task")?);
    }
    Ok(samples)
}

fn load_in_process(args: &BenchArgs) -> anyhow::Result<moemesh_engine::InProcessEngine> {
    let files = moemesh_engine::ModelFiles::open_or_embedded(args.model.as_deref())
        .context("opening the model")?
        .with_experts_dtype(args.weights_dtype);
    let device = moemesh_common::device::parse_device(&args.device)?;
    let dtype = moemesh_common::device::parse_dtype(&args.dtype)?;
    let gpu = moemesh_engine::cuda::gpu(&device);
    let free_before = gpu.as_ref().map(|g| g.memory_info()).transpose()?;
    let t = Instant::now();
    let mut engine = moemesh_engine::InProcessEngine::load(&files, &device, dtype)
        .context("loading the model")?;
    engine
        .model
        .set_router_skew(args.router_skew)
        .context("skewing the routers")?;
    // What the load took on the device (weights, and the allocator's rounding), for comparing
    // weight formats.
    let taken = match (&gpu, free_before) {
        (Some(g), Some((before, _))) => format!(
            ", {:.2} GiB of device memory",
            before.saturating_sub(g.memory_info()?.0) as f64 / (1u64 << 30) as f64
        ),
        _ => String::new(),
    };
    let format = files.weights_format();
    eprintln!(
        "moemesh bench: {} ({format} weights) loaded on {} in {:.1} s{taken}",
        files.name,
        args.device,
        t.elapsed().as_secs_f64()
    );
    engine.name = format!("{} ({format})", files.name);
    Ok(engine)
}

/// Requests at a fixed concurrency (a finished one lets the next in), through the serving core
/// the mesh runs: the frontend's scheduler and the gate's step runner, with local experts and
/// no wire.
fn run_in_process(
    args: &BenchArgs,
    engine: &moemesh_engine::InProcessEngine,
) -> anyhow::Result<()> {
    use moemesh_engine::GenerationRequest;
    use moemesh_engine::serving::LocalServer;
    let model = &engine.model;
    let vocab = model.config().vocab_size as u32;
    args.check_sampling(vocab as usize)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    // Requests `ids` (their seeds), each with its own random prompt.
    let mut make = |ids: std::ops::Range<usize>| -> Vec<GenerationRequest> {
        ids.map(|i| GenerationRequest {
            prompt_ids: (0..args.prompt_len)
                .map(|_| rng.random_range(2..vocab))
                .collect(),
            sampling: args.sampling(i),
            max_new_tokens: args.output_len as usize,
            stop: Vec::new(),
            ignore_eos: true,
            ..Default::default()
        })
        .collect()
    };
    let requests = make(0..args.requests());
    let mut server = LocalServer::new(
        model,
        &engine.experts,
        engine.tokenizer.as_ref(),
        args.concurrency().min(args.requests()),
        args.prompt_len + args.output_len as usize,
    )?;
    server.limits.max_new_tokens = server.limits.max_new_tokens.max(args.output_len as usize);
    // Warm-up waves of the same shape (other prompts), left out of the figures (and unseen by
    // the profiler hook below).
    let warm = args.warmup * args.concurrency().min(args.requests());
    if warm > 0 {
        let warm_requests = make(args.requests()..args.requests() + warm);
        server.run(warm_requests, &mut |_, _| true)?;
    }
    // MOEMESH_PROFILE_STEP=N: only step N (from 0) is seen by a profiler started with
    // collection off (scripts/gpu-check.sh --profile).
    if let Some(n) = std::env::var("MOEMESH_PROFILE_STEP")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let mut steps = 0u64;
        server.around_step = Some(Box::new(move |_, before| {
            if steps == n {
                moemesh_engine::cuda::profiler(before)?;
            }
            if !before {
                steps += 1;
            }
            Ok(())
        }));
    }
    let mut samples: Vec<Sample> = requests.iter().map(|_| Sample::default()).collect();
    let mut last: Vec<Option<Instant>> = vec![None; requests.len()];
    let started = Instant::now();
    let outputs = server.run(requests, &mut |i, _chunk| {
        let now = Instant::now();
        let s = &mut samples[i];
        if let Some(t) = last[i] {
            s.gaps.push(now - t);
        }
        last[i] = Some(now);
        s.tokens += 1;
        true
    })?;
    // Time to first token from when the request got its place (as a client at this
    // concurrency would send it).
    for (s, o) in samples.iter_mut().zip(&outputs) {
        s.ttft = Some(o.time_to_first_token);
    }
    let wall = started.elapsed().as_secs_f64();
    let g = server.graph_stats();
    if g != Default::default() {
        eprintln!(
            "decode CUDA graphs: {} shapes captured, {} steps replayed, {} shapes left eager",
            g.captured, g.replayed, g.failed
        );
    }
    report(
        args,
        &format!("{} (in-process)", engine.name),
        &samples,
        wall,
    )
}

fn report(args: &BenchArgs, model: &str, samples: &[Sample], wall: f64) -> anyhow::Result<()> {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    // One message per code: what a failed request was told.
    let mut examples: BTreeMap<String, String> = BTreeMap::new();
    for s in samples {
        if let Some(e) = &s.error {
            *errors.entry(e.clone()).or_default() += 1;
            if let Some(m) = &s.error_message {
                examples.entry(e.clone()).or_insert_with(|| m.clone());
            }
        }
    }
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<f64> = ok
        .iter()
        .filter_map(|s| s.ttft)
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    let mut itl: Vec<f64> = ok
        .iter()
        .flat_map(|s| s.gaps.iter())
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    ttft.sort_by(f64::total_cmp);
    itl.sort_by(f64::total_cmp);
    let pcts = |v: &[f64]| serde_json::json!({"p50": percentile(v, 50.0), "p90": percentile(v, 90.0), "p99": percentile(v, 99.0)});
    let summary = serde_json::json!({
        "model": model,
        "addr": args.addr(),
        "concurrency": args.concurrency(),
        "requests": samples.len(),
        "warmup_waves": args.warmup,
        "succeeded": ok.len(),
        "errors": errors,
        "error_examples": examples,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "sampling": if args.sampled() {
            serde_json::json!({"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k})
        } else {
            serde_json::json!("greedy")
        },
        "wall_s": wall,
        "requests_per_s": ok.len() as f64 / wall,
        "output_tokens_per_s": tokens as f64 / wall,
        "ttft_ms": pcts(&ttft),
        "itl_ms": pcts(&itl),
    });
    if args.json {
        println!("{summary}");
        return Ok(());
    }
    let sampling = if args.sampled() {
        format!(
            "temperature {}, top_p {}, top_k {}",
            args.temperature, args.top_p, args.top_k
        )
    } else {
        "greedy".to_string()
    };
    let at = if args.in_process {
        String::new()
    } else {
        format!(" at {}", args.addr())
    };
    println!(
        "moemesh bench — {model}{at} ({} clients, {} requests, prompt {} → {} tokens, {sampling})",
        args.concurrency(),
        samples.len(),
        args.prompt_len,
        args.output_len
    );
    println!(
        "{:<26}{:>12}",
        "requests/s",
        format!("{:.2}", ok.len() as f64 / wall)
    );
    println!(
        "{:<26}{:>12}",
        "output tokens/s",
        format!("{:.1}", tokens as f64 / wall)
    );
    for (name, v) in [
        ("time to first token (ms)", &ttft),
        ("inter-token latency (ms)", &itl),
    ] {
        println!(
            "{name:<26}{:>12}{:>12}{:>12}",
            format!("p50 {:.1}", percentile(v, 50.0)),
            format!("p90 {:.1}", percentile(v, 90.0)),
            format!("p99 {:.1}", percentile(v, 99.0))
        );
    }
    println!("{:<26}{:>12}", "failed", samples.len() - ok.len());
    for (code, n) in errors {
        println!("  {code:<24}{n:>12}");
        if let Some(m) = examples.get(&code) {
            println!("    e.g. {m}");
        }
    }
    Ok(())
}
