//! The engine's [`Experts`] trait over gRPC: each MoE layer's tokens are grouped per worker and
//! sent to each worker with their (expert, weight) pairs, in one call (a few for a big step);
//! replies are weighted partial sums in f32 that add up to the routed output. A failed call is
//! retried on other replicas of the same experts (expert calls are pure). The engine runs on its
//! own thread; the calls run on the tokio runtime, so the engine computes shared experts while
//! they are in flight.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use moemesh_common::metrics::names;
use moemesh_common::{MeshError, MeshResult, codec, telemetry};
use moemesh_engine::{DType, Device, EngineError, Experts, PendingExperts, Routing, Tensor};
use moemesh_proto::v1::{self, ForwardRequest};
use tokio::runtime::Handle;
use tracing::{Instrument, Span};

use crate::workers::{WorkerClient, WorkerPool};

const MAX_ATTEMPTS: usize = 4;

/// Largest activation payload of one expert call, in bytes (the f32 reply's, the larger of the
/// two directions). A worker's share of a big step is sent as several calls under it, far from
/// the 256 MiB message limit on both ends: one message over that limit would fail the call, and
/// the worker would be taken for a failed one and its replicas tried with the same message.
const MAX_CALL_BYTES: usize = 64 << 20;

/// (token row, expert, weight).
type Pair = (u32, u32, f32);
/// Worker id → its client and the pairs it computes this round.
type Groups = BTreeMap<String, (Arc<WorkerClient>, Vec<Pair>)>;

pub struct RemoteExperts {
    pub pool: Arc<WorkerPool>,
    pub handle: Handle,
    pub wire: v1::DType,
    pub timeout: Duration,
}

impl Experts for RemoteExperts {
    fn dispatch(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
    ) -> moemesh_engine::Result<PendingExperts> {
        // The wire is host memory: activations go down once per layer, the sum comes back up.
        let device = x.device().clone();
        let x = x.to_device(&Device::Cpu)?;
        let mut pairs = Vec::with_capacity(routing.expert_ids.len());
        for t in 0..routing.num_tokens() {
            for (e, w) in routing.token(t) {
                pairs.push((t as u32, e, w));
            }
        }
        let job = execute(
            self.pool.clone(),
            layer as u32,
            x,
            pairs,
            self.wire,
            self.timeout,
            // The step's span (on the engine thread), under which each call's span goes.
            Span::current(),
        );
        let task = self.handle.spawn(job);
        let handle = self.handle.clone();
        Ok(PendingExperts::deferred(move || {
            let out = handle.block_on(task).map_err(|e| {
                EngineError::ExpertsUnavailable(format!("expert dispatch task: {e}"))
            })?;
            let out = out.map_err(|e| match e {
                MeshError::Engine(inner) => inner,
                other => EngineError::ExpertsUnavailable(other.to_string()),
            })?;
            // The f32 sum goes back as it is: the model rounds it once where it adds it (on a
            // GPU it stays f32 into the residual, as the in-process experts' sum does).
            Ok(out.to_device(&device)?)
        }))
    }
}

