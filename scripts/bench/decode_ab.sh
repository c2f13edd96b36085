#!/usr/bin/env bash
# Decode A/B of two moemesh binaries on one GPU, interleaved (A B A B …) so that drift falls on
# both: the decode sweep (`bench --sweep`, ms per step = ITL p50, greedy, 128-token prompts, 32
# new tokens) in-process and through the mesh (`up`, gate + 2 expert workers on the same GPU,
# MPS as up starts it). Prints one line per run and batch size.
#
#   scripts/bench/decode_ab.sh BIN_A BIN_B [ROUNDS]
# DECODE_SWEEP: batch sizes (1,64); DECODE_MESH=0 leaves the mesh out.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${3:-2}
SWEEP=${DECODE_SWEEP:-1,64}
for d in /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib /usr/local/cuda/lib64; do
    [[ -d $d ]] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export MOEMESH_LOG=${MOEMESH_LOG:-warn}
M=(--model synthetic:v2-lite --dtype bf16)
lines() {
    python3 -c "
import json, sys
for l in sys.stdin.read().strip().splitlines():
    if not l.startswith('{'): continue
    r = json.loads(l)
    print(f\"$1 batch {r['concurrency']}: {r['itl_ms']['p50']:.2f} ms/step (ITL p50), p99 {r['itl_ms']['p99']:.2f}\")"
}
for round in $(seq "$ROUNDS"); do
    for bin in "${@:1:2}"; do
        name=$(basename "$bin")
        "$bin" bench --in-process "${M[@]}" --device cuda:0 --sweep "$SWEEP" --prompt-len 128 \
            --output-len 32 --json 2>/dev/null | lines "round $round $name in-process"
        [[ ${DECODE_MESH:-1} == 0 ]] && continue
        "$bin" up --listen 127.0.0.1:50173 "${M[@]}" --device cuda:0 --expert-workers 2 >/tmp/dab-up.out 2>/tmp/dab-up.err &
        pid=$!
        for _ in $(seq 600); do grep -q '"event":"ready"' /tmp/dab-up.out 2>/dev/null && break; sleep 0.1; done
        "$bin" bench --addr 127.0.0.1:50173 --sweep "$SWEEP" --prompt-len 128 --output-len 32 \
            --json 2>/dev/null | lines "round $round $name mesh"
        kill -TERM $pid; wait $pid 2>/dev/null
    done
done
