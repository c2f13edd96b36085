#!/usr/bin/env bash
# Runs on a GPU machine, from the repository root: correctness checks, then benchmarks, then one
# table. Needs dist/moemesh-cuda.gz (or dist/moemesh-cuda) from scripts/build-cuda.sh.
#
#   scripts/gpu-check.sh                      # checks + benchmarks on cuda:0
#   scripts/gpu-check.sh --check              # correctness only
#   scripts/gpu-check.sh --bench              # benchmarks only
#   scripts/gpu-check.sh --profile            # ncu: kernel time of one decode step, batch 1 and 64
#   scripts/gpu-check.sh --sampling           # greedy vs sampled decoding, in-process and mesh
#   scripts/gpu-check.sh --lines              # issues 18 and 20's decode lines in one call
#   scripts/gpu-check.sh --graphs             # decode steps as CUDA graphs vs eager (in-process)
#   scripts/gpu-check.sh --api                # constrained output and prompt logprobs through the HTTP API
#   scripts/gpu-check.sh --prefill            # prefill: flash/grouped path vs the earlier one
#   scripts/gpu-check.sh --prefill-e2e        # prefill through the mesh, end-to-end at concurrency 64
#   scripts/gpu-check.sh --prefill-gemm       # prefill: wgmma grouped GEMM vs mma.sync (A/B, tokens)
#   scripts/gpu-check.sh --mesh-prefill       # where a mesh prefill's time goes (MPS, workers, metrics)
#     (MESH_PF_CONFIGS="2 auto;1 auto", MESH_PF_DECODE=1 decode ITL at batch 1 / 64, MESH_PF_E2E=1)
#   BINS="old.gz new.gz" scripts/gpu-check.sh --core   # serving core: in-process and mesh, c=1 and 64
#   scripts/gpu-check.sh --ipc                # expert data plane: CUDA IPC vs gRPC vs in-process
#   scripts/gpu-check.sh --multi              # gates and workers over 2 or 4 GPUs vs one GPU in-process
#   scripts/gpu-check.sh --rebalance          # Zipf-skewed router: throughput before/after `rebalance --apply`
#   scripts/gpu-check.sh --prefix             # prefix cache: multi-turn chat at 4 and 32 clients, step times
#   GATE_BINS="old.gz new.gz" scripts/gpu-check.sh --sampling   # the mesh once per gate binary
#   SKIP_MEMCHECK=1 scripts/gpu-check.sh --check   # without the compute-sanitizer pass (minutes)
#   EXPERT_DEVICES=cuda:1 scripts/gpu-check.sh --bench   # gate on GPU 0, expert workers on GPU 1
#
# Logs and JSON go to $OUT (default /tmp/moemesh-gpu); the table comes last.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
OUT=${OUT:-/tmp/moemesh-gpu}
mkdir -p "$OUT"
BIN=dist/moemesh-cuda
if [[ ! -x $BIN ]]; then
    BIN=/tmp/moemesh-cuda
    gunzip -c dist/moemesh-cuda.gz >"$BIN" && chmod +x "$BIN" || exit 1
fi
# cuBLAS/cuRAND/NVRTC 13 live beside PyTorch on the lent machines; libcuda is the driver's.
for d in /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib /usr/local/cuda/lib64; do
    [[ -d $d ]] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export MOEMESH_LOG=${MOEMESH_LOG:-warn}
PY=python3
[[ -x /opt/torch/.venv/bin/python3 ]] && PY=/opt/torch/.venv/bin/python3
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"
status=0
PORT=50161

