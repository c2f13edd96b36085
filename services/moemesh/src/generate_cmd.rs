//! `moemesh generate`: one request through a model loaded in this process, streamed to stdout.
//!
//! Text mode prints the text as it is generated and a one-line summary on stderr; `--json`
//! prints one JSON object per token and a final object with `token_ids`, `text`,
//! `finish_reason` and `usage`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use moemesh_engine::text::ChatMessage;
use moemesh_engine::{DType, GenerationRequest, InProcessEngine, ModelFiles, SamplingParams};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ComputeDtype {
    /// float32: matches the reference outputs to ~1e-5.
    F32,
    /// bfloat16: half the memory traffic, ~2 significant digits.
    Bf16,
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "chat", "prompt_ids"])))]
pub struct GenerateArgs {
    /// Address of a running mesh's frontend (`host:port`); without it the model runs in this process.
    #[arg(long, env = "MOEMESH_ADDR", conflicts_with_all = ["model", "dtype", "device"])]
    pub addr: Option<String>,
    /// Model directory (config.json, safetensors, optional tokenizer.json). Without it, the
    /// embedded default model (random DeepSeek-V3-architecture weights, DeepSeek-R1 tokenizer).
    #[arg(long, env = "MOEMESH_MODEL")]
    pub model: Option<PathBuf>,
    /// Plain-text prompt, tokenized with the model's tokenizer (special tokens as the tokenizer adds them).
    #[arg(long)]
    pub prompt: Option<String>,
    /// A user message, rendered with the model's chat template (with the generation prompt).
    #[arg(long)]
    pub chat: Option<String>,
    /// Optional system message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Prompt as comma-separated token ids (works without a tokenizer), e.g. 5,17,42.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub prompt_ids: Option<Vec<u32>>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64, env = "MOEMESH_MAX_NEW_TOKENS")]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed for sampling; the same seed gives the same output.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable); the stop text is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Compute dtype.
    #[arg(long, value_enum, default_value_t = ComputeDtype::F32, env = "MOEMESH_DTYPE")]
    pub dtype: ComputeDtype,
    /// Device of the in-process model: `cpu`, or `cuda:N` in a CUDA build.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// How the in-process model holds its routed experts: `auto` (an FP8 checkpoint's stay FP8,
    /// an INT4 one's INT4, on a GPU computing in bf16), `bf16` (dequantised to the compute
    /// dtype), `fp8` (e4m3 with 128 × 128 block scales, other weights quantised at load) or
    /// `int4` (4 bits, one f32 scale per 128 input columns, quantised at load where stored
    /// otherwise); quantised experts stay so on a GPU computing in bf16, dequantised elsewhere.
    #[arg(
        long,
        env = "MOEMESH_WEIGHTS_DTYPE",
        default_value = "auto",
        conflicts_with = "addr"
    )]
    pub weights_dtype: moemesh_engine::ExpertsDtype,
    /// Load testing: skew the in-process model's routers by this Zipf exponent (as `moemesh
    /// gate --router-skew`; 0: off). It changes the outputs.
    #[arg(long, default_value_t = 0.0, conflicts_with = "addr",
          value_parser = moemesh_common::skew::parse_router_skew, allow_negative_numbers = true)]
    pub router_skew: f32,
    /// One JSON object per line instead of plain text.
    #[arg(long)]
    pub json: bool,
    /// With --addr: TLS and the API key.
    #[command(flatten)]
    pub client: moemesh_tools::client_args::ClientArgs,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.addr.clone() {
        return crate::generate_cmd::remote::run(&addr, &args);
    }
    let files = ModelFiles::open_or_embedded(args.model.as_deref())
        .with_context(|| match &args.model {
            Some(d) => format!("opening model directory {}", d.display()),
            None => "building the embedded default model".to_string(),
        })?
        .with_experts_dtype(args.weights_dtype);
    let dtype = match args.dtype {
        ComputeDtype::F32 => DType::F32,
        ComputeDtype::Bf16 => DType::BF16,
    };
    let prompt_ids = prompt_ids(&args, &files)?;
    let device = moemesh_common::device::parse_device(&args.device)?;
    let mut engine = InProcessEngine::load(&files, &device, dtype).context("loading the model")?;
    engine
        .model
        .set_router_skew(args.router_skew)
        .context("skewing the routers")?;
    let req = GenerationRequest {
        prompt_ids,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            ..Default::default()
        },
        max_new_tokens: args.max_new_tokens,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..Default::default()
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_err = None;
    let json = args.json;
    let result = engine.generate(&req, &mut |chunk| {
        let r = if json {
            let line = serde_json::json!({
                "token_id": chunk.token_id,
                "logprob": chunk.logprob,
                "text": chunk.text,
            });
            writeln!(out, "{line}")
        } else {
            write!(out, "{}", chunk.text)
        };
        // A closed stdout (e.g. `| head`) ends generation like a client that left.
        match r.and_then(|_| out.flush()) {
            Ok(()) => true,
            Err(e) => {
                write_err = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = write_err {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(());
        }
        return Err(e).context("writing to stdout");
    }
    let completion = result.token_ids.len();
    let decode_s = (result.total_time - result.time_to_first_token).as_secs_f64();
    let decode_tps = if completion > 1 && decode_s > 0.0 {
        (completion - 1) as f64 / decode_s
    } else {
        0.0
    };
    if json {
        let last = serde_json::json!({
            "token_ids": result.token_ids,
            "logprobs": result.logprobs,
            "text": result.text,
            "finish_reason": result.finish_reason.as_str(),
            "model": engine.name,
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": completion,
                "time_to_first_token_ms": result.time_to_first_token.as_secs_f64() * 1e3,
                "total_ms": result.total_time.as_secs_f64() * 1e3,
                "decode_tokens_per_s": decode_tps,
            },
        });
        writeln!(out, "{last}")?;
    } else {
        writeln!(out)?;
        eprintln!(
            "[{} | {} prompt + {} generated tokens | finish: {} | first token {:.1} ms | decode {:.1} tok/s]",
            engine.name,
            result.prompt_tokens,
            completion,
            result.finish_reason.as_str(),
            result.time_to_first_token.as_secs_f64() * 1e3,
            decode_tps
        );
    }
    Ok(())
}

fn prompt_ids(args: &GenerateArgs, files: &ModelFiles) -> anyhow::Result<Vec<u32>> {
    if let Some(ids) = &args.prompt_ids {
        return Ok(ids.clone());
    }
    let Some(tok) = files.tokenizer.as_ref() else {
        bail!(
            "the model directory {} has no tokenizer.json, so --prompt and --chat cannot be used; pass token ids with --prompt-ids",
            files
                .dir
                .as_ref()
                .map_or_else(|| files.name.clone(), |d| d.display().to_string())
        );
    };
    if let Some(p) = &args.prompt {
        return Ok(tok.encode(p, true)?);
    }
    let Some(user) = &args.chat else {
        bail!("one of --prompt, --chat or --prompt-ids is required");
    };
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(ChatMessage::new("system", s.as_str()));
    }
    messages.push(ChatMessage::new("user", user.as_str()));
    Ok(tok.encode_chat(&messages, true)?)
}

