# Sourced by the A/B scripts beside it (after they cd to the repository root): the GPU machine's
# CUDA libraries on the library path, warnings-only logs unless MOEMESH_LOG says otherwise, the
# model every A/B runs (`M`); `line`, one line from a `bench --json` run's last record
# (requests ok, output and total token throughput, TTFT and ITL percentiles), and `steps LABEL`,
# one line a record of a `bench --sweep --json` run (ms per decode step, ITL p50 and p99).
for d in /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib /usr/local/cuda/lib64; do
    [[ -d $d ]] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export MOEMESH_LOG=${MOEMESH_LOG:-warn}
M=(--model synthetic:v2-lite --dtype bf16)
line() {
    python3 -c "
import json, sys
r = json.loads(sys.stdin.read().strip().splitlines()[-1])
total = r['requests_per_s'] * (r['prompt_len'] + r['output_len'])
print(f\"{r['succeeded']}/{r['requests']} ok, out {r['output_tokens_per_s']:,.0f} tok/s, total {total:,.0f} tok/s, \"
      f\"{r['requests_per_s']:.2f} req/s, TTFT p50/p99 {r['ttft_ms']['p50']:.1f}/{r['ttft_ms']['p99']:.1f} ms, \"
      f\"ITL p50/p99 {r['itl_ms']['p50']:.2f}/{r['itl_ms']['p99']:.2f} ms\")"
}
steps() {
    python3 -c "
import json, sys
for l in sys.stdin.read().strip().splitlines():
    if not l.startswith('{'): continue
    r = json.loads(l)
    print(f\"$1 batch {r['concurrency']}: {r['itl_ms']['p50']:.2f} ms/step (ITL p50), p99 {r['itl_ms']['p99']:.2f}\")"
}
# `warm_up BIN`: one unrecorded mesh (`up`, gate + 2 workers on cuda:0) and a short batch-1 run
# through it before the first round, unless AB_WARMUP=0: the first `up` on a fresh machine ran
# slow for every binary (c1 ITL 4.7-5.3 ms against 3.4-3.8 after; BENCHMARKS, session 26).
warm_up() {
    [[ ${AB_WARMUP:-1} == 0 ]] && return 0
    "$1" up --listen 127.0.0.1:50179 "${M[@]}" --device cuda:0 --expert-workers 2 \
        >/tmp/ab-warmup.out 2>/tmp/ab-warmup.err &
    local pid=$!
    for _ in $(seq 600); do grep -q '"event":"ready"' /tmp/ab-warmup.out 2>/dev/null && break; sleep 0.1; done
    "$1" bench --addr 127.0.0.1:50179 --concurrency 1 --requests 8 --prompt-len 128 \
        --output-len 32 --json >/dev/null 2>&1
    kill -TERM $pid
    wait $pid 2>/dev/null
    return 0
}
