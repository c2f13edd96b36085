#!/usr/bin/env bash
# End-to-end A/B of two moemesh binaries on one GPU, interleaved (A B A B …) so that drift falls
# on both: requests at concurrency 64 (random prompts, EOS ignored, one warm-up wave left out),
# 128-token prompts / 32 new tokens and 1,024 / 256, in-process (`bench --in-process`) and
# through the mesh (`up`, gate + 2 expert workers on the same GPU, MPS as up starts it).
# Prints one line per run: output and total token throughput, TTFT and ITL percentiles.
#
#   scripts/bench/e2e_ab.sh BIN_A BIN_B [ROUNDS]
# E2E_REQUESTS: requests per run (256); E2E_LOGS: where up's logs go (/tmp), one pair per run;
# E2E_MESH=0 leaves the mesh out.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${3:-2}
N=${E2E_REQUESTS:-256}
LOGS=${E2E_LOGS:-/tmp}
source scripts/bench/ab_env.sh
shapes=("128 32" "1024 256")
for round in $(seq "$ROUNDS"); do
    for bin in "${@:1:2}"; do
        name=$(basename "$bin")
        for s in "${shapes[@]}"; do
            read -r P O <<<"$s"
            echo -n "round $round $name in-process c64 $P / $O: "
            "$bin" bench --in-process "${M[@]}" --device cuda:0 --concurrency 64 --requests "$N" \
                --prompt-len "$P" --output-len "$O" --json 2>/dev/null | line
        done
        [[ ${E2E_MESH:-1} == 0 ]] && continue
        log="$LOGS/e2e-up-$name-$round"
        "$bin" up --listen 127.0.0.1:50172 "${M[@]}" --device cuda:0 --expert-workers 2 >"$log.out" 2>"$log.err" &
        pid=$!
        for _ in $(seq 600); do grep -q '"event":"ready"' "$log.out" 2>/dev/null && break; sleep 0.1; done
        for s in "${shapes[@]}"; do
            read -r P O <<<"$s"
            echo -n "round $round $name mesh c64 $P / $O: "
            "$bin" bench --addr 127.0.0.1:50172 --concurrency 64 --requests "$N" \
                --prompt-len "$P" --output-len "$O" --json 2>/dev/null | line
        done
        kill -TERM $pid; wait $pid 2>/dev/null
    done
done
