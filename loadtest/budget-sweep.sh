#!/usr/bin/env bash
# Time to first token of long prompts against the inter-token latency of running decodes, for
# several scheduler step budgets (`--step-token-budget`, issue 15).
#
#   loadtest/budget-sweep.sh BUDGET...
#
# For each budget: starts a local mesh (`moemesh up`, CPU, embedded model) with that budget, runs
# DECODERS clients decoding short prompts (`moemesh bench --prompt-len 32 --output-len 128`) and,
# two seconds in, one client sending LONG_REQUESTS prompts of LONG_LEN tokens with one output
# token each; prints one JSON line per budget with both reports. Use $MOEMESH to pick the binary.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=loadtest/lib.sh
source "$here/lib.sh"
decoders="${DECODERS:-7}"; long_len="${LONG_LEN:-2000}"; long_requests="${LONG_REQUESTS:-4}"
bin="$(moemesh_bin)"
trap stop_mesh EXIT
for budget in "$@"; do
  logs="$(mktemp -d)"
  start_mesh "$logs" --frontend-args="--step-token-budget=$budget"
  load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
  "$bin" bench --addr "$MESH_ADDR" --concurrency "$decoders" --requests $((decoders * 2)) \
    --prompt-len 32 --output-len 128 --json >"$logs/decode.json" &
  decode=$!
  sleep 2
  "$bin" bench --addr "$MESH_ADDR" --concurrency 1 --requests "$long_requests" \
    --prompt-len "$long_len" --output-len 1 --json >"$logs/long.json"
  wait "$decode"
  python3 - "$budget" "$logs" "$load_before" <<'PY'
import json, sys
budget, logs, load = sys.argv[1], sys.argv[2], sys.argv[3]
d = json.loads(open(f"{logs}/decode.json").read().strip().splitlines()[-1])
l = json.loads(open(f"{logs}/long.json").read().strip().splitlines()[-1])
r = lambda v: v and round(v, 1)
print(json.dumps({
    "budget": int(budget),
    "long_ttft_ms": {k: r(v) for k, v in l["ttft_ms"].items()},
    "decode_itl_ms": {k: r(v) for k, v in d["itl_ms"].items()},
    "decode_tokens_per_s": r(d["output_tokens_per_s"]),
    "errors": [d["errors"], l["errors"]],
    "load_before": load,
}))
PY
  stop_mesh
done
