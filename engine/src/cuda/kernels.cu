// moemesh's own CUDA kernels: the fused pieces of a DeepSeek decode step that candle lacks.
// Compiled to PTX by engine/build.rs (feature `cuda`) as this one translation unit, embedded, and
// loaded once per device as the module `moemesh_kernels`; the Rust side is engine/src/cuda/mod.rs
// (with attention.rs and experts.rs), which checks shapes, alignment and dtypes before every
// launch. Each subject lives in its own file beside the Rust that launches it; common.cuh holds
// the shared helpers and conventions. A new kernel file is added here and in build.rs's list.

#include "norm.cu"
#include "attention.cu"
#include "experts.cu"
#include "experts_fp8.cu"
#include "experts_int4.cu"
#include "dense.cu"
#include "sampling.cu"
