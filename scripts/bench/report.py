#!/usr/bin/env python3
"""Table of scripts/gpu-check.sh's results: decode ms/step and tokens/s at each batch size, in
process and as a mesh, beside the memory-bandwidth floor and the HF transformers baseline; then
prefill. Usage: report.py OUT_DIR (with inproc.jsonl, mesh.jsonl, baseline_hf.json).

Floor: the bytes one decode step must read (every dense weight once, the routed experts the
batch touches, the KV of every sequence), divided by the device-to-device copy bandwidth
(bytes read + written) that hf_baseline.py measured in the same run.
"""
import json
import os
import sys

out = sys.argv[1]

# DeepSeek-V2-Lite shape (engine/src/synthetic.rs, scripts/bench/hf_baseline.py).
V, H, LAYERS, HEADS = 102400, 2048, 27, 16
NOPE, ROPE, VDIM, KV_LORA = 128, 64, 128, 512
E, K, I, SHARED, DENSE_I = 64, 6, 1408, 2, 10944
MOE_LAYERS = LAYERS - 1
BF16 = 2


def dense_weight_bytes():
    attn = H * HEADS * (NOPE + ROPE) + H * (KV_LORA + ROPE) + KV_LORA * HEADS * (NOPE + VDIM) + HEADS * VDIM * H
    shared = 3 * H * I * SHARED
    router = E * H * 2  # f32 router weights, counted as 2 bf16 elements
    dense_mlp = 3 * H * DENSE_I
    return BF16 * (LAYERS * attn + MOE_LAYERS * (shared + router) + dense_mlp + V * H)


def step_bytes(batch, context):
    touched = E * (1 - (1 - K / E) ** batch)  # expected distinct experts, uniform routing
    experts = MOE_LAYERS * touched * 3 * H * I * BF16
    kv = batch * context * LAYERS * (KV_LORA + ROPE) * BF16
    return dense_weight_bytes() + experts + kv


def load(name):
    rows = []
    path = os.path.join(out, name)
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


runs = load("inproc.jsonl") + load("mesh.jsonl")
hf = {}
if os.path.exists(os.path.join(out, "baseline_hf.json")):
    hf = json.load(open(os.path.join(out, "baseline_hf.json")))
bw = hf.get("copy_TBps_rw", 0) * 1e12


def pick(mode, concurrency=None, prompt_len=None):
    for r in runs:
        if r.get("mode") == mode and (concurrency is None or r["concurrency"] == concurrency) and (
            prompt_len is None or r["prompt_len"] == prompt_len
        ):
            return r
    return None


def ms_step(r):
    return r["itl_ms"]["p50"] if r and r.get("succeeded") else None


def fmt(v, spec):
    return format(v, spec) if v is not None else "—"


gpu = open(os.path.join(out, "gpus.txt")).read().strip().replace("\n", "; ") if os.path.exists(os.path.join(out, "gpus.txt")) else "?"
print(f"GPU: {gpu}")
print(f"copy bandwidth (read+write, measured this run): {fmt(bw / 1e12 if bw else None, '.2f')} TB/s")
print()
print("| batch | floor ms | in-process ms/step | tok/s | % of floor | unfused ms/step | mesh ms/step | tok/s | mesh/in-process | mesh µs per MoE layer | overlap-on mesh ms/step | HF ms/step | HF tok/s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for b in (1, 8, 32, 64):
    ctx = 128 + 16  # prompt + half the generated tokens
    floor = step_bytes(b, ctx) / bw * 1e3 if bw else None
    ip = ms_step(pick("in-process", b))
    uf = ms_step(pick("in-process-unfused", b))
    me = ms_step(pick("mesh-overlap-off", b))
    ov = ms_step(pick("mesh-overlap-on", b))
    hms = hf.get(f"decode_ms_per_step_b{b}")
    print(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            b,
            fmt(floor, ".2f"),
            fmt(ip, ".2f"),
            fmt(b / ip * 1e3 if ip else None, ".0f"),
            fmt(floor / ip * 100 if ip and floor else None, ".0f") + ("%" if ip and floor else ""),
            fmt(uf, ".2f"),
            fmt(me, ".2f"),
            fmt(b / me * 1e3 if me else None, ".0f"),
            fmt(ip / me * 100 if ip and me else None, ".0f") + ("%" if ip and me else ""),
            fmt((me - ip) / MOE_LAYERS * 1e3 if ip and me else None, ".0f"),
            fmt(ov, ".2f"),
            fmt(hms, ".1f"),
            fmt(hf.get(f"decode_tok_s_b{b}"), ".0f"),
        )
    )
print()
print("| prefill tokens | in-process tok/s | mesh tok/s | HF tok/s |")
print("| --- | --- | --- | --- |")
for L in (512, 2048):
    row = []
    for mode in ("in-process-prefill", "mesh-prefill"):
        r = pick(mode, 1, L)
        ttft = r["ttft_ms"]["p50"] if r and r.get("succeeded") else None
        row.append(fmt(L / ttft * 1e3 if ttft else None, ".0f"))
    print(f"| {L} | {row[0]} | {row[1]} | {fmt(hf.get(f'prefill_tok_s_b1_L{L}'), '.0f')} |")
