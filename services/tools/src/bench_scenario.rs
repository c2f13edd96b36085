//! `moemesh bench --scenario FILE`: runs a ghz scenario (see `ghz.rs`) against a frontend's
//! `Generate` the way ghz would (workers, shared connections, rate limit, deadlines, stream
//! limits, duration and its stop rule), and returns ghz's JSON report with per-token metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use moemesh_proto::v1::GenerateRequest;
use moemesh_proto::v1::generation_client::GenerationClient;
use tokio::sync::{mpsc, watch};
use tonic::Status;
use tonic::transport::Channel;

use crate::ghz::{CallResult, DurationStop, EndReason, Plan};

/// Runs `plan` to its end and builds the report.
pub fn run(plan: Plan) -> anyhow::Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let plan = Arc::new(plan);
        let (results, wall, end) = drive(plan.clone()).await?;
        Ok(crate::ghz::report(
            &plan,
            &results,
            wall,
            end,
            SystemTime::now(),
        ))
    })
}

async fn drive(plan: Arc<Plan>) -> anyhow::Result<(Vec<CallResult>, Duration, EndReason)> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", plan.host))
        .with_context(|| format!("host: {:?} is not host:port", plan.host))?
        .connect_timeout(plan.connect_timeout)
        .tcp_nodelay(true);
    let mut channels = Vec::new();
    for _ in 0..plan.connections {
        channels.push(
            endpoint
                .connect()
                .await
                .with_context(|| format!("connecting to {}", plan.host))?,
        );
    }
    let started = Instant::now();
    let deadline = plan
        .duration
        .or(plan.max_duration)
        .map(|d| tokio::time::Instant::from_std(started + d));
    // `stop`: start no more calls; `abort`: give up the calls in flight too.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (abort_tx, abort_rx) = watch::channel(false);
    let (tx, mut rx) = mpsc::unbounded_channel::<CallResult>();
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..plan.concurrency {
        let channel = channels[(w % plan.connections) as usize].clone();
        workers.spawn(worker(
            plan.clone(),
            GenerationClient::new(channel),
            next.clone(),
            started,
            deadline,
            stop_rx.clone(),
            abort_rx.clone(),
            tx.clone(),
        ));
    }
    drop(tx);
    let end = {
        let all_done = async { while workers.join_next().await.is_some() {} };
        let timer = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = all_done => EndReason::Normal,
            _ = timer => EndReason::Timeout,
            _ = moemesh_common::serve::shutdown_signal() => EndReason::Cancel,
        }
    };
    if !matches!(end, EndReason::Normal) {
        let _ = stop_tx.send(true);
        let wait = matches!(end, EndReason::Timeout)
            && plan.duration.is_some()
            && plan.duration_stop == DurationStop::Wait;
        if !wait {
            let _ = abort_tx.send(true);
        }
        while let Some(joined) = workers.join_next().await {
            joined.context("bench worker")?;
        }
    }
    let wall = started.elapsed();
    let mut results = Vec::new();
    while let Some(r) = rx.recv().await {
        results.push(r);
    }
    Ok((results, wall, end))
}

