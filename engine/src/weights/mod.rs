//! Where a model's named tensors come from, and how they become compute-ready candle tensors.
//!
//! Model code asks a [`Loader`] for a tensor by its checkpoint name and the shape it expects; the
//! loader fetches raw data from a [`TensorSource`] (memory-mapped safetensors files, or tensors
//! built in memory for the embedded default model), dequantises FP8 blocks, checks the shape, and
//! converts to the compute dtype on the target device. Each role loads only the tensors it needs
//! (the gate skips routed experts, a worker loads only its experts), so nothing reads a tensor
//! until it is asked for.

pub mod fp8;
pub mod memory;
pub mod safetensors;

use std::collections::HashSet;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use crate::config::{Fp8Quant, ModelConfig};
use crate::error::{EngineError, Result};

/// A tensor's element type as stored in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
    F8E4M3,
    Other(&'static str),
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
    quant: Option<Fp8Quant>,
    used: Mutex<HashSet<String>>,
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
            used: Mutex::new(HashSet::new()),
        }
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

    /// Whether the source has a tensor called `name` (for optional tensors such as biases).
    pub fn contains(&self, name: &str) -> Result<bool> {
        Ok(self.source.raw(name)?.is_some())
    }

    fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let raw = self
            .source
            .raw(name)?
            .ok_or_else(|| EngineError::MissingTensor {
                name: name.to_string(),
                hint: String::new(),
            })?;
        if raw.shape != shape {
            return Err(EngineError::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: raw.shape,
            });
        }
        self.mark_used(name);
        let tensor = match (raw.dtype, raw.data) {
            (_, RawData::Tensor(t)) => t,
            (_, RawData::Random { mean, std, seed }) => {
                return random_normal(mean, std, seed, shape, &self.device)?
                    .to_dtype(dtype)
                    .map_err(Into::into);
            }
            (StoredDtype::F8E4M3, RawData::Bytes(bytes)) => self.dequantize(name, shape, bytes)?,
            (StoredDtype::F32, RawData::Bytes(b)) => {
                Tensor::from_raw_buffer(b, DType::F32, shape, &Device::Cpu)?
            }
            (StoredDtype::F16, RawData::Bytes(b)) => {
                Tensor::from_raw_buffer(b, DType::F16, shape, &Device::Cpu)?
            }
            (StoredDtype::BF16, RawData::Bytes(b)) => {
                Tensor::from_raw_buffer(b, DType::BF16, shape, &Device::Cpu)?
            }
            (StoredDtype::Other(d), _) => {
                return Err(EngineError::TensorDtype {
                    name: name.to_string(),
                    dtype: d.to_string(),
                    expected: "F32, F16, BF16 or F8_E4M3 with weight_scale_inv".into(),
                });
            }
        };
        Ok(tensor.to_dtype(dtype)?.to_device(&self.device)?)
    }

    fn dequantize(&self, name: &str, shape: &[usize], bytes: &[u8]) -> Result<Tensor> {
        let quant = self.quant.ok_or_else(|| EngineError::TensorDtype {
            name: name.to_string(),
            dtype: "F8_E4M3".into(),
            expected:
                "FP8 tensors need a `quantization_config` with quant_method \"fp8\" in config.json"
                    .into(),
        })?;
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
        let values = fp8::dequantize_blocks(bytes, *rows, *cols, &scale_values, quant);
        Ok(Tensor::from_vec(values, (*rows, *cols), &Device::Cpu)?)
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

/// The decoder-layer index in a checkpoint name like `model.layers.12.mlp...`.
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
}