# Starts `moemesh up ARGS…` in the background and waits for its ready line (60 s at most).
up() {
    "${UP_BIN:-$BIN}" up --listen "127.0.0.1:$PORT" "$@" >"$OUT/up.out" 2>"$OUT/up.err" &
    UP_PID=$!
    for _ in $(seq 600); do
        grep -q '"event":"ready"' "$OUT/up.out" 2>/dev/null && return 0
        kill -0 $UP_PID 2>/dev/null || { cat "$OUT/up.err"; return 1; }
        sleep 0.1
    done
    echo "moemesh up did not get ready" >&2
    return 1
}
# `mesh_sweeps SWEEP LABEL OUT`: the mesh at 127.0.0.1:$PORT, greedy then sampled (T 0.6,
# top_p 0.95), `bench --sweep SWEEP`, each record labelled "LABEL greedy|sampled" into OUT.
mesh_sweeps() {
    local how extra
    for how in greedy sampled; do
        extra=(); [[ $how == sampled ]] && extra=(--temperature 0.6 --top-p 0.95)
        "$BIN" bench --addr "127.0.0.1:$PORT" --sweep "$1" --prompt-len 128 --output-len 32 --json "${extra[@]}" \
            | sed "s/^{/{\"mode\":\"$2 $how\",/" >>"$3" || status=1
    done
}
down() {
    kill -TERM "$UP_PID" 2>/dev/null
    wait "$UP_PID" 2>/dev/null
}
# The prefill table of a JSON-lines file of `bench --json` results, each with "mode" and
# "prompt" added: TTFT p50, tokens/s (batch × prompt ÷ TTFT p50) and ITL p50 per run.
prefill_table() {
    $PY - "$1" <<'EOF'
import json, sys
print("| run | prompt | batch | TTFT p50 ms | prefill tok/s | ITL p50 ms |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for line in open(sys.argv[1]):
    r = json.loads(line)
    c, L, t = r["concurrency"], r["prompt"], r["ttft_ms"]["p50"]
    itl = (r.get("itl_ms") or {}).get("p50")
    print(f"| {r['mode']} | {L} | {c} | {t:.1f} | {c * L / t * 1e3:.0f} | {'' if itl is None else f'{itl:.2f}'} |")
EOF
}
# Whether two `generate --json` outputs (in-process, mesh; or the names in $4 and $5) hold the
# same 32 greedy tokens.
same_tokens() {
    $PY - "$1" "$2" "$3" "${4:-in-process}" "${5:-mesh}" <<'EOF'
import json, sys
def ids(path):
    out = []
    for line in open(path):
        if line.strip():
            out = json.loads(line).get("token_ids", out)
    return out
a, b = ids(sys.argv[1]), ids(sys.argv[2])
ok = len(a) == 32 and a == b
print(f"{sys.argv[3]:<32} {sys.argv[4]} {len(a)} tokens, {sys.argv[5]} {len(b)} tokens: {'equal' if ok else 'DIFFERENT'}")
sys.exit(0 if ok else 1)
EOF
}

if [[ $MODE == --profile ]]; then
    # One decode step (step 8 of the first wave) under Nsight Compute: every kernel's duration,
    # summed by kernel name, beside the step's wall time from the same bench's own timing.
    for b in 1 64; do
        echo "== ncu: one decode step, in-process, synthetic:v2-lite bf16, batch $b"
        MOEMESH_PROFILE_STEP=8 timeout 540 ncu --profile-from-start off --clock-control none \
            --metrics gpu__time_duration.sum --csv --print-units base \
            "$BIN" bench --in-process --model synthetic:v2-lite --device cuda:0 --dtype bf16 \
            --concurrency $b --requests $b --prompt-len 128 --output-len 12 --json \
            >"$OUT/ncu_b$b.csv" 2>"$OUT/ncu_b$b.err" || { tail -5 "$OUT/ncu_b$b.err"; status=1; }
        $PY scripts/bench/ncu_summary.py "$OUT/ncu_b$b.csv" | tee "$OUT/ncu_b$b.txt"
    done
    exit $status
fi

if [[ $MODE == --prefill ]]; then
    # In-process prefill with the prefill kernels (flash MLA prefill, grouped expert GEMM) and
    # without (MOEMESH_FLASH_PREFILL=0), same binary and card: one prompt of 512 / 2,048 / 8,192
    # tokens (TTFT p50 of 3 requests, the first warms up), a batch of 8 × 2,048 (p50 of 3 waves),
    # and the decode sweep, which must not regress. Then the kernel time of one 2,048-token
    # prefill (Nsight Compute, new path; Nsight Systems for both where it is installed).
    MODEL=synthetic:v2-lite
    IP=("$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 --json)
    : >"$OUT/prefill.jsonl"
    for fp in 1 0; do
        for L in 512 2048 8192; do
            MOEMESH_FLASH_PREFILL=$fp "${IP[@]}" --concurrency 1 --requests 3 --prompt-len $L --output-len 1 \
                | sed "s/^{/{\"mode\":\"in-process flash=$fp\",\"prompt\":$L,/" >>"$OUT/prefill.jsonl" || status=1
        done
        MOEMESH_FLASH_PREFILL=$fp "${IP[@]}" --concurrency 8 --requests 24 --prompt-len 2048 --output-len 1 \
            | sed "s/^{/{\"mode\":\"in-process flash=$fp batch 8\",\"prompt\":2048,/" >>"$OUT/prefill.jsonl" || status=1
        MOEMESH_FLASH_PREFILL=$fp "${IP[@]}" --sweep 1,8,32,64 --prompt-len 128 --output-len 32 \
            | sed "s/^{/{\"mode\":\"in-process decode flash=$fp\",\"prompt\":128,/" >>"$OUT/prefill.jsonl" || status=1
    done
    # Each kernel alone (the other part on the earlier path), and attention with the probabilities
    # rounded to bf16 (MOEMESH_PREFILL_ATTN=mma).
    for fp in attention experts; do
        MOEMESH_FLASH_PREFILL=$fp "${IP[@]}" --concurrency 1 --requests 3 --prompt-len 2048 --output-len 1 \
            | sed "s/^{/{\"mode\":\"in-process flash=$fp\",\"prompt\":2048,/" >>"$OUT/prefill.jsonl" || status=1
    done
    MOEMESH_PREFILL_ATTN=mma "${IP[@]}" --concurrency 1 --requests 3 --prompt-len 2048 --output-len 1 \
        | sed "s/^{/{\"mode\":\"in-process flash=1 attn=mma\",\"prompt\":2048,/" >>"$OUT/prefill.jsonl" || status=1
    echo "== ncu: one 2,048-token prefill (step 0), new path"
    MOEMESH_PROFILE_STEP=0 timeout 300 ncu --profile-from-start off --clock-control none \
        --metrics gpu__time_duration.sum --csv --print-units base "${IP[@]}" --concurrency 1 \
        --requests 1 --prompt-len 2048 --output-len 1 >"$OUT/ncu_prefill.csv" 2>"$OUT/ncu_prefill.err" \
        && $PY scripts/bench/ncu_summary.py "$OUT/ncu_prefill.csv" | tee "$OUT/ncu_prefill.txt" \
        || tail -5 "$OUT/ncu_prefill.err"
    if command -v nsys >/dev/null; then
        for fp in 1 0; do
            echo "== nsys: 2,048-token prefills, MOEMESH_FLASH_PREFILL=$fp"
            MOEMESH_FLASH_PREFILL=$fp timeout 200 nsys profile -o "$OUT/nsys_fp$fp" --force-overwrite true \
                "${IP[@]}" --concurrency 1 --requests 2 --prompt-len 2048 --output-len 1 >/dev/null 2>&1
            nsys stats --report cuda_gpu_kern_sum --format csv "$OUT/nsys_fp$fp.nsys-rep" \
                >"$OUT/nsys_fp$fp.csv" 2>/dev/null && head -25 "$OUT/nsys_fp$fp.csv"
        done
    fi
    prefill_table "$OUT/prefill.jsonl" | tee "$OUT/prefill.md"
    exit $status
fi

if [[ $MODE == --prefill-gemm ]]; then
    # The grouped expert GEMM's two forms on prefill-sized batches, same binary and card:
    # warp-specialised wgmma (default on sm_90a) and mma.sync (MOEMESH_PREFILL_GEMM=mma).
    # Greedy tokens after a 2,048-token prompt compared, then in-process prefill at 512 / 2,048 /
    # 8,192 tokens and 8 × 2,048 (TTFT p50), through the mesh at 2,048, and the kernel time of
    # one 2,048-token prefill (Nsight Compute, default form).
    MODEL=synthetic:v2-lite
    IP=("$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 --json)
    ids=$($PY -c "import random;r=random.Random(5);print(','.join(str(r.randrange(100,100000)) for _ in range(2048)))")
    common=(--model $MODEL --device cuda:0 --dtype bf16 --prompt-ids "$ids" --max-new-tokens 32 --ignore-eos --json)
    "$BIN" generate "${common[@]}" >"$OUT/gemm_wgmma.jsonl" || status=1
    MOEMESH_PREFILL_GEMM=mma "$BIN" generate "${common[@]}" >"$OUT/gemm_mma.jsonl" || status=1
    same_tokens "$OUT/gemm_wgmma.jsonl" "$OUT/gemm_mma.jsonl" "synthetic:v2-lite bf16, 2,048-token prompt" wgmma mma || status=1
    : >"$OUT/prefill.jsonl"
    # PF_GEMMS picks the forms (default both); SKIP_NCU=1 leaves the profile out.
    for g in ${PF_GEMMS:-wgmma mma}; do
        for L in 512 2048 8192; do
            MOEMESH_PREFILL_GEMM=$g "${IP[@]}" --concurrency 1 --requests 3 --prompt-len $L --output-len 1 \
                | sed "s/^{/{\"mode\":\"in-process gemm=$g\",\"prompt\":$L,/" >>"$OUT/prefill.jsonl" || status=1
        done
        MOEMESH_PREFILL_GEMM=$g "${IP[@]}" --concurrency 8 --requests 24 --prompt-len 2048 --output-len 1 \
            | sed "s/^{/{\"mode\":\"in-process gemm=$g batch 8\",\"prompt\":2048,/" >>"$OUT/prefill.jsonl" || status=1
        if MOEMESH_PREFILL_GEMM=$g up --model $MODEL --dtype bf16 --expert-workers 2 --device cuda:0 \
            --gate-args=--kv-cache-mb=16384; then
            "$BIN" bench --addr "127.0.0.1:$PORT" --concurrency 1 --requests 3 --prompt-len 2048 --output-len 1 --json \
                | sed "s/^{/{\"mode\":\"mesh gemm=$g\",\"prompt\":2048,/" >>"$OUT/prefill.jsonl" || status=1
            down
        else
            status=1
        fi
    done
    if [[ -z ${SKIP_NCU:-} ]]; then
        echo "== ncu: one 2,048-token prefill (step 0), default form"
        MOEMESH_PROFILE_STEP=0 timeout 300 ncu --profile-from-start off --clock-control none \
            --metrics gpu__time_duration.sum --csv --print-units base "${IP[@]}" --concurrency 1 \
            --requests 1 --prompt-len 2048 --output-len 1 >"$OUT/ncu_prefill.csv" 2>"$OUT/ncu_prefill.err" \
            && $PY scripts/bench/ncu_summary.py "$OUT/ncu_prefill.csv" | tee "$OUT/ncu_prefill.txt" \
            || tail -5 "$OUT/ncu_prefill.err"
    fi
    prefill_table "$OUT/prefill.jsonl" | tee "$OUT/prefill.md"
    exit $status
fi

if [[ $MODE == --mesh-prefill ]]; then
    # One 2,048-token prompt through the mesh (TTFT p50 of 3) under a few set-ups, each followed
    # by the roles' step, dispatch and forward histograms (sum / count), and the same in-process.
    MODEL=synthetic:v2-lite
    MP=9400
    : >"$OUT/meshpf.jsonl"
    # Set-ups: workers, MPS, then extra `up` flags (MESH_PF_CONFIGS overrides; ';' between).
    IFS=';' read -ra cfgs <<<"${MESH_PF_CONFIGS:-2 auto;2 off;1 auto}"
    for cfg in "${cfgs[@]}"; do
        set -- $cfg
        w=$1 m=$2
        shift 2
        if up --model $MODEL --dtype bf16 --expert-workers $w --device cuda:0 --mps $m \
            --gate-args=--kv-cache-mb=16384 --metrics-base-port $MP "$@"; then
            for L in 2048 128; do
                "$BIN" bench --addr "127.0.0.1:$PORT" --concurrency 1 --requests 3 --prompt-len $L --output-len 1 --json \
                    | sed "s/^{/{\"mode\":\"mesh $cfg\",\"prompt\":$L,/" >>"$OUT/meshpf.jsonl" || status=1
            done
            # MESH_PF_DECODE=1: decode ITL at batch 1 and 64 (16-token prompts, 128 new tokens).
            if [[ -n ${MESH_PF_DECODE:-} ]]; then
                for c in 1 64; do
                    "$BIN" bench --addr "127.0.0.1:$PORT" --concurrency $c --requests $((c == 1 ? 3 : 64)) --prompt-len 16 \
                        --output-len 128 --json | sed "s/^{/{\"mode\":\"mesh $cfg decode\",\"prompt\":16,/" >>"$OUT/meshpf.jsonl" || status=1
                done
            fi
            # MESH_PF_E2E=1: then end to end at concurrency 64 on the same mesh (steady state).
            if [[ -n ${MESH_PF_E2E:-} ]]; then
                for po in 128/32 1024/256; do
                    "$BIN" bench --addr "127.0.0.1:$PORT" --concurrency 64 --requests 64 --prompt-len ${po%/*} \
                        --output-len ${po#*/} --json | tee -a "$OUT/meshpf_e2e.jsonl" | cut -c1-400 || status=1
                done
            fi
            for i in $(seq 1 $((1 + w))); do
                echo "-- $cfg, metrics port $((MP + i))"
                curl -s "127.0.0.1:$((MP + i))/metrics" | grep -E "step_duration|dispatch_duration|forward_duration" | grep -v "^#" | head -24
            done
            down
        else
            status=1
        fi
    done
    "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 --json --concurrency 1 --requests 3 \
        --prompt-len 2048 --output-len 1 | sed 's/^{/{"mode":"in-process","prompt":2048,/' >>"$OUT/meshpf.jsonl" || status=1
    if [[ -n ${MESH_PF_DECODE:-} ]]; then
        for c in 1 64; do
            "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 --json --concurrency $c \
                --requests $((c == 1 ? 3 : 64)) --prompt-len 16 --output-len 128 \
                | sed 's/^{/{"mode":"in-process decode","prompt":16,/' >>"$OUT/meshpf.jsonl" || status=1
        done
    fi
    if [[ -n ${MESH_PF_E2E:-} ]]; then
        "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 --json --concurrency 64 --requests 64 \
            --prompt-len 128 --output-len 32 | tee -a "$OUT/meshpf_e2e.jsonl" | cut -c1-400 || status=1
    fi
    prefill_table "$OUT/meshpf.jsonl" | tee "$OUT/meshpf.md"
    exit $status
fi

if [[ $MODE == --prefill-e2e ]]; then
    # Through the mesh (gate + 2 expert workers on the one GPU), with and without the prefill
    # kernels (`moemesh up` passes MOEMESH_FLASH_PREFILL to the roles it starts): one prompt of
    # 512 / 2,048 / 8,192 tokens, then end to end at concurrency 64 (128/32 and 1,024/256), the
    # latter also in-process.
    MODEL=synthetic:v2-lite
    : >"$OUT/e2e.jsonl"
    E2E=(--concurrency 64 --requests 64 --json)
    # FLASH_MODES="1" skips the earlier path (minutes).
    for fp in ${FLASH_MODES:-1 0}; do
        if MOEMESH_FLASH_PREFILL=$fp up --model $MODEL --dtype bf16 --expert-workers 2 --device cuda:0 \
            --gate-args=--kv-cache-mb=16384; then
            lens="512 2048 8192"
            [[ $fp == 0 ]] && lens="512 2048"  # the earlier path takes minutes at 8,192
            for L in $lens; do
                "$BIN" bench --addr "127.0.0.1:$PORT" --concurrency 1 --requests 3 --prompt-len $L --output-len 1 --json \
                    | sed "s/^{/{\"mode\":\"mesh flash=$fp\",\"prompt\":$L,\"out\":1,/" >>"$OUT/e2e.jsonl" || status=1
            done
            if [[ $fp == 1 ]]; then
                for po in 128/32 1024/256; do
                    "$BIN" bench --addr "127.0.0.1:$PORT" "${E2E[@]}" --prompt-len ${po%/*} --output-len ${po#*/} \
                        | sed "s/^{/{\"mode\":\"mesh e2e flash=$fp\",\"prompt\":${po%/*},\"out\":${po#*/},/" >>"$OUT/e2e.jsonl" || status=1
                done
            fi
            down
        else
            status=1
        fi
    done
    for po in 128/32 1024/256; do
        "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 "${E2E[@]}" --prompt-len ${po%/*} \
            --output-len ${po#*/} | sed "s/^{/{\"mode\":\"in-process e2e flash=1\",\"prompt\":${po%/*},\"out\":${po#*/},/" \
            >>"$OUT/e2e.jsonl" || status=1
    done
    $PY - "$OUT/e2e.jsonl" <<'EOF2' | tee "$OUT/e2e.md"
import json, sys
print("| run | prompt / new | concurrency | output tok/s | TTFT p50 ms | ITL p50 ms | prefill tok/s (c=1) |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
for line in open(sys.argv[1]):
    r = json.loads(line)
    c, L, t = r["concurrency"], r["prompt"], r["ttft_ms"]["p50"]
    pf = f"{L / t * 1e3:.0f}" if c == 1 else ""
    itl = (r.get("itl_ms") or {}).get("p50")
    print(f"| {r['mode']} | {L} / {r['out']} | {c} | {r['output_tokens_per_s']:.0f} | {t:.1f} | {'' if itl is None else f'{itl:.2f}'} | {pf} |")
EOF2
    if [[ -z ${SKIP_HF:-} ]]; then
        echo "== HF transformers baseline (scripts/bench/hf_baseline.py)"
        OUT=$OUT PYTHONUNBUFFERED=1 timeout 240 $PY scripts/bench/hf_baseline.py >"$OUT/hf.txt" 2>&1 || tail -5 "$OUT/hf.txt"
        grep -i prefill "$OUT/hf.txt"
    fi
    exit $status
fi

if [[ $MODE == --core ]]; then
    # The serving core before and after a change: for each gzipped moemesh-cuda binary in BINS
    # (in order; default: $BIN alone), in-process and through the mesh (gate + 2 workers on the
    # one GPU), greedy, 128-token prompts and 32 new tokens, requests at concurrency 1 and 64
    # (prompts included), all in one call so that every row shares the machine.
    MODEL=synthetic:v2-lite
    BENCH=(--prompt-len 128 --output-len 32 --json)
    : >"$OUT/core.jsonl"
    for gz in ${BINS:-$BIN}; do
        name=$(basename "$gz" .gz)
        B=$gz
        if [[ $gz == *.gz ]]; then
            B=/tmp/core-$name; gunzip -c "$gz" >"$B" && chmod +x "$B" || { status=1; continue; }
        fi
        for c in 1 64; do
            "$B" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 --concurrency $c \
                --requests $((c == 1 ? 8 : 128)) "${BENCH[@]}" \
                | sed "s/^{/{\"mode\":\"in-process $name\",/" >>"$OUT/core.jsonl" || status=1
        done
        if UP_BIN=$B up --model $MODEL --dtype bf16 --expert-workers 2 --device cuda:0 \
            --gate-args=--kv-cache-mb=16384; then
            for c in 1 64; do
                "$B" bench --addr "127.0.0.1:$PORT" --concurrency $c --requests $((c == 1 ? 8 : 128)) \
                    "${BENCH[@]}" | sed "s/^{/{\"mode\":\"mesh $name\",/" >>"$OUT/core.jsonl" || status=1
            done
            down
        else
            status=1
        fi
    done
    $PY - "$OUT/core.jsonl" <<'EOF2' | tee "$OUT/core.md"
import json, sys
print("| run | concurrency | output tok/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for line in open(sys.argv[1]):
    r = json.loads(line)
    itl = r.get("itl_ms") or {}
    print(f"| {r['mode']} | {r['concurrency']} | {r['output_tokens_per_s']:.0f} | {r['ttft_ms']['p50']:.1f} | {itl.get('p50', 0):.2f} | {itl.get('p99', 0):.2f} |")
EOF2
    exit $status
fi

if [[ $MODE == --multi ]]; then
    # Several GPUs of one host (issue 17): gates and expert workers spread over them, against
    # one GPU in-process, same binary and call. The default layout is the best measured: a gate
    # and a whole replica of the experts on every GPU, each gate preferring the replica beside
    # it (`--expert-workers 1 --expert-replicas N`; 4 × H200, session 14: 3.0–3.2× one GPU
    # in-process at c1,024, where 4 gates on two GPUs with the experts sharded over the other two
    # gave 1.4–1.85×, and a gate and a half of the experts on each of two GPUs gave 1.46×).
    # Decode at batch 1, 64 and 256, end to end at concurrency 256, 512 and 1,024 on 4 GPUs (64,
    # 256 and 512 on 2; 128 / 32, prompts included), then the greedy tokens of two fixtures
    # through that mesh against in-process (f32, must be equal).
    # GATES overrides the number of gates on 4 GPUs, MULTI_CONC the end-to-end concurrencies of
    # the mesh, INPROC_CONC the one-GPU run's (same default), MULTI_LAYOUT the whole layout
    # (the `up` flags after --model and --dtype; it names --expert-workers itself), e.g. the
    # sharded "--device cuda:0 --gates 2 --gate-devices cuda:0,cuda:1 --expert-workers 2
    # --expert-devices cuda:0,cuda:1".
    MODEL=synthetic:v2-lite
    BENCH=(--prompt-len 128 --output-len 32 --json)
    n=$(nvidia-smi -L | wc -l)
    if (( n >= 4 )); then
        layout=(--device cuda:0 --gates "${GATES:-4}" --gate-devices cuda:0,cuda:1,cuda:2,cuda:3
            --expert-workers 1 --expert-replicas 4 --expert-devices cuda:0,cuda:1,cuda:2,cuda:3)
        conc="256 512 1024"
    else
        layout=(--device cuda:0 --gates 2 --gate-devices cuda:0,cuda:1
            --expert-workers 1 --expert-replicas 2 --expert-devices cuda:0,cuda:1)
        conc="64 256 512"
    fi
    [[ -n ${MULTI_LAYOUT:-} ]] && read -ra layout <<<"$MULTI_LAYOUT"
    echo "layout on $n GPUs: ${layout[*]}"
    : >"$OUT/ipc.jsonl"
    MESH_LOG="warn,moemesh_gate::workers=info,moemesh_expert::service=info"
    t0=$SECONDS
    [[ -z ${MULTI_SKIP_INPROC:-} ]] && { "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 --sweep 1,64,256 "${BENCH[@]}" \
        | sed 's/^{/{"mode":"in-process",/' >>"$OUT/ipc.jsonl" || status=1; }
    for c in ${INPROC_CONC-$conc}; do
        "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 --concurrency $c --requests $((2 * c)) "${BENCH[@]}" \
            | sed 's/^{/{"mode":"in-process e2e",/' >>"$OUT/ipc.jsonl" || status=1
    done
    echo "== in-process: $((SECONDS - t0)) s"; t0=$SECONDS
    # Connections the kernel dropped from a full accept queue (clients see resets; session 32
    # found 7% of c1,024's calls lost that way with a backlog of 128): must stay 0.
    listen_drops() { awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "ListenDrops") c = i; h = 1 } else print $c }' /proc/net/netstat; }
    if MOEMESH_LOG=$MESH_LOG up --model $MODEL --dtype bf16 "${layout[@]}" --gate-args=--kv-cache-mb=8192; then
        drops=$(listen_drops)
        "$BIN" bench --addr "127.0.0.1:$PORT" --sweep 1,64,256 "${BENCH[@]}" \
            | sed 's/^{/{"mode":"mesh multi",/' >>"$OUT/ipc.jsonl" || status=1
        for c in ${MULTI_CONC:-$conc}; do
            "$BIN" bench --addr "127.0.0.1:$PORT" --concurrency $c --requests $((2 * c)) "${BENCH[@]}" \
                | sed 's/^{/{"mode":"mesh multi e2e",/' >>"$OUT/ipc.jsonl" || status=1
        done
        echo "TCP listen drops during the mesh's runs: $(($(listen_drops) - drops))"
        down
        # The mesh's log (the fixture runs below start their own): its warnings and errors.
        cp "$OUT/up.err" "$OUT/mesh_up.err"
        grep -h 'MPS\|gate [0-9] on\|WARN\|ERROR' "$OUT/mesh_up.err" | sed 's/\x1b\[[0-9;]*m//g' \
            | sed 's/^[0-9T:.Z-]* *//' | cut -c1-300 | sort | uniq -c | sort -rn | head -16
    else
        status=1
    fi
    echo "== mesh: $((SECONDS - t0)) s"
    for fx in tiny-deepseek-v3 tiny-deepseek-v2-lite; do
        ids=$($PY -c "import json;print(','.join(map(str,json.load(open('tests/fixtures/$fx/reference.json'))['prompts'][2]['input_ids'])))" 2>/dev/null || echo 5,17,42,7,99,300,12)
        common=(--prompt-ids "$ids" --max-new-tokens 32 --ignore-eos --json)
        "$BIN" generate --model "tests/fixtures/$fx" --device cuda:0 --dtype f32 "${common[@]}" >"$OUT/inproc_$fx.jsonl" || status=1
        if MOEMESH_LOG=$MESH_LOG up --model "tests/fixtures/$fx" --dtype f32 "${layout[@]}"; then
            "$BIN" generate --addr "127.0.0.1:$PORT" "${common[@]}" >"$OUT/mesh_$fx.jsonl" || status=1
            down
        else
            status=1
        fi
        same_tokens "$OUT/inproc_$fx.jsonl" "$OUT/mesh_$fx.jsonl" "$fx f32 multi-GPU" || status=1
    done
    $PY scripts/bench/ipc_report.py "$OUT/ipc.jsonl" | tee "$OUT/ipc.md"
    exit $status
fi

if [[ $MODE == --prefix ]]; then
    # Issue 21's multi-turn chat (1,524-1,636-id prompts sharing a 1,500-id system prompt, 32
    # new tokens, greedy) against `moemesh up` (gate + 2 workers on the one GPU), prefix cache
    # off then on, at 4 clients (the committed scenario) and PREFIX_CLIENTS more (default 32: one
    # conversation each, generated here). Each run's log has the frontend's step times
    # (`moemesh_frontend::step_time`), summarised by scripts/bench/step_times.py: where a first
    # token's time goes. PREFIX_CACHE picks the settings (default "false true").
    n=${PREFIX_CLIENTS:-32}
    $PY loadtest/make-token-chat.py --conversations "$n" --concurrency "$n" --out "$OUT/multi-turn-chat-tokens-$n.json" || exit 1
    for sc in ${PREFIX_SCENARIOS:-multi-turn-chat-tokens $OUT/multi-turn-chat-tokens-$n.json}; do
        for pc in ${PREFIX_CACHE:-false true}; do
            name="$(basename "$sc" .json)-cache-$pc"
            t0=$SECONDS
            MOEMESH_LOG=warn,moemesh_frontend::step_time=debug MOEMESH_PREFIX_CACHE=$pc MOEMESH=$BIN \
                MOEMESH_LOADTEST_TOOL=bench MOEMESH_MODEL=synthetic:v2-lite MOEMESH_DTYPE=bf16 MOEMESH_DEVICE=cuda:0 \
                loadtest/run.sh --up --out "$OUT/$name" "$sc" >"$OUT/$name.txt" 2>&1 || status=1
            echo "== $name ($((SECONDS - t0)) s)"
            grep '^| ' "$OUT/$name/summary.md" | tail -1
            $PY scripts/bench/step_times.py "$OUT/$name/mesh-logs/up.err"
            gzip -f "$OUT/$name/mesh-logs/up.err"
        done
    done
    exit $status
fi

if [[ $MODE == --rebalance ]]; then
    # Issue 22 on the GPU: the mesh with its router skewed (`--router-skew`, Zipf exponent
    # REBALANCE_SKEW, default 1), end to end before and after `moemesh rebalance --apply` (live
    # re-placement by measured load), with a real etcd (etcd on PATH, or .etcd/etcd.gz carried).
    # Layout: the gate on cuda:0 and one worker on each other GPU (REBALANCE_LAYOUT overrides;
    # on one GPU, the gate and 2 workers on it). Each phase: decode at batch 64 and 256, end to
    # end at concurrency 64 and 256 (128 / 32, prompts included), REBALANCE_ROUNDS times.
    MODEL=synthetic:v2-lite
    ETCD=$(command -v etcd || true)
    if [[ -z $ETCD && -f .etcd/etcd.gz ]]; then
        ETCD=/tmp/etcd; gunzip -c .etcd/etcd.gz >$ETCD && chmod +x $ETCD
    fi
    [[ -n $ETCD ]] || { echo "no etcd: install etcd-server or carry .etcd/etcd.gz"; exit 1; }
    rm -rf /tmp/rb-etcd
    $ETCD --data-dir /tmp/rb-etcd --listen-client-urls http://127.0.0.1:23791 \
        --advertise-client-urls http://127.0.0.1:23791 --listen-peer-urls http://127.0.0.1:23801 \
        --initial-advertise-peer-urls http://127.0.0.1:23801 --initial-cluster default=http://127.0.0.1:23801 \
        >"$OUT/etcd.log" 2>&1 &
    ETCD_PID=$!
    n=$(nvidia-smi -L | wc -l)
    if (( n >= 2 )); then
        devs=$(seq -s, -f 'cuda:%g' 1 $((n - 1)))
        layout=(--device cuda:0 --expert-workers $((n - 1)) --expert-devices "$devs")
    else
        layout=(--device cuda:0 --expert-workers 2)
    fi
    [[ -n ${REBALANCE_LAYOUT:-} ]] && read -ra layout <<<"$REBALANCE_LAYOUT"
    echo "layout on $n GPUs: ${layout[*]}, skew ${REBALANCE_SKEW:-1}"
    : >"$OUT/ipc.jsonl"
    if MOEMESH_LOG="warn,moemesh_gate::workers=info" up --model $MODEL --dtype bf16 --etcd http://127.0.0.1:23791 --plaintext \
        --router-skew "${REBALANCE_SKEW:-1}" "${layout[@]}" --gate-args=--kv-cache-mb=8192; then
        gate=$(grep -o 'gate 0 on [0-9.:]*' "$OUT/up.err" | awk '{print $4}')
        [[ -n $gate ]] || { echo "no gate address in up's log ($OUT/up.err)"; status=1; }
        phase() {
            "$BIN" bench --addr "127.0.0.1:$PORT" --sweep 64,256 --prompt-len 128 --output-len 32 --json \
                | sed "s/^{/{\"mode\":\"$1\",/" >>"$OUT/ipc.jsonl" || status=1
            for c in 64 256; do
                "$BIN" bench --addr "127.0.0.1:$PORT" --concurrency $c --requests $((2 * c)) --prompt-len 128 \
                    --output-len 32 --json | sed "s/^{/{\"mode\":\"$1 e2e\",/" >>"$OUT/ipc.jsonl" || status=1
            done
        }
        # REBALANCE_ROUNDS (default 1): each phase that many times on the same mesh, so that a
        # first run's warm-up is told from the move's effect.
        for r in $(seq "${REBALANCE_ROUNDS:-1}"); do phase "skewed, before, run $r"; done
        "$BIN" rebalance --addr "$gate" 2>&1 | tee "$OUT/rebalance_plan.txt" | tail -25
        t0=$SECONDS
        "$BIN" rebalance --addr "$gate" --apply 2>&1 | tee "$OUT/rebalance_apply.txt" | tail -8 || status=1
        echo "== applied in $((SECONDS - t0)) s"
        for r in $(seq "${REBALANCE_ROUNDS:-1}"); do phase "skewed, after, run $r"; done
        "$BIN" rebalance --addr "$gate" 2>&1 | tail -6
        grep -h 'plan changed\|captured as a CUDA graph' "$OUT/up.err" | wc -l | sed 's/^/plan\/graph log lines: /'
        down
    else
        status=1
    fi
    kill $ETCD_PID 2>/dev/null
    $PY scripts/bench/ipc_report.py "$OUT/ipc.jsonl" | tee "$OUT/ipc.md"
    exit $status
fi

if [[ $MODE == --ipc ]]; then
    # The expert data plane (issue 17): the mesh (gate + 2 expert workers on the one GPU, or on
    # EXPERT_DEVICES) with the activations on CUDA IPC (`--expert-transport auto`) and on gRPC
    # (`--expert-transport grpc`, the baseline), against in-process, same binary and card: decode
    # at batch 1 and 64 (128-token prompts, 32 new tokens; ms/step = ITL p50) and end to end at
    # concurrency 64 (128 / 32, prompts included). Then the greedy tokens of two fixtures through
    # the IPC mesh against in-process (f32, must be equal). Each phase prints its wall time.
    # IPC_RUNS picks the runs: ipc (device-ordered), ipc-host (host-ordered), grpc, ipc-overlap,
    # in-process, *-nomps (no MPS: `up --mps off`), ipc-mps / grpc-mps / ipc-host-mps (the
    # mesh under an MPS daemon started for the run) and ipc-failover / grpc-failover (a worker
    # killed and one stopped mid-load, with replicas). The default includes ipc-nomps: the one
    # configuration where the gate must not spin while it waits (it time-slices the GPU with its
    # workers), so a change to the waits shows there first.
    MODEL=synthetic:v2-lite
    BENCH=(--prompt-len 128 --output-len 32 --json)
    E2E=(--concurrency 64 --requests 64 --prompt-len 128 --output-len 32 --json)
    ED=${EXPERT_DEVICES:-}
    dev_args=(--device cuda:0)
    [[ -n $ED ]] && dev_args+=(--expert-devices "$ED")
    : >"$OUT/ipc.jsonl"
    MESH_LOG="warn,moemesh_gate::workers=info,moemesh_expert::service=info,moemesh_engine::graphs=debug,moemesh_gate::watch=debug"
    for run in ${IPC_RUNS:-ipc ipc-nomps grpc ipc-overlap in-process}; do
        t0=$SECONDS
        case $run in
            in-process)
                "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 --sweep 1,64 "${BENCH[@]}" \
                    | sed "s/^{/{\"mode\":\"$run\",/" >>"$OUT/ipc.jsonl" || status=1
                "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 "${E2E[@]}" \
                    | sed "s/^{/{\"mode\":\"$run e2e\",/" >>"$OUT/ipc.jsonl" || status=1
                if [[ -n ${IPC_E2E_LONG:-} ]]; then
                    "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 --concurrency 64 --requests 64 \
                        --prompt-len 1024 --output-len 256 --json \
                        | sed "s/^{/{\"mode\":\"$run 1024 \/ 256 e2e\",/" >>"$OUT/ipc.jsonl" || status=1
                fi
                ;;
            *-failover*)
                # A worker hung mid-load (SIGSTOP), with a replica (`up --expert-replicas 2`):
                # every request must still succeed, the hung worker found by the per-call
                # deadline (--expert-timeout 5) and its share re-sent to the replica. (A killed
                # worker makes `up` stop the whole mesh, so the kill is left to the CPU tests,
                # which run their own processes.)
                t=auto; [[ $run == grpc* ]] && t=grpc
                # FAILOVER_WORKERS (default 2) shards, each twice: the lent H100s take at most
                # three MPS clients per GPU (a fourth process's context fails with "out of
                # memory"), so on one GPU under MPS use 1 (the gate and two replicas).
                # *-nomps*: no MPS (`up --mps off`: the processes time-slice the GPU, and
                # `--expert-graphs auto` leaves graphs off on one GPU); *-graphs: graphs forced on.
                fo_args=()
                [[ $run == *-nomps* ]] && fo_args+=(--mps off)
                [[ $run == *-graphs* ]] && fo_args+=(--gate-args=--expert-graphs=on)
                if MOEMESH_LOG=$MESH_LOG up --model ${FAILOVER_MODEL:-$MODEL} --dtype bf16 --expert-workers ${FAILOVER_WORKERS:-2} --expert-replicas 2 \
                    "${dev_args[@]}" --gate-args=--kv-cache-mb=4096 --gate-args=--expert-transport=$t \
                    --gate-args=--expert-timeout=5 "${fo_args[@]}"; then
                    # A first wave before the fault, so that no process is stopped inside a
                    # first-use setup (cuBLAS, modules) rather than mid-load.
                    "$BIN" bench --addr "127.0.0.1:$PORT" --concurrency 4 --requests 4 --prompt-len 128 \
                        --output-len 8 --json >/dev/null || status=1
                    "$BIN" bench --addr "127.0.0.1:$PORT" --concurrency 64 --requests ${FAILOVER_REQUESTS:-192} --prompt-len 128 \
                        --output-len 64 --json >"$OUT/failover_$run.json" &
                    BENCH_PID=$!
                    hung=$(grep -o "expert worker 0 replica 0 .*pid [0-9]*" "$OUT/up.err" | grep -o '[0-9]*$' | head -1)
                    sleep 3; kill -STOP "$hung" && echo "stopped worker 0 replica 0 (pid $hung) mid-load"
                    # A run that hangs is cut after FAILOVER_LIMIT seconds (default 150), with
                    # where every thread of the mesh's processes waits (kernel wait channel).
                    (
                        sleep "${FAILOVER_LIMIT:-150}"
                        echo "failover run still going after ${FAILOVER_LIMIT:-150} s: threads of the mesh"
                        for p in $(pgrep -f "moemesh-cuda (gate|expert|frontend) "); do
                            for t in /proc/$p/task/*; do
                                echo "pid $p $(cat $t/comm 2>/dev/null) $(awk '{print $3}' $t/stat 2>/dev/null) $(cat $t/wchan 2>/dev/null)"
                            done | sort | uniq -c | sort -rn | head -12
                        done
                        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
                        echo "the watch's lines so far:"
                        grep -h 'moemesh_gate::watch\|missed its deadline' "$OUT/up.err" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220 | tail -6
                        kill $BENCH_PID
                    ) 2>&1 | tee -a "$OUT/failover.txt" &
                    WATCHDOG=$!
                    wait $BENCH_PID || status=1
                    pkill -P $WATCHDOG sleep 2>/dev/null; kill $WATCHDOG 2>/dev/null
                    kill -CONT "$hung"
                    down
                    $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"$run: {r['succeeded']}/{r['requests']} requests ok, errors {r['errors']}, {r['output_tokens_per_s']:.0f} output tok/s\")" \
                        "$OUT/failover_$run.json" | tee -a "$OUT/failover.txt"
                    echo "the watch's last lines (moemesh_gate::watch):"
                    grep -h 'moemesh_gate::watch' "$OUT/up.err" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220 | tail -6 | tee -a "$OUT/failover.txt"
                    echo "retried calls: $(grep -c 'retrying on another replica' "$OUT/up.err"), device-ordered calls past their deadline: $(grep -c 'missed its deadline' "$OUT/up.err"), steps run again: $(grep -c 'running it again' "$OUT/up.err"), decode graphs captured: $(grep -c 'captured as a CUDA graph' "$OUT/up.err"), graph plans dropped: $(grep -c "plan changed" "$OUT/up.err")" | tee -a "$OUT/failover.txt"
                    grep -o 'expert call failed; retrying on another replica.\{0,200\}' "$OUT/up.err" | sed 's/\x1b\[[0-9;]*m//g' \
                        | head -3 | tee -a "$OUT/failover.txt"
                else
                    status=1
                fi
                ;;
            *)
                t=auto; [[ $run == grpc* ]] && t=grpc
                if [[ $run == *-mps ]]; then
                    # MPS lets the three processes' kernels run at once instead of time-slicing
                    # the GPU; the daemon is this run's own and stops after it.
                    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
                    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
                    nvidia-cuda-mps-control -d || { echo "no MPS here"; continue; }
                fi
                gate_args=(--gate-args=--kv-cache-mb=16384 --gate-args=--expert-transport=$t)
                [[ $run == ipc-overlap* ]] && gate_args+=(--gate-args=--overlap=true)
                # The host-ordered handshake (each call synchronised on both hosts), for comparison
                # with the default device-ordered one.
                [[ $run == ipc-host* ]] && gate_args+=(--gate-args=--expert-ipc-sync=host)
                # Decode steps queued layer by layer from the gate's host (no CUDA graphs), for
                # comparison with the default (graphs where `--expert-graphs auto` allows them).
                [[ $run == ipc-eager* ]] && gate_args+=(--gate-args=--expert-graphs=off)
                # The workers' device-ordered waits on the stream (`cuStreamWaitValue32`) instead
                # of a spinning kernel (the default under MPS).
                if [[ $run == *-streamwait ]]; then export MOEMESH_IPC_WAIT=stream; else unset MOEMESH_IPC_WAIT; fi
                # `up` runs the processes under a private MPS daemon when they share a GPU
                # (--mps auto); *-nomps runs leave them to time-slice it.
                [[ $run == *-nomps ]] && gate_args+=(--mps off)
                metrics_args=()
                [[ -n ${SCRAPE:-} ]] && metrics_args=(--metrics-base-port 9300)
                if MOEMESH_LOG=$MESH_LOG up --model $MODEL --dtype bf16 --expert-workers 2 "${dev_args[@]}" "${gate_args[@]}" "${metrics_args[@]}"; then
                    if [[ -n ${SCRAPE:-} ]]; then
                        # Batch 1 only, then where a layer call's time goes: the gate's whole call
                        # (dispatch histogram) against the worker's compute (forward histogram).
                        "$BIN" bench --addr "127.0.0.1:$PORT" --concurrency 1 --requests 3 --prompt-len 16 \
                            --output-len 64 --json >/dev/null || status=1
                        $PY - "$run" >>"$OUT/scrape.txt" <<'EOF'
import re, sys, urllib.request
def mean(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    s = sum(float(v) for v in re.findall(rf"^{name}_sum(?:{{[^}}]*}})? (\S+)$", text, re.M))
    n = sum(float(v) for v in re.findall(rf"^{name}_count(?:{{[^}}]*}})? (\S+)$", text, re.M))
    return s / n * 1e6 if n else float("nan"), n
d, dn = mean(9301, "moemesh_gate_expert_dispatch_duration_seconds")
f, fn = mean(9302, "moemesh_expert_forward_duration_seconds")
print(f"{sys.argv[1]}: batch 1, per layer call: gate dispatch {d:.0f} us mean ({dn:.0f} calls), worker 0 forward {f:.0f} us mean ({fn:.0f} calls)")
EOF
                    fi
                    "$BIN" bench --addr "127.0.0.1:$PORT" --sweep 1,64 "${BENCH[@]}" \
                        | sed "s/^{/{\"mode\":\"mesh $run\",/" >>"$OUT/ipc.jsonl" || status=1
                    "$BIN" bench --addr "127.0.0.1:$PORT" "${E2E[@]}" \
                        | sed "s/^{/{\"mode\":\"mesh $run e2e\",/" >>"$OUT/ipc.jsonl" || status=1
                    # IPC_E2E_LONG=1: also 1,024-token prompts and 256 new tokens (issue 15's shape).
                    if [[ -n ${IPC_E2E_LONG:-} ]]; then
                        "$BIN" bench --addr "127.0.0.1:$PORT" --concurrency 64 --requests 64 --prompt-len 1024 \
                            --output-len 256 --json \
                            | sed "s/^{/{\"mode\":\"mesh $run 1024 \/ 256 e2e\",/" >>"$OUT/ipc.jsonl" || status=1
                    fi
                    down
                    grep -h 'transport' "$OUT/up.err" "$OUT/up.out" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300 \
                        | sort -u | head -8 | tee -a "$OUT/transports.txt"
                    echo "$run: decode graphs captured by the gate: $(cat "$OUT/up.err" "$OUT/up.out" | grep -c 'captured as a CUDA graph')" \
                        | tee -a "$OUT/transports.txt"
                else
                    status=1
                fi
                if [[ $run == *-mps ]]; then
                    echo quit | nvidia-cuda-mps-control
                    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
                fi
                ;;
        esac
        echo "== $run: $((SECONDS - t0)) s"
    done
    if [[ -z ${SKIP_FIXTURES:-} ]]; then
        for fx in tiny-deepseek-v3 tiny-deepseek-v2-lite; do
            t0=$SECONDS
            ids=$($PY -c "import json;print(','.join(map(str,json.load(open('tests/fixtures/$fx/reference.json'))['prompts'][2]['input_ids'])))" 2>/dev/null || echo 5,17,42,7,99,300,12)
            common=(--prompt-ids "$ids" --max-new-tokens 32 --ignore-eos --json)
            "$BIN" generate --model "tests/fixtures/$fx" --device cuda:0 --dtype f32 "${common[@]}" >"$OUT/inproc_$fx.jsonl" || status=1
            if MOEMESH_LOG=$MESH_LOG up --model "tests/fixtures/$fx" --device cuda:0 --dtype f32 --expert-workers 2; then
                "$BIN" generate --addr "127.0.0.1:$PORT" "${common[@]}" >"$OUT/mesh_$fx.jsonl" || status=1
                down
                echo "cuda-ipc log lines: $(cat "$OUT/up.err" "$OUT/up.out" | grep -c 'cuda-ipc'), decode graphs captured: $(cat "$OUT/up.err" "$OUT/up.out" | grep -c 'captured as a CUDA graph')"
            else
                status=1
            fi
            same_tokens "$OUT/inproc_$fx.jsonl" "$OUT/mesh_$fx.jsonl" "$fx f32 ipc" || status=1
            echo "== fixture $fx: $((SECONDS - t0)) s"
        done
    fi
    $PY scripts/bench/ipc_report.py "$OUT/ipc.jsonl" | tee "$OUT/ipc.md"
    exit $status
fi

# Greedy tokens with decode graphs (the default) and without, in-process, for every fixture.
graphs_unchanged() {
    for dt in f32 bf16; do
        for fx in tiny-deepseek-v3 tiny-deepseek-v2-lite tiny-deepseek-v3-fp8 tiny-deepseek-v3-int4; do
            ids=$($PY -c "import json;print(','.join(map(str,json.load(open('tests/fixtures/$fx/reference.json'))['prompts'][2]['input_ids'])))" 2>/dev/null || echo 5,17,42,7,99,300,12)
            common=(--model "tests/fixtures/$fx" --device cuda:0 --dtype $dt --prompt-ids "$ids" --max-new-tokens 32 --ignore-eos --json)
            "$BIN" generate "${common[@]}" >"$OUT/graph_$fx.jsonl" || status=1
            MOEMESH_CUDA_GRAPHS=0 "$BIN" generate "${common[@]}" >"$OUT/eager_$fx.jsonl" || status=1
            same_tokens "$OUT/graph_$fx.jsonl" "$OUT/eager_$fx.jsonl" "$fx $dt" graphs eager || status=1
        done
    done
}

if [[ $MODE == --api ]]; then
    # The GPU paths of issue 19's fields (the constrained row's mask on the device logits, prompt
    # logprobs from device rows) through a mesh on the GPU, embedded model.
    echo "== constrained output and prompt logprobs, moemesh up on cuda:0 (embedded model)"
    if up --device cuda:0 --expert-workers 1 --http-listen 127.0.0.1:$((PORT + 1)); then
        $PY scripts/bench/api_check.py "http://127.0.0.1:$((PORT + 1))" || status=1
        down
    else
        status=1
    fi
    exit $status
fi

if [[ $MODE == --graphs ]]; then
    # Decode steps as CUDA graphs (default) against eager launches (MOEMESH_CUDA_GRAPHS=0), same
    # binary, same GPU: the decode step (ITL p50 of a sweep), greedy and sampled (R1's T 0.6,
    # top_p 0.95), then end to end at concurrency 64.
    MODEL=synthetic:v2-lite
    echo "== greedy tokens unchanged by the graphs"
    graphs_unchanged
    for run in graphs eager graphs-again; do
        envs=()
        [[ $run == eager ]] && envs=(MOEMESH_CUDA_GRAPHS=0)
        for s in greedy sampled; do
            sargs=()
            [[ $s == sampled ]] && sargs=(--temperature 0.6 --top-p 0.95)
            echo "== decode step, $run, $s"
            env "${envs[@]}" "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 \
                --sweep "${GRAPH_SWEEP:-1,8,64,256}" --prompt-len 128 --output-len 32 --json "${sargs[@]}" \
                | sed "s/^{/{\"mode\":\"$run $s\",/" >>"$OUT/graphs.jsonl" || status=1
        done
        [[ $run == graphs-again ]] && continue
        for shape in "128 32" "1024 256"; do
            set -- $shape
            echo "== end to end, $run, c=64, $1/$2"
            env "${envs[@]}" "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 \
                --concurrency 64 --requests 64 --prompt-len "$1" --output-len "$2" --json \
                | sed "s|^{|{\"mode\":\"$run e2e $1/$2\",|" >>"$OUT/graphs.jsonl" || status=1
        done
    done
    $PY - "$OUT/graphs.jsonl" <<'EOF' | tee "$OUT/graphs.md"
import json, sys
print("| run | batch | tokens/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for line in open(sys.argv[1]):
    r = json.loads(line)
    t = (r.get('ttft_ms') or {}).get('p50', float('nan'))
    print(f"| {r['mode']} | {r['concurrency']} | {r['output_tokens_per_s']:.0f} | {t:.1f} | {r['itl_ms']['p50']:.2f} | {r['itl_ms']['p99']:.2f} |")
EOF
    exit $status
fi

if [[ $MODE == --lines ]]; then
    # The open decode lines in one call, for a machine lent rarely (issue 18's are set for an
    # H100, issue 20's too): in-process decode steps at batch 1 / 64 / 256 with bf16, FP8 and
    # INT4 routed experts (synthetic:v2-lite, bf16 compute; the experts quantised at load) and
    # the device memory each load took; greedy against sampled (T 0.6, top_p 0.95) in bf16; the
    # mesh (gate + 2 workers on the GPU, MPS) at batch 1 / 64, greedy and sampled. Then each
    # line beside its measurement (scripts/bench/lines_report.py). ~4 minutes on an H200.
    MODEL=synthetic:v2-lite
    BENCH=(--prompt-len 128 --output-len 32 --json)
    SAMPLED=(--temperature 0.6 --top-p 0.95)
    : >"$OUT/lines.jsonl"
    for wd in bf16 fp8 int4; do
        "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 --weights-dtype $wd \
            --sweep 1,64,256 "${BENCH[@]}" 2>"$OUT/lines_$wd.err" \
            | sed "s/^{/{\"mode\":\"in-process $wd greedy\",/" >>"$OUT/lines.jsonl" || status=1
        # "… loaded on cuda:0 in 1.5 s, 30.50 GiB of device memory"
        gib=$(grep -o '[0-9.]* GiB of device memory' "$OUT/lines_$wd.err" | head -1 | cut -d' ' -f1)
        echo "{\"mode\":\"memory $wd\",\"gib\":${gib:-null}}" >>"$OUT/lines.jsonl"
    done
    "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 --sweep 1,64,256 "${BENCH[@]}" "${SAMPLED[@]}" \
        | sed 's/^{/{"mode":"in-process bf16 sampled",/' >>"$OUT/lines.jsonl" || status=1
    if up --model $MODEL --dtype bf16 --expert-workers 2 --device cuda:0 --gate-args=--kv-cache-mb=16384; then
        # One unrecorded run first: a fresh mesh's first steps ran slow (BENCHMARKS, session 26).
        "$BIN" bench --addr "127.0.0.1:$PORT" --concurrency 1 --requests 4 "${BENCH[@]}" >/dev/null || status=1
        mesh_sweeps 1,64 "mesh bf16" "$OUT/lines.jsonl"
        down
    else
        status=1
    fi
    $PY scripts/bench/lines_report.py "$OUT/lines.jsonl" | tee "$OUT/lines.md"
    exit $status
fi

if [[ $MODE == --sampling ]]; then
    # Greedy vs sampled decoding (DeepSeek-R1's defaults, T 0.6 and top_p 0.95): sampled rows
    # are sampled on the GPU (the default) or, with MOEMESH_DEVICE_SAMPLING=0 ("sampled-host"),
    # copied to the host sampler; what each costs per step, in-process and through the mesh.
    # GATE_BINS (gzipped moemesh-cuda binaries) runs the mesh once with each, for before/after
    # comparisons; the load always comes from $BIN's `bench`.
    MODEL=synthetic:v2-lite
    BENCH=(--prompt-len 128 --output-len 32 --json)
    SAMPLED=(--temperature 0.6 --top-p 0.95)
    : >"$OUT/sampling.jsonl"
    for how in greedy sampled sampled-host; do
        extra=(); [[ $how == sampled* ]] && extra=("${SAMPLED[@]}")
        ds=1; [[ $how == sampled-host ]] && ds=0
        MOEMESH_DEVICE_SAMPLING=$ds "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 \
            --sweep ${SAMPLING_SWEEP:-1,8,32,64,256} "${BENCH[@]}" "${extra[@]}" \
            | sed "s/^{/{\"mode\":\"in-process $how\",/" >>"$OUT/sampling.jsonl" || status=1
    done
    for gz in ${GATE_BINS:-}; do
        name=$(basename "$gz" .gz)
        UP_BIN=/tmp/gate-$name
        gunzip -c "$gz" >"$UP_BIN" && chmod +x "$UP_BIN" || { status=1; continue; }
        if up --model $MODEL --dtype bf16 --expert-workers 2 --device cuda:0 --gate-args=--kv-cache-mb=16384; then
            mesh_sweeps 8,64 "mesh $name" "$OUT/sampling.jsonl"
            down
        else
            status=1
        fi
    done
    unset UP_BIN
    $PY - "$OUT/sampling.jsonl" <<'EOF' | tee "$OUT/sampling.md"
import json, sys
print("| run | batch | tokens/s | ITL p50 ms | ITL p99 ms |")
print("| --- | ---: | ---: | ---: | ---: |")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"| {r['mode']} | {r['concurrency']} | {r['output_tokens_per_s']:.0f} | {r['itl_ms']['p50']:.2f} | {r['itl_ms']['p99']:.2f} |")
EOF
    exit $status
fi

if [[ $MODE != --bench ]]; then
    echo "== verify: fixtures against HF transformers (f32 reference)"
    "$BIN" verify --device cuda:0 --dtype f32,bf16 | tee "$OUT/verify.txt" || status=1
    if $PY -c "import torch, transformers" 2>/dev/null; then
        echo "== HF transformers itself in f32 and bf16 against the same references (for comparison)"
        $PY scripts/bench/hf_bf16_reference.py tests/fixtures --json "$OUT/hf_bf16.json" 2>"$OUT/hf_bf16.err" \
            | tee "$OUT/hf_bf16.txt" || tail -5 "$OUT/hf_bf16.err"
    fi
    if [[ -z ${SKIP_MEMCHECK:-} ]] && command -v compute-sanitizer >/dev/null; then
        echo "== compute-sanitizer memcheck: the fused kernels on one fixture (f32)"
        mkdir -p "$OUT/one" && ln -sfn "$PWD/tests/fixtures/tiny-deepseek-v3" "$OUT/one/tiny-deepseek-v3"
        timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 \
            "$BIN" verify --fixtures "$OUT/one" --device cuda:0 --dtype f32 --sampler quick >"$OUT/memcheck.txt" 2>&1 \
            && echo "memcheck: clean" || { tail -20 "$OUT/memcheck.txt"; status=1; }
    fi

    echo "== greedy tokens unchanged by the decode graphs (in-process)"
    graphs_unchanged

    # f32 is the strict check (both sides are the reference to 1e-5); in bf16 the workers' split
    # of the experts changes GEMM shapes and rounding, so a near-tie may flip: reported only.
    for dt in f32 bf16; do
    echo "== mesh equals in-process on the GPU (greedy, $dt)"
    for fx in tiny-deepseek-v3 tiny-deepseek-v2-lite tiny-deepseek-v3-fp8 tiny-deepseek-v3-int4; do
        ids=$($PY -c "import json;print(','.join(map(str,json.load(open('tests/fixtures/$fx/reference.json'))['prompts'][2]['input_ids'])))" 2>/dev/null || echo 5,17,42,7,99,300,12)
        common=(--prompt-ids "$ids" --max-new-tokens 32 --ignore-eos --json)
        "$BIN" generate --model "tests/fixtures/$fx" --device cuda:0 --dtype $dt "${common[@]}" >"$OUT/inproc_$fx.jsonl" || status=1
        if up --model "tests/fixtures/$fx" --device cuda:0 --dtype $dt --expert-workers 2; then
            "$BIN" generate --addr "127.0.0.1:$PORT" "${common[@]}" >"$OUT/mesh_$fx.jsonl" || status=1
            down
        else
            status=1
        fi
        same_tokens "$OUT/inproc_$fx.jsonl" "$OUT/mesh_$fx.jsonl" "$fx $dt" || { [[ $dt == f32 ]] && status=1; }
    done
    done
fi

if [[ $MODE != --check ]]; then
    MODEL=synthetic:v2-lite
    BENCH=(--prompt-len 128 --output-len 32 --json)
    echo "== in-process decode and prefill, $MODEL (bf16)"
    "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 --sweep 1,8,32,64 "${BENCH[@]}" \
        | sed 's/^{/{"mode":"in-process",/' >"$OUT/inproc.jsonl" || status=1
    echo "== the same with candle ops only (MOEMESH_FUSED_KERNELS=0), for the kernels' effect"
    MOEMESH_FUSED_KERNELS=0 "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 \
        --sweep 1,8,32,64 "${BENCH[@]}" | sed 's/^{/{"mode":"in-process-unfused",/' >>"$OUT/inproc.jsonl" || status=1
    for L in 512 2048; do
        "$BIN" bench --in-process --model $MODEL --device cuda:0 --dtype bf16 --concurrency 1 --requests 3 \
            --prompt-len $L --output-len 1 --json | sed 's/^{/{"mode":"in-process-prefill",/' >>"$OUT/inproc.jsonl" || status=1
    done
    ED=${EXPERT_DEVICES:-}
    for overlap in off on; do
        gate_args=(--gate-args=--kv-cache-mb=16384)
        [[ $overlap == on ]] && gate_args+=(--gate-args=--overlap=true)
        dev_args=(--device cuda:0)
        [[ -n $ED ]] && dev_args+=(--expert-devices "$ED")
        echo "== mesh (gate + 2 expert workers as processes, experts on ${ED:-cuda:0}), overlap $overlap"
        if up --model $MODEL --dtype bf16 --expert-workers 2 "${dev_args[@]}" "${gate_args[@]}"; then
            sweep=1,8,32,64
            [[ $overlap == on ]] && sweep=8,64
            "$BIN" bench --addr "127.0.0.1:$PORT" --sweep $sweep "${BENCH[@]}" \
                | sed "s/^{/{\"mode\":\"mesh-overlap-$overlap\",/" >>"$OUT/mesh.jsonl" || status=1
            if [[ $overlap == off ]]; then
                for L in 512 2048; do
                    "$BIN" bench --addr "127.0.0.1:$PORT" --concurrency 1 --requests 3 --prompt-len $L \
                        --output-len 1 --json | sed 's/^{/{"mode":"mesh-prefill",/' >>"$OUT/mesh.jsonl" || status=1
                done
            fi
            down
        else
            status=1
        fi
    done
    if [[ -z ${SKIP_HF:-} ]]; then
        echo "== HF transformers baseline (scripts/bench/hf_baseline.py) and copy bandwidth"
        OUT=$OUT PYTHONUNBUFFERED=1 $PY scripts/bench/hf_baseline.py >"$OUT/hf.txt" 2>&1 || { tail -5 "$OUT/hf.txt"; status=1; }
    fi
    $PY scripts/bench/report.py "$OUT" | tee "$OUT/table.md"
fi
exit $status
