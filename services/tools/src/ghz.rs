//! ghz compatibility for `moemesh bench --scenario`: the part of ghz's JSON config format that a
//! Generate load test needs (so one scenario file in `loadtest/scenarios/` drives either tool),
//! and ghz's JSON report, which the bench writes with moemesh's per-token metrics added under
//! `tokenMetrics` (ghz sees a server stream only as one call, so it cannot measure them).
//!
//! Field names, defaults and semantics follow ghz's documentation (`total` 200, `concurrency`
//! 50, `timeout` 20s, `duration-stop` close, data arrays round-robin per request). A field that
//! ghz knows but the bench does not implement is refused by name rather than silently ignored.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use moemesh_proto::v1::GenerateRequest;
use serde::Deserialize;

/// The gRPC method a scenario may name, in both spellings ghz accepts.
const GENERATE_CALLS: [&str; 2] = [
    "moemesh.v1.Generation.Generate",
    "moemesh.v1.Generation/Generate",
];

/// A ghz config file as written in `loadtest/scenarios/`; see ghz's options documentation for
/// each field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Shown in the report.
    #[serde(default)]
    pub name: Option<String>,
    /// Must be `moemesh.v1.Generation.Generate`.
    pub call: String,
    /// Frontend address; `--addr` overrides it.
    #[serde(default)]
    pub host: Option<String>,
    /// Plaintext; the bench does not speak TLS, so it must be true.
    #[serde(default)]
    pub insecure: bool,
    /// ghz reads the schema from these; the bench has it compiled in, so they are accepted and
    /// not read. Scenario files leave them out, so that ghz uses server reflection.
    #[serde(default)]
    pub proto: Option<String>,
    #[serde(default)]
    pub protoset: Option<String>,
    #[serde(default, rename = "import-paths")]
    pub import_paths: Vec<String>,
    /// Requests in all (ignored when `duration` is set).
    #[serde(default)]
    pub total: Option<u64>,
    /// Concurrent workers, each with one call in flight.
    #[serde(default)]
    pub concurrency: Option<u64>,
    /// gRPC connections the workers share.
    #[serde(default)]
    pub connections: Option<u64>,
    /// Most calls started per second over all workers; 0 is no limit.
    #[serde(default)]
    pub rps: Option<u64>,
    /// Run for this long instead of `total` requests.
    #[serde(default)]
    pub duration: Option<GoDuration>,
    /// What happens to calls in flight when `duration` ends: `close` (cancel and report them),
    /// `wait` (let them finish, report them) or `ignore` (cancel, leave them out).
    #[serde(default, rename = "duration-stop")]
    pub duration_stop: Option<String>,
    /// With `total`: stop after this long even if requests remain.
    #[serde(default, rename = "max-duration")]
    pub max_duration: Option<GoDuration>,
    /// Deadline of each call (sent as `grpc-timeout`).
    #[serde(default)]
    pub timeout: Option<GoDuration>,
    /// Deadline for dialling a connection.
    #[serde(default, rename = "connect-timeout")]
    pub connect_timeout: Option<GoDuration>,
    /// One GenerateRequest in protobuf JSON, or an array of them used round-robin by request
    /// number.
    pub data: serde_json::Value,
    /// Request metadata (e.g. `authorization`).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Cancel a stream this long after it started (reported as Canceled, as ghz does).
    #[serde(default, rename = "stream-call-duration")]
    pub stream_call_duration: Option<GoDuration>,
    /// Cancel a stream after this many messages (reported as Canceled, as ghz does).
    #[serde(default, rename = "stream-call-count")]
    pub stream_call_count: Option<u64>,
    /// Leave the first N results out of the report (warm-up).
    #[serde(default, rename = "skipFirst")]
    pub skip_first: u64,
    /// Count failed calls in the latency statistics too.
    #[serde(default, rename = "count-errors")]
    pub count_errors: bool,
    /// Copied into the report.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Where the JSON report goes (default stdout); `--output` overrides it.
    #[serde(default)]
    pub output: Option<String>,
    /// Report format: only `json` or `pretty` (JSON either way) are written.
    #[serde(default)]
    pub format: Option<String>,
}

/// What ghz does with in-flight calls when `duration` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurationStop {
    Close,
    Wait,
    Ignore,
}

