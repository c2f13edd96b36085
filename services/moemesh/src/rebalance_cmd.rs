//! `moemesh rebalance`: the expert placement the planner (`moemesh_common::placement`) would
//! choose, layer by layer, from the gates' measured load (`Gate.Info`: tokens routed per (layer,
//! expert) over each gate's recent window, or since it started with `--cumulative`, and what
//! each worker holds in each layer), beside today's. The summary that matters is the *step
//! share*: each MoE layer's busiest worker's share of that layer's tokens, summed over the layers
//! as a share of all routed tokens: every layer waits for its slowest worker, so that is the part
//! of the routed work a step waits for (100% / workers when every layer is even). With `--apply`
//! the plan is carried out live (issue 22), in an order that never leaves a (layer, expert)
//! without a holder: first every worker that gains experts in some layer is sent
//! `Expert.SetExperts` with, for those layers, its old experts plus the new ones, and the gates
//! are polled until they list all of them; then every worker that gives experts up is sent its
//! planned lists for those layers, and the gates are polled again. Each worker's call and each
//! wait is bounded by `--apply-timeout`. `moemesh up --rebalance-every` runs the same cycle
//! periodically ([`cycle`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures::future::join_all;
use moemesh_common::placement::{Balance, Holdings};
use moemesh_common::{codec, placement};
use moemesh_proto::v1::expert_client::ExpertClient;
use moemesh_proto::v1::gate_client::GateClient;
use moemesh_proto::v1::{
    ExpertInfoRequest, GateInfoRequest, GateInfoResponse, SetExpertsRequest, WorkerExperts,
};
use moemesh_tools::client_args::ClientArgs;

#[derive(Args, Debug, Clone)]
pub struct RebalanceArgs {
    /// Address of the gate whose load to plan from (`host:port`); several, comma-separated, add
    /// up their loads (and `--apply` waits for every one to see the new placement).
    #[arg(
        long,
        env = "MOEMESH_GATE_ADDR",
        default_value = "127.0.0.1:50060",
        value_delimiter = ','
    )]
    pub addr: Vec<String>,
    /// Show the plan (always done; kept for scripts that pass it).
    #[arg(long, default_value_t = true)]
    pub plan: bool,
    /// After showing the plan, carry it out live: the workers load their new experts (per layer)
    /// while they serve (`Expert.SetExperts`), the gates switch between steps, then the workers
    /// drop the experts they gave up. Needs a mesh on etcd.
    #[arg(long)]
    pub apply: bool,
    /// Experts each worker may hold in each layer beyond an even share of that layer's experts
    /// (the experts over the workers serving the layer, rounded up): room for replicas. The room
    /// does not depend on what a worker holds now, so applying plans again and again does not
    /// make workers grow.
    #[arg(long, default_value_t = 2)]
    pub spare: usize,
    /// Most copies of one expert in one layer.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_copies: u32,
    /// Memory each worker keeps free beyond the experts a plan has it load, in MiB. A worker's
    /// room is also bounded by its memory (`Expert.Info`: free bytes and bytes per held (layer,
    /// expert)): the plan gives it at most as many experts as it holds now plus what fits in
    /// its free memory less this reserve, and `--apply` refuses a plan that has a worker load
    /// more than that (it loads the new experts before it drops the old).
    #[arg(long, default_value_t = 2048)]
    pub memory_reserve_mb: u64,
    /// Plan from the tokens routed since the gate started instead of over its recent window
    /// (`moemesh gate --load-window-secs`).
    #[arg(long)]
    pub cumulative: bool,
    /// With --apply: apply only when the plan lowers the step share (each layer's busiest
    /// worker's share, summed over the layers: what a step waits for) by at least this many
    /// percentage points (moving experts costs loading them).
    #[arg(long, default_value_t = 2.0)]
    pub min_gain: f64,
    /// With --apply: how long the workers keep computing the experts they give up after
    /// announcing their new lists, in milliseconds (gates a moment behind are served, not
    /// refused), at most 60000.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=60_000))]
    pub release_grace_ms: u32,
    /// With --apply: most seconds for one worker's SetExperts (loading its experts), and for the
    /// gates to list a phase's new placement.
    #[arg(long, default_value_t = 300)]
    pub apply_timeout: u64,
    /// Print the plan as one JSON object instead of a table (with --apply, a second object with
    /// what was applied).
    #[arg(long)]
    pub json: bool,
    /// Give up after this many seconds (connecting included) when asking a gate for its load.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// What a worker says of its memory (`Expert.Info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerMemory {
    /// Bytes free on its device now.
    pub free: u64,
    /// Bytes one held (layer, expert) takes there.
    pub bytes_per_pair: u64,
}

impl WorkerMemory {
    /// (layer, expert) pairs it can load on top of what it holds, keeping `reserve` bytes free.
    pub fn loadable(&self, reserve: u64) -> u64 {
        self.free.saturating_sub(reserve) / self.bytes_per_pair.max(1)
    }
}

