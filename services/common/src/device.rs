//! Device and dtype flags (`--device cpu|cuda:N`, `--dtype f32|bf16`).

use moemesh_engine::{DType, Device};

use crate::error::{MeshError, MeshResult};

/// Parses `--device`. `cuda` means `cuda:0`. Opening a CUDA device pins this process to that GPU
/// (every later allocation and kernel of the process goes there), which is what one worker per
/// GPU wants.
pub fn parse_device(s: &str) -> MeshResult<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        other if other == "cuda" || other.starts_with("cuda:") => {
            let ordinal = match other.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse::<usize>().map_err(|_| {
                    MeshError::Invalid(format!(
                        "--device {other:?}: expected `cuda:N` with N a GPU ordinal"
                    ))
                })?,
            };
            open_cuda(other, ordinal)
        }
        other => Err(MeshError::Invalid(format!(
            "--device {other:?}: expected `cpu` or `cuda:N`"
        ))),
    }
}

/// One explicit stream per process, shared by every thread: the engine thread, the gRPC
/// handlers and the loaders all enqueue on it, so work is ordered without cross-stream events.
#[cfg(feature = "cuda")]
fn open_cuda(flag: &str, ordinal: usize) -> MeshResult<Device> {
    let device = Device::new_cuda_with_stream(ordinal).map_err(|e| {
        MeshError::Unavailable(format!(
            "--device {flag}: cannot open CUDA device {ordinal}: {e}"
        ))
    })?;
    if let Device::Cuda(cuda) = &device {
        // SAFETY: event tracking guards buffers shared between streams; this process has one
        // stream (created above, used by every clone of this device), so stream order alone
        // keeps every read after its write and every free after its last use. Turning it off
        // saves two event calls per kernel launch.
        unsafe { cuda.disable_event_tracking() };
    }
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(flag: &str, _ordinal: usize) -> MeshResult<Device> {
    Err(MeshError::Invalid(format!(
        "--device {flag}: this moemesh build has no CUDA backend (build it with scripts/build-cuda.sh); use `cpu`"
    )))
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
