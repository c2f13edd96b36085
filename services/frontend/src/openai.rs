//! The OpenAI-compatible HTTP API (`--http-listen`): `POST /v1/chat/completions` and
//! `/v1/completions` (streamed as server-sent events, or whole), `GET /v1/models` and
//! `GET /health`. A thin adapter: each request becomes a `Generate` call into the same service
//! the gRPC API uses, so batching, limits, API keys (as `Authorization: Bearer`), the audit log
//! and the metrics are the same. Errors come in OpenAI's JSON shape with the matching HTTP
//! status. A client that disconnects drops its stream, which cancels the sequence and frees its
//! KV on the next step.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use moemesh_common::MeshError;
use moemesh_proto::v1::{
    self, ChatInput, ChatMessage, GenerateRequest, GenerateResponse, StoppingCriteria,
    generate_request::Input,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Starts a generation as the gRPC `Generate` does (key check included); the stream carries
/// its tokens, and dropping it cancels the sequence.
pub type Generator = Arc<
    dyn Fn(
            GenerateRequest,
            HeaderMap,
        ) -> futures::future::BoxFuture<
            'static,
            Result<futures::stream::BoxStream<'static, Result<GenerateResponse, Status>>, Status>,
        > + Send
        + Sync,
>;

#[derive(Clone)]
pub struct Api {
    pub model: String,
    pub generate: Generator,
    /// Whether a gate is there to serve (what `/health` reports, as gRPC health does).
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// `--reasoning-parser deepseek-r1`: chat output up to `</think>` is `reasoning_content`.
    pub reasoning: bool,
    /// The largest request body read (`--max-prompt-bytes` × 2 + 1 MiB for the JSON around it).
    pub max_body_bytes: usize,
    /// A token id's text, for the alternatives of `top_logprobs` (its id in brackets when the
    /// model has no tokenizer).
    pub token_text: Arc<dyn Fn(u32) -> String + Send + Sync>,
}

/// DeepSeek-R1's reasoning split, as vLLM's `deepseek_r1` parser makes it: the assistant turn
/// starts in its reasoning (an opening `<think>`, if the model writes one, is dropped), and
/// `</think>` ends it; what follows is the answer. Fed piece by piece, it holds back a tail that
/// might be the start of a tag, so a tag split over two tokens is still found.
#[derive(Debug, Default)]
pub struct ReasoningSplit {
    answering: bool,
    /// Text not yet emitted because it might begin a tag.
    held: String,
    /// Whether anything of the reasoning has been seen (only a leading `<think>` is dropped).
    started: bool,
}

const THINK: &str = "<think>";
const END_THINK: &str = "</think>";

impl ReasoningSplit {
    /// The reasoning and the answer text this piece completes.
    pub fn push(&mut self, piece: &str) -> (String, String) {
        self.held.push_str(piece);
        let (mut reasoning, mut answer) = (String::new(), String::new());
        if self.answering {
            answer = std::mem::take(&mut self.held);
            return (reasoning, answer);
        }
        if !self.started {
            let t = self.held.trim_start();
            if THINK.starts_with(t) && t.len() < THINK.len() {
                return (reasoning, answer);
            }
            if let Some(rest) = t.strip_prefix(THINK) {
                self.held = rest.to_string();
            }
            self.started = true;
        }
        if let Some(at) = self.held.find(END_THINK) {
            reasoning.push_str(&self.held[..at]);
            answer.push_str(&self.held[at + END_THINK.len()..]);
            self.held.clear();
            self.answering = true;
            return (reasoning, answer);
        }
        // Keep back the longest tail that is a prefix of `</think>`.
        let keep = (1..END_THINK.len())
            .rev()
            .find(|&n| self.held.ends_with(&END_THINK[..n]))
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        reasoning.push_str(&self.held[..cut]);
        self.held.drain(..cut);
        (reasoning, answer)
    }

    /// What is held back at the end (the sequence finished without completing a tag).
    pub fn finish(&mut self) -> (String, String) {
        let rest = std::mem::take(&mut self.held);
        if self.answering {
            (String::new(), rest)
        } else {
            (rest, String::new())
        }
    }
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(|| async {
            error(not_found(
                "no such route: the API serves /v1/chat/completions, /v1/completions, /v1/models and /health",
            ))
        })
        // Bodies are read by the handlers against `max_body_bytes`, so an oversized one gets an
        // OpenAI-shaped error naming the limit rather than axum's plain-text 413.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(api)
}

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<String>,
}

