//! Memory-mapped safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (the layout DeepSeek publishes). Headers are read and checked
//! when the directory is opened (so a truncated file is reported before any compute); tensor data
//! is only touched when a tensor is asked for.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, TensorInfo};
use sha2::{Digest, Sha256};

use super::{RawData, RawTensor, StoredDtype, TensorSource};
use crate::error::{EngineError, Result};

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// The safetensors files of one model directory, memory-mapped.
pub struct SafetensorsSource {
    paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
}

fn file_err(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::WeightFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl SafetensorsSource {
    /// Opens the checkpoint in `dir`: `model.safetensors.index.json` when present, else
    /// `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            let text =
                std::fs::read_to_string(&index).map_err(|e| file_err(&index, e.to_string()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| file_err(&index, e.to_string()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| file_err(&index, "no `weight_map` object"))?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.is_file() {
                return Err(file_err(
                    dir,
                    "no model.safetensors or model.safetensors.index.json in the model directory",
                ));
            }
            vec![single]
        };
        Self::open_files(&files)
    }

    /// Opens the given safetensors files as one checkpoint.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| file_err(path, e.to_string()))?;
            // SAFETY: the checkpoint is opened read-only and treated as immutable; replacing a
            // model's files while a process serves them is not supported (documented in README).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| file_err(path, e.to_string()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
                file_err(
                    path,
                    truncation(&map)
                        .unwrap_or_else(|| format!("not a valid safetensors file: {e}")),
                )
            })?;
            let data_start = 8 + header_len;
            let data_len = map.len().saturating_sub(data_start);
            for (name, info) in meta.tensors() {
                let TensorInfo {
                    dtype,
                    shape,
                    data_offsets: (s, e),
                } = info.clone();
                if e > data_len || s > e {
                    return Err(file_err(
                        path,
                        format!(
                            "truncated or corrupt: tensor `{name}` needs bytes {s}..{e} of the data section, which has {data_len}"
                        ),
                    ));
                }
                let elems: usize = shape.iter().product();
                let want = elems * dtype.bitsize() / 8;
                if e - s != want {
                    return Err(file_err(
                        path,
                        format!(
                            "corrupt: tensor `{name}` ({dtype:?} {shape:?}) should take {want} bytes, the header gives {}",
                            e - s
                        ),
                    ));
                }
                entries.insert(
                    name,
                    Entry {
                        file: fi,
                        dtype,
                        shape,
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
            maps.push(map);
        }
        Ok(SafetensorsSource {
            paths: paths.to_vec(),
            maps,
            entries,
        })
    }
}

/// When a file's header is intact but its data is cut short (an interrupted download), says
/// which tensor is cut and by how much; `None` when the file is broken some other way.
fn truncation(map: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(map.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(map.get(8..8usize.checked_add(n)?)?).ok()?;
    let data_len = map.len() - 8 - n;
    let (name, end) = header
        .iter()
        .filter_map(|(name, v)| {
            let end = v.get("data_offsets")?.get(1)?.as_u64()? as usize;
            (end > data_len).then_some((name, end))
        })
        .min_by_key(|(_, end)| *end)?;
    Some(format!(
        "truncated: tensor `{name}` needs {end} bytes of data but the file holds only {data_len} after its header (an incomplete download?)"
    ))
}

fn stored(d: Dtype) -> StoredDtype {
    match d {
        Dtype::F32 => StoredDtype::F32,
        Dtype::F16 => StoredDtype::F16,
        Dtype::BF16 => StoredDtype::BF16,
        Dtype::F8_E4M3 => StoredDtype::F8E4M3,
        Dtype::F64 => StoredDtype::Other("F64"),
        Dtype::I64 => StoredDtype::Other("I64"),
        Dtype::I32 => StoredDtype::I32,
        Dtype::U8 => StoredDtype::Other("U8"),
        Dtype::F8_E5M2 => StoredDtype::Other("F8_E5M2"),
        _ => StoredDtype::Other("an unsupported dtype"),
    }
}

impl TensorSource for SafetensorsSource {
    fn raw(&self, name: &str) -> Result<Option<RawTensor<'_>>> {
        let Some(e) = self.entries.get(name) else {
            return Ok(None);
        };
        let bytes = &self.maps[e.file][e.start..e.end];
        Ok(Some(RawTensor {
            dtype: stored(e.dtype),
            shape: e.shape.clone(),
            data: RawData::Bytes(bytes),
        }))
    }

    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn digest(&self) -> Vec<u8> {
        // Names, dtypes and shapes of everything, plus the bytes of small tensors and a sample
        // of large ones: cheap on a 700 GB checkpoint, yet two different random inits differ.
        let sorted: BTreeMap<&String, &Entry> = self.entries.iter().collect();
        let mut h = Sha256::new();
        for (name, e) in sorted {
            h.update(name.as_bytes());
            h.update(format!("{:?}{:?}", e.dtype, e.shape).as_bytes());
            let bytes = &self.maps[e.file][e.start..e.end];
            if bytes.len() <= 1 << 16 {
                h.update(bytes);
            } else {
                h.update(&bytes[..4096]);
                h.update(&bytes[bytes.len() - 4096..]);
            }
        }
        for p in &self.paths {
            if let Some(f) = p.file_name() {
                h.update(f.as_encoded_bytes());
            }
        }
        h.finalize().to_vec()
    }
}
