#!/usr/bin/env bash
# Chaos run (not in CI): steady greedy load (8 clients) on a local mesh with redundancy — etcd,
# two gates, two replicas of each of two expert shards, one frontend — while faults are injected
# one at a time at random for DURATION seconds (default 600): expert workers and gates killed
# and restarted or paused (SIGSTOP) and resumed, etcd paused or killed and restarted. Every
# request's tokens are compared with the in-process engine's. It passes with 0 failed requests
# and 0 wrong tokens; the JSON summary goes to results/chaos/summary.json.
#
#   loadtest/chaos.sh           # 10 minutes
#   loadtest/chaos.sh 120       # 2 minutes
#   MOEMESH_CHAOS_SEED=7 loadtest/chaos.sh   # another fault sequence
#
# The mesh runs the release binary (built first; MOEMESH=path uses another); the driver is the ignored test
# tests/tests/chaos.rs, which reuses the e2e tests' harness (real etcd, real processes).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=loadtest/lib.sh
source "$here/lib.sh"
secs="${1:-600}"
out="$here/results/chaos"
mkdir -p "$out"
cd "$root"
# --workspace in both builds: one feature set, so the dependencies are compiled once.
if [[ -z "${MOEMESH:-}" ]]; then cargo build --release --workspace --bins; fi
bin="${MOEMESH:-$root/target/release/moemesh}"
echo "== chaos: ${secs} s of faults under load — $(machine_note)" >&2
MOEMESH_BIN="$bin" MOEMESH_CHAOS_SECS="$secs" MOEMESH_CHAOS_REPORT="$out/summary.json" \
  cargo test --release --workspace --test chaos -- --ignored --nocapture
