# Helpers for the load-test scripts (sourced, not run): find the moemesh binary, start a local
# mesh and wait for its ready line, stop it.

# The moemesh binary: $MOEMESH, else one on PATH, else the repository's release or debug build.
moemesh_bin() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [[ -n "${MOEMESH:-}" ]]; then echo "$MOEMESH"; return; fi
  if command -v moemesh >/dev/null 2>&1; then command -v moemesh; return; fi
  local dir
  for dir in "${CARGO_TARGET_DIR:-$root/target}/release" "${CARGO_TARGET_DIR:-$root/target}/debug"; do
    if [[ -x "$dir/moemesh" ]]; then echo "$dir/moemesh"; return; fi
  done
  echo "no moemesh binary: build one (cargo build --release -p moemesh) or set MOEMESH" >&2
  return 1
}

# start_mesh LOGDIR [moemesh up flags...]: starts `moemesh up` on a free port, waits for its ready
# line, and sets MESH_PID and MESH_ADDR.
start_mesh() {
  local logdir="$1"; shift
  mkdir -p "$logdir"
  # Emptied here, not by the background job's redirection, so no earlier run's line is read.
  : >"$logdir/up.out"
  "$(moemesh_bin)" up --listen 127.0.0.1:0 "$@" >"$logdir/up.out" 2>"$logdir/up.err" &
  MESH_PID=$!
  local waited=0
  MESH_ADDR=""
  while [[ -z "$MESH_ADDR" ]]; do
    if ! kill -0 "$MESH_PID" 2>/dev/null; then
      echo "moemesh up exited before it was ready; its log:" >&2
      tail -20 "$logdir/up.err" >&2
      return 1
    fi
    MESH_ADDR=$(grep '"role":"up"' "$logdir/up.out" | grep -o '"address":"[^"]*"' | cut -d'"' -f4 | head -1 || true)
    if [[ -z "$MESH_ADDR" ]]; then
      (( waited++ < 3000 )) || { echo "moemesh up not ready after 5 minutes" >&2; stop_mesh; return 1; }
      sleep 0.1
    fi
  done
  echo "mesh ready on $MESH_ADDR (pid $MESH_PID, logs in $logdir)" >&2
}

stop_mesh() {
  if [[ -n "${MESH_PID:-}" ]] && kill -0 "$MESH_PID" 2>/dev/null; then
    kill -TERM "$MESH_PID"
    wait "$MESH_PID" 2>/dev/null || true
  fi
  MESH_PID=""
}

# Cores and load average, printed next to results: other work on the machine skews them.
machine_note() {
  echo "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%H:%M) UTC"
}
