//! The memory plan (issue 20): how many bytes each part of a DeepSeek model takes under a weight
//! format, and how to place the parts on `N` GPUs of `G` GiB: the gate on one GPU, expert workers
//! sharing out the routed experts, and whether it all fits. `moemesh plan` prints it; the roles
//! log their real loaded bytes at start beside it (the engine's `Loader::loaded_bytes`).
//!
//! Pure arithmetic over a validated `config.json`, no I/O and no tensors: it walks the same list
//! of checkpoint names and shapes the synthetic models are built from
//! (`moemesh_engine::embedded::checkpoint_layout`), which holds no MTP layer (moemesh does not
//! load `num_nextn_predict_layers`).
//!
//! **What each weights dtype stores** (the checkpoint formats, as they would stay resident):
//! - `bf16`: every tensor 2 B per parameter.
//! - `fp8`: the linear projections (MLA's `q_a_proj`, `q_b_proj`, `kv_a_proj_with_mqa`,
//!   `kv_b_proj`, `o_proj`; the dense MLPs, shared and routed experts) as e4m3, 1 B per parameter, plus one f32 inverse scale per 128 × 128 block
//!   (DeepSeek-V3/R1's `weight_block_size`; the config's own when it is an FP8 checkpoint).
//! - `int4`: the same projections as 4-bit integers, 0.5 B per parameter, plus per group of 128
//!   input columns (the config's group size for an INT4 checkpoint) an f32 scale per output row
//!   and, where the checkpoint is asymmetric (GPTQ, AWQ, asymmetric compressed-tensors), a u8
//!   zero point: the layout the GPU keeps INT4 experts in (`engine/src/weights/int4.rs`,
//!   GPTQ's `g_idx` and packed words repacked away). A GPTQ checkpoint in activation order
//!   (`desc_act`) is dequantised at load, so its projections count as bf16. `--weights-dtype
//!   int4` on any other checkpoint quantises symmetrically (no zero points).
//! - In every scheme the embeddings, the norms and `lm_head` stay bf16, and the router
//!   (`mlp.gate.weight`, `e_score_correction_bias`) is held in f32, as the engine evaluates it.
//!
//! **Where the parts go.** The gate holds everything but the routed experts (the embedding
//! table included: it embeds the token ids a frontend sends), plus the KV cache; a frontend
//! also maps the embedding table in host memory, for gates that take activations instead. A routed expert is held by one
//! worker in every MoE layer (`moemesh expert --experts A-B`), so a worker's bytes are its expert
//! count × MoE layers × one expert's bytes.
//!
//! **Placement policy.** GPU 0 holds the gate. By default (`auto`) the routed experts go to one
//! worker per remaining GPU, spread as evenly as their memory allows, so that no GPU time-slices
//! two processes; only when that does not fit (or there is one GPU) does GPU 0 also get a worker,
//! sized to what the gate leaves (two processes on one GPU want MPS: docs/DESIGN.md). Every
//! process on a GPU reserves the workspace (CUDA context, cuBLAS workspace, activations, graphs,
//! IPC buffers), and the gate's GPU the KV cache too.

use std::collections::BTreeMap;

use moemesh_engine::ModelConfig;
use moemesh_engine::config::{Int4Format, Quantization};
use moemesh_engine::embedded::checkpoint_layout;

use crate::error::{MeshError, MeshResult};

/// Bytes in a GiB.
pub const GIB: u64 = 1 << 30;

/// The block of FP8 scales and the INT4 group when the config does not give its own.
pub const DEFAULT_FP8_BLOCK: usize = 128;
pub const DEFAULT_INT4_GROUP: usize = 128;

/// The weight format a plan counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightsDtype {
    Bf16,
    Fp8,
    Int4,
}

impl WeightsDtype {
    /// The checkpoint's own format: `fp8` for an FP8 config, `int4` for GPTQ/AWQ, else `bf16`.
    pub fn of_config(cfg: &ModelConfig) -> Self {
        match cfg.quantization {
            Some(Quantization::Fp8(_)) => WeightsDtype::Fp8,
            Some(Quantization::Int4(_)) => WeightsDtype::Int4,
            None => WeightsDtype::Bf16,
        }
    }

    /// What a role's `--weights-dtype` asks the plan to count: `auto` the checkpoint's own,
    /// `bf16` bf16, `fp8`/`int4` those (quantised at load where stored otherwise).
    pub fn of_flag(flag: moemesh_engine::ExpertsDtype, cfg: &ModelConfig) -> Self {
        match flag {
            moemesh_engine::ExpertsDtype::Auto => Self::of_config(cfg),
            moemesh_engine::ExpertsDtype::Compute => WeightsDtype::Bf16,
            moemesh_engine::ExpertsDtype::Fp8 => WeightsDtype::Fp8,
            moemesh_engine::ExpertsDtype::Int4 => WeightsDtype::Int4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightsDtype::Bf16 => "bf16",
            WeightsDtype::Fp8 => "fp8",
            WeightsDtype::Int4 => "int4",
        }
    }
}

