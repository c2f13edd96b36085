//! `moemesh rebalance`: the expert placement the planner (`moemesh_common::placement`) would
//! choose from the gates' measured load (`Gate.Info`: tokens routed per (layer, expert) over each
//! gate's recent window, or since it started with `--cumulative`, and each worker's experts),
//! beside today's: each worker's share of the routed tokens and the busiest worker's. With
//! `--apply` the plan is then carried out live (issue 22), in an order that never leaves an
//! expert without a holder: first every worker that gains experts is sent `Expert.SetExperts`
//! with its old experts plus the new ones, and the gates are polled until they list all of
//! them; then every worker that gives experts up is sent its planned list, and the gates are
//! polled again. Each worker's call and each wait is bounded by `--apply-timeout`. `moemesh up
//! --rebalance-every` runs the same cycle periodically ([`cycle`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures::future::join_all;
use moemesh_common::placement;
use moemesh_proto::v1::expert_client::ExpertClient;
use moemesh_proto::v1::gate_client::GateClient;
use moemesh_proto::v1::{GateInfoRequest, GateInfoResponse, SetExpertsRequest};
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
    /// After showing the plan, carry it out live: the workers load their new experts while they
    /// serve (`Expert.SetExperts`), the gates switch between steps, then the workers drop the
    /// experts they gave up. Needs a mesh on etcd.
    #[arg(long)]
    pub apply: bool,
    /// Experts each worker may hold beyond an even share of them (the experts over the workers,
    /// rounded up): room for replicas. The room does not depend on what a worker holds now, so
    /// applying plans again and again does not make workers grow.
    #[arg(long, default_value_t = 2)]
    pub spare: usize,
    /// Most copies of one expert.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_copies: u32,
    /// Plan from the tokens routed since the gate started instead of over its recent window
    /// (`moemesh gate --load-window-secs`).
    #[arg(long)]
    pub cumulative: bool,
    /// With --apply: apply only when the plan lowers the busiest worker's share of the routed
    /// tokens by at least this many percentage points (moving experts costs loading them).
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

/// A plan beside today's placement.
pub struct Planned {
    /// The gates' answers (the first one's worker list is the one planned for).
    pub infos: Vec<GateInfoResponse>,
    /// What the load covers ("in the last 60s").
    pub basis: String,
    /// Tokens routed to each expert, summed over layers and gates.
    pub load: Vec<u64>,
    /// Per worker (the first gate's order): experts now, and planned.
    pub today: Vec<Vec<u32>>,
    pub planned: Vec<Vec<u32>>,
    /// Per worker: tokens it computes now, and under the plan (a replicated expert's load split
    /// evenly over its copies).
    pub before: Vec<f64>,
    pub after: Vec<f64>,
    /// Expert ids with more than one copy planned, and their copies.
    pub copies: Vec<(u32, u32)>,
}

impl Planned {
    pub fn total(&self) -> u64 {
        self.load.iter().sum()
    }

    /// Share (percent) of the routed tokens that `tokens` is.
    pub fn pct(&self, tokens: f64) -> f64 {
        match self.total() {
            0 => 0.0,
            t => tokens / t as f64 * 100.0,
        }
    }

    /// The busiest worker's share now and planned, in percent.
    pub fn busiest(&self) -> (f64, f64) {
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        (self.pct(max(&self.before)), self.pct(max(&self.after)))
    }

