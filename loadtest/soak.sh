#!/usr/bin/env bash
# Soak test (not in CI): the mixed scenario against a local mesh for DURATION (default 10m),
# sampling every process's resident memory and the gate's KV pool every 10 s into
# results/soak/samples.csv. It passes when no call failed, the gate holds no sequence and no KV
# block once the load is gone, and no process's memory grew by more than 5 % + 8 MiB between
# the end of warm-up (a quarter of the run) and the end: a leak of a few KiB per call over the
# thousands of calls of a 10-minute run would show; allocator noise stays inside it.
#
#   loadtest/soak.sh            # 10 minutes
#   loadtest/soak.sh 2m         # a shorter run of the same checks
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=loadtest/lib.sh
source "$here/lib.sh"
duration="${1:-10m}"
out="$here/results/soak"
mkdir -p "$out"
# Four consecutive free ports for the metrics of frontend, gate and two workers.
base=$(python3 - <<'PY'
import socket
for base in range(39000, 60000, 7):
    socks = []
    try:
        for p in range(base, base + 4):
            s = socket.socket(); s.bind(("127.0.0.1", p)); socks.append(s)
        print(base); break
    except OSError:
        pass
    finally:
        for s in socks: s.close()
PY
)
trap stop_mesh EXIT
start_mesh "$out/mesh-logs" --metrics-base-port "$base"
echo "== soak: mixed scenario for $duration — $(machine_note)" >&2
"$(moemesh_bin)" bench --scenario "$here/scenarios/mixed.json" --addr "$MESH_ADDR" \
  --duration "$duration" --output "$out/mixed.json" &
bench_pid=$!
python3 - "$MESH_PID" "$base" "$bench_pid" "$out" <<'PY'
import json, os, re, sys, time, urllib.request
mesh, base, bench, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def parent(pid):
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
# The processes `moemesh up` started (its children).
kids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and parent(int(p)) == mesh)
def role(pid):
    return open(f"/proc/{pid}/cmdline").read().split("\0")[1]
def rss_mib(pid):
    m = re.search(r"VmRSS:\s+(\d+) kB", open(f"/proc/{pid}/status").read())
    return int(m.group(1)) / 1024
def gate_metric(name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{base + 1}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")
names = [f"{role(p)}-{p}" for p in kids]
rows = []
start = time.time()
def sample():
    rows.append([round(time.time() - start, 1)] + [round(rss_mib(p), 1) for p in kids]
                + [gate_metric("moemesh_gate_kv_blocks_used"), gate_metric("moemesh_gate_live_sequences")])
while True:
    sample()
    # The bench is the shell's child: it ends as a zombie until the shell waits for it.
    try:
        if open(f"/proc/{bench}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
            break
    except OSError:
        break
    time.sleep(10)
# The gate frees a finished sequence's KV on the frontend's next step; wait for it (bounded).
for _ in range(100):
    if gate_metric("moemesh_gate_live_sequences") == 0 and gate_metric("moemesh_gate_kv_blocks_used") == 0:
        break
    time.sleep(0.1)
sample()
with open(f"{out}/samples.csv", "w") as f:
    f.write(",".join(["t_s"] + [f"{n}_rss_mib" for n in names] + ["gate_kv_blocks_used", "gate_live_sequences"]) + "\n")
    for r in rows:
        f.write(",".join(str(v) for v in r) + "\n")
json.dump({"names": names}, open(f"{out}/processes.json", "w"))
PY
wait "$bench_pid"

python3 - "$out" <<'PY'
import csv, json, sys
out = sys.argv[1]
rows = list(csv.DictReader(open(f"{out}/samples.csv")))
rep = json.load(open(f"{out}/mixed.json"))
fails = []
codes = rep["statusCodeDistribution"]
if set(codes) != {"OK"}:
    fails.append(f"calls failed: {codes}")
last = rows[-1]
if float(last["gate_live_sequences"]) != 0 or float(last["gate_kv_blocks_used"]) != 0:
    fails.append(f"after the load the gate still holds {last['gate_live_sequences']} sequences and {last['gate_kv_blocks_used']} KV blocks")
warm = rows[len(rows) // 4]
print(f"{rep['count']} calls in {rep['total'] / 1e9:.0f} s ({rep['rps']:.2f}/s), status {codes}; "
      f"most KV blocks in use {max(float(r['gate_kv_blocks_used']) for r in rows):.0f}")
print("| process | RSS after warm-up (MiB) | RSS at the end (MiB) | growth |")
print("| --- | ---: | ---: | ---: |")
for col in [c for c in rows[0] if c.endswith("_rss_mib")]:
    a, b = float(warm[col]), float(last[col])
    print(f"| {col[:-8]} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    if b > a * 1.05 + 8:
        fails.append(f"{col[:-8]} grew from {a:.1f} to {b:.1f} MiB")
for f in fails:
    print(f"FAIL: {f}")
print("soak: " + ("FAILED" if fails else "passed: no failed call, KV back to zero, memory flat"))
sys.exit(1 if fails else 0)
PY