/// What the two endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
    n: Option<u32>,
    stream_options: Option<StreamOptions>,
    user: Option<String>,
    /// Isolates the request in the prefix cache (as vLLM's `cache_salt`).
    cache_salt: Option<String>,
    /// OpenAI's penalties, in [-2, 2].
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// vLLM's extensions, with vLLM's names.
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    stop_token_ids: Option<Vec<u32>>,
    min_tokens: Option<u32>,
    #[serde(default)]
    ignore_eos: bool,
    /// vLLM's `prompt_logprobs`: each prompt token's logprob, with this many alternatives.
    prompt_logprobs: Option<u32>,
    /// OpenAI's structured output: `{"type": "json_schema", "json_schema": {"schema": …}}`,
    /// `{"type": "json_object"}` or `{"type": "text"}` (vLLM takes it on both endpoints).
    response_format: Option<Value>,
    /// vLLM's guided decoding extensions.
    guided_regex: Option<String>,
    guided_json: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    tools: Option<Value>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: OneOrMany,
    logprobs: Option<u32>,
    echo: Option<bool>,
    #[serde(flatten)]
    common: Common,
}

fn invalid(m: impl Into<String>) -> Status {
    MeshError::Invalid(m.into()).into()
}

fn not_found(m: impl Into<String>) -> Status {
    MeshError::NotFound(m.into()).into()
}

fn unavailable(m: impl Into<String>) -> Status {
    MeshError::Unavailable(m.into()).into()
}

/// An OpenAI-shaped error response for a status whose fields are already OpenAI's.
fn error(status: Status) -> Response {
    error_in(status, None)
}

/// The OpenAI (or vLLM extension) name of the request field a Generate field path stands for,
/// as `param` says it: `sampling.n` is `n`, `stopping.stop[1]` is `stop`,
/// `stopping.max_new_tokens` is `max_tokens`. `ep` is the endpoint and whether the request
/// named `max_completion_tokens`; without it only the names both endpoints share are mapped.
fn openai_param(field: &str, ep: Option<(Kind, bool)>) -> String {
    let path = field.split('[').next().unwrap_or(field);
    let input = match ep {
        Some((Kind::Chat, _)) => "messages",
        Some((Kind::Completion, _)) => "prompt",
        None => path,
    };
    if path.starts_with("response_format") || path.starts_with("sampling.constraint.json") {
        return "response_format".into();
    }
    let name = match path {
        "sampling.constraint.regex" => "guided_regex",
        "sampling.top_logprobs" if matches!(ep, Some((Kind::Completion, _))) => "logprobs",
        "stopping.max_new_tokens" if matches!(ep, Some((_, true))) => "max_completion_tokens",
        "stopping.max_new_tokens" => "max_tokens",
        "stopping.min_new_tokens" => "min_tokens",
        "input" | "prompt" | "chat" | "chat.messages" | "tokens.ids" => input,
        "request_id" => "user",
        other => other.rsplit('.').next().unwrap_or(other),
    };
    name.to_string()
}

/// An OpenAI-shaped error response for a status from the Generate path: its field named as
/// the endpoint `ep` spells it ([`openai_param`]).
fn error_in(status: Status, ep: Option<(Kind, bool)>) -> Response {
    let (http, kind) = match status.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            (StatusCode::BAD_REQUEST, "invalid_request_error")
        }
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error"),
        Code::NotFound => (StatusCode::NOT_FOUND, "not_found_error"),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout_error"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable_error"),
        Code::Unimplemented => (StatusCode::NOT_IMPLEMENTED, "invalid_request_error"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
    };
    // The field the status's BadRequest violation names becomes `param`.
    let message = status.message().to_string();
    let param = status
        .get_details_bad_request()
        .and_then(|b| b.field_violations.into_iter().next())
        .map(|v| openai_param(&v.field, ep));
    let body = json!({"error": {
        "message": message,
        "type": kind,
        "param": param,
        "code": format!("{:?}", status.code()).to_lowercase(),
    }});
    (http, Json(body)).into_response()
}

