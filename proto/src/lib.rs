//! The generated `moemesh.v1` types and services, and the descriptor set that gRPC server
//! reflection serves (so grpcurl and ghz need no .proto files).

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("moemesh.v1");
}

/// Encoded `FileDescriptorSet` of every moemesh proto, for `tonic_reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/moemesh_descriptor.bin"));
