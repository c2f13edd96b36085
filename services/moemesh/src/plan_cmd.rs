//! `moemesh plan`: the memory plan of a model on `N` GPUs of `G` GiB, from its `config.json`
//! alone (no weights are read): bytes per part under a weights dtype, the placement (gate on
//! GPU 0, expert workers with their `--experts` ranges), whether it fits, and the commands that
//! start it. The arithmetic is `moemesh_common::memory_plan`'s; this file reads the flags and the
//! config and prints. With `--json` the last line of stdout is one JSON object.

use std::path::Path;

use anyhow::Context;
use clap::Args;
use moemesh_common::memory_plan::{
    GIB, ModelBytes, PartBytes, Placement, PlanInput, PlanReserves, Scheme, WeightsDtype, gib,
    place, positive_gib,
};
use moemesh_engine::ModelConfig;
use moemesh_engine::config::RawConfig;
use serde_json::json;

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// The model: a checkpoint directory, its config.json, or synthetic:NAME. Only the config
    /// is read.
    #[arg(long, env = "MOEMESH_MODEL")]
    pub model: String,
    /// GPUs of one host to place the model on.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub gpus: u32,
    /// Memory of each GPU in GiB (what nvidia-smi shows as total, e.g. 79.6 for an H100 80GB,
    /// 139.8 for an H200).
    #[arg(long, value_parser = positive_gib)]
    pub gpu_mem_gib: f64,
    /// How the weights are held: bf16, fp8 (e4m3 + f32 scale per 128×128 block) or int4
    /// (GPTQ/AWQ, group 128). Default: the checkpoint's own (its quantization_config).
    #[arg(long, value_enum)]
    pub weights_dtype: Option<WeightsDtype>,
    #[command(flatten)]
    pub reserves: PlanReserves,
    /// Also print the plan as one JSON object, the last line of stdout (`fits` answers whether
    /// it fits).
    #[arg(long)]
    pub json: bool,
}

/// The config of `--model`: `synthetic:NAME`, a `config.json` path, or a directory holding one.
fn read_config(model: &str) -> anyhow::Result<(ModelConfig, String)> {
    if let Some(name) = model.strip_prefix("synthetic:") {
        let raw: RawConfig =
            serde_json::from_value(moemesh_engine::synthetic::synthetic_config_json(name)?)?;
        return Ok((ModelConfig::from_raw(&raw)?, model.to_string()));
    }
    let path = Path::new(model);
    let (file, dir) = if path.is_dir() {
        (path.join("config.json"), path)
    } else {
        (path.to_path_buf(), path.parent().unwrap_or(Path::new(".")))
    };
    let cfg = ModelConfig::from_file(&file).with_context(|| format!("--model {model}"))?;
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| model.to_string());
    Ok((cfg, name))
}

