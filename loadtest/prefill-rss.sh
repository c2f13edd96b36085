#!/usr/bin/env bash
# Peak resident memory of the gate and prefill speed for one long prompt (issue 15).
#
#   loadtest/prefill-rss.sh PROMPT_LEN [moemesh up flags...]
#
# Starts a local mesh (`moemesh up`, CPU) on a free port, sends one request of PROMPT_LEN random
# token ids and one output token (`moemesh bench --requests 1 --output-len 1`), then prints one
# JSON line: the gate's VmHWM (peak RSS) of loading, its RSS once loaded, its peak RSS while it
# served the prompt (VmHWM reset through /proc/PID/clear_refs before the request), and the time
# to first token, which is the prompt's prefill through the mesh. Use $MOEMESH to pick the binary.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=loadtest/lib.sh
source "$here/lib.sh"
len="$1"; shift
logs="$(mktemp -d)"
trap stop_mesh EXIT
start_mesh "$logs" "$@"
gate=""
for p in $(pgrep -P "$MESH_PID"); do
  if tr '\0' ' ' <"/proc/$p/cmdline" | grep -q ' gate '; then gate="$p"; fi
done
[[ -n "$gate" ]] || { echo "no gate process under $MESH_PID" >&2; exit 1; }
status() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$gate/status"; }
loaded_hwm=$(status VmHWM)
loaded=$(status VmRSS)
# Reset the peak to the current RSS, so that the peak below is the prompt's, not loading's.
echo 5 >"/proc/$gate/clear_refs"
out=$("$(moemesh_bin)" bench --addr "$MESH_ADDR" --requests 1 --concurrency 1 --prompt-len "$len" --output-len 1 --json)
peak=$(status VmHWM)
echo "$out" | tail -1 | python3 -c '
import json, sys
b = json.loads(sys.stdin.read())
l, a, p, h = (int(v) for v in sys.argv[1:5])
t = b["ttft_ms"]["p50"]
print(json.dumps({"prompt_len": l, "succeeded": b["succeeded"], "errors": b["errors"],
                  "gate_vmhwm_load_mib": round(h / 1024, 1), "gate_rss_loaded_mib": round(a / 1024, 1),
                  "gate_vmhwm_prompt_mib": round(p / 1024, 1),
                  "ttft_ms": t and round(t, 1), "prefill_tok_s": t and round(l / t * 1000, 1),
                  "load": open("/proc/loadavg").read().split()[:3]}))' "$len" "$loaded" "$peak" "$loaded_hwm"
