#!/usr/bin/env bash
# Installs what building and testing moemesh needs on a fresh Debian machine, and nothing that
# is already there. Idempotent; safe to run before every build.
#   scripts/setup.sh          build prerequisites (C/C++ compiler, protoc for etcd-client)
#   scripts/setup.sh --test   the above plus what the tests need (etcd-server; promtool, from
#                             Debian's prometheus package, checks deploy/prometheus/; a Python
#                             virtual environment with kubernetes-validate for deploy/validate.py)
set -euo pipefail

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
# etcd-client compiles etcd's protos with protoc (moemesh's own protos use protox, pure Rust).
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
if (( want_test )); then
  # The mesh tests start a real etcd server on free loopback ports.
  command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
  # promtool checks and unit-tests the alert rules in deploy/prometheus/.
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  # deploy/validate.py runs in a virtual environment of its own (below).
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
fi

if (( ${#missing[@]} )); then
  echo "setup: installing ${missing[*]}" >&2
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if (( want_test )); then
  # kubernetes-validate bundles the Kubernetes JSON schemas, so manifests are checked offline;
  # jsonschema and PyYAML check the vendored CRD and Compose schemas; the official openai client
  # is tried against the HTTP API (tests/tests/openai_http.rs), and Python's standard reflection
  # client (grpcio-reflection) against the gRPC API (tests/tests/up.rs). The path is where
  # tests/tests/deploy.rs looks (MOEMESH_DEPLOY_VENV overrides it in both places).
  venv="${MOEMESH_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/moemesh-deploy-venv}"
  pins="kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.3 openai==3.57.0 grpcio==1.85.3 grpcio-reflection==1.85.1 protobuf==7.36.2"
  if [[ "$(cat "$venv/.pins" 2>/dev/null)" != "$pins" ]]; then
    echo "setup: installing $pins into $venv" >&2
    python3 -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/pip" install -q --disable-pip-version-check $pins
    echo "$pins" >"$venv/.pins"
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found. Install a Rust toolchain (1.90 or newer), e.g. from https://rustup.rs" >&2
  exit 1
fi