/// A Go `time.Duration` string such as `30s`, `1m30s` or `1.5s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_go_duration(&s)
            .map(GoDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses Go's duration syntax: a sequence of decimal numbers, each with an optional fraction
/// and a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), or a bare `0`. Written out because the
/// duration crates parse other syntaxes (no fractions, spaces, `min`), and a scenario file must
/// mean the same to ghz and to the bench. Negative durations are refused.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a Go duration such as 30s, 1m30s or 500ms");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_end);
        if num.is_empty() || num == "." {
            return Err(bad());
        }
        let value: f64 = num.parse().map_err(|_| bad())?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = next;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// A scenario checked and resolved: every request decoded, every default applied.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub host: String,
    pub requests: Vec<GenerateRequest>,
    /// The scenario's `data`, echoed in the report's options.
    pub data: serde_json::Value,
    pub metadata: Vec<(
        tonic::metadata::AsciiMetadataKey,
        tonic::metadata::AsciiMetadataValue,
    )>,
    pub total: u64,
    pub concurrency: u64,
    pub connections: u64,
    pub rps: u64,
    pub duration: Option<Duration>,
    pub duration_stop: DurationStop,
    pub max_duration: Option<Duration>,
    pub timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub stream_call_duration: Option<Duration>,
    pub stream_call_count: Option<u64>,
    pub skip_first: u64,
    pub count_errors: bool,
    pub tags: BTreeMap<String, String>,
    pub output: Option<String>,
}

/// Values given on the command line, which win over the file's.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub host: Option<String>,
    pub total: Option<u64>,
    pub concurrency: Option<u64>,
    pub rps: Option<u64>,
    pub duration: Option<Duration>,
    pub output: Option<String>,
}