/// How a dtype lays the quantised projections out (block and group sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    pub dtype: WeightsDtype,
    /// FP8 scale block `[rows, cols]`.
    pub fp8_block: (usize, usize),
    /// INT4 input rows per scale/zero group.
    pub int4_group: usize,
    /// Whether INT4 projections are dequantised at load (GPTQ in activation order): bf16.
    pub int4_dequantised: bool,
    /// Whether INT4 stores zero points (not a symmetric compressed-tensors checkpoint).
    pub int4_zeros: bool,
}

impl Scheme {
    /// `dtype` with the config's own block or group size where the checkpoint is quantised that
    /// way, else the defaults (128 × 128 blocks; INT4 groups of 128, symmetric, as
    /// `--weights-dtype int4` quantises at load).
    pub fn new(dtype: WeightsDtype, cfg: &ModelConfig) -> Self {
        let mut s = Scheme {
            dtype,
            fp8_block: (DEFAULT_FP8_BLOCK, DEFAULT_FP8_BLOCK),
            int4_group: DEFAULT_INT4_GROUP,
            int4_dequantised: false,
            int4_zeros: false,
        };
        match cfg.quantization {
            Some(Quantization::Fp8(q)) => s.fp8_block = (q.block_rows, q.block_cols),
            Some(Quantization::Int4(q)) => {
                s.int4_group = q.group_size.unwrap_or(cfg.hidden_size.max(1));
                s.int4_dequantised = matches!(q.format, Int4Format::Gptq { desc_act: true, .. });
                s.int4_zeros =
                    !matches!(q.format, Int4Format::CompressedTensors { symmetric: true });
            }
            None => {}
        }
        s
    }

    /// What one checkpoint tensor takes, by storage dtype.
    fn tensor_bytes(&self, name: &str, shape: &[usize]) -> Vec<(&'static str, u64)> {
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        if name.ends_with(".mlp.gate.weight") || name.ends_with(".e_score_correction_bias") {
            return vec![("f32", 4 * n)];
        }
        // The linear projections: every 2-D weight but the embeddings, lm_head and the router
        // (the norms are 1-D).
        let projection = name.ends_with(".weight")
            && name != "model.embed_tokens.weight"
            && name != "lm_head.weight";
        let (&[rows, cols], true) = (shape, projection) else {
            return vec![("bf16", 2 * n)];
        };
        let (rows, cols) = (rows as u64, cols as u64);
        match self.dtype {
            WeightsDtype::Bf16 => vec![("bf16", 2 * n)],
            WeightsDtype::Fp8 => {
                let (br, bc) = (self.fp8_block.0 as u64, self.fp8_block.1 as u64);
                vec![
                    ("fp8_e4m3", n),
                    (
                        "f32_block_scales",
                        4 * rows.div_ceil(br) * cols.div_ceil(bc),
                    ),
                ]
            }
            WeightsDtype::Int4 if self.int4_dequantised => vec![("bf16", 2 * n)],
            WeightsDtype::Int4 => {
                // A `[out, in]` weight: groups run along the input dimension, a scale (and a
                // zero point) per output row and group.
                let groups = cols.div_ceil(self.int4_group as u64);
                let mut v = vec![
                    ("int4", n.div_ceil(2)),
                    ("f32_group_scales", 4 * groups * rows),
                ];
                if self.int4_zeros {
                    v.push(("u8_zero_points", groups * rows));
                }
                v
            }
        }
    }
}

/// Parameters and bytes of one part of the model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartBytes {
    pub params: u64,
    /// Bytes by storage dtype (`bf16`, `f32`, `fp8_e4m3`, `f32_block_scales`, `int4`, ...).
    pub bytes: BTreeMap<&'static str, u64>,
}

impl PartBytes {
    pub fn total(&self) -> u64 {
        self.bytes.values().sum()
    }

    fn add(&mut self, params: u64, bytes: &[(&'static str, u64)]) {
        self.params += params;
        for &(k, b) in bytes {
            *self.bytes.entry(k).or_default() += b;
        }
    }
}

/// A model's bytes per part under one scheme.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelBytes {
    pub scheme: Scheme,
    /// `model.embed_tokens` (also part of `gate`): what a frontend maps in host memory.
    pub embeddings: PartBytes,
    /// What the gate holds: the embeddings, attention (MLA projections and their norms), dense
    /// MLP layers, shared experts, routers, the final norm and `lm_head`.
    pub gate: PartBytes,
    /// Every routed expert of every MoE layer.
    pub routed_experts: PartBytes,
    /// One routed expert in one MoE layer (its three projections).
    pub expert_layer: PartBytes,
    pub moe_layers: usize,
    pub n_routed_experts: usize,
    /// Bytes one token takes in the latent KV cache over all layers, in bf16
    /// (`(kv_lora_rank + qk_rope_head_dim) × layers × 2`).
    pub kv_bytes_per_token: u64,
}

impl ModelBytes {
    pub fn of(cfg: &ModelConfig, scheme: Scheme) -> Self {
        let moe_layers = cfg.moe_layers();
        let probe = moe_layers
            .first()
            .map(|l| format!("model.layers.{l}.mlp.experts.0."));
        let mut m = ModelBytes {
            scheme,
            embeddings: PartBytes::default(),
            gate: PartBytes::default(),
            routed_experts: PartBytes::default(),
            expert_layer: PartBytes::default(),
            moe_layers: moe_layers.len(),
            n_routed_experts: cfg.n_routed_experts,
            kv_bytes_per_token: (cfg.kv_cache_width() * cfg.num_hidden_layers * 2) as u64,
        };
        for t in checkpoint_layout(cfg) {
            let params: u64 = t.shape.iter().map(|&d| d as u64).product();
            let bytes = scheme.tensor_bytes(&t.name, &t.shape);
            if t.name == "model.embed_tokens.weight" {
                m.embeddings.add(params, &bytes);
                m.gate.add(params, &bytes);
            } else if t.name.contains(".mlp.experts.") {
                m.routed_experts.add(params, &bytes);
                if probe.as_deref().is_some_and(|p| t.name.starts_with(p)) {
                    m.expert_layer.add(params, &bytes);
                }
            } else {
                m.gate.add(params, &bytes);
            }
        }
        m
    }

