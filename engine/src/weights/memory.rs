//! Tensors held in memory under checkpoint names: the embedded default model, and tests that
//! build small models by hand.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};

use super::{RawData, RawTensor, StoredDtype, TensorSource};
use crate::error::Result;

/// Named in-memory tensors, with a caller-supplied identity for the fingerprint (hashing every
/// element of a generated model would cost as much as generating it).
pub struct MemorySource {
    tensors: HashMap<String, Tensor>,
    identity: Vec<u8>,
}

impl MemorySource {
    pub fn new(tensors: HashMap<String, Tensor>, identity: impl Into<Vec<u8>>) -> Self {
        MemorySource {
            tensors,
            identity: identity.into(),
        }
    }
}

impl TensorSource for MemorySource {
    fn raw(&self, name: &str) -> Result<Option<RawTensor<'_>>> {
        Ok(self.tensors.get(name).map(|t| RawTensor {
            dtype: match t.dtype() {
                DType::F32 => StoredDtype::F32,
                DType::F16 => StoredDtype::F16,
                DType::BF16 => StoredDtype::BF16,
                DType::I32 => StoredDtype::I32,
                _ => StoredDtype::Other("non-float in-memory tensor"),
            },
            shape: t.dims().to_vec(),
            data: RawData::Tensor(t.clone()),
        }))
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn digest(&self) -> Vec<u8> {
        let sorted: BTreeMap<&String, &Tensor> = self.tensors.iter().collect();
        let mut h = Sha256::new();
        h.update(&self.identity);
        for (name, t) in sorted {
            h.update(name.as_bytes());
            h.update(format!("{:?}{:?}", t.dtype(), t.dims()).as_bytes());
        }
        h.finalize().to_vec()
    }
}
