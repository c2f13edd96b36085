//! With feature `cuda`, compiles src/cuda/kernels.cu to PTX with nvcc (the toolkit comes from
//! scripts/build-cuda.sh); the PTX is embedded and loaded on the device at first use. Without the
//! feature there is nothing to do. kernels.cu is one translation unit that `#include`s the kernel
//! files of each subject (beside the Rust that launches them), so there is still one PTX module.

use std::path::PathBuf;
use std::process::Command;

/// The translation unit nvcc compiles.
const KERNELS: &str = "src/cuda/kernels.cu";

/// Everything it includes, each watched for changes.
const PARTS: [&str; 8] = [
    "src/cuda/common.cuh",
    "src/cuda/norm.cu",
    "src/cuda/attention.cu",
    "src/cuda/experts.cu",
    "src/cuda/experts_fp8.cu",
    "src/cuda/experts_int4.cu",
    "src/cuda/dense.cu",
    "src/cuda/sampling.cu",
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(moemesh_wgmma)");
    println!("cargo:rerun-if-changed={KERNELS}");
    for part in PARTS {
        println!("cargo:rerun-if-changed={part}");
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("moemesh_kernels.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    // Hopper (90) gets the arch-specific sm_90a PTX: its wgmma kernels (experts.cu) exist only
    // there. Such PTX loads on compute capability 9.0 alone (H100, H200); build with another
    // CUDA_COMPUTE_CAP for other GPUs.
    let arch = if cap == "90" {
        println!("cargo:rustc-cfg=moemesh_wgmma");
        "-arch=compute_90a".to_string()
    } else {
        format!("-arch=sm_{cap}")
    };
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(arch)
        .arg("-o")
        .arg(&out)
        .arg(KERNELS)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("nvcc failed on {KERNELS} ({s}); see its messages above"),
        Err(e) => panic!(
            "cannot run `{nvcc}` ({e}): the `cuda` feature needs the CUDA toolkit; \
             build with scripts/build-cuda.sh"
        ),
    }
}