/// A JSON body that does not parse is a 400 in OpenAI's shape, not axum's plain text.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(body).map_err(|e| invalid(format!("request body: {e}")))
}

impl Common {
    /// The parts of a Generate request both endpoints fill the same way.
    fn check(&self, api: &Api) -> Result<(), Status> {
        if let Some(m) = self.model.as_deref()
            && !m.is_empty()
            && m != api.model
        {
            return Err(not_found(format!(
                "model: {m:?} is not served here; this server serves {:?}",
                api.model
            )));
        }
        Ok(())
    }

    /// The output constraint `response_format`, `guided_regex` or `guided_json` asks for (at
    /// most one of them).
    fn constraint(&self) -> Result<Option<v1::Constraint>, Status> {
        use v1::constraint::Kind;
        let format = match self.response_format.as_ref().filter(|f| !f.is_null()) {
            None => None,
            Some(f) => match f.get("type").and_then(Value::as_str) {
                Some("text") => None,
                Some("json_object") => Some(Kind::JsonObject(true)),
                Some("json_schema") => {
                    let schema = f
                        .get("json_schema")
                        .and_then(|j| j.get("schema"))
                        .filter(|s| s.is_object())
                        .ok_or_else(|| {
                            invalid("response_format.json_schema.schema: required, a JSON schema object")
                        })?;
                    Some(Kind::JsonSchema(schema.to_string()))
                }
                other => {
                    return Err(invalid(format!(
                        "response_format.type: {other:?}; one of \"text\", \"json_object\" or \"json_schema\""
                    )));
                }
            },
        };
        let regex = self.guided_regex.clone().map(Kind::Regex);
        let json = match &self.guided_json {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Kind::JsonSchema(s.clone())),
            Some(v) => Some(Kind::JsonSchema(v.to_string())),
        };
        let mut kinds = [format, regex, json].into_iter().flatten();
        let kind = kinds.next();
        if kinds.next().is_some() {
            return Err(invalid(
                "response_format: give one of response_format, guided_regex and guided_json",
            ));
        }
        Ok(kind.map(|k| v1::Constraint { kind: Some(k) }))
    }

    fn request(self, input: Input) -> Result<GenerateRequest, Status> {
        let constraint = self.constraint()?;
        Ok(GenerateRequest {
            input: Some(input),
            sampling: Some(v1::SamplingParams {
                // OpenAI's default temperature is 1.
                temperature: self.temperature.unwrap_or(1.0),
                top_p: self.top_p,
                top_k: self.top_k.unwrap_or(0),
                seed: self.seed,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                // Checked against its limit (`request::MAX_CHOICES`) with the rest.
                n: self.n.unwrap_or(1),
                // Set by the endpoint, whose field it is (`top_logprobs` or `logprobs`).
                top_logprobs: 0,
                prompt_logprobs: self.prompt_logprobs,
                constraint,
            }),
            stopping: Some(StoppingCriteria {
                max_new_tokens: self.max_completion_tokens.or(self.max_tokens),
                stop: self.stop.map(OneOrMany::into_vec).unwrap_or_default(),
                ignore_eos: self.ignore_eos,
                stop_token_ids: self.stop_token_ids.unwrap_or_default(),
                min_new_tokens: self.min_tokens.unwrap_or(0),
            }),
            request_id: self.user.unwrap_or_default(),
            cache_salt: self.cache_salt.unwrap_or_default(),
        })
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(r: i32) -> Option<&'static str> {
    match v1::FinishReason::try_from(r).ok()? {
        v1::FinishReason::Eos | v1::FinishReason::Stop => Some("stop"),
        v1::FinishReason::Length => Some("length"),
        v1::FinishReason::Cancelled => Some("abort"),
        v1::FinishReason::Unspecified => None,
    }
}

