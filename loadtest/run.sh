#!/usr/bin/env bash
# Runs ghz scenarios (loadtest/scenarios/*.json) against a moemesh frontend. Uses ghz when it is
# installed (and MOEMESH_LOADTEST_TOOL is not "bench"), otherwise `moemesh bench --scenario`,
# which reads the same files and writes the same JSON report plus per-token metrics.
#
#   loadtest/run.sh [--up] [--addr HOST:PORT] [--out DIR] [SCENARIO...]
#
#   --up             start a local mesh (`moemesh up`, CPU, embedded model) on a free port first,
#                    and stop it at the end
#   --addr H:P       the frontend to load (default: each scenario's "host", 127.0.0.1:50051)
#   --out DIR        where the reports go (default: a new loadtest/runs/<UTC time>/, which git
#                    ignores; pass --out loadtest/results to replace the committed reference runs)
#   SCENARIO         names or paths (default: short-chat long-prompt long-generation mixed)
#
# Reports go to DIR/<scenario>.json; a Markdown table of all of them to DIR/summary.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=loadtest/lib.sh
source "$here/lib.sh"

up=0; addr=""; out_dir=""; scenarios=()
while (( $# )); do
  case "$1" in
    --up) up=1 ;;
    --addr) addr="$2"; shift ;;
    --out) out_dir="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) scenarios+=("$1") ;;
  esac
  shift
done
(( ${#scenarios[@]} )) || scenarios=(short-chat long-prompt long-generation mixed)

results="${out_dir:-$here/runs/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$results"
echo "loadtest: reports go to $results" >&2
if (( up )); then
  trap stop_mesh EXIT
  start_mesh "$results/mesh-logs"
  addr="$MESH_ADDR"
fi

tool=bench
if command -v ghz >/dev/null 2>&1 && [[ "${MOEMESH_LOADTEST_TOOL:-}" != bench ]]; then tool=ghz; fi
reports=()
for s in "${scenarios[@]}"; do
  file="$s"; [[ -f "$file" ]] || file="$here/scenarios/$s.json"
  name="$(basename "$file" .json)"
  out="$results/$name.json"
  echo "== $name ($tool) — $(machine_note)" >&2
  if [[ "$tool" == ghz ]]; then
    config="$file"
    if [[ -n "$addr" ]]; then
      config="$(mktemp)"
      python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); c["host"]=sys.argv[2]; json.dump(c,open(sys.argv[3],"w"))' "$file" "$addr" "$config"
    fi
    ghz --config "$config" --format json --output "$out"
  else
    "$(moemesh_bin)" bench --scenario "$file" ${addr:+--addr "$addr"} --output "$out"
  fi
  reports+=("$out")
done

python3 - "$tool" "${reports[@]}" >"$results/summary.md" <<'PY'
import json, sys
tool, paths = sys.argv[1], sys.argv[2:]
ms = lambda ns: f"{ns / 1e6:.0f}"
def pct(dist, p):
    return next((ms(e["latency"]) for e in dist if e["percentage"] == p), "-")
print(f"| scenario | calls | calls/s | OK | other codes | latency p50 / p99 ms | TTFT p50 / p99 ms | ITL p50 / p99 ms | tokens/s |")
print("| --- | ---: | ---: | ---: | --- | --- | --- | --- | ---: |")
for p in paths:
    r = json.load(open(p))
    codes = dict(r["statusCodeDistribution"])
    ok = codes.pop("OK", 0)
    other = ", ".join(f"{k} {v}" for k, v in codes.items()) or "none"
    tm = r.get("tokenMetrics")
    ttft = f"{pct(tm['timeToFirstToken']['latencyDistribution'], 50)} / {pct(tm['timeToFirstToken']['latencyDistribution'], 99)}" if tm else "n/a (ghz)"
    itl = f"{pct(tm['interTokenLatency']['latencyDistribution'], 50)} / {pct(tm['interTokenLatency']['latencyDistribution'], 99)}" if tm else "n/a (ghz)"
    tps = f"{tm['completionTokensPerSecond']:.1f}" if tm else "n/a"
    lat = f"{pct(r['latencyDistribution'], 50)} / {pct(r['latencyDistribution'], 99)}"
    print(f"| {r['name']} | {r['count']} | {r['rps']:.2f} | {ok} | {other} | {lat} | {ttft} | {itl} | {tps} |")
PY
cat "$results/summary.md"
