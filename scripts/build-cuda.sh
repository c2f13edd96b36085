#!/usr/bin/env bash
# Builds the CUDA-enabled `moemesh` binary on a machine with no GPU, no driver and no CUDA
# toolkit: the toolkit (CUDA 13.0, matching the GPU machines' driver) comes from PyPI, and the
# driver library is a link-time stub that is never shipped (the GPU machine's real libcuda.so.1
# satisfies the binary's NEEDED entry).
#
#   scripts/build-cuda.sh            # release build → dist/moemesh-cuda.gz (+ dist/moemesh-cuda)
#   scripts/build-cuda.sh --check    # `cargo check --features cuda` only (what CI runs: fast,
#                                    # needs neither the toolkit download nor nvcc)
#
# Environment: CUDA_DIR (toolkit location, default ~/.cache/moemesh-cuda),
# CUDA_COMPUTE_CAP (default 90: H100/H200), CARGO_TARGET_DIR (default target/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--check" ]]; then
    # candle-kernels' build script runs nvcc even for `cargo check`; its own check of the
    # feature-gated Rust code is what we want, so the kernels' build is pointed at a no-op nvcc.
    # The CPU build's target folder: `make lint` has already type-checked every dependency the
    # cuda feature leaves alone there, so only candle, cudarc and our crates are checked again
    # (minutes less in CI). The CPU build never links candle-kernels, whose stand-in PTX lands here.
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
    # Absolute: build scripts run in their own crate's folder, where a relative PATH entry fails.
    fake="$(realpath -m "$CARGO_TARGET_DIR")/fake-nvcc"
    mkdir -p "$fake"
    cat >"$fake/nvcc" <<'EOF'
#!/bin/sh
# Stand-in for nvcc during `cargo check`: answers --version as nvcc 13.0 does (cudarc reads its
# fourth line), makes empty outputs.
case "$*" in *--version*) printf '%s\n' "nvcc: NVIDIA (R) Cuda compiler driver" \
    "Copyright (c) 2005-2025 NVIDIA Corporation" "Built on (stand-in)" \
    "Cuda compilation tools, release 13.0, V13.0.88" "Build cuda_13.0 (stand-in)"; exit 0;; esac
case "$*" in *--list-gpu-code*) echo sm_90; exit 0;; esac
# `-o FILE`, or `--output-directory DIR` with one FILE.ptx per FILE.cu (candle-kernels' builder).
out=""; dir=""; prev=""; srcs=""
for a in "$@"; do
    [ "$prev" = "-o" ] && out="$a"
    [ "$prev" = "--output-directory" ] && dir="$a"
    case "$a" in *.cu) srcs="$srcs $a";; esac
    prev="$a"
done
[ -n "$out" ] && : >"$out"
if [ -n "$dir" ]; then
    for f in $srcs; do b=$(basename "$f" .cu); : >"$dir/$b.ptx"; done
fi
exit 0
EOF
    chmod +x "$fake/nvcc"
    PATH="$fake:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDA_ROOT="$fake" \
        cargo check --locked -p moemesh --features cuda --all-targets
    exit 0
fi

CUDA_DIR="${CUDA_DIR:-$HOME/.cache/moemesh-cuda}"
CU="$CUDA_DIR/nvidia/cu13"
if [[ ! -x "$CU/bin/nvcc" ]]; then
    echo "installing the CUDA 13.0 toolchain from PyPI into $CUDA_DIR (about 1.1 GB)…"
    # One pip call: a second --target install into the same folder would replace nvidia/.
    python3 -m pip install -q --no-deps --target "$CUDA_DIR" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
        nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cublas nvidia-curand \
        nvidia-cuda-nvrtc==13.0.88
fi
# The linker looks for unversioned names.
for lib in cublas cublasLt cudart nvrtc; do
    [[ -e "$CU/lib/lib$lib.so" ]] || ln -sf "lib$lib.so.13" "$CU/lib/lib$lib.so"
done
[[ -e "$CU/lib/libcurand.so" ]] || ln -sf libcurand.so.10 "$CU/lib/libcurand.so"

# libcuda stub: one dummy for every driver function cudarc declares.
cargo fetch --locked >/dev/null
CUDARC_VERSION=$(awk '/^name = "cudarc"/{getline; gsub(/"/,"",$3); print $3}' Cargo.lock)
SYS=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path "*/cudarc-$CUDARC_VERSION/src/driver/sys/mod.rs" | head -1)
[[ -n "$SYS" ]] || { echo "cudarc $CUDARC_VERSION sources not found" >&2; exit 1; }
STUB_DIR="$CUDA_DIR/stub"
mkdir -p "$STUB_DIR"
grep -o 'fn cu[A-Za-z0-9_]*' "$SYS" | sort -u | awk '{print "int " $2 "(void) { return 999; }"}' \
    >"$STUB_DIR/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB_DIR/libcuda.so" "$STUB_DIR/libcuda_stub.c"

export PATH="$CU/bin:$PATH" CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_HOME="$CU"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export RUSTFLAGS="${RUSTFLAGS:-} -L $STUB_DIR -L $CU/lib"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
cargo build --locked --release -p moemesh --features cuda

mkdir -p dist
cp "$CARGO_TARGET_DIR/release/moemesh" dist/moemesh-cuda
strip dist/moemesh-cuda
gzip -kf dist/moemesh-cuda
ls -la dist/moemesh-cuda dist/moemesh-cuda.gz
echo "run it on a GPU machine with: scripts/gpu-check.sh (see docs/BENCHMARKS.md)"