/// The usage of a request's choices together: the prompt once, the completions summed.
fn add_usage(total: Option<v1::Usage>, u: v1::Usage) -> Option<v1::Usage> {
    Some(match total {
        None => u,
        Some(t) => v1::Usage {
            completion_tokens: t.completion_tokens + u.completion_tokens,
            ..t
        },
    })
}

fn usage(u: &v1::Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

/// Which endpoint a response is for.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

struct Shape {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    logprobs: bool,
    include_usage: bool,
    /// Split chat output into `reasoning_content` and `content`.
    reasoning: bool,
    /// How many choices the request asked for (`n`).
    n: u32,
    /// Whether alternatives come with each token (`top_logprobs`, or a completion's `logprobs`
    /// above 0).
    top: bool,
    /// A token id's text.
    token_text: Arc<dyn Fn(u32) -> String + Send + Sync>,
}

impl Shape {
    fn new(kind: Kind, api: &Api, logprobs: bool, include_usage: bool) -> Self {
        let prefix = if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        };
        let n = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Shape {
            kind,
            id: format!("{prefix}-{n:x}"),
            model: api.model.clone(),
            created: now(),
            logprobs,
            include_usage,
            reasoning: false,
            n: 1,
            top: false,
            token_text: api.token_text.clone(),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// The logprobs of tokens whose texts are `texts`, with their alternatives `tops` (one per
    /// token, or none when not asked for), in the endpoint's shape.
    fn logprobs(&self, texts: &[String], logprobs: &[f32], tops: &[v1::TopLogprobs]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let alternatives = |i: usize| -> Vec<(String, f32)> {
            tops.get(i).map_or_else(Vec::new, |t| {
                t.token_ids
                    .iter()
                    .zip(&t.logprobs)
                    .map(|(&id, &l)| ((self.token_text)(id), l))
                    .collect()
            })
        };
        match self.kind {
            Kind::Chat => {
                let content: Vec<Value> = texts
                    .iter()
                    .zip(logprobs)
                    .enumerate()
                    .map(|(i, (t, l))| {
                        let top: Vec<Value> = alternatives(i)
                            .into_iter()
                            .map(|(t, l)| json!({"token": t, "logprob": l, "bytes": t.as_bytes()}))
                            .collect();
                        json!({"token": t, "logprob": l, "bytes": t.as_bytes(), "top_logprobs": top})
                    })
                    .collect();
                json!({ "content": content })
            }
            Kind::Completion => {
                // The legacy shape: per token, a map of each alternative's text to its logprob.
                let top = self.top.then(|| {
                    (0..texts.len())
                        .map(|i| {
                            let m: serde_json::Map<String, Value> = alternatives(i)
                                .into_iter()
                                .map(|(t, l)| (t, json!(l)))
                                .collect();
                            Value::Object(m)
                        })
                        .collect::<Vec<_>>()
                });
                json!({
                    "tokens": texts,
                    "token_logprobs": logprobs,
                    "top_logprobs": top,
                    "text_offset": Value::Null,
                })
            }
        }
    }

    /// Prompt logprobs as vLLM returns them: `null` for the first prompt token, then for each
    /// token a map from token id (as a string) to `{logprob, rank, decoded_token}`, holding the
    /// prompt token and its alternatives (ranked 1, 2, …).
    fn prompt_logprobs(&self, lps: &[v1::PromptLogprob]) -> Value {
        let entry = |id: u32, logprob: f32, rank: u32| json!({"logprob": logprob, "rank": rank, "decoded_token": (self.token_text)(id)});
        let mut out = vec![Value::Null];
        for p in lps {
            let mut m = serde_json::Map::new();
            if let Some(t) = &p.top {
                for (k, (&id, &l)) in (1u32..).zip(t.token_ids.iter().zip(&t.logprobs)) {
                    m.insert(id.to_string(), entry(id, l, k));
                }
            }
            m.insert(p.token_id.to_string(), entry(p.token_id, p.logprob, p.rank));
            out.push(Value::Object(m));
        }
        Value::Array(out)
    }

    fn choice(
        &self,
        index: u32,
        text: &str,
        finish: Option<&str>,
        logprobs: Value,
        chunk: bool,
    ) -> Value {
        self.chat_choice(index, None, text, finish, logprobs, chunk)
    }

    /// A choice; for chat with the reasoning split on, `reasoning` is `reasoning_content`.
    fn chat_choice(
        &self,
        index: u32,
        reasoning: Option<&str>,
        text: &str,
        finish: Option<&str>,
        logprobs: Value,
        chunk: bool,
    ) -> Value {
        let mut message = json!({"content": text});
        if let Some(r) = reasoning {
            message["reasoning_content"] = json!(r);
        }
        match (self.kind, chunk) {
            (Kind::Chat, false) => {
                message["role"] = json!("assistant");
                json!({
                    "index": index,
                    "message": message,
                    "finish_reason": finish,
                    "logprobs": logprobs,
                })
            }
            (Kind::Chat, true) => json!({
                "index": index,
                "delta": message,
                "finish_reason": finish,
                "logprobs": logprobs,
            }),
            (Kind::Completion, _) => json!({
                "index": index,
                "text": text,
                "finish_reason": finish,
                "logprobs": logprobs,
            }),
        }
    }

    fn body(&self, choices: Vec<Value>, usage: Option<Value>, chunk: bool) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }
}

/// The request body, at most `limit` bytes.
async fn read_body(body: axum::body::Body, limit: usize) -> Result<axum::body::Bytes, Status> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        invalid(format!(
            "request body: over the limit of {limit} bytes (twice --max-prompt-bytes plus 1 MiB), or unreadable: {e}"
        ))
    })
}