/// Sends every (token, expert, weight) pair to some worker, retrying failed workers' pairs on
/// other replicas; returns the routed output `[T, hidden]` in f32.
async fn execute(
    pool: Arc<WorkerPool>,
    layer: u32,
    x: Tensor,
    mut pairs: Vec<Pair>,
    wire: v1::DType,
    timeout: Duration,
    step: Span,
) -> MeshResult<Tensor> {
    let (t, h) = x.dims2().map_err(EngineError::from)?;
    let mut out = Tensor::zeros((t, h), DType::F32, &Device::Cpu).map_err(EngineError::from)?;
    // Serials of workers that failed this dispatch.
    let mut excluded: HashSet<u64> = HashSet::new();
    let round = pool.next_round();
    let mut changes = pool.changes();
    // How long pairs with no live replica wait for the registry to show one (a worker
    // restarting, or every lease expiring at once after an etcd outage and coming back).
    let wait_until = tokio::time::Instant::now() + timeout;
    // The load per (layer, expert), counted once per routed pair (not again on retries).
    let layer_label = layer.to_string();
    let mut per_expert: BTreeMap<u32, u64> = BTreeMap::new();
    for &(_, e, _) in &pairs {
        *per_expert.entry(e).or_default() += 1;
    }
    for (e, n) in per_expert {
        metrics::counter!(names::EXPERT_TOKENS, "layer" => layer_label.clone(), "expert" => e.to_string())
            .increment(n);
    }
    let mut attempt = 0;
    while attempt < MAX_ATTEMPTS {
        // Group by worker: worker id -> (client, its pairs).
        let mut groups: Groups = BTreeMap::new();
        let mut unplaced = None;
        // Changes from here on wake the wait below.
        changes.borrow_and_update();
        for &(tok, e, w) in &pairs {
            match pool.pick(layer, e, &excluded, round) {
                Ok(client) => groups
                    .entry(client.member.id.clone())
                    .or_insert_with(|| (client, Vec::new()))
                    .1
                    .push((tok, e, w)),
                Err(err) => {
                    unplaced = Some(err);
                    break;
                }
            }
        }
        if let Some(err) = unplaced {
            match tokio::time::timeout_at(wait_until, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(err),
            }
        }
        let max_rows = (MAX_CALL_BYTES / (h * 4).max(1)).max(1);
        let calls = groups.into_values().flat_map(|(client, group)| {
            split_rows(group, max_rows)
                .into_iter()
                .map(move |chunk| (client.clone(), chunk))
        });
        let calls = calls.map(|(client, group)| {
            let x = &x;
            let step = &step;
            async move {
                let (rows, mut req) = build_request(layer, x, &group, wire)?;
                let span = if step.is_none() {
                    Span::none()
                } else {
                    tracing::debug_span!(
                        parent: step,
                        "expert_dispatch",
                        otel.kind = "client",
                        layer,
                        worker = %client.member.id,
                        tokens = rows.len(),
                        pairs = group.len(),
                        attempt,
                        otel.status_code = tracing::field::Empty,
                    )
                };
                req.traceparent = telemetry::traceparent(&span);
                let sent = std::time::Instant::now();
                let reply = client.call(req, timeout).instrument(span.clone()).await;
                if reply.is_err() {
                    span.record("otel.status_code", "ERROR");
                }
                metrics::histogram!(names::DISPATCH, "worker" => client.member.id.clone())
                    .record(sent.elapsed().as_secs_f64());
                Ok::<_, MeshError>((client, group, rows, reply))
            }
        });
        let mut failed = Vec::new();
        for result in join_all(calls).await {
            let (client, group, rows, reply) = result?;
            match reply.and_then(|r| {
                let o = r
                    .output
                    .ok_or_else(|| MeshError::Internal("reply without output".into()))?;
                codec::decode(&o, "output", &Device::Cpu)
            }) {
                Ok(partial) => {
                    let idx = Tensor::from_vec(
                        rows,
                        partial.dim(0).map_err(EngineError::from)?,
                        &Device::Cpu,
                    )
                    .map_err(EngineError::from)?;
                    // Workers send their f32 accumulators (older ones the request's dtype):
                    // the partial sums add up in f32 and round to the compute dtype once.
                    let partial = partial.to_dtype(DType::F32).map_err(EngineError::from)?;
                    out = out
                        .index_add(&idx, &partial, 0)
                        .map_err(EngineError::from)?;
                }
                Err(e @ MeshError::Internal(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(worker = %client.member.id, layer, attempt, error = %e, "expert call failed; retrying on another replica");
                    metrics::counter!(names::RETRIES, "worker" => client.member.id.clone())
                        .increment(1);
                    client.mark_failed();
                    excluded.insert(client.serial);
                    failed.extend(group);
                }
            }
        }
        if failed.is_empty() {
            return Ok(out);
        }
        pairs = failed;
        attempt += 1;
    }
    Err(MeshError::Unavailable(format!(
        "layer {layer}: expert calls still failing after {MAX_ATTEMPTS} attempts"
    )))
}

/// Splits a worker's pairs into runs of at most `max_rows` distinct tokens, each run one request.
/// Consecutive pairs of one token stay in one run. (After a retry a token's pairs may come in two
/// places; then two requests carry its row, and their partial sums add up the same.)
fn split_rows(group: Vec<Pair>, max_rows: usize) -> Vec<Vec<Pair>> {
    let mut chunks: Vec<Vec<Pair>> = Vec::new();
    let mut rows = 0;
    let mut last = None;
    for pair in group {
        if last != Some(pair.0) {
            if rows == max_rows || chunks.is_empty() {
                chunks.push(Vec::new());
                rows = 0;
            }
            rows += 1;
            last = Some(pair.0);
        }
        if let Some(chunk) = chunks.last_mut() {
            chunk.push(pair);
        }
    }
    chunks
}

/// One worker's request: its distinct tokens (each once) and their pairs. Returns the token rows
/// in request order, for adding the reply back.
fn build_request(
    layer: u32,
    x: &Tensor,
    group: &[(u32, u32, f32)],
    wire: v1::DType,
) -> MeshResult<(Vec<u32>, ForwardRequest)> {
    let mut by_token: BTreeMap<u32, Vec<(u32, f32)>> = BTreeMap::new();
    for &(tok, e, w) in group {
        by_token.entry(tok).or_default().push((e, w));
    }
    let rows: Vec<u32> = by_token.keys().copied().collect();
    let idx =
        Tensor::from_vec(rows.clone(), rows.len(), &Device::Cpu).map_err(EngineError::from)?;
    let hidden = x.index_select(&idx, 0).map_err(EngineError::from)?;
    let mut req = ForwardRequest {
        call_id: 0,
        layer,
        hidden: Some(codec::encode(&hidden, wire)?),
        pairs_per_token: Vec::with_capacity(rows.len()),
        expert_ids: Vec::with_capacity(group.len()),
        weights: Vec::with_capacity(group.len()),
        traceparent: String::new(),
    };
    for pairs in by_token.values() {
        req.pairs_per_token.push(pairs.len() as u32);
        for &(e, w) in pairs {
            req.expert_ids.push(e);
            req.weights.push(w);
        }
    }
    Ok((rows, req))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_rows_keeps_a_tokens_pairs_together_and_every_pair_once() {
        // Tokens 0..5 with 1, 2, 1, 3, 2 pairs.
        let group: Vec<Pair> = [(0, 1), (1, 2), (2, 1), (3, 3), (4, 2)]
            .iter()
            .flat_map(|&(tok, n)| (0..n).map(move |e| (tok, e, 0.5)))
            .collect();
        for max_rows in 1..=6 {
            let chunks = split_rows(group.clone(), max_rows);
            assert_eq!(
                chunks.len(),
                5usize.div_ceil(max_rows),
                "max_rows {max_rows}"
            );
            for c in &chunks {
                let mut toks: Vec<u32> = c.iter().map(|p| p.0).collect();
                toks.dedup();
                assert!(!toks.is_empty() && toks.len() <= max_rows, "{c:?}");
            }
            // Order and content kept, so no token is split across two requests.
            assert_eq!(chunks.concat(), group, "max_rows {max_rows}");
        }
        assert!(split_rows(Vec::new(), 4).is_empty());
    }
}