    /// The bytes under a role's `--weights-dtype` ([`WeightsDtype::of_flag`]).
    pub fn of_flag(cfg: &ModelConfig, flag: moemesh_engine::ExpertsDtype) -> Self {
        Self::of(cfg, Scheme::new(WeightsDtype::of_flag(flag, cfg), cfg))
    }

    pub fn total_params(&self) -> u64 {
        self.gate.params + self.routed_experts.params
    }

    /// Bytes of one routed expert in every MoE layer: what a worker holds per expert.
    pub fn expert_bytes(&self) -> u64 {
        self.expert_layer.total() * self.moe_layers as u64
    }
}

/// Whether the gate's GPU also holds an expert worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GateGpuExperts {
    /// Only when the other GPUs cannot hold the experts (or there is one GPU).
    Auto,
    /// Never: the experts go to the other GPUs.
    No,
    /// Always: GPU 0 runs a worker beside the gate.
    Yes,
}

impl GateGpuExperts {
    /// The flag's value.
    pub fn name(self) -> &'static str {
        match self {
            GateGpuExperts::Auto => "auto",
            GateGpuExperts::No => "no",
            GateGpuExperts::Yes => "yes",
        }
    }
}

/// What a plan is asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanInput {
    pub gpus: usize,
    pub gpu_mem_bytes: u64,
    /// KV cache on the gate's GPU (the gate's `--kv-cache-mb`).
    pub kv_cache_bytes: u64,
    /// Activation/workspace reserve of each process on a GPU.
    pub workspace_bytes: u64,
    pub gate_gpu_experts: GateGpuExperts,
}

/// One expert worker of a plan: a contiguous range of routed experts on one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub gpu: usize,
    pub first_expert: usize,
    pub experts: usize,
}

impl Worker {
    /// The worker's `--experts` value, e.g. `0-36`.
    pub fn experts_flag(&self) -> String {
        let last = self.first_expert + self.experts - 1;
        if self.experts == 1 {
            format!("{}", self.first_expert)
        } else {
            format!("{}-{last}", self.first_expert)
        }
    }
}

/// One GPU of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuUse {
    pub index: usize,
    pub gate: bool,
    /// Index into [`Placement::workers`] of the worker on this GPU.
    pub worker: Option<usize>,
    /// Weights: the gate's and the worker's.
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    /// One workspace reserve per process on the GPU.
    pub workspace_bytes: u64,
    pub budget_bytes: u64,
}

impl GpuUse {
    pub fn total(&self) -> u64 {
        self.weight_bytes + self.kv_bytes + self.workspace_bytes
    }

    pub fn fits(&self) -> bool {
        self.total() <= self.budget_bytes
    }

    /// Bytes left (negative: over the budget).
    pub fn free(&self) -> i128 {
        i128::from(self.budget_bytes) - i128::from(self.total())
    }
}

/// A placement of the model on the GPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Whether GPU 0 runs an expert worker beside the gate.
    pub gate_gpu_experts: bool,
    pub gpus: Vec<GpuUse>,
    pub workers: Vec<Worker>,
}

impl Placement {
    /// Every GPU within its budget.
    pub fn fits(&self) -> bool {
        self.gpus.iter().all(GpuUse::fits)
    }
}

/// Places `model` as [`PlanInput`] asks (see the module's policy). A layout that does not fit
/// is still returned, with the experts spread in proportion to each GPU's room, so that the
/// per-GPU numbers say by how much.
pub fn place(model: &ModelBytes, input: &PlanInput) -> MeshResult<Placement> {
    if input.gpus == 0 {
        return Err(MeshError::Invalid("--gpus must be at least 1".into()));
    }
    if input.gpu_mem_bytes == 0 {
        return Err(MeshError::Invalid(
            "--gpu-mem-gib must be more than 0".into(),
        ));
    }
    if input.gpus == 1 && input.gate_gpu_experts == GateGpuExperts::No {
        return Err(MeshError::Invalid(
            "--gate-gpu-experts no needs --gpus 2 or more (one GPU must hold the experts too)"
                .into(),
        ));
    }
    Ok(match input.gate_gpu_experts {
        GateGpuExperts::No => layout(model, input, false),
        GateGpuExperts::Yes => layout(model, input, true),
        GateGpuExperts::Auto if input.gpus == 1 => layout(model, input, true),
        GateGpuExperts::Auto => {
            let alone = layout(model, input, false);
            if alone.fits() {
                alone
            } else {
                layout(model, input, true)
            }
        }
    })
}