/// `generate --addr`: the same request through a running mesh's Generation API.
mod remote {
    use std::io::Write;

    use anyhow::Context;
    use moemesh_proto::v1::{self, generate_request::Input};

    use super::GenerateArgs;

    pub fn run(addr: &str, args: &GenerateArgs) -> anyhow::Result<()> {
        let input = if let Some(ids) = &args.prompt_ids {
            Input::Tokens(v1::TokenIds { ids: ids.clone() })
        } else if let Some(p) = &args.prompt {
            Input::Prompt(p.clone())
        } else {
            let mut messages = Vec::new();
            if let Some(s) = &args.system {
                messages.push(v1::ChatMessage {
                    role: "system".into(),
                    content: s.clone(),
                });
            }
            messages.push(v1::ChatMessage {
                role: "user".into(),
                content: args.chat.clone().unwrap_or_default(),
            });
            Input::Chat(v1::ChatInput { messages })
        };
        let req = v1::GenerateRequest {
            input: Some(input),
            sampling: Some(v1::SamplingParams {
                temperature: args.temperature,
                top_p: Some(args.top_p),
                top_k: args.top_k as u32,
                seed: args.seed,
                ..Default::default()
            }),
            stopping: Some(v1::StoppingCriteria {
                max_new_tokens: Some(args.max_new_tokens as u32),
                stop: args.stop.clone(),
                ignore_eos: args.ignore_eos,
                ..Default::default()
            }),
            request_id: String::new(),
            cache_salt: String::new(),
        };
        let json = args.json;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let started = std::time::Instant::now();
            let mut first_token: Option<std::time::Duration> = None;
            let mut client = args.client.connect(addr).await?;
            let mut stream = client.generate(req).await.map_err(|s| anyhow::anyhow!("{}: {}", code(&s), s.message()))?.into_inner();
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let (mut ids, mut logprobs, mut text) = (Vec::<u32>::new(), Vec::<f32>::new(), String::new());
            let mut finish = None;
            while let Some(msg) = stream.message().await.map_err(|s| anyhow::anyhow!("{}: {}", code(&s), s.message()))? {
                if json {
                    for (i, t) in msg.token_ids.iter().enumerate() {
                        let piece = if i + 1 == msg.token_ids.len() { msg.text.as_str() } else { "" };
                        let lp = msg.logprobs.get(i).copied().unwrap_or(0.0);
                        writeln!(out, "{}", serde_json::json!({"token_id": t, "logprob": lp, "text": piece}))?;
                    }
                } else {
                    write!(out, "{}", msg.text)?;
                }
                out.flush()?;
                if first_token.is_none() && !msg.token_ids.is_empty() {
                    first_token = Some(started.elapsed());
                }
                ids.extend(&msg.token_ids);
                logprobs.extend(&msg.logprobs);
                text.push_str(&msg.text);
                if msg.finish_reason != v1::FinishReason::Unspecified as i32 {
                    finish = Some((msg.finish_reason, msg.usage));
                }
            }
            let (reason, usage) = finish.context("the stream ended without a finish reason")?;
            let reason = match v1::FinishReason::try_from(reason) {
                Ok(v1::FinishReason::Length) => "length",
                Ok(v1::FinishReason::Stop) => "stop",
                Ok(v1::FinishReason::Eos) => "eos",
                Ok(v1::FinishReason::Cancelled) => "cancelled",
                _ => "unknown",
            };
            let usage = usage.unwrap_or_default();
            let total = started.elapsed();
            let decode_s = (total - first_token.unwrap_or_default()).as_secs_f64();
            let decode_tps = if ids.len() > 1 && decode_s > 0.0 { (ids.len() - 1) as f64 / decode_s } else { 0.0 };
            if json {
                let last = serde_json::json!({
                    "token_ids": ids, "logprobs": logprobs, "text": text, "finish_reason": reason,
                    "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                              "time_to_first_token_ms": usage.time_to_first_token_ms,
                              "total_ms": total.as_secs_f64() * 1e3, "decode_tokens_per_s": decode_tps},
                });
                writeln!(out, "{last}")?;
            } else {
                writeln!(out)?;
                eprintln!("[{addr} | {} prompt + {} generated tokens | finish: {reason} | first token {:.1} ms | decode {decode_tps:.1} tok/s]",
                    usage.prompt_tokens, usage.completion_tokens, usage.time_to_first_token_ms);
            }
            anyhow::Ok(())
        })
    }

    /// `InvalidArgument` → `INVALID_ARGUMENT`, as gRPC documentation and grpcurl spell codes.
    fn code(s: &tonic::Status) -> String {
        let mut out = String::new();
        for (i, c) in format!("{:?}", s.code()).chars().enumerate() {
            if c.is_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
        }
        out
    }
}
