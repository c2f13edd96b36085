//! The expert data plane's transports and the rules for choosing one: gRPC stays the control
//! plane (registration, health, each call's routing metadata, failover); the activations and
//! partial sums travel either in the gRPC messages (`grpc`, always available) or in device
//! buffers shared between the gate and the worker (`cuda-ipc`, same host, any GPU of it).
//!
//! The gate asks for a device transport when it opens a worker's stream (`Expert.OpenTransport`);
//! [`gate_choice`] says whether it asks at all, [`worker_check`] whether the worker accepts.
//! Both are pure so that the negotiation's rules are unit-tested without a GPU; the CUDA calls
//! live in `moemesh_engine::cuda::ipc`.

use moemesh_proto::v1;

use crate::codec::{self, Assignment};
use crate::error::{MeshError, MeshResult};

/// Activations in the gRPC messages.
pub const GRPC: &str = "grpc";
/// Activations in CUDA device buffers shared by the two processes (one host).
pub const CUDA_IPC: &str = "cuda-ipc";
/// Not connected yet: the transport is chosen when the stream opens.
pub const PENDING: &str = "pending";

/// The gate's `--expert-transport`: `auto` asks every CUDA worker for CUDA IPC, `grpc` never asks
/// (the baseline for measurements, or a fallback if a driver misbehaves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportMode {
    Auto,
    Grpc,
}

/// Identifies this host for CUDA IPC (which works only between processes of one host): the kernel
/// boot id, which two containers on one host share, or the host name where it cannot be read.
pub fn host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
}

/// The gate's `--expert-ipc-sync`: how the two processes order their work on a CUDA IPC session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IpcSync {
    /// On the GPUs: the gate's stream writes a flag after the input, the worker's stream waits
    /// for it and writes one back after the output, which the gate's stream waits for. No host
    /// synchronises per layer; the gate's host only queues work (see docs/DESIGN.md).
    Device,
    /// On the hosts: the gate synchronises before each call and the worker before each reply.
    Host,
}

/// The gate's `--expert-graphs`: whether decode steps whose MoE layers all go to
/// device-ordered workers run as CUDA graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExpertGraphs {
    /// When they cannot stall each other: every worker of the step on another GPU than the
    /// gate's, or the processes under MPS (`CUDA_MPS_PIPE_DIRECTORY` set, as `moemesh up`
    /// does when it starts its daemon). A replayed graph waits for each worker's flag with a
    /// kernel, which under plain time-slicing of one GPU would hold the GPU from the worker.
    Auto,
    /// Always (where the step's calls allow it).
    On,
    /// Never: every step queues its layers from the host.
    Off,
}

/// Whether this process runs as an MPS client as `moemesh up` starts them
/// (`CUDA_MPS_PIPE_DIRECTORY` set): kernels of the processes sharing the GPU then run side by
/// side, so a spinning wait in one does not hold the GPU from the others.
pub fn under_mps() -> bool {
    std::env::var_os("CUDA_MPS_PIPE_DIRECTORY").is_some()
}

/// Whether a gate on `gate_device` may wait for a worker on `worker_device` (device names as the
/// registry gives them) with a spinning kernel: the worker is on another GPU, or MPS runs
/// (`mps`: [`under_mps`] for this process). On one
/// GPU without MPS the processes time-slice it, and a spinning wait would hold the GPU from the
/// very worker it waits for (on one H100, 19 → 71 ms a step at batch 1), so the gate waits with
/// `cuStreamWaitValue32` there and takes no CUDA graphs.
pub fn gate_may_spin(worker_device: &str, gate_device: &str, mps: bool) -> bool {
    worker_device != gate_device || mps
}

/// An expert worker's `--ipc-wait`: how its stream waits for a gate's flag on a device-ordered
/// session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IpcWait {
    /// `kernel` under MPS ([`under_mps`]), `stream` otherwise.
    Auto,
    /// A one-thread spinning kernel: wakes at once, holds a thread of the GPU while it waits
    /// (under plain time-slicing of one GPU that would hold the GPU from the gate).
    Kernel,
    /// The stream's memory wait (`cuStreamWaitValue32`), which the GPU polls.
    Stream,
}

impl IpcWait {
    /// Whether waits spin in a kernel.
    pub fn spins(self) -> bool {
        match self {
            IpcWait::Auto => under_mps(),
            IpcWait::Kernel => true,
            IpcWait::Stream => false,
        }
    }
}