    /// Whether anything would move.
    pub fn changes(&self) -> bool {
        self.today.iter().zip(&self.planned).any(|(a, b)| a != b)
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
    let first = &infos[0];
    if first.worker_experts.is_empty() {
        bail!("gate {} lists no expert workers", args.addr[0]);
    }
    let basis = if args.cumulative {
        "since the gate started".to_string()
    } else {
        format!("in the last {}s", first.load_window_secs)
    };
    // Load per expert, summed over the layers (a worker holds the same experts in each) and gates.
    let n = infos
        .iter()
        .flat_map(|i| {
            let layers = if args.cumulative {
                &i.expert_load
            } else {
                &i.expert_load_window
            };
            layers.iter().map(|l| l.tokens.len())
        })
        .chain(
            first
                .worker_experts
                .iter()
                .flat_map(|w| w.experts.iter().map(|&e| e as usize + 1)),
        )
        .max()
        .unwrap_or(0);
    let mut load = vec![0u64; n];
    for info in &infos {
        let layers = if args.cumulative {
            &info.expert_load
        } else {
            &info.expert_load_window
        };
        for l in layers {
            for (e, &t) in l.tokens.iter().enumerate() {
                load[e] += t;
            }
        }
    }
    // Experts any worker holds now: the planner places exactly those.
    let held: BTreeSet<u32> = first
        .worker_experts
        .iter()
        .flat_map(|w| w.experts.iter().copied())
        .collect();
    let ids: Vec<u32> = held.into_iter().collect();
    let sub_load: Vec<u64> = ids.iter().map(|&e| load[e as usize]).collect();
    let share = ids.len().div_ceil(first.worker_experts.len());
    let room = vec![share + args.spare; first.worker_experts.len()];
    // One pseudo-layer standing for all of them (the same experts in every layer).
    let room: Vec<BTreeMap<u32, usize>> = room.iter().map(|&r| BTreeMap::from([(0, r)])).collect();
    let plan = placement::plan(
        &BTreeMap::from([(0, sub_load)]),
        &room,
        args.max_copies as usize,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let plan = &plan.layers[&0];
    let planned: Vec<Vec<u32>> = plan
        .holds
        .iter()
        .map(|h| h.iter().map(|&i| ids[i as usize]).collect())
        .collect();
    let today: Vec<Vec<u32>> = first
        .worker_experts
        .iter()
        .map(|w| w.experts.clone())
        .collect();
    let share = |holds: &[Vec<u32>]| -> Vec<f64> {
        let mut copies = vec![0u32; n];
        for h in holds {
            for &e in h {
                copies[e as usize] += 1;
            }
        }
        holds
            .iter()
            .map(|h| {
                h.iter()
                    .map(|&e| load[e as usize] as f64 / f64::from(copies[e as usize].max(1)))
                    .sum()
            })
            .collect()
    };
    let (before, after) = (share(&today), share(&planned));
    let copies = ids
        .iter()
        .zip(&plan.copies)
        .filter(|(_, c)| **c > 1)
        .map(|(&e, &c)| (e, c))
        .collect();
    Ok(Planned {
        infos,
        basis,
        load,
        today,
        planned,
        before,
        after,
        copies,
    })
}

/// Prints the plan (a table, or one JSON object).
fn show(args: &RebalanceArgs, p: &Planned) {
    let gates = args.addr.join(",");
    let workers = &p.infos[0].worker_experts;
    let (now, planned) = p.busiest();
    if args.json {
        let workers: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                serde_json::json!({
                    "id": w.id,
                    "experts_now": p.today[i],
                    "tokens_now": p.before[i],
                    "experts_planned": p.planned[i],
                    "tokens_planned": p.after[i],
                    "experts_flag": experts_flag(&p.planned[i]),
                })
            })
            .collect();
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        println!(
            "{}",
            serde_json::json!({
                "gate": gates,
                "load": p.basis,
                "routed_tokens": p.total(),
                "busiest_now": max(&p.before),
                "busiest_planned": max(&p.after),
                "busiest_share_now": now,
                "busiest_share_planned": planned,
                "copies": p.copies.iter().map(|(e, c)| serde_json::json!({"expert": e, "copies": c})).collect::<Vec<_>>(),
                "workers": workers,
            })
        );
        return;
    }
    println!(
        "gate {gates}: {} routed tokens {} over {} experts and {} workers",
        p.total(),
        p.basis,
        p.today.iter().flatten().collect::<BTreeSet<_>>().len(),
        p.today.len()
    );
    println!("| worker | share now | share planned | --experts (planned) |");
    println!("| --- | ---: | ---: | --- |");
    for (i, w) in workers.iter().enumerate() {
        println!(
            "| {} | {:.1}% | {:.1}% | {} |",
            w.id,
            p.pct(p.before[i]),
            p.pct(p.after[i]),
            experts_flag(&p.planned[i])
        );
    }
    println!("busiest worker: {now:.1}% of the routed tokens now, {planned:.1}% planned");
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
    /// Per worker changed: id, experts loaded, experts dropped, milliseconds loading.
    pub workers: Vec<(String, Vec<u32>, Vec<u32>, u64)>,
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
                    experts_flag(l),
                    experts_flag(d)
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
                "id": id, "loaded": l, "dropped": d, "load_ms": ms,
            })).collect::<Vec<_>>(),
        })
    }
}

