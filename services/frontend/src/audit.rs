//! The audit log (`--audit-log PATH`, `-` for stdout): one JSON line per Generate call when it
//! ends (finished, failed or cancelled), and one per call refused at the door (no or a bad key,
//! a method the key may not call, a key over its limits):
//!
//! ```json
//! {"time":"2025-01-02T03:04:05.678Z","method":"Generate","key_id":"team-a","request_id":"r-1",
//!  "status":"Ok","finish_reason":"length","prompt_tokens":12,"completion_tokens":32,
//!  "prompt_sha256":"…","output_sha256":"…","duration_ms":410.2}
//! ```
//!
//! `prompt_sha256` is the SHA-256 of the prompt as the model reads it: a `prompt`'s UTF-8 bytes,
//! a `chat` rendered with the chat template (the `rendered` text Tokenize returns), or `tokens`
//! as little-endian u32s. `output_sha256` is that of the streamed text. The texts themselves are
//! logged only with `--audit-log-text`. Lines go through a channel to a thread of their own, so a
//! slow disk never holds up generation; if the channel fills up, lines are dropped and counted
//! (`moemesh_frontend_audit_dropped_total`) rather than blocking.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use futures::Stream;
use moemesh_common::metrics::{code_label, names};
use moemesh_common::{MeshError, MeshResult};
use moemesh_proto::v1::{FinishReason, GenerateResponse};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE: usize = 65_536;

/// A handle that sends lines to the writer thread.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<String>,
    /// `--audit-log-text`: include the prompt and output texts.
    include_text: bool,
}

/// Ends when every [`AuditLog`] handle is gone and the writer has flushed.
pub struct AuditWriter(oneshot::Receiver<()>);

impl AuditWriter {
    /// Waits for the writer thread to write what it was sent and stop.
    pub async fn finished(self) {
        let _ = self.0.await;
    }
}

/// One line of the log.
#[derive(Serialize)]
struct Record<'a> {
    /// When the call ended, RFC 3339 in UTC.
    time: String,
    method: &'a str,
    key_id: Option<&'a str>,
    request_id: Option<&'a str>,
    /// The call's gRPC status, as the metrics spell it (`Ok`, `Unauthenticated`, …).
    status: &'static str,
    /// `length`, `stop`, `eos`, `cancelled` (the client left) or `error` (see status).
    finish_reason: Option<&'static str>,
    prompt_tokens: usize,
    completion_tokens: usize,
    prompt_sha256: Option<String>,
    output_sha256: Option<String>,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<&'a str>,
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl AuditLog {
    /// Opens (appends to, creating it with mode 0600) `target`, or stdout for `-`, and starts the
    /// writer thread.
    pub fn open(target: &str, include_text: bool) -> MeshResult<(AuditLog, AuditWriter)> {
        let mut out: Box<dyn Write + Send> = if target == "-" {
            Box::new(std::io::stdout())
        } else {
            let mut options = std::fs::OpenOptions::new();
            options.create(true).append(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let file = options
                .open(target)
                .map_err(|e| MeshError::Invalid(format!("--audit-log {target}: {e}")))?;
            Box::new(std::io::BufWriter::new(file))
        };
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        let (done_tx, done_rx) = oneshot::channel();
        let target = target.to_string();
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || {
                let mut failing = false;
                while let Some(line) = rx.blocking_recv() {
                    let mut result = writeln!(out, "{line}");
                    // Write what else is waiting, then flush once.
                    while let Ok(line) = rx.try_recv() {
                        result = result.and_then(|()| writeln!(out, "{line}"));
                    }
                    result = result.and_then(|()| out.flush());
                    match result {
                        Err(e) if !failing => {
                            tracing::error!(target = %target, error = %e, "audit log write failed");
                            failing = true;
                        }
                        Err(_) => {}
                        Ok(()) => failing = false,
                    }
                }
                let _ = done_tx.send(());
            })
            .map_err(|e| MeshError::Internal(format!("starting the audit log thread: {e}")))?;
        Ok((AuditLog { tx, include_text }, AuditWriter(done_rx)))
    }

    fn send(&self, record: &Record<'_>) {
        let line = match serde_json::to_string(record) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "audit record did not serialise");
                return;
            }
        };
        if self.tx.try_send(line).is_err() {
            metrics::counter!(names::AUDIT_DROPPED).increment(1);
        }
    }

    /// A call turned away before any handler saw it.
    pub fn refused(&self, method: &str, key_id: Option<&str>, code: tonic::Code) {
        self.send(&Record {
            time: now(),
            method,
            key_id,
            request_id: None,
            status: code_label(code),
            finish_reason: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            prompt_sha256: None,
            output_sha256: None,
            duration_ms: 0.0,
            prompt: None,
            output: None,
        });
    }

    /// Starts the trail of one Generate call.
    pub fn generate(&self, key_id: Option<&str>, request_id: &str, start: Instant) -> Trail {
        Trail {
            log: self.clone(),
            key_id: key_id.map(str::to_string),
            request_id: (!request_id.is_empty()).then(|| request_id.to_string()),
            start,
            prompt_sha256: None,
            prompt: None,
            prompt_tokens: 0,
            output: Sha256::new(),
            output_text: self.include_text.then(String::new),
            completion_tokens: 0,
            done: false,
        }
    }
}