/// A device-ordered call's input buffer: the rows, then the routing, each part 256-byte aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLayout {
    /// Byte offset of the `[rows, top_k]` u32 expert ids.
    pub ids: usize,
    /// Byte offset of the `[rows, top_k]` f32 weights.
    pub weights: usize,
    /// Bytes of the whole input buffer.
    pub bytes: usize,
}

impl DeviceLayout {
    pub fn new(rows: usize, hidden: usize, dtype_bytes: usize, top_k: usize) -> Self {
        let align = |n: usize| n.div_ceil(256) * 256;
        let ids = align(rows * hidden * dtype_bytes);
        let weights = ids + align(rows * top_k * 4);
        DeviceLayout {
            ids,
            weights,
            bytes: weights + align(rows * top_k * 4),
        }
    }
}

/// The flags buffers of a device-ordered session, in u32 words. The gate's holds, per slot, the
/// word it waits on (`done`) and a ring of words saying what the worker's wait saw for each call
/// (`seen`); the worker's holds, per slot, the word it waits on (`ready`) and its copy of what
/// that word held when the wait passed (`scratch`). Every word starts at 0; call numbers start
/// at 1.
pub mod flags {
    /// Calls per slot whose `seen` word is kept (more than any step makes on one slot: one per
    /// MoE layer and micro-batch).
    pub const RING: usize = 256;
    /// Words in the gate's flags buffer for `slots` slots.
    pub fn gate_words(slots: usize) -> usize {
        slots + slots * RING
    }
    /// Words in the worker's flags buffer for `slots` slots.
    pub fn worker_words(slots: usize) -> usize {
        2 * slots
    }
    /// The gate's word that slot `slot`'s output is written (the worker writes the call number).
    pub fn done(slot: usize) -> usize {
        slot
    }
    /// The gate's word for call `seq` of slot `slot`: what the worker's wait saw, which is `seq`
    /// exactly when the gate's input was there, and past it when the wait was released.
    pub fn seen(slots: usize, slot: usize, seq: u32) -> usize {
        slots + slot * RING + seq as usize % RING
    }
    /// The worker's word that slot `slot`'s input is written (the gate writes the call number).
    pub fn ready(slot: usize) -> usize {
        slot
    }
    /// The worker's copy of `ready` taken when its wait passed.
    pub fn scratch(slots: usize, slot: usize) -> usize {
        slots + slot
    }
    /// What a released wait is set to, past the last call number: far enough ahead that every
    /// queued wait passes, and never equal to a call number in flight.
    pub const RELEASE_STRIDE: u32 = 1 << 30;
}

/// Whether a gate should ask a worker for CUDA IPC: `Err(reason)` names why not (the gate then
/// uses gRPC for it and logs the reason).
pub fn gate_choice(
    mode: TransportMode,
    gate_on_cuda: bool,
    ipc_built: bool,
    worker_device: &str,
) -> Result<(), String> {
    if mode == TransportMode::Grpc {
        return Err("--expert-transport grpc".into());
    }
    if !gate_on_cuda {
        return Err("the gate runs on the CPU".into());
    }
    if !ipc_built {
        return Err("this build has no CUDA".into());
    }
    if !(worker_device == "cuda" || worker_device.starts_with("cuda:")) {
        return Err(format!("the worker runs on {worker_device:?}"));
    }
    Ok(())
}

/// The worker's checks of an `OpenTransport` request before it maps anything: `Err(reason)` is a
/// refusal (the gate keeps gRPC), never a failed call.
pub fn worker_check(
    req: &v1::OpenTransportRequest,
    own_host: &str,
    on_cuda: bool,
    hidden: usize,
) -> Result<(), String> {
    if req.kind != CUDA_IPC {
        return Err(format!("transport {:?} is not offered", req.kind));
    }
    if !on_cuda {
        return Err("this worker runs on the CPU".into());
    }
    if req.host_id.is_empty() || req.host_id != own_host {
        return Err("the gate is on another host".into());
    }
    if req.hidden as usize != hidden {
        return Err(format!(
            "buffers laid out for hidden size {} but the model's is {hidden}",
            req.hidden
        ));
    }
    if !matches!(
        v1::DType::try_from(req.dtype),
        Ok(v1::DType::F32 | v1::DType::Bf16)
    ) {
        return Err(format!("input dtype {} is not f32 or bf16", req.dtype));
    }
    if req.rows == 0 || req.input_handles.is_empty() {
        return Err("no buffers offered".into());
    }
    if req.device_sync && (req.top_k == 0 || req.gate_flags_handle.is_empty()) {
        return Err("device-ordered calls asked for without top_k or a flags buffer".into());
    }
    if req.input_handles.len() != req.output_handles.len() {
        return Err(format!(
            "{} input buffers but {} output buffers",
            req.input_handles.len(),
            req.output_handles.len()
        ));
    }
    Ok(())
}