fn layout(model: &ModelBytes, input: &PlanInput, shared: bool) -> Placement {
    let gate_bytes = model.gate.total() + input.kv_cache_bytes + input.workspace_bytes;
    let worker_gpus: Vec<usize> = (usize::from(!shared)..input.gpus).collect();
    // Room for a worker's experts on each of its GPUs.
    let room: Vec<u64> = worker_gpus
        .iter()
        .map(|&g| {
            let taken = input.workspace_bytes + if g == 0 { gate_bytes } else { 0 };
            input.gpu_mem_bytes.saturating_sub(taken)
        })
        .collect();
    let n = model.n_routed_experts as u64;
    let per_expert = model.expert_bytes().max(1);
    let mut caps: Vec<u64> = room.iter().map(|r| r / per_expert).collect();
    if caps.iter().sum::<u64>() < n {
        // Does not fit: spread in proportion to room (evenly when there is none anywhere).
        let total: u64 = room.iter().sum();
        caps = room
            .iter()
            .map(|&r| match total {
                0 => n.div_ceil(room.len().max(1) as u64),
                t => (u128::from(n) * u128::from(r)).div_ceil(u128::from(t)) as u64,
            })
            .collect();
    }
    let counts = water_fill(&caps, n);
    let mut workers = Vec::new();
    let mut gpus: Vec<GpuUse> = (0..input.gpus)
        .map(|index| GpuUse {
            index,
            gate: index == 0,
            worker: None,
            weight_bytes: if index == 0 { model.gate.total() } else { 0 },
            kv_bytes: if index == 0 { input.kv_cache_bytes } else { 0 },
            workspace_bytes: if index == 0 { input.workspace_bytes } else { 0 },
            budget_bytes: input.gpu_mem_bytes,
        })
        .collect();
    let mut next = 0usize;
    for (&g, &count) in worker_gpus.iter().zip(&counts) {
        if count == 0 {
            continue;
        }
        let gpu = &mut gpus[g];
        gpu.worker = Some(workers.len());
        gpu.weight_bytes += count * model.expert_bytes();
        gpu.workspace_bytes += input.workspace_bytes;
        workers.push(Worker {
            gpu: g,
            first_expert: next,
            experts: count as usize,
        });
        next += count as usize;
    }
    Placement {
        gate_gpu_experts: gpus[0].worker.is_some(),
        gpus,
        workers,
    }
}

/// The plan's default KV cache reserve on the gate's GPU and workspace reserve per process, GiB.
pub const DEFAULT_KV_CACHE_GIB: f64 = 8.0;
pub const DEFAULT_WORKSPACE_GIB: f64 = 4.0;

/// The plan's reserves as flags, shared by `moemesh plan`, `moemesh expert --plan-shard` and
/// `moemesh up --expert-workers plan`, so that every process given the same values computes the same
/// placement.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct PlanReserves {
    /// KV cache reserved on the gate's GPU, in GiB (start the gate with the matching
    /// --kv-cache-mb).
    #[arg(long, env = "MOEMESH_PLAN_KV_CACHE_GIB", default_value_t = DEFAULT_KV_CACHE_GIB, value_parser = non_negative_gib)]
    pub kv_cache_gib: f64,
    /// Activation and workspace reserve of each process on a GPU, in GiB (CUDA context, cuBLAS
    /// workspace, a step's activations, CUDA graphs, transport buffers).
    #[arg(long, env = "MOEMESH_PLAN_WORKSPACE_GIB", default_value_t = DEFAULT_WORKSPACE_GIB, value_parser = non_negative_gib)]
    pub workspace_gib: f64,
    /// Whether GPU 0 runs an expert worker beside the gate: auto (only when the other GPUs
    /// cannot hold the experts, or there is one GPU), no, or yes.
    #[arg(long, env = "MOEMESH_PLAN_GATE_GPU_EXPERTS", value_enum, default_value_t = GateGpuExperts::Auto)]
    pub gate_gpu_experts: GateGpuExperts,
}

impl PlanReserves {
    /// The flags' defaults.
    pub fn default_values() -> Self {
        PlanReserves {
            kv_cache_gib: DEFAULT_KV_CACHE_GIB,
            workspace_gib: DEFAULT_WORKSPACE_GIB,
            gate_gpu_experts: GateGpuExperts::Auto,
        }
    }