/// One Generate call's record, filled in as it goes and written once, when it ends.
pub struct Trail {
    log: AuditLog,
    key_id: Option<String>,
    request_id: Option<String>,
    start: Instant,
    prompt_sha256: Option<String>,
    prompt: Option<String>,
    prompt_tokens: usize,
    output: Sha256,
    /// The streamed text, kept only with `--audit-log-text`.
    output_text: Option<String>,
    completion_tokens: usize,
    done: bool,
}

impl Trail {
    /// The prompt as the model reads it (see the module doc) and its length in tokens.
    pub fn prompt(&mut self, bytes: &[u8], text: Option<&str>, tokens: usize) {
        self.prompt_sha256 = Some(hex(&Sha256::digest(bytes)));
        if self.log.include_text {
            self.prompt = text.map(str::to_string);
        }
        self.prompt_tokens = tokens;
    }

    /// Writes the record: the call ended with `code` (and `finish_reason` when it finished).
    pub fn end(&mut self, code: tonic::Code, finish_reason: Option<&'static str>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let reason = finish_reason.or(match code {
            tonic::Code::Ok => None,
            tonic::Code::Cancelled => Some("cancelled"),
            _ => Some("error"),
        });
        let output = std::mem::take(&mut self.output);
        self.log.send(&Record {
            time: now(),
            method: "Generate",
            key_id: self.key_id.as_deref(),
            request_id: self.request_id.as_deref(),
            status: code_label(code),
            finish_reason: reason,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            prompt_sha256: self.prompt_sha256.take(),
            output_sha256: Some(hex(&output.finalize())),
            duration_ms: self.start.elapsed().as_secs_f64() * 1e3,
            prompt: self.prompt.as_deref(),
            output: self.output_text.as_deref(),
        });
    }

    fn saw(&mut self, msg: &GenerateResponse) {
        self.output.update(msg.text.as_bytes());
        if let Some(t) = &mut self.output_text {
            t.push_str(&msg.text);
        }
        self.completion_tokens += msg.token_ids.len();
    }
}

