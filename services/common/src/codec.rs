//! Tensors on the wire: candle tensors to and from `moemesh.v1.Tensor` (raw little-endian bytes,
//! dtype, shape). Decoding checks that the byte count matches the shape before touching data.

use moemesh_engine::{DType, Device, Tensor};
use moemesh_proto::v1;

use crate::error::{MeshError, MeshResult};

/// Encodes a 2-D tensor as f32 or bf16 bytes.
pub fn encode(t: &Tensor, dtype: v1::DType) -> MeshResult<v1::Tensor> {
    let (candle_dtype, _) = wire_dtype(dtype)?;
    let t = t
        .to_dtype(candle_dtype)
        .and_then(|t| t.to_device(&Device::Cpu))
        .and_then(|t| t.contiguous())
        .map_err(|e| MeshError::Internal(format!("encode tensor: {e}")))?;
    let shape: Vec<u32> = t.dims().iter().map(|&d| d as u32).collect();
    let flat = t
        .flatten_all()
        .map_err(|e| MeshError::Internal(e.to_string()))?;
    let data = match candle_dtype {
        DType::F32 => {
            let v: Vec<f32> = flat
                .to_vec1()
                .map_err(|e| MeshError::Internal(e.to_string()))?;
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        _ => {
            let v: Vec<half::bf16> = flat
                .to_vec1()
                .map_err(|e| MeshError::Internal(e.to_string()))?;
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
    };
    Ok(v1::Tensor {
        dtype: dtype as i32,
        shape,
        data,
    })
}

/// Decodes a tensor message; `field` names it in errors.
pub fn decode(t: &v1::Tensor, field: &str, device: &Device) -> MeshResult<Tensor> {
    let dtype = v1::DType::try_from(t.dtype)
        .map_err(|_| MeshError::Invalid(format!("{field}.dtype: unknown dtype {}", t.dtype)))?;
    let (candle_dtype, size) = wire_dtype(dtype).map_err(|_| {
        MeshError::Invalid(format!("{field}.dtype must be D_TYPE_F32 or D_TYPE_BF16"))
    })?;
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let elems = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let want = elems.and_then(|e| e.checked_mul(size));
    if want != Some(t.data.len()) {
        return Err(MeshError::Invalid(format!(
            "{field}: shape {shape:?} of {dtype:?} needs {} bytes, got {}",
            want.map_or_else(|| "too many".to_string(), |w| w.to_string()),
            t.data.len()
        )));
    }
    Tensor::from_raw_buffer(&t.data, candle_dtype, &shape, device)
        .map_err(|e| MeshError::Invalid(format!("{field}: {e}")))
}

fn wire_dtype(d: v1::DType) -> MeshResult<(DType, usize)> {
    match d {
        v1::DType::F32 => Ok((DType::F32, 4)),
        v1::DType::Bf16 => Ok((DType::BF16, 2)),
        v1::DType::Unspecified => Err(MeshError::Invalid("tensor dtype is unspecified".into())),
    }
}

/// The wire dtype for a compute dtype: f32 stays exact; everything else travels as bf16.
pub fn wire_dtype_for(d: DType) -> v1::DType {
    if d == DType::F32 {
        v1::DType::F32
    } else {
        v1::DType::Bf16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_f32_and_bf16() {
        let t =
            Tensor::new(&[[1.5f32, -2.0, 3.25], [0.0, 7.0, -0.5]], &Device::Cpu).expect("tensor");
        for d in [v1::DType::F32, v1::DType::Bf16] {
            let back = decode(&encode(&t, d).expect("encode"), "x", &Device::Cpu).expect("decode");
            let back: Vec<Vec<f32>> = back
                .to_dtype(DType::F32)
                .expect("f32")
                .to_vec2()
                .expect("vec");
            assert_eq!(back, vec![vec![1.5, -2.0, 3.25], vec![0.0, 7.0, -0.5]]);
        }
    }

    #[test]
    fn a_short_buffer_is_invalid_and_names_the_field() {
        let bad = v1::Tensor {
            dtype: v1::DType::F32 as i32,
            shape: vec![2, 3],
            data: vec![0; 20],
        };
        let e = decode(&bad, "activations", &Device::Cpu)
            .expect_err("short")
            .to_string();
        assert!(e.contains("activations") && e.contains("24 bytes"), "{e}");
    }
}
