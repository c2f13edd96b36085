//! `moemesh rebalance --plan`: the expert placement the planner (`moemesh_common::placement`)
//! would choose from a gate's measured load (`Gate.Info`: tokens routed per (layer, expert) over
//! the gate's recent window, or since it started with `--cumulative`, and each worker's experts), beside today's: each worker's share of the routed tokens, the busiest
//! worker's, and the `--experts` flag that would start each worker on its planned experts.
//! Moving experts while traffic flows (issue 22) is not built: the plan is applied by starting
//! workers with those flags, then stopping the old ones (the gate fails over between them).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use moemesh_common::placement;
use moemesh_proto::v1::GateInfoRequest;
use moemesh_proto::v1::gate_client::GateClient;

#[derive(Args, Debug)]
pub struct RebalanceArgs {
    /// Address of the gate whose load to plan from (`host:port`).
    #[arg(long, env = "MOEMESH_GATE_ADDR", default_value = "127.0.0.1:50060")]
    pub addr: String,
    /// Show the plan (the only mode: applying it live is not built yet).
    #[arg(long, default_value_t = true)]
    pub plan: bool,
    /// Experts each worker may hold beyond the number it holds now (room for replicas).
    #[arg(long, default_value_t = 2)]
    pub spare: usize,
    /// Most copies of one expert.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_copies: u32,
    /// Plan from the tokens routed since the gate started instead of over its recent window
    /// (`moemesh gate --load-window-secs`).
    #[arg(long)]
    pub cumulative: bool,
    /// Print the plan as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Give up after this many seconds (connecting included).
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    #[command(flatten)]
    pub client: moemesh_tools::client_args::ClientArgs,
}

pub fn run(args: RebalanceArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let info = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(args.timeout), async {
            let channel = args.client.channel(&args.addr).await?;
            let reply = GateClient::new(channel)
                .info(GateInfoRequest {})
                .await
                .with_context(|| format!("moemesh.v1.Gate/Info on {}", args.addr))?;
            anyhow::Ok(reply.into_inner())
        })
        .await
        .with_context(|| format!("no answer from {} within {}s", args.addr, args.timeout))?
    })?;
    if info.worker_experts.is_empty() {
        bail!("gate {} lists no expert workers", args.addr);
    }
    let (layers, basis) = if args.cumulative {
        (&info.expert_load, "since the gate started".to_string())
    } else {
        (
            &info.expert_load_window,
            format!("in the last {}s", info.load_window_secs),
        )
    };
    // Load per expert, summed over the layers (a worker holds the same experts in each).
    let n = layers
        .iter()
        .map(|l| l.tokens.len())
        .chain(
            info.worker_experts
                .iter()
                .flat_map(|w| w.experts.iter().map(|&e| e as usize + 1)),
        )
        .max()
        .unwrap_or(0);
    let mut load = vec![0u64; n];
    for l in layers {
        for (e, &t) in l.tokens.iter().enumerate() {
            load[e] += t;
        }
    }
    // Experts any worker holds now: the planner places exactly those.
    let held: BTreeMap<u32, ()> = info
        .worker_experts
        .iter()
        .flat_map(|w| w.experts.iter().map(|&e| (e, ())))
        .collect();
    let ids: Vec<u32> = held.keys().copied().collect();
    let sub_load: Vec<u64> = ids.iter().map(|&e| load[e as usize]).collect();
    let room: Vec<usize> = info
        .worker_experts
        .iter()
        .map(|w| w.experts.len() + args.spare)
        .collect();
    let plan = placement::plan(&sub_load, &room, args.max_copies as usize)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let planned: Vec<Vec<u32>> = plan
        .holds
        .iter()
        .map(|h| h.iter().map(|&i| ids[i as usize]).collect())
        .collect();
    let today: Vec<Vec<u32>> = info
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
    let total: u64 = load.iter().sum();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    if args.json {
        let workers: Vec<_> = info
            .worker_experts
            .iter()
            .enumerate()
            .map(|(i, w)| {
                serde_json::json!({
                    "id": w.id,
                    "experts_now": today[i],
                    "tokens_now": before[i],
                    "experts_planned": planned[i],
                    "tokens_planned": after[i],
                    "experts_flag": experts_flag(&planned[i]),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "gate": args.addr,
                "load": basis,
                "routed_tokens": total,
                "busiest_now": max(&before),
                "busiest_planned": max(&after),
                "copies": ids.iter().zip(&plan.copies).filter(|(_, c)| **c > 1)
                    .map(|(e, c)| serde_json::json!({"expert": e, "copies": c})).collect::<Vec<_>>(),
                "workers": workers,
            })
        );
        return Ok(());
    }
    println!(
        "gate {}: {total} routed tokens {basis} over {} experts and {} workers",
        args.addr,
        ids.len(),
        today.len()
    );
    let pct = |x: f64| {
        if total == 0 {
            0.0
        } else {
            x / total as f64 * 100.0
        }
    };
    println!("| worker | share now | share planned | --experts (planned) |");
    println!("| --- | ---: | ---: | --- |");
    for (i, w) in info.worker_experts.iter().enumerate() {
        println!(
            "| {} | {:.1}% | {:.1}% | {} |",
            w.id,
            pct(before[i]),
            pct(after[i]),
            experts_flag(&planned[i])
        );
    }
    println!(
        "busiest worker: {:.1}% of the routed tokens now, {:.1}% planned",
        pct(max(&before)),
        pct(max(&after))
    );
    Ok(())
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