/// One of `concurrency` workers: takes request numbers until the plan is done, paced by `rps`.
#[allow(clippy::too_many_arguments)]
async fn worker(
    plan: Arc<Plan>,
    mut client: GenerationClient<Channel>,
    next: Arc<AtomicU64>,
    started: Instant,
    deadline: Option<tokio::time::Instant>,
    mut stop: watch::Receiver<bool>,
    mut abort: watch::Receiver<bool>,
    results: mpsc::UnboundedSender<CallResult>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let i = next.fetch_add(1, Ordering::SeqCst);
        if plan.duration.is_none() && i >= plan.total {
            return;
        }
        if plan.rps > 0 {
            let at = tokio::time::Instant::from_std(
                started + Duration::from_secs_f64(i as f64 / plan.rps as f64),
            );
            if deadline.is_some_and(|d| at >= d) {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        let req = plan.requests[(i % plan.requests.len() as u64) as usize].clone();
        let t0 = Instant::now();
        let at = SystemTime::now();
        tokio::select! {
            r = call(&mut client, &plan, req) => {
                let _ = results.send(r);
            }
            _ = abort.wait_for(|a| *a) => {
                if plan.duration_stop == DurationStop::Close || plan.duration.is_none() {
                    let _ = results.send(CallResult {
                        started: at,
                        latency: t0.elapsed(),
                        error: Some((tonic::Code::Cancelled, "the run ended with the call in flight".into())),
                        ttft: None,
                        gaps: Vec::new(),
                        completion_tokens: 0,
                        prompt_tokens: 0,
                    });
                }
                return;
            }
        }
    }
}

/// One Generate call, read to its end (or to `stream-call-count` / `stream-call-duration`).
async fn call(
    client: &mut GenerationClient<Channel>,
    plan: &Plan,
    req: GenerateRequest,
) -> CallResult {
    let started = SystemTime::now();
    let t0 = Instant::now();
    let mut r = CallResult {
        started,
        latency: Duration::ZERO,
        error: None,
        ttft: None,
        gaps: Vec::new(),
        completion_tokens: 0,
        prompt_tokens: 0,
    };
    let mut request = tonic::Request::new(req);
    if let Some(t) = plan.timeout {
        request.set_timeout(t);
    }
    for (k, v) in &plan.metadata {
        request.metadata_mut().insert(k.clone(), v.clone());
    }
    let outcome = {
        let r = &mut r;
        let body = async move {
            let mut stream = client.generate(request).await?.into_inner();
            let mut last = t0;
            let mut messages = 0u64;
            while let Some(m) = stream.message().await? {
                messages += 1;
                if !m.token_ids.is_empty() {
                    let now = Instant::now();
                    if r.ttft.is_none() {
                        r.ttft = Some(now - t0);
                    } else {
                        r.gaps.push(now - last);
                    }
                    last = now;
                    r.completion_tokens += m.token_ids.len() as u64;
                }
                if let Some(u) = m.usage {
                    r.prompt_tokens = u64::from(u.prompt_tokens);
                }
                if plan.stream_call_count.is_some_and(|n| messages >= n) {
                    return Err(Status::cancelled("context canceled (stream-call-count)"));
                }
            }
            Ok::<(), Status>(())
        };
        // The deadline is also enforced here: grpc-timeout is the server's to honour, and a
        // stream that outlives it must still end on time. ghz reports its own stream cut-off as
        // Canceled and a deadline as DeadlineExceeded; so does this.
        let limit = match (plan.timeout, plan.stream_call_duration) {
            (Some(t), Some(s)) if s < t => Some((s, true)),
            (Some(t), _) => Some((t, false)),
            (None, Some(s)) => Some((s, true)),
            (None, None) => None,
        };
        match limit {
            None => body.await,
            Some((limit, is_stream_cut)) => match tokio::time::timeout(limit, body).await {
                Ok(outcome) => outcome,
                Err(_) if is_stream_cut => {
                    Err(Status::cancelled("context canceled (stream-call-duration)"))
                }
                Err(_) => Err(Status::deadline_exceeded("context deadline exceeded")),
            },
        }
    };
    r.latency = t0.elapsed();
    if let Err(st) = outcome {
        r.error = Some((st.code(), st.message().to_string()));
    }
    r
}

/// The lines a person reads on stderr; the JSON report is the record.
pub fn summary(report: &serde_json::Value) -> String {
    let ms = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / 1e6;
    let pct = |dist: &serde_json::Value| -> String {
        dist.as_array()
            .map(|a| {
                a.iter()
                    .filter(|e| [50, 90, 99].contains(&e["percentage"].as_u64().unwrap_or(0)))
                    .map(|e| format!("p{} {:.1}", e["percentage"], ms(&e["latency"])))
                    .collect::<Vec<_>>()
                    .join("  ")
            })
            .unwrap_or_default()
    };
    let tm = &report["tokenMetrics"];
    format!(
        "moemesh bench — {} at {}: {} calls in {:.1} s ({:.2} calls/s), end: {}\n\
         status       {}\n\
         latency ms   avg {:.1}  {}\n\
         TTFT ms      {}\n\
         ITL ms       {}\n\
         tokens       {} generated, {:.1}/s\n",
        report["name"].as_str().unwrap_or_default(),
        report["options"]["host"].as_str().unwrap_or_default(),
        report["count"],
        ms(&report["total"]) / 1e3,
        report["rps"].as_f64().unwrap_or(0.0),
        report["endReason"].as_str().unwrap_or_default(),
        report["statusCodeDistribution"],
        ms(&report["average"]),
        pct(&report["latencyDistribution"]),
        pct(&tm["timeToFirstToken"]["latencyDistribution"]),
        pct(&tm["interTokenLatency"]["latencyDistribution"]),
        tm["completionTokens"],
        tm["completionTokensPerSecond"].as_f64().unwrap_or(0.0),
    )
}
