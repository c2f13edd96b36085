//! Compiles `moemesh/v1/*.proto` with protox (pure Rust, so no system protoc is needed) into
//! Rust types and tonic services, plus a descriptor set for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "moemesh/v1/tensor.proto",
        "moemesh/v1/generation.proto",
        "moemesh/v1/gate.proto",
        "moemesh/v1/expert.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("moemesh_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
