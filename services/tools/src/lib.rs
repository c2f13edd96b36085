//! moemesh's measuring and checking tools, apart from the serving roles (which do not link
//! this crate): `bench` (load a running mesh, run the serving core in-process, or replay a
//! ghz scenario), `verify` (the engine on a device against the HF transformers fixtures), the
//! ghz scenario format and report, and the client flags they share with `moemesh generate`.

pub mod bench;
mod bench_scenario;
pub mod client_args;
mod fp8_check;
pub mod ghz;
pub mod kernel_check;
mod mla_fused_check;
pub mod sampler_check;
pub mod verify;
