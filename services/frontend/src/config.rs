//! `moemesh frontend` configuration: flags and `MOEMESH_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use moemesh_common::limits::ServerLimits;
use moemesh_common::metrics::MetricsArgs;
use moemesh_common::tls::TlsArgs;

#[derive(Args, Debug, Clone)]
pub struct FrontendConfig {
    /// Address to serve the public gRPC API on (port 0 picks a free port; the ready line says which).
    #[arg(long, env = "MOEMESH_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Model directory; the embedded default model when omitted. Must be the gates' model.
    /// Also serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /// /v1/models, /health) on this address, plaintext HTTP/1.1 (put TLS in front of it, or
    /// keep it on loopback). API keys apply as `Authorization: Bearer`.
    #[arg(long, env = "MOEMESH_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// How the HTTP API splits chat output: `deepseek-r1` puts what comes before `</think>` in
    /// `reasoning_content` (as vLLM's `deepseek_r1` parser), `none` leaves it all in `content`.
    #[arg(long, env = "MOEMESH_REASONING_PARSER", default_value = "none", value_parser = ["none", "deepseek-r1", "deepseek_r1"])]
    pub reasoning_parser: String,
    #[arg(long, env = "MOEMESH_MODEL")]
    pub model: Option<PathBuf>,
    /// The routed experts' format the workers are told (`--weights-dtype` of `moemesh expert`:
    /// `auto`, `bf16`, `fp8` or `int4`), for the weights format this role reports (ModelInfo / Info
    /// `weights_dtype`); it holds no routed experts itself.
    #[arg(long, env = "MOEMESH_WEIGHTS_DTYPE", default_value = "auto")]
    pub weights_dtype: moemesh_engine::ExpertsDtype,
    /// etcd endpoints, comma-separated; the frontend watches gates there.
    #[arg(long, env = "MOEMESH_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Without etcd: the gates' addresses (`host:port`, comma-separated).
    #[arg(long, env = "MOEMESH_GATE_ADDRS", value_delimiter = ',')]
    pub gate_addrs: Vec<String>,
    /// Cluster name in registry keys.
    #[arg(long, env = "MOEMESH_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// max_new_tokens when a request does not set it.
    #[arg(long, env = "MOEMESH_DEFAULT_MAX_NEW_TOKENS", default_value_t = 256)]
    pub default_max_new_tokens: u32,
    /// Largest max_new_tokens a request may ask for.
    #[arg(long, env = "MOEMESH_MAX_NEW_TOKENS_LIMIT", default_value_t = 4096)]
    pub max_new_tokens_limit: u32,
    /// Most stop strings per request.
    #[arg(long, env = "MOEMESH_MAX_STOP_SEQUENCES", default_value_t = 16)]
    pub max_stop_sequences: usize,
    /// Most tokens (prompt chunks + decodes) in one step to a gate; long prompts are prefilled
    /// in chunks so running decodes keep flowing. The budget trades a long prompt's time to first
    /// token against the stall it puts on every running decode. 512 was measured best on a CPU
    /// mesh (docs/BENCHMARKS.md, 2026-11-26): with 2,000-token prompts arriving among 7 decodes,
    /// inter-token p99 0.4–0.8 s against 2.7–3.2 s at 4096, and the prompts' time to first token
    /// shorter too; it also leaves half of each step to prompts at the default --max-running
    /// (256). A GPU gate's step time grows slowly with its tokens, so a GPU gate (as its Info
    /// reports) gets 4096 by default, which keeps a 2,048-token prompt's prefill in one step
    /// (docs/BENCHMARKS.md). Given explicitly, the budget applies to every gate. [default: 512
    /// for a CPU gate, 4096 for a GPU gate, and never below --max-running]
    #[arg(long, env = "MOEMESH_STEP_TOKEN_BUDGET")]
    pub step_token_budget: Option<usize>,
    /// Seconds one step may take at its gate, from sending it to its answer (opening the stream
    /// included), before the gate is taken for hung: its sequences move to another gate and are
    /// prefilled again there, continuing exactly as they would have (greedy or seeded). Keep it
    /// above the slowest legitimate step: a full --step-token-budget prefill chunk, plus the
    /// gate's --expert-timeout when an expert worker fails mid-step.
    #[arg(long, env = "MOEMESH_STEP_TIMEOUT", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub step_timeout: u64,
    /// Most decode steps one request to a gate may run: while no request waits and every
    /// running sequence decodes (no prompt logprobs, no constraint, not traced: a traced
    /// sequence's trace shows every step under its own frontend span), the gate runs up to this
    /// many steps of them for one request, feeding each step the tokens the one before sampled
    /// and answering each, which saves the round trip to the frontend between steps (~0.2 ms a
    /// step through the mesh at batch 1 on an H200: docs/BENCHMARKS.md, session 27). A request
    /// that arrives meanwhile, or a sequence that finishes or leaves, ends the run after the
    /// step in progress; a run stops short of every sequence's max_tokens. 1: one step a
    /// request. Gates that do not offer runs (their Info) get one.
    #[arg(long, env = "MOEMESH_DECODE_RUN_STEPS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub decode_run_steps: u32,
    /// Milliseconds to open the step stream to a gate (TCP connect, TLS handshake, its Info
    /// call and the stream's headers); a gate that accepts connections and never answers costs
    /// at most this before its sequences go elsewhere.
    #[arg(long, env = "MOEMESH_GATE_CONNECT_TIMEOUT_MS", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub gate_connect_timeout_ms: u64,
    /// Most sequences running on one gate at once (the rest wait, first come first served).
    #[arg(long, env = "MOEMESH_MAX_RUNNING", default_value_t = 256)]
    pub max_running: usize,
    /// Most requests accepted and not yet finished (running or waiting), a request for n
    /// choices counting n; beyond it Generate answers RESOURCE_EXHAUSTED at once instead of
    /// queueing without bound.
    #[arg(long, env = "MOEMESH_MAX_PENDING", default_value_t = 1024)]
    pub max_pending: usize,
    /// Largest prompt text (or chat) in bytes.
    #[arg(long, env = "MOEMESH_MAX_PROMPT_BYTES", default_value_t = 1 << 20)]
    pub max_prompt_bytes: usize,
    /// Most seconds to let accepted Generate streams finish after SIGTERM: the frontend turns
    /// NOT_SERVING and stops accepting calls at once, then waits this long for the streams in
    /// flight (keep the orchestrator's grace period above it).
    #[arg(long, env = "MOEMESH_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
    /// Longest stop string in bytes.
    #[arg(long, env = "MOEMESH_MAX_STOP_BYTES", default_value_t = 256)]
    pub max_stop_bytes: usize,
    /// With several gates, send a new request to the gate believed to hold the longest prefix
    /// of its prompt in its prefix cache (the frontend remembers the prompt blocks it prefilled
    /// on each gate), unless that gate is too busy (--prefix-routing-margin). `false`: the
    /// least loaded gate, always.
    #[arg(long, env = "MOEMESH_PREFIX_ROUTING", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_routing: bool,
    /// How many more sequences (running or queued) than the least loaded gate a gate holding a
    /// request's prefix may have and still get the request.
    #[arg(long, env = "MOEMESH_PREFIX_ROUTING_MARGIN", default_value_t = 8)]
    pub prefix_routing_margin: usize,
    #[command(flatten)]
    pub limits: ServerLimits,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    /// TLS: the public port (client certificates optional, verified against --tls-ca when
    /// presented) and the hop to the gates (mutual TLS).
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Serve the public port without TLS while --tls-cert/--tls-key/--tls-ca still secure the
    /// hop to the gates: for a port on loopback (`moemesh up` does this) or behind a proxy that
    /// terminates TLS.
    #[arg(long, env = "MOEMESH_PUBLIC_PLAINTEXT")]
    pub public_plaintext: bool,
    /// API keys (TOML: `[[key]]` tables with `id`, `key` or `key_sha256`, and optional
    /// `requests_per_second`, `burst`, `max_streams`, `methods`; see the README). With it, every
    /// Generation call needs `authorization: Bearer <key>`; health and reflection stay open.
    /// Reloaded when the file changes. Without it the API is open to anyone who reaches the port.
    #[arg(long, env = "MOEMESH_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Append one JSON line per Generate call (and per refused call) to this file, or `-` for
    /// stdout: time, key id, request id, status, finish reason, token counts, SHA-256 of the
    /// prompt and of the output. Off when not given.
    #[arg(long, env = "MOEMESH_AUDIT_LOG")]
    pub audit_log: Option<String>,
    /// Also write the prompt and output texts to the audit log (they are only hashed otherwise).
    #[arg(long, env = "MOEMESH_AUDIT_LOG_TEXT", requires = "audit_log")]
    pub audit_log_text: bool,
}