fn reason_name(r: i32) -> &'static str {
    match FinishReason::try_from(r) {
        Ok(FinishReason::Length) => "length",
        Ok(FinishReason::Stop) => "stop",
        Ok(FinishReason::Eos) => "eos",
        Ok(FinishReason::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

/// A Generate response stream that keeps its call's [`Trail`] and writes it when the stream ends
/// or is dropped (the client went away). With several choices the stream holds one finish per
/// choice; the record is written at the last one, with its reason.
pub struct Audited<S> {
    inner: S,
    trail: Trail,
    /// The request's choices (`sampling.n`).
    choices: u32,
    /// Choices finished so far.
    finished: u32,
}

impl<S> Audited<S> {
    pub fn new(inner: S, trail: Trail, choices: u32) -> Self {
        Audited {
            inner,
            trail,
            choices,
            finished: 0,
        }
    }
}

impl<S> Stream for Audited<S>
where
    S: Stream<Item = Result<GenerateResponse, Status>> + Unpin,
{
    type Item = Result<GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = std::task::ready!(Pin::new(&mut self.inner).poll_next(cx));
        match &item {
            Some(Ok(msg)) => {
                self.trail.saw(msg);
                if msg.finish_reason != FinishReason::Unspecified as i32 {
                    self.finished += 1;
                    if self.finished >= self.choices {
                        self.trail
                            .end(tonic::Code::Ok, Some(reason_name(msg.finish_reason)));
                    }
                }
            }
            Some(Err(status)) => self.trail.end(status.code(), None),
            // The sender went away without a final message (the frontend is stopping).
            None => self.trail.end(tonic::Code::Unavailable, None),
        }
        Poll::Ready(item)
    }
}

impl<S> Drop for Audited<S> {
    fn drop(&mut self) {
        self.trail.end(tonic::Code::Cancelled, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn msg(text: &str, ids: &[u32], reason: FinishReason) -> Result<GenerateResponse, Status> {
        Ok(GenerateResponse {
            text: text.into(),
            token_ids: ids.to_vec(),
            logprobs: vec![0.0; ids.len()],
            finish_reason: reason as i32,
            usage: None,
            request_id: String::new(),
            index: 0,
            top_logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
        })
    }

    async fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .expect("log")
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect()
    }

    #[tokio::test]
    async fn one_line_per_call_with_hashes_and_no_text_unless_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let (log, writer) = AuditLog::open(path.to_str().expect("utf-8"), false).expect("open");
        let mut trail = log.generate(Some("team-a"), "r-1", Instant::now());
        trail.prompt(b"Hello", Some("Hello"), 3);
        let items = vec![
            msg("Hi", &[5], FinishReason::Unspecified),
            msg(" there", &[6], FinishReason::Length),
        ];
        let got: Vec<_> = Audited::new(futures::stream::iter(items), trail, 1)
            .collect()
            .await;
        assert_eq!(got.len(), 2);
        // Two choices: written at the second finish, with every choice's tokens.
        let mut trail = log.generate(Some("team-a"), "r-2", Instant::now());
        trail.prompt(b"Hello", Some("Hello"), 3);
        let items = vec![
            msg("a", &[5], FinishReason::Eos),
            msg("b", &[6], FinishReason::Unspecified),
            msg("c", &[7], FinishReason::Length),
        ];
        let mut s = Audited::new(
            futures::stream::iter(items).chain(futures::stream::pending()),
            trail,
            2,
        );
        for _ in 0..3 {
            assert!(s.next().await.is_some());
        }
        drop(s);
        // A call whose client left after one token.
        let mut trail = log.generate(None, "", Instant::now());
        trail.prompt(&[1, 0, 0, 0], None, 1);
        let mut s = Audited::new(
            futures::stream::iter(vec![msg("x", &[9], FinishReason::Unspecified)])
                .chain(futures::stream::pending()),
            trail,
            1,
        );
        assert!(s.next().await.is_some());
        drop(s);
        log.refused("Tokenize", None, tonic::Code::Unauthenticated);
        drop(log);
        writer.finished().await;

        let l = lines(&path).await;
        assert_eq!(l.len(), 4, "{l:?}");
        // Written in order: r-1, r-2, the cancelled call, the refusal; r-2 is checked last.
        let l: Vec<_> = [0, 2, 3, 1].iter().map(|&i| l[i].clone()).collect();
        let two = &l[3];
        assert_eq!(
            (&two["request_id"], &two["status"], &two["finish_reason"]),
            (&"r-2".into(), &"Ok".into(), &"length".into())
        );
        assert_eq!(two["completion_tokens"], 3);
        assert_eq!(l[0]["key_id"], "team-a");
        assert_eq!(l[0]["request_id"], "r-1");
        assert_eq!(l[0]["status"], "Ok");
        assert_eq!(l[0]["finish_reason"], "length");
        assert_eq!(l[0]["prompt_tokens"], 3);
        assert_eq!(l[0]["completion_tokens"], 2);
        assert_eq!(l[0]["prompt_sha256"], hex(&Sha256::digest(b"Hello")));
        assert_eq!(l[0]["output_sha256"], hex(&Sha256::digest(b"Hi there")));
        assert!(l[0].get("prompt").is_none() && l[0].get("output").is_none());
        assert_eq!(l[1]["status"], "Cancelled");
        assert_eq!(l[1]["finish_reason"], "cancelled");
        assert_eq!(l[1]["request_id"], serde_json::Value::Null);
        assert_eq!(l[1]["completion_tokens"], 1);
        assert_eq!(l[2]["method"], "Tokenize");
        assert_eq!(l[2]["status"], "Unauthenticated");
    }

    #[tokio::test]
    async fn texts_only_with_audit_log_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let (log, writer) = AuditLog::open(path.to_str().expect("utf-8"), true).expect("open");
        let mut trail = log.generate(Some("k"), "r", Instant::now());
        trail.prompt(b"Hello", Some("Hello"), 1);
        trail.saw(&msg("out", &[1], FinishReason::Unspecified).expect("msg"));
        trail.end(tonic::Code::Internal, None);
        drop((trail, log));
        writer.finished().await;
        let l = lines(&path).await;
        assert_eq!(l[0]["prompt"], "Hello");
        assert_eq!(l[0]["output"], "out");
        assert_eq!(l[0]["finish_reason"], "error");
        assert_eq!(l[0]["status"], "Internal");
    }
}
