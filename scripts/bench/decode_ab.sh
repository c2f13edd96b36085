#!/usr/bin/env bash
# Decode A/B of two moemesh binaries on one GPU, interleaved (A B A B …) so that drift falls on
# both: the decode sweep (`bench --sweep`, ms per step = ITL p50, greedy, 128-token prompts, 32
# new tokens) in-process and through the mesh (`up`, gate + 2 expert workers on the same GPU,
# MPS as up starts it). Prints one line per run and batch size.
#
#   scripts/bench/decode_ab.sh BIN_A BIN_B [ROUNDS]
# DECODE_SWEEP: batch sizes (1,64); DECODE_MESH=0 leaves the mesh out; AB_WARMUP=0 skips the
# unrecorded warm-up mesh before round 1 (ab_env.sh's warm_up).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${3:-2}
SWEEP=${DECODE_SWEEP:-1,64}
source scripts/bench/ab_env.sh
warm_up "$1"
for round in $(seq "$ROUNDS"); do
    for bin in "${@:1:2}"; do
        name=$(basename "$bin")
        "$bin" bench --in-process "${M[@]}" --device cuda:0 --sweep "$SWEEP" --prompt-len 128 \
            --output-len 32 --json 2>/dev/null | steps "round $round $name in-process"
        [[ ${DECODE_MESH:-1} == 0 ]] && continue
        "$bin" up --listen 127.0.0.1:50173 "${M[@]}" --device cuda:0 --expert-workers 2 >/tmp/dab-up.out 2>/tmp/dab-up.err &
        pid=$!
        for _ in $(seq 600); do grep -q '"event":"ready"' /tmp/dab-up.out 2>/dev/null && break; sleep 0.1; done
        "$bin" bench --addr 127.0.0.1:50173 --sweep "$SWEEP" --prompt-len 128 --output-len 32 \
            --json 2>/dev/null | steps "round $round $name mesh"
        kill -TERM $pid; wait $pid 2>/dev/null
    done
done
