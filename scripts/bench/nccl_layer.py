#!/usr/bin/env python3
"""What one MoE layer's activations cost to move over NCCL between two GPUs of one host: the
gate's rows [B, hidden] (bf16) with their routing (ids i32, weights f32, [B, k]) to an expert
worker and the worker's f32 partial sums [B, hidden] back, as batched send/recv, one process per
GPU (issue 17's NCCL path, measured as a transport before it is built into the mesh).

    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 python3 scripts/bench/nccl_layer.py   # sockets
    python3 scripts/bench/nccl_layer.py                                          # NVLink (P2P)

Prints one JSON line per batch: the round trip's median over repeats (µs per layer) and the
bytes each way. Each layer includes PyTorch's launch of two batched send/recv groups on the
host (~120-150 µs: the floor that the P2P rows show), so compare transports within this
script, not with the mesh's per-layer overhead. (Capturing the layers in a CUDA graph to take
that floor out hung on 2026-11-27, with both transports.) NCCL_DEBUG=INFO (to stdout) says
which transport NCCL chose ("via NET/Socket", "via P2P/...").
NVLink multicast stays off (NCCL_NVLS_ENABLE=0), as the lent machines require.
"""
import json
import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDEN = int(os.environ.get("HIDDEN", "2048"))
TOP_K = int(os.environ.get("TOP_K", "6"))
BATCHES = [int(b) for b in os.environ.get("BATCHES", "1,64,256").split(",")]
ITERS = int(os.environ.get("ITERS", "260"))
REPEATS = int(os.environ.get("REPEATS", "7"))


def run(rank: int, port: int, out):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dev = torch.device("cuda", rank)
    peer = 1 - rank
    for b in BATCHES:
        x = torch.randn(b, HIDDEN, device=dev, dtype=torch.bfloat16)
        ids = torch.randint(0, 64, (b, TOP_K), device=dev, dtype=torch.int32)
        w = torch.rand(b, TOP_K, device=dev, dtype=torch.float32)
        y = torch.zeros(b, HIDDEN, device=dev, dtype=torch.float32)

        def layer():
            if rank == 0:
                ops = [dist.P2POp(dist.isend, t, peer) for t in (x, ids, w)]
                for r in dist.batch_isend_irecv(ops):
                    r.wait()
                for r in dist.batch_isend_irecv([dist.P2POp(dist.irecv, y, peer)]):
                    r.wait()
            else:
                ops = [dist.P2POp(dist.irecv, t, peer) for t in (x, ids, w)]
                for r in dist.batch_isend_irecv(ops):
                    r.wait()
                for r in dist.batch_isend_irecv([dist.P2POp(dist.isend, y, peer)]):
                    r.wait()

        for _ in range(50):
            layer()
        torch.cuda.synchronize()
        times = []
        for _ in range(REPEATS):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            dist.barrier()
            torch.cuda.synchronize()
            start.record()
            for _ in range(ITERS):
                layer()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / ITERS)
        if rank == 0:
            times.sort()
            out.put({
                "batch": b,
                "us_per_layer_p50": round(times[len(times) // 2], 1),
                "us_per_layer_min": round(times[0], 1),
                "bytes_to_worker": x.numel() * 2 + ids.numel() * 4 + w.numel() * 4,
                "bytes_back": y.numel() * 4,
                "p2p_disabled": os.environ.get("NCCL_P2P_DISABLE", "0"),
                "shm_disabled": os.environ.get("NCCL_SHM_DISABLE", "0"),
                "gpus": torch.cuda.get_device_name(0),
            })
    dist.destroy_process_group()


if __name__ == "__main__":
    if torch.cuda.device_count() < 2:
        sys.exit("needs two GPUs")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=run, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    while not q.empty():
        print(json.dumps(q.get()))
    sys.exit(max(p.exitcode for p in procs))
