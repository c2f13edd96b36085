#!/usr/bin/env bash
set -uo pipefail
xz -dc dist/int4.xz > /tmp/new && chmod +x /tmp/new
xz -dc dist/walk.xz > /tmp/old && chmod +x /tmp/old
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
export MOEMESH_LOG=warn
M=(--model synthetic:v2-lite --dtype bf16)
sweep() {
    python3 -c "
import json, sys
for l in sys.stdin.read().strip().splitlines():
    if not l.startswith('{'): continue
    r = json.loads(l)
    print(f\"$1 batch {r['concurrency']}: {r['itl_ms']['p50']:.2f} ms/step (ITL p50)\")"
}
for cfg in "old bf16 -" "new bf16 -" "new bf16 0.5" "new int4 -" "new int4 0.5" "new int4 1000"; do
    read -r b wd thr <<<"$cfg"
    export MOEMESH_WEIGHTS_DTYPE=$wd
    if [[ $thr == - ]]; then unset MOEMESH_GROUPED_MIN_PAIRS; else export MOEMESH_GROUPED_MIN_PAIRS=$thr; fi
    /tmp/$b up --listen 127.0.0.1:50172 "${M[@]}" --device cuda:0 --expert-workers 2 >/tmp/up.out 2>/tmp/up.err &
    pid=$!
    for _ in $(seq 900); do grep -q '"event":"ready"' /tmp/up.out 2>/dev/null && break; sleep 0.1; done
    /tmp/$b bench --addr 127.0.0.1:50172 --sweep 8,32,64 --prompt-len 128 --output-len 32 \
        --json 2>/dev/null | sweep "$b $wd thr=$thr mesh"
    kill -TERM $pid; wait $pid 2>/dev/null
done