async fn chat(State(api): State<Api>, headers: HeaderMap, body: axum::body::Body) -> Response {
    let body = match read_body(body, api.max_body_bytes).await {
        Ok(b) => b,
        Err(s) => return error(s),
    };
    let req: ChatRequest = match parse(&body) {
        Ok(r) => r,
        Err(s) => return error(s),
    };
    if let Err(s) = req.common.check(&api) {
        return error(s);
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return error(invalid("tools: tool calling is not supported"));
    }
    let top = req.top_logprobs.unwrap_or(0);
    if top > 0 && req.logprobs != Some(true) {
        return error(invalid(
            "top_logprobs: needs logprobs: true (the alternatives come with each token's logprob)",
        ));
    }
    let messages = req
        .messages
        .into_iter()
        .map(|m| ChatMessage {
            role: m.role,
            content: m.content.unwrap_or_default(),
        })
        .collect();
    let logprobs = req.logprobs.unwrap_or(false);
    let input = Input::Chat(ChatInput { messages });
    let lp = Logprobs { on: logprobs, top };
    run(api, headers, req.common, input, Kind::Chat, lp).await
}

async fn completions(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let body = match read_body(body, api.max_body_bytes).await {
        Ok(b) => b,
        Err(s) => return error(s),
    };
    let req: CompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(s) => return error(s),
    };
    if let Err(s) = req.common.check(&api) {
        return error(s);
    }
    if req.echo.unwrap_or(false) {
        return error(invalid("echo: not supported"));
    }
    let mut prompts = req.prompt.into_vec();
    if prompts.len() != 1 {
        return error(invalid(format!(
            "prompt: {} prompts; one per request is supported",
            prompts.len()
        )));
    }
    let prompt = prompts.pop().unwrap_or_default();
    // The legacy API's `logprobs: N` is both: the chosen token's and N alternatives.
    let logprobs = Logprobs {
        on: req.logprobs.is_some(),
        top: req.logprobs.unwrap_or(0),
    };
    run(
        api,
        headers,
        req.common,
        Input::Prompt(prompt),
        Kind::Completion,
        logprobs,
    )
    .await
}

