#!/usr/bin/env bash
# End-to-end A/B of two moemesh binaries at low concurrency on one GPU, interleaved (A B A B …):
# requests at each concurrency C of LOWCONC (default "1 4"), 24·C of them a run, 128-token
# prompts / 32 new tokens (random prompts, EOS ignored), in-process (`bench --in-process`) and
# through the mesh (`up`, gate + 2 expert workers on the same GPU, MPS as up starts it); then the
# decode sweep at batch 1 and 64 on both. One line per run.
#
#   scripts/bench/lowconc_ab.sh BIN_A BIN_B [ROUNDS]
# AB_WARMUP=0 skips the unrecorded warm-up mesh before round 1 (ab_env.sh's warm_up).
# To A/B an environment switch of one binary, pass two wrapper scripts, e.g.
#   printf '#!/bin/sh\nMOEMESH_MLA_FUSED=0 exec /tmp/mm "$@"\n' > /tmp/off
set -uo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${3:-2}
source scripts/bench/ab_env.sh
warm_up "$1"
for round in $(seq "$ROUNDS"); do
    for bin in "${@:1:2}"; do
        name=$(basename "$bin")
        for c in ${LOWCONC:-1 4}; do
            echo -n "round $round $name in-process c$c 128 / 32: "
            "$bin" bench --in-process "${M[@]}" --device cuda:0 --concurrency "$c" \
                --requests $((24 * c)) --prompt-len 128 --output-len 32 --json 2>/dev/null | line
        done
        "$bin" up --listen 127.0.0.1:50173 "${M[@]}" --device cuda:0 --expert-workers 2 \
            >/tmp/lowconc-up.out 2>/tmp/lowconc-up.err &
        pid=$!
        for _ in $(seq 600); do grep -q '"event":"ready"' /tmp/lowconc-up.out 2>/dev/null && break; sleep 0.1; done
        for c in ${LOWCONC:-1 4}; do
            echo -n "round $round $name mesh c$c 128 / 32: "
            "$bin" bench --addr 127.0.0.1:50173 --concurrency "$c" --requests $((24 * c)) \
                --prompt-len 128 --output-len 32 --json 2>/dev/null | line
        done
        "$bin" bench --addr 127.0.0.1:50173 --sweep 1,64 --prompt-len 128 --output-len 32 \
            --json 2>/dev/null | steps "round $round $name mesh decode"
        kill -TERM $pid; wait $pid 2>/dev/null
        "$bin" bench --in-process "${M[@]}" --device cuda:0 --sweep 1,64 --prompt-len 128 \
            --output-len 32 --json 2>/dev/null | steps "round $round $name in-process decode"
    done
done
