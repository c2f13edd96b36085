#!/usr/bin/env bash
# Overload test (not in CI; about 2 minutes): a local mesh whose frontend accepts at most
# MAX_PENDING requests (--max-pending) is driven in three phases of PHASE seconds each:
#   1. at capacity: MAX_PENDING closed-loop clients; its calls/s is the capacity;
#   2. 3× capacity: 3×MAX_PENDING clients offering 3× that rate;
#   3. recovery: MAX_PENDING/2 clients.
# It passes when phase 2 sheds with RESOURCE_EXHAUSTED (and nothing else fails) while accepted
# calls keep a bounded latency (p99 at most twice phase 1's: the frontend admits no more than
# in phase 1, and the factor leaves room for the shed calls' own CPU on a small machine), and
# phase 3 has no failures and a p50 no worse than 1.5× phase 1's.
#
#   loadtest/overload.sh                      # MAX_PENDING=8 PHASE=30s
#   MAX_PENDING=16 PHASE=60s loadtest/overload.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=loadtest/lib.sh
source "$here/lib.sh"
max_pending="${MAX_PENDING:-8}"
phase="${PHASE:-30s}"
out="$here/results/overload"
mkdir -p "$out"
trap stop_mesh EXIT
start_mesh "$out/mesh-logs" "--frontend-args=--max-pending=$max_pending"

bench() {
  "$(moemesh_bin)" bench --scenario "$here/scenarios/overload.json" --addr "$MESH_ADDR" \
    --duration "$phase" "$@"
}
echo "== phase 1: at capacity, $max_pending clients — $(machine_note)" >&2
bench --concurrency "$max_pending" --output "$out/1-capacity.json"
rps3=$(python3 -c 'import json,math,sys; print(math.ceil(3 * json.load(open(sys.argv[1]))["rps"]))' "$out/1-capacity.json")
echo "== phase 2: 3x capacity, $((3 * max_pending)) clients offering $rps3 calls/s — $(machine_note)" >&2
bench --concurrency $((3 * max_pending)) --rps "$rps3" --output "$out/2-overload.json"
echo "== phase 3: recovery, $((max_pending / 2)) clients — $(machine_note)" >&2
bench --concurrency $((max_pending / 2 > 0 ? max_pending / 2 : 1)) --output "$out/3-recovery.json"
kill -0 "$MESH_PID" 2>/dev/null || { echo "FAIL: the mesh died under overload" >&2; exit 1; }

python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
r = [json.load(open(f"{out}/{n}.json")) for n in ("1-capacity", "2-overload", "3-recovery")]
def p(rep, pct):
    return next((e["latency"] / 1e6 for e in rep["latencyDistribution"] if e["percentage"] == pct), float("nan"))
print("| phase | clients | offered calls/s | calls | OK | RESOURCE_EXHAUSTED | other | accepted p50 / p99 ms |")
print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
for name, rep in zip(("1 at capacity", "2 at 3x capacity", "3 recovery"), r):
    codes = dict(rep["statusCodeDistribution"])
    ok, shed = codes.pop("OK", 0), codes.pop("ResourceExhausted", 0)
    offered = rep["options"]["rps"] or "closed loop"
    print(f"| {name} | {rep['options']['concurrency']} | {offered} | {rep['count']} | {ok} | {shed} | "
          f"{', '.join(f'{k} {v}' for k, v in codes.items()) or 'none'} | {p(rep, 50):.0f} / {p(rep, 99):.0f} |")
fails = []
c2 = dict(r[1]["statusCodeDistribution"])
if c2.get("ResourceExhausted", 0) == 0:
    fails.append("phase 2 shed nothing (no RESOURCE_EXHAUSTED)")
if c2.get("OK", 0) == 0:
    fails.append("phase 2 accepted nothing")
if set(c2) - {"OK", "ResourceExhausted"}:
    fails.append(f"phase 2 failed otherwise: {c2}")
if not p(r[1], 99) <= 2 * p(r[0], 99):
    fails.append(f"phase 2 accepted p99 {p(r[1], 99):.0f} ms > 2 x phase 1's {p(r[0], 99):.0f} ms")
c3 = r[2]["statusCodeDistribution"]
if set(c3) != {"OK"}:
    fails.append(f"phase 3 (recovery) had failures: {c3}")
if not p(r[2], 50) <= 1.5 * p(r[0], 50):
    fails.append(f"phase 3 p50 {p(r[2], 50):.0f} ms > 1.5 x phase 1's {p(r[0], 50):.0f} ms")
for f in fails:
    print(f"FAIL: {f}")
print("overload: " + ("FAILED" if fails else "passed: shed with RESOURCE_EXHAUSTED, bounded latency, recovered"))
sys.exit(1 if fails else 0)
PY