    /// The flags (`--kv-cache-gib=…` …) of the values that differ from the defaults: what makes
    /// another process (`moemesh expert --plan-shard`) compute the same plan.
    pub fn flags(&self) -> Vec<String> {
        let d = Self::default_values();
        let mut v = Vec::new();
        if self.kv_cache_gib != d.kv_cache_gib {
            v.push(format!("--kv-cache-gib={}", self.kv_cache_gib));
        }
        if self.workspace_gib != d.workspace_gib {
            v.push(format!("--workspace-gib={}", self.workspace_gib));
        }
        if self.gate_gpu_experts != d.gate_gpu_experts {
            v.push(format!(
                "--gate-gpu-experts={}",
                self.gate_gpu_experts.name()
            ));
        }
        v
    }

    /// The plan's input for `gpus` GPUs of `gpu_mem_gib` GiB each.
    pub fn input(&self, gpus: usize, gpu_mem_gib: f64) -> PlanInput {
        PlanInput {
            gpus,
            gpu_mem_bytes: bytes_of_gib(gpu_mem_gib),
            kv_cache_bytes: bytes_of_gib(self.kv_cache_gib),
            workspace_bytes: bytes_of_gib(self.workspace_gib),
            gate_gpu_experts: self.gate_gpu_experts,
        }
    }
}

/// A GiB flag's value: a finite number, 0 or more.
pub fn non_negative_gib(s: &str) -> Result<f64, String> {
    crate::skew::finite_non_negative("GiB", s)
}

/// A GPU memory flag's value: a finite number of GiB, more than 0.
pub fn positive_gib(s: &str) -> Result<f64, String> {
    let v = non_negative_gib(s)?;
    if v == 0.0 {
        return Err("GiB: 0; a GPU needs some memory".into());
    }
    Ok(v)
}

pub fn bytes_of_gib(gib: f64) -> u64 {
    (gib * GIB as f64).round() as u64
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB as f64
}

/// Worker `index` of an `N`-GPU plan, as `moemesh expert --plan-shard INDEX/N` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanShard {
    pub index: usize,
    pub gpus: usize,
}

impl std::str::FromStr for PlanShard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "--plan-shard: {s:?} is not INDEX/GPUS, e.g. 0/8 (worker 0 of the plan on 8 GPUs)"
            )
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let gpus: usize = n.trim().parse().map_err(|_| bad())?;
        if gpus == 0 || gpus > MAX_PLAN_GPUS {
            return Err(format!(
                "--plan-shard: {gpus} GPUs; a plan takes 1 to {MAX_PLAN_GPUS}"
            ));
        }
        if index >= gpus {
            return Err(format!(
                "--plan-shard: worker {index} of a plan on {gpus} GPUs; a plan has at most one \
                 worker per GPU, numbered from 0"
            ));
        }
        Ok(PlanShard { index, gpus })
    }
}

impl std::fmt::Display for PlanShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.gpus)
    }
}

/// The most GPUs a plan takes (`moemesh plan --gpus`).
pub const MAX_PLAN_GPUS: usize = 1024;

impl Placement {
    /// GPU `g`'s processes, e.g. `gate + experts 0-36 (37)`, or `-`.
    pub fn processes(&self, g: &GpuUse) -> String {
        let mut procs = Vec::new();
        if g.gate {
            procs.push("gate".to_string());
        }
        if let Some(w) = g.worker.and_then(|w| self.workers.get(w)) {
            procs.push(format!("experts {} ({})", w.experts_flag(), w.experts));
        }
        if procs.is_empty() {
            "-".to_string()
        } else {
            procs.join(" + ")
        }
    }

