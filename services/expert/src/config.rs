//! `moemesh expert` configuration: flags and `MOEMESH_*` environment variables.

use std::path::PathBuf;

use clap::Args;
use moemesh_common::member_args::MemberArgs;
use moemesh_common::memory_plan::{PlanReserves, PlanShard, positive_gib};
use moemesh_common::transport::IpcWait;

#[derive(Args, Debug, Clone)]
pub struct ExpertConfig {
    #[command(flatten)]
    pub member: MemberArgs,
    /// Model directory; the embedded default model when omitted.
    #[arg(long, env = "MOEMESH_MODEL")]
    pub model: Option<PathBuf>,
    /// How the routed experts are held: `auto` (an FP8 checkpoint's stay FP8, an INT4 one's
    /// INT4, on a GPU computing in bf16), `bf16` (dequantised to the compute dtype), `fp8` (e4m3
    /// with 128 × 128 block scales; other weights, a synthetic model's too, quantised at load) or
    /// `int4` (4 bits, one f32 scale per 128 input columns, quantised at load where stored
    /// otherwise); quantised experts stay so on a GPU computing in bf16, dequantised elsewhere.
    #[arg(long, env = "MOEMESH_WEIGHTS_DTYPE", default_value = "auto")]
    pub weights_dtype: moemesh_engine::ExpertsDtype,
    /// Routed experts to serve in every served layer, e.g. `0-15` or `0-3,8,12-15` (default: all).
    #[arg(long, env = "MOEMESH_EXPERTS")]
    pub experts: Option<String>,
    /// Size this worker's shard from the memory plan instead of --experts: worker INDEX of the
    /// plan on GPUS GPUs, e.g. `2/8` (`moemesh plan --gpus 8` lists the workers). Every worker
    /// given the same model, --weights-dtype, --gpu-mem-gib and reserves computes the same plan,
    /// so their shards tile the routed experts; a plan that does not fit is refused at start.
    #[arg(long, env = "MOEMESH_PLAN_SHARD", conflicts_with = "experts")]
    pub plan_shard: Option<PlanShard>,
    /// With --plan-shard: the memory of each of the plan's GPUs in GiB. Default: this worker's
    /// GPU's total memory (give it on a host of mixed GPUs, so that every worker plans alike; a
    /// CPU worker must give it).
    #[arg(long, env = "MOEMESH_GPU_MEM_GIB", value_parser = positive_gib)]
    pub gpu_mem_gib: Option<f64>,
    /// With --plan-shard: the plan's reserves (as `moemesh plan` takes them).
    #[command(flatten, next_help_heading = "Memory plan (with --plan-shard)")]
    pub plan: PlanReserves,
    /// MoE layers to serve, e.g. `1-26` (default: every MoE layer).
    #[arg(long, env = "MOEMESH_LAYERS")]
    pub layers: Option<String>,
    /// How this worker's stream waits for a gate's flag on a device-ordered CUDA IPC session:
    /// `kernel` (a spinning one-thread kernel, which wakes at once), `stream` (the stream's
    /// memory wait), or `auto`: `kernel` under MPS (as `moemesh up` runs processes sharing a
    /// GPU), `stream` otherwise, where a spinning kernel would hold a time-sliced GPU.
    #[arg(long, env = "MOEMESH_IPC_WAIT", value_enum, default_value = "auto")]
    pub ipc_wait: IpcWait,
    /// Most seconds to wait for in-flight calls at shutdown.
    #[arg(long, env = "MOEMESH_DRAIN_TIMEOUT", default_value_t = 10)]
    pub drain_timeout: u64,
}

/// Parses `0-15`, `3`, `0-3,8,12-15` into a sorted list without duplicates.
pub fn parse_range(s: &str, what: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("--{what}: {part:?} is not a number or a range like 0-15");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if a > b {
                    return Err(format!("--{what}: range {part:?} runs backwards"));
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err(format!("--{what}: empty list"));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{IpcWait, PlanReserves, PlanShard, parse_range};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: super::ExpertConfig,
    }

    #[test]
    fn the_ipc_wait_defaults_to_auto_and_refuses_other_values_by_name() {
        let wait = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("expert").chain(args.iter().copied()))
                .map(|c| c.cfg.ipc_wait)
                .map_err(|e| e.to_string())
        };
        assert_eq!(wait(&[]), Ok(IpcWait::Auto));
        assert_eq!(wait(&["--ipc-wait", "stream"]), Ok(IpcWait::Stream));
        assert_eq!(wait(&["--ipc-wait=kernel"]), Ok(IpcWait::Kernel));
        assert!(IpcWait::Kernel.spins() && !IpcWait::Stream.spins());
        let err = wait(&["--ipc-wait", "spin"]).expect_err("not a value");
        assert!(err.contains("--ipc-wait"), "{err}");
    }

    #[test]
    fn the_plan_flags_default_to_moemesh_plans_and_plan_shard_excludes_experts() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("expert").chain(args.iter().copied()))
                .map(|c| c.cfg)
                .map_err(|e| e.to_string())
        };
        let cfg = parse(&[]).expect("no flags");
        assert_eq!(cfg.plan, PlanReserves::default_values());
        assert_eq!((cfg.plan_shard, cfg.gpu_mem_gib), (None, None));
        let cfg = parse(&[
            "--plan-shard",
            "2/8",
            "--gpu-mem-gib",
            "139.8",
            "--workspace-gib",
            "6",
        ])
        .expect("a plan shard");
        assert_eq!(cfg.plan_shard, Some(PlanShard { index: 2, gpus: 8 }));
        assert_eq!(cfg.gpu_mem_gib, Some(139.8));
        assert_eq!(cfg.plan.workspace_gib, 6.0);
        let err = parse(&["--plan-shard", "0/2", "--experts", "0-3"]).expect_err("both");
        assert!(
            err.contains("--experts") && err.contains("--plan-shard"),
            "{err}"
        );
        let err = parse(&["--plan-shard", "0/2", "--gpu-mem-gib", "0"]).expect_err("0 GiB");
        assert!(err.contains("--gpu-mem-gib"), "{err}");
    }

    #[test]
    fn ranges_and_lists() {
        assert_eq!(
            parse_range("0-3,8,12-13", "experts"),
            Ok(vec![0, 1, 2, 3, 8, 12, 13])
        );
        assert!(
            parse_range("5-2", "experts")
                .expect_err("backwards")
                .contains("backwards")
        );
        assert!(
            parse_range("x", "layers")
                .expect_err("nan")
                .contains("--layers")
        );
    }
}