/// A plan beside today's placement.
pub struct Planned {
    /// The gates' answers (the first one's worker list is the one planned for).
    pub infos: Vec<GateInfoResponse>,
    /// What the load covers ("in the last 60s").
    pub basis: String,
    /// Per MoE layer with tokens routed, the tokens routed to each expert, summed over the gates.
    pub load: BTreeMap<u32, Vec<u64>>,
    /// Per worker (the first gate's order): what it holds now, and planned (layers without load
    /// keep what they hold).
    pub today: Vec<Holdings>,
    pub planned: Vec<Holdings>,
    /// How today's placement and the plan spread the load.
    pub before: Balance,
    pub after: Balance,
    /// (layer, expert, copies) of the (layer, expert)s with more than one copy planned.
    pub copies: Vec<(u32, u32, u32)>,
    /// Per worker, its memory as it reported it (`None`: unknown, no bound from memory).
    pub memory: Vec<Option<WorkerMemory>>,
    /// `--memory-reserve-mb` in bytes.
    pub reserve: u64,
}

impl Planned {
    pub fn total(&self) -> u64 {
        self.before.routed
    }

    /// Share (percent) of the routed tokens that `tokens` is.
    pub fn pct(&self, tokens: f64) -> f64 {
        match self.total() {
            0 => 0.0,
            t => tokens / t as f64 * 100.0,
        }
    }

    /// The step share (each layer's busiest worker's share, summed over the layers; see the
    /// module doc) now and planned, in percent: what `--min-gain` compares.
    pub fn busiest(&self) -> (f64, f64) {
        (self.before.step_share(), self.after.step_share())
    }

    /// Whether anything would move.
    pub fn changes(&self) -> bool {
        self.today.iter().zip(&self.planned).any(|(a, b)| a != b)
    }

    /// (layer, expert) pairs worker `w` stacks anew at most in one phase of the move: a worker
    /// rebuilds each layer that changes (first to the union of its old and new experts, then to
    /// the new ones) while the previous stacks still serve.
    pub fn restacked_pairs(&self, w: usize) -> u64 {
        let (today, planned) = (&self.today[w], &self.planned[w]);
        let changed = |l: &u32| today.get(l) != planned.get(l);
        let union: u64 = planned
            .iter()
            .filter(|(l, _)| changed(l))
            .map(|(l, list)| {
                let old = today.get(l).map(Vec::as_slice).unwrap_or(&[]);
                (old.len() + list.iter().filter(|e| !old.contains(e)).count()) as u64
            })
            .sum();
        let target: u64 = planned
            .iter()
            .filter(|(l, _)| changed(l))
            .map(|(_, list)| list.len() as u64)
            .sum();
        union.max(target)
    }

    /// Workers whose restacking (see [`restacked_pairs`](Self::restacked_pairs)) needs more
    /// than their free memory less the reserve: (worker index, bytes needed, bytes free).
    pub fn over_memory(&self) -> Vec<(usize, u64, u64)> {
        self.memory
            .iter()
            .enumerate()
            .filter_map(|(w, m)| {
                let m = m.as_ref()?;
                let pairs = self.restacked_pairs(w);
                (pairs > m.loadable(self.reserve)).then_some((w, pairs * m.bytes_per_pair, m.free))
            })
            .collect()
    }
}

/// What a gate says worker `w` holds: its per-layer list, or (an older gate) its experts in
/// every one of `layers`.
fn holdings_of(w: &WorkerExperts, layers: &[u32]) -> Holdings {
    if w.layers.is_empty() {
        placement::uniform(layers, &w.experts)
    } else {
        w.layers
            .iter()
            .map(|l| (l.layer, l.experts.clone()))
            .collect()
    }
}

async fn gate_info(
    client: &ClientArgs,
    addr: &str,
    limit: Duration,
) -> anyhow::Result<GateInfoResponse> {
    tokio::time::timeout(limit, async {
        let channel = client.channel(addr).await?;
        let reply = GateClient::new(channel)
            .info(GateInfoRequest {})
            .await
            .with_context(|| format!("moemesh.v1.Gate/Info on {addr}"))?;
        anyhow::Ok(reply.into_inner())
    })
    .await
    .with_context(|| format!("no answer from {addr} within {}s", limit.as_secs()))?
}

/// Asks every gate for its load and workers and plans.
pub async fn plan(args: &RebalanceArgs) -> anyhow::Result<Planned> {
    if args.addr.is_empty() {
        bail!("--addr: no gate given");
    }
    let limit = Duration::from_secs(args.timeout);
    let mut infos = Vec::new();
    for addr in &args.addr {
        infos.push(gate_info(&args.client, addr, limit).await?);
    }
    let memory = match infos.first() {
        Some(first) => {
            join_all(
                first
                    .worker_experts
                    .iter()
                    .map(|w| worker_memory(&args.client, &w.address, limit)),
            )
            .await
        }
        None => Vec::new(),
    };
    plan_from(args, infos, memory)
}

