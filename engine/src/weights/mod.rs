//! Where a model's named tensors come from, and how they become compute-ready candle tensors.
//!
//! Model code asks a [`Loader`] for a tensor by its checkpoint name and the shape it expects; the
//! loader fetches raw data from a [`TensorSource`] (memory-mapped safetensors files, or tensors
//! built in memory for the embedded default model), dequantises FP8 blocks, checks the shape, and
//! converts to the compute dtype on the target device. Each role loads only the tensors it needs
//! (the gate skips routed experts, a worker loads only its experts), so nothing reads a tensor
//! until it is asked for.

pub mod fp8;
pub mod int4;
pub mod memory;
pub mod safetensors;

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use crate::config::{Fp8Quant, Int4Format, Int4Quant, ModelConfig, Quantization};
use crate::error::{EngineError, Result};

/// A tensor's element type as stored in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
    F8E4M3,
    /// Packed INT4 words, zero points and GPTQ's `g_idx`; never a weight on its own.
    I32,
    Other(&'static str),
}

impl StoredDtype {
    /// Bytes per element (0 for a dtype moemesh does not read).
    fn size(self) -> u64 {
        match self {
            StoredDtype::F32 | StoredDtype::I32 => 4,
            StoredDtype::F16 | StoredDtype::BF16 => 2,
            StoredDtype::F8E4M3 => 1,
            StoredDtype::Other(_) => 0,
        }
    }
}

/// What a [`Loader`] handed out: the bytes this process holds for its weights, by the dtype it
/// holds them in, and what they took in the checkpoint, by stored format. A role logs it once at
/// start (its memory plan line); the gate and expert Info report the resident total.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadedBytes {
    /// Bytes of the tensors handed out, by their dtype after conversion (`bf16`, `f32`, ...):
    /// what the weights take on the device.
    pub resident: BTreeMap<&'static str, u64>,
    /// Bytes those tensors take in the checkpoint, by stored format (`fp8_e4m3` counts the
    /// e4m3 bytes and their block scales, `int4` the packed words, zeros, scales and `g_idx`).
    pub checkpoint: BTreeMap<&'static str, u64>,
    /// Tensors handed out.
    pub tensors: usize,
}

impl LoadedBytes {
    /// All resident bytes.
    pub fn resident_total(&self) -> u64 {
        self.resident.values().sum()
    }

    /// All checkpoint bytes.
    pub fn checkpoint_total(&self) -> u64 {
        self.checkpoint.values().sum()
    }

    /// `dtype=bytes` pairs, e.g. `bf16=1073741824 f32=4096`, for a log line.
    pub fn describe(map: &BTreeMap<&'static str, u64>) -> String {
        map.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The weight format of a checkpoint, as ModelInfo reports it: the quantisation's label
/// (`fp8_e4m3`, `int4_gptq`, `int4_awq`), else the stored dtype of the output projection (or the
/// embedding table), e.g. `bf16`.
pub fn checkpoint_format(cfg: &ModelConfig, source: &dyn TensorSource) -> String {
    if let Some(q) = cfg.quantization {
        return q.label().to_string();
    }
    let stored = ["lm_head.weight", "model.embed_tokens.weight"]
        .iter()
        .find_map(|n| source.raw(n).ok().flatten().map(|r| r.dtype));
    match stored {
        Some(StoredDtype::BF16) => "bf16",
        Some(StoredDtype::F16) => "f16",
        Some(StoredDtype::F32) => "f32",
        Some(StoredDtype::F8E4M3) => "fp8_e4m3",
        Some(StoredDtype::I32) => "i32",
        Some(StoredDtype::Other(d)) => d,
        None => "unknown",
    }
    .to_string()
}

/// How a process holds the routed experts (`--weights-dtype`, env `MOEMESH_WEIGHTS_DTYPE`), and
/// with FP8 the shared experts too ([`Loader::get_shared_expert`]). Everything else (attention,
/// dense MLPs, embeddings, `lm_head`) is held in the compute dtype, except that
/// `MOEMESH_DENSE_FP8=1` keeps the dense projections as FP8 experts are
/// ([`Loader::dense_fp8`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertsDtype {
    /// The checkpoint's own: an FP8 checkpoint's experts (128 × 128 blocks) stay e4m3 where the
    /// FP8 kernels run (a CUDA device computing in bf16), a compressed-tensors INT4 checkpoint's
    /// stay INT4 where the INT4 kernels run; elsewhere, and for other checkpoints, the compute
    /// dtype.
    #[default]
    Auto,
    /// `bf16`: dequantised to the compute dtype at load, as every weight (the earlier behaviour).
    Compute,
    /// `fp8`: e4m3 with 128 × 128 f32 block scales; weights stored otherwise (a bf16 checkpoint,
    /// a synthetic model) are quantised at load ([`fp8::quantize_e4m3`]). Where the FP8 kernels
    /// do not run, those quantised values are dequantised again, so every device computes the
    /// same model.
    Fp8,
    /// `int4`: 4-bit integers with one f32 scale per group of input columns, compressed-tensors'
    /// layout ([`int4::Int4Tensor`]); weights stored otherwise are quantised at load
    /// ([`int4::Int4Tensor::quantize`], round-to-nearest, symmetric, groups of
    /// [`int4::QUANT_GROUP`]); a compressed-tensors INT4 checkpoint's experts are its own. Kept
    /// so where the INT4 expert kernels run (a CUDA device computing in bf16,
    /// [`Loader::experts_int4`]); elsewhere those values are dequantised to the compute dtype,
    /// so every device computes the same INT4 model.
    Int4,
}

impl ExpertsDtype {
    /// The flag's value.
    pub fn name(self) -> &'static str {
        match self {
            ExpertsDtype::Auto => "auto",
            ExpertsDtype::Compute => "bf16",
            ExpertsDtype::Fp8 => "fp8",
            ExpertsDtype::Int4 => "int4",
        }
    }

    /// What ModelInfo's weights format adds for experts quantised at load from a checkpoint of
    /// format `stored` (`+fp8_experts`, `+int4_experts`), or nothing.
    pub fn format_suffix(self, stored: &str) -> Option<&'static str> {
        match self {
            ExpertsDtype::Fp8 if stored != "fp8_e4m3" => Some("+fp8_experts"),
            ExpertsDtype::Int4 if !stored.starts_with("int4_") => Some("+int4_experts"),
            _ => None,
        }
    }
}

