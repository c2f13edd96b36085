//! With feature `cuda`, compiles src/cuda/kernels.cu to PTX with nvcc (the toolkit comes from
//! scripts/build-cuda.sh); the PTX is embedded and loaded on the device at first use. Without the
//! feature there is nothing to do.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("moemesh_kernels.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("src/cuda/kernels.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("nvcc failed on src/cuda/kernels.cu ({s}); see its messages above"),
        Err(e) => panic!(
            "cannot run `{nvcc}` ({e}): the `cuda` feature needs the CUDA toolkit; \
             build with scripts/build-cuda.sh"
        ),
    }
}
