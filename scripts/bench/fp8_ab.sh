#!/usr/bin/env bash
# bf16 against FP8 (and INT4) routed experts, in-process on one GPU, interleaved (bf16 fp8 bf16
# fp8 …): `bench --in-process --weights-dtype bf16|fp8|int4` on synthetic:v2-lite (bf16 compute;
# fp8 quantises the experts at load, 128 × 128 block scales; int4 in groups of 128), the decode
# sweep (ms per step = ITL p50, 128-token prompts, 32 new tokens) and the device memory the load
# took.
#
#   scripts/bench/fp8_ab.sh [BIN] [ROUNDS]
#   (FP8_SWEEP: batch sizes, default 1,64; WEIGHTS: the formats, default "bf16 fp8")
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-dist/moemesh-cuda}
ROUNDS=${2:-2}
for d in /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib /usr/local/cuda/lib64; do
    [[ -d $d ]] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export MOEMESH_LOG=${MOEMESH_LOG:-warn,moemesh_engine::model_dir=info}
for round in $(seq "$ROUNDS"); do
    for wd in ${WEIGHTS:-bf16 fp8}; do
        out=$("$BIN" bench --in-process --model synthetic:v2-lite --device cuda:0 --dtype bf16 \
            --weights-dtype "$wd" --sweep "${FP8_SWEEP:-1,64}" --prompt-len 128 --output-len 32 \
            --json 2>&1)
        echo "$out" | grep -iv '^{' | grep -i 'loaded\|memory plan' | tail -2 | sed "s/^/round $round $wd: /"
        echo "$out" | python3 -c "
import json, sys
for l in sys.stdin:
    l = l.strip()
    if l.startswith('{'):
        r = json.loads(l)
        print(f\"round $round $wd batch {r['concurrency']}: {r['itl_ms']['p50']:.2f} ms/step (ITL p50), {r['output_tokens_per_s']:,.0f} out tok/s\")"
    done
done