impl std::str::FromStr for ExpertsDtype {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(ExpertsDtype::Auto),
            "bf16" | "compute" => Ok(ExpertsDtype::Compute),
            "fp8" => Ok(ExpertsDtype::Fp8),
            "int4" => Ok(ExpertsDtype::Int4),
            other => Err(EngineError::InvalidInput(format!(
                "weights dtype {other:?}: expected auto, bf16 (the compute dtype), fp8 or int4"
            ))),
        }
    }
}

impl std::fmt::Display for ExpertsDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An INT4 layer as read: in [`int4::Int4Tensor`]'s layout, or dequantised (f32 `[out, in]` on
/// the host).
enum Int4Layer {
    Packed(int4::Int4Tensor),
    Values(Tensor),
}

/// A routed expert's projection as [`Loader::get_expert`] hands it out.
pub enum ExpertTensor {
    /// In the compute dtype.
    Dense(Tensor),
    /// `q [R, C]` e4m3 and `scale [⌈R/128⌉, ⌈C/128⌉]` f32 (`weight_scale_inv`), on the device.
    Fp8 { q: Tensor, scale: Tensor },
    /// INT4 in compressed-tensors' layout, on the device (routed experts under
    /// [`Loader::experts_int4`] only).
    Int4(int4::Int4Tensor),
}

/// A stored tensor before conversion: its bytes are borrowed from the source (e.g. an mmap).
pub struct RawTensor<'a> {
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    pub data: RawData<'a>,
}

pub enum RawData<'a> {
    /// Little-endian bytes as in a safetensors file.
    Bytes(&'a [u8]),
    /// A tensor that already lives in memory (embedded model).
    Tensor(Tensor),
    /// Random normal values drawn on the loading device, seeded per tensor (synthetic benchmark
    /// models, too large to generate on the host).
    Random { mean: f32, std: f32, seed: u64 },
}

/// A set of named tensors.
pub trait TensorSource: Send + Sync {
    /// The stored tensor called `name`, or `None` when the source has no such tensor.
    fn raw(&self, name: &str) -> Result<Option<RawTensor<'_>>>;
    /// Every tensor name the source holds.
    fn names(&self) -> Vec<String>;
    /// A stable digest of what the source holds (names, shapes, dtypes, and data), used in the
    /// model fingerprint that keeps workers of different models apart.
    fn digest(&self) -> Vec<u8>;
}

/// Fetches tensors by name, converts them for compute, and remembers which names were used.
pub struct Loader<'s> {
    source: &'s dyn TensorSource,
    device: Device,
    dtype: DType,
    quant: Option<Quantization>,
    /// How the routed experts are held ([`get_expert`](Self::get_expert)).
    experts_dtype: ExpertsDtype,
    used: Mutex<HashSet<String>>,
    /// What was handed out so far (see [`LoadedBytes`]).
    loaded: Mutex<LoadedBytes>,
}

/// `N(mean, std²)` values of `shape` on `device`, the same for the same seed on the same kind of
/// device (a GPU draws with its own generator; candle's CPU generator cannot be seeded, so the
/// CPU draws from a seeded ChaCha stream).
fn random_normal(
    mean: f32,
    std: f32,
    seed: u64,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    if device.is_cpu() {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let normal = rand_distr::Normal::new(mean, std)
            .map_err(|e| EngineError::InvalidInput(format!("random tensor with std {std}: {e}")))?;
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        return Ok(Tensor::from_vec(values, shape, device)?);
    }
    device.set_seed(seed)?;
    Ok(Tensor::randn(mean, std, shape, device)?)
}

impl<'s> Loader<'s> {
    pub fn new(
        source: &'s dyn TensorSource,
        cfg: &ModelConfig,
        device: &Device,
        dtype: DType,
    ) -> Self {
        Loader {
            source,
            device: device.clone(),
            dtype,
            quant: cfg.quantization,
            experts_dtype: ExpertsDtype::Auto,
            used: Mutex::new(HashSet::new()),
            loaded: Mutex::new(LoadedBytes::default()),
        }
    }

    /// The loader with routed experts held as `experts` says.
    pub fn with_experts_dtype(mut self, experts: ExpertsDtype) -> Self {
        self.experts_dtype = experts;
        self
    }

