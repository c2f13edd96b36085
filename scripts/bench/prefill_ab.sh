#!/usr/bin/env bash
# Prefill A/B of two or more moemesh binaries on one GPU, interleaved (A B A B …) so that drift
# falls on both: in-process time to first token for one prompt of 512, 2,048 and 8,192 tokens
# and for 8 × 2,048 (synthetic:v2-lite bf16, `bench --in-process`, TTFT p50 of the requests),
# then through the mesh (`up`, gate + 2 workers, MPS): one 2,048-token prompt and end to end at
# concurrency 64 (128 / 32). Prints one line per run.
#
#   scripts/bench/prefill_ab.sh BIN_A BIN_B [ROUNDS]
set -uo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${3:-2}
source scripts/bench/ab_env.sh
ttft() { python3 -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); t=r['ttft_ms']['p50']; print(f\"TTFT p50 {t:.2f} ms  {r['concurrency']*$1/t*1e3:,.0f} tok/s  out {r['output_tokens_per_s']:,.0f} tok/s\")"; }
for round in $(seq "$ROUNDS"); do
    for bin in "${@:1:2}"; do
        name=$(basename "$bin")
        for L in 512 2048 8192; do
            echo -n "round $round $name in-process 1 × $L: "
            "$bin" bench --in-process "${M[@]}" --device cuda:0 --concurrency 1 --requests 4 --prompt-len $L --output-len 1 --json 2>/dev/null | ttft $L
        done
        echo -n "round $round $name in-process 8 × 2048: "
        "$bin" bench --in-process "${M[@]}" --device cuda:0 --concurrency 8 --requests 24 --prompt-len 2048 --output-len 1 --json 2>/dev/null | ttft 2048
        "$bin" up --listen 127.0.0.1:50171 "${M[@]}" --device cuda:0 --expert-workers 2 >/tmp/ab-up.out 2>/tmp/ab-up.err &
        pid=$!
        for _ in $(seq 600); do grep -q '"event":"ready"' /tmp/ab-up.out 2>/dev/null && break; sleep 0.1; done
        echo -n "round $round $name mesh 1 × 2048: "
        "$bin" bench --addr 127.0.0.1:50171 --concurrency 1 --requests 4 --prompt-len 2048 --output-len 1 --json 2>/dev/null | ttft 2048
        echo -n "round $round $name mesh e2e c64 128 / 32: "
        "$bin" bench --addr 127.0.0.1:50171 --concurrency 64 --requests 64 --prompt-len 128 --output-len 32 --json 2>/dev/null | ttft 128
        kill -TERM $pid; wait $pid 2>/dev/null
    done
done