/// A worker's memory from its `Expert.Info`; `None` when it does not answer in time or does
/// not say (an older worker, or no address).
async fn worker_memory(client: &ClientArgs, addr: &str, limit: Duration) -> Option<WorkerMemory> {
    if addr.is_empty() {
        return None;
    }
    let info = tokio::time::timeout(limit, async {
        let channel = client.channel(addr).await.ok()?;
        ExpertClient::new(channel)
            .info(ExpertInfoRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    })
    .await
    .ok()??;
    (info.memory_free_bytes > 0 && info.bytes_per_pair > 0).then_some(WorkerMemory {
        free: info.memory_free_bytes,
        bytes_per_pair: info.bytes_per_pair,
    })
}

/// The plan for the gates' answers `infos` and the workers' `memory` (in the first gate's worker
/// order; missing or `None`: unknown) (pure: what [`plan`] does once it has them).
fn plan_from(
    args: &RebalanceArgs,
    infos: Vec<GateInfoResponse>,
    memory: Vec<Option<WorkerMemory>>,
) -> anyhow::Result<Planned> {
    let Some(first) = infos.first() else {
        bail!("--addr: no gate given");
    };
    if first.worker_experts.is_empty() {
        bail!("gate {} lists no expert workers", args.addr.join(","));
    }
    let basis = if args.cumulative {
        "since the gate started".to_string()
    } else {
        format!("in the last {}s", first.load_window_secs)
    };
    // Load per (layer, expert), summed over the gates.
    let mut load: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for info in &infos {
        let layers = if args.cumulative {
            &info.expert_load
        } else {
            &info.expert_load_window
        };
        for l in layers {
            let tokens = load.entry(l.layer).or_default();
            if tokens.len() < l.tokens.len() {
                tokens.resize(l.tokens.len(), 0);
            }
            for (e, &t) in l.tokens.iter().enumerate() {
                tokens[e] += t;
            }
        }
    }
    let load_layers: Vec<u32> = load.keys().copied().collect();
    let today: Vec<Holdings> = first
        .worker_experts
        .iter()
        .map(|w| holdings_of(w, &load_layers))
        .collect();
    // Per layer with load, the experts some worker holds there now (the planner places exactly
    // those) and each worker's room there: an even share of them over the workers serving the
    // layer, plus --spare; none where a worker does not serve the layer. Layers without load
    // are not planned: they keep what they hold.
    let mut layer_ids: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut shares: BTreeMap<u32, usize> = BTreeMap::new();
    let mut room: Vec<BTreeMap<u32, usize>> = vec![BTreeMap::new(); today.len()];
    let mut sub_load: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (&l, tokens) in &load {
        let held: BTreeSet<u32> = today
            .iter()
            .filter_map(|h| h.get(&l))
            .flatten()
            .copied()
            .collect();
        if held.is_empty() {
            continue;
        }
        let ids: Vec<u32> = held.into_iter().collect();
        let servers = today.iter().filter(|h| h.contains_key(&l)).count();
        let share = ids.len().div_ceil(servers);
        shares.insert(l, share);
        for (w, h) in today.iter().enumerate() {
            if h.contains_key(&l) {
                room[w].insert(l, share + args.spare);
            }
        }
        sub_load.insert(
            l,
            ids.iter()
                .map(|&e| tokens.get(e as usize).copied().unwrap_or(0))
                .collect(),
        );
        layer_ids.insert(l, ids);
    }
    if sub_load.is_empty() {
        bail!("no tokens routed {basis} in any layer the workers hold: nothing to plan from");
    }
    // A worker's room, summed over the planned layers, at most what it holds there now plus
    // what its free memory takes: the spare room trimmed a slot a layer at a time, never below
    // the even share.
    let mut memory = memory;
    memory.resize(today.len(), None);
    let reserve = args.memory_reserve_mb << 20;
    for (w, m) in memory.iter().enumerate() {
        let Some(m) = m else { continue };
        let held: u64 = room[w]
            .keys()
            .map(|l| today[w].get(l).map_or(0, |e| e.len() as u64))
            .sum();
        let budget = held + m.loadable(reserve);
        let mut total: u64 = room[w].values().map(|&r| r as u64).sum();
        while total > budget {
            let mut trimmed = false;
            for (l, r) in room[w].iter_mut() {
                if total > budget && *r > shares.get(l).copied().unwrap_or(0) {
                    *r -= 1;
                    total -= 1;
                    trimmed = true;
                }
            }
            if !trimmed {
                break;
            }
        }
    }
    // Today's holdings numbered as the planner sees each layer's experts (positions in
    // `layer_ids`), so that it keeps experts where they are when that costs nothing.
    let today_idx: Vec<Holdings> = today
        .iter()
        .map(|h| {
            layer_ids
                .iter()
                .map(|(l, ids)| {
                    let held = h.get(l).map(Vec::as_slice).unwrap_or(&[]);
                    let idx = held
                        .iter()
                        .filter_map(|e| ids.binary_search(e).ok().map(|i| i as u32))
                        .collect();
                    (*l, idx)
                })
                .collect()
        })
        .collect();
    let plan = placement::plan(&sub_load, &room, args.max_copies as usize, &today_idx)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut planned = today.clone();
    let mut copies = Vec::new();
    for (&l, lp) in &plan.layers {
        let ids = &layer_ids[&l];
        for (w, h) in lp.holds.iter().enumerate() {
            if room[w].contains_key(&l) {
                planned[w].insert(l, h.iter().map(|&i| ids[i as usize]).collect());
            }
        }
        copies.extend(
            ids.iter()
                .zip(&lp.copies)
                .filter(|(_, c)| **c > 1)
                .map(|(&e, &c)| (l, e, c)),
        );
    }
    let (before, after) = (
        placement::balance(&load, &today),
        placement::balance(&load, &planned),
    );
    Ok(Planned {
        infos,
        basis,
        load,
        today,
        planned,
        before,
        after,
        copies,
        memory,
        reserve,
    })
}

/// Holdings as JSON: `{"<layer>": [experts]}`.
fn holdings_json(h: &Holdings) -> serde_json::Value {
    serde_json::Value::Object(
        h.iter()
            .map(|(l, e)| (l.to_string(), serde_json::json!(e)))
            .collect(),
    )
}

/// Holdings as text: `L1: 0-3,7; L2: 1,4` (only the layers of `h`).
fn holdings_text(h: &Holdings) -> String {
    h.iter()
        .map(|(l, e)| format!("L{l}: {}", experts_flag(e)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Per layer, the busiest worker's share of that layer's tokens, in percent.
fn layer_shares(b: &Balance) -> BTreeMap<u32, f64> {
    b.per_layer
        .iter()
        .map(|(&l, v)| {
            let total: f64 = v.iter().sum();
            let max = v.iter().copied().fold(0.0, f64::max);
            (
                l,
                if total > 0.0 {
                    max / total * 100.0
                } else {
                    0.0
                },
            )
        })
        .collect()
}

/// How many (layer, expert) pairs `to` holds that `from` lacks.
fn pairs_added(from: &Holdings, to: &Holdings) -> usize {
    to.iter()
        .map(|(l, list)| {
            let old = from.get(l).map(Vec::as_slice).unwrap_or(&[]);
            list.iter().filter(|e| !old.contains(e)).count()
        })
        .sum()
}

/// Prints the plan (a table, or one JSON object).
fn show(args: &RebalanceArgs, p: &Planned) {
    let gates = args.addr.join(",");
    let workers = &p.infos[0].worker_experts;
    let (now, planned) = p.busiest();
    let (shares_now, shares_planned) = (layer_shares(&p.before), layer_shares(&p.after));
    let worst = |b: &Balance| {
        b.worst_layer()
            .map(|(l, s)| serde_json::json!({"layer": l, "share": s}))
    };
    if args.json {
        let workers: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                serde_json::json!({
                    "id": w.id,
                    "tokens_now": p.before.per_worker[i],
                    "tokens_planned": p.after.per_worker[i],
                    "share_now": p.pct(p.before.per_worker[i]),
                    "share_planned": p.pct(p.after.per_worker[i]),
                    "layers_now": holdings_json(&p.today[i]),
                    "layers_planned": holdings_json(&p.planned[i]),
                    "experts_planned": placement::common_experts(&p.planned[i]),
                    "pairs_loaded": pairs_added(&p.today[i], &p.planned[i]),
                    "pairs_dropped": pairs_added(&p.planned[i], &p.today[i]),
                    "memory_free_bytes": p.memory.get(i).copied().flatten().map(|m| m.free),
                    "bytes_per_pair": p.memory.get(i).copied().flatten().map(|m| m.bytes_per_pair),
                })
            })
            .collect();
        let layers: Vec<_> = shares_now
            .iter()
            .map(|(l, s)| {
                serde_json::json!({
                    "layer": l,
                    "busiest_share_now": s,
                    "busiest_share_planned": shares_planned.get(l),
                    "copies": p.copies.iter().filter(|c| c.0 == *l)
                        .map(|&(_, e, c)| serde_json::json!({"expert": e, "copies": c}))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "gate": gates,
                "load": p.basis,
                "routed_tokens": p.total(),
                "step_tokens_now": p.before.step_load(),
                "step_tokens_planned": p.after.step_load(),
                "step_share_now": now,
                "step_share_planned": planned,
                "even_share": 100.0 / workers.len().max(1) as f64,
                "worst_layer_now": worst(&p.before),
                "worst_layer_planned": worst(&p.after),
                "busiest_overall_now": p.before.busiest_overall(),
                "busiest_overall_planned": p.after.busiest_overall(),
                "layers": layers,
                "workers": workers,
            })
        );
        return;
    }
    println!(
        "gate {gates}: {} routed tokens {} over {} MoE layers and {} workers",
        p.total(),
        p.basis,
        p.load.len(),
        p.today.len()
    );
    println!("| layer | busiest worker now | planned | replicated (expert×copies) |");
    println!("| ---: | ---: | ---: | --- |");
    for (l, s) in &shares_now {
        let copies: Vec<String> = p
            .copies
            .iter()
            .filter(|c| c.0 == *l)
            .map(|&(_, e, c)| format!("{e}×{c}"))
            .collect();
        println!(
            "| {l} | {s:.1}% | {:.1}% | {} |",
            shares_planned.get(l).copied().unwrap_or(0.0),
            copies.join(" ")
        );
    }
    println!(
        "| worker | share now | share planned | pairs loaded | pairs dropped | GB restacked / free |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (i, w) in workers.iter().enumerate() {
        let loaded = pairs_added(&p.today[i], &p.planned[i]);
        let memory = match p.memory.get(i).copied().flatten() {
            Some(m) => format!(
                "{:.2} / {:.1}",
                (p.restacked_pairs(i) * m.bytes_per_pair) as f64 / 1e9,
                m.free as f64 / 1e9
            ),
            None => "unknown".into(),
        };
        println!(
            "| {} | {:.1}% | {:.1}% | {} | {} | {memory} |",
            w.id,
            p.pct(p.before.per_worker[i]),
            p.pct(p.after.per_worker[i]),
            loaded,
            pairs_added(&p.planned[i], &p.today[i]),
        );
    }
    let worst_text = |b: &Balance| match b.worst_layer() {
        Some((l, s)) => format!("layer {l} at {s:.1}%"),
        None => "none".into(),
    };
    println!(
        "step share (each layer's busiest worker, summed over the layers; even is {:.1}%): \
         {now:.1}% now, {planned:.1}% planned; worst layer: {} now, {} planned",
        100.0 / p.today.len().max(1) as f64,
        worst_text(&p.before),
        worst_text(&p.after)
    );
}

pub fn run(args: RebalanceArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let planned = plan(&args).await?;
        show(&args, &planned);
        if !args.apply {
            return Ok(());
        }
        let report = apply(&args, &planned).await?;
        if args.json {
            println!("{}", report.json());
        } else {
            println!("{}", report.line());
        }
        Ok(())
    })
}

/// What [`apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Why nothing was done, when nothing was.
    pub skipped: Option<String>,
    /// Per worker changed: id, experts loaded and dropped per layer, milliseconds loading.
    pub workers: Vec<(String, Holdings, Holdings, u64)>,
    /// Seconds the whole move took.
    pub secs: f64,
}