/// The (row, expert, weight) assignments of a call whose activations are in a shared buffer of
/// `shared.rows` rows: like `codec::decode_forward`, but each token's row is `shared.token_rows`.
pub fn shared_assignments(
    req: &v1::ForwardRequest,
    shared: &v1::SharedActivations,
    capacity: usize,
) -> MeshResult<Vec<Assignment>> {
    let rows = shared.rows as usize;
    if rows == 0 || rows > capacity {
        return Err(MeshError::Invalid(format!(
            "shared.rows {rows} is outside 1..={capacity} (the session's buffers)"
        )));
    }
    if shared.token_rows.len() != req.pairs_per_token.len() {
        return Err(MeshError::Invalid(format!(
            "shared.token_rows has {} entries for {} tokens in pairs_per_token",
            shared.token_rows.len(),
            req.pairs_per_token.len()
        )));
    }
    if let Some(bad) = shared.token_rows.iter().find(|&&r| r as usize >= rows) {
        return Err(MeshError::Invalid(format!(
            "shared.token_rows: row {bad} is past the {rows} rows written"
        )));
    }
    codec::assignments(req, |i| shared.token_rows[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_spins_for_a_worker_on_another_gpu_and_on_its_own_only_under_mps() {
        assert!(gate_may_spin("cuda:1", "cuda:0", false));
        assert!(gate_may_spin("cuda:1", "cuda:0", true));
        assert!(!gate_may_spin("cuda:0", "cuda:0", false));
        assert!(gate_may_spin("cuda:0", "cuda:0", true));
    }

    fn open_req() -> v1::OpenTransportRequest {
        v1::OpenTransportRequest {
            gate_id: "g".into(),
            host_id: "host-a".into(),
            kind: CUDA_IPC.into(),
            rows: 64,
            hidden: 16,
            dtype: v1::DType::Bf16 as i32,
            input_handles: vec![vec![0; 64]; 2],
            output_handles: vec![vec![0; 64]; 2],
            device_sync: false,
            top_k: 0,
            gate_flags_handle: Vec::new(),
        }
    }

    #[test]
    fn the_gate_asks_only_cuda_workers_from_a_cuda_gate_unless_told_grpc() {
        assert_eq!(
            gate_choice(TransportMode::Auto, true, true, "cuda:1"),
            Ok(())
        );
        assert_eq!(gate_choice(TransportMode::Auto, true, true, "cuda"), Ok(()));
        for (mode, gate_gpu, built, dev, why) in [
            (
                TransportMode::Grpc,
                true,
                true,
                "cuda:0",
                "--expert-transport",
            ),
            (TransportMode::Auto, false, true, "cuda:0", "CPU"),
            (TransportMode::Auto, true, false, "cuda:0", "no CUDA"),
            (TransportMode::Auto, true, true, "cpu", "\"cpu\""),
        ] {
            let reason = gate_choice(mode, gate_gpu, built, dev).expect_err("refused");
            assert!(reason.contains(why), "{reason}");
        }
    }

    #[test]
    fn the_worker_refuses_what_it_cannot_map_and_accepts_its_own_host() {
        assert_eq!(worker_check(&open_req(), "host-a", true, 16), Ok(()));
        let cases: Vec<(v1::OpenTransportRequest, bool, &str)> = vec![
            (open_req(), false, "CPU"),
            (
                v1::OpenTransportRequest {
                    host_id: "host-b".into(),
                    ..open_req()
                },
                true,
                "another host",
            ),
            (
                v1::OpenTransportRequest {
                    host_id: String::new(),
                    ..open_req()
                },
                true,
                "another host",
            ),
            (
                v1::OpenTransportRequest {
                    kind: "nccl".into(),
                    ..open_req()
                },
                true,
                "not offered",
            ),
            (
                v1::OpenTransportRequest {
                    hidden: 8,
                    ..open_req()
                },
                true,
                "hidden size 8",
            ),
            (
                v1::OpenTransportRequest {
                    dtype: 0,
                    ..open_req()
                },
                true,
                "dtype",
            ),
            (
                v1::OpenTransportRequest {
                    output_handles: vec![vec![0; 64]],
                    ..open_req()
                },
                true,
                "2 input buffers but 1",
            ),
            (
                v1::OpenTransportRequest {
                    rows: 0,
                    ..open_req()
                },
                true,
                "no buffers",
            ),
            (
                v1::OpenTransportRequest {
                    device_sync: true,
                    top_k: 0,
                    gate_flags_handle: vec![0; 64],
                    ..open_req()
                },
                true,
                "top_k",
            ),
            (
                v1::OpenTransportRequest {
                    device_sync: true,
                    top_k: 6,
                    ..open_req()
                },
                true,
                "flags buffer",
            ),
        ];
        for (req, on_cuda, why) in cases {
            let reason = worker_check(&req, "host-a", on_cuda, 16).expect_err("refused");
            assert!(reason.contains(why), "{reason} (expected {why})");
        }
    }

    #[test]
    fn the_device_layout_keeps_rows_ids_and_weights_apart_and_aligned() {
        let l = DeviceLayout::new(64, 2048, 2, 6);
        assert_eq!(l.ids, 64 * 2048 * 2);
        assert_eq!(l.weights, l.ids + 64 * 6 * 4); // 1536 bytes, a multiple of 256
        assert_eq!(l.bytes, l.weights + 64 * 6 * 4);
        // Odd sizes round each part up to 256 bytes.
        let l = DeviceLayout::new(3, 16, 4, 5);
        assert_eq!((l.ids, l.weights, l.bytes), (256, 512, 768));
        for rows in [1, 7, 256] {
            let l = DeviceLayout::new(rows, 24, 2, 3);
            assert!(l.ids >= rows * 24 * 2 && l.ids.is_multiple_of(256));
            assert!(l.weights >= l.ids + rows * 3 * 4 && l.weights.is_multiple_of(256));
            assert!(l.bytes >= l.weights + rows * 3 * 4);
        }
        // The flag words of two slots never overlap, and a ring holds RING calls per slot.
        let mut words = std::collections::HashSet::new();
        for slot in 0..2 {
            assert!(words.insert(flags::done(slot)));
            for seq in 1..=flags::RING as u32 {
                assert!(
                    words.insert(flags::seen(2, slot, seq)),
                    "slot {slot} seq {seq}"
                );
            }
        }
        assert_eq!(words.len(), flags::gate_words(2));
        assert!(words.iter().all(|&w| w < flags::gate_words(2)));
        assert_eq!(
            (
                flags::ready(0),
                flags::ready(1),
                flags::scratch(2, 0),
                flags::scratch(2, 1)
            ),
            (0, 1, 2, 3),
            "the worker's words"
        );
        assert_eq!(flags::worker_words(2), 4);
    }

    #[test]
    fn shared_assignments_use_each_tokens_row_and_check_bounds() {
        let req = v1::ForwardRequest {
            pairs_per_token: vec![2, 1],
            expert_ids: vec![3, 5, 7],
            weights: vec![0.5, 0.25, 1.0],
            ..Default::default()
        };
        let shared = v1::SharedActivations {
            rows: 10,
            token_rows: vec![9, 2],
            ..Default::default()
        };
        assert_eq!(
            shared_assignments(&req, &shared, 16).expect("valid"),
            vec![(9, 3, 0.5), (9, 5, 0.25), (2, 7, 1.0)]
        );
        let past = v1::SharedActivations {
            token_rows: vec![10, 2],
            ..shared.clone()
        };
        assert!(matches!(
            shared_assignments(&req, &past, 16),
            Err(MeshError::Invalid(m)) if m.contains("row 10")
        ));
        assert!(
            shared_assignments(&req, &shared, 8).is_err(),
            "over capacity"
        );
        let short = v1::SharedActivations {
            token_rows: vec![1],
            ..shared.clone()
        };
        assert!(shared_assignments(&req, &short, 16).is_err());
        let missing = v1::ForwardRequest {
            weights: vec![0.5],
            ..req.clone()
        };
        assert!(shared_assignments(&missing, &shared, 16).is_err());
    }
}