impl Scenario {
    pub fn load(path: &std::path::Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the scenario {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a ghz JSON config", path.display()))
    }

    /// Checks every field and decodes `data` into GenerateRequests. Errors name the field.
    pub fn plan(self, o: Overrides) -> anyhow::Result<Plan> {
        if self.proto.is_some() || self.protoset.is_some() || !self.import_paths.is_empty() {
            eprintln!(
                "moemesh bench: proto, protoset and import-paths are not read; the schema is compiled in"
            );
        }
        if !GENERATE_CALLS.contains(&self.call.as_str()) {
            bail!(
                "call: moemesh bench drives only {}, not {:?}",
                GENERATE_CALLS[0],
                self.call
            );
        }
        if !self.insecure {
            bail!(
                "insecure: must be true (plaintext); moemesh bench does not speak TLS, use ghz for TLS runs"
            );
        }
        if let Some(f) = &self.format
            && f != "json"
            && f != "pretty"
        {
            bail!(
                "format: moemesh bench writes only ghz's JSON report (json or pretty), not {f:?}"
            );
        }
        let duration_stop = match self.duration_stop.as_deref() {
            None | Some("close") => DurationStop::Close,
            Some("wait") => DurationStop::Wait,
            Some("ignore") => DurationStop::Ignore,
            Some(other) => bail!("duration-stop: must be close, wait or ignore, not {other:?}"),
        };
        let concurrency = o.concurrency.or(self.concurrency).unwrap_or(50);
        let total = o.total.or(self.total).unwrap_or(200);
        let connections = self.connections.unwrap_or(1);
        if concurrency == 0 {
            bail!("concurrency: must be at least 1");
        }
        if total == 0 {
            bail!("total: must be at least 1");
        }
        if connections == 0 || connections > concurrency {
            bail!(
                "connections: must be between 1 and concurrency ({concurrency}), got {connections}"
            );
        }
        if self.stream_call_count == Some(0) {
            bail!("stream-call-count: must be at least 1 when given");
        }
        let items: Vec<&serde_json::Value> = match &self.data {
            serde_json::Value::Array(a) if a.is_empty() => {
                bail!("data: the array is empty; give one GenerateRequest or several")
            }
            serde_json::Value::Array(a) => a.iter().collect(),
            one => vec![one],
        };
        let pool = prost_reflect::DescriptorPool::decode(moemesh_proto::FILE_DESCRIPTOR_SET)
            .context("the compiled-in descriptor set")?;
        let desc = pool
            .get_message_by_name("moemesh.v1.GenerateRequest")
            .context("moemesh.v1.GenerateRequest is in the descriptor set")?;
        let mut requests = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = if items.len() > 1 {
                format!("data[{i}]")
            } else {
                "data".to_string()
            };
            if !item.is_object() {
                bail!("{at}: must be a JSON object (a GenerateRequest)");
            }
            let text = item.to_string();
            if text.contains("{{") {
                bail!(
                    "{at}: ghz call templates ({{{{…}}}}) are not supported by moemesh bench; use literal values"
                );
            }
            let msg = prost_reflect::DynamicMessage::deserialize(
                desc.clone(),
                &mut serde_json::Deserializer::from_str(&text),
            )
            .with_context(|| format!("{at}: not a moemesh.v1.GenerateRequest"))?;
            requests.push(
                msg.transcode_to::<GenerateRequest>()
                    .with_context(|| format!("{at}: not a moemesh.v1.GenerateRequest"))?,
            );
        }
        let mut metadata = Vec::new();
        for (k, v) in &self.metadata {
            let key = k
                .parse()
                .map_err(|_| anyhow::anyhow!("metadata: {k:?} is not a valid ASCII header name"))?;
            let value = v
                .parse()
                .map_err(|_| anyhow::anyhow!("metadata.{k}: the value is not valid ASCII"))?;
            metadata.push((key, value));
        }
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| "moemesh.v1.Generation.Generate".into());
        Ok(Plan {
            name,
            host: o
                .host
                .or(self.host)
                .unwrap_or_else(|| "127.0.0.1:50051".into()),
            requests,
            data: self.data,
            metadata,
            total,
            concurrency,
            connections,
            rps: o.rps.or(self.rps).unwrap_or(0),
            duration: o
                .duration
                .or(self.duration.map(|d| d.0))
                .filter(|d| !d.is_zero()),
            duration_stop,
            max_duration: self.max_duration.map(|d| d.0).filter(|d| !d.is_zero()),
            timeout: Some(self.timeout.map_or(Duration::from_secs(20), |d| d.0))
                .filter(|d| !d.is_zero()),
            connect_timeout: self
                .connect_timeout
                .map_or(Duration::from_secs(10), |d| d.0),
            stream_call_duration: self
                .stream_call_duration
                .map(|d| d.0)
                .filter(|d| !d.is_zero()),
            stream_call_count: self.stream_call_count,
            skip_first: self.skip_first,
            count_errors: self.count_errors,
            tags: self.tags,
            output: o.output.or(self.output),
        })
    }
}

/// The outcome of one call.
#[derive(Debug, Clone)]
pub struct CallResult {
    pub started: SystemTime,
    pub latency: Duration,
    /// gRPC status code and message; `None` is OK.
    pub error: Option<(tonic::Code, String)>,
    /// From the first token-carrying message.
    pub ttft: Option<Duration>,
    /// Gaps between token-carrying messages.
    pub gaps: Vec<Duration>,
    pub completion_tokens: u64,
    pub prompt_tokens: u64,
}

/// Why the run ended, as ghz's `endReason` says it.
#[derive(Debug, Clone, Copy)]
pub enum EndReason {
    /// Every request of `total` was made.
    Normal,
    /// `duration` or `max-duration` ran out.
    Timeout,
    /// Interrupted (Ctrl-C / SIGTERM).
    Cancel,
}

/// Go's name of a gRPC code, as ghz writes it in `statusCodeDistribution`.
pub fn go_code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "Canceled",
        other => moemesh_common::metrics::code_label(other),
    }
}

/// The percentiles ghz reports, picked with ghz's rank rule (the ⌈p·n⌉-th smallest).
const PERCENTILES: [u32; 7] = [10, 25, 50, 75, 90, 95, 99];