impl Applied {
    pub fn line(&self) -> String {
        if let Some(why) = &self.skipped {
            return format!("not applied: {why}");
        }
        let parts: Vec<String> = self
            .workers
            .iter()
            .map(|(id, l, d, ms)| {
                format!(
                    "{id}: +[{}] -[{}] ({ms} ms loading)",
                    holdings_text(l),
                    holdings_text(d)
                )
            })
            .collect();
        format!("applied in {:.1}s: {}", self.secs, parts.join("; "))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "applied": self.skipped.is_none(),
            "skipped": self.skipped,
            "secs": self.secs,
            "workers": self.workers.iter().map(|(id, l, d, ms)| serde_json::json!({
                "id": id, "loaded": holdings_json(l), "dropped": holdings_json(d), "load_ms": ms,
            })).collect::<Vec<_>>(),
        })
    }
}

/// One worker's target in a phase: the layers that change, each with its whole new list.
struct Move {
    id: String,
    address: String,
    layers: Holdings,
    grace_ms: u32,
}

/// What [`set_all`] got back from one worker: its id, the experts loaded and dropped per
/// layer, and milliseconds spent loading.
type SetReply = (String, Holdings, Holdings, u64);

/// Sends `SetExperts` to the workers of `moves` one after another, each bounded by `limit`;
/// stops at the first that fails. Returns the replies of the workers that answered, and the
/// first failure.
async fn set_all(
    client: &ClientArgs,
    moves: &[Move],
    limit: Duration,
) -> (Vec<SetReply>, Option<anyhow::Error>) {
    let calls = moves.iter().map(|m| async move {
        let call = async {
            let channel = client.channel(&m.address).await?;
            let reply = ExpertClient::new(channel)
                .set_experts(SetExpertsRequest {
                    layer_experts: codec::holdings_to_wire(&m.layers),
                    release_grace_ms: m.grace_ms,
                    ..Default::default()
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?;
            anyhow::Ok(reply.into_inner())
        };
        let r = tokio::time::timeout(limit, call)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {}s", limit.as_secs()))
            .and_then(|r| r)
            .with_context(|| {
                format!(
                    "moemesh.v1.Expert/SetExperts [{}] on worker {} ({})",
                    holdings_text(&m.layers),
                    m.id,
                    m.address
                )
            })?;
        let per_layer = |v: &[moemesh_proto::v1::LayerExperts]| -> Holdings {
            v.iter().map(|l| (l.layer, l.experts.clone())).collect()
        };
        anyhow::Ok((
            m.id.clone(),
            per_layer(&r.layer_loaded),
            per_layer(&r.layer_dropped),
            r.load_ms,
        ))
    });
    // One worker at a time: a worker restacks the layers it changes beside what it holds, and
    // workers sharing a GPU would each count the same free memory; each checks the room it
    // needs against what the ones before it left (and refuses, changing nothing, when short).
    let mut done = Vec::with_capacity(moves.len());
    for call in calls {
        match call.await {
            Ok(reply) => done.push(reply),
            Err(e) => return (done, Some(e)),
        }
    }
    (done, None)
}

/// Polls every gate until it lists each worker of `want` (id → holdings) with exactly those
/// holdings, for at most `limit`.
async fn wait_listed(
    args: &RebalanceArgs,
    want: &BTreeMap<String, Holdings>,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let per_call = Duration::from_secs(args.timeout);
    for addr in &args.addr {
        loop {
            let info = gate_info(&args.client, addr, per_call).await?;
            let listed: BTreeMap<&str, Holdings> = info
                .worker_experts
                .iter()
                .map(|w| (w.id.as_str(), holdings_of(w, &[])))
                .collect();
            let behind: Vec<&String> = want
                .iter()
                .filter(|(id, h)| listed.get(id.as_str()) != Some(h))
                .map(|(id, _)| id)
                .collect();
            if behind.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "gate {addr} does not list the new experts of {behind:?} after {}s",
                    limit.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Per layer of `to` that differs from `from`, `to`'s list.
fn changed_layers(from: &Holdings, to: &Holdings) -> Holdings {
    to.iter()
        .filter(|(l, list)| from.get(l) != Some(list))
        .map(|(&l, list)| (l, list.clone()))
        .collect()
}

/// Carries out `p` live: adds (every worker, in each layer, its old experts plus its new ones),
/// waits for the gates to list them, then removes (every worker its planned experts in the layers
/// that change), and waits again. Never leaves a (layer, expert) without a holder: after the
/// first phase each worker holds, in each layer, a superset of both placements, and the planner
/// holds every expert of every layer somewhere.
pub async fn apply(args: &RebalanceArgs, p: &Planned) -> anyhow::Result<Applied> {
    let started = Instant::now();
    for (addr, info) in args.addr.iter().zip(&p.infos) {
        if info.registry != "etcd" {
            bail!(
                "gate {addr} finds its expert workers through {} registry: placement can change \
                 live only on etcd (start the mesh with --etcd)",
                if info.registry.is_empty() {
                    "an unknown".to_string()
                } else {
                    format!("a {}", info.registry)
                }
            );
        }
    }
    if p.total() == 0 {
        return Ok(Applied {
            skipped: Some(format!("no tokens routed {}", p.basis)),
            ..Applied::default()
        });
    }
    if !p.changes() {
        return Ok(Applied {
            skipped: Some("the plan is today's placement".into()),
            ..Applied::default()
        });
    }
    let (now, planned) = p.busiest();
    if now - planned < args.min_gain {
        return Ok(Applied {
            skipped: Some(format!(
                "the step share (each layer's busiest worker, summed over the layers) would go \
                 from {now:.1}% to {planned:.1}%, less than --min-gain {} points",
                args.min_gain
            )),
            ..Applied::default()
        });
    }
    let workers = &p.infos[0].worker_experts;
    if let Some(&(w, bytes, free)) = p.over_memory().first() {
        bail!(
            "worker {} would restack {:.2} GB of experts (the layers it changes, built beside what \
             it holds) with {:.2} GB free and --memory-reserve-mb {} kept: lower --spare or \
             --max-copies, or free memory on it (nothing was changed)",
            workers.get(w).map_or("?", |x| x.id.as_str()),
            bytes as f64 / 1e9,
            free as f64 / 1e9,
            args.memory_reserve_mb
        );
    }
    let limit = Duration::from_secs(args.apply_timeout);
    // Phase 1: add.
    let mut adds = Vec::new();
    let mut after_add = BTreeMap::new();
    for (i, w) in workers.iter().enumerate() {
        let mut union = p.today[i].clone();
        for (&l, list) in &p.planned[i] {
            let entry = union.entry(l).or_default();
            let both: BTreeSet<u32> = entry.iter().chain(list).copied().collect();
            *entry = both.into_iter().collect();
        }
        if union != p.today[i] {
            adds.push(Move {
                id: w.id.clone(),
                address: w.address.clone(),
                layers: changed_layers(&p.today[i], &union),
                grace_ms: 0,
            });
            after_add.insert(w.id.clone(), union);
        }
    }
    if adds.iter().any(|m| m.address.is_empty()) {
        bail!("a gate did not report its workers' addresses (an older gate?): cannot apply");
    }
    if p.infos
        .iter()
        .flat_map(|i| &i.worker_experts)
        .any(|w| w.layers.is_empty())
    {
        bail!(
            "a gate did not report its workers' experts per layer (an older gate?): cannot apply"
        );
    }
    let mut done: BTreeMap<String, (Holdings, Holdings, u64)> = BTreeMap::new();
    let (added, failed) = set_all(&args.client, &adds, limit).await;
    if let Some(e) = failed {
        // The workers before the one that failed hold extra copies, which would skew the load
        // towards them: they go back to today's placement.
        let undo: Vec<Move> = added
            .iter()
            .filter_map(|(id, ..)| {
                let i = workers.iter().position(|w| &w.id == id)?;
                let union = after_add.get(id)?;
                Some(Move {
                    id: id.clone(),
                    address: workers[i].address.clone(),
                    layers: changed_layers(union, &p.today[i]),
                    grace_ms: args.release_grace_ms,
                })
            })
            .collect();
        let restored = match set_all(&args.client, &undo, limit).await {
            (_, None) if undo.is_empty() => "no worker had added any".to_string(),
            (_, None) => format!(
                "the {} worker(s) that had added experts were put back as they were",
                undo.len()
            ),
            (_, Some(u)) => format!(
                "putting back the workers that had added experts failed too ({u:#}): they hold                  extra copies"
            ),
        };
        return Err(e.context(format!("adding experts (nothing was removed; {restored})")));
    }
    for (id, loaded, _, ms) in added {
        done.insert(id, (loaded, Holdings::new(), ms));
    }
    wait_listed(args, &after_add, limit)
        .await
        .context("waiting for the gates to list the added experts (nothing was removed)")?;
    // Phase 2: remove.
    let mut removes = Vec::new();
    let mut after_remove = BTreeMap::new();
    for (i, w) in workers.iter().enumerate() {
        let current = after_add.get(&w.id).unwrap_or(&p.today[i]);
        if *current != p.planned[i] {
            removes.push(Move {
                id: w.id.clone(),
                address: w.address.clone(),
                layers: changed_layers(current, &p.planned[i]),
                grace_ms: args.release_grace_ms,
            });
        }
        after_remove.insert(w.id.clone(), p.planned[i].clone());
    }
    let (removed, failed) = set_all(&args.client, &removes, limit).await;
    if let Some(e) = failed {
        return Err(e.context("removing experts (every expert is still held at least once)"));
    }
    for (id, _, dropped, _) in removed {
        done.entry(id).or_default().1 = dropped;
    }
    wait_listed(args, &after_remove, limit)
        .await
        .context("waiting for the gates to list the final placement")?;
    Ok(Applied {
        skipped: None,
        workers: done
            .into_iter()
            .map(|(id, (l, d, ms))| (id, l, d, ms))
            .collect(),
        secs: started.elapsed().as_secs_f64(),
    })
}

/// One periodic rebalance (`moemesh up --rebalance-every`): plan, then apply if it pays.
pub async fn cycle(args: &RebalanceArgs) -> anyhow::Result<(Planned, Applied)> {
    let planned = plan(args).await?;
    let applied = apply(args, &planned).await?;
    Ok((planned, applied))
}

/// `--experts` for a list of experts: ranges where they run on (`0-3,7,9-10`).
fn experts_flag(experts: &[u32]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < experts.len() {
        let mut j = i;
        while j + 1 < experts.len() && experts[j + 1] == experts[j] + 1 {
            j += 1;
        }
        parts.push(if j > i {
            format!("{}-{}", experts[i], experts[j])
        } else {
            experts[i].to_string()
        });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> RebalanceArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: RebalanceArgs,
        }
        let argv = std::iter::once("rebalance").chain(extra.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv)
            .expect("args")
            .args
    }

    fn worker(id: &str, layers: &[(u32, Vec<u32>)]) -> WorkerExperts {
        WorkerExperts {
            id: id.into(),
            address: format!("{id}:1"),
            layers: layers
                .iter()
                .map(|(l, e)| moemesh_proto::v1::WorkerLayer {
                    layer: *l,
                    experts: e.clone(),
                    routed_pairs: 0,
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Two workers, a holding experts 0-3 and b 4-7 in each of `layers` (on etcd); load in layers
    /// 1 and 2 only, layer 1's hot experts on a, layer 2's on b.
    fn hot_per_layer(layers: &[u32]) -> GateInfoResponse {
        let half = |from: u32| (from..from + 4).collect::<Vec<u32>>();
        let held = |from: u32| layers.iter().map(|&l| (l, half(from))).collect::<Vec<_>>();
        GateInfoResponse {
            worker_experts: vec![worker("a", &held(0)), worker("b", &held(4))],
            expert_load_window: vec![
                moemesh_proto::v1::LayerLoad {
                    layer: 1,
                    tokens: vec![100, 50, 30, 20, 1, 1, 1, 1],
                },
                moemesh_proto::v1::LayerLoad {
                    layer: 2,
                    tokens: vec![1, 1, 1, 1, 100, 50, 30, 20],
                },
            ],
            load_window_secs: 60,
            registry: "etcd".into(),
            ..Default::default()
        }
    }

    /// Each layer's hot experts sit on one worker (layer 1's on a, layer 2's on b): summed per
    /// worker the load is even, each layer is not. The plan evens each layer, changes only the
    /// layers with load, and the summary says so.
    #[test]
    fn the_plan_is_made_per_layer_and_layers_without_load_keep_their_experts() {
        let half = |from: u32| (from..from + 4).collect::<Vec<u32>>();
        let info = hot_per_layer(&[1, 2, 3]);
        let p = plan_from(&args(&["--spare", "1"]), vec![info.clone()], Vec::new()).expect("plan");
        // Even summed per worker, but every layer waits for one worker with ~97% of its tokens.
        assert!((p.before.busiest_overall() - 50.0).abs() < 0.5);
        let (now, planned) = p.busiest();
        assert!(now > 95.0, "{now}");
        assert!(planned < 60.0, "{planned}");
        // Layer 3 had no load: unchanged.
        assert_eq!(p.planned[0][&3], half(0));
        assert_eq!(p.planned[1][&3], half(4));
        // Layers 1 and 2 changed, each its own way; the hottest expert of each is replicated
        // in its layer.
        assert_ne!(p.planned[0][&1], p.planned[0][&2]);
        assert!(p.copies.contains(&(1, 0, 2)) && p.copies.contains(&(2, 4, 2)));
        assert!(p.changes());
        // The add phase gives each worker, in the layers it gains experts, old plus new.
        let gained = changed_layers(&p.today[0], &p.planned[0]);
        assert!(!gained.contains_key(&3));
        // Planning again on the same load once the plan is in place moves nothing: the planner
        // hands each list to the worker that holds it.
        let mut applied = info.clone();
        for (w, h) in applied.worker_experts.iter_mut().zip(&p.planned) {
            for l in &mut w.layers {
                l.experts = h[&l.layer].clone();
            }
        }
        let again = plan_from(&args(&["--spare", "1"]), vec![applied], Vec::new()).expect("plan");
        assert!(!again.changes(), "{:?} -> {:?}", again.today, again.planned);
    }

    /// A stand-in expert worker that answers `SetExperts` only: it records each request and
    /// accepts it, or refuses every one (RESOURCE_EXHAUSTED, as a worker short of memory does).
    #[derive(Clone)]
    struct FakeWorker {
        refuse: bool,
        seen: std::sync::Arc<std::sync::Mutex<Vec<Holdings>>>,
    }

    #[tonic::async_trait]
    impl moemesh_proto::v1::expert_server::Expert for FakeWorker {
        type ForwardStream =
            futures::stream::Empty<Result<moemesh_proto::v1::ForwardResponse, tonic::Status>>;
        async fn forward(
            &self,
            _: tonic::Request<tonic::Streaming<moemesh_proto::v1::ForwardRequest>>,
        ) -> Result<tonic::Response<Self::ForwardStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("fake"))
        }
        async fn info(
            &self,
            _: tonic::Request<moemesh_proto::v1::ExpertInfoRequest>,
        ) -> Result<tonic::Response<moemesh_proto::v1::ExpertInfoResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("fake"))
        }
        async fn open_transport(
            &self,
            _: tonic::Request<moemesh_proto::v1::OpenTransportRequest>,
        ) -> Result<tonic::Response<moemesh_proto::v1::OpenTransportResponse>, tonic::Status>
        {
            Err(tonic::Status::unimplemented("fake"))
        }
        async fn set_experts(
            &self,
            req: tonic::Request<SetExpertsRequest>,
        ) -> Result<tonic::Response<moemesh_proto::v1::SetExpertsResponse>, tonic::Status> {
            let layers = req.into_inner().layer_experts;
            if self.refuse {
                return Err(tonic::Status::resource_exhausted(
                    "no room for the new stacks",
                ));
            }
            let h: Holdings = layers
                .iter()
                .map(|l| (l.layer, l.experts.clone()))
                .collect();
            self.seen.lock().unwrap_or_else(|e| e.into_inner()).push(h);
            Ok(tonic::Response::new(
                moemesh_proto::v1::SetExpertsResponse {
                    layer_experts: layers,
                    ..Default::default()
                },
            ))
        }
    }

    async fn serve(fake: FakeWorker) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(moemesh_proto::v1::expert_server::ExpertServer::new(fake))
                .serve_with_incoming(tokio_stream_of(listener)),
        );
        addr
    }

    fn tokio_stream_of(
        l: tokio::net::TcpListener,
    ) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
        futures::stream::unfold(l, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            Some((r, l))
        })
    }

    /// When a worker refuses the add phase, the workers that had already added experts are put
    /// back as they were (their extra copies would draw load), and the error says so.
    #[tokio::test]
    async fn a_refused_add_puts_back_the_workers_that_had_added() {
        let mut info = hot_per_layer(&[1, 2]);
        let a = FakeWorker {
            refuse: false,
            seen: Default::default(),
        };
        let b = FakeWorker {
            refuse: true,
            seen: Default::default(),
        };
        info.worker_experts[0].address = serve(a.clone()).await;
        info.worker_experts[1].address = serve(b.clone()).await;
        let args = args(&["--spare", "1", "--min-gain", "0"]);
        let p = plan_from(&args, vec![info], Vec::new()).expect("plan");
        assert!(p.changes());
        let err = apply(&args, &p).await.expect_err("b refuses");
        let text = format!("{err:#}");
        assert!(
            text.contains("no room") && text.contains("put back"),
            "{text}"
        );
        let seen = a.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(seen.len(), 2, "a: the add, then the undo: {seen:?}");
        // The add gave a, in each layer it changes, a superset of what it held; the undo gives
        // each of those layers back its list of before.
        for (l, list) in &seen[0] {
            assert!(p.today[0][l].iter().all(|e| list.contains(e)), "{seen:?}");
        }
        let undone: Vec<u32> = seen[1].keys().copied().collect();
        assert_eq!(undone, seen[0].keys().copied().collect::<Vec<_>>());
        for (l, list) in &seen[1] {
            assert_eq!(list, &p.today[0][l]);
        }
    }

    /// A worker's memory bounds its room: with room for no extra expert it gets no replica
    /// (the plan stays within what it holds), with room for one its total grows by at most one.
    /// A plan that has a worker load more than its free memory takes (a swap loads before it
    /// drops) is refused by name before anything changes; with memory to spare it is not.
    #[test]
    fn a_workers_free_memory_bounds_its_room_and_apply_refuses_a_plan_beyond_it() {
        let info = hot_per_layer(&[1, 2]);
        let mib = 1u64 << 20;
        // 100 MiB a pair; the reserve is 2,048 MiB.
        let mem = |extra_pairs: u64| {
            Some(WorkerMemory {
                free: 2048 * mib + extra_pairs * 100 * mib,
                bytes_per_pair: 100 * mib,
            })
        };
        let total = |h: &Holdings| h.values().map(Vec::len).sum::<usize>();
        let a = args(&["--spare", "2"]);
        // Unknown memory: replicas make a worker hold more than its 8 pairs.
        let unbounded = plan_from(&a, vec![info.clone()], Vec::new()).expect("plan");
        assert!(unbounded.planned.iter().any(|h| total(h) > 8));
        assert!(unbounded.over_memory().is_empty());
        // No memory to spare: each keeps 8 pairs (an even share of each layer), still evened;
        // but evening swaps experts, which loads before it drops, so apply refuses the plan.
        let tight = plan_from(&a, vec![info.clone()], vec![mem(0), mem(0)]).expect("plan");
        assert!(
            tight.planned.iter().all(|h| total(h) <= 8),
            "{:?}",
            tight.planned
        );
        let (now, planned) = tight.busiest();
        assert!(planned < now, "{now} -> {planned}");
        assert!(!tight.over_memory().is_empty());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let err = rt
            .block_on(apply(&a, &tight))
            .expect_err("over memory")
            .to_string();
        assert!(
            err.contains("worker a") || err.contains("worker b"),
            "{err}"
        );
        assert!(
            err.contains("would restack") && err.contains("GB free"),
            "{err}"
        );
        assert!(err.contains("--memory-reserve-mb"), "{err}");
        // Room for one more pair each: at most 9 each.
        let one = plan_from(&a, vec![info.clone()], vec![mem(1), mem(1)]).expect("plan");
        assert!(
            one.planned.iter().all(|h| total(h) <= 9),
            "{:?}",
            one.planned
        );
        // Memory to spare: the same plan as unbounded, and nothing over.
        let roomy = plan_from(&a, vec![info], vec![mem(100), mem(100)]).expect("plan");
        assert_eq!(roomy.planned, unbounded.planned);
        assert!(roomy.over_memory().is_empty());
    }

    #[test]
    fn the_experts_flag_folds_runs_into_ranges() {
        assert_eq!(experts_flag(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        assert_eq!(experts_flag(&[5]), "5");
        assert_eq!(experts_flag(&[]), "");
    }
}