/// One worker's target in a phase.
struct Move {
    id: String,
    address: String,
    experts: Vec<u32>,
    grace_ms: u32,
}

/// Sends `SetExperts` to every worker of `moves` at once, each bounded by `limit`.
async fn set_all(
    client: &ClientArgs,
    moves: &[Move],
    limit: Duration,
) -> anyhow::Result<Vec<(String, Vec<u32>, Vec<u32>, u64)>> {
    let calls = moves.iter().map(|m| async move {
        let call = async {
            let channel = client.channel(&m.address).await?;
            let reply = ExpertClient::new(channel)
                .set_experts(SetExpertsRequest {
                    experts: m.experts.clone(),
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
                    experts_flag(&m.experts),
                    m.id,
                    m.address
                )
            })?;
        anyhow::Ok((m.id.clone(), r.loaded, r.dropped, r.load_ms))
    });
    join_all(calls).await.into_iter().collect()
}

/// Polls every gate until it lists each worker of `want` (id → experts) with exactly those
/// experts, for at most `limit`.
async fn wait_listed(
    args: &RebalanceArgs,
    want: &BTreeMap<String, Vec<u32>>,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let per_call = Duration::from_secs(args.timeout);
    for addr in &args.addr {
        loop {
            let info = gate_info(&args.client, addr, per_call).await?;
            let listed: BTreeMap<&str, &Vec<u32>> = info
                .worker_experts
                .iter()
                .map(|w| (w.id.as_str(), &w.experts))
                .collect();
            let behind: Vec<&String> = want
                .iter()
                .filter(|(id, e)| listed.get(id.as_str()) != Some(e))
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

/// Carries out `p` live: adds (every worker its old experts plus its new ones), waits for the
/// gates to list them, then removes (every worker its planned experts), and waits again. Never
/// leaves an expert without a holder: after the first phase each worker holds a superset of both
/// placements, and the planner holds every expert somewhere.
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
                "the busiest worker's share would go from {now:.1}% to {planned:.1}%, less than \
                 --min-gain {} points",
                args.min_gain
            )),
            ..Applied::default()
        });
    }
    let limit = Duration::from_secs(args.apply_timeout);
    let workers = &p.infos[0].worker_experts;
    // Phase 1: add.
    let mut adds = Vec::new();
    let mut after_add = BTreeMap::new();
    for (i, w) in workers.iter().enumerate() {
        let union: Vec<u32> = p.today[i]
            .iter()
            .chain(&p.planned[i])
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if union != p.today[i] {
            adds.push(Move {
                id: w.id.clone(),
                address: w.address.clone(),
                experts: union.clone(),
                grace_ms: 0,
            });
            after_add.insert(w.id.clone(), union);
        }
    }
    if adds.iter().any(|m| m.address.is_empty()) {
        bail!("a gate did not report its workers' addresses (an older gate?): cannot apply");
    }
    let mut done: BTreeMap<String, (Vec<u32>, Vec<u32>, u64)> = BTreeMap::new();
    for (id, loaded, _, ms) in set_all(&args.client, &adds, limit)
        .await
        .context("adding experts (nothing was removed; workers that answered hold extra copies)")?
    {
        done.insert(id, (loaded, Vec::new(), ms));
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
                experts: p.planned[i].clone(),
                grace_ms: args.release_grace_ms,
            });
        }
        after_remove.insert(w.id.clone(), p.planned[i].clone());
    }
    for (id, _, dropped, _) in set_all(&args.client, &removes, limit)
        .await
        .context("removing experts (every expert is still held at least once)")?
    {
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

    #[test]
    fn the_experts_flag_folds_runs_into_ranges() {
        assert_eq!(experts_flag(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        assert_eq!(experts_flag(&[5]), "5");
        assert_eq!(experts_flag(&[]), "");
    }
}