fn nth_percentile(sorted: &[Duration], p: u32) -> Duration {
    let rank = (u64::from(p) * sorted.len() as u64).div_ceil(100) as usize;
    sorted[rank.saturating_sub(1).min(sorted.len() - 1)]
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn distribution(sorted: &[Duration]) -> serde_json::Value {
    if sorted.is_empty() {
        return serde_json::Value::Array(Vec::new());
    }
    PERCENTILES
        .iter()
        .map(|&p| serde_json::json!({"percentage": p, "latency": nanos(nth_percentile(sorted, p))}))
        .collect()
}

/// ten equal-width buckets between the fastest and the slowest call, plus the slowest.
fn histogram(sorted: &[Duration]) -> serde_json::Value {
    let (Some(first), Some(last)) = (sorted.first(), sorted.last()) else {
        return serde_json::Value::Array(Vec::new());
    };
    let (lo, hi) = (first.as_secs_f64(), last.as_secs_f64());
    let width = (hi - lo) / 10.0;
    let marks: Vec<f64> = (0..10).map(|i| lo + width * i as f64).chain([hi]).collect();
    let mut counts = vec![0usize; marks.len()];
    for d in sorted {
        let s = d.as_secs_f64();
        let bucket = marks
            .iter()
            .position(|&m| s <= m)
            .unwrap_or(marks.len() - 1);
        counts[bucket] += 1;
    }
    marks
        .iter()
        .zip(&counts)
        .map(|(&mark, &count)| {
            serde_json::json!({"mark": mark, "count": count, "frequency": count as f64 / sorted.len() as f64})
        })
        .collect()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// Latency summary of per-token samples: mean and ghz-style percentiles, in nanoseconds.
fn token_latency(mut samples: Vec<Duration>) -> serde_json::Value {
    samples.sort();
    let average = if samples.is_empty() {
        0
    } else {
        nanos(samples.iter().sum::<Duration>() / samples.len() as u32)
    };
    serde_json::json!({
        "count": samples.len(),
        "average": average,
        "latencyDistribution": distribution(&samples),
    })
}

/// ghz's JSON report of `results` (in completion order) plus `tokenMetrics`. Durations are
/// nanoseconds, as ghz writes them.
pub fn report(
    plan: &Plan,
    results: &[CallResult],
    wall: Duration,
    end: EndReason,
    finished: SystemTime,
) -> serde_json::Value {
    let results = results.get(plan.skip_first as usize..).unwrap_or_default();
    let count = results.len();
    let mut codes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for r in results {
        let code = r.error.as_ref().map_or(tonic::Code::Ok, |(c, _)| *c);
        *codes.entry(go_code_name(code)).or_default() += 1;
        if let Some((c, msg)) = &r.error {
            *errors
                .entry(format!(
                    "rpc error: code = {} desc = {msg}",
                    go_code_name(*c)
                ))
                .or_default() += 1;
        }
    }
    let average = if count == 0 {
        Duration::ZERO
    } else {
        results.iter().map(|r| r.latency).sum::<Duration>() / count as u32
    };
    let mut counted: Vec<Duration> = results
        .iter()
        .filter(|r| r.error.is_none() || plan.count_errors)
        .map(|r| r.latency)
        .collect();
    counted.sort();
    let ok: Vec<&CallResult> = results.iter().filter(|r| r.error.is_none()).collect();
    let completion: u64 = ok.iter().map(|r| r.completion_tokens).sum();
    let prompt: u64 = ok.iter().map(|r| r.prompt_tokens).sum();
    let per_output_token: Vec<Duration> = ok
        .iter()
        .filter_map(|r| {
            let ttft = r.ttft?;
            let n = r.completion_tokens.checked_sub(1).filter(|&n| n > 0)?;
            Some(r.latency.saturating_sub(ttft) / u32::try_from(n).ok()?)
        })
        .collect();
    let wall_s = wall.as_secs_f64().max(f64::MIN_POSITIVE);
    serde_json::json!({
        "name": plan.name,
        "endReason": match end {
            EndReason::Normal => "normal",
            EndReason::Timeout => "timeout",
            EndReason::Cancel => "cancel",
        },
        "date": rfc3339(finished),
        "options": {
            "call": GENERATE_CALLS[0],
            "host": plan.host,
            "insecure": true,
            "rps": plan.rps,
            "concurrency": plan.concurrency,
            "total": plan.total,
            "connections": plan.connections,
            "duration": plan.duration.map_or(0, nanos),
            "timeout": plan.timeout.map_or(0, nanos),
            "dial-timeout": nanos(plan.connect_timeout),
            "data": plan.data,
            "metadata": plan.metadata.iter().map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string())).collect::<BTreeMap<_, _>>(),
            "binary": false,
            "CPUs": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "name": plan.name,
            "skipFirst": plan.skip_first,
            "count-errors": plan.count_errors,
        },
        "count": count,
        "total": nanos(wall),
        "average": nanos(average),
        "fastest": counted.first().copied().map_or(0, nanos),
        "slowest": counted.last().copied().map_or(0, nanos),
        "rps": count as f64 / wall_s,
        "errorDistribution": errors,
        "statusCodeDistribution": codes,
        "latencyDistribution": distribution(&counted),
        "histogram": histogram(&counted),
        "details": results.iter().map(|r| serde_json::json!({
            "timestamp": rfc3339(r.started),
            "latency": nanos(r.latency),
            "error": r.error.as_ref().map(|(c, m)| format!("rpc error: code = {} desc = {m}", go_code_name(*c))).unwrap_or_default(),
            "status": go_code_name(r.error.as_ref().map_or(tonic::Code::Ok, |(c, _)| *c)),
        })).collect::<Vec<_>>(),
        "tags": plan.tags,
        "tokenMetrics": {
            "succeeded": ok.len(),
            "promptTokens": prompt,
            "completionTokens": completion,
            "completionTokensPerSecond": completion as f64 / wall_s,
            "timeToFirstToken": token_latency(ok.iter().filter_map(|r| r.ttft).collect()),
            "interTokenLatency": token_latency(ok.iter().flat_map(|r| r.gaps.iter().copied()).collect()),
            "timePerOutputToken": token_latency(per_output_token),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(json: serde_json::Value) -> anyhow::Result<Plan> {
        let s: Scenario = serde_json::from_value(json)?;
        s.plan(Overrides::default())
    }

    #[test]
    fn go_durations_parse_as_go_does() {
        let ms = Duration::from_millis;
        for (s, d) in [
            ("0", Duration::ZERO),
            ("30s", ms(30_000)),
            ("1m30s", ms(90_000)),
            ("1.5s", ms(1500)),
            ("500ms", ms(500)),
            ("2h", ms(7_200_000)),
            ("250us", Duration::from_micros(250)),
            ("10µs", Duration::from_micros(10)),
        ] {
            assert_eq!(parse_go_duration(s), Ok(d), "{s}");
        }
        for bad in ["", "30", "s", "1x", "-1s", "1 s", ".s"] {
            let err = parse_go_duration(bad).expect_err(bad);
            assert!(err.contains("not a Go duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn scenario_decodes_protobuf_json_and_applies_ghz_defaults() {
        let plan = scenario(serde_json::json!({
            "call": "moemesh.v1.Generation.Generate",
            "insecure": true,
            "data": [
                {"chat": {"messages": [{"role": "user", "content": "Hi"}]},
                 "stopping": {"maxNewTokens": 8, "ignore_eos": true}},
                {"tokens": {"ids": [5, 17]}, "sampling": {"temperature": 0.7, "seed": "42"}},
            ],
        }))
        .expect("valid");
        assert_eq!(
            (plan.total, plan.concurrency, plan.connections),
            (200, 50, 1)
        );
        assert_eq!(plan.timeout, Some(Duration::from_secs(20)));
        assert_eq!(plan.duration_stop, DurationStop::Close);
        assert_eq!(plan.requests.len(), 2);
        let stopping = plan.requests[0].stopping.clone().expect("stopping");
        assert_eq!(
            (stopping.max_new_tokens, stopping.ignore_eos),
            (Some(8), true)
        );
        assert_eq!(
            plan.requests[1].sampling.as_ref().and_then(|s| s.seed),
            Some(42)
        );
    }

    #[test]
    fn every_committed_scenario_plans() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../loadtest/scenarios");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("loadtest/scenarios") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "json") {
                let plan = Scenario::load(&path)
                    .and_then(|s| s.plan(Overrides::default()))
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                assert!(!plan.requests.is_empty(), "{}", path.display());
                // ghz's default timeout (20 s) would count a long generation on a slow machine
                // as DeadlineExceeded instead of measuring it (loadtest/README.md): each file
                // sets its own.
                let raw: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).expect("read"))
                        .expect("json");
                assert!(raw.get("timeout").is_some(), "{}", path.display());
                names.push(plan.name);
            }
        }
        names.sort();
        assert!(names.contains(&"sampled chat".to_string()), "{names:?}");
        assert!(names.len() >= 6, "{names:?}");
    }

    #[test]
    fn scenario_errors_name_the_field() {
        let base = || serde_json::json!({"call": "moemesh.v1.Generation.Generate", "insecure": true, "data": {"prompt": "x"}});
        let err = |mut patch: serde_json::Value| {
            let mut v = base();
            v.as_object_mut()
                .expect("object")
                .append(patch.as_object_mut().expect("object"));
            format!("{:#}", scenario(v).expect_err("invalid"))
        };
        assert!(err(serde_json::json!({"call": "x.Y.Z"})).contains("call:"));
        assert!(err(serde_json::json!({"insecure": false})).contains("insecure:"));
        assert!(err(serde_json::json!({"concurrency": 0})).contains("concurrency:"));
        assert!(err(serde_json::json!({"connections": 60})).contains("connections:"));
        assert!(err(serde_json::json!({"duration-stop": "later"})).contains("duration-stop:"));
        assert!(err(serde_json::json!({"cacert": "ca.pem"})).contains("cacert"));
        assert!(err(serde_json::json!({"timeout": "20"})).contains("not a Go duration"));
        let e = err(serde_json::json!({"data": [{"prompt": "a"}, {"promt": "b"}]}));
        assert!(e.contains("data[1]") && e.contains("promt"), "{e}");
        assert!(
            err(serde_json::json!({"data": {"prompt": "{{.RequestNumber}}"}}))
                .contains("templates")
        );
    }

    #[test]
    fn report_counts_like_ghz() {
        let plan = scenario(serde_json::json!({
            "call": "moemesh.v1.Generation/Generate", "insecure": true, "data": {"prompt": "x"},
        }))
        .expect("valid");
        let at = SystemTime::UNIX_EPOCH;
        let ok = |ms: u64| CallResult {
            started: at,
            latency: Duration::from_millis(ms),
            error: None,
            ttft: Some(Duration::from_millis(ms / 4)),
            gaps: vec![Duration::from_millis(ms / 8); 3],
            completion_tokens: 4,
            prompt_tokens: 10,
        };
        let mut results: Vec<CallResult> = (1..=10).map(|i| ok(i * 100)).collect();
        results.push(CallResult {
            error: Some((tonic::Code::ResourceExhausted, "at capacity".into())),
            ..ok(1)
        });
        let r = report(
            &plan,
            &results,
            Duration::from_secs(2),
            EndReason::Normal,
            at,
        );
        assert_eq!(r["count"], 11);
        assert_eq!(r["statusCodeDistribution"]["OK"], 10);
        assert_eq!(r["statusCodeDistribution"]["ResourceExhausted"], 1);
        assert_eq!(
            r["errorDistribution"]["rpc error: code = ResourceExhausted desc = at capacity"],
            1
        );
        assert_eq!(r["rps"], 5.5);
        // Without count-errors the shed call is left out of the distribution: p50 of
        // 100..=1000 ms is the 5th smallest, p99 the 10th.
        assert_eq!(r["fastest"], 100_000_000);
        assert_eq!(r["latencyDistribution"][2]["latency"], 500_000_000);
        assert_eq!(r["latencyDistribution"][6]["latency"], 1_000_000_000);
        let histogram_total: u64 = r["histogram"]
            .as_array()
            .expect("histogram")
            .iter()
            .map(|b| b["count"].as_u64().expect("count"))
            .sum();
        assert_eq!(histogram_total, 10);
        assert_eq!(r["tokenMetrics"]["completionTokens"], 40);
        assert_eq!(r["tokenMetrics"]["interTokenLatency"]["count"], 30);
        // (latency - ttft) / (tokens - 1) is latency / 4 here; its p50 is the 500 ms call's.
        assert_eq!(
            r["tokenMetrics"]["timePerOutputToken"]["latencyDistribution"][2]["latency"],
            125_000_000
        );
        assert_eq!(r["details"].as_array().map(Vec::len), Some(11));
    }
}