/// What a request asked of logprobs.
#[derive(Clone, Copy)]
struct Logprobs {
    /// The chosen token's.
    on: bool,
    /// Alternatives per token (checked against its limit with the rest of the request).
    top: u32,
}

/// Starts the generation and answers: as events when the request streams, else whole.
async fn run(
    api: Api,
    headers: HeaderMap,
    common: Common,
    input: Input,
    kind: Kind,
    logprobs: Logprobs,
) -> Response {
    let include_usage = common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let mut shape = Shape::new(kind, &api, logprobs.on, include_usage);
    shape.top = logprobs.top > 0;
    shape.reasoning = api.reasoning && kind == Kind::Chat;
    shape.n = common.n.unwrap_or(1).max(1);
    let stream = common.stream;
    let ep = Some((kind, common.max_completion_tokens.is_some()));
    let mut req = match common.request(input) {
        Ok(r) => r,
        Err(status) => return error_in(status, ep),
    };
    if let Some(s) = req.sampling.as_mut() {
        s.top_logprobs = logprobs.top;
    }
    let tokens = match (api.generate)(req, headers).await {
        Ok(s) => s,
        Err(status) => return error_in(status, ep),
    };
    if stream {
        Sse::new(events(tokens, shape)).into_response()
    } else {
        whole(tokens, shape).await
    }
}

/// One choice of a whole response, as its messages come in.
#[derive(Default)]
struct Gathered {
    text: String,
    /// Each token's text, for `logprobs`.
    pieces: Vec<String>,
    logprobs: Vec<f32>,
    /// Each token's alternatives, when asked for.
    tops: Vec<v1::TopLogprobs>,
    /// The prompt's logprobs (choice 0's, when asked for).
    prompt: Vec<v1::PromptLogprob>,
    finish: Option<&'static str>,
}

/// The whole response at once: a choice per index, the usage of all of them.
async fn whole(
    mut tokens: futures::stream::BoxStream<'static, Result<GenerateResponse, Status>>,
    shape: Shape,
) -> Response {
    let mut choices: Vec<Gathered> = Vec::new();
    choices.resize_with(shape.n as usize, Gathered::default);
    let mut used = None;
    while let Some(m) = tokens.next().await {
        let m = match m {
            Ok(m) => m,
            Err(status) => return error_in(status, Some((shape.kind, false))),
        };
        let i = m.index as usize;
        if choices.len() <= i {
            choices.resize_with(i + 1, Gathered::default);
        }
        let c = &mut choices[i];
        c.text.push_str(&m.text);
        c.pieces.push(m.text.clone());
        c.logprobs.extend(&m.logprobs);
        c.tops.extend(m.top_logprobs);
        c.prompt.extend(m.prompt_logprobs);
        c.finish = c.finish.or(finish_reason(m.finish_reason));
        if let Some(u) = m.usage {
            used = add_usage(used, u);
        }
    }
    // Computed once (with choice 0) and, as vLLM does, on every choice of a completion, or
    // beside the choices of a chat completion.
    let prompt = choices
        .first()
        .filter(|c| !c.prompt.is_empty())
        .map(|c| shape.prompt_logprobs(&c.prompt));
    let choices = (0u32..)
        .zip(&choices)
        .map(|(i, c)| {
            let lp = shape.logprobs(&c.pieces, &c.logprobs, &c.tops);
            if shape.reasoning {
                let mut split = ReasoningSplit::default();
                let (mut r, mut a) = split.push(&c.text);
                let (r2, a2) = split.finish();
                r.push_str(&r2);
                a.push_str(&a2);
                shape.chat_choice(i, Some(&r), &a, c.finish, lp, false)
            } else {
                shape.choice(i, &c.text, c.finish, lp, false)
            }
        })
        .map(|mut choice| {
            if let Some(p) = prompt.as_ref().filter(|_| shape.kind == Kind::Completion) {
                choice["prompt_logprobs"] = p.clone();
            }
            choice
        })
        .collect();
    let mut body = shape.body(choices, used.as_ref().map(usage), false);
    if let Some(p) = prompt.filter(|_| shape.kind == Kind::Chat) {
        body["prompt_logprobs"] = p;
    }
    Json(body).into_response()
}

