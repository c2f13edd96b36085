//! Device and dtype flags (`--device cpu|cuda:N`, `--dtype f32|bf16`).

use moemesh_engine::{DType, Device};

use crate::error::{MeshError, MeshResult};

pub fn parse_device(s: &str) -> MeshResult<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        other if other.starts_with("cuda") => Err(MeshError::Invalid(format!(
            "--device {other}: this moemesh build has no CUDA backend (build with the `cuda` feature); use `cpu`"
        ))),
        other => Err(MeshError::Invalid(format!(
            "--device {other:?}: expected `cpu` or `cuda:N`"
        ))),
    }
}

pub fn parse_dtype(s: &str) -> MeshResult<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => Err(MeshError::Invalid(format!(
            "--dtype {other:?}: expected `f32` or `bf16`"
        ))),
    }
}