fn by_dtype(p: &PartBytes) -> String {
    p.bytes
        .iter()
        .map(|(k, v)| format!("{k} {:.2}", gib(*v)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let (cfg, name) = read_config(&args.model)?;
    let dtype = args
        .weights_dtype
        .unwrap_or_else(|| WeightsDtype::of_config(&cfg));
    let scheme = Scheme::new(dtype, &cfg);
    let model = ModelBytes::of(&cfg, scheme);
    let input = args.reserves.input(args.gpus as usize, args.gpu_mem_gib);
    let plan = place(&model, &input).map_err(|e| anyhow::anyhow!("{e}"))?;
    print_text(&args, &cfg, &name, &model, &input, &plan);
    if args.json {
        println!("{}", to_json(&args, &name, &model, &input, &plan));
    }
    Ok(())
}

fn print_text(
    args: &PlanArgs,
    cfg: &ModelConfig,
    name: &str,
    model: &ModelBytes,
    input: &PlanInput,
    plan: &Placement,
) {
    let b = |n: u64| n as f64 / 1e9;
    println!(
        "model {name}: {:?}, {} layers ({} with {} routed experts, top-{}), {:.2} B parameters \
         (embeddings {:.2} B, gate {:.2} B, routed experts {:.2} B; MTP layers not counted: \
         moemesh does not load them)",
        cfg.arch,
        cfg.num_hidden_layers,
        model.moe_layers,
        model.n_routed_experts,
        cfg.num_experts_per_tok,
        b(model.total_params()),
        b(model.embeddings.params),
        b(model.gate.params),
        b(model.routed_experts.params),
    );
    let s = model.scheme;
    let how = match s.dtype {
        WeightsDtype::Bf16 => "every tensor bf16".to_string(),
        WeightsDtype::Fp8 => format!(
            "projections e4m3 + an f32 scale per {}×{} block",
            s.fp8_block.0, s.fp8_block.1
        ),
        WeightsDtype::Int4 if s.int4_dequantised => {
            "GPTQ in activation order: projections dequantised to bf16 at load".to_string()
        }
        WeightsDtype::Int4 => format!(
            "projections 4-bit + an f32 scale{} per {} input columns and output row",
            if s.int4_zeros {
                " and a u8 zero point"
            } else {
                ""
            },
            s.int4_group,
        ),
    };
    println!(
        "weights {}: {how}; embeddings, norms and lm_head bf16; router f32 (GiB below)",
        s.dtype.name()
    );
    println!(
        "  frontend (host memory, for a gate that takes activations): embeddings {:.2}",
        gib(model.embeddings.total())
    );
    println!(
        "  gate (embeddings included): {:.2} ({})",
        gib(model.gate.total()),
        by_dtype(&model.gate)
    );
    println!(
        "  routed experts: {:.2} ({}); one expert in all {} MoE layers: {:.3}",
        gib(model.routed_experts.total()),
        by_dtype(&model.routed_experts),
        model.moe_layers,
        gib(model.expert_bytes()),
    );
    println!(
        "reserves: KV cache {:.2} on the gate's GPU (~{} tokens at {} B each, bf16 latent cache); \
         workspace {:.2} per process",
        gib(input.kv_cache_bytes),
        input.kv_cache_bytes / model.kv_bytes_per_token.max(1),
        model.kv_bytes_per_token,
        gib(input.workspace_bytes),
    );
    println!(
        "placement on {} × {:.2} GiB: gate on GPU 0{}",
        input.gpus,
        args.gpu_mem_gib,
        if plan.gate_gpu_experts {
            ", with an expert worker beside it (two processes on one GPU: run MPS)"
        } else {
            " alone"
        }
    );
    println!(
        "{:<4} {:<24} {:>9} {:>7} {:>10} {:>9} {:>9}",
        "GPU", "processes", "weights", "KV", "workspace", "total", "free"
    );
    for g in &plan.gpus {
        println!(
            "{:<4} {:<24} {:>9.2} {:>7.2} {:>10.2} {:>9.2} {:>9.2}{}",
            g.index,
            plan.processes(g),
            gib(g.weight_bytes),
            gib(g.kv_bytes),
            gib(g.workspace_bytes),
            gib(g.total()),
            g.free() as f64 / GIB as f64,
            if g.fits() { "" } else { "  OVER" }
        );
    }
    let fits = plan.fits();
    println!("fits: {}", if fits { "yes" } else { "no" });
    if fits {
        let dir = &args.model;
        println!("start (add --etcd or --expert-addrs, and the flags of docs/USAGE.md):");
        println!(
            "  moemesh gate --model {dir} --device cuda:0 --dtype bf16 --kv-cache-mb {}",
            input.kv_cache_bytes >> 20
        );
        for w in &plan.workers {
            println!(
                "  moemesh expert --model {dir} --device cuda:{} --dtype bf16 --experts {}",
                w.gpu,
                w.experts_flag()
            );
        }
        println!(
            "or let each worker size its shard from this plan: `moemesh expert … --plan-shard \
             I/{} {}` for worker I (0 to {}); `moemesh up --expert-workers plan` starts them all",
            input.gpus,
            shard_flags(args),
            plan.workers.len().saturating_sub(1)
        );
    } else {
        let need: u64 = plan.gpus.iter().map(|g| g.total()).sum();
        let have = input.gpu_mem_bytes * input.gpus as u64;
        println!(
            "needs {:.2} GiB in all against {:.2} GiB: try more GPUs, a smaller --weights-dtype, \
             or smaller reserves",
            gib(need),
            gib(have)
        );
    }
    if s.dtype != WeightsDtype::Bf16 {
        println!(
            "note: these are the sizes of weights kept quantised on the GPU. A CUDA process \
             computing in bf16 keeps the routed experts so (the FP8 and INT4 expert kernels); \
             the gate's projections are held in bf16 unless MOEMESH_DENSE_FP8=1 (FP8 only), so \
             the gate rows are low by the difference."
        );
    }
}

/// The flags besides `--plan-shard` that make a worker compute this plan: the GPU memory, the
/// weights dtype when given, and the reserves that differ from their defaults.
fn shard_flags(args: &PlanArgs) -> String {
    let mut v = vec![format!("--gpu-mem-gib={}", args.gpu_mem_gib)];
    if let Some(d) = args.weights_dtype {
        v.push(format!("--weights-dtype={}", d.name()));
    }
    v.extend(args.reserves.flags());
    v.join(" ")
}

fn to_json(
    args: &PlanArgs,
    name: &str,
    model: &ModelBytes,
    input: &PlanInput,
    plan: &Placement,
) -> serde_json::Value {
    let part =
        |p: &PartBytes| json!({"params": p.params, "bytes": p.total(), "bytes_by_dtype": p.bytes});
    let per_gpu: Vec<_> = plan
        .gpus
        .iter()
        .map(|g| {
            let worker = g.worker.map(|w| &plan.workers[w]);
            json!({
                "gpu": g.index,
                "device": format!("cuda:{}", g.index),
                "gate": g.gate,
                "experts": worker.map(|w| w.experts_flag()),
                "expert_count": worker.map_or(0, |w| w.experts),
                "weight_bytes": g.weight_bytes,
                "kv_bytes": g.kv_bytes,
                "workspace_bytes": g.workspace_bytes,
                "total_bytes": g.total(),
                "budget_bytes": g.budget_bytes,
                "free_bytes": g.free() as i64,
                "fits": g.fits(),
            })
        })
        .collect();
    let workers: Vec<_> = plan
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            json!({
                "device": format!("cuda:{}", w.gpu),
                "plan_shard": format!("{i}/{}", input.gpus),
                "experts": w.experts_flag(),
                "expert_count": w.experts,
                "weight_bytes": w.experts as u64 * model.expert_bytes(),
            })
        })
        .collect();
    json!({
        "fits": plan.fits(),
        "model": name,
        "weights_dtype": model.scheme.dtype.name(),
        "gpus": input.gpus,
        "gpu_mem_gib": args.gpu_mem_gib,
        "gpu_mem_bytes": input.gpu_mem_bytes,
        "kv_cache_bytes": input.kv_cache_bytes,
        "workspace_bytes_per_process": input.workspace_bytes,
        "total_params": model.total_params(),
        "embeddings": part(&model.embeddings),
        "gate": part(&model.gate),
        "routed_experts": part(&model.routed_experts),
        "moe_layers": model.moe_layers,
        "n_routed_experts": model.n_routed_experts,
        "expert_bytes_per_layer": model.expert_layer.total(),
        "expert_bytes_all_layers": model.expert_bytes(),
        "kv_bytes_per_token": model.kv_bytes_per_token,
        "gate_gpu_experts": plan.gate_gpu_experts,
        "per_gpu": per_gpu,
        "workers": workers,
    })
}