/// Server-sent events: a chunk per token (the first of each choice names the assistant role),
/// each choice's last with its finish reason, usage (of all the choices) when asked for once the
/// last choice has finished, then `[DONE]`. An error after the stream started is sent as an
/// event in OpenAI's error shape.
fn events(
    tokens: futures::stream::BoxStream<'static, Result<GenerateResponse, Status>>,
    shape: Shape,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let shape = Arc::new(shape);
    let first = {
        let s = shape.clone();
        futures::stream::iter((0..s.n).map(move |i| {
            (s.kind == Kind::Chat).then(|| {
                let choice = json!({"index": i, "delta": {"role": "assistant", "content": ""},
                    "finish_reason": Value::Null, "logprobs": Value::Null});
                s.body(vec![choice], None, true)
            })
        }))
    };
    let s = shape.clone();
    let mut splits: Vec<ReasoningSplit> = Vec::new();
    let (mut used, mut finished) = (None, 0);
    let chunks = tokens.flat_map(move |m| {
        let out: Vec<Value> = match m {
            Ok(m) => {
                let lp = s.logprobs(std::slice::from_ref(&m.text), &m.logprobs, &m.top_logprobs);
                let finish = finish_reason(m.finish_reason);
                let choice = if s.reasoning {
                    let i = m.index as usize;
                    if splits.len() <= i {
                        splits.resize_with(i + 1, ReasoningSplit::default);
                    }
                    let split = &mut splits[i];
                    let (mut r, mut a) = split.push(&m.text);
                    if finish.is_some() {
                        let (r2, a2) = split.finish();
                        r.push_str(&r2);
                        a.push_str(&a2);
                    }
                    s.chat_choice(m.index, Some(&r), &a, finish, lp, true)
                } else {
                    s.choice(m.index, &m.text, finish, lp, true)
                };
                // Choice 0's first chunk carries the prompt's logprobs (on the choice of a
                // completion, beside it in a chat completion, as the whole response has them).
                let prompt =
                    (!m.prompt_logprobs.is_empty()).then(|| s.prompt_logprobs(&m.prompt_logprobs));
                let mut choice = choice;
                if let Some(p) = prompt.as_ref().filter(|_| s.kind == Kind::Completion) {
                    choice["prompt_logprobs"] = p.clone();
                }
                let mut body = s.body(vec![choice], None, true);
                if let Some(p) = prompt.filter(|_| s.kind == Kind::Chat) {
                    body["prompt_logprobs"] = p;
                }
                let mut v = vec![body];
                if let Some(u) = m.usage {
                    used = add_usage(used, u);
                    finished += 1;
                }
                if let Some(u) = used.as_ref().filter(|_| s.include_usage && finished == s.n) {
                    v.push(s.body(Vec::new(), Some(usage(u)), true));
                }
                v
            }
            Err(status) => {
                let (code, message) = (status.code(), status.message().to_string());
                vec![json!({"error": {"message": message, "type": "server_error",
                    "param": Value::Null, "code": format!("{code:?}").to_lowercase()}})]
            }
        };
        futures::stream::iter(out.into_iter().map(Some))
    });
    first
        .chain(chunks)
        .filter_map(|v| async move { v })
        .map(|v| Ok(Event::default().data(v.to_string())))
        .chain(futures::stream::once(async {
            Ok(Event::default().data("[DONE]"))
        }))
}

/// 200 while a gate of this model is registered, 503 otherwise.
async fn health(State(api): State<Api>) -> Response {
    if (api.ready)() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        error(unavailable("no gate of this model is registered"))
    }
}