    /// The GPUs over their budget, e.g. `GPU 1 needs 150.20 GiB of 139.80, GPU 2 …`.
    pub fn overflow(&self) -> String {
        self.gpus
            .iter()
            .filter(|g| !g.fits())
            .map(|g| {
                format!(
                    "GPU {} needs {:.2} GiB of {:.2}",
                    g.index,
                    gib(g.total()),
                    gib(g.budget_bytes)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The worker `shard` names in the plan of `model` on `shard.gpus` GPUs (the rest of the plan's
/// input as `input` gives it): what an expert worker started with `--plan-shard` serves. Refuses a
/// plan that does not fit (naming the GPUs over budget) and an index past the plan's workers.
pub fn shard_of_plan(
    model: &ModelBytes,
    input: &PlanInput,
    shard: PlanShard,
) -> MeshResult<Worker> {
    let plan = place(model, input)?;
    let what = format!(
        "--plan-shard {shard}: the plan on {} × {:.2} GiB (`moemesh plan --gpus {} --gpu-mem-gib \
         {:.2}` prints it)",
        input.gpus,
        gib(input.gpu_mem_bytes),
        input.gpus,
        gib(input.gpu_mem_bytes)
    );
    if !plan.fits() {
        return Err(MeshError::Invalid(format!(
            "{what} does not fit: {}",
            plan.overflow()
        )));
    }
    plan.workers.get(shard.index).cloned().ok_or_else(|| {
        MeshError::Invalid(format!(
            "{what} has {} expert worker(s), numbered 0 to {}; there is no worker {}",
            plan.workers.len(),
            plan.workers.len().saturating_sub(1),
            shard.index
        ))
    })
}

/// `n` items over bins of capacity `caps` (whose sum is at least `n`), as evenly as the
/// capacities allow: the smallest level `t` with `Σ min(cap, t) ≥ n`, then the surplus taken
/// back one item each from the last bins at that level.
fn water_fill(caps: &[u64], n: u64) -> Vec<u64> {
    let max = caps.iter().copied().max().unwrap_or(0);
    let filled = |t: u64| caps.iter().map(|&c| c.min(t)).sum::<u64>();
    // `filled` grows with t and reaches at least n at t = max: bisect for the smallest level.
    let (mut lo, mut hi) = (0u64, max);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if filled(mid) >= n {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let mut counts: Vec<u64> = caps.iter().map(|&c| c.min(lo)).collect();
    let mut surplus = filled(lo).saturating_sub(n);
    for c in counts.iter_mut().rev() {
        if surplus == 0 {
            break;
        }
        if *c == lo && lo > 0 {
            *c -= 1;
            surplus -= 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use moemesh_engine::config::RawConfig;

    fn r1() -> ModelConfig {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/deepseek-r1/config.json"
        );
        ModelConfig::from_file(std::path::Path::new(path)).expect("the R1 config parses")
    }

    // DeepSeek-R1 by hand. Per decoder layer (hidden 7168, 128 heads, q_lora 1536, kv_lora 512,
    // qk_nope 128, qk_rope 64, v 128):
    const Q_A: u64 = 1536 * 7168; // q_a_proj
    const Q_B: u64 = 128 * (128 + 64) * 1536; // q_b_proj
    const KV_A: u64 = (512 + 64) * 7168; // kv_a_proj_with_mqa
    const KV_B: u64 = 128 * (128 + 128) * 512; // kv_b_proj
    const O: u64 = 7168 * 128 * 128; // o_proj
    const ATTN_NORMS: u64 = 1536 + 512; // q_a_layernorm, kv_a_layernorm
    const LAYER_NORMS: u64 = 2 * 7168; // input_ and post_attention_layernorm
    const DENSE_MLP: u64 = 3 * 7168 * 18432;
    const EXPERT: u64 = 3 * 7168 * 2048; // gate_, up_, down_proj of one expert
    const ROUTER: u64 = 256 * 7168 + 256; // mlp.gate.weight + e_score_correction_bias
    const VOCAB: u64 = 129280 * 7168;
    const ATTN: u64 = Q_A + Q_B + KV_A + KV_B + O;

    #[test]
    fn r1_has_671_billion_parameters() {
        let m = ModelBytes::of(&r1(), Scheme::new(WeightsDtype::Bf16, &r1()));
        let layer = ATTN + ATTN_NORMS + LAYER_NORMS;
        let expected_total = 3 * (layer + DENSE_MLP)
            + 58 * (layer + 257 * EXPERT + ROUTER)
            + 2 * VOCAB // embed_tokens + lm_head
            + 7168; // model.norm
        assert_eq!(m.total_params(), expected_total);
        assert_eq!(expected_total, 671_026_419_200);
        // DeepSeek publishes 671 B for the main model (the MTP layer 61, 14 B more in the
        // checkpoint, is not counted: moemesh does not load it). Within 0.1 %:
        let off = (m.total_params() as f64 - 671e9).abs() / 671e9;
        assert!(off < 1e-3, "{} is {off} off", m.total_params());
        assert_eq!(m.routed_experts.params, 58 * 256 * EXPERT);
        assert_eq!(m.embeddings.params, VOCAB);
        assert_eq!(m.moe_layers, 58);
    }

    /// FP8 bytes of a `[rows, cols]` projection: e4m3 values and an f32 per 128 × 128 block.
    fn fp8(rows: u64, cols: u64) -> u64 {
        rows * cols + 4 * rows.div_ceil(128) * cols.div_ceil(128)
    }

    fn input(gpus: usize, gib: u64) -> PlanInput {
        PlanInput {
            gpus,
            gpu_mem_bytes: gib * GIB,
            kv_cache_bytes: 8 * GIB,
            workspace_bytes: 4 * GIB,
            gate_gpu_experts: GateGpuExperts::Auto,
        }
    }

    #[test]
    fn r1_fp8_fits_on_eight_141_gib_gpus_with_the_gate_alone_on_gpu_0() {
        let cfg = r1();
        assert_eq!(WeightsDtype::of_config(&cfg), WeightsDtype::Fp8);
        let m = ModelBytes::of(&cfg, Scheme::new(WeightsDtype::Fp8, &cfg));
        // One expert in one layer: gate_ and up_proj [2048, 7168], down_proj [7168, 2048].
        let expert_layer = 2 * fp8(2048, 7168) + fp8(7168, 2048);
        assert_eq!(expert_layer, 44_050_944);
        assert_eq!(m.expert_layer.total(), expert_layer);
        let per_expert = 58 * expert_layer;
        // The gate: FP8 projections, bf16 norms and lm_head, f32 router.
        let attn = fp8(1536, 7168)
            + fp8(128 * 192, 1536)
            + fp8(576, 7168)
            + fp8(128 * 256, 512)
            + fp8(7168, 128 * 128)
            + 2 * (ATTN_NORMS + LAYER_NORMS);
        let dense = 2 * fp8(18432, 7168) + fp8(7168, 18432);
        // Embeddings, lm_head and the final norm in bf16.
        let gate =
            3 * (attn + dense) + 58 * (attn + expert_layer + 4 * ROUTER) + 2 * (2 * VOCAB + 7168);
        assert_eq!(m.gate.total(), gate);
        assert_eq!(gate, 19_295_056_224);

        let p = place(&m, &input(8, 141)).expect("plan");
        assert!(p.fits());
        assert!(!p.gate_gpu_experts);
        // GPU 0: the gate, the KV cache and one workspace.
        assert_eq!(p.gpus[0].total(), gate + 8 * GIB + 4 * GIB);
        // 256 experts over 7 workers: 37, 37, 37, 37, 36, 36, 36, in contiguous ranges.
        let counts: Vec<usize> = p.workers.iter().map(|w| w.experts).collect();
        assert_eq!(counts, [37, 37, 37, 37, 36, 36, 36]);
        let flags: Vec<String> = p.workers.iter().map(Worker::experts_flag).collect();
        assert_eq!(
            flags,
            [
                "0-36", "37-73", "74-110", "111-147", "148-183", "184-219", "220-255"
            ]
        );
        assert_eq!(p.gpus[1].total(), 37 * per_expert + 4 * GIB);
        assert_eq!(p.gpus[1].total(), 98_828_293_120); // 92.04 GiB of 141
        assert_eq!(p.gpus[7].total(), 36 * per_expert + 4 * GIB);
        // And on 8 × 80 GiB (H100) it does not: 609 GiB of experts over 7 × 76 GiB of room.
        let h100 = place(&m, &input(8, 80)).expect("plan");
        assert!(!h100.fits());
        assert!(h100.gate_gpu_experts, "auto tries the gate's GPU as well");
        assert_eq!(h100.workers.iter().map(|w| w.experts).sum::<usize>(), 256);
    }

    #[test]
    fn r1_bf16_does_not_fit_on_eight_141_gib_gpus() {
        let cfg = r1();
        let m = ModelBytes::of(&cfg, Scheme::new(WeightsDtype::Bf16, &cfg));
        let per_expert = 58 * 2 * EXPERT;
        assert_eq!(m.expert_bytes(), per_expert);
        // The routed experts alone exceed the host: 1,307.8 GB against 8 × 141 GiB = 1,211.2 GB.
        assert_eq!(m.routed_experts.total(), 256 * per_expert);
        assert!(m.routed_experts.total() > 8 * 141 * GIB);
        let p = place(&m, &input(8, 141)).expect("plan");
        assert!(!p.fits());
        // Auto fell back to a worker beside the gate; every expert is still placed once.
        assert!(p.gate_gpu_experts);
        assert_eq!(p.workers.iter().map(|w| w.experts).sum::<usize>(), 256);
        assert!(p.gpus.iter().skip(1).all(|g| !g.fits()));
    }

    /// R1's config with `quantization_config` replaced by `q`.
    fn r1_quantised(q: serde_json::Value) -> ModelConfig {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/deepseek-r1/config.json"
        );
        let text = std::fs::read_to_string(path).expect("the R1 config");
        let mut raw: serde_json::Value = serde_json::from_str(&text).expect("r1 config json");
        raw["quantization_config"] = q;
        let raw: RawConfig = serde_json::from_value(raw).expect("raw");
        ModelConfig::from_raw(&raw).expect("config")
    }

    #[test]
    fn int4_counts_the_gpus_layout_nibbles_f32_scales_and_zero_points_where_stored() {
        // `--weights-dtype int4` on R1's FP8 checkpoint quantises at load: symmetric, groups of
        // 128 input columns, an f32 scale per output row and group, no zero points.
        // [out, in] = [2048, 7168]: 56 groups; [7168, 2048]: 16 groups.
        let cfg = r1();
        let m = ModelBytes::of(&cfg, Scheme::new(WeightsDtype::Int4, &cfg));
        let proj = |out: u64, inp: u64| out * inp / 2 + inp / 128 * out * 4;
        assert_eq!(
            m.expert_layer.total(),
            2 * proj(2048, 7168) + proj(7168, 2048)
        );
        let p = place(&m, &input(8, 80)).expect("plan");
        assert!(p.fits(), "R1 in INT4 fits 8 × 80 GiB");

        // A symmetric compressed-tensors checkpoint (RedHatAI's R1 w4a16): the same bytes.
        let ct = r1_quantised(serde_json::json!({
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
                "group_size": 128}}}
        }));
        let scheme = Scheme::new(WeightsDtype::of_config(&ct), &ct);
        assert_eq!(scheme.dtype, WeightsDtype::Int4);
        assert_eq!(
            ModelBytes::of(&ct, scheme).expert_layer.total(),
            m.expert_layer.total()
        );

        // GPTQ (v1, groups of 64) is asymmetric: a u8 zero point per output row and group
        // besides each scale; its `g_idx` and packed words are repacked away at load.
        let gptq = r1_quantised(serde_json::json!({
            "quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": false, "sym": false
        }));
        let m = ModelBytes::of(&gptq, Scheme::new(WeightsDtype::of_config(&gptq), &gptq));
        let proj = |out: u64, inp: u64| out * inp / 2 + inp / 64 * out * (4 + 1);
        assert_eq!(
            m.expert_layer.total(),
            2 * proj(2048, 7168) + proj(7168, 2048)
        );
        // In activation order its layers are dequantised at load: bf16.
        let act = r1_quantised(serde_json::json!({
            "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": true, "sym": false
        }));
        let m = ModelBytes::of(&act, Scheme::new(WeightsDtype::of_config(&act), &act));
        assert_eq!(m.expert_layer.total(), 2 * 3 * 2048 * 7168);
    }

    #[test]
    fn one_gpu_shares_it_and_bad_inputs_are_refused() {
        let raw: RawConfig = serde_json::from_value(
            moemesh_engine::synthetic::synthetic_config_json("v2-lite").expect("json"),
        )
        .expect("raw");
        let cfg = ModelConfig::from_raw(&raw).expect("config");
        let m = ModelBytes::of(&cfg, Scheme::new(WeightsDtype::Bf16, &cfg));
        let p = place(&m, &input(1, 80)).expect("plan");
        assert!(p.fits());
        assert_eq!(p.workers.len(), 1);
        assert_eq!(p.workers[0].experts_flag(), "0-63");
        assert_eq!(
            p.gpus[0].total(),
            m.gate.total() + 64 * m.expert_bytes() + 8 * GIB + 2 * 4 * GIB
        );
        let mut bad = input(1, 80);
        bad.gate_gpu_experts = GateGpuExperts::No;
        let err = place(&m, &bad).expect_err("no GPU for experts").to_string();
        assert!(err.contains("--gate-gpu-experts"), "{err}");
        let err = place(&m, &input(0, 80)).expect_err("no GPUs").to_string();
        assert!(err.contains("--gpus must be at least 1"), "{err}");
    }

    #[test]
    fn a_plan_shard_is_its_workers_range_and_refused_past_them_or_when_over_budget() {
        let cfg = r1();
        let m = ModelBytes::of(&cfg, Scheme::new(WeightsDtype::Fp8, &cfg));
        let shard = |s: &str, gib: u64| {
            let s: PlanShard = s.parse().expect("a shard");
            shard_of_plan(&m, &input(s.gpus, gib), s)
        };
        // Each index is the plan's worker of that index (the gate's GPU 0 holds none).
        let w = shard("0/8", 141).expect("fits");
        assert_eq!((w.gpu, w.experts_flag()), (1, "0-36".to_string()));
        let w = shard("6/8", 141).expect("fits");
        assert_eq!((w.gpu, w.experts_flag()), (7, "220-255".to_string()));
        let err = shard("7/8", 141).expect_err("7 workers").to_string();
        assert!(
            err.contains("--plan-shard 7/8")
                && err.contains("has 7 expert worker(s), numbered 0 to 6"),
            "{err}"
        );
        // On 8 × 80 GiB the plan does not fit: every worker refuses it, naming the GPUs over.
        let err = shard("0/8", 80).expect_err("over").to_string();
        assert!(
            err.contains("does not fit") && err.contains("GPU 0 needs") && err.contains("of 80.00"),
            "{err}"
        );
        assert_eq!(
            "3/8".parse::<PlanShard>().map(|s| s.to_string()),
            Ok("3/8".into())
        );
        for bad in ["8/8", "0/0", "1", "a/2", "0/1025", "-1/2"] {
            let err = bad.parse::<PlanShard>().expect_err(bad);
            assert!(err.starts_with("--plan-shard: "), "{bad}: {err}");
        }
    }

    #[test]
    fn the_reserve_flags_default_to_the_constants_and_make_the_input() {
        let r = PlanReserves::default_values();
        let i = r.input(8, 139.8);
        assert_eq!(i.kv_cache_bytes, 8 * GIB);
        assert_eq!(i.workspace_bytes, 4 * GIB);
        assert_eq!(i.gpu_mem_bytes, (139.8 * GIB as f64).round() as u64);
        assert_eq!(i.gate_gpu_experts, GateGpuExperts::Auto);
        assert_eq!(
            WeightsDtype::of_flag(moemesh_engine::ExpertsDtype::Auto, &r1()),
            WeightsDtype::Fp8
        );
        assert_eq!(
            WeightsDtype::of_flag(moemesh_engine::ExpertsDtype::Compute, &r1()),
            WeightsDtype::Bf16
        );
    }

    #[test]
    fn water_fill_is_even_within_capacities() {
        assert_eq!(water_fill(&[57; 7], 256), [37, 37, 37, 37, 36, 36, 36]);
        assert_eq!(water_fill(&[10, 100, 100], 100), [10, 45, 45]);
        assert_eq!(water_fill(&[0, 5, 5], 9), [0, 5, 4]);
    }
}