    /// The bytes handed out so far, resident and as stored.
    pub fn loaded_bytes(&self) -> LoadedBytes {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn count(&self, tensor: &Tensor, stored_format: &'static str, stored_bytes: u64) {
        let mut l = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64;
        *l.resident.entry(tensor.dtype().as_str()).or_default() += bytes;
        *l.checkpoint.entry(stored_format).or_default() += stored_bytes;
        l.tensors += 1;
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The tensor `name` in the compute dtype, checked against `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// The tensor `name` in f32 whatever the compute dtype (router weights and biases, which
    /// transformers also evaluates in f32).
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, DType::F32)
    }

    /// Whether the source has a tensor called `name` (for optional tensors such as biases),
    /// counting an INT4 layer's `<layer>.qweight` (`<layer>.weight_packed`) as its
    /// `<layer>.weight`.
    pub fn contains(&self, name: &str) -> Result<bool> {
        if self.source.raw(name)?.is_some() {
            return Ok(true);
        }
        match (self.quant, name.strip_suffix(".weight")) {
            (Some(Quantization::Int4(q)), Some(stem)) => Ok(self
                .source
                .raw(&format!("{stem}.{}", int4_packed_name(q)))?
                .is_some()),
            _ => Ok(false),
        }
    }

    fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (tensor, format, stored_bytes) = self.convert(name, shape, dtype)?;
        self.count(&tensor, format, stored_bytes);
        Ok(tensor)
    }

    /// The tensor `name` in `dtype` on the device, not yet counted: with the format it is
    /// counted under and the bytes it took as stored.
    fn convert(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
    ) -> Result<(Tensor, &'static str, u64)> {
        let Some(raw) = self.source.raw(name)? else {
            // An INT4 checkpoint keeps a quantised layer as `<layer>.qweight` (and its zeros,
            // scales, g_idx), or `<layer>.weight_packed` (compressed-tensors), in place of
            // `<layer>.weight`.
            if let (Some(Quantization::Int4(q)), Some(stem)) =
                (self.quant, name.strip_suffix(".weight"))
                && self
                    .source
                    .raw(&format!("{stem}.{}", int4_packed_name(q)))?
                    .is_some()
            {
                let (tensor, stored_bytes) = self.dequantize_int4(stem, shape, q)?;
                let tensor = tensor.to_dtype(dtype)?.to_device(&self.device)?;
                return Ok((tensor, "int4", stored_bytes));
            }
            return Err(EngineError::MissingTensor {
                name: name.to_string(),
                hint: String::new(),
            });
        };
        expect_shape(name, &raw.shape, shape)?;
        self.mark_used(name);
        let elems: u64 = shape.iter().product::<usize>() as u64;
        let (tensor, format, stored_bytes) = match (raw.dtype, raw.data) {
            (d, RawData::Tensor(t)) => (t, stored_label(d), elems * d.size()),
            (_, RawData::Random { mean, std, seed }) => {
                let t = random_normal(mean, std, seed, shape, &self.device)?.to_dtype(dtype)?;
                // Synthetic models stand for bf16 checkpoints.
                return Ok((t, "bf16", elems * 2));
            }
            (StoredDtype::F8E4M3, RawData::Bytes(bytes)) => {
                let (t, scale_bytes) = self.dequantize(name, shape, bytes)?;
                (t, "fp8_e4m3", bytes.len() as u64 + scale_bytes)
            }
            (StoredDtype::F32, RawData::Bytes(b)) => (
                Tensor::from_raw_buffer(b, DType::F32, shape, &Device::Cpu)?,
                "f32",
                b.len() as u64,
            ),
            (StoredDtype::F16, RawData::Bytes(b)) => (
                Tensor::from_raw_buffer(b, DType::F16, shape, &Device::Cpu)?,
                "f16",
                b.len() as u64,
            ),
            (StoredDtype::BF16, RawData::Bytes(b)) => (
                Tensor::from_raw_buffer(b, DType::BF16, shape, &Device::Cpu)?,
                "bf16",
                b.len() as u64,
            ),
            (StoredDtype::I32, _) => {
                return Err(EngineError::TensorDtype {
                    name: name.to_string(),
                    dtype: "I32".into(),
                    expected: "a floating-point weight (int32 tensors are INT4 packing)".into(),
                });
            }
            (StoredDtype::Other(d), _) => {
                return Err(EngineError::TensorDtype {
                    name: name.to_string(),
                    dtype: d.to_string(),
                    expected: "F32, F16, BF16, F8_E4M3 with weight_scale_inv, or GPTQ/AWQ INT4"
                        .into(),
                });
            }
        };
        let tensor = tensor.to_dtype(dtype)?.to_device(&self.device)?;
        Ok((tensor, format, stored_bytes))
    }

    /// Whether routed experts are held as e4m3 here: the FP8 expert kernels run (a CUDA device,
    /// bf16 compute) and either FP8 was asked for or the checkpoint is FP8 with their 128 × 128
    /// blocks.
    pub fn experts_fp8(&self) -> bool {
        let kernels = self.device.is_cuda() && self.dtype == DType::BF16;
        kernels
            && match self.experts_dtype {
                ExpertsDtype::Compute | ExpertsDtype::Int4 => false,
                ExpertsDtype::Fp8 => true,
                ExpertsDtype::Auto => self.kernel_blocks(),
            }
    }

    /// Whether routed experts are held as INT4 here: the INT4 expert kernels run (a CUDA device,
    /// bf16 compute) and either INT4 was asked for or the checkpoint is INT4 (compressed-tensors
    /// layers kept as stored, GPTQ and AWQ ones repacked into that layout; a GPTQ layer with an
    /// act-order permutation is dequantised).
    pub fn experts_int4(&self) -> bool {
        let kernels = self.device.is_cuda() && self.dtype == DType::BF16;
        kernels
            && match self.experts_dtype {
                ExpertsDtype::Int4 => true,
                ExpertsDtype::Auto => self.int4_checkpoint().is_some(),
                ExpertsDtype::Compute | ExpertsDtype::Fp8 => false,
            }
    }

    /// The checkpoint's INT4 quantisation, if it is INT4.
    fn int4_checkpoint(&self) -> Option<Int4Quant> {
        match self.quant {
            Some(Quantization::Int4(q)) => Some(q),
            _ => None,
        }
    }

    /// Whether the dense projections (attention's `q`/`kv_a`/`o` projections, the dense MLPs'
    /// gate/up/down; not `kv_b_proj`, `lm_head`, embeddings, norms or the router; the shared
    /// experts are FP8 with the routed ones anyway, [`get_shared_expert`](Self::get_shared_expert))
    /// are held as the routed experts are: e4m3 where [`experts_fp8`](Self::experts_fp8), when
    /// `MOEMESH_DENSE_FP8=1` (read once; off by default). Half their memory, decoded at batch
    /// ≤ 8 by dense.cu's FP8 kernel (no faster than bf16's there), but a larger product
    /// dequantises the weight first, which costs 4% at batch 64 on an H200
    /// (docs/BENCHMARKS.md, 2026-11-28) until an FP8 GEMM takes those.
    pub fn dense_fp8(&self) -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        self.experts_fp8()
            && *ON.get_or_init(|| {
                std::env::var("MOEMESH_DENSE_FP8")
                    .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "on"))
            })
    }

    /// A dense projection `name` of `shape` (`[out, in]`): e4m3 with block scales where
    /// [`dense_fp8`](Self::dense_fp8) (by [`get_expert`](Self::get_expert)'s rules), else in the
    /// compute dtype.
    pub fn get_projection(&self, name: &str, shape: &[usize]) -> Result<ExpertTensor> {
        if self.dense_fp8() {
            return self.get_expert(name, shape);
        }
        Ok(ExpertTensor::Dense(self.get(name, shape)?))
    }

    /// A shared expert's projection `name` of `shape` (`[out, in]`): as the routed experts are
    /// held where those are FP8 (`--weights-dtype fp8`, or an FP8 checkpoint on the GPU), so that
    /// a shared expert is the same FP8 MLP as a routed one: e4m3 with block scales where the FP8
    /// kernels run, the quantised values dequantised again elsewhere. Otherwise as
    /// [`get_projection`](Self::get_projection) (INT4 models keep their shared experts in the
    /// compute dtype: no INT4 dense kernel reads them).
    pub fn get_shared_expert(&self, name: &str, shape: &[usize]) -> Result<ExpertTensor> {
        if self.experts_fp8() || self.experts_dtype == ExpertsDtype::Fp8 {
            return self.get_expert(name, shape);
        }
        self.get_projection(name, shape)
    }

    /// Whether the checkpoint is FP8 in the blocks the FP8 kernels read.
    fn kernel_blocks(&self) -> bool {
        matches!(self.quant, Some(Quantization::Fp8(q))
            if q.block_rows == fp8::KERNEL_BLOCK && q.block_cols == fp8::KERNEL_BLOCK)
    }

    /// A routed expert's projection `name` of `shape` (`[out, in]`), as this process holds it
    /// (see [`ExpertsDtype`]): e4m3 with block scales when [`experts_fp8`](Self::experts_fp8)
    /// (stored e4m3 bytes as they are; other weights quantised), else in the compute dtype —
    /// for [`ExpertsDtype::Fp8`] then the quantised values dequantised again, so that every
    /// device computes the same FP8 model.
    pub fn get_expert(&self, name: &str, shape: &[usize]) -> Result<ExpertTensor> {
        let fp8 = self.experts_fp8();
        let stored_fp8 = self.kernel_blocks()
            && self
                .source
                .raw(name)?
                .is_some_and(|r| r.dtype == StoredDtype::F8E4M3);
        if stored_fp8 && fp8 {
            return self.fp8_as_stored(name, shape);
        }
        if self.experts_dtype == ExpertsDtype::Int4 || self.experts_int4() {
            return self.int4_expert(name, shape);
        }
        if self.experts_dtype != ExpertsDtype::Fp8 || stored_fp8 {
            return Ok(ExpertTensor::Dense(self.get(name, shape)?));
        }
        // Quantised here: drawn or read in f32 on the device, then e4m3 with 128 × 128 scales
        // (counted under the format and bytes it had as stored).
        let (w, format, stored) = self.convert(name, shape, DType::F32)?;
        let (q, scale) = fp8::quantize_e4m3(&w)?;
        drop(w);
        if fp8 {
            self.count_fp8(&q, &scale, format, stored);
            return Ok(ExpertTensor::Fp8 { q, scale });
        }
        let t = fp8::dequantize_matrix(&q, &scale, self.dtype)?;
        self.count(&t, format, stored);
        Ok(ExpertTensor::Dense(t))
    }

    /// A routed expert's projection under [`ExpertsDtype::Int4`], or an INT4 checkpoint's under
    /// [`ExpertsDtype::Auto`] where [`experts_int4`](Self::experts_int4): an INT4 checkpoint's
    /// own values ([`read_int4`](Self::read_int4)), else (`Int4` only; `auto` keeps a layer
    /// stored plain as it is) the weights quantised here ([`int4::Int4Tensor::quantize`], drawn
    /// or read in f32 on the device, counted under the format they had as stored). INT4 on the
    /// device where [`experts_int4`](Self::experts_int4), else dequantised to the compute dtype.
    fn int4_expert(&self, name: &str, shape: &[usize]) -> Result<ExpertTensor> {
        let keep = self.experts_int4();
        let stored = match (self.int4_checkpoint(), name.strip_suffix(".weight")) {
            (Some(q), Some(stem)) if self.contains(name)? && self.source.raw(name)?.is_none() => {
                Some((stem, q))
            }
            _ => None,
        };
        if let Some((stem, q)) = stored {
            if !keep {
                return Ok(ExpertTensor::Dense(self.get(name, shape)?));
            }
            return Ok(match self.read_int4(stem, shape, q, true)? {
                (Int4Layer::Packed(t), stored_bytes) => {
                    let t = t.to_device(&self.device)?;
                    self.count_int4(&t, "int4", stored_bytes);
                    ExpertTensor::Int4(t)
                }
                (Int4Layer::Values(w), stored_bytes) => {
                    let t = w.to_dtype(self.dtype)?.to_device(&self.device)?;
                    self.count(&t, "int4", stored_bytes);
                    ExpertTensor::Dense(t)
                }
            });
        }
        if self.experts_dtype != ExpertsDtype::Int4 {
            return Ok(ExpertTensor::Dense(self.get(name, shape)?));
        }
        let (w, format, stored) = self.convert(name, shape, DType::F32)?;
        let q = int4::Int4Tensor::quantize(&w, int4::QUANT_GROUP)?;
        drop(w);
        if keep {
            self.count_int4(&q, format, stored);
            return Ok(ExpertTensor::Int4(q));
        }
        let t = q.dequantize(self.dtype)?;
        self.count(&t, format, stored);
        Ok(ExpertTensor::Dense(t))
    }

    /// Counts an INT4 tensor (its nibbles, scales and zero points) as one tensor handed out.
    fn count_int4(&self, t: &int4::Int4Tensor, stored_format: &'static str, stored: u64) {
        self.count(&t.q, stored_format, stored);
        let mut l = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        *l.resident.entry(t.scale.dtype().as_str()).or_default() += 4 * t.scale.elem_count() as u64;
        if let Some(z) = &t.zero {
            *l.resident.entry(z.dtype().as_str()).or_default() += z.elem_count() as u64;
        }
    }

    /// A stored e4m3 tensor and its block scales, on the device as they are.
    fn fp8_as_stored(&self, name: &str, shape: &[usize]) -> Result<ExpertTensor> {
        let Some(raw) = self.source.raw(name)? else {
            return Err(EngineError::MissingTensor {
                name: name.to_string(),
                hint: String::new(),
            });
        };
        expect_shape(name, &raw.shape, shape)?;
        let RawData::Bytes(bytes) = raw.data else {
            return Ok(ExpertTensor::Dense(self.get(name, shape)?));
        };
        let (scales, scale_shape, scale_bytes, _) = self.fp8_scales(name, shape)?;
        self.mark_used(name);
        let q = Tensor::from_raw_buffer(bytes, DType::F8E4M3, shape, &Device::Cpu)?
            .to_device(&self.device)?;
        let scale = Tensor::from_vec(scales, (scale_shape[0], scale_shape[1]), &Device::Cpu)?
            .to_device(&self.device)?;
        self.count_fp8(&q, &scale, "fp8_e4m3", bytes.len() as u64 + scale_bytes);
        Ok(ExpertTensor::Fp8 { q, scale })
    }

    /// Counts an e4m3 tensor and its scales as one tensor handed out.
    fn count_fp8(&self, q: &Tensor, scale: &Tensor, stored_format: &'static str, stored: u64) {
        self.count(q, stored_format, stored);
        let mut l = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        *l.resident.entry(scale.dtype().as_str()).or_default() += 4 * scale.elem_count() as u64;
    }

    /// A stored floating-point tensor (INT4 scales) as f32 values, checked against `shape`.
    fn float_values(&self, name: &str, shape: &[usize], what: &str) -> Result<(Vec<f32>, u64)> {
        let raw = self
            .source
            .raw(name)?
            .ok_or_else(|| EngineError::MissingTensor {
                name: name.to_string(),
                hint: format!(" ({what})"),
            })?;
        expect_shape(name, &raw.shape, shape)?;
        let dt = match raw.dtype {
            StoredDtype::F32 => DType::F32,
            StoredDtype::F16 => DType::F16,
            StoredDtype::BF16 => DType::BF16,
            other => {
                return Err(EngineError::TensorDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                    expected: format!("a floating-point tensor ({what})"),
                });
            }
        };
        let t = match raw.data {
            RawData::Bytes(b) => Tensor::from_raw_buffer(b, dt, shape, &Device::Cpu)?,
            RawData::Tensor(t) => t,
            RawData::Random { .. } => {
                return Err(EngineError::TensorDtype {
                    name: name.to_string(),
                    dtype: "generated".into(),
                    expected: format!("stored values ({what})"),
                });
            }
        };
        self.mark_used(name);
        let bytes = shape.iter().product::<usize>() as u64 * raw.dtype.size();
        Ok((t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, bytes))
    }

    /// A stored int32 tensor (INT4 words, zeros, `g_idx`) as `u32` bit patterns, checked against
    /// `shape`; `None` when the source has no such tensor.
    fn int_words(&self, name: &str, shape: &[usize]) -> Result<Option<Vec<u32>>> {
        let Some(raw) = self.source.raw(name)? else {
            return Ok(None);
        };
        expect_shape(name, &raw.shape, shape)?;
        if raw.dtype != StoredDtype::I32 {
            return Err(EngineError::TensorDtype {
                name: name.to_string(),
                dtype: format!("{:?}", raw.dtype),
                expected: "I32 (INT4 checkpoints pack their values in int32 words)".into(),
            });
        }
        let words = match raw.data {
            RawData::Bytes(b) => b
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                .collect(),
            RawData::Tensor(t) => t
                .flatten_all()?
                .to_vec1::<i32>()?
                .into_iter()
                .map(|v| v as u32)
                .collect(),
            RawData::Random { .. } => {
                return Err(EngineError::TensorDtype {
                    name: name.to_string(),
                    dtype: "generated".into(),
                    expected: "stored int32 words".into(),
                });
            }
        };
        self.mark_used(name);
        Ok(Some(words))
    }

    /// Dequantises the INT4 layer `stem` (`stem.qweight`, `.qzeros`, `.scales`, GPTQ's `.g_idx`)
    /// into an f32 `[out, in]` tensor on the host; also returns the bytes it took as stored.
    fn dequantize_int4(&self, stem: &str, shape: &[usize], q: Int4Quant) -> Result<(Tensor, u64)> {
        let (layer, stored) = self.read_int4(stem, shape, q, false)?;
        Ok(match layer {
            Int4Layer::Values(t) => (t, stored),
            Int4Layer::Packed(t) => (t.dequantize(DType::F32)?, stored),
        })
    }

    /// The INT4 layer `stem` as [`int4::Int4Tensor`] on the host where `packed` and its layout
    /// allows (compressed-tensors as stored; GPTQ without an act-order permutation and AWQ
    /// repacked, [`int4::gptq_to_tensor`] / [`int4::awq_to_tensor`]), else dequantised to f32
    /// `[out, in]`; also the bytes it took as stored. Every shape is checked either way.
    fn read_int4(
        &self,
        stem: &str,
        shape: &[usize],
        q: Int4Quant,
        packed: bool,
    ) -> Result<(Int4Layer, u64)> {
        if let Int4Format::CompressedTensors { symmetric } = q.format {
            let (t, stored) = self.compressed_tensors_int4(stem, shape, symmetric)?;
            return Ok(if packed {
                (Int4Layer::Packed(t), stored)
            } else {
                (Int4Layer::Values(t.dequantize(DType::F32)?), stored)
            });
        }
        let qweight = format!("{stem}.qweight");
        let bad = |name: &str, reason: String| EngineError::QuantizedTensor {
            name: name.to_string(),
            reason,
        };
        let (n_out, n_in) = int4_dims(&qweight, stem, shape)?;
        if !n_out.is_multiple_of(8) {
            return Err(bad(
                &qweight,
                format!(
                    "{n_out} output features are not a multiple of 8 (zero points pack 8 columns per int32)"
                ),
            ));
        }
        let gptq = matches!(q.format, Int4Format::Gptq { .. });
        if gptq && !n_in.is_multiple_of(8) {
            return Err(bad(
                &qweight,
                format!(
                    "{n_in} input features are not a multiple of 8 (GPTQ packs 8 rows per int32)"
                ),
            ));
        }
        let group_size = q.group_size.unwrap_or(n_in);
        let groups = n_in.div_ceil(group_size);
        let packed_shape = if gptq {
            [n_in / 8, n_out]
        } else {
            [n_in, n_out / 8]
        };
        let words =
            self.int_words(&qweight, &packed_shape)?
                .ok_or_else(|| EngineError::MissingTensor {
                    name: qweight.clone(),
                    hint: String::new(),
                })?;
        let zeros_name = format!("{stem}.qzeros");
        let zeros = self
            .int_words(&zeros_name, &[groups, n_out / 8])?
            .ok_or_else(|| EngineError::MissingTensor {
                name: zeros_name.clone(),
                hint: format!(" (the zero points of INT4 tensor `{qweight}`)"),
            })?;
        let (scales, scale_bytes) = self.float_values(
            &format!("{stem}.scales"),
            &[groups, n_out],
            &format!("the group scales of INT4 tensor `{qweight}`"),
        )?;
        let by_position: Vec<usize> = (0..n_in).map(|i| i / group_size).collect();
        let mut stored = 4 * (words.len() + zeros.len()) as u64 + scale_bytes;
        let values = match q.format {
            Int4Format::Gptq {
                zeros_minus_one,
                desc_act,
            } => {
                let g_idx_name = format!("{stem}.g_idx");
                let group_of_row = match self.int_words(&g_idx_name, &[n_in])? {
                    None if desc_act => {
                        return Err(EngineError::MissingTensor {
                            name: g_idx_name,
                            hint: " (desc_act checkpoints give each input row's group)".into(),
                        });
                    }
                    None => by_position.clone(),
                    Some(g_idx) => {
                        stored += 4 * g_idx.len() as u64;
                        let mut rows = Vec::with_capacity(n_in);
                        for (i, &g) in g_idx.iter().enumerate() {
                            let g = g as i32;
                            if g < 0 || g as usize >= groups {
                                return Err(bad(
                                    &g_idx_name,
                                    format!(
                                        "row {i} is in group {g}, but there are {groups} groups of {group_size} rows"
                                    ),
                                ));
                            }
                            if !desc_act && g as usize != by_position[i] {
                                return Err(bad(
                                    &g_idx_name,
                                    format!(
                                        "row {i} is in group {g}, but desc_act is false, which puts it in group {} (row / group_size {group_size})",
                                        by_position[i]
                                    ),
                                ));
                            }
                            rows.push(g as usize);
                        }
                        rows
                    }
                };
                if packed && group_of_row == by_position {
                    let t = int4::gptq_to_tensor(
                        (n_in, n_out, group_size),
                        &words,
                        &zeros,
                        &scales,
                        zeros_minus_one,
                    )?;
                    return Ok((Int4Layer::Packed(t), stored));
                }
                let layout = int4::Int4Layout {
                    in_features: n_in,
                    out_features: n_out,
                    group_of_row: &group_of_row,
                };
                int4::dequantize_gptq_in_out(&layout, &words, &zeros, &scales, zeros_minus_one)
            }
            Int4Format::CompressedTensors { .. } => {
                return Err(EngineError::Internal(format!(
                    "{qweight}: compressed-tensors layers are read above"
                )));
            }
            Int4Format::Awq => {
                if packed {
                    let t =
                        int4::awq_to_tensor((n_in, n_out, group_size), &words, &zeros, &scales)?;
                    return Ok((Int4Layer::Packed(t), stored));
                }
                let layout = int4::Int4Layout {
                    in_features: n_in,
                    out_features: n_out,
                    group_of_row: &by_position,
                };
                int4::dequantize_awq_in_out(&layout, &words, &zeros, &scales)
            }
        };
        // [in, out] → [out, in], the layout of `<layer>.weight`.
        let w = Tensor::from_vec(values, (n_in, n_out), &Device::Cpu)?
            .t()?
            .contiguous()?;
        Ok((Int4Layer::Values(w), stored))
    }

    /// The compressed-tensors INT4 layer `stem` (`weight_packed`, `weight_scale`, `weight_shape`,
    /// and `weight_zero_point` unless `symmetric`) standing for `<stem>.weight` of `shape`
    /// (`[out, in]`), as an [`int4::Int4Tensor`] on the host; also the bytes it took as stored.
    /// The layer's group size is `in / scale columns`.
    fn compressed_tensors_int4(
        &self,
        stem: &str,
        shape: &[usize],
        symmetric: bool,
    ) -> Result<(int4::Int4Tensor, u64)> {
        let packed = format!("{stem}.weight_packed");
        let bad = |name: &str, reason: String| EngineError::QuantizedTensor {
            name: name.to_string(),
            reason,
        };
        let (n_out, n_in) = int4_dims(&packed, stem, shape)?;
        if !n_in.is_multiple_of(8) {
            return Err(bad(
                &packed,
                format!("{n_in} input features are not a multiple of 8 (8 per int32 word)"),
            ));
        }
        // `weight_shape` first: a layer quantised at another shape is named as such.
        let shape_name = format!("{stem}.weight_shape");
        let raw = self
            .source
            .raw(&shape_name)?
            .ok_or_else(|| EngineError::MissingTensor {
                name: shape_name.clone(),
                hint: format!(" (the unpacked shape of INT4 tensor `{packed}`)"),
            })?;
        expect_shape(&shape_name, &raw.shape, &[2])?;
        let dims: Vec<i64> = match (raw.dtype, raw.data) {
            (StoredDtype::Other("I64"), RawData::Bytes(b)) => b
                .chunks_exact(8)
                .map(|w| i64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
                .collect(),
            (StoredDtype::I32, RawData::Bytes(b)) => b
                .chunks_exact(4)
                .map(|w| i64::from(i32::from_le_bytes([w[0], w[1], w[2], w[3]])))
                .collect(),
            (_, RawData::Tensor(t)) => t.to_dtype(DType::I64)?.to_vec1()?,
            (d, _) => {
                return Err(EngineError::TensorDtype {
                    name: shape_name,
                    dtype: format!("{d:?}"),
                    expected: "I64 or I32 (the weight's [out, in])".into(),
                });
            }
        };
        if dims != [n_out as i64, n_in as i64] {
            return Err(bad(
                &shape_name,
                format!("says the weight is {dims:?}, but `{stem}.weight` is [{n_out}, {n_in}]"),
            ));
        }
        self.mark_used(&shape_name);
        let words = self
            .int_words(&packed, &[n_out, n_in / 8])?
            .ok_or_else(|| EngineError::MissingTensor {
                name: packed.clone(),
                hint: String::new(),
            })?;
        let scale_name = format!("{stem}.weight_scale");
        let groups = match self.source.raw(&scale_name)? {
            Some(r) if r.shape.len() == 2 && r.shape[0] == n_out && r.shape[1] > 0 => r.shape[1],
            Some(r) => {
                return Err(EngineError::TensorShape {
                    name: scale_name,
                    expected: vec![n_out, n_in / int4::QUANT_GROUP.min(n_in)],
                    actual: r.shape,
                });
            }
            None => {
                return Err(EngineError::MissingTensor {
                    name: scale_name,
                    hint: format!(" (the group scales of INT4 tensor `{packed}`)"),
                });
            }
        };
        if !n_in.is_multiple_of(groups) || !(n_in / groups).is_multiple_of(8) {
            return Err(bad(
                &scale_name,
                format!(
                    "{groups} groups over {n_in} input features: the group size must divide them and be a multiple of 8"
                ),
            ));
        }
        let group = n_in / groups;
        let (scales, scale_bytes) = self.float_values(
            &scale_name,
            &[n_out, groups],
            &format!("the group scales of INT4 tensor `{packed}`"),
        )?;
        let zero_name = format!("{stem}.weight_zero_point");
        let zero_shape = [n_out.div_ceil(8), groups];
        let mut stored = 4 * words.len() as u64 + scale_bytes + 16;
        let zero = match (symmetric, self.int_words(&zero_name, &zero_shape)?) {
            (true, None) => None,
            (false, Some(z)) => {
                stored += 4 * z.len() as u64;
                let nibbles = int4::unpack_zero_points(&z, n_out, groups);
                Some(Tensor::from_vec(nibbles, (n_out, groups), &Device::Cpu)?)
            }
            (false, None) => {
                return Err(EngineError::MissingTensor {
                    name: zero_name,
                    hint: format!(
                        " (the zero points of INT4 tensor `{packed}`: the config's weights are asymmetric)"
                    ),
                });
            }
            (true, Some(_)) => {
                return Err(bad(
                    &zero_name,
                    "is stored, but the config's weights are symmetric (no zero points)".into(),
                ));
            }
        };
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let tensor = int4::Int4Tensor {
            q: Tensor::from_vec(bytes, (n_out, n_in / 2), &Device::Cpu)?,
            scale: Tensor::from_vec(scales, (n_out, groups), &Device::Cpu)?,
            zero,
            group,
        };
        Ok((tensor, stored))
    }

    fn dequantize(&self, name: &str, shape: &[usize], bytes: &[u8]) -> Result<(Tensor, u64)> {
        let (scale_values, _, scale_bytes, quant) = self.fp8_scales(name, shape)?;
        let &[rows, cols] = shape else {
            return Err(EngineError::Internal(format!("{name}: checked 2-D")));
        };
        let values = fp8::dequantize_blocks(bytes, rows, cols, &scale_values, quant);
        Ok((
            Tensor::from_vec(values, (rows, cols), &Device::Cpu)?,
            scale_bytes,
        ))
    }

    /// The f32 block scales (`weight_scale_inv`) of the FP8 tensor `name` of 2-D `shape`: their
    /// values, shape, bytes as stored, and the checkpoint's block.
    fn fp8_scales(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<(Vec<f32>, [usize; 2], u64, Fp8Quant)> {
        let Some(Quantization::Fp8(quant)) = self.quant else {
            return Err(EngineError::TensorDtype {
                name: name.to_string(),
                dtype: "F8_E4M3".into(),
                expected:
                    "FP8 tensors need a `quantization_config` with quant_method \"fp8\" in config.json"
                        .into(),
            });
        };
        let [rows, cols] = shape else {
            return Err(EngineError::TensorShape {
                name: name.to_string(),
                expected: vec![0, 0],
                actual: shape.to_vec(),
            });
        };
        let scale_name = match name.strip_suffix(".weight") {
            Some(stem) => format!("{stem}.weight_scale_inv"),
            None => format!("{name}_scale_inv"),
        };
        let scale_shape = [
            rows.div_ceil(quant.block_rows),
            cols.div_ceil(quant.block_cols),
        ];
        let scales = self
            .source
            .raw(&scale_name)?
            .ok_or_else(|| EngineError::MissingTensor {
                name: scale_name.clone(),
                hint: format!(" (the block scales of FP8 tensor `{name}`)"),
            })?;
        if scales.shape != scale_shape {
            return Err(EngineError::TensorShape {
                name: scale_name,
                expected: scale_shape.to_vec(),
                actual: scales.shape,
            });
        }
        let scale_bytes = scale_shape.iter().product::<usize>() as u64 * scales.dtype.size();
        let scale_values: Vec<f32> = match scales.data {
            RawData::Tensor(t) => t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            RawData::Random { .. } => {
                return Err(EngineError::TensorDtype {
                    name: scale_name,
                    dtype: "generated".into(),
                    expected: "stored FP8 block scales".into(),
                });
            }
            RawData::Bytes(b) => {
                let dt = match scales.dtype {
                    StoredDtype::F32 => DType::F32,
                    StoredDtype::BF16 => DType::BF16,
                    StoredDtype::F16 => DType::F16,
                    other => {
                        return Err(EngineError::TensorDtype {
                            name: scale_name,
                            dtype: format!("{other:?}"),
                            expected: "a floating-point scale tensor".into(),
                        });
                    }
                };
                Tensor::from_raw_buffer(b, dt, &scale_shape, &Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?
            }
        };
        self.mark_used(&scale_name);
        Ok((scale_values, scale_shape, scale_bytes, quant))
    }

    fn mark_used(&self, name: &str) {
        // A poisoned lock only means another load panicked; the set is still usable.
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.insert(name.to_string());
    }

    /// Names in the source that no `get` asked for, except MTP layers (index ≥ `num_layers`),
    /// which moemesh does not run. A full in-process load reports these so that a checkpoint
    /// with a layout we do not understand is noticed rather than half-loaded.
    pub fn unused(&self, num_layers: usize) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<String> = self
            .source
            .names()
            .into_iter()
            .filter(|n| !used.contains(n))
            .filter(|n| layer_index(n).is_none_or(|l| l < num_layers))
            .collect();
        out.sort();
        out
    }
}

/// The suffix of an INT4 layer's packed weights (`<layer>.<suffix>` stands for `<layer>.weight`).
fn int4_packed_name(q: Int4Quant) -> &'static str {
    match q.format {
        Int4Format::CompressedTensors { .. } => "weight_packed",
        Int4Format::Gptq { .. } | Int4Format::Awq => "qweight",
    }
}

/// `TensorShape` unless the stored tensor `name` has the expected shape.
fn expect_shape(name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual != expected {
        return Err(EngineError::TensorShape {
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        });
    }
    Ok(())
}

/// The format name a stored dtype is counted under in [`LoadedBytes::checkpoint`].
fn stored_label(d: StoredDtype) -> &'static str {
    match d {
        StoredDtype::F32 => "f32",
        StoredDtype::F16 => "f16",
        StoredDtype::BF16 => "bf16",
        StoredDtype::F8E4M3 => "fp8_e4m3",
        StoredDtype::I32 => "i32",
        StoredDtype::Other(d) => d,
    }
}

/// The decoder-layer index in a checkpoint name like `model.layers.12.mlp...`.
/// The `[out, in]` dimensions of the INT4 layer `stem`, whose packed tensor `packed` stands
/// for `stem.weight` of `shape`: INT4 packs only 2-D linear weights.
fn int4_dims(packed: &str, stem: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [n_out, n_in] => Ok((n_out, n_in)),
        _ => Err(EngineError::QuantizedTensor {
            name: packed.to_string(),
            reason: format!(
                "stands for `{stem}.weight` of shape {shape:?}, but INT4 packs only 2-D linear weights"
            ),
        }),
    }
}

pub fn layer_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_index_reads_the_number_after_layers() {
        assert_eq!(layer_index("model.layers.61.mlp.gate.weight"), Some(61));
        assert_eq!(layer_index("model.embed_tokens.weight"), None);
    }

    #[test]
    fn the_loader_counts_resident_and_checkpoint_bytes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny-deepseek-v3-fp8");
        let files = crate::ModelFiles::open(&dir).expect("fixture");
        assert_eq!(files.weights_format(), "fp8_e4m3");
        let loader = files.loader(&Device::Cpu, DType::F32);
        // q_a_proj: [q_lora_rank 96, hidden 128] in e4m3, one 128×128 block, so one f32 scale.
        loader
            .get("model.layers.0.self_attn.q_a_proj.weight", &[96, 128])
            .expect("fp8 tensor");
        // A norm stays bf16 in an FP8 checkpoint.
        loader
            .get("model.layers.0.input_layernorm.weight", &[128])
            .expect("norm");
        let bytes = loader.loaded_bytes();
        assert_eq!(bytes.tensors, 2);
        assert_eq!(bytes.checkpoint.get("fp8_e4m3"), Some(&(96 * 128 + 4)));
        assert_eq!(bytes.checkpoint.get("bf16"), Some(&(128 * 2)));
        assert_eq!(bytes.resident.get("f32"), Some(&((96 * 128 + 128) * 4)));
        assert_eq!(bytes.resident_total(), (96 * 128 + 128) * 4);
    }

    /// `--weights-dtype int4` on a bf16 model: each routed expert is quantised (groups of 128,
    /// symmetric) and dequantised again; ModelInfo's format says so; other tensors untouched.
    #[test]
    fn int4_experts_are_the_quantised_values() {
        let files = crate::ModelFiles::embedded()
            .expect("embedded")
            .with_experts_dtype(ExpertsDtype::Int4);
        assert!(
            files.weights_format().ends_with("+int4_experts"),
            "{}",
            files.weights_format()
        );
        let cfg = &files.config;
        let (h, inner) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let name = format!(
            "model.layers.{}.mlp.experts.0.down_proj.weight",
            cfg.moe_layers()[0]
        );
        let loader = files.loader(&Device::Cpu, DType::F32);
        let ExpertTensor::Dense(got) = loader.get_expert(&name, &[h, inner]).expect("expert")
        else {
            panic!("dequantised");
        };
        let plain = Loader::new(files.source.as_ref(), cfg, &Device::Cpu, DType::F32);
        let w = plain.get(&name, &[h, inner]).expect("plain");
        let want = int4::Int4Tensor::quantize(&w, int4::QUANT_GROUP)
            .and_then(|q| q.dequantize(DType::F32))
            .expect("int4");
        let bits = fp8::f32_bits;
        assert_eq!(bits(&got), bits(&want));
        assert_ne!(bits(&got), bits(&w), "quantising changes the values");
        // 16 levels a group: far fewer distinct values than the weights have.
        let norm = "model.norm.weight";
        assert_eq!(
            bits(&loader.get(norm, &[h]).expect("norm")),
            bits(&plain.get(norm, &[h]).expect("norm"))
        );
        assert_eq!(
            "int4".parse::<ExpertsDtype>().ok(),
            Some(ExpertsDtype::Int4)
        );
    }

    /// `--weights-dtype fp8` where the FP8 kernels do not run (the CPU): each routed expert is
    /// quantised with 128 × 128 blocks and dequantised again, so the CPU computes the FP8 model;
    /// ModelInfo's format says so. Other tensors are untouched.
    #[test]
    fn fp8_experts_on_the_cpu_are_the_quantised_values() {
        let files = crate::ModelFiles::embedded()
            .expect("embedded")
            .with_experts_dtype(ExpertsDtype::Fp8);
        assert!(
            files.weights_format().ends_with("+fp8_experts"),
            "{}",
            files.weights_format()
        );
        let cfg = &files.config;
        let (h, inner) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let name = format!(
            "model.layers.{}.mlp.experts.0.up_proj.weight",
            cfg.moe_layers()[0]
        );
        let loader = files.loader(&Device::Cpu, DType::F32);
        assert!(!loader.experts_fp8());
        let ExpertTensor::Dense(got) = loader.get_expert(&name, &[inner, h]).expect("expert")
        else {
            panic!("dequantised on the CPU");
        };
        let plain = Loader::new(files.source.as_ref(), cfg, &Device::Cpu, DType::F32);
        let w = plain.get(&name, &[inner, h]).expect("plain");
        let (q, s) = fp8::quantize_e4m3(&w).expect("quantise");
        let want = fp8::dequantize_matrix(&q, &s, DType::F32).expect("dequantise");
        let bits = fp8::f32_bits;
        assert_eq!(bits(&got), bits(&want));
        assert_ne!(bits(&got), bits(&w), "quantising changes some values");
        let loaded = loader.loaded_bytes();
        assert_eq!(loaded.tensors, 1);
        assert_eq!(loaded.resident_total(), (inner * h * 4) as u64);
        // A non-expert tensor through `get` is as stored.
        let norm = "model.norm.weight";
        assert_eq!(
            bits(&loader.get(norm, &[h]).expect("norm")),
            bits(&plain.get(norm, &[h]).expect("norm"))
        );
    }

    /// A shared expert is held as the routed experts are where those are FP8 (the same FP8 MLP;
    /// here on the CPU: quantised and dequantised again), and as stored otherwise: with
    /// `--weights-dtype bf16` or `int4` (no INT4 dense kernel), and attention's projections
    /// under FP8 too (only `MOEMESH_DENSE_FP8=1` changes those).
    #[test]
    fn shared_experts_are_fp8_with_fp8_routed_experts_only() {
        let embedded = crate::ModelFiles::embedded().expect("embedded");
        let cfg = embedded.config.clone();
        assert!(
            cfg.n_shared_experts > 0,
            "the embedded model has shared experts"
        );
        let layer = cfg.moe_layers()[0];
        let shape = [
            cfg.moe_intermediate_size * cfg.n_shared_experts,
            cfg.hidden_size,
        ];
        let name = format!("model.layers.{layer}.mlp.shared_experts.gate_proj.weight");
        let plain = Loader::new(embedded.source.as_ref(), &cfg, &Device::Cpu, DType::F32);
        let w = plain.get(&name, &shape).expect("plain");
        let (q, s) = fp8::quantize_e4m3(&w).expect("quantise");
        let fp8_values = fp8::dequantize_matrix(&q, &s, DType::F32).expect("dequantise");
        let bits = fp8::f32_bits;
        assert_ne!(
            bits(&fp8_values),
            bits(&w),
            "quantising changes some values"
        );
        for (dtype, want) in [
            (ExpertsDtype::Fp8, &fp8_values),
            (ExpertsDtype::Compute, &w),
            (ExpertsDtype::Int4, &w),
            (ExpertsDtype::Auto, &w),
        ] {
            let files = crate::ModelFiles::embedded()
                .expect("embedded")
                .with_experts_dtype(dtype);
            let loader = files.loader(&Device::Cpu, DType::F32);
            let ExpertTensor::Dense(got) = loader.get_shared_expert(&name, &shape).expect("shared")
            else {
                panic!("{dtype:?}: the CPU holds shared experts in the compute dtype");
            };
            assert_eq!(bits(&got), bits(want), "{dtype:?}");
        }
        let files = crate::ModelFiles::embedded()
            .expect("embedded")
            .with_experts_dtype(ExpertsDtype::Fp8);
        let loader = files.loader(&Device::Cpu, DType::F32);
        let o_proj = format!("model.layers.{layer}.self_attn.o_proj.weight");
        let o_shape = [cfg.hidden_size, cfg.num_attention_heads * cfg.v_head_dim];
        let ExpertTensor::Dense(got) = loader.get_projection(&o_proj, &o_shape).expect("o_proj")
        else {
            panic!("attention's projections stay in the compute dtype");
        };
        assert_eq!(
            bits(&got),
            bits(&plain.get(&o_proj, &o_shape).expect("plain"))
        );
    }
}