async fn models(State(api): State<Api>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": api.model, "object": "model", "created": 0, "owned_by": "moemesh"}],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` and returns (reasoning, answer) as a client would add them up.
    fn split(pieces: &[&str]) -> (String, String) {
        let mut s = ReasoningSplit::default();
        let (mut r, mut a) = (String::new(), String::new());
        for p in pieces {
            let (x, y) = s.push(p);
            r.push_str(&x);
            a.push_str(&y);
        }
        let (x, y) = s.finish();
        (r + &x, a + &y)
    }

    #[test]
    fn penalties_and_vllm_extensions_reach_the_generate_request() {
        let body = br#"{"prompt": "x", "presence_penalty": 0.5, "frequency_penalty": -1.0,
            "min_p": 0.1, "repetition_penalty": 1.3, "stop_token_ids": [7, 9], "min_tokens": 3,
            "ignore_eos": true}"#;
        let req: CompletionRequest = parse(body).expect("parses");
        let g = req
            .common
            .request(Input::Prompt("x".into()))
            .expect("valid");
        let s = g.sampling.expect("sampling");
        assert_eq!(
            (
                s.presence_penalty,
                s.frequency_penalty,
                s.min_p,
                s.repetition_penalty
            ),
            (0.5, -1.0, Some(0.1), Some(1.3))
        );
        let st = g.stopping.expect("stopping");
        assert_eq!(
            (st.stop_token_ids, st.min_new_tokens, st.ignore_eos),
            (vec![7, 9], 3, true)
        );
        // Unset, they are off.
        let req: CompletionRequest = parse(br#"{"prompt": "x"}"#).expect("parses");
        let g = req
            .common
            .request(Input::Prompt("x".into()))
            .expect("valid");
        let s = g.sampling.expect("sampling");
        assert_eq!(
            (s.presence_penalty, s.min_p, s.repetition_penalty),
            (0.0, None, None)
        );
    }

    #[test]
    fn params_are_named_as_openai_spells_them() {
        let chat = Some((Kind::Chat, false));
        let completion = Some((Kind::Completion, false));
        for (field, ep, want) in [
            ("sampling.n", chat, "n"),
            ("sampling.temperature", None, "temperature"),
            ("sampling.top_logprobs", chat, "top_logprobs"),
            ("sampling.top_logprobs", completion, "logprobs"),
            ("sampling.prompt_logprobs", completion, "prompt_logprobs"),
            ("stopping.max_new_tokens", chat, "max_tokens"),
            (
                "stopping.max_new_tokens",
                Some((Kind::Chat, true)),
                "max_completion_tokens",
            ),
            ("stopping.min_new_tokens", completion, "min_tokens"),
            ("stopping.stop[2]", completion, "stop"),
            ("stopping.stop_token_ids[1]", chat, "stop_token_ids"),
            ("chat.messages", chat, "messages"),
            ("input", completion, "prompt"),
            ("request_id", chat, "user"),
            ("sampling.constraint.regex", completion, "guided_regex"),
            ("sampling.constraint.json_schema", chat, "response_format"),
            (
                "response_format.json_schema.schema",
                None,
                "response_format",
            ),
            // Already OpenAI's: unchanged.
            ("response_format", None, "response_format"),
            ("prompt", None, "prompt"),
        ] {
            assert_eq!(openai_param(field, ep), want, "{field}");
        }
    }

    #[test]
    fn reasoning_ends_at_the_closing_tag_even_split_over_tokens() {
        // As vLLM's parser: the text on either side of the tag is kept as it is.
        let want = ("Let me think.".to_string(), "\n\nBlue.".to_string());
        assert_eq!(split(&["Let me think.</think>\n\nBlue."]), want);
        assert_eq!(
            split(&["Let me", " think.</", "thi", "nk>", "\n", "\nBlue."]),
            want
        );
        assert_eq!(
            split(&["<think>", "\nLet me think.", "</think>", "Blue."]).1,
            "Blue."
        );
        assert_eq!(split(&["<thi", "nk>Let me think.</think>\n\nBlue."]), want);
    }

    #[test]
    fn without_a_closing_tag_everything_is_reasoning_and_a_lone_angle_bracket_is_text() {
        assert_eq!(
            split(&["still thinking"]),
            ("still thinking".into(), String::new())
        );
        assert_eq!(
            split(&["a < b", " and c </", "x"]),
            ("a < b and c </x".into(), String::new())
        );
    }
}
